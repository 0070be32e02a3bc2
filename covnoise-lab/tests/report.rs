//! Run directories: loading, errors for broken ones, and plots of them.

use std::fs;
use std::path::{Path, PathBuf};

use covnoise_lab::report::run_plots::{
    BandSeries, SeedLines, plot_bands, plot_bars, plot_runs, plot_seed_lines,
};
use covnoise_lab::report::runs::{
    DivergedInfo, EpochMetrics, RunRecord, RunStatus, RunSummary, load_run, mean_std,
};

const CONFIG: &str = r#"
batch-size = 4096
lr = 0.1
noise = "diag"
estimator = "exact"
seed = 3
epochs = 3
hidden = [256, 128]

[meta]
version = "0.1.0"
git-commit = "abc123"
"#;

/// A metrics line as the trainer writes it, plus an unknown field that
/// readers must ignore.
fn metrics_line(epoch: u64, train_loss: f64, test_accuracy: f64) -> String {
    format!(
        r#"{{"epoch": {epoch}, "lr": 0.1, "train_loss": {train_loss}, "train_accuracy": 0.8, "test_loss": 0.5, "test_accuracy": {test_accuracy}, "noise_trace": 1.5, "seconds": 2.0, "eval_seconds": 0.5, "steps": {}, "future_field": [1, 2]}}"#,
        epoch * 10
    )
}

const SUMMARY: &str = r#"{
  "status": "completed", "test_accuracy": 0.87, "train_accuracy": 0.9,
  "train_loss": 0.3, "test_loss": 0.4, "epochs": 3, "steps": 30,
  "wall_seconds": 7.5, "seconds_per_epoch": 2.5, "seed": 3,
  "noise_scale": 0.06, "world_size": 2, "replicas_identical": true,
  "diverged": null, "hostname": "ignored"
}"#;

/// Writes a run directory `name` under `root` with the given files (`None`
/// leaves the file out) and returns its path.
fn write_run(
    root: &Path,
    name: &str,
    config: Option<&str>,
    metrics: Option<&str>,
    summary: Option<&str>,
) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    for (file, text) in [
        ("config.toml", config),
        ("metrics.jsonl", metrics),
        ("summary.json", summary),
    ] {
        if let Some(text) = text {
            fs::write(dir.join(file), text).unwrap();
        }
    }
    dir
}

fn three_epochs() -> String {
    [
        metrics_line(1, 1.2, 0.70),
        metrics_line(2, 0.6, 0.80),
        metrics_line(3, 0.3, 0.87),
    ]
    .join("\n")
        + "\n"
}

fn complete_run(root: &Path, name: &str) -> PathBuf {
    write_run(
        root,
        name,
        Some(CONFIG),
        Some(&three_epochs()),
        Some(SUMMARY),
    )
}

fn load_err(dir: &Path) -> String {
    // `{:#}` prints any context chain too: the whole must still be one line.
    let message = format!("{:#}", load_run(dir).unwrap_err());
    assert!(!message.contains('\n'), "not one line: {message:?}");
    message
}

#[test]
fn loads_a_complete_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = complete_run(tmp.path(), "diag");
    let run = load_run(&dir).unwrap();

    assert_eq!(run.dir, dir);
    assert_eq!(run.label, "noise=diag, B=4096, lr=0.1, seed=3");
    assert_eq!(run.config["estimator"].as_str(), Some("exact"));
    assert_eq!(run.config["meta"]["git-commit"].as_str(), Some("abc123"));

    assert_eq!(run.metrics.len(), 3);
    assert_eq!(
        run.metrics[1],
        EpochMetrics {
            epoch: 2,
            lr: 0.1,
            train_loss: 0.6,
            train_accuracy: 0.8,
            test_loss: 0.5,
            test_accuracy: 0.8,
            noise_trace: Some(1.5),
            seconds: 2.0,
            eval_seconds: 0.5,
            steps: 20,
            penalty: None,
        }
    );

    let summary = run.summary.unwrap();
    assert_eq!(summary.status, RunStatus::Completed);
    assert_eq!(summary.test_accuracy, 0.87);
    assert_eq!((summary.epochs, summary.steps, summary.seed), (3, 30, 3));
    assert_eq!(summary.world_size, 2);
    assert_eq!(summary.noise_scale, 0.06);
    assert_eq!(summary.replicas_identical, Some(true));
    assert_eq!(summary.diverged, None);
}

#[test]
fn killed_run_has_no_summary_and_keeps_epochs_before_a_cut_off_line() {
    let tmp = tempfile::tempdir().unwrap();
    // Killed while writing epoch 3: half a line, no final newline.
    let mut metrics = [metrics_line(1, 1.2, 0.7), metrics_line(2, 0.6, 0.8)].join("\n");
    metrics.push('\n');
    metrics.push_str(&metrics_line(3, 0.3, 0.87)[..40]);
    let dir = write_run(tmp.path(), "killed", Some(CONFIG), Some(&metrics), None);
    let run = load_run(&dir).unwrap();
    assert!(run.summary.is_none());
    assert_eq!(run.metrics.len(), 2);
}

#[test]
fn diverged_run_reads_null_values_as_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = metrics_line(1, 1.2, 0.5)
        + "\n"
        + r#"{"epoch": 2, "lr": 0.1, "train_loss": null, "train_accuracy": null, "test_loss": null, "test_accuracy": null, "noise_trace": null, "seconds": 1.0, "eval_seconds": 0.5, "steps": 15}"#
        + "\n";
    let summary = r#"{"status": "diverged", "test_accuracy": null, "train_accuracy": null,
        "train_loss": null, "test_loss": null, "epochs": 2, "steps": 15,
        "wall_seconds": 3.0, "seconds_per_epoch": 1.5, "seed": 0, "noise_scale": 0.0,
        "world_size": 1, "replicas_identical": null,
        "diverged": {"step": 15, "epoch": 2, "last_finite_loss": 9.5, "message": "loss is NaN at step 15"}}"#;
    let dir = write_run(
        tmp.path(),
        "blowup",
        Some("lr = 10.0\n"),
        Some(&metrics),
        Some(summary),
    );
    let run = load_run(&dir).unwrap();

    assert_eq!(run.label, "lr=10.0");
    assert_eq!(run.metrics.len(), 2);
    assert!(run.metrics[1].train_loss.is_nan());
    assert!(run.metrics[1].test_accuracy.is_nan());
    assert_eq!(run.metrics[1].noise_trace, None);
    let summary = run.summary.unwrap();
    assert_eq!(summary.status, RunStatus::Diverged);
    assert!(summary.test_accuracy.is_nan());
    assert_eq!(summary.replicas_identical, None);
    assert_eq!(
        summary.diverged,
        Some(DivergedInfo {
            step: 15,
            epoch: 2,
            last_finite_loss: Some(9.5),
            message: "loss is NaN at step 15".to_string(),
        })
    );
}

#[test]
fn written_structs_read_back_including_nan() {
    // The trainer writes with these structs; NaN becomes null and back.
    let m = EpochMetrics {
        epoch: 1,
        lr: 0.1,
        train_loss: f64::NAN,
        train_accuracy: 0.25,
        test_loss: f64::INFINITY,
        test_accuracy: 0.5,
        noise_trace: None,
        seconds: 1.0,
        eval_seconds: 0.25,
        steps: 7,
        penalty: None,
    };
    let line = serde_json::to_string(&m).unwrap();
    assert!(line.contains(r#""train_loss":null"#), "{line}");
    assert!(line.contains(r#""noise_trace":null"#), "{line}");
    let back: EpochMetrics = serde_json::from_str(&line).unwrap();
    assert!(back.train_loss.is_nan() && back.test_loss.is_nan());
    assert_eq!((back.epoch, back.steps, back.test_accuracy), (1, 7, 0.5));

    let s = RunSummary {
        status: RunStatus::Diverged,
        test_accuracy: 0.1,
        train_accuracy: 0.1,
        train_loss: f64::NAN,
        test_loss: f64::NAN,
        epochs: 1,
        steps: 7,
        wall_seconds: 1.0,
        seconds_per_epoch: 1.0,
        seed: 0,
        noise_scale: 0.0,
        world_size: 1,
        replicas_identical: None,
        diverged: Some(DivergedInfo {
            step: 7,
            epoch: 1,
            last_finite_loss: Some(2.3),
            message: "loss is NaN".to_string(),
        }),
        checkpoint_seconds: 0.0,
        checkpoint_bytes: 0,
        fisher_trace: None,
    };
    let text = serde_json::to_string(&s).unwrap();
    assert!(text.contains(r#""status":"diverged""#), "{text}");
    let back: RunSummary = serde_json::from_str(&text).unwrap();
    assert_eq!(back.diverged, s.diverged);
    assert!(back.train_loss.is_nan());
}

#[test]
fn label_falls_back_to_the_directory_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(
        tmp.path(),
        "my-run",
        Some("epochs = 3\n"),
        Some(&three_epochs()),
        None,
    );
    assert_eq!(load_run(&dir).unwrap().label, "my-run");
}

#[test]
fn missing_directory_and_files_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("gone");
    assert_eq!(
        load_err(&gone),
        format!("run directory {} does not exist", gone.display())
    );

    let no_config = write_run(tmp.path(), "a", None, Some(&three_epochs()), None);
    let message = load_err(&no_config);
    assert!(
        message.starts_with(&format!(
            "{}: not found",
            no_config.join("config.toml").display()
        )),
        "{message}"
    );

    let no_metrics = write_run(tmp.path(), "b", Some(CONFIG), None, Some(SUMMARY));
    let message = load_err(&no_metrics);
    assert!(
        message.starts_with(&format!(
            "{}: not found",
            no_metrics.join("metrics.jsonl").display()
        )),
        "{message}"
    );

    let file = tmp.path().join("plain-file");
    fs::write(&file, "").unwrap();
    assert!(load_err(&file).ends_with("is not a directory"));
}

#[test]
fn corrupt_files_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();

    // A bad line in the middle (terminated, so not a cut-off write).
    let metrics = metrics_line(1, 1.2, 0.7)
        + "\n"
        + r#"{"epoch": 2, "lr": oops}"#
        + "\n"
        + &metrics_line(3, 0.3, 0.87)
        + "\n";
    let dir = write_run(tmp.path(), "bad-json", Some(CONFIG), Some(&metrics), None);
    let message = load_err(&dir);
    let file = dir.join("metrics.jsonl").display().to_string();
    assert!(
        message.starts_with(&format!("{file}: line 2 column")),
        "{message}"
    );
    assert!(message.contains("expected value"), "{message}");

    let metrics = metrics_line(1, 1.2, 0.7) + "\n" + r#"{"epoch": 2}"# + "\n";
    let dir = write_run(
        tmp.path(),
        "missing-field",
        Some(CONFIG),
        Some(&metrics),
        None,
    );
    let message = load_err(&dir);
    assert!(message.contains("metrics.jsonl: line 2"), "{message}");
    assert!(message.contains("missing field `lr`"), "{message}");

    let metrics = metrics_line(2, 1.2, 0.7) + "\n" + &metrics_line(2, 0.6, 0.8) + "\n";
    let dir = write_run(tmp.path(), "repeat", Some(CONFIG), Some(&metrics), None);
    let message = load_err(&dir);
    assert!(
        message.ends_with("metrics.jsonl: line 2: epoch 2 follows epoch 2; epochs must increase"),
        "{message}"
    );

    let metrics = metrics_line(1, 1.2, 87.0) + "\n";
    let dir = write_run(tmp.path(), "percent", Some(CONFIG), Some(&metrics), None);
    let message = load_err(&dir);
    assert!(
        message.ends_with("metrics.jsonl: line 1: test_accuracy 87 is outside [0, 1]"),
        "{message}"
    );

    let dir = write_run(
        tmp.path(),
        "bad-toml",
        Some("lr = 0.1\nseed = = 3\n"),
        Some(&three_epochs()),
        None,
    );
    let message = load_err(&dir);
    assert!(
        message.starts_with(&format!("{}: line 2:", dir.join("config.toml").display())),
        "{message}"
    );

    let dir = write_run(
        tmp.path(),
        "bad-summary",
        Some(CONFIG),
        Some(&three_epochs()),
        Some(r#"{"status": "exploded"}"#),
    );
    let message = load_err(&dir);
    assert!(
        message.starts_with(&format!(
            "{}: line 1 column",
            dir.join("summary.json").display()
        )),
        "{message}"
    );
    assert!(message.contains("unknown variant `exploded`"), "{message}");
}

#[test]
fn mean_std_matches_hand_values() {
    // Mean 5; squared deviations sum to 32; sample variance 32 / 7.
    let (mean, std) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    assert!((mean - 5.0).abs() < 1e-12);
    assert!((std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);

    assert!((mean_std(&[0.9, 0.8]).0 - 0.85).abs() < 1e-12);
    assert!((mean_std(&[0.9, 0.8]).1 - 0.005f64.sqrt()).abs() < 1e-12);
    assert_eq!(mean_std(&[0.42]), (0.42, 0.0));
    let (m, s) = mean_std(&[]);
    assert!(m.is_nan() && s.is_nan());
    // Close values: the two-pass form has no cancellation.
    let (m, s) = mean_std(&[1e9 + 1.0, 1e9 + 2.0, 1e9 + 3.0]);
    assert_eq!((m, s), (1e9 + 2.0, 1.0));
}

/// Whether plots can be drawn here: plotters lays out text (SVG's too) with
/// a TrueType font, which a bare system may lack (fonts-dejavu-core).
fn fonts_available() -> bool {
    match covnoise_lab::report::font::ensure_fonts() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping plot checks: {e}");
            false
        }
    }
}

fn assert_svg(path: &Path) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains("<svg"), "{} is not SVG", path.display());
    assert!(text.len() > 1000, "{} is nearly empty", path.display());
}

fn assert_png(path: &Path) {
    let bytes = fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "{} is not PNG",
        path.display()
    );
    assert!(bytes.len() > 1000, "{} is nearly empty", path.display());
}

fn two_runs(root: &Path) -> Vec<RunRecord> {
    let a = load_run(&complete_run(root, "a")).unwrap();
    let metrics = metrics_line(1, 1.0, 0.6) + "\n" + &metrics_line(2, 0.8, 0.7) + "\n";
    let b = load_run(&write_run(
        root,
        "b",
        Some("noise = \"none\"\n"),
        Some(&metrics),
        None,
    ))
    .unwrap();
    vec![a, b]
}

#[test]
fn plot_runs_writes_svg_and_png() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = two_runs(tmp.path());
    if !fonts_available() {
        return;
    }

    let svg = tmp.path().join("runs.svg");
    plot_runs(&runs, &svg).unwrap();
    assert_svg(&svg);
    let text = fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("noise=diag, B=4096, lr=0.1, seed=3"),
        "legend label missing"
    );
    assert!(text.contains("noise=none"), "legend label missing");

    let png = tmp.path().join("runs.png");
    plot_runs(&runs, &png).unwrap();
    assert_png(&png);
}

#[test]
fn plot_runs_draws_diverged_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = metrics_line(1, 1.2, 0.5)
        + "\n"
        + r#"{"epoch": 2, "lr": 0.1, "train_loss": null, "train_accuracy": null, "test_loss": null, "test_accuracy": null, "noise_trace": null, "seconds": 1.0, "eval_seconds": 0.5, "steps": 15}"#
        + "\n";
    let dir = write_run(tmp.path(), "nan", Some(CONFIG), Some(&metrics), None);
    let runs = vec![load_run(&dir).unwrap()];
    if !fonts_available() {
        return;
    }
    let svg = tmp.path().join("nan.svg");
    plot_runs(&runs, &svg).unwrap();
    assert_svg(&svg);
}

#[test]
fn plot_runs_rejects_other_formats_and_empty_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = two_runs(tmp.path());

    let jpg = tmp.path().join("runs.jpg");
    let message = format!("{:#}", plot_runs(&runs, &jpg).unwrap_err());
    assert_eq!(
        message,
        format!("plot file {} must end in .png or .svg", jpg.display())
    );
    assert!(!jpg.exists());

    let nowhere = tmp.path().join("no-such-dir").join("runs.svg");
    let message = format!("{:#}", plot_runs(&runs, &nowhere).unwrap_err());
    assert!(message.contains("does not exist"), "{message}");

    let empty = write_run(tmp.path(), "empty", Some(CONFIG), Some(""), None);
    let mut runs = runs;
    runs.push(load_run(&empty).unwrap());
    let message = format!(
        "{:#}",
        plot_runs(&runs, &tmp.path().join("x.svg")).unwrap_err()
    );
    assert!(
        message.starts_with("run noise=diag, B=4096, lr=0.1, seed=3 ("),
        "{message}"
    );
    assert!(message.contains("has no epochs"), "{message}");
}

#[test]
fn band_and_bar_plots_write_files() {
    let tmp = tempfile::tempdir().unwrap();
    let series = vec![
        BandSeries {
            label: "none".to_string(),
            x: vec![1.0, 2.0, 3.0],
            mean: vec![0.6, 0.7, 0.75],
            std: vec![0.02, 0.01, 0.015],
        },
        BandSeries {
            label: "diag".to_string(),
            x: vec![1.0, 2.0, 3.0],
            mean: vec![0.62, 0.74, 0.8],
            std: vec![0.0, f64::NAN, 0.01],
        },
    ];
    let labels = vec!["none".to_string(), "diag".to_string(), "full".to_string()];
    let (means, stds) = (vec![0.75, 0.8, 0.81], vec![0.01, 0.005, f64::NAN]);

    let mut bad = series.clone();
    bad[1].std.pop();
    let message = plot_bands(&bad, "t", "y", &tmp.path().join("b.svg"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "series diag: x, mean and std have different lengths (3, 3, 2)"
    );
    let message = plot_bars(
        &labels,
        &means[..2],
        &stds,
        "t",
        "y",
        &tmp.path().join("c.svg"),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        message,
        "labels, means and stds have different lengths (3, 2, 3)"
    );
    assert!(plot_bars(&labels, &means, &stds, "t", "y", &tmp.path().join("c.gif")).is_err());

    if !fonts_available() {
        return;
    }
    let svg = tmp.path().join("bands.svg");
    plot_bands(&series, "test accuracy over 3 seeds", "test accuracy", &svg).unwrap();
    assert_svg(&svg);
    let svg = tmp.path().join("bars.svg");
    plot_bars(
        &labels,
        &means,
        &stds,
        "final test accuracy",
        "test accuracy",
        &svg,
    )
    .unwrap();
    assert_svg(&svg);
    assert!(
        fs::read_to_string(&svg).unwrap().contains("full"),
        "arm label missing"
    );

    let png = tmp.path().join("bands.png");
    plot_bands(&series, "test accuracy over 3 seeds", "test accuracy", &png).unwrap();
    assert_png(&png);
    let png = tmp.path().join("bars.png");
    plot_bars(
        &labels,
        &means,
        &stds,
        "final test accuracy",
        "test accuracy",
        &png,
    )
    .unwrap();
    assert_png(&png);
}

#[test]
fn seed_line_plots_draw_every_seed_and_name_each_arm_once() {
    let tmp = tempfile::tempdir().unwrap();
    let line = |ys: &[f64]| -> Vec<(f64, f64)> {
        ys.iter()
            .enumerate()
            .map(|(i, &y)| (100.0 * (i + 1) as f64, y))
            .collect()
    };
    let groups = vec![
        SeedLines {
            label: "arm-small".to_string(),
            // Three seeds, one with an unevaluated epoch (two pieces).
            lines: vec![
                line(&[60.0, 70.0, 75.0]),
                line(&[61.0, f64::NAN, 76.0, 77.0]),
                line(&[59.0, 69.0, 74.0]),
            ],
        },
        SeedLines {
            label: "arm-large".to_string(),
            // One seed collapsed to chance, one diverged at once (no point).
            lines: vec![line(&[50.0, 10.0, 10.0]), line(&[f64::NAN, f64::NAN])],
        },
    ];
    let nothing = vec![SeedLines {
        label: "x".to_string(),
        lines: vec![line(&[f64::NAN])],
    }];
    let message = plot_seed_lines(&nothing, "t", "step", "y", &tmp.path().join("n.svg"))
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("no finite point to plot"), "{message}");
    assert!(plot_seed_lines(&[], "t", "step", "y", &tmp.path().join("e.svg")).is_err());
    assert!(plot_seed_lines(&groups, "t", "step", "y", &tmp.path().join("g.gif")).is_err());
    if !fonts_available() {
        return;
    }
    let svg = tmp.path().join("seeds.svg");
    plot_seed_lines(
        &groups,
        "per seed",
        "optimizer steps",
        "test accuracy (%)",
        &svg,
    )
    .unwrap();
    assert_svg(&svg);
    let text = fs::read_to_string(&svg).unwrap();
    // One legend entry per arm, however many seeds it has.
    assert_eq!(text.matches("arm-small").count(), 1, "{text}");
    assert_eq!(text.matches("arm-large").count(), 1, "{text}");
    assert!(text.contains("optimizer steps"));
    // Every piece of every seed is a line of its own in its arm's colour
    // (tab10's first two), plus one legend sample per arm; no band polygon.
    let lines_in = |colour: &str| {
        text.matches(&format!(
            "<polyline fill=\"none\" opacity=\"1\" stroke=\"{colour}\""
        ))
        .count()
    };
    assert_eq!(
        (lines_in("#1F77B4"), lines_in("#FF7F0E")),
        (4 + 1, 1 + 1),
        "{text}"
    );
    assert!(!text.contains("<polygon"), "{text}");
    let png = tmp.path().join("seeds.png");
    plot_seed_lines(&groups, "per seed", "epoch", "test accuracy (%)", &png).unwrap();
    assert_png(&png);
}
