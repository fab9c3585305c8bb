//! Numbers and addresses written into byte buffers without `fmt`'s
//! machinery, for what the request path formats per request (response
//! heads, chunk sizes, access-log lines). The output is what `Display`
//! writes.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

/// `n` in `radix` (2 to 16, lower-case digits), zero-padded to `width`.
pub fn number(out: &mut Vec<u8>, mut n: u64, radix: u64, width: usize) {
    let mut digits = [b'0'; 64];
    let mut at = digits.len();
    // Bounded: at most 64 digits (radix ≥ 2).
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            break;
        }
    }
    let start = at.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

/// An IP address as `Display` writes it.
pub fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet), 10, 1);
            }
        }
        // Rare here, and its compression rules are `Display`'s.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A socket address as `Display` writes it.
pub fn socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            ip(out, IpAddr::V4(*v4.ip()));
            out.push(b':');
            number(out, u64::from(v4.port()), 10, 1);
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_match_format() {
        for n in [0u64, 1, 7, 9, 10, 15, 16, 255, 4096, 999_999, 1_000_000, u64::MAX] {
            assert_eq!(s(|o| number(o, n, 10, 1)), n.to_string());
            assert_eq!(s(|o| number(o, n, 16, 1)), format!("{n:x}"));
            assert_eq!(s(|o| number(o, n, 10, 6)), format!("{n:06}"));
            assert_eq!(s(|o| number(o, n, 16, 4)), format!("{n:04x}"));
        }
    }

    #[test]
    fn addresses_match_display() {
        for a in [
            "127.0.0.1:80",
            "10.88.0.255:65535",
            "0.0.0.0:0",
            "[::1]:8080",
            "[fe80::1%2]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(s(|o| socket_addr(o, addr)), addr.to_string());
            assert_eq!(s(|o| ip(o, addr.ip())), addr.ip().to_string());
        }
    }
}
