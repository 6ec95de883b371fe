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
mod faults;
mod function;
mod gradient;
mod layout;
mod linkage;
mod local;
mod netns;
mod p2p;
mod report;
mod resume;

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
