//! Helpers shared by the library's integration tests: a regression batch,
//! the Monte-Carlo mean accumulator with its error bound, and brute-force
//! per-example gradients. A test file that needs them says `mod common;`.
//! The tests make their own data: the library has no data loaders.

// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

/// Inputs and regression targets, one row per example (least-squares
/// models in the tests).
pub struct Regression {
    /// Inputs `[n, d]`.
    pub x: burn::tensor::Tensor<2>,
    /// Targets `[n, 1]`.
    pub y: burn::tensor::Tensor<2>,
}

impl covnoise::model::Examples for Regression {
    fn len(&self) -> usize {
        self.x.dims()[0]
    }
    fn slice(&self, start: usize, len: usize) -> Self {
        Self {
            x: self.x.clone().narrow(0, start, len),
            y: self.y.clone().narrow(0, start, len),
        }
    }
}

/// Accumulates vectors and reports the mean and, per coordinate, the
/// variance of that mean (sample variance / R).
pub struct Running {
    sum: Vec<f64>,
    sumsq: Vec<f64>,
    n: usize,
}

impl Running {
    /// An empty accumulator for vectors of length `d`.
    pub fn new(d: usize) -> Self {
        Self {
            sum: vec![0.0; d],
            sumsq: vec![0.0; d],
            n: 0,
        }
    }

    /// Adds one draw.
    pub fn push(&mut self, v: &[f64]) {
        for ((s, q), x) in self.sum.iter_mut().zip(self.sumsq.iter_mut()).zip(v) {
            *s += x;
            *q += x * x;
        }
        self.n += 1;
    }

    /// The mean of the draws so far.
    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.n as f64).collect()
    }

    /// Expected norm of (mean - expectation): sqrt(sum_j var_j / R), with
    /// var_j the sample variance of coordinate j.
    pub fn mean_error_norm(&self) -> f64 {
        let n = self.n as f64;
        self.sum
            .iter()
            .zip(&self.sumsq)
            .map(|(s, q)| (q / n - (s / n).powi(2)).max(0.0) * n / (n - 1.0) / n)
            .sum::<f64>()
            .sqrt()
    }
}

/// Asserts that the Monte-Carlo mean in `acc` estimates `expected`: the error
/// norm is at most 4 times its expected size [`Running::mean_error_norm`]
/// (estimated from the same draws). Over many coordinates the squared error
/// concentrates, so a correct estimator essentially never exceeds this,
/// while a biased one does. Also asserts that this tolerance is below
/// `max_fraction` of |expected|, so that the test can see a bias of that size.
pub fn assert_monte_carlo_mean(acc: &Running, expected: &[f64], max_fraction: f64, label: &str) {
    let est = acc.mean();
    assert_eq!(est.len(), expected.len(), "{label}: lengths differ");
    let err = norm(
        &est.iter()
            .zip(expected)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
    );
    let tol = 4.0 * acc.mean_error_norm();
    assert!(
        err <= tol,
        "{label}: error {err} > tolerance {tol} (|expected| = {})",
        norm(expected)
    );
    assert!(
        tol < max_fraction * norm(expected),
        "{label}: test too weak: tolerance {tol}, |expected| {}",
        norm(expected)
    );
}

/// Flat tensors as one vector of f64.
pub fn flat(tensors: &[burn::tensor::Tensor<1>]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| covnoise::tensor_util::to_vec(t).unwrap())
        .map(|v| v as f64)
        .collect()
}

/// Euclidean norm.
pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Per-example gradients by brute force, one single-example pass each, flat
/// in table order: the reference for every per-example estimator.
pub fn per_example<M, B, F>(model: &M, batch: &B, forward: &F) -> Vec<Vec<f64>>
where
    M: burn::module::Module,
    B: covnoise::model::Examples,
    F: covnoise::model::Forward<M, B>,
{
    let table = covnoise::params::ParamTable::of(model);
    (0..batch.len())
        .map(|i| {
            let pass = covnoise::moments::backward_pass(
                model,
                &table,
                &batch.slice(i, 1),
                forward,
                covnoise::moments::PassRequest::default(),
            );
            flat(&pass.unwrap().grads)
        })
        .collect()
}
