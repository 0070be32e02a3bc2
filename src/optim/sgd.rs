//! Stochastic gradient descent with momentum, Nesterov and weight decay,
//! exactly as `torch.optim.SGD` applies them:
//!
//! ```text
//! g = g + wd * p
//! buf = g                                   (first step)
//! buf = momentum * buf + (1 - dampening) * g (later steps)
//! g = g + momentum * buf  (Nesterov)   or   g = buf
//! p = p - lr * g
//! ```

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{CovnoiseError, Result, check_non_negative};

/// Hyper-parameters of [`Sgd`] (the learning rate is given at each step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum coefficient in [0, 1).
    pub momentum: f64,
    /// Dampening of the momentum buffer (PyTorch's default 0).
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    /// Checks the ranges PyTorch enforces.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("momentum", self.momentum)?;
        if self.momentum >= 1.0 {
            return Err(CovnoiseError::InvalidSetting {
                name: "momentum",
                value: self.momentum.to_string(),
                reason: "must be < 1",
            });
        }
        check_non_negative("dampening", self.dampening)?;
        check_non_negative("weight-decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(CovnoiseError::InvalidSetting {
                name: "nesterov",
                value: "true".into(),
                reason: "Nesterov momentum requires momentum > 0 and dampening 0",
            });
        }
        Ok(())
    }
}

/// SGD with per-parameter momentum buffers.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    buffers: Vec<Option<Tensor<2>>>,
}

impl Sgd {
    /// A new optimizer (validates the configuration).
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            buffers: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// Updates `params` in place with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [Tensor<2>], grads: &[Tensor<2>], lr: f64) -> Result<()> {
        check_non_negative("lr", lr)?;
        if params.len() != grads.len() {
            return Err(CovnoiseError::Shape(format!(
                "{} parameters but {} gradients",
                params.len(),
                grads.len()
            )));
        }
        if self.buffers.is_empty() {
            self.buffers = vec![None; params.len()];
        }
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.config;
        for ((p, g), buf) in params.iter_mut().zip(grads).zip(self.buffers.iter_mut()) {
            if p.dims() != g.dims() {
                return Err(CovnoiseError::Shape(format!(
                    "parameter {:?} and gradient {:?}",
                    p.dims(),
                    g.dims()
                )));
            }
            let mut d = g.clone();
            if weight_decay != 0.0 {
                d = d + p.clone() * weight_decay as f32;
            }
            if momentum != 0.0 {
                let b = match buf.take() {
                    None => d.clone(),
                    Some(b) => b * momentum as f32 + d.clone() * (1.0 - dampening) as f32,
                };
                d = if nesterov {
                    d + b.clone() * momentum as f32
                } else {
                    b.clone()
                };
                *buf = Some(b);
            }
            *p = p.clone() - d * lr as f32;
        }
        Ok(())
    }
}
