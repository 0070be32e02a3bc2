//! Reuse and smoothing of second-moment estimates across steps.

use burn::tensor::Device;

use super::SecondMoment;
use crate::error::{CovnoiseError, Result, check_positive};
use crate::tensor_util::{from_vec1, to_vec};

/// A [`Smoother`]'s state as host values, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct SmootherState {
    /// The (not bias-corrected) average: diag values per parameter, or a trace.
    pub average: Option<MomentValues>,
    /// Estimates folded in so far.
    pub updates: i32,
    /// Step of the last fresh estimate.
    pub last_refresh: Option<u64>,
}

/// A second moment on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum MomentValues {
    /// diag(S), one vector per parameter in table order.
    Diag(Vec<Vec<f32>>),
    /// tr(S).
    Trace(f64),
}

/// Refreshes an estimate every `refresh_every` steps and optionally smooths
/// successive estimates with an exponential moving average.
///
/// The moving average is bias-corrected as in Adam, `m_n / (1 - beta^n)`
/// after n updates, so that the first estimates are not shrunk towards zero.
#[derive(Debug, Clone)]
pub struct Smoother {
    ema: Option<f64>,
    refresh_every: u64,
    average: Option<SecondMoment>,
    updates: i32,
    last_refresh: Option<u64>,
}

impl Smoother {
    /// `ema`: moving-average coefficient beta in [0, 1) (None: use the latest
    /// estimate as is); `refresh_every`: steps between estimates (>= 1).
    pub fn new(ema: Option<f64>, refresh_every: u64) -> Result<Self> {
        if let Some(beta) = ema
            && !(beta.is_finite() && (0.0..1.0).contains(&beta))
        {
            return Err(CovnoiseError::InvalidSetting {
                name: "ema",
                value: format!("{beta}"),
                reason: "must be in [0, 1)",
            });
        }
        check_positive("refresh", refresh_every as f64)?;
        Ok(Self {
            ema,
            refresh_every,
            average: None,
            updates: 0,
            last_refresh: None,
        })
    }

    /// Forgets every estimate (the next step refreshes).
    pub fn reset(&mut self) {
        self.average = None;
        self.updates = 0;
        self.last_refresh = None;
    }

    /// Whether a fresh estimate is due at `step`.
    pub fn needs_refresh(&self, step: u64) -> bool {
        match self.last_refresh {
            None => true,
            Some(last) => step.saturating_sub(last) >= self.refresh_every,
        }
    }

    /// Folds in a fresh estimate made at `step`.
    pub fn update(&mut self, fresh: SecondMoment, step: u64) -> Result<()> {
        self.average = Some(match (&self.average, self.ema) {
            (Some(avg), Some(beta)) => avg.combine(beta, &fresh, 1.0 - beta)?,
            (None, Some(beta)) => fresh.scaled(1.0 - beta),
            (_, None) => fresh,
        });
        self.updates += 1;
        self.last_refresh = Some(step);
        Ok(())
    }

    /// The state, read back to the host.
    pub fn state(&self) -> Result<SmootherState> {
        let average = match &self.average {
            None => None,
            Some(SecondMoment::Trace(t)) => Some(MomentValues::Trace(*t)),
            Some(SecondMoment::Diag(d)) => Some(MomentValues::Diag(
                d.iter().map(to_vec).collect::<Result<Vec<_>>>()?,
            )),
        };
        Ok(SmootherState {
            average,
            updates: self.updates,
            last_refresh: self.last_refresh,
        })
    }

    /// Continues from `state` (tensors placed on `device`).
    pub fn restore(&mut self, state: SmootherState, device: &Device) {
        self.average = state.average.map(|a| match a {
            MomentValues::Trace(t) => SecondMoment::Trace(t),
            MomentValues::Diag(d) => {
                SecondMoment::Diag(d.into_iter().map(|v| from_vec1(v, device)).collect())
            }
        });
        self.updates = state.updates;
        self.last_refresh = state.last_refresh;
    }

    /// The current (bias-corrected) estimate, if any.
    pub fn current(&self) -> Option<SecondMoment> {
        let avg = self.average.as_ref()?;
        Some(match self.ema {
            Some(beta) if beta > 0.0 => avg.scaled(1.0 / (1.0 - beta.powi(self.updates))),
            _ => avg.clone(),
        })
    }
}
