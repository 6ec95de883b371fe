//! Where a dataset's u8 pixels live: in this process's memory, or in the machine's raw cache
//! file, read row by row when a batch is gathered.
//!
//! Reading the cache file with positioned reads (`pread`) rather than mapping it keeps the
//! crate free of `unsafe` (the workspace forbids it; `mmap` needs it, and a mapped file that
//! shrinks under the reader is a `SIGBUS`) and still holds the data once per machine: the
//! kernel's page cache keeps one copy of the file for every process, and a process holds only
//! the rows of the batch it is gathering. A read after the file was replaced (the cache is only
//! ever replaced by a rename) still sees the old, complete inode through the open descriptor.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::error::{DataError, Result};

/// Pixels of one part (train or test) of a dataset, `count × features` bytes, row-major.
#[derive(Clone)]
pub(crate) enum Pixels {
    /// Held by this process (the embedded digits, subsets, a dataset whose cache could not be
    /// written).
    Memory(Arc<[u8]>),
    /// `len` bytes at `offset` of an open cache file.
    File { file: Arc<File>, path: Arc<PathBuf>, offset: u64, len: usize },
}

impl Pixels {
    /// Number of bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Pixels::Memory(b) => b.len(),
            Pixels::File { len, .. } => *len,
        }
    }

    /// Copies `out.len()` bytes starting at byte `start` into `out`.
    ///
    /// # Panics
    /// If the range is out of bounds (a caller's indexing error).
    pub(crate) fn read(&self, start: usize, out: &mut [u8]) -> Result<()> {
        let end = start.checked_add(out.len()).expect("invariant: pixel range fits in usize");
        assert!(end <= self.len(), "pixel range {start}..{end} out of bounds ({})", self.len());
        match self {
            Pixels::Memory(b) => {
                out.copy_from_slice(&b[start..end]);
                Ok(())
            }
            Pixels::File { file, path, offset, .. } => file
                .read_exact_at(out, offset + start as u64)
                .map_err(|source| DataError::Io { path: path.as_ref().clone(), source }),
        }
    }

    /// All the bytes: borrowed when they are in memory, else read.
    pub(crate) fn all(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Pixels::Memory(b) => Ok(std::borrow::Cow::Borrowed(b)),
            Pixels::File { .. } => {
                let mut v = vec![0; self.len()];
                self.read(0, &mut v)?;
                Ok(std::borrow::Cow::Owned(v))
            }
        }
    }

    /// Whether the bytes are read from a shared cache file.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self, Pixels::File { .. })
    }
}

impl std::fmt::Debug for Pixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pixels::Memory(b) => write!(f, "Pixels::Memory({} bytes)", b.len()),
            Pixels::File { path, offset, len, .. } => {
                write!(f, "Pixels::File({}, {len} bytes at {offset})", path.display())
            }
        }
    }
}
