//! Studies: a grid of arms x seeds, each arm a full training configuration,
//! with an optional equal-budget hyper-parameter search on held-out training
//! data, resumable run by run, aggregated into tables and plots.
//!
//! A study file (TOML):
//!
//! ```toml
//! name = "quick"
//! seeds = [0, 1, 2]
//! [search]              # optional: pick each arm's grid point on a holdout
//! epochs = 4            # search runs are the first 4 epochs of a final run
//! holdout = 10000       # last N training examples, never the test set
//! seed = 0
//! [base]                # settings shared by every arm (train's keys)
//! epochs = 10
//! [[arm]]
//! name = "large batch"
//! settings = { batch-size = 4096 }
//! grid = { lr = [0.1, 0.2, 0.4] }   # searched: the cartesian product
//! ```

mod aggregate;

pub use aggregate::{
    ArmResult, CURVES_EPOCHS, CURVES_STEPS, CurvePoint, FINAL, SearchResult, SeedResult,
    StudyReport, aggregate,
};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::TrainTest;
use crate::train::{
    Progress, RunDir, RunStatus, RunSummary, Silent, TrainError, TrainSettings, Trainer,
    checkpoint, config_record, load_data,
};
use covnoise::collective::SingleProcess;

/// Errors of a study: a bad study file (before anything runs), or a run that
/// failed for another reason than divergence.
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    /// The study file is unreadable or inconsistent.
    #[error("{0}")]
    Spec(String),
    /// An arm's settings are invalid.
    #[error("arm {arm:?}{point}: {message}")]
    BadArm {
        /// The arm's name.
        arm: String,
        /// The grid point, if the error is specific to one.
        point: String,
        /// What is wrong.
        message: String,
    },
    /// A run could not be done.
    #[error("run {}: {source}", .dir.display())]
    Run {
        /// The run directory.
        dir: PathBuf,
        /// Why.
        source: TrainError,
    },
    /// Reading or writing study files failed.
    #[error("{0}")]
    Io(String),
}

/// The search settings of a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SearchSpec {
    /// Epochs of each search run.
    pub epochs: usize,
    /// Training examples held out for selection (the last N).
    pub holdout: usize,
    /// Seed of the search runs.
    #[serde(default)]
    pub seed: u64,
}

/// One arm: a name, its settings, and the values to search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ArmSpec {
    /// Display name (also the run directory name, slugified).
    pub name: String,
    /// Settings on top of the study's base.
    #[serde(default)]
    pub settings: toml::Table,
    /// Setting -> candidate values; the search covers their product.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
}

/// A study file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StudySpec {
    /// Study name.
    pub name: String,
    /// What the study asks.
    #[serde(default)]
    pub description: String,
    /// Seeds of the final runs (at least one; three or more for claims).
    pub seeds: Vec<u64>,
    /// The search; without it every grid must be a single point.
    #[serde(default)]
    pub search: Option<SearchSpec>,
    /// Settings shared by all arms.
    #[serde(default)]
    pub base: toml::Table,
    /// The arms.
    #[serde(rename = "arm")]
    pub arms: Vec<ArmSpec>,
    /// Settings that override the file's everywhere (base, arms and grids),
    /// e.g. where the data are and which device: `covnoise study --set`.
    #[serde(skip)]
    pub overrides: toml::Table,
    /// The part of the study kept by `--arm` and `--seeds` (None: all of
    /// it), which names the report's files.
    #[serde(skip)]
    pub part: Option<String>,
}

/// One arm, resolved: the settings of each search candidate and of each
/// final run (once a candidate is chosen).
#[derive(Debug, Clone)]
pub struct ArmPlan {
    /// The arm's name.
    pub name: String,
    /// Directory name under `runs/`.
    pub slug: String,
    /// Grid points (setting -> value) with their search settings.
    pub candidates: Vec<(toml::Table, TrainSettings)>,
    /// Final settings for each grid point (before the seed is set).
    finals: Vec<TrainSettings>,
}

impl ArmPlan {
    /// Whether this arm runs a search.
    pub fn searches(&self) -> bool {
        self.candidates.len() > 1
    }
}

fn merge(into: &mut toml::Table, from: &toml::Table) {
    for (k, v) in from {
        into.insert(k.clone(), v.clone());
    }
}

fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

fn describe(point: &toml::Table) -> String {
    point
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl StudySpec {
    /// Parses a study file.
    pub fn from_toml(text: &str) -> Result<Self, StudyError> {
        toml::from_str(text).map_err(|e| StudyError::Spec(e.message().trim().to_string()))
    }

    /// Reads a study file.
    pub fn load(path: &Path) -> Result<Self, StudyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StudyError::Io(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| StudyError::Spec(format!("{}: {e}", path.display())))
    }

    /// Keeps only the arm named `name` (`covnoise study --arm`), so that a
    /// reader can check one row without the whole grid. Its run
    /// directories are the same as in the whole study, so the full study
    /// later reuses them.
    pub fn only_arm(&mut self, name: &str) -> Result<(), StudyError> {
        let names: Vec<String> = self.arms.iter().map(|a| a.name.clone()).collect();
        self.arms.retain(|a| a.name == name);
        self.part = Some(format!(
            "{}-{}",
            self.part.take().unwrap_or_else(|| "arm".into()),
            slug(name)
        ));
        if self.arms.is_empty() {
            return Err(StudyError::Spec(format!(
                "--arm {name:?}: the study has no such arm (its arms: {})",
                names
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// Keeps the first `n` seeds of the study (`covnoise study --seeds`).
    pub fn first_seeds(&mut self, n: usize) -> Result<(), StudyError> {
        if n == 0 || n > self.seeds.len() {
            return Err(StudyError::Spec(format!(
                "--seeds {n}: the study has {} seeds; give 1 to {}",
                self.seeds.len(),
                self.seeds.len()
            )));
        }
        self.seeds.truncate(n);
        self.part = Some(format!(
            "{}-{n}-seeds",
            self.part.take().unwrap_or_else(|| "part".into())
        ));
        Ok(())
    }

    /// The stem of the report's files: `study`, or `study-arm-NAME` /
    /// `study-...-N-seeds` for a part of the study.
    pub fn report_stem(&self) -> String {
        match &self.part {
            None => "study".into(),
            Some(part) => format!("study-{part}"),
        }
    }

    /// Adds an override `key=value` (a TOML value; a bare word is a string):
    /// see [`StudySpec::overrides`].
    pub fn set(&mut self, assignment: &str) -> Result<(), StudyError> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| StudyError::Spec(format!("--set {assignment}: expected KEY=VALUE")))?;
        let (key, value) = (key.trim(), value.trim());
        let value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        self.overrides.insert(key.to_string(), value);
        Ok(())
    }

    /// Resolves and validates every arm at every grid point: a bad arm is an
    /// error here, before anything runs.
    pub fn plan(&self) -> Result<Vec<ArmPlan>, StudyError> {
        if self.seeds.is_empty() {
            return Err(StudyError::Spec("seeds: give at least one seed".into()));
        }
        if self.arms.is_empty() {
            return Err(StudyError::Spec("no [[arm]] in the study".into()));
        }
        let mut slugs = std::collections::HashSet::new();
        let mut plans = Vec::new();
        for arm in &self.arms {
            let bad = |point: &toml::Table, message: String| StudyError::BadArm {
                arm: arm.name.clone(),
                point: if point.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", describe(point))
                },
                message,
            };
            let slug = slug(&arm.name);
            if slug.is_empty() || !slugs.insert(slug.clone()) {
                return Err(bad(
                    &toml::Table::new(),
                    "needs a name distinct from the other arms".into(),
                ));
            }
            // The thread pool is one per process, shared by concurrent runs.
            for key in ["seed", "holdout", "data", "threads"] {
                if arm.grid.contains_key(key) || arm.settings.contains_key(key) {
                    return Err(bad(
                        &toml::Table::new(),
                        format!("{key} is set by the study, not by an arm"),
                    ));
                }
            }
            // Cartesian product of the grid, in the file's key order.
            let mut points = vec![toml::Table::new()];
            for (key, values) in &arm.grid {
                if values.is_empty() {
                    return Err(bad(
                        &toml::Table::new(),
                        format!("grid {key} has no values"),
                    ));
                }
                points = points
                    .into_iter()
                    .flat_map(|p| {
                        values.iter().map(move |v| {
                            let mut q = p.clone();
                            q.insert(key.clone(), v.clone());
                            q
                        })
                    })
                    .collect();
            }
            if points.len() > 1 && self.search.is_none() {
                return Err(bad(
                    &toml::Table::new(),
                    "has a grid but the study has no [search]".into(),
                ));
            }
            let mut candidates = Vec::new();
            let mut finals = Vec::new();
            for point in points {
                let mut table = self.base.clone();
                merge(&mut table, &arm.settings);
                merge(&mut table, &point);
                merge(&mut table, &self.overrides);
                let mut settings: TrainSettings = table
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| bad(&point, e.message().trim().to_string()))?;
                // Recorded absolute, as `covnoise train` records it, so that
                // each run directory finds its data from anywhere.
                settings.data = settings
                    .data
                    .as_deref()
                    .map(std::path::absolute)
                    .transpose()
                    .map_err(|e| bad(&point, format!("data: {e}")))?;
                settings
                    .validate()
                    .map_err(|e| bad(&point, e.to_string()))?;
                let mut search = settings.clone();
                if let Some(s) = &self.search {
                    if s.epochs > settings.epochs {
                        return Err(bad(
                            &point,
                            format!(
                                "search epochs {} exceed the final runs' {}",
                                s.epochs, settings.epochs
                            ),
                        ));
                    }
                    // A search run is the first epochs of a final run: same
                    // schedule (warmup, peak, decay horizon), stopped early.
                    search.schedule_epochs =
                        Some(settings.schedule_epochs.unwrap_or(settings.epochs));
                    search.epochs = s.epochs;
                    search.holdout = Some(s.holdout);
                    search.seed = s.seed;
                    search.validate().map_err(|e| bad(&point, e.to_string()))?;
                }
                candidates.push((point, search));
                finals.push(settings);
            }
            plans.push(ArmPlan {
                name: arm.name.clone(),
                slug,
                candidates,
                finals,
            });
        }
        Ok(plans)
    }
}

/// What the study runner reports as it goes.
#[derive(Debug, Clone)]
pub enum StudyEvent<'a> {
    /// A run is about to start (`index` of `total` runs in the study).
    Start {
        /// Run directory.
        dir: &'a Path,
        /// 1-based position.
        index: usize,
        /// Runs in the study.
        total: usize,
    },
    /// A finished run was found and is reused.
    Skip {
        /// Run directory.
        dir: &'a Path,
    },
    /// An unfinished run continues from its newest checkpoint.
    Continue {
        /// Run directory.
        dir: &'a Path,
        /// Epochs already done.
        epoch: usize,
    },
    /// An unfinished run's checkpoint cannot be used; the run starts again.
    Restart {
        /// Run directory.
        dir: &'a Path,
        /// Why the checkpoint was not used.
        reason: String,
    },
    /// An arm's settings include one its runs ignore (one event per arm
    /// and warning, before anything is written).
    Warning {
        /// The arm's name.
        arm: &'a str,
        /// The warning, one line.
        message: String,
    },
    /// A run ended.
    Done {
        /// Run directory.
        dir: &'a Path,
        /// Its summary.
        summary: &'a RunSummary,
    },
}

/// Loaded data sets, shared by the runs that use the same files and limits.
#[derive(Default)]
struct DataCache {
    loaded: HashMap<String, TrainTest>,
}

impl DataCache {
    fn key(settings: &TrainSettings) -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}",
            settings.data, settings.train_limit, settings.test_limit, settings.holdout
        )
    }

    /// Loads the data a run needs, once per distinct data setting.
    fn load(&mut self, settings: &TrainSettings) -> Result<(), TrainError> {
        let key = Self::key(settings);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.loaded.entry(key) {
            slot.insert(load_data(settings)?);
        }
        Ok(())
    }

    /// Loads the data of every job before any runs, so that a missing or
    /// corrupt data set stops the study before training starts.
    fn load_for(&mut self, jobs: &[Job]) -> Result<(), StudyError> {
        for job in jobs {
            self.load(&job.settings).map_err(|source| StudyError::Run {
                dir: job.dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The data of a run, loaded earlier by [`DataCache::load`].
    fn get(&self, settings: &TrainSettings) -> &TrainTest {
        &self.loaded[&Self::key(settings)]
    }
}

/// The settings a finished run directory was made with (config.toml less
/// its `meta` table).
fn recorded_settings(dir: &Path) -> Option<toml::Table> {
    let text = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    let mut table: toml::Table = text.parse().ok()?;
    table.remove("meta");
    Some(table)
}

/// Runs one configuration into `dir`, or reuses the run already there if it
/// finished with the same settings. A divergence is a result, not an error.
fn run_or_reuse(
    settings: &TrainSettings,
    dir: &Path,
    cache: &DataCache,
    progress: &mut dyn Progress,
    on_event: &mut dyn FnMut(StudyEvent),
    index: usize,
    total: usize,
) -> Result<RunSummary, StudyError> {
    let fail = |source: TrainError| StudyError::Run {
        dir: dir.to_path_buf(),
        source,
    };
    if let Some(existing) = recorded_settings(dir) {
        // Compared as settings, so that a run recorded before a setting
        // existed (its default then) still matches.
        if existing.try_into::<TrainSettings>().ok().as_ref() != Some(settings) {
            return Err(StudyError::Io(format!(
                "{} holds a run with other settings than the study file asks for; delete it or use another --out",
                dir.display()
            )));
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("summary.json"))
            && let Ok(summary) = serde_json::from_str::<RunSummary>(&text)
        {
            on_event(StudyEvent::Skip { dir });
            return Ok(summary);
        }
    }
    on_event(StudyEvent::Start { dir, index, total });
    let data = cache.get(settings);
    let mut trainer = Trainer::new(settings, data, Box::new(SingleProcess)).map_err(fail)?;
    // An unfinished run with these settings continues from its newest
    // checkpoint; without a usable one it starts again from scratch.
    let resumed =
        recorded_settings(dir).is_some() && resume_from_checkpoint(&mut trainer, dir, on_event);
    let run_dir = if resumed {
        RunDir::open(dir).map_err(fail)?
    } else {
        // A failed restore may have changed part of the trainer.
        trainer = Trainer::new(settings, data, Box::new(SingleProcess)).map_err(fail)?;
        let run_dir = RunDir::create(dir, true).map_err(fail)?;
        run_dir
            .write(
                "config.toml",
                config_record(settings, data, &trainer)
                    .map_err(fail)?
                    .as_bytes(),
            )
            .map_err(fail)?;
        run_dir
    };
    let summary = match trainer.run(Some(&run_dir), progress) {
        Ok(summary) => summary,
        Err(TrainError::Diverged(_)) => {
            let text = std::fs::read_to_string(dir.join("summary.json"))
                .map_err(|e| StudyError::Io(format!("{}: {e}", dir.display())))?;
            serde_json::from_str(&text).map_err(|e| StudyError::Io(e.to_string()))?
        }
        Err(e) => return Err(fail(e)),
    };
    on_event(StudyEvent::Done {
        dir,
        summary: &summary,
    });
    Ok(summary)
}

/// Threads each of `workers` concurrent runs gets: an equal share of the
/// process's pool, at least one.
pub fn threads_per_job(workers: usize) -> usize {
    (rayon::current_num_threads() / workers.max(1)).max(1)
}

/// Restores `trainer` from the newest checkpoint in `dir`; false (and the
/// trainer to be rebuilt) when there is none or it is unusable.
fn resume_from_checkpoint(
    trainer: &mut Trainer<'_>,
    dir: &Path,
    on_event: &mut dyn FnMut(StudyEvent),
) -> bool {
    let Ok(Some((_, newest))) = checkpoint::list(dir).map(|mut all| all.pop()) else {
        return false;
    };
    let restored = (|| -> Result<(), TrainError> {
        let saved = checkpoint::read(&newest)?;
        let metrics = RunDir::open(dir)?.read_metrics()?;
        trainer.restore(&saved, metrics)
    })();
    match restored {
        Ok(()) => {
            on_event(StudyEvent::Continue {
                dir,
                epoch: trainer.start_epoch(),
            });
            true
        }
        Err(e) => {
            on_event(StudyEvent::Restart {
                dir,
                reason: e.to_string(),
            });
            false
        }
    }
}

/// The chosen grid point of each arm (by final holdout accuracy; ties and
/// divergences resolved towards the earlier candidate). An arm without a
/// search (no summaries) has one candidate: index 0.
fn best_index(summaries: &[RunSummary]) -> usize {
    let score = |s: &RunSummary| {
        if s.status == RunStatus::Completed && s.test_accuracy.is_finite() {
            s.test_accuracy
        } else {
            f64::NEG_INFINITY
        }
    };
    let mut best = 0;
    for (i, s) in summaries.iter().enumerate() {
        if score(s) > score(&summaries[best]) {
            best = i;
        }
    }
    best
}

/// One run of the study: its settings, its directory, and its 1-based
/// position in the study (for progress messages).
struct Job {
    settings: TrainSettings,
    dir: PathBuf,
    index: usize,
}

/// Runs `jobs` on `workers` threads (in order when `workers` is 1, with
/// `progress`; otherwise silently, one run per thread), returning their
/// summaries in job order. The first failure stops the workers from taking
/// further jobs; runs already started finish and stay reusable.
fn run_jobs(
    jobs: &[Job],
    workers: usize,
    total: usize,
    cache: &DataCache,
    progress: &mut dyn Progress,
    on_event: &mut (dyn FnMut(StudyEvent) + Send),
) -> Result<Vec<RunSummary>, StudyError> {
    if workers <= 1 || jobs.len() <= 1 {
        return jobs
            .iter()
            .map(|job| {
                run_or_reuse(
                    &job.settings,
                    &job.dir,
                    cache,
                    progress,
                    on_event,
                    job.index,
                    total,
                )
            })
            .collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    // Each concurrent run gets its own share of the threads, so that runs
    // do not queue behind each other's tensor work and their seconds per
    // epoch mean "with this many threads".
    let share = threads_per_job(workers);
    let events = std::sync::Mutex::new(on_event);
    let results: Vec<std::sync::Mutex<Option<Result<RunSummary, StudyError>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(jobs.len()) {
            scope.spawn(|| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(share).build();
                let work = || {
                    use std::sync::atomic::Ordering;
                    // Events of concurrent runs are serialized through one lock.
                    let mut forward = |event: StudyEvent| {
                        let mut sink = events.lock().unwrap_or_else(|e| e.into_inner());
                        (*sink)(event)
                    };
                    while !failed.load(Ordering::SeqCst) {
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        let Some(job) = jobs.get(k) else { break };
                        let result = run_or_reuse(
                            &job.settings,
                            &job.dir,
                            cache,
                            &mut Silent,
                            &mut forward,
                            job.index,
                            total,
                        );
                        if result.is_err() {
                            failed.store(true, Ordering::SeqCst);
                        }
                        *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    }
                };
                match pool {
                    Ok(pool) => pool.install(work),
                    // No pool (out of OS threads): share the global one.
                    Err(_) => work(),
                }
            });
        }
    });
    let mut summaries = Vec::with_capacity(jobs.len());
    for (job, slot) in jobs.iter().zip(results) {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(result) => summaries.push(result?),
            None => {
                return Err(StudyError::Io(format!(
                    "{} was not run: an earlier run failed",
                    job.dir.display()
                )));
            }
        }
    }
    Ok(summaries)
}

/// Runs (or resumes) the whole study under `out` and aggregates it into
/// `study.md`, `study.json` and plots.
///
/// The search runs of every arm come first, then the final runs; `workers`
/// runs proceed at once (each run is independent and seeded, so the results
/// do not depend on `workers`). With one worker, `progress` follows each run.
pub fn run_study(
    spec: &StudySpec,
    out: &Path,
    workers: usize,
    progress: &mut dyn Progress,
    on_event: &mut (dyn FnMut(StudyEvent) + Send),
) -> Result<StudyReport, StudyError> {
    let plans = spec.plan()?;
    let spec_text = toml::to_string(spec).map_err(|e| StudyError::Io(e.to_string()))?;
    // Every run's memory is checked and its data loaded before the output
    // directory is made, so that a refused study leaves the file system as
    // it was. (Not in `plan`: a study for a larger machine can be planned
    // here.)
    for plan in &plans {
        for settings in plan.candidates.iter().map(|(_, s)| s).chain(&plan.finals) {
            let kind = settings.dataset;
            settings
                .network_config(&kind.shape(), kind.num_classes())
                .and_then(|network| settings.check_memory(&network))
                .map_err(|e| StudyError::BadArm {
                    arm: plan.name.clone(),
                    point: String::new(),
                    message: e.to_string(),
                })?;
        }
    }
    let mut cache = DataCache::default();
    for plan in &plans {
        for (k, settings) in plan
            .candidates
            .iter()
            .map(|(_, s)| s)
            .chain(&plan.finals)
            .enumerate()
        {
            cache.load(settings).map_err(|source| StudyError::Run {
                dir: out.join("runs").join(&plan.slug).join(k.to_string()),
                source,
            })?;
        }
    }
    crate::train::run_dir::check_can_create(out).map_err(|e| StudyError::Io(e.to_string()))?;
    for plan in &plans {
        let mut said = std::collections::BTreeSet::new();
        for settings in plan.candidates.iter().map(|(_, s)| s).chain(&plan.finals) {
            for message in settings.warnings() {
                if said.insert(message.clone()) {
                    on_event(StudyEvent::Warning {
                        arm: &plan.name,
                        message,
                    });
                }
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| StudyError::Io(format!("{}: {e}", out.display())))?;
    crate::train::run_dir::write_atomic(&out.join("study.toml"), spec_text.as_bytes())
        .map_err(|e| StudyError::Io(e.to_string()))?;
    let total: usize = plans
        .iter()
        .map(|p| if p.searches() { p.candidates.len() } else { 0 } + spec.seeds.len())
        .sum();
    let arm_dir = |plan: &ArmPlan| out.join("runs").join(&plan.slug);

    // Every search run, then the chosen point of each arm.
    let mut search_jobs = Vec::new();
    for plan in plans.iter().filter(|p| p.searches()) {
        for (k, (_, settings)) in plan.candidates.iter().enumerate() {
            search_jobs.push(Job {
                settings: settings.clone(),
                dir: arm_dir(plan).join(format!("search-{k}")),
                index: search_jobs.len() + 1,
            });
        }
    }
    cache.load_for(&search_jobs)?;
    let mut done = search_jobs.iter().zip(run_jobs(
        &search_jobs,
        workers,
        total,
        &cache,
        progress,
        on_event,
    )?);
    let mut searches = Vec::new();
    let mut chosen = Vec::new();
    for plan in &plans {
        let ran = if plan.searches() {
            plan.candidates.len()
        } else {
            0
        };
        let (search, summaries): (Vec<_>, Vec<_>) = plan
            .candidates
            .iter()
            .zip(done.by_ref().take(ran))
            .map(|((point, _), (job, summary))| {
                let result = SearchResult {
                    point: describe(point),
                    dir: job.dir.clone(),
                    holdout_accuracy: summary.test_accuracy,
                    status: summary.status,
                };
                (result, summary)
            })
            .unzip();
        chosen.push(best_index(&summaries));
        searches.push(search);
    }

    // Every final run at its arm's chosen point.
    let mut final_jobs = Vec::new();
    for (plan, &c) in plans.iter().zip(&chosen) {
        for &seed in &spec.seeds {
            let mut settings = plan.finals[c].clone();
            settings.seed = seed;
            final_jobs.push(Job {
                settings,
                dir: arm_dir(plan).join(format!("seed-{seed}")),
                index: search_jobs.len() + final_jobs.len() + 1,
            });
        }
    }
    cache.load_for(&final_jobs)?;
    run_jobs(&final_jobs, workers, total, &cache, progress, on_event)?;

    let mut final_dirs = final_jobs.into_iter().map(|job| job.dir);
    let arms = plans
        .iter()
        .zip(chosen)
        .zip(searches)
        .map(|((plan, c), search)| {
            let finals = final_dirs.by_ref().take(spec.seeds.len()).collect();
            (
                plan.name.clone(),
                describe(&plan.candidates[c].0),
                plan.finals[c].clone(),
                search,
                finals,
            )
        })
        .collect();
    let jobs = workers.max(1);
    let threads = if jobs > 1 {
        threads_per_job(jobs)
    } else {
        rayon::current_num_threads()
    };
    let report = aggregate(spec, arms, jobs, threads)?;
    report.write(out)?;
    Ok(report)
}
