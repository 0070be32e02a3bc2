//! The full analysis of one noisy-descent problem, as `covnoise quadratic`
//! reports it: for each noise covariance, the exact expected loss at the
//! requested steps, a Monte-Carlo estimate of it, the stationary loss, the
//! same exact curves on a dense grid of steps (for plotting), and a
//! cross-check of the closed form against the recursion.

use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use super::error::TheoryError;
use super::exact::{
    Dynamics, expected_loss_closed_form, expected_loss_recursion, stationary_loss,
    stationary_loss_first_order,
};
use super::monte_carlo::simulate;
use super::problem::{Noise, Quadratic};
use covnoise::noise::StructureName;

/// The recursion cross-check covers the requested steps k with
/// (state dimension)^3 * k at most this (about a second of matrix products).
/// The closed form is always used for the reported numbers.
pub const RECURSION_CHECK_BUDGET: f64 = 1e9;

/// Points on the dense log-spaced grid of the exact curves
/// (see [`dense_grid`]).
pub const DENSE_GRID_POINTS: usize = 300;

/// One noise covariance per structure, each c times the structure built from
/// `fisher` (see [`Noise::from_fisher`]), in the order given. Fails on the
/// first structure that cannot be built.
pub fn noises_from_fisher(
    fisher: &DMatrix<f64>,
    structures: &[StructureName],
    scale: f64,
) -> Result<Vec<Noise>, TheoryError> {
    structures
        .iter()
        .map(|&s| Noise::from_fisher(fisher, s, scale))
        .collect()
}

/// Steps 0 and 1, about [`DENSE_GRID_POINTS`] log-spaced integer steps from 1
/// to `max_k`, and `max_k` itself: sorted, without repeats.
pub fn dense_grid(max_k: u64) -> Vec<u64> {
    let mut grid = vec![0, 1];
    let top = (max_k.max(1) as f64).ln();
    for i in 0..=DENSE_GRID_POINTS {
        grid.push((top * i as f64 / DENSE_GRID_POINTS as f64).exp().round() as u64);
    }
    grid.push(max_k);
    grid.sort_unstable();
    grid.dedup();
    grid
}

/// What to compute besides the exact values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalysisSettings {
    /// Steps k at which to report `E\[L_k\]`, in any order, repeats allowed
    /// (the analysis sorts and de-duplicates them); at least one.
    pub steps: Vec<u64>,
    /// Monte-Carlo runs per noise covariance: 0 for exact values only,
    /// otherwise at least 2.
    pub mc_runs: usize,
    /// Seed of the Monte-Carlo noise (every covariance sees the same draws).
    pub seed: u64,
}

/// The numbers for one noise covariance, at the analysis' steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StructureResult {
    /// The covariance's label ("full", "diag", "isotropic", "custom", ...).
    pub structure: String,
    /// tr C.
    pub trace: f64,
    /// ||C||_F.
    pub frobenius: f64,
    /// tr(A C).
    pub tr_hc: f64,
    /// Exact `E\[L_k\]` at each step.
    pub exact_loss: Vec<f64>,
    /// Exact noise part `E\[L_k\] - L(E\[e_k\])` at each step.
    pub noise_loss: Vec<f64>,
    /// lim `E\[L_k\]` as k -> infinity (discrete Lyapunov equation).
    pub stationary_loss: f64,
    /// Its small-alpha approximation alpha tr(C) / (4 (1 - momentum)).
    pub stationary_first_order: f64,
    /// Monte-Carlo mean loss at each step (empty without Monte-Carlo runs).
    pub mc_mean: Vec<f64>,
    /// Standard error of that mean (empty without Monte-Carlo runs).
    pub mc_stderr: Vec<f64>,
}

/// Agreement of the O(k n^3) recursion with the closed form, on the
/// requested steps up to `checked_up_to_step` (None: none was cheap enough;
/// see [`RECURSION_CHECK_BUDGET`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RecursionCheck {
    /// The largest step checked.
    pub checked_up_to_step: Option<u64>,
    /// The largest relative difference of `E\[L_k\]` over the checked steps and
    /// all noise covariances.
    pub max_relative_difference: Option<f64>,
}

/// The exact curves on the dense grid of steps, for plotting.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseCurves {
    /// The steps ([`dense_grid`] up to the largest requested step).
    pub k: Vec<u64>,
    /// Loss of the mean iterate (the same for every noise covariance).
    pub deterministic: Vec<f64>,
    /// `E\[L_k\]` per noise covariance, in the order of the results.
    pub total: Vec<Vec<f64>>,
    /// The noise part per noise covariance, in the order of the results.
    pub noise: Vec<Vec<f64>>,
}

/// Everything [`analyze`] computes. Serializes to the `steps`,
/// `deterministic_loss`, `results` and `recursion_check` of the JSON report;
/// the dense curves are for plotting only and are not serialized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// The requested steps, sorted and without repeats.
    pub steps: Vec<u64>,
    /// Loss of the mean iterate at each step (what noiseless descent gives).
    pub deterministic_loss: Vec<f64>,
    /// One entry per noise covariance, in the order given.
    pub results: Vec<StructureResult>,
    /// The closed form against the recursion.
    pub recursion_check: RecursionCheck,
    /// The exact curves on a dense grid of steps.
    #[serde(skip)]
    pub dense: DenseCurves,
}

/// Runs the analysis: exact values (closed form), Monte-Carlo estimates when
/// `settings.mc_runs >= 2`, stationary losses, dense curves, and the
/// recursion cross-check ([`check_recursion`]).
///
/// Fails when there are no steps, when `mc_runs` is 1 (no standard error),
/// or when the problem's parts do not fit together (dimensions, an unstable
/// step for the stationary loss).
pub fn analyze(
    quadratic: &Quadratic,
    noises: &[Noise],
    e0: &DVector<f64>,
    dynamics: Dynamics,
    settings: &AnalysisSettings,
) -> Result<Analysis, TheoryError> {
    if settings.mc_runs == 1 {
        return Err(TheoryError::InvalidParameter {
            name: "Monte-Carlo runs".into(),
            value: "1".into(),
            reason: "one run gives no standard error: use 0 (exact only) or at least 2".into(),
        });
    }
    let mut steps = settings.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    let Some(&max_k) = steps.last() else {
        return Err(TheoryError::InvalidParameter {
            name: "steps".into(),
            value: "[]".into(),
            reason: "need at least one step".into(),
        });
    };

    let grid = dense_grid(max_k);
    let mut results = Vec::with_capacity(noises.len());
    let mut dense = DenseCurves {
        k: grid.clone(),
        deterministic: Vec::new(),
        total: Vec::with_capacity(noises.len()),
        noise: Vec::with_capacity(noises.len()),
    };
    let mut deterministic = Vec::new();
    for noise in noises {
        let exact = expected_loss_closed_form(quadratic, noise, e0, dynamics, &steps)?;
        let on_grid = expected_loss_closed_form(quadratic, noise, e0, dynamics, &grid)?;
        deterministic = exact.iter().map(|p| p.deterministic).collect();
        dense.deterministic = on_grid.iter().map(|p| p.deterministic).collect();
        let (mc_mean, mc_stderr) = if settings.mc_runs >= 2 {
            let mc = simulate(
                quadratic,
                noise,
                e0,
                dynamics,
                &steps,
                settings.mc_runs,
                settings.seed,
            )?;
            (mc.mean, mc.stderr)
        } else {
            (Vec::new(), Vec::new())
        };
        dense
            .total
            .push(on_grid.iter().map(|p| p.total()).collect());
        dense.noise.push(on_grid.iter().map(|p| p.noise).collect());
        results.push(StructureResult {
            structure: noise.label().to_string(),
            trace: noise.trace(),
            frobenius: noise.frobenius(),
            tr_hc: noise.tr_hc(quadratic)?,
            exact_loss: exact.iter().map(|p| p.total()).collect(),
            noise_loss: exact.iter().map(|p| p.noise).collect(),
            stationary_loss: stationary_loss(quadratic, noise, dynamics)?,
            stationary_first_order: stationary_loss_first_order(noise, dynamics),
            mc_mean,
            mc_stderr,
        });
    }
    let recursion_check = check_recursion(quadratic, noises, e0, dynamics, &steps, &results)?;
    Ok(Analysis {
        steps,
        deterministic_loss: deterministic,
        results,
        recursion_check,
        dense,
    })
}

/// Cross-checks the closed form (`results[i].exact_loss`, at the sorted
/// `steps`) against the O(k n^3) recursion, on the requested steps that the
/// recursion reaches within [`RECURSION_CHECK_BUDGET`] (all of them on small
/// problems). `noises` and `results` pair up in order.
pub fn check_recursion(
    quadratic: &Quadratic,
    noises: &[Noise],
    e0: &DVector<f64>,
    dynamics: Dynamics,
    steps: &[u64],
    results: &[StructureResult],
) -> Result<RecursionCheck, TheoryError> {
    let d = quadratic.dim();
    let state = if dynamics.momentum() == 0.0 { d } else { 2 * d } as f64;
    let reachable = (RECURSION_CHECK_BUDGET / state.powi(3)).floor() as u64;
    let checked: Vec<u64> = steps.iter().copied().filter(|&k| k <= reachable).collect();
    let Some(&up_to) = checked.last() else {
        return Ok(RecursionCheck {
            checked_up_to_step: None,
            max_relative_difference: None,
        });
    };
    let mut worst: f64 = 0.0;
    for (noise, result) in noises.iter().zip(results) {
        let rec = expected_loss_recursion(quadratic, noise, e0, dynamics, &checked)?;
        for (r, c) in rec.iter().zip(&result.exact_loss) {
            let scale = r.total().abs().max(c.abs());
            if scale > 0.0 {
                worst = worst.max((r.total() - c).abs() / scale);
            }
        }
    }
    Ok(RecursionCheck {
        checked_up_to_step: Some(up_to),
        max_relative_difference: Some(worst),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::theory::problem::STRUCTURES;

    #[test]
    fn dense_grid_is_sorted_unique_and_spans_zero_to_max() {
        for max_k in [0, 1, 7, 1000, 123_456] {
            let g = dense_grid(max_k);
            assert_eq!(g[0], 0);
            assert_eq!(*g.last().unwrap(), max_k.max(1));
            assert!(g.windows(2).all(|w| w[0] < w[1]), "{g:?}");
            assert!(g.len() <= DENSE_GRID_POINTS + 3);
        }
    }

    #[test]
    fn analysis_agrees_with_its_parts() {
        let a = DMatrix::from_row_slice(2, 2, &[1.0, 0.2, 0.2, 0.5]);
        let q = Quadratic::new(&a).unwrap();
        let noises = noises_from_fisher(&a, &STRUCTURES, 0.1).unwrap();
        let e0 = DVector::from_element(2, 1.0);
        let dynamics = Dynamics::new(0.5, 0.0).unwrap();
        let settings = AnalysisSettings {
            steps: vec![10, 0, 3, 10],
            mc_runs: 0,
            seed: 0,
        };
        let an = analyze(&q, &noises, &e0, dynamics, &settings).unwrap();
        assert_eq!(an.steps, [0, 3, 10]);
        assert_eq!(an.results.len(), 3);
        for (noise, r) in noises.iter().zip(&an.results) {
            let exact = expected_loss_closed_form(&q, noise, &e0, dynamics, &[0, 3, 10]).unwrap();
            let totals: Vec<f64> = exact.iter().map(|p| p.total()).collect();
            assert_eq!(r.exact_loss, totals);
            assert!(r.mc_mean.is_empty() && r.mc_stderr.is_empty());
        }
        assert_eq!(an.recursion_check.checked_up_to_step, Some(10));
        assert!(an.recursion_check.max_relative_difference.unwrap() < 1e-12);
        assert_eq!(an.dense.k, dense_grid(10));
        assert_eq!(an.dense.total.len(), 3);
        assert_eq!(an.dense.deterministic.len(), an.dense.k.len());

        let bad = |steps: Vec<u64>, mc_runs| {
            let s = AnalysisSettings {
                steps,
                mc_runs,
                seed: 0,
            };
            analyze(&q, &noises, &e0, dynamics, &s).is_err()
        };
        assert!(bad(vec![], 0));
        assert!(bad(vec![1], 1));
    }
}
