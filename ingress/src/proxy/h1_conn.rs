//! The lean HTTP/1.1 path's connection loop: reads heads, routes and
//! forwards through `handle`, and writes responses itself, until a
//! request needs hyper (`h1_server::parse` says `Defer`); then it gives
//! the transport and the bytes it read back to the caller, which serves
//! the rest of the connection with hyper.
//!
//! What hyper does for a plain keep-alive request, this does too: a
//! client that closes its side while its request is being answered
//! cancels it (499; hyper's default without half-close), pipelined
//! requests are answered in order, the `Date` header is added, a body of
//! unknown length goes chunked, and the connection's watchdog sees the
//! same request and frame accounting (`ResponseBody`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{handle, ConnContext, ProxyBody, ResponseBody, MAX_REQUEST_HEAD};
use crate::conn::ActiveRequest;
use crate::h1_server::{self, BodyFraming, Parsed};

/// Bytes asked of the transport per read.
const READ_CHUNK: usize = 8 * 1024;
/// Response bytes gathered before a write; larger body frames are written
/// straight from their own buffer.
const WRITE_GATHER: usize = 16 * 1024;

/// How the lean path left a connection.
pub(super) enum LeanEnd<S> {
    /// Done: closed by either side, or after an error.
    Closed,
    /// A request for hyper: the transport, and what was read from it.
    Defer(S, Bytes),
}

/// A connection on the lean path, as `drive` supervises it.
pub(super) struct LeanConn<S> {
    run: Pin<Box<dyn Future<Output = LeanEnd<S>> + Send>>,
    closing: Arc<AtomicBool>,
}

impl<S> Future for LeanConn<S> {
    type Output = LeanEnd<S>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LeanEnd<S>> {
        self.run.as_mut().poll(cx)
    }
}

impl<S> super::Served for LeanConn<S> {
    fn shutdown(self: Pin<&mut Self>) -> bool {
        self.closing.store(true, Ordering::Relaxed);
        // Between requests nothing is owed to the client: close now.
        true
    }
}

/// Serves `io` on the lean path.
pub(super) fn serve<S>(ctx: Arc<ConnContext>, io: S) -> LeanConn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let closing = Arc::new(AtomicBool::new(false));
    LeanConn {
        run: Box::pin(run(ctx, io, closing.clone())),
        closing,
    }
}

async fn run<S>(ctx: Arc<ConnContext>, mut io: S, closing: Arc<AtomicBool>) -> LeanEnd<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    let mut parser = h1_server::HeadParser::default();
    // Bounded: every turn reads, answers one request, or returns.
    loop {
        // Matched in place (no move of the request out of `parsed`).
        let mut parsed = parser.parse(&mut buf, MAX_REQUEST_HEAD);
        let (req, asks_close) = match &mut parsed {
            Parsed::Request(r, asks_close) => (r, *asks_close),
            Parsed::Defer => return LeanEnd::Defer(io, buf.freeze()),
            &mut Parsed::Reject(status) => {
                tracing::debug!(status = status.as_u16(), "refused a request's framing");
                ctx.shared.metrics.http1_framing_refused.inc();
                out.clear();
                let _ = h1_server::encode_head(status, &http::HeaderMap::new(), &Method::GET, Some(0), true, &mut out);
                let _ = io.write_all(&out).await;
                let _ = io.shutdown().await;
                return LeanEnd::Closed;
            }
            Parsed::Partial => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                match io.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return LeanEnd::Closed,
                    Ok(_) => continue,
                }
            }
        };
        let method = req.method().clone();
        // `respond`, unrolled: one move of the response fewer.
        let active = ctx.conn.request_started();
        let mut response = {
            let mut handling = std::pin::pin!(handle(&ctx, req));
            // The client's side is read while its request is answered: a
            // close cancels the request (dropping `handling`), pipelined
            // bytes wait in `buf` (up to a head's worth).
            let mut watch = true;
            loop {
                tokio::select! {
                    biased;
                    r = &mut handling => break r,
                    n = io.read_buf(&mut buf), if watch => match n {
                        Ok(0) | Err(_) => return LeanEnd::Closed,
                        Ok(_) => watch = buf.len() < MAX_REQUEST_HEAD,
                    },
                }
            }
        };
        drop(parsed);
        let close = asks_close || closing.load(Ordering::Relaxed);
        let reusable = match write_response(&mut io, &mut response, active, &method, close, &mut out).await {
            Ok(reusable) => reusable,
            Err(e) => {
                tracing::debug!(error = %e, "writing a response failed");
                return LeanEnd::Closed;
            }
        };
        drop(response);
        if !reusable || closing.load(Ordering::Relaxed) {
            let _ = io.shutdown().await;
            return LeanEnd::Closed;
        }
    }
}

/// Writes a response; `Ok(true)` when the connection may carry another
/// request: not when it closes after this response (`close`, or the
/// response's own `Connection: close`), nor when the body ended early or
/// failed.
/// The response is written in place (not moved again); its body carries
/// the request's in-flight count (`active`) and `limit-connections` slot
/// (`ResponseBody`) until it is done.
async fn write_response<S>(
    io: &mut S,
    response: &mut http::Response<ProxyBody>,
    active: ActiveRequest,
    method: &Method,
    close: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    out.clear();
    let body_len = if response.body().is_end_stream() {
        Some(0)
    } else {
        response.body().size_hint().exact()
    };
    let (status, headers) = (response.status(), response.headers());
    let encoded = h1_server::encode_head(status, headers, method, body_len, close, out);
    let mut extensions = std::mem::take(response.extensions_mut());
    let body = &mut ResponseBody::new(response.body_mut(), active, &mut extensions);
    let Some((framing, close)) = encoded else {
        tracing::warn!("upstream response has conflicting Content-Length headers");
        out.clear();
        let empty = http::HeaderMap::new();
        let _ = h1_server::encode_head(StatusCode::BAD_GATEWAY, &empty, method, Some(0), true, out);
        io.write_all(out).await?;
        return Ok(false);
    };
    let mut remaining = match framing {
        BodyFraming::None => {
            io.write_all(out).await?;
            io.flush().await?;
            return Ok(!close);
        }
        BodyFraming::Length(n) => n,
        BodyFraming::Chunked => u64::MAX,
    };
    let chunked = framing == BodyFraming::Chunked;
    // Bounded by the body: every turn takes a frame or writes what is
    // gathered (after which the next turn waits for a frame).
    loop {
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        let frame = match polled {
            Poll::Ready(f) => f,
            Poll::Pending if !out.is_empty() => {
                io.write_all(out).await?;
                out.clear();
                continue;
            }
            Poll::Pending => std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await,
        };
        match frame {
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
                return Ok(!close && (chunked || remaining == 0));
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed");
                io.write_all(out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    // Trailers are not forwarded on HTTP/1.1.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if !chunked {
                    let allowed = usize::try_from(remaining).unwrap_or(usize::MAX);
                    if data.len() > allowed {
                        tracing::debug!("response body longer than its Content-Length; cut");
                        data.truncate(allowed);
                    }
                    remaining -= data.len() as u64;
                } else {
                    h1_server::chunk_size_line(data.len(), out);
                }
                if out.len() + data.len() <= WRITE_GATHER {
                    out.extend_from_slice(&data);
                } else {
                    write_two(io, out, &data).await?;
                    out.clear();
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if !chunked && remaining == 0 {
                    // All that was declared; anything more is not sent.
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                    return Ok(!close);
                }
            }
        }
    }
}

/// Writes `first` then `second`, with vectored writes.
async fn write_two<S>(io: &mut S, first: &[u8], second: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let (mut a, mut b) = (first, second);
    // Bounded: every turn writes at least one byte or fails.
    while !a.is_empty() || !b.is_empty() {
        let slices = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
        let n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}
