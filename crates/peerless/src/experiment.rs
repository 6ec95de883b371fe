//! `peerless experiment`: runs scenarios × architectures × seeds, one run directory each.
//!
//! ```text
//! <out>/experiment.json                     scenarios, archs, seeds, the command line
//! <out>/<scenario>/<arch>/seed-<s>/         a `peerless train --scenario …` run directory
//! <out>/<scenario>/<arch>/seed-<s>.log      the launcher's output
//! ```
//!
//! Each run is a child `peerless train` process, so a run that hangs can be stopped at the
//! scenario's `timeout_s` without taking the experiment down. A run whose directory holds a
//! `summary.json` is finished and is not repeated: the same command resumes an interrupted
//! experiment. A failed run (no summary, or one with an `error`: bad input, a PS that kept
//! dying) is reported as failed, the matrix goes on, and it is started again next time.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use peerless_runtime::config::{TrainArch, parse_name};
use peerless_runtime::scenario::Scenario;
use rustix::process::Signal;
use serde::Serialize;

use crate::cli::ExperimentArgs;
use peerless_runtime::cluster::supervise::signal;

#[derive(Debug, Serialize)]
struct ScenarioEntry {
    name: String,
    description: String,
    target_accuracy: f32,
    file: String,
    faults: usize,
    seeds: Vec<u64>,
    /// The fault-free twin the report measures goodput against, when the scenario names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<String>,
}

#[derive(Debug, Serialize)]
struct Manifest {
    command: String,
    scenarios: Vec<ScenarioEntry>,
    archs: Vec<String>,
    seeds: Vec<u64>,
}

/// Expands directories into their `*.toml` files (sorted), keeping files as given.
fn scenario_files(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in args {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            inside.sort();
            if inside.is_empty() {
                bail!("{} holds no *.toml scenario", p.display());
            }
            files.extend(inside);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("scenario {} does not exist", p.display());
        }
    }
    Ok(files)
}

fn parse_arch(a: &str) -> Result<TrainArch> {
    match parse_name::<TrainArch>(a.trim()) {
        Ok(arch @ (TrainArch::P2p | TrainArch::Ps)) => Ok(arch),
        _ => bail!("--arch {a:?}: expected p2p or ps (comma-separated)"),
    }
}

/// One run of the matrix.
#[derive(Debug)]
struct Planned {
    scenario: usize,
    arch: String,
    seed: u64,
    dir: PathBuf,
}

/// How a run ended.
#[derive(Debug)]
enum Outcome {
    Skipped,
    Done { accuracy: f64, wall_s: f64 },
    Failed(String),
}

/// Runs `peerless experiment`.
pub fn run(args: ExperimentArgs) -> Result<ExitCode> {
    let files = scenario_files(&args.scenarios)?;
    let scenarios = load_scenarios(&files)?;
    let archs: Vec<String> = args.arch.iter().map(|a| a.trim().to_owned()).collect();
    for a in &archs {
        parse_arch(a)?;
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let first = args.scenarios[0].file_stem().map(|s| s.to_string_lossy().into_owned());
        PathBuf::from("experiments").join(first.unwrap_or_else(|| "experiment".into()))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let exe = std::env::current_exe().context("locating the peerless executable")?;

    let plan = plan_runs(&scenarios, &archs, args.seeds, &out);
    let manifest = Manifest::new(&scenarios, &files, &archs, args.seeds, &plan);
    let mpath = out.join("experiment.json");
    std::fs::write(&mpath, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", mpath.display()))?;
    if args.netns
        && let Some(why) = peerless_runtime::cluster::netns::unavailable()
    {
        bail!("--netns: {why}");
    }
    let outcomes = run_plan(&plan, &scenarios, &files, &exe, args.data_dir.as_deref(), args.netns);
    let failed: Vec<String> = plan
        .iter()
        .zip(&outcomes)
        .filter_map(|(p, o)| match o {
            Outcome::Failed(why) => Some(format!("{}: {why}", p.dir.display())),
            _ => None,
        })
        .collect();
    let done = outcomes.iter().filter(|o| matches!(o, Outcome::Done { .. })).count();
    let skipped = outcomes.iter().filter(|o| matches!(o, Outcome::Skipped)).count();
    println!(
        "experiment   {} ({} scenarios × {} × {} seeds)",
        out.display(),
        scenarios.len(),
        archs.join(","),
        args.seeds
    );
    println!("runs         {done} run, {skipped} already done, {} failed", failed.len());
    for f in &failed {
        println!("  failed     {f}");
    }
    println!("report       peerless report {}", out.display());
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Reads the scenario `files`, whose names must be unique.
fn load_scenarios(files: &[PathBuf]) -> Result<Vec<Scenario>> {
    let scenarios: Vec<Scenario> = files.iter().map(|f| Scenario::load(f)).collect::<Result<_, _>>()?;
    let mut names: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two scenarios are named {:?}; names must be unique", w[0]);
    }
    Ok(scenarios)
}

/// The matrix: every scenario × arch × `seeds` seeds from the scenario's first, each run in
/// `<out>/<scenario>/<arch>/seed-<s>`.
fn plan_runs(scenarios: &[Scenario], archs: &[String], seeds: u64, out: &Path) -> Vec<Planned> {
    let mut plan = Vec::new();
    for (si, s) in scenarios.iter().enumerate() {
        for a in archs {
            for k in 0..seeds {
                let seed = s.seed + k;
                plan.push(Planned {
                    scenario: si,
                    arch: a.clone(),
                    seed,
                    dir: out.join(&s.name).join(a).join(format!("seed-{seed}")),
                });
            }
        }
    }
    plan
}

impl Manifest {
    /// The manifest of `plan`: the command line, each scenario (from `files`) with its seeds,
    /// the archs and every seed run.
    fn new(
        scenarios: &[Scenario],
        files: &[PathBuf],
        archs: &[String],
        seeds: u64,
        plan: &[Planned],
    ) -> Self {
        let mut all: Vec<u64> = plan.iter().map(|p| p.seed).collect();
        all.sort_unstable();
        all.dedup();
        Manifest {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            scenarios: scenarios
                .iter()
                .zip(files)
                .map(|(s, f)| ScenarioEntry {
                    name: s.name.clone(),
                    description: s.description.clone(),
                    target_accuracy: s.target_accuracy,
                    file: f.display().to_string(),
                    faults: s.faults.len(),
                    seeds: (s.seed..s.seed + seeds).collect(),
                    baseline: s.baseline.clone(),
                })
                .collect(),
            archs: archs.to_vec(),
            seeds: all,
        }
    }
}

/// Runs (or skips, when finished) every planned run in order, with a progress bar and a
/// line per run; returns how each ended.
fn run_plan(
    plan: &[Planned],
    scenarios: &[Scenario],
    files: &[PathBuf],
    exe: &Path,
    data_dir: Option<&Path>,
    netns: bool,
) -> Vec<Outcome> {
    let bar = ProgressBar::new(plan.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("experiment [{elapsed_precise}] {wide_bar} {pos}/{len} runs {msg}")
            .expect("invariant: valid template"),
    );
    let mut outcomes = Vec::new();
    for p in plan {
        let s = &scenarios[p.scenario];
        let label = format!("{} {} seed {}", s.name, p.arch, p.seed);
        bar.set_message(label.clone());
        let outcome = if finished(&p.dir) {
            Outcome::Skipped
        } else {
            run_one(exe, &files[p.scenario], s, p, data_dir, netns)
        };
        let line = match &outcome {
            Outcome::Done { accuracy, wall_s } => {
                format!("{label}: {:.2} % in {wall_s:.1} s", accuracy * 100.0)
            }
            Outcome::Failed(why) => format!("{label}: FAILED: {why}"),
            Outcome::Skipped => format!("{label}: already done"),
        };
        // Without a terminal the bar is hidden; the per-run lines still go to the log.
        if bar.is_hidden() {
            eprintln!("[{}/{}] {line}", outcomes.len() + 1, plan.len());
        } else {
            bar.println(line);
        }
        outcomes.push(outcome);
        bar.inc(1);
    }
    bar.finish_and_clear();
    outcomes
}

/// Whether the run in `dir` finished (a summary without an error); anything else is run again.
fn finished(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| !v["error"].is_string())
}

fn run_one(
    exe: &Path,
    file: &Path,
    s: &Scenario,
    p: &Planned,
    data_dir: Option<&Path>,
    netns: bool,
) -> Outcome {
    // An unfinished directory from an interrupted run is started over.
    if p.dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&p.dir)
    {
        return Outcome::Failed(format!("cannot clear {}: {e}", p.dir.display()));
    }
    if let Some(parent) = p.dir.parent()
        && let Err(e) = std::fs::create_dir_all(parent)
    {
        return Outcome::Failed(format!("cannot create {}: {e}", parent.display()));
    }
    let log_path = p.dir.with_extension("log");
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => return Outcome::Failed(format!("cannot create {}: {e}", log_path.display())),
    };
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--scenario"])
        .arg(file)
        .args(["--arch", &p.arch, "--seed", &p.seed.to_string()])
        .args(["--name", &format!("{}-{}-seed-{}", s.name, p.arch, p.seed)])
        .arg("--out")
        .arg(&p.dir)
        .env("PEERLESS_LAUNCHED", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
        .stderr(Stdio::from(log));
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    if netns {
        cmd.arg("--netns");
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start peerless train: {e}")),
    };
    let t = Instant::now();
    let timeout = Duration::from_secs(s.timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if t.elapsed() > timeout => {
                // SIGINT first: the launcher stops its nodes and writes what it has.
                signal(child.id(), Signal::INT);
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
                // A summary written on the way out is not a finished run.
                let _ = std::fs::rename(p.dir.join("summary.json"), p.dir.join("summary.timed-out.json"));
                break Err(format!("still running after timeout_s = {}", s.timeout_s));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => break Err(e.to_string()),
        }
    };
    let summary = std::fs::read_to_string(p.dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    match (status, summary) {
        (Err(why), _) => Outcome::Failed(format!("{why}; see {}", log_path.display())),
        (Ok(_), Some(v)) if v["error"].is_string() => Outcome::Failed(format!(
            "{}; see {}",
            v["error"].as_str().unwrap_or_default(),
            log_path.display()
        )),
        (Ok(_), Some(v)) => Outcome::Done {
            accuracy: v["test_accuracy"].as_f64().unwrap_or(0.0),
            wall_s: v["wall_time_s"].as_f64().unwrap_or(0.0),
        },
        (Ok(st), None) => Outcome::Failed(format!("{st}, no summary; see {}", log_path.display())),
    }
}
