//! What a node records in its `events.jsonl`, as one type: each line is a [`NodeEvent`] (or a
//! protocol machine's [`peerless_core::protocol::Event`]), stamped with the wall clock and the
//! node by [`super::Files`]. Tests and the report read these lines back by their `event` name.

use peerless_core::protocol::PeerIdx;
use serde::{Deserialize, Serialize};

/// One event of a node's own (the protocol machines' are `peerless_core::protocol::Event`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEvent {
    /// The node is set up and its loop starts.
    Start {
        /// `ps` or `worker` (a peer writes none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// Its libp2p peer id.
        peer_id: String,
        /// Rounds (PS: versions) in the run; a worker writes none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_rounds: Option<u64>,
        /// A peer: rounds per epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rounds_per_epoch: Option<u64>,
        /// A peer: how it starts (fresh, resumed, joining).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start: Option<String>,
        /// The PS: the version it starts at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        round: Option<u64>,
    },
    /// The PS resumed from its checkpoint at `round`.
    Resume {
        /// Version.
        round: u64,
    },
    /// Listening on `address`.
    Listening {
        /// Multiaddr.
        address: String,
    },
    /// The first connection to node `to` is up.
    Connected {
        /// Node index.
        to: PeerIdx,
        /// Its peer id.
        peer_id: String,
    },
    /// This node's tensor lane to node `to` is up: its gradients go there on plain TCP
    /// (`p2p.tensor_transport = "tcp"`).
    TensorLane {
        /// Node index.
        to: PeerIdx,
        /// The lane's address.
        addr: String,
    },
    /// The last connection to node `to` closed.
    Disconnected {
        /// Node index.
        to: PeerIdx,
    },
    /// A node refused this node's admission certificate.
    NotAdmitted {
        /// Its peer id.
        peer_id: String,
        /// What it answered.
        reason: String,
    },
    /// A peer was refused: a connection from a peer id off the allow-list, a certificate that
    /// does not admit its presenter, or a request of a peer without an accepted certificate.
    Refused {
        /// Its peer id, when known.
        peer_id: String,
        /// Its address.
        addr: String,
        /// Why: `not on the allow-list`, or a certificate's refusal (`no certificate`, `wrong
        /// run`, `wrong role`, `expired`, `signature`, `peer id mismatch`, `malformed`, `index`,
        /// `index in use`).
        reason: String,
    },
    /// What node `from` sent was refused (malformed, or a state whose digest does not match).
    Rejected {
        /// Node index.
        from: PeerIdx,
        /// Why.
        error: String,
    },
    /// The test-set evaluation of the parameters after `round`.
    Eval {
        /// Round.
        round: u64,
        /// Test loss.
        test_loss: f32,
        /// Test accuracy, 0..1.
        test_accuracy: f32,
    },
    /// Checkpoint of `round` written.
    Checkpoint {
        /// Round (PS: version).
        round: u64,
    },
    /// A peer served its state at `round` to peer `to`.
    ServedState {
        /// Peer.
        to: PeerIdx,
        /// Round.
        round: u64,
    },
    /// A peer took over the state another served.
    Adopted {
        /// Round.
        round: u64,
        /// Digest of the parameters.
        digest: String,
    },
    /// This Byzantine node attacks from `round` on.
    Attacking {
        /// The attack's name.
        attack: String,
        /// Round.
        round: u64,
    },
    /// A worker got model version `round`, `wait_ms` after asking.
    Fetched {
        /// Version.
        round: u64,
        /// ms.
        wait_ms: f64,
    },
    /// A worker's fetch failed: the PS's answer was not a version, or the request failed.
    FetchFailed {
        /// The answer (cut to 200 characters).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<String>,
        /// The request's error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Every gradient of `round` was non-finite: training stops.
    Diverged {
        /// Round.
        round: u64,
        /// The functions' error.
        reason: String,
    },
    /// Stopped at `halt_at_round` as if killed (tests).
    Halt {
        /// Round.
        round: u64,
    },
    /// Stopped by SIGINT or SIGTERM.
    Stop {
        /// Round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// Done: the summary is written.
    Finish {
        /// Rounds done.
        round: u64,
        /// Test accuracy of the final model.
        test_accuracy: f32,
        /// Digest of the final parameters (empty for a worker).
        digest: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_under_the_names_readers_look_for() {
        let v = serde_json::to_value(NodeEvent::ServedState { to: 1, round: 7 }).unwrap();
        assert_eq!(v, serde_json::json!({ "event": "served_state", "to": 1, "round": 7 }));
        let v = serde_json::to_value(NodeEvent::FetchFailed { answer: None, error: Some("gone".into()) })
            .unwrap();
        assert_eq!(v, serde_json::json!({ "event": "fetch_failed", "error": "gone" }));
        let back: NodeEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, NodeEvent::FetchFailed { answer: None, error: Some("gone".into()) });
    }
}
