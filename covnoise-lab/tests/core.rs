//! Tests of the core library against independent references: brute-force
//! loops over single examples, closed forms, and Monte-Carlo estimates with
//! stated tolerances.

use burn::optim::Optimizer;
use burn::tensor::{Device, Tensor};
use covnoise::CovnoiseError;
use covnoise::collective::SingleProcess;
use covnoise::model::{Batch, Coupling, Examples, Objective, Probes, labels_tensor};
use covnoise::moments::{
    self, Estimator, MomentKind, PassRequest, SecondMoment, StepContext, backward_pass,
};
use std::sync::Arc;

use covnoise::noise::{
    FullFisher, NoiseConfig, NoiseStage, NoiseWindow, ScaleRule, StructureName, StructureOptions,
};
use covnoise::optim::{LrSchedule, ScheduleKind, Sgd, SgdConfig};
use covnoise::params::ParamTable;
use covnoise::tensor_util::{from_vec, from_vec1, to_vec};
use covnoise_lab::zoo::{Mlp, MlpConfig, Normalization};
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::Running;

fn device() -> Device {
    Device::flex().autodiff()
}

fn mlp(input: usize, hidden: &[usize], classes: usize, seed: u64) -> Mlp {
    let config = MlpConfig {
        input,
        hidden: hidden.to_vec(),
        classes,
        normalization: Normalization::None,
    };
    Mlp::new(&config, seed, &device()).unwrap()
}

/// The MLP's forward pass as the noise stage sees it.
fn fwd(m: &Mlp, b: &Batch, p: &mut Probes) -> Objective {
    m.objective(b.x.clone(), b.labels.clone(), p)
}

/// A random batch: uniform features, uniform labels (host copy of the labels too).
fn random_batch_labels(b: usize, input: usize, classes: usize, seed: u64) -> (Batch, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..b * input)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..classes) as u8).collect();
    let batch = Batch {
        x: from_vec(x, [b, input], &device()),
        labels: labels_tensor(&labels, &device()),
    };
    (batch, labels)
}

fn random_batch(b: usize, input: usize, classes: usize, seed: u64) -> Batch {
    random_batch_labels(b, input, classes, seed).0
}

fn flat(tensors: &[Tensor<1>]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| to_vec(t).unwrap())
        .map(|v| v as f64)
        .collect()
}

/// Per-example gradients by brute force: one backward pass per example
/// (a batch of one, whose mean loss is that example's loss).
fn per_example_grads(model: &Mlp, batch: &Batch, labels: Option<&[u8]>) -> Vec<Vec<f64>> {
    let table = ParamTable::of(model);
    (0..batch.len())
        .map(|i| {
            let single = Examples::slice(batch, i, 1);
            let request = PassRequest {
                labels: labels.map(|l| labels_tensor(&l[i..i + 1], &device())),
                ..Default::default()
            };
            flat(
                &backward_pass(model, &table, &single, &fwd, request)
                    .unwrap()
                    .grads,
            )
        })
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(1e-30)
}

fn ctx(step: u64, table: &ParamTable) -> StepContext<'_> {
    ctx_with(step, table, Coupling::detect(table))
}

fn ctx_with(step: u64, table: &ParamTable, coupling: Coupling) -> StepContext<'_> {
    StepContext {
        seed: 3,
        step,
        collective: &SingleProcess,
        table,
        coupling,
        chunk: None,
    }
}

fn param_sizes(model: &Mlp) -> Vec<usize> {
    ParamTable::of(model)
        .entries()
        .iter()
        .map(|p| p.numel())
        .collect()
}

/// Splits a flat vector into per-parameter pieces.
fn split(v: &[f64], sizes: &[usize]) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &n in sizes {
        out.push(v[start..start + n].to_vec());
        start += n;
    }
    out
}

fn diag(moment: &SecondMoment) -> Vec<f64> {
    match moment {
        SecondMoment::Diag(d) => flat(d),
        SecondMoment::Trace(_) => panic!("expected a diagonal"),
    }
}

fn check_exact_against_brute_force(hidden: &[usize], b: usize, seed: u64) {
    let (input, classes) = (7, 5);
    let model = mlp(input, hidden, classes, seed);
    let table = ParamTable::of(&model);
    let batch = random_batch(b, input, classes, seed + 1);
    let out = moments::estimate(
        &model,
        &batch,
        &fwd,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(0, &table),
    )
    .unwrap();
    let est = diag(out.moment.as_ref().unwrap());
    let per = per_example_grads(&model, &batch, None);
    let d = per[0].len();
    let reference: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| g[j] * g[j]).sum::<f64>() / b as f64)
        .collect();
    let sizes = param_sizes(&model);
    // float32 arithmetic over sums of at most 32 terms: 1e-4 normwise leaves
    // ample room above rounding (~1e-6) while catching any wrong factor.
    for (p, (e, r)) in split(&est, &sizes)
        .iter()
        .zip(split(&reference, &sizes))
        .enumerate()
    {
        let err = rel_err(e, &r);
        assert!(err <= 1e-4, "param {p}: relative error {err}");
    }
    // The trace path (norm trick) agrees with the sum of the diagonal.
    let tr = moments::estimate(
        &model,
        &batch,
        &fwd,
        Estimator::Exact,
        MomentKind::Trace,
        &ctx(0, &table),
    )
    .unwrap()
    .moment
    .unwrap()
    .trace();
    let tr_ref: f64 = reference.iter().sum();
    assert!(
        (tr - tr_ref).abs() <= 1e-4 * tr_ref,
        "trace {tr} vs {tr_ref}"
    );
    // The mean gradient is the mean of the per-example gradients.
    let mean: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| g[j]).sum::<f64>() / b as f64)
        .collect();
    assert!(rel_err(&flat(&out.grads), &mean) <= 1e-4);
}

#[test]
fn exact_estimator_matches_brute_force() {
    check_exact_against_brute_force(&[16, 12], 8, 1);
    check_exact_against_brute_force(&[10], 32, 2);
    check_exact_against_brute_force(&[], 20, 3);
}

#[test]
fn fisher_trace_is_the_mean_squared_norm_of_single_example_gradients() {
    let (input, classes, n) = (9, 4, 11);
    let model = mlp(input, &[13, 6], classes, 5);
    let table = ParamTable::of(&model);
    let batch = random_batch(n, input, classes, 6);
    // Reference: (1/n) sum_i ||grad l_i||^2 from n single-example passes.
    let per = per_example_grads(&model, &batch, None);
    let reference = per
        .iter()
        .map(|g| g.iter().map(|x| x * x).sum::<f64>())
        .sum::<f64>()
        / n as f64;
    assert!(reference > 0.0);
    // One pass, and passes of 4, 4 and 3 examples (uneven chunks).
    for chunk in [None, Some(4), Some(1), Some(100)] {
        let ctx = StepContext {
            chunk,
            ..ctx(0, &table)
        };
        let trace = moments::fisher_trace(&model, &batch, &fwd, &ctx)
            .unwrap()
            .unwrap();
        assert!(
            (trace - reference).abs() <= 1e-4 * reference,
            "chunk {chunk:?}: {trace} vs {reference}"
        );
    }
    // The exact estimator's trace on the same batch is the same quantity.
    let estimated = moments::estimate(
        &model,
        &batch,
        &fwd,
        Estimator::Exact,
        MomentKind::Trace,
        &ctx(0, &table),
    )
    .unwrap()
    .moment
    .unwrap()
    .trace();
    assert!((estimated - reference).abs() <= 1e-4 * reference);
    // Without per-example gradients (batch norm couples the examples)
    // there is no value, and no error.
    for coupling in [Coupling::WholeBatch, Coupling::Groups(2)] {
        let ctx = ctx_with(0, &table, coupling);
        assert_eq!(
            moments::fisher_trace(&model, &batch, &fwd, &ctx).unwrap(),
            None
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    /// Shapes and batch sizes from one example up.
    #[test]
    fn exact_estimator_matches_brute_force_on_random_shapes(
        h1 in 1usize..12, depth in 0usize..3, b in 1usize..24, seed in 0u64..1000
    ) {
        let hidden = vec![h1; depth];
        check_exact_against_brute_force(&hidden, b, seed);
    }
}

#[test]
fn microbatch_estimator_is_unbiased_for_the_centered_variance() {
    let (input, classes, pop) = (6, 4, 96);
    let model = mlp(input, &[8], classes, 5);
    let table = ParamTable::of(&model);
    let (population, population_labels) = random_batch_labels(pop, input, classes, 6);
    // Brute-force population variance of per-example gradients (1/N).
    let per = per_example_grads(&model, &population, None);
    let d = per[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| g[j]).sum::<f64>() / pop as f64)
        .collect();
    let sigma: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| (g[j] - mean[j]).powi(2)).sum::<f64>() / pop as f64)
        .collect();
    // Batches of M = 4 micro-batches of b = 8 examples drawn with replacement,
    // so micro-batch gradients are i.i.d. with covariance Sigma / b and the
    // estimator's expectation is exactly diag(Sigma).
    let (m, b, reps) = (4, 8, 2000);
    let x_all = to_vec(&population.x).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut acc = Running::new(d);
    for r in 0..reps {
        let idx: Vec<usize> = (0..m * b).map(|_| rng.random_range(0..pop)).collect();
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| x_all[i * input..(i + 1) * input].to_vec())
            .collect();
        let labels: Vec<u8> = idx.iter().map(|&i| population_labels[i]).collect();
        let batch = Batch {
            x: from_vec(x, [m * b, input], &device()),
            labels: labels_tensor(&labels, &device()),
        };
        let out = moments::estimate(
            &model,
            &batch,
            &fwd,
            Estimator::Microbatch { micro_batches: m },
            MomentKind::Diag,
            &ctx(r, &table),
        )
        .unwrap();
        acc.push(&diag(out.moment.as_ref().unwrap()));
    }
    // The error norm's expected size is sqrt(sum_j var_j / R) (estimated from
    // the same draws); over d ~ 100 coordinates its square concentrates, so
    // 4 times that is a bound a correct estimator essentially never exceeds,
    // while a wrong factor (b/M instead of b/(M-1) is a 25% bias) does.
    common::assert_monte_carlo_mean(&acc, &sigma, 0.15, "micro-batch diag(Sigma)");
}

#[test]
fn mc_fisher_matches_the_expected_fisher_over_model_labels() {
    let (input, classes, b) = (5, 3, 12);
    let model = mlp(input, &[7], classes, 11);
    let table = ParamTable::of(&model);
    let batch = random_batch(b, input, classes, 12);
    // Reference: E_{y ~ p(y|x_i)} (grad l_i(y))^2, enumerating every class.
    let logits = to_vec(&model.logits(batch.x.clone())).unwrap();
    let mut reference = vec![];
    for c in 0..classes {
        let labels = vec![c as u8; b];
        let per = per_example_grads(&model, &batch, Some(&labels));
        if reference.is_empty() {
            reference = vec![0.0; per[0].len()];
        }
        for (i, g) in per.iter().enumerate() {
            let row = &logits[i * classes..(i + 1) * classes];
            let max = row.iter().cloned().fold(f32::MIN, f32::max);
            let z: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let p = ((row[c] - max) as f64).exp() / z;
            for (r, gj) in reference.iter_mut().zip(g) {
                *r += p * gj * gj / b as f64;
            }
        }
    }
    let mut acc = Running::new(reference.len());
    for step in 0..800 {
        let out = moments::estimate(
            &model,
            &batch,
            &fwd,
            Estimator::McFisher,
            MomentKind::Diag,
            &ctx(step, &table),
        )
        .unwrap();
        acc.push(&diag(out.moment.as_ref().unwrap()));
    }
    // Same Monte-Carlo bound as for the micro-batch estimator.
    common::assert_monte_carlo_mean(&acc, &reference, 0.1, "MC Fisher diagonal");
}

/// Empirical covariance of `draws` (each of length d) against `expected`
/// (d x d, row-major): every entry within 5 standard errors, where for
/// Gaussian noise the standard error of entry (i, j) after N draws is
/// sqrt((C_ii C_jj + C_ij^2) / N). With ~1,300 distinct entries, 5 standard
/// errors bound all of them with probability > 0.999.
fn assert_covariance(draws: &[Vec<f64>], expected: &[f64], label: &str) {
    let n = draws.len() as f64;
    let d = draws[0].len();
    let mut worst: f64 = 0.0;
    for i in 0..d {
        for j in i..d {
            let emp = draws.iter().map(|v| v[i] * v[j]).sum::<f64>() / n;
            let c = expected[i * d + j];
            let se = ((expected[i * d + i] * expected[j * d + j] + c * c) / n).sqrt();
            if se > 0.0 {
                worst = worst.max((emp - c).abs() / se);
            } else {
                assert!(
                    emp.abs() < 1e-12,
                    "{label}: ({i},{j}) should be exactly 0, got {emp}"
                );
            }
        }
    }
    assert!(
        worst < 5.0,
        "{label}: worst entry is {worst} standard errors off"
    );
}

fn tiny_model() -> (Mlp, Batch) {
    // d = 3*6 + 6 + 6*4 + 4 = 52 <= 64.
    let model = mlp(3, &[6], 4, 21);
    let batch = random_batch(8, 3, 4, 22);
    (model, batch)
}

const DRAWS: u64 = 20_000;

#[test]
fn diag_and_isotropic_noise_have_covariance_c_s_and_equal_trace() {
    let (model, batch) = tiny_model();
    let table = ParamTable::of(&model);
    let d = table.num_params();
    let s = moments::estimate(
        &model,
        &batch,
        &fwd,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(0, &table),
    )
    .unwrap()
    .moment
    .unwrap();
    let s_flat = diag(&s);
    let trace: f64 = s_flat.iter().sum();
    let c = 1.0 / 2.0 - 1.0 / 8.0;
    let stage = NoiseStage::new(
        NoiseConfig {
            scale: ScaleRule::Paper { small_batch: 2 },
            ..NoiseConfig::diag_fisher(2)
        },
        8,
        5,
    )
    .unwrap();
    assert!((stage.scale() - c).abs() < 1e-15);
    let zeros: Vec<Tensor<1>> = table
        .entries()
        .iter()
        .map(|e| Tensor::zeros([e.numel()], &Device::flex()))
        .collect();
    for (moment, label) in [
        (s.clone(), "diag"),
        (SecondMoment::Trace(trace), "isotropic"),
    ] {
        let mut draws = Vec::new();
        let mut traces = Vec::new();
        for step in 0..DRAWS {
            let mut g = zeros.clone();
            traces.push(stage.add_noise(&mut g, &moment, step).unwrap());
            draws.push(flat(&g));
        }
        let mut expected = vec![0.0; d * d];
        for i in 0..d {
            expected[i * d + i] = match label {
                "diag" => c * s_flat[i],
                _ => c * trace / d as f64,
            };
        }
        assert_covariance(&draws, &expected, label);
        // Both report the same total variance c tr(S) (float32 sums: 1e-5).
        assert!((traces[0] - c * trace).abs() <= 1e-5 * c * trace);
    }
}

#[test]
fn full_noise_has_the_batch_fisher_as_covariance() {
    for centered in [false, true] {
        let (model, batch) = tiny_model();
        let table = ParamTable::of(&model);
        let b = batch.len();
        let per = per_example_grads(&model, &batch, None);
        let d = per[0].len();
        let mean: Vec<f64> = (0..d)
            .map(|j| per.iter().map(|g| g[j]).sum::<f64>() / b as f64)
            .collect();
        let c = 0.05;
        // Brute-force F_B = (1/B) sum_i g_i g_i^T, or Sigma_B = F_B - g g^T.
        let mut expected = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                let f = per.iter().map(|g| g[i] * g[j]).sum::<f64>() / b as f64;
                let centering = if centered { mean[i] * mean[j] } else { 0.0 };
                expected[i * d + j] = c * (f - centering);
            }
        }
        let config = NoiseConfig {
            structure: Arc::new(FullFisher { centered }),
            scale: ScaleRule::Fixed { c },
            ..NoiseConfig::none()
        };
        let mut stage = NoiseStage::new(config, b, 17).unwrap();
        let plain = flat(
            &moments::plain_gradient(&model, &batch, &fwd, &ctx(0, &table))
                .unwrap()
                .grads,
        );
        let mut draws = Vec::new();
        for _ in 0..DRAWS {
            let mut g = stage.gradient(&model, &batch, fwd).unwrap().grads;
            let g = flat(&table.flatten(&mut g, &Device::flex()).unwrap());
            draws.push(g.iter().zip(&plain).map(|(a, b)| a - b).collect());
        }
        assert_covariance(
            &draws,
            &expected,
            if centered { "full centered" } else { "full" },
        );
    }
}

fn params_of(model: &Mlp) -> Vec<f64> {
    flat(&ParamTable::of(model).values(model))
}

fn train_steps(config: NoiseConfig, seed: u64, steps: usize) -> Vec<f64> {
    let (mut model, batch) = (mlp(6, &[10], 3, 1), random_batch(16, 6, 3, 2));
    let mut stage = NoiseStage::new(config, 16, seed).unwrap();
    let mut sgd = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    }
    .init()
    .unwrap();
    for _ in 0..steps {
        let g = stage.gradient_in_epoch(&model, &batch, 0, fwd).unwrap();
        model = sgd.step(0.1, model, g.grads);
    }
    params_of(&model)
}

#[test]
fn kappa_zero_and_structure_none_reproduce_plain_training_exactly() {
    let plain = train_steps(NoiseConfig::none(), 0, 5);
    let kappa0 = train_steps(
        NoiseConfig {
            kappa: 0.0,
            ..NoiseConfig::diag_fisher(4)
        },
        9,
        5,
    );
    assert_eq!(plain, kappa0);
    // A window that excludes epoch 0 is plain too.
    let later = train_steps(
        NoiseConfig {
            window: NoiseWindow {
                from: 1,
                until: None,
            },
            ..NoiseConfig::diag_fisher(4)
        },
        9,
        5,
    );
    assert_eq!(plain, later);
    // And a manual loop with plain gradients matches the stage bit for bit.
    let (mut model, batch) = (mlp(6, &[10], 3, 1), random_batch(16, 6, 3, 2));
    let mut sgd = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    }
    .init()
    .unwrap();
    for step in 0..5 {
        let table = ParamTable::of(&model);
        let g = moments::plain_gradient(&model, &batch, &fwd, &ctx(step, &table)).unwrap();
        model = sgd.step(0.1, model, table.unflatten(g.grads).unwrap());
    }
    assert_eq!(plain, params_of(&model));
}

#[test]
fn same_seed_same_run_other_seed_other_noise() {
    for name in [
        StructureName::Diag,
        StructureName::Isotropic,
        StructureName::Full,
    ] {
        let config = NoiseConfig {
            structure: name.build(&StructureOptions::default()).unwrap(),
            ..NoiseConfig::diag_fisher(4)
        };
        let a = train_steps(config.clone(), 1, 4);
        assert_eq!(a, train_steps(config.clone(), 1, 4), "{name}");
        assert_ne!(a, train_steps(config.clone(), 2, 4), "{name}");
        assert_ne!(a, train_steps(NoiseConfig::none(), 1, 4), "{name}");
    }
}

#[test]
fn refresh_and_ema_reuse_and_smooth_the_estimate() {
    // With refresh every 3 steps, the estimate at steps 1 and 2 is the one of
    // step 0; the noise differs only through xi.
    let mut s = moments::Smoother::new(None, 3).unwrap();
    assert!(s.needs_refresh(0));
    s.update(SecondMoment::Trace(2.0), 0).unwrap();
    assert!(!s.needs_refresh(1) && !s.needs_refresh(2) && s.needs_refresh(3));
    // EMA with bias correction: after updates 2 then 4 with beta 0.5,
    // m = 0.5 * (0.5 * 2) + 0.5 * 4 = 2.5, corrected by 1 / (1 - 0.25) -> 10/3.
    let mut e = moments::Smoother::new(Some(0.5), 1).unwrap();
    e.update(SecondMoment::Trace(2.0), 0).unwrap();
    assert!((e.current().unwrap().trace() - 2.0).abs() < 1e-12);
    e.update(SecondMoment::Trace(4.0), 1).unwrap();
    assert!((e.current().unwrap().trace() - 10.0 / 3.0).abs() < 1e-12);
}

/// Our SGD through burn's `Optimizer` trait on one scalar parameter.
fn sgd_trace(config: SgdConfig, steps: usize) -> Vec<f64> {
    let dev = Device::flex();
    let mut p = from_vec1(vec![1.0], &dev);
    let g = from_vec1(vec![0.5], &dev);
    let sgd = Sgd::new(config).unwrap();
    let mut state = None;
    (0..steps)
        .map(|_| {
            let (next, s) = sgd.step(0.1, p.clone(), g.clone(), state.take());
            (p, state) = (next, s);
            to_vec(&p).unwrap()[0] as f64
        })
        .collect()
}

#[test]
fn sgd_matches_pytorch_semantics_by_hand() {
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    // p0 = 1, g = 0.5, lr = 0.1.
    // Plain: p = 1 - 0.05 = 0.95, 0.90.
    assert!(close(&sgd_trace(SgdConfig::default(), 2), &[0.95, 0.90]));
    // Momentum 0.9, wd 0.1: d1 = 0.6, buf = 0.6, p = 0.94;
    // d2 = 0.5 + 0.094 = 0.594, buf = 0.54 + 0.594 = 1.134, p = 0.8266.
    let m = SgdConfig {
        momentum: 0.9,
        weight_decay: 0.1,
        ..Default::default()
    };
    assert!(close(&sgd_trace(m, 2), &[0.94, 0.8266]));
    // Nesterov: d1 = 0.6 + 0.9 * 0.6 = 1.14, p = 0.886;
    // d2 = 0.5886, buf = 0.54 + 0.5886 = 1.1286, d = 0.5886 + 1.01574, p = 0.725566.
    let n = SgdConfig {
        nesterov: true,
        ..m
    };
    assert!(close(&sgd_trace(n, 2), &[0.886, 0.725566]));
    // Dampening 0.5 (first step undampened, as PyTorch): buf2 = 0.54 + 0.297 = 0.837,
    // p = 0.94 - 0.0837 = 0.8563.
    let dmp = SgdConfig {
        dampening: 0.5,
        ..m
    };
    assert!(close(&sgd_trace(dmp, 2), &[0.94, 0.8563]));
}

#[test]
fn schedules_match_hand_computed_values() {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let c = LrSchedule::new(0.2, ScheduleKind::Constant, 0, 100, 10).unwrap();
    assert!(close(c.lr_at(0), 0.2) && close(c.lr_at(99), 0.2));
    // Warmup 4 steps: (t+1)/4.
    let w = LrSchedule::new(0.2, ScheduleKind::Constant, 4, 100, 10).unwrap();
    assert!(close(w.lr_at(0), 0.05) && close(w.lr_at(2), 0.15) && close(w.lr_at(3), 0.2));
    // Cosine over T = 100: at t = 50, 0.5 (1 + cos(pi/2)) = 0.5; with warmup 10
    // at t = 4: 0.5 * 0.5 (1 + cos(0.04 pi)).
    let cos = LrSchedule::new(0.2, ScheduleKind::Cosine, 10, 100, 10).unwrap();
    assert!(close(cos.lr_at(50), 0.1));
    assert!(close(
        cos.lr_at(4),
        0.2 * 0.5 * 0.5 * (1.0 + (0.04 * std::f64::consts::PI).cos())
    ));
    // Multistep at epochs 2 and 4, 10 steps per epoch, gamma 0.1.
    let ms = ScheduleKind::Multistep {
        milestones: vec![2, 4],
        gamma: 0.1,
    };
    let m = LrSchedule::new(1.0, ms, 0, 100, 10).unwrap();
    assert!(close(m.lr_at(19), 1.0) && close(m.lr_at(20), 0.1) && close(m.lr_at(45), 0.01));
    assert!(matches!(
        LrSchedule::new(
            1.0,
            ScheduleKind::Multistep {
                milestones: vec![4, 2],
                gamma: 0.1
            },
            0,
            10,
            1
        ),
        Err(CovnoiseError::InvalidSetting { .. })
    ));
    assert!(
        (covnoise::optim::LrScaling::Sqrt.scale(0.1, 4096, 128) - 0.1 * 32f64.sqrt()).abs() < 1e-12
    );
    assert!((covnoise::optim::LrScaling::Linear.scale(0.1, 4096, 128) - 3.2).abs() < 1e-12);
}

#[test]
fn impossible_settings_are_typed_errors() {
    let err = NoiseStage::new(NoiseConfig::diag_fisher(4096), 4096, 0).unwrap_err();
    assert_eq!(
        err,
        CovnoiseError::SmallBatchNotSmaller {
            small: 4096,
            large: 4096
        }
    );
    assert!(err.to_string().contains("B_S = 4096"));
    let micro = |m| NoiseConfig {
        estimator: Estimator::Microbatch { micro_batches: m },
        ..NoiseConfig::diag_fisher(4)
    };
    assert_eq!(
        NoiseStage::new(micro(1), 64, 0).unwrap_err(),
        CovnoiseError::TooFewMicroBatches(1)
    );
    assert_eq!(
        NoiseStage::new(micro(5), 64, 0).unwrap_err(),
        CovnoiseError::MicroBatchesDoNotDivide {
            batch: 64,
            micro_batches: 5
        }
    );
    let neg = NoiseConfig {
        kappa: -1.0,
        ..NoiseConfig::diag_fisher(4)
    };
    assert!(matches!(
        NoiseStage::new(neg, 64, 0),
        Err(CovnoiseError::InvalidSetting { name: "kappa", .. })
    ));
    let dev = device();
    // A negative learning rate is refused where rates are made: the schedule.
    assert!(matches!(
        LrSchedule::new(-0.1, ScheduleKind::Constant, 0, 10, 1),
        Err(CovnoiseError::InvalidSetting { name: "lr", .. })
    ));
    assert!(
        Sgd::new(SgdConfig {
            nesterov: true,
            ..Default::default()
        })
        .is_err()
    );
    // Per-example estimators refuse batch norm instead of skipping its parameters.
    let bn = MlpConfig {
        input: 3,
        hidden: vec![4],
        classes: 2,
        normalization: Normalization::BatchNorm,
    };
    let bn_model = Mlp::new(&bn, 0, &dev).unwrap();
    let bn_table = ParamTable::of(&bn_model);
    let batch = random_batch(8, 3, 2, 0);
    let e = moments::estimate(
        &bn_model,
        &batch,
        &fwd,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(0, &bn_table),
    )
    .unwrap_err();
    assert!(matches!(e, CovnoiseError::Refused { .. }), "{e}");
    // Micro-batches may not split ghost batches.
    let ghost = MlpConfig {
        input: 3,
        hidden: vec![4],
        classes: 2,
        normalization: Normalization::GhostBatchNorm(4),
    };
    let ghost_model = Mlp::new(&ghost, 0, &dev).unwrap();
    let table = ParamTable::of(&ghost_model);
    let ghost_ctx = ctx_with(0, &table, Normalization::GhostBatchNorm(4).coupling());
    let batch = random_batch(12, 3, 2, 0);
    let mb = Estimator::Microbatch { micro_batches: 2 };
    let kind = MomentKind::Diag;
    assert!(moments::estimate(&ghost_model, &batch, &fwd, mb, kind, &ghost_ctx).is_err());
    let mb = Estimator::Microbatch { micro_batches: 3 };
    assert!(moments::estimate(&ghost_model, &batch, &fwd, mb, kind, &ghost_ctx).is_ok());
    // Without the declaration a batch norm couples the whole batch: refused.
    assert!(moments::estimate(&ghost_model, &batch, &fwd, mb, kind, &ctx(0, &table)).is_err());
}

#[test]
fn a_nan_gradient_is_an_error_not_an_update() {
    let (mut model, batch) = (mlp(4, &[5], 3, 0), random_batch(8, 4, 3, 1));
    let nan = (model.layers[0].weight.val() * f32::NAN).detach();
    model.layers[0].weight = burn::module::Param::from_tensor(nan);
    let mut stage = NoiseStage::new(NoiseConfig::diag_fisher(2), 8, 0).unwrap();
    let err = stage.gradient(&model, &batch, fwd).unwrap_err();
    assert!(
        matches!(
            err,
            CovnoiseError::NonFiniteLoss { step: 0, .. }
                | CovnoiseError::NonFiniteGradient { step: 0 }
        ),
        "{err}"
    );
    // The failed step is not counted.
    assert_eq!(stage.step(), 0);
}

#[test]
fn ghost_batch_norm_normalizes_each_ghost_batch() {
    // Brute force: with ghost batches of 4, the loss of a batch of 8 equals
    // the mean of the losses of its two halves run as separate batches.
    let dev = device();
    let cfg = MlpConfig {
        input: 3,
        hidden: vec![5],
        classes: 3,
        normalization: Normalization::GhostBatchNorm(4),
    };
    let model = Mlp::new(&cfg, 4, &dev).unwrap();
    let table = ParamTable::of(&model);
    let batch = random_batch(8, 3, 3, 5);
    let pass = |b: &Batch| backward_pass(&model, &table, b, &fwd, PassRequest::default()).unwrap();
    let whole = pass(&batch);
    let a = pass(&Examples::slice(&batch, 0, 4));
    let b = pass(&Examples::slice(&batch, 4, 4));
    let mean_loss = |p: &moments::Pass| p.loss_sum / p.examples as f64;
    assert!((mean_loss(&whole) - 0.5 * (mean_loss(&a) + mean_loss(&b))).abs() < 1e-5);
    let half_mean: Vec<f64> = flat(&a.grads)
        .iter()
        .zip(flat(&b.grads))
        .map(|(x, y)| 0.5 * (x + y))
        .collect();
    assert!(rel_err(&flat(&whole.grads), &half_mean) < 1e-4);
}

/// Between refreshes the stage adds noise shaped by the last estimate, and
/// a refresh on other data replaces it (the noise's scale is kept between
/// refreshes, so this checks that it is dropped on every refresh).
#[test]
fn refreshed_noise_uses_the_estimate_of_the_last_refresh() {
    let model = mlp(4, &[5], 3, 0);
    let table = ParamTable::of(&model);
    let (x, y) = (random_batch(8, 4, 3, 1), random_batch(8, 4, 3, 2));
    let config = NoiseConfig {
        refresh_every: 3,
        ..NoiseConfig::diag_fisher(2)
    };
    let mut stage = NoiseStage::new(config.clone(), 8, 9).unwrap();
    let reference = NoiseStage::new(config, 8, 9).unwrap();
    let estimate = |batch: &Batch| {
        moments::estimate(
            &model,
            batch,
            &fwd,
            Estimator::Exact,
            MomentKind::Diag,
            &ctx(0, &table),
        )
        .unwrap()
    };
    let (at_x, at_y) = (estimate(&x), estimate(&y));
    // Steps 0-2 see batch x (refresh at 0), steps 3-4 batch y (refresh at 3).
    for (step, batch, fresh) in [
        (0, &x, &at_x),
        (1, &x, &at_x),
        (2, &x, &at_x),
        (3, &y, &at_y),
        (4, &y, &at_y),
    ] {
        let mut got = stage.gradient(&model, batch, fwd).unwrap().grads;
        let got = flat(&table.flatten(&mut got, &Device::flex()).unwrap());
        let plain = moments::plain_gradient(&model, batch, &fwd, &ctx(step, &table)).unwrap();
        let mut expected = plain.grads;
        let moment = fresh.moment.clone().unwrap();
        reference.add_noise(&mut expected, &moment, step).unwrap();
        let expected = flat(&expected);
        assert!(
            rel_err(&got, &expected) < 1e-6,
            "step {step}: {}",
            rel_err(&got, &expected)
        );
    }
}
