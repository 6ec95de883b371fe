//! Why a gradient invocation fails, and whether retrying can help.

use peerless_ml::data::DataError;
use peerless_ml::{DatasetName, ModelError};

use crate::function::HandlerError;
use crate::store::StoreError;

/// Why an invocation failed. Each message names what is wrong; they become the function's
/// error (`/error` on the Lambda Runtime API).
#[derive(Debug, thiserror::Error)]
pub enum GradientError {
    /// A request field is missing, malformed or inconsistent with another.
    #[error("invalid gradient request: {field}: {reason}")]
    InvalidRequest {
        /// The field (`payload` for JSON that is not a request at all).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A sample index is not in the training split.
    #[error(
        "invalid gradient request: indices[{position}] = {index} is out of range for {dataset} \
         ({len} samples)"
    )]
    IndexOutOfRange {
        /// Position of the bad index in `indices`.
        position: usize,
        /// The bad index.
        index: u32,
        /// The split, e.g. `digits/train`.
        dataset: String,
        /// Number of samples in it.
        len: usize,
    },
    /// The dataset could not be loaded from the instance's data directory.
    #[error("dataset {dataset}: {source}")]
    Data {
        /// Dataset name.
        dataset: DatasetName,
        /// The cause, which says how to fix it.
        #[source]
        source: DataError,
    },
    /// Building the model or computing the gradient failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Nothing is stored at the parameters key.
    #[error("parameters {key} are not in the store (expired, deleted, or never written)")]
    ParamsMissing {
        /// The key.
        key: String,
    },
    /// The stored parameters are not a vector of the model's length, or hold NaN/infinity.
    #[error("parameters {key} for {model}: {reason}")]
    BadParams {
        /// The key.
        key: String,
        /// Model id.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// The stored parameters are not the version the request names.
    #[error(
        "parameters {key} have SHA-256 {actual}, but the request expects {expected}; refusing to \
         compute on other parameters"
    )]
    DigestMismatch {
        /// The key.
        key: String,
        /// Digest the request names.
        expected: String,
        /// Digest of the bytes found.
        actual: String,
    },
    /// The loss or the gradient came out NaN or infinite.
    #[error("non-finite result on {model}, round {round}, batch {batch}: {reason}")]
    NonFinite {
        /// Model id.
        model: String,
        /// Round.
        round: u64,
        /// Batch.
        batch: u32,
        /// The loss value or the first bad gradient element.
        reason: String,
    },
    /// The blocking compute task panicked or was cancelled.
    #[error("gradient computation aborted: {0}")]
    Aborted(String),
}

impl GradientError {
    /// A short, stable name for the error's kind; the function error's `errorType` is
    /// `Peerless.<kind>` (`Peerless.BadInput` for a request that can never succeed as sent).
    pub fn kind(&self) -> &'static str {
        match self {
            GradientError::InvalidRequest { .. } | GradientError::IndexOutOfRange { .. } => "BadInput",
            GradientError::Data { .. } => "DatasetError",
            GradientError::Model(_) => "ModelError",
            GradientError::Store(_) => "StoreError",
            GradientError::ParamsMissing { .. } => "ParamsMissing",
            GradientError::BadParams { .. } => "BadParams",
            GradientError::DigestMismatch { .. } => "DigestMismatch",
            GradientError::NonFinite { .. } => "NonFinite",
            GradientError::Aborted(_) => "Aborted",
        }
    }

    /// Whether retrying the same request may succeed: store connection or command failures
    /// (the store may be back) and aborted computations. Everything else depends only on the
    /// request and the stored bytes and fails again.
    pub fn is_retryable(&self) -> bool {
        match self {
            GradientError::Store(e) => !matches!(e, StoreError::BadValue { .. }),
            GradientError::Aborted(_) => true,
            _ => false,
        }
    }
}

impl From<GradientError> for HandlerError {
    fn from(e: GradientError) -> Self {
        HandlerError::new(format!("Peerless.{}", e.kind()), e.to_string())
    }
}

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> GradientError {
    GradientError::InvalidRequest { field, reason: reason.into() }
}
