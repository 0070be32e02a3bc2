//! The noise stage: one value with explicit state (seed, step, estimate) that
//! turns a large batch into a noisy gradient for any burn optimizer.

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

use super::NoiseConfig;
use super::structure::{NoiseStd, NoiseStep, StepPasses, add_keyed_noise};
use crate::collective::{Collective, SingleProcess};
use crate::error::{CovnoiseError, Remedy, Result, check_positive};
use crate::model::{Coupling, Examples, Forward, Objective, Probes};
use crate::moments::{
    self, Estimator, MicroBatchPasses, MomentKind, PassRequest, SecondMoment, Smoother,
    SmootherState, StepContext, StepGradient,
};
use crate::params::ParamTable;
use crate::regularizer::{self, Regularizer};
use crate::tensor_util::scalar;

/// A gradient ready for the optimizer, and what went into it.
#[derive(Debug)]
pub struct NoisyGradient {
    /// Mean gradient plus noise, as burn gradients keyed by `ParamId`.
    pub grads: GradientsParams,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Correct predictions in the global batch (classifiers only).
    pub correct: Option<usize>,
    /// Examples in the global batch.
    pub examples: usize,
    /// Expected total variance of the added noise, c tr(S); 0 without noise;
    /// None for `full` noise (the multiplicative sampler never forms S).
    pub noise_trace: Option<f64>,
    /// The step this gradient was computed for.
    pub step: u64,
    /// The regularizer's value without its strength, `(1/M) sum_m
    /// ||g_m||^2`, when a regularizer with lambda > 0 ran (reported beside
    /// the loss, never added to it).
    pub penalty: Option<f64>,
    /// The gradient's global norm before clipping, when clipping is on.
    pub norm_before_clip: Option<f64>,
}

/// What a [`NoiseStage`] carries from step to step, on the host (for
/// checkpoints): everything else is a function of its configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseState {
    /// The next step.
    pub step: u64,
    /// The moving average of the second moment.
    pub smoother: SmootherState,
    /// The `ParamId`s the estimate belongs to, in table order.
    pub estimate_ids: Vec<u64>,
}

/// Adds structured covariance noise to large-batch gradients of any burn
/// module.
///
/// ```text
/// g_tilde = g_B + D xi,  xi ~ N(0, I),  D D^T = c S
/// ```
///
/// The model's forward pass comes in as a function `(model, batch, probes)
/// -> Objective`; the stage runs the passes its estimator needs and returns
/// burn `GradientsParams` for any optimizer. The noise of step t is a pure
/// function of (seed, t, position of the parameter in the module), so
/// data-parallel replicas sharing the seed add identical noise.
///
/// `C` is the process group the batch is spread over; the default, one
/// process, makes the stage `Send` (see [`SharedNoiseStage`](super::SharedNoiseStage)).
pub struct NoiseStage<C: Collective = SingleProcess> {
    config: NoiseConfig,
    c: f64,
    large_batch: usize,
    seed: u64,
    step: u64,
    smoother: Smoother,
    /// The parameters the current estimate belongs to.
    estimate_ids: Vec<ParamId>,
    /// The caller's declaration of how the model's examples interact.
    declared: Option<Coupling>,
    /// The model last checked by [`NoiseStage::validate_model`].
    checked: Option<CheckedModel>,
    chunk: Option<usize>,
    /// Whether micro-batch gradients may come from one pass over the batch.
    one_pass: bool,
    collective: C,
    /// The noise's standard deviations for the current estimate: they
    /// change only when the estimate does, so the steps between refreshes
    /// reuse them. Cleared whenever the smoother changes.
    noise_std: Option<NoiseStd>,
    /// An explicit penalty added to the gradient.
    regularizer: Option<Regularizer>,
    /// Global gradient-norm clipping of the final gradient.
    clip_norm: Option<f64>,
}

/// A model that passed [`NoiseStage::validate_model`]: its parameters and
/// the coupling of its examples.
#[derive(Debug, Clone)]
struct CheckedModel {
    ids: Vec<ParamId>,
    coupling: Coupling,
    /// How micro-batch gradients are formed for this model.
    passes: MicroBatchPasses,
}

impl<C: Collective> std::fmt::Debug for NoiseStage<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseStage")
            .field("config", &self.config)
            .field("c", &self.c)
            .field("large_batch", &self.large_batch)
            .field("seed", &self.seed)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl NoiseStage {
    /// A single-process stage for a run whose global batch is `large_batch`
    /// examples, keyed by `seed`. Validates the settings and resolves the
    /// scale c (including kappa).
    ///
    /// ```
    /// use covnoise::noise::{NoiseConfig, NoiseStage};
    /// // Diagonal-Fisher noise on batch 1024 imitating batch 64.
    /// let stage = NoiseStage::new(NoiseConfig::diag_fisher(64), 1024, 7)?;
    /// assert!((stage.scale() - (1.0 / 64.0 - 1.0 / 1024.0)).abs() < 1e-12);
    /// # Ok::<(), covnoise::CovnoiseError>(())
    /// ```
    pub fn new(config: NoiseConfig, large_batch: usize, seed: u64) -> Result<Self> {
        config.validate()?;
        if large_batch == 0 {
            return Err(CovnoiseError::InvalidSetting {
                name: "large_batch",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        let c = if config.is_none() {
            0.0
        } else {
            config.scale.resolve(large_batch)? * config.kappa
        };
        if let moments::Estimator::Microbatch { micro_batches } = config.estimator
            && !config.is_none()
            && !large_batch.is_multiple_of(micro_batches)
        {
            return Err(CovnoiseError::MicroBatchesDoNotDivide {
                batch: large_batch,
                micro_batches,
            });
        }
        let smoother = Smoother::new(config.ema, config.refresh_every)?;
        Ok(Self {
            config,
            c,
            large_batch,
            seed,
            step: 0,
            smoother,
            estimate_ids: Vec::new(),
            declared: None,
            checked: None,
            chunk: None,
            one_pass: true,
            collective: SingleProcess,
            noise_std: None,
            regularizer: None,
            clip_norm: None,
        })
    }

    /// Spreads each batch over a process group (see [`Collective`]).
    pub fn with_collective<C: Collective>(self, collective: C) -> NoiseStage<C> {
        NoiseStage {
            config: self.config,
            c: self.c,
            large_batch: self.large_batch,
            seed: self.seed,
            step: self.step,
            smoother: self.smoother,
            estimate_ids: self.estimate_ids,
            declared: self.declared,
            checked: None,
            chunk: self.chunk,
            one_pass: self.one_pass,
            collective,
            noise_std: self.noise_std,
            regularizer: self.regularizer,
            clip_norm: self.clip_norm,
        }
    }
}

impl<C: Collective> NoiseStage<C> {
    /// Declares how the model's examples interact. Without it the stage
    /// derives the coupling from the model (see [`Coupling::resolve`]): a
    /// [`GhostBatchNorm`](crate::model::GhostBatchNorm) routed through
    /// [`Probes::batch_norm`] tells its groups, burn's `BatchNorm` couples the
    /// whole batch. A declaration is checked against what the model shows,
    /// and believed only where nothing can be checked (a batch norm of the
    /// user's own type).
    pub fn with_coupling(mut self, coupling: Coupling) -> Self {
        self.declared = Some(coupling);
        self.checked = None;
        self
    }

    /// Whether the micro-batch estimator and the penalties may form their
    /// micro-batch gradients from one pass over the batch where the model
    /// allows it (true, the default; see [`MicroBatchPasses`]) or must run
    /// passes of their own per micro-batch (false). One pass saves the
    /// overhead of many small passes; passes per micro-batch hold one
    /// micro-batch's activations at a time, and on a CPU large micro-batches
    /// of a conv net with big activations can run faster that way
    /// (RESULTS.md section 18: ResNet-20 at batch 1024).
    pub fn with_one_pass_micro_batches(mut self, on: bool) -> Self {
        self.one_pass = on;
        self.checked = None;
        self
    }

    /// Runs each forward and backward pass over at most `chunk` examples at
    /// a time and accumulates (gradient accumulation): the same step up to
    /// float rounding, with one chunk's activations alive at a time, which on
    /// a CPU is also faster for conv nets. Applies only where the model's
    /// examples may be split there (independent examples, or ghost groups
    /// the chunk keeps whole); None (the default) passes whole batches.
    pub fn with_chunk(mut self, chunk: Option<usize>) -> Self {
        self.chunk = chunk.filter(|&c| c > 0);
        self
    }

    /// Adds an explicit penalty's gradient to every step (see
    /// [`Regularizer`]): `lambda (1/M) sum_m ||g_m||^2` over M micro-batches
    /// of the global batch, with or without noise. A strength of 0 leaves
    /// every step exactly as without it.
    ///
    /// ```
    /// use covnoise::noise::{NoiseConfig, NoiseStage};
    /// use covnoise::regularizer::Regularizer;
    /// let stage = NoiseStage::new(NoiseConfig::none(), 1024, 7)?
    ///     .with_regularizer(Regularizer::grad_norm(0.01, 16))?;
    /// # Ok::<(), covnoise::CovnoiseError>(())
    /// ```
    pub fn with_regularizer(mut self, regularizer: Regularizer) -> Result<Self> {
        regularizer.validate()?;
        if !self.large_batch.is_multiple_of(regularizer.micro_batches) {
            return Err(CovnoiseError::InvalidSetting {
                name: "reg-micro-batches",
                value: regularizer.micro_batches.to_string(),
                reason: "must divide the batch size",
            });
        }
        self.regularizer = Some(regularizer);
        self.checked = None;
        Ok(self)
    }

    /// Scales each step's final gradient (mean, noise and penalty together)
    /// to global norm at most `max_norm`, as PyTorch's
    /// `clip_grad_norm_` does: by `max_norm / (norm + 1e-6)` when that is
    /// below 1.
    pub fn with_clip_norm(mut self, max_norm: f64) -> Result<Self> {
        check_positive("clip-norm", max_norm)?;
        self.clip_norm = Some(max_norm);
        Ok(self)
    }

    /// The regularizer, if any.
    pub fn regularizer(&self) -> Option<&Regularizer> {
        self.regularizer.as_ref()
    }

    /// The process group.
    pub fn collective(&self) -> &dyn Collective {
        &self.collective
    }

    /// The resolved noise scale c (kappa included).
    pub fn scale(&self) -> f64 {
        self.c
    }

    /// The configuration.
    pub fn config(&self) -> &NoiseConfig {
        &self.config
    }

    /// The next step to be computed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The state that a resumed run needs (see [`NoiseStage::restore`]).
    pub fn state(&self) -> Result<NoiseState> {
        Ok(NoiseState {
            step: self.step,
            smoother: self.smoother.state()?,
            estimate_ids: self.estimate_ids.iter().map(|id| id.val()).collect(),
        })
    }

    /// Continues from `state`, as if this stage had made its steps; moment
    /// tensors are placed on `device`.
    pub fn restore(&mut self, state: NoiseState, device: &Device) {
        self.step = state.step;
        self.smoother.restore(state.smoother, device);
        self.noise_std = None;
        self.estimate_ids = state.estimate_ids.into_iter().map(ParamId::from).collect();
    }

    /// Whether noise is added during `epoch`.
    pub fn active_in(&self, epoch: usize) -> bool {
        self.c > 0.0 && self.config.window.contains(epoch)
    }

    /// Checks, before training, that the configuration can run on `model`
    /// with batches like `batch` (this process's shard of a global batch),
    /// and returns how the model's examples interact. One forward pass over
    /// `batch` shows the model's structure (which layers are probed, how its
    /// batch norms group examples); for the exact and mc-fisher estimators a
    /// forward and backward pass over two examples checks that every
    /// parameter's per-example gradients add up to its gradient (a parameter
    /// without a rule, or used outside its probed layer, is refused by
    /// name). For the micro-batch estimator and the penalties the same check
    /// decides, without refusing, how their micro-batch gradients are formed:
    /// from one pass through the rules where they cover every parameter and
    /// add up (with ghost batch norm, their sums over a whole ghost batch;
    /// with batch norm over the whole batch, for the penalties only, each
    /// micro-batch normalized alone as its own pass would), else one pass
    /// per micro-batch ([`MicroBatchPasses`]). The model's buffers (running statistics) are
    /// left as they were.
    ///
    /// [`NoiseStage::gradient`] runs this on its first batch when it has not
    /// been run for the model.
    pub fn validate_model<M, B, F>(&mut self, model: &M, batch: &B, forward: F) -> Result<Coupling>
    where
        M: Module,
        B: Examples,
        F: Forward<M, B>,
    {
        let table = self.table(model)?;
        if batch.is_empty() {
            return Err(CovnoiseError::Shape("empty batch".into()));
        }
        let mut probes = Probes::observe();
        let classifier = moments::keeping_buffers(model, || {
            Ok(matches!(
                forward(model, batch, &mut probes),
                Objective::Classification { .. }
            ))
        })?;
        let coupling = Coupling::resolve(&table, probes.norm_groups(), self.declared)?;
        // Labels drawn from the model need its predictive distribution.
        if !classifier {
            let samples_labels = self.c > 0.0
                && self.config.estimator == Estimator::McFisher
                && self.config.structure.moment().is_some();
            if samples_labels {
                return Err(CovnoiseError::Refused {
                    problem: "the mc-fisher estimator samples labels from the model's predictions, so the forward pass must return Objective::Classification; this model returns per-example losses (Objective::Losses)".into(),
                    remedy: Remedy::EstimatorWithoutSampledLabels,
                });
            }
            if self
                .regularizer
                .is_some_and(|r| r.is_active() && r.kind == regularizer::PenaltyKind::FisherTrace)
            {
                return Err(CovnoiseError::Refused {
                    problem: "the Fisher-trace penalty samples labels from the model's predictions, so the forward pass must return Objective::Classification; this model returns per-example losses (Objective::Losses)".into(),
                    remedy: Remedy::GradNormPenalty,
                });
            }
        }
        if let Some(reg) = self.regularizer.filter(Regularizer::is_active) {
            let world = self.collective.world_size();
            reg.check_batch(batch.len() * world, world, coupling)?;
        }
        let rules_checked = self.c > 0.0
            && self.check_structure(model, &table, &probes, coupling, batch, &forward)?;
        // Micro-batch gradients from one pass need rules for every
        // parameter; without them (or with batch norm) each micro-batch
        // takes a pass of its own, which works for any model.
        let micro_batched = (self.c > 0.0
            && self.config.structure.moment().is_some()
            && matches!(self.config.estimator, Estimator::Microbatch { .. }))
            || self.regularizer.is_some_and(|r| r.is_active());
        // The penalties' passes at moved parameters also run as one pass
        // where every parameter sits in one of covnoise's own layers, which
        // run each micro-batch at its own parameters.
        let movable = || {
            let ids: Vec<_> = table.entries().iter().map(|e| e.id).collect();
            !probes.unmovable_params().iter().any(|p| ids.contains(p))
        };
        let rules_add_up = || match coupling {
            Coupling::Independent => {
                rules_checked || check_rules(model, &table, &probes, batch, &forward).is_ok()
            }
            // Examples interact within ghost batches, which the
            // micro-batches keep whole: the rules' group sums over a ghost
            // batch must add up.
            Coupling::Groups(g) => {
                check_group_rules(model, &table, &probes, batch, &forward, g).is_ok()
            }
            // Batch norm over the whole batch: only the penalties' passes,
            // each micro-batch normalized alone, stand for one pass per
            // micro-batch (the micro-batch estimator needs ghost batches).
            Coupling::WholeBatch => {
                self.regularizer.is_some_and(|r| r.is_active()) && {
                    let world = self.collective.world_size();
                    let local_m = self
                        .regularizer
                        .map_or(1, |r| r.micro_batches / world)
                        .max(1);
                    let b = batch.len() / local_m;
                    check_group_rules(model, &table, &probes, batch, &forward, b).is_ok()
                }
            }
        };
        let passes = if self.one_pass && micro_batched && rules_add_up() {
            if self.regularizer.is_some_and(|r| r.is_active()) && movable() {
                MicroBatchPasses::OneThroughRulesAndShifts
            } else {
                MicroBatchPasses::OneThroughRules
            }
        } else {
            MicroBatchPasses::PerMicroBatch
        };
        self.checked = Some(CheckedModel {
            ids: table.entries().iter().map(|e| e.id).collect(),
            coupling,
            passes,
        });
        Ok(coupling)
    }

    /// The structure and estimator checks of [`NoiseStage::validate_model`]
    /// for a stage that adds noise; true where they included
    /// [`check_rules`] (the exact and mc-fisher estimators), which then
    /// passed.
    fn check_structure<M, B, F>(
        &self,
        model: &M,
        table: &ParamTable,
        observed: &Probes,
        coupling: Coupling,
        batch: &B,
        forward: &F,
    ) -> Result<bool>
    where
        M: Module,
        B: Examples,
        F: Forward<M, B>,
    {
        let whole_batch_layer = || {
            table
                .batch_norms()
                .first()
                .map_or_else(|| "a batch norm".to_string(), |(p, k)| format!("{p} ({k})"))
        };
        let structure = &self.config.structure;
        if structure.reweights_examples() && coupling == Coupling::WholeBatch {
            return Err(CovnoiseError::Refused {
                problem: format!(
                    "{} noise reweights each example's loss, and {} is batch normalization over the whole batch, so no loss belongs to one example",
                    structure.name(),
                    whole_batch_layer()
                ),
                remedy: Remedy::GhostBatchNorm,
            });
        }
        if structure.moment().is_none() {
            return Ok(false);
        }
        moments::validate(
            self.config.estimator,
            coupling,
            batch.len(),
            self.collective.world_size(),
        )
        .map_err(|e| match (e, coupling) {
            (CovnoiseError::Refused { .. }, Coupling::WholeBatch) => {
                match self.config.estimator {
                    Estimator::Microbatch { .. } => CovnoiseError::Refused {
                        problem: format!(
                            "{} is batch normalization over the whole batch, which would change if the batch were split into micro-batches",
                            whole_batch_layer()
                        ),
                        remedy: Remedy::GhostBatchNormDividingMicroBatch,
                    },
                    _ => CovnoiseError::Refused {
                        problem: format!(
                            "{} is batch normalization over the whole batch, so no gradient belongs to one example: the exact and mc-fisher estimators need per-example gradients",
                            whole_batch_layer()
                        ),
                        remedy: Remedy::MicrobatchWithGhostBatchNorm,
                    },
                }
            }
            (e, _) => e,
        })?;
        if matches!(self.config.estimator, Estimator::Microbatch { .. }) {
            return Ok(false);
        }
        check_rules(model, table, observed, batch, forward).map(|()| true)
    }

    /// Whether the configuration has a noise window (epochs without noise).
    fn has_window(&self) -> bool {
        self.config.window != super::NoiseWindow::default()
    }

    fn table<M: Module>(&self, model: &M) -> Result<ParamTable> {
        let table = ParamTable::of(model);
        if table.is_empty() {
            return Err(CovnoiseError::Unsupported(
                "the model has no parameter that takes gradients: create it on an autodiff device (device.autodiff()) and do not freeze every parameter".into(),
            ));
        }
        Ok(table)
    }

    /// Runs the forward and backward passes the configuration needs over
    /// `batch` (this process's shard of the global batch), adds the noise,
    /// and advances the step. `model` must live on an autodiff device;
    /// `forward` is its forward pass. A configuration with a noise window
    /// (in epochs) needs the epoch: use [`NoiseStage::gradient_in_epoch`].
    pub fn gradient<M, B, F>(&mut self, model: &M, batch: &B, forward: F) -> Result<NoisyGradient>
    where
        M: Module,
        B: Examples,
        F: Forward<M, B>,
    {
        if self.has_window() {
            return Err(CovnoiseError::Unsupported(
                "the noise window is given in epochs: call gradient_in_epoch with the current epoch".into(),
            ));
        }
        self.gradient_in_epoch(model, batch, 0, forward)
    }

    /// [`NoiseStage::gradient`] in `epoch` (0-based), for configurations
    /// with a noise window: noise is added only in the window's epochs.
    pub fn gradient_in_epoch<M, B, F>(
        &mut self,
        model: &M,
        batch: &B,
        epoch: usize,
        forward: F,
    ) -> Result<NoisyGradient>
    where
        M: Module,
        B: Examples,
        F: Forward<M, B>,
    {
        let step = self.step;
        let world = self.collective.world_size();
        if batch.len() * world != self.large_batch {
            return Err(CovnoiseError::Shape(format!(
                "batch of {} examples on each of {world} processes does not make the configured global batch of {}",
                batch.len(),
                self.large_batch
            )));
        }
        let table = self.table(model)?;
        let ids: Vec<ParamId> = table.entries().iter().map(|e| e.id).collect();
        if self.checked.as_ref().is_none_or(|c| c.ids != ids) {
            self.validate_model(model, batch, &forward)?;
        }
        let checked = self
            .checked
            .as_ref()
            .expect("validate_model records the model");
        let (coupling, passes) = (checked.coupling, checked.passes);
        let ctx = StepContext {
            seed: self.seed,
            step,
            collective: &self.collective,
            table: &table,
            coupling,
            chunk: self.chunk,
        };
        let active = self.active_in(epoch);
        let stale = !self.estimate_ids.is_empty() && self.estimate_ids != ids;
        let structure = self.config.structure.clone();
        let estimate_due = stale || self.smoother.needs_refresh(step);
        // Whether this step's gradient is the plain mean gradient, which
        // a regularizer's micro-batch passes also give.
        let plain_step = !active || structure.plain_gradient(estimate_due);
        let (penalty, data) = match self.regularizer.filter(Regularizer::is_active) {
            Some(reg) => {
                let p = regularizer::penalty_gradient(
                    model, batch, &forward, &reg, plain_step, passes, &ctx,
                )?;
                (Some((p.grads, p.value)), p.data)
            }
            None => (None, None),
        };
        let (c, seed, global) = (self.c, self.seed, self.large_batch);
        let first = self.collective.rank() * batch.len();
        let mut engine = Engine {
            model,
            batch,
            forward: &forward,
            ctx: &ctx,
            data,
            estimator: self.config.estimator,
            passes,
            smoother: &mut self.smoother,
            estimate_ids: &mut self.estimate_ids,
            noise_std: &mut self.noise_std,
            ids: &ids,
            stale,
            estimate_due,
        };
        let (mut step_grad, noise_trace) = if !active {
            (engine.plain()?, Some(0.0))
        } else {
            let mut noise_step = NoiseStep {
                passes: &mut engine,
                c,
                seed,
                step,
                global_batch: global,
                local: first..first + batch.len(),
            };
            let out = structure.gradient(&mut noise_step)?;
            (out.gradient, out.noise_trace)
        };
        let penalty_value = penalty.map(|(grads, value)| {
            step_grad.grads = std::mem::take(&mut step_grad.grads)
                .into_iter()
                .zip(grads)
                .map(|(g, h)| g + h)
                .collect();
            value
        });
        check_finite(&step_grad, step)?;
        let norm_before_clip = match self.clip_norm {
            Some(max) => Some(clip(&mut step_grad.grads, max, step)?),
            None => None,
        };
        self.step += 1;
        let grads = table.unflatten(std::mem::take(&mut step_grad.grads))?;
        Ok(NoisyGradient {
            grads,
            loss: step_grad.loss,
            correct: step_grad.correct,
            examples: step_grad.examples,
            noise_trace,
            step,
            penalty: penalty_value,
            norm_before_clip,
        })
    }

    /// Adds `D xi` with `D D^T = c S` to the flat gradients `grads` (table
    /// order) for the second moment `moment` (diagonal, or isotropic from its
    /// trace), using the noise of `step`. Returns the expected total variance
    /// c tr(S).
    pub fn add_noise(
        &self,
        grads: &mut [Tensor<1>],
        moment: &SecondMoment,
        step: u64,
    ) -> Result<f64> {
        let std = NoiseStd::of_moment(moment, self.c, grads)?;
        add_keyed_noise(grads, &std, self.seed, step, 0);
        Ok(std.variance())
    }
}

/// The passes of one step, for the structure's [`NoiseStep`]: the model,
/// its batch and forward pass, and the stage's estimate.
struct Engine<'s, 'c, M, B, F> {
    model: &'s M,
    batch: &'s B,
    forward: &'s F,
    ctx: &'s StepContext<'c>,
    /// The plain gradient a regularizer's passes already made, if any.
    data: Option<StepGradient>,
    estimator: Estimator,
    /// How the micro-batch estimator forms its micro-batch gradients.
    passes: MicroBatchPasses,
    smoother: &'s mut Smoother,
    estimate_ids: &'s mut Vec<ParamId>,
    noise_std: &'s mut Option<NoiseStd>,
    ids: &'s [ParamId],
    /// The estimate belongs to other parameters (another model).
    stale: bool,
    /// A fresh estimate is due this step (stale, or the refresh interval).
    estimate_due: bool,
}

impl<M, B, F> StepPasses for Engine<'_, '_, M, B, F>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    fn plain(&mut self) -> Result<StepGradient> {
        match self.data.take() {
            Some(d) => Ok(d),
            None => moments::plain_gradient(self.model, self.batch, self.forward, self.ctx),
        }
    }

    fn reweighted(&mut self, local_weights: &[f32]) -> Result<StepGradient> {
        let pass = moments::backward_pass(
            self.model,
            self.ctx.table,
            self.batch,
            self.forward,
            PassRequest {
                weights: Some(local_weights),
                chunk: self.ctx.pass_chunk(),
                ..Default::default()
            },
        )?;
        moments::reduce_step(
            pass.grads,
            pass.loss_sum,
            pass.correct,
            self.batch.len(),
            None,
            self.ctx,
        )
    }

    fn estimated(&mut self, kind: MomentKind) -> Result<StepGradient> {
        let step = self.ctx.step;
        let mut g = if self.estimate_due {
            moments::estimate_with(
                self.model,
                self.batch,
                self.forward,
                self.estimator,
                kind,
                self.passes,
                self.ctx,
            )?
        } else {
            self.plain()?
        };
        if let Some(fresh) = g.moment.take() {
            if self.stale {
                // Another model (or a changed one): the old estimate
                // describes other parameters.
                self.smoother.reset();
            }
            self.smoother.update(fresh, step)?;
            *self.noise_std = None;
            *self.estimate_ids = self.ids.to_vec();
        }
        Ok(g)
    }

    fn noise_std(
        &mut self,
        grads: &[Tensor<1>],
        make: &mut dyn FnMut(&SecondMoment) -> Result<NoiseStd>,
    ) -> Result<NoiseStd> {
        if let Some(std) = self.noise_std.as_ref().filter(|s| s.fits(grads)) {
            return Ok(std.clone());
        }
        let moment = self.smoother.current().ok_or_else(|| {
            CovnoiseError::Unsupported(
                "a noise structure asked for the estimate's noise before any estimate (call NoiseStep::estimated first)".into(),
            )
        })?;
        let std = make(&moment)?;
        *self.noise_std = Some(std.clone());
        Ok(std)
    }
}

/// Scales `grads` to global norm at most `max` (PyTorch's
/// `clip_grad_norm_`: by `max / (norm + 1e-6)` when that is below 1) and
/// returns the norm before. A norm that overflows is a diverged step.
fn clip(grads: &mut [Tensor<1>], max: f64, step: u64) -> Result<f64> {
    let norm = regularizer::squared_norm(grads).sqrt();
    if !norm.is_finite() {
        return Err(CovnoiseError::NonFiniteGradient { step });
    }
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.clone() * coef as f32;
        }
    }
    Ok(norm)
}

/// A NaN or infinite loss or gradient is an error, never a silent update.
fn check_finite(g: &StepGradient, step: u64) -> Result<()> {
    if !g.loss.is_finite() {
        return Err(CovnoiseError::NonFiniteLoss {
            step,
            loss: g.loss as f32,
        });
    }
    // One host read for all parameters, one pass over them: a NaN or an
    // infinity in any entry makes the plain sum non-finite (so would a sum
    // beyond f32::MAX, itself a diverged step).
    let sum = g
        .grads
        .iter()
        .map(|t| t.clone().sum())
        .reduce(|a, b| a + b)
        .map_or(0.0, scalar);
    if !sum.is_finite() {
        return Err(CovnoiseError::NonFiniteGradient { step });
    }
    Ok(())
}

/// Checks that every parameter of `table` has an exact per-example rule in
/// the forward pass `observed` saw, and that on two examples of `batch` the
/// rules' per-example gradients add up to the backward pass's gradient (a
/// parameter without a rule, or used outside its probed layer, is refused by
/// name). The model's buffers are left as they were.
fn check_rules<M, B, F>(
    model: &M,
    table: &ParamTable,
    observed: &Probes,
    batch: &B,
    forward: &F,
) -> Result<()>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    check_coverage(table, observed)?;
    // The probe gradients of two examples must add up to the
    // parameters' gradients. The sums differ by float32 rounding
    // (about 1e-6 relative); a use outside the probed layers
    // misses a whole term, so 1e-3 separates the two.
    let pass = probed_pass(model, table, &batch.slice(0, batch.len().min(2)), forward)?;
    moments::exact::check_rules_cover_gradients(&pass.layers, table, &pass.grads, 1e-3)
}

/// A pass over `sample` that returns its probed layers, leaving the
/// model's buffers as they were (the rules' checks).
fn probed_pass<M, B, F>(
    model: &M,
    table: &ParamTable,
    sample: &B,
    forward: &F,
) -> Result<moments::Pass>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    moments::keeping_buffers(model, || {
        moments::backward_pass(
            model,
            table,
            sample,
            forward,
            PassRequest {
                probes: true,
                ..Default::default()
            },
        )
    })
}

/// Every table parameter is covered by a rule seen in the `observed`
/// pass, and none belongs to a layer without one.
fn check_coverage(table: &ParamTable, observed: &Probes) -> Result<()> {
    if let Some((param, what)) = observed.unsupported().first() {
        return Err(CovnoiseError::Refused {
            problem: format!(
                "parameter {} belongs to {what}, which has no per-example gradient rule",
                table.name_of(*param)
            ),
            remedy: Remedy::MicrobatchEstimator,
        });
    }
    let covered = observed.covered_params();
    if let Some(e) = table.entries().iter().find(|e| !covered.contains(&e.id)) {
        return Err(CovnoiseError::Refused {
            problem: format!(
                "parameter {} (shape {:?}) has no per-example gradient rule: the exact and mc-fisher estimators cover layers routed through Probes (Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, and any layer with an ExactRule of its own, via Probes::layer)",
                e.name, e.shape
            ),
            remedy: Remedy::MicrobatchEstimator,
        });
    }
    Ok(())
}

/// For a model whose examples interact within consecutive groups of `g`
/// (ghost batch normalization): the rules cover every parameter, and
/// their gradients over one whole group (a batch norm's rule gives no
/// per-example gradients, only these) add up to the parameters' gradients
/// on the batch's first group, to the same 1e-3 as [`check_rules`].
fn check_group_rules<M, B, F>(
    model: &M,
    table: &ParamTable,
    observed: &Probes,
    batch: &B,
    forward: &F,
    g: usize,
) -> Result<()>
where
    M: Module,
    B: Examples,
    F: Forward<M, B>,
{
    check_coverage(table, observed)?;
    if g == 0 || batch.len() < g {
        return Err(CovnoiseError::Shape(format!(
            "a batch of {} examples holds no whole group of {g}",
            batch.len()
        )));
    }
    let pass = probed_pass(model, table, &batch.slice(0, g), forward)?;
    moments::exact::check_group_sums_cover_gradients(&pass.layers, table, &pass.grads, 1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_with(values: &[&[f32]]) -> StepGradient {
        let device = Device::flex();
        StepGradient {
            grads: values
                .iter()
                .map(|v| crate::tensor_util::from_vec1(v.to_vec(), &device))
                .collect(),
            loss: 1.0,
            correct: None,
            examples: 1,
            moment: None,
        }
    }

    /// Every kind of non-finite entry is caught, including infinities of
    /// opposite sign in different parameters and entries whose squares
    /// would overflow f32 while they themselves are finite.
    #[test]
    fn check_finite_catches_each_non_finite_entry() {
        assert!(check_finite(&step_with(&[&[1.0, -2.0], &[3.0]]), 0).is_ok());
        assert!(check_finite(&step_with(&[&[1e20, -1e20], &[3e30]]), 0).is_ok());
        for bad in [
            step_with(&[&[1.0, f32::NAN], &[3.0]]),
            step_with(&[&[1.0, 2.0], &[f32::INFINITY]]),
            step_with(&[&[f32::NEG_INFINITY], &[f32::INFINITY]]),
        ] {
            assert!(matches!(
                check_finite(&bad, 7),
                Err(CovnoiseError::NonFiniteGradient { step: 7 })
            ));
        }
        let mut nan_loss = step_with(&[&[1.0]]);
        nan_loss.loss = f64::NAN;
        assert!(matches!(
            check_finite(&nan_loss, 0),
            Err(CovnoiseError::NonFiniteLoss { .. })
        ));
    }
}
