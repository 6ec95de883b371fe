//! `peerless bench invoke --memory-sizes`: the gradient function at each Lambda memory size,
//! with the CPU share Lambda gives that size, the way AWS Lambda Power Tuning measures on AWS.
//!
//! Lambda gives a function CPU in proportion to its memory: one vCPU at 1,769 MB. Here each
//! size's function instances run in a cgroup of their own whose CPU quota is that share
//! (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`; root only): an instance joins it first
//! thing (`PEERLESS_CGROUP`, read by `peerless function`). Each size's warm invocations are
//! timed and charged at that size's price.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use peerless_core::cost::ONE_VCPU_MB;
use peerless_runtime::function::{self, FunctionCommand, InvokeCtx, Invoker, LocalRuntime};
use serde::Serialize;

/// The environment variable naming the cgroup directory an instance joins.
pub const CGROUP_ENV: &str = "PEERLESS_CGROUP";

/// The CPU period of the quotas, µs: short, so that a few-millisecond invocation gets its
/// share on average rather than a whole burst at full speed (the kernel's minimum quota is
/// 1 ms, 5 % of this period: enough for 128 MB's 7.2 %).
const PERIOD_US: u64 = 20_000;

/// One memory size's measurement.
#[derive(Debug, Serialize)]
pub struct SizeRow {
    /// Lambda memory size, MB.
    pub memory_mb: u64,
    /// The CPU share the size gets (1 = one vCPU).
    pub cpu_share: f64,
    /// Median billed duration of a warm invocation, ms.
    pub billed_p50_ms: f64,
    /// Median cost of a warm invocation, USD.
    pub cost_p50_usd: f64,
    /// The largest Max Memory Used, MB.
    pub max_memory_mb: u64,
    /// Invocations that failed (an out-of-memory kill at a size too small, a timeout).
    pub failed: usize,
}

/// A cgroup with a CPU quota, removed when dropped.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// A new cgroup named `name` whose processes share `share` of one CPU.
    fn create(name: &str, share: f64) -> Result<Cgroup> {
        let quota = ((share * PERIOD_US as f64).round() as u64).max(1_000);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu")) {
            let dir = Path::new("/sys/fs/cgroup").join(name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let g = Cgroup { dir };
            g.write("cpu.max", &format!("{quota} {PERIOD_US}"))?;
            return Ok(g);
        }
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let g = Cgroup { dir };
            g.write("cpu.cfs_period_us", &PERIOD_US.to_string())?;
            g.write("cpu.cfs_quota_us", &quota.to_string())?;
            return Ok(g);
        }
        bail!("no cgroup CPU controller (v2 /sys/fs/cgroup with cpu, or v1 /sys/fs/cgroup/cpu)")
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The runtime has killed the instances; the kernel lets go of the group once they
        // are reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!(cgroup = %self.dir.display(), "could not remove the benchmark's cgroup");
    }
}

/// Joins the cgroup `PEERLESS_CGROUP` names, if it names one (a function instance of this
/// benchmark, first thing).
pub fn join_cgroup_from_env() -> Result<()> {
    let Some(dir) = std::env::var_os(CGROUP_ENV) else { return Ok(()) };
    let procs = Path::new(&dir).join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining the cgroup {}", procs.display()))
}

/// The CPU share Lambda gives `memory_mb`.
pub fn cpu_share(memory_mb: u64) -> f64 {
    memory_mb as f64 / ONE_VCPU_MB as f64
}

/// Measures the gradient function `n` warm times at each of `sizes`.
pub async fn measure(command: &FunctionCommand, sizes: &[u64], n: usize) -> Result<Vec<SizeRow>> {
    let fixture = crate::function_cmd::GradientFixture::new().await?;
    let mut rows = Vec::new();
    for &mb in sizes {
        let share = cpu_share(mb);
        let group = Cgroup::create(&format!("peerless-bench-{}-{mb}", std::process::id()), share)?;
        let command = command.clone().env(CGROUP_ENV, &group.dir);
        let cfg = function::Config { memory_mb: mb, max_retries: 0, ..function::Config::default() };
        let runtime = LocalRuntime::start(cfg, command, 0)?;
        let row = measure_size(&runtime, &fixture, mb, share, n).await;
        runtime.shutdown().await;
        drop(group);
        let row = row?;
        eprintln!(
            "{mb} MB: {:.1} ms billed, {:.3} µ$ per invocation",
            row.billed_p50_ms,
            row.cost_p50_usd * 1e6
        );
        rows.push(row);
    }
    fixture.shutdown().await;
    Ok(rows)
}

async fn measure_size(
    runtime: &LocalRuntime,
    fixture: &crate::function_cmd::GradientFixture,
    mb: u64,
    share: f64,
    n: usize,
) -> Result<SizeRow> {
    let (mut billed, mut cost) = (Vec::new(), Vec::new());
    let (mut peak, mut failed) = (0, 0);
    // The first invocations start the instance and fill its caches: not counted.
    for i in 0..n + 3 {
        let inv = runtime
            .invoke("gradient", fixture.payload(i as u32)?, InvokeCtx::new("bench", 0, i as u32))
            .await?;
        let Some(rec) = inv.last().cloned() else { continue };
        if !inv.is_ok() {
            failed += 1;
            continue;
        }
        peak = peak.max(rec.max_memory_mb);
        if i >= 3 {
            billed.push(rec.billed_ms as f64);
            cost.push(rec.cost_pico as f64 / peerless_core::cost::PICO_PER_USD as f64);
        }
    }
    let med = |v: &[f64]| peerless_core::stats::median(v).unwrap_or(f64::NAN);
    Ok(SizeRow {
        memory_mb: mb,
        cpu_share: share,
        billed_p50_ms: med(&billed),
        cost_p50_usd: med(&cost),
        max_memory_mb: peak,
        failed,
    })
}

/// Prints the table, each size's cost relative to `reference_mb`'s.
pub fn print(rows: &[SizeRow], reference_mb: u64) {
    let reference = rows.iter().find(|r| r.memory_mb == reference_mb).map(|r| r.cost_p50_usd);
    println!(
        "\ngradient function per memory size (CPU share as Lambda gives it; medians of warm invocations)"
    );
    println!("memory MB  CPU share  billed ms  cost µ$  vs {reference_mb} MB  max memory MB  failed");
    for r in rows {
        let rel = reference.map_or("—".to_owned(), |c| format!("{:.2}×", r.cost_p50_usd / c));
        println!(
            "{:>9} {:>10.3} {:>10.1} {:>8.3} {:>10} {:>14} {:>7}",
            r.memory_mb,
            r.cpu_share,
            r.billed_p50_ms,
            r.cost_p50_usd * 1e6,
            rel,
            r.max_memory_mb,
            r.failed
        );
    }
}
