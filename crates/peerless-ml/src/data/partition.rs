//! Splitting a dataset's sample indices among workers: IID, or label-skewed by Dirichlet(α).
//!
//! Both partitioners are deterministic for a seed (they draw from
//! [`Rng::derive`](peerless_core::rng::Rng::derive)), return disjoint parts that together
//! cover every index exactly once, and sort each part's indices.

use peerless_core::rng::Rng;

use super::error::{DataError, Result};

/// How many times [`dirichlet`] redraws proportions before rebalancing to fill empty parts.
const DIRICHLET_ATTEMPTS: usize = 32;

/// Split `0..n` into `parts` shuffled parts whose sizes differ by at most one.
///
/// # Panics
/// If `parts == 0`.
pub fn iid(n: usize, parts: usize, seed: u64) -> Vec<Vec<usize>> {
    assert!(parts > 0, "iid partition into zero parts");
    let mut rng = Rng::derive(seed, "partition/iid", 0);
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        let mut part = idx[start..start + len].to_vec();
        part.sort_unstable();
        out.push(part);
        start += len;
    }
    out
}

/// Split sample indices into `parts` label-skewed parts: for each class, proportions drawn
/// from a symmetric Dirichlet(`alpha`) decide how its samples are divided among the parts.
/// Small `alpha` (e.g. 0.1) gives each part few classes; large `alpha` (e.g. 100) is close
/// to IID.
///
/// Every part is non-empty: proportions are redrawn up to 32 times, and if some part is
/// still empty, single samples are moved into it from the largest parts.
///
/// Errors if `alpha` is not positive and finite, `parts` is zero, there are fewer samples
/// than parts, or a label is `>= classes`.
pub fn dirichlet(
    labels: &[u8],
    classes: usize,
    parts: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    let bad = |msg: String| Err(DataError::Partition(msg));
    if !(alpha.is_finite() && alpha > 0.0) {
        return bad(format!("dirichlet alpha must be positive and finite, got {alpha}"));
    }
    if parts == 0 {
        return bad("cannot partition into zero parts".to_owned());
    }
    if labels.len() < parts {
        return bad(format!("cannot split {} samples into {parts} non-empty parts", labels.len()));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        match by_class.get_mut(usize::from(l)) {
            Some(c) => c.push(i),
            None => return bad(format!("label {l} at index {i} is not below classes = {classes}")),
        }
    }
    let mut rng = Rng::derive(seed, "partition/dirichlet", 0);
    for c in &mut by_class {
        rng.shuffle(c);
    }

    let mut out = Vec::new();
    for attempt in 0..DIRICHLET_ATTEMPTS {
        out = vec![Vec::new(); parts];
        for idx in by_class.iter().filter(|c| !c.is_empty()) {
            let p = rng.dirichlet(alpha, parts);
            let (mut start, mut cum) = (0, 0.0);
            for (k, part) in out.iter_mut().enumerate() {
                cum += p[k];
                let end = if k + 1 == parts {
                    idx.len()
                } else {
                    ((cum * idx.len() as f64).round() as usize).clamp(start, idx.len())
                };
                part.extend_from_slice(&idx[start..end]);
                start = end;
            }
        }
        if out.iter().all(|p| !p.is_empty()) {
            tracing::debug!(attempt, parts, alpha, "dirichlet partition drawn");
            break;
        }
    }
    let mut moved = 0;
    while let Some(empty) = out.iter().position(Vec::is_empty) {
        let largest = (0..parts).max_by_key(|&k| (out[k].len(), std::cmp::Reverse(k))).unwrap_or(0);
        // `labels.len() >= parts` guarantees a part with at least two samples here.
        assert!(out[largest].len() >= 2, "invariant: some part has two samples");
        let at = rng.below(out[largest].len() as u64) as usize;
        let i = out[largest].swap_remove(at);
        out[empty].push(i);
        moved += 1;
    }
    if moved > 0 {
        tracing::debug!(moved, parts, alpha, "rebalanced dirichlet partition to fill empty parts");
    }
    for part in &mut out {
        part.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_disjoint_covering(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for part in parts {
            assert!(part.windows(2).all(|w| w[0] < w[1]), "part not sorted");
            for &i in part {
                assert!(!seen[i], "index {i} in two parts");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "some index in no part");
    }

    fn labels(n: usize, classes: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % classes) as u8).collect()
    }

    /// Mean over parts of the Shannon entropy (nats) of the part's label distribution.
    fn mean_label_entropy(parts: &[Vec<usize>], labels: &[u8], classes: usize) -> f64 {
        let total: f64 = parts
            .iter()
            .map(|part| {
                let mut counts = vec![0usize; classes];
                part.iter().for_each(|&i| counts[usize::from(labels[i])] += 1);
                let n = part.len() as f64;
                counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum::<f64>()
            })
            .sum();
        total / parts.len() as f64
    }

    #[test]
    fn iid_parts_are_disjoint_covering_and_near_equal() {
        for (n, k) in [(0, 3), (1, 1), (10, 3), (1000, 7), (5, 8)] {
            let parts = iid(n, k, 42);
            assert_eq!(parts.len(), k);
            assert_disjoint_covering(&parts, n);
            let (min, max) = (parts.iter().map(Vec::len).min(), parts.iter().map(Vec::len).max());
            assert!(max.unwrap() - min.unwrap() <= 1, "{n} {k}");
        }
    }

    #[test]
    fn iid_is_deterministic_per_seed_and_seeds_differ() {
        assert_eq!(iid(500, 4, 1), iid(500, 4, 1));
        assert_ne!(iid(500, 4, 1), iid(500, 4, 2));
    }

    #[test]
    fn dirichlet_parts_are_disjoint_covering_nonempty_and_deterministic() {
        let y = labels(2000, 10);
        for alpha in [0.01, 0.1, 1.0, 100.0] {
            for parts in [1, 2, 10, 50] {
                let p = dirichlet(&y, 10, parts, alpha, 7).unwrap();
                assert_eq!(p.len(), parts);
                assert_disjoint_covering(&p, y.len());
                assert!(p.iter().all(|part| !part.is_empty()), "alpha {alpha} parts {parts}");
                assert_eq!(p, dirichlet(&y, 10, parts, alpha, 7).unwrap());
            }
        }
        assert_ne!(dirichlet(&y, 10, 10, 0.5, 1).unwrap(), dirichlet(&y, 10, 10, 0.5, 2).unwrap());
    }

    #[test]
    fn dirichlet_fills_every_part_even_when_classes_are_few() {
        // 2 classes, 20 parts, tiny alpha: resampling alone cannot fill every part.
        let y = labels(40, 2);
        let p = dirichlet(&y, 2, 20, 0.001, 3).unwrap();
        assert_disjoint_covering(&p, 40);
        assert!(p.iter().all(|part| !part.is_empty()));
        // Exactly as many samples as parts.
        let p = dirichlet(&y[..20], 2, 20, 0.05, 3).unwrap();
        assert!(p.iter().all(|part| part.len() == 1));
    }

    #[test]
    fn small_alpha_is_more_label_skewed_than_large_alpha() {
        let y = labels(6000, 10);
        let skewed: f64 =
            (0..5).map(|s| mean_label_entropy(&dirichlet(&y, 10, 10, 0.1, s).unwrap(), &y, 10)).sum::<f64>()
                / 5.0;
        let even: f64 = (0..5)
            .map(|s| mean_label_entropy(&dirichlet(&y, 10, 10, 100.0, s).unwrap(), &y, 10))
            .sum::<f64>()
            / 5.0;
        let iid_entropy = mean_label_entropy(&iid(6000, 10, 0), &y, 10);
        assert!(skewed < 1.2, "alpha 0.1 entropy {skewed}");
        assert!(even > 2.2 && iid_entropy > 2.25, "alpha 100 entropy {even}, iid {iid_entropy}");
        assert!(skewed + 0.8 < even);
    }

    #[test]
    fn dirichlet_rejects_bad_parameters() {
        let y = labels(100, 10);
        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = dirichlet(&y, 10, 4, alpha, 0).unwrap_err();
            assert!(err.to_string().contains("alpha"), "{err}");
        }
        assert!(dirichlet(&y, 10, 0, 1.0, 0).is_err());
        assert!(dirichlet(&y[..3], 10, 4, 1.0, 0).is_err());
        assert!(dirichlet(&y, 5, 4, 1.0, 0).is_err());
    }
}
