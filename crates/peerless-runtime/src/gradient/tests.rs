//! Tests of the gradient function against an in-memory store and the embedded store.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use peerless_core::flat::{digest, fingerprint, to_le_bytes};
use peerless_core::function::{GradientRequest, GradientResponse, OutputMode, StoreRef};
use peerless_ml::data::load;
use peerless_ml::{Arch, Backend, Dataset, DatasetName, Model, ModelSpec};

use super::*;
use crate::store::{Accumulated, RedisStore, Store, StoreError};

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
        fingerprint(params).to_string()
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
    async fn accumulate(&self, key: &str, token: &str, _slot: u32, grad: &[f32]) -> Result<bool, StoreError> {
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
        Ok(self.lock().sums.get(key).map(|(sum, count, _)| Accumulated { sum: sum.clone(), count: *count }))
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
        return_digest: true,
        flip_labels: false,
        inner: None,
    }
}

fn batch_indices(n: u32, offset: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 29 + offset) % 1442).collect()
}

/// The gradient computed directly, as the reference.
fn direct(model: &Model, params: &[f32], data: &Dataset, indices: &[u32]) -> (f32, Vec<f32>) {
    let idx: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
    model.loss_and_grad(params, &data.gather(&idx).unwrap()).unwrap()
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
    assert_eq!(resp.digest, Some(digest(&grad).to_string()));
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
    assert_eq!(resp2.digest, Some(digest(&grad2).to_string()));
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
async fn the_digest_is_returned_unless_the_request_declines_it() {
    let (data, store) = (digits(), MemStore::default());
    let model = small_mlp(&data);
    let params = model.init(5);
    let d = store.put_params("params/7", &params);
    let (mut f, _) = function(&store);
    let req = request(&model, "params/7", &d, batch_indices(32, 2));
    let (_, grad) = direct(&model, &params, &data, &req.indices);

    // Without the field (older callers), the digest is there.
    let mut json = serde_json::to_value(&req).unwrap();
    json.as_object_mut().unwrap().remove("return_digest");
    let resp = f.handle_json(json).await.unwrap();
    assert_eq!(resp["digest"], serde_json::json!(digest(&grad).to_string()));

    // Declined: no digest in the answer, the same gradient delivered, the buffer still reused.
    let no = GradientRequest { batch: 9, return_digest: false, ..req.clone() };
    let resp = f.handle_json(serde_json::to_value(&no).unwrap()).await.unwrap();
    assert!(resp.get("digest").is_none(), "{resp}");
    let resp: GradientResponse = serde_json::from_value(resp).unwrap();
    assert!(resp.applied && resp.digest.is_none());
    let acc = store.read_accumulated(&req.output_key).await.unwrap().unwrap();
    let twice: Vec<f32> = grad.iter().map(|g| g + g).collect();
    assert_eq!((acc.count, bits(&acc.sum)), (2, bits(&twice)));
    assert!(f.scratch.is_some());
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
    assert_eq!(Some(digest(&acc.sum).to_string()), first.digest);
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
        assert_eq!(resp.digest, Some(digest(&grad).to_string()));
        assert_eq!(resp.loss.to_bits(), loss.to_bits());
    };
    let put = |round: u64| GradientRequest {
        round,
        output_mode: OutputMode::Put,
        output_key: format!("grad/{round}"),
        ..request(&model, "", "", idx.clone())
    };

    let r = f.handle(GradientRequest { params_key: "params/0".into(), params_digest: d0.clone(), ..put(0) });
    check(&r.await.unwrap(), &p0);
    assert_eq!(store.gets("params/0"), 1);

    // New key, new digest: fetched.
    let d1 = store.put_params("params/1", &p1);
    let r = f.handle(GradientRequest { params_key: "params/1".into(), params_digest: d1.clone(), ..put(1) });
    check(&r.await.unwrap(), &p1);
    assert_eq!(store.gets("params/1"), 1);

    // Same key, new contents and digest (a key reused for the next version): fetched again.
    let d2 = store.put_params("params/1", &p2);
    let r = f.handle(GradientRequest { params_key: "params/1".into(), params_digest: d2.clone(), ..put(2) });
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
    let other = fingerprint(&model.init(2)).to_string();
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
    assert!(f.handle(GradientRequest { params_digest: good.clone(), ..req.clone() }).await.unwrap().applied);
    assert!(matches!(f.handle(req).await, Err(GradientError::DigestMismatch { .. })));
}

#[tokio::test]
async fn an_out_of_range_index_is_named_before_any_store_access() {
    let (data, store) = (digits(), MemStore::default());
    let model = small_mlp(&data);
    let d = store.put_params("params/7", &model.init(1));
    let (mut f, connects) = function(&store);
    let err = f.handle(request(&model, "params/7", &d, vec![0, 5, 1441, 1442, 99_999])).await.unwrap_err();
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
async fn a_label_flipping_request_computes_on_labels_classes_minus_one_minus_y() {
    let (data, store) = (digits(), MemStore::default());
    let model = small_mlp(&data);
    let params = model.init(4);
    let d = store.put_params("params/7", &params);
    let (mut f, _) = function(&store);
    let req = GradientRequest { flip_labels: true, ..request(&model, "params/7", &d, batch_indices(32, 2)) };
    let resp = f.handle(req.clone()).await.unwrap();
    let idx: Vec<usize> = req.indices.iter().map(|&i| i as usize).collect();
    let mut flipped = data.gather(&idx).unwrap();
    let honest = flipped.y.clone();
    flipped.flip_labels(data.classes);
    assert!(flipped.y.iter().zip(&honest).all(|(f, y)| usize::from(*f) == 9 - usize::from(*y)));
    let (loss, grad) = model.loss_and_grad(&params, &flipped).unwrap();
    assert_eq!(resp.loss.to_bits(), loss.to_bits());
    assert_eq!(resp.digest, Some(digest(&grad).to_string()));
    let (honest_loss, _) = direct(&model, &params, &data, &req.indices);
    assert_ne!(honest_loss.to_bits(), loss.to_bits());
    // The flag travels only when set: honest requests keep their old JSON.
    let json = serde_json::to_value(GradientRequest { flip_labels: false, ..req }).unwrap();
    assert!(json.get("flip_labels").is_none(), "{json}");
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
    assert_eq!(resp.digest, Some(digest(&grad).to_string()));
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
    assert_eq!(resp.digest, Some(digest(&grad).to_string()));
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
            if n == 0 { Err(StoreError::Connect { url, reason: "connection refused".into() }) } else { Ok(s) }
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
    let d = fingerprint(&params).to_string();
    let mut f = GradientFunction::new();
    let req = GradientRequest {
        store: StoreRef { url: server.url() },
        ..request(&model, "params/7", &d, batch_indices(64, 9))
    };
    let (loss, grad) = direct(&model, &params, &data, &req.indices);
    let first = f.handle(req.clone()).await.unwrap();
    assert!(first.applied && first.cold);
    assert_eq!(
        (first.digest.clone(), first.loss.to_bits()),
        (Some(digest(&grad).to_string()), loss.to_bits())
    );
    let retry = f.handle(GradientRequest { attempt: 1, ..req.clone() }).await.unwrap();
    assert!(!retry.applied && !retry.cold);
    let acc = node.read_accumulated(&req.output_key).await.unwrap().unwrap();
    assert_eq!((acc.count, bits(&acc.sum)), (1, bits(&grad)));

    let put = GradientRequest { output_mode: OutputMode::Put, output_key: "grad/put".into(), ..req.clone() };
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
/// run with `cargo test --workspace -- --ignored overhead_of_the_function_path --nocapture`.
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
    let median = |v: Vec<f64>| peerless_core::stats::median(&v).expect("measured");
    let (mut warm, mut compute, mut direct_ms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=N {
        let r = req(i);
        let idx: Vec<usize> = r.indices.iter().map(|&k| k as usize).collect();
        let t = Instant::now();
        let resp = f.handle(r).await.unwrap();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
        compute.push(resp.compute_ms);
        let t = Instant::now();
        let batch = data.gather(&idx).unwrap();
        let (_, g) = model.loss_and_grad(&params, &batch).unwrap();
        direct_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(Some(digest(&g).to_string()), resp.digest);
    }
    let g = vec![0.25f32; model.num_params()];
    let t = Instant::now();
    for _ in 0..20 {
        std::hint::black_box(digest(std::hint::black_box(&g)));
    }
    eprintln!("digest of {} f32: {:.3} ms", g.len(), t.elapsed().as_secs_f64() * 1e3 / 20.0);
    let t = Instant::now();
    for _ in 0..20 {
        store.accumulate("x", &format!("{}", t.elapsed().as_nanos()), 0, &g).await.unwrap();
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
    RedisStore::connect(&server.url()).await.unwrap().put("params/0", &to_le_bytes(&params)).await.unwrap();
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

/// Found by `fuzz/fuzz_targets/gradient_request.rs` after four minutes (issue #20): a
/// `compute_ms` written with a long decimal expansion decoded to a neighbour of its value,
/// whose shortest encoding then decoded to another. JSON floats now decode correctly rounded
/// (serde_json's `float_roundtrip`), so decode → encode → decode is stable.
#[test]
fn a_response_s_floats_decode_correctly_rounded_and_round_trip() {
    let response = |ms: &str| {
        format!(
            r#"{{"key":"k","len":1,"loss":2.25,"samples":1,"compute_ms":{ms},"applied":true,"cold":false}}"#
        )
    };
    let found = "1.1111111111110000445766447492118";
    let mut cases = vec![found.to_owned()];
    for zeros in 1..200 {
        for tail in ["445766447492118", "5", "49999999999999999"] {
            cases.push(format!("1.111111111111{}{tail}", "0".repeat(zeros)));
        }
    }
    for ms in cases {
        let r: GradientResponse = serde_json::from_str(&response(&ms)).unwrap();
        assert_eq!(r.compute_ms, ms.parse::<f64>().unwrap(), "{ms} decodes to its nearest f64");
        let back: GradientResponse = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r, "{ms}");
    }
}
