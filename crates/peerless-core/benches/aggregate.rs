//! Criterion benches of every aggregation rule on n = 5 and n = 9 gradients of 1M `f32`,
//! throughput in bytes of gradient input (n × 4 MB).
//!
//! After the criterion groups, a summary times each rule again in the same process (best of a
//! few runs) and prints its throughput and its time as a multiple of the plain mean's:
//! `n=9 krum (f = 1): 2.1 GB/s, 4.3× mean`.
// A benchmark measures time: the crate's ban on clocks (clippy.toml) is for the library.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use peerless_core::aggregate::{Aggregator, AggregatorConfig, Trim};
use peerless_core::rng::Rng;

const D: usize = 1 << 20;
const NS: [usize; 2] = [5, 9];

fn rules() -> Vec<AggregatorConfig> {
    vec![
        AggregatorConfig::Mean,
        AggregatorConfig::Median,
        AggregatorConfig::TrimmedMean { trim: Trim::Count(1) },
        AggregatorConfig::Krum { f: 1 },
        AggregatorConfig::MultiKrum { f: 1, m: None },
        AggregatorConfig::Bulyan { f: 1 },
        AggregatorConfig::CenteredClipping { tau: 1.0, iters: 1 },
        AggregatorConfig::CenteredClipping { tau: 1.0, iters: 3 },
    ]
}

/// `n` gradient-like vectors: a shared signal plus per-input noise.
fn inputs(n: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(7);
    let signal: Vec<f32> = (0..D).map(|_| (rng.normal() * 1e-2) as f32).collect();
    (0..n).map(|_| signal.iter().map(|s| s + (rng.normal() * 1e-3) as f32).collect()).collect()
}

fn bench(c: &mut Criterion) {
    for n in NS {
        let data = inputs(n);
        let refs: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; D];
        let mut g = c.benchmark_group(format!("aggregate_n{n}"));
        g.throughput(Throughput::Bytes((n * D * 4) as u64));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        for rule in rules() {
            let agg = rule.build();
            g.bench_function(BenchmarkId::from_parameter(rule), |b| {
                b.iter(|| agg.aggregate(&refs, &mut out).expect("aggregate"))
            });
        }
        g.finish();
    }
}

/// Each rule timed `REPS` times, round-robin so that a change in the machine's load hits
/// every rule alike; the best time of each, seconds.
fn best_times(aggs: &[Box<dyn Aggregator>], refs: &[&[f32]], out: &mut [f32]) -> Vec<f64> {
    const REPS: usize = 9;
    let mut best = vec![f64::INFINITY; aggs.len()];
    for _ in 0..REPS {
        for (b, agg) in best.iter_mut().zip(aggs) {
            let t = Instant::now();
            agg.aggregate(refs, out).expect("aggregate");
            *b = b.min(t.elapsed().as_secs_f64());
        }
    }
    best
}

fn summary() {
    println!("\nthroughput and time relative to the mean (best of 9, round-robin, same process):");
    for n in NS {
        let data = inputs(n);
        let refs: Vec<&[f32]> = data.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; D];
        let bytes = (n * D * 4) as f64;
        let configs = rules();
        let aggs: Vec<Box<dyn Aggregator>> = configs.iter().map(|r| r.build()).collect();
        let times = best_times(&aggs, &refs, &mut out);
        let mean = times[0];
        for ((rule, agg), t) in configs.iter().zip(&aggs).zip(&times) {
            println!(
                "n={n} {:<40} {:6.2} GB/s  {:5.1}× mean   (effective f = {})",
                rule.to_string(),
                bytes / t / 1e9,
                t / mean,
                agg.effective_f(n)
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
