//! AWS's Invoke API on a loopback port, in front of a [`LocalRuntime`].
//!
//! `POST /2015-03-31/functions/{name}/invocations` with the payload as body answers like AWS:
//! 200 with the function's result; 200 with `X-Amz-Function-Error: Unhandled` and the error
//! document when the function failed, crashed, timed out or ran out of memory; 429
//! `TooManyRequestsException` when throttled; 413 `RequestEntityTooLargeException` over 6 MB.
//! `X-Amz-Invocation-Type: Event` answers 202 at once and runs the invocation (with the
//! runtime's retries) in the background; `DryRun` answers 204. Synchronous invocations are
//! not retried, as on AWS. `X-Amz-Log-Type: Tail` adds `X-Amz-Log-Result`: the base64
//! `REPORT` line ([`Report`](super::report::Report)) with the duration, billed duration, memory, max memory used and
//! (after a cold start) init duration the local ledger recorded. So `peerless invoke` and the AWS SDK (with
//! `endpoint_url`) can call local functions, and bill them as the local runtime does.
//!
//! One extension, for peerless's own client ([`Remote`](super::remote::Remote)), which
//! retries on its side: a request with `X-Peerless-Attempt` (the invoking node, round, batch
//! and attempt number) runs that one attempt as the runtime would for that caller (same fault
//! plan, same request id stream) and is answered 200 with the attempt as the runtime counted
//! it ([`Attempted`](super::invoke::Attempted): outcome, answer or error document, ledger
//! record, latency, injected fault), whatever its outcome.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use peerless_core::function::{Outcome, SYNC_PAYLOAD_LIMIT};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::invoke::{Invocation, InvokeCtx, Invoker, LocalRuntime};
use super::remote::{ATTEMPT_HEADER, AttemptOf};

/// A running Invoke API server. Dropping it stops the server (not the runtime).
#[derive(Debug)]
pub struct InvokeApi {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    runtime: LocalRuntime,
    seq: AtomicU32,
}

impl InvokeApi {
    /// Serves `runtime` on `addr` (use port 0 for any free port, e.g. `127.0.0.1:0`).
    pub async fn bind(runtime: LocalRuntime, addr: SocketAddr) -> std::io::Result<InvokeApi> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { runtime, seq: AtomicU32::new(0) });
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = state.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(InvokeApi { addr, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for InvokeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: Bytes, headers: &[(&'static str, String)]) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    for (k, v) in headers {
        if let Ok(v) = header::HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

/// An AWS service error (`x-amzn-ErrorType` + `{"Type", "message"}`).
fn service_error(status: StatusCode, kind: &str, message: &str) -> Resp {
    let body = json!({ "Type": "User", "message": message });
    respond(status, Bytes::from(body.to_string()), &[("x-amzn-errortype", kind.to_owned())])
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    Ok(match Call::read(req).await {
        Ok(call) => call.run(&state).await,
        Err(refused) => refused.response(),
    })
}

/// A request refused before any invocation: the AWS service error to answer with.
struct Refused {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl Refused {
    /// A refusal with `status`, the error type `kind` and `message`.
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Refused {
        Refused { status, kind, message: message.into() }
    }

    /// The answer.
    fn response(&self) -> Resp {
        service_error(self.status, self.kind, &self.message)
    }
}

/// An Invoke API request, read: the function, the invocation type, the log type, the payload.
struct Call {
    name: String,
    /// `X-Amz-Invocation-Type`: `RequestResponse` unless given.
    kind: String,
    /// `X-Amz-Log-Type: Tail`.
    tail: bool,
    /// `X-Peerless-Attempt`: one attempt for peerless's own client.
    attempt: Option<AttemptOf>,
    payload: Value,
}

impl Call {
    /// Reads `req`; `Err` when it cannot be served.
    async fn read(req: Request<Incoming>) -> Result<Call, Refused> {
        let name = function_name(&req)?;
        let header = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
        let tail = header("x-amz-log-type").is_some_and(|v| v.eq_ignore_ascii_case("Tail"));
        let kind = header("x-amz-invocation-type").unwrap_or("RequestResponse").to_owned();
        let attempt = match header(ATTEMPT_HEADER) {
            Some(v) => Some(AttemptOf::decode(v).ok_or_else(|| {
                Refused::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterValueException",
                    "bad X-Peerless-Attempt",
                )
            })?),
            None => None,
        };
        let payload = payload(req.into_body()).await?;
        Ok(Call { name, kind, tail, attempt, payload })
    }

    /// Serves the call on `state`'s runtime, per its invocation type.
    async fn run(self, state: &State) -> Resp {
        let Call { name, kind, tail, attempt, payload } = self;
        if let Some(a) = attempt {
            return one_attempt(state, name, payload, a).await;
        }
        let ctx = InvokeCtx::new("invoke-api", 0, state.seq.fetch_add(1, Ordering::Relaxed));
        match kind.as_str() {
            "DryRun" => respond(StatusCode::NO_CONTENT, Bytes::new(), &[]),
            "Event" => {
                let rt = state.runtime.clone();
                tokio::spawn(async move {
                    if let Err(e) = rt.invoke(&name, payload, ctx).await {
                        tracing::warn!(function = %name, cause = %e, "asynchronous invocation failed");
                    }
                });
                respond(StatusCode::ACCEPTED, Bytes::new(), &[])
            }
            "RequestResponse" => match state.runtime.invoke_with_retries(&name, payload, ctx, 0).await {
                Ok(inv) => answer(inv, tail),
                Err(e) => {
                    service_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string())
                }
            },
            other => service_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterValueException",
                &format!("unknown X-Amz-Invocation-Type {other:?}"),
            ),
        }
    }
}

/// Runs attempt `a` of invoking `name` for peerless's own client; answers it whole. The attempt
/// runs in a task of its own, to its end even when the client goes away (a node killed
/// mid-round): its instance then goes back to the pool warm instead of being killed with a
/// cancelled attempt.
async fn one_attempt(state: &State, name: String, payload: Value, a: AttemptOf) -> Resp {
    let runtime = state.runtime.clone();
    let ctx = InvokeCtx::new(a.node, a.round, a.batch);
    let task = tokio::spawn(async move { runtime.serve_attempt(&name, &payload, &ctx, a.attempt).await });
    match task.await {
        Ok(Ok(done)) => {
            let body = serde_json::to_vec(&done).expect("invariant: an attempt serializes");
            let id = ("x-amzn-requestid", done.invocation.request_id.clone());
            respond(StatusCode::OK, Bytes::from(body), &[id])
        }
        Ok(Err(e @ super::InvokeError::RequestTooLarge { .. })) => {
            service_error(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLargeException", &e.to_string())
        }
        Ok(Err(e)) => service_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string()),
        Err(e) => service_error(StatusCode::INTERNAL_SERVER_ERROR, "ServiceException", &e.to_string()),
    }
}

/// The function `req` invokes (its name, from a name, an ARN or a partial ARN); `Err` for an
/// unknown operation.
fn function_name(req: &Request<Incoming>) -> Result<String, Refused> {
    let path = req.uri().path();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let name = match parts.as_slice() {
        ["2015-03-31", "functions", name, "invocations"] => (*name).to_owned(),
        _ => {
            return Err(Refused::new(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "unknown operation",
            ));
        }
    };
    if req.method() != Method::POST {
        return Err(Refused::new(StatusCode::METHOD_NOT_ALLOWED, "UnknownOperationException", "use POST"));
    }
    // The SDK sends ARNs or partial ARNs too (percent-encoded): keep the function name, the
    // component after `function:` (or the last one).
    let name = crate::percent::decode(&name);
    Ok(match name.split_once(":function:") {
        Some((_, rest)) => rest.split(':').next().unwrap_or(rest).to_owned(),
        None => name.rsplit(':').next().unwrap_or(&name).to_owned(),
    })
}

/// The JSON payload of a request body (`null` when blank); `Err` when it is too large or not
/// JSON.
async fn payload(body: Incoming) -> Result<Value, Refused> {
    let body = match Limited::new(body, SYNC_PAYLOAD_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(Refused::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLargeException",
                "Request must be smaller than 6291456 bytes for the InvokeFunction operation",
            ));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice::<Value>(&body).map_err(|e| {
        Refused::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContentException",
            format!("Could not parse request body into json: {e}"),
        )
    })
}

/// AWS's answer to a synchronous invocation that ended as `inv`; with `tail`, the `REPORT`
/// line in `X-Amz-Log-Result`.
fn answer(inv: Invocation, tail: bool) -> Resp {
    let id = ("x-amzn-requestid", inv.request_id.clone());
    let version = ("x-amz-executed-version", "$LATEST".to_owned());
    let mut headers = vec![id, version];
    if let (true, Some(rec)) = (tail, inv.last()) {
        let line = super::invoke::report_line(rec, inv.duration_us);
        headers.push(("x-amz-log-result", super::report::base64_encode(line.as_bytes())));
    }
    match (inv.outcome, inv.response, inv.error) {
        (Outcome::Ok, Some(v), _) => respond(StatusCode::OK, Bytes::from(v.to_string()), &headers),
        (Outcome::Throttled, _, _) => {
            service_error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequestsException", "Rate Exceeded.")
        }
        (_, _, err) => {
            let err = err.unwrap_or_else(|| super::FunctionError::new("Unhandled", "no answer"));
            headers.push(("x-amz-function-error", "Unhandled".to_owned()));
            respond(StatusCode::OK, err.to_json(), &headers)
        }
    }
}
