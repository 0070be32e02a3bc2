//! Small seeded data sets, so tests never need the real files.
//!
//! Randomness comes from ChaCha8 keyed like the shuffler (SplitMix64 from the
//! seed xor a domain constant) and Gaussians from the Box–Muller transform,
//! written out here rather than taken from `rand_distr`, so the data for a
//! seed never changes with a dependency's version.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::batch::{splitmix64, uniform_below};
use super::error::DataError;
use super::idx::RawImages;
use super::memory::Dataset;

/// Mixed into the seed for synthetic data ("SYNTHDAT" in ASCII), so synthetic
/// data and the shuffler never share a stream for the same seed.
const SYNTHETIC_DOMAIN: u64 = 0x5359_4e54_4844_4154;

fn rng_for(seed: u64) -> ChaCha8Rng {
    let mut state = seed ^ SYNTHETIC_DOMAIN;
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform draw in (0, 1]: 53 random bits, shifted off zero so `ln` is finite.
fn unit_open0(rng: &mut ChaCha8Rng) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw (Box–Muller, cosine branch only: simpler to pin
/// down than caching the sine branch).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let r = (-2.0 * unit_open0(rng).ln()).sqrt();
    let theta = std::f64::consts::TAU * unit_open0(rng);
    r * theta.cos()
}

fn check_classes(num_classes: usize) -> Result<(), DataError> {
    if !(1..=256).contains(&num_classes) {
        return Err(DataError::Invalid(format!(
            "num_classes {num_classes} is not in 1..=256"
        )));
    }
    Ok(())
}

/// Gaussian class clusters: `n` examples of dimension `dim` in `num_classes`
/// balanced classes (example `i` has label `i % num_classes`). Each class has
/// a centre with independent N(0, separation^2) coordinates, drawn first; an
/// example is its class centre plus N(0, I) noise. Features are not
/// standardized. The same arguments always give the same data set.
///
/// Fails when `dim` is 0 or `num_classes` is not in `1..=256`.
pub fn synthetic_clusters(
    n: usize,
    dim: usize,
    num_classes: usize,
    separation: f32,
    seed: u64,
) -> Result<Dataset, DataError> {
    check_classes(num_classes)?;
    let mut rng = rng_for(seed);
    let sep = f64::from(separation);
    let centres: Vec<f64> = (0..num_classes * dim)
        .map(|_| sep * normal(&mut rng))
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % num_classes) as u8).collect();
    let mut features = Vec::with_capacity(n * dim);
    for &l in &labels {
        let centre = &centres[usize::from(l) * dim..][..dim];
        features.extend(centre.iter().map(|&c| (c + normal(&mut rng)) as f32));
    }
    Dataset::new(features, labels, vec![dim], num_classes)
}

impl Dataset {
    /// Gaussian class clusters with unit separation, for examples and tests:
    /// [`synthetic_clusters`]`(n, dim, num_classes, 1.0, seed)`.
    ///
    /// # Panics
    /// If `dim` is 0 or `num_classes` is not in `1..=256`.
    pub fn synthetic(n: usize, dim: usize, num_classes: usize, seed: u64) -> Dataset {
        match synthetic_clusters(n, dim, num_classes, 1.0, seed) {
            Ok(ds) => ds,
            Err(e) => panic!("Dataset::synthetic: {e}"),
        }
    }
}

/// Learnable fake images: each class has a random template of bytes, and an
/// image is its class template with each pixel moved by a uniform offset in
/// -32..=32 (clamped to 0..=255). Labels are `i % num_classes`. Write them
/// with [`super::write_fashion_mnist_dir`] to make a stand-in Fashion-MNIST.
///
/// Fails when `num_classes` is not in `1..=256`.
pub fn synthetic_images(
    n: usize,
    rows: usize,
    cols: usize,
    num_classes: usize,
    seed: u64,
) -> Result<RawImages, DataError> {
    check_classes(num_classes)?;
    let mut rng = rng_for(seed);
    let size = rows * cols;
    let templates: Vec<u8> = (0..num_classes * size)
        .map(|_| uniform_below(&mut rng, 256) as u8)
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % num_classes) as u8).collect();
    let mut pixels = Vec::with_capacity(n * size);
    for &l in &labels {
        for &t in &templates[usize::from(l) * size..][..size] {
            let offset = uniform_below(&mut rng, 65) as i32 - 32;
            pixels.push((i32::from(t) + offset).clamp(0, 255) as u8);
        }
    }
    Ok(RawImages {
        n,
        rows,
        cols,
        pixels,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::super::batch::EpochShuffler;
    use super::*;

    #[test]
    fn clusters_deterministic_balanced_separated() {
        let a = synthetic_clusters(300, 5, 3, 4.0, 7).unwrap();
        assert_eq!(a, synthetic_clusters(300, 5, 3, 4.0, 7).unwrap());
        assert_ne!(a, synthetic_clusters(300, 5, 3, 4.0, 8).unwrap());
        assert_eq!(a.class_counts(), vec![100, 100, 100]);
        // Nearest-centroid accuracy on well-separated clusters is high.
        let mut means = [0.0f64; 15];
        for i in 0..a.n {
            let l = usize::from(a.labels[i]);
            for (m, &x) in means[l * 5..][..5].iter_mut().zip(a.example(i)) {
                *m += f64::from(x) / 100.0;
            }
        }
        let correct = (0..a.n)
            .filter(|&i| {
                let d = |k: usize| -> f64 {
                    a.example(i)
                        .iter()
                        .zip(&means[k * 5..][..5])
                        .map(|(&x, &m)| (f64::from(x) - m).powi(2))
                        .sum()
                };
                (0..3).all(|k| d(usize::from(a.labels[i])) <= d(k))
            })
            .count();
        assert!(correct > 270, "{correct}");
    }

    #[test]
    fn noise_is_standard_normal() {
        // separation 0: features are pure N(0, 1) noise.
        let ds = synthetic_clusters(20_000, 1, 1, 0.0, 3).unwrap();
        let n = ds.features.len() as f64;
        let mean = ds.features.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = ds
            .features
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        // Standard errors: 1/sqrt(n) = 0.007 for the mean, ~0.01 for the variance.
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }

    #[test]
    fn images_shape_and_labels() {
        let im = synthetic_images(25, 4, 3, 10, 1).unwrap();
        assert_eq!((im.pixels.len(), im.labels.len()), (300, 25));
        assert_eq!(im.labels[13], 3);
        assert!(synthetic_images(1, 1, 1, 0, 1).is_err());
        assert!(synthetic_clusters(1, 1, 300, 1.0, 1).is_err());
    }

    #[test]
    fn convenience_constructors() {
        let ds = Dataset::synthetic(10, 3, 2, 0);
        assert_eq!((ds.n, ds.dim, ds.shape.clone()), (10, 3, vec![3]));
        let batches: Vec<Vec<usize>> = ds.batches(4, 0, 1).into_iter().collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(
            batches.concat(),
            EpochShuffler::new(0).permutation(10, 1)[..8]
        );
    }

    #[test]
    #[should_panic(expected = "batch size 0")]
    fn batches_panics_on_zero() {
        let _ = Dataset::synthetic(10, 3, 2, 0).batches(0, 0, 0);
    }
}
