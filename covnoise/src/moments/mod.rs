//! Estimators of the gradient's second moment on the current large batch,
//! and their smoothing across steps, for any burn module.
//!
//! Conventions (written down because they matter):
//! - `exact` and `mc-fisher` estimate the *uncentered* diagonal Fisher
//!   `diag(F_B) = (1/B) sum_i (grad l_i)^2`; with several processes B is the
//!   global batch.
//! - `microbatch` estimates the *centered* per-example covariance
//!   `diag(Sigma)` by `b/(M-1) sum_j (g_j - g)^2` over M micro-batches of b
//!   examples (unbiased when micro-batches are independent draws). The
//!   g_j come from one pass over the batch where the exact rules cover
//!   every parameter ([`MicroBatchPasses::OneThroughRules`],
//!   [`PassRequest::group_size`]), else from one pass each.
//! - Every estimate is per example (not divided by B), so the noise scale c
//!   alone carries the batch-size dependence.
//! - Gradients and estimates are flat rank-1 tensors in the order of the
//!   model's [`ParamTable`].

pub mod exact;
mod smoothing;

pub use smoothing::{MomentValues, Smoother, SmootherState};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use rand::RngExt;

use crate::collective::{Collective, all_reduce_packed};
use crate::error::{CovnoiseError, Remedy, Result};
use crate::model::{
    Coupling, Examples, Forward, Objective, Probes, count_correct, cross_entropy_per_example,
};
use crate::params::ParamTable;
use crate::probes::{GroupShifts, ProbedLayer};
use crate::rng::{keyed_rng, stream};
use crate::tensor_util::{scalar, to_vec};

/// How diag(F) (or diag(Sigma)) is estimated on the large batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Estimator {
    /// Exact per-example squared gradients of the probed Linear and Conv2d
    /// layers (the reference).
    Exact,
    /// Centered variance of M micro-batch gradients (M >= 2, over all
    /// processes together). Needs nothing from the model but its loss.
    Microbatch {
        /// Number of micro-batches M the global batch is split into.
        micro_batches: usize,
    },
    /// As `exact`, with labels sampled from the model's own predictive
    /// distribution (the true, Monte-Carlo Fisher).
    McFisher,
}

impl Estimator {
    /// The micro-batch estimator over `micro_batches` micro-batches (>= 2).
    pub fn microbatch(micro_batches: usize) -> Self {
        Estimator::Microbatch { micro_batches }
    }
}

/// Whether the full diagonal or only its trace is wanted (isotropic noise
/// needs only the trace, which is cheaper).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MomentKind {
    /// The diagonal, one flat tensor per parameter.
    Diag,
    /// Only the sum of the diagonal.
    Trace,
}

/// An estimate of the diagonal second moment S (per example).
#[derive(Debug, Clone)]
pub enum SecondMoment {
    /// diag(S), one flat tensor per parameter in table order.
    Diag(Vec<Tensor<1>>),
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
            (SecondMoment::Diag(x), SecondMoment::Diag(y)) if x.len() == y.len() => {
                Ok(SecondMoment::Diag(
                    x.iter()
                        .zip(y)
                        .map(|(x, y)| x.clone() * a as f32 + y.clone() * b as f32)
                        .collect(),
                ))
            }
            (SecondMoment::Trace(x), SecondMoment::Trace(y)) => {
                Ok(SecondMoment::Trace(x * a + y * b))
            }
            _ => Err(CovnoiseError::Shape(
                "cannot combine second moments of different kinds or parameter counts".into(),
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

/// How the micro-batch estimator (and a penalty's micro-batches) form the
/// micro-batch gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MicroBatchPasses {
    /// One forward and backward pass per micro-batch: any model.
    #[default]
    PerMicroBatch,
    /// All of them from one pass over the batch, through the layers' exact
    /// rules ([`PassRequest::group_size`]): every parameter must be covered
    /// by a rule whose per-example gradients add up (a parameter without
    /// one is refused by name; [`NoiseStage::validate_model`](crate::noise::NoiseStage::validate_model)
    /// checks both and picks this where they hold). With ghost batch norm
    /// the micro-batches are whole ghost batches and the rules' sums over
    /// them are exact (a batch norm's rule gives only those); with batch
    /// norm over the whole batch the micro-batch estimator runs one pass
    /// per micro-batch.
    OneThroughRules,
    /// As [`MicroBatchPasses::OneThroughRules`], and the penalties' passes
    /// at the moved parameters `theta + eps_m g_m`, which differ per
    /// micro-batch, run as one pass too ([`PassRequest::shifts`]): every
    /// parameter must also be in one of covnoise's own probed layers, which
    /// run each group of examples at its own parameters (not in a layer
    /// with a user's rule, nor a batch norm: see
    /// [`Probes::unmovable_params`]).
    OneThroughRulesAndShifts,
}

impl MicroBatchPasses {
    /// Whether the micro-batch gradients at theta come from one pass.
    pub fn one_pass(self) -> bool {
        self != MicroBatchPasses::PerMicroBatch
    }
}

/// Where a step stands: the seed and step that key its randomness, the
/// process group its batch is spread over, and the model's parameters.
pub struct StepContext<'a> {
    /// Seed shared by all processes.
    pub seed: u64,
    /// Global optimizer step (0-based).
    pub step: u64,
    /// The process group (a single process by default).
    pub collective: &'a dyn Collective,
    /// The model's trainable parameters.
    pub table: &'a ParamTable,
    /// How the model's examples interact.
    pub coupling: Coupling,
    /// Run forward and backward passes over at most this many examples at a
    /// time, accumulating (see [`PassRequest::chunk`]); None: whole batches.
    pub chunk: Option<usize>,
}

impl StepContext<'_> {
    /// The chunk a pass over these examples may use: [`StepContext::chunk`]
    /// when the examples may be split there (independent examples, or ghost
    /// groups that the chunk size keeps whole), else None.
    pub fn pass_chunk(&self) -> Option<usize> {
        let c = self.chunk?;
        match self.coupling {
            Coupling::Independent => Some(c),
            Coupling::Groups(g) if c.is_multiple_of(g) => Some(c),
            _ => None,
        }
    }
}

/// The mean gradient over the global batch, its loss and accuracy counts, and
/// (when an estimator ran) a fresh second-moment estimate.
#[derive(Debug, Clone)]
pub struct StepGradient {
    /// Mean gradient over the global batch, flat, in table order.
    pub grads: Vec<Tensor<1>>,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Correct predictions in the global batch (classifiers only).
    pub correct: Option<usize>,
    /// Examples in the global batch.
    pub examples: usize,
    /// A fresh estimate, when one was computed this step.
    pub moment: Option<SecondMoment>,
}

/// What one forward + backward pass should differentiate and return.
#[derive(Debug, Clone, Default)]
pub struct PassRequest<'a> {
    /// Per-example loss weights `w_i`: the differentiated objective is
    /// `(1/n) sum_i w_i l_i` (default all ones). Used by the multiplicative
    /// full-Fisher sampler.
    pub weights: Option<&'a [f32]>,
    /// Labels to differentiate against instead of the batch's own (the
    /// Monte-Carlo Fisher samples them from the model); classifiers only.
    pub labels: Option<Tensor<1, Int>>,
    /// Record the probed layers and return them with their output
    /// gradients ([`Pass::layers`]); a pass over one chunk only (it ignores
    /// [`PassRequest::chunk`]).
    pub probes: bool,
    /// Sum the squared per-example gradients of each example's own loss
    /// (the exact rules of the probed layers, [`exact::moment_sums`]) into
    /// [`Pass::moment_sums`], chunk by chunk: the layers of one chunk are all
    /// that is held.
    pub moments: Option<MomentKind>,
    /// Skip the parameter gradients (only per-example factors are wanted).
    pub skip_param_grads: bool,
    /// Also form the gradients of consecutive groups of this many examples
    /// (micro-batch gradients, each of its group's mean objective) from the
    /// probed layers' rules ([`exact::group_sums`]) into
    /// [`Pass::group_grads`]. The pass's gradient is then their mean (the
    /// batch's), and the backward pass runs on a frozen copy of the model,
    /// whose only weight products are the rules' group products. The batch, and [`PassRequest::chunk`] when
    /// set, must be whole numbers of groups, and every parameter must be
    /// covered by a rule; exact where examples of different groups do not
    /// interact (ghost batch norm over batches the groups keep whole). A
    /// batch norm over the whole batch normalizes each group alone, as one
    /// pass per group would.
    pub group_size: Option<usize>,
    /// Run each of the batch's consecutive groups of examples at parameters
    /// of its own, `theta + s_j` ([`Probes::shifted`]): the gradient is then
    /// the sum over the groups of each group's share of the objective's
    /// gradient at its own parameters (a penalty's finite differences for
    /// all micro-batches in one pass). The batch, and
    /// [`PassRequest::chunk`] when set, must be whole numbers of the shifts'
    /// groups; a probed layer that cannot move its parameters
    /// ([`Probes::unshifted_layers`]) is refused. A moved parameter used
    /// outside covnoise's probed layers would run at theta unseen: the
    /// stage runs such passes only after its dry run has checked that every
    /// parameter is used inside them ([`NoiseStage::validate_model`](crate::noise::NoiseStage::validate_model)). Records nothing: not with
    /// [`PassRequest::probes`], [`PassRequest::moments`] or
    /// [`PassRequest::group_size`].
    pub shifts: Option<GroupShifts>,
    /// With [`PassRequest::group_size`]: return the groups' gradients
    /// summarized ([`Pass::group_summary`]: their mean and centered sum of
    /// squares, all that the micro-batch estimator needs) instead of
    /// [`Pass::group_grads`], so that a layer whose backward step can
    /// form them directly keeps no `[groups, numel]` rows
    /// ([`ExactRule::group_moments`](crate::probes::ExactRule::group_moments)).
    pub group_summary: bool,
    /// Split the batch into passes over at most this many examples and
    /// accumulate: the same gradients, loss, predictions and factors up to
    /// float rounding, with the activations of one chunk alive at a time.
    /// Only for examples that may be split there (see
    /// [`StepContext::pass_chunk`]).
    pub chunk: Option<usize>,
}

/// The gradients of consecutive groups of examples (micro-batches) from one
/// pass ([`PassRequest::group_size`]): per parameter, in table order, the
/// rules' group sums `[groups, numel]`, and the factor that turns a row
/// into its group's mean gradient. The factor is kept apart because
/// rewriting `groups x numel` values only to scale them cost as much as the
/// group products themselves; the methods apply it to what they return.
#[derive(Debug, Clone)]
pub struct GroupGrads {
    /// Group sums per parameter, `[groups, numel]`, table order.
    pub sums: Vec<Tensor<2>>,
    /// Turns a row of [`GroupGrads::sums`] into its group's mean gradient.
    pub scale: f32,
    /// The groups' squared norms `Σ_params Σ_c row²` (unscaled), where the
    /// pass read them in the same read as the rows' mean: reading `[groups,
    /// numel]` rows again cost a penalty's step a twentieth of its time on
    /// the MLP. They are of [`GroupGrads::sums`] as the pass returned them.
    row_squares: Option<Vec<f64>>,
}

impl GroupGrads {
    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.sums.first().map_or(0, |t| t.dims()[0])
    }

    /// Group `j`'s mean gradient, flat, in table order.
    pub fn group(&self, j: usize) -> Vec<Tensor<1>> {
        self.sums
            .iter()
            .map(|t| {
                let numel = t.dims()[1];
                t.clone().narrow(0, j, 1).reshape([numel]) * self.scale
            })
            .collect()
    }

    /// The groups' rows from one pass (`scale` turns a row into its
    /// group's mean gradient).
    pub(crate) fn new(sums: Vec<Tensor<2>>, scale: f32) -> Self {
        Self {
            sums,
            scale,
            row_squares: None,
        }
    }

    /// [`GroupGrads::mean`], and each group's squared norm kept for
    /// [`GroupGrads::squared_norms`], from one read of the rows where the
    /// fast kernel runs.
    pub(crate) fn mean_keeping_norms(&mut self) -> Vec<Tensor<1>> {
        let mut squares = vec![0.0f64; self.groups()];
        let mut means = Vec::with_capacity(self.sums.len());
        for t in &self.sums {
            let Some((mean, rows)) = crate::kernels::row_mean_and_square_sums(t) else {
                return self.mean();
            };
            let Ok(rows) = crate::tensor_util::to_vec(&rows) else {
                return self.mean();
            };
            for (s, v) in squares.iter_mut().zip(rows) {
                *s += v as f64;
            }
            means.push(mean * self.scale);
        }
        self.row_squares = Some(squares);
        means
    }

    /// `‖g_j‖²` for each group's mean gradient `g_j` over all parameters,
    /// as `f64`: kept by the pass where it read the rows for their mean,
    /// else from one read of the rows (one host read either way).
    pub fn squared_norms(&self) -> Result<Vec<f64>> {
        let s2 = self.scale as f64 * self.scale as f64;
        if let Some(rows) = &self.row_squares {
            return Ok(rows.iter().map(|v| v * s2).collect());
        }
        let g = self.groups();
        let per_group = self
            .sums
            .iter()
            .map(|t| {
                crate::kernels::row_square_sums(t)
                    .unwrap_or_else(|| t.clone().square().sum_dim(1).reshape([g]))
            })
            .reduce(|a, c| a + c)
            .ok_or_else(|| CovnoiseError::Shape("no parameters in the groups".into()))?;
        Ok(crate::tensor_util::to_vec(&per_group)?
            .into_iter()
            .map(|v| v as f64 * s2)
            .collect())
    }

    /// `Σ_j w_j g_j` over the groups' mean gradients `g_j`, flat, in table
    /// order, in one read of the rows where the fast kernel runs.
    ///
    /// # Panics
    /// If `w` does not hold one weight per group.
    pub fn weighted_sum(&self, w: &[f32]) -> Vec<Tensor<1>> {
        let groups = self.groups();
        assert_eq!(w.len(), groups, "one weight for each of {groups} groups");
        let w: Vec<f32> = w.iter().map(|&v| v * self.scale).collect();
        self.sums
            .iter()
            .map(|t| {
                let [g, numel] = t.dims();
                crate::kernels::weighted_row_sum(t, &w).unwrap_or_else(|| {
                    crate::tensor_util::from_vec(w.clone(), [1, g], &t.device())
                        .matmul(t.clone())
                        .reshape([numel])
                })
            })
            .collect()
    }

    /// The mean of the groups' mean gradients (the batch's, for equal
    /// groups), flat, in table order.
    pub fn mean(&self) -> Vec<Tensor<1>> {
        self.sums
            .iter()
            .map(|t| {
                let numel = t.dims()[1];
                crate::kernels::row_mean(t)
                    .unwrap_or_else(|| t.clone().mean_dim(0).reshape([numel]))
                    * self.scale
            })
            .collect()
    }

    /// `sum_j (g_j - mean)^2` per parameter over the groups' mean gradients
    /// `g_j`, flat, in table order: `scale^2 sum_j (s_j - mean / scale)^2`
    /// over the rows `s_j`: on the fast kernel in one read of the rows
    /// ([`crate::kernels::centered_square_sum`]), elsewhere one flat row
    /// at a time (on flex a broadcast subtraction and a sum over the
    /// first dimension of `[groups, numel]` ran 6 times slower than that).
    pub fn centered_squares(&self, mean: &[Tensor<1>]) -> Vec<Tensor<1>> {
        let s = self.scale;
        self.sums
            .iter()
            .zip(mean)
            .map(|(t, m)| {
                let [rows, numel] = t.dims();
                let m = m.clone() / s;
                if let Some(c) = crate::kernels::centered_square_sum(t, &m) {
                    return c * (s * s);
                }
                (0..rows)
                    .map(|j| (t.clone().narrow(0, j, 1).reshape([numel]) - m.clone()).square())
                    .reduce(|acc, sq| acc + sq)
                    .expect("at least one group")
                    * (s * s)
            })
            .collect()
    }

    /// These groups followed by `other`'s (the next chunk of a batch).
    fn then(self, other: GroupGrads) -> GroupGrads {
        let ratio = other.scale / self.scale;
        let sums = self
            .sums
            .into_iter()
            .zip(other.sums)
            .map(|(a, b)| {
                // Chunks of equal size share their scale; a shorter last
                // chunk's rows are brought to the first chunk's.
                let b = if ratio == 1.0 { b } else { b * ratio };
                Tensor::cat(vec![a, b], 0)
            })
            .collect();
        // The other chunk's rows were scaled by `ratio`, their squares by
        // its square.
        let row_squares = match (self.row_squares, other.row_squares) {
            (Some(mut a), Some(b)) => {
                let r2 = ratio as f64 * ratio as f64;
                a.extend(b.into_iter().map(|v| v * r2));
                Some(a)
            }
            _ => None,
        };
        GroupGrads {
            sums,
            scale: self.scale,
            row_squares,
        }
    }
}

/// The gradients of consecutive groups of examples from one pass,
/// summarized ([`PassRequest::group_summary`]): per parameter, in table
/// order, the mean of the groups' mean gradients g_j and their centered
/// sum of squares `Σ_j (g_j - ḡ)²`.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    /// Number of groups.
    pub groups: usize,
    /// `ḡ`, the mean of the groups' mean gradients, flat.
    pub mean: Vec<Tensor<1>>,
    /// `Σ_j (g_j - ḡ)²`, flat.
    pub centered: Vec<Tensor<1>>,
}

impl GroupSummary {
    /// `Σ_j (g_j - m)²` around another mean `m` (the mean over all
    /// processes' groups): `Σ_j (g_j - ḡ)² + G (ḡ - m)²`, two non-negative
    /// terms, so no cancellation.
    pub fn centered_squares(&self, around: &[Tensor<1>]) -> Vec<Tensor<1>> {
        let g = self.groups as f32;
        self.centered
            .iter()
            .zip(&self.mean)
            .zip(around)
            .map(|((c, own), m)| c.clone() + (own.clone() - m.clone()).square() * g)
            .collect()
    }

    /// These groups followed by `other`'s (the next chunk of a batch):
    /// the pairwise merge of means and centered sums (Chan et al.),
    /// `C_a + C_b + δ² n_a n_b / n` with δ the difference of the means.
    fn then(self, other: GroupSummary) -> GroupSummary {
        let (na, nb) = (self.groups as f32, other.groups as f32);
        let n = na + nb;
        let mut mean = Vec::with_capacity(self.mean.len());
        let mut centered = Vec::with_capacity(self.mean.len());
        for (((ma, ca), mb), cb) in self
            .mean
            .into_iter()
            .zip(self.centered)
            .zip(other.mean)
            .zip(other.centered)
        {
            let delta = mb - ma.clone();
            centered.push(ca + cb + delta.clone().square() * (na * nb / n));
            mean.push(ma + delta * (nb / n));
        }
        GroupSummary {
            groups: self.groups + other.groups,
            mean,
            centered,
        }
    }
}

/// The result of one forward + backward pass over `n` examples.
#[derive(Debug)]
pub struct Pass {
    /// Gradient of the (weighted) mean objective, flat, in table order;
    /// empty when [`PassRequest::skip_param_grads`] was set.
    pub grads: Vec<Tensor<1>>,
    /// Sum over the examples of their unweighted loss (own labels); 0 for a
    /// pass that skipped the parameter gradients.
    pub loss_sum: f64,
    /// Correct arg-max predictions (classifiers only; None for a pass that
    /// skipped the parameter gradients).
    pub correct: Option<usize>,
    /// Logits without autodiff graph (classifiers only).
    pub logits: Option<Tensor<2>>,
    /// The probed layers with their output gradients, when
    /// [`PassRequest::probes`] asked for them.
    pub layers: Vec<ProbedLayer>,
    /// Sums over the examples of their squared per-example gradients, when
    /// [`PassRequest::moments`] asked for them (not divided by the examples).
    pub moment_sums: Option<SecondMoment>,
    /// The groups' gradients, when [`PassRequest::group_size`] asked for
    /// them (and not [`PassRequest::group_summary`]).
    pub group_grads: Option<GroupGrads>,
    /// The groups' gradients summarized, when
    /// [`PassRequest::group_summary`] asked for them.
    pub group_summary: Option<GroupSummary>,
    /// Number of examples.
    pub examples: usize,
}

/// One forward pass of `forward` over `batch` and one backward pass of the
/// requested objective. Works for any module on an autodiff device.
pub fn backward_pass<M, B, F>(
    model: &M,
    table: &ParamTable,
    batch: &B,
    forward: &F,
    request: PassRequest,
) -> Result<Pass>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let n = batch.len();
    if n == 0 {
        return Err(CovnoiseError::Shape("empty batch".into()));
    }
    if request.weights.is_some_and(|w| w.len() != n) {
        return Err(CovnoiseError::Shape(
            "example weights do not match the batch size".into(),
        ));
    }
    if let Some(b) = request.group_size {
        let whole = |m: usize| b > 0 && m.is_multiple_of(b);
        if !whole(n) || request.chunk.is_some_and(|c| c < n && !whole(c)) {
            return Err(CovnoiseError::Shape(format!(
                "a pass over {n} examples (chunks of {:?}) cannot form the gradients of groups of {b}",
                request.chunk
            )));
        }
    }
    if let Some(shifts) = &request.shifts {
        let b = shifts.group_size();
        let whole = |m: usize| m.is_multiple_of(b);
        if n != shifts.groups() * b || request.chunk.is_some_and(|c| c < n && !whole(c)) {
            return Err(CovnoiseError::Shape(format!(
                "a pass over {n} examples (chunks of {:?}) cannot run {} groups of {b} at shifted parameters",
                request.chunk,
                shifts.groups()
            )));
        }
        if request.probes || request.moments.is_some() || request.group_size.is_some() {
            return Err(CovnoiseError::Unsupported(
                "a pass at shifted parameters records no layers".into(),
            ));
        }
    }
    if let Some(chunk) = request
        .chunk
        .filter(|&c| c >= 1 && c < n && !request.probes)
    {
        return chunked_pass(model, table, batch, forward, request, chunk);
    }
    // Without parameter gradients the backward pass only needs to reach the
    // probes: a frozen copy (shared tensors) skips the weight products. A
    // pass for group gradients takes its parameter gradients from them
    // (their mean is the batch's), so it skips them too.
    let frozen;
    let frozen_pass = request.skip_param_grads || request.group_size.is_some();
    let model = if frozen_pass {
        frozen = model.clone().no_grad();
        &frozen
    } else {
        model
    };
    let record = request.probes || request.moments.is_some() || request.group_size.is_some();
    let summary = request.group_summary && request.group_size.is_some();
    let mut probes = match &request.shifts {
        Some(shifts) => Probes::shifted(shifts.clone()),
        None if record && summary => {
            Probes::recording(frozen_pass, request.group_size).summarizing_groups()
        }
        None if record => Probes::recording(frozen_pass, request.group_size),
        None => Probes::off(),
    };
    let objective = forward(model, batch, &mut probes);
    if let Some(layer) = probes.unshifted_layers().first() {
        return Err(CovnoiseError::Unsupported(format!(
            "a pass at shifted parameters met a {layer} layer that computes its output at the unshifted parameters (a user's rule or a batch norm); such a model runs one pass per micro-batch"
        )));
    }
    if objective.len() != n {
        return Err(CovnoiseError::Shape(format!(
            "the forward pass returned {} losses for a batch of {n}",
            objective.len()
        )));
    }
    let own_losses = objective.losses();
    let differentiated = match (&request.labels, &objective) {
        (None, _) => own_losses.clone(),
        (Some(labels), Objective::Classification { logits, .. }) => {
            cross_entropy_per_example(logits.clone(), labels.clone())
        }
        (Some(_), Objective::Losses(_)) => {
            return Err(CovnoiseError::Unsupported(
                "the mc-fisher estimator samples labels from the model's predictions, so the forward pass must return Objective::Classification".into(),
            ));
        }
    };
    let device = own_losses.device();
    let value = match request.weights {
        Some(w) => {
            let w =
                Tensor::<1>::from_data(TensorData::new(w.to_vec(), [n]), &device.clone().inner());
            (differentiated * w).sum() / n as f32
        }
        None => differentiated.mean(),
    };
    // A factors-only pass (the Monte-Carlo Fisher's second pass) reports no
    // loss or accuracy: the step's first pass already did, and each costs a
    // host read.
    let report = !request.skip_param_grads;
    let loss_sum = if report {
        scalar(own_losses.detach().inner().sum())
    } else {
        0.0
    };
    let (correct, logits) = match &objective {
        Objective::Classification { logits, labels } => (
            if report {
                Some(count_correct(logits, labels)?)
            } else {
                None
            },
            Some(logits.clone().detach().inner()),
        ),
        Objective::Losses(_) => (None, None),
    };
    let mut gradients = value.backward();
    let recorded = if record {
        probes.into_layers(&gradients, n, table)?
    } else {
        Vec::new()
    };
    // The objective is a mean over the n examples: n times a probe gradient
    // is one example's own gradient.
    let moment_sums = match request.moments {
        Some(kind) => Some(exact::moment_sums(&recorded, table, n as f32, kind)?),
        None => None,
    };
    // The probe gradients are of the mean over the n examples: n / b
    // times a group's sum is its mean gradient.
    let (mut group_grads, group_summary) = match request.group_size {
        Some(b) if summary => {
            let (groups, sums, centered) = exact::group_moments(&recorded, table, b)?;
            // A row's sum is 1/scale of its group's mean gradient.
            let scale = (n / b) as f32;
            let summary = GroupSummary {
                groups,
                mean: sums
                    .into_iter()
                    .map(|t| t * (scale / groups as f32))
                    .collect(),
                centered: centered.into_iter().map(|t| t * (scale * scale)).collect(),
            };
            (None, Some(summary))
        }
        Some(b) => {
            let grads = GroupGrads::new(exact::group_sums(&recorded, table, b)?, (n / b) as f32);
            (Some(grads), None)
        }
        None => (None, None),
    };
    let layers = if request.probes { recorded } else { Vec::new() };
    let grads = if request.skip_param_grads {
        Vec::new()
    } else if let Some(groups) = &mut group_grads {
        groups.mean_keeping_norms()
    } else if let Some(summary) = &group_summary {
        summary.mean.clone()
    } else {
        let mut params = GradientsParams::from_module(&mut gradients, model);
        table.flatten(&mut params, &device.inner())?
    };
    Ok(Pass {
        grads,
        loss_sum,
        correct,
        logits,
        layers,
        moment_sums,
        group_grads,
        group_summary,
        examples: n,
    })
}

/// [`backward_pass`] over consecutive chunks of at most `chunk` examples,
/// combined into the pass over the whole batch: each chunk's gradients are
/// of its own mean objective, so they are weighted by the chunk's share of
/// the batch; its moment sums are already of each example's own loss, and
/// add up.
fn chunked_pass<M, B, F>(
    model: &M,
    table: &ParamTable,
    batch: &B,
    forward: &F,
    request: PassRequest,
    chunk: usize,
) -> Result<Pass>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let n = batch.len();
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    let shares: Vec<f64> = starts
        .iter()
        .map(|&s| chunk.min(n - s) as f64 / n as f64)
        .collect();
    let passes = parts_with_one_buffer_update(model, &shares, |j| {
        let (start, len) = (starts[j], chunk.min(n - starts[j]));
        let part = PassRequest {
            weights: request.weights.map(|w| &w[start..start + len]),
            labels: request.labels.clone().map(|l| l.narrow(0, start, len)),
            shifts: request.shifts.as_ref().map(|s| {
                let b = s.group_size();
                s.narrow(start / b, len / b)
            }),
            chunk: None,
            ..request.clone()
        };
        let mut pass = backward_pass(model, table, &batch.slice(start, len), forward, part)?;
        let share = len as f32 / n as f32;
        pass.grads.iter_mut().for_each(|g| *g = g.clone() * share);
        Ok(pass)
    })?;
    let mut total: Option<Pass> = None;
    for pass in passes {
        total = Some(match total {
            None => pass,
            Some(t) => combine_passes(t, pass)?,
        });
    }
    Ok(total.expect("a non-empty batch has a chunk"))
}

/// Runs one part of a step per entry of `shares` (part j holds that share
/// of the batch's examples) so that the model's buffers (batch-norm running
/// statistics, any float tensor that takes no gradient) end as after one
/// pass over the whole batch: every part starts from the buffers the step
/// started with, and the buffers end at the parts' results averaged by
/// their shares. For a running average `r <- (1 - m) r + m s` of a batch
/// statistic that is the mean of its groups' statistics (batch norm over
/// ghost groups), that is exactly the whole batch's single update.
pub fn parts_with_one_buffer_update<M: Module, T>(
    model: &M,
    shares: &[f64],
    mut part: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<T>> {
    // valid() folds running-state updates still pending on other threads
    // into the shared value, so that the buffers read here are current.
    let buffers = |m: &M| {
        let _ = m.valid();
        crate::params::flat_values(m, false)
    };
    let before = if shares.len() > 1 {
        buffers(model)
    } else {
        Vec::new()
    };
    if before.is_empty() {
        return (0..shares.len()).map(part).collect();
    }
    let mut results = Vec::with_capacity(shares.len());
    let mut average: Option<Vec<Tensor<1>>> = None;
    for (j, &share) in shares.iter().enumerate() {
        if j > 0 {
            crate::params::replace_buffers(model.clone(), before.clone());
        }
        results.push(part(j)?);
        let after = buffers(model).into_iter().map(|b| b * share as f32);
        average = Some(match average {
            None => after.collect(),
            Some(acc) => acc.into_iter().zip(after).map(|(a, b)| a + b).collect(),
        });
    }
    crate::params::replace_buffers(model.clone(), average.expect("at least two parts"));
    Ok(results)
}

/// Runs `f` and then puts the model's buffers (running statistics) back as
/// they were: a dry run must not move them.
pub fn keeping_buffers<M: Module, T>(model: &M, f: impl FnOnce() -> Result<T>) -> Result<T> {
    // valid() folds running-state updates pending on other threads into
    // the shared value before it is read or replaced.
    let _ = model.valid();
    let before = crate::params::flat_values(model, false);
    let out = f();
    if !before.is_empty() {
        let _ = model.valid();
        crate::params::replace_buffers(model.clone(), before);
    }
    out
}

/// The pass over the examples of `a` followed by those of `b`.
fn combine_passes(a: Pass, b: Pass) -> Result<Pass> {
    if a.grads.len() != b.grads.len() {
        return Err(CovnoiseError::Shape(
            "two chunks of a batch gave gradients of different parameters".into(),
        ));
    }
    let cat2 = |x: Tensor<2>, y: Tensor<2>| Tensor::cat(vec![x, y], 0);
    let moment_sums = match (a.moment_sums, b.moment_sums) {
        (Some(x), Some(y)) => Some(x.combine(1.0, &y, 1.0)?),
        (None, None) => None,
        _ => {
            return Err(CovnoiseError::Shape(
                "two chunks of a batch disagree on moment sums".into(),
            ));
        }
    };
    Ok(Pass {
        grads: a
            .grads
            .into_iter()
            .zip(b.grads)
            .map(|(x, y)| x + y)
            .collect(),
        loss_sum: a.loss_sum + b.loss_sum,
        correct: match (a.correct, b.correct) {
            (Some(x), Some(y)) => Some(x + y),
            _ => None,
        },
        logits: match (a.logits, b.logits) {
            (Some(x), Some(y)) => Some(cat2(x, y)),
            _ => None,
        },
        layers: Vec::new(),
        moment_sums,
        group_grads: match (a.group_grads, b.group_grads) {
            (Some(x), Some(y)) => Some(x.then(y)),
            _ => None,
        },
        group_summary: match (a.group_summary, b.group_summary) {
            (Some(x), Some(y)) => Some(x.then(y)),
            _ => None,
        },
        examples: a.examples + b.examples,
    })
}

/// Checks that `estimator` can run on a model with `coupling`, with a local
/// batch of `local_batch` examples on `world` processes.
pub fn validate(
    estimator: Estimator,
    coupling: Coupling,
    local_batch: usize,
    world: usize,
) -> Result<()> {
    match estimator {
        Estimator::Exact | Estimator::McFisher => {
            if coupling != Coupling::Independent {
                return Err(CovnoiseError::Refused {
                    problem: "the exact and mc-fisher estimators need per-example gradients, which batch normalization makes undefined".into(),
                    remedy: Remedy::MicrobatchWithGhostBatchNorm,
                });
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
            match coupling {
                Coupling::Independent => {}
                Coupling::Groups(n) if b.is_multiple_of(n) => {}
                Coupling::Groups(n) => {
                    return Err(CovnoiseError::Unsupported(format!(
                        "micro-batches of {b} examples would split ghost batches of {n}; choose micro-batches whose size is a multiple of the ghost batch"
                    )));
                }
                Coupling::WholeBatch => {
                    return Err(CovnoiseError::Refused {
                        problem: "batch normalization over the whole batch would change if the batch were split into micro-batches".into(),
                        remedy: Remedy::GhostBatchNormDividingMicroBatch,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Multiplies flat tensors in place.
fn scale_all(tensors: &mut [Tensor<1>], factor: f64) {
    for t in tensors.iter_mut() {
        *t = t.clone() * factor as f32;
    }
}

/// The plain mean gradient (no estimator), summed over the process group.
pub fn plain_gradient<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    ctx: &StepContext,
) -> Result<StepGradient>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let request = PassRequest {
        chunk: ctx.pass_chunk(),
        ..Default::default()
    };
    let pass = backward_pass(model, ctx.table, batch, forward, request)?;
    reduce_step(
        pass.grads,
        pass.loss_sum,
        pass.correct,
        batch.len(),
        None,
        ctx,
    )
}

/// Sums a local mean gradient (and optional local second-moment sums) over
/// the group with one all-reduce, and normalizes both.
pub(crate) fn reduce_step(
    mut grads: Vec<Tensor<1>>,
    loss_sum: f64,
    correct: Option<usize>,
    local: usize,
    moment_sums: Option<SecondMoment>,
    ctx: &StepContext,
) -> Result<StepGradient> {
    let world = ctx.collective.world_size();
    let global = local * world;
    let n_grads = grads.len();
    let mut scalars = vec![loss_sum, correct.unwrap_or(0) as f64, 0.0];
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
        loss: scalars[0] / global as f64,
        correct: correct.map(|_| scalars[1].round() as usize),
        examples: global,
        moment,
    })
}

/// The mean gradient and a fresh estimate of diag(S) (or its trace) by
/// `estimator`, over the whole process group; the micro-batch estimator
/// makes one pass per micro-batch (see [`estimate_with`]).
pub fn estimate<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    estimator: Estimator,
    kind: MomentKind,
    ctx: &StepContext,
) -> Result<StepGradient>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    estimate_with(
        model,
        batch,
        forward,
        estimator,
        kind,
        MicroBatchPasses::PerMicroBatch,
        ctx,
    )
}

/// [`estimate`], with the micro-batch estimator's gradients formed as
/// `passes` says (the other estimators ignore it).
pub fn estimate_with<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    estimator: Estimator,
    kind: MomentKind,
    passes: MicroBatchPasses,
    ctx: &StepContext,
) -> Result<StepGradient>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let world = ctx.collective.world_size();
    validate(estimator, ctx.coupling, batch.len(), world)?;
    match estimator {
        Estimator::Exact | Estimator::McFisher => {
            let mc = estimator == Estimator::McFisher;
            // The step's gradient always uses the data labels; the exact
            // estimator takes its per-example factors from the same pass.
            let mut pass = backward_pass(
                model,
                ctx.table,
                batch,
                forward,
                PassRequest {
                    moments: (!mc).then_some(kind),
                    chunk: ctx.pass_chunk(),
                    ..Default::default()
                },
            )?;
            if mc {
                // A second pass with labels drawn from the model, for the
                // per-example factors only.
                let logits = pass.logits.as_ref().ok_or_else(|| {
                    CovnoiseError::Unsupported(
                        "the mc-fisher estimator needs a classifier (Objective::Classification)"
                            .into(),
                    )
                })?;
                let offset = ctx.collective.rank() * batch.len();
                let sampled = sample_labels(logits, ctx, stream::MC_LABELS, offset)?;
                let labels = crate::model::labels_tensor(&sampled, &logits.device());
                pass.moment_sums = backward_pass(
                    model,
                    ctx.table,
                    batch,
                    forward,
                    PassRequest {
                        labels: Some(labels),
                        moments: Some(kind),
                        skip_param_grads: true,
                        chunk: ctx.pass_chunk(),
                        ..Default::default()
                    },
                )?
                .moment_sums;
            }
            let sums = pass
                .moment_sums
                .take()
                .expect("a pass that asked for moment sums has them");
            reduce_step(
                pass.grads,
                pass.loss_sum,
                pass.correct,
                batch.len(),
                Some(sums),
                ctx,
            )
        }
        Estimator::Microbatch { micro_batches } => {
            microbatch(model, batch, forward, micro_batches, kind, passes, ctx)
        }
    }
}

/// The trace of the empirical Fisher per example, `tr(F) = (1/n) sum_i
/// ||grad l_i||^2`, over the examples of all processes together: a
/// sharpness proxy of `model` (for example at the end of training). Each
/// process passes its own shard of the examples (shards may differ in size;
/// one may be empty); `n` is their total.
///
/// This is what the exact estimator ([`estimate`] with [`Estimator::Exact`]
/// and [`MomentKind::Trace`]) computes on a batch: per-example squared
/// gradients from the factors of the probed layers, with the examples'
/// own labels. The passes run over at most [`StepContext::chunk`]
/// examples each (all of the shard in one pass when it is None), and each
/// pass's factors are reduced to a sum before the next pass starts, so
/// memory stays that of one chunk. Parameter gradients are not formed. The
/// model's buffers (running statistics) are left as they were, and nothing
/// of a noise stage is read or advanced; [`StepContext::seed`] and
/// [`StepContext::step`] are not used. The per-process sums are combined
/// with one all-reduce over [`StepContext::collective`], which every
/// process must call.
///
/// Returns `Ok(None)` when the model's examples are not independent
/// ([`StepContext::coupling`] is not [`Coupling::Independent`]: batch
/// normalization makes per-example gradients undefined). Errors when a
/// parameter has no per-example rule (as the exact estimator does) or when
/// no process has an example; a non-finite gradient gives a non-finite
/// trace.
pub fn fisher_trace<M, B, F>(
    model: &M,
    examples: &B,
    forward: &F,
    ctx: &StepContext,
) -> Result<Option<f64>>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    if ctx.coupling != Coupling::Independent {
        return Ok(None);
    }
    let local = examples.len();
    let chunk = ctx.chunk.filter(|&c| c > 0).unwrap_or(local.max(1));
    let mut sums = [0.0, local as f64];
    keeping_buffers(model, || {
        let mut start = 0;
        while start < local {
            let len = chunk.min(local - start);
            let pass = backward_pass(
                model,
                ctx.table,
                &examples.slice(start, len),
                forward,
                PassRequest {
                    moments: Some(MomentKind::Trace),
                    skip_param_grads: true,
                    ..Default::default()
                },
            )?;
            sums[0] += pass
                .moment_sums
                .expect("a pass that asked for moment sums has them")
                .trace();
            start += len;
        }
        Ok(())
    })?;
    all_reduce_packed(ctx.collective, &mut [], &mut sums)?;
    if sums[1] < 0.5 {
        return Err(CovnoiseError::Shape(
            "no examples to compute the Fisher trace on".into(),
        ));
    }
    Ok(Some(sums[0] / sums[1]))
}

/// Labels drawn from the model's predictive distribution softmax(logits),
/// for the examples of the global batch from position `offset` on. One
/// uniform number per example of the global batch is drawn from
/// `(seed, step, stream)`, so the labels do not depend on how the batch is
/// sharded or split.
pub(crate) fn sample_labels(
    logits: &Tensor<2>,
    ctx: &StepContext,
    stream: u64,
    offset: usize,
) -> Result<Vec<u8>> {
    labels_from_model(logits, ctx.seed, ctx.step, stream, offset)
}

/// The labels the mc-fisher estimator differentiates against at `step` of
/// a run keyed by `seed`, for examples with `logits` (the model's, at the
/// step's parameters) from position `offset` of the global batch on: with
/// them, the estimate equals the exact estimator's on those labels, which
/// lets a test (or a user) reproduce it from single-example passes.
pub fn mc_fisher_labels(
    logits: &Tensor<2>,
    seed: u64,
    step: u64,
    offset: usize,
) -> Result<Vec<u8>> {
    labels_from_model(logits, seed, step, stream::MC_LABELS, offset)
}

fn labels_from_model(
    logits: &Tensor<2>,
    seed: u64,
    step: u64,
    stream: u64,
    offset: usize,
) -> Result<Vec<u8>> {
    let [b, classes] = logits.dims();
    if classes > 256 {
        return Err(CovnoiseError::Unsupported(format!(
            "labels sampled from the model (mc-fisher, the Fisher-trace penalty) are bytes: up to 256 classes, the model has {classes}"
        )));
    }
    let probs = to_vec(&burn::tensor::activation::softmax(logits.clone(), 1))?;
    let mut rng = keyed_rng(seed, step, stream, 0);
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
/// holds M/K of them), mean g, and `b/(M-1) sum_j (g_j - g)^2`. The step's
/// gradient is the mean of the micro-batch gradients.
///
/// With [`MicroBatchPasses::OneThroughRules`] (and independent examples)
/// one pass over the whole batch forms them all ([`PassRequest::group_size`]
/// with [`PassRequest::group_summary`]): the step costs a plain step whose
/// weight products are the groups' (a fast convolution adds each
/// example's gradient to its group's sum instead of the batch's; a Linear
/// layer on the fast kernel runs one product per group and folds it into
/// a running mean and centered sum, keeping no group's gradient), plus
/// the centered sum over the groups. Otherwise (batch normalization,
/// layers without rules) it runs one pass per micro-batch, the FLOPs of
/// one plain step in M smaller products.
///
/// The centered sum is formed around the global mean after a first
/// all-reduce (rather than from raw sums of squares), which avoids the
/// cancellation of `sum g_j^2 - M g^2` in float32: from one pass, as this
/// process's centered sum around its own mean plus `M_local (ḡ_local -
/// g)²` ([`GroupSummary::centered_squares`]), both non-negative.
fn microbatch<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    micro_batches: usize,
    kind: MomentKind,
    passes: MicroBatchPasses,
    ctx: &StepContext,
) -> Result<StepGradient>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let world = ctx.collective.world_size();
    let local_m = micro_batches / world;
    let b = batch.len() / local_m;
    let factor = b as f64 / (micro_batches as f64 - 1.0);
    if passes.one_pass() && ctx.coupling.keeps_whole(b) {
        let mut pass = backward_pass(
            model,
            ctx.table,
            batch,
            forward,
            PassRequest {
                group_size: Some(b),
                group_summary: true,
                chunk: whole_groups(ctx.pass_chunk(), b),
                ..Default::default()
            },
        )?;
        let groups = pass
            .group_summary
            .take()
            .expect("a pass that asked for summarized groups has them");
        // The batch gradient is the mean of the local groups' gradients;
        // after the reduce, the mean over all M.
        let mut reduced = reduce_step(
            pass.grads,
            pass.loss_sum,
            pass.correct,
            batch.len(),
            None,
            ctx,
        )?;
        let centered = groups.centered_squares(&reduced.grads);
        reduced.moment = Some(centered_moment(centered, factor, kind, ctx)?);
        return Ok(reduced);
    }
    let passes = parts_with_one_buffer_update(model, &vec![1.0 / local_m as f64; local_m], |j| {
        backward_pass(
            model,
            ctx.table,
            &batch.slice(j * b, b),
            forward,
            PassRequest {
                chunk: ctx.pass_chunk(),
                ..Default::default()
            },
        )
    })?;
    let mut micro_grads = Vec::with_capacity(local_m);
    let mut loss_sum = 0.0;
    let mut correct: Option<usize> = None;
    for pass in passes {
        loss_sum += pass.loss_sum;
        correct = pass.correct.map(|c| c + correct.unwrap_or(0));
        micro_grads.push(pass.grads);
    }
    // Accumulators are moved through each sum, never cloned, so that the
    // backend may add in place into a uniquely owned buffer.
    let mut sum: Vec<Tensor<1>> = micro_grads[0].clone();
    for g in &micro_grads[1..] {
        sum = sum.into_iter().zip(g).map(|(s, t)| s + t.clone()).collect();
    }
    // sum is over local micro-batches; after the reduce, the global sum
    // divided by the world size: turn it into the mean over all M.
    let mut reduced = reduce_step(sum, loss_sum, correct, batch.len(), None, ctx)?;
    scale_all(&mut reduced.grads, world as f64 / micro_batches as f64);
    let mean = &reduced.grads;
    let mut centered: Option<Vec<Tensor<1>>> = None;
    for g in micro_grads {
        let squares = g
            .into_iter()
            .zip(mean)
            .map(|(gj, m)| (gj - m.clone()).square());
        centered = Some(match centered {
            None => squares.collect(),
            Some(c) => c.into_iter().zip(squares).map(|(c, sq)| c + sq).collect(),
        });
    }
    let centered = centered.expect("at least one micro-batch");
    reduced.moment = Some(centered_moment(centered, factor, kind, ctx)?);
    Ok(reduced)
}

/// A pass chunk of whole groups of `b` examples: `chunk` rounded down to a
/// multiple of `b`, at least one group.
pub(crate) fn whole_groups(chunk: Option<usize>, b: usize) -> Option<usize> {
    chunk.map(|c| (c / b).max(1) * b)
}

/// The micro-batch moment from this process's centered sums
/// `sum_j (g_j - g)^2`: summed over the processes and scaled by `factor`.
fn centered_moment(
    mut centered: Vec<Tensor<1>>,
    factor: f64,
    kind: MomentKind,
    ctx: &StepContext,
) -> Result<SecondMoment> {
    Ok(match kind {
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
    })
}
