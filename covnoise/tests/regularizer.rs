//! The explicit regularizers (gradient-norm and Fisher-trace penalties over
//! micro-batches) and gradient clipping: the regularized gradient against
//! its closed form on least squares, the finite-difference Hessian-vector
//! product against central differences on a small MLP, strength 0 as the
//! plain step bit for bit, and reproducibility.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use covnoise::model::{Examples, Forward, Objective, Probes, labels_tensor};
use covnoise::moments::{PassRequest, backward_pass};
use covnoise::noise::{NoiseConfig, NoiseStage};
use covnoise::params::{ParamTable, shifted};
use covnoise::regularizer::Regularizer;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::Regression;
use common::{Running, assert_monte_carlo_mean, flat, norm};

fn device() -> Device {
    Device::flex().autodiff()
}

fn tensor2(values: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, shape), &device())
}

/// Least squares: l_i = (w . x_i + b - y_i)^2 / 2.
#[derive(Module, Debug)]
struct LeastSquares {
    fc: Linear,
}

fn least_squares(m: &LeastSquares, b: &Regression, p: &mut Probes) -> Objective {
    let n = b.len();
    let r = p.linear(&m.fc, b.x.clone()) - b.y.clone();
    Objective::Losses((r.square() * 0.5).reshape([n]))
}

/// `n` examples of dimension `d`, features and targets of size about 1.
fn regression(n: usize, d: usize, seed: u64) -> (Regression, Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let batch = Regression {
        x: tensor2(x.clone(), [n, d]),
        y: tensor2(y.clone(), [n, 1]),
    };
    (
        batch,
        x.iter().map(|&v| v as f64).collect(),
        y.iter().map(|&v| v as f64).collect(),
    )
}

fn step_grads<M: Module, B: Examples>(
    stage: &mut NoiseStage,
    model: &M,
    batch: &B,
    forward: impl Forward<M, B>,
) -> (Vec<f64>, f64, Option<f64>) {
    let table = ParamTable::of(model);
    let mut g = stage.gradient(model, batch, forward).unwrap();
    let grads = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
    (grads, g.loss, g.penalty)
}

/// On least squares every H_m is x~^T x~ / b (x~ = (x, 1)) and g_m is
/// linear in theta, so the forward difference is exact up to float32
/// rounding: the regularized gradient must equal
/// `grad L + 2 lambda (1/M) sum_m H_m g_m`, computed here in f64.
/// Rounding of the two float32 gradients the difference divides by
/// eps = r/||g_m|| (r = 1e-2, ||g_m|| about 1) gives about 1e-7/1e-2 = 1e-5
/// relative; 1e-4 leaves room for accumulation, while a wrong factor (2,
/// 1/M), a wrong micro-batch or the wrong sign is off by O(1).
#[test]
fn regularized_gradient_matches_closed_form_on_least_squares() {
    let (n, d) = (16, 5);
    let (batch, x, y) = regression(n, d, 3);
    device().seed(11);
    let model = LeastSquares {
        fc: LinearConfig::new(d, 1).init(&device()),
    };
    let values = flat(&ParamTable::of(&model).values(&model));
    // Table order: weight [d, 1], then bias [1].
    let (w, b0) = (&values[..d], values[d]);
    let xt = |i: usize| -> Vec<f64> {
        let mut v = x[i * d..(i + 1) * d].to_vec();
        v.push(1.0);
        v
    };
    let residual =
        |i: usize| -> f64 { (0..d).map(|k| w[k] * x[i * d + k]).sum::<f64>() + b0 - y[i] };
    let mean_grad = |range: std::ops::Range<usize>| -> Vec<f64> {
        let len = range.len() as f64;
        let mut g = vec![0.0; d + 1];
        for i in range {
            let (r, v) = (residual(i), xt(i));
            g.iter_mut().zip(&v).for_each(|(g, v)| *g += r * v / len);
        }
        g
    };
    let hessian_times = |range: std::ops::Range<usize>, v: &[f64]| -> Vec<f64> {
        let len = range.len() as f64;
        let mut out = vec![0.0; d + 1];
        for i in range {
            let xi = xt(i);
            let dot: f64 = xi.iter().zip(v).map(|(a, b)| a * b).sum();
            out.iter_mut()
                .zip(&xi)
                .for_each(|(o, a)| *o += dot * a / len);
        }
        out
    };
    let lambda = 0.5;
    for m in [1, 4] {
        let b = n / m;
        let mut expected = mean_grad(0..n);
        let mut penalty = 0.0;
        for j in 0..m {
            let gm = mean_grad(j * b..(j + 1) * b);
            penalty += gm.iter().map(|v| v * v).sum::<f64>() / m as f64;
            let hg = hessian_times(j * b..(j + 1) * b, &gm);
            expected
                .iter_mut()
                .zip(&hg)
                .for_each(|(e, h)| *e += 2.0 * lambda / m as f64 * h);
        }
        let mut stage = NoiseStage::new(NoiseConfig::none(), n, 0)
            .unwrap()
            .with_regularizer(Regularizer::grad_norm(lambda, m))
            .unwrap();
        let (got, _, value) = step_grads(&mut stage, &model, &batch, least_squares);
        let diff: Vec<f64> = got.iter().zip(&expected).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(&expected);
        let plain = mean_grad(0..n);
        let penalty_part: Vec<f64> = expected.iter().zip(&plain).map(|(a, b)| a - b).collect();
        eprintln!(
            "M = {m}: relative error {rel:.2e}, |penalty gradient| / |grad L| = {:.2}",
            norm(&penalty_part) / norm(&plain)
        );
        assert!(rel < 1e-4, "M = {m}: {got:?} vs {expected:?} ({rel:e})");
        // The test can see the penalty: its gradient is not small.
        assert!(norm(&penalty_part) > 0.05 * norm(&plain));
        let value = value.expect("the penalty's value is reported");
        assert!(
            (value - penalty).abs() <= 1e-5 * penalty,
            "M = {m}: penalty {value} vs {penalty}"
        );
    }
}

/// A small tanh MLP classifier.
#[derive(Module, Debug)]
struct Mlp {
    a: Linear,
    b: Linear,
}

struct Labeled {
    x: Tensor<2>,
    labels: Tensor<1, Int>,
}

impl Examples for Labeled {
    fn len(&self) -> usize {
        self.x.dims()[0]
    }
    fn slice(&self, start: usize, len: usize) -> Self {
        Self {
            x: self.x.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
        }
    }
}

fn mlp_forward(m: &Mlp, b: &Labeled, p: &mut Probes) -> Objective {
    let h = activation::tanh(p.linear(&m.a, b.x.clone()));
    Objective::Classification {
        logits: p.linear(&m.b, h),
        labels: b.labels.clone(),
    }
}

fn mlp_and_batch(n: usize, seed: u64) -> (Mlp, Labeled) {
    let device = device();
    device.seed(seed);
    let model = Mlp {
        a: LinearConfig::new(6, 8).init(&device),
        b: LinearConfig::new(8, 3).init(&device),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * 6).map(|_| rng.random_range(-2.0..2.0)).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..3u8)).collect();
    let batch = Labeled {
        x: tensor2(x, [n, 6]),
        labels: labels_tensor(&labels, &device),
    };
    (model, batch)
}

fn gradient_at(model: &Mlp, batch: &Labeled) -> Vec<Tensor<1>> {
    let table = ParamTable::of(model);
    backward_pass(model, &table, batch, &mlp_forward, PassRequest::default())
        .unwrap()
        .grads
}

/// `sum_m H_m g_m` by central differences, the reference: its error is
/// second order in the step (about r^2 = 1e-6 relative at r = 1e-3) plus
/// float32 rounding over 2r (about 1e-7 / 2e-3 = 5e-5 relative).
fn central_reference(model: &Mlp, batch: &Labeled, m: usize, r: f64) -> Vec<f64> {
    let b = batch.len() / m;
    let mut sum: Option<Vec<f64>> = None;
    for j in 0..m {
        let part = batch.slice(j * b, b);
        let g = gradient_at(model, &part);
        let h = r / norm(&flat(&g));
        let plus = flat(&gradient_at(&shifted(model, &g, h as f32).unwrap(), &part));
        let minus = flat(&gradient_at(&shifted(model, &g, -h as f32).unwrap(), &part));
        let hvp: Vec<f64> = plus
            .iter()
            .zip(&minus)
            .map(|(p, q)| (p - q) / (2.0 * h))
            .collect();
        sum = Some(match sum {
            None => hvp,
            Some(s) => s.iter().zip(&hvp).map(|(a, b)| a + b).collect(),
        });
    }
    sum.unwrap()
}

/// The library's forward difference against central differences on a
/// tanh MLP (non-quadratic: its third derivative is what the forward
/// difference's first-order error sees). The error is `(r/2) ||T[u,u]|| /
/// ||H u||` relative, first order in r; for this net that ratio is about 1
/// (measured: 5.6e-3 at r = 1e-2, 5.5e-4 at r = 1e-3, exactly first order;
/// rounding, 1e-7 / 1e-3 = 1e-4, is below both). The tolerances, 2.5e-2 and
/// 2.5e-3, allow 4.5 times the measured error; a wrong sign, factor or
/// micro-batch is off by O(1), and the error must fall with r.
#[test]
fn finite_difference_product_matches_central_differences_on_an_mlp() {
    let (n, m, lambda) = (12, 2, 1.0);
    let (model, batch) = mlp_and_batch(n, 5);
    let reference = central_reference(&model, &batch, m, 1e-3);
    let mut plain = NoiseStage::new(NoiseConfig::none(), n, 0).unwrap();
    let (base, _, _) = step_grads(&mut plain, &model, &batch, mlp_forward);
    let mut errors = Vec::new();
    for r in [1e-2, 1e-3] {
        let reg = Regularizer::grad_norm(lambda, m).with_fd_radius(r);
        let mut stage = NoiseStage::new(NoiseConfig::none(), n, 0)
            .unwrap()
            .with_regularizer(reg)
            .unwrap();
        let (got, _, _) = step_grads(&mut stage, &model, &batch, mlp_forward);
        // (regularized - plain) / (2 lambda / M) = sum_m H_m g_m.
        let hvp: Vec<f64> = got
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b) * m as f64 / (2.0 * lambda))
            .collect();
        let diff: Vec<f64> = hvp.iter().zip(&reference).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(&reference);
        eprintln!("r = {r:e}: relative error against central differences {rel:.2e}");
        errors.push(rel);
    }
    assert!(errors[0] < 2.5e-2, "r = 1e-2: {:e}", errors[0]);
    assert!(errors[1] < 2.5e-3, "r = 1e-3: {:e}", errors[1]);
    assert!(
        errors[1] < errors[0],
        "the error must fall with r: {errors:?}"
    );
}

/// Strength 0 skips the penalty entirely: bit for bit the plain step, with
/// and without noise.
#[test]
fn zero_strength_is_the_plain_step_bit_for_bit() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 2);
    for config in [NoiseConfig::none(), NoiseConfig::diag_fisher(4)] {
        for reg in [
            Regularizer::grad_norm(0.0, 4),
            Regularizer::fisher_trace(0.0, 2),
        ] {
            let mut plain = NoiseStage::new(config.clone(), n, 9).unwrap();
            let mut with = NoiseStage::new(config.clone(), n, 9)
                .unwrap()
                .with_regularizer(reg)
                .unwrap();
            for _ in 0..2 {
                let (a, la, pa) = step_grads(&mut plain, &model, &batch, mlp_forward);
                let (b, lb, pb) = step_grads(&mut with, &model, &batch, mlp_forward);
                assert_eq!(a, b);
                assert_eq!(la, lb);
                assert_eq!((pa, pb), (None, None));
            }
        }
    }
}

/// The Fisher-trace penalty draws its labels from (seed, step): the same
/// seed gives the same gradients, another seed other ones; its value is
/// not the gradient-norm penalty's (other labels).
#[test]
fn fisher_trace_is_reproducible_and_uses_sampled_labels() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 4);
    let run = |seed: u64, reg: Regularizer| {
        let mut stage = NoiseStage::new(NoiseConfig::none(), n, seed)
            .unwrap()
            .with_regularizer(reg)
            .unwrap();
        step_grads(&mut stage, &model, &batch, mlp_forward)
    };
    let ft = Regularizer::fisher_trace(0.5, 3);
    let (a, la, pa) = run(1, ft);
    let (b, lb, pb) = run(1, ft);
    assert_eq!((a.clone(), la, pa), (b, lb, pb));
    let (c, _, pc) = run(2, ft);
    assert_ne!(a, c);
    assert_ne!(pa, pc);
    let (_, _, pg) = run(1, Regularizer::grad_norm(0.5, 3));
    assert_ne!(pa, pg);
}

/// Clipping scales the final gradient to norm C when it is longer (as
/// torch's clip_grad_norm_, with its 1e-6), and leaves a shorter one bit
/// for bit.
#[test]
fn clipping_bounds_the_global_norm() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 6);
    let mut plain = NoiseStage::new(NoiseConfig::none(), n, 0).unwrap();
    let (g, _, _) = step_grads(&mut plain, &model, &batch, mlp_forward);
    let full = norm(&g);
    for (c, clipped) in [(full / 4.0, true), (full * 4.0, false)] {
        let mut stage = NoiseStage::new(NoiseConfig::none(), n, 0)
            .unwrap()
            .with_clip_norm(c)
            .unwrap();
        let table = ParamTable::of(&model);
        let mut step = stage.gradient(&model, &batch, mlp_forward).unwrap();
        let got = flat(&table.flatten(&mut step.grads, &Device::flex()).unwrap());
        let before = step.norm_before_clip.unwrap();
        assert!((before - full).abs() <= 1e-5 * full);
        if clipped {
            let coef = c / (full + 1e-6);
            for (a, b) in got.iter().zip(&g) {
                assert!((a - b * coef).abs() <= 1e-6 * full, "{a} vs {}", b * coef);
            }
            assert!((norm(&got) - c).abs() <= 1e-5 * c);
        } else {
            assert_eq!(got, g);
        }
    }
    assert!(
        NoiseStage::new(NoiseConfig::none(), n, 0)
            .unwrap()
            .with_clip_norm(0.0)
            .is_err()
    );
}

/// Impossible settings are refused before any step.
#[test]
fn impossible_settings_are_refused() {
    let stage = || NoiseStage::new(NoiseConfig::none(), 12, 0).unwrap();
    assert!(
        stage()
            .with_regularizer(Regularizer::grad_norm(0.1, 5))
            .is_err()
    );
    assert!(
        stage()
            .with_regularizer(Regularizer::grad_norm(-1.0, 2))
            .is_err()
    );
    assert!(
        stage()
            .with_regularizer(Regularizer::grad_norm(0.1, 0))
            .is_err()
    );
    assert!(
        stage()
            .with_regularizer(Regularizer::grad_norm(0.1, 2).with_fd_radius(0.0))
            .is_err()
    );
    // Least squares has no classes to sample labels from.
    let (batch, _, _) = regression(12, 3, 1);
    let model = LeastSquares {
        fc: LinearConfig::new(3, 1).init(&device()),
    };
    let mut s = stage()
        .with_regularizer(Regularizer::fisher_trace(0.1, 2))
        .unwrap();
    let err = s.gradient(&model, &batch, least_squares).unwrap_err();
    assert!(
        err.to_string().contains("Objective::Classification"),
        "{err}"
    );
}

/// The Fisher-trace penalty's value is `||g_m||^2` with labels drawn from
/// the model; over the draws its mean is `(1/b) tr F_m` (the cross terms
/// vanish: a score has mean zero under the model's own distribution), so
/// with micro-batches of one example it is the mean over examples of
/// `sum_c p_c ||grad l_i(c)||^2`, computed exactly here from one pass per
/// example and class. 400 steps (fresh labels each, same model) against it,
/// within 4 Monte-Carlo standard errors (see `assert_monte_carlo_mean`).
#[test]
fn fisher_trace_value_is_the_trace_of_the_fisher_in_expectation() {
    let n = 6;
    let (model, batch) = mlp_and_batch(n, 8);
    let table = ParamTable::of(&model);
    let logits = model.a.forward(batch.x.clone());
    let logits = model.b.forward(activation::tanh(logits));
    let probs = covnoise::tensor_util::to_vec(&activation::softmax(logits.inner(), 1)).unwrap();
    let mut expected = 0.0;
    for i in 0..n {
        let one = batch.slice(i, 1);
        for c in 0..3u8 {
            let request = PassRequest {
                labels: Some(labels_tensor(&[c], &device())),
                ..Default::default()
            };
            let g = flat(
                &backward_pass(&model, &table, &one, &mlp_forward, request)
                    .unwrap()
                    .grads,
            );
            expected += probs[i * 3 + c as usize] as f64 * norm(&g).powi(2) / n as f64;
        }
    }
    let mut stage = NoiseStage::new(NoiseConfig::none(), n, 3)
        .unwrap()
        .with_regularizer(Regularizer::fisher_trace(1e-3, n))
        .unwrap();
    let mut acc = Running::new(1);
    for _ in 0..400 {
        let (_, _, value) = step_grads(&mut stage, &model, &batch, mlp_forward);
        acc.push(&[value.unwrap()]);
    }
    assert_monte_carlo_mean(&acc, &[expected], 0.1, "Fisher-trace penalty");
}

/// With `--chunk` smaller than a micro-batch every pass is split and
/// accumulated: the same penalized step up to float32 rounding of the
/// different summation order. The forward difference divides that rounding
/// of two gradients by ε = r/‖g‖, so it shows in the step at about 1e-5
/// relative: measured 5.3e-6 (gradient norm) and 7.5e-6 (Fisher trace) on an
/// idle machine, and 1.07e-5 with both cores busy, where flex splits its
/// sums differently. 5e-5 bounds that with room and is still far below a
/// dropped or double-counted chunk, which is off by O(1). The reported loss
/// is the data loss, the plain step's, not the penalized objective. Chunks
/// of one micro-batch (M = 2, `--chunk 4` rounded up to 6), and of two
/// micro-batches then one (M = 3, `--chunk 8`), whose last chunk's group
/// gradients come at another scale than the first's.
#[test]
fn chunked_passes_give_the_same_penalized_step_and_the_loss_stays_the_data_loss() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 7);
    let mut plain = NoiseStage::new(NoiseConfig::none(), n, 0).unwrap();
    let (_, plain_loss, _) = step_grads(&mut plain, &model, &batch, mlp_forward);
    for (reg, chunk) in [
        (Regularizer::grad_norm(0.5, 2), 4),
        (Regularizer::fisher_trace(0.5, 2), 4),
        (Regularizer::grad_norm(0.5, 3), 8),
        (Regularizer::fisher_trace(0.5, 3), 8),
    ] {
        let run = |chunk: Option<usize>| {
            let mut stage = NoiseStage::new(NoiseConfig::none(), n, 0)
                .unwrap()
                .with_regularizer(reg)
                .unwrap()
                .with_chunk(chunk);
            step_grads(&mut stage, &model, &batch, mlp_forward)
        };
        let (whole, loss, value) = run(None);
        let (chunked, chunked_loss, chunked_value) = run(Some(chunk));
        let diff: Vec<f64> = whole.iter().zip(&chunked).map(|(a, b)| a - b).collect();
        assert!(
            norm(&diff) <= 5e-5 * norm(&whole),
            "{reg:?}: {}",
            norm(&diff) / norm(&whole)
        );
        assert!((loss - chunked_loss).abs() <= 1e-6 * loss);
        assert!((value.unwrap() - chunked_value.unwrap()).abs() <= 1e-5 * value.unwrap());
        assert!(
            (loss - plain_loss).abs() <= 1e-6 * plain_loss,
            "{reg:?}: loss {loss} vs the plain step's {plain_loss}"
        );
    }
}

/// The MLP with its layers called plain, not through the probes: no
/// parameter has a rule, so the penalties and the micro-batch estimator run
/// one pass per micro-batch.
fn unprobed_forward(m: &Mlp, b: &Labeled, _: &mut Probes) -> Objective {
    let h = activation::tanh(m.a.forward(b.x.clone()));
    Objective::Classification {
        logits: m.b.forward(h),
        labels: b.labels.clone(),
    }
}

/// Where the rules cover every parameter, the penalties' micro-batch
/// gradients at theta (data labels, and sampled labels for the
/// Fisher-trace penalty) come from one pass over the whole batch; without
/// rules, from one pass per micro-batch. The two give the same step, the
/// same penalty value and the same data loss, also with micro-batch noise
/// on top (the same seed draws the same noise), to float32 rounding of
/// the passes (1e-4 relative, as above; the forward difference divides
/// rounding of about 1e-7 by r = 1e-2, 1e-5). A micro-batch gradient
/// taken from the wrong group, or sampled labels not the per-micro-batch
/// path's, moves the penalty by O(1). With the fast kernels on and off:
/// the group gradients' norms and weighted sums have a kernel and burn's
/// ops (other backends) beside it.
#[test]
fn penalties_from_one_pass_equal_one_pass_per_micro_batch() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 7);
    let configs = [
        NoiseConfig::none(),
        NoiseConfig::diag_fisher(4).with_estimator(covnoise::moments::Estimator::microbatch(3)),
    ];
    for (config, fast) in configs.iter().flat_map(|c| [(c, true), (c, false)]) {
        for reg in [
            Regularizer::grad_norm(0.5, 4),
            Regularizer::fisher_trace(0.5, 3),
        ] {
            let run = |probed: bool| {
                let mut stage = NoiseStage::new(config.clone(), n, 6)
                    .unwrap()
                    .with_regularizer(reg)
                    .unwrap();
                let mut out = Vec::new();
                covnoise::kernels::with_enabled(fast, || {
                    for _ in 0..2 {
                        out.push(if probed {
                            step_grads(&mut stage, &model, &batch, mlp_forward)
                        } else {
                            step_grads(&mut stage, &model, &batch, unprobed_forward)
                        });
                    }
                });
                out
            };
            for ((a, la, pa), (b, lb, pb)) in run(true).into_iter().zip(run(false)) {
                let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                let rel = norm(&diff) / norm(&b);
                assert!(rel <= 1e-4, "{reg:?} (fast {fast}): steps differ by {rel}");
                assert!((la - lb).abs() <= 1e-5 * lb.abs(), "losses {la} and {lb}");
                let (pa, pb) = (pa.unwrap(), pb.unwrap());
                assert!(
                    (pa - pb).abs() <= 1e-4 * pb.abs(),
                    "penalties {pa} and {pb}"
                );
            }
        }
    }
}

/// When a noise estimator makes the step's gradient, the Fisher-trace
/// penalty's pass at theta with the data labels is only needed for its
/// logits (the labels it samples), and runs as a forward pass alone. The
/// penalty must be the one it is when its passes also make the step's
/// gradient: the same labels, so the same value, to float32 rounding (a
/// forward pass alone and one followed by backward compute the same
/// logits; 1e-5 relative). Labels drawn from other logits, or for other
/// examples, change the value by O(1); checked on the one-pass path
/// (probed MLP) and on one pass per micro-batch (unprobed).
#[test]
fn fisher_trace_penalty_is_the_same_when_noise_makes_the_step_gradient() {
    let n = 12;
    let (model, batch) = mlp_and_batch(n, 9);
    let reg = Regularizer::fisher_trace(0.5, 3);
    let penalty = |config: NoiseConfig, probed: bool| {
        let mut stage = NoiseStage::new(config, n, 4)
            .unwrap()
            .with_regularizer(reg)
            .unwrap();
        let (_, _, p) = if probed {
            step_grads(&mut stage, &model, &batch, mlp_forward)
        } else {
            step_grads(&mut stage, &model, &batch, unprobed_forward)
        };
        p.unwrap()
    };
    let noisy =
        NoiseConfig::diag_fisher(4).with_estimator(covnoise::moments::Estimator::microbatch(3));
    for probed in [true, false] {
        let (with_data, logits_only) = (
            penalty(NoiseConfig::none(), probed),
            penalty(noisy.clone(), probed),
        );
        assert!(
            (with_data - logits_only).abs() <= 1e-5 * with_data.abs(),
            "probed {probed}: {with_data} with the data pass, {logits_only} from logits alone"
        );
    }
}
