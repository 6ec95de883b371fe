//! Aggregation rules: how a peer (or the PS) combines the gradients it received in a round.
//!
//! A rule sees the inputs in a fixed order (by peer index), so identical inputs give
//! bit-identical outputs on every replica. Besides the plain [`Mean`], the Byzantine-robust
//! rules tolerate up to `f` arbitrary inputs:
//!
//! | rule (`rule = …`)     | type                  | precondition   | tolerates at `n` inputs     |
//! |-----------------------|-----------------------|----------------|-----------------------------|
//! | `mean`                | [`Mean`]              | —              | 0                           |
//! | `median`              | [`Median`]            | —              | ⌊(n−1)/2⌋                   |
//! | `trimmed-mean`        | [`TrimmedMean`]       | n ≥ 2f+1       | f (or ⌊βn⌋) from each end   |
//! | `krum`, `multi-krum`  | [`Krum`]              | n ≥ 2f+3       | f                           |
//! | `bulyan`              | [`Bulyan`]            | n ≥ 4f+3       | f                           |
//! | `centered-clipping`   | [`CenteredClipping`]  | —              | ⌊(n−1)/2⌋ (starts at median)|
//!
//! # Configuration and degradation
//! [`AggregatorConfig`] is the TOML form (`aggregator = "krum"` or
//! `aggregator = { rule = "krum", f = 1 }`); [`AggregatorConfig::validate`] checks the
//! precondition against the configured number of nodes, and [`AggregatorConfig::build`] gives
//! the rule. At run time fewer inputs than configured may arrive (nodes crash, miss a deadline).
//! A rule then never fails: it uses the largest `f` its precondition allows for the actual
//! `n`, down to `f = 0`, which [`Aggregator::effective_f`] reports for logging.
//!
//! # Determinism and non-finite inputs
//! Every rule is a pure function of its inputs and their order: selections break ties by input
//! index, orders on `f32` are total, and nothing iterates a hash map. The coordinate-wise rules
//! (median, trimmed mean, Bulyan's second phase) are exactly invariant under permutations of
//! their inputs (they sum sorted values); the others up to floating-point summation order.
//!
//! The wire decoder rejects non-finite gradients; as defence in depth the robust rules treat a
//! NaN coordinate as `+∞` and an input holding any non-finite value as infinitely far from
//! every other, so it is trimmed, never selected by Krum and Bulyan, and dropped by centered
//! clipping. The output is finite as long as no more than the tolerated number of inputs are
//! non-finite at any coordinate (all inputs, for Krum, minus one).
//!
//! # Layout
//! - this file: the [`Aggregator`] trait, [`AggregatorConfig`], [`AggregateError`], [`Mean`].
//! - `coord.rs`: sorting networks over coordinate chunks; [`Median`], [`TrimmedMean`].
//! - `krum.rs`: pairwise distances; [`Krum`] (and Multi-Krum), [`Bulyan`].
//! - `clip.rs`: [`CenteredClipping`].

mod clip;
mod coord;
mod krum;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::de;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use clip::CenteredClipping;
pub use coord::{Median, Trim, TrimmedMean};
pub use krum::{Bulyan, Krum};

use crate::flat::FlatError;

/// Combines equally long gradient vectors into one.
pub trait Aggregator: Send + Sync + fmt::Debug {
    /// The rule's name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Writes the aggregate of `inputs` (at least one, all of `out.len()`) into `out`.
    ///
    /// Any number of inputs is accepted: a robust rule given fewer than its precondition needs
    /// degrades to [`Aggregator::effective_f`]`(inputs.len())`. Errors only for no inputs or
    /// inputs of the wrong length.
    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError>;
    /// How many arbitrary (Byzantine) inputs among `n` the rule tolerates as configured: the
    /// configured `f`, lowered to what the precondition allows at `n`. 0 for the mean.
    fn effective_f(&self, n: usize) -> usize {
        let _ = n;
        0
    }
}

/// A rule's parameters out of range, or too few nodes for its `f`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The configured number of nodes is below the rule's precondition for its `f`.
    #[error("{rule} needs n ≥ {formula} = {need} inputs for f = {f}, the run has {n}")]
    TooFewInputs {
        /// Rule name, e.g. `"krum"`.
        rule: &'static str,
        /// The precondition, e.g. `"2f+3"`.
        formula: &'static str,
        /// The configured number of Byzantine inputs to tolerate.
        f: usize,
        /// The precondition's value at `f`.
        need: usize,
        /// The configured number of nodes.
        n: usize,
    },
    /// A parameter out of its range.
    #[error("{rule}: {key} = {value}: {reason}")]
    InvalidParameter {
        /// Rule name.
        rule: &'static str,
        /// The parameter's key, e.g. `"tau"`.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is allowed.
        reason: String,
    },
}

/// The configured rule: `aggregator = "mean"` (the default), a rule name with its defaults, or
/// a table with the rule's parameters, e.g. `aggregator = { rule = "krum", f = 1 }`.
///
/// | `rule`              | keys (defaults)                                                    |
/// |---------------------|--------------------------------------------------------------------|
/// | `mean`, `median`    | none                                                               |
/// | `trimmed-mean`      | `f` (1): inputs trimmed from each end, or `beta`: fraction trimmed from each end, `⌊βn⌋`, in `[0, 0.5)` |
/// | `krum`              | `f` (1)                                                            |
/// | `multi-krum`        | `f` (1), `m` (`n − f`): how many best-scored inputs to average     |
/// | `bulyan`            | `f` (1)                                                            |
/// | `centered-clipping` | `tau` (1.0): clipping radius, `iters` (1): iterations L             |
///
/// Unknown keys are refused. See the module docs for the preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum AggregatorConfig {
    /// Arithmetic mean: the non-robust reference (SPIRT's and LambdaML's rule).
    #[default]
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean {
        /// How much is trimmed from each end.
        trim: Trim,
    },
    /// Krum: the input closest to its `n − f − 2` nearest neighbours.
    Krum {
        /// Byzantine inputs tolerated.
        f: usize,
    },
    /// Multi-Krum: the mean of the `m` best Krum scores.
    MultiKrum {
        /// Byzantine inputs tolerated.
        f: usize,
        /// Inputs averaged; `None`: `n − f`.
        m: Option<usize>,
    },
    /// Bulyan: Krum-select `n − 2f`, then a coordinate-wise trimmed mean around the median.
    Bulyan {
        /// Byzantine inputs tolerated.
        f: usize,
    },
    /// Centered clipping (Karimireddy et al. 2021), from the coordinate-wise median.
    CenteredClipping {
        /// Clipping radius τ (L2 norm of each input's distance to the centre).
        tau: f64,
        /// Iterations L.
        iters: usize,
    },
}

impl AggregatorConfig {
    /// The rule's name (its `rule` key).
    pub fn name(&self) -> &'static str {
        match self {
            AggregatorConfig::Mean => "mean",
            AggregatorConfig::Median => "median",
            AggregatorConfig::TrimmedMean { .. } => "trimmed-mean",
            AggregatorConfig::Krum { .. } => "krum",
            AggregatorConfig::MultiKrum { .. } => "multi-krum",
            AggregatorConfig::Bulyan { .. } => "bulyan",
            AggregatorConfig::CenteredClipping { .. } => "centered-clipping",
        }
    }

    /// Checks the parameters, and the precondition against `n_nodes`, the number of inputs a
    /// round has when every node contributes (P2P: the peers; PS: the workers).
    ///
    /// # Errors
    /// [`AggregateError::TooFewInputs`] naming the rule, the precondition, `f` and `n`;
    /// [`AggregateError::InvalidParameter`] naming the key.
    pub fn validate(&self, n_nodes: usize) -> Result<(), AggregateError> {
        let rule = self.name();
        let need = |formula: &'static str, f: usize, need: usize| {
            if n_nodes < need {
                Err(AggregateError::TooFewInputs { rule, formula, f, need, n: n_nodes })
            } else {
                Ok(())
            }
        };
        let bad = |key: &'static str, value: String, reason: String| {
            Err(AggregateError::InvalidParameter { rule, key, value, reason })
        };
        match *self {
            AggregatorConfig::Mean | AggregatorConfig::Median => Ok(()),
            AggregatorConfig::TrimmedMean { trim: Trim::Count(f) } => need("2f+1", f, 2 * f + 1),
            AggregatorConfig::TrimmedMean { trim: Trim::Fraction(beta) } => {
                if (0.0..0.5).contains(&beta) {
                    Ok(())
                } else {
                    bad("beta", beta.to_string(), "must be in [0, 0.5)".into())
                }
            }
            AggregatorConfig::Krum { f } => need("2f+3", f, 2 * f + 3),
            AggregatorConfig::MultiKrum { f, m } => {
                need("2f+3", f, 2 * f + 3)?;
                match m {
                    Some(m) if m == 0 || m > n_nodes - f => {
                        bad("m", m.to_string(), format!("must be in 1..=n−f = {}", n_nodes - f))
                    }
                    _ => Ok(()),
                }
            }
            AggregatorConfig::Bulyan { f } => need("4f+3", f, 4 * f + 3),
            AggregatorConfig::CenteredClipping { tau, iters } => {
                if !(tau.is_finite() && tau > 0.0 && tau <= f64::from(f32::MAX)) {
                    return bad("tau", tau.to_string(), "must be positive and finite".into());
                }
                if !(1..=100).contains(&iters) {
                    return bad("iters", iters.to_string(), "must be in 1..=100".into());
                }
                Ok(())
            }
        }
    }

    /// The rule as a trait object.
    pub fn build(&self) -> Box<dyn Aggregator> {
        match *self {
            AggregatorConfig::Mean => Box::new(Mean),
            AggregatorConfig::Median => Box::new(Median),
            AggregatorConfig::TrimmedMean { trim } => Box::new(TrimmedMean::new(trim)),
            AggregatorConfig::Krum { f } => Box::new(Krum::new(f)),
            AggregatorConfig::MultiKrum { f, m } => Box::new(Krum::multi(f, m)),
            AggregatorConfig::Bulyan { f } => Box::new(Bulyan::new(f)),
            AggregatorConfig::CenteredClipping { tau, iters } => {
                Box::new(CenteredClipping::new(tau as f32, iters))
            }
        }
    }
}

impl fmt::Display for AggregatorConfig {
    /// `krum (f = 1)`, `mean`, `trimmed-mean (beta = 0.2)`, …
    fn fmt(&self, fm: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match *self {
            AggregatorConfig::Mean | AggregatorConfig::Median => write!(fm, "{name}"),
            AggregatorConfig::TrimmedMean { trim: Trim::Count(f) }
            | AggregatorConfig::Krum { f }
            | AggregatorConfig::MultiKrum { f, m: None }
            | AggregatorConfig::Bulyan { f } => write!(fm, "{name} (f = {f})"),
            AggregatorConfig::TrimmedMean { trim: Trim::Fraction(b) } => write!(fm, "{name} (beta = {b})"),
            AggregatorConfig::MultiKrum { f, m: Some(m) } => write!(fm, "{name} (f = {f}, m = {m})"),
            AggregatorConfig::CenteredClipping { tau, iters } => {
                write!(fm, "{name} (tau = {tau}, iters = {iters})")
            }
        }
    }
}

/// The TOML table form, internally tagged by `rule`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case", deny_unknown_fields)]
enum Table {
    Mean {},
    Median {},
    TrimmedMean {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        f: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta: Option<f64>,
    },
    Krum {
        #[serde(default = "default_f")]
        f: usize,
    },
    MultiKrum {
        #[serde(default = "default_f")]
        f: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        m: Option<usize>,
    },
    Bulyan {
        #[serde(default = "default_f")]
        f: usize,
    },
    CenteredClipping {
        #[serde(default = "default_tau")]
        tau: f64,
        #[serde(default = "default_iters")]
        iters: usize,
    },
}

fn default_f() -> usize {
    1
}
fn default_tau() -> f64 {
    1.0
}
fn default_iters() -> usize {
    1
}

impl Table {
    fn into_config<E: de::Error>(self) -> Result<AggregatorConfig, E> {
        Ok(match self {
            Table::Mean {} => AggregatorConfig::Mean,
            Table::Median {} => AggregatorConfig::Median,
            Table::TrimmedMean { f: Some(_), beta: Some(_) } => {
                return Err(E::custom("trimmed-mean takes either `f` or `beta`, not both"));
            }
            Table::TrimmedMean { f, beta: Some(b) } => {
                debug_assert!(f.is_none());
                AggregatorConfig::TrimmedMean { trim: Trim::Fraction(b) }
            }
            Table::TrimmedMean { f, beta: None } => {
                AggregatorConfig::TrimmedMean { trim: Trim::Count(f.unwrap_or_else(default_f)) }
            }
            Table::Krum { f } => AggregatorConfig::Krum { f },
            Table::MultiKrum { f, m } => AggregatorConfig::MultiKrum { f, m },
            Table::Bulyan { f } => AggregatorConfig::Bulyan { f },
            Table::CenteredClipping { tau, iters } => AggregatorConfig::CenteredClipping { tau, iters },
        })
    }

    fn from_config(c: &AggregatorConfig) -> Table {
        match *c {
            AggregatorConfig::Mean => Table::Mean {},
            AggregatorConfig::Median => Table::Median {},
            AggregatorConfig::TrimmedMean { trim: Trim::Count(f) } => {
                Table::TrimmedMean { f: Some(f), beta: None }
            }
            AggregatorConfig::TrimmedMean { trim: Trim::Fraction(b) } => {
                Table::TrimmedMean { f: None, beta: Some(b) }
            }
            AggregatorConfig::Krum { f } => Table::Krum { f },
            AggregatorConfig::MultiKrum { f, m } => Table::MultiKrum { f, m },
            AggregatorConfig::Bulyan { f } => Table::Bulyan { f },
            AggregatorConfig::CenteredClipping { tau, iters } => Table::CenteredClipping { tau, iters },
        }
    }
}

impl Serialize for AggregatorConfig {
    /// Rules without parameters as their name (`"mean"`), the others as a table.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AggregatorConfig::Mean | AggregatorConfig::Median => s.serialize_str(self.name()),
            other => Table::from_config(other).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for AggregatorConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = AggregatorConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rule name such as \"krum\", or a table such as { rule = \"krum\", f = 1 }")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<AggregatorConfig, E> {
                // The name alone: the table `{ rule = name }`, with every default.
                let map = de::value::MapDeserializer::<_, E>::new(std::iter::once(("rule", name)));
                Table::deserialize(map)?.into_config()
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<AggregatorConfig, A::Error> {
                Table::deserialize(de::value::MapAccessDeserializer::new(map))?.into_config()
            }
        }
        d.deserialize_any(V)
    }
}

/// Element-wise arithmetic mean, summed in input order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mean;

impl Aggregator for Mean {
    fn name(&self) -> &'static str {
        "mean"
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        mean_into(inputs.iter().copied(), out);
        Ok(())
    }
}

/// `out` = the mean of `inputs` (at least one, all of `out.len()`), summed in iteration order.
///
/// Block by block, so that each block of `out` is summed and scaled while it is in the L1
/// cache: one pass over memory instead of one per input plus one to scale. Every element still
/// gets `((x0 + x1) + …) * (1 / k)`, bit for bit what whole-vector passes give.
fn mean_into<'a>(inputs: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    const BLOCK: usize = 2048;
    let k = inputs.clone().count();
    assert!(k > 0, "invariant: mean_into gets at least one input");
    let inv = 1.0 / k as f32;
    for (b, o) in out.chunks_mut(BLOCK).enumerate() {
        let span = b * BLOCK..b * BLOCK + o.len();
        let mut vs = inputs.clone().map(|v| &v[span.clone()]);
        o.copy_from_slice(vs.next().expect("invariant: k > 0"));
        for v in vs {
            for (o, x) in o.iter_mut().zip(v) {
                *o += x;
            }
        }
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

fn check(inputs: &[&[f32]], n: usize) -> Result<(), FlatError> {
    if inputs.is_empty() {
        return Err(FlatError::Empty { what: "aggregate".into() });
    }
    for v in inputs {
        if v.len() != n {
            return Err(FlatError::LengthMismatch {
                what: "aggregate input".into(),
                expected: n,
                got: v.len(),
            });
        }
    }
    Ok(())
}
