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

use burn::optim::{LearningRate, ModuleOptimizer, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};
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

/// SGD in PyTorch's semantics as a burn [`Optimizer`]: drive it with
/// burn's `ModuleOptimizer` (`SgdConfig::init`), which keeps one momentum
/// buffer per parameter keyed by `ParamId` and saves it with `to_record`.
///
/// burn's own `SgdConfig` matches `torch.optim.SGD` only when its momentum
/// is configured with dampening 0 (burn's `MomentumConfig` defaults to 0.1):
/// `SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))`.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
}

/// The momentum buffer of one parameter (absent before the first step and
/// without momentum).
#[derive(Debug, Clone)]
pub struct SgdState<const D: usize> {
    /// `buf` of `torch.optim.SGD`.
    pub momentum: Option<Tensor<D>>,
}

impl<const D: usize> RecordState for SgdState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        if let Some(m) = &self.momentum {
            out.push_tensor(prefix, "momentum", m.clone().into_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        Some(Self {
            momentum: src
                .take_tensor(prefix, "momentum")
                .map(|data| Tensor::from_data(data, device)),
        })
    }
}

impl Sgd {
    /// A new optimizer (validates the configuration).
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl SgdConfig {
    /// A burn `ModuleOptimizer` running [`Sgd`] over every parameter of a
    /// module (validates the configuration).
    pub fn init(&self) -> Result<ModuleOptimizer> {
        Ok(ModuleOptimizer::from(Sgd::new(*self)?))
    }
}

impl Optimizer for Sgd {
    type State<const D: usize> = SgdState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.config;
        let mut d = grad;
        if weight_decay != 0.0 {
            d = d + tensor.clone() * weight_decay as f32;
        }
        let mut buffer = None;
        if momentum != 0.0 {
            let b = match state.and_then(|s| s.momentum) {
                None => d.clone(),
                // Without dampening (the default) the gradient enters as
                // it is: one pass over the parameters fewer per step.
                Some(b) if dampening == 0.0 => b * momentum as f32 + d.clone(),
                Some(b) => b * momentum as f32 + d.clone() * (1.0 - dampening) as f32,
            };
            d = if nesterov {
                d + b.clone() * momentum as f32
            } else {
                b.clone()
            };
            buffer = Some(b);
        }
        let updated = tensor - d * lr as f32;
        (updated, buffer.map(|b| SgdState { momentum: Some(b) }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        SgdState {
            momentum: state.momentum.map(|m| m.to_device(device)),
        }
    }
}
