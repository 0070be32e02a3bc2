//! Checkpoints and resume, as a user meets them: a run killed with SIGKILL
//! (injected at a chosen step, or between a checkpoint's write and its
//! rename) and resumed must be the unbroken run; bad checkpoints are refused
//! with one line naming the file; 1,000 mutated checkpoint files never make
//! the loader panic.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::metrics_without_times as metrics;
use common::runs::{bin, copy_dir, final_weights, fixture, resume, snapshot, stderr, train};

use covnoise::weights;
use covnoise_lab::train::checkpoint;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[cfg(unix)]
fn killed(o: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    o.status.signal() == Some(9)
}

#[cfg(not(unix))]
fn killed(o: &Output) -> bool {
    !o.status.success()
}

const NOISES: [(&str, &[&str]); 3] = [
    ("plain", &["--noise", "none"]),
    ("diag exact", &["--noise", "diag", "--small-batch", "16"]),
    (
        "diag microbatch",
        &[
            "--noise",
            "diag",
            "--small-batch",
            "16",
            "--estimator",
            "microbatch",
            "--micro-batches",
            "4",
            "--ema",
            "0.9",
        ],
    ),
];

#[test]
fn a_run_killed_mid_epoch_and_resumed_is_the_unbroken_run() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    for (name, noise) in NOISES {
        let unbroken = root.path().join(format!("{name}-unbroken"));
        let o = train(&data, &unbroken, noise, None);
        assert!(o.status.success(), "{name}: {}", stderr(&o));

        // Step 11 is the 4th of 8 steps in epoch 2: epoch 1's checkpoint
        // exists, epoch 2's work is lost and redone.
        let broken = root.path().join(format!("{name}-broken"));
        let o = train(&data, &broken, noise, Some("step:11"));
        assert!(
            killed(&o),
            "{name}: not killed: {:?} {}",
            o.status,
            stderr(&o)
        );
        assert_eq!(metrics(&broken).len(), 1, "{name}");
        let o = resume(&broken, &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));

        assert_eq!(metrics(&broken), metrics(&unbroken), "{name}");
        assert_eq!(metrics(&broken).len(), 3, "{name}");
        assert_eq!(final_weights(&broken), final_weights(&unbroken), "{name}");
        // Keep 2 (the default): epochs 2 and 3.
        let kept: Vec<usize> = checkpoint::list(&broken)
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, [2, 3], "{name}");
    }
}

#[test]
fn a_crash_between_checkpoint_write_and_rename_leaves_a_resumable_run() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let (_, noise) = NOISES[1];
    let unbroken = root.path().join("unbroken");
    assert!(train(&data, &unbroken, noise, None).status.success());
    let broken = root.path().join("broken");
    // Dies at the first checkpoint's rename (after epoch 1).
    let o = train(&data, &broken, noise, Some("checkpoint-rename"));
    assert!(killed(&o), "{:?} {}", o.status, stderr(&o));
    assert!(checkpoint::list(&broken).unwrap().is_empty());
    // The half-made checkpoint is a hidden temporary directory.
    let leftovers = std::fs::read_dir(broken.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 1);
    // No checkpoint: a resume is refused, and --restart starts over from
    // the seed and ends as the unbroken run did.
    let o = resume(&broken, &[]);
    assert!(
        !o.status.success() && stderr(&o).contains("--restart"),
        "{}",
        stderr(&o)
    );
    let o = resume(&broken, &["--restart"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&broken), metrics(&unbroken));
    assert_eq!(final_weights(&broken), final_weights(&unbroken));
}

#[test]
fn resume_refuses_changes_and_extends_a_finished_run() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let run = root.path().join("run");
    assert!(
        train(&data, &run, &["--schedule", "constant"], None)
            .status
            .success()
    );
    let o = resume(&run, &["--lr", "0.5"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--lr"), "{}", stderr(&o));
    let o = resume(&run, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is complete"), "{}", stderr(&o));
    let o = resume(&run, &["--epochs", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&run).len(), 4);
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("epochs = 4"), "{config}");
}

#[test]
fn bad_checkpoints_are_refused_naming_the_file_and_leave_the_run_untouched() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let good = root.path().join("good");
    assert!(
        train(
            &data,
            &good,
            &["--epochs", "2", "--keep-checkpoints", "1"],
            None
        )
        .status
        .success()
    );
    let other = root.path().join("other");
    let narrower = ["--epochs", "2", "--keep-checkpoints", "1", "--hidden", "16"];
    assert!(train(&data, &other, &narrower, None).status.success());
    let ckpt = |run: &Path| run.join("checkpoints").join(checkpoint::dir_name(2));

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &str, Damage)> = vec![
        (
            "truncated",
            "model.safetensors",
            Box::new(|d: &Path| {
                let f = d.join("model.safetensors");
                let bytes = std::fs::read(&f).unwrap();
                std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
        (
            "corrupt",
            "optimizer.bpk",
            Box::new(|d: &Path| {
                let f = d.join("optimizer.bpk");
                let mut bytes = std::fs::read(&f).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x40;
                std::fs::write(&f, bytes).unwrap();
            }),
        ),
        (
            "foreign",
            "state.json",
            Box::new(|d: &Path| std::fs::write(d.join("state.json"), b"{\"hello\": 1}").unwrap()),
        ),
        (
            "another version",
            "state.json",
            Box::new(|d: &Path| {
                let f = d.join("state.json");
                let text = std::fs::read_to_string(&f).unwrap();
                std::fs::write(&f, text.replace("\"version\": 2", "\"version\": 99")).unwrap();
            }),
        ),
        (
            "another model",
            "model.safetensors",
            Box::new(move |d: &Path| {
                std::fs::remove_dir_all(d).unwrap();
                copy_dir(&ckpt(&other), d);
            }),
        ),
    ];
    for (i, (what, file, damage)) in cases.iter().enumerate() {
        let run = root.path().join(format!("case{i}"));
        copy_dir(&good, &run);
        // Ask for a longer run so that a good checkpoint would resume.
        damage(&ckpt(&run));
        let before = snapshot(&run);
        let o = resume(&run, &["--epochs", "3"]);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: accepted");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(
            err.contains(file) && !err.contains("panicked"),
            "{what}: {err}"
        );
        assert_eq!(snapshot(&run), before, "{what}: the run directory changed");
    }
}

#[test]
fn a_thousand_mutated_checkpoint_files_never_panic_the_loader() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let run = root.path().join("run");
    let o = train(
        &data,
        &run,
        &["--epochs", "1", "--noise", "diag", "--small-batch", "16"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let good = run.join("checkpoints").join(checkpoint::dir_name(1));
    let files = [
        "model.safetensors",
        "optimizer.bpk",
        "noise.safetensors",
        "state.json",
    ];
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(good.join(f)).unwrap())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Named as a checkpoint of epoch 1 is (the reader checks the name).
    let dir = root.path().join("mutant").join(checkpoint::dir_name(1));
    copy_dir(&good, &dir);
    let (mut refused, mut readable) = (0, 0);
    for trial in 0..1000 {
        let k = trial % files.len();
        let mut bytes = originals[k].clone();
        match rng.random_range(0..4) {
            // Flip 1-8 random bytes.
            0 => {
                for _ in 0..rng.random_range(1..=8) {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
            }
            // Truncate.
            1 => bytes.truncate(rng.random_range(0..bytes.len())),
            // Append garbage.
            2 => bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            // Random bytes of the same length.
            _ => bytes = (0..bytes.len()).map(|_| rng.random()).collect(),
        }
        std::fs::write(dir.join(files[k]), &bytes).unwrap();
        // The safetensors reader on the raw bytes too: no checksum in front.
        let _ = weights::from_safetensors(&bytes);
        match checkpoint::read(&dir) {
            Ok(_) => readable += 1,
            Err(e) => {
                refused += 1;
                assert!(e.to_string().contains(files[k]), "trial {trial}: {e}");
            }
        }
        std::fs::write(dir.join(files[k]), &originals[k]).unwrap();
    }
    // Only a mutation of state.json that keeps it valid JSON with the same
    // meaning may pass (e.g. appended whitespace is rejected as trailing
    // characters); every other must be refused.
    assert!(refused >= 990, "refused {refused}, readable {readable}");
    assert!(checkpoint::read(&dir).is_ok());
}

#[test]
fn eval_reports_the_saved_model_and_init_from_starts_from_it() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let run = root.path().join("run");
    assert!(
        train(&data, &run, &["--epochs", "2"], None)
            .status
            .success()
    );
    let o = bin().arg("eval").arg(&run).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let last = metrics(&run).pop().unwrap();
    assert_eq!(eval["epoch"], 2);
    assert_eq!(eval["test_accuracy"], last["test_accuracy"]);
    // Summed with another thread count than the run's: equal to float32
    // rounding of the per-batch losses.
    let (a, b) = (
        eval["test_loss"].as_f64().unwrap(),
        last["test_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");

    let o = bin()
        .args(["eval", "--checkpoint", "9"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no checkpoint of epoch 9"));

    // One epoch at a negligible learning rate from the saved weights keeps
    // the saved model's predictions.
    let weights = run
        .join("checkpoints")
        .join(checkpoint::dir_name(2))
        .join("model.safetensors");
    let again = root.path().join("again");
    let o = train(
        &data,
        &again,
        &[
            "--epochs",
            "1",
            "--lr",
            "1e-12",
            "--init-from",
            weights.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&again)[0]["test_accuracy"], last["test_accuracy"]);
    // Weights of another architecture (a second hidden layer) are refused,
    // naming the file and the tensor.
    let o = train(
        &data,
        &root.path().join("wrong"),
        &["--hidden", "16", "--init-from", weights.to_str().unwrap()],
        None,
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("model.safetensors") && err.contains("layers.1.weight"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_model_too_big_for_memory_is_refused_up_front_and_odd_settings_warn() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let o = train(
        &data,
        &root.path().join("huge"),
        &["--hidden", "100000000"],
        None,
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("GiB") && err.contains("--hidden"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        !root.path().join("huge").exists(),
        "nothing is written for a refused run"
    );

    let o = train(
        &data,
        &root.path().join("warm"),
        &["--warmup-epochs", "5"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: --warmup-epochs 5"),
        "{}",
        stderr(&o)
    );
}

/// The run directories under a study's output (those with a config.toml).
fn study_runs(out: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && path.file_name().is_some_and(|n| n != "checkpoints") {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "config.toml") {
                found.push(dir.clone());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_study_killed_mid_run_continues_that_run_from_its_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let file = root.path().join("s.toml");
    std::fs::write(
        &file,
        format!(
            r#"name = "resume"
seeds = [0]
[base]
data = "{}"
epochs = 3
warmup-epochs = 1
hidden = [32]
threads = 1
batch-size = 64
lr = 0.1
[[arm]]
name = "diag"
settings = {{ noise = "diag", small-batch = 16 }}
"#,
            data.display()
        ),
    )
    .unwrap();
    let study = |out: &Path, fault: Option<&str>| {
        let mut c = bin();
        c.arg("study").arg(&file).arg("--out").arg(out);
        if let Some(f) = fault {
            c.env("COVNOISE_FAULT", f);
        }
        c.output().unwrap()
    };
    let unbroken = root.path().join("unbroken");
    let o = study(&unbroken, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let broken = root.path().join("broken");
    let o = study(&broken, Some("step:11"));
    assert!(killed(&o), "not killed: {:?} {}", o.status, stderr(&o));
    let run = study_runs(&broken).pop().expect("the run directory");
    assert_eq!(metrics(&run).len(), 1);
    let o = study(&broken, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("continues from epoch 1"),
        "{}",
        stderr(&o)
    );
    let reference = study_runs(&unbroken).pop().unwrap();
    assert_eq!(metrics(&run), metrics(&reference));
    assert_eq!(final_weights(&run), final_weights(&reference));
}
