//! [`RedisStore`]: the one store client, for both the embedded store and a real `redis-server`.
//!
//! It holds one `redis::aio::MultiplexedConnection` (cheap to clone; concurrent commands are
//! pipelined on it). Timeouts are set explicitly: redis-rs 1.x defaults to a 500 ms response
//! timeout, far too short for a 40 MB value, so [`RedisStoreConfig`] defaults to 30 s.
//!
//! # Backends
//! At connect time the client sends `PING` (refused with `NOAUTH` if the URL lacks the
//! password) and then `PEERLESS.PING`: the embedded store answers `+PEERLESS`, a real Redis
//! answers `-ERR unknown command`. The result is [`RedisStore::backend`] and picks
//! how [`Store::accumulate`] runs:
//!
//! - [`ServerKind::Embedded`]: the native `PEERLESS.ACCUM key token slot blob` command.
//! - [`ServerKind::Redis`]: a Lua script ([`ACCUMULATE_LUA`], sent as `EVALSHA`) that does the same
//!   on the same keys (`key` = sum as little-endian `f32` in slot order, `key:n` = count,
//!   `key:tokens` = set of applied tokens, plus `key:slots` and `key:prefix` for the order). Lua numbers are doubles: each pair of `f32`s is added in `f64` and
//!   rounded back to `f32` by `struct.pack`. That double rounding is harmless for addition
//!   (`f64` has more than 2·24 + 2 significand bits), so the result is exactly the `f32` sum. Both backends therefore produce bit-identical sums for the
//!   same order of additions. The script is slow compared with the native command — it unpacks
//!   and repacks every element in interpreted Lua, about 5–7 M floats/s, and Redis serves
//!   nothing else meanwhile: for a 235,146-float vector about 40–60 ms per call end to end
//!   against about 0.6 ms for the embedded store's native command, which adds in place into
//!   the stored sum (`measure_store_timings` in `tests/it/store.rs` reproduces the numbers).
//!   k concurrent accumulations into one key serialise: k × that time.
//!
//! The client sets `TCP_NODELAY` and encodes a vector straight into the command buffer. Against
//! the embedded store, `PEERLESS.ACCUM` and [`Store::get_floats`] go over a second, direct
//! connection instead (`line.rs`): redis-rs copies a command's bytes three times whole before
//! the kernel does, which for a gradient cost as much CPU as sending it, and a reply's twice
//! before it is decoded.
//!
//! Either way the read side is `MGET key key:n`, atomic on both servers.
//!
//! Passwords never appear in errors, logs or `Debug` output: URLs are shown with the password
//! elided, and server/client error text is scrubbed of it.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use peerless_core::flat::le_bytes_into;
use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisError, RedisWrite, Script,
    ToRedisArgs,
};
use tracing::{debug, instrument};

use super::line::{AccumReply, GetReply, VectorLine};
use super::{Accumulated, Store, StoreError};

/// Which server a [`RedisStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// peerless's embedded store ([`super::embedded::EmbeddedServer`]).
    Embedded,
    /// A real `redis-server` (accumulation by Lua script).
    Redis,
}

/// Connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// Time allowed to open the TCP connection and authenticate. Default 5 s.
    pub connect_timeout: Duration,
    /// Time allowed for any one reply. Default 30 s: a 40 MB value over loopback takes tens of
    /// milliseconds, far longer on a loaded machine or across a network.
    pub response_timeout: Duration,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(5), response_timeout: Duration::from_secs(30) }
    }
}

/// The accumulate script for a real Redis.
///
/// `KEYS[1]` sum, `KEYS[2]` count, `KEYS[3]` token set, `KEYS[4]` slot hash (`next`, the
/// first slot not yet in the prefix, and `s<j>`, vectors that arrived before a lower slot),
/// `KEYS[5]` the sum of slots `0..next`; `ARGV[1]` token, `ARGV[2]` slot, `ARGV[3]` blob
/// (little-endian `f32`s). Returns 1 if applied, 0 if the token was already applied, or an
/// error (nothing changed): `WRONGLEN` if the blob's length is not a multiple of 4 or differs
/// from the sum's, `ERR slot … already filled`. All checks run before the first write, and a
/// script runs atomically, so a refused call changes nothing and concurrent calls never lose
/// an addition. The sum at `KEYS[1]` is always the slots held added in ascending slot order,
/// as the embedded store keeps it.
///
/// Elements are unpacked and repacked 128 at a time (`struct.unpack('<fff…')`): measured on
/// Redis 7.0 for 235,146 floats, about 35–45 ms inside the script against 110–135 ms with one
/// `struct` call per element (chunks of 256 or 1024 are no faster).
pub const ACCUMULATE_LUA: &str = r#"
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return 0
end
local slot = tonumber(ARGV[2])
local blob = ARGV[3]
if #blob % 4 ~= 0 then
  return redis.error_reply('WRONGLEN blob length ' .. #blob .. ' is not a multiple of 4')
end
local cur = redis.call('GET', KEYS[1])
if cur and #cur ~= #blob then
  return redis.error_reply('WRONGLEN accumulator has ' .. #cur .. ' bytes, got ' .. #blob)
end
local nxt = tonumber(redis.call('HGET', KEYS[4], 'next') or '0')
if slot == nil or slot < nxt or redis.call('HEXISTS', KEYS[4], 's' .. ARGV[2]) == 1 then
  return redis.error_reply('ERR slot ' .. ARGV[2] .. ' of ' .. KEYS[1] .. ' is already filled')
end
local function add(x, y)
  local n = #x / 4
  local CH = 128
  local fmt = '<' .. string.rep('f', CH)
  local out = {}
  local i = 0
  while i + CH <= n do
    local a = {struct.unpack(fmt, x, i * 4 + 1)}
    local b = {struct.unpack(fmt, y, i * 4 + 1)}
    for j = 1, CH do
      a[j] = a[j] + b[j]
    end
    out[#out + 1] = struct.pack(fmt, unpack(a, 1, CH))
    i = i + CH
  end
  while i < n do
    out[#out + 1] = struct.pack('<f', struct.unpack('<f', x, i * 4 + 1) + struct.unpack('<f', y, i * 4 + 1))
    i = i + 1
  end
  return table.concat(out)
end
redis.call('HSET', KEYS[4], 's' .. ARGV[2], blob)
local prefix = redis.call('GET', KEYS[5])
while true do
  local v = redis.call('HGET', KEYS[4], 's' .. nxt)
  if not v then
    break
  end
  if prefix then prefix = add(prefix, v) else prefix = v end
  redis.call('HDEL', KEYS[4], 's' .. nxt)
  nxt = nxt + 1
end
redis.call('HSET', KEYS[4], 'next', nxt)
if prefix then
  redis.call('SET', KEYS[5], prefix)
end
local pending = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[4])) do
  if f ~= 'next' then
    pending[#pending + 1] = tonumber(string.sub(f, 2))
  end
end
table.sort(pending)
local sum = prefix
for _, j in ipairs(pending) do
  local v = redis.call('HGET', KEYS[4], 's' .. j)
  if sum then sum = add(sum, v) else sum = v end
end
redis.call('SET', KEYS[1], sum)
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"#;

static ACCUMULATE: LazyLock<Script> = LazyLock::new(|| Script::new(ACCUMULATE_LUA));

/// Error code both backends use for a vector of the wrong length.
const WRONGLEN: &str = "WRONGLEN";

/// A store client over RESP: the embedded store or a real Redis. Cheap to clone; clones share
/// one multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: MultiplexedConnection,
    backend: ServerKind,
    /// The direct connection for vectors (`PEERLESS.ACCUM`, `GET` into floats; embedded
    /// store over TCP only).
    line: Option<Arc<VectorLine>>,
    /// The URL with the password elided.
    url: Arc<str>,
    /// For scrubbing error text; never displayed.
    secret: Option<Arc<str>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects with [`RedisStoreConfig::default`]; see [`RedisStore::connect_with`].
    ///
    /// # Errors
    /// As [`RedisStore::connect_with`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &RedisStoreConfig::default()).await
    }

    /// Connects to `url` (`redis://[[user]:password@]host:port[/db]`), authenticates, and detects
    /// the backend.
    ///
    /// # Errors
    /// [`StoreError::Connect`] if the URL is invalid, the server is unreachable, the password
    /// is wrong or missing, or the server answers the probe unexpectedly.
    #[instrument(level = "debug", skip_all, fields(url = %elide_password(url)))]
    pub async fn connect_with(url: &str, config: &RedisStoreConfig) -> Result<Self, StoreError> {
        let shown = elide_password(url);
        let secret = url_password(url);
        let fail = |reason: String| StoreError::Connect {
            url: shown.clone(),
            reason: scrub(&reason, secret.as_deref()),
        };
        let info = url.into_connection_info().map_err(|e| fail(format!("invalid URL: {e}")))?;
        // Commands are request/response: never hold a command's last segment back waiting
        // for the previous one's ACK (Nagle).
        let info = info.set_tcp_settings(TcpSettings::default().set_nodelay(true));
        let direct = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Some((
                host.clone(),
                *port,
                info.redis_settings().username().map(str::to_owned),
                info.redis_settings().password().map(str::to_owned),
            )),
            _ => None,
        };
        let client = Client::open(info).map_err(|e| fail(format!("invalid URL: {e}")))?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await
            .map_err(|e| fail(e.to_string()))?;
        // Without a password in the URL redis-rs sends no AUTH and the handshake "succeeds";
        // PING is then refused with NOAUTH. (PEERLESS.PING cannot serve as that check: Redis
        // rejects unknown commands before it checks authentication.)
        match redis::cmd("PING").query_async::<String>(&mut conn).await {
            Ok(_) => {}
            Err(e) if e.code() == Some("NOAUTH") => {
                return Err(fail("authentication required (no password in the URL?)".to_owned()));
            }
            Err(e) => return Err(fail(format!("PING failed: {e}"))),
        }
        let backend = match redis::cmd("PEERLESS.PING").query_async::<String>(&mut conn).await {
            Ok(s) if s == "PEERLESS" => ServerKind::Embedded,
            Ok(s) => return Err(fail(format!("unexpected PEERLESS.PING reply {s:?}"))),
            Err(e) if e.detail().is_some_and(|d| d.starts_with("unknown command")) => ServerKind::Redis,
            Err(e) => return Err(fail(format!("backend probe failed: {e}"))),
        };
        debug!(?backend, "store connected");
        let line = match (backend, direct) {
            (ServerKind::Embedded, Some((host, port, user, password))) => {
                Some(Arc::new(VectorLine::new(host, port, user, password, config.response_timeout)))
            }
            _ => None,
        };
        Ok(Self { conn, backend, line, url: shown.into(), secret: secret.map(Into::into) })
    }

    /// The detected backend.
    pub fn backend(&self) -> ServerKind {
        self.backend
    }

    /// The URL connected to, password elided.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn command_error(&self, command: &str, e: &RedisError) -> StoreError {
        StoreError::Command {
            command: command.to_owned(),
            reason: scrub(&e.to_string(), self.secret.as_deref()),
        }
    }
}

impl Store for RedisStore {
    #[instrument(level = "debug", skip(self, value), fields(len = value.len()))]
    async fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.command_error("SET", &e))
    }

    #[instrument(level = "debug", skip(self))]
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET").arg(key).query_async(&mut conn).await.map_err(|e| self.command_error("GET", &e))
    }

    #[instrument(level = "debug", skip(self, out))]
    async fn get_floats(&self, key: &str, out: &mut Vec<f32>) -> Result<bool, StoreError> {
        let Some(line) = &self.line else {
            let Some(bytes) = self.get(key).await? else { return Ok(false) };
            super::floats_into(key, &bytes, out)?;
            return Ok(true);
        };
        let command = |reason: &str| StoreError::Command {
            command: "GET".to_owned(),
            reason: scrub(reason, self.secret.as_deref()),
        };
        match line.get_floats(key, out).await {
            Ok(GetReply::Found) => Ok(true),
            Ok(GetReply::Missing) => Ok(false),
            Ok(GetReply::NotFloats { len }) => Err(super::not_floats(key, len)),
            Ok(GetReply::Error { code, message }) => Err(command(&format!("{code} {message}"))),
            Err(e) => Err(command(&e.to_string())),
        }
    }

    #[instrument(level = "debug", skip(self))]
    async fn delete(&self, keys: &[&str]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        cmd.arg(super::with_companions(keys));
        let mut conn = self.conn.clone();
        cmd.query_async::<i64>(&mut conn).await.map(drop).map_err(|e| self.command_error("DEL", &e))
    }

    #[instrument(level = "debug", skip(self, grad), fields(len = grad.len(), backend = ?self.backend))]
    async fn accumulate(&self, key: &str, token: &str, slot: u32, grad: &[f32]) -> Result<bool, StoreError> {
        if let Some(line) = &self.line {
            return match line.accumulate(key, token, slot, grad).await {
                Ok(AccumReply::Applied(applied)) => Ok(applied),
                Ok(AccumReply::Error { code, message }) if code == WRONGLEN => {
                    Err(StoreError::BadValue { key: key.to_owned(), reason: message })
                }
                Ok(AccumReply::Error { code, message }) => Err(StoreError::Command {
                    command: "PEERLESS.ACCUM".to_owned(),
                    reason: scrub(&format!("{code} {message}"), self.secret.as_deref()),
                }),
                Err(e) => Err(StoreError::Command {
                    command: "PEERLESS.ACCUM".to_owned(),
                    reason: scrub(&e.to_string(), self.secret.as_deref()),
                }),
            };
        }
        let blob = LeF32(grad);
        let mut conn = self.conn.clone();
        let (command, result) = match self.backend {
            ServerKind::Embedded => (
                "PEERLESS.ACCUM",
                redis::cmd("PEERLESS.ACCUM")
                    .arg(key)
                    .arg(token)
                    .arg(slot)
                    .arg(&blob)
                    .query_async::<i64>(&mut conn)
                    .await,
            ),
            ServerKind::Redis => (
                "EVALSHA(accumulate)",
                ACCUMULATE
                    .key(key)
                    .key(format!("{key}:n"))
                    .key(format!("{key}:tokens"))
                    .key(format!("{key}:slots"))
                    .key(format!("{key}:prefix"))
                    .arg(token)
                    .arg(slot)
                    .arg(&blob)
                    .invoke_async::<i64>(&mut conn)
                    .await,
            ),
        };
        match result {
            Ok(1) => Ok(true),
            Ok(0) => Ok(false),
            Ok(n) => Err(StoreError::Command {
                command: command.to_owned(),
                reason: format!("unexpected reply {n}"),
            }),
            Err(e) if e.code() == Some(WRONGLEN) => Err(StoreError::BadValue {
                key: key.to_owned(),
                reason: e.detail().unwrap_or("wrong vector length").to_owned(),
            }),
            Err(e) => Err(self.command_error(command, &e)),
        }
    }

    #[instrument(level = "debug", skip(self))]
    async fn read_accumulated(&self, key: &str) -> Result<Option<Accumulated>, StoreError> {
        let mut conn = self.conn.clone();
        let (sum, count): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("MGET")
            .arg(key)
            .arg(format!("{key}:n"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("MGET", &e))?;
        Accumulated::decode(key, sum.as_deref(), count.as_deref())
    }
}

/// A vector as one command argument of little-endian `f32`s, encoded straight into the
/// command (no intermediate byte vector).
struct LeF32<'a>(&'a [f32]);

impl ToRedisArgs for LeF32<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        use std::io::Write;
        const CHUNK: usize = 1024;
        out.reserve_space_for_args([self.0.len() * 4]);
        let mut w = out.writer_for_next_arg();
        let mut buf = [0u8; CHUNK * 4];
        for chunk in self.0.chunks(CHUNK) {
            le_bytes_into(chunk, &mut buf);
            w.write_all(&buf[..chunk.len() * 4]).expect("invariant: writing into memory cannot fail");
        }
    }
}

/// `url` with the password (userinfo after the first `:`, or a `password=`/`pass=` query
/// parameter) replaced by `***`.
pub fn elide_password(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    let rest = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str("***");
                }
                None => out.push_str(userinfo),
            }
            &rest[at..]
        }
        None => rest,
    };
    match rest.find('?') {
        None => out.push_str(rest),
        Some(q) => {
            out.push_str(&rest[..=q]);
            let params: Vec<String> = rest[q + 1..]
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") => {
                        format!("{k}=***")
                    }
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

/// The password in `url`'s userinfo, as written (percent-encoded), if any.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// Removes `secret` (raw and percent-decoded) from `text`.
fn scrub(text: &str, secret: Option<&str>) -> String {
    let Some(secret) = secret else {
        return text.to_owned();
    };
    let mut out = text.replace(secret, "***");
    let decoded = crate::percent::decode(secret);
    if !decoded.is_empty() {
        out = out.replace(&decoded, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_encoded_as_one_little_endian_argument() {
        for n in [0, 1, 1023, 1024, 1025, 5000] {
            let v: Vec<f32> = (0..n).map(|i| i as f32 * -0.37).collect();
            assert_eq!(LeF32(&v).to_redis_args(), vec![peerless_core::flat::to_le_bytes(&v)], "{n}");
        }
    }

    #[test]
    fn elides_passwords() {
        assert_eq!(elide_password("redis://:s3cret@127.0.0.1:6379/"), "redis://:***@127.0.0.1:6379/");
        assert_eq!(elide_password("redis://user:p@ss@host:1/0"), "redis://user:***@host:1/0");
        assert_eq!(elide_password("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(elide_password("redis://user@host/"), "redis://user@host/");
        assert_eq!(
            elide_password("redis+unix:///tmp/r.sock?db=1&pass=xyz"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
    }

    #[test]
    fn finds_and_scrubs_the_password() {
        assert_eq!(url_password("redis://:a%40b@h:1/").as_deref(), Some("a%40b"));
        assert_eq!(url_password("redis://h:1/"), None);
        assert_eq!(url_password("redis://u:@h:1/"), None);
        assert_eq!(scrub("bad a@b and a%40b", Some("a%40b")), "bad *** and ***");
        assert_eq!(scrub("nothing", None), "nothing");
    }
}
