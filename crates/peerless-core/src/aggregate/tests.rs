//! Property and unit tests of every aggregation rule: agreement with the mean where it must,
//! robustness bounds, NaN safety, determinism.

use proptest::prelude::*;

use super::coord::{Network, WindowScratch, closest_to_median_mean, sorted_chunks};
use super::*;

fn agg(rule: &dyn Aggregator, inputs: &[&[f32]]) -> Vec<f32> {
    let mut out = vec![f32::NAN; inputs[0].len()];
    rule.aggregate(inputs, &mut out).unwrap();
    out
}

fn scalars(xs: &[f32]) -> Vec<[f32; 1]> {
    xs.iter().map(|&x| [x]).collect()
}

fn refs<const D: usize>(v: &[[f32; D]]) -> Vec<&[f32]> {
    v.iter().map(|x| x.as_slice()).collect()
}

fn vrefs(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(|x| x.as_slice()).collect()
}

/// Every rule, with a few parameter choices.
fn rules(f: usize) -> Vec<Box<dyn Aggregator>> {
    vec![
        Box::new(Mean),
        Box::new(Median),
        Box::new(TrimmedMean::new(Trim::Count(f))),
        Box::new(TrimmedMean::new(Trim::Fraction(0.25))),
        Box::new(Krum::new(f)),
        Box::new(Krum::multi(f, None)),
        Box::new(Krum::multi(f, Some(2))),
        Box::new(Bulyan::new(f)),
        Box::new(CenteredClipping::new(1.0, 1)),
        Box::new(CenteredClipping::new(0.5, 3)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Mean

#[test]
fn mean_of_three() {
    let (a, b, c) = ([1.0f32, 2.0], [3.0f32, 4.0], [5.0f32, 9.0]);
    let mut out = [0f32; 2];
    Mean.aggregate(&[&a, &b, &c], &mut out).unwrap();
    assert_eq!(out, [3.0, 5.0]);
}

/// The blocked mean gives what whole-vector passes give, bit for bit, across block edges and
/// a ragged last block (including -0 + -0).
#[test]
fn the_blocked_mean_equals_whole_vector_passes_bit_for_bit() {
    let mut rng = crate::rng::Rng::new(3);
    let n = 2048 * 2 + 77;
    let vs: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n).map(|i| if i % 97 == 0 { -0.0 } else { rng.f64() as f32 - 0.5 }).collect())
        .collect();
    let mut want = vs[0].clone();
    for v in &vs[1..] {
        want.iter_mut().zip(v).for_each(|(o, x)| *o += x);
    }
    want.iter_mut().for_each(|o| *o *= 1.0 / 3.0);
    let got = agg(&Mean, &vrefs(&vs));
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(got[0].is_sign_negative(), "-0 + -0 + -0 stays -0");
}

#[test]
fn empty_and_ragged_inputs_are_errors_for_every_rule() {
    for rule in rules(1) {
        let mut out = [0f32; 2];
        assert!(rule.aggregate(&[], &mut out).is_err(), "{}", rule.name());
        assert!(rule.aggregate(&[&[1.0, 2.0], &[1.0]], &mut out).is_err(), "{}", rule.name());
    }
}

// ---------------------------------------------------------------------------------------------
// Sorting networks

#[test]
fn networks_sort_every_zero_one_input_up_to_16_wires() {
    // The 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
    for n in 1..=16usize {
        let net = Network::sorting(n);
        for bits in 0u32..1 << n {
            let mut v: Vec<f32> = (0..n).map(|i| ((bits >> i) & 1) as f32).collect();
            net.sort_one(&mut v);
            assert!(v.windows(2).all(|w| w[0] <= w[1]), "n = {n}, bits = {bits:b}: {v:?}");
        }
    }
}

#[test]
fn network_sizes_are_near_optimal_for_small_n() {
    // Optimal sizes: n=5: 9, n=9: 25. Batcher's pruned networks are close.
    assert!(Network::sorting(5).len() <= 10, "{}", Network::sorting(5).len());
    assert!(Network::sorting(9).len() <= 30, "{}", Network::sorting(9).len());
    // A median needs fewer comparators than a full sort.
    assert!(Network::sorting(9).keeping(4..5).len() < Network::sorting(9).len());
}

proptest! {
    #[test]
    fn pruned_networks_give_exact_rows(
        v in proptest::collection::vec(-1000i32..1000, 1..64),
        a in 0usize..64, b in 0usize..64,
    ) {
        let n = v.len();
        let (lo, hi) = (a.min(b) % n, a.max(b) % n + 1);
        let lo = lo.min(hi - 1);
        let mut full: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let mut pruned = full.clone();
        Network::sorting(n).sort_one(&mut full);
        let mut want = v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        want.sort_by(f32::total_cmp);
        prop_assert_eq!(&full, &want);
        Network::sorting(n).keeping(lo..hi).sort_one(&mut pruned);
        prop_assert_eq!(&pruned[lo..hi], &want[lo..hi]);
    }
}

// ---------------------------------------------------------------------------------------------
// Median and trimmed mean

#[test]
fn median_odd_and_even_by_hand() {
    let v = [[3.0f32, -1.0], [1.0, 5.0], [2.0, 7.0]];
    assert_eq!(agg(&Median, &refs(&v)), [2.0, 5.0]);
    let v = [[3.0f32], [1.0], [2.0], [10.0]];
    assert_eq!(agg(&Median, &refs(&v)), [2.5]);
    assert_eq!(agg(&Median, &refs(&[[4.0f32]])), [4.0]);
}

#[test]
fn median_treats_nan_and_infinities_as_extremes() {
    let v = scalars(&[f32::NAN, 1.0, 2.0, f32::NEG_INFINITY, 3.0]);
    assert_eq!(agg(&Median, &refs(&v)), [2.0]);
    let v = scalars(&[f32::NAN, -f32::NAN, 1.0, 2.0, 3.0]);
    assert_eq!(agg(&Median, &refs(&v)), [3.0], "both NaNs count as +∞");
}

#[test]
fn median_works_across_chunk_boundaries() {
    // Long enough for several chunks and a ragged tail.
    let d = 3001;
    let v: Vec<Vec<f32>> = (0..5).map(|i| (0..d).map(|c| ((c * 7 + i * 13) % 11) as f32).collect()).collect();
    let out = agg(&Median, &vrefs(&v));
    for c in 0..d {
        let mut col: Vec<f32> = v.iter().map(|x| x[c]).collect();
        col.sort_by(f32::total_cmp);
        assert_eq!(out[c], col[2], "coordinate {c}");
    }
}

#[test]
fn trimmed_mean_by_hand() {
    let v = scalars(&[100.0, 2.0, 3.0, 4.0, -50.0]);
    assert_eq!(agg(&TrimmedMean::new(Trim::Count(1)), &refs(&v)), [3.0]);
    assert_eq!(agg(&TrimmedMean::new(Trim::Fraction(0.2)), &refs(&v)), [3.0], "⌊0.2·5⌋ = 1");
    assert_eq!(agg(&TrimmedMean::new(Trim::Fraction(0.1)), &refs(&v)), [59.0 / 5.0], "⌊0.1·5⌋ = 0");
    assert_eq!(agg(&TrimmedMean::new(Trim::Count(2)), &refs(&v)), [3.0]);
    let v = scalars(&[1.0, 2.0, 6.0, 9.0]);
    assert_eq!(agg(&TrimmedMean::new(Trim::Count(1)), &refs(&v)), [4.0]);
}

#[test]
fn trimmed_mean_degrades_to_leave_one_value() {
    let t = TrimmedMean::new(Trim::Count(3));
    assert_eq!([1, 2, 3, 4, 5, 7, 9].map(|n| t.effective_f(n)), [0, 0, 1, 1, 2, 3, 3]);
    // f = 3 with 4 inputs: trims 1 from each end.
    assert_eq!(agg(&t, &refs(&scalars(&[0.0, 10.0, 20.0, 1000.0]))), [15.0]);
    assert_eq!(agg(&t, &refs(&scalars(&[7.0]))), [7.0]);
}

// ---------------------------------------------------------------------------------------------
// Krum, Multi-Krum, Bulyan

#[test]
fn krum_by_hand_breaks_ties_by_further_distances() {
    // f = 1, n = 5: score = the 2 nearest squared distances. 0: 1+4 = 5, 1: 1+1 = 2,
    // 2: 1+1 = 2, 3: 1+4 = 5, 100: huge. Inputs 1 and 2 tie; 2's further distances
    // (4, 98²) beat 1's (4, 99²), whatever the order.
    let v = scalars(&[0.0, 1.0, 2.0, 3.0, 100.0]);
    assert_eq!(agg(&Krum::new(1), &refs(&v)), [2.0]);
    let v = scalars(&[0.0, 2.0, 1.0, 3.0, 100.0]);
    assert_eq!(agg(&Krum::new(1), &refs(&v)), [2.0]);
    // Equally placed inputs: the lower index.
    let v = scalars(&[0.0, 1.0, 3.0, 4.0]);
    assert_eq!(agg(&Krum::new(0), &refs(&v)), [1.0]);
    let v = scalars(&[4.0, 3.0, 1.0, 0.0]);
    assert_eq!(agg(&Krum::new(0), &refs(&v)), [3.0]);
}

#[test]
fn multi_krum_by_hand() {
    let v = scalars(&[0.0, 1.0, 2.0, 3.0, 100.0]);
    // m = 2: inputs 1 and 2.
    assert_eq!(agg(&Krum::multi(1, Some(2)), &refs(&v)), [1.5]);
    // m = n − f = 4: everything but the outlier.
    assert_eq!(agg(&Krum::multi(1, None), &refs(&v)), [1.5]);
    assert_eq!(Krum::multi(1, None).selected(5), 4);
    assert_eq!(Krum::multi(1, Some(9)).selected(5), 4, "capped at n − f");
    assert_eq!(Krum::new(1).selected(5), 1);
}

#[test]
fn krum_degrades_with_fewer_inputs() {
    let k = Krum::new(2);
    assert_eq!([1, 2, 3, 4, 5, 6, 7, 8].map(|n| k.effective_f(n)), [0, 0, 0, 0, 1, 1, 2, 2]);
    // Two inputs, f = 0: both score the same; the first is chosen.
    assert_eq!(agg(&k, &refs(&scalars(&[5.0, 9.0]))), [5.0]);
    assert_eq!(agg(&k, &refs(&scalars(&[5.0]))), [5.0]);
    // Three inputs, f = 0: one nearest neighbour each; 1 and 2 tie at 1.
    assert_eq!(agg(&k, &refs(&scalars(&[-5.0, 1.0, 2.0]))), [1.0]);
    let mk = Krum::multi(2, None);
    assert_eq!(agg(&mk, &refs(&scalars(&[1.0, 3.0]))), [2.0], "f = 0: the mean of all");
}

#[test]
fn krum_never_selects_a_non_finite_input() {
    let v = scalars(&[f32::NAN, 1.0]);
    assert_eq!(agg(&Krum::new(1), &refs(&v)), [1.0]);
    let v = [[f32::INFINITY, 0.0], [0.0, 0.0], [f32::NAN, 1.0], [0.5, 0.5], [3.0, 3.0]];
    // Finite inputs 1, 3, 4; scores (2 nearest, infinite distances last): 1: 0.5 + 18,
    // 3: 0.5 + 12.5, 4: 12.5 + 18.
    assert_eq!(agg(&Krum::new(1), &refs(&v)), [0.5, 0.5]);
    // Multi-Krum over the three finite inputs (two bad ones is more than f = 1 for m = n − f).
    let out = agg(&Krum::multi(1, Some(3)), &refs(&v));
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
}

#[test]
fn bulyan_by_hand() {
    // n = 7, f = 1: θ = 5 by repeated Krum, each round on the inputs left:
    // 1. k = 4: 3 and 4 score 10; 4's farthest (996²) beats 3's (997²): 4.
    // 2. k = 3: 1: 21, 2: 11, 3: 9, 5: 14, 6: 26: 3.
    // 3. k = 2: 2 and 5 score 10; 5's farthest is nearer: 5.
    // 4. k = 1: 1 and 2 score 1; 2's next (16) beats 1's (25): 2.
    // 5. k = 1: 1 and 6 score 25; 6's next (994²) beats 1's (999²): 6.
    // Then β = 3 closest to the median 4 of {2, 3, 4, 5, 6}: 3, 4, 5.
    let v = scalars(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0]);
    assert_eq!(Bulyan::new(1).select(&refs(&v)), [3, 2, 4, 1, 5]);
    assert_eq!(agg(&Bulyan::new(1), &refs(&v)), [4.0]);
    assert_eq!([3, 6, 7, 10, 11].map(|n| Bulyan::new(2).effective_f(n)), [0, 0, 1, 1, 2]);
    // f = 0 (6 inputs): the mean.
    assert_eq!(agg(&Bulyan::new(1), &refs(&scalars(&[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]))), [4.0]);
}

#[test]
fn closest_to_median_window_by_hand() {
    // Sorted 0, 1, 2, 10, 11; median 2; β = 3: windows cost 2, 8, 9, so 0, 1, 2 → 1.
    // Second coordinate: -9, 4, 5, 6, 100; median 5: windows 14, 1, 95 → 4, 5, 6 → 5.
    let v = [[10.0f32, 100.0], [0.0, 5.0], [11.0, -9.0], [2.0, 6.0], [1.0, 4.0]];
    let r = refs(&v);
    let mut out = [0f32; 2];
    let mut s = WindowScratch::default();
    sorted_chunks(&r, &Network::sorting(5), &mut out, |rows, o, _| {
        closest_to_median_mean(rows, 5, 3, o, &mut s)
    });
    assert_eq!(out, [1.0, 5.0]);
}

// ---------------------------------------------------------------------------------------------
// Centered clipping

#[test]
fn centered_clipping_by_hand() {
    let v = scalars(&[0.0, 0.0, 0.0, 10.0]);
    // Median 0; the outlier's difference 10 is clipped to 1: 0 + 1/4.
    assert_eq!(agg(&CenteredClipping::new(1.0, 1), &refs(&v)), [0.25]);
    // Second iteration from 0.25: -0.25 × 3 unclipped, 9.75 clipped to 1: + 0.25/4.
    assert_eq!(agg(&CenteredClipping::new(1.0, 2), &refs(&v)), [0.3125]);
    // From a reference 5: -5 × 3 clipped to -1 each, +5 to +1: 5 - 2/4.
    let mut out = [0f32];
    CenteredClipping::new(1.0, 1).aggregate_from(&refs(&v), &[5.0], &mut out).unwrap();
    assert_eq!(out, [4.5]);
    assert!(CenteredClipping::new(1.0, 1).aggregate_from(&refs(&v), &[f32::NAN], &mut out).is_err());
    assert!(CenteredClipping::new(1.0, 1).aggregate_from(&refs(&v), &[1.0, 2.0], &mut out).is_err());
}

#[test]
fn centered_clipping_drops_non_finite_inputs() {
    let v = [[0.0f32, 1.0], [0.0, 1.0], [f32::NAN, 1.0], [1.0, f32::INFINITY], [0.0, 1.0]];
    let out = agg(&CenteredClipping::new(1.0, 3), &refs(&v));
    assert_eq!(out, [0.0, 1.0]);
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    aggregator: AggregatorConfig,
}

fn parse(text: &str) -> Result<AggregatorConfig, String> {
    toml::from_str::<Doc>(text).map(|d| d.aggregator).map_err(|e| e.to_string())
}

#[test]
fn config_parses_names_and_tables() {
    assert_eq!(parse("aggregator = \"mean\"").unwrap(), AggregatorConfig::Mean);
    assert_eq!(AggregatorConfig::default(), AggregatorConfig::Mean);
    assert_eq!(parse("aggregator = \"median\"").unwrap(), AggregatorConfig::Median);
    assert_eq!(parse("aggregator = \"krum\"").unwrap(), AggregatorConfig::Krum { f: 1 });
    assert_eq!(parse("aggregator = { rule = \"krum\", f = 2 }").unwrap(), AggregatorConfig::Krum { f: 2 });
    assert_eq!(
        parse("[aggregator]\nrule = \"multi-krum\"\nm = 3\n").unwrap(),
        AggregatorConfig::MultiKrum { f: 1, m: Some(3) }
    );
    assert_eq!(
        parse("aggregator = \"trimmed-mean\"").unwrap(),
        AggregatorConfig::TrimmedMean { trim: Trim::Count(1) }
    );
    assert_eq!(
        parse("aggregator = { rule = \"trimmed-mean\", beta = 0.2 }").unwrap(),
        AggregatorConfig::TrimmedMean { trim: Trim::Fraction(0.2) }
    );
    assert_eq!(
        parse("aggregator = { rule = \"bulyan\", f = 0 }").unwrap(),
        AggregatorConfig::Bulyan { f: 0 }
    );
    assert_eq!(
        parse("aggregator = { rule = \"centered-clipping\", tau = 0.5, iters = 3 }").unwrap(),
        AggregatorConfig::CenteredClipping { tau: 0.5, iters: 3 }
    );
    assert_eq!(
        parse("aggregator = \"centered-clipping\"").unwrap(),
        AggregatorConfig::CenteredClipping { tau: 1.0, iters: 1 }
    );
}

#[test]
fn config_refuses_unknown_rules_and_keys() {
    let e = parse("aggregator = \"geomed\"").unwrap_err();
    assert!(e.contains("geomed") && e.contains("krum"), "{e}");
    let e = parse("aggregator = { rule = \"krum\", trim_beta = 0.1 }").unwrap_err();
    assert!(e.contains("trim_beta"), "{e}");
    let e = parse("aggregator = { rule = \"mean\", f = 1 }").unwrap_err();
    assert!(e.contains("unknown field") && e.contains('f'), "{e}");
    let e = parse("aggregator = { rule = \"trimmed-mean\", f = 1, beta = 0.1 }").unwrap_err();
    assert!(e.contains("not both"), "{e}");
    let e = parse("aggregator = { f = 1 }").unwrap_err();
    assert!(e.contains("rule"), "{e}");
    assert!(parse("aggregator = 3").is_err());
}

#[test]
fn config_round_trips_through_toml() {
    for c in [
        AggregatorConfig::Mean,
        AggregatorConfig::Median,
        AggregatorConfig::TrimmedMean { trim: Trim::Count(2) },
        AggregatorConfig::TrimmedMean { trim: Trim::Fraction(0.1) },
        AggregatorConfig::Krum { f: 1 },
        AggregatorConfig::MultiKrum { f: 1, m: None },
        AggregatorConfig::MultiKrum { f: 2, m: Some(4) },
        AggregatorConfig::Bulyan { f: 1 },
        AggregatorConfig::CenteredClipping { tau: 2.5, iters: 4 },
    ] {
        let text = toml::to_string(&Doc { aggregator: c }).unwrap();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
        assert_eq!(c.build().name(), c.name());
    }
    assert_eq!(
        toml::to_string(&Doc { aggregator: AggregatorConfig::Mean }).unwrap(),
        "aggregator = \"mean\"\n"
    );
}

#[test]
fn validate_names_rule_precondition_f_and_n() {
    let e = AggregatorConfig::Krum { f: 1 }.validate(4).unwrap_err();
    assert_eq!(e.to_string(), "krum needs n ≥ 2f+3 = 5 inputs for f = 1, the run has 4");
    assert!(AggregatorConfig::Krum { f: 1 }.validate(5).is_ok());
    let e = AggregatorConfig::Bulyan { f: 1 }.validate(6).unwrap_err();
    assert_eq!(e.to_string(), "bulyan needs n ≥ 4f+3 = 7 inputs for f = 1, the run has 6");
    assert!(AggregatorConfig::Bulyan { f: 1 }.validate(7).is_ok());
    let e = AggregatorConfig::TrimmedMean { trim: Trim::Count(2) }.validate(4).unwrap_err();
    assert!(e.to_string().starts_with("trimmed-mean needs n ≥ 2f+1 = 5"), "{e}");
    let e = AggregatorConfig::MultiKrum { f: 1, m: Some(5) }.validate(5).unwrap_err();
    assert!(e.to_string().starts_with("multi-krum: m = 5"), "{e}");
    assert!(AggregatorConfig::MultiKrum { f: 1, m: Some(0) }.validate(5).is_err());
    assert!(AggregatorConfig::MultiKrum { f: 1, m: Some(4) }.validate(5).is_ok());
    assert!(AggregatorConfig::TrimmedMean { trim: Trim::Fraction(0.5) }.validate(9).is_err());
    assert!(AggregatorConfig::TrimmedMean { trim: Trim::Fraction(0.0) }.validate(1).is_ok());
    for (tau, iters) in [(0.0, 1), (f64::NAN, 1), (-1.0, 1), (1e300, 1), (1.0, 0), (1.0, 101)] {
        assert!(AggregatorConfig::CenteredClipping { tau, iters }.validate(5).is_err(), "{tau} {iters}");
    }
    assert!(AggregatorConfig::Mean.validate(1).is_ok());
    assert!(AggregatorConfig::Median.validate(2).is_ok());
    assert_eq!(AggregatorConfig::MultiKrum { f: 1, m: Some(3) }.to_string(), "multi-krum (f = 1, m = 3)");
}

// ---------------------------------------------------------------------------------------------
// Properties

/// `n` vectors of `d` coordinates in [-100, 100].
fn vectors(
    n: std::ops::RangeInclusive<usize>,
    d: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Vec<f32>>> {
    (n, d).prop_flat_map(|(n, d)| proptest::collection::vec(proptest::collection::vec(-100f32..100.0, d), n))
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
}

/// Outlier coordinates: non-finite, huge, or far from [-1, 1].
fn outlier_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(1e30f32),
        Just(-1e30f32),
        Just(f32::MAX),
        1e4f32..1e6,
        -1e6f32..-1e4,
    ]
}

/// `f` in 1..=2, `n = 4f+3+extra` (every precondition holds), honest values in [-1, 1] first,
/// then `f` outliers, then a shuffle of positions.
fn attacked() -> impl Strategy<Value = (usize, Vec<Vec<f32>>, Vec<usize>)> {
    (1usize..=2, 0usize..=3, 1usize..24).prop_flat_map(|(f, extra, d)| {
        let n = 4 * f + 3 + extra;
        let honest = proptest::collection::vec(proptest::collection::vec(-1f32..1.0, d), n - f);
        let bad = proptest::collection::vec(proptest::collection::vec(outlier_value(), d), f);
        let order = Just((0..n).collect::<Vec<usize>>()).prop_shuffle();
        (Just(f), honest, bad, order).prop_map(|(f, mut honest, bad, order)| {
            honest.extend(bad);
            (f, honest, order)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn output_does_not_depend_on_input_order(seed: u64, n in 1usize..=11, d in 1usize..20) {
        // Seeded values, not shrunk ones: shrinking would make inputs equal, and ties (broken
        // by index) legitimately depend on the order.
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<Vec<f32>> =
            (0..n).map(|_| (0..d).map(|_| (rng.f64() * 200.0 - 100.0) as f32).collect()).collect();
        let mut perm: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut perm);
        let shuffled: Vec<Vec<f32>> = perm.iter().map(|&i| v[i].clone()).collect();
        for rule in rules(1).iter().chain(rules(2).iter()) {
            let a = agg(rule.as_ref(), &vrefs(&v));
            let b = agg(rule.as_ref(), &vrefs(&shuffled));
            match rule.name() {
                // Two inputs are always equally placed for Krum: the first wins.
                "krum" if n == 2 => {}
                // Sums of sorted values, or of inputs in rank order: exactly invariant.
                "median" | "trimmed-mean" | "krum" | "multi-krum" | "bulyan" => {
                    prop_assert_eq!(&a, &b, "{}", rule.name())
                }
                _ => prop_assert!(close(&a, &b, 1e-5), "{}: {:?} vs {:?}", rule.name(), a, b),
            }
        }
    }

    #[test]
    fn identical_inputs_give_that_input(x in proptest::collection::vec(-1e3f32..1e3, 1..40), n in 1usize..12) {
        let v = vec![x.clone(); n];
        for rule in rules(1).iter().chain(rules(2).iter()) {
            let out = agg(rule.as_ref(), &vrefs(&v));
            match rule.name() {
                "median" | "krum" => prop_assert_eq!(&out, &x, "{}", rule.name()),
                _ => prop_assert!(close(&out, &x, 1e-6), "{}: {:?}", rule.name(), out),
            }
        }
    }

    #[test]
    fn robust_rules_stay_within_honest_range_under_f_outliers((f, v, order) in attacked()) {
        let honest = &v[..v.len() - f];
        let d = v[0].len();
        let lo: Vec<f32> = (0..d).map(|c| honest.iter().map(|x| x[c]).fold(f32::INFINITY, f32::min)).collect();
        let hi: Vec<f32> = (0..d).map(|c| honest.iter().map(|x| x[c]).fold(f32::NEG_INFINITY, f32::max)).collect();
        let shuffled: Vec<Vec<f32>> = order.iter().map(|&i| v[i].clone()).collect();
        let inputs = vrefs(&shuffled);
        let eps = 1e-6;
        for rule in [
            Box::new(Median) as Box<dyn Aggregator>,
            Box::new(TrimmedMean::new(Trim::Count(f))),
            Box::new(Krum::new(f)),
            Box::new(Krum::multi(f, None)),
            Box::new(Bulyan::new(f)),
        ] {
            prop_assert!(rule.effective_f(inputs.len()) >= f);
            let out = agg(rule.as_ref(), &inputs);
            for c in 0..d {
                prop_assert!(
                    out[c] >= lo[c] - eps && out[c] <= hi[c] + eps,
                    "{}: coordinate {} = {} outside [{}, {}]", rule.name(), c, out[c], lo[c], hi[c]
                );
            }
        }
        // Krum selects one honest input exactly.
        let out = agg(&Krum::new(f), &inputs);
        prop_assert!(honest.contains(&out));
        // Centered clipping moves at most iters·τ from the (honest-bounded) median.
        let med = agg(&Median, &inputs);
        for (tau, iters) in [(1.0f32, 1usize), (0.5, 3)] {
            let out = agg(&CenteredClipping::new(tau, iters), &inputs);
            let moved: f64 = out.iter().zip(&med).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>().sqrt();
            prop_assert!(moved <= f64::from(tau) * iters as f64 * (1.0 + 1e-5), "moved {}", moved);
        }
    }

    #[test]
    fn non_finite_inputs_never_reach_robust_outputs(
        (f, mut v, order) in attacked(),
        poison in proptest::collection::vec((0usize..24, prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)]), 1..6),
    ) {
        // The f attackers send otherwise plausible vectors with a few non-finite coordinates.
        let n = v.len();
        let d = v[0].len();
        for a in n - f..n {
            v[a] = v[a - 1].clone();
            for &(c, x) in &poison {
                v[a][c % d] = x;
            }
        }
        let shuffled: Vec<Vec<f32>> = order.iter().map(|&i| v[i].clone()).collect();
        for rule in rules(f).into_iter().filter(|r| r.name() != "mean") {
            let out = agg(rule.as_ref(), &vrefs(&shuffled));
            prop_assert!(out.iter().all(|x| x.is_finite()), "{}: {:?}", rule.name(), out);
        }
    }

    #[test]
    fn fewer_inputs_than_configured_never_error(v in vectors(1..=8, 1..10)) {
        for rule in rules(3) {
            let mut out = vec![0f32; v[0].len()];
            prop_assert!(rule.aggregate(&vrefs(&v), &mut out).is_ok(), "{}", rule.name());
            prop_assert!(out.iter().all(|x| x.is_finite()), "{}", rule.name());
            prop_assert!(rule.effective_f(v.len()) <= v.len().saturating_sub(1) / 2);
            let again = agg(rule.as_ref(), &vrefs(&v));
            prop_assert_eq!(out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                            again.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }
}
