//! A direct connection for the embedded store's `PEERLESS.ACCUM`: the vector goes from the caller's slice to the socket through one reused buffer.
//!
//! Through redis-rs a gradient was copied three times whole before the kernel's copy: into
//! the command's argument buffer, into the packed command, and into the connection's codec
//! buffer — for the MLP's 940 KB about as much CPU as sending it. This connection writes the
//! RESP header and then the little-endian bytes in 256 KB pieces, each encoded into the same
//! buffer, and reads the one-line reply. It holds its own TCP connection (`TCP_NODELAY`,
//! `AUTH` first), opened on first use and dropped after any I/O error or timeout, so the next
//! call reconnects. Calls on one [`AccumLine`] take turns (one request in flight at a time,
//! which is all a function instance does).

use std::time::Duration;

use peerless_core::flat::extend_le_bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Floats encoded per write.
const PIECE: usize = 64 * 1024;

/// The outcome of one `PEERLESS.ACCUM`, as the server answered it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AccumReply {
    /// `:1` or `:0`: whether the vector was added.
    Applied(bool),
    /// `-CODE message`.
    Error { code: String, message: String },
}

/// Where to connect and how to authenticate.
pub(super) struct AccumLine {
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

impl std::fmt::Debug for AccumLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccumLine")
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

impl AccumLine {
    /// A line to `host:port`, authenticating with `password` (and `username`, if given);
    /// `timeout` bounds each call, connection included.
    pub(super) fn new(
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
        timeout: Duration,
    ) -> AccumLine {
        AccumLine {
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
        let r = tokio::time::timeout(self.timeout, self.exchange(&mut state, key, token, slot, grad)).await;
        let r = r.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply within {:?}", self.timeout),
            ))
        });
        if r.is_err() {
            state.stream = None;
        }
        r
    }

    async fn exchange(
        &self,
        state: &mut State,
        key: &str,
        token: &str,
        slot: u32,
        grad: &[f32],
    ) -> std::io::Result<AccumReply> {
        let State { stream, buf } = state;
        if stream.is_none() {
            *stream = Some(self.connect(buf).await?);
        }
        let stream = stream.as_mut().expect("invariant: connected above");
        buf.clear();
        buf.extend_from_slice(b"*5\r\n");
        bulk(buf, b"PEERLESS.ACCUM");
        bulk(buf, key.as_bytes());
        bulk(buf, token.as_bytes());
        bulk(buf, slot.to_string().as_bytes());
        buf.extend_from_slice(format!("${}\r\n", grad.len() * 4).as_bytes());
        // The header rides with the first piece; the trailer with the last.
        let mut pieces = grad.chunks(PIECE).peekable();
        if pieces.peek().is_none() {
            buf.extend_from_slice(b"\r\n");
            stream.write_all(buf).await?;
        }
        while let Some(piece) = pieces.next() {
            extend_le_bytes(buf, piece);
            if pieces.peek().is_none() {
                buf.extend_from_slice(b"\r\n");
            }
            stream.write_all(buf).await?;
            buf.clear();
        }
        match read_line(stream, buf).await? {
            line if line.starts_with(b":") => match &line[1..] {
                b"1" => Ok(AccumReply::Applied(true)),
                b"0" => Ok(AccumReply::Applied(false)),
                other => Err(io_error(format!("unexpected reply :{}", String::from_utf8_lossy(other)))),
            },
            line if line.starts_with(b"-") => {
                let text = String::from_utf8_lossy(&line[1..]).into_owned();
                let (code, message) = text.split_once(' ').unwrap_or((&text, ""));
                Ok(AccumReply::Error { code: code.to_owned(), message: message.to_owned() })
            }
            line => Err(io_error(format!("unexpected reply {:?}", String::from_utf8_lossy(&line)))),
        }
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

/// Reads one `\r\n`-terminated reply line (without the terminator). The server sends nothing
/// else on this connection, so nothing past the line is lost.
async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    buf.clear();
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(buf[..end].to_vec());
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
