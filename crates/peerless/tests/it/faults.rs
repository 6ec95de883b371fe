//! Scenario faults injected by the launcher for real — SIGKILL, SIGSTOP, periodic stops, a
//! partition and delays through the fault proxy, function failures — on short digits runs of
//! both architectures; each test reads the events file for the injection and the recovery.

use std::path::Path;

use crate::{peerless, run, summary};

/// A scenario on digits: 3 nodes × 2 functions, `rounds` rounds, plus `extra` (more `[run]`
/// keys, then `[[fault]]` tables).
pub(crate) fn scenario(dir: &Path, name: &str, rounds: u32, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "description = \"test\"\ntarget_accuracy = 0.5\n[run]\ndata.dataset = \"digits\"\n\
         train.rounds = {rounds}\ntrain.checkpoint_every = 10\ncluster.nodes = 3\ncluster.functions_per_node = 2\n\
         optimizer = {{ kind = \"sgd\", lr = 0.05, momentum = 0.9 }}\n{extra}"
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs the scenario and returns the run directory's merged events.
pub(crate) fn train(file: &Path, arch: &str, out: &Path) -> Vec<serde_json::Value> {
    let o = run(peerless()
        .args(["train", "--arch", arch, "--seed", "3", "--scenario"])
        .arg(file)
        .arg("--out")
        .arg(out));
    assert!(o.status.success(), "peerless train --scenario {} --arch {arch} failed", file.display());
    let mut ev: Vec<serde_json::Value> = std::fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("events are JSON lines"))
        .collect();
    ev.sort_by_key(|e| e["t_ms"].as_u64());
    ev
}

/// Trains `extra`'s workload (more `[run]` keys) on the scenario above with node 1 SIGKILLed
/// at round `at` and restarted 0.5 s later; asserts it synced from a live peer and the run
/// ended with identical replicas.
pub(crate) fn a_killed_peer_rejoins(extra: &str, rounds: u32, at: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let kill = format!(
        "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = {at}\nrestart_after_s = 0.5\n"
    );
    let f = scenario(tmp.path(), "kill", rounds, &format!("{extra}{kill}"));
    let out = tmp.path().join("run");
    let ev = train(&f, "p2p", &out);
    find(&ev, "fault_injected", "kill");
    assert!(ev.iter().any(|e| e["event"] == "synced" && e["peer"] == 1), "the restarted peer synced");
    crate::assert_completed_and_agreed(&summary(&out));
}

fn find<'a>(ev: &'a [serde_json::Value], event: &str, fault: &str) -> &'a serde_json::Value {
    ev.iter()
        .find(|e| e["event"] == event && e["fault"] == fault)
        .unwrap_or_else(|| panic!("no {event} of {fault} in the events"))
}

/// Global rounds completed after `t_ms`: P2P round_closed events of every peer, PS rows.
fn rounds_after(out: &Path, t_ms: u64) -> u64 {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<(u64, u64)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Some((c[0].parse().ok()?, c[2].parse().ok()?))
        })
        .collect();
    let before = rows.iter().filter(|r| r.0 <= t_ms).map(|r| r.1).max().unwrap_or(0);
    rows.iter().filter(|r| r.0 > t_ms).map(|r| r.1).max().unwrap_or(0).saturating_sub(before)
}

#[test]
fn a_killed_peer_restarted_by_the_schedule_rejoins_and_ends_with_the_others_model() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "kill",
        // Long enough that the others still train when it is back 0.5 s after the kill.
        600,
        "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = 30\nrestart_after_s = 0.5\n",
    );
    let out = tmp.path().join("run");
    let ev = train(&f, "p2p", &out);
    let inj = find(&ev, "fault_injected", "kill");
    assert_eq!(inj["targets"], serde_json::json!(["peer 1"]), "{inj}");
    assert!(inj["pids"][0].is_u64(), "the victim's pid was signalled: {inj}");
    assert!(inj["round"].as_u64().unwrap() >= 30, "{inj}");
    let t = inj["t_ms"].as_u64().unwrap();
    let exit = ev.iter().find(|e| e["event"] == "node_exit" && e["index"] == 1).expect("the victim exited");
    assert!(exit["status"].as_str().unwrap().contains("killed"), "{exit}");
    assert!(
        ev.iter().any(|e| e["event"] == "node_restart" && e["index"] == 1 && e["t_ms"].as_u64() > Some(t))
    );
    assert!(ev.iter().any(|e| e["event"] == "synced" && e["peer"] == 1), "the restarted peer synced");
    assert!(rounds_after(&out, t) > 0, "training went on after the kill");
    let s = summary(&out);
    assert_eq!(s["replicas_agree"], true, "{s}");
    assert_eq!(s["completed"], true, "{s}");
}

/// One peer's `ledger.csv` (`out/peers/<i>/`) as columns by name, one map a row.
fn ledger(out: &Path, i: usize) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(out.join(format!("peers/{i}/ledger.csv"))).unwrap();
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines.map(|l| head.iter().map(|h| h.to_string()).zip(l.split(',').map(str::to_owned)).collect()).collect()
}

#[test]
fn a_restarted_peer_invokes_the_warm_instances_its_function_service_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "kill",
        // Long enough that the others still train when it is back 0.5 s after the kill.
        600,
        "[[fault]]\nkind = \"kill\"\ntargets = [\"node:1\"]\nat_round = 30\nrestart_after_s = 0.5\n",
    );
    let out = tmp.path().join("run");
    let ev = train(&f, "p2p", &out);
    find(&ev, "fault_injected", "kill");
    assert!(ev.iter().any(|e| e["event"] == "node_restart" && e["index"] == 1), "peer 1 was restarted");
    assert!(ev.iter().any(|e| e["event"] == "synced" && e["peer"] == 1), "the restarted peer synced");
    crate::assert_completed_and_agreed(&summary(&out));
    let log = std::fs::read_to_string(out.join("peers/1/peer.log")).unwrap();
    assert!(log.contains("invoking through the function service"), "peer 1 used its service");
    let file = std::fs::read_to_string(out.join("peers/1/peer.toml")).unwrap();
    assert!(file.contains("service_addr = \"\""), "the node file points at no service once the run is over");
    // Peer 1's ledger holds both processes' attempts (each appended as it finished): the
    // killed process's warm-up and rounds, then the restarted process's, from its warm-up on.
    // Every attempt of the restarted process, its warm-up included, ran warm.
    let both = ledger(&out, 1);
    let first_round =
        both.iter().position(|r| r["node"] == "peer1").expect("the killed process computed rounds");
    let restarted_from = (first_round..both.len())
        .find(|&i| both[i]["node"] == "peer1-warm-up")
        .expect("the restarted process's warm-up follows the killed one's rounds");
    assert!(
        both[..first_round].iter().all(|r| r["node"] == "peer1-warm-up"),
        "the killed process's warm-up came first"
    );
    let restarted = &both[restarted_from..];
    assert!(restarted.iter().any(|r| r["node"] == "peer1"), "the restarted peer computed rounds");
    for r in restarted {
        assert_eq!((r["cold_start"].as_str(), r["init_us"].as_str()), ("false", "0"), "{r:?}");
        assert_eq!(r["outcome"], "ok", "{r:?}");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("peers/1/function_metrics.json")).unwrap())
            .unwrap();
    assert_eq!(metrics["cold_starts"], 0, "{metrics}");
    assert!(metrics["invocations"].as_u64() > Some(0) && metrics["max_memory_mb"].as_u64() > Some(0));
    // A peer that was never restarted started its instances cold once, in its warm-up.
    let cold: Vec<_> = ledger(&out, 0).into_iter().filter(|r| r["cold_start"] == "true").collect();
    assert!(!cold.is_empty() && cold.iter().all(|r| r["node"] == "peer0-warm-up"), "{cold:?}");
}

#[test]
fn function_faults_through_the_function_services_are_the_in_process_runtime_s() {
    let tmp = tempfile::tempdir().unwrap();
    let faults = "function.faults = { crash_rate = 0.1, throttle_rate = 0.05 }\n";
    let mut runs = Vec::new();
    for services in [true, false] {
        let extra = format!("{faults}launcher.function_services = {services}\n");
        let f = scenario(tmp.path(), &format!("services-{services}"), 40, &extra);
        let out = tmp.path().join(format!("services-{services}"));
        train(&f, "p2p", &out);
        let s = summary(&out);
        crate::assert_completed_and_agreed(&s);
        // Which attempt of which batch met which outcome: the seeded fault plans.
        let mut attempts: Vec<String> = (0..3)
            .flat_map(|i| ledger(&out, i))
            .map(|r| format!("{} {} {} {} {}", r["node"], r["round"], r["batch"], r["attempt"], r["outcome"]))
            .collect();
        attempts.sort();
        let digests: Vec<String> =
            s["per_peer"].as_array().unwrap().iter().map(|p| p["param_digest"].to_string()).collect();
        runs.push((attempts, digests));
    }
    assert!(
        runs[0].0.iter().any(|a| a.ends_with("crashed"))
            && runs[0].0.iter().any(|a| a.ends_with("throttled"))
    );
    assert_eq!(runs[0].0, runs[1].0, "the same attempts met the same faults");
    assert_eq!(runs[0].1, runs[1].1, "the same model");
}

#[test]
fn a_killed_ps_is_restarted_and_the_recovery_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "ps",
        120,
        "ps.restart_delay_ms = 500\n[[fault]]\nkind = \"kill\"\ntargets = [\"ps\"]\nat_round = 35\n",
    );
    let out = tmp.path().join("run");
    let ev = train(&f, "ps", &out);
    let inj = find(&ev, "fault_injected", "kill");
    assert_eq!(inj["targets"], serde_json::json!(["ps"]), "{inj}");
    let rec = ev.iter().find(|e| e["event"] == "recovery").expect("a recovery event");
    assert_eq!(rec["node"], "ps", "{rec}");
    assert!(rec["resumed_from_round"].as_u64().unwrap() >= 30, "resumed from the round-30 checkpoint: {rec}");
    assert!(rec["downtime_s"].as_f64().unwrap() >= 0.5, "{rec}");
    assert!(rounds_after(&out, inj["t_ms"].as_u64().unwrap()) > 0);
    assert_eq!(summary(&out)["completed"], true);
}

#[test]
fn stopped_and_straggling_nodes_are_resumed_and_the_cluster_keeps_training() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "stop",
        150,
        "[[fault]]\nkind = \"stop\"\ntargets = [\"node:1\"]\nat_round = 20\nduration_s = 1.5\n\
         [[fault]]\nkind = \"straggle\"\ntargets = [\"node:2\"]\nat_s = 0.5\nstop_ms = 40\nperiod_ms = 120\nduration_s = 4\n",
    );
    for arch in ["p2p", "ps"] {
        let out = tmp.path().join(arch);
        let ev = train(&f, arch, &out);
        for fault in ["stop", "straggle"] {
            let inj = find(&ev, "fault_injected", fault);
            let clr = find(&ev, "fault_cleared", fault);
            assert!(clr["t_ms"].as_u64() > inj["t_ms"].as_u64(), "{arch}: {inj} then {clr}");
        }
        let stop = find(&ev, "fault_injected", "stop");
        let cleared = find(&ev, "fault_cleared", "stop")["t_ms"].as_u64().unwrap();
        let held = cleared - stop["t_ms"].as_u64().unwrap();
        assert!(held >= 1500, "{arch}: stopped for {held} ms");
        assert!(rounds_after(&out, cleared) > 0, "{arch}: training went on after SIGCONT");
        assert_eq!(summary(&out)["completed"], true, "{arch}");
        // Nobody was killed: a stopped process is frozen, not dead.
        assert!(ev.iter().filter(|e| e["event"] == "node_exit").all(|e| e["status"] == "exit code 0"));
    }
}

#[test]
fn a_partition_through_the_fault_proxy_cuts_the_node_off_and_heals() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "partition",
        // Long enough that the cut peer, training alone, is still at it when the cut heals.
        600,
        "[[fault]]\nkind = \"partition\"\ntargets = [\"node:2\"]\nat_round = 20\nduration_s = 2\n",
    );
    for arch in ["p2p", "ps"] {
        let out = tmp.path().join(arch);
        let ev = train(&f, arch, &out);
        let inj = find(&ev, "fault_injected", "partition");
        let clr = find(&ev, "fault_cleared", "partition");
        let (t0, t1) = (inj["t_ms"].as_u64().unwrap(), clr["t_ms"].as_u64().unwrap());
        // The cut is real: connections to node 2 drop while it lasts …
        let dropped = |e: &serde_json::Value| {
            e["event"] == "disconnected" || e["event"] == "peer_left" || e["event"] == "worker_left"
        };
        assert!(
            ev.iter().any(|e| dropped(e) && (t0..t1).contains(&e["t_ms"].as_u64().unwrap())),
            "{arch}: no connection dropped during the partition"
        );
        // … and come back after it heals.
        assert!(
            ev.iter().any(|e| e["event"] == "connected" && e["t_ms"].as_u64().unwrap() >= t1),
            "{arch}: nobody reconnected after the partition healed"
        );
        assert!(rounds_after(&out, t1) > 0, "{arch}");
        let s = summary(&out);
        assert_eq!(s["completed"], true, "{arch}: {s}");
        if arch == "p2p" {
            assert_eq!(s["replicas_agree"], true, "the partitioned peer reconciled: {s}");
        }
    }
}

#[test]
fn delayed_traffic_still_trains_and_function_failures_are_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "delay",
        80,
        "function.faults = { crash_rate = 0.1, throttle_rate = 0.05 }\n\
         [[fault]]\nkind = \"delay\"\ntargets = [\"node:0\"]\nat_round = 10\ndelay_ms = 15\n",
    );
    for arch in ["p2p", "ps"] {
        let out = tmp.path().join(arch);
        let ev = train(&f, arch, &out);
        let inj = find(&ev, "fault_injected", "delay");
        assert_eq!(inj["delay_ms"], 15, "{arch}: {inj}");
        // A delay to the end is cleared when the run ends.
        find(&ev, "fault_cleared", "delay");
        let ff = find(&ev, "fault_injected", "function_faults");
        assert_eq!(ff["rates"]["crash_rate"], 0.1, "{ff}");
        let s = summary(&out);
        assert_eq!(s["completed"], true, "{arch}: {s}");
        let retries: u64 =
            s["per_peer"].as_array().unwrap().iter().filter_map(|p| p["retries"].as_u64()).sum();
        assert!(retries > 0, "{arch}: 15 % of attempts failed and nothing was retried: {s}");
        assert_eq!(s["rounds"], 80, "{arch}: every round ran despite the failures");
    }
}

#[test]
fn a_fault_on_a_node_the_architecture_lacks_is_recorded_as_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let f = scenario(
        tmp.path(),
        "skip",
        20,
        "[[fault]]\nkind = \"kill\"\ntargets = [\"worker:1\"]\nat_round = 5\n",
    );
    let out = tmp.path().join("run");
    let ev = train(&f, "p2p", &out);
    let sk = ev.iter().find(|e| e["event"] == "fault_skipped").expect("a fault_skipped event");
    assert!(sk.to_string().contains("worker:1"), "{sk}");
    assert!(!ev.iter().any(|e| e["event"] == "fault_injected"));
}

#[test]
fn bad_scenarios_are_refused_naming_the_file_and_the_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("[[fault]]\nkind = \"kill\"\ntargets = [\"node:7\"]\nat_round = 5\n", "node:7"),
        ("[[fault]]\nkind = \"explode\"\ntargets = [\"ps\"]\nat_round = 5\n", "explode"),
        ("[[fault]]\nkind = \"stop\"\ntargets = [\"ps\"]\nat_round = 5\n", "duration_s"),
        ("[[fault]]\nkind = \"kill\"\ntargets = [\"ps\"]\n", "at_round"),
        ("model.arch = \"resnet\"\n", "resnet"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let f = scenario(tmp.path(), &format!("bad{i}"), 20, extra);
        let o = run(peerless()
            .args(["train", "--arch", "p2p", "--scenario"])
            .arg(&f)
            .arg("--out")
            .arg(tmp.path().join(format!("r{i}"))));
        assert!(!o.status.success(), "{extra} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("bad{i}.toml")) && err.contains(needle), "{extra}: {err}");
    }
}
