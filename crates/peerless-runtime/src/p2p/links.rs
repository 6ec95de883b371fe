//! A peer's links to the other peers: the addresses it redials, the requests it has in flight,
//! the state requests it holds until the round machine serves them, and how what arrives becomes an input
//! of the round machine.
//!
//! A state is fetched in parts ([`peerless_core::wire::StateAssembly`]): one request per part,
//! each on a stream of its own, all answered from one encoding of the state, so that no part
//! waits for a flow-control window update of its stream. A whole-state request
//! ([`Message::StateRequest`]) is still served.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::Multiaddr;
use peerless_core::flat::digest;
use peerless_core::p2p::Input;
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::{self, Message, StateAssembly, WireError};

use super::heartbeat::Heartbeats;
use crate::node::driver::Node;
use crate::node::net::{Net, NetEvent, Reply, ReqId, frame};
use crate::node::{NodeError, NodeEvent};

/// What an outbound request was.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pending {
    Gradient(u64),
    /// A round's `Received` announcement (these bytes), on the tensor lane when one is up: if
    /// that fails, it goes again over libp2p (the agreement waits for it; a second copy is
    /// harmless).
    Received(Bytes),
    /// Part `part` of the state fetch numbered `fetch`.
    StatePart {
        fetch: u64,
        part: u16,
    },
    /// A heartbeat: not waited for at the end (a frozen peer never answers).
    Heartbeat,
    Other,
}

/// The part requests of one state fetch of a peer.
struct PartRequests {
    fetch: u64,
    parts: u16,
    channels: BTreeMap<u16, Reply>,
}

/// The peer's side of its connections.
#[derive(Default)]
pub(super) struct Links {
    /// Addresses of the other peers, redialled while not connected.
    bootstrap: Vec<Multiaddr>,
    last_dial: Option<Instant>,
    /// Addresses this peer dialled and is connected to.
    connected: HashMap<PeerIdx, Multiaddr>,
    outbound: HashMap<ReqId, (PeerIdx, Pending)>,
    /// State requests, answered when the round machine serves its state (at once while it
    /// computes, else at the next round boundary).
    state_channels: BTreeMap<PeerIdx, Vec<Reply>>,
    /// Requests for the parts of a state, by requester: its fetch, how many parts it asked
    /// for, and the channel of each part in so far.
    part_channels: BTreeMap<PeerIdx, PartRequests>,
    /// The state this peer is fetching, if any: from whom, its number, what came in.
    fetch: Option<(PeerIdx, u64, StateAssembly)>,
    /// The number of the last state fetch started.
    fetches: u64,
    /// Rounds of the gradient acknowledgements received since last asked.
    acks: Vec<u64>,
    /// Who was heard from when.
    beats: Option<Heartbeats>,
}

impl Links {
    /// Links to the peers at `bootstrap` (multiaddrs) that detect a silent peer within
    /// `detection_ms`.
    pub(super) fn new(bootstrap: &[String], detection_ms: u64) -> Result<Links, NodeError> {
        let bootstrap = bootstrap
            .iter()
            .map(|a| a.parse().map_err(|e| NodeError::Config(format!("node.bootstrap {a:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        // Fetches are numbered from the start time on, so a restarted peer's never reuse one of
        // its earlier process (whose part requests a server may still hold).
        let fetches = crate::node::unix_ms();
        Ok(Links { bootstrap, beats: Some(Heartbeats::new(detection_ms, 0)), fetches, ..Links::default() })
    }

    /// When the next heartbeat is due, ms on the node's clock.
    pub(super) fn next_beat(&self) -> Option<u64> {
        self.beats.as_ref().map(Heartbeats::next_timer)
    }

    /// Sends the heartbeats due at `now`; returns `Paused` when this process stood still,
    /// then an input for each peer newly found silent.
    pub(super) fn beat(&mut self, net: &mut Net, now: u64) -> Vec<Input> {
        let Some(beat) = self.beats.as_mut().and_then(|b| b.beat(now)) else { return Vec::new() };
        let bytes = frame(&Message::Heartbeat);
        for p in beat.to {
            self.send(net, p, bytes.clone(), Pending::Heartbeat);
        }
        let paused = beat.paused_ms.map(|ms| Input::Paused { ms });
        let silent = beat.silent.into_iter().map(|(peer, silent_ms)| Input::Unresponsive { peer, silent_ms });
        paused.into_iter().chain(silent).collect()
    }

    /// Stops the heartbeats (training is over).
    pub(super) fn stop_beats(&mut self) {
        self.beats = None;
    }

    fn heard(&mut self, p: PeerIdx, now: u64) {
        if let Some(b) = &mut self.beats {
            b.heard(p, now);
        }
    }

    /// Answers `p`'s request with `msg`, which `p` hears at once: it needs no heartbeat for a
    /// while.
    fn reply(&mut self, node: &mut Node, p: PeerIdx, msg: &Message, channel: Reply) {
        node.net.answer(channel, msg);
        let now = node.now_ms();
        if let Some(b) = &mut self.beats {
            b.spoke(p, now);
        }
    }

    /// Redials the bootstrap addresses not connected, at most once a second.
    pub(super) fn redial(&mut self, net: &mut Net) {
        if self.last_dial.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.last_dial = Some(Instant::now());
        for a in &self.bootstrap {
            if !self.connected.values().any(|c| c == a) {
                net.dial(a);
            }
        }
    }

    /// Whether no request but heartbeats is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.outbound.values().all(|(_, kind)| *kind == Pending::Heartbeat)
    }

    /// Sends `bytes` to `to` if it is connected; true when sent. Gradients and `Received` go
    /// on the tensor lane when one is up.
    pub(super) fn send(&mut self, net: &mut Net, to: PeerIdx, bytes: Bytes, kind: Pending) -> bool {
        let sent = match kind {
            Pending::Gradient(_) | Pending::Received(_) => net.request_tensor(to, bytes),
            _ => net.request_connected(to, bytes),
        };
        let Some(id) = sent else { return false };
        self.outbound.insert(id, (to, kind));
        true
    }

    /// Asks `from` for its state in `parts` parts; true when every part request went out
    /// (else the fetch is dropped).
    pub(super) fn request_state(&mut self, net: &mut Net, from: PeerIdx, parts: u16) -> bool {
        let Ok(assembly) = StateAssembly::new(parts, net.limits()) else { return false };
        self.fetches += 1;
        let fetch = self.fetches;
        self.fetch = Some((from, fetch, assembly));
        let all = (0..parts).all(|part| {
            let msg = frame(&Message::StatePartRequest { fetch, part, parts });
            self.send(net, from, msg, Pending::StatePart { fetch, part })
        });
        if !all {
            self.fetch = None;
        }
        all
    }

    /// Answers the state request `to` holds (all of its parts, or one whole-state request)
    /// with `msg`, a refusal.
    pub(super) fn answer_state(&mut self, net: &mut Net, to: PeerIdx, msg: &Message) {
        let bytes = frame(msg);
        if let Some(channels) = self.complete_parts(to) {
            for ch in channels.into_values() {
                net.answer_bytes(ch, bytes.clone());
            }
            return;
        }
        if let Some(ch) = self.state_channels.get_mut(&to).and_then(Vec::pop) {
            net.answer_bytes(ch, bytes);
        }
    }

    /// Answers the state request `to` holds with `bytes`, an encoded state: each part request
    /// with its slice, or one whole-state request with all of it.
    pub(super) fn answer_state_bytes(&mut self, net: &mut Net, to: PeerIdx, bytes: Bytes) {
        if let Some(channels) = self.complete_parts(to) {
            let parts = channels.len() as u16;
            for (part, ch) in channels {
                let slice = wire::state_part(&bytes, part, parts);
                net.answer_bytes(ch, Bytes::from(wire::encode_state_part(part, parts, slice)));
            }
            return;
        }
        if let Some(ch) = self.state_channels.get_mut(&to).and_then(Vec::pop) {
            net.answer_bytes(ch, bytes);
        }
    }

    /// The channels of every part `to` asked for, when all of them are in (taken).
    fn complete_parts(&mut self, to: PeerIdx) -> Option<BTreeMap<u16, Reply>> {
        let r = self.part_channels.get(&to)?;
        if r.channels.len() != usize::from(r.parts) {
            return None;
        }
        self.part_channels.remove(&to).map(|r| r.channels)
    }

    /// Consumes the acknowledgements of `round`'s gradient; true when none is pending.
    pub(super) fn take_acks(&mut self, round: u64, pending: &mut usize) -> bool {
        let n = self.acks.iter().filter(|&&r| r == round).count();
        self.acks.clear();
        *pending = pending.saturating_sub(n);
        *pending == 0
    }

    /// The round machine's input for a network event, if it is one.
    pub(super) fn input(&mut self, node: &mut Node, ev: NetEvent) -> Option<Input> {
        let now = node.now_ms();
        match ev {
            NetEvent::Connected { node: p, first, dialed } => {
                if let Some(a) = dialed {
                    self.connected.insert(p, a);
                }
                self.heard(p, now);
                first.then_some(Input::Connected(p))
            }
            NetEvent::Disconnected { node: p } => {
                self.connected.remove(&p);
                self.state_channels.remove(&p);
                self.part_channels.remove(&p);
                if let Some(b) = &mut self.beats {
                    b.gone(p);
                }
                Some(Input::Disconnected(p))
            }
            NetEvent::Request { from, msg, channel } => {
                self.heard(from, now);
                self.request(node, from, msg, channel)
            }
            NetEvent::Answer { id, msg } => {
                let (from, kind) = self.outbound.remove(&id)?;
                self.heard(from, now);
                self.answered(node, from, kind, msg)
            }
            NetEvent::Failed { id, error } => {
                let (to, kind) = self.outbound.remove(&id)?;
                tracing::debug!(peer = node.me, to, %error, "request failed");
                match kind {
                    Pending::StatePart { fetch, .. } => self.fetch_failed(fetch),
                    Pending::Gradient(r) => {
                        self.acks.push(r);
                        None
                    }
                    Pending::Received(bytes) => {
                        self.send(&mut node.net, to, bytes, Pending::Other);
                        None
                    }
                    Pending::Heartbeat | Pending::Other => None,
                }
            }
            NetEvent::LaneLost { from } => Some(Input::LinkLost(from)),
        }
    }

    /// A request from peer `from`: a state request waits for the round machine, anything
    /// else is acknowledged at once; a malformed one is refused.
    fn request(
        &mut self,
        node: &mut Node,
        from: PeerIdx,
        msg: Result<Message, WireError>,
        channel: Reply,
    ) -> Option<Input> {
        let msg = match msg {
            Ok(Message::StateRequest) => {
                self.state_channels.entry(from).or_default().push(channel);
                return Some(Input::StateRequested(from));
            }
            Ok(Message::StatePartRequest { fetch, part, parts }) => {
                // The machine is asked once every part is in. A request of another fetch starts
                // over (the requester gave the earlier one up): the parts of one answer all
                // come from one encoding of the state.
                let r = self.part_channels.entry(from).or_insert_with(|| PartRequests {
                    fetch,
                    parts,
                    channels: BTreeMap::new(),
                });
                if (r.fetch, r.parts) != (fetch, parts) {
                    *r = PartRequests { fetch, parts, channels: BTreeMap::new() };
                }
                r.channels.insert(part, channel);
                return (r.channels.len() == usize::from(parts)).then_some(Input::StateRequested(from));
            }
            Ok(msg) => msg,
            Err(err) => {
                tracing::warn!(peer = node.me, from, %err, "rejected a malformed message");
                node.event(NodeEvent::Rejected { from, error: err.to_string() });
                self.reply(node, from, &Message::Refused { reason: format!("rejected: {err}") }, channel);
                return Some(Input::Rejected(from));
            }
        };
        self.reply(node, from, &Message::Ack, channel);
        match msg {
            Message::Gradient(g) => Some(Input::Gradient(from, g)),
            Message::Join { round } => Some(Input::Join(from, round)),
            Message::Final { round, digest } => Some(Input::Final(from, round, digest)),
            Message::Received { round, peers } => Some(Input::Received(from, round, peers)),
            Message::Resend { round } => Some(Input::ResendRequested(from, round)),
            _ => None,
        }
    }

    /// The answer to (or failure of) a request of `kind` to `from`.
    fn answered(
        &mut self,
        node: &mut Node,
        from: PeerIdx,
        kind: Pending,
        msg: Result<Message, WireError>,
    ) -> Option<Input> {
        match (kind, msg) {
            (Pending::Gradient(r), _) => {
                self.acks.push(r);
                None
            }
            (Pending::Heartbeat | Pending::Received(_) | Pending::Other, _) => None,
            (Pending::StatePart { fetch, part }, msg) => {
                let (_, _, assembly) = self.fetch.as_mut().filter(|(_, f, _)| *f == fetch)?;
                let inserted = match msg {
                    Ok(Message::Refused { reason }) => {
                        self.fetch = None;
                        tracing::info!(peer = node.me, from, %reason, "state request not served");
                        return Some(Input::StateFailed(from));
                    }
                    Ok(m) => assembly.insert(part, m),
                    Err(err) => Err(err),
                };
                let state = match inserted {
                    Ok(None) => return None,
                    Ok(Some(s)) => s,
                    Err(err) => {
                        self.fetch = None;
                        node.event(NodeEvent::Rejected { from, error: err.to_string() });
                        return Some(Input::StateFailed(from));
                    }
                };
                self.fetch = None;
                if digest(&state.params) != state.digest {
                    node.event(NodeEvent::Rejected {
                        from,
                        error: "state digest does not match its parameters".into(),
                    });
                    return Some(Input::StateFailed(from));
                }
                Some(Input::State(from, state))
            }
        }
    }

    /// A part request of fetch `fetch` failed: the fetch fails, if it is the current one.
    fn fetch_failed(&mut self, fetch: u64) -> Option<Input> {
        let (from, _, _) = self.fetch.take_if(|(_, f, _)| *f == fetch)?;
        Some(Input::StateFailed(from))
    }
}
