//! Lambda's `REPORT` log line and the base64 log tail (`X-Amz-Log-Result`) that carries it.
//!
//! At the end of every invocation Lambda logs one line such as
//! `REPORT RequestId: 7f…\tDuration: 12.34 ms\tBilled Duration: 13 ms\tMemory Size: 1769 MB\tMax Memory Used: 80 MB\tInit Duration: 95.10 ms`
//! (`Init Duration` only after a cold start). An Invoke API call with `X-Amz-Log-Type: Tail`
//! gets the last 4 KB of the invocation's log, base64-encoded, in `X-Amz-Log-Result`. The
//! local Invoke API writes this line from its ledger record, and the AWS Lambda backend reads
//! it back, so both ledgers bill the same milliseconds.

/// What a `REPORT` line says about one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The request id.
    pub request_id: String,
    /// Run duration, µs (the line has two decimals of a millisecond).
    pub duration_us: u64,
    /// Billed duration, whole ms.
    pub billed_ms: u64,
    /// Configured memory, MB.
    pub memory_mb: u64,
    /// "Max Memory Used", MB: the instance's peak resident memory; `None` when not measured.
    pub max_memory_mb: Option<u64>,
    /// Cold start (init) duration, µs, when the invocation needed a new instance.
    pub init_us: Option<u64>,
}

/// Lambda's log tail limit, bytes.
pub const LOG_TAIL_LIMIT: usize = 4096;

fn ms(us: u64) -> String {
    format!("{}.{:02}", us / 1000, (us % 1000) / 10)
}

/// `12.34` (ms) as µs; `None` if it is not a non-negative decimal.
fn parse_ms(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: u64 = whole.parse().ok()?;
    let mut frac_us = 0u64;
    for (i, c) in frac.chars().take(3).enumerate() {
        frac_us += u64::from(c.to_digit(10)?) * [100, 10, 1][i];
    }
    whole.checked_mul(1000)?.checked_add(frac_us)
}

impl Report {
    /// The `REPORT …` line, tab-separated as Lambda writes it, with a trailing newline.
    pub fn line(&self) -> String {
        let mut s = format!(
            "REPORT RequestId: {}\tDuration: {} ms\tBilled Duration: {} ms\tMemory Size: {} MB",
            self.request_id,
            ms(self.duration_us),
            self.billed_ms,
            self.memory_mb
        );
        if let Some(max) = self.max_memory_mb {
            s.push_str(&format!("\tMax Memory Used: {max} MB"));
        }
        if let Some(init) = self.init_us {
            s.push_str(&format!("\tInit Duration: {} ms", ms(init)));
        }
        s.push_str("\t\n");
        s
    }

    /// The last `REPORT` line in `log`, if there is one with a billed duration.
    pub fn parse(log: &str) -> Option<Report> {
        let line = log.lines().rev().find(|l| l.trim_start().starts_with("REPORT "))?;
        let mut r = Report {
            request_id: String::new(),
            duration_us: 0,
            billed_ms: 0,
            memory_mb: 0,
            max_memory_mb: None,
            init_us: None,
        };
        let mut billed = false;
        for field in line.trim_start().trim_start_matches("REPORT ").split('\t') {
            let Some((key, value)) = field.split_once(": ") else { continue };
            let number = value.split_whitespace().next().unwrap_or("");
            match key.trim() {
                "RequestId" => r.request_id = value.trim().to_owned(),
                "Duration" => r.duration_us = parse_ms(number)?,
                "Billed Duration" => {
                    r.billed_ms = number.parse().ok()?;
                    billed = true;
                }
                "Memory Size" => r.memory_mb = number.parse().ok()?,
                "Max Memory Used" => r.max_memory_mb = Some(number.parse().ok()?),
                "Init Duration" => r.init_us = Some(parse_ms(number)?),
                _ => {}
            }
        }
        billed.then_some(r)
    }

    /// The line as an `X-Amz-Log-Result` value.
    pub fn to_log_tail(&self) -> String {
        base64_encode(self.line().as_bytes())
    }

    /// The report in an `X-Amz-Log-Result` value, if it decodes and holds one.
    pub fn from_log_tail(tail: &str) -> Option<Report> {
        let bytes = base64_decode(tail)?;
        Report::parse(&String::from_utf8_lossy(&bytes))
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional, whitespace ignored); `None` on any other character.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length() {
        let data: Vec<u8> = (0..=255u8).collect();
        for n in 0..10 {
            let enc = base64_encode(&data[..n]);
            assert_eq!(enc.len() % 4, 0);
            assert_eq!(base64_decode(&enc).unwrap(), &data[..n]);
        }
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_decode("TWE").unwrap(), b"Ma");
        assert_eq!(base64_decode("T!E="), None);
    }

    #[test]
    fn report_lines_round_trip_through_the_log_tail() {
        let r = Report {
            request_id: "abc-1".into(),
            duration_us: 12_345,
            billed_ms: 13,
            memory_mb: 1769,
            max_memory_mb: Some(80),
            init_us: Some(95_100),
        };
        assert_eq!(
            r.line(),
            "REPORT RequestId: abc-1\tDuration: 12.34 ms\tBilled Duration: 13 ms\tMemory Size: 1769 MB\tMax Memory Used: 80 MB\tInit Duration: 95.10 ms\t\n"
        );
        let back = Report::from_log_tail(&r.to_log_tail()).unwrap();
        assert_eq!(back, Report { duration_us: 12_340, ..r.clone() });
        let warm = Report { init_us: None, max_memory_mb: None, ..r };
        assert_eq!(Report::parse(&warm.line()).unwrap(), Report { duration_us: 12_340, ..warm });
    }

    #[test]
    fn parses_the_report_line_aws_writes_after_other_log_lines() {
        let log = "START RequestId: 7f Version: $LATEST\nsome output\nEND RequestId: 7f\n\
                   REPORT RequestId: 7f\tDuration: 1.5 ms\tBilled Duration: 2 ms\tMemory Size: 128 MB\tMax Memory Used: 20 MB\t\n";
        let r = Report::parse(log).unwrap();
        assert_eq!((r.request_id.as_str(), r.duration_us, r.billed_ms, r.memory_mb), ("7f", 1500, 2, 128));
        assert_eq!(r.init_us, None);
        assert_eq!(Report::parse("END RequestId: 7f\n"), None);
        assert_eq!(Report::parse("REPORT RequestId: 7f\tDuration: 1.5 ms\n"), None, "no billed duration");
    }
}
