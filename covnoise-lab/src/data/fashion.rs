//! Fashion-MNIST: finding the four IDX files and loading them.
//!
//! Where the files are looked for, in order of precedence:
//! 1. the directory given with `--data DIR`;
//! 2. the `COVNOISE_DATA` environment variable (an empty value counts as unset);
//! 3. `/usr/share/datasets/fashion-mnist`, where Debian's package
//!    `dataset-fashion-mnist` installs them (gzipped).
//!
//! Only the first of these that is *given* is consulted: a `--data` directory
//! that lacks a file is an error, never a silent fallback to another copy,
//! because a run must use the data its user named (and a typo must not go
//! unnoticed). Nothing is ever downloaded.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, TriedDir};
use super::idx::{
    IdxArray, RawImages, read_idx_images, read_idx_labels, write_idx_images, write_idx_labels,
};
use super::locate::{DATA_ENV_VAR, DataSource, DirOrigin, locate};
use super::split::{LoadOptions, RawSplit, TrainTest, build_train_test};

/// Where Debian's package `dataset-fashion-mnist` installs the files.
pub const FASHION_MNIST_DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Image side in pixels (images are 28x28, one grey channel).
pub const FASHION_MNIST_SIDE: usize = 28;
/// Number of classes (T-shirt/top, trouser, ..., ankle boot).
pub const FASHION_MNIST_CLASSES: usize = 10;
/// The four file names, without `.gz`: train images, train labels, test
/// images, test labels. Each may be plain or gzipped; plain wins if both exist.
pub const FASHION_MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Advice printed when the files are nowhere to be found.
const ADVICE: &str = "run `sudo apt-get install dataset-fashion-mnist` or pass --data DIR \
                      (a directory with the four IDX files, plain or .gz)";

/// The four Fashion-MNIST files, each the plain or the `.gz` path that exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FashionFiles {
    /// `train-images-idx3-ubyte[.gz]`
    pub train_images: PathBuf,
    /// `train-labels-idx1-ubyte[.gz]`
    pub train_labels: PathBuf,
    /// `t10k-images-idx3-ubyte[.gz]`
    pub test_images: PathBuf,
    /// `t10k-labels-idx1-ubyte[.gz]`
    pub test_labels: PathBuf,
}

impl FashionFiles {
    /// The four paths in the order of [`FASHION_MNIST_FILES`].
    pub fn to_vec(&self) -> Vec<PathBuf> {
        vec![
            self.train_images.clone(),
            self.train_labels.clone(),
            self.test_images.clone(),
            self.test_labels.clone(),
        ]
    }
}

/// The directory chosen for Fashion-MNIST, why, and the files in it.
/// `Display` gives the one line a run should print, e.g.
/// `fashion-mnist: /usr/share/datasets/fashion-mnist (the default location ...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDir {
    /// The directory.
    pub dir: PathBuf,
    /// Why it was chosen.
    pub origin: DirOrigin,
    /// The files found in it.
    pub files: FashionFiles,
}

impl fmt::Display for ResolvedDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fashion-mnist: {} ({})", self.dir.display(), self.origin)
    }
}

/// Finds the Fashion-MNIST directory: `explicit` (from `--data`), else the
/// `COVNOISE_DATA` environment variable, else [`FASHION_MNIST_DEFAULT_DIR`].
/// See the module documentation for why there is no fallback.
pub fn resolve_fashion_mnist_dir(explicit: Option<&Path>) -> Result<ResolvedDir, DataError> {
    let env = std::env::var_os(DATA_ENV_VAR);
    resolve_fashion_mnist_dir_with(
        explicit,
        env.as_deref(),
        Path::new(FASHION_MNIST_DEFAULT_DIR),
    )
}

/// As [`resolve_fashion_mnist_dir`], with the environment value and the
/// default directory passed in (so tests need not touch the process
/// environment).
pub fn resolve_fashion_mnist_dir_with(
    explicit: Option<&Path>,
    env: Option<&OsStr>,
    default_dir: &Path,
) -> Result<ResolvedDir, DataError> {
    let (dir, origin) = match (explicit, env.filter(|v| !v.is_empty())) {
        (Some(d), _) => (d.to_path_buf(), DirOrigin::Explicit),
        (None, Some(e)) => (PathBuf::from(e), DirOrigin::EnvVar),
        (None, None) => (default_dir.to_path_buf(), DirOrigin::Default),
    };
    let found: Vec<Option<PathBuf>> = FASHION_MNIST_FILES
        .iter()
        .map(|name| locate(&dir, name))
        .collect();
    let missing: Vec<String> = FASHION_MNIST_FILES
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(name, _)| format!("{name}[.gz]"))
        .collect();
    match found.as_slice() {
        [Some(a), Some(b), Some(c), Some(d)] => Ok(ResolvedDir {
            files: FashionFiles {
                train_images: a.clone(),
                train_labels: b.clone(),
                test_images: c.clone(),
                test_labels: d.clone(),
            },
            dir,
            origin,
        }),
        _ => Err(DataError::NotFound {
            dataset: "fashion-mnist",
            tried: vec![TriedDir {
                dir,
                origin: origin.label().to_string(),
                missing,
            }],
            advice: ADVICE,
        }),
    }
}

/// Finds (see [`resolve_fashion_mnist_dir`]), reads, validates and
/// preprocesses Fashion-MNIST. `explicit` is `--data DIR`.
pub fn load_fashion_mnist(
    explicit: Option<&Path>,
    opts: &LoadOptions,
) -> Result<TrainTest, DataError> {
    load_fashion_mnist_from(&resolve_fashion_mnist_dir(explicit)?, opts)
}

/// Reads, validates and preprocesses the files of an already resolved
/// directory: every file is checked in full (magic, 28x28 images, labels in
/// 0..10, equal counts, exact length) before the limits are applied.
pub fn load_fashion_mnist_from(
    resolved: &ResolvedDir,
    opts: &LoadOptions,
) -> Result<TrainTest, DataError> {
    let f = &resolved.files;
    // The two splits are independent; decompressing them on two threads
    // takes the test set off the critical path.
    let (train, test) = std::thread::scope(|s| {
        let test = s.spawn(|| read_split(&f.test_images, &f.test_labels));
        let train = read_split(&f.train_images, &f.train_labels);
        let test = test.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (train, test)
    });
    let side = FASHION_MNIST_SIDE;
    build_train_test(
        train?,
        test?,
        vec![1, side, side],
        FASHION_MNIST_CLASSES,
        opts,
        DataSource {
            dataset: "fashion-mnist".to_string(),
            dir: resolved.dir.clone(),
            origin: resolved.origin,
            files: f.to_vec(),
        },
    )
}

/// Reads one images file and its labels file and checks they agree.
fn read_split(images_path: &Path, labels_path: &Path) -> Result<RawSplit, DataError> {
    let IdxArray { dims, data } = read_idx_images(images_path)?;
    let side = FASHION_MNIST_SIDE;
    // The magic number 0x803 guarantees three dimensions.
    let (n, rows, cols) = match dims.as_slice() {
        &[n, rows, cols] => (n, rows, cols),
        _ => (0, 0, 0),
    };
    if (rows, cols) != (side, side) {
        return Err(DataError::BadDims {
            path: images_path.to_path_buf(),
            detail: format!("images are {rows}x{cols}, expected {side}x{side}"),
        });
    }
    let labels = read_idx_labels(labels_path, FASHION_MNIST_CLASSES)?;
    if labels.len() != n {
        return Err(DataError::CountMismatch {
            images: images_path.to_path_buf(),
            labels: labels_path.to_path_buf(),
            n_images: n,
            n_labels: labels.len(),
        });
    }
    Ok(RawSplit {
        pixels: data,
        labels,
        path: images_path.to_path_buf(),
    })
}

/// Writes a Fashion-MNIST-style directory (the four files, gzipped when
/// `gzip`) from raw images, e.g. a small synthetic stand-in for tests of the
/// command line. The images may be any size here; the loader insists on 28x28.
pub fn write_fashion_mnist_dir(
    dir: &Path,
    train: &RawImages,
    test: &RawImages,
    gzip: bool,
) -> Result<FashionFiles, DataError> {
    let path = |name: &str| {
        dir.join(if gzip {
            format!("{name}.gz")
        } else {
            name.to_string()
        })
    };
    let files = FashionFiles {
        train_images: path(FASHION_MNIST_FILES[0]),
        train_labels: path(FASHION_MNIST_FILES[1]),
        test_images: path(FASHION_MNIST_FILES[2]),
        test_labels: path(FASHION_MNIST_FILES[3]),
    };
    for (raw, images, labels) in [
        (train, &files.train_images, &files.train_labels),
        (test, &files.test_images, &files.test_labels),
    ] {
        write_idx_images(images, raw.n, raw.rows, raw.cols, &raw.pixels)?;
        write_idx_labels(labels, &raw.labels)?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, names: &[&str]) {
        for n in names {
            std::fs::write(dir.join(n), b"").unwrap();
        }
    }

    #[test]
    fn precedence_explicit_env_default() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        for d in [&a, &b, &c] {
            touch(d.path(), &FASHION_MNIST_FILES);
        }
        let env = b.path().as_os_str();
        let r = resolve_fashion_mnist_dir_with(Some(a.path()), Some(env), c.path()).unwrap();
        assert_eq!((r.dir.as_path(), r.origin), (a.path(), DirOrigin::Explicit));
        let r = resolve_fashion_mnist_dir_with(None, Some(env), c.path()).unwrap();
        assert_eq!((r.dir.as_path(), r.origin), (b.path(), DirOrigin::EnvVar));
        let r = resolve_fashion_mnist_dir_with(None, Some(OsStr::new("")), c.path()).unwrap();
        assert_eq!((r.dir.as_path(), r.origin), (c.path(), DirOrigin::Default));
        assert!(r.to_string().contains("neither --data nor COVNOISE_DATA"));
    }

    #[test]
    fn plain_preferred_over_gz_and_gz_accepted() {
        let d = tempfile::tempdir().unwrap();
        touch(
            d.path(),
            &["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"],
        );
        touch(
            d.path(),
            &[
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte",
            ],
        );
        let r = resolve_fashion_mnist_dir_with(Some(d.path()), None, d.path()).unwrap();
        assert_eq!(
            r.files.train_images,
            d.path().join("train-images-idx3-ubyte")
        );
        assert_eq!(
            r.files.train_labels,
            d.path().join("train-labels-idx1-ubyte.gz")
        );
    }

    #[test]
    fn no_fallback_from_explicit_and_error_names_what_was_tried() {
        let full = tempfile::tempdir().unwrap();
        touch(full.path(), &FASHION_MNIST_FILES);
        let partial = tempfile::tempdir().unwrap();
        touch(partial.path(), &FASHION_MNIST_FILES[..3]);
        let err =
            resolve_fashion_mnist_dir_with(Some(partial.path()), None, full.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, DataError::NotFound { tried, .. } if tried.len() == 1));
        assert!(msg.contains(&partial.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("(--data): missing t10k-labels-idx1-ubyte[.gz]"),
            "{msg}"
        );
        assert!(
            msg.contains("sudo apt-get install dataset-fashion-mnist"),
            "{msg}"
        );
        assert!(msg.contains("--data DIR"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
