//! CIFAR-10 and CIFAR-100, "binary version", from a directory the user gives.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (training, in that
//! order) and `test_batch.bin`; each record is 1 label byte (0..10) and 3072
//! pixel bytes. CIFAR-100: `train.bin` and `test.bin`; each record is a coarse
//! label byte (0..20), a fine label byte (0..100), then 3072 pixel bytes.
//! Pixels are the red plane, then green, then blue, each 32x32 row-major, so
//! an example has shape `[3, 32, 32]` (channels first), kept as is.
//!
//! The directory may be the one holding the files or its parent, into which
//! the official archive extracts `cifar-10-batches-bin/` or `cifar-100-binary/`.
//! Files may also be gzipped (`*.bin.gz`), as for IDX. Preprocessing is the
//! same as for Fashion-MNIST: a mean and standard deviation per channel from
//! the training pixels (here three: red, green, blue).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, TriedDir};
use super::idx::{check_labels, read_all, write_bytes};
use super::locate::{DataSource, DirOrigin, locate};
use super::split::{LoadOptions, RawSplit, TrainTest, build_train_test};

/// Image side in pixels.
pub const CIFAR_SIDE: usize = 32;
/// Colour channels.
pub const CIFAR_CHANNELS: usize = 3;
/// Pixel bytes per record: 3 x 32 x 32.
pub const CIFAR_PIXELS: usize = CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE;

const CIFAR10_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];
const CIFAR100_FILES: [&str; 2] = ["train.bin", "test.bin"];

/// Which CIFAR-100 label to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cifar100Label {
    /// The 20 superclasses (first label byte).
    Coarse,
    /// The 100 classes (second label byte); the usual choice.
    Fine,
}

/// The layout of one record's label bytes.
struct LabelByte {
    kind: &'static str,
    num_classes: usize,
}

const CIFAR10_LABELS: [LabelByte; 1] = [LabelByte {
    kind: "label",
    num_classes: 10,
}];
const CIFAR100_LABELS: [LabelByte; 2] = [
    LabelByte {
        kind: "coarse label",
        num_classes: 20,
    },
    LabelByte {
        kind: "fine label",
        num_classes: 100,
    },
];

/// Loads CIFAR-10 from `dir` (see the module documentation).
pub fn load_cifar10(dir: &Path, opts: &LoadOptions) -> Result<TrainTest, DataError> {
    let (dir, files) = find(dir, "cifar10", &CIFAR10_FILES, "cifar-10-batches-bin")?;
    let train = read_files(&files[..5], &CIFAR10_LABELS, 0)?;
    let test = read_files(&files[5..], &CIFAR10_LABELS, 0)?;
    finish(
        "cifar10",
        dir,
        files,
        train,
        test,
        CIFAR10_LABELS[0].num_classes,
        opts,
    )
}

/// Loads CIFAR-100 from `dir` with the chosen labels (see the module
/// documentation). Both label bytes are validated whichever is used.
pub fn load_cifar100(
    dir: &Path,
    label: Cifar100Label,
    opts: &LoadOptions,
) -> Result<TrainTest, DataError> {
    let (dir, files) = find(dir, "cifar100", &CIFAR100_FILES, "cifar-100-binary")?;
    let which = match label {
        Cifar100Label::Coarse => 0,
        Cifar100Label::Fine => 1,
    };
    let train = read_files(&files[..1], &CIFAR100_LABELS, which)?;
    let test = read_files(&files[1..], &CIFAR100_LABELS, which)?;
    let name = match label {
        Cifar100Label::Coarse => "cifar100-coarse",
        Cifar100Label::Fine => "cifar100",
    };
    let classes = CIFAR100_LABELS[which].num_classes;
    finish(name, dir, files, train, test, classes, opts)
}

fn finish(
    name: &str,
    dir: PathBuf,
    files: Vec<PathBuf>,
    train: RawSplit,
    test: RawSplit,
    num_classes: usize,
    opts: &LoadOptions,
) -> Result<TrainTest, DataError> {
    let source = DataSource {
        dataset: name.to_string(),
        dir,
        origin: DirOrigin::Explicit,
        files,
    };
    let shape = vec![CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE];
    build_train_test(train, test, shape, num_classes, opts, source)
}

/// Finds all `names` in `dir` or else in `dir/subdir`.
fn find(
    dir: &Path,
    dataset: &'static str,
    names: &[&str],
    subdir: &str,
) -> Result<(PathBuf, Vec<PathBuf>), DataError> {
    let mut tried = Vec::new();
    for d in [dir.to_path_buf(), dir.join(subdir)] {
        let found: Vec<_> = names.iter().map(|n| locate(&d, n)).collect();
        if found.iter().all(Option::is_some) {
            return Ok((d, found.into_iter().flatten().collect()));
        }
        let missing = names
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(n, _)| format!("{n}[.gz]"))
            .collect();
        tried.push(TriedDir {
            dir: d,
            origin: "--data".to_string(),
            missing,
        });
    }
    Err(DataError::NotFound {
        dataset,
        tried,
        advice: "extract the binary version of the data set (from \
                 https://www.cs.toronto.edu/~kriz/cifar.html) and pass --data DIR",
    })
}

/// Reads and validates record files, keeping label byte `which`.
fn read_files(
    paths: &[PathBuf],
    label_bytes: &[LabelByte],
    which: usize,
) -> Result<RawSplit, DataError> {
    let record = label_bytes.len() + CIFAR_PIXELS;
    let mut split = RawSplit {
        pixels: Vec::new(),
        labels: Vec::new(),
        path: paths.first().cloned().unwrap_or_default(),
    };
    for path in paths {
        let bytes = read_all(path)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            return Err(DataError::BadRecordSize {
                path: path.clone(),
                len: bytes.len() as u64,
                record,
            });
        }
        for (offset, lb) in label_bytes.iter().enumerate() {
            check_labels(path, lb.kind, &bytes, record, offset, lb.num_classes)?;
        }
        let n = bytes.len() / record;
        split.labels.reserve(n);
        split.pixels.reserve(n * CIFAR_PIXELS);
        for rec in bytes.chunks_exact(record) {
            split.labels.push(rec[which]);
            split.pixels.extend_from_slice(&rec[label_bytes.len()..]);
        }
    }
    Ok(split)
}

fn check_pixels(n: usize, pixels: &[u8]) -> Result<(), DataError> {
    if n.checked_mul(CIFAR_PIXELS) != Some(pixels.len()) {
        return Err(DataError::Invalid(format!(
            "{} pixel bytes do not make {n} CIFAR images of {CIFAR_PIXELS}",
            pixels.len()
        )));
    }
    Ok(())
}

/// Writes a CIFAR-10 binary file (gzipped when `path` ends in `.gz`): for
/// each example, its label byte then its 3072 pixel bytes. For tests.
pub fn write_cifar10_file(path: &Path, labels: &[u8], pixels: &[u8]) -> Result<(), DataError> {
    check_pixels(labels.len(), pixels)?;
    let mut out = Vec::with_capacity(labels.len() * (1 + CIFAR_PIXELS));
    for (l, px) in labels.iter().zip(pixels.chunks_exact(CIFAR_PIXELS)) {
        out.push(*l);
        out.extend_from_slice(px);
    }
    write_bytes(path, &out)
}

/// Writes a CIFAR-100 binary file (gzipped when `path` ends in `.gz`): for
/// each example, its coarse and fine label bytes then its 3072 pixel bytes.
/// For tests.
pub fn write_cifar100_file(
    path: &Path,
    coarse: &[u8],
    fine: &[u8],
    pixels: &[u8],
) -> Result<(), DataError> {
    check_pixels(fine.len(), pixels)?;
    if coarse.len() != fine.len() {
        return Err(DataError::Invalid(format!(
            "{} coarse labels but {} fine labels",
            coarse.len(),
            fine.len()
        )));
    }
    let mut out = Vec::with_capacity(fine.len() * (2 + CIFAR_PIXELS));
    for ((c, f), px) in coarse
        .iter()
        .zip(fine)
        .zip(pixels.chunks_exact(CIFAR_PIXELS))
    {
        out.extend_from_slice(&[*c, *f]);
        out.extend_from_slice(px);
    }
    write_bytes(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(n: usize, seed: u8) -> Vec<u8> {
        (0..n * CIFAR_PIXELS)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn cifar10_round_trip_in_subdir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&dir).unwrap();
        let mut all_labels = Vec::new();
        for (i, name) in CIFAR10_FILES.iter().enumerate() {
            let labels: Vec<u8> = (0..3).map(|j| ((i * 3 + j) % 10) as u8).collect();
            // One file gzipped, to cover that path too.
            let name = if i == 2 {
                format!("{name}.gz")
            } else {
                name.to_string()
            };
            write_cifar10_file(&dir.join(name), &labels, &pixels(3, i as u8)).unwrap();
            if i < 5 {
                all_labels.extend(labels);
            }
        }
        let tt = load_cifar10(root.path(), &LoadOptions::default()).unwrap();
        assert_eq!(tt.source.dir, dir);
        assert_eq!((tt.train.n, tt.test.n, tt.train.dim), (15, 3, 3072));
        assert_eq!(tt.train.shape, vec![3, 32, 32]);
        assert_eq!(tt.train.labels, all_labels);
        // The first training pixel is byte 0 of batch 1's first record.
        let expect = tt.standardization.u8_table(0)[usize::from(pixels(1, 0)[0])];
        assert_eq!(tt.train.features[0], expect);
    }

    #[test]
    fn cifar100_fine_and_coarse_and_label_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write_cifar100_file(&p("train.bin"), &[0, 19], &[5, 99], &pixels(2, 1)).unwrap();
        write_cifar100_file(&p("test.bin"), &[3], &[42], &pixels(1, 2)).unwrap();
        let fine = load_cifar100(dir.path(), Cifar100Label::Fine, &LoadOptions::default()).unwrap();
        assert_eq!(
            (fine.train.labels.clone(), fine.train.num_classes),
            (vec![5, 99], 100)
        );
        let coarse =
            load_cifar100(dir.path(), Cifar100Label::Coarse, &LoadOptions::default()).unwrap();
        assert_eq!(
            (coarse.train.labels, coarse.train.num_classes),
            (vec![0, 19], 20)
        );
        assert_eq!(coarse.source.dataset, "cifar100-coarse");

        // A coarse label of 20 is rejected even when training on fine labels.
        write_cifar100_file(&p("test.bin"), &[3, 20], &[42, 1], &pixels(2, 2)).unwrap();
        let err =
            load_cifar100(dir.path(), Cifar100Label::Fine, &LoadOptions::default()).unwrap_err();
        assert!(matches!(
            err,
            DataError::LabelOutOfRange {
                index: 1,
                label: 20,
                ..
            }
        ));
        assert!(
            err.to_string()
                .ends_with("test.bin: coarse label 20 at index 1 is outside 0..19")
        );
    }

    #[test]
    fn bad_record_size_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write_cifar100_file(&p("train.bin"), &[0], &[5], &pixels(1, 1)).unwrap();
        std::fs::write(p("test.bin"), vec![0u8; 2 + CIFAR_PIXELS + 1]).unwrap();
        let err =
            load_cifar100(dir.path(), Cifar100Label::Fine, &LoadOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadRecordSize {
                    record: 3074,
                    len: 3075,
                    ..
                }
            ),
            "{err}"
        );

        let err = load_cifar10(dir.path(), &LoadOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(&err, DataError::NotFound { tried, .. } if tried.len() == 2));
        assert!(msg.contains("data_batch_1.bin[.gz]") && msg.contains("cifar-10-batches-bin"));
    }

    #[test]
    fn writers_reject_inconsistent_input() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_cifar10_file(&d.path().join("a"), &[1, 2], &pixels(1, 0)).is_err());
        assert!(write_cifar100_file(&d.path().join("b"), &[1], &[1, 2], &pixels(2, 0)).is_err());
    }
}
