//! The lean HTTP/1.1 server path: the request heads and response heads of
//! plain keep-alive requests, without hyper's connection machinery.
//!
//! A downstream connection starts on this path (`proxy::lean`). Each head
//! is parsed here with httparse into an `http::Request`; a request the
//! lean path serves has no body, is HTTP/1.1 in origin form, and asks for
//! no upgrade or `Expect`. For anything else — a body, HTTP/1.0, HTTP/2's
//! preface, an upgrade, a head hyper would refuse or answer 431 — the lean
//! path hands the connection over to hyper for the rest of its life, with
//! the bytes it has read (`Rewind`). So every request hyper would refuse is
//! refused by hyper itself, with hyper's answer; the lean path only ever
//! *accepts* requests hyper accepts too, with the same method, target,
//! version and headers (held by the differential test in
//! `tests/h1_differential.rs`).
//!
//! The lean path is stricter than hyper in two places, both about request
//! framing (request smuggling): a request with both `Content-Length` and
//! `Transfer-Encoding`, and one with more than one `Content-Length` (hyper
//! takes the chunked framing and closes after it, and accepts repeated
//! equal lengths), are refused with 400 and the connection is closed, as
//! nginx does.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::RequestBody;

/// Headers a lean request may have (hyper's default limit; a request with
/// more goes to hyper, which answers 431).
pub const MAX_HEADERS: usize = 100;

/// hyper's limit on a request target (longer ones get 414 from hyper).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// What the lean path makes of the bytes read so far.
#[derive(Debug)]
// Returned by value once per request and matched at once, never stored.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// No complete head yet, and below the head size limit: read more.
    Partial,
    /// A request for the lean path; its head was taken off the buffer.
    /// `true` when it asks to close the connection after its response
    /// (`Connection: close`). Made with its (empty) body, so the
    /// connection loop does not move it again to add one.
    Request(Request<RequestBody>, bool),
    /// hyper serves the connection from here on, starting with the
    /// buffer as it is.
    Defer,
    /// Refused by the lean path's own framing rules: answer this status
    /// and close the connection.
    Reject(StatusCode),
}

/// Parses the head at the start of `buf` (`max_head`: hyper's buffer
/// limit, past which an incomplete head is hyper's to refuse with 431).
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Parsed {
    HeadParser::default().parse(buf, max_head)
}

/// `parse` with its scratch space kept between requests (one per
/// connection).
#[derive(Debug, Default)]
pub struct HeadParser {
    /// Each header's (name start, name end, value start, value end) in
    /// the buffer.
    spans: Vec<[usize; 4]>,
}

impl HeadParser {
    /// See `parse`.
    pub fn parse(&mut self, buf: &mut BytesMut, max_head: usize) -> Parsed {
        if buf.is_empty() {
            // Between keep-alive requests.
            return Parsed::Partial;
        }
        // Not zeroed: httparse writes each header before it is read.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < max_head => return Parsed::Partial,
            // Too large, too many headers, or malformed: hyper's to answer.
            Ok(httparse::Status::Partial) | Err(_) => return Parsed::Defer,
        };
        if len > max_head || req.version != Some(1) {
            return Parsed::Defer;
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Parsed::Defer;
        };
        if !path.starts_with('/') || path.len() > MAX_URI_LEN {
            // Absolute form, `*`, or hyper's 414.
            return Parsed::Defer;
        }
        let method = match Method::from_bytes(method.as_bytes()) {
            Ok(m) if m != Method::CONNECT => m,
            _ => return Parsed::Defer,
        };
        // Framing, and what only hyper does: bodies, upgrades, 100-continue.
        let mut lengths = 0usize;
        let mut body = false;
        let mut transfer_encoding = false;
        let mut for_hyper = false;
        let mut close = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"connection") {
                close |= asks_close(h.value);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                body |= h.value != b"0";
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                transfer_encoding = true;
            } else if name.eq_ignore_ascii_case(b"upgrade") || name.eq_ignore_ascii_case(b"expect") {
                for_hyper = true;
            }
        }
        // Framing first: an upgrade or `Expect` does not make conflicting
        // framing acceptable.
        if lengths > 1 || (lengths > 0 && transfer_encoding) {
            return Parsed::Reject(StatusCode::BAD_REQUEST);
        }
        if body || transfer_encoding || for_hyper {
            return Parsed::Defer;
        }
        // Offsets into the buffer, so the head's bytes are shared, not copied.
        let base = buf.as_ptr() as usize;
        let path_range = offset(base, path.as_bytes());
        self.spans.clear();
        self.spans.extend(req.headers.iter().map(|h| {
            let (ns, ne) = offset(base, h.name.as_bytes());
            let (vs, ve) = offset(base, h.value);
            [ns, ne, vs, ve]
        }));
        let head = buf.split_to(len).freeze();
        match self.request(method, &head, path_range) {
            Some(request) => Parsed::Request(request, close),
            None => {
                // A head hyper answers (a target or header `http` refuses):
                // put it back in front of what follows, for hyper to read
                // first.
                let mut whole = BytesMut::with_capacity(head.len() + buf.len());
                whole.extend_from_slice(&head);
                whole.extend_from_slice(buf);
                *buf = whole;
                Parsed::Defer
            }
        }
    }

    /// The request of a parsed head, sharing its bytes; `None` when `http`
    /// refuses its target or a header.
    fn request(&self, method: Method, head: &Bytes, path: (usize, usize)) -> Option<Request<RequestBody>> {
        let uri = Uri::from_maybe_shared(head.slice(path.0..path.1)).ok()?;
        // Sized for the client's headers alone: the plain path writes the
        // upstream head without adding to the map (`encode_forwarded`),
        // and a larger map would leave the allocator's per-thread cache.
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for &[ns, ne, vs, ve] in &self.spans {
            let name = HeaderName::from_bytes(&head[ns..ne]).ok()?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).ok()?;
            map.append(name, value);
        }
        let mut request = Request::new(RequestBody::Empty);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = map;
        Some(request)
    }
}

fn offset(base: usize, part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - base;
    (start, start + part.len())
}

/// Whether a `Connection` header value lists `close`.
fn asks_close(value: &[u8]) -> bool {
    crate::h1::tokens(value).any(|t| t.eq_ignore_ascii_case(b"close"))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Nothing after the head (HEAD, 204, 304, an empty body).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// The response head for a request of `method`, appended to `out`; how
/// its body is framed, and whether the connection closes after it.
/// `body_len`: the body's exact length when known (`Some(0)` for an empty
/// body). `close`: the connection closes after this response; so it does
/// when the response's own `Connection` lists `close`. Either way
/// `Connection: close` is written, and no other `Connection` header (it
/// describes this hop only). Returns `None` when the response headers
/// contradict themselves (an unparsable or repeated, differing
/// `Content-Length`): the caller answers 502.
pub fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    method: &Method,
    body_len: Option<u64>,
    mut close: bool,
    out: &mut Vec<u8>,
) -> Option<(BodyFraming, bool)> {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // 1xx, 204 and 304 have neither a body nor a length.
    let may_have_length =
        !(status.is_informational() || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED));
    let no_body = *method == Method::HEAD || !may_have_length;
    let mut declared: Option<u64> = None;
    let mut wrote_date = false;
    // One pass: the framing headers are read, not copied; the others are.
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            let len = crate::h1::decimal(value.as_bytes().trim_ascii())?;
            if declared.is_some_and(|d| d != len) {
                return None;
            }
            declared = Some(len);
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONNECTION {
            close |= asks_close(value.as_bytes());
            continue;
        }
        wrote_date |= *name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if no_body {
        // HEAD keeps the length the upstream declared for GET.
        if *method == Method::HEAD && may_have_length {
            if let Some(len) = declared.or(body_len.filter(|&n| n > 0)) {
                length_header(out, len);
            }
        }
        BodyFraming::None
    } else if let Some(len) = declared.or(body_len) {
        length_header(out, len);
        if len == 0 {
            BodyFraming::None
        } else {
            BodyFraming::Length(len)
        }
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        BodyFraming::Chunked
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some((framing, close))
}

fn length_header(out: &mut Vec<u8>, len: u64) {
    out.extend_from_slice(b"content-length: ");
    crate::bytes_fmt::number(out, len, 10, 1);
    out.extend_from_slice(b"\r\n");
}

/// The size line of a chunk (`1a3\r\n`) into `out`.
pub fn chunk_size_line(len: usize, out: &mut Vec<u8>) {
    crate::bytes_fmt::number(out, len as u64, 16, 1);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` header's value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    c.1.copy_from_slice(text.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        });
    }
}

/// A transport with bytes already read from it put back in front: how a
/// connection the lean path read from is handed to hyper.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use super::*;

    fn parsed(raw: &str) -> Parsed {
        parse(&mut BytesMut::from(raw), 64 * 1024)
    }

    #[test]
    fn a_plain_get_is_lean_and_keeps_its_headers_in_order() {
        let raw = "GET /a/b?c=d HTTP/1.1\r\nHost: x.test\r\nX-A: 1\r\nx-a: 2\r\nAccept: */*\r\n\r\nGET /next";
        let mut buf = BytesMut::from(raw);
        let Parsed::Request(req, false) = parse(&mut buf, 64 * 1024) else {
            panic!("not lean")
        };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_11);
        let values: Vec<_> = req
            .headers()
            .get_all("x-a")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(req.headers()["host"], "x.test");
        // The pipelined rest stays in the buffer.
        assert_eq!(&buf[..], b"GET /next");
        assert!(matches!(parse(&mut buf, 64 * 1024), Parsed::Partial));
    }

    #[test]
    fn bodies_upgrades_and_other_versions_go_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Parsed::Defer), "{raw:?}");
        }
    }

    #[test]
    fn conflicting_framing_is_refused() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 7\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(raw), Parsed::Reject(StatusCode::BAD_REQUEST)),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn a_head_left_to_hyper_stays_in_the_buffer() {
        // Every visible byte in the target and in a header value: either a
        // lean request, or the buffer exactly as it was (hyper reads it).
        for b in 0x21u8..=0xff {
            for raw in [
                [
                    &b"GET /a"[..],
                    &[b],
                    &b" HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n\r\n"[..],
                ]
                .concat(),
                [
                    &b"GET / HTTP/1.1\r\nHost: a\r\nX-V: a"[..],
                    &[b],
                    &b"\r\n\r\nGET /next HTTP/1.1\r\n\r\n"[..],
                ]
                .concat(),
            ] {
                let mut buf = BytesMut::from(&raw[..]);
                match parse(&mut buf, 64 * 1024) {
                    Parsed::Request(..) => assert!(buf.starts_with(b"GET /next"), "{raw:?}"),
                    Parsed::Defer | Parsed::Reject(_) | Parsed::Partial => assert_eq!(&buf[..], &raw[..], "{raw:?}"),
                }
            }
        }
    }

    #[test]
    fn an_oversized_head_is_hypers_to_refuse() {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\nX-Big: ");
        raw.push_str(&"a".repeat(70 * 1024));
        assert!(matches!(parsed(&raw), Parsed::Defer));
        assert!(matches!(parsed("GET / HTTP/1.1\r\nHost: a\r\n"), Parsed::Partial));
    }

    fn head(
        status: StatusCode,
        headers: &[(&str, &str)],
        method: Method,
        body_len: Option<u64>,
        close: bool,
    ) -> (String, BodyFraming) {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let (framing, closes) = encode_head(status, &map, &method, body_len, close, &mut out).unwrap();
        let asked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection") && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        });
        assert_eq!(closes, close || asked);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn response_heads_frame_their_bodies() {
        let (h, f) = head(StatusCode::OK, &[("x-a", "1")], Method::GET, Some(2), false);
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ndate: "),
            "{h}"
        );
        assert!(h.ends_with(" GMT\r\n\r\n"), "{h}");
        assert_eq!(f, BodyFraming::Length(2));

        let (h, f) = head(StatusCode::NOT_FOUND, &[("date", "x")], Method::GET, None, true);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\ndate: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(f, BodyFraming::Chunked);

        // The upstream's length is kept, for HEAD too, without a body.
        let (h, f) = head(
            StatusCode::OK,
            &[("content-length", "10"), ("date", "x")],
            Method::HEAD,
            Some(0),
            false,
        );
        assert_eq!(h, "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 10\r\n\r\n");
        assert_eq!(f, BodyFraming::None);

        let (h, f) = head(StatusCode::NO_CONTENT, &[("date", "x")], Method::GET, Some(0), false);
        assert_eq!(h, "HTTP/1.1 204 No Content\r\ndate: x\r\n\r\n");
        assert_eq!(f, BodyFraming::None);

        // `Connection` is this hop's: never copied; its `close` closes.
        let (h, _) = head(
            StatusCode::OK,
            &[("connection", "keep-alive"), ("date", "x")],
            Method::GET,
            Some(0),
            false,
        );
        assert_eq!(h, "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 0\r\n\r\n");
        let (h, _) = head(
            StatusCode::OK,
            &[("connection", "x, Close"), ("date", "x")],
            Method::GET,
            Some(0),
            false,
        );
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );

        let mut map = HeaderMap::new();
        map.append(header::CONTENT_LENGTH, HeaderValue::from_static("+1"));
        assert!(encode_head(StatusCode::OK, &map, &Method::GET, None, false, &mut Vec::new()).is_none());
        let mut map = HeaderMap::new();
        map.append(header::CONTENT_LENGTH, HeaderValue::from_static("1"));
        map.append(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        assert!(encode_head(StatusCode::OK, &map, &Method::GET, None, false, &mut Vec::new()).is_none());
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut out = Vec::new();
        chunk_size_line(4096, &mut out);
        assert_eq!(out, b"1000\r\n");
    }
}
