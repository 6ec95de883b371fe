//! Peer-to-peer serverless training: the peer process and what it reads and writes.
//!
//! - [`net`] — libp2p transport, identities, allow-list, the frame codec.
//! - [`sampler`] — which samples each peer's functions train on in each round.
//! - [`peer`] — the peer role: carries out [`peerless_core::p2p::Round`]'s actions on the
//!   node's network, gradient work and replica (the loop is [`crate::node::driver`]'s).
//! - `links` — the peer's links: redialling, requests in flight, held state requests, what
//!   arrives as the machine's inputs.
//!
//! A peer is started with a `peer.toml` ([`NodeFile`](crate::node::NodeFile)): the run's
//! configuration under `[run]` and the node's own settings under `[peer]`.

mod links;
pub mod net;
pub mod peer;
pub mod sampler;
