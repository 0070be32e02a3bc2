//! The in-memory data set and its batches: what every loader produces and
//! training gathers its batches from. (`Dataset::synthetic` lives with the
//! generator, in `synthetic`.)

use std::ops::Range;

use super::batch::{EpochShuffler, TrainBatches};
use super::error::DataError;

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
}
