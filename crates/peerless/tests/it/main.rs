//! End-to-end tests of the `peerless` binary: real processes, real files, real signals.

mod admission;
#[cfg(feature = "aws-lambda")]
mod aws_lambda;
mod bad_input;
mod bench;
mod byzantine;
mod churn;
mod compression;
mod diloco;
mod elastic;
mod faults;
mod function;
mod gradient;
mod lane;
mod layout;
mod linkage;
mod local;
mod netns;
mod p2p;
mod report;
mod resume;
mod store_acl;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Sends `sig` to `pid` (through the kernel, not a `kill` program the machine may lack);
/// whether it was delivered.
pub fn signal(pid: u32, sig: rustix::process::Signal) -> bool {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32")).expect("pid > 0");
    rustix::process::kill_process(pid, sig).is_ok()
}

/// The binary under test.
pub fn peerless() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peerless"))
}

/// Runs and returns the output, with stderr echoed on failure for diagnosis.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn peerless");
    if !out.status.success() {
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// The summary.json of a run directory.
pub fn summary(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json written");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

/// Asserts that a P2P run completed its rounds with identical replicas (`s`: its summary.json).
pub fn assert_completed_and_agreed(s: &serde_json::Value) {
    assert_eq!((s["completed"].as_bool(), s["replicas_agree"].as_bool()), (Some(true), Some(true)), "{s}");
}

/// The JSON lines of an `events.jsonl` (missing: none).
pub fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Rounds peer `i` of the launcher's run `run` has finished, from its metrics.
pub fn peer_round(run: &Path, i: u32) -> u64 {
    rounds_done(&run.join(format!("peers/{i}")))
}

/// Rounds the node writing to `dir` has finished, from its metrics.
pub fn rounds_done(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap_or_default();
    text.lines().skip(1).filter_map(|l| l.split(',').nth(2)?.parse().ok()).max().unwrap_or(0)
}

/// Polls `f` every 20 ms until it holds; fails naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Round deadlines and silence detection (60 s) that no loaded test machine reaches: runs
/// compared digest for digest must not differ because a slow peer missed a deadline in one of
/// them. Its last table is `[p2p]`: keys of that section may follow.
pub const CALM: &str =
    "[cluster]\ndeadline_floor_ms = 60000\ndeadline_ceiling_ms = 60000\n[p2p]\ndetection_ms = 60000\n";

/// A config file of [`CALM`] in `dir`; its path.
pub fn calm_config(dir: &Path) -> String {
    let p = dir.join("calm.toml");
    std::fs::write(&p, CALM).unwrap();
    p.display().to_string()
}

/// The peers' final parameter digests in a cluster summary.
pub fn digests(s: &serde_json::Value) -> Vec<String> {
    s["param_digests"].as_array().unwrap().iter().map(|d| d[1].as_str().unwrap().to_owned()).collect()
}

/// The data directory holding the real datasets, or `None` (test skipped) when `name` is not
/// there. With `PEERLESS_REQUIRE_DATA=1` (set by `.ci/run`) a missing dataset fails the test.
pub fn real_data(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("PEERLESS_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/peerless")))?;
    let ok = peerless()
        .args(["data", "verify", name, "--data-dir"])
        .arg(&dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(dir);
    }
    if std::env::var("PEERLESS_REQUIRE_DATA").as_deref() == Ok("1") {
        panic!("{name} is required but not in {}; run: peerless data fetch {name}", dir.display());
    }
    eprintln!("SKIPPED: {name} not in {}; run `peerless data fetch {name}`", dir.display());
    None
}
