//! The worker machine alone, then a seeded simulation of a PS and its workers: messages with
//! random delays, a PS that crashes and returns from its checkpoint, workers that crash and
//! come back fresh. No gradient is applied twice, none to a version it was not computed on,
//! and training finishes.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::flat::Digest;
use crate::protocol::DeadlinePolicy;
use crate::ps::{Ps, PsAction, PsConfig, PsInput, PsMode};
use crate::wire::GradientMsg;

fn cfg(asynchronous: bool) -> WorkerConfig {
    WorkerConfig { me: 1, total_rounds: 10, asynchronous, versions_per_round: 3, dial_every_ms: 1000 }
}

#[test]
fn a_worker_fetches_computes_pushes_then_asks_for_the_next_version() {
    let mut w = Worker::new(cfg(false), Rng::new(1));
    assert_eq!(w.handle(0, WorkerInput::Tick), vec![WorkerAction::Dial]);
    assert_eq!(w.handle(5, WorkerInput::Connected), vec![WorkerAction::Fetch { round: 0 }]);
    assert_eq!(
        w.handle(6, WorkerInput::Params { round: 4 }),
        vec![WorkerAction::Compute { round: 4, batches_at: 4 }]
    );
    // Nothing else happens while it computes.
    assert_eq!(w.handle(7, WorkerInput::Tick), vec![]);
    assert_eq!(w.handle(9, WorkerInput::Computed { round: 4 }), vec![WorkerAction::Push { round: 4 }]);
    assert_eq!(w.handle(10, WorkerInput::PushEnded), vec![WorkerAction::Fetch { round: 5 }]);
    assert_eq!(w.position(), 5);
    assert_eq!(w.handle(11, WorkerInput::Params { round: 10 }), vec![WorkerAction::Finished]);
    assert!(w.is_done());
    assert_eq!(w.handle(12, WorkerInput::Disconnected), vec![]);
}

#[test]
fn a_gradient_ready_without_the_ps_is_dropped_and_the_worker_redials_then_backs_off() {
    let mut w = Worker::new(cfg(false), Rng::new(1));
    w.handle(0, WorkerInput::Connected);
    w.handle(1, WorkerInput::Params { round: 2 });
    assert_eq!(w.handle(2, WorkerInput::Disconnected), vec![WorkerAction::Dial]);
    assert_eq!(w.handle(3, WorkerInput::Computed { round: 2 }), vec![WorkerAction::Drop { round: 2 }]);
    assert_eq!(w.handle(500, WorkerInput::Tick), vec![], "redials once a second");
    assert_eq!(w.handle(1002, WorkerInput::Tick), vec![WorkerAction::Dial]);
    assert_eq!(w.handle(1003, WorkerInput::Connected), vec![WorkerAction::Fetch { round: 3 }]);
    // A failed fetch waits a jittered backoff (at most 200 ms after one failure).
    assert_eq!(w.handle(1004, WorkerInput::FetchFailed), vec![]);
    let mut t = 1004;
    loop {
        t += 1;
        if w.handle(t, WorkerInput::Tick) == vec![WorkerAction::Fetch { round: 3 }] {
            break;
        }
        assert!(t <= 1004 + 200, "backoff beyond its cap");
    }
    // Answers to nothing asked are ignored.
    w.handle(t + 1, WorkerInput::FetchFailed);
    assert_eq!(w.handle(t + 2, WorkerInput::Computed { round: 9 }), vec![]);
    assert_eq!(w.handle(t + 3, WorkerInput::PushEnded), vec![]);
}

#[test]
fn an_asynchronous_worker_walks_its_own_steps_from_the_first_version() {
    let mut w = Worker::new(cfg(true), Rng::new(1));
    w.handle(0, WorkerInput::Connected);
    assert_eq!(
        w.handle(1, WorkerInput::Params { round: 7 }),
        vec![WorkerAction::Compute { round: 7, batches_at: 2 }]
    );
    w.handle(2, WorkerInput::Computed { round: 7 });
    w.handle(3, WorkerInput::PushEnded);
    assert_eq!(
        w.handle(4, WorkerInput::Params { round: 9 }),
        vec![WorkerAction::Compute { round: 9, batches_at: 3 }]
    );
    assert_eq!(w.position(), 3);
}

/// A message or timer of the simulation.
#[derive(Debug, Clone)]
enum Ev {
    /// Something for worker `w` of incarnation `inc`.
    ToWorker {
        w: PeerIdx,
        inc: u32,
        input: WorkerInput,
    },
    /// A push of worker `w` (incarnation `inc`) arriving at the PS of incarnation `ps_inc`.
    Push {
        ps_inc: u32,
        w: PeerIdx,
        inc: u32,
        version: u64,
        id: u64,
    },
    /// A fetch arriving at the PS.
    Fetch {
        ps_inc: u32,
        w: PeerIdx,
        inc: u32,
        round: u64,
    },
    /// A worker's connection reaching the PS.
    Connect {
        ps_inc: u32,
        w: PeerIdx,
        inc: u32,
    },
    PsCrash,
    PsRestart,
    WorkerCrash(PeerIdx),
    WorkerRestart(PeerIdx),
    Tick,
}

/// The simulated cluster.
struct Sim {
    rng: Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    ps: Option<Ps>,
    ps_inc: u32,
    ps_cfg: PsConfig,
    /// The PS's published version (the driver answers fetches with it).
    published: Option<u64>,
    /// Per worker, the version it last pushed for (the driver's rule: a worker that pushed for
    /// the current version waits for the next one).
    pushed: BTreeMap<PeerIdx, u64>,
    parked: Vec<(PeerIdx, u32, u64)>,
    /// Connections to the current PS: worker → incarnation.
    links: BTreeMap<PeerIdx, u32>,
    workers: BTreeMap<PeerIdx, (Worker, u32)>,
    /// Worker processes started so far (each new one gets a new incarnation number).
    incarnations: u32,
    checkpoint: u64,
    /// Gradient id → (worker, version it was computed on).
    grads: BTreeMap<u64, (PeerIdx, u64)>,
    next_id: u64,
    /// What each worker is computing: (incarnation, gradient id).
    computing: BTreeMap<PeerIdx, (u32, u64)>,
    applied: BTreeSet<u64>,
    applies: u64,
    finished: bool,
}

const WORKERS: [PeerIdx; 3] = [0, 1, 2];

impl Sim {
    fn new(seed: u64, mode: PsMode) -> Sim {
        let ps_cfg = PsConfig {
            workers: WORKERS.to_vec(),
            total_rounds: 60,
            checkpoint_every: 7,
            deadline: DeadlinePolicy { floor_ms: 50, ceiling_ms: 400, factor: 3.0 },
            start_timeout_ms: 300,
            mode,
        };
        let mut sim = Sim {
            rng: Rng::new(seed),
            now: 0,
            queue: BTreeMap::new(),
            seq: 0,
            ps: Some(Ps::new(ps_cfg.clone(), 0, 0)),
            ps_inc: 0,
            ps_cfg,
            published: None,
            pushed: BTreeMap::new(),
            parked: Vec::new(),
            links: BTreeMap::new(),
            workers: BTreeMap::new(),
            incarnations: 0,
            checkpoint: 0,
            grads: BTreeMap::new(),
            next_id: 0,
            computing: BTreeMap::new(),
            applied: BTreeSet::new(),
            applies: 0,
            finished: false,
        };
        for w in WORKERS {
            sim.start_worker(w, 0);
        }
        sim.at(0, Ev::Tick);
        sim
    }

    fn worker_cfg(&self, w: PeerIdx) -> WorkerConfig {
        WorkerConfig {
            me: w,
            total_rounds: self.ps_cfg.total_rounds,
            asynchronous: self.ps_cfg.mode != PsMode::Sync,
            versions_per_round: 1,
            dial_every_ms: 100,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn delay(&mut self) -> u64 {
        1 + self.rng.below(20)
    }

    fn start_worker(&mut self, w: PeerIdx, inc: u32) {
        let worker = Worker::new(self.worker_cfg(w), Rng::derive(7, "worker", u64::from(w)));
        self.workers.insert(w, (worker, inc));
        self.at(self.now, Ev::ToWorker { w, inc, input: WorkerInput::Tick });
    }

    fn run(&mut self) {
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            assert!(
                t < 600_000,
                "the simulation did not finish: PS at {:?}",
                self.ps.as_ref().map(Ps::round)
            );
            self.now = t;
            self.step(ev);
            if self.finished && self.workers.values().all(|(w, _)| w.is_done()) {
                return;
            }
        }
        panic!("the simulation ran out of events before training finished");
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::ToWorker { w, inc, input } => self.deliver_to_worker(w, inc, input),
            Ev::Connect { ps_inc, w, inc } if ps_inc == self.ps_inc && self.ps.is_some() => {
                if self.workers.get(&w).is_some_and(|(_, i)| *i == inc) {
                    self.links.insert(w, inc);
                    self.deliver_to_ps(PsInput::Connected(w));
                    self.at(self.now + 1, Ev::ToWorker { w, inc, input: WorkerInput::Connected });
                }
            }
            Ev::Connect { w, inc, .. } => {
                // Nobody there: the dial fails; the worker stays disconnected and redials.
                let _ = (w, inc);
            }
            Ev::Fetch { ps_inc, w, inc, round } if ps_inc == self.ps_inc && self.ps.is_some() => {
                self.parked.push((w, inc, round));
                self.answer_parked();
            }
            // A request to a PS that is gone fails (the transport's outbound failure).
            Ev::Fetch { w, inc, .. } => {
                let d = self.delay();
                self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::FetchFailed });
            }
            Ev::Push { ps_inc, w, inc, version, id } if ps_inc == self.ps_inc && self.ps.is_some() => {
                let current = self.published.map_or(version, |r| version.max(r));
                self.pushed.insert(w, current);
                let g = GradientMsg {
                    round: version,
                    digest: Digest([0; 32]),
                    samples: 1,
                    loss: 0.0,
                    grad: vec![id as f32],
                };
                self.deliver_to_ps(PsInput::Gradient(w, g));
                if self.links.get(&w) == Some(&inc) {
                    let d = self.delay();
                    self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::PushEnded });
                }
            }
            Ev::Push { w, inc, .. } => {
                let d = self.delay();
                self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::PushEnded });
            }
            Ev::PsCrash => self.crash_ps(),
            Ev::PsRestart => {
                self.ps_inc += 1;
                self.ps = Some(Ps::new(self.ps_cfg.clone(), self.checkpoint, self.now));
                self.published = None;
                self.pushed.clear();
                self.deliver_to_ps(PsInput::Tick);
            }
            Ev::WorkerCrash(w) => {
                let Some((_, inc)) = self.workers.remove(&w) else { return };
                self.computing.remove(&w);
                if self.links.remove(&w).is_some() {
                    self.deliver_to_ps(PsInput::Disconnected(w));
                }
                self.parked.retain(|p| p.1 != inc);
                let back = self.now + 50 + self.rng.below(200);
                self.at(back, Ev::WorkerRestart(w));
            }
            Ev::WorkerRestart(w) => {
                self.incarnations += 1;
                self.start_worker(w, self.incarnations);
            }
            Ev::Tick => {
                self.deliver_to_ps(PsInput::Tick);
                let alive: Vec<(PeerIdx, u32)> =
                    self.workers.iter().map(|(&w, &(_, inc))| (w, inc)).collect();
                for (w, inc) in alive {
                    self.deliver_to_worker(w, inc, WorkerInput::Tick);
                }
                self.at(self.now + 10, Ev::Tick);
            }
        }
    }

    fn crash_ps(&mut self) {
        if self.ps.take().is_none() {
            return;
        }
        self.published = None;
        self.parked.clear();
        // Every connection drops; every request in flight fails.
        for (w, inc) in std::mem::take(&mut self.links) {
            let d = self.delay();
            self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::Disconnected });
            self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::FetchFailed });
            self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::PushEnded });
        }
        let back = self.now + 100 + self.rng.below(400);
        self.at(back, Ev::PsRestart);
    }

    fn deliver_to_worker(&mut self, w: PeerIdx, inc: u32, input: WorkerInput) {
        let Some((worker, i)) = self.workers.get_mut(&w) else { return };
        if *i != inc {
            return; // for a process that no longer exists
        }
        for action in worker.handle(self.now, input) {
            let d = self.delay();
            match action {
                WorkerAction::Dial => {
                    let ps_inc = self.ps_inc;
                    self.at(self.now + d, Ev::Connect { ps_inc, w, inc });
                }
                WorkerAction::Fetch { round } => {
                    let ps_inc = self.ps_inc;
                    self.at(self.now + d, Ev::Fetch { ps_inc, w, inc, round });
                }
                WorkerAction::Compute { round, .. } => {
                    self.next_id += 1;
                    let id = self.next_id;
                    self.grads.insert(id, (w, round));
                    self.computing.insert(w, (inc, id));
                    let t = self.now + 5 + self.rng.below(40);
                    self.at(t, Ev::ToWorker { w, inc, input: WorkerInput::Computed { round } });
                }
                WorkerAction::Push { round } => {
                    let (_, id) = self.computing.remove(&w).expect("pushes what it computed");
                    assert_eq!(self.grads[&id], (w, round), "pushes the gradient of the version it computed");
                    let ps_inc = self.ps_inc;
                    self.at(self.now + d, Ev::Push { ps_inc, w, inc, version: round, id });
                }
                WorkerAction::Drop { .. } => {
                    self.computing.remove(&w);
                }
                WorkerAction::Finished => {}
            }
        }
    }

    fn deliver_to_ps(&mut self, input: PsInput) {
        let Some(ps) = self.ps.as_mut() else { return };
        for action in ps.handle(self.now, input) {
            match action {
                PsAction::Publish { round } => {
                    self.published = Some(round);
                }
                PsAction::Apply { round, inputs, staleness } => {
                    self.applies += 1;
                    for (w, g) in inputs {
                        let id = g[0] as u64;
                        assert!(self.applied.insert(id), "gradient {id} of worker {w} applied twice");
                        let (from, version) = self.grads[&id];
                        assert_eq!(from, w, "a gradient applied as another worker's");
                        assert_eq!(version + staleness, round, "gradient {id} applied to the wrong version");
                    }
                }
                PsAction::Checkpoint { round } => self.checkpoint = round,
                PsAction::Finished { .. } => self.finished = true,
                PsAction::Event(_) => {}
            }
        }
        self.answer_parked();
    }

    /// The PS driver's answer rule: a fetch gets the published version unless the worker
    /// already pushed for it (then it waits for the next one); asynchronous mode always answers.
    fn answer_parked(&mut self) {
        let Some(r) = self.published else { return };
        let asynchronous = self.ps_cfg.mode != PsMode::Sync;
        let parked = std::mem::take(&mut self.parked);
        for (w, inc, round) in parked {
            if asynchronous || r >= round || self.pushed.get(&w) != Some(&r) {
                let d = self.delay();
                self.at(self.now + d, Ev::ToWorker { w, inc, input: WorkerInput::Params { round: r } });
            } else {
                self.parked.push((w, inc, round));
            }
        }
    }
}

fn simulate(seed: u64, mode: PsMode) {
    let mut sim = Sim::new(seed, mode);
    // Faults at seeded times: two PS crashes, three worker crashes.
    for k in 0..2 {
        let t = 200 + k * 900 + sim.rng.below(300);
        sim.at(t, Ev::PsCrash);
    }
    for _ in 0..3 {
        let t = 100 + sim.rng.below(2_000);
        let w = sim.rng.below(3) as PeerIdx;
        sim.at(t, Ev::WorkerCrash(w));
    }
    sim.run();
    assert!(sim.finished, "seed {seed}: training did not finish");
    // The faults happened during training: the PS came back twice, workers came back fresh,
    // and some computed gradients were never applied (dropped or refused, never re-sent).
    assert_eq!(sim.ps_inc, 2, "seed {seed}: the PS did not crash and return twice");
    assert!(sim.incarnations > 0, "seed {seed}: no worker came back");
    assert!(sim.applied.len() < sim.grads.len(), "seed {seed}: no gradient was lost to a fault");
}

#[test]
fn a_ps_that_crashes_and_returns_and_workers_that_rejoin_never_apply_a_gradient_twice_or_to_the_wrong_version()
 {
    for seed in 0..40 {
        simulate(seed, PsMode::Sync);
    }
}

#[test]
fn the_same_holds_in_asynchronous_mode_up_to_the_staleness_bound() {
    for seed in 0..40 {
        simulate(seed, PsMode::Async { max_staleness: 4 });
    }
}
