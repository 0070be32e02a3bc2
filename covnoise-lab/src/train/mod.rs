//! The training loop: one readable loop, the same on one process or many
//! (only the process group's all-reduce differs), writing a complete run
//! directory.

pub mod checkpoint;
pub mod fault;
pub mod record;
pub mod run_dir;
pub mod settings;

pub use record::{DivergedInfo, EpochMetrics, RunStatus, RunSummary};
pub use run_dir::RunDir;
pub use settings::TrainSettings;

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use crate::data::{self, Dataset, TrainTest};
use crate::zoo::{Network, NetworkConfig};
use covnoise::collective::{
    Collective, SingleProcess, all_reduce_packed, average_buffers, replicas_identical,
};
use covnoise::error::CovnoiseError;
use covnoise::model::{Batch, cross_entropy_and_correct, labels_tensor};
use covnoise::moments::{self, MomentValues, StepContext};
use covnoise::noise::{NoiseStage, StructureName};
use covnoise::optim::LrSchedule;
use covnoise::params::ParamTable;
use covnoise::tensor_util::from_vec;
use covnoise::weights;

/// Why a run could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An impossible setting or a numerical failure outside the loop.
    #[error(transparent)]
    Config(#[from] CovnoiseError),
    /// Bad or missing data.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The run directory cannot be used.
    #[error("run directory {0}: {1}")]
    RunDirExists(PathBuf, &'static str),
    /// `--overwrite` (or `--restart`) found a file no run writes.
    #[error(
        "run directory {dir}: holds {name}, which no run writes; --overwrite and --restart remove only a run's own files (config.toml, metrics.jsonl, summary.json, eval.json, checkpoints/): move {name} out of the directory first"
    )]
    ForeignFile {
        /// The run directory.
        dir: PathBuf,
        /// The entry that is not the run's.
        name: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The loss or a gradient became NaN or infinite.
    #[error(
        "training diverged at step {} (epoch {}): {}; last finite loss {}",
        .0.step, .0.epoch, .0.message,
        .0.last_finite_loss.map_or("none".to_string(), |l| format!("{l:.6}"))
    )]
    Diverged(DivergedInfo),
}

/// Training examples (the first ones, in data order) on which a run's
/// final Fisher trace ([`RunSummary::fisher_trace`]) is computed.
pub const FISHER_EXAMPLES: usize = 4096;

/// Loss and accuracy of a model on a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction predicted correctly.
    pub accuracy: f64,
    /// Number of examples evaluated.
    pub examples: usize,
}

/// `config.toml`: every resolved setting plus where the data came from, the
/// resolved noise scale, and the code version.
pub fn config_record(
    settings: &TrainSettings,
    data: &TrainTest,
    trainer: &Trainer<'_>,
) -> Result<String, TrainError> {
    let ser = |e: toml::ser::Error| TrainError::Io {
        path: "config.toml".into(),
        message: format!("cannot serialize the settings: {e}"),
    };
    let mut table = toml::Table::try_from(settings).map_err(ser)?;
    let mut meta = toml::Table::new();
    meta.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("git-commit".into(), env!("COVNOISE_GIT_COMMIT").into());
    meta.insert("noise-scale-c".into(), trainer.noise_scale().into());
    meta.insert(
        "steps-per-epoch".into(),
        (trainer.steps_per_epoch() as i64).into(),
    );
    meta.insert("world-size".into(), (trainer.world_size() as i64).into());
    meta.insert(
        "threads".into(),
        (rayon::current_num_threads() as i64).into(),
    );
    meta.insert("train-examples".into(), (data.train.n as i64).into());
    meta.insert("test-examples".into(), (data.test.n as i64).into());
    meta.insert("data-mean".into(), data.standardization.mean.clone().into());
    meta.insert("data-std".into(), data.standardization.std.clone().into());
    meta.insert(
        "data".into(),
        toml::Value::try_from(&data.source).map_err(ser)?,
    );
    // The settings this run ignores, as the warnings printed at its start.
    meta.insert(
        "warnings".into(),
        toml::Value::Array(settings.warnings().into_iter().map(Into::into).collect()),
    );
    table.insert("meta".into(), meta.into());
    toml::to_string(&table).map_err(ser)
}

/// Loads the data set as `settings` say (which, directory, limits, holdout).
pub fn load_data(settings: &TrainSettings) -> Result<TrainTest, TrainError> {
    let opts = data::LoadOptions {
        train_limit: settings.train_limit,
        test_limit: settings.test_limit,
        swap_splits: settings.train_on == settings::TrainOn::Test,
        scaling: settings.inputs,
    };
    let loaded = settings.dataset.load(settings.data.as_deref(), &opts)?;
    match settings.holdout {
        Some(n) => hold_out(loaded, n),
        None => Ok(loaded),
    }
}

/// Moves the last `n` training examples into the evaluation set (replacing
/// the test set), for hyper-parameter search that never looks at the test
/// set. The standardization stays the one computed at load time.
pub fn hold_out(mut data: TrainTest, n: usize) -> Result<TrainTest, TrainError> {
    if n == 0 || n >= data.train.n {
        return Err(CovnoiseError::InvalidSetting {
            name: "holdout",
            value: n.to_string(),
            reason: "must be >= 1 and leave at least one training example",
        }
        .into());
    }
    let keep = data.train.n - n;
    let dim = data.train.dim;
    let features = data.train.features.split_off(keep * dim);
    let labels = data.train.labels.split_off(keep);
    data.train.n = keep;
    data.test = Dataset::new(
        features,
        labels,
        data.train.shape.clone(),
        data.train.num_classes,
    )?;
    Ok(data)
}

/// The `[C, H, W]` shape a data set's examples take as model inputs
/// (`[1, 1, dim]` for feature vectors).
pub fn input_shape(data: &Dataset) -> [usize; 3] {
    match *data.shape.as_slice() {
        [c, h, w] => [c, h, w],
        _ => [1, 1, data.dim],
    }
}

/// Copies a host batch to `device` as feature rows `[B, dim]` (for models
/// that take vectors).
pub fn features_to_device(batch: &data::Batch, device: &Device) -> Batch<2> {
    Batch {
        x: from_vec(batch.features.clone(), [batch.size, batch.dim], device),
        labels: labels_tensor(&batch.labels, device),
    }
}

/// Copies a host batch of examples of `shape` to `device` as `[B, C, H, W]`.
pub fn to_device(batch: &data::Batch, [c, h, w]: [usize; 3], device: &Device) -> Batch<4> {
    Batch {
        x: from_vec(batch.features.clone(), [batch.size, c, h, w], device),
        labels: labels_tensor(&batch.labels, device),
    }
}

/// Sums of loss and correct predictions over `data.rows(range)`.
fn evaluate_range(
    model: &Network,
    data: &Dataset,
    range: std::ops::Range<usize>,
    batch_size: usize,
    device: &Device,
) -> Result<(f64, f64), CovnoiseError> {
    let (mut loss_sum, mut correct) = (0.0, 0.0);
    let mut start = range.start;
    let [c, h, w] = input_shape(data);
    // Evaluation mode once per evaluation, not per batch: `valid()` copies
    // the model (60 MB for VGG-16).
    let eval = model.valid();
    while start < range.end {
        let end = (start + batch_size).min(range.end);
        let (x, labels) = data.rows(start..end);
        let x = from_vec(x.to_vec(), [end - start, c, h, w], device);
        let logits = eval.forward(x, &mut covnoise::model::Probes::off());
        let labels = labels_tensor(labels, device);
        let (loss, ok) = cross_entropy_and_correct(&logits, &labels)?;
        loss_sum += loss * (end - start) as f64;
        correct += ok as f64;
        start = end;
    }
    Ok((loss_sum, correct))
}

/// Evaluates `model` (evaluation mode) on all of `data`.
pub fn evaluate(
    model: &Network,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation, CovnoiseError> {
    evaluate_sharded(model, data, batch_size, device, &SingleProcess)
}

/// Evaluates with each process taking a contiguous shard of `data` and one
/// all-reduce combining the sums.
pub fn evaluate_sharded(
    model: &Network,
    data: &Dataset,
    batch_size: usize,
    device: &Device,
    collective: &dyn Collective,
) -> Result<Evaluation, CovnoiseError> {
    let (rank, world) = (collective.rank(), collective.world_size());
    let range = data.n * rank / world..data.n * (rank + 1) / world;
    let (loss_sum, correct) = evaluate_range(model, data, range, batch_size, device)?;
    let mut sums = [loss_sum, correct];
    all_reduce_packed(collective, &mut [], &mut sums)?;
    Ok(Evaluation {
        loss: sums[0] / data.n as f64,
        accuracy: sums[1] / data.n as f64,
        examples: data.n,
    })
}

/// The result of `covnoise eval`: a checkpoint's model on a test set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointEvaluation {
    /// The checkpoint's directory.
    pub checkpoint: PathBuf,
    /// Epochs trained when it was written.
    pub epoch: usize,
    /// Mean cross-entropy on the test set.
    pub test_loss: f64,
    /// Fraction of the test set predicted correctly.
    pub test_accuracy: f64,
    /// Test examples.
    pub examples: usize,
}

/// Evaluates the model of checkpoint `epoch` (None: the newest) of the run
/// in `run_dir` on its test set, or on the test set of the run's data set
/// in the files under `data` (standardized with the statistics of that
/// directory's training set, as the run's were).
pub fn evaluate_checkpoint(
    run_dir: &std::path::Path,
    epoch: Option<usize>,
    data: Option<&std::path::Path>,
) -> Result<CheckpointEvaluation, TrainError> {
    let dir = RunDir::open(run_dir)?;
    let mut settings = dir.read_settings()?;
    // A record that no run could have had is refused, not evaluated.
    settings.validate().map_err(|e| TrainError::Io {
        path: run_dir.join("config.toml"),
        message: e.to_string(),
    })?;
    // The test set, also for a run that evaluated on held-out examples.
    settings.holdout = None;
    if let Some(data) = data {
        settings.data = Some(data.to_path_buf());
        settings.test_limit = None;
    }
    let all = checkpoint::list(run_dir)?;
    let chosen = match epoch {
        None => all.last(),
        Some(e) => all.iter().find(|(n, _)| *n == e),
    };
    let Some((_, path)) = chosen else {
        let have: Vec<String> = all.iter().map(|(n, _)| n.to_string()).collect();
        return Err(TrainError::Checkpoint {
            path: run_dir.join(checkpoint::DIR),
            message: match epoch {
                Some(e) => format!(
                    "no checkpoint of epoch {e} (there are: {})",
                    if have.is_empty() {
                        "none".into()
                    } else {
                        have.join(", ")
                    }
                ),
                None => "no checkpoint (was the run started with --checkpoint-every 0?)".into(),
            },
        });
    };
    let saved = checkpoint::read(path)?;
    let data = load_data(&settings)?;
    let device = crate::device::parse_device(&settings.device)?;
    let config = settings.network_config(&data.train.shape, data.train.num_classes)?;
    let model = crate::zoo::init::reinit(
        Network::new(&config, settings.seed, &device.clone().autodiff())?,
        settings.init,
        settings.seed,
    );
    let model =
        weights::load_into(model, &saved.weights, false).map_err(|e| TrainError::Checkpoint {
            path: path.join("model.safetensors"),
            message: e.to_string(),
        })?;
    let test = evaluate(&model, &data.test, settings.eval_batch, &device)?;
    Ok(CheckpointEvaluation {
        checkpoint: path.clone(),
        epoch: saved.epoch,
        test_loss: test.loss,
        test_accuracy: test.accuracy,
        examples: test.examples,
    })
}

/// Receives the loop's progress (a progress bar, log lines, or nothing).
pub trait Progress {
    /// Called once before the first step.
    fn start(&mut self, _epochs: usize, _steps_per_epoch: usize) {}
    /// Called after each optimizer step with the batch's data loss and,
    /// with a regularizer, its penalty value (not included in the loss).
    fn step(&mut self, _epoch: usize, _step_in_epoch: usize, _loss: f64, _penalty: Option<f64>) {}
    /// Called after each epoch's evaluation.
    fn epoch(&mut self, _metrics: &EpochMetrics) {}
    /// Called once at the end (also after divergence).
    fn finish(&mut self) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default)]
pub struct Silent;
impl Progress for Silent {}

/// A training run, fully validated and ready to start.
pub struct Trainer<'a> {
    settings: TrainSettings,
    data: &'a TrainTest,
    device: Device,
    /// Taken by the optimizer during a step and put back after it.
    model: Option<Network>,
    /// The model's definition.
    network: NetworkConfig,
    stage: NoiseStage<Box<dyn Collective>>,
    optimizer: ModuleOptimizer,
    schedule: LrSchedule,
    steps_per_epoch: usize,
    /// Epochs already done (a resumed run) and their metrics.
    history: Vec<EpochMetrics>,
}

impl<'a> Trainer<'a> {
    /// Builds the model, noise stage, optimizer and schedule for `settings`
    /// on `data`, with the batch spread over `collective`. Every setting is
    /// checked here, before anything is written.
    pub fn new(
        settings: &TrainSettings,
        data: &'a TrainTest,
        collective: Box<dyn Collective>,
    ) -> Result<Self, TrainError> {
        // Batch size 0 becomes the training set's size first; validating the
        // resolved settings checks everything the given ones would.
        let settings = &settings.for_training_set(data.train.n);
        settings.validate()?;
        // The model and the data must fit each other before anything else.
        let network = settings.network_config(&data.train.shape, data.train.num_classes)?;
        network.validate()?;
        let world = collective.world_size();
        if !settings.batch_size.is_multiple_of(world) {
            return Err(CovnoiseError::InvalidSetting {
                name: "batch-size",
                value: settings.batch_size.to_string(),
                reason: "must be divisible by the number of processes",
            }
            .into());
        }
        let steps_per_epoch = data.train.n / settings.batch_size;
        if steps_per_epoch == 0 {
            return Err(CovnoiseError::InvalidSetting {
                name: "batch-size",
                value: settings.batch_size.to_string(),
                reason: "is larger than the training set",
            }
            .into());
        }
        let device = crate::device::parse_device(&settings.device)?;
        settings.check_memory(&network)?;
        if let Some(aug) = settings.augmentation() {
            aug.check(&data.train.shape, &data.standardization.fill_values())?;
        }
        let model = crate::zoo::init::reinit(
            Network::new(&network, settings.seed, &device.clone().autodiff())?,
            settings.init,
            settings.seed,
        );
        let noise = settings.noise_config()?;
        let mut stage = NoiseStage::new(noise, settings.batch_size, settings.seed)?
            .with_collective(collective)
            .with_coupling(network.coupling())
            .with_chunk(settings.chunk)
            .with_one_pass_micro_batches(
                settings.micro_batch_passes == settings::MicroBatchPassSetting::One,
            );
        if let Some(reg) = settings.regularizer_config()? {
            stage = stage.with_regularizer(reg)?;
        }
        if let Some(max) = settings.clip_norm {
            stage = stage.with_clip_norm(max)?;
        }
        // A dry run on a batch of the training shape (the first examples):
        // every estimator and coupling problem is refused before training.
        let mut sample = data::Batch::default();
        let first: Vec<usize> = (0..settings.batch_size / world).collect();
        data.train.gather_into(&first, &mut sample);
        stage.validate_model(
            &model,
            &to_device(&sample, network.input, &device.clone().autodiff()),
            |m: &Network, b: &Batch<4>, p| m.objective(b.x.clone(), b.labels.clone(), p),
        )?;
        let optimizer = settings.sgd_config().init()?;
        let schedule_epochs = settings.schedule_epochs.unwrap_or(settings.epochs);
        // Step counts are u64 products of user numbers: checked, never wrapped.
        let steps_of = |name: &'static str, epochs: usize| {
            (steps_per_epoch as u64)
                .checked_mul(epochs as u64)
                .ok_or_else(|| CovnoiseError::InvalidSetting {
                    name,
                    value: epochs.to_string(),
                    reason: "is too large: its number of steps does not fit in 64 bits",
                })
        };
        steps_of("epochs", settings.epochs)?;
        let total = steps_of("schedule-epochs", schedule_epochs)?;
        let warmup = steps_of("warmup-epochs", settings.warmup_epochs)?;
        let schedule = LrSchedule::new(
            settings.lr,
            settings.schedule_kind(),
            warmup,
            total,
            steps_per_epoch as u64,
        )?;
        Ok(Self {
            settings: settings.clone(),
            data,
            device,
            model: Some(model),
            network,
            stage,
            optimizer,
            schedule,
            steps_per_epoch,
            history: Vec::new(),
        })
    }

    /// Starts from the weights in `tensors` (by path; see
    /// [`covnoise::weights`]) instead of the seeded initialization.
    pub fn init_from(&mut self, tensors: &[weights::NamedTensor]) -> Result<(), TrainError> {
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        self.model = Some(weights::load_into(model, tensors, false)?);
        Ok(())
    }

    /// Continues from `checkpoint`: model, optimizer, noise stage, and the
    /// first `checkpoint.epoch` lines of `metrics` (the run's metrics.jsonl
    /// so far; later lines, written after the checkpoint, are dropped).
    pub fn restore(
        &mut self,
        checkpoint: &checkpoint::Checkpoint,
        mut metrics: Vec<EpochMetrics>,
    ) -> Result<(), TrainError> {
        let bad = |message: String| TrainError::Checkpoint {
            path: checkpoint.dir.clone(),
            message,
        };
        let epoch = checkpoint.epoch;
        if epoch > self.settings.epochs {
            return Err(bad(format!(
                "is after epoch {epoch}, but the run has {} epochs",
                self.settings.epochs
            )));
        }
        let expected_step = (epoch * self.steps_per_epoch) as u64;
        if checkpoint.noise.step != expected_step {
            return Err(TrainError::Checkpoint {
                path: checkpoint.dir.join("state.json"),
                message: format!(
                    "step {} does not match epoch {epoch} at {} steps per epoch (another data set or batch size?)",
                    checkpoint.noise.step, self.steps_per_epoch
                ),
            });
        }
        if metrics.len() < epoch
            || metrics.iter().take(epoch).enumerate().any(|(i, m)| {
                m.epoch != i + 1
                    || (m.steps != 0 && m.steps != ((i + 1) * self.steps_per_epoch) as u64)
            })
        {
            return Err(bad(format!(
                "metrics.jsonl does not hold the first {epoch} epochs the checkpoint follows"
            )));
        }
        metrics.truncate(epoch);
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        // Loaded into a copy: a refused checkpoint leaves the trainer as it was.
        let loaded = weights::load_into(model.clone(), &checkpoint.weights, true)
            .map_err(|e| bad(format!("model.safetensors: {e}")));
        self.model = Some(model);
        let loaded = loaded?;
        let table = ParamTable::of(&loaded);
        self.check_optimizer_record(checkpoint, &table)?;
        self.check_noise_state(checkpoint, &table)?;
        self.model = Some(loaded);
        let optimizer = std::mem::replace(&mut self.optimizer, self.settings.sgd_config().init()?);
        self.optimizer = checkpoint::load_optimizer(optimizer, checkpoint)?;
        self.stage
            .restore(checkpoint.noise.clone(), &self.device.clone().inner());
        self.history = metrics;
        Ok(())
    }

    /// The optimizer record must hold one momentum buffer of the right shape
    /// for every trainable parameter of the model (none without momentum
    /// or before the first step), and nothing else: burn would silently
    /// drop a buffer whose id it does not know.
    fn check_optimizer_record(
        &self,
        checkpoint: &checkpoint::Checkpoint,
        table: &ParamTable,
    ) -> Result<(), TrainError> {
        let bad = |message: String| TrainError::Checkpoint {
            path: checkpoint.dir.join("optimizer.bpk"),
            message,
        };
        let mut seen = std::collections::BTreeSet::new();
        for (id, shape) in &checkpoint.optimizer_tensors {
            let Some(entry) = id.and_then(|id| {
                table
                    .entries()
                    .iter()
                    .find(|e| e.id.val() == id)
                    .filter(|_| seen.insert(id))
            }) else {
                return Err(bad(format!(
                    "holds a tensor for parameter id {id:?}, which the model does not have (another run's optimizer state?)"
                )));
            };
            if *shape != entry.shape {
                return Err(bad(format!(
                    "the buffer of {} has shape {shape:?}, the parameter {:?}",
                    entry.name, entry.shape
                )));
            }
        }
        let expected = if self.settings.momentum > 0.0 && checkpoint.noise.step > 0 {
            table.len()
        } else {
            0
        };
        if seen.len() != expected {
            return Err(bad(format!(
                "holds {} momentum buffers, the model has {expected} to restore",
                seen.len()
            )));
        }
        Ok(())
    }

    /// The noise stage's counters must be those the run's settings produce
    /// in `checkpoint.noise.step` steps (replayed here: estimates are made
    /// on a fixed schedule), and its estimate must have the model's
    /// parameters' sizes.
    fn check_noise_state(
        &self,
        checkpoint: &checkpoint::Checkpoint,
        table: &ParamTable,
    ) -> Result<(), TrainError> {
        let bad = |file: &str, message: String| TrainError::Checkpoint {
            path: checkpoint.dir.join(file),
            message,
        };
        let state = &checkpoint.noise;
        let estimated = matches!(
            self.settings.noise,
            StructureName::Diag | StructureName::Isotropic
        );
        let (mut updates, mut last) = (0i64, None::<u64>);
        if estimated {
            let spe = self.steps_per_epoch as u64;
            for step in 0..state.step {
                let due = last.is_none_or(|l| step - l >= self.settings.refresh);
                if due && self.stage.active_in((step / spe) as usize) {
                    updates += 1;
                    last = Some(step);
                }
            }
        }
        let ids: Vec<u64> = if updates > 0 {
            table.entries().iter().map(|e| e.id.val()).collect()
        } else {
            Vec::new()
        };
        let smoother = &state.smoother;
        if i64::from(smoother.updates) != updates
            || smoother.last_refresh != last
            || state.estimate_ids != ids
        {
            return Err(bad(
                "state.json",
                format!(
                    "noise counters (updates {}, last refresh {:?}, {} estimate ids) are not those of {} steps of this run (updates {updates}, last refresh {last:?}, {} ids)",
                    smoother.updates,
                    smoother.last_refresh,
                    state.estimate_ids.len(),
                    state.step,
                    ids.len()
                ),
            ));
        }
        let fits = match &smoother.average {
            None => updates == 0,
            Some(MomentValues::Trace(t)) => {
                updates > 0
                    && self.settings.noise == StructureName::Isotropic
                    && t.is_finite()
                    && *t >= 0.0
            }
            Some(MomentValues::Diag(d)) => {
                updates > 0
                    && self.settings.noise == StructureName::Diag
                    && d.len() == table.len()
                    && d.iter().zip(table.entries()).all(|(v, e)| {
                        v.len() == e.numel() && v.iter().all(|x| x.is_finite() && *x >= 0.0)
                    })
            }
        };
        if !fits {
            return Err(bad(
                "noise.safetensors",
                "the noise estimate does not fit this run's noise structure and model".into(),
            ));
        }
        Ok(())
    }

    /// Epochs already done when [`Trainer::run`] starts (0 unless restored).
    pub fn start_epoch(&self) -> usize {
        self.history.len()
    }

    /// The resolved noise scale c.
    pub fn noise_scale(&self) -> f64 {
        self.stage.scale()
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// The model's definition.
    pub fn network(&self) -> &NetworkConfig {
        &self.network
    }

    /// The model (e.g. to evaluate or inspect after training).
    pub fn model(&self) -> &Network {
        self.model
            .as_ref()
            .expect("the model is back after every step")
    }

    /// Number of processes the batch is spread over.
    pub fn world_size(&self) -> usize {
        self.stage.collective().world_size()
    }

    /// Whether this process writes the run directory (rank 0).
    pub fn is_writer(&self) -> bool {
        self.stage.collective().rank() == 0
    }

    /// Trains for the configured epochs, appending each epoch's metrics to
    /// `run_dir` (rank 0 only) and writing `summary.json` at the end, also
    /// when the run diverges. A completed run's summary holds the final
    /// model's loss and accuracy on the whole training set (evaluation mode)
    /// and its Fisher trace ([`RunSummary::fisher_trace`]).
    pub fn run(
        &mut self,
        run_dir: Option<&RunDir>,
        progress: &mut dyn Progress,
    ) -> Result<RunSummary, TrainError> {
        let started = Instant::now();
        let run_dir = run_dir.filter(|_| self.is_writer());
        let (seed, batch_size) = (self.settings.seed, self.settings.batch_size);
        let world = self.stage.collective().world_size();
        let rank = self.stage.collective().rank();
        let shard = batch_size / world;
        let mut history: Vec<EpochMetrics> = std::mem::take(&mut self.history);
        let mut metrics_text = String::new();
        for m in &history {
            metrics_text.push_str(&serde_json::to_string(m).expect("metrics serialize"));
            metrics_text.push('\n');
        }
        let mut last_finite_loss = None;
        let mut host_batch = data::Batch::default();
        let augmentation = self.settings.augmentation();
        let fill = self.data.standardization.fill_values();
        let (mut checkpoint_seconds, mut checkpoint_bytes) = (0.0, 0);
        if let Some(dir) = run_dir {
            // From the start, the epochs done so far (none for a new run): a
            // run that dies in its next epoch still leaves a well-formed record.
            dir.write("metrics.jsonl", metrics_text.as_bytes())?;
            // An extended run's earlier summary no longer describes it; the
            // new one is written at the end.
            dir.remove("summary.json")?;
        }
        progress.start(self.settings.epochs, self.steps_per_epoch);

        for epoch in history.len()..self.settings.epochs {
            let epoch_start = Instant::now();
            let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
            let (mut trace_sum, mut trace_known) = (0.0, true);
            let mut penalty_sum: Option<f64> = None;
            let mut lr = 0.0;
            let batches = data::EpochShuffler::new(seed).batches(
                self.data.train.n,
                batch_size,
                epoch as u64,
                self.settings.sampling,
            )?;
            for (k, indices) in batches.iter().enumerate() {
                // This process's contiguous shard of the global batch.
                let mine = &indices[rank * shard..(rank + 1) * shard];
                match &augmentation {
                    Some(aug) => self.data.train.gather_augmented_into(
                        mine,
                        aug,
                        &fill,
                        seed,
                        epoch as u64,
                        &mut host_batch,
                    ),
                    None => self.data.train.gather_into(mine, &mut host_batch),
                }
                let batch = to_device(&host_batch, self.network.input, &self.device);
                lr = self.schedule.lr_at(self.stage.step());
                let model = self
                    .model
                    .take()
                    .expect("the model is back after every step");
                let gradient = self.stage.gradient_in_epoch(
                    &model,
                    &batch,
                    epoch,
                    |m: &Network, b: &Batch<4>, p| m.objective(b.x.clone(), b.labels.clone(), p),
                );
                let step = match gradient {
                    Ok(step) => step,
                    Err(
                        e @ (CovnoiseError::NonFiniteLoss { .. }
                        | CovnoiseError::NonFiniteGradient { .. }),
                    ) => {
                        let info = DivergedInfo {
                            step: self.stage.step(),
                            epoch: epoch + 1,
                            last_finite_loss,
                            message: e.to_string(),
                        };
                        let summary = self.summary(&history, started, Some(info.clone()), None)?;
                        if let Some(dir) = run_dir {
                            write_json(dir, "summary.json", &summary)?;
                        }
                        progress.finish();
                        return Err(TrainError::Diverged(info));
                    }
                    Err(e) => return Err(e.into()),
                };
                self.model = Some(self.optimizer.step(lr, model, step.grads));
                fault::point(fault::Point::AfterStep(step.step));
                last_finite_loss = Some(step.loss);
                loss_sum += step.loss * step.examples as f64;
                correct += step.correct.unwrap_or(0);
                seen += step.examples;
                match step.noise_trace {
                    Some(t) => trace_sum += t,
                    None => trace_known = false,
                }
                if let Some(p) = step.penalty {
                    penalty_sum = Some(penalty_sum.unwrap_or(0.0) + p);
                }
                progress.step(epoch, k, step.loss, step.penalty);
            }
            let seconds = epoch_start.elapsed().as_secs_f64();
            self.sync_buffers()?;
            let eval_start = Instant::now();
            let done = epoch + 1;
            let test =
                if done.is_multiple_of(self.settings.eval_every) || done == self.settings.epochs {
                    evaluate_sharded(
                        self.model(),
                        &self.data.test,
                        self.settings.eval_batch,
                        &self.device,
                        self.stage.collective(),
                    )?
                } else {
                    // Not evaluated this epoch (--eval-every): null in metrics.jsonl.
                    Evaluation {
                        loss: f64::NAN,
                        accuracy: f64::NAN,
                        examples: 0,
                    }
                };
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                lr,
                train_loss: loss_sum / seen as f64,
                train_accuracy: correct as f64 / seen as f64,
                test_loss: test.loss,
                test_accuracy: test.accuracy,
                noise_trace: trace_known.then(|| trace_sum / self.steps_per_epoch as f64),
                seconds,
                eval_seconds: eval_start.elapsed().as_secs_f64(),
                steps: self.stage.step(),
                penalty: penalty_sum.map(|p| p / self.steps_per_epoch as f64),
            };
            if let Some(dir) = run_dir {
                metrics_text.push_str(&serde_json::to_string(&metrics).expect("metrics serialize"));
                metrics_text.push('\n');
                dir.write("metrics.jsonl", metrics_text.as_bytes())?;
            }
            progress.epoch(&metrics);
            history.push(metrics);
            let every = self.settings.checkpoint_every;
            if let Some(dir) = run_dir
                && every > 0
                && (done % every == 0 || done == self.settings.epochs)
            {
                let written = checkpoint::write(
                    dir.path(),
                    done,
                    self.model(),
                    &self.optimizer,
                    &self.stage.state()?,
                    self.settings.keep_checkpoints,
                )?;
                checkpoint_seconds += written.seconds;
                checkpoint_bytes = written.bytes;
            }
        }
        let params = ParamTable::of(self.model()).values(self.model());
        let identical = replicas_identical(self.stage.collective(), &params)?;
        let final_train = evaluate_sharded(
            self.model(),
            &self.data.train,
            self.settings.eval_batch,
            &self.device,
            self.stage.collective(),
        )?;
        let fisher_trace = self.final_fisher_trace()?;
        let mut summary = self.summary(&history, started, None, Some(identical))?;
        summary.fisher_trace = fisher_trace;
        summary.checkpoint_seconds = checkpoint_seconds;
        summary.checkpoint_bytes = checkpoint_bytes;
        summary.train_loss = final_train.loss;
        summary.train_accuracy = final_train.accuracy;
        if let Some(dir) = run_dir {
            write_json(dir, "summary.json", &summary)?;
        }
        progress.finish();
        Ok(summary)
    }

    /// The trace of the empirical Fisher per example of the current model
    /// on the first [`FISHER_EXAMPLES`] training examples (all of them when
    /// there are fewer), each process taking a contiguous shard, in passes
    /// of at most `--chunk` and `eval-batch` examples. None when the model
    /// has no per-example gradients (batch norm) or a parameter has no
    /// per-example rule. The noise stage is not touched, and the model's
    /// running statistics stay as they were.
    fn final_fisher_trace(&self) -> Result<Option<f64>, TrainError> {
        let collective = self.stage.collective();
        let (rank, world) = (collective.rank(), collective.world_size());
        let n = self.data.train.n.min(FISHER_EXAMPLES);
        let mine: Vec<usize> = (n * rank / world..n * (rank + 1) / world).collect();
        let mut host = data::Batch::default();
        self.data.train.gather_into(&mine, &mut host);
        let examples = to_device(&host, self.network.input, &self.device);
        let table = ParamTable::of(self.model());
        let eval = self.settings.eval_batch;
        let ctx = StepContext {
            seed: self.settings.seed,
            step: self.stage.step(),
            collective,
            table: &table,
            coupling: self.network.coupling(),
            chunk: Some(self.settings.chunk.map_or(eval, |c| c.min(eval))),
        };
        let forward = |m: &Network, b: &Batch<4>, p: &mut covnoise::model::Probes| {
            m.objective(b.x.clone(), b.labels.clone(), p)
        };
        match moments::fisher_trace(self.model(), &examples, &forward, &ctx) {
            Ok(trace) => Ok(trace),
            Err(CovnoiseError::Unsupported(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Averages batch-norm running statistics over replicas (each saw its
    /// own shard), so that every replica evaluates the same model.
    fn sync_buffers(&mut self) -> Result<(), CovnoiseError> {
        let model = self
            .model
            .take()
            .expect("the model is back after every step");
        self.model = Some(average_buffers(model, self.stage.collective())?);
        Ok(())
    }

    fn summary(
        &self,
        history: &[EpochMetrics],
        started: Instant,
        diverged: Option<DivergedInfo>,
        identical: Option<bool>,
    ) -> Result<RunSummary, TrainError> {
        let last = history.last();
        let world = self.stage.collective().world_size();
        let train_seconds: f64 = history.iter().map(|m| m.seconds).sum();
        Ok(RunSummary {
            status: if diverged.is_some() {
                RunStatus::Diverged
            } else {
                RunStatus::Completed
            },
            test_accuracy: last.map_or(f64::NAN, |m| m.test_accuracy),
            train_accuracy: last.map_or(f64::NAN, |m| m.train_accuracy),
            train_loss: last.map_or(f64::NAN, |m| m.train_loss),
            test_loss: last.map_or(f64::NAN, |m| m.test_loss),
            epochs: history.len(),
            steps: self.stage.step(),
            wall_seconds: started.elapsed().as_secs_f64(),
            seconds_per_epoch: if history.is_empty() {
                0.0
            } else {
                train_seconds / history.len() as f64
            },
            seed: self.settings.seed,
            noise_scale: self.stage.scale(),
            world_size: world,
            replicas_identical: if world > 1 { identical } else { None },
            diverged,
            checkpoint_seconds: 0.0,
            checkpoint_bytes: 0,
            fisher_trace: None,
        })
    }
}

/// Serializes `value` as pretty JSON into `name` in `dir`, atomically.
fn write_json<T: serde::Serialize>(dir: &RunDir, name: &str, value: &T) -> Result<(), TrainError> {
    // NaN is not JSON: serde_json writes it as null, which readers accept.
    let text = serde_json::to_string_pretty(value).expect("records serialize");
    dir.write(name, format!("{text}\n").as_bytes())
}
