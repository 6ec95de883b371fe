//! The embedded store's RESP2 command parser (`peerless_runtime::store::resp`): what any
//! local process that connects to a node's store can send, before and after `AUTH`.
//!
//! For each of the authenticated, unauthenticated and a tiny set of limits:
//! - a parsed command took `0 < consumed ≤ len` bytes and respects every limit (argument
//!   count and sizes); its arguments, encoded again, parse back to the same arguments; and
//!   the zero-copy `split_command` agrees with it, leaving exactly the rest in the buffer;
//! - "incomplete" asks for more bytes than there are, and the buffer is left untouched;
//! - a protocol error says so, and the buffer is left untouched.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use peerless_runtime::store::resp::{FrameLimits, Parsed, Reply, encode, parse_command, split_command};

const TINY: FrameLimits = FrameLimits { max_line: 4, max_array: 2, max_bulk: 3, max_frame: 4 };

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            let frames: [&[&[u8]]; 4] = [
                &[b"AUTH", b"default", b"secret"],
                &[b"PEERLESS.ACCUM", b"grad/3", b"node-1/3/0", b"0", &[0, 0, 128, 63, 0, 0, 0, 64]],
                &[b"SET", b"params/3", b"\r\n\x00"],
                &[b"GET", b"params/3"],
            ];
            let mut seeds: Vec<(String, Vec<u8>)> =
                frames.iter().enumerate().map(|(i, args)| (format!("cmd{i}"), command(args))).collect();
            seeds.push(("pipelined".into(), [command(frames[3]), b"*0\r\n".to_vec(), command(frames[0])].concat()));
            seeds
        })
    },
    |data: &[u8]| {
        for limits in [FrameLimits::AUTHENTICATED, FrameLimits::UNAUTHENTICATED, TINY] {
            check(data, &limits);
        }
    }
);

/// A command as clients send it: an array of bulk strings, through the reply encoder.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let reply = Reply::Array(args.iter().map(|a| Reply::Bulk(bytes::Bytes::copy_from_slice(a))).collect());
    encode(&reply, &mut out);
    out
}

fn check(data: &[u8], limits: &FrameLimits) {
    let parsed = parse_command(data, limits);
    let mut buf = BytesMut::from(data);
    let split = split_command(&mut buf, limits);
    assert_eq!(parsed, split, "parse_command and split_command disagree");
    match parsed {
        Ok(Parsed::Command { args, consumed }) => {
            assert!(consumed > 0 && consumed <= data.len(), "consumed {consumed} of {}", data.len());
            assert_eq!(&buf[..], &data[consumed..], "split_command leaves the rest");
            assert!(args.len() <= limits.max_array);
            assert!(args.iter().all(|a| a.len() <= limits.max_bulk));
            assert!(args.iter().map(|a| a.len()).sum::<usize>() <= limits.max_frame);
            if args.is_empty() {
                // `*0` or `*-1` (leading zeros allowed), skipped without a reply.
                let count =
                    std::str::from_utf8(&data[1..consumed - 2]).ok().and_then(|s| s.parse::<i64>().ok());
                assert!(data[0] == b'*' && matches!(count, Some(0 | -1)), "{:?}", &data[..consumed]);
            } else {
                let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                let again = command(&refs);
                match parse_command(&again, limits) {
                    Ok(Parsed::Command { args: back, consumed }) => {
                        assert_eq!(back, args);
                        assert_eq!(consumed, again.len());
                    }
                    other => panic!("re-encoded command does not parse: {other:?}"),
                }
            }
        }
        Ok(Parsed::Incomplete { need }) => {
            assert!(need > data.len(), "need {need} with {} bytes buffered", data.len());
            assert_eq!(&buf[..], data, "an incomplete frame stays in the buffer");
        }
        Err(e) => {
            assert!(e.to_string().starts_with("Protocol error: "), "{e}");
            assert_eq!(&buf[..], data, "a bad frame stays in the buffer");
        }
    }
}
