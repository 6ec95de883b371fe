//! AWS Lambda as an [`Invoker`]: the local runtime's attempts, retries and ledger, over Lambda's Invoke API.
//!
//! Compiled with the `aws-lambda` feature only. Every attempt is one `Invoke`
//! (`RequestResponse`, `LogType=Tail`) through `aws-sdk-lambda` with the SDK's own retries
//! off, so that retries, backoff and the ledger work exactly as in
//! [`LocalRuntime`](super::LocalRuntime): one [`InvocationRecord`] per attempt, retryable
//! outcomes retried up to `max_retries` times with the same seeded backoff.
//!
//! How Lambda's answers map to outcomes:
//! - 200 without `X-Amz-Function-Error`: [`Outcome::Ok`] (the payload must be JSON);
//! - 200 with `X-Amz-Function-Error`: the error document's `errorType` decides:
//!   `Runtime.ExitError` (and other `Runtime.*Exit*`) → [`Outcome::Crashed`],
//!   `Sandbox.Timedout` or "Task timed out" → [`Outcome::Timeout`], `Runtime.OutOfMemory` →
//!   [`Outcome::OutOfMemory`], anything else → [`Outcome::FunctionError`];
//! - 429 `TooManyRequestsException` (and Lambda's other throttling errors) →
//!   [`Outcome::Throttled`], not billed;
//! - a service error whose body is a Lambda error document (cargo-lambda answers a handler
//!   panic with a 500 and one) → as for a 200 with `X-Amz-Function-Error`;
//! - other 5xx service errors, a lost connection → [`Outcome::Crashed`]; the client's own
//!   timeout → [`Outcome::Timeout`];
//! - `ResourceNotFoundException` → [`InvokeError::Spawn`] (nothing to invoke), other 4xx
//!   errors → [`Outcome::FunctionError`] (the request is wrong; retrying cannot help).
//!
//! The billed duration, memory and cold start come from the `REPORT` line of the log tail
//! ([`Report`]) when Lambda sends one; otherwise the attempt is billed as measured here
//! (round trip, rounded up to 1 ms) and counted warm.
//!
//! Credentials: [`AwsLambda::start`] takes them from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the AWS SDK's contract and the one place
//! this backend reads the environment; against a local endpoint (`endpoint_url` set) without
//! them, fixed placeholder credentials are used, since emulators do not check signatures.
//! Dropping an invocation future abandons the HTTP request; as on AWS, the function itself
//! runs to its end.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_sdk_lambda::config::retry::RetryConfig;
use aws_sdk_lambda::config::timeout::TimeoutConfig;
use aws_sdk_lambda::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::operation::RequestId;
use aws_sdk_lambda::operation::invoke::{InvokeError as SdkInvokeError, InvokeOutput};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{InvocationType, LogType};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use peerless_core::cost::{Prices, billed_ms};
use peerless_core::function::{InvocationRecord, Outcome};
use peerless_core::rng::Rng;
use serde_json::Value;

use super::api::FunctionError;
use super::config::Config;
use super::invoke::{Invocation, InvokeCtx, InvokeError, InvokeFuture, Invoker};
use super::metrics::{self, Counters, Ledger, Summary};
use super::report::Report;
use super::retry;
use crate::config_error::ConfigError;

/// Static AWS credentials.
#[derive(Clone)]
pub struct AwsCredentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

impl AwsCredentials {
    /// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and (optional) `AWS_SESSION_TOKEN`;
    /// `None` unless both keys are set and non-empty.
    pub fn from_env() -> Option<AwsCredentials> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(AwsCredentials {
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }

    /// Placeholder credentials for local endpoints, which do not check signatures.
    pub fn placeholder() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "peerless-local".into(),
            secret_access_key: "peerless-local".into(),
            session_token: None,
        }
    }
}

struct Inner {
    client: aws_sdk_lambda::Client,
    config: Config,
    prices: Prices,
    seed: u64,
    ledger: Ledger,
    counters: Mutex<Counters>,
    ids: Mutex<Rng>,
}

/// The AWS Lambda backend: invokes deployed functions (or any endpoint that speaks Lambda's
/// Invoke API, such as `cargo lambda watch` or [`InvokeApi`](super::InvokeApi)). Cheap to
/// clone; clones share the client, the ledger and the counters.
#[derive(Clone)]
pub struct AwsLambda {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AwsLambda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsLambda").field("aws", &self.inner.config.aws).finish_non_exhaustive()
    }
}

fn invalid(key: &str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid { key: format!("function.{key}"), value: value.to_string(), reason: reason.into() }
}

impl AwsLambda {
    /// A client for `config.aws`, with credentials from the environment (see the module docs).
    /// Validates `config`; the error names the key, or the missing variables.
    pub fn start(config: Config, seed: u64) -> Result<AwsLambda, ConfigError> {
        let credentials = match AwsCredentials::from_env() {
            Some(c) => c,
            None if !config.aws.endpoint_url.is_empty() => AwsCredentials::placeholder(),
            None => {
                return Err(invalid(
                    "aws",
                    "(no credentials)",
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set to invoke AWS Lambda",
                ));
            }
        };
        AwsLambda::with_credentials(config, credentials, seed)
    }

    /// A client for `config.aws` with these credentials. Create it inside a tokio runtime.
    pub fn with_credentials(
        config: Config,
        credentials: AwsCredentials,
        seed: u64,
    ) -> Result<AwsLambda, ConfigError> {
        config.validate()?;
        let prices = config.prices.prices().map_err(|e| {
            invalid(&format!("prices.{}", e.key), e.value, "must be a finite, non-negative dollar amount")
        })?;
        let aws = &config.aws;
        // One TLS stack, rustls on ring: no C toolchain beyond ring's, no second rustls.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        // The client waits a little longer than the function may run, so that Lambda's own
        // timeout answer arrives first.
        let operation_timeout =
            Duration::from_millis(config.timeout_ms.saturating_add(aws.timeout_margin_ms));
        let mut b = aws_sdk_lambda::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(aws.region.clone()))
            .credentials_provider(Credentials::new(
                credentials.access_key_id,
                credentials.secret_access_key,
                credentials.session_token,
                None,
                "peerless",
            ))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(aws.connect_timeout_ms))
                    .operation_timeout(operation_timeout)
                    .build(),
            );
        if !aws.endpoint_url.is_empty() {
            b = b.endpoint_url(aws.endpoint_url.clone());
        }
        let client = aws_sdk_lambda::Client::from_conf(b.build());
        tracing::info!(
            region = %aws.region,
            endpoint = %if aws.endpoint_url.is_empty() { "(AWS)" } else { aws.endpoint_url.as_str() },
            function = %aws.function_name,
            "AWS Lambda backend"
        );
        Ok(AwsLambda {
            inner: Arc::new(Inner {
                client,
                prices,
                seed,
                ledger: Ledger::default(),
                counters: Mutex::new(Counters::default()),
                ids: Mutex::new(Rng::derive(seed, "aws-request-id", 0)),
                config,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.inner.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Lambda function that serves `function`: `aws.function_name` when set, else the
    /// name itself.
    pub fn target(&self, function: &str) -> String {
        let name = &self.inner.config.aws.function_name;
        if name.is_empty() { function.to_owned() } else { name.clone() }
    }

    /// Like [`Invoker::invoke`] with an explicit retry bound.
    #[tracing::instrument(skip_all, fields(function, node = %ctx.node, round = ctx.round, batch = ctx.batch))]
    pub async fn invoke_with_retries(
        &self,
        function: &str,
        payload: Value,
        ctx: InvokeCtx,
        max_retries: u32,
    ) -> Result<Invocation, InvokeError> {
        let body = retry::request_body(function, &payload)?;
        let (config, seed) = (&self.inner.config, self.inner.seed);
        retry::with_retries(config, seed, function, &ctx, max_retries, |attempt| {
            self.attempt(function, &body, &ctx, attempt)
        })
        .await
    }

    /// One attempt: one `Invoke`; its record is in `attempts[0]` of the result.
    async fn attempt(
        &self,
        function: &str,
        body: &[u8],
        ctx: &InvokeCtx,
        attempt: u32,
    ) -> Result<Invocation, InvokeError> {
        let target = self.target(function);
        let started = Instant::now();
        let result = self
            .inner
            .client
            .invoke()
            .function_name(&target)
            .invocation_type(InvocationType::RequestResponse)
            .log_type(LogType::Tail)
            .payload(Blob::new(body))
            .send()
            .await;
        let measured_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (request_id, report, (outcome, response, error)) = match result {
            Ok(out) => answered(&out),
            Err(e) => match classify(&e) {
                Classified::NotFound(reason) => {
                    return Err(InvokeError::Spawn { function: format!("{function} ({target})"), reason });
                }
                Classified::Attempt(outcome, fe) => {
                    (e.request_id().map(str::to_owned), None, (outcome, None, Some(fe)))
                }
            },
        };
        let request_id = request_id.unwrap_or_else(|| self.fallback_request_id(ctx, attempt));
        let throttled = outcome == Outcome::Throttled;
        let billing = Billing::new(report.as_ref(), throttled, measured_us, self.inner.config.memory_mb);
        let rec = InvocationRecord {
            function: function.to_owned(),
            request_id: request_id.clone(),
            node: ctx.node.clone(),
            round: ctx.round,
            batch: ctx.batch,
            attempt,
            memory_mb: billing.memory_mb,
            billed_ms: billing.billed_ms,
            cold_start: billing.cold_start,
            init_us: billing.init_us,
            outcome,
            cost_pico: if throttled {
                0
            } else {
                self.inner.prices.invocation_pico(billing.billed_ms, billing.memory_mb)
            },
            max_memory_mb: report.as_ref().and_then(|r| r.max_memory_mb).unwrap_or(0),
        };
        if outcome != Outcome::Ok {
            tracing::debug!(function, request_id, ?outcome, error = ?error, "attempt failed");
        }
        {
            let mut c = self.counters();
            c.record(&rec, (!throttled).then_some(measured_us), false);
            self.inner.ledger.push(rec.clone());
        }
        let duration_us = billing.duration_us;
        Ok(Invocation { outcome, response, error, request_id, attempts: vec![rec], pid: None, duration_us })
    }

    /// A request id for an attempt Lambda gave none, drawn from the seeded id generator.
    fn fallback_request_id(&self, ctx: &InvokeCtx, attempt: u32) -> String {
        let mut r = self.inner.ids.lock().unwrap_or_else(|e| e.into_inner());
        format!("aws-{}-{}-{}-{attempt}-{:016x}", ctx.node, ctx.round, ctx.batch, r.next_u64())
    }
}

/// What an attempt Lambda answered yields: its request id, the `REPORT` line of its log tail,
/// and its outcome, answer and error document (see the module docs).
fn answered(out: &InvokeOutput) -> (Option<String>, Option<Report>, Answer) {
    let request_id = out.request_id().map(str::to_owned);
    let report = out.log_result().and_then(Report::from_log_tail);
    let bytes = out.payload().map(|b| b.as_ref()).unwrap_or_default();
    let answer = match out.function_error() {
        None => match serde_json::from_slice::<Value>(bytes) {
            Ok(v) => (Outcome::Ok, Some(v), None),
            Err(e) => (
                Outcome::FunctionError,
                None,
                Some(FunctionError::new("Runtime.InvalidResponseBody", e.to_string())),
            ),
        },
        Some(kind) => {
            let fe = serde_json::from_slice::<FunctionError>(bytes)
                .unwrap_or_else(|_| FunctionError::new(kind, String::from_utf8_lossy(bytes).into_owned()));
            (function_error_outcome(&fe), None, Some(fe))
        }
    };
    (request_id, report, answer)
}

/// An attempt's outcome, the function's answer and the error document.
type Answer = (Outcome, Option<Value>, Option<FunctionError>);

/// What an attempt is billed and recorded with.
struct Billing {
    billed_ms: u64,
    memory_mb: u64,
    cold_start: bool,
    init_us: u64,
    duration_us: u64,
}

impl Billing {
    /// From Lambda's `REPORT` line when there is one, else as measured here (`measured_us`,
    /// warm, at the configured `memory_mb`); a throttled attempt is free.
    fn new(report: Option<&Report>, throttled: bool, measured_us: u64, memory_mb: u64) -> Billing {
        match (report, throttled) {
            (_, true) => Billing { billed_ms: 0, memory_mb, cold_start: false, init_us: 0, duration_us: 0 },
            (Some(r), false) => Billing {
                billed_ms: r.billed_ms,
                memory_mb: if r.memory_mb > 0 { r.memory_mb } else { memory_mb },
                cold_start: r.init_us.is_some(),
                init_us: r.init_us.unwrap_or(0),
                duration_us: r.duration_us,
            },
            (None, false) => Billing {
                billed_ms: billed_ms(measured_us),
                memory_mb,
                cold_start: false,
                init_us: 0,
                duration_us: measured_us,
            },
        }
    }
}

/// The outcome a function error document stands for (see the module docs).
pub fn function_error_outcome(e: &FunctionError) -> Outcome {
    let t = e.error_type.as_str();
    if t == "Sandbox.Timedout" || e.error_message.contains("Task timed out") {
        Outcome::Timeout
    } else if t == "Runtime.OutOfMemory" {
        Outcome::OutOfMemory
    } else if t == "Runtime.ExitError" || t.starts_with("Runtime.") && t.contains("Exit") {
        Outcome::Crashed
    } else {
        Outcome::FunctionError
    }
}

enum Classified {
    /// The function does not exist: nothing was invoked.
    NotFound(String),
    /// An attempt that ended this way.
    Attempt(Outcome, FunctionError),
}

/// Lambda's throttling errors: retry later.
const THROTTLES: &[&str] =
    &["TooManyRequestsException", "EC2ThrottledException", "ResourceNotReadyException"];

fn classify(e: &SdkError<SdkInvokeError>) -> Classified {
    let detail = aws_sdk_lambda::error::DisplayErrorContext(e).to_string();
    match e {
        SdkError::ServiceError(s) => {
            // An emulator may answer a handler's error with a 5xx and the error document
            // (cargo-lambda does for panics): the document decides, as for a 200.
            if let Some(fe) = s
                .raw()
                .body()
                .bytes()
                .and_then(|b| serde_json::from_slice::<FunctionError>(b).ok())
                .filter(|fe| !fe.error_type.is_empty())
            {
                return Classified::Attempt(function_error_outcome(&fe), fe);
            }
            let err = s.err();
            let code = err.code().unwrap_or("ServiceException").to_owned();
            let message = err.message().unwrap_or(&detail).to_owned();
            let fe = FunctionError::new(code.clone(), message);
            if err.is_resource_not_found_exception() {
                Classified::NotFound(fe.to_string())
            } else if err.is_too_many_requests_exception() || THROTTLES.contains(&code.as_str()) {
                Classified::Attempt(Outcome::Throttled, fe)
            } else if is_server_error(&code, &detail) {
                Classified::Attempt(Outcome::Crashed, fe)
            } else {
                Classified::Attempt(Outcome::FunctionError, fe)
            }
        }
        SdkError::TimeoutError(_) => {
            Classified::Attempt(Outcome::Timeout, FunctionError::new("Peerless.ClientTimeout", detail))
        }
        // Connection refused or lost, unparseable answer: the endpoint may be back later.
        _ => Classified::Attempt(Outcome::Crashed, FunctionError::new("Peerless.Dispatch", detail)),
    }
}

/// Whether a service error is the server's fault (5xx), by code or by the status in its text.
fn is_server_error(code: &str, detail: &str) -> bool {
    matches!(code, "ServiceException" | "InternalFailure" | "ServiceUnavailable" | "Unhandled")
        || code.starts_with("EC2Unexpected")
        || code.starts_with("EFS")
        || ["status: 500", "status: 502", "status: 503", "status: 504", "500 Internal"]
            .iter()
            .any(|s| detail.contains(s))
}

impl Invoker for AwsLambda {
    fn invoke<'a>(&'a self, function: &'a str, payload: Value, ctx: InvokeCtx) -> InvokeFuture<'a> {
        Box::pin(self.invoke_with_retries(function, payload, ctx, self.inner.config.max_retries))
    }

    fn ledger(&self) -> Vec<InvocationRecord> {
        self.inner.ledger.snapshot()
    }

    fn summary(&self) -> Summary {
        self.counters().summary()
    }

    fn totals(&self) -> Summary {
        self.counters().totals()
    }

    fn write_run_metrics(&self, dir: &Path) -> std::io::Result<Summary> {
        // Under the counters' lock, so the summary counts exactly the ledger's records.
        let c = self.counters();
        let summary = c.summary();
        metrics::write_run_metrics(dir, &summary, &self.inner.ledger)?;
        Ok(summary)
    }

    fn stream_ledger(&self, path: &Path) -> std::io::Result<()> {
        self.inner.ledger.stream_to(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_errors_map_to_the_runtimes_outcomes() {
        let o = |t: &str, m: &str| function_error_outcome(&FunctionError::new(t, m));
        assert_eq!(o("Runtime.ExitError", "RequestId: x Error: exit status 3"), Outcome::Crashed);
        assert_eq!(o("Sandbox.Timedout", "Task timed out after 10 ms"), Outcome::Timeout);
        assert_eq!(o("Unhandled", "2024 … Task timed out after 3.00 seconds"), Outcome::Timeout);
        assert_eq!(o("Runtime.OutOfMemory", "signal: killed"), Outcome::OutOfMemory);
        assert_eq!(o("Peerless.BadInput", "indices: empty"), Outcome::FunctionError);
        assert_eq!(o("Peerless.Fail", "requested failure"), Outcome::FunctionError);
    }

    #[tokio::test]
    async fn needs_credentials_for_aws_itself_but_not_for_a_local_endpoint() {
        let mut cfg = Config { backend: super::super::config::Service::AwsLambda, ..Config::for_test() };
        cfg.aws.endpoint_url = "http://127.0.0.1:9".into();
        let l = AwsLambda::with_credentials(cfg.clone(), AwsCredentials::placeholder(), 1).unwrap();
        assert_eq!(l.target("gradient"), "gradient");
        cfg.aws.function_name = "arn:aws:lambda:us-east-1:000000000000:function:peerless".into();
        let l = AwsLambda::with_credentials(cfg, AwsCredentials::placeholder(), 1).unwrap();
        assert_eq!(l.target("gradient"), "arn:aws:lambda:us-east-1:000000000000:function:peerless");
        assert!(!format!("{:?}", AwsCredentials::placeholder()).contains("secret"));
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_a_retried_crash_billed_as_measured() {
        let mut cfg = Config { backend: super::super::config::Service::AwsLambda, ..Config::for_test() };
        // Port 9 (discard) on loopback: nothing listens, the connection is refused.
        cfg.aws.endpoint_url = "http://127.0.0.1:9".into();
        cfg.max_retries = 1;
        let l = AwsLambda::with_credentials(cfg, AwsCredentials::placeholder(), 1).unwrap();
        let inv = l.invoke("echo", serde_json::json!({"x": 1}), InvokeCtx::new("t", 0, 0)).await.unwrap();
        assert_eq!(inv.outcome, Outcome::Crashed);
        assert_eq!(inv.attempts.len(), 2);
        assert_eq!(inv.error.unwrap().error_type, "Peerless.Dispatch");
        let s = l.summary();
        assert_eq!((s.invocations, s.crashes, s.retries), (2, 2, 1));
    }
}
