//! Experiment scenarios (`peerless_runtime::scenario`, TOML): a workload and its faults.
//!
//! A scenario that loads is valid (its workload too), every fault target resolves in both
//! architectures without panicking, and the scenario written back as TOML loads back equal.
//! The corpus is seeded with `scenarios/` (by scripts/fuzz.sh) and one fault of each kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerless_runtime::config::TrainArch;
use peerless_runtime::scenario::{Scenario, resolve_target};

const EVERY_KIND: &str = r#"name = "every-kind"
description = "one fault of each kind"
target_accuracy = 0.9
seed = 3
timeout_s = 60
[run]
data.dataset = "digits"
train.epochs = 1
cluster.nodes = 4
[run.function.faults]
crash_rate = 0.1
[[fault]]
kind = "kill"
targets = ["node:1"]
at_round = 5
restart_after_s = 2
[[fault]]
kind = "stop"
targets = ["peer:2"]
at_s = 1.5
duration_s = 2
[[fault]]
kind = "straggle"
targets = ["worker:3"]
at_s = 0
stop_ms = 50
period_ms = 200
[[fault]]
kind = "partition"
targets = ["ps"]
at_round = 2
duration_s = 1
[[fault]]
kind = "delay"
targets = ["node:0", "node:2"]
at_round = 1
delay_ms = 20
[[fault]]
kind = "churn"
every_s = 3
kinds = ["kill", "stop", "partition"]
down_s = 1
targets = ["node:1", "ps"]
at_s = 2
duration_s = 30
"#;

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| vec![("every-kind".into(), EVERY_KIND.as_bytes().to_vec())]);
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else { return };
        match Scenario::from_toml(text, "fuzz.toml", "fuzz") {
            Ok(s) => {
                s.validate("fuzz.toml").expect("a loaded scenario is valid");
                let n = s.run.cluster.nodes as usize;
                for f in &s.faults {
                    for t in &f.targets {
                        let p2p = resolve_target(t, TrainArch::P2p, n);
                        let ps = resolve_target(t, TrainArch::Ps, n);
                        assert!(p2p.is_some() || ps.is_some(), "target {t:?} exists in neither architecture");
                    }
                }
                let written = toml::to_string(&s).expect("a scenario serializes");
                let back = Scenario::from_toml(&written, "written", "other")
                    .unwrap_or_else(|e| panic!("a written scenario does not load: {e}\n{written}"));
                assert_eq!(back, s, "{written}");
            }
            Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
        }
    }
);
