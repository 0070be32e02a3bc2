//! Batch norm's sums in `f64`, with an AVX2 twin chosen at run time.
//!
//! The crate is built for baseline x86-64, and there LLVM compiles these
//! sums (eight `f64` lanes each) one value at a time: `cvtss2sd`, `subsd`,
//! `addsd`. They were 14 % of ResNet-20's step at batch 128. Where the CPU
//! has AVX2 (checked once, cached by the standard library) the same lanes
//! run as two vectors of four `f64`. The operations per lane and their
//! order are the scalar code's (a multiply and an add are not fused, the
//! lanes are added in order at the end), so the two paths give the same
//! bits; the tests check that.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX2 paths run on this CPU.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// `Σ (v - k)` and `Σ (v - k)²` over `v`, in eight `f64` lanes (value
/// `8j + l` into lane l, a remainder of fewer than eight values into lane
/// 0), the lanes added in order at the end.
pub(crate) fn shifted_sums(v: &[f32], k: f64) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { shifted_sums_avx2(v, k) };
    }
    shifted_sums_portable(v, k)
}

/// `Σ dy` and `Σ dy (x - m)` over `x` and `dy` of one length, in eight
/// `f64` lanes as [`shifted_sums`].
///
/// # Panics
/// If `x` and `dy` differ in length.
pub(crate) fn gradient_sums(x: &[f32], dy: &[f32], m: f64) -> (f64, f64) {
    assert_eq!(x.len(), dy.len(), "an output gradient per input");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2, and the lengths were checked.
        return unsafe { gradient_sums_avx2(x, dy, m) };
    }
    gradient_sums_portable(x, dy, m)
}

/// The lanes of the two sums, and a remainder added into lane 0 by
/// `add(a0, b0, i)` for each remaining index i, summed in order.
#[inline(always)]
fn finish(
    (mut a, mut b): ([f64; 8], [f64; 8]),
    rest: std::ops::Range<usize>,
    add: impl Fn(usize) -> (f64, f64),
) -> (f64, f64) {
    for i in rest {
        let (x, y) = add(i);
        a[0] += x;
        b[0] += y;
    }
    (a.iter().sum(), b.iter().sum())
}

/// One value's terms of [`shifted_sums`]: `(v - k, (v - k)²)`.
#[inline(always)]
fn shifted_terms(v: f32, k: f64) -> (f64, f64) {
    let d = v as f64 - k;
    (d, d * d)
}

/// One value's terms of [`gradient_sums`]: `(dy, dy (x - m))`.
#[inline(always)]
fn gradient_terms(x: f32, dy: f32, m: f64) -> (f64, f64) {
    let g = dy as f64;
    (g, g * (x as f64 - m))
}

fn shifted_sums_portable(v: &[f32], k: f64) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; 8], [0.0f64; 8]);
    let full = v.len() / 8 * 8;
    for block in v[..full].chunks_exact(8) {
        for l in 0..8 {
            let (d, d2) = shifted_terms(block[l], k);
            a[l] += d;
            b[l] += d2;
        }
    }
    finish((a, b), full..v.len(), |i| shifted_terms(v[i], k))
}

fn gradient_sums_portable(x: &[f32], dy: &[f32], m: f64) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f64; 8], [0.0f64; 8]);
    let full = x.len() / 8 * 8;
    for (x, d) in x[..full].chunks_exact(8).zip(dy[..full].chunks_exact(8)) {
        for l in 0..8 {
            let (g, gx) = gradient_terms(x[l], d[l], m);
            a[l] += g;
            b[l] += gx;
        }
    }
    finish((a, b), full..x.len(), |i| gradient_terms(x[i], dy[i], m))
}

/// Eight `f32` at `p` as two vectors of four `f64` (lanes 0-3, 4-7).
///
/// # Safety
/// Eight values must be readable at `p`, on a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn load8(p: *const f32) -> (__m256d, __m256d) {
    // SAFETY: the caller guarantees eight readable values.
    let x = unsafe { _mm256_loadu_ps(p) };
    (
        _mm256_cvtps_pd(_mm256_castps256_ps128(x)),
        _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)),
    )
}

/// Two vectors of four `f64` as the eight lanes they hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lanes(lo: __m256d, hi: __m256d) -> [f64; 8] {
    let mut out = [0.0f64; 8];
    // SAFETY: `out` holds eight values, four at 0 and four at 4.
    unsafe {
        _mm256_storeu_pd(out.as_mut_ptr(), lo);
        _mm256_storeu_pd(out.as_mut_ptr().add(4), hi);
    }
    out
}

/// [`shifted_sums_portable`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn shifted_sums_avx2(v: &[f32], k: f64) -> (f64, f64) {
    let kk = _mm256_set1_pd(k);
    let zero = _mm256_setzero_pd();
    let (mut a0, mut a1, mut b0, mut b1) = (zero, zero, zero, zero);
    let full = v.len() / 8 * 8;
    for block in v[..full].chunks_exact(8) {
        // SAFETY: a block holds eight values.
        let (x0, x1) = unsafe { load8(block.as_ptr()) };
        let (d0, d1) = (_mm256_sub_pd(x0, kk), _mm256_sub_pd(x1, kk));
        a0 = _mm256_add_pd(a0, d0);
        a1 = _mm256_add_pd(a1, d1);
        b0 = _mm256_add_pd(b0, _mm256_mul_pd(d0, d0));
        b1 = _mm256_add_pd(b1, _mm256_mul_pd(d1, d1));
    }
    finish((lanes(a0, a1), lanes(b0, b1)), full..v.len(), |i| {
        shifted_terms(v[i], k)
    })
}

/// [`gradient_sums_portable`] on AVX2.
///
/// # Safety
/// The CPU must have AVX2; `x` and `dy` must be of one length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gradient_sums_avx2(x: &[f32], dy: &[f32], m: f64) -> (f64, f64) {
    let mm = _mm256_set1_pd(m);
    let zero = _mm256_setzero_pd();
    let (mut a0, mut a1, mut b0, mut b1) = (zero, zero, zero, zero);
    let full = x.len() / 8 * 8;
    for (xb, db) in x[..full].chunks_exact(8).zip(dy[..full].chunks_exact(8)) {
        // SAFETY: a block holds eight values.
        let ((x0, x1), (g0, g1)) = unsafe { (load8(xb.as_ptr()), load8(db.as_ptr())) };
        a0 = _mm256_add_pd(a0, g0);
        a1 = _mm256_add_pd(a1, g1);
        b0 = _mm256_add_pd(b0, _mm256_mul_pd(g0, _mm256_sub_pd(x0, mm)));
        b1 = _mm256_add_pd(b1, _mm256_mul_pd(g1, _mm256_sub_pd(x1, mm)));
    }
    finish((lanes(a0, a1), lanes(b0, b1)), full..x.len(), |i| {
        gradient_terms(x[i], dy[i], m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sums against an f64 loop (the same lanes in the same order:
    /// equal bits), over lengths with and without a remainder, empty,
    /// and with values far from the shift; the dispatched path (AVX2 where
    /// this CPU has it) equal to the portable one bit for bit.
    #[test]
    fn sums_match_their_lanes_bit_for_bit() {
        for len in [0usize, 3, 8, 13, 64, 1029] {
            let v: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 400.0) * 0.0137 + 3.0e3)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 11.0)
                .collect();
            let (k, m) = (v.first().map_or(0.0, |&x| x as f64), 2999.5);
            let mut want = ([0.0f64; 8], [0.0f64; 8]);
            let mut grad = ([0.0f64; 8], [0.0f64; 8]);
            for i in 0..len {
                let l = if i < len / 8 * 8 { i % 8 } else { 0 };
                let d = v[i] as f64 - k;
                want.0[l] += d;
                want.1[l] += d * d;
                let g = dy[i] as f64;
                grad.0[l] += g;
                grad.1[l] += g * (v[i] as f64 - m);
            }
            let sum = |a: [f64; 8]| a.iter().sum::<f64>().to_bits();
            let bits = |(a, b): (f64, f64)| (a.to_bits(), b.to_bits());
            let want = (sum(want.0), sum(want.1));
            let grad = (sum(grad.0), sum(grad.1));
            assert_eq!(bits(shifted_sums_portable(&v, k)), want, "len {len}");
            assert_eq!(bits(shifted_sums(&v, k)), want, "len {len}");
            assert_eq!(bits(gradient_sums_portable(&v, &dy, m)), grad, "len {len}");
            assert_eq!(bits(gradient_sums(&v, &dy, m)), grad, "len {len}");
        }
    }
}
