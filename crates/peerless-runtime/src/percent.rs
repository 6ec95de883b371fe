//! URL percent-decoding, for the parts of URLs peerless reads itself: function names and ARNs
//! in Invoke API paths, and passwords in Redis URLs.

/// `%XX` escapes decoded; anything malformed is kept as it is.
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` with every byte but ASCII letters, digits and `-._~` written as `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_are_decoded_and_malformed_ones_kept() {
        assert_eq!(super::decode("a%20b%2Fc"), "a b/c");
        assert_eq!(super::encode("a b/c-d"), "a%20b%2Fc-d");
        assert_eq!(super::decode(&super::encode("p@ss:w/rd%")), "p@ss:w/rd%");
        assert_eq!(super::decode("100%"), "100%");
        assert_eq!(super::decode("%zz%4"), "%zz%4");
        assert_eq!(super::decode("p%C3%A4ss"), "päss");
    }
}
