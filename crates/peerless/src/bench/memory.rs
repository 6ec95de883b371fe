//! `peerless bench memory`: a small P2P cluster's memory, per process kind (peers, function
//! instances), against the dataset's size on disk.
//!
//! While the cluster runs, a sampler thread reads, every 100 ms, every descendant process of
//! this one from `/proc` (Linux only): its kind from its command line (`peerless peer`,
//! `peerless function`, …), its peak resident set (`VmHWM` in `/proc/<pid>/status`, the
//! kernel's own high-water mark, so nothing between samples is missed) and its proportional
//! set size (`Pss` in `/proc/<pid>/smaps_rollup`: each shared page divided among the
//! processes that map it, so shared pages count once across the cluster, where RSS counts them
//! in every process; PSS is sampled, so its peak is the largest sample). The totals are the sum
//! of the per-process peaks (an upper bound: not every process peaks at once) and the largest
//! sum seen in one sample (the cluster's real peak, to within the sampling period).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use peerless_ml::DatasetName;
use peerless_runtime::config::{RunConfig, TrainArch};
use peerless_runtime::rundir::RunDir;
use serde::Serialize;

/// One process as read from `/proc`, in kB.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    hwm_kb: u64,
    rss_kb: u64,
    pss_kb: u64,
}

/// One process's peaks over the run.
#[derive(Debug, Clone)]
struct Peaks {
    kind: String,
    hwm_kb: u64,
    pss_kb: u64,
}

/// Peaks of one kind of process.
#[derive(Debug, Serialize)]
pub struct KindMemory {
    /// `peer`, `function`, … (the `peerless` subcommand).
    pub kind: String,
    /// Processes of this kind seen.
    pub processes: usize,
    /// Largest peak resident set (VmHWM) of one process, MB.
    pub max_rss_mb: f64,
    /// Mean of the processes' peak resident sets, MB.
    pub mean_rss_mb: f64,
    /// Sum of the processes' peak resident sets, MB.
    pub sum_rss_mb: f64,
    /// Largest sampled PSS of one process, MB.
    pub max_pss_mb: f64,
    /// Sum of the processes' largest sampled PSS, MB.
    pub sum_pss_mb: f64,
}

/// Results of `peerless bench memory`.
#[derive(Debug, Serialize)]
pub struct MemoryBench {
    /// Dataset used.
    pub dataset: String,
    /// Peers, functions per peer, rounds.
    pub peers: u32,
    /// Functions per peer.
    pub functions_per_peer: u32,
    /// Rounds run.
    pub rounds: u64,
    /// Per process kind.
    pub kinds: Vec<KindMemory>,
    /// Sum of every process's peak resident set, MB (an upper bound on the peak total).
    pub total_rss_peaks_mb: f64,
    /// Largest sum of resident sets in one sample, MB.
    pub total_rss_sampled_mb: f64,
    /// Sum of every process's largest sampled PSS, MB.
    pub total_pss_peaks_mb: f64,
    /// Largest sum of PSS in one sample, MB.
    pub total_pss_sampled_mb: f64,
    /// The dataset's IDX files on disk, MB.
    pub dataset_on_disk_mb: f64,
    /// The raw cache file (`peerless-pixels.cache`), MB: held once in the page cache for every
    /// process, and counted in no process's RSS (it is read, not mapped); 0 when absent.
    pub cache_file_mb: f64,
    /// What the images are as u8 pixels (train + test), MB.
    pub dataset_u8_mb: f64,
}

/// The `kB` value of the line starting with `key` in a `/proc` file's text.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `pid`'s memory now; `None` once it is gone.
fn read_process(pid: u32) -> Option<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    Some(Reading {
        hwm_kb: kb_field(&status, "VmHWM:")?,
        rss_kb: kb_field(&status, "VmRSS:")?,
        pss_kb: pss.as_deref().and_then(|t| kb_field(t, "Pss:")).unwrap_or(0),
    })
}

/// Every process's parent, from `/proc/<pid>/stat` (field 4, after the parenthesized name).
fn parents() -> BTreeMap<u32, u32> {
    let mut map = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return map };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            map.insert(pid, ppid);
        }
    }
    map
}

/// The descendants of `root`.
fn descendants(root: u32) -> Vec<u32> {
    let parents = parents();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, _) in parents.iter().filter(|&(_, &pp)| pp == p) {
            out.push(child);
            frontier.push(child);
        }
    }
    out
}

/// The kind of a `peerless` process: its subcommand (`peer`, `function`, …).
fn kind(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    match args.get(1) {
        Some(a) if !a.is_empty() => String::from_utf8_lossy(a).into_owned(),
        _ => "other".into(),
    }
}

/// What the sampler gathered.
#[derive(Debug, Default)]
struct Sampled {
    peaks: BTreeMap<u32, Peaks>,
    rss_total_kb: u64,
    pss_total_kb: u64,
}

/// Samples this process's descendants every `period` until `stop` is set.
fn sample(stop: &AtomicBool, period: Duration) -> Sampled {
    let me = std::process::id();
    let mut s = Sampled::default();
    while !stop.load(Ordering::Relaxed) {
        let (mut rss, mut pss) = (0, 0);
        for pid in descendants(me) {
            let Some(r) = read_process(pid) else { continue };
            let p = s.peaks.entry(pid).or_insert_with(|| Peaks { kind: kind(pid), hwm_kb: 0, pss_kb: 0 });
            p.hwm_kb = p.hwm_kb.max(r.hwm_kb);
            p.pss_kb = p.pss_kb.max(r.pss_kb);
            rss += r.rss_kb;
            pss += r.pss_kb;
        }
        s.rss_total_kb = s.rss_total_kb.max(rss);
        s.pss_total_kb = s.pss_total_kb.max(pss);
        std::thread::sleep(period);
    }
    s
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Per-kind summaries of the per-process peaks.
fn by_kind(peaks: &BTreeMap<u32, Peaks>) -> Vec<KindMemory> {
    let mut kinds: BTreeMap<&str, Vec<&Peaks>> = BTreeMap::new();
    for p in peaks.values() {
        kinds.entry(&p.kind).or_default().push(p);
    }
    kinds
        .into_iter()
        .map(|(kind, ps)| {
            let sum_rss: u64 = ps.iter().map(|p| p.hwm_kb).sum();
            KindMemory {
                kind: kind.to_owned(),
                processes: ps.len(),
                max_rss_mb: mb(ps.iter().map(|p| p.hwm_kb).max().unwrap_or(0)),
                mean_rss_mb: mb(sum_rss) / ps.len().max(1) as f64,
                sum_rss_mb: mb(sum_rss),
                max_pss_mb: mb(ps.iter().map(|p| p.pss_kb).max().unwrap_or(0)),
                sum_pss_mb: mb(ps.iter().map(|p| p.pss_kb).sum()),
            }
        })
        .collect()
}

/// Bytes of the dataset's IDX files and of its raw cache file on disk (0 for the embedded
/// digits, or a file that is absent).
fn on_disk(name: DatasetName, data_dir: &Path) -> (u64, u64) {
    if name.is_embedded() {
        return (0, 0);
    }
    let dirs = [name.dir(data_dir), data_dir.to_owned()];
    let Some(dir) =
        dirs.iter().find(|d| name.files().iter().any(|s| peerless_ml::data::locate(d, s).is_some()))
    else {
        return (0, 0);
    };
    let files =
        name.files().iter().filter_map(|s| peerless_ml::data::locate(dir, s)).collect::<Vec<PathBuf>>();
    let size = |p: &PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    (files.iter().map(size).sum(), size(&dir.join(peerless_ml::data::cache::FILE_NAME)))
}

/// Runs the cluster described by `cfg` in `dir` while sampling its processes.
pub fn run(cfg: &RunConfig, dir: &Path) -> Result<MemoryBench> {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || sample(&stop, Duration::from_millis(100)))
    };
    let mut rd = RunDir::create(dir, cfg)?;
    let ran = crate::launch::launch(cfg, &mut rd, &[]);
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.join().map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    ran?;
    let split = peerless_ml::data::load(cfg.data.dataset, &cfg.data.dir)?;
    let u8_bytes = (split.train.len() + split.test.len()) * split.train.features();
    let (idx_bytes, cache_bytes) = on_disk(cfg.data.dataset, &cfg.data.dir);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(MemoryBench {
        dataset: cfg.data.dataset.to_string(),
        peers: cfg.cluster.nodes,
        functions_per_peer: cfg.cluster.functions_per_node,
        rounds: cfg.train.rounds,
        kinds: by_kind(&sampled.peaks),
        total_rss_peaks_mb: mb(sampled.peaks.values().map(|p| p.hwm_kb).sum()),
        total_rss_sampled_mb: mb(sampled.rss_total_kb),
        total_pss_peaks_mb: mb(sampled.peaks.values().map(|p| p.pss_kb).sum()),
        total_pss_sampled_mb: mb(sampled.pss_total_kb),
        dataset_on_disk_mb: mib(idx_bytes),
        cache_file_mb: mib(cache_bytes),
        dataset_u8_mb: mib(u8_bytes as u64),
    })
}

/// Prints the tables of `r`.
fn print(r: &MemoryBench) {
    println!(
        "\nmemory of a P2P cluster: {} peers × {} functions, {}, {} rounds (MB)",
        r.peers, r.functions_per_peer, r.dataset, r.rounds
    );
    println!("kind       processes  peak RSS max   mean    sum    PSS max    sum");
    for k in &r.kinds {
        println!(
            "{:<10} {:>9} {:>13.1} {:>6.1} {:>6.0} {:>10.1} {:>6.0}",
            k.kind, k.processes, k.max_rss_mb, k.mean_rss_mb, k.sum_rss_mb, k.max_pss_mb, k.sum_pss_mb
        );
    }
    println!(
        "total: RSS {:.0} (sum of peaks), {:.0} (largest sample); PSS {:.0} (sum of peaks), {:.0} (largest sample)",
        r.total_rss_peaks_mb, r.total_rss_sampled_mb, r.total_pss_peaks_mb, r.total_pss_sampled_mb
    );
    println!(
        "dataset: {:.1} on disk as IDX files, {:.1} as u8 pixels; cache file {:.1} (in the page cache once, in no RSS)",
        r.dataset_on_disk_mb, r.dataset_u8_mb, r.cache_file_mb
    );
}

/// `peerless bench memory`: runs the cluster, prints its memory.
pub fn run_cli(args: crate::cli::BenchMemoryArgs) -> Result<std::process::ExitCode> {
    let mut cfg = RunConfig::default();
    cfg.data.dir = crate::common::data_dir(None);
    cfg.data.dataset = args.dataset.unwrap_or(DatasetName::Mnist);
    cfg.train.arch = TrainArch::P2p;
    cfg.cluster.nodes = args.peers;
    cfg.cluster.functions_per_node = args.functions_per_peer;
    cfg.train.rounds = args.rounds;
    cfg.validate()?;
    let dir = match args.out {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("peerless-bench-memory-{}", std::process::id())),
    };
    let r = run(&cfg, &dir)?;
    print(&r);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
