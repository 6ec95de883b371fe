//! The one error type of the dataset layer, with messages that say how to fix the problem.

use std::path::PathBuf;

use super::catalog::DatasetName;

/// Result alias for the dataset layer.
pub type Result<T> = std::result::Result<T, DataError>;

/// Everything that can go wrong reading, fetching or partitioning a dataset.
///
/// `origin` fields name the file an error is about: a path, or `embedded digits/<file>`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file of a dataset is in none of the places it is looked for.
    #[error(
        "{title} not found: no {file}[.gz] in {}; run: peerless data fetch {dataset} --data-dir {}",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or "),
        data_dir.display()
    )]
    Missing {
        /// Which dataset.
        dataset: DatasetName,
        /// Its human name ("MNIST").
        title: &'static str,
        /// Every folder looked in: `<data_dir>/<name>`, then `<data_dir>` itself.
        tried: Vec<PathBuf>,
        /// The data directory given by the caller.
        data_dir: PathBuf,
        /// The first missing file's base name (without `.gz`).
        file: &'static str,
    },

    /// A file's decompressed contents do not have the pinned SHA-256.
    #[error(
        "{} is corrupt (SHA-256 of its IDX contents is {actual}, expected {expected}); {fix}",
        path.display()
    )]
    Checksum {
        /// The file (or `embedded digits/<file>`).
        path: PathBuf,
        /// The pinned digest, lowercase hex.
        expected: &'static str,
        /// The digest found.
        actual: String,
        /// What to do about it, e.g. `re-run: peerless data fetch mnist --data-dir /d`.
        fix: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A gzip stream could not be decompressed.
    #[error("{origin}: gzip stream is corrupt or truncated: {source}")]
    Gzip {
        /// The file.
        origin: String,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },

    /// An IDX file is shorter than its header says.
    #[error("{origin} is truncated: expected {expected} bytes, found {actual}")]
    Truncated {
        /// The file.
        origin: String,
        /// Bytes its header (or the minimal header) requires.
        expected: u64,
        /// Bytes actually present (after decompression).
        actual: u64,
    },

    /// An IDX file starts with the wrong magic number.
    #[error("{origin}: bad IDX magic 0x{found:08x}, expected 0x{expected:08x} ({what})")]
    BadMagic {
        /// The file.
        origin: String,
        /// The magic for the expected kind of file.
        expected: u32,
        /// The magic found.
        found: u32,
        /// What was expected ("u8 images, 3 dimensions").
        what: &'static str,
    },

    /// An IDX file is malformed in some other way (sizes, trailing bytes, ...).
    #[error("{origin}: {reason}")]
    Format {
        /// The file.
        origin: String,
        /// What is wrong.
        reason: String,
    },

    /// A label is not below the number of classes.
    #[error("{origin}: label {label} at index {index} is out of range (classes: {classes})")]
    LabelOutOfRange {
        /// The file.
        origin: String,
        /// Position of the first bad label.
        index: usize,
        /// The bad label.
        label: u8,
        /// Number of classes.
        classes: usize,
    },

    /// An images file and its labels file disagree on the sample count.
    #[error("{images_origin} has {images} images but {labels_origin} has {labels} labels")]
    CountMismatch {
        /// The images file.
        images_origin: String,
        /// Its sample count.
        images: usize,
        /// The labels file.
        labels_origin: String,
        /// Its sample count.
        labels: usize,
    },

    /// A dataset name that is not in the catalog.
    #[error("unknown dataset {0:?}; expected one of: digits, mnist, fashion-mnist")]
    UnknownDataset(String),

    /// Every fetch strategy failed; `attempts` says what each one did.
    #[error("could not fetch {dataset} into {}:\n{attempts}", dir.display())]
    Fetch {
        /// Which dataset.
        dataset: DatasetName,
        /// Where the files were to go.
        dir: PathBuf,
        /// One line per strategy tried, with why it failed.
        attempts: String,
    },

    /// A partitioner was given impossible parameters.
    #[error("invalid partition: {0}")]
    Partition(String),
}
