//! The invoking side: the [`Invoker`] trait and [`LocalRuntime`], its process-based default.
//!
//! An invocation is one or more *attempts*. Each attempt is throttled, or runs on a warm or
//! freshly started instance, and leaves exactly one [`InvocationRecord`] in the ledger.
//! Retryable outcomes ([`Outcome::is_retryable`]) are retried up to `max_retries` times with
//! exponential backoff and seeded jitter; an invocation reports success at most once (the
//! first answer ends it, and a killed attempt's late answer is refused by the Runtime API).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use peerless_core::cost::{Prices, billed_ms};
use peerless_core::function::{InvocationRecord, Outcome, SYNC_PAYLOAD_LIMIT};
use peerless_core::rng::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use super::api::{Event, FunctionError};
use super::config::{Config, Service};
use super::faults::{Fault, FaultInjector};
use super::instance::{FunctionCommand, Instance, RunEnd, SpawnError, Watch};
use super::metrics::{self, Counters, Ledger, Summary};
use super::pool::{Acquire, Pools};
use super::retry;
use crate::config_error::ConfigError;

/// Who invokes, for the ledger, fault decisions and request ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeCtx {
    /// Invoking node (peer or worker id).
    pub node: String,
    /// Round.
    pub round: u64,
    /// Batch within the round.
    pub batch: u32,
}

impl InvokeCtx {
    /// A context.
    pub fn new(node: impl Into<String>, round: u64, batch: u32) -> Self {
        InvokeCtx { node: node.into(), round, batch }
    }
}

/// The result of an invocation (after retries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// How the last attempt ended.
    pub outcome: Outcome,
    /// The function's answer when `outcome` is `Ok`.
    pub response: Option<Value>,
    /// The error document otherwise (function error, or the runtime's description of a
    /// crash, timeout, OOM kill or throttle, Lambda-style).
    pub error: Option<FunctionError>,
    /// Request id of the last attempt.
    pub request_id: String,
    /// Every attempt's ledger record, in order.
    pub attempts: Vec<InvocationRecord>,
    /// Pid of the instance that ran the last attempt (none when throttled or never started).
    pub pid: Option<u32>,
    /// Duration of the last attempt, µs (cold start excluded).
    pub duration_us: u64,
}

impl Invocation {
    /// Whether the function answered.
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }

    /// The last attempt's record.
    pub fn last(&self) -> Option<&InvocationRecord> {
        self.attempts.last()
    }
}

/// Failures to invoke at all (no attempt was made or could be recorded).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The payload is over Lambda's 6 MB synchronous limit (Lambda: 413
    /// `RequestEntityTooLargeException`); large data travels through the store.
    #[error("request payload of {size} bytes exceeds the {SYNC_PAYLOAD_LIMIT}-byte synchronous limit")]
    RequestTooLarge {
        /// Its size, bytes.
        size: usize,
    },
    /// The function's program could not be executed.
    #[error("cannot start an instance of {function}: {reason}")]
    Spawn {
        /// Function.
        function: String,
        /// Cause.
        reason: String,
    },
    /// The runtime has been shut down.
    #[error("the function runtime is shut down")]
    ShutDown,
}

/// A boxed invocation future (the trait is object-safe so `Arc<dyn Invoker>` works).
pub type InvokeFuture<'a> = Pin<Box<dyn Future<Output = Result<Invocation, InvokeError>> + Send + 'a>>;

/// Something that invokes functions: [`LocalRuntime`] here, AWS Lambda as an optional backend
/// (`aws-lambda` feature); [`start`] picks one by configuration.
///
/// Dyn-compatible on purpose (boxed futures instead of `async fn`): the peer and PS loops hold
/// an `Arc<dyn Invoker>` chosen by configuration; one allocation per invocation is noise next
/// to a process round trip.
pub trait Invoker: Send + Sync + std::fmt::Debug {
    /// Invokes `function` with `payload`, retrying retryable outcomes per the configuration.
    /// Cancel-safe: dropping the future kills the instance of the attempt in flight.
    fn invoke<'a>(&'a self, function: &'a str, payload: Value, ctx: InvokeCtx) -> InvokeFuture<'a>;
    /// A snapshot of the ledger (one record per attempt).
    fn ledger(&self) -> Vec<InvocationRecord>;
    /// Counters and latency quantiles so far.
    fn summary(&self) -> Summary;
    /// Counters so far without the quantiles ([`Counters::totals`](metrics::Counters::totals)):
    /// a node reads them every round, and the quantiles sort every latency of the run.
    fn totals(&self) -> Summary;
    /// Writes the function metrics of the run so far into `dir` (created if missing):
    /// `function_metrics.json` (the [`Summary`]) and `ledger.csv` (one line per attempt), each
    /// replaced atomically, or the ledger's waiting records appended when it streams to that
    /// file ([`Invoker::stream_ledger`]); returns the summary written. Call it at the end of a
    /// run, or as often as wanted during one.
    ///
    /// # Errors
    /// If a file cannot be written.
    fn write_run_metrics(&self, dir: &Path) -> std::io::Result<Summary>;
    /// From now on appends each attempt's record to the ledger CSV at `path` as it comes,
    /// instead of keeping it in memory ([`Ledger::stream_to`](metrics::Ledger::stream_to)).
    ///
    /// # Errors
    /// If the file cannot be opened or written.
    fn stream_ledger(&self, path: &Path) -> std::io::Result<()>;

    /// Stops what the invoker runs locally (the local runtime kills its instances) and refuses
    /// later invocations where it can. Nothing to do for a remote service.
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// The seed of node `index`'s function runtime in a run seeded `run_seed` (request ids,
/// backoff jitter, fault plans), wherever that runtime lives: in the node, or in its function
/// service.
pub fn node_seed(run_seed: u64, index: u32) -> u64 {
    run_seed ^ (u64::from(index) << 40)
}

/// Starts the invoker `config.backend` names: the [`LocalRuntime`] running `command` (or,
/// with `service_addr` set, a [`Remote`](super::remote::Remote) client of the function
/// service there, which runs one), or
/// (built with the `aws-lambda` feature) [`AwsLambda`](super::aws::AwsLambda) on
/// `config.aws`. `seed` drives request ids, backoff jitter and fault injection.
///
/// # Errors
/// An invalid configuration, naming the key; `function.backend = aws-lambda` in a build
/// without the feature.
pub fn start(config: Config, command: FunctionCommand, seed: u64) -> Result<Arc<dyn Invoker>, ConfigError> {
    match config.backend {
        Service::Local if !config.service_addr.is_empty() => {
            let _ = command;
            Ok(Arc::new(super::remote::Remote::start(config, seed)?))
        }
        Service::Local => Ok(Arc::new(LocalRuntime::start(config, command, seed)?)),
        #[cfg(feature = "aws-lambda")]
        Service::AwsLambda => {
            let _ = command;
            Ok(Arc::new(super::aws::AwsLambda::start(config, seed)?))
        }
        #[cfg(not(feature = "aws-lambda"))]
        Service::AwsLambda => {
            let _ = (command, seed);
            Err(ConfigError::Invalid {
                key: "function.backend".into(),
                value: "aws-lambda".into(),
                reason: "this peerless was built without the AWS Lambda backend; rebuild with \
                         `cargo build --release -p peerless --features aws-lambda`"
                    .into(),
            })
        }
    }
}

#[derive(Debug)]
struct Inner {
    config: Config,
    prices: Prices,
    command: FunctionCommand,
    seed: u64,
    faults: FaultInjector,
    pools: Arc<Pools>,
    ledger: Ledger,
    counters: Mutex<Counters>,
    ids: Mutex<Rng>,
    /// The X-Ray trace id every invocation carries (`Lambda-Runtime-Trace-Id`): one for the
    /// runtime's life, each invocation a segment of the run's trace, not sampled. Lambda sends
    /// one per invocation, but `lambda_runtime` copies it into the instance's environment
    /// (`_X_AMZN_TRACE_ID`) and glibc's `setenv` never frees a value it replaces: a new id per
    /// invocation grew every instance by about 110 bytes an invocation (11 MB per 100,000
    /// measured). A value set before is reused, so one id costs nothing.
    trace_id: String,
    next_instance: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Inner {
    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Idle instances are killed and reaped by their supervisors when dropped here.
        self.shutdown.send_replace(true);
        drop(self.pools.close());
    }
}

/// The trace id of a runtime seeded `seed` (see `Inner::trace_id`), in X-Ray's format.
fn trace_id(seed: u64) -> String {
    let mut r = Rng::derive(seed, "trace-id", 0);
    let (b, c) = (r.next_u64(), r.next_u64());
    format!("Root=1-{:08x}-{:016x}{:08x};Sampled=0", b as u32, c, (b >> 32) as u32)
}

/// The local function runtime: real OS processes speaking the Lambda Runtime API, with warm
/// pools, concurrency limits, timeouts, memory limits, retries, fault injection and a ledger.
///
/// Cheap to clone (clones share everything). Create it inside a tokio runtime. Dropping the
/// last clone kills every idle instance; [`LocalRuntime::shutdown`] also kills busy ones and
/// waits until all are reaped.
#[derive(Debug, Clone)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

impl LocalRuntime {
    /// Starts a runtime that spawns `command` as function instances; `seed` drives request
    /// ids, backoff jitter and fault injection. Validates `config` (the error names the key).
    pub fn start(config: Config, command: FunctionCommand, seed: u64) -> Result<LocalRuntime, ConfigError> {
        config.validate()?;
        let prices = config.prices.prices().map_err(|e| ConfigError::Invalid {
            key: format!("function.prices.{}", e.key),
            value: e.value.to_string(),
            reason: "must be a finite, non-negative dollar amount".into(),
        })?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            faults: FaultInjector::new(config.faults.clone(), seed),
            pools: Pools::new(config.concurrency),
            prices,
            command,
            seed,
            ledger: Ledger::default(),
            counters: Mutex::new(Counters::default()),
            ids: Mutex::new(Rng::derive(seed, "request-id", 0)),
            trace_id: trace_id(seed),
            next_instance: AtomicU64::new(0),
            shutdown,
            config,
        });
        tokio::spawn(reaper(Arc::downgrade(&inner), Duration::from_millis(inner.config.keep_alive_ms)));
        tracing::info!(seed, memory_mb = inner.config.memory_mb, "local function runtime started");
        Ok(LocalRuntime { inner })
    }

    /// Stops keeping a ledger of the attempts: for a runtime that serves another process's
    /// invocations (the function service), which records every attempt in its own.
    pub fn discard_ledger(&self) {
        self.inner.ledger.discard();
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The integer prices the ledger charges with.
    pub fn prices(&self) -> Prices {
        self.inner.prices
    }

    /// The shared ledger.
    pub fn ledger_handle(&self) -> Ledger {
        self.inner.ledger.clone()
    }

    /// Writes `ledger.csv`.
    pub fn write_ledger_csv(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.ledger.write_csv(path)
    }

    /// Idle (warm) instances of `function`.
    pub fn idle_instances(&self, function: &str) -> usize {
        self.inner.pools.idle(function)
    }

    /// Invocations of `function` currently holding a concurrency unit.
    pub fn in_flight(&self, function: &str) -> u32 {
        self.inner.pools.in_flight(function)
    }

    /// Retires every idle instance now (as if their keep-alive had passed) and waits until
    /// they are reaped; returns how many. The next invocation of each function is cold.
    pub async fn retire_idle(&self) -> usize {
        let gone = self.inner.pools.take_expired(Duration::ZERO);
        let n = gone.len();
        self.inner.counters().retire(n as u64);
        for mut i in gone {
            i.kill_and_reap().await;
        }
        n
    }

    /// Kills every instance, idle or busy (their attempts end as `Crashed`), waits until the
    /// idle ones are reaped, and refuses later invocations.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        for mut i in self.inner.pools.close() {
            i.kill_and_reap().await;
        }
    }

    fn request_id(&self, ctx: &InvokeCtx, attempt: u32) -> (String, String) {
        let a = self.inner.ids.lock().unwrap_or_else(|e| e.into_inner()).next_u64();
        let node: String = ctx
            .node
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' { ch } else { '_' })
            .take(64)
            .collect();
        let node = if node.is_empty() { "local".to_owned() } else { node };
        let id = format!("{node}-{}-{}-{attempt}-{a:016x}", ctx.round, ctx.batch);
        (id, self.inner.trace_id.clone())
    }

    fn record(&self, rec: InvocationRecord, latency_us: Option<u64>, injected: bool) -> InvocationRecord {
        let mut c = self.inner.counters();
        c.record(&rec, latency_us, injected);
        // Pushed under the counters' lock, so a snapshot of both (`run_metrics`) agrees.
        self.inner.ledger.push(rec.clone());
        rec
    }

    /// Like [`Invoker::invoke`] with an explicit retry bound (0: a single attempt, as AWS does
    /// for synchronous `RequestResponse` invocations). Cancel-safe: dropping the future kills
    /// the instance of the attempt in flight and frees its concurrency unit; that attempt
    /// leaves no ledger record.
    #[tracing::instrument(skip_all, fields(function, node = %ctx.node, round = ctx.round, batch = ctx.batch))]
    pub async fn invoke_with_retries(
        &self,
        function: &str,
        payload: Value,
        ctx: InvokeCtx,
        max_retries: u32,
    ) -> Result<Invocation, InvokeError> {
        let body = Bytes::from(retry::request_body(function, &payload)?);
        let (config, seed) = (&self.inner.config, self.inner.seed);
        let (body, ctx) = (&body, &ctx);
        retry::with_retries(config, seed, function, ctx, max_retries, |attempt| async move {
            self.attempt(function, body, ctx, attempt).await.map(|a| a.invocation)
        })
        .await
    }

    /// Attempt number `attempt` of invoking `function` for `ctx`, with no retry: what a
    /// function service ([`InvokeApi`](super::InvokeApi)) runs for a remote invoker that
    /// retries on its side. Fault plans and request ids are those the same attempt would meet
    /// in this process.
    pub async fn serve_attempt(
        &self,
        function: &str,
        payload: &Value,
        ctx: &InvokeCtx,
        attempt: u32,
    ) -> Result<Attempted, InvokeError> {
        let body = Bytes::from(retry::request_body(function, payload)?);
        self.attempt(function, &body, ctx, attempt).await
    }

    /// One attempt; its record is in `attempts[0]` of the result.
    async fn attempt(
        &self,
        function: &str,
        body: &Bytes,
        ctx: &InvokeCtx,
        attempt: u32,
    ) -> Result<Attempted, InvokeError> {
        let inner = &self.inner;
        let plan = inner.faults.plan(function, &ctx.node, ctx.round, ctx.batch, attempt);
        let (request_id, trace_id) = self.request_id(ctx, attempt);
        let mut rec = throttled_record(function, &request_id, ctx, attempt, inner.config.memory_mb);
        if plan.fault == Fault::Throttle {
            tracing::debug!(function, request_id, "injected throttle");
            let rec = self.record(rec, None, true);
            return Ok(Attempted::new(
                finished(rec, Some(throttled(function, true)), None, None, 0),
                None,
                true,
            ));
        }
        let mut slot = match inner.pools.acquire(function) {
            Acquire::Closed => return Err(InvokeError::ShutDown),
            Acquire::Throttled => {
                let rec = self.record(rec, None, false);
                let inv = finished(rec, Some(throttled(function, false)), None, None, 0);
                return Ok(Attempted::new(inv, None, false));
            }
            Acquire::Slot(s) => s,
        };
        let (mut inst, cold) = match slot.warm.take() {
            Some(i) => (i, false),
            None => match self.start_instance(function).await? {
                Started::Ready(i, init_us) => {
                    rec.init_us = init_us;
                    (i, true)
                }
                Started::InitFailed(outcome, fe, init_us) => {
                    return Ok(self.init_failed(rec, outcome, fe, init_us));
                }
            },
        };
        if cold && plan.slow_cold_start_ms > 0 {
            slow_cold_start(&mut rec, plan.slow_cold_start_ms).await;
        }
        rec.cold_start = cold;
        let event = self.event(function, &request_id, trace_id, body);
        let (end, duration_us) = inst.run(event, self.watch(function, plan.fault)).await;
        rec.max_memory_mb = inst.max_memory_kb().div_ceil(1024);
        let pid = Some(inst.pid);
        let (outcome, response, error) = run_outcome(end, &request_id, &inner.config);
        if outcome == Outcome::Ok {
            inner.pools.observe_ok(function, duration_us);
        }
        slot.release(inst);
        let total_us = duration_us + if cold { rec.init_us } else { 0 };
        self.bill(&mut rec, outcome, total_us);
        if outcome != Outcome::Ok {
            tracing::debug!(function, request_id, ?outcome, error = ?error, "attempt failed");
        }
        let injected = plan.fault != Fault::None || plan.slow_cold_start_ms > 0 && cold;
        let rec = self.record(rec, Some(total_us), injected);
        tracing::debug!(function, "{}", report_line(&rec, duration_us).trim_end());
        Ok(Attempted::new(finished(rec, error, response, pid, duration_us), Some(total_us), injected))
    }

    /// Starts a fresh instance of `function`; `Err` when its program cannot be run at all.
    async fn start_instance(&self, function: &str) -> Result<Started, InvokeError> {
        let inner = &self.inner;
        let id = inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let init_timeout = Duration::from_millis(inner.config.init_timeout_ms);
        let started = std::time::Instant::now();
        match Instance::spawn(&inner.command, function, inner.config.memory_mb, id, init_timeout).await {
            Ok((i, init_us)) => Ok(Started::Ready(i, init_us)),
            Err(SpawnError::Exec { program, source }) => Err(InvokeError::Spawn {
                function: function.to_owned(),
                reason: format!("{program}: {source}"),
            }),
            Err(SpawnError::Api(e)) => {
                Err(InvokeError::Spawn { function: function.to_owned(), reason: e.to_string() })
            }
            Err(e) => {
                let init_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let (outcome, fe) = init_failure(e);
                Ok(Started::InitFailed(outcome, fe, init_us))
            }
        }
    }

    /// Records an attempt whose fresh instance failed to initialise after `init_us`: billed
    /// like Lambda bills a custom runtime's init.
    fn init_failed(
        &self,
        mut rec: InvocationRecord,
        outcome: Outcome,
        fe: FunctionError,
        init_us: u64,
    ) -> Attempted {
        rec.cold_start = true;
        rec.init_us = init_us;
        self.bill(&mut rec, outcome, init_us);
        tracing::warn!(function = rec.function, request_id = rec.request_id, error = %fe, "instance failed to initialise");
        let rec = self.record(rec, Some(init_us), false);
        Attempted::new(finished(rec, Some(fe), None, None, 0), Some(init_us), false)
    }

    /// Sets how the attempt `rec` records ended, and charges it for `us` µs.
    fn bill(&self, rec: &mut InvocationRecord, outcome: Outcome, us: u64) {
        rec.outcome = outcome;
        rec.billed_ms = billed_ms(us);
        rec.cost_pico = self.inner.prices.invocation_pico(rec.billed_ms, rec.memory_mb);
    }

    /// The event handed to the instance, due `timeout_ms` from now.
    fn event(&self, function: &str, request_id: &str, trace_id: String, body: &Bytes) -> Event {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Event {
            request_id: request_id.to_owned(),
            deadline_unix_ms: now_ms + self.inner.config.timeout_ms,
            function_arn: format!("arn:aws:lambda:local:000000000000:function:{function}"),
            trace_id,
            body: body.clone(),
        }
    }

    /// How an invocation of `function` with the injected `fault` is watched.
    fn watch(&self, function: &str, fault: Fault) -> Watch {
        let cfg = &self.inner.config;
        Watch {
            timeout: Duration::from_millis(cfg.timeout_ms),
            limit_kb: cfg.memory_mb * 1024,
            poll: Duration::from_millis(cfg.memory_poll_ms),
            fault,
            expected: self.inner.pools.expected(function),
            shutdown: self.inner.shutdown.subscribe(),
        }
    }
}

/// One attempt as the runtime counted it: its invocation (one record), and what the
/// [`Summary`] counts besides the record. A remote invoker counts the same from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempted {
    /// The attempt's invocation; `attempts` holds its one record.
    pub invocation: Invocation,
    /// Its latency, cold start included, µs; `None` when it never reached an instance.
    pub latency_us: Option<u64>,
    /// Whether a fault was injected into it.
    pub injected: bool,
}

impl Attempted {
    fn new(invocation: Invocation, latency_us: Option<u64>, injected: bool) -> Attempted {
        Attempted { invocation, latency_us, injected }
    }
}

/// How starting a fresh instance ended, when its program could be run.
enum Started {
    /// Ready after a cold start of so many µs.
    Ready(Instance, u64),
    /// Its init failed after so many µs: the outcome and error document to record.
    InitFailed(Outcome, FunctionError, u64),
}

/// The outcome and error document of an instance whose init failed with `e`.
fn init_failure(e: SpawnError) -> (Outcome, FunctionError) {
    match e {
        SpawnError::Init(fe) => (Outcome::FunctionError, fe),
        SpawnError::InitTimeout => (
            Outcome::Timeout,
            FunctionError::new("Runtime.InitTimeout", "the instance did not initialise in time"),
        ),
        other => (Outcome::Crashed, FunctionError::new("Runtime.ExitError", other.to_string())),
    }
}

/// Lambda's `REPORT` line for the attempt `rec` that ran `duration_us`, as CloudWatch logs it.
pub(crate) fn report_line(rec: &InvocationRecord, duration_us: u64) -> String {
    super::report::Report {
        request_id: rec.request_id.clone(),
        duration_us,
        billed_ms: rec.billed_ms,
        memory_mb: rec.memory_mb,
        max_memory_mb: (rec.max_memory_mb > 0).then_some(rec.max_memory_mb),
        init_us: rec.cold_start.then_some(rec.init_us),
    }
    .line()
}

/// The record of an attempt before it runs: unbilled, warm, and `Throttled` until it ends.
fn throttled_record(
    function: &str,
    request_id: &str,
    ctx: &InvokeCtx,
    attempt: u32,
    memory_mb: u64,
) -> InvocationRecord {
    InvocationRecord {
        function: function.to_owned(),
        request_id: request_id.to_owned(),
        node: ctx.node.clone(),
        round: ctx.round,
        batch: ctx.batch,
        attempt,
        memory_mb,
        billed_ms: 0,
        cold_start: false,
        init_us: 0,
        outcome: Outcome::Throttled,
        cost_pico: 0,
        max_memory_mb: 0,
    }
}

/// The invocation one attempt's recorded `rec` ends with.
fn finished(
    rec: InvocationRecord,
    error: Option<FunctionError>,
    response: Option<Value>,
    pid: Option<u32>,
    duration_us: u64,
) -> Invocation {
    Invocation {
        outcome: rec.outcome,
        response,
        error,
        request_id: rec.request_id.clone(),
        attempts: vec![rec],
        pid,
        duration_us,
    }
}

/// Lambda's error document for a throttled attempt (`injected`, or over the concurrency limit).
fn throttled(function: &str, injected: bool) -> FunctionError {
    let what = if injected { "injected throttle" } else { "concurrency limit reached" };
    FunctionError::new("TooManyRequestsException", format!("Rate Exceeded: {what} for {function}"))
}

/// Delays a cold start by an injected `ms`, counted in the record's init time.
async fn slow_cold_start(rec: &mut InvocationRecord, ms: u64) {
    tracing::debug!(function = rec.function, request_id = rec.request_id, ms, "injected slow cold start");
    tokio::time::sleep(Duration::from_millis(ms)).await;
    rec.init_us += ms * 1000;
}

/// The outcome, answer and error document of an invocation that ended as `end`.
fn run_outcome(
    end: RunEnd,
    request_id: &str,
    cfg: &Config,
) -> (Outcome, Option<Value>, Option<FunctionError>) {
    match end {
        RunEnd::Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => (Outcome::Ok, Some(v), None),
            Err(e) => (
                Outcome::FunctionError,
                None,
                Some(FunctionError::new("Runtime.InvalidResponseBody", e.to_string())),
            ),
        },
        RunEnd::Error(fe) => (Outcome::FunctionError, None, Some(fe)),
        RunEnd::Crashed(what) => (
            Outcome::Crashed,
            None,
            Some(FunctionError::new("Runtime.ExitError", format!("RequestId: {request_id} Error: {what}"))),
        ),
        RunEnd::Timeout => (
            Outcome::Timeout,
            None,
            Some(FunctionError::new(
                "Sandbox.Timedout",
                format!("RequestId: {request_id} Error: Task timed out after {} ms", cfg.timeout_ms),
            )),
        ),
        RunEnd::OutOfMemory { rss_kb } => (
            Outcome::OutOfMemory,
            None,
            Some(FunctionError::new(
                "Runtime.OutOfMemory",
                format!(
                    "RequestId: {request_id} Error: Runtime exited with error: signal: killed (resident {} MB > {} MB)",
                    rss_kb / 1024,
                    cfg.memory_mb
                ),
            )),
        ),
    }
}

impl Invoker for LocalRuntime {
    fn invoke<'a>(&'a self, function: &'a str, payload: Value, ctx: InvokeCtx) -> InvokeFuture<'a> {
        Box::pin(self.invoke_with_retries(function, payload, ctx, self.inner.config.max_retries))
    }

    fn ledger(&self) -> Vec<InvocationRecord> {
        self.inner.ledger.snapshot()
    }

    fn summary(&self) -> Summary {
        self.inner.counters().summary()
    }

    fn totals(&self) -> Summary {
        self.inner.counters().totals()
    }

    fn write_run_metrics(&self, dir: &Path) -> std::io::Result<Summary> {
        // Under the counters' lock, so the summary counts exactly the ledger's records.
        let c = self.inner.counters();
        let summary = c.summary();
        metrics::write_run_metrics(dir, &summary, &self.inner.ledger)?;
        Ok(summary)
    }

    fn stream_ledger(&self, path: &Path) -> std::io::Result<()> {
        self.inner.ledger.stream_to(path)
    }

    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(LocalRuntime::shutdown(self))
    }
}

/// Retires idle instances past their keep-alive; ends when the runtime is dropped.
async fn reaper(inner: std::sync::Weak<Inner>, keep_alive: Duration) {
    let period = (keep_alive / 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if *inner.shutdown.borrow() {
            return;
        }
        let gone = inner.pools.take_expired(keep_alive);
        if !gone.is_empty() {
            tracing::debug!(n = gone.len(), "retiring idle instances");
            inner.counters().retire(gone.len() as u64);
        }
        drop(inner);
        for mut i in gone {
            i.kill_and_reap().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(cfg: Config) -> LocalRuntime {
        LocalRuntime::start(cfg, FunctionCommand::new("/nonexistent/peerless-function"), 7).unwrap()
    }

    #[tokio::test]
    async fn request_ids_carry_the_attempt_and_are_unique() {
        let r = rt(Config::for_test());
        let ctx = InvokeCtx::new("peer/0", 3, 4);
        let (a, trace) = r.request_id(&ctx, 1);
        let (b, trace_b) = r.request_id(&ctx, 1);
        assert!(a.starts_with("peer_0-3-4-1-"), "{a}");
        assert_ne!(a, b);
        assert!(trace.starts_with("Root=1-") && trace.ends_with(";Sampled=0"), "{trace}");
        // One trace id for every invocation: an instance copies it into its environment,
        // where each new value would stay for the instance's life.
        assert_eq!(trace, trace_b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }

    #[tokio::test]
    async fn unstartable_program_and_oversize_payload_are_errors_not_attempts() {
        let r = rt(Config::for_test());
        let err = r.invoke("echo", Value::Null, InvokeCtx::default()).await.unwrap_err();
        assert!(matches!(err, InvokeError::Spawn { .. }), "{err}");
        let big = Value::String("x".repeat(SYNC_PAYLOAD_LIMIT));
        let err = r.invoke("echo", big, InvokeCtx::default()).await.unwrap_err();
        assert!(matches!(err, InvokeError::RequestTooLarge { .. }), "{err}");
        assert!(r.ledger().is_empty());
        assert_eq!(r.in_flight("echo"), 0, "the slot was freed");
    }

    #[tokio::test]
    async fn injected_throttles_are_recorded_free_and_retried() {
        let mut cfg = Config::for_test().with_max_retries(2);
        cfg.faults.throttle_rate = 1.0;
        let r = rt(cfg);
        let inv = r.invoke("echo", Value::Null, InvokeCtx::new("n", 0, 0)).await.unwrap();
        assert_eq!(inv.outcome, Outcome::Throttled);
        assert_eq!(inv.attempts.len(), 3);
        assert!(inv.attempts.iter().all(|a| a.billed_ms == 0 && a.cost_pico == 0));
        assert_eq!(inv.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![0, 1, 2]);
        let s = r.summary();
        assert_eq!((s.invocations, s.throttles, s.retries, s.faults_injected), (3, 3, 2, 3));
        assert_eq!(inv.error.unwrap().error_type, "TooManyRequestsException");
    }
}
