//! `covnoise train` driven as a user would: real files on disk (small
//! synthetic IDX files in the Fashion-MNIST format), bad inputs, and
//! determinism.

use std::path::Path;
use std::process::Output;

mod common;
use common::runs::{bin, fixture};

const SMALL: &[&str] = &[
    "train",
    "--batch-size",
    "64",
    "--lr",
    "0.1",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--hidden",
    "32",
    "--threads",
    "1",
    "--quiet",
];

fn train(data: &Path, extra: &[&str]) -> Output {
    bin()
        .args(SMALL)
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, one line mentioning `needle`, no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
}

fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn one_epoch_writes_the_three_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let run = tmp.path().join("run");
    let o = train(
        &data,
        &[
            "--noise",
            "diag",
            "--small-batch",
            "16",
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let table: toml::Table = config.parse().unwrap();
    assert_eq!(table["batch-size"].as_integer(), Some(64));
    assert_eq!(table["noise"].as_str(), Some("diag"));
    assert!(table["meta"]["version"].is_str() && table["meta"]["git-commit"].is_str());
    // c = 1/16 - 1/64.
    let c = table["meta"]["noise-scale-c"].as_float().unwrap();
    assert!((c - (1.0 / 16.0 - 1.0 / 64.0)).abs() < 1e-12);
    let metrics = read_json_lines(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 1);
    for key in [
        "epoch",
        "lr",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "noise_trace",
        "seconds",
    ] {
        assert!(metrics[0].get(key).is_some(), "metrics lack {key}");
    }
    let acc = metrics[0]["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(metrics[0]["noise_trace"].as_f64().unwrap() > 0.0);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for key in [
        "test_accuracy",
        "train_accuracy",
        "train_loss",
        "test_loss",
        "epochs",
        "steps",
        "wall_seconds",
        "seed",
        "noise_scale",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["steps"], 8); // 512 / 64 steps, 1 epoch
    // The final model's Fisher trace (no batch norm: per-example gradients exist).
    let trace = summary["fisher_trace"].as_f64().unwrap();
    assert!(trace.is_finite() && trace > 0.0, "{trace}");
    assert!((summary["noise_scale"].as_f64().unwrap() - c).abs() < 1e-12);
}

#[test]
fn every_noise_structure_and_estimator_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    for extra in [
        &["--noise", "isotropic", "--small-batch", "16"][..],
        &["--noise", "full", "--small-batch", "16"],
        &["--noise", "full", "--centered", "--small-batch", "16"],
        &[
            "--noise",
            "diag",
            "--estimator",
            "microbatch",
            "--micro-batches",
            "4",
            "--small-batch",
            "16",
        ],
        &[
            "--noise",
            "diag",
            "--estimator",
            "mc-fisher",
            "--small-batch",
            "16",
            "--refresh",
            "3",
            "--ema",
            "0.9",
        ],
        &[
            "--noise",
            "diag",
            "--scale",
            "temperature",
            "--small-lr",
            "0.05",
            "--small-batch",
            "16",
        ],
        &[
            "--ghost-batch",
            "16",
            "--schedule",
            "multistep",
            "--milestones",
            "0",
            "--nesterov",
        ],
    ] {
        let o = train(&data, extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    }
}

#[test]
fn same_seed_gives_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let runs: Vec<Vec<serde_json::Value>> = ["a", "b"]
        .iter()
        .map(|name| {
            let run = tmp.path().join(name);
            let o = train(
                &data,
                &[
                    "--noise",
                    "diag",
                    "--small-batch",
                    "16",
                    "--epochs",
                    "2",
                    "--seed",
                    "7",
                    "--out",
                    run.to_str().unwrap(),
                ],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            read_json_lines(&run.join("metrics.jsonl"))
                .into_iter()
                .map(|mut m| {
                    // Wall-clock fields are the only ones allowed to differ.
                    let obj = m.as_object_mut().unwrap();
                    obj.remove("seconds");
                    obj.remove("eval_seconds");
                    m
                })
                .collect()
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    let other = tmp.path().join("c");
    let o = train(
        &data,
        &[
            "--noise",
            "diag",
            "--small-batch",
            "16",
            "--epochs",
            "2",
            "--seed",
            "8",
            "--out",
            other.to_str().unwrap(),
        ],
    );
    assert!(o.status.success());
    let m = read_json_lines(&other.join("metrics.jsonl"));
    assert_ne!(m[1]["train_loss"], runs[0][1]["train_loss"]);
}

/// `--micro-batch-passes each` forms the micro-batch estimator's gradients
/// from a pass per micro-batch instead of one pass over the batch: the same
/// steps up to float32 rounding (sums in another order, about 1e-7
/// relative per step; two epochs of 64-example steps keep the losses
/// within 1e-4, while a different noise draw or a wrong micro-batch
/// gradient moves them by percents) but not bit for bit, and the run's
/// config.toml records the choice.
#[test]
fn micro_batch_passes_each_trains_as_one_pass_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let losses: Vec<Vec<f64>> = ["one", "each"]
        .iter()
        .map(|how| {
            let run = tmp.path().join(how);
            let o = train(
                &data,
                &[
                    "--noise",
                    "diag",
                    "--estimator",
                    "microbatch",
                    "--micro-batches",
                    "4",
                    "--small-batch",
                    "16",
                    "--epochs",
                    "2",
                    "--seed",
                    "3",
                    "--micro-batch-passes",
                    how,
                    "--out",
                    run.to_str().unwrap(),
                ],
            );
            assert!(o.status.success(), "{how}: {}", stderr(&o));
            let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
            assert!(
                config.contains(&format!("micro-batch-passes = \"{how}\"")),
                "{config}"
            );
            read_json_lines(&run.join("metrics.jsonl"))
                .iter()
                .map(|m| m["train_loss"].as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(losses[0].len(), 2);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{:?}", losses);
    }
    // The two sum in different orders (measured: 2e-8 apart after one
    // epoch): equal bits would mean the flag never reached the step.
    assert_ne!(losses[0], losses[1], "the flag changed nothing");
}

#[test]
fn config_file_gives_settings_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "batch-size = 32\nnoise = \"diag\"\nsmall-batch = 8\nepochs = 1\n",
    )
    .unwrap();
    let run = tmp.path().join("run");
    let o = bin()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--batch-size",
            "128",
            "--hidden",
            "16",
            "--threads",
            "1",
            "--quiet",
            "--warmup-epochs",
            "0",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let table: toml::Table = std::fs::read_to_string(run.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(table["batch-size"].as_integer(), Some(128)); // flag wins
    assert_eq!(table["small-batch"].as_integer(), Some(8)); // from the file
    // Every flag must reach the settings: compare the record of a run given
    // every optional flag with the values passed.
    let all = tmp.path().join("all");
    let o = train(
        &data,
        &[
            "--holdout",
            "64",
            "--schedule-epochs",
            "2",
            "--train-limit",
            "500",
            "--test-limit",
            "100",
            "--ghost-batch",
            "16",
            "--small-lr",
            "0.01",
            "--noise-until",
            "3",
            "--ema",
            "0.5",
            "--out",
            all.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table: toml::Table = std::fs::read_to_string(all.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for (key, value) in [
        ("holdout", 64),
        ("schedule-epochs", 2),
        ("train-limit", 500),
        ("test-limit", 100),
        ("ghost-batch", 16),
        ("noise-until", 3),
    ] {
        assert_eq!(table[key].as_integer(), Some(value), "{key}");
    }
    assert_eq!(table["small-lr"].as_float(), Some(0.01));
    assert_eq!(table["ema"].as_float(), Some(0.5));
    assert_eq!(
        table["meta"]["test-examples"].as_integer(),
        Some(64),
        "holdout replaces the test set"
    );
    std::fs::write(&cfg, "batch-sise = 32\n").unwrap();
    let o = bin()
        .args(["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_clean_failure(&o, "batch-sise");
}

/// An edit of a file's bytes.
type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;

fn corrupt(data: &Path, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = data.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn bad_data_files_fail_before_training_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    assert_clean_failure(&train(&missing, &[]), "nowhere");

    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "train-images-idx3-ubyte",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 100)),
            "train-images-idx3-ubyte",
        ),
        (
            "t10k-images-idx3-ubyte",
            Box::new(|b: &mut Vec<u8>| b[3] = 0x01),
            "t10k-images-idx3-ubyte",
        ),
        (
            "train-labels-idx1-ubyte",
            Box::new(|b: &mut Vec<u8>| b[8 + 5] = 10),
            "label 10",
        ),
        // 511 labels for 512 images: header count and length both say 511.
        (
            "train-labels-idx1-ubyte",
            Box::new(|b: &mut Vec<u8>| {
                b[7] -= 1;
                b.pop();
            }),
            "train-labels-idx1-ubyte",
        ),
    ];
    for (i, (file, edit, needle)) in cases.into_iter().enumerate() {
        let root = tmp.path().join(format!("case{i}"));
        let data = fixture(&root);
        corrupt(&data, file, edit);
        let run = root.join("run");
        let o = train(&data, &["--out", run.to_str().unwrap()]);
        assert_clean_failure(&o, needle);
        assert!(
            !run.exists(),
            "a failed start must not create the run directory"
        );
    }
}

#[test]
fn impossible_settings_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    assert_clean_failure(&train(&data, &["--lr", "-0.1"]), "lr");
    assert_clean_failure(
        &train(&data, &["--noise", "diag", "--small-batch", "64"]),
        "B_S = 64",
    );
    assert_clean_failure(
        &train(&data, &["--noise", "diag", "--kappa", "-1"]),
        "kappa",
    );
    assert_clean_failure(
        &train(
            &data,
            &[
                "--noise",
                "diag",
                "--small-batch",
                "16",
                "--estimator",
                "microbatch",
                "--micro-batches",
                "1",
            ],
        ),
        "at least 2",
    );
    assert_clean_failure(
        &train(
            &data,
            &[
                "--noise",
                "diag",
                "--small-batch",
                "16",
                "--estimator",
                "microbatch",
                "--micro-batches",
                "5",
            ],
        ),
        "divide",
    );
    assert_clean_failure(
        &train(
            &data,
            &["--noise", "diag", "--small-batch", "16", "--batch-norm"],
        ),
        "batch normalization",
    );
    assert_clean_failure(
        &train(&data, &["--batch-size", "1024"]),
        "larger than the training set",
    );
}

#[test]
fn an_existing_run_directory_is_refused_unless_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let run = tmp.path().join("run");
    assert!(
        train(&data, &["--out", run.to_str().unwrap()])
            .status
            .success()
    );
    let before = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert_clean_failure(
        &train(&data, &["--out", run.to_str().unwrap()]),
        "not empty",
    );
    assert_eq!(
        before,
        std::fs::read_to_string(run.join("summary.json")).unwrap()
    );
    assert!(
        train(
            &data,
            &["--out", run.to_str().unwrap(), "--overwrite", "--seed", "3"]
        )
        .status
        .success()
    );
}

#[test]
fn divergence_stops_with_a_message_and_a_consistent_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let run = tmp.path().join("run");
    let o = train(
        &data,
        &[
            "--lr",
            "1e30",
            "--epochs",
            "2",
            "--out",
            run.to_str().unwrap(),
        ],
    );
    assert_clean_failure(&o, "diverged at step");
    assert!(stderr(&o).contains("last finite loss"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "diverged");
    assert!(summary["diverged"]["step"].is_u64());
}

#[test]
fn a_run_stopped_early_matches_the_start_of_the_long_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let metrics = |name: &str, extra: &[&str]| {
        let run = tmp.path().join(name);
        let mut args = vec!["--warmup-epochs", "1", "--out", run.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = train(&data, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let mut first = read_json_lines(&run.join("metrics.jsonl")).remove(0);
        let obj = first.as_object_mut().unwrap();
        obj.remove("seconds");
        obj.remove("eval_seconds");
        first
    };
    let long = metrics("long", &["--epochs", "3"]);
    let early = metrics("early", &["--epochs", "1", "--schedule-epochs", "3"]);
    assert_eq!(long, early);
    // Without --schedule-epochs the 1-epoch schedule decays faster.
    assert_ne!(long, metrics("short", &["--epochs", "1"]));
    assert_clean_failure(
        &train(&data, &["--epochs", "3", "--schedule-epochs", "2"]),
        "schedule-epochs",
    );
}

#[test]
fn bench_writes_every_field_and_times_a_chosen_subset() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let o = bin()
        .args([
            "bench",
            "--batch-sizes",
            "16,32",
            "--hidden",
            "8",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--micro-batches",
            "4",
            "--variants",
            "diag-exact,full,matmul-products",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().unwrap();
    // plain is always the baseline; the two chosen variants, at both sizes.
    let names: Vec<(u64, &str)> = results
        .iter()
        .map(|r| {
            (
                r["batch_size"].as_u64().unwrap(),
                r["variant"].as_str().unwrap(),
            )
        })
        .collect();
    for b in [16, 32] {
        for v in ["plain", "diag-exact", "full", "matmul-products"] {
            assert!(names.contains(&(b, v)), "{b} {v} missing: {names:?}");
        }
    }
    assert_eq!(results.len(), 8, "{names:?}");
    for r in results {
        for field in ["steps", "median_ms", "p10_ms", "p90_ms", "ratio_to_plain"] {
            assert!(r[field].as_f64().is_some_and(|x| x > 0.0), "{field}: {r}");
        }
        assert!(r["step_peak_bytes"].as_u64().is_some(), "{r}");
        let (median, p10, p90) = (
            r["median_ms"].as_f64().unwrap(),
            r["p10_ms"].as_f64().unwrap(),
            r["p90_ms"].as_f64().unwrap(),
        );
        assert!(p10 <= median && median <= p90, "{r}");
        if r["variant"] == "plain" {
            assert_eq!(r["ratio_to_plain"].as_f64(), Some(1.0));
        }
    }
    assert!(doc["threads"].as_u64().is_some() && doc["git_commit"].is_string());
    // An unknown variant is named, before anything is timed.
    let o = bin()
        .args(["bench", "--variants", "diag-exactt"])
        .output()
        .unwrap();
    assert_clean_failure(&o, "diag-exactt");
}

#[test]
fn eval_every_skips_test_evaluations_but_not_the_last() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixture(tmp.path());
    let out = tmp.path().join("run");
    let o = train(
        &data,
        &[
            "--epochs",
            "3",
            "--eval-every",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = read_json_lines(&out.join("metrics.jsonl"));
    let evaluated: Vec<bool> = lines.iter().map(|l| l["test_accuracy"].is_f64()).collect();
    assert_eq!(evaluated, [false, true, true]);
    assert!(lines[0]["test_accuracy"].is_null() && lines[0]["train_loss"].is_f64());
    let o = train(&data, &["--eval-every", "0"]);
    assert_clean_failure(&o, "eval-every");
    // Batch size 0 is the whole (here held-out-reduced) training set: one
    // step per epoch, and the noise scale uses B_L = 512 - 112 = 400.
    let full = tmp.path().join("full");
    let o = train(
        &data,
        &[
            "--batch-size",
            "0",
            "--holdout",
            "112",
            "--epochs",
            "2",
            "--noise",
            "diag",
            "--small-batch",
            "16",
            "--out",
            full.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 2);
    let c = summary["noise_scale"].as_f64().unwrap();
    assert!((c - (1.0 / 16.0 - 1.0 / 400.0)).abs() < 1e-12, "c = {c}");
}

#[test]
fn the_fisher_trace_is_the_final_models_on_the_first_4096_training_examples() {
    use covnoise::model::{Batch, Probes};
    use covnoise_lab::train::{RunDir, checkpoint, input_shape, load_data, to_device};
    use covnoise_lab::zoo::Network;
    let tmp = tempfile::tempdir().unwrap();
    // More training examples than the trace uses.
    let data = common::write_fashion_fixture(&tmp.path().join("data"), 4200, 64);
    let run = tmp.path().join("run");
    // Passes of 1,000 examples: four full ones and one of 96.
    let o = train(&data, &["--chunk", "1000", "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let trace = summary["fisher_trace"].as_f64().unwrap();
    // The reference: the final model (its last checkpoint) on the run's own
    // data, (1/n) sum_i ||grad l_i||^2 from one single-example pass each.
    let settings = RunDir::open(&run).unwrap().read_settings().unwrap();
    let loaded = load_data(&settings).unwrap();
    let (_, last) = checkpoint::list(&run).unwrap().pop().unwrap();
    let saved = checkpoint::read(&last).unwrap();
    let device = burn::tensor::Device::flex().autodiff();
    let config = settings
        .network_config(&loaded.train.shape, loaded.train.num_classes)
        .unwrap();
    let model = Network::new(&config, settings.seed, &device).unwrap();
    let model = covnoise::weights::load_into(model, &saved.weights, false).unwrap();
    let mut host = covnoise_lab::data::Batch::default();
    loaded
        .train
        .gather_into(&(0..4200).collect::<Vec<_>>(), &mut host);
    let examples = to_device(&host, input_shape(&loaded.train), &device);
    let forward =
        |m: &Network, b: &Batch<4>, p: &mut Probes| m.objective(b.x.clone(), b.labels.clone(), p);
    let squares: Vec<f64> = common::per_example(&model, &examples, &forward)
        .iter()
        .map(|g| g.iter().map(|x| x * x).sum())
        .collect();
    let mean = |n: usize| squares[..n].iter().sum::<f64>() / n as f64;
    let reference = mean(4096);
    assert!(
        (trace - reference).abs() <= 1e-4 * reference,
        "{trace} vs {reference}"
    );
    // Which examples count is visible at this tolerance.
    assert!((mean(4200) - reference).abs() > 1e-3 * reference);
    // With batch norm there are no per-example gradients: null, and the run
    // completes.
    let ghost = tmp.path().join("ghost");
    let o = train(
        &data,
        &["--ghost-batch", "16", "--out", ghost.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ghost.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["status"], "completed");
    assert!(summary["fisher_trace"].is_null(), "{summary}");
}
