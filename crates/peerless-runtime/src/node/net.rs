//! A node's network: the libp2p swarm with the run's identities, the bytes it moved, and its
//! events sorted into what a role acts on (connections by node index, decoded requests and
//! answers). Admission (allow-list or certificates, [`super::admit`]), refusals, listening
//! addresses and requests from unknown peers are handled here, and so is the tensor lane
//! ([`super::lane`]): offered to each peer once it is ready, used for gradients while it is up.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::{ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use peerless_core::admission::{Certificate, Role};
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::{self, Limits, Message, WireError};

use super::admit::{Denial, Gate};
use super::lane::{Lane, LaneEvent, Payload, Token};
use super::transport::{self, Behaviour, BehaviourEvent};
use super::{Files, NodeError, NodeEvent, NodeFile, io_err};

/// An outbound request: on the swarm, or on the tensor lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReqId {
    Swarm(OutboundRequestId),
    Lane(u64),
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub(crate) enum Reply {
    Swarm(ResponseChannel<Bytes>),
    /// Request `id` of incoming lane connection `conn`.
    Lane {
        conn: u64,
        id: u64,
    },
}

/// What woke a node from its network: the swarm or the tensor lane.
#[derive(Debug)]
pub(crate) enum Raw {
    Swarm(SwarmEvent<BehaviourEvent>),
    Lane(LaneEvent),
}

/// What a role acts on from the network.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A connection to node `node` is up; `first` when it is the only one, `dialed` the
    /// address when this node dialled it.
    Connected { node: PeerIdx, first: bool, dialed: Option<Multiaddr> },
    /// The last connection to node `node` closed.
    Disconnected { node: PeerIdx },
    /// Node `from` asks something; the answer goes to `channel`.
    Request { from: PeerIdx, msg: Result<Message, WireError>, channel: Reply },
    /// The answer to request `id`.
    Answer { id: ReqId, msg: Result<Message, WireError> },
    /// Request `id` failed (no connection, timeout, the other side hung up).
    Failed { id: ReqId, error: String },
    /// The tensor lane node `from` sent its gradients on closed (its libp2p connection may
    /// be up): what it had in flight there is lost.
    LaneLost { from: PeerIdx },
}

/// Whom a node admits.
#[derive(Debug, Clone)]
pub(crate) enum Members {
    /// These peer ids, in index order (`node.allow`).
    Allowed(Vec<PeerId>),
    /// Any peer id with a certificate of the run (`run.admission`) for one of `accepts`, for
    /// an index in `0..count`.
    Certified { count: u32, accepts: Vec<Role> },
}

/// The swarm of one node and what it counted.
pub(crate) struct Net {
    swarm: Swarm<Behaviour>,
    me: PeerIdx,
    /// The run's identities in index order (learnt from certificates under admission by
    /// certificate).
    ids: Vec<Option<PeerId>>,
    index_of: HashMap<PeerId, PeerIdx>,
    /// Admission by certificate; `None`: by allow-list.
    gate: Option<Gate>,
    /// Where this node can be dialled, as it tells others: `node.external`, else its first
    /// listening address.
    address: Option<Multiaddr>,
    /// Whether it tells members where to dial it and the others (`node.share_addresses`).
    share: bool,
    limits: Limits,
    /// The tensor lane (`p2p.tensor_transport = "tcp"`), if this node offers and uses one.
    lane: Option<Lane>,
    /// The address each connected peer was reached at (a lane is dialled there).
    remote_ip: HashMap<PeerId, IpAddr>,
    /// Lane offers in flight (their answers are dropped).
    offers: HashSet<OutboundRequestId>,
    /// Bytes received (requests and answers).
    pub(crate) bytes_in: u64,
    /// Bytes sent (requests and answers).
    pub(crate) bytes_out: u64,
    /// Connections and requests refused (peer ids off the allow-list, certificates refused,
    /// requests of peers without an accepted certificate).
    pub(crate) refused: u64,
}

impl Net {
    /// Node `file.node.index`'s swarm admitting `members`, listening on `file.node.listen`,
    /// with a tensor lane on the same address when `lane`.
    pub(crate) fn open(
        file: &NodeFile,
        members: Members,
        limits: Limits,
        request_timeout: Duration,
        lane: bool,
    ) -> Result<(Net, PeerId), NodeError> {
        let me = file.node.index;
        let keypair = identity(file)?;
        let my_id = keypair.public().to_peer_id();
        let (ids, gate) = match members {
            Members::Allowed(ids) => (ids.into_iter().map(Some).collect::<Vec<_>>(), None),
            Members::Certified { count, accepts } => {
                (vec![None; count as usize], Some(gate(file, &my_id, count, accepts)?))
            }
        };
        let index_of: HashMap<PeerId, PeerIdx> =
            ids.iter().enumerate().filter_map(|(i, p)| Some(((*p)?, i as PeerIdx))).collect();
        if gate.is_none() && index_of.get(&my_id) != Some(&me) {
            tracing::warn!(node = me, id = %my_id, "this node's id is not on the run's allow-list at its index");
        }
        let allowed: Option<Vec<PeerId>> = gate.is_none().then(|| ids.iter().flatten().copied().collect());
        let mut swarm = transport::build_swarm(keypair, allowed.as_deref(), request_timeout)
            .map_err(|e| NodeError::Network(e.to_string()))?;
        let listen: Multiaddr =
            file.node.listen.parse().map_err(|e| NodeError::Config(format!("node.listen: {e}")))?;
        // libp2p's error prints empty for an I/O error (a port in use): show its cause.
        let shown = listen.to_string();
        let lane = match lane {
            true => Some(open_lane(&listen)?),
            false => None,
        };
        swarm
            .listen_on(listen)
            .map_err(|e| NodeError::Network(format!("cannot listen on {shown}: {e:?}")))?;
        let address = match file.node.external.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|e| NodeError::Config(format!("node.external = {a:?}: {e}")))?),
        };
        let share = file.node.share_addresses;
        let net = Net {
            swarm,
            me,
            ids,
            index_of,
            gate,
            address,
            share,
            limits,
            lane,
            remote_ip: HashMap::new(),
            offers: HashSet::new(),
            bytes_in: 0,
            bytes_out: 0,
            refused: 0,
        };
        Ok((net, my_id))
    }

    /// What this node accepts of a message (the model's length).
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The next event of the swarm or the lane (to be sorted by [`Net::sort`]).
    pub(crate) async fn next(&mut self) -> Raw {
        use futures::StreamExt;
        match &mut self.lane {
            None => Raw::Swarm(self.swarm.select_next_some().await),
            Some(lane) => tokio::select! {
                ev = self.swarm.select_next_some() => Raw::Swarm(ev),
                ev = lane.next() => Raw::Lane(ev),
            },
        }
    }

    /// Sends `bytes` (an encoded message) to node `to`, dialling it if needed.
    pub(crate) fn request(&mut self, to: PeerIdx, bytes: Bytes) -> Option<ReqId> {
        let id = (*self.ids.get(to as usize)?)?;
        Some(ReqId::Swarm(self.send(id, bytes)))
    }

    /// Sends `bytes` (an encoded message) to node `to` if it is connected.
    pub(crate) fn request_connected(&mut self, to: PeerIdx, bytes: Bytes) -> Option<ReqId> {
        let id = (*self.ids.get(to as usize)?)?;
        let up = match &self.gate {
            Some(g) => g.is_ready(&id),
            None => self.swarm.is_connected(&id),
        };
        up.then(|| ReqId::Swarm(self.send(id, bytes)))
    }

    /// Sends `bytes` (an encoded gradient or `Received`) to node `to`: on its tensor lane when
    /// one is up, else as [`Net::request_connected`] does.
    pub(crate) fn request_tensor(&mut self, to: PeerIdx, bytes: Bytes) -> Option<ReqId> {
        if let Some(lane) = self.lane.as_mut().filter(|l| l.is_up(to)) {
            let n = bytes.len() as u64;
            if let Some(id) = lane.request(to, bytes.clone()) {
                self.bytes_out += n;
                return Some(ReqId::Lane(id));
            }
        }
        self.request_connected(to, bytes)
    }

    /// Gives back the vectors of one round's gradients once applied: the tensor lane reads
    /// the next gradients into them.
    pub(crate) fn recycle(&self, vs: Vec<Vec<f32>>) {
        if let Some(lane) = &self.lane {
            lane.recycle(vs);
        }
    }

    fn send(&mut self, id: PeerId, bytes: Bytes) -> OutboundRequestId {
        self.bytes_out += bytes.len() as u64;
        self.swarm.behaviour_mut().rr.send_request(&id, bytes)
    }

    /// Answers a request with `msg`.
    pub(crate) fn answer(&mut self, channel: Reply, msg: &Message) {
        self.answer_bytes(channel, frame(msg));
    }

    /// Answers a request with already encoded bytes (one encoding sent to many).
    pub(crate) fn answer_bytes(&mut self, channel: Reply, bytes: Bytes) {
        self.bytes_out += bytes.len() as u64;
        match channel {
            Reply::Swarm(ch) => {
                let _ = self.swarm.behaviour_mut().rr.send_response(ch, bytes);
            }
            Reply::Lane { conn, id } => {
                if let Some(lane) = &self.lane {
                    lane.answer(conn, id, bytes);
                }
            }
        }
    }

    /// Dials `addr` (a failure shows up as no connection).
    pub(crate) fn dial(&mut self, addr: &Multiaddr) {
        let _ = self.swarm.dial(addr.clone());
    }

    /// Sorts a network event: what a role acts on is returned (a request of a peer that turns
    /// out to be ready comes after its `Connected`); the rest is recorded or dropped.
    pub(crate) fn sort(&mut self, ev: Raw, files: &mut Files) -> Vec<NetEvent> {
        match ev {
            Raw::Swarm(ev) => self.sort_swarm(ev, files),
            Raw::Lane(ev) => self.sort_lane(ev, files),
        }
    }

    fn sort_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>, files: &mut Files) -> Vec<NetEvent> {
        let me = self.me;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(node = me, %address, "listening");
                if self.address.is_none() {
                    self.address = Some(address.clone());
                }
                files.event(me, &NodeEvent::Listening { address: address.to_string() });
                Vec::new()
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                let dialed = endpoint.is_dialer().then(|| endpoint.get_remote_address().clone());
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remote_ip.insert(peer_id, ip);
                }
                if self.gate.is_some() {
                    return self.opened(peer_id, dialed).into_iter().collect();
                }
                let Some(&node) = self.index_of.get(&peer_id) else { return Vec::new() };
                let first = num_established.get() == 1;
                if first {
                    files.event(me, &NodeEvent::Connected { to: node, peer_id: peer_id.to_string() });
                    self.offer_lane(peer_id, node);
                }
                vec![NetEvent::Connected { node, first, dialed }]
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                let announced = self.gate.as_mut().is_none_or(|g| g.closed(&peer_id));
                let Some(&node) = self.index_of.get(&peer_id) else { return Vec::new() };
                if !announced {
                    return Vec::new();
                }
                files.event(me, &NodeEvent::Disconnected { to: node });
                let mut out = self.forget_lane(node);
                out.push(NetEvent::Disconnected { node });
                out
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { .. },
                peer_id,
                send_back_addr,
                ..
            } => {
                self.refused += 1;
                let id = peer_id.map(|p| p.to_string()).unwrap_or_default();
                tracing::warn!(node = me, from = %id, addr = %send_back_addr, "refused a connection from a peer not on the allow-list");
                files.event(
                    me,
                    &NodeEvent::Refused {
                        peer_id: id,
                        addr: send_back_addr.to_string(),
                        reason: "not on the allow-list".into(),
                    },
                );
                Vec::new()
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(e)) => self.sort_rr(e, files),
            _ => Vec::new(),
        }
    }

    /// A connection to `peer` is up (admission by certificate): the first presents this
    /// node's certificate; another one of a ready peer is shown to the role.
    fn opened(&mut self, peer: PeerId, dialed: Option<Multiaddr>) -> Option<NetEvent> {
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        if gate.opened(peer, dialed.clone()) {
            self.present(peer);
            return None;
        }
        let node = *self.index_of.get(&peer)?;
        gate.is_ready(&peer).then_some(NetEvent::Connected { node, first: false, dialed })
    }

    /// Sends `peer` this node's certificate.
    fn present(&mut self, peer: PeerId) {
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        let address = self.address.as_ref().filter(|_| self.share).map(|a| a.to_string()).unwrap_or_default();
        let admit = frame(&Message::Admit { certificate: gate.certificate().to_vec(), address });
        let id = self.send(peer, admit);
        self.gate.as_mut().expect("invariant: checked above").asked(id, peer);
    }

    fn sort_rr(&mut self, e: request_response::Event<Bytes, Bytes>, files: &mut Files) -> Vec<NetEvent> {
        use request_response::{Event, Message as Rr};
        match e {
            Event::Message { peer, message: Rr::Request { request, channel, .. }, .. } => {
                self.bytes_in += request.len() as u64;
                let msg = decode(&request, self.limits);
                if self.gate.is_some() {
                    return self.certified_request(peer, msg, channel, files);
                }
                let Some(&from) = self.index_of.get(&peer) else {
                    self.answer(Reply::Swarm(channel), &Message::Refused { reason: "unknown peer".into() });
                    return Vec::new();
                };
                match msg {
                    Ok(Message::Admit { .. }) => {
                        let reason = "this node admits by peer id (allow-list), not by certificate";
                        self.answer(Reply::Swarm(channel), &Message::Refused { reason: reason.into() });
                        return Vec::new();
                    }
                    Ok(Message::Members { .. }) => {
                        self.answer(Reply::Swarm(channel), &Message::Ack);
                        return Vec::new();
                    }
                    Ok(Message::LaneOffer { port, token }) => {
                        self.answer(Reply::Swarm(channel), &Message::Ack);
                        self.take_lane(peer, from, port, token);
                        return Vec::new();
                    }
                    _ => {}
                }
                vec![NetEvent::Request { from, msg, channel: Reply::Swarm(channel) }]
            }
            Event::Message { peer, message: Rr::Response { request_id, response }, .. } => {
                self.bytes_in += response.len() as u64;
                let msg = decode(&response, self.limits);
                if self.offers.remove(&request_id) {
                    return Vec::new();
                }
                if let Some(g) = self.gate.as_mut()
                    && g.take_ask(&request_id).is_some()
                {
                    return self.admit_answered(peer, msg, files).into_iter().collect();
                }
                if let Some(g) = self.gate.as_mut()
                    && g.take_telling(&request_id)
                {
                    return Vec::new();
                }
                vec![NetEvent::Answer { id: ReqId::Swarm(request_id), msg }]
            }
            Event::OutboundFailure { request_id, error, peer, .. } => {
                if self.offers.remove(&request_id) {
                    tracing::debug!(node = self.me, %peer, %error, "offering the tensor lane failed");
                    return Vec::new();
                }
                if let Some(g) = self.gate.as_mut()
                    && (g.take_ask(&request_id).is_some() || g.take_telling(&request_id))
                {
                    tracing::debug!(node = self.me, %peer, %error, "presenting the certificate or the members failed");
                    return Vec::new();
                }
                vec![NetEvent::Failed { id: ReqId::Swarm(request_id), error: error.to_string() }]
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => Vec::new(),
        }
    }

    /// A request of `peer` under admission by certificate: its certificate is checked; anything
    /// else passes only once its certificate was accepted.
    fn certified_request(
        &mut self,
        peer: PeerId,
        msg: Result<Message, WireError>,
        channel: ResponseChannel<Bytes>,
        files: &mut Files,
    ) -> Vec<NetEvent> {
        let channel = Reply::Swarm(channel);
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        if let Ok(Message::Admit { certificate, address }) = &msg {
            return match gate.check(&peer, certificate, unix_s()) {
                Ok(index) => {
                    let again = gate.must_present_again(&peer);
                    self.answer(channel, &Message::Ack);
                    if again {
                        self.present(peer);
                    }
                    self.admitted(peer, index, address, files).into_iter().collect()
                }
                Err(denial) => {
                    self.answer(channel, &Message::Refused { reason: denial.detail.clone() });
                    self.refuse(peer, &denial, files);
                    Vec::new()
                }
            };
        }
        let Some(from) = gate.admitted(&peer) else {
            let record = gate.record_refusal(peer);
            let denial = Denial {
                reason: "no certificate",
                detail: "no certificate: present an admission certificate first".into(),
            };
            self.answer(channel, &Message::Refused { reason: denial.detail.clone() });
            if record {
                self.refuse(peer, &denial, files);
            } else {
                self.refused += 1;
            }
            return Vec::new();
        };
        if let Ok(Message::Members { members }) = msg {
            self.answer(channel, &Message::Ack);
            self.dial_members(&members);
            return Vec::new();
        }
        // A member sends only once it accepted this node's certificate: its request can
        // overtake its answer to this node's `Admit`.
        let mut out: Vec<NetEvent> =
            gate.accepted(peer).then(|| self.ready(peer, from, files)).into_iter().collect();
        if let Ok(Message::LaneOffer { port, token }) = msg {
            self.answer(channel, &Message::Ack);
            self.take_lane(peer, from, port, token);
            return out;
        }
        out.push(NetEvent::Request { from, msg, channel });
        out
    }

    /// `peer`'s certificate for `index` was accepted; it can be dialled at `address`.
    fn admitted(
        &mut self,
        peer: PeerId,
        index: PeerIdx,
        address: &str,
        files: &mut Files,
    ) -> Option<NetEvent> {
        if let Some(old) = self.ids[index as usize].replace(peer)
            && old != peer
        {
            self.index_of.remove(&old);
        }
        self.index_of.insert(peer, index);
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        gate.admit(peer, index, address).then(|| self.ready(peer, index, files))
    }

    /// The answer of `peer` to this node's `Admit`.
    fn admit_answered(
        &mut self,
        peer: PeerId,
        msg: Result<Message, WireError>,
        files: &mut Files,
    ) -> Option<NetEvent> {
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        match msg {
            Ok(Message::Ack) => {
                let index = gate.admitted(&peer);
                (gate.accepted(peer))
                    .then(|| self.ready(peer, index.expect("invariant: ready means admitted"), files))
            }
            other => {
                let reason = match other {
                    Ok(Message::Refused { reason }) => reason,
                    Ok(m) => format!("unexpected answer {m:?}"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(node = self.me, %peer, %reason, "a node refused this node's certificate");
                files.event(self.me, &NodeEvent::NotAdmitted { peer_id: peer.to_string(), reason });
                None
            }
        }
    }

    /// `peer` (node `index`) is ready: recorded, told the other members, and shown to the role.
    fn ready(&mut self, peer: PeerId, index: PeerIdx, files: &mut Files) -> NetEvent {
        files.event(self.me, &NodeEvent::Connected { to: index, peer_id: peer.to_string() });
        self.tell_members(peer);
        self.offer_lane(peer, index);
        let dialed = self.gate.as_ref().and_then(|g| g.dialed(&peer));
        NetEvent::Connected { node: index, first: true, dialed }
    }

    /// Tells `peer` the other ready members and where to dial them (when there are any).
    fn tell_members(&mut self, peer: PeerId) {
        let gate = self.gate.as_mut().expect("invariant: called under admission by certificate");
        let members = gate.others(&peer);
        if members.is_empty() || !self.share {
            return;
        }
        let id = self.send(peer, frame(&Message::Members { members }));
        self.gate.as_mut().expect("invariant: checked above").told(id);
    }

    /// Dials the members a member told of that are not connected (a failure shows up as no
    /// connection; the member dialled is not redialled).
    fn dial_members(&mut self, members: &[(PeerIdx, String)]) {
        for (index, address) in members {
            let known = self.ids.get(*index as usize).copied().flatten();
            if *index == self.me || known.is_some_and(|p| self.swarm.is_connected(&p)) {
                continue;
            }
            match address.parse::<Multiaddr>() {
                Ok(a) => {
                    tracing::info!(node = self.me, to = index, %a, "dialling a member another member told of");
                    let _ = self.swarm.dial(a);
                }
                Err(e) => {
                    tracing::warn!(node = self.me, to = index, %address, error = %e, "a member told of an address that does not parse")
                }
            }
        }
    }

    /// Offers `peer` (node `node`), now ready, this node's tensor lane with a fresh token.
    fn offer_lane(&mut self, peer: PeerId, node: PeerIdx) {
        let Some(lane) = self.lane.as_mut() else { return };
        let port = lane.port();
        match lane.issue(node) {
            Ok(token) => {
                let id = self.send(peer, frame(&Message::LaneOffer { port, token }));
                self.offers.insert(id);
            }
            Err(e) => {
                tracing::warn!(node = self.me, to = node, error = %e, "no token for a tensor lane: gradients to this node go over libp2p")
            }
        }
    }

    /// `peer` (node `node`) offered its lane: dialled at the address its connection came from
    /// (when this node uses lanes; else its gradients go over libp2p).
    fn take_lane(&mut self, peer: PeerId, node: PeerIdx, port: u16, token: Token) {
        let (Some(lane), Some(ip)) = (self.lane.as_ref(), self.remote_ip.get(&peer)) else { return };
        lane.dial(node, SocketAddr::new(*ip, port), token);
    }

    /// Node `node` is gone: its lane too; its gradients in flight there failed.
    fn forget_lane(&mut self, node: PeerIdx) -> Vec<NetEvent> {
        let Some(lane) = self.lane.as_mut() else { return Vec::new() };
        failed(lane.forget(node), "the peer disconnected")
    }

    /// Sorts an event of the tensor lane.
    fn sort_lane(&mut self, ev: LaneEvent, files: &mut Files) -> Vec<NetEvent> {
        let me = self.me;
        let lane = self.lane.as_mut().expect("invariant: lane events come from a lane");
        match ev {
            LaneEvent::Accepted { token, stream } => {
                let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                if lane.accepted(&token, stream).is_none() {
                    self.refused += 1;
                    tracing::warn!(node = me, %addr, "refused a tensor-lane connection with an unknown token");
                    let reason = "tensor lane: unknown token".into();
                    files.event(me, &NodeEvent::Refused { peer_id: String::new(), addr, reason });
                }
                Vec::new()
            }
            LaneEvent::Dialed { peer, stream } => {
                let addr = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::debug!(node = me, to = peer, %addr, "tensor lane up");
                files.event(me, &NodeEvent::TensorLane { to: peer, addr });
                failed(lane.dialed(peer, stream), "a newer lane replaced it")
            }
            LaneEvent::DialFailed { peer, error } => {
                tracing::warn!(node = me, to = peer, %error, "the tensor lane could not be opened: gradients to this peer go over libp2p");
                Vec::new()
            }
            LaneEvent::Request { peer, conn, id, payload } => {
                self.bytes_in += payload.len() as u64;
                let channel = Reply::Lane { conn, id };
                let msg = match payload {
                    Payload::Bytes(bytes) => decode(&bytes, self.limits),
                    Payload::Gradient { head, grad } => wire::decode_gradient(&head, grad, self.limits),
                };
                match msg {
                    Ok(m @ (Message::Gradient(_) | Message::Received { .. })) => {
                        vec![NetEvent::Request { from: peer, msg: Ok(m), channel }]
                    }
                    Ok(m) => {
                        let reason = format!(
                            "only gradients and `received` travel on the tensor lane, not a {}",
                            m.kind_name()
                        );
                        self.answer(channel, &Message::Refused { reason });
                        Vec::new()
                    }
                    Err(e) => vec![NetEvent::Request { from: peer, msg: Err(e), channel }],
                }
            }
            LaneEvent::Answer { id, bytes } => {
                if !lane.answered(id) {
                    return Vec::new();
                }
                self.bytes_in += bytes.len() as u64;
                vec![NetEvent::Answer { id: ReqId::Lane(id), msg: decode(&bytes, self.limits) }]
            }
            LaneEvent::Closed { peer, conn, error } => {
                tracing::debug!(node = me, peer, %error, "a tensor-lane connection closed");
                let incoming = lane.is_incoming(conn);
                let mut out = failed(lane.closed(peer, conn), "the tensor lane closed");
                if incoming {
                    out.push(NetEvent::LaneLost { from: peer });
                }
                out
            }
        }
    }

    /// Records that `peer` was refused for `denial`.
    fn refuse(&mut self, peer: PeerId, denial: &Denial, files: &mut Files) {
        self.refused += 1;
        tracing::warn!(node = self.me, %peer, reason = denial.reason, detail = %denial.detail, "refused a peer");
        let addr =
            self.gate.as_ref().and_then(|g| g.dialed(&peer)).map(|a| a.to_string()).unwrap_or_default();
        files.event(
            self.me,
            &NodeEvent::Refused { peer_id: peer.to_string(), addr, reason: denial.reason.into() },
        );
    }
}

/// The failures of lane requests `orphans`, for `why`.
fn failed(orphans: Vec<(u64, Bytes)>, why: &str) -> Vec<NetEvent> {
    orphans.into_iter().map(|(id, _)| NetEvent::Failed { id: ReqId::Lane(id), error: why.into() }).collect()
}

/// The IP address in `addr`, if it has one.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The tensor lane of a node listening at `listen`: on the same IP address, any free port.
fn open_lane(listen: &Multiaddr) -> Result<Lane, NodeError> {
    let ip = ip_of(listen).ok_or_else(|| {
        NodeError::Config(format!(
            "p2p.tensor_transport = \"tcp\" needs node.listen to name an IP address, not {listen}"
        ))
    })?;
    Lane::listen(ip).map_err(|e| NodeError::Network(format!("cannot open the tensor lane on {ip}: {e}")))
}

/// Unix time, seconds (certificates expire by it).
fn unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `msg` encoded, ready to send (once or to many).
pub(crate) fn frame(msg: &Message) -> Bytes {
    Bytes::from(wire::encode(msg))
}

/// Whom node `file` admits among a run's `count` nodes when it talks to `accepts`:
/// `file.node.allow` when it lists peer ids, else certificates of `run.admission`.
pub(crate) fn members(file: &NodeFile, count: u32, accepts: Vec<Role>) -> Result<Members, NodeError> {
    if !file.node.allow.is_empty() {
        let ids = file
            .node
            .allow
            .iter()
            .map(|s| s.parse::<PeerId>().map_err(|e| NodeError::Config(format!("node.allow: {s:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        return Ok(Members::Allowed(ids));
    }
    if file.run.admission.run_id.is_empty() {
        return Err(NodeError::Config(
            "node.allow lists no peer ids and run.admission is empty: give the node an allow-list, or a run \
             made with `peerless run init` and a certificate from `peerless admit`"
                .into(),
        ));
    }
    Ok(Members::Certified { count, accepts })
}

/// The node's identity: `node.identity` (which must exist), or `identity.key` in its directory,
/// generated on first start.
fn identity(file: &NodeFile) -> Result<libp2p::identity::Keypair, NodeError> {
    if file.node.identity.as_os_str().is_empty() {
        let path = file.node.dir.join("identity.key");
        return transport::load_or_generate_keypair(&path).map_err(io_err(&path));
    }
    let path = &file.node.identity;
    transport::read_keypair(path).map_err(|e| {
        NodeError::Config(format!(
            "node.identity = {}: {e} (make one with `peerless keygen --out FILE`)",
            path.display()
        ))
    })
}

/// The gate of a node under admission by certificate: the run's id and key, and the node's own
/// certificate (read from `node.certificate`; one that would not admit it is warned about, not
/// refused here: the others refuse it).
fn gate(file: &NodeFile, my_id: &PeerId, count: u32, accepts: Vec<Role>) -> Result<Gate, NodeError> {
    let (run, key) = file
        .run
        .admission
        .parsed()
        .map_err(|e| NodeError::Config(e.to_string()))?
        .expect("invariant: members() checked that run.admission is set");
    let path: &Path = &file.node.certificate;
    if path.as_os_str().is_empty() {
        return Err(NodeError::Config(
            "node.certificate is empty: a run with [admission] needs each node's certificate (`peerless admit`)".into(),
        ));
    }
    let mine = read_certificate(path)?;
    let cert = Certificate::decode(&mine)
        .map_err(|e| NodeError::Config(format!("node.certificate = {}: {e}", path.display())))?;
    let c = &cert.claims;
    if c.index != file.node.index || c.peer_id != my_id.to_bytes() || c.run != run {
        tracing::warn!(
            node = file.node.index,
            certificate = %path.display(),
            "this node's certificate does not name it (index {}, run {}): the others will refuse it",
            c.index,
            c.run
        );
    }
    Ok(Gate::new(run, key, accepts, count, file.node.index, mine))
}

fn read_certificate(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|e| NodeError::Config(format!("node.certificate = {}: {e}", path.display())))
}

/// Decodes a message; a compressed gradient arrives as the dense gradient the sender kept, so
/// nothing past the network sees compression.
fn decode(bytes: &[u8], limits: wire::Limits) -> Result<Message, WireError> {
    match wire::decode(bytes, limits)? {
        Message::Compressed(c) => Ok(Message::Gradient(c.densify())),
        other => Ok(other),
    }
}
