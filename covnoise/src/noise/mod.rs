//! Gradient noise with the structure of the Fisher: the noise structures
//! (behind the [`NoiseStructure`] trait), the rules that set their scale,
//! and the [`NoiseStage`] that applies them between backward and the
//! optimizer step.

mod shared;
mod stage;
mod structure;

pub use shared::SharedNoiseStage;
pub use stage::{NoiseStage, NoiseState, NoisyGradient};
pub use structure::{
    Bernoulli, Constant, Diagonal, FullFisher, Isotropic, NoNoise, NoiseStd, NoiseStep,
    NoiseStructure, StructureName, StructureOptions, StructuredGradient, Subset,
};

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{CovnoiseError, Result, check_non_negative, check_positive};
use crate::moments::Estimator;

/// How the noise scale c is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "rule")]
pub enum ScaleRule {
    /// c = 1/B_S - 1/B_L: the large-batch gradient plus noise has the
    /// covariance of a small-batch gradient at the same learning rate.
    Paper {
        /// The small batch B_S being imitated.
        small_batch: usize,
    },
    /// c = (lr_S / lr_L) / B_S - 1/B_L, clamped at 0: matches SGD's
    /// stationary spread (lr x covariance) when the two batch sizes run at
    /// different learning rates.
    Temperature {
        /// The small batch B_S being imitated.
        small_batch: usize,
        /// The learning rate lr_S of the small-batch reference.
        small_lr: f64,
        /// The (peak) learning rate lr_L of the large-batch run.
        lr: f64,
    },
    /// A fixed c.
    Fixed {
        /// The scale c >= 0.
        c: f64,
    },
}

impl ScaleRule {
    /// Resolves c for a run with global batch `large_batch` (before any
    /// multiplier).
    pub fn resolve(&self, large_batch: usize) -> Result<f64> {
        match *self {
            ScaleRule::Paper { small_batch } => {
                check_positive("small-batch", small_batch as f64)?;
                if small_batch >= large_batch {
                    return Err(CovnoiseError::SmallBatchNotSmaller {
                        small: small_batch,
                        large: large_batch,
                    });
                }
                Ok(1.0 / small_batch as f64 - 1.0 / large_batch as f64)
            }
            ScaleRule::Temperature {
                small_batch,
                small_lr,
                lr,
            } => {
                check_positive("small-batch", small_batch as f64)?;
                check_positive("small-lr", small_lr)?;
                check_positive("lr", lr)?;
                Ok(((small_lr / lr) / small_batch as f64 - 1.0 / large_batch as f64).max(0.0))
            }
            ScaleRule::Fixed { c } => {
                check_non_negative("noise-scale", c)?;
                Ok(c)
            }
        }
    }
}

/// The epochs during which noise is added: `from <= epoch < until`
/// (0-based epochs; `until = None` means to the end of the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NoiseWindow {
    /// First epoch with noise (0-based).
    pub from: usize,
    /// First epoch without noise again, or None for the rest of the run.
    pub until: Option<usize>,
}

impl NoiseWindow {
    /// Whether noise is applied in `epoch`.
    pub fn contains(&self, epoch: usize) -> bool {
        epoch >= self.from && self.until.is_none_or(|u| epoch < u)
    }
}

/// Everything that defines the noise stage.
#[derive(Debug, Clone)]
pub struct NoiseConfig {
    /// Covariance structure: covnoise's own ([`NoNoise`], [`Isotropic`],
    /// [`Diagonal`], [`FullFisher`]) or one of your own.
    pub structure: Arc<dyn NoiseStructure>,
    /// Estimator of diag(S) for `diag` and `isotropic`.
    pub estimator: Estimator,
    /// Scale rule for c.
    pub scale: ScaleRule,
    /// Multiplier kappa >= 0 on c (0 turns the noise off).
    pub kappa: f64,
    /// Epochs with noise.
    pub window: NoiseWindow,
    /// Moving-average coefficient for the estimate (None: no smoothing).
    pub ema: Option<f64>,
    /// Steps between fresh estimates (1: every step).
    pub refresh_every: u64,
}

/// Two configurations are equal when their settings are, their structures
/// compared by name.
impl PartialEq for NoiseConfig {
    fn eq(&self, other: &Self) -> bool {
        self.structure.name() == other.structure.name()
            && self.estimator == other.estimator
            && self.scale == other.scale
            && self.kappa == other.kappa
            && self.window == other.window
            && self.ema == other.ema
            && self.refresh_every == other.refresh_every
    }
}

impl NoiseConfig {
    /// Plain large-batch training.
    pub fn none() -> Self {
        Self {
            structure: Arc::new(NoNoise),
            estimator: Estimator::Exact,
            scale: ScaleRule::Fixed { c: 0.0 },
            kappa: 1.0,
            window: NoiseWindow::default(),
            ema: None,
            refresh_every: 1,
        }
    }

    /// The paper's method: diagonal-Fisher noise from the exact estimator,
    /// scaled by c = 1/B_S - 1/B_L.
    pub fn diag_fisher(small_batch: usize) -> Self {
        Self::paper(Arc::new(Diagonal), small_batch)
    }

    /// Isotropic noise of the diagonal Fisher's total variance, the control
    /// without structure (exact estimator, paper rule).
    pub fn isotropic(small_batch: usize) -> Self {
        Self::paper(Arc::new(Isotropic), small_batch)
    }

    /// Full-Fisher noise by reweighting the per-example losses (no d x d
    /// matrix, no estimator), scaled by the paper rule.
    pub fn full_fisher(small_batch: usize) -> Self {
        Self::paper(Arc::new(FullFisher { centered: false }), small_batch)
    }

    /// Full noise of the centered batch covariance Sigma_B (weights centered).
    pub fn full_covariance(small_batch: usize) -> Self {
        Self::paper(Arc::new(FullFisher { centered: true }), small_batch)
    }

    /// `structure` (a user's own, say) scaled by the paper rule, with the
    /// exact estimator where it draws on an estimate.
    pub fn paper(structure: Arc<dyn NoiseStructure>, small_batch: usize) -> Self {
        Self {
            structure,
            scale: ScaleRule::Paper { small_batch },
            ..Self::none()
        }
    }

    /// The same settings with another structure.
    pub fn with_structure(self, structure: Arc<dyn NoiseStructure>) -> Self {
        Self { structure, ..self }
    }

    /// Whether the structure adds no noise ([`NoNoise`]).
    pub fn is_none(&self) -> bool {
        !self.structure.adds_noise()
    }

    /// The same noise, estimated by `estimator` (diag and isotropic).
    pub fn with_estimator(self, estimator: Estimator) -> Self {
        Self { estimator, ..self }
    }

    /// The same noise, scaled by `scale`.
    pub fn with_scale(self, scale: ScaleRule) -> Self {
        Self { scale, ..self }
    }

    /// The same noise, its scale multiplied by `kappa` (0: none, bit for bit).
    pub fn with_kappa(self, kappa: f64) -> Self {
        Self { kappa, ..self }
    }

    /// The same noise, added only in epochs `from..until` (0-based; `None`:
    /// to the end). Steps then need their epoch
    /// ([`NoiseStage::gradient_in_epoch`]).
    pub fn with_window(self, from: usize, until: Option<usize>) -> Self {
        Self {
            window: NoiseWindow { from, until },
            ..self
        }
    }

    /// The same noise from an estimate smoothed by an exponential moving
    /// average of coefficient `beta` (bias-corrected).
    pub fn with_ema(self, beta: f64) -> Self {
        Self {
            ema: Some(beta),
            ..self
        }
    }

    /// The same noise, its estimate refreshed every `steps` steps.
    pub fn with_refresh(self, steps: u64) -> Self {
        Self {
            refresh_every: steps,
            ..self
        }
    }

    /// Checks the settings that do not depend on the model or the batch.
    pub fn validate(&self) -> Result<()> {
        check_non_negative("kappa", self.kappa)?;
        check_positive("refresh", self.refresh_every as f64)?;
        if let Some(until) = self.window.until
            && until <= self.window.from
        {
            return Err(CovnoiseError::InvalidSetting {
                name: "noise-until",
                value: until.to_string(),
                reason: "must be greater than noise-from",
            });
        }
        if let Estimator::Microbatch { micro_batches } = self.estimator
            && micro_batches < 2
        {
            return Err(CovnoiseError::TooFewMicroBatches(micro_batches));
        }
        Ok(())
    }
}
