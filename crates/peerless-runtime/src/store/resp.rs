//! RESP2 codec for the embedded store: bounded, incremental command parsing and reply encoding.
//!
//! Commands arrive as arrays of bulk strings (`*N\r\n$len\r\n<bytes>\r\n...`), the only form
//! redis clients send; inline commands are refused. Parsing works on whatever prefix of the
//! stream has arrived: [`split_command`] either returns a whole command, says how many bytes
//! it needs before trying again, or rejects the input. Every claim in a header is checked
//! against [`FrameLimits`] before it is believed, and nothing is allocated from a claimed length:
//! arguments are taken out only once the whole frame is in the buffer. [`split_command`]
//! takes them without copying the large ones: the frame is split off the read buffer and
//! each argument of at least [`SHARE_ABOVE`] bytes is a view into it (a gradient or a
//! parameter vector is never copied between the socket and the data it becomes).
//!
//! Replies are the RESP2 types the server needs: simple string, error, integer, bulk string,
//! null bulk and array. [`write_reply`] writes large bulk payloads straight to the socket
//! instead of copying them into an output buffer.
//!
//! Public only for the fuzz targets (`fuzz/fuzz_targets/resp.rs`); the embedded store is its
//! one user.

use bytes::{Bytes, BytesMut};
#[cfg(feature = "drivers")]
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Hard limits on one command frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Longest header line (`*N` or `$len`), CRLF included.
    pub max_line: usize,
    /// Most arguments in one command.
    pub max_array: usize,
    /// Longest single argument.
    pub max_bulk: usize,
    /// Most argument bytes in one command, all arguments together.
    pub max_frame: usize,
}

impl FrameLimits {
    /// For authenticated clients: Redis's own defaults (`proto-max-bulk-len` 512 MiB,
    /// `client-query-buffer-limit` 1 GiB, 1 Mi arguments).
    pub const AUTHENTICATED: FrameLimits = FrameLimits {
        max_line: 64,
        max_array: 1024 * 1024,
        max_bulk: 512 * 1024 * 1024,
        max_frame: 1024 * 1024 * 1024,
    };

    /// Before `AUTH` succeeds: like Redis, only small frames (10 arguments of 16 KiB), so an
    /// unauthenticated peer cannot make the server buffer much.
    pub const UNAUTHENTICATED: FrameLimits =
        FrameLimits { max_line: 64, max_array: 10, max_bulk: 16 * 1024, max_frame: 64 * 1024 };
}

/// Malformed or over-limit input. The server answers `-ERR Protocol error: ...` and closes the
/// connection, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(String);

/// Outcome of one [`split_command`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command (possibly empty: `*0` and `*-1` are skipped without reply, as in Redis)
    /// and the number of buffer bytes it took.
    Command {
        /// The arguments; the first is the command name.
        args: Vec<Bytes>,
        /// Bytes to drop from the front of the buffer.
        consumed: usize,
    },
    /// The frame is not complete; do not parse again before the buffer holds at least `need`
    /// bytes (always more than it holds now). A hint only: never allocate from it.
    Incomplete {
        /// Minimum buffer length for progress.
        need: usize,
    },
}

/// Arguments at least this long are views into the received frame instead of copies. Shorter
/// ones are copied, so that a small stored value never pins a large read buffer.
pub const SHARE_ABOVE: usize = 64 * 1024;

/// A complete frame found by [`scan`]: argument ranges within the buffer, and its length.
struct Frame {
    ranges: Vec<(usize, usize)>,
    consumed: usize,
}

/// Parses the command at the start of `buf`, copying its arguments out.
///
/// # Errors
/// [`ProtocolError`] if the bytes are not a RESP2 array of bulk strings or break a limit.
pub fn parse_command(buf: &[u8], limits: &FrameLimits) -> Result<Parsed, ProtocolError> {
    Ok(match scan(buf, limits)? {
        Ok(Frame { ranges, consumed }) => Parsed::Command {
            args: ranges.iter().map(|&(s, e)| Bytes::copy_from_slice(&buf[s..e])).collect(),
            consumed,
        },
        Err(need) => Parsed::Incomplete { need },
    })
}

/// Takes the command at the start of `buf` out of it: on [`Parsed::Command`] the frame's
/// bytes are gone from `buf`, and arguments of [`SHARE_ABOVE`] bytes or more share the
/// frame's memory (which `buf` can reuse once they are dropped). On
/// [`Parsed::Incomplete`] or an error `buf` is unchanged.
///
/// # Errors
/// [`ProtocolError`] if the bytes are not a RESP2 array of bulk strings or break a limit.
pub fn split_command(buf: &mut BytesMut, limits: &FrameLimits) -> Result<Parsed, ProtocolError> {
    Ok(match scan(buf, limits)? {
        Ok(Frame { ranges, consumed }) => {
            let args = if ranges.iter().any(|&(s, e)| e - s >= SHARE_ABOVE) {
                let frame = buf.split_to(consumed).freeze();
                ranges
                    .iter()
                    .map(|&(s, e)| {
                        if e - s >= SHARE_ABOVE {
                            frame.slice(s..e)
                        } else {
                            Bytes::copy_from_slice(&frame[s..e])
                        }
                    })
                    .collect()
            } else {
                // All small: copy, and keep the read buffer unshared.
                let args = ranges.iter().map(|&(s, e)| Bytes::copy_from_slice(&buf[s..e])).collect();
                bytes::Buf::advance(buf, consumed);
                args
            };
            Parsed::Command { args, consumed }
        }
        Err(need) => Parsed::Incomplete { need },
    })
}

/// Finds the frame at the start of `buf`: `Ok(frame)`, or `Err(need)` when it has not fully
/// arrived (see [`Parsed::Incomplete`]).
fn scan(buf: &[u8], limits: &FrameLimits) -> Result<Result<Frame, usize>, ProtocolError> {
    let incomplete_line = Err(buf.len() + 1);
    match buf.first() {
        None => return Ok(incomplete_line),
        Some(b'*') => {}
        Some(&c) => return Err(ProtocolError(format!("expected '*', got '{}'", show(c)))),
    }
    let Some((count, mut pos)) = read_int_line(buf, 1, limits.max_line)? else {
        return Ok(incomplete_line);
    };
    if count == 0 || count == -1 {
        return Ok(Ok(Frame { ranges: Vec::new(), consumed: pos }));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| n <= limits.max_array)
        .ok_or_else(|| ProtocolError("invalid multibulk length".to_owned()))?;

    // Validate headers and find the argument ranges. `ranges` grows only with arguments
    // actually present in the buffer, never with the claimed count.
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(count.min(16));
    let mut total = 0usize;
    for _ in 0..count {
        match buf.get(pos) {
            None => return Ok(Err(pos + 1)),
            Some(b'$') => {}
            Some(&c) => return Err(ProtocolError(format!("expected '$', got '{}'", show(c)))),
        }
        let Some((len, start)) = read_int_line(buf, pos + 1, limits.max_line)? else {
            return Ok(incomplete_line);
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= limits.max_bulk)
            .ok_or_else(|| ProtocolError("invalid bulk length".to_owned()))?;
        total = total
            .checked_add(len)
            .filter(|&t| t <= limits.max_frame)
            .ok_or_else(|| ProtocolError("command too large".to_owned()))?;
        // Cannot overflow: `start <= buf.len()` and `len <= max_bulk`.
        let end = start + len;
        if buf.len() < end + 2 {
            return Ok(Err(end + 2));
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError("expected CRLF after bulk string".to_owned()));
        }
        ranges.push((start, end));
        pos = end + 2;
    }
    Ok(Ok(Frame { ranges, consumed: pos }))
}

/// Reads a decimal integer line starting at `start` (just after the type byte). Returns the
/// value and the position after its CRLF, or `None` if the line has not fully arrived.
fn read_int_line(buf: &[u8], start: usize, max_line: usize) -> Result<Option<(i64, usize)>, ProtocolError> {
    let window_end = buf.len().min(start.saturating_add(max_line));
    let window = buf.get(start..window_end).unwrap_or_default();
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len().saturating_sub(start) >= max_line {
            return Err(ProtocolError("too big header line".to_owned()));
        }
        // A lone '\r' not followed by '\n' is caught once the next byte arrives.
        if let Some(i) = window.iter().position(|&b| b == b'\r')
            && i + 1 < window.len()
        {
            return Err(ProtocolError("expected LF after CR".to_owned()));
        }
        return Ok(None);
    };
    let digits = &window[..cr];
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError("invalid length".to_owned()));
    }
    let magnitude = digits.iter().fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'));
    let value = if negative { -magnitude } else { magnitude };
    Ok(Some((value, start + cr + 2)))
}

/// A byte for an error message: printable ASCII as is, anything else escaped.
fn show(c: u8) -> String {
    std::ascii::escape_default(c).to_string()
}

/// A reply to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+text` (CR and LF are replaced by spaces when encoded).
    Simple(String),
    /// `-CODE message` (CR and LF are replaced by spaces when encoded).
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$len` and the bytes.
    Bulk(Bytes),
    /// `$-1`.
    Null,
    /// `*N` and the elements.
    Array(Vec<Reply>),
}

impl Reply {
    /// `+OK`.
    pub fn ok() -> Self {
        Reply::Simple("OK".to_owned())
    }

    /// An error reply; `line` starts with its code (`ERR`, `NOAUTH`, ...).
    pub fn error(line: impl Into<String>) -> Self {
        Reply::Error(line.into())
    }
}

/// Bulk payloads at least this long are written straight from their buffer.
const DIRECT_WRITE: usize = 64 * 1024;

/// Appends the encoding of `reply` to `out`.
pub fn encode(reply: &Reply, out: &mut Vec<u8>) {
    let mut segments = Vec::new();
    let mut tail = Vec::new();
    encode_segments(reply, &mut segments, &mut tail);
    for seg in segments {
        out.extend_from_slice(&seg);
    }
    out.extend_from_slice(&tail);
}

/// Writes `reply` to `w` (not flushed). Not cancel-safe: a cancelled write leaves a partial
/// reply on the stream, so the caller must then close the connection.
#[cfg(feature = "drivers")]
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let mut segments = Vec::new();
    let mut tail = Vec::new();
    encode_segments(reply, &mut segments, &mut tail);
    for seg in &segments {
        w.write_all(seg).await?;
    }
    w.write_all(&tail).await
}

/// Encodes `reply` as a list of segments: small parts are gathered into `cur`; a large bulk
/// payload becomes its own segment (a cheap clone of its `Bytes`). On return `cur` holds the
/// last, not yet pushed, segment.
fn encode_segments(reply: &Reply, segments: &mut Vec<Bytes>, cur: &mut Vec<u8>) {
    // Iterative, so a deep array cannot overflow the stack.
    let mut stack: Vec<std::slice::Iter<'_, Reply>> = Vec::new();
    let mut next = Some(reply);
    loop {
        if let Some(r) = next.take() {
            match r {
                Reply::Simple(s) => line(cur, b'+', s),
                Reply::Error(s) => line(cur, b'-', s),
                Reply::Integer(n) => cur.extend_from_slice(format!(":{n}\r\n").as_bytes()),
                Reply::Null => cur.extend_from_slice(b"$-1\r\n"),
                Reply::Bulk(b) => {
                    cur.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                    if b.len() >= DIRECT_WRITE {
                        segments.push(Bytes::from(std::mem::take(cur)));
                        segments.push(b.clone());
                    } else {
                        cur.extend_from_slice(b);
                    }
                    cur.extend_from_slice(b"\r\n");
                }
                Reply::Array(items) => {
                    cur.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                    stack.push(items.iter());
                }
            }
        }
        match stack.last_mut() {
            None => return,
            Some(it) => match it.next() {
                Some(r) => next = Some(r),
                None => {
                    stack.pop();
                }
            },
        }
    }
}

/// `<kind><text>\r\n` with CR/LF in `text` replaced, so a reply can never split in two.
fn line(out: &mut Vec<u8>, kind: u8, text: &str) {
    out.push(kind);
    out.extend(text.bytes().map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: FrameLimits = FrameLimits::AUTHENTICATED;

    fn command(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn args_of(p: Parsed) -> (Vec<Vec<u8>>, usize) {
        match p {
            Parsed::Command { args, consumed } => (args.iter().map(|a| a.to_vec()).collect(), consumed),
            Parsed::Incomplete { need } => panic!("incomplete, need {need}"),
        }
    }

    fn err_of(input: &[u8], limits: &FrameLimits) -> String {
        match parse_command(input, limits) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("expected an error for {input:?}, got {p:?}"),
        }
    }

    #[test]
    fn parses_a_command() {
        let frame = command(&[b"SET", b"k", b"v\r\nx"]);
        let (args, consumed) = args_of(parse_command(&frame, &A).expect("parse"));
        assert_eq!(args, vec![b"SET".to_vec(), b"k".to_vec(), b"v\r\nx".to_vec()]);
        assert_eq!(consumed, frame.len());
    }

    #[test]
    fn parses_pipelined_commands_one_at_a_time() {
        let mut buf = command(&[b"PING"]);
        buf.extend(command(&[b"GET", b"a"]));
        let (args, consumed) = args_of(parse_command(&buf, &A).expect("parse"));
        assert_eq!(args, vec![b"PING".to_vec()]);
        let (args, rest) = args_of(parse_command(&buf[consumed..], &A).expect("parse"));
        assert_eq!(args, vec![b"GET".to_vec(), b"a".to_vec()]);
        assert_eq!(consumed + rest, buf.len());
    }

    #[test]
    fn empty_arrays_are_skipped() {
        assert_eq!(parse_command(b"*0\r\n", &A), Ok(Parsed::Command { args: vec![], consumed: 4 }));
        assert_eq!(parse_command(b"*-1\r\n", &A), Ok(Parsed::Command { args: vec![], consumed: 5 }));
        assert!(err_of(b"$0\r\n\r\n", &A).starts_with("Protocol error: "), "a bare bulk is an error");
    }

    #[test]
    fn every_prefix_is_incomplete_with_a_growing_need() {
        let frame = command(&[b"PEERLESS.ACCUM", b"key", b"tok", &[0u8; 300]]);
        for cut in 0..frame.len() {
            match parse_command(&frame[..cut], &A) {
                Ok(Parsed::Incomplete { need }) => {
                    assert!(need > cut && need <= frame.len(), "cut {cut}: need {need}")
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        let (args, consumed) = args_of(parse_command(&frame, &A).expect("parse"));
        assert_eq!(args.len(), 4);
        assert_eq!(consumed, frame.len());
    }

    #[test]
    fn split_command_shares_large_arguments_and_leaves_the_rest() {
        let big: Vec<u8> = (0..SHARE_ABOVE).map(|i| i as u8).collect();
        let first = command(&[b"PEERLESS.ACCUM", b"k", b"t", &big]);
        let mut wire = first.clone();
        wire.extend(command(&[b"PING"]));
        let mut buf = BytesMut::from(&wire[..]);
        let base = buf.as_ptr();
        let Parsed::Command { args, consumed } = split_command(&mut buf, &A).expect("parse") else {
            panic!("incomplete");
        };
        assert_eq!(consumed, first.len());
        assert_eq!(&args[..3], &[&b"PEERLESS.ACCUM"[..], b"k", b"t"]);
        assert!(args[3] == big, "large argument intact");
        let at = first.len() - big.len() - 2;
        assert_eq!(args[3].as_ptr(), base.wrapping_add(at), "a large argument is a view, not a copy");
        assert_eq!(&buf[..], &command(&[b"PING"])[..], "the next command stays in the buffer");
        // An incomplete frame leaves the buffer as it was.
        let mut partial = BytesMut::from(&first[..first.len() - 1]);
        assert_eq!(split_command(&mut partial, &A), Ok(Parsed::Incomplete { need: first.len() }));
        assert_eq!(partial.len(), first.len() - 1);
        // Small arguments are copied; once the large one is dropped the memory is reused.
        assert_eq!(args_of(split_command(&mut buf, &A).expect("parse")).0, vec![b"PING".to_vec()]);
        assert!(buf.is_empty());
        drop(args);
        buf.reserve(first.len());
        assert_eq!(buf.as_ptr(), base, "the read buffer's memory is reclaimed");
    }

    #[test]
    fn a_huge_claim_is_not_believed_or_allocated() {
        // Claims 500 MB but only the header has arrived: incomplete, nothing allocated.
        let p = parse_command(b"*2\r\n$3\r\nSET\r\n$500000000\r\nabc", &A).expect("parse");
        assert_eq!(p, Parsed::Incomplete { need: 25 + 500_000_000 + 2 });
        // A claimed array of a million arguments with none present.
        assert_eq!(parse_command(b"*1048576\r\n", &A), Ok(Parsed::Incomplete { need: 11 }));
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        let cases: &[&[u8]] = &[
            b"PING\r\n",
            b"+OK\r\n",
            b"*x\r\n",
            b"*\r\n",
            b"*1\r\n:1\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nabcd\r\n",
            b"*1\r\n$3\r\nabc\n\n",
            b"*-2\r\n",
            b"*+1\r\n",
            b"*1 \r\n",
            b"*1\r\n$1x\r\n",
            b"*1\rx",
            b"*99999999999999999999\r\n",
            b"*2000000\r\n",
            b"*1\r\n$600000000\r\n",
        ];
        for case in cases {
            let e = err_of(case, &A);
            assert!(e.starts_with("Protocol error: "), "{case:?}: {e}");
        }
    }

    #[test]
    fn header_lines_are_bounded() {
        let mut long = b"*".to_vec();
        long.extend(std::iter::repeat_n(b'1', 100));
        assert_eq!(err_of(&long, &A), "Protocol error: too big header line");
        let mut long = b"*1\r\n$".to_vec();
        long.extend(std::iter::repeat_n(b'0', 100));
        assert_eq!(err_of(&long, &A), "Protocol error: too big header line");
    }

    #[test]
    fn unauthenticated_limits_are_tight() {
        let u = FrameLimits::UNAUTHENTICATED;
        assert_eq!(err_of(b"*11\r\n", &u), "Protocol error: invalid multibulk length");
        assert_eq!(err_of(b"*1\r\n$20000\r\n", &u), "Protocol error: invalid bulk length");
        let frame = command(&[b"AUTH", b"default", b"secret"]);
        assert_eq!(args_of(parse_command(&frame, &u).expect("parse")).1, frame.len());
    }

    #[test]
    fn frame_total_is_bounded() {
        let limits = FrameLimits { max_line: 64, max_array: 10, max_bulk: 10, max_frame: 15 };
        assert_eq!(err_of(b"*2\r\n$8\r\n12345678\r\n$8\r\n", &limits), "Protocol error: command too large");
    }

    #[test]
    fn encodes_replies() {
        let reply = Reply::Array(vec![
            Reply::ok(),
            Reply::error("ERR bad\r\nthing"),
            Reply::Integer(-3),
            Reply::Bulk(Bytes::from_static(b"hi")),
            Reply::Null,
            Reply::Array(vec![]),
        ]);
        let mut out = Vec::new();
        encode(&reply, &mut out);
        assert_eq!(out, b"*6\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$2\r\nhi\r\n$-1\r\n*0\r\n".to_vec());
    }

    #[test]
    #[cfg(feature = "drivers")]
    fn large_bulk_is_written_whole() {
        let big = Bytes::from(vec![7u8; DIRECT_WRITE + 5]);
        let reply = Reply::Array(vec![Reply::Bulk(big.clone()), Reply::Integer(1)]);
        let mut expected = format!("*2\r\n${}\r\n", big.len()).into_bytes();
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"\r\n:1\r\n");
        let mut out = Vec::new();
        encode(&reply, &mut out);
        assert!(out == expected, "encode");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut written = Vec::new();
        rt.block_on(write_reply(&mut written, &reply)).expect("write");
        assert!(written == expected, "write_reply");
    }

    #[test]
    fn deep_arrays_do_not_recurse() {
        let mut reply = Reply::Null;
        for _ in 0..100_000 {
            reply = Reply::Array(vec![reply]);
        }
        let mut out = Vec::new();
        encode(&reply, &mut out);
        assert_eq!(out.len(), 100_000 * 4 + 5);
        // Drop iteratively too: a recursive drop of 100k nested arrays could overflow.
        let mut cur = reply;
        while let Reply::Array(mut v) = cur {
            cur = v.pop().unwrap_or(Reply::Null);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic, and every answer is self-consistent.
        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            for limits in [A, FrameLimits::UNAUTHENTICATED, FrameLimits { max_line: 4, max_array: 2, max_bulk: 3, max_frame: 4 }] {
                match parse_command(&input, &limits) {
                    Ok(Parsed::Command { consumed, .. }) => prop_assert!(consumed <= input.len() && consumed > 0),
                    Ok(Parsed::Incomplete { need }) => prop_assert!(need > input.len()),
                    Err(e) => prop_assert!(e.to_string().starts_with("Protocol error: ")),
                }
            }
        }

        /// Random bytes spliced into a valid frame's prefix: still no panic.
        #[test]
        fn corrupted_frames_never_panic(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5),
            at in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut frame = command(&refs);
            let i = at.index(frame.len());
            frame.splice(i..i, junk);
            let _ = parse_command(&frame, &A);
        }

        /// Valid frames parse back to their arguments from any split point.
        #[test]
        fn round_trip(
            args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let frame = command(&refs);
            let cut = cut.index(frame.len());
            match parse_command(&frame[..cut], &A) {
                Ok(Parsed::Incomplete { need }) => prop_assert!(need > cut && need <= frame.len()),
                other => prop_assert!(false, "prefix {}: {:?}", cut, other),
            }
            let (parsed, consumed) = args_of(parse_command(&frame, &A).map_err(|e| TestCaseError::fail(e.to_string()))?);
            prop_assert_eq!(&parsed, &args);
            prop_assert_eq!(consumed, frame.len());
            let mut buf = BytesMut::from(&frame[..]);
            buf.extend_from_slice(b"*0\r\n");
            let (split, _) = args_of(split_command(&mut buf, &A).map_err(|e| TestCaseError::fail(e.to_string()))?);
            prop_assert_eq!(split, args);
            prop_assert_eq!(&buf[..], b"*0\r\n");
        }
    }
}
