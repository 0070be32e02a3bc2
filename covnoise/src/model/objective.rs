//! What a model's forward pass hands the noise stage: per-example losses, and
//! for classifiers the logits (so that labels can be resampled for the
//! Monte-Carlo Fisher); and what a batch must offer (its size and slices).

use burn::tensor::{Int, Tensor, TensorData, activation};

use crate::error::{CovnoiseError, Result};

/// The output of a forward pass over a batch (or a slice of one).
// One value per forward pass: boxing the larger variant would only make every
// user's forward function write `Box::new`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Objective {
    /// A classifier: logits `[n, classes]` and class labels `[n]`; the loss
    /// of example i is the softmax cross-entropy of its row.
    Classification {
        /// Logits, one row per example.
        logits: Tensor<2>,
        /// Class index of each example.
        labels: Tensor<1, Int>,
    },
    /// Any other model: the loss of each example, `[n]`. Everything but the
    /// Monte-Carlo Fisher works from these alone.
    Losses(Tensor<1>),
}

impl Objective {
    /// The per-example losses `[n]`.
    pub fn losses(&self) -> Tensor<1> {
        match self {
            Objective::Classification { logits, labels } => {
                cross_entropy_per_example(logits.clone(), labels.clone())
            }
            Objective::Losses(l) => l.clone(),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            Objective::Classification { logits, .. } => logits.dims()[0],
            Objective::Losses(l) => l.dims()[0],
        }
    }

    /// True when the forward pass saw no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Softmax cross-entropy of each row of `logits` `[n, classes]` against
/// `labels` `[n]`.
pub fn cross_entropy_per_example(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let n = labels.dims()[0];
    let picked = activation::log_softmax(logits, 1).gather(1, labels.reshape([n, 1]));
    picked.reshape([n]).neg()
}

/// Class labels as an integer tensor on `device`.
pub fn labels_tensor(labels: &[u8], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let values: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
    Tensor::from_data(TensorData::new(values, [labels.len()]), device)
}

/// Number of rows of `logits` whose arg-max equals the label.
pub fn count_correct(logits: &Tensor<2>, labels: &Tensor<1, Int>) -> Result<usize> {
    let n = labels.dims()[0];
    let predicted = logits.clone().inner().argmax(1).reshape([n]);
    let hits = predicted.equal(labels.clone().inner()).int().sum();
    let value = hits
        .into_data()
        .iter::<i64>()
        .next()
        .ok_or_else(|| CovnoiseError::Backend("empty accuracy count".into()))?;
    Ok(value as usize)
}

/// A batch the noise stage can split: micro-batches and the shards of a
/// data-parallel run are contiguous slices.
pub trait Examples: Sized {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Examples `start..start + len` (a view where the backend allows).
    fn slice(&self, start: usize, len: usize) -> Self;
    /// True when the batch holds no example.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Inputs of any rank (first dimension the example) with one integer target
/// per example: the shape of most burn classification batches.
impl<const D: usize> Examples for (Tensor<D>, Tensor<1, Int>) {
    fn len(&self) -> usize {
        self.1.dims()[0]
    }

    fn slice(&self, start: usize, len: usize) -> Self {
        (
            self.0.clone().narrow(0, start, len),
            self.1.clone().narrow(0, start, len),
        )
    }
}
