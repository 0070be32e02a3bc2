//! The IDX format (LeCun's MNIST format), read and written, plain or gzip.
//!
//! An IDX file is a 4-byte big-endian magic number `0x0000TTNN` (TT the
//! element type, 0x08 = unsigned byte; NN the number of dimensions), then NN
//! big-endian `u32` dimension sizes, then the elements in row-major order.
//! Only unsigned-byte files are read: that is what image and label files use.
//!
//! The reader streams, checks the header before it reads the data (so a wrong
//! magic number is reported as such, not as a size problem), never allocates
//! more than the bytes actually present (a header may claim any size), and
//! reads to the end of the file so that trailing bytes and, for gzip, the CRC
//! are always checked.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use super::error::DataError;

/// Magic number of an IDX file of unsigned-byte images: 3 dimensions (n, rows, cols).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels: 1 dimension (n).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// IDX element type code for unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// The first read allocates at most this much; the buffer grows only as real
/// bytes arrive, so a lying header cannot make us allocate gigabytes.
const MAX_INITIAL_CAPACITY: usize = 1 << 26;

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimension sizes from the header, outermost first (e.g. `[n, rows, cols]`).
    pub dims: Vec<usize>,
    /// The elements, row-major; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Unsigned-byte images with labels, as stored in IDX files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImages {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// Row-major `[n, rows, cols]`.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
}

/// True when the path names a gzip file (`*.gz`). Compression follows the
/// name, both when reading and when writing, so a file written by
/// [`write_idx`] is always read back the same way.
pub(crate) fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

/// A byte source that knows its path, so read errors name the file and, for
/// gzip files, are reported as corrupt gzip rather than as I/O errors.
pub(crate) struct Source<'p, R> {
    path: &'p Path,
    gzip: bool,
    reader: R,
}

impl<'p, R: Read> Source<'p, R> {
    fn err(&self, e: io::Error) -> DataError {
        if self.gzip && e.kind() != io::ErrorKind::Interrupted {
            DataError::BadGzip {
                path: self.path.to_path_buf(),
                detail: e.to_string(),
            }
        } else {
            DataError::io(self.path, e)
        }
    }

    /// Fills as much of `buf` as the source holds; returns the count.
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(got)
    }

    /// Reads up to `limit` bytes into a new buffer.
    fn read_limited(&mut self, limit: u64) -> Result<Vec<u8>, DataError> {
        let cap = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(MAX_INITIAL_CAPACITY);
        let mut out = Vec::with_capacity(cap);
        let r = (&mut self.reader).take(limit).read_to_end(&mut out);
        r.map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Reads to the end and returns how many bytes were left. Reading to the
    /// end is also what makes the gzip decoder check the CRC and length.
    fn count_rest(&mut self) -> Result<u64, DataError> {
        let r = io::copy(&mut self.reader, &mut io::sink());
        r.map_err(|e| self.err(e))
    }
}

/// Opens `path` (decompressing `*.gz`) and hands the source to `f`.
pub(crate) fn with_source<T>(
    path: &Path,
    f: impl FnOnce(&mut Source<'_, Box<dyn Read>>) -> Result<T, DataError>,
) -> Result<T, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let gzip = is_gz(path);
    let reader: Box<dyn Read> = if gzip {
        // Multi-member: concatenated gzip members are valid gzip (RFC 1952),
        // and anything else after the first member is then reported as corrupt
        // rather than silently ignored.
        Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    };
    f(&mut Source { path, gzip, reader })
}

/// Reads a whole file (decompressing `*.gz`) into memory.
pub(crate) fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    with_source(path, |src| src.read_limited(u64::MAX))
}

/// Decodes an IDX array from `reader`; `path` is only used in errors and
/// `gzip` says whether read errors mean corrupt gzip data.
///
/// With `expected_magic`, the magic number must equal it exactly (`what`
/// describes it for the error message); without, any unsigned-byte IDX file
/// with at least one dimension is accepted.
///
/// Never panics, whatever the bytes.
pub fn decode_idx<R: Read>(
    path: &Path,
    reader: R,
    gzip: bool,
    expected_magic: Option<(u32, &'static str)>,
) -> Result<IdxArray, DataError> {
    let mut src = Source { path, gzip, reader };
    decode_source(&mut src, expected_magic)
}

fn decode_source<R: Read>(
    src: &mut Source<'_, R>,
    expected_magic: Option<(u32, &'static str)>,
) -> Result<IdxArray, DataError> {
    let path = src.path;
    let mut magic_bytes = [0u8; 4];
    let got = src.read_up_to(&mut magic_bytes)?;
    if got < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: 4,
            found: got as u64,
        });
    }
    let magic = u32::from_be_bytes(magic_bytes);
    // Raw gzip in a file not named *.gz is a common mistake; say so.
    let hint = if magic_bytes[..2] == [0x1f, 0x8b] {
        "; the file looks gzip-compressed: give it a .gz name"
    } else {
        ""
    };
    let ndims = usize::from(magic_bytes[3]);
    match expected_magic {
        Some((expected, what)) if magic != expected => {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
                expected,
                what,
                hint,
            });
        }
        None if magic_bytes[..3] != [0, 0, TYPE_U8] || ndims == 0 => {
            return Err(DataError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
                expected: (u32::from(TYPE_U8) << 8) | u32::from(magic_bytes[3].max(1)),
                what: "IDX of unsigned bytes, at least one dimension",
                hint,
            });
        }
        _ => {}
    }
    if ndims == 0 {
        // Only reachable with an expected magic of 0 dimensions; refuse it.
        return Err(DataError::BadDims {
            path: path.to_path_buf(),
            detail: "zero dimensions".to_string(),
        });
    }

    let header_len = 4 + 4 * ndims;
    let mut dim_bytes = vec![0u8; 4 * ndims];
    let got = src.read_up_to(&mut dim_bytes)?;
    if got < dim_bytes.len() {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64,
            found: (4 + got) as u64,
        });
    }
    let dims: Vec<usize> = dim_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let total = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&t| usize::try_from(t).is_ok())
        .ok_or_else(|| DataError::BadDims {
            path: path.to_path_buf(),
            detail: format!("{dims:?} holds more elements than this machine can address"),
        })?;
    let expected_len = header_len as u64 + total;

    let data = src.read_limited(total)?;
    if (data.len() as u64) < total {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: expected_len,
            found: header_len as u64 + data.len() as u64,
        });
    }
    let extra = src.count_rest()?;
    if extra > 0 {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected: expected_len,
            extra,
        });
    }
    Ok(IdxArray { dims, data })
}

/// Reads any unsigned-byte IDX file (`*.gz` is decompressed).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    with_source(path, |src| decode_source(src, None))
}

/// Reads an IDX images file: magic `0x00000803`, dims `[n, rows, cols]`.
/// Any image size is accepted here; callers check it.
pub fn read_idx_images(path: &Path) -> Result<IdxArray, DataError> {
    with_source(path, |src| {
        decode_source(
            src,
            Some((IDX_IMAGES_MAGIC, "IDX images: unsigned bytes, 3 dimensions")),
        )
    })
}

/// Reads an IDX labels file (magic `0x00000801`) and checks every label is
/// in `0..num_classes`.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u8>, DataError> {
    let arr = with_source(path, |src| {
        decode_source(
            src,
            Some((IDX_LABELS_MAGIC, "IDX labels: unsigned bytes, 1 dimension")),
        )
    })?;
    check_labels(path, "label", &arr.data, 1, 0, num_classes)?;
    Ok(arr.data)
}

/// Checks the label at byte `offset` of each `stride`-byte record.
pub(crate) fn check_labels(
    path: &Path,
    kind: &'static str,
    bytes: &[u8],
    stride: usize,
    offset: usize,
    num_classes: usize,
) -> Result<(), DataError> {
    let bad = bytes
        .iter()
        .skip(offset)
        .step_by(stride.max(1))
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= num_classes);
    match bad {
        Some((index, &label)) => Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            kind,
            label,
            index,
            num_classes,
        }),
        None => Ok(()),
    }
}

/// Encodes an unsigned-byte IDX array (header and data) in memory. Tests use
/// it to make deliberately broken files (cut, extended, re-labelled).
///
/// Fails (with [`DataError::Invalid`]) unless `1 <= dims.len() <= 255`,
/// every dimension fits in a `u32`, and `data.len()` is their product.
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Result<Vec<u8>, DataError> {
    let ndims = u8::try_from(dims.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            DataError::Invalid(format!("IDX needs 1..=255 dimensions, got {}", dims.len()))
        })?;
    let product = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|_| dims.iter().all(|&d| u32::try_from(d).is_ok()));
    if product != Some(data.len()) {
        return Err(DataError::Invalid(format!(
            "IDX dims {dims:?} do not describe {} bytes",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, TYPE_U8, ndims]);
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(out)
}

/// Writes raw bytes to `path`, gzip-compressed when the name ends in `.gz`.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let io_err = |e| DataError::io(path, e);
    let file = BufWriter::new(File::create(path).map_err(io_err)?);
    if is_gz(path) {
        let mut enc = GzEncoder::new(file, Compression::fast());
        enc.write_all(bytes).map_err(io_err)?;
        enc.finish().map_err(io_err)?.flush().map_err(io_err)?;
    } else {
        let mut file = file;
        file.write_all(bytes).map_err(io_err)?;
        file.flush().map_err(io_err)?;
    }
    Ok(())
}

/// Writes an unsigned-byte IDX file, gzip-compressed when `path` ends in
/// `.gz` (the same rule the readers use).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<(), DataError> {
    write_bytes(path, &encode_idx(dims, data)?)
}

/// Writes an IDX images file (`[n, rows, cols]`, magic `0x00000803`);
/// `pixels` is row-major with `n * rows * cols` bytes.
pub fn write_idx_images(
    path: &Path,
    n: usize,
    rows: usize,
    cols: usize,
    pixels: &[u8],
) -> Result<(), DataError> {
    write_idx(path, &[n, rows, cols], pixels)
}

/// Writes an IDX labels file (`[n]`, magic `0x00000801`).
pub fn write_idx_labels(path: &Path, labels: &[u8]) -> Result<(), DataError> {
    write_idx(path, &[labels.len()], labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<IdxArray, DataError> {
        decode_idx(Path::new("x"), bytes, false, None)
    }

    #[test]
    fn encode_decode_round_trip_any_rank() {
        let data: Vec<u8> = (0..24).collect();
        for dims in [vec![24], vec![2, 12], vec![2, 3, 4], vec![1, 2, 3, 4]] {
            let bytes = encode_idx(&dims, &data).unwrap();
            assert_eq!(bytes[2..4], [0x08, dims.len() as u8]);
            let arr = decode(&bytes).unwrap();
            assert_eq!(arr.dims, dims);
            assert_eq!(arr.data, data);
        }
    }

    #[test]
    fn encode_rejects_inconsistent_dims() {
        assert!(matches!(encode_idx(&[], &[]), Err(DataError::Invalid(_))));
        assert!(matches!(
            encode_idx(&[2, 2], &[0; 3]),
            Err(DataError::Invalid(_))
        ));
    }

    #[test]
    fn short_header_is_truncated() {
        for len in 0..4 {
            let err = decode(&[0, 0, 8, 1][..len]).unwrap_err();
            assert!(
                matches!(err, DataError::Truncated { expected: 4, .. }),
                "{err}"
            );
        }
        let err = decode(&[0, 0, 8, 2, 0, 0, 0, 1]).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Truncated {
                    expected: 12,
                    found: 8,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn huge_claimed_size_is_truncated_not_oom() {
        // 2^32-1 cubed overflows u64: a dimension error.
        let mut bytes = vec![0, 0, 8, 3];
        bytes.extend_from_slice(&[0xff; 12]);
        assert!(matches!(decode(&bytes), Err(DataError::BadDims { .. })));
        // Large but representable: truncated, and nothing huge is allocated.
        let mut bytes = vec![0, 0, 8, 2];
        bytes.extend_from_slice(&[0xff; 8]);
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            decode(&bytes),
            Err(DataError::Truncated { found: 15, .. })
        ));
    }

    #[test]
    fn other_element_types_and_zero_dims_are_bad_magic() {
        assert!(matches!(
            decode(&[0, 0, 0x0d, 1, 0, 0, 0, 0]),
            Err(DataError::BadMagic { .. })
        ));
        assert!(matches!(
            decode(&[0, 0, 8, 0]),
            Err(DataError::BadMagic { .. })
        ));
    }

    #[test]
    fn gzip_hint_on_plain_name() {
        let err = decode_idx(
            Path::new("a"),
            &[0x1f, 0x8b, 8, 0, 0][..],
            false,
            Some((IDX_LABELS_MAGIC, "labels")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("give it a .gz name"), "{err}");
    }

    #[test]
    fn check_labels_reports_record_index() {
        let bytes = [0u8, 1, 1, 2, 9, 7, 3, 4];
        // stride 2, offset 1: labels 1, 2, 7, 4 -> index 2 is 7 >= 5
        let err = check_labels(Path::new("f"), "fine label", &bytes, 2, 1, 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f: fine label 7 at index 2 is outside 0..4"
        );
    }
}
