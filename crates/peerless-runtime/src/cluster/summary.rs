//! What a cluster run reports: the cluster's `summary.json` ([`ClusterSummary`]), how each node
//! ended ([`NodeOutcome`], its [`Exit`]), and the restarts the launcher measured
//! ([`Recovery`]). The launcher writes it; the report reads it back through the same types.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use serde::{Deserialize, Serialize};

use crate::node::NodeSummary;

/// The cluster's summary (`summary.json` of a P2P or PS run), written by the launcher and
/// read back by the report. Fields added since the first release read as their default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSummary {
    /// Run directory name.
    pub run: String,
    /// `p2p` or `ps`.
    pub arch: String,
    /// `functions` or `local`.
    pub compute: String,
    /// Model id.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// Seed.
    pub seed: u64,
    /// Peers (P2P) or workers (PS) started.
    pub peers: u32,
    /// Whether every peer that finished ran every round.
    pub completed: bool,
    /// Training stopped early because the honest nodes' model diverged (an outcome, e.g. of an
    /// attack the rule does not stop; `test_accuracy` is then that model's).
    pub diverged: bool,
    /// Rounds done (highest among peers).
    pub rounds: u64,
    /// Test accuracy of the lowest-indexed finished peer's model.
    pub test_accuracy: f32,
    /// Its test loss (JSON `null` when not finite).
    #[serde(deserialize_with = "crate::node::null_as_nan")]
    pub test_loss: f32,
    /// Final model digest of every peer that finished, by index.
    pub param_digests: Vec<(u32, String)>,
    /// Whether all those digests are equal.
    pub replicas_agree: bool,
    /// Launcher wall time, s.
    pub wall_time_s: f64,
    /// Samples computed on by all peers, per second of wall time.
    pub samples_per_s: f64,
    /// Function invocation attempts.
    pub invocations: u64,
    /// Cold starts.
    pub cold_starts: u64,
    /// Function charges, USD.
    pub function_cost_usd: f64,
    /// Peer node time, USD.
    pub node_cost_usd: f64,
    /// Total, USD.
    pub total_cost_usd: f64,
    /// Bytes sent between peers.
    pub bytes_exchanged: u64,
    /// Per-peer summaries.
    pub per_peer: Vec<NodeSummary>,
    /// Nodes the launcher restarted (the PS), with downtime and rounds lost.
    pub recoveries: Vec<Recovery>,
    /// How each node ended (exit status, whether it completed, why the launcher stopped it).
    pub nodes: Vec<NodeOutcome>,
    /// Why the run failed as a whole (a node's bad input, a PS that kept dying).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A node that died and was restarted by the launcher.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Recovery {
    /// `ps`.
    pub node: String,
    /// Node index in the launcher.
    pub index: usize,
    /// When it died, s after the launch.
    pub died_at_s: f64,
    /// The last round it had reported done.
    pub died_at_round: u64,
    /// The round it resumed from (its checkpoint).
    pub resumed_from_round: Option<u64>,
    /// Rounds done again: `died_at_round - resumed_from_round`.
    pub rounds_lost: Option<u64>,
    /// From its death to its first round done after the restart, s.
    pub downtime_s: Option<f64>,
}

/// How one node of the run ended (`summary.json`'s `nodes`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeOutcome {
    /// `peer`, `ps` or `worker`.
    pub node: String,
    /// Its index.
    pub index: usize,
    /// How its last process ended: `exit code N`, `killed by signal N` (or `never started`).
    pub exit: Exit,
    /// Whether it exited cleanly having done every round (filled in from its summary).
    pub completed: bool,
    /// Why the launcher stopped it, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The error its last process reported, if it reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a node's last process ended, as a value (`summary.json` spells it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Exit {
    /// It was never started.
    #[default]
    NeverStarted,
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// The exit of `status`.
    pub fn of(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            // Neither a code nor a signal: not a state a reaped child is in.
            (None, None) => Exit::Code(-1),
        }
    }

    /// Whether it exited cleanly.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::NeverStarted => f.write_str("never started"),
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

impl From<Exit> for String {
    fn from(e: Exit) -> String {
        e.to_string()
    }
}

impl TryFrom<String> for Exit {
    type Error = String;

    fn try_from(s: String) -> Result<Exit, String> {
        let number = |t: &str| t.parse::<i32>().map_err(|e| format!("{s:?}: {e}"));
        if s == "never started" {
            Ok(Exit::NeverStarted)
        } else if let Some(c) = s.strip_prefix("exit code ") {
            Ok(Exit::Code(number(c)?))
        } else if let Some(sig) = s.strip_prefix("killed by signal ") {
            Ok(Exit::Signal(number(sig)?))
        } else {
            Err(format!("{s:?} is not an exit (exit code N, killed by signal N, never started)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_read_back_as_they_were_written() {
        for e in [Exit::NeverStarted, Exit::Code(0), Exit::Code(3), Exit::Signal(9)] {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Exit>(&json).unwrap(), e, "{json}");
        }
        assert_eq!(serde_json::to_string(&Exit::Signal(9)).unwrap(), "\"killed by signal 9\"");
        assert!(serde_json::from_str::<Exit>("\"crashed\"").is_err());
    }

    #[test]
    fn a_summary_of_an_older_run_reads_with_defaults() {
        let s: ClusterSummary =
            serde_json::from_str(r#"{"arch": "p2p", "peers": 4, "completed": true}"#).unwrap();
        assert!(s.completed && s.nodes.is_empty() && s.error.is_none());
    }
}
