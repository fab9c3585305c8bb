//! Request-smuggling regressions through the real proxy (issue 18): raw
//! bytes from a raw TCP client to the engine on 127.0.0.1, to a raw TCP
//! backend that records every byte it receives per connection and answers
//! every request it can frame (strictly: one `Content-Length` or chunked)
//! with a fixed response. For each case the client's status lines are
//! checked, and the backend must have received exactly the expected
//! requests — never a smuggled one. Every case's paths start with its own
//! prefix (`/c<n>/`), so a request the backend frames is attributed to the
//! case that sent it; after the proxy has stopped (every upstream
//! connection closed) the whole record is checked again.
//!
//! Where ferry is not stricter than the issue's list ("reject both CL and
//! TE, differing or repeated CL, obs-fold, bare CR or LF, NUL, invalid
//! chunk sizes, oversized heads (431)"), the case tests what ferry does:
//! bare LF line endings are accepted (RFC 9112 §2.2 allows a recipient
//! to), and `Content-Length` with surrounding whitespace is the length
//! (the whitespace is not part of the field value).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ferry_ingress::h1_server::{self, Parsed};
use ferry_ingress::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::{parse, service, test_config, CLASS};

/// The bound on any single wait.
const WAIT: Duration = Duration::from_secs(10);
/// ferry's request head limit.
const MAX_HEAD: usize = 64 * 1024;

// ---- the recording backend ----

/// A request the backend framed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    /// When the backend framed it, over all connections.
    seq: usize,
    method: String,
    path: String,
    body: Vec<u8>,
}

/// One upstream connection as the backend saw it.
#[derive(Debug, Default)]
struct Conn {
    bytes: Vec<u8>,
    requests: Vec<Got>,
    /// Bytes it could not frame (a request cut short, or garbage).
    problem: Option<String>,
}

type Record = Arc<Mutex<Vec<Conn>>>;

enum Frame {
    Request(Got, usize),
    Partial,
    Bad(String),
}

/// Frames one request at the start of `buf`, strictly.
fn frame_request(buf: &[u8]) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Frame::Partial,
        Err(e) => return Frame::Bad(format!("head: {e}")),
    };
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    let mut length = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Frame::Bad("two Content-Length".into());
            }
            let Some(n) = std::str::from_utf8(h.value).ok().and_then(|v| v.parse::<usize>().ok()) else {
                return Frame::Bad("bad Content-Length".into());
            };
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || h.value != b"chunked" {
                return Frame::Bad(format!("Transfer-Encoding {:?}", String::from_utf8_lossy(h.value)));
            }
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Frame::Bad("Content-Length and Transfer-Encoding".into());
    }
    let rest = &buf[head..];
    if chunked {
        return match dechunk(rest) {
            Ok(Some((body, used))) => Frame::Request(
                Got {
                    seq: 0,
                    method,
                    path,
                    body,
                },
                head + used,
            ),
            Ok(None) => Frame::Partial,
            Err(e) => Frame::Bad(e),
        };
    }
    let n = length.unwrap_or(0);
    if rest.len() < n {
        return Frame::Partial;
    }
    let body = rest[..n].to_vec();
    Frame::Request(
        Got {
            seq: 0,
            method,
            path,
            body,
        },
        head + n,
    )
}

/// A strict chunked body: `Ok(None)` when incomplete.
fn dechunk(mut buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let total = buf.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[..eol];
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("chunk size {:?}", String::from_utf8_lossy(line)))?;
        buf = &buf[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                buf = &buf[eol + 2..];
                if eol == 0 {
                    return Ok(Some((body, total - buf.len())));
                }
            }
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// The backend: records, frames, answers `200` with `seen <method> <path>`.
async fn recording_backend(record: Record, cancel: CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                a = l.accept() => match a { Ok(a) => a, Err(_) => return },
            };
            let index = {
                let mut r = record.lock().unwrap();
                r.push(Conn::default());
                r.len() - 1
            };
            let (record, cancel) = (record.clone(), cancel.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                // Bounded: each read waits at most 30 s; the proxy's pool
                // closes idle connections, and the test stops the proxy.
                loop {
                    let n = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)) => match r {
                            Ok(Ok(n)) => n,
                            _ => 0,
                        },
                    };
                    if n == 0 {
                        if !buf.is_empty() {
                            let mut r = record.lock().unwrap();
                            r[index].problem.get_or_insert_with(|| {
                                format!(
                                    "closed with {} unframed bytes: {:?}",
                                    buf.len(),
                                    String::from_utf8_lossy(&buf)
                                )
                            });
                        }
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    record.lock().unwrap()[index].bytes.extend_from_slice(&chunk[..n]);
                    loop {
                        match frame_request(&buf) {
                            Frame::Request(mut got, used) => {
                                let body = format!("seen {} {}", got.method, got.path);
                                {
                                    let mut r = record.lock().unwrap();
                                    got.seq = r.iter().map(|c| c.requests.len()).sum();
                                    r[index].requests.push(got);
                                }
                                buf.drain(..used);
                                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                                if s.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Frame::Partial => break,
                            Frame::Bad(e) => {
                                record.lock().unwrap()[index].problem = Some(e);
                                let _ = s
                                    .write_all(
                                        b"HTTP/1.1 599 Unframeable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                    )
                                    .await;
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The requests the backend framed whose path starts with `prefix`, in
/// the order it framed them.
fn got_for(record: &Record, prefix: &str) -> Vec<Got> {
    let r = record.lock().unwrap();
    let mut got: Vec<Got> = r
        .iter()
        .flat_map(|c| c.requests.iter())
        .filter(|g| g.path.starts_with(prefix))
        .cloned()
        .collect();
    got.sort_by_key(|g| g.seq);
    got
}

// ---- the raw client ----

/// A response as the client read it.
#[derive(Debug)]
struct Answer {
    statuses: Vec<u16>,
    bodies: Vec<String>,
    /// The server closed the connection (within `WAIT`).
    closed: bool,
    raw: String,
}

/// Splits `buf` into responses (status, body); stops at anything it
/// cannot frame.
fn responses(mut buf: &[u8]) -> (Vec<u16>, Vec<String>) {
    let (mut statuses, mut bodies) = (Vec::new(), Vec::new());
    for _ in 0..64 {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = res.parse(buf) else {
            break;
        };
        let status = res.code.unwrap_or(0);
        let header = |name: &str| {
            res.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let rest = &buf[head..];
        let (body, used) = if (100..200).contains(&status) {
            (Vec::new(), 0)
        } else if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            match dechunk(rest) {
                Ok(Some(b)) => b,
                _ => (rest.to_vec(), rest.len()),
            }
        } else {
            let n = header("content-length")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(rest.len());
            let n = n.min(rest.len());
            (rest[..n].to_vec(), n)
        };
        statuses.push(status);
        bodies.push(String::from_utf8_lossy(&body).into_owned());
        buf = &rest[used..];
        if buf.is_empty() {
            break;
        }
    }
    (statuses, bodies)
}

/// Sends `request` (reading while writing, so an early answer is not lost)
/// and reads until the server closes or `WAIT` passes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        // The server may close before taking it all (an oversized head).
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let _ = tokio::time::timeout(WAIT, writer).await;
    let (statuses, bodies) = responses(&out);
    Answer {
        statuses,
        bodies,
        closed,
        raw: String::from_utf8_lossy(&out[..out.len().min(400)]).into_owned(),
    }
}

// ---- the cases ----

/// What a case sends and what must happen.
struct Case {
    name: &'static str,
    /// Sent as is, with `{p}` replaced by the case's path prefix.
    send: Vec<u8>,
    /// The status lines the client must get, in order.
    statuses: Vec<u16>,
    /// The requests the backend must frame: (method, path under the
    /// prefix, body).
    backend: Vec<(&'static str, &'static str, &'static str)>,
}

fn case(
    name: &'static str,
    send: impl Into<Vec<u8>>,
    statuses: &[u16],
    backend: &[(&'static str, &'static str, &'static str)],
) -> Case {
    Case {
        name,
        send: send.into(),
        statuses: statuses.to_vec(),
        backend: backend.to_vec(),
    }
}

/// The smuggled request some cases hide in a body.
const SMUGGLED: &str = "GET {p}/smuggled HTTP/1.1\r\nHost: t.test\r\n\r\n";
const CLOSE_GET: &str = "GET {p}/next HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n";

fn post(headers: &str, body: &str) -> String {
    format!("POST {{p}}/a HTTP/1.1\r\nHost: t.test\r\n{headers}\r\n{body}")
}

/// A chunk holding `data`.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

fn cases() -> Vec<Case> {
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    let te_cl_body = format!("{}0\r\n\r\n", chunk(SMUGGLED));
    let posted = [("POST", "/a", "hello"), ("GET", "/next", "")];
    let chunked_hello = format!("5\r\nhello\r\n0\r\n\r\n{CLOSE_GET}");
    vec![
        // Both framings, either order: refused by the lean path.
        case(
            "CL.TE",
            post(&format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case(
            "TE.CL",
            post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", &te_cl_body),
            &[400],
            &[],
        ),
        case("CL 0 + TE on GET", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", &[400], &[]),
        // TE.TE: an obfuscated second Transfer-Encoding, with and without a
        // Content-Length for a front end that ignores it.
        case(
            "TE chunked + TE x, with CL",
            post(&format!("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case("TE chunked + TE x", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", &cl_te_body), &[400], &[]),
        case(
            "TE<SP>: chunked, with CL",
            post(&format!("Transfer-Encoding : chunked\r\nContent-Length: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case("TE<SP>: chunked", post("Transfer-Encoding : chunked\r\n", &cl_te_body), &[400], &[]),
        case(
            "TE xchunked, with CL",
            post(&format!("Transfer-Encoding: xchunked\r\nContent-Length: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case("TE xchunked", post("Transfer-Encoding: xchunked\r\n", &cl_te_body), &[400], &[]),
        case(
            "TE chunked, identity + CL",
            post(&format!("Transfer-Encoding: chunked, identity\r\nContent-Length: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case("TE chunked, identity", post("Transfer-Encoding: chunked, identity\r\n", &cl_te_body), &[400], &[]),
        case("TE identity, chunked", post("Transfer-Encoding: identity, chunked\r\n", &chunked_hello), &[200, 200], &posted),
        case("TE:<HTAB>chunked", post("Transfer-Encoding:\tchunked\r\n", &chunked_hello), &[200, 200], &posted),
        case("TE: chunked<HTAB>", post("Transfer-Encoding: chunked\t\r\n", &chunked_hello), &[200, 200], &posted),
        case(
            "TE:<HTAB>chunked, with CL",
            post(&format!("Transfer-Encoding:\tchunked\r\nContent-Length: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        case("<SP>TE: chunked (first line folded)", post(" Transfer-Encoding: chunked\r\n", &cl_te_body), &[400], &[]),
        case("TE: chunked as obs-fold", post("X: y\r\n Transfer-Encoding: chunked\r\n", &cl_te_body), &[400], &[]),
        case("TE CHUNKED upper case", post("TRANSFER-ENCODING: CHUNKED\r\n", &chunked_hello), &[200, 200], &posted),
        case(
            "TE CHUNKED upper case, with CL",
            post(&format!("TRANSFER-ENCODING: CHUNKED\r\nCONTENT-LENGTH: {}\r\n", cl_te_body.len()), &cl_te_body),
            &[400],
            &[],
        ),
        // Content-Length shapes.
        case(
            "two differing CL",
            post(&format!("Content-Length: 5\r\nContent-Length: {}\r\n", 5 + SMUGGLED.len()), &format!("hello{SMUGGLED}")),
            &[400],
            &[],
        ),
        case("repeated equal CL", post("Content-Length: 5\r\nContent-Length: 5\r\n", &format!("hello{SMUGGLED}")), &[400], &[]),
        case("repeated CL 0 on GET", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", &[400], &[]),
        case("CL 5, 5 (a list)", post("Content-Length: 5, 5\r\n", &format!("hello{SMUGGLED}")), &[400], &[]),
        case("CL +5", post("Content-Length: +5\r\n", &format!("hello{SMUGGLED}")), &[400], &[]),
        case("CL -1", post("Content-Length: -1\r\n", &format!("hello{SMUGGLED}")), &[400], &[]),
        case("CL 0x5", post("Content-Length: 0x5\r\n", &format!("hello{SMUGGLED}")), &[400], &[]),
        case(
            "CL overflowing",
            post("Content-Length: 184467440737095516160\r\n", &format!("hello{SMUGGLED}")),
            &[400],
            &[],
        ),
        case("CL<SP><SP>5<SP> (OWS)", post("Content-Length:  5 \r\n", &format!("hello{CLOSE_GET}")), &[200, 200], &posted),
        // Bad bytes and line shapes in heads.
        case("obs-fold", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nX-Folded: a\r\n b\r\n\r\n", &[400], &[]),
        case("bare CR in a value", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nX-Cr: a\rb\r\n\r\n", &[400], &[]),
        case("bare CR ending a line", "GET {p}/a HTTP/1.1\r\nHost: t.test\rX: b\r\n\r\n", &[400], &[]),
        case("NUL in a value", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nX-Nul: a\0b\r\n\r\n", &[400], &[]),
        case("NUL in a name", "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nX\0Nul: a\r\n\r\n", &[400], &[]),
        // Bare LF line endings: accepted (RFC 9112 §2.2), forwarded with CRLF.
        case(
            "bare LF line endings",
            "GET {p}/a HTTP/1.1\nHost: t.test\n\nGET {p}/next HTTP/1.1\nHost: t.test\nConnection: close\n\n",
            &[200, 200],
            &[("GET", "/a", ""), ("GET", "/next", "")],
        ),
        case(
            "bare LF hiding a header in a value",
            "GET {p}/a HTTP/1.1\r\nHost: t.test\r\nX: a\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            &[200],
            &[("GET", "/a", "hello")],
        ),
        // Invalid chunk sizes: the body is refused; nothing complete
        // reaches the backend.
        case("chunk size zz", post("Transfer-Encoding: chunked\r\n", &format!("zz\r\nhello\r\n0\r\n\r\n{SMUGGLED}")), &[400], &[]),
        case(
            "chunk size overflowing",
            post("Transfer-Encoding: chunked\r\n", &format!("10000000000000005\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
            &[400],
            &[],
        ),
        case(
            "chunk size with a sign",
            post("Transfer-Encoding: chunked\r\n", &format!("+5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
            &[400],
            &[],
        ),
        case(
            "chunk extension with a bare LF",
            post("Transfer-Encoding: chunked\r\n", &format!("5;a\nb\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
            &[400],
            &[],
        ),
        case(
            "chunk extensions past the limit",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("5;{}\r\nhello\r\n0\r\n\r\n{SMUGGLED}", "x=y;".repeat(20_000)),
            ),
            &[400],
            &[],
        ),
        case(
            "chunk data longer than its size",
            post("Transfer-Encoding: chunked\r\n", &format!("3\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
            &[400],
            &[],
        ),
        case(
            "chunk extension (valid), dropped",
            post("Transfer-Encoding: chunked\r\n", &format!("5;name=\"va;l\"\r\nhello\r\n0\r\n\r\n{CLOSE_GET}")),
            &[200, 200],
            &posted,
        ),
        // Sizes.
        case(
            "head over 64 KiB",
            format!("GET {{p}}/a HTTP/1.1\r\nHost: t.test\r\nX-Big: {}\r\n\r\n", "b".repeat(MAX_HEAD)),
            &[431],
            &[],
        ),
        case(
            "101 headers",
            format!(
                "GET {{p}}/a HTTP/1.1\r\nHost: t.test\r\n{}\r\n",
                (0..100).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
            ),
            &[431],
            &[],
        ),
        // Pipelining after bodies.
        case("GET after a Content-Length body", post("Content-Length: 5\r\n", &format!("hello{CLOSE_GET}")), &[200, 200], &posted),
        case("GET after a chunked body", post("Transfer-Encoding: chunked\r\n", &chunked_hello), &[200, 200], &posted),
        case(
            "GET after a chunked body with trailers",
            post("Transfer-Encoding: chunked\r\n", &format!("5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n{CLOSE_GET}")),
            &[200, 200],
            &posted,
        ),
        case(
            "GET with a Content-Length body, then a GET",
            format!("GET {{p}}/a HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\n\r\nhello{CLOSE_GET}"),
            &[200, 200],
            &[("GET", "/a", "hello"), ("GET", "/next", "")],
        ),
        case(
            "HTTP/1.0 keep-alive",
            "GET {p}/a HTTP/1.0\r\nHost: t.test\r\nConnection: keep-alive\r\n\r\nGET {p}/b HTTP/1.0\r\nHost: t.test\r\n\r\nGET {p}/never HTTP/1.0\r\nHost: t.test\r\n\r\n",
            &[200, 200],
            &[("GET", "/a", ""), ("GET", "/b", "")],
        ),
        case(
            "three keep-alive GETs pipelined",
            "GET {p}/a HTTP/1.1\r\nHost: t.test\r\n\r\nGET {p}/b HTTP/1.1\r\nHost: t.test\r\n\r\nGET {p}/c HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n",
            &[200, 200, 200],
            &[("GET", "/a", ""), ("GET", "/b", ""), ("GET", "/c", "")],
        ),
        case(
            "a lean GET, then CL.TE",
            format!(
                "GET {{p}}/a HTTP/1.1\r\nHost: t.test\r\n\r\n{}",
                post(&format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\n", cl_te_body.len()), &cl_te_body)
            ),
            &[200, 400],
            &[("GET", "/a", "")],
        ),
        // Framing is checked before Expect and Upgrade send a request to
        // hyper, wherever they are in the head: CL+TE is refused here too.
        case(
            "Expect: 100-continue with CL.TE",
            post(
                &format!("Expect: 100-continue\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n", cl_te_body.len()),
                &cl_te_body,
            ),
            &[400],
            &[],
        ),
        case(
            "CL.TE, then Expect: 100-continue",
            post(
                &format!("Content-Length: {}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n", cl_te_body.len()),
                &cl_te_body,
            ),
            &[400],
            &[],
        ),
        case(
            "Upgrade with CL.TE",
            post(
                &format!("Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n", cl_te_body.len()),
                &cl_te_body,
            ),
            &[400],
            &[],
        ),
    ]
}

/// `{p}` → `prefix` in `bytes`.
fn expand(bytes: &[u8], prefix: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"{p}") {
            out.extend_from_slice(prefix.as_bytes());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The lean path's view of the heads in `bytes` (until it stops).
fn lean_view(bytes: &[u8]) -> Vec<&'static str> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    for _ in 0..8 {
        let step = match h1_server::parse(&mut buf, MAX_HEAD) {
            Parsed::Request(..) => "request",
            Parsed::Defer => "defer",
            Parsed::Partial => "partial",
            Parsed::Reject(_) => "reject",
        };
        out.push(step);
        if step != "request" {
            break;
        }
    }
    out
}

fn show(got: &[Got], prefix: &str) -> String {
    got.iter()
        .map(|g| {
            format!(
                "{} {} {:?}",
                g.method,
                g.path.strip_prefix(prefix).unwrap_or(&g.path),
                String::from_utf8_lossy(&g.body)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_smuggled_past_the_proxy() {
    let cancel = CancellationToken::new();
    let record: Record = Arc::default();
    let backend = recording_backend(record.clone(), cancel.clone()).await;
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: t.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 80}}}}\n---\n";
    let yaml = CLASS.to_string() + &service("s", &[backend], None) + ingress;
    let mut config = test_config();
    config.limits = Limits {
        header_timeout: Duration::from_secs(3),
        keepalive_timeout: Duration::from_secs(3),
        body_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let proxy = common::serve(config, parse(&yaml)).await;

    let cases = cases();
    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let prefix = format!("/c{n}");
        let bytes = expand(&c.send, &prefix);
        let answer = exchange(proxy.http, &bytes).await;
        let want: Vec<Got> = c
            .backend
            .iter()
            .map(|(m, p, b)| Got {
                seq: 0,
                method: m.to_string(),
                path: format!("{prefix}{p}"),
                body: b.as_bytes().to_vec(),
            })
            .collect();
        // The backend answered before the client got its response, so
        // what it framed is there already (checked again at the end).
        let got = got_for(&record, &format!("{prefix}/"));
        let lean = lean_view(&bytes);
        table.push(format!(
            "{:<40} lean {:<28} client {:<14} backend [{}]",
            c.name,
            lean.join(","),
            format!("{:?}", answer.statuses),
            show(&got, &prefix)
        ));
        let same = |a: &[Got], b: &[Got]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (&x.method, &x.path, &x.body) == (&y.method, &y.path, &y.body))
        };
        if answer.statuses != c.statuses || !same(&got, &want) || !answer.closed {
            failures.push(format!(
                "{} ({prefix}): client {:?} (closed: {}) want {:?}; backend [{}] want [{}]; raw: {:?}",
                c.name,
                answer.statuses,
                answer.closed,
                c.statuses,
                show(&got, &prefix),
                show(&want, &prefix),
                answer.raw
            ));
        }
        // Each answer is for its own request, in order.
        for (body, (m, p, _)) in answer.bodies.iter().filter(|b| b.starts_with("seen ")).zip(&c.backend) {
            if *body != format!("seen {m} {prefix}{p}") {
                failures.push(format!("{}: answer {body:?} out of order", c.name));
            }
        }
    }
    println!("{}", table.join("\n"));

    // The lean path took what it should (by construction of the bytes).
    let three = cases
        .iter()
        .position(|c| c.name == "three keep-alive GETs pipelined")
        .unwrap();
    assert_eq!(
        lean_view(&expand(&cases[three].send, "/x")),
        ["request", "request", "request", "partial"]
    );
    let get_body = cases
        .iter()
        .position(|c| c.name == "GET with a Content-Length body, then a GET")
        .unwrap();
    assert_eq!(lean_view(&expand(&cases[get_body].send, "/x")), ["defer"]);

    // After the proxy has stopped, no upstream connection is open: the
    // record is final. Nothing framed may lack a case, and every case's
    // requests are still exactly the expected ones.
    proxy.stop().await;
    for (n, c) in cases.iter().enumerate() {
        let prefix = format!("/c{n}");
        let got = got_for(&record, &format!("{prefix}/"));
        let want: Vec<_> = c.backend.iter().map(|(m, p, _)| format!("{m} {prefix}{p}")).collect();
        let got: Vec<_> = got.iter().map(|g| format!("{} {}", g.method, g.path)).collect();
        if got != want {
            failures.push(format!("{} after stop: backend {got:?} want {want:?}", c.name));
        }
    }
    {
        let r = record.lock().unwrap();
        for (i, conn) in r.iter().enumerate() {
            for g in &conn.requests {
                if !g.path.starts_with("/c") || g.path.contains("smuggled") || g.path.contains("never") {
                    failures.push(format!(
                        "upstream connection {i}: unexpected request {} {}",
                        g.method, g.path
                    ));
                }
            }
            // A request whose body proves broken after ferry began to
            // stream it is cut short (the connection closes mid-body):
            // fine. Bytes a strict parser cannot frame are not.
            if let Some(p) = &conn.problem {
                println!(
                    "upstream connection {i}: {p} ({} bytes, {} requests)",
                    conn.bytes.len(),
                    conn.requests.len()
                );
                if !p.starts_with("closed with") || p.contains("smuggled") {
                    failures.push(format!("upstream connection {i}: {p}"));
                }
            }
        }
    }
    cancel.cancel();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
