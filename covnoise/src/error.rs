//! The library's error type: every impossible setting and every numerical
//! failure the library can detect is a typed variant with a one-line message.

use thiserror::Error;

/// Errors raised by the covnoise library (configuration, model, training).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CovnoiseError {
    /// The paper's scale rule needs B_S < B_L, else c = 1/B_S - 1/B_L <= 0.
    #[error(
        "small batch B_S = {small} must be smaller than the large batch B_L = {large} for the paper scale rule (c = 1/B_S - 1/B_L would be <= 0)"
    )]
    SmallBatchNotSmaller {
        /// The small (reference) batch size B_S.
        small: usize,
        /// The large (training) batch size B_L.
        large: usize,
    },
    /// The micro-batch estimator needs at least two micro-batches.
    #[error("the micro-batch estimator needs at least 2 micro-batches, got {0}")]
    TooFewMicroBatches(usize),
    /// The micro-batches must split the (local) batch evenly.
    #[error("{micro_batches} micro-batches do not divide the batch of {batch} examples evenly")]
    MicroBatchesDoNotDivide {
        /// The batch size being split.
        batch: usize,
        /// The requested number of micro-batches.
        micro_batches: usize,
    },
    /// A numeric setting outside its valid range.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidSetting {
        /// The setting's name as the user knows it (e.g. `lr`, `kappa`).
        name: &'static str,
        /// The offending value, formatted.
        value: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The requested estimator cannot be computed for this model.
    #[error("{0}")]
    Unsupported(String),
    /// A model or setting the library refuses, and what to do instead: the
    /// remedy is typed, so that a program with its own vocabulary (the
    /// `covnoise` binary's flags) can say it in its own words.
    #[error("{problem}; {remedy}")]
    Refused {
        /// What is wrong, naming the parameter or layer.
        problem: String,
        /// What to do instead.
        remedy: Remedy,
    },
    /// Tensors or batches whose shapes do not agree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The loss became NaN or infinite.
    #[error("loss is {loss} at step {step}")]
    NonFiniteLoss {
        /// Optimizer step (0-based) at which it happened.
        step: u64,
        /// The non-finite value.
        loss: f32,
    },
    /// A gradient entry became NaN or infinite.
    #[error("gradient is not finite (NaN or infinite) at step {step}")]
    NonFiniteGradient {
        /// Optimizer step (0-based) at which it happened.
        step: u64,
    },
    /// A failure inside the tensor backend (reading data back, etc.).
    #[error("tensor backend: {0}")]
    Backend(String),
    /// A failure of the process group in a distributed run.
    #[error("collective communication failed: {0}")]
    Collective(String),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, CovnoiseError>;

/// Checks that `value` is finite and `>= 0`.
pub(crate) fn check_non_negative(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(CovnoiseError::InvalidSetting {
            name,
            value: format!("{value}"),
            reason: "must be a finite number >= 0",
        })
    }
}

/// Checks that `value` is finite and `> 0`.
pub(crate) fn check_positive(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(CovnoiseError::InvalidSetting {
            name,
            value: format!("{value}"),
            reason: "must be a finite number > 0",
        })
    }
}

/// What a user can do about a refusal ([`CovnoiseError::Refused`]), in the
/// library's terms; [`Remedy`]'s `Display` says it with the library's items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Remedy {
    /// Use the micro-batch estimator, which needs nothing from the layers.
    MicrobatchEstimator,
    /// Use the micro-batch estimator with batch norm over groups
    /// (`GhostBatchNorm`).
    MicrobatchWithGhostBatchNorm,
    /// Normalize over groups of examples: `GhostBatchNorm` with a group
    /// size, routed through `Probes::batch_norm`.
    GhostBatchNorm,
    /// As [`Remedy::GhostBatchNorm`], with a group size dividing the
    /// micro-batch.
    GhostBatchNormDividingMicroBatch,
    /// Route every use of the parameter through the probes, or use the
    /// micro-batch estimator.
    RouteThroughProbes,
    /// Use an estimator that does not sample labels (exact or micro-batch).
    EstimatorWithoutSampledLabels,
    /// Use the gradient-norm penalty, which does not sample labels.
    GradNormPenalty,
}

impl std::fmt::Display for Remedy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Remedy::MicrobatchEstimator => "use the micro-batch estimator (Estimator::Microbatch)",
            Remedy::MicrobatchWithGhostBatchNorm => {
                "use the micro-batch estimator (Estimator::Microbatch) with GhostBatchNorm"
            }
            Remedy::GhostBatchNorm => {
                "use GhostBatchNorm with a group size, routed through Probes::batch_norm"
            }
            Remedy::GhostBatchNormDividingMicroBatch => {
                "use GhostBatchNorm with a group size dividing the micro-batch, routed through Probes::batch_norm"
            }
            Remedy::RouteThroughProbes => {
                "route every use through Probes, or use the micro-batch estimator (Estimator::Microbatch)"
            }
            Remedy::EstimatorWithoutSampledLabels => {
                "use the exact or micro-batch estimator (Estimator::Exact, Estimator::Microbatch)"
            }
            Remedy::GradNormPenalty => "use the gradient-norm penalty (Regularizer::grad_norm)",
        })
    }
}
