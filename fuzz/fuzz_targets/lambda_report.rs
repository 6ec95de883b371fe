//! Lambda's `REPORT` log line and the base64 log tail that carries it
//! (`peerless_runtime::function::report`): what the AWS Lambda backend reads back to bill
//! each invocation.
//!
//! First byte picks the decoder; the rest is its input.
//! - base64: any bytes encode and decode back; decoded text re-encodes and decodes the same.
//! - REPORT line, raw or in a log tail: a parsed report, written as a line (or a tail) and
//!   parsed again, is the same report (durations to the line's 10 µs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerless_runtime::function::report::{Report, base64_decode, base64_encode};

const LOG: &str = "START RequestId: 7f Version: $LATEST\nEND RequestId: 7f\nREPORT RequestId: 7f\tDuration: 1.5 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 95.10 ms\t\n";

fuzz_target!(
    init: {
        peerless_fuzz::seeds(|| {
            vec![
                ("log".into(), [&[1u8][..], LOG.as_bytes()].concat()),
                ("tail".into(), [&[2u8][..], base64_encode(LOG.as_bytes()).as_bytes()].concat()),
            ]
        })
    },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        match mode % 3 {
            0 => {
                assert_eq!(base64_decode(&base64_encode(rest)).as_deref(), Some(rest));
                if let Ok(text) = std::str::from_utf8(rest)
                    && let Some(bytes) = base64_decode(text)
                {
                    assert_eq!(base64_decode(&base64_encode(&bytes)), Some(bytes));
                }
            }
            1 => {
                let Ok(log) = std::str::from_utf8(rest) else { return };
                if let Some(r) = Report::parse(log) {
                    assert_eq!(Report::parse(&r.line()), Some(to_the_line(&r)), "{:?}", r.line());
                }
            }
            _ => {
                let Ok(tail) = std::str::from_utf8(rest) else { return };
                if let Some(r) = Report::from_log_tail(tail) {
                    assert_eq!(Report::from_log_tail(&r.to_log_tail()), Some(to_the_line(&r)));
                }
            }
        }
    }
);

/// `r` as precise as its line: durations in whole 10 µs.
fn to_the_line(r: &Report) -> Report {
    Report { duration_us: r.duration_us / 10 * 10, init_us: r.init_us.map(|us| us / 10 * 10), ..r.clone() }
}
