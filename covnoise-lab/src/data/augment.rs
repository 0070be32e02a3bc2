//! Training-time image augmentation: the standard CIFAR recipe, a random
//! crop with zero padding followed by a random horizontal flip (PyTorch's
//! `RandomCrop(32, padding=4)` then `RandomHorizontalFlip()`), applied to
//! features that are already standardized.
//!
//! Padding: PyTorch pads the raw image with black (byte 0) and normalizes
//! afterwards. Here features are standardized at load time, so the padding
//! of channel `c` is the standardized value of byte 0,
//! [`Standardization::fill_values`](super::Standardization::fill_values),
//! which is bit for bit what padding first and standardizing through the
//! lookup table would give.
//!
//! Randomness is a pure function of `(seed, epoch, index)`, where `index` is
//! the example's position in the data set (not in the batch, and not the
//! process rank), so a run is reproducible, resumable at any epoch, and the
//! same however its batches are sharded over processes. Exactly:
//!
//! - key: ChaCha8 keyed like the shuffler (four [`splitmix64`](super::splitmix64) outputs from
//!   `seed ^ AUGMENT_DOMAIN`, little-endian), stream `epoch`;
//! - example `index` reads the keystream from word `64 * index` on (its own
//!   4-block window, one buffer fill of the generator);
//! - `dy = uniform_below(2p + 1)`, then `dx = uniform_below(2p + 1)` with
//!   [`uniform_below`] and `p` the crop padding, then `flip` is the top bit
//!   of the next 64-bit draw. The flip draw is made even when flipping is
//!   off, so the offsets do not depend on that setting.
//!
//! An example uses 3 of the 32 draws in its window; it uses more only when
//! Lemire's method rejects, with probability below `(2p + 1) / 2^64` per
//! draw, so windows of different examples never overlap in practice.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;
use serde::{Deserialize, Serialize};

use super::batch::{domain_rng, uniform_below};
use super::error::DataError;
use super::memory::{Batch, Dataset};

/// Mixed into the run seed before it keys the augmentation generator
/// ("AUGMENT1" in ASCII), so it never shares a stream with the shuffler or
/// the noise generator for the same seed.
pub const AUGMENT_DOMAIN: u64 = 0x4155_474d_454e_5431;

/// Keystream words reserved for one example: 4 ChaCha blocks of 16 words.
const WORDS_PER_EXAMPLE: u128 = 64;

/// A random crop with zero padding, then optionally a random horizontal
/// flip, of images of shape `[C, H, W]` (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augmentation {
    /// Pixels of padding on each side before cropping back to `H x W`; the
    /// crop offsets are uniform in `0..=2 * crop_padding` on each axis. 0
    /// disables cropping.
    pub crop_padding: usize,
    /// Whether to flip left-right with probability 1/2.
    pub flip: bool,
}

/// The random choices for one example: the crop's top-left corner in the
/// padded image and whether the crop is then flipped left-right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugmentDraw {
    /// Row offset in the padded image, in `0..=2 * crop_padding`; output row
    /// `i` is input row `i + dy - crop_padding` (padding when outside).
    pub dy: usize,
    /// Column offset in the padded image, in `0..=2 * crop_padding`.
    pub dx: usize,
    /// Whether output column `j` is then taken from column `W - 1 - j`.
    pub flip: bool,
}

impl Augmentation {
    /// The standard CIFAR training augmentation: 4 pixels of padding, flip.
    pub const fn cifar() -> Self {
        Augmentation {
            crop_padding: 4,
            flip: true,
        }
    }

    /// The choices for example `index` (its position in the data set) in
    /// `epoch` of a run seeded `seed`, as [`Dataset::gather_augmented_into`]
    /// makes them.
    pub fn draw(&self, seed: u64, epoch: u64, index: usize) -> AugmentDraw {
        Drawer::new(self, seed, epoch).draw(index)
    }

    /// Checks that examples of `shape` can be augmented with the padding
    /// values `fill`: `shape` is `[C, H, W]` with no zero side, `fill` has
    /// `C` entries, and the padded sides fit in `isize` (so the offset
    /// arithmetic cannot overflow).
    pub fn check(&self, shape: &[usize], fill: &[f32]) -> Result<(), DataError> {
        let &[c, h, w] = shape else {
            return Err(DataError::Invalid(format!(
                "augmentation needs images of shape [C, H, W], not {shape:?}"
            )));
        };
        if c == 0 || h == 0 || w == 0 {
            return Err(DataError::Invalid(format!(
                "augmentation needs images with no zero side, not {shape:?}"
            )));
        }
        if fill.len() != c {
            return Err(DataError::Invalid(format!(
                "{} padding values for images of {c} channels",
                fill.len()
            )));
        }
        let fits = self
            .crop_padding
            .checked_mul(2)
            .and_then(|t| t.checked_add(h.max(w)))
            .is_some_and(|t| t <= isize::MAX as usize);
        if !fits {
            return Err(DataError::Invalid(format!(
                "crop padding {} is too large",
                self.crop_padding
            )));
        }
        Ok(())
    }
}

/// The keyed generator of one epoch, repositioned for each example.
struct Drawer {
    rng: ChaCha8Rng,
    bound: u64,
    flip: bool,
}

impl Drawer {
    fn new(augmentation: &Augmentation, seed: u64, epoch: u64) -> Self {
        let mut rng = domain_rng(seed, AUGMENT_DOMAIN);
        rng.set_stream(epoch);
        // Saturating, so that `draw` is defined for any padding; `check`
        // rejects paddings this large before any image is touched.
        let bound = (augmentation.crop_padding as u64)
            .saturating_mul(2)
            .saturating_add(1);
        Drawer {
            rng,
            bound,
            flip: augmentation.flip,
        }
    }

    fn draw(&mut self, index: usize) -> AugmentDraw {
        self.rng
            .set_word_pos(u128::from(index as u64) * WORDS_PER_EXAMPLE);
        let dy = uniform_below(&mut self.rng, self.bound) as usize;
        let dx = uniform_below(&mut self.rng, self.bound) as usize;
        let coin = self.rng.next_u64() >> 63 == 1;
        AugmentDraw {
            dy,
            dx,
            flip: self.flip && coin,
        }
    }
}

/// Appends the augmented `src` (one `[c, h, w]` image) to `out`, row by
/// row: padding, the visible part of the source row, padding, then the row
/// reversed in place when flipping. Appending into reserved capacity keeps
/// it free of allocation and writes each output value once.
fn augment_into(
    out: &mut Vec<f32>,
    src: &[f32],
    [c, h, w]: [usize; 3],
    fill: &[f32],
    padding: usize,
    d: AugmentDraw,
) {
    // Output column j shows source column j + dx - padding, visible for j in
    // lo..hi; when that range is empty every row is padding.
    let lo = padding.saturating_sub(d.dx).min(w);
    let hi = (w + padding).saturating_sub(d.dx).min(w);
    for (plane, &f) in src.chunks_exact(h * w).take(c).zip(fill) {
        for i in 0..h {
            let start = out.len();
            let r = i + d.dy;
            if r < padding || r - padding >= h || lo >= hi {
                out.extend(std::iter::repeat_n(f, w));
            } else {
                let row = &plane[(r - padding) * w..][..w];
                out.extend(std::iter::repeat_n(f, lo));
                out.extend_from_slice(&row[lo + d.dx - padding..hi + d.dx - padding]);
                out.extend(std::iter::repeat_n(f, w - hi));
            }
            if d.flip {
                out[start..].reverse();
            }
        }
    }
}

impl Dataset {
    /// Writes into `batch` exactly what [`Dataset::gather_into`] would, but
    /// with each example augmented by `augmentation` using the padding
    /// values `fill` (one per channel, normally
    /// [`Standardization::fill_values`](super::Standardization::fill_values)).
    /// The random choices for the example at data-set index `i` are
    /// `augmentation.draw(seed, epoch, i)`, whatever else is in the batch.
    /// Reuses `batch`'s allocations and allocates nothing per example.
    ///
    /// # Panics
    /// If [`Augmentation::check`] fails for this data set's shape and
    /// `fill`, or if an index is `>= n` (indices come from the shuffler, not
    /// from input files).
    pub fn gather_augmented_into(
        &self,
        indices: &[usize],
        augmentation: &Augmentation,
        fill: &[f32],
        seed: u64,
        epoch: u64,
        batch: &mut Batch,
    ) {
        if let Err(e) = augmentation.check(&self.shape, fill) {
            panic!("Dataset::gather_augmented_into: {e}");
        }
        let shape = [self.shape[0], self.shape[1], self.shape[2]];
        let mut drawer = Drawer::new(augmentation, seed, epoch);
        batch.features.clear();
        batch.labels.clear();
        batch.features.reserve(indices.len() * self.dim);
        batch.labels.reserve(indices.len());
        for &i in indices {
            let d = drawer.draw(i);
            let src = self.example(i);
            augment_into(
                &mut batch.features,
                src,
                shape,
                fill,
                augmentation.crop_padding,
                d,
            );
            batch.labels.push(self.labels[i]);
        }
        batch.size = indices.len();
        batch.dim = self.dim;
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;

    use super::super::batch::splitmix64;
    use super::*;

    #[test]
    fn draw_reads_the_documented_keystream_window() {
        // Reference: the key written out from the module documentation, and
        // the keystream stepped word by word to the example's window instead
        // of seeking, so both the key and the window arithmetic are checked.
        for (seed, epoch) in [(0u64, 0u64), (7, 3), (u64::MAX, 1 << 40)] {
            let mut state = seed ^ AUGMENT_DOMAIN;
            let mut key = [0u8; 32];
            for chunk in key.chunks_exact_mut(8) {
                chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
            }
            for index in 0..6 {
                let mut rng = ChaCha8Rng::from_seed(key);
                rng.set_stream(epoch);
                for _ in 0..64 * index {
                    rng.next_u32();
                }
                let dy = uniform_below(&mut rng, 9) as usize;
                let dx = uniform_below(&mut rng, 9) as usize;
                let flip = rng.next_u64() >> 63 == 1;
                let want = AugmentDraw { dy, dx, flip };
                assert_eq!(Augmentation::cifar().draw(seed, epoch, index), want);
            }
        }
    }

    #[test]
    fn flip_setting_does_not_move_offsets() {
        let no_flip = Augmentation {
            crop_padding: 4,
            flip: false,
        };
        for i in 0..50 {
            let a = Augmentation::cifar().draw(1, 2, i);
            let b = no_flip.draw(1, 2, i);
            assert_eq!((a.dy, a.dx, b.flip), (b.dy, b.dx, false));
        }
    }

    #[test]
    fn check_rejects_what_cannot_be_augmented() {
        let a = Augmentation::cifar();
        assert!(a.check(&[3, 32, 32], &[0.0; 3]).is_ok());
        assert!(a.check(&[3072], &[0.0]).is_err());
        assert!(a.check(&[3, 0, 32], &[0.0; 3]).is_err());
        assert!(a.check(&[3, 32, 32], &[0.0; 1]).is_err());
        let huge = Augmentation {
            crop_padding: usize::MAX / 2,
            flip: false,
        };
        assert!(huge.check(&[1, 2, 2], &[0.0]).is_err());
        // Drawing stays defined (offsets in 0..=2^64 - 2) even so.
        huge.draw(0, 0, 0);
    }
}
