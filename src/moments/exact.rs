//! Exact per-example second moments of Linear and Conv2d layers from the
//! factors of one backward pass.
//!
//! For a Linear layer `z_i = a_i W + b` (burn's layout, `W` is `[in, out]`),
//! example i's weight gradient is the outer product `a_i^T delta_i`, so
//! `sum_i (grad_W l_i)^2 = (a^2)^T (delta^2)` (elementwise squares; one extra
//! matrix product per layer), `sum_i (grad_b l_i)^2 = sum_i delta_i^2`, and
//! the squared norm `||grad_W l_i||^2 = ||a_i||^2 ||delta_i||^2` gives the
//! trace in O(B (in + out)).
//!
//! For a Conv2d layer, example i's weight gradient sums over the output
//! positions p *before* it is squared: `G_i = delta_i U_i^T` with `U_i` the
//! unfolded (im2col) input `[in kh kw, P]` and `delta_i` `[out, P]`, and the
//! estimate is `sum_i G_i^2` (not the sum of per-position squares, a
//! different, KFAC-like quantity). The examples go through in chunks, so the
//! unfolded inputs and per-example gradients of one chunk are all that is
//! held: about `CHUNK_BYTES` (64 MiB) per layer, or one example's worth when
//! that is larger (`4 (in kh kw P + out in kh kw + out P)` bytes).

use burn::tensor::Tensor;
use burn::tensor::module::unfold4d;
use burn::tensor::ops::{PadMode, UnfoldOptions};

use super::{MomentKind, SecondMoment};
use crate::error::{CovnoiseError, Result};
use crate::model::{ConvFactors, LayerFactors};
use crate::params::ParamTable;
use crate::tensor_util::scalar;

/// Sums over the batch of squared per-example gradients: per parameter
/// (`MomentKind::Diag`, flat and in table order) or in total
/// (`MomentKind::Trace`). `per_example_scale` turns a probe gradient into
/// the gradient of one example's own loss (B for a mean over B examples).
///
/// Every parameter of `table` must be covered by exactly one probed layer:
/// a parameter without a per-example rule, or one used by two layers (whose
/// per-example gradient would be a sum of two products), is refused with its
/// name, never skipped.
pub fn moment_sums(
    factors: &[LayerFactors],
    table: &ParamTable,
    per_example_scale: f32,
    kind: MomentKind,
) -> Result<SecondMoment> {
    let mut slots: Vec<Option<Tensor<1>>> = vec![None; table.len()];
    let mut covered = vec![false; table.len()];
    let mut trace = 0.0;
    for layer in factors {
        let (weight_id, bias_id) = layer.params();
        let weight = claim(table, &mut covered, weight_id)?;
        let bias = match bias_id {
            Some(b) => claim(table, &mut covered, b)?,
            None => None,
        };
        if weight.is_none() && bias.is_none() {
            continue;
        }
        let f = match layer {
            LayerFactors::Linear(f) => f,
            LayerFactors::Conv2d(f) => {
                let (w, b) = conv_sums(
                    f,
                    per_example_scale,
                    [weight.is_some(), bias.is_some()],
                    CHUNK_BYTES,
                )?;
                match kind {
                    MomentKind::Diag => {
                        if let (Some(i), Some(w)) = (weight, w) {
                            slots[i] = Some(w);
                        }
                        if let (Some(i), Some(b)) = (bias, b) {
                            slots[i] = Some(b);
                        }
                    }
                    MomentKind::Trace => {
                        trace +=
                            w.map_or(0.0, |w| scalar(w.sum())) + b.map_or(0.0, |b| scalar(b.sum()));
                    }
                }
                continue;
            }
        };
        // The per-example scale enters squared on the small results, not
        // on the B x out output gradients: one pass over them fewer.
        let scale2 = per_example_scale * per_example_scale;
        let d2 = f.output_grad.clone().square();
        match kind {
            MomentKind::Diag => {
                if let Some(weight) = weight {
                    let w = f.input.clone().square().transpose().matmul(d2.clone()) * scale2;
                    let n = w.shape().num_elements();
                    slots[weight] = Some(w.reshape([n]));
                }
                if let Some(b) = bias {
                    let s = d2.sum_dim(0) * scale2;
                    let n = s.shape().num_elements();
                    slots[b] = Some(s.reshape([n]));
                }
            }
            MomentKind::Trace => {
                let d2 = d2.sum_dim(1);
                // weight: sum_i |a_i|^2 |delta_i|^2; bias: sum_i |delta_i|^2.
                let a2 = match weight {
                    Some(_) => f.input.clone().square().sum_dim(1),
                    None => d2.zeros_like(),
                };
                let a2 = if bias.is_some() { a2 + 1.0 } else { a2 };
                trace += scale2 as f64 * scalar((a2 * d2).sum());
            }
        }
    }
    if let Some(i) = covered.iter().position(|c| !c) {
        let e = &table.entries()[i];
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} (shape {:?}) has no per-example gradient rule: the exact and mc-fisher estimators cover Linear and Conv2d layers routed through Probes::linear and Probes::conv2d; use --estimator microbatch for other layers",
            e.name, e.shape
        )));
    }
    Ok(match kind {
        MomentKind::Diag => SecondMoment::Diag(
            slots
                .into_iter()
                .map(|s| s.expect("every parameter covered"))
                .collect(),
        ),
        MomentKind::Trace => SecondMoment::Trace(trace),
    })
}

/// Bytes of unfolded inputs and per-example gradients one chunk of examples
/// may hold (see the module documentation).
const CHUNK_BYTES: usize = 64 << 20;

/// `sum_i G_i^2` flat in the weight's `[out, in, kh, kw]` order, and
/// `sum_i (sum_p delta_i[:, p])^2` for the bias, of one Conv2d layer.
/// The examples go through in chunks of at most `chunk_bytes` of unfolded
/// inputs and per-example gradients (at least one example).
fn conv_sums(
    f: &ConvFactors,
    per_example_scale: f32,
    [want_weight, want_bias]: [bool; 2],
    chunk_bytes: usize,
) -> Result<(Option<Tensor<1>>, Option<Tensor<1>>)> {
    let [b, cin, _, _] = f.input.dims();
    let [bd, cout, ho, wo] = f.output_grad.dims();
    let (positions, k) = (ho * wo, cin * f.kernel[0] * f.kernel[1]);
    if bd != b {
        return Err(CovnoiseError::Shape(format!(
            "a Conv2d probe saw {b} inputs but {bd} output gradients"
        )));
    }
    let per_example = 4 * (k * positions + cout * k + cout * positions);
    let chunk = (chunk_bytes / per_example.max(1)).clamp(1, b.max(1));
    let [(top, bottom), (left, right)] = f.padding;
    let (mut weight, mut bias): (Option<Tensor<1>>, Option<Tensor<1>>) = (None, None);
    let add = |acc: Option<Tensor<1>>, t: Tensor<1>| Some(acc.map_or(t.clone(), |a| a + t));
    let mut start = 0;
    while start < b {
        let c = chunk.min(b - start);
        let delta = f
            .output_grad
            .clone()
            .narrow(0, start, c)
            .reshape([c, cout, positions]);
        if want_weight {
            let mut x = f.input.clone().narrow(0, start, c);
            if top + bottom + left + right > 0 {
                x = x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0));
            }
            let unfolded_t = unfold_transposed(x, f);
            let [_, up, uk] = unfolded_t.dims();
            if uk != k || up != positions {
                return Err(CovnoiseError::Shape(format!(
                    "a Conv2d probe's unfolded input is [{up}, {uk}] per example, its output gradient has {positions} positions and the kernel {k} inputs"
                )));
            }
            // Example i's gradient [out, in kh kw]: the positions are summed
            // by the product, before the square.
            let g = delta.clone().matmul(unfolded_t);
            weight = add(weight, g.square().sum_dim(0).reshape([cout * k]));
        }
        if want_bias {
            let s = delta.sum_dim(2).reshape([c, cout]).square().sum_dim(0);
            bias = add(bias, s.reshape([cout]));
        }
        start += c;
    }
    // The scale of one example's gradient, squared, once on the sums.
    let scale2 = per_example_scale * per_example_scale;
    Ok((weight.map(|w| w * scale2), bias.map(|b| b * scale2)))
}

/// The transposed im2col of padded inputs `x` `[c, in, H, W]`: `[c, P,
/// in kh kw]`, row p holding the input patch under output position p.
/// Without dilation it is two sliding-window views and one copy; burn's
/// `unfold4d`, kept for dilated kernels, is a convolution with a one-hot
/// kernel and costs `in kh kw` multiply-adds per copied value.
fn unfold_transposed(x: Tensor<4>, f: &ConvFactors) -> Tensor<3> {
    let [c, cin, _, _] = x.dims();
    let [kh, kw] = f.kernel;
    if f.dilation != [1, 1] {
        let u = unfold4d(
            x,
            f.kernel,
            UnfoldOptions::new(f.stride, [0, 0], f.dilation),
        );
        return u.swap_dims(1, 2);
    }
    // [c, in, Ho, Wp, kh], then [c, in, Ho, Wo, kh, kw].
    let rows: Tensor<5> = x.unfold(2, kh, f.stride[0]);
    let patches: Tensor<6> = rows.unfold(3, kw, f.stride[1]);
    let [_, _, ho, wo, _, _] = patches.dims();
    patches
        .permute([0, 2, 3, 1, 4, 5])
        .reshape([c, ho * wo, cin * kh * kw])
}

/// Marks parameter `id` as covered by a probed layer and returns its index;
/// None for a frozen parameter (not in the table: it takes no noise).
fn claim(
    table: &ParamTable,
    covered: &mut [bool],
    id: burn::module::ParamId,
) -> Result<Option<usize>> {
    let Some(i) = table.index_of(id) else {
        return Ok(None);
    };
    if covered[i] {
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} is used by more than one probed layer in a forward pass; its per-example gradient is then a sum the exact estimator does not form (use --estimator microbatch)",
            table.entries()[i].name
        )));
    }
    covered[i] = true;
    Ok(Some(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_util::{from_vec, to_vec};
    use burn::module::ParamId;
    use burn::tensor::Device;

    /// Chunks of one example give the same sums as the whole batch at once
    /// (the batch-at-once result is checked against single-example backward
    /// passes in tests/conv.rs): only float32 summation order differs.
    #[test]
    fn chunking_does_not_change_the_sums() {
        let device = Device::flex();
        let (b, cin, cout, side) = (5, 2, 3, 6);
        let value = |i: usize| ((i * 37 % 17) as f32 - 8.0) / 7.0;
        let input: Vec<f32> = (0..b * cin * side * side).map(value).collect();
        let delta: Vec<f32> = (0..b * cout * 3 * 3).map(|i| value(i + 5)).collect();
        let f = ConvFactors {
            weight: ParamId::new(),
            bias: Some(ParamId::new()),
            input: from_vec(input, [b, cin, side, side], &device),
            output_grad: from_vec(delta, [b, cout, 3, 3], &device),
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            padding: [(1, 0), (1, 0)],
        };
        let whole = conv_sums(&f, 2.0, [true, true], usize::MAX).unwrap();
        let single = conv_sums(&f, 2.0, [true, true], 1).unwrap();
        for (a, c) in [(whole.0, single.0), (whole.1, single.1)] {
            let (a, c) = (to_vec(&a.unwrap()).unwrap(), to_vec(&c.unwrap()).unwrap());
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }
}
