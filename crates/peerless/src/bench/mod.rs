//! `peerless bench step`: the full training step on every backend this binary has, against
//! PyTorch, measured interleaved in the same run.
//!
//! The peerless step is what every gradient function and peer does: build the model's tensors
//! from the flat parameter vector (*load*), forward + backward (*compute*), copy the gradients
//! into one flat vector (*flatten*), and apply the optimizer to the flat vectors. The
//! contenders: the default backend (flex, what `model.backend = "auto"` runs), ndarray (whose
//! kernels are OpenBLAS's in a `--features openblas` build, matrixmultiply's otherwise), and the
//! same MLP step in PyTorch on one thread, flatten and write-back included, run by the first
//! Python that imports `torch` (`--python`, `$PEERLESS_PYTHON`, `python3`). Each pass measures
//! every contender once, in turn, so all see the same machine load; medians of the passes
//! are compared.

pub mod ddp;
pub mod fixture;
pub mod link;
pub mod memory;
pub mod p2p;
pub mod sizes;
pub mod versus;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use peerless_core::optim::{Optimizer, OptimizerConfig};
use peerless_core::rng::Rng;
use peerless_core::stats::median;
use peerless_ml::{Arch, Backend, Batch, Model, ModelSpec};
use serde::Serialize;

const TORCH_SCRIPT: &str = include_str!("torch_mlp_step.py");
const BATCH: usize = 64;

/// One contender of `peerless bench step`.
#[derive(Debug, Serialize)]
pub struct StepRow {
    /// burn backend, or `pytorch`.
    pub backend: String,
    /// Its matrix kernels, e.g. `matrixmultiply (pure Rust)`, `OpenBLAS`, `PyTorch 2.x`.
    pub kernels: String,
    /// Whether this is the default backend (what `auto` trains on).
    pub default: bool,
    /// Full steps per second (flat in, flat out, optimizer included); median of the passes.
    pub steps_per_s: f64,
    /// Every pass's steps per second.
    pub passes: Vec<f64>,
    /// Share of the step spent building tensors from the flat vector (burn backends).
    pub load_fraction: Option<f64>,
    /// Share of the step spent copying gradients into the flat vector (burn backends).
    pub flatten_fraction: Option<f64>,
}

/// Results of `peerless bench step`, printed as a table and as JSON.
#[derive(Debug, Serialize)]
pub struct StepBench {
    /// Model id.
    pub model: String,
    /// Steps per measurement.
    pub steps: usize,
    /// Every contender measured.
    pub rows: Vec<StepRow>,
    /// Why PyTorch is missing, if it is.
    pub torch_note: Option<String>,
}

impl StepBench {
    /// The default backend's row.
    pub fn default_row(&self) -> Option<&StepRow> {
        self.rows.iter().find(|r| r.default)
    }
}

/// The optimizer of both sides (PyTorch's `SGD(lr=0.01, momentum=0.9)`).
const SGD: OptimizerConfig =
    OptimizerConfig::Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0, nesterov: false };

/// A burn backend under measurement: the model, its buffers and optimizer.
struct Contender {
    backend: Backend,
    model: Model,
    params: Vec<f32>,
    grad: Vec<f32>,
    opt: Optimizer,
    passes: Vec<f64>,
    load_fraction: f64,
    flatten_fraction: f64,
}

impl Contender {
    fn new(backend: Backend, steps: usize, batch: &Batch) -> Result<Contender> {
        let model = Model::new(ModelSpec::new(Arch::Mlp, [1, 28, 28], 10), backend)?;
        let params = model.init(0);
        let opt = Optimizer::new(SGD, params.len())?;
        let grad = vec![0f32; params.len()];
        let mut c = Contender {
            backend,
            model,
            params,
            grad,
            opt,
            passes: Vec::new(),
            load_fraction: 0.0,
            flatten_fraction: 0.0,
        };
        c.instrumented(steps, batch)?;
        Ok(c)
    }

    /// Back to the initial parameters and a fresh optimizer, as each PyTorch pass starts in a
    /// process of its own. (Trained on for thousands of steps, the one batch is learnt so well
    /// that the momentum decays into subnormal floats, whose arithmetic is many times slower:
    /// that measured the CPU's slow path, not the step.)
    fn reset(&mut self) -> Result<()> {
        self.params = self.model.init(0);
        self.opt = Optimizer::new(SGD, self.params.len())?;
        Ok(())
    }

    /// Warm-up, then an instrumented pass for the phase shares.
    fn instrumented(&mut self, steps: usize, batch: &Batch) -> Result<()> {
        let (mut load, mut flatten, mut total) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for i in 0..steps + 20 {
            if i == 20 {
                (load, flatten, total) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            }
            let t0 = Instant::now();
            let p = self.model.prepare(&self.params)?;
            let t1 = Instant::now();
            let (_, mut grads) = self.model.forward_backward(&p, batch)?;
            let t2 = Instant::now();
            self.model.flatten_grads(&p, &mut grads, &mut self.grad)?;
            let t3 = Instant::now();
            self.opt.step(&mut self.params, &self.grad)?;
            load += t1 - t0;
            flatten += t3 - t2;
            total += t0.elapsed();
        }
        self.load_fraction = load.as_secs_f64() / total.as_secs_f64();
        self.flatten_fraction = flatten.as_secs_f64() / total.as_secs_f64();
        Ok(())
    }

    /// One uninstrumented pass: the headline figure.
    fn pass(&mut self, steps: usize, batch: &Batch) -> Result<()> {
        self.reset()?;
        // The same 20 warm-up steps as the PyTorch pass.
        for _ in 0..20 {
            self.model.loss_and_grad_into(&self.params, batch, &mut self.grad)?;
            self.opt.step(&mut self.params, &self.grad)?;
        }
        let t = Instant::now();
        for _ in 0..steps {
            self.model.loss_and_grad_into(&self.params, batch, &mut self.grad)?;
            self.opt.step(&mut self.params, &self.grad)?;
        }
        self.passes.push(steps as f64 / t.elapsed().as_secs_f64());
        Ok(())
    }

    fn row(self) -> StepRow {
        StepRow {
            backend: self.backend.to_string(),
            kernels: self.backend.kernels().to_owned(),
            default: self.backend == Backend::Auto.resolve(),
            steps_per_s: median(&self.passes).unwrap_or(0.0),
            passes: self.passes,
            load_fraction: Some(self.load_fraction),
            flatten_fraction: Some(self.flatten_fraction),
        }
    }
}

/// Measures `backends` and PyTorch (`python`: the interpreter to try first), `steps` steps
/// per measurement, in `passes` interleaved passes.
pub fn step(backends: &[Backend], steps: usize, passes: usize, python: Option<&str>) -> Result<StepBench> {
    let mut rng = Rng::new(0);
    let batch = Batch {
        x: (0..BATCH * 784).map(|_| rng.f64() as f32).collect(),
        y: (0..BATCH).map(|_| rng.below(10) as u8).collect(),
        shape: [1, 28, 28],
    };
    let mut contenders: Vec<Contender> =
        backends.iter().map(|&b| Contender::new(b, steps, &batch)).collect::<Result<_>>()?;
    let model = contenders.first().map(|c| c.model.id()).unwrap_or_default();
    let (torch, mut torch_note) = match find_torch(python) {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut theirs = Vec::new();
    for _ in 0..passes.max(1) {
        for c in &mut contenders {
            c.pass(steps, &batch)?;
        }
        if let Some((py, _)) = &torch
            && torch_note.is_none()
        {
            match torch_reference(py, steps) {
                Ok(v) => theirs.push(v),
                Err(e) => torch_note = Some(format!("{e:#}")),
            }
        }
    }
    let mut rows: Vec<StepRow> = contenders.into_iter().map(Contender::row).collect();
    if let Some((_, version)) = torch
        && !theirs.is_empty()
    {
        rows.push(StepRow {
            backend: "pytorch".into(),
            kernels: format!("PyTorch {version}, 1 thread"),
            default: false,
            steps_per_s: median(&theirs).unwrap_or(0.0),
            passes: theirs,
            load_fraction: None,
            flatten_fraction: None,
        });
    }
    Ok(StepBench { model, steps, rows, torch_note })
}

/// The first Python that imports torch, with torch's version.
fn find_torch(python: Option<&str>) -> Result<(String, String)> {
    let env = std::env::var("PEERLESS_PYTHON").ok();
    let candidates: Vec<&str> = python.into_iter().chain(env.as_deref()).chain(["python3"]).collect();
    let mut tried = Vec::new();
    for py in &candidates {
        match Command::new(py).args(["-c", "import torch; print(torch.__version__)"]).output() {
            Ok(o) if o.status.success() => {
                return Ok(((*py).to_owned(), String::from_utf8_lossy(&o.stdout).trim().to_owned()));
            }
            Ok(_) => tried.push(format!("{py}: no torch")),
            Err(e) => tried.push(format!("{py}: {e}")),
        }
    }
    anyhow::bail!(
        "no PyTorch reference ({}); install one: python3 -m venv V && V/bin/pip install torch numpy, then --python V/bin/python3",
        tried.join(", ")
    )
}

fn torch_reference(python: &str, steps: usize) -> Result<f64> {
    let out = Command::new(python)
        .args(["-c", TORCH_SCRIPT, &steps.to_string(), "784"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .with_context(|| format!("{python} not runnable"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("PyTorch reference failed: {}", err.lines().last().unwrap_or(""));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("PyTorch reference output")?;
    v["steps_per_s"].as_f64().context("PyTorch reference output has no steps_per_s")
}

/// Prints the step benchmark as a table, then the default backend's ratios.
pub fn print_step(r: &StepBench) {
    println!(
        "MLP step ({}), batch {BATCH}, {} steps per pass, medians of interleaved passes",
        r.model, r.steps
    );
    println!("{:<9} {:<34} {:>9}  {:>13}", "backend", "kernels", "steps/s", "load+flatten");
    for row in &r.rows {
        let share = match (row.load_fraction, row.flatten_fraction) {
            (Some(l), Some(f)) => format!("{:.1} %", 100.0 * (l + f)),
            _ => "-".into(),
        };
        let name = if row.default { format!("{}*", row.backend) } else { row.backend.clone() };
        println!("{name:<9} {:<34} {:>9.0}  {share:>13}", row.kernels, row.steps_per_s);
    }
    println!("* the default: what `model.backend = \"auto\"` trains on");
    let Some(d) = r.default_row() else { return };
    for row in r.rows.iter().filter(|x| !x.default) {
        println!(
            "default/{:<8} = {:.2}  ({} vs {})",
            row.backend,
            d.steps_per_s / row.steps_per_s,
            d.kernels,
            row.kernels
        );
    }
    if !peerless_ml::spec::OPENBLAS {
        println!("OpenBLAS: not in this build (cargo build --release -p peerless --features openblas)");
    }
    if let Some(note) = &r.torch_note {
        println!("PyTorch: {note}");
    }
}

/// `peerless bench step`: measures, prints the table and the ratios, writes the JSON.
pub fn run_step(args: crate::cli::BenchStepArgs) -> Result<std::process::ExitCode> {
    let backends = match args.backend.as_str() {
        "all" => vec![Backend::Ndarray, Backend::Flex],
        b => vec![b.parse::<Backend>()?],
    };
    let r = step(&backends, args.steps.max(1), args.passes, args.python.as_deref())?;
    print_step(&r);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
