//! Batch normalization in training mode on host `f32` slices `[B, C, S]`
//! (S positions per channel), over consecutive groups of examples, in
//! PyTorch's semantics: biased batch variance in the normalization, `eps`
//! inside the square root.
//!
//! Forward is one statistics pass and one normalizing pass; backward is one
//! pass for the two sums per group and channel and one for the input
//! gradient. Sums are accumulated in `f64` lanes (and the statistics from
//! data shifted by one of their own values), so that they do not lose the
//! digits a one-pass variance would otherwise lose to cancellation.

use rayon::prelude::*;

use super::{output_buffer, output_items, simd};

/// The layout of a batch-norm input: `batch` examples of `channels`
/// channels with `spatial` positions each, normalized over `groups`
/// consecutive groups of `batch / groups` examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// Examples.
    pub batch: usize,
    /// Channels (features).
    pub channels: usize,
    /// Positions per channel (`H W` for images, 1 for feature vectors).
    pub spatial: usize,
    /// Normalization groups (1: the whole batch); divides `batch`.
    pub groups: usize,
}

impl NormShape {
    /// Examples per group.
    fn group_size(&self) -> usize {
        self.batch / self.groups
    }

    /// Values normalized together (examples per group times positions).
    pub fn count(&self) -> usize {
        self.group_size() * self.spatial
    }

    /// Values per example.
    fn example_len(&self) -> usize {
        self.channels * self.spatial
    }
}

/// Batch statistics and the normalized output of one forward pass.
#[derive(Debug, Clone)]
pub struct NormForward {
    /// The output `[B, C, S]`.
    pub output: Vec<f32>,
    /// Per group and channel `[groups, C]`: the mean.
    pub mean: Vec<f32>,
    /// The mean's rounding residual, `mean_f64 - mean` (values far from 0
    /// would otherwise lose the last digits of `x - mean`).
    pub mean_lo: Vec<f32>,
    /// Per group and channel: the biased variance.
    pub var: Vec<f32>,
    /// Per group and channel: `1 / sqrt(var + eps)`.
    pub inv_std: Vec<f32>,
}

/// Sums over the examples in the task's range, per group and channel, of
/// the two per-plane sums `plane` returns; one accumulator pair per task.
fn group_sums<F>(s: &NormShape, plane: F) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(usize, usize) -> (f64, f64) + Sync,
{
    let gc = s.groups * s.channels;
    let threads = rayon::current_num_threads().max(1);
    let per_task = s.batch.div_ceil(threads.min(s.batch).max(1));
    let firsts: Vec<usize> = (0..s.batch).step_by(per_task.max(1)).collect();
    let parts: Vec<(Vec<f64>, Vec<f64>)> = firsts
        .into_par_iter()
        .map(|first| {
            let (mut a, mut b) = (vec![0.0f64; gc], vec![0.0f64; gc]);
            for n in first..(first + per_task).min(s.batch) {
                let g = n / s.group_size();
                for c in 0..s.channels {
                    let (pa, pb) = plane(n, c);
                    a[g * s.channels + c] += pa;
                    b[g * s.channels + c] += pb;
                }
            }
            (a, b)
        })
        .collect();
    let mut a = vec![0.0f64; gc];
    let mut b = vec![0.0f64; gc];
    for (pa, pb) in &parts {
        for i in 0..gc {
            a[i] += pa[i];
            b[i] += pb[i];
        }
    }
    (a, b)
}

/// Where group `i / C`'s channel `i % C` finds its scale and shift: one
/// `[C]` for all groups, or one per group, `[groups, C]`.
fn affine_index(s: &NormShape, len: usize) -> impl Fn(usize) -> usize {
    let (c, gc) = (s.channels, s.groups * s.channels);
    assert!(
        len == c || len == gc,
        "a scale and shift of {len} values for {c} channels in {} groups",
        s.groups
    );
    move |i| if len == gc { i } else { i % c }
}

/// Normalizes `x` `[B, C, S]` per group and channel and scales by `gamma`,
/// shifts by `beta` (`[C]` each, or `[groups, C]`: a scale and shift per
/// normalization group).
pub fn forward(s: &NormShape, x: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> NormForward {
    let (c, sp, per) = (s.channels, s.spatial, s.example_len());
    assert!(s.groups >= 1 && s.batch.is_multiple_of(s.groups));
    assert_eq!(x.len(), s.batch * per);
    assert_eq!(gamma.len(), beta.len(), "as many shifts as scales");
    let at = affine_index(s, gamma.len());
    // The shift: the first value of each group's channel, so that the sums
    // are of deviations of the order of the spread, not of the mean.
    let shift = |g: usize, ch: usize| x[g * s.group_size() * per + ch * sp] as f64;
    let (s1, s2) = group_sums(s, |n, ch| {
        let k = shift(n / s.group_size(), ch);
        simd::shifted_sums(&x[n * per + ch * sp..][..sp], k)
    });
    let count = s.count() as f64;
    let gc = s.groups * c;
    let (mut mean, mut var, mut inv_std) =
        (output_buffer(gc), output_buffer(gc), output_buffer(gc));
    let mut mean_lo = output_buffer(gc);
    for i in 0..gc {
        let (m1, m2) = (s1[i] / count, s2[i] / count);
        let v = (m2 - m1 * m1).max(0.0);
        let m = shift(i / c, i % c) + m1;
        mean[i] = m as f32;
        mean_lo[i] = (m - mean[i] as f64) as f32;
        var[i] = v as f32;
        inv_std[i] = (1.0 / (v + eps).sqrt()) as f32;
    }
    let output = output_items(s.batch * per, per, 1, true, |n, y| {
        let x = &x[n * per..][..per];
        let g = n / s.group_size();
        for ch in 0..c {
            let i = g * c + ch;
            let (m, lo) = (mean[i], mean_lo[i]);
            let (a, b) = (gamma[at(i)] * inv_std[i], beta[at(i)]);
            let (y, x) = (&mut y[ch * sp..][..sp], &x[ch * sp..][..sp]);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = ((x - m) - lo) * a + b;
            }
        }
    });
    NormForward {
        output,
        mean,
        mean_lo,
        var,
        inv_std,
    }
}

/// The gradients [`backward`] forms.
#[derive(Debug, Clone)]
pub struct NormGrads {
    /// With respect to the input, `[B, C, S]`.
    pub dx: Vec<f32>,
    /// With respect to the scale, `[C]`.
    pub dgamma: Vec<f32>,
    /// With respect to the shift, `[C]`.
    pub dbeta: Vec<f32>,
    /// The scale's gradient summed over each normalization group's
    /// examples alone, `Σ dy x̂` per group and channel, `[groups, C]`.
    pub group_dgamma: Vec<f32>,
    /// The shift's likewise, `Σ dy`, `[groups, C]`.
    pub group_dbeta: Vec<f32>,
}

/// Gradients of the batch-norm output `dy` `[B, C, S]` with respect to the
/// input, the scale and the shift (also per normalization group, which is
/// the gradient of a scale and shift given per group), from the
/// forward pass's input and its per-group `mean` (with its residual
/// `mean_lo`) and `inv_std`.
pub fn backward(
    s: &NormShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    [mean, mean_lo]: [&[f32]; 2],
    inv_std: &[f32],
) -> NormGrads {
    let (c, sp, per) = (s.channels, s.spatial, s.example_len());
    assert_eq!(x.len(), s.batch * per);
    assert_eq!(dy.len(), s.batch * per);
    let gc = s.groups * c;
    assert_eq!((mean.len(), inv_std.len()), (gc, gc));
    let at = affine_index(s, gamma.len());
    // Per group and channel: Σ dy and Σ dy (x - mean).
    let (sum_dy, sum_dy_xc) = group_sums(s, |n, ch| {
        let i = (n / s.group_size()) * c + ch;
        let m = mean[i] as f64 + mean_lo[i] as f64;
        let (x, dy) = (
            &x[n * per + ch * sp..][..sp],
            &dy[n * per + ch * sp..][..sp],
        );
        simd::gradient_sums(x, dy, m)
    });
    let (mut dgamma, mut dbeta) = (output_buffer(c), output_buffer(c));
    for ch in 0..c {
        let groups = (0..s.groups).map(|g| g * c + ch);
        dbeta[ch] = groups.clone().map(|i| sum_dy[i]).sum::<f64>() as f32;
        dgamma[ch] = groups
            .map(|i| sum_dy_xc[i] * inv_std[i] as f64)
            .sum::<f64>() as f32;
    }
    // dx = gamma inv_std (dy - mean(dy) - x̂ mean(dy x̂)), x̂ = (x - mean) inv_std.
    let count = s.count() as f64;
    let coefficients: Vec<(f32, f32, f32)> = (0..gc)
        .map(|i| {
            let is = inv_std[i] as f64;
            let a = gamma[at(i)] as f64 * is;
            let mean_dy = sum_dy[i] / count;
            let mean_dy_xhat = sum_dy_xc[i] * is / count;
            (a as f32, mean_dy as f32, (-a * is * mean_dy_xhat) as f32)
        })
        .collect();
    let dx = output_items(s.batch * per, per, 1, true, |n, dx| {
        let (x, dy) = (&x[n * per..][..per], &dy[n * per..][..per]);
        let g = n / s.group_size();
        for ch in 0..c {
            let i = g * c + ch;
            let (a, mean_dy, b) = coefficients[i];
            let (m, lo) = (mean[i], mean_lo[i]);
            let dx = &mut dx[ch * sp..][..sp];
            let (x, dy) = (&x[ch * sp..][..sp], &dy[ch * sp..][..sp]);
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                *dx = a * (dy - mean_dy) + b * ((x - m) - lo);
            }
        }
    });
    NormGrads {
        dx,
        dgamma,
        dbeta,
        group_dgamma: (0..gc)
            .map(|i| (sum_dy_xc[i] * inv_std[i] as f64) as f32)
            .collect(),
        group_dbeta: sum_dy.iter().map(|&v| v as f32).collect(),
    }
}
