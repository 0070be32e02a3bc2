//! Command-line parsing and dispatch: one file per subcommand.

mod bench;
mod csv;
mod eval;
mod illustrate;
mod plot;
mod quadratic;
mod study;
mod train;

use clap::{Parser, Subcommand};
use covnoise::error::{CovnoiseError, Remedy};

/// Large-batch SGD with structured (Fisher) covariance noise.
#[derive(Debug, Parser)]
#[command(name = "covnoise", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model (the MLP, LeNet-5, VGG, ResNet or a sequential description) on Fashion-MNIST or CIFAR, with or without structured noise.
    Train(Box<train::TrainArgs>),
    /// Test loss and accuracy of a run's saved model (a checkpoint).
    Eval(eval::EvalArgs),
    /// Exact and Monte-Carlo expected loss of noisy gradient descent on a quadratic.
    Quadratic(quadratic::QuadraticArgs),
    /// Draw the four-panel figure of one-step update clouds on a 2-D least-squares problem.
    Illustrate(illustrate::IllustrateArgs),
    /// Time one training step for plain SGD and each noise variant (release build).
    Bench(bench::BenchArgs),
    /// Plot test accuracy and train loss against epochs for run directories.
    Plot(plot::PlotArgs),
    /// Run (or resume) a study: arms x seeds with an optional equal-budget search.
    Study(study::StudyArgs),
}

/// Parses the command line and runs the subcommand. A usage error (an
/// unknown flag, a malformed value) is printed as one line and ends the
/// process with exit code 2 before anything is read or written; help and
/// version requests print and exit 0.
pub fn run() -> anyhow::Result<()> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("error: a subcommand is required (`covnoise --help` lists them)");
            std::process::exit(2)
        }
        Err(e) => {
            eprintln!("{}", usage_error_line(&e.render().to_string()));
            std::process::exit(2)
        }
    };
    fast_kernels_from_env()?;
    match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Study(args) => study::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Plot(args) => plot::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Quadratic(args) => quadratic::run(&args),
        Command::Illustrate(args) => illustrate::run(&args),
    }
}

/// `COVNOISE_FAST_KERNELS=0` (or `off`) runs every convolution and batch
/// norm on burn's own ops instead of covnoise's flex kernels, for an A/B
/// of whole runs; `1`, `on` or unset keeps them.
fn fast_kernels_from_env() -> anyhow::Result<()> {
    match std::env::var("COVNOISE_FAST_KERNELS").as_deref() {
        Err(_) | Ok("1" | "on") => Ok(()),
        Ok("0" | "off") => {
            covnoise::kernels::set_enabled(false);
            Ok(())
        }
        Ok(other) => anyhow::bail!("COVNOISE_FAST_KERNELS={other:?}: use 0, off, 1 or on"),
    }
}

/// clap's message without its usage and tip paragraphs, on one line (a
/// list of missing arguments is joined with spaces).
fn usage_error_line(rendered: &str) -> String {
    let message = rendered.split("\n\n").next().unwrap_or(rendered);
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Refuses an output file (`flag PATH`) that could not be written: a
/// directory, or one whose directory does not exist or is not writable;
/// checked before the command computes or writes anything.
pub fn check_output_file(flag: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let absolute = std::path::absolute(path)?;
    let parent = absolute.parent().unwrap_or(std::path::Path::new("/"));
    if absolute.is_dir() || !parent.is_dir() {
        anyhow::bail!(
            "{flag} {}: cannot be written (a directory, or its directory does not exist)",
            path.display()
        );
    }
    covnoise_lab::train::run_dir::check_writable(parent)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    Ok(())
}

/// Builds the global thread pool once (burn's CPU backend and the noise
/// generator both use it).
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot set --threads {n}: {e}"))?;
    }
    Ok(())
}

/// An error as one line in the command line's words: `{:#}`'s chain of
/// contexts joined by ": ", with each library refusal's typed remedy
/// ([`Remedy`]) said as the flags that apply it, and the library's
/// setting names as flags.
pub fn render_error(e: &anyhow::Error) -> String {
    e.chain()
        .map(|link| {
            let library = link.downcast_ref::<CovnoiseError>().or_else(|| {
                match link.downcast_ref::<covnoise_lab::train::TrainError>() {
                    Some(covnoise_lab::train::TrainError::Config(c)) => Some(c),
                    _ => None,
                }
            });
            match library {
                Some(c) => in_flags(c),
                None => link.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// A library error in the command line's words.
fn in_flags(e: &CovnoiseError) -> String {
    match e {
        CovnoiseError::Refused { problem, remedy } => {
            format!("{problem}; {}", remedy_flags(*remedy))
        }
        CovnoiseError::InvalidSetting {
            name,
            value,
            reason,
        } => format!("invalid {} = {value}: {reason}", setting_flag(name)),
        other => other.to_string(),
    }
}

/// What the flags of `covnoise train` do about a refusal.
fn remedy_flags(remedy: Remedy) -> String {
    let flags = match remedy {
        Remedy::MicrobatchEstimator => "use --estimator microbatch",
        Remedy::MicrobatchWithGhostBatchNorm => "use --estimator microbatch with --ghost-batch N",
        Remedy::GhostBatchNorm => "use --ghost-batch N",
        Remedy::GhostBatchNormDividingMicroBatch => {
            "use --ghost-batch N with N dividing the micro-batch size"
        }
        Remedy::RouteThroughProbes => "use --estimator microbatch",
        Remedy::EstimatorWithoutSampledLabels => "use --estimator exact or microbatch",
        Remedy::GradNormPenalty => "use --regularizer grad-norm",
        // Remedies added to the library later are said in its own words.
        other => return other.to_string(),
    };
    flags.to_string()
}

/// The flag that sets a library setting, where the names differ.
fn setting_flag(name: &str) -> &str {
    match name {
        "large_batch" => "batch-size",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_refusals_are_said_in_flags() {
        let refused = anyhow::Error::new(CovnoiseError::Refused {
            problem: "parameter bn.gamma has no rule".into(),
            remedy: Remedy::MicrobatchEstimator,
        })
        .context("run runs/x");
        assert_eq!(
            render_error(&refused),
            "run runs/x: parameter bn.gamma has no rule; use --estimator microbatch"
        );
        let wrapped = anyhow::Error::new(covnoise_lab::train::TrainError::Config(
            CovnoiseError::InvalidSetting {
                name: "large_batch",
                value: "0".into(),
                reason: "must be >= 1",
            },
        ));
        assert_eq!(
            render_error(&wrapped),
            "invalid batch-size = 0: must be >= 1"
        );
        // Without the binary's rendering, the library says its own items.
        assert!(
            CovnoiseError::Refused {
                problem: "p".into(),
                remedy: Remedy::GhostBatchNorm
            }
            .to_string()
            .contains("GhostBatchNorm")
        );
    }
}
