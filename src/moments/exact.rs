//! Exact per-example second moments from the factors of one backward pass,
//! one rule per layer kind, for any parameter covered by probed layers.
//!
//! Every rule gives example i's gradient of a parameter as a sum over the
//! example's positions (tokens, pixels) *before* it is squared:
//! - Linear on `[B, T, in]`: `G_i = a_i^T delta_i` (`[in, T] x [T, out]`); with
//!   T = 1 the sum of squares is one product, `(a^2)^T (delta^2)`, and the
//!   squared norm `||a_i||^2 ||delta_i||^2` gives the trace in O(B (in + out)).
//! - Conv2d / Conv1d: `G_i = delta_i U_i^T`, `U_i` the unfolded (im2col) input
//!   `[in kh kw, P]` (not the sum of per-position squares, a different,
//!   KFAC-like quantity).
//! - Embedding: row v of `G_i` is the sum of `delta_it` over the positions
//!   where example i holds token v (repeated tokens add before the square).
//! - LayerNorm / GroupNorm: `sum_p xhat_ip * delta_ip` (gamma) and
//!   `sum_p delta_ip` (beta), over the positions that share a feature.
//! - Biases: `sum_p delta_ip`.
//!
//! A parameter used by several probed layers in one forward pass (tied
//! weights) gets the sum of its uses' per-example gradients, squared. A
//! parameter no probed layer covers is refused by name, never skipped.
//!
//! Where no one-product shortcut applies, examples go through in chunks, so
//! that the per-example gradients (and unfolded inputs) of one chunk are all
//! that is held: about `CHUNK_BYTES` (64 MiB) per parameter, or one
//! example's worth when that is larger.

use burn::tensor::module::unfold4d;
use burn::tensor::ops::{PadMode, UnfoldOptions};
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::{MomentKind, SecondMoment};
use crate::error::{CovnoiseError, Result};
use crate::model::{AffineFactors, ConvFactors, EmbeddingFactors, LayerFactors, LinearFactors};
use crate::params::ParamTable;
use crate::tensor_util::scalar;

/// One use of a parameter by a probed layer: which part of the layer's
/// factors gives its per-example gradients.
#[derive(Debug, Clone, Copy)]
enum Use<'a> {
    LinearWeight(&'a LinearFactors),
    LinearBias(&'a LinearFactors),
    ConvWeight(&'a ConvFactors),
    ConvBias(&'a ConvFactors),
    EmbeddingWeight(&'a EmbeddingFactors),
    AffineScale(&'a AffineFactors),
    AffineShift(&'a AffineFactors),
}

impl Use<'_> {
    /// Per-example gradients of examples `start..start + len`, `[len,
    /// numel]` in the parameter's own flat order (unscaled probe units).
    fn per_example(&self, start: usize, len: usize) -> Result<Tensor<2>> {
        Ok(match *self {
            Use::LinearWeight(f) => {
                let a = f.input.clone().narrow(0, start, len);
                let d = f.output_grad.clone().narrow(0, start, len);
                let [_, _, i] = a.dims();
                let [_, _, o] = d.dims();
                a.swap_dims(1, 2).matmul(d).reshape([len, i * o])
            }
            Use::LinearBias(f) => {
                let d = f.output_grad.clone().narrow(0, start, len);
                let o = d.dims()[2];
                d.sum_dim(1).reshape([len, o])
            }
            Use::ConvWeight(f) => conv_weight_grads(f, start, len)?,
            Use::ConvBias(f) => {
                let [_, cout, ho, wo] = f.output_grad.dims();
                f.output_grad
                    .clone()
                    .narrow(0, start, len)
                    .reshape([len, cout, ho * wo])
                    .sum_dim(2)
                    .reshape([len, cout])
            }
            Use::EmbeddingWeight(f) => embedding_grads(f, start, len),
            Use::AffineScale(f) => {
                let x = f.normalized.clone().narrow(0, start, len);
                let d = f.output_grad.clone().narrow(0, start, len);
                let n = d.dims()[2];
                (x * d).sum_dim(1).reshape([len, n])
            }
            Use::AffineShift(f) => {
                let d = f.output_grad.clone().narrow(0, start, len);
                let n = d.dims()[2];
                d.sum_dim(1).reshape([len, n])
            }
        })
    }

    /// Bytes one example's gradient of this use takes to form (the unfolded
    /// input or scatter buffer included), for sizing chunks.
    fn bytes_per_example(&self, numel: usize) -> usize {
        let f32s = match *self {
            Use::LinearWeight(f) => {
                let [_, t, i] = f.input.dims();
                t * i + t * f.output_grad.dims()[2] + numel
            }
            Use::ConvWeight(f) => {
                let [_, cin, _, _] = f.input.dims();
                let [_, cout, ho, wo] = f.output_grad.dims();
                let k = cin * f.kernel[0] * f.kernel[1];
                k * ho * wo + cout * k + cout * ho * wo
            }
            Use::EmbeddingWeight(f) => numel + f.output_grad.dims()[1] * f.output_grad.dims()[2],
            Use::LinearBias(_) | Use::ConvBias(_) | Use::AffineScale(_) | Use::AffineShift(_) => {
                numel
            }
        };
        4 * f32s.max(1)
    }

    /// Examples the factors hold.
    fn examples(&self) -> usize {
        match *self {
            Use::LinearWeight(f) | Use::LinearBias(f) => f.output_grad.dims()[0],
            Use::ConvWeight(f) | Use::ConvBias(f) => f.output_grad.dims()[0],
            Use::EmbeddingWeight(f) => f.output_grad.dims()[0],
            Use::AffineScale(f) | Use::AffineShift(f) => f.output_grad.dims()[0],
        }
    }

    /// `sum_i g_i^2` in one pass without per-example gradients, where the
    /// layer has one position per example (Linear on `[B, in]`).
    fn direct_square_sums(&self) -> Option<Tensor<1>> {
        match *self {
            Use::LinearWeight(f) if f.input.dims()[1] == 1 => {
                let [b, _, i] = f.input.dims();
                let o = f.output_grad.dims()[2];
                let a2 = f.input.clone().reshape([b, i]).square();
                let d2 = f.output_grad.clone().reshape([b, o]).square();
                Some(a2.transpose().matmul(d2).reshape([i * o]))
            }
            Use::LinearBias(f) if f.output_grad.dims()[1] == 1 => {
                let [b, _, o] = f.output_grad.dims();
                Some(
                    f.output_grad
                        .clone()
                        .reshape([b, o])
                        .square()
                        .sum_dim(0)
                        .reshape([o]),
                )
            }
            _ => None,
        }
    }

    /// `sum_i ||g_i||^2` without the diagonal, where that is cheaper.
    fn direct_trace(&self) -> Option<f64> {
        match *self {
            Use::LinearWeight(f) if f.input.dims()[1] == 1 => {
                let [b, _, i] = f.input.dims();
                let o = f.output_grad.dims()[2];
                let a2 = f.input.clone().reshape([b, i]).square().sum_dim(1);
                let d2 = f.output_grad.clone().reshape([b, o]).square().sum_dim(1);
                Some(scalar((a2 * d2).sum()))
            }
            _ => self.direct_square_sums().map(|s| scalar(s.sum())),
        }
    }
}

/// The uses of each table parameter by the probed layers, in table order;
/// an error names a parameter that no probed layer covers. Parameters of
/// probed layers that the table does not hold (frozen) take no noise and
/// are skipped.
fn uses_by_param<'a>(factors: &'a [LayerFactors], table: &ParamTable) -> Result<Vec<Vec<Use<'a>>>> {
    let mut uses: Vec<Vec<Use<'a>>> = vec![Vec::new(); table.len()];
    let mut add = |id: Option<burn::module::ParamId>, u: Use<'a>| {
        if let Some(i) = id.and_then(|id| table.index_of(id)) {
            uses[i].push(u);
        }
    };
    for layer in factors {
        match layer {
            LayerFactors::Linear(f) => {
                add(Some(f.weight), Use::LinearWeight(f));
                add(f.bias, Use::LinearBias(f));
            }
            LayerFactors::Conv2d(f) => {
                add(Some(f.weight), Use::ConvWeight(f));
                add(f.bias, Use::ConvBias(f));
            }
            LayerFactors::Embedding(f) => add(Some(f.weight), Use::EmbeddingWeight(f)),
            LayerFactors::Affine(f) => {
                add(f.gamma, Use::AffineScale(f));
                add(f.beta, Use::AffineShift(f));
            }
        }
    }
    if let Some(i) = uses.iter().position(Vec::is_empty) {
        let e = &table.entries()[i];
        return Err(CovnoiseError::Unsupported(format!(
            "parameter {} (shape {:?}) has no per-example gradient rule: the exact and mc-fisher estimators cover Linear, Conv1d, Conv2d, Embedding, LayerNorm and GroupNorm layers routed through Probes; use the micro-batch estimator (Estimator::Microbatch) for other layers",
            e.name, e.shape
        )));
    }
    Ok(uses)
}

/// Per-example gradients of one parameter for examples `start..start+len`,
/// summed over its uses, `[len, numel]`.
fn summed_per_example(uses: &[Use], start: usize, len: usize, numel: usize) -> Result<Tensor<2>> {
    let mut total: Option<Tensor<2>> = None;
    for u in uses {
        let g = u.per_example(start, len)?;
        if g.dims()[1] != numel {
            return Err(CovnoiseError::Shape(format!(
                "a probed layer gives {} values per example for a parameter of {numel}",
                g.dims()[1]
            )));
        }
        total = Some(match total {
            None => g,
            Some(t) => t + g,
        });
    }
    Ok(total.expect("every parameter has a use"))
}

/// Sums over the batch of squared per-example gradients: per parameter
/// (`MomentKind::Diag`, flat and in table order) or in total
/// (`MomentKind::Trace`). `per_example_scale` turns a probe gradient into
/// the gradient of one example's own loss (B for a mean over B examples).
///
/// Every parameter of `table` must be covered by a probed layer; one used
/// by several (tied weights) gets the sum of its uses before the square.
pub fn moment_sums(
    factors: &[LayerFactors],
    table: &ParamTable,
    per_example_scale: f32,
    kind: MomentKind,
) -> Result<SecondMoment> {
    moment_sums_chunked(factors, table, per_example_scale, kind, CHUNK_BYTES)
}

fn moment_sums_chunked(
    factors: &[LayerFactors],
    table: &ParamTable,
    per_example_scale: f32,
    kind: MomentKind,
    chunk_bytes: usize,
) -> Result<SecondMoment> {
    let uses = uses_by_param(factors, table)?;
    // The per-example scale enters squared on the sums, once.
    let scale2 = per_example_scale * per_example_scale;
    let mut diag = Vec::with_capacity(table.len());
    let mut trace = 0.0;
    for (entry, uses) in table.entries().iter().zip(&uses) {
        let numel = entry.numel();
        if let [single] = uses.as_slice() {
            match kind {
                MomentKind::Diag => {
                    if let Some(s) = single.direct_square_sums() {
                        diag.push(s * scale2);
                        continue;
                    }
                }
                MomentKind::Trace => {
                    if let Some(t) = single.direct_trace() {
                        trace += scale2 as f64 * t;
                        continue;
                    }
                }
            }
        }
        let sums = square_sums(uses, numel, chunk_bytes)
            .map_err(|e| name_shape_error(e, &entry.name))?
            * scale2;
        match kind {
            MomentKind::Diag => diag.push(sums),
            MomentKind::Trace => trace += scalar(sums.sum()),
        }
    }
    Ok(match kind {
        MomentKind::Diag => SecondMoment::Diag(diag),
        MomentKind::Trace => SecondMoment::Trace(trace),
    })
}

/// `sum_i g_i^2` of one parameter from its uses (per-example gradients
/// summed over the uses, then squared), over chunks of examples holding at
/// most `chunk_bytes` (at least one example).
fn square_sums(uses: &[Use], numel: usize, chunk_bytes: usize) -> Result<Tensor<1>> {
    let examples = uses[0].examples();
    if let Some(u) = uses.iter().find(|u| u.examples() != examples) {
        return Err(CovnoiseError::Shape(format!(
            "it is used by probed layers that saw {examples} and {} examples",
            u.examples()
        )));
    }
    let per_example: usize = uses.iter().map(|u| u.bytes_per_example(numel)).sum();
    let chunk = (chunk_bytes / per_example.max(1)).clamp(1, examples.max(1));
    let mut sums: Option<Tensor<1>> = None;
    let mut start = 0;
    while start < examples {
        let len = chunk.min(examples - start);
        let g = summed_per_example(uses, start, len, numel)?;
        let s = g.square().sum_dim(0).reshape([numel]);
        sums = Some(match sums {
            None => s,
            Some(acc) => acc + s,
        });
        start += len;
    }
    sums.ok_or_else(|| CovnoiseError::Shape("empty batch".into()))
}

/// A shape error about a parameter, with the parameter's name.
fn name_shape_error(e: CovnoiseError, name: &str) -> CovnoiseError {
    match e {
        CovnoiseError::Shape(m) => CovnoiseError::Shape(format!("parameter {name}: {m}")),
        other => other,
    }
}

/// Checks that the per-example gradients the rules give add up to the
/// backward pass's gradient `grads` (flat, table order) of the mean
/// objective over `examples`: a parameter that is also used outside the
/// probed layers (a tied weight read directly, a layer called without its
/// probe) would have part of its gradient missing from its estimate.
/// `tolerance` is relative to the larger of the two norms.
pub fn check_rules_cover_gradients(
    factors: &[LayerFactors],
    table: &ParamTable,
    grads: &[Tensor<1>],
    tolerance: f64,
) -> Result<()> {
    let uses = uses_by_param(factors, table)?;
    for ((entry, uses), g) in table.entries().iter().zip(&uses).zip(grads) {
        let numel = entry.numel();
        let examples = uses[0].examples();
        let sum = summed_per_example(uses, 0, examples, numel)?
            .sum_dim(0)
            .reshape([numel]);
        // The probe gradients are of the mean objective already: their sum
        // over examples is the batch gradient itself.
        let diff = scalar((sum.clone() - g.clone()).square().sum()).sqrt();
        let scale = scalar(sum.square().sum())
            .sqrt()
            .max(scalar(g.clone().square().sum()).sqrt());
        if diff > tolerance * scale + 1e-30 {
            return Err(CovnoiseError::Unsupported(format!(
                "parameter {} is used outside the layers routed through Probes (its per-example gradients add up to {:.3e} of a gradient of norm {scale:.3e} away): route every use through Probes, or use the micro-batch estimator (Estimator::Microbatch)",
                entry.name, diff
            )));
        }
    }
    Ok(())
}

/// Example i's gradients of an Embedding table, `[len, vocabulary * d]`:
/// each position's output gradient is added into the row of its token, in
/// a buffer of one table per example.
fn embedding_grads(f: &EmbeddingFactors, start: usize, len: usize) -> Tensor<2> {
    let [_, t, d] = f.output_grad.dims();
    let v = f.vocabulary;
    let device = f.output_grad.device();
    let offsets = Tensor::<1, Int>::arange(0..len as i64, &device)
        .reshape([len, 1])
        .mul_scalar(v as i64);
    let keys = (f.tokens.clone().narrow(0, start, len) + offsets).reshape([len * t]);
    let values = f
        .output_grad
        .clone()
        .narrow(0, start, len)
        .reshape([len * t, d]);
    Tensor::<2>::zeros([len * v, d], &device)
        .select_assign(0, keys, values, IndexingUpdateOp::Add)
        .reshape([len, v * d])
}

/// Example i's kernel gradients `G_i = delta_i U_i^T` of a Conv layer for
/// examples `start..start + len`, `[len, out * in * kh * kw]`.
fn conv_weight_grads(f: &ConvFactors, start: usize, len: usize) -> Result<Tensor<2>> {
    let [b, cin, _, _] = f.input.dims();
    let [bd, cout, ho, wo] = f.output_grad.dims();
    let (positions, k) = (ho * wo, cin * f.kernel[0] * f.kernel[1]);
    if bd != b {
        return Err(CovnoiseError::Shape(format!(
            "a Conv2d probe saw {b} inputs but {bd} output gradients"
        )));
    }
    let [(top, bottom), (left, right)] = f.padding;
    let delta = f
        .output_grad
        .clone()
        .narrow(0, start, len)
        .reshape([len, cout, positions]);
    let mut x = f.input.clone().narrow(0, start, len);
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
    // The positions are summed by the product, before the square.
    Ok(delta.matmul(unfolded_t).reshape([len, cout * k]))
}

/// Bytes of unfolded inputs and per-example gradients one chunk of examples
/// may hold (see the module documentation).
const CHUNK_BYTES: usize = 64 << 20;

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
        let uses = [Use::ConvWeight(&f), Use::ConvBias(&f)];
        for u in uses {
            let numel = u.per_example(0, 1).unwrap().dims()[1];
            let whole = square_sums(&[u], numel, usize::MAX).unwrap();
            let single = square_sums(&[u], numel, 1).unwrap();
            let (a, c) = (to_vec(&whole).unwrap(), to_vec(&single).unwrap());
            for (x, y) in a.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
            }
        }
    }
}
