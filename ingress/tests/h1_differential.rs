//! The lean HTTP/1.1 server path against hyper's HTTP/1 server (issue 18):
//! a seeded corpus of request heads (ordinary ones in many shapes, odd
//! ones, and request-smuggling shapes) and a few thousand deterministic
//! mutants of it go to both, and every request the lean path accepts must
//! be accepted by hyper the same way; a lean `Reject` must be one of its two
//! documented framing rules. The check itself is in `h1_diff/mod.rs`,
//! shared with the cargo-fuzz target `ingress/fuzz/fuzz_targets/h1_head.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod h1_diff;

use h1_diff::{check, BodyKind, HyperOnReject, LeanStop, Tally};

/// Mutants run in `cargo test` (`H1_DIFF_MUTANTS` and `H1_DIFF_SEED`
/// override both for a longer run).
const MUTANTS: usize = 20_000;
const SEED: u64 = 0x5eed_f022_1e55_0018;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small xorshift64* generator: the mutants are the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn get(headers: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: t.test\r\n{headers}\r\n").into_bytes()
}

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: t.test\r\n{headers}\r\n{body}").into_bytes()
}

/// The request-smuggling shapes (also in `tests/smuggling.rs`).
fn smuggling() -> Vec<Vec<u8>> {
    let next = "GET /smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n";
    let mut v = vec![
        // CL.TE and TE.CL.
        post(
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
            &format!("0\r\n\r\n{next}"),
        ),
        post(
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            &format!("8\r\nSMUGGLED\r\n0\r\n\r\n{next}"),
        ),
        get("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
        get("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n"),
        // Two lengths, differing and equal; a zero repeated.
        post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
        post("Content-Length: 5\r\nContent-Length: 5\r\n", "hello"),
        get("Content-Length: 0\r\nContent-Length: 0\r\n"),
        get("Content-Length: 0\r\ncontent-length: 0\r\n"),
        post("Content-Length: 5, 5\r\n", "hello"),
        // Odd lengths.
        post("Content-Length: +5\r\n", "hello"),
        post("Content-Length: -1\r\n", "hello"),
        post("Content-Length:  5 \r\n", "hello"),
        post("Content-Length: 0x5\r\n", "hello"),
        post("Content-Length: 99999999999999999999999\r\n", "hello"),
        get("Content-Length: 00\r\n"),
        get("Content-Length: 5\r\n"),
        // Chunked bodies, and broken ones.
        post(
            "Transfer-Encoding: chunked\r\n",
            &format!("5\r\nhello\r\n0\r\n\r\n{next}"),
        ),
        post("Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
        post(
            "Transfer-Encoding: chunked\r\n",
            "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        post("Transfer-Encoding: chunked\r\n", "5;a=\"\r\n\"\r\nhello\r\n0\r\n\r\n"),
        post("Transfer-Encoding: chunked\r\n", "5 \r\nhello\r\n0\r\n\r\n"),
        // TE.TE.
        post("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding: identity, chunked\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding:\tchunked\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding: chunked\t\r\n", "0\r\n\r\n"),
        post("Transfer-Encoding:  chunked \r\n", "0\r\n\r\n"),
        post("TRANSFER-ENCODING: CHUNKED\r\n", "0\r\n\r\n"),
        post(" Transfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        post("X: y\r\n Transfer-Encoding: chunked\r\n", "0\r\n\r\n"),
        get("Transfer-Encoding: chunked\r\n"),
        get("Transfer-Encoding: x\r\n"),
        // obs-fold, bare CR, bare LF, NUL.
        get("X-Folded: a\r\n b\r\n"),
        get("X-Folded: a\r\n\tb\r\n"),
        get("X-Cr: a\rb\r\n"),
        get("X-Cr: a\r\r\n"),
        get("X-Nul: a\0b\r\n"),
        b"GET / HTTP/1.1\nHost: t.test\n\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: t.test\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: t.test\r\n\n".to_vec(),
        b"GET / HTTP/1.1\rHost: t.test\r\n\r\n".to_vec(),
        // Expect and Upgrade with framing headers.
        post(
            "Expect: 100-continue\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "0\r\n\r\n",
        ),
        get("Upgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 0\r\nContent-Length: 0\r\n"),
    ];
    // Each followed by a plain GET, pipelined.
    let pipelined: Vec<Vec<u8>> = v
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.extend_from_slice(next.as_bytes());
            r
        })
        .collect();
    v.extend(pipelined);
    v
}

/// The seeded corpus.
fn corpus() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /a/b?c=d&e=f#frag HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /%20%zz/..//./x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        get("User-Agent: curl/8.5.0\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-GB,en;q=0.9\r\nCookie: a=b; c=d\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\nCache-Control: no-cache\r\nReferer: http://t.test/x\r\n"),
        // Name case, OWS, empty values, repeated names.
        b"GET / HTTP/1.1\r\nhost: t.test\r\nACCEPT: a\r\naCcEpT: b\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost:t.test\r\nX-A:   spaced   \r\nX-B:\ttabbed\t\r\nX-C: \t mixed \t \r\n\r\n".to_vec(),
        get("X-Empty:\r\nX-Empty2: \r\nX-Empty3:\t\r\n"),
        get("X-Rep: 1\r\nX-Other: a\r\nX-Rep: 2\r\nx-rep: 3\r\n"),
        get("X-Token: !#$%&'*+-.^_`|~09azAZ\r\n"),
        get("!#$%&'*+-.^_`|~: odd-name\r\n"),
        get("X-Quoted: \"a, b\"; c=\"d\\\"e\"\r\n"),
        get("X-Inner: a  b\tc\r\n"),
        // obs-text and other bytes in values.
        b"GET / HTTP/1.1\r\nHost: t.test\r\nX-Obs: caf\xc3\xa9\r\nX-High: \x80\xff\r\n\r\n".to_vec(),
        get("X-Del: a\x7fb\r\n"),
        get("X-Ctl: a\x01b\r\n"),
        get("X-Esc: a\x1bb\r\n"),
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /a b HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /a\tb HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /\"<>\\^`{|} HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        // Connection handling.
        get("Connection: close\r\n"),
        get("Connection: keep-alive, CLOSE\r\n"),
        get("Connection: keep-alive\r\n"),
        get("Connection: Upgrade\r\n"),
        get("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"),
        get("Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
        get("Expect: 100-continue\r\n"),
        get("Expect: 100-continue\r\nContent-Length: 0\r\n"),
        get("Content-Length: 0\r\n"),
        get("TE: trailers\r\n"),
        get("Host: other.test\r\n"),
        // Methods and targets.
        b"HEAD / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"OPTIONS / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"OPTIONS * HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"DELETE /x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"PUT /x HTTP/1.1\r\nHost: t.test\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"PATCH /x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"TRACE / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"PURGE /x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"M-SEARCH * HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"FOO_BAR /x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"get / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"G@T / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"CONNECT t.test:443 HTTP/1.1\r\nHost: t.test:443\r\n\r\n".to_vec(),
        b"CONNECT / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET http://t.test/x?y HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET https://user@t.test:8443/x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET t.test:80 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET * HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET //x HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        // Versions and request-line shapes.
        b"GET / HTTP/1.0\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET / HTTP/1.0\r\nHost: t.test\r\nConnection: keep-alive\r\n\r\n".to_vec(),
        b"GET / HTTP/1.2\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET / HTTP/2.0\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET / http/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /\r\n\r\n".to_vec(),
        b"GET  / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1 \r\nHost: t.test\r\n\r\n".to_vec(),
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"\nGET / HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: t.test\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: t.te".to_vec(),
        b"GET".to_vec(),
        Vec::new(),
        // Pipelined pairs.
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: t.test\r\n\r\nGET /3 HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\n\r\nhelloGET /3 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\nGET /2 HTTP/1.0\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\n\r\nGET /2 HTTP/1.1\r\nHost: t.test\r\n\r\n".to_vec(),
        b"GET /1 HTTP/1.1\r\nHost: t.test\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
    ];
    v.extend(smuggling());
    // Sizes at the limits: headers (100 fits, 101 does not), the target
    // (hyper's 65534 bytes), the whole head (64 KiB).
    for n in [99, 100, 101, 150] {
        let mut h = String::new();
        for i in 0..n - 1 {
            h += &format!("X-H{i}: v{i}\r\n");
        }
        v.push(get(&h));
    }
    let line = |path_len: usize| format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(path_len - 1));
    // "GET " + path + " HTTP/1.1\r\n" + "\r\n": path + 17 bytes.
    for head in [8 * 1024, 65_535, 65_536, 65_537] {
        v.push(line(head - 17).into_bytes());
    }
    let big = |head: usize| {
        let fixed = "GET / HTTP/1.1\r\nX-Big: \r\n\r\n".len();
        get(&format!(
            "X-Big: {}\r\n",
            "b".repeat(head - fixed - "Host: t.test\r\n".len())
        ))
    };
    for head in [16 * 1024, 65_536, 65_537, 70_000] {
        let h = big(head);
        assert_eq!(h.len(), head);
        v.push(h);
    }
    v.push(format!("GET /?q={} HTTP/1.1\r\nHost: t.test\r\n\r\n", "%41".repeat(3000)).into_bytes());
    v
}

/// Header line boundaries (start, end including its LF) after the first line.
fn header_lines(input: &[u8]) -> Vec<(usize, usize)> {
    let mut lines = Vec::new();
    let mut start = 0;
    for (i, &b) in input.iter().enumerate() {
        if b == b'\n' {
            if start > 0 {
                lines.push((start, i + 1));
            }
            start = i + 1;
        }
    }
    lines
}

/// One to four mutations of a corpus entry (possibly spliced with another).
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut m = corpus[rng.below(corpus.len())].clone();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let at = rng.below(m.len() + 1);
        match rng.below(7) {
            0 if !m.is_empty() => {
                let i = at.min(m.len() - 1);
                m[i] ^= 1 << rng.below(8);
            }
            1 | 2 => {
                const BYTES: &[u8] = b"\r\n\0 \t:,";
                let b = BYTES[rng.below(BYTES.len())];
                m.insert(at, b);
            }
            3 if !m.is_empty() => {
                let len = 1 + rng.below(8);
                let end = (at + len).min(m.len());
                m.drain(at.min(end)..end);
            }
            4 => {
                let lines = header_lines(&m);
                if !lines.is_empty() {
                    let (s, e) = lines[rng.below(lines.len())];
                    let line = m[s..e].to_vec();
                    m.splice(e..e, line);
                }
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                m.truncate(at);
                m.extend_from_slice(&other[from..]);
            }
            _ if !m.is_empty() => {
                let i = at.min(m.len() - 1);
                m[i] = rng.next() as u8;
            }
            _ => m.push(rng.next() as u8),
        }
    }
    m
}

fn run(name: &str, inputs: &[Vec<u8>]) -> Tally {
    let mut tally = Tally::default();
    for (i, input) in inputs.iter().enumerate() {
        match check(input) {
            Ok(report) => tally.add(&report),
            Err(e) => panic!(
                "{name} #{i} diverges: {e}\ninput ({} bytes): {:?}",
                input.len(),
                String::from_utf8_lossy(&input[..input.len().min(600)])
            ),
        }
    }
    println!("{name}: {tally}");
    tally
}

#[test]
fn the_seeded_corpus_agrees_with_hyper() {
    let corpus = corpus();
    let tally = run("corpus", &corpus);
    // The corpus reaches every outcome.
    assert!(tally.first_request > 50, "{tally}");
    assert!(tally.first_defer > 50, "{tally}");
    assert!(tally.first_partial > 0, "{tally}");
    assert!(tally.stop_close > 0, "{tally}");
    assert!(tally.requests_compared > tally.first_request, "{tally}");
    // Every documented reject shape is in it, and hyper takes some of
    // them (CL with TE, equal repeats) and refuses others (differing).
    assert!(tally.stop_reject >= 8, "{tally}");
    assert!(tally.reject_hyper_took_chunked > 0, "{tally}");
    assert!(
        tally.reject_hyper_took_length + tally.reject_hyper_took_no_body > 0,
        "{tally}"
    );
    assert!(tally.reject_hyper_refused > 0, "{tally}");
}

#[test]
fn mutants_agree_with_hyper() {
    let corpus = corpus();
    let count = env_or("H1_DIFF_MUTANTS", MUTANTS);
    let mut rng = Rng(env_or("H1_DIFF_SEED", SEED).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mutants: Vec<Vec<u8>> = (0..count).map(|_| mutate(&mut rng, &corpus)).collect();
    let tally = run("mutants", &mutants);
    assert_eq!(tally.inputs, count);
    // The mutants are not all noise: many still reach the lean path.
    assert!(tally.first_request > count / 20, "{tally}");
    assert!(tally.first_defer > count / 20, "{tally}");
}

/// The documented rejects one by one, with what hyper does with each.
#[test]
fn the_stricter_framing_rules_and_what_hyper_does_instead() {
    let cases: [(&[u8], HyperOnReject); 5] = [
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            HyperOnReject::Accepted(BodyKind::Unknown),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n",
            HyperOnReject::Accepted(BodyKind::Unknown),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            HyperOnReject::Accepted(BodyKind::Length(5)),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            HyperOnReject::Accepted(BodyKind::None),
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            HyperOnReject::Refused(400),
        ),
    ];
    for (input, hyper) in cases {
        let report = check(input).unwrap();
        assert_eq!(
            report.stop,
            LeanStop::Reject(http::StatusCode::BAD_REQUEST),
            "{input:?}"
        );
        assert_eq!(report.hyper_on_reject, Some(hyper), "{input:?}");
    }
}
