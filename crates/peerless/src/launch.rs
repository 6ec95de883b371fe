//! `peerless train --arch p2p|ps` on this machine: runs the cluster through
//! `peerless_runtime::cluster` with a progress bar and Ctrl-C, prints its summary, and turns
//! how it ended into the exit code.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use peerless_runtime::cluster::{self, ClusterSummary, Launcher, Show};
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::node::Progress;
use peerless_runtime::rundir::RunDir;
use peerless_runtime::scenario::FaultSpec;

/// `peerless train --arch p2p`: starts the cluster, injects `faults`, and waits for it.
pub fn launch(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    run(cfg, dir, faults, TrainArch::P2p, false)
}

/// A P2P run for a benchmark: as [`launch`], without the progress bar and the summary (the
/// benchmark prints its own line per run).
pub fn launch_quiet(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    run(cfg, dir, faults, TrainArch::P2p, true)
}

/// `peerless train --arch ps`: the parameter server and its workers.
pub fn launch_ps(cfg: &RunConfig, dir: &mut RunDir, faults: &[FaultSpec]) -> Result<ExitCode> {
    run(cfg, dir, faults, TrainArch::Ps, false)
}

fn run(
    cfg: &RunConfig,
    dir: &mut RunDir,
    faults: &[FaultSpec],
    arch: TrainArch,
    quiet: bool,
) -> Result<ExitCode> {
    let label = format!("{arch}×{} {} on {}", cfg.cluster.nodes, cfg.model.arch, cfg.data.dataset);
    let bar = if quiet { Bar(ProgressBar::hidden()) } else { Bar::new(label) };
    let launcher = Launcher {
        exe: std::env::current_exe().context("locating the peerless executable")?,
        show: &bar,
        interrupts: count_interrupts(),
    };
    let ran = cluster::run(cfg, dir, faults, arch, &launcher)?;
    let s = &ran.summary;
    if let Some(why) = &s.error {
        bail!("{why}\n(run files: {})", dir.path().display());
    }
    if !quiet {
        print_summary(s, dir.path());
    }
    if ran.interrupted {
        return Ok(ExitCode::from(130));
    }
    if s.diverged {
        eprintln!("the model diverged: training stopped at round {} (see the diverged events)", s.rounds);
        return Ok(ExitCode::SUCCESS);
    }
    if !s.completed || s.per_peer.is_empty() {
        let died: Vec<String> = s
            .nodes
            .iter()
            .filter(|n| !n.completed)
            .map(|n| {
                let why = n.error.clone().or(n.stopped.clone()).unwrap_or_else(|| n.exit.to_string());
                format!("{} {}: {why}", n.node, n.index)
            })
            .collect();
        bail!("no node finished every round ({}); logs under {}", died.join("; "), dir.path().display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Counts Ctrl-C presses for the supervisor. A SIGTERM counts as one too: a launcher told to
/// terminate stops its nodes and removes what it made (a shared Redis's per-node users) as it
/// does for Ctrl-C, instead of dying with them in place.
fn count_interrupts() -> Arc<AtomicU32> {
    let count = Arc::new(AtomicU32::new(0));
    let c = count.clone();
    crate::common::on_interrupt(move |_| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    let c = count.clone();
    crate::common::on_terminate(move || {
        c.fetch_add(1, Ordering::Relaxed);
    });
    count
}

/// The launcher's progress bar.
struct Bar(ProgressBar);

impl Bar {
    fn new(label: String) -> Bar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} rounds {msg}")
                .expect("invariant: valid template"),
        );
        bar.set_prefix(label);
        Bar(bar)
    }
}

impl Show for Bar {
    /// Above the bar, or on stderr when there is no bar (not a terminal: indicatif then drops
    /// `println`).
    fn say(&self, line: &str) {
        if self.0.is_hidden() {
            eprintln!("{line}");
        } else {
            self.0.println(line);
        }
    }

    fn progress(&self, position: u64, p: &Progress, accuracy: Option<f32>) {
        self.0.set_length(p.total);
        self.0.set_position(position);
        let acc = accuracy.map(|a| format!(" acc {:.2}%", a * 100.0)).unwrap_or_default();
        let loss = p.loss.map(|l| format!("loss {l:.4}")).unwrap_or_default();
        self.0.set_message(format!("{loss}{acc} view {}", p.view));
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
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
