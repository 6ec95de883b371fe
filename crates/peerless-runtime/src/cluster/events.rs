//! What the launcher records in the run's `events.jsonl`, as one type: each line is a
//! [`ClusterEvent`], stamped with the wall clock by [`crate::rundir::RunDir::record`]. The
//! nodes' own lines are merged in at the end (`crate::node::NodeEvent`).

use serde::Serialize;

use super::{Exit, Recovery};
use crate::function::FaultConfig;

/// One event of the launcher's.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ClusterEvent {
    /// The cluster starts: `nodes` processes of `arch`, gradients in `compute`.
    Start {
        /// `p2p` or `ps`.
        arch: String,
        /// Node processes.
        nodes: usize,
        /// `functions` or `local`.
        compute: String,
    },
    /// A fault of the schedule was injected.
    FaultInjected(FaultRecord),
    /// A fault with a duration ended (or the run did).
    FaultCleared(FaultRecord),
    /// A fault was not injected: its target does not exist in this architecture, or (a churn
    /// draw) every target was down.
    FaultSkipped(FaultRecord),
    /// A node process exited.
    NodeExit {
        /// `peer`, `ps` or `worker`.
        node: String,
        /// Its index.
        index: usize,
        /// How.
        status: Exit,
    },
    /// A peer process exited (P2P runs also record this, for readers of peer events).
    PeerExit {
        /// Its index.
        peer: usize,
        /// How.
        status: Exit,
    },
    /// A node was started again.
    NodeRestart {
        /// `peer`, `ps` or `worker`.
        node: String,
        /// Its index.
        index: usize,
    },
    /// The launcher stopped a node that kept running after the result was in.
    NodeStopped {
        /// `peer`, `ps` or `worker`.
        node: String,
        /// Its index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The run failed as a whole (bad input, a PS that keeps dying).
    RunFailed {
        /// Why.
        error: String,
    },
    /// A restart the launcher measured.
    Recovery(Recovery),
    /// The cluster is done.
    Finish {
        /// Rounds done (highest among the nodes).
        rounds: u64,
        /// Test accuracy of the run's model.
        test_accuracy: f32,
        /// Whether every finished replica has the same parameters.
        replicas_agree: bool,
    },
}

impl ClusterEvent {
    /// The event as a line for the user: its name, then its fields as JSON.
    pub fn line(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        let name = v.as_object_mut().and_then(|o| o.remove("event")).unwrap_or_default();
        format!("{}: {v}", name.as_str().unwrap_or_default())
    }
}

/// A fault as the launcher records it: its kind, targets and the round it happened at, and
/// what its kind adds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FaultRecord {
    /// `kill`, `stop`, `partition`, … (`function_faults` for the function runtime's rates).
    pub fault: String,
    /// The nodes it hits, as the launcher names them (`peer:1`, `ps`, `functions`).
    pub targets: Vec<String>,
    /// The cluster's round when it happened (a skipped fault has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// Kill: the pids signalled (`None`: the node was down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<Vec<Option<u32>>>,
    /// Kill: the targets are started again after this long, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_after_s: Option<f64>,
    /// Straggle: frozen this long of every period, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_ms: Option<u64>,
    /// Straggle: the period, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_ms: Option<u64>,
    /// Byzantine: the attack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<String>,
    /// Delay: added to every chunk, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Bandwidth: each direction's cap, megabits per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    /// How long it lasts, s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Function faults: the rates every invocation meets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<FaultConfig>,
    /// Skipped: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A `churn` stream's fault: the draw's number in its stream, from 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_under_the_names_readers_look_for() {
        let e = ClusterEvent::NodeExit { node: "ps".into(), index: 3, status: Exit::Signal(9) };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "event": "node_exit", "node": "ps", "index": 3, "status": "killed by signal 9" })
        );
        let f = FaultRecord {
            fault: "kill".into(),
            targets: vec!["peer:1".into()],
            round: Some(4),
            ..FaultRecord::default()
        };
        let v = serde_json::to_value(ClusterEvent::FaultInjected(f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "event": "fault_injected", "fault": "kill", "targets": ["peer:1"], "round": 4 })
        );
        assert_eq!(ClusterEvent::RunFailed { error: "x".into() }.line(), r#"run_failed: {"error":"x"}"#);
    }
}
