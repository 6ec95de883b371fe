//! Interrupting a run and resuming it gives exactly the parameters of an uninterrupted run.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::{peerless, run, summary};

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    run(peerless()
        .args([
            "train",
            "--epochs",
            "3",
            "--seed",
            "11",
            "--checkpoint-every",
            "7",
            "--eval-every",
            "10",
            "--out",
        ])
        .arg(out)
        .args(extra))
}

fn rounds_and_losses(dir: &Path) -> Vec<String> {
    // Everything but wall time and throughput, which legitimately differ.
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            format!("{},{},{},{},{}", c[0], c[1], c[3], c[4], c[5])
        })
        .collect()
}

#[test]
fn halted_then_resumed_run_matches_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(train(&a, &[]).status.success());
    // Halt mid-epoch, between checkpoints' natural spacing.
    assert!(train(&b, &["--halt-at-round", "30"]).status.success());
    let half = summary(&b);
    assert_eq!(half["completed"], false);
    assert_eq!(half["rounds"], 30);
    let o = run(peerless().args(["train", "--resume"]).arg(&b));
    assert!(o.status.success());
    let (sa, sb) = (summary(&a), summary(&b));
    assert_eq!(sb["completed"], true);
    assert_eq!(sa["param_digest"], sb["param_digest"], "resumed run diverged");
    assert_eq!(rounds_and_losses(&a), rounds_and_losses(&b));
}

#[test]
fn sigint_checkpoints_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let args = ["train", "--epochs", "40", "--seed", "5", "--checkpoint-every", "50", "--out"];
    assert!(run(peerless().args(args).arg(&a)).status.success());

    let mut child =
        peerless().args(args).arg(&b).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    // Wait for training to be under way (the first periodic checkpoint), then interrupt.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = std::fs::read_to_string(b.join("events.jsonl")).unwrap_or_default();
        if events.contains("\"checkpoint\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(crate::signal(child.id(), rustix::process::Signal::INT));
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let s = summary(&b);
    if s["completed"] == true {
        // The run finished before the signal arrived; nothing to resume (machine was fast).
        assert_eq!(s["param_digest"], summary(&a)["param_digest"]);
        return;
    }
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let o = run(peerless().args(["train", "--resume"]).arg(&b));
    assert!(o.status.success());
    assert_eq!(summary(&b)["param_digest"], summary(&a)["param_digest"]);
    assert_eq!(rounds_and_losses(&a), rounds_and_losses(&b));
}
