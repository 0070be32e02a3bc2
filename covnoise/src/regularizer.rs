//! Explicit regularizers computed on micro-batches, for any burn module: the
//! gradient-norm penalty and the Fisher-trace penalty, the remedies for the
//! large-batch gap that later work found to work (docs/method.md, section
//! on regularizers).
//!
//! The regularized objective over a batch split into M contiguous
//! micro-batches of b = B/M examples, in batch order, is
//!
//! ```text
//! L(theta) + lambda (1/M) sum_m ||g_m||^2,   g_m = grad L_m(theta)
//! ```
//!
//! where L_m is the mean loss over micro-batch m: with the batch's labels
//! (`grad-norm`), or with labels drawn once per step from the model's own
//! predictive distribution and then held fixed (`fisher-trace`: the mean of
//! ||g_m||^2 over label draws is tr of the micro-batch Fisher). Its gradient
//! is `grad L + 2 lambda (1/M) sum_m H_m g_m`, with H_m the Hessian of L_m.
//! Each Hessian-vector product is a forward difference of gradients,
//!
//! ```text
//! H_m g_m ~ (grad L_m(theta + eps g_m) - grad L_m(theta)) / eps,  eps = r / ||g_m||,
//! ```
//!
//! a step of length r in parameter space along g_m. Its error is
//! `(r/2) ||g_m|| T[u, u] + O(r^2)` (u = g_m/||g_m||, T the third derivative):
//! relative to ||H_m g_m|| it is about `(r/2) ||T[u,u]|| / ||H u||`, first
//! order in r and independent of ||g_m||; float32 rounding of the two
//! gradients adds about `1e-7 ||grad L_m|| / (r ||H u||)`. The default
//! r = 1e-2 keeps both near 1 % for the nets here (measured in the tests).

use burn::module::Module;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::collective::all_reduce_packed;
use crate::error::{CovnoiseError, Result, check_non_negative, check_positive};
use crate::model::{Coupling, Examples, Forward, Objective, Probes};
use crate::moments::{self, MicroBatchPasses, PassRequest, StepContext, StepGradient};
use crate::probes::GroupShifts;
use crate::rng::stream;
use crate::tensor_util::scalar;

/// Which micro-batch gradient's squared norm is penalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PenaltyKind {
    /// ||g_m||^2 with the batch's labels (the gradient-norm penalty).
    GradNorm,
    /// ||g_m||^2 with labels sampled from the model's predictions (the
    /// Fisher-trace penalty); classifiers only.
    FisherTrace,
}

/// An explicit penalty `lambda (1/M) sum_m ||g_m||^2` over M micro-batches,
/// added to a step's gradient by the
/// [`NoiseStage`](crate::noise::NoiseStage) (see
/// [`NoiseStage::with_regularizer`](crate::noise::NoiseStage::with_regularizer)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Regularizer {
    /// The penalized gradient.
    pub kind: PenaltyKind,
    /// lambda >= 0; 0 leaves the step exactly as without the regularizer.
    pub strength: f64,
    /// M >= 1: micro-batches the global batch is split into.
    pub micro_batches: usize,
    /// r > 0: length of the finite-difference step in parameter space.
    pub fd_radius: f64,
}

impl Regularizer {
    /// The finite-difference step length r used unless set otherwise.
    pub const DEFAULT_FD_RADIUS: f64 = 1e-2;

    /// The gradient-norm penalty of strength `lambda` over `micro_batches`.
    ///
    /// ```
    /// use covnoise::regularizer::Regularizer;
    /// let reg = Regularizer::grad_norm(0.01, 32);
    /// assert!(reg.validate().is_ok());
    /// ```
    pub fn grad_norm(lambda: f64, micro_batches: usize) -> Self {
        Self::new(PenaltyKind::GradNorm, lambda, micro_batches)
    }

    /// The Fisher-trace penalty of strength `lambda` over `micro_batches`.
    pub fn fisher_trace(lambda: f64, micro_batches: usize) -> Self {
        Self::new(PenaltyKind::FisherTrace, lambda, micro_batches)
    }

    /// A penalty of `kind`.
    pub fn new(kind: PenaltyKind, lambda: f64, micro_batches: usize) -> Self {
        Self {
            kind,
            strength: lambda,
            micro_batches,
            fd_radius: Self::DEFAULT_FD_RADIUS,
        }
    }

    /// The same penalty with finite-difference step length `r`.
    pub fn with_fd_radius(self, r: f64) -> Self {
        Self {
            fd_radius: r,
            ..self
        }
    }

    /// Checks the settings that do not depend on the batch.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("reg-strength", self.strength)?;
        check_positive("reg-micro-batches", self.micro_batches as f64)?;
        check_positive("fd-radius", self.fd_radius)?;
        Ok(())
    }

    /// Whether the penalty changes anything (lambda > 0).
    pub fn is_active(&self) -> bool {
        self.strength > 0.0
    }

    /// Checks that the penalty can run on a global batch of `global`
    /// examples spread over `world` processes, for a model whose examples
    /// interact as `coupling`.
    pub fn check_batch(&self, global: usize, world: usize, coupling: Coupling) -> Result<()> {
        let m = self.micro_batches;
        if !global.is_multiple_of(m) {
            return Err(CovnoiseError::Unsupported(format!(
                "the penalty's {m} micro-batches do not divide the global batch of {global}"
            )));
        }
        if !m.is_multiple_of(world) {
            return Err(CovnoiseError::Unsupported(format!(
                "the penalty's {m} micro-batches cannot be spread evenly over {world} processes"
            )));
        }
        let b = global / m;
        if let Coupling::Groups(g) = coupling
            && !b.is_multiple_of(g)
        {
            return Err(CovnoiseError::Unsupported(format!(
                "penalty micro-batches of {b} examples would split ghost batches of {g}; choose a number of penalty micro-batches whose micro-batch is a multiple of the ghost batch"
            )));
        }
        Ok(())
    }
}

/// The penalty's contribution to one step.
#[derive(Debug)]
pub(crate) struct PenaltyGradient {
    /// `2 lambda (1/M) sum_m H_m g_m` over the global batch, flat, table order.
    pub grads: Vec<Tensor<1>>,
    /// The penalty's value without lambda, `(1/M) sum_m ||g_m||^2`.
    pub value: f64,
    /// The plain step gradient (data labels) assembled from the micro-batch
    /// passes, when it was asked for and the model's examples allow it.
    pub data: Option<StepGradient>,
}

/// The penalty's gradient on `batch` (this process's contiguous shard of the
/// global batch, holding M/K of the micro-batches). With `want_data`, the
/// passes at theta with the data labels also make the step's plain gradient
/// (the mean of the micro-batch gradients is the batch gradient) and move
/// the model's buffers once, as a plain step would; otherwise the buffers
/// are left as they were.
///
/// With [`MicroBatchPasses::OneThroughRules`] (and independent examples)
/// the micro-batch gradients at theta come from one pass over the whole
/// batch ([`PassRequest::group_size`]; with sampled labels a second, on a
/// frozen copy, for the group gradients only), and only the passes at the
/// moved parameters, which differ per micro-batch, run one by one; with
/// [`MicroBatchPasses::OneThroughRulesAndShifts`] those run as one pass
/// too, each micro-batch at its own parameters ([`PassRequest::shifts`]).
/// Otherwise each micro-batch has passes of its own.
pub(crate) fn penalty_gradient<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    reg: &Regularizer,
    want_data: bool,
    passes: MicroBatchPasses,
    ctx: &StepContext,
) -> Result<PenaltyGradient>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let world = ctx.collective.world_size();
    let local = batch.len();
    reg.check_batch(local * world, world, ctx.coupling)?;
    let local_m = reg.micro_batches / world;
    let b = local / local_m;
    // A whole-batch batch norm normalizes a micro-batch differently from
    // the batch: its passes cannot make the batch's gradient.
    let want_data = want_data && ctx.coupling != Coupling::WholeBatch;
    // With batch norm over the whole batch each micro-batch's passes
    // normalize it alone; a pass over the batch does so too when it stands
    // for one pass per micro-batch.
    let one_pass = match ctx.coupling {
        Coupling::WholeBatch => true,
        c => c.keeps_whole(b),
    };
    let acc = if passes.one_pass() && one_pass {
        let shifted = passes == MicroBatchPasses::OneThroughRulesAndShifts;
        sums_from_one_pass(model, batch, forward, reg, want_data, shifted, ctx, b)?
    } else {
        sums_per_micro_batch(model, batch, forward, reg, want_data, ctx, b)?
    };
    let mut hvp = match acc.hvp {
        Some(h) => h,
        None => {
            let device = acc.device.expect("a pass ran");
            ctx.table
                .entries()
                .iter()
                .map(|e| Tensor::<1>::zeros([e.numel()], &device))
                .collect()
        }
    };
    let mut scalars = [acc.norm_sq];
    all_reduce_packed(ctx.collective, &mut hvp, &mut scalars)?;
    let m = reg.micro_batches as f64;
    let factor = (2.0 * reg.strength / m) as f32;
    let grads = hvp.into_iter().map(|h| h * factor).collect();
    let data = match acc.data_mean {
        // The mean over this process's micro-batches is its shard's mean
        // gradient, which reduce_step averages over processes.
        Some(mean) => Some(moments::reduce_step(
            mean,
            acc.loss_sum,
            acc.correct,
            local,
            None,
            ctx,
        )?),
        None => None,
    };
    Ok(PenaltyGradient {
        grads,
        value: scalars[0] / m,
        data,
    })
}

/// The labels the Fisher-trace penalty differentiates against, for the
/// examples `first..` of this process's shard of `local` examples, whose
/// logits are `logits` (None for the gradient-norm penalty: the batch's own
/// labels). They depend only on each example's place in the global batch.
fn penalty_labels(
    reg: &Regularizer,
    logits: Option<&Tensor<2>>,
    first: usize,
    local: usize,
    ctx: &StepContext,
) -> Result<Option<Tensor<1, Int>>> {
    match reg.kind {
        PenaltyKind::GradNorm => Ok(None),
        PenaltyKind::FisherTrace => {
            let logits = logits.ok_or_else(|| {
                CovnoiseError::Unsupported(
                    "the Fisher-trace penalty samples labels from the model's predictions, so the forward pass must return Objective::Classification".into(),
                )
            })?;
            let offset = ctx.collective.rank() * local + first;
            let sampled = moments::sample_labels(logits, ctx, stream::PENALTY_LABELS, offset)?;
            Ok(Some(crate::model::labels_tensor(
                &sampled,
                &logits.device(),
            )))
        }
    }
}

/// `||g||^2` of one micro-batch's gradient `g` (at theta, on `labels`) and
/// `H g` by the forward difference at `theta + eps g` (None for a zero
/// gradient, whose product with any Hessian is zero).
fn norm_and_hvp<M, B, F>(
    model: &M,
    part: &B,
    forward: &F,
    reg: &Regularizer,
    g: Vec<Tensor<1>>,
    labels: Option<Tensor<1, Int>>,
    ctx: &StepContext,
) -> Result<(f64, Option<Vec<Tensor<1>>>)>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let norm_sq = squared_norm(&g);
    if !norm_sq.is_finite() {
        return Err(CovnoiseError::NonFiniteGradient { step: ctx.step });
    }
    if norm_sq == 0.0 {
        return Ok((norm_sq, None));
    }
    let eps = reg.fd_radius / norm_sq.sqrt();
    let moved = crate::params::shifted(model, &g, eps as f32)?;
    let request = PassRequest {
        labels,
        chunk: ctx.pass_chunk(),
        ..Default::default()
    };
    let at_moved = moments::backward_pass(&moved, ctx.table, part, forward, request)?;
    let hvp = at_moved
        .grads
        .into_iter()
        .zip(g)
        .map(|(moved, here)| (moved - here) / eps as f32)
        .collect();
    Ok((norm_sq, Some(hvp)))
}

/// `sum_m ||g_m||^2` over the micro-batch gradients `groups` (at theta, on
/// `labels`) and `sum_m H_m g_m` by the forward differences at
/// `theta + eps_m g_m`, `eps_m = r / ||g_m||`, all micro-batches in one
/// pass: micro-batch m runs at its own parameters ([`PassRequest::shifts`])
/// and its loss is weighted by `1 / eps_m`, so that the pass's gradient is
/// `sum_m grad L_m(theta + eps_m g_m) / eps_m`, from which
/// `sum_m g_m / eps_m` is taken. A micro-batch with a zero gradient adds
/// nothing (its product with any Hessian is zero): weight and shift 0.
/// None for the products where every micro-batch's gradient is zero.
#[allow(clippy::too_many_arguments)]
fn norms_and_hvp_shifted<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    reg: &Regularizer,
    groups: &moments::GroupGrads,
    labels: Option<Tensor<1, Int>>,
    chunk: Option<usize>,
    ctx: &StepContext,
) -> Result<(f64, Option<Vec<Tensor<1>>>)>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let g = groups.groups();
    let scale = groups.scale as f64;
    // ||g_m||^2 for every m, kept from the pass where it read the rows for
    // their mean, else from one read of them.
    let norms = groups.squared_norms()?;
    if norms.iter().any(|v| !v.is_finite()) {
        return Err(CovnoiseError::NonFiniteGradient { step: ctx.step });
    }
    let norm_sq: f64 = norms.iter().sum();
    if norms.iter().all(|&v| v == 0.0) {
        return Ok((norm_sq, None));
    }
    let eps: Vec<f64> = norms
        .iter()
        .map(|&v| {
            if v > 0.0 {
                reg.fd_radius / v.sqrt()
            } else {
                0.0
            }
        })
        .collect();
    let b = batch.len() / g;
    // Loss weights: the pass differentiates (1/n) sum_i w_i l_i, and
    // micro-batch m's share of it must be grad L_m / eps_m = (1/b) sum
    // grad l_i / eps_m, so w_i = (n / b) / eps_m = g / eps_m.
    let weights: Vec<f32> = eps
        .iter()
        .flat_map(|&e| {
            let w = if e > 0.0 { g as f64 / e } else { 0.0 };
            std::iter::repeat_n(w as f32, b)
        })
        .collect();
    // Row m of a sum times scale is g_m: the shifts are the rows scaled by
    // eps_m scale (applied by the layers, not written out), and
    // sum_m g_m / eps_m one weighted sum of the rows (zero-gradient rows
    // weighted 0).
    let to_shift = eps.iter().map(|&e| (e * scale) as f32).collect();
    let quotients: Vec<f32> = eps
        .iter()
        .map(|&e| if e > 0.0 { (1.0 / e) as f32 } else { 0.0 })
        .collect();
    let shifts =
        GroupShifts::from_table(ctx.table, b, groups.sums.clone())?.with_factors(to_shift)?;
    let request = PassRequest {
        weights: Some(&weights),
        labels,
        shifts: Some(shifts),
        chunk,
        ..Default::default()
    };
    let moved = moments::backward_pass(model, ctx.table, batch, forward, request)?;
    let hvp = moved
        .grads
        .into_iter()
        .zip(groups.weighted_sum(&quotients))
        .map(|(at_moved, here)| at_moved - here)
        .collect();
    Ok((norm_sq, Some(hvp)))
}

/// The penalty's pass at theta with the data labels over `batch`, as
/// `request` asks, and its logits. Without the step's gradient to make
/// (`want_data` false), the Fisher-trace penalty uses only the logits (its
/// labels are drawn from them), so the pass is a forward pass alone
/// ([`logits_only`]) and no pass is returned; over a batch standing for
/// its micro-batches of `groups` examples (one pass for all), a batch norm
/// over the whole batch then normalizes each micro-batch alone.
#[allow(clippy::too_many_arguments)]
fn data_pass<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    reg: &Regularizer,
    want_data: bool,
    request: PassRequest,
    groups: Option<usize>,
    ctx: &StepContext,
) -> Result<(Option<moments::Pass>, Option<Tensor<2>>)>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    if reg.kind == PenaltyKind::FisherTrace && !want_data {
        return Ok((
            None,
            Some(logits_only(model, batch, forward, request.chunk, groups)?),
        ));
    }
    let pass = moments::backward_pass(model, ctx.table, batch, forward, request)?;
    let logits = pass.logits.clone();
    Ok((Some(pass), logits))
}

/// The logits of `batch` from a forward pass alone, over chunks of at most
/// `chunk` examples, on a frozen copy of the model (no autodiff graph), a
/// batch norm over the whole batch normalizing each group of `groups`
/// examples alone where given (the penalty's micro-batches):
/// the Fisher-trace penalty's pass at theta with the data labels, when
/// only its logits (for the sampled labels) are used because the step's
/// gradient comes from elsewhere. It runs only inside the callers'
/// `keeping_buffers`, which put back what a forward pass in training mode
/// moves.
fn logits_only<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    chunk: Option<usize>,
    groups: Option<usize>,
) -> Result<Tensor<2>>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let frozen = model.clone().no_grad();
    let n = batch.len();
    let step = chunk.filter(|&c| c >= 1).unwrap_or(n).max(1);
    let mut parts = Vec::new();
    for start in (0..n).step_by(step) {
        let part = batch.slice(start, step.min(n - start));
        let mut probes = groups.map_or_else(Probes::off, Probes::off_in_groups);
        match forward(&frozen, &part, &mut probes) {
            Objective::Classification { logits, .. } => parts.push(logits.detach().inner()),
            Objective::Losses(_) => {
                return Err(CovnoiseError::Unsupported(
                    "the Fisher-trace penalty samples labels from the model's predictions, so the forward pass must return Objective::Classification".into(),
                ));
            }
        }
    }
    Ok(Tensor::cat(parts, 0))
}

/// The penalty's sums with the micro-batch gradients at theta from one
/// pass over the whole shard, and with `shifted` the passes at the moved
/// parameters too (see [`penalty_gradient`]).
#[allow(clippy::too_many_arguments)]
fn sums_from_one_pass<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    reg: &Regularizer,
    want_data: bool,
    shifted: bool,
    ctx: &StepContext,
    b: usize,
) -> Result<Sums>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let local_m = batch.len() / b;
    let chunk = moments::whole_groups(ctx.pass_chunk(), b);
    let data_request = PassRequest {
        group_size: (reg.kind == PenaltyKind::GradNorm).then_some(b),
        chunk,
        ..Default::default()
    };
    // The data pass is the step's own when it makes the step's gradient;
    // otherwise it leaves the buffers as they were.
    let run = || {
        data_pass(
            model,
            batch,
            forward,
            reg,
            want_data,
            data_request,
            Some(b),
            ctx,
        )
    };
    let (mut data, logits) = if want_data {
        run()?
    } else {
        moments::keeping_buffers(model, run)?
    };
    let mut acc = Sums {
        loss_sum: data.as_ref().map_or(0.0, |d| d.loss_sum),
        correct: data.as_ref().and_then(|d| d.correct),
        device: logits.as_ref().map(|l| l.device()).or_else(|| {
            data.as_ref()
                .and_then(|d| d.grads.first().map(|g| g.device()))
        }),
        ..Sums::default()
    };
    moments::keeping_buffers(model, || {
        let labels = penalty_labels(reg, logits.as_ref(), 0, batch.len(), ctx)?;
        let groups = match &labels {
            None => data.as_mut().and_then(|d| d.group_grads.take()),
            Some(labels) => {
                let request = PassRequest {
                    labels: Some(labels.clone()),
                    group_size: Some(b),
                    skip_param_grads: true,
                    chunk,
                    ..Default::default()
                };
                moments::backward_pass(model, ctx.table, batch, forward, request)?.group_grads
            }
        }
        .expect("a pass that asked for group gradients has them");
        if shifted {
            let (norm_sq, hvp) =
                norms_and_hvp_shifted(model, batch, forward, reg, &groups, labels, chunk, ctx)?;
            acc.norm_sq = norm_sq;
            acc.hvp = hvp;
            return Ok(());
        }
        for j in 0..local_m {
            let g = groups.group(j);
            let part_labels = labels.clone().map(|l| l.narrow(0, j * b, b));
            let part = batch.slice(j * b, b);
            let (norm_sq, hvp) = norm_and_hvp(model, &part, forward, reg, g, part_labels, ctx)?;
            acc.norm_sq += norm_sq;
            if let Some(h) = hvp {
                acc.hvp = Some(add(acc.hvp.take(), h));
            }
        }
        Ok(())
    })?;
    acc.data_mean = data.filter(|_| want_data).map(|d| d.grads);
    Ok(acc)
}

/// The penalty's sums with passes of its own for each micro-batch (see
/// [`penalty_gradient`]).
fn sums_per_micro_batch<M, B, F>(
    model: &M,
    batch: &B,
    forward: &F,
    reg: &Regularizer,
    want_data: bool,
    ctx: &StepContext,
    b: usize,
) -> Result<Sums>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    let local_m = batch.len() / b;
    let chunk = ctx.pass_chunk();
    // Sums over this process's micro-batches, accumulated as each one is
    // done so that one micro-batch's gradients are alive at a time.
    let mut acc = Sums::default();
    let mut data_sum: Option<Vec<Tensor<1>>> = None;
    let mut micro = |j: usize| -> Result<()> {
        let part = batch.slice(j * b, b);
        let request = PassRequest {
            chunk,
            ..Default::default()
        };
        let (data, logits) = data_pass(model, &part, forward, reg, want_data, request, None, ctx)?;
        // The passes that are not the step's own leave the buffers where
        // the data pass put them.
        let (norm_sq, hvp) = moments::keeping_buffers(model, || {
            let labels = penalty_labels(reg, logits.as_ref(), j * b, batch.len(), ctx)?;
            let g = match (&labels, &data) {
                (None, Some(data)) => data.grads.clone(),
                (None, None) => unreachable!("the gradient-norm penalty always runs its data pass"),
                (Some(labels), _) => {
                    let request = PassRequest {
                        labels: Some(labels.clone()),
                        chunk,
                        ..Default::default()
                    };
                    moments::backward_pass(model, ctx.table, &part, forward, request)?.grads
                }
            };
            norm_and_hvp(model, &part, forward, reg, g, labels, ctx)
        })?;
        acc.norm_sq += norm_sq;
        acc.device = logits.as_ref().map(|l| l.device()).or(acc.device.take());
        if let Some(data) = data {
            acc.loss_sum += data.loss_sum;
            acc.correct = data.correct.map(|c| c + acc.correct.unwrap_or(0));
            if acc.device.is_none() {
                acc.device = data.grads.first().map(|g| g.device());
            }
            if want_data {
                data_sum = Some(add(data_sum.take(), data.grads));
            }
        }
        if let Some(h) = hvp {
            acc.hvp = Some(add(acc.hvp.take(), h));
        }
        Ok(())
    };
    let shares = vec![1.0 / local_m as f64; local_m];
    if want_data {
        moments::parts_with_one_buffer_update(model, &shares, &mut micro)?;
    } else {
        moments::keeping_buffers(model, || (0..local_m).try_for_each(&mut micro))?;
    }
    acc.data_mean = data_sum.map(|sum| sum.into_iter().map(|g| g / local_m as f32).collect());
    Ok(acc)
}

/// ||g||^2 over all parameters, with one host read.
pub(crate) fn squared_norm(g: &[Tensor<1>]) -> f64 {
    g.iter()
        .map(|t| t.clone().square().sum())
        .reduce(|a, b| a + b)
        .map_or(0.0, scalar)
}

/// `acc + x`, entry by entry (x alone when there is no sum yet).
fn add(acc: Option<Vec<Tensor<1>>>, x: Vec<Tensor<1>>) -> Vec<Tensor<1>> {
    match acc {
        None => x,
        Some(acc) => acc.into_iter().zip(x).map(|(a, x)| a + x).collect(),
    }
}

/// Running sums over a process's micro-batches.
#[derive(Default)]
struct Sums {
    norm_sq: f64,
    loss_sum: f64,
    correct: Option<usize>,
    hvp: Option<Vec<Tensor<1>>>,
    /// The shard's mean gradient with the data labels, when asked for.
    data_mean: Option<Vec<Tensor<1>>>,
    device: Option<burn::tensor::Device>,
}
