//! Monte-Carlo simulation of noisy gradient descent on a quadratic: the check
//! that the exact formulas describe the dynamics they claim to.

use nalgebra::{DMatrix, DVector};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::TheoryError;
use super::exact::{Dynamics, check_inputs, unique_steps};
use super::problem::{Noise, Quadratic, sorted_eigen};

/// Runs simulated together as the columns of one d x RUNS_PER_CHUNK matrix:
/// wide enough that the per-step products are matrix-matrix (fast), small
/// enough that rayon has several chunks to spread over the cores.
const RUNS_PER_CHUNK: usize = 32;

/// Mean and standard error of the loss over independent simulated runs.
#[derive(Debug, Clone, PartialEq)]
pub struct MonteCarlo {
    /// The steps k, in the order they were requested.
    pub steps: Vec<u64>,
    /// Mean of L(e_k) over the runs, at each step.
    pub mean: Vec<f64>,
    /// Standard error of that mean: sample standard deviation / sqrt(runs).
    pub stderr: Vec<f64>,
    /// Number of runs R.
    pub runs: usize,
}

/// Simulates `runs` independent trajectories of
/// e_{k+1} = e_k - alpha (A e_k + eps_k) + beta (e_k - e_{k-1}),
/// eps_k = D xi_k with D D^T = C and xi_k ~ N(0, I), started at rest at
/// `e0`, and returns the mean loss and its standard error at each k in
/// `steps` (any order, repeats allowed).
///
/// Run r draws its noise from ChaCha8 seeded with `seed` on stream r, so the
/// result depends only on (`seed`, `runs`), not on the number of threads; two
/// calls with the same seed and different C see the same xi_k (common random
/// numbers), which makes differences between noise structures less noisy.
/// Costs O(runs * max k * d^2). Needs at least two runs for a standard
/// error.
pub fn simulate(
    quadratic: &Quadratic,
    noise: &Noise,
    e0: &DVector<f64>,
    dynamics: Dynamics,
    steps: &[u64],
    runs: usize,
    seed: u64,
) -> Result<MonteCarlo, TheoryError> {
    check_inputs(quadratic, noise, e0)?;
    if runs < 2 {
        return Err(TheoryError::InvalidParameter {
            name: "Monte-Carlo runs".into(),
            value: runs.to_string(),
            reason: "need at least 2 runs for a standard error".into(),
        });
    }
    let (unique, index) = unique_steps(steps);
    // Every run's losses are kept for the two-pass statistics: refuse, up
    // front, a count whose record cannot fit in memory.
    let needed = runs as u128 * (24 + 8 * unique.len() as u128);
    if let Some(total) = crate::device::host_memory_bytes()
        && needed > u128::from(total)
    {
        let gib = |b: f64| b / f64::from(1u32 << 30);
        return Err(TheoryError::InvalidParameter {
            name: "Monte-Carlo runs".into(),
            value: runs.to_string(),
            reason: format!(
                "keeping every run's losses at {} steps needs at least {:.1} GiB, more than this machine's {:.1} GiB of memory",
                unique.len(),
                gib(needed as f64),
                gib(total as f64)
            ),
        });
    }
    let factor = noise_factor(noise.cov());
    let chunks: Vec<(usize, usize)> = (0..runs)
        .step_by(RUNS_PER_CHUNK)
        .map(|start| (start, (start + RUNS_PER_CHUNK).min(runs)))
        .collect();
    // losses[chunk][run within chunk][step index in `unique`]
    let losses: Vec<Vec<Vec<f64>>> = chunks
        .par_iter()
        .map(|&(start, end)| {
            simulate_chunk(
                quadratic,
                factor.as_ref(),
                e0,
                dynamics,
                &unique,
                start,
                end,
                seed,
            )
        })
        .collect();
    let per_run: Vec<&Vec<f64>> = losses.iter().flatten().collect();
    let r = runs as f64;
    let mut mean = Vec::with_capacity(steps.len());
    let mut stderr = Vec::with_capacity(steps.len());
    for &i in &index {
        // Two passes (mean, then squared deviations) in a fixed run order:
        // stable and bitwise reproducible across thread counts.
        let m = per_run.iter().map(|l| l[i]).sum::<f64>() / r;
        let var = per_run.iter().map(|l| (l[i] - m).powi(2)).sum::<f64>() / (r - 1.0);
        mean.push(m);
        stderr.push((var / r).sqrt());
    }
    Ok(MonteCarlo {
        steps: steps.to_vec(),
        mean,
        stderr,
        runs,
    })
}

/// A factor D with D D^T = C, from the eigendecomposition (Cholesky would
/// fail on the singular covariances that are legitimate here, such as a
/// diagonal Fisher with a zero entry). Tiny negative eigenvalues from
/// rounding are clipped to 0. None when C = 0, so the runs skip sampling.
fn noise_factor(cov: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    if cov.iter().all(|&v| v == 0.0) {
        return None;
    }
    let (values, mut vectors) = sorted_eigen(cov);
    for (j, &v) in values.iter().enumerate() {
        let s = v.max(0.0).sqrt();
        vectors.column_mut(j).scale_mut(s);
    }
    Some(vectors)
}

/// Simulates runs start..end side by side; returns, per run, the losses at
/// the sorted steps `unique`.
#[allow(clippy::too_many_arguments)]
fn simulate_chunk(
    quadratic: &Quadratic,
    factor: Option<&DMatrix<f64>>,
    e0: &DVector<f64>,
    dynamics: Dynamics,
    unique: &[u64],
    start: usize,
    end: usize,
    seed: u64,
) -> Vec<Vec<f64>> {
    let d = quadratic.dim();
    let b = end - start;
    let a = quadratic.hessian();
    let alpha = dynamics.alpha();
    let beta = dynamics.momentum();
    let mut rngs: Vec<ChaCha8Rng> = (start..end)
        .map(|run| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(run as u64);
            rng
        })
        .collect();
    let mut e = DMatrix::<f64>::from_fn(d, b, |i, _| e0[i]);
    // e_{k-1}; equal to e_0 at the start (the iteration starts at rest).
    let mut prev = e.clone();
    let mut grad = DMatrix::<f64>::zeros(d, b);
    let mut xi = DMatrix::<f64>::zeros(d, b);
    let mut out = vec![Vec::with_capacity(unique.len()); b];
    let max_k = unique.last().copied().unwrap_or(0);
    let mut next_record = 0;
    for k in 0..=max_k {
        // grad = A e (the gradient of each run).
        grad.gemm(1.0, a, &e, 0.0);
        if next_record < unique.len() && unique[next_record] == k {
            for (j, losses) in out.iter_mut().enumerate() {
                losses.push(0.5 * e.column(j).dot(&grad.column(j)));
            }
            next_record += 1;
        }
        if k == max_k {
            break;
        }
        if let Some(factor) = factor {
            for (j, rng) in rngs.iter_mut().enumerate() {
                for v in xi.column_mut(j).iter_mut() {
                    *v = StandardNormal.sample(rng);
                }
            }
            // grad += D xi: the noisy gradient.
            grad.gemm(1.0, factor, &xi, 1.0);
        }
        // prev <- e_{k+1} = (1 + beta) e_k - beta e_{k-1} - alpha g, then swap
        // so that e holds e_{k+1} and prev holds e_k.
        for ((p, &cur), &g) in prev.iter_mut().zip(e.iter()).zip(grad.iter()) {
            *p = (1.0 + beta) * cur - beta * *p - alpha * g;
        }
        std::mem::swap(&mut e, &mut prev);
    }
    out
}
