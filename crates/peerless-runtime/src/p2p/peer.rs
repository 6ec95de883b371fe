//! The peer role: carries out the actions of the P2P round machine
//! ([`peerless_core::p2p::Round`]) on the node's network, gradient work and replica, and
//! turns what happens into the machine's inputs. The loop and set-up are
//! [`crate::node::driver`]'s.
//!
//! ```text
//! <peer dir>/
//!   identity.key             ed25519 key (libp2p protobuf encoding)
//!   peer.toml                the configuration the peer was started with (written by the launcher)
//!   checkpoint.safetensors   every `train.checkpoint_every` rounds and at the end (atomic)
//!   metrics.csv              one row per round (see [`NodeRow`](crate::node::NodeRow))
//!   events.jsonl             protocol and network events with wall-clock timestamps
//!   ledger.csv               one line per function invocation attempt
//!   summary.json             [`NodeSummary`]
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerless_core::admission::MAX_PEERS;
use peerless_core::flat::digest;
use peerless_core::p2p::{Action, EventKind, Input, Round, RoundConfig, Start};
use peerless_core::protocol::{DeadlinePolicy, PeerIdx};
use peerless_core::wire::{self, Message, StateMsg};
use tokio::sync::watch;

use super::links::{Links, Pending};
use crate::function::FunctionCommand;
use crate::node::driver::{Ending, NetPlan, Node, Outcome, Role, drive};
use crate::node::net::{NetEvent, frame, members};
use crate::node::replica::Replica;
use crate::node::work::{LocalResult, Work};
use crate::node::{NodeError, NodeEvent, NodeFile, NodeLine, NodeRow, NodeSummary, Progress};

/// Runs one peer until training is over (or `stop` is set, or `halt_at_round` is reached).
pub async fn run(
    file: NodeFile,
    command: FunctionCommand,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let cluster = &file.run.cluster;
    let plan = NetPlan {
        // Peers beyond the starting members join while the run trains.
        members: members(&file, MAX_PEERS, vec![peerless_core::admission::Role::Peer])?,
        request_timeout: Duration::from_millis(3 * cluster.deadline_ceiling_ms + cluster.start_timeout_ms),
        lane: file.run.p2p.tensor_transport == crate::config::TensorTransport::Tcp,
    };
    let mut node = Node::open(file, data_dir, plan)?;
    let mut peer = Peer::start(&mut node, command).await?;
    let ending = drive(&mut node, &mut peer, &mut stop).await?;
    peer.finish(node, ending).await
}

/// Per-round timings and counters, reset when the round's work starts.
#[derive(Debug, Default)]
struct RoundStats {
    compute_ms: f64,
    local_ready: Option<Instant>,
    broadcast_at: Option<Instant>,
    acks_pending: usize,
    exchange_ms: Option<f64>,
    /// Round whose gradient was broadcast.
    round: Option<u64>,
    loss: f32,
    samples: u64,
    gather_ms: Option<f64>,
}

/// A peer: the round machine and what carries out its actions.
pub(crate) struct Peer {
    machine: Round,
    replica: Replica,
    work: Work,
    links: Links,
    stats: RoundStats,
    /// The own gradient message of the newest round, until it is broadcast.
    mine: Option<(u64, Bytes)>,
    /// The own gradient message of the round before, for a joiner that asks for it again.
    previous: Option<(u64, Bytes)>,
    /// Samples computed on in the whole run.
    samples: u64,
    /// Samples behind each gradient of a round not yet applied, by round and sender (the own
    /// included): what the round's `applied_samples` adds up.
    behind: std::collections::BTreeMap<(u64, PeerIdx), u64>,
    completed: bool,
    /// Invocation counters at the last metrics row.
    counted: crate::function::Summary,
}

impl Peer {
    /// The peer of `node`: its replica (from its checkpoint, or to be fetched when it joins),
    /// gradient work and round machine. Prints the ready line.
    async fn start(node: &mut Node, command: FunctionCommand) -> Result<Peer, NodeError> {
        let (replica, resumed) = Replica::open(node)?;
        // A peer beyond the starting members always joins a running run.
        let join = node.file.node.join || node.me >= node.file.run.cluster.nodes;
        let start = match (resumed, join) {
            (Some(round), true) => Start::Join { own: Some(round) },
            (Some(round), false) => Start::Fresh { round },
            (None, true) => Start::Join { own: None },
            (None, false) => Start::Fresh { round: 0 },
        };
        let work = Work::start(node, command).await?;
        let links = Links::new(&node.file.node.bootstrap, node.file.run.p2p.detection_ms)?;
        let (run, me) = (&node.file.run, node.me);
        let cfg = RoundConfig {
            me,
            members: (0..run.cluster.nodes).collect(),
            total_rounds: node.rounds,
            checkpoint_every: run.train.checkpoint_every,
            deadline: DeadlinePolicy {
                floor_ms: run.cluster.deadline_floor_ms,
                ceiling_ms: run.cluster.deadline_ceiling_ms,
                factor: run.cluster.deadline_factor,
            },
            start_timeout_ms: run.cluster.start_timeout_ms,
            quorum: run.p2p.quorum.into(),
        };
        let (total, rpe, id) = (node.rounds, node.rpe, node.my_id.to_string());
        node.event(NodeEvent::Start {
            role: None,
            peer_id: id.clone(),
            total_rounds: Some(total),
            rounds_per_epoch: Some(rpe),
            start: Some(format!("{start:?}")),
            round: None,
        });
        tracing::info!(peer = me, %id, total, "peer starting");
        NodeLine::Ready { ready: me }.print();
        Ok(Peer {
            machine: Round::new(cfg, start, 0),
            replica,
            work,
            links,
            stats: RoundStats::default(),
            mine: None,
            previous: None,
            samples: 0,
            behind: Default::default(),
            completed: false,
            counted: Default::default(),
        })
    }

    /// Carries out one action; inputs it produces go to `fed_back`.
    fn carry_out(
        &mut self,
        node: &mut Node,
        action: Action,
        fed_back: &mut Vec<Input>,
    ) -> Result<(), NodeError> {
        match action {
            Action::Compute { round, view } => self.compute(node, round, &view),
            Action::Broadcast { round, to } => self.broadcast(node, round, &to),
            Action::Apply { round, inputs } => {
                self.apply(node, round, &inputs)?;
                node.net.recycle(inputs.into_iter().map(|(_, g)| g).collect());
            }
            Action::Checkpoint { round } => {
                self.replica.checkpoint(node, round, round / node.rpe)?;
                node.event(NodeEvent::Checkpoint { round });
            }
            Action::ServeState { to, round, base } => self.serve_state(node, round, base, &to),
            Action::RefuseState { to, reason } => {
                self.links.answer_state(&mut node.net, to, &Message::Refused { reason })
            }
            Action::RequestResend { round, from } => self.announce(node, &Message::Resend { round }, &[from]),
            Action::RequestState { from } => {
                let parts = wire::state_parts(wire::state_len(self.replica.state_floats()));
                if !self.links.request_state(&mut node.net, from, parts) {
                    fed_back.push(Input::StateFailed(from));
                }
            }
            Action::Adopt(state) => self.adopt(node, state)?,
            Action::AnnounceJoin { round, to } => self.announce(node, &Message::Join { round }, &to),
            Action::AnnounceReceived { round, peers, to } => {
                let bytes = frame(&Message::Received { round, peers });
                for p in to {
                    self.links.send(&mut node.net, p, bytes.clone(), Pending::Received(bytes.clone()));
                }
            }
            Action::AnnounceFinal { round, digest, to } => {
                self.announce(node, &Message::Final { round, digest }, &to)
            }
            Action::Event(e) => {
                node.machine_event(&e);
                if let EventKind::NoQuorum { round, contributors, base } = &e.kind {
                    let says = format!(
                        "no quorum at round {round}: its side has {contributors:?} of the last rounds' contributors \
                         {base:?}; it waits for a majority of them (or the side that has one)"
                    );
                    tracing::warn!(peer = node.me, "{says}");
                    NodeLine::Notice { notice: node.me, says }.print();
                }
            }
            Action::Finalize { .. } => fed_back.push(Input::FinalDigest(digest(self.replica.params()))),
            Action::Finished { round } => {
                self.completed = true;
                tracing::info!(peer = node.me, round, "training finished");
            }
        }
        Ok(())
    }

    /// Starts the gradient work of `round` on the batches of the peers in `view`.
    fn compute(&mut self, node: &mut Node, round: u64, view: &[PeerIdx]) {
        self.stats = RoundStats::default();
        let batches = node.sampler.assignment(node.me, round, view, node.file.run.p2p.takeover);
        let (params, fingerprint) = self.replica.version();
        self.work.spawn(round, params, Some(fingerprint), batches);
    }

    /// Sends the own gradient of `round` to `to` (the newest round's, or again the one before).
    fn broadcast(&mut self, node: &mut Node, round: u64, to: &[PeerIdx]) {
        let held = |m: &Option<(u64, Bytes)>| m.as_ref().filter(|(r, _)| *r == round).map(|(_, b)| b.clone());
        let Some(bytes) = held(&self.mine) else {
            if let Some(bytes) = held(&self.previous) {
                for &p in to {
                    self.links.send(&mut node.net, p, bytes.clone(), Pending::Other);
                }
            }
            return;
        };
        self.stats.broadcast_at = Some(Instant::now());
        self.stats.round = Some(round);
        self.stats.acks_pending = to
            .iter()
            .filter(|&&p| self.links.send(&mut node.net, p, bytes.clone(), Pending::Gradient(round)))
            .count();
    }

    /// Aggregates the round's gradients and updates the replica; evaluates when it is due and
    /// this peer is the lowest-indexed contributor; writes the round's row.
    fn apply(
        &mut self,
        node: &mut Node,
        round: u64,
        inputs: &[(PeerIdx, Vec<f32>)],
    ) -> Result<(), NodeError> {
        let wait_ms = self.stats.local_ready.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let applied = self.replica.apply(round, inputs, false)?;
        let applied_samples =
            inputs.iter().map(|(p, _)| self.behind.get(&(round, *p)).copied().unwrap_or(0)).sum();
        self.behind.retain(|&(r, _), _| r > round);
        let done = round + 1;
        let eval_now = match node.file.run.train.eval_every {
            0 => done.is_multiple_of(node.rpe),
            k => done.is_multiple_of(k),
        };
        if eval_now && done < node.rounds && inputs.first().map(|(p, _)| *p) == Some(node.me) {
            node.evaluate_later(done, self.replica.params().clone());
        }
        let inv = self.work.counters();
        let s = &self.stats;
        let row = NodeRow {
            train_loss: Some(s.loss),
            view: Some(self.machine.expected().len() + 1),
            contributors: Some(inputs.len()),
            samples: Some(s.samples),
            invocations: Some(inv.invocations - self.counted.invocations),
            cold_starts: Some(inv.cold_starts - self.counted.cold_starts),
            retries: Some(inv.retries - self.counted.retries),
            compute_ms: Some(s.compute_ms),
            wait_ms: Some(wait_ms),
            exchange_ms: s.exchange_ms,
            aggregate_ms: Some(applied.aggregate_ms),
            update_ms: Some(applied.update_ms),
            cost_pico: Some(inv.cost_pico + node.node_pico()),
            staleness: Some(0),
            gather_ms: s.gather_ms,
            effective_f: Some(applied.effective_f),
            applied_samples: Some(applied_samples),
            ..node.row(done, node.rpe)
        };
        node.files.metrics(&row);
        self.counted = inv;
        node.progress(Progress {
            node: node.me,
            round: done,
            total: node.rounds,
            loss: Some(s.loss),
            view: self.machine.expected().len() + 1,
            test_accuracy: row.test_accuracy,
        });
        if node.file.node.halt_at_round.is_some_and(|h| done >= h) {
            node.event(NodeEvent::Halt { round: done });
            // Like a crash: no goodbye, no final checkpoint.
            std::process::exit(3);
        }
        Ok(())
    }

    /// Serves the state at `round` to the peers that asked for it.
    fn serve_state(&mut self, node: &mut Node, round: u64, base: Vec<PeerIdx>, to: &[PeerIdx]) {
        let msg = frame(&Message::State(self.replica.state(round, base)));
        for &p in to {
            self.links.answer_state_bytes(&mut node.net, p, msg.clone());
            node.event(NodeEvent::ServedState { to: p, round });
        }
    }

    /// Takes over the state a peer served.
    fn adopt(&mut self, node: &mut Node, state: StateMsg) -> Result<(), NodeError> {
        let (round, d) = (state.round, state.digest);
        self.replica.adopt(state)?;
        node.event(NodeEvent::Adopted { round, digest: d.to_string() });
        Ok(())
    }

    /// Sends `msg` to each of `to` (no answer is waited for).
    fn announce(&mut self, node: &mut Node, msg: &Message, to: &[PeerIdx]) {
        let bytes = frame(msg);
        for &p in to {
            self.links.send(&mut node.net, p, bytes.clone(), Pending::Other);
        }
    }

    /// Records the exchange time once every recipient acknowledged the broadcast.
    fn note_exchange(&mut self) {
        if let (Some(b), None, Some(r)) = (self.stats.broadcast_at, self.stats.exchange_ms, self.stats.round)
            && self.links.take_acks(r, &mut self.stats.acks_pending)
        {
            self.stats.exchange_ms = Some(b.elapsed().as_secs_f64() * 1e3);
        }
    }

    /// Lets the messages in flight get out, evaluates the final model, writes the summary and
    /// stops the functions.
    async fn finish(mut self, mut node: Node, ending: Ending) -> Result<NodeSummary, NodeError> {
        // Linger briefly so state requests and gradients in flight to slower peers get out.
        let linger = Instant::now();
        while !self.links.is_idle() && linger.elapsed() < Duration::from_secs(5) {
            for ev in node.next_net_events(Duration::from_millis(50)).await {
                self.on_net(&mut node, ev);
            }
        }
        let diverged = ending == Ending::Diverged;
        let rounds = self.machine.round();
        let (test_loss, test_accuracy) = node.evaluate(rounds, self.replica.params(), diverged).await?;
        self.work.write_ledger(&node.file.node.dir)?;
        let outcome = Outcome {
            completed: self.completed,
            diverged,
            rounds,
            test_accuracy,
            test_loss,
            params: Some(self.replica.params().as_slice()),
            samples: self.samples,
        };
        let summary = node.summary(outcome, self.work.counters());
        node.finish(&summary)?;
        self.work.shutdown().await;
        Ok(summary)
    }
}

impl Role for Peer {
    type Input = Input;
    const IDLE: Duration = Duration::from_millis(500);

    fn tick() -> Input {
        Input::Tick
    }

    fn next_timer(&self) -> Option<u64> {
        match (self.machine.next_timer(), self.links.next_beat()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn round(&self) -> u64 {
        self.machine.round()
    }

    fn step(&mut self, node: &mut Node, input: Input) -> Result<Vec<Input>, NodeError> {
        let now = node.now_ms();
        let mut fed_back = Vec::new();
        // What the heartbeats found goes first: after a pause of this process, its waits are
        // extended before the backlog of messages is taken in.
        for input in self.links.beat(&mut node.net, now).into_iter().chain([input]) {
            for action in self.machine.handle(now, input) {
                self.carry_out(node, action, &mut fed_back)?;
            }
        }
        if self.machine.is_done() {
            self.links.stop_beats();
        }
        self.note_exchange();
        Ok(fed_back)
    }

    fn on_net(&mut self, node: &mut Node, ev: NetEvent) -> Option<Input> {
        let input = self.links.input(node, ev);
        self.note_exchange();
        if let Some(Input::Gradient(from, g)) = &input
            && g.round >= self.machine.round()
        {
            self.behind.insert((g.round, *from), g.samples);
        }
        input
    }

    fn on_computed(&mut self, node: &mut Node, r: LocalResult) -> Option<Input> {
        self.stats.compute_ms = self.work.elapsed_ms();
        self.stats.local_ready = Some(Instant::now());
        self.stats.loss = r.loss;
        self.stats.samples = r.samples;
        self.stats.gather_ms = r.gather_ms;
        self.samples += r.samples;
        self.behind.insert((r.round, node.me), r.samples);
        let (round, digest) = (r.round, r.digest);
        let (grad, msg) = self.work.outgoing.message(r, &mut node.files, node.me, &mut self.replica.feedback);
        self.previous = self.mine.replace((round, Bytes::from(msg)));
        Some(Input::LocalGradient { round, digest, grad })
    }

    fn before_wait(&mut self, node: &mut Node) {
        self.links.redial(&mut node.net);
    }

    fn is_done(&self) -> bool {
        self.machine.is_done() && self.links.is_idle()
    }
}
