//! [`GradientFunction`]: one invocation from request to response.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use peerless_core::flat::{check_finite, digest, to_le_bytes};
use peerless_core::function::{GradientRequest, GradientResponse, OutputMode};
use peerless_ml::{Dataset, DatasetName, Model};

use super::cache::CachedParams;
use super::error::{GradientError, invalid};
use super::request::{check_indices, parse};
use crate::function::{HandlerError, HandlerFuture};
use crate::store::redis::elide_password;
use crate::store::{RedisStore, Store, StoreError};

/// A future that connects to a store.
pub type ConnectFuture<S> = Pin<Box<dyn Future<Output = Result<S, StoreError>> + Send>>;

/// How a [`GradientFunction`] opens a store client for a URL.
type Connector<S> = Box<dyn Fn(&str) -> ConnectFuture<S> + Send + Sync>;

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
    pub(super) connect: Connector<S>,
    pub(super) stores: HashMap<String, S>,
    pub(super) datasets: HashMap<(DatasetName, PathBuf), Arc<Dataset>>,
    pub(super) models: HashMap<(String, String, [usize; 3]), Model>,
    pub(super) params: Option<CachedParams>,
    /// The last invocation's gradient buffer, reused by the next (no 1 MB allocation and
    /// zeroing per invocation for the MLP).
    pub(super) scratch: Option<Vec<f32>>,
    pub(super) stats: GradientStats,
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

    /// Validates `req`, computes its gradient and delivers it; `cold` is reported back.
    async fn serve(&mut self, req: &GradientRequest, cold: bool) -> Result<GradientResponse, GradientError> {
        let parsed = parse(req)?;
        let data = self.dataset(parsed.dataset, &req.data_dir).await?;
        check_indices(&req.indices, &data)?;
        let model = self.model(&req.model, parsed.spec, parsed.backend, &data)?;
        let store = self.store(&req.store.url).await?;
        let params = self.params(&store, &req.store.url, &req.params_key, parsed.digest, &model).await?;

        let indices: Vec<usize> = req.indices.iter().map(|&i| i as usize).collect();
        let mut grad = self.scratch.take().unwrap_or_default();
        let t = Instant::now();
        let computed = compute(req, &data, &model, &params, &indices, &mut grad);
        let compute_ms = t.elapsed().as_secs_f64() * 1e3;
        let loss = computed?;
        if let Err(e) = check_computed(req, loss, &grad) {
            self.scratch = Some(grad);
            return Err(e);
        }
        let delivery = self.deliver(&store, req, grad).await?;
        Ok(GradientResponse {
            key: req.output_key.clone(),
            len: delivery.len,
            digest: delivery.digest,
            loss,
            samples: req.indices.len() as u32,
            compute_ms,
            applied: delivery.applied,
            cold,
        })
    }

    /// Writes `grad` to the store as `req` asks, hashing it meanwhile when asked; keeps the
    /// buffer for the next invocation.
    async fn deliver(
        &mut self,
        store: &S,
        req: &GradientRequest,
        grad: Vec<f32>,
    ) -> Result<Delivery, GradientError> {
        // The digest is only for the response. When asked for, a blocking thread computes it
        // while this one delivers (≈ 0.5 ms each for the 235k-parameter MLP).
        let grad = Arc::new(grad);
        let hashing = req.return_digest.then(|| {
            let g = Arc::clone(&grad);
            tokio::task::spawn_blocking(move || digest(&g))
        });
        let t = Instant::now();
        let applied = match req.output_mode {
            OutputMode::Accumulate => {
                let r = store.accumulate(&req.output_key, &req.idempotency_key(), req.batch, &grad).await;
                self.check_store(&req.store.url, r)
            }
            OutputMode::Put => {
                let r = store.put(&req.output_key, &to_le_bytes(&grad)).await;
                self.check_store(&req.store.url, r).map(|()| true)
            }
        };
        let deliver_ms = t.elapsed().as_secs_f64() * 1e3;
        let digest = match hashing {
            Some(task) => Some(
                task.await
                    .map_err(|e| GradientError::Aborted(format!("hashing the gradient: {e}")))?
                    .to_string(),
            ),
            None => None,
        };
        tracing::trace!(
            deliver_ms,
            digest_wait_ms = t.elapsed().as_secs_f64() * 1e3 - deliver_ms,
            "delivered"
        );
        let len = grad.len();
        // The hashing task has returned, so this is the only reference: keep the buffer.
        self.scratch = Arc::into_inner(grad);
        Ok(Delivery { len, digest, applied: applied? })
    }
}

/// A delivered gradient: its length, its digest when asked for, whether the store applied it.
struct Delivery {
    len: usize,
    digest: Option<String>,
    applied: bool,
}

/// The loss and gradient (into `grad`) of `req`'s batch of `data` at `params`.
///
/// The computation runs right here, on the instance's one runtime thread: an instance serves
/// one invocation at a time and has nothing else to do meanwhile, and handing it to a blocking
/// thread cost two thread wake-ups per invocation (hundreds of µs on a busy machine). A panic
/// is caught and becomes a retryable `Aborted`, as it was there.
fn compute(
    req: &GradientRequest,
    data: &Dataset,
    model: &Model,
    params: &[f32],
    indices: &[usize],
    grad: &mut Vec<f32>,
) -> Result<f32, GradientError> {
    let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Some(inner) = &req.inner {
            use super::inner::{InnerError, pseudo_gradient};
            return pseudo_gradient(model, data, params, indices, inner, req.flip_labels, grad).map_err(
                |e| match e {
                    InnerError::Model(e) => GradientError::Model(e),
                    InnerError::Split { .. } => super::error::invalid("inner.steps", e.to_string()),
                    InnerError::Step { .. } => GradientError::NonFinite {
                        model: req.model.clone(),
                        round: req.round,
                        batch: req.batch,
                        reason: format!("DiLoCo {e}"),
                    },
                },
            );
        }
        // A failed read of the cache file comes back as `ModelError::Data`, naming the file.
        let mut batch = data.gather(indices).map_err(peerless_ml::ModelError::from)?;
        if req.flip_labels {
            batch.flip_labels(data.classes);
        }
        // Every element is overwritten: the buffer only needs the right length.
        grad.resize(model.num_params(), 0.0);
        Ok(model.loss_and_grad_into(params, &batch, grad)?)
    }));
    match computed {
        Ok(r) => Ok(r?),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            Err(GradientError::Aborted(format!("computing the gradient panicked: {why}")))
        }
    }
}

/// Refuses a non-finite loss or gradient computed for `req`.
fn check_computed(req: &GradientRequest, loss: f32, grad: &[f32]) -> Result<(), GradientError> {
    let non_finite = |reason: String| GradientError::NonFinite {
        model: req.model.clone(),
        round: req.round,
        batch: req.batch,
        reason,
    };
    if !loss.is_finite() {
        return Err(non_finite(format!("loss is {loss}")));
    }
    check_finite("gradient", grad).map_err(|e| non_finite(e.to_string()))
}
