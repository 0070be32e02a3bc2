//! `covnoise train`: flags (or a TOML file) -> settings -> data -> run
//! directory -> the library's training loop.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use covnoise::collective::{Collective, SingleProcess};
use covnoise::noise::StructureName;
use covnoise_lab::data::{DatasetKind, InputScaling, Sampling};
use covnoise_lab::train::settings::{
    EstimatorName, MicroBatchPassSetting, RegularizerName, ScaleName, ScheduleName, TrainOn,
};
use covnoise_lab::train::{
    EpochMetrics, Progress, RunDir, RunSummary, TrainSettings, Trainer, checkpoint,
};
use covnoise_lab::zoo::Architecture;
use covnoise_lab::zoo::init::InitScheme;
use indicatif::{ProgressBar, ProgressStyle};

/// Settings of `covnoise train`. Every flag overrides the same key of
/// `--config FILE`; unset flags keep the file's value or the default shown.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML file with any of the settings below (keys as the long flag
    /// names without dashes in front, e.g. `batch-size = 4096`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run directory to write (config.toml, metrics.jsonl, summary.json).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: Option<PathBuf>,
    /// Replace the run in an existing run directory: what runs write there
    /// (config.toml, metrics.jsonl, summary.json, eval.json, checkpoints/)
    /// is removed first. A directory without a config.toml, or holding any
    /// other file, is refused, naming the file.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue the run in RUN_DIR from its newest checkpoint, with the
    /// settings in its config.toml (only --epochs, to extend it, and
    /// --threads, --quiet, --log-steps may be given). A run without a
    /// checkpoint is refused unless --restart is given.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["out", "config", "overwrite", "init_from"])]
    pub resume: Option<PathBuf>,
    /// With --resume: train the run again from epoch 0 with its settings,
    /// emptying its directory as --overwrite does (for a run without a
    /// usable checkpoint).
    #[arg(long, requires = "resume")]
    pub restart: bool,
    /// Start from the weights in FILE (safetensors, tensors named by
    /// parameter path, e.g. a checkpoint's model.safetensors) instead of the
    /// seeded initialization.
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Print nothing but errors and the final line.
    #[arg(long)]
    pub quiet: bool,
    /// Write one JSON line per optimizer step, {"step", "epoch", "loss"}
    /// with the loss of the global batch, to FILE (rank 0 only).
    #[arg(long, value_name = "FILE")]
    pub log_steps: Option<PathBuf>,
    /// Process group: `single` trains in this process; `mpi` trains one
    /// model on all processes of `mpirun -np K`, each taking B/K examples of
    /// every batch (needs a build with `--features mpi`).
    #[arg(long, value_enum, value_name = "GROUP", default_value_t = Distributed::Single)]
    pub distributed: Distributed,

    /// Model: mlp, lenet5 (28x28 grey), vgg11, vgg16, resnet20, resnet32,
    /// resnet44, resnet56 (32x32 colour), sequential (from --layers) [default: mlp].
    #[arg(long, value_name = "NAME", value_parser = parse_model)]
    pub model: Option<Architecture>,
    /// Data set: fashion-mnist, cifar10, cifar100, cifar100-coarse
    /// [default: fashion-mnist].
    #[arg(long, value_name = "NAME", value_parser = parse_dataset)]
    pub dataset: Option<DatasetKind>,
    /// Directory with the data set's files: Fashion-MNIST's four IDX files
    /// (plain or .gz) [default: $COVNOISE_DATA, then
    /// /usr/share/datasets/fashion-mnist]; CIFAR's binary version (no default).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Augment training images: random crop with 4-pixel zero padding and
    /// horizontal flip, seeded by (seed, epoch, example) [default: on for
    /// CIFAR, off for Fashion-MNIST].
    #[arg(long, conflicts_with = "no_augment")]
    pub augment: bool,
    /// Do not augment training images.
    #[arg(long)]
    pub no_augment: bool,
    /// Use only the first N training examples.
    #[arg(long, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long, value_name = "N")]
    pub test_limit: Option<usize>,
    /// Which file trains: train, or test (then the training file tests; the limits apply to the roles) [default: train].
    #[arg(long, value_enum, value_name = "FILE")]
    pub train_on: Option<TrainOn>,
    /// How image bytes become features: standardized (per channel, training set's statistics), unit (pixel / 255), raw (0-255) [default: standardized].
    #[arg(long, value_enum, value_name = "SCALING")]
    pub inputs: Option<InputScaling>,
    /// How each step's batch is drawn: epoch (one permutation per epoch) or step (B distinct examples drawn afresh every step) [default: epoch].
    #[arg(long, value_enum, value_name = "HOW")]
    pub sampling: Option<Sampling>,
    /// How every weight and bias is drawn: default (the model's own), normal:STD, uniform:A (from the run's seed) [default: default].
    #[arg(long, value_name = "SCHEME")]
    pub init: Option<InitScheme>,

    /// Evaluate on the last N training examples (held out from training) instead of the test set.
    #[arg(long, value_name = "N")]
    pub holdout: Option<usize>,

    /// The layers of --model sequential, comma-separated: conv:OUT:K[:STRIDE[:PAD]],
    /// maxpool:K, avgpool:K, relu, tanh, flatten, linear:OUT; the last is linear:CLASSES.
    #[arg(long, value_name = "SPEC")]
    pub layers: Option<String>,
    /// Hidden layer widths of the MLP, comma-separated [default: 512,512].
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub hidden: Option<Vec<usize>>,
    /// Batch normalization after each hidden layer of the MLP (statistics over the whole batch; VGG and ResNet always have it).
    #[arg(long)]
    pub batch_norm: bool,
    /// Ghost batch normalization (MLP, VGG, ResNet): statistics over sub-batches of N (Hoffer et al. 2017).
    #[arg(long, value_name = "N")]
    pub ghost_batch: Option<usize>,

    /// Run each forward and backward pass over at most N examples at a time
    /// and accumulate: the same step up to float rounding, less memory, and
    /// on a CPU faster for conv nets (examples are split only where the model
    /// allows: not across batch-norm groups) [default: whole batches].
    #[arg(long, value_name = "N")]
    pub chunk: Option<usize>,
    /// How the micro-batch estimator and the penalties form micro-batch gradients: one (one pass over the batch where the model allows it) or each (a pass per micro-batch, holding one micro-batch's activations at a time) [default: one].
    #[arg(long, value_enum, value_name = "HOW")]
    pub micro_batch_passes: Option<MicroBatchPassSetting>,
    /// Global batch size B (the large batch B_L); 0 for the whole training set (full-batch gradient descent) [default: 4096].
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 0.2].
    #[arg(long, value_name = "LR", allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// SGD momentum (PyTorch semantics) [default: 0.9].
    #[arg(long, value_name = "BETA", allow_negative_numbers = true)]
    pub momentum: Option<f64>,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// L2 weight decay, added to the gradient as PyTorch's SGD does [default: 0].
    #[arg(long, value_name = "WD", allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Number of epochs [default: 10].
    #[arg(long, value_name = "E")]
    pub epochs: Option<usize>,
    /// Learning-rate schedule after warmup [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleName>,
    /// Length of the schedule in epochs, to stop a run early at the point a longer run would be [default: --epochs].
    #[arg(long, value_name = "E")]
    pub schedule_epochs: Option<usize>,
    /// Multistep milestones: 0-based epochs at which the rate is multiplied by --gamma.
    #[arg(long, value_delimiter = ',', value_name = "E,E,...")]
    pub milestones: Option<Vec<usize>>,
    /// Multistep factor [default: 0.1].
    #[arg(long, value_name = "G", allow_negative_numbers = true)]
    pub gamma: Option<f64>,
    /// Linear warmup over the first W epochs' steps, multiplying the schedule [default: 2].
    #[arg(long, value_name = "W")]
    pub warmup_epochs: Option<usize>,

    /// Noise structure added to the gradient [default: none].
    #[arg(long, value_parser = structure_names())]
    pub noise: Option<StructureName>,
    /// With --noise subset: the examples of the global batch that carry noise (1 to the batch size).
    #[arg(long, value_name = "M")]
    pub noise_subset: Option<usize>,
    /// With --noise constant: the variance per entry at c = 1 (the noise is N(0, c V I)) [default: 1].
    #[arg(long, value_name = "V", allow_negative_numbers = true)]
    pub noise_variance: Option<f64>,
    /// With --noise full: center the multiplicative weights (covariance Sigma_B instead of F_B).
    #[arg(long)]
    pub centered: bool,
    /// Estimator of diag(F) for diag and isotropic noise [default: exact].
    #[arg(long, value_enum)]
    pub estimator: Option<EstimatorName>,
    /// Number of micro-batches M for --estimator microbatch (M >= 2, dividing B) [default: 16].
    #[arg(long, value_name = "M")]
    pub micro_batches: Option<usize>,
    /// Small batch B_S whose gradient noise is imitated [default: 128].
    #[arg(long, value_name = "B_S")]
    pub small_batch: Option<usize>,
    /// Scale rule: paper c = 1/B_S - 1/B_L; temperature c = (lr_S/lr_L)/B_S - 1/B_L (clamped at 0); fixed c = --noise-scale [default: paper].
    #[arg(long, value_enum)]
    pub scale: Option<ScaleName>,
    /// Learning rate lr_S of the small-batch reference (temperature rule).
    #[arg(long, value_name = "LR_S", allow_negative_numbers = true)]
    pub small_lr: Option<f64>,
    /// The noise scale c for --scale fixed.
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub noise_scale: Option<f64>,
    /// Multiplier kappa >= 0 on c; 0 gives plain large-batch training [default: 1].
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub kappa: Option<f64>,
    /// First epoch (0-based) with noise [default: 0].
    #[arg(long, value_name = "EPOCH")]
    pub noise_from: Option<usize>,
    /// First epoch (0-based) without noise again [default: end of run].
    #[arg(long, value_name = "EPOCH")]
    pub noise_until: Option<usize>,
    /// Exponential moving average of the estimate across refreshes, beta in [0, 1) [default: off].
    #[arg(long, value_name = "BETA", allow_negative_numbers = true)]
    pub ema: Option<f64>,
    /// Re-estimate diag(F) every K steps, reusing the last estimate in between [default: 1].
    #[arg(long, value_name = "K")]
    pub refresh: Option<u64>,

    /// Explicit penalty lambda (1/M) sum_m ||g_m||^2 on the gradients g_m of M micro-batches:
    /// grad-norm (data labels) or fisher-trace (labels sampled from the model) [default: none].
    #[arg(long, value_enum)]
    pub regularizer: Option<RegularizerName>,
    /// Strength lambda >= 0 of --regularizer; 0 is the plain step [default: 0].
    #[arg(long, value_name = "LAMBDA", allow_negative_numbers = true)]
    pub reg_strength: Option<f64>,
    /// Micro-batches M the penalty is taken over (dividing B) [default: 1].
    #[arg(long, value_name = "M")]
    pub reg_micro_batches: Option<usize>,
    /// Clip each step's gradient to global norm C, as torch.nn.utils.clip_grad_norm_ [default: off].
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub clip_norm: Option<f64>,

    /// Seed for initialization, shuffling and noise [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Worker threads [default: all cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// The burn device: cpu, wgpu, wgpu-cpu (software Vulkan), cuda, cuda:N, libtorch;
    /// all but cpu need a build with `--features wgpu`, `cuda` or `tch` [default: cpu].
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
    /// Evaluation batch size (does not change results) [default: 2000].
    #[arg(long, value_name = "N")]
    pub eval_batch: Option<usize>,
    /// Evaluate on the test set after every E epochs and after the last;
    /// other epochs record null test metrics (for many short epochs, e.g.
    /// full-batch training) [default: 1].
    #[arg(long, value_name = "E")]
    pub eval_every: Option<usize>,
    /// Checkpoint every E epochs and after the last (0: never) [default: 1].
    #[arg(long, value_name = "E")]
    pub checkpoint_every: Option<usize>,
    /// Keep the newest K checkpoints [default: 2].
    #[arg(long, value_name = "K")]
    pub keep_checkpoints: Option<usize>,
}

impl TrainArgs {
    /// The settings: defaults, then `--config`, then the flags given.
    pub fn settings(&self) -> anyhow::Result<TrainSettings> {
        let s = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                TrainSettings::from_toml(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message().trim()))?
            }
            None => TrainSettings::default(),
        };
        Ok(self.apply(s))
    }

    /// `base` with every flag given applied on top.
    fn apply(&self, mut s: TrainSettings) -> TrainSettings {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { s.$field = v.clone(); } )* };
        }
        macro_rules! set_opt {
            ($($field:ident),*) => { $( if self.$field.is_some() { s.$field = self.$field.clone(); } )* };
        }
        set!(
            model,
            dataset,
            hidden,
            batch_size,
            lr,
            momentum,
            weight_decay,
            epochs,
            schedule,
            milestones,
            gamma,
            warmup_epochs,
            noise,
            estimator,
            micro_batches,
            inputs,
            sampling,
            init,
            train_on,
            micro_batch_passes,
            small_batch,
            scale,
            kappa,
            noise_from,
            noise_variance,
            refresh,
            regularizer,
            reg_strength,
            reg_micro_batches,
            seed,
            device,
            eval_batch,
            eval_every,
            checkpoint_every,
            keep_checkpoints
        );
        set_opt!(
            data,
            train_limit,
            test_limit,
            holdout,
            layers,
            schedule_epochs,
            chunk,
            ghost_batch,
            small_lr,
            noise_scale,
            noise_until,
            noise_subset,
            ema,
            clip_norm,
            threads
        );
        s.batch_norm |= self.batch_norm;
        if self.augment {
            s.augment = Some(true);
        } else if self.no_augment {
            s.augment = Some(false);
        }
        s.nesterov |= self.nesterov;
        s.centered |= self.centered;
        s
    }
}

/// The process group a run trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Distributed {
    /// This process alone.
    Single,
    /// All processes of the MPI job (`mpirun -np K`).
    Mpi,
}

/// Runs `covnoise train`.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    match args.distributed {
        Distributed::Single => {
            let summary = train(args, Box::new(SingleProcess))?;
            println!("{}", final_line(&summary, args));
            Ok(())
        }
        Distributed::Mpi => run_mpi(args),
    }
}

/// Trains on all processes of the MPI job. An error on any process is
/// printed with its rank and ends the whole job (MPI abort), so that the
/// other processes never wait forever in an all-reduce; only divergence,
/// which all processes see together, ends the job without an abort.
#[cfg(feature = "mpi")]
fn run_mpi(args: &TrainArgs) -> anyhow::Result<()> {
    use covnoise_lab::train::TrainError;
    let mpi = covnoise_lab::dist::MpiCollective::init()?;
    match train(args, Box::new(mpi.clone())) {
        Ok(summary) => {
            if mpi.rank() == 0 {
                // Communication of the whole run (evaluation included) per step.
                let (comm, steps) = (mpi.stats(), summary.steps.max(1) as f64);
                println!(
                    "{}  [{} processes; {} all-reduces, {:.2} ms/step, {:.2} MB/step]",
                    final_line(&summary, args),
                    mpi.world_size(),
                    comm.calls,
                    1e3 * comm.seconds / steps,
                    comm.bytes as f64 / 1e6 / steps,
                );
            }
            Ok(())
        }
        // Divergence is seen by every process at the same step (losses and
        // gradients are all-reduced): once rank 0 has written summary.json,
        // report it once and end with a failure status, without an abort.
        Err(e) if matches!(e.downcast_ref(), Some(TrainError::Diverged(_))) => {
            mpi.barrier();
            if mpi.rank() == 0 {
                eprintln!("error (rank 0 of {}): {e:#}", mpi.world_size());
            }
            drop(mpi); // finalizes MPI
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("error (rank {} of {}): {e:#}", mpi.rank(), mpi.world_size());
            mpi.abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_args: &TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("this covnoise was built without MPI support; rebuild with --features mpi")
}

/// `path` made absolute against the current directory (a run directory
/// records where its data is, to be found from anywhere).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// Refuses a `--log-steps` file that could not be created: its directory
/// must exist and be writable, and it must not be a directory itself.
fn check_step_log(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("--log-steps {}: is a directory", path.display());
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        anyhow::bail!(
            "--log-steps {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    covnoise_lab::train::run_dir::check_writable(parent)
        .with_context(|| format!("--log-steps {}", path.display()))?;
    Ok(())
}

/// Settings, data, trainer and run on `collective`; only the writer
/// (rank 0) touches the run directory and reports progress. Every setting,
/// path and input is checked before the first file is created or changed.
fn train(args: &TrainArgs, collective: Box<dyn Collective>) -> anyhow::Result<RunSummary> {
    // Only rank 0 writes, so only rank 0 checks where it will write: another
    // rank could otherwise see the directory rank 0 is emptying.
    let writer = collective.rank() == 0;
    let resume = args.resume.as_deref().map(absolute).transpose()?;
    let (settings, note) = match &resume {
        Some(dir) => resume_settings(args, dir)?,
        None => {
            let mut settings = args.settings()?;
            settings.data = settings.data.as_deref().map(absolute).transpose()?;
            (settings, None)
        }
    };
    settings.validate()?;
    let out = args.out.as_deref().map(absolute).transpose()?;
    let log_steps = args.log_steps.as_deref().map(absolute).transpose()?;
    // The directory this command will empty (--overwrite, --restart).
    let emptied = match (&out, &resume) {
        (Some(dir), None) if args.overwrite => Some(dir),
        (None, Some(dir)) if args.restart => Some(dir),
        _ => None,
    };
    if let (Some(dir), Some(data)) = (emptied, &settings.data)
        && data.starts_with(dir)
    {
        anyhow::bail!(
            "--data {} lies inside {}, which this command empties",
            data.display(),
            dir.display()
        );
    }
    match (&out, &resume) {
        _ if !writer => {}
        (Some(dir), None) => RunDir::check_new(dir, args.overwrite)?,
        (None, Some(dir)) => covnoise_lab::train::run_dir::check_writable(dir)?,
        _ => {}
    }
    if writer && let Some(path) = &log_steps {
        check_step_log(path)?;
    }
    super::set_threads(settings.threads)?;
    let data = covnoise_lab::train::load_data(&settings)?;
    let mut trainer = Trainer::new(&settings, &data, collective)?;
    if let Some(file) = &args.init_from {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let tensors = covnoise::weights::from_safetensors(&bytes)
            .with_context(|| format!("{}", file.display()))?;
        trainer
            .init_from(&tensors)
            .with_context(|| format!("{}", file.display()))?;
    }
    if let Some(dir) = resume.as_deref().filter(|_| !args.restart) {
        let run_dir = RunDir::open(dir)?;
        let Some((_, newest)) = checkpoint::list(dir)?.pop() else {
            anyhow::bail!(
                "{} has no checkpoint to resume from ({}); pass --restart to train it again from epoch 0",
                dir.display(),
                if settings.checkpoint_every == 0 {
                    "it was run with --checkpoint-every 0"
                } else {
                    "none was written, or they were removed"
                }
            );
        };
        let saved = checkpoint::read(&newest)?;
        trainer.restore(&saved, run_dir.read_metrics()?)?;
        if trainer.start_epoch() == settings.epochs {
            anyhow::bail!(
                "{} is complete ({} epochs); pass a larger --epochs to extend it",
                dir.display(),
                settings.epochs
            );
        }
    }
    let record = covnoise_lab::train::config_record(&settings, &data, &trainer)?;

    // Everything is checked: from here on the command writes (and speaks).
    if writer {
        if let Some(note) = &note {
            eprintln!("{note}");
        }
        for warning in settings.warnings() {
            eprintln!("warning: {warning}");
        }
        if !args.quiet {
            eprintln!(
                "model {}: {} parameters; data {}: {} training and {} test examples{}",
                settings.model,
                group_thousands(trainer.model().parameter_count()),
                settings.dataset,
                data.train.n,
                data.test.n,
                if settings.augmentation_on() {
                    ", augmented"
                } else {
                    ""
                }
            );
        }
    }
    let run_dir = match (&out, &resume) {
        _ if !writer => None,
        (_, Some(dir)) if args.restart => Some(RunDir::create(dir, true)?),
        (_, Some(dir)) => Some(RunDir::open(dir)?),
        (Some(path), None) => Some(RunDir::create(path, args.overwrite)?),
        (None, None) => None,
    };
    if let Some(dir) = &run_dir {
        // A resumed run keeps its record (code version included) unless
        // --epochs extended it.
        if resume.is_none() || args.restart || dir.read_settings()? != settings {
            dir.write("config.toml", record.as_bytes())?;
        }
    }
    let mut progress = TerminalProgress::new(args.quiet || !writer);
    if writer && let Some(path) = &log_steps {
        progress = progress.with_step_log(path)?;
    }
    let summary = trainer.run(run_dir.as_ref(), &mut progress)?;
    progress.step_log_result()?;
    Ok(summary)
}

/// The settings of the run in `dir`, with --epochs raised if given, and a
/// note for the user when that stretches the schedule; any other flag that
/// would change the run is refused.
fn resume_settings(
    args: &TrainArgs,
    dir: &Path,
) -> anyhow::Result<(TrainSettings, Option<String>)> {
    let saved = RunDir::open(dir)?.read_settings()?;
    // The record itself first: a bad value there is not a flag's fault.
    saved
        .validate()
        .with_context(|| format!("{}", dir.join("config.toml").display()))?;
    let requested = args.apply(saved.clone());
    let mut changed = covnoise_lab::train::settings::differences(&saved, &requested);
    changed.retain(|name| !["epochs", "threads"].contains(&name.as_str()));
    if !changed.is_empty() {
        anyhow::bail!(
            "--resume continues {} with its own settings; these flags would change the run: --{}",
            dir.display(),
            changed.join(", --")
        );
    }
    if requested.epochs < saved.epochs {
        anyhow::bail!(
            "--epochs {} is fewer than the run's {} epochs; a run can be extended, not shortened",
            requested.epochs,
            saved.epochs
        );
    }
    let note = (requested.epochs > saved.epochs
        && requested.schedule != covnoise_lab::train::settings::ScheduleName::Constant
        && requested.schedule_epochs.is_none()
        && !args.quiet)
        .then(|| {
            format!(
                "note: the {:?} schedule now spans {} epochs; the epochs already run followed the {}-epoch one",
                requested.schedule, requested.epochs, saved.epochs
            )
        });
    Ok((requested, note))
}

/// The one line printed at the end of a run.
fn final_line(summary: &RunSummary, args: &TrainArgs) -> String {
    format!(
        "test accuracy {:.4}  test loss {:.4}  train accuracy {:.4}  train loss {:.4}  {:.1}s/epoch  c = {:.3e}{}",
        summary.test_accuracy,
        summary.test_loss,
        summary.train_accuracy,
        summary.train_loss,
        summary.seconds_per_epoch,
        summary.noise_scale,
        args.out
            .as_ref()
            .map_or(String::new(), |p| format!("  -> {}", p.display()))
    )
}

/// A progress bar on a terminal, plain per-epoch lines otherwise, and
/// optionally a per-step log file (`--log-steps`).
pub struct TerminalProgress {
    quiet: bool,
    bar: Option<ProgressBar>,
    epochs: usize,
    steps_per_epoch: usize,
    step_log: Option<StepLog>,
}

/// `--log-steps FILE`: one JSON line per step; the first write error is kept
/// and reported after the run.
struct StepLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    error: Option<std::io::Error>,
}

impl TerminalProgress {
    /// Chooses the bar when stderr is a terminal and not `quiet`.
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            bar: None,
            epochs: 0,
            steps_per_epoch: 0,
            step_log: None,
        }
    }

    /// Also writes each step's loss to `path` (created or truncated).
    fn with_step_log(mut self, path: &std::path::Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create step log {}", path.display()))?;
        self.step_log = Some(StepLog {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(file),
            error: None,
        });
        Ok(self)
    }

    /// Flushes the step log; its first write error, if any, fails the run.
    fn step_log_result(&mut self) -> anyhow::Result<()> {
        if let Some(log) = &mut self.step_log {
            let flushed = log.file.flush();
            if let Some(e) = log.error.take().or(flushed.err()) {
                return Err(e).with_context(|| format!("writing step log {}", log.path.display()));
            }
        }
        Ok(())
    }
}

fn epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    let test = if m.test_accuracy.is_nan() {
        "test -".to_string()
    } else {
        format!("test loss {:.4} acc {:.4}", m.test_loss, m.test_accuracy)
    };
    format!(
        "epoch {:>3}/{epochs}  lr {:.4}  train loss {:.4} acc {:.4}  {test}  noise {}  {:.1}s",
        m.epoch,
        m.lr,
        m.train_loss,
        m.train_accuracy,
        m.noise_trace
            .map_or("-".to_string(), |t| format!("{t:.3e}")),
        m.seconds
    )
}

impl Progress for TerminalProgress {
    fn start(&mut self, epochs: usize, steps_per_epoch: usize) {
        self.epochs = epochs;
        self.steps_per_epoch = steps_per_epoch;
        if !self.quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new((epochs * steps_per_epoch) as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]",
                )
                .expect("valid template"),
            );
            self.bar = Some(bar);
        }
    }

    fn step(&mut self, epoch: usize, k: usize, loss: f64, penalty: Option<f64>) {
        if let Some(log) = &mut self.step_log
            && log.error.is_none()
        {
            let mut line = serde_json::json!({
                "step": epoch * self.steps_per_epoch + k,
                "epoch": epoch + 1,
                "loss": loss,
            });
            if let Some(p) = penalty {
                line["penalty"] = p.into();
            }
            // Flushed per line, so the file can be followed while training.
            log.error = writeln!(log.file, "{line}")
                .and_then(|()| log.file.flush())
                .err();
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("epoch {} loss {loss:.4}", epoch + 1));
        }
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        let line = epoch_line(m, self.epochs);
        match &self.bar {
            Some(bar) => bar.println(line),
            None if !self.quiet => println!("{line}"),
            None => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

pub(crate) fn parse_model(s: &str) -> Result<Architecture, String> {
    s.parse()
        .map_err(|e: covnoise::CovnoiseError| e.to_string())
}

fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse()
        .map_err(|e: covnoise_lab::data::DataError| e.to_string())
}

/// `1234567` as `1,234,567`.
fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `--noise`'s parser: the library's structure names, listed by `--help`.
fn structure_names() -> impl clap::builder::TypedValueParser<Value = StructureName> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(StructureName::ALL.map(StructureName::as_str)).map(
        |name| {
            name.parse::<StructureName>()
                .expect("the parser admits only the library's names")
        },
    )
}
