//! A node's network: the libp2p swarm with the run's identities, the bytes it moved, and its
//! events sorted into what a role acts on (connections by node index, decoded requests and
//! answers). Refusals, listening addresses and requests from unknown peers are handled here.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::{ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use peerless_core::protocol::PeerIdx;
use peerless_core::wire::{self, Limits, Message, WireError};

use super::transport::{self, Behaviour, BehaviourEvent};
use super::{Files, NodeError, NodeEvent, NodeFile, io_err};

/// What a role acts on from the network.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A connection to node `node` is up; `first` when it is the only one, `dialed` the
    /// address when this node dialled it.
    Connected { node: PeerIdx, first: bool, dialed: Option<Multiaddr> },
    /// The last connection to node `node` closed.
    Disconnected { node: PeerIdx },
    /// Node `from` asks something; the answer goes to `channel`.
    Request { from: PeerIdx, msg: Result<Message, WireError>, channel: ResponseChannel<Bytes> },
    /// The answer to request `id`.
    Answer { id: OutboundRequestId, msg: Result<Message, WireError> },
    /// Request `id` failed (no connection, timeout, the other side hung up).
    Failed { id: OutboundRequestId, error: String },
}

/// The swarm of one node and what it counted.
pub(crate) struct Net {
    swarm: Swarm<Behaviour>,
    me: PeerIdx,
    /// The run's identities in index order.
    ids: Vec<PeerId>,
    index_of: HashMap<PeerId, PeerIdx>,
    limits: Limits,
    /// Bytes received (requests and answers).
    pub(crate) bytes_in: u64,
    /// Bytes sent (requests and answers).
    pub(crate) bytes_out: u64,
    /// Connections refused (peer ids off the allow-list).
    pub(crate) refused: u64,
}

impl Net {
    /// Node `file.node.index`'s swarm among `ids`, listening on `file.node.listen`.
    pub(crate) fn open(
        file: &NodeFile,
        ids: Vec<PeerId>,
        limits: Limits,
        request_timeout: Duration,
    ) -> Result<(Net, PeerId), NodeError> {
        let me = file.node.index;
        let key_path = file.node.dir.join("identity.key");
        let keypair = transport::load_or_save_keypair(
            &key_path,
            transport::derive_keypair(&file.run.cluster.secret, me),
        )
        .map_err(io_err(&key_path))?;
        let my_id = keypair.public().to_peer_id();
        let index_of: HashMap<PeerId, PeerIdx> =
            ids.iter().enumerate().map(|(i, p)| (*p, i as PeerIdx)).collect();
        if index_of.get(&my_id) != Some(&me) {
            tracing::warn!(node = me, id = %my_id, "this node's id is not on the run's allow-list at its index");
        }
        let mut swarm = transport::build_swarm(keypair, &ids, request_timeout)
            .map_err(|e| NodeError::Network(e.to_string()))?;
        let listen: Multiaddr =
            file.node.listen.parse().map_err(|e| NodeError::Config(format!("node.listen: {e}")))?;
        swarm.listen_on(listen).map_err(|e| NodeError::Network(format!("listen: {e}")))?;
        let net = Net { swarm, me, ids, index_of, limits, bytes_in: 0, bytes_out: 0, refused: 0 };
        Ok((net, my_id))
    }

    /// The next swarm event (to be sorted by [`Net::sort`]).
    pub(crate) async fn next(&mut self) -> SwarmEvent<BehaviourEvent> {
        use futures::StreamExt;
        self.swarm.select_next_some().await
    }

    /// Sends `bytes` (an encoded message) to node `to`, dialling it if needed.
    pub(crate) fn request(&mut self, to: PeerIdx, bytes: Bytes) -> Option<OutboundRequestId> {
        let id = *self.ids.get(to as usize)?;
        Some(self.send(id, bytes))
    }

    /// Sends `bytes` (an encoded message) to node `to` if it is connected.
    pub(crate) fn request_connected(&mut self, to: PeerIdx, bytes: Bytes) -> Option<OutboundRequestId> {
        let id = *self.ids.get(to as usize)?;
        self.swarm.is_connected(&id).then(|| self.send(id, bytes))
    }

    fn send(&mut self, id: PeerId, bytes: Bytes) -> OutboundRequestId {
        self.bytes_out += bytes.len() as u64;
        self.swarm.behaviour_mut().rr.send_request(&id, bytes)
    }

    /// Answers a request with `msg`.
    pub(crate) fn answer(&mut self, channel: ResponseChannel<Bytes>, msg: &Message) {
        self.answer_bytes(channel, frame(msg));
    }

    /// Answers a request with already encoded bytes (one encoding sent to many).
    pub(crate) fn answer_bytes(&mut self, channel: ResponseChannel<Bytes>, bytes: Bytes) {
        self.bytes_out += bytes.len() as u64;
        let _ = self.swarm.behaviour_mut().rr.send_response(channel, bytes);
    }

    /// Dials `addr` (a failure shows up as no connection).
    pub(crate) fn dial(&mut self, addr: &Multiaddr) {
        let _ = self.swarm.dial(addr.clone());
    }

    /// Sorts a swarm event: what a role acts on is returned; the rest is recorded or dropped.
    pub(crate) fn sort(&mut self, ev: SwarmEvent<BehaviourEvent>, files: &mut Files) -> Option<NetEvent> {
        let me = self.me;
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(node = me, %address, "listening");
                files.event(me, &NodeEvent::Listening { address: address.to_string() });
                None
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                let node = *self.index_of.get(&peer_id)?;
                let first = num_established.get() == 1;
                if first {
                    files.event(me, &NodeEvent::Connected { to: node, peer_id: peer_id.to_string() });
                }
                let dialed = endpoint.is_dialer().then(|| endpoint.get_remote_address().clone());
                Some(NetEvent::Connected { node, first, dialed })
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                let node = *self.index_of.get(&peer_id)?;
                files.event(me, &NodeEvent::Disconnected { to: node });
                Some(NetEvent::Disconnected { node })
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
                None
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(e)) => self.sort_rr(e),
            _ => None,
        }
    }

    fn sort_rr(&mut self, e: request_response::Event<Bytes, Bytes>) -> Option<NetEvent> {
        use request_response::{Event, Message as Rr};
        match e {
            Event::Message { peer, message: Rr::Request { request, channel, .. }, .. } => {
                self.bytes_in += request.len() as u64;
                let Some(&from) = self.index_of.get(&peer) else {
                    self.answer(channel, &Message::Refused { reason: "unknown peer".into() });
                    return None;
                };
                Some(NetEvent::Request { from, msg: decode(&request, self.limits), channel })
            }
            Event::Message { message: Rr::Response { request_id, response }, .. } => {
                self.bytes_in += response.len() as u64;
                Some(NetEvent::Answer { id: request_id, msg: decode(&response, self.limits) })
            }
            Event::OutboundFailure { request_id, error, .. } => {
                Some(NetEvent::Failed { id: request_id, error: error.to_string() })
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => None,
        }
    }
}

/// `msg` encoded, ready to send (once or to many).
pub(crate) fn frame(msg: &Message) -> Bytes {
    Bytes::from(wire::encode(msg))
}

/// The identities of a run's `count` nodes: `file.node.allow` when it lists them, else
/// derived from the run's secret.
pub(crate) fn run_ids(file: &NodeFile, count: u32) -> Result<Vec<PeerId>, NodeError> {
    if !file.node.allow.is_empty() {
        return file
            .node
            .allow
            .iter()
            .map(|s| s.parse::<PeerId>().map_err(|e| NodeError::Config(format!("node.allow: {s:?}: {e}"))))
            .collect();
    }
    if file.run.cluster.secret.is_empty() {
        return Err(NodeError::Config("cluster.secret is empty and node.allow lists no peer ids".into()));
    }
    Ok((0..count).map(|i| transport::derive_peer_id(&file.run.cluster.secret, i)).collect())
}

/// Decodes a message; a compressed gradient arrives as the dense gradient the sender kept, so
/// nothing past the network sees compression.
fn decode(bytes: &[u8], limits: wire::Limits) -> Result<Message, WireError> {
    match wire::decode(bytes, limits)? {
        Message::Compressed(c) => Ok(Message::Gradient(c.densify())),
        other => Ok(other),
    }
}
