//! The exact rule of burn's `Conv2d` and `Conv1d` (as height 1) with one
//! group: example i's kernel gradient is `G_i = δ_i U_iᵀ`, `U_i` the
//! unfolded (im2col) input `[in kh kw, P]`, its P output positions summed
//! by the product *before* the square (the sum of per-position squares
//! would be a different, KFAC-like quantity); its bias gradient `Σ_p δ_ip`.

use burn::module::ParamId;
use burn::nn::PaddingConfig1d;
use burn::nn::conv::{Conv1d, Conv2d};
use burn::tensor::Tensor;
use burn::tensor::module::unfold4d;
use burn::tensor::ops::{PadMode, UnfoldOptions};

use super::Probes;
use super::rule::ExactRule;
use crate::error::{CovnoiseError, Result};
use crate::kernels::{self, ConvSink, same_padding};
use crate::tensor_util::from_vec;

/// What a probed convolution records: its input before padding and its
/// geometry.
#[derive(Debug, Clone)]
pub struct ConvRule {
    /// The weight `[out, in, kh, kw]` (`[out, in, k]` for Conv1d).
    pub weight: ParamId,
    /// The bias `[out]`, if the layer has one.
    pub bias: Option<ParamId>,
    /// The input `[B, in, H, W]`, before padding, without autodiff graph.
    pub input: Tensor<4>,
    /// Kernel size `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride `[sh, sw]`.
    pub stride: [usize; 2],
    /// Dilation `[dh, dw]`.
    pub dilation: [usize; 2],
    /// Zero padding `[(top, bottom), (left, right)]` as the layer applied it.
    pub padding: [(usize, usize); 2],
    /// The output's spatial size `[H', W']`.
    pub output_size: [usize; 2],
    /// `"Conv2d"` or `"Conv1d"`, for messages.
    pub kind: &'static str,
    /// Where the fast convolution's backward step leaves the output
    /// gradient and the sums of the squared per-example gradients it formed
    /// anyway, or their sums per micro-batch (see
    /// [`kernels::conv2d_recording`], [`Probes::on_grouped`]); None where
    /// burn's op runs (a probe then takes the output gradient, and the sums
    /// come from [`ExactRule::per_example`] chunk by chunk).
    pub sink: Option<ConvSink>,
}

impl ConvRule {
    /// The output gradient as `[len, out, P]`.
    fn delta(&self, output_grad: &Tensor<2>, start: usize, len: usize) -> Tensor<3> {
        let positions = self.output_size[0] * self.output_size[1];
        let cout = output_grad.dims()[1] / positions.max(1);
        output_grad
            .clone()
            .narrow(0, start, len)
            .reshape([len, cout, positions])
    }

    /// Kernel gradients `G_i = δ_i U_iᵀ` of examples `start..start + len`,
    /// `[len, out * in * kh * kw]`.
    fn weight_grads(&self, output_grad: &Tensor<2>, start: usize, len: usize) -> Result<Tensor<2>> {
        let [_, cin, _, _] = self.input.dims();
        let delta = self.delta(output_grad, start, len);
        let [_, cout, positions] = delta.dims();
        let k = cin * self.kernel[0] * self.kernel[1];
        let [(top, bottom), (left, right)] = self.padding;
        let mut x = self.input.clone().narrow(0, start, len);
        if top + bottom + left + right > 0 {
            x = x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0));
        }
        let unfolded_t = self.unfold_transposed(x);
        let [_, up, uk] = unfolded_t.dims();
        if uk != k || up != positions {
            return Err(CovnoiseError::Shape(format!(
                "a {} probe's unfolded input is [{up}, {uk}] per example, its output gradient has {positions} positions and the kernel {k} inputs",
                self.kind
            )));
        }
        // The positions are summed by the product, before the square.
        Ok(delta.matmul(unfolded_t).reshape([len, cout * k]))
    }

    /// The transposed im2col of padded inputs `x` `[c, in, H, W]`: `[c, P,
    /// in kh kw]`, row p holding the input patch under output position p.
    /// Without dilation it is two sliding-window views and one copy; burn's
    /// `unfold4d`, kept for dilated kernels, is a convolution with a one-hot
    /// kernel and costs `in kh kw` multiply-adds per copied value.
    fn unfold_transposed(&self, x: Tensor<4>) -> Tensor<3> {
        let [c, cin, _, _] = x.dims();
        let [kh, kw] = self.kernel;
        if self.dilation != [1, 1] {
            let u = unfold4d(
                x,
                self.kernel,
                UnfoldOptions::new(self.stride, [0, 0], self.dilation),
            );
            return u.swap_dims(1, 2);
        }
        // [c, in, Ho, Wp, kh], then [c, in, Ho, Wo, kh, kw].
        let rows: Tensor<5> = x.unfold(2, kh, self.stride[0]);
        let patches: Tensor<6> = rows.unfold(3, kw, self.stride[1]);
        let [_, _, ho, wo, _, _] = patches.dims();
        patches
            .permute([0, 2, 3, 1, 4, 5])
            .reshape([c, ho * wo, cin * kh * kw])
    }
}

impl ExactRule for ConvRule {
    fn layer(&self) -> String {
        self.kind.into()
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
        if index == 0 {
            return self.weight_grads(output_grad, start, len);
        }
        let delta = self.delta(output_grad, start, len);
        let cout = delta.dims()[1];
        Ok(delta.sum_dim(2).reshape([len, cout]))
    }

    /// The sums the fast kernel's backward step formed, when it ran: the
    /// same per-example gradients as [`ConvRule::per_example`], from the
    /// products that make the batch gradient.
    fn square_sums(&self, index: usize, output_grad: &Tensor<2>) -> Option<Tensor<1>> {
        let sums = self.sink.as_ref()?.squares()?;
        let values = if index == 0 { sums.weight } else { sums.bias };
        let n = values.len();
        (n > 0).then(|| from_vec(values, [n], &output_grad.device()))
    }

    /// The group sums the fast kernel's backward step formed, when it ran
    /// for groups of this size (a pass recorded by
    /// [`Probes::on_grouped`]).
    fn group_sums(
        &self,
        index: usize,
        output_grad: &Tensor<2>,
        group_size: usize,
    ) -> Option<Tensor<2>> {
        let sums = self.sink.as_ref()?.groups()?;
        if sums.groups * group_size != self.input.dims()[0] {
            return None;
        }
        let values = if index == 0 { sums.weight } else { sums.bias };
        let n = values.len() / sums.groups.max(1);
        (n > 0).then(|| from_vec(values, [sums.groups, n], &output_grad.device()))
    }

    fn bytes_per_example(&self, index: usize, numel: usize) -> usize {
        if index != 0 {
            return 4 * numel.max(1);
        }
        let cin = self.input.dims()[1];
        let [ho, wo] = self.output_size;
        let k = cin * self.kernel[0] * self.kernel[1];
        let cout = numel / k.max(1);
        4 * (k * ho * wo + cout * k + cout * ho * wo).max(1)
    }
}

impl Probes {
    /// `layer.forward(x)` for images `x` of shape `[B, C, H, W]`, recording
    /// the layer when the probes are on. The convolution runs on
    /// [`crate::kernels::conv2d`]: the fast kernels on flex, burn's op
    /// elsewhere. A grouped convolution has no exact rule: it is noted as
    /// such (see [`Probes::without_rule`]) and runs plain.
    pub fn conv2d(&mut self, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        if let Some(shifts) = self.group_shifts() {
            return shifts.conv2d(layer, x);
        }
        if self.is_off() || layer.groups != 1 {
            self.note_grouped("Conv2d", layer.groups, &layer.weight.id, &layer.bias);
            return kernels::conv2d_layer(layer, x);
        }
        let input = x.clone().detach();
        let like = input.clone().inner();
        let options = kernels::layer_options(layer, &x);
        let padding = options.padding;
        let mut weight = layer.weight.val();
        let bias = layer.bias.as_ref().map(|b| b.val());
        // On the fast kernel the backward step hands over the output
        // gradient and the per-example squares (a sink instead of a probe);
        // elsewhere a probe takes the output gradient and the rule forms
        // the per-example gradients.
        let fast = self.is_on() && kernels::conv2d_is_fast(&x, &weight, bias.as_ref(), &options);
        if fast && self.frozen && !weight.is_require_grad() {
            // The backward step must run to fill the sink.
            weight = weight.require_grad();
        }
        let sink = fast.then(|| self.new_sink());
        let z = kernels::conv2d_recording(x, weight, bias, options, sink.clone());
        let [_, _, ho, wo] = z.dims();
        let rule = || ConvRule {
            weight: layer.weight.id,
            bias: layer.bias.as_ref().map(|b| b.id),
            input: input.inner(),
            kernel: layer.kernel_size,
            stride: layer.stride,
            dilation: layer.dilation,
            padding,
            output_size: [ho, wo],
            kind: "Conv2d",
            sink: sink.clone(),
        };
        match &sink {
            Some(sink) => {
                self.record_sunk(Box::new(rule()), sink.clone(), like);
                z
            }
            None => self.layer_with(z, rule, true),
        }
    }

    /// `layer.forward(x)` for sequences `x` of shape `[B, C, L]`, recording
    /// the layer when the probes are on (as a Conv2d of height 1).
    pub fn conv1d(&mut self, layer: &Conv1d, x: Tensor<3>) -> Tensor<3> {
        if let Some(shifts) = self.group_shifts() {
            return shifts.conv1d(layer, x);
        }
        if self.is_off() || layer.groups != 1 {
            self.note_grouped("Conv1d", layer.groups, &layer.weight.id, &layer.bias);
            return layer.forward(x);
        }
        let [b, c, l] = x.dims();
        let input = x.clone().detach();
        let z = layer.forward(x);
        let lo = z.dims()[2];
        let (left, right) = match layer.padding {
            PaddingConfig1d::Valid => (0, 0),
            PaddingConfig1d::Same => same_padding(l, layer.kernel_size, layer.stride),
            PaddingConfig1d::Explicit(left, right) => (left, right),
        };
        self.layer_with(
            z,
            || ConvRule {
                weight: layer.weight.id,
                bias: layer.bias.as_ref().map(|b| b.id),
                input: input.inner().reshape([b, c, 1, l]),
                kernel: [1, layer.kernel_size],
                stride: [1, layer.stride],
                dilation: [1, layer.dilation],
                padding: [(0, 0), (left, right)],
                output_size: [1, lo],
                kind: "Conv1d",
                sink: None,
            },
            true,
        )
    }

    /// Notes a grouped convolution (no exact rule) unless the probes are off.
    fn note_grouped(
        &mut self,
        kind: &str,
        groups: usize,
        weight: &ParamId,
        bias: &Option<burn::module::Param<Tensor<1>>>,
    ) {
        if groups != 1 {
            let params = std::iter::once(*weight)
                .chain(bias.as_ref().map(|b| b.id))
                .collect();
            self.without_rule(
                params,
                format!("a {kind} layer with {groups} groups (the exact rule handles groups = 1)"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moments::exact::square_sums_chunked;
    use crate::tensor_util::{from_vec, to_vec};
    use burn::tensor::Device;

    /// Chunks of one example give the same sums as the whole batch at once
    /// (the batch-at-once result is checked against single-example backward
    /// passes in the lab's conv tests): only float32 summation order differs.
    #[test]
    fn chunking_does_not_change_the_sums() {
        let device = Device::flex();
        let (b, cin, cout, side) = (5, 2, 3, 6);
        let value = |i: usize| ((i * 37 % 17) as f32 - 8.0) / 7.0;
        let input: Vec<f32> = (0..b * cin * side * side).map(value).collect();
        let delta: Vec<f32> = (0..b * cout * 3 * 3).map(|i| value(i + 5)).collect();
        let rule = ConvRule {
            weight: ParamId::new(),
            bias: Some(ParamId::new()),
            input: from_vec(input, [b, cin, side, side], &device),
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            padding: [(1, 0), (1, 0)],
            output_size: [3, 3],
            kind: "Conv2d",
            sink: None,
        };
        let output_grad = from_vec(delta, [b, cout * 9], &device);
        for index in 0..2 {
            let numel = rule.per_example(index, &output_grad, 0, 1).unwrap().dims()[1];
            let uses = [(&rule as &dyn ExactRule, index, &output_grad)];
            let whole = square_sums_chunked(&uses, numel, usize::MAX).unwrap();
            let single = square_sums_chunked(&uses, numel, 1).unwrap();
            let (a, c) = (to_vec(&whole).unwrap(), to_vec(&single).unwrap());
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }
}
