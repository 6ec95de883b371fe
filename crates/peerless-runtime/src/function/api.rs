//! The server side of the Lambda Runtime API: one small HTTP/1 server per function instance.
//!
//! The instance long-polls `GET /2018-06-01/runtime/invocation/next` and answers through
//! `POST …/invocation/{id}/response` or `…/{id}/error`; a failed initialisation reports
//! `POST /2018-06-01/runtime/init/error`. Malformed exchanges (unknown or stale request id,
//! a response over Lambda's 6 MB limit, a body that is not JSON, an unknown path) get
//! Lambda-style JSON error responses (`{"errorMessage": …, "errorType": …}`) and never
//! panic. At most one invocation is in flight per instance, as on Lambda.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use peerless_core::function::SYNC_PAYLOAD_LIMIT;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// The Runtime API's version prefix.
pub const RUNTIME_PREFIX: &str = "/2018-06-01/runtime";

/// Lambda's error document, as runtimes post it and as the Invoke API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionError {
    /// E.g. `Runtime.ExitError`, `Function.ResponseSizeTooLarge`, or the handler's own type.
    #[serde(rename = "errorType", default)]
    pub error_type: String,
    /// Human-readable message.
    #[serde(rename = "errorMessage", default)]
    pub error_message: String,
}

impl FunctionError {
    /// An error of this type with this message.
    pub fn new(error_type: impl Into<String>, error_message: impl Into<String>) -> Self {
        FunctionError { error_type: error_type.into(), error_message: error_message.into() }
    }

    /// As JSON bytes.
    pub fn to_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec()))
    }
}

impl std::fmt::Display for FunctionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.error_message)
    }
}

/// One event handed to the instance by `GET /next`.
#[derive(Debug)]
pub(crate) struct Event {
    pub request_id: String,
    pub deadline_unix_ms: u64,
    pub function_arn: String,
    pub trace_id: String,
    pub body: Bytes,
}

/// How the instance answered an invocation.
#[derive(Debug)]
pub(crate) enum Reply {
    /// `POST …/response` with a JSON body of at most 6 MB.
    Response(Bytes),
    /// `POST …/error`, or a response the API refused (too large, not JSON).
    Error(FunctionError),
}

/// The instance's initialisation state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Status {
    /// Spawned, has not polled yet.
    Starting,
    /// Polled `GET /next` at least once.
    Ready,
    /// Posted `/init/error`.
    InitError(FunctionError),
}

#[derive(Debug)]
struct Pending {
    request_id: String,
    delivered: bool,
    reply: oneshot::Sender<Reply>,
}

#[derive(Debug, Default)]
struct Slot {
    current: Option<Pending>,
    /// The last request id answered, to tell a duplicate answer (403) from an unknown id (400).
    last_done: Option<String>,
}

#[derive(Debug)]
struct State {
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    slot: Mutex<Slot>,
    status: watch::Sender<Status>,
}

impl State {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        // A poisoned lock only means a panic elsewhere while holding it; the slot is still
        // consistent (every update is a single assignment).
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running Runtime API server for one instance. Dropping it stops the server.
#[derive(Debug)]
pub(crate) struct ApiServer {
    addr: SocketAddr,
    state: Arc<State>,
    events: mpsc::Sender<Event>,
    task: JoinHandle<()>,
}

/// Why an event could not be dispatched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DispatchError {
    #[error("an invocation is already in flight on this instance")]
    Busy,
}

impl ApiServer {
    /// Binds 127.0.0.1:0 and serves until dropped. Must be called within a tokio runtime.
    pub async fn bind() -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (events_tx, events_rx) = mpsc::channel(1);
        let (status, _) = watch::channel(Status::Starting);
        let state = Arc::new(State {
            events: tokio::sync::Mutex::new(events_rx),
            slot: Mutex::new(Slot::default()),
            status,
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(ApiServer { addr, state, events: events_tx, task })
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Watches the instance's initialisation state.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.state.status.subscribe()
    }

    /// Queues `event` for the next `GET /next`; the receiver yields the instance's answer.
    pub fn dispatch(&self, event: Event) -> Result<oneshot::Receiver<Reply>, DispatchError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut slot = self.state.slot();
            if slot.current.is_some() {
                return Err(DispatchError::Busy);
            }
            slot.current =
                Some(Pending { request_id: event.request_id.clone(), delivered: false, reply: tx });
        }
        if self.events.try_send(event).is_err() {
            self.state.slot().current = None;
            return Err(DispatchError::Busy);
        }
        Ok(rx)
    }

    /// Forgets the in-flight invocation (after the instance was killed), so a late answer is
    /// refused as unknown.
    pub fn cancel(&self) {
        let mut slot = self.state.slot();
        if let Some(p) = slot.current.take() {
            slot.last_done = Some(p.request_id);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Connections live in this JoinSet so that aborting the accept task aborts them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(cause = %e, "runtime API accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(cause = %e, "runtime API connection ended");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

/// A Lambda-style error response.
fn error(status: StatusCode, error_type: &str, message: impl Into<String>) -> Resp {
    json(status, FunctionError::new(error_type, message).to_json())
}

fn accepted() -> Resp {
    json(StatusCode::ACCEPTED, Bytes::from_static(br#"{"status":"OK"}"#))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(RUNTIME_PREFIX) else {
        return Ok(error(StatusCode::NOT_FOUND, "InvalidPath", format!("no such resource: {path}")));
    };
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    let resp = match (req.method(), parts.as_slice()) {
        (&Method::GET, ["invocation", "next"]) => next(&state).await,
        (&Method::POST, ["invocation", id, "response"]) => {
            let id = (*id).to_owned();
            answer(&state, &id, req, false).await
        }
        (&Method::POST, ["invocation", id, "error"]) => {
            let id = (*id).to_owned();
            answer(&state, &id, req, true).await
        }
        (&Method::POST, ["init", "error"]) => init_error(&state, req).await,
        (_, ["invocation", "next"])
        | (_, ["invocation", _, "response" | "error"])
        | (_, ["init", "error"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{} {path}", req.method()))
        }
        _ => error(StatusCode::NOT_FOUND, "InvalidPath", format!("no such resource: {path}")),
    };
    Ok(resp)
}

async fn next(state: &State) -> Resp {
    state.status.send_if_modified(|s| {
        if *s == Status::Starting {
            *s = Status::Ready;
            true
        } else {
            false
        }
    });
    {
        // Polling again without answering the delivered invocation abandons it.
        let mut slot = state.slot();
        if slot.current.as_ref().is_some_and(|p| p.delivered)
            && let Some(p) = slot.current.take()
        {
            let _ = p.reply.send(Reply::Error(FunctionError::new(
                "Runtime.InvalidStateTransition",
                "the runtime polled /next without answering the current invocation",
            )));
            slot.last_done = Some(p.request_id);
        }
    }
    let event = {
        let mut events = state.events.lock().await;
        events.recv().await
    };
    let Some(ev) = event else {
        // The instance is being shut down (its server dropped): the process is being killed.
        // Like Lambda, never answer `/next` without an event: every answer must carry
        // `Lambda-Runtime-Aws-Request-Id`, and `lambda_runtime` panics on one that does not
        // (`invoke_request_id` expects the header whatever the status). The long poll stays
        // open until the connection goes with the server.
        return std::future::pending().await;
    };
    {
        let mut slot = state.slot();
        match slot.current.as_mut() {
            Some(p) if p.request_id == ev.request_id => p.delivered = true,
            // Cancelled while queued: hand it out anyway; its answer will be refused.
            _ => {}
        }
    }
    let mut r = Response::new(Full::new(ev.body));
    let h = r.headers_mut();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = header::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put("lambda-runtime-aws-request-id", &ev.request_id);
    put("lambda-runtime-deadline-ms", &ev.deadline_unix_ms.to_string());
    put("lambda-runtime-invoked-function-arn", &ev.function_arn);
    put("lambda-runtime-trace-id", &ev.trace_id);
    put("content-type", "application/json");
    r
}

/// `None` if `id` is the delivered in-flight invocation; the error response otherwise.
fn refuse(state: &State, id: &str) -> Option<Resp> {
    let slot = state.slot();
    match &slot.current {
        Some(p) if p.request_id == id && p.delivered => None,
        Some(p) if p.request_id == id => Some(error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            format!("request {id} was not delivered yet"),
        )),
        _ if slot.last_done.as_deref() == Some(id) => Some(error(
            StatusCode::FORBIDDEN,
            "InvalidStateTransition",
            format!("request {id} has already been answered, timed out or was cancelled"),
        )),
        _ => Some(error(StatusCode::BAD_REQUEST, "InvalidRequestID", format!("unknown request id {id}"))),
    }
}

/// Completes the in-flight invocation `id` with `reply`; false if it is no longer in flight.
fn complete(state: &State, id: &str, reply: Reply) -> bool {
    let mut slot = state.slot();
    if slot.current.as_ref().is_some_and(|p| p.request_id == id && p.delivered)
        && let Some(p) = slot.current.take()
    {
        let _ = p.reply.send(reply);
        slot.last_done = Some(p.request_id);
        return true;
    }
    false
}

enum Body {
    Ok(Bytes),
    TooLarge(u64),
    Broken(String),
}

/// Bodies are drained (and discarded) up to this size so that an oversize answer still gets its
/// 413 on a healthy connection instead of a reset; past it the connection is dropped.
const DRAIN_CAP: u64 = 16 * SYNC_PAYLOAD_LIMIT as u64;

async fn read_body(req: Request<Incoming>) -> Body {
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    total += data.len() as u64;
                    if total <= SYNC_PAYLOAD_LIMIT as u64 {
                        buf.extend_from_slice(&data);
                    } else if total > DRAIN_CAP {
                        break;
                    }
                }
            }
            Err(e) => return Body::Broken(e.to_string()),
        }
    }
    if total > SYNC_PAYLOAD_LIMIT as u64 { Body::TooLarge(total) } else { Body::Ok(Bytes::from(buf)) }
}

async fn answer(state: &State, id: &str, req: Request<Incoming>, is_error: bool) -> Resp {
    if let Some(resp) = refuse(state, id) {
        return resp;
    }
    let header_type = error_type_header(&req);
    let body = match read_body(req).await {
        Body::Ok(b) => b,
        Body::TooLarge(n) => {
            let msg = format!(
                "Response payload size ({n} bytes) exceeded maximum allowed payload size ({SYNC_PAYLOAD_LIMIT} bytes)."
            );
            complete(
                state,
                id,
                Reply::Error(FunctionError::new("Function.ResponseSizeTooLarge", msg.clone())),
            );
            return error(StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge", msg);
        }
        Body::Broken(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestBody",
                format!("could not read the body: {e}"),
            );
        }
    };
    let reply = if is_error {
        Reply::Error(function_error(&body, header_type, "Unhandled"))
    } else if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        let msg = format!("the function's response is not valid JSON: {e}");
        complete(state, id, Reply::Error(FunctionError::new("Runtime.InvalidResponseBody", msg.clone())));
        return error(StatusCode::BAD_REQUEST, "InvalidResponseBody", msg);
    } else {
        Reply::Response(body)
    };
    if complete(state, id, reply) {
        accepted()
    } else {
        // Timed out or cancelled while the body was being read.
        error(StatusCode::GONE, "InvalidStateTransition", format!("request {id} is no longer in flight"))
    }
}

/// The `Lambda-Runtime-Function-Error-Type` header, if present.
fn error_type_header(req: &Request<Incoming>) -> Option<String> {
    req.headers().get("lambda-runtime-function-error-type").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// An error body as Lambda reads it: `{"errorType","errorMessage"}` JSON, else the (truncated)
/// text as the message; the type falls back to the header, then to `default_type`.
fn function_error(body: &[u8], header_type: Option<String>, default_type: &str) -> FunctionError {
    let mut fe = serde_json::from_slice::<FunctionError>(body).unwrap_or_else(|_| {
        FunctionError::new("", String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned())
    });
    if fe.error_type.is_empty() {
        fe.error_type = header_type.unwrap_or_else(|| default_type.to_owned());
    }
    fe
}

async fn init_error(state: &State, req: Request<Incoming>) -> Resp {
    let header_type = error_type_header(&req);
    let body = match read_body(req).await {
        Body::Ok(b) => b,
        Body::TooLarge(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "init error body over 6 MB",
            );
        }
        Body::Broken(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestBody",
                format!("could not read the body: {e}"),
            );
        }
    };
    state.status.send_replace(Status::InitError(function_error(&body, header_type, "Runtime.InitError")));
    accepted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One raw HTTP/1.1 exchange (Connection: close), returns (status, body).
    async fn raw(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    fn event(id: &str, body: &str) -> Event {
        Event {
            request_id: id.into(),
            deadline_unix_ms: 1,
            function_arn: "arn:aws:lambda:local:000000000000:function:echo".into(),
            trace_id: "Root=1-0-0".into(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[tokio::test]
    async fn full_exchange_then_duplicate_and_unknown_answers_are_refused() {
        let api = ApiServer::bind().await.unwrap();
        let mut status = api.status();
        assert_eq!(*status.borrow(), Status::Starting);
        let rx = api.dispatch(event("r1", r#"{"a":1}"#)).unwrap();
        assert!(matches!(api.dispatch(event("r2", "{}")), Err(DispatchError::Busy)));
        let (code, body) = raw(api.addr(), "GET", "/2018-06-01/runtime/invocation/next", b"").await;
        assert_eq!((code, body.as_str()), (200, r#"{"a":1}"#));
        status.changed().await.unwrap();
        assert_eq!(*status.borrow(), Status::Ready);
        let (code, _) =
            raw(api.addr(), "POST", "/2018-06-01/runtime/invocation/r1/response", b"{\"ok\":true}").await;
        assert_eq!(code, 202);
        match rx.await.unwrap() {
            Reply::Response(b) => assert_eq!(&b[..], b"{\"ok\":true}"),
            other => panic!("{other:?}"),
        }
        let (code, body) = raw(api.addr(), "POST", "/2018-06-01/runtime/invocation/r1/response", b"{}").await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("InvalidStateTransition"));
        let (code, body) =
            raw(api.addr(), "POST", "/2018-06-01/runtime/invocation/nope/response", b"{}").await;
        assert_eq!(code, 400);
        assert!(body.contains("\"errorType\":\"InvalidRequestID\""), "{body}");
        let (code, _) = raw(api.addr(), "GET", "/2018-06-01/runtime/elsewhere", b"").await;
        assert_eq!(code, 404);
        let (code, _) = raw(api.addr(), "DELETE", "/2018-06-01/runtime/invocation/next", b"").await;
        assert_eq!(code, 405);
    }

    #[tokio::test]
    async fn oversize_and_non_json_responses_fail_the_invocation_with_lambda_errors() {
        let api = ApiServer::bind().await.unwrap();
        let rx = api.dispatch(event("big", "{}")).unwrap();
        raw(api.addr(), "GET", "/2018-06-01/runtime/invocation/next", b"").await;
        let huge = vec![b'1'; SYNC_PAYLOAD_LIMIT + 10];
        let (code, body) =
            raw(api.addr(), "POST", "/2018-06-01/runtime/invocation/big/response", &huge).await;
        assert_eq!(code, 413, "{body}");
        match rx.await.unwrap() {
            Reply::Error(e) => assert_eq!(e.error_type, "Function.ResponseSizeTooLarge"),
            other => panic!("{other:?}"),
        }
        let rx = api.dispatch(event("bad", "{}")).unwrap();
        raw(api.addr(), "GET", "/2018-06-01/runtime/invocation/next", b"").await;
        let (code, _) =
            raw(api.addr(), "POST", "/2018-06-01/runtime/invocation/bad/response", b"not json").await;
        assert_eq!(code, 400);
        assert!(
            matches!(rx.await.unwrap(), Reply::Error(e) if e.error_type == "Runtime.InvalidResponseBody")
        );
        let rx = api.dispatch(event("err", "{}")).unwrap();
        raw(api.addr(), "GET", "/2018-06-01/runtime/invocation/next", b"").await;
        let (code, _) = raw(
            api.addr(),
            "POST",
            "/2018-06-01/runtime/invocation/err/error",
            br#"{"errorType":"Boom","errorMessage":"no"}"#,
        )
        .await;
        assert_eq!(code, 202);
        assert!(
            matches!(rx.await.unwrap(), Reply::Error(e) if e.error_type == "Boom" && e.error_message == "no")
        );
    }

    #[tokio::test]
    async fn next_never_answers_without_an_event() {
        // The server of an instance being shut down: no event will come. An answer without
        // `Lambda-Runtime-Aws-Request-Id` would make `lambda_runtime` panic; the poll waits.
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let state = State {
            events: tokio::sync::Mutex::new(rx),
            slot: Mutex::new(Slot::default()),
            status: watch::channel(Status::Starting).0,
        };
        let polled = tokio::time::timeout(std::time::Duration::from_millis(100), next(&state)).await;
        assert!(polled.is_err(), "answered /next without an event");
    }

    #[tokio::test]
    async fn init_error_is_reported_through_the_status() {
        let api = ApiServer::bind().await.unwrap();
        let mut status = api.status();
        let (code, _) = raw(
            api.addr(),
            "POST",
            "/2018-06-01/runtime/init/error",
            br#"{"errorType":"X","errorMessage":"y"}"#,
        )
        .await;
        assert_eq!(code, 202);
        status.changed().await.unwrap();
        assert_eq!(*status.borrow(), Status::InitError(FunctionError::new("X", "y")));
    }
}
