//! `peerless peer` (one peer process) and the local cluster launcher behind
//! `peerless train --arch p2p`.
//!
//! The launcher writes one `peer.toml` per peer under `<run>/peers/<i>/`, starts the peers as
//! real processes on loopback (free ports), shows one progress bar for the cluster (the peers
//! print a JSON line per round on stdout), forwards Ctrl-C, and at the end merges every
//! peer's metrics and events into the run directory and writes the cluster's summary.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peerless_core::cost::pico_to_usd;
use peerless_runtime::config::{Compute, RunConfig, TrainArch};
use peerless_runtime::function::FunctionCommand;
use peerless_runtime::p2p::peer::METRICS_HEADER;
use peerless_runtime::p2p::{PeerFile, PeerSection, PeerSummary};
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::FaultSpec;
use serde::{Deserialize, Serialize};

use crate::faults::{Injector, Proxy};

/// `peerless peer`.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// The peer's configuration (`[peer]` and `[run]`), as the launcher writes it.
    #[arg(long)]
    pub config: PathBuf,
    /// Join a run in progress (fetch the state from a live peer, or resume the own checkpoint).
    #[arg(long)]
    pub join: bool,
    /// Directory of IDX datasets (overrides `run.data.dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Which node a process runs.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// A P2P peer.
    Peer,
    /// The parameter server.
    Ps,
    /// A PS worker.
    Worker,
}

/// Runs one node until training is over; SIGINT or SIGTERM stop it after writing its summary.
pub fn run_node(role: Role, args: PeerArgs) -> Result<ExitCode> {
    if std::env::var_os("PEERLESS_LAUNCHED").is_some() {
        // Started by a launcher: do not outlive it.
        peerless_runtime::node::die_with_parent().context("setting the parent-death signal")?;
    }
    let mut file = PeerFile::load(&args.config)?;
    if args.join {
        file.peer.join = true;
    }
    let data_dir = crate::cli::data_dir(args.data_dir.as_deref().or(Some(&file.run.data.dir)));
    std::fs::create_dir_all(&file.peer.dir)
        .with_context(|| format!("creating {}", file.peer.dir.display()))?;
    // Written then renamed: whoever sees `pid` (tests, tools) never reads it half-written.
    let tmp = file.peer.dir.join("pid.tmp");
    std::fs::write(&tmp, std::process::id().to_string())
        .and_then(|()| std::fs::rename(&tmp, file.peer.dir.join("pid")))
        .with_context(|| format!("writing the pid into {}", file.peer.dir.display()))?;
    let exe = std::env::current_exe().context("locating the peerless executable")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let summary = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        let command = FunctionCommand::peerless(exe);
        match role {
            Role::Peer => peerless_runtime::p2p::peer::run(file, command, data_dir, stop_rx).await,
            Role::Ps => peerless_runtime::ps::run_server(file, data_dir, stop_rx).await,
            Role::Worker => peerless_runtime::ps::run_worker(file, command, data_dir, stop_rx).await,
        }
    })?;
    eprintln!(
        "{role:?} {} done: round {}, test accuracy {:.2} %, digest {}",
        summary.peer,
        summary.rounds,
        summary.test_accuracy * 100.0,
        summary.param_digest.get(..16).unwrap_or("-")
    );
    Ok(ExitCode::SUCCESS)
}

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
    pub per_peer: Vec<PeerSummary>,
    /// Nodes the launcher restarted (the PS), with downtime and rounds lost.
    pub recoveries: Vec<Recovery>,
}

/// A node that died and was restarted by the launcher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recovery {
    /// `ps`.
    pub node: String,
    /// Node index in the launcher.
    pub index: usize,
    /// When it died, s after the launch.
    pub died_at_s: f64,
    /// The last round it had reported done.
    pub died_at_round: u64,
    /// The round it resumed from (its checkpoint).
    pub resumed_from_round: Option<u64>,
    /// Rounds done again: `died_at_round - resumed_from_round`.
    pub rounds_lost: Option<u64>,
    /// From its death to its first round done after the restart, s.
    pub downtime_s: Option<f64>,
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

/// Writes the peer configurations of a cluster of `cfg.p2p.peers` peers under `dir/peers/`.
pub fn write_peer_files(
    cfg: &RunConfig,
    dir: &Path,
    secret: &str,
    proxy: Option<&Proxy>,
) -> Result<Vec<PathBuf>> {
    let n = cfg.p2p.peers as usize;
    let ports = free_ports(n)?;
    let addrs: Vec<String> = ports.iter().map(|p| multiaddr(*p)).collect();
    let mut run = cfg.clone();
    run.p2p.secret = secret.to_owned();
    let mut paths = Vec::new();
    for i in 0..n {
        let pdir = dir.join("peers").join(i.to_string());
        std::fs::create_dir_all(&pdir).with_context(|| format!("creating {}", pdir.display()))?;
        let file = PeerFile {
            peer: PeerSection {
                index: i as u32,
                listen: addrs[i].clone(),
                bootstrap: (0..n)
                    .filter(|&j| j != i)
                    .map(|j| dial_addr(proxy, i, j, ports[j]))
                    .collect::<Result<_>>()?,
                allow: Vec::new(),
                dir: pdir.clone(),
                join: false,
                progress: true,
                halt_at_round: None,
                attack: None,
            },
            run: run.clone(),
        };
        let path = pdir.join("peer.toml");
        std::fs::write(&path, file.to_toml()).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

fn spawn_node(sub: &str, config: &Path, join: bool) -> Result<Child> {
    // A stale pid file must not be mistaken for the new process's.
    let _ = std::fs::remove_file(config.with_file_name("pid"));
    let exe = std::env::current_exe().context("locating the peerless executable")?;
    let log_path = config.with_file_name(format!("{sub}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg(sub).arg("--config").arg(config).env("PEERLESS_LAUNCHED", "1");
    if join {
        cmd.arg("--join");
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(log)).stdin(Stdio::null());
    cmd.spawn().with_context(|| format!("starting the peer of {}", config.display()))
}

#[derive(Debug, Deserialize)]
struct ProgressLine {
    peer: u32,
    round: u64,
    total: u64,
    loss: Option<f32>,
    view: usize,
    test_accuracy: Option<f32>,
}

/// `peerless train --arch p2p`: starts the cluster, injects `faults`, and waits for it.
pub fn launch(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    let secret = if cfg.p2p.secret.is_empty() { random_secret() } else { cfg.p2p.secret.clone() };
    let n = cfg.p2p.peers as usize;
    let (injector, skipped) = injector(faults, TrainArch::P2p, n, n)?;
    let configs = write_peer_files(cfg, dir.path(), &secret, injector.proxy())?;
    write_attacks(&configs, faults, TrainArch::P2p, n)?;
    let nodes: Vec<Node> =
        configs.into_iter().map(|config| Node { sub: "peer", config, restart: None }).collect();
    run_cluster(cfg, dir, "p2p", nodes, injector, skipped)
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
    let ports = free_ports(n + 1)?;
    let mut run = cfg.clone();
    run.p2p.secret = secret;
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let is_ps = i == n;
        let ndir = if is_ps { dir.path().join("ps") } else { dir.path().join("workers").join(i.to_string()) };
        std::fs::create_dir_all(&ndir).with_context(|| format!("creating {}", ndir.display()))?;
        let file = PeerFile {
            peer: PeerSection {
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
                attack: None,
            },
            run: run.clone(),
        };
        let config = ndir.join(if is_ps { "ps.toml" } else { "worker.toml" });
        std::fs::write(&config, file.to_toml()).with_context(|| format!("writing {}", config.display()))?;
        nodes.push(Node {
            sub: if is_ps { "ps" } else { "worker" },
            config,
            restart: is_ps.then(|| Duration::from_millis(cfg.ps.restart_delay_ms)),
        });
    }
    let configs: Vec<PathBuf> = nodes.iter().map(|n| n.config.clone()).collect();
    write_attacks(&configs, faults, TrainArch::Ps, n)?;
    run_cluster(cfg, dir, "ps", nodes, injector, skipped)
}

/// Writes the scenario's Byzantine attacks into their targets' node files.
fn write_attacks(configs: &[PathBuf], faults: &[FaultSpec], arch: TrainArch, n: usize) -> Result<()> {
    for (index, attack) in crate::faults::attacks(faults, arch, n) {
        let path = &configs[index];
        let mut file = PeerFile::load(path).with_context(|| format!("reading {}", path.display()))?;
        file.peer.attack = Some(attack);
        std::fs::write(path, file.to_toml()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One process of a local cluster.
#[derive(Debug, Clone)]
struct Node {
    /// `peer`, `ps` or `worker`.
    sub: &'static str,
    config: PathBuf,
    /// Restart after this delay when it dies (the PS: the cloud restarting its instance).
    restart: Option<Duration>,
}

fn start_node(node: &Node, tx: &mpsc::Sender<ProgressLine>, join: bool) -> Result<Child> {
    let mut child = spawn_node(node.sub, &node.config, join)?;
    let out = child.stdout.take().expect("piped");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(p) = serde_json::from_str::<ProgressLine>(&line) {
                let _ = tx.send(p);
            }
        }
    });
    Ok(child)
}

fn run_cluster(
    cfg: &RunConfig,
    dir: &mut RunDir,
    arch: &str,
    nodes: Vec<Node>,
    mut injector: Injector,
    skipped: Vec<crate::faults::Record>,
) -> Result<ExitCode> {
    let started = Instant::now();
    dir.event(
        "start",
        serde_json::json!({ "arch": arch, "nodes": nodes.len(), "compute": compute_name(cfg.p2p.compute) }),
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
    let mut children: Vec<Option<Child>> = Vec::new();
    let (tx, rx) = mpsc::channel::<ProgressLine>();
    for (i, node) in nodes.iter().enumerate() {
        let child = start_node(node, &tx, false)?;
        injector.set_pid(i, Some(child.id()));
        children.push(Some(child));
    }
    // Pending restarts: when, and whether the node rejoins (`--join`, a peer restarted by a
    // fault) or resumes on its own (the PS, a worker).
    let mut restarts: Vec<Option<(Instant, bool)>> = vec![None; nodes.len()];
    // The PS's versions per synchronous round (fault schedules count synchronous rounds).
    let vpr = if arch == "ps" { cfg.ps.versions_per_round(cfg.p2p.peers) } else { 1 };

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
            rt.block_on(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\ninterrupt: stopping the peers (they write their summaries)");
                    stop.store(true, Ordering::Relaxed);
                }
            });
        });
    }

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} rounds {msg}")
            .expect("invariant: valid template"),
    );
    bar.set_prefix(format!("p2p×{} {} on {}", cfg.p2p.peers, cfg.model.arch, cfg.data.dataset));
    let mut rounds = vec![0u64; configs.len() + 1];
    let mut acc = None::<f32>;
    let mut exits: Vec<Option<String>> = vec![None; configs.len()];
    let mut exit_at: Vec<Option<f64>> = vec![None; configs.len()];
    let mut recoveries: Vec<Recovery> = Vec::new();
    let mut restarted = vec![false; nodes.len()];
    let mut signalled = false;
    loop {
        let tick_end = Instant::now() + Duration::from_millis(50);
        while let Ok(p) = rx.recv_timeout(tick_end.saturating_duration_since(Instant::now())) {
            bar.set_length(p.total);
            if let Some(r) = rounds.get_mut(p.peer as usize) {
                *r = p.round;
            }
            if p.test_accuracy.is_some() {
                acc = p.test_accuracy;
            }
            bar.set_position(rounds.iter().copied().max().unwrap_or(0));
            let a = acc.map(|a| format!(" acc {:.2}%", a * 100.0)).unwrap_or_default();
            let loss = p.loss.map(|l| format!("loss {l:.4}")).unwrap_or_default();
            bar.set_message(format!("{loss}{a} view {}", p.view));
            if let Some(rec) =
                recoveries.iter_mut().find(|r| r.index == p.peer as usize && r.downtime_s.is_none())
                && restarted[rec.index]
            {
                rec.downtime_s = Some(started.elapsed().as_secs_f64() - rec.died_at_s);
            }
        }
        let round = rounds.iter().copied().max().unwrap_or(0) / vpr;
        let (records, orders) = injector.tick(started.elapsed(), round);
        for (name, fields) in records {
            bar.println(format!("{name}: {fields}"));
            dir.event(name, fields)?;
        }
        for crate::faults::Order::Restart { index, after } in orders {
            if !signalled {
                restarts[index] = Some((Instant::now() + after, nodes[index].sub == "peer"));
            }
        }
        if stop.load(Ordering::Relaxed) && !signalled {
            signalled = true;
            for c in children.iter().flatten() {
                let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            }
        }
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot
                && let Ok(Some(status)) = c.try_wait()
            {
                let how =
                    status.code().map_or_else(|| format!("killed ({status})"), |c| format!("exit code {c}"));
                let node = &nodes[i];
                if !status.success() {
                    let log = node.config.with_file_name(format!("{}.log", node.sub));
                    bar.println(format!("{} {i} stopped: {how}; see {}", node.sub, log.display()));
                }
                dir.event("node_exit", serde_json::json!({ "node": node.sub, "index": i, "status": how }))?;
                if node.sub == "peer" {
                    dir.event("peer_exit", serde_json::json!({ "peer": i, "status": how }))?;
                }
                if !status.success()
                    && !signalled
                    && let Some(delay) = node.restart
                {
                    restarts[i] = Some((Instant::now() + delay, false));
                    restarted[i] = false;
                    recoveries.push(Recovery {
                        node: node.sub.to_owned(),
                        index: i,
                        died_at_s: started.elapsed().as_secs_f64(),
                        died_at_round: rounds.get(i).copied().unwrap_or(0),
                        resumed_from_round: None,
                        rounds_lost: None,
                        downtime_s: None,
                    });
                }
                exits[i] = Some(how);
                exit_at[i] = Some(started.elapsed().as_secs_f64());
                injector.set_pid(i, None);
                *slot = None;
            }
        }
        for (i, at) in restarts.iter_mut().enumerate() {
            if let Some((t, join)) = *at
                && Instant::now() >= t
                && children[i].is_none()
            {
                *at = None;
                if !signalled {
                    let child = start_node(&nodes[i], &tx, join)?;
                    injector.set_pid(i, Some(child.id()));
                    children[i] = Some(child);
                    restarted[i] = true;
                    if !recoveries.iter().any(|r| r.index == i && r.downtime_s.is_none()) {
                        recoveries.push(Recovery {
                            node: nodes[i].sub.to_owned(),
                            index: i,
                            died_at_s: exit_at[i].unwrap_or(0.0),
                            died_at_round: rounds.get(i).copied().unwrap_or(0),
                            resumed_from_round: None,
                            rounds_lost: None,
                            downtime_s: None,
                        });
                    }
                    dir.event("node_restart", serde_json::json!({ "node": nodes[i].sub, "index": i }))?;
                    bar.println(format!("{} restarted", nodes[i].sub));
                }
            }
        }
        // A PS that finished has nothing left to serve: a worker still waiting 15 s later
        // (frozen, or cut off when the answer went out) is told to stop.
        if let Some(ps) = nodes.iter().position(|n| n.sub == "ps")
            && children[ps].is_none()
            && exits[ps].as_deref() == Some("exit code 0")
            && !signalled
            && exit_at[ps].is_some_and(|t| started.elapsed().as_secs_f64() > t + 15.0)
        {
            signalled = true;
            dir.event("stop_workers", serde_json::json!({ "reason": "the PS finished 15 s ago" }))?;
            for c in children.iter().flatten() {
                let _ = Command::new("kill").arg("-INT").arg(c.id().to_string()).status();
            }
        }
        if children.iter().all(Option::is_none) {
            // Nobody left to rejoin: only the PS is restarted into an empty cluster.
            for (i, r) in restarts.iter_mut().enumerate() {
                if nodes[i].restart.is_none() {
                    *r = None;
                }
            }
        }
        if children.iter().all(Option::is_none) && restarts.iter().all(Option::is_none) {
            break;
        }
    }
    let round = rounds.iter().copied().max().unwrap_or(0) / vpr;
    for (name, fields) in injector.finish(round) {
        dir.event(name, fields)?;
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    drop(tx);
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
    let mut summary = collect(cfg, dir, arch, &configs, wall)?;
    summary.recoveries = recoveries;
    dir.summary(&summary)?;
    print_summary(&summary, dir.path());
    if signalled {
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
        bail!(
            "the cluster did not complete its rounds; see the peer logs under {}",
            dir.path().join("peers").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn compute_name(c: Compute) -> &'static str {
    match c {
        Compute::Functions => "functions",
        Compute::Local => "local",
    }
}

/// Merges the peers' metrics and events into the run directory and writes the summary.
fn collect(
    cfg: &RunConfig,
    dir: &mut RunDir,
    arch: &str,
    configs: &[PathBuf],
    wall: f64,
) -> Result<ClusterSummary> {
    let mut per_peer = Vec::new();
    let mut metrics = vec![METRICS_HEADER.to_string()];
    let mut events: Vec<(u64, String)> = Vec::new();
    for path in configs {
        let pdir = path.parent().expect("peer.toml has a directory");
        if let Ok(text) = std::fs::read_to_string(pdir.join("summary.json"))
            && let Ok(s) = serde_json::from_str::<PeerSummary>(&text)
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
    let attackers: Vec<u32> = configs
        .iter()
        .filter_map(|p| PeerFile::load(p).ok())
        .filter(|f| f.peer.attack.is_some())
        .map(|f| f.peer.index)
        .collect();
    // Nodes holding a model: every honest peer, or the PS (workers report no digest).
    let honest = |s: &&PeerSummary| !s.param_digest.is_empty() && !attackers.contains(&s.peer);
    let mut finished: Vec<&PeerSummary> = per_peer.iter().filter(honest).filter(|s| s.completed).collect();
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
        compute: compute_name(cfg.p2p.compute).into(),
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
}
