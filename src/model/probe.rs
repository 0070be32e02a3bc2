//! Per-example output gradients of burn layers, from the same backward pass
//! as the mean gradient.
//!
//! burn 0.22 has no backward hooks and no per-sample gradients, so a model
//! opts in by routing its layers through [`Probes`]: `probes.linear(&self.fc,
//! x)` instead of `self.fc.forward(x)`. When the probes are on, the layer's
//! output gets a zero "probe" leaf added, and after backward the probe's
//! gradient is the gradient of the objective with respect to the layer's
//! pre-activation output, one row per example (BackPACK's quantity, without
//! storing per-example weight gradients). `probes.conv2d(&self.conv, x)` does
//! the same for burn's `Conv2d`. When they are off, the call is the plain
//! layer. The model's struct keeps burn's own layers, so its records and
//! optimizers are unchanged.

use burn::module::ParamId;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::{Gradients, Tensor};

use crate::error::{CovnoiseError, Result};
use crate::kernels::{self, padding_pairs};

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

/// A probed `Conv2d` layer's per-example factors after backward (same
/// convention as [`LinearFactors`]).
#[derive(Debug, Clone)]
pub struct ConvFactors {
    /// The layer's weight `[out, in, kh, kw]`.
    pub weight: ParamId,
    /// The layer's bias `[out]`, if it has one.
    pub bias: Option<ParamId>,
    /// Layer input `[B, in, H, W]`, before padding (no autodiff graph).
    pub input: Tensor<4>,
    /// Output gradients `delta`, `[B, out, H', W']`.
    pub output_grad: Tensor<4>,
    /// Kernel size `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Dilation `[dh, dw]`.
    pub dilation: [usize; 2],
    /// Zero padding `[(top, bottom), (left, right)]` as the layer applied it.
    pub padding: [(usize, usize); 2],
}

/// One probed layer's factors.
#[derive(Debug, Clone)]
pub enum LayerFactors {
    /// A `Linear` layer.
    Linear(LinearFactors),
    /// A `Conv2d` layer.
    Conv2d(ConvFactors),
}

impl LayerFactors {
    /// The layer's weight and bias.
    pub fn params(&self) -> (ParamId, Option<ParamId>) {
        match self {
            LayerFactors::Linear(f) => (f.weight, f.bias),
            LayerFactors::Conv2d(f) => (f.weight, f.bias),
        }
    }
}

// A handful per forward pass: the variants' size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Recorded {
    Linear {
        weight: ParamId,
        bias: Option<ParamId>,
        input: Tensor<2>,
        probe: Tensor<2>,
    },
    Conv2d {
        factors: ConvFactors,
        probe: Tensor<4>,
    },
    /// A layer the estimators cannot take apart (grouped convolution).
    Unsupported(String),
}

/// The recorder a model's forward pass routes its probe-aware layers through.
#[derive(Debug, Default)]
pub struct Probes {
    enabled: bool,
    layers: Vec<Recorded>,
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
        self.layers.push(Recorded::Linear {
            weight: layer.weight.id,
            bias: layer.bias.as_ref().map(|b| b.id),
            input,
            probe: probe.clone(),
        });
        z + probe
    }

    /// `layer.forward(x)` for images `x` of shape `[B, C, H, W]`, recording
    /// the layer when the probes are on. The convolution runs on
    /// [`crate::kernels::conv2d`]: the fast kernels on flex, burn's op
    /// elsewhere.
    pub fn conv2d(&mut self, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        if !self.enabled {
            return kernels::conv2d_layer(layer, x);
        }
        if layer.groups != 1 {
            self.layers.push(Recorded::Unsupported(format!(
                "a Conv2d layer with {} groups (the exact estimator handles groups = 1)",
                layer.groups
            )));
            return kernels::conv2d_layer(layer, x);
        }
        let [_, _, h, w] = x.dims();
        let input = x.clone().detach().inner();
        let z = kernels::conv2d_layer(layer, x);
        let probe = Tensor::<4>::zeros(z.dims(), &z.device()).require_grad();
        let factors = ConvFactors {
            weight: layer.weight.id,
            bias: layer.bias.as_ref().map(|b| b.id),
            input,
            // Filled from the probe's gradient after backward.
            output_grad: Tensor::<4>::zeros([0, 0, 0, 0], &z.device().inner()),
            kernel: layer.kernel_size,
            stride: layer.stride,
            dilation: layer.dilation,
            padding: padding_pairs(&layer.padding, [h, w], layer.kernel_size, layer.stride),
        };
        self.layers.push(Recorded::Conv2d {
            factors,
            probe: probe.clone(),
        });
        z + probe
    }

    /// Reads the recorded layers' output gradients from `grads`.
    pub fn factors(&self, grads: &Gradients) -> Result<Vec<LayerFactors>> {
        let missing = || {
            CovnoiseError::Unsupported(
                "a probe received no gradient: the model must live on an autodiff device (device.autodiff()) and its probed layers must reach the loss".into(),
            )
        };
        self.layers
            .iter()
            .map(|layer| match layer {
                Recorded::Linear {
                    weight,
                    bias,
                    input,
                    probe,
                } => Ok(LayerFactors::Linear(LinearFactors {
                    weight: *weight,
                    bias: *bias,
                    input: input.clone(),
                    output_grad: probe.grad(grads).ok_or_else(missing)?,
                })),
                Recorded::Conv2d { factors, probe } => Ok(LayerFactors::Conv2d(ConvFactors {
                    output_grad: probe.grad(grads).ok_or_else(missing)?,
                    ..factors.clone()
                })),
                Recorded::Unsupported(what) => Err(CovnoiseError::Unsupported(format!(
                    "{what} has no per-example gradient rule; use --estimator microbatch"
                ))),
            })
            .collect()
    }
}
