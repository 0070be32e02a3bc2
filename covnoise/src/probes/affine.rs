//! The exact rule of a normalization's affine part (burn's `LayerNorm` and
//! `GroupNorm`): the output is `x̂ * gamma + beta` per feature, so example
//! i's gradients are `Σ_p x̂_ip δ_ip` (gamma) and `Σ_p δ_ip` (beta), over
//! the positions p that share a feature.

use burn::module::ParamId;
use burn::nn::{GroupNorm, LayerNorm, norm::GroupNormConfig};
use burn::tensor::Tensor;

use super::Probes;
use super::rule::ExactRule;
use crate::error::Result;

/// Where the feature sits in a normalization's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureAxis {
    /// `[B, ..., F]`: the last dimension (LayerNorm).
    Last,
    /// `[B, C, ...]`: the channel, second (GroupNorm).
    Channel,
}

/// What a probed normalization records: its normalized input `x̂`.
#[derive(Debug, Clone)]
pub struct AffineRule {
    /// The scale gamma `[F]`, if the layer has one.
    pub gamma: Option<ParamId>,
    /// The shift beta `[F]`, if the layer has one.
    pub beta: Option<ParamId>,
    /// The normalized input, in the output's layout, flattened per example
    /// to `[B, n]`, without autodiff graph.
    pub normalized: Tensor<2>,
    /// Features F (gamma's length).
    pub features: usize,
    /// Where the feature sits in the output.
    pub axis: FeatureAxis,
    /// `"LayerNorm"` or `"GroupNorm"`, for messages.
    pub kind: &'static str,
}

impl AffineRule {
    /// `values` `[len, n]` summed over the positions of each feature: `[len, F]`.
    fn per_feature(&self, values: Tensor<2>, len: usize) -> Tensor<2> {
        let f = self.features;
        let positions = values.dims()[1] / f.max(1);
        match self.axis {
            FeatureAxis::Last => values.reshape([len, positions, f]).sum_dim(1),
            FeatureAxis::Channel => values.reshape([len, f, positions]).sum_dim(2),
        }
        .reshape([len, f])
    }
}

impl ExactRule for AffineRule {
    fn layer(&self) -> String {
        self.kind.into()
    }

    /// gamma (if any), then beta (if any).
    fn params(&self) -> Vec<ParamId> {
        self.gamma.into_iter().chain(self.beta).collect()
    }

    fn per_example(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<2>> {
        let d = output_grad.clone().narrow(0, start, len);
        let is_gamma = self.gamma.is_some() && index == 0;
        Ok(if is_gamma {
            let x = self.normalized.clone().narrow(0, start, len);
            self.per_feature(x * d, len)
        } else {
            self.per_feature(d, len)
        })
    }
}

impl Probes {
    /// `layer.forward(x)` for `x` of shape `[B, ..., d]` (normalized over
    /// the last dimension), recording the layer when the probes are on.
    pub fn layer_norm<const D: usize>(&mut self, layer: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
        if self.is_off() {
            return layer.forward(x);
        }
        if let Some(shifts) = self.group_shifts() {
            return shifts.layer_norm(layer, x);
        }
        let dims = x.dims();
        let features = dims[D - 1];
        let b = dims[0];
        let input = x.clone().detach();
        let z = layer.forward(x);
        self.layer_with(
            z,
            || {
                // The layer itself with unit scale and no shift gives the
                // normalized input with the layer's own epsilon (a private field).
                let mut unit = layer.clone();
                let device = input.device().inner();
                unit.gamma = burn::module::Param::from_tensor(Tensor::ones([features], &device));
                unit.beta = None;
                let normalized = unit.forward(input.inner());
                let n = normalized.dims()[1..].iter().product();
                AffineRule {
                    gamma: Some(layer.gamma.id),
                    beta: layer.beta.as_ref().map(|b| b.id),
                    normalized: normalized.reshape([b, n]),
                    features,
                    axis: FeatureAxis::Last,
                    kind: "LayerNorm",
                }
            },
            true,
        )
    }

    /// `layer.forward(x)` for `x` of shape `[B, C, ...]` (C channels in
    /// groups), recording the layer's affine parameters when the probes are
    /// on.
    pub fn group_norm<const D: usize>(&mut self, layer: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
        if self.is_off() || (layer.gamma.is_none() && layer.beta.is_none()) {
            return layer.forward(x);
        }
        if let Some(shifts) = self.group_shifts() {
            return shifts.group_norm(layer, x);
        }
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let input = x.clone().detach();
        let z = layer.forward(x);
        self.layer_with(
            z,
            || {
                let device = input.device().inner();
                let unit = GroupNormConfig::new(layer.num_groups, layer.num_channels)
                    .with_epsilon(layer.epsilon)
                    .with_affine(false)
                    .init(&device);
                let normalized = unit.forward(input.inner());
                let n = normalized.dims()[1..].iter().product();
                AffineRule {
                    gamma: layer.gamma.as_ref().map(|g| g.id),
                    beta: layer.beta.as_ref().map(|b| b.id),
                    normalized: normalized.reshape([b, n]),
                    features: c,
                    axis: FeatureAxis::Channel,
                    kind: "GroupNorm",
                }
            },
            true,
        )
    }
}
