//! The P2P round protocol as an I/O-free state machine (raft-rs style).
//!
//! A [`Round`] machine is fed [`Input`]s — a connection came or went, a gradient or a join
//! announcement arrived, the local gradient functions finished, a state transfer arrived, time
//! passed — each with the current time in milliseconds, and answers with [`Action`]s for its
//! driver to carry out: compute, broadcast, apply an update, checkpoint, request or serve state,
//! adopt a state, record an event. It owns no socket, clock, file or model; the driver in
//! `peerless-runtime` does, and tests drive it directly with simulated peers.
//!
//! # One round `r`
//! 1. `Compute { round: r }`: the driver invokes its functions; gradients from faster peers that
//!    arrive meanwhile are kept.
//! 2. [`Input::LocalGradient`] → `Broadcast` to every connected peer, then collect.
//! 3. Collection ends when every *expected* peer's gradient for `r` is in, or at the deadline.
//!    Expected = connected, announced as active from a round ≤ `r`, and not suspected; a
//!    joiner on probation (see *Joining*) only [`JOINER_GRACE_MS`] past the others. A peer
//!    whose connection drops leaves at once ([`EventKind::PeerLeft`]); one that is silent at the
//!    deadline, whose message the codec refused, that replayed a round it had sent, or whose
//!    heartbeats stopped ([`Input::Unresponsive`]), is suspected ([`EventKind::PeerSuspected`],
//!    [`EventKind::Unresponsive`]) and not waited for again until it sends a gradient of the
//!    current round (a stale one does not count) or announces a join.
//! 4. **Agreement.** `AnnounceReceived` tells every connected peer which gradients this peer
//!    received (itself included), then it waits for the same announcement from each peer it
//!    received a gradient from (while that peer stays connected and unsuspected). The round's
//!    inputs are the gradients received that *every* announcement heard lists. A peer that dies
//!    mid-broadcast, after some survivors received its gradient and others did not, is thus left
//!    out by all of them, and a gradient that reached every survivor is kept by all of them:
//!    no replica splits, so no live peer has to fetch a state because another one crashed.
//!    The same holds for a straggler whose gradient beat some deadlines and not others, and for
//!    a joiner whose announcement some peers saw before closing and others after
//!    ([`EventKind::Unshared`] records each gradient left out this way).
//! 5. `Apply` with the agreed gradients of the peers that share this peer's model digest,
//!    ordered by peer index, so replicas that saw the same inputs stay bit-identical. (This
//!    peer's own gradient is left out too when another peer did not receive it; when nothing is
//!    agreed, the inputs are empty and the round changes nothing.)
//!
//! # Reconciliation rule
//! Every gradient carries the digest of the parameters it was computed at. When the digests
//! of a round differ (views differed in an earlier round despite the agreement, e.g. two
//! faults in one round, or a peer that resumed from its own checkpoint), the **majority digest
//! wins**: the
//! digest held by the most peers among those heard from, ties broken towards the group with the
//! lowest peer index. Peers of the majority apply the round with only the majority's
//! gradients; a peer in the minority does not apply, but fetches the state (parameters and
//! optimizer state, at the next round boundary) from the lowest-indexed majority peer and
//! re-enters at that round. Adopting a whole replica rather than averaging models keeps the
//! optimizer state consistent with the parameters, makes every replica again bit-identical
//! (which averaging would not), and needs no extra round; the cost is that the minority's last
//! round of work is discarded, which only happens after a fault.
//!
//! # Quorum
//! Crashes and partitions look alike from inside, so with [`Quorum::Majority`] a round is
//! applied only by a side that holds a majority of its *base*: the peers whose gradients the
//! last two applied rounds agreed on (the initial members before the first round); more than
//! half of them, or exactly half including the base's lowest index. The round in flight when
//! a cut comes can close differently on each side (gradients that crossed before it), so
//! one round's contributors alone could give each side a base it holds a majority of; with
//! the round before it, the base at the next round is still the one every side shared, and
//! at most one side holds a majority of it. That side trains on; the others stop at the round
//! boundary ([`EventKind::NoQuorum`]), having applied at most the round in flight, which
//! they discard when they adopt the quorum side's state after the heal. The base follows the
//! membership, a round late, so peers that leave one after another shrink it (4 → 3 → 2 →
//! the lowest-indexed 1) and joiners grow it. A
//! stalled peer serves its state to whoever asks, fetches the state of any peer that shows it
//! is ahead (a gradient or final digest of a later round), and retries its round every
//! deadline while enough of its base is connected again (all stalled: everyone retries; the
//! gradients of the round are taken in anew). [`Quorum::None`] applies whatever a side agrees
//! on: a cut-off minority trains on alone and loses its work when the cut heals.
//!
//! # Joining
//! A new or restarted peer starts in [`Start::Join`]: it asks a connected peer for its state,
//! which that peer sends at once while it is computing its round (no list of that round can
//! be out before its gradient, so the joiner can follow the round), else at its next round
//! boundary; it adopts it (unless its own checkpoint is
//! newer), announces `Join { round }` and enters that round, which it observes (applies what
//! the others agree on without a gradient of its own), so its first computed gradient is of
//! `round + 1`. The others expect it from `round + 1` (when they are not past it), but on
//! *probation*: once every other expected gradient is in, they wait at most
//! [`JOINER_GRACE_MS`] (capped at the deadline) for its gradient, then close the round
//! without it ([`EventKind::JoinerLate`]; no suspicion, not a timed-out round). Its first
//! gradient thus counts in the round it was computed for whenever it is at most a grace
//! slower than the others, and a slow joiner costs them at most a grace, never a deadline.
//! While it syncs it keeps each peer's two newest gradients, so a state that took longer than
//! the rest of its round still leaves it the gradients of the round it observes. When a list
//! of the round after the observed one is in already (a peer closed that round), its gradient
//! of it would be late: it observes that round too and announces `Join` for it, so nobody
//! waits for it there. So it does when a gradient of the round after the state's was in
//! already when it adopted the state: the others were well into that round, and its
//! announcement would reach some of them after they closed it.
//! Probation ends with the first of its gradients that arrives in time for the round being
//! collected; after a missed grace it is not expected until a gradient of a current round
//! arrives (then it is, still on probation). A join for a round more than one behind is no
//! promise: such a joiner is waited for only once a gradient shows it keeps up.
//!
//! # Deadline
//! Adaptive: `clamp(factor × ewma(wait), floor, ceiling)`, where `wait` is the time from this
//! peer's own gradient being ready to the last expected gradient arriving, in rounds that
//! closed complete.

use std::collections::{BTreeMap, BTreeSet};

use crate::flat::Digest;
pub use crate::protocol::{DeadlinePolicy, Event, EventKind, PeerIdx};
use crate::wire::{GradientMsg, StateMsg};

/// How long past the other expected peers a peer that announced a join is waited for in the
/// rounds it is expected in, until one of its gradients arrived in time, ms (at most the
/// deadline). A rejoined peer's first round can be a little slower than the others' (its
/// functions' first work for this process), and the others wait this much for it instead of
/// closing the round the moment the rest is in; one that is slower than that costs them no
/// more and no suspicion.
pub const JOINER_GRACE_MS: u64 = 150;

/// Wait between state requests after one failed, ms.
const RETRY_MS: u64 = 200;

/// A joiner sends its first state request once it is connected to every member, or this long
/// after it started, ms: a peer it is not connected to yet would not send it the gradients of
/// the round it enters, and it could not follow that round.
const JOIN_GRACE_MS: u64 = 100;

/// Static configuration of a peer's round machine.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundConfig {
    /// This peer.
    pub me: PeerIdx,
    /// The run's initial members (this peer included).
    pub members: Vec<PeerIdx>,
    /// Train until this round is done.
    pub total_rounds: u64,
    /// Checkpoint after every this many rounds (0: only at the end).
    pub checkpoint_every: u64,
    /// Round deadline.
    pub deadline: DeadlinePolicy,
    /// How long to wait for the initial members (or, joining, for a live peer) before going
    /// on without them, ms.
    pub start_timeout_ms: u64,
    /// Which side of a partition may apply rounds.
    pub quorum: Quorum,
}

/// Which side of a partition may apply rounds (see the module's *Quorum*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quorum {
    /// A majority of the last applied round's contributors (half with its lowest index).
    #[default]
    Majority,
    /// Every side applies what it agrees on.
    None,
}

impl Quorum {
    /// Whether `side` holds a quorum of `base` (an empty base: any side).
    pub fn holds(self, side: &BTreeSet<PeerIdx>, base: &BTreeSet<PeerIdx>) -> bool {
        let Some(&lowest) = base.first() else { return true };
        let have = side.intersection(base).count();
        match self {
            Quorum::None => true,
            Quorum::Majority => 2 * have > base.len() || (2 * have == base.len() && side.contains(&lowest)),
        }
    }
}

/// How a peer enters the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the rest of the run, at `round` (0, or the round of a checkpoint every member
    /// resumes from), once all initial members are connected or the start timeout passed.
    Fresh {
        /// First round.
        round: u64,
    },
    /// Late or after a restart: fetch the state from a live peer; `own` is the round of this
    /// peer's own checkpoint, used if it is newer or if no peer answers in time.
    Join {
        /// Round of this peer's checkpoint, if it has one.
        own: Option<u64>,
    },
}

/// What happened, as far as the driver can tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An authenticated connection to a peer of the run is up.
    Connected(PeerIdx),
    /// The last connection to a peer closed.
    Disconnected(PeerIdx),
    /// A peer's gradient arrived (already validated by the codec).
    Gradient(PeerIdx, GradientMsg),
    /// A peer sent a message the codec refused (malformed, wrong length, NaN): it is not
    /// waited for again until it sends a valid gradient of the current round.
    Rejected(PeerIdx),
    /// A peer announced it takes part from `round` on.
    Join(PeerIdx, u64),
    /// A peer announced which gradients of `round` it received (ascending, itself included).
    Received(PeerIdx, u64, Vec<PeerIdx>),
    /// A connected peer stopped answering heartbeats `silent_ms` ago (frozen or cut off, with its
    /// connection still up): it is not waited for until it sends a gradient of the current
    /// round or announces a join.
    Unresponsive {
        /// Peer.
        peer: PeerIdx,
        /// Time since it was last heard from, ms.
        silent_ms: u64,
    },
    /// A connection that carried a peer's gradients to this one closed while the peer stays
    /// connected (a tensor lane broke): a gradient of the current round it carried may be
    /// lost, and is asked for again unless it arrived.
    LinkLost(PeerIdx),
    /// A peer asks for this peer's state.
    StateRequested(PeerIdx),
    /// A peer asks for this peer's gradient of `round` again (a joiner that connected after it
    /// went out).
    ResendRequested(PeerIdx, u64),
    /// The state this peer asked for.
    State(PeerIdx, StateMsg),
    /// A state request failed (refused, or the connection broke).
    StateFailed(PeerIdx),
    /// This peer's own functions finished round `round`.
    LocalGradient {
        /// Round.
        round: u64,
        /// Digest of this peer's parameters at that round.
        digest: Digest,
        /// Mean gradient over its batches.
        grad: Vec<f32>,
    },
    /// The digest of this peer's final parameters (the answer to [`Action::Finalize`]).
    FinalDigest(Digest),
    /// A peer's final digest.
    Final(PeerIdx, u64, Digest),
    /// Time passed (the driver calls this at [`Round::next_timer`] at the latest).
    Tick,
    /// This process itself stood still for `ms` (SIGSTOP, a stalled machine), found by the
    /// driver's own timers firing late. Waits in progress are extended by as much, so the
    /// messages that queued up meanwhile are taken in before any deadline passes.
    Paused {
        /// How long, ms.
        ms: u64,
    },
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Compute this peer's gradient for `round` (invoke its functions). `view` is the set of
    /// active members at the start of the round, this peer included (for shard take-over).
    Compute {
        /// Round.
        round: u64,
        /// Active members.
        view: Vec<PeerIdx>,
    },
    /// Send this peer's gradient of `round` to `to`.
    Broadcast {
        /// Round.
        round: u64,
        /// Recipients.
        to: Vec<PeerIdx>,
    },
    /// Aggregate these gradients (ordered by peer index; this peer's included) and take an
    /// optimizer step; the model becomes version `round + 1`.
    Apply {
        /// Round.
        round: u64,
        /// Contributions, ordered by peer index.
        inputs: Vec<(PeerIdx, Vec<f32>)>,
    },
    /// Write a checkpoint of model version `round`.
    Checkpoint {
        /// Model version (rounds done).
        round: u64,
    },
    /// Send the current state (model version `round`) to these peers.
    ServeState {
        /// Recipients.
        to: Vec<PeerIdx>,
        /// Model version being served.
        round: u64,
        /// The peers the next round needs a quorum of ([`StateMsg::base`]).
        base: Vec<PeerIdx>,
    },
    /// Refuse a state request.
    RefuseState {
        /// Requester.
        to: PeerIdx,
        /// Why.
        reason: String,
    },
    /// Ask `from` for its state.
    RequestState {
        /// Peer asked.
        from: PeerIdx,
    },
    /// Ask `from` to send its gradient of `round` again.
    RequestResend {
        /// Round.
        round: u64,
        /// Peer asked.
        from: PeerIdx,
    },
    /// Replace parameters and optimizer state with these.
    Adopt(StateMsg),
    /// Tell `to` which gradients of `round` this peer received (ascending, itself included).
    AnnounceReceived {
        /// Round.
        round: u64,
        /// Peers whose gradients were received.
        peers: Vec<PeerIdx>,
        /// Recipients.
        to: Vec<PeerIdx>,
    },
    /// Tell `to` this peer takes part from `round` on.
    AnnounceJoin {
        /// Round.
        round: u64,
        /// Recipients.
        to: Vec<PeerIdx>,
    },
    /// Record an event.
    Event(Event),
    /// The last round is applied: report the final parameters' digest
    /// ([`Input::FinalDigest`]) so the replicas can check they agree.
    Finalize {
        /// Rounds done.
        round: u64,
    },
    /// Send this peer's final digest to `to`.
    AnnounceFinal {
        /// Rounds done.
        round: u64,
        /// Digest of the final parameters.
        digest: Digest,
        /// Recipients.
        to: Vec<PeerIdx>,
    },
    /// Training is over at model version `round`, and the replicas heard from agree.
    Finished {
        /// Rounds done.
        round: u64,
    },
}

#[derive(Debug, Clone, Default)]
struct Member {
    connected: bool,
    /// First round it contributes to; `None` until it announced itself.
    active_from: Option<u64>,
    /// Silent at a deadline, or sent something refused; not waited for until it sends a
    /// gradient of the current round.
    suspected: bool,
    /// Announced a join and no gradient of it arrived in time since: waited for only
    /// [`JOINER_GRACE_MS`] past the other expected peers.
    probation: bool,
    /// The last [`REPLAY_WINDOW`] rounds it sent a gradient for (reset when it disconnects):
    /// one of them again is a replay. (An older round alone is not: messages arrive out of
    /// order, by many rounds when this process resumes from a SIGSTOP with a backlog. Older
    /// rounds are dropped as late anyway.)
    sent: BTreeSet<u64>,
}

/// Rounds remembered per peer to recognise replays.
const REPLAY_WINDOW: usize = 8;

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Starting {
        since: u64,
    },
    /// Fetching a state: `asked` (since `asked_at`) is the peer asked, if any.
    Syncing {
        since: u64,
        asked: Option<PeerIdx>,
        asked_at: u64,
        tried: BTreeSet<PeerIdx>,
    },
    Computing,
    /// A joiner's first round: not computing, only waiting for the others' gradients and
    /// lists to apply what they applied (its own view of who takes part is not known yet).
    Observing {
        since: u64,
        /// Gradients every list names were missing and their senders were asked again.
        asked: bool,
    },
    Collecting {
        since: u64,
        /// When every expected gradient but those of peers on probation was in.
        others_in: Option<u64>,
    },
    /// Collection ended (`timed_out`: at the deadline); waiting for the other peers' lists of
    /// gradients received.
    Agreeing {
        since: u64,
        timed_out: bool,
    },
    /// The round's agreed contributors were no quorum of the base: not applied; waiting for a
    /// peer that is ahead, or for enough of the base to retry the round.
    Stalled {
        since: u64,
    },
    /// All rounds applied; comparing final digests (a view that differed in the last round
    /// has no next round to show it).
    Finalizing {
        since: u64,
        mine: Option<Digest>,
    },
    Done,
}

/// The round state machine of one peer.
#[derive(Debug)]
pub struct Round {
    cfg: RoundConfig,
    start: Start,
    round: u64,
    phase: Phase,
    members: BTreeMap<PeerIdx, Member>,
    mine: Option<(Digest, Vec<f32>)>,
    received: BTreeMap<PeerIdx, GradientMsg>,
    /// Per round, the gradients each peer said it received ([`Input::Received`]).
    lists: BTreeMap<u64, BTreeMap<PeerIdx, Vec<PeerIdx>>>,
    /// Gradients for the next round that arrived early, by sender and round (while syncing:
    /// each peer's two newest, so a joiner whose state took longer than the rest of that
    /// state's round still holds the round's gradients it observes).
    early: BTreeMap<(PeerIdx, u64), GradientMsg>,
    pending_state: Vec<PeerIdx>,
    finals: BTreeMap<PeerIdx, Digest>,
    final_digest: Option<Digest>,
    wait_ewma_ms: Option<f64>,
    /// The next round started is observed, not computed (set when a state was adopted).
    observe_next: bool,
    /// A state was adopted while a gradient of the round after the state's was in already:
    /// the others were well into that round.
    entered_late: bool,
    /// Gradients asked for again (peer, round): a second copy of one is not a replay.
    resends: BTreeSet<(PeerIdx, u64)>,
    /// The contributors of the last two rounds applied (the initial members before), whose
    /// union is the base a round needs a quorum of.
    contributed: [BTreeSet<PeerIdx>; 2],
    out: Vec<Action>,
}

impl Round {
    /// A machine at time `now_ms`. Call [`Round::handle`] with [`Input::Tick`] to get going.
    pub fn new(cfg: RoundConfig, start: Start, now_ms: u64) -> Round {
        let members = cfg.members.iter().filter(|&&p| p != cfg.me).map(|&p| (p, Member::default())).collect();
        let initial: BTreeSet<PeerIdx> = cfg.members.iter().copied().collect();
        let (round, phase) = match start {
            Start::Fresh { round } => (round, Phase::Starting { since: now_ms }),
            Start::Join { own } => (
                own.unwrap_or(0),
                Phase::Syncing { since: now_ms, asked: None, asked_at: now_ms, tried: BTreeSet::new() },
            ),
        };
        Round {
            cfg,
            start,
            round,
            phase,
            members,
            mine: None,
            received: BTreeMap::new(),
            lists: BTreeMap::new(),
            early: BTreeMap::new(),
            pending_state: Vec::new(),
            finals: BTreeMap::new(),
            final_digest: None,
            wait_ewma_ms: None,
            observe_next: false,
            entered_late: false,
            resends: BTreeSet::new(),
            contributed: [initial.clone(), initial],
            out: Vec::new(),
        }
    }

    /// The round in progress (= the model version this peer holds).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Whether training is over.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether this peer is fetching a state.
    pub fn is_syncing(&self) -> bool {
        matches!(self.phase, Phase::Syncing { .. })
    }

    /// The deadline in force, ms.
    pub fn deadline_ms(&self) -> u64 {
        self.cfg.deadline.deadline_ms(self.wait_ewma_ms)
    }

    /// Peers expected to contribute to the current round (this peer excluded).
    pub fn expected(&self) -> Vec<PeerIdx> {
        self.expected_at(self.round)
    }

    /// Connected peers of the run.
    pub fn connected(&self) -> Vec<PeerIdx> {
        self.members.iter().filter(|(_, m)| m.connected).map(|(&p, _)| p).collect()
    }

    /// When the driver must call [`Input::Tick`] next, ms (driver time), if any.
    pub fn next_timer(&self) -> Option<u64> {
        match &self.phase {
            Phase::Starting { since } => Some(since + self.cfg.start_timeout_ms),
            Phase::Syncing { since, asked: None, asked_at, tried } => {
                Some(asked_at + self.retry_pause_ms(*since, *asked_at, tried).max(1))
            }
            Phase::Syncing { asked_at, .. } => Some(asked_at + self.state_timeout_ms()),
            Phase::Collecting { since, others_in: Some(at) } => {
                Some((since + self.deadline_ms()).min(at + self.joiner_grace_ms()))
            }
            Phase::Collecting { since, .. }
            | Phase::Observing { since, .. }
            | Phase::Stalled { since }
            | Phase::Finalizing { since, mine: Some(_) } => Some(since + self.deadline_ms()),
            Phase::Agreeing { since, .. } => Some(since + self.agreement_timeout_ms()),
            Phase::Computing | Phase::Finalizing { mine: None, .. } | Phase::Done => None,
        }
    }

    /// How long a state request may go unanswered before another peer is asked: the peer
    /// asked answers at its next round boundary, which is at most a deadline away.
    fn state_timeout_ms(&self) -> u64 {
        2 * self.cfg.deadline.ceiling_ms + self.cfg.start_timeout_ms
    }

    /// How long a syncing peer waits before asking (again) for a state: for its first request,
    /// until it is connected to every member (at most [`JOIN_GRACE_MS`]); then a retry pause.
    fn retry_pause_ms(&self, since: u64, asked_at: u64, tried: &BTreeSet<PeerIdx>) -> u64 {
        let all_connected = self.members.values().all(|m| m.connected);
        match tried.is_empty() && asked_at == since {
            true if all_connected => 0,
            true => JOIN_GRACE_MS.min(self.cfg.start_timeout_ms),
            false => RETRY_MS.min(self.cfg.start_timeout_ms).max(1),
        }
    }

    /// How long a peer on probation is waited for past the others, ms.
    fn joiner_grace_ms(&self) -> u64 {
        JOINER_GRACE_MS.min(self.deadline_ms())
    }

    /// How long to wait for a peer's list of gradients received: it sends it when its own
    /// collection ends, at most a deadline after its gradient was ready.
    fn agreement_timeout_ms(&self) -> u64 {
        2 * self.deadline_ms()
    }

    fn expected_at(&self, round: u64) -> Vec<PeerIdx> {
        self.members
            .iter()
            .filter(|(_, m)| m.connected && !m.suspected && m.active_from.is_some_and(|a| a <= round))
            .map(|(&p, _)| p)
            .collect()
    }

    /// The peers a round needs a quorum of: the contributors of the last two rounds applied.
    fn base(&self) -> BTreeSet<PeerIdx> {
        self.contributed[0].union(&self.contributed[1]).copied().collect()
    }

    /// [`Round::base`], ascending.
    fn base_list(&self) -> Vec<PeerIdx> {
        self.base().into_iter().collect()
    }

    /// Whether a connection to `p` is up (only a connection makes a peer connected).
    fn is_connected(&self, p: PeerIdx) -> bool {
        self.members.get(&p).is_some_and(|m| m.connected)
    }

    fn event(&mut self, now: u64, kind: EventKind) {
        self.out.push(Action::Event(Event { at_ms: now, kind }));
    }

    fn member(&mut self, p: PeerIdx) -> &mut Member {
        self.members.entry(p).or_default()
    }

    /// Feeds one input at driver time `now_ms`; returns the actions to carry out, in order.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Action> {
        let now = now_ms;
        match input {
            Input::Connected(p) if p != self.cfg.me => {
                let starting = matches!(self.phase, Phase::Starting { .. });
                let round = self.round;
                let m = self.member(p);
                m.connected = true;
                if starting {
                    // Initial members take part from the first round.
                    m.active_from = Some(round);
                }
            }
            Input::Disconnected(p) if p != self.cfg.me => {
                let m = self.member(p);
                let was = m.connected;
                m.connected = false;
                // It must announce itself again (a restarted peer syncs first).
                m.active_from = None;
                m.suspected = false;
                m.probation = false;
                m.sent.clear();
                self.pending_state.retain(|&q| q != p);
                if was {
                    self.event(now, EventKind::PeerLeft { peer: p, round: self.round });
                }
                if let Phase::Syncing { asked, asked_at, .. } = &mut self.phase
                    && *asked == Some(p)
                {
                    *asked = None;
                    *asked_at = now;
                }
            }
            Input::Join(p, round) if p != self.cfg.me && self.is_connected(p) => {
                // A joiner enters `round` (observing it when it took a live peer's state) and
                // computes the rounds after it: it is expected from `round + 1` on, but on
                // probation, waited for only a grace past the others until one of its
                // gradients arrives in time, as its first round may be slower. Its gradients of
                // `round` count when they arrive in time. A join for a round more than one
                // behind this peer's is no promise of being in time for any round here: it is
                // waited for once a gradient shows it keeps up. (A gradient of it that came in
                // time before the announcement made it active already: that stands.)
                // It sends every round from `round` on anew (a retry after a stall included).
                let here = self.round;
                let m = self.member(p);
                m.suspected = false;
                if m.probation || m.active_from.is_none_or(|a| a < round) {
                    m.active_from = (round + 1 >= here).then_some(round + 1);
                    m.probation = true;
                }
                m.sent.retain(|&r| r < round);
                self.event(now, EventKind::PeerJoined { peer: p, round });
            }
            Input::Gradient(p, g) if p != self.cfg.me && self.is_connected(p) => self.on_gradient(now, p, g),
            Input::Rejected(p) if p != self.cfg.me => self.suspect_now(now, p),
            Input::Received(p, round, peers) if p != self.cfg.me && round >= self.round => {
                self.keep_list(p, round, peers)
            }
            Input::LinkLost(p) if p != self.cfg.me => self.on_link_lost(p),
            Input::Unresponsive { peer, silent_ms } if peer != self.cfg.me => {
                let round = self.round;
                let m = self.member(peer);
                if m.connected && !m.suspected {
                    m.suspected = true;
                    self.event(now, EventKind::Unresponsive { peer, round, silent_ms });
                }
            }
            Input::StateRequested(p) => match self.phase {
                // Once this peer's gradient of the round is out, another peer's list of the
                // round may be out too, sent before the requester was connected: it could not
                // follow the round, so it gets the state at the boundary. Before, every list
                // of the round still waits for this peer's gradient (which the requester gets),
                // so the state of the round in progress is served at once.
                Phase::Observing { .. } | Phase::Collecting { .. } | Phase::Agreeing { .. } => {
                    if !self.pending_state.contains(&p) {
                        self.pending_state.push(p);
                    }
                }
                Phase::Computing
                | Phase::Starting { .. }
                | Phase::Stalled { .. }
                | Phase::Finalizing { .. }
                | Phase::Done => self.out.push(Action::ServeState {
                    to: vec![p],
                    round: self.round,
                    base: self.base_list(),
                }),
                Phase::Syncing { .. } => self.out.push(Action::RefuseState {
                    to: p,
                    reason: "this peer is itself fetching a state".into(),
                }),
            },
            Input::State(p, s) => self.on_state(now, p, s),
            // Its own gradient of this round or the last, which the driver still holds.
            Input::ResendRequested(p, round)
                if p != self.cfg.me && round <= self.round && round + 1 >= self.round =>
            {
                self.out.push(Action::Broadcast { round, to: vec![p] })
            }
            Input::StateFailed(p) => {
                if let Phase::Syncing { asked, asked_at, .. } = &mut self.phase
                    && *asked == Some(p)
                {
                    *asked = None;
                    *asked_at = now;
                }
            }
            Input::LocalGradient { round, digest, grad } => {
                if round == self.round && self.phase == Phase::Computing {
                    self.mine = Some((digest, grad));
                    let to = self.connected();
                    self.out.push(Action::Broadcast { round, to });
                    self.phase = Phase::Collecting { since: now, others_in: None };
                }
            }
            Input::FinalDigest(d) => {
                if let Phase::Finalizing { mine: mine @ None, .. } = &mut self.phase {
                    *mine = Some(d);
                    self.final_digest = Some(d);
                    let to = self.connected();
                    self.out.push(Action::AnnounceFinal { round: self.round, digest: d, to });
                }
            }
            Input::Final(p, round, d) if p != self.cfg.me && round == self.cfg.total_rounds => {
                let known = self.finals.insert(p, d);
                match self.phase {
                    Phase::Done if known != Some(d) && self.final_digest != Some(d) => {
                        // A replica that ended differently: compare again.
                        if let Some(mine) = self.final_digest {
                            self.out.push(Action::AnnounceFinal { round, digest: mine, to: vec![p] });
                        }
                        self.decide_final(now);
                    }
                    Phase::Computing
                    | Phase::Observing { .. }
                    | Phase::Collecting { .. }
                    | Phase::Agreeing { .. }
                    | Phase::Starting { .. }
                        if self.round + 1 < round =>
                    {
                        // The sender finished while this peer is more than a round behind.
                        let r = self.round;
                        self.event(now, EventKind::Reconcile { round: r, from: p, reason: "behind".into() });
                        self.begin_sync(now, p);
                    }
                    Phase::Stalled { .. } => {
                        // The side with the quorum finished.
                        let r = self.round;
                        self.event(
                            now,
                            EventKind::Reconcile { round: r, from: p, reason: "no quorum".into() },
                        );
                        self.begin_sync(now, p);
                    }
                    _ => {}
                }
            }
            Input::Tick => {}
            Input::Paused { ms } => self.extend_waits(now, ms),
            // Inputs about this peer itself, lists of rounds already closed, and a join or a
            // gradient from a peer that has disconnected since (a message delivered after the
            // disconnection: the peer is gone, whatever it said last) are ignored.
            Input::Connected(_)
            | Input::Disconnected(_)
            | Input::Join(..)
            | Input::Gradient(..)
            | Input::Rejected(_)
            | Input::Received(..)
            | Input::ResendRequested(..)
            | Input::LinkLost(_)
            | Input::Unresponsive { .. }
            | Input::Final(..) => {}
        }
        self.advance(now);
        std::mem::take(&mut self.out)
    }

    /// Moves the start of the wait in progress `ms` later (this process was paused).
    fn extend_waits(&mut self, now: u64, ms: u64) {
        match &mut self.phase {
            Phase::Collecting { since, others_in } => {
                *since += ms;
                if let Some(at) = others_in {
                    *at += ms;
                }
            }
            Phase::Starting { since }
            | Phase::Stalled { since }
            | Phase::Observing { since, .. }
            | Phase::Agreeing { since, .. }
            | Phase::Finalizing { since, .. } => *since += ms,
            Phase::Syncing { since, asked_at, .. } => {
                *since += ms;
                *asked_at += ms;
            }
            Phase::Computing | Phase::Done => {}
        }
        let round = self.round;
        self.event(now, EventKind::Paused { round, ms });
    }

    /// `p` sent something refused: it is not waited for from now on.
    fn suspect_now(&mut self, now: u64, p: PeerIdx) {
        let round = self.round;
        let m = self.member(p);
        if !m.suspected {
            m.suspected = true;
            self.event(now, EventKind::PeerSuspected { peer: p, round, waited_ms: 0 });
        }
    }

    /// `p`'s link for gradients broke, and with it any gradient of `p`'s in flight on it: the
    /// gradient of this round, while this round's are still being gathered and `p`'s has not
    /// arrived, and that of the next round, which `p` sends as soon as it has applied this
    /// one (it may be a round ahead), are asked for again unless they are in. `p` sends a
    /// copy if it holds that gradient and ignores the request otherwise (it then sends the
    /// gradient when computed, as to everyone); the copy, should the original turn up after
    /// all, is not taken for a replay.
    fn on_link_lost(&mut self, p: PeerIdx) {
        if !self.is_connected(p) {
            return;
        }
        let r = self.round;
        let gathering = matches!(self.phase, Phase::Computing | Phase::Collecting { .. });
        let sent = |round| self.members.get(&p).is_some_and(|m| m.sent.contains(&round));
        let ask_now = gathering && !self.received.contains_key(&p) && !sent(r);
        let ask_next = !sent(r + 1);
        for (round, ask) in [(r, ask_now), (r + 1, ask_next)] {
            if ask && self.resends.insert((p, round)) {
                self.out.push(Action::RequestResend { round, from: p });
            }
        }
    }

    fn on_gradient(&mut self, now: u64, p: PeerIdx, g: GradientMsg) {
        let current = g.round >= self.round;
        let m = self.member(p);
        // A peer sends each round's gradient once: a second one is a replay, dropped, and its
        // sender is not waited for.
        if m.sent.contains(&g.round) {
            if self.resends.remove(&(p, g.round)) {
                return; // the copy asked for, after the original arrived after all
            }
            let r = self.round;
            self.event(now, EventKind::LateGradient { peer: p, round: g.round, current: r });
            self.suspect_now(now, p);
            return;
        }
        m.sent.insert(g.round);
        if m.sent.len() > REPLAY_WINDOW {
            m.sent.pop_first();
        }
        // Only a gradient for this round or later shows the sender keeps up: a stale one (a
        // straggler's, or a replay) does not lift a suspicion, so nobody waits for it again.
        // Nor does it make a peer that is not waited for (a joiner, one catching up) active:
        // it may be fetching a state right now.
        if current {
            m.suspected = false;
            if m.active_from.is_none_or(|a| a > g.round) {
                m.active_from = Some(g.round);
            }
        }
        let r = self.round;
        match self.phase {
            Phase::Done | Phase::Finalizing { mine: Some(_), .. } => {
                // The sender is still training: tell it training is over, so it catches up.
                if let Some(digest) = self.final_digest {
                    self.out.push(Action::AnnounceFinal { round: r, digest, to: vec![p] });
                }
            }
            _ if g.round < r => {
                self.event(now, EventKind::LateGradient { peer: p, round: g.round, current: r })
            }
            Phase::Stalled { .. } if g.round > r => {
                // The side with the quorum went on: follow it.
                self.event(now, EventKind::Reconcile { round: r, from: p, reason: "no quorum".into() });
                self.begin_sync(now, p);
            }
            Phase::Computing | Phase::Observing { .. } | Phase::Collecting { .. } if g.round == r => {
                // In time: a joiner is waited for like any peer from now on.
                self.member(p).probation = false;
                self.received.entry(p).or_insert(g);
            }
            Phase::Agreeing { .. } if g.round == r => {
                // This peer's list is out: the gradient is too late for this round.
                self.event(now, EventKind::LateGradient { peer: p, round: g.round, current: r })
            }
            Phase::Starting { .. } | Phase::Syncing { .. } | Phase::Stalled { .. } if g.round == r => {
                self.early.entry((p, g.round)).or_insert(g);
            }
            _ if g.round == r + 1 => {
                self.early.entry((p, g.round)).or_insert(g);
            }
            Phase::Syncing { .. } => {
                // The round this peer will enter is not known yet: keep each peer's two newest.
                self.early.entry((p, g.round)).or_insert(g);
                while self.early.range((p, 0)..=(p, u64::MAX)).count() > 2 {
                    let oldest = *self.early.range((p, 0)..).next().expect("counted").0;
                    self.early.remove(&oldest);
                }
            }
            _ => {
                // The sender is more than a round ahead: this peer fell behind.
                self.event(now, EventKind::Reconcile { round: r, from: p, reason: "behind".into() });
                self.begin_sync(now, p);
            }
        }
    }

    fn on_state(&mut self, now: u64, p: PeerIdx, s: StateMsg) {
        let Phase::Syncing { .. } = self.phase else { return };
        let own = match self.start {
            Start::Join { own: Some(o) } => Some(o),
            _ => None,
        };
        if own.is_some_and(|o| o > s.round) {
            // This peer's own checkpoint is newer than what the live peer has.
            self.enter(now, self.round, None);
            return;
        }
        let round = s.round;
        // The state's base comes with it: this peer's own may be stale (it was away).
        if !s.base.is_empty() {
            let base: BTreeSet<PeerIdx> = s.base.iter().copied().collect();
            self.contributed = [base.clone(), base];
        }
        self.out.push(Action::Adopt(s));
        self.enter(now, round, Some(p));
    }

    fn begin_sync(&mut self, now: u64, from: PeerIdx) {
        self.mine = None;
        self.received.clear();
        self.lists.clear();
        self.resends.clear();
        self.out.push(Action::RequestState { from });
        self.phase =
            Phase::Syncing { since: now, asked: Some(from), asked_at: now, tried: BTreeSet::from([from]) };
    }

    /// Enters `round` after a sync (or from the own checkpoint) and announces it.
    fn enter(&mut self, now: u64, round: u64, from: Option<PeerIdx>) {
        // The own checkpoint only competes with the first state fetched.
        self.start = Start::Fresh { round };
        self.round = round;
        self.mine = None;
        self.received.clear();
        self.early.retain(|&(_, r), _| r >= round);
        self.event(now, EventKind::Synced { round, from });
        let to = self.connected();
        self.out.push(Action::AnnounceJoin { round, to });
        // Peers heard from in this round are active; the one served from certainly is.
        if let Some(p) = from {
            let m = self.member(p);
            m.active_from = Some(m.active_from.map_or(round, |a| a.min(round)));
        }
        // With a live peer's state, the first round is observed: this peer does not know yet
        // which peers take part, so a list of its own could leave out a gradient the others
        // keep. It applies what they agree on, then takes part from the next round.
        self.observe_next = from.is_some();
        self.entered_late = from.is_some() && self.early.keys().any(|&(_, r)| r == round + 1);
        self.start_round(now, true);
    }

    fn start_round(&mut self, now: u64, log: bool) {
        if self.round >= self.cfg.total_rounds {
            self.phase = Phase::Finalizing { since: now, mine: None };
            self.out.push(Action::Finalize { round: self.round });
            return;
        }
        let r = self.round;
        self.lists.retain(|&round, _| round >= r);
        let early = std::mem::take(&mut self.early);
        for ((p, _), g) in early {
            if g.round == r {
                self.received.insert(p, g);
            } else if g.round == r + 1 {
                self.early.insert((p, g.round), g);
            }
        }
        self.mine = None;
        let mut view = self.expected_at(r);
        view.push(self.cfg.me);
        view.sort_unstable();
        if log {
            self.event(now, EventKind::Entered { round: r, view: view.clone() });
        }
        if std::mem::take(&mut self.observe_next) {
            self.phase = Phase::Observing { since: now, asked: false };
            return;
        }
        self.phase = Phase::Computing;
        self.out.push(Action::Compute { round: r, view });
    }

    /// An observed round closes once every peer this peer has a gradient from sent its list:
    /// it applies the gradients every list names. One every list names that it lacks (sent
    /// before it connected) it asks its sender for again; still lacking one at the deadline, it
    /// cannot follow and fetches a state again. Nothing heard by the deadline: it computes the
    /// round after all. When a list of the next round is in already, it observes that one too.
    fn observe(&mut self, now: u64, since: u64, asked: bool) {
        let late = now >= since + self.deadline_ms();
        let Some((named, first)) = self.named_by_every_list() else {
            if late {
                self.start_round(now, false);
            }
            return;
        };
        let missing: Vec<PeerIdx> =
            named.iter().copied().filter(|p| !self.received.contains_key(p)).collect();
        if !missing.is_empty() {
            let r = self.round;
            if late {
                self.event(now, EventKind::Reconcile { round: r, from: first, reason: "behind".into() });
                self.begin_sync(now, first);
            } else if !asked {
                let connected: Vec<PeerIdx> = missing.into_iter().filter(|&p| self.is_connected(p)).collect();
                for from in connected {
                    self.resends.insert((from, r));
                    self.out.push(Action::RequestResend { round: r, from });
                }
                self.phase = Phase::Observing { since, asked: true };
            }
            return;
        }
        let agreed: Vec<(PeerIdx, GradientMsg)> =
            std::mem::take(&mut self.received).into_iter().filter(|(p, _)| named.contains(p)).collect();
        // The state adopted is the majority's: apply the majority's gradients.
        let mut groups: BTreeMap<Digest, Vec<PeerIdx>> = BTreeMap::new();
        for (p, g) in &agreed {
            groups.entry(g.digest).or_default().push(*p);
        }
        let inputs = match groups.is_empty() {
            true => Vec::new(),
            false => self.same_digest(now, agreed, majority(&groups).0),
        };
        // A peer that already sent its list of the next round closed it: this peer's gradient of
        // it would come too late (its state took longer than the round), so it observes that
        // one too and computes from the round the others are in. So it does when the others
        // were computing the next round already when it adopted the state: its announcement
        // reaches them late in that round, after some closed it. It says so, so that nobody
        // waits for its gradient of that round, and they expect it in the one after.
        let next = self.round + 1;
        let entered_late = std::mem::take(&mut self.entered_late);
        self.observe_next = self.lists.get(&next).is_some_and(|l| !l.is_empty()) || entered_late;
        if self.observe_next {
            let to = self.connected();
            self.out.push(Action::AnnounceJoin { round: next, to });
        }
        self.apply_round(now, inputs, false);
    }

    /// Once every peer this peer has a gradient from sent its list of the current round: the
    /// peers every list names, and the lowest-indexed sender.
    fn named_by_every_list(&self) -> Option<(BTreeSet<PeerIdx>, PeerIdx)> {
        let lists = self.lists.get(&self.round)?;
        let first = *self.received.keys().next()?;
        let heard: Vec<&Vec<PeerIdx>> = self.received.keys().map(|q| lists.get(q)).collect::<Option<_>>()?;
        let named = heard[0].iter().copied().filter(|p| heard.iter().all(|l| l.binary_search(p).is_ok()));
        Some((named.collect(), first))
    }

    /// The gradients of `received` computed at `digest`; the others are recorded as excluded.
    fn same_digest(
        &mut self,
        now: u64,
        received: impl IntoIterator<Item = (PeerIdx, GradientMsg)>,
        digest: Digest,
    ) -> Vec<(PeerIdx, Vec<f32>)> {
        let r = self.round;
        let mut inputs = Vec::new();
        for (p, g) in received {
            if g.digest == digest {
                inputs.push((p, g.grad));
            } else {
                self.event(now, EventKind::Excluded { peer: p, round: r });
            }
        }
        inputs
    }

    /// Moves on where inputs allow: starts, gives up waiting, closes rounds.
    fn advance(&mut self, now: u64) {
        let state_timeout = self.state_timeout_ms();
        let pause = match &self.phase {
            Phase::Syncing { since, asked_at, tried, .. } => self.retry_pause_ms(*since, *asked_at, tried),
            _ => 0,
        };
        match &mut self.phase {
            Phase::Starting { since } => {
                let all = self.members.values().all(|m| m.connected);
                if all || now >= *since + self.cfg.start_timeout_ms {
                    self.start_round(now, true);
                }
            }
            Phase::Syncing { since, asked, asked_at, tried } => {
                if asked.is_some() && now >= *asked_at + state_timeout {
                    // No answer: ask someone else.
                    *asked = None;
                    *asked_at = now;
                }
                if asked.is_none() && now >= *asked_at + pause {
                    let candidates: Vec<PeerIdx> =
                        self.members.iter().filter(|(_, m)| m.connected).map(|(&p, _)| p).collect();
                    let pick = candidates.iter().find(|p| !tried.contains(p)).copied();
                    if let Some(p) = pick {
                        *asked = Some(p);
                        *asked_at = now;
                        tried.insert(p);
                        self.out.push(Action::RequestState { from: p });
                    } else if now >= *since + self.cfg.start_timeout_ms {
                        // Nobody to ask, or everyone refused (they are syncing too): go on
                        // from this peer's own state (its checkpoint when joining, from
                        // scratch without one). Differing replicas reconcile a round later.
                        self.enter(now, self.round, None);
                    } else {
                        // Ask everyone again after the retry pause.
                        tried.clear();
                        *asked_at = now;
                    }
                }
            }
            Phase::Collecting { since, others_in } => {
                let (since, others_in) = (*since, *others_in);
                let (joiners, missing): (Vec<PeerIdx>, Vec<PeerIdx>) = self
                    .expected()
                    .into_iter()
                    .filter(|p| !self.received.contains_key(p))
                    .partition(|p| self.members.get(p).is_some_and(|m| m.probation));
                let waited = now.saturating_sub(since);
                if missing.is_empty() && joiners.is_empty() {
                    DeadlinePolicy::observe(&mut self.wait_ewma_ms, waited);
                    self.end_collection(now, false);
                } else if missing.is_empty() {
                    // Only joiners on probation are missing: a grace for them, not a deadline.
                    let at = others_in.unwrap_or(now);
                    if now >= at + self.joiner_grace_ms() || waited >= self.deadline_ms() {
                        DeadlinePolicy::observe(&mut self.wait_ewma_ms, at.saturating_sub(since));
                        self.leave_out(now, joiners, now - at);
                        self.end_collection(now, false);
                    } else if others_in.is_none() {
                        self.phase = Phase::Collecting { since, others_in: Some(now) };
                    }
                } else if waited >= self.deadline_ms() {
                    self.suspect_all(now, missing, waited);
                    self.leave_out(now, joiners, waited);
                    self.end_collection(now, true);
                } else if others_in.is_some() {
                    // Another peer is expected again (one that was suspected sent a gradient of
                    // the round): the deadline holds, not a joiner's grace.
                    self.phase = Phase::Collecting { since, others_in: None };
                }
            }
            Phase::Agreeing { since, timed_out } => {
                let (since, timed_out) = (*since, *timed_out);
                let missing = self.awaited_lists();
                let waited = now.saturating_sub(since);
                if missing.is_empty() {
                    self.close_round(now, timed_out);
                } else if waited >= self.agreement_timeout_ms() {
                    self.suspect_all(now, missing, waited);
                    self.close_round(now, true);
                }
            }
            Phase::Finalizing { since, mine: Some(_) } => {
                let since = *since;
                // Wait for the final digest of every connected peer, up to a deadline.
                let missing = self.connected().iter().any(|p| !self.finals.contains_key(p));
                if !missing || now >= since + self.deadline_ms() {
                    self.decide_final(now);
                }
            }
            Phase::Observing { since, asked } => {
                let (since, asked) = (*since, *asked);
                self.observe(now, since, asked);
            }
            Phase::Stalled { since } => {
                if now >= *since + self.deadline_ms() {
                    self.retry_stalled(now);
                }
            }
            Phase::Computing | Phase::Finalizing { mine: None, .. } | Phase::Done => {}
        }
    }

    /// Compares this peer's final digest with those of the connected peers: done when it is
    /// the majority's, else fetch the majority's state.
    fn decide_final(&mut self, now: u64) {
        let Some(mine) = self.final_digest else { return };
        let mut groups: BTreeMap<Digest, Vec<PeerIdx>> = BTreeMap::new();
        groups.entry(mine).or_default().push(self.cfg.me);
        for p in self.connected() {
            if let Some(d) = self.finals.get(&p) {
                groups.entry(*d).or_default().push(p);
            }
        }
        let (majority, from) = majority(&groups);
        if majority == mine {
            if self.phase != Phase::Done {
                self.phase = Phase::Done;
                self.out.push(Action::Finished { round: self.round });
            }
        } else {
            let r = self.round;
            self.event(now, EventKind::Reconcile { round: r, from, reason: "minority final digest".into() });
            self.final_digest = None;
            self.begin_sync(now, from);
        }
    }

    /// Joiners on probation whose gradient did not come within their grace (`waited_ms` past
    /// the others): the round closes without them, and they are not suspected but waited for
    /// again (on probation) once a gradient of the current round shows they keep up.
    fn leave_out(&mut self, now: u64, joiners: Vec<PeerIdx>, waited_ms: u64) {
        let round = self.round;
        for p in joiners {
            self.member(p).active_from = None;
            self.event(now, EventKind::JoinerLate { peer: p, round, waited_ms });
        }
    }

    /// Suspects each of `peers`, silent for `waited_ms` at a deadline.
    fn suspect_all(&mut self, now: u64, peers: Vec<PeerIdx>, waited_ms: u64) {
        let round = self.round;
        for p in peers {
            self.member(p).suspected = true;
            self.event(now, EventKind::PeerSuspected { peer: p, round, waited_ms });
        }
    }

    /// Collection is over: tell every connected peer which gradients this peer has, then agree.
    fn end_collection(&mut self, now: u64, timed_out: bool) {
        let round = self.round;
        let mut peers: Vec<PeerIdx> = self.received.keys().copied().collect();
        peers.push(self.cfg.me);
        peers.sort_unstable();
        let to = self.connected();
        if !to.is_empty() {
            self.out.push(Action::AnnounceReceived { round, peers, to });
        }
        self.phase = Phase::Agreeing { since: now, timed_out };
        self.advance(now);
    }

    /// Keeps `p`'s list of `round`, and of its lists only those of that round and the one
    /// before (a peer more rounds ahead means this one is behind and will fetch a state), so
    /// no peer can make this one hold lists of many rounds.
    fn keep_list(&mut self, p: PeerIdx, round: u64, peers: Vec<PeerIdx>) {
        for (_, lists) in self.lists.range_mut(..round.saturating_sub(1)) {
            lists.remove(&p);
        }
        self.lists.retain(|_, lists| !lists.is_empty());
        self.lists.entry(round).or_default().insert(p, peers);
    }

    /// Peers whose gradient this peer received and whose list it still waits for.
    fn awaited_lists(&self) -> Vec<PeerIdx> {
        let lists = self.lists.get(&self.round);
        self.received
            .keys()
            .copied()
            .filter(|p| self.members.get(p).is_some_and(|m| m.connected && !m.suspected))
            .filter(|p| lists.is_none_or(|l| !l.contains_key(p)))
            .collect()
    }

    /// Whether every list heard from a peer this peer received a gradient from names `p`.
    fn agreed(&self, p: PeerIdx) -> bool {
        let Some(lists) = self.lists.get(&self.round) else { return true };
        self.received.keys().filter_map(|q| lists.get(q)).all(|l| l.binary_search(&p).is_ok())
    }

    fn close_round(&mut self, now: u64, timed_out: bool) {
        let r = self.round;
        let me = self.cfg.me;
        let mine_agreed = self.agreed(me);
        let unshared: Vec<PeerIdx> = self.received.keys().copied().filter(|&p| !self.agreed(p)).collect();
        let Some((my_digest, my_grad)) = self.mine.take() else { return };
        let mut received = std::mem::take(&mut self.received);
        for &p in &unshared {
            received.remove(&p);
        }
        if !mine_agreed {
            self.event(now, EventKind::Unshared { peer: me, round: r });
        }
        for p in unshared {
            self.event(now, EventKind::Unshared { peer: p, round: r });
        }
        // Group the peers heard from by model digest.
        let mut groups: BTreeMap<Digest, Vec<PeerIdx>> = BTreeMap::new();
        groups.entry(my_digest).or_default().push(me);
        for (&p, g) in &received {
            groups.entry(g.digest).or_default().push(p);
        }
        let (majority, from) = majority(&groups);
        if majority != my_digest {
            self.event(now, EventKind::Reconcile { round: r, from, reason: "minority digest".into() });
            // Requests this peer deferred are answered by the majority instead.
            for p in std::mem::take(&mut self.pending_state) {
                self.out.push(Action::RefuseState { to: p, reason: "this peer is resynchronising".into() });
            }
            self.begin_sync(now, from);
            return;
        }
        let mut inputs = self.same_digest(now, received, my_digest);
        if mine_agreed {
            inputs.push((me, my_grad));
        }
        let side: BTreeSet<PeerIdx> = inputs.iter().map(|(p, _)| *p).collect();
        if !self.cfg.quorum.holds(&side, &self.base()) {
            self.stall(now, side);
            return;
        }
        self.apply_round(now, inputs, timed_out);
    }

    /// The round's contributors `side` are no quorum of the base: the round is not applied.
    /// Gradients of it are taken in anew when it is retried, even from peers that sent one.
    fn stall(&mut self, now: u64, side: BTreeSet<PeerIdx>) {
        let r = self.round;
        let (contributors, base) = (side.into_iter().collect(), self.base().into_iter().collect());
        self.event(now, EventKind::NoQuorum { round: r, contributors, base });
        for m in self.members.values_mut() {
            m.sent.retain(|&round| round < r);
        }
        self.mine = None;
        self.received.clear();
        self.lists.remove(&r);
        self.resends.clear();
        self.phase = Phase::Stalled { since: now };
        if !self.pending_state.is_empty() {
            let to = std::mem::take(&mut self.pending_state);
            self.out.push(Action::ServeState { to, round: r, base: self.base_list() });
        }
    }

    /// A deadline after stalling: retries the round if the connected peers could be a quorum
    /// (waiting for each of them again), else waits another deadline.
    fn retry_stalled(&mut self, now: u64) {
        let mut reachable: BTreeSet<PeerIdx> = self.connected().into_iter().collect();
        reachable.insert(self.cfg.me);
        if !self.cfg.quorum.holds(&reachable, &self.base()) {
            self.phase = Phase::Stalled { since: now };
            return;
        }
        for m in self.members.values_mut().filter(|m| m.connected) {
            m.suspected = false;
        }
        // The others take this round's gradient from this peer anew.
        let (round, to) = (self.round, self.connected());
        self.out.push(Action::AnnounceJoin { round, to });
        self.start_round(now, true);
    }

    /// Applies round `self.round` with `inputs` (any order) and starts the next one.
    fn apply_round(&mut self, now: u64, mut inputs: Vec<(PeerIdx, Vec<f32>)>, timed_out: bool) {
        let r = self.round;
        inputs.sort_by_key(|(p, _)| *p);
        if !inputs.is_empty() {
            self.contributed.swap(0, 1);
            self.contributed[1] = inputs.iter().map(|(p, _)| *p).collect();
        }
        let deadline_ms = self.deadline_ms();
        self.event(
            now,
            EventKind::RoundClosed { round: r, contributors: inputs.len(), timed_out, deadline_ms },
        );
        self.out.push(Action::Apply { round: r, inputs });
        self.round = r + 1;
        // A joiner waiting for the state gets it before the checkpoint is written (a file
        // written and synced on the driver's loop): the state is the same either way.
        if !self.pending_state.is_empty() {
            let to = std::mem::take(&mut self.pending_state);
            self.out.push(Action::ServeState { to, round: self.round, base: self.base_list() });
        }
        let ck = self.cfg.checkpoint_every;
        if self.round >= self.cfg.total_rounds || (ck > 0 && self.round.is_multiple_of(ck)) {
            self.out.push(Action::Checkpoint { round: self.round });
        }
        self.start_round(now, false);
    }
}

#[cfg(test)]
mod tests;

/// The majority digest of `groups` (digest → peers holding it) and its lowest-indexed peer;
/// ties go to the group holding the lowest peer index.
fn majority(groups: &BTreeMap<Digest, Vec<PeerIdx>>) -> (Digest, PeerIdx) {
    groups
        .iter()
        .map(|(d, ps)| (*d, ps.len(), *ps.iter().min().expect("groups are non-empty")))
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.2.cmp(&a.2)))
        .map(|(d, _, p)| (d, p))
        .expect("invariant: this peer's own group exists")
}
