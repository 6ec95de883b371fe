//! The gradient function: the stateless computation one function invocation performs.
//!
//! A [`GradientRequest`] names everything: the model (by id), the dataset and the sample indices
//! of the batch, the store key and SHA-256 of the parameters, and where the gradient goes.
//! [`GradientFunction::handle`] validates it, reads the parameters from the store (refusing
//! bytes whose length or digest is not the one asked for), computes the mean cross-entropy
//! loss and its gradient on a blocking thread, refuses non-finite results, and delivers the
//! gradient: added into the accumulator at `output_key` at most once per
//! [`GradientRequest::idempotency_key`] ([`OutputMode::Accumulate`]), or stored there as
//! little-endian `f32` bytes ([`OutputMode::Put`]).
//!
//! # What a warm instance keeps
//! The function is stateless in what it *computes*: the response depends only on the request
//! and the store. A warm instance keeps caches that make repeated invocations cheap and are
//! keyed by everything that determines their content, so they are never stale:
//! - datasets, by name and data directory (the training split only; the files are checksummed
//!   when loaded, so a name and directory always give the same samples);
//! - models, by id, resolved backend and input shape;
//! - store clients, by URL (a client whose command failed is dropped and reconnected next time);
//! - the parameters of the **last** version seen, by `params_key` **and** digest: a request
//!   with another key or another digest fetches again, and the fetched bytes are only cached
//!   after their length and SHA-256 were checked (a cache hit compares digests, it does not
//!   hash the parameters again);
//! - the last gradient's buffer, overwritten in full by the next computation.
//!
//! Datasets, models and clients are few per instance (one per dataset, model and store a run
//! uses), so those caches are not bounded; the parameter cache holds one version.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use peerless_core::flat::{Digest, FlatError, check_finite, digest, from_le_bytes, to_le_bytes};
use peerless_core::function::{GradientRequest, GradientResponse, OutputMode};
use peerless_ml::data::DataError;
use peerless_ml::{Arch, Backend, Dataset, DatasetName, Model, ModelError, ModelSpec};

use crate::function::{HandlerError, HandlerFuture};
use crate::store::redis::elide_password;
use crate::store::{RedisStore, Store, StoreError};

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

fn invalid(field: &'static str, reason: impl Into<String>) -> GradientError {
    GradientError::InvalidRequest { field, reason: reason.into() }
}

/// A future that connects to a store.
pub type ConnectFuture<S> = Pin<Box<dyn Future<Output = Result<S, StoreError>> + Send>>;

/// How a [`GradientFunction`] opens a store client for a URL.
type Connector<S> = Box<dyn Fn(&str) -> ConnectFuture<S> + Send + Sync>;

/// The parameters of the last version seen.
struct CachedParams {
    key: String,
    digest: Digest,
    values: Arc<Vec<f32>>,
}

/// Counters of a [`GradientFunction`]'s work, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GradientStats {
    /// Invocations handled (successful or not).
    pub invocations: u64,
    /// Datasets loaded (cache misses).
    pub dataset_loads: u64,
    /// Models built (cache misses).
    pub model_builds: u64,
    /// Store clients opened (cache misses).
    pub store_connects: u64,
    /// Parameter fetches from the store (cache misses).
    pub param_fetches: u64,
    /// Invocations served from the parameter cache.
    pub param_hits: u64,
}

/// The gradient function, with the caches a warm instance keeps (see the module docs).
///
/// Generic over the store client so that tests can use an in-memory [`Store`]; the function
/// binary uses the default, [`RedisStore`] (both store backends speak RESP). One instance
/// handles one invocation at a time (`&mut self`), as a Lambda instance does.
pub struct GradientFunction<S: Store = RedisStore> {
    connect: Connector<S>,
    stores: HashMap<String, S>,
    datasets: HashMap<(DatasetName, PathBuf), Arc<Dataset>>,
    models: HashMap<(String, String, [usize; 3]), Model>,
    params: Option<CachedParams>,
    /// The last invocation's gradient buffer, reused by the next (no 1 MB allocation and
    /// zeroing per invocation for the MLP).
    scratch: Option<Vec<f32>>,
    stats: GradientStats,
}

impl<S: Store> fmt::Debug for GradientFunction<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GradientFunction")
            .field("stores", &self.stores.keys().map(|u| elide_password(u)).collect::<Vec<_>>())
            .field("datasets", &self.datasets.keys().collect::<Vec<_>>())
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("params", &self.params.as_ref().map(|p| (&p.key, p.digest.short())))
            .field("stats", &self.stats)
            .finish()
    }
}

impl GradientFunction<RedisStore> {
    /// A function that opens [`RedisStore`] clients.
    pub fn new() -> Self {
        GradientFunction::with_connector(|url| {
            let url = url.to_owned();
            Box::pin(async move { RedisStore::connect(&url).await })
        })
    }
}

impl Default for GradientFunction<RedisStore> {
    fn default() -> Self {
        GradientFunction::new()
    }
}

/// A request's fields, parsed.
struct Parsed {
    dataset: DatasetName,
    spec: ModelSpec,
    backend: Backend,
    digest: Digest,
}

/// Checks every field that can be checked without I/O.
fn parse(req: &GradientRequest) -> Result<Parsed, GradientError> {
    let dataset: DatasetName =
        req.dataset.parse().map_err(|e: DataError| invalid("dataset", e.to_string()))?;
    // `ModelError::Config` displays as "model <reason>"; the field name already says which.
    let reason = |e: ModelError| match e {
        ModelError::Config(r) => r,
        other => other.to_string(),
    };
    let spec = ModelSpec::from_id(&req.model).map_err(|e| invalid("model", reason(e)))?;
    let backend: Backend = req.backend.parse().map_err(|e| invalid("backend", reason(e)))?;
    let digest: Digest = req
        .params_digest
        .parse()
        .map_err(|e| invalid("params_digest", format!("{:?}: {e}", req.params_digest)))?;
    if req.indices.is_empty() {
        return Err(invalid("indices", "empty batch: at least one sample index is needed"));
    }
    if u32::try_from(req.indices.len()).is_err() {
        return Err(invalid("indices", format!("{} samples do not fit the response", req.indices.len())));
    }
    for (field, value) in
        [("params_key", &req.params_key), ("output_key", &req.output_key), ("store.url", &req.store.url)]
    {
        if value.trim().is_empty() {
            return Err(invalid(field, "empty"));
        }
    }
    if req.output_key == req.params_key {
        return Err(invalid("output_key", format!("{:?} is also the parameters key", req.output_key)));
    }
    Ok(Parsed { dataset, spec, backend, digest })
}

/// The first index that is not in `data`, as an error naming it.
fn check_indices(indices: &[u32], data: &Dataset) -> Result<(), GradientError> {
    match indices.iter().position(|&i| usize::try_from(i).map_or(true, |i| i >= data.len())) {
        Some(position) => Err(GradientError::IndexOutOfRange {
            position,
            index: indices[position],
            dataset: data.name.clone(),
            len: data.len(),
        }),
        None => Ok(()),
    }
}

/// The spec with the dataset's input shape, or why the model does not fit the dataset.
fn fit_to_dataset(mut spec: ModelSpec, id: &str, data: &Dataset) -> Result<ModelSpec, GradientError> {
    let features = data.features();
    match spec.arch {
        Arch::Logreg | Arch::Mlp => {
            let [c, h, w] = spec.input;
            if c * h * w != features {
                return Err(invalid(
                    "model",
                    format!(
                        "{id} takes {} input features, but {} has {features} ({:?})",
                        c * h * w,
                        data.name,
                        data.shape
                    ),
                ));
            }
            spec.input = data.shape;
        }
        Arch::Lenet => {
            if spec.input != data.shape {
                return Err(invalid(
                    "model",
                    format!(
                        "{id} takes inputs of shape {:?}, but {} has {:?}",
                        spec.input, data.name, data.shape
                    ),
                ));
            }
        }
    }
    if spec.classes != data.classes {
        return Err(invalid(
            "model",
            format!("{id} has {} classes, but {} has {}", spec.classes, data.name, data.classes),
        ));
    }
    Ok(spec)
}

/// What the blocking compute task hands over before it hashes the gradient.
struct Computed {
    loss: f32,
    grad: Arc<Vec<f32>>,
    compute_ms: f64,
    /// Whether every gradient element is finite.
    finite: Result<(), FlatError>,
}

impl<S: Store + Clone + 'static> GradientFunction<S> {
    /// A function that opens store clients with `connect` (called once per URL while the
    /// client keeps working).
    pub fn with_connector<F>(connect: F) -> Self
    where
        F: Fn(&str) -> ConnectFuture<S> + Send + Sync + 'static,
    {
        GradientFunction {
            connect: Box::new(connect),
            stores: HashMap::new(),
            datasets: HashMap::new(),
            models: HashMap::new(),
            params: None,
            scratch: None,
            stats: GradientStats::default(),
        }
    }

    /// Counters of the work done so far.
    pub fn stats(&self) -> &GradientStats {
        &self.stats
    }

    /// Serves one invocation: validate, fetch (or reuse) the parameters, compute, deliver.
    pub async fn handle(&mut self, req: GradientRequest) -> Result<GradientResponse, GradientError> {
        let cold = self.stats.invocations == 0;
        self.stats.invocations += 1;
        let started = Instant::now();
        let result = self.serve(&req, cold).await;
        match &result {
            Ok(r) => tracing::debug!(
                node = %req.node, round = req.round, batch = req.batch, attempt = req.attempt,
                key = %r.key, loss = r.loss, samples = r.samples, compute_ms = r.compute_ms,
                total_ms = started.elapsed().as_secs_f64() * 1e3, applied = r.applied, cold,
                "gradient delivered"
            ),
            Err(e) => tracing::warn!(
                node = %req.node, round = req.round, batch = req.batch, attempt = req.attempt,
                kind = e.kind(), error = %e, "gradient invocation failed"
            ),
        }
        result
    }

    /// [`GradientFunction::handle`] on JSON, for the function runtime's handler registry.
    /// A payload that is not a [`GradientRequest`] (including one with unknown fields) is an
    /// [`GradientError::InvalidRequest`] naming the problem.
    pub async fn handle_json(&mut self, v: serde_json::Value) -> Result<serde_json::Value, GradientError> {
        let req: GradientRequest = serde_json::from_value(v)
            .map_err(|e| invalid("payload", format!("not a gradient request: {e}")))?;
        let resp = self.handle(req).await?;
        serde_json::to_value(&resp)
            .map_err(|e| GradientError::Aborted(format!("serializing the response: {e}")))
    }

    /// This function as a handler for the function runtime's registry
    /// (`Handlers::builtin().with("gradient", GradientFunction::new().into_handler())`).
    /// Invocations are served one at a time, in arrival order, sharing the caches; errors
    /// become function errors of type `Peerless.<kind>` (see [`GradientError::kind`]).
    pub fn into_handler(self) -> impl Fn(serde_json::Value) -> HandlerFuture + Send + Sync + 'static {
        let this = Arc::new(tokio::sync::Mutex::new(self));
        move |v| {
            let this = Arc::clone(&this);
            Box::pin(async move { this.lock().await.handle_json(v).await.map_err(HandlerError::from) })
        }
    }

    async fn serve(&mut self, req: &GradientRequest, cold: bool) -> Result<GradientResponse, GradientError> {
        let parsed = parse(req)?;
        let data = self.dataset(parsed.dataset, &req.data_dir).await?;
        check_indices(&req.indices, &data)?;
        let model = self.model(&req.model, parsed.spec, parsed.backend, &data)?;
        let store = self.store(&req.store.url).await?;
        let params = self.params(&store, &req.store.url, &req.params_key, parsed.digest, &model).await?;

        let indices: Vec<usize> = req.indices.iter().map(|&i| i as usize).collect();
        let task_model = model.clone();
        let mut grad = self.scratch.take().unwrap_or_default();
        // One blocking task computes, hands the gradient over, then hashes it while this task
        // delivers it: the hash runs on the core whose cache still holds the gradient, and no
        // second thread has to be woken.
        let (computed_tx, computed_rx) = tokio::sync::oneshot::channel();
        let task = tokio::task::spawn_blocking(move || -> Option<Digest> {
            let t = Instant::now();
            let batch = data.gather(&indices);
            // Every element is overwritten: the buffer only needs the right length.
            grad.resize(task_model.num_params(), 0.0);
            let loss = match task_model.loss_and_grad_into(&params, &batch, &mut grad) {
                Ok(loss) => loss,
                Err(e) => {
                    // The receiver only goes away when the invocation is cancelled.
                    let _ = computed_tx.send(Err(e));
                    return None;
                }
            };
            let compute_ms = t.elapsed().as_secs_f64() * 1e3;
            let finite = check_finite("gradient", &grad);
            let deliverable = loss.is_finite() && finite.is_ok();
            let grad = Arc::new(grad);
            let computed = Computed { loss, grad: Arc::clone(&grad), compute_ms, finite };
            if computed_tx.send(Ok(computed)).is_err() || !deliverable {
                return None;
            }
            Some(digest(&grad))
        });
        let computed = match computed_rx.await {
            Ok(r) => r?,
            // The task ended without a word: it panicked (or the runtime is shutting down).
            Err(_) => {
                let why = task.await.err().map_or_else(|| "no result".to_owned(), |e| e.to_string());
                return Err(GradientError::Aborted(why));
            }
        };

        let non_finite = |reason: String| GradientError::NonFinite {
            model: req.model.clone(),
            round: req.round,
            batch: req.batch,
            reason,
        };
        if !computed.loss.is_finite() {
            return Err(non_finite(format!("loss is {}", computed.loss)));
        }
        computed.finite.map_err(|e| non_finite(e.to_string()))?;

        // The digest is only for the response; it is being computed meanwhile (≈ 0.5–1 ms for
        // the 235k-parameter MLP).
        let grad = computed.grad;
        let t = Instant::now();
        let applied = match req.output_mode {
            OutputMode::Accumulate => {
                let r = store.accumulate(&req.output_key, &req.idempotency_key(), &grad).await;
                self.check_store(&req.store.url, r)?
            }
            OutputMode::Put => {
                let r = store.put(&req.output_key, &to_le_bytes(&grad)).await;
                self.check_store(&req.store.url, r)?;
                true
            }
        };
        let deliver_ms = t.elapsed().as_secs_f64() * 1e3;
        let digest = task
            .await
            .map_err(|e| GradientError::Aborted(format!("hashing the gradient: {e}")))?
            .ok_or_else(|| GradientError::Aborted("the gradient was not hashed".to_owned()))?;
        tracing::trace!(
            deliver_ms,
            digest_wait_ms = t.elapsed().as_secs_f64() * 1e3 - deliver_ms,
            "delivered"
        );
        let len = grad.len();
        // The hashing task has returned, so this is the only reference: keep the buffer.
        self.scratch = Arc::into_inner(grad);
        Ok(GradientResponse {
            key: req.output_key.clone(),
            len,
            digest: digest.to_string(),
            loss: computed.loss,
            samples: req.indices.len() as u32,
            compute_ms: computed.compute_ms,
            applied,
            cold,
        })
    }

    /// The training split of `name` from `data_dir`, loaded once per instance.
    async fn dataset(&mut self, name: DatasetName, data_dir: &str) -> Result<Arc<Dataset>, GradientError> {
        // The embedded dataset does not depend on the directory.
        let dir = if name.is_embedded() { PathBuf::new() } else { PathBuf::from(data_dir) };
        let key = (name, dir);
        if let Some(d) = self.datasets.get(&key) {
            return Ok(Arc::clone(d));
        }
        let t = Instant::now();
        let dir = key.1.clone();
        let split = tokio::task::spawn_blocking(move || peerless_ml::data::load(name, Path::new(&dir)))
            .await
            .map_err(|e| GradientError::Aborted(format!("loading {name}: {e}")))?
            .map_err(|source| GradientError::Data { dataset: name, source })?;
        // Only the training split is used; the test split is dropped to save memory.
        let train = Arc::new(split.train);
        self.stats.dataset_loads += 1;
        tracing::info!(dataset = %name, samples = train.len(), ms = t.elapsed().as_secs_f64() * 1e3, "dataset loaded");
        self.datasets.insert(key, Arc::clone(&train));
        Ok(train)
    }

    /// The model `id` on `backend`, shaped for `data`, built once per instance.
    fn model(
        &mut self,
        id: &str,
        spec: ModelSpec,
        backend: Backend,
        data: &Dataset,
    ) -> Result<Model, GradientError> {
        let spec = fit_to_dataset(spec, id, data)?;
        let key = (id.to_owned(), backend.resolve(spec.arch).to_string(), spec.input);
        if let Some(m) = self.models.get(&key) {
            return Ok(m.clone());
        }
        let model = Model::new(spec, backend)?;
        self.stats.model_builds += 1;
        tracing::info!(model = id, backend = %model.backend(), params = model.num_params(), "model built");
        self.models.insert(key, model.clone());
        Ok(model)
    }

    /// The store client for `url`, opened once per instance (and again after a failure).
    async fn store(&mut self, url: &str) -> Result<S, GradientError> {
        if let Some(s) = self.stores.get(url) {
            return Ok(s.clone());
        }
        let store = (self.connect)(url).await?;
        self.stats.store_connects += 1;
        tracing::info!(store = %elide_password(url), "store connected");
        self.stores.insert(url.to_owned(), store.clone());
        Ok(store)
    }

    /// Passes a store result through, dropping the client for `url` when the connection may
    /// be broken, so that the next invocation reconnects.
    fn check_store<T>(&mut self, url: &str, r: Result<T, StoreError>) -> Result<T, GradientError> {
        r.map_err(|e| {
            if !matches!(e, StoreError::BadValue { .. }) && self.stores.remove(url).is_some() {
                tracing::warn!(store = %elide_password(url), error = %e, "dropping store client after a failure");
            }
            GradientError::Store(e)
        })
    }

    /// The parameters at `key` with SHA-256 `want`, from the cache when it holds exactly that
    /// version, else fetched and verified (length for `model`, finiteness, digest) first.
    async fn params(
        &mut self,
        store: &S,
        url: &str,
        key: &str,
        want: Digest,
        model: &Model,
    ) -> Result<Arc<Vec<f32>>, GradientError> {
        let n = model.num_params();
        let bad =
            |reason: String| GradientError::BadParams { key: key.to_owned(), model: model.id(), reason };
        if let Some(c) = &self.params
            && c.key == key
            && c.digest == want
        {
            if c.values.len() != n {
                return Err(bad(format!("{} values, the model has {n} parameters", c.values.len())));
            }
            self.stats.param_hits += 1;
            return Ok(Arc::clone(&c.values));
        }
        let t = Instant::now();
        let r = store.get(key).await;
        let bytes =
            self.check_store(url, r)?.ok_or_else(|| GradientError::ParamsMissing { key: key.to_owned() })?;
        self.stats.param_fetches += 1;
        let fetch_ms = t.elapsed().as_secs_f64() * 1e3;
        // Decoding and hashing a few MB is CPU work: keep it off the async threads.
        let (values, actual) = tokio::task::spawn_blocking(move || {
            from_le_bytes(&bytes).map(|v| {
                let d = digest(&v);
                (v, d)
            })
        })
        .await
        .map_err(|e| GradientError::Aborted(format!("decoding parameters {key}: {e}")))?
        .map_err(|e: FlatError| bad(e.to_string()))?;
        if values.len() != n {
            return Err(bad(format!("{} values, the model has {n} parameters", values.len())));
        }
        if actual != want {
            return Err(GradientError::DigestMismatch {
                key: key.to_owned(),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
        check_finite("parameters", &values).map_err(|e| bad(e.to_string()))?;
        tracing::debug!(key, digest = %want.short(), len = n, fetch_ms, "parameters fetched");
        let values = Arc::new(values);
        // Replace, never add: only the last version is kept.
        self.params = Some(CachedParams { key: key.to_owned(), digest: want, values: Arc::clone(&values) });
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use peerless_core::function::StoreRef;
    use peerless_ml::data::load;

    use super::*;
    use crate::store::Accumulated;

    /// An in-memory [`Store`] with the documented semantics, counting `get`s per key.
    #[derive(Clone, Default)]
    struct MemStore {
        inner: Arc<Mutex<Mem>>,
    }

    #[derive(Default)]
    struct Mem {
        values: HashMap<String, Vec<u8>>,
        sums: HashMap<String, (Vec<f32>, u64, HashSet<String>)>,
        gets: HashMap<String, u64>,
    }

    impl MemStore {
        fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
            self.inner.lock().unwrap()
        }
        fn gets(&self, key: &str) -> u64 {
            self.lock().gets.get(key).copied().unwrap_or(0)
        }
        fn put_params(&self, key: &str, params: &[f32]) -> String {
            self.lock().values.insert(key.to_owned(), to_le_bytes(params));
            digest(params).to_string()
        }
    }

    impl Store for MemStore {
        async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.lock().values.insert(key.to_owned(), value.to_vec());
            Ok(())
        }
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let mut m = self.lock();
            *m.gets.entry(key.to_owned()).or_default() += 1;
            Ok(m.values.get(key).cloned())
        }
        async fn delete(&self, keys: &[&str]) -> Result<(), StoreError> {
            let mut m = self.lock();
            for k in keys {
                m.values.remove(*k);
                m.sums.remove(*k);
            }
            Ok(())
        }
        async fn accumulate(&self, key: &str, token: &str, grad: &[f32]) -> Result<bool, StoreError> {
            let mut m = self.lock();
            let (sum, count, tokens) =
                m.sums.entry(key.to_owned()).or_insert_with(|| (vec![0.0; grad.len()], 0, HashSet::new()));
            if sum.len() != grad.len() {
                return Err(StoreError::BadValue {
                    key: key.to_owned(),
                    reason: format!("length {} added to an accumulator of {}", grad.len(), sum.len()),
                });
            }
            if !tokens.insert(token.to_owned()) {
                return Ok(false);
            }
            peerless_core::flat::add_assign(sum, grad);
            *count += 1;
            Ok(true)
        }
        async fn read_accumulated(&self, key: &str) -> Result<Option<Accumulated>, StoreError> {
            Ok(self
                .lock()
                .sums
                .get(key)
                .map(|(sum, count, _)| Accumulated { sum: sum.clone(), count: *count }))
        }
    }

    const URL: &str = "redis://:secret@127.0.0.1:6379/";

    /// A function whose every connection reaches `store`, counting connects.
    fn function(store: &MemStore) -> (GradientFunction<MemStore>, Arc<AtomicU64>) {
        let connects = Arc::new(AtomicU64::new(0));
        let (s, c) = (store.clone(), Arc::clone(&connects));
        let f = GradientFunction::with_connector(move |_url| {
            c.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            Box::pin(async move { Ok(s) })
        });
        (f, connects)
    }

    fn digits() -> Dataset {
        load(DatasetName::Digits, Path::new("/unused")).unwrap().train
    }

    /// The small MLP of these tests, built the way the function builds it.
    fn small_mlp(data: &Dataset) -> Model {
        let spec = ModelSpec { hidden: vec![32], ..ModelSpec::new(Arch::Mlp, data.shape, data.classes) };
        Model::new(spec, Backend::Auto).unwrap()
    }

    fn request(model: &Model, params_key: &str, params_digest: &str, indices: Vec<u32>) -> GradientRequest {
        GradientRequest {
            node: "peer-3".into(),
            round: 7,
            batch: 1,
            attempt: 0,
            model: model.id(),
            backend: "auto".into(),
            params_key: params_key.into(),
            params_digest: params_digest.into(),
            dataset: "digits".into(),
            data_dir: "/nowhere".into(),
            indices,
            output_key: "grad/7/peer-3".into(),
            output_mode: OutputMode::Accumulate,
            store: StoreRef { url: URL.into() },
        }
    }

    fn batch_indices(n: u32, offset: u32) -> Vec<u32> {
        (0..n).map(|i| (i * 29 + offset) % 1442).collect()
    }

    /// The gradient computed directly, as the reference.
    fn direct(model: &Model, params: &[f32], data: &Dataset, indices: &[u32]) -> (f32, Vec<f32>) {
        let idx: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
        model.loss_and_grad(params, &data.gather(&idx)).unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[tokio::test]
    async fn gradient_equals_direct_loss_and_grad_bit_for_bit() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        assert_eq!(model.id(), "mlp-64-32-10");
        let params = model.init(3);
        let d = store.put_params("params/7", &params);
        let (mut f, connects) = function(&store);

        let req = request(&model, "params/7", &d, batch_indices(64, 0));
        let (loss, grad) = direct(&model, &params, &data, &req.indices);
        let resp = f.handle(req.clone()).await.unwrap();
        assert_eq!(resp.key, "grad/7/peer-3");
        assert_eq!(resp.len, model.num_params());
        assert_eq!(resp.digest, digest(&grad).to_string());
        assert_eq!(resp.loss.to_bits(), loss.to_bits());
        assert_eq!(resp.samples, 64);
        assert!(resp.applied && resp.cold);
        assert!(resp.compute_ms > 0.0);
        let acc = store.read_accumulated("grad/7/peer-3").await.unwrap().unwrap();
        assert_eq!((acc.count, bits(&acc.sum)), (1, bits(&grad)));

        // A second batch of the same round: warm, parameters from the cache, summed in.
        let req2 = GradientRequest { batch: 2, indices: batch_indices(64, 5), ..req };
        let (_, grad2) = direct(&model, &params, &data, &req2.indices);
        let resp2 = f.handle(req2).await.unwrap();
        assert!(resp2.applied && !resp2.cold);
        assert_eq!(resp2.digest, digest(&grad2).to_string());
        let acc = store.read_accumulated("grad/7/peer-3").await.unwrap().unwrap();
        let mut sum = grad.clone();
        peerless_core::flat::add_assign(&mut sum, &grad2);
        assert_eq!((acc.count, bits(&acc.sum)), (2, bits(&sum)));
        assert_eq!(store.gets("params/7"), 1, "the second invocation reuses the cached parameters");
        assert_eq!(connects.load(Ordering::SeqCst), 1);
        let stats = f.stats().clone();
        assert_eq!(
            stats,
            GradientStats {
                invocations: 2,
                dataset_loads: 1,
                model_builds: 1,
                store_connects: 1,
                param_fetches: 1,
                param_hits: 1
            }
        );
        let dbg = format!("{f:?}");
        assert!(dbg.contains(":***@") && !dbg.contains("secret"), "{dbg}");
    }

    #[tokio::test]
    async fn a_retry_is_not_counted_twice() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let params = model.init(4);
        let d = store.put_params("params/7", &params);
        let (mut f, _) = function(&store);
        let req = request(&model, "params/7", &d, batch_indices(16, 1));
        let first = f.handle(req.clone()).await.unwrap();
        let retry = f.handle(GradientRequest { attempt: 1, ..req.clone() }).await.unwrap();
        assert!(first.applied);
        assert!(!retry.applied, "same (node, round, batch) must not be applied twice");
        assert_eq!(first.digest, retry.digest, "the retry computes the same gradient");
        let acc = store.read_accumulated(&req.output_key).await.unwrap().unwrap();
        assert_eq!(acc.count, 1);
        assert_eq!(digest(&acc.sum).to_string(), first.digest);
        // Another node's batch with the same number is a different key and is applied.
        let other = f.handle(GradientRequest { node: "peer-4".into(), ..req.clone() }).await.unwrap();
        assert!(other.applied);
        assert_eq!(store.read_accumulated(&req.output_key).await.unwrap().unwrap().count, 2);
    }

    #[tokio::test]
    async fn a_new_version_is_fetched_not_served_from_the_cache() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let (p0, p1, p2) = (model.init(10), model.init(11), model.init(12));
        let d0 = store.put_params("params/0", &p0);
        let (mut f, _) = function(&store);
        let idx = batch_indices(32, 2);
        let check = |resp: &GradientResponse, params: &[f32]| {
            let (loss, grad) = direct(&model, params, &data, &idx);
            assert_eq!(resp.digest, digest(&grad).to_string());
            assert_eq!(resp.loss.to_bits(), loss.to_bits());
        };
        let put = |round: u64| GradientRequest {
            round,
            output_mode: OutputMode::Put,
            output_key: format!("grad/{round}"),
            ..request(&model, "", "", idx.clone())
        };

        let r =
            f.handle(GradientRequest { params_key: "params/0".into(), params_digest: d0.clone(), ..put(0) });
        check(&r.await.unwrap(), &p0);
        assert_eq!(store.gets("params/0"), 1);

        // New key, new digest: fetched.
        let d1 = store.put_params("params/1", &p1);
        let r =
            f.handle(GradientRequest { params_key: "params/1".into(), params_digest: d1.clone(), ..put(1) });
        check(&r.await.unwrap(), &p1);
        assert_eq!(store.gets("params/1"), 1);

        // Same key, new contents and digest (a key reused for the next version): fetched again.
        let d2 = store.put_params("params/1", &p2);
        let r =
            f.handle(GradientRequest { params_key: "params/1".into(), params_digest: d2.clone(), ..put(2) });
        check(&r.await.unwrap(), &p2);
        assert_eq!(store.gets("params/1"), 2);

        // Same key and digest as the last version: served from the cache.
        let r = f.handle(GradientRequest { params_key: "params/1".into(), params_digest: d2, ..put(3) });
        check(&r.await.unwrap(), &p2);
        assert_eq!(store.gets("params/1"), 2);

        // Only the last version is cached: going back to version 0 fetches it again.
        let r = f.handle(GradientRequest { params_key: "params/0".into(), params_digest: d0, ..put(4) });
        check(&r.await.unwrap(), &p0);
        assert_eq!(store.gets("params/0"), 2);
        assert_eq!((f.stats().param_fetches, f.stats().param_hits), (4, 1));
    }

    #[tokio::test]
    async fn parameters_with_another_digest_are_refused() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let params = model.init(1);
        let good = store.put_params("params/7", &params);
        let other = digest(&model.init(2)).to_string();
        let (mut f, _) = function(&store);
        let req = request(&model, "params/7", &other, batch_indices(8, 0));
        let err = f.handle(req.clone()).await.unwrap_err();
        assert!(matches!(err, GradientError::DigestMismatch { .. }), "{err:?}");
        assert_eq!(err.kind(), "DigestMismatch");
        assert!(!err.is_retryable());
        let msg = err.to_string();
        assert!(msg.contains("params/7") && msg.contains(&good) && msg.contains(&other), "{msg}");
        assert!(store.read_accumulated(&req.output_key).await.unwrap().is_none(), "nothing delivered");
        // The refused bytes were not cached: the right digest then works, the wrong one still fails.
        assert!(
            f.handle(GradientRequest { params_digest: good.clone(), ..req.clone() }).await.unwrap().applied
        );
        assert!(matches!(f.handle(req).await, Err(GradientError::DigestMismatch { .. })));
    }

    #[tokio::test]
    async fn an_out_of_range_index_is_named_before_any_store_access() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let d = store.put_params("params/7", &model.init(1));
        let (mut f, connects) = function(&store);
        let err =
            f.handle(request(&model, "params/7", &d, vec![0, 5, 1441, 1442, 99_999])).await.unwrap_err();
        assert!(matches!(err, GradientError::IndexOutOfRange { position: 3, index: 1442, len: 1442, .. }));
        assert_eq!(
            err.to_string(),
            "invalid gradient request: indices[3] = 1442 is out of range for digits/train (1442 samples)"
        );
        assert_eq!(err.kind(), "BadInput");
        assert_eq!((connects.load(Ordering::SeqCst), store.gets("params/7")), (0, 0));
    }

    #[tokio::test]
    async fn parameters_of_the_wrong_length_are_refused() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let mut params = model.init(1);
        params.pop();
        let d = store.put_params("params/7", &params);
        let (mut f, _) = function(&store);
        let err = f.handle(request(&model, "params/7", &d, vec![1, 2])).await.unwrap_err();
        assert!(matches!(err, GradientError::BadParams { .. }), "{err:?}");
        let n = model.num_params();
        assert_eq!(
            err.to_string(),
            format!("parameters params/7 for mlp-64-32-10: {} values, the model has {n} parameters", n - 1)
        );

        // Bytes that are not whole f32s, NaN parameters, and no parameters at all.
        store.lock().values.insert("params/odd".into(), vec![0; 4 * n + 2]);
        let err = f.handle(request(&model, "params/odd", &d, vec![1])).await.unwrap_err();
        assert!(err.to_string().contains("not a multiple of 4"), "{err}");
        let mut nan = model.init(1);
        nan[17] = f32::NAN;
        let d = store.put_params("params/nan", &nan);
        let err = f.handle(request(&model, "params/nan", &d, vec![1])).await.unwrap_err();
        assert!(err.to_string().contains("parameters: non-finite value NaN at index 17"), "{err}");
        let err = f.handle(request(&model, "params/none", &d, vec![1])).await.unwrap_err();
        assert!(matches!(err, GradientError::ParamsMissing { ref key } if key == "params/none"), "{err:?}");
    }

    #[tokio::test]
    async fn put_mode_writes_the_gradient_bytes() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let params = model.init(9);
        let d = store.put_params("params/7", &params);
        let (mut f, _) = function(&store);
        let req = GradientRequest {
            output_mode: OutputMode::Put,
            output_key: "grad/7/peer-3/1".into(),
            ..request(&model, "params/7", &d, batch_indices(20, 3))
        };
        let resp = f.handle(req.clone()).await.unwrap();
        let (_, grad) = direct(&model, &params, &data, &req.indices);
        assert!(resp.applied);
        assert_eq!(store.lock().values.get("grad/7/peer-3/1"), Some(&to_le_bytes(&grad)));
        assert_eq!(resp.digest, digest(&grad).to_string());
        assert!(store.read_accumulated("grad/7/peer-3/1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn invalid_requests_name_the_field() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let d = store.put_params("params/7", &model.init(1));
        let (mut f, connects) = function(&store);
        let base = request(&model, "params/7", &d, vec![1, 2, 3]);
        let cases: Vec<(GradientRequest, &str)> = vec![
            (GradientRequest { indices: vec![], ..base.clone() }, "indices: empty batch"),
            (
                GradientRequest { model: "mlp-64-x-10".into(), ..base.clone() },
                "model: id \"mlp-64-x-10\" is invalid (hidden width \"x\"",
            ),
            (
                GradientRequest { model: "mlp-784-32-10".into(), ..base.clone() },
                "model: mlp-784-32-10 takes 784 input features, but digits/train has 64 ([1, 8, 8])",
            ),
            (
                GradientRequest { model: "lenet-1x28x28-10".into(), ..base.clone() },
                "model: lenet-1x28x28-10 takes inputs of shape [1, 28, 28], but digits/train has [1, 8, 8]",
            ),
            (
                GradientRequest { model: "logreg-64-12".into(), ..base.clone() },
                "model: logreg-64-12 has 12 classes, but digits/train has 10",
            ),
            (GradientRequest { dataset: "cifar".into(), ..base.clone() }, "dataset: "),
            (GradientRequest { backend: "cuda".into(), ..base.clone() }, "backend: unknown backend \"cuda\""),
            (GradientRequest { output_key: " ".into(), ..base.clone() }, "output_key: empty"),
            (GradientRequest { output_key: "params/7".into(), ..base.clone() }, "also the parameters key"),
            (GradientRequest { params_key: String::new(), ..base.clone() }, "params_key: empty"),
            (GradientRequest { params_digest: "abc".into(), ..base.clone() }, "params_digest: \"abc\""),
            (GradientRequest { store: StoreRef { url: String::new() }, ..base.clone() }, "store.url: empty"),
        ];
        for (req, want) in cases {
            let err = f.handle(req).await.unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, GradientError::InvalidRequest { .. }), "{msg}");
            assert!(msg.starts_with("invalid gradient request: "), "{msg}");
            assert!(msg.contains(want), "expected {want:?} in {msg}");
        }
        assert_eq!(connects.load(Ordering::SeqCst), 0, "invalid requests never reach the store");
        // A missing MNIST directory is a dataset error that says how to fetch it.
        let err = f.handle(GradientRequest { dataset: "mnist".into(), ..base }).await.unwrap_err();
        assert!(matches!(err, GradientError::Data { dataset: DatasetName::Mnist, .. }), "{err:?}");
        assert!(err.to_string().contains("peerless data fetch mnist --data-dir /nowhere"), "{err}");
    }

    #[tokio::test]
    async fn handle_json_round_trips_and_rejects_bad_payloads() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let params = model.init(1);
        let d = store.put_params("params/7", &params);
        let (mut f, _) = function(&store);
        let req = request(&model, "params/7", &d, vec![4, 8, 15, 16, 23, 42]);
        let v = f.handle_json(serde_json::to_value(&req).unwrap()).await.unwrap();
        let resp: GradientResponse = serde_json::from_value(v).unwrap();
        let (_, grad) = direct(&model, &params, &data, &req.indices);
        assert_eq!(resp.digest, digest(&grad).to_string());
        assert_eq!(resp.samples, 6);

        let mut extra = serde_json::to_value(&req).unwrap();
        extra["priority"] = serde_json::json!(1);
        let err = f.handle_json(extra).await.unwrap_err();
        assert!(matches!(err, GradientError::InvalidRequest { field: "payload", .. }));
        assert!(err.to_string().contains("unknown field `priority`"), "{err}");
        let mut missing = serde_json::to_value(&req).unwrap();
        missing.as_object_mut().unwrap().remove("indices");
        assert!(f.handle_json(missing).await.unwrap_err().to_string().contains("missing field `indices`"));
        let err = f.handle_json(serde_json::json!("hello")).await.unwrap_err();
        assert!(
            err.to_string().starts_with("invalid gradient request: payload: not a gradient request"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn into_handler_serves_json_and_reports_typed_errors() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let params = model.init(2);
        let d = store.put_params("params/7", &params);
        let (f, connects) = function(&store);
        let handler = f.into_handler();
        let req = request(&model, "params/7", &d, vec![3, 1, 4]);
        // Concurrent invocations are served one at a time and share the caches.
        let (a, b) = tokio::join!(
            handler(serde_json::to_value(&req).unwrap()),
            handler(serde_json::to_value(GradientRequest { batch: 2, ..req.clone() }).unwrap())
        );
        let (a, b): (GradientResponse, GradientResponse) =
            (serde_json::from_value(a.unwrap()).unwrap(), serde_json::from_value(b.unwrap()).unwrap());
        assert!(a.cold != b.cold, "exactly one of the two is the cold invocation");
        assert_eq!(a.digest, b.digest);
        assert_eq!((connects.load(Ordering::SeqCst), store.gets("params/7")), (1, 1));

        let err = handler(serde_json::json!({"model": 1})).await.unwrap_err();
        assert_eq!(err.error_type, "Peerless.BadInput");
        let wrong = GradientRequest { params_digest: digest(&[1.0]).to_string(), ..req };
        let err = handler(serde_json::to_value(&wrong).unwrap()).await.unwrap_err();
        assert_eq!(err.error_type, "Peerless.DigestMismatch");
        assert!(err.message.contains("refusing to compute on other parameters"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_failed_connection_is_retried_on_the_next_invocation() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let d = store.put_params("params/7", &model.init(1));
        let attempts = Arc::new(AtomicU64::new(0));
        let (s, a) = (store.clone(), Arc::clone(&attempts));
        let mut f = GradientFunction::with_connector(move |url| {
            let n = a.fetch_add(1, Ordering::SeqCst);
            let (s, url) = (s.clone(), url.to_owned());
            Box::pin(async move {
                if n == 0 {
                    Err(StoreError::Connect { url, reason: "connection refused".into() })
                } else {
                    Ok(s)
                }
            })
        });
        let req = request(&model, "params/7", &d, vec![1, 2]);
        let err = f.handle(req.clone()).await.unwrap_err();
        assert!(err.is_retryable() && err.kind() == "StoreError", "{err:?}");
        assert!(f.handle(req).await.unwrap().applied);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn diverged_parameters_give_a_non_finite_error_not_a_gradient() {
        let (data, store) = (digits(), MemStore::default());
        let model = small_mlp(&data);
        let huge = vec![1e30f32; model.num_params()];
        let d = store.put_params("params/7", &huge);
        let (mut f, _) = function(&store);
        let req = request(&model, "params/7", &d, vec![1, 2]);
        let err = f.handle(req.clone()).await.unwrap_err();
        assert!(matches!(err, GradientError::NonFinite { round: 7, batch: 1, .. }), "{err:?}");
        assert!(store.read_accumulated(&req.output_key).await.unwrap().is_none());
    }

    /// The production path: [`GradientFunction::new`] with `RedisStore` clients against the
    /// embedded RESP store (password-protected), end to end.
    #[tokio::test]
    async fn works_against_the_embedded_store() {
        use crate::store::EmbeddedServer;
        let server = EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some("s3cret".into())).unwrap();
        let node = RedisStore::connect(&server.url()).await.unwrap();
        let data = digits();
        let model = small_mlp(&data);
        let params = model.init(6);
        node.put("params/7", &to_le_bytes(&params)).await.unwrap();
        let d = digest(&params).to_string();
        let mut f = GradientFunction::new();
        let req = GradientRequest {
            store: StoreRef { url: server.url() },
            ..request(&model, "params/7", &d, batch_indices(64, 9))
        };
        let (loss, grad) = direct(&model, &params, &data, &req.indices);
        let first = f.handle(req.clone()).await.unwrap();
        assert!(first.applied && first.cold);
        assert_eq!((first.digest.clone(), first.loss.to_bits()), (digest(&grad).to_string(), loss.to_bits()));
        let retry = f.handle(GradientRequest { attempt: 1, ..req.clone() }).await.unwrap();
        assert!(!retry.applied && !retry.cold);
        let acc = node.read_accumulated(&req.output_key).await.unwrap().unwrap();
        assert_eq!((acc.count, bits(&acc.sum)), (1, bits(&grad)));

        let put =
            GradientRequest { output_mode: OutputMode::Put, output_key: "grad/put".into(), ..req.clone() };
        assert!(f.handle(put).await.unwrap().applied);
        assert_eq!(node.get("grad/put").await.unwrap(), Some(to_le_bytes(&grad)));
        let wrong = GradientRequest { params_digest: digest(&grad).to_string(), ..req };
        assert!(matches!(f.handle(wrong).await, Err(GradientError::DigestMismatch { .. })));
        assert_eq!((f.stats().store_connects, f.stats().param_fetches), (1, 2));
        server.shutdown().await;
    }

    /// Warm `handle` (in-memory store) against `Model::loss_and_grad` on the same batch: the
    /// overhead of the function path (validation, cache look-ups, blocking-thread hop,
    /// digest, delivery). MLP 784-256-128-10 on MNIST, batch 64. Needs `PEERLESS_DATA_DIR`;
    /// run with `cargo test -p peerless-runtime --release gradient::tests::overhead -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement; needs MNIST in PEERLESS_DATA_DIR"]
    async fn overhead_of_the_function_path() {
        let Some(dir) = std::env::var_os("PEERLESS_DATA_DIR") else {
            eprintln!("skipping: PEERLESS_DATA_DIR is not set");
            return;
        };
        let dir = dir.to_string_lossy().into_owned();
        let data = load(DatasetName::Mnist, Path::new(&dir)).unwrap().train;
        let model = Model::new(ModelSpec::new(Arch::Mlp, data.shape, data.classes), Backend::Auto).unwrap();
        let store = MemStore::default();
        let params = model.init(1);
        let d = store.put_params("params/0", &params);
        let (mut f, _) = function(&store);
        let base = GradientRequest {
            dataset: "mnist".into(),
            data_dir: dir,
            ..request(&model, "params/0", &d, vec![0])
        };
        const N: u32 = 200;
        let req = |i: u32| GradientRequest {
            batch: i,
            indices: (0..64).map(|k| (i * 64 + k) % 60_000).collect(),
            ..base.clone()
        };
        let t = Instant::now();
        f.handle(req(0)).await.unwrap();
        eprintln!(
            "cold handle (MNIST load + model + fetch + compute): {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (mut warm, mut compute, mut direct_ms) = (Vec::new(), Vec::new(), Vec::new());
        for i in 1..=N {
            let r = req(i);
            let idx: Vec<usize> = r.indices.iter().map(|&k| k as usize).collect();
            let t = Instant::now();
            let resp = f.handle(r).await.unwrap();
            warm.push(t.elapsed().as_secs_f64() * 1e3);
            compute.push(resp.compute_ms);
            let t = Instant::now();
            let batch = data.gather(&idx);
            let (_, g) = model.loss_and_grad(&params, &batch).unwrap();
            direct_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(digest(&g).to_string(), resp.digest);
        }
        let g = vec![0.25f32; model.num_params()];
        let t = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(digest(std::hint::black_box(&g)));
        }
        eprintln!("digest of {} f32: {:.3} ms", g.len(), t.elapsed().as_secs_f64() * 1e3 / 20.0);
        let t = Instant::now();
        for _ in 0..20 {
            store.accumulate("x", &format!("{}", t.elapsed().as_nanos()), &g).await.unwrap();
        }
        eprintln!("MemStore accumulate: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / 20.0);
        let (w, c, dm) = (median(warm), median(compute), median(direct_ms));
        eprintln!(
            "MLP 784-256-128-10, batch 64, {N} warm invocations (medians), in-memory store: handle \
             {w:.3} ms, of which compute {c:.3} ms; direct gather + loss_and_grad {dm:.3} ms; overhead {:.3} ms",
            w - dm
        );

        // The same through RedisStore and the embedded RESP store on loopback.
        let server = crate::store::EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), None).unwrap();
        RedisStore::connect(&server.url())
            .await
            .unwrap()
            .put("params/0", &to_le_bytes(&params))
            .await
            .unwrap();
        let mut f = GradientFunction::new();
        let url = server.url();
        let real = |i: u32| GradientRequest { store: StoreRef { url: url.clone() }, ..req(i) };
        f.handle(real(0)).await.unwrap();
        let mut warm = Vec::new();
        for i in 1..=N {
            let t = Instant::now();
            f.handle(real(i)).await.unwrap();
            warm.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let w = median(warm);
        eprintln!("embedded RESP store on loopback: handle {w:.3} ms; overhead over direct {:.3} ms", w - dm);
        server.shutdown().await;
    }
}
