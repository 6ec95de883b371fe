//! The peer wire codec (`peerless_core::wire`): what any connected peer can send.
//!
//! First byte: bit 7 picks the mode, bits 0–2 the model size (`Limits::params`, 0–7).
//! - Raw bytes: a message that decodes is valid (every float finite, every vector of the
//!   model's length, at most 8 optimizer buffers) and re-encodes to exactly the same bytes; a
//!   gradient read apart as the tensor lane reads it (`gradient_len`, `decode_gradient`)
//!   decodes to the same message or error.
//! - A message built from the input: `decode(encode(m))` is `m` when `m` is valid, and an
//!   error naming the problem when it is not (a NaN, a wrong length, too many buffers, an
//!   int4 value out of range); then
//!   the encoding, with bytes overwritten by the rest of the input, goes through the raw check.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use peerless_core::compress::{Compressed, INT8_BLOCK};
use peerless_core::flat::Digest;
use peerless_core::optim::OptimizerState;
use peerless_core::wire::{
    CompressedMsg, GradientMsg, Limits, MAX_CERTIFICATE, MAX_MEMBERS, MAX_PEERS, MAX_STATE_PARTS, Message,
    ParamsMsg, StateMsg, WireError, decode, encode, max_state_len,
};
use peerless_core::wire::{GRADIENT_HEAD, decode_gradient, gradient_len};

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let optimizer = OptimizerState {
                kind: "sgd".into(),
                steps: 9,
                buffers: vec![("momentum".into(), vec![0.25, -1.0, 3.5])],
            };
            let digest = Digest([7; 32]);
            let msgs = [
                Message::Gradient(GradientMsg { round: 7, digest, samples: 256, loss: 0.5, grad: vec![1.0, -2.0, 1e-30] }),
                Message::State(StateMsg { round: 9, digest, params: vec![0.1, 0.2, 0.3], optimizer, base: vec![0, 1, 3] }),
                Message::Final { round: 40, digest },
                Message::Params(ParamsMsg { round: 4, digest, params: vec![0.5, -0.5, 2.0] }),
                Message::Refused { reason: "not a member".into() },
                Message::Received { round: 5, peers: vec![0, 2, 3] },
                Message::Heartbeat,
                Message::Resend { round: 8 },
                Message::Compressed(CompressedMsg {
                    round: 3,
                    digest,
                    samples: 64,
                    loss: 0.5,
                    grad: Compressed::Int8 { scales: vec![0.01], q: vec![-127, 3, 127] },
                }),
                Message::Compressed(CompressedMsg {
                    round: 3,
                    digest,
                    samples: 64,
                    loss: 0.5,
                    grad: Compressed::Int4 { scales: vec![0.25], q: vec![-7, 3, 7] },
                }),
                Message::Compressed(CompressedMsg {
                    round: 3,
                    digest,
                    samples: 64,
                    loss: 0.5,
                    grad: Compressed::TopK { n: 3, idx: vec![0, 2], vals: vec![1.5, -2.0] },
                }),
                Message::Admit { certificate: b"PLCT\x01 a certificate's bytes".to_vec(), address: "/ip4/10.0.0.1/tcp/4001".into() },
                Message::Members { members: vec![(0, "/ip4/10.0.0.1/tcp/4001".into()), (3, "/dns4/h/tcp/1".into())] },
                Message::StatePartRequest { fetch: 17, part: 2, parts: 5 },
                Message::StatePart { part: 1, parts: 3, bytes: b"PLW part of a state".to_vec() },
                Message::LaneOffer { port: 40123, token: [9; 32] },
            ];
            // Mode byte 3: raw decoding with a 3-parameter model.
            msgs.iter().enumerate().map(|(i, m)| (format!("msg{i}"), [&[3u8][..], &encode(m)].concat())).collect()
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        let limits = Limits { params: usize::from(mode & 0x07) };
        if mode & 0x80 == 0 {
            check_decode(rest, limits);
        } else {
            let mut u = Unstructured::new(rest);
            if let Ok(msg) = message(&mut u, limits) {
                check_round_trip(&msg, limits, &mut u);
            }
        }
    }
);

fn check_decode(bytes: &[u8], limits: Limits) {
    check_apart(bytes, limits);
    match decode(bytes, limits) {
        Ok(msg) => {
            if let Some(problem) = problem(&msg, limits) {
                panic!("decode accepted an invalid message ({problem}): {msg:?}");
            }
            assert_eq!(encode(&msg), bytes, "a decoded message re-encodes to its bytes");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A gradient read as the tensor lane reads it, its head and then its vector as `f32`s, gives
/// what `decode` gives.
fn check_apart(bytes: &[u8], limits: Limits) {
    let Some(head) = bytes.get(..GRADIENT_HEAD).and_then(|h| <&[u8; GRADIENT_HEAD]>::try_from(h).ok()) else {
        return;
    };
    if gradient_len(head, bytes.len()).is_none() {
        return;
    }
    let grad = bytes[GRADIENT_HEAD..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // Compared as text: NaN is not equal to itself.
    assert_eq!(
        format!("{:?}", decode_gradient(head, grad, limits)),
        format!("{:?}", decode(bytes, limits)),
        "a gradient read apart decodes as it does whole"
    );
}

fn check_round_trip(msg: &Message, limits: Limits, u: &mut Unstructured) {
    let mut bytes = encode(msg);
    match (decode(&bytes, limits), problem(msg, limits)) {
        (Ok(back), None) => assert_eq!(&back, msg),
        (Err(e), None) => panic!("valid message refused ({e}): {msg:?}"),
        (Ok(_), Some(problem)) => panic!("invalid message accepted ({problem}): {msg:?}"),
        (Err(e), Some(problem)) => {
            let named = match &e {
                WireError::NonFinite { .. } => "non-finite",
                WireError::WrongLength { .. } => "wrong length",
                WireError::Malformed { field: "peer count", .. } => "too many peers",
                WireError::Malformed { field: "peer indices", .. } => "not ascending",
                WireError::Malformed { field: "int8 scales", .. } => "bad scale",
                WireError::Malformed { field: "int4 scales", .. } => "bad scale",
                WireError::Malformed { field: "int4 values", .. } => "bad int4 value",
                WireError::Malformed { field: "top-k count", .. } => "bad count",
                WireError::Malformed { field: "top-k indices", .. } => "bad indices",
                WireError::Malformed { field: "certificate length", .. } => "certificate too long",
                WireError::Malformed { field: "member count", .. } => "too many members",
                WireError::Malformed { field: "member indices", .. } => "members not ascending",
                WireError::Malformed { field: "state part", .. } => "bad part",
                WireError::Malformed { field: "state part length", .. } => "part too long",
                WireError::Malformed { .. } => "too many buffers",
                other => panic!("invalid message ({problem}) refused for another reason: {other}"),
            };
            assert_eq!(named, problem, "{e}");
        }
    }
    // Overwrite a few bytes of the encoding (never empty: it starts with the magic).
    for _ in 0..u.int_in_range(0..=8u8).unwrap_or(0) {
        let (Ok(at), Ok(byte)) = (u.arbitrary::<u16>(), u.arbitrary::<u8>()) else { break };
        let at = usize::from(at) % bytes.len();
        bytes[at] = byte;
    }
    check_decode(&bytes, limits);
}

/// The first thing `decode` must refuse in `msg`, in the order it reads the fields.
fn problem(msg: &Message, limits: Limits) -> Option<&'static str> {
    let vector = |v: &[f32]| {
        if v.len() != limits.params {
            Some("wrong length")
        } else if v.iter().any(|x| !x.is_finite()) {
            Some("non-finite")
        } else {
            None
        }
    };
    match msg {
        Message::Gradient(g) if !g.loss.is_finite() => Some("non-finite"),
        Message::Gradient(g) => vector(&g.grad),
        Message::Params(p) => vector(&p.params),
        Message::State(s) => vector(&s.params).or_else(|| {
            if s.optimizer.buffers.len() > 8 {
                return Some("too many buffers");
            }
            s.optimizer.buffers.iter().find_map(|(_, b)| vector(b))
        }),
        Message::Compressed(c) if !c.loss.is_finite() => Some("non-finite"),
        Message::Compressed(c) if c.grad.len() != limits.params => Some("wrong length"),
        Message::Compressed(c) => match &c.grad {
            Compressed::Int8 { scales, .. } if scales.iter().any(|s| !(s.is_finite() && *s >= 0.0)) => {
                Some("bad scale")
            }
            Compressed::Int8 { .. } => None,
            Compressed::Int4 { scales, .. } if scales.iter().any(|s| !(s.is_finite() && *s >= 0.0)) => {
                Some("bad scale")
            }
            // Encoded two to a byte: 8 and −8 both come back as −8.
            Compressed::Int4 { q, .. } if q.iter().any(|x| !(-7..=7).contains(x)) => Some("bad int4 value"),
            Compressed::Int4 { .. } => None,
            Compressed::TopK { n, idx, .. } if idx.len() > *n as usize || (idx.is_empty() && *n > 0) => {
                Some("bad count")
            }
            Compressed::TopK { n, idx, .. }
                if !idx.windows(2).all(|w| w[0] < w[1]) || idx.last().is_some_and(|i| i >= n) =>
            {
                Some("bad indices")
            }
            Compressed::TopK { vals, .. } if vals.iter().any(|x| !x.is_finite()) => Some("non-finite"),
            Compressed::TopK { .. } => None,
        },
        Message::Received { peers, .. } if peers.len() > MAX_PEERS => Some("too many peers"),
        Message::Admit { certificate, .. } if certificate.len() > MAX_CERTIFICATE => {
            Some("certificate too long")
        }
        Message::Members { members } if members.len() > MAX_MEMBERS => Some("too many members"),
        Message::Members { members } if !members.windows(2).all(|w| w[0].0 < w[1].0) => {
            Some("members not ascending")
        }
        Message::Received { peers, .. } if !peers.windows(2).all(|w| w[0] < w[1]) => Some("not ascending"),
        Message::StatePartRequest { part, parts, .. } | Message::StatePart { part, parts, .. }
            if *parts == 0 || *parts > MAX_STATE_PARTS || part >= parts =>
        {
            Some("bad part")
        }
        Message::StatePart { bytes, .. } if bytes.len() > max_state_len(limits) => Some("part too long"),
        _ => None,
    }
}

fn floats(u: &mut Unstructured, limits: Limits) -> Result<Vec<f32>> {
    // Mostly the model's length; sometimes another one.
    let n = if u.ratio(1, 8)? { u.int_in_range(0..=9)? } else { limits.params };
    (0..n).map(|_| Ok(f32::from_bits(u.arbitrary()?))).collect()
}

fn digest(u: &mut Unstructured) -> Result<Digest> {
    Ok(Digest(u.arbitrary()?))
}

fn message(u: &mut Unstructured, limits: Limits) -> Result<Message> {
    Ok(match u.int_in_range(0..=17u8)? {
        0 => Message::Gradient(GradientMsg {
            round: u.arbitrary()?,
            digest: digest(u)?,
            samples: u.arbitrary()?,
            loss: f32::from_bits(u.arbitrary()?),
            grad: floats(u, limits)?,
        }),
        1 => Message::Join { round: u.arbitrary()? },
        2 => Message::Final { round: u.arbitrary()?, digest: digest(u)? },
        3 => Message::ParamsRequest { round: u.arbitrary()? },
        4 => Message::StateRequest,
        5 => Message::Ack,
        6 => {
            let round = u.arbitrary()?;
            let digest = digest(u)?;
            let params = floats(u, limits)?;
            let kind = u.arbitrary()?;
            let steps = u.arbitrary()?;
            let n = u.int_in_range(0..=9)?;
            let buffers = (0..n).map(|_| Ok((u.arbitrary()?, floats(u, limits)?))).collect::<Result<_>>()?;
            let base: std::collections::BTreeSet<u32> =
                (0..u.int_in_range(0..=5)?).map(|_| u.arbitrary()).collect::<Result<_>>()?;
            Message::State(StateMsg {
                round,
                digest,
                params,
                optimizer: OptimizerState { kind, steps, buffers },
                base: base.into_iter().collect(),
            })
        }
        7 => Message::Params(ParamsMsg {
            round: u.arbitrary()?,
            digest: digest(u)?,
            params: floats(u, limits)?,
        }),
        8 => Message::Received {
            round: u.arbitrary()?,
            // Mostly ascending, as a peer sends it; sometimes not.
            peers: {
                let mut p: Vec<u32> = u.arbitrary()?;
                if !u.ratio(1, 8)? {
                    p.sort_unstable();
                    p.dedup();
                }
                p
            },
        },
        9 => Message::Heartbeat,
        10 => Message::Resend { round: u.arbitrary()? },
        11 => Message::Compressed(CompressedMsg {
            round: u.arbitrary()?,
            digest: digest(u)?,
            samples: u.arbitrary()?,
            loss: f32::from_bits(u.arbitrary()?),
            grad: compressed(u, limits)?,
        }),
        12 => Message::Admit {
            // Mostly a certificate's size; sometimes past the bound.
            certificate: {
                let n = if u.ratio(1, 8)? {
                    u.int_in_range(0..=MAX_CERTIFICATE + 64)?
                } else {
                    u.int_in_range(0..=200)?
                };
                (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?
            },
            address: u.arbitrary()?,
        },
        13 => Message::Members {
            // Mostly ascending, as a node sends them; sometimes not, sometimes too many.
            members: {
                let n = if u.ratio(1, 16)? {
                    u.int_in_range(0..=MAX_MEMBERS + 8)?
                } else {
                    u.int_in_range(0..=8)?
                };
                let mut m: Vec<(u32, String)> =
                    (0..n).map(|_| Ok((u.arbitrary()?, u.arbitrary()?))).collect::<Result<_>>()?;
                if !u.ratio(1, 8)? {
                    m.sort_by_key(|(i, _)| *i);
                    m.dedup_by_key(|(i, _)| *i);
                }
                m
            },
        },
        14 => Message::StatePartRequest { fetch: u.arbitrary()?, part: part(u)?, parts: part(u)? },
        15 => Message::StatePart {
            part: part(u)?,
            parts: part(u)?,
            // Mostly a part's size; sometimes past what a state of this model can have.
            bytes: {
                let n = if u.ratio(1, 16)? {
                    max_state_len(limits) + u.int_in_range(0..=4)?
                } else {
                    u.int_in_range(0..=64)?
                };
                (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?
            },
        },
        16 => Message::LaneOffer { port: u.arbitrary()?, token: u.arbitrary()? },
        _ => Message::Refused { reason: u.arbitrary()? },
    })
}

/// A part number or count: mostly in range, sometimes 0 or past [`MAX_STATE_PARTS`].
fn part(u: &mut Unstructured) -> Result<u16> {
    if u.ratio(1, 8)? { u.arbitrary() } else { u.int_in_range(0..=MAX_STATE_PARTS) }
}

/// Int8 or int4 with one scale a block (any values; int4 mostly in −7..=7), or top-k with mostly ascending indices below n
/// and mostly as many values as indices.
fn compressed(u: &mut Unstructured, limits: Limits) -> Result<Compressed> {
    let n = if u.ratio(1, 8)? { u.int_in_range(0..=9)? } else { limits.params };
    let codec: u8 = u.int_in_range(0..=2)?;
    if codec < 2 {
        let scales =
            (0..n.div_ceil(INT8_BLOCK)).map(|_| Ok(f32::from_bits(u.arbitrary()?))).collect::<Result<_>>()?;
        if codec == 0 {
            let q = (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?;
            return Ok(Compressed::Int8 { scales, q });
        }
        let wide = u.ratio(1, 8)?;
        let q = (0..n)
            .map(|_| if wide { u.int_in_range(-8..=8) } else { u.int_in_range(-7..=7) })
            .collect::<Result<_>>()?;
        return Ok(Compressed::Int4 { scales, q });
    }
    let mut idx: Vec<u32> = u.arbitrary()?;
    if !u.ratio(1, 8)? {
        idx.iter_mut().for_each(|i| *i %= (n as u32).max(1));
        idx.sort_unstable();
        idx.dedup();
    }
    let vals = (0..idx.len()).map(|_| Ok(f32::from_bits(u.arbitrary()?))).collect::<Result<_>>()?;
    Ok(Compressed::TopK { n: n as u32, idx, vals })
}
