//! tokio drivers and process-level machinery for peerless.
//!
//! # Layout
//! - [`config`] — the run configuration (TOML), defaults, validation naming the bad key.
//! - [`checkpoint`] — safetensors checkpoints (params, optimizer state, round, RNG), atomic writes.
//! - [`rundir`] — a run's directory: effective config, `metrics.csv`, `events.jsonl`, `summary.json`.
//! - [`local`] — single-process training, the reference for the distributed architectures.

pub mod checkpoint;
pub mod config;
pub mod function;
pub mod gradient;
pub mod local;
pub mod rundir;
pub mod store;
