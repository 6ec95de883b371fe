//! The function side: a Lambda custom runtime that dispatches to handlers by function name.
//!
//! [`serve`] is an instance's main loop. It uses the `lambda_runtime` crate, so the same
//! binary runs unchanged as an AWS Lambda custom runtime (`bootstrap`): it reads
//! `AWS_LAMBDA_RUNTIME_API`, `AWS_LAMBDA_FUNCTION_NAME`, `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`,
//! `AWS_LAMBDA_FUNCTION_VERSION` (required) and `AWS_LAMBDA_LOG_STREAM_NAME` /
//! `AWS_LAMBDA_LOG_GROUP_NAME` from the environment, as Lambda sets them (this is the one
//! place a library reads the environment: it is the Lambda contract). The handler is the one
//! named by `_HANDLER` (the function's Handler setting, which Lambda passes to custom
//! runtimes: one `peerless` deployment can serve `gradient` under any function name), else by
//! `AWS_LAMBDA_FUNCTION_NAME`; when neither names a handler, the error is reported through
//! `POST /runtime/init/error` (`Runtime.HandlerNotFound`) before exiting.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// An error a handler returns: reported through `POST …/error` as
/// `{"errorType": …, "errorMessage": …}`; the invoker sees `Outcome::FunctionError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct HandlerError {
    /// Error type, e.g. `Peerless.BadInput`.
    pub error_type: String,
    /// Message.
    pub message: String,
}

impl HandlerError {
    /// An error of this type.
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        HandlerError { error_type: error_type.into(), message: message.into() }
    }

    /// `Peerless.BadInput`: the payload is not what the handler expects.
    pub fn bad_input(message: impl Into<String>) -> Self {
        HandlerError::new("Peerless.BadInput", message)
    }
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(e: HandlerError) -> Self {
        lambda_runtime::Diagnostic { error_type: e.error_type, error_message: e.message }
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;
type HandlerFn = Arc<dyn Fn(Value) -> HandlerFuture + Send + Sync>;

/// Handlers by function name. Cloning shares them.
#[derive(Clone, Default)]
pub struct Handlers {
    map: BTreeMap<String, HandlerFn>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").field("names", &self.names()).finish()
    }
}

impl Handlers {
    /// No handlers.
    pub fn new() -> Self {
        Handlers::default()
    }

    /// Registers `f` under `name` (replacing any handler of that name):
    /// `Handlers::builtin().with("gradient", |v| async move { … })`.
    pub fn with<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.map.insert(name.to_owned(), Arc::new(move |v| Box::pin(f(v)) as HandlerFuture));
        self
    }

    /// The built-in handlers, used by tests and benchmarks:
    /// - `echo`: returns its input;
    /// - `sleep` `{"ms": n}`: sleeps n ms, returns `{"slept_ms": n}`;
    /// - `crash` `{"after_ms": n}` (optional): exits the process abruptly (status 3);
    /// - `alloc` `{"mb": n, "hold_ms": h}`: allocates and touches n MB, holds it h ms
    ///   (default 1000), returns `{"mb": n, "pages": touched, "vm_hwm_kb": its own VmHWM}`;
    /// - `fail` `{"message": s}` (optional): returns a function error (`Peerless.Fail`);
    /// - `crash_once` `{"marker": path, …}`: if `path` does not exist, creates it and exits
    ///   abruptly; otherwise returns its input (so the first attempt crashes, the retry works);
    /// - `big` `{"bytes": n}`: returns a JSON string of n bytes (response-size tests);
    /// - `whoami`: returns the instance's pid and the Lambda environment it was given
    ///   (`runtime_api`, `function`, `memory_mb`, `version`, `log_group`, `log_stream`,
    ///   `openblas_threads`).
    pub fn builtin() -> Self {
        Handlers::new()
            .with("echo", |v| async move { Ok(v) })
            .with("sleep", |v| async move {
                let ms = field_u64(&v, "ms")?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(json!({ "slept_ms": ms }))
            })
            .with("crash", |v| async move {
                if let Some(ms) = v.get("after_ms").and_then(Value::as_u64) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                tracing::warn!("crash handler: exiting abruptly");
                std::process::exit(3)
            })
            .with("alloc", |v| async move {
                let mb = field_u64(&v, "mb")?;
                let hold = v.get("hold_ms").and_then(Value::as_u64).unwrap_or(1000);
                let len = usize::try_from(mb.saturating_mul(1 << 20))
                    .map_err(|_| HandlerError::bad_input("mb does not fit in memory"))?;
                let mut buf = vec![0u8; len];
                // Touch every page so the memory is resident, not just reserved.
                for i in (0..len).step_by(4096) {
                    buf[i] = 1;
                }
                std::hint::black_box(&buf);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                let touched = buf.iter().step_by(4096).filter(|b| **b == 1).count();
                // The instance's own peak, for checking the runtime's "Max Memory Used".
                let hwm = super::instance::peak_rss_kb(std::process::id());
                Ok(json!({ "mb": mb, "pages": touched, "vm_hwm_kb": hwm }))
            })
            .with("fail", |v| async move {
                let msg = v.get("message").and_then(Value::as_str).unwrap_or("requested failure");
                Err(HandlerError::new("Peerless.Fail", msg))
            })
            .with("crash_once", |v| async move {
                let marker = v
                    .get("marker")
                    .and_then(Value::as_str)
                    .ok_or_else(|| HandlerError::bad_input("expected {\"marker\": path}"))?;
                match std::fs::OpenOptions::new().write(true).create_new(true).open(marker) {
                    Ok(_) => {
                        tracing::warn!(marker, "crash_once: first call, exiting abruptly");
                        std::process::exit(3)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(v),
                    Err(e) => Err(HandlerError::new("Peerless.Io", format!("{marker}: {e}"))),
                }
            })
            .with("big", |v| async move {
                let n = usize::try_from(field_u64(&v, "bytes")?)
                    .map_err(|_| HandlerError::bad_input("bytes does not fit in memory"))?;
                Ok(Value::String("x".repeat(n)))
            })
            .with("whoami", |_| async move {
                let env = |k: &str| std::env::var(k).ok();
                Ok(json!({
                    "pid": std::process::id(),
                    "runtime_api": env("AWS_LAMBDA_RUNTIME_API"),
                    "function": env("AWS_LAMBDA_FUNCTION_NAME"),
                    "memory_mb": env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
                    "version": env("AWS_LAMBDA_FUNCTION_VERSION"),
                    "log_group": env("AWS_LAMBDA_LOG_GROUP_NAME"),
                    "log_stream": env("AWS_LAMBDA_LOG_STREAM_NAME"),
                    "openblas_threads": env("OPENBLAS_NUM_THREADS"),
                }))
            })
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Calls the handler `name` directly, in this process (for tests and benchmarks).
    pub async fn call(&self, name: &str, payload: Value) -> Result<Value, HandlerError> {
        match self.map.get(name) {
            Some(f) => f(payload).await,
            None => Err(HandlerError::new("Runtime.HandlerNotFound", format!("no handler named {name:?}"))),
        }
    }
}

fn field_u64(v: &Value, key: &str) -> Result<u64, HandlerError> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| HandlerError::bad_input(format!("expected {{\"{key}\": <u64>}}")))
}

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A required Lambda environment variable is missing or malformed.
    #[error("{0} is not set (or not valid); this is run by a Lambda runtime, not by hand")]
    Env(&'static str),
    /// No handler is registered under `AWS_LAMBDA_FUNCTION_NAME`.
    #[error("no handler for function {name:?} (known: {known})")]
    UnknownFunction {
        /// The name.
        name: String,
        /// The registered names.
        known: String,
    },
    /// The runtime loop failed (the Runtime API went away, …).
    #[error("runtime loop: {0}")]
    Runtime(String),
}

/// The handler an instance serves: `_HANDLER` when it names one (Lambda's Handler setting; a
/// custom runtime deployed with e.g. Handler `bootstrap` falls through), else the function name.
fn handler_name(handlers: &Handlers, handler: Option<&str>, function: &str) -> String {
    match handler {
        Some(h) if handlers.contains(h) => h.to_owned(),
        _ => function.to_owned(),
    }
}

/// Runs this process as a function instance: polls the Runtime API for events, dispatches each
/// to the handler named by `AWS_LAMBDA_FUNCTION_NAME`, posts its answer; returns only on error.
pub async fn serve(handlers: Handlers) -> Result<(), ServeError> {
    let api =
        std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| ServeError::Env("AWS_LAMBDA_RUNTIME_API"))?;
    let function =
        std::env::var("AWS_LAMBDA_FUNCTION_NAME").map_err(|_| ServeError::Env("AWS_LAMBDA_FUNCTION_NAME"))?;
    let handler = std::env::var("_HANDLER").ok();
    let name = handler_name(&handlers, handler.as_deref(), &function);
    // `lambda_runtime::Config::from_env` panics on these; check them first.
    std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        .ok()
        .and_then(|m| m.parse::<i32>().ok())
        .ok_or(ServeError::Env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"))?;
    std::env::var("AWS_LAMBDA_FUNCTION_VERSION")
        .map_err(|_| ServeError::Env("AWS_LAMBDA_FUNCTION_VERSION"))?;
    if !handlers.contains(&name) {
        let err = ServeError::UnknownFunction { name: name.clone(), known: handlers.names().join(", ") };
        let body = json!({ "errorType": "Runtime.HandlerNotFound", "errorMessage": err.to_string() });
        if let Err(e) = post_init_error(&api, &body).await {
            tracing::warn!(cause = %e, "could not report the init error");
        }
        return Err(err);
    }
    let handlers = Arc::new(handlers);
    let service = lambda_runtime::service_fn(move |event: lambda_runtime::LambdaEvent<Value>| {
        let handlers = handlers.clone();
        let name = name.clone();
        async move { handlers.call(&name, event.payload).await }
    });
    lambda_runtime::run(service).await.map_err(|e| ServeError::Runtime(e.to_string()))
}

/// `POST /2018-06-01/runtime/init/error` with `body` (lambda_runtime does not expose it).
async fn post_init_error(api: &str, body: &Value) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(api).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("http://{api}/2018-06-01/runtime/init/error"))
        .header(hyper::header::HOST, api)
        .header("lambda-runtime-function-error-type", "Runtime.HandlerNotFound")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() { Ok(()) } else { Err(format!("runtime API answered {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builtins_answer_directly() {
        let h = Handlers::builtin();
        assert_eq!(h.call("echo", json!({"a": 1})).await.unwrap(), json!({"a": 1}));
        assert_eq!(h.call("sleep", json!({"ms": 1})).await.unwrap(), json!({"slept_ms": 1}));
        assert_eq!(h.call("fail", json!({})).await.unwrap_err().error_type, "Peerless.Fail");
        assert_eq!(h.call("sleep", json!({})).await.unwrap_err().error_type, "Peerless.BadInput");
        assert_eq!(h.call("nope", json!({})).await.unwrap_err().error_type, "Runtime.HandlerNotFound");
        assert_eq!(h.call("alloc", json!({"mb": 1, "hold_ms": 0})).await.unwrap()["pages"], json!(256));
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("m");
        std::fs::write(&marker, b"").unwrap();
        let p = json!({"marker": marker.to_str().unwrap(), "x": 2});
        assert_eq!(h.call("crash_once", p.clone()).await.unwrap(), p);
        assert_eq!(handler_name(&h, Some("echo"), "peerless"), "echo", "the Handler setting wins");
        assert_eq!(handler_name(&h, Some("bootstrap"), "sleep"), "sleep");
        assert_eq!(handler_name(&h, None, "sleep"), "sleep");
        let custom =
            Handlers::new().with("double", |v| async move { Ok(json!(v.as_u64().unwrap_or(0) * 2)) });
        assert_eq!(custom.call("double", json!(21)).await.unwrap(), json!(42));
        assert_eq!(custom.names(), vec!["double".to_owned()]);
    }
}
