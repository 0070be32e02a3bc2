//! The one error type of the data module.
//!
//! Every variant that concerns a file carries its path, and every `Display`
//! is a single line that starts with that path, so the CLI can print it as is
//! (ripgrep style: one clear line, no backtrace).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// A directory that was considered when looking for a data set, and what it
/// lacked. Part of [`DataError::NotFound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriedDir {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was considered, e.g. "--data" or "COVNOISE_DATA".
    pub origin: String,
    /// The file names (without `.gz`) that were found neither plain nor gzipped.
    pub missing: Vec<String>,
}

/// Why loading or validating data failed.
///
/// Bad input never panics; it ends up here. Every `Display` is one line that
/// names the file (or directories) and the problem.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file does not exist.
    #[error("{}: file not found", path.display())]
    Missing {
        /// The path that was looked for.
        path: PathBuf,
    },

    /// No candidate directory holds the data set's files.
    #[error("{dataset} not found: {}; {advice}", describe_tried(.tried))]
    NotFound {
        /// Which data set was looked for.
        dataset: &'static str,
        /// Every directory considered, in order.
        tried: Vec<TriedDir>,
        /// What to do about it, e.g. which package to install.
        advice: &'static str,
    },

    /// The operating system refused to read the file.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A `.gz` file is not valid gzip (bad header, bad CRC, cut short, ...).
    #[error("{}: corrupt gzip data: {detail}", path.display())]
    BadGzip {
        /// The file.
        path: PathBuf,
        /// What the decompressor said.
        detail: String,
    },

    /// The IDX magic number is not the expected one.
    #[error("{}: bad magic number 0x{found:08x}, expected 0x{expected:08x} ({what}){hint}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes, big-endian.
        found: u32,
        /// What the file should start with.
        expected: u32,
        /// What kind of file was expected, e.g. "IDX images: unsigned bytes, 3 dimensions".
        what: &'static str,
        /// Extra advice (empty, or starting with "; ").
        hint: &'static str,
    },

    /// The header describes a shape this reader cannot or will not accept.
    #[error("{}: bad dimensions: {detail}", path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// What is wrong with them.
        detail: String,
    },

    /// The file ends before the header or the data it describes does.
    #[error(
        "{}: truncated: the header describes {expected} bytes but the file holds only {found}",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes (after decompression) the header implies, header included.
        expected: u64,
        /// Bytes actually present (after decompression).
        found: u64,
    },

    /// There are bytes after the data the header describes.
    #[error(
        "{}: {extra} trailing bytes after the {expected} bytes the header describes",
        path.display()
    )]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes (after decompression) the header implies, header included.
        expected: u64,
        /// Bytes beyond that.
        extra: u64,
    },

    /// A label is not in `0..num_classes`.
    #[error(
        "{}: {kind} {label} at index {index} is outside 0..{}",
        path.display(),
        num_classes.saturating_sub(1)
    )]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// "label", or "coarse label" / "fine label" for CIFAR-100.
        kind: &'static str,
        /// The offending value.
        label: u8,
        /// Its example index in the file (0-based).
        index: usize,
        /// The number of classes; valid labels are `0..num_classes`.
        num_classes: usize,
    },

    /// The images file and the labels file disagree on the number of examples.
    #[error(
        "{}: holds {n_images} images but {} holds {n_labels} labels",
        images.display(),
        labels.display()
    )]
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// The labels file.
        labels: PathBuf,
        /// Examples in the images file.
        n_images: usize,
        /// Examples in the labels file.
        n_labels: usize,
    },

    /// A CIFAR file's length is not a positive multiple of its record size.
    #[error(
        "{}: length {len} bytes is not a positive multiple of the {record} byte record",
        path.display()
    )]
    BadRecordSize {
        /// The file.
        path: PathBuf,
        /// The file's length (after decompression).
        len: u64,
        /// The record size: label bytes + 3072 pixel bytes.
        record: usize,
    },

    /// A file (or the part kept of it) has no examples.
    #[error("{}: contains no examples", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },

    /// An argument is invalid (limit of 0, batch size of 0 or above the
    /// number of examples, inconsistent in-memory arrays).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// Wraps an I/O error, turning "not found" into [`DataError::Missing`].
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// One line: "tried DIR (ORIGIN): missing a, b; tried ...".
fn describe_tried(tried: &[TriedDir]) -> String {
    if tried.is_empty() {
        return "no directory to try".to_string();
    }
    tried
        .iter()
        .map(|t| {
            format!(
                "tried {} ({}): missing {}",
                t.dir.display(),
                t.origin,
                t.missing.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
