//! Models and datasets for peerless, on burn, over flat parameter vectors.
//!
//! # Layout
//! - [`data`] — datasets read from IDX files (MNIST, Fashion-MNIST, the embedded 8×8 digits),
//!   checksums, fetching, and the IID / Dirichlet partitioners.
//! - [`model`] — logistic regression, MLP and LeNet-style CNN on burn's CPU backends:
//!   `init(seed)`, `loss_and_grad(&params, &batch)`, `evaluate(&params, &dataset)`.

pub mod data;
pub mod model;

pub use data::{Batch, Dataset, DatasetName, Split};
pub use model::{Arch, Backend, Model, ModelError, ModelSpec, Prepared};
