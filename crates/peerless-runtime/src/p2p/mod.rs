//! Peer-to-peer serverless training: the peer process and what it reads and writes.
//!
//! - [`peer`] — the peer role: carries out [`peerless_core::p2p::Round`]'s actions on the
//!   node's network, gradient work and replica (the loop is [`crate::node::driver`]'s).
//! - `links` — the peer's links: redialling, requests in flight, held state requests, what
//!   arrives as the machine's inputs.
//!
//! A peer is started with a `peer.toml` ([`NodeFile`](crate::node::NodeFile)): the run's
//! configuration under `[run]` and the node's own settings under `[node]`.

mod heartbeat;
mod links;
pub mod peer;
