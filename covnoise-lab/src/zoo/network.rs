//! The architectures `covnoise train --model NAME` builds: covnoise's own
//! models, users of the same API as anyone's (a burn module whose forward
//! pass routes its layers through [`Probes`]).

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    LayerSpec, LeNet5, Mlp, MlpConfig, Normalization, ResNet, Sequential, Vgg, plan_layers,
};
use covnoise::error::{CovnoiseError, Result};
use covnoise::model::{Coupling, Objective, Probes};

/// A model architecture by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// ReLU MLP with `--hidden` widths ("mlp").
    #[serde(rename = "mlp")]
    Mlp,
    /// LeNet-5 for 28x28 grey images ("lenet5").
    #[serde(rename = "lenet5")]
    LeNet5,
    /// VGG-11 with batch norm, CIFAR variant ("vgg11").
    #[serde(rename = "vgg11")]
    Vgg11,
    /// VGG-16 with batch norm, CIFAR variant ("vgg16").
    #[serde(rename = "vgg16")]
    Vgg16,
    /// CIFAR ResNet-20 ("resnet20").
    #[serde(rename = "resnet20")]
    ResNet20,
    /// CIFAR ResNet-32 ("resnet32").
    #[serde(rename = "resnet32")]
    ResNet32,
    /// CIFAR ResNet-44 ("resnet44").
    #[serde(rename = "resnet44")]
    ResNet44,
    /// CIFAR ResNet-56 ("resnet56").
    #[serde(rename = "resnet56")]
    ResNet56,
    /// A small sequential net described by `--layers` ("sequential").
    #[serde(rename = "sequential")]
    Sequential,
}

impl Architecture {
    /// Every architecture, in the order `--help` lists them.
    pub const ALL: [Architecture; 9] = [
        Architecture::Mlp,
        Architecture::LeNet5,
        Architecture::Vgg11,
        Architecture::Vgg16,
        Architecture::ResNet20,
        Architecture::ResNet32,
        Architecture::ResNet44,
        Architecture::ResNet56,
        Architecture::Sequential,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Mlp => "mlp",
            Architecture::LeNet5 => "lenet5",
            Architecture::Vgg11 => "vgg11",
            Architecture::Vgg16 => "vgg16",
            Architecture::ResNet20 => "resnet20",
            Architecture::ResNet32 => "resnet32",
            Architecture::ResNet44 => "resnet44",
            Architecture::ResNet56 => "resnet56",
            Architecture::Sequential => "sequential",
        }
    }

    /// Whether the architecture has batch normalization built in (VGG and
    /// ResNet); the MLP has it only with `--batch-norm`/`--ghost-batch`.
    pub fn has_batch_norm(self) -> bool {
        !matches!(
            self,
            Architecture::Mlp | Architecture::LeNet5 | Architecture::Sequential
        )
    }

    /// The image shape `[C, H, W]` the architecture takes, None for any
    /// (the MLP flattens its input).
    pub fn input_shape(self) -> Option<[usize; 3]> {
        match self {
            Architecture::Mlp | Architecture::Sequential => None,
            Architecture::LeNet5 => Some([1, 28, 28]),
            _ => Some([3, 32, 32]),
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Architecture {
    type Err = CovnoiseError;

    fn from_str(s: &str) -> Result<Self> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Architecture::ALL.iter().map(|a| a.name()).collect();
                CovnoiseError::Unsupported(format!(
                    "unknown model {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// Everything needed to build a [`Network`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Shape of one input example `[C, H, W]` (`[1, 1, dim]` for vectors).
    pub input: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// MLP hidden widths (ignored by the conv nets).
    pub hidden: Vec<usize>,
    /// Normalization: for the MLP as configured; for VGG and ResNet
    /// `BatchNorm` or `GhostBatchNorm(n)`; `None` for LeNet-5.
    pub normalization: Normalization,
    /// The layers of a `sequential` model (empty for the others).
    pub layers: Vec<LayerSpec>,
}

impl NetworkConfig {
    /// Checks that the architecture can take this input and normalization.
    pub fn validate(&self) -> Result<()> {
        let a = self.architecture;
        if let Some(shape) = a.input_shape()
            && shape != self.input
        {
            return Err(CovnoiseError::Unsupported(format!(
                "model {a} takes [C, H, W] = {shape:?} images, the data set has {:?} (choose --dataset {})",
                self.input,
                if shape[0] == 1 {
                    "fashion-mnist"
                } else {
                    "cifar10 or cifar100"
                }
            )));
        }
        if a == Architecture::Sequential {
            if self.layers.is_empty() {
                return Err(CovnoiseError::Unsupported(
                    "--model sequential needs its layers (--layers conv:10:5,maxpool:2,relu,flatten,linear:10, say)".into(),
                ));
            }
            plan_layers(&self.layers, self.input, self.classes)?;
        }
        match (a, self.normalization) {
            (Architecture::LeNet5 | Architecture::Sequential, Normalization::None) => {}
            (Architecture::LeNet5 | Architecture::Sequential, _) => {
                return Err(CovnoiseError::InvalidSetting {
                    name: "model",
                    value: a.name().into(),
                    reason: "has no batch normalization (drop --batch-norm/--ghost-batch)",
                });
            }
            (a, Normalization::None) if a.has_batch_norm() => {
                return Err(CovnoiseError::InvalidSetting {
                    name: "model",
                    value: a.name().into(),
                    reason: "has batch normalization built in; it cannot be turned off",
                });
            }
            _ => {}
        }
        if self.classes < 2 {
            return Err(CovnoiseError::InvalidSetting {
                name: "classes",
                value: self.classes.to_string(),
                reason: "needs at least 2 classes",
            });
        }
        Ok(())
    }

    /// Trainable parameters and activation values per example (the outputs
    /// of the conv, Linear and normalization layers), computed from the
    /// definition without building the model: the inputs of the memory
    /// estimate, which must refuse a model too large to allocate.
    pub fn footprint(&self) -> (u128, u128) {
        let classes = self.classes as u128;
        let conv_bn = |i: u128, o: u128, bias: bool| 9 * i * o + 2 * o + if bias { o } else { 0 };
        match self.architecture {
            Architecture::Mlp => {
                let widths: Vec<u128> = std::iter::once(self.input.iter().product::<usize>())
                    .chain(self.hidden.iter().copied())
                    .map(|w| w as u128)
                    .chain(std::iter::once(classes))
                    .collect();
                let params = widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
                (params, widths.iter().sum())
            }
            Architecture::Sequential => plan_layers(&self.layers, self.input, self.classes)
                .map_or((0, 0), |p| (p.params, p.units)),
            Architecture::LeNet5 => (
                26 * 6 + 151 * 16 + 401 * 120 + 121 * 84 + 85 * classes,
                6 * 28 * 28 + 6 * 14 * 14 + 16 * 10 * 10 + 16 * 5 * 5 + 120 + 84 + classes,
            ),
            Architecture::Vgg11 | Architecture::Vgg16 => {
                let widths: &[u128] = if self.architecture == Architecture::Vgg11 {
                    &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0]
                } else {
                    &[
                        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512,
                        0,
                    ]
                };
                let (mut c, mut side, mut params, mut units) = (3u128, 32u128, 0, 0);
                for &w in widths {
                    if w == 0 {
                        side /= 2;
                        units += c * side * side;
                    } else {
                        params += conv_bn(c, w, true);
                        units += 2 * w * side * side;
                        c = w;
                    }
                }
                (params + 512 * classes + classes, units + classes)
            }
            Architecture::ResNet20
            | Architecture::ResNet32
            | Architecture::ResNet44
            | Architecture::ResNet56 => {
                let depth = match self.architecture {
                    Architecture::ResNet20 => 20,
                    Architecture::ResNet32 => 32,
                    Architecture::ResNet44 => 44,
                    _ => 56,
                };
                let n = (depth - 2) / 6;
                let (mut params, mut units) = (conv_bn(3, 16, false), 2 * 16 * 1024);
                let mut c = 16;
                for (w, side) in [(16u128, 32u128), (32, 16), (64, 8)] {
                    for _ in 0..n {
                        params += conv_bn(c, w, false) + conv_bn(w, w, false);
                        units += 5 * w * side * side;
                        c = w;
                    }
                }
                (params + 64 * classes + classes, units + 64 + classes)
            }
        }
    }

    /// How the examples of a training batch interact in this model.
    pub fn coupling(&self) -> Coupling {
        self.normalization.coupling()
    }

    fn bn_group(&self) -> usize {
        match self.normalization {
            Normalization::GhostBatchNorm(n) => n,
            _ => 0,
        }
    }
}

/// One of covnoise's own models, as one burn module (records, optimizers
/// and checkpoints see the variant's parameters).
// One value per run, moved rarely: the variants' size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Network {
    /// A ReLU MLP.
    Mlp(Mlp),
    /// LeNet-5.
    LeNet5(LeNet5),
    /// VGG with batch normalization.
    Vgg(Vgg),
    /// A CIFAR ResNet.
    ResNet(ResNet),
    /// A sequential net from a description.
    Sequential(Sequential),
}

impl Network {
    /// Builds `config`'s model from `seed` on `device`.
    pub fn new(config: &NetworkConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let (classes, group) = (config.classes, config.bn_group());
        Ok(match config.architecture {
            Architecture::Mlp => {
                let mlp = MlpConfig {
                    input: config.input.iter().product(),
                    hidden: config.hidden.clone(),
                    classes,
                    normalization: config.normalization,
                };
                Network::Mlp(Mlp::new(&mlp, seed, device)?)
            }
            Architecture::LeNet5 => Network::LeNet5(LeNet5::new(classes, seed, device)),
            Architecture::Vgg11 => Network::Vgg(Vgg::new(11, classes, group, seed, device)),
            Architecture::Vgg16 => Network::Vgg(Vgg::new(16, classes, group, seed, device)),
            Architecture::ResNet20 => {
                Network::ResNet(ResNet::new(20, classes, group, seed, device))
            }
            Architecture::ResNet32 => {
                Network::ResNet(ResNet::new(32, classes, group, seed, device))
            }
            Architecture::ResNet44 => {
                Network::ResNet(ResNet::new(44, classes, group, seed, device))
            }
            Architecture::ResNet56 => {
                Network::ResNet(ResNet::new(56, classes, group, seed, device))
            }
            Architecture::Sequential => Network::Sequential(Sequential::new(
                &config.layers,
                config.input,
                classes,
                seed,
                device,
            )?),
        })
    }

    /// Logits `[B, classes]` of a batch of examples `x` `[B, C, H, W]`;
    /// batch statistics on an autodiff device, running statistics otherwise.
    pub fn forward(&self, x: Tensor<4>, probes: &mut Probes) -> Tensor<2> {
        match self {
            Network::Mlp(m) => m.forward(x.flatten(1, 3), probes),
            Network::LeNet5(m) => m.forward(x, probes),
            Network::Vgg(m) => m.forward(x, probes),
            Network::ResNet(m) => m.forward(x, probes),
            Network::Sequential(m) => m.forward(x, probes),
        }
    }

    /// The forward pass the noise stage differentiates: logits of the batch
    /// and its labels.
    pub fn objective(
        &self,
        x: Tensor<4>,
        labels: Tensor<1, Int>,
        probes: &mut Probes,
    ) -> Objective {
        Objective::Classification {
            logits: self.forward(x, probes),
            labels,
        }
    }

    /// Logits in evaluation mode (running statistics, no autodiff).
    pub fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.valid().forward(x.inner(), &mut Probes::off())
    }

    /// Trainable parameters (scalars), batch-norm running statistics
    /// excluded (burn's `num_params` counts those too).
    pub fn parameter_count(&self) -> usize {
        covnoise::params::ParamTable::of(self)
            .entries()
            .iter()
            .map(|e| e.numel())
            .sum()
    }
}
