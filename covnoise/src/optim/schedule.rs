//! Learning-rate schedules, evaluated per optimizer step.

use serde::{Deserialize, Serialize};

use crate::error::{CovnoiseError, Result, check_non_negative, check_positive};

/// The shape of the schedule after warmup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` at the start of each milestone epoch.
    Multistep {
        /// Epochs (0-based) at which the rate drops.
        milestones: Vec<usize>,
        /// Factor per milestone (PyTorch's default 0.1).
        gamma: f64,
    },
    /// `0.5 (1 + cos(pi t / T))` over all T steps of the run.
    Cosine,
}

/// A learning-rate schedule with linear warmup, evaluated per step as
/// PyTorch's `LambdaLR` with `min(1, (t+1)/W) * shape(t)` would be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak (base) learning rate.
    pub base_lr: f64,
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Warmup steps W (0: none).
    pub warmup_steps: u64,
    /// Total steps T of the run.
    pub total_steps: u64,
    /// Steps per epoch (for milestones given in epochs).
    pub steps_per_epoch: u64,
}

impl LrSchedule {
    /// Validates and builds a schedule.
    pub fn new(
        base_lr: f64,
        kind: ScheduleKind,
        warmup_steps: u64,
        total_steps: u64,
        steps_per_epoch: u64,
    ) -> Result<Self> {
        check_non_negative("lr", base_lr)?;
        check_positive("steps per epoch", steps_per_epoch as f64)?;
        if let ScheduleKind::Multistep { milestones, gamma } = &kind {
            check_non_negative("gamma", *gamma)?;
            if milestones.windows(2).any(|w| w[0] >= w[1]) {
                return Err(CovnoiseError::InvalidSetting {
                    name: "milestones",
                    value: format!("{milestones:?}"),
                    reason: "must be strictly increasing",
                });
            }
        }
        Ok(Self {
            base_lr,
            kind,
            warmup_steps,
            total_steps,
            steps_per_epoch,
        })
    }

    /// The learning rate at step `t` (0-based).
    pub fn lr_at(&self, t: u64) -> f64 {
        let warmup = if self.warmup_steps > 0 {
            ((t + 1) as f64 / self.warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        let shape = match &self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Multistep { milestones, gamma } => {
                let epoch = (t / self.steps_per_epoch) as usize;
                gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32)
            }
            ScheduleKind::Cosine => {
                let total = self.total_steps.max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total).cos())
            }
        };
        self.base_lr * warmup * shape
    }
}
