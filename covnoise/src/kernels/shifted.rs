//! A Linear layer's product in which each of G consecutive groups of rows
//! meets its own weight `W + f_j S_j` (a penalty's moved parameters, one
//! set per micro-batch: the micro-batch's gradient `S_j` scaled by its
//! step `f_j`), on host `f32` slices, with its two gradients:
//! - forward: `y_j = x_j (W + f_j S_j)`, one product per group with the
//!   layer's own inner dimension (the batch product's multiply-adds);
//! - input gradient: `dx_j = dy_j (W + f_j S_j)ᵀ`, likewise;
//! - weight gradient: `Σ_j x_jᵀ dy_j = xᵀ dy`, the whole batch's single
//!   product, not one product per group summed.
//!
//! Each group's `W + f_j S_j` is formed in a scratch buffer just before its
//! product and dropped after, so no `[G, in, out]` tensor is kept; that
//! costs one weight-sized addition per group in each direction. burn's
//! batched product over `[G, in, out]` weights, or the layer's product
//! plus a batched product with the shifts, ran the MLP's moved pass at
//! about twice the plain pass.

use gemm::Parallelism;

use super::conv::matmul;
use super::{output_items, with_scratch};

/// The shapes of one shifted product: `rows` rows per group, G groups,
/// `i` inputs and `o` outputs.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedShape {
    /// Rows per group.
    pub rows: usize,
    /// Groups G.
    pub groups: usize,
    /// Inputs per row.
    pub i: usize,
    /// Outputs per row.
    pub o: usize,
}

/// A new output of G groups of `per_out` values, group j's written by
/// `product(j, weight_j, dst_j)` with `W + f_j S_j` in a scratch buffer,
/// the groups spread over the threads (each product on one), or with
/// fewer groups than threads one group at a time, each product on all of
/// them.
fn per_group(
    s: &ShiftedShape,
    weight: &[f32],
    shift: &[f32],
    factors: &[f32],
    per_out: usize,
    product: impl Fn(usize, &[f32], &mut [f32], Parallelism) + Sync + Send,
) -> Vec<f32> {
    let len = s.i * s.o;
    assert_eq!(weight.len(), len, "a weight [in, out]");
    assert_eq!(shift.len(), s.groups * len, "one shift per group");
    assert_eq!(factors.len(), s.groups, "one factor per group");
    let spread = s.groups >= rayon::current_num_threads();
    let par = if spread {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    output_items(s.groups * per_out, per_out, 1, spread, |j, dst| {
        with_scratch(len, |w| {
            let f = factors[j];
            for ((d, &a), &b) in w.iter_mut().zip(weight).zip(&shift[j * len..][..len]) {
                *d = a + f * b;
            }
            product(j, w, dst, par);
        });
    })
}

/// `y` `[G rows, o]`: `y_j = x_j (W + f_j S_j)` for `x` `[G rows, i]`,
/// `weight` `[i, o]`, `shift` `[G, i, o]` (row-major) and `factors` f_j.
pub fn forward(
    s: &ShiftedShape,
    x: &[f32],
    weight: &[f32],
    shift: &[f32],
    factors: &[f32],
) -> Vec<f32> {
    let (rows, i, o) = (s.rows, s.i, s.o);
    assert_eq!(x.len(), s.groups * rows * i, "x holds G groups of rows");
    per_group(s, weight, shift, factors, rows * o, |j, w, dst, par| {
        let x_j = &x[j * rows * i..][..rows * i];
        matmul([rows, o, i], dst, o, false, x_j, [i, 1], w, [o, 1], par);
    })
}

/// `dx` `[G rows, i]`: `dx_j = dy_j (W + f_j S_j)ᵀ` for `dy` `[G rows,
/// o]`.
pub fn input_grad(
    s: &ShiftedShape,
    weight: &[f32],
    shift: &[f32],
    factors: &[f32],
    dy: &[f32],
) -> Vec<f32> {
    let (rows, i, o) = (s.rows, s.i, s.o);
    assert_eq!(dy.len(), s.groups * rows * o, "dy holds G groups of rows");
    per_group(s, weight, shift, factors, rows * i, |j, w, dst, par| {
        let dy_j = &dy[j * rows * o..][..rows * o];
        // (W + f_j S_j)ᵀ is the [i, o] buffer read with its strides swapped.
        matmul([rows, i, o], dst, i, false, dy_j, [o, 1], w, [1, o], par);
    })
}

#[cfg(test)]
mod tests {
    use super::super::outer::weight_grad;
    use super::*;

    /// All three against triple loops in f64, with more groups than
    /// threads and with one group: float32 sums of a few terms round at
    /// about 1e-6.
    #[test]
    fn shifted_products_match_the_triple_loops() {
        for groups in [3, 1] {
            let s = ShiftedShape {
                rows: 4,
                groups,
                i: 5,
                o: 3,
            };
            let r = groups * s.rows;
            let val = |k: usize, m: usize, d: f32| ((k * m % 11) as f32 - 5.0) / d;
            let x: Vec<f32> = (0..r * s.i).map(|k| val(k, 37, 3.0)).collect();
            let w: Vec<f32> = (0..s.i * s.o).map(|k| val(k, 13, 4.0)).collect();
            let sh: Vec<f32> = (0..groups * s.i * s.o).map(|k| val(k, 7, 9.0)).collect();
            let f: Vec<f32> = (0..groups).map(|j| 0.5 + j as f32).collect();
            let dy: Vec<f32> = (0..r * s.o).map(|k| val(k, 5, 2.0)).collect();
            let weight = |n: usize, a: usize, c: usize| {
                let g = n / s.rows;
                w[a * s.o + c] as f64 + f[g] as f64 * sh[(g * s.i + a) * s.o + c] as f64
            };
            let close = |v: f32, want: f64| (v as f64 - want).abs() <= 1e-5 * want.abs().max(1.0);
            let y = forward(&s, &x, &w, &sh, &f);
            let dx = input_grad(&s, &w, &sh, &f, &dy);
            let dw = weight_grad(&x, &dy, r, s.i, s.o);
            for n in 0..r {
                for c in 0..s.o {
                    let want: f64 = (0..s.i)
                        .map(|a| x[n * s.i + a] as f64 * weight(n, a, c))
                        .sum();
                    assert!(close(y[n * s.o + c], want), "y {n} {c}");
                }
                for a in 0..s.i {
                    let want: f64 = (0..s.o)
                        .map(|c| dy[n * s.o + c] as f64 * weight(n, a, c))
                        .sum();
                    assert!(close(dx[n * s.i + a], want), "dx {n} {a}");
                }
            }
            for a in 0..s.i {
                for c in 0..s.o {
                    let want: f64 = (0..r)
                        .map(|n| x[n * s.i + a] as f64 * dy[n * s.o + c] as f64)
                        .sum();
                    assert!(close(dw[a * s.o + c], want), "dw {a} {c}");
                }
            }
        }
    }
}
