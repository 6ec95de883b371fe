//! The local cluster launcher behind `peerless train --arch p2p|ps`.
//!
//! The launcher writes one `peer.toml` per peer under `<run>/peers/<i>/` (or the PS's and the
//! workers' files), has the supervisor (`supervise`) run the nodes as real processes on
//! loopback (free ports), and at the end merges every node's metrics and events into the run
//! directory and writes the cluster's summary.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use peerless_core::attack::Attack;
use peerless_core::cost::pico_to_usd;
use peerless_runtime::config::{Compute, RunConfig, TrainArch};
use peerless_runtime::node::NodeRow;
use peerless_runtime::node::{NodeFile, NodeSection, NodeSummary};
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::FaultSpec;
use serde::{Deserialize, Serialize};

use crate::faults::{Injector, Proxy};
use crate::supervise::{Node, NodeOutcome, Recovery, Role, Supervisor};

/// The cluster's summary (`summary.json` of a P2P run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Run directory name.
    pub run: String,
    /// `p2p`.
    pub arch: String,
    /// `functions` or `local`.
    pub compute: String,
    /// Model id.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// Peers started.
    pub peers: u32,
    /// Whether every peer that finished ran every round.
    pub completed: bool,
    /// Training stopped early because the honest nodes' model diverged (an outcome, e.g. of an
    /// attack the rule does not stop; `test_accuracy` is then that model's).
    pub diverged: bool,
    /// Rounds done (highest among peers).
    pub rounds: u64,
    /// Test accuracy of the lowest-indexed finished peer's model.
    pub test_accuracy: f32,
    /// Its test loss.
    pub test_loss: f32,
    /// Final model digest of every peer that finished, by index.
    pub param_digests: Vec<(u32, String)>,
    /// Whether all those digests are equal.
    pub replicas_agree: bool,
    /// Launcher wall time, s.
    pub wall_time_s: f64,
    /// Samples computed on by all peers, per second of wall time.
    pub samples_per_s: f64,
    /// Function invocation attempts.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Function charges, USD.
    pub function_cost_usd: f64,
    /// Peer node time, USD.
    pub node_cost_usd: f64,
    /// Total, USD.
    pub total_cost_usd: f64,
    /// Bytes sent between peers.
    pub bytes_exchanged: u64,
    /// Per-peer summaries.
    pub per_peer: Vec<NodeSummary>,
    /// Nodes the launcher restarted (the PS), with downtime and rounds lost.
    pub recoveries: Vec<Recovery>,
    /// How each node ended (exit status, whether it completed, why the launcher stopped it).
    #[serde(default)]
    pub nodes: Vec<NodeOutcome>,
    /// Why the run failed as a whole (a node's bad input, a PS that kept dying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn random_secret() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!(
        "{}{:x}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
        nanos ^ u128::from(std::process::id())
    )
}

fn multiaddr(port: u16) -> String {
    format!("/ip4/127.0.0.1/tcp/{port}")
}

/// The address node `from` dials to reach node `to` listening on `port`: direct, or through
/// the fault proxy when the run injects network faults.
fn dial_addr(proxy: Option<&Proxy>, from: usize, to: usize, port: u16) -> Result<String> {
    Ok(match proxy {
        Some(px) => multiaddr(px.route(from, to, ([127, 0, 0, 1], port).into())?.port()),
        None => multiaddr(port),
    })
}

/// The scenario's Byzantine attacks, by the index of the node that carries each out.
type Attacks = BTreeMap<usize, Attack>;

/// Writes the peer configurations of a cluster of `cfg.p2p.peers` peers under `dir/peers/`.
fn write_peer_files(
    cfg: &RunConfig,
    dir: &Path,
    secret: &str,
    proxy: Option<&Proxy>,
    attacks: &Attacks,
) -> Result<Vec<PathBuf>> {
    let n = cfg.p2p.peers as usize;
    let ports = free_ports(n)?;
    let mut run = cfg.clone();
    run.p2p.secret = secret.to_owned();
    let mut paths = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let pdir = dir.join("peers").join(i.to_string());
        std::fs::create_dir_all(&pdir).with_context(|| format!("creating {}", pdir.display()))?;
        let file = NodeFile {
            node: NodeSection {
                index: i as u32,
                listen: multiaddr(*port),
                bootstrap: (0..n)
                    .filter(|&j| j != i)
                    .map(|j| dial_addr(proxy, i, j, ports[j]))
                    .collect::<Result<_>>()?,
                allow: Vec::new(),
                dir: pdir.clone(),
                join: false,
                progress: true,
                halt_at_round: None,
                attack: attacks.get(&i).copied(),
            },
            run: run.clone(),
        };
        let path = pdir.join("peer.toml");
        std::fs::write(&path, file.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// `peerless train --arch p2p`: starts the cluster, injects `faults`, and waits for it.
pub fn launch(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    let secret = if cfg.p2p.secret.is_empty() { random_secret() } else { cfg.p2p.secret.clone() };
    let n = cfg.p2p.peers as usize;
    let (injector, skipped) = injector(faults, TrainArch::P2p, n, n)?;
    let attacks: Attacks = crate::faults::attacks(faults, TrainArch::P2p, n).into_iter().collect();
    let configs = write_peer_files(cfg, dir.path(), &secret, injector.proxy(), &attacks)?;
    let nodes: Vec<Node> =
        configs.into_iter().map(|config| Node { role: Role::Peer, config, restart: None }).collect();
    run_cluster(cfg, dir, "p2p", nodes, injector, skipped, &attacks)
}

fn injector(
    faults: &[FaultSpec],
    arch: TrainArch,
    n: usize,
    nodes: usize,
) -> Result<(Injector, Vec<crate::faults::Record>)> {
    let proxy = if crate::faults::needs_proxy(faults) { Some(Proxy::new()?) } else { None };
    Ok(Injector::new(faults, arch, n, nodes, proxy))
}

/// `peerless train --arch ps`: the parameter server and its workers.
pub fn launch_ps(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    let secret = if cfg.p2p.secret.is_empty() { random_secret() } else { cfg.p2p.secret.clone() };
    let n = cfg.p2p.peers as usize;
    let (injector, skipped) = injector(faults, TrainArch::Ps, n, n + 1)?;
    let attacks: Attacks = crate::faults::attacks(faults, TrainArch::Ps, n).into_iter().collect();
    let ports = free_ports(n + 1)?;
    let mut run = cfg.clone();
    run.p2p.secret = secret;
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let is_ps = i == n;
        let ndir = if is_ps { dir.path().join("ps") } else { dir.path().join("workers").join(i.to_string()) };
        std::fs::create_dir_all(&ndir).with_context(|| format!("creating {}", ndir.display()))?;
        let file = NodeFile {
            node: NodeSection {
                index: i as u32,
                listen: format!("/ip4/127.0.0.1/tcp/{port}"),
                bootstrap: if is_ps {
                    Vec::new()
                } else {
                    vec![dial_addr(injector.proxy(), i, n, ports[n])?]
                },
                allow: Vec::new(),
                dir: ndir.clone(),
                join: false,
                progress: is_ps,
                halt_at_round: None,
                attack: attacks.get(&i).copied(),
            },
            run: run.clone(),
        };
        let config = ndir.join(if is_ps { "ps.toml" } else { "worker.toml" });
        std::fs::write(&config, file.to_toml()).with_context(|| format!("writing {}", config.display()))?;
        nodes.push(Node {
            role: if is_ps { Role::Ps } else { Role::Worker },
            config,
            restart: is_ps.then(|| Duration::from_millis(cfg.ps.restart_delay_ms)),
        });
    }
    run_cluster(cfg, dir, "ps", nodes, injector, skipped, &attacks)
}

/// Supervises the cluster until every node is gone, then merges the nodes' files into the run
/// directory and writes the cluster's summary.
fn run_cluster(
    cfg: &RunConfig,
    dir: &mut RunDir,
    arch: &str,
    nodes: Vec<Node>,
    injector: Injector,
    skipped: Vec<crate::faults::Record>,
    attacks: &Attacks,
) -> Result<ExitCode> {
    dir.event(
        "start",
        serde_json::json!({ "arch": arch, "nodes": nodes.len(), "compute": cfg.p2p.compute.to_string() }),
    )?;
    for (name, fields) in skipped {
        dir.event(name, fields)?;
    }
    if cfg.function.faults.any() && cfg.p2p.compute == Compute::Functions {
        dir.event(
            "fault_injected",
            serde_json::json!({ "fault": "function_faults", "targets": ["functions"], "round": 0, "rates": cfg.function.faults }),
        )?;
    }
    let configs: Vec<PathBuf> = nodes.iter().map(|n| n.config.clone()).collect();
    let label = format!("{arch}×{} {} on {}", cfg.p2p.peers, cfg.model.arch, cfg.data.dataset);
    let run = Supervisor::new(cfg, dir, nodes, injector, label).run()?;
    let mut recoveries = run.recoveries;
    // Where each restarted node resumed, from its own events (its last `resume`).
    for rec in &mut recoveries {
        let ev =
            std::fs::read_to_string(configs[rec.index].with_file_name("events.jsonl")).unwrap_or_default();
        rec.resumed_from_round = ev
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "resume")
            .and_then(|v| v["round"].as_u64());
        rec.rounds_lost = rec.resumed_from_round.map(|r| rec.died_at_round.saturating_sub(r));
        dir.event("recovery", serde_json::to_value(&*rec)?)?;
    }
    let mut summary = collect(cfg, dir, arch, &configs, attacks, run.wall_s)?;
    summary.recoveries = recoveries;
    summary.nodes = run.outcomes;
    for n in &mut summary.nodes {
        n.completed &= summary.per_peer.iter().any(|s| s.peer as usize == n.index && s.completed);
    }
    if let Some(why) = &run.fatal {
        summary.completed = false;
        summary.error = Some(why.clone());
        dir.summary(&summary)?;
        bail!("{why}\n(run files: {})", dir.path().display());
    }
    dir.summary(&summary)?;
    print_summary(&summary, dir.path());
    if run.interrupted {
        return Ok(ExitCode::from(130));
    }
    if summary.diverged {
        eprintln!(
            "the model diverged: training stopped at round {} (see the diverged events)",
            summary.rounds
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !summary.completed || summary.per_peer.is_empty() {
        let died: Vec<String> = summary
            .nodes
            .iter()
            .filter(|n| !n.completed)
            .map(|n| {
                let why = n.error.as_deref().or(n.stopped.as_deref()).unwrap_or(&n.exit);
                format!("{} {}: {why}", n.node, n.index)
            })
            .collect();
        bail!("no node finished every round ({}); logs under {}", died.join("; "), dir.path().display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Merges the peers' metrics and events into the run directory and writes the summary.
fn collect(
    cfg: &RunConfig,
    dir: &mut RunDir,
    arch: &str,
    configs: &[PathBuf],
    attacks: &Attacks,
    wall: f64,
) -> Result<ClusterSummary> {
    let mut per_peer = Vec::new();
    let mut metrics = vec![NodeRow::header()];
    let mut events: Vec<(u64, String)> = Vec::new();
    for path in configs {
        let pdir = path.parent().expect("peer.toml has a directory");
        if let Ok(text) = std::fs::read_to_string(pdir.join("summary.json"))
            && let Ok(s) = serde_json::from_str::<NodeSummary>(&text)
        {
            per_peer.push(s);
        }
        if let Ok(text) = std::fs::read_to_string(pdir.join("metrics.csv")) {
            metrics.extend(text.lines().skip(1).map(str::to_owned));
        }
        if let Ok(text) = std::fs::read_to_string(pdir.join("events.jsonl")) {
            for line in text.lines() {
                let t = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["t_ms"].as_u64())
                    .unwrap_or(0);
                events.push((t, line.to_owned()));
            }
        }
    }
    // Rows sorted by time (then peer), so the file reads as the cluster's timeline.
    let mut rows: Vec<String> = metrics.split_off(1);
    rows.sort_by_key(|l| l.split(',').next().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0));
    metrics.extend(rows);
    let mpath = dir.path().join("metrics.csv");
    std::fs::write(&mpath, metrics.join("\n") + "\n")
        .with_context(|| format!("writing {}", mpath.display()))?;
    events.sort_by_key(|(t, _)| *t);
    let epath = dir.path().join("events.jsonl");
    let mut text = std::fs::read_to_string(&epath).unwrap_or_default();
    for (_, l) in &events {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&epath, text).with_context(|| format!("writing {}", epath.display()))?;

    per_peer.sort_by_key(|s| s.peer);
    // Byzantine nodes' models are not the run's result.
    let attackers: Vec<u32> = attacks.keys().map(|&i| i as u32).collect();
    // Nodes holding a model: every honest peer, or the PS (workers report no digest).
    let honest = |s: &&NodeSummary| !s.param_digest.is_empty() && !attackers.contains(&s.peer);
    let mut finished: Vec<&NodeSummary> = per_peer.iter().filter(honest).filter(|s| s.completed).collect();
    let diverged = finished.is_empty() && per_peer.iter().filter(honest).any(|s| s.diverged);
    if diverged {
        finished = per_peer.iter().filter(honest).filter(|s| s.diverged).collect();
    }
    let digests: Vec<(u32, String)> = finished.iter().map(|s| (s.peer, s.param_digest.clone())).collect();
    let first = finished.first();
    let function_pico: u64 = per_peer.iter().map(|s| s.function_cost_pico).sum();
    let node_pico: u64 = per_peer.iter().map(|s| s.node_cost_pico).sum();
    let samples: u64 = per_peer.iter().map(|s| s.samples).sum();
    let summary = ClusterSummary {
        run: dir.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        arch: arch.into(),
        compute: cfg.p2p.compute.to_string(),
        model: cfg.model.arch.to_string(),
        dataset: cfg.data.dataset.to_string(),
        seed: cfg.seed,
        peers: cfg.p2p.peers,
        completed: !finished.is_empty() && !diverged,
        diverged,
        rounds: per_peer.iter().map(|s| s.rounds).max().unwrap_or(0),
        test_accuracy: first.map_or(0.0, |s| s.test_accuracy),
        test_loss: first.map_or(f32::NAN, |s| s.test_loss),
        replicas_agree: digests.windows(2).all(|w| w[0].1 == w[1].1),
        param_digests: digests,
        wall_time_s: wall,
        samples_per_s: samples as f64 / wall.max(1e-9),
        invocations: per_peer.iter().map(|s| s.invocations).sum(),
        cold_starts: per_peer.iter().map(|s| s.cold_starts).sum(),
        function_cost_usd: pico_to_usd(function_pico),
        node_cost_usd: pico_to_usd(node_pico),
        total_cost_usd: pico_to_usd(function_pico + node_pico),
        bytes_exchanged: per_peer.iter().map(|s| s.bytes_out).sum(),
        per_peer,
        recoveries: Vec::new(),
        nodes: Vec::new(),
        error: None,
    };
    dir.event(
        "finish",
        serde_json::json!({ "rounds": summary.rounds, "test_accuracy": summary.test_accuracy, "replicas_agree": summary.replicas_agree }),
    )?;
    dir.summary(&summary)?;
    Ok(summary)
}

fn print_summary(s: &ClusterSummary, dir: &Path) {
    println!("run          {}", dir.display());
    let nodes = if s.arch == "ps" { "workers + 1 PS" } else { "peers" };
    println!("arch         {}, {} {nodes}, gradients in {}", s.arch, s.peers, s.compute);
    println!("model        {} on {} (seed {})", s.model, s.dataset, s.seed);
    println!("rounds       {}{}", s.rounds, if s.completed { "" } else { ", incomplete" });
    println!("test acc     {:.2} %", s.test_accuracy * 100.0);
    println!("test loss    {:.4}", s.test_loss);
    println!("wall time    {:.2} s", s.wall_time_s);
    println!("throughput   {:.0} samples/s", s.samples_per_s);
    println!("invocations  {} ({} cold starts)", s.invocations, s.cold_starts);
    println!(
        "cost         ${:.6} (functions ${:.6}, peer nodes ${:.6})",
        s.total_cost_usd, s.function_cost_usd, s.node_cost_usd
    );
    println!("exchanged    {:.1} MB", s.bytes_exchanged as f64 / 1e6);
    println!("replicas     {}", if s.replicas_agree { "identical" } else { "DIFFER" });
    for (p, d) in &s.param_digests {
        println!("  peer {p}    {d}");
    }
    for n in s.nodes.iter().filter(|n| n.stopped.is_some()) {
        println!("stopped      {} {}: {}", n.node, n.index, n.stopped.as_deref().unwrap_or_default());
    }
}
