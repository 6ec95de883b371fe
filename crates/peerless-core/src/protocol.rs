//! The vocabulary every protocol of peerless shares (the P2P round, the PS, the worker): a
//! node's index, the adaptive round deadline, and the events each machine records.

use serde::{Deserialize, Serialize};

/// A node's index in its run (its rank; 0-based): a peer's, a worker's, the PS's. Aggregation
/// order is by index.
pub type PeerIdx = u32;

/// Bounds of the adaptive round deadline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeadlinePolicy {
    /// Never wait less than this, ms.
    pub floor_ms: u64,
    /// Never wait more than this, ms.
    pub ceiling_ms: u64,
    /// Multiple of the smoothed observed wait.
    pub factor: f64,
}

impl DeadlinePolicy {
    /// The deadline given the smoothed observed wait (none observed yet: the floor), ms.
    pub fn deadline_ms(&self, wait_ewma_ms: Option<f64>) -> u64 {
        let est = wait_ewma_ms.map_or(0.0, |w| w * self.factor);
        (est as u64).clamp(self.floor_ms, self.ceiling_ms.max(self.floor_ms))
    }

    /// Folds one observed wait into the smoothed wait.
    pub fn observe(wait_ewma_ms: &mut Option<f64>, wait_ms: u64) {
        let w = wait_ms as f64;
        *wait_ewma_ms = Some(wait_ewma_ms.map_or(w, |e| 0.8 * e + 0.2 * w));
    }
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        DeadlinePolicy { floor_ms: 1_000, ceiling_ms: 10_000, factor: 4.0 }
    }
}

/// A timestamped protocol event (for `events.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Driver time, ms.
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Protocol events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// Round `round` started (only logged for the first round and after a (re)join).
    Entered {
        /// Round.
        round: u64,
        /// Members expected.
        view: Vec<PeerIdx>,
    },
    /// A peer announced it takes part from `round`.
    PeerJoined {
        /// Peer.
        peer: PeerIdx,
        /// Round.
        round: u64,
    },
    /// A peer that announced a join was expected in `round`, but its gradient did not come
    /// within its grace, `waited_ms` past the others': the round closed without it (it is not
    /// suspected).
    JoinerLate {
        /// Peer.
        peer: PeerIdx,
        /// Round.
        round: u64,
        /// How long past the other expected peers it was waited for, ms.
        waited_ms: u64,
    },
    /// A peer's connection closed; it left the view at once.
    PeerLeft {
        /// Peer.
        peer: PeerIdx,
        /// Round in progress.
        round: u64,
    },
    /// A peer was silent at the round deadline; it is not waited for until it speaks again.
    PeerSuspected {
        /// Peer.
        peer: PeerIdx,
        /// Round.
        round: u64,
        /// How long this peer waited after its own gradient was ready, ms.
        waited_ms: u64,
    },
    /// A connected peer stopped answering heartbeats; it is not waited for until it speaks
    /// again.
    Unresponsive {
        /// Peer.
        peer: PeerIdx,
        /// Round in progress.
        round: u64,
        /// How long it had been silent when detected, ms.
        silent_ms: u64,
    },
    /// This process stood still (SIGSTOP, a stalled machine): its waits were extended.
    Paused {
        /// Round in progress.
        round: u64,
        /// How long, ms.
        ms: u64,
    },
    /// A gradient this peer received was left out of the round because another peer said it
    /// had not received it (its sender died mid-broadcast, or straggled past some deadlines).
    Unshared {
        /// Sender of the gradient.
        peer: PeerIdx,
        /// Round.
        round: u64,
    },
    /// A gradient for a round already closed arrived and was dropped.
    LateGradient {
        /// Sender.
        peer: PeerIdx,
        /// Its round.
        round: u64,
        /// This peer's round.
        current: u64,
    },
    /// Asynchronous PS: a push computed on a version older than the staleness bound allows
    /// was dropped.
    StaleGradient {
        /// Sender.
        peer: PeerIdx,
        /// The version it was computed on.
        round: u64,
        /// The PS's version.
        current: u64,
        /// The bound.
        max_staleness: u64,
    },
    /// A gradient computed on a different model (digest) was left out of the aggregate.
    Excluded {
        /// Sender.
        peer: PeerIdx,
        /// Round.
        round: u64,
    },
    /// This peer's model is in the minority (or behind): it fetches the majority's state.
    Reconcile {
        /// Round.
        round: u64,
        /// Peer it fetches from.
        from: PeerIdx,
        /// Why: `"minority digest"` or `"behind"`.
        reason: String,
    },
    /// This peer adopted a state and enters `round`.
    Synced {
        /// Round entered.
        round: u64,
        /// Where the state came from (none: own checkpoint).
        from: Option<PeerIdx>,
    },
    /// The round's agreed contributors were no quorum of the last applied round's: this side
    /// of a partition (or what is left after many peers failed at once) does not apply it.
    NoQuorum {
        /// Round.
        round: u64,
        /// The peers whose gradients this side agreed on.
        contributors: Vec<PeerIdx>,
        /// The contributors of the last round applied.
        base: Vec<PeerIdx>,
    },
    /// A round closed.
    RoundClosed {
        /// Round.
        round: u64,
        /// Contributors.
        contributors: usize,
        /// Whether it closed at the deadline.
        timed_out: bool,
        /// The deadline in force, ms.
        deadline_ms: u64,
    },
}
