//! Gradients on plain TCP lanes (`p2p.tensor_transport = "tcp"`): the same model as over
//! libp2p, a lane between every ordered pair, a restarted peer back on lanes, and the launcher's
//! refusal of lanes its fault proxy could not see.

use std::path::Path;

use crate::{assert_completed_and_agreed, digests, events, peerless, run, summary};

fn train(transport: &str, out: &Path) {
    let o = run(peerless()
        .args(["train", "--arch", "p2p", "--peers", "3", "--functions-per-peer", "2", "--dataset", "digits"])
        .args(["--rounds", "120", "--lr", "0.05", "--seed", "11", "--tensor-transport", transport])
        .arg("--out")
        .arg(out));
    assert!(o.status.success(), "the {transport} run failed");
}

/// `(peer, to)` of every `tensor_lane` event of a run.
fn lanes(out: &Path) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = events(&out.join("events.jsonl"))
        .iter()
        .filter(|e| e["event"] == "tensor_lane")
        .map(|e| (e["peer"].as_u64().unwrap(), e["to"].as_u64().unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn gradients_on_tcp_lanes_give_the_libp2p_model_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let (tcp, libp2p) = (tmp.path().join("tcp"), tmp.path().join("libp2p"));
    train("tcp", &tcp);
    train("libp2p", &libp2p);
    let (a, b) = (summary(&tcp), summary(&libp2p));
    assert_completed_and_agreed(&a);
    assert_completed_and_agreed(&b);
    assert_eq!(digests(&a), digests(&b), "the lanes changed the model");
    assert_eq!(
        lanes(&tcp),
        vec![(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)],
        "a lane each way of every pair"
    );
    assert!(lanes(&libp2p).is_empty(), "no lane unless asked for");
    let config = std::fs::read_to_string(tcp.join("config.toml")).unwrap();
    assert!(config.contains("tensor_transport = \"tcp\""), "{config}");
}

#[test]
fn a_killed_peer_rejoins_on_new_lanes() {
    let tmp = tempfile::tempdir().unwrap();
    let kill = "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = 40\nrestart_after_s = 0.5\n";
    let f =
        crate::faults::scenario(tmp.path(), "kill", 300, &format!("p2p.tensor_transport = \"tcp\"\n{kill}"));
    let out = tmp.path().join("run");
    let ev = crate::faults::train(&f, "p2p", &out);
    assert!(ev.iter().any(|e| e["event"] == "synced" && e["peer"] == 1), "the restarted peer synced");
    assert_completed_and_agreed(&summary(&out));
    // Before the kill and again after the restart: the restarted peer dials both others, and
    // both dial it.
    let l = lanes(&out);
    for (from, to) in [(1, 0), (1, 2), (0, 1), (2, 1)] {
        let n = l.iter().filter(|&&p| p == (from, to)).count();
        assert!(n >= 2, "lane {from}→{to} opened {n} time(s), not again after the restart: {l:?}");
    }
}

#[test]
fn lanes_with_network_faults_on_the_loopback_proxy_are_refused_naming_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let f = crate::faults::scenario(
        tmp.path(),
        "cut",
        60,
        "p2p.tensor_transport = \"tcp\"\n[[fault]]\nkind = \"partition\"\ntargets = [\"node:1\"]\nat_round = 10\nduration_s = 1.0\n",
    );
    let o = peerless()
        .args(["train", "--arch", "p2p", "--scenario"])
        .arg(&f)
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tensor_transport") && err.contains("--netns"), "{err}");
}
