//! Aggregation rules: how a peer (or the PS) combines the gradients it received in a round.
//!
//! A rule sees the inputs in a fixed order (by peer index), so identical inputs give
//! bit-identical outputs on every replica. Robust rules (median, trimmed mean, Krum, …) plug in
//! behind the same trait.

use serde::{Deserialize, Serialize};

use crate::flat::FlatError;

/// Combines equally long gradient vectors into one.
pub trait Aggregator: Send + Sync + std::fmt::Debug {
    /// The rule's name, for logs and metrics.
    fn name(&self) -> &'static str;
    /// Writes the aggregate of `inputs` (at least one, all of `out.len()`) into `out`.
    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError>;
}

/// The configured rule (`aggregator = "mean"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Arithmetic mean: the non-robust reference (SPIRT's and LambdaML's rule).
    #[default]
    Mean,
}

impl Rule {
    /// The rule as a trait object.
    pub fn build(self) -> Box<dyn Aggregator> {
        match self {
            Rule::Mean => Box::new(Mean),
        }
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
        out.copy_from_slice(inputs[0]);
        for v in &inputs[1..] {
            for (o, x) in out.iter_mut().zip(v.iter()) {
                *o += x;
            }
        }
        let inv = 1.0 / inputs.len() as f32;
        out.iter_mut().for_each(|o| *o *= inv);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_of_three() {
        let (a, b, c) = ([1.0f32, 2.0], [3.0f32, 4.0], [5.0f32, 9.0]);
        let mut out = [0f32; 2];
        Mean.aggregate(&[&a, &b, &c], &mut out).unwrap();
        assert_eq!(out, [3.0, 5.0]);
    }

    #[test]
    fn empty_and_ragged_inputs_are_errors() {
        let mut out = [0f32; 2];
        assert!(Mean.aggregate(&[], &mut out).is_err());
        assert!(Mean.aggregate(&[&[1.0, 2.0], &[1.0]], &mut out).is_err());
    }
}
