//! Per-example output gradients of burn layers, from the same backward pass
//! as the mean gradient, and the structure of a forward pass (which
//! parameters have exact per-example rules, which examples normalize
//! together).
//!
//! burn 0.22 has no backward hooks and no per-sample gradients, so a model
//! opts in by routing its layers through [`Probes`]: `probes.linear(&self.fc,
//! x)` instead of `self.fc.forward(x)`. When the probes are on, the layer's
//! output gets a zero "probe" leaf added, and after backward the probe's
//! gradient is the gradient of the objective with respect to the layer's
//! output, one row per example (BackPACK's quantity, without storing
//! per-example weight gradients). A convolution or a Linear layer (one
//! position per example) on covnoise's fast CPU kernels needs no probe:
//! its own backward step hands over that gradient and, for a convolution,
//! the sums of its squared per-example gradients, or (both) their sums per
//! micro-batch ([`crate::kernels::ConvSink`]). Each layer kind's [`ExactRule`] turns
//! the output gradient into per-example parameter gradients; the driver in
//! [`crate::moments::exact`] squares and sums them. One file per rule:
//!
//! | call | layer | input | rule |
//! | --- | --- | --- | --- |
//! | [`Probes::linear`] | `Linear` | `[B, ..., in]` (positions summed per example) | [`LinearRule`] |
//! | [`Probes::conv1d`] | `Conv1d` (groups 1) | `[B, C, L]` | [`ConvRule`] |
//! | [`Probes::conv2d`] | `Conv2d` (groups 1) | `[B, C, H, W]` | [`ConvRule`] |
//! | [`Probes::embedding`] | `Embedding` | tokens `[B, T]` | [`EmbeddingRule`] |
//! | [`Probes::layer_norm`] | `LayerNorm` | `[B, ..., d]` | [`AffineRule`] |
//! | [`Probes::group_norm`] | `GroupNorm` | `[B, C, ...]` | [`AffineRule`] |
//! | [`Probes::batch_norm`] | [`GhostBatchNorm`](crate::model::GhostBatchNorm) | `[B, C, ...]` | [`BatchNormRule`]: gradients of micro-batches of whole normalization groups only, no per-example ones; it also declares its groups |
//! | [`Probes::layer`] | a user's own layer | any `[B, ...]` | the user's [`ExactRule`] |
//!
//! When the probes are off, each call is the plain layer (a `Linear` or
//! `Conv2d` on covnoise's fast kernels where they apply, burn's op
//! elsewhere). The model's struct
//! keeps burn's own layers, so its records and optimizers are unchanged.
//!
//! # Adding a rule for a layer of your own
//!
//! Implement [`ExactRule`] for what the layer must record (its inputs,
//! without autodiff graph), and in the layer's forward pass hand its output
//! and a closure that builds the rule to [`Probes::layer`]. Nothing in
//! covnoise changes; the noise stage's validation checks the rule against
//! the backward pass before training and refuses it, naming the layer, if
//! its per-example gradients do not add up to the gradient. The trait's
//! documentation has a worked example (a bilinear layer).

mod affine;
mod batch_norm;
mod conv;
mod embedding;
mod linear;
mod rule;
mod shift;

pub use affine::{AffineRule, FeatureAxis};
pub use batch_norm::{BatchNormRule, BatchNormSource};
pub use conv::ConvRule;
pub use embedding::EmbeddingRule;
pub use linear::LinearRule;
pub use rule::{ExactRule, GroupMoments, ProbedLayer};
pub use shift::GroupShifts;

use burn::module::ParamId;
use burn::tensor::{Gradients, Tensor};

use crate::error::{CovnoiseError, Remedy, Result};
use crate::kernels::ConvSink;
use crate::params::ParamTable;

/// What the probes do with the layers routed through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Plain layers, nothing recorded.
    #[default]
    Off,
    /// Record which layers ran and how batch norms group examples, without
    /// probe tensors (a structural dry run).
    Observe,
    /// Record each layer's rule and probe for the estimators.
    On,
    /// Run each group of examples at parameters of its own (see
    /// [`Probes::shifted`]), recording nothing.
    Shifted,
}

/// A batch normalization seen in a forward pass: its scale's parameter (when
/// it trains) and the examples it normalizes together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormGroups {
    /// The scale gamma, which names the layer in messages.
    pub gamma: ParamId,
    /// Examples per normalization group (0: the whole batch).
    pub group: usize,
}

// A handful per forward pass: the variants' size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Recorded {
    /// A layer whose rule waits for its probe's gradient.
    Probed {
        /// What the layer recorded.
        rule: Box<dyn ExactRule>,
        /// The zero leaf added to the output, `[B, n]`.
        probe: Tensor<2>,
    },
    /// A fast convolution or grouped Linear product, whose backward step
    /// leaves its output gradient (and per-example squares or group
    /// gradients) in a sink instead of a probe.
    Sunk {
        /// What the layer recorded.
        rule: Box<dyn ExactRule>,
        /// Where the backward step leaves the output gradient.
        sink: ConvSink,
        /// The layer's input (any tensor of its device would do: it tells
        /// the sink where the gradient lives).
        like: Tensor<4>,
    },
    /// A batch norm on the fast kernel, whose backward step leaves its
    /// per-group sums in the rule's sink; its output gradient is not kept
    /// (the layer hands on a placeholder `[examples, 1]`).
    NormSunk {
        /// What the layer recorded.
        rule: Box<dyn ExactRule>,
        /// Examples in the pass.
        examples: usize,
        /// Where the placeholder lives.
        device: burn::tensor::Device,
    },
    /// A layer seen in an observing pass: its kind and the parameters its
    /// rule covers.
    Seen {
        /// The layer's kind.
        layer: String,
        /// Its parameters.
        params: Vec<ParamId>,
    },
    /// A layer the estimators cannot take apart, and why.
    Unsupported {
        /// Its parameters.
        params: Vec<ParamId>,
        /// What it is.
        what: String,
    },
}

/// The recorder a model's forward pass routes its probe-aware layers through.
#[derive(Debug, Default)]
pub struct Probes {
    mode: Mode,
    /// Recording a pass over a frozen copy of the model (see
    /// [`Probes::on_frozen`]).
    frozen: bool,
    /// Examples per group when the pass is for group gradients (see
    /// [`Probes::on_grouped`]).
    group_size: Option<usize>,
    /// Group gradients are wanted summarized (see
    /// [`Probes::summarizing_groups`]).
    summarize_groups: bool,
    layers: Vec<Recorded>,
    norms: Vec<NormGroups>,
    /// Each group's parameter shifts, in a shifted pass.
    shifts: Option<GroupShifts>,
    /// Layers of a shifted pass that ran at theta although they hold a
    /// moved parameter.
    unshifted: Vec<String>,
    /// Parameters seen (observing) in layers that cannot be moved.
    unmovable: Vec<ParamId>,
    /// In a pass over groups of examples that stand for one pass per group
    /// (group gradients, shifted passes): a batch norm over the whole batch
    /// normalizes each group of this many examples alone, as its own pass
    /// would.
    norm_group: Option<usize>,
}

impl Probes {
    /// Probes that record nothing: every layer runs as the plain burn layer.
    pub fn off() -> Self {
        Self::default()
    }

    /// Probes that record every probe-aware layer of the next forward pass.
    pub fn on() -> Self {
        Self::recording(false, None)
    }

    /// Probes that record, as [`Probes::on`], a forward pass of a frozen
    /// copy of the model whose backward pass only reaches the probes (the
    /// Monte-Carlo Fisher's pass with sampled labels): a fast convolution
    /// whose weight takes no gradient is handed a tracked copy of it, so
    /// that its backward step runs and forms the per-example squares (see
    /// [`crate::kernels::ConvSink`]) instead of leaving them to the
    /// rule's slower per-example path. The copy's gradient is not read.
    pub fn on_frozen() -> Self {
        Self::recording(true, None)
    }

    /// Probes that record, as [`Probes::on`], a pass whose rules are asked
    /// for the gradients of consecutive groups of `group_size` examples
    /// ([`ExactRule::group_sums`]: micro-batch gradients) rather than for
    /// squares: a fast convolution's backward step then adds each
    /// example's gradient to its group's sum (see
    /// [`crate::kernels::ConvSink::grouped`]).
    pub fn on_grouped(group_size: usize) -> Self {
        Self::recording(false, Some(group_size))
    }

    /// Recording probes: over a frozen copy of the model or not (see
    /// [`Probes::on_frozen`]), for squares or for group gradients (see
    /// [`Probes::on_grouped`]).
    pub(crate) fn recording(frozen: bool, group_size: Option<usize>) -> Self {
        Self {
            mode: Mode::On,
            frozen,
            group_size,
            norm_group: group_size,
            ..Self::default()
        }
    }

    /// Probes that record nothing, for a forward pass over consecutive
    /// groups of `group_size` examples standing for one pass per group: a
    /// batch norm over the whole batch normalizes each group alone.
    pub(crate) fn off_in_groups(group_size: usize) -> Self {
        Self {
            norm_group: Some(group_size),
            ..Self::default()
        }
    }

    /// The sink a fast convolution or grouped Linear product of this pass
    /// leaves its results in.
    fn new_sink(&self) -> ConvSink {
        match self.group_size {
            Some(b) if self.summarize_groups => ConvSink::summarized(b),
            Some(b) => ConvSink::grouped(b),
            None => ConvSink::new(),
        }
    }

    /// Asks, in a pass for group gradients, for their sum and centered sum
    /// of squares where a layer can give those without the groups'
    /// gradients ([`ExactRule::group_moments`]).
    pub(crate) fn summarizing_groups(mut self) -> Self {
        self.summarize_groups = true;
        self
    }

    /// Probes that only observe the forward pass: which parameters have a
    /// per-example rule and how batch norms group examples. Layers run plain.
    pub fn observe() -> Self {
        Self {
            mode: Mode::Observe,
            ..Self::default()
        }
    }

    /// Whether layers are being recorded for per-example factors.
    pub fn is_on(&self) -> bool {
        self.mode == Mode::On
    }

    /// Whether nothing is recorded (layers may skip building their rule).
    pub fn is_off(&self) -> bool {
        self.mode == Mode::Off
    }

    /// Routes a layer's `output` (`[B, ...]`, the example first) through the
    /// probes with the exact rule that `rule` builds, and returns the output
    /// to continue the forward pass with. When the probes are off, `output`
    /// comes back unchanged and `rule` is not called; when they observe, the
    /// rule's layer and parameters are noted; when they are on, a zero probe
    /// leaf is added to the output, and after backward its gradient is the
    /// `output_grad` the rule receives.
    ///
    /// Such a layer computes its output itself, so it cannot run groups of
    /// examples at parameters of their own ([`Probes::shifted`]): a
    /// shifted pass through it that moves one of its parameters is
    /// refused ([`Probes::unshifted_layers`]), and the penalties then run
    /// one pass per micro-batch at the moved parameters instead.
    pub fn layer<const D: usize, R, F>(&mut self, output: Tensor<D>, rule: F) -> Tensor<D>
    where
        R: ExactRule + 'static,
        F: FnOnce() -> R,
    {
        self.layer_with(output, rule, false)
    }

    /// [`Probes::layer`] for a layer that runs shifted passes itself
    /// (`movable`: covnoise's own layers) or not.
    fn layer_with<const D: usize, R, F>(
        &mut self,
        output: Tensor<D>,
        rule: F,
        movable: bool,
    ) -> Tensor<D>
    where
        R: ExactRule + 'static,
        F: FnOnce() -> R,
    {
        match self.mode {
            Mode::Off => output,
            Mode::Shifted => {
                if !movable {
                    let rule = rule();
                    self.note_unshifted(|| rule.layer(), &rule.params());
                }
                output
            }
            Mode::Observe => {
                let rule = rule();
                if !movable {
                    self.unmovable.extend(rule.params());
                }
                self.layers.push(Recorded::Seen {
                    layer: rule.layer(),
                    params: rule.params(),
                });
                output
            }
            Mode::On => {
                let dims = output.dims();
                let per_example = dims[1..].iter().product();
                let probe =
                    Tensor::<2>::zeros([dims[0], per_example], &output.device()).require_grad();
                self.layers.push(Recorded::Probed {
                    rule: Box::new(rule()),
                    probe: probe.clone(),
                });
                output + probe.reshape(dims)
            }
        }
    }

    /// Records a fast convolution or grouped Linear product whose backward
    /// step fills `sink` (see [`Probes::conv2d`], [`Probes::linear`]);
    /// `like` is any tensor on the layer's device.
    fn record_sunk(&mut self, rule: Box<dyn ExactRule>, sink: ConvSink, like: Tensor<4>) {
        self.layers.push(Recorded::Sunk { rule, sink, like });
    }

    /// Notes a layer routed through the probes that has no exact rule (a
    /// grouped convolution, say), with its parameters and what it is: the
    /// exact and mc-fisher estimators then refuse the model, naming the
    /// parameter, instead of leaving it out. Nothing is noted when the
    /// probes are off.
    pub fn without_rule(&mut self, params: Vec<ParamId>, what: String) {
        if self.mode == Mode::Shifted {
            // It ran at theta: wrong where one of its parameters is moved.
            self.note_unshifted(|| what.clone(), &params);
        }
        if self.mode != Mode::Off {
            self.layers.push(Recorded::Unsupported { params, what });
        }
    }

    /// The batch normalizations routed through [`Probes::batch_norm`] in
    /// the last forward pass (recorded when the probes are on or observing).
    pub fn norm_groups(&self) -> &[NormGroups] {
        &self.norms
    }

    /// The parameters covered by a per-example rule in the last forward
    /// pass, once per use (recorded when the probes are on or observing).
    pub fn covered_params(&self) -> Vec<ParamId> {
        self.layers
            .iter()
            .flat_map(|l| match l {
                Recorded::Probed { rule, .. }
                | Recorded::Sunk { rule, .. }
                | Recorded::NormSunk { rule, .. } => rule.params(),
                Recorded::Seen { params, .. } => params.clone(),
                Recorded::Unsupported { .. } => Vec::new(),
            })
            .collect()
    }

    /// The kinds of the layers whose rules cover `param` in the last
    /// forward pass (for messages).
    pub fn layers_of(&self, param: ParamId) -> Vec<String> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                Recorded::Probed { rule, .. }
                | Recorded::Sunk { rule, .. }
                | Recorded::NormSunk { rule, .. }
                    if rule.params().contains(&param) =>
                {
                    Some(rule.layer())
                }
                Recorded::Seen { layer, params, .. } if params.contains(&param) => {
                    Some(layer.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Hands each recorded layer's rule its probe's gradient from `grads`,
    /// for a batch of `examples`. A layer whose first dimension is not the
    /// example (tokens flattened into `[B*T, in]`, say) is refused: its
    /// per-example gradients would be per-row gradients, silently wrong.
    pub fn into_layers(
        self,
        grads: &Gradients,
        examples: usize,
        table: &ParamTable,
    ) -> Result<Vec<ProbedLayer>> {
        let mut out = Vec::new();
        for layer in self.layers {
            let (rule, output_grad) = match layer {
                Recorded::Probed { rule, probe } => {
                    let g = probe.grad(grads);
                    (rule, g)
                }
                Recorded::Sunk { rule, sink, like } => {
                    let g = sink.output_grad(&like).map(|g| g.flatten::<2>(1, 3));
                    // An empty sink: the convolution's backward step did not
                    // run, because none of its operands takes a gradient (a
                    // frozen first layer, say). Only an error where one of
                    // its parameters is to be estimated.
                    if g.is_none() && rule.params().iter().all(|p| table.index_of(*p).is_none()) {
                        continue;
                    }
                    (rule, g)
                }
                Recorded::NormSunk {
                    rule,
                    examples,
                    device,
                } => (rule, Some(Tensor::<2>::zeros([examples, 1], &device))),
                Recorded::Seen { .. } => continue,
                Recorded::Unsupported { params, what } => {
                    return Err(CovnoiseError::Refused {
                        problem: format!(
                            "parameter {} belongs to {what}, which has no per-example gradient rule",
                            params
                                .first()
                                .map_or_else(|| "?".to_string(), |p| table.name_of(*p))
                        ),
                        remedy: Remedy::MicrobatchEstimator,
                    });
                }
            };
            let name = || {
                rule.params()
                    .first()
                    .map_or_else(|| "?".to_string(), |p| table.name_of(*p))
            };
            let output_grad = output_grad.ok_or_else(|| {
                CovnoiseError::Unsupported(format!(
                    "the probed {} layer of parameter {} received no gradient: the model must live on an autodiff device (device.autodiff()) and its probed layers must reach the loss",
                    rule.layer(),
                    name()
                ))
            })?;
            let rows = output_grad.dims()[0];
            if rows != examples {
                return Err(CovnoiseError::Unsupported(format!(
                    "the probed {} layer of parameter {} saw {rows} rows for a batch of {examples} examples: keep the example as the first dimension ([B, T, in] for tokens, not [B*T, in]), so that each example's gradient sums its positions",
                    rule.layer(),
                    name()
                )));
            }
            out.push(ProbedLayer { rule, output_grad });
        }
        Ok(out)
    }

    /// The parameters of the layers seen (observing) that cannot run
    /// groups of examples at parameters of their own: layers with a user's
    /// rule ([`Probes::layer`]) and batch norms. A shifted pass
    /// ([`Probes::shifted`]) is exact where none of them is moved.
    pub fn unmovable_params(&self) -> &[ParamId] {
        &self.unmovable
    }

    /// Layers seen without a per-example rule (grouped convolutions), with
    /// their parameters: what [`Probes::into_layers`] would refuse.
    pub fn unsupported(&self) -> Vec<(ParamId, String)> {
        self.layers
            .iter()
            .filter_map(|l| match l {
                Recorded::Unsupported { params, what } => {
                    params.first().map(|p| (*p, what.clone()))
                }
                _ => None,
            })
            .collect()
    }
}
