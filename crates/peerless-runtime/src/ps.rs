//! The serverless parameter-server baseline: the PS process and its workers, on the same
//! network, functions, stores, sampler and checkpoints as P2P.
//!
//! The PS is node index `n` (after the `n` workers) of the run's identities. Workers long-poll
//! it for model version `r` ([`Message::ParamsRequest`]), compute their gradient for `r`
//! through their functions (the same batches peer `i` would use in P2P), and push it. When the
//! PS is gone, workers redial every second and re-request with backoff and jitter; a gradient
//! whose push failed is dropped, never re-sent, and the PS drops pushes for any other round than
//! its current one, so nothing is applied twice. A restarted PS resumes from its checkpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use peerless_core::flat::digest;
use peerless_core::optim::{Optimizer, OptimizerState};
use peerless_core::p2p::{DeadlinePolicy, PeerIdx};
use peerless_core::ps::{Ps, PsAction, PsConfig, PsInput};
use peerless_core::wire::{self, Limits, Message, StateMsg};
use peerless_ml::{Model, ModelSpec, Split};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::Checkpoint;
use crate::node::{Files, NodeError, NodeLine, NodeRow, Progress, io_err, unix_ms};
use crate::node::{NodeFile, NodeSummary};
use crate::p2p::net::{self, Behaviour, BehaviourEvent};
use crate::p2p::sampler::Sampler;

mod worker;
pub use worker::run_worker;

/// What both roles set up the same way.
struct Common {
    me: u32,
    my_id: PeerId,
    ids: Vec<PeerId>,
    swarm: Swarm<Behaviour>,
    split: Arc<Split>,
    model: Arc<Model>,
    sampler: Arc<Sampler>,
    /// Model versions to publish (rounds × versions per round).
    total: u64,
    /// Model versions per synchronous round: 1, or the worker count in asynchronous mode.
    vpr: u64,
    rpe: u64,
    files: Files,
    data_dir: PathBuf,
}

async fn common(file: &NodeFile, data_dir: PathBuf) -> Result<Common, NodeError> {
    let run = &file.run;
    let n = run.p2p.peers;
    let me = file.peer.index;
    if run.p2p.secret.is_empty() {
        return Err(NodeError::Config(
            "p2p.secret is empty: the PS and workers derive identities from it".into(),
        ));
    }
    let ids: Vec<PeerId> = (0..=n).map(|i| net::derive_peer_id(&run.p2p.secret, i)).collect();
    let dir = &file.peer.dir;
    let files = Files::open(dir)?;
    let key_path = dir.join("identity.key");
    let keypair = net::load_or_save_keypair(&key_path, net::derive_keypair(&run.p2p.secret, me))
        .map_err(io_err(&key_path))?;
    let my_id = keypair.public().to_peer_id();
    let timeout =
        Duration::from_millis(3 * run.p2p.deadline_ceiling_ms + run.p2p.start_timeout_ms + 3_600_000);
    let mut swarm =
        net::build_swarm(keypair, &ids, timeout).map_err(|e| NodeError::Network(e.to_string()))?;
    let listen: Multiaddr =
        file.peer.listen.parse().map_err(|e| NodeError::Config(format!("peer.listen: {e}")))?;
    swarm.listen_on(listen).map_err(|e| NodeError::Network(format!("listen: {e}")))?;
    let data_dir = if run.data.dir.as_os_str().is_empty() { data_dir } else { run.data.dir.clone() };
    let split: Arc<Split> = Arc::new(peerless_ml::data::load(run.data.dataset, &data_dir)?);
    let spec = ModelSpec {
        hidden: run.model.hidden.clone(),
        ..ModelSpec::new(run.model.arch, split.train.shape, split.train.classes)
    };
    let model = Arc::new(Model::new(spec, run.model.backend)?);
    let sampler = Arc::new(Sampler::new(
        split.train.len(),
        n,
        run.p2p.functions_per_peer,
        run.train.batch_size,
        run.seed,
    ));
    let rpe = sampler.rounds_per_epoch();
    let rounds = if run.train.rounds > 0 { run.train.rounds } else { u64::from(run.train.epochs) * rpe };
    let vpr = run.ps.versions_per_round(n);
    Ok(Common {
        me,
        my_id,
        ids,
        swarm,
        split,
        model,
        sampler,
        total: rounds * vpr,
        vpr,
        rpe,
        files,
        data_dir,
    })
}

fn write_summary(dir: &std::path::Path, s: &NodeSummary) -> Result<(), NodeError> {
    let sp = dir.join("summary.json");
    let text = serde_json::to_string_pretty(s).expect("invariant: summary serializes");
    crate::checkpoint::write_atomic(&sp, text.as_bytes()).map_err(io_err(&sp))
}

/// Runs the parameter server until every round is done (or `stop`).
pub async fn run_server(
    file: NodeFile,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<NodeSummary, NodeError> {
    let run = file.run.clone();
    let Common { me, my_id, ids, mut swarm, split, model, total, vpr, rpe, mut files, .. } =
        common(&file, data_dir).await?;
    let asynchronous = run.ps.mode == crate::config::PsModeName::Async;
    let n = run.p2p.peers;
    let index_of: HashMap<PeerId, PeerIdx> =
        ids.iter().enumerate().map(|(i, p)| (*p, i as PeerIdx)).collect();
    let limits = Limits { params: model.num_params() };
    let mut optimizer = Optimizer::new(run.optimizer.clone(), model.num_params())?;
    let ck_path = file.peer.dir.join("checkpoint.safetensors");
    let (mut params, start_round) = match Checkpoint::read(&ck_path) {
        Ok(ck) if ck.model == model.id() => {
            optimizer.load_state(ck.optimizer.clone())?;
            files.event(me, json!({ "event": "resume", "round": ck.round }));
            (ck.params, ck.round)
        }
        _ => (model.init(run.seed), 0),
    };
    let cfg = PsConfig {
        workers: (0..n).collect(),
        total_rounds: total,
        checkpoint_every: run.train.checkpoint_every * vpr,
        deadline: DeadlinePolicy {
            floor_ms: run.p2p.deadline_floor_ms,
            ceiling_ms: run.p2p.deadline_ceiling_ms,
            factor: run.p2p.deadline_factor,
        },
        start_timeout_ms: run.p2p.start_timeout_ms,
        mode: run.ps.mode(),
    };
    let t0 = Instant::now();
    let now = || t0.elapsed().as_millis() as u64;
    let mut ps = Ps::new(cfg, start_round, 0);
    files.event(me, json!({ "event": "start", "role": "ps", "peer_id": my_id.to_string(), "total_rounds": total, "round": start_round }));
    NodeLine::Ready { ready: me }.print();
    let aggregator = run.p2p.aggregator.build();
    let mut agg = vec![0f32; params.len()];
    let mut parked: Vec<(u64, ResponseChannel<Bytes>)> = Vec::new();
    let mut pushed: HashMap<PeerIdx, u64> = HashMap::new();
    let mut published: Option<(u64, Bytes)> = None;
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let mut last_close = Instant::now();
    let mut queued = vec![PsInput::Tick];
    // Workers with an open connection. After the last round the PS stays until each has hung
    // up (a worker exits once it holds the final answer): counting answers sent is not enough,
    // since an answer still in flight dies with the connection when the PS exits.
    let mut connected: std::collections::HashSet<PeerIdx> = Default::default();
    let mut done_at: Option<Instant> = None;
    // The training loss each worker reported with its newest push: (version, loss).
    let mut losses: HashMap<PeerIdx, (u64, f32)> = HashMap::new();
    let (eval_tx, mut eval_rx) = mpsc::channel::<(u64, f32, f32)>(4);
    let mut pending_eval: Option<(u64, f32, f32)> = None;
    loop {
        if let Some(t) = done_at
            && (connected.is_empty() || t.elapsed() > Duration::from_secs(5))
        {
            break;
        }
        let timer = ps
            .next_timer()
            .map(|t| t0 + Duration::from_millis(t))
            .unwrap_or(Instant::now() + Duration::from_millis(500));
        if queued.is_empty() {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { peer_id, num_established, .. } if num_established.get() == 1 => {
                        if let Some(&w) = index_of.get(&peer_id) {
                            files.event(me, json!({ "event": "connected", "to": w }));
                            connected.insert(w);
                            queued.push(PsInput::Connected(w));
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                        if let Some(&w) = index_of.get(&peer_id) {
                            files.event(me, json!({ "event": "disconnected", "to": w }));
                            connected.remove(&w);
                            queued.push(PsInput::Disconnected(w));
                        }
                    }
                    SwarmEvent::IncomingConnectionError { error: libp2p::swarm::ListenError::Denied { .. }, peer_id, .. } => {
                        files.event(me, json!({ "event": "refused", "peer_id": peer_id.map(|p| p.to_string()), "reason": "not on the allow-list" }));
                    }
                    SwarmEvent::Behaviour(BehaviourEvent::Rr(request_response::Event::Message {
                        peer, message: request_response::Message::Request { request, channel, .. }, ..
                    })) => {
                        bytes_in += request.len() as u64;
                        let Some(&w) = index_of.get(&peer) else { continue };
                        match wire::decode(&request, limits) {
                            // Answer at once unless this worker already contributed to the
                            // current version (synchronous mode: it then waits for the next
                            // one). A worker asking for a version this PS has not reached (it
                            // restarted from a checkpoint) gets the current one. Asynchronous
                            // mode always answers with the newest version.
                            Ok(Message::ParamsRequest { round }) => match &published {
                                Some((r, msg)) if asynchronous || *r >= round || pushed.get(&w) != Some(r) => {
                                    bytes_out += msg.len() as u64;
                                    let _ = swarm.behaviour_mut().rr.send_response(channel, msg.clone());
                                }
                                _ => parked.push((round, channel)),
                            },
                            Ok(Message::Gradient(g)) => {
                                // A stale push (a replay) uses up the worker's turn at the
                                // current version, like a valid one.
                                let current = published.as_ref().map_or(g.round, |(r, _)| g.round.max(*r));
                                pushed.insert(w, current);
                                losses.insert(w, (g.round, g.loss));
                                let _ = swarm.behaviour_mut().rr.send_response(channel, wire::encode(&Message::Ack).into());
                                queued.push(PsInput::Gradient(w, g));
                            }
                            Ok(_) => {
                                let _ = swarm.behaviour_mut().rr.send_response(channel, wire::encode(&Message::Refused { reason: "not a PS request".into() }).into());
                            }
                            Err(err) => {
                                tracing::warn!(worker = w, %err, "rejected a malformed push");
                                files.event(me, json!({ "event": "rejected", "from": w, "error": err.to_string() }));
                                // Its turn at this version is used up, and it is not waited for.
                                if let Some((r, _)) = &published {
                                    pushed.insert(w, *r);
                                }
                                queued.push(PsInput::Rejected(w));
                                let _ = swarm.behaviour_mut().rr.send_response(channel, wire::encode(&Message::Refused { reason: format!("rejected: {err}") }).into());
                            }
                        }
                    }
                    _ => {}
                },
                _ = tokio::time::sleep_until(timer.into()) => queued.push(PsInput::Tick),
                Some(e) = eval_rx.recv() => {
                    files.event(me, json!({ "event": "eval", "round": e.0, "test_loss": e.1, "test_accuracy": e.2 }));
                    pending_eval = Some(e);
                }
                _ = stop.changed() => {
                    files.event(me, json!({ "event": "stop", "round": ps.round(), "reason": "interrupted" }));
                    break;
                }
            }
        }
        for input in std::mem::take(&mut queued) {
            for action in ps.handle(now(), input) {
                match action {
                    PsAction::Publish { round } => {
                        let msg = Bytes::from(wire::encode(&Message::State(StateMsg {
                            round,
                            digest: digest(&params),
                            params: params.clone(),
                            optimizer: OptimizerState {
                                kind: "none".into(),
                                steps: round,
                                buffers: Vec::new(),
                            },
                        })));
                        let (ready, wait): (Vec<_>, Vec<_>) =
                            parked.drain(..).partition(|(r, _)| *r <= round);
                        parked = wait;
                        for (_, ch) in ready {
                            bytes_out += msg.len() as u64;
                            let _ = swarm.behaviour_mut().rr.send_response(ch, msg.clone());
                        }
                        published = Some((round, msg));
                    }
                    PsAction::Apply { round, inputs, staleness } => {
                        let t = Instant::now();
                        // `effective_f`: how many Byzantine gradients the rule tolerated.
                        let (update, effective_f): (&[f32], usize) = if let [(_, g)] = inputs.as_slice()
                            && asynchronous
                        {
                            // One gradient at a time: nothing to aggregate.
                            (g, 0)
                        } else {
                            let refs: Vec<&[f32]> = inputs.iter().map(|(_, g)| g.as_slice()).collect();
                            aggregator
                                .aggregate(&refs, &mut agg)
                                .map_err(|e| NodeError::Compute { round, reason: e.to_string() })?;
                            (&agg, aggregator.effective_f(inputs.len()))
                        };
                        let aggregate_ms = t.elapsed().as_secs_f64() * 1e3;
                        let t = Instant::now();
                        optimizer.step(&mut params, update)?;
                        let update_ms = t.elapsed().as_secs_f64() * 1e3;
                        let done = round + 1;
                        let round_ms = last_close.elapsed().as_secs_f64() * 1e3;
                        last_close = Instant::now();
                        let reported: Vec<f32> = inputs
                            .iter()
                            .filter_map(|(w, _)| losses.get(w).filter(|(v, _)| *v + staleness == round))
                            .map(|(_, l)| *l)
                            .collect();
                        let loss = reported.iter().sum::<f32>() / reported.len().max(1) as f32;
                        // Evaluation every `eval_every` rounds (default: every epoch), off the
                        // event loop; the result goes into a later metrics row.
                        let every = match run.train.eval_every {
                            0 => rpe,
                            k => k,
                        } * vpr;
                        if done % every == 0 && done < total {
                            let (model, split, p, tx) =
                                (model.clone(), split.clone(), params.clone(), eval_tx.clone());
                            tokio::task::spawn_blocking(move || {
                                if let Ok((l, a)) = model.evaluate(&p, &split.test) {
                                    let _ = tx.blocking_send((done, l, a));
                                }
                            });
                        }
                        let ev = pending_eval.take();
                        files.metrics(&NodeRow {
                            t_ms: unix_ms(),
                            node: me,
                            round: done,
                            epoch: done as f64 / (rpe * vpr) as f64,
                            wall_s: t0.elapsed().as_secs_f64(),
                            train_loss: Some(loss),
                            view: Some(ps.expected().len()),
                            contributors: Some(inputs.len()),
                            bytes_in,
                            bytes_out,
                            wait_ms: Some(round_ms),
                            aggregate_ms: Some(aggregate_ms),
                            update_ms: Some(update_ms),
                            eval_round: ev.map(|e| e.0),
                            test_loss: ev.map(|e| e.1),
                            test_accuracy: ev.map(|e| e.2),
                            staleness: Some(staleness),
                            effective_f: Some(effective_f),
                            ..NodeRow::default()
                        });
                        if file.peer.progress {
                            NodeLine::Progress(Progress {
                                peer: me,
                                round: done,
                                total,
                                loss: Some(loss),
                                view: inputs.len(),
                                test_accuracy: None,
                            })
                            .print();
                        }
                    }
                    PsAction::Checkpoint { round } => {
                        Checkpoint {
                            model: model.id(),
                            layout: model.layout().fingerprint(),
                            round,
                            epoch: round / (rpe * vpr),
                            params: params.clone(),
                            optimizer: optimizer.state(),
                            rng: [0; 4],
                            wall_s: t0.elapsed().as_secs_f64(),
                        }
                        .save(&ck_path)?;
                        files.event(me, json!({ "event": "checkpoint", "round": round }));
                    }
                    PsAction::Event(e) => files.event(me, serde_json::to_value(&e).unwrap_or_default()),
                    PsAction::Finished { .. } => done_at = Some(Instant::now()),
                }
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let (m, s, p) = (model.clone(), split.clone(), params.clone());
    let (test_loss, test_accuracy) = tokio::task::spawn_blocking(move || m.evaluate(&p, &s.test))
        .await
        .map_err(|e| NodeError::Compute { round: ps.round(), reason: e.to_string() })??;
    let prices = run.function.prices.prices().map_err(|e| NodeError::Config(e.to_string()))?;
    let summary = NodeSummary {
        peer: me,
        peer_id: my_id.to_string(),
        completed: ps.is_done(),
        diverged: false,
        rounds: ps.round(),
        test_accuracy,
        test_loss,
        param_digest: digest(&params).to_string(),
        wall_time_s: wall,
        samples: 0,
        invocations: 0,
        cold_starts: 0,
        retries: 0,
        function_cost_pico: 0,
        node_cost_pico: prices.node_pico((wall * 1e3) as u64),
        bytes_in,
        bytes_out,
        refused: 0,
    };
    files.event(me, json!({ "event": "finish", "round": summary.rounds, "test_accuracy": test_accuracy, "digest": summary.param_digest }));
    write_summary(&file.peer.dir, &summary)?;
    Ok(summary)
}
