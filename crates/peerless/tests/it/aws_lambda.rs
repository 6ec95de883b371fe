//! The AWS Lambda backend (`--features aws-lambda`) against two endpoints that speak Lambda's
//! Invoke API: the local runtime's own ([`InvokeApi`]) and cargo-lambda's emulator
//! (`cargo lambda watch`), which runs this workspace's `peerless` binary (through its own
//! `cargo run`) as a Lambda custom runtime. Both compute the gradient function, checked
//! against a direct in-process computation.
//!
//! The cargo-lambda test is skipped when `cargo lambda` is not installed, and fails instead
//! with `PEERLESS_REQUIRE_CARGO_LAMBDA=1` (`scripts/test-aws-lambda.sh` installs it).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use peerless_core::flat::{digest, fingerprint, to_le_bytes};
use peerless_core::function::{
    GradientRequest, GradientResponse, InvocationRecord, Outcome, OutputMode, StoreRef,
};
use peerless_ml::{Arch, Backend, DatasetName, Model, ModelSpec, Split};
use peerless_runtime::function::aws::{AwsCredentials, AwsLambda};
use peerless_runtime::function::{
    self, Config, FaultConfig, FunctionCommand, InvokeApi, InvokeCtx, Invoker, LocalRuntime,
};
use peerless_runtime::store::embedded::{EmbeddedHandle, EmbeddedServer};
use peerless_runtime::store::{RedisStore, Store};
use serde_json::{Value, json};

/// Awaits `f`, failing the test with `what` after `secs`.
async fn bounded<F: Future>(what: &str, secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {secs} s"),
    }
}

/// The embedded dataset, an MLP on it, parameters in a fresh embedded store.
struct Fixture {
    split: Split,
    model: Model,
    params: Vec<f32>,
    server: EmbeddedHandle,
    store: RedisStore,
}

impl Fixture {
    async fn new() -> Fixture {
        let split = peerless_ml::data::load(DatasetName::Digits, Path::new("/nonexistent")).unwrap();
        let model = Model::new(ModelSpec::new(Arch::Mlp, split.train.shape, 10), Backend::Auto).unwrap();
        let params = model.init(3);
        let server = EmbeddedServer::spawn("127.0.0.1:0".parse().unwrap(), Some("aws".into())).unwrap();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        store.put("params/0", &to_le_bytes(&params)).await.unwrap();
        Fixture { split, model, params, server, store }
    }

    fn request(&self, batch: u32, output_key: &str) -> Value {
        let req = GradientRequest {
            node: "aws".into(),
            round: 0,
            batch,
            attempt: 0,
            model: self.model.id(),
            backend: "auto".into(),
            params_key: "params/0".into(),
            params_digest: fingerprint(&self.params).to_string(),
            dataset: "digits".into(),
            data_dir: "/nonexistent".into(),
            indices: self.indices(batch),
            output_key: output_key.into(),
            output_mode: OutputMode::Accumulate,
            store: StoreRef { url: self.server.url() },
            return_digest: true,
            flip_labels: false,
            inner: None,
        };
        serde_json::to_value(&req).unwrap()
    }

    fn indices(&self, batch: u32) -> Vec<u32> {
        (batch * 32..(batch + 1) * 32).collect()
    }

    /// Checks that the gradient accumulated at `key` is batch `batch`'s, once: equal to the
    /// digest the function reported, and to a direct in-process computation up to float
    /// summation order (the BLAS thread count may differ).
    async fn check_gradient(&self, key: &str, batch: u32, answer: &GradientResponse) {
        let acc = self.store.read_accumulated(key).await.unwrap().expect("gradient accumulated");
        assert_eq!(acc.count, 1);
        assert_eq!(
            Some(digest(&acc.sum).to_string()),
            answer.digest,
            "the store holds what the function computed"
        );
        let ix: Vec<usize> = self.indices(batch).iter().map(|&i| i as usize).collect();
        let (loss, direct) =
            self.model.loss_and_grad(&self.params, &self.split.train.gather(&ix).unwrap()).unwrap();
        assert_eq!(acc.sum.len(), direct.len());
        let max_err = acc.sum.iter().zip(&direct).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_err < 1e-5, "function's gradient differs from the direct one by {max_err}");
        assert!((answer.loss - loss).abs() < 1e-5, "loss {} vs direct {loss}", answer.loss);
        assert_eq!(answer.samples, 32);
    }
}

fn aws_config(endpoint: &str) -> Config {
    let mut cfg = Config { backend: function::Service::AwsLambda, ..Config::for_test() };
    cfg.aws.endpoint_url = endpoint.to_owned();
    cfg
}

fn answer(inv: &function::Invocation) -> GradientResponse {
    assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
    serde_json::from_value(inv.response.clone().expect("an answer")).expect("a gradient response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_sdk_backend_invokes_the_local_invoke_api_with_the_same_outcomes_and_bills() {
    let fx = Fixture::new().await;
    let command = FunctionCommand::peerless(env!("CARGO_BIN_EXE_peerless"));
    let local = LocalRuntime::start(Config::for_test().with_memory_mb(512), command.clone(), 5).unwrap();
    let api = InvokeApi::bind(local.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let aws = AwsLambda::with_credentials(
        aws_config(&format!("http://{}", api.addr())).with_max_retries(1),
        AwsCredentials::placeholder(),
        5,
    )
    .unwrap();
    let ctx = |b: u32| InvokeCtx::new("aws", 0, b);

    // A cold, then a warm gradient invocation: the gradient is right, and the AWS-side ledger
    // (read from the REPORT line of the log tail) bills what the local runtime billed.
    for (b, cold) in [(0u32, true), (1, false)] {
        let key = format!("grad/{b}");
        let inv =
            bounded("gradient via the AWS SDK", 120, aws.invoke("gradient", fx.request(b, &key), ctx(b)))
                .await;
        let inv = inv.unwrap();
        let resp = answer(&inv);
        assert_eq!(resp.cold, cold);
        fx.check_gradient(&key, b, &resp).await;
        let (theirs, ours) = (local.ledger().last().cloned().unwrap(), inv.attempts[0].clone());
        assert_eq!(ours.request_id, theirs.request_id, "request id from x-amzn-RequestId");
        assert_eq!((ours.billed_ms, ours.memory_mb, ours.cold_start), (theirs.billed_ms, 512, cold));
        assert_eq!(ours.cost_pico, theirs.cost_pico);
        assert!(ours.init_us.abs_diff(theirs.init_us) < 10, "init {} vs {}", ours.init_us, theirs.init_us);
    }

    // A function error is not retried, and its instance lives on, as on Lambda: the second
    // `fail` is served warm. Each function has its own instances, so the first `fail` is a
    // cold start.
    for (b, cold) in [(2u32, true), (3, false)] {
        let inv = bounded("fail via the AWS SDK", 60, aws.invoke("fail", json!({"message": "no"}), ctx(b)))
            .await
            .unwrap();
        assert_eq!((inv.outcome, inv.attempts.len()), (Outcome::FunctionError, 1));
        assert_eq!(inv.error.unwrap().error_type, "Peerless.Fail");
        assert_eq!(inv.attempts[0].cold_start, cold, "fail #{b}: the instance survives a function error");
    }
    // A crash is retried, on a new instance (cold again), and maps to the runtime's outcome.
    let inv = bounded("crash via the AWS SDK", 60, aws.invoke("crash", json!({}), ctx(4))).await.unwrap();
    assert_eq!((inv.outcome, inv.attempts.len()), (Outcome::Crashed, 2), "{:?}", inv.error);
    assert_eq!(inv.error.unwrap().error_type, "Runtime.ExitError");
    assert!(inv.attempts.iter().all(|a| a.cold_start), "{:?}", inv.attempts);
    // An unknown handler fails its instance's init: a function error, billed like a cold start.
    let inv = bounded("nope via the AWS SDK", 60, aws.invoke("nope", json!({}), ctx(5))).await;
    assert!(inv.is_ok_and(|i| i.outcome == Outcome::FunctionError), "init error of an unknown handler");
    // Both ledgers agree attempt for attempt: request id, outcome, cold start, bill.
    let bill = |r: &InvocationRecord| {
        (r.request_id.clone(), r.outcome, r.cold_start, r.billed_ms, r.memory_mb, r.cost_pico)
    };
    assert_eq!(
        aws.ledger().iter().map(bill).collect::<Vec<_>>(),
        local.ledger().iter().map(bill).collect::<Vec<_>>()
    );

    // 429 TooManyRequestsException: throttled, retried, not billed.
    let faults = FaultConfig { throttle_rate: 1.0, ..FaultConfig::default() };
    let throttling = LocalRuntime::start(Config::for_test().with_faults(faults), command, 5).unwrap();
    let api2 = InvokeApi::bind(throttling.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let aws2 = AwsLambda::with_credentials(
        aws_config(&format!("http://{}", api2.addr())).with_max_retries(2),
        AwsCredentials::placeholder(),
        5,
    )
    .unwrap();
    let inv = aws2.invoke("echo", json!(1), ctx(6)).await.unwrap();
    assert_eq!(inv.outcome, Outcome::Throttled);
    assert_eq!(
        inv.attempts.iter().map(|a| (a.attempt, a.billed_ms, a.cost_pico)).collect::<Vec<_>>(),
        [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    );
    assert_eq!(inv.error.unwrap().error_type, "TooManyRequestsException");
    let s = aws2.summary();
    assert_eq!((s.invocations, s.throttles, s.retries), (3, 3, 2));

    let dir = tempfile::tempdir().unwrap();
    let s = aws.write_run_metrics(dir.path()).unwrap();
    // Cold starts: gradient's first, fail's first, both crash attempts, nope's failed init.
    assert_eq!((s.ok, s.cold_starts, s.function_errors, s.crashes), (2, 5, 3, 2));
    let l = local.summary();
    assert_eq!((l.ok, l.cold_starts, l.function_errors, l.crashes), (2, 5, 3, 2), "the local side agrees");
    assert_eq!(s.billed_ms, l.billed_ms);
    assert_eq!(s.cost_pico, l.cost_pico);
    let csv = std::fs::read_to_string(dir.path().join("ledger.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 7, "a header and one line per attempt:\n{csv}");
    throttling.shutdown().await;
    local.shutdown().await;
    fx.server.shutdown().await;
}

/// The last `n` lines of the file at `path` (empty if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Seconds to wait for `what`: `default`, or the environment variable `var` when set.
fn budget(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `cargo lambda watch` and its process group, stopped when dropped.
struct Emulator {
    child: Child,
    log: PathBuf,
}

impl Emulator {
    fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // The group: cargo-lambda, the `cargo run` it starts and the function process.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-INT", "--", &group]).status();
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The group is usually gone by now; kill's complaint about that is noise.
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

/// Whether `cargo lambda` runs; panics when it must (`PEERLESS_REQUIRE_CARGO_LAMBDA=1`).
fn cargo_lambda_installed() -> bool {
    let ok = Command::new("cargo")
        .args(["lambda", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("PEERLESS_REQUIRE_CARGO_LAMBDA").as_deref() == Ok("1") {
            panic!("cargo-lambda is required but `cargo lambda` does not run; pip install cargo-lambda");
        }
        eprintln!(
            "SKIPPED: cargo-lambda not installed (pip install cargo-lambda, or scripts/test-aws-lambda.sh)"
        );
    }
    ok
}

/// `cargo …` as if run from a shell, not from this test: without the variables cargo sets for
/// the test process about the package under test (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, …).
/// Build scripts declare some of them with `rerun-if-env-changed` (ring does), and cargo
/// checks those against its own environment, so inherited values would make it rebuild ring
/// and everything above it (rustls, the AWS SDK, …) instead of finding the prebuilt binary
/// fresh, and then again for the next build from a shell.
fn cargo_command() -> Command {
    let mut cmd = Command::new("cargo");
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let per_package =
            ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_CFG_", "CARGO_FEATURE_"].iter().any(|p| k.starts_with(p))
                || matches!(
                    k,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                );
        if per_package {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// The cargo arguments (after `build` / `run`) that select what `cargo lambda watch` runs:
/// cargo-lambda 1.9 starts the function with `cargo run --features … --package … --bin …`
/// and the target directory from `CARGO_TARGET_DIR`.
fn function_cargo_args(release: bool) -> Vec<&'static str> {
    let mut args = vec!["--features", "aws-lambda", "--package", "peerless", "--bin", "peerless"];
    if release {
        args.push("--release");
    }
    args
}

/// Builds the binary `cargo lambda watch` will run, exactly as its `cargo run` selects it, so
/// that the emulator's build is a freshness check instead of a compilation while the test waits.
/// At most `secs`; panics with cargo's output when it fails or runs out of time.
fn prebuild_function(workspace: &Path, target_dir: &Path, release: bool, log: &Path, secs: u64) {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = cargo_command();
    cmd.current_dir(workspace)
        .arg("build")
        .args(function_cargo_args(release))
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    eprintln!("prebuilding: {cmd:?}");
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().expect("cargo build starts");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(secs) {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            panic!(
                "building the function for cargo-lambda took over {secs} s \
                 (PEERLESS_CARGO_LAMBDA_BUILD_SECS).\n--- cargo build:\n{}",
                tail(log, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "building the function for cargo-lambda failed ({status}):\n{}", tail(log, 40));
    eprintln!("function binary ready in {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_function_runs_under_cargo_lambda_and_answers_the_aws_sdk() {
    if !cargo_lambda_installed() {
        return;
    }
    // Build where the binary under test sits (<target>/<profile>/peerless) with the same
    // profile: cargo-lambda's `cargo run` then finds its binary fresh and builds nothing, and
    // nothing lands in a target directory others use. The directory reaches cargo-lambda and
    // its `cargo run` as CARGO_TARGET_DIR only: cargo-lambda 1.9 also passes a `--target-dir`
    // option to `cargo metadata`, which refuses it, and exits at once.
    let exe = Path::new(env!("CARGO_BIN_EXE_peerless"));
    let profile_dir = exe.parent().unwrap().to_owned();
    let target_dir = profile_dir.parent().unwrap().to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let logs = tempfile::tempdir().unwrap();
    let build_log = logs.path().join("cargo-build.log");
    let build_secs = budget("PEERLESS_CARGO_LAMBDA_BUILD_SECS", 1800);
    {
        let (workspace, target_dir, build_log) = (workspace.clone(), target_dir.clone(), build_log.clone());
        tokio::task::spawn_blocking(move || {
            prebuild_function(&workspace, &target_dir, release, &build_log, build_secs)
        })
        .await
        .unwrap();
    }

    let fx = Fixture::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let log = logs.path().join("cargo-lambda.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = cargo_command();
    cmd.current_dir(&workspace)
        .args(["lambda", "watch", "--ignore-changes", "-A", "127.0.0.1", "-P", &port.to_string()])
        .args(function_cargo_args(release))
        // The handler a custom runtime serves comes from the function's Handler setting.
        .args(["--env-var", "_HANDLER=gradient", "--env-var", "OPENBLAS_NUM_THREADS=1"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    eprintln!("starting: {cmd:?}");
    let mut emulator = Emulator { child: cmd.spawn().expect("cargo lambda watch starts"), log };

    // cargo-lambda reads the workspace's metadata and listens (under a second here); the
    // function starts with the first invocation.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let listen_secs = budget("PEERLESS_CARGO_LAMBDA_LISTEN_SECS", 300);
    let listening = async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = emulator.child.try_wait().unwrap() {
                return Err(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(Duration::from_secs(listen_secs), listening).await {
        Ok(Ok(())) => {}
        Ok(Err(status)) => panic!(
            "cargo lambda watch exited ({status}) before listening on {addr}\n--- cargo lambda watch:\n{}",
            emulator.log_tail()
        ),
        Err(_) => panic!(
            "cargo lambda watch did not listen on {addr} within {listen_secs} s \
             (PEERLESS_CARGO_LAMBDA_LISTEN_SECS)\n--- cargo lambda watch:\n{}",
            emulator.log_tail()
        ),
    }
    // The first invocation waits for cargo-lambda's `cargo run` (prebuilt: a freshness check)
    // and the function's start.
    let invoke_secs = budget("PEERLESS_CARGO_LAMBDA_INVOKE_SECS", 600);
    let mut cfg =
        Config { timeout_ms: invoke_secs * 1000, max_retries: 0, ..aws_config(&format!("http://{addr}")) };
    cfg.aws.function_name = "peerless".into();
    let aws = AwsLambda::with_credentials(cfg, AwsCredentials::placeholder(), 9).unwrap();
    for (b, cold) in [(0u32, true), (1, false)] {
        let key = format!("grad/{b}");
        let call = aws.invoke("gradient", fx.request(b, &key), InvokeCtx::new("aws", 0, b));
        let Ok(inv) = tokio::time::timeout(Duration::from_secs(invoke_secs + 30), call).await else {
            panic!(
                "batch {b} via cargo-lambda got no answer within {} s (PEERLESS_CARGO_LAMBDA_INVOKE_SECS)\n\
                 --- cargo lambda watch:\n{}",
                invoke_secs + 30,
                emulator.log_tail()
            );
        };
        let inv = inv.unwrap();
        if b == 0 && std::fs::read_to_string(&emulator.log).unwrap_or_default().contains("Compiling ") {
            eprintln!("note: cargo-lambda's `cargo run` compiled despite the prebuild (see its log)");
        }
        if inv.outcome != Outcome::Ok {
            panic!("invocation failed: {:?}\n--- cargo lambda watch:\n{}", inv.error, emulator.log_tail());
        }
        let resp = answer(&inv);
        assert_eq!(resp.cold, cold, "one instance serves both");
        fx.check_gradient(&key, b, &resp).await;
        let rec = &inv.attempts[0];
        assert!(rec.billed_ms >= 1 && rec.cost_pico > 0, "{rec:?}");
        eprintln!(
            "cargo-lambda answered batch {b}: loss {:.4}, digest {}, compute {:.2} ms, billed {} ms, request {}",
            resp.loss,
            resp.digest.as_deref().unwrap_or("-"),
            resp.compute_ms,
            rec.billed_ms,
            rec.request_id
        );
    }
    // A request the function refuses is a function error, not retried.
    let mut bad = fx.request(2, "grad/2");
    bad["indices"] = json!([]);
    let inv = aws.invoke("gradient", bad, InvokeCtx::new("aws", 0, 2)).await.unwrap();
    assert_eq!((inv.outcome, inv.attempts.len()), (Outcome::FunctionError, 1), "{:?}", inv.error);
    let e = inv.error.unwrap();
    assert_eq!(e.error_type, "Peerless.BadInput", "{e:?}");
    eprintln!("cargo-lambda refused a bad request: {e}");
    // A function error leaves the instance running: the next request is served warm.
    let inv = bounded(
        "gradient via cargo-lambda after a function error",
        120,
        aws.invoke("gradient", fx.request(3, "grad/3"), InvokeCtx::new("aws", 0, 3)),
    )
    .await
    .unwrap();
    if inv.outcome != Outcome::Ok {
        panic!("invocation failed: {:?}\n--- cargo lambda watch:\n{}", inv.error, emulator.log_tail());
    }
    let resp = answer(&inv);
    assert!(!resp.cold, "the instance outlived the function error\n{}", emulator.log_tail());
    fx.check_gradient("grad/3", 3, &resp).await;
    drop(emulator);
    fx.server.shutdown().await;
}
