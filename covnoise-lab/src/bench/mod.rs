//! `covnoise bench`: the cost of one training step (forward, backward,
//! estimator, noise, update) for plain large-batch SGD and each noise
//! variant, measured in the same process and reported as ratios to plain.
//!
//! Variants are interleaved round-robin (one step of each per round), so
//! that drift in machine load affects all of them alike.

pub mod reference;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::tensor::Device;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::tensor::{Distribution, Tensor};
use covnoise::error::Result;

use crate::zoo::{Architecture, Network, NetworkConfig, Normalization};
use covnoise::model::{Batch, labels_tensor};
use covnoise::moments::Estimator;
use std::sync::Arc;

use covnoise::noise::{Diagonal, FullFisher, Isotropic, NoiseConfig, NoiseStage, ScaleRule};
use covnoise::optim::SgdConfig;
use covnoise::regularizer::Regularizer;
use covnoise::tensor_util::from_vec;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting bytes in use and their peak, so that the
/// bench can report the memory a step needs. The binary installs it with
/// `#[global_allocator]`; the counting costs one atomic add per call.
pub struct TrackingAllocator;

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

/// Heap bytes in use now (0 unless [`TrackingAllocator`] is installed).
pub fn heap_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the current use.
fn reset_peak() -> usize {
    let now = IN_USE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// What a benchmarked round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A whole training step: forward, backward, noise stage, SGD update.
    Step,
    /// Only the matrix products of a plain MLP step, on the backend without
    /// autodiff: the forward `a_l W_l`, the weight gradients `a_lᵀ δ_l` and
    /// the input gradients `δ_l W_lᵀ` (transposed operands as views, as
    /// burn's autodiff passes them). Its ratio to plain is the share of a
    /// step the matrix-multiply library sets; the same products in PyTorch
    /// (`bench/pytorch_reference.py --products`) compare the libraries.
    MatmulProducts,
}

/// One benchmarked configuration.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Short name, e.g. `diag-exact`.
    pub name: &'static str,
    /// The noise stage's configuration (unused by [`Work::MatmulProducts`]).
    pub noise: NoiseConfig,
    /// What each round runs.
    pub work: Work,
    /// Whether convolutions and batch norm run on covnoise's fast flex
    /// kernels ([`covnoise::kernels`]); false times burn's own ops, the A/B
    /// of the kernels in one run.
    pub fast_kernels: bool,
    /// An explicit penalty added to the step (see [`covnoise::regularizer`]).
    pub regularizer: Option<Regularizer>,
}

/// The variants the issue asks for: plain, exact every step, exact refreshed
/// every 10 steps, micro-batch, MC-Fisher, full and isotropic; for the conv
/// nets, the plain step on burn's own convolution and batch-norm ops
/// (`plain-burn`); the gradient-norm and Fisher-trace penalties over
/// `micro_batches` micro-batches without noise (`grad-norm`,
/// `fisher-trace`); and, for the MLP, the plain step's matrix products
/// alone (`matmul-products`).
pub fn standard_variants(small_batch: usize, micro_batches: usize) -> Vec<Variant> {
    let diag = |estimator, refresh_every| NoiseConfig {
        structure: Arc::new(Diagonal),
        estimator,
        refresh_every,
        ..NoiseConfig::diag_fisher(small_batch)
    };
    // A fixed scale keeps every variant's noise on at any batch size.
    let fixed = |c: NoiseConfig| NoiseConfig {
        scale: ScaleRule::Fixed {
            c: 1.0 / small_batch as f64,
        },
        ..c
    };
    let step = |name, noise| Variant {
        name,
        noise,
        work: Work::Step,
        fast_kernels: true,
        regularizer: None,
    };
    // Any strength > 0 costs the same.
    let penalized = |name, reg| Variant {
        regularizer: Some(reg),
        ..step(name, NoiseConfig::none())
    };
    vec![
        step("plain", NoiseConfig::none()),
        Variant {
            fast_kernels: false,
            ..step("plain-burn", NoiseConfig::none())
        },
        step("diag-exact", fixed(diag(Estimator::Exact, 1))),
        step("diag-exact-refresh10", fixed(diag(Estimator::Exact, 10))),
        step(
            "diag-microbatch",
            fixed(diag(Estimator::Microbatch { micro_batches }, 1)),
        ),
        step("diag-mc-fisher", fixed(diag(Estimator::McFisher, 1))),
        step(
            "full",
            fixed(NoiseConfig {
                structure: Arc::new(FullFisher { centered: false }),
                ..NoiseConfig::none()
            }),
        ),
        step(
            "isotropic-exact",
            fixed(NoiseConfig {
                structure: Arc::new(Isotropic),
                ..diag(Estimator::Exact, 1)
            }),
        ),
        penalized("grad-norm", Regularizer::grad_norm(0.01, micro_batches)),
        penalized(
            "fisher-trace",
            Regularizer::fisher_trace(0.01, micro_batches),
        ),
        Variant {
            name: "matmul-products",
            noise: NoiseConfig::none(),
            work: Work::MatmulProducts,
            fast_kernels: true,
            regularizer: None,
        },
    ]
}

/// Timing of one variant at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Batch size.
    pub batch_size: usize,
    /// Variant name.
    pub variant: String,
    /// Timed steps.
    pub steps: usize,
    /// Median step time, milliseconds.
    pub median_ms: f64,
    /// 10th percentile, milliseconds.
    pub p10_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// Median divided by plain's median in the same run.
    pub ratio_to_plain: f64,
    /// Largest extra heap a step needed beyond what was in use before it, bytes.
    pub step_peak_bytes: usize,
}

/// Settings of a bench run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The model: the MLP takes 784 features, LeNet-5 28x28 grey images,
    /// VGG and ResNet 32x32 colour images; 10 classes.
    pub model: Architecture,
    /// Batch sizes to time.
    pub batch_sizes: Vec<usize>,
    /// Hidden widths of the MLP.
    pub hidden: Vec<usize>,
    /// Passes over at most this many examples, accumulated (every variant).
    pub chunk: Option<usize>,
    /// Micro-batch gradients (micro-batch estimator, penalties) from one
    /// pass over the batch where the model allows it (true), or from
    /// passes of their own per micro-batch (false).
    pub one_pass: bool,
    /// The device (without autodiff; the bench adds it).
    pub device: Device,
    /// Untimed rounds first.
    pub warmup: usize,
    /// Timed rounds.
    pub steps: usize,
    /// Micro-batches for the micro-batch variant.
    pub micro_batches: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// A synthetic batch of examples of `shape` with standardized values and
/// uniform labels (step cost does not depend on the values).
fn synthetic_batch(b: usize, [c, h, w]: [usize; 3], device: &Device) -> Batch<4> {
    let mut rng = ChaCha8Rng::seed_from_u64(b as u64);
    let x: Vec<f32> = (0..b * c * h * w)
        .map(|_| rng.random_range(-1.5..1.5))
        .collect();
    let labels: Vec<u8> = (0..b).map(|_| rng.random_range(0..10u8)).collect();
    Batch {
        x: from_vec(x, [b, c, h, w], device),
        labels: labels_tensor(&labels, device),
    }
}

/// Reads back the sum of a module's first parameter, so that a backend that
/// defers work has finished the step before the clock stops.
#[derive(Default)]
struct FirstParameter(Option<f64>);

impl ModuleVisitor for FirstParameter {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.0.is_none() {
            self.0 = Some(covnoise::tensor_util::scalar(param.val().sum()));
        }
    }
}

/// Whether `variant` can run on `architecture`: the per-example estimators
/// (exact, MC-Fisher) need a model without batch norm, the matrix products
/// alone are those of the MLP, and burn's ops instead of the fast kernels
/// differ only for the conv nets.
pub fn applies(variant: &Variant, architecture: Architecture) -> bool {
    if variant.work == Work::MatmulProducts {
        return architecture == Architecture::Mlp;
    }
    // The MLP has no convolution and no image batch norm: nothing to switch.
    if !variant.fast_kernels && architecture == Architecture::Mlp {
        return false;
    }
    !architecture.has_batch_norm()
        || variant.noise.is_none()
        || variant.noise.structure.reweights_examples()
        || matches!(variant.noise.estimator, Estimator::Microbatch { .. })
}

/// Whether `variant` on `architecture` splits each batch into the bench's
/// micro-batches: the micro-batch estimator, the penalties, and full noise
/// on a batch-norm model (ghost batches of one micro-batch).
pub fn uses_micro_batches(variant: &Variant, architecture: Architecture) -> bool {
    variant.regularizer.is_some()
        || (architecture.has_batch_norm() && variant.noise.structure.reweights_examples())
        || (!variant.noise.is_none()
            && matches!(variant.noise.estimator, Estimator::Microbatch { .. }))
}

/// Checks a bench before anything is allocated: sizes and counts at least
/// 1, micro-batches that split every batch, and an estimate of the memory
/// the largest batch needs (every variant's model, optimizer and noise
/// state, one batch's activations and the synthetic batch) against this
/// machine's memory. Products of the user's numbers are taken in u128, so
/// that no size wraps.
pub fn check(config: &BenchConfig, variants: &[Variant]) -> Result<()> {
    let invalid = |name: &'static str, value: String, reason: &'static str| {
        covnoise::CovnoiseError::InvalidSetting {
            name,
            value,
            reason,
        }
    };
    if config.steps == 0 {
        return Err(invalid("steps", "0".into(), "must be >= 1"));
    }
    if config.warmup.checked_add(config.steps).is_none() {
        return Err(invalid(
            "warmup",
            config.warmup.to_string(),
            "plus --steps does not fit in 64 bits",
        ));
    }
    if config.batch_sizes.is_empty() || config.batch_sizes.contains(&0) {
        return Err(invalid(
            "batch-sizes",
            format!("{:?}", config.batch_sizes),
            "needs at least one batch size, each >= 1",
        ));
    }
    if config.chunk == Some(0) {
        return Err(invalid(
            "chunk",
            "0".into(),
            "must be >= 1 (omit it for whole batches)",
        ));
    }
    if let Some(&w) = config
        .hidden
        .iter()
        .find(|&&w| w as u128 > crate::train::settings::MAX_WIDTH)
    {
        return Err(invalid(
            "hidden",
            w.to_string(),
            "is larger than 2^40, more than any machine's memory holds",
        ));
    }
    if config.hidden.contains(&0) {
        return Err(invalid(
            "hidden",
            format!("{:?}", config.hidden),
            "widths must be >= 1",
        ));
    }
    let applicable: Vec<&Variant> = variants
        .iter()
        .filter(|v| applies(v, config.model))
        .collect();
    let microbatch = applicable
        .iter()
        .any(|v| uses_micro_batches(v, config.model));
    if microbatch {
        let m = config.micro_batches;
        if m < 2 {
            return Err(covnoise::CovnoiseError::TooFewMicroBatches(m));
        }
        if let Some(&b) = config.batch_sizes.iter().find(|b| !b.is_multiple_of(m)) {
            return Err(covnoise::CovnoiseError::MicroBatchesDoNotDivide {
                batch: b,
                micro_batches: m,
            });
        }
        if config.model.has_batch_norm()
            && let Some(&b) = config.batch_sizes.iter().find(|&&b| b / m < 2)
        {
            return Err(invalid(
                "batch-sizes",
                b.to_string(),
                "leaves micro-batches (ghost batches) of fewer than 2 examples",
            ));
        }
    }
    let shape = config.model.input_shape().unwrap_or([1, 28, 28]);
    let network = NetworkConfig {
        architecture: config.model,
        input: shape,
        classes: 10,
        hidden: config.hidden.clone(),
        normalization: Normalization::None,
        layers: Vec::new(),
    };
    let (params, units) = network.footprint();
    let largest = *config.batch_sizes.iter().max().expect("checked non-empty") as u128;
    let input: u128 = shape.iter().map(|&d| d as u128).product();
    let needed =
        4 * (5 * params * applicable.len() as u128 + 4 * largest * units + largest * input);
    if let Some(total) = crate::device::host_memory_bytes()
        && needed > u128::from(total)
    {
        let gib = |b: u128| b as f64 / f64::from(1u32 << 30);
        return Err(covnoise::CovnoiseError::Unsupported(format!(
            "batch size {largest} with --model {} needs at least {:.1} GiB (models, optimizer and noise state of {} variants, a batch's activations), more than this machine's {:.1} GiB of memory",
            config.model,
            gib(needed),
            applicable.len(),
            gib(u128::from(total))
        )));
    }
    Ok(())
}

/// One variant's state between rounds.
enum RoundWork {
    /// A model (taken out during a step), its noise stage and optimizer.
    Step(Box<(Option<Network>, NoiseStage, ModuleOptimizer)>),
    /// The operand pairs of the products, multiplied in order.
    Products(Vec<(Tensor<2>, Tensor<2>)>),
}

impl RoundWork {
    /// Runs one round: a training step, or the products.
    fn run(&mut self, batch: &Batch<4>) -> Result<()> {
        match self {
            RoundWork::Step(state) => {
                let (model, stage, sgd) = &mut **state;
                let current = model.take().expect("put back after every step");
                let g = stage.gradient(&current, batch, |m: &Network, b: &Batch<4>, p| {
                    m.objective(b.x.clone(), b.labels.clone(), p)
                })?;
                let next = sgd.step(0.01, current, g.grads);
                let mut first = FirstParameter::default();
                next.visit(&mut first);
                *model = Some(next);
            }
            RoundWork::Products(pairs) => {
                let mut last = None;
                for (lhs, rhs) in pairs.iter() {
                    last = Some(lhs.clone().matmul(rhs.clone()));
                }
                // One element read back: a backend that defers work runs
                // the queued products before it can answer.
                if let Some(out) = last {
                    covnoise::tensor_util::scalar(out.slice([0..1, 0..1]));
                }
            }
        }
        Ok(())
    }
}

/// A training step's state for `variant` at batch size `b`.
fn step_state(
    config: &BenchConfig,
    variant: &Variant,
    b: usize,
    shape: [usize; 3],
    device: &Device,
) -> Result<RoundWork> {
    // Batch norm: plain steps normalize over the whole batch; the
    // micro-batch estimator, and full-Fisher noise (whose per-example
    // weights need losses that belong to one example), need ghost batches
    // of one micro-batch.
    let structure = &variant.noise.structure;
    let normalization = match variant.noise.estimator {
        _ if !config.model.has_batch_norm() => Normalization::None,
        _ if structure.reweights_examples() => {
            Normalization::GhostBatchNorm(b / config.micro_batches)
        }
        _ if variant.noise.is_none() => Normalization::BatchNorm,
        Estimator::Microbatch { micro_batches } => Normalization::GhostBatchNorm(b / micro_batches),
        _ => Normalization::BatchNorm,
    };
    let network = NetworkConfig {
        architecture: config.model,
        input: shape,
        classes: 10,
        hidden: config.hidden.clone(),
        normalization,
        layers: Vec::new(),
    };
    let model = Network::new(&network, 0, device)?;
    let mut stage = NoiseStage::new(variant.noise.clone(), b, 0)?
        .with_coupling(network.coupling())
        .with_chunk(config.chunk)
        .with_one_pass_micro_batches(config.one_pass);
    if let Some(reg) = variant.regularizer {
        stage = stage.with_regularizer(reg)?;
    }
    let sgd = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    }
    .init()?;
    Ok(RoundWork::Step(Box::new((Some(model), stage, sgd))))
}

/// The operands of a plain MLP step's matrix products at batch size `b`
/// (784 inputs, `config.hidden`, 10 classes), on the device without
/// autodiff: per layer `a W`, `aᵀ δ`, and `δ Wᵀ` except for the first layer,
/// whose input needs no gradient.
fn mlp_products(config: &BenchConfig, b: usize) -> Vec<(Tensor<2>, Tensor<2>)> {
    let device = &config.device;
    let uniform =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Uniform(-1.0, 1.0), device);
    let mut sizes = vec![784];
    sizes.extend(&config.hidden);
    sizes.push(10);
    let mut pairs = Vec::new();
    for (l, w) in sizes.windows(2).enumerate() {
        let a = uniform([b, w[0]]);
        let weight = uniform([w[0], w[1]]);
        let delta = uniform([b, w[1]]);
        pairs.push((a.clone(), weight.clone()));
        pairs.push((a.transpose(), delta.clone()));
        if l > 0 {
            pairs.push((delta, weight.transpose()));
        }
    }
    pairs
}

/// Times every variant at every batch size.
pub fn run_bench(
    config: &BenchConfig,
    variants: &[Variant],
    mut log: impl FnMut(&str),
) -> Result<Vec<BenchResult>> {
    let device = config.device.clone().autodiff();
    let mut results = Vec::new();
    let shape = config.model.input_shape().unwrap_or([1, 28, 28]);
    let variants: Vec<&Variant> = variants
        .iter()
        .filter(|v| applies(v, config.model))
        .collect();
    for &b in &config.batch_sizes {
        let batch = synthetic_batch(b, shape, &device);
        let mut states = Vec::new();
        for v in &variants {
            let work = match v.work {
                Work::Step => step_state(config, v, b, shape, &device)?,
                Work::MatmulProducts => RoundWork::Products(mlp_products(config, b)),
            };
            states.push((work, Vec::new(), 0usize, v.fast_kernels));
        }
        for round in 0..config.warmup + config.steps {
            for (work, times, peak, fast) in states.iter_mut() {
                let before = reset_peak();
                let start = Instant::now();
                covnoise::kernels::with_enabled(*fast, || work.run(&batch))?;
                let elapsed = start.elapsed().as_secs_f64() * 1e3;
                if round >= config.warmup {
                    times.push(elapsed);
                    *peak = (*peak).max(PEAK.load(Ordering::Relaxed).saturating_sub(before));
                }
            }
        }
        let mut plain_median = f64::NAN;
        for (v, (_, times, peak, _)) in variants.iter().zip(states.iter_mut()) {
            times.sort_by(|a, b| a.total_cmp(b));
            let median = percentile(times, 0.5);
            if v.name == "plain" {
                plain_median = median;
            }
            let r = BenchResult {
                batch_size: b,
                variant: v.name.to_string(),
                steps: times.len(),
                median_ms: median,
                p10_ms: percentile(times, 0.1),
                p90_ms: percentile(times, 0.9),
                ratio_to_plain: median / plain_median,
                step_peak_bytes: *peak,
            };
            log(&format!(
                "batch {:>5}  {:<22} median {:>9.2} ms  [p10 {:>8.2}, p90 {:>8.2}]  x{:.3} plain  step peak {:>7.1} MiB",
                b,
                r.variant,
                r.median_ms,
                r.p10_ms,
                r.p90_ms,
                r.ratio_to_plain,
                r.step_peak_bytes as f64 / (1 << 20) as f64
            ));
            results.push(r);
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The products are those of a plain MLP step: their multiply-adds per
    /// example add up to the hand count for 784-512-512-10 (forward
    /// 668,672; weight gradients 668,672; input gradients of layers 2-3
    /// 262,144 + 5,120), and each has its gradient's shape.
    #[test]
    fn mlp_products_are_the_plain_steps_products() {
        let config = BenchConfig {
            model: Architecture::Mlp,
            batch_sizes: vec![3],
            hidden: vec![512, 512],
            chunk: None,
            one_pass: true,
            device: Device::flex(),
            warmup: 0,
            steps: 1,
            micro_batches: 1,
        };
        let b = 3;
        let pairs = mlp_products(&config, b);
        assert_eq!(pairs.len(), 3 * 3 - 1);
        let mut multiply_adds = 0;
        let mut shapes = Vec::new();
        for (lhs, rhs) in &pairs {
            let ([m, k], [k2, n]) = (lhs.dims(), rhs.dims());
            assert_eq!(k, k2);
            multiply_adds += m * k * n;
            shapes.push([m, n]);
        }
        assert_eq!(multiply_adds, b * (668_672 + 668_672 + 262_144 + 5_120));
        assert_eq!(
            shapes,
            [
                [b, 512],
                [784, 512],
                [b, 512],
                [512, 512],
                [b, 512],
                [b, 10],
                [512, 10],
                [b, 512]
            ]
        );
    }
}
