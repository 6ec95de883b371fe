//! Models and datasets for peerless, on burn, over flat parameter vectors.
//!
//! # Layout
//! - [`data`] — datasets read from IDX files (MNIST, Fashion-MNIST, the embedded 8×8 digits),
//!   checksums, fetching, and the IID / Dirichlet partitioners.
//! - [`model`] — logistic regression, MLP and LeNet-style CNN on burn's CPU backends:
//!   `init(seed)`, `loss_and_grad(&params, &batch)`, `evaluate(&params, &dataset)`.
//! - [`spec`] — what a model is without burn: [`Arch`], [`Backend`], [`ModelSpec`] (its id
//!   and parser, its parameter layout), [`ModelError`].
//!
//! # Features
//! - `burn` (default): [`model`]. Without it the crate is the datasets and [`spec`] only, on
//!   light dependencies (what the fuzz targets of the IDX reader and the model id build on).

pub mod data;
#[cfg(feature = "burn")]
pub mod model;
pub mod spec;

pub use data::{Batch, Dataset, DatasetName, Norm, Split};
#[cfg(feature = "burn")]
pub use model::{Model, Prepared};
pub use spec::{Arch, Backend, ModelError, ModelSpec};
