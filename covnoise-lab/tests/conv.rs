//! Conv nets: the exact estimator on Conv2d layers against single-example
//! backward passes, the architectures' parameter counts against closed
//! forms and published counts, and batch normalization on images in
//! PyTorch's semantics.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use covnoise::collective::SingleProcess;
use covnoise::model::{
    Batch, Coupling, Examples, Forward, GhostBatchNorm, Objective, Probes, labels_tensor,
};
use covnoise::moments::{
    self, Estimator, MomentKind, PassRequest, SecondMoment, StepContext, backward_pass,
};
use covnoise::params::ParamTable;
use covnoise::tensor_util::{from_vec, to_vec};
use covnoise_lab::zoo::init::{SeededInit, WeightInit};
use covnoise_lab::zoo::{Architecture, Network, NetworkConfig, Normalization};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn device() -> Device {
    Device::flex().autodiff()
}

/// Two conv layers that exercise what the unfolding must get right:
/// symmetric padding with stride 2, then burn's `Same` padding (asymmetric
/// for an even kernel) with dilation, then a Linear head.
#[derive(Module, Debug)]
struct TwoConv {
    conv1: Conv2d,
    conv2: Conv2d,
    head: Linear,
}

impl TwoConv {
    fn new(channels: [usize; 3], seed: u64, positions: usize, classes: usize) -> Self {
        let mut init = SeededInit::new(seed, &device());
        let conv1 = init.conv(
            [channels[0], channels[1]],
            3,
            2,
            1,
            true,
            WeightInit::Default,
        );
        let mut conv2 = init.conv(
            [channels[1], channels[2]],
            2,
            1,
            0,
            false,
            WeightInit::Default,
        );
        conv2.padding = PaddingConfig2d::Same;
        conv2.dilation = [2, 1];
        let head = init.linear(channels[2] * positions, classes, WeightInit::Default);
        Self { conv1, conv2, head }
    }

    fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        let h = burn::tensor::activation::relu(probes.conv2d(&self.conv1, x));
        let h = burn::tensor::activation::tanh(probes.conv2d(&self.conv2, h));
        probes.linear(&self.head, h.flatten(1, 3))
    }
}

fn image_batch(b: usize, shape: [usize; 3], classes: usize, seed: u64) -> Batch<4> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product::<usize>();
    let x: Vec<f32> = (0..b * n).map(|_| rng.random_range(-2.0..2.0)).collect();
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..classes) as u8).collect();
    Batch {
        x: from_vec(x, [b, shape[0], shape[1], shape[2]], &device()),
        labels: labels_tensor(&labels, &device()),
    }
}

fn flat(tensors: &[Tensor<1>]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| to_vec(t).unwrap())
        .map(f64::from)
        .collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-60)).sqrt()
}

fn ctx(table: &ParamTable) -> StepContext<'_> {
    StepContext {
        seed: 1,
        step: 0,
        collective: &SingleProcess,
        table,
        coupling: Coupling::Independent,
        chunk: None,
    }
}

/// `sum_i (grad l_i)^2 / B` from one backward pass per example, per
/// parameter, and the exact estimator's diagonal and trace on the batch.
fn compare_exact<M: Module, F>(model: &M, batch: &Batch<4>, forward: F)
where
    F: Forward<M, Batch<4>>,
{
    let table = ParamTable::of(model);
    let b = batch.len();
    let per: Vec<Vec<f64>> = (0..b)
        .map(|i| {
            let one = batch.slice(i, 1);
            flat(
                &backward_pass(model, &table, &one, &forward, PassRequest::default())
                    .unwrap()
                    .grads,
            )
        })
        .collect();
    let reference: Vec<f64> = (0..per[0].len())
        .map(|j| per.iter().map(|g| g[j] * g[j]).sum::<f64>() / b as f64)
        .collect();
    let out = moments::estimate(
        model,
        batch,
        &forward,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(&table),
    )
    .unwrap();
    let SecondMoment::Diag(d) = out.moment.unwrap() else {
        panic!("a diagonal")
    };
    // float32 sums of a few hundred products: rounding is ~1e-6 relative, so
    // 1e-4 per parameter catches any wrong factor, order or position sum.
    let mut start = 0;
    for (e, t) in table.entries().iter().zip(&d) {
        let est = flat(std::slice::from_ref(t));
        let r = &reference[start..start + e.numel()];
        let err = rel_err(&est, r);
        assert!(err <= 1e-4, "{}: relative error {err}", e.name);
        start += e.numel();
    }
    let trace = moments::estimate(
        model,
        batch,
        &forward,
        Estimator::Exact,
        MomentKind::Trace,
        &ctx(&table),
    )
    .unwrap()
    .moment
    .unwrap()
    .trace();
    let trace_ref: f64 = reference.iter().sum();
    assert!(
        (trace - trace_ref).abs() <= 1e-4 * trace_ref,
        "trace {trace} vs {trace_ref}"
    );
}

#[test]
fn conv_exact_estimator_matches_single_example_backward_passes() {
    for (channels, side, b, seed) in [
        ([3usize, 5, 4], 9usize, 6usize, 1u64),
        ([1, 2, 7], 8, 5, 2),
        ([4, 8, 3], 7, 3, 3),
    ] {
        // conv1: stride 2, padding 1 -> ceil(side / 2) positions per axis;
        // conv2: burn's "same" padding ignores the dilation, so the dilated
        // axis loses one position.
        let s = side.div_ceil(2);
        let model = TwoConv::new(channels, seed, (s - 1) * s, 4);
        let batch = image_batch(b, [channels[0], side, side], 4, seed + 10);
        compare_exact(&model, &batch, |m: &TwoConv, b: &Batch<4>, p| {
            Objective::Classification {
                logits: m.forward(b.x.clone(), p),
                labels: b.labels.clone(),
            }
        });
    }
}

fn network(architecture: Architecture, input: [usize; 3], normalization: Normalization) -> Network {
    let config = NetworkConfig {
        architecture,
        input,
        classes: 10,
        hidden: vec![],
        normalization,
        layers: Vec::new(),
    };
    Network::new(&config, 0, &device()).unwrap()
}

fn objective(m: &Network, b: &Batch<4>, p: &mut Probes) -> Objective {
    m.objective(b.x.clone(), b.labels.clone(), p)
}

#[test]
fn lenet5_exact_estimator_matches_single_example_backward_passes() {
    let model = network(Architecture::LeNet5, [1, 28, 28], Normalization::None);
    compare_exact(&model, &image_batch(4, [1, 28, 28], 10, 7), objective);
}

/// Parameters of a 3x3 conv (no bias) + batch norm, `i -> o` channels.
/// A net described on the command line (`--model sequential --layers`):
/// Wu et al.'s Fashion-MNIST net, with average pooling and tanh in place of
/// one max-pool and ReLU so that every kind of item is covered. Its
/// 11,330-parameter original is counted in the zoo's unit tests.
#[test]
fn sequential_exact_estimator_matches_single_example_backward_passes() {
    use covnoise_lab::zoo::parse_layers;
    let layers = parse_layers(
        "conv:10:5,maxpool:2,relu,conv:10:5:1:1,avgpool:2,tanh,flatten,linear:50,relu,linear:10",
    )
    .unwrap();
    let config = NetworkConfig {
        architecture: Architecture::Sequential,
        input: [1, 28, 28],
        classes: 10,
        hidden: vec![],
        normalization: Normalization::None,
        layers,
    };
    let model = Network::new(&config, 3, &device()).unwrap();
    compare_exact(&model, &image_batch(6, [1, 28, 28], 10, 4), objective);
}

fn conv_bn(i: usize, o: usize) -> usize {
    9 * i * o + 2 * o
}

#[test]
fn parameter_counts_match_closed_forms_and_published_counts() {
    // The model's own count, which the footprint (the memory estimate's
    // input, computed without building the model) must agree with.
    let count = |a: Architecture, input: [usize; 3], norm: Normalization| {
        let config = NetworkConfig {
            architecture: a,
            input,
            classes: 10,
            hidden: vec![],
            normalization: norm,
            layers: Vec::new(),
        };
        let n = Network::new(&config, 0, &device())
            .unwrap()
            .parameter_count();
        assert_eq!(config.footprint().0, n as u128, "{a} footprint");
        n
    };
    let bn = Normalization::BatchNorm;
    // LeNet-5: (25*1+1)*6 + (25*6+1)*16 + 401*120 + 121*84 + 85*10.
    let lenet = 26 * 6 + 151 * 16 + 401 * 120 + 121 * 84 + 85 * 10;
    assert_eq!(
        count(Architecture::LeNet5, [1, 28, 28], Normalization::None),
        lenet
    );
    assert_eq!(lenet, 61_706);
    // CIFAR ResNet-(6n+2), option A: stem, 3 stages of n blocks, Linear 64-10.
    let resnet = |n: usize| {
        let stage =
            |i: usize, o: usize| conv_bn(i, o) + conv_bn(o, o) + (n - 1) * 2 * conv_bn(o, o);
        conv_bn(3, 16) + stage(16, 16) + stage(16, 32) + stage(32, 64) + 64 * 10 + 10
    };
    for (a, n) in [
        (Architecture::ResNet20, 3),
        (Architecture::ResNet32, 5),
        (Architecture::ResNet44, 7),
        (Architecture::ResNet56, 9),
    ] {
        assert_eq!(count(a, [3, 32, 32], bn), resnet(n), "{a}");
    }
    // He et al. (2016), table 6: 0.27 M, 0.46 M, 0.66 M, 0.85 M.
    for (n, published) in [(3, 0.27), (5, 0.46), (7, 0.66), (9, 0.85)] {
        let m = resnet(n) as f64 / 1e6;
        assert!((m - published).abs() < 0.006, "ResNet-{}: {m} M", 6 * n + 2);
    }
    // VGG with batch norm: 3x3 convs with bias, then Linear 512-10.
    let vgg = |widths: &[usize]| {
        let mut c = 3;
        let mut total = 512 * 10 + 10;
        for &w in widths {
            total += conv_bn(c, w) + w;
            c = w;
        }
        total
    };
    let vgg11 = vgg(&[64, 128, 256, 256, 512, 512, 512, 512]);
    let vgg16 = vgg(&[
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
    ]);
    assert_eq!(count(Architecture::Vgg11, [3, 32, 32], bn), vgg11);
    assert_eq!(count(Architecture::Vgg16, [3, 32, 32], bn), vgg16);
}

#[test]
fn batch_norm_on_images_matches_pytorch_semantics() {
    // Brute force over a [4, 2, 3, 3] batch in ghost groups of 2: each
    // (group, channel) block of 2 x 9 values is normalized with its biased
    // variance; the running variance moves toward the unbiased one.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (b, c, s, group) = (4usize, 2usize, 3usize, 2usize);
    let x: Vec<f32> = (0..b * c * s * s)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let norm = GhostBatchNorm::new(c, group, &device());
    let out = to_vec(&norm.forward_images(from_vec(x.clone(), [b, c, s, s], &device()))).unwrap();
    let at = |i: usize, ch: usize, p: usize| (i * c + ch) * s * s + p;
    let n = (group * s * s) as f64;
    let mut unbiased_mean = vec![0.0; c];
    for g in 0..b / group {
        for (ch, unbiased) in unbiased_mean.iter_mut().enumerate() {
            let idx: Vec<usize> = (g * group..(g + 1) * group)
                .flat_map(|i| (0..s * s).map(move |p| at(i, ch, p)))
                .collect();
            let mean = idx.iter().map(|&k| f64::from(x[k])).sum::<f64>() / n;
            let var = idx
                .iter()
                .map(|&k| (f64::from(x[k]) - mean).powi(2))
                .sum::<f64>()
                / n;
            for &k in &idx {
                let want = (f64::from(x[k]) - mean) / (var + 1e-5).sqrt();
                assert!((f64::from(out[k]) - want).abs() < 1e-4, "normalized value");
            }
            *unbiased += var * n / (n - 1.0) / (b / group) as f64;
        }
    }
    let running = to_vec(&norm.running_var.value()).unwrap();
    for ch in 0..c {
        let want = 0.9 + 0.1 * unbiased_mean[ch];
        assert!(
            (f64::from(running[ch]) - want).abs() < 1e-5,
            "running variance {ch}"
        );
    }
}

#[test]
fn batch_norm_models_refuse_per_example_estimators_and_run_ghost_microbatches() {
    let model = network(
        Architecture::ResNet20,
        [3, 32, 32],
        Normalization::BatchNorm,
    );
    let table = ParamTable::of(&model);
    let batch = image_batch(8, [3, 32, 32], 10, 3);
    let whole = StepContext {
        coupling: Coupling::WholeBatch,
        ..ctx(&table)
    };
    let err = moments::estimate(
        &model,
        &batch,
        &objective,
        Estimator::Exact,
        MomentKind::Diag,
        &whole,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch normalization"), "{err}");
    // Ghost groups of 2, micro-batches of 4: each micro-batch gradient is
    // the gradient of that micro-batch alone (its groups are its own), so
    // the estimate equals the centered variance of separate passes.
    let ghost = network(
        Architecture::ResNet20,
        [3, 32, 32],
        Normalization::GhostBatchNorm(2),
    );
    let table = ParamTable::of(&ghost);
    let ctx = StepContext {
        coupling: Coupling::Groups(2),
        ..ctx(&table)
    };
    let out = moments::estimate(
        &ghost,
        &batch,
        &objective,
        Estimator::Microbatch { micro_batches: 2 },
        MomentKind::Diag,
        &ctx,
    )
    .unwrap();
    let SecondMoment::Diag(d) = out.moment.unwrap() else {
        panic!("a diagonal")
    };
    let est = flat(&d);
    let g: Vec<Vec<f64>> = (0..2)
        .map(|j| {
            let part = batch.slice(4 * j, 4);
            flat(
                &backward_pass(&ghost, &table, &part, &objective, PassRequest::default())
                    .unwrap()
                    .grads,
            )
        })
        .collect();
    // b / (M - 1) sum_j (g_j - mean)^2 with b = 4, M = 2.
    let reference: Vec<f64> = (0..g[0].len())
        .map(|k| {
            let m = 0.5 * (g[0][k] + g[1][k]);
            4.0 * ((g[0][k] - m).powi(2) + (g[1][k] - m).powi(2))
        })
        .collect();
    assert!(
        rel_err(&est, &reference) < 1e-3,
        "{}",
        rel_err(&est, &reference)
    );
}

#[test]
fn chunked_passes_give_the_whole_batch_step() {
    // Chunks of 7 (the last one shorter) against one pass over 24 examples:
    // the same mean gradient and estimates up to float32 summation order
    // (1e-5 relative, ~100x the rounding of these sums).
    let model = network(Architecture::LeNet5, [1, 28, 28], Normalization::None);
    let table = ParamTable::of(&model);
    let batch = image_batch(24, [1, 28, 28], 10, 11);
    let whole = ctx(&table);
    let chunked = StepContext {
        chunk: Some(7),
        ..ctx(&table)
    };
    for (estimator, kind) in [
        (Estimator::Exact, MomentKind::Diag),
        (Estimator::Exact, MomentKind::Trace),
        (Estimator::McFisher, MomentKind::Diag),
        (Estimator::Microbatch { micro_batches: 4 }, MomentKind::Diag),
    ] {
        let a = moments::estimate(&model, &batch, &objective, estimator, kind, &whole).unwrap();
        let b = moments::estimate(&model, &batch, &objective, estimator, kind, &chunked).unwrap();
        let what = format!("{estimator:?} {kind:?}");
        assert!(
            rel_err(&flat(&b.grads), &flat(&a.grads)) < 1e-5,
            "{what}: gradient"
        );
        assert!(
            (a.loss - b.loss).abs() < 1e-6 * a.loss.abs(),
            "{what}: loss"
        );
        assert_eq!(a.correct, b.correct, "{what}");
        match (a.moment.unwrap(), b.moment.unwrap()) {
            (SecondMoment::Diag(x), SecondMoment::Diag(y)) => {
                assert!(rel_err(&flat(&y), &flat(&x)) < 1e-5, "{what}: estimate")
            }
            (SecondMoment::Trace(x), SecondMoment::Trace(y)) => {
                assert!((x - y).abs() < 1e-5 * x.abs(), "{what}: trace")
            }
            _ => panic!("{what}: kinds differ"),
        }
    }
    // Weighted objective (the full-Fisher sampler's pass).
    let weights: Vec<f32> = (0..24).map(|i| 0.5 + i as f32 / 24.0).collect();
    let pass = |chunk| {
        let request = PassRequest {
            weights: Some(&weights),
            chunk,
            ..Default::default()
        };
        flat(
            &backward_pass(&model, &table, &batch, &objective, request)
                .unwrap()
                .grads,
        )
    };
    assert!(rel_err(&pass(Some(5)), &pass(None)) < 1e-5, "weighted pass");
    // Whole-batch batch norm is never split.
    let bn = StepContext {
        coupling: Coupling::WholeBatch,
        ..chunked
    };
    assert_eq!(bn.pass_chunk(), None);
    let ghost = StepContext {
        coupling: Coupling::Groups(4),
        ..chunked
    };
    assert_eq!(ghost.pass_chunk(), None, "7 would split groups of 4");
    let ghost8 = StepContext {
        chunk: Some(8),
        ..ghost
    };
    assert_eq!(ghost8.pass_chunk(), Some(8));
}

#[test]
fn weights_are_named_by_their_path_in_the_model_not_the_enum_variant() {
    // The command line's Network enum adds no segment: the MLP's weights keep
    // the names its checkpoints always had, and LeNet-5's are its fields'.
    let names = |n: &Network| -> Vec<String> {
        covnoise::weights::collect(n)
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect()
    };
    let mlp = Network::new(
        &NetworkConfig {
            architecture: Architecture::Mlp,
            input: [1, 1, 6],
            classes: 3,
            hidden: vec![4],
            normalization: Normalization::None,
            layers: Vec::new(),
        },
        0,
        &device(),
    )
    .unwrap();
    assert_eq!(
        names(&mlp),
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias"
        ]
    );
    let lenet = network(Architecture::LeNet5, [1, 28, 28], Normalization::None);
    assert_eq!(names(&lenet)[..2], ["conv1.weight", "conv1.bias"]);
    let table = ParamTable::of(&lenet);
    assert_eq!(table.entries()[0].name, "conv1.weight");
}
