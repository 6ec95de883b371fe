//! Heartbeats between peers: when to send one, and which connected peer has been silent past
//! the detection bound (a SIGSTOPped or cut-off process whose connection is still up). No I/O:
//! the peer tells it what it heard and when, and what it said, and sends what it asks for.
//!
//! A peer hears from this one at least once a period: a heartbeat goes to it only when this
//! peer has said nothing else to it for more than half a period (the beats are checked every
//! half period). While training every request is acknowledged at once, so each round's
//! acknowledgements already say it, and at every-step speed (a round every few ms) hardly a
//! heartbeat is sent: each was a libp2p request, a new substream and its answer, about 3-6 %
//! of a 4-peer serverless round on 2 cores.
//!
//! The bound stretches with the link: on a slow or saturated link a heartbeat waits behind the
//! gradients queued before it, so a live peer can be heard from only every few hundred ms. Each
//! peer's bound is the configured one or [`STRETCH`] times the longest recent gap between
//! hearing from it (that gap decays by half every [`GAP_HALF_LIFE_MS`]), whichever is longer.
//! On a LAN the gaps are a heartbeat period, and the configured bound holds. A gap that was
//! reported as silence is learned only when it is short (at most [`LEARN_LIMIT`] times the
//! configured bound): a peer heard from again that soon was on a slow link, while a freeze or
//! a partition lasts longer, and must not stretch the bound for the next one.

use std::collections::{BTreeMap, BTreeSet};

use peerless_core::protocol::PeerIdx;

/// A peer is silent once it has been for this many times its longest recent gap.
const STRETCH: u64 = 3;
/// The longest recent gap halves every this many ms without a longer one.
const GAP_HALF_LIFE_MS: f64 = 10_000.0;
/// A gap reported as silence is learned when at most this many times the configured bound.
const LEARN_LIMIT: u64 = 4;

/// When a connected peer was last heard from, and the longest gap between hearings lately.
#[derive(Debug, Clone, Copy)]
struct Heard {
    at: u64,
    /// Decaying maximum of the gaps between hearings, ms.
    gap_ms: f64,
}

/// Heartbeats of one peer, on the node's clock (ms).
#[derive(Debug)]
pub(super) struct Heartbeats {
    /// Each peer hears from this one at least every this many ms.
    period_ms: u64,
    /// Beats are checked every this many ms (half a period).
    tick_ms: u64,
    /// Report a peer silent this long (so detection takes at most `period_ms` more).
    silence_ms: u64,
    /// Connected peers: when each was last heard from, and its recent gaps.
    heard: BTreeMap<PeerIdx, Heard>,
    /// Peers reported silent and not heard from since.
    reported: BTreeSet<PeerIdx>,
    /// When this peer last said something to each connected peer that it hears at once (an
    /// acknowledgement, a heartbeat).
    spoke: BTreeMap<PeerIdx, u64>,
    /// When the last beat was checked.
    last_beat: u64,
}

/// What a beat asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Beat {
    /// Send a heartbeat to these (nothing else went to them for more than half a period).
    pub(super) to: Vec<PeerIdx>,
    /// Newly silent peers and for how long, ms.
    pub(super) silent: Vec<(PeerIdx, u64)>,
    /// This process itself stood still about this long, ms (the beat came that late).
    pub(super) paused_ms: Option<u64>,
}

impl Heartbeats {
    /// Heartbeats that detect a silent peer within `bound_ms` (at least 5 ms).
    pub(super) fn new(bound_ms: u64, now: u64) -> Heartbeats {
        let period_ms = (bound_ms / 5).max(2);
        Heartbeats {
            period_ms,
            tick_ms: period_ms / 2,
            silence_ms: bound_ms.saturating_sub(period_ms).max(1),
            heard: BTreeMap::new(),
            reported: BTreeSet::new(),
            spoke: BTreeMap::new(),
            last_beat: now,
        }
    }

    /// `p`'s last connection closed.
    pub(super) fn gone(&mut self, p: PeerIdx) {
        self.heard.remove(&p);
        self.reported.remove(&p);
        self.spoke.remove(&p);
    }

    /// This peer said something to `p` that `p` hears at once (it answered `p`'s request).
    pub(super) fn spoke(&mut self, p: PeerIdx, now: u64) {
        let at = self.spoke.entry(p).or_insert(now);
        *at = (*at).max(now);
    }

    /// Something arrived from `p`, or a connection to it came up.
    pub(super) fn heard(&mut self, p: PeerIdx, now: u64) {
        let period = self.period_ms as f64;
        let h = self.heard.entry(p).or_insert(Heard { at: now, gap_ms: period });
        let gap = now.saturating_sub(h.at) as f64;
        let decayed = h.gap_ms * 0.5f64.powf(gap / GAP_HALF_LIFE_MS);
        let reported = self.reported.remove(&p);
        h.gap_ms = if reported && gap > (LEARN_LIMIT * self.silence_ms) as f64 {
            decayed.max(period)
        } else {
            decayed.max(gap).max(period)
        };
        h.at = now;
    }

    /// How long `h`'s peer may be silent before it is reported, ms.
    fn bound(&self, h: &Heard) -> u64 {
        self.silence_ms.max(STRETCH * h.gap_ms as u64)
    }

    /// When the next beat is due.
    pub(super) fn next_timer(&self) -> u64 {
        self.last_beat + self.tick_ms
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
            for h in self.heard.values_mut() {
                h.at = now;
            }
        }
        let silent = self
            .heard
            .iter()
            .filter(|(p, h)| now - h.at >= self.bound(h) && !self.reported.contains(p))
            .map(|(&p, h)| (p, now - h.at))
            .collect::<Vec<_>>();
        self.reported.extend(silent.iter().map(|(p, _)| *p));
        // Strictly more than half a period: then the next check, half a period on, is at
        // most a period after the last word, and a quiet peer gets a beat every period.
        let quiet = |p: &PeerIdx| self.spoke.get(p).is_none_or(|&at| now.saturating_sub(at) > self.tick_ms);
        let to: Vec<PeerIdx> = self.heard.keys().copied().filter(quiet).collect();
        for &p in &to {
            self.spoke.insert(p, now);
        }
        Some(Beat { to, silent, paused_ms })
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
        // Heard again after a long silence: it is reported again within the bound.
        h.heard(2, 2_000);
        let again = (2_000..=2_300).step_by(50).filter_map(|t| h.beat(t)).flat_map(|b| b.silent);
        assert_eq!(again.filter(|(p, _)| *p == 2).count(), 1);
    }

    #[test]
    fn on_a_slow_link_the_bound_stretches_to_the_gaps_seen_and_a_frozen_peer_is_still_found() {
        let mut h = Heartbeats::new(250, 0);
        h.heard(1, 0);
        // Peer 1 is heard from every 400 ms (its beats wait behind gradients on a capped link);
        // the first such gap is past the bound, the later ones are not.
        let mut reports = Vec::new();
        for t in (10..=6_000).step_by(10) {
            if t % 400 == 0 {
                h.heard(1, t);
            }
            reports.extend(h.beat(t).into_iter().flat_map(|b| b.silent).map(|(_, s)| (t, s)));
        }
        assert!(reports.len() <= 1 && reports.iter().all(|&(t, _)| t < 400), "{reports:?}");
        // It freezes at 6,000: found within 3 × 400 ms, not never.
        let found = (6_010..=9_000).step_by(10).find(|&t| h.beat(t).is_some_and(|b| !b.silent.is_empty()));
        assert!(found.is_some_and(|t| t <= 6_000 + 3 * 400 + 50), "{found:?}");
        // Back on a fast link, the bound shrinks back towards the configured one.
        h.heard(1, 9_000);
        for t in (9_010..=60_000).step_by(10) {
            if t % 50 == 0 {
                h.heard(1, t);
            }
            h.beat(t);
        }
        let fresh = (60_010..=61_000).step_by(10).find(|&t| h.beat(t).is_some_and(|b| !b.silent.is_empty()));
        assert!(fresh.is_some_and(|t| t <= 60_000 + 300), "{fresh:?}");
        // A long freeze, once over, does not stretch the bound for the next one.
        h.heard(1, 62_000);
        for t in (62_010..=62_500).step_by(10) {
            h.heard(1, t);
            h.beat(t);
        }
        let next = (62_510..=64_000).step_by(10).find(|&t| h.beat(t).is_some_and(|b| !b.silent.is_empty()));
        assert!(next.is_some_and(|t| t <= 62_500 + 300), "{next:?}");
    }

    #[test]
    fn a_peer_answered_gets_no_heartbeat_and_every_peer_hears_from_this_one_every_period() {
        let mut h = Heartbeats::new(250, 0); // a period of 50 ms, checked every 25 ms
        let mut last_word = BTreeMap::from([(1, 0u64), (2, 0u64)]);
        let mut longest_gap = BTreeMap::<PeerIdx, u64>::new();
        let mut beats = BTreeMap::<(PeerIdx, bool), u32>::new();
        let mut word = |p: PeerIdx, t: u64| {
            let gap = t - last_word.insert(p, t).expect("a peer of the test");
            let g = longest_gap.entry(p).or_default();
            *g = (*g).max(gap);
        };
        for t in 0..=2_000u64 {
            h.heard(1, t);
            h.heard(2, t);
            // Peer 1's requests are answered every round (12 ms) until 1,000 ms; peer 2 sends
            // nothing to answer.
            if t % 12 == 0 && t < 1_000 {
                h.spoke(1, t);
                word(1, t);
            }
            for p in h.beat(t).map(|b| b.to).unwrap_or_default() {
                *beats.entry((p, t >= 1_000)).or_default() += 1;
                word(p, t);
            }
        }
        let n = |p, late| beats.get(&(p, late)).copied().unwrap_or(0);
        assert_eq!(n(1, false), 0, "peer 1 was answered every round");
        assert!((19..=21).contains(&n(1, true)), "{} beats once the answers stopped", n(1, true));
        assert!((39..=41).contains(&(n(2, false) + n(2, true))), "peer 2: {beats:?}");
        assert!(longest_gap.values().all(|&g| g <= 50), "{longest_gap:?}");
    }

    #[test]
    fn a_pause_of_this_process_blames_nobody() {
        let mut h = Heartbeats::new(250, 0);
        h.heard(1, 0);
        assert_eq!(h.beat(50).unwrap().silent, vec![]);
        // Nothing ran for 5 s (this process was stopped).
        let b = h.beat(5_050).unwrap();
        assert_eq!((b.silent, b.paused_ms), (vec![], Some(4_975)));
        h.gone(1);
        assert_eq!(h.beat(5_100).unwrap(), Beat { to: vec![], silent: vec![], paused_ms: None });
    }
}
