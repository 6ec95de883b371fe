//! The gradient function's benchmark input, shared by `bench invoke` and its `--memory-sizes`.

use anyhow::Result;
use serde_json::Value;

/// The gradient function's benchmark input: an embedded store holding the MLP's initial
/// parameters, and a request for one batch of 64 (MNIST when present, else digits).
pub struct GradientFixture {
    server: peerless_runtime::store::embedded::EmbeddedHandle,
    request: peerless_core::function::GradientRequest,
    /// The model (its id names it in results).
    pub model: peerless_ml::Model,
    /// Its initial parameters, in the store as `params/0`.
    pub params: Vec<f32>,
    /// The request's batch, for timing the same step in-process.
    pub batch: peerless_ml::Batch,
    /// The dataset's name.
    pub dataset: String,
}

impl GradientFixture {
    /// Loads the data, starts the store and puts the parameters in it.
    pub async fn new() -> Result<GradientFixture> {
        use peerless_core::flat::{fingerprint, to_le_bytes};
        use peerless_core::function::{GradientRequest, OutputMode, StoreRef};
        use peerless_ml::{Arch, Backend, DatasetName, Model, ModelSpec};
        use peerless_runtime::store::{RedisStore, Store, embedded::EmbeddedServer};

        let data_dir = crate::common::data_dir(None);
        let (name, split) = match peerless_ml::data::load(DatasetName::Mnist, &data_dir) {
            Ok(split) => (DatasetName::Mnist, split),
            Err(_) => (DatasetName::Digits, peerless_ml::data::load(DatasetName::Digits, &data_dir)?),
        };
        let model =
            Model::new(ModelSpec::new(Arch::Mlp, split.train.shape, split.train.classes), Backend::Auto)?;
        let params = model.init(0);
        let indices: Vec<u32> = (0..64).collect();
        let batch = split.train.gather(&indices.iter().map(|&i| i as usize).collect::<Vec<_>>())?;
        let server = EmbeddedServer::spawn(([127, 0, 0, 1], 0).into(), Some("bench".into()))?;
        let store = RedisStore::connect(&server.url()).await?;
        store.put("params/0", &to_le_bytes(&params)).await?;
        let request = GradientRequest {
            node: "bench".into(),
            round: 0,
            batch: 0,
            attempt: 0,
            model: model.id(),
            backend: "auto".into(),
            params_key: "params/0".into(),
            params_digest: fingerprint(&params).to_string(),
            dataset: name.to_string(),
            data_dir: data_dir.display().to_string(),
            indices,
            output_key: "grad/bench".into(),
            output_mode: OutputMode::Accumulate,
            store: StoreRef { url: server.url() },
            // As the nodes ask: no digest of the gradient.
            return_digest: false,
            flip_labels: false,
            inner: None,
        };
        Ok(GradientFixture { server, request, model, params, batch, dataset: name.to_string() })
    }

    /// The request of batch `batch` (its slot in the store's sum), as JSON.
    pub fn payload(&self, batch: u32) -> Result<Value> {
        let req = peerless_core::function::GradientRequest { batch, ..self.request.clone() };
        Ok(serde_json::to_value(req)?)
    }

    /// Stops the store.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}
