//! `peerless bench p2p`: P2P rounds on 1, 2 and 4 local peers (time split and samples/s), and
//! the exchange throughput of the peer network (libp2p, TCP + Noise + Yamux) as a ratio of a
//! plain TCP copy of the same bytes, both measured in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::request_response::{Event, Message};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use peerless_ml::DatasetName;
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::node::transport as net;
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::FaultSpec;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The cluster sizes measured.
pub const WORLDS: [u32; 3] = [1, 2, 4];

/// One cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterBench {
    /// Peers.
    pub peers: u32,
    /// Rounds run.
    pub rounds: u64,
    /// Training samples per second of wall time, whole cluster, start-up included.
    pub samples_per_s: f64,
    /// Steady-state samples per second: a round's global batch over the median round time.
    pub steady_samples_per_s: f64,
    /// Median round time (time between a peer's consecutive rounds), ms.
    pub round_ms: f64,
    /// Median time in the peer's functions (invoke to mean gradient), ms.
    pub compute_ms: f64,
    /// Median time from the own gradient being ready to the round closing, ms.
    pub wait_ms: f64,
    /// Median time to send the own gradient to every peer (until all acknowledged), ms.
    pub exchange_ms: f64,
    /// Median aggregation time, ms.
    pub aggregate_ms: f64,
    /// Median optimizer step time, ms.
    pub update_ms: f64,
}

/// Exchange throughput of one payload size.
#[derive(Debug, Serialize)]
pub struct ExchangeBench {
    /// Payload, bytes.
    pub bytes: usize,
    /// libp2p request → ack over TCP + Noise + Yamux, MB/s (median).
    pub libp2p_mb_s: f64,
    /// Plain TCP write → ack of the same bytes, MB/s (median).
    pub tcp_mb_s: f64,
    /// `libp2p_mb_s / tcp_mb_s`.
    pub ratio: f64,
}

/// Results of `peerless bench p2p`.
#[derive(Debug, Serialize)]
pub struct P2pBench {
    /// Dataset used.
    pub dataset: String,
    /// Per cluster size.
    pub clusters: Vec<ClusterBench>,
    /// Per payload size.
    pub exchange: Vec<ExchangeBench>,
}

/// The median of the finite values of `v` (NaN when there are none).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    peerless_core::stats::median(&v).unwrap_or(f64::NAN)
}

/// Runs a cluster of `peers` for `rounds` rounds with `faults` in the run directory `out` and
/// reads its metrics.
pub(super) fn cluster(
    base: &RunConfig,
    peers: u32,
    rounds: u64,
    out: &Path,
    faults: &[FaultSpec],
) -> Result<ClusterBench> {
    let mut cfg = base.clone();
    cfg.train.arch = TrainArch::P2p;
    cfg.cluster.nodes = peers;
    cfg.train.rounds = rounds;
    cfg.train.eval_every = rounds + 1;
    let mut rd = RunDir::create(out, &cfg)?;
    if crate::launch::launch_quiet(&cfg, &mut rd, faults)? != std::process::ExitCode::SUCCESS {
        anyhow::bail!("the run in {} was interrupted", out.display());
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    let text = std::fs::read_to_string(out.join("metrics.csv"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty metrics.csv")?.split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect("metrics column");
    let (peer_c, wall_c) = (col("peer"), col("wall_s"));
    let mut cols: [Vec<f64>; 5] = Default::default();
    let names = ["compute_ms", "wait_ms", "exchange_ms", "aggregate_ms", "update_ms"];
    let mut last_wall: std::collections::HashMap<String, f64> = Default::default();
    let mut round_ms = Vec::new();
    // The first rounds include cold starts; skip a tenth.
    let skip = (rounds / 10) as usize;
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let wall: f64 = f[wall_c].parse().unwrap_or(f64::NAN);
        if let Some(prev) = last_wall.insert(f[peer_c].to_owned(), wall)
            && i >= skip * peers as usize
        {
            round_ms.push((wall - prev) * 1e3);
        }
        if i >= skip * peers as usize {
            for (c, n) in cols.iter_mut().zip(names) {
                c.push(f[col(n)].parse().unwrap_or(f64::NAN));
            }
        }
    }
    let [compute, wait, exchange, aggregate, update] = cols;
    let round_ms = median(round_ms);
    let global_batch = f64::from(peers * cfg.cluster.functions_per_node) * cfg.train.batch_size as f64;
    Ok(ClusterBench {
        peers,
        rounds,
        samples_per_s: s["samples_per_s"].as_f64().unwrap_or(0.0),
        steady_samples_per_s: global_batch / (round_ms / 1e3),
        round_ms,
        compute_ms: median(compute),
        wait_ms: median(wait),
        exchange_ms: median(exchange),
        aggregate_ms: median(aggregate),
        update_ms: median(update),
    })
}

/// libp2p: `reps` requests of `bytes` from one swarm to another, each answered by a 1-byte ack.
async fn libp2p_exchange(bytes: usize, reps: usize) -> Result<Vec<f64>> {
    let (ka, kb) = (net::generate_keypair(), net::generate_keypair());
    let (ida, idb): (PeerId, PeerId) = (ka.public().to_peer_id(), kb.public().to_peer_id());
    let timeout = Duration::from_secs(60);
    let mut a = net::build_swarm(ka, Some(&[idb]), timeout).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut b = net::build_swarm(kb, Some(&[ida]), timeout).map_err(|e| anyhow::anyhow!("{e}"))?;
    b.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr: Multiaddr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
            break address;
        }
    };
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(net::BehaviourEvent::Rr(Event::Message {
                message: Message::Request { channel, .. },
                ..
            })) = b.select_next_some().await
            {
                let _ = b.behaviour_mut().rr.send_response(channel, bytes::Bytes::from_static(b"k"));
            }
        }
    });
    a.dial(addr)?;
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = a.select_next_some().await {
            break;
        }
    }
    let payload = bytes::Bytes::from(vec![7u8; bytes]);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        a.behaviour_mut().rr.send_request(&idb, payload.clone());
        loop {
            match a.select_next_some().await {
                SwarmEvent::Behaviour(net::BehaviourEvent::Rr(Event::Message {
                    message: Message::Response { .. },
                    ..
                })) => break,
                SwarmEvent::Behaviour(net::BehaviourEvent::Rr(Event::OutboundFailure { error, .. })) => {
                    anyhow::bail!("libp2p exchange failed: {error}")
                }
                _ => {}
            }
        }
        times.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(times)
}

/// Plain TCP: the same bytes written with a length prefix, answered by a 1-byte ack.
async fn tcp_exchange(bytes: usize, reps: usize) -> Result<Vec<f64>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else { return };
        let _ = s.set_nodelay(true);
        let mut buf = Vec::new();
        loop {
            let Ok(n) = s.read_u32_le().await else { return };
            buf.resize(n as usize, 0);
            if s.read_exact(&mut buf).await.is_err() || s.write_all(b"k").await.is_err() {
                return;
            }
        }
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let payload = vec![7u8; bytes];
    let mut ack = [0u8; 1];
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        s.write_u32_le(bytes as u32).await?;
        s.write_all(&payload).await?;
        s.read_exact(&mut ack).await?;
        times.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(times)
}

/// Runs the whole benchmark.
pub fn run(base: &RunConfig, rounds: u64, dir: &Path) -> Result<P2pBench> {
    let mut clusters = Vec::new();
    for peers in WORLDS {
        let c = cluster(base, peers, rounds, &dir.join(format!("p{peers}")), &[])?;
        eprintln!(
            "{peers} peers: {:.1} ms/round, {:.0} samples/s (steady)",
            c.round_ms, c.steady_samples_per_s
        );
        clusters.push(c);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut exchange = Vec::new();
    for (bytes, reps) in [(1 << 20, 40), (40 << 20, 5)] {
        // Interleaved, so both see the same machine load.
        let (mut l, mut t) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            l.extend(rt.block_on(libp2p_exchange(bytes, reps))?);
            t.extend(rt.block_on(tcp_exchange(bytes, reps))?);
        }
        let (l, t) = (median(l), median(t));
        exchange.push(ExchangeBench { bytes, libp2p_mb_s: l, tcp_mb_s: t, ratio: l / t });
    }
    Ok(P2pBench { dataset: base.data.dataset.to_string(), clusters, exchange })
}

/// The configuration every run of `peerless bench p2p` starts from: the defaults, on the
/// chosen dataset (MNIST when present, else digits), with the given functions per peer.
fn base_config(args: &crate::cli::BenchP2pArgs) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.data.dir = crate::common::data_dir(None);
    cfg.data.dataset = args.dataset.unwrap_or_else(|| {
        if peerless_ml::data::load(DatasetName::Mnist, &cfg.data.dir).is_ok() {
            DatasetName::Mnist
        } else {
            DatasetName::Digits
        }
    });
    cfg.cluster.compute = args.compute;
    match (args.functions_per_peer, args.against) {
        (Some(k), _) => cfg.cluster.functions_per_node = k,
        (None, Some(crate::cli::Against::Ddp)) => cfg.cluster.functions_per_node = 1,
        (None, None) => {}
    }
    cfg.p2p.tensor_transport = match (args.tensor_transport, args.against) {
        (Some(t), _) => t,
        (None, Some(crate::cli::Against::Ddp)) => peerless_runtime::config::TensorTransport::Tcp,
        (None, None) => peerless_runtime::config::TensorTransport::Libp2p,
    };
    cfg
}

/// `peerless bench p2p`: runs the benchmark (or, with `--against`, the side-by-side one) and
/// prints its tables.
pub fn run_cli(args: crate::cli::BenchP2pArgs) -> Result<std::process::ExitCode> {
    let cfg = base_config(&args);
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("peerless-bench-p2p-{}", std::process::id())));
    if args.against.is_some() {
        return super::versus::run_cli(&args, &cfg, &dir);
    }
    let r = run(&cfg, args.rounds.max(5), &dir)?;
    println!("\nP2P rounds, {} (medians, ms)", r.dataset);
    println!("peers  samples/s (steady)  round  compute   wait  exchange  aggregate  update");
    for c in &r.clusters {
        println!(
            "{:>5} {:>9.0} ({:>6.0}) {:>6.1} {:>8.1} {:>6.1} {:>9.1} {:>10.2} {:>7.2}",
            c.peers,
            c.samples_per_s,
            c.steady_samples_per_s,
            c.round_ms,
            c.compute_ms,
            c.wait_ms,
            c.exchange_ms,
            c.aggregate_ms,
            c.update_ms
        );
    }
    println!("\nexchange throughput on loopback (libp2p TCP+Noise+Yamux vs plain TCP, same run)");
    for e in &r.exchange {
        println!(
            "{:>6.1} MB: libp2p {:>7.0} MB/s, TCP {:>7.0} MB/s, ratio {:.2}",
            e.bytes as f64 / (1 << 20) as f64,
            e.libp2p_mb_s,
            e.tcp_mb_s,
            e.ratio
        );
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
