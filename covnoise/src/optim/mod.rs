//! SGD in PyTorch's semantics, learning-rate schedules and batch-size
//! scaling rules.

mod schedule;
mod sgd;

pub use schedule::{LrSchedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig, SgdState};

use serde::{Deserialize, Serialize};

/// How a learning rate tuned at one batch size is carried to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrScaling {
    /// Keep the learning rate.
    None,
    /// `lr * B / B_ref` (Goyal et al. 2017).
    Linear,
    /// `lr * sqrt(B / B_ref)` (Hoffer et al. 2017).
    Sqrt,
}

impl LrScaling {
    /// The learning rate for `batch`, given `lr_ref` tuned at `batch_ref`.
    pub fn scale(self, lr_ref: f64, batch: usize, batch_ref: usize) -> f64 {
        let ratio = batch as f64 / batch_ref as f64;
        match self {
            LrScaling::None => lr_ref,
            LrScaling::Linear => lr_ref * ratio,
            LrScaling::Sqrt => lr_ref * ratio.sqrt(),
        }
    }
}
