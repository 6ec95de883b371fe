//! The PS role: carries out the parameter-server machine's actions ([`peerless_core::ps::Ps`]:
//! publish a version, apply pushed gradients, checkpoint) on the node's network and replica,
//! and answers the workers' long polls.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use peerless_core::protocol::{DeadlinePolicy, PeerIdx};
use peerless_core::ps::{Ps, PsAction, PsConfig, PsInput};
use peerless_core::wire::{Message, WireError};

use crate::config::PsModeName;
use crate::node::driver::{Node, Outcome, Role};
use crate::node::net::{NetEvent, Reply, frame};
use crate::node::replica::Replica;
use crate::node::work::LocalResult;
use crate::node::{NodeError, NodeEvent, NodeLine, NodeRow, NodeSummary, Progress};

/// The parameter server: its machine, its replica, and the workers' requests.
pub(crate) struct Server {
    machine: Ps,
    replica: Replica,
    asynchronous: bool,
    /// Model versions per synchronous round: 1, or the worker count in asynchronous mode.
    vpr: u64,
    /// Model versions to publish (rounds × versions per round).
    total: u64,
    /// Requests for a version not yet published: (version, channel).
    parked: Vec<(u64, Reply)>,
    /// The version each worker last pushed for (its turn there is used up).
    pushed: HashMap<PeerIdx, u64>,
    /// The newest version, encoded once for every worker.
    published: Option<(u64, Bytes)>,
    /// When the last round closed.
    last_close: Instant,
    /// Workers with an open connection. After the last round the PS stays until each has
    /// hung up (a worker exits once it holds the final answer): counting answers sent is not
    /// enough, since an answer still in flight dies with the connection when the PS exits.
    connected: HashSet<PeerIdx>,
    done_at: Option<Instant>,
    /// The training loss each worker reported with its newest push: (version, loss).
    losses: HashMap<PeerIdx, (u64, f32)>,
}

impl Server {
    /// The PS of `node`: its replica (resumed from its checkpoint if it has one) and machine.
    /// Prints the ready line.
    pub(crate) fn start(node: &mut Node) -> Result<Server, NodeError> {
        let run = &node.file.run;
        let n = run.cluster.nodes;
        let vpr = run.ps.versions_per_round(n);
        let total = node.rounds * vpr;
        let cfg = PsConfig {
            workers: (0..n).collect(),
            total_rounds: total,
            checkpoint_every: run.train.checkpoint_every * vpr,
            deadline: DeadlinePolicy {
                floor_ms: run.cluster.deadline_floor_ms,
                ceiling_ms: run.cluster.deadline_ceiling_ms,
                factor: run.cluster.deadline_factor,
            },
            start_timeout_ms: run.cluster.start_timeout_ms,
            mode: run.ps.mode(),
        };
        let asynchronous = run.ps.mode == PsModeName::Async;
        let (replica, resumed) = Replica::open(node)?;
        if let Some(round) = resumed {
            node.event(NodeEvent::Resume { round });
        }
        let start_round = resumed.unwrap_or(0);
        let id = node.my_id.to_string();
        node.event(NodeEvent::Start {
            role: Some("ps".into()),
            peer_id: id,
            total_rounds: Some(total),
            rounds_per_epoch: None,
            start: None,
            round: Some(start_round),
        });
        NodeLine::Ready { ready: node.me }.print();
        Ok(Server {
            machine: Ps::new(cfg, start_round, 0),
            replica,
            asynchronous,
            vpr,
            total,
            parked: Vec::new(),
            pushed: HashMap::new(),
            published: None,
            last_close: Instant::now(),
            connected: HashSet::new(),
            done_at: None,
            losses: HashMap::new(),
        })
    }

    fn carry_out(&mut self, node: &mut Node, action: PsAction) -> Result<(), NodeError> {
        match action {
            PsAction::Publish { round } => self.publish(node, round),
            PsAction::Apply { round, inputs, staleness } => self.apply(node, round, &inputs, staleness)?,
            PsAction::Checkpoint { round } => {
                self.replica.checkpoint(node, round, round / (node.rpe * self.vpr))?;
                node.event(NodeEvent::Checkpoint { round });
            }
            PsAction::Event(e) => node.machine_event(&e),
            PsAction::Finished { .. } => self.done_at = Some(Instant::now()),
        }
        Ok(())
    }

    /// Publishes version `round`: answers the requests parked for it.
    fn publish(&mut self, node: &mut Node, round: u64) {
        let msg = frame(&Message::Params(self.replica.published(round)));
        let (ready, wait): (Vec<_>, Vec<_>) = self.parked.drain(..).partition(|(r, _)| *r <= round);
        self.parked = wait;
        for (_, ch) in ready {
            node.net.answer_bytes(ch, msg.clone());
        }
        self.published = Some((round, msg));
    }

    /// Aggregates the pushes and updates the model to version `round + 1`; evaluates every
    /// `eval_every` rounds (default: every epoch); writes the row.
    fn apply(
        &mut self,
        node: &mut Node,
        round: u64,
        inputs: &[(PeerIdx, Vec<f32>)],
        staleness: u64,
    ) -> Result<(), NodeError> {
        let applied = self.replica.apply(round, inputs, self.asynchronous)?;
        let done = round + 1;
        let round_ms = self.last_close.elapsed().as_secs_f64() * 1e3;
        self.last_close = Instant::now();
        let reported: Vec<f32> = inputs
            .iter()
            .filter_map(|(w, _)| self.losses.get(w).filter(|(v, _)| *v + staleness == round))
            .map(|(_, l)| *l)
            .collect();
        let loss = reported.iter().sum::<f32>() / reported.len().max(1) as f32;
        let every = match node.file.run.train.eval_every {
            0 => node.rpe,
            k => k,
        } * self.vpr;
        if done.is_multiple_of(every) && done < self.total {
            node.evaluate_later(done, self.replica.params().clone());
        }
        let row = NodeRow {
            train_loss: Some(loss),
            view: Some(self.machine.expected().len()),
            contributors: Some(inputs.len()),
            wait_ms: Some(round_ms),
            aggregate_ms: Some(applied.aggregate_ms),
            update_ms: Some(applied.update_ms),
            staleness: Some(staleness),
            effective_f: Some(applied.effective_f),
            ..node.row(done, node.rpe * self.vpr)
        };
        node.files.metrics(&row);
        let p = Progress {
            node: node.me,
            round: done,
            total: self.total,
            loss: Some(loss),
            view: inputs.len(),
            test_accuracy: None,
        };
        node.progress(p);
        Ok(())
    }

    /// A worker's request: a long poll for a version, or a push.
    fn request(
        &mut self,
        node: &mut Node,
        w: PeerIdx,
        msg: Result<Message, WireError>,
        channel: Reply,
    ) -> Option<PsInput> {
        match msg {
            // Answer at once unless this worker already contributed to the current version
            // (synchronous mode: it then waits for the next one). A worker asking for a
            // version this PS has not reached (it restarted from a checkpoint) gets the
            // current one. Asynchronous mode always answers with the newest version.
            Ok(Message::ParamsRequest { round }) => {
                match &self.published {
                    Some((r, msg)) if self.asynchronous || *r >= round || self.pushed.get(&w) != Some(r) => {
                        node.net.answer_bytes(channel, msg.clone());
                    }
                    _ => self.parked.push((round, channel)),
                }
                None
            }
            Ok(Message::Gradient(g)) => {
                // A stale push (a replay) uses up the worker's turn at the current version,
                // like a valid one.
                let current = self.published.as_ref().map_or(g.round, |(r, _)| g.round.max(*r));
                self.pushed.insert(w, current);
                self.losses.insert(w, (g.round, g.loss));
                node.net.answer(channel, &Message::Ack);
                Some(PsInput::Gradient(w, g))
            }
            Ok(_) => {
                node.net.answer(channel, &Message::Refused { reason: "not a PS request".into() });
                None
            }
            Err(err) => {
                tracing::warn!(worker = w, %err, "rejected a malformed push");
                node.event(NodeEvent::Rejected { from: w, error: err.to_string() });
                // Its turn at this version is used up, and it is not waited for.
                if let Some((r, _)) = &self.published {
                    self.pushed.insert(w, *r);
                }
                node.net.answer(channel, &Message::Refused { reason: format!("rejected: {err}") });
                Some(PsInput::Rejected(w))
            }
        }
    }

    /// Evaluates the final model and writes the summary.
    pub(crate) async fn finish(self, mut node: Node) -> Result<NodeSummary, NodeError> {
        let rounds = self.machine.round();
        let (test_loss, test_accuracy) = node.evaluate(rounds, self.replica.params(), false).await?;
        let outcome = Outcome {
            completed: self.machine.is_done(),
            diverged: false,
            rounds,
            test_accuracy,
            test_loss,
            params: Some(self.replica.params().as_slice()),
            samples: 0,
        };
        let summary = node.summary(outcome, Default::default());
        node.finish(&summary)?;
        Ok(summary)
    }
}

impl Role for Server {
    type Input = PsInput;
    const IDLE: Duration = Duration::from_millis(500);

    fn tick() -> PsInput {
        PsInput::Tick
    }

    fn next_timer(&self) -> Option<u64> {
        self.machine.next_timer()
    }

    fn round(&self) -> u64 {
        self.machine.round()
    }

    fn step(&mut self, node: &mut Node, input: PsInput) -> Result<Vec<PsInput>, NodeError> {
        for action in self.machine.handle(node.now_ms(), input) {
            self.carry_out(node, action)?;
        }
        Ok(Vec::new())
    }

    fn on_net(&mut self, node: &mut Node, ev: NetEvent) -> Option<PsInput> {
        match ev {
            NetEvent::Connected { node: w, first: true, .. } => {
                self.connected.insert(w);
                Some(PsInput::Connected(w))
            }
            NetEvent::Disconnected { node: w } => {
                self.connected.remove(&w);
                Some(PsInput::Disconnected(w))
            }
            NetEvent::Request { from, msg, channel } => self.request(node, from, msg, channel),
            NetEvent::Connected { .. }
            | NetEvent::Answer { .. }
            | NetEvent::Failed { .. }
            | NetEvent::LaneLost { .. } => None,
        }
    }

    fn on_computed(&mut self, _node: &mut Node, _r: LocalResult) -> Option<PsInput> {
        None
    }

    fn is_done(&self) -> bool {
        self.done_at.is_some_and(|t| self.connected.is_empty() || t.elapsed() > Duration::from_secs(5))
    }
}
