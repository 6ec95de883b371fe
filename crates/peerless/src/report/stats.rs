//! The report's arithmetic: means with Student-t intervals, and the fault measures (downtime,
//! recovery time, rounds lost) over a run's global-progress series. Pure functions, no I/O.

/// A mean over seeds with its 95 % interval half-width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Mean of the values.
    pub mean: f64,
    /// Half-width of the 95 % interval (Student t, n − 1 dof); `None` when n < 2.
    pub half_width: Option<f64>,
    /// Number of values.
    pub n: usize,
}

/// Two-sided 97.5 % quantile of Student's t with `dof` degrees of freedom.
///
/// Exact table values up to 30 dof (where seeds per cell live); beyond, the Cornish–Fisher
/// expansion around the normal quantile, which is within 1e-4 of the table from 30 on.
pub fn t_975(dof: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    ];
    assert!(dof >= 1, "the t distribution needs at least one degree of freedom");
    if dof <= TABLE.len() {
        return TABLE[dof - 1];
    }
    let z: f64 = 1.959_963_985;
    let n = dof as f64;
    let g1 = (z.powi(3) + z) / 4.0;
    let g2 = (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / 96.0;
    let g3 = (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / 384.0;
    z + g1 / n + g2 / n.powi(2) + g3 / n.powi(3)
}

/// Mean and 95 % Student-t interval of `values`; `None` when there are none.
pub fn estimate(values: &[f64]) -> Option<Estimate> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let half_width = (n >= 2).then(|| {
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        t_975(n - 1) * (var / n as f64).sqrt()
    });
    Some(Estimate { mean, half_width, n })
}

pub use peerless_core::stats::median;

/// One round completion of the global model: `t` in seconds since the run's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// Seconds since the run's start.
    pub t: f64,
    /// The global round completed.
    pub round: u64,
}

/// Times at which the global round first exceeded every round before it (the progress
/// timestamps); redoing rounds lost to a restart is not progress.
pub fn progress_times(series: &[Completion]) -> Vec<f64> {
    let mut best: Option<u64> = None;
    let mut out = Vec::new();
    for c in series {
        if best.is_none_or(|b| c.round > b) {
            best = Some(c.round);
            out.push(c.t);
        }
    }
    out
}

/// Multiple of the median gap between progress timestamps that still counts as normal.
pub const DOWNTIME_FACTOR: f64 = 3.0;

/// Time without global progress beyond normal: over the gaps `g` between consecutive progress
/// timestamps, the sum of `max(0, g − 3 × median gap)`.
pub fn downtime(progress: &[f64]) -> f64 {
    let gaps: Vec<f64> = progress.windows(2).map(|w| w[1] - w[0]).collect();
    let Some(med) = median(&gaps) else { return 0.0 };
    gaps.iter().map(|g| (g - DOWNTIME_FACTOR * med).max(0.0)).sum()
}

/// Time from a fault at `fault_t` to the first completion after it of a round above the global
/// round at that moment (the highest completed at or before `fault_t`); `None` when none
/// follows (the run never recovered).
pub fn recovery_time(series: &[Completion], fault_t: f64) -> Option<f64> {
    let at = series.iter().filter(|c| c.t <= fault_t).map(|c| c.round).max().unwrap_or(0);
    series.iter().find(|c| c.t > fault_t && c.round > at).map(|c| c.t - fault_t)
}

/// Rounds done again: for each completion of a round not above the previous one (the counter
/// went back, e.g. a parameter server resumed from an older checkpoint), `previous − round + 1`.
pub fn rounds_lost(series: &[Completion]) -> u64 {
    series.windows(2).map(|w| if w[1].round <= w[0].round { w[0].round - w[1].round + 1 } else { 0 }).sum()
}

/// First time at which `accuracy` reached `target`, from `(t, accuracy)` evaluations in time
/// order.
pub fn time_to_target(evals: &[(f64, f64)], target: f64) -> Option<f64> {
    evals.iter().find(|(_, a)| *a >= target).map(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: &[(f64, u64)]) -> Vec<Completion> {
        points.iter().map(|&(t, round)| Completion { t, round }).collect()
    }

    #[test]
    fn t_interval_matches_a_hand_computed_three_seed_interval() {
        // 1, 2, 3: mean 2, s = 1, half-width = t(2) / sqrt(3).
        let e = estimate(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(e.n, 3);
        assert!((e.mean - 2.0).abs() < 1e-12);
        assert!((e.half_width.unwrap() - 4.3027 / 3f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn one_value_has_no_interval_and_none_has_no_estimate() {
        let e = estimate(&[0.97]).unwrap();
        assert_eq!((e.mean, e.half_width, e.n), (0.97, None, 1));
        assert!(estimate(&[]).is_none());
        assert_eq!(estimate(&[5.0, 5.0]).unwrap().half_width, Some(0.0));
    }

    #[test]
    fn t_quantile_is_continuous_past_the_table_and_tends_to_the_normal() {
        assert!((t_975(31) - 2.0395).abs() < 2e-4, "{}", t_975(31));
        assert!((t_975(60) - 2.0003).abs() < 2e-4, "{}", t_975(60));
        assert!((t_975(100_000) - 1.96).abs() < 1e-3);
        for d in 1..200 {
            assert!(t_975(d + 1) < t_975(d), "decreasing at {d}");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn steady_progress_has_no_downtime() {
        let p: Vec<f64> = (0..100).map(|i| f64::from(i) * 0.1).collect();
        assert!(downtime(&p) < 1e-9);
        assert_eq!(downtime(&[]), 0.0);
        assert_eq!(downtime(&[1.0]), 0.0);
    }

    #[test]
    fn a_stall_counts_only_beyond_three_median_gaps() {
        // Rounds every 0.1 s, then a 5 s stall: downtime = 5 − 3 × 0.1.
        let mut p: Vec<f64> = (0..50).map(|i| f64::from(i) * 0.1).collect();
        let last = *p.last().unwrap();
        p.extend((0..50).map(|i| last + 5.0 + f64::from(i) * 0.1));
        assert!((downtime(&p) - 4.7).abs() < 1e-9, "{}", downtime(&p));
    }

    #[test]
    fn redone_rounds_are_not_progress() {
        // PS died after round 5, resumed from 3: rounds 4 and 5 are done again.
        let s = series(&[(1.0, 1), (2.0, 2), (3.0, 3), (4.0, 4), (5.0, 5), (9.0, 4), (10.0, 5), (11.0, 6)]);
        assert_eq!(progress_times(&s), vec![1.0, 2.0, 3.0, 4.0, 5.0, 11.0]);
        assert_eq!(rounds_lost(&s), 2);
    }

    #[test]
    fn a_monotone_counter_loses_no_rounds() {
        assert_eq!(rounds_lost(&series(&[(1.0, 1), (2.0, 2), (3.0, 3)])), 0);
        assert_eq!(rounds_lost(&[]), 0);
    }

    #[test]
    fn recovery_runs_to_the_first_round_above_the_one_at_injection() {
        let s = series(&[(1.0, 1), (2.0, 2), (3.0, 3), (9.0, 2), (10.0, 3), (11.0, 4), (12.0, 5)]);
        // Fault at 3.5 s with round 3 done: recovered when round 4 completes at 11 s.
        assert_eq!(recovery_time(&s, 3.5), Some(7.5));
        // A fault after the last round: never recovered.
        assert_eq!(recovery_time(&s, 20.0), None);
        // A fault before any round: the first round recovers.
        assert_eq!(recovery_time(&s, 0.5), Some(0.5));
    }

    #[test]
    fn time_to_target_is_the_first_evaluation_at_or_above_it() {
        let evals = [(1.0, 0.5), (2.0, 0.94), (3.0, 0.95), (4.0, 0.93), (5.0, 0.99)];
        assert_eq!(time_to_target(&evals, 0.95), Some(3.0));
        assert_eq!(time_to_target(&evals, 0.999), None);
    }
}
