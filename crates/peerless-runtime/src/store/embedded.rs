//! The embedded store: a small in-memory RESP2 server owned by the invoking node, served on loopback.
//!
//! Function instances reach it with the same client as a real Redis ([`super::RedisStore`]).
//! It implements the few commands that client and the [`super::Store`] operations need:
//! `AUTH`, `HELLO` (RESP2 only), `PING`, `ECHO`, `QUIT`, `SELECT 0`, `CLIENT SETNAME|SETINFO|
//! GETNAME`, `GET`, `SET`, `MGET`, `DEL`, `EXISTS`, and two of its own:
//!
//! - `PEERLESS.PING` → `+PEERLESS`: lets a client tell this server from a real Redis.
//! - `PEERLESS.ACCUM key token slot blob` → `:1` if applied, `:0` if `token` was already
//!   applied to `key`. Adds the little-endian `f32` vector `blob` into the sum at `key`
//!   **in slot order**, whatever order the calls arrive in: the value at `key` is always
//!   `((v₀ + v₁) + v₂) + …` over the slots received so far, in ascending slot order, so the
//!   sum of k vectors is the same bit for bit for every arrival order. Vectors arriving in
//!   order are added in place as they land; one that arrives before a lower slot waits in
//!   `key:slots` and the sum is recomputed from the contiguous prefix. The call records the
//!   token in the set `key:tokens` and increments the integer at `key:n` — the same layout
//!   the Lua script keeps on a real Redis, so the accumulator is read back with `MGET key
//!   key:n` on either backend. A blob whose length differs from the accumulator's, or is not
//!   a multiple of 4, is refused with `-WRONGLEN ...`; a slot already filled with
//!   `-ERR slot …`; nothing changes.
//!
//! # FrameLimits and lifecycle
//! Connections are capped by a semaphore ([`EmbeddedServer::max_connections`]); each has its
//! own task. Frames are bounded by the codec's `FrameLimits`; malformed input gets
//! `-ERR Protocol error: ...` and the connection is closed. [`EmbeddedHandle::shutdown`] stops
//! accepting, lets each connection finish the command in hand (for up to
//! [`SHUTDOWN_GRACE`]) and then aborts what is left. Dropping the handle also stops the server,
//! without waiting.
//!
//! The data lives in a `HashMap` behind a std `Mutex`: every command is a short, synchronous
//! critical section and the lock is never held across an `.await` (mini-redis's reasoning).
//! There is no memory cap on the data itself: the owner deletes what it no longer needs.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, trace, warn};

use super::resp::{FrameLimits, Parsed, Reply, split_command, write_reply};
use super::{Accumulated, Store, StoreError};

/// Default cap on simultaneous connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How long [`EmbeddedHandle::shutdown`] lets connections finish before aborting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// A connection's idle read buffer above this capacity is given back after a large command.
/// Below it the buffer is kept, so a function instance that adds a model-sized gradient on
/// every invocation has each one received into the same memory, without regrowing the buffer
/// (vectors up to about 1 M `f32`s; the buffer grows by doubling). The price is up to this
/// much idle memory per connection that has sent a large command.
const IDLE_BUFFER: usize = 8 * 1024 * 1024;

/// Builder for an embedded store server.
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// use peerless_runtime::store::embedded::EmbeddedServer;
/// let server = EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some("s3cret".into()))?;
/// let url = server.url(); // hand this to function instances
/// # let _ = url;
/// server.shutdown().await;
/// # Ok(()) }
/// ```
pub struct EmbeddedServer {
    bind: SocketAddr,
    password: Option<String>,
    max_connections: usize,
}

impl std::fmt::Debug for EmbeddedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedServer")
            .field("bind", &self.bind)
            .field("password", &self.password.as_ref().map(|_| "<elided>"))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl EmbeddedServer {
    /// A server that will listen on `bind` (`127.0.0.1:0` picks a free port), without a
    /// password and with [`DEFAULT_MAX_CONNECTIONS`].
    pub fn new(bind: SocketAddr) -> Self {
        Self { bind, password: None, max_connections: DEFAULT_MAX_CONNECTIONS }
    }

    /// Requires clients to `AUTH` with `password` (as the `default` user) before anything else.
    #[must_use]
    pub fn password(mut self, password: Option<String>) -> Self {
        self.password = password;
        self
    }

    /// Caps simultaneous connections (at least 1); further clients wait in the accept backlog.
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Binds and serves with defaults; see [`EmbeddedServer::start`].
    ///
    /// # Errors
    /// As [`EmbeddedServer::start`].
    pub fn spawn(bind: SocketAddr, password: Option<String>) -> io::Result<EmbeddedHandle> {
        Self::new(bind).password(password).start()
    }

    /// Binds the listener and starts serving on the current tokio runtime.
    ///
    /// # Errors
    /// If binding fails, or if called outside a tokio runtime.
    pub fn start(self) -> io::Result<EmbeddedHandle> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let std_listener = std::net::TcpListener::bind(self.bind)?;
        std_listener.set_nonblocking(true)?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let addr = listener.local_addr()?;
        let url = store_url(addr, self.password.as_deref());
        let shared = Arc::new(Shared { db: Mutex::new(HashMap::new()), password: self.password });
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let task = runtime.spawn(accept_loop(listener, shared.clone(), limit, stop_rx));
        info!(%addr, max_connections = self.max_connections, "embedded store listening");
        Ok(EmbeddedHandle { addr, url, shared, stop: stop_tx, task: Some(task) })
    }
}

/// A running embedded store. Dropping it stops the server (without waiting).
pub struct EmbeddedHandle {
    addr: SocketAddr,
    url: String,
    /// The data, for the owner's own commands ([`Store`] on the handle).
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl EmbeddedHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://:password@127.0.0.1:port/` (password percent-encoded), or
    /// `redis://127.0.0.1:port/` without one. **Contains the password**: pass it to function
    /// instances, never log it.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops accepting, lets open connections finish their current command (up to
    /// [`SHUTDOWN_GRACE`]), aborts the rest, and returns when all tasks are gone.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "embedded store task failed");
        }
    }
}

impl Drop for EmbeddedHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// `redis://[:password@]ip:port/`.
fn store_url(addr: SocketAddr, password: Option<&str>) -> String {
    match password {
        Some(p) => format!("redis://:{}@{addr}/", percent_encode(p)),
        None => format!("redis://{addr}/"),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        while let Some(done) = conns.try_join_next() {
            log_join(done);
        }
        let permit = tokio::select! {
            _ = stopped(&mut stop) => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!(error = %e, "embedded store accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "set_nodelay failed");
        }
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            debug!(%peer, "store connection opened");
            match serve(stream, &shared, stop).await {
                Ok(()) => debug!(%peer, "store connection closed"),
                Err(e) => debug!(%peer, error = %e, "store connection ended with an error"),
            }
        });
    }
    drop(listener);
    let drain = async {
        while let Some(done) = conns.join_next().await {
            log_join(done);
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(open = conns.len(), "embedded store: aborting connections still busy after the grace period");
        conns.shutdown().await;
    }
    info!("embedded store stopped");
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && !e.is_cancelled()
    {
        warn!(error = %e, "store connection task failed");
    }
}

/// Resolves once a stop is requested or the handle is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // `wait_for` looks at the current value first, so a stop sent before this receiver was
    // cloned is not missed. An error means the sender was dropped: stop too.
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves one connection until EOF, `QUIT`, a protocol error or a stop request.
async fn serve(stream: TcpStream, shared: &Shared, mut stop: watch::Receiver<bool>) -> io::Result<()> {
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::with_capacity(READ_CHUNK, wr);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut conn = Connection { authenticated: shared.password.is_none() };
    let mut need = 1;
    loop {
        while buf.len() >= need {
            let limits =
                if conn.authenticated { &FrameLimits::AUTHENTICATED } else { &FrameLimits::UNAUTHENTICATED };
            match split_command(&mut buf, limits) {
                Ok(Parsed::Command { args, .. }) => {
                    need = 1;
                    if args.is_empty() {
                        continue;
                    }
                    let (reply, next) = conn.execute(shared, &args);
                    write_reply(&mut wr, &reply).await?;
                    if next == Next::Close {
                        return wr.flush().await;
                    }
                }
                Ok(Parsed::Incomplete { need: n }) => {
                    need = n;
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "closing store connection");
                    write_reply(&mut wr, &Reply::error(format!("ERR {e}"))).await?;
                    return wr.flush().await;
                }
            }
        }
        wr.flush().await?;
        if buf.is_empty() && buf.capacity() > IDLE_BUFFER {
            buf = BytesMut::with_capacity(16 * 1024);
        }
        // Grow by a fixed step, never by what a header claims; `BytesMut` amortises.
        buf.reserve(READ_CHUNK);
        let n = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return Ok(()),
            r = rd.read_buf(&mut buf) => r?,
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// What the connection does after replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Close,
}

/// A stored value.
#[derive(Debug, Clone)]
enum Entry {
    Str(Bytes),
    Set(HashSet<Bytes>),
    Slots(Slots),
}

/// The slot order of one accumulator (`key:slots`): the sum of the contiguous slots
/// `0..next`, and the vectors of higher slots that arrived before a lower one.
#[derive(Debug, Clone, Default)]
struct Slots {
    prefix: Option<Bytes>,
    next: u32,
    pending: std::collections::BTreeMap<u32, Bytes>,
}

impl Slots {
    /// Whether `slot` already holds a vector.
    fn filled(&self, slot: u32) -> bool {
        slot < self.next || self.pending.contains_key(&slot)
    }

    /// Takes in `blob` at `slot` (not yet filled) and returns the sum over every slot held,
    /// in slot order.
    fn add(&mut self, slot: u32, blob: Bytes) -> Bytes {
        self.pending.insert(slot, blob);
        while let Some(v) = self.pending.remove(&self.next) {
            self.prefix = Some(match self.prefix.take() {
                Some(sum) => add_f32_le(sum, &v),
                None => v,
            });
            self.next += 1;
        }
        let mut sum = self.prefix.clone();
        for v in self.pending.values() {
            sum = Some(match sum {
                Some(s) => add_f32_le(s, v),
                None => v.clone(),
            });
        }
        sum.expect("invariant: at least the vector just added")
    }
}

/// State shared by all connections.
struct Shared {
    db: Mutex<HashMap<Bytes, Entry>>,
    password: Option<String>,
}

impl Shared {
    fn db(&self) -> MutexGuard<'_, HashMap<Bytes, Entry>> {
        // Nothing panics while holding the lock, so poisoning cannot leave it inconsistent.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Per-connection state.
#[derive(Debug)]
struct Connection {
    authenticated: bool,
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOAUTH: &str = "NOAUTH Authentication required.";
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

fn arity(name: &str) -> Reply {
    Reply::error(format!("ERR wrong number of arguments for '{}' command", name.to_ascii_lowercase()))
}

/// Up to 64 bytes of client-supplied text for an error message.
fn quote(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(64)]);
    s.chars().filter(|c| !c.is_control()).collect()
}

impl Connection {
    /// Runs one command. Holds the data lock only inside, never across an await.
    fn execute(&mut self, shared: &Shared, args: &[Bytes]) -> (Reply, Next) {
        let Some((name, rest)) = args.split_first() else {
            return (Reply::error("ERR empty command"), Next::Continue);
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        trace!(command = %quote(name.as_bytes()), args = rest.len(), "store command");
        if !self.authenticated && !matches!(name.as_str(), "AUTH" | "HELLO" | "QUIT") {
            return (Reply::error(NOAUTH), Next::Continue);
        }
        if name == "QUIT" {
            return (Reply::ok(), Next::Close);
        }
        (self.command(shared, &name, rest), Next::Continue)
    }

    /// The reply to command `name` (in capitals) with arguments `rest`.
    fn command(&mut self, shared: &Shared, name: &str, rest: &[Bytes]) -> Reply {
        match name {
            "AUTH" => match rest {
                [password] => self.auth(shared, None, password),
                [user, password] => self.auth(shared, Some(user), password),
                _ => arity(name),
            },
            "HELLO" => self.hello(shared, rest),
            "PING" => match rest {
                [] => Reply::Simple("PONG".to_owned()),
                [msg] => Reply::Bulk(msg.clone()),
                _ => arity(name),
            },
            "ECHO" => match rest {
                [msg] => Reply::Bulk(msg.clone()),
                _ => arity(name),
            },
            "SELECT" => match rest {
                [db] if db.as_ref() == b"0" => Reply::ok(),
                [_] => Reply::error("ERR DB index is out of range"),
                _ => arity(name),
            },
            "CLIENT" => client(rest),
            "PEERLESS.PING" => match rest {
                [] => Reply::Simple("PEERLESS".to_owned()),
                _ => arity(name),
            },
            "GET" => match rest {
                [key] => get(&shared.db(), key),
                _ => arity(name),
            },
            "MGET" if !rest.is_empty() => mget(&shared.db(), rest),
            "SET" => match rest {
                [key, value] => {
                    shared.db().insert(key.clone(), Entry::Str(value.clone()));
                    Reply::ok()
                }
                [_, _, ..] => Reply::error("ERR syntax error (SET options are not supported)"),
                _ => arity(name),
            },
            "DEL" if !rest.is_empty() => {
                let mut db = shared.db();
                Reply::Integer(rest.iter().filter(|k| db.remove(*k).is_some()).count() as i64)
            }
            "EXISTS" if !rest.is_empty() => {
                let db = shared.db();
                Reply::Integer(rest.iter().filter(|k| db.contains_key(*k)).count() as i64)
            }
            "MGET" | "DEL" | "EXISTS" => arity(name),
            "PEERLESS.ACCUM" => match rest {
                [key, token, slot, blob] => match std::str::from_utf8(slot).ok().and_then(|s| s.parse().ok())
                {
                    Some(slot) => accumulate(&mut shared.db(), key, token, slot, blob),
                    None => Reply::error("ERR slot is not an integer or out of range"),
                },
                _ => arity(name),
            },
            _ => Reply::error(format!(
                "ERR unknown command '{}', with args beginning with: {}",
                quote(name.as_bytes()),
                rest.iter().take(3).map(|a| format!("'{}' ", quote(a))).collect::<String>()
            )),
        }
    }

    fn auth(&mut self, shared: &Shared, user: Option<&Bytes>, password: &[u8]) -> Reply {
        let Some(expected) = &shared.password else {
            return Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            );
        };
        let user_ok = user.is_none_or(|u| u.as_ref() == b"default");
        // Evaluate both, in constant time for the password, before deciding.
        let password_ok = constant_time_eq(expected.as_bytes(), password);
        if user_ok && password_ok {
            self.authenticated = true;
            Reply::ok()
        } else {
            warn!("store client failed to authenticate");
            Reply::error(WRONGPASS)
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, RESP2 only.
    fn hello(&mut self, shared: &Shared, rest: &[Bytes]) -> Reply {
        let mut it = rest.iter();
        if let Some(v) = it.next()
            && v.as_ref() != b"2"
        {
            return Reply::error("NOPROTO unsupported protocol version");
        }
        while let Some(opt) = it.next() {
            if opt.eq_ignore_ascii_case(b"AUTH") {
                let (Some(user), Some(pass)) = (it.next(), it.next()) else {
                    return Reply::error("ERR Syntax error in HELLO option 'auth'");
                };
                if let Reply::Error(e) = self.auth(shared, Some(user), pass) {
                    return Reply::Error(e);
                }
            } else if opt.eq_ignore_ascii_case(b"SETNAME") {
                if it.next().is_none() {
                    return Reply::error("ERR Syntax error in HELLO option 'setname'");
                }
            } else {
                return Reply::error(format!("ERR Syntax error in HELLO option '{}'", quote(opt)));
            }
        }
        if !self.authenticated {
            return Reply::error(NOAUTH);
        }
        let s = |x: &'static str| Reply::Bulk(Bytes::from_static(x.as_bytes()));
        Reply::Array(vec![
            s("server"),
            s("peerless"),
            s("version"),
            s(env!("CARGO_PKG_VERSION")),
            s("proto"),
            Reply::Integer(2),
            s("mode"),
            s("standalone"),
            s("role"),
            s("master"),
            s("modules"),
            Reply::Array(vec![]),
        ])
    }
}

/// `GET key`: its string value, nil when missing, `WRONGTYPE` for a set.
fn get(db: &HashMap<Bytes, Entry>, key: &Bytes) -> Reply {
    match db.get(key) {
        None => Reply::Null,
        Some(Entry::Str(v)) => Reply::Bulk(v.clone()),
        Some(_) => Reply::error(WRONGTYPE),
    }
}

/// `MGET key…`: each key's string value, nil when missing or not a string.
fn mget(db: &HashMap<Bytes, Entry>, keys: &[Bytes]) -> Reply {
    Reply::Array(
        keys.iter()
            .map(|k| match db.get(k) {
                Some(Entry::Str(v)) => Reply::Bulk(v.clone()),
                _ => Reply::Null,
            })
            .collect(),
    )
}

/// `CLIENT SETNAME|SETINFO|GETNAME`: accepted so client handshakes succeed; names are not kept.
fn client(rest: &[Bytes]) -> Reply {
    let Some((sub, args)) = rest.split_first() else {
        return arity("client");
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    match (sub.as_str(), args.len()) {
        ("SETNAME", 1) | ("SETINFO", 2) => Reply::ok(),
        ("GETNAME", 0) => Reply::Null,
        ("SETNAME" | "SETINFO" | "GETNAME", _) => arity(&format!("client|{sub}")),
        _ => Reply::error(format!("ERR unknown subcommand '{}'. Try CLIENT HELP.", quote(sub.as_bytes()))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

fn suffixed(key: &[u8], suffix: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(key.len() + suffix.len());
    k.extend_from_slice(key);
    k.extend_from_slice(suffix);
    Bytes::from(k)
}

/// `PEERLESS.ACCUM key token slot blob`. All checks come before any change, so a refused call
/// leaves the accumulator, its slots, its tokens and its count untouched.
fn accumulate(db: &mut HashMap<Bytes, Entry>, key: &Bytes, token: &Bytes, slot: u32, blob: &Bytes) -> Reply {
    let tokens_key = suffixed(key, b":tokens");
    let count_key = suffixed(key, b":n");
    let slots_key = suffixed(key, b":slots");
    match db.get(&tokens_key) {
        Some(Entry::Set(tokens)) if tokens.contains(token) => return Reply::Integer(0),
        Some(Entry::Set(_)) | None => {}
        Some(_) => return Reply::error(WRONGTYPE),
    }
    match db.get(&slots_key) {
        Some(Entry::Slots(slots)) if slots.filled(slot) => {
            return Reply::error(format!("ERR slot {slot} of {} is already filled", quote(key)));
        }
        Some(Entry::Slots(_)) | None => {}
        Some(_) => return Reply::error(WRONGTYPE),
    }
    if !blob.len().is_multiple_of(4) {
        return Reply::error(format!("WRONGLEN blob length {} is not a multiple of 4", blob.len()));
    }
    let count = match db.get(&count_key) {
        None => 0,
        Some(Entry::Str(v)) => match std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()) {
            Some(n) => n,
            None => return Reply::error("ERR value is not an integer or out of range"),
        },
        Some(_) => return Reply::error(WRONGTYPE),
    };
    let Some(count) = count.checked_add(1) else {
        return Reply::error("ERR increment or decrement would overflow");
    };
    match db.get(key) {
        None => {}
        Some(Entry::Str(cur)) if cur.len() != blob.len() => {
            return Reply::error(format!("WRONGLEN accumulator has {} bytes, got {}", cur.len(), blob.len()));
        }
        Some(Entry::Str(_)) => {}
        Some(_) => return Reply::error(WRONGTYPE),
    }
    // Every check has passed: nothing below can fail. The sum at `key` is dropped first, so
    // that in-order additions into the prefix happen in place (no other holder).
    db.remove(key);
    let sum = match db.entry(slots_key).or_insert_with(|| Entry::Slots(Slots::default())) {
        Entry::Slots(slots) => slots.add(slot, blob.clone()),
        // Checked above; unreachable, but refuse rather than panic.
        _ => return Reply::error(WRONGTYPE),
    };
    db.insert(key.clone(), Entry::Str(sum));
    match db.entry(tokens_key).or_insert_with(|| Entry::Set(HashSet::new())) {
        Entry::Set(tokens) => {
            tokens.insert(token.clone());
        }
        // Checked above; unreachable, but refuse rather than panic.
        _ => return Reply::error(WRONGTYPE),
    }
    db.insert(count_key, Entry::Str(Bytes::from(count.to_string())));
    Reply::Integer(1)
}

/// `sum + add`, element-wise as little-endian `f32`s (equal lengths, multiples of 4). Adds
/// in place when nothing else holds `sum`; when a reply being written still does, into a copy.
fn add_f32_le(sum: Bytes, add: &[u8]) -> Bytes {
    let mut out = sum.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let (acc, _) = out.as_chunks_mut::<4>();
    let (add, _) = add.as_chunks::<4>();
    for (a, b) in acc.iter_mut().zip(add) {
        *a = (f32::from_le_bytes(*a) + f32::from_le_bytes(*b)).to_le_bytes();
    }
    out.freeze()
}

/// The owning node's own access to its store: the same commands its functions send over
/// RESP, run in this process without the socket and the parser. A node puts its parameters
/// (0.94 MB for the MNIST MLP) and reads as much of summed gradient every round.
impl Store for EmbeddedHandle {
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_owned(key, value.to_vec()).await
    }

    async fn put_owned(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        expect_ok("SET", self.own(&[b"SET", key.as_bytes()], Some(Bytes::from(value))))
    }

    async fn put_floats(&self, key: &str, v: Arc<Vec<f32>>) -> Result<(), StoreError> {
        // The value is the vector's own memory: no encoding, and the vector is freed when the
        // key is overwritten or deleted.
        expect_ok("SET", self.own(&[b"SET", key.as_bytes()], Some(super::floats::shared_le_bytes(v))))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.own(&[b"GET", key.as_bytes()], None) {
            Reply::Bulk(v) => Ok(Some(v.to_vec())),
            Reply::Null => Ok(None),
            other => Err(unexpected("GET", other)),
        }
    }

    async fn delete(&self, keys: &[&str]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        // An accumulator's count, tokens and slots go with it: left behind, the slots kept
        // each round's sum (0.94 MB for the MNIST MLP) for the rest of the run.
        let keys = super::with_companions(keys);
        let args: Vec<&[u8]> =
            std::iter::once(&b"DEL"[..]).chain(keys.iter().map(|k| k.as_bytes())).collect();
        match self.own(&args, None) {
            Reply::Integer(_) => Ok(()),
            other => Err(unexpected("DEL", other)),
        }
    }

    async fn accumulate(&self, key: &str, token: &str, slot: u32, grad: &[f32]) -> Result<bool, StoreError> {
        let blob = Bytes::from(peerless_core::flat::to_le_bytes(grad));
        let slot = slot.to_string();
        match self.own(&[b"PEERLESS.ACCUM", key.as_bytes(), token.as_bytes(), slot.as_bytes()], Some(blob)) {
            Reply::Integer(n) => Ok(n == 1),
            Reply::Error(e) if e.starts_with("WRONGLEN") => {
                Err(StoreError::BadValue { key: key.to_owned(), reason: e })
            }
            other => Err(unexpected("PEERLESS.ACCUM", other)),
        }
    }

    async fn read_accumulated(&self, key: &str) -> Result<Option<Accumulated>, StoreError> {
        let count_key = format!("{key}:n");
        let bulk = |r: &Reply| match r {
            Reply::Bulk(v) => Some(Some(v.clone())),
            Reply::Null => Some(None),
            _ => None,
        };
        match self.own(&[b"MGET", key.as_bytes(), count_key.as_bytes()], None) {
            Reply::Array(values) if values.len() == 2 => {
                if let (Some(sum), Some(count)) = (bulk(&values[0]), bulk(&values[1])) {
                    return Accumulated::decode(key, sum.as_deref(), count.as_deref());
                }
                Err(unexpected("MGET", Reply::Array(values)))
            }
            other => Err(unexpected("MGET", other)),
        }
    }
}

impl EmbeddedHandle {
    /// Runs one command of the owner (`args`, then `value` as the last argument, not copied).
    fn own(&self, args: &[&[u8]], value: Option<Bytes>) -> Reply {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).chain(value).collect();
        Connection { authenticated: true }.execute(&self.shared, &args).0
    }
}

fn expect_ok(command: &str, reply: Reply) -> Result<(), StoreError> {
    match reply {
        Reply::Simple(s) if s == "OK" => Ok(()),
        other => Err(unexpected(command, other)),
    }
}

fn unexpected(command: &str, reply: Reply) -> StoreError {
    StoreError::Command { command: command.to_owned(), reason: format!("unexpected reply {reply:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn shared(password: Option<&str>) -> Shared {
        Shared { db: Mutex::new(HashMap::new()), password: password.map(str::to_owned) }
    }

    fn run(conn: &mut Connection, sh: &Shared, args: &[&[u8]]) -> Reply {
        let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        conn.execute(sh, &args).0
    }

    fn floats(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn auth_gates_everything_but_auth_hello_quit() {
        let sh = shared(Some("pw"));
        let mut c = Connection { authenticated: false };
        assert_eq!(run(&mut c, &sh, &[b"PING"]), Reply::error(NOAUTH));
        assert_eq!(run(&mut c, &sh, &[b"GET", b"k"]), Reply::error(NOAUTH));
        assert_eq!(run(&mut c, &sh, &[b"HELLO"]), Reply::error(NOAUTH));
        assert_eq!(run(&mut c, &sh, &[b"AUTH", b"nope"]), Reply::error(WRONGPASS));
        assert_eq!(run(&mut c, &sh, &[b"AUTH", b"bob", b"pw"]), Reply::error(WRONGPASS));
        assert!(!c.authenticated);
        assert_eq!(run(&mut c, &sh, &[b"auth", b"default", b"pw"]), Reply::ok());
        assert_eq!(run(&mut c, &sh, &[b"PING"]), Reply::Simple("PONG".into()));
        let mut c = Connection { authenticated: false };
        assert!(matches!(run(&mut c, &sh, &[b"HELLO", b"2", b"AUTH", b"default", b"pw"]), Reply::Array(_)));
        assert!(c.authenticated);
        assert_eq!(run(&mut c, &sh, &[b"HELLO", b"3"]), Reply::error("NOPROTO unsupported protocol version"));
        assert_eq!(c.execute(&sh, &[b("QUIT")]).1, Next::Close);
    }

    #[test]
    fn auth_without_password_configured_is_an_error() {
        let sh = shared(None);
        let mut c = Connection { authenticated: true };
        assert!(matches!(run(&mut c, &sh, &[b"AUTH", b"x"]), Reply::Error(e) if e.starts_with("ERR AUTH")));
    }

    #[test]
    fn handshake_commands() {
        let sh = shared(None);
        let mut c = Connection { authenticated: true };
        assert_eq!(run(&mut c, &sh, &[b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-rs"]), Reply::ok());
        assert_eq!(run(&mut c, &sh, &[b"CLIENT", b"SETNAME", b"fn-1"]), Reply::ok());
        assert_eq!(run(&mut c, &sh, &[b"SELECT", b"0"]), Reply::ok());
        assert_eq!(run(&mut c, &sh, &[b"SELECT", b"1"]), Reply::error("ERR DB index is out of range"));
        assert_eq!(run(&mut c, &sh, &[b"PEERLESS.PING"]), Reply::Simple("PEERLESS".into()));
        assert!(
            matches!(run(&mut c, &sh, &[b"FLUSHALL"]), Reply::Error(e) if e.starts_with("ERR unknown command 'FLUSHALL'"))
        );
        assert_eq!(run(&mut c, &sh, &[b"GET"]), arity("GET"));
    }

    #[test]
    fn strings_and_keys() {
        let sh = shared(None);
        let mut c = Connection { authenticated: true };
        assert_eq!(run(&mut c, &sh, &[b"GET", b"k"]), Reply::Null);
        assert_eq!(run(&mut c, &sh, &[b"SET", b"k", b"v"]), Reply::ok());
        assert!(matches!(run(&mut c, &sh, &[b"SET", b"k", b"v", b"EX", b"1"]), Reply::Error(_)));
        assert_eq!(run(&mut c, &sh, &[b"GET", b"k"]), Reply::Bulk(b("v")));
        assert_eq!(run(&mut c, &sh, &[b"EXISTS", b"k", b"k", b"z"]), Reply::Integer(2));
        assert_eq!(
            run(&mut c, &sh, &[b"MGET", b"k", b"z"]),
            Reply::Array(vec![Reply::Bulk(b("v")), Reply::Null])
        );
        assert_eq!(run(&mut c, &sh, &[b"DEL", b"k", b"z"]), Reply::Integer(1));
        assert_eq!(run(&mut c, &sh, &[b"GET", b"k"]), Reply::Null);
    }

    #[test]
    fn accumulate_semantics() {
        let sh = shared(None);
        let mut c = Connection { authenticated: true };
        let acc = |c: &mut Connection, tok: &[u8], slot: &[u8], v: &[f32]| {
            run(c, &sh, &[b"PEERLESS.ACCUM", b"g", tok, slot, &floats(v)])
        };
        assert_eq!(acc(&mut c, b"t1", b"0", &[1.0, 2.0]), Reply::Integer(1));
        assert_eq!(acc(&mut c, b"t2", b"1", &[10.0, 20.0]), Reply::Integer(1));
        assert_eq!(acc(&mut c, b"t1", b"0", &[100.0, 100.0]), Reply::Integer(0));
        assert!(matches!(acc(&mut c, b"t3", b"2", &[1.0]), Reply::Error(e) if e.starts_with("WRONGLEN")));
        assert!(matches!(
            run(&mut c, &sh, &[b"PEERLESS.ACCUM", b"g", b"t4", b"3", b"abc"]),
            Reply::Error(e) if e.starts_with("WRONGLEN")
        ));
        assert!(
            matches!(acc(&mut c, b"t5", b"1", &[1.0, 1.0]), Reply::Error(e) if e.contains("already filled"))
        );
        assert!(matches!(acc(&mut c, b"t5", b"x", &[1.0, 1.0]), Reply::Error(e) if e.contains("slot")));
        assert_eq!(
            run(&mut c, &sh, &[b"MGET", b"g", b"g:n"]),
            Reply::Array(vec![Reply::Bulk(Bytes::from(floats(&[11.0, 22.0]))), Reply::Bulk(b("2"))])
        );
        // A refused call recorded no token: t3 can still be applied with the right length.
        assert_eq!(acc(&mut c, b"t3", b"2", &[0.5, 0.5]), Reply::Integer(1));
        assert_eq!(run(&mut c, &sh, &[b"GET", b"g:tokens"]), Reply::error(WRONGTYPE));
        assert_eq!(run(&mut c, &sh, &[b"SET", b"h:tokens", b"x"]), Reply::ok());
        assert_eq!(run(&mut c, &sh, &[b"PEERLESS.ACCUM", b"h", b"t", b"0", b""]), Reply::error(WRONGTYPE));
        assert_eq!(run(&mut c, &sh, &[b"EXISTS", b"h"]), Reply::Integer(0));
    }

    #[test]
    fn the_sum_is_taken_in_slot_order_for_every_arrival_order() {
        // Values whose f32 sum depends on the order of additions.
        let vs: [Vec<f32>; 4] =
            [vec![1e8, 0.1, 3.3], vec![-1e8, 0.7, 1e-7], vec![0.3, 1e7, -3.3], vec![1.5, -1e7, 1e-3]];
        let ordered = vs[1..].iter().fold(vs[0].clone(), |mut s, v| {
            s.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            s
        });
        let mut orders = Vec::new();
        for a in 0..4 {
            for b in (0..4).filter(|&b| b != a) {
                for c in (0..4).filter(|&c| c != a && c != b) {
                    orders.push([a, b, c, 6 - a - b - c]);
                }
            }
        }
        let mut differs = false;
        for order in orders {
            let sh = shared(None);
            let mut c = Connection { authenticated: true };
            let mut arrival = vs[order[0]].clone();
            for (i, &j) in order.iter().enumerate() {
                let (tok, slot) = (format!("t{j}"), j.to_string());
                let r = run(
                    &mut c,
                    &sh,
                    &[b"PEERLESS.ACCUM", b"g", tok.as_bytes(), slot.as_bytes(), &floats(&vs[j])],
                );
                assert_eq!(r, Reply::Integer(1));
                if i > 0 {
                    arrival.iter_mut().zip(&vs[j]).for_each(|(a, b)| *a += b);
                }
            }
            differs |= arrival != ordered;
            assert_eq!(
                run(&mut c, &sh, &[b"GET", b"g"]),
                Reply::Bulk(Bytes::from(floats(&ordered))),
                "{order:?}"
            );
        }
        assert!(differs, "the values must make arrival order matter, or the test proves nothing");
    }

    #[test]
    fn sums_are_added_in_place_unless_a_reader_holds_them() {
        let sum = Bytes::from(floats(&[1.0, 2.0, 3.0]));
        let ptr = sum.as_ptr();
        let sum = add_f32_le(sum, &floats(&[0.5, 0.25, -3.0]));
        assert_eq!(sum, floats(&[1.5, 2.25, 0.0]));
        assert_eq!(sum.as_ptr(), ptr, "unshared: added in place");
        // A GET reply still being written holds a clone: it keeps the old value.
        let reader = sum.clone();
        let sum = add_f32_le(sum, &floats(&[1.0, 1.0, 1.0]));
        assert_eq!(
            (sum.as_ref(), reader.as_ref()),
            (&floats(&[2.5, 3.25, 1.0])[..], &floats(&[1.5, 2.25, 0.0])[..])
        );
        assert_ne!(sum.as_ptr(), reader.as_ptr());
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn url_encodes_the_password() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().expect("addr");
        assert_eq!(store_url(addr, None), "redis://127.0.0.1:7000/");
        assert_eq!(store_url(addr, Some("a b@c:d/é")), "redis://:a%20b%40c%3Ad%2F%C3%A9@127.0.0.1:7000/");
    }

    async fn roundtrip(stream: &mut TcpStream, send: &[u8]) -> Vec<u8> {
        stream.write_all(send).await.expect("write");
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut out))
            .await
            .expect("timely")
            .expect("read");
        out.truncate(n);
        out
    }

    #[tokio::test]
    async fn protocol_error_closes_the_connection() {
        let server = EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), None).expect("spawn");
        let mut s = TcpStream::connect(server.addr()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"*1\r\n$4\r\nPING\r\n").await, b"+PONG\r\n");
        let reply = roundtrip(&mut s, b"*1\r\n$-3\r\n").await;
        assert!(reply.starts_with(b"-ERR Protocol error: invalid bulk length"), "{reply:?}");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("closed");
        assert_eq!(n.expect("eof"), 0);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn unauthenticated_big_frame_is_refused() {
        let server =
            EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some("pw".into())).expect("spawn");
        let mut s = TcpStream::connect(server.addr()).await.expect("connect");
        let reply = roundtrip(&mut s, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000000\r\n").await;
        assert!(reply.starts_with(b"-ERR Protocol error: invalid bulk length"), "{reply:?}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn pipelined_and_split_commands() {
        let server = EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), None).expect("spawn");
        let mut s = TcpStream::connect(server.addr()).await.expect("connect");
        let frames = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        for chunk in frames.chunks(5) {
            s.write_all(chunk).await.expect("write");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut got = Vec::new();
        while got.len() < b"+OK\r\n$2\r\nvv\r\n".len() {
            let mut tmp = [0u8; 64];
            let n = s.read(&mut tmp).await.expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&tmp[..n]);
        }
        assert_eq!(got, b"+OK\r\n$2\r\nvv\r\n");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn connections_are_capped() {
        let server = EmbeddedServer::new("127.0.0.1:0".parse().expect("addr"))
            .max_connections(1)
            .start()
            .expect("start");
        let mut a = TcpStream::connect(server.addr()).await.expect("connect a");
        assert_eq!(roundtrip(&mut a, b"*1\r\n$4\r\nPING\r\n").await, b"+PONG\r\n");
        let mut b = TcpStream::connect(server.addr()).await.expect("connect b (backlog)");
        b.write_all(b"*1\r\n$4\r\nPING\r\n").await.expect("write");
        let mut tmp = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), b.read(&mut tmp)).await.is_err(),
            "second connection must wait for a permit"
        );
        drop(a);
        let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut tmp))
            .await
            .expect("served")
            .expect("read");
        assert_eq!(&tmp[..n], b"+PONG\r\n");
        server.shutdown().await;
    }

    /// The owner's in-process commands and a function's RESP client see the same store.
    #[tokio::test]
    async fn the_owners_in_process_commands_and_resp_clients_agree() {
        let server =
            EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some("pw".into())).expect("spawn");
        let client = crate::store::RedisStore::connect(&server.url()).await.expect("connect");
        server.put("p", &[1, 2, 3, 4]).await.expect("put");
        assert_eq!(client.get("p").await.expect("get"), Some(vec![1, 2, 3, 4]));
        client.put("q", b"xy").await.expect("client put");
        assert_eq!(server.get("q").await.expect("own get"), Some(b"xy".to_vec()));
        // Slot 1 first, over RESP; slot 0 in-process: summed in slot order either way.
        assert!(client.accumulate("g", "t1", 1, &[0.5, -1.0]).await.expect("accum 1"));
        assert!(server.accumulate("g", "t0", 0, &[0.25, 2.0]).await.expect("accum 0"));
        assert!(!server.accumulate("g", "t0", 0, &[0.25, 2.0]).await.expect("same token"), "applied twice");
        let want = Some(Accumulated { sum: vec![0.75, 1.0], count: 2 });
        assert_eq!(server.read_accumulated("g").await.expect("own read"), want);
        assert_eq!(client.read_accumulated("g").await.expect("client read"), want);
        assert!(matches!(server.accumulate("g", "t2", 2, &[1.0]).await, Err(StoreError::BadValue { .. })));
        assert_eq!(server.read_accumulated("none").await.expect("absent"), None);
        server.delete(&["p", "q", "g"]).await.expect("delete");
        assert_eq!(client.get("p").await.expect("get"), None);
        assert_eq!(server.get("q").await.expect("get"), None);
        // The accumulator's count, tokens and slots went with it: nothing is left.
        assert_eq!(
            server.shared.db().len(),
            0,
            "keys left: {:?}",
            server.shared.db().keys().collect::<Vec<_>>()
        );
        server.shutdown().await;
    }

    /// Vectors go over a client's direct line: the owner's `put_floats` keeps the vector itself
    /// (no encoding), and a client reads a value into its own vector, the allocation reused,
    /// bit for bit. A missing key, a value that is not floats and a value of another type are
    /// told apart, and the line carries on after each.
    #[tokio::test]
    async fn vectors_go_over_the_direct_line_bit_for_bit() {
        let server =
            EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), Some("pw".into())).expect("spawn");
        let client = crate::store::RedisStore::connect(&server.url()).await.expect("connect");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // More than a socket buffer: the value comes in many reads.
        let big: Vec<f32> =
            (0..300_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) >> 2)).collect();
        let shared = Arc::new(big.clone());
        server.put_floats("p", Arc::clone(&shared)).await.expect("put floats");
        assert_eq!(client.get("p").await.expect("get"), Some(peerless_core::flat::to_le_bytes(&big)));
        let mut out = Vec::new();
        assert!(client.get_floats("p", &mut out).await.expect("get floats"));
        assert_eq!(bits(&out), bits(&big));
        let at = out.as_ptr();
        assert!(client.get_floats("p", &mut out).await.expect("again"));
        assert_eq!((out.as_ptr(), bits(&out) == bits(&big)), (at, true), "read over in place");
        // Short values come whole with the reply's first line.
        for v in [vec![1.5f32, -0.0], vec![]] {
            server.put_floats("s", Arc::new(v.clone())).await.expect("put short");
            assert!(client.get_floats("s", &mut out).await.expect("get short"));
            assert_eq!(bits(&out), bits(&v));
        }
        assert!(!client.get_floats("none", &mut out).await.expect("missing"));
        server.put("odd", b"12345").await.expect("put odd");
        let err = client.get_floats("odd", &mut out).await.expect_err("not floats");
        assert!(
            matches!(&err, StoreError::BadValue { reason, .. } if reason.contains("not a multiple of 4")),
            "{err:?}"
        );
        assert!(client.accumulate("g", "t", 0, &[1.0]).await.expect("accumulate"));
        let err = client.get_floats("g:tokens", &mut out).await.expect_err("a set");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert!(client.get_floats("p", &mut out).await.expect("after the errors"));
        assert_eq!(bits(&out), bits(&big));
        // Deleting the key lets the vector go: the owner has it to itself again.
        server.delete(&["p"]).await.expect("delete");
        assert_eq!(Arc::strong_count(&shared), 1);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_the_listener() {
        let server = EmbeddedServer::spawn("127.0.0.1:0".parse().expect("addr"), None).expect("spawn");
        let addr = server.addr();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(roundtrip(&mut s, b"*1\r\n$4\r\nPING\r\n").await, b"+PONG\r\n");
        tokio::time::timeout(Duration::from_secs(2), server.shutdown()).await.expect("prompt shutdown");
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.expect("eof"), 0);
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
