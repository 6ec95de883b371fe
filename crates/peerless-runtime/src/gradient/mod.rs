//! The gradient function: the stateless computation one function invocation performs.
//!
//! A [`GradientRequest`](peerless_core::function::GradientRequest) names everything: the model (by id), the dataset and the sample indices
//! of the batch, the store key and SHA-256 of the parameters, and where the gradient goes.
//! [`GradientFunction::handle`] validates it, reads the parameters from the store (refusing
//! bytes whose length or digest is not the one asked for), computes the mean cross-entropy
//! loss and its gradient on a blocking thread, refuses non-finite results, and delivers the
//! gradient: added into the accumulator at `output_key` at most once per
//! [`GradientRequest::idempotency_key`](peerless_core::function::GradientRequest::idempotency_key)
//! (`OutputMode::Accumulate`), or stored there as little-endian `f32` bytes (`OutputMode::Put`).
//! The response carries the gradient's SHA-256 unless the request sets `return_digest = false`
//! (the nodes do: they read the in-store sum, and hashing costs as much as delivering).
//!
//! # What a warm instance keeps
//! The function is stateless in what it *computes*: the response depends only on the request
//! and the store. A warm instance keeps caches that make repeated invocations cheap and are
//! keyed by everything that determines their content, so they are never stale:
//! - datasets, by name and data directory (the training split only; the files are checksummed
//!   when loaded, so a name and directory always give the same samples);
//! - models, by id, resolved backend and input shape;
//! - store clients, by URL (a client whose command failed is dropped and reconnected next time);
//! - the parameters of the **last** version seen, by `params_key` **and** digest: a request
//!   with another key or another digest fetches again, and the fetched bytes are only cached
//!   after their length and SHA-256 were checked (a cache hit compares digests, it does not
//!   hash the parameters again);
//! - the last gradient's buffer, overwritten in full by the next computation.
//!
//! Datasets, models and clients are few per instance (one per dataset, model and store a run
//! uses), so those caches are not bounded; the parameter cache holds one version.
//!
//! # Layout
//! - `function.rs` — [`GradientFunction`]: validate, compute, deliver, and hash on a blocking
//!   thread meanwhile (when asked to).
//! - `cache.rs` — what a warm instance keeps (above) and how each cache is filled.
//! - `inner.rs` — DiLoCo's local steps and the parameter delta they give.
//! - `request.rs` — checks of a request's fields that need no I/O.
//! - `error.rs` — [`GradientError`], its kinds and retryability.

mod cache;
mod error;
mod function;
pub mod inner;
mod request;
#[cfg(test)]
mod tests;

pub use self::error::GradientError;
pub use self::function::{ConnectFuture, GradientFunction, GradientStats};
