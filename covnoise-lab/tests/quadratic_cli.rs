//! End-to-end tests of `covnoise quadratic` and `covnoise illustrate`: the
//! JSON they write, and one clear line (no panic) on bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn covnoise(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_covnoise"))
        .args(args)
        .output()
        .expect("the covnoise binary runs")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A failed run: non-zero exit, no panic, and one line on stderr that
/// mentions `needle`.
fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
}

#[test]
fn random_problem_reports_frobenius_ordering_and_matches_monte_carlo() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let plot = dir.path().join("plot.svg");
    let out = covnoise(&[
        "quadratic",
        "--dim",
        "12",
        "--condition",
        "50",
        "--seed",
        "3",
        "--alpha",
        "0.5",
        "--steps",
        "50,0,1,5",
        "--mc-runs",
        "400",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tr(A C)") && stdout.contains("stationary"),
        "{stdout}"
    );
    assert!(std::fs::metadata(&plot).unwrap().len() > 1000);

    let v = read_json(&json);
    assert_eq!(v["steps"], serde_json::json!([0, 1, 5, 50]));
    let p = &v["problem"];
    assert_eq!(p["dim"], 12);
    assert_eq!(p["generated"], true);
    assert_eq!(p["seed"], 3);
    assert_eq!(p["alpha"], 0.5);
    assert_eq!(p["momentum"], 0.0);
    assert_eq!(p["scale"], 1.0);
    // The generated spectrum spans exactly 1 .. 1/50; the eigensolver
    // recovers it to ~1e-15.
    assert!((p["condition"].as_f64().unwrap() - 50.0).abs() < 1e-9);
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["structure"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["full", "diag", "isotropic"]);
    let tr_hc: Vec<f64> = results
        .iter()
        .map(|r| r["tr_hc"].as_f64().unwrap())
        .collect();
    assert!(tr_hc[0] > tr_hc[1] && tr_hc[1] >= tr_hc[2], "{tr_hc:?}");
    for r in results {
        // Same trace for all structures, to rounding.
        let trace = r["trace"].as_f64().unwrap();
        assert!((trace - results[0]["trace"].as_f64().unwrap()).abs() < 1e-12 * trace);
        assert!(r["frobenius"].as_f64().unwrap() > 0.0);
        assert!(r["stationary_loss"].as_f64().unwrap() > 0.0);
        let exact = floats(&r["exact_loss"]);
        let mean = floats(&r["mc_mean"]);
        let stderr = floats(&r["mc_stderr"]);
        assert_eq!(exact.len(), 4);
        for i in 0..4 {
            // 4 standard errors: a false alarm has probability ~6e-5 per
            // check, and the seed is fixed. At k = 0 all runs agree, so only
            // rounding separates them.
            assert!(
                (exact[i] - mean[i]).abs() <= 4.0 * stderr[i] + 1e-12 * exact[i],
                "{} k index {i}: {} vs {} +- {}",
                r["structure"],
                exact[i],
                mean[i],
                stderr[i]
            );
        }
    }
    // The recursion check ran on this small problem and agreed.
    let diff = v["recursion_check"]["max_relative_difference"]
        .as_f64()
        .unwrap();
    assert!(diff < 1e-10, "{diff}");
}

#[test]
fn files_define_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let hessian = write(
        dir.path(),
        "a.csv",
        "# a comment\n2, 0.5, 0\n0.5, 1, 0\n0, 0, 0.5\n",
    );
    let fisher = write(dir.path(), "f.csv", "1,0.9,0\n0.9,1,0\n0,0,1\n\n");
    let x0 = write(dir.path(), "x0.csv", "1\n-2\n0.5\n");
    let json = dir.path().join("out.json");
    let out = covnoise(&[
        "quadratic",
        "--hessian",
        &hessian,
        "--fisher",
        &fisher,
        "--structure",
        "diag",
        "--scale",
        "0.1",
        "--x0",
        &x0,
        "--alpha",
        "0.3",
        "--momentum",
        "0.5",
        "--steps",
        "0,10",
        "--mc-runs",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&json);
    assert_eq!(v["problem"]["generated"], false);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["structure"], "diag");
    assert!(floats(&results[0]["mc_mean"]).is_empty());
    // k = 0: 1/2 x0^T A x0 = 1/2 (2 + 2 * 0.5 * 1 * (-2) + 4 + 0.125) = 2.0625.
    let exact = floats(&results[0]["exact_loss"]);
    assert!((exact[0] - 2.0625).abs() < 1e-14);
    // diag(F) scaled by 0.1: trace 0.3, ||C||_F = 0.1 sqrt(3).
    assert!((results[0]["trace"].as_f64().unwrap() - 0.3).abs() < 1e-14);
    assert!((results[0]["frobenius"].as_f64().unwrap() - 0.1 * 3f64.sqrt()).abs() < 1e-14);
}

#[test]
fn given_noise_covariance_gives_the_stationary_formula() {
    let dir = tempfile::tempdir().unwrap();
    let hessian = write(dir.path(), "a.csv", "1,0\n0,0.25\n");
    let cov = write(dir.path(), "c.csv", "0.5,0\n0,2\n");
    let json = dir.path().join("out.json");
    let out = covnoise(&[
        "quadratic",
        "--hessian",
        &hessian,
        "--noise-cov",
        &cov,
        "--alpha",
        "0.4",
        "--steps",
        "1",
        "--mc-runs",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&json);
    let r = &v["results"][0];
    assert_eq!(r["structure"], "custom");
    // (alpha/2) sum_i c_i / (2 - alpha a_i) with diagonal A and C.
    let expected = 0.2 * (0.5 / (2.0 - 0.4) + 2.0 / (2.0 - 0.1));
    // A handful of float operations on each side.
    assert!((r["stationary_loss"].as_f64().unwrap() - expected).abs() < 1e-14);
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write(d, "good.csv", "1,0\n0,0.5\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--hessian".into(), write(d, "ns.csv", "1,0,0\n0,1,0\n")],
            "must be square",
        ),
        (
            vec!["--hessian".into(), write(d, "ragged.csv", "1,0\n0\n")],
            "line 2 has 1 values but line 1 has 2",
        ),
        (
            vec!["--hessian".into(), write(d, "asym.csv", "1,0.5\n0,1\n")],
            "must be symmetric",
        ),
        (
            vec!["--hessian".into(), write(d, "indef.csv", "1,2\n2,1\n")],
            "must be positive definite",
        ),
        (
            vec!["--hessian".into(), write(d, "text.csv", "1,abc\n0,1\n")],
            "'abc' is not a number",
        ),
        (
            vec!["--hessian".into(), write(d, "nan.csv", "1,NaN\nNaN,1\n")],
            "non-finite",
        ),
        (
            vec!["--hessian".into(), write(d, "empty.csv", "\n# nothing\n")],
            "has no numbers",
        ),
        (
            vec![
                "--hessian".into(),
                d.join("missing.csv").to_str().unwrap().into(),
            ],
            "cannot read Hessian file",
        ),
        (
            vec![
                "--hessian".into(),
                good.clone(),
                "--fisher".into(),
                write(d, "f3.csv", "1,0,0\n0,1,0\n0,0,1\n"),
            ],
            "dimension 3, but the Hessian has dimension 2",
        ),
        (
            vec![
                "--hessian".into(),
                good.clone(),
                "--noise-cov".into(),
                write(d, "negc.csv", "1,0\n0,-1\n"),
            ],
            "positive semidefinite",
        ),
        (
            vec![
                "--hessian".into(),
                good.clone(),
                "--x0".into(),
                write(d, "x3.csv", "1,2,3\n"),
            ],
            "start point x0 has dimension 3",
        ),
        (
            vec![
                "--hessian".into(),
                good.clone(),
                "--alpha".into(),
                "2".into(),
            ],
            "unstable iteration",
        ),
        (
            vec![
                "--hessian".into(),
                good.clone(),
                "--alpha".into(),
                "3.5".into(),
                "--momentum".into(),
                "0.5".into(),
            ],
            "unstable iteration",
        ),
        (
            vec!["--momentum".into(), "1".into()],
            "momentum = 1 is invalid",
        ),
        (vec!["--alpha=-0.1".into()], "alpha = -0.1 is invalid"),
        (vec!["--dim".into(), "0".into()], "dim = 0 is invalid"),
        (
            vec!["--condition".into(), "0.5".into()],
            "condition = 0.5 is invalid",
        ),
        (vec!["--mc-runs".into(), "1".into()], "standard error"),
        (vec!["--scale=-1".into()], "scale = -1 is invalid"),
        (
            vec!["--plot".into(), d.join("p.pdf").to_str().unwrap().into()],
            "must end in .png or .svg",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = vec!["quadratic", "--steps", "1,2"];
        if !extra.iter().any(|a| a == "--mc-runs") {
            // Exact only: these runs should fail before any simulation.
            args.extend(["--mc-runs", "0"]);
        }
        args.extend(extra.iter().map(String::as_str));
        let out = covnoise(&args);
        assert_clean_failure(&out, needle);
    }
}

#[test]
fn bad_flags_are_refused_without_panic() {
    // clap's own errors (several lines of usage) still exit non-zero.
    for args in [
        vec!["quadratic", "--structure", "bogus"],
        vec!["quadratic", "--steps", "1,x"],
        vec!["quadratic", "--noise-cov", "c.csv", "--fisher", "f.csv"],
    ] {
        let out = covnoise(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn a_monte_carlo_count_too_large_for_memory_is_refused_up_front() {
    // 10^11 runs would need terabytes for their losses: one line, no abort.
    let out = covnoise(&["quadratic", "--dim", "4", "--mc-runs", "100000000000"]);
    assert_clean_failure(&out, "GiB");
}

#[test]
fn illustrate_writes_the_figure() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["fig.png", "fig.svg"] {
        let path = dir.path().join(name);
        let out = covnoise(&[
            "illustrate",
            "--out",
            path.to_str().unwrap(),
            "--draws",
            "200",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }
    let bad = dir.path().join("fig.txt");
    assert_clean_failure(
        &covnoise(&["illustrate", "--out", bad.to_str().unwrap()]),
        "must end in .png or .svg",
    );
    let out = covnoise(&[
        "illustrate",
        "--out",
        dir.path().join("x.png").to_str().unwrap(),
        "--small-batch",
        "512",
    ]);
    assert_clean_failure(&out, "small batch");
}
