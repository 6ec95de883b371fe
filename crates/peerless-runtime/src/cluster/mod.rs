//! A cluster on this machine, as `peerless train --arch p2p|ps` runs it: every node a real
//! process, on loopback or on a host of its own (`launcher.netns`), supervised, with the
//! scenario's faults injected.
//!
//! - `layout` — the nodes' files, ports, store credentials, fault schedule and attackers.
//!   On a shared Redis the run's per-node ACL users ([`crate::store::acl`]) are created
//!   before the nodes start and deleted when the run ends, whatever ends it.
//! - [`supervise`] — runs the node processes, restarts the PS, decides when the run ends.
//! - [`faults`] — signals on a schedule; network faults through the loopback fault proxy or
//!   on the hosts' links.
//! - [`netns`] — hosts of their own (`launcher.netns`): a network namespace per node, linked
//!   through a bridge; partitions and bandwidth caps on those links.
//! - [`churn`] — a `churn` fault's seeded stream of kills, stops and partitions.
//! - `events` — [`ClusterEvent`], what the launcher records in the run's `events.jsonl`.
//! - `services` — the nodes' function services, which keep their instances warm across a
//!   node's restart; stopped when the run ends, whatever ends it.
//! - `collect` — merges the nodes' files into the run directory; the cluster's summary.
//! - `summary` — [`ClusterSummary`], [`NodeOutcome`], [`Exit`], [`Recovery`]: what the run
//!   reports, read back by the report through the same types.
//!
//! [`run`] is the whole of it; the caller says how to show progress ([`Show`]) and counts
//! Ctrl-C presses ([`Launcher`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use anyhow::{Context, Result, bail};

use crate::config::{Compute, RunConfig, TrainArch};
use crate::node::Progress;
use crate::rundir::RunDir;
use crate::scenario::FaultSpec;
use crate::store::acl::{Admin, NodeUsers, SharedStore};

pub mod churn;
mod collect;
mod events;
pub mod faults;
mod layout;
pub mod netns;
mod services;
mod summary;
pub mod supervise;

pub use events::{ClusterEvent, FaultRecord};
pub use summary::{ClusterSummary, Exit, NodeOutcome, Recovery};
use supervise::Supervisor;

/// How the launcher shows a run to its user.
pub trait Show {
    /// A line for the user (a fault injected, a node that died).
    fn say(&self, line: &str);
    /// A node reported round `p.round`; `position` is the cluster's highest round,
    /// `accuracy` the newest test accuracy reported.
    fn progress(&self, position: u64, p: &Progress, accuracy: Option<f32>);
    /// The run is over.
    fn finish(&self);
}

/// What runs a cluster: the executable of the nodes, how progress is shown, and the Ctrl-C
/// presses so far.
pub struct Launcher<'a> {
    /// The `peerless` executable (`peerless peer|ps|worker --config …`).
    pub exe: PathBuf,
    /// Where progress and messages go.
    pub show: &'a dyn Show,
    /// Ctrl-C presses, counted by the caller's handler.
    pub interrupts: Arc<AtomicU32>,
}

impl std::fmt::Debug for Launcher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher").field("exe", &self.exe).finish_non_exhaustive()
    }
}

/// How a cluster run ended.
#[derive(Debug)]
pub struct Ran {
    /// The summary written to `summary.json` (its `error` says why a failed run failed).
    pub summary: ClusterSummary,
    /// Ctrl-C stopped it.
    pub interrupted: bool,
}

/// Runs a cluster of `arch` in `dir` with `faults` until every node is gone, then merges the
/// nodes' files into the run directory and writes the cluster's summary.
pub fn run(
    cfg: &RunConfig,
    dir: &mut RunDir,
    faults: &[FaultSpec],
    arch: TrainArch,
    launcher: &Launcher,
) -> Result<Ran> {
    if arch == TrainArch::Local {
        bail!("a local run has no cluster");
    }
    let admin = shared_redis(cfg)?;
    let layout = layout::lay_out(cfg, dir.path(), faults, arch, admin.is_some())?;
    // Created before any node starts; deleted when this guard drops, whatever ends the run.
    let store_users = match admin {
        Some(admin) => Some(NodeUsers::create(admin, &layout.store_users).context("per-node Redis users")?),
        None => None,
    };
    record_start(cfg, dir, arch, &layout)?;
    let configs: Vec<PathBuf> = layout.nodes.iter().map(|n| n.config.clone()).collect();
    let services = services::Services::start(cfg, &launcher.exe, &layout.nodes)?;
    // Held until the nodes and their services are gone; dropping it removes the hosts.
    let hosts = layout.hosts;
    let supervised = Supervisor::new(cfg, dir, layout.nodes, layout.injector, launcher).run()?;
    drop(services);
    drop(hosts);
    drop(store_users);
    let mut recoveries = supervised.recoveries;
    for rec in &mut recoveries {
        rec.resumed_from_round = last_resume(&configs[rec.index]);
        rec.rounds_lost = rec.resumed_from_round.map(|r| rec.died_at_round.saturating_sub(r));
        dir.record(&ClusterEvent::Recovery(rec.clone()))?;
    }
    let per_node = collect::merge(dir, &configs)?;
    let mut summary = collect::summarize(cfg, dir, arch, per_node, &layout.attacks, supervised.wall_s);
    let (rounds, test_accuracy, replicas_agree) =
        (summary.rounds, summary.test_accuracy, summary.replicas_agree);
    dir.record(&ClusterEvent::Finish { rounds, test_accuracy, replicas_agree })?;
    summary.recoveries = recoveries;
    summary.nodes = supervised.outcomes;
    for n in &mut summary.nodes {
        n.completed &= summary.per_peer.iter().any(|s| s.peer as usize == n.index && s.completed);
    }
    if let Some(why) = supervised.fatal {
        summary.completed = false;
        summary.error = Some(why);
    }
    dir.summary(&summary)?;
    Ok(Ran { summary, interrupted: supervised.interrupted })
}

/// The administrator of the shared Redis `cluster.store` names, which makes the nodes' users;
/// `None` for embedded stores, or a `redis://` URL served by a peerless embedded store (it has
/// one password and no users: every node's functions then share it, as the log warns).
fn shared_redis(cfg: &RunConfig) -> Result<Option<Admin>> {
    if !cfg.cluster.store.starts_with("redis://") {
        return Ok(None);
    }
    match Admin::probe(&cfg.cluster.store).context("cluster.store")? {
        SharedStore::Redis(admin) => Ok(Some(admin)),
        SharedStore::Embedded => {
            tracing::warn!(
                "cluster.store is a peerless embedded store: it has no per-node users, so every node's \
                 functions share its password"
            );
            Ok(None)
        }
    }
}

/// Records the run's start, the faults skipped, and the function faults every invocation
/// may meet.
fn record_start(cfg: &RunConfig, dir: &mut RunDir, arch: TrainArch, layout: &layout::Layout) -> Result<()> {
    let compute = cfg.cluster.compute.to_string();
    dir.record(&ClusterEvent::Start { arch: arch.to_string(), nodes: layout.nodes.len(), compute })?;
    for rec in &layout.skipped {
        dir.record(rec)?;
    }
    if cfg.function.faults.any() && cfg.cluster.compute == Compute::Functions {
        dir.record(&ClusterEvent::FaultInjected(FaultRecord {
            fault: "function_faults".into(),
            targets: vec!["functions".into()],
            round: Some(0),
            rates: Some(cfg.function.faults.clone()),
            ..FaultRecord::default()
        }))?;
    }
    Ok(())
}

/// The round a restarted node last resumed from, from its own events (its last `resume`).
fn last_resume(config: &std::path::Path) -> Option<u64> {
    let ev = std::fs::read_to_string(config.with_file_name("events.jsonl")).unwrap_or_default();
    ev.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "resume")
        .and_then(|v| v["round"].as_u64())
}
