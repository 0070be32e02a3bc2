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

/// Relative distance `||a - b|| / ||b||`.
pub fn rel_distance(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of one length");
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(f64::MIN_POSITIVE)
}

/// A pass in which each of the batch's consecutive groups of `group_size`
/// examples runs at its own parameters (`PassRequest::shifts`, random
/// rows of about 0.1 per value (uniform on ±0.17) scaled by a factor per group, 0.5, 1,
/// 1.5, ...; uneven loss weights), whole and in
/// chunks of two groups, against the reference: one plain pass per group
/// over that group's examples on a copy of the model moved by the group's
/// shift (`covnoise::params::shifted`, no probes), its gradient weighted
/// by the group's share of the batch, summed. Returns the relative
/// distance of the gradients (whole pass, chunked pass) and checks the
/// loss sums to 1e-5. Both sides compute the same float32 sums in other
/// orders and products (about 1e-6 relative over a few examples); a group
/// run at another group's parameters, or at theta, differs by the shifts'
/// effect (about 10 %).
pub fn shifted_pass_against_per_group_passes<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    group_size: usize,
    seed: u64,
) -> (f64, f64)
where
    M: burn::module::Module,
    B: covnoise::model::Examples,
    F: covnoise::model::Forward<M, B>,
{
    use burn::tensor::{Device, Tensor, TensorData};
    use covnoise::moments::{PassRequest, backward_pass};
    use covnoise::probes::GroupShifts;
    use rand::{RngExt, SeedableRng};
    let table = covnoise::params::ParamTable::of(model);
    let n = batch.len();
    let groups = n / group_size;
    assert!(groups >= 2 && groups * group_size == n, "whole groups");
    // The shifts live without autodiff, as the penalties' do; drawn here,
    // not from the device's global stream, which parallel tests share.
    let host = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let rows: Vec<Tensor<2>> = table
        .entries()
        .iter()
        .map(|e| {
            let v: Vec<f32> = (0..groups * e.numel())
                .map(|_| rng.random_range(-0.17..0.17))
                .collect();
            Tensor::from_data(TensorData::new(v, [groups, e.numel()]), &host)
        })
        .collect();
    let weights: Vec<f32> = (0..n).map(|i| 0.5 + 0.25 * (i % 3) as f32).collect();
    let factors: Vec<f32> = (0..groups).map(|j| 0.5 + 0.5 * j as f32).collect();
    let shifts = GroupShifts::from_table(&table, group_size, rows.clone())
        .unwrap()
        .with_factors(factors.clone())
        .unwrap();
    let run = |chunk: Option<usize>| {
        let request = PassRequest {
            weights: Some(&weights),
            shifts: Some(shifts.clone()),
            chunk,
            ..Default::default()
        };
        backward_pass(model, &table, batch, forward, request).unwrap()
    };
    let (whole, chunked) = (run(None), run(Some(2 * group_size)));
    let mut reference = vec![0.0; whole.grads.iter().map(|g| g.dims()[0]).sum()];
    let mut loss_sum = 0.0;
    for (j, &factor) in factors.iter().enumerate() {
        let row: Vec<Tensor<1>> = rows
            .iter()
            .map(|r| {
                let numel = r.dims()[1];
                r.clone().narrow(0, j, 1).reshape([numel])
            })
            .collect();
        let moved = covnoise::params::shifted(model, &row, factor).unwrap();
        let (start, b) = (j * group_size, group_size);
        let request = PassRequest {
            weights: Some(&weights[start..start + b]),
            ..Default::default()
        };
        let pass = backward_pass(&moved, &table, &batch.slice(start, b), forward, request).unwrap();
        loss_sum += pass.loss_sum;
        let share = b as f64 / n as f64;
        for (r, v) in reference.iter_mut().zip(flat(&pass.grads)) {
            *r += share * v;
        }
    }
    for pass in [&whole, &chunked] {
        assert!(
            (pass.loss_sum - loss_sum).abs() <= 1e-5 * loss_sum.abs(),
            "loss sums {} and {loss_sum}",
            pass.loss_sum
        );
    }
    (
        rel_distance(&flat(&whole.grads), &reference),
        rel_distance(&flat(&chunked.grads), &reference),
    )
}
