//! Per-example output gradients of burn layers, from the same backward pass
//! as the mean gradient, and the structure of a forward pass (which
//! parameters have per-example rules, which examples normalize together).
//!
//! burn 0.22 has no backward hooks and no per-sample gradients, so a model
//! opts in by routing its layers through [`Probes`]: `probes.linear(&self.fc,
//! x)` instead of `self.fc.forward(x)`. When the probes are on, the layer's
//! output gets a zero "probe" leaf added, and after backward the probe's
//! gradient is the gradient of the objective with respect to the layer's
//! output, one slice per example (BackPACK's quantity, without storing
//! per-example weight gradients). One rule per layer kind turns those into
//! per-example parameter gradients (see [`crate::moments::exact`]):
//!
//! | call | layer | input |
//! | --- | --- | --- |
//! | [`Probes::linear`] | `Linear` | `[B, ..., in]` (positions summed per example) |
//! | [`Probes::conv1d`] | `Conv1d` (groups 1) | `[B, C, L]` |
//! | [`Probes::conv2d`] | `Conv2d` (groups 1) | `[B, C, H, W]` |
//! | [`Probes::embedding`] | `Embedding` | tokens `[B, T]` |
//! | [`Probes::layer_norm`] | `LayerNorm` | `[B, ..., d]` |
//! | [`Probes::group_norm`] | `GroupNorm` | `[B, C, ...]` |
//! | [`Probes::batch_norm`] | [`GhostBatchNorm`] | `[B, C, ...]` (no per-example rule: it declares its groups) |
//!
//! When the probes are off, each call is the plain layer. The model's struct
//! keeps burn's own layers, so its records and optimizers are unchanged.

use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{Embedding, GroupNorm, LayerNorm, Linear, PaddingConfig1d, norm::GroupNormConfig};
use burn::tensor::{Gradients, Int, Tensor};

use super::GhostBatchNorm;
use crate::error::{CovnoiseError, Result};
use crate::kernels::{self, padding_pairs, same_padding};
use crate::params::ParamTable;

/// A probed `Linear` layer's per-example factors after backward.
///
/// Convention: `output_grad[i]` is the gradient of the differentiated
/// objective with respect to example i's layer output; the estimators scale
/// it to the gradient of example i's own loss. Example i's weight gradient is
/// `input[i]^T output_grad[i]`, its positions summed.
#[derive(Debug, Clone)]
pub struct LinearFactors {
    /// The layer's weight `[in, out]`.
    pub weight: ParamId,
    /// The layer's bias `[out]`, if it has one.
    pub bias: Option<ParamId>,
    /// Layer input `[B, T, in]`: T positions per example (1 for `[B, in]`;
    /// the product of the middle dimensions otherwise), no autodiff graph.
    pub input: Tensor<3>,
    /// Output gradients `[B, T, out]`.
    pub output_grad: Tensor<3>,
}

/// A probed `Conv2d` (or `Conv1d`, as height 1) layer's per-example factors
/// after backward (same convention as [`LinearFactors`]).
#[derive(Debug, Clone)]
pub struct ConvFactors {
    /// The layer's weight `[out, in, kh, kw]` (`[out, in, k]` for Conv1d).
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

/// A probed `Embedding`'s per-example factors after backward: example i's
/// gradient of table row v is the sum of `output_grad[i, t]` over the
/// positions t where `tokens[i, t] = v` (repeated tokens add up before the
/// square).
#[derive(Debug, Clone)]
pub struct EmbeddingFactors {
    /// The table `[vocabulary, d]`.
    pub weight: ParamId,
    /// Token ids `[B, T]`.
    pub tokens: Tensor<2, Int>,
    /// Rows of the table.
    pub vocabulary: usize,
    /// Output gradients `[B, T, d]`.
    pub output_grad: Tensor<3>,
}

/// A probed normalization's affine parameters (`LayerNorm`, `GroupNorm`):
/// the output is `normalized * gamma + beta` per feature, so example i's
/// gradients are `sum_p normalized[i, p] * output_grad[i, p]` (gamma) and
/// `sum_p output_grad[i, p]` (beta), over the positions p that share a
/// feature.
#[derive(Debug, Clone)]
pub struct AffineFactors {
    /// The scale gamma `[F]`, if the layer has one that trains.
    pub gamma: Option<ParamId>,
    /// The shift beta `[F]`, if the layer has one.
    pub beta: Option<ParamId>,
    /// The normalized input `[B, P, F]` (no autodiff graph).
    pub normalized: Tensor<3>,
    /// Output gradients `[B, P, F]`.
    pub output_grad: Tensor<3>,
}

/// One probed layer's factors.
#[derive(Debug, Clone)]
pub enum LayerFactors {
    /// A `Linear` layer.
    Linear(LinearFactors),
    /// A `Conv2d` or `Conv1d` layer.
    Conv2d(ConvFactors),
    /// An `Embedding`.
    Embedding(EmbeddingFactors),
    /// The affine part of a `LayerNorm` or `GroupNorm`.
    Affine(AffineFactors),
}

impl LayerFactors {
    /// The parameters the layer's rule covers.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            LayerFactors::Linear(f) => std::iter::once(f.weight).chain(f.bias).collect(),
            LayerFactors::Conv2d(f) => std::iter::once(f.weight).chain(f.bias).collect(),
            LayerFactors::Embedding(f) => vec![f.weight],
            LayerFactors::Affine(f) => f.gamma.into_iter().chain(f.beta).collect(),
        }
    }

    /// Examples the factors hold.
    pub fn examples(&self) -> usize {
        match self {
            LayerFactors::Linear(f) => f.output_grad.dims()[0],
            LayerFactors::Conv2d(f) => f.output_grad.dims()[0],
            LayerFactors::Embedding(f) => f.output_grad.dims()[0],
            LayerFactors::Affine(f) => f.output_grad.dims()[0],
        }
    }

    /// The same factors with the output gradients multiplied by `factor`
    /// (a chunk's share of its batch).
    pub fn scale_output_grad(self, factor: f32) -> Self {
        match self {
            LayerFactors::Linear(f) => LayerFactors::Linear(LinearFactors {
                output_grad: f.output_grad * factor,
                ..f
            }),
            LayerFactors::Conv2d(f) => LayerFactors::Conv2d(ConvFactors {
                output_grad: f.output_grad * factor,
                ..f
            }),
            LayerFactors::Embedding(f) => LayerFactors::Embedding(EmbeddingFactors {
                output_grad: f.output_grad * factor,
                ..f
            }),
            LayerFactors::Affine(f) => LayerFactors::Affine(AffineFactors {
                output_grad: f.output_grad * factor,
                ..f
            }),
        }
    }

    /// The factors of the examples of `self` followed by those of `other`
    /// (the same layer, two chunks of one batch).
    pub fn concat(self, other: Self) -> Result<Self> {
        fn cat<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
            Tensor::cat(vec![a, b], 0)
        }
        Ok(match (self, other) {
            (LayerFactors::Linear(a), LayerFactors::Linear(b)) => {
                LayerFactors::Linear(LinearFactors {
                    input: cat(a.input, b.input),
                    output_grad: cat(a.output_grad, b.output_grad),
                    ..a
                })
            }
            (LayerFactors::Conv2d(a), LayerFactors::Conv2d(b)) => {
                LayerFactors::Conv2d(ConvFactors {
                    input: cat(a.input, b.input),
                    output_grad: cat(a.output_grad, b.output_grad),
                    ..a
                })
            }
            (LayerFactors::Embedding(a), LayerFactors::Embedding(b)) => {
                LayerFactors::Embedding(EmbeddingFactors {
                    tokens: Tensor::cat(vec![a.tokens, b.tokens], 0),
                    output_grad: cat(a.output_grad, b.output_grad),
                    ..a
                })
            }
            (LayerFactors::Affine(a), LayerFactors::Affine(b)) => {
                LayerFactors::Affine(AffineFactors {
                    normalized: cat(a.normalized, b.normalized),
                    output_grad: cat(a.output_grad, b.output_grad),
                    ..a
                })
            }
            _ => {
                return Err(CovnoiseError::Shape(
                    "two chunks of a batch recorded different layers".into(),
                ));
            }
        })
    }
}

/// What the probes do with the layers routed through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Plain layers, nothing recorded.
    #[default]
    Off,
    /// Record which layers ran and how batch norms group examples, without
    /// probe tensors (a structural dry run).
    Observe,
    /// Record per-example factors for the estimators.
    On,
}

/// A batch normalization seen in a forward pass: its scale's parameter (when
/// it trains) and the examples it normalizes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormGroups {
    /// The scale gamma, which names the layer in messages.
    pub gamma: ParamId,
    /// Examples per normalization group (0: the whole batch).
    pub group: usize,
}

// A handful per forward pass: the variants' size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Recorded {
    /// A layer whose factors come from its probe's gradient.
    Probed {
        /// The factors, with an empty output gradient until backward.
        factors: LayerFactors,
        /// The zero leaf added to the output (flattened per example as the
        /// factors want it after backward).
        probe: Probe,
    },
    /// A layer seen in an observing pass: the parameters its rule covers.
    Seen(Vec<ParamId>),
    /// A layer the estimators cannot take apart, and why.
    Unsupported {
        /// Its parameters.
        params: Vec<ParamId>,
        /// What it is.
        what: String,
    },
}

/// A probe leaf of any rank.
#[derive(Debug)]
enum Probe {
    Rank3(Tensor<3>),
    Rank4(Tensor<4>),
}

/// The recorder a model's forward pass routes its probe-aware layers through.
#[derive(Debug, Default)]
pub struct Probes {
    mode: Mode,
    layers: Vec<Recorded>,
    norms: Vec<NormGroups>,
}

impl Probes {
    /// Probes that record nothing: every layer runs as the plain burn layer.
    pub fn off() -> Self {
        Self::default()
    }

    /// Probes that record every probe-aware layer of the next forward pass.
    pub fn on() -> Self {
        Self {
            mode: Mode::On,
            ..Self::default()
        }
    }

    /// Probes that only observe the forward pass: which parameters have a
    /// per-example rule and how batch norms group examples. Layers run plain.
    pub fn observe() -> Self {
        Self {
            mode: Mode::Observe,
            ..Self::default()
        }
    }

    /// Whether layers are being recorded for per-example factors.
    pub fn is_on(&self) -> bool {
        self.mode == Mode::On
    }

    /// The batch normalizations routed through [`Probes::batch_norm`] in
    /// the last forward pass (recorded when the probes are on or observing).
    pub fn norm_groups(&self) -> &[NormGroups] {
        &self.norms
    }

    /// The parameters covered by a per-example rule in the last forward
    /// pass, once per use (recorded when the probes are on or observing).
    pub fn covered_params(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| match l {
                Recorded::Probed { factors, .. } => factors.params(),
                Recorded::Seen(p) => p.clone(),
                Recorded::Unsupported { .. } => Vec::new(),
            })
            .collect()
    }

    /// `layer.forward(x)` for `x` of shape `[B, ..., in]`: the first
    /// dimension is the example, any dimensions between are positions (tokens,
    /// time steps) whose gradients add up within the example. Recorded when
    /// the probes are on.
    pub fn linear<const D: usize>(&mut self, layer: &Linear, x: Tensor<D>) -> Tensor<D> {
        if !self.record_only(weight_and_bias(&layer.weight, &layer.bias)) {
            return layer.forward(x);
        }
        let dims = x.dims();
        let (b, positions) = example_and_positions(&dims);
        let input = x
            .clone()
            .detach()
            .inner()
            .reshape([b, positions, dims[D - 1]]);
        let z = layer.forward(x);
        let out = z.dims()[D - 1];
        // The leaf has the factors' rank; the graph reshapes it to the
        // output's, so its gradient arrives in the factors' layout.
        let probe = Tensor::<3>::zeros([b, positions, out], &z.device()).require_grad();
        let device = input.device();
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Linear(LinearFactors {
                weight: layer.weight.id,
                bias: layer.bias.as_ref().map(|b| b.id),
                input,
                output_grad: Tensor::zeros([0, 0, 0], &device),
            }),
            probe: Probe::Rank3(probe.clone()),
        });
        let dims = z.dims();
        z + probe.reshape(dims)
    }

    /// `layer.forward(x)` for images `x` of shape `[B, C, H, W]`, recording
    /// the layer when the probes are on. The convolution runs on
    /// [`crate::kernels::conv2d`]: the fast kernels on flex, burn's op
    /// elsewhere.
    pub fn conv2d(&mut self, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let params = weight_and_bias(&layer.weight, &layer.bias);
        if !self.record_conv("Conv2d", layer.groups, params) {
            return kernels::conv2d_layer(layer, x);
        }
        let [_, _, h, w] = x.dims();
        let input = x.clone().detach().inner();
        let z = kernels::conv2d_layer(layer, x);
        let probe = Tensor::<4>::zeros(z.dims(), &z.device()).require_grad();
        let device = input.device();
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Conv2d(ConvFactors {
                weight: layer.weight.id,
                bias: layer.bias.as_ref().map(|b| b.id),
                input,
                output_grad: Tensor::zeros([0, 0, 0, 0], &device),
                kernel: layer.kernel_size,
                stride: layer.stride,
                dilation: layer.dilation,
                padding: padding_pairs(&layer.padding, [h, w], layer.kernel_size, layer.stride),
            }),
            probe: Probe::Rank4(probe.clone()),
        });
        z + probe
    }

    /// `layer.forward(x)` for sequences `x` of shape `[B, C, L]`, recording
    /// the layer when the probes are on (as a Conv2d of height 1).
    pub fn conv1d(&mut self, layer: &Conv1d, x: Tensor<3>) -> Tensor<3> {
        let params = weight_and_bias(&layer.weight, &layer.bias);
        if !self.record_conv("Conv1d", layer.groups, params) {
            return layer.forward(x);
        }
        let [b, c, l] = x.dims();
        let input = x.clone().detach().inner().reshape([b, c, 1, l]);
        let z = layer.forward(x);
        let [_, out, lo] = z.dims();
        let probe = Tensor::<4>::zeros([b, out, 1, lo], &z.device()).require_grad();
        let device = input.device();
        let (left, right) = match layer.padding {
            PaddingConfig1d::Valid => (0, 0),
            PaddingConfig1d::Same => same_padding(l, layer.kernel_size, layer.stride),
            PaddingConfig1d::Explicit(left, right) => (left, right),
        };
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Conv2d(ConvFactors {
                weight: layer.weight.id,
                bias: layer.bias.as_ref().map(|b| b.id),
                input,
                output_grad: Tensor::zeros([0, 0, 0, 0], &device),
                kernel: [1, layer.kernel_size],
                stride: [1, layer.stride],
                dilation: [1, layer.dilation],
                padding: [(0, 0), (left, right)],
            }),
            probe: Probe::Rank4(probe.clone()),
        });
        z + probe.reshape([b, out, lo])
    }

    /// `layer.forward(tokens)` for token ids `[B, T]`, recording the layer
    /// when the probes are on.
    pub fn embedding(&mut self, layer: &Embedding, tokens: Tensor<2, Int>) -> Tensor<3> {
        if !self.record_only(vec![layer.weight.id]) {
            return layer.forward(tokens);
        }
        let [vocabulary, _] = layer.weight.dims();
        let recorded = tokens.clone().inner();
        let z = layer.forward(tokens);
        let probe = Tensor::<3>::zeros(z.dims(), &z.device()).require_grad();
        let device = recorded.device();
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Embedding(EmbeddingFactors {
                weight: layer.weight.id,
                tokens: recorded,
                vocabulary,
                output_grad: Tensor::zeros([0, 0, 0], &device),
            }),
            probe: Probe::Rank3(probe.clone()),
        });
        z + probe
    }

    /// `layer.forward(x)` for `x` of shape `[B, ..., d]` (normalized over
    /// the last dimension), recording the layer when the probes are on.
    pub fn layer_norm<const D: usize>(&mut self, layer: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
        let gamma = Some(layer.gamma.id);
        let beta = layer.beta.as_ref().map(|b| b.id);
        if !self.record_only(gamma.into_iter().chain(beta).collect()) {
            return layer.forward(x);
        }
        let dims = x.dims();
        let (b, positions) = example_and_positions(&dims);
        let features = dims[D - 1];
        // The layer itself with unit scale and no shift gives the normalized
        // input with the layer's own epsilon (a private field).
        let mut unit = layer.clone();
        let device = x.device().inner();
        unit.gamma = burn::module::Param::from_tensor(Tensor::ones([features], &device));
        unit.beta = None;
        let normalized = unit
            .forward(x.clone().detach().inner())
            .reshape([b, positions, features]);
        let z = layer.forward(x);
        let probe = Tensor::<3>::zeros([b, positions, features], &z.device()).require_grad();
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Affine(AffineFactors {
                gamma,
                beta,
                normalized,
                output_grad: Tensor::zeros([0, 0, 0], &device),
            }),
            probe: Probe::Rank3(probe.clone()),
        });
        z + probe.reshape(dims)
    }

    /// `layer.forward(x)` for `x` of shape `[B, C, ...]` (C channels in
    /// groups), recording the layer's affine parameters when the probes are
    /// on.
    pub fn group_norm<const D: usize>(&mut self, layer: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
        let gamma = layer.gamma.as_ref().map(|g| g.id);
        let beta = layer.beta.as_ref().map(|b| b.id);
        if !self.record_only(gamma.into_iter().chain(beta).collect()) {
            return layer.forward(x);
        }
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let positions: usize = dims[2..].iter().product();
        let device = x.device().inner();
        let unit = GroupNormConfig::new(layer.num_groups, layer.num_channels)
            .with_epsilon(layer.epsilon)
            .with_affine(false)
            .init(&device);
        // [B, C, P] -> [B, P, C]: the channel is the feature gamma scales.
        let normalized = unit
            .forward(x.clone().detach().inner())
            .reshape([b, c, positions])
            .swap_dims(1, 2);
        let z = layer.forward(x);
        // The leaf is [B, P, C]; the graph brings it to the output's layout.
        let probe = Tensor::<3>::zeros([b, positions, c], &z.device()).require_grad();
        self.layers.push(Recorded::Probed {
            factors: LayerFactors::Affine(AffineFactors {
                gamma,
                beta,
                normalized,
                output_grad: Tensor::zeros([0, 0, 0], &device),
            }),
            probe: Probe::Rank3(probe.clone()),
        });
        z + probe.swap_dims(1, 2).reshape(dims)
    }

    /// `layer` applied to `x` `[B, C, ...]` (features `[B, F]` or images
    /// `[B, C, H, W]`), recording how it groups examples. Batch normalization
    /// has no per-example gradient; routing it here tells the noise stage
    /// which examples normalize together, so that micro-batches and chunks
    /// keep its groups whole (see [`crate::model::Coupling`]).
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
        let rest: usize = dims[2..].iter().product();
        layer
            .forward_images(x.reshape([dims[0], dims[1], rest, 1]))
            .reshape(dims)
    }

    /// Whether to record a convolution over `groups` groups: a grouped one
    /// has no per-example rule, so it is noted as such (unless the probes
    /// are off) and runs plain.
    fn record_conv(&mut self, kind: &str, groups: usize, params: Vec<ParamId>) -> bool {
        if groups == 1 {
            return self.record_only(params);
        }
        if self.mode != Mode::Off {
            self.layers.push(Recorded::Unsupported {
                params,
                what: format!(
                    "a {kind} layer with {groups} groups (the exact rule handles groups = 1)"
                ),
            });
        }
        false
    }

    /// In observing mode, notes `params` and returns false (run the plain
    /// layer); when off, returns false; when on, returns true (record).
    fn record_only(&mut self, params: Vec<ParamId>) -> bool {
        match self.mode {
            Mode::Off => false,
            Mode::Observe => {
                self.layers.push(Recorded::Seen(params));
                false
            }
            Mode::On => true,
        }
    }

    /// Reads the recorded layers' output gradients from `grads`, for a
    /// batch of `examples`. A layer whose first dimension is not the
    /// example (tokens flattened into `[B*T, in]`, say) is refused: its
    /// per-example gradients would be per-row gradients, silently wrong.
    pub fn factors(
        &self,
        grads: &Gradients,
        examples: usize,
        table: &ParamTable,
    ) -> Result<Vec<LayerFactors>> {
        let missing = || {
            CovnoiseError::Unsupported(
                "a probe received no gradient: the model must live on an autodiff device (device.autodiff()) and its probed layers must reach the loss".into(),
            )
        };
        let mut out = Vec::new();
        for layer in &self.layers {
            match layer {
                Recorded::Probed { factors, probe } => {
                    let grad_missing = missing;
                    let f = match (factors.clone(), probe) {
                        (LayerFactors::Linear(f), Probe::Rank3(p)) => {
                            LayerFactors::Linear(LinearFactors {
                                output_grad: p.grad(grads).ok_or_else(grad_missing)?,
                                ..f
                            })
                        }
                        (LayerFactors::Conv2d(f), Probe::Rank4(p)) => {
                            LayerFactors::Conv2d(ConvFactors {
                                output_grad: p.grad(grads).ok_or_else(grad_missing)?,
                                ..f
                            })
                        }
                        (LayerFactors::Embedding(f), Probe::Rank3(p)) => {
                            LayerFactors::Embedding(EmbeddingFactors {
                                output_grad: p.grad(grads).ok_or_else(grad_missing)?,
                                ..f
                            })
                        }
                        (LayerFactors::Affine(f), Probe::Rank3(p)) => {
                            LayerFactors::Affine(AffineFactors {
                                output_grad: p.grad(grads).ok_or_else(grad_missing)?,
                                ..f
                            })
                        }
                        _ => unreachable!("each layer kind records its probe's rank"),
                    };
                    if f.examples() != examples {
                        return Err(CovnoiseError::Unsupported(format!(
                            "the probed layer of parameter {} saw {} rows for a batch of {examples} examples: keep the example as the first dimension ([B, T, in] for tokens, not [B*T, in]), so that each example's gradient sums its positions",
                            table.name_of(f.params()[0]),
                            f.examples()
                        )));
                    }
                    out.push(f);
                }
                Recorded::Seen(_) => {}
                Recorded::Unsupported { params, what } => {
                    return Err(CovnoiseError::Unsupported(format!(
                        "parameter {} belongs to {what}, which has no per-example gradient rule; use the micro-batch estimator (Estimator::Microbatch)",
                        params
                            .first()
                            .map_or_else(|| "?".to_string(), |p| table.name_of(*p))
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Layers seen without a per-example rule (grouped convolutions), with
    /// their parameters: what [`Probes::factors`] would refuse.
    pub fn unsupported(&self) -> Vec<(ParamId, String)> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                Recorded::Unsupported { params, what } => {
                    params.first().map(|p| (*p, what.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// A layer's weight and, if it has one, its bias.
fn weight_and_bias<const D: usize>(
    weight: &Param<Tensor<D>>,
    bias: &Option<Param<Tensor<1>>>,
) -> Vec<ParamId> {
    std::iter::once(weight.id)
        .chain(bias.as_ref().map(|b| b.id))
        .collect()
}

/// The example count and the positions per example of a `[B, ..., F]`
/// shape (1 position for rank 2).
fn example_and_positions(dims: &[usize]) -> (usize, usize) {
    let positions = dims[1..dims.len() - 1].iter().product();
    (dims[0], positions)
}
