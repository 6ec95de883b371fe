//! Byzantine behaviour of a node, for experiments: what an attacking peer or worker does to
//! the gradient it sends.
//!
//! A scenario assigns an [`Attack`] to some nodes (`kind = "byzantine"`); the node's own
//! process then misbehaves from `from_round` on, through an [`Attacker`]:
//!
//! | attack | sent | kept by the attacker |
//! | --- | --- | --- |
//! | `sign-flip` | the honest gradient × [`SIGN_FLIP_SCALE`] | the same |
//! | `gaussian` | i.i.d. N(0, [`GAUSSIAN_VARIANCE`]) per coordinate (SPIRT's attack) | the same |
//! | `label-flip` | computed on labels y → classes − 1 − y (by its functions) | the same |
//! | `nan` | the honest gradient with ~1 % of coordinates NaN, +∞ or −∞ | the honest one |
//! | `wrong-length` | the honest gradient with coordinates cut off or appended | the honest one |
//! | `replay` | its last message before the attack (its first, attacking from round 0), again every round (stale) | the honest one |
//!
//! The first three are well-formed, so only a robust aggregation rule can limit them; an
//! attacker keeps what it sends, so its replica stays identical to the others'. The last
//! three are malformed or stale: honest nodes must refuse them before aggregation (the wire
//! codec, the round protocol), and the attacker's own replica keeps training honestly.
//! Everything random comes from the [`Rng`] the attacker is built with.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::wire::{self, GradientMsg, Message};

/// `sign-flip` multiplies the gradient by this.
pub const SIGN_FLIP_SCALE: f32 = -10.0;
/// `gaussian` sends N(0, σ²) with σ² = this.
pub const GAUSSIAN_VARIANCE: f64 = 100.0;
/// `nan` poisons this fraction of the coordinates (at least one).
pub const NON_FINITE_FRACTION: f64 = 0.01;

/// What an attacker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Scale the gradient by −10.
    SignFlip,
    /// Replace the gradient with N(0, 100) noise.
    Gaussian,
    /// Compute the gradient on flipped labels.
    LabelFlip,
    /// NaN and ±∞ in some coordinates.
    #[serde(rename = "nan")]
    NonFinite,
    /// A vector of the wrong length.
    WrongLength,
    /// Re-send the previous round's gradient.
    Replay,
}

impl AttackKind {
    /// Every attack, in table order.
    pub const ALL: [AttackKind; 6] = [
        AttackKind::SignFlip,
        AttackKind::Gaussian,
        AttackKind::LabelFlip,
        AttackKind::NonFinite,
        AttackKind::WrongLength,
        AttackKind::Replay,
    ];

    /// Its name in configs, scenarios and events.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::SignFlip => "sign-flip",
            AttackKind::Gaussian => "gaussian",
            AttackKind::LabelFlip => "label-flip",
            AttackKind::NonFinite => "nan",
            AttackKind::WrongLength => "wrong-length",
            AttackKind::Replay => "replay",
        }
    }

    /// Whether honest nodes receive a well-formed gradient of the current round (that only a
    /// robust rule can limit), rather than something the codec or the protocol refuses.
    pub fn well_formed(self) -> bool {
        matches!(self, AttackKind::SignFlip | AttackKind::Gaussian | AttackKind::LabelFlip)
    }
}

impl std::fmt::Display for AttackKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An attack assigned to a node: what, and from which round on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attack {
    /// What.
    pub kind: AttackKind,
    /// First round (model version) attacked; earlier rounds are honest.
    #[serde(default)]
    pub from_round: u64,
}

impl Attack {
    /// Whether round `round` is attacked.
    pub fn active(&self, round: u64) -> bool {
        round >= self.from_round
    }

    /// Whether this node's functions compute round `round` on flipped labels.
    pub fn flips_labels(&self, round: u64) -> bool {
        self.kind == AttackKind::LabelFlip && self.active(round)
    }
}

/// What to do with one round's gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct Tampered {
    /// The gradient the node uses itself (a peer's own input to aggregation).
    pub keep: GradientMsg,
    /// The encoded message to send.
    pub send: Vec<u8>,
}

/// A node's attack, applied to each gradient it sends.
#[derive(Debug, Clone)]
pub struct Attacker {
    attack: Attack,
    rng: Rng,
    /// The previous message sent, for `replay`.
    last: Option<Vec<u8>>,
}

impl Attacker {
    /// An attacker drawing its randomness from `rng`.
    pub fn new(attack: Attack, rng: Rng) -> Attacker {
        Attacker { attack, rng, last: None }
    }

    /// The attack.
    pub fn attack(&self) -> Attack {
        self.attack
    }

    /// Turns the honest gradient `msg` into what this node keeps and what it sends.
    pub fn tamper(&mut self, msg: GradientMsg) -> Tampered {
        let honest = wire::encode(&Message::Gradient(msg.clone()));
        if !self.attack.active(msg.round) {
            self.last = Some(honest.clone());
            return Tampered { keep: msg, send: honest };
        }
        let sent = |g: &GradientMsg| wire::encode(&Message::Gradient(g.clone()));
        match self.attack.kind {
            // Computed on flipped labels already: sent as it is.
            AttackKind::LabelFlip => Tampered { keep: msg, send: honest },
            AttackKind::SignFlip => {
                let mut g = msg;
                g.grad.iter_mut().for_each(|x| *x *= SIGN_FLIP_SCALE);
                Tampered { send: sent(&g), keep: g }
            }
            AttackKind::Gaussian => {
                let mut g = msg;
                let sd = GAUSSIAN_VARIANCE.sqrt();
                g.grad.iter_mut().for_each(|x| *x = (self.rng.normal() * sd) as f32);
                Tampered { send: sent(&g), keep: g }
            }
            AttackKind::NonFinite => {
                let mut g = msg.clone();
                let n = g.grad.len();
                let k = ((n as f64 * NON_FINITE_FRACTION) as usize).clamp(1, n.max(1));
                for j in 0..k.min(n) {
                    let i = self.rng.below(n as u64) as usize;
                    g.grad[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
                }
                Tampered { send: sent(&g), keep: msg }
            }
            AttackKind::WrongLength => {
                let mut g = msg.clone();
                let n = g.grad.len();
                // Cut off up to half, or append up to 16 coordinates; never the right length.
                if self.rng.below(2) == 0 && n > 1 {
                    g.grad.truncate(n - 1 - self.rng.below((n / 2) as u64) as usize);
                } else {
                    let extra = 1 + self.rng.below(16) as usize;
                    g.grad.extend(std::iter::repeat_n(0.5, extra));
                }
                Tampered { send: sent(&g), keep: msg }
            }
            AttackKind::Replay => {
                // Attacking from the start, the first message is honest and the one replayed.
                let send = self.last.get_or_insert(honest).clone();
                Tampered { keep: msg, send }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flat::digest;
    use crate::wire::{Limits, WireError, decode};

    fn msg(round: u64, n: usize) -> GradientMsg {
        let grad: Vec<f32> = (0..n).map(|i| (i as f32 - 3.0) * 0.25).collect();
        GradientMsg { round, digest: digest(&[round as f32]), samples: 64, loss: 1.5, grad }
    }

    fn attacker(kind: AttackKind, from_round: u64) -> Attacker {
        Attacker::new(Attack { kind, from_round }, Rng::new(7))
    }

    fn sent(t: &Tampered, n: usize) -> Result<GradientMsg, WireError> {
        match decode(&t.send, Limits { params: n })? {
            Message::Gradient(g) => Ok(g),
            other => panic!("not a gradient: {other:?}"),
        }
    }

    #[test]
    fn rounds_before_from_round_are_honest() {
        for kind in AttackKind::ALL {
            let mut a = attacker(kind, 5);
            let t = a.tamper(msg(4, 100));
            assert_eq!(t.keep, msg(4, 100), "{kind}");
            assert_eq!(sent(&t, 100).unwrap(), msg(4, 100), "{kind}");
        }
    }

    #[test]
    fn well_formed_attacks_send_what_they_keep_and_pass_the_codec() {
        let mut a = attacker(AttackKind::SignFlip, 0);
        let t = a.tamper(msg(3, 100));
        assert_eq!(sent(&t, 100).unwrap(), t.keep);
        let want: Vec<f32> = msg(3, 100).grad.iter().map(|x| x * -10.0).collect();
        assert_eq!(t.keep.grad, want);

        let mut a = attacker(AttackKind::Gaussian, 0);
        let t = a.tamper(msg(3, 20_000));
        assert_eq!(sent(&t, 20_000).unwrap(), t.keep);
        let n = t.keep.grad.len() as f64;
        let mean = t.keep.grad.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = t.keep.grad.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.3 && (var - 100.0).abs() < 5.0, "mean {mean}, variance {var}");

        let mut a = attacker(AttackKind::LabelFlip, 0);
        let t = a.tamper(msg(3, 100));
        assert_eq!(t.keep, msg(3, 100));
        assert!(Attack { kind: AttackKind::LabelFlip, from_round: 3 }.flips_labels(3));
        assert!(!Attack { kind: AttackKind::LabelFlip, from_round: 3 }.flips_labels(2));
        assert!(!Attack { kind: AttackKind::SignFlip, from_round: 0 }.flips_labels(3));
    }

    #[test]
    fn malformed_attacks_are_refused_by_the_codec_and_keep_the_honest_gradient() {
        for n in [1, 2, 100, 5000] {
            let mut a = attacker(AttackKind::NonFinite, 0);
            let t = a.tamper(msg(1, n));
            assert_eq!(t.keep, msg(1, n));
            assert!(matches!(sent(&t, n), Err(WireError::NonFinite { .. })), "n = {n}");

            let mut a = attacker(AttackKind::WrongLength, 0);
            for _ in 0..20 {
                let t = a.tamper(msg(1, n));
                assert_eq!(t.keep, msg(1, n));
                assert!(sent(&t, n).is_err(), "n = {n}: a wrong-length gradient decoded");
            }
        }
    }

    #[test]
    fn replay_resends_the_last_message_before_the_attack() {
        // (first attacked round, first round sent, the round replayed): from round 0, the
        // first message is honest and the one replayed.
        for (from, first, replayed) in [(2, 1, 1), (0, 0, 0)] {
            let mut a = attacker(AttackKind::Replay, from);
            for r in first..first + 4 {
                let t = a.tamper(msg(r, 10));
                assert_eq!(t.keep, msg(r, 10));
                assert_eq!(sent(&t, 10).unwrap(), msg(r.min(replayed), 10), "from {from}: round {r}");
            }
        }
    }

    #[test]
    fn attacks_are_deterministic_for_a_seed() {
        let run = || {
            let mut a = attacker(AttackKind::Gaussian, 0);
            (0..3).map(|r| a.tamper(msg(r, 50)).send).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn names_round_trip_through_serde() {
        for kind in AttackKind::ALL {
            let text = format!("kind = \"{}\"\nfrom_round = 3\n", kind.name());
            let a: Attack = toml::from_str(&text).unwrap();
            assert_eq!(a, Attack { kind, from_round: 3 });
        }
        assert!(toml::from_str::<Attack>("kind = \"melt\"").is_err());
        assert!(toml::from_str::<Attack>("kind = \"nan\"\nrate = 1").is_err());
    }
}
