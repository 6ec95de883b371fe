//! The end of a cluster run: every node's metrics and events merged into the run directory's
//! as one timeline, and the cluster's summary built from the nodes' own.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use peerless_core::cost::pico_to_usd;

use super::ClusterSummary;
use super::layout::Attacks;
use crate::config::{RunConfig, TrainArch};
use crate::node::{NodeRow, NodeSummary};
use crate::rundir::RunDir;

/// Merges the files of the nodes started from `configs` into `dir`; returns their summaries.
pub(super) fn merge(dir: &RunDir, configs: &[PathBuf]) -> Result<Vec<NodeSummary>> {
    let mut per_node = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    let mut events: Vec<(u64, String)> = Vec::new();
    for ndir in configs.iter().filter_map(|c| c.parent()) {
        if let Ok(text) = std::fs::read_to_string(ndir.join("summary.json"))
            && let Ok(s) = serde_json::from_str::<NodeSummary>(&text)
        {
            per_node.push(s);
        }
        if let Ok(text) = std::fs::read_to_string(ndir.join("metrics.csv")) {
            rows.extend(text.lines().skip(1).map(str::to_owned));
        }
        if let Ok(text) = std::fs::read_to_string(ndir.join("events.jsonl")) {
            events.extend(text.lines().map(|l| (stamp(l), l.to_owned())));
        }
    }
    // Rows sorted by time (then node), so the file reads as the cluster's timeline.
    rows.sort_by_key(|l| l.split(',').next().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0));
    let metrics = std::iter::once(NodeRow::header()).chain(rows).collect::<Vec<_>>().join("\n") + "\n";
    write(&dir.path().join("metrics.csv"), metrics)?;
    events.sort_by_key(|(t, _)| *t);
    let epath = dir.path().join("events.jsonl");
    let mut text = std::fs::read_to_string(&epath).unwrap_or_default();
    for (_, l) in &events {
        text.push_str(l);
        text.push('\n');
    }
    write(&epath, text)?;
    per_node.sort_by_key(|s| s.peer);
    Ok(per_node)
}

/// An event line's `t_ms` (0 when it has none).
fn stamp(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["t_ms"].as_u64()).unwrap_or(0)
}

fn write(path: &Path, text: String) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The cluster's summary from its nodes' (`per_node`, by index): the model of the
/// lowest-indexed honest node that finished (a peer, or the PS), costs and traffic summed.
pub(super) fn summarize(
    cfg: &RunConfig,
    dir: &RunDir,
    arch: TrainArch,
    per_node: Vec<NodeSummary>,
    attacks: &Attacks,
    wall: f64,
) -> ClusterSummary {
    // Byzantine nodes' models are not the run's result.
    let attackers: Vec<u32> = attacks.keys().map(|&i| i as u32).collect();
    // Nodes holding a model: every honest peer, or the PS (workers report no digest).
    let honest = |s: &&NodeSummary| !s.param_digest.is_empty() && !attackers.contains(&s.peer);
    let mut finished: Vec<&NodeSummary> = per_node.iter().filter(honest).filter(|s| s.completed).collect();
    let diverged = finished.is_empty() && per_node.iter().filter(honest).any(|s| s.diverged);
    if diverged {
        finished = per_node.iter().filter(honest).filter(|s| s.diverged).collect();
    }
    let digests: Vec<(u32, String)> = finished.iter().map(|s| (s.peer, s.param_digest.clone())).collect();
    let first = finished.first();
    let sum = |f: fn(&NodeSummary) -> u64| per_node.iter().map(f).sum::<u64>();
    let (function_pico, node_pico) = (sum(|s| s.function_cost_pico), sum(|s| s.node_cost_pico));
    ClusterSummary {
        run: dir.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        arch: arch.to_string(),
        compute: cfg.cluster.compute.to_string(),
        model: cfg.model.arch.to_string(),
        dataset: cfg.data.dataset.to_string(),
        seed: cfg.seed,
        peers: cfg.cluster.nodes,
        completed: !finished.is_empty() && !diverged,
        diverged,
        rounds: per_node.iter().map(|s| s.rounds).max().unwrap_or(0),
        test_accuracy: first.map_or(0.0, |s| s.test_accuracy),
        test_loss: first.map_or(f32::NAN, |s| s.test_loss),
        replicas_agree: digests.windows(2).all(|w| w[0].1 == w[1].1),
        param_digests: digests,
        wall_time_s: wall,
        samples_per_s: sum(|s| s.samples) as f64 / wall.max(1e-9),
        invocations: sum(|s| s.invocations),
        cold_starts: sum(|s| s.cold_starts),
        function_cost_usd: pico_to_usd(function_pico),
        node_cost_usd: pico_to_usd(node_pico),
        total_cost_usd: pico_to_usd(function_pico + node_pico),
        bytes_exchanged: sum(|s| s.bytes_out),
        per_peer: per_node,
        recoveries: Vec::new(),
        nodes: Vec::new(),
        error: None,
    }
}
