//! DiLoCo (`p2p.sync = "diloco"`): the same model whether the local steps run in the node, in
//! gradient functions, or under a PS; H times the samples per exchange; a peer SIGKILLed
//! mid-inner-steps and restarted ends with the others' model.

use std::path::Path;

use crate::{assert_completed_and_agreed, calm_config, peerless, run, summary};

/// Trains `arch` on digits with DiLoCo (3 nodes × 2 functions, H = 5, 8 outer rounds).
/// Returns the final parameter digest.
fn diloco(arch: &str, compute: &str, out: &Path, calm: &str) -> String {
    let o = run(peerless()
        .args(["train", "--arch", arch, "--compute", compute, "--sync", "diloco", "--inner-steps", "5"])
        .args(["--peers", "3", "--functions-per-peer", "2", "--rounds", "8", "--lr", "0.05", "--seed", "5"])
        .args(["--batch-size", "16", "--config"])
        .arg(calm)
        .arg("--out")
        .arg(out));
    assert!(o.status.success(), "diloco {arch} {compute} failed");
    let s = summary(out);
    if arch == "ps" {
        return summary(&out.join("ps"))["param_digest"].as_str().unwrap().to_owned();
    }
    assert_completed_and_agreed(&s);
    digest(&s)
}

fn digest(s: &serde_json::Value) -> String {
    s["param_digests"][0][1].as_str().unwrap().to_owned()
}

/// Samples trained and bytes sent, over all peers.
fn totals(s: &serde_json::Value) -> (u64, u64) {
    let peers = s["per_peer"].as_array().unwrap();
    let sum = |k: &str| peers.iter().map(|p| p[k].as_u64().unwrap()).sum();
    (sum("samples"), sum("bytes_out"))
}

#[test]
fn local_steps_in_the_node_in_functions_and_under_a_ps_give_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let calm = calm_config(tmp.path());
    let local = diloco("p2p", "local", &tmp.path().join("local"), &calm);
    assert_eq!(local, diloco("p2p", "functions", &tmp.path().join("functions"), &calm), "node vs functions");
    assert_eq!(local, diloco("ps", "functions", &tmp.path().join("ps"), &calm), "P2P vs PS");
    let (samples, bytes) = totals(&summary(&tmp.path().join("local")));
    // Each outer round trains 3 nodes × 2 functions × 5 steps × 16 samples.
    assert_eq!(samples, 8 * 3 * 2 * 5 * 16);

    // Every-step sync of the same samples exchanges H times as often.
    let o = run(peerless()
        .args(["train", "--arch", "p2p", "--compute", "local", "--peers", "3", "--functions-per-peer", "2"])
        .args(["--rounds", "40", "--lr", "0.05", "--seed", "5", "--batch-size", "16", "--config"])
        .arg(&calm)
        .arg("--out")
        .arg(tmp.path().join("every")));
    assert!(o.status.success());
    let every = summary(&tmp.path().join("every"));
    let (every_samples, every_bytes) = totals(&every);
    assert_eq!(every_samples, samples, "the same samples");
    assert!(every_bytes > 4 * bytes, "every-step sent {every_bytes} bytes, DiLoCo {bytes}");
    assert_ne!(digest(&every), local, "DiLoCo is not every-step sync");
}

#[test]
fn a_peer_killed_mid_inner_steps_rejoins_and_ends_with_the_others_model() {
    crate::faults::a_killed_peer_rejoins(
        "train.batch_size = 16\np2p.sync = \"diloco\"\np2p.inner_steps = 10\n",
        // Long enough that the others still train when it is back 0.5 s after the kill.
        400,
        8,
    );
}

#[test]
fn diloco_on_an_asynchronous_ps_is_refused_naming_the_keys() {
    let o = peerless()
        .args(["train", "--arch", "ps", "--ps-mode", "async", "--sync", "diloco", "--rounds", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("p2p.sync") && err.contains("ps.mode"), "{err}");
}
