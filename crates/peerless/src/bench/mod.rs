//! `peerless bench step`: the full training step against PyTorch, measured in the same run.
//!
//! The peerless step is what every gradient function and peer does: build the model's tensors
//! from the flat parameter vector (*load*), forward + backward (*compute*), copy the gradients
//! into one flat vector (*flatten*), and apply the optimizer to the flat vectors. The reference
//! is the same MLP step in PyTorch on one thread, flatten and write-back included, run by
//! `python3` when `torch` imports; the report gives the ratio of the two and the share of the
//! step spent in load + flatten.

pub mod p2p;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use peerless_core::optim::{Optimizer, OptimizerConfig};
use peerless_core::rng::Rng;
use peerless_ml::{Arch, Backend, Batch, Model, ModelSpec};
use serde::Serialize;

const TORCH_SCRIPT: &str = include_str!("torch_mlp_step.py");
const BATCH: usize = 64;

/// Results of `peerless bench step`, printed as a table and as JSON.
#[derive(Debug, Serialize)]
pub struct StepBench {
    /// burn backend.
    pub backend: String,
    /// Model id.
    pub model: String,
    /// Full peerless steps per second (flat in, flat out, optimizer included).
    pub steps_per_s: f64,
    /// Share of the step spent building tensors from the flat vector.
    pub load_fraction: f64,
    /// Share of the step spent copying gradients into the flat vector.
    pub flatten_fraction: f64,
    /// PyTorch steps per second, same run, if available.
    pub torch_steps_per_s: Option<f64>,
    /// `steps_per_s / torch_steps_per_s`.
    pub ratio_vs_torch: Option<f64>,
    /// Why the reference is missing, if it is.
    pub torch_note: Option<String>,
}

/// Runs the step benchmark for `steps` steps per measurement.
pub fn step(backend: Backend, steps: usize) -> Result<StepBench> {
    let model = Model::new(ModelSpec::new(Arch::Mlp, [1, 28, 28], 10), backend)?;
    let mut rng = Rng::new(0);
    let batch = Batch {
        x: (0..BATCH * 784).map(|_| rng.f64() as f32).collect(),
        y: (0..BATCH).map(|_| rng.below(10) as u8).collect(),
        shape: [1, 28, 28],
    };
    let mut params = model.init(0);
    let mut grad = vec![0f32; params.len()];
    let mut opt = Optimizer::new(
        OptimizerConfig::Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0, nesterov: false },
        params.len(),
    )?;
    let (mut load, mut flatten, mut instrumented) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    // Warm-up, then an instrumented pass for the phase shares.
    for i in 0..steps + 20 {
        if i == 20 {
            (load, flatten, instrumented) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        }
        let t0 = Instant::now();
        let p = model.prepare(&params)?;
        let t1 = Instant::now();
        let (_, grads) = model.forward_backward(&p, &batch)?;
        let t2 = Instant::now();
        model.flatten_grads(&p, &grads, &mut grad)?;
        let t3 = Instant::now();
        opt.step(&mut params, &grad)?;
        load += t1 - t0;
        flatten += t3 - t2;
        instrumented += t0.elapsed();
    }
    // Uninstrumented passes give the headline figure, interleaved with the reference so both
    // see the same machine load; the medians of three are compared.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut torch_note = None;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..steps {
            model.loss_and_grad_into(&params, &batch, &mut grad)?;
            opt.step(&mut params, &grad)?;
        }
        ours.push(steps as f64 / t.elapsed().as_secs_f64());
        if torch_note.is_none() {
            match torch_reference(steps) {
                Ok(v) => theirs.push(v),
                Err(e) => torch_note = Some(format!("{e:#}")),
            }
        }
    }
    let steps_per_s = median(&mut ours);
    let torch_steps_per_s = (!theirs.is_empty()).then(|| median(&mut theirs));
    Ok(StepBench {
        backend: backend.to_string(),
        model: model.id(),
        steps_per_s,
        load_fraction: load.as_secs_f64() / instrumented.as_secs_f64(),
        flatten_fraction: flatten.as_secs_f64() / instrumented.as_secs_f64(),
        torch_steps_per_s,
        ratio_vs_torch: torch_steps_per_s.map(|r| steps_per_s / r),
        torch_note,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn torch_reference(steps: usize) -> Result<f64> {
    let out = Command::new("python3")
        .args(["-c", TORCH_SCRIPT, &steps.to_string(), "784"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .context("python3 not runnable")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!(
            "PyTorch reference unavailable (pip install torch): {}",
            err.lines().last().unwrap_or("")
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("PyTorch reference output")?;
    v["steps_per_s"].as_f64().context("PyTorch reference output has no steps_per_s")
}
