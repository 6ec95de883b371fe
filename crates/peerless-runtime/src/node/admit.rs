//! Admission on the wire: which connected peer ids presented a valid certificate for this run
//! and the role expected, and which accepted this node's certificate (no I/O; [`super::net`]
//! sends and answers).
//!
//! When the first connection to a peer id is up, each side sends the other a
//! [`Message::Admit`](peerless_core::wire::Message::Admit) carrying its certificate and answers
//! the other's with `Ack` or `Refused`. The certificate is checked against the peer id the
//! Noise handshake authenticated on that connection ([`peerless_core::admission::verify`]),
//! then its index against the run (in range, not this node's, not held by another connected
//! peer id). A peer is *ready*, and shown to the role as connected, once its certificate was
//! accepted here and this node's was accepted there. Requests of a peer id whose certificate was
//! not accepted are refused (`no certificate`). The state is per peer id and forgotten when its
//! last connection closes, so a peer that reconnects presents its certificate again.
//!
//! Each `Admit` also carries where its sender can be dialled. When a peer becomes ready, this
//! node tells it the other ready members and their addresses (`Members`), so a node that
//! reaches one member reaches them all.

use std::collections::{HashMap, HashSet};

use libp2p::request_response::OutboundRequestId;
use libp2p::{Multiaddr, PeerId};
use peerless_core::admission::{self, Expected, PublicKey, Role, RunId};
use peerless_core::protocol::PeerIdx;

/// What this node admits, and whom it admitted.
pub(crate) struct Gate {
    run: RunId,
    key: PublicKey,
    /// The roles this node talks to.
    accepts: Vec<Role>,
    /// Node indices run `0..count`.
    count: u32,
    me: PeerIdx,
    /// This node's own certificate.
    mine: Vec<u8>,
    sessions: HashMap<PeerId, Session>,
    /// This node's `Admit` requests in flight, by the peer they went to.
    asks: HashMap<OutboundRequestId, PeerId>,
    /// This node's `Members` requests in flight (their answers are for no role).
    tellings: HashSet<OutboundRequestId>,
}

/// One peer id while it has a connection.
#[derive(Debug, Default)]
struct Session {
    /// Its index, once its certificate was accepted.
    admitted: Option<PeerIdx>,
    /// It accepted this node's certificate.
    accepted: bool,
    /// The role was told it is connected.
    announced: bool,
    /// A `no certificate` refusal was recorded (once a session).
    refusal_recorded: bool,
    /// The address this node dialled it at, for the role's redialling.
    dialed: Option<Multiaddr>,
    /// Where it says it can be dialled (from its `Admit`).
    address: String,
}

/// Why a certificate does not admit its presenter: the short reason events name, and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denial {
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
}

impl Gate {
    /// The gate of node `me` (of `count`) in run `run` with key `key`, talking to `accepts`,
    /// presenting `mine`.
    pub(crate) fn new(
        run: RunId,
        key: PublicKey,
        accepts: Vec<Role>,
        count: u32,
        me: PeerIdx,
        mine: Vec<u8>,
    ) -> Gate {
        Gate {
            run,
            key,
            accepts,
            count,
            me,
            mine,
            sessions: HashMap::new(),
            asks: HashMap::new(),
            tellings: HashSet::new(),
        }
    }

    /// This node's certificate.
    pub(crate) fn certificate(&self) -> &[u8] {
        &self.mine
    }

    /// A connection to `peer` is up (`dialed`: the address when this node dialled it).
    /// Returns whether it is the first (then this node presents its certificate).
    pub(crate) fn opened(&mut self, peer: PeerId, dialed: Option<Multiaddr>) -> bool {
        let first = !self.sessions.contains_key(&peer);
        let s = self.sessions.entry(peer).or_default();
        if dialed.is_some() {
            s.dialed = dialed;
        }
        first
    }

    /// This node's `Admit` went to `peer` as request `id`.
    pub(crate) fn asked(&mut self, id: OutboundRequestId, peer: PeerId) {
        self.asks.insert(id, peer);
    }

    /// The peer an answer to request `id` comes from, when `id` was this node's `Admit`.
    pub(crate) fn take_ask(&mut self, id: &OutboundRequestId) -> Option<PeerId> {
        self.asks.remove(id)
    }

    /// Checks the certificate `peer` presented, at unix time `now`; its index if it admits it.
    pub(crate) fn check(&self, peer: &PeerId, cert: &[u8], now: u64) -> Result<PeerIdx, Denial> {
        let expected = Expected { run: self.run, key: &self.key, roles: &self.accepts, now };
        let cert = admission::verify(Some(cert), &peer.to_bytes(), &expected)
            .map_err(|r| Denial { reason: r.reason(), detail: r.to_string() })?;
        let index = cert.claims.index;
        if index >= self.count || index == self.me {
            return Err(Denial {
                reason: "index",
                detail: format!(
                    "index {index} is not another member's (this run has nodes 0..{})",
                    self.count
                ),
            });
        }
        if let Some(had) = self.sessions.get(peer).and_then(|s| s.admitted)
            && had != index
        {
            return Err(Denial {
                reason: "index",
                detail: format!("this peer was admitted as index {had} on this connection, not {index}"),
            });
        }
        let taken = self.sessions.iter().any(|(p, s)| p != peer && s.admitted == Some(index));
        if taken {
            return Err(Denial {
                reason: "index in use",
                detail: format!("another connected peer holds index {index}"),
            });
        }
        Ok(index)
    }

    /// Whether this node must present its certificate to `peer` again when `peer` presents
    /// its own: an earlier process of that peer id accepted ours and none is in flight, so
    /// `peer` restarted while its old connection lingered (a host that crashed, a partition).
    pub(crate) fn must_present_again(&self, peer: &PeerId) -> bool {
        self.sessions.get(peer).is_some_and(|s| s.accepted) && !self.asks.values().any(|p| p == peer)
    }

    /// `peer`'s certificate was accepted for `index`; it can be dialled at `address`. Returns
    /// whether it just became ready.
    pub(crate) fn admit(&mut self, peer: PeerId, index: PeerIdx, address: &str) -> bool {
        let s = self.sessions.entry(peer).or_default();
        s.admitted = Some(index);
        s.address = address.to_owned();
        Self::ready_now(s)
    }

    /// `peer` accepted this node's certificate. Returns whether it just became ready.
    pub(crate) fn accepted(&mut self, peer: PeerId) -> bool {
        let s = self.sessions.entry(peer).or_default();
        s.accepted = true;
        Self::ready_now(s)
    }

    /// The ready members other than `peer` with an address, by index (what `peer` is told).
    pub(crate) fn others(&self, peer: &PeerId) -> Vec<(PeerIdx, String)> {
        let mut m: Vec<(PeerIdx, String)> = self
            .sessions
            .iter()
            .filter(|(p, s)| *p != peer && s.announced && !s.address.is_empty())
            .filter_map(|(_, s)| Some((s.admitted?, s.address.clone())))
            .collect();
        m.sort();
        m
    }

    /// This node's `Members` went out as request `id`.
    pub(crate) fn told(&mut self, id: OutboundRequestId) {
        self.tellings.insert(id);
    }

    /// Whether request `id` was a `Members` (its answer is consumed here).
    pub(crate) fn take_telling(&mut self, id: &OutboundRequestId) -> bool {
        self.tellings.remove(id)
    }

    /// `peer`'s index when its certificate was accepted here.
    pub(crate) fn admitted(&self, peer: &PeerId) -> Option<PeerIdx> {
        self.sessions.get(peer)?.admitted
    }

    /// Whether the role has been told `peer` is connected.
    pub(crate) fn is_ready(&self, peer: &PeerId) -> bool {
        self.sessions.get(peer).is_some_and(|s| s.announced)
    }

    /// The address this node dialled `peer` at, if it did.
    pub(crate) fn dialed(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.sessions.get(peer)?.dialed.clone()
    }

    /// Whether a `no certificate` refusal of `peer` should be recorded (the first of its
    /// session).
    pub(crate) fn record_refusal(&mut self, peer: PeerId) -> bool {
        let s = self.sessions.entry(peer).or_default();
        !std::mem::replace(&mut s.refusal_recorded, true)
    }

    /// The last connection to `peer` closed; whether the role had been told it was connected.
    pub(crate) fn closed(&mut self, peer: &PeerId) -> bool {
        self.asks.retain(|_, p| p != peer);
        self.sessions.remove(peer).is_some_and(|s| s.announced)
    }

    fn ready_now(s: &mut Session) -> bool {
        let ready = s.admitted.is_some() && s.accepted && !s.announced;
        s.announced |= ready;
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use peerless_core::admission::{AdmissionKey, Certificate, Claims};

    const RUN: RunId = RunId([3; 16]);

    fn cert(peer: &PeerId, index: u32, role: Role) -> Vec<u8> {
        let claims = Claims { run: RUN, peer_id: peer.to_bytes(), role, index, expires: 100 };
        Certificate::sign(claims, &AdmissionKey::from_seed([5; 32])).encode()
    }

    fn gate() -> Gate {
        let key = AdmissionKey::from_seed([5; 32]).public();
        Gate::new(RUN, key, vec![Role::Peer], 3, 0, Vec::new())
    }

    fn id() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn a_peer_is_ready_once_both_certificates_were_accepted_in_either_order() {
        let mut g = gate();
        let (a, b) = (id(), id());
        assert!(g.opened(a, None) && !g.opened(a, None), "the first connection presents");
        assert_eq!(g.check(&a, &cert(&a, 1, Role::Peer), 10), Ok(1));
        assert!(!g.admit(a, 1, ""));
        assert!(g.accepted(a) && g.is_ready(&a));
        assert!(!g.accepted(a), "ready once");
        g.opened(b, None);
        assert!(!g.accepted(b));
        assert!(g.admit(b, 2, ""));
        assert!(g.closed(&a) && g.admitted(&a).is_none(), "closing forgets the session");
    }

    #[test]
    fn a_peer_that_presents_again_after_accepting_ours_gets_ours_again() {
        let mut g = gate();
        let a = id();
        g.opened(a, None);
        assert!(!g.must_present_again(&a), "ours has not been accepted yet");
        g.admit(a, 1, "");
        g.accepted(a);
        assert!(g.must_present_again(&a), "a restarted process of a needs ours again");
    }

    #[test]
    fn a_new_member_is_told_the_other_ready_members_with_an_address() {
        let mut g = gate();
        let (a, b, c) = (id(), id(), id());
        for (p, i, addr) in [(a, 1, "/ip4/10.0.0.1/tcp/1"), (b, 2, "/ip4/10.0.0.2/tcp/2")] {
            g.opened(p, None);
            g.admit(p, i, addr);
        }
        assert!(g.others(&b).is_empty(), "a is not ready yet (it has not accepted ours)");
        g.accepted(a);
        g.accepted(b);
        assert_eq!(g.others(&b), vec![(1, "/ip4/10.0.0.1/tcp/1".to_string())]);
        g.closed(&a);
        g.opened(c, None);
        g.admit(c, 1, "");
        g.accepted(c);
        assert!(g.others(&b).is_empty(), "c has no address, a is gone: {:?}", g.others(&b));
    }

    #[test]
    fn indices_out_of_range_mine_or_held_by_another_connected_peer_are_denied() {
        let mut g = gate();
        let (a, b) = (id(), id());
        assert_eq!(g.check(&a, &cert(&a, 3, Role::Peer), 10).unwrap_err().reason, "index");
        assert_eq!(g.check(&a, &cert(&a, 0, Role::Peer), 10).unwrap_err().reason, "index");
        g.opened(a, None);
        g.admit(a, 1, "");
        assert_eq!(g.check(&b, &cert(&b, 1, Role::Peer), 10).unwrap_err().reason, "index in use");
        assert_eq!(
            g.check(&a, &cert(&a, 2, Role::Peer), 10).unwrap_err().reason,
            "index",
            "one index a session"
        );
        g.closed(&a);
        assert_eq!(g.check(&b, &cert(&b, 1, Role::Peer), 10), Ok(1), "free again once a's gone");
    }

    #[test]
    fn the_core_refusal_is_named() {
        let g = gate();
        let (a, b) = (id(), id());
        assert_eq!(g.check(&a, &cert(&a, 1, Role::Worker), 10).unwrap_err().reason, "wrong role");
        assert_eq!(g.check(&b, &cert(&a, 1, Role::Peer), 10).unwrap_err().reason, "peer id mismatch");
        assert_eq!(g.check(&a, &cert(&a, 1, Role::Peer), 100).unwrap_err().reason, "expired");
    }
}
