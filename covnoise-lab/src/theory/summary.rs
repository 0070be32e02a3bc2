//! The report of `covnoise quadratic`: the problem's description and the
//! [`Analysis`], serialized as the JSON document and formatted as the
//! human-readable table.

use std::fmt;

use serde::Serialize;

use super::analysis::Analysis;

/// How the problem was set up: the "problem" object of the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProblemSummary {
    /// Dimension d.
    pub dim: usize,
    /// True when the Hessian was generated rather than read from a file.
    pub generated: bool,
    /// How a generated Hessian was made ([`super::RANDOM_SPD_GENERATOR`]).
    pub generator: Option<&'static str>,
    /// The condition number asked of a generated Hessian.
    pub requested_condition: Option<f64>,
    /// lambda_max / lambda_min of the Hessian.
    pub condition: f64,
    /// Smallest eigenvalue of the Hessian.
    pub lambda_min: f64,
    /// Largest eigenvalue of the Hessian.
    pub lambda_max: f64,
    /// The Hessian's file, if it was read from one.
    pub hessian_file: Option<String>,
    /// Where the Fisher came from (a file, "hessian", or why it was unused).
    pub fisher: String,
    /// The noise covariance's file, if one was given.
    pub noise_cov_file: Option<String>,
    /// Where the start point came from (a file, or "ones").
    pub x0: String,
    /// Seed of the random problem and of the Monte-Carlo noise.
    pub seed: u64,
    /// Step size alpha.
    pub alpha: f64,
    /// True when alpha is the default 1 / lambda_max.
    pub alpha_is_default: bool,
    /// Heavy-ball momentum.
    pub momentum: f64,
    /// Noise scale c.
    pub scale: f64,
    /// Spectral radius of the iteration matrix.
    pub spectral_radius: f64,
    /// Monte-Carlo runs per noise covariance (0: exact only).
    pub mc_runs: usize,
}

/// The whole report: serializes to the JSON document (`problem`, `steps`,
/// `deterministic_loss`, `results`, `recursion_check`); `Display` gives the
/// table printed to stdout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuadraticReport {
    /// The problem.
    pub problem: ProblemSummary,
    /// The numbers.
    #[serde(flatten)]
    pub analysis: Analysis,
}

/// How far a Monte-Carlo mean is from the exact value, in standard errors.
/// Where every run has the same loss (k = 0, or C = 0) the standard error is
/// pure rounding, and so is any difference of that size: such a difference
/// gives 0, a larger one infinity.
pub fn monte_carlo_z(mean: f64, stderr: f64, exact: f64) -> f64 {
    let diff = mean - exact;
    let rounding = 1e-12 * exact.abs();
    if stderr > rounding {
        diff / stderr
    } else if diff.abs() <= rounding {
        0.0
    } else {
        f64::INFINITY
    }
}

impl fmt::Display for QuadraticReport {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.problem;
        let a = &self.analysis;
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
        writeln!(out, "problem: {source}; Fisher: {}", p.fisher)?;
        writeln!(
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
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>12} {:>14} {:>16}",
            "structure", "tr C", "||C||_F", "tr(A C)", "stationary", "1st order"
        )?;
        for r in &a.results {
            writeln!(
                out,
                "{:<10} {:>12.5e} {:>12.5e} {:>12.5e} {:>14.6e} {:>16.6e}",
                r.structure,
                r.trace,
                r.frobenius,
                r.tr_hc,
                r.stationary_loss,
                r.stationary_first_order
            )?;
        }
        writeln!(
            out,
            "(1st order: alpha tr(C) / (4 (1 - momentum)), the small-alpha stationary loss)"
        )?;

        writeln!(out)?;
        writeln!(out, "expected loss E[L_k] (exact)")?;
        write!(out, "{:>8} {:>12}", "k", "no noise")?;
        for r in &a.results {
            write!(out, " {:>12}", r.structure)?;
        }
        writeln!(out)?;
        for (i, k) in a.steps.iter().enumerate() {
            write!(out, "{:>8} {:>12.5e}", k, a.deterministic_loss[i])?;
            for r in &a.results {
                write!(out, " {:>12.5e}", r.exact_loss[i])?;
            }
            writeln!(out)?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "noise part E[L_k] - L(E[e_k]) (exact); exactly (alpha^2 / 2) tr(A C) at k = 1, about (alpha^2 k / 2) tr(A C) while alpha lambda k is small"
        )?;
        write!(out, "{:>8}", "k")?;
        for r in &a.results {
            write!(out, " {:>12}", r.structure)?;
        }
        writeln!(out)?;
        for (i, k) in a.steps.iter().enumerate() {
            write!(out, "{k:>8}")?;
            for r in &a.results {
                write!(out, " {:>12.5e}", r.noise_loss[i])?;
            }
            writeln!(out)?;
        }
        if a.results.iter().any(|r| !r.mc_mean.is_empty()) {
            writeln!(out)?;
            writeln!(
                out,
                "Monte-Carlo check ({} runs): mean loss, and z = (mean - exact) / standard error",
                p.mc_runs
            )?;
            write!(out, "{:>8}", "k")?;
            for r in &a.results {
                write!(out, " {:>12} {:>6}", r.structure, "z")?;
            }
            writeln!(out)?;
            let mut worst: f64 = 0.0;
            for (i, k) in a.steps.iter().enumerate() {
                write!(out, "{k:>8}")?;
                for r in &a.results {
                    let z = monte_carlo_z(r.mc_mean[i], r.mc_stderr[i], r.exact_loss[i]);
                    worst = worst.max(z.abs());
                    write!(out, " {:>12.5e} {:>6.2}", r.mc_mean[i], z)?;
                }
                writeln!(out)?;
            }
            writeln!(out, "largest |z| = {worst:.2}")?;
        }
        let c = &a.recursion_check;
        writeln!(out)?;
        match (c.checked_up_to_step, c.max_relative_difference) {
            (Some(k), Some(diff)) => writeln!(
                out,
                "recursion vs closed form (requested steps up to k = {k}): max relative difference {diff:.2e}"
            ),
            _ => writeln!(
                out,
                "recursion vs closed form: skipped (even the first requested step exceeds the cost budget)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_treats_rounding_as_zero() {
        assert_eq!(monte_carlo_z(1.5, 0.25, 1.0), 2.0);
        assert_eq!(monte_carlo_z(1.0 + 1e-14, 0.0, 1.0), 0.0);
        assert_eq!(monte_carlo_z(1.1, 0.0, 1.0), f64::INFINITY);
    }
}
