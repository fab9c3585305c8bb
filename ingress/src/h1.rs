//! A lean HTTP/1.1 upstream exchange for the common request: no request
//! body, no upgrade, an idempotent method, a plain HTTP/1.1 upstream.
//!
//! The request task writes the request head itself and parses the
//! response head with `httparse`, then streams the body straight from the
//! socket (`RawBody`). There is no connection task and no channel between
//! it and the request, which is what the hyper client costs per request;
//! requests with a body, upgrades and h2c still go through hyper.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::{EndpointState, InFlight};

/// Response heads larger than this are refused (as hyper's default).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
const READ_CHUNK: usize = 8 * 1024;

/// An idle (or in use) HTTP/1.1 upstream connection with its read buffer.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Scratch for `parse_head`: each header's (name, value) offsets and
    /// lengths in `buf`.
    spans: Vec<((usize, usize), (usize, usize))>,
    /// The response-header deadline, kept with the connection: moving a
    /// registered timer's deadline later is one atomic update, where a
    /// new timer per exchange is registered and removed under the timer
    /// driver's lock.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Closed or reset before any response byte: on a reused connection,
    /// the upstream had closed it while idle.
    #[error("connection closed before a response: {0}")]
    Closed(io::Error),
    #[error("{0}")]
    Io(io::Error),
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// No complete response head by the deadline.
    #[error("no response head in time")]
    TimedOut,
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once the body is read.
    pub keep_alive: bool,
}

/// The request head for `method` `target` with `headers`.
pub fn encode_request(method: &Method, target: &str, headers: &HeaderMap) -> Bytes {
    let mut head = HeadWriter::new(method, target, headers, 0);
    for (name, value) in headers {
        head.header(name.as_str().as_bytes(), &[value.as_bytes()]);
    }
    head.finish()
}

/// An HTTP/1.1 request head being written: the request line, then header
/// lines, then the blank line (`finish`).
pub struct HeadWriter(Vec<u8>);

impl HeadWriter {
    /// Starts with the request line, sized for `headers` plus `extra`
    /// bytes of headers added on the way.
    pub fn new(method: &Method, target: &str, headers: &HeaderMap, extra: usize) -> HeadWriter {
        let mut len = method.as_str().len() + target.len() + 14 + extra;
        for (name, value) in headers {
            len += name.as_str().len() + value.len() + 4;
        }
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(method.as_str().as_bytes());
        b.push(b' ');
        b.extend_from_slice(target.as_bytes());
        b.extend_from_slice(b" HTTP/1.1\r\n");
        HeadWriter(b)
    }

    /// One header line; the value is the concatenation of `value`'s parts.
    pub fn header(&mut self, name: &[u8], value: &[&[u8]]) {
        self.0.extend_from_slice(name);
        self.0.extend_from_slice(b": ");
        for part in value {
            self.0.extend_from_slice(part);
        }
        self.0.extend_from_slice(b"\r\n");
    }

    pub fn finish(mut self) -> Bytes {
        self.0.extend_from_slice(b"\r\n");
        Bytes::from(self.0)
    }
}

/// The comma-separated elements of a header value, without surrounding
/// whitespace.
pub(crate) fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// A `Content-Length` element: ASCII digits only (no sign, no
/// whitespace inside), within u64.
pub(crate) fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

impl RawConn {
    pub fn new(stream: TcpStream) -> RawConn {
        RawConn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            spans: Vec::new(),
            deadline: None,
        }
    }

    /// False when the upstream closed the idle connection (or sent
    /// something unasked). Costs no syscall unless the socket was
    /// reported readable.
    pub fn is_reusable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Writes `request` and reads the response head (1xx interim
    /// responses are skipped), failing with `TimedOut` at `deadline`.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        head_request: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Head, ExchangeError> {
        let mut timer = match self.deadline.take() {
            Some(mut t) => {
                t.as_mut().reset(deadline);
                t
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let result = {
            let mut exchange = std::pin::pin!(self.exchange_untimed(request, head_request));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(ExchangeError::TimedOut))
            })
            .await
        };
        self.deadline = Some(timer);
        result
    }

    async fn exchange_untimed(&mut self, request: &[u8], head_request: bool) -> Result<Head, ExchangeError> {
        self.buf.clear();
        if let Err(e) = self.stream.write_all(request).await {
            return Err(ExchangeError::Closed(e));
        }
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_head(head_request)? {
                    return Ok(head);
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(ExchangeError::Invalid("response head too large"));
                }
            }
            match self.read_more().await {
                Ok(0) if !received => {
                    return Err(ExchangeError::Closed(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => return Err(ExchangeError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => received = true,
                Err(e) if !received => return Err(ExchangeError::Closed(e)),
                Err(e) => return Err(ExchangeError::Io(e)),
            }
        }
    }

    /// One complete response head from the buffer (consumed), or `None`
    /// when more bytes are needed.
    fn parse_head(&mut self, head_request: bool) -> Result<Option<Head>, ExchangeError> {
        loop {
            // (name, value) offsets into the buffer.
            self.spans.clear();
            let (len, code, minor) = {
                // Not zeroed: httparse writes each header before it is read.
                let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut []);
                let base = self.buf.as_ptr() as usize;
                let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                    &mut resp,
                    &self.buf,
                    &mut headers,
                );
                let len = match parsed {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(ExchangeError::Invalid("malformed response head")),
                };
                self.spans.extend(resp.headers.iter().map(|h| {
                    let name = (h.name.as_ptr() as usize - base, h.name.len());
                    let value = (h.value.as_ptr() as usize - base, h.value.len());
                    (name, value)
                }));
                (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1))
            };
            let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid("bad status"))?;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(ExchangeError::Invalid("unrequested protocol switch"));
                }
                self.buf.advance(len);
                if self.buf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            let head = self.buf.split_to(len).freeze();
            let mut headers = HeaderMap::with_capacity(self.spans.len());
            // The framing headers are read while the map is built, instead
            // of looked up in it afterwards.
            let mut length: Option<u64> = None;
            let mut has_length = false;
            // Transfer-Encoding present, and whether its last coding (over
            // all its lines) is chunked.
            let (mut has_coding, mut chunked) = (false, false);
            let (mut close, mut keep_alive) = (false, false);
            for &((ns, nl), (vs, vl)) in &self.spans {
                let name = HeaderName::from_bytes(&head[ns..ns + nl])
                    .map_err(|_| ExchangeError::Invalid("bad header name"))?;
                let raw = &head[vs..vs + vl];
                if name == header::CONTENT_LENGTH {
                    has_length = true;
                    for part in tokens(raw) {
                        let n = decimal(part).ok_or(ExchangeError::Invalid("bad content-length"))?;
                        if length.is_some_and(|l| l != n) {
                            return Err(ExchangeError::Invalid("conflicting content-length"));
                        }
                        length = Some(n);
                    }
                } else if name == header::TRANSFER_ENCODING {
                    has_coding = true;
                    if let Some(last) = tokens(raw).rfind(|t| !t.is_empty()) {
                        chunked = last.eq_ignore_ascii_case(b"chunked");
                    }
                } else if name == header::CONNECTION {
                    for t in tokens(raw) {
                        close |= t.eq_ignore_ascii_case(b"close");
                        keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
                let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                    .map_err(|_| ExchangeError::Invalid("bad header value"))?;
                headers.append(name, value);
            }
            let framing = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
                Framing::Empty
            } else if has_coding {
                if chunked {
                    Framing::Chunked
                } else {
                    Framing::Close
                }
            } else if has_length {
                match length {
                    Some(0) | None => Framing::Empty,
                    Some(n) => Framing::Length(n),
                }
            } else {
                Framing::Close
            };
            let keep_alive = framing != Framing::Close && if minor == 0 { keep_alive } else { !close };
            let mut response = Response::new(());
            *response.status_mut() = status;
            *response.version_mut() = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
            *response.headers_mut() = headers;
            return Ok(Some(Head {
                response,
                framing,
                keep_alive,
            }));
        }
    }

    /// The whole body when it is already in the buffer (the usual small
    /// response), leaving the connection ready for the next request.
    pub fn take_complete_body(&mut self, framing: Framing) -> Option<Bytes> {
        match framing {
            Framing::Empty => Some(Bytes::new()),
            Framing::Length(n) if self.buf.len() as u64 == n => Some(self.buf.split().freeze()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Close,
    Done,
}

/// A response body read straight from the upstream connection, which goes
/// back to its endpoint's pool once the body is complete.
pub struct RawBody {
    conn: Option<RawConn>,
    state: State,
    keep_alive: bool,
    endpoint: Arc<EndpointState>,
    /// Counts the request in flight (least-connection picks) until the body is done.
    in_flight: Option<InFlight>,
}

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

fn invalid(what: &'static str) -> BodyError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, what))
}

/// The position of the first `\n` in `buf`.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

impl RawBody {
    pub fn new(
        conn: RawConn,
        framing: Framing,
        keep_alive: bool,
        endpoint: Arc<EndpointState>,
        in_flight: Option<InFlight>,
    ) -> RawBody {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        RawBody {
            conn: Some(conn),
            state,
            keep_alive,
            endpoint,
            in_flight,
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.in_flight = None;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                self.endpoint.give_back_raw(conn);
            }
        }
    }

    /// Decodes what the buffer holds: a data frame, the end (`Some(None)`),
    /// or `None` when more bytes must be read.
    fn decode(&mut self) -> Result<Option<Option<Bytes>>, BodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(None));
        };
        let buf = &mut conn.buf;
        loop {
            match self.state {
                State::Done => return Ok(Some(None)),
                State::Length(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let k = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(k).freeze();
                    let rest = n - k as u64;
                    self.state = State::Length(rest);
                    if rest == 0 {
                        self.finish();
                    }
                    return Ok(Some(Some(data)));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(buf.split().freeze())));
                }
                State::ChunkSize => {
                    let Some(end) = line_end(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(invalid("chunk size line too long"));
                        }
                        return Ok(None);
                    };
                    let line = &buf[..end];
                    let digits = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
                    if digits == 0 || digits > 16 {
                        return Err(invalid("bad chunk size"));
                    }
                    let size = std::str::from_utf8(&line[..digits])
                        .ok()
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| invalid("bad chunk size"))?;
                    buf.advance(end + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let k = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(k).freeze();
                    let rest = n - k as u64;
                    self.state = if rest == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(rest)
                    };
                    return Ok(Some(Some(data)));
                }
                State::ChunkDataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(invalid("missing chunk terminator"));
                        }
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid("missing chunk terminator"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    // Trailer fields are read and dropped.
                    let Some(end) = line_end(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(invalid("trailer line too long"));
                        }
                        return Ok(None);
                    };
                    let empty = end == 0 || (end == 1 && buf[0] == b'\r');
                    buf.advance(end + 1);
                    if empty {
                        self.finish();
                        return Ok(Some(None));
                    }
                }
            }
        }
    }
}

impl hyper::body::Body for RawBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // Bounded: every turn decodes or reads (a read of 0 ends the loop).
        loop {
            match this.decode() {
                Err(e) => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(None)) => return Poll::Ready(None),
                Ok(None) => {}
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) => {
                    let close_delimited = matches!(this.state, State::Close);
                    this.conn = None;
                    this.state = State::Done;
                    if close_delimited {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(invalid("upstream closed mid-body"))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A deadline no test reaches.
    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn the_deadline_moves_with_each_exchange_on_a_connection() {
        // An upstream that answers its first request at once, the second
        // after 300 ms, and never the third.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for delay in [0, 300] {
                let _ = s.read(&mut buf).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .unwrap();
            }
            let _ = s.read(&mut buf).await;
            let _ = s.read(&mut buf).await;
        });
        let mut conn = RawConn::new(TcpStream::connect(addr).await.unwrap());
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_millis(100);
        // The first deadline passes while the second exchange waits: the
        // second one's own (later) deadline is what counts.
        let head = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, soon()).await.unwrap();
        assert_eq!(head.framing, Framing::Empty);
        let head = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await.unwrap();
        assert_eq!(head.response.status(), 200);
        // And a deadline earlier than the previous one still applies.
        let r = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, soon()).await;
        assert!(matches!(r, Err(ExchangeError::TimedOut)), "{r:?}");
    }

    /// A connection to a one-shot server that answers with `answer`
    /// (written in pieces) after reading a request head.
    async fn conn_answering(answer: Vec<&'static [u8]>) -> RawConn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            for piece in answer {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // Keep the connection open until the client is done.
            let _ = s.read(&mut buf).await;
        });
        RawConn::new(TcpStream::connect(addr).await.unwrap())
    }

    async fn body_of(conn: RawConn, head: Head) -> Result<Vec<u8>, BodyError> {
        let ep = Arc::new(EndpointState::new("127.0.0.1:1".parse().unwrap(), None, false, 1));
        let body = RawBody::new(conn, head.framing, head.keep_alive, ep.clone(), Some(ep.track()));
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn chunked_body_in_pieces_with_interim_response_and_trailers() {
        let mut conn = conn_answering(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n",
            b"5;ext=1\r\nhel",
            b"lo\r\n6\r\n world\r",
            b"\n0\r\nTrailer: x\r\n\r\n",
        ])
        .await;
        let head = conn
            .exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", false, far())
            .await
            .unwrap();
        assert_eq!(head.response.status(), 200);
        assert_eq!(head.response.headers().get("x-a").unwrap(), "b");
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(body_of(conn, head).await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn length_close_delimited_and_empty_bodies() {
        let mut conn = conn_answering(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", b"cd"]).await;
        let head = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await.unwrap();
        assert_eq!(head.framing, Framing::Length(4));
        assert!(conn.take_complete_body(head.framing).is_none());
        assert_eq!(body_of(conn, head).await.unwrap(), b"abcd");

        let mut conn = conn_answering(vec![b"HTTP/1.0 200 OK\r\n\r\nall of it"]).await;
        let head = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await.unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert!(!head.keep_alive);
        // The server keeps the socket open until the client goes: read the
        // one piece only.
        let ep = Arc::new(EndpointState::new("127.0.0.1:1".parse().unwrap(), None, false, 1));
        let mut body = RawBody::new(conn, head.framing, head.keep_alive, ep.clone(), Some(ep.track()));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "all of it");

        let mut conn = conn_answering(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"]).await;
        let head = conn.exchange(b"HEAD / HTTP/1.1\r\n\r\n", true, far()).await.unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert_eq!(conn.take_complete_body(head.framing).unwrap(), "");

        let mut conn = conn_answering(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ])
        .await;
        assert!(matches!(
            conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await,
            Err(ExchangeError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn framing_and_keep_alive_come_from_the_response_headers() {
        use Framing::*;
        // The response, and its framing and keep-alive (`Err`: refused).
        type Case = (&'static [u8], Result<(Framing, bool), ()>);
        let cases: [Case; 13] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5,6\r\n\r\n", Err(())),
            (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", Err(())),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n", Err(())),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
                Err(()),
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Ok((Empty, true))),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 5\r\n\r\n",
                Ok((Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                Ok((Close, false)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: ,\r\n\r\n",
                Ok((Chunked, true)),
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: x, Close\r\nContent-Length: 1\r\n\r\n",
                Ok((Length(1), false)),
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Ok((Length(1), false))),
            (
                b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n",
                Ok((Length(1), true)),
            ),
        ];
        for (answer, want) in cases {
            let mut conn = conn_answering(vec![answer]).await;
            let got = conn
                .exchange(b"GET / HTTP/1.1\r\n\r\n", false, far())
                .await
                .map(|h| (h.framing, h.keep_alive));
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{}", String::from_utf8_lossy(answer)),
                (Err(ExchangeError::Invalid(_)), Err(())) => {}
                (g, _) => panic!("{}: {g:?}", String::from_utf8_lossy(answer)),
            }
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_reported_as_such() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        let mut conn = RawConn::new(TcpStream::connect(addr).await.unwrap());
        let r = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await;
        assert!(matches!(r, Err(ExchangeError::Closed(_))), "{r:?}");
    }

    #[tokio::test]
    async fn pooled_connections_closed_by_the_upstream_are_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            // Then closes the idle keep-alive connection.
        });
        let ep = EndpointState::new(addr, None, false, 1);
        let config = crate::upstream::UpstreamConfig::default();
        let (mut conn, fresh) = ep.raw_connection(&config).await.unwrap();
        assert!(fresh);
        let head = conn.exchange(b"GET / HTTP/1.1\r\n\r\n", false, far()).await.unwrap();
        assert!(head.keep_alive);
        assert_eq!(conn.take_complete_body(head.framing).unwrap(), "ok");
        ep.give_back_raw(conn);
        // Let the runtime see the close (bounded wait).
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The closed one is dropped; a new connect is tried (and refused,
        // as the listener is gone) rather than the dead one handed out.
        assert!(ep.raw_connection(&config).await.is_err());
    }

    #[test]
    fn request_heads_are_encoded() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.append("x-b", HeaderValue::from_static("1"));
        let b = encode_request(&Method::GET, "/p?q=1", &h);
        assert_eq!(&b[..], b"GET /p?q=1 HTTP/1.1\r\nhost: a.test\r\nx-b: 1\r\n\r\n");
    }
}
