//! Checkpoints of a training run: everything a resumed run needs to be the
//! run that would have happened.
//!
//! `RUN_DIR/checkpoints/epoch-000005/` holds
//! - `model.safetensors`: every float tensor of the model (parameters and
//!   batch-norm running statistics) by path, with burn's `ParamId`s in the
//!   metadata;
//! - `optimizer.bpk`: the optimizer state (momentum buffers) as burn writes it;
//! - `noise.safetensors`: the noise stage's moving-average estimate;
//! - `state.json`: format and version, epoch and step, the noise stage's
//!   counters, and the size and CRC-32 of each other file, which are checked
//!   before any parser reads them.
//!
//! The data order needs no state: an epoch's batches are a function of
//! (seed, epoch). A checkpoint is written into a temporary directory, every
//! file synced, and then renamed into place, so a crash at any instant leaves
//! the previous checkpoints intact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::fault;
use super::run_dir::{io_error, write_synced};
use crate::moments::{MomentValues, SmootherState};
use crate::noise::NoiseState;
use crate::weights::{self, NamedTensor};

/// Name of the checkpoints folder in a run directory.
pub const DIR: &str = "checkpoints";
/// The format this build reads and writes.
pub const FORMAT: &str = "covnoise-checkpoint";
/// Its version; bumped when the layout changes.
pub const VERSION: u32 = 1;

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.bpk";
const NOISE: &str = "noise.safetensors";
const STATE: &str = "state.json";

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Epochs completed.
    pub epoch: usize,
    /// Model tensors by path.
    pub weights: Vec<NamedTensor>,
    /// The optimizer's record, as burn wrote it.
    pub optimizer: Vec<u8>,
    /// The noise stage's state.
    pub noise: NoiseState,
}

/// What writing a checkpoint cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Written {
    /// Bytes on disk.
    pub bytes: u64,
    /// Wall time, serialization and sync included.
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    epoch: usize,
    noise: NoiseRecord,
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseRecord {
    step: u64,
    updates: i32,
    last_refresh: Option<u64>,
    estimate_ids: Vec<u64>,
    /// None, "trace" (with `trace`) or "diag" (tensors in noise.safetensors).
    average: Option<String>,
    trace: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

fn bad(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The directory name of the checkpoint after `epoch` epochs.
pub fn dir_name(epoch: usize) -> String {
    format!("epoch-{epoch:06}")
}

/// The checkpoints of the run in `run_dir`, oldest first, as (epoch,
/// directory). Temporary directories of interrupted writes are ignored.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let root = run_dir.join(DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| io_error(&root, e))? {
        let entry = entry.map_err(|e| io_error(&root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(epoch) = name
            .strip_prefix("epoch-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            found.push((epoch, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes the checkpoint after `epoch` epochs into `run_dir` and keeps only
/// the newest `keep` (>= 1).
pub fn write<M: Module>(
    run_dir: &Path,
    epoch: usize,
    model: &M,
    optimizer: &ModuleOptimizer,
    noise: &NoiseState,
    keep: usize,
) -> Result<Written, TrainError> {
    let started = Instant::now();
    let root = run_dir.join(DIR);
    std::fs::create_dir_all(&root).map_err(|e| io_error(&root, e))?;
    let target = root.join(dir_name(epoch));
    // Temporary directories are left only by writers that died (one writer
    // per run directory): remove them.
    for entry in std::fs::read_dir(&root).map_err(|e| io_error(&root, e))? {
        let path = entry.map_err(|e| io_error(&root, e))?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
        {
            std::fs::remove_dir_all(&path).map_err(|e| io_error(&path, e))?;
        }
    }
    let tmp = root.join(format!(".tmp-{}-{}", dir_name(epoch), std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| io_error(&tmp, e))?;

    let ser = |e: crate::CovnoiseError| bad(&target, e.to_string());
    let model_bytes =
        weights::to_safetensors(&weights::collect(model).map_err(ser)?).map_err(ser)?;
    let optimizer_bytes = optimizer
        .to_record()
        .into_bytes()
        .map_err(|e| {
            bad(
                &target,
                format!("cannot serialize the optimizer state: {e:?}"),
            )
        })?
        .to_vec();
    let (average, trace, noise_tensors) = match &noise.smoother.average {
        None => (None, None, Vec::new()),
        Some(MomentValues::Trace(t)) => (Some("trace".to_string()), Some(*t), Vec::new()),
        Some(MomentValues::Diag(d)) => {
            let tensors = d
                .iter()
                .enumerate()
                .map(|(i, v)| NamedTensor {
                    name: format!("average.{i:04}"),
                    id: None,
                    shape: vec![v.len()],
                    values: v.clone(),
                })
                .collect::<Vec<_>>();
            (Some("diag".to_string()), None, tensors)
        }
    };
    let noise_bytes = weights::to_safetensors(&noise_tensors).map_err(ser)?;

    let mut files = BTreeMap::new();
    let mut bytes = 0;
    for (name, contents) in [
        (MODEL, &model_bytes),
        (OPTIMIZER, &optimizer_bytes),
        (NOISE, &noise_bytes),
    ] {
        let path = tmp.join(name);
        write_synced(&path, contents).map_err(|e| io_error(&path, e))?;
        files.insert(name.to_string(), sum(contents));
        bytes += contents.len() as u64;
    }
    let state = StateFile {
        format: FORMAT.into(),
        version: VERSION,
        epoch,
        noise: NoiseRecord {
            step: noise.step,
            updates: noise.smoother.updates,
            last_refresh: noise.smoother.last_refresh,
            estimate_ids: noise.estimate_ids.clone(),
            average,
            trace,
        },
        files,
    };
    let state_text = serde_json::to_string_pretty(&state).expect("the state serializes");
    let path = tmp.join(STATE);
    write_synced(&path, state_text.as_bytes()).map_err(|e| io_error(&path, e))?;
    bytes += state_text.len() as u64;
    sync_dir(&tmp)?;

    fault::point(fault::Point::CheckpointRename);
    if target.exists() {
        // A checkpoint of this epoch from before a resume: superseded.
        std::fs::remove_dir_all(&target).map_err(|e| io_error(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| io_error(&target, e))?;
    sync_dir(&root)?;

    let all = list(run_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).map_err(|e| io_error(old, e))?;
    }
    Ok(Written {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads and verifies the checkpoint in `dir`. Every problem (a missing,
/// truncated, corrupt or foreign file, another format version) is an error
/// naming the file; nothing is modified.
pub fn read(dir: &Path) -> Result<Checkpoint, TrainError> {
    let state_path = dir.join(STATE);
    let text = std::fs::read(&state_path).map_err(|e| bad(&state_path, e.to_string()))?;
    let state: StateFile = serde_json::from_slice(&text).map_err(|e| {
        bad(
            &state_path,
            format!("not a covnoise checkpoint state ({e})"),
        )
    })?;
    if state.format != FORMAT {
        return Err(bad(
            &state_path,
            format!("format {:?}, expected {FORMAT:?}", state.format),
        ));
    }
    if state.version != VERSION {
        return Err(bad(
            &state_path,
            format!(
                "checkpoint format version {}, this covnoise reads version {VERSION}",
                state.version
            ),
        ));
    }
    let mut contents: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for name in [MODEL, OPTIMIZER, NOISE] {
        let path = dir.join(name);
        let expected = state
            .files
            .get(name)
            .ok_or_else(|| bad(&state_path, format!("lists no {name}")))?;
        let bytes = std::fs::read(&path).map_err(|e| bad(&path, e.to_string()))?;
        let got = sum(&bytes);
        if got.bytes != expected.bytes {
            return Err(bad(
                &path,
                format!(
                    "{} bytes, {} expected (truncated or replaced)",
                    got.bytes, expected.bytes
                ),
            ));
        }
        if got.crc32 != expected.crc32 {
            return Err(bad(&path, "checksum mismatch (corrupt)"));
        }
        contents.insert(name, bytes);
    }
    let weights = weights::from_safetensors(&contents[MODEL])
        .map_err(|e| bad(&dir.join(MODEL), e.to_string()))?;
    let noise_path = dir.join(NOISE);
    let noise_tensors =
        weights::from_safetensors(&contents[NOISE]).map_err(|e| bad(&noise_path, e.to_string()))?;
    let r = &state.noise;
    let average = match (r.average.as_deref(), r.trace) {
        (None, None) if noise_tensors.is_empty() => None,
        (Some("trace"), Some(t)) if noise_tensors.is_empty() => Some(MomentValues::Trace(t)),
        (Some("diag"), None) => {
            // Sorted by name, which is the table order ("average.0000", ...).
            for (i, t) in noise_tensors.iter().enumerate() {
                if t.name != format!("average.{i:04}") || t.shape.len() != 1 {
                    return Err(bad(&noise_path, format!("unexpected tensor {}", t.name)));
                }
            }
            Some(MomentValues::Diag(
                noise_tensors.into_iter().map(|t| t.values).collect(),
            ))
        }
        _ => {
            return Err(bad(
                &state_path,
                "the noise record does not match noise.safetensors",
            ));
        }
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        epoch: state.epoch,
        weights,
        optimizer: contents.remove(OPTIMIZER).expect("read above"),
        noise: NoiseState {
            step: r.step,
            smoother: SmootherState {
                average,
                updates: r.updates,
                last_refresh: r.last_refresh,
            },
            estimate_ids: r.estimate_ids.clone(),
        },
    })
}

/// Gives `optimizer` the state saved in `checkpoint` (the model must carry
/// the checkpoint's `ParamId`s, see [`weights::load_into`]).
pub fn load_optimizer(
    optimizer: ModuleOptimizer,
    checkpoint: &Checkpoint,
) -> Result<ModuleOptimizer, TrainError> {
    let path = checkpoint.dir.join(OPTIMIZER);
    let record = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(checkpoint.optimizer.clone()))
        .map_err(|e| bad(&path, format!("unreadable optimizer state ({e:?})")))?;
    // burn asserts on records it did not write; the checksum makes that
    // unlikely, and this keeps it an error rather than a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        optimizer.load_record(record)
    }))
    .map_err(|_| bad(&path, "inconsistent optimizer state"))
}

fn sum(bytes: &[u8]) -> FileSum {
    FileSum {
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    }
}

/// Makes a directory's entries (creations, renames) durable.
fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
