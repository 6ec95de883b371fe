//! Elastic membership on real peer processes started from the command line: a run grows from
//! 2 to 4 peers while it trains (fresh identities, certificates signed then), and shrinks back
//! to 2 when two peers are SIGKILLed; every round's samples are dealt over whoever is there.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::admission::{keygen, listening};
use crate::{assert_completed_and_agreed, events, peerless, rounds_done, run, summary, wait_for};

/// Keygen, admit (the next free index) and start a peer of `run_dir` writing to `out`,
/// bootstrapping to `bootstrap`; returns the process and the index it was admitted as.
fn start_peer(dir: &Path, run_dir: &Path, name: &str, bootstrap: Option<&str>) -> (Child, u32) {
    let (key, cert, out) =
        (dir.join(format!("{name}.key")), dir.join(format!("{name}.cert")), dir.join(name));
    let id = keygen(&key);
    let o = run(peerless()
        .args(["admit", "--run"])
        .arg(run_dir)
        .args(["--peer", &id, "--role", "peer", "--out"])
        .arg(&cert));
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stdout);
    let index = said.split("as peer ").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok());
    let index = index.unwrap_or_else(|| panic!("admit names the index: {said}"));
    let mut cmd = peerless();
    cmd.args(["peer", "--run"]).arg(run_dir.join("run.toml"));
    cmd.arg("--identity").arg(&key).arg("--cert").arg(&cert).args(["--listen", "/ip4/127.0.0.1/tcp/0"]);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let child = cmd.arg("--out").arg(&out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    (child, index)
}

/// The samples each of `out`'s rounds computed, by round.
fn samples_by_round(out: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col =
        |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no {name} column"));
    let (r, s) = (col("round"), col("samples"));
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some((f.get(r)?.parse().ok()?, f.get(s)?.parse().ok()?))
        })
        .collect()
}

/// The contributors of each round peer `out` closed.
fn contributors(out: &Path) -> Vec<u64> {
    events(&out.join("events.jsonl"))
        .iter()
        .filter(|e| e["event"] == "round_closed")
        .filter_map(|e| e["contributors"].as_u64())
        .collect()
}

#[test]
fn a_run_grows_from_two_to_four_peers_while_it_trains_and_shrinks_back_to_two() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run_dir = dir.join("run");
    let flags =
        ["--peers", "2", "--functions-per-peer", "2", "--rounds", "2500", "--lr", "0.05", "--seed", "9"];
    assert!(run(peerless().args(["run", "init"]).args(flags).arg("--out").arg(&run_dir)).status.success());
    let (first, i0) = start_peer(dir, &run_dir, "a", None);
    let addr = listening(&dir.join("a"));
    let (second, i1) = start_peer(dir, &run_dir, "b", Some(&addr));
    assert_eq!((i0, i1), (0, 1), "the starting members");
    wait_for("the two to train", Duration::from_secs(120), || rounds_done(&dir.join("a")) >= 50);

    // Two more machines join while it trains: indices 2 and 3, beyond the starting set.
    let (third, i2) = start_peer(dir, &run_dir, "c", Some(&addr));
    let (fourth, i3) = start_peer(dir, &run_dir, "d", Some(&addr));
    assert_eq!((i2, i3), (2, 3), "joiners take the indices after the starting members");
    wait_for("rounds with all four", Duration::from_secs(120), || {
        contributors(&dir.join("a")).iter().rev().take(20).filter(|&&c| c == 4).count() >= 10
    });
    let grown = rounds_done(&dir.join("a"));

    // It shrinks back: a starting member and a joiner are SIGKILLed.
    for mut p in [second, third] {
        assert!(crate::signal(p.id(), rustix::process::Signal::KILL));
        p.wait().unwrap();
    }
    let mut survivors = vec![("a", first), ("d", fourth)];
    for (name, p) in survivors.drain(..) {
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "peer {name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, d) = (summary(&dir.join("a")), summary(&dir.join("d")));
    assert_eq!((a["completed"].as_bool(), d["completed"].as_bool()), (Some(true), Some(true)), "{a} {d}");
    assert_eq!(a["param_digest"], d["param_digest"], "the survivors end with one model");

    // The global batch stays 2 × 2 × 64 samples: 128 a peer with two, 64 with four.
    let by_round = samples_by_round(&dir.join("a"));
    let samples_at = |lo: u64, hi: u64| -> Vec<u64> {
        by_round.iter().filter(|(r, _)| (lo..hi).contains(r)).map(|(_, s)| *s).collect()
    };
    assert!(samples_at(10, 40).iter().all(|&s| s == 128), "two peers: {:?}", samples_at(10, 40));
    assert!(samples_at(grown - 10, grown).contains(&64), "four peers: {:?}", samples_at(grown - 10, grown));
    let last = by_round.last().unwrap().0;
    assert!(
        samples_at(last - 20, last + 1).iter().all(|&s| s == 128),
        "two again: {:?}",
        samples_at(last - 20, last + 1)
    );
    let joiner = samples_by_round(&dir.join("d"));
    assert!(joiner.iter().any(|&(_, s)| s == 64), "the joiner computed its share: {joiner:?}");
    assert!(contributors(&dir.join("a")).iter().rev().take(10).all(|&c| c == 2), "two contribute at the end");
}

/// The launcher's `join` faults: two joiners start at rounds 20 and 40, then both starting
/// peers are SIGKILLed, and the joiners finish the run with one model.
#[test]
fn join_faults_grow_a_launched_run_and_the_joiners_finish_it_when_the_starting_peers_die() {
    let tmp = tempfile::tempdir().unwrap();
    let scenario = tmp.path().join("grow.toml");
    std::fs::write(
        &scenario,
        "[run]\ncluster.nodes = 2\ncluster.functions_per_node = 2\ntrain.rounds = 400\n\
         optimizer = { kind = \"sgd\", lr = 0.05 }\n\
         [[fault]]\nkind = \"join\"\nat_round = 20\n[[fault]]\nkind = \"join\"\nat_round = 40\n\
         [[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = 120\n\
         [[fault]]\nkind = \"kill\"\ntargets = [\"node:0\"]\nat_round = 180\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o =
        run(peerless().args(["train", "--arch", "p2p", "--scenario"]).arg(&scenario).arg("--out").arg(&out));
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("peer 2") && said.contains("peer 3"), "the joiners are named: {said}");
    let s = summary(&out);
    assert_completed_and_agreed(&s);
    let finishers: Vec<u64> =
        s["param_digests"].as_array().unwrap().iter().map(|d| d[0].as_u64().unwrap()).collect();
    assert_eq!(finishers, [2, 3], "the joiners finish the run: {s}");
    let joins = events(&out.join("events.jsonl"))
        .iter()
        .filter(|e| e["event"] == "fault_injected" && e["fault"] == "join")
        .count();
    assert_eq!(joins, 2);
    assert!(contributors(&out.join("peers/0")).contains(&4), "rounds with all four peers");
    // Rejected: a join names no target.
    std::fs::write(&scenario, "[[fault]]\nkind = \"join\"\ntargets = [\"node:1\"]\nat_round = 5\n").unwrap();
    let o = run(peerless()
        .args(["train", "--arch", "p2p", "--scenario"])
        .arg(&scenario)
        .arg("--out")
        .arg(tmp.path().join("bad")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give no targets"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
