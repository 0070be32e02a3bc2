//! The records a run directory holds: one line of `metrics.jsonl` per epoch
//! and `summary.json` at the end. [`crate::report`] reads the same types.

use serde::{Deserialize, Deserializer, Serialize};

/// JSON has no NaN: serde_json writes a NaN as `null`, so `null` reads back
/// as NaN (a diverged run's metrics).
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One epoch's metrics (one line of `metrics.jsonl`). Accuracies are
/// fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Learning rate of the epoch's last step.
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Mean training loss over the epoch's steps (training mode, with noise
    /// in the weights' trajectory but not in the loss).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    /// Fraction of training examples predicted correctly during the epoch.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_accuracy: f64,
    /// Test loss after the epoch (evaluation mode).
    #[serde(deserialize_with = "nan_if_null")]
    pub test_loss: f64,
    /// Test accuracy after the epoch.
    #[serde(deserialize_with = "nan_if_null")]
    pub test_accuracy: f64,
    /// Mean over the epoch's steps of the added noise's expected total
    /// variance c tr(S); null for full-Fisher noise.
    pub noise_trace: Option<f64>,
    /// Training wall-clock seconds of the epoch (evaluation excluded).
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Evaluation wall-clock seconds after the epoch.
    #[serde(default)]
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_seconds: f64,
    /// Optimizer steps taken so far.
    #[serde(default)]
    pub steps: u64,
    /// Mean over the epoch's steps of the regularizer's value without its
    /// strength, `(1/M) sum_m ||g_m||^2` (not part of `train_loss`); absent
    /// without a regularizer (then left out of the line, so that a line
    /// written before the field existed reads and writes back unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalty: Option<f64>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// All epochs ran.
    Completed,
    /// Training stopped at a non-finite loss or gradient.
    Diverged,
}

/// Where and how a run diverged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DivergedInfo {
    /// Global step (0-based) of the non-finite loss or gradient.
    pub step: u64,
    /// Epoch (1-based) in which it happened.
    pub epoch: usize,
    /// The last finite training loss before it, if any.
    pub last_finite_loss: Option<f64>,
    /// The error message.
    pub message: String,
}

/// `summary.json`: the outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How the run ended.
    pub status: RunStatus,
    /// Final test accuracy (evaluation mode).
    #[serde(deserialize_with = "nan_if_null")]
    pub test_accuracy: f64,
    /// Final accuracy on the whole training set (evaluation mode).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_accuracy: f64,
    /// Final loss on the whole training set (evaluation mode).
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    /// Final test loss.
    #[serde(deserialize_with = "nan_if_null")]
    pub test_loss: f64,
    /// Epochs completed.
    pub epochs: usize,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Wall-clock seconds of the whole run (setup, training, evaluation).
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_seconds: f64,
    /// Mean training seconds per completed epoch (evaluation excluded).
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds_per_epoch: f64,
    /// The run's seed.
    pub seed: u64,
    /// The resolved noise scale c (kappa included; 0 without noise).
    #[serde(deserialize_with = "nan_if_null")]
    pub noise_scale: f64,
    /// Number of processes.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Whether all replicas ended with bit-identical parameters (null for a
    /// single process).
    #[serde(default)]
    pub replicas_identical: Option<bool>,
    /// Set when the run diverged.
    #[serde(default)]
    pub diverged: Option<DivergedInfo>,
    /// Wall-clock seconds spent writing checkpoints (this session).
    #[serde(default)]
    pub checkpoint_seconds: f64,
    /// Size in bytes of the last checkpoint written (0: none).
    #[serde(default)]
    pub checkpoint_bytes: u64,
    /// A sharpness proxy of the final model: the trace of the empirical
    /// Fisher per example, `(1/n) sum_i ||grad l_i||^2`, on the first
    /// `n = min(4096, N)` training examples (see
    /// [`covnoise::moments::fisher_trace`]). None when the model has no
    /// per-example gradients (batch norm), for a diverged run, and in
    /// summaries written before the field existed.
    #[serde(default)]
    pub fisher_trace: Option<f64>,
}

fn one() -> usize {
    1
}
