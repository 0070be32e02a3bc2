//! Models as plain burn modules, and what the noise stage needs from any
//! model: a forward pass that returns per-example losses ([`Objective`]),
//! batches it can slice ([`Examples`]), and, for the per-example
//! estimators, layers routed through [`Probes`].
//!
//! covnoise's own models ([`Mlp`], [`LeNet5`], [`Vgg`], [`ResNet`], one
//! [`Network`] for the command line) are users of this API like anyone's.

pub mod init;
mod lenet;
mod mlp;
mod network;
mod norm;
mod objective;
mod probe;
mod resnet;
mod vgg;

pub use lenet::LeNet5;
pub use mlp::{Mlp, MlpConfig, Normalization};
pub use network::{Architecture, Network, NetworkConfig};
pub use norm::GhostBatchNorm;
pub use objective::{Examples, Objective, count_correct, cross_entropy_per_example, labels_tensor};
pub use probe::{ConvFactors, LayerFactors, LinearFactors, Probes};
pub use resnet::{BasicBlock, ResNet};
pub use vgg::{ConvBn, Vgg};

use burn::tensor::{Int, Tensor};

use crate::error::Result;
use crate::tensor_util::scalar;

/// One labelled batch on a device: inputs (first dimension the example) and
/// one class label per example.
#[derive(Debug, Clone)]
pub struct Batch<const D: usize = 2> {
    /// Inputs, e.g. `[B, features]` or `[B, C, H, W]`.
    pub x: Tensor<D>,
    /// Class labels `[B]`.
    pub labels: Tensor<1, Int>,
}

impl<const D: usize> Examples for Batch<D> {
    fn len(&self) -> usize {
        self.labels.dims()[0]
    }

    fn slice(&self, start: usize, len: usize) -> Self {
        Batch {
            x: self.x.clone().narrow(0, start, len),
            labels: self.labels.clone().narrow(0, start, len),
        }
    }
}

/// How the examples of a batch interact in the forward pass. Per-example
/// gradients exist only for independent examples; a batch may be split into
/// micro-batches or shards only along group boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coupling {
    /// Each example's loss depends on that example alone.
    Independent,
    /// Examples interact within consecutive groups of this size (ghost batch
    /// normalization).
    Groups(usize),
    /// Examples interact across the whole batch (batch normalization).
    WholeBatch,
}

impl Coupling {
    /// The coupling of a model with parameter table `table` when the user
    /// declared none: batch normalization (a submodule whose type name ends
    /// in `BatchNorm`) couples the whole batch.
    pub fn detect(table: &crate::params::ParamTable) -> Self {
        if table.batch_norm().is_some() {
            Coupling::WholeBatch
        } else {
            Coupling::Independent
        }
    }
}

/// Mean cross-entropy of `logits` `[B, classes]` against `labels`, and the
/// number of arg-max predictions equal to the label.
pub fn cross_entropy_and_correct(
    logits: &Tensor<2>,
    labels: &Tensor<1, Int>,
) -> Result<(f64, usize)> {
    let loss = scalar(cross_entropy_per_example(logits.clone(), labels.clone()).mean());
    Ok((loss, count_correct(logits, labels)?))
}
