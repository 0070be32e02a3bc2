//! Batch normalization through the probes. It tells the noise stage which
//! examples normalize together, so that micro-batches and chunks keep its
//! groups whole (see [`crate::model::Coupling`]). Its examples are not
//! independent, so its scale and shift have no per-example gradients; but
//! over micro-batches made of whole normalization groups each micro-batch
//! is a model of its own, and its gradient is the sum over its examples of
//! `Σ_p δ_ip x̂_ip` (scale) and `Σ_p δ_ip` (shift), δ the gradient at the
//! layer's output ([`BatchNormRule`]: group gradients only). The same holds
//! for every other layer of such a model, so micro-batch gradients come
//! from one pass over the batch there too.

use burn::module::{Param, ParamId};
use burn::tensor::Tensor;

use super::rule::ExactRule;
use super::{Mode, NormGroups, Probes, Recorded};
use crate::error::{CovnoiseError, Result};
use crate::kernels::NormSink;
use crate::model::GhostBatchNorm;
use crate::tensor_util::from_vec;

/// What a probed [`GhostBatchNorm`] records: where its scale's and
/// shift's gradients per normalization group come from, and the examples
/// it normalizes together. It gives group gradients over whole
/// normalization groups only: asked for per-example gradients, or for
/// groups that split a normalization group, it refuses.
#[derive(Debug, Clone)]
pub struct BatchNormRule {
    /// The scale gamma `[C]`.
    pub gamma: ParamId,
    /// The shift beta `[C]`.
    pub beta: ParamId,
    /// Where the per-group sums come from.
    pub source: BatchNormSource,
    /// Examples per normalization group (0: the whole batch).
    pub group: usize,
}

/// Where a [`BatchNormRule`]'s sums come from.
// One per batch norm and pass: the variants' size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BatchNormSource {
    /// The fast kernel's backward step, which forms `Σ dy x̂` and `Σ dy`
    /// per normalization group anyway ([`NormSink`]); the layer's output
    /// gradient is not kept.
    Sink(NormSink),
    /// The normalized input `x̂` `[B, C, P]` (P positions per channel),
    /// without autodiff graph, with the output gradient from a probe
    /// (burn's ops, where the kernel does not run).
    Normalized(Tensor<3>),
}

impl BatchNormRule {
    /// Whether groups of `group_size` examples are unions of whole
    /// normalization groups of a batch of `batch`.
    fn whole(&self, group_size: usize, batch: usize) -> bool {
        match self.group {
            0 => group_size == batch,
            g => group_size > 0 && group_size.is_multiple_of(g),
        }
    }
}

impl ExactRule for BatchNormRule {
    fn layer(&self) -> String {
        "BatchNorm".into()
    }

    fn params(&self) -> Vec<ParamId> {
        vec![self.gamma, self.beta]
    }

    fn per_example(
        &self,
        _index: usize,
        _output_grad: &Tensor<2>,
        _start: usize,
        _len: usize,
    ) -> Result<Tensor<2>> {
        Err(CovnoiseError::Unsupported(
            "batch normalization couples the examples it normalizes together: its scale and shift have gradients per micro-batch of whole normalization groups, not per example".into(),
        ))
    }

    fn group_sums(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<Tensor<2>> {
        let b = output_grad.dims()[0];
        if !self.whole(group_size, b) || !b.is_multiple_of(group_size) {
            return None;
        }
        let groups = b / group_size;
        match &self.source {
            BatchNormSource::Sink(sink) => {
                // Each micro-batch is `per` consecutive normalization
                // groups: their sums add.
                let sums = sink.groups()?;
                if sums.groups == 0 || !group_size.is_multiple_of(b / sums.groups) {
                    return None;
                }
                let values = if index == 0 { sums.gamma } else { sums.beta };
                let c = values.len() / sums.groups;
                let per = sums.groups / groups;
                let mut out = vec![0.0f32; groups * c];
                for (k, row) in values.chunks_exact(c).enumerate() {
                    for (o, v) in out[(k / per) * c..][..c].iter_mut().zip(row) {
                        *o += v;
                    }
                }
                Some(from_vec(out, [groups, c], &output_grad.device()))
            }
            BatchNormSource::Normalized(normalized) => {
                let [_, c, p] = normalized.dims();
                let d = output_grad.clone().reshape([b, c, p]);
                let per_example = if index == 0 {
                    (d * normalized.clone()).sum_dim(2)
                } else {
                    d.sum_dim(2)
                };
                Some(
                    per_example
                        .reshape([groups, group_size, c])
                        .sum_dim(1)
                        .reshape([groups, c]),
                )
            }
        }
    }
}

impl Probes {
    /// `layer` applied to `x` `[B, C, ...]` (features `[B, F]` or images
    /// `[B, C, H, W]`), recording how it groups examples; when the probes
    /// are on, recording its [`BatchNormRule`] (on the fast kernel, a sink
    /// for its backward step's per-group sums; elsewhere the normalized
    /// input, the scale and shift then applied outside the normalization).
    /// In a pass that stands for one pass per group of examples (group
    /// gradients, shifted passes), a batch norm over the whole batch
    /// normalizes each group alone, as that group's own pass would.
    pub fn batch_norm<const D: usize>(
        &mut self,
        layer: &GhostBatchNorm,
        x: Tensor<D>,
    ) -> Tensor<D> {
        if self.mode != Mode::Off {
            self.norms.push(NormGroups {
                gamma: layer.gamma.id,
                group: layer.group,
            });
        }
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        // A pass standing for one pass per group of examples: a batch norm
        // over the whole batch normalizes each group alone.
        let regrouped;
        let layer = match self.norm_group {
            Some(g)
                if layer.group == 0
                    && self.mode != Mode::Observe
                    && g < b
                    && b.is_multiple_of(g) =>
            {
                let mut l = layer.clone();
                l.group = g;
                regrouped = l;
                &regrouped
            }
            _ => layer,
        };
        let rest: usize = dims[2..].iter().product();
        let images = x.reshape([b, c, rest, 1]);
        match self.mode {
            Mode::Off => layer.forward_images(images).reshape(dims),
            Mode::Observe => {
                self.layers.push(Recorded::Seen {
                    layer: "BatchNorm".into(),
                    params: vec![layer.gamma.id, layer.beta.id],
                });
                layer.forward_images(images).reshape(dims)
            }
            Mode::Shifted => {
                let s = self.group_shifts().expect("a shifted pass has shifts");
                // On the fast kernel each normalization group takes its
                // micro-batch's scale and shift; elsewhere they are applied
                // after the normalization.
                let (gamma, beta) = (
                    s.per_group_values(&layer.gamma),
                    s.per_group_values(&layer.beta),
                );
                if let Some(y) = layer.forward_images_per_group(images.clone(), gamma, beta) {
                    return y.reshape(dims);
                }
                let normalized = layer.normalized_images(images).reshape(dims);
                s.affine(normalized, Some(&layer.gamma), Some(&layer.beta), 1)
            }
            Mode::On => {
                let rule = |source| BatchNormRule {
                    gamma: layer.gamma.id,
                    beta: layer.beta.id,
                    source,
                    group: layer.group,
                };
                // On the fast kernel its backward step leaves the sums (no
                // probe); elsewhere the scale and shift are applied outside
                // the normalization, which hands over x̂ for the rule.
                let sink = NormSink::new();
                let device = images.device().inner();
                // On a frozen copy nothing before the layer may take a
                // gradient (a batch norm on the inputs): a tracked copy of
                // the scale makes its backward step run and fill the sink;
                // the copy's own gradient is not read.
                let tracked;
                let sunk_layer = if self.frozen && !layer.gamma.is_require_grad() {
                    tracked = GhostBatchNorm {
                        gamma: Param::from_tensor(layer.gamma.val()),
                        ..layer.clone()
                    };
                    &tracked
                } else {
                    layer
                };
                if let Some(y) = sunk_layer.forward_images_sunk(images.clone(), sink.clone()) {
                    self.layers.push(Recorded::NormSunk {
                        rule: Box::new(rule(BatchNormSource::Sink(sink))),
                        examples: b,
                        device,
                    });
                    return y.reshape(dims);
                }
                let normalized = layer.normalized_images(images);
                let recorded = normalized.clone().detach().inner().reshape([b, c, rest]);
                let shape = [1, c, 1, 1];
                let y =
                    normalized * layer.gamma.val().reshape(shape) + layer.beta.val().reshape(shape);
                let source = BatchNormSource::Normalized(recorded);
                self.layer_with(y.reshape(dims), || rule(source), true)
            }
        }
    }
}
