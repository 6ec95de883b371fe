//! Admission by certificate on real peer processes: keygen, run init, admit, and intruders
//! refused with their reason while the run's members train unaffected.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{calm_config, digests, events, peer_round, peerless, run, summary, wait_for};

/// A 3-peer digits run with deadlines long enough that no peer misses one (so the digest
/// depends on nothing but the seed).
fn launch(dir: &Path, out: &Path) -> Child {
    let calm = calm_config(dir);
    peerless()
        .args(["train", "--arch", "p2p", "--peers", "3", "--functions-per-peer", "2", "--rounds", "300"])
        .args(["--lr", "0.05", "--seed", "7", "--config"])
        .arg(&calm)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the launcher")
}

fn finish(child: Child) {
    let out = child.wait_with_output().expect("launcher exits");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

/// `peerless keygen --out FILE`: the peer id it printed.
pub(crate) fn keygen(out: &Path) -> String {
    let o = run(peerless().args(["keygen", "--out"]).arg(out));
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// `peerless admit` in the run directory `run_dir` (the launcher keeps its run's admission
/// files there).
fn admit(run_dir: &Path, peer: &str, role: &str, index: u32, expires_in: &str, out: &Path) {
    let o = run(peerless()
        .args(["admit", "--run"])
        .arg(run_dir)
        .args(["--peer", peer, "--role", role, "--index", &index.to_string(), "--expires-in", expires_in])
        .arg("--out")
        .arg(out));
    assert!(o.status.success());
}

/// An intruder's node file, from member 0's: its own directory, dialling every member, with
/// `set` applied to `[node]` and `run` to `[run]`.
fn intruder_file(
    out: &Path,
    dir: &Path,
    name: &str,
    set: &[(&str, toml::Value)],
    run: Option<toml::Table>,
) -> PathBuf {
    let text = std::fs::read_to_string(out.join("peers/0/peer.toml")).unwrap();
    let mut file: toml::Table = toml::from_str(&text).unwrap();
    let bootstrap: Vec<toml::Value> = std::iter::once(file["node"]["listen"].clone())
        .chain(file["node"]["bootstrap"].as_array().unwrap().iter().cloned())
        .collect();
    if let Some(r) = run {
        file.insert("run".into(), r.into());
    }
    let node = file["node"].as_table_mut().unwrap();
    // Member 0's identity and certificate are its own, not the intruder's.
    node.remove("identity");
    node.remove("certificate");
    node.insert("listen".into(), "/ip4/127.0.0.1/tcp/0".into());
    node.insert("bootstrap".into(), toml::Value::Array(bootstrap));
    node.insert("dir".into(), dir.join(name).display().to_string().into());
    node.insert("progress".into(), false.into());
    for (k, v) in set {
        node.insert((*k).into(), v.clone());
    }
    let mut cluster = file["run"]["cluster"].as_table().unwrap().clone();
    cluster.insert("start_timeout_ms".into(), 60_000.into());
    cluster.insert("compute".into(), "local".into());
    file["run"].as_table_mut().unwrap().insert("cluster".into(), cluster.into());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
    path
}

fn path(p: &Path) -> toml::Value {
    p.display().to_string().into()
}

#[test]
fn intruders_are_refused_each_with_its_reason_and_the_members_train_unaffected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let clean = dir.join("clean");
    finish(launch(dir, &clean));
    let out = dir.join("run");
    let child = launch(dir, &out);
    wait_for("round 5", Duration::from_secs(60), || (0..3).all(|i| peer_round(&out, i) >= 5));
    let members: Vec<toml::Value> = (0..3)
        .map(|i| {
            let ev = events(&out.join(format!("peers/{i}/events.jsonl")));
            let start = ev.iter().find(|e| e["event"] == "start").expect("start event");
            toml::Value::from(start["peer_id"].as_str().unwrap())
        })
        .collect();
    // 1. No certificate: admits the members by peer id and talks to them.
    let none = intruder_file(
        &out,
        dir,
        "none",
        &[("allow", toml::Value::Array(members)), ("index", 3.into())],
        None,
    );
    // 2. Another run's certificate, valid there.
    let other = dir.join("other");
    assert!(run(peerless().args(["run", "init", "--peers", "3", "--out"]).arg(&other)).status.success());
    let key = dir.join("other.key");
    let id = keygen(&key);
    admit(&other, &id, "peer", 1, "1d", &dir.join("other.cert"));
    let other_run: toml::Table =
        toml::from_str(&std::fs::read_to_string(other.join("run.toml")).unwrap()).unwrap();
    let wrong_run = intruder_file(
        &out,
        dir,
        "wrong_run",
        &[("identity", path(&key)), ("certificate", path(&dir.join("other.cert"))), ("index", 1.into())],
        Some(other_run),
    );
    // 3. This run's certificate, expired; 4. a worker's certificate, used as a peer.
    let mut files = vec![none, wrong_run];
    for (name, role, expires_in) in [("expired", "peer", "0s"), ("worker", "worker", "1d")] {
        let key = dir.join(format!("{name}.key"));
        let cert = dir.join(format!("{name}.cert"));
        admit(&out, &keygen(&key), role, 1, expires_in, &cert);
        files.push(intruder_file(
            &out,
            dir,
            name,
            &[("identity", path(&key)), ("certificate", path(&cert)), ("index", 1.into())],
            None,
        ));
    }
    // 5. Member 1's certificate with the intruder's own key.
    let key = dir.join("replay.key");
    keygen(&key);
    files.push(intruder_file(
        &out,
        dir,
        "replay",
        &[
            ("identity", path(&key)),
            ("certificate", path(&out.join("peers/1/node.cert"))),
            ("index", 1.into()),
        ],
        None,
    ));
    let mut intruders: Vec<Child> = files
        .iter()
        .map(|f| {
            peerless()
                .args(["peer", "--config"])
                .arg(f)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let reasons = ["no certificate", "wrong run", "expired", "wrong role", "peer id mismatch"];
    let refused_for = |reason: &str| -> usize {
        (0..3)
            .map(|i| {
                events(&out.join(format!("peers/{i}/events.jsonl")))
                    .iter()
                    .filter(|e| e["event"] == "refused" && e["reason"] == reason)
                    .count()
            })
            .sum()
    };
    wait_for("every intruder's refusal", Duration::from_secs(60), || {
        reasons.iter().all(|r| refused_for(r) > 0)
    });
    finish(child);
    for i in &mut intruders {
        let _ = i.kill();
        let _ = i.wait();
    }
    for i in 0..3 {
        let ev = events(&out.join(format!("peers/{i}/events.jsonl")));
        let connected: Vec<u64> =
            ev.iter().filter(|e| e["event"] == "connected").filter_map(|e| e["to"].as_u64()).collect();
        assert!(
            connected.iter().all(|&p| p < 3 && p != i),
            "peer {i} connected only to members: {connected:?}"
        );
    }
    let (a, b) = (summary(&clean), summary(&out));
    assert_eq!(digests(&a), digests(&b), "training with intruders around differs from the clean run");
}

#[test]
fn keygen_refuses_to_overwrite_and_admit_names_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("id.key");
    let id = keygen(&key);
    assert!(id.starts_with("12D3KooW"), "{id}");
    let again = run(peerless().args(["keygen", "--out"]).arg(&key));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("id.key"));
    let r = tmp.path().join("run");
    assert!(run(peerless().args(["run", "init", "--peers", "2", "--out"]).arg(&r)).status.success());
    let text = std::fs::read_to_string(r.join("run.toml")).unwrap();
    assert!(text.contains("[admission]") && text.contains("arch = \"p2p\""), "{text}");
    let cases = [
        (vec!["--peer", "not-a-peer-id", "--role", "peer"], "--peer"),
        (vec!["--peer", &id, "--role", "boss"], "--role"),
        (vec!["--peer", &id, "--role", "peer", "--expires-in", "3w"], "--expires-in"),
    ];
    for (args, named) in cases {
        let o = peerless()
            .args(["admit", "--run"])
            .arg(&r)
            .args(&args)
            .arg("--out")
            .arg(tmp.path().join("x.cert"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(named), "{args:?}: {err}");
    }
}

/// Node `dir`'s first listening address, from its events.
pub(crate) fn listening(dir: &Path) -> String {
    let mut addr = String::new();
    wait_for("a listening address", Duration::from_secs(60), || {
        let ev = events(&dir.join("events.jsonl"));
        match ev.iter().find(|e| e["event"] == "listening") {
            Some(e) => {
                addr = e["address"].as_str().unwrap().to_owned();
                true
            }
            None => false,
        }
    });
    addr
}

#[test]
fn three_peers_started_from_the_command_line_alone_with_one_bootstrap_address_train_to_the_launchers_digest()
{
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let calm = calm_config(dir);
    let flags =
        ["--peers", "3", "--functions-per-peer", "2", "--rounds", "60", "--lr", "0.05", "--seed", "7"];
    let reference = dir.join("reference");
    let o = run(peerless()
        .args(["train", "--arch", "p2p"])
        .args(flags)
        .arg("--config")
        .arg(&calm)
        .arg("--out")
        .arg(&reference));
    assert!(o.status.success());
    let run_dir = dir.join("run");
    let o = run(peerless()
        .args(["run", "init"])
        .args(flags)
        .arg("--config")
        .arg(&calm)
        .arg("--out")
        .arg(&run_dir));
    assert!(o.status.success());
    let mut addrs: Vec<String> = Vec::new();
    let mut peers: Vec<Child> = Vec::new();
    for i in 0..3 {
        let (key, cert, out) =
            (dir.join(format!("{i}.key")), dir.join(format!("{i}.cert")), dir.join(format!("host{i}")));
        let id = keygen(&key);
        let o = run(peerless()
            .args(["admit", "--run"])
            .arg(&run_dir)
            .args(["--peer", &id, "--role", "peer", "--out"])
            .arg(&cert));
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("as peer {i} ")), "the next free index");
        let mut cmd = peerless();
        cmd.args(["peer", "--run"]).arg(run_dir.join("run.toml"));
        cmd.arg("--identity").arg(&key).arg("--cert").arg(&cert).args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
        // One address is enough: the first peer tells the others where the rest are.
        if let Some(first) = addrs.first() {
            cmd.args(["--bootstrap", first]);
        }
        peers.push(cmd.arg("--out").arg(&out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
        addrs.push(listening(&out));
    }
    for (i, p) in peers.into_iter().enumerate() {
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "peer {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let ev = events(&dir.join("host2/events.jsonl"));
    assert!(
        ev.iter().any(|e| e["event"] == "connected" && e["to"] == 1),
        "host 2 reached host 1 through host 0"
    );
    let want = digests(&summary(&reference));
    for i in 0..3 {
        let s = summary(&dir.join(format!("host{i}")));
        assert_eq!(s["completed"], true, "{s}");
        assert_eq!(s["param_digest"].as_str().unwrap(), want[0], "host {i} ends with the launcher's model");
    }
}

#[test]
fn a_ps_and_workers_started_from_the_command_line_alone_compute_the_launchers_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let flags =
        ["--arch", "ps", "--workers", "2", "--functions-per-worker", "2", "--rounds", "40", "--seed", "3"];
    let reference = dir.join("reference");
    assert!(run(peerless().arg("train").args(flags).arg("--out").arg(&reference)).status.success());
    let run_dir = dir.join("run");
    assert!(run(peerless().args(["run", "init"]).args(flags).arg("--out").arg(&run_dir)).status.success());
    let start = |role: &str, name: &str, bootstrap: Option<&str>| -> Child {
        let (key, cert) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.cert")));
        let id = keygen(&key);
        let o = run(peerless()
            .args(["admit", "--run"])
            .arg(&run_dir)
            .args(["--peer", &id, "--role", role, "--out"])
            .arg(&cert));
        assert!(o.status.success());
        let mut cmd = peerless();
        cmd.args([role, "--run"])
            .arg(run_dir.join("run.toml"))
            .arg("--identity")
            .arg(&key)
            .arg("--cert")
            .arg(&cert);
        cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(bootstrap.map(|b| ["--bootstrap", b]).into_iter().flatten());
        cmd.arg("--out").arg(dir.join(name)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let ps = start("ps", "ps", None);
    let addr = listening(&dir.join("ps"));
    let workers: Vec<Child> = (0..2).map(|i| start("worker", &format!("worker{i}"), Some(&addr))).collect();
    for (name, c) in std::iter::once(("ps".to_string(), ps))
        .chain(workers.into_iter().enumerate().map(|(i, c)| (format!("worker {i}"), c)))
    {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let want = summary(&reference.join("ps"))["param_digest"].clone();
    let got = summary(&dir.join("ps"));
    assert_eq!(got["completed"], true, "{got}");
    assert_eq!(got["param_digest"], want, "the PS started by hand computes the launcher's model");
    let admitted: Vec<u64> = events(&dir.join("ps/events.jsonl"))
        .iter()
        .filter(|e| e["event"] == "connected")
        .filter_map(|e| e["to"].as_u64())
        .collect();
    assert_eq!(admitted.len(), 2, "both workers, by their certificates' indices: {admitted:?}");
    assert!(admitted.contains(&0) && admitted.contains(&1), "{admitted:?}");
}
