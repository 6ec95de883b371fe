//! Gradient compression with error feedback: int8 and int4 with one scale per block, and top-k
//! sparsification. Deterministic and I/O-free, so the sender and every receiver turn a
//! compressed vector back into the same dense bits ([`Compressed::densify`]), and replicas
//! stay identical.
//!
//! Error feedback (Seide et al. 2014; Karimireddy et al. 2019): a node compresses its gradient
//! plus what it left unsent before, and keeps the difference for next time, so nothing it
//! computes is lost for good, only delayed.

use std::cmp::Ordering;

/// How a node compresses what it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    /// Dense `f32`.
    None,
    /// Each element as an `i8` times its block's scale (`max |x| / 127` over [`INT8_BLOCK`]
    /// elements): 4× fewer bytes.
    Int8,
    /// Each element as a 4-bit integer in `−7..=7` times its block's scale (`max |x| / 7`
    /// over [`INT8_BLOCK`] elements), two to a byte: 8× fewer bytes. Streaming DiLoCo sends
    /// its outer updates in 4 bits; error feedback carries what the coarse steps leave out.
    Int4,
    /// Only the `ceil(fraction · n)` largest-magnitude elements, with their indices.
    TopK {
        /// Share of the elements kept, in `(0, 1]`.
        fraction: f64,
    },
}

/// Elements sharing one int8 (or int4) scale.
pub const INT8_BLOCK: usize = 1024;

/// A compressed vector of `len()` elements.
#[derive(Debug, Clone, PartialEq)]
pub enum Compressed {
    /// `x[i] ≈ q[i] · scales[i / INT8_BLOCK]`.
    Int8 {
        /// One non-negative finite scale per block.
        scales: Vec<f32>,
        /// One value per element.
        q: Vec<i8>,
    },
    /// `x[i] ≈ q[i] · scales[i / INT8_BLOCK]`, every `q[i]` in `−7..=7`.
    Int4 {
        /// One non-negative finite scale per block.
        scales: Vec<f32>,
        /// One value per element (two to a byte on the wire).
        q: Vec<i8>,
    },
    /// `x[idx[j]] = vals[j]`, every other element 0.
    TopK {
        /// Elements of the dense vector.
        n: u32,
        /// Strictly ascending indices below `n`.
        idx: Vec<u32>,
        /// The kept values (finite).
        vals: Vec<f32>,
    },
}

impl Compressed {
    /// `v` compressed by `c`; `None` for [`Compression::None`].
    pub fn compress(c: Compression, v: &[f32]) -> Option<Compressed> {
        match c {
            Compression::None => None,
            Compression::Int8 => {
                let (scales, q) = quantize(v, 127);
                Some(Compressed::Int8 { scales, q })
            }
            Compression::Int4 => {
                let (scales, q) = quantize(v, 7);
                Some(Compressed::Int4 { scales, q })
            }
            Compression::TopK { fraction } => Some(top_k(v, fraction)),
        }
    }

    /// Elements of the dense vector.
    pub fn len(&self) -> usize {
        match self {
            Compressed::Int8 { q, .. } | Compressed::Int4 { q, .. } => q.len(),
            Compressed::TopK { n, .. } => *n as usize,
        }
    }

    /// Whether the dense vector is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dense vector, as every receiver computes it.
    pub fn densify(&self) -> Vec<f32> {
        match self {
            Compressed::Int8 { scales, q } | Compressed::Int4 { scales, q } => q
                .chunks(INT8_BLOCK)
                .zip(scales)
                .flat_map(|(block, &s)| block.iter().map(move |&x| f32::from(x) * s))
                .collect(),
            Compressed::TopK { n, idx, vals } => {
                let mut out = vec![0f32; *n as usize];
                for (&i, &v) in idx.iter().zip(vals) {
                    out[i as usize] = v;
                }
                out
            }
        }
    }
}

/// `v` as integers in `−levels..=levels`, one scale (`max |x| / levels`) per block.
fn quantize(v: &[f32], levels: i8) -> (Vec<f32>, Vec<i8>) {
    let top = f32::from(levels);
    let mut scales = Vec::with_capacity(v.len().div_ceil(INT8_BLOCK));
    let mut q = Vec::with_capacity(v.len());
    for block in v.chunks(INT8_BLOCK) {
        let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let s = max / top;
        scales.push(s);
        if s > 0.0 {
            q.extend(block.iter().map(|x| (x / s).round().clamp(-top, top) as i8));
        } else {
            q.extend(std::iter::repeat_n(0i8, block.len()));
        }
    }
    (scales, q)
}

fn top_k(v: &[f32], fraction: f64) -> Compressed {
    let n = v.len();
    let k = ((fraction * n as f64).ceil() as usize).clamp(usize::from(n > 0), n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    // Larger magnitude first; equal magnitudes by index, so the choice is a total order.
    let by_size = |a: &u32, b: &u32| -> Ordering {
        v[*b as usize].abs().total_cmp(&v[*a as usize].abs()).then(a.cmp(b))
    };
    if k > 0 && k < n {
        order.select_nth_unstable_by(k - 1, by_size);
    }
    let mut idx = order[..k].to_vec();
    idx.sort_unstable();
    let vals = idx.iter().map(|&i| v[i as usize]).collect();
    Compressed::TopK { n: n as u32, idx, vals }
}

/// What one node has computed but not yet sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFeedback {
    compression: Compression,
    /// The residual: computed minus sent, summed over the rounds so far.
    pub residual: Vec<f32>,
}

impl ErrorFeedback {
    /// A node of a model with `n` parameters, nothing left unsent (no residual at all
    /// without compression).
    pub fn new(compression: Compression, n: usize) -> ErrorFeedback {
        let n = if compression == Compression::None { 0 } else { n };
        ErrorFeedback { compression, residual: vec![0.0; n] }
    }

    /// Compresses `g` plus the residual, keeps what the compressed form leaves out, and
    /// returns the compressed form and the dense vector receivers will see. `None` for
    /// [`Compression::None`] (nothing is kept).
    pub fn step(&mut self, g: &[f32]) -> Option<(Compressed, Vec<f32>)> {
        if self.compression == Compression::None {
            return None;
        }
        if self.residual.len() != g.len() {
            self.residual = vec![0.0; g.len()];
        }
        let corrected: Vec<f32> = g.iter().zip(&self.residual).map(|(g, e)| g + e).collect();
        let c = Compressed::compress(self.compression, &corrected).expect("not None, checked above");
        let dense = c.densify();
        for ((e, x), d) in self.residual.iter_mut().zip(&corrected).zip(&dense) {
            *e = x - d;
        }
        Some((c, dense))
    }

    /// Forgets what was left unsent (the node adopted another's state).
    pub fn reset(&mut self) {
        self.residual.iter_mut().for_each(|e| *e = 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32)).collect()
    }

    #[test]
    fn int8_is_within_half_a_step_of_each_value() {
        let v = wave(3000);
        let Some(c @ Compressed::Int8 { .. }) = Compressed::compress(Compression::Int8, &v) else { panic!() };
        let Compressed::Int8 { scales, .. } = &c else { unreachable!() };
        assert_eq!(scales.len(), 3);
        let d = c.densify();
        for (i, (x, y)) in v.iter().zip(&d).enumerate() {
            assert!((x - y).abs() <= scales[i / INT8_BLOCK] * 0.5 + 1e-6, "{i}: {x} vs {y}");
        }
        let zeros = Compressed::compress(Compression::Int8, &[0.0; 5]).unwrap();
        assert_eq!(zeros.densify(), vec![0.0; 5]);
    }

    #[test]
    fn int4_is_within_half_a_step_of_each_value_in_seven_levels() {
        let v = wave(2500);
        let Some(c @ Compressed::Int4 { .. }) = Compressed::compress(Compression::Int4, &v) else { panic!() };
        let Compressed::Int4 { scales, q } = &c else { unreachable!() };
        assert_eq!(scales.len(), 3);
        assert!(q.iter().all(|x| (-7..=7).contains(x)) && q.iter().any(|&x| x.abs() == 7));
        let d = c.densify();
        for (i, (x, y)) in v.iter().zip(&d).enumerate() {
            assert!((x - y).abs() <= scales[i / INT8_BLOCK] * 0.5 + 1e-6, "{i}: {x} vs {y}");
        }
        // With error feedback, a constant vector is sent in full over the rounds.
        let mut fb = ErrorFeedback::new(Compression::Int4, v.len());
        let mut sent = vec![0f32; v.len()];
        for _ in 0..100 {
            let (_, d) = fb.step(&v).unwrap();
            sent.iter_mut().zip(&d).for_each(|(s, x)| *s += x);
        }
        for i in 0..v.len() {
            let computed = v[i] * 100.0;
            assert!((computed - sent[i] - fb.residual[i]).abs() < 1e-4 * computed.abs() + 1e-2, "{i}");
            assert!(fb.residual[i].abs() <= scales[i / INT8_BLOCK] + 1e-3, "{i}");
        }
    }

    #[test]
    fn top_k_keeps_the_largest_magnitudes_exactly_and_breaks_ties_by_index() {
        let v = [0.5, -3.0, 0.1, 3.0, -0.2, 2.0];
        let c = Compressed::compress(Compression::TopK { fraction: 0.5 }, &v).unwrap();
        assert_eq!(c, Compressed::TopK { n: 6, idx: vec![1, 3, 5], vals: vec![-3.0, 3.0, 2.0] });
        assert_eq!(c.densify(), vec![0.0, -3.0, 0.0, 3.0, 0.0, 2.0]);
        let tie = Compressed::compress(Compression::TopK { fraction: 0.25 }, &[1.0, -1.0, 1.0, 1.0]).unwrap();
        assert_eq!(tie, Compressed::TopK { n: 4, idx: vec![0], vals: vec![1.0] });
        assert_eq!(
            Compressed::compress(Compression::TopK { fraction: 1e-9 }, &v).unwrap().densify()[1],
            -3.0
        );
    }

    #[test]
    fn error_feedback_sends_everything_eventually() {
        // A constant gradient under 10 % top-k: what is sent over many rounds adds up to what
        // was computed, minus at most the residual still held.
        let g: Vec<f32> =
            (0..200).map(|i| (1.0 + (i % 7) as f32) * if i % 2 == 0 { 1.0 } else { -0.5 }).collect();
        let mut fb = ErrorFeedback::new(Compression::TopK { fraction: 0.1 }, 200);
        let mut sent = vec![0f32; 200];
        // Each element is sent once its residual reaches about the 20th largest: here every
        // 60 rounds or sooner.
        let rounds = 300;
        for _ in 0..rounds {
            let (_, d) = fb.step(&g).unwrap();
            sent.iter_mut().zip(&d).for_each(|(s, x)| *s += x);
        }
        for i in 0..200 {
            let computed = g[i] * rounds as f32;
            assert!((computed - sent[i] - fb.residual[i]).abs() < 1e-4 * computed.abs() + 1e-2, "{i}");
            assert!(sent[i] != 0.0 || g[i] == 0.0, "element {i} was never sent");
        }
        fb.reset();
        assert!(fb.residual.iter().all(|e| *e == 0.0));
        assert!(ErrorFeedback::new(Compression::None, 3).step(&[1.0, 2.0, 3.0]).is_none());
    }
}
