//! `peerless bench p2p --against ddp`: peerless P2P training, serverful (`compute = local`) and
//! serverless (`compute = functions`), side by side with PyTorch DDP (gloo, one thread per
//! rank) on the same model, batch per node, learning rate and world size W = 1, 2, 4.
//!
//! Each pass runs, for each W in turn, DDP(W), then peerless serverful, then serverless, each
//! for `--rounds` rounds (= DDP steps), so all three see the same machine load; the table shows
//! medians of the passes, and each ratio is peerless's median steady samples/s over DDP's.
//! Without a Python that has torch, the peerless rows are printed alone, with the reason.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use peerless_core::optim::OptimizerConfig;
use peerless_runtime::config::{Compute, RunConfig};
use serde::Serialize;

use super::ddp::{self, DdpRun};
use super::p2p::{ClusterBench, WORLDS, cluster, median};

/// One world size in one pass: its three runs.
#[derive(Debug, Clone, Serialize)]
pub struct PassRuns {
    /// Pass, from 1.
    pub pass: usize,
    /// Nodes: DDP ranks and peerless peers.
    pub world: u32,
    /// DDP (none without torch, or after a DDP failure).
    pub ddp: Option<DdpRun>,
    /// peerless, gradients in the peer processes.
    pub serverful: ClusterBench,
    /// peerless, gradients in function invocations.
    pub serverless: ClusterBench,
}

/// One world size: medians of the passes, and the ratios.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Nodes.
    pub world: u32,
    /// DDP, every field the median of the passes.
    pub ddp: Option<DdpRun>,
    /// peerless serverful, every field the median of the passes.
    pub serverful: ClusterBench,
    /// peerless serverless, every field the median of the passes.
    pub serverless: ClusterBench,
    /// Serverful steady samples/s ÷ DDP's.
    pub serverful_ratio: Option<f64>,
    /// Serverless steady samples/s ÷ DDP's.
    pub serverless_ratio: Option<f64>,
}

/// Results of `peerless bench p2p --against ddp`, printed as tables and written as JSON.
#[derive(Debug, Serialize)]
pub struct Versus {
    /// Dataset of the peerless runs (DDP trains on random tensors of the same shape).
    pub dataset: String,
    /// e.g. `MLP 784-256-128-10`.
    pub model: String,
    /// Rounds per peerless run, steps per DDP run.
    pub rounds: u64,
    /// Passes run.
    pub passes: usize,
    /// Gradient functions per peer.
    pub functions_per_peer: u32,
    /// `p2p.tensor_transport` of the peerless runs.
    pub tensor_transport: String,
    /// Samples per node per round (a DDP rank's batch).
    pub batch_per_node: usize,
    /// torch's version, when DDP ran.
    pub torch: Option<String>,
    /// Why DDP is missing (no torch) or incomplete (a run failed).
    pub torch_note: Option<String>,
    /// Per world size, medians.
    pub rows: Vec<Row>,
    /// Every run of every pass.
    pub runs: Vec<PassRuns>,
}

/// `peerless bench p2p --against ddp`: measures, prints the tables and the summary line,
/// writes the JSON.
pub fn run_cli(args: &crate::cli::BenchP2pArgs, cfg: &RunConfig, dir: &Path) -> Result<ExitCode> {
    let rounds = args.rounds.max(5);
    let features = peerless_ml::data::load(cfg.data.dataset, &cfg.data.dir)
        .with_context(|| format!("loading {}", cfg.data.dataset))?
        .train
        .features();
    let (spec, torch, note) = match super::find_torch(args.python.as_deref()) {
        Ok((python, version)) => (Some(ddp_spec(cfg, python, features, rounds)?), Some(version), None),
        Err(e) => (None, None, Some(format!("{e:#}"))),
    };
    if let Some(n) = &note {
        eprintln!("PyTorch DDP: not measured: {n}");
    }
    let mut v = Versus {
        dataset: cfg.data.dataset.to_string(),
        model: model_name(features, &cfg.model.hidden),
        rounds,
        passes: args.passes.max(1),
        functions_per_peer: cfg.cluster.functions_per_node,
        tensor_transport: cfg.p2p.tensor_transport.to_string(),
        batch_per_node: batch_per_node(cfg),
        torch,
        torch_note: note,
        rows: Vec::new(),
        runs: Vec::new(),
    };
    run(cfg, spec, &mut v, dir)?;
    print(&v);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Samples a node computes per round: `functions_per_node × batch_size`.
fn batch_per_node(cfg: &RunConfig) -> usize {
    cfg.cluster.functions_per_node as usize * cfg.train.batch_size
}

fn model_name(features: usize, hidden: &[usize]) -> String {
    let widths: Vec<String> =
        std::iter::once(features).chain(hidden.iter().copied()).chain([10]).map(|w| w.to_string()).collect();
    format!("MLP {}", widths.join("-"))
}

/// The DDP runs' setup, from the peerless runs' configuration.
fn ddp_spec(cfg: &RunConfig, python: String, features: usize, steps: u64) -> Result<ddp::Spec> {
    let OptimizerConfig::Sgd { lr, momentum, .. } = cfg.optimizer else {
        anyhow::bail!("--against ddp compares SGD runs; the optimizer is {:?}", cfg.optimizer)
    };
    Ok(ddp::Spec {
        python,
        features,
        hidden: cfg.model.hidden.clone(),
        batch: batch_per_node(cfg),
        lr,
        momentum,
        steps,
    })
}

/// Runs every pass into `v.runs` (DDP runs stop at the first DDP failure, noted in
/// `v.torch_note`), then fills `v.rows`.
fn run(cfg: &RunConfig, mut spec: Option<ddp::Spec>, v: &mut Versus, dir: &Path) -> Result<()> {
    for pass in 1..=v.passes {
        let pass_dir = dir.join(format!("pass{pass}"));
        for world in WORLDS {
            let at = format!("pass {pass}/{}, W = {world}", v.passes);
            let mut ddp_run = None;
            if let Some(s) = &spec {
                match ddp::run(s, world, &pass_dir.join(format!("ddp-w{world}"))) {
                    Ok(r) => {
                        eprintln!("{at}: DDP {:.2} ms/step, {:.0} samples/s", r.step_ms, r.samples_per_s);
                        ddp_run = Some(r);
                    }
                    Err(e) => {
                        eprintln!("{at}: DDP failed, no more DDP runs: {e:#}");
                        v.torch_note = Some(format!("DDP failed at {at}: {e:#}"));
                        spec = None;
                    }
                }
            }
            let serverful = peerless(cfg, world, Compute::Local, v.rounds, &pass_dir, &at)?;
            let serverless = peerless(cfg, world, Compute::Functions, v.rounds, &pass_dir, &at)?;
            v.runs.push(PassRuns { pass, world, ddp: ddp_run, serverful, serverless });
        }
    }
    v.rows = WORLDS.iter().map(|&w| row(w, &v.runs)).collect();
    Ok(())
}

/// One peerless run of `world` peers computing on `compute`, in `pass_dir/<compute>-p<world>`.
fn peerless(
    cfg: &RunConfig,
    world: u32,
    compute: Compute,
    rounds: u64,
    pass_dir: &Path,
    at: &str,
) -> Result<ClusterBench> {
    let mut c = cfg.clone();
    c.cluster.compute = compute;
    let out = pass_dir.join(format!("{compute}-p{world}"));
    let r = cluster(&c, world, rounds, &out, &[]).with_context(|| format!("peerless {compute} at {at}"))?;
    eprintln!(
        "{at}: peerless {} {:.2} ms/round, {:.0} samples/s",
        variant(compute),
        r.round_ms,
        r.steady_samples_per_s
    );
    Ok(r)
}

fn variant(compute: Compute) -> &'static str {
    match compute {
        Compute::Local => "serverful",
        Compute::Functions => "serverless",
    }
}

/// The medians of world size `world` over the passes in `runs`.
fn row(world: u32, runs: &[PassRuns]) -> Row {
    let mine: Vec<&PassRuns> = runs.iter().filter(|r| r.world == world).collect();
    let serverful = median_cluster(&mine.iter().map(|r| &r.serverful).collect::<Vec<_>>());
    let serverless = median_cluster(&mine.iter().map(|r| &r.serverless).collect::<Vec<_>>());
    let ddp = median_ddp(&mine.iter().filter_map(|r| r.ddp.as_ref()).collect::<Vec<_>>());
    let theirs = ddp.as_ref().map(|d| d.samples_per_s);
    Row {
        world,
        serverful_ratio: theirs.and_then(|t| ratio(serverful.steady_samples_per_s, t)),
        serverless_ratio: theirs.and_then(|t| ratio(serverless.steady_samples_per_s, t)),
        ddp,
        serverful,
        serverless,
    }
}

/// `ours / theirs`, when both are finite and `theirs` is positive.
fn ratio(ours: f64, theirs: f64) -> Option<f64> {
    (ours.is_finite() && theirs.is_finite() && theirs > 0.0).then(|| ours / theirs)
}

/// The median of `f` over `items`.
fn median_of<T>(items: &[&T], f: impl Fn(&T) -> f64) -> f64 {
    median(items.iter().map(|x| f(x)).collect())
}

/// Field by field medians of peerless runs of one world size (at least one run).
pub(super) fn median_cluster(runs: &[&ClusterBench]) -> ClusterBench {
    let m = |f: fn(&ClusterBench) -> f64| median_of(runs, f);
    ClusterBench {
        peers: runs.first().map_or(0, |r| r.peers),
        rounds: runs.first().map_or(0, |r| r.rounds),
        samples_per_s: m(|c| c.samples_per_s),
        steady_samples_per_s: m(|c| c.steady_samples_per_s),
        round_ms: m(|c| c.round_ms),
        compute_ms: m(|c| c.compute_ms),
        wait_ms: m(|c| c.wait_ms),
        exchange_ms: m(|c| c.exchange_ms),
        aggregate_ms: m(|c| c.aggregate_ms),
        update_ms: m(|c| c.update_ms),
    }
}

/// Field by field medians of DDP runs of one world size; none when there are none.
fn median_ddp(runs: &[&DdpRun]) -> Option<DdpRun> {
    let first = runs.first()?;
    let m = |f: fn(&DdpRun) -> f64| median_of(runs, f);
    Some(DdpRun {
        world: first.world,
        step_ms: m(|d| d.step_ms),
        fwd_bwd_ms: m(|d| d.fwd_bwd_ms),
        optim_ms: m(|d| d.optim_ms),
        bare_ms: m(|d| d.bare_ms),
        comm_ms: m(|d| d.comm_ms),
        torch: first.torch.clone(),
        samples_per_s: m(|d| d.samples_per_s),
    })
}

/// `v` with `decimals`, or `-` when absent or not finite.
fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "-".into(),
    }
}

/// `0.43×`, or `-`.
fn times(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |x| format!("{x:.2}×"))
}

/// Prints the samples/s table, both sides' splits and the summary line.
fn print(v: &Versus) {
    let reference = v.torch.as_ref().map_or_else(|| "PyTorch DDP".to_owned(), |t| format!("PyTorch {t} DDP"));
    println!(
        "\npeerless P2P vs {reference} (gloo, 1 thread per rank): {} on {}, batch {} per node \
         ({} function{} per peer), {} rounds = steps, medians of {} interleaved pass{}; \
         peerless's gradients over {}",
        v.model,
        v.dataset,
        v.batch_per_node,
        v.functions_per_peer,
        if v.functions_per_peer == 1 { "" } else { "s" },
        v.rounds,
        v.passes,
        if v.passes == 1 { "" } else { "es" },
        match v.tensor_transport.as_str() {
            "tcp" => "plain TCP lanes (p2p.tensor_transport = \"tcp\", unencrypted like gloo)",
            _ => "libp2p (TCP + Noise + Yamux)",
        },
    );
    println!("\nsamples/s, steady state (ratio: peerless ÷ DDP)");
    println!("{:>3} {:>9} {:>11} {:>7} {:>11} {:>7}", "W", "DDP", "serverful", "÷DDP", "serverless", "÷DDP");
    for r in &v.rows {
        println!(
            "{:>3} {:>9} {:>11.0} {:>7} {:>11.0} {:>7}",
            r.world,
            num(r.ddp.as_ref().map(|d| d.samples_per_s), 0),
            r.serverful.steady_samples_per_s,
            times(r.serverful_ratio),
            r.serverless.steady_samples_per_s,
            times(r.serverless_ratio),
        );
    }
    if v.rows.iter().any(|r| r.ddp.is_some()) {
        println!("\nDDP step (ms): bare = the same step without communication; comm ≈ step − bare");
        println!("{:>3} {:>7} {:>8} {:>7} {:>7} {:>7}", "W", "step", "fwd+bwd", "optim", "bare", "comm");
        for r in &v.rows {
            let Some(d) = &r.ddp else { continue };
            println!(
                "{:>3} {:>7.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2}",
                r.world, d.step_ms, d.fwd_bwd_ms, d.optim_ms, d.bare_ms, d.comm_ms
            );
        }
    }
    println!("\npeerless round (ms)");
    println!(
        "{:>3} {:<10} {:>7} {:>8} {:>7} {:>9} {:>10} {:>7}",
        "W", "variant", "round", "compute", "wait", "exchange", "aggregate", "update"
    );
    for r in &v.rows {
        for (name, c) in [("serverful", &r.serverful), ("serverless", &r.serverless)] {
            let ms = |x: f64| num(Some(x), 2);
            println!(
                "{:>3} {name:<10} {:>7} {:>8} {:>7} {:>9} {:>10} {:>7}",
                r.world,
                ms(c.round_ms),
                ms(c.compute_ms),
                ms(c.wait_ms),
                ms(c.exchange_ms),
                ms(c.aggregate_ms),
                ms(c.update_ms)
            );
        }
    }
    if let Some(n) = &v.torch_note {
        println!("\nPyTorch DDP: {n}");
    }
    println!("\n{}", summary(&v.rows));
}

/// One line: each variant's ratio to DDP per world size, or its samples/s without DDP.
fn summary(rows: &[Row]) -> String {
    let per_world = |f: &dyn Fn(&Row) -> String| -> String {
        rows.iter().map(|r| format!("{} (W={})", f(r), r.world)).collect::<Vec<_>>().join(", ")
    };
    if rows.iter().any(|r| r.ddp.is_some()) {
        format!(
            "summary: peerless ÷ DDP samples/s: serverful {}; serverless {}",
            per_world(&|r| times(r.serverful_ratio)),
            per_world(&|r| times(r.serverless_ratio)),
        )
    } else {
        format!(
            "summary: DDP not measured; peerless samples/s: serverful {}; serverless {}",
            per_world(&|r| num(Some(r.serverful.steady_samples_per_s), 0)),
            per_world(&|r| num(Some(r.serverless.steady_samples_per_s), 0)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_run(peers: u32, steady: f64) -> ClusterBench {
        ClusterBench {
            peers,
            rounds: 50,
            samples_per_s: steady / 2.0,
            steady_samples_per_s: steady,
            round_ms: 64e3 * f64::from(peers) / steady,
            compute_ms: 2.0,
            wait_ms: 1.0,
            exchange_ms: 0.5,
            aggregate_ms: 0.1,
            update_ms: 0.1,
        }
    }

    fn ddp_run(world: u32, step_ms: f64) -> DdpRun {
        DdpRun {
            world,
            step_ms,
            fwd_bwd_ms: step_ms - 0.2,
            optim_ms: 0.2,
            bare_ms: 1.0,
            comm_ms: step_ms - 1.0,
            torch: "2.x".into(),
            samples_per_s: 64.0 * f64::from(world) / (step_ms / 1e3),
        }
    }

    #[test]
    fn a_row_takes_the_median_of_the_passes_and_the_ratio_of_the_medians() {
        let runs: Vec<PassRuns> = [(2.0, 10_000.0), (4.0, 30_000.0), (3.0, 20_000.0)]
            .into_iter()
            .enumerate()
            .map(|(i, (step, steady))| PassRuns {
                pass: i + 1,
                world: 2,
                ddp: Some(ddp_run(2, step)),
                serverful: cluster_run(2, steady),
                serverless: cluster_run(2, steady / 2.0),
            })
            .collect();
        let r = row(2, &runs);
        let d = r.ddp.as_ref().unwrap();
        assert_eq!(d.step_ms, 3.0);
        // 64 × 2 samples in 3 ms.
        assert!((d.samples_per_s - 128.0 / 3e-3).abs() < 1e-6, "{d:?}");
        assert_eq!(r.serverful.steady_samples_per_s, 20_000.0);
        assert_eq!(r.serverless.steady_samples_per_s, 10_000.0);
        assert!((r.serverful_ratio.unwrap() - 20_000.0 * 3e-3 / 128.0).abs() < 1e-9);
        assert!((r.serverless_ratio.unwrap() - 10_000.0 * 3e-3 / 128.0).abs() < 1e-9);
    }

    #[test]
    fn without_ddp_a_row_has_no_ratio_and_the_summary_says_so() {
        let runs = vec![PassRuns {
            pass: 1,
            world: 1,
            ddp: None,
            serverful: cluster_run(1, 5_000.0),
            serverless: cluster_run(1, 4_000.0),
        }];
        let r = row(1, &runs);
        assert!(r.ddp.is_none() && r.serverful_ratio.is_none() && r.serverless_ratio.is_none());
        let s = summary(&[r]);
        assert!(s.starts_with("summary: DDP not measured"), "{s}");
        assert!(s.contains("serverful 5000 (W=1)") && s.contains("serverless 4000 (W=1)"), "{s}");
    }

    #[test]
    fn a_ratio_needs_a_finite_positive_reference() {
        assert_eq!(ratio(10.0, 20.0), Some(0.5));
        assert_eq!(ratio(10.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 20.0), None);
        assert_eq!(times(Some(0.434)), "0.43×");
        assert_eq!(num(Some(f64::NAN), 0), "-");
    }

    #[test]
    fn the_model_is_named_by_its_widths() {
        assert_eq!(model_name(784, &[256, 128]), "MLP 784-256-128-10");
    }
}
