//! Aggregation of a study's run directories into tables and plots. Reads
//! run directories only.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{SearchSpec, StudyError, StudySpec};
use crate::report::run_plots::{SeedLines, plot_bars, plot_seed_lines};
use crate::report::runs::{RunRecord, load_run, mean_std};
use crate::train::{RunStatus, TrainSettings};

/// One search run.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// The grid point, e.g. `lr=0.2 kappa=1.0`.
    pub point: String,
    /// Its run directory.
    pub dir: PathBuf,
    /// Accuracy on the held-out training examples after the search epochs.
    pub holdout_accuracy: f64,
    /// How the run ended.
    pub status: RunStatus,
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for one seed.
    pub std: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Self {
        let (mean, std) = mean_std(values);
        Self { mean, std }
    }
}

/// A mean over paired differences and its 95 % Student-t interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Interval {
    /// Mean difference.
    pub mean: f64,
    /// Half the width of the 95 % interval, `t(0.975, n-1) s / sqrt(n)`;
    /// NaN for fewer than two differences.
    pub half_width: f64,
}

impl Interval {
    fn of(values: &[f64]) -> Self {
        let n = values.len();
        let (mean, std) = mean_std(values);
        let half_width = if n >= 2 {
            t_975(n - 1) * std / (n as f64).sqrt()
        } else {
            f64::NAN
        };
        Self { mean, half_width }
    }

    /// `mean ± half_width`, or the mean alone without an interval.
    fn cell(&self, digits: usize) -> String {
        if !self.mean.is_finite() {
            "–".into()
        } else if self.half_width.is_finite() {
            format!(
                "{:+.d$} ± {:.d$} [{:+.d$}, {:+.d$}]",
                self.mean,
                self.half_width,
                self.mean - self.half_width,
                self.mean + self.half_width,
                d = digits
            )
        } else {
            format!("{:+.d$}", self.mean, d = digits)
        }
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom: the
/// tabulated values for 1 to 30, and beyond them the normal quantile with
/// the first Cornish-Fisher correction (`z + (z³ + z) / (4 df)`, within
/// 0.002 of the exact value there).
pub fn t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => {
            let z = 1.959_964;
            z + (z * z * z + z) / (4.0 * df as f64)
        }
    }
}

/// One arm against the study's first arm, paired by seed.
#[derive(Debug, Clone, Serialize)]
pub struct PairedDifference {
    /// The arm.
    pub arm: String,
    /// The reference arm (the study's first).
    pub reference: String,
    /// Seeds both completed.
    pub seeds: usize,
    /// Arm minus reference, final test accuracy in percentage points.
    pub test_accuracy_points: Interval,
    /// Arm minus reference, final test loss.
    pub test_loss: Interval,
}

/// One point of a final run's test-accuracy curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CurvePoint {
    /// Epoch (1-based).
    pub epoch: usize,
    /// Optimizer steps taken by the end of the epoch (None: not recorded).
    pub steps: Option<u64>,
    /// Test accuracy after the epoch (NaN: diverged or not evaluated).
    pub test_accuracy: f64,
    /// Test loss after the epoch (NaN: diverged or not evaluated).
    pub test_loss: f64,
}

/// One final run (one seed) of an arm.
#[derive(Debug, Clone, Serialize)]
pub struct SeedResult {
    /// Its run directory.
    pub dir: PathBuf,
    /// Its seed (from the summary, else the config; None if neither says).
    pub seed: Option<u64>,
    /// How it ended; None for a run without a summary (killed).
    pub status: Option<RunStatus>,
    /// Final test accuracy.
    pub test_accuracy: f64,
    /// Final test loss.
    pub test_loss: f64,
    /// Final accuracy on the whole training set in evaluation mode.
    pub train_accuracy: f64,
    /// Final loss on the whole training set in evaluation mode.
    pub train_loss: f64,
    /// `train_accuracy - test_accuracy`.
    pub gap: f64,
    /// Epochs completed.
    pub epochs: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// The final model's Fisher trace ([`crate::train::RunSummary::fisher_trace`]).
    pub fisher_trace: Option<f64>,
    /// Test accuracy per epoch.
    pub curve: Vec<CurvePoint>,
}

impl SeedResult {
    fn of(record: &RunRecord) -> Self {
        let summary = record.summary.as_ref();
        let value = |f: fn(&crate::train::RunSummary) -> f64| summary.map_or(f64::NAN, f);
        // Steps of an epoch recorded before metrics held them: the run's
        // steps per epoch from its summary.
        let per_epoch = summary
            .filter(|s| s.epochs > 0)
            .map(|s| s.steps / s.epochs as u64);
        let curve = record
            .metrics
            .iter()
            .map(|m| CurvePoint {
                epoch: m.epoch,
                steps: if m.steps > 0 {
                    Some(m.steps)
                } else {
                    per_epoch.map(|k| k * m.epoch as u64)
                },
                test_accuracy: m.test_accuracy,
                test_loss: m.test_loss,
            })
            .collect();
        let (test, train) = (value(|s| s.test_accuracy), value(|s| s.train_accuracy));
        Self {
            dir: record.dir.clone(),
            seed: summary.map(|s| s.seed).or_else(|| {
                record
                    .config
                    .get("seed")
                    .and_then(|v| v.as_integer())
                    .and_then(|v| u64::try_from(v).ok())
            }),
            status: summary.map(|s| s.status),
            test_accuracy: test,
            test_loss: value(|s| s.test_loss),
            train_accuracy: train,
            train_loss: value(|s| s.train_loss),
            gap: train - test,
            epochs: summary.map_or(record.metrics.len(), |s| s.epochs),
            steps: summary.map_or(0, |s| s.steps),
            fisher_trace: summary.and_then(|s| s.fisher_trace),
            curve,
        }
    }

    fn completed(&self) -> bool {
        self.status == Some(RunStatus::Completed)
    }
}

/// One arm's outcome over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    /// The arm's name.
    pub name: String,
    /// The chosen grid point (empty when nothing was searched).
    pub chosen: String,
    /// The final runs' settings (seed aside).
    pub settings: TrainSettings,
    /// Noise scale c of the final runs.
    pub noise_scale: f64,
    /// Final runs that completed.
    pub completed: usize,
    /// Final runs that diverged.
    pub diverged: usize,
    /// Test accuracy over completed seeds.
    pub test_accuracy: Spread,
    /// Training-set accuracy (evaluation mode) over completed seeds.
    pub train_accuracy: Spread,
    /// Training-set loss (evaluation mode) over completed seeds.
    pub train_loss: Spread,
    /// Train minus test accuracy, per completed seed, then over seeds.
    pub gap: Spread,
    /// Epochs of the completed final runs.
    pub epochs: Spread,
    /// Optimizer steps of the completed final runs.
    pub steps: Spread,
    /// The final models' Fisher trace over the completed seeds that
    /// recorded one; None when none did (batch norm, older runs).
    pub fisher_trace: Option<Spread>,
    /// Training seconds per epoch over completed seeds.
    pub seconds_per_epoch: Spread,
    /// Training milliseconds per optimizer step over completed seeds (the
    /// epoch's training time, data batching included, over its steps).
    pub ms_per_step: Spread,
    /// Test accuracy per epoch (mean and std over completed seeds).
    pub curve: Vec<(usize, Spread)>,
    /// Each final run, in the order of the arm's run directories.
    pub seeds: Vec<SeedResult>,
    /// The search runs, in grid order.
    pub search: Vec<SearchResult>,
    /// The final run directories.
    pub runs: Vec<PathBuf>,
}

/// A study's aggregated results.
#[derive(Debug, Clone, Serialize)]
pub struct StudyReport {
    /// Study name.
    pub name: String,
    /// Study description.
    pub description: String,
    /// Seeds of the final runs.
    pub seeds: Vec<u64>,
    /// The search, if any.
    pub search: Option<SearchSpec>,
    /// One entry per arm, in file order.
    pub arms: Vec<ArmResult>,
    /// Runs trained at once (`--jobs`).
    pub jobs: usize,
    /// Threads of each run's own pool (the process's threads divided by
    /// the jobs): the seconds per epoch are with this many threads.
    pub threads_per_run: usize,
    /// The stem of the report's files: `study` for the whole study (study.md,
    /// study.json, study-curves-*.png, study-final.png), another for a part
    /// of it (`covnoise study --arm`), so that a part never replaces the
    /// whole study's report.
    #[serde(skip)]
    pub stem: String,
}

/// An arm as the runner hands it over: name, chosen point, final settings,
/// search results, and final run directories.
pub type ArmRuns = (
    String,
    String,
    TrainSettings,
    Vec<SearchResult>,
    Vec<PathBuf>,
);

/// Reads each arm's final run directories and computes its spreads.
pub fn aggregate(
    spec: &StudySpec,
    arms: Vec<ArmRuns>,
    jobs: usize,
    threads_per_run: usize,
) -> Result<StudyReport, StudyError> {
    let mut results = Vec::new();
    for (name, chosen, settings, search, runs) in arms {
        let records: Vec<RunRecord> = runs
            .iter()
            .map(|d| load_run(d).map_err(|e| StudyError::Io(format!("{e:#}"))))
            .collect::<Result<_, _>>()?;
        let done: Vec<&RunRecord> = records
            .iter()
            .filter(|r| {
                r.summary
                    .as_ref()
                    .is_some_and(|s| s.status == RunStatus::Completed)
            })
            .collect();
        let field = |f: &dyn Fn(&crate::train::RunSummary) -> f64| -> Spread {
            Spread::of(
                &done
                    .iter()
                    .map(|r| f(r.summary.as_ref().expect("filtered")))
                    .collect::<Vec<_>>(),
            )
        };
        let epochs = done.iter().map(|r| r.metrics.len()).min().unwrap_or(0);
        let curve = (0..epochs)
            .map(|e| {
                let accs: Vec<f64> = done.iter().map(|r| r.metrics[e].test_accuracy).collect();
                (e + 1, Spread::of(&accs))
            })
            .collect();
        let seeds: Vec<SeedResult> = records.iter().map(SeedResult::of).collect();
        let over_completed = |f: fn(&SeedResult) -> f64| {
            Spread::of(
                &seeds
                    .iter()
                    .filter(|r| r.completed())
                    .map(f)
                    .collect::<Vec<_>>(),
            )
        };
        let traces: Vec<f64> = seeds
            .iter()
            .filter(|r| r.completed())
            .filter_map(|r| r.fisher_trace)
            .collect();
        let noise_scale = records
            .iter()
            .find_map(|r| r.summary.as_ref().map(|s| s.noise_scale))
            .unwrap_or(f64::NAN);
        results.push(ArmResult {
            name,
            chosen,
            settings,
            noise_scale,
            completed: done.len(),
            diverged: records.len() - done.len(),
            test_accuracy: field(&|s| s.test_accuracy),
            train_accuracy: field(&|s| s.train_accuracy),
            train_loss: field(&|s| s.train_loss),
            gap: over_completed(|r| r.gap),
            epochs: over_completed(|r| r.epochs as f64),
            steps: over_completed(|r| r.steps as f64),
            fisher_trace: (!traces.is_empty()).then(|| Spread::of(&traces)),
            seconds_per_epoch: field(&|s| s.seconds_per_epoch),
            ms_per_step: field(&|s| {
                1e3 * s.seconds_per_epoch * s.epochs as f64 / s.steps.max(1) as f64
            }),
            curve,
            seeds,
            search,
            runs,
        });
    }
    Ok(StudyReport {
        name: spec.name.clone(),
        description: spec.description.clone(),
        seeds: spec.seeds.clone(),
        search: spec.search.clone(),
        arms: results,
        jobs,
        threads_per_run,
        stem: spec.report_stem(),
    })
}

/// Most columns of the table at common evaluation steps.
pub const MAX_COMMON_STEPS: usize = 6;

/// File name of the per-seed curves against epochs.
pub const CURVES_EPOCHS: &str = "study-curves-epochs.png";
/// File name of the per-seed curves against optimizer steps.
pub const CURVES_STEPS: &str = "study-curves-steps.png";
/// File name of the final test accuracy per arm.
pub const FINAL: &str = "study-final.png";

/// "10" when all values agree, "8–10" when they differ, "–" for none.
fn count_cell(values: impl Iterator<Item = u64>) -> String {
    let (lo, hi) = values.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    match (lo, hi) {
        (u64::MAX, _) => "–".to_string(),
        (lo, hi) if lo == hi => lo.to_string(),
        (lo, hi) => format!("{lo}–{hi}"),
    }
}

fn pct(s: Spread) -> String {
    format!("{:.2} ± {:.2}", 100.0 * s.mean, 100.0 * s.std)
}

fn noise_label(s: &TrainSettings) -> String {
    use crate::train::settings::EstimatorName;
    use covnoise::noise::StructureName;
    let est = match s.estimator {
        EstimatorName::Exact => "exact".to_string(),
        EstimatorName::Microbatch => format!("microbatch M={}", s.micro_batches),
        EstimatorName::McFisher => "mc-fisher".to_string(),
    };
    let norm = match (s.batch_norm, s.ghost_batch) {
        (_, Some(n)) => format!(", ghost BN {n}"),
        (true, None) => ", BN".to_string(),
        _ => String::new(),
    };
    let noise = match s.noise {
        StructureName::None => "none".to_string(),
        StructureName::Full if s.centered => "full (centered)".to_string(),
        StructureName::Full => "full".to_string(),
        StructureName::Diag | StructureName::Isotropic => {
            format!("{:?} ({est})", s.noise).to_lowercase()
        }
        StructureName::Bernoulli => "bernoulli".to_string(),
        StructureName::Subset => match s.noise_subset {
            Some(m) => format!("subset of {m}"),
            None => "subset".to_string(),
        },
        StructureName::Constant => format!("constant (v = {})", s.noise_variance),
    };
    format!("{noise}{norm}")
}

impl StudyReport {
    /// The file `name` (one of study.md, study.json, [`CURVES_EPOCHS`],
    /// [`CURVES_STEPS`], [`FINAL`]) under this report's stem.
    pub fn file(&self, name: &str) -> String {
        match name.strip_prefix("study") {
            Some(rest) => format!("{}{rest}", self.stem),
            None => name.to_string(),
        }
    }

    /// The first arm without noise that trains the same model at the same
    /// batch size as `arm` (the baseline of its step cost).
    fn plain_arm_for(&self, arm: &ArmResult) -> Option<&ArmResult> {
        use covnoise::noise::StructureName;
        let shape = |x: &TrainSettings| (x.model, x.hidden.clone(), x.batch_size, x.chunk);
        self.arms.iter().find(|b| {
            b.settings.noise == StructureName::None && shape(&b.settings) == shape(&arm.settings)
        })
    }

    /// One line per arm against the reference arm (the smallest batch
    /// without noise): its test-accuracy deficit in points, and how much of
    /// it the training-accuracy deficit (under-training) explains. Empty
    /// without such a reference or without completed runs.
    pub fn deficit_lines(&self) -> Vec<String> {
        use covnoise::noise::StructureName;
        let Some(reference) = self
            .arms
            .iter()
            .filter(|a| {
                a.completed > 0
                    && a.settings.noise == StructureName::None
                    && a.settings.batch_size > 0
            })
            .min_by_key(|a| a.settings.batch_size)
        else {
            return Vec::new();
        };
        let points = |x: f64| 100.0 * x;
        self.arms
            .iter()
            .filter(|a| a.completed > 0 && a.name != reference.name)
            .map(|a| {
                let test = points(reference.test_accuracy.mean - a.test_accuracy.mean);
                let train = points(reference.train_accuracy.mean - a.train_accuracy.mean);
                if test <= 0.0 {
                    return format!(
                        "{}: {:.2} points above {} in test accuracy",
                        a.name, -test, reference.name
                    );
                }
                let under = train.clamp(0.0, test);
                format!(
                    "{}: {test:.2} points below {} in test accuracy and {train:.2} in training accuracy: {under:.2} of them under-training, {:.2} a generalization gap",
                    a.name,
                    reference.name,
                    test - under
                )
            })
            .collect()
    }

    /// Each arm after the first against the first (the study's reference,
    /// e.g. full-batch descent), paired by seed: the same seed gives every
    /// arm the same initial weights and data order, so the per-seed
    /// differences cancel what the seeds share. Over the seeds both arms
    /// completed: the mean difference of final test accuracy (points) and
    /// test loss, each with a 95 % Student-t interval (none for one seed).
    pub fn paired_differences(&self) -> Vec<PairedDifference> {
        let Some(reference) = self.arms.first() else {
            return Vec::new();
        };
        let by_seed = |a: &ArmResult| -> Vec<(u64, f64, f64)> {
            a.seeds
                .iter()
                .filter(|r| r.completed())
                .filter_map(|r| Some((r.seed?, r.test_accuracy, r.test_loss)))
                .collect()
        };
        let base = by_seed(reference);
        self.arms[1..]
            .iter()
            .map(|a| {
                let pairs: Vec<(f64, f64)> = by_seed(a)
                    .into_iter()
                    .filter_map(|(seed, acc, loss)| {
                        let &(_, acc0, loss0) = base.iter().find(|b| b.0 == seed)?;
                        Some((100.0 * (acc - acc0), loss - loss0))
                    })
                    .collect();
                let acc: Vec<f64> = pairs.iter().map(|p| p.0).collect();
                let loss: Vec<f64> = pairs.iter().map(|p| p.1).collect();
                PairedDifference {
                    arm: a.name.clone(),
                    reference: reference.name.clone(),
                    seeds: pairs.len(),
                    test_accuracy_points: Interval::of(&acc),
                    test_loss: Interval::of(&loss),
                }
            })
            .collect()
    }

    /// Test accuracy and loss of each arm (mean and std over its completed
    /// seeds) at the optimizer steps where every completed run of every arm
    /// was evaluated (e.g. 1,000, 2,000 and 3,000 when full-batch arms stop
    /// at 3,000 and SGD runs on), at most `MAX_COMMON_STEPS` (6) of them
    /// (evenly picked, the last kept); empty when there is no such step.
    pub fn at_common_steps(&self) -> (Vec<u64>, Vec<Vec<(Spread, Spread)>>) {
        let evaluated = |r: &SeedResult| -> Vec<u64> {
            r.curve
                .iter()
                .filter(|p| p.test_accuracy.is_finite())
                .filter_map(|p| p.steps)
                .collect()
        };
        let runs: Vec<&SeedResult> = self
            .arms
            .iter()
            .flat_map(|a| a.seeds.iter().filter(|r| r.completed()))
            .collect();
        let Some(first) = runs.first() else {
            return (Vec::new(), Vec::new());
        };
        let mut common = evaluated(first);
        for r in &runs[1..] {
            let steps = evaluated(r);
            common.retain(|s| steps.contains(s));
        }
        if common.len() > MAX_COMMON_STEPS {
            let n = common.len();
            common = (0..MAX_COMMON_STEPS)
                .map(|k| common[(k + 1) * n / MAX_COMMON_STEPS - 1])
                .collect();
        }
        let table = self
            .arms
            .iter()
            .map(|a| {
                common
                    .iter()
                    .map(|&step| {
                        let at: Vec<&CurvePoint> = a
                            .seeds
                            .iter()
                            .filter(|r| r.completed())
                            .filter_map(|r| r.curve.iter().find(|p| p.steps == Some(step)))
                            .collect();
                        let acc: Vec<f64> = at.iter().map(|p| p.test_accuracy).collect();
                        let loss: Vec<f64> = at.iter().map(|p| p.test_loss).collect();
                        (Spread::of(&acc), Spread::of(&loss))
                    })
                    .collect()
            })
            .collect();
        (common, table)
    }

    /// Whether any final run has a point to draw against both epochs and
    /// steps (the curve plots are written and linked only then).
    fn has_curves(&self) -> bool {
        self.arms.iter().flat_map(|a| &a.seeds).any(|r| {
            r.curve
                .iter()
                .any(|p| p.test_accuracy.is_finite() && p.steps.is_some())
        })
    }

    /// The results as a Markdown document.
    pub fn markdown(&self) -> String {
        let mut md = format!("# Study `{}`\n\n", self.name);
        if !self.description.is_empty() {
            md += &format!("{}\n\n", self.description.trim());
        }
        let seeds: Vec<String> = self.seeds.iter().map(|s| s.to_string()).collect();
        md += &format!(
            "Final runs: seeds {} (mean ± sample std over completed seeds). Accuracies in %, on the test set; \
             train acc and train loss: the final model on the whole training set in evaluation mode; gap: train acc \
             minus test acc in percentage points, per seed, then mean ± std; epochs and steps: of the completed final \
             runs (a range when seeds differ); tr(F): the final model's trace of the empirical Fisher per example, \
             (1/n) Σ_i ‖∇l_i‖² on the first n = min({}, N) training examples, a sharpness proxy (– where the model \
             has no per-example gradients, as with batch norm). s/epoch: training seconds per epoch \
             (evaluation excluded) of a run on its own pool of {} thread(s), {} run(s) trained at once; ms/step: the \
             same time per optimizer step; step cost: ms/step over that of the arm without noise at the same batch \
             size and model (the per-step cost of the noise, to compare with `covnoise bench` at that many threads).\n\n",
            seeds.join(", "),
            crate::train::FISHER_EXAMPLES,
            self.threads_per_run,
            self.jobs
        );
        md += &format!(
            "| arm | batch | lr | epochs | steps | noise | c | test acc | train acc | gap | train loss | tr(F) | s/epoch ({} thr) | ms/step | step cost | seeds ok |\n",
            self.threads_per_run
        );
        md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for a in &self.arms {
            let cost = self
                .plain_arm_for(a)
                .filter(|base| base.completed > 0 && a.completed > 0)
                .map_or("–".to_string(), |base| {
                    format!("{:.2}x", a.ms_per_step.mean / base.ms_per_step.mean)
                });
            let done = || a.seeds.iter().filter(|r| r.completed());
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {:.3e} | {} | {} | {} | {:.4} ± {:.4} | {} | {:.2} | {:.2} | {} | {}/{} |\n",
                a.name,
                if a.settings.batch_size == 0 {
                    "full".to_string()
                } else {
                    a.settings.batch_size.to_string()
                },
                a.settings.lr,
                count_cell(done().map(|r| r.epochs as u64)),
                count_cell(done().map(|r| r.steps)),
                noise_label(&a.settings),
                a.noise_scale,
                pct(a.test_accuracy),
                pct(a.train_accuracy),
                pct(a.gap),
                a.train_loss.mean,
                a.train_loss.std,
                a.fisher_trace.map_or("–".to_string(), |t| format!(
                    "{:.3e} ± {:.1e}",
                    t.mean, t.std
                )),
                a.seconds_per_epoch.mean,
                a.ms_per_step.mean,
                cost,
                a.completed,
                a.completed + a.diverged
            );
        }
        let deficits = self.deficit_lines();
        if !deficits.is_empty() {
            md += "\n## Where each arm's deficit comes from\n\nAgainst the smallest batch without noise: the test-accuracy deficit, and the part of it that the training-accuracy deficit explains (under-training: the training set is not fit either); the rest is a generalization gap.\n\n";
            for line in deficits {
                md += &format!("- {line}\n");
            }
        }
        let (steps, at_steps) = self.at_common_steps();
        if !steps.is_empty() && self.arms.iter().any(|a| a.completed > 0) {
            md += "\n## Test accuracy and loss at common steps\n\nAt the optimizer steps where every completed run was evaluated: test accuracy (%) / test loss, mean ± std over the arm's completed seeds.\n\n| arm |";
            for s in &steps {
                md += &format!(" step {s} |");
            }
            md += "\n|---|";
            md += &"---|".repeat(steps.len());
            md += "\n";
            for (a, row) in self.arms.iter().zip(&at_steps) {
                md += &format!("| {} |", a.name);
                for (acc, loss) in row {
                    md += &format!(
                        " {:.2} ± {:.2} / {:.4} ± {:.4} |",
                        100.0 * acc.mean,
                        100.0 * acc.std,
                        loss.mean,
                        loss.std
                    );
                }
                md += "\n";
            }
        }
        let paired = self.paired_differences();
        if paired.iter().any(|p| p.seeds > 0) {
            md += &format!(
                "\n## Paired by seed against `{}`\n\nEach arm minus the first arm, seed by seed (the same seed gives both the same initial weights), over the seeds both completed: mean difference ± half the 95 % Student-t interval, and the interval. An interval that excludes 0 is a difference the seeds resolve.\n\n| arm | seeds | test acc (points) | test loss |\n|---|---|---|---|\n",
                paired[0].reference
            );
            for p in &paired {
                md += &format!(
                    "| {} | {} | {} | {} |\n",
                    p.arm,
                    p.seeds,
                    p.test_accuracy_points.cell(2),
                    p.test_loss.cell(4)
                );
            }
        }
        md += "\n## Per seed\n\nEach final run; a diverged or killed run's accuracies are those of its last epoch or none.\n\n";
        md += "| arm | seed | status | epochs | steps | test acc | train acc | gap | train loss | tr(F) |\n";
        md += "|---|---|---|---|---|---|---|---|---|---|\n";
        let num = |v: f64, f: &dyn Fn(f64) -> String| {
            if v.is_finite() {
                f(v)
            } else {
                "–".to_string()
            }
        };
        for a in &self.arms {
            for r in &a.seeds {
                md += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    a.name,
                    r.seed.map_or("?".to_string(), |s| s.to_string()),
                    match r.status {
                        Some(RunStatus::Completed) => "completed",
                        Some(RunStatus::Diverged) => "diverged",
                        None => "no summary",
                    },
                    r.epochs,
                    r.steps,
                    num(r.test_accuracy, &|v| format!("{:.2}", 100.0 * v)),
                    num(r.train_accuracy, &|v| format!("{:.2}", 100.0 * v)),
                    num(r.gap, &|v| format!("{:.2}", 100.0 * v)),
                    num(r.train_loss, &|v| format!("{v:.4}")),
                    r.fisher_trace
                        .map_or("–".to_string(), |t| num(t, &|v| format!("{v:.3e}"))),
                );
            }
        }
        if self.has_curves() {
            md += &format!(
                "\n## Curves\n\nTest accuracy of each final run (one thin line per seed, one colour per arm) against \
                 epochs and against optimizer steps.\n\n\
                 ![test accuracy against epochs]({})\n\n\
                 ![test accuracy against optimizer steps]({})\n",
                self.file(CURVES_EPOCHS),
                self.file(CURVES_STEPS)
            );
        }
        md += &format!(
            "\nFinal test accuracy per arm (mean ± std over completed seeds):\n\n![final test accuracy per arm]({})\n",
            self.file(FINAL)
        );
        if let Some(search) = &self.search {
            md += &format!(
                "\n## Search\n\nEvery grid point of every arm was trained for the first {} epochs of its final run's \
                 schedule (same warmup and decay horizon, stopped early) with seed {} on the training set less its last \
                 {} examples, and scored by accuracy on those held-out examples (the test set is never used for \
                 selection). Budget per arm = grid points × {} epochs.\n\n",
                search.epochs, search.seed, search.holdout, search.epochs
            );
            md += "| arm | grid point | holdout acc | status | chosen |\n|---|---|---|---|---|\n";
            for a in &self.arms {
                for s in &a.search {
                    md += &format!(
                        "| {} | {} | {:.2} | {:?} | {} |\n",
                        a.name,
                        s.point,
                        100.0 * s.holdout_accuracy,
                        s.status,
                        if s.point == a.chosen { "yes" } else { "" }
                    );
                }
            }
        }
        md
    }

    /// Writes `study.md`, `study.json`, the per-seed test-accuracy curves
    /// against epochs and against optimizer steps ([`CURVES_EPOCHS`],
    /// [`CURVES_STEPS`]; when any run has a finite point) and the final
    /// accuracies ([`FINAL`]) into `out`, and returns the paths written.
    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>, StudyError> {
        let io = |e: String| StudyError::Io(e);
        let write = |name: &str, text: String| {
            crate::train::run_dir::write_atomic(&out.join(name), text.as_bytes())
                .map_err(|e| io(e.to_string()))
        };
        let (md, json) = (self.file("study.md"), self.file("study.json"));
        write(&md, self.markdown())?;
        write(
            &json,
            serde_json::to_string_pretty(self).expect("report serializes") + "\n",
        )?;
        let mut written = vec![out.join(md), out.join(json)];
        if self.has_curves() {
            // Test accuracy in %, one line per seed, against each x.
            let lines = |x: fn(&CurvePoint) -> Option<f64>| -> Vec<SeedLines> {
                self.arms
                    .iter()
                    .map(|a| SeedLines {
                        label: a.name.clone(),
                        lines: a
                            .seeds
                            .iter()
                            .map(|r| {
                                r.curve
                                    .iter()
                                    .map(|p| (x(p).unwrap_or(f64::NAN), 100.0 * p.test_accuracy))
                                    .collect()
                            })
                            .collect(),
                    })
                    .collect()
            };
            for (file, x_label, x) in [
                (
                    CURVES_EPOCHS,
                    "epoch",
                    (|p: &CurvePoint| Some(p.epoch as f64)) as fn(&CurvePoint) -> Option<f64>,
                ),
                (CURVES_STEPS, "optimizer steps", |p: &CurvePoint| {
                    p.steps.map(|s| s as f64)
                }),
            ] {
                let path = out.join(self.file(file));
                plot_seed_lines(
                    &lines(x),
                    &format!("{}: test accuracy per seed", self.name),
                    x_label,
                    "test accuracy (%)",
                    &path,
                )
                .map_err(|e| io(format!("{e:#}")))?;
                written.push(path);
            }
        }
        let finals = out.join(self.file(FINAL));
        let labels: Vec<String> = self.arms.iter().map(|a| a.name.clone()).collect();
        let means: Vec<f64> = self.arms.iter().map(|a| a.test_accuracy.mean).collect();
        let stds: Vec<f64> = self.arms.iter().map(|a| a.test_accuracy.std).collect();
        plot_bars(
            &labels,
            &means,
            &stds,
            &format!("{}: final test accuracy", self.name),
            "test accuracy",
            &finals,
        )
        .map_err(|e| io(format!("{e:#}")))?;
        written.push(finals);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covnoise::noise::StructureName;

    fn arm(name: &str, batch: usize, noise: StructureName, test: f64, train: f64) -> ArmResult {
        let at = |mean| Spread { mean, std: 0.0 };
        ArmResult {
            name: name.into(),
            chosen: String::new(),
            settings: TrainSettings {
                batch_size: batch,
                noise,
                ..TrainSettings::default()
            },
            noise_scale: 0.0,
            completed: 3,
            diverged: 0,
            test_accuracy: at(test),
            train_accuracy: at(train),
            train_loss: at(0.1),
            gap: at(train - test),
            epochs: at(10.0),
            steps: at(100.0),
            fisher_trace: None,
            seconds_per_epoch: at(1.0),
            ms_per_step: at(1.0),
            curve: Vec::new(),
            seeds: Vec::new(),
            search: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// The reference is the smallest batch without noise, whatever the
    /// arms' order; a deficit is under-training up to the training-accuracy
    /// deficit and a generalization gap beyond it.
    #[test]
    fn deficits_split_into_under_training_and_a_generalization_gap() {
        let report = StudyReport {
            name: "t".into(),
            description: String::new(),
            seeds: vec![0],
            search: None,
            arms: vec![
                arm("large", 1024, StructureName::None, 0.80, 0.82),
                arm("noisy", 1024, StructureName::Diag, 0.86, 0.97),
                arm("small", 64, StructureName::None, 0.88, 0.95),
                arm("better", 1024, StructureName::Full, 0.89, 0.95),
            ],
            jobs: 1,
            threads_per_run: 1,
            stem: "study".into(),
        };
        let lines = report.deficit_lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        // 8 points below, 13 in training: all of it under-training.
        assert!(
            lines[0].starts_with("large: 8.00 points below small"),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with("8.00 of them under-training, 0.00 a generalization gap"));
        // 2 points below, fits the training set better: all of it a gap.
        assert!(
            lines[1].ends_with("0.00 of them under-training, 2.00 a generalization gap"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("better: 1.00 points above small"),
            "{}",
            lines[2]
        );
        // Without a noise-free arm there is no reference.
        let none = StudyReport {
            arms: vec![arm("noisy", 1024, StructureName::Diag, 0.86, 0.97)],
            ..report
        };
        assert!(none.deficit_lines().is_empty());
    }

    /// Paired differences against the first arm over the seeds both
    /// completed, with the Student-t interval worked by hand: differences
    /// 1, 2, 3 points have mean 2, s = 1, t(0.975, 2) = 4.303, half width
    /// 4.303 / sqrt(3) = 2.484.
    #[test]
    fn paired_differences_take_the_seeds_both_arms_completed() {
        let seed = |s: u64, acc: f64, loss: f64, done: bool| SeedResult {
            dir: PathBuf::new(),
            seed: Some(s),
            status: Some(if done {
                RunStatus::Completed
            } else {
                RunStatus::Diverged
            }),
            test_accuracy: acc,
            test_loss: loss,
            train_accuracy: 1.0,
            train_loss: 0.0,
            gap: 0.0,
            epochs: 1,
            steps: 1,
            fisher_trace: None,
            curve: Vec::new(),
        };
        let mut gd = arm("gd", 1000, StructureName::None, 0.8, 1.0);
        gd.seeds = (0..4).map(|s| seed(s, 0.80, 0.60, true)).collect();
        let mut noisy = arm("noisy", 1000, StructureName::Diag, 0.8, 1.0);
        noisy.seeds = vec![
            seed(0, 0.81, 0.55, true),
            seed(1, 0.82, 0.50, true),
            seed(2, 0.83, 0.45, true),
            seed(3, 0.99, 0.10, false),
        ];
        let report = StudyReport {
            name: "t".into(),
            description: String::new(),
            seeds: vec![0, 1, 2, 3],
            search: None,
            arms: vec![gd, noisy],
            jobs: 1,
            threads_per_run: 1,
            stem: "study".into(),
        };
        let p = report.paired_differences();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].arm.as_str(), p[0].reference.as_str(), p[0].seeds),
            ("noisy", "gd", 3)
        );
        let acc = p[0].test_accuracy_points;
        assert!((acc.mean - 2.0).abs() < 1e-9, "{acc:?}");
        assert!(
            (acc.half_width - 4.303 / 3f64.sqrt()).abs() < 1e-9,
            "{acc:?}"
        );
        assert!((p[0].test_loss.mean + 0.10).abs() < 1e-9);
        assert!(
            report
                .markdown()
                .contains("| noisy | 3 | +2.00 ± 2.48 [-0.48, +4.48] |")
        );
        // Beyond the table, the corrected normal quantile is within 0.002
        // of t(0.975, 40) = 2.021 and t(0.975, 120) = 1.980.
        assert!((t_975(40) - 2.021).abs() < 2e-3 && (t_975(120) - 1.980).abs() < 2e-3);
    }

    /// The common steps are those every completed run was evaluated at
    /// (full-batch arms stopping at 3,000, SGD going on to 10,000), and
    /// each cell is the mean over the arm's seeds there.
    #[test]
    fn common_steps_are_where_every_completed_run_was_evaluated() {
        let run = |last: u64, acc: f64| SeedResult {
            dir: PathBuf::new(),
            seed: Some(0),
            status: Some(RunStatus::Completed),
            test_accuracy: acc,
            test_loss: 1.0 - acc,
            train_accuracy: 1.0,
            train_loss: 0.0,
            gap: 0.0,
            epochs: 1,
            steps: last,
            fisher_trace: None,
            curve: (1..=last / 1000)
                .map(|k| CurvePoint {
                    epoch: k as usize,
                    steps: Some(1000 * k),
                    test_accuracy: acc + k as f64 / 100.0,
                    test_loss: 1.0 - acc,
                })
                .collect(),
        };
        let mut gd = arm("gd", 1000, StructureName::None, 0.8, 1.0);
        gd.seeds = vec![run(3000, 0.70), run(3000, 0.72)];
        let mut sgd = arm("sgd", 50, StructureName::None, 0.8, 1.0);
        sgd.seeds = vec![run(10000, 0.75)];
        let report = StudyReport {
            name: "t".into(),
            description: String::new(),
            seeds: vec![0],
            search: None,
            arms: vec![gd, sgd],
            jobs: 1,
            threads_per_run: 1,
            stem: "study".into(),
        };
        let (steps, table) = report.at_common_steps();
        assert_eq!(steps, vec![1000, 2000, 3000]);
        // gd at step 2000: accuracies 0.72 and 0.74.
        assert!((table[0][1].0.mean - 0.73).abs() < 1e-12);
        assert!((table[1][2].0.mean - 0.78).abs() < 1e-12);
        assert!((table[1][2].1.mean - 0.25).abs() < 1e-12);
        assert!(
            report
                .markdown()
                .contains("| step 1000 | step 2000 | step 3000 |")
        );
    }
}
