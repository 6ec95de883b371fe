//! A `churn` scenario run for real through `peerless experiment`: a short P2P digits run
//! whose peers 1 and 2 are SIGKILLed or SIGSTOPped by a seeded stream of faults; the events
//! hold exactly the stream the seed gives, and the run ends with identical replicas.

use std::path::Path;

use peerless_runtime::cluster::churn::{Draw, expand};
use peerless_runtime::config::TrainArch;
use peerless_runtime::scenario::{FaultKind, Scenario};

use crate::{assert_completed_and_agreed, peerless, run, summary};

/// 3 peers × 2 functions on digits for about 7 s; from 1.5 s, a kill or a stop of peer 1 or 2
/// every 1.5 s, each lasting 0.5 s: faults at 1.5, 3 and 4.5 s.
const SCENARIO: &str = r#"description = "churn test"
target_accuracy = 0.5
[run]
data.dataset = "digits"
train.rounds = 600
train.checkpoint_every = 10
cluster.nodes = 3
cluster.functions_per_node = 2
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
[[fault]]
kind = "churn"
every_s = 1.5
kinds = ["kill", "stop"]
down_s = 0.5
targets = ["node:1", "node:2"]
at_s = 1.5
duration_s = 4
"#;

/// The scenario with the first seed whose stream both kills and stops, and that stream.
fn scenario_with_both_kinds(dir: &Path) -> (std::path::PathBuf, Vec<Draw>) {
    let base = Scenario::from_toml(SCENARIO, "churn.toml", "churn").unwrap();
    let (seed, draws) = (1..100)
        .map(|seed| (seed, expand(&base.faults[0], 0, seed, TrainArch::P2p, 3, f64::INFINITY)))
        .find(|(_, d)| [FaultKind::Kill, FaultKind::Stop].iter().all(|k| d.iter().any(|x| x.kind == *k)))
        .expect("some seed draws both kinds");
    let path = dir.join("churn.toml");
    std::fs::write(&path, format!("seed = {seed}\n{SCENARIO}")).unwrap();
    (path, draws)
}

fn events(run_dir: &Path) -> Vec<serde_json::Value> {
    let mut ev: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("events are JSON lines"))
        .collect();
    ev.sort_by_key(|e| e["t_ms"].as_u64());
    ev
}

#[test]
fn a_churn_stream_injects_the_faults_its_seed_draws_and_the_peers_end_with_one_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, draws) = scenario_with_both_kinds(tmp.path());
    assert_eq!(draws.len(), 3, "{draws:?}");
    let exp = tmp.path().join("exp");
    let o = run(peerless().arg("experiment").arg(&file).args(["--arch", "p2p", "--out"]).arg(&exp));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let seed = Scenario::load(&file).unwrap().seed;
    let out = exp.join("churn").join("p2p").join(format!("seed-{seed}"));
    let ev = events(&out);

    // Every draw was injected as its kind, on its target, in order, and recorded as such.
    let injected: Vec<&serde_json::Value> =
        ev.iter().filter(|e| e["event"] == "fault_injected" && e["churn"].is_u64()).collect();
    let want: Vec<(u64, &str, String)> = draws
        .iter()
        .map(|d| (d.index, d.kind.name(), d.target.expect("a target is up").to_string()))
        .collect();
    let got: Vec<(u64, &str, String)> = injected
        .iter()
        .map(|e| {
            (
                e["churn"].as_u64().unwrap(),
                e["fault"].as_str().unwrap(),
                e["targets"][0].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want, "the events hold the seed's stream");
    let t0 = ev.iter().find(|e| e["event"] == "start").and_then(|e| e["t_ms"].as_u64()).unwrap();
    for (e, d) in injected.iter().zip(&draws) {
        let at = (e["t_ms"].as_u64().unwrap() - t0) as f64 / 1000.0;
        assert!(
            at >= d.at_s - 0.05 && at < d.at_s + 1.0,
            "draw {} due at {} s, injected at {at} s",
            d.index,
            d.at_s
        );
    }
    // A kill is restarted after down_s (the peer rejoins), a stop continued.
    for (e, d) in injected.iter().zip(&draws) {
        let t = e["t_ms"].as_u64().unwrap();
        let index = d.target.unwrap().index;
        match d.kind {
            FaultKind::Kill => {
                assert_eq!(e["restart_after_s"], 0.5, "{e}");
                assert!(
                    ev.iter().any(|x| x["event"] == "node_restart"
                        && x["index"] == index
                        && x["t_ms"].as_u64() > Some(t)),
                    "peer {index} killed at {t} was not restarted"
                );
            }
            _ => assert!(
                ev.iter().any(|x| x["event"] == "fault_cleared"
                    && x["churn"] == d.index
                    && x["t_ms"].as_u64().unwrap() >= t + 450),
                "the stop of draw {} was not cleared after 0.5 s",
                d.index
            ),
        }
    }
    assert_completed_and_agreed(&summary(&out));

    // The report counts the faults; without a fault-free twin there is no goodput.
    assert!(run(peerless().arg("report").arg(&exp)).status.success());
    let md = std::fs::read_to_string(exp.join("report.md")).unwrap();
    assert!(md.contains("| Faults injected | 3 (n=1) |"), "{md}");
    assert!(md.contains("| Goodput (% of fault-free) | — |"), "{md}");
}
