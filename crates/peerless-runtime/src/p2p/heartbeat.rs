//! Heartbeats between peers: when to send one, and which connected peer has been silent past
//! the detection bound (a SIGSTOPped or cut-off process whose connection is still up). No I/O:
//! the peer tells it what it heard and when, and sends what it asks for.

use std::collections::{BTreeMap, BTreeSet};

use peerless_core::protocol::PeerIdx;

/// Heartbeats of one peer, on the node's clock (ms).
#[derive(Debug)]
pub(super) struct Heartbeats {
    /// Send one every this many ms.
    period_ms: u64,
    /// Report a peer silent this long (so detection takes at most `period_ms` more).
    silence_ms: u64,
    /// Connected peers and when each was last heard from.
    heard: BTreeMap<PeerIdx, u64>,
    /// Peers reported silent and not heard from since.
    reported: BTreeSet<PeerIdx>,
    /// When the last beat was due.
    last_beat: u64,
}

/// What a beat asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Beat {
    /// Send a heartbeat to these.
    pub(super) to: Vec<PeerIdx>,
    /// Newly silent peers and for how long, ms.
    pub(super) silent: Vec<(PeerIdx, u64)>,
    /// This process itself stood still about this long, ms (the beat came that late).
    pub(super) paused_ms: Option<u64>,
}

impl Heartbeats {
    /// Heartbeats that detect a silent peer within `bound_ms` (at least 5 ms).
    pub(super) fn new(bound_ms: u64, now: u64) -> Heartbeats {
        let period_ms = (bound_ms / 5).max(1);
        Heartbeats {
            period_ms,
            silence_ms: bound_ms.saturating_sub(period_ms).max(1),
            heard: BTreeMap::new(),
            reported: BTreeSet::new(),
            last_beat: now,
        }
    }

    /// `p`'s last connection closed.
    pub(super) fn gone(&mut self, p: PeerIdx) {
        self.heard.remove(&p);
        self.reported.remove(&p);
    }

    /// Something arrived from `p`, or a connection to it came up.
    pub(super) fn heard(&mut self, p: PeerIdx, now: u64) {
        self.heard.insert(p, now);
        self.reported.remove(&p);
    }

    /// When the next beat is due.
    pub(super) fn next_timer(&self) -> u64 {
        self.last_beat + self.period_ms
    }

    /// The beat due at `now`, if one is.
    pub(super) fn beat(&mut self, now: u64) -> Option<Beat> {
        if now < self.next_timer() {
            return None;
        }
        let late = now - self.next_timer();
        self.last_beat = now;
        // A beat one period late is scheduling noise on a busy machine; two is a pause.
        let paused_ms = (late > 2 * self.period_ms).then_some(late);
        if paused_ms.is_some() {
            // This process itself was paused (SIGSTOP, a stalled machine): everyone looks
            // silent for the same reason. Start counting afresh rather than blame the others.
            for t in self.heard.values_mut() {
                *t = now;
            }
        }
        let silent = self
            .heard
            .iter()
            .filter(|(p, t)| now - **t >= self.silence_ms && !self.reported.contains(p))
            .map(|(&p, &t)| (p, now - t))
            .collect::<Vec<_>>();
        self.reported.extend(silent.iter().map(|(p, _)| *p));
        Some(Beat { to: self.heard.keys().copied().collect(), silent, paused_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_reported_once_within_the_bound() {
        let mut h = Heartbeats::new(250, 0);
        h.heard(1, 0);
        h.heard(2, 0);
        let mut reported_at = None;
        let mut t = 0;
        while t <= 600 {
            h.heard(1, t); // peer 1 keeps talking; peer 2 froze at 0
            if let Some(b) = h.beat(t) {
                assert_eq!(b.to, vec![1, 2]);
                for (p, silent) in b.silent {
                    assert_eq!(p, 2);
                    assert!(reported_at.is_none(), "reported twice");
                    assert!((200..=250).contains(&silent), "silent {silent} ms");
                    reported_at = Some(t);
                }
            }
            t += 10;
        }
        assert!(reported_at.is_some_and(|r| r <= 250), "{reported_at:?}");
        // Heard again: it can be reported again later.
        h.heard(2, 610);
        let again = (610..=900).step_by(50).filter_map(|t| h.beat(t)).flat_map(|b| b.silent);
        assert_eq!(again.filter(|(p, _)| *p == 2).count(), 1);
    }

    #[test]
    fn a_pause_of_this_process_blames_nobody() {
        let mut h = Heartbeats::new(250, 0);
        h.heard(1, 0);
        assert_eq!(h.beat(50).unwrap().silent, vec![]);
        // Nothing ran for 5 s (this process was stopped).
        let b = h.beat(5_050).unwrap();
        assert_eq!((b.silent, b.paused_ms), (vec![], Some(4_950)));
        h.gone(1);
        assert_eq!(h.beat(5_100).unwrap(), Beat { to: vec![], silent: vec![], paused_ms: None });
    }
}
