//! Coordinate-wise rules: median, trimmed mean, and Bulyan's second phase.
//!
//! The inputs are processed in chunks of coordinates. A chunk of every input is copied into a
//! scratch buffer (row `i` = input `i`, NaN replaced by `+∞`), then a sorting network runs
//! "vertically" over the rows: each comparator is an element-wise min/max of two rows, which
//! the compiler vectorises. Afterwards row `r` holds, for every coordinate of the chunk, the
//! `r`-th smallest value, so a median is a row and a trimmed mean a sum of rows. No
//! per-coordinate allocation, no branches on the data, and the result depends only on the
//! multiset of values: it is exactly invariant under permutations of the inputs.

use std::ops::Range;

use super::{Aggregator, check};
use crate::flat::FlatError;

/// A comparator network on `n` wires that sorts them ascending (Batcher's odd–even merge
/// sort, pruned to `n` wires), optionally reduced to the comparators some output rows need.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    n: usize,
    /// `(a, b)` with `a < b`: min to `a`, max to `b`, applied in order.
    pairs: Vec<(usize, usize)>,
}

impl Network {
    /// A network sorting `n` wires.
    pub(crate) fn sorting(n: usize) -> Network {
        let size = n.next_power_of_two();
        let mut pairs = Vec::new();
        let mut p = 1;
        while p < size {
            let mut k = p;
            while k >= 1 {
                let mut j = k % p;
                while j + k < size {
                    for i in 0..k.min(size - j - k) {
                        let (a, b) = (i + j, i + j + k);
                        // Wires ≥ n would hold +∞ and never move: drop their comparators.
                        if a / (2 * p) == b / (2 * p) && b < n {
                            pairs.push((a, b));
                        }
                    }
                    j += 2 * k;
                }
                k /= 2;
            }
            p *= 2;
        }
        Network { n, pairs }
    }

    /// Only the comparators that the output `rows` depend on (a backward liveness pass): the
    /// other rows end up holding their values in some order, but these are exact.
    pub(crate) fn keeping(mut self, rows: Range<usize>) -> Network {
        let mut live = vec![false; self.n];
        live[rows].iter_mut().for_each(|l| *l = true);
        let mut kept: Vec<(usize, usize)> = Vec::with_capacity(self.pairs.len());
        for &(a, b) in self.pairs.iter().rev() {
            if live[a] || live[b] {
                live[a] = true;
                live[b] = true;
                kept.push((a, b));
            }
        }
        kept.reverse();
        self.pairs = kept;
        self
    }

    /// Comparators in the network.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Sorts `vals` (one value per wire) with the network; for tests.
    #[cfg(test)]
    pub(crate) fn sort_one(&self, vals: &mut [f32]) {
        self.apply(vals, 1, 1);
    }

    /// Applies the network to the first `len` columns of `rows` (row `r` at `r * stride`).
    fn apply(&self, rows: &mut [f32], stride: usize, len: usize) {
        for &(a, b) in &self.pairs {
            let (lo, hi) = rows.split_at_mut(b * stride);
            let x = &mut lo[a * stride..a * stride + len];
            let y = &mut hi[..len];
            for (x, y) in x.iter_mut().zip(y.iter_mut()) {
                // No NaN reaches here, so min/max are a total order. (A select such as
                // `if q < p { q } else { p }` becomes a conditional store and a branch.)
                let (p, q) = (*x, *y);
                *x = p.min(q);
                *y = p.max(q);
            }
        }
    }
}

/// A chunk of sorted rows: `row(r)[c]` is the `r`-th smallest value of coordinate `c`.
#[derive(Debug)]
pub(crate) struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
    len: usize,
}

impl Rows<'_> {
    pub(crate) fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.stride..r * self.stride + self.len]
    }
}

/// Coordinates per chunk for `n` rows: the scratch stays within ~16 KiB (L1), a multiple of 16.
fn chunk_len(n: usize) -> usize {
    ((4096 / n.max(1)).clamp(64, 1024)) & !15
}

/// For each chunk of coordinates: sorts every coordinate's values across `inputs` with `net`
/// (NaN as `+∞`), then calls `finish(rows, out_chunk, start)`.
pub(crate) fn sorted_chunks(
    inputs: &[&[f32]],
    net: &Network,
    out: &mut [f32],
    mut finish: impl FnMut(&Rows<'_>, &mut [f32], usize),
) {
    let n = inputs.len();
    debug_assert_eq!(net.n, n);
    let stride = chunk_len(n);
    let mut scratch = vec![0f32; n * stride];
    for (k, out) in out.chunks_mut(stride).enumerate() {
        let start = k * stride;
        let len = out.len();
        for (row, input) in scratch.chunks_exact_mut(stride).zip(inputs) {
            for (dst, &x) in row.iter_mut().zip(&input[start..start + len]) {
                *dst = if x.is_nan() { f32::INFINITY } else { x };
            }
        }
        net.apply(&mut scratch, stride, len);
        finish(&Rows { data: &scratch, stride, len }, out, start);
    }
}

/// `out` = the mean of sorted rows `lo..hi`, summed in row order.
pub(crate) fn mean_of_rows(rows: &Rows<'_>, range: Range<usize>, out: &mut [f32]) {
    let inv = 1.0 / range.len() as f32;
    out.copy_from_slice(rows.row(range.start));
    for r in range.start + 1..range.end {
        for (o, x) in out.iter_mut().zip(rows.row(r)) {
            *o += x;
        }
    }
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `out` = the median of `n` sorted rows (the mean of the middle two for even `n`).
pub(crate) fn median_of_rows(rows: &Rows<'_>, n: usize, out: &mut [f32]) {
    if n % 2 == 1 {
        out.copy_from_slice(rows.row(n / 2));
    } else {
        for ((o, a), b) in out.iter_mut().zip(rows.row(n / 2 - 1)).zip(rows.row(n / 2)) {
            *o = 0.5 * a + 0.5 * b;
        }
    }
}

/// The rows a median of `n` needs.
pub(crate) fn median_rows(n: usize) -> Range<usize> {
    if n % 2 == 1 { n / 2..n / 2 + 1 } else { n / 2 - 1..n / 2 + 1 }
}

/// Scratch for [`closest_to_median_mean`], one slot per coordinate of a chunk.
#[derive(Debug, Default)]
pub(crate) struct WindowScratch {
    med: Vec<f32>,
    cost: Vec<f32>,
    /// The best window's first row, as `f32` (exact) so selects stay in one vector type.
    best: [Vec<f32>; 2],
    sum: [Vec<f32>; 2],
}

/// Bulyan's second phase on `n` sorted rows: for each coordinate, the mean of the `beta`
/// values closest to the median. Those form a window of consecutive sorted values; the window
/// whose farthest value is nearest the median wins, the lowest on ties.
///
/// Branch-free per coordinate, so it vectorises. Values updated by a select are written to a
/// second buffer (ping-pong): a select reading and writing the same slot compiles to a
/// conditional store, a mispredicted branch per coordinate.
pub(crate) fn closest_to_median_mean(
    rows: &Rows<'_>,
    n: usize,
    beta: usize,
    out: &mut [f32],
    s: &mut WindowScratch,
) {
    assert!((1..=n).contains(&beta), "invariant: 1 ≤ beta ≤ n");
    let len = out.len();
    s.med.resize(len, 0.0);
    s.cost.resize(len, 0.0);
    s.sum.iter_mut().for_each(|v| v.resize(len, 0.0));
    s.best.iter_mut().for_each(|v| v.resize(len, 0.0));
    let med = &mut s.med[..len];
    median_of_rows(rows, n, med);
    let med = &*med;
    let cost = &mut s.cost[..len];
    let [b0, b1] = &mut s.best;
    let (mut old, mut new) = (&mut b0[..len], &mut b1[..len]);
    let (lo, hi) = (rows.row(0), rows.row(beta - 1));
    // Iterators, not indices: the rows' lengths are not known to equal `len`, and bounds
    // checks would stop the vectoriser.
    for ((c, m), (lo, hi)) in cost.iter_mut().zip(med).zip(lo.iter().zip(hi)) {
        *c = (m - lo).max(hi - m);
    }
    old.iter_mut().for_each(|b| *b = 0.0);
    for l in 1..=n - beta {
        let (lo, hi) = (rows.row(l), rows.row(l + beta - 1));
        let l = l as f32;
        for ((c, (nw, od)), (m, (lo, hi))) in
            cost.iter_mut().zip(new.iter_mut().zip(old.iter())).zip(med.iter().zip(lo.iter().zip(hi)))
        {
            // Load before selecting: a load inside a select's arm is a branch to LLVM.
            let (m, lo, hi, prev, od) = (*m, *lo, *hi, *c, *od);
            let k = (m - lo).max(hi - m);
            let better = k < prev;
            *c = prev.min(k);
            *nw = if better { l } else { od };
        }
        std::mem::swap(&mut old, &mut new);
    }
    let best = &*old;
    let [s0, s1] = &mut s.sum;
    let (mut acc, mut next) = (&mut s0[..len], &mut s1[..len]);
    acc.iter_mut().for_each(|a| *a = 0.0);
    for r in 0..n {
        let row = rows.row(r);
        let (r, beta) = (r as f32, beta as f32);
        for ((nx, a), (b, x)) in next.iter_mut().zip(acc.iter()).zip(best.iter().zip(row)) {
            let (a, b, x) = (*a, *b, *x);
            let inside = (b <= r) & (r < b + beta);
            *nx = a + if inside { x } else { 0.0 };
        }
        std::mem::swap(&mut acc, &mut next);
    }
    let inv = 1.0 / beta as f32;
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a * inv;
    }
}

/// Coordinate-wise median; the mean of the two middle values for an even number of inputs.
/// Tolerates fewer than half of the inputs being arbitrary at each coordinate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Median;

impl Aggregator for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        let n = inputs.len();
        let net = Network::sorting(n).keeping(median_rows(n));
        sorted_chunks(inputs, &net, out, |rows, out, _| median_of_rows(rows, n, out));
        Ok(())
    }

    fn effective_f(&self, n: usize) -> usize {
        n.saturating_sub(1) / 2
    }
}

/// How much a trimmed mean cuts from each end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trim {
    /// This many values from each end (`f`).
    Count(usize),
    /// `⌊β·n⌋` values from each end, `β` in `[0, 0.5)`.
    Fraction(f64),
}

impl Trim {
    /// Values cut from each end with `n` inputs: as configured, lowered to leave at least one.
    pub fn per_end(&self, n: usize) -> usize {
        let k = match *self {
            Trim::Count(f) => f,
            Trim::Fraction(beta) => (beta * n as f64).floor() as usize,
        };
        k.min(n.saturating_sub(1) / 2)
    }
}

/// Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `k` smallest and
/// `k` largest values and average the rest, `k` = [`Trim::per_end`].
#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    trim: Trim,
}

impl TrimmedMean {
    /// A trimmed mean cutting `trim` from each end.
    pub fn new(trim: Trim) -> TrimmedMean {
        TrimmedMean { trim }
    }
}

impl Aggregator for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn aggregate(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), FlatError> {
        check(inputs, out.len())?;
        let n = inputs.len();
        let k = self.trim.per_end(n);
        let net = Network::sorting(n).keeping(k..n - k);
        sorted_chunks(inputs, &net, out, |rows, out, _| mean_of_rows(rows, k..n - k, out));
        Ok(())
    }

    fn effective_f(&self, n: usize) -> usize {
        self.trim.per_end(n)
    }
}
