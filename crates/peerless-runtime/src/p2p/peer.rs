//! The peer process: one event loop that owns the swarm, the round machine, the model replica
//! and the optimizer, and hands gradient work to functions (or, `compute = "local"`, to a
//! blocking thread of its own).
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

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use peerless_core::flat::digest;
use peerless_core::optim::Optimizer;
use peerless_core::p2p::{Action, DeadlinePolicy, Input, PeerIdx, Round, RoundConfig, Start};
use peerless_core::wire::{self, Limits, Message, StateMsg};
use peerless_ml::{Model, ModelSpec, Split};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use super::net::{self, Behaviour, BehaviourEvent};
use super::sampler::Sampler;
use crate::checkpoint::Checkpoint;
use crate::function::FunctionCommand;
use crate::node::{NodeFile, NodeSummary};

pub use crate::node::NodeError;
use crate::node::{
    Files, GradientBackend, Job, LocalResult, NodeLine, NodeRow, Outgoing, Progress, io_err, unix_ms,
};

/// Per-round timings and counters, reset when a row is written.
#[derive(Debug, Default)]
struct RoundStats {
    compute_start: Option<Instant>,
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

/// Runs one peer until training is over (or `stop` is set, or `halt_at_round` is reached).
pub async fn run(
    file: NodeFile,
    command: FunctionCommand,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let run = &file.run;
    let me = file.peer.index;
    let p2p = &run.p2p;
    let dir = file.peer.dir.clone();
    let mut files = Files::open(&dir)?;

    // Identity and allow-list.
    let allow: Vec<PeerId> = if file.peer.allow.is_empty() {
        if p2p.secret.is_empty() {
            return Err(NodeError::Config("p2p.secret is empty and peer.allow lists no peer ids".into()));
        }
        (0..p2p.peers).map(|i| net::derive_peer_id(&p2p.secret, i)).collect()
    } else {
        file.peer
            .allow
            .iter()
            .map(|s| s.parse::<PeerId>().map_err(|e| NodeError::Config(format!("peer.allow: {s:?}: {e}"))))
            .collect::<Result<_, _>>()?
    };
    let key_path = dir.join("identity.key");
    let keypair = net::load_or_save_keypair(&key_path, net::derive_keypair(&p2p.secret, me))
        .map_err(io_err(&key_path))?;
    let my_id = keypair.public().to_peer_id();
    let index_of: HashMap<PeerId, PeerIdx> =
        allow.iter().enumerate().map(|(i, p)| (*p, i as PeerIdx)).collect();
    if index_of.get(&my_id) != Some(&me) {
        tracing::warn!(peer = me, id = %my_id, "this peer's id is not on the run's allow-list at its index");
    }

    // Data, model, optimizer.
    let data_dir = if run.data.dir.as_os_str().is_empty() { data_dir } else { run.data.dir.clone() };
    let split: Arc<Split> = Arc::new(peerless_ml::data::load(run.data.dataset, &data_dir)?);
    let spec = ModelSpec {
        hidden: run.model.hidden.clone(),
        ..ModelSpec::new(run.model.arch, split.train.shape, split.train.classes)
    };
    let model = Arc::new(Model::new(spec, run.model.backend)?);
    let n_params = model.num_params();
    let limits = Limits { params: n_params };
    let sampler = Arc::new(Sampler::new(
        split.train.len(),
        p2p.peers,
        p2p.functions_per_peer,
        run.train.batch_size,
        run.seed,
    ));
    let rpe = sampler.rounds_per_epoch();
    let total = if run.train.rounds > 0 { run.train.rounds } else { u64::from(run.train.epochs) * rpe };
    let mut optimizer = Optimizer::new(run.optimizer.clone(), n_params)?;
    let ck_path = dir.join("checkpoint.safetensors");
    let own = match Checkpoint::read(&ck_path) {
        Ok(ck) if ck.model == model.id() && ck.layout == model.layout().fingerprint() => Some(ck),
        Ok(ck) => {
            return Err(NodeError::Config(format!(
                "{} holds a checkpoint of model {}, not {}",
                ck_path.display(),
                ck.model,
                model.id()
            )));
        }
        Err(_) => None,
    };
    let mut params = model.init(run.seed);
    let start = match (&own, file.peer.join) {
        (Some(ck), join) => {
            params = ck.params.clone();
            optimizer.load_state(ck.optimizer.clone())?;
            if join { Start::Join { own: Some(ck.round) } } else { Start::Fresh { round: ck.round } }
        }
        (None, true) => Start::Join { own: None },
        (None, false) => Start::Fresh { round: 0 },
    };

    // Gradient backend.
    let backend = GradientBackend::start(run, me, command).await?;
    let prices = run.function.prices.prices().map_err(|e| NodeError::Config(e.to_string()))?;

    // Network.
    let request_timeout = Duration::from_millis(3 * p2p.deadline_ceiling_ms + p2p.start_timeout_ms);
    let mut swarm =
        net::build_swarm(keypair, &allow, request_timeout).map_err(|e| NodeError::Network(e.to_string()))?;
    let listen: Multiaddr =
        file.peer.listen.parse().map_err(|e| NodeError::Config(format!("peer.listen: {e}")))?;
    swarm.listen_on(listen).map_err(|e| NodeError::Network(format!("listen: {e}")))?;
    let bootstrap: Vec<Multiaddr> = file
        .peer
        .bootstrap
        .iter()
        .map(|a| a.parse().map_err(|e| NodeError::Config(format!("peer.bootstrap {a:?}: {e}"))))
        .collect::<Result<_, _>>()?;

    let cfg = RoundConfig {
        me,
        members: (0..p2p.peers).collect(),
        total_rounds: total,
        checkpoint_every: run.train.checkpoint_every,
        deadline: DeadlinePolicy {
            floor_ms: p2p.deadline_floor_ms,
            ceiling_ms: p2p.deadline_ceiling_ms,
            factor: p2p.deadline_factor,
        },
        start_timeout_ms: p2p.start_timeout_ms,
    };
    let t0 = Instant::now();
    let now_ms = |t0: Instant| t0.elapsed().as_millis() as u64;
    let mut machine = Round::new(cfg, start, 0);
    files.event(me, json!({ "event": "start", "peer_id": my_id.to_string(), "total_rounds": total, "rounds_per_epoch": rpe, "start": format!("{start:?}") }));
    tracing::info!(peer = me, id = %my_id, total, "peer starting");
    NodeLine::Ready { ready: me }.print();

    let aggregator = run.p2p.aggregator.build();
    let (tx, mut rx) = mpsc::channel::<Result<LocalResult, NodeError>>(4);
    let (eval_tx, mut eval_rx) = mpsc::channel::<(u64, f32, f32)>(4);
    let mut net_state = NetState { index_of, swarm_ids: allow.clone(), ..NetState::default() };
    let mut stats = RoundStats::default();
    let mut agg = vec![0f32; n_params];
    let mut samples_total = 0u64;
    let mut completed = false;
    let mut diverged = false;
    let mut pending_eval: Option<(u64, f32, f32)> = None;
    let mut last_dial = Instant::now() - Duration::from_secs(10);
    let mut invoker_before = crate::function::metrics::Summary::default();
    let backend = Arc::new(backend);
    let job = Job::template(run, me, model.clone(), split.clone(), backend.clone(), data_dir.clone());
    let mut actions: Vec<Action> = Vec::new();
    let mut my_msg: Option<(u64, Bytes)> = None;
    let mut outgoing = Outgoing::new(file.peer.attack, run.seed, me);
    // Let the machine start without waiting for a first network event (a lone peer has none).
    net_state.queued.push(Input::Tick);

    loop {
        // Redial peers we are not connected to, once a second.
        if last_dial.elapsed() >= Duration::from_secs(1) {
            last_dial = Instant::now();
            for a in &bootstrap {
                if !net_state.connected_addrs.contains(a) {
                    let _ = swarm.dial(a.clone());
                }
            }
        }
        let timer = machine.next_timer().map(|t| t0 + Duration::from_millis(t));
        let sleep_until = timer.unwrap_or_else(|| Instant::now() + Duration::from_millis(500));
        let input: Option<Input> = tokio::select! {
            ev = swarm.select_next_some() => {
                net_state.on_swarm_event(ev, &mut swarm, &mut files, me, limits)
            }
            Some(res) = rx.recv() => {
                let r = match res {
                    Err(NodeError::Diverged { round, reason }) => {
                        tracing::error!(peer = me, round, %reason, "the model diverged; training stops");
                        files.event(me, json!({ "event": "diverged", "round": round, "reason": reason }));
                        diverged = true;
                        break;
                    }
                    r => r?,
                };
                stats.compute_ms = stats.compute_start.map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
                stats.local_ready = Some(Instant::now());
                stats.loss = r.loss;
                stats.samples = r.samples;
                stats.gather_ms = r.gather_ms;
                samples_total += r.samples;
                let (round, digest) = (r.round, r.digest);
                let (grad, msg) = outgoing.message(r, &mut files, me);
                my_msg = Some((round, Bytes::from(msg)));
                Some(Input::LocalGradient { round, digest, grad })
            }
            Some(e) = eval_rx.recv() => {
                files.event(me, json!({ "event": "eval", "round": e.0, "test_loss": e.1, "test_accuracy": e.2 }));
                pending_eval = Some(e);
                None
            }
            _ = tokio::time::sleep_until(sleep_until.into()) => Some(Input::Tick),
            _ = stop.changed() => {
                files.event(me, json!({ "event": "stop", "round": machine.round(), "reason": "interrupted" }));
                break;
            }
        };
        let mut inputs: Vec<Input> = input.into_iter().collect();
        // Carrying out actions may queue inputs (a failed send, the final digest): feed them
        // back at once.
        while !inputs.is_empty() || !net_state.queued.is_empty() {
            inputs.append(&mut net_state.queued);
            for input in inputs.drain(..) {
                actions.extend(machine.handle(now_ms(t0), input));
            }
            for action in actions.drain(..) {
                match action {
                    Action::Compute { round, view } => {
                        stats = RoundStats { compute_start: Some(Instant::now()), ..RoundStats::default() };
                        let batches = sampler.assignment(me, round, &view, p2p.takeover);
                        let flip_labels = outgoing.flips_labels(round);
                        Job { round, params: Arc::new(params.clone()), batches, flip_labels, ..job.clone() }
                            .spawn(tx.clone());
                    }
                    Action::Broadcast { round, to } => {
                        if let Some((r, bytes)) = &my_msg
                            && *r == round
                        {
                            stats.broadcast_at = Some(Instant::now());
                            stats.round = Some(round);
                            stats.acks_pending = 0;
                            for p in to {
                                if net_state.send(&mut swarm, p, bytes.clone(), Pending::Gradient(round)) {
                                    stats.acks_pending += 1;
                                }
                            }
                        }
                    }
                    Action::Apply { round, inputs } => {
                        let wait_ms = stats.local_ready.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                        let t = Instant::now();
                        let refs: Vec<&[f32]> = inputs.iter().map(|(_, g)| g.as_slice()).collect();
                        aggregator
                            .aggregate(&refs, &mut agg)
                            .map_err(|e| NodeError::Compute { round, reason: e.to_string() })?;
                        let aggregate_ms = t.elapsed().as_secs_f64() * 1e3;
                        let t = Instant::now();
                        optimizer.step(&mut params, &agg)?;
                        let update_ms = t.elapsed().as_secs_f64() * 1e3;
                        let done = round + 1;
                        // Evaluation: the lowest-indexed contributor evaluates, off the event loop.
                        let eval_now = match run.train.eval_every {
                            0 => done % rpe == 0,
                            k => done % k == 0,
                        };
                        if eval_now && done < total && inputs.first().map(|(p, _)| *p) == Some(me) {
                            let (model, split, p, tx) =
                                (model.clone(), split.clone(), params.clone(), eval_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                if let Ok((l, a)) = model.evaluate(&p, &split.test) {
                                    let _ = tx.blocking_send((done, l, a));
                                }
                            });
                        }
                        let inv = backend.summary();
                        let node_pico = prices.node_pico(t0.elapsed().as_millis() as u64);
                        let ev = pending_eval.take();
                        files.metrics(&NodeRow {
                            t_ms: unix_ms(),
                            node: me,
                            round: done,
                            epoch: done as f64 / rpe as f64,
                            wall_s: t0.elapsed().as_secs_f64(),
                            train_loss: Some(stats.loss),
                            view: Some(machine.expected().len() + 1),
                            contributors: Some(inputs.len()),
                            samples: Some(stats.samples),
                            bytes_in: net_state.bytes_in,
                            bytes_out: net_state.bytes_out,
                            invocations: Some(inv.invocations - invoker_before.invocations),
                            cold_starts: Some(inv.cold_starts - invoker_before.cold_starts),
                            retries: Some(inv.retries - invoker_before.retries),
                            compute_ms: Some(stats.compute_ms),
                            wait_ms: Some(wait_ms),
                            exchange_ms: stats.exchange_ms,
                            aggregate_ms: Some(aggregate_ms),
                            update_ms: Some(update_ms),
                            cost_pico: Some(inv.cost_pico + node_pico),
                            eval_round: ev.map(|e| e.0),
                            test_loss: ev.map(|e| e.1),
                            test_accuracy: ev.map(|e| e.2),
                            staleness: Some(0),
                            gather_ms: stats.gather_ms,
                            effective_f: Some(aggregator.effective_f(inputs.len())),
                        });
                        invoker_before = inv;
                        if file.peer.progress {
                            NodeLine::Progress(Progress {
                                peer: me,
                                round: done,
                                total,
                                loss: Some(stats.loss),
                                view: machine.expected().len() + 1,
                                test_accuracy: ev.map(|e| e.2),
                            })
                            .print();
                        }
                        if file.peer.halt_at_round.is_some_and(|h| done >= h) {
                            files.event(me, json!({ "event": "halt", "round": done }));
                            // Like a crash: no goodbye, no final checkpoint.
                            std::process::exit(3);
                        }
                    }
                    Action::Checkpoint { round } => {
                        let ck = Checkpoint {
                            model: model.id(),
                            layout: model.layout().fingerprint(),
                            round,
                            epoch: round / rpe,
                            params: params.clone(),
                            optimizer: optimizer.state(),
                            rng: [0; 4],
                            wall_s: t0.elapsed().as_secs_f64(),
                        };
                        ck.save(&ck_path)?;
                        files.event(me, json!({ "event": "checkpoint", "round": round }));
                    }
                    Action::ServeState { to, round } => {
                        let msg = Bytes::from(wire::encode(&Message::State(StateMsg {
                            round,
                            digest: digest(&params),
                            params: params.clone(),
                            optimizer: optimizer.state(),
                        })));
                        for p in to {
                            net_state.respond_state(&mut swarm, p, msg.clone());
                            files.event(me, json!({ "event": "served_state", "to": p, "round": round }));
                        }
                    }
                    Action::RefuseState { to, reason } => {
                        let msg = Bytes::from(wire::encode(&Message::Refused { reason }));
                        net_state.respond_state(&mut swarm, to, msg);
                    }
                    Action::RequestState { from } => {
                        let msg = Bytes::from(wire::encode(&Message::StateRequest));
                        if !net_state.send(&mut swarm, from, msg, Pending::State) {
                            net_state.queued.push(Input::StateFailed(from));
                        }
                    }
                    Action::Adopt(state) => {
                        params = state.params;
                        optimizer.load_state(state.optimizer)?;
                        files.event(me, json!({ "event": "adopted", "round": state.round, "digest": state.digest.to_string() }));
                    }
                    Action::AnnounceJoin { round, to } => {
                        let msg = Bytes::from(wire::encode(&Message::Join { round }));
                        for p in to {
                            net_state.send(&mut swarm, p, msg.clone(), Pending::Other);
                        }
                    }
                    Action::Event(e) => {
                        let v = serde_json::to_value(&e).unwrap_or_default();
                        files.event(me, v);
                    }
                    Action::Finalize { .. } => net_state.queued.push(Input::FinalDigest(digest(&params))),
                    Action::AnnounceFinal { round, digest, to } => {
                        let msg = Bytes::from(wire::encode(&Message::Final { round, digest }));
                        for p in to {
                            net_state.send(&mut swarm, p, msg.clone(), Pending::Other);
                        }
                    }
                    Action::Finished { round } => {
                        completed = true;
                        tracing::info!(peer = me, round, "training finished");
                    }
                }
            }
        }
        // Exchange time: broadcast until every recipient acknowledged.
        if let (Some(b), None, Some(r)) = (stats.broadcast_at, stats.exchange_ms, stats.round)
            && net_state.take_acks(r, &mut stats.acks_pending)
        {
            stats.exchange_ms = Some(b.elapsed().as_secs_f64() * 1e3);
        }
        if machine.is_done() && net_state.outbound.is_empty() {
            break;
        }
    }

    // Linger briefly so state requests and gradients in flight to slower peers get out.
    let linger = Instant::now();
    while !net_state.outbound.is_empty() && linger.elapsed() < Duration::from_secs(5) {
        tokio::select! {
            ev = swarm.select_next_some() => { net_state.on_swarm_event(ev, &mut swarm, &mut files, me, limits); }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }

    let wall_time_s = t0.elapsed().as_secs_f64();
    let (test_loss, test_accuracy) = {
        let (m, s, p) = (model.clone(), split.clone(), params.clone());
        let evaluated = tokio::task::spawn_blocking(move || m.evaluate(&p, &s.test))
            .await
            .map_err(|e| NodeError::Compute { round: machine.round(), reason: e.to_string() })?;
        match evaluated {
            Ok(v) => v,
            // A diverged model may not even evaluate: its accuracy is chance, its loss unknown.
            Err(e) if diverged => {
                tracing::warn!(peer = me, error = %e, "the diverged model does not evaluate");
                (f32::NAN, 1.0 / split.test.classes as f32)
            }
            Err(e) => return Err(e.into()),
        }
    };
    backend.write_ledger(&dir)?;
    let inv = backend.summary();
    let summary = NodeSummary {
        peer: me,
        peer_id: my_id.to_string(),
        completed,
        diverged,
        rounds: machine.round(),
        test_accuracy,
        test_loss,
        param_digest: digest(&params).to_string(),
        wall_time_s,
        samples: samples_total,
        invocations: inv.invocations,
        cold_starts: inv.cold_starts,
        retries: inv.retries,
        function_cost_pico: inv.cost_pico,
        node_cost_pico: prices.node_pico((wall_time_s * 1e3) as u64),
        bytes_in: net_state.bytes_in,
        bytes_out: net_state.bytes_out,
        refused: net_state.refused,
    };
    files.event(me, json!({ "event": "finish", "round": summary.rounds, "test_accuracy": test_accuracy, "digest": summary.param_digest }));
    let sp = dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("invariant: summary serializes");
    crate::checkpoint::write_atomic(&sp, text.as_bytes()).map_err(io_err(&sp))?;
    if let Ok(b) = Arc::try_unwrap(backend) {
        b.shutdown().await;
    }
    Ok(summary)
}

/// What an outbound request was.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    Gradient(u64),
    State,
    Other,
}

/// Network bookkeeping of the event loop.
#[derive(Default)]
struct NetState {
    index_of: HashMap<PeerId, PeerIdx>,
    swarm_ids: Vec<PeerId>,
    connections: HashMap<PeerId, usize>,
    connected_addrs: Vec<Multiaddr>,
    addr_of: HashMap<PeerId, Multiaddr>,
    outbound: HashMap<OutboundRequestId, (PeerIdx, Pending)>,
    state_channels: BTreeMap<PeerIdx, Vec<ResponseChannel<Bytes>>>,
    /// Rounds of the gradient acknowledgements received since last asked.
    acks: Vec<u64>,
    queued: Vec<Input>,
    bytes_in: u64,
    bytes_out: u64,
    refused: u64,
}

impl NetState {
    fn send(&mut self, swarm: &mut Swarm<Behaviour>, to: PeerIdx, bytes: Bytes, kind: Pending) -> bool {
        let Some(id) = self.swarm_ids.get(to as usize).copied() else { return false };
        if !swarm.is_connected(&id) {
            return false;
        }
        self.bytes_out += bytes.len() as u64;
        let rid = swarm.behaviour_mut().rr.send_request(&id, bytes);
        self.outbound.insert(rid, (to, kind));
        true
    }

    fn respond_state(&mut self, swarm: &mut Swarm<Behaviour>, to: PeerIdx, bytes: Bytes) {
        if let Some(chs) = self.state_channels.get_mut(&to)
            && let Some(ch) = chs.pop()
        {
            self.bytes_out += bytes.len() as u64;
            let _ = swarm.behaviour_mut().rr.send_response(ch, bytes);
        }
    }

    /// Consumes the acknowledgements of `round`'s gradient; true when none is pending.
    fn take_acks(&mut self, round: u64, pending: &mut usize) -> bool {
        let n = self.acks.iter().filter(|&&r| r == round).count();
        self.acks.clear();
        *pending = pending.saturating_sub(n);
        *pending == 0
    }

    fn on_swarm_event(
        &mut self,
        ev: SwarmEvent<BehaviourEvent>,
        swarm: &mut Swarm<Behaviour>,
        files: &mut Files,
        me: PeerIdx,
        limits: Limits,
    ) -> Option<Input> {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(peer = me, %address, "listening");
                files.event(me, json!({ "event": "listening", "address": address.to_string() }));
                None
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                let idx = *self.index_of.get(&peer_id)?;
                let n = self.connections.entry(peer_id).or_default();
                *n += 1;
                if endpoint.is_dialer() {
                    let a = endpoint.get_remote_address().clone();
                    self.addr_of.insert(peer_id, a.clone());
                    if !self.connected_addrs.contains(&a) {
                        self.connected_addrs.push(a);
                    }
                }
                (*n == 1).then(|| {
                    files.event(
                        me,
                        json!({ "event": "connected", "to": idx, "peer_id": peer_id.to_string() }),
                    );
                    Input::Connected(idx)
                })
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } => {
                let idx = *self.index_of.get(&peer_id)?;
                self.connections.insert(peer_id, num_established as usize);
                if num_established == 0 {
                    if let Some(a) = self.addr_of.remove(&peer_id) {
                        self.connected_addrs.retain(|x| *x != a);
                    }
                    self.state_channels.remove(&idx);
                    files.event(me, json!({ "event": "disconnected", "to": idx }));
                    Some(Input::Disconnected(idx))
                } else {
                    None
                }
            }
            SwarmEvent::IncomingConnectionError { error, peer_id, send_back_addr, .. } => {
                if let libp2p::swarm::ListenError::Denied { .. } = error {
                    self.refused += 1;
                    let id = peer_id.map(|p| p.to_string()).unwrap_or_default();
                    tracing::warn!(peer = me, from = %id, addr = %send_back_addr, "refused a connection from a peer not on the allow-list");
                    files.event(me, json!({ "event": "refused", "peer_id": id, "addr": send_back_addr.to_string(), "reason": "not on the allow-list" }));
                }
                None
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(e)) => self.on_rr(e, swarm, files, me, limits),
            _ => None,
        }
    }

    fn on_rr(
        &mut self,
        e: request_response::Event<Bytes, Bytes>,
        swarm: &mut Swarm<Behaviour>,
        files: &mut Files,
        me: PeerIdx,
        limits: Limits,
    ) -> Option<Input> {
        use request_response::{Event, Message as RrMessage};
        match e {
            Event::Message { peer, message: RrMessage::Request { request, channel, .. }, .. } => {
                self.bytes_in += request.len() as u64;
                let Some(&from) = self.index_of.get(&peer) else {
                    let _ = swarm.behaviour_mut().rr.send_response(
                        channel,
                        wire::encode(&Message::Refused { reason: "unknown peer".into() }).into(),
                    );
                    return None;
                };
                match wire::decode(&request, limits) {
                    Ok(Message::StateRequest) => {
                        self.state_channels.entry(from).or_default().push(channel);
                        Some(Input::StateRequested(from))
                    }
                    Ok(msg) => {
                        let _ = swarm
                            .behaviour_mut()
                            .rr
                            .send_response(channel, wire::encode(&Message::Ack).into());
                        match msg {
                            Message::Gradient(g) => Some(Input::Gradient(from, g)),
                            Message::Join { round } => Some(Input::Join(from, round)),
                            Message::Final { round, digest } => Some(Input::Final(from, round, digest)),
                            _ => None,
                        }
                    }
                    Err(err) => {
                        tracing::warn!(peer = me, from, %err, "rejected a malformed message");
                        files.event(
                            me,
                            json!({ "event": "rejected", "from": from, "error": err.to_string() }),
                        );
                        let reason = format!("rejected: {err}");
                        let _ = swarm
                            .behaviour_mut()
                            .rr
                            .send_response(channel, wire::encode(&Message::Refused { reason }).into());
                        Some(Input::Rejected(from))
                    }
                }
            }
            Event::Message { peer, message: RrMessage::Response { request_id, response }, .. } => {
                self.bytes_in += response.len() as u64;
                let (from, kind) = self.outbound.remove(&request_id)?;
                match kind {
                    Pending::Gradient(r) => {
                        self.acks.push(r);
                        None
                    }
                    Pending::Other => None,
                    Pending::State => match wire::decode(&response, limits) {
                        Ok(Message::State(s)) => {
                            if digest(&s.params) != s.digest {
                                files.event(me, json!({ "event": "rejected", "from": from, "error": "state digest does not match its parameters" }));
                                return Some(Input::StateFailed(from));
                            }
                            Some(Input::State(from, s))
                        }
                        Ok(other) => {
                            tracing::info!(peer = me, from, ?other, "state request not served");
                            Some(Input::StateFailed(from))
                        }
                        Err(err) => {
                            files.event(me, json!({ "event": "rejected", "from": from, "peer_id": peer.to_string(), "error": err.to_string() }));
                            Some(Input::StateFailed(from))
                        }
                    },
                }
            }
            Event::OutboundFailure { request_id, error, .. } => {
                let (to, kind) = self.outbound.remove(&request_id)?;
                tracing::debug!(peer = me, to, %error, "request failed");
                match kind {
                    Pending::State => Some(Input::StateFailed(to)),
                    Pending::Gradient(r) => {
                        self.acks.push(r);
                        None
                    }
                    Pending::Other => None,
                }
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => None,
        }
    }
}
