//! The I/O-free core of peerless.
//!
//! # Layout
//! - [`rng`] — the seeded, checkpointable PRNG behind every random choice.
//! - [`flat`] — flat `f32` parameter/gradient vectors and their layout (names, shapes, offsets).
//! - [`optim`] — SGD (momentum, weight decay) and Adam on flat vectors, with flat state.
//!
//! Nothing here reads a clock, touches the network or the disk, or uses a global RNG.
#![warn(missing_docs)]

pub mod flat;
pub mod optim;
pub mod rng;
