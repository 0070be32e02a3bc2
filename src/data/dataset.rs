//! The in-memory data set, its batches, and the preprocessing shared by all
//! image loaders.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::batch::{EpochShuffler, TrainBatches};
use super::cifar::{self, Cifar100Label};
use super::error::DataError;
use super::fashion::{self, DataSource};
use super::synthetic::synthetic_clusters;

/// A labelled data set held in memory, features already preprocessed.
///
/// Invariants (checked by [`Dataset::new`] and [`Dataset::validate`]; the
/// fields are public for cheap access, so code that edits them must keep them):
/// `features.len() == n * dim`, `labels.len() == n`, the product of `shape` is
/// `dim`, `1 <= num_classes <= 256` and every label is below `num_classes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major `[n, dim]`: example `i` is `features[i * dim..(i + 1) * dim]`.
    pub features: Vec<f32>,
    /// One class index per example, in `0..num_classes`.
    pub labels: Vec<u8>,
    /// Number of examples.
    pub n: usize,
    /// Features per example (784 for Fashion-MNIST, 3072 for CIFAR).
    pub dim: usize,
    /// Shape of one example, for models that need it: `[1, 28, 28]` for
    /// Fashion-MNIST, `[3, 32, 32]` (channels first) for CIFAR, `[dim]` for
    /// synthetic vectors.
    pub shape: Vec<usize>,
    /// Number of classes.
    pub num_classes: usize,
}

impl Dataset {
    /// Builds a data set and checks its invariants.
    pub fn new(
        features: Vec<f32>,
        labels: Vec<u8>,
        shape: Vec<usize>,
        num_classes: usize,
    ) -> Result<Self, DataError> {
        let dim = shape.iter().product();
        let ds = Dataset {
            n: labels.len(),
            features,
            labels,
            dim,
            shape,
            num_classes,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Checks the invariants listed on [`Dataset`].
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::Invalid(m));
        if self.shape.iter().product::<usize>() != self.dim || self.dim == 0 {
            return bad(format!(
                "shape {:?} does not give dim {}",
                self.shape, self.dim
            ));
        }
        if self.labels.len() != self.n || self.n.checked_mul(self.dim) != Some(self.features.len())
        {
            return bad(format!(
                "{} labels and {} features do not make {} examples of dim {}",
                self.labels.len(),
                self.features.len(),
                self.n,
                self.dim
            ));
        }
        if !(1..=256).contains(&self.num_classes) {
            return bad(format!(
                "num_classes {} is not in 1..=256",
                self.num_classes
            ));
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= self.num_classes)
        {
            return bad(format!(
                "label {l} at index {i} is outside 0..{}",
                self.num_classes - 1
            ));
        }
        Ok(())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The features of example `i`. Panics if `i >= n`.
    pub fn example(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// Features (row-major) and labels of a contiguous range of examples,
    /// without copying: what evaluation batches use. Panics if the range
    /// reaches past `n`.
    pub fn rows(&self, range: Range<usize>) -> (&[f32], &[u8]) {
        (
            &self.features[range.start * self.dim..range.end * self.dim],
            &self.labels[range],
        )
    }

    /// Copies the examples at `indices` (in that order) into a new batch.
    /// Panics if an index is `>= n` (indices come from the shuffler, not from
    /// input files).
    pub fn gather(&self, indices: &[usize]) -> Batch {
        let mut batch = Batch::default();
        self.gather_into(indices, &mut batch);
        batch
    }

    /// As [`Dataset::gather`], reusing `batch`'s allocations across steps.
    pub fn gather_into(&self, indices: &[usize], batch: &mut Batch) {
        batch.features.clear();
        batch.labels.clear();
        batch.features.reserve(indices.len() * self.dim);
        for &i in indices {
            batch.features.extend_from_slice(self.example(i));
            batch.labels.push(self.labels[i]);
        }
        batch.size = indices.len();
        batch.dim = self.dim;
    }

    /// How many examples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// Gaussian class clusters with unit separation, for examples and tests:
    /// [`synthetic_clusters`]`(n, dim, num_classes, 1.0, seed)`.
    ///
    /// # Panics
    /// If `dim` is 0 or `num_classes` is not in `1..=256`.
    pub fn synthetic(n: usize, dim: usize, num_classes: usize, seed: u64) -> Dataset {
        match synthetic_clusters(n, dim, num_classes, 1.0, seed) {
            Ok(ds) => ds,
            Err(e) => panic!("Dataset::synthetic: {e}"),
        }
    }

    /// This data set's training batches for `epoch` of a run seeded `seed`
    /// (see [`EpochShuffler::train_batches`]; the incomplete last batch is
    /// dropped). Iterating it by value yields each batch's indices as a `Vec`.
    ///
    /// # Panics
    /// If `batch_size` is 0 or larger than the number of examples; use
    /// [`EpochShuffler::train_batches`] to get an error instead.
    pub fn batches(&self, batch_size: usize, seed: u64, epoch: u64) -> TrainBatches {
        match EpochShuffler::new(seed).train_batches(self.n, batch_size, epoch) {
            Ok(b) => b,
            Err(e) => panic!("Dataset::batches: {e}"),
        }
    }

    /// Keeps only the first `n` examples (no-op when `n >= self.n`).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.n);
        self.features.truncate(n * self.dim);
        self.labels.truncate(n);
        self.n = n;
    }
}

/// One batch, gathered into contiguous buffers for the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Row-major `[size, dim]`.
    pub features: Vec<f32>,
    /// `size` labels.
    pub labels: Vec<u8>,
    /// Number of examples.
    pub size: usize,
    /// Features per example.
    pub dim: usize,
}

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

/// The image data sets this crate can load, by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Fashion-MNIST: 10 classes of 28x28 grey images ("fashion-mnist").
    FashionMnist,
    /// CIFAR-10: 10 classes of 32x32 colour images ("cifar10").
    Cifar10,
    /// CIFAR-100 with its 100 fine labels ("cifar100").
    Cifar100,
    /// CIFAR-100 with its 20 coarse labels ("cifar100-coarse").
    Cifar100Coarse,
}

impl DatasetKind {
    /// Every kind, in the order `--help` should list them.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Cifar100Coarse,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Cifar100Coarse => "cifar100-coarse",
        }
    }

    /// Number of classes.
    pub fn num_classes(self) -> usize {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Cifar10 => 10,
            DatasetKind::Cifar100 => 100,
            DatasetKind::Cifar100Coarse => 20,
        }
    }

    /// Shape of one example, channels first.
    pub fn shape(self) -> [usize; 3] {
        match self {
            DatasetKind::FashionMnist => {
                [1, fashion::FASHION_MNIST_SIDE, fashion::FASHION_MNIST_SIDE]
            }
            _ => [cifar::CIFAR_CHANNELS, cifar::CIFAR_SIDE, cifar::CIFAR_SIDE],
        }
    }

    /// Loads the data set. `dir` is `--data DIR`; Fashion-MNIST falls back to
    /// `COVNOISE_DATA` and then the Debian location, while CIFAR has no
    /// default location and needs `dir`.
    pub fn load(self, dir: Option<&Path>, opts: &LoadOptions) -> Result<TrainTest, DataError> {
        let need_dir = || {
            dir.ok_or_else(|| {
                DataError::Invalid(format!(
                    "{} has no default location: pass --data DIR (the extracted binary version)",
                    self.name()
                ))
            })
        };
        match self {
            DatasetKind::FashionMnist => fashion::load_fashion_mnist(dir, opts),
            DatasetKind::Cifar10 => cifar::load_cifar10(need_dir()?, opts),
            DatasetKind::Cifar100 => cifar::load_cifar100(need_dir()?, Cifar100Label::Fine, opts),
            DatasetKind::Cifar100Coarse => {
                cifar::load_cifar100(need_dir()?, Cifar100Label::Coarse, opts)
            }
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DatasetKind::ALL.iter().map(|k| k.name()).collect();
                DataError::Invalid(format!(
                    "unknown data set {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_invariants() {
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 2], vec![2], 3).is_ok());
        assert!(Dataset::new(vec![0.0; 5], vec![0, 1, 2], vec![2], 3).is_err());
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 3], vec![2], 3).is_err());
        assert!(Dataset::new(vec![], vec![], vec![0], 3).is_err());
        assert!(Dataset::new(vec![0.0; 2], vec![0], vec![2], 0).is_err());
    }

    #[test]
    fn convenience_constructors() {
        let ds = Dataset::synthetic(10, 3, 2, 0);
        assert_eq!((ds.n, ds.dim, ds.shape.clone()), (10, 3, vec![3]));
        let batches: Vec<Vec<usize>> = ds.batches(4, 0, 1).into_iter().collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(
            batches.concat(),
            EpochShuffler::new(0).permutation(10, 1)[..8]
        );
    }

    #[test]
    #[should_panic(expected = "batch size 0")]
    fn batches_panics_on_zero() {
        let _ = Dataset::synthetic(10, 3, 2, 0).batches(0, 0, 0);
    }

    #[test]
    fn gather_rows_truncate() {
        let ds = Dataset::new(
            (0..8).map(|x| x as f32).collect(),
            vec![0, 1, 0, 1],
            vec![2],
            2,
        )
        .unwrap();
        let b = ds.gather(&[3, 0]);
        assert_eq!(b.features, vec![6.0, 7.0, 0.0, 1.0]);
        assert_eq!(b.labels, vec![1, 0]);
        assert_eq!((b.size, b.dim), (2, 2));
        let (f, l) = ds.rows(1..3);
        assert_eq!(f, &[2.0, 3.0, 4.0, 5.0]);
        assert_eq!(l, &[1, 0]);
        assert_eq!(ds.class_counts(), vec![2, 2]);
        let mut t = ds.clone();
        t.truncate(1);
        assert_eq!((t.n, t.features.len(), t.labels.len()), (1, 2, 1));
        t.validate().unwrap();
    }

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

    #[test]
    fn kind_names_round_trip() {
        for k in DatasetKind::ALL {
            assert_eq!(k.name().parse::<DatasetKind>().unwrap(), k);
            assert!(k.shape().iter().product::<usize>() > 0);
        }
        assert!("mnist".parse::<DatasetKind>().is_err());
    }
}
