//! IDX dataset files (`peerless_ml::data::idx`), raw or gzip: what `peerless data fetch`
//! downloads and every run reads.
//!
//! First byte: bit 7 picks the mode, bits 0–3 the class count for labels (1–16).
//! - Raw bytes (gzip or not): an images file that parses has non-empty images and exactly
//!   `count × rows × cols` pixels, labels that parse are all below the class count, and
//!   writing either back gives exactly the (decompressed) input.
//! - Files built from the input, gzipped or not: they parse back to what was written; then
//!   the bytes, overwritten in places by the rest of the input, take the raw check.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use peerless_ml::data::idx::{
    MAX_DECOMPRESSED, decompress, gzip, images_view, is_gzip, parse_images, parse_labels, write_idx_images,
    write_idx_labels,
};

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let images = write_idx_images(2, 3, 2, &[0, 1, 2, 3, 4, 5, 250, 251, 252, 253, 254, 255]);
            let labels = write_idx_labels(&[0, 9, 4]);
            // Mode byte 9: raw parsing, 10 classes.
            [("images", images.clone()), ("labels", labels.clone()), ("images.gz", gzip(&images)), ("labels.gz", gzip(&labels))]
                .into_iter()
                .map(|(name, bytes)| (name.to_string(), [&[9u8][..], &bytes].concat()))
                .collect()
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        let classes = usize::from(mode & 0x0f) + 1;
        if mode & 0x80 == 0 {
            check_parse(rest, classes);
        } else {
            let _ = built(&mut Unstructured::new(rest), classes);
        }
    }
);

fn check_parse(bytes: &[u8], classes: usize) {
    let raw = match decompress(bytes, "fuzz") {
        Ok(raw) => raw,
        Err(e) => {
            assert!(e.to_string().contains("fuzz"), "{e}");
            return;
        }
    };
    assert!(raw.len() as u64 <= MAX_DECOMPRESSED);
    if let Ok(img) = parse_images(bytes, "fuzz") {
        assert!(img.rows > 0 && img.cols > 0);
        assert_eq!(img.pixels.len(), img.count * img.rows * img.cols);
        assert_eq!(write_idx_images(img.count, img.rows, img.cols, &img.pixels), *raw);
        assert_eq!(images_view(&raw, "fuzz").expect("the decompressed file parses too"), img.view());
    } else if !is_gzip(bytes) {
        assert!(images_view(bytes, "fuzz").is_err());
    }
    if let Ok(labels) = parse_labels(bytes, classes, "fuzz") {
        assert!(labels.iter().all(|&l| usize::from(l) < classes));
        assert_eq!(write_idx_labels(&labels), *raw);
    }
}

fn built(u: &mut Unstructured, classes: usize) -> Result<()> {
    let (count, rows, cols) = (u.int_in_range(0..=4)?, u.int_in_range(1..=6)?, u.int_in_range(1..=6)?);
    let pixels = u.bytes(count * rows * cols)?.to_vec();
    let labels: Vec<u8> = (0..u.int_in_range(0..=8)?)
        .map(|_| Ok(u.int_in_range(0..=classes - 1)? as u8))
        .collect::<Result<_>>()?;
    let (compress_images, compress_labels) = (u.arbitrary::<bool>()?, u.arbitrary::<bool>()?);
    let maybe_gzip = |bytes: Vec<u8>, yes: bool| if yes { gzip(&bytes) } else { bytes };
    let mut img = maybe_gzip(write_idx_images(count, rows, cols, &pixels), compress_images);
    let mut lab = maybe_gzip(write_idx_labels(&labels), compress_labels);
    let parsed = parse_images(&img, "fuzz").expect("written images parse");
    assert_eq!((parsed.count, parsed.rows, parsed.cols, &parsed.pixels), (count, rows, cols, &pixels));
    assert_eq!(parse_labels(&lab, classes, "fuzz").expect("written labels parse"), labels);
    for bytes in [&mut img, &mut lab] {
        for _ in 0..u.int_in_range(0..=4)? {
            let at = usize::from(u.arbitrary::<u16>()?) % bytes.len();
            bytes[at] = u.arbitrary()?;
        }
        check_parse(bytes, classes);
    }
    Ok(())
}
