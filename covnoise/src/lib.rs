//! covnoise: large-batch SGD with structured (Fisher) covariance noise
//! (Wen et al., AISTATS 2020), for any burn module on any burn backend.
//!
//! Data flows one way: data -> model -> loss and gradients -> [`moments`]
//! (second moments) -> [`noise`] -> [`optim`]. [`model`] holds what the
//! noise stage needs from any model (per-example losses, batches it can
//! slice, batch norm that says how it groups examples); [`probes`] routes a
//! model's layers so that their exact per-example rules can read them.
//! [`params`] (parameter tables of any burn module) and [`rng`]
//! (counter-based randomness) are the layers all of them stand on.
//!
//! # What is here, and what is not
//!
//! This crate is the library alone: its dependencies are burn, rand,
//! safetensors, serde and thiserror (and `gemm`, which burn's flex backend
//! already builds). The `covnoise` command, with its model zoo, data
//! loaders, trainer, studies, plots, theory and benchmarks, is the
//! `covnoise-lab` crate built on this one.
//!
//! Extension points are traits a user implements in their own crate:
//! [`probes::ExactRule`] gives a layer of their own an exact per-example
//! rule, and [`noise::NoiseStructure`] a noise structure of their own.
//!
//! # Example: Fisher noise for any burn model, with any burn optimizer
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::SgdConfig;
//! use burn::optim::momentum::MomentumConfig;
//! use burn::tensor::{Device, Int, Tensor, activation};
//! use covnoise::model::{Batch, Objective, Probes};
//! use covnoise::noise::{NoiseConfig, NoiseStage};
//!
//! // A user's own model: burn layers, forward routed through `Probes` so the
//! // exact estimator can read per-example factors.
//! #[derive(Module, Debug)]
//! struct Net {
//!     hidden: Linear,
//!     out: Linear,
//! }
//!
//! impl Net {
//!     fn forward(&self, batch: &Batch, probes: &mut Probes) -> Objective {
//!         let h = activation::relu(probes.linear(&self.hidden, batch.x.clone()));
//!         Objective::Classification { logits: probes.linear(&self.out, h), labels: batch.labels.clone() }
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::flex().autodiff();
//! device.seed(0);
//! let mut net = Net {
//!     hidden: LinearConfig::new(20, 32).init(&device),
//!     out: LinearConfig::new(32, 4).init(&device),
//! };
//! // burn's SGD with PyTorch's momentum (dampening 0).
//! let mut optimizer = SgdConfig::new()
//!     .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
//!     .init();
//! let (batch_size, lr) = (128, 0.1);
//! // Diagonal-Fisher noise imitating batch 16: c = 1/16 - 1/128.
//! let mut noise = NoiseStage::new(NoiseConfig::diag_fisher(16), batch_size, 7)?;
//! let x = Tensor::<2>::random([batch_size, 20], burn::tensor::Distribution::Default, &device);
//! // The class is the sign pattern of the first two features.
//! let sign = |j| x.clone().narrow(1, j, 1).reshape([batch_size]).greater_elem(0.0).int();
//! let labels: Tensor<1, Int> = sign(0) + sign(1) * 2;
//! let batch = Batch { x, labels };
//! let mut first = None;
//! for _ in 0..30 {
//!     let step = noise.gradient(&net, &batch, Net::forward)?;
//!     first.get_or_insert(step.loss);
//!     net = optimizer.step(lr, net, step.grads);
//! }
//! let last = noise.gradient(&net, &batch, Net::forward)?.loss;
//! assert!(last < 0.5 * first.unwrap(), "loss {first:?} -> {last}");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod collective;
pub mod error;
pub mod kernels;
pub mod model;
pub mod moments;
pub mod noise;
pub mod optim;
pub mod params;
pub mod probes;
pub mod regularizer;
pub mod rng;
pub mod tensor_util;
pub mod weights;

pub use error::{CovnoiseError, Result};
