//! Models that expose, from one forward + backward pass, the mean gradient
//! and (on request) the per-example quantities the second-moment estimators
//! need.
//!
//! Parameters are rank-2 tensors (a Linear weight is `[in, out]`, a bias or a
//! normalization scale is `[1, out]`), so every later stage (moments, noise,
//! optimizer, all-reduce) handles one uniform list of tensors.

mod mlp;

pub use mlp::{Mlp, MlpConfig, Normalization};

use burn::tensor::{Int, Tensor, activation};

use crate::error::{CovnoiseError, Result};
use crate::tensor_util::scalar;

/// What a parameter is, so that estimators know which per-example rule
/// applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ParamKind {
    /// Weight `[in, out]` of Linear layer `layer`.
    LinearWeight,
    /// Bias `[1, out]` of a Linear layer.
    LinearBias,
    /// Batch-norm scale (gamma) `[1, features]`.
    NormScale,
    /// Batch-norm shift (beta) `[1, features]`.
    NormShift,
}

/// Name, kind and shape of one parameter tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ParamInfo {
    /// Human-readable name, e.g. `layer1.weight`.
    pub name: String,
    /// What the parameter is.
    pub kind: ParamKind,
    /// Its shape `[rows, cols]`.
    pub shape: [usize; 2],
}

/// How examples of a batch interact in the forward pass. Per-example
/// gradients exist only for independent examples; a batch may be split into
/// micro-batches or shards only along group boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coupling {
    /// Each example's loss depends on that example alone.
    Independent,
    /// Examples interact within consecutive groups of this size (ghost batch
    /// normalization).
    Groups(usize),
    /// Examples interact across the whole batch (batch normalization).
    WholeBatch,
}

/// One labelled batch: features `[B, input]` on the model's device and the
/// class labels on the host.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Features, `[B, input]`.
    pub x: Tensor<2>,
    /// Labels, one per row of `x`.
    pub labels: Vec<u8>,
}

impl Batch {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows `start..start + len` as a new batch (a view, no copy of `x`).
    pub fn slice(&self, start: usize, len: usize) -> Batch {
        Batch {
            x: self.x.clone().narrow(0, start, len),
            labels: self.labels[start..start + len].to_vec(),
        }
    }
}

/// What a backward pass should produce besides the loss.
#[derive(Debug, Clone, Default)]
pub struct BackwardRequest<'a> {
    /// Per-example loss weights `w_i`: the differentiated loss is
    /// `(1/B) sum_i w_i l_i` (default all ones). Used by the multiplicative
    /// full-Fisher sampler.
    pub example_weights: Option<&'a [f32]>,
    /// Labels to differentiate against instead of the batch's own (the
    /// Monte-Carlo Fisher samples them from the model).
    pub labels: Option<&'a [u8]>,
    /// Return per-example factors of every Linear layer.
    pub per_example: bool,
    /// Skip the parameter gradients (only per-example factors are wanted).
    pub skip_param_grads: bool,
    /// Update running statistics (batch norm) from this pass.
    pub update_running_stats: bool,
}

/// Per-example factors of one Linear layer `z_i = a_i W + b`.
///
/// Convention: `output_grad` row i is `delta_i = d(w_i l_i)/d z_i`, the
/// gradient of example i's own (weighted) loss, not of the batch mean. Then
/// example i's weight gradient is `a_i^T delta_i` and its bias gradient is
/// `delta_i`.
#[derive(Debug, Clone)]
pub struct LinearFactors {
    /// Index of the layer's weight in the parameter list.
    pub weight: usize,
    /// Index of the layer's bias in the parameter list.
    pub bias: usize,
    /// Layer input `a`, `[B, in]`.
    pub input: Tensor<2>,
    /// Per-example output gradients `delta`, `[B, out]`.
    pub output_grad: Tensor<2>,
}

/// Result of one forward + backward pass.
#[derive(Debug, Clone)]
pub struct BackwardOutput {
    /// Gradient of the (weighted) mean loss for each parameter; empty when
    /// [`BackwardRequest::skip_param_grads`] was set.
    pub grads: Vec<Tensor<2>>,
    /// Unweighted mean cross-entropy against the batch's own labels.
    pub loss: f64,
    /// Number of examples whose arg-max prediction equals the batch label.
    pub correct: usize,
    /// Logits `[B, classes]` (no autodiff graph).
    pub logits: Tensor<2>,
    /// Per-example factors, one per Linear layer, when requested.
    pub factors: Vec<LinearFactors>,
}

/// A classifier trained by covnoise.
pub trait GradientModel {
    /// The parameters, in a fixed order.
    fn params(&self) -> &[Tensor<2>];
    /// Mutable access for the optimizer.
    fn params_mut(&mut self) -> &mut [Tensor<2>];
    /// Name, kind and shape of each parameter (same order as `params`).
    fn param_info(&self) -> &[ParamInfo];
    /// How examples of a training batch interact.
    fn coupling(&self) -> Coupling;
    /// One forward + backward pass over `batch`.
    fn backward(&mut self, batch: &Batch, request: &BackwardRequest) -> Result<BackwardOutput>;
    /// Logits in evaluation mode (running statistics, no autodiff).
    fn logits(&self, x: Tensor<2>) -> Tensor<2>;
    /// Non-parameter state that must stay identical across replicas and be
    /// saved with the model (batch-norm running statistics).
    fn buffers(&self) -> Vec<Tensor<2>>;
    /// Replaces the buffers (same order as [`GradientModel::buffers`]), e.g.
    /// with their average over replicas.
    fn set_buffers(&mut self, buffers: Vec<Tensor<2>>) -> Result<()>;

    /// Total number of scalar parameters d.
    fn num_params(&self) -> usize {
        self.param_info()
            .iter()
            .map(|p| p.shape[0] * p.shape[1])
            .sum()
    }
}

/// Mean cross-entropy of `logits` `[B, classes]` against `labels`, and the
/// number of arg-max predictions equal to the label.
pub fn cross_entropy_and_correct(logits: &Tensor<2>, labels: &[u8]) -> Result<(f64, usize)> {
    let classes = logits.dims()[1];
    let targets = mlp::weighted_targets(labels, None, classes, &logits.device())?;
    let loss = -scalar((activation::log_softmax(logits.clone(), 1) * targets).sum());
    let predicted: Tensor<2, Int> = logits.clone().argmax(1);
    let predicted = predicted
        .into_data()
        .try_into_vec_as::<i64>()
        .map_err(|e| CovnoiseError::Backend(format!("{e:?}")))?;
    let correct = predicted
        .iter()
        .zip(labels)
        .filter(|(p, y)| **p == **y as i64)
        .count();
    Ok((loss, correct))
}
