//! The preprocessing shared by all image loaders: keeping the first N
//! examples of each split and standardizing both with the training set's
//! statistics.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::locate::DataSource;
use super::memory::Dataset;

/// The scalar affine map applied to every feature: `x -> (x - mean) / std`,
/// where for images `x` is the pixel value divided by 255.
///
/// `mean` and `std` are one number each over all pixels of all training
/// examples kept (after `--train-limit`), so the model trains on exactly
/// mean-0, std-1 inputs; the test set reuses them, as it must not inform
/// preprocessing. `std` is the population standard deviation (divide by the
/// count). The values go into the run's configuration record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    /// Subtracted first.
    pub mean: f64,
    /// Divided by next. A constant training set has standard deviation 0; the
    /// divisor is then 1 (features are only centred) rather than infinity.
    pub std: f64,
}

impl Standardization {
    /// The identity map (mean 0, std 1).
    pub const IDENTITY: Standardization = Standardization {
        mean: 0.0,
        std: 1.0,
    };

    /// Mean and standard deviation of `pixel / 255` over all bytes, from a
    /// 256-bin histogram: exact in f64 and one pass.
    pub fn from_u8_pixels(pixels: &[u8]) -> Self {
        let mut hist = [0u64; 256];
        for &p in pixels {
            hist[usize::from(p)] += 1;
        }
        let count = pixels.len().max(1) as f64;
        let value = |v: usize| v as f64 / 255.0;
        let mean = hist
            .iter()
            .enumerate()
            .map(|(v, &c)| value(v) * c as f64)
            .sum::<f64>()
            / count;
        let var = hist
            .iter()
            .enumerate()
            .map(|(v, &c)| (value(v) - mean).powi(2) * c as f64)
            .sum::<f64>()
            / count;
        Self::from_moments(mean, var)
    }

    /// Mean and standard deviation over all values (two passes in f64).
    pub fn from_features(features: &[f32]) -> Self {
        let count = features.len().max(1) as f64;
        let mean = features.iter().map(|&x| f64::from(x)).sum::<f64>() / count;
        let var = features
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / count;
        Self::from_moments(mean, var)
    }

    fn from_moments(mean: f64, var: f64) -> Self {
        let std = var.sqrt();
        let std = if std > 0.0 && std.is_finite() {
            std
        } else {
            1.0
        };
        Standardization { mean, std }
    }

    /// Applies the map in place.
    pub fn apply(&self, features: &mut [f32]) {
        for x in features {
            *x = ((f64::from(*x) - self.mean) / self.std) as f32;
        }
    }

    /// The standardized value of every byte `0..=255` (pixel / 255, then the
    /// map), computed in f64: a lookup table, so train and test pixels of the
    /// same value always get bit-identical features.
    pub fn u8_table(&self) -> [f32; 256] {
        std::array::from_fn(|v| ((v as f64 / 255.0 - self.mean) / self.std) as f32)
    }

    /// Converts bytes to standardized features through [`Self::u8_table`].
    pub fn apply_u8(&self, pixels: &[u8]) -> Vec<f32> {
        let table = self.u8_table();
        pixels.iter().map(|&p| table[usize::from(p)]).collect()
    }
}

/// How many examples to keep (`--train-limit`, `--test-limit`).
///
/// A limit keeps the *first* N examples of the file, after the whole file has
/// been validated. A limit larger than the file keeps everything; a limit of
/// 0 is an error (nothing to train or evaluate on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Keep at most this many training examples.
    pub train_limit: Option<usize>,
    /// Keep at most this many test examples.
    pub test_limit: Option<usize>,
}

/// A training set and a test set, preprocessed together.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTest {
    /// Training examples (standardized: mean 0, std 1 over all features).
    pub train: Dataset,
    /// Test examples, standardized with the training set's statistics.
    pub test: Dataset,
    /// The map applied to both; record it with the run.
    pub standardization: Standardization,
    /// Where the data came from; record it with the run.
    pub source: DataSource,
}

/// Raw bytes of one split as read and validated from disk.
pub(crate) struct RawSplit {
    /// Row-major pixels, `labels.len() * dim` bytes.
    pub pixels: Vec<u8>,
    /// One label per example.
    pub labels: Vec<u8>,
    /// The file to blame if the split turns out empty.
    pub path: PathBuf,
}

/// Applies the limits, computes the training statistics, and converts both
/// splits to standardized features.
pub(crate) fn build_train_test(
    mut train: RawSplit,
    mut test: RawSplit,
    shape: Vec<usize>,
    num_classes: usize,
    opts: &LoadOptions,
    source: DataSource,
) -> Result<TrainTest, DataError> {
    let dim: usize = shape.iter().product();
    for (split, limit, flag) in [
        (&mut train, opts.train_limit, "--train-limit"),
        (&mut test, opts.test_limit, "--test-limit"),
    ] {
        if limit == Some(0) {
            return Err(DataError::Invalid(format!("{flag} must be at least 1")));
        }
        let keep = limit.unwrap_or(usize::MAX).min(split.labels.len());
        if keep == 0 {
            return Err(DataError::Empty {
                path: split.path.clone(),
            });
        }
        split.labels.truncate(keep);
        split.pixels.truncate(keep * dim);
    }
    let standardization = Standardization::from_u8_pixels(&train.pixels);
    let make = |split: RawSplit| {
        let features = standardization.apply_u8(&split.pixels);
        Dataset::new(features, split.labels, shape.clone(), num_classes)
    };
    Ok(TrainTest {
        train: make(train)?,
        test: make(test)?,
        standardization,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_standardization_matches_float_path() {
        let pixels: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 256) as u8).collect();
        let a = Standardization::from_u8_pixels(&pixels);
        let floats: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let b = Standardization::from_features(&floats);
        assert!((a.mean - b.mean).abs() < 1e-7 && (a.std - b.std).abs() < 1e-7);
        let mut g = floats.clone();
        b.apply(&mut g);
        for (x, y) in a.apply_u8(&pixels).iter().zip(&g) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn constant_data_is_only_centred() {
        let s = Standardization::from_u8_pixels(&[51; 10]);
        assert_eq!(s.std, 1.0);
        assert!((s.mean - 0.2).abs() < 1e-12);
        assert_eq!(s.apply_u8(&[51]), vec![0.0]);
    }
}
