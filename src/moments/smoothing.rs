//! Reuse and smoothing of second-moment estimates across steps.

use super::SecondMoment;
use crate::error::{CovnoiseError, Result, check_positive};

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

    /// The current (bias-corrected) estimate, if any.
    pub fn current(&self) -> Option<SecondMoment> {
        let avg = self.average.as_ref()?;
        Some(match self.ema {
            Some(beta) if beta > 0.0 => avg.scaled(1.0 / (1.0 - beta.powi(self.updates))),
            _ => avg.clone(),
        })
    }
}
