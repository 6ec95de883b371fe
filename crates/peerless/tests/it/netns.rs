//! Peers on hosts of their own: each node in a network namespace with its own address, the
//! namespaces joined by a bridge in a namespace of its own (root and iproute2 only; skipped
//! elsewhere with a message, required where `PEERLESS_REQUIRE_NETNS=1`, as `.ci/run` sets).
//! Nodes start with the commands a user runs on each host (`run init`, `keygen`, `admit`,
//! `peer --run …`); faults are real: a namespace's link is set down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{peerless, run};

/// `ip` with `args`; panics naming the command when it fails.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(o.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

/// Namespaces for `n` nodes and their bridge, removed when dropped (also when a test fails).
struct Hosts {
    tag: String,
    subnet: u8,
    n: usize,
}

impl Hosts {
    /// `None` (the test is skipped) without root or iproute2, unless they are required.
    fn new(n: usize) -> Option<Hosts> {
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        });
        let has_ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
        if !(root && has_ip) {
            if std::env::var("PEERLESS_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("network namespaces are required (root: {root}, iproute2: {has_ip})");
            }
            eprintln!(
                "SKIPPED: network namespaces need root and iproute2 (root: {root}, iproute2: {has_ip})"
            );
            return None;
        }
        // Names unique to this process and test (interface names have at most 15 bytes).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}{k}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 200) as u8 + k as u8 + 20;
        let h = Hosts { tag, subnet, n };
        ip(&["netns", "add", &h.bridge()]);
        ip(&["-n", &h.bridge(), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &h.bridge(), "link", "set", "br0", "up"]);
        for i in 0..n {
            let (ns, outer, inner) = (h.ns(i), h.outer(i), format!("vn{}x{i}", h.tag));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &outer, "netns", &h.bridge()]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["-n", &h.bridge(), "link", "set", &outer, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", h.addr(i)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        Some(h)
    }

    fn bridge(&self) -> String {
        format!("plb{}", self.tag)
    }

    fn ns(&self, i: usize) -> String {
        format!("pln{}x{i}", self.tag)
    }

    /// Node `i`'s end of its link, in the bridge's namespace.
    fn outer(&self, i: usize) -> String {
        format!("vb{}x{i}", self.tag)
    }

    /// Node `i`'s address (a private test range).
    fn addr(&self, i: usize) -> String {
        format!("10.213.{}.{}", self.subnet, i + 1)
    }

    /// Node `i`'s listen address.
    fn multiaddr(&self, i: usize) -> String {
        format!("/ip4/{}/tcp/4001", self.addr(i))
    }

    /// `cmd` run inside node `i`'s namespace.
    fn on(&self, i: usize, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }

    /// Node `i`'s link up or down.
    fn link(&self, i: usize, up: bool) {
        ip(&["-n", &self.bridge(), "link", "set", &self.outer(i), if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it, and so their peers.
        for i in 0..self.n {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge()]).status();
    }
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
    (0..n)
        .map(|i| {
            let host = dir.join(format!("host{i}"));
            std::fs::create_dir_all(&host).unwrap();
            let o = run(peerless().args(["keygen", "--out"]).arg(host.join("identity.key")));
            assert!(o.status.success(), "keygen");
            let id = String::from_utf8(o.stdout).unwrap().trim().to_owned();
            let o = run(peerless()
                .args(["admit", "--run"])
                .arg(dir.join("run"))
                .args(["--peer", &id, "--role", "peer", "--index", &i.to_string(), "--out"])
                .arg(host.join("cert")));
            assert!(o.status.success(), "admit");
            host
        })
        .collect()
}

/// Starts peer `i` in its namespace, dialling the peers before it.
fn start(hosts: &Hosts, dir: &Path, host: &Path, i: usize) -> Child {
    let mut cmd = peerless();
    cmd.arg("peer").arg("--run").arg(dir.join("run/run.toml"));
    cmd.arg("--identity").arg(host.join("identity.key")).arg("--cert").arg(host.join("cert"));
    cmd.args(["--listen", &hosts.multiaddr(i)]);
    for j in 0..i {
        cmd.args(["--bootstrap", &hosts.multiaddr(j)]);
    }
    cmd.arg("--out").arg(host.join("node"));
    hosts.on(i, &cmd).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start a peer")
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

#[test]
fn three_peers_on_three_hosts_train_mnist_with_functions_to_97_percent_and_one_model() {
    let Some(data) = crate::real_data("mnist") else { return };
    let Some(hosts) = Hosts::new(3) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let train = ["--dataset", "mnist", "--epochs", "3", "--lr", "0.1", "--functions-per-peer", "2"];
    let host_dirs = prepare(dir, 3, &train, Some(&data));
    let mut nodes = Nodes(Vec::new());
    for (i, h) in host_dirs.iter().enumerate() {
        nodes.0.push(start(&hosts, dir, h, i));
    }
    wait_all(&mut nodes, Duration::from_secs(600));
    let s: Vec<serde_json::Value> = host_dirs.iter().map(|h| summary(h)).collect();
    for x in &s {
        assert_eq!(x["completed"], true, "{x}");
        assert!(x["test_accuracy"].as_f64().unwrap() >= 0.97, "{x}");
        assert!(x["invocations"].as_u64().unwrap() > 0, "gradients in functions: {x}");
    }
    assert!(s.iter().all(|x| x["param_digest"] == s[0]["param_digest"]), "replicas differ");
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
    let Some(hosts) = Hosts::new(3) else { return };
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
    hosts.link(2, false);
    let before = [node_round(&host_dirs[0]), node_round(&host_dirs[2])];
    std::thread::sleep(Duration::from_secs(5));
    let after = [node_round(&host_dirs[0]), node_round(&host_dirs[2])];
    hosts.link(2, true);
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
