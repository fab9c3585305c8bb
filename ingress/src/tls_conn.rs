//! A downstream TLS connection after its handshake: the TCP stream and
//! the rustls session, read and written without tokio-rustls's stream.
//!
//! tokio-rustls does the handshake (`TlsAcceptor`, and the client-cert
//! path's `LazyConfigAcceptor`); then the connection is served through
//! this, which asks rustls for TLS bytes only when it has no plaintext
//! left and never tries the socket a second time after a read that gave
//! data. tokio-rustls's `poll_read` tries to fill the caller's buffer
//! after every record and its `poll_fill_buf` goes through rustls's
//! deframer on every poll, so each keep-alive request cost four trips
//! through rustls's read path (three of them to learn the socket had
//! nothing), about a fifth of what TLS adds to a proxied request.
//!
//! What it does is what tokio-rustls does otherwise: records are written
//! as soon as they are encrypted (a write returns once rustls took the
//! plaintext; `flush` sends what the socket did not take), alerts and
//! key-update answers rustls queues while reading go out with the next
//! read or write, a clean `close_notify` reads as end of stream and a TCP
//! end without it as `UnexpectedEof`, and `shutdown` sends `close_notify`.

use std::io::{self, BufRead, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::ServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Socket reads per `poll_read` before yielding (each reads at most one
/// rustls-sized chunk, 4 KiB; a 16 KiB record takes five).
const READS_PER_POLL: usize = 32;

/// A TLS server connection past its handshake.
pub struct TlsConn {
    tcp: TcpStream,
    tls: ServerConnection,
    /// `close_notify` was queued (by `shutdown`).
    close_sent: bool,
    /// Decrypted bytes not read yet (rustls's count after the last
    /// `process_new_packets`, less what was read since).
    plaintext: usize,
    /// The client's side ended (TCP end or `close_notify`): rustls's
    /// reader reports which.
    ended: bool,
}

impl TlsConn {
    pub fn new(tcp: TcpStream, tls: ServerConnection) -> TlsConn {
        TlsConn {
            tcp,
            tls,
            close_sent: false,
            // What the handshake left (early records) is read first.
            plaintext: usize::MAX,
            ended: false,
        }
    }

    /// Writes the TLS records rustls has queued, until none is left or
    /// the socket is full (`Pending`, with the waker registered).
    fn poll_send_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bounded: every turn writes some bytes or returns.
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut SocketWriter { tcp: &mut self.tcp, cx }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies decrypted bytes into `buf`: `Some` when there was something
    /// to say (data, a clean end, or an error), `None` when rustls needs
    /// more TLS bytes.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        let mut copied = false;
        // Bounded by the buffer: every turn fills some of it or stops.
        while buf.remaining() > 0 {
            let mut reader = self.tls.reader();
            match reader.fill_buf() {
                Ok([]) => return Some(Ok(())),
                Ok(chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    reader.consume(n);
                    self.plaintext = self.plaintext.saturating_sub(n);
                    copied = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext = 0;
                    break;
                }
                // After data, the error waits for the next read.
                Err(_) if copied => break,
                Err(e) => return Some(Err(e)),
            }
        }
        copied.then_some(Ok(()))
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            if this.plaintext > 0 || this.ended {
                if let Some(done) = this.take_plaintext(buf) {
                    return Poll::Ready(done);
                }
            }
            // Nothing decrypted is waiting: the socket decides. Asked
            // first, so a socket with nothing to read costs rustls nothing.
            std::task::ready!(this.tcp.poll_read_ready(cx))?;
            match this.tls.read_tls(&mut SocketReader { tcp: &mut this.tcp, cx }) {
                // TCP end: rustls now says whether it was clean.
                Ok(0) => this.ended = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            let processed = this.tls.process_new_packets();
            if let Ok(state) = &processed {
                this.plaintext = state.plaintext_bytes_to_read();
                this.ended |= state.peer_has_closed();
            }
            // An alert for a bad record, or the answer to a key update:
            // best effort now, the rest with the next write or flush.
            if this.tls.wants_write() {
                if let Poll::Ready(Err(e)) = this.poll_send_queued(cx) {
                    if processed.is_ok() {
                        return Poll::Ready(Err(e));
                    }
                }
            }
            if let Err(e) = processed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        // Much data at once: let other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.poll_write_with(cx, |w| w.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.poll_write_with(cx, |w| w.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_send_queued(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.tls.send_close_notify();
            this.close_sent = true;
        }
        std::task::ready!(this.poll_send_queued(cx))?;
        match std::task::ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl TlsConn {
    /// Hands plaintext to rustls (which encrypts it into records at once)
    /// and sends the records. Returns how much plaintext rustls took; when
    /// its outgoing buffer is full, first sends what it holds.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&mut rustls::Writer<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        // Bounded: the second turn follows a send that emptied the buffer.
        for _ in 0..2 {
            let n = write(&mut self.tls.writer())?;
            let sent = self.poll_send_queued(cx);
            if n > 0 {
                // The records not sent yet go with the next write or flush.
                return match sent {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Ready(Ok(n)),
                };
            }
            std::task::ready!(sent)?;
        }
        Poll::Ready(Ok(0))
    }
}

/// `std::io::Read` over the socket for rustls: `WouldBlock` when the
/// socket has nothing (the task is woken when it has).
struct SocketReader<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SocketReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.tcp).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// `std::io::Write` over the socket for rustls (vectored: rustls hands
/// over all queued records at once).
struct SocketWriter<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Write for SocketWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsConn {
    /// Queues `close_notify` (once) and writes what rustls holds without
    /// waiting (best effort: what the socket does not take is dropped).
    fn close_now(&mut self) {
        struct TryWrite<'a>(&'a TcpStream);
        impl Write for TryWrite<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        if !self.close_sent {
            self.tls.send_close_notify();
            self.close_sent = true;
        }
        // Bounded: each turn writes some TLS bytes or stops.
        for _ in 0..8 {
            if !self.tls.wants_write() {
                break;
            }
            match self.tls.write_tls(&mut TryWrite(&self.tcp)) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// A connection dropped without `shutdown` (the client closed, a timeout,
/// an error) still ends its TLS session with `close_notify`, so a client
/// can tell the end from a truncation (RFC 8446 §6.1).
impl Drop for TlsConn {
    fn drop(&mut self) {
        self.close_now();
    }
}

impl crate::conn::RawSend for TlsConn {
    fn send_now(&mut self, bytes: &[u8]) {
        if self.tls.writer().write_all(bytes).is_err() {
            return;
        }
        self.close_now();
        crate::conn::linger(&self.tcp);
    }

    fn negotiated_h2(&self) -> bool {
        self.tls.alpn_protocol() == Some(b"h2")
    }
}
