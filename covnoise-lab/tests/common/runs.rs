//! Runs of the `covnoise` binary for the checkpoint and integrity tests:
//! one small 3-epoch MLP run, its resumption, and its final weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use covnoise_lab::train::checkpoint;

/// The binary, without the environment variables that would change a run.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_covnoise"));
    c.env_remove("COVNOISE_DATA").env_remove("COVNOISE_FAULT");
    c
}

/// 512 training and 128 test images under `root/data`: 8 steps of 64 per
/// epoch.
pub fn fixture(root: &Path) -> PathBuf {
    super::write_fashion_fixture(&root.join("data"), 512, 128)
}

/// A 3-epoch run of 8 steps per epoch on one thread: flex's parallel
/// reductions may split differently under load, which changes sums in the
/// last bit; one thread makes runs bit-exact. `fault` sets the crash point.
pub fn train(data: &Path, out: &Path, extra: &[&str], fault: Option<&str>) -> Output {
    let mut c = bin();
    c.args([
        "train",
        "--batch-size",
        "64",
        "--lr",
        "0.1",
        "--epochs",
        "3",
        "--warmup-epochs",
        "1",
        "--hidden",
        "32",
        "--threads",
        "1",
        "--quiet",
        "--data",
    ])
    .arg(data)
    .arg("--out")
    .arg(out)
    .args(extra);
    if let Some(f) = fault {
        c.env("COVNOISE_FAULT", f);
    }
    c.output().unwrap()
}

/// `covnoise train --resume dir` with `extra` flags.
pub fn resume(dir: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["train", "--quiet", "--resume"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap()
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The final weights: every tensor's name, shape and bits.
pub fn final_weights(dir: &Path) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let (_, newest) = checkpoint::list(dir).unwrap().pop().unwrap();
    let bytes = std::fs::read(newest.join("model.safetensors")).unwrap();
    covnoise::weights::from_safetensors(&bytes)
        .unwrap()
        .into_iter()
        .map(|t| {
            (
                t.name,
                t.shape,
                t.values.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// Copies the files of `from` into a fresh directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Snapshot of every file under `dir` (path and contents).
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}
