//! Data: Fashion-MNIST (IDX), CIFAR-10/100 (binary), synthetic sets, batching.
//!
//! Everything here is plain `Vec<f32>` / `Vec<u8>`, with no tensor library,
//! so the module builds fast and other modules' tests can use it cheaply.
//!
//! The pieces, in the order a run uses them:
//!
//! - [`resolve_fashion_mnist_dir`] finds the four IDX files (`--data DIR`,
//!   then `COVNOISE_DATA`, then Debian's `/usr/share/datasets/fashion-mnist`)
//!   and says which directory it picked and why.
//! - [`load_fashion_mnist`] (or [`load_cifar10`], [`load_cifar100`], or
//!   [`DatasetKind::load`]) reads and validates every file, keeps the first
//!   `--train-limit` / `--test-limit` examples, scales pixels to [0, 1] and
//!   standardizes train and test with the training set's per-channel mean
//!   and standard deviation ([`Standardization`], recorded in [`TrainTest`]).
//! - [`EpochShuffler`] gives each epoch a seeded permutation and cuts it into
//!   [`TrainBatches`] (the incomplete last batch is dropped);
//!   [`eval_batches`] covers every example. [`Dataset::gather`] copies a batch
//!   into one contiguous row-major buffer, and
//!   [`Dataset::gather_augmented_into`] does so with each image randomly
//!   cropped and flipped ([`Augmentation`], keyed by seed, epoch and example).
//! - [`synthetic_clusters`] and [`synthetic_images`] make small seeded data
//!   sets, and [`write_idx`] and friends write IDX files, so that tests never
//!   depend on the real data being installed.
//!
//! All bad input becomes a [`DataError`] whose `Display` is one line naming
//! the file; no input bytes can make this module panic.

// Layers, lowest first; a module imports only from lower layers (and from
// `error`, which imports nothing):
// - error, idx, batch, locate: errors, the IDX format, shuffling and batching,
//   where files are found;
// - memory: the in-memory `Dataset` and `Batch`;
// - augment: random crops and flips gathered into a `Batch`;
// - split: limits and standardization shared by the image loaders;
// - synthetic, fashion, cifar: the leaves that make or load data sets, which
//   never import each other;
// - dataset: the hub, `DatasetKind`, dispatching to the loaders.
mod augment;
mod batch;
mod cifar;
mod dataset;
mod error;
mod fashion;
mod idx;
mod locate;
mod memory;
mod split;
mod synthetic;

pub use augment::{AUGMENT_DOMAIN, AugmentDraw, Augmentation};
pub use batch::{
    EpochShuffler, EvalBatches, SHUFFLE_DOMAIN, Sampling, TrainBatches, TrainBatchesIntoIter,
    epoch_permutation, epoch_rng, eval_batches, shuffle_in_place, splitmix64, uniform_below,
};
pub use cifar::{
    CIFAR_CHANNELS, CIFAR_PIXELS, CIFAR_SIDE, Cifar100Label, load_cifar10, load_cifar100,
    write_cifar10_file, write_cifar100_file,
};
pub use dataset::DatasetKind;
pub use error::{DataError, TriedDir};
pub use fashion::{
    FASHION_MNIST_CLASSES, FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_FILES, FASHION_MNIST_SIDE,
    FashionFiles, ResolvedDir, load_fashion_mnist, load_fashion_mnist_from,
    resolve_fashion_mnist_dir, resolve_fashion_mnist_dir_with, write_fashion_mnist_dir,
};
pub use idx::{
    IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IdxArray, RawImages, decode_idx, encode_idx, read_idx,
    read_idx_images, read_idx_labels, write_idx, write_idx_images, write_idx_labels,
};
pub use locate::{DATA_ENV_VAR, DataSource, DirOrigin};
pub use memory::{Batch, Dataset};
pub use split::{InputScaling, LoadOptions, Standardization, TrainTest};
pub use synthetic::{synthetic_clusters, synthetic_images};
