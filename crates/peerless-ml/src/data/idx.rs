//! Reading and writing IDX files (the MNIST container format), raw or gzip-compressed.
//!
//! An IDX file is a big-endian header — magic `0x0000_08DD` (`08` = unsigned bytes, `DD` =
//! number of dimensions), then one `u32` size per dimension — followed by the data. Only the
//! two kinds the datasets use are accepted: 3-dimensional u8 images and 1-dimensional u8
//! labels. Every declared size is checked against the bytes actually present.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use super::error::{DataError, Result};

/// Magic number of a u8 IDX file with 3 dimensions (images: count × rows × cols).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of a u8 IDX file with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The first two bytes of every gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Upper bound on the buffer pre-allocated from a gzip trailer's size hint.
const MAX_SIZE_HINT: usize = 512 << 20;

/// Most bytes a gzip stream may decompress to: 20× the largest file of the catalog (MNIST's
/// 47 MB training images). A stream that inflates past it (a corrupt file, or a "gzip bomb"
/// of a few MB that claims gigabytes) is an error, not an allocation of whatever it produces.
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// The contents of an IDX images file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count × rows × cols` pixels, row-major.
    pub pixels: Vec<u8>,
}

/// A borrowed view of an IDX images file's contents (see [`images_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagesView<'a> {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count × rows × cols` pixels, row-major.
    pub pixels: &'a [u8],
}

impl IdxImages {
    /// Borrow as an [`ImagesView`].
    pub fn view(&self) -> ImagesView<'_> {
        ImagesView { count: self.count, rows: self.rows, cols: self.cols, pixels: &self.pixels }
    }
}

/// Whether `bytes` start with the gzip magic.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// `bytes` decompressed if they are gzip (detected by magic, not by name), else as they are.
/// `origin` names the file in errors.
/// Decompressed output beyond [`MAX_DECOMPRESSED`] bytes is an error.
pub fn decompress<'a>(bytes: &'a [u8], origin: &str) -> Result<Cow<'a, [u8]>> {
    decompress_at_most(bytes, origin, MAX_DECOMPRESSED)
}

/// [`decompress`] with the output bounded by `limit` bytes.
fn decompress_at_most<'a>(bytes: &'a [u8], origin: &str, limit: u64) -> Result<Cow<'a, [u8]>> {
    if !is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    // The trailer's ISIZE is the uncompressed length mod 2^32: a good capacity hint.
    let hint = bytes
        .len()
        .checked_sub(4)
        .and_then(|at| bytes.get(at..))
        .and_then(|tail| <[u8; 4]>::try_from(tail).ok())
        .map_or(0, |t| u32::from_le_bytes(t) as usize)
        .min(MAX_SIZE_HINT)
        .min(usize::try_from(limit).unwrap_or(usize::MAX));
    let mut out = Vec::with_capacity(hint);
    // One byte past the limit tells an over-long stream from one of exactly `limit` bytes.
    MultiGzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| DataError::Gzip { origin: origin.to_owned(), source })?;
    if out.len() as u64 > limit {
        return Err(format_err(origin, format!("gzip stream decompresses to more than {limit} bytes")));
    }
    Ok(Cow::Owned(out))
}

/// [`decompress`] for owned bytes: uncompressed input is returned as it is, without a copy.
pub fn decompress_vec(bytes: Vec<u8>, origin: &str) -> Result<Vec<u8>> {
    if is_gzip(&bytes) { Ok(decompress(&bytes, origin)?.into_owned()) } else { Ok(bytes) }
}

/// Gzip-compress `bytes` (for tests and tools that write IDX files).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(bytes.len() / 2), Compression::default());
    enc.write_all(bytes).expect("invariant: writing to a Vec cannot fail");
    enc.finish().expect("invariant: writing to a Vec cannot fail")
}

/// Parse an images file (raw or gzip). `origin` names the file in errors.
pub fn parse_images(bytes: &[u8], origin: &str) -> Result<IdxImages> {
    let bytes = decompress(bytes, origin)?;
    let v = images_view(&bytes, origin)?;
    Ok(IdxImages { count: v.count, rows: v.rows, cols: v.cols, pixels: v.pixels.to_vec() })
}

/// Validate an *uncompressed* images file and borrow its pixels (no copy). Gzip input is
/// rejected as bad magic: pass it through [`decompress`] first.
pub fn images_view<'a>(raw: &'a [u8], origin: &str) -> Result<ImagesView<'a>> {
    let (dims, pixels) = parse_header(raw, IMAGES_MAGIC, "u8 images, 3 dimensions", origin)?;
    let [count, rows, cols] = [dims[0], dims[1], dims[2]];
    if rows == 0 || cols == 0 {
        return Err(format_err(origin, format!("image size {rows}×{cols} is empty")));
    }
    Ok(ImagesView { count, rows, cols, pixels })
}

/// Parse a labels file (raw or gzip), checking every label is `< classes`.
pub fn parse_labels(bytes: &[u8], classes: usize, origin: &str) -> Result<Vec<u8>> {
    let bytes = decompress(bytes, origin)?;
    let (_, data) = parse_header(&bytes, LABELS_MAGIC, "u8 labels, 1 dimension", origin)?;
    if let Some(index) = data.iter().position(|&l| usize::from(l) >= classes) {
        return Err(DataError::LabelOutOfRange {
            origin: origin.to_owned(),
            index,
            label: data[index],
            classes,
        });
    }
    Ok(data.to_vec())
}

/// An uncompressed IDX images file holding `count` images of `rows × cols` u8 pixels.
///
/// # Panics
/// If `pixels.len() != count * rows * cols` or a size does not fit in `u32`.
pub fn write_idx_images(count: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    assert_eq!(pixels.len(), count * rows * cols, "pixel count must be count × rows × cols");
    let mut out = Vec::with_capacity(16 + pixels.len());
    out.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    for d in [count, rows, cols] {
        out.extend_from_slice(&to_u32(d).to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// An uncompressed IDX labels file.
///
/// # Panics
/// If there are more than `u32::MAX` labels.
pub fn write_idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&to_u32(labels.len()).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("invariant: IDX sizes fit in u32")
}

fn format_err(origin: &str, reason: String) -> DataError {
    DataError::Format { origin: origin.to_owned(), reason }
}

/// Check magic and sizes; return the dimensions and exactly the data bytes they declare.
fn parse_header<'a>(
    bytes: &'a [u8],
    magic: u32,
    what: &'static str,
    origin: &str,
) -> Result<(Vec<usize>, &'a [u8])> {
    let truncated = |expected: u64| DataError::Truncated {
        origin: origin.to_owned(),
        expected,
        actual: bytes.len() as u64,
    };
    let word = |i: usize| -> Option<u32> {
        let b = bytes.get(4 * i..4 * i + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let found = word(0).ok_or_else(|| truncated(4))?;
    if found != magic {
        return Err(DataError::BadMagic { origin: origin.to_owned(), expected: magic, found, what });
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    let mut dims = Vec::with_capacity(ndims);
    let mut payload: u64 = 1;
    for i in 1..=ndims {
        let d = word(i).ok_or_else(|| truncated(header as u64))?;
        dims.push(d as usize);
        payload = payload
            .checked_mul(u64::from(d))
            .ok_or_else(|| format_err(origin, format!("declared sizes {dims:?} overflow")))?;
    }
    let expected = header as u64 + payload;
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(truncated(expected));
    }
    if actual > expected {
        return Err(format_err(
            origin,
            format!(
                "{} trailing bytes after the data (header declares {expected} bytes, found {actual})",
                actual - expected
            ),
        ));
    }
    Ok((dims, &bytes[header..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
        (write_idx_images(3, 4, 5, &pixels), write_idx_labels(&[0, 9, 4]))
    }

    #[test]
    fn raw_round_trip_preserves_sizes_and_bytes() {
        let (img, lab) = sample();
        let parsed = parse_images(&img, "img").unwrap();
        assert_eq!((parsed.count, parsed.rows, parsed.cols), (3, 4, 5));
        assert_eq!(parsed.pixels, img[16..]);
        assert_eq!(parse_labels(&lab, 10, "lab").unwrap(), vec![0, 9, 4]);
    }

    #[test]
    fn gzip_round_trip_is_detected_by_magic() {
        let (img, lab) = sample();
        let (gimg, glab) = (gzip(&img), gzip(&lab));
        assert!(is_gzip(&gimg) && !is_gzip(&img));
        assert_eq!(parse_images(&gimg, "img.gz").unwrap(), parse_images(&img, "img").unwrap());
        assert_eq!(parse_labels(&glab, 10, "lab").unwrap(), vec![0, 9, 4]);
        assert_eq!(decompress(&gimg, "x").unwrap().as_ref(), img.as_slice());
    }

    #[test]
    fn truncated_file_is_an_error_naming_file_and_sizes() {
        let (img, _) = sample();
        let cut = &img[..img.len() - 1];
        let err = parse_images(cut, "cut-images").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Truncated { expected: 76, actual: 75, .. }), "{msg}");
        assert!(msg.contains("cut-images") && msg.contains("truncated"), "{msg}");
        assert!(msg.contains("76") && msg.contains("75"), "{msg}");
        // Truncated inside the header, and an empty file.
        assert!(matches!(parse_images(&img[..10], "h"), Err(DataError::Truncated { .. })));
        assert!(matches!(parse_labels(&[], 10, "e"), Err(DataError::Truncated { .. })));
    }

    #[test]
    fn truncated_gzip_stream_is_an_error_not_a_panic() {
        let (img, _) = sample();
        let gz = gzip(&img);
        let err = parse_images(&gz[..gz.len() / 2], "half.gz").unwrap_err();
        assert!(err.to_string().contains("half.gz"), "{err}");
    }

    #[test]
    fn decompression_is_bounded() {
        // 1 MB of zeros compresses to about 1 kB: the output, not the input, is what is capped.
        let bomb = gzip(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 4096, "{}", bomb.len());
        let err = decompress_at_most(&bomb, "bomb.gz", (1 << 20) - 1).unwrap_err();
        assert!(matches!(err, DataError::Format { .. }), "{err}");
        assert!(err.to_string().contains("bomb.gz") && err.to_string().contains("more than"), "{err}");
        assert_eq!(decompress_at_most(&bomb, "bomb.gz", 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let (mut img, _) = sample();
        img.push(0);
        assert!(matches!(parse_images(&img, "x"), Err(DataError::Format { .. })));
    }

    #[test]
    fn bad_magic_is_rejected_in_both_directions() {
        let (img, lab) = sample();
        assert!(matches!(
            parse_images(&lab, "l"),
            Err(DataError::BadMagic { found: LABELS_MAGIC, expected: IMAGES_MAGIC, .. })
        ));
        assert!(matches!(parse_labels(&img, 10, "i"), Err(DataError::BadMagic { .. })));
        let mut junk = img.clone();
        junk[2] = 0x0d; // f32 type code
        let err = parse_images(&junk, "junk").unwrap_err();
        assert!(err.to_string().contains("0x00000d03"), "{err}");
    }

    #[test]
    fn label_out_of_range_is_reported_with_its_index() {
        let lab = write_idx_labels(&[1, 2, 10, 3]);
        let err = parse_labels(&lab, 10, "lab").unwrap_err();
        assert!(matches!(err, DataError::LabelOutOfRange { index: 2, label: 10, classes: 10, .. }), "{err}");
        assert!(parse_labels(&lab, 11, "lab").is_ok());
    }

    #[test]
    fn oversized_declared_dimensions_do_not_overflow_or_allocate() {
        let mut img = IMAGES_MAGIC.to_be_bytes().to_vec();
        for d in [u32::MAX, u32::MAX, u32::MAX] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        assert!(parse_images(&img, "huge").is_err());
    }

    #[test]
    fn empty_image_size_is_rejected() {
        let img = write_idx_images(0, 0, 5, &[]);
        assert!(matches!(parse_images(&img, "z"), Err(DataError::Format { .. })));
    }
}
