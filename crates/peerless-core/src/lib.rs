//! The I/O-free core of peerless.
//!
//! # Layout
//! - [`admission`] — admission certificates: signed membership of a run, and their verification.
//! - [`rng`] — the seeded, checkpointable PRNG behind every random choice.
//! - [`stats`] — quantiles and medians of measurements.
//! - [`flat`] — flat `f32` parameter/gradient vectors and their layout (names, shapes, offsets).
//! - [`optim`] — SGD (momentum, weight decay) and Adam on flat vectors, with flat state.
//! - [`function`] — wire types of the gradient function and the invocation ledger.
//! - [`cost`] — Lambda-style and per-hour billing in integer pico-dollars.
//! - [`wire`] — the peer-to-peer messages and their validating codec.
//! - [`aggregate`] — aggregation rules behind one trait.
//! - [`attack`] — Byzantine behaviour of a node, for experiments.
//! - [`compress`] — int8 and top-k gradient compression with error feedback.
//! - [`protocol`] — what the protocols share: node index, round deadline, events.
//! - [`p2p`] — the P2P round protocol as an I/O-free state machine.
//! - [`ps`] — the parameter server's round protocol, likewise.
//! - [`worker`] — a PS worker's protocol, likewise.
//!
//! Nothing here reads a clock, touches the network or the disk, or uses a global RNG; clippy
//! checks it (`clippy.toml` beside this crate's manifest lists what is refused).
#![warn(missing_docs)]
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod admission;
pub mod aggregate;
pub mod attack;
pub mod compress;
pub mod cost;
pub mod flat;
pub mod function;
pub mod optim;
pub mod p2p;
pub mod protocol;
pub mod ps;
pub mod rng;
pub mod stats;
pub mod wire;
pub mod worker;
