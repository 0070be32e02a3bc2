//! Per-example output gradients of burn layers, from the same backward pass
//! as the mean gradient.
//!
//! burn 0.22 has no backward hooks and no per-sample gradients, so a model
//! opts in by routing its layers through [`Probes`]: `probes.linear(&self.fc,
//! x)` instead of `self.fc.forward(x)`. When the probes are on, the layer's
//! output gets a zero "probe" leaf added, and after backward the probe's
//! gradient is the gradient of the objective with respect to the layer's
//! pre-activation output, one row per example (BackPACK's quantity, without
//! storing per-example weight gradients). When they are off, the call is the
//! plain layer. The model's struct keeps burn's own layers, so its records
//! and optimizers are unchanged.

use burn::module::ParamId;
use burn::nn::Linear;
use burn::tensor::{Gradients, Tensor};

use crate::error::{CovnoiseError, Result};

/// A probed layer's per-example factors after backward.
///
/// Convention: `output_grad` row i is the gradient of the differentiated
/// objective with respect to example i's layer output; the estimators scale
/// it to the gradient of example i's own loss.
#[derive(Debug, Clone)]
pub struct LinearFactors {
    /// The layer's weight `[in, out]`.
    pub weight: ParamId,
    /// The layer's bias `[out]`, if it has one.
    pub bias: Option<ParamId>,
    /// Layer input `a`, `[B, in]` (no autodiff graph).
    pub input: Tensor<2>,
    /// Output gradients `delta`, `[B, out]`.
    pub output_grad: Tensor<2>,
}

#[derive(Debug)]
struct LinearProbe {
    weight: ParamId,
    bias: Option<ParamId>,
    input: Tensor<2>,
    probe: Tensor<2>,
}

/// The recorder a model's forward pass routes its probe-aware layers through.
#[derive(Debug, Default)]
pub struct Probes {
    enabled: bool,
    linear: Vec<LinearProbe>,
}

impl Probes {
    /// Probes that record nothing: every layer runs as the plain burn layer.
    pub fn off() -> Self {
        Self::default()
    }

    /// Probes that record every probe-aware layer of the next forward pass.
    pub fn on() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// Whether layers are being recorded.
    pub fn is_on(&self) -> bool {
        self.enabled
    }

    /// `layer.forward(x)` for `x` of shape `[B, in]` (one row per example),
    /// recording the layer when the probes are on.
    pub fn linear(&mut self, layer: &Linear, x: Tensor<2>) -> Tensor<2> {
        if !self.enabled {
            return layer.forward(x);
        }
        let input = x.clone().detach().inner();
        let z = layer.forward(x);
        let probe = Tensor::<2>::zeros(z.dims(), &z.device()).require_grad();
        self.linear.push(LinearProbe {
            weight: layer.weight.id,
            bias: layer.bias.as_ref().map(|b| b.id),
            input,
            probe: probe.clone(),
        });
        z + probe
    }

    /// Reads the recorded layers' output gradients from `grads`.
    pub fn linear_factors(&self, grads: &Gradients) -> Result<Vec<LinearFactors>> {
        self.linear
            .iter()
            .map(|p| {
                let output_grad = p.probe.grad(grads).ok_or_else(|| {
                    CovnoiseError::Unsupported(
                        "a probe received no gradient: the model must live on an autodiff device (device.autodiff()) and its probed layers must reach the loss".into(),
                    )
                })?;
                Ok(LinearFactors {
                    weight: p.weight,
                    bias: p.bias,
                    input: p.input.clone(),
                    output_grad,
                })
            })
            .collect()
    }
}
