//! The exact rule of burn's `Linear` layer on `[B, ..., in]`: example i's
//! weight gradient is `a_iᵀ δ_i` (`[in, T] x [T, out]`, its T positions
//! summed), its bias gradient `Σ_t δ_it`. With one position per example the
//! sum of squares is one product, `(a²)ᵀ(δ²)` (BackPACK's shortcut), and the
//! trace `Σ_i ‖a_i‖² ‖δ_i‖²` costs O(B (in + out)). The gradients of
//! groups of consecutive examples (micro-batches) are one batched product
//! `a_gᵀ δ_g`, the multiply-adds of the batch gradient; on the fast
//! kernel ([`kernels::linear_grouped`]) they are the batch gradient's
//! products, which then sums them instead of running its own. On the fast
//! kernel the layer (one position per example) hands its output gradient
//! over from its backward step, without a probe tensor, and the squares
//! `a²`, `δ²` are formed on the threads ([`kernels::squared_outer`]).

use burn::module::ParamId;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::Probes;
use super::rule::{ExactRule, GroupMoments};
use crate::error::Result;
use crate::kernels::{self, ConvSink};
use crate::tensor_util::{from_vec, scalar};

/// What a probed `Linear` layer records: its input `[B, T, in]` (T
/// positions per example: 1 for `[B, in]`, the product of the middle
/// dimensions otherwise), without autodiff graph.
#[derive(Debug, Clone)]
pub struct LinearRule {
    /// The weight `[in, out]`.
    pub weight: ParamId,
    /// The bias `[out]`, if the layer has one.
    pub bias: Option<ParamId>,
    /// The input `[B, T, in]`.
    pub input: Tensor<3>,
    /// Where the grouped Linear product's backward step leaves the
    /// micro-batch weight gradients it formed for the batch gradient, and
    /// the output gradient (see [`kernels::linear_grouped`],
    /// [`Probes::on_grouped`]); None where burn's product runs (a probe
    /// then takes the output gradient, and the group products are formed
    /// from it).
    pub sink: Option<ConvSink>,
}

impl LinearRule {
    /// The output gradient as `[B, T, out]`.
    fn delta(&self, output_grad: &Tensor<2>, start: usize, len: usize) -> Tensor<3> {
        let [_, t, _] = self.input.dims();
        let out = output_grad.dims()[1] / t.max(1);
        output_grad
            .clone()
            .narrow(0, start, len)
            .reshape([len, t, out])
    }

    /// Whether each example has one position (the one-product shortcuts).
    fn single_position(&self) -> bool {
        self.input.dims()[1] == 1
    }
}

impl ExactRule for LinearRule {
    fn layer(&self) -> String {
        "Linear".into()
    }

    fn params(&self) -> Vec<ParamId> {
        std::iter::once(self.weight).chain(self.bias).collect()
    }

    fn per_example(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        start: usize,
        len: usize,
    ) -> Result<Tensor<2>> {
        let d = self.delta(output_grad, start, len);
        let [_, _, o] = d.dims();
        Ok(if index == 0 {
            let a = self.input.clone().narrow(0, start, len);
            let i = a.dims()[2];
            a.swap_dims(1, 2).matmul(d).reshape([len, i * o])
        } else {
            d.sum_dim(1).reshape([len, o])
        })
    }

    fn square_sums(&self, index: usize, output_grad: &Tensor<2>) -> Option<Tensor<1>> {
        if !self.single_position() {
            return None;
        }
        let [b, o] = output_grad.dims();
        Some(if index == 0 {
            let i = self.input.dims()[2];
            let a = self.input.clone().reshape([b, i]);
            match kernels::squared_outer(&a, output_grad) {
                Some(s) => s,
                None => a.square().transpose().matmul(output_grad.clone().square()),
            }
            .reshape([i * o])
        } else {
            kernels::column_square_sums(output_grad)
                .unwrap_or_else(|| output_grad.clone().square().sum_dim(0).reshape([o]))
        })
    }

    fn group_sums(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<Tensor<2>> {
        let [b, t, i] = self.input.dims();
        if group_size == 0 || !b.is_multiple_of(group_size) {
            return None;
        }
        if index == 0
            && let Some(sums) = self.sink.as_ref().and_then(ConvSink::take_groups)
            && sums.groups * group_size == b
        {
            // The backward step's own products, taken (not copied) out of
            // the sink.
            let n = sums.weight.len() / sums.groups;
            return Some(from_vec(
                sums.weight,
                [sums.groups, n],
                &output_grad.device(),
            ));
        }
        // A group's rows (its examples' positions) are consecutive: one
        // product per group, batched.
        let (groups, rows) = (b / group_size, group_size * t);
        let o = output_grad.dims()[1] / t.max(1);
        let d = output_grad.clone().reshape([groups, rows, o]);
        Some(if index == 0 {
            let flat_d = d.clone().reshape([b * t, o]);
            let flat_a = self.input.clone().reshape([b * t, i]);
            match crate::kernels::group_outer(&flat_a, &flat_d, rows) {
                Some(g) => g,
                None => flat_a
                    .reshape([groups, rows, i])
                    .swap_dims(1, 2)
                    .matmul(d)
                    .reshape([groups, i * o]),
            }
        } else {
            d.sum_dim(1).reshape([groups, o])
        })
    }

    /// The sum and centered sum of squares the grouped product's backward
    /// step formed, when the pass asked for them (the micro-batch
    /// estimator's pass, [`ConvSink::summarized`]).
    fn group_moments(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<GroupMoments> {
        if index != 0 {
            return None;
        }
        let m = self.sink.as_ref()?.take_moments()?;
        if m.groups * group_size != self.input.dims()[0] {
            return None;
        }
        let (n, device) = (m.sum.len(), output_grad.device());
        Some(GroupMoments {
            groups: m.groups,
            sum: from_vec(m.sum, [n], &device),
            centered: from_vec(m.centered, [n], &device),
        })
    }

    fn trace(&self, index: usize, output_grad: &Tensor<2>) -> Option<f64> {
        if index == 0 && self.single_position() {
            let [b, _] = output_grad.dims();
            let i = self.input.dims()[2];
            let a = self.input.clone().reshape([b, i]);
            let norms = |t: &Tensor<2>| {
                kernels::row_square_sums(t)
                    .unwrap_or_else(|| t.clone().square().sum_dim(1).reshape([b]))
            };
            return Some(scalar((norms(&a) * norms(output_grad)).sum()));
        }
        self.square_sums(index, output_grad)
            .map(|s| scalar(s.sum()))
    }

    fn bytes_per_example(&self, index: usize, numel: usize) -> usize {
        let [_, t, i] = self.input.dims();
        let f32s = if index == 0 {
            t * i + t * (numel / i.max(1)) + numel
        } else {
            numel
        };
        4 * f32s.max(1)
    }
}

impl Probes {
    /// `layer.forward(x)` for `x` of shape `[B, ..., in]`: the first
    /// dimension is the example, any dimensions between are positions (tokens,
    /// time steps) whose gradients add up within the example. Recorded when
    /// the probes are on.
    pub fn linear<const D: usize>(&mut self, layer: &Linear, x: Tensor<D>) -> Tensor<D> {
        if self.is_off() {
            return kernels::linear_layer(layer, x);
        }
        if let Some(shifts) = self.group_shifts() {
            return shifts.linear(layer, x);
        }
        let dims = x.dims();
        let (b, positions, i) = (dims[0], dims[1..D - 1].iter().product(), dims[D - 1]);
        let input = x.clone().detach().inner().reshape([b, positions, i]);
        let rule = |sink: Option<ConvSink>| LinearRule {
            weight: layer.weight.id,
            bias: layer.bias.as_ref().map(|b| b.id),
            input: input.clone(),
            sink,
        };
        let weight = layer.weight.val();
        // Micro-batch gradients: groups of `group_size` examples; per-example
        // estimators: one group, the whole batch.
        let rows = self.group_size.unwrap_or(b);
        let grouped = self.is_on()
            && positions == 1
            && kernels::linear_grouped_applies(&x.clone().reshape([b, i]), &weight, rows);
        if !grouped {
            let z = kernels::linear_layer(layer, x);
            return self.layer_with(z, || rule(None), true);
        }
        // One position per example: the grouped product, whose backward step
        // leaves the output gradient in the sink (no probe tensor added to
        // the output) and, for micro-batch gradients, forms the groups'
        // weight gradients (or their moments) and the batch's as their sum.
        let sink = self.new_sink();
        // A frozen copy's weight is tracked so that the backward step runs;
        // its gradient is not formed.
        let weight_grad = weight.is_require_grad();
        let weight = if weight_grad {
            weight
        } else {
            weight.require_grad()
        };
        let x = x.reshape([b, i]);
        let mut z = kernels::linear_grouped(x, weight, rows, weight_grad, sink.clone());
        if let Some(bias) = &layer.bias {
            z = z + bias.val().unsqueeze();
        }
        let o = z.dims()[1];
        let like = input.clone().reshape([b, 1, 1, i]);
        self.record_sunk(Box::new(rule(Some(sink.clone()))), sink, like);
        let mut out = dims;
        out[D - 1] = o;
        z.reshape(out)
    }
}
