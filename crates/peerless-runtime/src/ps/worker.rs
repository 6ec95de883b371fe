//! A PS worker's driver: carries out the core worker machine's actions (dial, fetch, compute
//! through the functions, push) on the network and the function backend, and feeds it what
//! happens. The protocol (what to do next, backoff, never pushing twice) is
//! `peerless_core::worker`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use peerless_core::rng::Rng;
use peerless_core::wire::{self, Limits, Message, StateMsg};
use peerless_core::worker::{Worker, WorkerAction, WorkerConfig, WorkerInput};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::{Common, common, write_summary};
use crate::node::{
    Files, GradientBackend, Job, LocalResult, NodeError, NodeLine, NodeRow, Outgoing, unix_ms,
};
use crate::node::{NodeFile, NodeSummary};
use crate::p2p::net::{Behaviour, BehaviourEvent};

/// The worker's link to the PS: the swarm, the requests in flight, the bytes moved.
struct Link {
    swarm: Swarm<Behaviour>,
    ps_id: PeerId,
    ps_addr: Multiaddr,
    limits: Limits,
    /// The fetch in flight.
    asking: Option<OutboundRequestId>,
    /// The push in flight.
    pushing: Option<OutboundRequestId>,
    /// The model the last fetch brought.
    fetched: Option<StateMsg>,
    fetched_at: Instant,
    bytes_in: u64,
    bytes_out: u64,
}

/// The two requests a worker has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Fetch,
    Push,
}

impl Link {
    /// Which request in flight `id` ends (it is no longer in flight), if any.
    fn answered(&mut self, id: OutboundRequestId) -> Option<Request> {
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

    fn send(&mut self, msg: Bytes) -> OutboundRequestId {
        self.bytes_out += msg.len() as u64;
        self.swarm.behaviour_mut().rr.send_request(&self.ps_id, msg)
    }

    /// Turns a swarm event into the machine's input, if it is one.
    fn input(&mut self, ev: SwarmEvent<BehaviourEvent>, files: &mut Files, me: u32) -> Option<WorkerInput> {
        use request_response::{Event, Message as Rr};
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == self.ps_id => {
                files.event(me, json!({ "event": "connected", "to": "ps" }));
                Some(WorkerInput::Connected)
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if peer_id == self.ps_id => {
                files.event(me, json!({ "event": "disconnected", "to": "ps" }));
                Some(WorkerInput::Disconnected)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(Event::Message {
                message: Rr::Response { request_id, response },
                ..
            })) => {
                self.bytes_in += response.len() as u64;
                if self.answered(request_id)? == Request::Push {
                    return Some(WorkerInput::PushEnded);
                }
                match wire::decode(&response, self.limits) {
                    Ok(Message::State(s)) => {
                        let round = s.round;
                        self.fetched = Some(s);
                        Some(WorkerInput::Params { round })
                    }
                    other => {
                        let answer = format!("{other:?}").chars().take(200).collect::<String>();
                        files.event(me, json!({ "event": "fetch_failed", "answer": answer }));
                        Some(WorkerInput::FetchFailed)
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(Event::OutboundFailure {
                request_id, error, ..
            })) => {
                // A push that failed (the PS is gone) is dropped, never re-sent.
                if self.answered(request_id)? == Request::Push {
                    return Some(WorkerInput::PushEnded);
                }
                files.event(me, json!({ "event": "fetch_failed", "error": error.to_string() }));
                Some(WorkerInput::FetchFailed)
            }
            _ => None,
        }
    }
}

/// Everything the worker's driver carries out actions with.
struct Driver {
    me: u32,
    link: Link,
    files: Files,
    /// The gradient work, as a template (round, parameters and batches filled in per round).
    job: Job,
    sampler: Arc<crate::p2p::sampler::Sampler>,
    outgoing: Outgoing,
    backend: Arc<GradientBackend>,
    prices: peerless_core::cost::Prices,
    tx: mpsc::Sender<Result<LocalResult, NodeError>>,
    /// The gradient computed last, until the machine pushes or drops it.
    computed: Option<LocalResult>,
    compute_start: Instant,
    samples: u64,
    rpe: u64,
    t0: Instant,
}

impl Driver {
    /// Carries out one of the machine's actions.
    fn carry_out(&mut self, action: WorkerAction) {
        match action {
            WorkerAction::Dial => {
                let _ = self.link.swarm.dial(self.link.ps_addr.clone());
            }
            WorkerAction::Fetch { round } => {
                let msg = Bytes::from(wire::encode(&Message::ParamsRequest { round }));
                self.link.asking = Some(self.link.send(msg));
                self.link.fetched_at = Instant::now();
            }
            WorkerAction::Compute { round, batches_at } => self.compute(round, batches_at),
            WorkerAction::Push { .. } => {
                let r = self.computed.take().expect("invariant: the machine pushes what was computed");
                let (_, msg) = self.outgoing.message(r, &mut self.files, self.me);
                // Pushed once; if the PS is gone, this round's work is dropped, never re-sent.
                self.link.pushing = Some(self.link.send(Bytes::from(msg)));
            }
            WorkerAction::Drop { .. } => self.computed = None,
            WorkerAction::Finished => {}
        }
    }

    /// Starts the gradient work on the model the last fetch brought.
    fn compute(&mut self, round: u64, batches_at: u64) {
        let s = self.link.fetched.take().expect("invariant: a fetch brought the model to compute on");
        let wait_ms = self.link.fetched_at.elapsed().as_secs_f64() * 1e3;
        self.files.event(self.me, json!({ "event": "fetched", "round": round, "wait_ms": wait_ms }));
        self.compute_start = Instant::now();
        Job {
            round,
            params: Arc::new(s.params),
            batches: self.sampler.batches(self.me, batches_at),
            flip_labels: self.outgoing.flips_labels(round),
            ..self.job.clone()
        }
        .spawn(self.tx.clone());
    }

    /// Takes in a finished gradient; returns the machine's input and the row it will fill.
    fn computed(&mut self, r: LocalResult) -> (WorkerInput, NodeRow) {
        self.samples += r.samples;
        let row = NodeRow {
            train_loss: Some(r.loss),
            samples: Some(r.samples),
            compute_ms: Some(self.compute_start.elapsed().as_secs_f64() * 1e3),
            gather_ms: r.gather_ms,
            ..NodeRow::default()
        };
        let input = WorkerInput::Computed { round: r.round };
        self.computed = Some(r);
        (input, row)
    }

    /// Writes `row` once the machine took its gradient in: where the worker now is, the bytes
    /// and invocations so far.
    fn write_row(&mut self, row: NodeRow, position: u64) {
        let inv = self.backend.summary();
        let wall_ms = self.t0.elapsed().as_millis() as u64;
        self.files.metrics(&NodeRow {
            t_ms: unix_ms(),
            node: self.me,
            round: position,
            epoch: position as f64 / self.rpe as f64,
            wall_s: self.t0.elapsed().as_secs_f64(),
            bytes_in: self.link.bytes_in,
            bytes_out: self.link.bytes_out,
            invocations: Some(inv.invocations),
            cold_starts: Some(inv.cold_starts),
            retries: Some(inv.retries),
            cost_pico: Some(inv.cost_pico + self.prices.node_pico(wall_ms)),
            ..row
        });
    }

    /// The worker's summary at the end.
    fn summary(&self, worker: &Worker, peer_id: String) -> NodeSummary {
        let wall = self.t0.elapsed().as_secs_f64();
        let inv = self.backend.summary();
        NodeSummary {
            peer: self.me,
            peer_id,
            completed: worker.is_done(),
            diverged: false,
            rounds: worker.position(),
            test_accuracy: 0.0,
            test_loss: 0.0,
            param_digest: String::new(),
            wall_time_s: wall,
            samples: self.samples,
            invocations: inv.invocations,
            cold_starts: inv.cold_starts,
            retries: inv.retries,
            function_cost_pico: inv.cost_pico,
            node_cost_pico: self.prices.node_pico((wall * 1e3) as u64),
            bytes_in: self.link.bytes_in,
            bytes_out: self.link.bytes_out,
            refused: 0,
        }
    }
}

/// Runs one worker until the PS publishes the last version (or `stop`).
pub async fn run_worker(
    file: NodeFile,
    command: crate::function::FunctionCommand,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let run = file.run.clone();
    let Common { me, my_id, ids, swarm, split, model, sampler, total, vpr, rpe, mut files, data_dir } =
        common(&file, data_dir).await?;
    let ps_addr: Multiaddr = file
        .peer
        .bootstrap
        .first()
        .ok_or_else(|| NodeError::Config("peer.bootstrap must hold the PS address".into()))?
        .parse()
        .map_err(|e| NodeError::Config(format!("peer.bootstrap: {e}")))?;
    let link = Link {
        swarm,
        ps_id: *ids.last().expect("the PS id"),
        ps_addr,
        limits: Limits { params: model.num_params() },
        asking: None,
        pushing: None,
        fetched: None,
        fetched_at: Instant::now(),
        bytes_in: 0,
        bytes_out: 0,
    };
    let backend = Arc::new(GradientBackend::start(&run, me, command).await?);
    let job = Job::template(&run, me, model.clone(), split.clone(), backend.clone(), data_dir.clone());
    let prices = run.function.prices.prices().map_err(|e| NodeError::Config(e.to_string()))?;
    files.event(me, json!({ "event": "start", "role": "worker", "peer_id": my_id.to_string() }));
    NodeLine::Ready { ready: me }.print();
    let (tx, mut rx) = mpsc::channel::<Result<LocalResult, NodeError>>(2);
    let cfg = WorkerConfig {
        me,
        total_rounds: total,
        asynchronous: run.ps.mode == crate::config::PsModeName::Async,
        versions_per_round: vpr,
        dial_every_ms: 1_000,
    };
    let mut worker = Worker::new(cfg, Rng::derive(run.seed, "worker-backoff", u64::from(me)));
    let outgoing = Outgoing::new(file.peer.attack, run.seed, me);
    let t0 = Instant::now();
    let mut d = Driver {
        me,
        link,
        files,
        job,
        sampler,
        outgoing,
        backend,
        prices,
        tx,
        computed: None,
        compute_start: t0,
        samples: 0,
        rpe,
        t0,
    };
    // The row of the gradient computed last, written once the machine took it in.
    let mut row: Option<NodeRow> = None;
    let mut input = WorkerInput::Tick;
    loop {
        for action in worker.handle(t0.elapsed().as_millis() as u64, input) {
            d.carry_out(action);
        }
        if let Some(r) = row.take() {
            d.write_row(r, worker.position());
        }
        if worker.is_done() {
            break;
        }
        input = tokio::select! {
            ev = d.link.swarm.select_next_some() => match d.link.input(ev, &mut d.files, me) {
                Some(i) => i,
                None => continue,
            },
            Some(res) = rx.recv() => {
                let (i, r) = d.computed(res?);
                row = Some(r);
                i
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => WorkerInput::Tick,
            _ = stop.changed() => break,
        };
    }
    d.backend.write_ledger(&file.peer.dir)?;
    let summary = d.summary(&worker, my_id.to_string());
    d.files.event(me, json!({ "event": "finish", "round": worker.next_version() }));
    write_summary(&file.peer.dir, &summary)?;
    drop(d.job);
    if let Ok(b) = Arc::try_unwrap(d.backend) {
        b.shutdown().await;
    }
    Ok(summary)
}
