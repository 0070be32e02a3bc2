//! Bad input across the subcommands, as a careful user would try it: each
//! case must exit with its code (2 for usage errors clap catches, 1 for
//! everything else), print one line naming the problem (no panic, no
//! backtrace), and leave the file system exactly as it found it (every file
//! and directory under the test's root, hashed before and after).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

mod common;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_covnoise"));
    c.env_remove("COVNOISE_DATA").env_remove("COVNOISE_FAULT");
    c
}

/// Every path under `root` with its contents' hash (directories as "dir").
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(name, "dir".into());
                walk(&path, root, out);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(
                    name,
                    format!("{:08x}:{}", crc32fast::hash(&bytes), bytes.len()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A new run's flags: tiny and fast (4 steps of 32 on 128 images).
const TRAIN: &[&str] = &[
    "train",
    "--data",
    "{root}/data",
    "--hidden",
    "16",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0",
    "--threads",
    "1",
    "--quiet",
    "--out",
    "{root}/new",
];

/// Makes the files the cases refer to under `root`.
fn setup(root: &Path) {
    common::write_fashion_fixture(&root.join("data"), 128, 64);
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("file.txt"), "not a directory").unwrap();
    std::fs::create_dir(root.join("stuff")).unwrap();
    std::fs::write(root.join("stuff/notes.txt"), "mine").unwrap();
    let run = |out: &str, extra: &[&str]| {
        let mut args: Vec<String> = TRAIN
            .iter()
            .map(|a| a.replace("{root}", &root.display().to_string()))
            .collect();
        args.extend(["--out".into(), root.join(out).display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = bin().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run("good", &["--epochs", "2"]);
    run("nockpt", &["--checkpoint-every", "0"]);
    // A run whose record has lr = nan (edited by hand).
    copy_dir(&root.join("good"), &root.join("lrnan"));
    let config = std::fs::read_to_string(root.join("good/config.toml")).unwrap();
    let edited: String = config
        .lines()
        .map(|l| {
            if l.starts_with("lr = ") {
                "lr = nan".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(root.join("lrnan/config.toml"), edited).unwrap();
    // A run directory holding its own data.
    copy_dir(&root.join("good"), &root.join("withdata"));
    copy_dir(&root.join("data"), &root.join("withdata/data"));
    std::fs::write(root.join("bad.toml"), "epochs = \n").unwrap();
    std::fs::write(root.join("unknown.toml"), "epoch = 3\n").unwrap();
    std::fs::write(root.join("nan.toml"), "lr = nan\n").unwrap();
    std::fs::write(root.join("neg.toml"), "epochs = -1\n").unwrap();
    std::fs::write(root.join("bad.csv"), "1,2\nx,4\n").unwrap();
    std::fs::write(root.join("nonsym.csv"), "1,2\n0,1\n").unwrap();
    let study = |name: &str, base: &str, arm: &str| {
        let text = format!(
            "name = \"s\"\nseeds = [0]\n[base]\ndata = \"{}\"\nepochs = 1\nhidden = [16]\nbatch-size = 32\nthreads = 1\n{base}\n[[arm]]\nname = \"a\"\nsettings = {{ {arm} }}\n",
            root.join("data").display()
        );
        std::fs::write(root.join(name), text).unwrap();
    };
    study("study-ok.toml", "", "noise = \"none\"");
    study("study-huge.toml", "", "hidden = [100000000]");
    study("study-seed.toml", "", "seed = 3");
    std::fs::write(
        root.join("study-nodata.toml"),
        "name = \"s\"\nseeds = [0]\n[base]\ndata = \"/nonexistent/fashion\"\nepochs = 1\nhidden = [16]\nbatch-size = 32\n[[arm]]\nname = \"a\"\nsettings = {}\n",
    )
    .unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
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

/// One case: the arguments ({root} replaced), the exit code, and a piece of
/// the message that names the problem.
struct Case {
    args: Vec<&'static str>,
    code: i32,
    needle: &'static str,
}

fn train(extra: &[&'static str], needle: &'static str) -> Case {
    let mut args = TRAIN.to_vec();
    args.extend(extra);
    Case {
        args,
        code: 1,
        needle,
    }
}

/// `covnoise train --model sequential` (without `--hidden`, which only
/// the MLP takes), with `layers` if given.
fn sequential(layers: Option<&'static str>, needle: &'static str) -> Case {
    let mut args: Vec<&'static str> = TRAIN
        .iter()
        .copied()
        .filter(|&a| a != "--hidden" && a != "16")
        .collect();
    args.extend(["--model", "sequential"]);
    if let Some(l) = layers {
        args.extend(["--layers", l]);
    }
    Case {
        args,
        code: 1,
        needle,
    }
}

fn other(args: &[&'static str], code: i32, needle: &'static str) -> Case {
    Case {
        args: args.to_vec(),
        code,
        needle,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // Impossible numbers.
        train(&["--lr", "-0.1"], "lr"),
        train(&["--lr", "nan"], "lr"),
        train(&["--lr", "inf"], "lr"),
        train(&["--lr", "0"], "lr"),
        train(&["--momentum", "1"], "momentum"),
        train(&["--momentum", "-0.5"], "momentum"),
        train(&["--weight-decay", "-1"], "weight"),
        train(&["--weight-decay", "nan"], "weight"),
        train(&["--epochs", "0"], "epochs"),
        // Finding 8: steps x epochs would wrap; epochs config.toml cannot hold.
        train(&["--epochs", "4611686018427387905"], "epochs"),
        train(&["--epochs", "18446744073709551615"], "epochs"),
        train(
            &["--schedule-epochs", "18446744073709551615"],
            "schedule-epochs",
        ),
        train(&["--warmup-epochs", "4611686018427387905"], "warmup-epochs"),
        train(&["--seed", "18446744073709551615"], "seed"),
        train(&["--batch-size", "1024"], "larger than the training set"),
        train(&["--chunk", "0"], "chunk"),
        train(&["--eval-every", "0"], "eval-every"),
        train(&["--eval-batch", "0"], "eval-batch"),
        train(&["--holdout", "0"], "holdout"),
        train(&["--holdout", "128"], "holdout"),
        train(&["--threads", "0"], "threads"),
        train(&["--keep-checkpoints", "0"], "keep-checkpoints"),
        train(&["--schedule-epochs", "0"], "schedule-epochs"),
        train(&["--ghost-batch", "1"], "ghost-batch"),
        train(&["--ghost-batch", "5"], "ghost-batch"),
        train(&["--hidden", "100000000"], "GiB"),
        train(&["--hidden", "2000000000000"], "2^40"),
        train(&["--batch-size", "0", "--hidden", "100000000"], "GiB"),
        train(&["--model", "lenet5", "--hidden", "32"], "hidden"),
        train(&["--noise", "diag", "--small-batch", "32"], "B_S = 32"),
        train(&["--noise", "diag", "--small-batch", "0"], "small"),
        train(&["--noise", "diag", "--kappa", "-1"], "kappa"),
        train(
            &["--regularizer", "grad-norm", "--reg-strength", "-1"],
            "reg-strength",
        ),
        train(
            &["--regularizer", "grad-norm", "--reg-strength", "nan"],
            "reg-strength",
        ),
        train(
            &["--regularizer", "grad-norm", "--reg-micro-batches", "0"],
            "reg-micro-batches",
        ),
        train(
            &["--regularizer", "grad-norm", "--reg-micro-batches", "7"],
            "reg-micro-batches",
        ),
        train(&["--clip-norm", "0"], "clip-norm"),
        train(&["--clip-norm", "inf"], "clip-norm"),
        other(&["train", "--regularizer", "hessian"], 2, "invalid value"),
        train(&["--noise", "diag", "--kappa", "nan"], "kappa"),
        train(
            &[
                "--noise",
                "diag",
                "--small-batch",
                "8",
                "--estimator",
                "microbatch",
                "--micro-batches",
                "1",
            ],
            "at least 2",
        ),
        train(
            &[
                "--noise",
                "diag",
                "--small-batch",
                "8",
                "--estimator",
                "microbatch",
                "--micro-batches",
                "5",
            ],
            "divide",
        ),
        // A sequential net needs its layers, and only it takes them.
        sequential(None, "needs its layers"),
        train(&["--layers", "relu"], "applies only to --model sequential"),
        sequential(Some("conv:3,flatten,linear:10"), "conv:3"),
        sequential(Some("flatten,linear:7"), "linear:10"),
        sequential(Some("linear:10"), "put flatten before it"),
        // The library's typed remedies are said as this command's flags.
        train(
            &["--noise", "diag", "--small-batch", "8", "--batch-norm"],
            "batch normalization over the whole batch, so no gradient belongs to one example: the exact and mc-fisher estimators need per-example gradients; use --estimator microbatch with --ghost-batch N",
        ),
        train(
            &["--noise", "full", "--small-batch", "8", "--batch-norm"],
            "so no loss belongs to one example; use --ghost-batch N",
        ),
        train(
            &["--noise", "diag", "--small-batch", "8", "--ema", "1"],
            "ema",
        ),
        train(
            &["--noise", "diag", "--small-batch", "8", "--ema", "-0.1"],
            "ema",
        ),
        train(
            &["--noise", "diag", "--small-batch", "8", "--refresh", "0"],
            "refresh",
        ),
        train(&["--noise", "diag", "--scale", "temperature"], "small-lr"),
        train(&["--noise", "diag", "--scale", "fixed"], "noise-scale"),
        train(
            &["--noise", "diag", "--scale", "fixed", "--noise-scale", "-1"],
            "-1",
        ),
        train(
            &[
                "--noise",
                "diag",
                "--scale",
                "temperature",
                "--small-lr",
                "-1",
            ],
            "-1",
        ),
        train(
            &[
                "--noise",
                "isotropic",
                "--small-batch",
                "8",
                "--estimator",
                "mc-fisher",
                "--batch-norm",
            ],
            "batch normalization",
        ),
        train(&["--schedule", "multistep", "--gamma", "-1"], "gamma"),
        train(&["--device", "gpu"], "gpu"),
        train(&["--device", "cuda"], "cuda"),
        train(&["--distributed", "mpi"], "MPI"),
        // Missing or wrong files.
        train(&["--data", "/nonexistent/fashion"], "/nonexistent/fashion"),
        train(&["--data", "{root}/empty"], "empty"),
        train(&["--data", "{root}/file.txt"], "file.txt"),
        train(&["--dataset", "cifar10"], "data_batch"),
        train(&["--config", "/nonexistent/run.toml"], "run.toml"),
        train(&["--config", "{root}/bad.toml"], "bad.toml"),
        train(&["--config", "{root}/unknown.toml"], "epoch"),
        train(&["--config", "{root}/nan.toml"], "lr"),
        train(&["--config", "{root}/neg.toml"], "neg.toml"),
        train(
            &["--init-from", "/nonexistent/model.safetensors"],
            "model.safetensors",
        ),
        train(
            &["--init-from", "{root}/data/train-labels-idx1-ubyte"],
            "train-labels-idx1-ubyte",
        ),
        train(
            &[
                "--hidden",
                "8",
                "--init-from",
                "{root}/good/checkpoints/epoch-000002/model.safetensors",
            ],
            "layers.1.weight",
        ),
        // Run directories and other outputs.
        train(&["--out", "{root}/file.txt"], "not a directory"),
        train(&["--out", "{root}/file.txt/run"], "not a directory"),
        train(&["--out", "{root}/stuff"], "not empty"),
        train(&["--out", "{root}/stuff", "--overwrite"], "holds no run"),
        train(&["--out", "{root}/good"], "not empty"),
        train(
            &[
                "--out",
                "{root}/withdata",
                "--overwrite",
                "--data",
                "{root}/withdata/data",
            ],
            "inside",
        ),
        // Finding 2: a refused new run leaves no directory behind.
        train(
            &["--log-steps", "/nonexistent/dir/s.jsonl"],
            "does not exist",
        ),
        train(&["--log-steps", "{root}/empty"], "is a directory"),
        train(
            &[
                "--out",
                "{root}/new/deeper",
                "--log-steps",
                "/nonexistent/s.jsonl",
            ],
            "does not exist",
        ),
        // Usage errors: clap's message on one line, exit 2.
        Case {
            args: vec!["train", "--bogus"],
            code: 2,
            needle: "--bogus",
        },
        Case {
            args: vec!["train", "--epochs", "abc"],
            code: 2,
            needle: "abc",
        },
        Case {
            args: vec!["train", "--epochs", "-1"],
            code: 2,
            needle: "-1",
        },
        Case {
            args: vec!["train", "--noise", "bogus"],
            code: 2,
            needle: "bogus",
        },
        Case {
            args: vec!["train", "--schedule", "bogus"],
            code: 2,
            needle: "bogus",
        },
        Case {
            args: vec!["train", "--model", "bogus"],
            code: 2,
            needle: "bogus",
        },
        Case {
            args: vec!["train", "--dataset", "bogus"],
            code: 2,
            needle: "bogus",
        },
        Case {
            args: vec!["train", "--augment", "--no-augment"],
            code: 2,
            needle: "--no-augment",
        },
        Case {
            args: vec!["train", "--resume", "{root}/good", "--out", "{root}/x"],
            code: 2,
            needle: "--out",
        },
        Case {
            args: vec!["train", "--restart"],
            code: 2,
            needle: "--resume",
        },
        Case {
            args: vec!["train", "--hidden", "16,x"],
            code: 2,
            needle: "x",
        },
        Case {
            args: vec!["bogus-command"],
            code: 2,
            needle: "bogus-command",
        },
        Case {
            args: vec![],
            code: 2,
            needle: "subcommand",
        },
        Case {
            args: vec!["eval"],
            code: 2,
            needle: "RUN_DIR",
        },
        Case {
            args: vec!["eval", "{root}/good", "--checkpoint", "x"],
            code: 2,
            needle: "x",
        },
        Case {
            args: vec!["bench", "--batch-sizes", "x"],
            code: 2,
            needle: "x",
        },
        Case {
            args: vec!["quadratic", "--dim", "x"],
            code: 2,
            needle: "x",
        },
        Case {
            args: vec!["quadratic", "--hessian", "{root}/bad.csv", "--dim", "3"],
            code: 2,
            needle: "--dim",
        },
        Case {
            args: vec!["study"],
            code: 2,
            needle: "FILE",
        },
        Case {
            args: vec![
                "study",
                "{root}/study-ok.toml",
                "--out",
                "{root}/s",
                "--jobs",
                "0",
            ],
            code: 2,
            needle: "0",
        },
        // Resume (findings 2, 3, 10): refused before anything is written.
        other(&["train", "--resume", "{root}/good"], 1, "is complete"),
        other(
            &["train", "--resume", "{root}/good", "--lr", "0.5"],
            1,
            "--lr",
        ),
        other(
            &["train", "--resume", "{root}/good", "--seed", "1"],
            1,
            "--seed",
        ),
        other(
            &["train", "--resume", "{root}/good", "--noise", "diag"],
            1,
            "--noise",
        ),
        other(
            &["train", "--resume", "{root}/good", "--hidden", "8"],
            1,
            "--hidden",
        ),
        other(
            &["train", "--resume", "{root}/good", "--epochs", "1"],
            1,
            "fewer",
        ),
        other(
            &[
                "train",
                "--resume",
                "{root}/good",
                "--epochs",
                "3",
                "--log-steps",
                "/nonexistent/s.jsonl",
            ],
            1,
            "does not exist",
        ),
        other(
            &[
                "train",
                "--resume",
                "{root}/good",
                "--epochs",
                "3",
                "--threads",
                "0",
            ],
            1,
            "threads",
        ),
        other(
            &[
                "train",
                "--resume",
                "{root}/good",
                "--epochs",
                "18446744073709551615",
            ],
            1,
            "epochs",
        ),
        other(
            &[
                "train",
                "--resume",
                "{root}/good",
                "--epochs",
                "4611686018427387905",
            ],
            1,
            "epochs",
        ),
        other(
            &["train", "--resume", "{root}/nonexistent"],
            1,
            "no config.toml",
        ),
        other(&["train", "--resume", "{root}/data"], 1, "no config.toml"),
        other(
            &["train", "--resume", "{root}/nockpt", "--epochs", "2"],
            1,
            "--restart",
        ),
        other(
            &["train", "--resume", "{root}/lrnan", "--epochs", "3"],
            1,
            "config.toml: invalid lr = NaN",
        ),
        other(
            &[
                "train",
                "--resume",
                "{root}/withdata",
                "--restart",
                "--data",
                "{root}/withdata/data",
            ],
            1,
            "--data",
        ),
        // eval.
        other(&["eval", "{root}/nonexistent"], 1, "no config.toml"),
        other(
            &["eval", "{root}/good", "--checkpoint", "9"],
            1,
            "no checkpoint of epoch 9",
        ),
        other(&["eval", "{root}/nockpt"], 1, "no checkpoint"),
        other(
            &["eval", "{root}/good", "--data", "/nonexistent/fashion"],
            1,
            "/nonexistent/fashion",
        ),
        other(
            &["eval", "{root}/lrnan"],
            1,
            "config.toml: invalid lr = NaN",
        ),
        // bench (finding 7): refused before anything is allocated or timed.
        other(&["bench", "--batch-sizes", "100000000"], 1, "GiB"),
        other(&["bench", "--threads", "0"], 1, "threads"),
        other(&["bench", "--model", "sequential"], 1, "does not take"),
        other(&["bench", "--chunk", "0"], 1, "chunk"),
        other(
            &["bench", "--model", "resnet20", "--variants", "diag-exact"],
            1,
            "diag-exact",
        ),
        other(
            &[
                "bench",
                "--model",
                "lenet5",
                "--variants",
                "matmul-products",
            ],
            1,
            "matmul-products",
        ),
        other(&["bench", "--batch-sizes", "0"], 1, "batch-sizes"),
        other(&["bench", "--steps", "0"], 1, "steps"),
        other(&["bench", "--variants", "bogus"], 1, "bogus"),
        other(&["bench", "--micro-batches", "1"], 1, "at least 2"),
        other(&["bench", "--micro-batches", "5"], 1, "divide"),
        other(&["bench", "--small-batch", "0"], 1, "small-batch"),
        other(&["bench", "--json", "/nonexistent/dir/b.json"], 1, "b.json"),
        other(&["bench", "--device", "gpu"], 1, "gpu"),
        other(&["bench", "--hidden", "2000000000000"], 1, "2^40"),
        other(&["bench", "--hidden", "0"], 1, "hidden"),
        // --against: refused before covnoise's own rounds are timed.
        other(
            &[
                "bench",
                "--model",
                "resnet20",
                "--batch-sizes",
                "32",
                "--against",
                "backpack",
            ],
            1,
            "batch norm",
        ),
        other(
            &[
                "bench",
                "--against",
                "pytorch",
                "--python",
                "/nonexistent/python",
            ],
            1,
            "/nonexistent/python does not exist",
        ),
        other(&["bench", "--against", "tensorflow"], 2, "tensorflow"),
        // quadratic.
        other(&["quadratic", "--dim", "0"], 1, "dim"),
        other(&["quadratic", "--dim", "5000"], 1, "dim"),
        other(&["quadratic", "--condition", "0.5"], 1, "condition"),
        other(&["quadratic", "--mc-runs", "1"], 1, "mc-runs"),
        other(&["quadratic", "--alpha", "-1"], 1, "alpha"),
        other(&["quadratic", "--momentum", "1"], 1, "momentum"),
        other(&["quadratic", "--momentum", "-0.5"], 1, "momentum"),
        other(&["quadratic", "--scale", "-1"], 1, "-1"),
        other(
            &["quadratic", "--hessian", "/nonexistent/h.csv"],
            1,
            "h.csv",
        ),
        other(&["quadratic", "--hessian", "{root}/bad.csv"], 1, "bad.csv"),
        other(
            &["quadratic", "--hessian", "{root}/nonsym.csv"],
            1,
            "symmetric",
        ),
        other(
            &["quadratic", "--json", "/nonexistent/dir/q.json"],
            1,
            "q.json",
        ),
        other(&["quadratic", "--plot", "{root}/q.txt"], 1, ".png"),
        other(
            &[
                "quadratic",
                "--json",
                "{root}/q.json",
                "--plot",
                "/nonexistent/dir/q.png",
            ],
            1,
            "q.png",
        ),
        other(
            &["quadratic", "--mc-runs", "100000000000000", "--steps", "1"],
            1,
            "GiB",
        ),
        // study: refused before its output directory exists.
        other(
            &["study", "/nonexistent/s.toml", "--out", "{root}/s"],
            1,
            "s.toml",
        ),
        other(
            &["study", "{root}/bad.toml", "--out", "{root}/s"],
            1,
            "bad.toml",
        ),
        other(
            &["study", "{root}/study-nodata.toml", "--out", "{root}/s"],
            1,
            "/nonexistent/fashion",
        ),
        other(
            &["study", "{root}/study-huge.toml", "--out", "{root}/s"],
            1,
            "GiB",
        ),
        other(
            &["study", "{root}/study-seed.toml", "--out", "{root}/s"],
            1,
            "seed",
        ),
        other(
            &[
                "study",
                "{root}/study-ok.toml",
                "--out",
                "{root}/s",
                "--set",
                "epochs=0",
            ],
            1,
            "epochs",
        ),
        other(
            &["study", "{root}/study-ok.toml", "--out", "{root}/file.txt"],
            1,
            "file.txt",
        ),
        other(
            &[
                "study",
                "{root}/study-ok.toml",
                "--out",
                "{root}/s",
                "--set",
                "bogus=1",
            ],
            1,
            "bogus",
        ),
        other(
            &[
                "study",
                "{root}/study-ok.toml",
                "--out",
                "/nonexistent/dir/s",
                "--set",
                "data=/nonexistent/fashion",
            ],
            1,
            "/nonexistent/fashion",
        ),
        // illustrate.
        other(&["illustrate", "--out", "{root}/f.txt"], 1, ".png"),
        other(
            &["illustrate", "--out", "/nonexistent/dir/f.png"],
            1,
            "f.png",
        ),
        other(
            &["illustrate", "--out", "{root}/f.png", "--examples", "1"],
            1,
            "examples",
        ),
        other(
            &["illustrate", "--out", "{root}/f.png", "--draws", "1"],
            1,
            "draws",
        ),
        other(
            &[
                "illustrate",
                "--out",
                "{root}/f.png",
                "--draws",
                "100000000000000",
            ],
            1,
            "GiB",
        ),
        other(
            &[
                "illustrate",
                "--out",
                "{root}/f.png",
                "--small-batch",
                "300",
            ],
            1,
            "small batch",
        ),
        other(
            &["illustrate", "--out", "{root}/f.png", "--lr", "0"],
            1,
            "lr",
        ),
        other(&["bench", "--warmup", "18446744073709551615"], 1, "warmup"),
        // plot.
        other(
            &["plot", "{root}/nonexistent", "--out", "{root}/p.png"],
            1,
            "nonexistent",
        ),
        other(&["plot", "{root}/good", "--out", "{root}/p.txt"], 1, ".png"),
    ]
}

#[test]
fn bad_input_is_refused_with_one_line_and_leaves_the_file_system_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    setup(root);
    let cases = cases();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let args: Vec<String> = case
            .args
            .iter()
            .map(|a| a.replace("{root}", &root.display().to_string()))
            .collect();
        let before = tree(root);
        let o = bin().args(&args).current_dir(root).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let after = tree(root);
        let mut problems = Vec::new();
        if o.status.code() != Some(case.code) {
            problems.push(format!(
                "exit {:?}, expected {}",
                o.status.code(),
                case.code
            ));
        }
        if err.trim().lines().count() != 1 {
            problems.push("stderr is not one line".into());
        }
        if !err.contains(case.needle) {
            problems.push(format!("stderr does not name {:?}", case.needle));
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
            problems.push("panicked".into());
        }
        if before != after {
            let changed: Vec<&String> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            problems.push(format!("file system changed: {changed:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!("{args:?}: {}; stderr: {err}", problems.join(", ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
