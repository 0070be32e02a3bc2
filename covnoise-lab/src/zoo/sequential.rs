//! A small sequential network from a one-line description, so that a net
//! like a peer paper's can be trained without writing Rust:
//! `--model sequential --layers conv:10:5,maxpool:2,relu,conv:10:5,maxpool:2,relu,flatten,linear:50,relu,linear:10`
//! is Wu et al.'s Fashion-MNIST net (11,330 parameters).
//!
//! Items, separated by commas:
//!
//! | item | layer |
//! | --- | --- |
//! | `conv:OUT:K[:STRIDE[:PAD]]` | Conv2d, K x K kernel, OUT channels (stride 1, no padding by default) |
//! | `maxpool:K`, `avgpool:K` | K x K pooling with stride K |
//! | `relu`, `tanh` | activations |
//! | `flatten` | `[B, C, H, W]` to `[B, C H W]` |
//! | `linear:OUT` | Linear to OUT features |
//!
//! Convolutions and Linear layers go through [`Probes`], so the exact
//! estimator covers every parameter; weights and biases are drawn as
//! PyTorch draws them by default (from the run's seed). The last layer must
//! be a Linear layer with as many outputs as the data set has classes.

use std::fmt;

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::{AvgPoolOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, activation};
use serde::{Deserialize, Serialize};

use super::init::{SeededInit, WeightInit};
use covnoise::error::{CovnoiseError, Result};
use covnoise::kernels;
use covnoise::model::Probes;

/// One item of a sequential description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerSpec {
    /// Conv2d with a square kernel.
    Conv {
        /// Output channels.
        out: usize,
        /// Kernel side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
    /// Max pooling, K x K with stride K.
    MaxPool(usize),
    /// Average pooling, K x K with stride K.
    AvgPool(usize),
    /// ReLU.
    Relu,
    /// tanh.
    Tanh,
    /// Images to vectors.
    Flatten,
    /// Linear to this many features.
    Linear(usize),
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LayerSpec::Conv {
                out,
                kernel,
                stride,
                padding,
            } => {
                write!(f, "conv:{out}:{kernel}")?;
                if stride != 1 || padding != 0 {
                    write!(f, ":{stride}")?;
                }
                if padding != 0 {
                    write!(f, ":{padding}")?;
                }
                Ok(())
            }
            LayerSpec::MaxPool(k) => write!(f, "maxpool:{k}"),
            LayerSpec::AvgPool(k) => write!(f, "avgpool:{k}"),
            LayerSpec::Relu => f.write_str("relu"),
            LayerSpec::Tanh => f.write_str("tanh"),
            LayerSpec::Flatten => f.write_str("flatten"),
            LayerSpec::Linear(out) => write!(f, "linear:{out}"),
        }
    }
}

/// Parses a description (see the module documentation).
pub fn parse_layers(spec: &str) -> Result<Vec<LayerSpec>> {
    let bad = |item: &str, why: &str| {
        CovnoiseError::Unsupported(format!("--layers item {item:?}: {why}"))
    };
    let mut layers = Vec::new();
    for item in spec.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(bad(spec, "has an empty item"));
        }
        let mut parts = item.split(':');
        let kind = parts.next().unwrap_or_default();
        let numbers: Vec<usize> = parts
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(item, "its arguments must be whole numbers"))?;
        let arity = |n: std::ops::RangeInclusive<usize>| {
            if n.contains(&numbers.len()) {
                Ok(())
            } else {
                Err(bad(
                    item,
                    "has the wrong number of arguments (conv:OUT:K[:STRIDE[:PAD]], maxpool:K, avgpool:K, linear:OUT)",
                ))
            }
        };
        let positive = |v: usize| {
            if v >= 1 {
                Ok(v)
            } else {
                Err(bad(item, "sizes, kernels, pools and strides must be >= 1"))
            }
        };
        layers.push(match kind {
            "conv" => {
                arity(2..=4)?;
                LayerSpec::Conv {
                    out: positive(numbers[0])?,
                    kernel: positive(numbers[1])?,
                    stride: positive(numbers.get(2).copied().unwrap_or(1))?,
                    padding: numbers.get(3).copied().unwrap_or(0),
                }
            }
            "maxpool" => {
                arity(1..=1)?;
                LayerSpec::MaxPool(positive(numbers[0])?)
            }
            "avgpool" => {
                arity(1..=1)?;
                LayerSpec::AvgPool(positive(numbers[0])?)
            }
            "linear" => {
                arity(1..=1)?;
                LayerSpec::Linear(positive(numbers[0])?)
            }
            "relu" | "tanh" | "flatten" => {
                arity(0..=0)?;
                match kind {
                    "relu" => LayerSpec::Relu,
                    "tanh" => LayerSpec::Tanh,
                    _ => LayerSpec::Flatten,
                }
            }
            _ => {
                return Err(bad(
                    item,
                    "unknown item; expected conv, maxpool, avgpool, relu, tanh, flatten or linear",
                ));
            }
        });
    }
    Ok(layers)
}

/// The description as written (`conv:10:5,maxpool:2,...`).
pub fn layers_to_string(layers: &[LayerSpec]) -> String {
    layers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A description checked against its input: the shapes it goes through,
/// its trainable parameters and its activation values per example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequentialPlan {
    /// Trainable parameters.
    pub params: u128,
    /// Outputs of every layer, per example.
    pub units: u128,
    /// Features of the last layer's output.
    pub outputs: usize,
    /// What each conv and Linear layer takes, in order: input channels for
    /// a convolution, input features for a Linear layer.
    pub inputs: Vec<usize>,
}

/// Walks `layers` from images `[C, H, W]`: convolutions and pooling need
/// images, Linear layers vectors (after `flatten`), every size stays
/// positive, and the network ends in a Linear layer of `classes` outputs.
pub fn plan_layers(
    layers: &[LayerSpec],
    input: [usize; 3],
    classes: usize,
) -> Result<SequentialPlan> {
    let bad = |what: String| CovnoiseError::Unsupported(format!("--layers: {what}"));
    enum Shape {
        Image([usize; 3]),
        Vector(usize),
    }
    let mut shape = Shape::Image(input);
    let (mut params, mut units) = (0u128, 0u128);
    let mut inputs = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let at = |s: &str| format!("item {} ({layer}) {s}", i + 1);
        shape = match (*layer, shape) {
            (
                LayerSpec::Conv {
                    out,
                    kernel,
                    stride,
                    padding,
                },
                Shape::Image([c, h, w]),
            ) => {
                let side = |n: usize| {
                    (n + 2 * padding)
                        .checked_sub(kernel)
                        .map(|v| v / stride + 1)
                };
                let (Some(ho), Some(wo)) = (side(h), side(w)) else {
                    return Err(bad(at(&format!(
                        "has a {kernel}x{kernel} kernel for {h}x{w} images"
                    ))));
                };
                params += (c * kernel * kernel * out + out) as u128;
                units += (out * ho * wo) as u128;
                inputs.push(c);
                Shape::Image([out, ho, wo])
            }
            (LayerSpec::MaxPool(k) | LayerSpec::AvgPool(k), Shape::Image([c, h, w])) => {
                if k > h || k > w {
                    return Err(bad(at(&format!("pools {k}x{k} over {h}x{w} images"))));
                }
                units += (c * (h / k) * (w / k)) as u128;
                Shape::Image([c, h / k, w / k])
            }
            (LayerSpec::Flatten, Shape::Image([c, h, w])) => Shape::Vector(c * h * w),
            (LayerSpec::Relu | LayerSpec::Tanh, s) => s,
            (LayerSpec::Linear(out), Shape::Vector(n)) => {
                params += (n * out + out) as u128;
                units += out as u128;
                inputs.push(n);
                Shape::Vector(out)
            }
            (LayerSpec::Linear(_), Shape::Image(_)) => {
                return Err(bad(at("needs vectors: put flatten before it")));
            }
            (_, Shape::Vector(_)) => {
                return Err(bad(at("needs images, and the network is already flat")));
            }
        };
    }
    match (layers.last(), shape) {
        (Some(LayerSpec::Linear(out)), Shape::Vector(_)) if *out == classes => Ok(SequentialPlan {
            params,
            units,
            outputs: *out,
            inputs,
        }),
        _ => Err(bad(format!(
            "the network must end in linear:{classes} (one output per class)"
        ))),
    }
}

/// A sequential network built from a description: plain burn layers whose
/// parameters are named `convs.K.weight` and `linears.K.weight` in order.
#[derive(Module, Debug)]
pub struct Sequential {
    /// The convolutions, in order.
    pub convs: Vec<Conv2d>,
    /// The Linear layers, in order.
    pub linears: Vec<Linear>,
    /// The description the forward pass follows.
    #[module(skip)]
    pub layers: Vec<LayerSpec>,
}

impl Sequential {
    /// The network `layers` describes for images `[C, H, W]`, with
    /// PyTorch's default initialization drawn from `seed`.
    pub fn new(
        layers: &[LayerSpec],
        input: [usize; 3],
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let plan = plan_layers(layers, input, classes)?;
        let mut fan_in = plan.inputs.into_iter();
        let mut init = SeededInit::new(seed, device);
        let (mut convs, mut linears) = (Vec::new(), Vec::new());
        for layer in layers {
            match *layer {
                LayerSpec::Conv {
                    out,
                    kernel,
                    stride,
                    padding,
                } => {
                    let channels = fan_in.next().expect("the plan has each conv's input");
                    convs.push(init.conv(
                        [channels, out],
                        kernel,
                        stride,
                        padding,
                        true,
                        WeightInit::Default,
                    ));
                }
                LayerSpec::Linear(out) => {
                    let features = fan_in.next().expect("the plan has each Linear's input");
                    linears.push(init.linear(features, out, WeightInit::Default));
                }
                _ => {}
            }
        }
        Ok(Self {
            convs,
            linears,
            layers: layers.to_vec(),
        })
    }

    /// Logits `[B, classes]` of images `x` `[B, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        enum Value {
            Image(Tensor<4>),
            Vector(Tensor<2>),
        }
        let (mut conv, mut linear) = (0, 0);
        let mut v = Value::Image(x);
        for layer in &self.layers {
            v = match (*layer, v) {
                (LayerSpec::Conv { .. }, Value::Image(x)) => {
                    conv += 1;
                    Value::Image(probes.conv2d(&self.convs[conv - 1], x))
                }
                (LayerSpec::MaxPool(k), Value::Image(x)) => Value::Image(kernels::max_pool2d(
                    x,
                    MaxPoolOptions::new([k, k]).with_stride([k, k]),
                )),
                (LayerSpec::AvgPool(k), Value::Image(x)) => Value::Image(avg_pool2d(
                    x,
                    AvgPoolOptions::new([k, k]).with_stride([k, k]),
                )),
                (LayerSpec::Relu, Value::Image(x)) => Value::Image(kernels::relu(x)),
                (LayerSpec::Relu, Value::Vector(x)) => Value::Vector(kernels::relu(x)),
                (LayerSpec::Tanh, Value::Image(x)) => Value::Image(activation::tanh(x)),
                (LayerSpec::Tanh, Value::Vector(x)) => Value::Vector(activation::tanh(x)),
                (LayerSpec::Flatten, Value::Image(x)) => Value::Vector(x.flatten(1, 3)),
                (LayerSpec::Linear(_), Value::Vector(x)) => {
                    linear += 1;
                    Value::Vector(probes.linear(&self.linears[linear - 1], x))
                }
                _ => unreachable!("plan_layers checked the description"),
            };
        }
        match v {
            Value::Vector(logits) => logits,
            Value::Image(_) => unreachable!("plan_layers checked that it ends in a Linear layer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wu et al.'s Fashion-MNIST net: 11,330 parameters, as their paper
    /// and PyTorch count them (260 + 2,510 + 8,050 + 510).
    #[test]
    fn the_peer_net_parses_plans_and_prints_back() {
        let spec =
            "conv:10:5,maxpool:2,relu,conv:10:5,maxpool:2,relu,flatten,linear:50,relu,linear:10";
        let layers = parse_layers(spec).unwrap();
        assert_eq!(layers_to_string(&layers), spec);
        let plan = plan_layers(&layers, [1, 28, 28], 10).unwrap();
        assert_eq!(plan.params, 11_330);
        let device = Device::flex();
        let net = Sequential::new(&layers, [1, 28, 28], 10, 0, &device).unwrap();
        let count: usize = net
            .convs
            .iter()
            .map(|c| {
                c.weight.val().dims().iter().product::<usize>()
                    + c.bias.as_ref().map_or(0, |b| b.dims()[0])
            })
            .sum::<usize>()
            + net
                .linears
                .iter()
                .map(|l| {
                    l.weight.val().dims().iter().product::<usize>()
                        + l.bias.as_ref().map_or(0, |b| b.dims()[0])
                })
                .sum::<usize>();
        assert_eq!(count, 11_330);
        let logits = net.forward(Tensor::zeros([3, 1, 28, 28], &device), &mut Probes::off());
        assert_eq!(logits.dims(), [3, 10]);
    }

    #[test]
    fn impossible_descriptions_are_refused_naming_the_item() {
        for (spec, needle) in [
            ("conv:10", "conv:10"),
            ("conv:0:5,flatten,linear:10", "conv:0:5"),
            ("pool:2,flatten,linear:10", "pool:2"),
            ("linear:10", "flatten"),
            ("flatten,linear:10,maxpool:2", "maxpool:2"),
            ("conv:4:40,flatten,linear:10", "40x40 kernel"),
            ("flatten,linear:7", "linear:10"),
            ("conv:3:3,,flatten,linear:10", "empty"),
        ] {
            let err = parse_layers(spec)
                .and_then(|l| plan_layers(&l, [1, 28, 28], 10))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
