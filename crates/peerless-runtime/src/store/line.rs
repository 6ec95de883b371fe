//! A direct connection to the embedded store for the vectors a function instance moves: `GET` of the parameters into a reused `Vec<f32>`, `PEERLESS.ACCUM` of a gradient from its slice.
//!
//! Through redis-rs a gradient was copied three times whole before the kernel's copy: into
//! the command's argument buffer, into the packed command, and into the connection's codec
//! buffer — for the MLP's 940 KB about as much CPU as sending it. The parameters came back
//! the same way: into the codec's growing buffer, into a `Vec<u8>`, then decoded into a
//! `Vec<f32>`. This connection writes a gradient's RESP header and then its little-endian
//! bytes as they lie in memory ([`super::floats`]), and reads a `GET` reply's bytes straight
//! into the caller's vector. It holds its own TCP connection (`TCP_NODELAY`, `AUTH` first),
//! opened on first use and dropped after any I/O error or timeout, so the next call
//! reconnects. Calls on one [`VectorLine`] take turns (one request in flight at a time, which
//! is all a function instance does).

use std::future::Future;
use std::time::Duration;

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::floats;

/// The longest `GET` reply taken (1 GiB): a vector, not whatever a store claims.
const MAX_VALUE: usize = 1 << 30;

/// The outcome of one `PEERLESS.ACCUM`, as the server answered it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AccumReply {
    /// `:1` or `:0`: whether the vector was added.
    Applied(bool),
    /// `-CODE message`.
    Error { code: String, message: String },
}

/// The outcome of one `GET` of a vector, as the server answered it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum GetReply {
    /// The value is in the caller's vector.
    Found,
    /// `$-1`: no such key.
    Missing,
    /// The value's length (in bytes) is not a whole number of `f32`s (the connection is
    /// dropped: the value was not read).
    NotFloats { len: usize },
    /// `-CODE message`.
    Error { code: String, message: String },
}

/// Where to connect and how to authenticate.
pub(super) struct VectorLine {
    host: String,
    port: u16,
    auth: Option<(Option<String>, String)>,
    timeout: Duration,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for VectorLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorLine")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

fn io_error(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

impl VectorLine {
    /// A line to `host:port`, authenticating with `password` (and `username`, if given);
    /// `timeout` bounds each call, connection included.
    pub(super) fn new(
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
        timeout: Duration,
    ) -> VectorLine {
        VectorLine {
            host,
            port,
            auth: password.map(|p| (username, p)),
            timeout,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Sends `PEERLESS.ACCUM key token slot <grad as little-endian f32>` and returns the reply.
    /// An I/O error or timeout drops the connection (the next call reconnects).
    pub(super) async fn accumulate(
        &self,
        key: &str,
        token: &str,
        slot: u32,
        grad: &[f32],
    ) -> std::io::Result<AccumReply> {
        let mut state = self.state.lock().await;
        let r = self.bounded(self.accumulate_on(&mut state, key, token, slot, grad)).await;
        if r.is_err() {
            state.stream = None;
        }
        r
    }

    /// Sends `GET key` and reads the value, little-endian `f32`s, straight into `out` (resized,
    /// its allocation reused). On an error `out` may hold part of the value. An I/O error, a
    /// timeout or a value that is not floats drops the connection.
    pub(super) async fn get_floats(&self, key: &str, out: &mut Vec<f32>) -> std::io::Result<GetReply> {
        let mut state = self.state.lock().await;
        let r = self.bounded(self.get_on(&mut state, key, out)).await;
        if !matches!(r, Ok(GetReply::Found | GetReply::Missing | GetReply::Error { .. })) {
            state.stream = None;
        }
        r
    }

    /// `call`, failed with `TimedOut` when it takes longer than the line's timeout.
    async fn bounded<T>(&self, call: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
        tokio::time::timeout(self.timeout, call).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {:?}", self.timeout),
            ))
        })
    }

    /// The line's connection (opened when there is none) and its buffer.
    async fn open<'s>(&self, state: &'s mut State) -> std::io::Result<(&'s mut TcpStream, &'s mut Vec<u8>)> {
        let State { stream, buf } = state;
        if stream.is_none() {
            *stream = Some(self.connect(buf).await?);
        }
        Ok((stream.as_mut().expect("invariant: connected above"), buf))
    }

    async fn accumulate_on(
        &self,
        state: &mut State,
        key: &str,
        token: &str,
        slot: u32,
        grad: &[f32],
    ) -> std::io::Result<AccumReply> {
        let (stream, buf) = self.open(state).await?;
        buf.clear();
        buf.extend_from_slice(b"*5\r\n");
        bulk(buf, b"PEERLESS.ACCUM");
        bulk(buf, key.as_bytes());
        bulk(buf, token.as_bytes());
        bulk(buf, slot.to_string().as_bytes());
        buf.extend_from_slice(format!("${}\r\n", grad.len() * 4).as_bytes());
        // Header, the vector's own bytes and the trailer in one vectored write.
        let data = floats::le_bytes(grad);
        stream.write_all_buf(&mut Buf::chain(Buf::chain(&buf[..], &data[..]), &b"\r\n"[..])).await?;
        match read_line(stream, buf).await? {
            line if line.starts_with(b":") => match &line[1..] {
                b"1" => Ok(AccumReply::Applied(true)),
                b"0" => Ok(AccumReply::Applied(false)),
                other => Err(io_error(format!("unexpected reply :{}", String::from_utf8_lossy(other)))),
            },
            line if line.starts_with(b"-") => {
                let (code, message) = server_error(&line);
                Ok(AccumReply::Error { code, message })
            }
            line => Err(io_error(format!("unexpected reply {:?}", String::from_utf8_lossy(&line)))),
        }
    }

    async fn get_on(&self, state: &mut State, key: &str, out: &mut Vec<f32>) -> std::io::Result<GetReply> {
        let (stream, buf) = self.open(state).await?;
        buf.clear();
        buf.extend_from_slice(b"*2\r\n");
        bulk(buf, b"GET");
        bulk(buf, key.as_bytes());
        stream.write_all(buf).await?;
        let end = read_head(stream, buf).await?;
        let line = &buf[..end];
        if line.starts_with(b"-") {
            let (code, message) = server_error(line);
            return Ok(GetReply::Error { code, message });
        }
        let len = match line.strip_prefix(b"$") {
            Some(b"-1") => return Ok(GetReply::Missing),
            Some(n) => std::str::from_utf8(n).ok().and_then(|n| n.parse::<usize>().ok()),
            None => None,
        };
        let Some(len) = len else {
            return Err(io_error(format!("unexpected reply {:?}", String::from_utf8_lossy(line))));
        };
        if len > MAX_VALUE {
            return Err(io_error(format!("a value of {len} bytes exceeds the {MAX_VALUE}-byte limit")));
        }
        if !len.is_multiple_of(4) {
            return Ok(GetReply::NotFloats { len });
        }
        // What came with the reply's first line is the start of the value (and perhaps of the
        // trailing CRLF); the rest goes from the socket straight into `out`.
        let early = &buf[end + 2..];
        if early.len() > len + 2 {
            return Err(io_error("more bytes than one reply"));
        }
        out.resize(len / 4, 0.0);
        let dst = floats::bytes_mut(out);
        let have = early.len().min(len);
        dst[..have].copy_from_slice(&early[..have]);
        let mut trailer = [0u8; 2];
        let crlf_have = early.len() - have;
        trailer[..crlf_have].copy_from_slice(&early[have..]);
        stream.read_exact(&mut dst[have..]).await?;
        stream.read_exact(&mut trailer[crlf_have..]).await?;
        if &trailer != b"\r\n" {
            return Err(io_error("a value not followed by CRLF"));
        }
        floats::from_le_in_place(out);
        Ok(GetReply::Found)
    }

    async fn connect(&self, buf: &mut Vec<u8>) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        if let Some((user, password)) = &self.auth {
            buf.clear();
            let n = if user.is_some() { 3 } else { 2 };
            buf.extend_from_slice(format!("*{n}\r\n").as_bytes());
            bulk(buf, b"AUTH");
            if let Some(u) = user {
                bulk(buf, u.as_bytes());
            }
            bulk(buf, password.as_bytes());
            stream.write_all(buf).await?;
            let line = read_line(&mut stream, buf).await?;
            if line != b"+OK" {
                // Never echo the server's text: it could quote the password.
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "AUTH refused"));
            }
        }
        Ok(stream)
    }
}

/// Reads one `\r\n`-terminated reply line (without the terminator). Only for replies that
/// are one line: anything read past it is dropped.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let end = read_head(stream, buf).await?;
    Ok(buf[..end].to_vec())
}

/// Reads into `buf` (cleared first) until it holds a `\r\n`; returns where that starts. Reads
/// are small, so little past the line comes with it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.clear();
    let mut chunk = [0u8; 64];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(end);
        }
        if buf.len() > 64 * 1024 {
            return Err(io_error("reply line longer than 64 KB"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `-CODE message` as its code and message.
fn server_error(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(&line[1..]).into_owned();
    let (code, message) = text.split_once(' ').unwrap_or((&text, ""));
    (code.to_owned(), message.to_owned())
}
