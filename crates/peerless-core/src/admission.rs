//! Admission certificates: who may take part in a run, signed by the run's owner, and their
//! verification against the peer id a connection authenticated.
//!
//! A run has an id ([`RunId`], 16 random bytes) and an ed25519 admission key; its owner keeps
//! the private half ([`AdmissionKey`]) and publishes the public half ([`PublicKey`]) in the run
//! file. A [`Certificate`] says "peer id `P` is member `index` of run `R` in role `role` until
//! `expires`", signed by the admission key. The core protocols keep identifying members by
//! index; the certificate is what binds an index to a peer id.
//!
//! # Encoding (version 1)
//!
//! ```text
//! "PLCT"  version:u8=1  run:[16]  role:u8  index:u32  expires:u64  peer_len:u8  peer:[peer_len]  signature:[64]
//! ```
//!
//! Integers little-endian; `role` is 1 (peer), 2 (worker) or 3 (ps); `expires` is unix seconds
//! (the certificate is valid while `now < expires`); `peer` is the libp2p peer id's bytes (a
//! multihash, 1..=64 bytes, opaque here). The signature is ed25519 over
//! `"peerless admission certificate v1\0"` followed by every byte before the signature, so a
//! signature over any other peerless structure (or another version) never verifies as one.
//!
//! # Verification
//!
//! [`verify`] takes the certificate (or its absence), the peer id the Noise handshake
//! authenticated, and what this node expects ([`Expected`]: run, key, roles, the time), and
//! refuses with one [`Refusal`] in this order: no certificate, malformed, wrong run, signature,
//! peer id mismatch, wrong role, expired. Wrong run comes before the signature so that another
//! run's (validly signed) certificate is named as such; anything unsigned is refused either way.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

const MAGIC: &[u8; 4] = b"PLCT";
/// The encoding's version.
pub const VERSION: u8 = 1;
/// What every signed message starts with.
const DOMAIN: &[u8] = b"peerless admission certificate v1\0";
/// Bytes of a run id.
pub const RUN_ID_LEN: usize = 16;
/// Longest peer id accepted, bytes (an ed25519 peer id is 38).
pub const MAX_PEER_ID: usize = 64;
const SIGNATURE_LEN: usize = 64;

/// A run's identity: 16 random bytes, written as 32 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub [u8; RUN_ID_LEN]);

/// Peer indices run below this: the starting members are `0..cluster.nodes`, peers that join
/// a running run (elastic membership) take the indices above.
pub const MAX_PEERS: u32 = 1024;

/// What a member does in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A P2P peer.
    Peer,
    /// A PS worker.
    Worker,
    /// The parameter server.
    Ps,
}

/// The private half of a run's admission key (ed25519).
pub struct AdmissionKey(SigningKey);

/// The public half of a run's admission key, written as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

/// What a certificate states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The run.
    pub run: RunId,
    /// The member's libp2p peer id, as bytes.
    pub peer_id: Vec<u8>,
    /// Its role.
    pub role: Role,
    /// Its node index (the core protocols' `PeerIdx`).
    pub index: u32,
    /// Unix seconds from which it is no longer valid.
    pub expires: u64,
}

/// Claims signed with the run's admission key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// What it states.
    pub claims: Claims,
    signature: [u8; SIGNATURE_LEN],
}

/// Why bytes are not a certificate, or text not a run id, role or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not a certificate.
    #[error("not a peerless certificate (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("certificate version {0} is not supported (this build reads version {VERSION})")]
    Version(u8),
    /// The bytes ended early.
    #[error("truncated certificate: {0} missing")]
    Truncated(&'static str),
    /// Bytes after the signature.
    #[error("{0} trailing bytes after the certificate")]
    Trailing(usize),
    /// A field out of its range, or text that does not parse.
    #[error("malformed {field}: {reason}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Why a certificate does not admit its presenter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// None was presented.
    #[error("no certificate")]
    NoCertificate,
    /// The bytes are not a certificate.
    #[error("malformed certificate: {0}")]
    Malformed(CertError),
    /// It is for another run.
    #[error("wrong run: the certificate is for run {got}, this is run {want}")]
    WrongRun {
        /// Its run.
        got: RunId,
        /// This node's run.
        want: RunId,
    },
    /// The run's admission key did not sign it.
    #[error("signature: the certificate is not signed by this run's admission key")]
    Signature,
    /// It names another peer than the one that presented it.
    #[error("peer id mismatch: the certificate names another peer than the one presenting it")]
    PeerIdMismatch,
    /// It is for a role this node does not accept.
    #[error("wrong role: the certificate is for a {got}, this node accepts {want}")]
    WrongRole {
        /// Its role.
        got: Role,
        /// What is accepted.
        want: String,
    },
    /// It expired.
    #[error("expired: the certificate expired at unix time {expires}, now is {now}")]
    Expired {
        /// Its expiry.
        expires: u64,
        /// The time of the check.
        now: u64,
    },
}

impl Refusal {
    /// The short reason events name: `no certificate`, `malformed`, `wrong run`, `signature`,
    /// `peer id mismatch`, `wrong role`, `expired`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no certificate",
            Refusal::Malformed(_) => "malformed",
            Refusal::WrongRun { .. } => "wrong run",
            Refusal::Signature => "signature",
            Refusal::PeerIdMismatch => "peer id mismatch",
            Refusal::WrongRole { .. } => "wrong role",
            Refusal::Expired { .. } => "expired",
        }
    }
}

/// What a node admits.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// Its run.
    pub run: RunId,
    /// Its run's admission key.
    pub key: &'a PublicKey,
    /// The roles it talks to (a peer: peers; the PS: workers; a worker: the PS).
    pub roles: &'a [Role],
    /// Unix seconds now.
    pub now: u64,
}

impl AdmissionKey {
    /// The key whose ed25519 secret is `seed` (draw it from the OS's RNG).
    pub fn from_seed(seed: [u8; 32]) -> AdmissionKey {
        AdmissionKey(SigningKey::from_bytes(&seed))
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl fmt::Debug for AdmissionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdmissionKey(public {})", self.public())
    }
}

impl PublicKey {
    /// The key of 32 bytes, if they are an ed25519 public key.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublicKey, CertError> {
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| CertError::Malformed { field: "admission public key", reason: e.to_string() })
    }

    /// Its 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl Role {
    /// Its name in files, flags and events.
    pub fn name(self) -> &'static str {
        match self {
            Role::Peer => "peer",
            Role::Worker => "worker",
            Role::Ps => "ps",
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Peer => 1,
            Role::Worker => 2,
            Role::Ps => 3,
        }
    }

    fn from_code(code: u8) -> Option<Role> {
        [Role::Peer, Role::Worker, Role::Ps].into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Role, CertError> {
        [Role::Peer, Role::Worker, Role::Ps].into_iter().find(|r| r.name() == s).ok_or_else(|| {
            CertError::Malformed { field: "role", reason: format!("{s:?} is not one of peer, worker, ps") }
        })
    }
}

impl Certificate {
    /// `claims` signed with `key`.
    ///
    /// # Panics
    /// When the peer id is empty or longer than [`MAX_PEER_ID`] (a caller's error: peer ids
    /// come from libp2p).
    pub fn sign(claims: Claims, key: &AdmissionKey) -> Certificate {
        assert!(
            (1..=MAX_PEER_ID).contains(&claims.peer_id.len()),
            "a peer id has 1..={MAX_PEER_ID} bytes, not {}",
            claims.peer_id.len()
        );
        let signature = key.0.sign(&signed_message(&claims)).to_bytes();
        Certificate { claims, signature }
    }

    /// Its bytes (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = claims_bytes(&self.claims);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Parses bytes written by [`Certificate::encode`]; checks the form, not the signature.
    pub fn decode(bytes: &[u8]) -> Result<Certificate, CertError> {
        let mut r = Reader(bytes);
        if r.take("magic", 4)? != MAGIC {
            return Err(CertError::BadMagic);
        }
        let version = r.take("version", 1)?[0];
        if version != VERSION {
            return Err(CertError::Version(version));
        }
        let run = RunId(r.array("run id")?);
        let code = r.take("role", 1)?[0];
        let role = Role::from_code(code).ok_or_else(|| CertError::Malformed {
            field: "role",
            reason: format!("unknown role code {code}"),
        })?;
        let index = u32::from_le_bytes(r.array("index")?);
        let expires = u64::from_le_bytes(r.array("expiry")?);
        let len = usize::from(r.take("peer id length", 1)?[0]);
        if !(1..=MAX_PEER_ID).contains(&len) {
            return Err(CertError::Malformed {
                field: "peer id length",
                reason: format!("{len} bytes (1..={MAX_PEER_ID})"),
            });
        }
        let peer_id = r.take("peer id", len)?.to_vec();
        let signature = r.array("signature")?;
        if !r.0.is_empty() {
            return Err(CertError::Trailing(r.0.len()));
        }
        Ok(Certificate { claims: Claims { run, peer_id, role, index, expires }, signature })
    }
}

/// Checks that `cert` admits the peer that authenticated as `presenter` (its peer id's bytes)
/// to a node expecting `expected`; returns what it states. The order of the checks is in the
/// module docs.
pub fn verify(
    cert: Option<&[u8]>,
    presenter: &[u8],
    expected: &Expected<'_>,
) -> Result<Certificate, Refusal> {
    let bytes = cert.ok_or(Refusal::NoCertificate)?;
    let cert = Certificate::decode(bytes).map_err(Refusal::Malformed)?;
    let c = &cert.claims;
    if c.run != expected.run {
        return Err(Refusal::WrongRun { got: c.run, want: expected.run });
    }
    let signature = Signature::from_bytes(&cert.signature);
    expected.key.0.verify_strict(&signed_message(c), &signature).map_err(|_| Refusal::Signature)?;
    if c.peer_id != presenter {
        return Err(Refusal::PeerIdMismatch);
    }
    if !expected.roles.contains(&c.role) {
        let want = expected.roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or ");
        return Err(Refusal::WrongRole { got: c.role, want });
    }
    if expected.now >= c.expires {
        return Err(Refusal::Expired { expires: c.expires, now: expected.now });
    }
    Ok(cert)
}

fn claims_bytes(c: &Claims) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + c.peer_id.len() + SIGNATURE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&c.run.0);
    out.push(c.role.code());
    out.extend_from_slice(&c.index.to_le_bytes());
    out.extend_from_slice(&c.expires.to_le_bytes());
    out.push(u8::try_from(c.peer_id.len()).expect("invariant: a peer id has at most 64 bytes"));
    out.extend_from_slice(&c.peer_id);
    out
}

fn signed_message(c: &Claims) -> Vec<u8> {
    [DOMAIN, &claims_bytes(c)].concat()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], CertError> {
        if self.0.len() < n {
            return Err(CertError::Truncated(field));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CertError> {
        Ok(self.take(field, N)?.try_into().expect("invariant: take returned N bytes"))
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from `2N` hex characters (either case).
fn unhex<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], CertError> {
    let bad = || CertError::Malformed { field, reason: format!("{s:?} is not {} hex characters", 2 * N) };
    if s.len() != 2 * N || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({self})")
    }
}

impl FromStr for RunId {
    type Err = CertError;

    fn from_str(s: &str) -> Result<RunId, CertError> {
        unhex("run id", s).map(RunId)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = CertError;

    fn from_str(s: &str) -> Result<PublicKey, CertError> {
        PublicKey::from_bytes(unhex("admission public key", s)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: RunId = RunId([7; 16]);
    const NOW: u64 = 1_800_000_000;
    const ME: &[u8] = b"\x00\x24peer-id-of-the-member-presenting-it";

    fn key(seed: u8) -> AdmissionKey {
        AdmissionKey::from_seed([seed; 32])
    }

    fn claims(role: Role) -> Claims {
        Claims { run: RUN, peer_id: ME.to_vec(), role, index: 2, expires: NOW + 3600 }
    }

    fn check(cert: Option<&[u8]>, presenter: &[u8], roles: &[Role]) -> Result<Certificate, Refusal> {
        let public = key(1).public();
        verify(cert, presenter, &Expected { run: RUN, key: &public, roles, now: NOW })
    }

    #[test]
    fn a_certificate_round_trips_and_admits_its_peer() {
        let cert = Certificate::sign(claims(Role::Peer), &key(1));
        let bytes = cert.encode();
        assert_eq!(Certificate::decode(&bytes).unwrap(), cert);
        let ok = check(Some(&bytes), ME, &[Role::Peer]).unwrap();
        assert_eq!(ok.claims, claims(Role::Peer));
    }

    #[test]
    fn no_certificate_is_refused() {
        let err = check(None, ME, &[Role::Peer]).unwrap_err();
        assert_eq!(err.reason(), "no certificate");
    }

    #[test]
    fn another_runs_certificate_is_refused_as_wrong_run() {
        let other = Claims { run: RunId([8; 16]), ..claims(Role::Peer) };
        // Signed by that run's own key, as the other run's owner would.
        let bytes = Certificate::sign(other, &key(2)).encode();
        let err = check(Some(&bytes), ME, &[Role::Peer]).unwrap_err();
        assert_eq!(err.reason(), "wrong run", "{err}");
        assert!(err.to_string().contains(&RunId([8; 16]).to_string()), "{err}");
    }

    #[test]
    fn a_worker_certificate_is_refused_where_a_peer_is_expected() {
        let bytes = Certificate::sign(claims(Role::Worker), &key(1)).encode();
        let err = check(Some(&bytes), ME, &[Role::Peer]).unwrap_err();
        assert_eq!(err.reason(), "wrong role");
        assert_eq!(err.to_string(), "wrong role: the certificate is for a worker, this node accepts peer");
        assert!(check(Some(&bytes), ME, &[Role::Worker]).is_ok());
    }

    #[test]
    fn an_expired_certificate_is_refused_from_its_expiry_on() {
        let c = Claims { expires: NOW, ..claims(Role::Peer) };
        let bytes = Certificate::sign(c.clone(), &key(1)).encode();
        let err = check(Some(&bytes), ME, &[Role::Peer]).unwrap_err();
        assert_eq!(err.reason(), "expired");
        let live = Certificate::sign(Claims { expires: NOW + 1, ..c }, &key(1)).encode();
        assert!(check(Some(&live), ME, &[Role::Peer]).is_ok(), "valid until the second it expires");
    }

    #[test]
    fn a_certificate_signed_by_another_key_or_altered_is_refused_as_signature() {
        let forged = Certificate::sign(claims(Role::Peer), &key(9)).encode();
        assert_eq!(check(Some(&forged), ME, &[Role::Peer]).unwrap_err().reason(), "signature");
        // A member raises its own certificate's expiry: every signed field counts.
        let mut altered = Certificate::sign(claims(Role::Peer), &key(1)).encode();
        let expiry_at = 4 + 1 + 16 + 1 + 4;
        altered[expiry_at + 7] = 0x7f;
        assert_eq!(check(Some(&altered), ME, &[Role::Peer]).unwrap_err().reason(), "signature");
        // A signature with the run key over the bare claims (no domain) is not a certificate's.
        let c = claims(Role::Peer);
        let bare = key(1).0.sign(&claims_bytes(&c)).to_bytes();
        let undomained = [claims_bytes(&c), bare.to_vec()].concat();
        assert_eq!(check(Some(&undomained), ME, &[Role::Peer]).unwrap_err().reason(), "signature");
    }

    #[test]
    fn another_members_certificate_presented_with_a_different_key_is_refused() {
        let theirs = Certificate::sign(claims(Role::Peer), &key(1)).encode();
        let err =
            check(Some(&theirs), b"\x00\x24a-different-authenticated-peer-id", &[Role::Peer]).unwrap_err();
        assert_eq!(err.reason(), "peer id mismatch");
    }

    #[test]
    fn malformed_bytes_are_refused_with_what_is_wrong() {
        let good = Certificate::sign(claims(Role::Peer), &key(1)).encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"XXXX".to_vec(), "bad magic"),
            ([&good[..4], &[2], &good[5..]].concat(), "version 2"),
            (good[..good.len() - 1].to_vec(), "truncated"),
            ([good.clone(), vec![0]].concat(), "trailing"),
            ([&good[..21], &[9], &good[22..]].concat(), "role"),
        ];
        for (bytes, want) in cases {
            let err = check(Some(&bytes), ME, &[Role::Peer]).unwrap_err();
            assert_eq!(err.reason(), "malformed");
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
    }

    #[test]
    fn decoding_never_panics_on_any_prefix_or_mutation() {
        let good = Certificate::sign(claims(Role::Peer), &key(1)).encode();
        for n in 0..good.len() {
            assert!(Certificate::decode(&good[..n]).is_err());
        }
        for i in 0..good.len() {
            for b in [0u8, 1, 0x41, 0xff] {
                let mut m = good.clone();
                m[i] = b;
                let _ = Certificate::decode(&m);
            }
        }
    }

    #[test]
    fn run_ids_roles_and_keys_have_one_spelling() {
        assert_eq!(RUN.to_string().parse::<RunId>().unwrap(), RUN);
        assert!("07".parse::<RunId>().unwrap_err().to_string().contains("run id"));
        let pk = key(1).public();
        assert_eq!(pk.to_string().parse::<PublicKey>().unwrap(), pk);
        for r in [Role::Peer, Role::Worker, Role::Ps] {
            assert_eq!(r.name().parse::<Role>().unwrap(), r);
        }
        assert!("boss".parse::<Role>().unwrap_err().to_string().contains("peer, worker, ps"));
    }
}
