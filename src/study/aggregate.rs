//! Aggregation of a study's run directories into tables and plots. Reads
//! run directories only.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{SearchSpec, StudyError, StudySpec};
use crate::report::run_plots::{BandSeries, plot_bands, plot_bars};
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
    /// Training-set loss over completed seeds.
    pub train_loss: Spread,
    /// Training seconds per epoch over completed seeds.
    pub seconds_per_epoch: Spread,
    /// Training milliseconds per optimizer step over completed seeds (the
    /// epoch's training time, data batching included, over its steps).
    pub ms_per_step: Spread,
    /// Test accuracy per epoch (mean and std over completed seeds).
    pub curve: Vec<(usize, Spread)>,
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
            seconds_per_epoch: field(&|s| s.seconds_per_epoch),
            ms_per_step: field(&|s| {
                1e3 * s.seconds_per_epoch * s.epochs as f64 / s.steps.max(1) as f64
            }),
            curve,
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
    })
}

fn pct(s: Spread) -> String {
    format!("{:.2} ± {:.2}", 100.0 * s.mean, 100.0 * s.std)
}

fn noise_label(s: &TrainSettings) -> String {
    use crate::train::settings::{EstimatorName, NoiseName};
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
        NoiseName::None => "none".to_string(),
        NoiseName::Full if s.centered => "full (centered)".to_string(),
        NoiseName::Full => "full".to_string(),
        NoiseName::Diag | NoiseName::Isotropic => format!("{:?} ({est})", s.noise).to_lowercase(),
    };
    format!("{noise}{norm}")
}

impl StudyReport {
    /// The first arm without noise that trains the same model at the same
    /// batch size as `arm` (the baseline of its step cost).
    fn plain_arm_for(&self, arm: &ArmResult) -> Option<&ArmResult> {
        use crate::train::settings::NoiseName;
        let shape = |x: &TrainSettings| (x.model, x.hidden.clone(), x.batch_size, x.chunk);
        self.arms.iter().find(|b| {
            b.settings.noise == NoiseName::None && shape(&b.settings) == shape(&arm.settings)
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
             train accuracy and loss on the whole training set in evaluation mode. s/epoch: training seconds per epoch \
             (evaluation excluded) of a run on its own pool of {} thread(s), {} run(s) trained at once; ms/step: the \
             same time per optimizer step; step cost: ms/step over that of the arm without noise at the same batch \
             size and model (the per-step cost of the noise, to compare with `covnoise bench` at that many threads).\n\n",
            seeds.join(", "),
            self.threads_per_run,
            self.jobs
        );
        md += &format!(
            "| arm | batch | lr | epochs | noise | c | test acc | train acc | train loss | s/epoch ({} thr) | ms/step | step cost | seeds ok |\n",
            self.threads_per_run
        );
        md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for a in &self.arms {
            let cost = self
                .plain_arm_for(a)
                .filter(|base| base.completed > 0 && a.completed > 0)
                .map_or("–".to_string(), |base| {
                    format!("{:.2}x", a.ms_per_step.mean / base.ms_per_step.mean)
                });
            md += &format!(
                "| {} | {} | {} | {} | {} | {:.3e} | {} | {} | {:.4} ± {:.4} | {:.2} | {:.2} | {} | {}/{} |\n",
                a.name,
                if a.settings.batch_size == 0 {
                    "full".to_string()
                } else {
                    a.settings.batch_size.to_string()
                },
                a.settings.lr,
                a.settings.epochs,
                noise_label(&a.settings),
                a.noise_scale,
                pct(a.test_accuracy),
                pct(a.train_accuracy),
                a.train_loss.mean,
                a.train_loss.std,
                a.seconds_per_epoch.mean,
                a.ms_per_step.mean,
                cost,
                a.completed,
                a.completed + a.diverged
            );
        }
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

    /// Writes `study.md`, `study.json`, and the two plots (PNG) into `out`.
    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>, StudyError> {
        let io = |e: String| StudyError::Io(e);
        let write = |name: &str, text: String| {
            crate::train::run_dir::write_atomic(&out.join(name), text.as_bytes())
                .map_err(|e| io(e.to_string()))
        };
        write("study.md", self.markdown())?;
        write(
            "study.json",
            serde_json::to_string_pretty(self).expect("report serializes") + "\n",
        )?;
        let curves = out.join("study-curves.png");
        let series: Vec<BandSeries> = self
            .arms
            .iter()
            .filter(|a| !a.curve.is_empty())
            .map(|a| BandSeries {
                label: a.name.clone(),
                x: a.curve.iter().map(|(e, _)| *e as f64).collect(),
                mean: a.curve.iter().map(|(_, s)| s.mean).collect(),
                std: a.curve.iter().map(|(_, s)| s.std).collect(),
            })
            .collect();
        let mut written = vec![out.join("study.md"), out.join("study.json")];
        if !series.is_empty() {
            plot_bands(
                &series,
                &format!("{}: test accuracy (mean ± std over seeds)", self.name),
                "test accuracy",
                &curves,
            )
            .map_err(|e| io(format!("{e:#}")))?;
            written.push(curves);
        }
        let finals = out.join("study-final.png");
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
