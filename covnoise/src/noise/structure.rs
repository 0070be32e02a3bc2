//! Noise structures behind one trait, over one backward-pass engine: a
//! structure says how a step's gradient and its noise are formed from the
//! passes a [`NoiseStep`] offers (the plain mean gradient, a gradient with
//! each example's loss reweighted, the mean gradient with the stage's
//! current second-moment estimate), and the stage keeps only state (seed,
//! step, the estimate with its refresh and moving average, the window).
//!
//! covnoise's own structures ([`NoNoise`], [`Isotropic`], [`Diagonal`],
//! [`FullFisher`]) implement [`NoiseStructure`] like a user's would.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{CovnoiseError, Result};
use crate::moments::{MomentKind, SecondMoment, StepGradient};
use crate::rng::{keyed_rng, normals, stream};
use rand::RngExt;

/// How the noise of a step is formed: the extension point for a noise
/// structure of one's own (implement it in your own crate and pass it to
/// [`NoiseConfig::with_structure`](super::NoiseConfig::with_structure)).
///
/// The noise must be a pure function of the step's randomness
/// ([`NoiseStep::seed`], [`NoiseStep::step`]) so that data-parallel
/// replicas add the same noise, and its scale should follow the scale rules
/// of docs/method.md: covariance `c S` with `c` = [`NoiseStep::scale`].
///
/// ```
/// use covnoise::noise::{NoiseStep, NoiseStructure, StructuredGradient};
///
/// /// Isotropic noise of a fixed variance per entry, `c * sigma2`, that
/// /// needs no estimate.
/// #[derive(Debug)]
/// struct Constant {
///     sigma2: f64,
/// }
///
/// impl NoiseStructure for Constant {
///     fn name(&self) -> String {
///         "constant".into()
///     }
///     fn plain_gradient(&self, _estimate_due: bool) -> bool {
///         true
///     }
///     fn gradient(&self, step: &mut NoiseStep<'_>) -> covnoise::Result<StructuredGradient> {
///         let mut g = step.plain()?;
///         let std = (step.scale() * self.sigma2).sqrt() as f32;
///         step.add_normal_noise(&mut g.grads, |_, n| vec![std; n]);
///         let d: usize = g.grads.iter().map(|t| t.dims()[0]).sum();
///         Ok(StructuredGradient {
///             gradient: g,
///             noise_trace: Some(step.scale() * self.sigma2 * d as f64),
///         })
///     }
/// }
/// ```
pub trait NoiseStructure: Debug + Send + Sync {
    /// The structure's name, in messages and records (`"diag"`).
    fn name(&self) -> String;

    /// Whether it adds any noise: false for [`NoNoise`] alone, whose stage
    /// then resolves c = 0 and runs plain steps.
    fn adds_noise(&self) -> bool {
        true
    }

    /// The second moment the noise is drawn from, if any. The stage then
    /// estimates it with the configured estimator, refreshes and smooths
    /// it, and [`NoiseStep::estimated`] hands out the mean gradient with it.
    fn moment(&self) -> Option<MomentKind> {
        None
    }

    /// Whether the structure reweights each example's loss (then every
    /// loss must belong to one example: batch norm over the whole batch is
    /// refused).
    fn reweights_examples(&self) -> bool {
        false
    }

    /// Whether this step's gradient is the plain mean gradient, given
    /// whether a fresh estimate of [`NoiseStructure::moment`] is due: a
    /// regularizer's micro-batch passes then make that gradient, and the
    /// step saves a pass. By default: a structure with a moment, between
    /// refreshes.
    fn plain_gradient(&self, estimate_due: bool) -> bool {
        self.moment().is_some() && !estimate_due
    }

    /// The step's gradient with its noise, from the passes `step` offers.
    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient>;
}

/// A structure's result: the gradient with its noise, and the noise's
/// expected total variance when the structure knows it.
#[derive(Debug)]
pub struct StructuredGradient {
    /// The mean gradient plus noise (flat, in table order), with the loss
    /// and accuracy counts of the step's batch.
    pub gradient: StepGradient,
    /// `E ‖noise‖²`, or None when the structure never forms it (full
    /// Fisher noise by reweighting).
    pub noise_trace: Option<f64>,
}

/// The passes a step can run, for the stage's engine (object-safe, so that
/// [`NoiseStep`] is one type for every model, batch and forward pass).
pub(super) trait StepPasses {
    /// The plain mean gradient over the global batch.
    fn plain(&mut self) -> Result<StepGradient>;
    /// The gradient of `(1/n) Σ_i w_i l_i` over the global batch, this
    /// process's examples weighted by `local_weights`.
    fn reweighted(&mut self, local_weights: &[f32]) -> Result<StepGradient>;
    /// The mean gradient, with the stage's estimate of `kind` refreshed
    /// when due.
    fn estimated(&mut self, kind: MomentKind) -> Result<StepGradient>;
    /// The standard deviations for the stage's current estimate: the cached
    /// ones when the estimate has not changed and the layout fits, else
    /// `make`'s.
    fn noise_std(
        &mut self,
        grads: &[Tensor<1>],
        make: &mut dyn FnMut(&SecondMoment) -> Result<NoiseStd>,
    ) -> Result<NoiseStd>;
}

/// One step's engine, handed to [`NoiseStructure::gradient`]: the step's
/// randomness, scale and batch, and the passes it may run.
pub struct NoiseStep<'a> {
    pub(super) passes: &'a mut dyn StepPasses,
    pub(super) c: f64,
    pub(super) seed: u64,
    pub(super) step: u64,
    pub(super) global_batch: usize,
    pub(super) local: Range<usize>,
}

impl NoiseStep<'_> {
    /// The resolved noise scale c (kappa included).
    pub fn scale(&self) -> f64 {
        self.c
    }

    /// The run's seed, shared by all processes.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The global step (0-based).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Examples in the global batch.
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// This process's examples, as positions in the global batch.
    pub fn local_examples(&self) -> Range<usize> {
        self.local.clone()
    }

    /// The plain mean gradient over the global batch.
    pub fn plain(&mut self) -> Result<StepGradient> {
        self.passes.plain()
    }

    /// The gradient of `(1/B) Σ_i w_i l_i` over the global batch of B
    /// examples, for per-example weights `weights` of the *global* batch
    /// (each process takes its own). Needs only the model's losses.
    pub fn reweighted(&mut self, weights: &[f32]) -> Result<StepGradient> {
        if weights.len() != self.global_batch {
            return Err(CovnoiseError::Shape(format!(
                "{} example weights for a global batch of {}",
                weights.len(),
                self.global_batch
            )));
        }
        let local = &weights[self.local.clone()];
        self.passes.reweighted(local)
    }

    /// The mean gradient, with the stage's estimate of the structure's
    /// [`NoiseStructure::moment`] (`kind`) refreshed when due; the estimate
    /// itself is read through [`NoiseStep::noise_std`].
    pub fn estimated(&mut self, kind: MomentKind) -> Result<StepGradient> {
        self.passes.estimated(kind)
    }

    /// The noise's standard deviations for the stage's current estimate:
    /// `make(estimate)` when the estimate changed since the last step, the
    /// same values otherwise (they change only when the estimate does).
    pub fn noise_std(
        &mut self,
        grads: &[Tensor<1>],
        mut make: impl FnMut(&SecondMoment) -> Result<NoiseStd>,
    ) -> Result<NoiseStd> {
        self.passes.noise_std(grads, &mut make)
    }

    /// Adds `std ⊙ ξ` to `grads` (flat, table order), ξ standard normals
    /// keyed by (seed, step, the parameter's position): the same on every
    /// process.
    pub fn add_noise(&self, grads: &mut [Tensor<1>], std: &NoiseStd) {
        add_keyed_noise(grads, std, self.seed, self.step, 0);
    }

    /// Adds noise whose per-entry standard deviations `std_of(position,
    /// numel)` gives (host values), keyed as [`NoiseStep::add_noise`].
    pub fn add_normal_noise(
        &self,
        grads: &mut [Tensor<1>],
        mut std_of: impl FnMut(usize, usize) -> Vec<f32>,
    ) {
        let mut variance = 0.0;
        let per_entry = grads
            .iter()
            .enumerate()
            .map(|(p, g)| {
                let std = std_of(p, g.dims()[0]);
                variance += std
                    .iter()
                    .map(|&s| f64::from(s) * f64::from(s))
                    .sum::<f64>();
                crate::tensor_util::from_vec1(std, &g.device())
            })
            .collect();
        self.add_noise(grads, &NoiseStd::PerEntry(per_entry, variance));
    }
}

/// The standard deviations of Gaussian noise, and the total variance
/// `Σ std²` they give.
#[derive(Debug, Clone)]
pub enum NoiseStd {
    /// One per entry, flat per parameter in table order, and the total
    /// variance.
    PerEntry(Vec<Tensor<1>>, f64),
    /// One for every entry, and the total variance.
    Shared(f32, f64),
}

impl NoiseStd {
    /// The total variance `E ‖noise‖²`.
    pub fn variance(&self) -> f64 {
        match self {
            NoiseStd::PerEntry(_, v) | NoiseStd::Shared(_, v) => *v,
        }
    }

    /// `sqrt(c S)` for the second moment `moment`: per entry for a diagonal,
    /// shared (`c tr(S) / d`) for a trace; `grads` gives the layout.
    pub fn of_moment(moment: &SecondMoment, c: f64, grads: &[Tensor<1>]) -> Result<NoiseStd> {
        let variance = c * moment.trace();
        Ok(match moment {
            SecondMoment::Diag(diag) => {
                if diag.len() != grads.len() {
                    return Err(CovnoiseError::Shape(
                        "second moment and gradients have different parameter counts".into(),
                    ));
                }
                NoiseStd::PerEntry(
                    diag.iter().map(|s| (s.clone() * c as f32).sqrt()).collect(),
                    variance,
                )
            }
            SecondMoment::Trace(t) => {
                let d: usize = grads.iter().map(|g| g.dims()[0]).sum();
                NoiseStd::Shared((c * t / d as f64).sqrt() as f32, variance)
            }
        })
    }

    /// Whether it was made for gradients of this layout.
    pub(super) fn fits(&self, grads: &[Tensor<1>]) -> bool {
        match self {
            NoiseStd::PerEntry(std, _) => {
                std.len() == grads.len() && std.iter().zip(grads).all(|(s, g)| s.dims() == g.dims())
            }
            NoiseStd::Shared(..) => true,
        }
    }
}

/// Adds `std ⊙ ξ` for `(seed, step)` to `grads`, parameter p's normals
/// from stream `first_stream + p`.
pub(super) fn add_keyed_noise(
    grads: &mut [Tensor<1>],
    std: &NoiseStd,
    seed: u64,
    step: u64,
    first_stream: u64,
) {
    for (p, g) in grads.iter_mut().enumerate() {
        let n = g.dims()[0];
        let xi = normals(seed, step, first_stream + p as u64, n);
        let xi = crate::tensor_util::from_vec1(xi, &g.device());
        *g = match std {
            NoiseStd::PerEntry(std, _) => g.clone() + xi * std[p].clone(),
            NoiseStd::Shared(std, _) => g.clone() + xi * *std,
        };
    }
}

/// No noise: plain large-batch SGD.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseStructure for NoNoise {
    fn name(&self) -> String {
        "none".into()
    }

    fn adds_noise(&self) -> bool {
        false
    }

    fn plain_gradient(&self, _estimate_due: bool) -> bool {
        true
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        Ok(StructuredGradient {
            gradient: step.plain()?,
            noise_trace: Some(0.0),
        })
    }
}

/// `diag(S)`: the paper's method, `D = sqrt(c diag S)` per entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Diagonal;

/// `(tr S / d) I`: the same total variance as [`Diagonal`], no structure.
#[derive(Debug, Clone, Copy, Default)]
pub struct Isotropic;

/// Gaussian noise `sqrt(c S) ξ` from the stage's estimate of `kind`.
fn moment_noise(step: &mut NoiseStep<'_>, kind: MomentKind) -> Result<StructuredGradient> {
    let mut g = step.estimated(kind)?;
    let c = step.scale();
    let std = step.noise_std(&g.grads, |moment| NoiseStd::of_moment(moment, c, &g.grads))?;
    step.add_noise(&mut g.grads, &std);
    Ok(StructuredGradient {
        gradient: g,
        noise_trace: Some(std.variance()),
    })
}

impl NoiseStructure for Diagonal {
    fn name(&self) -> String {
        "diag".into()
    }

    fn moment(&self) -> Option<MomentKind> {
        Some(MomentKind::Diag)
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        moment_noise(step, MomentKind::Diag)
    }
}

impl NoiseStructure for Isotropic {
    fn name(&self) -> String {
        "isotropic".into()
    }

    fn moment(&self) -> Option<MomentKind> {
        Some(MomentKind::Trace)
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        moment_noise(step, MomentKind::Trace)
    }
}

/// The full batch Fisher, by multiplicative reweighting of the per-example
/// losses (no d x d matrix): the loss `(1/B) Σ_i (1 + s z_i) l_i` with
/// `z_i ~ N(0, 1)` has gradient `g_B + (s/B) Σ_i z_i ∇l_i`, whose noise has
/// covariance `(s²/B) F_B`; `s² = c B` gives `c F_B`. `centered` uses
/// `z - mean(z)`, giving the centered batch covariance `c Σ_B`. The weights
/// are drawn for the global batch, so sharding does not change them. It
/// needs only per-example losses, so it works on any model whose losses
/// belong to one example each.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullFisher {
    /// Center the weights (covariance Σ_B instead of F_B).
    pub centered: bool,
}

impl NoiseStructure for FullFisher {
    fn name(&self) -> String {
        if self.centered {
            "full-centered".into()
        } else {
            "full".into()
        }
    }

    fn reweights_examples(&self) -> bool {
        true
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        let global = step.global_batch();
        let mut z = normals(step.seed(), step.step(), stream::FULL_WEIGHTS, global);
        if self.centered {
            let mean = z.iter().map(|&v| v as f64).sum::<f64>() / global as f64;
            z.iter_mut().for_each(|v| *v -= mean as f32);
        }
        let s = (step.scale() * global as f64).sqrt() as f32;
        let weights: Vec<f32> = z.iter().map(|&zi| 1.0 + s * zi).collect();
        Ok(StructuredGradient {
            gradient: step.reweighted(&weights)?,
            noise_trace: None,
        })
    }
}

/// SGD written as noise (Wu et al., ICML 2020): every example's loss is
/// weighted `w_i = 1/p` with probability p and 0 otherwise, independently,
/// so `E w_i = 1` and `Var w_i = 1/p - 1`. The gradient's noise then has
/// covariance `(1/B²) Σ_i Var(w_i) ∇l_i ∇l_iᵀ = ((1/p - 1)/B) F_B`;
/// `p = 1/(1 + c B)` gives `c F_B`. With the paper rule `c = 1/b - 1/B`
/// that is `p = b/B` and `w_i = B/b`: each example enters with the
/// probability it has of being in a batch of b, at the weight that makes
/// the step unbiased (a batch of random size, mean b).
#[derive(Debug, Clone, Copy, Default)]
pub struct Bernoulli;

impl NoiseStructure for Bernoulli {
    fn name(&self) -> String {
        "bernoulli".into()
    }

    fn reweights_examples(&self) -> bool {
        true
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        let global = step.global_batch();
        let p = 1.0 / (1.0 + step.scale() * global as f64);
        let mut rng = keyed_rng(step.seed(), step.step(), stream::BERNOULLI_WEIGHTS, 0);
        let weights: Vec<f32> = (0..global)
            .map(|_| {
                if rng.random::<f64>() < p {
                    (1.0 / p) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Ok(StructuredGradient {
            gradient: step.reweighted(&weights)?,
            noise_trace: None,
        })
    }
}

/// Multiplicative Gaussian noise on a random subset of the batch (Wu et
/// al.'s "Fisher-B"): m examples drawn without replacement get weights
/// `1 + s z_i`, `z_i ~ N(0, 1)`, the others weight 1. Given the subset the
/// noise has covariance `(s²/B²) Σ_{i∈S} ∇l_i ∇l_iᵀ`; over the subset's
/// draw, `(s² m/B²) F_B`, so `s² = c B²/m` gives `c F_B` (m = B is
/// [`FullFisher`]). A smaller subset gives the same covariance from fewer,
/// larger weights: noise further from Gaussian.
#[derive(Debug, Clone, Copy)]
pub struct Subset {
    /// Examples of the global batch that carry noise (m >= 1).
    pub size: usize,
}

impl NoiseStructure for Subset {
    fn name(&self) -> String {
        format!("subset of {}", self.size)
    }

    fn reweights_examples(&self) -> bool {
        true
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        let global = step.global_batch();
        if self.size == 0 || self.size > global {
            return Err(CovnoiseError::InvalidSetting {
                name: "noise-subset",
                value: self.size.to_string(),
                reason: "must be between 1 and the global batch size",
            });
        }
        let s = (step.scale() * (global * global) as f64 / self.size as f64).sqrt();
        let mut rng = keyed_rng(step.seed(), step.step(), stream::SUBSET_WEIGHTS, 0);
        // A partial Fisher-Yates shuffle: the first m positions are a
        // uniform subset of size m.
        let mut order: Vec<usize> = (0..global).collect();
        for k in 0..self.size {
            let j = rng.random_range(k..global);
            order.swap(k, j);
        }
        let z = normals(
            step.seed(),
            step.step(),
            stream::SUBSET_WEIGHTS + 1,
            self.size,
        );
        let mut weights = vec![1.0f32; global];
        for (&i, &zi) in order[..self.size].iter().zip(&z) {
            weights[i] = (1.0 + s * zi as f64) as f32;
        }
        Ok(StructuredGradient {
            gradient: step.reweighted(&weights)?,
            noise_trace: None,
        })
    }
}

/// Isotropic noise of a constant variance, `N(0, c v I)`: no estimate, no
/// model information (Zhu et al.'s "constant" noise). Its scale means
/// something else than the other structures': c times a variance per entry
/// v that the user chooses, not c times a second moment of the gradients.
#[derive(Debug, Clone, Copy)]
pub struct Constant {
    /// The variance per entry v at c = 1 (> 0).
    pub variance: f64,
}

impl NoiseStructure for Constant {
    fn name(&self) -> String {
        format!("constant {}", self.variance)
    }

    fn plain_gradient(&self, _estimate_due: bool) -> bool {
        true
    }

    fn gradient(&self, step: &mut NoiseStep<'_>) -> Result<StructuredGradient> {
        if !(self.variance.is_finite() && self.variance > 0.0) {
            return Err(CovnoiseError::InvalidSetting {
                name: "noise-variance",
                value: self.variance.to_string(),
                reason: "must be a finite number > 0",
            });
        }
        let mut g = step.plain()?;
        let d: usize = g.grads.iter().map(|t| t.dims()[0]).sum();
        let std = NoiseStd::Shared(
            (step.scale() * self.variance).sqrt() as f32,
            step.scale() * self.variance * d as f64,
        );
        let variance = std.variance();
        add_keyed_noise(
            &mut g.grads,
            &std,
            step.seed(),
            step.step(),
            stream::CONSTANT_NOISE,
        );
        Ok(StructuredGradient {
            gradient: g,
            noise_trace: Some(variance),
        })
    }
}

/// The settings of a structure beyond its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StructureOptions {
    /// `full`: center the weights (covariance Σ_B instead of F_B).
    pub centered: bool,
    /// `subset`: examples of the global batch that carry noise.
    pub subset: Option<usize>,
    /// `constant`: the variance per entry at c = 1.
    pub variance: f64,
}

impl Default for StructureOptions {
    fn default() -> Self {
        Self {
            centered: false,
            subset: None,
            variance: 1.0,
        }
    }
}

/// The built-in structures by the names a command line or a settings file
/// uses (`none`, `isotropic`, `diag`, `full`): the one list of names, which
/// the lab's flags and study files take from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StructureName {
    /// [`NoNoise`].
    None,
    /// [`Isotropic`].
    Isotropic,
    /// [`Diagonal`].
    Diag,
    /// [`FullFisher`] (centered with `centered`).
    Full,
    /// [`Bernoulli`]: SGD written as multiplicative noise.
    Bernoulli,
    /// [`Subset`]: multiplicative noise on a random subset of examples.
    Subset,
    /// [`Constant`]: isotropic noise of a constant variance.
    Constant,
}

impl StructureName {
    /// Every name, in the order `--help` lists them.
    pub const ALL: [StructureName; 7] = [
        Self::None,
        Self::Isotropic,
        Self::Diag,
        Self::Full,
        Self::Bernoulli,
        Self::Subset,
        Self::Constant,
    ];

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Isotropic => "isotropic",
            Self::Diag => "diag",
            Self::Full => "full",
            Self::Bernoulli => "bernoulli",
            Self::Subset => "subset",
            Self::Constant => "constant",
        }
    }

    /// The structure it names, with the options that apply to it
    /// (`centered` to `full`, `subset` to `subset`, `variance` to
    /// `constant`); `subset` needs its size.
    pub fn build(self, options: &StructureOptions) -> Result<Arc<dyn NoiseStructure>> {
        Ok(match self {
            Self::None => Arc::new(NoNoise),
            Self::Isotropic => Arc::new(Isotropic),
            Self::Diag => Arc::new(Diagonal),
            Self::Full => Arc::new(FullFisher {
                centered: options.centered,
            }),
            Self::Bernoulli => Arc::new(Bernoulli),
            Self::Subset => match options.subset {
                Some(size) if size >= 1 => Arc::new(Subset { size }),
                other => {
                    return Err(CovnoiseError::InvalidSetting {
                        name: "noise-subset",
                        value: other.map_or_else(|| "unset".into(), |m| m.to_string()),
                        reason: "subset noise needs the number of examples that carry noise (>= 1)",
                    });
                }
            },
            Self::Constant => {
                let v = options.variance;
                if !(v.is_finite() && v > 0.0) {
                    return Err(CovnoiseError::InvalidSetting {
                        name: "noise-variance",
                        value: v.to_string(),
                        reason: "must be a finite number > 0",
                    });
                }
                Arc::new(Constant { variance: v })
            }
        })
    }

    /// Whether the structure draws its noise from a second-moment estimate
    /// (so the estimator settings apply).
    pub fn is_estimated(self) -> bool {
        matches!(self, Self::Isotropic | Self::Diag)
    }
}

impl std::fmt::Display for StructureName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StructureName {
    type Err = CovnoiseError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| CovnoiseError::InvalidSetting {
                name: "noise",
                value: s.to_string(),
                reason: "must be one of none, isotropic, diag, full, bernoulli, subset, constant",
            })
    }
}
