//! Wire types of the gradient function and of the invocation ledger.
//!
//! A gradient function is stateless: everything it needs arrives in a [`GradientRequest`]
//! (JSON, well under Lambda's 6 MB synchronous limit: parameters and gradients never travel
//! inline, only store keys), and it answers with a [`GradientResponse`]. Every invocation
//! attempt leaves one [`InvocationRecord`] in the ledger.

use serde::{Deserialize, Serialize};

/// Lambda's synchronous invocation payload limit (request and response), bytes.
pub const SYNC_PAYLOAD_LIMIT: usize = 6 * 1024 * 1024;

/// Where the function's store is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreRef {
    /// `redis://[:password@]host:port/` — the embedded store speaks the same protocol.
    pub url: String,
}

/// How the function delivers its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Add into the running sum at `output_key` (in-store aggregation), once per idempotency key.
    Accumulate,
    /// Store the gradient itself at `output_key` (fetch-then-aggregate, for comparison).
    Put,
}

/// Input of one gradient invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientRequest {
    /// Invoking node (peer or worker) id.
    pub node: String,
    /// Model version = round.
    pub round: u64,
    /// Index of this mini-batch within the node's round (0..k).
    pub batch: u32,
    /// Attempt number, 0 for the first; retries reuse the idempotency key.
    pub attempt: u32,
    /// Model id, e.g. `mlp-784-256-128-10` (`peerless_ml::ModelSpec::id`).
    pub model: String,
    /// burn backend (`auto`, `ndarray`, `flex`).
    pub backend: String,
    /// Store key of the parameters of version `round` (raw little-endian f32).
    pub params_key: String,
    /// Their [`crate::flat::fingerprint`] (hex); the function refuses other bytes.
    pub params_digest: String,
    /// Dataset name (`digits`, `mnist`, `fashion-mnist`).
    pub dataset: String,
    /// Directory of IDX datasets as the function instance sees it.
    pub data_dir: String,
    /// Indices of the batch's samples in the training split.
    pub indices: Vec<u32>,
    /// Where the gradient goes.
    pub output_key: String,
    /// How it goes there.
    pub output_mode: OutputMode,
    /// The store.
    pub store: StoreRef,
    /// Whether the response carries the SHA-256 of the gradient (default `true`). Hashing
    /// the MLP's gradient costs about as much as delivering it; callers that do not compare
    /// digests (nodes read the in-store sum) set it to `false`.
    #[serde(default = "yes")]
    pub return_digest: bool,
    /// Compute on flipped labels, y → classes − 1 − y: the functions of a label-flipping
    /// attacker (experiments only; default `false`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flip_labels: bool,
    /// DiLoCo: take this many local optimizer steps, one per consecutive chunk of `indices`,
    /// and deliver the parameter delta (start − end) instead of one gradient. Absent: one
    /// gradient on all of `indices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<InnerSteps>,
}

/// The local steps of one DiLoCo invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerSteps {
    /// Local optimizer steps; `indices` splits into this many equal mini-batches.
    pub steps: u32,
    /// The inner optimizer, its state fresh at the first step.
    pub optimizer: crate::optim::OptimizerConfig,
}

fn yes() -> bool {
    true
}

impl GradientRequest {
    /// The key that makes delivery idempotent: a retried attempt of the same
    /// `(node, round, batch)` is never counted twice.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.node, self.round, self.batch)
    }
}

/// Output of one gradient invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientResponse {
    /// Where the gradient was written (or accumulated).
    pub key: String,
    /// Its length in f32 values.
    pub len: usize,
    /// SHA-256 (hex) of the gradient this invocation computed, when the request asked for it
    /// (`return_digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Mean loss on the batch; finite (a JSON number beyond f32's range is refused, not ±∞).
    #[serde(deserialize_with = "finite_f32")]
    pub loss: f32,
    /// Samples in the batch.
    pub samples: u32,
    /// Time spent computing (load + forward + backward + flatten), ms.
    pub compute_ms: f64,
    /// Whether this delivery was counted (false when the idempotency key was already used).
    pub applied: bool,
    /// Whether the instance served its first invocation (cold) with this one.
    pub cold: bool,
}

/// An f32 that must be finite: serde turns a JSON number beyond f32's range into ±∞.
fn finite_f32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = f32::deserialize(d)?;
    if v.is_finite() { Ok(v) } else { Err(serde::de::Error::custom(format!("{v} is not a finite f32"))) }
}

/// How an invocation attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The function answered.
    Ok,
    /// The function reported an error (`/error`), e.g. bad input.
    FunctionError,
    /// The instance died mid-invocation.
    Crashed,
    /// The invocation exceeded its timeout; the instance was killed.
    Timeout,
    /// The instance exceeded its memory limit and was killed.
    OutOfMemory,
    /// Refused at the concurrency limit.
    Throttled,
}

impl Outcome {
    /// Whether a retry may succeed (Lambda retries these for asynchronous invocations).
    pub fn is_retryable(self) -> bool {
        matches!(self, Outcome::Crashed | Outcome::Timeout | Outcome::Throttled | Outcome::OutOfMemory)
    }
}

/// One ledger line: one invocation attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvocationRecord {
    /// Function name.
    pub function: String,
    /// Request id (unique per attempt).
    pub request_id: String,
    /// Invoking node.
    pub node: String,
    /// Round.
    pub round: u64,
    /// Batch.
    pub batch: u32,
    /// Attempt.
    pub attempt: u32,
    /// Configured memory, MB.
    pub memory_mb: u64,
    /// Duration billed, whole ms (rounded up); 0 when throttled.
    pub billed_ms: u64,
    /// Whether a cold start preceded it.
    pub cold_start: bool,
    /// Cold-start (spawn + init) time, µs, when cold.
    pub init_us: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Charge in pico-dollars (0 when throttled: Lambda does not bill throttles).
    pub cost_pico: u64,
    /// Lambda's "Max Memory Used", MB: the instance's peak resident memory up to the end of
    /// this attempt (locally its process's `VmHWM`; on AWS from the `REPORT` line); 0 when
    /// unknown (throttled, no instance, no report). Absent from older ledgers: 0.
    #[serde(default)]
    pub max_memory_mb: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `fuzz/fuzz_targets/gradient_request.rs`: `"loss": 1e39` decoded as +∞. (The
    /// same serde path through TOML here, which this crate already tests with.)
    #[test]
    fn a_response_loss_beyond_f32_is_refused() {
        let text = |loss: &str| {
            format!(
                "key = \"k\"\nlen = 1\nloss = {loss}\nsamples = 1\ncompute_ms = 1.0\napplied = true\ncold = false\n"
            )
        };
        let ok: GradientResponse = toml::from_str(&text("2.5")).unwrap();
        assert_eq!(ok.loss, 2.5);
        for bad in ["1e39", "-1e39", "inf", "nan"] {
            let err = toml::from_str::<GradientResponse>(&text(bad)).unwrap_err().to_string();
            assert!(err.contains("not a finite f32"), "{bad}: {err}");
        }
    }
}
