//! The PyTorch DDP side of `peerless bench p2p --against ddp`: starts the W ranks of the
//! embedded `torch_ddp.py` as W processes, waits for them under a deadline (every rank killed
//! and reaped on any failure, timeout or early return), and reads rank 0's step times.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const SCRIPT: &str = include_str!("torch_ddp.py");

/// What every DDP run of a benchmark shares: the interpreter and the training setup, taken
/// from the peerless run it is compared with.
#[derive(Debug, Clone)]
pub struct Spec {
    /// A Python that imports torch.
    pub python: String,
    /// Input features (784 for MNIST).
    pub features: usize,
    /// MLP hidden widths.
    pub hidden: Vec<usize>,
    /// Samples per rank per step.
    pub batch: usize,
    /// SGD learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Steps (the peerless runs' rounds).
    pub steps: u64,
}

/// One DDP run, as rank 0 reports it: medians over the steady state, ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DdpRun {
    /// Ranks.
    pub world: u32,
    /// Wall time of a step: forward + backward + optimizer.
    pub step_ms: f64,
    /// Forward + backward, which under DDP includes the overlapped gradient all-reduce.
    pub fwd_bwd_ms: f64,
    /// Optimizer step.
    pub optim_ms: f64,
    /// The same step on the plain model, all ranks at once, no communication.
    pub bare_ms: f64,
    /// `step_ms − bare_ms`: what communication (and DDP's bookkeeping) adds.
    pub comm_ms: f64,
    /// torch's version.
    pub torch: String,
    /// Steady-state samples per second of all ranks: `batch × world / step`; set by us.
    #[serde(default)]
    pub samples_per_s: f64,
}

/// The deadline of one DDP run of `steps` steps: start-up (importing torch, the rendezvous)
/// plus a generous 100 ms for each step of the DDP and the bare pass.
pub fn timeout(steps: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(100 * steps)
}

/// Runs DDP with `world` ranks; each rank's stdout and stderr go to `dir/rank<r>.{out,err}`.
pub fn run(spec: &Spec, world: u32, dir: &Path) -> Result<DdpRun> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = free_port()?;
    let mut ranks = Ranks(Vec::new());
    for rank in 0..world {
        ranks.0.push(spawn_rank(spec, rank, world, port, dir)?);
    }
    ranks.wait(Instant::now() + timeout(spec.steps), dir)?;
    let out = std::fs::read_to_string(dir.join("rank0.out")).context("reading rank 0's output")?;
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).context("DDP rank 0 printed nothing")?;
    let mut r: DdpRun = serde_json::from_str(line).with_context(|| format!("DDP rank 0 printed {line:?}"))?;
    r.samples_per_s = (spec.batch as f64 * f64::from(world)) / (r.step_ms / 1e3);
    Ok(r)
}

/// A port free on loopback now (bound, then released), for the rendezvous.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn spawn_rank(spec: &Spec, rank: u32, world: u32, port: u16, dir: &Path) -> Result<Child> {
    let file = |ext: &str| {
        let p = dir.join(format!("rank{rank}.{ext}"));
        File::create(&p).with_context(|| format!("creating {}", p.display()))
    };
    let hidden: Vec<String> = spec.hidden.iter().map(usize::to_string).collect();
    Command::new(&spec.python)
        .arg("-c")
        .arg(SCRIPT)
        .args([rank.to_string(), world.to_string(), port.to_string(), spec.steps.to_string()])
        .args([spec.features.to_string(), hidden.join(","), spec.batch.to_string()])
        .args([spec.lr.to_string(), spec.momentum.to_string()])
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(file("out")?)
        .stderr(file("err")?)
        .spawn()
        .with_context(|| format!("starting DDP rank {rank} with {}", spec.python))
}

/// The rank processes of one run; whichever are still running when this is dropped are
/// killed and reaped, so no rank outlives its run, whatever way the run ends.
struct Ranks(Vec<Child>);

impl Ranks {
    /// Waits until every rank has exited successfully; fails as soon as one fails, or at
    /// `deadline`.
    fn wait(&mut self, deadline: Instant, dir: &Path) -> Result<()> {
        let mut done = vec![false; self.0.len()];
        while done.iter().any(|d| !d) {
            for (rank, child) in self.0.iter_mut().enumerate() {
                if done[rank] {
                    continue;
                }
                let Some(status) =
                    child.try_wait().with_context(|| format!("waiting for DDP rank {rank}"))?
                else {
                    continue;
                };
                if !status.success() {
                    bail!(
                        "DDP rank {rank} failed ({status}): {}",
                        last_line(&dir.join(format!("rank{rank}.err")))
                    );
                }
                done[rank] = true;
            }
            if Instant::now() > deadline {
                bail!("DDP timed out (logs in {})", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// The last non-empty line of a log file (the exception of a Python traceback).
fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_rank_fails_the_run_and_leaves_no_rank_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("rank1.err"), "Traceback\nRuntimeError: boom\n").unwrap();
        let sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let failer = Command::new("false").spawn().unwrap();
        let pid = sleeper.id();
        let mut ranks = Ranks(vec![sleeper, failer]);
        let err = ranks.wait(Instant::now() + Duration::from_secs(10), dir).unwrap_err().to_string();
        assert!(err.contains("DDP rank 1 failed") && err.contains("RuntimeError: boom"), "{err}");
        drop(ranks);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank 0 still running");
    }

    #[test]
    fn the_deadline_grows_with_the_steps() {
        assert_eq!(timeout(0), Duration::from_secs(120));
        assert_eq!(timeout(600), Duration::from_secs(180));
    }
}
