//! What is on disk is what ran: `--overwrite` leaves nothing of
//! the earlier run, resume refuses a run it cannot continue, a checkpoint is
//! used whole or not at all (edited counters and foreign files are refused
//! even with their checksums fixed up), metrics survive a resume bit for
//! bit, ignored settings are said and recorded, and relative paths are
//! recorded absolute.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::metrics_without_times as metrics;
use common::runs::{bin, copy_dir, final_weights, fixture, resume, snapshot, stderr, train};

use covnoise_lab::train::{EpochMetrics, checkpoint};

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// A refusal: exit 1, one line naming `needle`, no panic.
fn refused(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "does not name {needle:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("diverged"),
        "{err}"
    );
}

fn epochs(dir: &Path) -> Vec<usize> {
    checkpoint::list(dir).unwrap().iter().map(|c| c.0).collect()
}

/// Rewrites a checkpoint's manifest for its files as they are now: what a
/// forger would do after editing a file.
fn reseal(ckpt: &Path) {
    let mut text = format!("{} {}\n", checkpoint::FORMAT, checkpoint::VERSION);
    for name in checkpoint::FILES {
        let bytes = std::fs::read(ckpt.join(name)).unwrap();
        text.push_str(&format!(
            "{name} {} {:08x}\n",
            bytes.len(),
            crc32fast::hash(&bytes)
        ));
    }
    let own = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("crc32 {own:08x}\n"));
    std::fs::write(ckpt.join(checkpoint::MANIFEST), text).unwrap();
}

/// Finding 1.
#[test]
fn overwrite_leaves_nothing_of_the_earlier_run() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--epochs", "2"], None));
    ok(&bin().arg("eval").arg(&run).output().unwrap());
    // A file covnoise never wrote makes --overwrite refuse, naming it,
    // and leaves the directory as it was.
    std::fs::write(run.join("notes.txt"), b"a user's notes").unwrap();
    let before = snapshot(&run);
    refused(
        &train(&data, &run, &["--overwrite", "--epochs", "1"], None),
        "notes.txt",
    );
    assert_eq!(snapshot(&run), before);
    std::fs::remove_file(run.join("notes.txt")).unwrap();
    ok(&train(
        &data,
        &run,
        &["--overwrite", "--epochs", "1", "--keep-checkpoints", "1"],
        None,
    ));
    assert_eq!(epochs(&run), [1]);
    let mut left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "checkpoints",
            "config.toml",
            "metrics.jsonl",
            "summary.json"
        ]
    );
    let o = bin().arg("eval").arg(&run).output().unwrap();
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("epoch 1,"));
}

/// Findings 2 and 3.
#[test]
fn resume_refuses_what_it_cannot_continue_and_restart_starts_over() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let run = root.path().join("run");
    ok(&train(&data, &run, &["--epochs", "1"], None));
    let before = snapshot(&run);
    refused(
        &resume(
            &run,
            &["--epochs", "2", "--log-steps", "/nonexistent/s.jsonl"],
        ),
        "/nonexistent",
    );
    assert_eq!(snapshot(&run), before);
    // config.toml still says one epoch: a plain resume has nothing to do.
    refused(&resume(&run, &[]), "is complete");

    // An extension killed before its end leaves no summary of the shorter
    // run that would read as this one's.
    let extended = root.path().join("extended");
    copy_dir(&run, &extended);
    let o = bin()
        .args(["train", "--quiet", "--epochs", "3", "--resume"])
        .arg(&extended)
        .env("COVNOISE_FAULT", "step:11")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(!extended.join("summary.json").exists());

    // Checkpoints gone: refused, not retrained from scratch.
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let before = snapshot(&run);
    refused(&resume(&run, &["--epochs", "2"]), "--restart");
    assert_eq!(snapshot(&run), before);
    // Never written (--checkpoint-every 0): refused, naming why.
    let none = root.path().join("none");
    ok(&train(&data, &none, &["--checkpoint-every", "0"], None));
    refused(&resume(&none, &["--epochs", "4"]), "--checkpoint-every 0");
    // --restart trains it again, as a fresh run with its settings.
    ok(&resume(&none, &["--restart"]));
    let fresh = root.path().join("fresh");
    ok(&train(&data, &fresh, &["--checkpoint-every", "0"], None));
    assert_eq!(metrics(&none), metrics(&fresh));
}

/// A 3-epoch run with diagonal noise (the noise counters move) killed in
/// epoch 3, so that its newest checkpoint is epoch 2's; and the unbroken run.
fn killed_in_epoch_three(root: &Path, data: &Path) -> (PathBuf, PathBuf) {
    let noise = ["--noise", "diag", "--small-batch", "16", "--refresh", "3"];
    let unbroken = root.join("unbroken");
    ok(&train(data, &unbroken, &noise, None));
    let broken = root.join("broken");
    let o = train(data, &broken, &noise, Some("step:19"));
    assert!(!o.status.success());
    assert_eq!(epochs(&broken), [1, 2]);
    (broken, unbroken)
}

/// Findings 4 and 5: edits that keep every checksum consistent are refused
/// by the cross-checks, naming the file.
#[test]
fn edited_counters_and_foreign_files_are_refused_even_when_resealed() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let (broken, _) = killed_in_epoch_three(root.path(), &data);
    let narrow = root.path().join("narrow");
    ok(&train(
        &data,
        &narrow,
        &["--hidden", "16", "--epochs", "2"],
        None,
    ));
    let ckpt = |run: &Path| run.join("checkpoints").join(checkpoint::dir_name(2));

    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let state_edits: Vec<(&str, Edit)> = vec![
        (
            "updates + 1",
            Box::new(|v| {
                v["noise"]["updates"] = (v["noise"]["updates"].as_i64().unwrap() + 1).into()
            }),
        ),
        (
            "negative updates",
            Box::new(|v| v["noise"]["updates"] = (-5).into()),
        ),
        (
            "last refresh",
            Box::new(|v| {
                v["noise"]["last_refresh"] =
                    (v["noise"]["last_refresh"].as_u64().unwrap() - 1).into()
            }),
        ),
        (
            "estimate ids",
            Box::new(|v| v["noise"]["estimate_ids"][0] = 12345.into()),
        ),
        (
            "no estimate ids",
            Box::new(|v| v["noise"]["estimate_ids"] = serde_json::json!([])),
        ),
        ("epoch", Box::new(|v| v["epoch"] = 1.into())),
        ("step", Box::new(|v| v["noise"]["step"] = 15.into())),
    ];
    for (i, (what, edit)) in state_edits.iter().enumerate() {
        let run = root.path().join(format!("state{i}"));
        copy_dir(&broken, &run);
        let file = ckpt(&run).join("state.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&file, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        reseal(&ckpt(&run));
        let before = snapshot(&run);
        let o = resume(&run, &[]);
        refused(&o, "state.json");
        assert_eq!(snapshot(&run), before, "{what}");
    }

    // A flipped digit in the manifest's CRC of model.safetensors blames the
    // manifest, not the model.
    let run = root.path().join("crc");
    copy_dir(&broken, &run);
    let manifest = ckpt(&run).join(checkpoint::MANIFEST);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("model.safetensors"))
        .unwrap();
    let mut flipped = line.to_string();
    let last = flipped.pop().unwrap();
    flipped.push(if last == '0' { '1' } else { '0' });
    std::fs::write(&manifest, text.replace(line, &flipped)).unwrap();
    refused(&resume(&run, &[]), "manifest");

    // Another run's optimizer record (other widths), resealed.
    let run = root.path().join("foreign");
    copy_dir(&broken, &run);
    std::fs::copy(
        ckpt(&narrow).join("optimizer.bpk"),
        ckpt(&run).join("optimizer.bpk"),
    )
    .unwrap();
    reseal(&ckpt(&run));
    let before = snapshot(&run);
    refused(&resume(&run, &[]), "optimizer.bpk");
    assert_eq!(snapshot(&run), before);

    // Another run's noise estimate (a model of other widths), resealed.
    let run = root.path().join("foreign-noise");
    copy_dir(&broken, &run);
    let other = root.path().join("other-noise");
    ok(&train(
        &data,
        &other,
        &[
            "--hidden",
            "16",
            "--epochs",
            "2",
            "--noise",
            "diag",
            "--small-batch",
            "16",
            "--refresh",
            "3",
        ],
        None,
    ));
    std::fs::copy(
        ckpt(&other).join("noise.safetensors"),
        ckpt(&run).join("noise.safetensors"),
    )
    .unwrap();
    reseal(&ckpt(&run));
    refused(&resume(&run, &[]), "noise.safetensors");

    // A stray file in a checkpoint.
    let run = root.path().join("stray");
    copy_dir(&broken, &run);
    std::fs::write(ckpt(&run).join("extra.bin"), b"?").unwrap();
    refused(&resume(&run, &[]), "extra.bin");
}

/// Every file of a checkpoint truncated or with a byte flipped: the resume
/// is refused (one line naming the checkpoint's file, the run untouched) or
/// continues exactly as the unbroken run.
#[test]
fn mutated_checkpoints_are_refused_or_continue_identically() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let (broken, unbroken) = killed_in_epoch_three(root.path(), &data);
    let ckpt = |run: &Path| run.join("checkpoints").join(checkpoint::dir_name(2));
    let files: Vec<&str> = checkpoint::FILES
        .iter()
        .copied()
        .chain([checkpoint::MANIFEST])
        .collect();
    let (mut refusals, mut continued) = (0, 0);
    for file in files {
        let original = std::fs::read(ckpt(&broken).join(file)).unwrap();
        let n = original.len();
        let mutations: Vec<(String, Vec<u8>)> = vec![
            ("emptied".into(), Vec::new()),
            ("halved".into(), original[..n / 2].to_vec()),
            ("last byte cut".into(), original[..n - 1].to_vec()),
            (
                "byte appended".into(),
                [original.clone(), vec![b'\n']].concat(),
            ),
        ]
        .into_iter()
        .chain([0, n / 3, n / 2, n - 2, n - 1].into_iter().map(|i| {
            let mut m = original.clone();
            m[i] ^= 0x04;
            (format!("byte {i} flipped"), m)
        }))
        .collect();
        for (what, bytes) in mutations {
            let run = root.path().join("case");
            if run.exists() {
                std::fs::remove_dir_all(&run).unwrap();
            }
            copy_dir(&broken, &run);
            std::fs::write(ckpt(&run).join(file), &bytes).unwrap();
            let before = snapshot(&run);
            let o = resume(&run, &[]);
            if o.status.success() {
                continued += 1;
                assert_eq!(metrics(&run), metrics(&unbroken), "{file} {what}");
                assert_eq!(
                    final_weights(&run),
                    final_weights(&unbroken),
                    "{file} {what}"
                );
            } else {
                refusals += 1;
                let err = stderr(&o);
                assert_eq!(o.status.code(), Some(1), "{file} {what}: {err}");
                assert_eq!(err.trim().lines().count(), 1, "{file} {what}: {err}");
                assert!(err.contains(file), "{file} {what}: {err}");
                assert_eq!(snapshot(&run), before, "{file} {what}: the run changed");
            }
        }
    }
    assert!(refusals >= 40, "refused {refusals}, continued {continued}");
}

/// Finding 6: the lines written before the checkpoint are the same bytes
/// after a resume, and every metrics line reads back to the same bytes.
#[test]
fn metrics_before_the_checkpoint_survive_a_resume_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let (broken, unbroken) = killed_in_epoch_three(root.path(), &data);
    let before = std::fs::read_to_string(broken.join("metrics.jsonl")).unwrap();
    assert_eq!(before.lines().count(), 2);
    ok(&resume(&broken, &[]));
    let after = std::fs::read_to_string(broken.join("metrics.jsonl")).unwrap();
    assert!(
        after.starts_with(&before),
        "before:\n{before}\nafter:\n{after}"
    );
    assert_eq!(metrics(&broken), metrics(&unbroken));
    for line in after.lines().chain(
        std::fs::read_to_string(unbroken.join("metrics.jsonl"))
            .unwrap()
            .lines(),
    ) {
        let parsed: EpochMetrics = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), line);
    }
    // Lines of a real run whose floats serde_json's default parser reads
    // back 1 ulp off (lr, train_loss, test_loss): they must survive too.
    for line in [
        r#"{"epoch":1,"lr":0.09157348061512727,"train_loss":1.6615987978875637,"train_accuracy":0.49365234375,"test_loss":2.8590731620788574,"test_accuracy":0.62109375,"noise_trace":0.0,"seconds":0.00722857,"eval_seconds":0.002803457,"steps":16}"#,
        r#"{"epoch":2,"lr":0.1346117057077493,"train_loss":1.3317234814167023,"train_accuracy":0.625,"test_loss":1.0514097213745117,"test_accuracy":0.630859375,"noise_trace":0.0,"seconds":0.005292115,"eval_seconds":0.000488068,"steps":32}"#,
    ] {
        let parsed: EpochMetrics = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), line);
    }
}

/// Finding 9: one warning per ignored setting, on stderr and in config.toml.
#[test]
fn ignored_settings_warn_once_each_and_are_recorded() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture(root.path());
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &[
                "--noise",
                "none",
                "--ema",
                "0.9",
                "--kappa",
                "2",
                "--milestones",
                "1",
                "--gamma",
                "0.5",
            ],
            &["ema", "kappa", "milestones", "gamma"],
        ),
        (
            &[
                "--noise",
                "diag",
                "--small-batch",
                "16",
                "--noise-scale",
                "0.1",
                "--small-lr",
                "0.01",
            ],
            &["noise-scale", "small-lr"],
        ),
        (
            &[
                "--noise",
                "diag",
                "--small-batch",
                "16",
                "--micro-batches",
                "4",
                "--centered",
            ],
            &["micro-batches", "centered"],
        ),
        (
            &[
                "--noise",
                "full",
                "--small-batch",
                "16",
                "--estimator",
                "microbatch",
                "--checkpoint-every",
                "0",
                "--keep-checkpoints",
                "3",
            ],
            &["estimator", "keep-checkpoints"],
        ),
    ];
    for (i, (flags, ignored)) in cases.iter().enumerate() {
        let run = root.path().join(format!("run{i}"));
        let mut extra = vec!["--epochs", "1"];
        extra.extend(flags.iter());
        let o = train(&data, &run, &extra, None);
        ok(&o);
        let err = stderr(&o);
        let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
        let meta: toml::Table = config.parse::<toml::Table>().unwrap()["meta"]
            .as_table()
            .unwrap()
            .clone();
        let recorded = meta["warnings"].as_array().unwrap();
        for flag in *ignored {
            let line = format!("warning: --{flag} is ignored");
            assert_eq!(err.matches(&line).count(), 1, "{flag}: {err}");
            assert!(
                recorded.iter().any(|w| w
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("--{flag} is ignored"))),
                "{flag}: {recorded:?}"
            );
        }
        assert_eq!(
            err.lines().filter(|l| l.contains("is ignored")).count(),
            ignored.len(),
            "{err}"
        );
    }
    // The same rule for a study's arms, also with --quiet.
    std::fs::write(
        root.path().join("s.toml"),
        format!(
            "name = \"s\"\nseeds = [0]\n[base]\ndata = \"{}\"\nepochs = 1\nhidden = [16]\nbatch-size = 64\nthreads = 1\n[[arm]]\nname = \"a\"\nsettings = {{ kappa = 2.0 }}\n",
            data.display()
        ),
    )
    .unwrap();
    let o = bin()
        .arg("study")
        .arg(root.path().join("s.toml"))
        .arg("--out")
        .arg(root.path().join("study"))
        .arg("--quiet")
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(
        stderr(&o)
            .matches("warning: arm \"a\": --kappa is ignored")
            .count(),
        1,
        "{}",
        stderr(&o)
    );
    // The same rule for bench.
    let o = bin()
        .args([
            "bench",
            "--batch-sizes",
            "8",
            "--hidden",
            "4",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--variants",
            "diag-exact",
            "--micro-batches",
            "4",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    ok(&o);
    assert!(
        stderr(&o).contains("warning: --micro-batches is ignored"),
        "{}",
        stderr(&o)
    );
}

/// Finding 10: a relative --data is recorded absolute, so eval and resume
/// work from another directory.
#[test]
fn a_relative_data_path_is_recorded_absolute() {
    let root = tempfile::tempdir().unwrap();
    fixture(root.path());
    let o = bin()
        .current_dir(root.path())
        .args([
            "train",
            "--data",
            "data",
            "--out",
            "run",
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--hidden",
            "16",
            "--threads",
            "1",
            "--quiet",
        ])
        .output()
        .unwrap();
    ok(&o);
    let run = root.path().join("run");
    let config: toml::Table = std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let recorded = PathBuf::from(config["data"].as_str().unwrap());
    assert!(recorded.is_absolute(), "{recorded:?}");
    assert_eq!(recorded, root.path().join("data"));
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = bin()
        .current_dir(&elsewhere)
        .arg("eval")
        .arg(&run)
        .output()
        .unwrap();
    ok(&o);

    // The same for a study file's relative data path.
    std::fs::write(
        root.path().join("s.toml"),
        "name = \"s\"\nseeds = [0]\n[base]\ndata = \"data\"\nepochs = 1\nhidden = [16]\nbatch-size = 64\nthreads = 1\n[[arm]]\nname = \"a\"\nsettings = {}\n",
    )
    .unwrap();
    let o = bin()
        .current_dir(root.path())
        .args(["study", "s.toml", "--out", "study", "--quiet"])
        .output()
        .unwrap();
    ok(&o);
    let config: toml::Table =
        std::fs::read_to_string(root.path().join("study/runs/a/seed-0/config.toml"))
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(
        PathBuf::from(config["data"].as_str().unwrap()),
        root.path().join("data")
    );
}
