//! A multi-layer perceptron with ReLU and optional (ghost) batch
//! normalization, differentiated by burn's autodiff.
//!
//! Per-example output gradients of each Linear layer come out of the same
//! backward pass: a zero "probe" tensor is added to each pre-activation, and
//! for the mean-reduced loss the per-example gradient is B times the probe's
//! gradient (BackPACK's trick, without storing per-example weight gradients).

use burn::tensor::{Device, Tensor, activation};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    BackwardOutput, BackwardRequest, Batch, Coupling, GradientModel, LinearFactors, ParamInfo,
    ParamKind, cross_entropy_and_correct,
};
use crate::error::{CovnoiseError, Result};
use crate::tensor_util::from_vec;

/// Batch-norm epsilon and running-average momentum, PyTorch's defaults.
const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// Normalization after each hidden Linear layer (before the ReLU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalization {
    /// No normalization.
    None,
    /// Batch normalization over the whole training batch.
    BatchNorm,
    /// Ghost batch normalization (Hoffer et al. 2017): statistics over
    /// consecutive sub-batches of this many examples.
    GhostBatchNorm(usize),
}

/// Architecture of an [`Mlp`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlpConfig {
    /// Input features (784 for Fashion-MNIST).
    pub input: usize,
    /// Widths of the hidden layers, e.g. `[512, 512]`.
    pub hidden: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
    /// Normalization of hidden layers.
    pub normalization: Normalization,
}

/// Parameter indices and running statistics of one Linear (+ norm) layer.
#[derive(Debug, Clone)]
struct Layer {
    weight: usize,
    bias: usize,
    /// (scale index, shift index, running mean, running variance).
    norm: Option<(usize, usize, Tensor<2>, Tensor<2>)>,
}

/// A ReLU MLP: `Linear -> [BatchNorm] -> ReLU` for each hidden layer, then a
/// Linear output layer, trained with mean cross-entropy.
#[derive(Debug, Clone)]
pub struct Mlp {
    config: MlpConfig,
    params: Vec<Tensor<2>>,
    info: Vec<ParamInfo>,
    layers: Vec<Layer>,
    device: Device,
}

impl Mlp {
    /// A new MLP initialized as PyTorch's `nn.Linear` does
    /// (`U(-1/sqrt(in), 1/sqrt(in))` for weights and biases; batch-norm scale
    /// 1 and shift 0), from a seeded generator.
    pub fn new(config: MlpConfig, seed: u64, device: &Device) -> Result<Self> {
        if config.input == 0 || config.classes < 2 || config.hidden.contains(&0) {
            return Err(CovnoiseError::InvalidSetting {
                name: "architecture",
                value: format!("{}-{:?}-{}", config.input, config.hidden, config.classes),
                reason: "needs input >= 1, every hidden width >= 1 and at least 2 classes",
            });
        }
        if let Normalization::GhostBatchNorm(0 | 1) = config.normalization {
            return Err(CovnoiseError::InvalidSetting {
                name: "ghost-batch",
                value: format!("{:?}", config.normalization),
                reason: "ghost batch size must be >= 2 (variance of one example is 0)",
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut widths = vec![config.input];
        widths.extend(&config.hidden);
        widths.push(config.classes);
        let mut params = Vec::new();
        let mut info = Vec::new();
        let mut layers = Vec::new();
        for l in 0..widths.len() - 1 {
            let (fan_in, fan_out) = (widths[l], widths[l + 1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut uniform = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = params.len();
            params.push(from_vec(
                uniform(fan_in * fan_out),
                [fan_in, fan_out],
                device,
            ));
            info.push(ParamInfo {
                name: format!("layer{l}.weight"),
                kind: ParamKind::LinearWeight,
                shape: [fan_in, fan_out],
            });
            let bias = params.len();
            params.push(from_vec(uniform(fan_out), [1, fan_out], device));
            info.push(ParamInfo {
                name: format!("layer{l}.bias"),
                kind: ParamKind::LinearBias,
                shape: [1, fan_out],
            });
            let hidden = l + 1 < widths.len() - 1;
            let norm = if hidden && config.normalization != Normalization::None {
                let scale = params.len();
                params.push(Tensor::ones([1, fan_out], device));
                info.push(ParamInfo {
                    name: format!("layer{l}.norm.scale"),
                    kind: ParamKind::NormScale,
                    shape: [1, fan_out],
                });
                let shift = params.len();
                params.push(Tensor::zeros([1, fan_out], device));
                info.push(ParamInfo {
                    name: format!("layer{l}.norm.shift"),
                    kind: ParamKind::NormShift,
                    shape: [1, fan_out],
                });
                Some((
                    scale,
                    shift,
                    Tensor::zeros([1, fan_out], device),
                    Tensor::ones([1, fan_out], device),
                ))
            } else {
                None
            };
            layers.push(Layer { weight, bias, norm });
        }
        Ok(Self {
            config,
            params,
            info,
            layers,
            device: device.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Batch normalization in training mode on `z` `[B, F]`: returns the
    /// normalized output and the batch statistics (mean, unbiased variance)
    /// averaged over ghost batches.
    fn batch_norm_train(
        &self,
        z: Tensor<2>,
        scale: Tensor<2>,
        shift: Tensor<2>,
    ) -> Result<(Tensor<2>, Tensor<2>, Tensor<2>)> {
        let [b, f] = z.dims();
        let group = match self.config.normalization {
            Normalization::GhostBatchNorm(n) => n,
            _ => b,
        };
        if b % group != 0 || group < 2 {
            return Err(CovnoiseError::Shape(format!(
                "batch of {b} examples cannot be split into ghost batches of {group} (need a multiple, >= 2)"
            )));
        }
        let groups = b / group;
        let zr = z.reshape([groups, group, f]);
        let mean = zr.clone().mean_dim(1);
        let centered = zr - mean.clone();
        let var = centered.clone().square().mean_dim(1);
        let normalized = centered / (var.clone() + BN_EPS).sqrt();
        let out = normalized.reshape([b, f]) * scale + shift;
        // Running statistics use the unbiased variance, as PyTorch does.
        let unbias = group as f32 / (group as f32 - 1.0);
        let batch_mean = mean.inner().mean_dim(0).reshape([1, f]);
        let batch_var = (var.inner() * unbias).mean_dim(0).reshape([1, f]);
        Ok((out, batch_mean, batch_var))
    }
}

/// Host-side target matrix `[B, classes]` with `w_i / B` at each label.
pub(crate) fn weighted_targets(
    labels: &[u8],
    weights: Option<&[f32]>,
    classes: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let b = labels.len();
    let mut t = vec![0.0f32; b * classes];
    for (i, &y) in labels.iter().enumerate() {
        let y = y as usize;
        if y >= classes {
            return Err(CovnoiseError::Shape(format!(
                "label {y} at row {i} is outside 0..{}",
                classes - 1
            )));
        }
        t[i * classes + y] = weights.map_or(1.0, |w| w[i]) / b as f32;
    }
    Ok(from_vec(t, [b, classes], device))
}

impl GradientModel for Mlp {
    fn params(&self) -> &[Tensor<2>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Tensor<2>] {
        &mut self.params
    }

    fn param_info(&self) -> &[ParamInfo] {
        &self.info
    }

    fn coupling(&self) -> Coupling {
        match self.config.normalization {
            Normalization::None => Coupling::Independent,
            Normalization::BatchNorm => Coupling::WholeBatch,
            Normalization::GhostBatchNorm(n) => Coupling::Groups(n),
        }
    }

    fn backward(&mut self, batch: &Batch, request: &BackwardRequest) -> Result<BackwardOutput> {
        let b = batch.len();
        if b == 0 {
            return Err(CovnoiseError::Shape("empty batch".into()));
        }
        let [rows, cols] = batch.x.dims();
        if rows != b || cols != self.config.input {
            return Err(CovnoiseError::Shape(format!(
                "batch features are [{rows}, {cols}], expected [{b}, {}]",
                self.config.input
            )));
        }
        if request.per_example && self.coupling() != Coupling::Independent {
            return Err(CovnoiseError::Unsupported(
                "per-example gradients are undefined with batch normalization (each example's loss depends on the whole batch); use the microbatch estimator with --ghost-batch".into(),
            ));
        }
        let labels = request.labels.unwrap_or(&batch.labels);
        if labels.len() != b || request.example_weights.is_some_and(|w| w.len() != b) {
            return Err(CovnoiseError::Shape(
                "labels or example weights do not match the batch size".into(),
            ));
        }
        let ad = self.device.clone().autodiff();
        let tracked: Vec<Tensor<2>> = self
            .params
            .iter()
            .map(|p| {
                let t = p.clone().autodiff();
                if request.skip_param_grads {
                    t
                } else {
                    t.require_grad()
                }
            })
            .collect();

        let mut h = batch.x.clone().autodiff();
        let mut probes = Vec::new();
        let mut inputs = Vec::new();
        let mut new_stats = Vec::new();
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let out = self.info[layer.weight].shape[1];
            if request.per_example {
                inputs.push(h.clone().inner());
            }
            let mut z = h.matmul(tracked[layer.weight].clone()) + tracked[layer.bias].clone();
            if request.per_example {
                let probe = Tensor::<2>::zeros([b, out], &ad).require_grad();
                z = z + probe.clone();
                probes.push(probe);
            }
            if l == last {
                h = z;
                break;
            }
            if let Some((scale, shift, _, _)) = &layer.norm {
                let (normed, mean, var) =
                    self.batch_norm_train(z, tracked[*scale].clone(), tracked[*shift].clone())?;
                new_stats.push((mean, var));
                z = normed;
            }
            h = activation::relu(z);
        }
        let logits = h;
        let logits_value = logits.clone().inner();
        let classes = self.config.classes;
        let targets = weighted_targets(labels, request.example_weights, classes, &self.device)?;
        let objective = -(activation::log_softmax(logits, 1) * targets.autodiff()).sum();
        let gradients = objective.backward();

        let grads = if request.skip_param_grads {
            Vec::new()
        } else {
            tracked
                .iter()
                .zip(&self.info)
                .map(|(t, info)| {
                    // A parameter that did not reach the loss has zero gradient.
                    t.grad(&gradients)
                        .unwrap_or_else(|| Tensor::zeros(info.shape, &self.device))
                })
                .collect()
        };
        let factors = probes
            .iter()
            .zip(inputs)
            .zip(&self.layers)
            .map(|((probe, input), layer)| {
                let g = probe
                    .grad(&gradients)
                    .ok_or_else(|| CovnoiseError::Backend("probe has no gradient".into()))?;
                Ok(LinearFactors {
                    weight: layer.weight,
                    bias: layer.bias,
                    input,
                    // The loss is a mean over B examples: undo the 1/B.
                    output_grad: g * b as f32,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        if request.update_running_stats {
            let mut stats = new_stats.into_iter();
            for layer in &mut self.layers {
                if let Some((_, _, mean, var)) = &mut layer.norm {
                    let (m, v) = stats.next().expect("one per normalized layer");
                    *mean = mean.clone() * (1.0 - BN_MOMENTUM) + m * BN_MOMENTUM;
                    *var = var.clone() * (1.0 - BN_MOMENTUM) + v * BN_MOMENTUM;
                }
            }
        }
        let (loss, correct) = cross_entropy_and_correct(&logits_value, &batch.labels)?;
        Ok(BackwardOutput {
            grads,
            loss,
            correct,
            logits: logits_value,
            factors,
        })
    }

    fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let mut h = x;
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut z =
                h.matmul(self.params[layer.weight].clone()) + self.params[layer.bias].clone();
            if l == last {
                return z;
            }
            if let Some((scale, shift, mean, var)) = &layer.norm {
                z = (z - mean.clone()) / (var.clone() + BN_EPS).sqrt()
                    * self.params[*scale].clone()
                    + self.params[*shift].clone();
            }
            h = activation::relu(z);
        }
        unreachable!("the loop returns at the last layer")
    }

    fn set_buffers(&mut self, buffers: Vec<Tensor<2>>) -> Result<()> {
        let expected = self.layers.iter().filter(|l| l.norm.is_some()).count() * 2;
        if buffers.len() != expected {
            return Err(CovnoiseError::Shape(format!(
                "expected {expected} buffers, got {}",
                buffers.len()
            )));
        }
        let mut it = buffers.into_iter();
        for layer in &mut self.layers {
            if let Some((_, _, mean, var)) = &mut layer.norm {
                *mean = it.next().expect("counted above");
                *var = it.next().expect("counted above");
            }
        }
        Ok(())
    }

    fn buffers(&self) -> Vec<Tensor<2>> {
        self.layers
            .iter()
            .filter_map(|l| l.norm.as_ref())
            .flat_map(|(_, _, m, v)| [m.clone(), v.clone()])
            .collect()
    }
}
