//! The noise stage on models that are not covnoise's own: a user's
//! `#[derive(Module)]` network with a conv kernel (rank 4), an embedding
//! table, a rank-3 parameter and a bias-free Linear layer, checked against
//! brute-force single-example passes and Monte-Carlo covariances; and the
//! noisy gradients fed to burn's SGD and to ours.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig as BurnSgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use covnoise::CovnoiseError;
use covnoise::collective::SingleProcess;
use covnoise::model::{Examples, Objective, Probes, labels_tensor};
use covnoise::moments::{
    self, Estimator, MomentKind, PassRequest, SecondMoment, StepContext, backward_pass,
};
use covnoise::noise::{
    NoiseConfig, NoiseStage, NoiseWindow, ScaleRule, SharedNoiseStage, StructureName,
    StructureOptions,
};
use covnoise::optim::SgdConfig;
use covnoise::params::ParamTable;
use covnoise::rng::normals;
use covnoise::tensor_util::to_vec;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::Regression;
use common::Running;
use common::{flat, norm, per_example};

fn device() -> Device {
    Device::flex().autodiff()
}

/// A model unlike the MLP: conv kernel `[1, 1, 2, 2]` + bias, embedding
/// `[3, 4]`, a rank-3 scale `[1, 1, 4]`, a bias-free head `[4, 3]`; d = 33.
#[derive(Module, Debug)]
struct Odd {
    conv: Conv2d,
    embed: Embedding,
    scale: Param<Tensor<3>>,
    head: Linear,
}

impl Odd {
    fn new(seed: u64) -> Self {
        let device = device();
        device.seed(seed);
        Self {
            conv: Conv2dConfig::new([1, 1], [2, 2]).init(&device),
            embed: EmbeddingConfig::new(3, 4).init(&device),
            scale: Param::from_tensor(Tensor::random(
                [1, 1, 4],
                burn::tensor::Distribution::Uniform(0.5, 1.5),
                &device,
            )),
            head: LinearConfig::new(4, 3).with_bias(false).init(&device),
        }
    }

    fn forward(&self, b: &OddBatch, probes: &mut Probes) -> Objective {
        let n = b.len();
        let conv = self.conv.forward(b.images.clone()).reshape([n, 4]);
        let embedded = self.embed.forward(b.tokens.clone()).reshape([n, 4]);
        let h = activation::tanh(conv + embedded) * self.scale.val().reshape([1, 4]);
        Objective::Classification {
            logits: probes.linear(&self.head, h),
            labels: b.labels.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct OddBatch {
    images: Tensor<4>,
    tokens: Tensor<2, Int>,
    labels: Tensor<1, Int>,
}

impl Examples for OddBatch {
    fn len(&self) -> usize {
        self.labels.dims()[0]
    }
    fn slice(&self, start: usize, len: usize) -> Self {
        Self {
            images: self.images.clone().narrow(0, start, len),
            tokens: self.tokens.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
        }
    }
}

fn odd_forward(m: &Odd, b: &OddBatch, p: &mut Probes) -> Objective {
    m.forward(b, p)
}

fn odd_batch(n: usize, seed: u64) -> OddBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<f32> = (0..n * 9).map(|_| rng.random_range(-1.0..1.0)).collect();
    let tokens: Vec<i64> = (0..n).map(|_| rng.random_range(0..3)).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..3u8)).collect();
    let d = device();
    OddBatch {
        images: Tensor::from_data(TensorData::new(images, [n, 1, 3, 3]), &d),
        tokens: Tensor::from_data(TensorData::new(tokens, [n, 1]), &d),
        labels: labels_tensor(&labels, &d),
    }
}

fn ctx<'a>(step: u64, table: &'a ParamTable) -> StepContext<'a> {
    StepContext {
        seed: 5,
        step,
        collective: &SingleProcess,
        table,
        coupling: covnoise::model::Coupling::Independent,
        chunk: None,
    }
}

#[test]
fn the_table_walks_every_rank_with_paths() {
    let model = Odd::new(0);
    let table = ParamTable::of(&model);
    let shapes: Vec<(String, Vec<usize>)> = table
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("conv.weight".to_string(), vec![1, 1, 2, 2]),
            ("conv.bias".to_string(), vec![1]),
            ("embed.weight".to_string(), vec![3, 4]),
            ("scale".to_string(), vec![1, 1, 4]),
            ("head.weight".to_string(), vec![4, 3]),
        ]
    );
    assert_eq!(table.num_params(), 33);
    // Flatten and unflatten are inverse on burn gradients of every rank.
    let batch = odd_batch(4, 1);
    let value = odd_forward(&model, &batch, &mut Probes::off())
        .losses()
        .mean();
    let mut grads = GradientsParams::from_grads(value.backward(), &model);
    let flat1 = table.flatten(&mut grads, &Device::flex()).unwrap();
    let mut again = table.unflatten(flat1.clone()).unwrap();
    let flat2 = table.flatten(&mut again, &Device::flex()).unwrap();
    assert_eq!(flat(&flat1), flat(&flat2));
}

#[test]
fn microbatch_estimate_on_any_model_matches_the_centered_variance() {
    let model = Odd::new(3);
    let table = ParamTable::of(&model);
    let pop = 64;
    let population = odd_batch(pop, 4);
    let per = per_example(&model, &population, &odd_forward);
    let d = per[0].len();
    let mean: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| g[j]).sum::<f64>() / pop as f64)
        .collect();
    let sigma: Vec<f64> = (0..d)
        .map(|j| per.iter().map(|g| (g[j] - mean[j]).powi(2)).sum::<f64>() / pop as f64)
        .collect();
    // M = 4 micro-batches of b = 4 examples drawn with replacement: i.i.d.
    // micro-batch gradients, so the estimator's expectation is diag(Sigma).
    let (m, b, reps) = (4, 4, 1500);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut acc = Running::new(d);
    for r in 0..reps {
        let idx: Vec<i64> = (0..m * b)
            .map(|_| rng.random_range(0..pop as i64))
            .collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [m * b]), &device());
        let batch = OddBatch {
            images: population.images.clone().select(0, idx.clone()),
            tokens: population.tokens.clone().select(0, idx.clone()),
            labels: population.labels.clone().select(0, idx),
        };
        let out = moments::estimate(
            &model,
            &batch,
            &odd_forward,
            Estimator::Microbatch { micro_batches: m },
            MomentKind::Diag,
            &ctx(r, &table),
        )
        .unwrap();
        let SecondMoment::Diag(est) = out.moment.unwrap() else {
            panic!("diagonal requested")
        };
        acc.push(&flat(&est));
    }
    // Same bound as for the MLP: 4 times the expected error norm
    // sqrt(sum_j var_j / R), estimated from the draws themselves.
    common::assert_monte_carlo_mean(&acc, &sigma, 0.15, "micro-batch diag(Sigma)");
}

/// Every entry of the empirical covariance of `draws` within 5 standard
/// errors of `expected` (diagonal), as in the MLP tests.
fn assert_diag_covariance(draws: &[Vec<f64>], expected: &[f64], label: &str) {
    let n = draws.len() as f64;
    let d = expected.len();
    let mut worst: f64 = 0.0;
    for i in 0..d {
        for j in i..d {
            let emp = draws.iter().map(|v| v[i] * v[j]).sum::<f64>() / n;
            let c = if i == j { expected[i] } else { 0.0 };
            let se = ((expected[i] * expected[j] + c * c) / n).sqrt();
            assert!(se > 0.0, "{label}: zero variance at {i}");
            worst = worst.max((emp - c).abs() / se);
        }
    }
    assert!(
        worst < 5.0,
        "{label}: worst entry {worst} standard errors off"
    );
}

#[test]
fn diag_and_isotropic_noise_on_any_model_have_covariance_c_s() {
    let model = Odd::new(6);
    let table = ParamTable::of(&model);
    let batch = odd_batch(8, 7);
    let plain = {
        let pass = backward_pass(&model, &table, &batch, &odd_forward, PassRequest::default());
        flat(&pass.unwrap().grads)
    };
    let c = 1.0 / 2.0 - 1.0 / 8.0;
    for name in [StructureName::Diag, StructureName::Isotropic] {
        let config = NoiseConfig {
            structure: name.build(&StructureOptions::default()).unwrap(),
            estimator: Estimator::Microbatch { micro_batches: 4 },
            scale: ScaleRule::Paper { small_batch: 2 },
            refresh_every: u64::MAX,
            ..NoiseConfig::none()
        };
        let mut stage = NoiseStage::new(config, 8, 11).unwrap();
        // The estimate of step 0 is kept for every later step.
        let s = moments::estimate(
            &model,
            &batch,
            &odd_forward,
            Estimator::Microbatch { micro_batches: 4 },
            MomentKind::Diag,
            &StepContext {
                seed: 11,
                ..ctx(0, &table)
            },
        )
        .unwrap()
        .moment
        .unwrap();
        let s = match s {
            SecondMoment::Diag(d) => flat(&d),
            SecondMoment::Trace(_) => unreachable!(),
        };
        let trace: f64 = s.iter().sum();
        let expected: Vec<f64> = match name {
            StructureName::Diag => s.iter().map(|v| c * v).collect(),
            _ => vec![c * trace / s.len() as f64; s.len()],
        };
        let mut draws = Vec::new();
        for _ in 0..20_000 {
            let mut g = stage.gradient(&model, &batch, odd_forward).unwrap();
            assert!((g.noise_trace.unwrap() - c * trace).abs() <= 1e-4 * c * trace);
            let noisy = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
            draws.push(noisy.iter().zip(&plain).map(|(a, b)| a - b).collect());
        }
        assert_diag_covariance(&draws, &expected, name.as_str());
    }
}

/// A user model of Linear layers only (one without bias), routed through
/// probes: the exact estimator covers all of it.
#[derive(Module, Debug)]
struct TwoLinear {
    a: Linear,
    b: Linear,
}

fn two_linear_forward(
    m: &TwoLinear,
    batch: &(Tensor<2>, Tensor<1, Int>),
    p: &mut Probes,
) -> Objective {
    let h = activation::relu(p.linear(&m.a, batch.0.clone()));
    Objective::Classification {
        logits: p.linear(&m.b, h),
        labels: batch.1.clone(),
    }
}

#[test]
fn exact_estimator_on_any_linear_model_matches_single_example_passes() {
    let device = device();
    device.seed(2);
    let model = TwoLinear {
        a: LinearConfig::new(5, 6).with_bias(false).init(&device),
        b: LinearConfig::new(6, 4).init(&device),
    };
    let table = ParamTable::of(&model);
    let n = 10;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..n * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..4u8)).collect();
    let batch = (
        Tensor::<2>::from_data(TensorData::new(x, [n, 5]), &device),
        labels_tensor(&labels, &device),
    );
    let out = moments::estimate(
        &model,
        &batch,
        &two_linear_forward,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(0, &table),
    )
    .unwrap();
    let SecondMoment::Diag(est) = out.moment.unwrap() else {
        panic!("diagonal requested")
    };
    let per = per_example(&model, &batch, &two_linear_forward);
    let mut start = 0;
    for (e, est) in table.entries().iter().zip(&est) {
        let reference: Vec<f64> = (start..start + e.numel())
            .map(|j| per.iter().map(|g| g[j] * g[j]).sum::<f64>() / n as f64)
            .collect();
        let got = flat(std::slice::from_ref(est));
        let diff: Vec<f64> = got.iter().zip(&reference).map(|(a, b)| a - b).collect();
        // float32 sums of 10 terms: 1e-4 is far above rounding, far below any
        // wrong factor.
        let rel = norm(&diff) / norm(&reference);
        assert!(rel <= 1e-4, "{}: relative error {rel}", e.name);
        start += e.numel();
    }
}

#[test]
fn exact_estimator_names_the_parameter_it_cannot_handle() {
    let model = Odd::new(0);
    let table = ParamTable::of(&model);
    let err = moments::estimate(
        &model,
        &odd_batch(4, 0),
        &odd_forward,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(0, &table),
    )
    .unwrap_err();
    assert!(
        matches!(&err, CovnoiseError::Refused { problem: m, .. } if m.contains("conv.weight")),
        "{err}"
    );
}

#[test]
fn kappa_zero_and_none_give_burns_own_gradients_bit_for_bit() {
    let model = Odd::new(9);
    let table = ParamTable::of(&model);
    let batch = odd_batch(8, 10);
    // What a burn user computes without covnoise.
    let loss = odd_forward(&model, &batch, &mut Probes::off())
        .losses()
        .mean();
    let mut reference = GradientsParams::from_grads(loss.backward(), &model);
    let reference = flat(&table.flatten(&mut reference, &Device::flex()).unwrap());
    let configs = [
        NoiseConfig::none(),
        NoiseConfig {
            kappa: 0.0,
            estimator: Estimator::Microbatch { micro_batches: 2 },
            ..NoiseConfig::diag_fisher(2)
        },
    ];
    for config in configs {
        let mut stage = NoiseStage::new(config, 8, 1).unwrap();
        let mut g = stage.gradient(&model, &batch, odd_forward).unwrap();
        let got = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
        assert_eq!(got, reference);
    }
}

/// A one-weight model: l_i = (w x_i - y_i)^2 / 2, gradients by hand.
#[derive(Module, Debug)]
struct Scalar {
    w: Linear,
}

fn scalar_forward(m: &Scalar, b: &Regression, p: &mut Probes) -> Objective {
    let r = p.linear(&m.w, b.x.clone()) - b.y.clone();
    let n = b.len();
    Objective::Losses((r.square() * 0.5).reshape([n]))
}

#[test]
fn noisy_gradients_give_the_same_update_in_burns_sgd_and_ours() {
    let device = device();
    let w0 = 2.0f32;
    let new_model = || Scalar {
        w: Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![w0], [1, 1]),
                &device,
            )),
            bias: None,
        },
    };
    let batch = Regression {
        x: Tensor::from_data(TensorData::new(vec![1.0f32, 2.0], [2, 1]), &device),
        y: Tensor::from_data(TensorData::new(vec![0.0f32, 0.0], [2, 1]), &device),
    };
    // By hand: g_i = (w x_i - y_i) x_i = 2, 8; g = 5; diag F = (4 + 64) / 2 = 34.
    let (c, lr, momentum, seed) = (0.01, 0.1, 0.9, 4);
    let config = NoiseConfig {
        scale: ScaleRule::Fixed { c },
        ..NoiseConfig::diag_fisher(1)
    };
    let mut ours = SgdConfig {
        momentum,
        ..Default::default()
    }
    .init()
    .unwrap();
    let mut burns = BurnSgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new()
                .with_momentum(momentum)
                .with_dampening(0.0),
        ))
        .init();
    let (mut a, mut b) = (new_model(), new_model());
    let (mut stage_a, mut stage_b) = (
        NoiseStage::new(config.clone(), 2, seed).unwrap(),
        NoiseStage::new(config, 2, seed).unwrap(),
    );
    let mut buf = 0.0f64;
    let mut w = w0 as f64;
    for step in 0..3u64 {
        // The math: g_tilde = g + xi sqrt(c diag F), xi keyed by (seed, step, 0).
        let (g, f) = {
            let r1 = w - 0.0;
            let r2 = 2.0 * w;
            ((r1 + 2.0 * r2) / 2.0, (r1 * r1 + (2.0 * r2).powi(2)) / 2.0)
        };
        let xi = normals(seed, step, 0, 1)[0] as f64;
        let g_tilde = g + xi * (c * f).sqrt();
        buf = if step == 0 {
            g_tilde
        } else {
            momentum * buf + g_tilde
        };
        w -= lr * buf;
        let ga = stage_a.gradient(&a, &batch, scalar_forward).unwrap();
        let gb = stage_b.gradient(&b, &batch, scalar_forward).unwrap();
        a = ours.step(lr, a, ga.grads);
        b = burns.step(lr, b, gb.grads);
        let wa = to_vec(&a.w.weight.val()).unwrap()[0] as f64;
        let wb = to_vec(&b.w.weight.val()).unwrap()[0] as f64;
        assert_eq!(wa, wb, "step {step}: ours and burn's SGD differ");
        // float32 against float64 over three steps: 1e-5 relative.
        assert!(
            (wa - w).abs() <= 1e-5 * w.abs().max(1.0),
            "step {step}: {wa} vs {w}"
        );
    }
}

/// A model that carries its noise stage, as a burn-train `TrainStep` does.
#[derive(Module, Debug)]
struct Carrier {
    odd: Odd,
    #[module(skip)]
    noise: SharedNoiseStage,
}

#[test]
fn a_shared_stage_in_a_model_field_adds_the_same_noise_as_its_own_stage() {
    // Noise from epoch 1 on, 2 steps per epoch: steps 0-1 plain, 2-3 noisy.
    let config = NoiseConfig {
        window: NoiseWindow {
            from: 1,
            until: None,
        },
        estimator: Estimator::Microbatch { micro_batches: 2 },
        ..NoiseConfig::diag_fisher(2)
    };
    let carrier = Carrier {
        odd: Odd::new(12),
        noise: SharedNoiseStage::new(NoiseStage::new(config.clone(), 8, 5).unwrap(), 2).unwrap(),
    };
    // Parameters come from the model, not from the skipped stage.
    assert_eq!(ParamTable::of(&carrier).num_params(), 33);
    let table = ParamTable::of(&carrier.odd);
    let mut own = NoiseStage::new(config, 8, 5).unwrap();
    let batch = odd_batch(8, 13);
    let forward = |c: &Carrier, b: &OddBatch, p: &mut Probes| odd_forward(&c.odd, b, p);
    for step in 0..4u64 {
        // A fresh clone each step, as burn-train forks the model: one stage.
        let model = carrier.clone();
        let mut shared = model.noise.gradient(&model, &batch, forward).unwrap();
        let mut expected = own
            .gradient_in_epoch(&carrier.odd, &batch, step as usize / 2, odd_forward)
            .unwrap();
        assert_eq!(shared.step, step);
        assert_eq!(shared.noise_trace.unwrap() > 0.0, step >= 2, "step {step}");
        let got = flat(
            &ParamTable::of(&model)
                .flatten(&mut shared.grads, &Device::flex())
                .unwrap(),
        );
        let want = flat(&table.flatten(&mut expected.grads, &Device::flex()).unwrap());
        assert_eq!(got, want, "step {step}");
    }
    assert_eq!(carrier.noise.step().unwrap(), 4);
    assert!(SharedNoiseStage::new(own, 0).is_err());
}

/// Labels drawn from the model need a classifier: a regression model (per-
/// example losses) is refused at validation with the mc-fisher estimator
/// and the Fisher-trace penalty, and accepted with the exact estimator and
/// the gradient-norm penalty, which need no labels.
#[test]
fn validation_refuses_model_labels_for_a_model_that_is_not_a_classifier() {
    use covnoise::regularizer::Regularizer;
    let device = device();
    device.seed(4);
    let model = Scalar {
        w: LinearConfig::new(3, 1).init(&device),
    };
    let batch = Regression {
        x: Tensor::<2>::ones([8, 3], &device),
        y: Tensor::<2>::zeros([8, 1], &device),
    };
    let mc = NoiseConfig::diag_fisher(2).with_estimator(Estimator::McFisher);
    let err = NoiseStage::new(mc, 8, 0)
        .unwrap()
        .validate_model(&model, &batch, scalar_forward)
        .unwrap_err();
    assert!(
        matches!(&err, CovnoiseError::Refused { problem: m, .. } if m.contains("mc-fisher") && m.contains("Objective::Classification")),
        "{err}"
    );
    let penalty = NoiseStage::new(NoiseConfig::none(), 8, 0)
        .unwrap()
        .with_regularizer(Regularizer::fisher_trace(0.1, 2))
        .unwrap()
        .validate_model(&model, &batch, scalar_forward)
        .unwrap_err();
    assert!(
        matches!(&penalty, CovnoiseError::Refused { problem: m, .. } if m.contains("Fisher-trace")),
        "{penalty}"
    );
    NoiseStage::new(NoiseConfig::diag_fisher(2), 8, 0)
        .unwrap()
        .with_regularizer(Regularizer::grad_norm(0.1, 2))
        .unwrap()
        .validate_model(&model, &batch, scalar_forward)
        .unwrap();
}
