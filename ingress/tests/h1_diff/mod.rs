//! The differential check between the lean HTTP/1.1 server path
//! (`ferry_ingress::h1_server::parse`) and hyper's HTTP/1 server, shared by
//! `tests/h1_differential.rs` (a seeded corpus and mutants, in `cargo test`)
//! and the cargo-fuzz target `fuzz/fuzz_targets/h1_head.rs` (which includes
//! this file with `#[path]`).
//!
//! The same bytes go to both. The lean side runs `parse` as the connection
//! loop (`proxy::h1_conn`) does: request after request off one buffer, until
//! `parse` says `Partial`, `Defer` or `Reject`, or a request asks to close.
//! The hyper side is hyper 1.x's `http1::Builder` as ferry configures it
//! (no head timeout, `max_buf_size` 64 KiB) over a `tokio::io::duplex`, with
//! a service that records every request it is handed and answers 200; the
//! client writes all the bytes, then closes its side.
//!
//! The property (`check`): every request the lean path accepts, hyper
//! accepts too, in the same position, with the same method, target,
//! version and headers (names and values, in order) and without a body.
//! A `Reject` is allowed only for the lean path's two documented framing
//! rules (`Content-Length` with `Transfer-Encoding`, or more than one
//! `Content-Length`); what hyper does with those is recorded. `Defer` and
//! `Partial` need no comparison: hyper serves those bytes itself. And the
//! lean path's answer does not depend on read boundaries: every proper
//! prefix of a head it accepts is `Partial`.
#![allow(dead_code)] // the fuzz target uses `check` only

use std::cell::RefCell;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_ingress::h1_server::{self, Parsed};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Empty;
use hyper::body::{Body, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// ferry's `MAX_REQUEST_HEAD`: hyper's `max_buf_size` and the lean path's
/// head limit.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Requests taken off one input at most (each is at least 16 bytes).
const MAX_REQUESTS: usize = MAX_REQUEST_HEAD;

/// How a request's body is framed, as the server saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    /// Chunked (or otherwise of unknown length).
    Unknown,
}

/// A request as a server took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: BodyKind,
}

impl Seen {
    fn of<B>(req: &Request<B>, body: BodyKind) -> Seen {
        Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
            body,
        }
    }
}

/// Where the lean path stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeanStop {
    /// Needs more bytes.
    Partial,
    /// Handed the rest to hyper.
    Defer,
    /// Refused with this status (and closes).
    Reject(StatusCode),
    /// The last request asked to close the connection.
    Close,
}

/// What the lean path made of an input.
#[derive(Debug, Clone)]
pub struct Lean {
    pub requests: Vec<Seen>,
    pub stop: LeanStop,
    /// For a `Reject`: the refused head's `Content-Length` and
    /// `Transfer-Encoding` header counts, as an independent scan sees them.
    pub framing_headers: Option<(usize, usize)>,
}

/// Runs the lean path over `input` as its connection loop would.
pub fn run_lean(input: &[u8]) -> Lean {
    let mut buf = BytesMut::from(input);
    let mut requests = Vec::new();
    for _ in 0..MAX_REQUESTS {
        let before = buf.clone();
        let parsed = h1_server::parse(&mut buf, MAX_REQUEST_HEAD);
        // What the lean path does not serve, hyper reads from where the
        // lean path stopped: nothing of it may have been taken.
        if !matches!(parsed, Parsed::Request(..)) {
            assert_eq!(buf, before, "the lean path consumed bytes it left to hyper");
        }
        match parsed {
            Parsed::Request(req, close) => {
                requests.push(Seen::of(&req, BodyKind::None));
                if close {
                    return Lean {
                        requests,
                        stop: LeanStop::Close,
                        framing_headers: None,
                    };
                }
            }
            Parsed::Partial => {
                return Lean {
                    requests,
                    stop: LeanStop::Partial,
                    framing_headers: None,
                }
            }
            Parsed::Defer => {
                return Lean {
                    requests,
                    stop: LeanStop::Defer,
                    framing_headers: None,
                }
            }
            Parsed::Reject(status) => {
                return Lean {
                    requests,
                    stop: LeanStop::Reject(status),
                    framing_headers: framing_headers(&buf),
                }
            }
        }
    }
    panic!("more than {MAX_REQUESTS} requests in {} bytes", input.len());
}

/// (`Content-Length` lines, `Transfer-Encoding` lines) of the head at the
/// start of `buf`, or `None` when it is not a complete head.
fn framing_headers(buf: &[u8]) -> Option<(usize, usize)> {
    let mut headers = vec![httparse::EMPTY_HEADER; 1024];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let count = |name: &str| req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
    Some((count("content-length"), count("transfer-encoding")))
}

/// What hyper made of an input.
#[derive(Debug, Clone)]
pub struct Hyper {
    /// Every request hyper handed to the service, in order.
    pub requests: Vec<Seen>,
    /// The connection's error, if it ended with one.
    pub error: Option<String>,
    /// Everything hyper wrote back.
    pub response: Vec<u8>,
}

impl Hyper {
    /// The status of the `index`th response hyper wrote (0-based), if any.
    pub fn status(&self, index: usize) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.response);
        text.match_indices("HTTP/1.")
            .filter(|(at, _)| *at == 0 || text[..*at].ends_with('\n'))
            .nth(index)
            .and_then(|(at, _)| text[at..].split(' ').nth(1))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Serves `input` with hyper's HTTP/1 server, configured as ferry does.
pub fn run_hyper(input: &[u8]) -> Hyper {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"))
        });
        rt.block_on(serve_hyper(input))
    })
}

async fn serve_hyper(input: &[u8]) -> Hyper {
    let (client, server) = tokio::io::duplex(MAX_REQUEST_HEAD);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        // Recorded when hyper hands the request over, before anything
        // (a client close, say) can cancel it.
        let body = if req.body().is_end_stream() {
            BodyKind::None
        } else {
            match req.body().size_hint().exact() {
                Some(n) => BodyKind::Length(n),
                None => BodyKind::Unknown,
            }
        };
        if let Ok(mut seen) = recorder.lock() {
            seen.push(Seen::of(&req, body));
        }
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None).max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let (mut read, mut write) = tokio::io::split(client);
    let writing = async {
        // Fails once hyper has closed the connection: fine.
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
    };
    let serving = async move { conn.await.err().map(|e| e.to_string()) };
    let reading = async {
        let mut out = Vec::new();
        let _ = read.read_to_end(&mut out).await;
        out
    };
    // Everything is in memory: this only ends early on a hang (a bug).
    let all = async { tokio::join!(writing, serving, reading) };
    let ((), error, response) = tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .unwrap_or_else(|_| panic!("hyper did not finish with {} input bytes", input.len()));
    let requests = seen.lock().map(|s| s.clone()).unwrap_or_default();
    Hyper {
        requests,
        error,
        response,
    }
}

/// What hyper did with a request the lean path rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HyperOnReject {
    /// Handed it to the service with this body framing.
    Accepted(BodyKind),
    /// Refused it with this status (0: closed without a response).
    Refused(u16),
}

/// The outcome of one input that passed the check.
#[derive(Debug, Clone)]
pub struct Report {
    /// Requests the lean path accepted (each compared with hyper's).
    pub lean_requests: usize,
    pub stop: LeanStop,
    /// For a `Reject`: hyper's handling of the same request.
    pub hyper_on_reject: Option<HyperOnReject>,
}

/// The lean path's answer may not depend on how the head arrived: every
/// proper prefix of a head it accepts is `Partial` (so a head split across
/// reads is served the same way). Checked at up to 64 split points.
fn split_invariant(input: &[u8]) -> Result<(), String> {
    let mut buf = BytesMut::from(input);
    if !matches!(h1_server::parse(&mut buf, MAX_REQUEST_HEAD), Parsed::Request(..)) {
        return Ok(());
    }
    let head = input.len() - buf.len();
    let step = (head / 64).max(1);
    for k in (0..head).step_by(step) {
        let mut prefix = BytesMut::from(&input[..k]);
        match h1_server::parse(&mut prefix, MAX_REQUEST_HEAD) {
            Parsed::Partial => {}
            other => {
                return Err(format!(
                    "the first {k} bytes of a {head}-byte head the lean path accepts give {other:?}, not Partial"
                ))
            }
        }
    }
    Ok(())
}

/// Feeds `input` to both and checks the property (see the module docs);
/// `Err` describes a divergence.
pub fn check(input: &[u8]) -> Result<Report, String> {
    split_invariant(input)?;
    let lean = run_lean(input);
    let hyper = run_hyper(input);
    let n = lean.requests.len();
    for (i, ours) in lean.requests.iter().enumerate() {
        let Some(theirs) = hyper.requests.get(i) else {
            return Err(format!(
                "the lean path accepted request {i} but hyper did not (hyper: {} requests, error {:?}, status {:?}): {ours:?}",
                hyper.requests.len(),
                hyper.error,
                hyper.status(i)
            ));
        };
        if ours != theirs {
            return Err(format!("request {i} differs:\n lean:  {ours:?}\n hyper: {theirs:?}"));
        }
    }
    let hyper_on_reject = match lean.stop {
        LeanStop::Reject(status) => {
            if status != StatusCode::BAD_REQUEST {
                return Err(format!("the lean path rejected request {n} with {status}"));
            }
            let documented = matches!(lean.framing_headers, Some((cl, te)) if cl > 1 || (cl > 0 && te > 0));
            if !documented {
                return Err(format!(
                    "the lean path rejected request {n}, which is not a documented case (CL, TE lines: {:?})",
                    lean.framing_headers
                ));
            }
            Some(match hyper.requests.get(n) {
                Some(seen) => HyperOnReject::Accepted(seen.body),
                None => HyperOnReject::Refused(hyper.status(n).unwrap_or(0)),
            })
        }
        _ => None,
    };
    Ok(Report {
        lean_requests: n,
        stop: lean.stop,
        hyper_on_reject,
    })
}

/// Counts of outcomes over many inputs.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub inputs: usize,
    /// Inputs whose first head the lean path served.
    pub first_request: usize,
    /// Inputs the lean path handed to hyper at once.
    pub first_defer: usize,
    pub first_partial: usize,
    pub first_reject: usize,
    /// Requests compared in all (pipelined ones included).
    pub requests_compared: usize,
    /// Where the lean path stopped, over all inputs.
    pub stop_partial: usize,
    pub stop_defer: usize,
    pub stop_close: usize,
    pub stop_reject: usize,
    /// Rejected requests hyper took (by body framing) or refused.
    pub reject_hyper_took_chunked: usize,
    pub reject_hyper_took_length: usize,
    pub reject_hyper_took_no_body: usize,
    pub reject_hyper_refused: usize,
    pub reject_hyper_statuses: Vec<u16>,
}

impl Tally {
    pub fn add(&mut self, r: &Report) {
        self.inputs += 1;
        self.requests_compared += r.lean_requests;
        if r.lean_requests > 0 {
            self.first_request += 1;
        }
        match r.stop {
            LeanStop::Partial => {
                self.stop_partial += 1;
                self.first_partial += usize::from(r.lean_requests == 0);
            }
            LeanStop::Defer => {
                self.stop_defer += 1;
                self.first_defer += usize::from(r.lean_requests == 0);
            }
            LeanStop::Reject(_) => {
                self.stop_reject += 1;
                self.first_reject += usize::from(r.lean_requests == 0);
            }
            LeanStop::Close => self.stop_close += 1,
        }
        match r.hyper_on_reject {
            Some(HyperOnReject::Accepted(BodyKind::Unknown)) => self.reject_hyper_took_chunked += 1,
            Some(HyperOnReject::Accepted(BodyKind::Length(_))) => self.reject_hyper_took_length += 1,
            Some(HyperOnReject::Accepted(BodyKind::None)) => self.reject_hyper_took_no_body += 1,
            Some(HyperOnReject::Refused(status)) => {
                self.reject_hyper_refused += 1;
                if !self.reject_hyper_statuses.contains(&status) {
                    self.reject_hyper_statuses.push(status);
                }
            }
            None => {}
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "inputs: {}", self.inputs)?;
        writeln!(
            f,
            "  first head: lean request {}, defer {}, partial {}, reject {}",
            self.first_request, self.first_defer, self.first_partial, self.first_reject
        )?;
        writeln!(f, "  lean requests compared with hyper's: {}", self.requests_compared)?;
        writeln!(
            f,
            "  lean stopped at: partial {}, defer {}, close {}, reject {}",
            self.stop_partial, self.stop_defer, self.stop_close, self.stop_reject
        )?;
        write!(
            f,
            "  rejects: hyper took chunked {}, took a length {}, took without body {}, refused {} (statuses {:?})",
            self.reject_hyper_took_chunked,
            self.reject_hyper_took_length,
            self.reject_hyper_took_no_body,
            self.reject_hyper_refused,
            self.reject_hyper_statuses
        )
    }
}
