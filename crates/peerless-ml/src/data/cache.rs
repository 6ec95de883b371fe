//! The raw cache file of a dataset: its u8 pixels and labels, decompressed, written once per
//! machine next to the IDX files and read by every process of the machine.
//!
//! `<dataset dir>/peerless-pixels.cache` is a fixed header then the payload, little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `PLSPIXEL` |
//! | 4 | format version ([`VERSION`]) |
//! | 32 | identity: SHA-256 of the dataset's name, the catalog's pinned checksums of its four files, and each source file's path, size and modification time |
//! | 8 + 8 | train and test sample counts |
//! | 4 × 3 | rows, columns, classes |
//! | 4 + 4 | the normalisation: `mean` and `inv_std` as `f32` bits |
//! | 32 | SHA-256 of the header bytes above |
//! | … | train pixels, train labels, test pixels, test labels |
//!
//! Opening checks the magic, the version, the header's checksum, the identity (so a cache built
//! from other files, or before a file was replaced, is not used), that the file is exactly as
//! long as the header says, and every label. The pixels are not hashed on open: that would cost
//! as much as the decompression the cache saves. A cache that fails a check is rebuilt from the
//! verified IDX files. Building takes a lock file, so that processes starting together build it
//! once; the file is written under a temporary name, synced and renamed, so a reader never sees
//! a partial one. When the folder is not writable, the dataset is held in the process instead.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::catalog::DatasetName;
use super::dataset::{Dataset, Norm, Split, check_labels};
use super::error::{DataError, Result};
use super::pixels::Pixels;

/// The cache file's name in the dataset's folder.
pub const FILE_NAME: &str = "peerless-pixels.cache";
/// The format version; a file of another version is rebuilt.
pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"PLSPIXEL";
/// Header bytes before its checksum.
const FIELDS_LEN: usize = 8 + 4 + 32 + 16 + 12 + 8;
/// Header length, checksum included.
pub const HEADER_LEN: usize = FIELDS_LEN + 32;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Header {
    identity: [u8; 32],
    train: u64,
    test: u64,
    rows: u32,
    cols: u32,
    classes: u32,
    norm: Norm,
}

impl Header {
    fn features(&self) -> u64 {
        u64::from(self.rows) * u64::from(self.cols)
    }

    /// Bytes of (pixels, labels) of a part of `n` samples.
    fn part_len(&self, n: u64) -> (u64, u64) {
        (n * self.features(), n)
    }

    /// The whole file's length.
    fn file_len(&self) -> u64 {
        let (tp, tl) = self.part_len(self.train);
        let (sp, sl) = self.part_len(self.test);
        HEADER_LEN as u64 + tp + tl + sp + sl
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&self.identity);
        h.extend_from_slice(&self.train.to_le_bytes());
        h.extend_from_slice(&self.test.to_le_bytes());
        for v in [self.rows, self.cols, self.classes] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(&self.norm.mean.to_bits().to_le_bytes());
        h.extend_from_slice(&self.norm.inv_std.to_bits().to_le_bytes());
        let sum = Sha256::digest(&h);
        h.extend_from_slice(&sum);
        h.try_into().expect("invariant: the header has HEADER_LEN bytes")
    }

    /// The header in `b`, or why it is not one.
    fn decode(b: &[u8; HEADER_LEN]) -> std::result::Result<Header, String> {
        if &b[..8] != MAGIC {
            return Err("not a peerless cache file (bad magic)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(format!("format version {}, expected {VERSION}", u32_at(8)));
        }
        if Sha256::digest(&b[..FIELDS_LEN]).as_slice() != &b[FIELDS_LEN..] {
            return Err("the header's checksum does not match".into());
        }
        Ok(Header {
            identity: b[12..44].try_into().expect("32 bytes"),
            train: u64_at(44),
            test: u64_at(52),
            rows: u32_at(60),
            cols: u32_at(64),
            classes: u32_at(68),
            norm: Norm { mean: f32::from_bits(u32_at(72)), inv_std: f32::from_bits(u32_at(76)) },
        })
    }
}

/// The identity of a cache built for `name` from the files `sources`: a cache whose identity
/// differs was built from other files, or before one of them changed.
pub(crate) fn identity(name: DatasetName, sources: &[PathBuf]) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(name.as_str().as_bytes());
    for (spec, path) in name.files().iter().zip(sources) {
        let meta = std::fs::metadata(path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        h.update(spec.sha256.as_bytes());
        h.update(path.as_os_str().as_encoded_bytes());
        h.update(meta.len().to_le_bytes());
        h.update(mtime.map_or(0, |d| d.as_nanos()).to_le_bytes());
    }
    Ok(h.finalize().into())
}

/// `name`'s split from the cache in `dir` if it is valid for `identity`, else built by `build`
/// (from the verified IDX files, standardized) and written to the cache for the next process.
pub(crate) fn load(
    name: DatasetName,
    dir: &Path,
    identity: [u8; 32],
    build: impl FnOnce() -> Result<Split>,
) -> Result<Split> {
    let path = dir.join(FILE_NAME);
    match open(name, &path, identity) {
        Ok(split) => return Ok(split),
        Err(why) => tracing::debug!(path = %path.display(), why, "no usable cache file"),
    }
    let lock_path = dir.join(format!("{FILE_NAME}.lock"));
    let lock = match OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path) {
        Ok(f) => f,
        Err(e) => return in_memory(&path, &e.to_string(), build),
    };
    if let Err(e) = lock.lock() {
        return in_memory(&path, &e.to_string(), build);
    }
    // Another process may have built it while this one waited for the lock.
    match open(name, &path, identity) {
        Ok(split) => return Ok(split),
        Err(why) => tracing::info!(path = %path.display(), why, "building the dataset's cache file"),
    }
    let split = build()?;
    if let Err(e) = write(&path, identity, &split) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the cache file; the dataset stays in this process");
        return Ok(split);
    }
    open(name, &path, identity)
        .map_err(|why| DataError::Format { origin: path.display().to_string(), reason: why })
}

/// `build`'s split, held in this process, when the cache cannot be used (`why`).
fn in_memory(path: &Path, why: &str, build: impl FnOnce() -> Result<Split>) -> Result<Split> {
    tracing::warn!(path = %path.display(), why, "cannot create the cache file; the dataset stays in this process");
    build()
}

/// The split in the cache file at `path`, or why it cannot be used.
fn open(name: DatasetName, path: &Path, identity: [u8; 32]) -> std::result::Result<Split, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut b = [0u8; HEADER_LEN];
    file.read_exact_at(&mut b, 0).map_err(|e| format!("reading its header: {e}"))?;
    let h = Header::decode(&b)?;
    if h.identity != identity {
        return Err("built from other files (or before one of them changed)".into());
    }
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != h.file_len() {
        return Err(format!("{len} bytes, its header says {}", h.file_len()));
    }
    let (file, path) = (Arc::new(file), Arc::new(path.to_owned()));
    let train_pixels = HEADER_LEN as u64;
    let test_pixels = train_pixels + h.train * (h.features() + 1);
    let train = part(name, "train", &file, &path, &h, h.train, train_pixels)?;
    let test = part(name, "test", &file, &path, &h, h.test, test_pixels)?;
    Ok(Split { train, test })
}

/// One part of `count` samples whose pixels start at `offset`, its labels right after them.
fn part(
    name: DatasetName,
    part: &str,
    file: &Arc<File>,
    path: &Arc<PathBuf>,
    h: &Header,
    count: u64,
    offset: u64,
) -> std::result::Result<Dataset, String> {
    let (pixels_len, labels_len) = h.part_len(count);
    let too_big = |_| format!("{part}: {count} samples do not fit in memory");
    let mut labels = vec![0u8; usize::try_from(labels_len).map_err(too_big)?];
    file.read_exact_at(&mut labels, offset + pixels_len)
        .map_err(|e| format!("reading {part} labels: {e}"))?;
    check_labels(&labels, h.classes as usize, &path.display().to_string()).map_err(|e| e.to_string())?;
    let pixels = Pixels::File {
        file: Arc::clone(file),
        path: Arc::clone(path),
        offset,
        len: usize::try_from(pixels_len).map_err(too_big)?,
    };
    let shape = [1, h.rows as usize, h.cols as usize];
    Ok(Dataset::from_parts(format!("{name}/{part}"), pixels, labels, shape, h.classes as usize, h.norm))
}

/// Writes `split` as the cache file `path`: a temporary file in the same folder, synced, then
/// renamed over `path`.
fn write(path: &Path, identity: [u8; 32], split: &Split) -> Result<()> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let [_, rows, cols] = split.train.shape;
    let h = Header {
        identity,
        train: split.train.len() as u64,
        test: split.test.len() as u64,
        rows: u32::try_from(rows).expect("invariant: IDX sizes are u32"),
        cols: u32::try_from(cols).expect("invariant: IDX sizes are u32"),
        classes: u32::try_from(split.train.classes).expect("invariant: few classes"),
        norm: split.train.norm(),
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io)?;
    let written = (|| {
        f.write_all(&h.encode())?;
        for d in [&split.train, &split.test] {
            f.write_all(&d.pixel_bytes().map_err(std::io::Error::other)?)?;
            f.write_all(&d.labels)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_a_changed_byte_is_refused() {
        let h = Header {
            identity: [7; 32],
            train: 3,
            test: 2,
            rows: 4,
            cols: 5,
            classes: 10,
            norm: Norm { mean: 0.13, inv_std: 3.2 },
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert_eq!(h.file_len(), HEADER_LEN as u64 + 3 * 21 + 2 * 21);
        let mut bad = b;
        bad[50] ^= 1;
        assert!(Header::decode(&bad).unwrap_err().contains("checksum"));
        bad = b;
        bad[8] = 9;
        assert!(Header::decode(&bad).unwrap_err().contains("version"));
    }

    fn digits() -> Split {
        super::super::load(DatasetName::Digits, Path::new("/unused")).unwrap()
    }

    fn same_batches(a: &Split, b: &Split) {
        let idx: Vec<usize> = (0..a.train.len()).rev().collect();
        assert_eq!(a.train.gather(&idx).unwrap(), b.train.gather(&idx).unwrap());
        assert_eq!(a.test.range(0, a.test.len()).unwrap(), b.test.range(0, b.test.len()).unwrap());
    }

    #[test]
    fn the_cache_is_written_once_read_by_the_next_load_and_rebuilt_when_it_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (name, id) = (DatasetName::Digits, [1; 32]);
        let built = load(name, dir.path(), id, || Ok(digits())).unwrap();
        assert!(built.train.is_shared() && path.is_file());
        let header =
            Header::decode(&std::fs::read(&path).unwrap()[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), header.file_len());
        // The next load reads the file and builds nothing.
        let cached = load(name, dir.path(), id, || panic!("rebuilt a valid cache")).unwrap();
        assert!(cached.train.is_shared());
        assert_eq!(cached.train.norm(), digits().train.norm());
        same_batches(&cached, &digits());
        // Made resident (a serverful node's own copy), it gathers the same batches.
        let resident = Split { train: cached.train.clone().resident().unwrap(), test: cached.test.clone() };
        assert!(!resident.train.is_shared() && resident.train.resident_bytes() == resident.train.len() * 64);
        same_batches(&resident, &digits());
        // Another identity, a truncated file, a damaged header: each is rebuilt.
        let rebuilds = std::cell::Cell::new(0);
        let build = || {
            rebuilds.set(rebuilds.get() + 1);
            Ok(digits())
        };
        load(name, dir.path(), [2; 32], build).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        load(name, dir.path(), [2; 32], build).unwrap();
        let mut damaged = std::fs::read(&path).unwrap();
        damaged[60] ^= 0xff;
        std::fs::write(&path, &damaged).unwrap();
        let split = load(name, dir.path(), [2; 32], build).unwrap();
        assert_eq!(rebuilds.get(), 3);
        same_batches(&split, &digits());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "the cache and its lock file, no temporary file: {names:?}");
    }

    #[test]
    fn a_folder_that_cannot_hold_the_cache_keeps_the_dataset_in_the_process() {
        let split =
            load(DatasetName::Digits, Path::new("/nonexistent/dir"), [1; 32], || Ok(digits())).unwrap();
        assert!(!split.train.is_shared());
        same_batches(&split, &digits());
    }
}
