//! `covnoise quadratic`: a thin shell over [`covnoise_lab::theory`] that reads
//! CSV matrices, runs [`covnoise_lab::theory::analyze`], prints the table, and
//! writes JSON and plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use covnoise::noise::StructureName;
use nalgebra::DVector;

use super::csv::{read_matrix, read_vector};
use covnoise_lab::report::theory_plots::{draw_loss_curves, loss_curves};
use covnoise_lab::theory::{
    AnalysisSettings, Dynamics, Noise, ProblemSummary, Quadratic, QuadraticReport,
    RANDOM_SPD_GENERATOR, STRUCTURES, analyze, noises_from_fisher, random_spd, validate_start,
};

/// Which noise structures to build from the Fisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StructureChoice {
    /// C = c F.
    Full,
    /// C = c diag(F).
    Diag,
    /// C = c tr(F)/d I.
    Isotropic,
    /// All three, for comparison.
    All,
}

/// Exact and Monte-Carlo expected loss of noisy gradient descent on a convex
/// quadratic L = 1/2 e^T A e (docs/method.md section 7).
///
/// Reports, for each noise covariance C, tr C, ||C||_F, tr(A C), E[L_k] at the
/// requested steps (exact closed form, and the mean +- standard error of
/// Monte-Carlo runs), and the stationary loss from the discrete Lyapunov
/// equation. All CSV files hold comma-separated numbers, one matrix row per
/// line; empty lines and lines starting with '#' are ignored.
#[derive(Args, Debug)]
pub struct QuadraticArgs {
    /// Hessian A: CSV, d x d, symmetric positive definite. Without it a random
    /// problem is generated from --dim, --condition and --seed: A = Q diag(lambda) Q^T,
    /// Q a Haar-random rotation, lambda geometric from 1 down to 1/condition.
    #[arg(long, value_name = "FILE")]
    pub hessian: Option<PathBuf>,

    /// Noise covariance C: CSV, d x d, symmetric positive semidefinite, used
    /// as given (times --scale). Replaces --fisher and --structure.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["fisher", "structure"])]
    pub noise_cov: Option<PathBuf>,

    /// Fisher F: CSV, d x d, symmetric positive semidefinite, from which the
    /// noise is built (see --structure). Default: the Hessian (A = F, as near
    /// a minimum).
    #[arg(long, value_name = "FILE")]
    pub fisher: Option<PathBuf>,

    /// Noise structure built from the Fisher: full (C = c F), diag
    /// (C = c diag F), isotropic (C = c tr(F)/d I), or all three. All have the
    /// same trace.
    #[arg(long, value_enum, default_value = "all")]
    pub structure: StructureChoice,

    /// Noise scale c >= 0, multiplying the covariance (also a --noise-cov
    /// one).
    #[arg(
        long,
        value_name = "C",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub scale: f64,

    /// Start point e_0 = theta_0 - theta*: CSV with d numbers (one line, or
    /// one per line). Default: all ones.
    #[arg(long, value_name = "FILE")]
    pub x0: Option<PathBuf>,

    /// Step size alpha > 0. Default: 1 / lambda_max(A). Must satisfy
    /// alpha * lambda_max < 2 (1 + momentum), or the iteration diverges.
    #[arg(long, allow_negative_numbers = true)]
    pub alpha: Option<f64>,

    /// Heavy-ball momentum beta, in [0, 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub momentum: f64,

    /// Steps k (comma-separated) at which to report E[L_k]; k = 0 is the
    /// start.
    #[arg(
        long,
        value_name = "K,K,...",
        value_delimiter = ',',
        default_value = "1,3,10,30,100,300,1000"
    )]
    pub steps: Vec<u64>,

    /// Monte-Carlo runs R per noise structure (0 = exact only; otherwise at
    /// least 2). Cost: R * max k * d^2 per structure.
    #[arg(long, value_name = "R", default_value_t = 200)]
    pub mc_runs: usize,

    /// Seed of the random problem and of the Monte-Carlo noise (ChaCha8;
    /// every structure sees the same noise draws).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Dimension d of the random problem (only without --hessian).
    #[arg(long, default_value_t = 10, conflicts_with = "hessian")]
    pub dim: usize,

    /// Condition number of the random problem (only without --hessian).
    #[arg(long, default_value_t = 100.0, conflicts_with = "hessian")]
    pub condition: f64,

    /// Write the full results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Plot E[L_k] and its noise part against k (log axes; exact curves,
    /// Monte-Carlo points with error bars) to this .png or .svg file.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `covnoise quadratic`.
pub fn run(args: &QuadraticArgs) -> anyhow::Result<()> {
    // The output files are checked first: nothing is written unless all can be.
    for (flag, path) in [("--json", &args.json), ("--plot", &args.plot)] {
        if let Some(path) = path {
            super::check_output_file(flag, path)?;
        }
    }
    if args.json.is_some() && args.json == args.plot {
        bail!("--json and --plot name the same file");
    }
    if let Some(path) = &args.plot
        && !path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png") || e.eq_ignore_ascii_case("svg"))
    {
        bail!(
            "--plot {}: the file must end in .png or .svg",
            path.display()
        );
    }
    if args.mc_runs == 1 {
        bail!("--mc-runs 1 gives no standard error: use 0 (exact only) or at least 2");
    }
    if args.steps.is_empty() {
        bail!("--steps needs at least one step");
    }
    let generated = args.hessian.is_none();
    let hessian = match &args.hessian {
        Some(path) => read_matrix(path, "Hessian")?,
        None => random_spd(args.dim, args.condition, args.seed)?,
    };
    let quadratic = Quadratic::new(&hessian).with_context(|| match &args.hessian {
        Some(path) => format!("--hessian {}", path.display()),
        None => "generated Hessian".to_string(),
    })?;
    let d = quadratic.dim();

    let noises: Vec<Noise> = if let Some(path) = &args.noise_cov {
        let cov = read_matrix(path, "noise covariance")?;
        vec![
            Noise::from_covariance("custom", &cov)
                .and_then(|n| n.scaled(args.scale))
                .with_context(|| format!("--noise-cov {}", path.display()))?,
        ]
    } else {
        let fisher = match &args.fisher {
            Some(path) => read_matrix(path, "Fisher")?,
            None => quadratic.hessian().clone(),
        };
        let structures: Vec<StructureName> = match args.structure {
            StructureChoice::Full => vec![StructureName::Full],
            StructureChoice::Diag => vec![StructureName::Diag],
            StructureChoice::Isotropic => vec![StructureName::Isotropic],
            StructureChoice::All => STRUCTURES.to_vec(),
        };
        noises_from_fisher(&fisher, &structures, args.scale).with_context(|| {
            match &args.fisher {
                Some(path) => format!("--fisher {}", path.display()),
                None => "Fisher (= Hessian)".to_string(),
            }
        })?
    };
    for noise in &noises {
        noise.tr_hc(&quadratic)?;
    }

    let e0 = match &args.x0 {
        Some(path) => read_vector(path, "x0")?,
        None => DVector::from_element(d, 1.0),
    };
    validate_start(&quadratic, &e0).with_context(|| match &args.x0 {
        Some(path) => format!("--x0 {}", path.display()),
        None => "default start point".to_string(),
    })?;

    let alpha = args.alpha.unwrap_or(1.0 / quadratic.lambda_max());
    let dynamics = Dynamics::new(alpha, args.momentum)?;
    dynamics.check_stable(&quadratic)?;
    if !generated && args.mc_runs == 0 && args.seed != 0 {
        eprintln!(
            "warning: --seed is ignored: the problem comes from --hessian and there are no Monte-Carlo runs"
        );
    }
    let settings = AnalysisSettings {
        steps: args.steps.clone(),
        mc_runs: args.mc_runs,
        seed: args.seed,
    };
    let analysis = analyze(&quadratic, &noises, &e0, dynamics, &settings)?;

    let problem = ProblemSummary {
        dim: d,
        generated,
        generator: generated.then_some(RANDOM_SPD_GENERATOR),
        requested_condition: generated.then_some(args.condition),
        condition: quadratic.condition(),
        lambda_min: quadratic.lambda_min(),
        lambda_max: quadratic.lambda_max(),
        hessian_file: args.hessian.as_deref().map(display),
        fisher: match (&args.noise_cov, &args.fisher) {
            (Some(_), _) => "not used (--noise-cov)".to_string(),
            (None, Some(path)) => display(path),
            (None, None) => "hessian".to_string(),
        },
        noise_cov_file: args.noise_cov.as_deref().map(display),
        x0: args.x0.as_deref().map_or_else(|| "ones".into(), display),
        seed: args.seed,
        alpha,
        alpha_is_default: args.alpha.is_none(),
        momentum: args.momentum,
        scale: args.scale,
        spectral_radius: dynamics.spectral_radius(&quadratic),
        mc_runs: args.mc_runs,
    };
    let report = QuadraticReport { problem, analysis };
    print!("{report}");

    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write JSON {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "Noisy GD on a quadratic: d = {}, condition {}, alpha = {}, momentum {}, c = {}",
            d,
            round4(quadratic.condition()),
            round4(alpha),
            args.momentum,
            args.scale
        );
        let curves = loss_curves(&report.analysis);
        draw_loss_curves(path, &title, &curves, &report.analysis.dense.deterministic)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `v` with at most 4 decimals, for titles.
fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}
