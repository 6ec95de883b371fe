//! What every training node (peer, parameter server, worker) shares: its files, where its
//! gradients are computed (functions or in-process), one round's gradient work, its errors.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use peerless_core::attack::{Attack, Attacker};
use peerless_core::flat::{Digest, digest, to_le_bytes};
use peerless_core::function::{GradientRequest, GradientResponse, OutputMode, StoreRef};
use peerless_core::p2p::PeerIdx;
use peerless_core::rng::Rng;
use peerless_core::wire::{self, GradientMsg, Message};
use peerless_ml::{Model, Split};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod file;
mod row;
pub use file::{NodeFile, NodeSection, NodeSummary};
pub use row::NodeRow;

use crate::config::{Aggregation, Compute, RunConfig};
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
    /// Every gradient of the round was non-finite: the model diverged (e.g. under an attack
    /// the aggregation rule does not stop). Not retried: the same parameters give the same.
    #[error("the model diverged at round {round}: every gradient was non-finite ({reason})")]
    Diverged {
        /// Round.
        round: u64,
        /// The functions' error.
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
    /// Functions: from the last invocation's answer to the node holding the sum of the
    /// gradients (reading the in-store sum, or fetching and adding each), ms.
    pub(crate) gather_ms: Option<f64>,
}

/// Where gradients are computed.
#[allow(clippy::large_enum_variant)] // one per peer, behind an Arc
pub(crate) enum GradientBackend {
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

/// A node's outgoing gradients, through its attacker when the node is a Byzantine one.
pub(crate) struct Outgoing {
    attacker: Option<Attacker>,
    announced: bool,
}

impl Outgoing {
    /// Node `me` of a run seeded `seed`, attacking when `attack` is set.
    pub(crate) fn new(attack: Option<Attack>, seed: u64, me: PeerIdx) -> Outgoing {
        let attacker = attack.map(|a| Attacker::new(a, Rng::derive(seed, "attack", u64::from(me))));
        Outgoing { attacker, announced: false }
    }

    /// Whether this node's functions compute `round` on flipped labels.
    pub(crate) fn flips_labels(&self, round: u64) -> bool {
        self.attacker.as_ref().is_some_and(|a| a.attack().flips_labels(round))
    }

    /// The gradient this node keeps and the message it sends for `r`; the first attacked
    /// round is an `attacking` event.
    pub(crate) fn message(&mut self, r: LocalResult, files: &mut Files, me: PeerIdx) -> (Vec<f32>, Vec<u8>) {
        let msg =
            GradientMsg { round: r.round, digest: r.digest, samples: r.samples, loss: r.loss, grad: r.grad };
        let Some(attacker) = &mut self.attacker else {
            let m = Message::Gradient(msg);
            let bytes = wire::encode(&m);
            let Message::Gradient(msg) = m else { unreachable!("built above") };
            return (msg.grad, bytes);
        };
        let attack = attacker.attack();
        if attack.active(r.round) && !self.announced {
            self.announced = true;
            tracing::warn!(node = me, attack = %attack.kind, round = r.round, "this node attacks from now on");
            files.event(me, json!({ "event": "attacking", "attack": attack.kind.name(), "round": r.round }));
        }
        let t = attacker.tamper(msg);
        (t.keep.grad, t.send)
    }
}

/// Asks the kernel to SIGKILL this process when the thread that started it exits, so nodes a
/// launcher started never outlive it (Linux `PR_SET_PDEATHSIG`). SIGKILL, not SIGTERM: a
/// frozen (SIGSTOPped) node would never act on a SIGTERM.
pub fn die_with_parent() -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    Ok(())
}

/// What a launched node tells its launcher on stdout, one JSON object a line. The launcher
/// reads these to show progress, and to tell bad input (a node that fails before it is ready)
/// from a crash during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeLine {
    /// Set-up is done (data loaded, listening): from now on a failure is a crash.
    Ready {
        /// The node's index.
        ready: PeerIdx,
    },
    /// The node is exiting with this error.
    Failed {
        /// The node's index (`None` when it failed before reading its configuration).
        failed: Option<PeerIdx>,
        /// The error, as the node would print it.
        error: String,
    },
    /// A round done.
    Progress(Progress),
}

/// One round done by a node (`NodeLine::Progress`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The node's index.
    pub peer: PeerIdx,
    /// Rounds (PS: model versions) done.
    pub round: u64,
    /// Rounds (versions) in the run.
    pub total: u64,
    /// The round's training loss.
    pub loss: Option<f32>,
    /// Nodes in the round's view.
    pub view: usize,
    /// Test accuracy, when the round was evaluated.
    #[serde(default)]
    pub test_accuracy: Option<f32>,
}

impl NodeLine {
    /// Prints the line on stdout, where the launcher reads it.
    pub fn print(&self) {
        println!("{}", serde_json::to_string(self).expect("invariant: NodeLine serializes"));
    }

    /// Parses one stdout line; `None` for anything else a node printed.
    pub fn parse(line: &str) -> Option<NodeLine> {
        serde_json::from_str(line).ok()
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Files {
    pub(crate) fn open(dir: &Path) -> Result<Files, NodeError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mp = dir.join("metrics.csv");
        let fresh = !mp.exists();
        let f = OpenOptions::new().create(true).append(true).open(&mp).map_err(io_err(&mp))?;
        let mut metrics = BufWriter::new(f);
        if fresh {
            writeln!(metrics, "{}", NodeRow::header()).map_err(io_err(&mp))?;
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

    pub(crate) fn metrics(&mut self, row: &NodeRow) {
        if writeln!(self.metrics, "{}", row.to_csv()).and_then(|_| self.metrics.flush()).is_err() {
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
    pub(crate) backend: Arc<GradientBackend>,
    pub(crate) dataset: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) backend_name: String,
    pub(crate) aggregation: Aggregation,
    /// This round's gradients are computed on flipped labels (a label-flipping attacker).
    pub(crate) flip_labels: bool,
}

impl Job {
    /// Runs the round's work, starting it over (after 1 s, 2 s, …) when it failed as a whole,
    /// e.g. every invocation timed out on an overloaded machine. A failed attempt leaves
    /// nothing behind in the store, and invocations are idempotent per batch, so nothing is
    /// counted twice. The error of the last attempt is returned.
    pub(crate) async fn run_with_retries(self, attempts: u32) -> Result<LocalResult, NodeError> {
        let mut last = None;
        let mut job = self;
        for a in 0..attempts.max(1) {
            if a > 0 {
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(a))).await;
                // A retry fetches the gradients one by one: the same sum, bit for bit, but each
                // gradient is checked on its own, so a bad one is left out instead of
                // spoiling the sum again.
                job.aggregation = Aggregation::Fetch;
            }
            match job.clone().run().await {
                Ok(r) => return Ok(r),
                Err(e @ NodeError::Diverged { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(round = job.round, attempt = a, error = %e, "gradient work failed; starting it over");
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
        backend: Arc<GradientBackend>,
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
            aggregation: run.p2p.aggregation,
            flip_labels: false,
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
            GradientBackend::Local => {
                let (model, split, params, batches, flip) = (
                    self.model.clone(),
                    self.split.clone(),
                    self.params.clone(),
                    self.batches.clone(),
                    self.flip_labels,
                );
                let (grad, loss, samples) = tokio::task::spawn_blocking(move || {
                    let mut sum = vec![0f32; params.len()];
                    let mut g = vec![0f32; params.len()];
                    let (mut loss, mut samples) = (0f64, 0u64);
                    for b in &batches {
                        let idx: Vec<usize> = b.iter().map(|&i| i as usize).collect();
                        let mut batch = split.train.gather(&idx);
                        if flip {
                            batch.flip_labels(split.train.classes);
                        }
                        let l = model.loss_and_grad_into(&params, &batch, &mut g)?;
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
                Ok(LocalResult { round, digest: d, grad, loss, samples, gather_ms: None })
            }
            GradientBackend::Functions { runtime, store, store_url, .. } => {
                let node = format!("peer{}", self.me);
                let pkey = format!("{node}/params/{round}");
                let gkey = format!("{node}/grad/{round}");
                let fetch = self.aggregation == Aggregation::Fetch;
                // Fetch-then-aggregate: one key per batch, each holding one gradient.
                let out_key = |j: usize| if fetch { format!("{gkey}/{j}") } else { gkey.clone() };
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
                        output_key: out_key(j),
                        output_mode: if fetch { OutputMode::Put } else { OutputMode::Accumulate },
                        store: StoreRef { url: store_url.clone() },
                        // Only the sum is used; hashing each gradient would be waste.
                        return_digest: false,
                        flip_labels: self.flip_labels,
                    };
                    let payload = serde_json::to_value(&req).expect("invariant: requests serialize");
                    runtime.invoke("gradient", payload, InvokeCtx::new(node.clone(), round, j as u32))
                });
                let results = futures::future::join_all(calls).await;
                let (mut loss, mut ok) = (0f64, 0u32);
                let mut errors = Vec::new();
                let mut non_finite = 0;
                let mut delivered = Vec::new();
                for (j, r) in results.into_iter().enumerate() {
                    match r {
                        Ok(inv) if inv.is_ok() => {
                            let resp: Option<GradientResponse> =
                                inv.response.and_then(|v| serde_json::from_value(v).ok());
                            if let Some(resp) = resp {
                                loss += f64::from(resp.loss);
                                ok += 1;
                                delivered.push(j);
                            }
                        }
                        Ok(inv) => {
                            non_finite += usize::from(
                                inv.error.as_ref().is_some_and(|e| e.error_type.ends_with("NonFinite")),
                            );
                            errors.push(format!(
                                "{:?}: {:?}",
                                inv.outcome,
                                inv.error.map(|e| e.error_message)
                            ))
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                let t = std::time::Instant::now();
                let sum = if fetch {
                    self.fetch_sum(store, &out_key, &delivered).await.map_err(fail)?
                } else {
                    let acc =
                        store.read_accumulated(&gkey).await.map_err(|e| fail(format!("store read: {e}")))?;
                    let acc = acc.filter(|a| a.count > 0).map(|a| (a.sum, a.count));
                    if let Some((sum, count)) = &acc {
                        // The store adds whatever its clients send: a client holding the store's
                        // secret (another member) could write into this key. The sum is only
                        // taken when it is plausible; the job is then retried in fetch mode,
                        // which checks every gradient on its own (`run_with_retries`).
                        let problem = if *count > self.batches.len() as u64 {
                            Some(format!("{count} contributions for {} batches", self.batches.len()))
                        } else if sum.len() != self.params.len() {
                            Some(format!("{} values, the model has {}", sum.len(), self.params.len()))
                        } else {
                            peerless_core::flat::check_finite("the sum", sum).err().map(|e| e.to_string())
                        };
                        if let Some(p) = problem {
                            let _ = store.delete(&[pkey.as_str(), gkey.as_str()]).await;
                            return Err(fail(format!("in-store sum at {gkey} refused: {p}")));
                        }
                    }
                    acc
                };
                let gather_ms = t.elapsed().as_secs_f64() * 1e3;
                let mut keys: Vec<String> = vec![pkey, gkey.clone()];
                if fetch {
                    keys.extend((0..self.batches.len()).map(out_key));
                }
                let _ = store.delete(&keys.iter().map(String::as_str).collect::<Vec<_>>()).await;
                let Some((sum, count)) = sum else {
                    if non_finite > 0 && non_finite == errors.len() {
                        return Err(NodeError::Diverged { round, reason: errors.join("; ") });
                    }
                    return Err(fail(format!("every invocation failed: {}", errors.join("; "))));
                };
                if !errors.is_empty() {
                    tracing::warn!(
                        round,
                        failed = errors.len(),
                        "some gradient invocations failed after retries; using the rest"
                    );
                }
                let n = count as f32;
                let grad: Vec<f32> = sum.iter().map(|x| x / n).collect();
                let samples = count * self.batches.first().map_or(0, |b| b.len() as u64);
                Ok(LocalResult {
                    round,
                    digest: d,
                    grad,
                    loss: (loss / f64::from(ok.max(1))) as f32,
                    samples,
                    gather_ms: Some(gather_ms),
                })
            }
        }
    }

    /// Fetch-then-aggregate: reads the gradient of each delivered batch from the store and
    /// adds them up here; `None` when none was delivered.
    async fn fetch_sum(
        &self,
        store: &RedisStore,
        key: &impl Fn(usize) -> String,
        delivered: &[usize],
    ) -> Result<Option<(Vec<f32>, u64)>, String> {
        let n = self.params.len();
        let mut sum: Option<Vec<f32>> = None;
        let mut count = 0u64;
        for &j in delivered {
            let k = key(j);
            let bytes = store.get(&k).await.map_err(|e| format!("store get {k}: {e}"))?;
            let g = bytes
                .as_deref()
                .map(peerless_core::flat::from_le_bytes)
                .transpose()
                .map_err(|e| format!("{k}: {e}"))?
                .ok_or_else(|| format!("{k}: the function answered but its gradient is not in the store"))?;
            // A gradient that is not what the function reported (another store client
            // overwrote it) is left out, like a failed invocation; the rest still count.
            let problem = if g.len() != n {
                Some(format!("{} values, the model has {n}", g.len()))
            } else {
                peerless_core::flat::check_finite(&k, &g).err().map(|e| e.to_string())
            };
            if let Some(problem) = problem {
                tracing::warn!(round = self.round, key = %k, %problem, "gradient in the store refused");
                continue;
            }
            match &mut sum {
                Some(s) => peerless_core::flat::add_assign(s, &g),
                None => sum = Some(g),
            }
            count += 1;
        }
        Ok(sum.map(|s| (s, count)))
    }
}

impl GradientBackend {
    /// Starts the gradient backend of node `me` (`node` names it in the ledger and store keys).
    pub(crate) async fn start(
        run: &RunConfig,
        me: u32,
        command: FunctionCommand,
    ) -> Result<GradientBackend, NodeError> {
        let p2p = &run.p2p;
        Ok(match p2p.compute {
            Compute::Local => GradientBackend::Local,
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
                GradientBackend::Functions { runtime, store, store_url, embedded }
            }
        })
    }

    /// Invocation counters so far (zero for in-process compute).
    pub(crate) fn summary(&self) -> crate::function::metrics::Summary {
        match self {
            GradientBackend::Functions { runtime, .. } => runtime.summary(),
            GradientBackend::Local => Default::default(),
        }
    }

    /// Writes the function runtime's metrics (`function_metrics.json`: invocations, cold
    /// starts, retries, throttles, latency quantiles, cost) and `ledger.csv` into `dir`
    /// (functions only).
    pub(crate) fn write_ledger(&self, dir: &Path) -> Result<(), NodeError> {
        if let GradientBackend::Functions { runtime, .. } = self {
            runtime.write_run_metrics(dir).map_err(io_err(dir))?;
        }
        Ok(())
    }

    /// Stops the function instances and the embedded store.
    pub(crate) async fn shutdown(self) {
        if let GradientBackend::Functions { runtime, embedded, .. } = self {
            runtime.shutdown().await;
            if let Some(h) = embedded {
                h.shutdown().await;
            }
        }
    }
}
