//! `peerless bench link`: the same P2P run on uncapped links and on links capped at a rate
//! (the fault proxy's cap, or `tc … tbf` on hosts of their own with `--netns`), interleaved,
//! with each one's round-time split (compute / exchange / wait) and the capped ÷ uncapped
//! ratio of every part.

use std::path::Path;

use anyhow::{Context, Result, bail};
use peerless_runtime::config::RunConfig;
use peerless_runtime::scenario::FaultSpec;
use serde::Serialize;

use super::p2p::{ClusterBench, cluster};
use super::versus::median_cluster;

/// Results of `peerless bench link`.
#[derive(Debug, Serialize)]
pub struct LinkBench {
    /// Peers.
    pub peers: u32,
    /// The cap, Mbit/s per direction per host.
    pub rate_mbit: f64,
    /// Where the cap was made: `netns` (`tc tbf` on the hosts' links) or `proxy`.
    pub links: &'static str,
    /// Medians over the passes, uncapped.
    pub uncapped: ClusterBench,
    /// Medians over the passes, capped.
    pub capped: ClusterBench,
}

/// A `bandwidth` fault capping every one of `peers` at `rate_mbit` from the first round.
fn cap_every_link(peers: u32, rate_mbit: f64) -> Result<FaultSpec> {
    let targets: Vec<String> = (0..peers).map(|i| format!("\"node:{i}\"")).collect();
    let text = format!(
        "kind = \"bandwidth\"\ntargets = [{}]\nat_round = 0\nrate_mbit = {rate_mbit:?}\n",
        targets.join(", ")
    );
    toml::from_str(&text).context("the benchmark's bandwidth fault")
}

/// Runs `passes` interleaved pairs (uncapped, capped) of `rounds` rounds on `peers` peers.
pub fn run(
    base: &RunConfig,
    peers: u32,
    rate_mbit: f64,
    rounds: u64,
    passes: usize,
    dir: &Path,
) -> Result<LinkBench> {
    let cap = [cap_every_link(peers, rate_mbit)?];
    let (mut free, mut capped) = (Vec::new(), Vec::new());
    for pass in 0..passes {
        for (name, faults, runs) in [("uncapped", &[][..], &mut free), ("capped", &cap[..], &mut capped)] {
            let out = dir.join(format!("pass{pass}-{name}"));
            let c = cluster(base, peers, rounds, &out, faults)
                .with_context(|| format!("the {name} run of pass {}", pass + 1))?;
            eprintln!(
                "pass {}/{passes}, {name}: {:.1} ms/round (compute {:.1}, exchange {:.1}, wait {:.1})",
                pass + 1,
                c.round_ms,
                c.compute_ms,
                c.exchange_ms,
                c.wait_ms
            );
            runs.push(c);
        }
    }
    let links = if base.launcher.netns { "netns" } else { "proxy" };
    let uncapped = median_cluster(&free.iter().collect::<Vec<_>>());
    let capped = median_cluster(&capped.iter().collect::<Vec<_>>());
    Ok(LinkBench { peers, rate_mbit, links, uncapped, capped })
}

/// `peerless bench link`: runs the benchmark and prints its table.
pub fn run_cli(args: crate::cli::BenchLinkArgs) -> Result<std::process::ExitCode> {
    if !(args.rate_mbit.is_finite() && args.rate_mbit > 0.0) {
        bail!("--rate-mbit {}: must be a positive number of Mbit/s", args.rate_mbit);
    }
    if args.peers < 2 {
        bail!("--peers {}: a link needs at least 2 peers", args.peers);
    }
    let mut cfg = RunConfig::default();
    cfg.data.dir = crate::common::data_dir(None);
    cfg.data.dataset = args.dataset.unwrap_or(peerless_ml::DatasetName::Digits);
    cfg.cluster.functions_per_node = args.functions_per_peer;
    cfg.cluster.compute = args.compute;
    if let Some(s) = args.sync {
        cfg.p2p.sync = s;
    }
    if let Some(h) = args.inner_steps {
        cfg.p2p.inner_steps = h;
    }
    if args.netns {
        if let Some(why) = peerless_runtime::cluster::netns::unavailable() {
            bail!("--netns: {why}");
        }
        cfg.launcher.netns = true;
    }
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("peerless-bench-link-{}", std::process::id())));
    let r = run(&cfg, args.peers, args.rate_mbit, args.rounds.max(5), args.passes.max(1), &dir)?;
    print_table(&r, &cfg);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_table(r: &LinkBench, cfg: &RunConfig) {
    let (u, c) = (&r.uncapped, &r.capped);
    println!(
        "\nRound time, {} peers, {} on {}, sync {}, links capped at {} Mbit/s by {} (medians, ms)",
        r.peers, cfg.model.arch, cfg.data.dataset, cfg.p2p.sync, r.rate_mbit, r.links
    );
    println!(
        "{:<20} {:>8} {:>8} {:>9} {:>8} {:>10}",
        "", "round", "compute", "exchange", "wait", "samples/s"
    );
    for (name, x) in [("uncapped", u), (format!("{} Mbit/s", r.rate_mbit).as_str(), c)] {
        println!(
            "{name:<20} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>10.0}",
            x.round_ms, x.compute_ms, x.exchange_ms, x.wait_ms, x.steady_samples_per_s
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "-".into() };
    println!(
        "{:<20} {:>8} {:>8} {:>9} {:>8} {:>10}",
        "capped ÷ uncapped",
        ratio(c.round_ms, u.round_ms),
        ratio(c.compute_ms, u.compute_ms),
        ratio(c.exchange_ms, u.exchange_ms),
        ratio(c.wait_ms, u.wait_ms),
        ratio(c.steady_samples_per_s, u.steady_samples_per_s)
    );
}
