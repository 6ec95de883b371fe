//! Distance-based rules: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et
//! al. 2018).
//!
//! The pairwise squared distances are computed once, in one pass over the inputs: chunk by
//! chunk (all inputs' chunks stay in cache), every pair's partial sum is accumulated in `f32`
//! lanes and added to an `f64` total. `O(n²d)` arithmetic for `O(nd)` memory traffic.

use super::coord::{Network, WindowScratch, closest_to_median_mean, mean_of_rows, sorted_chunks};
use super::{Aggregator, check, mean_into};
use crate::flat::FlatError;

/// Coordinates per chunk of the distance pass.
const CHUNK: usize = 1024;

/// Squared Euclidean distances between inputs; `+∞` where non-finite (a NaN or an infinity in
/// either input, or overflow).
#[derive(Debug)]
pub(crate) struct Distances {
    n: usize,
    d: Vec<f64>,
    /// `bad[i]`: input `i` holds a non-finite value.
    bad: Vec<bool>,
}

impl Distances {
    pub(crate) fn new(inputs: &[&[f32]]) -> Distances {
        let n = inputs.len();
        let len = inputs.first().map_or(0, |v| v.len());
        let mut d = vec![0f64; n * n];
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            for i in 0..n {
                let a = &inputs[i][start..end];
                for j in i + 1..n {
                    d[i * n + j] += f64::from(sq_dist(a, &inputs[j][start..end]));
                }
            }
            start = end;
        }
        let mut any_inf = false;
        for i in 0..n {
            for j in i + 1..n {
                let x = d[i * n + j];
                let x = if x.is_finite() { x } else { f64::INFINITY };
                any_inf |= x.is_infinite();
                d[i * n + j] = x;
                d[j * n + i] = x;
            }
        }
        // Only when some distance is infinite can an input be non-finite: check those (rare).
        let bad = (0..n)
            .map(|i| {
                let suspect = any_inf && (0..n).any(|j| j != i && d[i * n + j].is_infinite());
                suspect && !inputs[i].iter().all(|x| x.is_finite())
            })
            .collect();
        Distances { n, d, bad }
    }

    fn get(&self, i: usize, j: usize) -> f64 {
        self.d[i * self.n + j]
    }

    /// `members` ranked best first by Krum score with `f` Byzantine among them: the sum of the
    /// squared distances to the `|members| − f − 2` nearest other members (at least 1). Inputs
    /// holding non-finite values rank last. Equal scores are common when few neighbours count
    /// (with one, two mutual nearest neighbours always tie), so ties go to the input whose
    /// further distances, nearest first, are smaller, and only then to the lower index: the
    /// ranking does not depend on the input order unless two inputs are equally placed.
    pub(crate) fn krum_rank(&self, members: &[usize], f: usize) -> Vec<usize> {
        let m = members.len();
        let k = m.saturating_sub(f + 2).clamp(1, m.saturating_sub(1).max(1));
        let mut scored: Vec<(bool, f64, Vec<f64>, usize)> = members
            .iter()
            .map(|&i| {
                let mut near: Vec<f64> =
                    members.iter().filter(|&&j| j != i).map(|&j| self.get(i, j)).collect();
                near.sort_unstable_by(f64::total_cmp);
                let score = near.iter().take(k).sum::<f64>();
                (self.bad[i], score, near, i)
            })
            .collect();
        scored.sort_unstable_by(|a, b| {
            let further = a.2.iter().zip(&b.2).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne());
            a.0.cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then(further.unwrap_or(std::cmp::Ordering::Equal))
                .then(a.3.cmp(&b.3))
        });
        scored.into_iter().map(|(_, _, _, i)| i).collect()
    }
}

/// Σ (a − b)², in 16 independent `f32` lanes so it vectorises, then summed in lane order.
pub(crate) fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    // The tail in its own accumulator: indexing `acc` with it would stop the vectoriser.
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| (x - y) * (x - y)).sum();
    for (x, y) in ca.zip(cb) {
        let x: &[f32; L] = x.try_into().expect("invariant: chunks_exact gives L");
        let y: &[f32; L] = y.try_into().expect("invariant: chunks_exact gives L");
        for l in 0..L {
            let t = x[l] - y[l];
            acc[l] += t * t;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Krum, or Multi-Krum with `m` set: the input (or the mean of the `m` inputs) with the
/// smallest sum of squared distances to its `n − f − 2` nearest neighbours.
///
/// Needs `n ≥ 2f+3`; with fewer inputs it uses the largest such `f` (see
/// [`Aggregator::effective_f`]); with `f = 0` it still picks the best-scored single input.
#[derive(Debug, Clone, Copy)]
pub struct Krum {
    f: usize,
    /// `None`: Krum. `Some(m)`: Multi-Krum averaging `m` (`None` inside: `n − f`).
    multi: Option<Option<usize>>,
}

impl Krum {
    /// Krum tolerating `f` Byzantine inputs.
    pub fn new(f: usize) -> Krum {
        Krum { f, multi: None }
    }

    /// Multi-Krum tolerating `f`, averaging the `m` best-scored inputs (`None`: `n − f`). At run
    /// time `m` is capped at `n − f` for the effective `f`.
    pub fn multi(f: usize, m: Option<usize>) -> Krum {
        Krum { f, multi: Some(m) }
    }

    /// Inputs averaged with `n` inputs: 1 for Krum.
    pub fn selected(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let f = self.effective_f(n);
        match self.multi {
            None => 1,
            Some(m) => m.unwrap_or(n - f).clamp(1, n - f),
        }
    }
}

/// The largest `f ≤ f_max` with `n ≥ a·f + 3` (0 if none).
fn degrade(f_max: usize, n: usize, a: usize) -> usize {
    f_max.min(n.saturating_sub(3) / a)
}

impl Aggregator for Krum {
    fn name(&self) -> &'static str {
        if self.multi.is_some() { "multi-krum" } else { "krum" }
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        let n = inputs.len();
        let m = self.selected(n);
        if n == 1 {
            out.copy_from_slice(inputs[0]);
            return Ok(());
        }
        let dist = Distances::new(inputs);
        let all: Vec<usize> = (0..n).collect();
        let ranked = dist.krum_rank(&all, self.effective_f(n));
        // Summed in rank order, so the result does not depend on the input order.
        mean_into(ranked[..m].iter().map(|&i| inputs[i]), out);
        Ok(())
    }

    fn effective_f(&self, n: usize) -> usize {
        degrade(self.f, n, 2)
    }
}

/// Bulyan: select `θ = n − 2f` inputs by repeated Krum (each round scores the inputs not yet
/// selected, with `f`), then per coordinate average the `β = θ − 2f` selected values closest
/// to their median. Needs `n ≥ 4f+3`; with fewer inputs it uses the largest such `f`, and at
/// `f = 0` it is the mean (summed in sorted order).
#[derive(Debug, Clone, Copy)]
pub struct Bulyan {
    f: usize,
}

impl Bulyan {
    /// Bulyan tolerating `f` Byzantine inputs.
    pub fn new(f: usize) -> Bulyan {
        Bulyan { f }
    }

    /// The inputs selected by the Krum phase, in selection order (for tests and logs).
    pub fn select(&self, inputs: &[&[f32]]) -> Vec<usize> {
        let n = inputs.len();
        let f = self.effective_f(n);
        let dist = Distances::new(inputs);
        let mut rest: Vec<usize> = (0..n).collect();
        let mut chosen = Vec::with_capacity(n - 2 * f);
        while chosen.len() < n - 2 * f {
            let best = dist.krum_rank(&rest, f)[0];
            rest.retain(|&i| i != best);
            chosen.push(best);
        }
        chosen
    }
}

impl Aggregator for Bulyan {
    fn name(&self) -> &'static str {
        "bulyan"
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        let f = self.effective_f(inputs.len());
        if f == 0 {
            // Everything is selected and averaged: no distances needed.
            let n = inputs.len();
            sorted_chunks(inputs, &Network::sorting(n), out, |rows, out, _| mean_of_rows(rows, 0..n, out));
            return Ok(());
        }
        let chosen: Vec<&[f32]> = self.select(inputs).into_iter().map(|i| inputs[i]).collect();
        let theta = chosen.len();
        let beta = theta - 2 * f;
        let net = Network::sorting(theta);
        let mut scratch = WindowScratch::default();
        sorted_chunks(&chosen, &net, out, |rows, out, _| {
            closest_to_median_mean(rows, theta, beta, out, &mut scratch)
        });
        Ok(())
    }

    fn effective_f(&self, n: usize) -> usize {
        degrade(self.f, n, 4)
    }
}
