//! The weight gradients of a Linear layer for consecutive groups of
//! examples (micro-batch gradients): `a_gᵀ δ_g` per group, on host `f32`
//! slices; the layer's own two products, for the grouped Linear op whose
//! backward step forms the batch's weight gradient as the sum of the
//! groups'; and the centered sum of squares of group gradients.
//!
//! Each group's product has only the group's rows as its inner dimension
//! (128 for 32 micro-batches of a batch of 4,096): one gemm per group on
//! one thread, the groups spread over the threads. On the MLP's first
//! layer (784 x 512, 32 groups of 128 rows, 2 threads) that ran in 36 ms
//! where burn's batched matmul took 58 ms and one multi-threaded product
//! per group 94 ms; the whole batch's single product (4,096 terms per
//! output) takes about 20 ms. Most of the difference is the fresh `[G, i,
//! o]` output (51 MB there, page-faulted on every call), not the short
//! inner dimension: [`group_outer_moments`], which folds each group's
//! product out of a reused weight-sized buffer, made the MLP's whole
//! micro-batch step as fast as its plain step.

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::matmul;
use super::{ZEROED_BLOCK, output_items, zeroed_output};

/// `[G, i, o]`: for each of the G consecutive groups of `rows` rows of `a`
/// `[G rows, i]` and `d` `[G rows, o]` (row-major), `a_gᵀ d_g`.
pub fn group_outer(a: &[f32], d: &[f32], rows: usize, i: usize, o: usize) -> Vec<f32> {
    let groups = group_count(a, d, rows, i, o);
    // Fewer groups than threads: each product runs on all of them.
    let spread = groups >= rayon::current_num_threads();
    let par = if spread {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    output_items(groups * i * o, i * o, 1, spread, |g, dst| {
        let a_g = &a[g * rows * i..][..rows * i];
        let d_g = &d[g * rows * o..][..rows * o];
        // a_gᵀ is [i, rows]: element (j, n) sits at n i + j.
        matmul([i, o, rows], dst, o, false, a_g, [1, i], d_g, [o, 1], par);
    })
}

/// The number of groups of `rows` rows that `a` `[G rows, i]` and `d` `[G
/// rows, o]` hold (checked: panics on shapes that do not make whole
/// groups).
fn group_count(a: &[f32], d: &[f32], rows: usize, i: usize, o: usize) -> usize {
    assert!(rows > 0 && i > 0 && o > 0, "non-empty groups and layers");
    assert!(a.len().is_multiple_of(rows * i), "whole groups of rows");
    let groups = a.len() / (rows * i);
    assert_eq!(d.len(), groups * rows * o, "as many rows of d as of a");
    groups
}

/// `x w` `[r, o]` for `x` `[r, i]` and `w` `[i, o]` (row-major), on all
/// threads: a Linear layer's product.
pub fn product(x: &[f32], w: &[f32], r: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        x.len() == r * i && w.len() == i * o,
        "x [r, i] and w [i, o]"
    );
    whole_product([r, o, i], x, [i, 1], w, [o, 1])
}

/// `dy wᵀ` `[r, i]` for `dy` `[r, o]` and `w` `[i, o]`: a Linear layer's
/// input gradient.
pub fn product_transposed(dy: &[f32], w: &[f32], r: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        dy.len() == r * o && w.len() == i * o,
        "dy [r, o] and w [i, o]"
    );
    // wᵀ is [o, i]: element (c, j) sits at j o + c.
    whole_product([r, i, o], dy, [o, 1], w, [1, o])
}

/// `xᵀ dy` `[i, o]` over all `r` rows of `x` `[r, i]` and `dy` `[r, o]`,
/// one product on all threads: a Linear layer's weight gradient.
pub fn weight_grad(x: &[f32], dy: &[f32], r: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        x.len() == r * i && dy.len() == r * o,
        "x [r, i] and dy [r, o]"
    );
    long_inner_product([i, o, r], x, [1, i], dy, [o, 1])
}

/// `lhs rhs` `[m, n]` (row-major) for operands read with their `[row,
/// column]` element strides, `lhs` `[m, k]` and `rhs` `[k, n]`: one product
/// on all threads, into a new buffer.
pub(super) fn whole_product(
    [m, n, k]: [usize; 3],
    lhs: &[f32],
    lhs_st: [usize; 2],
    rhs: &[f32],
    rhs_st: [usize; 2],
) -> Vec<f32> {
    let mut out = zeroed_output(m * n);
    let par = if m * n * k >= PARALLEL_PRODUCT {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    matmul([m, n, k], &mut out, n, false, lhs, lhs_st, rhs, rhs_st, par);
    out
}

/// [`whole_product`] for a product whose inner dimension is the long one
/// (a weight gradient `xᵀ dy` over a batch's rows): the output's rows are
/// split into one block per thread, each block one product on its thread.
/// `gemm`'s own threads split such a product with less gain: the MLP's
/// first-layer weight gradient at batch 4096 (`[784, 4096] [4096, 512]`)
/// took 20-21 ms on two threads that way and 18.2-18.9 ms split here, a
/// forward product of the same multiply-adds 17.5 ms (standalone timings).
pub(super) fn long_inner_product(
    [m, n, k]: [usize; 3],
    lhs: &[f32],
    lhs_st: [usize; 2],
    rhs: &[f32],
    rhs_st: [usize; 2],
) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    if m * n * k < PARALLEL_PRODUCT || threads == 1 || m < 2 * ROWS_PER_BLOCK {
        return whole_product([m, n, k], lhs, lhs_st, rhs, rhs_st);
    }
    // Blocks of whole vectors of rows, at least ROWS_PER_BLOCK tall.
    let rows = m.div_ceil(threads).next_multiple_of(16).max(ROWS_PER_BLOCK);
    output_items(m * n, rows * n, 1, true, |b, dst| {
        let (first, len) = (b * rows, dst.len() / n);
        let lhs = &lhs[first * lhs_st[0]..];
        matmul(
            [len, n, k],
            dst,
            n,
            false,
            lhs,
            lhs_st,
            rhs,
            rhs_st,
            Parallelism::None,
        );
    })
}

/// Fewest output rows a block of [`long_inner_product`] takes: shorter
/// blocks run `gemm`'s tiles at their edges.
const ROWS_PER_BLOCK: usize = 64;

/// Multiply-adds from which [`whole_product`] runs on the threads (burn's
/// flex matmul uses the same threshold, 192³): below it, waking them
/// costs more than it saves (LeNet-5's fully connected layers at batch 128
/// are under it).
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// `(a²)ᵀ(d²)` `[i, o]` for `a` `[r, i]` and `d` `[r, o]` (row-major):
/// the sum over the rows n of the squared outer products `a_n² (d_n²)ᵀ`,
/// a Linear layer's squared per-example weight gradients summed over
/// the examples (one position per example). The squares are formed on
/// the threads, then one product runs on all of them.
pub fn squared_outer(a: &[f32], d: &[f32], r: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        a.len() == r * i && d.len() == r * o,
        "a [r, i] and d [r, o]"
    );
    let (a2, d2) = (squares(a), squares(d));
    // (a²)ᵀ is [i, r]: element (j, n) sits at n i + j.
    long_inner_product([i, o, r], &a2, [1, i], &d2, [o, 1])
}

/// `t²` elementwise into a new buffer, in blocks over the threads.
fn squares(t: &[f32]) -> Vec<f32> {
    output_items(
        t.len(),
        ZEROED_BLOCK,
        1,
        t.len() > ZEROED_BLOCK,
        |n, dst| {
            let src = &t[n * ZEROED_BLOCK..][..dst.len()];
            for (s, &v) in dst.iter_mut().zip(src) {
                *s = v * v;
            }
        },
    )
}

/// `Σ_n t[n, c]²` `[n_cols]` over the rows of `t` `[R, n_cols]`
/// (row-major): a Linear layer's squared per-example bias gradients
/// summed, in one read of `t` (no squared copy).
pub fn column_square_sums(t: &[f32], n: usize) -> Vec<f32> {
    fold_rows(t, n, |dst, row, _, _| {
        for (s, &v) in dst.iter_mut().zip(row) {
            *s += v * v;
        }
    })
}

/// [`group_outer`] and the sum of its groups, `Σ_g a_gᵀ d_g = aᵀ d`
/// `[i, o]` (the batch's weight gradient, from the groups' products
/// rather than a product of its own), the sum spread over the threads.
pub fn group_outer_summed(
    a: &[f32],
    d: &[f32],
    rows: usize,
    i: usize,
    o: usize,
) -> (Vec<f32>, Vec<f32>) {
    let groups = group_outer(a, d, rows, i, o);
    let sum = fold_rows(&groups, i * o, |dst, row, _, _| {
        for (s, &v) in dst.iter_mut().zip(row) {
            *s += v;
        }
    });
    (groups, sum)
}

/// `[n]`: the rows of `t` `[G, n]` (row-major) folded into zeros by
/// `add(dst, row, start, g)`, which adds columns `start..start +
/// dst.len()` of row `g` into `dst`; spread over the threads by blocks of
/// columns, each block's rows read in order.
fn fold_rows(
    t: &[f32],
    n: usize,
    add: impl Fn(&mut [f32], &[f32], usize, usize) + Sync,
) -> Vec<f32> {
    assert!(n > 0 && t.len().is_multiple_of(n), "whole rows of t");
    output_items(n, SUM_BLOCK, 1, true, |c, dst| {
        let (start, len) = (c * SUM_BLOCK, dst.len());
        dst.fill(0.0);
        for (g, row) in t.chunks(n).enumerate() {
            add(dst, &row[start..start + len], start, g);
        }
    })
}

/// The sum `Σ_g a_gᵀ d_g` `[i, o]` of the G group products of
/// [`group_outer`] and their centered sum of squares `Σ_g (t_g - t̄)²`
/// around their mean t̄, without a `[G, i, o]` buffer: each thread forms
/// its groups' products one at a time in a weight-sized scratch buffer and
/// folds each into a running mean and centered sum (Welford's update,
/// stable in float32), and the threads' running sums are merged (Chan et
/// al.'s pairwise formula). With fewer groups than threads, one group at a
/// time, each product on all of them.
pub fn group_outer_moments(
    a: &[f32],
    d: &[f32],
    rows: usize,
    i: usize,
    o: usize,
) -> (Vec<f32>, Vec<f32>) {
    let groups = group_count(a, d, rows, i, o);
    let len = i * o;
    let threads = rayon::current_num_threads().max(1);
    // The groups `range` into one running (count, mean, centered sum).
    let fold = |range: std::ops::Range<usize>, par: Parallelism| {
        let mut mean = vec![0.0f32; len];
        let mut m2 = vec![0.0f32; len];
        super::with_scratch(len, |t| {
            for (n, g) in range.clone().enumerate() {
                let a_g = &a[g * rows * i..][..rows * i];
                let d_g = &d[g * rows * o..][..rows * o];
                matmul([i, o, rows], t, o, false, a_g, [1, i], d_g, [o, 1], par);
                let inv = 1.0 / (n + 1) as f32;
                for ((m, q), &v) in mean.iter_mut().zip(m2.iter_mut()).zip(t.iter()) {
                    let delta = v - *m;
                    *m += delta * inv;
                    *q += delta * (v - *m);
                }
            }
        });
        (range.len(), mean, m2)
    };
    let (count, mean, m2) = if groups >= threads && threads > 1 {
        let per = groups.div_ceil(threads);
        (0..groups.div_ceil(per))
            .into_par_iter()
            .map(|c| fold(c * per..((c + 1) * per).min(groups), Parallelism::None))
            .reduce_with(merge_moments)
            .expect("at least one group")
    } else {
        fold(0..groups, Parallelism::Rayon(0))
    };
    debug_assert_eq!(count, groups);
    let total = count as f32;
    let sum = mean.into_iter().map(|m| m * total).collect();
    (sum, m2)
}

/// Two running (count, mean, centered sum of squares) merged into the
/// statistics of their union: `m2_a + m2_b + δ² n_a n_b / n`, δ the
/// difference of the means.
fn merge_moments(
    (na, mut mean_a, mut m2_a): (usize, Vec<f32>, Vec<f32>),
    (nb, mean_b, m2_b): (usize, Vec<f32>, Vec<f32>),
) -> (usize, Vec<f32>, Vec<f32>) {
    let n = na + nb;
    let (wb, cross) = (nb as f32 / n as f32, (na * nb) as f32 / n as f32);
    for (((ma, qa), &mb), &qb) in mean_a
        .iter_mut()
        .zip(m2_a.iter_mut())
        .zip(&mean_b)
        .zip(&m2_b)
    {
        let delta = mb - *ma;
        *ma += delta * wb;
        *qa += qb + delta * delta * cross;
    }
    (n, mean_a, m2_a)
}

/// Values per block of the sums over groups: 16 KiB of output, small
/// enough for L1 while the groups' rows stream past.
const SUM_BLOCK: usize = 4096;

/// `Σ_j (t_j - m)²` `[n]` over the G rows `t_j` of `t` `[G, n]`
/// (row-major): the centered sum of squares of G group gradients around
/// `m`, one read of `t`, spread over the threads by blocks of columns.
pub fn centered_square_sum(t: &[f32], m: &[f32]) -> Vec<f32> {
    fold_rows(t, m.len(), |dst, row, start, _| {
        let m = &m[start..start + dst.len()];
        for ((s, &v), &mean) in dst.iter_mut().zip(row).zip(m) {
            let e = v - mean;
            *s += e * e;
        }
    })
}

/// `(1/G) Σ_g t[g, c]` `[n]`: the mean of the rows of `t` `[G, n]` (the
/// mean of group gradients), spread over the threads by blocks of
/// columns, each block's rows added in order.
pub fn row_mean(t: &[f32], n: usize) -> Vec<f32> {
    assert!(n > 0 && !t.is_empty(), "rows of t");
    let g = (t.len() / n) as f32;
    let mut sum = fold_rows(t, n, |dst, row, _, _| {
        for (s, &v) in dst.iter_mut().zip(row) {
            *s += v;
        }
    });
    for v in sum.iter_mut() {
        *v /= g;
    }
    sum
}

/// `Σ_c t[g, c]²` `[G]` for each row of `t` `[G, n]`: the squared norms of
/// group gradients, in one read of `t` with no squared copy, the rows
/// spread over the threads, each summed in eight `f64` lanes.
pub fn row_square_sums(t: &[f32], n: usize) -> Vec<f32> {
    assert!(n > 0 && t.len().is_multiple_of(n), "whole rows of t");
    t.par_chunks(n).map(|row| square_sum(row) as f32).collect()
}

/// `Σ x²` in eight `f64` lanes.
fn square_sum(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let blocks = x.chunks_exact(8);
    let rest = blocks.remainder();
    for b in blocks {
        for (l, &v) in lanes.iter_mut().zip(b) {
            *l += v as f64 * v as f64;
        }
    }
    let tail: f64 = rest.iter().map(|&v| v as f64 * v as f64).sum();
    lanes.iter().sum::<f64>() + tail
}

/// [`row_mean`] and [`row_square_sums`] of `t` `[G, n]` in one read of
/// `t` (the mean of group gradients and their squared norms, both asked
/// of the same rows by a penalty's step): spread over the threads by
/// blocks of columns; each block's part of a row's squares is summed in
/// `f64` lanes and the blocks' parts are added in block order, so the
/// result does not depend on which thread finished first.
pub fn row_mean_and_square_sums(t: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    assert!(n > 0 && !t.is_empty(), "rows of t");
    assert!(t.len().is_multiple_of(n), "whole rows of t");
    let g = t.len() / n;
    let blocks = n.div_ceil(SUM_BLOCK);
    let parts = std::sync::Mutex::new(vec![Vec::new(); blocks]);
    let mut mean = output_items(n, SUM_BLOCK, 1, true, |c, dst| {
        let (start, len) = (c * SUM_BLOCK, dst.len());
        dst.fill(0.0);
        let mut squares = Vec::with_capacity(g);
        for row in t.chunks(n) {
            let row = &row[start..start + len];
            for (s, &v) in dst.iter_mut().zip(row) {
                *s += v;
            }
            squares.push(square_sum(row));
        }
        parts.lock().unwrap_or_else(|e| e.into_inner())[c] = squares;
    });
    for v in mean.iter_mut() {
        *v /= g as f32;
    }
    let parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    let squares = (0..g)
        .map(|r| parts.iter().map(|p| p[r]).sum::<f64>() as f32)
        .collect();
    (mean, squares)
}

/// `Σ_g w_g t[g, c]` `[n]` for `t` `[G, n]` and weights `w` `[G]`: a
/// weighted sum of group gradients in one read of `t`, spread over the
/// threads by blocks of columns, each block's rows added in order.
pub fn weighted_row_sum(t: &[f32], w: &[f32]) -> Vec<f32> {
    assert!(!w.is_empty() && !t.is_empty(), "rows of t");
    assert!(t.len().is_multiple_of(w.len()), "one weight per row of t");
    fold_rows(t, t.len() / w.len(), |dst, row, _, g| {
        let w = w[g];
        for (s, &v) in dst.iter_mut().zip(row) {
            *s += w * v;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the triple loop in f64, with more groups than threads (3,
    /// not dividing them evenly) and with one group (the product itself
    /// in parallel): float32 sums of 7 terms round at about 1e-6.
    #[test]
    fn group_products_match_the_triple_loop() {
        for groups in [3, 1] {
            check_group_products(groups);
        }
    }

    /// The summed products against the sum of the group products (same
    /// f32 values added in another order: 1e-5 relative), and the centered
    /// sum against its f64 loop over more columns than one block, so that
    /// the blocks' borders are crossed.
    #[test]
    fn summed_groups_and_centered_squares_match_their_loops() {
        let (groups, rows, i, o) = (3, 4, 70, 65);
        let a: Vec<f32> = (0..groups * rows * i)
            .map(|k| ((k * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let d: Vec<f32> = (0..groups * rows * o)
            .map(|k| ((k * 13 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let (each, sum) = group_outer_summed(&a, &d, rows, i, o);
        assert_eq!(each, group_outer(&a, &d, rows, i, o));
        for k in 0..i * o {
            let want: f64 = (0..groups).map(|g| each[g * i * o + k] as f64).sum();
            let v = sum[k] as f64;
            assert!(
                (v - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{k}: {v} vs {want}"
            );
        }
        let n = i * o;
        let m: Vec<f32> = (0..n).map(|k| ((k * 7 % 5) as f32 - 2.0) / 4.0).collect();
        let c = centered_square_sum(&each, &m);
        for k in 0..n {
            let want: f64 = (0..groups)
                .map(|g| (each[g * n + k] as f64 - m[k] as f64).powi(2))
                .sum();
            let v = c[k] as f64;
            assert!(
                (v - want).abs() <= 1e-5 * want.max(1.0),
                "{k}: {v} vs {want}"
            );
        }
    }

    /// The fused sum and centered sum of squares against both computed in
    /// f64 from the group products, for more groups than threads (uneven
    /// split, merged) and one group (its centered sum is 0). The products
    /// carry a common offset so that the centered sum is about 1e-4 of
    /// the squared mean (the cancellation Welford's update avoids: a raw
    /// `Σ t² - G t̄²` in float32 loses about 1e-7 of the squares per term):
    /// float32 rounding of the updates, at most 2e-6 of the squared mean,
    /// about a hundredth of the centered sum itself, which a missing or
    /// doubled term changes by a fifth or more.
    #[test]
    fn fused_group_moments_match_the_group_products() {
        for groups in [5, 1] {
            let (rows, i, o) = (7, 9, 11);
            let a: Vec<f32> = (0..groups * rows * i)
                .map(|k| 3.0 + ((k * 37 % 11) as f32 - 5.0) / 30.0)
                .collect();
            let d: Vec<f32> = (0..groups * rows * o)
                .map(|k| 2.0 + ((k * 13 % 7) as f32 - 3.0) / 20.0)
                .collect();
            let each = group_outer(&a, &d, rows, i, o);
            let (sum, m2) = group_outer_moments(&a, &d, rows, i, o);
            let n = i * o;
            for k in 0..n {
                let col: Vec<f64> = (0..groups).map(|g| each[g * n + k] as f64).collect();
                let s: f64 = col.iter().sum();
                let mean = s / groups as f64;
                let q: f64 = col.iter().map(|v| (v - mean).powi(2)).sum();
                assert!(
                    (sum[k] as f64 - s).abs() <= 1e-5 * s.abs(),
                    "{k}: {} vs {s}",
                    sum[k]
                );
                let scale = mean * mean;
                assert!(
                    (m2[k] as f64 - q).abs() <= 2e-6 * scale,
                    "{k}: {} vs {q}",
                    m2[k]
                );
                if groups > 1 {
                    assert!(q > 2e-5 * scale, "the groups differ: {q}");
                }
            }
        }
    }

    fn check_group_products(groups: usize) {
        let (rows, i, o) = (7, 5, 4);
        let a: Vec<f32> = (0..groups * rows * i)
            .map(|k| ((k * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let d: Vec<f32> = (0..groups * rows * o)
            .map(|k| ((k * 13 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let got = group_outer(&a, &d, rows, i, o);
        for g in 0..groups {
            for j in 0..i {
                for c in 0..o {
                    let want: f64 = (0..rows)
                        .map(|n| {
                            let r = g * rows + n;
                            a[r * i + j] as f64 * d[r * o + c] as f64
                        })
                        .sum();
                    let v = got[(g * i + j) * o + c] as f64;
                    assert!(
                        (v - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{g} {j} {c}: {v} vs {want}"
                    );
                }
            }
        }
    }

    /// Against the f64 loop `Σ_n a[n, j]² d[n, c]²`, with more values of
    /// `a` than one block of squares (their blocks' borders crossed) and a
    /// one-row case. All terms are positive, so float32's rounding is at
    /// most `r` units in the last place of the sum: 2e-5 relative for 300
    /// rows.
    #[test]
    fn squared_outer_matches_its_loop() {
        for (r, i, o) in [(300, 250, 33), (1, 5, 4)] {
            let a: Vec<f32> = (0..r * i)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let d: Vec<f32> = (0..r * o)
                .map(|k| ((k * 13 % 29) as f32 - 14.0) / 5.0)
                .collect();
            let got = squared_outer(&a, &d, r, i, o);
            assert_eq!(got.len(), i * o);
            for j in 0..i {
                for c in 0..o {
                    let want: f64 = (0..r)
                        .map(|n| (a[n * i + j] as f64).powi(2) * (d[n * o + c] as f64).powi(2))
                        .sum();
                    let v = got[j * o + c] as f64;
                    assert!(
                        (v - want).abs() <= 2e-5 * want.max(1e-30),
                        "{r}x{i}x{o} ({j}, {c}): {v} vs {want}"
                    );
                }
            }
        }
    }

    /// Against the f64 loop, over more columns than one block (the blocks'
    /// borders crossed) and a small case; float32 sums of at most 300
    /// positive terms: 2e-5 relative.
    #[test]
    fn column_square_sums_match_their_loop() {
        for (r, n) in [(300, 5000), (7, 3)] {
            let t: Vec<f32> = (0..r * n)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let got = column_square_sums(&t, n);
            assert_eq!(got.len(), n);
            for (c, &v) in got.iter().enumerate() {
                let want: f64 = (0..r).map(|k| (t[k * n + c] as f64).powi(2)).sum();
                assert!(
                    (v as f64 - want).abs() <= 2e-5 * want.max(1e-30),
                    "column {c} of {r}x{n}: {v} vs {want}"
                );
            }
        }
    }

    /// Each row's sum of squares against its f64 loop, for rows whose
    /// length is and is not a multiple of the eight lanes, and for one
    /// row: f64 sums of float32 squares, rounded once to f32 (1e-6).
    #[test]
    fn row_square_sums_match_their_loop() {
        for (g, n) in [(5, 1003), (3, 64), (1, 7)] {
            let t: Vec<f32> = (0..g * n)
                .map(|k| ((k * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let got = row_square_sums(&t, n);
            assert_eq!(got.len(), g);
            for (r, &v) in got.iter().enumerate() {
                let want: f64 = t[r * n..][..n].iter().map(|&x| x as f64 * x as f64).sum();
                assert!(
                    (v as f64 - want).abs() <= 1e-6 * want,
                    "row {r} of {g}x{n}: {v} vs {want}"
                );
            }
        }
    }

    /// The fused mean and squares against the two kernels they fuse: the
    /// same sums in the same order for the mean (bit for bit), and the
    /// squares to f64 rounding (blocks of columns added in another order
    /// than one row's lanes: 1e-6 relative), over more columns than one
    /// block, with one row and with one column.
    #[test]
    fn fused_row_mean_and_squares_match_the_two_kernels() {
        for (g, n) in [(5, 2 * SUM_BLOCK + 37), (1, SUM_BLOCK + 1), (7, 1)] {
            let t: Vec<f32> = (0..g * n)
                .map(|k| ((k * 31 % 103) as f32 - 51.0) / 9.0)
                .collect();
            let (mean, squares) = row_mean_and_square_sums(&t, n);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&mean), bits(&row_mean(&t, n)), "{g}x{n} mean");
            let want = row_square_sums(&t, n);
            assert_eq!(squares.len(), g);
            for (r, (&v, &w)) in squares.iter().zip(&want).enumerate() {
                assert!(
                    (v as f64 - w as f64).abs() <= 1e-6 * w as f64,
                    "row {r} of {g}x{n}: {v} vs {w}"
                );
            }
        }
    }

    /// The row-split product against an f64 loop, on pools of 2 and 3
    /// threads (blocks of 160 and 112 rows, the last one shorter) and one
    /// (`gemm` alone), with the left operand read transposed as a weight
    /// gradient reads it: float32 sums of 400 products round at most at
    /// 400 ulp of the sum of their magnitudes, 3e-5 of it bounds that.
    #[test]
    fn long_inner_product_matches_its_loop() {
        let (m, n, k) = (300, 70, 400);
        assert!(m * n * k >= PARALLEL_PRODUCT, "the split path runs");
        let x: Vec<f32> = (0..k * m)
            .map(|v| ((v * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let dy: Vec<f32> = (0..k * n)
            .map(|v| ((v * 53 % 89) as f32 - 44.0) / 7.0)
            .collect();
        for threads in [2, 3, 1] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let got = pool.install(|| long_inner_product([m, n, k], &x, [1, m], &dy, [n, 1]));
            assert_eq!(got.len(), m * n);
            for j in 0..m {
                for c in 0..n {
                    let terms = (0..k).map(|r| x[r * m + j] as f64 * dy[r * n + c] as f64);
                    let (want, size) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let v = got[j * n + c] as f64;
                    assert!(
                        (v - want).abs() <= 3e-5 * size,
                        "{threads} threads, ({j}, {c}): {v} vs {want}"
                    );
                }
            }
        }
    }

    /// The rows' mean and their weighted sum (with a zero and a negative
    /// weight) against one f64 loop, over more columns than one block:
    /// float32 sums of 5 terms round at most at 5 ulp of the sum of their
    /// magnitudes, 1e-6 of it bounds that.
    #[test]
    fn row_mean_and_weighted_row_sum_match_their_loop() {
        let (g, n) = (5, SUM_BLOCK + 37);
        let t: Vec<f32> = (0..g * n)
            .map(|k| ((k * 29 % 97) as f32 - 48.0) / 5.0)
            .collect();
        let w = [0.5f32, -2.0, 0.0, 3.25, 1.0];
        let mean = [1.0 / g as f64; 5];
        let weighted = w.map(|v| v as f64);
        for (got, w) in [
            (row_mean(&t, n), mean),
            (weighted_row_sum(&t, &w), weighted),
        ] {
            assert_eq!(got.len(), n);
            for (c, &v) in got.iter().enumerate() {
                let terms = (0..g).map(|r| w[r] * t[r * n + c] as f64);
                let (want, size) = terms.fold((0.0, 0.0), |(s, a), x| (s + x, a + x.abs()));
                assert!(
                    (v as f64 - want).abs() <= 1e-6 * size,
                    "column {c}: {v} vs {want}"
                );
            }
        }
    }
}
