//! Integration tests of `covnoise_lab::data` through its public API: IDX round
//! trips, every kind of corrupt file, preprocessing, limits, shuffling and
//! batching, CIFAR with per-channel standardization, augmentation against a
//! naive reference, the real Fashion-MNIST when installed, and a parser that
//! never panics on random bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::BTreeSet;

use covnoise_lab::data::{
    AugmentDraw, Augmentation, Batch, DataError, Dataset, DatasetKind, DirOrigin, EpochShuffler,
    FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_FILES, LoadOptions, RawImages, Standardization,
    TrainTest, decode_idx, encode_idx, epoch_permutation, eval_batches, load_fashion_mnist,
    read_idx, read_idx_images, read_idx_labels, resolve_fashion_mnist_dir_with, splitmix64,
    synthetic_clusters, synthetic_images, write_cifar10_file, write_cifar100_file,
    write_fashion_mnist_dir, write_idx, write_idx_images, write_idx_labels,
};
use proptest::prelude::*;

/// A stand-in Fashion-MNIST directory: 50 training and 20 test 28x28 images.
fn fake_fashion(gzip: bool) -> (tempfile::TempDir, RawImages, RawImages) {
    let dir = tempfile::tempdir().unwrap();
    let train = synthetic_images(50, 28, 28, 10, 1).unwrap();
    let test = synthetic_images(20, 28, 28, 10, 2).unwrap();
    write_fashion_mnist_dir(dir.path(), &train, &test, gzip).unwrap();
    (dir, train, test)
}

fn load(dir: &Path) -> Result<TrainTest, DataError> {
    load_fashion_mnist(Some(dir), &LoadOptions::default())
}

/// Path of one of the four files in a directory written by `fake_fashion`.
fn file(dir: &Path, index: usize, gzip: bool) -> PathBuf {
    let name = FASHION_MNIST_FILES[index];
    dir.join(if gzip {
        format!("{name}.gz")
    } else {
        name.to_string()
    })
}

/// The error must be one line starting with the file's path.
fn assert_names_file(err: &DataError, path: &Path) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    assert!(
        msg.starts_with(&format!("{}: ", path.display())),
        "message does not start with {}: {msg}",
        path.display()
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Mean and population standard deviation in f64.
fn moments(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[test]
fn round_trip_plain_and_gzip() {
    for gz in [false, true] {
        let (dir, train, test) = fake_fashion(gz);
        let tt = load(dir.path()).unwrap();
        assert_eq!((tt.train.n, tt.test.n), (50, 20));
        assert_eq!((tt.train.dim, tt.train.num_classes), (784, 10));
        assert_eq!(tt.train.shape, vec![1, 28, 28]);
        assert_eq!(tt.train.labels, train.labels);
        assert_eq!(tt.test.labels, test.labels);
        // Features are the documented map of the stored bytes.
        // One channel: the map is one mean and standard deviation.
        let s = &tt.standardization;
        assert_eq!((s.mean.len(), s.std.len()), (1, 1));
        for (&f, &p) in tt.test.features.iter().zip(&test.pixels).step_by(97) {
            let want = ((f64::from(p) / 255.0 - s.mean[0]) / s.std[0]) as f32;
            assert!((f - want).abs() < 1e-6);
        }
        assert_eq!(tt.source.origin, DirOrigin::Explicit);
        assert_eq!(tt.source.files[3], file(dir.path(), 3, gz));
        // The general readers see the same data.
        let arr = read_idx(&file(dir.path(), 0, gz)).unwrap();
        assert_eq!((arr.dims, arr.data), (vec![50, 28, 28], train.pixels));
    }
}

#[test]
fn write_idx_round_trips_any_shape() {
    let dir = tempfile::tempdir().unwrap();
    for (name, dims) in [("a", vec![6]), ("b.gz", vec![2, 3]), ("c", vec![1, 2, 3])] {
        let p = dir.path().join(name);
        let data: Vec<u8> = (0..6).collect();
        write_idx(&p, &dims, &data).unwrap();
        let arr = read_idx(&p).unwrap();
        assert_eq!((arr.dims, arr.data), (dims, data));
    }
    let p = dir.path().join("img.gz");
    write_idx_images(&p, 2, 2, 2, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert_eq!(read_idx_images(&p).unwrap().dims, vec![2, 2, 2]);
    let p = dir.path().join("lab");
    write_idx_labels(&p, &[3, 1]).unwrap();
    assert_eq!(read_idx_labels(&p, 4).unwrap(), vec![3, 1]);
}

#[test]
fn wrong_magic() {
    let (dir, ..) = fake_fashion(false);
    // Labels where the images should be: magic 0x801, not 0x803.
    let images = file(dir.path(), 0, false);
    write_idx_labels(&images, &[1, 2, 3]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BadMagic {
                found: 0x801,
                expected: 0x803,
                ..
            }
        ),
        "{err}"
    );
    assert_names_file(&err, &images);
    // And the other way round.
    let labels = file(dir.path(), 1, false);
    write_idx_images(&labels, 1, 1, 1, &[0]).unwrap();
    let err = read_idx_labels(&labels, 10).unwrap_err();
    assert!(matches!(
        err,
        DataError::BadMagic {
            found: 0x803,
            expected: 0x801,
            ..
        }
    ));
    assert_names_file(&err, &labels);
}

#[test]
fn truncated_file() {
    for gz in [false, true] {
        let (dir, train, _) = fake_fashion(gz);
        let images = file(dir.path(), 0, gz);
        let mut bytes = encode_idx(&[50, 28, 28], &train.pixels).unwrap();
        bytes.truncate(bytes.len() - 100);
        std::fs::write(&images, if gz { gzip(&bytes) } else { bytes }).unwrap();
        let err = load(dir.path()).unwrap_err();
        let full = 16 + 50 * 784;
        assert!(
            matches!(err, DataError::Truncated { expected, found, .. }
                if expected == full && found == full - 100),
            "{err}"
        );
        assert_names_file(&err, &images);
    }
}

#[test]
fn trailing_bytes() {
    for gz in [false, true] {
        let (dir, _, test) = fake_fashion(gz);
        let labels = file(dir.path(), 3, gz);
        let mut bytes = encode_idx(&[20], &test.labels).unwrap();
        bytes.extend_from_slice(&[0, 0, 0]);
        std::fs::write(&labels, if gz { gzip(&bytes) } else { bytes }).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::TrailingBytes {
                    expected: 28,
                    extra: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert_names_file(&err, &labels);
    }
}

#[test]
fn label_out_of_range() {
    let (dir, ..) = fake_fashion(true);
    let labels = file(dir.path(), 3, true);
    write_idx_labels(
        &labels,
        &[0, 1, 2, 10, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                label: 10,
                index: 3,
                num_classes: 10,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("{}: label 10 at index 3 is outside 0..9", labels.display())
    );
}

#[test]
fn mismatched_counts() {
    let (dir, train, _) = fake_fashion(false);
    let labels = file(dir.path(), 1, false);
    write_idx_labels(&labels, &train.labels[..49]).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::CountMismatch {
                n_images: 50,
                n_labels: 49,
                ..
            }
        ),
        "{err}"
    );
    assert_names_file(&err, &file(dir.path(), 0, false));
    assert!(err.to_string().contains(&labels.display().to_string()));
}

#[test]
fn wrong_image_size() {
    let (dir, ..) = fake_fashion(false);
    let images = file(dir.path(), 2, false);
    let small = synthetic_images(20, 27, 29, 10, 3).unwrap();
    write_idx_images(&images, 20, 27, 29, &small.pixels).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::BadDims { .. }), "{err}");
    assert!(err.to_string().contains("27x29, expected 28x28"));
    assert_names_file(&err, &images);
}

#[test]
fn corrupt_gzip() {
    let (dir, train, _) = fake_fashion(true);
    let images = file(dir.path(), 0, true);
    let good = gzip(&encode_idx(&[50, 28, 28], &train.pixels).unwrap());
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // Not gzip at all.
    cases.push((
        "not gzip",
        encode_idx(&[50, 28, 28], &train.pixels).unwrap(),
    ));
    // Cut inside the deflate stream.
    cases.push(("cut", good[..good.len() / 2].to_vec()));
    // Wrong CRC-32 in the trailer.
    let mut bad_crc = good.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    cases.push(("crc", bad_crc));
    // Garbage after the gzip member.
    let mut tail = good.clone();
    tail.extend_from_slice(b"garbage");
    cases.push(("tail", tail));
    for (what, bytes) in cases {
        std::fs::write(&images, bytes).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::BadGzip { .. }), "{what}: {err}");
        assert_names_file(&err, &images);
    }
}

#[test]
fn missing_file() {
    let (dir, ..) = fake_fashion(true);
    let labels = file(dir.path(), 1, true);
    std::fs::remove_file(&labels).unwrap();
    let err = load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(
        msg.contains("missing train-labels-idx1-ubyte[.gz]"),
        "{msg}"
    );
    assert!(
        msg.contains("sudo apt-get install dataset-fashion-mnist"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    // Reading a single missing file names it.
    let err = read_idx_labels(&labels, 10).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }));
    assert_names_file(&err, &labels);
}

#[test]
fn nothing_anywhere_says_what_was_tried() {
    let empty = tempfile::tempdir().unwrap();
    let err = resolve_fashion_mnist_dir_with(None, None, empty.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("tried {} (default)", empty.path().display())),
        "{msg}"
    );
    for name in FASHION_MNIST_FILES {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn standardization_is_exact_on_train() {
    let (dir, ..) = fake_fashion(false);
    let tt = load(dir.path()).unwrap();
    // Tolerance 1e-5: each feature is an f32 rounding (relative 6e-8) of the
    // exact value; the moments are then summed in f64.
    let (mean, std) = moments(&tt.train.features);
    assert!(
        mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5,
        "{mean} {std}"
    );
    let s = &tt.standardization;
    assert!(
        s.mean[0] > 0.3 && s.mean[0] < 0.7 && s.std[0] > 0.1,
        "{s:?}"
    );
    // The test set is mapped with the training statistics, not its own.
    let (test_mean, _) = moments(&tt.test.features);
    assert!(test_mean.abs() > 1e-4, "{test_mean}");
}

#[test]
fn limits_take_the_first_examples_after_full_validation() {
    let (dir, train, test) = fake_fashion(false);
    let opts = LoadOptions {
        train_limit: Some(7),
        test_limit: Some(1000),
        ..LoadOptions::default()
    };
    let tt = load_fashion_mnist(Some(dir.path()), &opts).unwrap();
    assert_eq!((tt.train.n, tt.test.n), (7, 20));
    assert_eq!(tt.train.labels, train.labels[..7]);
    assert_eq!(tt.train.features.len(), 7 * 784);
    assert_eq!(tt.test.labels, test.labels);
    // Statistics come from the examples kept.
    let (mean, std) = moments(&tt.train.features);
    assert!(mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5);

    let zero = LoadOptions {
        train_limit: Some(0),
        ..LoadOptions::default()
    };
    assert!(matches!(
        load_fashion_mnist(Some(dir.path()), &zero),
        Err(DataError::Invalid(m)) if m.contains("--train-limit")
    ));

    // A bad label after the kept prefix is still found.
    let mut labels = train.labels.clone();
    labels[49] = 200;
    write_idx_labels(&file(dir.path(), 1, false), &labels).unwrap();
    assert!(matches!(
        load_fashion_mnist(Some(dir.path()), &opts),
        Err(DataError::LabelOutOfRange { index: 49, .. })
    ));
}

#[test]
fn shuffler_is_deterministic_and_a_permutation() {
    let s = EpochShuffler::new(42);
    let a = s.permutation(1000, 3);
    assert_eq!(a, s.permutation(1000, 3));
    assert_eq!(a, epoch_permutation(1000, 42, 3));
    assert_ne!(a, s.permutation(1000, 4));
    assert_ne!(a, EpochShuffler::new(43).permutation(1000, 3));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert!(s.permutation(0, 0).is_empty());
    assert_eq!(s.permutation(1, 0), vec![0]);
}

#[test]
fn training_batches_drop_the_remainder() {
    let s = EpochShuffler::new(7);
    let b = s.train_batches(10, 4, 0).unwrap();
    assert_eq!((b.num_batches(), b.dropped(), b.batch_size()), (2, 2, 4));
    let batches: Vec<&[usize]> = b.iter().collect();
    assert_eq!(batches.len(), 2);
    assert!(batches.iter().all(|x| x.len() == 4));
    assert_eq!(batches.concat(), b.order()[..8]);
    assert_eq!(b.batch(1), Some(batches[1]));
    assert_eq!(b.batch(2), None);
    assert_eq!(s.train_batches(12, 4, 0).unwrap().dropped(), 0);
    assert!(s.train_batches(10, 0, 0).is_err());
    assert!(s.train_batches(10, 11, 0).is_err());
}

#[test]
fn gather_and_eval_batches() {
    let ds = synthetic_clusters(10, 3, 2, 1.0, 5).unwrap();
    let b = EpochShuffler::new(1).train_batches(ds.n, 4, 0).unwrap();
    for idx in &b {
        let batch = ds.gather(idx);
        assert_eq!((batch.size, batch.dim, batch.features.len()), (4, 3, 12));
        for (row, &i) in idx.iter().enumerate() {
            assert_eq!(&batch.features[row * 3..][..3], ds.example(i));
            assert_eq!(batch.labels[row], ds.labels[i]);
        }
    }
    // Evaluation sees every example exactly once, in order.
    let mut seen = Vec::new();
    for r in eval_batches(ds.n, 4).unwrap() {
        let (f, l) = ds.rows(r.clone());
        assert_eq!(f.len(), 3 * r.len());
        seen.extend_from_slice(l);
    }
    assert_eq!(seen, ds.labels);
}

#[test]
fn cifar10_through_dataset_kind() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (i, name) in names.iter().enumerate() {
        let px = vec![(i * 40) as u8; 2 * 3072];
        write_cifar10_file(&dir.path().join(name), &[i as u8, 9], &px).unwrap();
    }
    let opts = LoadOptions::default();
    let tt = DatasetKind::Cifar10.load(Some(dir.path()), &opts).unwrap();
    assert_eq!((tt.train.n, tt.test.n, tt.train.num_classes), (10, 2, 10));
    let (mean, std) = moments(&tt.train.features);
    assert!(mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5);
    // Label 10 in a CIFAR-10 file.
    let bad = dir.path().join("test_batch.bin");
    write_cifar10_file(&bad, &[1, 10], &vec![0; 2 * 3072]).unwrap();
    let err = DatasetKind::Cifar10
        .load(Some(dir.path()), &opts)
        .unwrap_err();
    assert!(
        matches!(err, DataError::LabelOutOfRange { index: 1, .. }),
        "{err}"
    );
    assert_names_file(&err, &bad);
    // CIFAR has no default location.
    assert!(matches!(
        DatasetKind::Cifar100.load(None, &opts),
        Err(DataError::Invalid(_))
    ));
}

const CIFAR10_NAMES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// Pixel bytes of `n` CIFAR records whose three channels have different
/// distributions (channel c in 40c..40c+160), so that a scalar map could not
/// pass the per-channel checks.
fn cifar_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..n * 3072)
        .map(|i| {
            let c = (i % 3072) / 1024;
            (splitmix64(&mut state) % 160) as u8 + 40 * c as u8
        })
        .collect()
}

/// Per-channel mean and population standard deviation of `pixel / 255` over
/// CIFAR records, naively in f64 (flat index -> channel by division).
fn naive_channel_moments(pixels: &[u8]) -> Vec<(f64, f64)> {
    (0..3)
        .map(|c| {
            let vals: Vec<f64> = pixels
                .iter()
                .enumerate()
                .filter(|(i, _)| (i % 3072) / 1024 == c)
                .map(|(_, &p)| f64::from(p) / 255.0)
                .collect();
            let n = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / n;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        })
        .collect()
}

/// Checks a loaded CIFAR split pixel by pixel against the bytes written:
/// feature `[k, c, y, x]` is `table_c[byte]` for the byte at record `k`,
/// plane `c` (red, green, blue), row-major position `(y, x)`.
fn assert_decoded(ds: &Dataset, s: &Standardization, pixels: &[u8]) {
    assert_eq!(ds.shape, vec![3, 32, 32]);
    assert_eq!(ds.features.len(), pixels.len());
    let tables: Vec<[f32; 256]> = (0..3).map(|c| s.u8_table(c)).collect();
    for k in 0..ds.n {
        for (c, table) in tables.iter().enumerate() {
            for y in 0..32 {
                for x in 0..32 {
                    let at = k * 3072 + c * 1024 + y * 32 + x;
                    let want = table[usize::from(pixels[at])];
                    assert_eq!(
                        ds.features[at].to_bits(),
                        want.to_bits(),
                        "example {k} channel {c} pixel ({y}, {x})"
                    );
                }
            }
        }
    }
}

/// Checks the per-channel statistics of a loaded CIFAR data set against a
/// naive computation from the training bytes, and that the training
/// features are mean 0, std 1 in each channel.
fn assert_channel_standardized(tt: &TrainTest, train_pixels: &[u8]) {
    let s = &tt.standardization;
    assert_eq!((s.mean.len(), s.std.len()), (3, 3));
    for (c, (mean, std)) in naive_channel_moments(train_pixels).into_iter().enumerate() {
        // Tolerance 1e-11: the naive sums run over at most 15 * 1024 values
        // of size <= 1, so each side's rounding error is below
        // 15360 * 2^-53 ~ 2e-12.
        assert!((s.mean[c] - mean).abs() < 1e-11, "channel {c}: {s:?}");
        assert!((s.std[c] - std).abs() < 1e-11, "channel {c}: {s:?}");
        // Table entries: one f32 rounding of values below 8 in magnitude
        // (half an ulp is 4.8e-7), next to which the f64 differences above
        // are negligible.
        let table = s.u8_table(c);
        for (v, &got) in table.iter().enumerate() {
            let want = (v as f64 / 255.0 - mean) / std;
            assert!((f64::from(got) - want).abs() < 1e-6, "channel {c} byte {v}");
        }
        // Each channel of the training features is standardized on its own.
        // Tolerance 1e-5, as for Fashion-MNIST: every feature is the exact
        // value rounded to f32 (absolute error below 5e-7 here), and the
        // moments are then summed in f64.
        let values: Vec<f32> = tt
            .train
            .features
            .chunks_exact(1024)
            .skip(c)
            .step_by(3)
            .flatten()
            .copied()
            .collect();
        let (m, sd) = moments(&values);
        assert!(
            m.abs() < 1e-5 && (sd - 1.0).abs() < 1e-5,
            "channel {c}: {m} {sd}"
        );
    }
    // The channels' statistics differ, so they were not pooled.
    assert!(
        s.mean[1] - s.mean[0] > 0.1 && s.mean[2] - s.mean[1] > 0.1,
        "{s:?}"
    );
}

#[test]
fn cifar10_decodes_pixel_by_pixel_with_per_channel_standardization() {
    let dir = tempfile::tempdir().unwrap();
    let (mut train_pixels, mut train_labels) = (Vec::new(), Vec::new());
    let (mut test_pixels, mut test_labels) = (Vec::new(), Vec::new());
    for (i, name) in CIFAR10_NAMES.iter().enumerate() {
        let n = if i < 5 { 3 } else { 4 };
        let labels: Vec<u8> = (0..n).map(|j| ((7 * i + j) % 10) as u8).collect();
        let px = cifar_bytes(n, i as u64);
        write_cifar10_file(&dir.path().join(name), &labels, &px).unwrap();
        if i < 5 {
            train_pixels.extend(px);
            train_labels.extend(labels);
        } else {
            test_pixels.extend(px);
            test_labels.extend(labels);
        }
    }
    let tt = DatasetKind::Cifar10
        .load(Some(dir.path()), &LoadOptions::default())
        .unwrap();
    assert_eq!((tt.train.n, tt.test.n, tt.train.num_classes), (15, 4, 10));
    assert_eq!(tt.train.labels, train_labels);
    assert_eq!(tt.test.labels, test_labels);
    assert_decoded(&tt.train, &tt.standardization, &train_pixels);
    // The test set goes through the training set's tables.
    assert_decoded(&tt.test, &tt.standardization, &test_pixels);
    assert_channel_standardized(&tt, &train_pixels);
}

#[test]
fn cifar100_fine_and_coarse_decode_pixel_by_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let train_pixels = cifar_bytes(6, 100);
    let test_pixels = cifar_bytes(3, 101);
    let (coarse, fine) = ([0, 19, 4, 7, 11, 3], [5, 99, 0, 42, 17, 64]);
    write_cifar100_file(&dir.path().join("train.bin"), &coarse, &fine, &train_pixels).unwrap();
    write_cifar100_file(
        &dir.path().join("test.bin"),
        &[1, 2, 18],
        &[98, 3, 50],
        &test_pixels,
    )
    .unwrap();
    let opts = LoadOptions::default();
    let by_fine = DatasetKind::Cifar100.load(Some(dir.path()), &opts).unwrap();
    let by_coarse = DatasetKind::Cifar100Coarse
        .load(Some(dir.path()), &opts)
        .unwrap();
    assert_eq!(
        (by_fine.train.labels.as_slice(), by_fine.train.num_classes),
        (&fine[..], 100)
    );
    assert_eq!(by_fine.test.labels, vec![98, 3, 50]);
    assert_eq!(
        (
            by_coarse.train.labels.as_slice(),
            by_coarse.train.num_classes
        ),
        (&coarse[..], 20)
    );
    assert_eq!(by_coarse.test.labels, vec![1, 2, 18]);
    for tt in [&by_fine, &by_coarse] {
        assert_decoded(&tt.train, &tt.standardization, &train_pixels);
        assert_decoded(&tt.test, &tt.standardization, &test_pixels);
        assert_channel_standardized(tt, &train_pixels);
    }
    assert_eq!(by_fine.standardization, by_coarse.standardization);
}

/// The augmentation written out the slow way: pad each channel with its fill
/// value into a `(H + 2p) x (W + 2p)` image, crop `H x W` at `(dy, dx)`,
/// then read columns right to left when flipping.
fn naive_augment(
    image: &[f32],
    [c, h, w]: [usize; 3],
    fill: &[f32],
    p: usize,
    d: AugmentDraw,
) -> Vec<f32> {
    let (ph, pw) = (h + 2 * p, w + 2 * p);
    let mut padded = Vec::new();
    for &f in fill.iter().take(c) {
        padded.extend(std::iter::repeat_n(f, ph * pw));
    }
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                padded[ch * ph * pw + (y + p) * pw + (x + p)] = image[ch * h * w + y * w + x];
            }
        }
    }
    let mut out = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let col = if d.flip { w - 1 - x } else { x };
                out.push(padded[ch * ph * pw + (y + d.dy) * pw + (col + d.dx)]);
            }
        }
    }
    out
}

/// `n` images of `shape` with distinct, seeded values in [-2, 2), labels
/// `i % 10`.
fn random_images(n: usize, shape: [usize; 3], seed: u64) -> Dataset {
    let dim: usize = shape.iter().product();
    let mut state = seed;
    let features = (0..n * dim)
        .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 22) as f32 - 2.0)
        .collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset::new(features, labels, shape.to_vec(), 10).unwrap()
}

#[test]
fn augmentation_matches_a_naive_reference() {
    // Exact equality: augmentation only moves values, no arithmetic. The
    // small shapes get enough draws to meet every (dy, dx, flip) of their
    // padding, including paddings larger than a side (crops with no pixel).
    let fill = [-7.25f32, 9.5, -11.0];
    for (shape, padding, n, full_cover) in [
        ([3, 32, 32], 4, 300, false),
        ([2, 5, 7], 3, 1500, true),
        ([1, 3, 4], 4, 2000, true),
        ([1, 1, 1], 1, 400, true),
    ] {
        let ds = random_images(n, shape, 11);
        let aug = Augmentation {
            crop_padding: padding,
            flip: true,
        };
        let fill = &fill[..shape[0]];
        let mut seen = BTreeSet::new();
        let mut batch = Batch::default();
        for (seed, epoch) in [(0u64, 0u64), (1, 7), (12345, 1)] {
            let order = epoch_permutation(n, seed, epoch);
            ds.gather_augmented_into(&order, &aug, fill, seed, epoch, &mut batch);
            assert_eq!((batch.size, batch.dim), (n, ds.dim));
            for (row, &i) in order.iter().enumerate() {
                let d = aug.draw(seed, epoch, i);
                assert!(d.dy <= 2 * padding && d.dx <= 2 * padding, "{d:?}");
                seen.insert((d.dy, d.dx, d.flip));
                let want = naive_augment(ds.example(i), shape, fill, padding, d);
                let got = &batch.features[row * ds.dim..][..ds.dim];
                assert!(
                    got.iter()
                        .map(|x| x.to_bits())
                        .eq(want.iter().map(|x| x.to_bits())),
                    "shape {shape:?} padding {padding} example {i} {d:?}"
                );
                assert_eq!(batch.labels[row], ds.labels[i]);
            }
        }
        if full_cover {
            let all = (2 * padding + 1).pow(2) * 2;
            assert_eq!(seen.len(), all, "shape {shape:?} padding {padding}");
        }
    }
}

#[test]
fn augmented_cifar_pads_with_the_standardized_zero_byte() {
    // End to end on loaded CIFAR-10: padding with `fill_values` after
    // standardizing equals padding the raw bytes with 0 (PyTorch's order)
    // and then standardizing, bit for bit.
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Vec::new();
    for (i, name) in CIFAR10_NAMES.iter().enumerate() {
        let px = cifar_bytes(4, 50 + i as u64);
        write_cifar10_file(&dir.path().join(name), &[1, 2, 3, 4], &px).unwrap();
        if i < 5 {
            raw.extend(px);
        }
    }
    let tt = DatasetKind::Cifar10
        .load(Some(dir.path()), &LoadOptions::default())
        .unwrap();
    let s = &tt.standardization;
    let fill = s.fill_values();
    let aug = DatasetKind::Cifar10.default_augmentation().unwrap();
    let mut batch = Batch::default();
    let indices: Vec<usize> = (0..tt.train.n).collect();
    tt.train
        .gather_augmented_into(&indices, &aug, &fill, 3, 2, &mut batch);
    let tables: Vec<[f32; 256]> = (0..3).map(|c| s.u8_table(c)).collect();
    for &i in &indices {
        let d = aug.draw(3, 2, i);
        let bytes: Vec<f32> = raw[i * 3072..][..3072]
            .iter()
            .map(|&b| f32::from(b))
            .collect();
        // The naive reference on raw bytes (as f32, exact), padded with 0.
        let padded_raw = naive_augment(&bytes, [3, 32, 32], &[0.0; 3], 4, d);
        for (at, (&got, &b)) in batch.features[i * 3072..][..3072]
            .iter()
            .zip(&padded_raw)
            .enumerate()
        {
            let want = tables[at / 1024][b as usize];
            assert_eq!(got.to_bits(), want.to_bits(), "example {i} at {at} {d:?}");
        }
    }
}

#[test]
fn augmentation_is_deterministic_and_keyed_by_seed_epoch_and_index() {
    let ds = random_images(64, [3, 8, 8], 3);
    let aug = Augmentation::cifar();
    let fill = [0.5f32; 3];
    let idx: Vec<usize> = (0..64).collect();
    let gather = |seed, epoch| {
        let mut b = Batch::default();
        ds.gather_augmented_into(&idx, &aug, &fill, seed, epoch, &mut b);
        b.features.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(gather(9, 4), gather(9, 4));
    assert_ne!(gather(9, 4), gather(9, 5));
    assert_ne!(gather(9, 4), gather(10, 4));
    // Independent draws coincide with probability 1/162 (9 * 9 * 2
    // outcomes): about 6 of 1000 keys, binomial standard deviation 2.5. At
    // most 25 (7.6 standard deviations) flags draws that ignore the epoch,
    // the index or the seed.
    let same = |f: &dyn Fn(usize) -> (AugmentDraw, AugmentDraw)| {
        (0..1000)
            .filter(|&i| {
                let (a, b) = f(i);
                a == b
            })
            .count()
    };
    let by_epoch = same(&|i| (aug.draw(5, 0, i), aug.draw(5, 1, i)));
    let by_index = same(&|i| (aug.draw(5, 0, i), aug.draw(5, 0, i + 1)));
    let by_seed = same(&|i| (aug.draw(5, 0, i), aug.draw(6, 0, i)));
    assert!(
        by_epoch <= 25 && by_index <= 25 && by_seed <= 25,
        "{by_epoch} {by_index} {by_seed}"
    );
}

#[test]
fn augmentation_without_padding_or_flip_is_the_identity() {
    let ds = random_images(20, [3, 32, 32], 4);
    let off = Augmentation {
        crop_padding: 0,
        flip: false,
    };
    let idx = [19, 0, 7, 7, 3];
    let plain = ds.gather(&idx);
    for (seed, epoch) in [(0, 0), (1, 1), (u64::MAX, 99)] {
        let mut b = Batch::default();
        ds.gather_augmented_into(&idx, &off, &[1e9; 3], seed, epoch, &mut b);
        assert_eq!(
            b.features.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            plain
                .features
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            (b.labels.as_slice(), b.size, b.dim),
            (&plain.labels[..], 5, 3072)
        );
        assert!((0..1000).all(|i| off.draw(seed, epoch, i)
            == AugmentDraw {
                dy: 0,
                dx: 0,
                flip: false
            }));
    }
}

#[test]
fn augmentation_offsets_and_flips_are_uniform() {
    // 16200 keys, 100 expected per (dy, dx, flip) cell.
    let aug = Augmentation::cifar();
    let n = 16_200;
    let (mut dy, mut dx, mut flips) = ([0u32; 9], [0u32; 9], 0u32);
    let mut joint = vec![0u32; 162];
    for i in 0..n {
        let d = aug.draw(77, 3, i);
        dy[d.dy] += 1;
        dx[d.dx] += 1;
        flips += u32::from(d.flip);
        joint[(d.dy * 9 + d.dx) * 2 + usize::from(d.flip)] += 1;
    }
    // Each offset value: binomial(16200, 1/9), mean 1800, standard deviation
    // sqrt(16200 * 1/9 * 8/9) = 40; 5 standard deviations = 200, a false
    // failure probability below 1e-6 per count.
    for c in dy.iter().chain(&dx) {
        assert!((1600..=2000).contains(c), "{dy:?} {dx:?}");
    }
    // Flips: binomial(16200, 1/2), mean 8100, standard deviation 63.6; 5
    // standard deviations = 318.
    assert!((7782..=8418).contains(&flips), "{flips}");
    // Independence of the three choices: chi-square over the 162 cells,
    // 161 degrees of freedom (mean 161, standard deviation 17.9); 270 is
    // 6 standard deviations above the mean.
    let chi2: f64 = joint
        .iter()
        .map(|&c| (f64::from(c) - 100.0).powi(2) / 100.0)
        .sum();
    assert!(chi2 < 270.0, "chi-square {chi2}");
    // Flipping off: never flipped.
    let no_flip = Augmentation { flip: false, ..aug };
    assert!((0..1000).all(|i| !no_flip.draw(77, 3, i).flip));
}

#[test]
fn augmentation_is_the_same_however_the_batch_is_split() {
    let ds = random_images(30, [3, 32, 32], 5);
    let aug = Augmentation::cifar();
    let fill = [-1.0f32, -2.0, -3.0];
    let (a, b, c, d) = (17, 2, 29, 8);
    let gather = |idx: &[usize]| {
        let mut batch = Batch::default();
        ds.gather_augmented_into(idx, &aug, &fill, 42, 6, &mut batch);
        batch
    };
    let whole = gather(&[a, b, c, d]);
    let first = gather(&[a, b]);
    let second = gather(&[c, d]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&whole.features),
        bits(&[first.features, second.features].concat())
    );
    assert_eq!(whole.labels, [first.labels, second.labels].concat());
    // Reversed order: the same rows, reversed (keyed by index, not position).
    let reversed = gather(&[d, c, b, a]);
    let dim = ds.dim;
    for row in 0..4 {
        assert_eq!(
            bits(&reversed.features[row * dim..][..dim]),
            bits(&whole.features[(3 - row) * dim..][..dim])
        );
    }
}

#[test]
fn augmented_gather_reuses_the_batch() {
    // Speed is measured by `covnoise bench`, not here; this checks that the
    // buffer from the first call is reused (no allocation per batch).
    let ds = random_images(512, [3, 32, 32], 6);
    let aug = Augmentation::cifar();
    let fill = [0.0f32; 3];
    let mut batch = Batch::default();
    let batches = EpochShuffler::new(1).train_batches(ds.n, 128, 0).unwrap();
    let first = batches.batch(0).unwrap();
    ds.gather_augmented_into(first, &aug, &fill, 1, 0, &mut batch);
    let (ptr, cap) = (batch.features.as_ptr(), batch.features.capacity());
    for epoch in 0..8 {
        let idx = batches.batch(epoch as usize % 4).unwrap();
        ds.gather_augmented_into(idx, &aug, &fill, 1, epoch, &mut batch);
        assert_eq!(
            (batch.features.as_ptr(), batch.features.capacity()),
            (ptr, cap)
        );
    }
}

/// The real data set, when Debian's package is installed (skipped otherwise).
#[test]
fn real_fashion_mnist_when_installed() {
    let dir = Path::new(FASHION_MNIST_DEFAULT_DIR);
    if resolve_fashion_mnist_dir_with(Some(dir), None, dir).is_err() {
        eprintln!(
            "skipped: Fashion-MNIST not installed at {} \
             (sudo apt-get install dataset-fashion-mnist)",
            dir.display()
        );
        return;
    }
    let start = Instant::now();
    let tt = load_fashion_mnist(Some(dir), &LoadOptions::default()).unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "loaded real Fashion-MNIST in {secs:.3} s; mean {:?}, std {:?}",
        tt.standardization.mean, tt.standardization.std
    );
    assert_eq!((tt.train.n, tt.test.n), (60_000, 10_000));
    assert_eq!((tt.train.dim, tt.test.dim), (784, 784));
    assert_eq!(tt.train.class_counts(), vec![6000; 10]);
    assert_eq!(tt.test.class_counts(), vec![1000; 10]);
    // Published statistics of Fashion-MNIST pixels / 255: mean 0.2860, std 0.3530.
    let s = &tt.standardization;
    assert!(
        (s.mean[0] - 0.2860).abs() < 1e-3 && (s.std[0] - 0.3530).abs() < 1e-3,
        "{s:?}"
    );
    // One channel keeps, bit for bit, the values the former scalar
    // standardization gave (printed by it with `{:?}` before the change), so
    // runs recorded before per-channel statistics are reproduced exactly.
    assert_eq!(s.mean, vec![0.28604059698879547]);
    assert_eq!(s.std, vec![0.35302424451492254]);
    let (mean, std) = moments(&tt.train.features);
    assert!(
        mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5,
        "{mean} {std}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes, plain or claimed gzip: an answer, never a panic.
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), gz in any::<bool>()) {
        let p = Path::new("fuzz");
        if gz {
            let _ = decode_idx(p, flate2::read::MultiGzDecoder::new(&bytes[..]), true, None);
        } else {
            let _ = decode_idx(p, &bytes[..], false, None);
            let _ = decode_idx(p, &bytes[..], false, Some((0x803, "images")));
        }
    }

    /// A plausible header followed by random bytes.
    #[test]
    fn decode_after_valid_prefix_never_panics(
        ndims in 0u8..5,
        dims in proptest::collection::vec(0u32..6, 0..5),
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![0, 0, 8, ndims];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(&rest);
        let _ = decode_idx(Path::new("fuzz"), &bytes[..], false, None);
    }

    /// A valid file, one byte changed or cut anywhere: no panic, and any
    /// file accepted has exactly the length its header describes.
    #[test]
    fn mutated_valid_file_never_panics(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
        gz in any::<bool>(),
    ) {
        let data: Vec<u8> = (0..60).collect();
        let mut bytes = encode_idx(&[3, 4, 5], &data).unwrap();
        if gz {
            bytes = gzip(&bytes);
        }
        let i = pos.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = byte }
        let result = if gz {
            decode_idx(Path::new("f"), flate2::read::MultiGzDecoder::new(&bytes[..]), true, None)
        } else {
            decode_idx(Path::new("f"), &bytes[..], false, None)
        };
        if let Ok(arr) = result {
            prop_assert_eq!(arr.dims.iter().product::<usize>(), arr.data.len());
        }
    }

    /// encode then decode is the identity.
    #[test]
    fn encode_decode_identity(dims in proptest::collection::vec(0usize..5, 1..4), seed in any::<u8>()) {
        let len: usize = dims.iter().product();
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
        let bytes = encode_idx(&dims, &data).unwrap();
        let arr = decode_idx(Path::new("f"), &bytes[..], false, None).unwrap();
        prop_assert_eq!(arr.dims, dims);
        prop_assert_eq!(arr.data, data);
    }
}

/// `--inputs raw` gives the pixel values, `unit` pixel / 255, and
/// `--train-on test` trains on the test file (its first N with
/// `--train-limit N`) and tests on the training file, bit for bit.
#[test]
fn input_scaling_and_the_training_file_are_choices() {
    use covnoise_lab::data::InputScaling;
    let (dir, train, test) = fake_fashion(false);
    let with = |scaling, swap_splits, train_limit| {
        load_fashion_mnist(
            Some(dir.path()),
            &LoadOptions {
                train_limit,
                scaling,
                swap_splits,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let raw = with(InputScaling::Raw, false, None);
    let pixels: Vec<f32> = train.pixels.iter().map(|&p| f32::from(p)).collect();
    assert_eq!(raw.train.features, pixels);
    let unit = with(InputScaling::Unit, false, None);
    let scaled: Vec<f32> = train
        .pixels
        .iter()
        .map(|&p| (f64::from(p) / 255.0) as f32)
        .collect();
    assert_eq!(unit.train.features, scaled);
    assert_eq!(unit.standardization.fill_values(), vec![0.0]);
    // The default standardizes: mean 0 over the training set.
    let standard = with(InputScaling::Standardized, false, None);
    let mean = standard
        .train
        .features
        .iter()
        .map(|&x| f64::from(x))
        .sum::<f64>()
        / standard.train.features.len() as f64;
    assert!(mean.abs() < 1e-5, "{mean}");
    // Swapped: the first 7 test images train, all training images test.
    let swapped = with(InputScaling::Raw, true, Some(7));
    assert_eq!(swapped.train.n, 7);
    assert_eq!(swapped.train.labels, test.labels[..7]);
    let test_pixels: Vec<f32> = test.pixels[..7 * 784]
        .iter()
        .map(|&p| f32::from(p))
        .collect();
    assert_eq!(swapped.train.features, test_pixels);
    assert_eq!(swapped.test.n, train.n);
    assert_eq!(swapped.test.labels, train.labels);
}

/// `--sampling step`: every step draws B distinct examples, the epoch has
/// n / B steps, the draws depend only on (seed, epoch), and across many
/// steps every example is drawn about equally often (each with probability
/// B/n per step).
#[test]
fn per_step_sampling_draws_distinct_examples_independently() {
    use covnoise_lab::data::Sampling;
    let (n, b) = (20, 5);
    let shuffler = EpochShuffler::new(3);
    let a = shuffler.batches(n, b, 0, Sampling::Step).unwrap();
    assert_eq!(a.num_batches(), n / b);
    assert_eq!(a, shuffler.batches(n, b, 0, Sampling::Step).unwrap());
    assert_ne!(a, shuffler.batches(n, b, 1, Sampling::Step).unwrap());
    let mut counts = vec![0usize; n];
    let epochs = 2000;
    let mut steps_with_repeats_across = 0;
    for epoch in 0..epochs {
        let batches = shuffler.batches(n, b, epoch, Sampling::Step).unwrap();
        let mut seen = BTreeSet::new();
        for batch in batches.iter() {
            let distinct: BTreeSet<_> = batch.iter().collect();
            assert_eq!(distinct.len(), b, "a batch repeats an example");
            assert!(batch.iter().all(|&i| i < n));
            for &i in batch {
                counts[i] += 1;
                if !seen.insert(i) {
                    steps_with_repeats_across += 1;
                }
            }
        }
    }
    // Steps are independent: within an epoch examples recur across steps
    // (a permutation never would).
    assert!(steps_with_repeats_across > 0);
    // Each example: Binomial(epochs * n/b, b/n), mean 2000, sd ~38.7; 5 sd.
    let expected = (epochs as usize * (n / b) * b / n) as f64;
    for (i, &c) in counts.iter().enumerate() {
        assert!(
            (c as f64 - expected).abs() < 5.0 * (expected * (1.0 - 0.25)).sqrt(),
            "example {i}: {c}"
        );
    }
    // Per-epoch sampling is the shuffler's permutation, unchanged.
    assert_eq!(
        shuffler.batches(n, b, 4, Sampling::Epoch).unwrap(),
        shuffler.train_batches(n, b, 4).unwrap()
    );
}
