//! A node's gradient work: where gradients are computed (functions through the store, or
//! in-process), one round's [`Job`] with its retries, and the outgoing gradient message (through
//! the attacker of a Byzantine node).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt as _;
use peerless_core::attack::{Attack, Attacker};
use peerless_core::compress::ErrorFeedback;
use peerless_core::flat::{Digest, fingerprint};
use peerless_core::function::{GradientRequest, GradientResponse, InnerSteps, OutputMode, StoreRef};
use peerless_core::protocol::PeerIdx;
use peerless_core::rng::Rng;
use peerless_core::wire::{self, CompressedMsg, GradientMsg, Message};
use peerless_ml::{Model, Split};
use tokio::sync::mpsc;

use super::driver::Node;
use super::{Files, NodeError, NodeEvent, io_err};
use crate::config::{Aggregation, Compute, RunConfig, SyncMode};
use crate::function::{FunctionCommand, InvokeCtx, Invoker};
use crate::gradient::inner::{InnerError, pseudo_gradient};
use crate::store::acl::node_key_prefix;
use crate::store::embedded::{EmbeddedHandle, EmbeddedServer};
use crate::store::{RedisStore, Store};

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
    /// In this process, on its compute thread.
    Local(ComputeThread),
}

/// The thread a node computes its own gradients on (`cluster.compute = "local"`).
///
/// One long-lived thread fed through a channel: a round's work goes straight from the event
/// loop to it and its result straight back, without a task of the async runtime between them
/// (each hand-over between threads is a wake-up, and at every-step sync a round has only a few
/// milliseconds). The thread ends once the backend, and with it the sender, is dropped.
pub(crate) struct ComputeThread {
    tasks: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl ComputeThread {
    fn start() -> Result<ComputeThread, NodeError> {
        let (tasks, queue) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || queue.into_iter().for_each(|task| task()))
            .map_err(|e| NodeError::Compute {
                round: 0,
                reason: format!("starting the compute thread: {e}"),
            })?;
        Ok(ComputeThread { tasks })
    }

    /// Computes `job` on the thread after the jobs before it and hands the result to `reply`.
    /// The job, and with it its share of the parameters, is dropped first, so that the update
    /// that follows writes them in place.
    fn compute(&self, job: Job, reply: impl FnOnce(super::driver::Computed) + Send + 'static) {
        // The thread lives as long as this sender: sending cannot fail.
        let _ = self.tasks.send(Box::new(move || {
            let result = job.compute_here();
            drop(job);
            reply(result);
        }));
    }
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

    /// The gradient this node keeps and the message it sends for `r`, compressed through
    /// `feedback` when the run compresses (the node then keeps the dense form receivers see);
    /// the first attacked round is an `attacking` event (an attacker sends dense).
    pub(crate) fn message(
        &mut self,
        r: LocalResult,
        files: &mut Files,
        me: PeerIdx,
        feedback: &mut ErrorFeedback,
    ) -> (Vec<f32>, Vec<u8>) {
        let msg =
            GradientMsg { round: r.round, digest: r.digest, samples: r.samples, loss: r.loss, grad: r.grad };
        let Some(attacker) = &mut self.attacker else {
            if let Some((grad, dense)) = feedback.step(&msg.grad) {
                let GradientMsg { round, digest, samples, loss, .. } = msg;
                let bytes =
                    wire::encode(&Message::Compressed(CompressedMsg { round, digest, samples, loss, grad }));
                return (dense, bytes);
            }
            let m = Message::Gradient(msg);
            let bytes = wire::encode(&m);
            let Message::Gradient(msg) = m else { unreachable!("built above") };
            return (msg.grad, bytes);
        };
        let attack = attacker.attack();
        if attack.active(r.round) && !self.announced {
            self.announced = true;
            tracing::warn!(node = me, attack = %attack.kind, round = r.round, "this node attacks from now on");
            files.event(me, &NodeEvent::Attacking { attack: attack.kind.name().into(), round: r.round });
        }
        let t = attacker.tamper(msg);
        (t.keep.grad, t.send)
    }
}

/// One round's gradient work.
#[derive(Clone)]
pub(crate) struct Job {
    pub(crate) me: PeerIdx,
    pub(crate) round: u64,
    pub(crate) params: Arc<Vec<f32>>,
    /// `fingerprint(params)` when the caller already has it (a replica takes it as it steps).
    pub(crate) fingerprint: Option<Digest>,
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
    /// Invocations in flight at once (`cluster.functions_per_node`): the batches a node takes
    /// over from peers that left wait for a warm instance instead of cold-starting new ones.
    pub(crate) concurrency: usize,
    /// DiLoCo: each batch is this many local steps' mini-batches, and the work returns the
    /// mean parameter delta instead of the mean gradient.
    pub(crate) inner: Option<InnerSteps>,
    /// The warm-up's work (its own keys; its result is dropped), not a round's.
    warm_up: bool,
    /// Turns true once the warm-up is over: a round's work waits for it, since its
    /// invocations would otherwise cold-start instances of their own beside the warming ones.
    warmed: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Job {
    /// Runs the round's work, starting it over (after 1 s, 2 s, …) when it failed as a whole,
    /// e.g. every invocation timed out on an overloaded machine. A failed attempt leaves
    /// nothing behind in the store, and invocations are idempotent per batch, so nothing is
    /// counted twice. The error of the last attempt is returned.
    pub(crate) async fn run_with_retries(self, attempts: u32) -> Result<LocalResult, NodeError> {
        if let Some(mut warmed) = self.warmed.clone() {
            let _ = warmed.wait_for(|done| *done).await;
        }
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
            fingerprint: None,
            batches: Vec::new(),
            model,
            split,
            backend,
            dataset: run.data.dataset.to_string(),
            data_dir,
            backend_name: run.model.backend.to_string(),
            aggregation: run.cluster.aggregation,
            flip_labels: false,
            concurrency: run.cluster.functions_per_node.max(1) as usize,
            inner: (run.p2p.sync == SyncMode::Diloco)
                .then(|| InnerSteps { steps: run.p2p.inner_steps, optimizer: run.optimizer.clone() }),
            warm_up: false,
            warmed: None,
        }
    }

    /// Runs the work and sends the result to `tx`: in-process work on the compute thread
    /// (once: it is deterministic, a second attempt would fail alike), functions' on the
    /// tokio runtime with retries.
    pub(crate) fn spawn(self, tx: mpsc::Sender<super::driver::Computed>) {
        let backend = self.backend.clone();
        if let GradientBackend::Local(thread) = &*backend {
            thread.compute(self, move |result| {
                let _ = tx.blocking_send(result);
            });
            return;
        }
        tokio::spawn(async move {
            let _ = tx.send(self.run_with_retries(4).await).await;
        });
    }

    pub(crate) async fn run(self) -> Result<LocalResult, NodeError> {
        match &*self.backend {
            GradientBackend::Local(thread) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                thread.compute(self.clone(), move |result| {
                    let _ = tx.send(result);
                });
                rx.await.map_err(|e| self.failure()(e.to_string()))?
            }
            // The node reaches its own embedded store in-process; its functions, over RESP.
            GradientBackend::Functions { runtime, embedded: Some(own), store_url, .. } => {
                self.run_on_functions(runtime.as_ref(), own, store_url).await
            }
            GradientBackend::Functions { runtime, store, store_url, embedded: None } => {
                self.run_on_functions(runtime.as_ref(), store, store_url).await
            }
        }
    }

    /// The fingerprint of the parameters the work computes at.
    fn params_fingerprint(&self) -> Digest {
        self.fingerprint.unwrap_or_else(|| fingerprint(&self.params))
    }

    fn failure(&self) -> impl Fn(String) -> NodeError + use<> {
        let round = self.round;
        move |reason| NodeError::Compute { round, reason }
    }

    /// Computes the mean gradient over the batches, on the calling thread (the compute thread).
    fn compute_here(&self) -> Result<LocalResult, NodeError> {
        let (model, train, params, inner) = (&self.model, &self.split.train, &self.params, &self.inner);
        let fail = self.failure();
        let mut sum = vec![0f32; params.len()];
        // One batch (a node's usual share) is computed straight into the sum.
        let one = self.batches.len() == 1;
        let mut g = if one { Vec::new() } else { vec![0f32; params.len()] };
        let (mut loss, mut samples) = (0f64, 0u64);
        for b in &self.batches {
            let idx: Vec<usize> = b.iter().map(|&i| i as usize).collect();
            let into = if one { &mut sum } else { &mut g };
            let l = match inner {
                Some(inner) => pseudo_gradient(model, train, params, &idx, inner, self.flip_labels, into),
                None => train
                    .gather(&idx)
                    .map_err(|e| InnerError::from(peerless_ml::ModelError::from(e)))
                    .and_then(|mut batch| {
                        if self.flip_labels {
                            batch.flip_labels(train.classes);
                        }
                        Ok(model.loss_and_grad_into(params, &batch, into)?)
                    }),
            }
            .map_err(|e| fail(e.to_string()))?;
            if !one {
                peerless_core::flat::add_assign(&mut sum, &g);
            }
            loss += f64::from(l);
            samples += idx.len() as u64;
        }
        if one {
            // Bit for bit what adding it to zeros gave: 0 + (-0) is +0.
            sum.iter_mut().for_each(|x| *x += 0.0);
        } else {
            let k = self.batches.len().max(1) as f32;
            sum.iter_mut().for_each(|x| *x /= k);
        }
        let k = self.batches.len().max(1) as f64;
        Ok(LocalResult {
            round: self.round,
            digest: self.params_fingerprint(),
            grad: sum,
            loss: (loss / k) as f32,
            samples,
            gather_ms: None,
        })
    }

    /// One invocation a batch through `runtime`, the gradients summed in the store (or
    /// fetched and summed here), their mean returned.
    async fn run_on_functions(
        &self,
        runtime: &dyn Invoker,
        store: &impl Store,
        store_url: &str,
    ) -> Result<LocalResult, NodeError> {
        let fail = self.failure();
        let keys = Keys::of(self);
        // The embedded store keeps the parameters themselves as the value, not an encoding;
        // the key is deleted below, before the replica steps again.
        let d = self.params_fingerprint();
        store
            .put_floats(&keys.params, Arc::clone(&self.params))
            .await
            .map_err(|e| fail(format!("store put: {e}")))?;
        let calls = (0..self.batches.len()).map(|j| {
            let payload = serde_json::to_value(self.request(j, &keys, d, store_url))
                .expect("invariant: requests serialize");
            runtime.invoke("gradient", payload, InvokeCtx::new(keys.node.clone(), self.round, j as u32))
        });
        let answers = Answers::collect(
            futures::stream::iter(calls).buffered(self.concurrency).collect::<Vec<_>>().await,
        );
        let t = std::time::Instant::now();
        let sum = self.gather(store, &keys, &answers.delivered).await;
        let gather_ms = t.elapsed().as_secs_f64() * 1e3;
        let _ =
            store.delete(&keys.all(self.batches.len()).iter().map(String::as_str).collect::<Vec<_>>()).await;
        let Some((sum, count)) = sum? else {
            return Err(answers.failure(self.round));
        };
        if !answers.errors.is_empty() {
            tracing::warn!(
                round = self.round,
                failed = answers.errors.len(),
                "some gradient invocations failed after retries; using the rest"
            );
        }
        let mut grad = sum;
        // A sum of one is its own mean (x / 1 is x, bit for bit): no pass over it.
        if count > 1 {
            let n = count as f32;
            grad.iter_mut().for_each(|x| *x /= n);
        }
        Ok(LocalResult {
            round: self.round,
            digest: d,
            grad,
            loss: (answers.loss / f64::from(answers.ok.max(1))) as f32,
            samples: count * self.batches.first().map_or(0, |b| b.len() as u64),
            gather_ms: Some(gather_ms),
        })
    }

    /// The request of batch `j`.
    fn request(&self, j: usize, keys: &Keys, d: Digest, store_url: &str) -> GradientRequest {
        GradientRequest {
            node: keys.node.clone(),
            round: self.round,
            batch: j as u32,
            attempt: 0,
            model: self.model.id(),
            backend: self.backend_name.clone(),
            params_key: keys.params.clone(),
            params_digest: d.to_string(),
            dataset: self.dataset.clone(),
            data_dir: self.data_dir.display().to_string(),
            indices: self.batches[j].clone(),
            output_key: keys.output(j),
            output_mode: if keys.fetch { OutputMode::Put } else { OutputMode::Accumulate },
            store: StoreRef { url: store_url.to_owned() },
            // Only the sum is used; hashing each gradient would be waste.
            return_digest: false,
            flip_labels: self.flip_labels,
            inner: self.inner.clone(),
        }
    }

    /// The sum of the delivered gradients and their count: fetched one by one, or read from
    /// the store's sum when it is plausible. `None` when none was delivered.
    async fn gather(
        &self,
        store: &impl Store,
        keys: &Keys,
        delivered: &[usize],
    ) -> Result<Option<(Vec<f32>, u64)>, NodeError> {
        let fail = self.failure();
        if keys.fetch {
            return self.fetch_sum(store, &|j| keys.output(j), delivered).await.map_err(fail);
        }
        let acc = store.read_accumulated(&keys.grad).await.map_err(|e| fail(format!("store read: {e}")))?;
        let acc = acc.filter(|a| a.count > 0).map(|a| (a.sum, a.count));
        if let Some((sum, count)) = &acc {
            // The store adds whatever its clients send: a client holding the store's secret
            // (another member) could write into this key. The sum is only taken when it is
            // plausible; the job is then retried in fetch mode, which checks every gradient on
            // its own (`run_with_retries`).
            let problem = if *count > self.batches.len() as u64 {
                Some(format!("{count} contributions for {} batches", self.batches.len()))
            } else if sum.len() != self.params.len() {
                Some(format!("{} values, the model has {}", sum.len(), self.params.len()))
            } else {
                peerless_core::flat::check_finite("the sum", sum).err().map(|e| e.to_string())
            };
            if let Some(p) = problem {
                let _ = store.delete(&[keys.params.as_str(), keys.grad.as_str()]).await;
                return Err(fail(format!("in-store sum at {} refused: {p}", keys.grad)));
            }
        }
        Ok(acc)
    }

    /// Fetch-then-aggregate: reads the gradient of each delivered batch from the store and
    /// adds them up here; `None` when none was delivered.
    async fn fetch_sum(
        &self,
        store: &impl Store,
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

/// The store keys of one round's gradient work.
struct Keys {
    /// The node's name in keys and the ledger.
    node: String,
    params: String,
    grad: String,
    /// Fetch-then-aggregate: one key per batch, each holding one gradient.
    fetch: bool,
}

impl Keys {
    /// Every key is under the node's prefix (`peer<me>/`, the warm-up's under
    /// `peer<me>/warm-up/`), the only keys its Redis ACL user may touch.
    fn of(job: &Job) -> Keys {
        let prefix = node_key_prefix(job.me);
        let (node, under) = if job.warm_up {
            (format!("peer{}-warm-up", job.me), format!("{prefix}warm-up/"))
        } else {
            (format!("peer{}", job.me), prefix)
        };
        Keys {
            params: format!("{under}params/{}", job.round),
            grad: format!("{under}grad/{}", job.round),
            fetch: job.aggregation == Aggregation::Fetch,
            node,
        }
    }

    /// Where batch `j`'s gradient goes.
    fn output(&self, j: usize) -> String {
        if self.fetch { format!("{}/{j}", self.grad) } else { self.grad.clone() }
    }

    /// Every key the work may have written, for clean-up.
    fn all(&self, batches: usize) -> Vec<String> {
        let mut keys = vec![self.params.clone(), self.grad.clone()];
        if self.fetch {
            keys.extend((0..batches).map(|j| self.output(j)));
        }
        keys
    }
}

/// What the invocations of one round answered.
#[derive(Default)]
struct Answers {
    /// Sum of the reported losses.
    loss: f64,
    ok: u32,
    errors: Vec<String>,
    /// Failures because the gradient was not finite.
    non_finite: usize,
    /// Batches whose gradient was delivered.
    delivered: Vec<usize>,
}

impl Answers {
    fn collect(results: Vec<Result<crate::function::Invocation, crate::function::InvokeError>>) -> Answers {
        let mut a = Answers::default();
        for (j, r) in results.into_iter().enumerate() {
            match r {
                Ok(inv) if inv.is_ok() => {
                    let resp: Option<GradientResponse> =
                        inv.response.and_then(|v| serde_json::from_value(v).ok());
                    if let Some(resp) = resp {
                        a.loss += f64::from(resp.loss);
                        a.ok += 1;
                        a.delivered.push(j);
                    }
                }
                Ok(inv) => {
                    a.non_finite +=
                        usize::from(inv.error.as_ref().is_some_and(|e| e.error_type.ends_with("NonFinite")));
                    a.errors.push(format!("{:?}: {:?}", inv.outcome, inv.error.map(|e| e.error_message)))
                }
                Err(e) => a.errors.push(e.to_string()),
            }
        }
        a
    }

    /// The error when no gradient was delivered: divergence when every failure was a
    /// non-finite gradient.
    fn failure(&self, round: u64) -> NodeError {
        if self.non_finite > 0 && self.non_finite == self.errors.len() {
            return NodeError::Diverged { round, reason: self.errors.join("; ") };
        }
        NodeError::Compute { round, reason: format!("every invocation failed: {}", self.errors.join("; ")) }
    }
}

impl GradientBackend {
    /// Starts the gradient backend of node `me` (`node` names it in the ledger and store keys).
    pub(crate) async fn start(
        run: &RunConfig,
        me: u32,
        command: FunctionCommand,
    ) -> Result<GradientBackend, NodeError> {
        let cluster = &run.cluster;
        Ok(match cluster.compute {
            Compute::Local => GradientBackend::Local(ComputeThread::start()?),
            Compute::Functions => {
                let seed = crate::function::invoke::node_seed(run.seed, me);
                let runtime = crate::function::start(run.function.clone(), command, seed)
                    .map_err(|e| NodeError::Config(e.to_string()))?;
                let (embedded, store_url) = if cluster.store == "embedded" {
                    let h = EmbeddedServer::spawn(([127, 0, 0, 1], 0).into(), Some(cluster.secret.clone()))
                        .map_err(|e| NodeError::Network(format!("embedded store: {e}")))?;
                    let url = h.url();
                    (Some(h), url)
                } else {
                    if !cluster.store.contains('@') || cluster.store.contains("://:") {
                        tracing::warn!(
                            "cluster.store names no Redis user: this node's functions can reach every \
                             node's keys (give each node its own ACL user, see docs/multi-host.md)"
                        );
                    }
                    (None, cluster.store.clone())
                };
                // The error names the URL with its password elided.
                let store =
                    RedisStore::connect(&store_url).await.map_err(|e| NodeError::Network(e.to_string()))?;
                GradientBackend::Functions { runtime, store, store_url, embedded }
            }
        })
    }

    /// Invocation counters so far, without the latency quantiles (zero for in-process
    /// compute); `function_metrics.json` has the quantiles.
    pub(crate) fn totals(&self) -> crate::function::metrics::Summary {
        match self {
            GradientBackend::Functions { runtime, .. } => runtime.totals(),
            GradientBackend::Local(_) => Default::default(),
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

/// The gradient work of a peer or worker: each round's [`Job`] built from one template and run
/// on the node's backend, its result sent to the node's loop; the outgoing gradient message.
pub(crate) struct Work {
    job: Job,
    backend: Arc<GradientBackend>,
    pub(crate) outgoing: Outgoing,
    tx: mpsc::Sender<Result<LocalResult, NodeError>>,
    started: Instant,
}

/// Starts warming `functions_per_node` function instances while the node sets itself up (a
/// restarted peer fetches its state meanwhile): one invocation each on the node's first
/// batches at the initial parameters, under keys of its own, its result dropped. Their cold
/// starts (process, dataset and model caches) happen now rather than in the first round.
/// Returns the round template, whose work waits until the warm-up is over.
fn warm_up(template: Job, node: &Node) -> Job {
    let (done, warmed) = tokio::sync::watch::channel(false);
    let warm = Job {
        params: Arc::new(node.model.init(node.file.run.seed)),
        batches: node.sampler.batches(node.me, 0),
        warm_up: true,
        ..template.clone()
    };
    tokio::spawn(async move {
        let t = Instant::now();
        match warm.run().await {
            Ok(_) => tracing::debug!(ms = t.elapsed().as_millis() as u64, "function instances warmed up"),
            Err(e) => {
                tracing::warn!(error = %e, "warming up the function instances failed; the first round starts them")
            }
        }
        let _ = done.send(true);
    });
    Job { warmed: Some(warmed), ..template }
}

impl Work {
    /// Starts `node`'s gradient backend (function runtime and store, or in-process).
    pub(crate) async fn start(node: &mut Node, command: FunctionCommand) -> Result<Work, NodeError> {
        let run = &node.file.run;
        let backend = GradientBackend::start(run, node.me, command).await?;
        if let GradientBackend::Functions { runtime, .. } = &backend {
            // A record per invocation for the whole run: into the node's ledger file as they
            // come, not into memory (a killed node leaves them behind too).
            let path = node.file.node.dir.join(crate::function::metrics::LEDGER_FILE);
            runtime.stream_ledger(&path).map_err(io_err(&path))?;
        }
        let backend = Arc::new(backend);
        let job = Job::template(
            run,
            node.me,
            node.model.clone(),
            node.split.clone(),
            backend.clone(),
            node.data_dir.clone(),
        );
        let outgoing = Outgoing::new(node.file.node.attack, run.seed, node.me);
        let job = match *backend {
            GradientBackend::Functions { .. } => warm_up(job, node),
            GradientBackend::Local(_) => job,
        };
        Ok(Work { job, backend, outgoing, tx: node.results(), started: Instant::now() })
    }

    /// Starts round `round`'s work on `params` over `batches` (on flipped labels when this
    /// node attacks so in this round).
    pub(crate) fn spawn(
        &mut self,
        round: u64,
        params: Arc<Vec<f32>>,
        fingerprint: Option<Digest>,
        batches: Vec<Vec<u32>>,
    ) {
        self.started = Instant::now();
        let flip_labels = self.outgoing.flips_labels(round);
        Job { round, params, fingerprint, batches, flip_labels, ..self.job.clone() }.spawn(self.tx.clone());
    }

    /// Milliseconds since the newest work started.
    pub(crate) fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    /// Invocation counters so far (zero for in-process work).
    pub(crate) fn counters(&self) -> crate::function::Summary {
        self.backend.totals()
    }

    /// Writes the function metrics and the ledger into `dir`.
    pub(crate) fn write_ledger(&self, dir: &Path) -> Result<(), NodeError> {
        self.backend.write_ledger(dir)
    }

    /// Stops the function instances and the embedded store, unless work still runs.
    pub(crate) async fn shutdown(self) {
        drop(self.job);
        if let Ok(b) = Arc::try_unwrap(self.backend) {
            b.shutdown().await;
        }
    }
}
