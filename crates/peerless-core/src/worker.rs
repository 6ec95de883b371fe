//! A parameter-server worker's protocol as an I/O-free state machine.
//!
//! The worker loops: fetch model version `r` from the PS, compute its gradient for `r` (the
//! same batches peer `i` would use in P2P), push it once, ask for `r + 1`. One thing at a time:
//! it never fetches while it computes or pushes. When the PS is gone the worker redials every
//! `dial_every_ms` and re-fetches with capped, jittered exponential backoff; a gradient that is
//! ready while the PS is not connected is dropped, and a push is never repeated, so the PS
//! (which drops pushes for any other version than its current one) never applies a gradient
//! twice. The PS publishing the last version ends the worker.
//!
//! In asynchronous mode the worker walks its own shard: its first version fixes its starting
//! step (`version / versions_per_round`), and each gradient moves it one step on, whatever
//! version the PS hands out next.

use crate::protocol::PeerIdx;
use crate::rng::Rng;

/// Static configuration of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// This worker's index.
    pub me: PeerIdx,
    /// The PS's last version: when the PS hands it out, training is over.
    pub total_rounds: u64,
    /// Asynchronous PS (each push is one version).
    pub asynchronous: bool,
    /// Model versions per synchronous round (1, or the workers in asynchronous mode).
    pub versions_per_round: u64,
    /// Redial a missing PS this often, ms.
    pub dial_every_ms: u64,
}

/// Inputs of the worker machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerInput {
    /// Time passed.
    Tick,
    /// The connection to the PS is up.
    Connected,
    /// The connection to the PS closed.
    Disconnected,
    /// The PS answered the fetch with version `round`.
    Params {
        /// The version.
        round: u64,
    },
    /// The fetch failed: no answer (the PS is gone), or an answer that is no model.
    FetchFailed,
    /// The gradient on version `round` is ready.
    Computed {
        /// The version it was computed on.
        round: u64,
    },
    /// The push is over: answered, or failed because the PS is gone (it is not repeated).
    PushEnded,
}

/// Actions of the worker machine, to carry out in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerAction {
    /// Dial the PS.
    Dial,
    /// Ask the PS for version `round` (it answers with that version or a newer one).
    Fetch {
        /// The version wanted.
        round: u64,
    },
    /// Compute the gradient on version `round` from the batches of step `batches_at`.
    Compute {
        /// The version.
        round: u64,
        /// The step whose batches to use (the version, or the own step in asynchronous mode).
        batches_at: u64,
    },
    /// Push the gradient computed on `round`, once.
    Push {
        /// Its version.
        round: u64,
    },
    /// The gradient on `round` is dropped: the PS was not connected when it was ready.
    Drop {
        /// Its version.
        round: u64,
    },
    /// The PS handed out the last version: training is over.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to fetch, not before `retry_at` (ms).
    Idle {
        retry_at: u64,
    },
    Fetching,
    Computing {
        round: u64,
    },
    Pushing,
    Done,
}

/// The worker machine.
#[derive(Debug)]
pub struct Worker {
    cfg: WorkerConfig,
    phase: Phase,
    connected: bool,
    last_dial: Option<u64>,
    failures: u32,
    /// The next version to ask for.
    next: u64,
    /// Asynchronous mode: the own step through the shard, once the first version fixed it.
    step: Option<u64>,
    /// Jitter of the fetch backoff.
    rng: Rng,
}

impl Worker {
    /// A fresh worker (also after a crash: it keeps nothing); `rng` jitters its backoff.
    pub fn new(cfg: WorkerConfig, rng: Rng) -> Worker {
        Worker {
            cfg,
            phase: Phase::Idle { retry_at: 0 },
            connected: false,
            last_dial: None,
            failures: 0,
            next: 0,
            step: None,
            rng,
        }
    }

    /// Whether the PS handed out the last version.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the connection to the PS is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The next version to ask for (one past the last gradient's).
    pub fn next_version(&self) -> u64 {
        self.next
    }

    /// Gradients done: the own step in asynchronous mode, else the next version to ask for.
    pub fn position(&self) -> u64 {
        self.step.unwrap_or(self.next)
    }

    /// Feeds one input at `now` (ms); returns the actions to carry out in order.
    pub fn handle(&mut self, now: u64, input: WorkerInput) -> Vec<WorkerAction> {
        let mut out = Vec::new();
        match (input, self.phase) {
            (_, Phase::Done) => return out,
            (WorkerInput::Tick, _) => {}
            (WorkerInput::Connected, _) => self.connected = true,
            (WorkerInput::Disconnected, _) => self.connected = false,
            (WorkerInput::Params { round }, Phase::Fetching) if round >= self.cfg.total_rounds => {
                self.phase = Phase::Done;
                out.push(WorkerAction::Finished);
                return out;
            }
            (WorkerInput::Params { round }, Phase::Fetching) => {
                self.failures = 0;
                let vpr = self.cfg.versions_per_round.max(1);
                let batches_at =
                    if self.cfg.asynchronous { *self.step.get_or_insert(round / vpr) } else { round };
                self.phase = Phase::Computing { round };
                out.push(WorkerAction::Compute { round, batches_at });
            }
            (WorkerInput::FetchFailed, Phase::Fetching) => {
                self.failures += 1;
                // 100 ms doubling per failure, capped at 2 s; the wait is uniform below it.
                let cap = (100u64 << self.failures.min(5)).min(2_000);
                self.phase = Phase::Idle { retry_at: now + self.rng.below(cap + 1) };
            }
            (WorkerInput::Computed { round }, Phase::Computing { round: computing })
                if round == computing =>
            {
                self.next = round + 1;
                if let Some(step) = &mut self.step {
                    *step += 1;
                }
                if self.connected {
                    self.phase = Phase::Pushing;
                    out.push(WorkerAction::Push { round });
                } else {
                    self.phase = Phase::Idle { retry_at: now };
                    out.push(WorkerAction::Drop { round });
                }
            }
            (WorkerInput::PushEnded, Phase::Pushing) => self.phase = Phase::Idle { retry_at: now },
            // An answer to nothing asked (a late one, after a failure was already taken in).
            _ => {}
        }
        self.advance(now, &mut out);
        out
    }

    /// Dials a missing PS when due, and fetches when idle, connected and due.
    fn advance(&mut self, now: u64, out: &mut Vec<WorkerAction>) {
        if !self.connected && self.last_dial.is_none_or(|t| now >= t + self.cfg.dial_every_ms) {
            self.last_dial = Some(now);
            out.push(WorkerAction::Dial);
        }
        if let Phase::Idle { retry_at } = self.phase
            && self.connected
            && now >= retry_at
        {
            self.phase = Phase::Fetching;
            out.push(WorkerAction::Fetch { round: self.next });
        }
    }
}

#[cfg(test)]
mod tests;
