//! Every setting of a training run, as one flat record with the same names
//! as the command-line flags (kebab-case), readable from and written to TOML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::{Augmentation, DatasetKind};
use crate::data::{InputScaling, Sampling};
use crate::zoo::init::InitScheme;
use crate::zoo::{Architecture, NetworkConfig, Normalization, parse_layers};
use covnoise::error::{CovnoiseError, Result};
use covnoise::moments::Estimator;
use covnoise::noise::{NoiseConfig, NoiseWindow, ScaleRule, StructureName, StructureOptions};
use covnoise::optim::{ScheduleKind, SgdConfig};
use covnoise::regularizer::{PenaltyKind, Regularizer};

/// Estimator names as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorName {
    /// Exact per-example squared gradients.
    Exact,
    /// Centered variance of micro-batch gradients.
    Microbatch,
    /// Monte-Carlo (true) Fisher with labels sampled from the model.
    McFisher,
}

/// Scale-rule names as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleName {
    /// c = 1/B_S - 1/B_L.
    Paper,
    /// c = (lr_S/lr_L)/B_S - 1/B_L, clamped at 0.
    Temperature,
    /// c = --noise-scale.
    Fixed,
}

/// Regularizer names as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RegularizerName {
    /// No explicit penalty.
    None,
    /// Squared norm of micro-batch gradients with the data labels.
    GradNorm,
    /// Squared norm of micro-batch gradients with labels sampled from the
    /// model (the trace of the Fisher).
    FisherTrace,
}

/// Schedule names as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleName {
    /// Constant learning rate.
    Constant,
    /// Drop by --gamma at each milestone epoch.
    Multistep,
    /// Cosine decay to 0 over the run.
    Cosine,
}

/// How the micro-batch estimator and the penalties form their micro-batch
/// gradients (`--micro-batch-passes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MicroBatchPassSetting {
    /// One pass over the batch where the model allows it (the default).
    #[default]
    One,
    /// Passes of their own per micro-batch (one micro-batch's activations
    /// held at a time).
    Each,
}

/// Which file of a data set trains (`--train-on`); the other one tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrainOn {
    /// The training file (Fashion-MNIST's 60,000 images), testing on the
    /// test file.
    #[default]
    Train,
    /// The test file (Fashion-MNIST's 10,000 images), testing on the
    /// training file: the small-data setting of Wu et al. and Zhu et al.
    Test,
}

/// All settings of a training run. Defaults are the paper's large-batch MLP
/// recipe on Fashion-MNIST without noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TrainSettings {
    /// The model architecture.
    pub model: Architecture,
    /// The data set.
    pub dataset: DatasetKind,
    /// Directory with the data set's files (None for Fashion-MNIST:
    /// COVNOISE_DATA, then /usr/share/datasets/fashion-mnist; CIFAR needs it).
    pub data: Option<PathBuf>,
    /// Training augmentation, random crop with 4-pixel zero padding and
    /// horizontal flip (None: on for CIFAR, off for Fashion-MNIST).
    pub augment: Option<bool>,
    /// Keep only the first N training examples.
    pub train_limit: Option<usize>,
    /// Keep only the first N test examples.
    pub test_limit: Option<usize>,
    /// Which file of the data set trains (the other tests).
    pub train_on: TrainOn,
    /// How image bytes become features.
    pub inputs: InputScaling,
    /// How each step's batch is drawn.
    pub sampling: Sampling,
    /// How the model's weights and biases are drawn.
    pub init: InitScheme,
    /// Hold out the last N training examples and evaluate on them instead
    /// of the test set (for hyper-parameter search).
    pub holdout: Option<usize>,
    /// Hidden layer widths (the MLP).
    pub hidden: Vec<usize>,
    /// The layers of `--model sequential`, as written
    /// (`conv:10:5,maxpool:2,relu,flatten,linear:10`).
    pub layers: Option<String>,
    /// Batch normalization after each hidden Linear layer (the MLP; VGG and
    /// ResNet always have it).
    pub batch_norm: bool,
    /// Ghost batch normalization over sub-batches of this size (the MLP,
    /// VGG and ResNet).
    pub ghost_batch: Option<usize>,
    /// Forward/backward passes over at most this many examples at a time,
    /// accumulated (the same step up to float rounding); None: whole batches.
    pub chunk: Option<usize>,
    /// How micro-batch gradients are formed (the micro-batch estimator and
    /// the penalties): one pass over the batch where the model allows it,
    /// or a pass per micro-batch; the same gradients up to float rounding.
    pub micro_batch_passes: MicroBatchPassSetting,
    /// Global batch size B (B_L for large-batch runs); 0: the whole
    /// training set (full-batch gradient descent), resolved by
    /// [`TrainSettings::for_training_set`].
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Number of epochs.
    pub epochs: usize,
    /// Learning-rate schedule.
    pub schedule: ScheduleName,
    /// Length of the schedule in epochs when the run stops before its end
    /// (a study's search runs); None: the schedule spans --epochs.
    pub schedule_epochs: Option<usize>,
    /// Epochs (0-based) at which multistep drops the rate.
    pub milestones: Vec<usize>,
    /// Multistep factor.
    pub gamma: f64,
    /// Linear warmup length in epochs.
    pub warmup_epochs: usize,
    /// Noise structure.
    pub noise: StructureName,
    /// Center full-Fisher noise (covariance Sigma_B instead of F_B).
    pub centered: bool,
    /// Examples of the global batch that carry subset noise.
    pub noise_subset: Option<usize>,
    /// Constant noise's variance per entry at c = 1.
    pub noise_variance: f64,
    /// Second-moment estimator for diag and isotropic noise.
    pub estimator: EstimatorName,
    /// Micro-batches M for the microbatch estimator.
    pub micro_batches: usize,
    /// Small batch B_S whose noise is imitated.
    pub small_batch: usize,
    /// Scale rule for c.
    pub scale: ScaleName,
    /// Learning rate of the small-batch reference (temperature rule).
    pub small_lr: Option<f64>,
    /// c for the fixed rule.
    pub noise_scale: Option<f64>,
    /// Multiplier on c.
    pub kappa: f64,
    /// First epoch (0-based) with noise.
    pub noise_from: usize,
    /// First epoch (0-based) without noise again.
    pub noise_until: Option<usize>,
    /// Moving-average coefficient for the second-moment estimate.
    pub ema: Option<f64>,
    /// Steps between fresh second-moment estimates.
    pub refresh: u64,
    /// Explicit penalty on micro-batch gradient norms.
    pub regularizer: RegularizerName,
    /// Its strength lambda >= 0.
    pub reg_strength: f64,
    /// Micro-batches M the penalty is taken over (dividing the batch).
    pub reg_micro_batches: usize,
    /// Global gradient-norm clipping of each step's gradient (None: off).
    pub clip_norm: Option<f64>,
    /// Seed for initialization, shuffling and noise.
    pub seed: u64,
    /// Worker threads (None: all cores).
    pub threads: Option<usize>,
    /// The burn device: cpu, wgpu, wgpu-cpu, cuda, cuda:N or libtorch.
    pub device: String,
    /// Batch size for evaluation (does not affect results).
    pub eval_batch: usize,
    /// Evaluate after every E epochs (and after the last); the other
    /// epochs' test metrics are null. For runs of many short epochs.
    pub eval_every: usize,
    /// Write a checkpoint every E epochs (and after the last); 0: never.
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest), >= 1.
    pub keep_checkpoints: usize,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            model: Architecture::Mlp,
            dataset: DatasetKind::FashionMnist,
            data: None,
            augment: None,
            train_limit: None,
            train_on: TrainOn::Train,
            inputs: InputScaling::Standardized,
            sampling: Sampling::Epoch,
            init: InitScheme::Default,
            test_limit: None,
            holdout: None,
            hidden: vec![512, 512],
            layers: None,
            batch_norm: false,
            ghost_batch: None,
            chunk: None,
            micro_batch_passes: MicroBatchPassSetting::One,
            batch_size: 4096,
            lr: 0.2,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            epochs: 10,
            schedule: ScheduleName::Cosine,
            schedule_epochs: None,
            milestones: Vec::new(),
            gamma: 0.1,
            warmup_epochs: 2,
            noise: StructureName::None,
            centered: false,
            noise_subset: None,
            noise_variance: 1.0,
            estimator: EstimatorName::Exact,
            micro_batches: 16,
            small_batch: 128,
            scale: ScaleName::Paper,
            small_lr: None,
            noise_scale: None,
            kappa: 1.0,
            noise_from: 0,
            noise_until: None,
            ema: None,
            refresh: 1,
            regularizer: RegularizerName::None,
            reg_strength: 0.0,
            reg_micro_batches: 1,
            clip_norm: None,
            seed: 0,
            threads: None,
            device: "cpu".to_string(),
            eval_batch: 2000,
            eval_every: 1,
            checkpoint_every: 1,
            keep_checkpoints: 2,
        }
    }
}

/// The widest layer any check lets through (2^40 units).
pub const MAX_WIDTH: u128 = 1 << 40;

fn invalid(name: &'static str, value: impl ToString, reason: &'static str) -> CovnoiseError {
    CovnoiseError::InvalidSetting {
        name,
        value: value.to_string(),
        reason,
    }
}

impl TrainSettings {
    /// Reads settings from TOML text (missing keys take their defaults;
    /// unknown keys are an error).
    pub fn from_toml(text: &str) -> std::result::Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// These settings for a training set of `n` examples: batch size 0
    /// (full batch) becomes `n`.
    pub fn for_training_set(&self, n: usize) -> TrainSettings {
        let mut s = self.clone();
        if s.batch_size == 0 {
            s.batch_size = n;
        }
        s
    }

    /// Whether training batches are augmented.
    pub fn augmentation_on(&self) -> bool {
        self.augmentation().is_some()
    }

    /// The training augmentation: the data set's standard one (CIFAR's crop
    /// and flip; none for Fashion-MNIST) unless --augment/--no-augment say
    /// otherwise; --augment on Fashion-MNIST uses CIFAR's.
    pub fn augmentation(&self) -> Option<Augmentation> {
        match self.augment {
            None => self.dataset.default_augmentation(),
            Some(false) => None,
            Some(true) => Some(
                self.dataset
                    .default_augmentation()
                    .unwrap_or(Augmentation::cifar()),
            ),
        }
    }

    /// The model for examples of `shape` (`[C, H, W]`, or `[dim]` for
    /// feature vectors) and `classes` classes.
    pub fn network_config(&self, shape: &[usize], classes: usize) -> Result<NetworkConfig> {
        let input = match *shape {
            [c, h, w] => [c, h, w],
            _ => [1, 1, shape.iter().product()],
        };
        Ok(NetworkConfig {
            architecture: self.model,
            input,
            classes,
            hidden: self.hidden.clone(),
            normalization: self.normalization()?,
            layers: match &self.layers {
                Some(spec) => parse_layers(spec)?,
                None => Vec::new(),
            },
        })
    }

    /// The normalization the flags ask for: the MLP's is optional, VGG and
    /// ResNet always normalize (over ghost batches with --ghost-batch).
    fn normalization(&self) -> Result<Normalization> {
        let batch_norm = self.batch_norm || self.model.has_batch_norm();
        let normalization = match (batch_norm, self.ghost_batch) {
            (_, Some(n)) => {
                if self.batch_size > 0 && !self.batch_size.is_multiple_of(n) {
                    return Err(invalid(
                        "ghost-batch",
                        n,
                        "must divide the batch size (each ghost batch is a block of the batch)",
                    ));
                }
                Normalization::GhostBatchNorm(n)
            }
            (true, None) => Normalization::BatchNorm,
            (false, None) => Normalization::None,
        };
        if let Normalization::GhostBatchNorm(0 | 1) = normalization {
            return Err(invalid(
                "ghost-batch",
                self.ghost_batch.unwrap_or(0),
                "must be >= 2 (variance of one example is 0)",
            ));
        }
        Ok(normalization)
    }

    /// The optimizer's settings.
    pub fn sgd_config(&self) -> SgdConfig {
        SgdConfig {
            momentum: self.momentum,
            dampening: 0.0,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
        }
    }

    /// The schedule's shape.
    pub fn schedule_kind(&self) -> ScheduleKind {
        match self.schedule {
            ScheduleName::Constant => ScheduleKind::Constant,
            ScheduleName::Cosine => ScheduleKind::Cosine,
            ScheduleName::Multistep => ScheduleKind::Multistep {
                milestones: self.milestones.clone(),
                gamma: self.gamma,
            },
        }
    }

    /// The noise stage's settings.
    pub fn noise_config(&self) -> Result<NoiseConfig> {
        let structure = self.noise.build(&StructureOptions {
            centered: self.centered,
            subset: self.noise_subset,
            variance: self.noise_variance,
        })?;
        let estimator = match self.estimator {
            EstimatorName::Exact => Estimator::Exact,
            EstimatorName::McFisher => Estimator::McFisher,
            EstimatorName::Microbatch => Estimator::Microbatch {
                micro_batches: self.micro_batches,
            },
        };
        let scale = match self.scale {
            ScaleName::Paper => ScaleRule::Paper {
                small_batch: self.small_batch,
            },
            ScaleName::Temperature => ScaleRule::Temperature {
                small_batch: self.small_batch,
                small_lr: self.small_lr.ok_or_else(|| {
                    invalid("small-lr", "unset", "the temperature rule needs --small-lr")
                })?,
                lr: self.lr,
            },
            ScaleName::Fixed => ScaleRule::Fixed {
                c: self.noise_scale.ok_or_else(|| {
                    invalid("noise-scale", "unset", "the fixed rule needs --noise-scale")
                })?,
            },
        };
        let config = NoiseConfig {
            structure,
            estimator,
            scale,
            kappa: self.kappa,
            window: NoiseWindow {
                from: self.noise_from,
                until: self.noise_until,
            },
            ema: self.ema,
            refresh_every: self.refresh,
        };
        config.validate()?;
        Ok(config)
    }

    /// The explicit penalty, when one is set (None for `regularizer =
    /// none`).
    pub fn regularizer_config(&self) -> Result<Option<Regularizer>> {
        let kind = match self.regularizer {
            RegularizerName::None => return Ok(None),
            RegularizerName::GradNorm => PenaltyKind::GradNorm,
            RegularizerName::FisherTrace => PenaltyKind::FisherTrace,
        };
        let reg = Regularizer::new(kind, self.reg_strength, self.reg_micro_batches);
        reg.validate()?;
        Ok(Some(reg))
    }

    /// Checks the settings that need no data: everything the run could
    /// otherwise only discover after loading and training for a while.
    pub fn validate(&self) -> Result<()> {
        self.check_recordable()?;
        if self.epochs == 0 {
            return Err(invalid("epochs", 0, "must be >= 1"));
        }
        if self.schedule_epochs.is_some_and(|s| s < self.epochs) {
            return Err(invalid(
                "schedule-epochs",
                self.schedule_epochs.unwrap_or(0),
                "must be at least --epochs (a run may stop early, not run past its schedule)",
            ));
        }
        if self.chunk == Some(0) {
            return Err(invalid(
                "chunk",
                0,
                "must be >= 1 (omit it for whole batches)",
            ));
        }
        if self.eval_every == 0 {
            return Err(invalid("eval-every", 0, "must be >= 1"));
        }
        if self.eval_batch == 0 {
            return Err(invalid("eval-batch", 0, "must be >= 1"));
        }
        if self.holdout == Some(0) {
            return Err(invalid(
                "holdout",
                0,
                "must be >= 1 (omit it to evaluate on the test set)",
            ));
        }
        if self.threads == Some(0) {
            return Err(invalid("threads", 0, "must be >= 1"));
        }
        if self.keep_checkpoints == 0 {
            return Err(invalid(
                "keep-checkpoints",
                0,
                "must be >= 1 (use --checkpoint-every 0 for no checkpoints)",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("lr", self.lr, "must be a finite number > 0"));
        }
        self.sgd_config().validate()?;
        self.normalization()?;
        if self.model != Architecture::Mlp && self.hidden != TrainSettings::default().hidden {
            return Err(invalid(
                "hidden",
                format!("{:?}", self.hidden),
                "applies only to --model mlp",
            ));
        }
        match (&self.layers, self.model) {
            (Some(spec), Architecture::Sequential) => {
                parse_layers(spec)?;
            }
            (Some(spec), _) => {
                return Err(invalid(
                    "layers",
                    spec,
                    "applies only to --model sequential",
                ));
            }
            (None, Architecture::Sequential) => {
                return Err(invalid(
                    "layers",
                    "unset",
                    "--model sequential needs its layers (--layers conv:10:5,maxpool:2,relu,flatten,linear:10, say)",
                ));
            }
            (None, _) => {}
        }
        if !(self.reg_strength.is_finite() && self.reg_strength >= 0.0) {
            return Err(invalid(
                "reg-strength",
                self.reg_strength,
                "must be a finite number >= 0",
            ));
        }
        if self.reg_micro_batches == 0 {
            return Err(invalid("reg-micro-batches", 0, "must be >= 1"));
        }
        if self.regularizer != RegularizerName::None
            && self.batch_size > 0
            && !self.batch_size.is_multiple_of(self.reg_micro_batches)
        {
            return Err(invalid(
                "reg-micro-batches",
                self.reg_micro_batches,
                "must divide --batch-size",
            ));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(invalid("clip-norm", c, "must be a finite number > 0"));
        }
        self.regularizer_config()?;
        let noise = self.noise_config()?;
        // Resolving the scale checks B_S < B_L for the paper rule, etc.
        if !noise.is_none() && self.batch_size > 0 {
            noise.scale.resolve(self.batch_size)?;
        }
        Ok(())
    }

    /// Refuses integers that config.toml cannot hold (TOML integers are
    /// 64-bit signed), so that a run never starts that could not be recorded.
    fn check_recordable(&self) -> Result<()> {
        let one = |v: usize| vec![v as u64];
        let opt = |v: Option<usize>| v.map(|v| v as u64).into_iter().collect::<Vec<_>>();
        let many = |v: &[usize]| v.iter().map(|&v| v as u64).collect::<Vec<_>>();
        let fields: [(&'static str, Vec<u64>); 24] = [
            ("train-limit", opt(self.train_limit)),
            ("test-limit", opt(self.test_limit)),
            ("holdout", opt(self.holdout)),
            ("hidden", many(&self.hidden)),
            ("ghost-batch", opt(self.ghost_batch)),
            ("chunk", opt(self.chunk)),
            ("batch-size", one(self.batch_size)),
            ("epochs", one(self.epochs)),
            ("schedule-epochs", opt(self.schedule_epochs)),
            ("milestones", many(&self.milestones)),
            ("warmup-epochs", one(self.warmup_epochs)),
            ("micro-batches", one(self.micro_batches)),
            ("small-batch", one(self.small_batch)),
            ("noise-from", one(self.noise_from)),
            ("noise-until", opt(self.noise_until)),
            ("noise-subset", opt(self.noise_subset)),
            ("refresh", vec![self.refresh]),
            ("reg-micro-batches", one(self.reg_micro_batches)),
            ("seed", vec![self.seed]),
            ("threads", opt(self.threads)),
            ("eval-batch", one(self.eval_batch)),
            ("eval-every", one(self.eval_every)),
            ("checkpoint-every", one(self.checkpoint_every)),
            ("keep-checkpoints", one(self.keep_checkpoints)),
        ];
        for (name, values) in fields {
            if let Some(v) = values.into_iter().find(|&v| v > i64::MAX as u64) {
                return Err(invalid(
                    name,
                    v,
                    "is larger than 2^63 - 1, the largest integer config.toml can record",
                ));
            }
        }
        Ok(())
    }

    /// A lower bound on the memory, in bytes, a run of `network` allocates:
    /// five float32 copies of the parameters (values, gradients, momentum,
    /// noise estimate and its average) plus the activations of a batch
    /// (forward values and their gradients, twice for the exact estimator's
    /// per-example factors).
    pub fn memory_estimate(&self, network: &NetworkConfig) -> u128 {
        let (params, units) = network.footprint();
        let factor = if self.estimator == EstimatorName::Exact {
            4
        } else {
            2
        };
        4 * (5 * params + factor * self.batch_size as u128 * units)
    }

    /// Refuses a run of `network` whose [`TrainSettings::memory_estimate`]
    /// exceeds this machine's memory, before anything is allocated.
    pub fn check_memory(&self, network: &NetworkConfig) -> Result<()> {
        // Widths this large cannot fit any memory; refusing them first also
        // keeps the estimate's products far from u128's range.
        if let Some(&w) = self.hidden.iter().find(|&&w| w as u128 > MAX_WIDTH) {
            return Err(invalid(
                "hidden",
                w,
                "is larger than 2^40, more than any machine's memory holds",
            ));
        }
        let needed = self.memory_estimate(network);
        if let Some(total) = crate::device::host_memory_bytes()
            && needed > u128::from(total)
        {
            let gib = |b: f64| b / f64::from(1u32 << 30);
            let what = match self.model {
                Architecture::Mlp => format!("--hidden {:?}", self.hidden),
                other => format!("--model {other}"),
            };
            return Err(CovnoiseError::Unsupported(format!(
                "{what} at --batch-size {} needs at least {:.1} GiB (parameters, optimizer and noise state, batch activations), more than this machine's {:.1} GiB of memory",
                self.batch_size,
                gib(needed as f64),
                gib(total as f64)
            )));
        }
        Ok(())
    }

    /// Settings that are valid but make no sense for this run (each one
    /// line, for the user to see before the run starts).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let length = self.schedule_epochs.unwrap_or(self.epochs);
        if self.warmup_epochs >= length {
            out.push(format!(
                "--warmup-epochs {} is not shorter than the {length}-epoch schedule: the learning rate never reaches --lr {}",
                self.warmup_epochs, self.lr
            ));
        }
        if self.noise != StructureName::None && self.noise_from >= self.epochs {
            out.push(format!(
                "--noise-from {} is past the last epoch ({} epochs, 0-based): no noise is added",
                self.noise_from, self.epochs
            ));
        }
        if self.regularizer != RegularizerName::None && self.reg_strength == 0.0 {
            out.push(
                "--reg-strength is 0: the regularizer adds nothing (each step is the plain step)"
                    .to_string(),
            );
        }
        if self.schedule == ScheduleName::Multistep
            && let Some(m) = self.milestones.iter().find(|&&m| m >= length)
        {
            out.push(format!(
                "milestone {m} is past the {length}-epoch schedule and never applies"
            ));
        }
        out.extend(
            self.ignored()
                .into_iter()
                .map(|(flag, why)| format!("--{flag} is ignored: {why}")),
        );
        out
    }

    /// The settings this run will not use, as (flag, why): those set away
    /// from their defaults (or given, for optional ones) that the chosen
    /// noise, estimator, scale rule or schedule never reads.
    pub fn ignored(&self) -> Vec<(&'static str, &'static str)> {
        let d = TrainSettings::default();
        let mut out = Vec::new();
        let mut check = |set: bool, flag: &'static str, why: &'static str| {
            if set {
                out.push((flag, why));
            }
        };
        let noisy = self.noise != StructureName::None;
        let estimated = self.noise.is_estimated();
        let none = "there is no noise (--noise none)";
        check(!noisy && self.kappa != d.kappa, "kappa", none);
        check(!noisy && self.ema.is_some(), "ema", none);
        check(!noisy && self.refresh != d.refresh, "refresh", none);
        check(
            !noisy && self.small_batch != d.small_batch,
            "small-batch",
            none,
        );
        check(!noisy && self.scale != d.scale, "scale", none);
        check(
            !noisy && self.noise_from != d.noise_from,
            "noise-from",
            none,
        );
        check(!noisy && self.noise_until.is_some(), "noise-until", none);
        check(
            self.centered && self.noise != StructureName::Full,
            "centered",
            "it applies only to --noise full",
        );
        check(
            self.noise_subset.is_some() && self.noise != StructureName::Subset,
            "noise-subset",
            "it applies only to --noise subset",
        );
        check(
            self.noise_variance != d.noise_variance && self.noise != StructureName::Constant,
            "noise-variance",
            "it applies only to --noise constant",
        );
        let full = "this noise structure needs no estimate of diag(F)";
        let full_noise = noisy && !estimated;
        check(
            full_noise && self.estimator != d.estimator,
            "estimator",
            full,
        );
        check(full_noise && self.ema.is_some(), "ema", full);
        check(full_noise && self.refresh != d.refresh, "refresh", full);
        check(!noisy && self.estimator != d.estimator, "estimator", none);
        check(
            (!estimated || self.estimator != EstimatorName::Microbatch)
                && self.micro_batches != d.micro_batches,
            "micro-batches",
            "it applies only to --estimator microbatch with diag or isotropic noise",
        );
        check(
            noisy && self.scale == ScaleName::Fixed && self.small_batch != d.small_batch,
            "small-batch",
            "the fixed scale rule takes c from --noise-scale",
        );
        check(
            (!noisy || self.scale != ScaleName::Temperature) && self.small_lr.is_some(),
            "small-lr",
            "it applies only to --scale temperature",
        );
        check(
            (!noisy || self.scale != ScaleName::Fixed) && self.noise_scale.is_some(),
            "noise-scale",
            "it applies only to --scale fixed",
        );
        let no_reg = "there is no regularizer (--regularizer none)";
        check(
            self.regularizer == RegularizerName::None && self.reg_strength != d.reg_strength,
            "reg-strength",
            no_reg,
        );
        check(
            self.regularizer == RegularizerName::None
                && self.reg_micro_batches != d.reg_micro_batches,
            "reg-micro-batches",
            no_reg,
        );
        let not_multistep = "it applies only to --schedule multistep";
        check(
            self.schedule != ScheduleName::Multistep && !self.milestones.is_empty(),
            "milestones",
            not_multistep,
        );
        check(
            self.schedule != ScheduleName::Multistep && self.gamma != d.gamma,
            "gamma",
            not_multistep,
        );
        check(
            self.checkpoint_every == 0 && self.keep_checkpoints != d.keep_checkpoints,
            "keep-checkpoints",
            "no checkpoints are written (--checkpoint-every 0)",
        );
        check(
            self.batch_norm && self.model.has_batch_norm(),
            "batch-norm",
            "this model always has batch normalization",
        );
        out.sort();
        out.dedup_by_key(|(flag, _)| *flag);
        out
    }
}

/// The settings (kebab-case names) whose values differ between `a` and `b`.
pub fn differences(a: &TrainSettings, b: &TrainSettings) -> Vec<String> {
    let table = |s: &TrainSettings| toml::Table::try_from(s).unwrap_or_default();
    let (a, b) = (table(a), table(b));
    // Compared as written, so that a NaN equals itself.
    let text = |t: &toml::Table, k: &str| t.get(k).map(|v| v.to_string());
    let mut names: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| text(&a, k) != text(&b, k))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}
