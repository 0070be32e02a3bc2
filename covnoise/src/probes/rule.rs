//! The trait a layer kind implements to have an exact per-example rule, and
//! a probed layer after backward (its rule and its output gradient).

use burn::module::ParamId;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::tensor_util::scalar;

/// A layer kind's exact per-example gradient rule: what a probed layer
/// recorded in its forward pass (its input, say), and how that, together
/// with the gradient of the objective with respect to the layer's output,
/// gives each example's gradient of the layer's parameters.
///
/// covnoise's own rules (Linear, Conv1d/Conv2d, Embedding, LayerNorm and
/// GroupNorm) implement it, each in its own file under `probes`; a user
/// implements it for a layer of their own, in their own crate, and routes
/// the layer through [`Probes::layer`](super::Probes::layer). The shared
/// driver ([`crate::moments::exact`]) does what is common to every rule:
/// it sums the uses of a tied parameter before squaring, goes through the
/// examples in chunks, and, when a noise stage validates a model, checks
/// that the rule's per-example gradients add up to the backward pass's
/// gradient (a rule that does not is refused, naming the layer).
///
/// # Conventions
///
/// - `output_grad` is `[B, n]`: row i is the gradient of the differentiated
///   objective with respect to example i's output, flattened in the
///   output's row-major order (the output `[B, ...]` has its example first).
///   The driver scales the result to the gradient of example i's own loss.
/// - [`ExactRule::per_example`] returns `[len, numel]`: row k is example
///   `start + k`'s gradient of parameter `index`, flattened in the
///   parameter's row-major order, summed over the example's positions
///   (tokens, pixels) *before* anything is squared.
///
/// # Example: a bilinear layer
///
/// `y = x1ᵀ W x2` per example, with `W` of shape `[p, q]`: example i's
/// gradient of `W` is `δ_i · x1_i x2_iᵀ`, with `δ_i` the gradient of its
/// scalar output.
///
/// ```
/// use burn::module::{Module, Param, ParamId};
/// use burn::tensor::Tensor;
/// use covnoise::probes::{ExactRule, Probes};
///
/// #[derive(Module, Debug)]
/// struct Bilinear {
///     weight: Param<Tensor<2>>,
/// }
///
/// /// What the rule needs: the layer's two inputs, without autodiff graph.
/// #[derive(Debug)]
/// struct BilinearRule {
///     weight: ParamId,
///     x1: Tensor<2>,
///     x2: Tensor<2>,
/// }
///
/// impl ExactRule for BilinearRule {
///     fn layer(&self) -> String {
///         "Bilinear".into()
///     }
///     fn params(&self) -> Vec<ParamId> {
///         vec![self.weight]
///     }
///     fn per_example(
///         &self,
///         _index: usize,
///         output_grad: &Tensor<2>,
///         start: usize,
///         len: usize,
///     ) -> covnoise::Result<Tensor<2>> {
///         let [_, p] = self.x1.dims();
///         let [_, q] = self.x2.dims();
///         let x1 = self.x1.clone().narrow(0, start, len).reshape([len, p, 1]);
///         let x2 = self.x2.clone().narrow(0, start, len).reshape([len, 1, q]);
///         let delta = output_grad.clone().narrow(0, start, len).reshape([len, 1, 1]);
///         Ok((x1.matmul(x2) * delta).reshape([len, p * q]))
///     }
/// }
///
/// impl Bilinear {
///     fn forward(&self, x1: Tensor<2>, x2: Tensor<2>, probes: &mut Probes) -> Tensor<2> {
///         let [b, _] = x1.dims();
///         let y = (x1.clone().matmul(self.weight.val()) * x2.clone()).sum_dim(1);
///         // The rule is built only when the probes record.
///         probes.layer(y.reshape([b, 1]), || BilinearRule {
///             weight: self.weight.id,
///             x1: x1.detach(),
///             x2: x2.detach(),
///         })
///     }
/// }
/// ```
pub trait ExactRule: std::fmt::Debug + Send {
    /// The layer's kind, named in messages (`"Linear"`, or a user's
    /// `"Bilinear"`).
    fn layer(&self) -> String;

    /// The parameters the rule gives per-example gradients for; `index` in
    /// the other methods is a position in this list. A parameter that does
    /// not train (frozen) may be listed: the driver skips it.
    fn params(&self) -> Vec<ParamId>;

    /// Per-example gradients of parameter `params()[index]` for examples
    /// `start..start + len`, `[len, numel]` (see the conventions above).
    fn per_example(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<2>>;

    /// `Σ_i g_i²` over all examples for parameter `index`, flat `[numel]`,
    /// where a shortcut forms it without per-example gradients (a Linear
    /// layer on `[B, in]`: one product `(a²)ᵀ(δ²)`), or where the backward
    /// pass already did (a convolution on the fast kernels, whose backward
    /// step forms each example's gradient on the way to the batch's and
    /// leaves the sums of their squares). `None` (the default):
    /// the driver squares [`ExactRule::per_example`] chunk by chunk. Used
    /// only for a parameter this one layer alone covers.
    fn square_sums(&self, index: usize, output_grad: &Tensor<2>) -> Option<Tensor<1>> {
        let _ = (index, output_grad);
        None
    }

    /// The gradients of consecutive groups of `group_size` examples for
    /// parameter `index`, `[B / group_size, numel]`: row g is the sum of
    /// [`ExactRule::per_example`]'s rows `g group_size .. (g + 1)
    /// group_size`, where a shortcut forms them without per-example
    /// gradients (a Linear layer: one batched product `a_gᵀ δ_g` over the
    /// groups, the same multiply-adds as its batch gradient), or where the
    /// backward pass already did (a convolution on the fast kernels, whose
    /// backward step adds each example's gradient to its group's sum).
    /// `None` (the default): the driver sums [`ExactRule::per_example`]
    /// chunk by chunk. These are micro-batch gradients from one pass over
    /// the whole batch (the micro-batch estimator and the penalties).
    fn group_sums(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<Tensor<2>> {
        let _ = (index, output_grad, group_size);
        None
    }

    /// The gradients of consecutive groups of `group_size` examples for
    /// parameter `index` summarized: their sum `Σ_g t_g` and their
    /// centered sum of squares `Σ_g (t_g - t̄)²` around their mean, each
    /// `[numel]`, t_g the rows [`ExactRule::group_sums`] gives, where the
    /// backward pass formed these without keeping the rows (the grouped
    /// Linear product, [`crate::kernels::linear_grouped`]). All that the
    /// micro-batch estimator needs of a parameter this one layer alone
    /// covers. `None` (the default): the driver summarizes
    /// [`ExactRule::group_sums`]'s rows.
    fn group_moments(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<GroupMoments> {
        let _ = (index, output_grad, group_size);
        None
    }

    /// `Σ_i ‖g_i‖²` for parameter `index`, where that is cheaper than the
    /// diagonal; by default the sum of [`ExactRule::square_sums`].
    fn trace(&self, index: usize, output_grad: &Tensor<2>) -> Option<f64> {
        self.square_sums(index, output_grad)
            .map(|s| scalar(s.sum()))
    }

    /// Bytes that forming one example's gradient of parameter `index`
    /// (`numel` values) takes, intermediates included, for sizing chunks;
    /// by default twice the gradient.
    fn bytes_per_example(&self, index: usize, numel: usize) -> usize {
        let _ = index;
        8 * numel.max(1)
    }
}

/// A parameter's gradients over G groups of examples, summarized
/// ([`ExactRule::group_moments`]).
#[derive(Debug, Clone)]
pub struct GroupMoments {
    /// Number of groups G.
    pub groups: usize,
    /// `Σ_g t_g`, `[numel]`.
    pub sum: Tensor<1>,
    /// `Σ_g (t_g - t̄)²` around the groups' mean t̄, `[numel]`.
    pub centered: Tensor<1>,
}

/// A probed layer after the backward pass: its rule and the gradient of
/// the objective with respect to its output, `[B, n]`.
#[derive(Debug)]
pub struct ProbedLayer {
    /// What the layer recorded, and how it gives per-example gradients.
    pub rule: Box<dyn ExactRule>,
    /// The output gradient, one flattened row per example.
    pub output_grad: Tensor<2>,
}

impl ProbedLayer {
    /// Examples the layer saw.
    pub fn examples(&self) -> usize {
        self.output_grad.dims()[0]
    }
}
