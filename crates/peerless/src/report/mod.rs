//! `peerless report <experiment dir>`: reads every run of an experiment and writes
//! `report.md` with the tables, and PNG and SVG charts under `report/`.
//!
//! # Layout
//! - `run`: one run directory read into series (global progress, evaluations, loss, faults).
//! - `stats`: means with Student-t intervals; downtime, recovery time, rounds lost.
//! - `goodput`: each run's throughput over its fault-free twin's (same seed).
//! - `markdown`: the report's text and tables.
//! - `plot`: the charts (plotters).
//!
//! Every number in the report is computed from the run files; nothing is typed in except the
//! published reference figures the comparison sections quote.

mod goodput;
mod markdown;
mod plot;
mod run;
mod stats;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use run::Run;

/// `experiment.json`, as `peerless experiment` writes it.
#[derive(Debug, Clone, Deserialize)]
struct ExperimentFile {
    scenarios: Vec<ScenarioSpec>,
    #[serde(default)]
    archs: Vec<String>,
    #[serde(default)]
    seeds: Vec<u64>,
    #[serde(default)]
    command: Option<String>,
}

/// One scenario of the experiment.
#[derive(Debug, Clone, Deserialize)]
struct ScenarioSpec {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    target_accuracy: Option<f64>,
    #[serde(default)]
    file: Option<String>,
    /// Its fault-free twin, for goodput (default `no-faults`).
    #[serde(default)]
    baseline: Option<String>,
}

/// The runs of one scenario and architecture.
#[derive(Debug)]
struct Cell {
    arch: String,
    /// `(seed, run)` of the finished runs.
    runs: Vec<(u64, Run)>,
    /// Seeds whose run directory has no summary.json.
    missing: Vec<u64>,
}

/// A scenario with its runs, one cell per architecture.
#[derive(Debug)]
struct ScenarioRuns {
    spec: ScenarioSpec,
    cells: Vec<Cell>,
}

impl ScenarioRuns {
    /// Finished runs of `arch`.
    fn runs(&self, arch: &str) -> &[(u64, Run)] {
        self.cells.iter().find(|c| c.arch == arch).map_or(&[], |c| c.runs.as_slice())
    }
}

/// The experiment as read from disk.
#[derive(Debug)]
struct Experiment {
    dir: PathBuf,
    file: ExperimentFile,
    scenarios: Vec<ScenarioRuns>,
}

/// What `report` wrote.
#[derive(Debug)]
pub struct Outcome {
    /// The report's path.
    pub report: PathBuf,
    /// Scenarios in the experiment.
    pub scenarios: usize,
    /// Runs with a summary.
    pub found: usize,
    /// Run directories without a summary, or absent.
    pub missing: Vec<PathBuf>,
    /// Charts written (PNG and SVG each).
    pub charts: usize,
    /// Why no chart was drawn (no font on this machine), if none was.
    pub charts_skipped: Option<String>,
}

/// The directory of one run of the matrix.
fn run_dir(exp: &Path, scenario: &str, arch: &str, seed: u64) -> PathBuf {
    exp.join(scenario).join(arch).join(format!("seed-{seed}"))
}

/// A scenario name made safe for a file name.
fn file_stem(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Reads the experiment in `dir`, writes `dir/report.md` and the charts under `dir/report/`.
pub fn run(dir: &Path) -> Result<Outcome> {
    let epath = dir.join("experiment.json");
    let text = std::fs::read_to_string(&epath).with_context(|| {
        format!("reading {} (is {} an experiment directory?)", epath.display(), dir.display())
    })?;
    let mut file: ExperimentFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", epath.display()))?;
    if file.scenarios.is_empty() {
        bail!("{} lists no scenarios", epath.display());
    }
    if file.archs.is_empty() {
        file.archs = vec!["p2p".into(), "ps".into()];
    }
    // Without a font there are no charts, but the tables are still worth having.
    let charts_skipped = plot::load_font().err().map(|e| format!("{e:#}"));

    let total = (file.scenarios.len() * file.archs.len() * file.seeds.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("report [{elapsed_precise}] {wide_bar} {pos}/{len} runs {msg}")
            .expect("invariant: valid template"),
    );
    let mut missing = Vec::new();
    let mut found = 0;
    let mut scenarios = Vec::new();
    for spec in &file.scenarios {
        let mut cells = Vec::new();
        for arch in &file.archs {
            let mut cell = Cell { arch: arch.clone(), runs: Vec::new(), missing: Vec::new() };
            for &seed in &file.seeds {
                let rdir = run_dir(dir, &spec.name, arch, seed);
                bar.set_message(format!("{}/{arch}/seed-{seed}", spec.name));
                match Run::load(&rdir).with_context(|| format!("reading the run {}", rdir.display()))? {
                    Some(r) => {
                        cell.runs.push((seed, r));
                        found += 1;
                    }
                    None => {
                        cell.missing.push(seed);
                        missing.push(rdir);
                    }
                }
                bar.inc(1);
            }
            cells.push(cell);
        }
        scenarios.push(ScenarioRuns { spec: spec.clone(), cells });
    }
    let exp = Experiment { dir: dir.to_owned(), file, scenarios };

    let out = dir.join("report");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    bar.set_message("charts");
    let mut charts = Vec::new();
    for s in &exp.scenarios {
        charts.push(if charts_skipped.is_none() {
            write_charts(s, &exp.file.archs, &out)?
        } else {
            Vec::new()
        });
    }
    let text = markdown::render(&exp, &charts);
    let report = dir.join("report.md");
    let tmp = dir.join(".report.md.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &report).with_context(|| format!("writing {}", report.display()))?;
    bar.finish_and_clear();
    Ok(Outcome {
        report,
        scenarios: exp.scenarios.len(),
        found,
        missing,
        charts: charts.iter().map(|c| c.len()).sum(),
        charts_skipped,
    })
}

/// A chart of a scenario, its files relative to the experiment directory.
#[derive(Debug, Clone)]
struct ChartFiles {
    /// `accuracy` or `loss`.
    what: &'static str,
    png: String,
    svg: String,
}

/// Writes a scenario's accuracy and loss charts; none when it has no finished run.
fn write_charts(s: &ScenarioRuns, archs: &[String], out: &Path) -> Result<Vec<ChartFiles>> {
    if s.cells.iter().all(|c| c.runs.is_empty()) {
        return Ok(Vec::new());
    }
    let lines = |f: &dyn Fn(&Run) -> Vec<(f64, f64)>| -> Vec<plot::ArchLines> {
        archs
            .iter()
            .map(|a| plot::ArchLines {
                label: markdown::arch_label(a),
                runs: s.runs(a).iter().map(|(_, r)| f(r)).collect(),
                faults: s.runs(a).iter().flat_map(|(_, r)| r.faults.iter().map(|f| f.t)).collect(),
            })
            .collect()
    };
    let stem = file_stem(&s.spec.name);
    let accuracy = plot::Chart {
        title: format!("{}: test accuracy", s.spec.name),
        y_label: "test accuracy (%)".into(),
        archs: lines(&|r| r.evals.iter().map(|&(t, a)| (t, a * 100.0)).collect()),
        y_log: false,
    };
    let loss = plot::Chart {
        title: format!("{}: training loss (moving average, log scale)", s.spec.name),
        y_label: "training loss".into(),
        archs: lines(&|r| plot::smooth(&r.loss, 100)),
        y_log: true,
    };
    let mut files = Vec::new();
    for (what, chart) in [("accuracy", accuracy), ("loss", loss)] {
        let name = format!("{stem}-{what}");
        plot::write(&chart, &out.join(&name))?;
        files.push(ChartFiles { what, png: format!("report/{name}.png"), svg: format!("report/{name}.svg") });
    }
    Ok(files)
}

/// `peerless report`: writes the report and prints where, and what it found.
pub fn run_cli(dir: &Path) -> Result<std::process::ExitCode> {
    let o = run(dir)?;
    println!("report       {}", o.report.display());
    println!("scenarios    {}", o.scenarios);
    println!("runs         {} found, {} missing", o.found, o.missing.len());
    for m in &o.missing {
        println!("  missing    {}", m.display());
    }
    match &o.charts_skipped {
        None => println!("charts       {} (PNG and SVG each) in {}", o.charts, dir.join("report").display()),
        Some(why) => println!("charts       none: {why}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PS run killed at round 3 (t = 1.35 s) that resumed from round 2 and went on.
    fn write_ps_run(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let summary = serde_json::json!({
            "arch": "ps", "compute": "functions", "seed": 1, "peers": 2, "completed": true, "rounds": 5,
            "test_accuracy": 0.9, "wall_time_s": 3.0, "invocations": 40, "cold_starts": 2,
            "total_cost_usd": 0.0009, "per_peer": [{"retries": 1}, {"retries": 2}, {"retries": 0}],
            "recoveries": [{"node": "ps", "rounds_lost": 1}],
        });
        std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
        std::fs::write(dir.join("config.toml"), "[p2p]\ncompute = \"functions\"\n").unwrap();
        let mut csv = String::from("t_ms,peer,round,train_loss,eval_round,test_accuracy,compute_ms\n");
        for (t, round, acc) in
            [(1100, 1, ""), (1200, 2, "0.5"), (1300, 3, ""), (2300, 3, ""), (2400, 4, "0.92"), (2500, 5, "")]
        {
            let eval_round = if acc.is_empty() { String::new() } else { round.to_string() };
            csv.push_str(&format!("{t},2,{round},1.0,{eval_round},{acc},\n"));
            csv.push_str(&format!("{t},0,{round},1.0,,,10\n"));
        }
        std::fs::write(dir.join("metrics.csv"), csv).unwrap();
        let events = [
            r#"{"event":"start","t_ms":1000,"arch":"ps"}"#,
            r#"{"event":"fault_injected","t_ms":1350,"fault":"kill","targets":["ps"],"round":3}"#,
            r#"{"event":"start","t_ms":1001,"peer":2}"#,
        ];
        std::fs::write(dir.join("events.jsonl"), events.join("\n")).unwrap();
    }

    #[test]
    fn report_reads_finished_runs_and_lists_unfinished_ones() {
        let dir = std::env::temp_dir().join(format!("peerless-report-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_ps_run(&run_dir(&dir, "ps-crash", "ps", 1));
        std::fs::create_dir_all(run_dir(&dir, "ps-crash", "ps", 2)).unwrap();
        let exp = serde_json::json!({
            "scenarios": [{"name": "ps-crash", "description": "The PS is killed.", "target_accuracy": 0.9}],
            "archs": ["ps"], "seeds": [1, 2], "command": "peerless experiment x",
        });
        std::fs::write(dir.join("experiment.json"), exp.to_string()).unwrap();

        let o = run(&dir).unwrap();
        assert_eq!((o.found, o.missing.len(), o.charts), (1, 1, 2));
        let md = std::fs::read_to_string(&o.report).unwrap();
        let row = |name: &str| md.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap().to_owned();
        // Evaluation ≥ 0.9 at 2.4 s; recovery: round 4 (above 3) at 2.4 s, 1.05 s after the kill.
        assert_eq!(row("Time to target accuracy (s)"), "| Time to target accuracy (s) | 1.400 (n=1) |");
        assert_eq!(row("Recovery time (s)"), "| Recovery time (s) | 1.050 (n=1) |");
        // Gaps 0.1, 0.1, 1.1 (to round 4), 0.1: downtime = 1.1 − 3 × 0.1.
        assert_eq!(row("Downtime (s)"), "| Downtime (s) | 0.8000 (n=1) |");
        assert_eq!(row("Rounds lost"), "| Rounds lost | 1 (n=1) |");
        assert_eq!(row("Retries"), "| Retries | 3 (n=1) |");
        assert_eq!(row("Cost per accuracy point ($)"), "| Cost per accuracy point ($) | 0.00001000 (n=1) |");
        assert_eq!(row("Faults injected"), "| Faults injected | 1 (n=1) |");
        // No `no-faults` twin in this experiment: no goodput, and the section says why.
        assert_eq!(row("Goodput (% of fault-free)"), "| Goodput (% of fault-free) | — |");
        assert!(md.contains("its fault-free twin `no-faults` is not in this experiment"), "{md}");
        assert!(md.contains("`ps-crash/ps/seed-2`"), "{md}");
        assert!(md.contains("Not measured: this experiment lacks"), "{md}");
        for ext in ["png", "svg"] {
            assert!(dir.join(format!("report/ps-crash-accuracy.{ext}")).exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A P2P run of `peers` peers with aggregation `rule`, final accuracy `acc`, and peer 4
    /// attacking with `attack` when given.
    fn write_p2p_run(dir: &Path, peers: u32, rule: &str, acc: f64, attack: Option<&str>) {
        std::fs::create_dir_all(dir).unwrap();
        let summary = serde_json::json!({
            "arch": "p2p", "compute": "functions", "seed": 1, "peers": peers, "completed": true, "rounds": 2,
            "test_accuracy": acc, "wall_time_s": 2.0, "invocations": 20, "cold_starts": 10,
            "total_cost_usd": 0.001, "per_peer": [],
        });
        std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
        let config = format!("[p2p]\ncompute = \"functions\"\naggregator = \"{rule}\"\n");
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let csv = "t_ms,peer,round,train_loss,eval_round,test_accuracy\n1100,0,1,1.0,,\n1200,0,2,0.9,2,0.9\n";
        std::fs::write(dir.join("metrics.csv"), csv).unwrap();
        let mut events = vec![r#"{"event":"start","t_ms":1000,"arch":"p2p"}"#.to_owned()];
        if let Some(a) = attack {
            events.push(format!(
                r#"{{"event":"fault_injected","t_ms":1000,"fault":"byzantine","attack":"{a}","targets":["peer 4"],"round":0}}"#
            ));
        }
        std::fs::write(dir.join("events.jsonl"), events.join("\n")).unwrap();
    }

    #[test]
    fn the_communication_table_names_sync_and_compression_and_bytes_per_node() {
        let dir = std::env::temp_dir().join(format!("peerless-report-comm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, extra, bytes) in [
            ("every", "", [4_000_000u64, 2_000_000]),
            (
                "diloco",
                "sync = \"diloco\"\ninner_steps = 20\ncompression = \"topk\"\ntopk_fraction = 0.05\n",
                [60_000, 40_000],
            ),
        ] {
            let run = run_dir(&dir, name, "p2p", 1);
            write_p2p_run(&run, 2, "mean", 0.9, None);
            let mut summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
            summary["per_peer"] = serde_json::json!([
                {"bytes_out": bytes[0], "max_memory_mb": 70, "function_max_memory_mb": 43, "function_memory_mb": 1769},
                {"bytes_out": bytes[1], "max_memory_mb": 90, "function_max_memory_mb": 41, "function_memory_mb": 1769}
            ]);
            std::fs::write(run.join("summary.json"), summary.to_string()).unwrap();
            let config = std::fs::read_to_string(run.join("config.toml")).unwrap() + extra;
            std::fs::write(run.join("config.toml"), config).unwrap();
        }
        let exp = serde_json::json!({
            "scenarios": [{"name": "every", "description": "x", "target_accuracy": 0.85},
                          {"name": "diloco", "description": "y", "target_accuracy": 0.85}],
            "archs": ["p2p"], "seeds": [1], "command": "peerless experiment x",
        });
        std::fs::write(dir.join("experiment.json"), exp.to_string()).unwrap();
        let md = std::fs::read_to_string(run(&dir).unwrap().report).unwrap();
        let row =
            |name: &str| md.lines().find(|l| l.starts_with(&format!("| {name} | P2P"))).unwrap().to_owned();
        assert_eq!(
            row("every"),
            "| every | P2P | every-step | none | 3.000 (n=1) | 0.2000 (n=1) | 90.00 (n=1) |"
        );
        assert_eq!(
            row("diloco"),
            "| diloco | P2P | diloco (H = 20) | topk (0.05) | 0.05000 (n=1) | 0.2000 (n=1) | 90.00 (n=1) |"
        );
        // The largest node's peak memory, in the scenario tables.
        assert!(md.contains("| Peak node memory (MB) | 90.00 (n=1) |"), "{md}");
        // Right-sizing: 43 MB × 1.2 → Lambda's 128 MB floor, 7.2 % of 1769 MB's duration charge.
        assert!(md.contains("| every | P2P | 43 | 1769 | 128 | 7.2 % | 13.8× |"), "{md}");
        assert!(
            md.contains("the smallest Lambda size with 20 % headroom is 128 MB (configured 1769 MB)"),
            "{md}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_robustness_table_compares_each_attacked_rule_with_its_clean_run() {
        let dir = std::env::temp_dir().join(format!("peerless-report-robust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let runs = [
            ("none-krum", "krum", 0.95, None),
            ("flip-krum", "krum", 0.94, Some("sign-flip")),
            ("flip-median", "median", 0.90, Some("sign-flip")),
            ("none-mean", "mean", 0.97, None),
            ("flip-mean", "mean", 0.10, Some("sign-flip")),
            ("nan-mean", "mean", 0.965, Some("nan")),
            ("flip-krum-7", "krum", 0.93, Some("sign-flip")),
        ];
        for (name, rule, acc, attack) in runs {
            let peers = if name.ends_with("-7") { 7 } else { 5 };
            write_p2p_run(&run_dir(&dir, name, "p2p", 1), peers, rule, acc, attack);
        }
        let scenarios: Vec<_> = runs
            .iter()
            .map(|(name, ..)| serde_json::json!({"name": name, "description": "x", "target_accuracy": 0.9}))
            .collect();
        let exp = serde_json::json!({
            "scenarios": scenarios, "archs": ["p2p"], "seeds": [1], "command": "peerless experiment x",
        });
        std::fs::write(dir.join("experiment.json"), exp.to_string()).unwrap();

        let md = std::fs::read_to_string(run(&dir).unwrap().report).unwrap();
        let section = &md[md.find("### P2P with 5 nodes").expect("a table for 5 P2P nodes")..];
        let line = |start: &str| section.lines().find(|l| l.starts_with(start)).unwrap().to_owned();
        assert_eq!(line("| Attack"), "| Attack (attackers) | `mean` | `krum` | `median` |");
        assert_eq!(line("| none"), "| none | 97.00 (n=1) | 95.00 (n=1) | — |");
        // The median has no clean run: its cell carries no difference and no verdict.
        assert_eq!(
            line("| sign-flip"),
            "| sign-flip (1 of 5) | 10.00 (n=1) (-87.0) | 94.00 (n=1) (-1.0) | 90.00 (n=1) |"
        );
        assert_eq!(line("| nan"), "| nan (1 of 5) | 96.50 (n=1) (-0.5) | — | — |");
        assert_eq!(
            line("More than 2 points"),
            "More than 2 points below the clean run: `mean` under sign-flip: -87.0 points."
        );
        // 7 nodes were only attacked: nothing to compare with, and the table says so.
        let seven = &md[md.find("### P2P with 7 nodes").expect("a table for 7 P2P nodes")..];
        assert!(
            seven.contains("No attacked cell has a clean run (attack `none`) with its rule to compare with."),
            "{seven}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
