//! The preprocessing shared by all image loaders: keeping the first N
//! examples of each split and standardizing both with the training set's
//! per-channel statistics.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::DataError;
use super::locate::DataSource;
use super::memory::Dataset;

/// The per-channel affine map applied to every feature:
/// `x -> (x - mean[c]) / std[c]` for a value `x` of channel `c`, where for
/// images `x` is the pixel value divided by 255.
///
/// Channels follow [`Dataset::shape`](super::Dataset::shape): an example of
/// shape `[C, H, W]` (channels first) has `C` channels of `H * W` consecutive
/// values each; any other shape (such as `[dim]` for feature vectors) is one
/// channel. Fashion-MNIST thus has one channel and CIFAR three (red, green,
/// blue), the standard CIFAR recipe of per-channel statistics.
///
/// `mean[c]` and `std[c]` are taken over all values of channel `c` of all
/// training examples kept (after `--train-limit`), so the model trains on
/// exactly mean-0, std-1 channels; the test set reuses them, as it must not
/// inform preprocessing. `std` is the population standard deviation (divide
/// by the count). The values go into the run's configuration record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    /// Subtracted first, one entry per channel.
    pub mean: Vec<f64>,
    /// Divided by next, one entry per channel. A constant channel has
    /// standard deviation 0; its divisor is then 1 (values are only centred)
    /// rather than infinity.
    pub std: Vec<f64>,
}

/// The channel count and values per channel of one example of `shape` (see
/// [`Standardization`]). The per-channel length is at least 1 so that
/// chunking by it never panics, even for a degenerate shape.
fn channel_layout(shape: &[usize]) -> (usize, usize) {
    match *shape {
        [c, h, w] if c > 0 => (c, (h * w).max(1)),
        _ => (1, shape.iter().product::<usize>().max(1)),
    }
}

/// The standardized value of byte `v`: shared by the lookup tables and the
/// padding fill so that both give bit-identical features for equal bytes.
fn standardize_byte(v: u8, mean: f64, std: f64) -> f32 {
    ((f64::from(v) / 255.0 - mean) / std) as f32
}

impl Standardization {
    /// The identity map (mean 0, std 1) on `channels` channels.
    pub fn identity(channels: usize) -> Self {
        Standardization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Per-channel mean and standard deviation of `pixel / 255`, for
    /// examples of shape `shape` laid out back to back, from one 256-bin
    /// histogram per channel: exact in f64 and one pass.
    pub fn from_u8_pixels(pixels: &[u8], shape: &[usize]) -> Self {
        let (channels, plane) = channel_layout(shape);
        let mut hists = vec![[0u64; 256]; channels];
        for (k, chunk) in pixels.chunks(plane).enumerate() {
            let hist = &mut hists[k % channels];
            for &p in chunk {
                hist[usize::from(p)] += 1;
            }
        }
        let value = |v: usize| v as f64 / 255.0;
        let moments = hists.iter().map(|hist| {
            let count = hist.iter().sum::<u64>().max(1) as f64;
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
            (mean, var)
        });
        Self::from_moments(moments)
    }

    /// Per-channel mean and standard deviation of `features`, examples of
    /// shape `shape` back to back (two passes in f64).
    pub fn from_features(features: &[f32], shape: &[usize]) -> Self {
        let (channels, plane) = channel_layout(shape);
        let mut sums = vec![(0.0f64, 0u64); channels];
        for (k, chunk) in features.chunks(plane).enumerate() {
            let (sum, count) = &mut sums[k % channels];
            *sum += chunk.iter().map(|&x| f64::from(x)).sum::<f64>();
            *count += chunk.len() as u64;
        }
        let means: Vec<f64> = sums
            .iter()
            .map(|&(sum, count)| sum / count.max(1) as f64)
            .collect();
        let mut sq = vec![0.0f64; channels];
        for (k, chunk) in features.chunks(plane).enumerate() {
            let mean = means[k % channels];
            sq[k % channels] += chunk
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>();
        }
        Self::from_moments(
            means
                .iter()
                .zip(&sq)
                .zip(&sums)
                .map(|((&mean, &sq), &(_, count))| (mean, sq / count.max(1) as f64)),
        )
    }

    fn from_moments(moments: impl Iterator<Item = (f64, f64)>) -> Self {
        let (mean, std) = moments
            .map(|(mean, var)| {
                let std = var.sqrt();
                let std = if std > 0.0 && std.is_finite() {
                    std
                } else {
                    1.0
                };
                (mean, std)
            })
            .unzip();
        Standardization { mean, std }
    }

    /// Panics unless examples of `shape` have as many channels as `self`,
    /// and returns the values per channel.
    fn plane_for(&self, shape: &[usize]) -> usize {
        let (channels, plane) = channel_layout(shape);
        assert_eq!(
            channels,
            self.channels(),
            "standardization for {} channels applied to examples of shape {shape:?}",
            self.channels()
        );
        plane
    }

    /// Applies the map in place to examples of shape `shape` laid out back
    /// to back.
    ///
    /// # Panics
    /// If `shape` does not have [`Self::channels`] channels.
    pub fn apply(&self, features: &mut [f32], shape: &[usize]) {
        let plane = self.plane_for(shape);
        for (k, chunk) in features.chunks_mut(plane).enumerate() {
            let c = k % self.channels();
            for x in chunk {
                *x = ((f64::from(*x) - self.mean[c]) / self.std[c]) as f32;
            }
        }
    }

    /// The standardized value of every byte `0..=255` in channel `channel`
    /// (pixel / 255, then the map), computed in f64: a lookup table, so train
    /// and test pixels of the same value and channel always get bit-identical
    /// features.
    ///
    /// # Panics
    /// If `channel >= self.channels()`.
    pub fn u8_table(&self, channel: usize) -> [f32; 256] {
        let (mean, std) = (self.mean[channel], self.std[channel]);
        std::array::from_fn(|v| standardize_byte(v as u8, mean, std))
    }

    /// The standardized value of a raw pixel of 0 in each channel,
    /// `(0 - mean[c]) / std[c]`: what zero padding becomes once padding is
    /// done after standardization (see [`super::Augmentation`]). Equal, bit
    /// for bit, to entry 0 of [`Self::u8_table`].
    pub fn fill_values(&self) -> Vec<f32> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(&mean, &std)| standardize_byte(0, mean, std))
            .collect()
    }

    /// Converts bytes of examples of shape `shape` (back to back) to
    /// standardized features through each channel's [`Self::u8_table`].
    ///
    /// # Panics
    /// If `shape` does not have [`Self::channels`] channels.
    pub fn apply_u8(&self, pixels: &[u8], shape: &[usize]) -> Vec<f32> {
        let plane = self.plane_for(shape);
        let tables: Vec<[f32; 256]> = (0..self.channels()).map(|c| self.u8_table(c)).collect();
        let mut out = Vec::with_capacity(pixels.len());
        for (k, chunk) in pixels.chunks(plane).enumerate() {
            let table = &tables[k % tables.len()];
            out.extend(chunk.iter().map(|&p| table[usize::from(p)]));
        }
        out
    }
}

/// How image bytes become features (`--inputs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InputScaling {
    /// Per-channel mean 0 and standard deviation 1 on the training set.
    #[default]
    Standardized,
    /// Pixel / 255, in [0, 1].
    Unit,
    /// The pixel values themselves, 0 to 255.
    Raw,
}

impl InputScaling {
    /// The map this scaling applies to `pixel / 255` of examples of `shape`
    /// whose training bytes are `train_pixels`.
    fn map(self, train_pixels: &[u8], shape: &[usize]) -> Standardization {
        let channels = channel_layout(shape).0;
        match self {
            InputScaling::Standardized => Standardization::from_u8_pixels(train_pixels, shape),
            InputScaling::Unit => Standardization::identity(channels),
            InputScaling::Raw => Standardization {
                mean: vec![0.0; channels],
                std: vec![1.0 / 255.0; channels],
            },
        }
    }
}

/// How many examples to keep (`--train-limit`, `--test-limit`), which file
/// trains, and how bytes become features.
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
    /// Train on the data set's test file and test on its training file
    /// (`--train-on test`); the limits apply to the roles, not the files.
    #[serde(default)]
    pub swap_splits: bool,
    /// How bytes become features.
    #[serde(default)]
    pub scaling: InputScaling,
}

/// A training set and a test set, preprocessed together.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTest {
    /// Training examples (standardized: mean 0, std 1 in each channel).
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
    if opts.swap_splits {
        std::mem::swap(&mut train, &mut test);
    }
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
    let standardization = opts.scaling.map(&train.pixels, &shape);
    let make = |split: RawSplit| {
        let features = standardization.apply_u8(&split.pixels, &shape);
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

    /// Bytes of `n` examples of shape `[3, 2, 5]` whose channels have
    /// different distributions (channel c concentrated near 60 * c).
    fn three_channel_bytes(n: usize) -> Vec<u8> {
        (0..n * 30)
            .map(|i| {
                let c = (i % 30) / 10;
                (60 * c + (i * 37 % 97)) as u8
            })
            .collect()
    }

    /// Naive per-channel moments of `pixel / 255` in f64, the channel of flat
    /// index `i` being `(i % dim) / plane`: a different indexing from the
    /// implementation's chunking.
    fn naive_moments(pixels: &[u8], channels: usize, plane: usize) -> Vec<(f64, f64)> {
        (0..channels)
            .map(|c| {
                let vals: Vec<f64> = pixels
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i % (channels * plane)) / plane == c)
                    .map(|(_, &p)| f64::from(p) / 255.0)
                    .collect();
                let n = vals.len() as f64;
                let mean = vals.iter().sum::<f64>() / n;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                (mean, var.sqrt())
            })
            .collect()
    }

    #[test]
    fn per_channel_u8_standardization_matches_naive_and_float_paths() {
        let shape = [3, 2, 5];
        let pixels = three_channel_bytes(40);
        let a = Standardization::from_u8_pixels(&pixels, &shape);
        assert_eq!(a.channels(), 3);
        // Tolerance 1e-12: both are f64 sums of 400 terms of size <= 1, so
        // each carries a rounding error below 400 * 2^-53 ~ 5e-14.
        for (c, (mean, std)) in naive_moments(&pixels, 3, 10).into_iter().enumerate() {
            assert!((a.mean[c] - mean).abs() < 1e-12, "channel {c}");
            assert!((a.std[c] - std).abs() < 1e-12, "channel {c}");
        }
        // The channels really differ, so a scalar map would have failed above.
        assert!(a.mean[2] - a.mean[0] > 0.4, "{a:?}");
        // Tolerance 1e-7: the float path sees pixel / 255 rounded to f32
        // (relative error 6e-8 on values <= 1).
        let floats: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
        let b = Standardization::from_features(&floats, &shape);
        for c in 0..3 {
            assert!((a.mean[c] - b.mean[c]).abs() < 1e-7 && (a.std[c] - b.std[c]).abs() < 1e-7);
        }
        // Tolerance 1e-5: features of size <= 4 from f32 inputs and f32
        // outputs, each within a few f32 roundings (1e-7 relative).
        let mut g = floats.clone();
        b.apply(&mut g, &shape);
        for (x, y) in a.apply_u8(&pixels, &shape).iter().zip(&g) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn single_channel_is_the_former_scalar_map_bit_for_bit() {
        // Fashion-MNIST (one channel) must keep exactly the numbers of the
        // former scalar standardization, which runs recorded: this is that
        // code, verbatim, over all pixels at once.
        let pixels: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 256) as u8).collect();
        let mut hist = [0u64; 256];
        for &p in &pixels {
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
        let table: [f32; 256] =
            std::array::from_fn(|v| ((v as f64 / 255.0 - mean) / var.sqrt()) as f32);
        for shape in [vec![1, 10, 10], vec![100]] {
            let s = Standardization::from_u8_pixels(&pixels, &shape);
            assert_eq!(s.mean, vec![mean]);
            assert_eq!(s.std, vec![var.sqrt()]);
            assert_eq!(s.u8_table(0), table);
        }
    }

    #[test]
    fn constant_channel_is_only_centred() {
        // Channel 0 is constant 51 (0.2 exactly after / 255), channel 1 varies.
        let pixels: Vec<u8> = (0..20)
            .map(|i| if i % 10 < 5 { 51 } else { i as u8 })
            .collect();
        let shape = [2, 1, 5];
        let s = Standardization::from_u8_pixels(&pixels, &shape);
        assert_eq!(s.std[0], 1.0);
        assert!((s.mean[0] - 0.2).abs() < 1e-12);
        assert!(s.std[1] > 0.0 && s.std[1] != 1.0);
        let out = s.apply_u8(&pixels, &shape);
        assert!(out[..5].iter().chain(&out[10..15]).all(|&x| x == 0.0));
    }

    #[test]
    fn fill_values_are_the_table_entry_of_byte_zero() {
        let s = Standardization::from_u8_pixels(&three_channel_bytes(5), &[3, 2, 5]);
        let fill = s.fill_values();
        assert_eq!(fill.len(), 3);
        for (c, &f) in fill.iter().enumerate() {
            assert_eq!(f.to_bits(), s.u8_table(c)[0].to_bits());
            // Tolerance: one f32 rounding of a value of size < 10.
            assert!((f64::from(f) - (0.0 - s.mean[c]) / s.std[c]).abs() < 1e-6);
        }
        assert_eq!(Standardization::identity(2).fill_values(), vec![0.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "standardization for 3 channels")]
    fn channel_count_mismatch_panics() {
        Standardization::identity(3).apply_u8(&[0; 4], &[4]);
    }
}
