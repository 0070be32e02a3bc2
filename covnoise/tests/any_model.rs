//! Models unlike covnoise's own, as a burn user writes them: a token model
//! (Embedding, LayerNorm, Conv1d, a Linear applied per token, GroupNorm,
//! pooling), tied weights, layers without a rule, and batch normalization.
//! Exact estimates are checked against single-example backward passes,
//! refusals against the parameter they must name, and ghost batch norm's
//! running statistics under micro-batch noise against the plain step's.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, LayerNorm,
    LayerNormConfig, Linear, LinearConfig, PaddingConfig1d,
};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use covnoise::CovnoiseError;
use covnoise::collective::SingleProcess;
use covnoise::model::{
    Coupling, Examples, Forward, GhostBatchNorm, Objective, Probes, labels_tensor,
};
use covnoise::moments::{self, Estimator, MomentKind, SecondMoment, StepContext};
use covnoise::noise::{NoiseConfig, NoiseStage, ScaleRule};
use covnoise::optim::SgdConfig;
use covnoise::params::{ParamTable, flat_values};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{flat, norm, per_example};

/// The device's random stream is global: a test that seeds it and then
/// initializes a model holds this lock, so that tests running in parallel
/// cannot draw from the stream in between (which made two initializations
/// from one seed differ).
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds the device's random stream and holds it until the guard drops.
/// burn initializes parameters lazily, on first use: a constructor that
/// returns before its parameters are drawn must draw them ([`drawn`])
/// while it holds the guard.
fn seed_device(seed: u64) -> std::sync::MutexGuard<'static, ()> {
    let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    device().seed(seed);
    guard
}

/// `model` with its lazily initialized parameters drawn now.
fn drawn<M: Module>(model: M) -> M {
    let _ = flat_values(&model, true);
    model
}

fn device() -> Device {
    Device::flex().autodiff()
}

const VOCAB: usize = 5;
const WIDTH: usize = 6;
const HIDDEN: usize = 8;
const CLASSES: usize = 3;

/// Tokens `[B, T]` and one label per sequence.
#[derive(Debug, Clone)]
struct Sequences {
    tokens: Tensor<2, Int>,
    labels: Tensor<1, Int>,
}

impl Examples for Sequences {
    fn len(&self) -> usize {
        self.labels.dims()[0]
    }
    fn slice(&self, start: usize, len: usize) -> Self {
        Self {
            tokens: self.tokens.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
        }
    }
}

/// `n` sequences of `t` tokens from a vocabulary of 5: with t > 5 every
/// sequence repeats a token.
fn sequences(n: usize, t: usize, seed: u64) -> Sequences {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tokens: Vec<i64> = (0..n * t)
        .map(|_| rng.random_range(0..VOCAB as i64))
        .collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..CLASSES as u8)).collect();
    let d = device();
    Sequences {
        tokens: Tensor::from_data(TensorData::new(tokens, [n, t]), &d),
        labels: labels_tensor(&labels, &d),
    }
}

/// A small token classifier with one layer of each kind that has a rule.
#[derive(Module, Debug)]
struct TokenNet {
    embed: Embedding,
    norm: LayerNorm,
    conv: Conv1d,
    mix: Linear,
    groups: GroupNorm,
    head: Linear,
}

impl TokenNet {
    fn new(seed: u64) -> Self {
        let _seeded = seed_device(seed);
        let d = device();
        let mut net = Self {
            embed: EmbeddingConfig::new(VOCAB, WIDTH).init(&d),
            norm: LayerNormConfig::new(WIDTH).init(&d),
            conv: Conv1dConfig::new(WIDTH, WIDTH, 3)
                .with_padding(PaddingConfig1d::Same)
                .init(&d),
            mix: LinearConfig::new(WIDTH, HIDDEN).init(&d),
            groups: GroupNormConfig::new(2, HIDDEN).init(&d),
            head: LinearConfig::new(HIDDEN, CLASSES).init(&d),
        };
        // Scales and shifts away from 1 and 0, so that an error in their
        // rules cannot hide behind the initial values.
        let jitter = |p: Param<Tensor<1>>, base: f32| {
            let n = p.dims()[0];
            let v: Vec<f32> = (0..n).map(|i| base + 0.1 * i as f32).collect();
            Param::from_tensor(Tensor::from_data(TensorData::new(v, [n]), &d))
        };
        net.norm.gamma = jitter(net.norm.gamma, 0.7);
        net.norm.beta = net.norm.beta.map(|b| jitter(b, -0.2));
        net.groups.gamma = net.groups.gamma.map(|g| jitter(g, 0.8));
        net.groups.beta = net.groups.beta.map(|b| jitter(b, 0.1));
        drawn(net)
    }

    fn forward(&self, b: &Sequences, p: &mut Probes) -> Objective {
        let e = p.embedding(&self.embed, b.tokens.clone()); // [B, T, W]
        let h = p.layer_norm(&self.norm, e);
        let c = p
            .conv1d(&self.conv, h.clone().swap_dims(1, 2))
            .swap_dims(1, 2);
        let z = activation::tanh(p.linear(&self.mix, c + h)); // per token, [B, T, H]
        let g = p.group_norm(&self.groups, z.swap_dims(1, 2)); // [B, H, T]
        let [n, hidden, _] = g.dims();
        let pooled = g.mean_dim(2).reshape([n, hidden]);
        Objective::Classification {
            logits: p.linear(&self.head, pooled),
            labels: b.labels.clone(),
        }
    }
}

fn token_forward(m: &TokenNet, b: &Sequences, p: &mut Probes) -> Objective {
    m.forward(b, p)
}

fn ctx(table: &ParamTable) -> StepContext<'_> {
    StepContext {
        seed: 3,
        step: 0,
        collective: &SingleProcess,
        table,
        coupling: Coupling::Independent,
        chunk: None,
    }
}

/// The exact diagonal estimate of every parameter against
/// `(1/n) sum_i g_i^2` from single-example passes, and the trace estimate
/// against the diagonal's sum. float32 sums over a few examples and
/// positions err by about 1e-6 relative; a rule that squared per position,
/// missed a use or mixed examples is off by tens of percent; 1e-4 separates
/// the two.
fn assert_exact_matches_brute_force<M, B, F>(model: &M, batch: &B, forward: &F)
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let table = ParamTable::of(model);
    let n = batch.len();
    let out = moments::estimate(
        model,
        batch,
        forward,
        Estimator::Exact,
        MomentKind::Diag,
        &ctx(&table),
    )
    .unwrap();
    let SecondMoment::Diag(est) = out.moment.unwrap() else {
        panic!("diagonal requested")
    };
    let per = per_example(model, batch, forward);
    let mut start = 0;
    let mut total = 0.0;
    for (e, est) in table.entries().iter().zip(&est) {
        let reference: Vec<f64> = (start..start + e.numel())
            .map(|j| per.iter().map(|g| g[j] * g[j]).sum::<f64>() / n as f64)
            .collect();
        let got = flat(std::slice::from_ref(est));
        let diff: Vec<f64> = got.iter().zip(&reference).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(&reference);
        assert!(rel <= 1e-4, "{}: relative error {rel}", e.name);
        total += reference.iter().sum::<f64>();
        start += e.numel();
    }
    let trace = moments::estimate(
        model,
        batch,
        forward,
        Estimator::Exact,
        MomentKind::Trace,
        &ctx(&table),
    )
    .unwrap()
    .moment
    .unwrap()
    .trace();
    assert!(
        (trace - total).abs() <= 1e-4 * total,
        "trace {trace} vs {total}"
    );
}

#[test]
fn exact_estimate_of_a_token_model_matches_single_example_passes() {
    let model = TokenNet::new(1);
    // T = 7 > vocabulary 5: every sequence repeats a token.
    assert_exact_matches_brute_force(&model, &sequences(6, 7, 2), &token_forward);
    // T = 1: one position per example (the one-product shortcuts).
    assert_exact_matches_brute_force(&model, &sequences(5, 1, 3), &token_forward);
}

/// One head of self-attention written with probed Linear layers on
/// `[B, T, d]`: positions interact within an example only, so each
/// projection's per-example gradient is its positions' sum.
#[derive(Module, Debug)]
struct Attention {
    embed: Embedding,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    head: Linear,
}

fn attention_forward(m: &Attention, b: &Sequences, p: &mut Probes) -> Objective {
    let e = p.embedding(&m.embed, b.tokens.clone());
    let q = p.linear(&m.query, e.clone());
    let k = p.linear(&m.key, e.clone());
    let v = p.linear(&m.value, e.clone());
    let scores = q.matmul(k.swap_dims(1, 2)) / (WIDTH as f32).sqrt();
    let mixed = activation::softmax(scores, 2).matmul(v);
    let o = p.linear(&m.out, mixed) + e;
    let [n, _, w] = o.dims();
    Objective::Classification {
        logits: p.linear(&m.head, o.mean_dim(1).reshape([n, w])),
        labels: b.labels.clone(),
    }
}

/// The attention model of the tests, initialized from seed 20.
fn attention_model() -> Attention {
    let _seeded = seed_device(20);
    let d = device();
    let linear = |i, o| LinearConfig::new(i, o).init(&d);
    drawn(Attention {
        embed: EmbeddingConfig::new(VOCAB, WIDTH).init(&d),
        query: linear(WIDTH, WIDTH),
        // A key bias adds the same score to every key of a query, which the
        // softmax ignores: its gradient is zero but for rounding, and a
        // relative error of rounding noise tests nothing.
        key: LinearConfig::new(WIDTH, WIDTH).with_bias(false).init(&d),
        value: linear(WIDTH, WIDTH),
        out: linear(WIDTH, WIDTH),
        head: linear(WIDTH, CLASSES),
    })
}

#[test]
fn exact_estimate_of_self_attention_matches_single_example_passes() {
    assert_exact_matches_brute_force(&attention_model(), &sequences(5, 6, 21), &attention_forward);
}

/// The same Linear layer applied twice (weight tying): example i's gradient
/// is the sum of both uses' outer products.
#[derive(Module, Debug)]
struct Tied {
    shared: Linear,
    head: Linear,
}

fn tied_forward(m: &Tied, b: &(Tensor<2>, Tensor<1, Int>), p: &mut Probes) -> Objective {
    let h = activation::tanh(p.linear(&m.shared, b.0.clone()));
    let h = activation::tanh(p.linear(&m.shared, h));
    Objective::Classification {
        logits: p.linear(&m.head, h),
        labels: b.1.clone(),
    }
}

fn features(n: usize, width: usize, classes: u8, seed: u64) -> (Tensor<2>, Tensor<1, Int>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * width)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..classes)).collect();
    let d = device();
    (
        Tensor::from_data(TensorData::new(x, [n, width]), &d),
        labels_tensor(&labels, &d),
    )
}

#[test]
fn tied_weights_add_their_uses_before_the_square() {
    let _seeded = seed_device(4);
    let d = device();
    let model = Tied {
        shared: LinearConfig::new(5, 5).init(&d),
        head: LinearConfig::new(5, 3).init(&d),
    };
    assert_exact_matches_brute_force(&model, &features(7, 5, 3, 5), &tied_forward);
}

/// Micro-batch gradients from one pass over the batch
/// ([`moments::PassRequest::group_size`]: each rule's group shortcut or its
/// per-example gradients summed per group) against the means over each
/// group of single-example gradients, parameter by parameter. Tolerance as
/// for the exact estimate (float32 sums over a few examples and
/// positions); a gradient in the wrong group, a missed use of a tied
/// weight or a mis-scaled group is off by tens of percent.
fn assert_groups_match_brute_force<M, B, F>(model: &M, batch: &B, forward: &F, group_size: usize)
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let table = ParamTable::of(model);
    let pass = moments::backward_pass(
        model,
        &table,
        batch,
        forward,
        moments::PassRequest {
            group_size: Some(group_size),
            ..Default::default()
        },
    )
    .unwrap();
    let groups = pass.group_grads.expect("group gradients were asked for");
    let per = per_example(model, batch, forward);
    let mut start = 0;
    assert_eq!(groups.groups(), batch.len() / group_size);
    let rows: Vec<Vec<Tensor<1>>> = (0..groups.groups()).map(|g| groups.group(g)).collect();
    for (k, e) in table.entries().iter().enumerate() {
        for (g, members) in per.chunks(group_size).enumerate() {
            let reference: Vec<f64> = (start..start + e.numel())
                .map(|j| members.iter().map(|x| x[j]).sum::<f64>() / group_size as f64)
                .collect();
            let row = rows[g][k].clone();
            assert_eq!(row.dims(), [e.numel()], "{}", e.name);
            let diff: Vec<f64> = flat(&[row])
                .iter()
                .zip(&reference)
                .map(|(a, b)| a - b)
                .collect();
            let rel = norm(&diff) / norm(&reference).max(1e-30);
            assert!(rel <= 1e-4, "{}, group {g}: relative error {rel}", e.name);
        }
        start += e.numel();
    }
}

#[test]
fn group_gradients_of_models_unlike_ours_match_single_example_passes() {
    // Embedding, LayerNorm, Conv1d, per-token Linear and GroupNorm, with
    // repeated tokens: their per-example paths, summed per group.
    assert_groups_match_brute_force(&TokenNet::new(1), &sequences(6, 7, 2), &token_forward, 2);
    // A Linear layer on [B, T, in]: the batched group product over T
    // positions per example.
    assert_groups_match_brute_force(
        &attention_model(),
        &sequences(6, 6, 21),
        &attention_forward,
        3,
    );
    // A tied weight: its two uses' group gradients add.
    let _seeded = seed_device(4);
    let d = device();
    let tied = Tied {
        shared: LinearConfig::new(5, 5).init(&d),
        head: LinearConfig::new(5, 3).init(&d),
    };
    assert_groups_match_brute_force(&tied, &features(8, 5, 3, 5), &tied_forward, 4);
    drop(_seeded);
    // Linear layers on features, the first on the data: the grouped
    // product's rows.
    assert_groups_match_brute_force(&deep_model(6), &features(12, 6, 3, 7), &deep_forward, 3);
}

/// A ReLU net of three Linear layers with biases on features: the
/// micro-batch pass runs each on the grouped product, the first on the
/// data (a frozen copy's weight tracked only for its backward step).
#[derive(Module, Debug)]
struct Deep {
    layers: Vec<Linear>,
}

fn deep_forward(m: &Deep, b: &(Tensor<2>, Tensor<1, Int>), p: &mut Probes) -> Objective {
    let mut h = b.0.clone();
    let last = m.layers.len() - 1;
    for (k, layer) in m.layers.iter().enumerate() {
        h = p.linear(layer, h);
        if k < last {
            h = activation::relu(h);
        }
    }
    Objective::Classification {
        logits: h,
        labels: b.1.clone(),
    }
}

fn deep_model(seed: u64) -> Deep {
    let _seeded = seed_device(seed);
    let d = device();
    drawn(Deep {
        layers: vec![
            LinearConfig::new(6, 9).init(&d),
            LinearConfig::new(9, 7).init(&d),
            LinearConfig::new(7, 3).init(&d),
        ],
    })
}

/// The exact diagonal and trace estimates of a ReLU net of Linear layers
/// with one position per example (the one-product shortcut `(a²)ᵀ(δ²)`),
/// with the fast kernels on (the output gradient handed over by the
/// product's own backward step, the squares formed on the threads) and off
/// (burn's ops and a probe tensor), against single-example passes:
/// both paths must stay exact.
#[test]
fn exact_estimate_of_a_linear_relu_net_matches_single_example_passes_on_both_paths() {
    let model = deep_model(8);
    let batch = features(10, 6, 3, 9);
    for fast in [true, false] {
        covnoise::kernels::with_enabled(fast, || {
            assert_exact_matches_brute_force(&model, &batch, &deep_forward)
        });
    }
}

/// The summarized micro-batch gradients of one pass
/// ([`moments::PassRequest::group_summary`]: on the grouped Linear
/// product, each group's product folded into a running mean and centered
/// sum in its backward step; for a tied weight, and with the fast kernels
/// off, from the groups' rows) against the groups' means of single-example
/// gradients: the mean of the group gradients and their centered sum of
/// squares `Σ_g (g_g - ḡ)²`, in f64, whole and in chunks of two groups
/// (merged pairwise). Tolerance 1e-4 relative (float32 sums over a few
/// examples, as above); a group folded twice, a merge without its cross
/// term or a centered sum about the wrong mean is off by O(1).
fn assert_group_summary_matches_brute_force<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    group_size: usize,
) where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let table = ParamTable::of(model);
    let per = per_example(model, batch, forward);
    let groups = batch.len() / group_size;
    let d = per[0].len();
    let means: Vec<Vec<f64>> = per
        .chunks(group_size)
        .map(|members| {
            (0..d)
                .map(|j| members.iter().map(|x| x[j]).sum::<f64>() / group_size as f64)
                .collect()
        })
        .collect();
    let mean: Vec<f64> = (0..d)
        .map(|j| means.iter().map(|g| g[j]).sum::<f64>() / groups as f64)
        .collect();
    let centered: Vec<f64> = (0..d)
        .map(|j| means.iter().map(|g| (g[j] - mean[j]).powi(2)).sum())
        .collect();
    for fast in [true, false] {
        for chunk in [None, Some(2 * group_size)] {
            let pass = covnoise::kernels::with_enabled(fast, || {
                moments::backward_pass(
                    model,
                    &table,
                    batch,
                    forward,
                    moments::PassRequest {
                        group_size: Some(group_size),
                        group_summary: true,
                        chunk,
                        ..Default::default()
                    },
                )
            })
            .unwrap();
            assert!(pass.group_grads.is_none(), "rows were not asked for");
            let summary = pass.group_summary.expect("a summary was asked for");
            assert_eq!(summary.groups, groups);
            let label = format!("fast kernels {fast}, chunk {chunk:?}");
            let rel = common::rel_distance(&flat(&summary.mean), &mean);
            assert!(rel <= 1e-4, "{label}: mean off by {rel}");
            let rel = common::rel_distance(&flat(&pass.grads), &mean);
            assert!(rel <= 1e-4, "{label}: pass gradient off by {rel}");
            let rel = common::rel_distance(&flat(&summary.centered), &centered);
            assert!(rel <= 1e-4, "{label}: centered sum off by {rel}");
        }
    }
}

#[test]
fn summarized_group_gradients_match_single_example_passes() {
    let deep = deep_model(31);
    assert_group_summary_matches_brute_force(&deep, &features(16, 6, 3, 32), &deep_forward, 2);
    // Groups of one example: the centered sum is the examples' own.
    assert_group_summary_matches_brute_force(&deep, &features(8, 6, 3, 33), &deep_forward, 1);
    // A tied weight (its uses add per group before the square), a Linear
    // on [B, T, in] (no grouped product: T positions per example).
    let _seeded = seed_device(34);
    let d = device();
    let tied = drawn(Tied {
        shared: LinearConfig::new(5, 5).init(&d),
        head: LinearConfig::new(5, 3).init(&d),
    });
    drop(_seeded);
    assert_group_summary_matches_brute_force(&tied, &features(12, 5, 3, 35), &tied_forward, 3);
    assert_group_summary_matches_brute_force(
        &attention_model(),
        &sequences(8, 6, 36),
        &attention_forward,
        2,
    );
}

/// A pass that records group gradients on a model that takes gradients
/// (a user's [`Probes::on_grouped`]): the grouped Linear product's backward
/// step gives the weights the sum of the groups' products as their
/// gradient, which must equal the plain pass's (float32 sums in another
/// order, 1e-5 relative; a group left out of the sum is off by about
/// 1/groups).
#[test]
fn the_grouped_linear_product_gives_the_batch_weight_gradient() {
    use burn::optim::GradientsParams;
    let model = deep_model(37);
    let table = ParamTable::of(&model);
    let batch = features(12, 6, 3, 38);
    let grads = |mut probes: Probes| {
        let objective = deep_forward(&model, &batch, &mut probes);
        let mut g = GradientsParams::from_grads(objective.losses().mean().backward(), &model);
        flat(&table.flatten(&mut g, &Device::flex()).unwrap())
    };
    let plain = grads(Probes::off());
    let grouped = grads(Probes::on_grouped(4));
    let rel = common::rel_distance(&grouped, &plain);
    assert!(rel <= 1e-5, "weight gradients differ by {rel}");
}

/// A per-token Linear fed tokens flattened into rows, `[B*T, in]`.
#[derive(Module, Debug)]
struct Flattened {
    embed: Embedding,
    mix: Linear,
    head: Linear,
}

fn flattened_forward(m: &Flattened, b: &Sequences, p: &mut Probes) -> Objective {
    let e = p.embedding(&m.embed, b.tokens.clone());
    let [n, t, w] = e.dims();
    let z = activation::relu(p.linear(&m.mix, e.reshape([n * t, w])));
    let pooled = z.reshape([n, t, HIDDEN]).mean_dim(1).reshape([n, HIDDEN]);
    Objective::Classification {
        logits: p.linear(&m.head, pooled),
        labels: b.labels.clone(),
    }
}

fn stage(config: NoiseConfig, batch: usize) -> NoiseStage {
    NoiseStage::new(config, batch, 0).unwrap()
}

#[test]
fn tokens_flattened_into_rows_are_refused_naming_the_layer() {
    let _seeded = seed_device(6);
    let d = device();
    let model = Flattened {
        embed: EmbeddingConfig::new(VOCAB, WIDTH).init(&d),
        mix: LinearConfig::new(WIDTH, HIDDEN).init(&d),
        head: LinearConfig::new(HIDDEN, CLASSES).init(&d),
    };
    let batch = sequences(8, 4, 7);
    let err = stage(NoiseConfig::diag_fisher(2), 8)
        .validate_model(&model, &batch, flattened_forward)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("mix.weight") && msg.contains("rows"), "{msg}");
    // The step refuses it too, before any estimate.
    let err = stage(NoiseConfig::diag_fisher(2), 8)
        .gradient(&model, &batch, flattened_forward)
        .unwrap_err();
    assert!(err.to_string().contains("mix.weight"), "{err}");
}

/// A model with a parameter no probe covers (`scale`), and an embedding
/// table read directly as the output projection (a tied weight with one use
/// outside the probes).
#[derive(Module, Debug)]
struct Unruled {
    embed: Embedding,
    scale: Param<Tensor<1>>,
}

fn scaled_forward(m: &Unruled, b: &Sequences, p: &mut Probes) -> Objective {
    let e = p.embedding(&m.embed, b.tokens.clone());
    let [n, _, w] = e.dims();
    let pooled = e.mean_dim(1).reshape([n, w]) * m.scale.val().reshape([1, w]);
    Objective::Classification {
        logits: pooled.slice([0..n, 0..CLASSES]),
        labels: b.labels.clone(),
    }
}

#[derive(Module, Debug)]
struct TiedOutput {
    embed: Embedding,
}

fn tied_output_forward(m: &TiedOutput, b: &Sequences, p: &mut Probes) -> Objective {
    let e = p.embedding(&m.embed, b.tokens.clone());
    let [n, _, w] = e.dims();
    let pooled = e.mean_dim(1).reshape([n, w]);
    // [n, w] x [w, vocabulary]: the table read outside its probe.
    let logits = pooled.matmul(m.embed.weight.val().transpose());
    Objective::Classification {
        logits: logits.slice([0..n, 0..CLASSES]),
        labels: b.labels.clone(),
    }
}

#[test]
fn validate_model_names_each_parameter_without_a_rule() {
    let _seeded = seed_device(8);
    let d = device();
    let model = Unruled {
        embed: EmbeddingConfig::new(VOCAB, WIDTH).init(&d),
        scale: Param::from_tensor(Tensor::ones([WIDTH], &d)),
    };
    let batch = sequences(4, 3, 9);
    for estimator in [Estimator::Exact, Estimator::McFisher] {
        let config = NoiseConfig::diag_fisher(2).with_estimator(estimator);
        let err = stage(config, 4)
            .validate_model(&model, &batch, scaled_forward)
            .unwrap_err();
        assert!(
            matches!(&err, CovnoiseError::Refused { problem: m, .. } if m.contains("parameter scale")),
            "{err}"
        );
    }
    let tied = TiedOutput {
        embed: EmbeddingConfig::new(VOCAB, WIDTH).init(&d),
    };
    let err = stage(NoiseConfig::diag_fisher(2), 4)
        .validate_model(&tied, &batch, tied_output_forward)
        .unwrap_err();
    assert!(
        matches!(&err, CovnoiseError::Refused { problem: m, .. } if m.contains("embed.weight") && m.contains("outside")),
        "{err}"
    );
    // The micro-batch estimator needs no rule: both models are accepted.
    let micro = NoiseConfig::diag_fisher(2).with_estimator(Estimator::microbatch(2));
    stage(micro.clone(), 4)
        .validate_model(&model, &batch, scaled_forward)
        .unwrap();
    stage(micro, 4)
        .validate_model(&tied, &batch, tied_output_forward)
        .unwrap();
}

/// Linear -> batch norm -> ReLU -> Linear, the batch norm ghost (ours,
/// routed through the probes) or burn's own.
#[derive(Module, Debug)]
struct Normed<N> {
    first: Linear,
    bn: N,
    head: Linear,
}

fn ghost_forward(
    m: &Normed<GhostBatchNorm>,
    b: &(Tensor<2>, Tensor<1, Int>),
    p: &mut Probes,
) -> Objective {
    let z = p.linear(&m.first, b.0.clone());
    let h = activation::relu(p.batch_norm(&m.bn, z));
    Objective::Classification {
        logits: p.linear(&m.head, h),
        labels: b.1.clone(),
    }
}

fn burn_bn_forward(
    m: &Normed<BatchNorm>,
    b: &(Tensor<2>, Tensor<1, Int>),
    p: &mut Probes,
) -> Objective {
    let z = p.linear(&m.first, b.0.clone());
    let [n, f] = z.dims();
    let h = activation::relu(m.bn.forward(z.reshape([n, f, 1])).reshape([n, f]));
    Objective::Classification {
        logits: p.linear(&m.head, h),
        labels: b.1.clone(),
    }
}

fn ghost_net(group: usize, seed: u64) -> Normed<GhostBatchNorm> {
    let _seeded = seed_device(seed);
    let d = device();
    drawn(Normed {
        first: LinearConfig::new(5, 6).init(&d),
        bn: GhostBatchNorm::new(6, group, &d),
        head: LinearConfig::new(6, 3).init(&d),
    })
}

/// [`ghost_net`] with the batch norm's scale and shift away from 1 and 0
/// (so that the ReLU after it does not keep exactly the positive x̂, and an
/// error in the scale's rule cannot hide behind the initial values).
fn ghost_net_jittered(group: usize, seed: u64) -> Normed<GhostBatchNorm> {
    let mut net = ghost_net(group, seed);
    let d = device();
    let values = |base: f32| {
        let v: Vec<f32> = (0..6).map(|i| base + 0.15 * i as f32).collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(v, [6]), &d))
    };
    net.bn.gamma = values(0.6);
    net.bn.beta = values(-0.3);
    net
}

/// Ten SGD steps of the ghost-batch-norm model (groups of 4, batch 32) with
/// micro-batch noise (8 micro-batches) at `kappa`; the running statistics
/// and the losses.
fn ten_steps(kappa: f64) -> (Vec<f64>, Vec<f64>) {
    let mut model = ghost_net(4, 10);
    let config = NoiseConfig::diag_fisher(8)
        .with_estimator(Estimator::microbatch(8))
        .with_kappa(kappa);
    let mut stage = stage(config, 32);
    let mut sgd = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    }
    .init()
    .unwrap();
    let mut losses = Vec::new();
    for step in 0..10 {
        let batch = features(32, 5, 3, 100 + step);
        let g = stage.gradient(&model, &batch, ghost_forward).unwrap();
        losses.push(g.loss);
        model = sgd.step(0.1, model, g.grads);
    }
    (flat(&flat_values(&model, false)), losses)
}

#[test]
fn ghost_batch_norm_statistics_under_micro_batch_noise_equal_the_plain_steps() {
    let (plain_stats, plain_losses) = ten_steps(0.0);
    let (noisy_stats, noisy_losses) = ten_steps(1e-12);
    // kappa 1e-12 adds noise of relative size ~1e-6 to gradients of order
    // 1, and the micro-batch passes sum in another order: both stay within
    // float32 noise over ten steps, while one running update per
    // micro-batch (the old behaviour) moves the mean by (1 - 0.9^8) / 0.1 =
    // 5.7 times the plain step's on the first step alone.
    let diff: Vec<f64> = plain_stats
        .iter()
        .zip(&noisy_stats)
        .map(|(a, b)| a - b)
        .collect();
    let rel = norm(&diff) / norm(&plain_stats);
    assert!(rel <= 1e-4, "running statistics differ by {rel} relative");
    for (a, b) in plain_losses.iter().zip(&noisy_losses) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "losses {a} vs {b}");
    }
    // The statistics moved at all (the test would pass on a model whose
    // running statistics are never updated).
    let initial = flat(&flat_values(&ghost_net(4, 10), false));
    let moved: Vec<f64> = plain_stats
        .iter()
        .zip(&initial)
        .map(|(a, b)| a - b)
        .collect();
    assert!(norm(&moved) > 1e-2, "statistics did not move");
}

#[test]
fn the_coupling_is_derived_from_the_model_and_checked_against_declarations() {
    let model = ghost_net(4, 11);
    let batch = features(32, 5, 3, 12);
    let micro = NoiseConfig::diag_fisher(2).with_estimator(Estimator::microbatch(4));
    // Derived: groups of 4.
    let coupling = stage(micro.clone(), 32)
        .validate_model(&model, &batch, ghost_forward)
        .unwrap();
    assert_eq!(coupling, Coupling::Groups(4));
    // A declared multiple of the group is accepted, a divisor refused.
    let ok = stage(micro.clone(), 32)
        .with_coupling(Coupling::Groups(8))
        .validate_model(&model, &batch, ghost_forward)
        .unwrap();
    assert_eq!(ok, Coupling::Groups(8));
    let err = stage(micro.clone(), 32)
        .with_coupling(Coupling::Groups(2))
        .validate_model(&model, &batch, ghost_forward)
        .unwrap_err();
    assert!(err.to_string().contains("groups of 4"), "{err}");
    let err = stage(micro.clone(), 32)
        .with_coupling(Coupling::Independent)
        .validate_model(&model, &batch, ghost_forward)
        .unwrap_err();
    assert!(err.to_string().contains("groups of 4"), "{err}");
    // 4 micro-batches of 8 keep the groups of 4 whole (above); 16
    // micro-batches of 2 would split them.
    let err = stage(
        NoiseConfig::diag_fisher(2).with_estimator(Estimator::microbatch(16)),
        32,
    )
    .validate_model(&model, &batch, ghost_forward)
    .unwrap_err();
    assert!(err.to_string().contains("ghost"), "{err}");
    // Validation leaves the running statistics as they were.
    let before = flat(&flat_values(&model, false));
    stage(micro, 32)
        .validate_model(&model, &batch, ghost_forward)
        .unwrap();
    assert_eq!(before, flat(&flat_values(&model, false)));
}

#[test]
fn burns_batch_norm_is_refused_where_examples_must_be_split_naming_the_layer() {
    let _seeded = seed_device(13);
    let d = device();
    let model = Normed {
        first: LinearConfig::new(5, 6).init(&d),
        bn: BatchNormConfig::new(6).init(&d),
        head: LinearConfig::new(6, 3).init(&d),
    };
    let batch = features(16, 5, 3, 14);
    let micro = NoiseConfig::diag_fisher(2).with_estimator(Estimator::microbatch(4));
    let refusals = [
        stage(micro.clone(), 16).validate_model(&model, &batch, burn_bn_forward),
        stage(micro.clone(), 16)
            .with_coupling(Coupling::Groups(4))
            .validate_model(&model, &batch, burn_bn_forward),
        stage(NoiseConfig::full_fisher(2), 16).validate_model(&model, &batch, burn_bn_forward),
        stage(NoiseConfig::diag_fisher(2), 16).validate_model(&model, &batch, burn_bn_forward),
    ];
    for r in refusals {
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("bn (BatchNorm)") || msg.contains("bn (burn's BatchNorm)"),
            "{msg}"
        );
        assert!(msg.contains("GhostBatchNorm"), "{msg}");
    }
    // Without noise nothing is split: the model trains as burn's.
    assert_eq!(
        stage(micro.with_kappa(0.0), 16)
            .validate_model(&model, &batch, burn_bn_forward)
            .unwrap(),
        Coupling::WholeBatch
    );
}

#[test]
fn a_noise_window_needs_the_epoch() {
    let _seeded = seed_device(15);
    let d = device();
    let model = Tied {
        shared: LinearConfig::new(5, 5).init(&d),
        head: LinearConfig::new(5, 3).init(&d),
    };
    let batch = features(4, 5, 3, 16);
    let config = NoiseConfig::diag_fisher(2).with_window(1, None);
    let err = stage(config.clone(), 4)
        .gradient(&model, &batch, tied_forward)
        .unwrap_err();
    assert!(err.to_string().contains("gradient_in_epoch"), "{err}");
    let mut s = stage(config, 4);
    assert_eq!(
        s.gradient_in_epoch(&model, &batch, 0, tied_forward)
            .unwrap()
            .noise_trace,
        Some(0.0)
    );
    assert!(
        s.gradient_in_epoch(&model, &batch, 1, tied_forward)
            .unwrap()
            .noise_trace
            .unwrap()
            > 0.0
    );
}

#[test]
fn the_temperature_rule_carries_its_learning_rates() {
    let rule = ScaleRule::Temperature {
        small_batch: 128,
        small_lr: 0.05,
        lr: 0.2,
    };
    let c = NoiseStage::new(NoiseConfig::diag_fisher(128).with_scale(rule), 4096, 0)
        .unwrap()
        .scale();
    assert!((c - (0.25 / 128.0 - 1.0 / 4096.0)).abs() < 1e-15);
}

/// Passes in which each micro-batch runs at parameters of its own (the
/// penalties' moved passes: an embedding table, layer and group norms'
/// scales and shifts, a Conv1d, per-token Linear layers, attention and a
/// tied weight, each group at its own values) against one plain pass per
/// micro-batch on a moved copy of the model (tolerance as in
/// `common::shifted_pass_against_per_group_passes`).
#[test]
fn shifted_passes_of_models_unlike_ours_match_one_pass_per_micro_batch() {
    let batch = sequences(8, 6, 31);
    let check = |label: &str, (whole, chunked): (f64, f64)| {
        assert!(
            whole <= 1e-4 && chunked <= 1e-4,
            "{label}: relative errors {whole} and {chunked}"
        );
    };
    check(
        "token model",
        common::shifted_pass_against_per_group_passes(
            &TokenNet::new(4),
            &batch,
            &token_forward,
            2,
            1,
        ),
    );
    check(
        "attention",
        common::shifted_pass_against_per_group_passes(
            &attention_model(),
            &batch,
            &attention_forward,
            2,
            2,
        ),
    );
    let _seeded = seed_device(6);
    let d = device();
    let tied = Tied {
        shared: LinearConfig::new(5, 5).init(&d),
        head: LinearConfig::new(5, 3).init(&d),
    };
    check(
        "tied",
        common::shifted_pass_against_per_group_passes(
            &tied,
            &features(8, 5, 3, 5),
            &tied_forward,
            4,
            3,
        ),
    );
}

/// The ghost-batch-norm model with its Linear layers called plain: its
/// batch norm still tells the coupling, but no rule covers the Linear
/// weights, so micro-batch gradients take one pass per micro-batch.
fn ghost_forward_without_rules(
    m: &Normed<GhostBatchNorm>,
    b: &(Tensor<2>, Tensor<1, Int>),
    p: &mut Probes,
) -> Objective {
    let z = m.first.forward(b.0.clone());
    let h = activation::relu(p.batch_norm(&m.bn, z));
    Objective::Classification {
        logits: m.head.forward(h),
        labels: b.1.clone(),
    }
}

/// With ghost batch norm, examples interact within their ghost batch, so
/// no gradient belongs to one example; but a micro-batch made of whole
/// ghost batches is a model of its own, and its gradient comes from one
/// pass over the batch: the batch norm's rule gives its scale's and
/// shift's sums over whole ghost batches, the other layers' group sums
/// are exact for the same reason. Checked against one pass per
/// micro-batch (its own ghost batches), for micro-batches of one and of
/// two ghost batches, whole and chunked, at 1e-4 relative (float32 sums
/// in other orders, about 1e-6; a ghost batch normalized with another's
/// statistics, or a scale gradient without x̂, is off by tens of
/// percent). Per-example squares stay refused, naming batch norm; and
/// the micro-batch estimator from one pass equals one pass per
/// micro-batch.
#[test]
fn ghost_batch_norm_models_give_micro_batch_gradients_from_one_pass() {
    let model = ghost_net_jittered(4, 21);
    let table = ParamTable::of(&model);
    let batch = features(16, 5, 3, 22);
    for b in [4, 8] {
        for chunk in [None, Some(8)] {
            let request = moments::PassRequest {
                group_size: Some(b),
                chunk,
                ..Default::default()
            };
            let pass =
                moments::backward_pass(&model, &table, &batch, &ghost_forward, request).unwrap();
            let groups = pass.group_grads.unwrap();
            for j in 0..16 / b {
                let part = batch.slice(j * b, b);
                let reference = moments::backward_pass(
                    &model,
                    &table,
                    &part,
                    &ghost_forward,
                    moments::PassRequest::default(),
                )
                .unwrap();
                let rel = common::rel_distance(&flat(&groups.group(j)), &flat(&reference.grads));
                assert!(rel <= 1e-4, "b {b}, chunk {chunk:?}, group {j}: {rel}");
            }
        }
    }
    let squares = moments::PassRequest {
        moments: Some(MomentKind::Diag),
        ..Default::default()
    };
    let err = moments::backward_pass(&model, &table, &batch, &ghost_forward, squares).unwrap_err();
    assert!(err.to_string().contains("batch normalization"), "{err}");
    let ctx = StepContext {
        coupling: Coupling::Groups(4),
        ..ctx(&table)
    };
    let run = |passes| {
        let out = moments::estimate_with(
            &model,
            &batch,
            &ghost_forward,
            Estimator::microbatch(4),
            MomentKind::Diag,
            passes,
            &ctx,
        )
        .unwrap();
        let Some(SecondMoment::Diag(d)) = out.moment else {
            panic!("a diagonal")
        };
        (flat(&out.grads), flat(&d))
    };
    let (g1, m1) = run(moments::MicroBatchPasses::OneThroughRules);
    let (g2, m2) = run(moments::MicroBatchPasses::PerMicroBatch);
    assert!(common::rel_distance(&g1, &g2) <= 1e-4);
    assert!(common::rel_distance(&m1, &m2) <= 1e-4);
}

/// A batch norm whose output the loss does not use: its backward step never
/// runs, so it leaves no gradients per normalization group. Asked for
/// micro-batch gradients of whole normalization groups, the pass names the
/// layer and says it does not reach the loss, instead of blaming a split
/// of its groups that did not happen.
#[test]
fn a_batch_norm_the_loss_does_not_reach_is_named_as_such() {
    let model = ghost_net(4, 23);
    let table = ParamTable::of(&model);
    let batch = features(16, 5, 3, 24);
    let off_the_loss =
        |m: &Normed<GhostBatchNorm>, b: &(Tensor<2>, Tensor<1, Int>), p: &mut Probes| {
            let z = p.linear(&m.first, b.0.clone());
            let _unused = p.batch_norm(&m.bn, z.clone());
            Objective::Classification {
                logits: p.linear(&m.head, activation::relu(z)),
                labels: b.1.clone(),
            }
        };
    let request = moments::PassRequest {
        group_size: Some(4),
        ..Default::default()
    };
    let err = moments::backward_pass(&model, &table, &batch, &off_the_loss, request).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("BatchNorm layer of parameter bn.gamma"),
        "{msg}"
    );
    assert!(msg.contains("must reach the loss"), "{msg}");
    assert!(!msg.contains("couples"), "{msg}");
}

/// Passes in which each micro-batch runs at parameters of its own, through
/// a ghost batch norm (normalized by its ghost batches, then each
/// micro-batch's own scale and shift), against one plain pass per
/// micro-batch on a moved copy of the model (tolerance as in
/// `common::shifted_pass_against_per_group_passes`).
#[test]
fn shifted_passes_through_ghost_batch_norm_match_one_pass_per_micro_batch() {
    let model = ghost_net_jittered(4, 23);
    let batch = features(16, 5, 3, 24);
    let (whole, chunked) =
        common::shifted_pass_against_per_group_passes(&model, &batch, &ghost_forward, 8, 5);
    assert!(
        whole <= 1e-4 && chunked <= 1e-4,
        "relative errors {whole} and {chunked}"
    );
}

/// Both penalties on the batch-norm model, over ghost batches of 4 and over
/// the whole batch (where each micro-batch's passes normalize it alone):
/// from one pass through the rules (micro-batch gradients at theta, then
/// every micro-batch at its moved parameters in one pass) and from passes
/// of their own per micro-batch (the Linear layers without rules) give the
/// same step and penalty, to 1e-4 relative (the forward differences divide
/// float32 rounding of about 1e-7 by r = 1e-2); the running statistics
/// move once, from the data pass, on both paths (to float32 rounding).
/// The step through the rules runs one forward pass per pass over the
/// batch (2 for the gradient-norm penalty, 3 for the Fisher-trace penalty,
/// and one more, the step's own, over the whole batch), where one pass
/// per micro-batch runs at least 4 more.
#[test]
fn penalties_on_a_ghost_batch_norm_model_from_one_pass_equal_one_pass_per_micro_batch() {
    use covnoise::regularizer::{PenaltyKind, Regularizer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let batch = features(16, 5, 3, 26);
    for (group, reg) in [
        (4, Regularizer::grad_norm(0.5, 4)),
        (4, Regularizer::fisher_trace(0.5, 4)),
        (0, Regularizer::grad_norm(0.5, 4)),
        (0, Regularizer::fisher_trace(0.5, 4)),
    ] {
        let calls = AtomicUsize::new(0);
        let counted =
            |m: &Normed<GhostBatchNorm>, b: &(Tensor<2>, Tensor<1, Int>), p: &mut Probes| {
                calls.fetch_add(1, Ordering::Relaxed);
                ghost_forward(m, b, p)
            };
        let run = |rules: bool| {
            let model = ghost_net_jittered(group, 25);
            let table = ParamTable::of(&model);
            let mut stage = stage(NoiseConfig::none(), 16)
                .with_regularizer(reg)
                .unwrap();
            let mut g = if rules {
                stage.validate_model(&model, &batch, counted).unwrap();
                calls.store(0, Ordering::Relaxed);
                stage.gradient(&model, &batch, counted).unwrap()
            } else {
                stage
                    .gradient(&model, &batch, ghost_forward_without_rules)
                    .unwrap()
            };
            let grads = flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap());
            (grads, g.penalty.unwrap(), flat(&flat_values(&model, false)))
        };
        let ((a, pa, sa), (b, pb, sb)) = (run(true), run(false));
        let passes = if reg.kind == PenaltyKind::GradNorm {
            2
        } else {
            3
        };
        let passes = passes + usize::from(group == 0);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            passes,
            "group {group}, {reg:?}: forward passes"
        );
        let rel = common::rel_distance(&a, &b);
        assert!(rel <= 1e-4, "group {group}, {reg:?}: steps differ by {rel}");
        assert!(
            (pa - pb).abs() <= 1e-4 * pb.abs(),
            "penalties {pa} and {pb}"
        );
        assert!(common::rel_distance(&sa, &sb) <= 1e-5, "running statistics");
    }
}

/// `with_one_pass_micro_batches(false)` makes the penalties run passes of
/// their own per micro-batch on a model that allows one pass: more forward
/// passes (the moved passes alone are 4, one per micro-batch), the same
/// step to 1e-4 (float32 rounding, as above).
#[test]
fn passes_per_micro_batch_can_be_asked_for() {
    use covnoise::regularizer::Regularizer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let batch = features(16, 5, 3, 27);
    let calls = AtomicUsize::new(0);
    let counted = |m: &Normed<GhostBatchNorm>, b: &(Tensor<2>, Tensor<1, Int>), p: &mut Probes| {
        calls.fetch_add(1, Ordering::Relaxed);
        ghost_forward(m, b, p)
    };
    let run = |one_pass: bool| {
        let model = ghost_net_jittered(4, 28);
        let table = ParamTable::of(&model);
        let mut stage = stage(NoiseConfig::none(), 16)
            .with_regularizer(Regularizer::grad_norm(0.5, 4))
            .unwrap()
            .with_one_pass_micro_batches(one_pass);
        stage.validate_model(&model, &batch, counted).unwrap();
        calls.store(0, Ordering::Relaxed);
        let mut g = stage.gradient(&model, &batch, counted).unwrap();
        let passes = calls.load(Ordering::Relaxed);
        (
            flat(&table.flatten(&mut g.grads, &Device::flex()).unwrap()),
            passes,
        )
    };
    let ((a, one), (b, each)) = (run(true), run(false));
    assert_eq!(
        one, 2,
        "one pass for the data, one for the moved parameters"
    );
    assert!(
        each >= 8,
        "{each} forward passes with passes per micro-batch"
    );
    let rel = common::rel_distance(&a, &b);
    assert!(rel <= 1e-4, "steps differ by {rel}");
}
