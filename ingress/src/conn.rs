//! Connection lifetime: what a client may hold and for how long.
//!
//! Every downstream connection has a `ConnState` that the request path
//! updates with a few uncontended atomics (requests in flight, when the
//! connection last went idle, response frames handed over), and a watchdog
//! in its task (`Watchdog`) that sleeps on one timer, re-armed only when it
//! fires, to close connections that:
//! - send no complete request head within `header_timeout` of accept, or
//!   within `keepalive_timeout` of their last response (HTTP/1 keep-alive,
//!   idle HTTP/2 — GOAWAY first, then close);
//! - stop reading a response for `send_timeout` (dropping the connection
//!   drops the response body, which releases the upstream connection);
//! - cancel more streams than `max_cancelled_streams` (HTTP/2 rapid
//!   reset; GOAWAY ENHANCE_YOUR_CALM).
//!
//! A `ConnRegistry` per listener caps open connections and sheds the
//! longest-idle one to admit a new client. `raise_nofile_limit` and
//! `release_free_memory` are the process-level parts.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Connection limits of the ingress (flags `--client-*`, `--max-connections`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept (TLS handshake included) to the first complete request
    /// head. ingress-nginx: `client_header_timeout` 60 s.
    pub header_timeout: Duration,
    /// From the end of a response to the next complete request head
    /// (HTTP/1 keep-alive; HTTP/2 connections with no stream open get a
    /// GOAWAY). ingress-nginx: `keepalive_timeout` 75 s.
    pub keepalive_timeout: Duration,
    /// How long a response may make no progress because the client does not
    /// read it. ingress-nginx: `send_timeout` 60 s.
    pub send_timeout: Duration,
    /// Between two reads of a request body. ingress-nginx:
    /// `client_body_timeout` 60 s.
    pub body_timeout: Duration,
    /// TLS handshake, from accept.
    pub tls_handshake_timeout: Duration,
    /// Open connections per listener; 0: a quarter of the open-files limit.
    pub max_connections: usize,
    /// Streams a connection may cancel (HTTP/2 RST_STREAM, or a request
    /// dropped before its response) beyond those it completed, before it
    /// gets GOAWAY ENHANCE_YOUR_CALM and is closed.
    pub max_cancelled_streams: usize,
    /// Route and forward the normalized path (dot segments removed, slashes
    /// merged, unreserved escapes decoded); off: forward the raw path
    /// (routing still uses the normalized one).
    pub forward_normalized_path: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 0,
            max_cancelled_streams: 100,
            forward_normalized_path: true,
        }
    }
}

impl Limits {
    /// `max_connections`, resolving 0 from the current open-files limit.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let soft = nofile_limit().map_or(1024, |(soft, _)| soft);
        usize::try_from(soft / 4).unwrap_or(usize::MAX).max(64)
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What the request path tells a connection's watchdog.
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    /// Requests whose response is not yet completely handed to the client.
    in_flight: AtomicUsize,
    /// Responses completed so far.
    served: AtomicU64,
    /// When `in_flight` last went to 0 (ms since `epoch`), or accept.
    idle_since_ms: AtomicU64,
    /// Response bodies that handed a frame over and wait for the
    /// connection to want the next one (i.e. for the client to read).
    waiting_on_client: AtomicUsize,
    /// Response frames handed over (progress of the send side).
    progress: AtomicU64,
    /// Cancelled streams not offset by completed ones.
    cancel_score: AtomicUsize,
    /// The connection speaks HTTP/2 (seen on its first request).
    pub(crate) h2: AtomicBool,
    /// Past the cancelled-stream budget: close with ENHANCE_YOUR_CALM.
    calm: AtomicBool,
    /// Shed to admit a new client.
    shed: AtomicBool,
    wake: Notify,
}

impl ConnState {
    fn new(id: u64) -> ConnState {
        ConnState {
            id,
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
            waiting_on_client: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
            cancel_score: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            calm: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// A request head arrived.
    pub(crate) fn request_started(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ActiveRequest {
            conn: Some(self.clone()),
            waiting: false,
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// A request was dropped before its response (client reset or gone).
    /// Returns true when this one exhausted the budget.
    pub(crate) fn cancelled(&self, budget: usize) -> bool {
        let score = self.cancel_score.fetch_add(1, Ordering::Relaxed) + 1;
        if score > budget && !self.calm.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
            return true;
        }
        false
    }

    pub(crate) fn completed(&self) {
        if self.cancel_score.load(Ordering::Relaxed) > 0 {
            let _ = self
                .cancel_score
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.saturating_sub(1)));
        }
    }

    /// No request in flight.
    pub fn is_idle_now(&self) -> bool {
        self.is_idle()
    }

    pub(crate) fn is_calm(&self) -> bool {
        self.calm.load(Ordering::Relaxed)
    }
}

/// One request in flight on a connection; dropped when its response body
/// is done (or dropped), which makes the connection idle again.
#[derive(Debug)]
pub struct ActiveRequest {
    conn: Option<Arc<ConnState>>,
    /// A frame was handed over and the next is not yet asked for.
    waiting: bool,
}

impl ActiveRequest {
    /// A response frame was handed over; `more` when the body goes on.
    pub(crate) fn frame_sent(&mut self, more: bool) {
        if let Some(c) = &self.conn {
            c.progress.fetch_add(1, Ordering::Relaxed);
            if more && !self.waiting {
                c.waiting_on_client.fetch_add(1, Ordering::Relaxed);
                self.waiting = true;
            }
        }
    }

    /// The connection asks for the next frame.
    pub(crate) fn frame_wanted(&mut self) {
        if self.waiting {
            self.waiting = false;
            if let Some(c) = &self.conn {
                c.waiting_on_client.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        self.frame_wanted();
        if let Some(c) = self.conn.take() {
            c.idle_since_ms.store(now_ms(), Ordering::Relaxed);
            c.served.fetch_add(1, Ordering::Relaxed);
            c.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Why a client's request body failed: the client's fault, never the
/// upstream's (408 and 400, not 504 and 502).
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("client sent no request body data for the body timeout")]
    Timeout,
    #[error("malformed request body: {0}")]
    Invalid(String),
}

/// A request's body as the request path sees it: hyper's, or none (the
/// lean HTTP/1.1 path serves body-less requests only).
#[derive(Debug)]
pub enum RequestBody {
    Hyper(hyper::body::Incoming),
    Empty,
}

impl hyper::body::Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Empty => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// The client's request body on its way upstream, with a deadline between
/// two reads (nginx's `client_body_timeout`) and a flag set once it was
/// read whole. Only requests with a body pay for its timer.
pub struct ClientBody {
    inner: RequestBody,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    done: Arc<AtomicBool>,
    /// `proxy-send-timeout`: told of every poll (set only on routes with it).
    watch: Option<Arc<crate::policy::upstream_opts::SendWatch>>,
}

impl ClientBody {
    /// Reports every poll to `watch` (how `proxy-send-timeout` sees the
    /// upstream stop taking the body).
    pub fn set_watch(&mut self, watch: Arc<crate::policy::upstream_opts::SendWatch>) {
        self.watch = Some(watch);
    }

    pub fn new(inner: RequestBody, timeout: Duration) -> (ClientBody, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(hyper::body::Body::is_end_stream(&inner)));
        (
            ClientBody {
                inner,
                timeout,
                sleep: None,
                armed: false,
                done: done.clone(),
                watch: None,
            },
            done,
        )
    }
}

impl hyper::body::Body for ClientBody {
    type Data = bytes::Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(w) = &this.watch {
            w.polled(polled.is_pending());
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if this.inner.is_end_stream() {
                    this.done.store(true, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError::Invalid(e.to_string())))),
            Poll::Ready(None) => {
                this.done.store(true, Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    match &mut this.sleep {
                        Some(s) => s.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let expired = this.sleep.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Some(Err(ClientBodyError::Timeout)))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections of one listener, for the cap and for shedding.
#[derive(Debug)]
pub struct ConnRegistry {
    cap: usize,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
}

/// Why a connection was (not) admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Admitted after asking the longest-idle connection to close.
    Shed,
    /// At the cap with no idle connection to shed.
    Refused,
}

impl ConnRegistry {
    pub fn new(cap: usize) -> ConnRegistry {
        ConnRegistry {
            cap: cap.max(1),
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a new connection, shedding the longest-idle one when at
    /// the cap; `None` when refused.
    pub fn admit(self: &Arc<Self>) -> (Option<Registered>, Admission) {
        let Ok(mut open) = self.open.lock() else {
            return (None, Admission::Refused);
        };
        let mut admission = Admission::Admitted;
        // Shed connections still count until their task ends; only live
        // ones count against the cap.
        let live = open.values().filter(|c| !c.shed.load(Ordering::Relaxed)).count();
        if live >= self.cap {
            match Self::longest_idle(&open) {
                Some(victim) => {
                    victim.shed.store(true, Ordering::Relaxed);
                    victim.wake.notify_one();
                    admission = Admission::Shed;
                }
                None => return (None, Admission::Refused),
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(id));
        open.insert(id, state.clone());
        (
            Some(Registered {
                registry: self.clone(),
                state,
            }),
            admission,
        )
    }

    /// Asks the longest-idle connection to close (out of file descriptors).
    pub fn shed_one(&self) -> bool {
        let Ok(open) = self.open.lock() else { return false };
        match Self::longest_idle(&open) {
            Some(victim) => {
                victim.shed.store(true, Ordering::Relaxed);
                victim.wake.notify_one();
                true
            }
            None => false,
        }
    }

    fn longest_idle(open: &HashMap<u64, Arc<ConnState>>) -> Option<&Arc<ConnState>> {
        open.values()
            .filter(|c| c.is_idle() && !c.shed.load(Ordering::Relaxed))
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Relaxed))
    }
}

/// A connection's place in its registry, given up on drop.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<ConnRegistry>,
    pub state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.remove(&self.state.id);
        }
    }
}

/// What the watchdog decided when its timer fired or it was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check again at this instant.
    Sleep(tokio::time::Instant),
    /// Idle past its deadline (or shed, or draining): close gracefully
    /// (HTTP/2 GOAWAY) and hard after a short grace.
    CloseIdle(CloseReason),
    /// Close now (response stalled, cancelled-stream budget exhausted).
    CloseNow(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    HeaderTimeout,
    KeepaliveTimeout,
    SendTimeout,
    Shed,
    TooManyCancelled,
    Drain,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::KeepaliveTimeout => "keepalive_timeout",
            CloseReason::SendTimeout => "send_timeout",
            CloseReason::Shed => "shed",
            CloseReason::TooManyCancelled => "too_many_cancelled_streams",
            CloseReason::Drain => "drain",
        }
    }
}

/// How long a connection told to close gracefully may take before it is
/// dropped (a GOAWAY to flush, an HTTP/1 response to finish writing).
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The per-connection deadline logic; pure apart from the clock it is given.
#[derive(Debug)]
pub struct Watchdog {
    limits_header: Duration,
    limits_keepalive: Duration,
    limits_send: Duration,
    last_progress: u64,
    last_progress_at: tokio::time::Instant,
}

impl Watchdog {
    pub fn new(limits: &Limits) -> Watchdog {
        Watchdog {
            limits_header: limits.header_timeout,
            limits_keepalive: limits.keepalive_timeout,
            limits_send: limits.send_timeout,
            last_progress: 0,
            last_progress_at: tokio::time::Instant::now(),
        }
    }

    /// The first deadline: the header timeout from accept.
    pub fn first_deadline(&self, accepted: tokio::time::Instant) -> tokio::time::Instant {
        accepted + self.limits_header
    }

    /// Decides at `now` (when the timer fired or the state woke it).
    pub fn check(&mut self, state: &ConnState, now: tokio::time::Instant) -> Verdict {
        if state.is_calm() {
            return Verdict::CloseNow(CloseReason::TooManyCancelled);
        }
        if state.shed.load(Ordering::Relaxed) {
            return Verdict::CloseIdle(CloseReason::Shed);
        }
        if state.is_idle() {
            let (limit, reason) = if state.served.load(Ordering::Relaxed) == 0 {
                (self.limits_header, CloseReason::HeaderTimeout)
            } else {
                (self.limits_keepalive, CloseReason::KeepaliveTimeout)
            };
            let idle_ms = now_ms().saturating_sub(state.idle_since_ms.load(Ordering::Relaxed));
            let idle = Duration::from_millis(idle_ms);
            if idle >= limit {
                return Verdict::CloseIdle(reason);
            }
            self.last_progress_at = now;
            return Verdict::Sleep(now + (limit - idle));
        }
        // Busy: the response must keep moving while it waits on the client.
        let progress = state.progress.load(Ordering::Relaxed);
        let waiting = state.waiting_on_client.load(Ordering::Relaxed) > 0;
        if progress != self.last_progress || !waiting {
            self.last_progress = progress;
            self.last_progress_at = now;
        } else if now.duration_since(self.last_progress_at) >= self.limits_send {
            return Verdict::CloseNow(CloseReason::SendTimeout);
        }
        let period = (self.limits_send / 4).max(Duration::from_millis(10));
        Verdict::Sleep(now + period)
    }

    /// The notification that wakes the watchdog early (shed, calm).
    pub fn woken(state: &ConnState) -> tokio::sync::futures::Notified<'_> {
        state.wake.notified()
    }
}

/// The HTTP/2 GOAWAY frame (last stream 2^31-1, ENHANCE_YOUR_CALM) written
/// to a connection closed for cancelling too many streams.
pub const GOAWAY_ENHANCE_YOUR_CALM: [u8; 17] = [
    0, 0, 8, // length
    7, // type GOAWAY
    0, // flags
    0, 0, 0, 0, // stream 0
    0x7f, 0xff, 0xff, 0xff, // last stream id
    0, 0, 0, 11, // ENHANCE_YOUR_CALM
];

/// A downstream connection's transport (plain TCP or TLS), passed
/// through untouched; when the connection is dropped for cancelling too
/// many HTTP/2 streams, a GOAWAY ENHANCE_YOUR_CALM is written on the way
/// out (hyper offers no way to pick a GOAWAY's error code).
pub struct Guarded<S: RawSend> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S: RawSend> Guarded<S> {
    pub fn new(inner: S, state: Arc<ConnState>) -> Guarded<S> {
        Guarded { inner, state }
    }

    /// The transport negotiated HTTP/2 (TLS ALPN `h2`).
    pub fn negotiated_h2(&self) -> bool {
        self.inner.negotiated_h2()
    }
}

impl<S: RawSend> Drop for Guarded<S> {
    fn drop(&mut self) {
        if self.state.is_calm() && self.state.h2.load(Ordering::Relaxed) {
            self.inner.send_now(&GOAWAY_ENHANCE_YOUR_CALM);
        }
    }
}

impl<S: RawSend> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: RawSend> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
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

/// A transport that can write a few bytes without waiting (best effort:
/// what does not fit in the socket buffer is dropped).
pub trait RawSend: AsyncRead + AsyncWrite + Unpin {
    fn send_now(&mut self, bytes: &[u8]);

    /// ALPN chose HTTP/2.
    fn negotiated_h2(&self) -> bool {
        false
    }
}

impl RawSend for TcpStream {
    fn send_now(&mut self, bytes: &[u8]) {
        let _ = self.try_write(bytes);
        linger(self);
    }
}

/// After a last frame: FIN, and discard what the client already sent, so
/// that the close is not a reset that makes the client drop the unread
/// frame (best effort; a client still sending may see a reset anyway).
pub(crate) fn linger(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    // Bounded: at most 64 KiB discarded.
    for _ in 0..16 {
        match tcp.try_read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Raises the soft open-files limit to the hard one (nginx's
/// `worker_rlimit_nofile`, done at start); returns (soft, hard) after.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// The current (soft, hard) open-files limit.
pub fn nofile_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

/// Whether an accept error means the process or system is out of file
/// descriptors (or kernel memory): back off and shed rather than spin.
pub fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Gives freed heap pages of every malloc arena back to the kernel (glibc
/// keeps them otherwise; a burst of thousands of connections leaves
/// hundreds of MB resident).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_sheds_the_longest_idle_then_refuses_when_all_are_busy() {
        let r = Arc::new(ConnRegistry::new(2));
        let (a, _) = r.admit();
        let a = a.unwrap();
        let (b, _) = r.admit();
        let b = b.unwrap();
        // a idle longest: it is shed. (Both were admitted within the
        // clock's first millisecond when this test runs first: set both.)
        a.state.idle_since_ms.store(0, Ordering::Relaxed);
        b.state.idle_since_ms.store(1_000, Ordering::Relaxed);
        let (c, how) = r.admit();
        assert_eq!(how, Admission::Shed);
        assert!(a.state.shed.load(Ordering::Relaxed));
        // b and c busy, a already shed: refused.
        let _rb = b.state.request_started();
        let _rc = c.as_ref().unwrap().state.request_started();
        let (d, how) = r.admit();
        assert!(d.is_none());
        assert_eq!(how, Admission::Refused);
        drop(a);
        assert_eq!(r.len(), 2);
    }

    #[tokio::test]
    async fn watchdog_deadlines() {
        let limits = Limits {
            header_timeout: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(4),
            ..Limits::default()
        };
        let state = Arc::new(ConnState::new(1));
        let mut w = Watchdog::new(&limits);
        let now = tokio::time::Instant::now();
        assert!(matches!(w.check(&state, now), Verdict::Sleep(_)));
        // Busy and waiting on a client that reads nothing: closed after
        // the send timeout, not before.
        let mut req = state.request_started();
        req.frame_sent(true);
        assert!(matches!(w.check(&state, now), Verdict::Sleep(_)));
        let later = now + Duration::from_secs(3);
        assert!(matches!(w.check(&state, later), Verdict::Sleep(_)));
        let stalled = now + Duration::from_secs(4);
        assert_eq!(w.check(&state, stalled), Verdict::CloseNow(CloseReason::SendTimeout));
        // Progress resets it.
        req.frame_wanted();
        req.frame_sent(true);
        assert!(matches!(w.check(&state, stalled), Verdict::Sleep(_)));
        drop(req);
        assert!(matches!(w.check(&state, stalled), Verdict::Sleep(_)));
        assert!(!state.cancelled(1));
        assert!(state.cancelled(1));
        assert_eq!(
            w.check(&state, stalled),
            Verdict::CloseNow(CloseReason::TooManyCancelled)
        );
    }

    #[test]
    fn nofile_soft_limit_reaches_the_hard_one() {
        let (soft, hard) = raise_nofile_limit().unwrap();
        assert_eq!(soft, hard);
        assert_eq!(nofile_limit(), Some((soft, hard)));
    }
}
