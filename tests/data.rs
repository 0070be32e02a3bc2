//! Integration tests of `covnoise::data` through its public API: IDX round
//! trips, every kind of corrupt file, preprocessing, limits, shuffling and
//! batching, CIFAR, the real Fashion-MNIST when installed, and a parser that
//! never panics on random bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use covnoise::data::{
    DataError, DatasetKind, DirOrigin, EpochShuffler, FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_FILES, LoadOptions, RawImages, TrainTest, decode_idx, encode_idx,
    epoch_permutation, eval_batches, load_fashion_mnist, read_idx, read_idx_images,
    read_idx_labels, resolve_fashion_mnist_dir_with, synthetic_clusters, synthetic_images,
    write_cifar10_file, write_fashion_mnist_dir, write_idx, write_idx_images, write_idx_labels,
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
        let s = tt.standardization;
        for (&f, &p) in tt.test.features.iter().zip(&test.pixels).step_by(97) {
            let want = ((f64::from(p) / 255.0 - s.mean) / s.std) as f32;
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
    let s = tt.standardization;
    assert!(s.mean > 0.3 && s.mean < 0.7 && s.std > 0.1, "{s:?}");
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
        "loaded real Fashion-MNIST in {secs:.3} s; mean {:.6}, std {:.6}",
        tt.standardization.mean, tt.standardization.std
    );
    assert_eq!((tt.train.n, tt.test.n), (60_000, 10_000));
    assert_eq!((tt.train.dim, tt.test.dim), (784, 784));
    assert_eq!(tt.train.class_counts(), vec![6000; 10]);
    assert_eq!(tt.test.class_counts(), vec![1000; 10]);
    // Published statistics of Fashion-MNIST pixels / 255: mean 0.2860, std 0.3530.
    let s = tt.standardization;
    assert!(
        (s.mean - 0.2860).abs() < 1e-3 && (s.std - 0.3530).abs() < 1e-3,
        "{s:?}"
    );
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
