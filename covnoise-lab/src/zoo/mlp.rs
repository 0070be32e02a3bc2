//! A multi-layer perceptron with ReLU and optional (ghost) batch
//! normalization, as a plain burn module built from burn's `Linear`.
//!
//! Its forward pass routes every Linear layer through [`Probes`], so the
//! exact and Monte-Carlo estimators get per-example factors from the same
//! backward pass; with the probes off it is the plain network.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use covnoise::error::{CovnoiseError, Result};
use covnoise::kernels;
use covnoise::model::{Coupling, GhostBatchNorm, Objective, Probes};

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

impl Normalization {
    /// How the examples of a training batch interact under this
    /// normalization.
    pub fn coupling(self) -> Coupling {
        match self {
            Normalization::None => Coupling::Independent,
            Normalization::BatchNorm => Coupling::WholeBatch,
            Normalization::GhostBatchNorm(n) => Coupling::Groups(n),
        }
    }
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

/// A ReLU MLP: `Linear -> [BatchNorm] -> ReLU` for each hidden layer, then a
/// Linear output layer, trained with mean cross-entropy.
#[derive(Module, Debug)]
pub struct Mlp {
    /// The Linear layers, input to output.
    pub layers: Vec<Linear>,
    /// One normalization per hidden layer (empty without normalization).
    pub norms: Vec<GhostBatchNorm>,
}

impl Mlp {
    /// A new MLP initialized as PyTorch's `nn.Linear` does
    /// (`U(-1/sqrt(in), 1/sqrt(in))` for weights and biases; batch-norm scale
    /// 1 and shift 0), from a seeded generator, on `device`.
    pub fn new(config: &MlpConfig, seed: u64, device: &Device) -> Result<Self> {
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
        let mut layers = Vec::new();
        let mut norms = Vec::new();
        for l in 0..widths.len() - 1 {
            let (fan_in, fan_out) = (widths[l], widths[l + 1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut uniform = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = Tensor::<2>::from_data(
                TensorData::new(uniform(fan_in * fan_out), [fan_in, fan_out]),
                device,
            );
            let bias = Tensor::<1>::from_data(TensorData::new(uniform(fan_out), [fan_out]), device);
            layers.push(Linear {
                weight: Param::from_tensor(weight),
                bias: Some(Param::from_tensor(bias)),
            });
            let hidden = l + 1 < widths.len() - 1;
            match config.normalization {
                Normalization::None => {}
                _ if !hidden => {}
                Normalization::BatchNorm => norms.push(GhostBatchNorm::new(fan_out, 0, device)),
                Normalization::GhostBatchNorm(n) => {
                    norms.push(GhostBatchNorm::new(fan_out, n, device))
                }
            }
        }
        Ok(Self { layers, norms })
    }

    /// Logits `[B, classes]` of features `x` `[B, input]`; batch statistics
    /// on an autodiff device, running statistics otherwise.
    pub fn forward(&self, x: Tensor<2>, probes: &mut Probes) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut h = x;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut z = probes.linear(layer, h);
            if l == last {
                return z;
            }
            if let Some(norm) = self.norms.get(l) {
                z = probes.batch_norm(norm, z);
            }
            h = kernels::relu(z);
        }
        unreachable!("the loop returns at the last layer")
    }

    /// The forward pass the noise stage differentiates: logits of the batch
    /// and its labels.
    pub fn objective(
        &self,
        x: Tensor<2>,
        labels: Tensor<1, Int>,
        probes: &mut Probes,
    ) -> Objective {
        Objective::Classification {
            logits: self.forward(x, probes),
            labels,
        }
    }

    /// Logits in evaluation mode (running statistics, no autodiff).
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.valid().forward(x.inner(), &mut Probes::off())
    }
}
