//! Nodes on hosts of their own: each in a network namespace with its own address, the
//! namespaces joined by a bridge in a namespace of its own (`peerless_runtime::cluster::netns`;
//! root and iproute2 only; skipped elsewhere with a message, required where
//! `PEERLESS_REQUIRE_NETNS=1`, as `.ci/run` sets). Most tests start nodes with only the
//! commands a user runs on each host (`run init`, `keygen`, `admit`, `peer|ps|worker --run …`);
//! one runs the launcher with `--netns`. Faults are real: links set down, moved to a bridge of
//! their own, capped with `tc tbf`; processes SIGKILLed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerless_runtime::cluster::netns::{self, Hosts};

use crate::{peerless, run, wait_for};

/// Whether network namespaces can be made here; without root or iproute2 the test is
/// skipped with a message, unless `PEERLESS_REQUIRE_NETNS=1` makes them required.
fn available() -> bool {
    let Some(why) = netns::unavailable() else { return true };
    assert!(
        std::env::var("PEERLESS_REQUIRE_NETNS").as_deref() != Ok("1"),
        "network namespaces are required: {why}"
    );
    eprintln!("SKIPPED: {why}");
    false
}

/// Hosts for `n` nodes, or `None` (the test is skipped) where they cannot be made.
fn hosts(n: usize) -> Option<Hosts> {
    available().then(|| Hosts::new(n).expect("network namespaces"))
}

/// `cmd` run inside host `i`'s namespace.
fn on(hosts: &Hosts, i: usize, cmd: &Command) -> Command {
    let mut c = hosts.command(i, Path::new(cmd.get_program()));
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c
}

/// Node processes, killed and reaped when dropped.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A run of `n` peers prepared as its owner and each host would: the run file, an identity
/// per host (its key never leaves it), a certificate per peer. Returns each peer's directory
/// (holding `identity.key` and `cert`).
fn prepare(dir: &Path, n: usize, train: &[&str], data: Option<&Path>) -> Vec<PathBuf> {
    let mut init = peerless();
    init.args(["run", "init", "--arch", "p2p", "--peers", &n.to_string(), "--out"]).arg(dir.join("run"));
    init.args(train);
    if let Some(d) = data {
        init.arg("--data-dir").arg(d);
    }
    assert!(run(&mut init).status.success(), "run init");
    (0..n).map(|i| admit(dir, &format!("host{i}"), "peer", Some(i)).0).collect()
}

/// Starts peer `i` in its namespace, dialling the peers before it.
fn start(hosts: &Hosts, dir: &Path, host: &Path, i: usize) -> Child {
    let bootstrap: Vec<String> = (0..i).map(|j| hosts.multiaddr(j)).collect();
    start_node(hosts, dir, host, i, "peer", &bootstrap)
}

/// Starts `role` (`peer`, `ps`, `worker`) on host `i` with the identity and certificate in
/// `host`, dialling `bootstrap`; it writes to `host/node`, its stderr to `host/stderr.log`.
fn start_node(hosts: &Hosts, dir: &Path, host: &Path, i: usize, role: &str, bootstrap: &[String]) -> Child {
    let mut cmd = peerless();
    cmd.arg(role).arg("--run").arg(dir.join("run/run.toml"));
    cmd.arg("--identity").arg(host.join("identity.key")).arg("--cert").arg(host.join("cert"));
    cmd.args(["--listen", &hosts.multiaddr(i)]);
    for b in bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    cmd.arg("--out").arg(host.join("node"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(host.join("stderr.log")).unwrap();
    on(hosts, i, &cmd).stdout(Stdio::null()).stderr(log).spawn().expect("start a node")
}

/// A new host's identity (`keygen`) and certificate for `role` at `index`, or at the next free
/// one (`admit` without `--index`), in `dir/<name>`; returns that directory and the index.
fn admit(dir: &Path, name: &str, role: &str, index: Option<usize>) -> (PathBuf, u64) {
    let host = dir.join(name);
    std::fs::create_dir_all(&host).unwrap();
    let o = run(peerless().args(["keygen", "--out"]).arg(host.join("identity.key")));
    assert!(o.status.success(), "keygen");
    let id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let o = run(peerless()
        .args(["admit", "--run"])
        .arg(dir.join("run"))
        .args(["--peer", &id, "--role", role])
        .args(index.map(|i| ["--index".to_owned(), i.to_string()]).into_iter().flatten())
        .arg("--out")
        .arg(host.join("cert")));
    assert!(o.status.success(), "admit");
    let said = String::from_utf8_lossy(&o.stdout);
    let index =
        said.split(&format!("as {role} ")).nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok());
    (host, index.unwrap_or_else(|| panic!("admit names the index: {said}")))
}

fn node_round(host: &Path) -> u64 {
    crate::rounds_done(&host.join("node"))
}

fn wait_all(nodes: &mut Nodes, timeout: Duration) {
    let t = Instant::now();
    for c in &mut nodes.0 {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "a peer failed: {status}");
                break;
            }
            assert!(t.elapsed() < timeout, "the peers did not finish within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn summary(host: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(host.join("node/summary.json")).unwrap()).unwrap()
}

/// Three hosts train MNIST with gradient functions; a fourth machine is admitted while they
/// train and joins through one bootstrap address: it is announced, the rounds' samples are
/// dealt over four (96 each instead of 128), and all four end with one model at ≥ 97 %.
#[test]
fn three_peers_on_three_hosts_train_mnist_with_functions_a_fourth_joins_and_all_end_with_one_model() {
    let Some(data) = crate::real_data("mnist") else { return };
    let Some(hosts) = hosts(4) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let train = ["--dataset", "mnist", "--epochs", "3", "--lr", "0.1", "--functions-per-peer", "2"];
    let mut host_dirs = prepare(dir, 3, &train, Some(&data));
    let mut nodes = Nodes(Vec::new());
    for (i, h) in host_dirs.iter().enumerate() {
        nodes.0.push(start(&hosts, dir, h, i));
    }
    wait_for("the three to train", Duration::from_secs(300), || node_round(&host_dirs[0]) >= 100);
    let (joiner, index) = admit(dir, "host3", "peer", None);
    assert_eq!(index, 3, "the next free index");
    nodes.0.push(start_node(&hosts, dir, &joiner, 3, "peer", &[hosts.multiaddr(0)]));
    host_dirs.push(joiner);
    wait_all(&mut nodes, Duration::from_secs(900));
    let s: Vec<serde_json::Value> = host_dirs.iter().map(|h| summary(h)).collect();
    for x in &s {
        assert_eq!(x["completed"], true, "{x}");
        assert!(x["test_accuracy"].as_f64().unwrap() >= 0.97, "{x}");
        assert!(x["invocations"].as_u64().unwrap() > 0, "gradients in functions: {x}");
    }
    assert!(s.iter().all(|x| x["param_digest"] == s[0]["param_digest"]), "replicas differ: {s:?}");
    let joined = crate::events(&host_dirs[0].join("node/events.jsonl"))
        .iter()
        .any(|e| e["event"] == "peer_joined" && e["peer"] == 3);
    assert!(joined, "host 0 recorded the fourth peer's join");
    let samples = |h: &Path| -> Vec<u64> {
        let text = std::fs::read_to_string(h.join("node/metrics.csv")).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let c = header.iter().position(|x| *x == "samples").unwrap();
        lines.filter_map(|l| l.split(',').nth(c)?.parse().ok()).collect()
    };
    let (first, fourth) = (samples(&host_dirs[0]), samples(&host_dirs[3]));
    assert!(first[10..50].iter().all(|&x| x == 128), "three peers: 2 × 64 each: {:?}", &first[..50]);
    assert!(first.iter().rev().take(50).all(|&x| x == 96), "four peers share the 384 samples of a round");
    assert!(fourth.iter().filter(|&&x| x == 96).count() >= 50, "the joiner computed its share: {fourth:?}");
}

fn events(host: &Path, event: &str) -> usize {
    let text = std::fs::read_to_string(host.join("node/events.jsonl")).unwrap_or_default();
    text.lines().filter(|l| l.contains(&format!("\"event\":\"{event}\""))).count()
}

/// Host 2's link goes down for 5 s (`ip link set … down`): the two others hold the quorum and
/// train on; host 2 stops (at most the rounds in flight), then adopts their state. Nobody of
/// the quorum side fetches a state, and every replica ends identical.
#[test]
fn a_host_cut_off_for_five_seconds_stops_and_catches_up_with_the_quorum_side() {
    let Some(hosts) = hosts(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let train = ["--dataset", "digits", "--rounds", "3000", "--lr", "0.05", "--functions-per-peer", "1"];
    let host_dirs = prepare(dir, 3, &train, None);
    let mut nodes = Nodes(Vec::new());
    for (i, h) in host_dirs.iter().enumerate() {
        nodes.0.push(start(&hosts, dir, h, i));
    }
    let t = Instant::now();
    while node_round(&host_dirs[2]) < 20 {
        assert!(t.elapsed() < Duration::from_secs(120), "the peers did not start training");
        std::thread::sleep(Duration::from_millis(50));
    }
    hosts.link(2, false).unwrap();
    let before = [node_round(&host_dirs[0]), node_round(&host_dirs[2])];
    std::thread::sleep(Duration::from_secs(5));
    let after = [node_round(&host_dirs[0]), node_round(&host_dirs[2])];
    hosts.link(2, true).unwrap();
    assert!(
        after[0] > before[0] + 10,
        "the others kept training while host 2 was cut off: {before:?} → {after:?}"
    );
    assert!(after[1] <= before[1] + 2, "host 2 trained alone while cut off: {before:?} → {after:?}");
    wait_all(&mut nodes, Duration::from_secs(300));
    assert!(events(&host_dirs[2], "no_quorum") >= 1, "host 2 recorded no no_quorum event");
    assert!(events(&host_dirs[2], "synced") >= 1, "host 2 did not adopt the others' state");
    for h in &host_dirs[..2] {
        assert_eq!(events(h, "reconcile"), 0, "a peer of the quorum side fetched a state ({})", h.display());
    }
    let s: Vec<serde_json::Value> = host_dirs.iter().map(|h| summary(h)).collect();
    assert!(s.iter().all(|x| x["completed"] == true), "{s:?}");
    assert!(s.iter().all(|x| x["param_digest"] == s[0]["param_digest"]), "replicas differ: {s:?}");
}

/// The PS baseline across hosts: the PS on host 3, three workers on hosts 0–2, all started
/// with the commands a user runs. The PS is SIGKILLed and started again on its host: it
/// resumes from its checkpoint. A worker is SIGKILLed and started again: it rejoins.
#[test]
fn a_ps_and_three_workers_on_four_hosts_survive_the_ps_and_a_worker_killed_and_restarted() {
    let Some(hosts) = hosts(4) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut init = peerless();
    init.args(["run", "init", "--arch", "ps", "--workers", "3", "--functions-per-worker", "1"]);
    init.args(["--dataset", "digits", "--rounds", "1500", "--lr", "0.05", "--checkpoint-every", "20"]);
    assert!(run(init.arg("--out").arg(dir.join("run"))).status.success(), "run init");
    let (ps_dir, _) = admit(dir, "ps", "ps", None);
    let workers: Vec<PathBuf> = (0..3)
        .map(|i| {
            let (w, index) = admit(dir, &format!("worker{i}"), "worker", None);
            assert_eq!(index, i, "workers take indices 0..3");
            w
        })
        .collect();
    let ps_host = 3;
    let mut ps = Nodes(vec![start_node(&hosts, dir, &ps_dir, ps_host, "ps", &[])]);
    let boot = [hosts.multiaddr(ps_host)];
    let mut nodes = Nodes(
        workers.iter().enumerate().map(|(i, w)| start_node(&hosts, dir, w, i, "worker", &boot)).collect(),
    );
    let ps_events = |event: &str| -> Vec<serde_json::Value> {
        crate::events(&ps_dir.join("node/events.jsonl")).into_iter().filter(|e| e["event"] == event).collect()
    };
    let closed = || ps_events("round_closed").len();
    wait_for("the PS's first checkpoint", Duration::from_secs(120), || !ps_events("checkpoint").is_empty());

    // The PS dies; its host starts it again a second later, from its checkpoint.
    let mut dead = ps.0.pop().unwrap();
    assert!(crate::signal(dead.id(), rustix::process::Signal::KILL));
    dead.wait().unwrap();
    let killed_at = closed();
    std::thread::sleep(Duration::from_secs(1));
    ps.0.push(start_node(&hosts, dir, &ps_dir, ps_host, "ps", &[]));
    wait_for("the PS to resume", Duration::from_secs(60), || !ps_events("resume").is_empty());
    let resumed = ps_events("resume")[0]["round"].as_u64().unwrap();
    assert!(resumed > 0 && resumed <= killed_at as u64, "resumed from its checkpoint at {resumed}");
    wait_for("rounds after the restart", Duration::from_secs(120), || closed() >= killed_at + 30);

    // Worker 1 dies and is started again: it rejoins and fetches versions once more.
    assert!(crate::signal(nodes.0[1].id(), rustix::process::Signal::KILL));
    nodes.0[1].wait().unwrap();
    let fetched_before = crate::events(&workers[1].join("node/events.jsonl")).len();
    std::thread::sleep(Duration::from_secs(1));
    nodes.0[1] = start_node(&hosts, dir, &workers[1], 1, "worker", &boot);
    wait_for("the worker to fetch again", Duration::from_secs(60), || {
        crate::events(&workers[1].join("node/events.jsonl")).len() > fetched_before + 20
    });
    nodes.0.append(&mut ps.0);
    wait_all(&mut nodes, Duration::from_secs(300));
    let s = summary(&ps_dir);
    assert_eq!(s["completed"], true, "{s}");
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.9, "{s}");
}

/// The launcher with `--netns`: each of 3 peers on a host of its own, every link capped at
/// 50 Mbit/s by `tc tbf` and one host partitioned off for 2 s through `peerless experiment`;
/// then `peerless bench link --netns` prints the round-time split at both rates and their
/// ratio. Every run completes with identical replicas and leaves no namespace behind.
#[test]
fn the_launcher_puts_nodes_on_hosts_of_their_own_with_capped_links_and_real_partitions() {
    if !available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let scenario = dir.join("capped.toml");
    std::fs::write(
        &scenario,
        r#"description = "3 hosts, every link at 50 Mbit/s, host 1 cut off for 2 s, gradients on tensor lanes"
seed = 7
[run]
cluster.nodes = 3
cluster.functions_per_node = 1
train.rounds = 250
p2p.tensor_transport = "tcp"
[[fault]]
kind = "bandwidth"
targets = ["node:0", "node:1", "node:2", "ps"]
at_round = 0
rate_mbit = 50.0
[[fault]]
kind = "partition"
targets = ["node:1"]
at_round = 80
duration_s = 2.0
"#,
    )
    .unwrap();
    let before = namespaces();
    let out = dir.join("exp");
    let o = run(peerless()
        .arg("experiment")
        .arg(&scenario)
        .args(["--arch", "p2p,ps", "--netns", "--out"])
        .arg(&out));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    for arch in ["p2p", "ps"] {
        let run_dir = out.join(format!("capped/{arch}/seed-7"));
        let s = crate::summary(&run_dir);
        assert_eq!(s["completed"], true, "{arch}: {s}");
        let cfg = std::fs::read_to_string(run_dir.join("config.toml")).unwrap();
        assert!(cfg.contains("netns = true"), "{arch}: the effective config says where nodes ran");
        let faults: Vec<String> = crate::events(&run_dir.join("events.jsonl"))
            .iter()
            .filter(|e| e["event"] == "fault_injected")
            .map(|e| e["fault"].as_str().unwrap().to_owned())
            .collect();
        assert!(faults.contains(&"bandwidth".into()) && faults.contains(&"partition".into()), "{faults:?}");
        if arch == "p2p" {
            crate::assert_completed_and_agreed(&s);
            let listen = std::fs::read_to_string(run_dir.join("peers/1/peer.toml")).unwrap();
            assert!(listen.contains("/ip4/10.213."), "peer 1 listened on its own host's address");
            // Gradients went on tensor lanes between the hosts' addresses, under the caps and
            // through the cut.
            let lanes: Vec<String> = crate::events(&run_dir.join("events.jsonl"))
                .iter()
                .filter(|e| e["event"] == "tensor_lane")
                .map(|e| e["addr"].as_str().unwrap().to_owned())
                .collect();
            assert!(lanes.len() >= 6 && lanes.iter().all(|a| a.starts_with("10.213.")), "{lanes:?}");
        }
    }

    let o = run(peerless()
        .args(["bench", "link", "--netns", "--peers", "3", "--rounds", "30", "--out"])
        .arg(dir.join("bench")));
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    for row in ["uncapped", "50 Mbit/s", "capped ÷ uncapped", "compute", "exchange", "wait", "by netns"] {
        assert!(table.contains(row), "{row} in: {table}");
    }
    for pass in ["pass0-uncapped", "pass0-capped"] {
        crate::assert_completed_and_agreed(&crate::summary(&dir.join("bench").join(pass)));
    }
    assert_eq!(namespaces(), before, "every namespace of the runs is removed");
}

/// The network namespaces named like ours, but for this test process's own.
fn namespaces() -> Vec<String> {
    let o = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let own = format!("peerless-{}-", std::process::id());
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| Some(l.split_whitespace().next()?.to_owned()))
        .filter(|n| n.starts_with("peerless-") && !n.starts_with(&own))
        .collect();
    v.sort();
    v
}
