//! The parameter server's round protocol as an I/O-free state machine.
//!
//! # Synchronous mode
//! The PS publishes model version `r`; workers fetch it, compute, and push their gradient for
//! `r`. The round closes when every connected worker has pushed, or at the adaptive deadline
//! counted from the first push (a worker that is connected but silent, or whose push the codec
//! refused, is suspected and not waited for again until it pushes for the current version); the PS then aggregates the pushes in worker order,
//! updates and publishes `r + 1`. A worker whose connection drops leaves the round set at once.
//! With no worker connected the PS waits: that stall is the baseline's nature, measured, not
//! hidden. A push for another round than the current one is dropped (stale after a PS restart,
//! or a duplicate), so no gradient is applied twice.
//!
//! # Asynchronous mode
//! Every push is applied on arrival, alone, as the next version (Hogwild-style SGD on one
//! server, as LambdaML's and SMLT's asynchronous modes). A gradient computed on version `v`
//! that arrives at version `u` has staleness `u − v`; with `n` workers running at the same
//! speed it is about `n − 1`. Pushes staler than the bound are dropped (a `stale_gradient`
//! event), as is a second push of a worker for a version it already contributed to, or a push
//! for a version the PS has not published (it restarted from an older checkpoint). No worker
//! is ever waited for, so there is no deadline; versions count single updates.

use std::collections::BTreeMap;

use crate::protocol::{DeadlinePolicy, Event, EventKind, PeerIdx};
use crate::wire::GradientMsg;

/// Static configuration of the PS machine.
#[derive(Debug, Clone, PartialEq)]
pub struct PsConfig {
    /// Workers of the run.
    pub workers: Vec<PeerIdx>,
    /// Train until this round is done.
    pub total_rounds: u64,
    /// Checkpoint every this many rounds (0: only at the end).
    pub checkpoint_every: u64,
    /// Round deadline.
    pub deadline: DeadlinePolicy,
    /// Wait this long for all workers before the first round, ms.
    pub start_timeout_ms: u64,
    /// Synchronous rounds or asynchronous updates.
    pub mode: PsMode,
}

/// How the PS applies pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsMode {
    /// A round aggregates one push per worker (or whoever pushed by the deadline).
    Sync,
    /// Each push is applied on arrival if it is at most `max_staleness` versions old.
    Async {
        /// Largest accepted `current version − version the gradient was computed on`.
        max_staleness: u64,
    },
}

/// Inputs of the PS machine.
#[derive(Debug, Clone, PartialEq)]
pub enum PsInput {
    /// A worker connected.
    Connected(PeerIdx),
    /// A worker's connection closed.
    Disconnected(PeerIdx),
    /// A worker pushed a gradient.
    Gradient(PeerIdx, GradientMsg),
    /// A worker pushed a message the codec refused: it is not waited for again until it
    /// pushes a valid gradient of the current version.
    Rejected(PeerIdx),
    /// Time passed.
    Tick,
}

/// Actions of the PS machine.
#[derive(Debug, Clone, PartialEq)]
pub enum PsAction {
    /// Model version `round` is available to workers.
    Publish {
        /// Version.
        round: u64,
    },
    /// Aggregate these pushes (in worker order) and update: the model becomes `round + 1`.
    Apply {
        /// Round.
        round: u64,
        /// Pushes, ordered by worker.
        inputs: Vec<(PeerIdx, Vec<f32>)>,
        /// Versions between the one the gradients were computed on and `round` (always 0 in
        /// synchronous mode).
        staleness: u64,
    },
    /// Checkpoint model version `round`.
    Checkpoint {
        /// Version.
        round: u64,
    },
    /// Record an event.
    Event(Event),
    /// All rounds are done.
    Finished {
        /// Version.
        round: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Starting { since: u64 },
    Collecting { first: Option<u64> },
    Done,
}

/// The PS machine.
#[derive(Debug)]
pub struct Ps {
    cfg: PsConfig,
    round: u64,
    phase: Phase,
    connected: BTreeMap<PeerIdx, bool>,
    suspected: BTreeMap<PeerIdx, bool>,
    received: BTreeMap<PeerIdx, GradientMsg>,
    /// Asynchronous mode: the newest version each worker's applied push was computed on.
    applied_from: BTreeMap<PeerIdx, u64>,
    wait_ewma_ms: Option<f64>,
    out: Vec<PsAction>,
}

impl Ps {
    /// A PS holding model version `round` (0, or its checkpoint's) at time `now_ms`.
    pub fn new(cfg: PsConfig, round: u64, now_ms: u64) -> Ps {
        Ps {
            cfg,
            round,
            phase: Phase::Starting { since: now_ms },
            connected: BTreeMap::new(),
            suspected: BTreeMap::new(),
            received: BTreeMap::new(),
            applied_from: BTreeMap::new(),
            wait_ewma_ms: None,
            out: Vec::new(),
        }
    }

    /// Current model version.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Whether all rounds are done.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The deadline in force, ms.
    pub fn deadline_ms(&self) -> u64 {
        self.cfg.deadline.deadline_ms(self.wait_ewma_ms)
    }

    /// Workers expected in the current round.
    pub fn expected(&self) -> Vec<PeerIdx> {
        self.connected
            .iter()
            .filter(|(w, c)| **c && !self.suspected.get(w).copied().unwrap_or(false))
            .map(|(&w, _)| w)
            .collect()
    }

    /// When to call [`PsInput::Tick`] next, ms.
    pub fn next_timer(&self) -> Option<u64> {
        match self.phase {
            Phase::Starting { since } => Some(since + self.cfg.start_timeout_ms),
            Phase::Collecting { first: Some(f) } if self.cfg.mode == PsMode::Sync => {
                Some(f + self.deadline_ms())
            }
            _ => None,
        }
    }

    fn event(&mut self, now: u64, kind: EventKind) {
        self.out.push(PsAction::Event(Event { at_ms: now, kind }));
    }

    /// Feeds one input; returns the actions to carry out in order.
    pub fn handle(&mut self, now: u64, input: PsInput) -> Vec<PsAction> {
        match input {
            PsInput::Connected(w) => {
                self.connected.insert(w, true);
            }
            PsInput::Disconnected(w) => {
                if self.connected.insert(w, false) == Some(true) {
                    self.event(now, EventKind::PeerLeft { peer: w, round: self.round });
                }
                self.suspected.remove(&w);
            }
            PsInput::Gradient(w, g) => {
                self.connected.insert(w, true);
                // Only a push for the current version shows the worker keeps up; a stale one
                // (a replay, or a push the PS outlived) leaves it suspected.
                if g.round == self.round {
                    self.suspected.remove(&w);
                }
                if let PsMode::Async { max_staleness } = self.cfg.mode {
                    self.push_async(now, w, g, max_staleness);
                } else if g.round != self.round || self.phase == Phase::Done {
                    self.event(now, EventKind::LateGradient { peer: w, round: g.round, current: self.round });
                } else if let Phase::Collecting { first } = &mut self.phase {
                    first.get_or_insert(now);
                    self.received.entry(w).or_insert(g);
                }
            }
            PsInput::Rejected(w) => {
                if self.suspected.insert(w, true) != Some(true) {
                    self.event(now, EventKind::PeerSuspected { peer: w, round: self.round, waited_ms: 0 });
                }
            }
            PsInput::Tick => {}
        }
        self.advance(now);
        std::mem::take(&mut self.out)
    }

    /// Asynchronous mode: apply `g` now, or drop it with the reason.
    fn push_async(&mut self, now: u64, w: PeerIdx, g: GradientMsg, max_staleness: u64) {
        let current = self.round;
        let repeated = self.applied_from.get(&w).is_some_and(|&v| g.round <= v);
        if self.phase == Phase::Done || g.round > current || repeated {
            self.event(now, EventKind::LateGradient { peer: w, round: g.round, current });
            return;
        }
        if !matches!(self.phase, Phase::Collecting { .. }) {
            // Still starting: the version is not published, so nobody can have computed on it.
            self.event(now, EventKind::LateGradient { peer: w, round: g.round, current });
            return;
        }
        let staleness = current - g.round;
        if staleness > max_staleness {
            self.event(now, EventKind::StaleGradient { peer: w, round: g.round, current, max_staleness });
            return;
        }
        self.applied_from.insert(w, g.round);
        self.out.push(PsAction::Apply { round: current, inputs: vec![(w, g.grad)], staleness });
        self.next_version(now);
    }

    /// The model became `round + 1`: checkpoint when due, publish.
    fn next_version(&mut self, now: u64) {
        self.round += 1;
        let ck = self.cfg.checkpoint_every;
        if self.round >= self.cfg.total_rounds || (ck > 0 && self.round.is_multiple_of(ck)) {
            self.out.push(PsAction::Checkpoint { round: self.round });
        }
        self.publish(now);
    }

    fn publish(&mut self, now: u64) {
        if self.round >= self.cfg.total_rounds {
            self.phase = Phase::Done;
            self.out.push(PsAction::Publish { round: self.round });
            self.out.push(PsAction::Finished { round: self.round });
            return;
        }
        self.phase = Phase::Collecting { first: None };
        self.out.push(PsAction::Publish { round: self.round });
        let _ = now;
    }

    fn advance(&mut self, now: u64) {
        match self.phase {
            Phase::Starting { since } => {
                let all = self.cfg.workers.iter().all(|w| self.connected.get(w).copied().unwrap_or(false));
                if all || now >= since + self.cfg.start_timeout_ms {
                    let r = self.round;
                    self.event(now, EventKind::Entered { round: r, view: self.expected() });
                    self.publish(now);
                }
            }
            Phase::Collecting { .. } if self.cfg.mode != PsMode::Sync => {}
            Phase::Collecting { first: Some(first) } => {
                let missing: Vec<PeerIdx> =
                    self.expected().into_iter().filter(|w| !self.received.contains_key(w)).collect();
                let waited = now.saturating_sub(first);
                let timed_out = waited >= self.deadline_ms();
                if !missing.is_empty() && !timed_out {
                    return;
                }
                if missing.is_empty() {
                    DeadlinePolicy::observe(&mut self.wait_ewma_ms, waited);
                }
                let r = self.round;
                for w in missing {
                    self.suspected.insert(w, true);
                    self.event(now, EventKind::PeerSuspected { peer: w, round: r, waited_ms: waited });
                }
                let inputs: Vec<(PeerIdx, Vec<f32>)> =
                    std::mem::take(&mut self.received).into_iter().map(|(w, g)| (w, g.grad)).collect();
                let deadline_ms = self.deadline_ms();
                self.event(
                    now,
                    EventKind::RoundClosed { round: r, contributors: inputs.len(), timed_out, deadline_ms },
                );
                self.out.push(PsAction::Apply { round: r, inputs, staleness: 0 });
                self.next_version(now);
            }
            Phase::Collecting { first: None } | Phase::Done => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flat::Digest;

    fn cfg(n: u32) -> PsConfig {
        PsConfig {
            workers: (0..n).collect(),
            total_rounds: 3,
            checkpoint_every: 2,
            deadline: DeadlinePolicy { floor_ms: 100, ceiling_ms: 1000, factor: 4.0 },
            start_timeout_ms: 500,
            mode: PsMode::Sync,
        }
    }

    fn g(round: u64, v: f32) -> GradientMsg {
        GradientMsg { round, digest: Digest([0; 32]), samples: 1, loss: 0.0, grad: vec![v] }
    }

    #[test]
    fn a_round_closes_when_every_worker_pushed_and_stale_pushes_are_dropped() {
        let mut ps = Ps::new(cfg(2), 0, 0);
        ps.handle(0, PsInput::Connected(0));
        let a = ps.handle(1, PsInput::Connected(1));
        assert!(a.contains(&PsAction::Publish { round: 0 }));
        assert!(
            !ps.handle(5, PsInput::Gradient(1, g(0, 2.0)))
                .iter()
                .any(|a| matches!(a, PsAction::Apply { .. }))
        );
        let a = ps.handle(6, PsInput::Gradient(0, g(0, 1.0)));
        assert!(a.contains(&PsAction::Apply {
            round: 0,
            inputs: vec![(0, vec![1.0]), (1, vec![2.0])],
            staleness: 0
        }));
        assert!(a.contains(&PsAction::Publish { round: 1 }));
        // A repeated push for round 0 is never applied.
        let a = ps.handle(7, PsInput::Gradient(0, g(0, 1.0)));
        assert!(
            a.iter()
                .any(|a| matches!(a, PsAction::Event(Event { kind: EventKind::LateGradient { .. }, .. })))
        );
        assert_eq!(ps.round(), 1);
    }

    #[test]
    fn a_crashed_worker_leaves_at_once_a_silent_one_at_the_deadline() {
        let mut ps = Ps::new(cfg(3), 0, 0);
        for w in 0..3 {
            ps.handle(0, PsInput::Connected(w));
        }
        ps.handle(10, PsInput::Gradient(0, g(0, 1.0)));
        ps.handle(11, PsInput::Gradient(1, g(0, 1.0)));
        // Worker 2 is silent: the round closes at the deadline (floor 100 ms after the first push).
        assert_eq!(ps.next_timer(), Some(110));
        let a = ps.handle(110, PsInput::Tick);
        assert!(a.iter().any(|a| matches!(a, PsAction::Apply { round: 0, inputs, .. } if inputs.len() == 2)));
        // Round 1: worker 1 crashes; the round closes as soon as worker 0 pushed.
        ps.handle(120, PsInput::Disconnected(1));
        let a = ps.handle(121, PsInput::Gradient(0, g(1, 1.0)));
        assert!(a.iter().any(|a| matches!(a, PsAction::Apply { round: 1, .. })));
        assert!(a.contains(&PsAction::Checkpoint { round: 2 }));
    }

    #[test]
    fn without_workers_the_ps_waits_and_finishes_after_the_last_round() {
        let mut ps = Ps::new(cfg(1), 2, 0);
        let a = ps.handle(600, PsInput::Tick);
        assert!(a.contains(&PsAction::Publish { round: 2 }));
        assert_eq!(ps.next_timer(), None, "no push, no deadline: the PS waits");
        ps.handle(700, PsInput::Connected(0));
        let a = ps.handle(710, PsInput::Gradient(0, g(2, 1.0)));
        assert!(a.contains(&PsAction::Finished { round: 3 }));
        assert!(ps.is_done());
    }

    #[test]
    fn async_mode_applies_each_push_on_arrival_and_drops_stale_and_repeated_ones() {
        let mut ps =
            Ps::new(PsConfig { total_rounds: 5, mode: PsMode::Async { max_staleness: 1 }, ..cfg(2) }, 0, 0);
        ps.handle(0, PsInput::Connected(0));
        ps.handle(0, PsInput::Connected(1));
        assert_eq!(ps.next_timer(), None, "no deadline in asynchronous mode");
        let applied = |a: &[PsAction]| -> Vec<(u64, u64)> {
            a.iter()
                .filter_map(|a| match a {
                    PsAction::Apply { round, staleness, .. } => Some((*round, *staleness)),
                    _ => None,
                })
                .collect()
        };
        let events = |a: &[PsAction]| -> Vec<&'static str> {
            a.iter()
                .filter_map(|a| match a {
                    PsAction::Event(Event { kind: EventKind::LateGradient { .. }, .. }) => {
                        Some("late_gradient")
                    }
                    PsAction::Event(Event { kind: EventKind::StaleGradient { .. }, .. }) => {
                        Some("stale_gradient")
                    }
                    _ => None,
                })
                .collect()
        };
        // Both workers fetched version 0: the first push makes version 1, the second (staleness
        // 1) version 2.
        assert_eq!(applied(&ps.handle(5, PsInput::Gradient(0, g(0, 1.0)))), [(0, 0)]);
        assert!(
            ps.handle(5, PsInput::Gradient(0, g(0, 1.0)))
                .iter()
                .all(|a| !matches!(a, PsAction::Apply { .. })),
            "a repeated push is applied once"
        );
        let a = ps.handle(6, PsInput::Gradient(1, g(0, 1.0)));
        assert_eq!(applied(&a), [(1, 1)]);
        assert!(
            a.contains(&PsAction::Checkpoint { round: 2 }) && a.contains(&PsAction::Publish { round: 2 })
        );
        // Worker 0's push computed on version 1 arrives at version 2 (staleness 1); a push for
        // a version not yet published is refused.
        assert_eq!(applied(&ps.handle(7, PsInput::Gradient(0, g(1, 1.0)))), [(2, 1)]);
        assert_eq!(events(&ps.handle(8, PsInput::Gradient(1, g(9, 1.0)))), ["late_gradient"]);
        // Version 3; worker 1's gradient from version 1 is 2 versions stale: dropped.
        assert_eq!(events(&ps.handle(9, PsInput::Gradient(1, g(1, 1.0)))), ["stale_gradient"]);
        assert_eq!(ps.round(), 3);
        ps.handle(10, PsInput::Gradient(1, g(3, 1.0)));
        let a = ps.handle(11, PsInput::Gradient(0, g(4, 1.0)));
        assert!(a.contains(&PsAction::Finished { round: 5 }) && ps.is_done());
    }
}
