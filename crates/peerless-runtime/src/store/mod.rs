//! Stores where functions read parameters and write gradients: one trait, two backends.
//!
//! Both backends speak the Redis protocol (RESP2), so function instances reach either with
//! one client ([`RedisStore`]): the **embedded** store ([`embedded::EmbeddedServer`]) is a
//! small RESP server owned by the invoking node and served on loopback; the **Redis** backend
//! is a real `redis-server`. Gradients are aggregated where they land (in-store aggregation,
//! SPIRT's in-database operation): [`Store::accumulate`] adds a gradient into a running sum
//! at most once per idempotency key, so the invoking node reads one sum instead of k copies.
//!
//! Values are raw bytes; vectors are little-endian `f32`.
//!
//! Each node's keys start with its own prefix ([`acl::node_key_prefix`], `peer<index>/`). An
//! embedded store is its node's alone, with a password of its own; on a shared Redis each node
//! has a Redis ACL user limited to its prefix ([`acl`]).

#[cfg(feature = "drivers")]
pub mod acl;
#[cfg(feature = "drivers")]
pub mod embedded;
#[cfg(feature = "drivers")]
pub(crate) mod floats;
#[cfg(feature = "drivers")]
mod line;
#[cfg(feature = "drivers")]
pub mod redis;
pub mod resp;

use std::future::Future;
use std::sync::Arc;

#[cfg(feature = "drivers")]
pub use self::embedded::{EmbeddedHandle, EmbeddedServer};
#[cfg(feature = "drivers")]
pub use self::redis::{RedisStore, RedisStoreConfig, ServerKind};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Could not connect or authenticate.
    #[error("store {url}: cannot connect: {reason}")]
    Connect {
        /// Store URL with the password elided.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The server answered with an error or the connection broke.
    #[error("store command {command} failed: {reason}")]
    Command {
        /// Command name.
        command: String,
        /// Cause.
        reason: String,
    },
    /// A stored value is not what the caller expected (e.g. a vector of the wrong length).
    #[error("store key {key}: {reason}")]
    BadValue {
        /// Key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The keys an accumulator at `key` keeps beside it (`key` itself first): its count, applied
/// tokens, and the slot order (`:prefix` on Redis only). [`Store::delete`] removes them all.
pub const ACCUMULATOR_SUFFIXES: [&str; 5] = ["", ":n", ":tokens", ":slots", ":prefix"];

/// `keys` with every accumulator companion of each ([`ACCUMULATOR_SUFFIXES`]).
pub fn with_companions(keys: &[&str]) -> Vec<String> {
    keys.iter().flat_map(|k| ACCUMULATOR_SUFFIXES.iter().map(move |s| format!("{k}{s}"))).collect()
}

/// The running sum at an accumulator key.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulated {
    /// Element-wise sum of the accepted vectors.
    pub sum: Vec<f32>,
    /// How many vectors were accepted.
    pub count: u64,
}

impl Accumulated {
    /// The accumulator at `key` from the values at `key` (the sum, little-endian `f32`s) and
    /// `key:n` (the count), as `MGET` reads them: `None` when neither exists.
    ///
    /// # Errors
    /// [`StoreError::BadValue`] when one is missing or either does not parse.
    pub fn decode(key: &str, sum: Option<&[u8]>, count: Option<&[u8]>) -> Result<Option<Self>, StoreError> {
        let bad = |reason: String| StoreError::BadValue { key: key.to_owned(), reason };
        match (sum, count) {
            (None, None) => Ok(None),
            (Some(sum), Some(count)) => {
                let count = std::str::from_utf8(count)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad(format!("count at {key}:n is not an integer")))?;
                let sum = peerless_core::flat::from_le_bytes(sum).map_err(|e| bad(e.to_string()))?;
                Ok(Some(Accumulated { sum, count }))
            }
            (Some(_), None) => Err(bad("not an accumulator (no count)".to_owned())),
            (None, Some(_)) => Err(bad("accumulator count without a sum".to_owned())),
        }
    }
}

/// The operations functions and nodes need. Implementations are cheap to clone and safe to use
/// from many tasks.
pub trait Store: Send + Sync {
    /// Sets `key` to `value`.
    fn put(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Sets `key` to `value`, which the store may keep without a copy.
    fn put_owned(&self, key: &str, value: Vec<u8>) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move { self.put(key, &value).await }
    }
    /// Sets `key` to the little-endian bytes of `v`, which the store may keep without a copy
    /// (the embedded store keeps `v` itself).
    fn put_floats(&self, key: &str, v: Arc<Vec<f32>>) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move { self.put_owned(key, peerless_core::flat::to_le_bytes(&v)).await }
    }
    /// The value at `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;
    /// The value at `key` as little-endian `f32`s, into `out` (resized, its allocation reused);
    /// false when `key` is missing (`out` is then unchanged). A value whose length is not a
    /// multiple of 4 is [`StoreError::BadValue`].
    fn get_floats(
        &self,
        key: &str,
        out: &mut Vec<f32>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let Some(bytes) = self.get(key).await? else { return Ok(false) };
            floats_into(key, &bytes, out)?;
            Ok(true)
        }
    }
    /// Deletes keys (and accumulator bookkeeping for them); missing keys are fine.
    fn delete(&self, keys: &[&str]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Adds `grad` element-wise into the accumulator at `key` unless `token` was already
    /// applied to it; creates the accumulator on first use. The sum is taken in ascending
    /// `slot` order whatever order the calls arrive in, so it is the same bit for bit for any
    /// arrival order; a slot already filled is refused. All vectors added to one key must
    /// have the same length (else [`StoreError::BadValue`], nothing changed). Returns whether
    /// this call was applied. Atomic: concurrent calls never lose an addition.
    fn accumulate(
        &self,
        key: &str,
        token: &str,
        slot: u32,
        grad: &[f32],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The accumulator at `key`: sum and count (`None` if nothing was accumulated).
    fn read_accumulated(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Accumulated>, StoreError>> + Send;
}

/// Decodes `bytes`, the value at `key` (little-endian `f32`s), into `out`, reusing its
/// allocation.
fn floats_into(key: &str, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), StoreError> {
    peerless_core::flat::from_le_bytes_into(bytes, out).map_err(|_| not_floats(key, bytes.len()))
}

/// The error for a value of `len` bytes at `key` read as a vector.
fn not_floats(key: &str, len: usize) -> StoreError {
    StoreError::BadValue {
        key: key.to_owned(),
        reason: peerless_core::flat::FlatError::BadBytes { len }.to_string(),
    }
}
