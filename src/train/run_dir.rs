//! Run directories: created only when empty (or explicitly overwritten),
//! and written file by file atomically, so a killed run never leaves a
//! half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{EpochMetrics, TrainError, TrainSettings};

/// The files a run writes.
pub const RUN_FILES: [&str; 3] = ["config.toml", "metrics.jsonl", "summary.json"];

/// A directory that a run owns.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

/// An I/O failure on `path` as a [`TrainError`].
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl RunDir {
    /// Creates `path` (and its parents). An existing non-empty directory is
    /// refused unless `overwrite`, in which case the previous run's files are
    /// removed (other files are left alone).
    pub fn create(path: &Path, overwrite: bool) -> Result<Self, TrainError> {
        if path.exists() {
            if !path.is_dir() {
                return Err(TrainError::RunDirExists(
                    path.to_path_buf(),
                    "is not a directory",
                ));
            }
            let non_empty = std::fs::read_dir(path)
                .map_err(|e| io_error(path, e))?
                .next()
                .is_some();
            if non_empty {
                if !overwrite {
                    return Err(TrainError::RunDirExists(
                        path.to_path_buf(),
                        "exists and is not empty (pass --overwrite to replace its run)",
                    ));
                }
                for name in RUN_FILES {
                    let file = path.join(name);
                    if file.exists() {
                        std::fs::remove_file(&file).map_err(|e| io_error(&file, e))?;
                    }
                }
            }
        }
        std::fs::create_dir_all(path).map_err(|e| io_error(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// An existing run directory (one with a `config.toml`), to resume.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        if !path.join("config.toml").is_file() {
            return Err(TrainError::RunDirExists(
                path.to_path_buf(),
                "is not a run directory (no config.toml)",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The run's settings, from its `config.toml` (the `[meta]` record of
    /// the data and code version is left out).
    pub fn read_settings(&self) -> Result<TrainSettings, TrainError> {
        let file = self.path.join("config.toml");
        let bad = |message: String| TrainError::Io {
            path: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(&file).map_err(|e| bad(e.to_string()))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        table.remove("meta");
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_string()))
    }

    /// The epochs recorded in `metrics.jsonl` (none if it does not exist).
    pub fn read_metrics(&self) -> Result<Vec<EpochMetrics>, TrainError> {
        let file = self.path.join("metrics.jsonl");
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&file, e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|e| TrainError::Io {
                    path: file.clone(),
                    message: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` atomically: to a temporary file in the same directory,
    /// flushed to disk, then renamed over the target.
    pub fn write(&self, name: &str, contents: &[u8]) -> Result<(), TrainError> {
        write_atomic(&self.path.join(name), contents)
    }
}

/// Writes `target` atomically (temporary file in the same directory, fsync,
/// rename), so readers see the old or the new contents, never a mix.
pub fn write_atomic(target: &Path, contents: &[u8]) -> Result<(), TrainError> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_synced(&tmp, contents).and_then(|()| std::fs::rename(&tmp, target));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(target, e)
    })
}

/// Creates `path` with `contents` and flushes it to disk.
pub(crate) fn write_synced(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(contents)?;
    f.sync_all()
}
