//! `covnoise quadratic` and `covnoise illustrate`: thin shells over
//! [`covnoise::theory`] that read CSV matrices, print a table, and write JSON and
//! plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use covnoise::report::theory_plots::{
    LossCurve, MonteCarloPoints, draw_illustration, draw_loss_curves,
};
use covnoise::theory::{
    Dynamics, IllustrationConfig, Noise, NoiseStructure, Quadratic, RANDOM_SPD_GENERATOR,
    expected_loss_closed_form, expected_loss_recursion, illustrate, random_spd, simulate,
    stationary_loss, stationary_loss_first_order, validate_start,
};

/// The recursion cross-check covers the requested steps k with
/// (state dimension)^3 * k at most this (about a second of matrix products).
/// The closed form is always used for the reported numbers.
const RECURSION_CHECK_BUDGET: f64 = 1e9;

/// Points on the dense log-spaced grid of the exact curves in the plot.
const PLOT_GRID_POINTS: usize = 300;

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
/// quadratic L = 1/2 e^T A e (METHOD.md section 4).
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
    #[arg(long, value_name = "C", default_value_t = 1.0)]
    pub scale: f64,

    /// Start point e_0 = theta_0 - theta*: CSV with d numbers (one line, or
    /// one per line). Default: all ones.
    #[arg(long, value_name = "FILE")]
    pub x0: Option<PathBuf>,

    /// Step size alpha > 0. Default: 1 / lambda_max(A). Must satisfy
    /// alpha * lambda_max < 2 (1 + momentum), or the iteration diverges.
    #[arg(long)]
    pub alpha: Option<f64>,

    /// Heavy-ball momentum beta, in [0, 1).
    #[arg(long, default_value_t = 0.0)]
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

/// Draws the paper's Figure 1 on a synthetic 2-D least-squares problem: the
/// clouds of one-step updates from one point under small-batch SGD (real
/// minibatch sampling) and under a large batch plus isotropic, full-Fisher or
/// diagonal-Fisher noise (scale c = 1/B_S - 1/B_L, same total variance), over
/// the loss contours, in four panels.
#[derive(Args, Debug)]
pub struct IllustrateArgs {
    /// Output figure: .png or .svg.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Seed of the data set and of the sampled updates.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Updates drawn per cloud.
    #[arg(long, default_value_t = 600)]
    pub draws: usize,

    /// Small batch B_S of the SGD reference.
    #[arg(long, default_value_t = 8)]
    pub small_batch: usize,

    /// Large batch B_L that the noise is added to.
    #[arg(long, default_value_t = 256)]
    pub large_batch: usize,

    /// Learning rate of the one step.
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,

    /// Number of examples in the synthetic data set.
    #[arg(long, default_value_t = 4096)]
    pub examples: usize,
}

/// Reads a CSV file of numbers into rows. One clear error for an unreadable
/// file, a non-number (with line and column), ragged rows, or no numbers.
fn read_csv(path: &Path, what: &str) -> anyhow::Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} file {}", path.display()))?;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    let mut first_line = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<&str> = line.split(',').map(str::trim).collect();
        // Tolerate one trailing comma, as some writers emit.
        if fields.len() > 1 && fields.last() == Some(&"") {
            fields.pop();
        }
        let mut row = Vec::with_capacity(fields.len());
        for (c, field) in fields.iter().enumerate() {
            let value: f64 = field.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{what} file {}, line {}, column {}: '{}' is not a number",
                    path.display(),
                    n + 1,
                    c + 1,
                    field
                )
            })?;
            row.push(value);
        }
        if let Some(first) = rows.first()
            && first.len() != row.len()
        {
            bail!(
                "{what} file {}: line {} has {} values but line {} has {}",
                path.display(),
                n + 1,
                row.len(),
                first_line + 1,
                first.len()
            );
        }
        if rows.is_empty() {
            first_line = n;
        }
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{what} file {} has no numbers", path.display());
    }
    Ok(rows)
}

fn read_matrix(path: &Path, what: &str) -> anyhow::Result<DMatrix<f64>> {
    let rows = read_csv(path, what)?;
    let (r, c) = (rows.len(), rows[0].len());
    Ok(DMatrix::from_row_iterator(r, c, rows.into_iter().flatten()))
}

fn read_vector(path: &Path, what: &str) -> anyhow::Result<DVector<f64>> {
    let values: Vec<f64> = read_csv(path, what)?.into_iter().flatten().collect();
    Ok(DVector::from_vec(values))
}

/// The "problem" object of the JSON output.
#[derive(Serialize)]
struct ProblemReport {
    dim: usize,
    generated: bool,
    generator: Option<&'static str>,
    requested_condition: Option<f64>,
    condition: f64,
    lambda_min: f64,
    lambda_max: f64,
    hessian_file: Option<String>,
    fisher: String,
    noise_cov_file: Option<String>,
    x0: String,
    seed: u64,
    alpha: f64,
    alpha_is_default: bool,
    momentum: f64,
    scale: f64,
    spectral_radius: f64,
    mc_runs: usize,
}

/// One entry of "results".
#[derive(Serialize)]
struct StructureReport {
    structure: String,
    trace: f64,
    frobenius: f64,
    tr_hc: f64,
    exact_loss: Vec<f64>,
    noise_loss: Vec<f64>,
    stationary_loss: f64,
    stationary_first_order: f64,
    mc_mean: Vec<f64>,
    mc_stderr: Vec<f64>,
}

/// Agreement of the O(k n^3) recursion with the closed form, on the
/// requested steps up to `checked_up_to_step` (None: none was cheap enough).
#[derive(Serialize)]
struct RecursionCheck {
    checked_up_to_step: Option<u64>,
    max_relative_difference: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    problem: ProblemReport,
    steps: Vec<u64>,
    deterministic_loss: Vec<f64>,
    results: Vec<StructureReport>,
    recursion_check: RecursionCheck,
}

/// Log-spaced integer steps from 1 to `max_k`, plus 0.
fn dense_grid(max_k: u64) -> Vec<u64> {
    let mut grid = vec![0, 1];
    let top = (max_k.max(1) as f64).ln();
    for i in 0..=PLOT_GRID_POINTS {
        grid.push((top * i as f64 / PLOT_GRID_POINTS as f64).exp().round() as u64);
    }
    grid.push(max_k);
    grid.sort_unstable();
    grid.dedup();
    grid
}

/// `v` with at most 4 decimals, for titles.
fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `covnoise quadratic`.
pub fn run(args: &QuadraticArgs) -> anyhow::Result<()> {
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
        let structures: Vec<NoiseStructure> = match args.structure {
            StructureChoice::Full => vec![NoiseStructure::Full],
            StructureChoice::Diag => vec![NoiseStructure::Diag],
            StructureChoice::Isotropic => vec![NoiseStructure::Isotropic],
            StructureChoice::All => NoiseStructure::ALL.to_vec(),
        };
        let context = match &args.fisher {
            Some(path) => format!("--fisher {}", path.display()),
            None => "Fisher (= Hessian)".to_string(),
        };
        structures
            .into_iter()
            .map(|s| Noise::from_fisher(&fisher, s, args.scale).with_context(|| context.clone()))
            .collect::<anyhow::Result<_>>()?
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
    if args.mc_runs == 1 {
        bail!("--mc-runs 1 gives no standard error: use 0 (exact only) or at least 2");
    }
    if args.steps.is_empty() {
        bail!("--steps needs at least one step");
    }
    let mut steps = args.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    let max_k = *steps.last().expect("steps is not empty");

    // Exact values, Monte-Carlo and stationary losses per structure.
    let mut results = Vec::new();
    let mut curves = Vec::new();
    let grid = dense_grid(max_k);
    let mut deterministic = Vec::new();
    let mut deterministic_grid = Vec::new();
    for noise in &noises {
        let exact = expected_loss_closed_form(&quadratic, noise, &e0, dynamics, &steps)?;
        let on_grid = expected_loss_closed_form(&quadratic, noise, &e0, dynamics, &grid)?;
        deterministic = exact.iter().map(|p| p.deterministic).collect();
        deterministic_grid = on_grid.iter().map(|p| p.deterministic).collect();
        let (mc_mean, mc_stderr) = if args.mc_runs >= 2 {
            let mc = simulate(
                &quadratic,
                noise,
                &e0,
                dynamics,
                &steps,
                args.mc_runs,
                args.seed,
            )?;
            (mc.mean, mc.stderr)
        } else {
            (Vec::new(), Vec::new())
        };
        curves.push(LossCurve {
            label: noise.label().to_string(),
            k: grid.clone(),
            total: on_grid.iter().map(|p| p.total()).collect(),
            noise: on_grid.iter().map(|p| p.noise).collect(),
            monte_carlo: (!mc_mean.is_empty()).then(|| MonteCarloPoints {
                k: steps.clone(),
                mean: mc_mean.clone(),
                stderr: mc_stderr.clone(),
                deterministic: deterministic.clone(),
            }),
        });
        results.push(StructureReport {
            structure: noise.label().to_string(),
            trace: noise.trace(),
            frobenius: noise.frobenius(),
            tr_hc: noise.tr_hc(&quadratic)?,
            exact_loss: exact.iter().map(|p| p.total()).collect(),
            noise_loss: exact.iter().map(|p| p.noise).collect(),
            stationary_loss: stationary_loss(&quadratic, noise, dynamics)?,
            stationary_first_order: stationary_loss_first_order(noise, dynamics),
            mc_mean,
            mc_stderr,
        });
    }

    // Cross-check the closed form against the O(k n^3) recursion on the
    // requested steps it can reach within the budget (all of them on small
    // problems).
    let state = if args.momentum == 0.0 { d } else { 2 * d } as f64;
    let reachable = (RECURSION_CHECK_BUDGET / state.powi(3)).floor() as u64;
    let checked: Vec<u64> = steps.iter().copied().filter(|&k| k <= reachable).collect();
    let recursion_check = match checked.last() {
        Some(&up_to) => {
            let mut worst: f64 = 0.0;
            for (noise, result) in noises.iter().zip(&results) {
                let rec = expected_loss_recursion(&quadratic, noise, &e0, dynamics, &checked)?;
                for (r, c) in rec.iter().zip(&result.exact_loss) {
                    let scale = r.total().abs().max(c.abs());
                    if scale > 0.0 {
                        worst = worst.max((r.total() - c).abs() / scale);
                    }
                }
            }
            RecursionCheck {
                checked_up_to_step: Some(up_to),
                max_relative_difference: Some(worst),
            }
        }
        None => RecursionCheck {
            checked_up_to_step: None,
            max_relative_difference: None,
        },
    };

    let problem = ProblemReport {
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
        x0: args
            .x0
            .as_deref()
            .map(display)
            .unwrap_or_else(|| "ones".into()),
        seed: args.seed,
        alpha,
        alpha_is_default: args.alpha.is_none(),
        momentum: args.momentum,
        scale: args.scale,
        spectral_radius: dynamics.spectral_radius(&quadratic),
        mc_runs: args.mc_runs,
    };
    let report = Report {
        problem,
        steps,
        deterministic_loss: deterministic,
        results,
        recursion_check,
    };
    print!("{}", table(&report));

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
        draw_loss_curves(path, &title, &curves, &deterministic_grid)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The human-readable summary printed to stdout.
fn table(report: &Report) -> String {
    let p = &report.problem;
    let mut out = String::new();
    let source = if p.generated {
        format!(
            "random SPD problem (Haar-rotated geometric spectrum), d = {}, condition {}, seed {}",
            p.dim,
            p.requested_condition.unwrap_or(p.condition),
            p.seed
        )
    } else {
        format!(
            "Hessian {}, d = {}, condition {:.4}",
            p.hessian_file.as_deref().unwrap_or("?"),
            p.dim,
            p.condition
        )
    };
    let _ = writeln!(out, "problem: {source}; Fisher: {}", p.fisher);
    let _ = writeln!(
        out,
        "alpha = {:.6}{} (alpha * lambda_max = {:.4}), momentum = {}, scale c = {}, spectral radius = {:.6}, Monte-Carlo runs = {}",
        p.alpha,
        if p.alpha_is_default {
            " (1/lambda_max)"
        } else {
            ""
        },
        p.alpha * p.lambda_max,
        p.momentum,
        p.scale,
        p.spectral_radius,
        p.mc_runs
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>12} {:>14} {:>16}",
        "structure", "tr C", "||C||_F", "tr(A C)", "stationary", "1st order"
    );
    for r in &report.results {
        let _ = writeln!(
            out,
            "{:<10} {:>12.5e} {:>12.5e} {:>12.5e} {:>14.6e} {:>16.6e}",
            r.structure, r.trace, r.frobenius, r.tr_hc, r.stationary_loss, r.stationary_first_order
        );
    }
    let _ = writeln!(
        out,
        "(1st order: alpha tr(C) / (4 (1 - momentum)), the small-alpha stationary loss)"
    );

    let _ = writeln!(out);
    let _ = writeln!(out, "expected loss E[L_k] (exact)");
    let _ = write!(out, "{:>8} {:>12}", "k", "no noise");
    for r in &report.results {
        let _ = write!(out, " {:>12}", r.structure);
    }
    let _ = writeln!(out);
    for (i, k) in report.steps.iter().enumerate() {
        let _ = write!(out, "{:>8} {:>12.5e}", k, report.deterministic_loss[i]);
        for r in &report.results {
            let _ = write!(out, " {:>12.5e}", r.exact_loss[i]);
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "noise part E[L_k] - L(E[e_k]) (exact); exactly (alpha^2 / 2) tr(A C) at k = 1, about (alpha^2 k / 2) tr(A C) while alpha lambda k is small"
    );
    let _ = write!(out, "{:>8}", "k");
    for r in &report.results {
        let _ = write!(out, " {:>12}", r.structure);
    }
    let _ = writeln!(out);
    for (i, k) in report.steps.iter().enumerate() {
        let _ = write!(out, "{k:>8}");
        for r in &report.results {
            let _ = write!(out, " {:>12.5e}", r.noise_loss[i]);
        }
        let _ = writeln!(out);
    }
    if report.results.iter().any(|r| !r.mc_mean.is_empty()) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Monte-Carlo check ({} runs): mean loss, and z = (mean - exact) / standard error",
            p.mc_runs
        );
        let _ = write!(out, "{:>8}", "k");
        for r in &report.results {
            let _ = write!(out, " {:>12} {:>6}", r.structure, "z");
        }
        let _ = writeln!(out);
        let mut worst: f64 = 0.0;
        for (i, k) in report.steps.iter().enumerate() {
            let _ = write!(out, "{k:>8}");
            for r in &report.results {
                let diff = r.mc_mean[i] - r.exact_loss[i];
                // Where every run has the same loss (k = 0, or C = 0) the
                // standard error is pure rounding; so is any difference.
                let rounding = 1e-12 * r.exact_loss[i].abs();
                let z = if r.mc_stderr[i] > rounding {
                    diff / r.mc_stderr[i]
                } else if diff.abs() <= rounding {
                    0.0
                } else {
                    f64::INFINITY
                };
                worst = worst.max(z.abs());
                let _ = write!(out, " {:>12.5e} {:>6.2}", r.mc_mean[i], z);
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "largest |z| = {worst:.2}");
    }
    let c = &report.recursion_check;
    let _ = writeln!(out);
    match (c.checked_up_to_step, c.max_relative_difference) {
        (Some(k), Some(diff)) => {
            let _ = writeln!(
                out,
                "recursion vs closed form (requested steps up to k = {k}): max relative difference {diff:.2e}"
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "recursion vs closed form: skipped (even the first requested step exceeds the cost budget)"
            );
        }
    }
    out
}

/// Runs `covnoise illustrate`.
pub fn run_illustrate(args: &IllustrateArgs) -> anyhow::Result<()> {
    let config = IllustrationConfig {
        examples: args.examples,
        small_batch: args.small_batch,
        large_batch: args.large_batch,
        lr: args.lr,
        draws: args.draws,
        seed: args.seed,
    };
    let ill = illustrate(&config)?;
    println!(
        "2-D least squares: {} examples, start ({:.3}, {:.3}), optimum ({:.3}, {:.3}), noise scale c = {:.5}",
        config.examples, ill.start.x, ill.start.y, ill.optimum.x, ill.optimum.y, ill.noise_scale
    );
    println!(
        "{:<40} {:>12} {:>12} {:>16}",
        "cloud", "tr cov", "corr", "gap to SGD cov"
    );
    let sgd = ill.clouds[0].predicted_cov;
    for cloud in &ill.clouds {
        let cov = cloud.cov;
        let corr = cov[(0, 1)] / (cov[(0, 0)] * cov[(1, 1)]).sqrt();
        let gap = (cloud.predicted_cov - sgd).norm() / sgd.norm();
        println!(
            "{:<40} {:>12.4e} {:>12.3} {:>16.3}",
            cloud.label,
            cov.trace(),
            corr,
            gap
        );
    }
    println!("(gap: ||predicted cov - SGD's|| / ||SGD's||, Frobenius)");
    draw_illustration(&args.out, &ill)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
