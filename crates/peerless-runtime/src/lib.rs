//! tokio drivers and process-level machinery for peerless.
//!
//! # Layout
//! - [`config`] — the run configuration (TOML), defaults, validation naming the bad key.
//! - [`config_error`] — the configuration error every section's validation returns.
//! - [`cluster`] — a cluster on this machine (`peerless train --arch p2p|ps`): node files and
//!   ports, the supervisor of the node processes, fault injection, the merged run files and
//!   the cluster's summary.
//! - [`checkpoint`] — safetensors checkpoints (params, optimizer state, round, RNG), atomic writes.
//! - [`rundir`] — a run's directory: effective config, `metrics.csv`, `events.jsonl`, `summary.json`.
//! - [`local`] — single-process training, the reference for the distributed architectures.
//! - [`function`] — the local function runtime with AWS Lambda's contract: Runtime API server
//!   per instance, instance processes, warm pools, limits, retries, fault injection, the Invoke
//!   API, the ledger; and the function side (`serve`) that `peerless function` runs.
//! - [`gradient`] — the gradient function: request → parameters from the store → gradient
//!   aggregated into the store, with the caches a warm instance may keep.
//! - [`node`] — one node of a run on one driver: set-up, the event loop, network, replica,
//!   gradient work, files; a role (peer, PS, worker) only carries out its machine's actions.
//! - [`p2p`] — peer-to-peer training: the libp2p transport, the peer role, its sampler.
//! - [`percent`] — URL percent-decoding (Invoke API paths, Redis URLs).
//! - [`ps`] — the parameter-server baseline: the PS role and the worker role.
//! - [`scenario`] — experiment scenarios: a workload and the faults the launcher injects.
//! - [`store`] — the store trait; the embedded RESP server and the Redis backend, with
//!   in-store aggregation that counts each gradient once.

//!
//! # Features
//! - `drivers` (default): everything that runs processes, sockets or models. Without it only
//!   the formats build — [`config`], [`scenario`], [`checkpoint`], `function::{config, faults,
//!   report}` and `store::resp` — on light dependencies, for the fuzz targets in `fuzz/`.

#[cfg(feature = "drivers")]
pub mod admission;
pub mod checkpoint;
#[cfg(feature = "drivers")]
pub mod cluster;
pub mod config;
pub mod config_error;
pub mod function;
#[cfg(feature = "drivers")]
pub mod gradient;
#[cfg(feature = "drivers")]
pub mod local;
#[cfg(feature = "drivers")]
pub mod node;
#[cfg(feature = "drivers")]
pub mod p2p;
pub mod percent;
#[cfg(feature = "drivers")]
pub mod ps;
#[cfg(feature = "drivers")]
pub mod rundir;
pub mod scenario;
pub mod store;
