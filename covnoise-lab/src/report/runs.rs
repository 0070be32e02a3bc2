//! Reading run directories written by `covnoise train --out RUN_DIR`.
//!
//! A run directory holds three files:
//!
//! - `config.toml`: the run's resolved settings (flat kebab-case keys) and a
//!   `[meta]` table (`version`, `git-commit`). Kept as an opaque table: the
//!   report only reads a few keys for labels.
//! - `metrics.jsonl`: one [`EpochMetrics`] object per line, one line per
//!   finished epoch.
//! - `summary.json`: one [`RunSummary`], written when the run ends (completed
//!   or diverged). A run killed mid-way has no summary.
//!
//! The record types are the trainer's own ([`crate::train::record`]), so the
//! format has one definition. Reading tolerates unknown extra fields, so newer
//! trainers can add fields without breaking older reports, and reads `null`
//! back as NaN (JSON has no NaN).

use std::path::{Path, PathBuf};

pub use crate::train::record::{DivergedInfo, EpochMetrics, RunStatus, RunSummary};
use anyhow::{anyhow, bail};

/// Name of the resolved-settings file in a run directory.
pub const CONFIG_FILE: &str = crate::train::run_dir::RUN_FILES[0];
/// Name of the per-epoch metrics file ([`EpochMetrics`], one per line).
pub const METRICS_FILE: &str = crate::train::run_dir::RUN_FILES[1];
/// Name of the end-of-run file ([`RunSummary`]).
pub const SUMMARY_FILE: &str = crate::train::run_dir::RUN_FILES[2];

/// Everything in one run directory.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The directory, as given to [`load_run`].
    pub dir: PathBuf,
    /// Short label for legends and tables: built from the config's `noise`,
    /// `batch-size`, `lr` and `seed` when present, else the directory's name.
    /// Callers may overwrite it (for example with user-given labels).
    pub label: String,
    /// `config.toml`, unparsed beyond TOML.
    pub config: toml::Table,
    /// `metrics.jsonl`, one entry per finished epoch, epochs increasing.
    pub metrics: Vec<EpochMetrics>,
    /// `summary.json`; `None` for a run that was killed before it ended.
    pub summary: Option<RunSummary>,
}

/// Loads a run directory. `config.toml` and `metrics.jsonl` must exist;
/// `summary.json` is optional. Errors are one line naming the file and, for
/// `metrics.jsonl`, the line.
///
/// A last line of `metrics.jsonl` that is cut off (no final newline, JSON
/// ends early) is ignored: it is what a run killed while writing leaves
/// behind, and the epochs before it are still good.
pub fn load_run(dir: &Path) -> anyhow::Result<RunRecord> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!("run directory {} is not a directory", dir.display());
        }
        bail!("run directory {} does not exist", dir.display());
    }
    let config = load_config(&dir.join(CONFIG_FILE))?;
    let metrics = load_metrics(&dir.join(METRICS_FILE))?;
    let summary_path = dir.join(SUMMARY_FILE);
    let summary = if summary_path.exists() {
        Some(load_summary(&summary_path)?)
    } else {
        None
    };
    let label = label_from_config(&config).unwrap_or_else(|| dir_name(dir));
    Ok(RunRecord {
        dir: dir.to_path_buf(),
        label,
        config,
        metrics,
        summary,
    })
}

/// Reads a file that must exist, with a one-line error naming it.
fn read_required(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "{}: not found (not a covnoise run directory?)",
                path.display()
            )
        } else {
            anyhow!("{}: cannot read: {e}", path.display())
        }
    })
}

fn load_config(path: &Path) -> anyhow::Result<toml::Table> {
    let text = read_required(path)?;
    text.parse::<toml::Table>().map_err(|e| {
        // toml's Display spans several lines (it quotes the source); keep the
        // message and say where.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().replace('\n', " ");
        match line {
            Some(line) => anyhow!("{}: line {line}: {}", path.display(), message.trim()),
            None => anyhow!("{}: {}", path.display(), message.trim()),
        }
    })
}

/// serde_json's message without its " at line L column C" suffix: each JSONL
/// line is parsed alone, so its line number would always be 1.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

fn load_metrics(path: &Path) -> anyhow::Result<Vec<EpochMetrics>> {
    let text = read_required(path)?;
    let lines: Vec<&str> = text.lines().collect();
    let mut metrics: Vec<EpochMetrics> = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let m: EpochMetrics = match serde_json::from_str(line) {
            Ok(m) => m,
            Err(e) if e.is_eof() && number == lines.len() && !text.ends_with('\n') => break,
            Err(e) => bail!(
                "{}: line {number} column {}: {}",
                path.display(),
                e.column(),
                json_message(&e)
            ),
        };
        if let Some(prev) = metrics.last()
            && m.epoch <= prev.epoch
        {
            bail!(
                "{}: line {number}: epoch {} follows epoch {}; epochs must increase",
                path.display(),
                m.epoch,
                prev.epoch
            );
        }
        if m.epoch == 0 {
            bail!(
                "{}: line {number}: epoch 0; epochs are 1-based",
                path.display()
            );
        }
        // Catches a trainer writing percentages: NaN passes (diverged runs).
        for (name, value) in [
            ("train_accuracy", m.train_accuracy),
            ("test_accuracy", m.test_accuracy),
        ] {
            if !(value.is_nan() || (0.0..=1.0).contains(&value)) {
                bail!(
                    "{}: line {number}: {name} {value} is outside [0, 1]",
                    path.display()
                );
            }
        }
        metrics.push(m);
    }
    Ok(metrics)
}

fn load_summary(path: &Path) -> anyhow::Result<RunSummary> {
    let text = read_required(path)?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: line {} column {}: {}",
            path.display(),
            e.line(),
            e.column(),
            json_message(&e)
        )
    })
}

/// "noise=diag, B=4096, lr=0.1, seed=3" from whichever of those keys the
/// config has; `None` if it has none of them.
fn label_from_config(config: &toml::Table) -> Option<String> {
    let parts: Vec<String> = [
        ("noise", "noise="),
        ("batch-size", "B="),
        ("lr", "lr="),
        ("seed", "seed="),
    ]
    .iter()
    .filter_map(|(key, prefix)| {
        let value = match config.get(*key)? {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(format!("{prefix}{value}"))
    })
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The directory's last component ("runs/diag-4096/" gives "diag-4096"),
/// or the whole path when it has none (".").
fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Mean and sample standard deviation (divisor n - 1) of `values`. The
/// standard deviation is 0 for one value, and both are NaN for none. Used to
/// aggregate a metric over seeds.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    // Two passes: summing squared deviations from the mean avoids the
    // cancellation of sum(x^2) - n mean^2 for values close together
    // (accuracies of several seeds).
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    (mean, (ss / (n - 1) as f64).sqrt())
}
