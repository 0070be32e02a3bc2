//! Estimators of the gradient's second moment on the current large batch,
//! and their smoothing across steps.
//!
//! Conventions (written down because they matter):
//! - `exact` and `mc-fisher` estimate the *uncentered* diagonal Fisher
//!   `diag(F_B) = (1/B) sum_i (grad l_i)^2`; with several processes B is the
//!   global batch.
//! - `microbatch` estimates the *centered* per-example covariance
//!   `diag(Sigma)` by `b/(M-1) sum_j (g_j - g)^2` over M micro-batches of b
//!   examples (unbiased when micro-batches are independent draws).
//! - Every estimate is per example (not divided by B), so the noise scale c
//!   alone carries the batch-size dependence.

pub mod exact;
mod smoothing;

pub use smoothing::Smoother;

use burn::tensor::Tensor;
use rand::RngExt;

use crate::collective::{Collective, all_reduce_packed};
use crate::error::{CovnoiseError, Result};
use crate::model::{BackwardRequest, Batch, Coupling, GradientModel};
use crate::noise::rng::{keyed_rng, stream};
use crate::tensor_util::{scalar, to_vec};

/// How diag(F) (or diag(Sigma)) is estimated on the large batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// Exact per-example squared gradients, `(delta^2)^T (a^2)` per Linear
    /// layer (the reference).
    Exact,
    /// Centered variance of M micro-batch gradients (M >= 2, over all
    /// processes together).
    Microbatch {
        /// Number of micro-batches M the global batch is split into.
        micro_batches: usize,
    },
    /// As `exact`, with labels sampled from the model's own predictive
    /// distribution (the true, Monte-Carlo Fisher).
    McFisher,
}

/// Whether the full diagonal or only its trace is wanted (isotropic noise
/// needs only the trace, which is cheaper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MomentKind {
    /// The diagonal, one tensor per parameter.
    Diag,
    /// Only the sum of the diagonal.
    Trace,
}

/// An estimate of the diagonal second moment S (per example).
#[derive(Debug, Clone)]
pub enum SecondMoment {
    /// diag(S), shaped like the parameters.
    Diag(Vec<Tensor<2>>),
    /// tr(S).
    Trace(f64),
}

impl SecondMoment {
    /// tr(S).
    pub fn trace(&self) -> f64 {
        match self {
            SecondMoment::Diag(d) => d.iter().map(|t| scalar(t.clone().sum())).sum(),
            SecondMoment::Trace(t) => *t,
        }
    }

    /// `self * a + other * b`, for moving averages.
    pub(crate) fn combine(&self, a: f64, other: &SecondMoment, b: f64) -> Result<SecondMoment> {
        match (self, other) {
            (SecondMoment::Diag(x), SecondMoment::Diag(y)) => Ok(SecondMoment::Diag(
                x.iter()
                    .zip(y)
                    .map(|(x, y)| x.clone() * a as f32 + y.clone() * b as f32)
                    .collect(),
            )),
            (SecondMoment::Trace(x), SecondMoment::Trace(y)) => {
                Ok(SecondMoment::Trace(x * a + y * b))
            }
            _ => Err(CovnoiseError::Shape(
                "cannot combine a diagonal with a trace estimate".into(),
            )),
        }
    }

    /// `self * a`.
    pub(crate) fn scaled(&self, a: f64) -> SecondMoment {
        match self {
            SecondMoment::Diag(x) => {
                SecondMoment::Diag(x.iter().map(|t| t.clone() * a as f32).collect())
            }
            SecondMoment::Trace(t) => SecondMoment::Trace(t * a),
        }
    }
}

/// Where a step stands: the seed and step that key its randomness, and the
/// process group its batch is spread over.
pub struct StepContext<'a> {
    /// Seed shared by all processes.
    pub seed: u64,
    /// Global optimizer step (0-based).
    pub step: u64,
    /// The process group (a single process by default).
    pub collective: &'a dyn Collective,
}

/// The mean gradient over the global batch, its loss and accuracy counts, and
/// (when an estimator ran) a fresh second-moment estimate.
#[derive(Debug, Clone)]
pub struct StepGradient {
    /// Mean gradient over the global batch, one tensor per parameter.
    pub grads: Vec<Tensor<2>>,
    /// Mean cross-entropy over the global batch.
    pub loss: f64,
    /// Correct predictions in the global batch.
    pub correct: usize,
    /// Examples in the global batch.
    pub examples: usize,
    /// A fresh estimate, when one was computed this step.
    pub moment: Option<SecondMoment>,
}

/// Checks that `estimator` can run on `model` with a local batch of
/// `local_batch` examples on `world` processes.
pub fn validate(
    estimator: Estimator,
    model: &dyn GradientModel,
    local_batch: usize,
    world: usize,
) -> Result<()> {
    match estimator {
        Estimator::Exact | Estimator::McFisher => {
            if model.coupling() != Coupling::Independent {
                return Err(CovnoiseError::Unsupported(
                    "the exact and mc-fisher estimators need per-example gradients, which batch normalization makes undefined; use --estimator microbatch with --ghost-batch".into(),
                ));
            }
        }
        Estimator::Microbatch { micro_batches } => {
            if micro_batches < 2 {
                return Err(CovnoiseError::TooFewMicroBatches(micro_batches));
            }
            let global = local_batch * world;
            if !global.is_multiple_of(micro_batches) {
                return Err(CovnoiseError::MicroBatchesDoNotDivide {
                    batch: global,
                    micro_batches,
                });
            }
            if micro_batches % world != 0 {
                return Err(CovnoiseError::Unsupported(format!(
                    "{micro_batches} micro-batches cannot be spread evenly over {world} processes"
                )));
            }
            let b = global / micro_batches;
            match model.coupling() {
                Coupling::Independent => {}
                Coupling::Groups(n) if b.is_multiple_of(n) => {}
                Coupling::Groups(n) => {
                    return Err(CovnoiseError::Unsupported(format!(
                        "micro-batches of {b} examples would split ghost batches of {n}; choose micro-batches whose size is a multiple of the ghost batch"
                    )));
                }
                Coupling::WholeBatch => {
                    return Err(CovnoiseError::Unsupported(
                        "batch normalization over the whole batch would change if the batch were split into micro-batches; use --ghost-batch N with N dividing the micro-batch size".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Divides summed tensors in place.
fn scale_all(tensors: &mut [Tensor<2>], factor: f64) {
    for t in tensors.iter_mut() {
        *t = t.clone() * factor as f32;
    }
}

/// The plain mean gradient (no estimator), summed over the process group.
pub fn plain_gradient(
    model: &mut dyn GradientModel,
    batch: &Batch,
    ctx: &StepContext,
) -> Result<StepGradient> {
    let out = model.backward(
        batch,
        &BackwardRequest {
            update_running_stats: true,
            ..Default::default()
        },
    )?;
    reduce_step(out.grads, out.loss, out.correct, batch.len(), None, ctx)
}

/// Sums a local mean gradient (and optional local second-moment sums) over
/// the group with one all-reduce, and normalizes both.
pub(crate) fn reduce_step(
    mut grads: Vec<Tensor<2>>,
    loss: f64,
    correct: usize,
    local: usize,
    moment_sums: Option<SecondMoment>,
    ctx: &StepContext,
) -> Result<StepGradient> {
    let world = ctx.collective.world_size();
    let global = local * world;
    let n_grads = grads.len();
    let mut scalars = vec![loss, correct as f64, 0.0];
    let moment = match moment_sums {
        Some(SecondMoment::Diag(d)) => {
            grads.extend(d);
            all_reduce_packed(ctx.collective, &mut grads, &mut scalars)?;
            let mut d = grads.split_off(n_grads);
            scale_all(&mut d, 1.0 / global as f64);
            Some(SecondMoment::Diag(d))
        }
        Some(SecondMoment::Trace(t)) => {
            scalars[2] = t;
            all_reduce_packed(ctx.collective, &mut grads, &mut scalars)?;
            Some(SecondMoment::Trace(scalars[2] / global as f64))
        }
        None => {
            all_reduce_packed(ctx.collective, &mut grads, &mut scalars)?;
            None
        }
    };
    if world > 1 {
        scale_all(&mut grads, 1.0 / world as f64);
    }
    Ok(StepGradient {
        grads,
        loss: scalars[0] / world as f64,
        correct: scalars[1].round() as usize,
        examples: global,
        moment,
    })
}

/// The mean gradient and a fresh estimate of diag(S) (or its trace) by
/// `estimator`, over the whole process group.
pub fn estimate(
    model: &mut dyn GradientModel,
    batch: &Batch,
    estimator: Estimator,
    kind: MomentKind,
    ctx: &StepContext,
) -> Result<StepGradient> {
    let world = ctx.collective.world_size();
    validate(estimator, model, batch.len(), world)?;
    match estimator {
        Estimator::Exact | Estimator::McFisher => {
            let mc = estimator == Estimator::McFisher;
            // The step's gradient always uses the data labels; the exact
            // estimator takes its per-example factors from the same pass.
            let mut out = model.backward(
                batch,
                &BackwardRequest {
                    per_example: !mc,
                    update_running_stats: true,
                    ..Default::default()
                },
            )?;
            if mc {
                // A second pass with labels drawn from the model, for the
                // per-example factors only.
                let sampled = sample_labels(&out.logits, ctx, batch.len())?;
                out.factors = model
                    .backward(
                        batch,
                        &BackwardRequest {
                            labels: Some(&sampled),
                            per_example: true,
                            skip_param_grads: true,
                            ..Default::default()
                        },
                    )?
                    .factors;
            }
            let sums = exact::moment_sums(&out.factors, model.param_info(), kind)?;
            reduce_step(
                out.grads,
                out.loss,
                out.correct,
                batch.len(),
                Some(sums),
                ctx,
            )
        }
        Estimator::Microbatch { micro_batches } => {
            microbatch(model, batch, micro_batches, kind, ctx)
        }
    }
}

/// Labels drawn from the model's predictive distribution softmax(logits).
/// One uniform number per example of the global batch is drawn from
/// `(seed, step)`, so the labels do not depend on how the batch is sharded.
fn sample_labels(logits: &Tensor<2>, ctx: &StepContext, local: usize) -> Result<Vec<u8>> {
    let [b, classes] = logits.dims();
    let probs = to_vec(&burn::tensor::activation::softmax(logits.clone(), 1))?;
    let mut rng = keyed_rng(ctx.seed, ctx.step, stream::MC_LABELS, 0);
    let offset = ctx.collective.rank() * local;
    let uniforms: Vec<f64> = (0..offset + b).map(|_| rng.random::<f64>()).collect();
    Ok((0..b)
        .map(|i| {
            let u = uniforms[offset + i];
            let row = &probs[i * classes..(i + 1) * classes];
            let mut acc = 0.0f64;
            for (c, &p) in row.iter().enumerate() {
                acc += p as f64;
                if u < acc {
                    return c as u8;
                }
            }
            (classes - 1) as u8
        })
        .collect())
}

/// The micro-batch estimator: M micro-batch gradients g_j (this process
/// holds M/K of them), mean g, and `b/(M-1) sum_j (g_j - g)^2`.
///
/// The centered sum is formed around the global mean after a first
/// all-reduce (rather than from raw sums of squares), which avoids the
/// cancellation of `sum g_j^2 - M g^2` in float32.
fn microbatch(
    model: &mut dyn GradientModel,
    batch: &Batch,
    micro_batches: usize,
    kind: MomentKind,
    ctx: &StepContext,
) -> Result<StepGradient> {
    let world = ctx.collective.world_size();
    let local_m = micro_batches / world;
    let b = batch.len() / local_m;
    let mut micro_grads = Vec::with_capacity(local_m);
    let mut loss = 0.0;
    let mut correct = 0;
    for j in 0..local_m {
        let out = model.backward(
            &batch.slice(j * b, b),
            &BackwardRequest {
                update_running_stats: true,
                ..Default::default()
            },
        )?;
        loss += out.loss / local_m as f64;
        correct += out.correct;
        micro_grads.push(out.grads);
    }
    let mut sum: Vec<Tensor<2>> = micro_grads[0].clone();
    for g in &micro_grads[1..] {
        for (s, t) in sum.iter_mut().zip(g) {
            *s = s.clone() + t.clone();
        }
    }
    // sum is (sum over local micro-batches); after the reduce, the global sum.
    let mut reduced = reduce_step(sum, loss, correct, batch.len(), None, ctx)?;
    // finish_plain averaged over processes; turn the sum into the mean over M.
    scale_all(&mut reduced.grads, world as f64 / micro_batches as f64);
    let mean = &reduced.grads;
    let factor = b as f64 / (micro_batches as f64 - 1.0);
    let mut centered: Vec<Tensor<2>> = mean.iter().map(|m| m.zeros_like()).collect();
    for g in &micro_grads {
        for ((c, gj), m) in centered.iter_mut().zip(g).zip(mean) {
            *c = c.clone() + (gj.clone() - m.clone()).square();
        }
    }
    let moment = match kind {
        MomentKind::Diag => {
            all_reduce_packed(ctx.collective, &mut centered, &mut [])?;
            scale_all(&mut centered, factor);
            SecondMoment::Diag(centered)
        }
        MomentKind::Trace => {
            let mut t = [centered
                .iter()
                .map(|c| scalar(c.clone().sum()))
                .sum::<f64>()];
            all_reduce_packed(ctx.collective, &mut [], &mut t)?;
            SecondMoment::Trace(t[0] * factor)
        }
    };
    reduced.moment = Some(moment);
    Ok(reduced)
}
