//! The one event loop every node runs, and the set-up every role shares.
//!
//! [`Node`] is what a peer, the PS and a worker all have: identity and network, data, model,
//! sampler, files, the clock, the channels gradient work and evaluations report on. [`Role`] is
//! what differs: the protocol machine and how its actions are carried out. [`drive`] waits for
//! whatever comes next (a network event, finished gradient work, an evaluation, the machine's
//! timer, Ctrl-C), hands it to the role, and feeds the machine until the role is done.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use peerless_core::cost::Prices;
use peerless_core::flat::digest;
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::Limits;
use peerless_ml::{Model, ModelSpec, Split};
use tokio::sync::{mpsc, watch};

use super::net::{Members, Net, NetEvent, Raw};
use super::sampler::Sampler;
use super::work::LocalResult;
use super::{
    Files, NodeError, NodeEvent, NodeFile, NodeLine, NodeRow, NodeSummary, Progress, io_err, unix_ms,
};

/// What gradient work reports.
pub(crate) type Computed = Result<LocalResult, NodeError>;

/// A test-set evaluation of the parameters after round `round`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Evaluation {
    pub(crate) round: u64,
    pub(crate) loss: f32,
    pub(crate) accuracy: f32,
}

/// What a node of any role has.
pub(crate) struct Node {
    /// The node file it was started with.
    pub(crate) file: NodeFile,
    pub(crate) me: PeerIdx,
    pub(crate) my_id: PeerId,
    pub(crate) files: Files,
    pub(crate) net: Net,
    /// Started when the event loop starts; the machines' clock.
    pub(crate) t0: Instant,
    pub(crate) model: Arc<Model>,
    pub(crate) split: Arc<Split>,
    pub(crate) sampler: Arc<Sampler>,
    /// Where the functions read the dataset.
    pub(crate) data_dir: PathBuf,
    /// Rounds per epoch.
    pub(crate) rpe: u64,
    /// Training rounds in the run.
    pub(crate) rounds: u64,
    pub(crate) prices: Prices,
    results: (mpsc::Sender<Computed>, mpsc::Receiver<Computed>),
    evaluations: (mpsc::Sender<Evaluation>, mpsc::Receiver<Evaluation>),
    /// The newest evaluation, until a metrics row takes it.
    evaluated: Option<Evaluation>,
    /// When the last progress line was printed, and the view it named.
    last_progress: Option<(Instant, usize)>,
}

/// A node prints at most one progress line this often (see [`Node::progress`]).
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// Whether `p` is printed at `now`, the last line having been printed at `last` (when, and the
/// view it named).
fn progress_due(last: Option<(Instant, usize)>, p: &Progress, now: Instant) -> bool {
    let Some((at, view)) = last else { return true };
    now.duration_since(at) >= PROGRESS_EVERY
        || view != p.view
        || p.test_accuracy.is_some()
        || p.round >= p.total
}

/// How the network of a node is set up: whom it admits, how long a request may take.
pub(crate) struct NetPlan {
    pub(crate) members: Members,
    pub(crate) request_timeout: Duration,
    /// Whether it offers and uses tensor lanes (`p2p.tensor_transport = "tcp"`, peers only).
    pub(crate) lane: bool,
}

impl Node {
    /// Sets up node `file.node.index`: files, identity and network, data, model, sampler.
    pub(crate) fn open(file: NodeFile, data_dir: PathBuf, plan: NetPlan) -> Result<Node, NodeError> {
        let run = &file.run;
        let me = file.node.index;
        let files = Files::open(&file.node.dir)?;
        let data_dir = if run.data.dir.as_os_str().is_empty() { data_dir } else { run.data.dir.clone() };
        let mut split = peerless_ml::data::load(run.data.dataset, &data_dir)?;
        if run.cluster.compute == crate::config::Compute::Local {
            // This process gathers every round's batches itself: its own copy of the pixels.
            split.train = split.train.resident()?;
        }
        let split: Arc<Split> = Arc::new(split);
        let spec = ModelSpec {
            hidden: run.model.hidden.clone(),
            ..ModelSpec::new(run.model.arch, split.train.shape, split.train.classes)
        };
        let model = Arc::new(Model::new(spec, run.model.backend)?);
        let limits = Limits { params: model.num_params() };
        let (net, my_id) = Net::open(&file, plan.members, limits, plan.request_timeout, plan.lane)?;
        let cluster = &run.cluster;
        let sampler = Arc::new(Sampler::new(
            split.train.len(),
            cluster.nodes,
            cluster.functions_per_node,
            // Under DiLoCo a function's batch is its local steps' mini-batches, back to back.
            run.train.batch_size * run.p2p.steps_per_round() as usize,
            run.seed,
        ));
        let rpe = sampler.rounds_per_epoch();
        let rounds = if run.train.rounds > 0 { run.train.rounds } else { u64::from(run.train.epochs) * rpe };
        let prices = run.function.prices.prices().map_err(|e| NodeError::Config(e.to_string()))?;
        Ok(Node {
            me,
            my_id,
            files,
            net,
            t0: Instant::now(),
            model,
            split,
            sampler,
            data_dir,
            rpe,
            rounds,
            prices,
            results: mpsc::channel(4),
            evaluations: mpsc::channel(4),
            evaluated: None,
            last_progress: None,
            file,
        })
    }

    /// Milliseconds since the loop started: the machines' clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Records an event in `events.jsonl`.
    pub(crate) fn event(&mut self, ev: NodeEvent) {
        self.files.event(self.me, &ev);
    }

    /// Records an event a protocol machine emitted.
    pub(crate) fn machine_event(&mut self, e: &peerless_core::protocol::Event) {
        self.files.event(self.me, e);
    }

    /// Where gradient work reports its result.
    pub(crate) fn results(&self) -> mpsc::Sender<Computed> {
        self.results.0.clone()
    }

    /// Evaluates `params` on the test set off the event loop; the result goes into a later
    /// metrics row (and an `eval` event).
    pub(crate) fn evaluate_later(&self, round: u64, params: Arc<Vec<f32>>) {
        let (model, split, tx) = (self.model.clone(), self.split.clone(), self.evaluations.0.clone());
        tokio::task::spawn_blocking(move || {
            if let Ok((loss, accuracy)) = model.evaluate(&params, &split.test) {
                let _ = tx.blocking_send(Evaluation { round, loss, accuracy });
            }
        });
    }

    /// The final model's test loss and accuracy. A diverged model may not even evaluate: its
    /// accuracy is then chance, its loss unknown.
    pub(crate) async fn evaluate(
        &mut self,
        round: u64,
        params: &[f32],
        diverged: bool,
    ) -> Result<(f32, f32), NodeError> {
        let (m, s, p) = (self.model.clone(), self.split.clone(), params.to_vec());
        let evaluated = tokio::task::spawn_blocking(move || m.evaluate(&p, &s.test))
            .await
            .map_err(|e| NodeError::Compute { round, reason: e.to_string() })?;
        match evaluated {
            Ok(v) => Ok(v),
            Err(e) if diverged => {
                tracing::warn!(node = self.me, error = %e, "the diverged model does not evaluate");
                Ok((f32::NAN, 1.0 / self.split.test.classes as f32))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A metrics row for round `round` (of `per_epoch` a epoch) with what every node knows:
    /// time, bytes moved, the newest evaluation. The role fills in the rest.
    pub(crate) fn row(&mut self, round: u64, per_epoch: u64) -> NodeRow {
        let ev = self.evaluated.take();
        NodeRow {
            t_ms: unix_ms(),
            node: self.me,
            round,
            epoch: round as f64 / per_epoch as f64,
            wall_s: self.t0.elapsed().as_secs_f64(),
            bytes_in: self.net.bytes_in,
            bytes_out: self.net.bytes_out,
            eval_round: ev.map(|e| e.round),
            test_loss: ev.map(|e| e.loss),
            test_accuracy: ev.map(|e| e.accuracy),
            ..NodeRow::default()
        }
    }

    /// Tells the launcher a round is done, when it asked for progress lines: the first round,
    /// then at most one line every [`PROGRESS_EVERY`] (the launcher looks every 50 ms), plus
    /// every evaluated round, every change of the view and the last round. A line a round
    /// woke the launcher twice per node (its reader thread and its loop): at 300 rounds a
    /// second and four peers that was 2,400 wake-ups a second on a machine the run keeps busy.
    pub(crate) fn progress(&mut self, p: Progress) {
        if !self.file.node.progress {
            return;
        }
        let now = Instant::now();
        if progress_due(self.last_progress, &p, now) {
            self.last_progress = Some((now, p.view));
            NodeLine::Progress(p).print();
        }
    }

    /// The node's charge for its time so far, pico-dollars.
    pub(crate) fn node_pico(&self) -> u64 {
        self.prices.node_pico(self.now_ms())
    }

    /// The summary of this node: what every node knows, and `o`, what its role knows.
    pub(crate) fn summary(&self, o: Outcome, inv: crate::function::Summary) -> NodeSummary {
        let wall_time_s = self.t0.elapsed().as_secs_f64();
        NodeSummary {
            peer: self.me,
            peer_id: self.my_id.to_string(),
            completed: o.completed,
            diverged: o.diverged,
            rounds: o.rounds,
            test_accuracy: o.test_accuracy,
            test_loss: o.test_loss,
            param_digest: o.params.map(|p| digest(p).to_string()).unwrap_or_default(),
            wall_time_s,
            samples: o.samples,
            invocations: inv.invocations,
            cold_starts: inv.cold_starts,
            retries: inv.retries,
            function_cost_pico: inv.cost_pico,
            node_cost_pico: self.prices.node_pico((wall_time_s * 1e3) as u64),
            bytes_in: self.net.bytes_in,
            bytes_out: self.net.bytes_out,
            refused: self.net.refused,
            max_memory_mb: crate::function::instance::peak_rss_kb(std::process::id())
                .unwrap_or(0)
                .div_ceil(1024),
            function_max_memory_mb: inv.max_memory_mb,
            function_memory_mb: self.file.run.function.memory_mb,
        }
    }

    /// Records the `finish` event and writes `summary.json`.
    pub(crate) fn finish(&mut self, s: &NodeSummary) -> Result<(), NodeError> {
        self.event(NodeEvent::Finish {
            round: s.rounds,
            test_accuracy: s.test_accuracy,
            digest: s.param_digest.clone(),
        });
        let path = self.file.node.dir.join("summary.json");
        let text = serde_json::to_string_pretty(s).expect("invariant: summary serializes");
        crate::checkpoint::write_atomic(&path, text.as_bytes()).map_err(io_err(&path))
    }

    /// The next network events a role acts on, if any come within `within`.
    pub(crate) async fn next_net_events(&mut self, within: Duration) -> Vec<NetEvent> {
        tokio::select! {
            ev = self.net.next() => self.net.sort(ev, &mut self.files),
            _ = tokio::time::sleep(within) => Vec::new(),
        }
    }

    /// Waits for what comes next, at the latest `until`.
    async fn wait(&mut self, until: Instant, stop: &mut watch::Receiver<bool>) -> Wake {
        tokio::select! {
            ev = self.net.next() => Wake::Net(Box::new(ev)),
            Some(r) = self.results.1.recv() => Wake::Computed(r),
            Some(e) = self.evaluations.1.recv() => Wake::Evaluated(e),
            _ = tokio::time::sleep_until(until.into()) => Wake::Timer,
            _ = stop.changed() => Wake::Interrupted,
        }
    }
}

/// What a role knows for the summary.
pub(crate) struct Outcome<'a> {
    pub(crate) completed: bool,
    pub(crate) diverged: bool,
    pub(crate) rounds: u64,
    pub(crate) test_accuracy: f32,
    pub(crate) test_loss: f32,
    /// The final parameters (a worker holds none).
    pub(crate) params: Option<&'a [f32]>,
    pub(crate) samples: u64,
}

/// What woke the loop.
enum Wake {
    Net(Box<Raw>),
    Computed(Computed),
    Evaluated(Evaluation),
    Timer,
    Interrupted,
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The role is done.
    Done,
    /// SIGINT or SIGTERM.
    Interrupted,
    /// Every gradient of a round was non-finite.
    Diverged,
}

/// A node's role: its protocol machine and how the machine's actions are carried out.
pub(crate) trait Role {
    /// The machine's input.
    type Input;
    /// How long the loop waits when the machine set no timer.
    const IDLE: Duration;
    /// The input that shows the machine the time.
    fn tick() -> Self::Input;
    /// When the machine wants a tick, ms on the node's clock.
    fn next_timer(&self) -> Option<u64>;
    /// The machine's round (for the `stop` event).
    fn round(&self) -> u64;
    /// Feeds `input` to the machine and carries out its actions; returns the inputs carrying
    /// them out produced (fed back at once).
    fn step(&mut self, node: &mut Node, input: Self::Input) -> Result<Vec<Self::Input>, NodeError>;
    /// The machine's input for a network event, if it is one.
    fn on_net(&mut self, node: &mut Node, ev: NetEvent) -> Option<Self::Input>;
    /// The machine's input for finished gradient work.
    fn on_computed(&mut self, node: &mut Node, r: LocalResult) -> Option<Self::Input>;
    /// Housekeeping before the loop waits (e.g. redialling).
    fn before_wait(&mut self, _node: &mut Node) {}
    /// Whether the loop is over.
    fn is_done(&self) -> bool;
}

/// Runs `role` on `node` until it is done, interrupted, or its model diverged.
pub(crate) async fn drive<R: Role>(
    node: &mut Node,
    role: &mut R,
    stop: &mut watch::Receiver<bool>,
) -> Result<Ending, NodeError> {
    node.t0 = Instant::now();
    let mut inputs = VecDeque::from([R::tick()]);
    loop {
        while let Some(input) = inputs.pop_front() {
            inputs.extend(role.step(node, input)?);
        }
        if role.is_done() {
            return Ok(Ending::Done);
        }
        role.before_wait(node);
        let until = role
            .next_timer()
            .map_or_else(|| Instant::now() + R::IDLE, |t| node.t0 + Duration::from_millis(t));
        match node.wait(until, stop).await {
            Wake::Net(ev) => {
                for ev in node.net.sort(*ev, &mut node.files) {
                    inputs.extend(role.on_net(node, ev));
                }
            }
            Wake::Computed(Ok(r)) => inputs.extend(role.on_computed(node, r)),
            Wake::Computed(Err(NodeError::Diverged { round, reason })) => {
                tracing::error!(node = node.me, round, %reason, "the model diverged; training stops");
                node.event(NodeEvent::Diverged { round, reason });
                return Ok(Ending::Diverged);
            }
            Wake::Computed(Err(e)) => return Err(e),
            Wake::Evaluated(e) => {
                node.event(NodeEvent::Eval { round: e.round, test_loss: e.loss, test_accuracy: e.accuracy });
                node.evaluated = Some(e);
            }
            Wake::Timer => inputs.push_back(R::tick()),
            Wake::Interrupted => {
                node.event(NodeEvent::Stop { round: role.round(), reason: "interrupted".into() });
                return Ok(Ending::Interrupted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_come_at_most_every_50_ms_but_never_skip_the_first_an_evaluation_a_new_view_or_the_last()
    {
        let t0 = Instant::now();
        let p = |round, view, acc| Progress {
            node: 0,
            round,
            total: 100,
            loss: Some(1.0),
            view,
            test_accuracy: acc,
        };
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(progress_due(None, &p(1, 4, None), t0), "the first round");
        let last = Some((t0, 4));
        assert!(!progress_due(last, &p(2, 4, None), ms(10)), "10 ms after the last line");
        assert!(!progress_due(last, &p(5, 4, None), ms(49)));
        assert!(progress_due(last, &p(6, 4, None), ms(50)), "50 ms after");
        assert!(progress_due(last, &p(2, 4, Some(0.9)), ms(10)), "an evaluated round");
        assert!(progress_due(last, &p(2, 3, None), ms(10)), "the view changed");
        assert!(progress_due(last, &p(100, 4, None), ms(10)), "the last round");
    }
}
