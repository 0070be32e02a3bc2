//! A noise stage behind a shared handle, for training loops that compute the
//! gradient through `&self` of a cloneable model (burn-train's
//! `TrainStep::step`).

use std::sync::{Arc, Mutex};

use burn::module::Module;

use super::{NoiseStage, NoisyGradient};
use crate::error::{CovnoiseError, Result};
use crate::model::{Examples, Forward};

/// A single-process [`NoiseStage`] that clones share, so that it can live in
/// a `#[module(skip)]` field of a burn model and be driven from
/// `TrainStep::step(&self, ..)`.
///
/// The stage counts its own steps; the epoch it passes on (for noise
/// windows) is `steps / steps_per_epoch`. Clones share one state: every
/// call advances the same step counter and moving average.
#[derive(Clone, Debug)]
pub struct SharedNoiseStage {
    stage: Arc<Mutex<NoiseStage>>,
    steps_per_epoch: u64,
}

impl SharedNoiseStage {
    /// Shares `stage`, for a loop that makes `steps_per_epoch` steps per
    /// epoch (>= 1).
    pub fn new(stage: NoiseStage, steps_per_epoch: usize) -> Result<Self> {
        if steps_per_epoch == 0 {
            return Err(CovnoiseError::InvalidSetting {
                name: "steps-per-epoch",
                value: "0".into(),
                reason: "must be >= 1",
            });
        }
        Ok(Self {
            stage: Arc::new(Mutex::new(stage)),
            steps_per_epoch: steps_per_epoch as u64,
        })
    }

    /// [`NoiseStage::gradient_in_epoch`] for the current step, in the epoch the step
    /// count implies.
    pub fn gradient<M, B, F>(&self, model: &M, batch: &B, forward: F) -> Result<NoisyGradient>
    where
        M: Module,
        B: Examples,
        F: Forward<M, B>,
    {
        let mut stage = self.lock()?;
        let epoch = (stage.step() / self.steps_per_epoch) as usize;
        stage.gradient_in_epoch(model, batch, epoch, forward)
    }

    /// The next step to be computed.
    pub fn step(&self) -> Result<u64> {
        Ok(self.lock()?.step())
    }

    /// A step that panicked may have updated the moving average without
    /// advancing the step, so a poisoned stage is an error, not a state to
    /// continue from.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, NoiseStage>> {
        self.stage.lock().map_err(|_| {
            CovnoiseError::Unsupported(
                "the shared noise stage is unusable: a step panicked while holding it".into(),
            )
        })
    }
}
