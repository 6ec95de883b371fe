//! The gradient function end to end: real `peerless function` processes reading parameters
//! from and aggregating gradients into the embedded store, with retries never double-counting.

use std::time::Duration;

use peerless_core::flat::{fingerprint, to_le_bytes};
use peerless_core::function::{GradientRequest, Outcome, OutputMode, StoreRef};
use peerless_ml::{Arch, Backend, Model, ModelSpec};
use peerless_runtime::function::{Config, FaultConfig, FunctionCommand, InvokeCtx, Invoker, LocalRuntime};
use peerless_runtime::store::embedded::EmbeddedServer;
use peerless_runtime::store::{RedisStore, Store};

fn request(url: &str, params: &[f32], batch: u32, indices: Vec<u32>) -> GradientRequest {
    GradientRequest {
        node: "p0".into(),
        round: 0,
        batch,
        attempt: 0,
        model: "mlp-64-256-128-10".into(),
        backend: "auto".into(),
        params_key: "params/0".into(),
        params_digest: fingerprint(params).to_string(),
        dataset: "digits".into(),
        data_dir: "/nonexistent".into(),
        indices,
        output_key: "grad/p0/0".into(),
        output_mode: OutputMode::Accumulate,
        store: StoreRef { url: url.into() },
        return_digest: true,
        flip_labels: false,
        inner: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_functions_aggregate_in_store_exactly_once_even_when_instances_crash() {
    let server = EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some("s3cret".into())).unwrap();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let split =
        peerless_ml::data::load(peerless_ml::DatasetName::Digits, std::path::Path::new("/x")).unwrap();
    let model = Model::new(ModelSpec::new(Arch::Mlp, split.train.shape, 10), Backend::Auto).unwrap();
    let params = model.init(1);
    store.put("params/0", &to_le_bytes(&params)).await.unwrap();

    // A quarter of the attempts are killed mid-invocation; retries must still count each
    // batch exactly once.
    let faults = FaultConfig { crash_rate: 0.25, ..FaultConfig::default() };
    let cfg = Config::for_test().with_memory_mb(1024).with_max_retries(6).with_faults(faults);
    let rt = LocalRuntime::start(cfg, FunctionCommand::peerless(env!("CARGO_BIN_EXE_peerless")), 7).unwrap();
    let k = 4u32;
    let batches: Vec<Vec<u32>> = (0..k).map(|b| (b * 32..(b + 1) * 32).collect()).collect();
    let mut calls = Vec::new();
    for (b, idx) in batches.iter().enumerate() {
        let req = request(&server.url(), &params, b as u32, idx.clone());
        let payload = serde_json::to_value(&req).unwrap();
        let rt = rt.clone();
        calls.push(tokio::spawn(async move {
            rt.invoke("gradient", payload, InvokeCtx::new("p0", 0, b as u32)).await
        }));
    }
    let mut losses = Vec::new();
    for c in calls {
        let inv = tokio::time::timeout(Duration::from_secs(120), c).await.unwrap().unwrap().unwrap();
        assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
        losses.push(inv.response.unwrap()["loss"].as_f64().unwrap());
    }
    let acc = store.read_accumulated("grad/p0/0").await.unwrap().unwrap();
    assert_eq!(acc.count, u64::from(k), "each batch counted exactly once");

    // The in-store sum equals the sum of gradients computed directly (up to float addition order).
    let mut expected = vec![0f32; params.len()];
    for idx in &batches {
        let ix: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        let (_, g) = model.loss_and_grad(&params, &split.train.gather(&ix).unwrap()).unwrap();
        expected.iter_mut().zip(&g).for_each(|(e, v)| *e += v);
    }
    let max_err = acc.sum.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_err < 1e-5, "in-store sum differs from direct sum by {max_err}");

    // A late retry of batch 0 (as after a lost response) is not applied again.
    let mut again = request(&server.url(), &params, 0, batches[0].clone());
    again.attempt = 1;
    let inv = rt
        .invoke("gradient", serde_json::to_value(&again).unwrap(), InvokeCtx::new("p0", 0, 0))
        .await
        .unwrap();
    assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
    assert_eq!(inv.response.unwrap()["applied"], false);
    assert_eq!(store.read_accumulated("grad/p0/0").await.unwrap().unwrap().count, u64::from(k));

    let ledger = rt.ledger();
    assert!(ledger.len() as u32 > k, "the injected crashes left extra attempts in the ledger");
    assert!(ledger.iter().any(|r| r.outcome == Outcome::Crashed));
    rt.shutdown().await;
    server.shutdown().await;
}
