//! Studies: validation before anything runs, resuming, and aggregation.

use std::path::{Path, PathBuf};

use covnoise_lab::study::{StudyEvent, StudySpec, aggregate, run_study};
use covnoise_lab::train::{EpochMetrics, RunStatus, RunSummary, Silent, TrainSettings};

mod common;

fn fixture(root: &Path) -> PathBuf {
    common::write_fashion_fixture(&root.join("data"), 256, 64)
}

fn spec_text(data: &Path, lr_grid: &str) -> String {
    format!(
        r#"
name = "t"
seeds = [0, 1]
[search]
epochs = 1
holdout = 64
[base]
data = "{}"
epochs = 1
warmup-epochs = 0
hidden = [16]
threads = 1
[[arm]]
name = "small"
settings = {{ batch-size = 32 }}
grid = {{ lr = {lr_grid} }}
[[arm]]
name = "large noisy"
settings = {{ batch-size = 64, lr = 0.1, noise = "diag", small-batch = 16 }}
"#,
        data.display()
    )
}

#[test]
fn a_bad_arm_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let spec = StudySpec::from_toml(&spec_text(&data, "[0.1, -0.2]")).unwrap();
    let err = spec.plan().unwrap_err().to_string();
    assert!(
        err.contains("arm \"small\"") && err.contains("lr=-0.2") && err.contains("lr"),
        "{err}"
    );
    // Through the command line: one line, non-zero, nothing created.
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, spec_text(&data, "[0.1, -0.2]")).unwrap();
    let out = tmp.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_covnoise"))
        .args([
            "study",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("small") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(!out.exists());
    // A typo in a setting name is an error too.
    let typo = spec_text(&data, "[0.1]").replace("batch-size = 64", "batchsize = 64");
    let err = StudySpec::from_toml(&typo)
        .unwrap()
        .plan()
        .unwrap_err()
        .to_string();
    assert!(err.contains("batchsize"), "{err}");
    // One process has one thread pool: an arm cannot ask for its own.
    let threads =
        spec_text(&data, "[0.1]").replace("batch-size = 64,", "batch-size = 64, threads = 2,");
    let err = StudySpec::from_toml(&threads)
        .unwrap()
        .plan()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("large noisy") && err.contains("threads"),
        "{err}"
    );
}

fn run(spec: &StudySpec, out: &Path) -> (Vec<String>, Vec<String>) {
    run_with(spec, out, 1)
}

fn run_with(spec: &StudySpec, out: &Path, workers: usize) -> (Vec<String>, Vec<String>) {
    let (mut started, mut skipped) = (Vec::new(), Vec::new());
    let mut on_event = |e: StudyEvent| match e {
        StudyEvent::Start { dir, .. } => started.push(dir.display().to_string()),
        StudyEvent::Skip { dir } => skipped.push(dir.display().to_string()),
        _ => {}
    };
    run_study(spec, out, workers, &mut Silent, &mut on_event).unwrap();
    (started, skipped)
}

/// Every run's per-epoch metrics with the wall-clock fields removed.
fn run_metrics(out: &Path) -> Vec<(String, Vec<serde_json::Value>)> {
    let mut runs = Vec::new();
    for arm in std::fs::read_dir(out.join("runs")).unwrap() {
        for run in std::fs::read_dir(arm.unwrap().path()).unwrap() {
            let dir = run.unwrap().path();
            let lines = common::metrics_without_times(&dir);
            let name = dir.strip_prefix(out).unwrap().display().to_string();
            runs.push((name, lines));
        }
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    runs
}

#[test]
fn parallel_workers_give_the_same_runs_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let spec = StudySpec::from_toml(&spec_text(&data, "[0.05, 0.1]")).unwrap();
    let (one, three) = (tmp.path().join("one"), tmp.path().join("three"));
    run_with(&spec, &one, 1);
    let (started, skipped) = run_with(&spec, &three, 3);
    assert_eq!((started.len(), skipped.len()), (6, 0));
    let (a, b) = (run_metrics(&one), run_metrics(&three));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "a run's metrics depend on the number of workers");
    // Resuming with workers reuses finished runs and redoes only the killed one.
    let killed = three.join("runs/small/search-1");
    std::fs::remove_file(killed.join("summary.json")).unwrap();
    let (started, skipped) = run_with(&spec, &three, 2);
    assert_eq!(started, vec![killed.display().to_string()]);
    assert_eq!(skipped.len(), 5);
    let read = |out: &Path| std::fs::read_to_string(out.join("study.md")).unwrap();
    // Without the timing: the main table's s/epoch, ms/step and step cost
    // columns (its 13th to 15th of 16) and the line saying how many threads
    // each run had.
    let strip_times = |t: String| {
        t.lines()
            .filter(|l| !l.starts_with("Final runs:"))
            .map(|l| {
                let mut cells: Vec<&str> = l.split('|').collect();
                if cells.len() == 18 {
                    cells.drain(13..16);
                }
                cells.join("|")
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip_times(read(&one)), strip_times(read(&three)));
    // A run recorded before a setting existed (here eval-every, at its
    // default) is the same run and is reused.
    let old = three.join("runs/small/search-0/config.toml");
    let text = std::fs::read_to_string(&old).unwrap();
    assert!(text.contains("eval-every = 1"));
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("eval-every"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&old, text).unwrap();
    let (started, skipped) = run_with(&spec, &three, 1);
    assert_eq!((started.len(), skipped.len()), (0, 6));
}

#[test]
fn a_killed_study_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let spec = StudySpec::from_toml(&spec_text(&data, "[0.05, 0.1]")).unwrap();
    let out = tmp.path().join("out");
    let (started, skipped) = run(&spec, &out);
    // 2 search runs + 2 seeds for "small", 2 seeds for "large noisy".
    assert_eq!((started.len(), skipped.len()), (6, 0));
    for f in [
        "study.md",
        "study.json",
        "study-curves-epochs.png",
        "study-curves-steps.png",
        "study-final.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The trained runs recorded their final Fisher trace, and the table
    // shows it for both arms (no batch norm).
    let md = std::fs::read_to_string(out.join("study.md")).unwrap();
    for arm in ["small", "large noisy"] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {arm} |")))
            .unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[12].contains('e') && cells[12] != "–", "{row}");
    }
    // Simulate a kill during one run: its summary is missing.
    let killed = out.join("runs/large-noisy/seed-1");
    std::fs::remove_file(killed.join("summary.json")).unwrap();
    let (started, skipped) = run(&spec, &out);
    assert_eq!(started, vec![killed.display().to_string()]);
    assert_eq!(skipped.len(), 5);
    // A run directory made with other settings is not silently reused.
    let other = StudySpec::from_toml(
        &spec_text(&data, "[0.05, 0.1]").replace("lr = 0.1, noise", "lr = 0.2, noise"),
    )
    .unwrap();
    let mut ignore = |_: StudyEvent| {};
    let err = run_study(&other, &out, 1, &mut Silent, &mut ignore)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
}

fn write_run(dir: &Path, accs: &[f64], final_acc: f64, status: RunStatus) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), "lr = 0.1\n").unwrap();
    let lines: Vec<String> = accs
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            serde_json::to_string(&EpochMetrics {
                epoch: i + 1,
                lr: 0.1,
                train_loss: 1.0,
                train_accuracy: a,
                test_loss: 1.0,
                test_accuracy: a,
                noise_trace: None,
                seconds: 2.0,
                eval_seconds: 0.1,
                steps: 10 * (i as u64 + 1),
                penalty: None,
            })
            .unwrap()
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let summary = RunSummary {
        status,
        test_accuracy: final_acc,
        train_accuracy: final_acc + 0.05,
        train_loss: 0.3,
        test_loss: 0.4,
        epochs: accs.len(),
        steps: 10 * accs.len() as u64,
        wall_seconds: 5.0,
        seconds_per_epoch: 2.0,
        seed: 0,
        noise_scale: 0.01,
        world_size: 1,
        replicas_identical: None,
        diverged: None,
        checkpoint_seconds: 0.0,
        checkpoint_bytes: 0,
        fisher_trace: Some(1.5),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string(&summary).unwrap(),
    )
    .unwrap();
}

#[test]
fn aggregation_computes_mean_std_and_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("s{i}"))).collect();
    write_run(&dirs[0], &[0.5, 0.80], 0.80, RunStatus::Completed);
    write_run(&dirs[1], &[0.6, 0.84], 0.84, RunStatus::Completed);
    write_run(&dirs[2], &[0.1], f64::NAN, RunStatus::Diverged);
    let spec =
        StudySpec::from_toml("name = \"agg\"\nseeds = [0, 1, 2]\n[[arm]]\nname = \"a\"\n").unwrap();
    let settings = TrainSettings::default();
    let report = aggregate(
        &spec,
        vec![("a".into(), String::new(), settings, vec![], dirs)],
        2,
        1,
    )
    .unwrap();
    let arm = &report.arms[0];
    assert_eq!((arm.completed, arm.diverged), (2, 1));
    // Mean 0.82, sample std sqrt(((0.02)^2 * 2) / 1) = 0.028284.
    assert!((arm.test_accuracy.mean - 0.82).abs() < 1e-12);
    assert!((arm.test_accuracy.std - 0.02 * 2f64.sqrt()).abs() < 1e-12);
    assert!((arm.train_accuracy.mean - 0.87).abs() < 1e-12);
    // Per-epoch curve over completed seeds: epoch 2 has mean 0.82.
    assert_eq!(arm.curve.len(), 2);
    assert!((arm.curve[1].1.mean - 0.82).abs() < 1e-12);
    let md = report.markdown();
    // Epochs and steps are the completed runs' own (2 epochs of 10 steps).
    assert!(md.contains("| a | 4096 | 0.2 | 2 | 20 | none |"), "{md}");
    assert!(md.contains("82.00 ± 2.83"), "{md}");
    assert!(md.contains("2/3"), "{md}");
    // The seconds column says what it is.
    assert!(
        md.contains("s/epoch (1 thr)") && md.contains("2 run(s) trained at once"),
        "{md}"
    );
}

#[test]
fn step_cost_is_relative_to_the_plain_arm_at_the_same_batch_size() {
    use covnoise::noise::StructureName;
    let tmp = tempfile::tempdir().unwrap();
    // One run per arm; the summary's seconds per epoch set its ms/step
    // (10 steps per epoch): 2 s -> 200 ms, 3 s -> 300 ms.
    let run = |name: &str, seconds_per_epoch: f64| {
        let dir = tmp.path().join(name);
        write_run(&dir, &[0.5, 0.8], 0.8, RunStatus::Completed);
        let path = dir.join("summary.json");
        let mut summary: RunSummary =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        summary.seconds_per_epoch = seconds_per_epoch;
        std::fs::write(&path, serde_json::to_string(&summary).unwrap()).unwrap();
        dir
    };
    let with = |batch_size: usize, noise: StructureName| TrainSettings {
        batch_size,
        noise,
        ..TrainSettings::default()
    };
    let arms = vec![
        (
            "plain".into(),
            String::new(),
            with(4096, StructureName::None),
            vec![],
            vec![run("p", 2.0)],
        ),
        (
            "noisy".into(),
            String::new(),
            with(4096, StructureName::Diag),
            vec![],
            vec![run("n", 3.0)],
        ),
        (
            "alone".into(),
            String::new(),
            with(256, StructureName::Diag),
            vec![],
            vec![run("a", 3.0)],
        ),
    ];
    let spec =
        StudySpec::from_toml("name = \"cost\"\nseeds = [0]\n[[arm]]\nname = \"a\"\n").unwrap();
    let report = aggregate(&spec, arms, 1, 2).unwrap();
    assert!((report.arms[0].ms_per_step.mean - 200.0).abs() < 1e-9);
    assert!((report.arms[1].ms_per_step.mean - 300.0).abs() < 1e-9);
    let md = report.markdown();
    let row = |name: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row {name} in {md}"))
            .to_string()
    };
    assert!(row("plain").contains("| 200.00 | 1.00x |"), "{md}");
    assert!(row("noisy").contains("| 300.00 | 1.50x |"), "{md}");
    // No arm without noise at batch 256: no baseline, no ratio.
    assert!(row("alone").contains("| 300.00 | – |"), "{md}");
    assert!(md.contains("ms/step | step cost"), "{md}");
}

/// Rewrites the summary of the run in `dir` with `edit`.
fn edit_summary(dir: &Path, edit: impl FnOnce(&mut RunSummary)) {
    let path = dir.join("summary.json");
    let mut summary: RunSummary =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut summary);
    std::fs::write(&path, serde_json::to_string(&summary).unwrap()).unwrap();
}

#[test]
fn the_table_decomposes_the_gap_per_seed_and_the_plots_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("s{i}"))).collect();
    // Seed 0: train 95 %, test 80 %; seed 1: train 90 %, test 84 %; seed 2
    // diverged (left out of the spreads, listed per seed).
    let finals = [(0.80, 0.95, 1.5), (0.84, 0.90, 2.5)];
    for (i, &(test, train, trace)) in finals.iter().enumerate() {
        write_run(&dirs[i], &[0.5, test], test, RunStatus::Completed);
        edit_summary(&dirs[i], |s| {
            s.seed = i as u64;
            s.train_accuracy = train;
            s.fisher_trace = Some(trace);
        });
    }
    write_run(&dirs[2], &[0.1, f64::NAN], f64::NAN, RunStatus::Diverged);
    edit_summary(&dirs[2], |s| {
        s.seed = 2;
        s.fisher_trace = None;
    });
    // An arm whose run predates the Fisher trace: its summary lacks the field.
    let old = tmp.path().join("old");
    write_run(&old, &[0.5, 0.7], 0.7, RunStatus::Completed);
    let text = std::fs::read_to_string(old.join("summary.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value.as_object_mut().unwrap().remove("fisher_trace");
    std::fs::write(old.join("summary.json"), value.to_string()).unwrap();

    // The reference, read from the run directories' summaries directly:
    // the gap per completed seed, then its mean and sample std.
    let gaps: Vec<f64> = dirs[..2]
        .iter()
        .map(|d| {
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                    .unwrap();
            s["train_accuracy"].as_f64().unwrap() - s["test_accuracy"].as_f64().unwrap()
        })
        .collect();
    let gap_mean = (gaps[0] + gaps[1]) / 2.0;
    let gap_std = ((gaps[0] - gap_mean).powi(2) + (gaps[1] - gap_mean).powi(2)).sqrt();

    let spec =
        StudySpec::from_toml("name = \"gap\"\nseeds = [0, 1, 2]\n[[arm]]\nname = \"a\"\n").unwrap();
    let arms = vec![
        (
            "a".into(),
            String::new(),
            TrainSettings::default(),
            vec![],
            dirs.clone(),
        ),
        (
            "old".into(),
            String::new(),
            TrainSettings::default(),
            vec![],
            vec![old],
        ),
    ];
    let report = aggregate(&spec, arms, 1, 1).unwrap();
    let arm = &report.arms[0];
    assert!((arm.gap.mean - gap_mean).abs() < 1e-12, "{:?}", arm.gap);
    assert!((arm.gap.std - gap_std).abs() < 1e-12, "{:?}", arm.gap);
    // Not the gap of the means' difference with the diverged seed's NaN.
    assert!(arm.gap.mean.is_finite());
    let trace = arm.fisher_trace.unwrap();
    assert!((trace.mean - 2.0).abs() < 1e-12 && (trace.std - 0.5f64.sqrt()).abs() < 1e-12);
    assert_eq!((arm.steps.mean, arm.epochs.mean), (20.0, 2.0));
    assert_eq!(arm.seeds.len(), 3);
    assert!(report.arms[1].fisher_trace.is_none());

    let md = report.markdown();
    let row = |name: &str| -> Vec<String> {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row {name} in {md}"))
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = row("arm");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let a = row("a");
    assert_eq!(a[col("epochs")], "2");
    assert_eq!(a[col("steps")], "20");
    assert_eq!(a[col("test acc")], "82.00 ± 2.83");
    assert_eq!(a[col("train acc")], "92.50 ± 3.54");
    assert_eq!(
        a[col("gap")],
        format!("{:.2} ± {:.2}", 100.0 * gap_mean, 100.0 * gap_std)
    );
    assert_eq!(a[col("gap")], "10.50 ± 6.36");
    assert_eq!(a[col("train loss")], "0.3000 ± 0.0000");
    assert_eq!(a[col("tr(F)")], "2.000e0 ± 7.1e-1");
    assert_eq!(row("old")[col("tr(F)")], "–");
    // One row per seed, the diverged one included.
    for line in [
        "| a | 0 | completed | 2 | 20 | 80.00 | 95.00 | 15.00 | 0.3000 | 1.500e0 |",
        "| a | 1 | completed | 2 | 20 | 84.00 | 90.00 | 6.00 | 0.3000 | 2.500e0 |",
        "| a | 2 | diverged | 2 | 20 | – | – | – | 0.3000 | – |",
        "| old | 0 | completed | 2 | 20 | 70.00 | 75.00 | 5.00 | 0.3000 | – |",
    ] {
        assert!(md.lines().any(|l| l == line), "no line {line} in {md}");
    }

    // Both curve plots and the final accuracies are written, as PNG, and
    // the markdown links them.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let written = report.write(&out).unwrap();
    for f in [
        "study-curves-epochs.png",
        "study-curves-steps.png",
        "study-final.png",
    ] {
        let bytes = std::fs::read(out.join(f)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{f} is not a PNG");
        assert!(written.contains(&out.join(f)), "{f} not reported");
        assert!(md.contains(&format!("]({f})")), "{f} not linked in {md}");
    }
}

/// `--arm NAME --seeds N` runs one arm's first N seeds in the whole study's
/// run directories, reports under its own file names (the whole study's
/// study.md is not replaced), and the whole study then reuses those runs;
/// an unknown arm or an impossible seed count is refused naming it.
#[test]
fn one_arm_with_its_first_seeds_runs_alone_and_the_whole_study_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let file = tmp.path().join("s.toml");
    std::fs::write(&file, spec_text(&data, "[0.1]")).unwrap();
    let out = tmp.path().join("out");
    let study = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_covnoise"))
            .args([
                "study",
                file.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, needle) in [
        (&["--arm", "tiny"][..], "\"small\", \"large noisy\""),
        (&["--seeds", "3"][..], "give 1 to 2"),
        (&["--seeds", "0"][..], "give 1 to 2"),
    ] {
        let o = study(extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(needle),
            "{extra:?}: {stderr}"
        );
        assert!(!out.exists());
    }
    let o = study(&["--arm", "large noisy", "--seeds", "1", "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let arm_dir = out.join("runs").join("large-noisy");
    let mut seeds: Vec<String> = std::fs::read_dir(&arm_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    seeds.sort();
    assert_eq!(seeds, ["seed-0"]);
    assert!(!out.join("runs").join("small").exists());
    assert!(out.join("study-arm-large-noisy-1-seeds.md").is_file());
    assert!(!out.join("study.md").exists());
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| large noisy |") && !table.contains("| small |"),
        "{table}"
    );
    // The whole study reuses the arm's run.
    let o = study(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!(
            "reusing finished run {}",
            arm_dir.join("seed-0").display()
        )),
        "{stderr}"
    );
    assert!(out.join("study.md").is_file());
}

/// `studies/peer-multinoise.toml` stays valid: every arm plans as written,
/// and its noisy arms run their first steps on a small stand-in data set
/// (the study's own 1,000-image, 3,000-step budget scaled down).
#[test]
fn the_peer_study_file_plans_and_its_arms_take_their_first_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../studies/peer-multinoise.toml");
    let mut spec = StudySpec::load(&file).unwrap();
    spec.set(&format!("data = \"{}\"", data.display())).unwrap();
    let plans = spec.plan().unwrap();
    assert_eq!(plans.len(), 7);
    // The fixture's test file has 64 images: train on 48 of them in full
    // batches of 48 (noise imitating batch 8), two steps, one seed.
    for assignment in [
        "train-limit = 48",
        "batch-size = 48",
        "small-batch = 8",
        "epochs = 2",
        "eval-every = 1",
        "checkpoint-every = 1",
    ] {
        spec.set(assignment).unwrap();
    }
    spec.first_seeds(1).unwrap();
    spec.arms.retain(|a| a.name != "sgd-50");
    let out = tmp.path().join("out");
    let (started, _) = run(&spec, &out);
    assert_eq!(started.len(), 6);
}
