//! The weight gradients of a Linear layer for consecutive groups of
//! examples (micro-batch gradients): `a_gᵀ δ_g` per group, on host `f32`
//! slices.
//!
//! Each group's product has only the group's rows as its inner dimension
//! (128 for 32 micro-batches of a batch of 4,096): one gemm per group on
//! one thread, the groups spread over the threads. On the MLP's first
//! layer (784 x 512, 32 groups of 128 rows, 2 threads) that ran in 36 ms
//! where burn's batched matmul took 58 ms and one multi-threaded product
//! per group 94 ms; the whole batch's single product (4,096 terms per
//! output) takes about 20 ms: short inner dimensions and 32 outputs of the
//! weight's size cost gemm about half its speed.

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::matmul;
use super::output_buffer;

/// `[G, i, o]`: for each of the G consecutive groups of `rows` rows of `a`
/// `[G rows, i]` and `d` `[G rows, o]` (row-major), `a_gᵀ d_g`.
pub fn group_outer(a: &[f32], d: &[f32], rows: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(rows > 0 && i > 0 && o > 0, "non-empty groups and layers");
    assert!(a.len().is_multiple_of(rows * i), "whole groups of rows");
    let groups = a.len() / (rows * i);
    assert_eq!(d.len(), groups * rows * o, "as many rows of d as of a");
    let mut out = output_buffer(groups * i * o);
    let product = |g: usize, dst: &mut [f32], par: Parallelism| {
        let a_g = &a[g * rows * i..][..rows * i];
        let d_g = &d[g * rows * o..][..rows * o];
        // a_gᵀ is [i, rows]: element (j, n) sits at n i + j.
        matmul([i, o, rows], dst, o, false, a_g, [1, i], d_g, [o, 1], par);
    };
    if groups >= rayon::current_num_threads() {
        out.par_chunks_mut(i * o)
            .enumerate()
            .for_each(|(g, dst)| product(g, dst, Parallelism::None));
    } else {
        // Fewer groups than threads: each product runs on all of them.
        for (g, dst) in out.chunks_mut(i * o).enumerate() {
            product(g, dst, Parallelism::Rayon(0));
        }
    }
    out
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
}
