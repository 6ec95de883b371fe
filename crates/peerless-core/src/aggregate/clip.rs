//! Centered clipping (Karimireddy, He and Jaggi, ICML 2021).
//!
//! `v ← v + (1/n) Σᵢ clip(xᵢ − v, τ)`, `clip(z, τ) = z · min(1, τ/‖z‖)`, repeated `L` times
//! from the coordinate-wise median (or a given reference, e.g. the previous round's aggregate).
//! Each iteration is one pass over the inputs: a chunk of `v` is updated with the clipping
//! factors of the previous distances, and the next iteration's distances are accumulated on the
//! same chunk while it is in cache. The median pass likewise accumulates the first distances.

use super::coord::{Network, median_of_rows, median_rows, sorted_chunks};
use super::krum::sq_dist;
use super::{Aggregator, check};
use crate::flat::{FlatError, check_finite};

/// Coordinates per chunk of an update pass.
const CHUNK: usize = 1024;

/// Centered clipping with radius `tau` and `iters` iterations. An input whose distance to the
/// centre is not finite (it holds a NaN or an infinity) is dropped: it contributes zero, as if
/// clipped to nothing. The result moves at most `iters · τ` from the median, whatever the
/// inputs.
#[derive(Debug, Clone, Copy)]
pub struct CenteredClipping {
    tau: f32,
    iters: usize,
}

impl CenteredClipping {
    /// Centered clipping with radius `tau` (positive, finite) and `iters` ≥ 1 iterations.
    ///
    /// # Panics
    /// If `tau` is not positive and finite, or `iters` is 0: validate the config first.
    pub fn new(tau: f32, iters: usize) -> CenteredClipping {
        assert!(tau.is_finite() && tau > 0.0, "centered clipping: tau = {tau} must be positive and finite");
        assert!(iters >= 1, "centered clipping: iters must be at least 1");
        CenteredClipping { tau, iters }
    }

    /// Like [`Aggregator::aggregate`], starting from `reference` instead of the median.
    ///
    /// # Errors
    /// As `aggregate`, and [`FlatError::NonFinite`] / [`FlatError::LengthMismatch`] for a bad
    /// reference.
    pub fn aggregate_from(
        &self,
        inputs: &[&[f32]],
        reference: &[f32],
        out: &mut [f32],
    ) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        if reference.len() != out.len() {
            return Err(FlatError::LengthMismatch {
                what: "centered-clipping reference".into(),
                expected: out.len(),
                got: reference.len(),
            });
        }
        check_finite("centered-clipping reference", reference)?;
        out.copy_from_slice(reference);
        let mut dist = vec![0f64; inputs.len()];
        for (k, v) in out.chunks(CHUNK).enumerate() {
            accumulate(inputs, v, k * CHUNK, &mut dist);
        }
        self.iterate(inputs, dist, out);
        Ok(())
    }

    fn iterate(&self, inputs: &[&[f32]], mut dist: Vec<f64>, out: &mut [f32]) {
        let inv_n = 1.0 / inputs.len() as f32;
        let mut delta = vec![0f32; CHUNK];
        for it in 0..self.iters {
            let scales: Vec<f32> = dist.iter().map(|&d2| clip_factor(d2, self.tau)).collect();
            let last = it + 1 == self.iters;
            dist.iter_mut().for_each(|d| *d = 0.0);
            for (k, v) in out.chunks_mut(CHUNK).enumerate() {
                let start = k * CHUNK;
                let delta = &mut delta[..v.len()];
                delta.iter_mut().for_each(|d| *d = 0.0);
                for (x, &s) in inputs.iter().zip(&scales) {
                    if s == 0.0 {
                        continue; // dropped (non-finite): 0 · NaN would be NaN
                    }
                    for ((d, &x), &c) in delta.iter_mut().zip(&x[start..start + v.len()]).zip(v.iter()) {
                        *d += s * (x - c);
                    }
                }
                for (c, d) in v.iter_mut().zip(delta.iter()) {
                    *c += d * inv_n;
                }
                if !last {
                    accumulate(inputs, v, start, &mut dist);
                }
            }
        }
    }
}

/// `dist[i] += ‖inputs[i][start..] − v‖²` over `v`'s chunk.
fn accumulate(inputs: &[&[f32]], v: &[f32], start: usize, dist: &mut [f64]) {
    for (d, x) in dist.iter_mut().zip(inputs) {
        *d += f64::from(sq_dist(&x[start..start + v.len()], v));
    }
}

/// `min(1, τ/‖z‖)` from `‖z‖²`; 0 when the distance is not finite.
fn clip_factor(d2: f64, tau: f32) -> f32 {
    if !d2.is_finite() {
        return 0.0;
    }
    let norm = d2.sqrt();
    if norm <= f64::from(tau) { 1.0 } else { (f64::from(tau) / norm) as f32 }
}

impl Aggregator for CenteredClipping {
    fn name(&self) -> &'static str {
        "centered-clipping"
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        let n = inputs.len();
        let net = Network::sorting(n).keeping(median_rows(n));
        let mut dist = vec![0f64; n];
        sorted_chunks(inputs, &net, out, |rows, out, start| {
            median_of_rows(rows, n, out);
            accumulate(inputs, out, start, &mut dist);
        });
        self.iterate(inputs, dist, out);
        Ok(())
    }

    /// That of the median it starts from; clipping bounds how far it then moves.
    fn effective_f(&self, n: usize) -> usize {
        n.saturating_sub(1) / 2
    }
}
