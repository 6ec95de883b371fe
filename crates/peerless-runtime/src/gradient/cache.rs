//! What a warm instance keeps between invocations, and how each cache is filled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use peerless_core::flat::{Digest, fingerprint_finite};
use peerless_ml::{Backend, Dataset, DatasetName, Model, ModelSpec};

use super::error::GradientError;
use super::function::GradientFunction;
use super::request::fit_to_dataset;
use crate::store::redis::elide_password;
use crate::store::{Store, StoreError};

/// The parameters of the last version seen.
pub(super) struct CachedParams {
    pub(super) key: String,
    pub(super) digest: Digest,
    pub(super) values: Arc<Vec<f32>>,
}

impl<S: Store + Clone + 'static> GradientFunction<S> {
    /// The training split of `name` from `data_dir`, loaded once per instance.
    pub(super) async fn dataset(
        &mut self,
        name: DatasetName,
        data_dir: &str,
    ) -> Result<Arc<Dataset>, GradientError> {
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
    pub(super) fn model(
        &mut self,
        id: &str,
        spec: ModelSpec,
        backend: Backend,
        data: &Dataset,
    ) -> Result<Model, GradientError> {
        let spec = fit_to_dataset(spec, id, data)?;
        let key = (id.to_owned(), backend.resolve().to_string(), spec.input);
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
    pub(super) async fn store(&mut self, url: &str) -> Result<S, GradientError> {
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
    pub(super) fn check_store<T>(&mut self, url: &str, r: Result<T, StoreError>) -> Result<T, GradientError> {
        r.map_err(|e| {
            if !matches!(e, StoreError::BadValue { .. }) && self.stores.remove(url).is_some() {
                tracing::warn!(store = %elide_password(url), error = %e, "dropping store client after a failure");
            }
            GradientError::Store(e)
        })
    }

    /// The parameters at `key` with SHA-256 `want`, from the cache when it holds exactly that
    /// version, else fetched and verified (length for `model`, finiteness, fingerprint) first.
    pub(super) async fn params(
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
        // The last version's vector is read over in place (its allocation reused). The cache
        // is emptied first: on a failure the vector may hold part of the new version.
        let mut values = self.params.take().and_then(|c| Arc::into_inner(c.values)).unwrap_or_default();
        let t = Instant::now();
        let r = store.get_floats(key, &mut values).await;
        let found = self.check_store(url, r).map_err(|e| match e {
            GradientError::Store(StoreError::BadValue { reason, .. }) => bad(reason),
            other => other,
        })?;
        if !found {
            return Err(GradientError::ParamsMissing { key: key.to_owned() });
        }
        self.stats.param_fetches += 1;
        let fetch_ms = t.elapsed().as_secs_f64() * 1e3;
        // Fingerprinted right here, as the gradient is computed (see `compute`): an instance
        // serves one invocation at a time, and a blocking thread's two wake-ups cost more than
        // the ~0.05 ms of work for the MLP.
        let (actual, finite) = fingerprint_finite("parameters", &values);
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
        finite.map_err(|e| bad(e.to_string()))?;
        tracing::debug!(key, digest = %want.short(), len = n, fetch_ms, "parameters fetched");
        let values = Arc::new(values);
        // Replace, never add: only the last version is kept.
        self.params = Some(CachedParams { key: key.to_owned(), digest: want, values: Arc::clone(&values) });
        Ok(values)
    }
}
