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
//!   counters;
//! - `manifest`: the format and version, then the size and CRC-32 of each
//!   of the four files above, then the CRC-32 of the manifest itself. It is
//!   written last and checked first: no parser reads a byte of a file whose
//!   checksum has not matched, and a checkpoint whose files are not exactly
//!   the listed ones is refused, so a checkpoint is used whole or not at all.
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
use covnoise::moments::{MomentValues, SmootherState};
use covnoise::noise::NoiseState;
use covnoise::weights::{self, NamedTensor};

/// Name of the checkpoints folder in a run directory.
pub const DIR: &str = "checkpoints";
/// The format this build reads and writes.
pub const FORMAT: &str = "covnoise-checkpoint";
/// Its version; bumped when the layout changes (2: the manifest).
pub const VERSION: u32 = 2;

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.bpk";
const NOISE: &str = "noise.safetensors";
const STATE: &str = "state.json";
/// The checksum manifest of a checkpoint's other files.
pub const MANIFEST: &str = "manifest";
/// The files the manifest lists, in its order.
pub const FILES: [&str; 4] = [MODEL, NOISE, OPTIMIZER, STATE];

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
    /// Each tensor of the optimizer's record: the `ParamId` it belongs to
    /// and its shape (read from the record's header, to be checked against
    /// the model before burn loads it).
    pub optimizer_tensors: Vec<RecordTensor>,
    /// The noise stage's state.
    pub noise: NoiseState,
}

/// One tensor of an optimizer record: the `ParamId` it belongs to (None
/// if the record names none) and its shape.
pub type RecordTensor = (Option<u64>, Vec<usize>);

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

#[derive(Debug, Clone, Copy, PartialEq)]
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

/// The epoch in a checkpoint directory's name (`epoch-000005` -> 5).
pub fn epoch_of(dir: &Path) -> Option<usize> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("epoch-")?
        .parse::<usize>()
        .ok()
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

    let ser = |e: covnoise::CovnoiseError| bad(&target, e.to_string());
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
    };
    let state_text = serde_json::to_string_pretty(&state).expect("the state serializes");
    let mut files = BTreeMap::new();
    let mut bytes = 0;
    for (name, contents) in [
        (MODEL, model_bytes.as_slice()),
        (OPTIMIZER, optimizer_bytes.as_slice()),
        (NOISE, noise_bytes.as_slice()),
        (STATE, state_text.as_bytes()),
    ] {
        let path = tmp.join(name);
        write_synced(&path, contents).map_err(|e| io_error(&path, e))?;
        files.insert(name, sum(contents));
        bytes += contents.len() as u64;
    }
    // The manifest last: a checkpoint without one is incomplete.
    let manifest = manifest_text(&files);
    let path = tmp.join(MANIFEST);
    write_synced(&path, manifest.as_bytes()).map_err(|e| io_error(&path, e))?;
    bytes += manifest.len() as u64;
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

/// The manifest of `files`: a header line, one line per file (name, size,
/// CRC-32 in hex), and a last line with the CRC-32 of everything before it.
fn manifest_text(files: &BTreeMap<&str, FileSum>) -> String {
    let mut text = format!("{FORMAT} {VERSION}\n");
    for name in FILES {
        let f = files[name];
        text.push_str(&format!("{name} {} {:08x}\n", f.bytes, f.crc32));
    }
    let own = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("crc32 {own:08x}\n"));
    text
}

/// Reads `dir/manifest`, checks its own checksum, format and version, and
/// returns the size and CRC-32 it lists for each of [`FILES`].
fn read_manifest(dir: &Path) -> Result<BTreeMap<&'static str, FileSum>, TrainError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(
                &path,
                "missing (an incomplete checkpoint, or one written by an older covnoise)",
            ));
        }
        Err(e) => return Err(bad(&path, e.to_string())),
    };
    let corrupt = || bad(&path, "checksum mismatch (corrupt)");
    // The last line is "crc32 XXXXXXXX" over every byte before it.
    let body_end = text
        .strip_suffix(b"\n")
        .and_then(|t| t.iter().rposition(|&b| b == b'\n'))
        .map(|i| i + 1)
        .ok_or_else(corrupt)?;
    let (body, last) = text.split_at(body_end);
    let claimed = std::str::from_utf8(last)
        .ok()
        .and_then(|l| l.strip_prefix("crc32 "))
        .and_then(|h| h.strip_suffix('\n'))
        .filter(|h| h.len() == 8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(corrupt)?;
    if claimed != crc32fast::hash(body) {
        return Err(corrupt());
    }
    let body = std::str::from_utf8(body).map_err(|_| corrupt())?;
    let mut lines = body.lines();
    let header = lines.next().unwrap_or_default();
    match header.split_once(' ') {
        Some((FORMAT, v)) if v == VERSION.to_string() => {}
        Some((FORMAT, v)) => {
            return Err(bad(
                &path,
                format!("checkpoint format version {v}, this covnoise reads version {VERSION}"),
            ));
        }
        _ => {
            return Err(bad(
                &path,
                format!("not a covnoise checkpoint manifest (header {header:?})"),
            ));
        }
    }
    let mut files = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        let entry = match fields[..] {
            [name, size, crc] if crc.len() == 8 => FILES
                .into_iter()
                .find(|f| *f == name)
                .zip(size.parse::<u64>().ok())
                .zip(u32::from_str_radix(crc, 16).ok()),
            _ => None,
        };
        let Some(((name, bytes), crc32)) = entry else {
            return Err(bad(&path, format!("unexpected line {line:?}")));
        };
        if files.insert(name, FileSum { bytes, crc32 }).is_some() {
            return Err(bad(&path, format!("lists {name} twice")));
        }
    }
    if let Some(missing) = FILES.into_iter().find(|f| !files.contains_key(f)) {
        return Err(bad(&path, format!("lists no {missing}")));
    }
    Ok(files)
}

/// Reads and verifies the checkpoint in `dir` (a directory named
/// `epoch-N`). The manifest is checked first, then every file's size and
/// checksum, before any parser reads it; then the state's epoch against the
/// directory's name. Every problem (a missing, truncated, corrupt, extra or
/// foreign file, another format version) is an error naming the file;
/// nothing is modified.
pub fn read(dir: &Path) -> Result<Checkpoint, TrainError> {
    let Some(dir_epoch) = epoch_of(dir) else {
        return Err(bad(dir, "is not named epoch-N"));
    };
    let sums = read_manifest(dir)?;
    for entry in std::fs::read_dir(dir).map_err(|e| bad(dir, e.to_string()))? {
        let entry = entry.map_err(|e| bad(dir, e.to_string()))?;
        let name = entry.file_name();
        if name != MANIFEST && !FILES.iter().any(|f| name == *f) {
            return Err(bad(
                &entry.path(),
                "is not part of a checkpoint (unexpected file)",
            ));
        }
    }
    let mut contents: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    for name in FILES {
        let path = dir.join(name);
        let expected = sums[name];
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
    let state_path = dir.join(STATE);
    let state: StateFile = serde_json::from_slice(&contents[STATE]).map_err(|e| {
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
    if state.epoch != dir_epoch {
        return Err(bad(
            &state_path,
            format!(
                "records epoch {}, but its directory is that of epoch {dir_epoch}",
                state.epoch
            ),
        ));
    }
    let optimizer_path = dir.join(OPTIMIZER);
    let optimizer_tensors = optimizer_tensors(&contents[OPTIMIZER])
        .map_err(|e| bad(&optimizer_path, format!("unreadable optimizer state ({e})")))?;
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
        optimizer_tensors,
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

/// The (parameter id, shape) of each tensor in a burnpack optimizer record,
/// read from its header without loading it into an optimizer.
fn optimizer_tensors(bytes: &[u8]) -> Result<Vec<RecordTensor>, String> {
    let reader = burn_pack::Reader::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()))
        .map_err(|e| format!("{e:?}"))?;
    reader
        .into_tensors()
        .map_err(|e| format!("{e:?}"))?
        .into_iter()
        .map(|t| {
            let (_, _, shape, id, _) = t.into_parts().map_err(|e| format!("{e:?}"))?;
            Ok((id, shape.to_vec()))
        })
        .collect()
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
