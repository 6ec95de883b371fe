//! The local function runtime on real `peerless function` processes: warm pools, cold starts,
//! crashes, timeouts, throttles, memory limits, the ledger and the Runtime/Invoke APIs.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use peerless_core::function::Outcome;
use peerless_runtime::function::{
    Config, Fault, FaultConfig, FaultInjector, FunctionCommand, InvokeApi, InvokeCtx, InvokeError, Invoker,
    LocalRuntime,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEED: u64 = 11;

fn command() -> FunctionCommand {
    FunctionCommand::peerless(env!("CARGO_BIN_EXE_peerless"))
}

fn runtime(cfg: Config) -> LocalRuntime {
    LocalRuntime::start(cfg, command(), SEED).expect("valid config")
}

/// Awaits `f`, failing the test with `what` after 60 s.
async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within 60 s"),
    }
}

async fn invoke(
    rt: &LocalRuntime,
    function: &str,
    payload: Value,
    ctx: InvokeCtx,
) -> peerless_runtime::function::Invocation {
    bounded(&format!("invoking {function}"), rt.invoke(function, payload, ctx)).await.expect("invocation ran")
}

fn process_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// One raw HTTP/1.1 exchange (Connection: close): (status, headers, body).
async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    bounded("reading an HTTP response", s.read_to_end(&mut out)).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_invocation_reuses_the_warm_instance_and_the_cold_start_is_measured() {
    let rt = runtime(Config::for_test());
    let first = invoke(&rt, "whoami", json!(null), InvokeCtx::new("p0", 1, 0)).await;
    assert_eq!(first.outcome, Outcome::Ok, "{:?}", first.error);
    let rec = first.last().unwrap();
    assert!(rec.cold_start && rec.init_us > 0, "{rec:?}");
    eprintln!("cold start: {} µs", rec.init_us);
    let who = first.response.clone().unwrap();
    assert_eq!(who["pid"], json!(first.pid.unwrap()), "the runtime tracks the process that answered");
    assert_eq!(who["function"], json!("whoami"));
    assert_eq!(who["memory_mb"], json!("256"));
    assert_eq!(who["version"], json!("$LATEST"));
    assert_eq!(who["log_group"], json!("/aws/lambda/whoami"));
    assert_eq!(who["openblas_threads"], json!("1"));

    let second = invoke(&rt, "whoami", json!(null), InvokeCtx::new("p0", 1, 1)).await;
    assert_eq!(second.outcome, Outcome::Ok);
    assert!(!second.last().unwrap().cold_start, "warm");
    assert_eq!(second.last().unwrap().init_us, 0);
    assert_eq!(second.pid, first.pid, "same instance");
    assert_eq!(rt.idle_instances("whoami"), 1);

    let echo = invoke(&rt, "echo", json!({"a": [1, 2, 3]}), InvokeCtx::new("p0", 1, 2)).await;
    assert_eq!(echo.response, Some(json!({"a": [1, 2, 3]})));
    assert!(echo.last().unwrap().cold_start, "another function has its own pool");
    assert_ne!(echo.pid, first.pid);
    let s = rt.summary();
    assert_eq!((s.invocations, s.ok, s.cold_starts), (3, 3, 2));
    assert!(s.cold_start_p50_us > 0 && s.latency_p50_us > 0);

    rt.shutdown().await;
    assert!(process_gone(first.pid.unwrap()) && process_gone(echo.pid.unwrap()), "shutdown kills and reaps");
    let err = rt.invoke("echo", json!(1), InvokeCtx::default()).await.unwrap_err();
    assert!(matches!(err, InvokeError::ShutDown), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_exits_mid_invocation_is_retried_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("crashed-once");
    let rt = runtime(Config::for_test().with_max_retries(2));
    let payload = json!({"marker": marker.to_str().unwrap(), "value": 7});
    let inv = invoke(&rt, "crash_once", payload.clone(), InvokeCtx::new("p1", 4, 2)).await;
    assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
    assert_eq!(inv.response, Some(payload));
    let outcomes: Vec<_> = inv.attempts.iter().map(|a| (a.attempt, a.outcome, a.cold_start)).collect();
    assert_eq!(outcomes, vec![(0, Outcome::Crashed, true), (1, Outcome::Ok, true)]);
    assert!(inv.attempts[0].request_id.starts_with("p1-4-2-0-"), "{}", inv.attempts[0].request_id);
    assert!(inv.attempts[1].request_id.starts_with("p1-4-2-1-"));
    assert_eq!(rt.summary().retries, 1);
    assert_eq!(rt.idle_instances("crash_once"), 1, "only the healthy instance is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sigkill_mid_invocation_is_retried_to_success() {
    let faults = FaultConfig { crash_rate: 0.5, ..FaultConfig::none() };
    // Pick, from the seeded plans, an attempt identity whose first try is killed and whose
    // retry is not: the decisions are a pure function of (seed, identity).
    let plans = FaultInjector::new(faults.clone(), SEED);
    let batch = (0..1000)
        .find(|b| {
            matches!(plans.plan("sleep", "p2", 0, *b, 0).fault, Fault::Crash(_))
                && plans.plan("sleep", "p2", 0, *b, 1).fault == Fault::None
        })
        .expect("some batch crashes once");
    let rt = runtime(Config::for_test().with_faults(faults).with_max_retries(2));
    // Warm the pool so the kill lands on a warm instance and "expected" is known.
    let warm = invoke(&rt, "sleep", json!({"ms": 40}), InvokeCtx::new("warmup", 0, 0)).await;
    let pid0 = warm.pid.unwrap();
    let inv = invoke(&rt, "sleep", json!({"ms": 40}), InvokeCtx::new("p2", 0, batch)).await;
    assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
    let outcomes: Vec<_> = inv.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Crashed, Outcome::Ok]);
    assert!(!inv.attempts[0].cold_start, "the first attempt ran on the warm instance");
    assert!(process_gone(pid0), "the killed instance is reaped");
    assert_ne!(inv.pid, Some(pid0), "the retry ran on a new instance");
    assert!(rt.summary().faults_injected >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_invocations_are_killed_at_their_timeout() {
    let rt = runtime(Config::for_test().with_timeout_ms(300).with_max_retries(0));
    let inv = invoke(&rt, "sleep", json!({"ms": 30_000}), InvokeCtx::new("p3", 0, 0)).await;
    assert_eq!(inv.outcome, Outcome::Timeout);
    assert_eq!(inv.error.as_ref().unwrap().error_type, "Sandbox.Timedout");
    let rec = inv.last().unwrap();
    assert!(rec.billed_ms >= 300, "{rec:?}");
    assert!(process_gone(inv.pid.unwrap()), "the timed-out instance was killed and reaped");
    assert_eq!(rt.idle_instances("sleep"), 0);

    // An injected hang: the instance is SIGSTOPped and then killed at the timeout.
    let faults = FaultConfig { hang_rate: 1.0, ..FaultConfig::none() };
    let rt = runtime(Config::for_test().with_timeout_ms(300).with_max_retries(0).with_faults(faults));
    let inv = invoke(&rt, "echo", json!("x"), InvokeCtx::new("p3", 1, 0)).await;
    assert_eq!(inv.outcome, Outcome::Timeout);
    assert!(process_gone(inv.pid.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_beyond_the_concurrency_limit_are_throttled() {
    let rt = runtime(Config::for_test().with_concurrency(1).with_max_retries(0));
    let a = rt.invoke("sleep", json!({"ms": 500}), InvokeCtx::new("p4", 0, 0));
    let b = rt.invoke("sleep", json!({"ms": 500}), InvokeCtx::new("p4", 0, 1));
    let (a, b) = bounded("two concurrent sleeps", async { tokio::join!(a, b) }).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut outcomes = vec![a.outcome, b.outcome];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, vec![Outcome::Ok, Outcome::Throttled]);
    let throttled = if a.outcome == Outcome::Throttled { &a } else { &b };
    assert_eq!(throttled.error.as_ref().unwrap().error_type, "TooManyRequestsException");
    let rec = throttled.last().unwrap();
    assert_eq!((rec.billed_ms, rec.cost_pico), (0, 0), "throttles are not billed");
    assert_eq!(rt.summary().throttles, 1);
    assert_eq!(rt.in_flight("sleep"), 0);

    // With retries, the throttled one backs off and gets through once the first is done.
    let cfg =
        Config { backoff_base_ms: 400, backoff_max_ms: 2_000, ..Config::for_test().with_concurrency(1) };
    let rt = runtime(cfg.with_max_retries(3));
    let a = rt.invoke("sleep", json!({"ms": 300}), InvokeCtx::new("p4", 1, 0));
    let b = rt.invoke("sleep", json!({"ms": 300}), InvokeCtx::new("p4", 1, 1));
    let (a, b) = bounded("two concurrent sleeps with retries", async { tokio::join!(a, b) }).await;
    assert!(a.unwrap().is_ok() && b.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_over_its_memory_limit_is_killed() {
    let rt = runtime(Config::for_test().with_memory_mb(128).with_max_retries(0));
    let inv = invoke(&rt, "alloc", json!({"mb": 300, "hold_ms": 2000}), InvokeCtx::new("p5", 0, 0)).await;
    assert_eq!(inv.outcome, Outcome::OutOfMemory, "{:?}", inv.error);
    assert!(process_gone(inv.pid.unwrap()));
    // Under the limit it runs.
    let ok = invoke(&rt, "alloc", json!({"mb": 16, "hold_ms": 50}), InvokeCtx::new("p5", 0, 1)).await;
    assert_eq!(ok.outcome, Outcome::Ok, "{:?}", ok.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_max_memory_is_the_instances_own_peak_resident_memory() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(Config::for_test().with_memory_mb(512).with_max_retries(0));
    let mut peaks = Vec::new();
    for (i, mb) in [16u64, 96, 8].into_iter().enumerate() {
        let inv =
            invoke(&rt, "alloc", json!({"mb": mb, "hold_ms": 0}), InvokeCtx::new("p6", 0, i as u32)).await;
        assert_eq!(inv.outcome, Outcome::Ok, "{:?}", inv.error);
        let own_kb = inv.response.as_ref().unwrap()["vm_hwm_kb"].as_u64().expect("the instance's VmHWM");
        let recorded = inv.last().unwrap().max_memory_mb;
        // Read by the runtime just after the answer: the instance's peak then, or a little more.
        let own_mb = own_kb.div_ceil(1024);
        assert!((own_mb..=own_mb + 2).contains(&recorded), "ledger {recorded} MB, instance {own_kb} kB");
        assert!(recorded > mb, "{recorded} MB for {mb} MB allocated");
        peaks.push(recorded);
    }
    // One warm instance: its peak never falls, as Lambda reports an environment's.
    assert!(peaks[2] >= peaks[1] && peaks[1] > peaks[0] + 64, "{peaks:?}");
    rt.write_run_metrics(dir.path()).unwrap();
    let csv = std::fs::read_to_string(dir.path().join("ledger.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "max_memory_mb").expect("max_memory_mb column");
    let column: Vec<u64> =
        csv.lines().skip(1).map(|l| l.split(',').nth(col).unwrap().parse().unwrap()).collect();
    assert_eq!(column, peaks);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("function_metrics.json")).unwrap())
            .unwrap();
    assert_eq!(summary["max_memory_mb"], json!(peaks[2]));
    assert_eq!(summary["max_memory_mb_by_function"]["alloc"], json!(peaks[2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_has_one_record_per_attempt_billed_like_lambda() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(Config::for_test().with_max_retries(1));
    let prices = rt.prices();
    let mut attempts = 0;
    for (i, (f, p)) in [
        ("echo", json!(1)),
        ("echo", json!(2)),
        ("fail", json!({"message": "bad batch"})),
        ("crash", json!({})),
        ("sleep", json!({"ms": 20})),
        ("nonexistent", json!({})),
    ]
    .into_iter()
    .enumerate()
    {
        let inv = invoke(&rt, f, p, InvokeCtx::new("p6", 2, i as u32)).await;
        match f {
            "fail" => {
                assert_eq!(inv.outcome, Outcome::FunctionError);
                assert_eq!(inv.error.as_ref().unwrap().error_type, "Peerless.Fail");
                assert_eq!(inv.error.as_ref().unwrap().error_message, "bad batch");
                assert_eq!(inv.attempts.len(), 1, "function errors are not retried");
            }
            "crash" => {
                assert_eq!(inv.outcome, Outcome::Crashed);
                assert_eq!(inv.attempts.len(), 2, "crashes are retried max_retries times");
            }
            "nonexistent" => {
                assert_eq!(inv.outcome, Outcome::FunctionError);
                assert_eq!(inv.error.as_ref().unwrap().error_type, "Runtime.HandlerNotFound");
            }
            _ => assert!(inv.is_ok(), "{f}: {:?}", inv.error),
        }
        attempts += inv.attempts.len();
    }
    let ledger = rt.ledger();
    assert_eq!(ledger.len(), attempts);
    for r in &ledger {
        assert!(r.billed_ms >= 1, "{r:?}");
        assert_eq!(r.memory_mb, 256);
        assert_eq!(r.cost_pico, prices.invocation_pico(r.billed_ms, r.memory_mb), "{r:?}");
        assert!(r.request_id.starts_with("p6-2-"));
    }
    let ids: std::collections::BTreeSet<_> = ledger.iter().map(|r| &r.request_id).collect();
    assert_eq!(ids.len(), ledger.len(), "request ids are unique per attempt");
    let s = rt.summary();
    assert_eq!(s.invocations as usize, attempts);
    assert_eq!(s.cost_pico, ledger.iter().map(|r| r.cost_pico).sum::<u64>());
    assert_eq!((s.function_errors, s.crashes, s.ok), (2, 2, 3));
    let path = dir.path().join("ledger.csv");
    rt.write_ledger_csv(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), attempts + 1);
    assert!(text.starts_with("function,request_id,node,round,batch,attempt,"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_runtime_api_exchanges_get_lambda_errors_and_the_instance_survives() {
    let rt = runtime(Config::for_test());
    let who = invoke(&rt, "whoami", json!(null), InvokeCtx::new("p7", 0, 0)).await;
    let api: SocketAddr = who.response.as_ref().unwrap()["runtime_api"].as_str().unwrap().parse().unwrap();
    let (code, _, body) =
        raw_http(api, "POST", "/2018-06-01/runtime/invocation/no-such-id/response", "", b"{}").await;
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["errorType"], json!("InvalidRequestID"));
    assert!(err["errorMessage"].as_str().unwrap().contains("no-such-id"));
    let path = format!("/2018-06-01/runtime/invocation/{}/response", who.request_id);
    let (code, _, body) = raw_http(api, "POST", &path, "", b"{\"again\":1}").await;
    assert_eq!(code, 403, "a second answer is refused: {body}");
    assert!(body.contains("InvalidStateTransition"));
    let (code, _, _) = raw_http(api, "GET", "/2018-06-01/runtime/bogus", "", b"").await;
    assert_eq!(code, 404);
    let (code, _, _) = raw_http(api, "PUT", "/2018-06-01/runtime/invocation/next", "", b"").await;
    assert_eq!(code, 405);

    // A response over 6 MB fails the invocation as Lambda does; the instance keeps working.
    let big = invoke(&rt, "big", json!({"bytes": 7_000_000}), InvokeCtx::new("p7", 0, 1)).await;
    assert_eq!(big.outcome, Outcome::FunctionError);
    assert_eq!(big.error.as_ref().unwrap().error_type, "Function.ResponseSizeTooLarge");
    let again = invoke(&rt, "whoami", json!(null), InvokeCtx::new("p7", 0, 2)).await;
    assert_eq!(again.outcome, Outcome::Ok);
    assert_eq!(again.pid, who.pid, "the instance survived the malformed exchanges");
    let big_again = invoke(&rt, "big", json!({"bytes": 10}), InvokeCtx::new("p7", 0, 3)).await;
    assert_eq!(big_again.pid, big.pid, "and so did the one whose answer was too large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_are_retired_after_the_keep_alive() {
    let rt = runtime(Config::for_test().with_keep_alive_ms(100));
    let inv = invoke(&rt, "echo", json!(1), InvokeCtx::new("p8", 0, 0)).await;
    let pid = inv.pid.unwrap();
    // No event marks the retirement from outside: poll, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(rt.idle_instances("echo") == 0 && process_gone(pid)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance {pid} not retired 10 s after a 100 ms keep-alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rt.summary().retired, 1);
    let next = invoke(&rt, "echo", json!(2), InvokeCtx::new("p8", 0, 1)).await;
    assert!(next.last().unwrap().cold_start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_api_answers_like_aws() {
    let rt = runtime(Config::for_test());
    let api = InvokeApi::bind(rt.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (code, head, body) =
        raw_http(api.addr(), "POST", "/2015-03-31/functions/echo/invocations", "", br#"{"k":"v"}"#).await;
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"k": "v"}));
    assert!(!head.contains("x-amz-function-error"));
    let (code, head, body) =
        raw_http(api.addr(), "POST", "/2015-03-31/functions/fail/invocations", "", b"{}").await;
    assert_eq!(code, 200);
    assert!(head.contains("x-amz-function-error: unhandled"), "{head}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["errorType"], json!("Peerless.Fail"));
    let (code, _, _) =
        raw_http(api.addr(), "POST", "/2015-03-31/functions/echo/invocations", "", b"{nope").await;
    assert_eq!(code, 400);
    let (code, _, _) = raw_http(
        api.addr(),
        "POST",
        "/2015-03-31/functions/echo/invocations",
        "X-Amz-Invocation-Type: DryRun\r\n",
        b"{}",
    )
    .await;
    assert_eq!(code, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_invoker_through_a_function_service_records_what_the_in_process_runtime_does() {
    let faults = FaultConfig { crash_rate: 0.3, throttle_rate: 0.2, ..FaultConfig::default() };
    let cfg = Config::for_test().with_max_retries(3).with_faults(faults);
    let local = runtime(cfg.clone());
    let served = runtime(cfg.clone());
    let api = InvokeApi::bind(served.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let remote_cfg = Config { service_addr: api.addr().to_string(), ..cfg };
    let remote = peerless_runtime::function::remote::Remote::start(remote_cfg, SEED).unwrap();
    // What does not depend on timing: ids, attempts, outcomes, cold starts (one call at a time).
    let key = |i: &peerless_runtime::function::Invocation| -> Vec<(String, u32, Outcome, bool)> {
        i.attempts.iter().map(|a| (a.request_id.clone(), a.attempt, a.outcome, a.cold_start)).collect()
    };
    for b in 0..8 {
        let ctx = InvokeCtx::new("peer0", 1, b);
        let here = invoke(&local, "echo", json!({ "b": b }), ctx.clone()).await;
        let there = bounded("invoking through the service", remote.invoke("echo", json!({ "b": b }), ctx))
            .await
            .expect("invocation ran");
        assert_eq!((here.outcome, &here.response), (there.outcome, &there.response), "batch {b}");
        assert_eq!(key(&here), key(&there), "batch {b}");
    }
    let (a, b) = (local.summary(), remote.summary());
    assert!(a.faults_injected > 0 && a.retries > 0, "{a:?}");
    let counts = |s: &peerless_runtime::function::Summary| {
        (s.invocations, s.ok, s.retries, s.crashes, s.throttles, s.faults_injected, s.cold_starts)
    };
    assert_eq!(counts(&a), counts(&b));
    assert_eq!(remote.ledger().len(), local.ledger().len());
    // An answered invocation leaves its instance warm in the service's pool.
    for b in 8.. {
        let inv = remote.invoke("echo", json!({}), InvokeCtx::new("peer0", 1, b)).await.unwrap();
        if inv.is_ok() {
            break;
        }
    }
    assert!(served.idle_instances("echo") > 0, "the service kept its instance warm");
    // The client leaves the service's instances alone; their owner stops them.
    remote.shutdown().await;
    assert!(served.idle_instances("echo") > 0);
    local.shutdown().await;
    served.shutdown().await;
}

#[test]
fn peerless_invoke_prints_the_answer_and_the_ledger_record() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.csv");
    let out = super::run(
        super::peerless()
            .args([
                "invoke",
                "--function",
                "echo",
                "--payload",
                r#"{"hello":"lambda"}"#,
                "--memory-mb",
                "512",
            ])
            .arg("--ledger")
            .arg(&ledger),
    );
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(serde_json::from_str::<Value>(lines.next().unwrap()).unwrap(), json!({"hello": "lambda"}));
    let rec: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!((rec["outcome"].as_str(), rec["memory_mb"].as_u64()), (Some("ok"), Some(512)));
    assert_eq!(rec["cold_start"], json!(true));
    assert_eq!(std::fs::read_to_string(&ledger).unwrap().lines().count(), 2);
    // The right-sizing line names the measured peak and the configured size.
    let peak = rec["max_memory_mb"].as_u64().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("right-sizing: functions peaked at {peak} MB"))
            && stderr.contains("(configured 512 MB)"),
        "{stderr}"
    );

    let out = super::peerless().args(["invoke", "--function", "fail", "--payload", "{}"]).output().unwrap();
    assert!(!out.status.success(), "a function error exits non-zero");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Peerless.Fail"));
}

#[test]
fn peerless_invoke_out_writes_function_metrics_and_the_ledger_into_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("runs/invoke");
    let ledger = dir.path().join("ledger-flag.csv");
    let marker = dir.path().join("crashed-once");
    let payload = json!({"marker": marker.to_str().unwrap(), "value": 7}).to_string();
    let out = super::run(
        super::peerless()
            .args(["invoke", "--function", "crash_once", "--max-retries", "2", "--payload", &payload])
            .arg("--out")
            .arg(&run_dir)
            .arg("--ledger")
            .arg(&ledger),
    );
    assert!(out.status.success());

    let text = std::fs::read_to_string(run_dir.join("function_metrics.json")).expect("function_metrics.json");
    let m: Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{k} missing from {text}"));
    // The first attempt's instance exits mid-invocation; the retry, on a new instance, answers.
    assert_eq!(
        [
            n("invocations"),
            n("ok"),
            n("crashes"),
            n("retries"),
            n("cold_starts"),
            n("throttles"),
            n("timeouts"),
            n("oom_kills")
        ],
        [2, 1, 1, 1, 2, 0, 0, 0],
        "{text}"
    );
    assert!(n("latency_p50_us") > 0 && n("latency_p99_us") >= n("latency_p50_us"), "{text}");
    assert!(n("cold_start_p50_us") > 0, "{text}");
    assert_eq!(n("cost_micro"), n("cost_pico") / 1_000_000);

    let csv = std::fs::read_to_string(run_dir.join("ledger.csv")).expect("ledger.csv");
    assert_eq!(csv, std::fs::read_to_string(&ledger).unwrap(), "--out and --ledger write the same ledger");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let outcomes: Vec<&str> = rows.iter().map(|r| r[col("outcome")]).collect();
    assert_eq!(outcomes, ["crashed", "ok"]);
    let sum = |name: &str| rows.iter().map(|r| r[col(name)].parse::<u64>().unwrap()).sum::<u64>();
    assert_eq!(
        (sum("billed_ms"), sum("cost_pico")),
        (n("billed_ms"), n("cost_pico")),
        "the summary is the ledger's"
    );
}
