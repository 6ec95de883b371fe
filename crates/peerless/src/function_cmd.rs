//! `peerless function` (a function instance), `peerless function-service` (a node's instances
//! in a process of their own), `peerless invoke` and `peerless bench invoke`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use peerless_runtime::function::{self, FunctionCommand, Handlers, InvokeCtx, Invoker, LocalRuntime};
use serde::Serialize;
use serde_json::Value;

use crate::cli::{BenchInvokeArgs, FunctionServiceArgs, InvokeArgs};

/// The handlers a `peerless function` instance serves: register new functions here.
pub fn handlers() -> Handlers {
    Handlers::builtin().with("gradient", peerless_runtime::gradient::GradientFunction::new().into_handler())
}

/// Whether this process was started as a Lambda custom runtime's `bootstrap`: no arguments
/// and `AWS_LAMBDA_RUNTIME_API` set, as AWS Lambda (or an emulator such as `cargo lambda
/// watch`) starts it. It then runs as `peerless function`.
pub fn started_as_lambda_bootstrap() -> bool {
    std::env::args_os().len() == 1 && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// `peerless function`: runs this process as a function instance (a Lambda custom runtime).
/// It needs Lambda's environment (`AWS_LAMBDA_RUNTIME_API`, …), which the function runtime
/// (or AWS Lambda) sets.
pub fn run_function() -> Result<ExitCode> {
    crate::bench::sizes::join_cgroup_from_env()?;
    // One thread, like one Lambda vCPU; a current-thread runtime also starts fastest.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(function::serve(handlers()))?;
    Ok(ExitCode::SUCCESS)
}

/// `peerless function-service`: node `index`'s function runtime (its `[function]`
/// configuration, seeded as the node would seed it) behind the Invoke API on `--listen`, until
/// SIGINT or SIGTERM; then its instances are killed. Started by a launcher
/// (`PEERLESS_LAUNCHED`), it dies with the launcher, not with the node it serves.
pub fn run_function_service(args: &FunctionServiceArgs) -> Result<ExitCode> {
    if std::env::var_os("PEERLESS_LAUNCHED").is_some() {
        peerless_runtime::node::die_with_parent().context("setting the parent-death signal")?;
    }
    let (run, index) = match (&args.config, &args.run, args.index) {
        (Some(path), _, _) => {
            let file = peerless_runtime::node::NodeFile::load(path)?;
            (file.run, file.node.index)
        }
        (None, Some(path), Some(index)) => (peerless_runtime::config::RunConfig::load(path)?, index),
        _ => bail!("a function service needs --config, or --run and --index"),
    };
    let mut config = run.function.clone();
    config.service_addr.clear();
    let seed = function::invoke::node_seed(run.seed, index);
    let command = runtime_command()?;
    // One thread: the service relays invocations and watches its instances, little work a
    // round, and each hand-over between two workers was a wake-up (two worker threads: 6–8 %
    // longer serverless rounds at W = 2, 3–4 % at W = 4).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let runtime = LocalRuntime::start(config, command, seed)?;
        // Each attempt goes back to the node, whose ledger keeps it; a copy here would only
        // grow this process by a record per invocation for the whole run.
        runtime.discard_ledger();
        let api = function::InvokeApi::bind(runtime.clone(), args.listen)
            .await
            .with_context(|| format!("serving on {}", args.listen))?;
        tracing::info!(addr = %api.addr(), index, "function service ready");
        println!("{}", serde_json::json!({ "listening": api.addr().to_string() }));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(api);
        runtime.shutdown().await;
        tracing::info!("function service stopped");
        Ok(ExitCode::SUCCESS)
    })
}

fn load_config(path: Option<&PathBuf>) -> Result<function::Config> {
    let Some(p) = path else { return Ok(function::Config::default()) };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid function config {}", p.display()))
}

fn runtime_command() -> Result<FunctionCommand> {
    let exe = std::env::current_exe().context("locating the peerless executable")?;
    Ok(FunctionCommand::peerless(exe))
}

/// `peerless invoke`: one invocation on a fresh invoker of the configured backend (the local
/// runtime unless the config says `backend = "aws-lambda"`). Prints the answer (or the error
/// document) on the first line and each attempt's ledger record as a JSON line after it.
pub fn run_invoke(args: InvokeArgs) -> Result<ExitCode> {
    let mut cfg = load_config(args.config.as_ref())?;
    if let Some(m) = args.memory_mb {
        cfg.memory_mb = m;
    }
    if let Some(t) = args.timeout_ms {
        cfg.timeout_ms = t;
    }
    if let Some(r) = args.max_retries {
        cfg.max_retries = r;
    }
    let payload: Value = match args.payload.strip_prefix('@') {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading payload {path}"))?;
            serde_json::from_str(&text).with_context(|| format!("payload {path} is not JSON"))?
        }
        None => {
            serde_json::from_str(&args.payload).context("--payload is not JSON (use @file to read a file)")?
        }
    };
    let command = runtime_command()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let runtime = function::start(cfg, command, args.seed)?;
        let inv = runtime.invoke(&args.function, payload, InvokeCtx::new("cli", 0, 0)).await;
        runtime.shutdown().await;
        let inv = inv?;
        match (&inv.response, &inv.error) {
            (Some(v), _) => println!("{v}"),
            (None, Some(e)) => println!("{}", serde_json::to_string(e)?),
            (None, None) => println!("null"),
        }
        for rec in &inv.attempts {
            println!("{}", serde_json::to_string(rec)?);
        }
        if let Some(peak) = inv.attempts.iter().map(|r| r.max_memory_mb).max().filter(|&m| m > 0) {
            let configured = inv.attempts.iter().map(|r| r.memory_mb).max().unwrap_or(peak);
            eprintln!("right-sizing: {}", peerless_core::cost::RightSizing::new(peak, configured).describe());
        }
        if let Some(path) = &args.ledger {
            function::metrics::write_ledger_csv(path, &runtime.ledger())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(dir) = &args.out {
            runtime
                .write_run_metrics(dir)
                .with_context(|| format!("writing metrics into {}", dir.display()))?;
        }
        Ok(if inv.is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// Results of `peerless bench invoke` (µs).
#[derive(Debug, Serialize)]
pub struct InvokeBench {
    /// Direct in-process `echo` call, median.
    pub direct_p50_us: f64,
    /// Direct call, 99th percentile.
    pub direct_p99_us: f64,
    /// Warm invocation through the local runtime (process + Runtime API), median.
    pub warm_p50_us: f64,
    /// Warm invocation, 99th percentile.
    pub warm_p99_us: f64,
    /// Warm overhead over the direct call, median.
    pub warm_overhead_p50_us: f64,
    /// Warm overhead, 99th percentile.
    pub warm_overhead_p99_us: f64,
    /// Cold start (spawn until the first `GET /next`), median.
    pub cold_start_p50_us: f64,
    /// Cold start, 99th percentile.
    pub cold_start_p99_us: f64,
    /// Cold invocation end to end (cold start + invocation), median.
    pub cold_invoke_p50_us: f64,
    /// Targets: warm overhead ≤ 1000 µs p50 (echo and the MLP gradient), cold start ≤ 50000 µs p50.
    pub meets_targets: bool,
    /// The gradient function itself (MLP, batch 64) against a direct in-process `loss_and_grad`.
    pub gradient: Option<GradientBench>,
}

/// The MLP gradient through the runtime and store vs the same gradient computed in-process (µs).
#[derive(Debug, Serialize)]
pub struct GradientBench {
    /// Dataset used (MNIST when present in the data directory, else the embedded digits).
    pub dataset: String,
    /// Model id.
    pub model: String,
    /// Direct `loss_and_grad` on the same batch, median.
    pub direct_p50_us: f64,
    /// Direct, 99th percentile.
    pub direct_p99_us: f64,
    /// Warm `gradient` invocation (parameters read from and gradient accumulated into the
    /// embedded store), median.
    pub warm_p50_us: f64,
    /// Warm invocation, 99th percentile.
    pub warm_p99_us: f64,
    /// `warm_p50_us - direct_p50_us`.
    pub warm_overhead_p50_us: f64,
    /// The computation as the function timed it inside the instance (`compute_ms` of its
    /// answers), median: the part of the overhead that is the same work run elsewhere
    /// (another process, caches cold after the previous invocation's traffic).
    pub function_compute_p50_us: f64,
    /// `warm_p50_us / direct_p50_us`.
    pub ratio_p50: f64,
    /// CPU time per warm invocation (mean) of the function instance, all threads. CPU times
    /// come from Linux's per-thread `schedstat` and hardly depend on what else the machine
    /// runs, unlike the wall times above; `None` where unavailable.
    pub function_cpu_us: Option<f64>,
    /// CPU time per warm invocation (mean) of this process's runtime threads: the embedded
    /// store and the Runtime API server (the calling thread excluded).
    pub invoker_cpu_us: Option<f64>,
    /// CPU time of the direct call (mean).
    pub direct_cpu_us: Option<f64>,
    /// `function_cpu_us + invoker_cpu_us - direct_cpu_us`: the CPU the invocation path costs
    /// on top of the computation.
    pub cpu_overhead_us: Option<f64>,
}

/// CPU time (ns) run so far by the threads of process `pid` that `keep` selects by thread id,
/// from Linux's `/proc/<pid>/task/<tid>/schedstat`; `None` where that is unavailable.
fn cpu_ns(pid: u32, keep: impl Fn(u32) -> bool) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let entry = entry.ok()?;
        let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
        if keep(tid) {
            let stat = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
            total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// Invocations of the gradient benchmark that are not counted (cold start, dataset load,
/// parameter fetch).
const GRADIENT_WARMUP: usize = 5;

/// Times the gradient function warm through `runtime` against the direct computation.
///
/// Direct calls and invocations alternate, so both see the same machine load; the first 5
/// invocations (cold start, dataset load, parameter fetch) are not counted.
async fn bench_gradient(runtime: &LocalRuntime, n: usize) -> Result<GradientBench> {
    use peerless_core::function::GradientResponse;

    let fx = crate::bench::fixture::GradientFixture::new().await?;
    let mut times = GradientTimes::new(n);
    for i in 0..(n + GRADIENT_WARMUP) {
        let payload = fx.payload(i as u32)?;
        let t = Instant::now();
        let inv = runtime.invoke("gradient", payload, InvokeCtx::new("bench", 0, i as u32)).await?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if !inv.is_ok() {
            bail!("gradient invocation failed: {:?}", inv.error);
        }
        let answer: GradientResponse =
            serde_json::from_value(inv.response.context("no answer")?).context("gradient answer")?;
        times.follow_instance(i, inv.pid);
        let cpu_before = times.main_thread_cpu_ns();
        let t = Instant::now();
        std::hint::black_box(fx.model.loss_and_grad(&fx.params, &fx.batch)?);
        let elapsed = t.elapsed();
        if i >= GRADIENT_WARMUP {
            times.push(elapsed.as_secs_f64() * 1e6, us, answer.compute_ms * 1e3, cpu_before);
        }
    }
    let cpu = times.cpu_per_call(n);
    let (dataset, model) = (fx.dataset.clone(), fx.model.id());
    fx.shutdown().await;
    Ok(times.into_bench(dataset, model, cpu))
}

/// The samples of the gradient benchmark: wall times per counted iteration (µs) and the CPU
/// counters of the function instance, this process's runtime threads and this thread.
struct GradientTimes {
    direct: Vec<f64>,
    warm: Vec<f64>,
    compute: Vec<f64>,
    /// This process.
    me: u32,
    /// The instance that answered the last warm-up, whose CPU is measured.
    instance: Option<u32>,
    /// CPU (ns) of that instance and of this process's runtime threads when counting began;
    /// `None` when unavailable or another instance answered since.
    cpu_start: Option<(u64, u64)>,
    /// CPU (ns) of this thread in the counted direct calls.
    direct_cpu_ns: Option<u64>,
}

impl GradientTimes {
    /// Room for `n` counted iterations.
    fn new(n: usize) -> Self {
        GradientTimes {
            direct: Vec::with_capacity(n),
            warm: Vec::with_capacity(n),
            compute: Vec::with_capacity(n),
            me: std::process::id(),
            instance: None,
            cpu_start: None,
            direct_cpu_ns: Some(0),
        }
    }

    /// CPU (ns) of this (calling) thread so far.
    fn main_thread_cpu_ns(&self) -> Option<u64> {
        let me = self.me;
        cpu_ns(me, |t| t == me)
    }

    /// CPU (ns) of this process's other threads (the runtime's) so far.
    fn runtime_threads_cpu_ns(&self) -> Option<u64> {
        let me = self.me;
        cpu_ns(me, |t| t != me)
    }

    /// Notes that instance `pid` answered iteration `i`: CPU counting starts after the last
    /// warm-up, and stops being readable when another instance answers.
    fn follow_instance(&mut self, i: usize, pid: Option<u32>) {
        if i + 1 == GRADIENT_WARMUP {
            self.instance = pid;
            self.cpu_start =
                pid.and_then(|pid| Some((cpu_ns(pid, |_| true)?, self.runtime_threads_cpu_ns()?)));
        } else if i >= GRADIENT_WARMUP && pid != self.instance {
            // Another instance answered: its predecessor's CPU is no longer readable.
            self.cpu_start = None;
        }
    }

    /// Adds a counted iteration: the direct call, the invocation, the instance's own compute
    /// time (µs), and this thread's CPU before the direct call.
    fn push(&mut self, direct_us: f64, warm_us: f64, compute_us: f64, cpu_before: Option<u64>) {
        self.direct.push(direct_us);
        self.warm.push(warm_us);
        self.compute.push(compute_us);
        self.direct_cpu_ns = self
            .direct_cpu_ns
            .zip(cpu_before.zip(self.main_thread_cpu_ns()))
            .map(|(sum, (before, after))| sum + after.saturating_sub(before));
    }

    /// Mean CPU (µs) per counted iteration: of the instance, of this process's runtime
    /// threads, of the direct call.
    fn cpu_per_call(&self, n: usize) -> (Option<f64>, Option<f64>, Option<f64>) {
        let per_call = |ns: u64| ns as f64 / 1e3 / n as f64;
        let (function_cpu_us, invoker_cpu_us) = match (self.cpu_start, self.instance) {
            (Some((f0, p0)), Some(pid)) => (
                cpu_ns(pid, |_| true).map(|f| per_call(f.saturating_sub(f0))),
                self.runtime_threads_cpu_ns().map(|p| per_call(p.saturating_sub(p0))),
            ),
            _ => (None, None),
        };
        (function_cpu_us, invoker_cpu_us, self.direct_cpu_ns.map(per_call))
    }

    /// The results, with the CPU figures of [`GradientTimes::cpu_per_call`].
    fn into_bench(
        mut self,
        dataset: String,
        model: String,
        (function_cpu_us, invoker_cpu_us, direct_cpu_us): (Option<f64>, Option<f64>, Option<f64>),
    ) -> GradientBench {
        let (d50, w50) = (q(&mut self.direct, 0.5), q(&mut self.warm, 0.5));
        GradientBench {
            dataset,
            model,
            direct_p50_us: d50,
            direct_p99_us: q(&mut self.direct, 0.99),
            warm_p50_us: w50,
            warm_p99_us: q(&mut self.warm, 0.99),
            warm_overhead_p50_us: w50 - d50,
            function_compute_p50_us: q(&mut self.compute, 0.5),
            ratio_p50: w50 / d50.max(1e-3),
            function_cpu_us,
            invoker_cpu_us,
            direct_cpu_us,
            cpu_overhead_us: function_cpu_us
                .zip(invoker_cpu_us)
                .zip(direct_cpu_us)
                .map(|((f, p), d)| f + p - d),
        }
    }
}

/// The `p`-quantile of `v` by nearest rank (0 when empty).
fn q(v: &mut [f64], p: f64) -> f64 {
    peerless_core::stats::quantile(v, p).unwrap_or(0.0)
}

/// OpenBLAS's thread count variable; function instances run with it set to 1.
const BLAS_THREADS: &str = "OPENBLAS_NUM_THREADS";

/// `peerless bench invoke`: warm invocation overhead of `echo` and of the MLP gradient against
/// direct in-process calls, and cold-start time.
///
/// Function instances run OpenBLAS on one thread (one Lambda vCPU). OpenBLAS reads its thread
/// count once, when it loads, so for a like-for-like direct call this process re-executes
/// itself with `OPENBLAS_NUM_THREADS=1` unless that is already set.
pub fn run_bench_invoke(args: BenchInvokeArgs) -> Result<ExitCode> {
    if std::env::var_os(BLAS_THREADS).is_none_or(|v| v != "1") {
        return rerun_with_one_blas_thread();
    }
    let n = args.n.max(1);
    let command = runtime_command()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if !args.memory_sizes.is_empty() {
        if let Some(bad) =
            args.memory_sizes.iter().find(|m| !peerless_core::cost::LAMBDA_MEMORY_MB.contains(m))
        {
            bail!("--memory-sizes: {bad} MB is not a Lambda memory size (128..=10240)");
        }
        let rows = rt.block_on(crate::bench::sizes::measure(&command, &args.memory_sizes, n))?;
        crate::bench::sizes::print(&rows, function::Config::default().memory_mb);
        if let Some(path) = args.json {
            std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let res = rt.block_on(bench_invoke(command, n, args.cold))?;
    print_invoke_bench(&res, args.cold);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&res)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs this command again with `OPENBLAS_NUM_THREADS=1`; its exit code is this one's.
fn rerun_with_one_blas_thread() -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the peerless executable")?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(BLAS_THREADS, "1")
        .status()
        .context("re-running the benchmark with one BLAS thread")?;
    Ok(status.code().and_then(|c| u8::try_from(c).ok()).map_or(ExitCode::FAILURE, ExitCode::from))
}

/// Echo called directly, then warm and cold (`cold_starts` times) on a local runtime running
/// `command`, then the gradient function; `n` calls of each are counted.
async fn bench_invoke(command: FunctionCommand, n: usize, cold_starts: usize) -> Result<InvokeBench> {
    let payload = serde_json::json!({ "x": 1, "tag": "bench" });
    let mut direct = time_direct_echo(&payload, n).await;
    let cfg = function::Config { max_retries: 0, ..function::Config::default() };
    let runtime = LocalRuntime::start(cfg, command, 0)?;
    let mut warm = time_warm_echo(&runtime, &payload, n).await?;
    let (mut cold, mut cold_total) = time_cold_echo(&runtime, &payload, cold_starts).await?;
    let gradient = bench_gradient(&runtime, n).await?;
    runtime.shutdown().await;
    let (d50, d99) = (q(&mut direct, 0.5), q(&mut direct, 0.99));
    let (w50, w99) = (q(&mut warm, 0.5), q(&mut warm, 0.99));
    let c50 = q(&mut cold, 0.5);
    Ok(InvokeBench {
        direct_p50_us: d50,
        direct_p99_us: d99,
        warm_p50_us: w50,
        warm_p99_us: w99,
        warm_overhead_p50_us: w50 - d50,
        warm_overhead_p99_us: w99 - d99,
        cold_start_p50_us: c50,
        cold_start_p99_us: q(&mut cold, 0.99),
        cold_invoke_p50_us: q(&mut cold_total, 0.5),
        meets_targets: w50 - d50 <= 1000.0
            && gradient.warm_overhead_p50_us <= 1000.0
            && (cold_starts == 0 || c50 <= 50_000.0),
        gradient: Some(gradient),
    })
}

/// `n` in-process calls of `echo` (µs each).
async fn time_direct_echo(payload: &Value, n: usize) -> Vec<f64> {
    let handlers = handlers();
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v = handlers.call("echo", payload.clone()).await;
        direct.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(v).ok();
    }
    direct
}

/// Warm invocations of `echo` after 20 uncounted ones: `n` round trips (µs).
async fn time_warm_echo(runtime: &LocalRuntime, payload: &Value, n: usize) -> Result<Vec<f64>> {
    let mut warm = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let t = Instant::now();
        let inv = runtime.invoke("echo", payload.clone(), InvokeCtx::new("bench", 0, i as u32)).await?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if !inv.is_ok() {
            bail!("warm echo failed: {:?}", inv.error);
        }
        if i >= 20 {
            warm.push(us);
        }
    }
    Ok(warm)
}

/// `count` cold invocations of `echo` (idle instances retired first): the cold starts and the
/// whole invocations (µs).
async fn time_cold_echo(
    runtime: &LocalRuntime,
    payload: &Value,
    count: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut cold = Vec::new();
    let mut cold_total = Vec::new();
    for i in 0..count {
        runtime.retire_idle().await;
        let t = Instant::now();
        let inv = runtime.invoke("echo", payload.clone(), InvokeCtx::new("bench-cold", 0, i as u32)).await?;
        cold_total.push(t.elapsed().as_secs_f64() * 1e6);
        let rec = inv.last().context("no record")?;
        if !inv.is_ok() || !rec.cold_start {
            bail!("cold echo failed or was not cold: {:?}", inv.error);
        }
        cold.push(rec.init_us as f64);
    }
    Ok((cold, cold_total))
}

/// Prints the results, one line per measure (the cold start only when `cold` were measured).
fn print_invoke_bench(res: &InvokeBench, cold: usize) {
    println!(
        "echo direct (in-process): p50 {:>8.1} µs  p99 {:>8.1} µs",
        res.direct_p50_us, res.direct_p99_us
    );
    println!(
        "echo warm (local runtime): p50 {:>8.1} µs  p99 {:>8.1} µs  overhead p50 {:.1} µs (target ≤ 1000), {:.0}× the direct call",
        res.warm_p50_us,
        res.warm_p99_us,
        res.warm_overhead_p50_us,
        res.warm_p50_us / res.direct_p50_us.max(1e-3)
    );
    if cold > 0 {
        println!(
            "cold start:               p50 {:>8.1} µs  p99 {:>8.1} µs  (target ≤ 50000 p50); cold invoke p50 {:.1} µs = {:.1}× a warm one",
            res.cold_start_p50_us,
            res.cold_start_p99_us,
            res.cold_invoke_p50_us,
            res.cold_invoke_p50_us / res.warm_p50_us.max(1e-3)
        );
    }
    if let Some(g) = &res.gradient {
        println!(
            "gradient {} on {}: direct p50 {:.0} µs p99 {:.0} µs; warm invocation (store in, store out) p50 {:.0} µs p99 {:.0} µs = {:.2}× direct",
            g.model, g.dataset, g.direct_p50_us, g.direct_p99_us, g.warm_p50_us, g.warm_p99_us, g.ratio_p50
        );
        println!(
            "gradient warm overhead:   p50 {:>8.1} µs (target ≤ 1000); compute inside the instance p50 {:.0} µs",
            g.warm_overhead_p50_us, g.function_compute_p50_us
        );
        if let (Some(f), Some(p), Some(d), Some(o)) =
            (g.function_cpu_us, g.invoker_cpu_us, g.direct_cpu_us, g.cpu_overhead_us)
        {
            println!(
                "gradient CPU per warm invocation: instance {f:.0} µs + store and Runtime API {p:.0} µs, direct call {d:.0} µs: {o:.0} µs on top"
            );
        }
    }
    println!("targets {}", if res.meets_targets { "met" } else { "NOT met" });
}
