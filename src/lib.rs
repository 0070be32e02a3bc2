//! covnoise: large-batch SGD with structured (Fisher) covariance noise.
//!
//! Data flows one way: [`data`] -> [`model`] -> loss/gradients ->
//! [`moments`] (second moments) -> [`noise`] -> [`optim`]; [`train`] runs the
//! loop. [`theory`] stands alone; [`report`] reads results only.

pub mod report;
