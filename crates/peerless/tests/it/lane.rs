//! Gradients on plain TCP lanes (`p2p.tensor_transport = "tcp"`): the same model as over
//! libp2p, a lane between every ordered pair, a restarted peer back on lanes, lanes cut by the
//! kernel mid-run, and the launcher's refusal of lanes its fault proxy could not see.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::{
    assert_completed_and_agreed, calm_config, digests, events, peer_round, peerless, run, summary, wait_for,
};

fn train(transport: &str, out: &Path, config: &str) {
    let o = run(peerless()
        .args(["train", "--arch", "p2p", "--peers", "3", "--functions-per-peer", "2", "--dataset", "digits"])
        .args(["--rounds", "120", "--lr", "0.05", "--seed", "11", "--tensor-transport", transport])
        .arg("--config")
        .arg(config)
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
    let config = calm_config(tmp.path());
    train("tcp", &tcp, &config);
    train("libp2p", &libp2p, &config);
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

/// Serverful peers (a round every few milliseconds) on `transport`, started in `out`.
fn serverful(transport: &str, out: &Path) -> std::process::Command {
    let mut c = peerless();
    c.args(["train", "--arch", "p2p", "--peers", "3", "--functions-per-peer", "1", "--compute", "local"])
        .args(["--dataset", "digits", "--rounds", "1500", "--lr", "0.05", "--seed", "5"])
        .args(["--tensor-transport", transport, "--out"])
        .arg(out);
    c
}

/// Whether `ss -K` can close sockets here (root, iproute2, a kernel with socket destroy);
/// required where `PEERLESS_REQUIRE_NETNS=1` (root with iproute2, as `.ci/run` sets).
fn socket_kill_available() -> bool {
    let ok = rustix::process::geteuid().is_root()
        && std::process::Command::new("ss").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("PEERLESS_REQUIRE_NETNS").as_deref() != Ok("1"),
        "`ss -K` is required (root, iproute2)"
    );
    if !ok {
        eprintln!("SKIPPED: closing sockets with `ss -K` needs root and iproute2");
    }
    ok
}

/// Every lane connection is closed by the kernel (`ss -K`) while the run trains, its libp2p
/// connections left up: the gradients in flight are asked for again, the `Received`
/// announcements go again over libp2p, and the run ends with the model of a run whose lanes
/// stayed up, bit for bit (both runs with [`calm_config`]).
#[test]
fn lanes_cut_mid_run_leave_the_model_bit_for_bit_unchanged() {
    if !socket_kill_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cut, calm) = (tmp.path().join("cut"), tmp.path().join("calm"));
    let calm_cfg = calm_config(tmp.path());
    let mut cut_run = serverful("tcp", &cut);
    cut_run.arg("--config").arg(&calm_cfg);
    let child = cut_run.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let lane_ports = || -> Vec<String> {
        (0..3)
            .flat_map(|i| events(&cut.join(format!("peers/{i}/events.jsonl"))))
            .filter(|e| e["event"] == "tensor_lane")
            .filter_map(|e| e["addr"].as_str().and_then(|a| a.rsplit_once(':')).map(|(_, p)| p.to_owned()))
            .collect()
    };
    wait_for("six lanes and round 20", Duration::from_secs(60), || {
        lane_ports().len() >= 6 && peer_round(&cut, 0) >= 20
    });
    let mut ports = lane_ports();
    ports.sort();
    ports.dedup();
    let mut closed = 0;
    for port in &ports {
        let o =
            std::process::Command::new("ss").args(["-K", "-t", "dst", &format!("127.0.0.1:{port}")]).output();
        let o = o.expect("ss");
        closed += String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains(port.as_str())).count();
    }
    let at = peer_round(&cut, 0);
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "the cut run failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(closed >= 3, "ss -K closed {closed} lane connection(s) of ports {ports:?}");
    assert!(at < 1400, "the lanes were cut only at round {at} of 1500");
    let mut calm_run = serverful("tcp", &calm);
    calm_run.arg("--config").arg(&calm_cfg);
    assert!(run(calm_run.stdout(Stdio::null())).status.success(), "the calm run failed");
    let (a, b) = (summary(&cut), summary(&calm));
    assert_completed_and_agreed(&a);
    assert_eq!(digests(&a), digests(&b), "cutting the lanes changed the model");
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
