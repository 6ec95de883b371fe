//! The worker role: carries out the core worker machine's actions (dial, fetch, compute
//! through the functions, push) on the node's network and gradient work, and feeds it what
//! happens. The protocol (what to do next, backoff, never pushing twice) is
//! [`peerless_core::worker`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::Multiaddr;
use peerless_core::compress::ErrorFeedback;
use peerless_core::flat::digest;
use peerless_core::protocol::PeerIdx;
use peerless_core::rng::Rng;
use peerless_core::wire::{Message, ParamsMsg, WireError};
use peerless_core::worker::{Worker as Machine, WorkerAction, WorkerConfig, WorkerInput};

use crate::config::PsModeName;
use crate::function::FunctionCommand;
use crate::node::driver::{Ending, Node, Outcome, Role};
use crate::node::net::{NetEvent, ReqId, frame};
use crate::node::work::{LocalResult, Work};
use crate::node::{NodeError, NodeEvent, NodeLine, NodeRow, NodeSummary};

/// A worker: its machine, its gradient work, its requests to the PS.
pub(crate) struct Worker {
    machine: Machine,
    work: Work,
    /// The PS's node index (after the workers').
    ps: PeerIdx,
    ps_addr: Multiaddr,
    /// The fetch in flight.
    asking: Option<ReqId>,
    /// The push in flight.
    pushing: Option<ReqId>,
    /// The model the last fetch brought.
    fetched: Option<ParamsMsg>,
    fetched_at: Instant,
    /// The gradient computed last, until the machine pushes or drops it.
    computed: Option<LocalResult>,
    /// Its row, written once the machine took it in.
    row: Option<NodeRow>,
    /// Samples computed on in the whole run.
    samples: u64,
    /// What this worker computed but has not pushed (`p2p.compression`); not checkpointed: a
    /// restarted worker starts with nothing left unsent.
    feedback: ErrorFeedback,
}

/// The two requests a worker has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Fetch,
    Push,
}

impl Worker {
    /// The worker of `node`: its gradient work and machine. Prints the ready line.
    pub(crate) async fn start(node: &mut Node, command: FunctionCommand) -> Result<Worker, NodeError> {
        let ps_addr: Multiaddr = node
            .file
            .node
            .bootstrap
            .first()
            .ok_or_else(|| NodeError::Config("node.bootstrap must hold the PS address".into()))?
            .parse()
            .map_err(|e| NodeError::Config(format!("node.bootstrap: {e}")))?;
        let work = Work::start(node, command).await?;
        let run = &node.file.run;
        let vpr = run.ps.versions_per_round(run.cluster.nodes);
        let cfg = WorkerConfig {
            me: node.me,
            total_rounds: node.rounds * vpr,
            asynchronous: run.ps.mode == PsModeName::Async,
            versions_per_round: vpr,
            dial_every_ms: 1_000,
        };
        let machine = Machine::new(cfg, Rng::derive(run.seed, "worker-backoff", u64::from(node.me)));
        let ps = run.cluster.nodes;
        let id = node.my_id.to_string();
        node.event(NodeEvent::Start {
            role: Some("worker".into()),
            peer_id: id,
            total_rounds: None,
            rounds_per_epoch: None,
            start: None,
            round: None,
        });
        NodeLine::Ready { ready: node.me }.print();
        Ok(Worker {
            machine,
            work,
            ps,
            ps_addr,
            asking: None,
            pushing: None,
            fetched: None,
            fetched_at: Instant::now(),
            computed: None,
            row: None,
            samples: 0,
            feedback: ErrorFeedback::new(node.file.run.p2p.compression(), node.model.num_params()),
        })
    }

    /// Carries out one of the machine's actions.
    fn carry_out(&mut self, node: &mut Node, action: WorkerAction) {
        match action {
            WorkerAction::Dial => node.net.dial(&self.ps_addr),
            WorkerAction::Fetch { round } => {
                self.asking = node.net.request(self.ps, frame(&Message::ParamsRequest { round }));
                self.fetched_at = Instant::now();
            }
            WorkerAction::Compute { round, batches_at } => self.compute(node, round, batches_at),
            WorkerAction::Push { .. } => {
                let r = self.computed.take().expect("invariant: the machine pushes what was computed");
                let (_, msg) = self.work.outgoing.message(r, &mut node.files, node.me, &mut self.feedback);
                // Pushed once; if the PS is gone, this round's work is dropped, never re-sent.
                self.pushing = node.net.request(self.ps, Bytes::from(msg));
            }
            WorkerAction::Drop { .. } => self.computed = None,
            WorkerAction::Finished => {}
        }
    }

    /// Starts the gradient work on the model the last fetch brought.
    fn compute(&mut self, node: &mut Node, round: u64, batches_at: u64) {
        let p = self.fetched.take().expect("invariant: a fetch brought the model to compute on");
        let wait_ms = self.fetched_at.elapsed().as_secs_f64() * 1e3;
        node.event(NodeEvent::Fetched { round, wait_ms });
        let batches = node.sampler.batches(node.me, batches_at);
        self.work.spawn(round, std::sync::Arc::new(p.params), None, batches);
    }

    /// Which request in flight `id` ends (it is no longer in flight), if any.
    fn answered(&mut self, id: ReqId) -> Option<Request> {
        if Some(id) == self.pushing {
            self.pushing = None;
            return Some(Request::Push);
        }
        if Some(id) == self.asking {
            self.asking = None;
            return Some(Request::Fetch);
        }
        None
    }

    /// The machine's input for the PS's answer to a fetch: the version it brought, unless it
    /// is not a version or its digest does not match.
    fn fetch_answer(&mut self, node: &mut Node, msg: Result<Message, WireError>) -> WorkerInput {
        match msg {
            Ok(Message::Params(p)) if digest(&p.params) == p.digest => {
                let round = p.round;
                self.fetched = Some(p);
                WorkerInput::Params { round }
            }
            other => {
                let answer = format!("{other:?}").chars().take(200).collect::<String>();
                node.event(NodeEvent::FetchFailed { answer: Some(answer), error: None });
                WorkerInput::FetchFailed
            }
        }
    }

    /// Writes the row of the gradient taken in (`computed`: what its work measured): where
    /// the worker now is, the bytes and invocations so far.
    fn write_row(&mut self, node: &mut Node, computed: NodeRow) {
        let inv = self.work.counters();
        let row = NodeRow {
            train_loss: computed.train_loss,
            samples: computed.samples,
            compute_ms: computed.compute_ms,
            gather_ms: computed.gather_ms,
            invocations: Some(inv.invocations),
            cold_starts: Some(inv.cold_starts),
            retries: Some(inv.retries),
            cost_pico: Some(inv.cost_pico + node.node_pico()),
            ..node.row(self.machine.position(), node.rpe)
        };
        node.files.metrics(&row);
    }

    /// Writes the ledger and the summary, stops the functions.
    pub(crate) async fn finish(self, mut node: Node, ending: Ending) -> Result<NodeSummary, NodeError> {
        self.work.write_ledger(&node.file.node.dir)?;
        let outcome = Outcome {
            completed: self.machine.is_done(),
            diverged: ending == Ending::Diverged,
            rounds: self.machine.position(),
            test_accuracy: 0.0,
            test_loss: 0.0,
            params: None,
            samples: self.samples,
        };
        let summary = node.summary(outcome, self.work.counters());
        node.finish(&summary)?;
        self.work.shutdown().await;
        Ok(summary)
    }
}

impl Role for Worker {
    type Input = WorkerInput;
    const IDLE: Duration = Duration::from_millis(200);

    fn tick() -> WorkerInput {
        WorkerInput::Tick
    }

    fn next_timer(&self) -> Option<u64> {
        None
    }

    fn round(&self) -> u64 {
        self.machine.position()
    }

    fn step(&mut self, node: &mut Node, input: WorkerInput) -> Result<Vec<WorkerInput>, NodeError> {
        for action in self.machine.handle(node.now_ms(), input) {
            self.carry_out(node, action);
        }
        if let Some(row) = self.row.take() {
            self.write_row(node, row);
        }
        Ok(Vec::new())
    }

    fn on_net(&mut self, node: &mut Node, ev: NetEvent) -> Option<WorkerInput> {
        match ev {
            NetEvent::Connected { node: p, first: true, .. } if p == self.ps => Some(WorkerInput::Connected),
            NetEvent::Disconnected { node: p } if p == self.ps => Some(WorkerInput::Disconnected),
            NetEvent::Answer { id, msg } => match self.answered(id)? {
                Request::Push => Some(WorkerInput::PushEnded),
                Request::Fetch => Some(self.fetch_answer(node, msg)),
            },
            NetEvent::Failed { id, error } => match self.answered(id)? {
                // A push that failed (the PS is gone) is dropped, never re-sent.
                Request::Push => Some(WorkerInput::PushEnded),
                Request::Fetch => {
                    node.event(NodeEvent::FetchFailed { answer: None, error: Some(error) });
                    Some(WorkerInput::FetchFailed)
                }
            },
            NetEvent::Request { channel, .. } => {
                node.net.answer(channel, &Message::Refused { reason: "a worker serves no requests".into() });
                None
            }
            NetEvent::Connected { .. } | NetEvent::Disconnected { .. } | NetEvent::LaneLost { .. } => None,
        }
    }

    fn on_computed(&mut self, _node: &mut Node, r: LocalResult) -> Option<WorkerInput> {
        self.samples += r.samples;
        self.row = Some(NodeRow {
            train_loss: Some(r.loss),
            samples: Some(r.samples),
            compute_ms: Some(self.work.elapsed_ms()),
            gather_ms: r.gather_ms,
            ..NodeRow::default()
        });
        let input = WorkerInput::Computed { round: r.round };
        self.computed = Some(r);
        Some(input)
    }

    fn is_done(&self) -> bool {
        self.machine.is_done()
    }
}
