//! The peer-to-peer wire format: what peers send each other, and its validating codec.
//!
//! Every message is `b"PLS1"`, a one-byte kind, then the kind's fields in little-endian order;
//! vectors are a `u32` length followed by raw `f32`s, strings a `u16` length and UTF-8. Raw
//! floats rather than a self-describing format: a gradient is a megabyte of numbers, and the
//! measured cost of a generic encoder (cbor) on it is several times a memcpy.
//!
//! [`decode`] validates before anything is used: the magic, the kind, every length against the
//! bytes present and against [`Limits`] (a gradient or state must have exactly the model's
//! length), finiteness of every value, and no trailing bytes. It never panics on any input
//! (a property test feeds it arbitrary bytes). Round numbers are checked by the state machine,
//! which knows the current round.
//!
//! A state can also travel in parts ([`Message::StatePartRequest`], [`Message::StatePart`]):
//! the encoded [`Message::State`] cut into [`state_parts`] slices, each answered on a stream of
//! its own and put back together by [`StateAssembly`], which decodes (and so validates) the
//! whole once every part is in. On a multiplexed connection each stream may send 256 KiB before
//! its receiver grants more (yamux's initial window): a 2 MB state in one answer waits for a
//! window update about every 128–256 KiB, each a hop through both processes, which on a loaded
//! machine costs milliseconds apiece; parts of at most [`STATE_PART_BYTES`] all go at once.

use crate::compress::{Compressed, INT8_BLOCK};
use crate::flat::Digest;
use crate::optim::OptimizerState;

const MAGIC: &[u8; 4] = b"PLS1";

/// A message between peers.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A peer's aggregated gradient `G_i^r` for round `round`.
    Gradient(GradientMsg),
    /// The same, compressed (`p2p.compression`); receivers densify it into a
    /// [`Message::Gradient`] ([`CompressedMsg::densify`]) before anything else sees it.
    Compressed(CompressedMsg),
    /// "I take part from round `round` on" (after a join or a resynchronisation).
    Join {
        /// First round the sender will contribute to.
        round: u64,
    },
    /// The sender applied its last round; `digest` is its final parameters' digest.
    Final {
        /// Rounds done.
        round: u64,
        /// Digest of the final parameters.
        digest: Digest,
    },
    /// A worker asks the parameter server for model version `round` or newer (answered with
    /// [`Message::Params`] once that version is published).
    ParamsRequest {
        /// Lowest version wanted.
        round: u64,
    },
    /// A request for the sender's state at its next round boundary.
    StateRequest,
    /// A request for part `part` of `parts` of the sender's state, served like a
    /// [`Message::StateRequest`] once all `parts` requests of fetch `fetch` are in (each
    /// answered with its [`Message::StatePart`] from one encoding of the state). A request of
    /// another fetch drops those of the earlier one, so the parts of one answer never mix two
    /// encodings.
    StatePartRequest {
        /// The requester's number for this fetch.
        fetch: u64,
        /// Which part, `< parts`.
        part: u16,
        /// How many, `1..=`[`MAX_STATE_PARTS`].
        parts: u16,
    },
    /// Part `part` of `parts` of an encoded [`Message::State`]: its bytes from
    /// `part · len / parts` up to `(part + 1) · len / parts` (see [`state_part`]).
    StatePart {
        /// Which part, `< parts`.
        part: u16,
        /// How many, `1..=`[`MAX_STATE_PARTS`].
        parts: u16,
        /// The slice, at most [`max_state_len`] bytes.
        bytes: Vec<u8>,
    },
    /// The answer to any request that is not a state request.
    Ack,
    /// The answer to a [`Message::StateRequest`].
    State(StateMsg),
    /// The parameter server's answer to a [`Message::ParamsRequest`]: a model version (the
    /// optimizer stays on the PS).
    Params(ParamsMsg),
    /// The peers whose gradients for `round` the sender received before it stopped waiting
    /// (itself included), ascending: what the P2P round's agreement step intersects.
    Received {
        /// Round.
        round: u64,
        /// Peer indices, strictly ascending.
        peers: Vec<u32>,
    },
    /// "Send me your gradient of `round` again" (a joiner that connected after it went out).
    Resend {
        /// Round.
        round: u64,
    },
    /// "I am alive" (a P2P peer sends one to each connected peer every fifth of
    /// `p2p.detection_ms`, so a frozen one is noticed).
    Heartbeat,
    /// "Admit me": the sender's admission certificate
    /// ([`crate::admission::Certificate`]'s bytes, at most [`MAX_CERTIFICATE`]), sent once a
    /// connection is up; answered [`Message::Ack`] or [`Message::Refused`] with the reason.
    Admit {
        /// The certificate's bytes (checked by [`crate::admission::verify`], not here).
        certificate: Vec<u8>,
        /// Where the sender can be dialled (a multiaddr; empty when it does not know).
        address: String,
    },
    /// The other members the sender admitted, and where each can be dialled (sent to a member
    /// once it is admitted, so that one bootstrap address is enough to reach them all).
    Members {
        /// `(node index, multiaddr)`, indices strictly ascending, at most [`MAX_MEMBERS`].
        members: Vec<(u32, String)>,
    },
    /// "Send me your gradients over a plain TCP connection to this port, first writing this
    /// token" (`p2p.tensor_transport = "tcp"`): the tensor lane, offered over the authenticated
    /// channel, so that a lane connection is only accepted from the peer the token was given to.
    LaneOffer {
        /// The TCP port of the sender's lane listener, on the address the receiver reaches it at.
        port: u16,
        /// A random token, good for this peer's lane connections to the sender.
        token: [u8; LANE_TOKEN],
    },
    /// A request was refused; the reason says why.
    Refused {
        /// Why.
        reason: String,
    },
}

/// One peer's gradient for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientMsg {
    /// Round (= model version the gradient was computed at).
    pub round: u64,
    /// Fingerprint of the sender's parameters at that version ([`crate::flat::fingerprint`]).
    pub digest: Digest,
    /// Samples behind the gradient.
    pub samples: u64,
    /// Mean training loss over those samples.
    pub loss: f32,
    /// The gradient (mean over the sender's batches).
    pub grad: Vec<f32>,
}

/// One peer's compressed gradient for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressedMsg {
    /// Round (= model version the gradient was computed at).
    pub round: u64,
    /// Digest of the sender's parameters at that version.
    pub digest: Digest,
    /// Samples behind the gradient.
    pub samples: u64,
    /// Mean training loss over those samples.
    pub loss: f32,
    /// The gradient, compressed.
    pub grad: Compressed,
}

impl CompressedMsg {
    /// The gradient message every receiver sees: the same dense bits the sender kept.
    pub fn densify(&self) -> GradientMsg {
        GradientMsg {
            round: self.round,
            digest: self.digest,
            samples: self.samples,
            loss: self.loss,
            grad: self.grad.densify(),
        }
    }
}

/// A peer's full training state at the start of round `round`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateMsg {
    /// The next round to run (parameters are model version `round`).
    pub round: u64,
    /// Digest of `params`.
    pub digest: Digest,
    /// Parameters.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub optimizer: OptimizerState,
    /// The peers the next round needs a quorum of, as the sender holds them (ascending; see
    /// `p2p`'s *Quorum*): a peer adopting the state adopts them with it.
    pub base: Vec<u32>,
}

/// Model version `round` as the parameter server publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamsMsg {
    /// The version.
    pub round: u64,
    /// Digest of `params`.
    pub digest: Digest,
    /// Parameters.
    pub params: Vec<f32>,
}

/// What a receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The model's parameter count: every gradient, parameter and optimizer vector must have
    /// exactly this length.
    pub params: usize,
}

/// Why bytes were not a valid message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Not a peerless message (or another version of the protocol).
    #[error("bad magic: not a peerless message of protocol PLS1")]
    BadMagic,
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The message ended before a field.
    #[error("truncated message: {field} needs {need} more bytes, {have} left")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A vector of the wrong length.
    #[error("{field} has {got} values, the model has {expected}")]
    WrongLength {
        /// Field.
        field: String,
        /// Length found.
        got: usize,
        /// Length required.
        expected: usize,
    },
    /// A NaN or infinity.
    #[error("{field} has a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// Field.
        field: String,
        /// Position.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Bytes after the end of the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// Text that is not UTF-8, or another malformed field.
    #[error("malformed {field}: {reason}")]
    Malformed {
        /// Field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

mod kind {
    pub const GRADIENT: u8 = 1;
    pub const JOIN: u8 = 2;
    pub const STATE_REQUEST: u8 = 3;
    pub const ACK: u8 = 4;
    pub const STATE: u8 = 5;
    pub const REFUSED: u8 = 6;
    pub const FINAL: u8 = 7;
    pub const PARAMS_REQUEST: u8 = 8;
    pub const PARAMS: u8 = 9;
    pub const RECEIVED: u8 = 10;
    pub const HEARTBEAT: u8 = 11;
    pub const RESEND: u8 = 12;
    pub const COMPRESSED: u8 = 13;
    pub const ADMIT: u8 = 14;
    pub const MEMBERS: u8 = 15;
    pub const STATE_PART_REQUEST: u8 = 16;
    pub const STATE_PART: u8 = 17;
    pub const LANE_OFFER: u8 = 18;
}

/// Bytes of a [`Message::LaneOffer`]'s token.
pub const LANE_TOKEN: usize = 32;

/// The codec byte of a [`Message::Compressed`].
mod codec {
    pub const INT8: u8 = 1;
    pub const TOP_K: u8 = 2;
    pub const INT4: u8 = 3;
}

/// Most members a [`Message::Members`] may list.
pub const MAX_MEMBERS: usize = 1024;

/// Most bytes a [`Message::Admit`] certificate may have (a version-1 certificate has ≤ 163).
pub const MAX_CERTIFICATE: usize = 1024;

/// Most peer indices a [`Message::Received`] may list.
pub const MAX_PEERS: usize = 1 << 16;

/// Most parts a state is fetched in.
pub const MAX_STATE_PARTS: u16 = 64;

/// Most bytes of an encoded state in one part: with its frame and message headers it stays
/// under the 256 KiB a yamux stream may send before its receiver grants more.
pub const STATE_PART_BYTES: usize = 192 << 10;

/// Into how many parts to cut a state of about `len` encoded bytes: parts of at most
/// [`STATE_PART_BYTES`], at least one, at most [`MAX_STATE_PARTS`].
pub fn state_parts(len: usize) -> u16 {
    len.div_ceil(STATE_PART_BYTES).clamp(1, usize::from(MAX_STATE_PARTS)) as u16
}

/// About how many bytes a state of `floats` `f32`s (parameters and optimizer buffers) encodes
/// to: the floats and a little.
pub fn state_len(floats: usize) -> usize {
    floats * 4 + 128
}

/// The bytes of part `part` of `parts` of `bytes` (an encoded state): from `part · len / parts`
/// up to `(part + 1) · len / parts`, so that the parts in order are `bytes` again.
///
/// # Panics
/// If `part >= parts`.
pub fn state_part(bytes: &[u8], part: u16, parts: u16) -> &[u8] {
    assert!(part < parts, "part {part} of {parts}");
    let (len, part, parts) = (bytes.len(), usize::from(part), usize::from(parts));
    &bytes[part * len / parts..(part + 1) * len / parts]
}

/// Most bytes an encoded state of a model within `limits` can have (a bound on what a
/// [`StateAssembly`] holds): parameters and at most 8 optimizer buffers, names, and the base.
pub fn max_state_len(limits: Limits) -> usize {
    let vec = 4 + limits.params * 4;
    let name = 2 + usize::from(u16::MAX);
    64 + vec + name + 8 * (name + vec) + 4 + MAX_PEERS * 4
}

/// A state arriving in parts: what came in so far, and the whole once every part is in.
#[derive(Debug, Clone, PartialEq)]
pub struct StateAssembly {
    parts: Vec<Option<Vec<u8>>>,
    len: usize,
    limits: Limits,
}

impl StateAssembly {
    /// Waits for `parts` parts (`1..=`[`MAX_STATE_PARTS`]) of a state of a model within
    /// `limits`.
    pub fn new(parts: u16, limits: Limits) -> Result<StateAssembly, WireError> {
        check_parts(0, parts)?;
        Ok(StateAssembly { parts: vec![None; usize::from(parts)], len: 0, limits })
    }

    /// How many parts it waits for in all.
    pub fn parts(&self) -> u16 {
        self.parts.len() as u16
    }

    /// Takes in the answer to part `part`: a [`Message::StatePart`] of the same part and count.
    /// Returns the state once every part is in; `Ok(None)` while parts are missing. An
    /// answer that is no such part (a refusal, a part of another count, one that came
    /// already, more bytes than a state can have), or parts that do not decode to a state
    /// together, are an error; the assembly is then of no further use.
    pub fn insert(&mut self, part: u16, answer: Message) -> Result<Option<StateMsg>, WireError> {
        let malformed = |reason: String| WireError::Malformed { field: "state part", reason };
        let bytes = match answer {
            Message::StatePart { part: p, parts, bytes } if p == part && parts == self.parts() => bytes,
            Message::StatePart { part: p, parts, .. } => {
                return Err(malformed(format!(
                    "part {p} of {parts} answers part {part} of {}",
                    self.parts()
                )));
            }
            Message::Refused { reason } => return Err(malformed(format!("refused: {reason}"))),
            other => return Err(malformed(format!("answered with {}", other.kind_name()))),
        };
        let slot =
            self.parts.get_mut(usize::from(part)).ok_or_else(|| malformed(format!("no part {part}")))?;
        if slot.is_some() {
            return Err(malformed(format!("part {part} came twice")));
        }
        self.len += bytes.len();
        if self.len > max_state_len(self.limits) {
            return Err(malformed(format!("{} bytes, more than a state can have", self.len)));
        }
        *slot = Some(bytes);
        if self.parts.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut whole = Vec::with_capacity(self.len);
        for p in &mut self.parts {
            whole.extend_from_slice(&p.take().expect("invariant: every part is in"));
        }
        match decode(&whole, self.limits)? {
            Message::State(s) => Ok(Some(s)),
            other => Err(malformed(format!("the parts make a {}, not a state", other.kind_name()))),
        }
    }
}

fn check_parts(part: u16, parts: u16) -> Result<(), WireError> {
    if parts == 0 || parts > MAX_STATE_PARTS || part >= parts {
        return Err(WireError::Malformed {
            field: "state part",
            reason: format!("part {part} of {parts} (at most {MAX_STATE_PARTS} parts)"),
        });
    }
    Ok(())
}

impl Message {
    /// The kind's name, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Gradient(_) => "gradient",
            Message::Compressed(_) => "compressed gradient",
            Message::Join { .. } => "join",
            Message::Final { .. } => "final",
            Message::ParamsRequest { .. } => "params request",
            Message::StateRequest => "state request",
            Message::StatePartRequest { .. } => "state part request",
            Message::StatePart { .. } => "state part",
            Message::Ack => "ack",
            Message::State(_) => "state",
            Message::Params(_) => "params",
            Message::Received { .. } => "received",
            Message::Resend { .. } => "resend",
            Message::Heartbeat => "heartbeat",
            Message::Admit { .. } => "admit",
            Message::Members { .. } => "members",
            Message::LaneOffer { .. } => "lane offer",
            Message::Refused { .. } => "refused",
        }
    }
}

/// Encodes a message.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + payload_len(msg)));
    w.0.extend_from_slice(MAGIC);
    match msg {
        Message::Gradient(g) => {
            w.u8(kind::GRADIENT);
            w.u64(g.round);
            w.0.extend_from_slice(&g.digest.0);
            w.u64(g.samples);
            w.f32(g.loss);
            w.vec(&g.grad);
        }
        Message::Compressed(c) => {
            w.u8(kind::COMPRESSED);
            w.u64(c.round);
            w.0.extend_from_slice(&c.digest.0);
            w.u64(c.samples);
            w.f32(c.loss);
            match &c.grad {
                Compressed::Int8 { scales, q } => {
                    w.u8(codec::INT8);
                    w.u32(q.len() as u32);
                    w.0.extend(scales.iter().flat_map(|x| x.to_le_bytes()));
                    w.0.extend(q.iter().map(|&x| x as u8));
                }
                Compressed::Int4 { scales, q } => {
                    w.u8(codec::INT4);
                    w.u32(q.len() as u32);
                    w.0.extend(scales.iter().flat_map(|x| x.to_le_bytes()));
                    w.0.extend(pack_nibbles(q));
                }
                Compressed::TopK { n, idx, vals } => {
                    w.u8(codec::TOP_K);
                    w.u32(*n);
                    w.u32(idx.len() as u32);
                    w.0.extend(idx.iter().flat_map(|x| x.to_le_bytes()));
                    w.0.extend(vals.iter().flat_map(|x| x.to_le_bytes()));
                }
            }
        }
        Message::Join { round } => {
            w.u8(kind::JOIN);
            w.u64(*round);
        }
        Message::Final { round, digest } => {
            w.u8(kind::FINAL);
            w.u64(*round);
            w.0.extend_from_slice(&digest.0);
        }
        Message::ParamsRequest { round } => {
            w.u8(kind::PARAMS_REQUEST);
            w.u64(*round);
        }
        Message::StateRequest => w.u8(kind::STATE_REQUEST),
        Message::StatePartRequest { fetch, part, parts } => {
            w.u8(kind::STATE_PART_REQUEST);
            w.u64(*fetch);
            w.u16(*part);
            w.u16(*parts);
        }
        Message::StatePart { part, parts, bytes } => w.state_part(*part, *parts, bytes),
        Message::Heartbeat => w.u8(kind::HEARTBEAT),
        Message::Resend { round } => {
            w.u8(kind::RESEND);
            w.u64(*round);
        }
        Message::Ack => w.u8(kind::ACK),
        Message::State(s) => {
            w.u8(kind::STATE);
            w.u64(s.round);
            w.0.extend_from_slice(&s.digest.0);
            w.vec(&s.params);
            w.str(&s.optimizer.kind);
            w.u64(s.optimizer.steps);
            w.u32(s.optimizer.buffers.len() as u32);
            for (name, v) in &s.optimizer.buffers {
                w.str(name);
                w.vec(v);
            }
            w.u32(s.base.len() as u32);
            for p in &s.base {
                w.u32(*p);
            }
        }
        Message::Params(p) => {
            w.u8(kind::PARAMS);
            w.u64(p.round);
            w.0.extend_from_slice(&p.digest.0);
            w.vec(&p.params);
        }
        Message::Received { round, peers } => {
            w.u8(kind::RECEIVED);
            w.u64(*round);
            w.u32(peers.len() as u32);
            for p in peers {
                w.u32(*p);
            }
        }
        Message::Admit { certificate, address } => {
            // At most u16::MAX bytes (longer is refused by `decode` anyway).
            let c = &certificate[..certificate.len().min(u16::MAX as usize)];
            w.u8(kind::ADMIT);
            w.u16(c.len() as u16);
            w.0.extend_from_slice(c);
            w.str(address);
        }
        Message::Members { members } => {
            w.u8(kind::MEMBERS);
            w.u32(members.len() as u32);
            for (index, address) in members {
                w.u32(*index);
                w.str(address);
            }
        }
        Message::LaneOffer { port, token } => {
            w.u8(kind::LANE_OFFER);
            w.u16(*port);
            w.0.extend_from_slice(token);
        }
        Message::Refused { reason } => {
            w.u8(kind::REFUSED);
            w.str(reason);
        }
    }
    w.0
}

/// Two 4-bit values to a byte, the even-indexed one in the low half; an odd count's last high
/// half is 0.
fn pack_nibbles(q: &[i8]) -> impl Iterator<Item = u8> + '_ {
    q.chunks(2).map(|p| (p[0] as u8 & 0x0f) | (p.get(1).map_or(0, |&x| x as u8) << 4))
}

/// The `n` values of [`pack_nibbles`]'s bytes, each in `−7..=7`.
fn unpack_nibbles(packed: &[u8], n: usize) -> Result<Vec<i8>, String> {
    let mut q = Vec::with_capacity(n);
    for &b in packed {
        // Sign-extended from 4 bits.
        q.push(((b << 4) as i8) >> 4);
        q.push((b as i8) >> 4);
    }
    if n % 2 == 1 && q.pop() != Some(0) {
        return Err("the unused half of the last byte is not 0".into());
    }
    if let Some(x) = q.iter().find(|&&x| x == -8) {
        return Err(format!("value {x} is outside −7..=7"));
    }
    Ok(q)
}

fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Gradient(g) => g.grad.len() * 4,
        Message::Compressed(c) => match &c.grad {
            Compressed::Int8 { scales, q } => scales.len() * 4 + q.len(),
            Compressed::Int4 { scales, q } => scales.len() * 4 + q.len().div_ceil(2),
            Compressed::TopK { idx, .. } => idx.len() * 8,
        },
        Message::Params(p) => p.params.len() * 4,
        Message::StatePart { bytes, .. } => bytes.len(),
        Message::Received { peers, .. } => peers.len() * 4,
        Message::State(s) => {
            (s.params.len() + s.optimizer.buffers.iter().map(|(_, v)| v.len()).sum::<usize>()) * 4
        }
        _ => 0,
    }
}

/// The length of a [`Message::Gradient`]'s encoding before its vector data: a transport may
/// read that data apart, straight into the `f32`s it becomes, and decode the message with
/// [`decode_gradient`] (a megabyte a round not copied once more).
pub const GRADIENT_HEAD: usize = 4 + 1 + 8 + 32 + 8 + 4 + 4;

/// The number of `f32`s that follow `head` if it begins a [`Message::Gradient`] that is
/// `frame` bytes long in all; `None` for any other message (whose bytes are then decoded
/// whole with [`decode`]). Nothing else is checked: [`decode_gradient`] does that.
pub fn gradient_len(head: &[u8; GRADIENT_HEAD], frame: usize) -> Option<usize> {
    let n = u32::from_le_bytes(head[GRADIENT_HEAD - 4..].try_into().expect("invariant: 4 bytes")) as usize;
    let whole = &head[..4] == MAGIC
        && head[4] == kind::GRADIENT
        && n.checked_mul(4).and_then(|b| b.checked_add(GRADIENT_HEAD)) == Some(frame);
    whole.then_some(n)
}

/// Decodes and validates a [`Message::Gradient`] given as its first [`GRADIENT_HEAD`] bytes and
/// its vector data, already as `f32`s: the checks of [`decode`], and the same message.
pub fn decode_gradient(
    head: &[u8; GRADIENT_HEAD],
    grad: Vec<f32>,
    limits: Limits,
) -> Result<Message, WireError> {
    let mut r = Reader { b: head, pos: 0 };
    if r.take("magic", 4)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    match r.u8("kind")? {
        kind::GRADIENT => {}
        other => {
            return Err(WireError::Malformed { field: "kind", reason: format!("{other} is not a gradient") });
        }
    }
    let (fields, n) = r.gradient_head(limits)?;
    if grad.len() != n {
        return Err(WireError::Truncated { field: "vector data", need: 4 * n, have: 4 * grad.len() });
    }
    finite("gradient", &grad)?;
    Ok(fields.with(grad))
}

/// Decodes and validates a message (see the module docs for what is checked).
pub fn decode(bytes: &[u8], limits: Limits) -> Result<Message, WireError> {
    let mut r = Reader { b: bytes, pos: 0 };
    if r.take("magic", 4)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let msg = match r.u8("kind")? {
        kind::GRADIENT => {
            let (fields, n) = r.gradient_head(limits)?;
            fields.with(r.floats("gradient", "vector data", n)?)
        }
        kind::COMPRESSED => {
            let round = r.u64("round")?;
            let digest = r.digest()?;
            let samples = r.u64("samples")?;
            let loss = r.f32("loss")?;
            let grad = r.compressed(limits.params)?;
            Message::Compressed(CompressedMsg { round, digest, samples, loss, grad })
        }
        kind::JOIN => Message::Join { round: r.u64("round")? },
        kind::FINAL => Message::Final { round: r.u64("round")?, digest: r.digest()? },
        kind::PARAMS_REQUEST => Message::ParamsRequest { round: r.u64("round")? },
        kind::STATE_REQUEST => Message::StateRequest,
        kind::STATE_PART_REQUEST => {
            let fetch = r.u64("fetch")?;
            let (part, parts) = (r.u16("part")?, r.u16("parts")?);
            check_parts(part, parts)?;
            Message::StatePartRequest { fetch, part, parts }
        }
        kind::STATE_PART => {
            let (part, parts) = (r.u16("part")?, r.u16("parts")?);
            check_parts(part, parts)?;
            let n = r.u32("state part length")? as usize;
            if n > max_state_len(limits) {
                return Err(WireError::Malformed {
                    field: "state part length",
                    reason: format!("{n} bytes, more than a state can have"),
                });
            }
            Message::StatePart { part, parts, bytes: r.take("state part", n)?.to_vec() }
        }
        kind::HEARTBEAT => Message::Heartbeat,
        kind::RESEND => Message::Resend { round: r.u64("round")? },
        kind::ACK => Message::Ack,
        kind::STATE => {
            let round = r.u64("round")?;
            let digest = r.digest()?;
            let params = r.vec("parameters", limits.params)?;
            let kind = r.str("optimizer kind")?;
            let steps = r.u64("optimizer steps")?;
            let n = r.u32("optimizer buffer count")? as usize;
            if n > 8 {
                return Err(WireError::Malformed {
                    field: "optimizer buffer count",
                    reason: format!("{n} buffers (at most 8)"),
                });
            }
            let mut buffers = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.str("optimizer buffer name")?;
                let v = r.vec(&format!("optimizer buffer {name}"), limits.params)?;
                buffers.push((name, v));
            }
            Message::State(StateMsg {
                round,
                digest,
                params,
                optimizer: OptimizerState { kind, steps, buffers },
                base: r.peers()?,
            })
        }
        kind::PARAMS => {
            let round = r.u64("round")?;
            let digest = r.digest()?;
            Message::Params(ParamsMsg { round, digest, params: r.vec("parameters", limits.params)? })
        }
        kind::RECEIVED => Message::Received { round: r.u64("round")?, peers: r.peers()? },
        kind::REFUSED => Message::Refused { reason: r.str("reason")? },
        kind::ADMIT => Message::Admit { certificate: r.certificate()?, address: r.str("address")? },
        kind::MEMBERS => Message::Members { members: r.members()? },
        kind::LANE_OFFER => Message::LaneOffer {
            port: r.u16("port")?,
            token: r.take("token", LANE_TOKEN)?.try_into().expect("invariant: took LANE_TOKEN bytes"),
        },
        other => return Err(WireError::UnknownKind(other)),
    };
    let left = bytes.len() - r.pos;
    if left != 0 {
        return Err(WireError::Trailing(left));
    }
    Ok(msg)
}

/// Encodes the [`Message::StatePart`] of `part` of `parts` holding `bytes`, without first
/// copying them into a message.
pub fn encode_state_part(part: u16, parts: u16, bytes: &[u8]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(16 + bytes.len()));
    w.0.extend_from_slice(MAGIC);
    w.state_part(part, parts, bytes);
    w.0
}

struct Writer(Vec<u8>);

impl Writer {
    fn state_part(&mut self, part: u16, parts: u16, bytes: &[u8]) {
        self.u8(kind::STATE_PART);
        self.u16(part);
        self.u16(parts);
        self.u32(bytes.len() as u32);
        self.0.extend_from_slice(bytes);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // At most u16::MAX bytes, cut at a character boundary so that the prefix is UTF-8.
        let mut end = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let b = &s.as_bytes()[..end];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn vec(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        crate::flat::extend_le_bytes(&mut self.0, v);
    }
}

/// A gradient's fields but its vector, as read ahead of the vector.
struct GradientHead {
    round: u64,
    digest: Digest,
    samples: u64,
    loss: f32,
}

impl GradientHead {
    fn with(self, grad: Vec<f32>) -> Message {
        let GradientHead { round, digest, samples, loss } = self;
        Message::Gradient(GradientMsg { round, digest, samples, loss, grad })
    }
}

/// Every value of `v` finite, or the error naming `field` and the first that is not.
fn finite(field: &str, v: &[f32]) -> Result<(), WireError> {
    match crate::flat::check_finite(field, v) {
        Ok(()) => Ok(()),
        Err(crate::flat::FlatError::NonFinite { index, value, .. }) => {
            Err(WireError::NonFinite { field: field.into(), index, value })
        }
        Err(e) => unreachable!("check_finite reports only non-finite values: {e}"),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        let have = self.b.len() - self.pos;
        if n > have {
            return Err(WireError::Truncated { field, need: n, have });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.take(field, 1)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(field, 2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(field, 4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(field, 8)?.try_into().expect("8 bytes")))
    }
    fn f32(&mut self, field: &'static str) -> Result<f32, WireError> {
        let v = f32::from_le_bytes(self.take(field, 4)?.try_into().expect("4 bytes"));
        if !v.is_finite() {
            return Err(WireError::NonFinite { field: field.into(), index: 0, value: v });
        }
        Ok(v)
    }
    fn digest(&mut self) -> Result<Digest, WireError> {
        Ok(Digest(self.take("digest", 32)?.try_into().expect("32 bytes")))
    }
    fn str(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u16(field)? as usize;
        let b = self.take(field, n)?;
        String::from_utf8(b.to_vec())
            .map_err(|e| WireError::Malformed { field, reason: format!("not UTF-8: {e}") })
    }
    /// A count, then that many strictly ascending peer indices.
    fn certificate(&mut self) -> Result<Vec<u8>, WireError> {
        let n = usize::from(self.u16("certificate length")?);
        if n > MAX_CERTIFICATE {
            return Err(WireError::Malformed {
                field: "certificate length",
                reason: format!("{n} bytes (at most {MAX_CERTIFICATE})"),
            });
        }
        Ok(self.take("certificate", n)?.to_vec())
    }

    fn members(&mut self) -> Result<Vec<(u32, String)>, WireError> {
        let n = self.u32("member count")? as usize;
        if n > MAX_MEMBERS {
            return Err(WireError::Malformed {
                field: "member count",
                reason: format!("{n} members (at most {MAX_MEMBERS})"),
            });
        }
        let mut members: Vec<(u32, String)> = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let index = self.u32("member index")?;
            if members.last().is_some_and(|(last, _)| *last >= index) {
                return Err(WireError::Malformed {
                    field: "member indices",
                    reason: "not strictly ascending".into(),
                });
            }
            members.push((index, self.str("member address")?));
        }
        Ok(members)
    }

    fn peers(&mut self) -> Result<Vec<u32>, WireError> {
        let n = self.u32("peer count")? as usize;
        if n > MAX_PEERS {
            return Err(WireError::Malformed {
                field: "peer count",
                reason: format!("{n} peers (at most {MAX_PEERS})"),
            });
        }
        let raw = self.take("peer indices", n * 4)?;
        let peers: Vec<u32> =
            raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        if !peers.windows(2).all(|w| w[0] < w[1]) {
            return Err(WireError::Malformed {
                field: "peer indices",
                reason: "not strictly ascending".into(),
            });
        }
        Ok(peers)
    }
    /// A codec byte, the dense length (the model's), then the codec's fields, all checked:
    /// int8 and int4 scales finite and non-negative, int4 values in `−7..=7` (an odd count's
    /// last byte with 0 as its high half, so a vector has one encoding); top-k indices
    /// strictly ascending below the length, at least one and at most the length of them,
    /// values finite.
    fn compressed(&mut self, params: usize) -> Result<Compressed, WireError> {
        let codec = self.u8("codec")?;
        let n = self.u32("vector length")? as usize;
        if n != params {
            return Err(WireError::WrongLength { field: "gradient".into(), got: n, expected: params });
        }
        let malformed = |field, reason: String| WireError::Malformed { field, reason };
        match codec {
            codec::INT8 => {
                let raw = self.take("int8 scales", n.div_ceil(INT8_BLOCK) * 4)?;
                let scales = crate::flat::from_le_bytes(raw).expect("invariant: a multiple of 4 bytes");
                if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
                    return Err(malformed("int8 scales", format!("scale {s} is not finite and ≥ 0")));
                }
                let q = self.take("int8 values", n)?.iter().map(|&b| b as i8).collect();
                Ok(Compressed::Int8 { scales, q })
            }
            codec::INT4 => {
                let raw = self.take("int4 scales", n.div_ceil(INT8_BLOCK) * 4)?;
                let scales = crate::flat::from_le_bytes(raw).expect("invariant: a multiple of 4 bytes");
                if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
                    return Err(malformed("int4 scales", format!("scale {s} is not finite and ≥ 0")));
                }
                let packed = self.take("int4 values", n.div_ceil(2))?;
                let q = unpack_nibbles(packed, n).map_err(|reason| malformed("int4 values", reason))?;
                Ok(Compressed::Int4 { scales, q })
            }
            codec::TOP_K => {
                let k = self.u32("top-k count")? as usize;
                if k > n || (k == 0 && n > 0) {
                    return Err(malformed("top-k count", format!("{k} of {n} elements")));
                }
                let raw = self.take("top-k indices", k * 4)?;
                let idx: Vec<u32> =
                    raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
                if !idx.windows(2).all(|w| w[0] < w[1]) || idx.last().is_some_and(|&i| i as usize >= n) {
                    return Err(malformed("top-k indices", format!("not strictly ascending below {n}")));
                }
                let vals = self.floats("top-k values", "top-k values", k)?;
                Ok(Compressed::TopK { n: n as u32, idx, vals })
            }
            other => Err(malformed("codec", format!("unknown codec {other}"))),
        }
    }

    /// `n` finite `f32`s, without a length prefix (`field` names them in errors, `part` in
    /// truncation errors).
    fn floats(&mut self, field: &str, part: &'static str, n: usize) -> Result<Vec<f32>, WireError> {
        let raw = self.take(part, n * 4)?;
        // Converted, then checked: two loops that vectorize, where one loop that stops at the
        // first bad value does not.
        let v = crate::flat::from_le_bytes(raw).expect("invariant: a multiple of 4 bytes");
        finite(field, &v)?;
        Ok(v)
    }

    /// A gradient's fields after its kind, up to and with its vector's length (which must be
    /// the model's).
    fn gradient_head(&mut self, limits: Limits) -> Result<(GradientHead, usize), WireError> {
        let round = self.u64("round")?;
        let digest = self.digest()?;
        let samples = self.u64("samples")?;
        let loss = self.f32("loss")?;
        let n = self.u32("vector length")? as usize;
        if n != limits.params {
            return Err(WireError::WrongLength { field: "gradient".into(), got: n, expected: limits.params });
        }
        Ok((GradientHead { round, digest, samples, loss }, n))
    }

    fn vec(&mut self, field: &str, expected: usize) -> Result<Vec<f32>, WireError> {
        let n = self.u32("vector length")? as usize;
        if n != expected {
            return Err(WireError::WrongLength { field: field.into(), got: n, expected });
        }
        self.floats(field, "vector data", n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const L: Limits = Limits { params: 5 };

    fn samples() -> Vec<Message> {
        vec![
            Message::Gradient(GradientMsg {
                round: 7,
                digest: Digest([3; 32]),
                samples: 256,
                loss: 0.5,
                grad: vec![1.0, -2.0, 0.0, 3.5, 1e-30],
            }),
            Message::Join { round: 12 },
            Message::Final { round: 40, digest: Digest([7; 32]) },
            Message::ParamsRequest { round: 3 },
            Message::StateRequest,
            Message::StatePartRequest { fetch: 7, part: 2, parts: 3 },
            Message::StatePart { part: 0, parts: 1, bytes: vec![1, 2, 3] },
            Message::StatePart { part: 63, parts: 64, bytes: vec![] },
            Message::Heartbeat,
            Message::Resend { round: 8 },
            Message::Ack,
            Message::State(StateMsg {
                round: 9,
                digest: Digest([9; 32]),
                params: vec![0.1; 5],
                optimizer: OptimizerState {
                    kind: "sgd".into(),
                    steps: 9,
                    buffers: vec![("momentum".into(), vec![0.2; 5])],
                },
                base: vec![0, 2, 5],
            }),
            Message::Params(ParamsMsg { round: 4, digest: Digest([4; 32]), params: vec![0.5; 5] }),
            Message::Received { round: 5, peers: vec![0, 2, 3] },
            Message::Received { round: 6, peers: vec![] },
            Message::Refused { reason: "not a member".into() },
            Message::Admit { certificate: vec![1, 2, 3], address: "/ip4/10.0.0.1/tcp/4001".into() },
            Message::Admit { certificate: vec![], address: String::new() },
            Message::Members { members: vec![(0, "/ip4/10.0.0.1/tcp/4001".into()), (2, String::new())] },
            Message::Members { members: vec![] },
            Message::LaneOffer { port: 40123, token: [7; LANE_TOKEN] },
            compressed(Compressed::Int8 { scales: vec![0.02], q: vec![-127, 0, 5, 127, 1] }),
            compressed(Compressed::Int4 { scales: vec![0.25], q: vec![-7, 0, 5, 7, -1] }),
            compressed(Compressed::TopK { n: 5, idx: vec![1, 4], vals: vec![-2.0, 3.5] }),
        ]
    }

    fn compressed(grad: Compressed) -> Message {
        Message::Compressed(CompressedMsg {
            round: 7,
            digest: Digest([3; 32]),
            samples: 64,
            loss: 0.25,
            grad,
        })
    }

    #[test]
    fn compressed_gradients_are_checked_and_densify_as_the_sender_kept_them() {
        let refused = [
            (Compressed::Int8 { scales: vec![-1.0], q: vec![0; 5] }, "scale -1"),
            (Compressed::Int8 { scales: vec![f32::NAN], q: vec![0; 5] }, "scale NaN"),
            (Compressed::Int4 { scales: vec![f32::INFINITY], q: vec![0; 5] }, "scale inf"),
            (Compressed::Int4 { scales: vec![1.0], q: vec![0, 0, -8, 0, 0] }, "value -8 is outside"),
            (Compressed::Int4 { scales: vec![1.0], q: vec![0, 0, 0, 0, 8] }, "value -8 is outside"),
            (Compressed::TopK { n: 5, idx: vec![3, 1], vals: vec![1.0, 1.0] }, "not strictly ascending"),
            (Compressed::TopK { n: 5, idx: vec![1, 5], vals: vec![1.0, 1.0] }, "below 5"),
            (Compressed::TopK { n: 5, idx: vec![], vals: vec![] }, "0 of 5"),
            (Compressed::TopK { n: 5, idx: vec![0], vals: vec![f32::INFINITY] }, "non-finite"),
            (Compressed::TopK { n: 6, idx: vec![0], vals: vec![1.0] }, "the model has 5"),
        ];
        for (grad, why) in refused {
            let err = decode(&encode(&compressed(grad.clone())), L).unwrap_err().to_string();
            assert!(err.contains(why), "{grad:?}: {err}");
        }
        let m = CompressedMsg {
            round: 2,
            digest: Digest([1; 32]),
            samples: 8,
            loss: 1.0,
            grad: Compressed::TopK { n: 5, idx: vec![0, 3], vals: vec![0.5, -1.0] },
        };
        assert_eq!(m.densify().grad, vec![0.5, 0.0, 0.0, -1.0, 0.0]);
        // Dense: a length and 4 bytes an element; top-k: a codec byte, the length, a count
        // and 8 bytes a kept element.
        let dense = encode(&Message::Gradient(m.densify())).len();
        let sparse = encode(&Message::Compressed(m)).len();
        assert_eq!(sparse + (4 + 5 * 4), dense + (1 + 4 + 4 + 2 * 8));
    }

    #[test]
    fn int4_values_go_two_to_a_byte_and_an_odd_counts_spare_half_must_be_zero() {
        let grad = Compressed::Int4 { scales: vec![0.5], q: vec![-7, 7, 3, -1, 2] };
        let bytes = encode(&compressed(grad.clone()));
        let dense = encode(&compressed(Compressed::Int8 { scales: vec![0.5], q: vec![0; 5] }));
        assert_eq!(dense.len() - bytes.len(), 5 - 3, "five values in three bytes");
        let Message::Compressed(back) = decode(&bytes, L).unwrap() else { panic!() };
        assert_eq!(back.grad, grad);
        assert_eq!(back.densify().grad, vec![-3.5, 3.5, 1.5, -0.5, 1.0]);
        let mut spare = bytes.clone();
        *spare.last_mut().unwrap() |= 0x10;
        let err = decode(&spare, L).unwrap_err().to_string();
        assert!(err.contains("unused half"), "{err}");
    }

    #[test]
    fn a_certificate_longer_than_the_bound_is_refused() {
        let ok = encode(&Message::Admit { certificate: vec![7; MAX_CERTIFICATE], address: String::new() });
        assert!(decode(&ok, L).is_ok());
        let long =
            encode(&Message::Admit { certificate: vec![7; MAX_CERTIFICATE + 1], address: String::new() });
        let err = decode(&long, L).unwrap_err();
        assert!(err.to_string().contains("certificate length"), "{err}");
    }

    #[test]
    fn members_must_be_ascending_and_bounded() {
        let dup = encode(&Message::Members { members: vec![(1, "a".into()), (1, "b".into())] });
        let err = decode(&dup, L).unwrap_err();
        assert!(err.to_string().contains("member indices"), "{err}");
        let mut huge = encode(&Message::Members { members: vec![] });
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&(MAX_MEMBERS as u32 + 1).to_le_bytes());
        let err = decode(&huge, L).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn received_peers_must_be_ascending_and_bounded() {
        let dup = encode(&Message::Received { round: 1, peers: vec![2, 2] });
        let err = decode(&dup, L).unwrap_err();
        assert!(err.to_string().contains("not strictly ascending"), "{err}");
        let mut huge = encode(&Message::Received { round: 1, peers: vec![] });
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&(MAX_PEERS as u32 + 1).to_le_bytes());
        let err = decode(&huge, L).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn every_kind_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m), L).unwrap(), m);
        }
    }

    fn a_state(base: Vec<u32>) -> StateMsg {
        StateMsg {
            round: 9,
            digest: Digest([9; 32]),
            params: vec![0.1, 0.2, 0.3, 0.4, 0.5],
            optimizer: OptimizerState {
                kind: "sgd".into(),
                steps: 9,
                buffers: vec![("momentum".into(), vec![-0.25; 5])],
            },
            base,
        }
    }

    /// The answers a server gives to the `parts` part requests of `state`.
    fn parts_of(state: &StateMsg, parts: u16) -> Vec<Message> {
        let bytes = encode(&Message::State(state.clone()));
        (0..parts)
            .map(|part| {
                let slice = state_part(&bytes, part, parts);
                let m = Message::StatePart { part, parts, bytes: slice.to_vec() };
                assert_eq!(encode_state_part(part, parts, slice), encode(&m));
                // Each answer crosses the wire too.
                decode(&encode(&m), L).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_state_in_parts_in_any_order_is_the_state() {
        let state = a_state(vec![0, 2, 5]);
        let len = encode(&Message::State(state.clone())).len();
        for parts in [1, 2, 3, 7, MAX_STATE_PARTS] {
            let answers = parts_of(&state, parts);
            let sizes: Vec<usize> = answers
                .iter()
                .map(|m| match m {
                    Message::StatePart { bytes, .. } => bytes.len(),
                    _ => unreachable!(),
                })
                .collect();
            assert_eq!(sizes.iter().sum::<usize>(), len, "{parts} parts");
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            // Last part first, then the others in order.
            let mut order: Vec<u16> = (0..parts).collect();
            order.rotate_right(1);
            let mut a = StateAssembly::new(parts, L).unwrap();
            let mut got = None;
            for (i, &part) in order.iter().enumerate() {
                let r = a.insert(part, answers[usize::from(part)].clone()).unwrap();
                assert_eq!(r.is_some(), i + 1 == order.len(), "{parts} parts, part {part}");
                got = got.or(r);
            }
            assert_eq!(got, Some(state.clone()), "{parts} parts");
        }
    }

    #[test]
    fn a_state_in_parts_refuses_wrong_double_and_refused_parts_and_bad_counts() {
        let state = a_state(vec![1]);
        let answers = parts_of(&state, 3);
        let refused = |a: &mut StateAssembly, part, m: Message, why: &str| {
            let err = a.insert(part, m).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        let mut a = StateAssembly::new(3, L).unwrap();
        refused(&mut a, 1, answers[0].clone(), "part 0 of 3 answers part 1 of 3");
        refused(&mut a, 0, parts_of(&state, 2)[0].clone(), "part 0 of 2 answers part 0 of 3");
        refused(&mut a, 0, Message::Refused { reason: "busy".into() }, "refused: busy");
        refused(&mut a, 0, Message::Ack, "answered with ack");
        a.insert(0, answers[0].clone()).unwrap();
        refused(&mut a, 0, answers[0].clone(), "part 0 came twice");
        // Parts that are not a state together: the whole is decoded and validated.
        let mut a = StateAssembly::new(1, L).unwrap();
        let ack = Message::StatePart { part: 0, parts: 1, bytes: encode(&Message::Ack) };
        refused(&mut a, 0, ack, "the parts make a ack");
        let mut a = StateAssembly::new(1, Limits { params: 6 }).unwrap();
        let err = a.insert(0, parts_of(&state, 1).remove(0)).unwrap_err();
        assert!(err.to_string().contains("the model has 6"), "{err}");
        let mut a = StateAssembly::new(2, L).unwrap();
        a.insert(0, parts_of(&state, 2).remove(0)).unwrap();
        let huge = Message::StatePart { part: 1, parts: 2, bytes: vec![0; max_state_len(L)] };
        refused(&mut a, 1, huge, "more than a state can have");
        // Counts.
        for (part, parts) in [(0, 0), (3, 3), (0, MAX_STATE_PARTS + 1)] {
            let err = decode(&encode(&Message::StatePartRequest { fetch: 1, part, parts }), L).unwrap_err();
            assert!(err.to_string().contains(&format!("part {part} of {parts}")), "{err}");
            let err = decode(&encode(&Message::StatePart { part, parts, bytes: vec![] }), L).unwrap_err();
            assert!(err.to_string().contains("state part"), "{err}");
        }
        assert!(StateAssembly::new(0, L).is_err());
        assert!(StateAssembly::new(MAX_STATE_PARTS + 1, L).is_err());
        let long = encode(&Message::StatePart { part: 0, parts: 1, bytes: vec![0; max_state_len(L) + 1] });
        assert!(decode(&long, L).unwrap_err().to_string().contains("state part length"));
    }

    #[test]
    fn a_state_is_cut_into_parts_that_fit_a_stream_window() {
        assert_eq!(state_parts(0), 1);
        assert_eq!(state_parts(STATE_PART_BYTES), 1);
        assert_eq!(state_parts(STATE_PART_BYTES + 1), 2);
        // The MNIST MLP with momentum: 235k parameters and as many momentum values.
        let mlp = state_parts(state_len(2 * 235_146));
        assert_eq!(mlp, 10);
        assert!(state_len(2 * 235_146).div_ceil(usize::from(mlp)) + 64 < 256 << 10);
        assert_eq!(state_parts(usize::MAX / 2), MAX_STATE_PARTS);
    }

    #[test]
    fn wrong_length_is_named() {
        let m = &samples()[0];
        let err = decode(&encode(m), Limits { params: 6 }).unwrap_err();
        assert_eq!(err.to_string(), "gradient has 5 values, the model has 6");
    }

    #[test]
    fn non_finite_values_are_refused_with_their_position() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut m = samples()[0].clone();
            if let Message::Gradient(g) = &mut m {
                g.grad[3] = bad;
            }
            match decode(&encode(&m), L).unwrap_err() {
                WireError::NonFinite { index, .. } => assert_eq!(index, 3),
                other => panic!("{other}"),
            }
        }
    }

    #[test]
    fn truncation_trailing_and_magic_are_refused() {
        let bytes = encode(&samples()[0]);
        for cut in [0, 3, 5, 20, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], L).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long, L).unwrap_err(), WireError::Trailing(1));
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(decode(&bad, L).unwrap_err(), WireError::BadMagic);
    }

    #[test]
    fn a_long_string_is_cut_at_a_character_boundary() {
        // 'é' is 2 bytes, u16::MAX odd: a cut at byte 65535 would split one and the receiver
        // would refuse the message as not UTF-8.
        let reason = "é".repeat(40_000);
        let Message::Refused { reason: got } = decode(&encode(&Message::Refused { reason }), L).unwrap()
        else {
            panic!("not a refusal");
        };
        assert_eq!(got, "é".repeat(32_767));
    }

    /// How a transport reads a gradient apart: [`gradient_len`] on its head, the rest as `f32`s.
    fn decode_apart(b: &[u8], limits: Limits) -> Option<Result<Message, WireError>> {
        let head: &[u8; GRADIENT_HEAD] = b.get(..GRADIENT_HEAD)?.try_into().ok()?;
        gradient_len(head, b.len())?;
        let grad = crate::flat::from_le_bytes(&b[GRADIENT_HEAD..]).expect("a multiple of 4 bytes");
        Some(decode_gradient(head, grad, limits))
    }

    #[test]
    fn a_gradient_read_apart_decodes_as_it_does_whole() {
        for m in samples() {
            let b = encode(&m);
            let apart = decode_apart(&b, L);
            assert_eq!(apart.is_some(), matches!(m, Message::Gradient(_)), "{}", m.kind_name());
            if let Some(got) = apart {
                assert_eq!(got.unwrap(), m);
            }
        }
        let Message::Gradient(mut g) = samples().remove(0) else { panic!("the first sample is a gradient") };
        let wrong = Limits { params: 4 };
        let b = encode(&Message::Gradient(g.clone()));
        assert_eq!(decode_apart(&b, wrong).unwrap(), Err(decode(&b, wrong).unwrap_err()));
        g.grad[3] = f32::NAN;
        let b = encode(&Message::Gradient(g));
        let err = decode_apart(&b, L).unwrap().unwrap_err();
        assert!(matches!(err, WireError::NonFinite { index: 3, .. }), "{err}");
        // Compared as text: NaN is not equal to itself.
        assert_eq!(err.to_string(), decode(&b, L).unwrap_err().to_string());
        assert!(
            decode_apart(&b[..b.len() - 4], L).is_none(),
            "a frame shorter than its vector is read whole"
        );
    }

    proptest! {
        // The decoder is total: any bytes give a message or an error, never a panic.
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, L);
            let mut prefixed = MAGIC.to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = decode(&prefixed, L);
        }

        #[test]
        fn mutated_messages_never_panic(i in 0usize..11, pos in 0usize..200, byte in any::<u8>()) {
            let mut b = encode(&samples()[i]);
            let p = pos % b.len();
            b[p] = byte;
            let _ = decode(&b, L);
        }

        // Any change to a gradient's bytes decodes the same read apart as whole.
        #[test]
        fn a_changed_gradient_read_apart_decodes_as_it_does_whole(pos in 0usize..81, byte in any::<u8>()) {
            let mut b = encode(&samples()[0]);
            b[pos] = byte;
            if let Some(apart) = decode_apart(&b, L) {
                // Compared as text: NaN is not equal to itself.
                prop_assert_eq!(format!("{apart:?}"), format!("{:?}", decode(&b, L)));
            }
        }
    }
}
