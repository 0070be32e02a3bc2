//! What the noise stage needs from any burn model: a forward pass that
//! returns per-example losses ([`Objective`]), batches it can slice
//! ([`Examples`]), how its examples interact ([`Coupling`]), and, for the
//! per-example estimators, layers routed through [`Probes`] (see
//! [`crate::probes`]).
//!
//! The model zoo of the `covnoise` command (MLP, LeNet-5, VGG, ResNet) lives
//! in the `covnoise-lab` crate and uses this API like anyone's model.

mod norm;
mod objective;

pub use crate::probes::{NormGroups, Probes};
pub use norm::GhostBatchNorm;
pub use objective::{Examples, Objective, count_correct, cross_entropy_per_example, labels_tensor};

/// A model's forward pass as the noise stage calls it: `(model, batch,
/// probes) -> Objective`. Every function or closure of that shape is one
/// (a blanket implementation); the name only spares writing the `Fn` bound
/// out.
pub trait Forward<M, B>: Fn(&M, &B, &mut Probes) -> Objective {}

impl<M, B, F> Forward<M, B> for F where F: Fn(&M, &B, &mut Probes) -> Objective {}

use burn::tensor::{Int, Tensor};

use crate::error::{Remedy, Result};
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
    /// The coupling of a model with parameter table `table` from type names
    /// alone (no forward pass seen): batch normalization (a submodule whose
    /// type name ends in `BatchNorm`) couples the whole batch.
    pub fn detect(table: &crate::params::ParamTable) -> Self {
        if table.batch_norm().is_some() {
            Coupling::WholeBatch
        } else {
            Coupling::Independent
        }
    }

    /// The coupling of a model from its structure and one observed forward
    /// pass (`norms`: the batch norms routed through
    /// [`Probes::batch_norm`]), checked against the caller's declaration.
    ///
    /// - burn's `BatchNorm`, or a [`GhostBatchNorm`] over the whole batch,
    ///   couples the whole batch; a declaration of groups or independence is
    ///   refused naming the layer.
    /// - Ghost batch norms of groups g couple groups of lcm(g); a declared
    ///   group size must be a multiple of it (groups of that size are then
    ///   independent of each other).
    /// - A batch norm of another type, or one called without its probe,
    ///   cannot be checked: the declaration is believed, and without one the
    ///   whole batch is taken as coupled.
    /// - A model without batch norm is independent, unless declared
    ///   otherwise (a declaration can only make splitting stricter).
    pub fn resolve(
        table: &crate::params::ParamTable,
        norms: &[NormGroups],
        declared: Option<Coupling>,
    ) -> Result<Coupling> {
        use crate::error::CovnoiseError;
        let routed = |path: &str| {
            norms
                .iter()
                .find(|n| table.name_of(n.gamma) == format!("{path}.gamma"))
        };
        let mut whole: Option<String> = None;
        let mut unchecked = false;
        let mut group = 1usize;
        for (path, kind) in table.batch_norms() {
            let path = if path.is_empty() { "(the model)" } else { path };
            match routed(path) {
                Some(n) if n.group == 0 => {
                    whole.get_or_insert(format!("{path} (GhostBatchNorm over the whole batch)"));
                }
                Some(n) => group = lcm(group, n.group),
                None if kind == "BatchNorm" => {
                    whole.get_or_insert(format!("{path} (burn's BatchNorm)"));
                }
                None => unchecked = true,
            }
        }
        // Ghost batch norms routed through the probes but missing from the
        // table (frozen scale) still group examples.
        for n in norms {
            if n.group == 0 {
                whole.get_or_insert("a GhostBatchNorm over the whole batch".into());
            } else {
                group = lcm(group, n.group);
            }
        }
        let derived = if whole.is_some() {
            Coupling::WholeBatch
        } else if group > 1 {
            Coupling::Groups(group)
        } else {
            Coupling::Independent
        };
        if let Some(layer) = &whole {
            return match declared {
                None | Some(Coupling::WholeBatch) => Ok(Coupling::WholeBatch),
                Some(d) => Err(CovnoiseError::Refused {
                    problem: format!(
                        "the coupling was declared {d:?}, but {layer} normalizes over the whole batch"
                    ),
                    remedy: Remedy::GhostBatchNorm,
                }),
            };
        }
        if unchecked {
            // Nothing to check a declaration against.
            return Ok(declared.unwrap_or(Coupling::WholeBatch));
        }
        match (derived, declared) {
            (d, None) => Ok(d),
            (_, Some(Coupling::WholeBatch)) => Ok(Coupling::WholeBatch),
            (Coupling::Independent, Some(d)) => Ok(d),
            (Coupling::Groups(g), Some(Coupling::Groups(n))) if n.is_multiple_of(g) => {
                Ok(Coupling::Groups(n))
            }
            (Coupling::Groups(g), Some(d)) => Err(CovnoiseError::Unsupported(format!(
                "the coupling was declared {d:?}, but the model's ghost batch norms normalize groups of {g} examples together; declare Groups(n) with n a multiple of {g}, or none"
            ))),
            (Coupling::WholeBatch, _) => unreachable!("handled above"),
        }
    }
}

impl Coupling {
    /// Whether consecutive groups of `size` examples do not interact with
    /// each other (each is made of whole groups of examples that do), so
    /// that one pass over the batch gives each group's gradient exactly.
    pub fn keeps_whole(self, size: usize) -> bool {
        match self {
            Coupling::Independent => size > 0,
            Coupling::Groups(g) => size > 0 && size.is_multiple_of(g),
            Coupling::WholeBatch => false,
        }
    }
}

/// Least common multiple.
fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
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
