//! Run directories: created only when empty (or explicitly overwritten),
//! and written file by file atomically, so a killed run never leaves a
//! half-written file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{EpochMetrics, TrainError, TrainSettings};

/// The files a run writes (besides its checkpoints).
pub const RUN_FILES: [&str; 3] = ["config.toml", "metrics.jsonl", "summary.json"];

/// Every entry a run directory may hold that covnoise writes: the run's
/// files, `covnoise eval`'s result and the checkpoints directory.
pub const RUN_OWN_ENTRIES: [&str; 5] = [
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "eval.json",
    super::checkpoint::DIR,
];

/// The first entry of the run directory `dir` (sorted by name) that no run
/// writes, if any. Temporary files of an interrupted atomic write
/// (`.NAME.tmp-PID`) are the run's own.
fn foreign_entry(dir: &Path) -> Result<Option<String>, TrainError> {
    let mut names = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| io_error(dir, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    names.sort();
    Ok(names.into_iter().find(|name| {
        let temporary = name.starts_with('.') && name.contains(".tmp-");
        !temporary && !RUN_OWN_ENTRIES.contains(&name.as_str())
    }))
}

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
    /// Checks, without writing anything, that [`RunDir::create`] with the
    /// same arguments would succeed: `path` is absent, an empty directory,
    /// or (with `overwrite`) a run directory (one with a `config.toml`); and
    /// the directory that would hold it is writable.
    pub fn check_new(path: &Path, overwrite: bool) -> Result<(), TrainError> {
        let refuse = |why: &'static str| TrainError::RunDirExists(path.to_path_buf(), why);
        if path.exists() {
            if !path.is_dir() {
                return Err(refuse("is not a directory"));
            }
            let non_empty = std::fs::read_dir(path)
                .map_err(|e| io_error(path, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(refuse(
                    "exists and is not empty (pass --overwrite to replace its run)",
                ));
            }
            // --overwrite empties the directory: only one a run made, and
            // only of what runs write.
            if non_empty && !path.join("config.toml").is_file() {
                return Err(refuse(
                    "is not empty and holds no run (no config.toml); --overwrite replaces only a run directory",
                ));
            }
            if non_empty && let Some(name) = foreign_entry(path)? {
                return Err(TrainError::ForeignFile {
                    dir: path.to_path_buf(),
                    name,
                });
            }
        }
        check_can_create(path)
    }

    /// Creates `path` (and its parents) as a fresh run directory. An
    /// existing non-empty directory is refused unless `overwrite`; then it
    /// must hold a run (a `config.toml`) and nothing but what runs write
    /// ([`RUN_OWN_ENTRIES`] and interrupted atomic writes), all of which is
    /// removed, so that nothing of the earlier run can be read as this
    /// one's. Any other file (a user's notes, a plot) makes it refuse,
    /// naming the file, before anything is removed.
    pub fn create(path: &Path, overwrite: bool) -> Result<Self, TrainError> {
        Self::check_new(path, overwrite)?;
        if path.is_dir() {
            // config.toml goes last: emptying cut short by a crash leaves a
            // run directory, which --overwrite accepts again.
            let mut entries = std::fs::read_dir(path)
                .map_err(|e| io_error(path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| io_error(path, e))?;
            entries.sort_by_key(|e| e.file_name() == "config.toml");
            for entry in entries {
                let p = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed.map_err(|e| io_error(&p, e))?;
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

    /// Removes the file `name` if it exists.
    pub fn remove(&self, name: &str) -> Result<(), TrainError> {
        let file = self.path.join(name);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&file, e)),
            _ => Ok(()),
        }
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

/// Checks, without writing, that `path` is a writable directory or could be
/// created as one (its nearest existing ancestor is a writable directory).
pub fn check_can_create(path: &Path) -> Result<(), TrainError> {
    if path.exists() {
        if !path.is_dir() {
            return Err(TrainError::RunDirExists(
                path.to_path_buf(),
                "is not a directory",
            ));
        }
        return check_writable(path);
    }
    let mut ancestor = path.parent();
    while let Some(dir) = ancestor {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if dir.exists() {
            if !dir.is_dir() {
                return Err(TrainError::RunDirExists(
                    dir.to_path_buf(),
                    "is not a directory",
                ));
            }
            return check_writable(dir);
        }
        ancestor = dir.parent();
    }
    Ok(())
}

/// Refuses a directory this process cannot create files in.
pub fn check_writable(dir: &Path) -> Result<(), TrainError> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| TrainError::Io {
            path: dir.to_path_buf(),
            message: "path contains a NUL byte".into(),
        })?;
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(io_error(dir, std::io::Error::last_os_error()));
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `path` with `contents` and flushes it to disk.
pub(crate) fn write_synced(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(contents)?;
    f.sync_all()
}
