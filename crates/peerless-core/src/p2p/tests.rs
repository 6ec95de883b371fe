//! The round machine driven by a deterministic simulation: peers with a toy model, a network
//! with seeded latencies, crashes, silences and restarts; invariants checked throughout.

use std::collections::{BTreeMap, BinaryHeap};

use super::*;
use crate::flat::digest;
use crate::optim::OptimizerState;
use crate::rng::Rng;

const N_PARAMS: usize = 4;

#[derive(Debug)]
enum Delivery {
    Input(Input),
    /// The local gradient of `round`, computed at model version `version`.
    Local {
        round: u64,
        version: Digest,
    },
}

#[derive(Debug)]
struct Peer {
    machine: Round,
    alive: bool,
    /// Messages from the peer are not delivered (a process cut off, its connections up).
    silent: bool,
    /// Until this time the peer does nothing (a SIGSTOPped process): what arrives waits, its
    /// timers and computation stand still.
    frozen_until: u64,
    params: Vec<f32>,
    /// Rounds applied, in order (reset by an adoption).
    applied: Vec<u64>,
    checkpoint: Option<(u64, Vec<f32>)>,
    events: Vec<Event>,
    incarnation: u32,
    /// Each applied round with its contributors, over every incarnation.
    applied_sets: Vec<(u64, Vec<PeerIdx>)>,
    /// When each of `applied_sets` was applied.
    applied_at: Vec<u64>,
    /// Rounds it computed, over every incarnation.
    computed: Vec<u64>,
    /// States adopted, over every incarnation.
    adoptions: u32,
    /// Its own gradient messages of the last two rounds it sent (for resends).
    sent: BTreeMap<u64, GradientMsg>,
}

struct Sim {
    now: u64,
    seq: u64,
    rng: Rng,
    peers: Vec<Peer>,
    /// (time, seq) → (to, incarnation, delivery); min-heap by time.
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, u32)>>,
    pending: BTreeMap<u64, (u32, u32, Delivery)>,
    cfg: RoundConfig,
    /// Extra latency of messages *from* a peer, ms.
    slow: BTreeMap<u32, u64>,
    /// Extra time a peer's functions take per round, ms.
    slow_compute: BTreeMap<u32, u64>,
    /// Extra latency of a state transfer (a large message), ms.
    state_ms: u64,
    /// `(peer, n)`: the peer crashes when it is about to send its `n+1`-th message from now,
    /// so a broadcast can reach some recipients and not others.
    crash_plan: Option<(u32, u32)>,
    /// Ordered pairs `(from, to)` whose messages are lost (a partition; connections stay up).
    cut: BTreeSet<(u32, u32)>,
    /// The parameters' digest after each round, as first applied by any peer: a peer that
    /// applies a round to a different model is a split brain.
    versions: BTreeMap<u64, Digest>,
    /// Rounds applied to a model that differs from the first one applied (peer, round).
    split: Vec<(u32, u64)>,
}

fn grad_of(peer: u32, round: u64, params: &[f32]) -> Vec<f32> {
    (0..N_PARAMS)
        .map(|j| ((peer as f32 + 1.0) * (round as f32 + j as f32)).sin() * 0.1 + params[j] * 0.05)
        .collect()
}

impl Sim {
    fn new(n: u32, total: u64, seed: u64) -> Sim {
        let cfg = RoundConfig {
            me: 0,
            members: (0..n).collect(),
            total_rounds: total,
            checkpoint_every: 5,
            deadline: DeadlinePolicy { floor_ms: 300, ceiling_ms: 2_000, factor: 4.0 },
            start_timeout_ms: 1_000,
            quorum: Quorum::Majority,
        };
        let peers = (0..n)
            .map(|i| Peer {
                machine: Round::new(RoundConfig { me: i, ..cfg.clone() }, Start::Fresh { round: 0 }, 0),
                alive: true,
                silent: false,
                frozen_until: 0,
                params: vec![1.0; N_PARAMS],
                applied: Vec::new(),
                checkpoint: None,
                events: Vec::new(),
                incarnation: 0,
                applied_sets: Vec::new(),
                applied_at: Vec::new(),
                computed: Vec::new(),
                adoptions: 0,
                sent: BTreeMap::new(),
            })
            .collect();
        let mut sim = Sim {
            now: 0,
            seq: 0,
            rng: Rng::new(seed),
            peers,
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            cfg,
            slow: BTreeMap::new(),
            slow_compute: BTreeMap::new(),
            state_ms: 0,
            crash_plan: None,
            cut: BTreeSet::new(),
            versions: BTreeMap::new(),
            split: Vec::new(),
        };
        // A connection comes up at both ends at once, so nothing arrives before it.
        for i in 0..n {
            for j in i + 1..n {
                let d = 1 + sim.rng.below(20);
                sim.schedule(d, j, Delivery::Input(Input::Connected(i)));
                sim.schedule(d, i, Delivery::Input(Input::Connected(j)));
            }
        }
        sim
    }

    fn schedule(&mut self, delay: u64, to: u32, d: Delivery) {
        self.seq += 1;
        let inc = self.peers[to as usize].incarnation;
        self.queue.push(std::cmp::Reverse((self.now + delay, self.seq, to)));
        self.pending.insert(self.seq, (to, inc, d));
    }

    /// A message from `from` to `to` over the simulated network.
    fn send(&mut self, from: u32, to: u32, input: Input) {
        let (f, t) = (&self.peers[from as usize], &self.peers[to as usize]);
        if !f.alive || !t.alive || f.silent || self.cut.contains(&(from, to)) {
            return;
        }
        if let Some((peer, left)) = &mut self.crash_plan
            && *peer == from
        {
            if *left == 0 {
                self.crash_plan = None;
                self.kill(from);
                return;
            }
            *left -= 1;
        }
        let state = if matches!(input, Input::State(..)) { self.state_ms } else { 0 };
        let delay = 1 + self.rng.below(15) + self.slow.get(&from).copied().unwrap_or(0) + state;
        self.schedule(delay, to, Delivery::Input(input));
    }

    fn run_actions(&mut self, i: u32, actions: Vec<Action>) {
        let mut follow_up = Vec::new();
        for a in actions {
            let p = &mut self.peers[i as usize];
            match a {
                Action::Compute { round, view } => {
                    assert!(view.contains(&i), "a peer's view contains itself");
                    p.computed.push(round);
                    let version = digest(&p.params);
                    let d = 5 + self.rng.below(40) + self.slow_compute.get(&i).copied().unwrap_or(0);
                    self.schedule(d, i, Delivery::Local { round, version });
                }
                Action::Broadcast { round, to } => {
                    // A resend (of this round or the last) is the message sent then.
                    let params = p.params.clone();
                    let msg = p
                        .sent
                        .entry(round)
                        .or_insert_with(|| GradientMsg {
                            round,
                            digest: digest(&params),
                            samples: 64,
                            loss: 1.0,
                            grad: grad_of(i, round, &params),
                        })
                        .clone();
                    while p.sent.len() > 2 {
                        p.sent.pop_first();
                    }
                    for t in to {
                        self.send(i, t, Input::Gradient(i, msg.clone()));
                    }
                }
                Action::Apply { round, inputs } => {
                    assert!(inputs.windows(2).all(|w| w[0].0 < w[1].0), "inputs ordered by peer");
                    if let Some(&last) = p.applied.last() {
                        assert_eq!(round, last + 1, "peer {i} applied {round} after {last}");
                    }
                    p.applied.push(round);
                    p.applied_sets.push((round, inputs.iter().map(|(q, _)| *q).collect()));
                    p.applied_at.push(self.now);
                    // Empty inputs (nothing agreed) change nothing.
                    let n = inputs.len() as f32;
                    for j in (0..N_PARAMS).filter(|_| !inputs.is_empty()) {
                        let g: f32 = inputs.iter().map(|(_, v)| v[j]).sum::<f32>() / n;
                        p.params[j] -= 0.1 * g;
                    }
                    let version = digest(&p.params);
                    if *self.versions.entry(round).or_insert(version) != version {
                        self.split.push((i, round));
                    }
                }
                Action::Checkpoint { round } => p.checkpoint = Some((round, p.params.clone())),
                Action::ServeState { to, round, base } => {
                    assert_eq!(round, p.machine.round());
                    let s = StateMsg {
                        round,
                        digest: digest(&p.params),
                        params: p.params.clone(),
                        optimizer: OptimizerState { kind: "sgd".into(), steps: round, buffers: vec![] },
                        base: base.clone(),
                    };
                    for t in to {
                        self.send(i, t, Input::State(i, s.clone()));
                    }
                }
                Action::RefuseState { to, .. } => self.send(i, to, Input::StateFailed(i)),
                Action::RequestState { from } => self.send(i, from, Input::StateRequested(i)),
                Action::RequestResend { round, from } => self.send(i, from, Input::ResendRequested(i, round)),
                Action::Adopt(s) => {
                    p.params = s.params;
                    p.applied.clear();
                    p.adoptions += 1;
                }
                Action::AnnounceReceived { round, peers, to } => {
                    for t in to {
                        self.send(i, t, Input::Received(i, round, peers.clone()));
                    }
                }
                Action::AnnounceJoin { round, to } => {
                    for t in to {
                        self.send(i, t, Input::Join(i, round));
                    }
                }
                Action::Event(e) => p.events.push(e),
                Action::Finalize { round } => {
                    assert_eq!(round, self.cfg.total_rounds);
                    follow_up.push(Input::FinalDigest(digest(&p.params)));
                }
                Action::AnnounceFinal { round, digest, to } => {
                    for t in to {
                        self.send(i, t, Input::Final(i, round, digest));
                    }
                }
                Action::Finished { round } => assert_eq!(round, self.cfg.total_rounds),
            }
        }
        for input in follow_up {
            self.input(i, input);
        }
    }

    fn input(&mut self, i: u32, input: Input) {
        let now = self.now;
        let actions = self.peers[i as usize].machine.handle(now, input);
        self.run_actions(i, actions);
    }

    /// Advances to the next delivery or timer; false when nothing is left to happen.
    fn step(&mut self) -> bool {
        let next_msg = self.queue.peek().map(|r| r.0.0);
        let next_timer = self
            .peers
            .iter()
            .filter(|p| p.alive)
            .filter_map(|p| p.machine.next_timer().map(|t| t.max(p.frozen_until)))
            .min();
        let t = match (next_msg, next_timer) {
            (None, None) => return false,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => a.min(b),
        };
        self.now = self.now.max(t);
        if next_msg == Some(t) {
            let std::cmp::Reverse((_, seq, _)) = self.queue.pop().expect("peeked");
            let (to, inc, d) = self.pending.remove(&seq).expect("scheduled");
            let p = &self.peers[to as usize];
            if !p.alive || p.incarnation != inc {
                return true;
            }
            if p.frozen_until > self.now {
                // It waits in the frozen process's socket buffers.
                let wait = p.frozen_until - self.now;
                self.schedule(wait, to, d);
                return true;
            }
            let input = match d {
                Delivery::Input(input) => input,
                Delivery::Local { round, version } => {
                    let p = &self.peers[to as usize];
                    if digest(&p.params) != version || p.machine.round() != round {
                        return true; // the model changed under the computation (adopted)
                    }
                    Input::LocalGradient { round, digest: version, grad: grad_of(to, round, &p.params) }
                }
            };
            self.input(to, input);
        } else {
            for i in 0..self.peers.len() as u32 {
                let p = &self.peers[i as usize];
                if p.alive
                    && p.frozen_until <= self.now
                    && p.machine.next_timer().is_some_and(|x| x <= self.now)
                {
                    self.input(i, Input::Tick);
                }
            }
        }
        true
    }

    fn run_to_end(&mut self) {
        let mut steps = 0;
        while self.step() {
            steps += 1;
            if steps >= 2_000_000 {
                for p in &self.peers {
                    eprintln!(
                        "alive {} phase {:?} round {} timer {:?} now {}",
                        p.alive,
                        p.machine.phase,
                        p.machine.round(),
                        p.machine.next_timer(),
                        self.now
                    );
                }
                panic!("simulation does not terminate");
            }
        }
    }

    fn run_until(&mut self, t: u64) {
        let mut steps = 0;
        while self.now < t && self.step() {
            steps += 1;
            if steps >= 2_000_000 {
                for p in &self.peers {
                    eprintln!(
                        "alive {} phase {:?} timer {:?} now {}",
                        p.alive,
                        p.machine.phase,
                        p.machine.next_timer(),
                        self.now
                    );
                }
                panic!("simulation does not advance");
            }
        }
    }

    fn kill(&mut self, k: u32) {
        self.peers[k as usize].alive = false;
        for j in 0..self.peers.len() as u32 {
            if j != k && self.peers[j as usize].alive {
                self.schedule(1, j, Delivery::Input(Input::Disconnected(k)));
            }
        }
    }

    /// SIGSTOPs peer `k` for `ms`; the others' heartbeats notice after `detect_ms` if it is
    /// still frozen then.
    fn freeze(&mut self, k: u32, ms: u64, detect_ms: u64) {
        self.peers[k as usize].frozen_until = self.now + ms;
        // Its driver notices its own timers fired late, before it takes in the backlog.
        self.schedule(ms, k, Delivery::Input(Input::Paused { ms }));
        if ms > detect_ms {
            for j in 0..self.peers.len() as u32 {
                if j != k && self.peers[j as usize].alive {
                    let input = Input::Unresponsive { peer: k, silent_ms: detect_ms };
                    self.schedule(detect_ms, j, Delivery::Input(input));
                }
            }
        }
    }

    /// Cuts every link between `groups` (connections stay up); after `detect_ms` each side's
    /// heartbeats find the other side unresponsive.
    fn partition(&mut self, groups: &[Vec<u32>], detect_ms: u64) {
        for (a, ga) in groups.iter().enumerate() {
            for gb in groups.iter().skip(a + 1) {
                for &i in ga {
                    for &j in gb {
                        self.cut.insert((i, j));
                        self.cut.insert((j, i));
                        let (i_silent, j_silent) = (
                            Input::Unresponsive { peer: j, silent_ms: detect_ms },
                            Input::Unresponsive { peer: i, silent_ms: detect_ms },
                        );
                        self.schedule(detect_ms, i, Delivery::Input(i_silent));
                        self.schedule(detect_ms, j, Delivery::Input(j_silent));
                    }
                }
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn restart(&mut self, k: u32) {
        let own = self.peers[k as usize].checkpoint.clone();
        let cfg = RoundConfig { me: k, ..self.cfg.clone() };
        let p = &mut self.peers[k as usize];
        p.incarnation += 1;
        p.alive = true;
        p.silent = false;
        p.applied.clear();
        p.sent.clear();
        p.params = own.as_ref().map_or(vec![1.0; N_PARAMS], |c| c.1.clone());
        p.machine = Round::new(cfg, Start::Join { own: own.map(|c| c.0) }, self.now);
        for j in 0..self.peers.len() as u32 {
            if j != k && self.peers[j as usize].alive {
                self.schedule(2, j, Delivery::Input(Input::Connected(k)));
                self.schedule(2, k, Delivery::Input(Input::Connected(j)));
            }
        }
    }

    fn digests(&self) -> Vec<Digest> {
        self.peers.iter().filter(|p| p.alive).map(|p| digest(&p.params)).collect()
    }

    fn assert_converged(&self) {
        for (i, p) in self.peers.iter().enumerate() {
            if p.alive {
                assert!(p.machine.is_done(), "peer {i} not done at round {}", p.machine.round());
                assert_eq!(p.machine.round(), self.cfg.total_rounds);
            }
        }
        let d = self.digests();
        assert!(d.windows(2).all(|w| w[0] == w[1]), "replicas differ: {d:?}");
    }

    /// Prints every peer's events but the ordinary round closes (for a failing seed).
    fn dump(&self) {
        for (i, p) in self.peers.iter().enumerate() {
            eprintln!("peer {i} alive {} digest {}", p.alive, digest(&p.params).short());
            for e in
                p.events.iter().filter(|e| !matches!(e.kind, EventKind::RoundClosed { timed_out: false, .. }))
            {
                eprintln!("   {e:?}");
            }
        }
    }

    fn events_of(&self, i: u32) -> &[Event] {
        &self.peers[i as usize].events
    }
}

fn count(events: &[Event], f: impl Fn(&EventKind) -> bool) -> usize {
    events.iter().filter(|e| f(&e.kind)).count()
}

#[test]
fn four_peers_train_in_lockstep_to_identical_replicas() {
    let mut sim = Sim::new(4, 30, 1);
    sim.run_to_end();
    sim.assert_converged();
    for i in 0..4 {
        let ev = sim.events_of(i);
        assert_eq!(count(ev, |k| matches!(k, EventKind::PeerSuspected { .. })), 0);
        let closed: Vec<usize> = ev
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::RoundClosed { contributors, timed_out, .. } => {
                    assert!(!timed_out);
                    Some(contributors)
                }
                _ => None,
            })
            .collect();
        assert_eq!(closed.len(), 30);
        assert!(closed.iter().all(|&c| c == 4), "every round aggregates all four: {closed:?}");
        assert_eq!(sim.peers[i as usize].applied, (0..30).collect::<Vec<_>>());
    }
}

#[test]
fn a_crashed_peer_leaves_at_once_and_the_survivors_do_not_wait_for_the_deadline() {
    let mut sim = Sim::new(4, 40, 2);
    sim.run_until(400);
    let crash_at = sim.now;
    sim.kill(3);
    sim.run_to_end();
    sim.assert_converged();
    for i in 0..3 {
        let ev = sim.events_of(i);
        let left = ev.iter().find(|e| matches!(e.kind, EventKind::PeerLeft { peer: 3, .. })).unwrap();
        assert!(left.at_ms - crash_at <= 2, "detected at {} after crash at {crash_at}", left.at_ms);
        assert_eq!(count(ev, |k| matches!(k, EventKind::RoundClosed { timed_out: true, .. })), 0);
        assert_eq!(count(ev, |k| matches!(k, EventKind::PeerSuspected { .. })), 0);
    }
}

#[test]
fn a_silent_peer_is_suspected_at_the_deadline_once() {
    let mut sim = Sim::new(3, 20, 3);
    sim.run_until(300);
    sim.peers[2].silent = true;
    sim.run_until(20_000);
    sim.peers[2].alive = false; // stays stopped; do not require it to finish
    sim.run_to_end();
    for i in 0..2 {
        let p = &sim.peers[i];
        assert!(p.machine.is_done());
        let ev = &p.events;
        assert_eq!(count(ev, |k| matches!(k, EventKind::PeerSuspected { peer: 2, .. })), 1, "{ev:?}");
        let timed_out: Vec<&Event> =
            ev.iter().filter(|e| matches!(e.kind, EventKind::RoundClosed { timed_out: true, .. })).collect();
        assert_eq!(timed_out.len(), 1, "only the first round without it waits");
        let floor = sim.cfg.deadline.floor_ms;
        let EventKind::RoundClosed { deadline_ms, .. } = timed_out[0].kind else { unreachable!() };
        assert!((floor..=sim.cfg.deadline.ceiling_ms).contains(&deadline_ms));
    }
    assert_eq!(digest(&sim.peers[0].params), digest(&sim.peers[1].params));
}

#[test]
fn a_restarted_peer_catches_up_from_a_live_peer_and_ends_identical() {
    let mut sim = Sim::new(4, 60, 4);
    sim.run_until(300);
    sim.kill(1);
    sim.run_until(900);
    sim.restart(1);
    sim.run_to_end();
    sim.assert_converged();
    let ev = sim.events_of(1);
    let synced = ev.iter().find_map(|e| match e.kind {
        EventKind::Synced { round, from } => Some((round, from)),
        _ => None,
    });
    let (round, from) = synced.expect("the restarted peer synced");
    assert!(from.is_some() && round > 5, "synced at {round} from {from:?}");
    // The others took it back into their aggregates.
    let joined = count(sim.events_of(0), |k| matches!(k, EventKind::PeerJoined { peer: 1, .. }));
    assert_eq!(joined, 1, "{:#?}", sim.events_of(0));
    let last = sim.events_of(0).iter().rev().find_map(|e| match e.kind {
        EventKind::RoundClosed { contributors, .. } => Some(contributors),
        _ => None,
    });
    assert_eq!(last, Some(4));
}

#[test]
fn a_restarted_peer_alone_resumes_from_its_own_checkpoint() {
    let mut sim = Sim::new(1, 20, 5);
    sim.run_until(1_400);
    sim.kill(0);
    let ck = sim.peers[0].checkpoint.clone().expect("checkpointed").0;
    sim.restart(0);
    sim.run_to_end();
    sim.assert_converged();
    let synced = sim.events_of(0).iter().find_map(|e| match e.kind {
        EventKind::Synced { round, from } => Some((round, from)),
        _ => None,
    });
    assert_eq!(synced, Some((ck, None)));
}

#[test]
fn differing_views_are_reconciled_to_the_majority() {
    // Peer 2's gradients are slow: some peers' deadlines pass before they arrive, others not.
    let mut sim = Sim::new(5, 40, 6);
    sim.run_until(200);
    sim.slow.insert(2, 290);
    sim.run_until(3_000);
    sim.slow.clear();
    sim.run_to_end();
    sim.assert_converged();
}

#[test]
fn invariants_hold_under_random_crashes_restarts_and_stragglers() {
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let n = 2 + rng.below(4) as u32;
        let mut sim = Sim::new(n, 50, seed);
        let mut t = 0;
        for _ in 0..3 {
            t += 100 + rng.below(600);
            sim.run_until(t);
            let k = rng.below(n as u64) as u32;
            match rng.below(3) {
                0 if sim.peers[k as usize].alive && sim.peers.iter().filter(|p| p.alive).count() > 1 => {
                    sim.kill(k);
                    t += 50 + rng.below(500);
                    sim.run_until(t);
                    sim.restart(k);
                }
                1 => {
                    sim.slow.insert(k, rng.below(700));
                }
                _ => sim.slow.clear(),
            }
        }
        sim.slow.clear();
        sim.run_to_end();
        let d = sim.digests();
        if !d.windows(2).all(|w| w[0] == w[1]) {
            for (i, p) in sim.peers.iter().enumerate() {
                eprintln!("peer {i} alive {} digest {}", p.alive, digest(&p.params).short());
                for e in p
                    .events
                    .iter()
                    .filter(|e| !matches!(e.kind, EventKind::RoundClosed { timed_out: false, .. }))
                {
                    eprintln!("   {e:?}");
                }
            }
            panic!("seed {seed}: replicas differ");
        }
        sim.assert_converged();
    }
}

/// Peer 0 of three, all connected, with its own gradient of round 0 in: collecting.
fn collecting_peer() -> (Round, Digest) {
    collecting_peer_checkpointing(0)
}

/// [`collecting_peer`], checkpointing every `checkpoint_every` rounds.
fn collecting_peer_checkpointing(checkpoint_every: u64) -> (Round, Digest) {
    let cfg = RoundConfig {
        me: 0,
        members: vec![0, 1, 2],
        total_rounds: 10,
        checkpoint_every,
        deadline: DeadlinePolicy { floor_ms: 1_000, ceiling_ms: 5_000, factor: 4.0 },
        start_timeout_ms: 1_000,
        quorum: Quorum::Majority,
    };
    let mut m = Round::new(cfg, Start::Fresh { round: 0 }, 0);
    let d = digest(&[1.0]);
    let mut out = Vec::new();
    for input in [Input::Connected(1), Input::Connected(2), Input::Tick] {
        out.extend(m.handle(0, input));
    }
    assert!(out.iter().any(|a| matches!(a, Action::Compute { round: 0, .. })), "{out:?}");
    let out = m.handle(1, Input::LocalGradient { round: 0, digest: d, grad: vec![1.0; N_PARAMS] });
    assert!(out.iter().any(|a| matches!(a, Action::Broadcast { round: 0, .. })), "{out:?}");
    (m, d)
}

fn msg(round: u64, d: Digest) -> GradientMsg {
    GradientMsg { round, digest: d, samples: 1, loss: 1.0, grad: vec![0.5; N_PARAMS] }
}

fn applied(out: &[Action]) -> Option<Vec<PeerIdx>> {
    out.iter().find_map(|a| match a {
        Action::Apply { inputs, .. } => Some(inputs.iter().map(|(p, _)| *p).collect()),
        _ => None,
    })
}

#[test]
fn a_peer_whose_message_was_refused_is_not_waited_for() {
    let (mut m, d) = collecting_peer();
    assert_eq!(applied(&m.handle(2, Input::Gradient(1, msg(0, d)))), None, "peer 2 is still expected");
    // Peer 2's message failed to decode: collection ends now, long before the deadline.
    let out = m.handle(3, Input::Rejected(2));
    assert!(
        out.iter().any(|a| matches!(a, Action::AnnounceReceived { round: 0, peers, .. } if peers == &[0, 1])),
        "{out:?}"
    );
    // The round closes once peer 1, whose gradient is in, says what it received.
    let out = m.handle(4, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]), "{out:?}");
}

#[test]
fn a_state_asked_for_while_collecting_is_served_before_the_checkpoint_is_written() {
    let (mut m, d) = collecting_peer_checkpointing(1);
    // Its gradient of round 0 is out: a state request waits for the round boundary.
    let out = m.handle(2, Input::StateRequested(2));
    assert!(!out.iter().any(|a| matches!(a, Action::ServeState { .. })), "{out:?}");
    m.handle(3, Input::Gradient(1, msg(0, d)));
    m.handle(3, Input::Disconnected(2));
    let out = m.handle(4, Input::StateRequested(1));
    assert!(!out.iter().any(|a| matches!(a, Action::ServeState { .. })), "{out:?}");
    let out = m.handle(5, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]), "{out:?}");
    let at = |f: &dyn Fn(&Action) -> bool| out.iter().position(f).unwrap_or_else(|| panic!("{out:?}"));
    let apply = at(&|a| matches!(a, Action::Apply { round: 0, .. }));
    let serve = at(&|a| matches!(a, Action::ServeState { to, round: 1, .. } if to == &[1]));
    let checkpoint = at(&|a| matches!(a, Action::Checkpoint { round: 1 }));
    let compute = at(&|a| matches!(a, Action::Compute { round: 1, .. }));
    assert!(apply < serve && serve < checkpoint && checkpoint < compute, "{out:?}");
}

#[test]
fn a_replayed_round_is_dropped_and_its_sender_not_waited_for() {
    let (mut m, d) = collecting_peer();
    // Round 0 from both: the round closes with three contributors.
    m.handle(2, Input::Gradient(2, msg(0, d)));
    m.handle(3, Input::Gradient(1, msg(0, d)));
    m.handle(3, Input::Received(1, 0, vec![0, 1, 2]));
    let out = m.handle(3, Input::Received(2, 0, vec![0, 1, 2]));
    assert_eq!(applied(&out), Some(vec![0, 1, 2]));
    let d1 = digest(&[2.0]);
    m.handle(4, Input::LocalGradient { round: 1, digest: d1, grad: vec![1.0; N_PARAMS] });
    m.handle(5, Input::Gradient(1, msg(1, d1)));
    m.handle(5, Input::Received(1, 1, vec![0, 1]));
    // Peer 2 sends its round-0 message again: dropped, and round 1 closes without it.
    let out = m.handle(6, Input::Gradient(2, msg(0, d)));
    assert_eq!(applied(&out), Some(vec![0, 1]), "{out:?}");
    let ev: Vec<&EventKind> = out
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(&e.kind),
            _ => None,
        })
        .collect();
    assert!(
        ev.iter().any(|e| matches!(e, EventKind::LateGradient { peer: 2, round: 0, current: 1 })),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(e, EventKind::PeerSuspected { peer: 2, waited_ms: 0, .. })), "{ev:?}");
}

/// A peer's lane broke before its gradient of the round arrived: it is asked for again at once
/// (not waited for until the deadline), and the original and the copy both arriving costs it
/// no suspicion; one whose gradient is in already is not asked.
#[test]
fn a_gradient_lost_with_its_link_is_asked_for_again_and_its_copy_is_no_replay() {
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(2, msg(0, d)));
    let out = m.handle(3, Input::LinkLost(1));
    assert!(out.iter().any(|a| matches!(a, Action::RequestResend { round: 0, from: 1 })), "{out:?}");
    assert!(m.handle(3, Input::LinkLost(1)).is_empty(), "asked once");
    let out = m.handle(3, Input::LinkLost(2));
    assert!(
        !out.iter().any(|a| matches!(a, Action::RequestResend { round: 0, .. })),
        "peer 2's is in: {out:?}"
    );
    m.handle(4, Input::Gradient(1, msg(0, d)));
    let out = m.handle(4, Input::Gradient(1, msg(0, d)));
    let suspected = out.iter().any(|a| {
        matches!(
            a,
            Action::Event(Event {
                kind: EventKind::PeerSuspected { .. } | EventKind::LateGradient { .. },
                ..
            })
        )
    });
    assert!(!suspected, "the copy taken for a replay: {out:?}");
    m.handle(5, Input::Received(1, 0, vec![0, 1, 2]));
    let out = m.handle(5, Input::Received(2, 0, vec![0, 1, 2]));
    assert_eq!(applied(&out), Some(vec![0, 1, 2]), "{out:?}");
}

/// A peer a round ahead sends its next gradient as soon as it has applied this round; when
/// the link that gradient was on breaks, this peer, still finishing the round, asks for it.
#[test]
fn a_next_rounds_gradient_lost_with_its_link_is_asked_for_while_this_round_finishes() {
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(1, msg(0, d)));
    m.handle(2, Input::Gradient(2, msg(0, d)));
    // Both gradients of round 0 are in: this round's are not asked for, the next round's are.
    let out = m.handle(3, Input::LinkLost(1));
    let asked: Vec<(u64, PeerIdx)> = out
        .iter()
        .filter_map(|a| match a {
            Action::RequestResend { round, from } => Some((*round, *from)),
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![(1, 1)], "{out:?}");
    // Peer 1 applied round 0 and sent round 1's gradient: the copy arrives early and counts.
    m.handle(4, Input::Received(1, 0, vec![0, 1, 2]));
    let out = m.handle(4, Input::Received(2, 0, vec![0, 1, 2]));
    assert_eq!(applied(&out), Some(vec![0, 1, 2]), "{out:?}");
    let out = m.handle(5, Input::Gradient(1, msg(1, d)));
    assert!(
        !out.iter().any(|a| matches!(
            a,
            Action::Event(Event {
                kind: EventKind::PeerSuspected { .. } | EventKind::LateGradient { .. },
                ..
            })
        )),
        "{out:?}"
    );
    // A gradient of round 1 in, the lost link costs round 1 nothing more.
    let out = m.handle(6, Input::LinkLost(1));
    assert!(!out.iter().any(|a| matches!(a, Action::RequestResend { round: 1, .. })), "{out:?}");
}

/// Events that show a peer paid for a fault: suspected, resynchronised, or waited a deadline.
fn paid_for_a_fault(k: &EventKind) -> bool {
    matches!(
        k,
        EventKind::PeerSuspected { .. }
            | EventKind::Unresponsive { .. }
            | EventKind::Reconcile { .. }
            | EventKind::Synced { .. }
            | EventKind::RoundClosed { timed_out: true, .. }
    )
}

#[test]
fn a_crash_at_any_point_of_a_round_costs_no_live_peer_a_deadline_a_suspicion_or_a_state() {
    let mut split_broadcasts = 0;
    for seed in 0..1_000u64 {
        let mut rng = Rng::new(seed ^ 0x00C0_FFEE);
        let n = 3 + rng.below(3) as u32;
        let mut sim = Sim::new(n, 30, seed);
        let victim = rng.below(n as u64) as u32;
        sim.run_until(40 + rng.below(400));
        // Each round a peer sends n-1 gradients and n-1 lists: crash before any one of them.
        sim.crash_plan = Some((victim, rng.below(2 * (n as u64 - 1) + 1) as u32));
        while sim.peers[victim as usize].alive && sim.step() {}
        assert!(!sim.peers[victim as usize].alive, "seed {seed}: the victim finished before its crash");
        let restarted = rng.below(2) == 0;
        if restarted {
            let t = sim.now + 20 + rng.below(300);
            sim.run_until(t);
            sim.restart(victim);
        }
        sim.run_to_end();
        sim.assert_converged();
        for (i, p) in sim.peers.iter().enumerate() {
            if i as u32 == victim {
                if p.adoptions > 1 {
                    sim.dump();
                }
                assert!(p.adoptions <= 1, "seed {seed}: the victim adopted {} states", p.adoptions);
                continue;
            }
            let paid: Vec<&Event> = p.events.iter().filter(|e| paid_for_a_fault(&e.kind)).collect();
            if !paid.is_empty() {
                sim.dump();
            }
            assert!(paid.is_empty(), "seed {seed}: live peer {i} paid for peer {victim}'s crash: {paid:?}");
            assert_eq!(p.adoptions, 0, "seed {seed}: live peer {i} adopted a state");
            let rounds: Vec<u64> = p.applied_sets.iter().map(|(r, _)| *r).collect();
            assert_eq!(rounds, (0..30).collect::<Vec<_>>(), "seed {seed}: peer {i} applied each round once");
        }
        let unshared = |p: &Peer| count(&p.events, |k| matches!(k, EventKind::Unshared { .. }));
        if sim.peers.iter().any(|p| unshared(p) > 0) {
            split_broadcasts += 1;
        }
    }
    // The seeds do exercise the hard case: a gradient that reached only some survivors.
    assert!(split_broadcasts >= 50, "only {split_broadcasts} seeds split a broadcast");
}

#[test]
fn a_peer_whose_heartbeats_stopped_is_not_waited_for() {
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(1, msg(0, d)));
    // Peer 2 froze (its connection is up): the driver's heartbeats notice after 240 ms.
    let out = m.handle(242, Input::Unresponsive { peer: 2, silent_ms: 240 });
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Event(Event { kind: EventKind::Unresponsive { peer: 2, round: 0, silent_ms: 240 }, .. })
        )),
        "{out:?}"
    );
    assert!(out.iter().any(|a| matches!(a, Action::AnnounceReceived { round: 0, .. })), "{out:?}");
    let out = m.handle(243, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]), "closed long before the 1 s deadline: {out:?}");
    let closed = out.iter().find_map(|a| match a {
        Action::Event(Event { kind: EventKind::RoundClosed { timed_out, .. }, .. }) => Some(*timed_out),
        _ => None,
    });
    assert_eq!(closed, Some(false));
    // When it resumes with a gradient of the current round, it is waited for again.
    let d1 = digest(&[2.0]);
    m.handle(250, Input::LocalGradient { round: 1, digest: d1, grad: vec![1.0; N_PARAMS] });
    m.handle(251, Input::Gradient(2, msg(1, d1)));
    assert_eq!(m.expected(), vec![1, 2]);
}

#[test]
fn a_gradient_only_some_peers_received_is_left_out_by_all() {
    // Peer 2 died mid-broadcast: peer 0 got its gradient, peer 1 did not.
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(1, msg(0, d)));
    m.handle(3, Input::Gradient(2, msg(0, d)));
    m.handle(4, Input::Disconnected(2));
    let out = m.handle(5, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]), "{out:?}");
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Event(Event { kind: EventKind::Unshared { peer: 2, round: 0 }, .. })
        )),
        "{out:?}"
    );
}

#[test]
fn a_peer_that_joined_a_round_already_past_is_not_waited_for_until_it_catches_up() {
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(1, msg(0, d)));
    m.handle(3, Input::Disconnected(2));
    let out = m.handle(4, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]));
    // Peer 2 restarts and joins the current round: it observes it, and is expected from the
    // next one on (one that joins the round before is the case of the test below).
    m.handle(5, Input::Connected(2));
    m.handle(6, Input::Join(2, 1));
    assert_eq!(m.expected(), vec![1], "a joiner is not expected in the round it observes");
    // Its gradient of the current round counts all the same, and shows it caught up.
    m.handle(7, Input::Gradient(2, msg(1, digest(&[2.0]))));
    assert_eq!(m.expected(), vec![1, 2]);
}

#[test]
fn an_announced_joiner_is_waited_for_a_grace_not_a_deadline_until_it_is_in_time() {
    let (mut m, d) = collecting_peer();
    m.handle(2, Input::Gradient(1, msg(0, d)));
    m.handle(3, Input::Disconnected(2));
    let out = m.handle(4, Input::Received(1, 0, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]));
    // Peer 2 restarts, takes a state of round 0 and observes it: it targets round 1.
    m.handle(5, Input::Connected(2));
    m.handle(6, Input::Join(2, 0));
    assert_eq!(m.expected(), vec![1, 2], "a joiner that observed the last round is expected in this one");
    let d1 = digest(&[2.0]);
    m.handle(10, Input::LocalGradient { round: 1, digest: d1, grad: vec![1.0; N_PARAMS] });
    let out = m.handle(12, Input::Gradient(1, msg(1, d1)));
    assert!(
        !out.iter().any(|a| matches!(a, Action::AnnounceReceived { .. })),
        "waits for the joiner: {out:?}"
    );
    assert_eq!(m.next_timer(), Some(12 + JOINER_GRACE_MS), "a grace, not the 1 s deadline");
    // It is not in time: the round closes at the grace, without it, and nobody is suspected.
    let out = m.handle(12 + JOINER_GRACE_MS, Input::Tick);
    assert!(
        out.iter().any(|a| matches!(a, Action::AnnounceReceived { round: 1, peers, .. } if peers == &[0, 1])),
        "{out:?}"
    );
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Event(Event {
                kind: EventKind::JoinerLate { peer: 2, round: 1, waited_ms: JOINER_GRACE_MS },
                ..
            })
        )),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Event(Event { kind: EventKind::PeerSuspected { .. }, .. })))
    );
    let out = m.handle(170, Input::Received(1, 1, vec![0, 1]));
    assert_eq!(applied(&out), Some(vec![0, 1]));
    let closed = out.iter().find_map(|a| match a {
        Action::Event(Event { kind: EventKind::RoundClosed { timed_out, .. }, .. }) => Some(*timed_out),
        _ => None,
    });
    assert_eq!(closed, Some(false), "a joiner's grace is no deadline");
    assert_eq!(m.expected(), vec![1], "not waited for again until it shows it keeps up");
    // Its gradient of round 2 comes in time: from then on it is waited for like any peer.
    m.handle(171, Input::Gradient(2, msg(2, digest(&[3.0]))));
    m.handle(172, Input::Gradient(1, msg(2, digest(&[3.0]))));
    assert_eq!(m.expected(), vec![1, 2]);
    assert!(m.members.values().all(|p| !p.probation));
}

#[test]
fn a_peer_cannot_make_another_hold_lists_of_many_rounds() {
    let (mut m, _) = collecting_peer();
    for round in 0..1_000 {
        m.handle(2, Input::Received(1, round, vec![1]));
    }
    let held: usize = m.lists.values().map(|l| l.len()).sum();
    assert!(held <= 3, "{held} lists held");
}

#[test]
fn a_frozen_peer_is_excluded_at_the_detection_bound_and_a_short_freeze_costs_nothing() {
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed ^ 0x5_7095);
        let n = 3 + rng.below(3) as u32;
        let mut sim = Sim::new(n, 40, seed);
        let k = rng.below(n as u64) as u32;
        sim.run_until(50 + rng.below(300));
        let long = seed % 2 == 0;
        // Detection at 250 ms (the deadline floor here is 300 ms); a short freeze stays below it.
        let (ms, detect) = if long { (1_000 + rng.below(1_000), 250) } else { (10 + rng.below(200), 250) };
        let frozen_at = sim.now;
        sim.freeze(k, ms, detect);
        sim.run_to_end();
        sim.assert_converged();
        for (i, p) in sim.peers.iter().enumerate() {
            let timed_out = count(&p.events, |e| matches!(e, EventKind::RoundClosed { timed_out: true, .. }));
            assert_eq!(timed_out, 0, "seed {seed}: peer {i} waited a deadline");
            if i as u32 == k {
                continue;
            }
            let found: Vec<u64> = p
                .events
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Unresponsive { .. }))
                .map(|e| e.at_ms - frozen_at)
                .collect();
            if long {
                assert!(found.len() <= 1 && found.iter().all(|&t| t <= detect), "seed {seed}: {found:?}");
            } else {
                assert!(found.is_empty(), "seed {seed}");
            }
            assert_eq!(p.adoptions, 0, "seed {seed}: live peer {i} adopted a state");
        }
        if !long {
            // It missed nothing: no state transfer, no suspicion.
            let frozen = &sim.peers[k as usize];
            assert_eq!(frozen.adoptions, 0, "seed {seed}: a short freeze cost a state transfer");
            let suspected = sim
                .peers
                .iter()
                .map(|p| count(&p.events, |e| matches!(e, EventKind::PeerSuspected { .. })))
                .sum::<usize>();
            assert_eq!(suspected, 0, "seed {seed}: someone was suspected");
        }
    }
}

/// Splits `0..n` into `parts` non-empty groups at random.
fn random_groups(rng: &mut Rng, n: u32, parts: u32) -> Vec<Vec<u32>> {
    loop {
        let mut groups = vec![Vec::new(); parts as usize];
        for i in 0..n {
            groups[rng.below(parts as u64) as usize].push(i);
        }
        if groups.iter().all(|g| !g.is_empty()) {
            return groups;
        }
    }
}

/// A partitioned run: the sides, per peer the rounds applied while the cut lasted, and the
/// highest round in progress when it came.
struct Partitioned {
    sim: Sim,
    groups: Vec<Vec<u32>>,
    during: Vec<usize>,
    cut_round: u64,
}

impl Partitioned {
    /// Rounds applied to a model another peer did not apply them to, besides the round in
    /// flight when the cut came (which a side can close on gradients that crossed before it).
    fn splits_after_the_cut(&self) -> Vec<(u32, u64)> {
        self.sim.split.iter().copied().filter(|&(_, r)| r > self.cut_round).collect()
    }
}

/// Partitions at a random point of a run, into two or three sides, healed 2.5–4.5 s later.
fn partitioned_run(seed: u64, quorum: Quorum) -> Partitioned {
    let mut rng = Rng::new(seed ^ 0x009A_2717);
    let n = 3 + rng.below(3) as u32;
    let mut sim = Sim::new(n, 40, seed);
    sim.cfg.quorum = quorum;
    for p in &mut sim.peers {
        p.machine.cfg.quorum = quorum;
    }
    sim.run_until(50 + rng.below(400));
    let parts = if n > 3 && rng.below(4) == 0 { 3 } else { 2 };
    let groups = random_groups(&mut rng, n, parts);
    sim.partition(&groups, 250);
    let cut_round = sim.peers.iter().map(|p| p.machine.round()).max().unwrap_or(0);
    let before: Vec<usize> = sim.peers.iter().map(|p| p.applied_sets.len()).collect();
    let t = sim.now + 2_500 + rng.below(2_000);
    sim.run_until(t);
    let during = sim.peers.iter().zip(&before).map(|(p, b)| p.applied_sets.len() - b).collect();
    sim.heal();
    sim.run_to_end();
    Partitioned { sim, groups, during, cut_round }
}

#[test]
fn only_the_side_of_a_partition_holding_a_quorum_trains_and_the_others_follow_it_after_the_heal() {
    for seed in 0..300u64 {
        let run = partitioned_run(seed, Quorum::Majority);
        let (sim, groups, during) = (&run.sim, &run.groups, &run.during);
        let all: BTreeSet<u32> = (0..sim.peers.len() as u32).collect();
        let quorum_side = |i: u32| {
            groups
                .iter()
                .any(|g| g.contains(&i) && Quorum::Majority.holds(&g.iter().copied().collect(), &all))
        };
        // With no side holding a quorum, every side stops and retries once healed; replicas
        // that close the retried round on different sets are reconciled as after any fault.
        let some_side_holds = (0..sim.peers.len() as u32).any(quorum_side);
        let splits = if some_side_holds { run.splits_after_the_cut() } else { Vec::new() };
        if !splits.is_empty() {
            sim.dump();
        }
        assert!(
            splits.is_empty(),
            "seed {seed} {groups:?}: split brain at {splits:?} (cut in round {})",
            run.cut_round
        );
        sim.assert_converged();
        for g in groups {
            let side: BTreeSet<u32> = g.iter().copied().collect();
            let trained: Vec<usize> = g.iter().map(|&i| during[i as usize]).collect();
            if Quorum::Majority.holds(&side, &all) {
                // It kept training through the cut (the others left its view within 250 ms).
                assert!(
                    trained.iter().all(|&r| r >= 5),
                    "seed {seed} {groups:?}: the quorum side {g:?} {trained:?}"
                );
                for &i in g {
                    assert_eq!(
                        sim.peers[i as usize].adoptions, 0,
                        "seed {seed}: peer {i} of the quorum side adopted"
                    );
                }
            } else {
                // At most the rounds in flight when the cut came (a peer a round behind the
                // others closes its round and the next on gradients that crossed before it).
                if trained.iter().any(|&r| r > 2) {
                    sim.dump();
                }
                assert!(
                    trained.iter().all(|&r| r <= 2),
                    "seed {seed} {groups:?}: the side {g:?} without a quorum {trained:?}"
                );
            }
        }
    }
}

#[test]
fn without_a_quorum_both_sides_of_a_partition_train_and_split() {
    let split = (0..100u64)
        .filter(|&seed| !partitioned_run(seed, Quorum::None).splits_after_the_cut().is_empty())
        .count();
    assert!(split >= 50, "only {split} of 100 partitioned runs split without a quorum");
}

#[test]
fn peers_that_leave_one_after_another_shrink_the_quorum_down_to_the_lowest_index() {
    let mut sim = Sim::new(4, 60, 11);
    for (k, t) in [(3, 600), (2, 1_400), (1, 2_200)] {
        sim.run_until(t);
        sim.kill(k);
    }
    sim.run_to_end();
    sim.assert_converged();
    assert_eq!(count(sim.events_of(0), |k| matches!(k, EventKind::NoQuorum { .. })), 0);
    // Peer 1 alone (the lowest index gone) waits for a quorum instead.
    let mut sim = Sim::new(2, 30, 12);
    sim.run_until(600);
    sim.kill(0);
    sim.run_until(4_000);
    let stalled = sim.peers[1].machine.round();
    assert!(count(sim.events_of(1), |k| matches!(k, EventKind::NoQuorum { .. })) >= 1);
    sim.run_until(8_000);
    assert_eq!(sim.peers[1].machine.round(), stalled, "a peer without a quorum applied a round");
    sim.restart(0);
    sim.run_to_end();
    sim.assert_converged();
}

/// A restart of a random peer of a random cluster at a random point; `slow_ms` is added to
/// the restarted peer's compute time, and a state transfer takes up to `state_ms` longer than
/// other messages. Returns the run, the restarted peer, when it restarted
/// and how many rounds it had computed before.
fn restarted_run(seed: u64, slow_ms: u64, state_ms: u64) -> (Sim, u32, u64, usize) {
    let mut rng = Rng::new(seed ^ 0x00BE_E7A1);
    let n = 3 + rng.below(3) as u32;
    let mut sim = Sim::new(n, 40, seed);
    let k = rng.below(n as u64) as u32;
    sim.run_until(100 + rng.below(400));
    sim.kill(k);
    let t = sim.now + 50 + rng.below(300);
    sim.run_until(t);
    sim.slow_compute.insert(k, slow_ms);
    sim.state_ms = rng.below(state_ms.max(1));
    sim.restart(k);
    let (restarted_at, before) = (sim.now, sim.peers[k as usize].computed.len());
    sim.run_to_end();
    (sim, k, restarted_at, before)
}

#[test]
fn a_restarted_peer_s_first_gradient_counts_in_the_round_it_was_computed_for() {
    // State transfers as fast as any message: always.
    assert_eq!(first_gradients_counted(0), 300);
    // State transfers that take up to about a round (a state is large): the joiner's join
    // announcement can reach a peer after it closed the round, now and then.
    assert!(first_gradients_counted(60) >= 285);
}

/// Of 300 restarts, in how many the restarted peer's first gradient was applied by every
/// live peer in the round it was computed for.
fn first_gradients_counted(state_ms: u64) -> usize {
    let (mut counted, mut runs) = (0, 0);
    let mut latency = Vec::new();
    for seed in 0..300u64 {
        let (sim, k, restarted_at, before) = restarted_run(seed, 0, state_ms);
        sim.assert_converged();
        let Some(observed) = sim.events_of(k).iter().find_map(|e| match e.kind {
            EventKind::Synced { round, from: Some(_) } => Some(round),
            _ => None,
        }) else {
            continue; // it resumed from its own checkpoint (no live peer answered)
        };
        // The round of its first gradient after the restart.
        let Some(&target) = sim.peers[k as usize].computed.get(before) else {
            continue;
        };
        assert!(target > observed, "seed {seed}: it computed {target} after observing {observed}");
        runs += 1;
        // Every live peer applied the round it targets with its gradient in.
        let with_it = sim
            .peers
            .iter()
            .enumerate()
            .filter(|&(i, p)| i as u32 != k && p.alive)
            .all(|(_, p)| p.applied_sets.iter().any(|(r, inputs)| *r == target && inputs.contains(&k)));
        counted += usize::from(with_it);
        // Restart to the first round a live peer applied with its gradient in.
        let first =
            sim.peers.iter().enumerate().filter(|&(i, p)| i as u32 != k && p.alive).find_map(|(_, p)| {
                p.applied_sets
                    .iter()
                    .zip(&p.applied_at)
                    .find(|((_, inputs), t)| **t > restarted_at && inputs.contains(&k))
                    .map(|(_, t)| *t)
            });
        latency.extend(first.map(|t| t - restarted_at));
    }
    latency.sort_unstable();
    eprintln!(
        "state transfers up to {state_ms} ms slower: first gradient counted in {counted} of {runs} restarts; \
         restart to first contribution: median {} ms, max {} ms (simulated)",
        latency[latency.len() / 2],
        latency[latency.len() - 1]
    );
    assert_eq!(runs, 300, "every restart synced from a live peer");
    counted
}

#[test]
fn a_restarted_peer_whose_functions_are_slow_costs_no_live_peer_a_deadline() {
    let mut graces = 0;
    for seed in 0..200u64 {
        let (sim, k, _, _) = restarted_run(seed, 400 + seed % 5 * 200, 60);
        sim.assert_converged();
        for (i, p) in sim.peers.iter().enumerate().filter(|&(i, _)| i as u32 != k) {
            let paid: Vec<&Event> = p
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e.kind,
                        EventKind::RoundClosed { timed_out: true, .. }
                            | EventKind::PeerSuspected { .. }
                            | EventKind::Reconcile { .. }
                    )
                })
                .collect();
            if !paid.is_empty() {
                sim.dump();
            }
            assert!(paid.is_empty(), "seed {seed}: live peer {i} paid for slow joiner {k}: {paid:?}");
            assert_eq!(p.adoptions, 0, "seed {seed}: live peer {i} adopted a state");
            for e in &p.events {
                if let EventKind::JoinerLate { peer, waited_ms, .. } = e.kind {
                    assert_eq!(peer, k, "seed {seed}");
                    assert!(
                        waited_ms <= JOINER_GRACE_MS,
                        "seed {seed}: peer {i} waited {waited_ms} ms for {k}"
                    );
                    graces += 1;
                }
            }
        }
    }
    // The slow joiner was waited for, a grace each time, and left out.
    assert!(graces >= 200, "only {graces} graces ran out");
}
