//! Helpers shared by the lab's integration tests: a stand-in Fashion-MNIST
//! directory, run-directory helpers, and (from the library's own test
//! helpers, one copy for both crates) the Monte-Carlo mean accumulator with
//! its error bound and brute-force per-example gradients. A test file that
//! needs them says `mod common;`.

// Each test file is its own crate and uses only some of these.
#![allow(dead_code, unused_imports)]

pub mod runs;

#[path = "../../../covnoise/tests/common/mod.rs"]
mod library;
pub use library::{Running, assert_monte_carlo_mean, flat, norm, per_example};

use std::path::{Path, PathBuf};

use covnoise_lab::data::{synthetic_images, write_fashion_mnist_dir};

/// Makes `dir` a stand-in Fashion-MNIST directory (the four plain IDX
/// files) of learnable synthetic 28x28 images in 10 classes: `train`
/// training images (seed 1) and `test` test images (seed 2). Returns `dir`.
pub fn write_fashion_fixture(dir: &Path, train: usize, test: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let train = synthetic_images(train, 28, 28, 10, 1).unwrap();
    let test = synthetic_images(test, 28, 28, 10, 2).unwrap();
    write_fashion_mnist_dir(dir, &train, &test, false).unwrap();
    dir.to_path_buf()
}

/// A run directory's metrics.jsonl without its wall-clock fields (the part
/// two runs of the same settings must agree on).
pub fn metrics_without_times(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("seconds");
            m.remove("eval_seconds");
            v
        })
        .collect()
}
