//! ReLU and its gradient on host `f32` slices, spread over the threads in
//! blocks (burn's flex backend runs elementwise ops on the calling thread:
//! on ResNet-20 at batch 128 its ReLU and ReLU gradient held the other
//! threads idle for about a tenth of a step).
//!
//! The values are burn's and PyTorch's: `max(x, 0)` where a NaN passes
//! through, and the gradient passes where the output is positive or NaN.

use rayon::prelude::*;

use super::output_items;

/// Values per task: 64 KiB, large enough that the threads' start-up is
/// small beside the block's work, small enough to stay in cache between
/// the block's zeroing and its writing.
const BLOCK: usize = 16 * 1024;

/// Whether one value passes (positive or NaN).
#[inline(always)]
fn passes(v: f32) -> bool {
    v.is_nan() || v > 0.0
}

/// Runs `f` over the blocks of a new buffer of `len` values, in parallel
/// where there is more than one block.
fn blocks(len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    output_items(len, BLOCK, 1, len > BLOCK, |b, out| f(b * BLOCK, out))
}

/// `max(x, 0)`, NaN passing through.
pub fn forward(x: &[f32]) -> Vec<f32> {
    blocks(x.len(), |start, out| {
        for (o, &v) in out.iter_mut().zip(&x[start..]) {
            *o = if passes(v) { v } else { 0.0 };
        }
    })
}

/// The input gradient from the forward pass's output `y` and the output
/// gradient `dy`: `dy` where `y` is positive or NaN, 0 elsewhere.
pub fn backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), dy.len(), "an output gradient per output");
    blocks(y.len(), |start, out| {
        for ((o, &v), &g) in out.iter_mut().zip(&y[start..]).zip(&dy[start..]) {
            *o = if passes(v) { g } else { 0.0 };
        }
    })
}

/// Runs `f` on the blocks of `values`, in parallel where there is more
/// than one block.
fn blocks_in_place(values: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if values.len() > BLOCK {
        values
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, chunk)| f(b * BLOCK, chunk));
    } else {
        f(0, values);
    }
}

/// [`forward`] overwriting its input.
pub fn forward_in_place(x: &mut [f32]) {
    blocks_in_place(x, |_, x| {
        // An unconditional store of a select: a conditional store would
        // not vectorize and mispredicts on signs (a quarter slower step).
        for v in x.iter_mut() {
            *v = if passes(*v) { *v } else { 0.0 };
        }
    })
}

/// `max(a + b, 0)`: a residual sum and the ReLU after it in one pass
/// (the sum rounded to `f32` first, as burn's add then ReLU).
pub fn add_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "two operands of one shape");
    blocks(a.len(), |start, out| {
        for ((o, &u), &v) in out.iter_mut().zip(&a[start..]).zip(&b[start..]) {
            let s = u + v;
            *o = if passes(s) { s } else { 0.0 };
        }
    })
}

/// [`add_forward`] overwriting `a`.
pub fn add_forward_in_place(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "two operands of one shape");
    blocks_in_place(a, |start, a| {
        for (u, &v) in a.iter_mut().zip(&b[start..]) {
            let s = *u + v;
            *u = if passes(s) { s } else { 0.0 };
        }
    })
}

/// [`backward`] overwriting the output gradient `dy`.
pub fn backward_in_place(y: &[f32], dy: &mut [f32]) {
    assert_eq!(y.len(), dy.len(), "an output gradient per output");
    blocks_in_place(dy, |start, dy| {
        for (g, &v) in dy.iter_mut().zip(&y[start..]) {
            *g = if passes(v) { *g } else { 0.0 };
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of buffers that end inside a block, span several blocks
    /// or are empty, against the scalar definition (NaN, signed zeros and
    /// infinities included).
    #[test]
    fn values_and_gradients_match_the_definition() {
        let special = [
            f32::NAN,
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-30,
            -1e-30,
        ];
        for len in [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK + 17] {
            let x: Vec<f32> = (0..len)
                .map(|i| match i % 11 {
                    k if k < special.len() => special[k],
                    k => (i as f32 * 0.37).sin() * k as f32,
                })
                .collect();
            let dy: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let y = forward(&x);
            let dx = backward(&y, &dy);
            // The in-place forms give the same bits.
            let mut y_in = x.clone();
            forward_in_place(&mut y_in);
            let mut dx_in = dy.clone();
            backward_in_place(&y, &mut dx_in);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y_in), bits(&y), "in place, {len} values");
            // The fused sum: relu(x + r) for a second operand r, whole and
            // in place, against the sum then the ReLU.
            let r: Vec<f32> = (0..len).map(|i| (i as f32 * 0.23).sin()).collect();
            let summed: Vec<f32> = x.iter().zip(&r).map(|(u, v)| u + v).collect();
            let want = bits(&forward(&summed));
            assert_eq!(bits(&add_forward(&x, &r)), want, "sum, {len} values");
            let mut sum_in = x.clone();
            add_forward_in_place(&mut sum_in, &r);
            assert_eq!(bits(&sum_in), want, "sum in place, {len} values");
            assert_eq!(bits(&dx_in), bits(&dx), "gradient in place, {len} values");
            assert_eq!(y.len(), len);
            for i in 0..len {
                let want = if x[i].is_nan() || x[i] > 0.0 {
                    x[i]
                } else {
                    0.0
                };
                assert!(
                    y[i].to_bits() == want.to_bits() || (y[i].is_nan() && want.is_nan()),
                    "relu({}) = {} at {i} of {len}",
                    x[i],
                    y[i]
                );
                let want = if x[i].is_nan() || x[i] > 0.0 {
                    dy[i]
                } else {
                    0.0
                };
                assert_eq!(dx[i].to_bits(), want.to_bits(), "gradient at {i} of {len}");
            }
        }
    }
}
