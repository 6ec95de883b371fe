//! A function service's client: the [`Invoker`] of a node whose instances live in a separate
//! `peerless function-service` process, so that they outlive a restart of the node.
//!
//! The service runs a [`LocalRuntime`](super::LocalRuntime) behind its Invoke API
//! ([`InvokeApi`](super::InvokeApi)); this client sends it one request per attempt, each with
//! `X-Peerless-Attempt` (node, round, batch, attempt number), and retries retryable outcomes
//! on its side with the runtime's seeded backoff ([`retry`](super::retry)). The service answers
//! each attempt as its runtime counted it ([`Attempted`]), so the node's ledger, counters,
//! billing and peak memory are what an in-process runtime with the same seed would have
//! recorded, fault plans and request ids included.
//!
//! A service that cannot be reached, or does not answer within the attempt's longest possible
//! time (init timeout + timeout + a margin), is a crashed (or timed-out) attempt, retried like
//! any other; it is not billed, since nothing ran that this node knows of. Dropping an
//! invocation future closes its connection; the service lets the attempt run to its end and
//! keeps its instance warm.
//!
//! A connection whose exchange completed is kept for the next attempt (up to the runtime's
//! concurrency): a new loopback connection per attempt cost both processes a connect, an
//! accept, a new connection task and a close every round.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use peerless_core::function::{InvocationRecord, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::api::FunctionError;
use super::config::Config;
use super::invoke::{Attempted, Invocation, InvokeCtx, InvokeError, InvokeFuture, Invoker};
use super::metrics::{self, Counters, Ledger, Summary};
use super::report::{base64_decode, base64_encode};
use super::retry;
use crate::config_error::ConfigError;

/// The request header naming the one attempt a peerless client asks a function service for.
pub(crate) const ATTEMPT_HEADER: &str = "x-peerless-attempt";

/// How much longer than an attempt's longest possible time the client waits, ms.
const ANSWER_MARGIN_MS: u64 = 5_000;

/// Which attempt of whose invocation a request is (`X-Peerless-Attempt`, base64 JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AttemptOf {
    pub node: String,
    pub round: u64,
    pub batch: u32,
    pub attempt: u32,
}

impl AttemptOf {
    /// The header value.
    pub fn encode(&self) -> String {
        base64_encode(&serde_json::to_vec(self).expect("invariant: an attempt id serializes"))
    }

    /// From a header value; `None` when it is not one.
    pub fn decode(value: &str) -> Option<AttemptOf> {
        serde_json::from_slice(&base64_decode(value)?).ok()
    }
}

#[derive(Debug)]
struct Inner {
    addr: SocketAddr,
    config: Config,
    seed: u64,
    ledger: Ledger,
    counters: Mutex<Counters>,
    /// Connections whose last exchange completed, ready for the next attempt.
    idle: Mutex<Vec<Conn>>,
}

/// An HTTP/1.1 connection to the service. Dropping it closes it (its task is aborted), so an
/// attempt dropped mid-exchange closes its connection as before.
#[derive(Debug)]
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The client of a function service at `config.service_addr`. Cheap to clone; clones share
/// the ledger and the counters. [`Invoker::shutdown`] leaves the service and its instances
/// alone: they belong to whoever started the service.
#[derive(Debug, Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

impl Remote {
    /// A client of the service at `config.service_addr`; `seed` drives the retries' backoff
    /// (the service's runtime must be seeded alike for the fault plans to match). Validates
    /// `config`. Nothing is connected yet.
    pub fn start(config: Config, seed: u64) -> Result<Remote, ConfigError> {
        config.validate()?;
        let addr = config.service_addr.parse().map_err(|_| ConfigError::Invalid {
            key: "function.service_addr".into(),
            value: config.service_addr.clone(),
            reason: "must be an IP address and port".into(),
        })?;
        tracing::info!(%addr, seed, "invoking through the function service");
        Ok(Remote {
            inner: Arc::new(Inner {
                addr,
                config,
                seed,
                ledger: Ledger::default(),
                counters: Mutex::new(Counters::default()),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.inner.counters.lock().unwrap_or_else(|e| e.into_inner())
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
        let body = Bytes::from(retry::request_body(function, &payload)?);
        let (config, seed) = (&self.inner.config, self.inner.seed);
        retry::with_retries(config, seed, function, &ctx, max_retries, |attempt| {
            self.attempt(function, &body, &ctx, attempt)
        })
        .await
    }

    /// One attempt: one request; its record is in `attempts[0]` of the result.
    async fn attempt(
        &self,
        function: &str,
        body: &Bytes,
        ctx: &InvokeCtx,
        attempt: u32,
    ) -> Result<Invocation, InvokeError> {
        let id = AttemptOf { node: ctx.node.clone(), round: ctx.round, batch: ctx.batch, attempt };
        let cfg = &self.inner.config;
        let longest = cfg.init_timeout_ms + cfg.timeout_ms + cfg.faults.slow_cold_start_ms + ANSWER_MARGIN_MS;
        let started = Instant::now();
        let sent = tokio::time::timeout(Duration::from_millis(longest), self.post(function, body, &id)).await;
        let done = match sent {
            Ok(Ok((StatusCode::OK, bytes))) => serde_json::from_slice::<Attempted>(&bytes)
                .map_err(|e| format!("the function service's answer does not decode: {e}")),
            Ok(Ok((status, bytes))) => {
                // The service refused the request as a whole (it could not start an instance,
                // or it is shutting down): nothing to retry.
                let why = String::from_utf8_lossy(&bytes).into_owned();
                return Err(InvokeError::Spawn {
                    function: function.to_owned(),
                    reason: format!("function service at {}: {status}: {why}", self.inner.addr),
                });
            }
            Ok(Err(why)) => Err(why),
            Err(_) => {
                let waited = started.elapsed().as_millis();
                return Ok(self.unanswered(
                    function,
                    &id,
                    Outcome::Timeout,
                    format!("no answer in {waited} ms"),
                ));
            }
        };
        Ok(match done {
            Ok(a) => self.record(a),
            Err(why) => self.unanswered(function, &id, Outcome::Crashed, why),
        })
    }

    /// Counts the attempt the service ran, and returns its invocation.
    fn record(&self, a: Attempted) -> Invocation {
        let mut c = self.counters();
        for rec in &a.invocation.attempts {
            c.record(rec, a.latency_us, a.injected);
            self.inner.ledger.push(rec.clone());
        }
        a.invocation
    }

    /// Records an attempt the service never answered (`outcome`, unbilled) and returns it.
    fn unanswered(&self, function: &str, id: &AttemptOf, outcome: Outcome, why: String) -> Invocation {
        tracing::warn!(function, addr = %self.inner.addr, %why, "the function service did not answer");
        let request_id = format!("service-{}-{}-{}-{}", id.node, id.round, id.batch, id.attempt);
        let rec = InvocationRecord {
            function: function.to_owned(),
            request_id: request_id.clone(),
            node: id.node.clone(),
            round: id.round,
            batch: id.batch,
            attempt: id.attempt,
            memory_mb: self.inner.config.memory_mb,
            billed_ms: 0,
            cold_start: false,
            init_us: 0,
            outcome,
            cost_pico: 0,
            max_memory_mb: 0,
        };
        let error = FunctionError::new("Peerless.Dispatch", why);
        let inv = Invocation {
            outcome,
            response: None,
            error: Some(error),
            request_id,
            attempts: vec![rec],
            pid: None,
            duration_us: 0,
        };
        self.record(Attempted { invocation: inv, latency_us: None, injected: false })
    }

    /// Sends one attempt's request on an idle connection or a new one; the status and body of
    /// the answer, or why there is none. Cancel-safe: dropping it closes the connection.
    async fn post(
        &self,
        function: &str,
        body: &Bytes,
        id: &AttemptOf,
    ) -> Result<(StatusCode, Bytes), String> {
        let addr = self.inner.addr;
        let mut conn = match self.idle_conn().await {
            Some(c) => c,
            None => self.connect().await?,
        };
        let path = format!("/2015-03-31/functions/{}/invocations", path_segment(function));
        let req = Request::post(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .header(ATTEMPT_HEADER, id.encode())
            .body(Full::new(body.clone()))
            .map_err(|e| format!("building the request: {e}"))?;
        let resp =
            conn.sender.send_request(req).await.map_err(|e| format!("function service at {addr}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("function service at {addr}: {e}"))?
            .to_bytes();
        self.keep(conn);
        Ok((status, bytes))
    }

    /// An idle connection still open, if there is one; closed ones are dropped.
    async fn idle_conn(&self) -> Option<Conn> {
        loop {
            let mut c = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            // Ready at once unless its task has yet to see the end of the last answer.
            if !c.sender.is_closed() && c.sender.ready().await.is_ok() {
                return Some(c);
            }
        }
    }

    /// Keeps `conn` for a later attempt, unless enough are kept or it is closing.
    fn keep(&self, conn: Conn) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !conn.sender.is_closed() && idle.len() < self.inner.config.concurrency as usize {
            idle.push(conn);
        }
    }

    /// A new connection to the service, its task driving it.
    async fn connect(&self) -> Result<Conn, String> {
        let addr = self.inner.addr;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to the function service at {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("function service at {addr}: {e}"))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "function service connection closed");
            }
        });
        Ok(Conn { sender, task })
    }
}

/// `name` as one URL path segment: unreserved characters kept, the rest `%XX`-escaped.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Invoker for Remote {
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

    fn write_run_metrics(&self, dir: &std::path::Path) -> std::io::Result<Summary> {
        // Under the counters' lock, so the summary counts exactly the ledger's records.
        let c = self.counters();
        let summary = c.summary();
        metrics::write_run_metrics(dir, &summary, &self.inner.ledger)?;
        Ok(summary)
    }

    fn stream_ledger(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.ledger.stream_to(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_ids_round_trip_through_the_header() {
        let id = AttemptOf { node: "peer1-warm-up".into(), round: 7, batch: 2, attempt: 1 };
        let v = id.encode();
        assert!(header::HeaderValue::from_str(&v).is_ok());
        assert_eq!(AttemptOf::decode(&v), Some(id));
        assert_eq!(AttemptOf::decode("not base64!"), None);
    }

    #[tokio::test]
    async fn an_unreachable_service_is_a_retried_unbilled_crash() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused.
        let cfg = Config { service_addr: "127.0.0.1:9".into(), max_retries: 1, ..Config::for_test() };
        let r = Remote::start(cfg, 1).unwrap();
        let inv = r.invoke("echo", serde_json::json!({"x": 1}), InvokeCtx::new("t", 0, 0)).await.unwrap();
        assert_eq!(inv.outcome, Outcome::Crashed);
        assert_eq!(inv.attempts.len(), 2);
        assert!(inv.attempts.iter().all(|a| a.billed_ms == 0 && a.cost_pico == 0));
        assert_eq!(inv.error.unwrap().error_type, "Peerless.Dispatch");
        let s = r.summary();
        assert_eq!((s.invocations, s.crashes, s.retries), (2, 2, 1));
    }

    /// A service that refuses every request (503), on connections it keeps open unless
    /// `close`; returns its address and how many connections it accepted.
    async fn refusing_service(close: bool) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One whole request: headers, then `content-length` bytes of body.
                        let whole = buf.windows(4).position(|w| w == b"\r\n\r\n").and_then(|end| {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            (buf.len() >= end + 4 + len).then_some(end + 4 + len)
                        });
                        let Some(n) = whole else {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        buf.drain(..n);
                        let conn = if close { "connection: close\r\n" } else { "" };
                        let answer = format!(
                            "HTTP/1.1 503 Service Unavailable\r\n{conn}content-length: 4\r\n\r\nbusy"
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn attempts_share_a_connection_the_service_keeps_open_and_open_another_when_it_closes() {
        for (close, connections) in [(false, 1), (true, 3)] {
            let (addr, accepted) = refusing_service(close).await;
            let cfg = Config { service_addr: addr.to_string(), ..Config::for_test() };
            let r = Remote::start(cfg, 1).unwrap();
            for round in 0..3 {
                let e =
                    r.invoke("echo", serde_json::json!({}), InvokeCtx::new("t", round, 0)).await.unwrap_err();
                assert!(e.to_string().contains("503") && e.to_string().contains("busy"), "{e}");
            }
            let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(
                n, connections,
                "connections for three attempts when the service closes them: {close}"
            );
        }
    }
}
