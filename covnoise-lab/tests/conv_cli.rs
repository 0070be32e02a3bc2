//! Conv nets from the command line: LeNet-5 on Fashion-MNIST-format files,
//! ResNet and VGG on CIFAR-format files written here (CIFAR itself is not
//! installable on the test machines), with augmentation on by default.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use covnoise_lab::data::{write_cifar10_file, write_cifar100_file};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::metrics_without_times as metrics;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_covnoise"));
    c.env_remove("COVNOISE_DATA").env_remove("COVNOISE_FAULT");
    c
}

fn random_bytes(n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    (0..n).map(|_| rng.random::<u8>()).collect()
}

/// CIFAR-10 files with `per_file` random images in each of the five
/// training files and the test file.
fn cifar10(root: &Path, per_file: usize) -> PathBuf {
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        let labels: Vec<u8> = (0..per_file).map(|_| rng.random_range(0..10u8)).collect();
        write_cifar10_file(
            &dir.join(name),
            &labels,
            &random_bytes(per_file * 3072, &mut rng),
        )
        .unwrap();
    }
    root.to_path_buf()
}

fn cifar100(root: &Path, train: usize, test: usize) -> PathBuf {
    let dir = root.join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (name, n) in [("train.bin", train), ("test.bin", test)] {
        let fine: Vec<u8> = (0..n).map(|_| rng.random_range(0..100u8)).collect();
        let coarse: Vec<u8> = fine.iter().map(|f| f / 5).collect();
        write_cifar100_file(
            &dir.join(name),
            &coarse,
            &fine,
            &random_bytes(n * 3072, &mut rng),
        )
        .unwrap();
    }
    root.to_path_buf()
}

fn train(args: &[&str], data: &Path, out: &Path) -> Output {
    bin()
        .args([
            "train",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--threads",
            "1",
        ])
        .args(args)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_run_dir(dir: &Path, what: &str) {
    for f in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(dir.join(f).is_file(), "{what}: no {f}");
    }
    assert_eq!(metrics(dir).len(), 1, "{what}");
}

#[test]
fn resnet_and_vgg_train_on_cifar_format_files() {
    let root = tempfile::tempdir().unwrap();
    let c10 = cifar10(&root.path().join("c10"), 16);
    let run = |name: &str, args: &[&str]| {
        let out = root.path().join(name);
        let o = train(args, &c10, &out);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        out
    };
    let base = ["--dataset", "cifar10", "--batch-size", "16", "--lr", "0.05"];
    let a = run("resnet-a", &[&base[..], &["--model", "resnet20"]].concat());
    assert_run_dir(&a, "resnet20");
    let config = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(config.contains("model = \"resnet20\"") && config.contains("dataset = \"cifar10\""));
    // Same seed, same run (the augmentation is seeded too); without the
    // augmentation the run differs.
    let b = run("resnet-b", &[&base[..], &["--model", "resnet20"]].concat());
    assert_eq!(metrics(&a), metrics(&b));
    let plain = run(
        "resnet-plain",
        &[&base[..], &["--model", "resnet20", "--no-augment"]].concat(),
    );
    assert_ne!(metrics(&a), metrics(&plain));
    // Ghost batch norm + micro-batch diagonal noise.
    let ghost = run(
        "resnet-ghost",
        &[
            &base[..],
            &[
                "--model",
                "resnet20",
                "--ghost-batch",
                "4",
                "--noise",
                "diag",
                "--estimator",
                "microbatch",
                "--micro-batches",
                "4",
                "--small-batch",
                "4",
            ],
        ]
        .concat(),
    );
    assert_run_dir(&ghost, "resnet20 ghost");
    let vgg = run(
        "vgg",
        &[&base[..], &["--model", "vgg11", "--train-limit", "32"]].concat(),
    );
    assert_run_dir(&vgg, "vgg11");

    let c100 = cifar100(&root.path().join("c100"), 32, 16);
    let out = root.path().join("c100-run");
    let o = train(
        &[
            "--dataset",
            "cifar100",
            "--model",
            "resnet20",
            "--batch-size",
            "16",
        ],
        &c100,
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_run_dir(&out, "cifar100");
    let o = bin().args(["eval"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "eval: {}", stderr(&o));
}

#[test]
fn lenet_trains_with_every_estimator_and_refuses_what_does_not_apply() {
    let root = tempfile::tempdir().unwrap();
    let data = common::write_fashion_fixture(&root.path().join("data"), 256, 64);
    let base = [
        "--model",
        "lenet5",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--quiet",
    ];
    for (name, extra) in [
        ("plain", &[][..]),
        (
            "diag exact",
            &["--noise", "diag", "--small-batch", "16"][..],
        ),
        (
            "mc-fisher",
            &[
                "--noise",
                "diag",
                "--estimator",
                "mc-fisher",
                "--small-batch",
                "16",
            ][..],
        ),
        (
            "isotropic",
            &["--noise", "isotropic", "--small-batch", "16"][..],
        ),
        ("full", &["--noise", "full", "--small-batch", "16"][..]),
    ] {
        let out = root.path().join(name.replace(' ', "-"));
        let o = train(&[&base[..], extra].concat(), &data, &out);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_run_dir(&out, name);
    }
    // One line, non-zero, nothing written, for each impossible combination.
    for (extra, needle) in [
        (&["--ghost-batch", "8"][..], "no batch normalization"),
        (&["--dataset", "cifar10"][..], "cifar10"),
        (&["--hidden", "64"][..], "hidden"),
    ] {
        let out = root.path().join("refused");
        let o = train(&[&base[..], extra].concat(), &data, &out);
        let err = stderr(&o);
        assert!(
            !o.status.success() && err.contains(needle),
            "{extra:?}: {err}"
        );
        assert!(
            !err.contains("panicked") && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    let o = train(
        &["--model", "resnet20", "--quiet"],
        &data,
        &root.path().join("r"),
    );
    assert!(stderr(&o).contains("[3, 32, 32]"), "{}", stderr(&o));
}

#[test]
fn cifar_study_files_plan_and_run_their_first_steps() {
    use covnoise_lab::study::{StudySpec, run_study};
    use covnoise_lab::train::Silent;
    let root = tempfile::tempdir().unwrap();
    let c10 = cifar10(&root.path().join("c10"), 24);
    let c100 = cifar100(&root.path().join("c100"), 120, 16);
    // The study files sit at the workspace root, beside the two crates.
    let studies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../studies");
    for (file, data) in [
        ("cifar10-resnet44.toml", &c10),
        ("cifar100-resnet44.toml", &c100),
        ("cifar10-vgg16.toml", &c10),
    ] {
        // Every arm at every grid point validates as written, with the data
        // directory given as a user would (--set data=...).
        let mut spec = StudySpec::load(&studies.join(file)).unwrap();
        spec.set(&format!("data = \"{}\"", data.display())).unwrap();
        spec.plan().unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    // The ResNet-44 study's arms (estimators, ghost batch norm, augmentation)
    // through their first steps on generated files, scaled down to one
    // epoch of 3 batches of 32, one seed.
    let mut spec = StudySpec::load(&studies.join("cifar10-resnet44.toml")).unwrap();
    spec.seeds = vec![0];
    let search = spec.search.as_mut().unwrap();
    search.epochs = 1;
    search.holdout = 24;
    for set in [
        format!("data = \"{}\"", c10.display()),
        "train-limit = 96".into(),
        "test-limit = 24".into(),
        "epochs = 1".into(),
        "warmup-epochs = 0".into(),
        "batch-size = 32".into(),
        "micro-batches = 4".into(),
        "ghost-batch = 8".into(),
        "small-batch = 8".into(),
        "eval-batch = 24".into(),
        "threads = 1".into(),
    ] {
        spec.set(&set).unwrap();
    }
    let out = root.path().join("study");
    run_study(&spec, &out, 1, &mut Silent, &mut |_| {}).unwrap();
    let md = std::fs::read_to_string(out.join("study.md")).unwrap();
    for arm in [
        "small batch 128",
        "ghost BN 128",
        "diag microbatch + ghost BN 128",
    ] {
        assert!(md.contains(arm), "{arm} missing from study.md");
    }
}

/// `covnoise bench` with its default variants on the conv nets: every
/// variant that applies runs (on a batch-norm model, full noise and the
/// micro-batch estimator on ghost batches of one micro-batch, the
/// penalties over micro-batches), none is refused mid-bench.
#[test]
fn bench_runs_every_default_variant_on_the_conv_nets() {
    for (model, expected) in [
        (
            "resnet20",
            &[
                "plain",
                "plain-burn",
                "diag-microbatch",
                "full",
                "grad-norm",
                "fisher-trace",
            ][..],
        ),
        (
            "lenet5",
            &[
                "plain",
                "plain-burn",
                "diag-exact",
                "diag-mc-fisher",
                "full",
                "isotropic-exact",
                "grad-norm",
                "fisher-trace",
            ][..],
        ),
    ] {
        let o = bin()
            .args([
                "bench",
                "--model",
                model,
                "--batch-sizes",
                "8",
                "--micro-batches",
                "2",
                "--warmup",
                "0",
                "--steps",
                "1",
                "--threads",
                "1",
            ])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{model}: {}{out}", stderr(&o));
        for name in expected {
            assert!(
                out.lines()
                    .any(|l| l.split_whitespace().nth(2) == Some(name)),
                "{model}: no {name} line in\n{out}"
            );
        }
    }
}
