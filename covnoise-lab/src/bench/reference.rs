//! The outside references of `covnoise bench --against`: PyTorch's plain
//! step and BackPACK's exact and Monte-Carlo diagonal-Fisher noise steps,
//! timed by `bench/pytorch_reference.py` in a Python environment of the
//! user's (PyPI's `torch` and `backpack-for-pytorch`), on the same model,
//! batch sizes, thread count and round counts, right after covnoise's own
//! rounds, so that one command gives both sides of the comparison.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::zoo::Architecture;

/// Which outside library a bench is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Against {
    /// PyTorch's plain SGD step (`pytorch-plain`).
    Pytorch,
    /// PyTorch's plain step and BackPACK's noisy steps, round-robin
    /// (`pytorch-plain`, `backpack-diag-exact`, `backpack-diag-mc`): models
    /// without batch norm.
    Backpack,
}

/// One timing of the reference script.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceResult {
    /// Batch size.
    pub batch_size: usize,
    /// `pytorch-plain`, `backpack-diag-exact` or `backpack-diag-mc`.
    pub variant: String,
    /// Median step time, milliseconds.
    pub median_ms: f64,
    /// 10th percentile, milliseconds.
    pub p10_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// Timed steps.
    pub steps: usize,
}

/// What the reference script wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceRun {
    /// PyTorch's version.
    pub torch_version: String,
    /// BackPACK's version, when it ran.
    #[serde(default)]
    pub backpack_version: Option<String>,
    /// Threads PyTorch used.
    pub threads: usize,
    /// Its timings.
    pub results: Vec<ReferenceResult>,
}

/// How to run the reference script.
#[derive(Debug, Clone)]
pub struct ReferenceConfig {
    /// The outside library.
    pub against: Against,
    /// The Python interpreter with torch (and backpack) installed.
    pub python: PathBuf,
    /// `bench/pytorch_reference.py`.
    pub script: PathBuf,
    /// The model (named as the script names it).
    pub model: Architecture,
    /// Batch sizes.
    pub batch_sizes: Vec<usize>,
    /// Hidden widths of the MLP.
    pub hidden: Vec<usize>,
    /// Threads (the same as covnoise's).
    pub threads: usize,
    /// Untimed rounds.
    pub warmup: usize,
    /// Timed rounds.
    pub steps: usize,
    /// B_S of the noise scale c = 1/B_S.
    pub small_batch: usize,
}

/// Checks what `--against` needs before covnoise's own rounds spend their
/// time: the interpreter and the script exist, and BackPACK's steps have
/// per-example gradients (no batch norm).
pub fn check(config: &ReferenceConfig) -> anyhow::Result<()> {
    if config.against == Against::Backpack && config.model.has_batch_norm() {
        anyhow::bail!(
            "--against backpack times per-example (BackPACK) steps, which batch norm makes undefined: use a model without it (mlp, lenet5), or --against pytorch"
        );
    }
    if !config.python.is_file() {
        anyhow::bail!(
            "--against needs a Python with PyTorch{}: {} does not exist (make bench-venv makes bench/.venv; or pass --python PATH)",
            if config.against == Against::Backpack {
                " and BackPACK"
            } else {
                ""
            },
            config.python.display()
        );
    }
    if !config.script.is_file() {
        anyhow::bail!(
            "--against runs the reference script {}, which does not exist (run from the repository root, or pass --reference-script PATH)",
            config.script.display()
        );
    }
    Ok(())
}

/// Runs the reference script, echoing its lines through `log`, and reads
/// its results back.
pub fn run(config: &ReferenceConfig, mut log: impl FnMut(&str)) -> anyhow::Result<ReferenceRun> {
    let dir = std::env::temp_dir().join(format!("covnoise-reference-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("reference.json");
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let mut command = Command::new(&config.python);
    command
        .arg(&config.script)
        .args(["--model", config.model.name()])
        .args(["--batch-sizes", &list(&config.batch_sizes)])
        .args(["--hidden", &list(&config.hidden)])
        .args(["--threads", &config.threads.to_string()])
        .args(["--warmup", &config.warmup.to_string()])
        .args(["--steps", &config.steps.to_string()])
        .args(["--small-batch", &config.small_batch.to_string()])
        .arg("--json")
        .arg(&json);
    if config.against == Against::Backpack {
        command.arg("--backpack");
    }
    let output = command.output().map_err(|e| {
        anyhow::anyhow!(
            "could not run {} {}: {e}",
            config.python.display(),
            config.script.display()
        )
    })?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        log(line);
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        anyhow::bail!(
            "the reference script failed ({}): {}",
            output.status,
            last.unwrap_or("no message")
        );
    }
    let text = std::fs::read_to_string(&json)?;
    let _ = std::fs::remove_dir_all(&dir);
    let run: ReferenceRun = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the reference script's results are not readable: {e}"))?;
    Ok(run)
}

/// The comparisons of one batch size: covnoise's variant, the reference's,
/// and the ratio of their medians.
pub fn comparisons<'a>(
    ours: &'a [super::BenchResult],
    theirs: &'a [ReferenceResult],
) -> Vec<(usize, &'static str, &'static str, f64)> {
    const PAIRS: [(&str, &str); 3] = [
        ("plain", "pytorch-plain"),
        ("diag-exact", "backpack-diag-exact"),
        ("diag-mc-fisher", "backpack-diag-mc"),
    ];
    let mut out = Vec::new();
    for o in ours {
        for (mine, other) in PAIRS {
            if o.variant != mine {
                continue;
            }
            if let Some(t) = theirs
                .iter()
                .find(|t| t.batch_size == o.batch_size && t.variant == other)
            {
                out.push((o.batch_size, mine, other, o.median_ms / t.median_ms));
            }
        }
    }
    out
}

/// The default interpreter: `bench/.venv/bin/python` (see `make bench-venv`).
pub fn default_python() -> PathBuf {
    Path::new("bench").join(".venv").join("bin").join("python")
}
