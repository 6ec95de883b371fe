//! Criterion benches of one training step per model, and of its load / compute / flatten phases.
//!
//! Batch 64 of MNIST-shaped inputs (1×28×28, 10 classes). The last lines printed give the
//! flatten+load overhead as a fraction of the whole step, measured in the same run.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peerless_core::rng::Rng;
use peerless_ml::{Arch, Backend, Batch, Model, ModelSpec};

const BATCH: usize = 64;

fn batch(seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let x = (0..BATCH * 784).map(|_| rng.f64() as f32).collect();
    let y = (0..BATCH).map(|_| rng.below(10) as u8).collect();
    Batch { x, y, shape: [1, 28, 28] }
}

fn model(arch: Arch, backend: Backend) -> Model {
    Model::new(ModelSpec::new(arch, [1, 28, 28], 10), backend).expect("model builds")
}

fn steps(c: &mut Criterion) {
    let b = batch(1);
    let mut g = c.benchmark_group("loss_and_grad");
    g.throughput(Throughput::Elements(BATCH as u64));
    for backend in [Backend::Ndarray, Backend::Flex] {
        for arch in [Arch::Logreg, Arch::Mlp, Arch::Lenet] {
            let m = model(arch, backend);
            let params = m.init(0);
            let mut grad = vec![0f32; params.len()];
            g.bench_function(BenchmarkId::new(arch.to_string(), backend), |bench| {
                bench.iter(|| m.loss_and_grad_into(&params, &b, &mut grad).expect("step"))
            });
        }
    }
    g.finish();
}

fn phases(c: &mut Criterion) {
    let b = batch(2);
    let m = model(Arch::Mlp, Backend::default());
    let params = m.init(0);
    let mut grad = vec![0f32; params.len()];
    let mut g = c.benchmark_group("mlp_phase");
    g.bench_function("load", |bench| bench.iter(|| m.prepare(&params).expect("load")));
    let prepared = m.prepare(&params).expect("load");
    g.bench_function("compute", |bench| bench.iter(|| m.forward_backward(&prepared, &b).expect("compute")));
    g.bench_function("flatten", |bench| {
        bench.iter_batched(
            || m.forward_backward(&prepared, &b).expect("compute").1,
            |mut grads| m.flatten_grads(&prepared, &mut grads, &mut grad).expect("flatten"),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();

    // The overhead fraction, measured here in one run (criterion reports each phase above).
    let (mut load, mut compute, mut flatten) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let reps = 300;
    for _ in 0..reps {
        let t = Instant::now();
        let p = m.prepare(&params).expect("load");
        let t1 = Instant::now();
        let (_, mut grads) = m.forward_backward(&p, &b).expect("compute");
        let t2 = Instant::now();
        m.flatten_grads(&p, &mut grads, &mut grad).expect("flatten");
        let t3 = Instant::now();
        load += t1 - t;
        compute += t2 - t1;
        flatten += t3 - t2;
    }
    let total = load + compute + flatten;
    println!(
        "mlp step: {:.0} steps/s; load {:.1} %, flatten {:.1} %, flatten+load {:.1} % of the step",
        reps as f64 / total.as_secs_f64(),
        100.0 * load.as_secs_f64() / total.as_secs_f64(),
        100.0 * flatten.as_secs_f64() / total.as_secs_f64(),
        100.0 * (load + flatten).as_secs_f64() / total.as_secs_f64(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = steps, phases
}
criterion_main!(benches);
