//! Counter-based randomness: every random number covnoise draws during
//! training is a pure function of `(seed, step, stream)`.
//!
//! A fresh ChaCha8 generator is keyed from those three numbers (and, for long
//! vectors, the chunk index), so the noise at step `t` does not depend on how
//! many steps were drawn before, on the number of threads, or on the number of
//! processes: data-parallel replicas that share the seed draw identical noise
//! without communicating.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

/// Elements per independently keyed chunk of a long normal vector. Chunks are
/// filled in parallel; their keys, not the thread schedule, fix the values.
const CHUNK: usize = 1 << 15;

/// Stream tags separate the uses of randomness so that, for example, the
/// multiplicative weights of `full` noise never reuse the numbers of a
/// parameter's `diag` noise. Parameter `p` uses stream `p`.
pub mod stream {
    /// Per-example weights z_i of the multiplicative (`full`) sampler.
    pub const FULL_WEIGHTS: u64 = 1 << 40;
    /// Labels sampled from the model for the Monte-Carlo Fisher.
    pub const MC_LABELS: u64 = 2 << 40;
    /// Labels sampled from the model for the Fisher-trace penalty.
    pub const PENALTY_LABELS: u64 = 3 << 40;
    /// The Bernoulli weights of the `bernoulli` structure.
    pub const BERNOULLI_WEIGHTS: u64 = 4 << 40;
    /// The subset, and its weights, of the `subset` structure.
    pub const SUBSET_WEIGHTS: u64 = 5 << 40;
    /// The normals of the `constant` structure (a stream of its own, so
    /// that it never shares numbers with `diag` noise of the same step).
    pub const CONSTANT_NOISE: u64 = 6 << 40;
}

/// SplitMix64 finalizer: a bijective mixer with good avalanche, used to turn
/// structured counters into well-spread key material.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator keyed by `(seed, step, stream, chunk)`.
///
/// The key words are chained (each hashes the previous one with the next
/// counter), so swapping two counters gives an unrelated key.
pub fn keyed_rng(seed: u64, step: u64, stream: u64, chunk: u64) -> ChaCha8Rng {
    let k0 = splitmix64(seed);
    let k1 = splitmix64(k0 ^ step);
    let k2 = splitmix64(k1 ^ stream);
    let k3 = splitmix64(k2 ^ chunk);
    let mut key = [0u8; 32];
    for (i, w) in [k0, k1, k2, k3].iter().enumerate() {
        key[i * 8..(i + 1) * 8].copy_from_slice(&w.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Fills `out` with independent standard normals determined by
/// `(seed, step, stream)` alone.
pub fn fill_normals(seed: u64, step: u64, stream: u64, out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = keyed_rng(seed, step, stream, chunk as u64);
            for v in values.iter_mut() {
                *v = rng.sample(StandardNormal);
            }
        });
}

/// Returns `n` standard normals determined by `(seed, step, stream)`.
pub fn normals(seed: u64, step: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    fill_normals(seed, step, stream, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_numbers_other_key_other_numbers() {
        let a = normals(7, 3, 1, 100_000);
        let b = normals(7, 3, 1, 100_000);
        assert_eq!(a, b);
        assert_ne!(a, normals(8, 3, 1, 100_000));
        assert_ne!(a, normals(7, 4, 1, 100_000));
        assert_ne!(a, normals(7, 3, 2, 100_000));
        // Swapping step and stream must not collide.
        assert_ne!(normals(7, 1, 3, 1000), normals(7, 3, 1, 1000));
    }

    #[test]
    fn prefix_does_not_depend_on_length() {
        // Replicas holding differently sized buffers still agree on the overlap.
        let long = normals(1, 2, 3, 3 * CHUNK + 5);
        let short = normals(1, 2, 3, CHUNK + 1);
        assert_eq!(&long[..CHUNK + 1], &short[..]);
    }

    #[test]
    fn thread_count_does_not_change_values() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| normals(5, 9, 0, 4 * CHUNK));
        let many = normals(5, 9, 0, 4 * CHUNK);
        assert_eq!(one, many);
    }

    #[test]
    fn moments_are_standard_normal() {
        // 200k draws: the standard error of the mean is 1/sqrt(n) ~ 0.0022 and
        // of the variance sqrt(2/n) ~ 0.0032; 5 standard errors bound both.
        let v = normals(11, 0, 0, 200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "var {var}");
    }
}
