//! What every training node (peer, parameter server, worker) shares: its files, where its
//! gradients are computed (functions or in-process), one round's gradient work, its errors.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use peerless_core::flat::{Digest, digest, to_le_bytes};
use peerless_core::function::{GradientRequest, GradientResponse, OutputMode, StoreRef};
use peerless_core::p2p::PeerIdx;
use peerless_ml::{Model, Split};
use serde_json::json;

use crate::config::{Compute, RunConfig};
use crate::function::{FunctionCommand, InvokeCtx, Invoker};
use crate::store::embedded::{EmbeddedHandle, EmbeddedServer};
use crate::store::{RedisStore, Store};

/// Why a node (peer, PS or worker) stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration or identity.
    #[error("{0}")]
    Config(String),
    /// Model or data.
    #[error(transparent)]
    Model(#[from] peerless_ml::ModelError),
    /// Dataset.
    #[error(transparent)]
    Data(#[from] peerless_ml::data::DataError),
    /// Files in the peer directory.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The network could not be set up.
    #[error("network: {0}")]
    Network(String),
    /// Gradient work failed beyond retries.
    #[error("computing the gradient of round {round}: {reason}")]
    Compute {
        /// Round.
        round: u64,
        /// Cause.
        reason: String,
    },
    /// Checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Optimizer.
    #[error(transparent)]
    Optim(#[from] peerless_core::optim::OptimError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io { path: path.to_owned(), source }
}

/// The result of one round's gradient work.
#[derive(Debug)]
pub(crate) struct LocalResult {
    pub(crate) round: u64,
    pub(crate) digest: Digest,
    pub(crate) grad: Vec<f32>,
    pub(crate) loss: f32,
    pub(crate) samples: u64,
}

/// Where gradients are computed.
#[allow(clippy::large_enum_variant)] // one per peer, behind an Arc
pub(crate) enum Backend {
    Functions {
        /// The invoker `[function] backend` chose: the local runtime or AWS Lambda.
        runtime: Arc<dyn Invoker>,
        store: RedisStore,
        store_url: String,
        embedded: Option<EmbeddedHandle>,
    },
    Local,
}

pub(crate) struct Files {
    dir: PathBuf,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
}

/// Asks the kernel to send this process SIGTERM when the thread that started it exits, so
/// nodes a launcher started never outlive it (Linux `PR_SET_PDEATHSIG`).
pub fn die_with_parent() -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
    Ok(())
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Files {
    pub(crate) fn open(dir: &Path, metrics_header: &str) -> Result<Files, NodeError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mp = dir.join("metrics.csv");
        let fresh = !mp.exists();
        let f = OpenOptions::new().create(true).append(true).open(&mp).map_err(io_err(&mp))?;
        let mut metrics = BufWriter::new(f);
        if fresh {
            writeln!(metrics, "{metrics_header}").map_err(io_err(&mp))?;
        }
        let ep = dir.join("events.jsonl");
        let f = OpenOptions::new().create(true).append(true).open(&ep).map_err(io_err(&ep))?;
        Ok(Files { dir: dir.to_owned(), metrics, events: BufWriter::new(f) })
    }

    pub(crate) fn event(&mut self, peer: PeerIdx, v: serde_json::Value) {
        let mut obj = json!({ "t_ms": unix_ms(), "peer": peer });
        if let (Some(o), serde_json::Value::Object(extra)) = (obj.as_object_mut(), v) {
            o.extend(extra);
        }
        if writeln!(self.events, "{obj}").and_then(|_| self.events.flush()).is_err() {
            tracing::warn!(dir = %self.dir.display(), "cannot write events.jsonl");
        }
    }

    pub(crate) fn metrics(&mut self, line: &str) {
        if writeln!(self.metrics, "{line}").and_then(|_| self.metrics.flush()).is_err() {
            tracing::warn!(dir = %self.dir.display(), "cannot write metrics.csv");
        }
    }
}

/// One round's gradient work.
#[derive(Clone)]
pub(crate) struct Job {
    pub(crate) me: PeerIdx,
    pub(crate) round: u64,
    pub(crate) params: Arc<Vec<f32>>,
    pub(crate) batches: Vec<Vec<u32>>,
    pub(crate) model: Arc<Model>,
    pub(crate) split: Arc<Split>,
    pub(crate) backend: Arc<Backend>,
    pub(crate) dataset: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) backend_name: String,
}

impl Job {
    /// Runs the round's work, starting it over (after 1 s, 2 s, …) when it failed as a whole,
    /// e.g. every invocation timed out on an overloaded machine. A failed attempt leaves
    /// nothing behind in the store, and invocations are idempotent per batch, so nothing is
    /// counted twice. The error of the last attempt is returned.
    pub(crate) async fn run_with_retries(self, attempts: u32) -> Result<LocalResult, NodeError> {
        let mut last = None;
        for a in 0..attempts.max(1) {
            if a > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(a))).await;
            }
            match self.clone().run().await {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(round = self.round, attempt = a, error = %e, "gradient work failed; starting it over");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The work of node `me` for any round: round, parameters and batches are filled in per
    /// round with struct-update syntax.
    pub(crate) fn template(
        run: &RunConfig,
        me: PeerIdx,
        model: Arc<Model>,
        split: Arc<Split>,
        backend: Arc<Backend>,
        data_dir: PathBuf,
    ) -> Job {
        Job {
            me,
            round: 0,
            params: Arc::new(Vec::new()),
            batches: Vec::new(),
            model,
            split,
            backend,
            dataset: run.data.dataset.to_string(),
            data_dir,
            backend_name: run.model.backend.to_string(),
        }
    }

    /// Runs the work on the tokio runtime (with retries) and sends the result to `tx`.
    pub(crate) fn spawn(self, tx: tokio::sync::mpsc::Sender<Result<LocalResult, NodeError>>) {
        tokio::spawn(async move {
            let _ = tx.send(self.run_with_retries(4).await).await;
        });
    }

    pub(crate) async fn run(self) -> Result<LocalResult, NodeError> {
        let round = self.round;
        let fail = |reason: String| NodeError::Compute { round, reason };
        let d = digest(&self.params);
        match &*self.backend {
            Backend::Local => {
                let (model, split, params, batches) =
                    (self.model.clone(), self.split.clone(), self.params.clone(), self.batches.clone());
                let (grad, loss, samples) = tokio::task::spawn_blocking(move || {
                    let mut sum = vec![0f32; params.len()];
                    let mut g = vec![0f32; params.len()];
                    let (mut loss, mut samples) = (0f64, 0u64);
                    for b in &batches {
                        let idx: Vec<usize> = b.iter().map(|&i| i as usize).collect();
                        let l = model.loss_and_grad_into(&params, &split.train.gather(&idx), &mut g)?;
                        peerless_core::flat::add_assign(&mut sum, &g);
                        loss += f64::from(l);
                        samples += idx.len() as u64;
                    }
                    let k = batches.len().max(1) as f32;
                    sum.iter_mut().for_each(|x| *x /= k);
                    Ok::<_, peerless_ml::ModelError>((sum, (loss / f64::from(k)) as f32, samples))
                })
                .await
                .map_err(|e| fail(e.to_string()))??;
                Ok(LocalResult { round, digest: d, grad, loss, samples })
            }
            Backend::Functions { runtime, store, store_url, .. } => {
                let node = format!("peer{}", self.me);
                let pkey = format!("{node}/params/{round}");
                let gkey = format!("{node}/grad/{round}");
                store
                    .put(&pkey, &to_le_bytes(&self.params))
                    .await
                    .map_err(|e| fail(format!("store put: {e}")))?;
                let calls = self.batches.iter().enumerate().map(|(j, b)| {
                    let req = GradientRequest {
                        node: node.clone(),
                        round,
                        batch: j as u32,
                        attempt: 0,
                        model: self.model.id(),
                        backend: self.backend_name.clone(),
                        params_key: pkey.clone(),
                        params_digest: d.to_string(),
                        dataset: self.dataset.clone(),
                        data_dir: self.data_dir.display().to_string(),
                        indices: b.clone(),
                        output_key: gkey.clone(),
                        output_mode: OutputMode::Accumulate,
                        store: StoreRef { url: store_url.clone() },
                        // Only the in-store sum is read; hashing each gradient would be waste.
                        return_digest: false,
                    };
                    let payload = serde_json::to_value(&req).expect("invariant: requests serialize");
                    runtime.invoke("gradient", payload, InvokeCtx::new(node.clone(), round, j as u32))
                });
                let results = futures::future::join_all(calls).await;
                let (mut loss, mut ok) = (0f64, 0u32);
                let mut errors = Vec::new();
                for r in results {
                    match r {
                        Ok(inv) if inv.is_ok() => {
                            let resp: Option<GradientResponse> =
                                inv.response.and_then(|v| serde_json::from_value(v).ok());
                            if let Some(resp) = resp {
                                loss += f64::from(resp.loss);
                                ok += 1;
                            }
                        }
                        Ok(inv) => errors.push(format!(
                            "{:?}: {:?}",
                            inv.outcome,
                            inv.error.map(|e| e.error_message)
                        )),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                let acc =
                    store.read_accumulated(&gkey).await.map_err(|e| fail(format!("store read: {e}")))?;
                let _ = store.delete(&[&pkey, &gkey]).await;
                let Some(acc) = acc.filter(|a| a.count > 0) else {
                    return Err(fail(format!("every invocation failed: {}", errors.join("; "))));
                };
                if !errors.is_empty() {
                    tracing::warn!(
                        round,
                        failed = errors.len(),
                        "some gradient invocations failed after retries; using the rest"
                    );
                }
                let n = acc.count as f32;
                let grad: Vec<f32> = acc.sum.iter().map(|x| x / n).collect();
                let samples = acc.count * self.batches.first().map_or(0, |b| b.len() as u64);
                Ok(LocalResult {
                    round,
                    digest: d,
                    grad,
                    loss: (loss / f64::from(ok.max(1))) as f32,
                    samples,
                })
            }
        }
    }
}

impl Backend {
    /// Starts the gradient backend of node `me` (`node` names it in the ledger and store keys).
    pub(crate) async fn start(
        run: &RunConfig,
        me: u32,
        command: FunctionCommand,
    ) -> Result<Backend, NodeError> {
        let p2p = &run.p2p;
        Ok(match p2p.compute {
            Compute::Local => Backend::Local,
            Compute::Functions => {
                let runtime =
                    crate::function::start(run.function.clone(), command, run.seed ^ (u64::from(me) << 40))
                        .map_err(|e| NodeError::Config(e.to_string()))?;
                let (embedded, store_url) = if p2p.store == "embedded" {
                    let h = EmbeddedServer::spawn(([127, 0, 0, 1], 0).into(), Some(p2p.secret.clone()))
                        .map_err(|e| NodeError::Network(format!("embedded store: {e}")))?;
                    let url = h.url();
                    (Some(h), url)
                } else {
                    (None, p2p.store.clone())
                };
                let store = RedisStore::connect(&store_url)
                    .await
                    .map_err(|e| NodeError::Network(format!("store {store_url}: {e}")))?;
                Backend::Functions { runtime, store, store_url, embedded }
            }
        })
    }

    /// Invocation counters so far (zero for in-process compute).
    pub(crate) fn summary(&self) -> crate::function::metrics::Summary {
        match self {
            Backend::Functions { runtime, .. } => runtime.summary(),
            Backend::Local => Default::default(),
        }
    }

    /// Writes the function runtime's metrics (`function_metrics.json`: invocations, cold
    /// starts, retries, throttles, latency quantiles, cost) and `ledger.csv` into `dir`
    /// (functions only).
    pub(crate) fn write_ledger(&self, dir: &Path) -> Result<(), NodeError> {
        if let Backend::Functions { runtime, .. } = self {
            runtime.write_run_metrics(dir).map_err(io_err(dir))?;
        }
        Ok(())
    }

    /// Stops the function instances and the embedded store.
    pub(crate) async fn shutdown(self) {
        if let Backend::Functions { runtime, embedded, .. } = self {
            runtime.shutdown().await;
            if let Some(h) = embedded {
                h.shutdown().await;
            }
        }
    }
}
