//! The exact and Monte-Carlo Fisher estimates of convolutions whose
//! output gradient and per-example squares come out of the fast kernel's
//! backward step (the same per-example products that make the batch
//! weight gradient; no probe tensor), against
//! single-example backward passes and against the rule's own chunked path
//! (burn's ops, fast kernels off), on each of the kernel's code paths: the
//! unfolded (im2col) product with stride and padding, the per-tap products
//! (stride 1, eight or more input channels) and the pointwise 1x1 product.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Distribution, Tensor, activation};
use covnoise::collective::SingleProcess;
use covnoise::kernels::{self, ConvSink};
use covnoise::model::{Batch, Coupling, Examples, Forward, Objective, Probes, labels_tensor};
use covnoise::moments::{
    self, Estimator, MicroBatchPasses, MomentKind, PassRequest, SecondMoment, StepContext,
    backward_pass,
};
use covnoise::params::ParamTable;
use covnoise::tensor_util::to_vec;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{flat, per_example};

const CLASSES: usize = 4;

fn device() -> Device {
    Device::flex().autodiff()
}

/// One convolution of a given geometry, ReLU, and a Linear head.
#[derive(Module, Debug)]
struct ConvNet {
    conv: Conv2d,
    head: Linear,
}

/// A geometry: input channels and side, output channels, kernel, stride,
/// padding, bias, and which kernel path it takes.
struct Geometry {
    c_in: usize,
    side: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    path: &'static str,
}

const GEOMETRIES: [Geometry; 4] = [
    Geometry {
        c_in: 3,
        side: 17,
        c_out: 5,
        kernel: 3,
        stride: 2,
        padding: 1,
        bias: true,
        path: "im2col, stride 2",
    },
    Geometry {
        c_in: 2,
        side: 12,
        c_out: 4,
        kernel: 5,
        stride: 1,
        padding: 0,
        bias: true,
        path: "im2col, stride 1",
    },
    Geometry {
        c_in: 8,
        side: 8,
        c_out: 6,
        kernel: 3,
        stride: 1,
        padding: 1,
        bias: false,
        path: "taps",
    },
    Geometry {
        c_in: 4,
        side: 8,
        c_out: 3,
        kernel: 1,
        stride: 1,
        padding: 0,
        bias: true,
        path: "pointwise",
    },
];

impl Geometry {
    fn output_side(&self) -> usize {
        (self.side + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn model(&self, device: &Device) -> ConvNet {
        let conv = Conv2dConfig::new([self.c_in, self.c_out], [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(
                self.padding,
                self.padding,
                self.padding,
                self.padding,
            ))
            .with_bias(self.bias)
            .init(device);
        let o = self.output_side();
        let head = LinearConfig::new(self.c_out * o * o, CLASSES).init(device);
        ConvNet { conv, head }
    }

    fn batch(&self, n: usize, seed: u64, device: &Device) -> Batch<4> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..CLASSES as u8)).collect();
        let x = Tensor::<4>::random(
            [n, self.c_in, self.side, self.side],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        Batch {
            x,
            labels: labels_tensor(&labels, device),
        }
    }
}

fn forward(m: &ConvNet, b: &Batch<4>, p: &mut Probes) -> Objective {
    let h = activation::relu(p.conv2d(&m.conv, b.x.clone()));
    Objective::Classification {
        logits: p.linear(&m.head, h.flatten(1, 3)),
        labels: b.labels.clone(),
    }
}

/// `Σ_i g_i²` per coordinate from single-example passes, in table order.
fn brute_force_squares<M: Module, F: Forward<M, Batch<4>>>(
    model: &M,
    batch: &Batch<4>,
    forward: &F,
) -> Vec<f64> {
    let per = per_example(model, batch, forward);
    (0..per[0].len())
        .map(|j| per.iter().map(|g| g[j] * g[j]).sum())
        .collect()
}

/// Largest error over the coordinates, relative to the largest reference.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale.max(1e-30)
}

/// The exact estimator's `Σ_i g_i²` of one pass through the probes.
fn diag_sums<M: Module, F: Forward<M, Batch<4>>>(
    model: &M,
    batch: &Batch<4>,
    forward: &F,
) -> Vec<f64> {
    let table = ParamTable::of(model);
    let pass = backward_pass(
        model,
        &table,
        batch,
        forward,
        PassRequest {
            moments: Some(MomentKind::Diag),
            ..Default::default()
        },
    )
    .unwrap();
    let Some(SecondMoment::Diag(d)) = pass.moment_sums else {
        panic!("a diagonal")
    };
    flat(&d)
}

/// The fast kernel's backward step fills its sink, on every path: the
/// output gradient, and sums that are the squares of single-example weight and bias gradients
/// (computed here with burn's own convolution, one example at a time).
/// A backward step that skipped the squares, or that squared per position
/// or over the batch, fails: the latter differ from the reference by far
/// more than float32 rounding (~1e-6 relative over tens of examples).
#[test]
fn the_kernel_leaves_per_example_squares_in_its_sink() {
    let device = device();
    for g in &GEOMETRIES {
        let model = g.model(&device);
        let n = 7;
        let x = g.batch(n, 11, &device).x;
        let options = burn::tensor::ops::ConvOptions::new(
            [g.stride, g.stride],
            [g.padding, g.padding],
            [1, 1],
            1,
        );
        assert!(
            kernels::conv2d_is_fast(
                &x,
                &model.conv.weight.val(),
                model.conv.bias.as_ref().map(|b| b.val()).as_ref(),
                &options
            ),
            "{}: the fast kernel must apply",
            g.path
        );
        // A fixed output gradient: the objective sum(y * r).
        let o = g.output_side();
        let r = Tensor::<4>::random([n, g.c_out, o, o], Distribution::Normal(0.0, 1.0), &device);
        let sink = ConvSink::new();
        let y = kernels::conv2d_recording(
            x.clone(),
            model.conv.weight.val(),
            model.conv.bias.as_ref().map(|b| b.val()),
            options.clone(),
            Some(sink.clone()),
        );
        assert!(
            sink.squares().is_none(),
            "{}: filled before backward",
            g.path
        );
        assert!(sink.output_grad(&x).is_none(), "{}", g.path);
        let grads = (y * r.clone()).sum().backward();
        let squares = sink.squares().expect("the backward step fills the sink");
        // The output gradient of sum(y * r) is r itself, exactly.
        let dy = sink
            .output_grad(&x)
            .expect("and leaves its output gradient");
        assert_eq!(dy.dims(), r.dims(), "{}", g.path);
        assert_eq!(
            to_vec(&dy).unwrap(),
            to_vec(&r.clone().inner()).unwrap(),
            "{}: output gradient",
            g.path
        );
        let mut reference_w = vec![0.0f64; squares.weight.len()];
        let mut reference_b = vec![0.0f64; squares.bias.len()];
        for i in 0..n {
            let xi = x.clone().narrow(0, i, 1).detach();
            let w = model.conv.weight.val().detach().require_grad();
            let b = model
                .conv
                .bias
                .as_ref()
                .map(|b| b.val().detach().require_grad());
            let yi = burn::tensor::module::conv2d(xi, w.clone(), b.clone(), options.clone());
            let gi = (yi * r.clone().narrow(0, i, 1)).sum().backward();
            for (acc, v) in reference_w
                .iter_mut()
                .zip(to_vec(&w.grad(&gi).unwrap()).unwrap())
            {
                *acc += (v as f64).powi(2);
            }
            if let Some(b) = b {
                for (acc, v) in reference_b
                    .iter_mut()
                    .zip(to_vec(&b.grad(&gi).unwrap()).unwrap())
                {
                    *acc += (v as f64).powi(2);
                }
            }
        }
        let got = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let err = rel_err(&got(&squares.weight), &reference_w);
        assert!(err <= 1e-4, "{}: weight squares off by {err}", g.path);
        assert_eq!(squares.bias.is_empty(), !g.bias, "{}", g.path);
        if g.bias {
            let err = rel_err(&got(&squares.bias), &reference_b);
            assert!(err <= 1e-4, "{}: bias squares off by {err}", g.path);
        }
        // The batch gradients, formed here as the sum of the examples' on
        // the way to their squares, equal burn's own convolution's: float32
        // sums in another order, ~1e-6 relative.
        let reference = |w: &Tensor<4>, b: Option<&Tensor<1>>| {
            let w = w.clone().detach().require_grad();
            let b = b.map(|b| b.clone().detach().require_grad());
            let y = burn::tensor::module::conv2d(x.clone(), w.clone(), b.clone(), options.clone());
            let gr = (y * r.clone()).sum().backward();
            (w.grad(&gr).unwrap(), b.map(|b| b.grad(&gr).unwrap()))
        };
        let (w_ref, b_ref) = reference(
            &model.conv.weight.val(),
            model.conv.bias.as_ref().map(|b| b.val()).as_ref(),
        );
        let as_f64 =
            |t: Tensor<1>| -> Vec<f64> { to_vec(&t).unwrap().into_iter().map(f64::from).collect() };
        let w_got = model
            .conv
            .weight
            .val()
            .grad(&grads)
            .expect("a weight gradient");
        let err = rel_err(&as_f64(w_got.flatten(0, 3)), &as_f64(w_ref.flatten(0, 3)));
        assert!(err <= 1e-5, "{}: weight gradient off by {err}", g.path);
        if let (Some(bias), Some(b_ref)) = (&model.conv.bias, b_ref) {
            let b_got = bias.val().grad(&grads).expect("a bias gradient");
            let err = rel_err(&as_f64(b_got), &as_f64(b_ref));
            assert!(err <= 1e-5, "{}: bias gradient off by {err}", g.path);
        }
    }
}

/// The exact estimator's sums (through the probes, with the kernel's
/// squares) against single-example passes, and against the same estimator
/// with the fast kernels off (the rule's per-example path on burn's ops).
/// float32 sums over 9 examples and up to a few hundred positions round at
/// about 1e-6 relative; a squared-per-position or missing term is off by
/// tens of percent: 1e-4 separates the two.
#[test]
fn exact_sums_from_the_kernel_match_single_example_passes_and_the_rule_path() {
    let device = device();
    for (k, g) in GEOMETRIES.iter().enumerate() {
        let model = g.model(&device);
        let batch = g.batch(9, 20 + k as u64, &device);
        let reference = brute_force_squares(&model, &batch, &forward);
        let fast = diag_sums(&model, &batch, &forward);
        let err = rel_err(&fast, &reference);
        assert!(err <= 1e-4, "{}: kernel sums off by {err}", g.path);
        let rule = kernels::with_enabled(false, || diag_sums(&model, &batch, &forward));
        let err = rel_err(&fast, &rule);
        assert!(err <= 1e-4, "{}: kernel vs rule path {err}", g.path);
    }
}

/// The Monte-Carlo Fisher's second pass runs on a frozen copy of the model
/// (no weight gradients), where the kernel still leaves its squares: the
/// estimate equals single-example passes on the labels it sampled
/// (reproduced with `mc_fisher_labels`), at two steps. Tolerance as above.
#[test]
fn monte_carlo_fisher_from_the_kernel_matches_single_example_passes() {
    let device = device();
    for (k, g) in GEOMETRIES.iter().enumerate() {
        let model = g.model(&device);
        let batch = g.batch(8, 40 + k as u64, &device);
        let table = ParamTable::of(&model);
        for step in [0u64, 5] {
            let ctx = StepContext {
                seed: 9,
                step,
                collective: &SingleProcess,
                table: &table,
                coupling: Coupling::Independent,
                chunk: None,
            };
            let out = moments::estimate(
                &model,
                &batch,
                &forward,
                Estimator::McFisher,
                MomentKind::Diag,
                &ctx,
            )
            .unwrap();
            let Some(SecondMoment::Diag(d)) = out.moment else {
                panic!("a diagonal")
            };
            let estimate = flat(&d);
            let logits = model
                .head
                .forward(
                    activation::relu(kernels::conv2d_layer(&model.conv, batch.x.clone()))
                        .flatten(1, 3),
                )
                .detach()
                .inner();
            let labels = moments::mc_fisher_labels(&logits, 9, step, 0).unwrap();
            let sampled = Batch {
                x: batch.x.clone(),
                labels: labels_tensor(&labels, &device),
            };
            let n = batch.len() as f64;
            let reference: Vec<f64> = brute_force_squares(&model, &sampled, &forward)
                .iter()
                .map(|v| v / n)
                .collect();
            let err = rel_err(&estimate, &reference);
            assert!(err <= 1e-4, "{} step {step}: off by {err}", g.path);
        }
    }
}

/// A frozen first convolution (fine-tuning) and a trained one after it.
#[derive(Module, Debug)]
struct FrozenFirst {
    frozen: Conv2d,
    conv: Conv2d,
    head: Linear,
}

fn frozen_forward(m: &FrozenFirst, b: &Batch<4>, p: &mut Probes) -> Objective {
    let h = activation::relu(p.conv2d(&m.frozen, b.x.clone()));
    let h = activation::relu(p.conv2d(&m.conv, h));
    Objective::Classification {
        logits: p.linear(&m.head, h.flatten(1, 3)),
        labels: b.labels.clone(),
    }
}

/// A frozen first convolution runs no backward step (none of its operands
/// takes a gradient), so its sink stays empty: the estimators skip it, as
/// its parameters take no noise, and the trained layers' sums still equal
/// single-example passes (tolerance as above).
#[test]
fn a_frozen_first_convolution_is_skipped_and_the_rest_is_exact() {
    let device = device();
    let pad = PaddingConfig2d::Explicit(1, 1, 1, 1);
    let model = FrozenFirst {
        frozen: Conv2dConfig::new([3, 4], [3, 3])
            .with_padding(pad.clone())
            .init(&device)
            .no_grad(),
        conv: Conv2dConfig::new([4, 5], [3, 3])
            .with_padding(pad)
            .init(&device),
        head: LinearConfig::new(5 * 10 * 10, CLASSES).init(&device),
    };
    let table = ParamTable::of(&model);
    assert_eq!(
        table.len(),
        4,
        "the frozen layer's weight and bias are not in the table"
    );
    let geometry = Geometry {
        c_in: 3,
        side: 10,
        ..GEOMETRIES[0]
    };
    let batch = geometry.batch(6, 70, &device);
    let reference = brute_force_squares(&model, &batch, &frozen_forward);
    let sums = diag_sums(&model, &batch, &frozen_forward);
    let err = rel_err(&sums, &reference);
    assert!(err <= 1e-4, "off by {err}");
}

/// Group means of single-example gradients, `[groups][numel]`: the
/// reference micro-batch gradients.
fn brute_force_groups<M: Module, F: Forward<M, Batch<4>>>(
    model: &M,
    batch: &Batch<4>,
    forward: &F,
    group_size: usize,
) -> Vec<Vec<f64>> {
    let per = per_example(model, batch, forward);
    per.chunks(group_size)
        .map(|group| {
            (0..group[0].len())
                .map(|j| group.iter().map(|g| g[j]).sum::<f64>() / group_size as f64)
                .collect()
        })
        .collect()
}

/// The group gradients of one pass ([`PassRequest::group_size`]), row by
/// row, `[groups][numel]` in table order.
fn pass_groups<M: Module, F: Forward<M, Batch<4>>>(
    model: &M,
    batch: &Batch<4>,
    forward: &F,
    group_size: usize,
    chunk: Option<usize>,
) -> Vec<Vec<f64>> {
    let table = ParamTable::of(model);
    let pass = backward_pass(
        model,
        &table,
        batch,
        forward,
        PassRequest {
            group_size: Some(group_size),
            chunk,
            ..Default::default()
        },
    )
    .unwrap();
    let groups = pass.group_grads.expect("group gradients were asked for");
    assert_eq!(groups.groups(), batch.len() / group_size);
    (0..groups.groups())
        .map(|g| flat(&groups.group(g)))
        .collect()
}

/// Micro-batch gradients from one pass over the whole batch (the fast
/// kernel adding each example's gradient to its group's sum; the Linear
/// head's batched group product) against the means of single-example
/// gradients over each group, on every kernel path, with the fast kernels
/// off (the rule's chunked per-example path), with groups of 3 and 4 out
/// of 12 (a group of 4 straddles the two threads' halves of the batch) and
/// in chunks of two groups. Tolerance as above (float32 sums of a few
/// terms, about 1e-6); a gradient added to the wrong group, or a group
/// counted twice where two tasks share it, is off by tens of percent.
#[test]
fn group_gradients_from_one_pass_match_single_example_passes() {
    let device = device();
    for (k, g) in GEOMETRIES.iter().enumerate() {
        let model = g.model(&device);
        let batch = g.batch(12, 60 + k as u64, &device);
        for group_size in [3, 4] {
            let reference = brute_force_groups(&model, &batch, &forward, group_size);
            for (label, fast, chunk) in [
                ("fast kernels", true, None),
                ("fast kernels, chunked", true, Some(2 * group_size)),
                ("rule path", false, None),
            ] {
                let got = kernels::with_enabled(fast, || {
                    pass_groups(&model, &batch, &forward, group_size, chunk)
                });
                assert_eq!(got.len(), reference.len());
                for (j, (a, b)) in got.iter().zip(&reference).enumerate() {
                    let err = rel_err(a, b);
                    assert!(
                        err <= 1e-4,
                        "{}, {label}, groups of {group_size}, group {j}: off by {err}",
                        g.path
                    );
                }
            }
        }
    }
}

/// The micro-batch estimator from one pass (rules covering every
/// parameter) equals the estimator with one pass per micro-batch: the same
/// step gradient and the same centered second moment, to float32 rounding
/// of sums over a dozen examples (1e-4 relative; a mis-scaled group or a
/// moment about the wrong mean is off by O(1)).
#[test]
fn the_micro_batch_estimator_from_one_pass_equals_one_pass_per_micro_batch() {
    let device = device();
    for (k, g) in GEOMETRIES.iter().enumerate() {
        let model = g.model(&device);
        let batch = g.batch(12, 80 + k as u64, &device);
        let table = ParamTable::of(&model);
        let run = |passes: MicroBatchPasses, kind: MomentKind| {
            let ctx = StepContext {
                seed: 3,
                step: 0,
                collective: &SingleProcess,
                table: &table,
                coupling: Coupling::Independent,
                chunk: None,
            };
            moments::estimate_with(
                &model,
                &batch,
                &forward,
                Estimator::microbatch(4),
                kind,
                passes,
                &ctx,
            )
            .unwrap()
        };
        let (one_pass, each_pass) = (
            MicroBatchPasses::OneThroughRules,
            MicroBatchPasses::PerMicroBatch,
        );
        let (one, each) = (
            run(one_pass, MomentKind::Diag),
            run(each_pass, MomentKind::Diag),
        );
        let err = rel_err(&flat(&one.grads), &flat(&each.grads));
        assert!(err <= 1e-4, "{}: step gradients differ by {err}", g.path);
        assert!((one.loss - each.loss).abs() <= 1e-5 * each.loss.abs());
        let (Some(SecondMoment::Diag(a)), Some(SecondMoment::Diag(b))) = (one.moment, each.moment)
        else {
            panic!("diagonals")
        };
        let err = rel_err(&flat(&a), &flat(&b));
        assert!(err <= 1e-4, "{}: moments differ by {err}", g.path);
        let (Some(SecondMoment::Trace(a)), Some(SecondMoment::Trace(b))) = (
            run(one_pass, MomentKind::Trace).moment,
            run(each_pass, MomentKind::Trace).moment,
        ) else {
            panic!("traces")
        };
        assert!(
            (a - b).abs() <= 1e-4 * b.abs(),
            "{}: traces {a} and {b}",
            g.path
        );
    }
}

/// A 1x1 convolution before a geometry's net, so that the geometry's
/// convolution passes its input gradient back to a parameter.
#[derive(Module, Debug)]
struct Preceded {
    pre: Conv2d,
    net: ConvNet,
}

fn preceded_forward(m: &Preceded, b: &Batch<4>, p: &mut Probes) -> Objective {
    let x = activation::tanh(p.conv2d(&m.pre, b.x.clone()));
    forward(
        &m.net,
        &Batch {
            x,
            labels: b.labels.clone(),
        },
        p,
    )
}

/// A pass in which each micro-batch runs at parameters of its own (the
/// penalties' moved passes; on the fast kernel a weight per group of
/// examples in the forward product and in the input gradient, with burn's
/// op once per group where the kernel is off) against one plain pass per
/// micro-batch on a moved copy of the model, on every kernel path, the
/// convolution's input gradient reaching a 1x1 convolution before it (see
/// `common::shifted_pass_against_per_group_passes` for the tolerance:
/// float32 sums in other orders, about 1e-6; a group at the wrong
/// parameters is off by about 10 %).
#[test]
fn shifted_passes_match_one_pass_per_micro_batch_on_every_kernel_path() {
    let device = device();
    for (i, g) in GEOMETRIES.iter().enumerate() {
        let model = Preceded {
            pre: Conv2dConfig::new([g.c_in, g.c_in], [1, 1]).init(&device),
            net: g.model(&device),
        };
        let batch = g.batch(12, 40 + i as u64, &device);
        for fast in [true, false] {
            let (whole, chunked) = kernels::with_enabled(fast, || {
                common::shifted_pass_against_per_group_passes(
                    &model,
                    &batch,
                    &preceded_forward,
                    3,
                    7,
                )
            });
            assert!(
                whole <= 1e-4 && chunked <= 1e-4,
                "{} (fast {fast}): relative errors {whole} and {chunked}",
                g.path
            );
        }
    }
}

/// A convolution, ghost batch norm over groups of 2, ReLU and a Linear
/// head: on images the batch norm runs on the fast kernel, whose backward
/// step leaves its scale's and shift's sums per ghost batch.
#[derive(Module, Debug)]
struct GhostNet {
    conv: Conv2d,
    bn: covnoise::model::GhostBatchNorm,
    head: Linear,
}

fn ghost_net(device: &Device, group: usize) -> GhostNet {
    let mut bn = covnoise::model::GhostBatchNorm::new(4, group, device);
    // Scale and shift away from 1 and 0, so that the ReLU does not keep
    // exactly the positive x̂ and the rules' errors cannot hide.
    let values = |base: f32| {
        let v: Vec<f32> = (0..4).map(|i| base + 0.2 * i as f32).collect();
        burn::module::Param::from_tensor(Tensor::from_data(
            burn::tensor::TensorData::new(v, [4]),
            device,
        ))
    };
    bn.gamma = values(0.7);
    bn.beta = values(-0.2);
    GhostNet {
        conv: Conv2dConfig::new([2, 4], [3, 3]).init(device),
        bn,
        head: LinearConfig::new(4 * 6 * 6, CLASSES).init(device),
    }
}

fn ghost_forward(m: &GhostNet, b: &Batch<4>, p: &mut Probes) -> Objective {
    let z = p.conv2d(&m.conv, b.x.clone());
    let h = activation::relu(p.batch_norm(&m.bn, z));
    let n = h.dims()[0];
    Objective::Classification {
        logits: p.linear(&m.head, h.reshape([n, 4 * 6 * 6])),
        labels: b.labels.clone(),
    }
}

/// With ghost batch norm (groups of 2) and batch norm over the whole batch
/// (which a pass standing for one pass per micro-batch applies to each
/// micro-batch alone), on the fast kernels (its sums per normalization
/// group from the kernel's backward step) and on burn's ops (x̂
/// recorded): the gradients of micro-batches of 2 and 4 from one pass,
/// whole and chunked, against one plain pass per micro-batch; and a pass
/// with each micro-batch at parameters of its own against one pass per
/// micro-batch at its moved parameters. 1e-4 relative (float32 sums in
/// other orders, about 1e-6; a ghost batch's sums in the wrong micro-batch,
/// or the shift's sum taken for the scale's, is off by tens of percent).
#[test]
fn ghost_batch_norm_on_images_gives_micro_batch_gradients_from_one_pass() {
    let device = device();
    let mut rng = ChaCha8Rng::seed_from_u64(61);
    let labels: Vec<u8> = (0..16)
        .map(|_| rng.random_range(0..CLASSES as u8))
        .collect();
    let x: Vec<f32> = (0..16 * 2 * 8 * 8)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let batch = Batch {
        x: Tensor::from_data(burn::tensor::TensorData::new(x, [16, 2, 8, 8]), &device),
        labels: labels_tensor(&labels, &device),
    };
    for (fast, group) in [(true, 2), (false, 2), (true, 0), (false, 0)] {
        let model = ghost_net(&device, group);
        let table = ParamTable::of(&model);
        kernels::with_enabled(fast, || {
            for b in [2, 4] {
                for chunk in [None, Some(8)] {
                    let request = PassRequest {
                        group_size: Some(b),
                        chunk,
                        ..Default::default()
                    };
                    let groups = backward_pass(&model, &table, &batch, &ghost_forward, request)
                        .unwrap()
                        .group_grads
                        .unwrap();
                    for j in 0..16 / b {
                        let part = batch.slice(j * b, b);
                        let reference = backward_pass(
                            &model,
                            &table,
                            &part,
                            &ghost_forward,
                            PassRequest::default(),
                        )
                        .unwrap();
                        let rel =
                            common::rel_distance(&flat(&groups.group(j)), &flat(&reference.grads));
                        assert!(
                            rel <= 1e-4,
                            "fast {fast}, norm group {group}, b {b}, chunk {chunk:?}, group {j}: {rel}"
                        );
                    }
                }
            }
            let (whole, chunked) =
                common::shifted_pass_against_per_group_passes(&model, &batch, &ghost_forward, 4, 9);
            assert!(
                whole <= 1e-4 && chunked <= 1e-4,
                "fast {fast}, norm group {group}: shifted passes off by {whole} and {chunked}"
            );
        });
    }
}

/// Ghost batch norm straight on the input images, then a convolution: in
/// the one-pass group pass (a frozen copy of the model) nothing before the
/// batch norm takes a gradient, and its kernel's backward step must still
/// run to leave its sums. Against one plain pass per micro-batch, 1e-4 as
/// above.
#[derive(Module, Debug)]
struct NormFirst {
    bn: covnoise::model::GhostBatchNorm,
    net: ConvNet,
}

fn norm_first_forward(m: &NormFirst, b: &Batch<4>, p: &mut Probes) -> Objective {
    let x = p.batch_norm(&m.bn, b.x.clone());
    forward(
        &m.net,
        &Batch {
            x,
            labels: b.labels.clone(),
        },
        p,
    )
}

#[test]
fn a_batch_norm_on_the_inputs_gives_its_micro_batch_gradients_from_one_pass() {
    let device = device();
    let g = &GEOMETRIES[0];
    let model = NormFirst {
        bn: covnoise::model::GhostBatchNorm::new(g.c_in, 2, &device),
        net: g.model(&device),
    };
    let table = ParamTable::of(&model);
    let batch = g.batch(8, 71, &device);
    let request = PassRequest {
        group_size: Some(4),
        ..Default::default()
    };
    let groups = backward_pass(&model, &table, &batch, &norm_first_forward, request)
        .unwrap()
        .group_grads
        .unwrap();
    for j in 0..2 {
        let reference = backward_pass(
            &model,
            &table,
            &batch.slice(j * 4, 4),
            &norm_first_forward,
            PassRequest::default(),
        )
        .unwrap();
        let rel = common::rel_distance(&flat(&groups.group(j)), &flat(&reference.grads));
        assert!(rel <= 1e-4, "group {j}: {rel}");
    }
}
