//! Peer-to-peer serverless training: the peer process and what it reads and writes.
//!
//! - [`net`] — libp2p transport, identities, allow-list, the frame codec.
//! - [`sampler`] — which samples each peer's functions train on in each round.
//! - [`peer`] — the peer's event loop: drives [`peerless_core::p2p::Round`] with the network,
//!   the function runtime, the store, the optimizer and the run directory.
//!
//! A peer is started with a `peer.toml` ([`NodeFile`](crate::node::NodeFile)): the run's
//! configuration under `[run]` and the node's own settings under `[peer]`.

pub mod net;
pub mod peer;
pub mod sampler;
