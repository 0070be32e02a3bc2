//! covnoise: large-batch SGD with structured (Fisher) covariance noise
//! (Wen et al., AISTATS 2020).
//!
//! Data flows one way: [`data`] -> [`model`] -> loss and gradients ->
//! [`moments`] (second moments) -> [`noise`] -> [`optim`]; [`train`] runs the
//! loop. [`theory`] stands alone; [`report`] reads results only.
//!
//! # Example: an MLP trained with diagonal-Fisher noise
//!
//! ```
//! use burn::tensor::Device;
//! use covnoise::data::Dataset;
//! use covnoise::model::{GradientModel, Mlp, MlpConfig, Normalization};
//! use covnoise::noise::{NoiseConfig, NoiseStage};
//! use covnoise::optim::{Sgd, SgdConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::flex();
//! let data = Dataset::synthetic(512, 20, 4, 0); // 512 examples, 20 features, 4 classes
//! let config = MlpConfig { input: 20, hidden: vec![32], classes: 4, normalization: Normalization::None };
//! let mut model = Mlp::new(config, 0, &device)?;
//! let (batch_size, lr) = (128, 0.1);
//! // Diagonal-Fisher noise imitating batch 16: c = 1/16 - 1/128.
//! let mut noise = NoiseStage::new(NoiseConfig::diag_fisher(16), batch_size, lr, 7)?;
//! let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, ..Default::default() })?;
//! for epoch in 0..5 {
//!     for indices in data.batches(batch_size, 0, epoch as u64) {
//!         let batch = covnoise::train::to_device(&data.gather(&indices), &device);
//!         let step = noise.gradient(&mut model, &batch, epoch)?;
//!         sgd.step(model.params_mut(), &step.grads, lr)?;
//!     }
//! }
//! let accuracy = covnoise::train::evaluate(&model, &data, 256, &device)?.accuracy;
//! assert!(accuracy > 0.5, "accuracy {accuracy}");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod collective;
pub mod data;
#[cfg(feature = "mpi")]
pub mod dist;
pub mod error;
pub mod model;
pub mod moments;
pub mod noise;
pub mod optim;
pub mod params;
pub mod report;
pub mod rng;
pub mod study;
pub mod tensor_util;
pub mod theory;
pub mod train;

pub use error::{CovnoiseError, Result};
