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
use crate::p2p::net::{Behaviour, BehaviourEvent};
use crate::p2p::{PeerFile, PeerSummary};

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

impl Link {
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
                if Some(request_id) == self.pushing {
                    self.pushing = None;
                    return Some(WorkerInput::PushEnded);
                }
                if Some(request_id) != self.asking {
                    return None;
                }
                self.asking = None;
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
                if Some(request_id) == self.pushing {
                    // The PS is gone: this gradient is dropped, never re-sent.
                    self.pushing = None;
                    return Some(WorkerInput::PushEnded);
                }
                if Some(request_id) != self.asking {
                    return None;
                }
                self.asking = None;
                files.event(me, json!({ "event": "fetch_failed", "error": error.to_string() }));
                Some(WorkerInput::FetchFailed)
            }
            _ => None,
        }
    }
}

/// Runs one worker until the PS publishes the last version (or `stop`).
pub async fn run_worker(
    file: PeerFile,
    command: crate::function::FunctionCommand,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<PeerSummary, NodeError> {
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
    let mut link = Link {
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
    let t0 = Instant::now();
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
    let mut outgoing = Outgoing::new(file.peer.attack, run.seed, me);
    // The gradient computed last, until the machine pushes or drops it.
    let mut computed: Option<LocalResult> = None;
    let mut samples = 0u64;
    let mut compute_start = Instant::now();
    let now_ms = || t0.elapsed().as_millis() as u64;
    // The metrics of the gradient computed last, written once the machine took it in.
    let mut row: Option<(Option<f64>, f32, u64, f64)> = None;
    let mut input = WorkerInput::Tick;
    loop {
        for action in worker.handle(now_ms(), input) {
            match action {
                WorkerAction::Dial => {
                    let _ = link.swarm.dial(link.ps_addr.clone());
                }
                WorkerAction::Fetch { round } => {
                    link.asking =
                        Some(link.send(Bytes::from(wire::encode(&Message::ParamsRequest { round }))));
                    link.fetched_at = Instant::now();
                }
                WorkerAction::Compute { round, batches_at } => {
                    let s = link.fetched.take().expect("invariant: a fetch brought the model to compute on");
                    let wait_ms = link.fetched_at.elapsed().as_secs_f64() * 1e3;
                    files.event(me, json!({ "event": "fetched", "round": round, "wait_ms": wait_ms }));
                    compute_start = Instant::now();
                    Job {
                        round,
                        params: Arc::new(s.params),
                        batches: sampler.batches(me, batches_at),
                        flip_labels: outgoing.flips_labels(round),
                        ..job.clone()
                    }
                    .spawn(tx.clone());
                }
                WorkerAction::Push { .. } => {
                    let r = computed.take().expect("invariant: the machine pushes what was computed");
                    let (_, msg) = outgoing.message(r, &mut files, me);
                    // Pushed once; if the PS is gone, this round's work is dropped, never re-sent.
                    link.pushing = Some(link.send(Bytes::from(msg)));
                }
                WorkerAction::Drop { .. } => computed = None,
                WorkerAction::Finished => {}
            }
        }
        // A gradient taken in (pushed or dropped): its row records where the worker now is.
        if let Some((gather_ms, loss, r_samples, compute_ms)) = row.take() {
            let inv = backend.summary();
            let position = worker.position();
            files.metrics(&NodeRow {
                t_ms: unix_ms(),
                node: me,
                round: position,
                epoch: position as f64 / rpe as f64,
                wall_s: t0.elapsed().as_secs_f64(),
                train_loss: Some(loss),
                samples: Some(r_samples),
                bytes_in: link.bytes_in,
                bytes_out: link.bytes_out,
                invocations: Some(inv.invocations),
                cold_starts: Some(inv.cold_starts),
                retries: Some(inv.retries),
                compute_ms: Some(compute_ms),
                cost_pico: Some(inv.cost_pico + prices.node_pico(t0.elapsed().as_millis() as u64)),
                gather_ms,
                ..NodeRow::default()
            });
        }
        if worker.is_done() {
            break;
        }
        input = tokio::select! {
            ev = link.swarm.select_next_some() => match link.input(ev, &mut files, me) {
                Some(i) => i,
                None => continue,
            },
            Some(res) = rx.recv() => {
                let r = res?;
                samples += r.samples;
                let compute_ms = compute_start.elapsed().as_secs_f64() * 1e3;
                row = Some((r.gather_ms, r.loss, r.samples, compute_ms));
                let round = r.round;
                computed = Some(r);
                WorkerInput::Computed { round }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => WorkerInput::Tick,
            _ = stop.changed() => break,
        };
    }
    let wall = t0.elapsed().as_secs_f64();
    backend.write_ledger(&file.peer.dir)?;
    let inv = backend.summary();
    let summary = PeerSummary {
        peer: me,
        peer_id: my_id.to_string(),
        completed: worker.is_done(),
        diverged: false,
        rounds: worker.position(),
        test_accuracy: 0.0,
        test_loss: 0.0,
        param_digest: String::new(),
        wall_time_s: wall,
        samples,
        invocations: inv.invocations,
        cold_starts: inv.cold_starts,
        retries: inv.retries,
        function_cost_pico: inv.cost_pico,
        node_cost_pico: prices.node_pico((wall * 1e3) as u64),
        bytes_in: link.bytes_in,
        bytes_out: link.bytes_out,
        refused: 0,
    };
    files.event(me, json!({ "event": "finish", "round": worker.next_version() }));
    write_summary(&file.peer.dir, &summary)?;
    if let Ok(b) = Arc::try_unwrap(backend) {
        b.shutdown().await;
    }
    Ok(summary)
}
