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

/// Large-batch SGD with structured (Fisher) covariance noise.
#[derive(Debug, Parser)]
#[command(name = "covnoise", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train an MLP on Fashion-MNIST, with or without structured noise.
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

/// A library message in the command line's words: the library names its
/// own types and methods (`Estimator::Microbatch`, `GhostBatchNorm`), the
/// user of this binary knows the flags that set them.
pub fn in_flag_words(message: &str) -> String {
    const WORDS: [(&str, &str); 7] = [
        (
            "use GhostBatchNorm with a group size dividing the micro-batch, routed through Probes::batch_norm",
            "use --ghost-batch N with N dividing the micro-batch size",
        ),
        (
            "use GhostBatchNorm with a group size, routed through Probes::batch_norm",
            "use --ghost-batch N",
        ),
        (
            "the micro-batch estimator (Estimator::Microbatch) with GhostBatchNorm",
            "--estimator microbatch with --ghost-batch N",
        ),
        (
            "the micro-batch estimator (Estimator::Microbatch)",
            "--estimator microbatch",
        ),
        ("Estimator::Microbatch", "--estimator microbatch"),
        ("large_batch", "batch-size"),
        ("routed through Probes", "in covnoise's models"),
    ];
    WORDS
        .iter()
        .fold(message.to_string(), |m, (library, flags)| {
            m.replace(library, flags)
        })
}

#[cfg(test)]
mod tests {
    use super::in_flag_words;

    #[test]
    fn library_words_become_flags() {
        let m =
            "parameter bn.gamma has no rule; use the micro-batch estimator (Estimator::Microbatch)";
        assert_eq!(
            in_flag_words(m),
            "parameter bn.gamma has no rule; use --estimator microbatch"
        );
        assert_eq!(
            in_flag_words("invalid large_batch = 0"),
            "invalid batch-size = 0"
        );
    }
}
