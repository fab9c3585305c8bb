//! The request path: listeners, one task and one span per connection,
//! routing through the current `LiveTable` (loaded lock-free from an
//! `ArcSwap`), forwarding with retries, headers, upgrades, access log,
//! metrics, and graceful drain on cancellation.
//!
//! `Engine::apply` is the thin apply step: compile the Snapshot into a
//! `RouteTable` and `CertStore`, pair it with live endpoint state, swap.
//! Open connections keep going; in-flight requests finish on the
//! endpoints they already picked; new requests see the new table.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use ferry_cluster::{ObjectKey, Snapshot, SnapshotRx};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::access_log::{self, AccessLog};
use crate::conn::{
    self, ActiveRequest, Admission, CloseReason, ConnRegistry, ConnState, Limits, Registered, RequestBody, Verdict,
    Watchdog,
};
use crate::error::IngressError;
use crate::h1::{self as lean, BodyError, ExchangeError, RawBody};
use crate::metrics::{CloseLabels, IngressMetrics, RequestLabels, UpstreamLabels};
use crate::policy::access;
use crate::policy::balance::{self, PickKey};
use crate::policy::chash::RequestView;
use crate::policy::paths::Rewritten;
use crate::policy::upstream_opts::{
    wait_response, ErrorRequest, ReadTimeout, Retry, SendWatch, UpstreamPolicy, WaitTimeout,
};
use crate::routes::{self, normalize_host, normalize_path, ClassSelection, LbMethod, RouteMatch, RouteTable};
use crate::tls::{self, CertResolver, CertStore};
use crate::upstream::{self, Conn, EndpointState, InFlight, LiveTable, LiveUpstream, UpstreamBody, UpstreamConfig};

mod h1_conn;

/// Engine settings (from the `ferry ingress`/`serve` flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub classes: ClassSelection,
    /// `--default-tls-secret`: replaces the generated self-signed default.
    pub default_tls_secret: Option<ObjectKey>,
    pub upstream: UpstreamConfig,
    /// How long in-flight requests may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Worker threads serving connections, each with its own
    /// single-threaded runtime and upstream pools (like nginx workers).
    pub workers: usize,
    /// What one client may hold, and for how long.
    pub limits: Limits,
    /// Where access-log lines go (off by default; the binary's default is stderr).
    pub access_log: access_log::Config,
}

/// The default worker count: one per CPU.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            classes: ClassSelection::default(),
            default_tls_secret: None,
            upstream: UpstreamConfig::default(),
            drain_timeout: Duration::from_secs(30),
            workers: default_workers(),
            limits: Limits::default(),
            access_log: access_log::Config::default(),
        }
    }
}

struct Shared {
    config: EngineConfig,
    live: ArcSwap<LiveTable>,
    certs: Arc<CertResolver>,
    fallback_cert: Arc<CertifiedKey>,
    fallback_cert_pem: String,
    metrics: IngressMetrics,
    /// Problems already logged, so a reload logs only new ones.
    logged_problems: Mutex<HashSet<String>>,
    /// The problems of the last applied configuration (for `events`).
    problems: tokio::sync::watch::Sender<Arc<Vec<routes::Problem>>>,
    /// Tables applied so far (readiness: at least one).
    applied: AtomicU64,
    /// Some host has client-certificate authentication: TLS handshakes
    /// pick their config after the ClientHello, requests are checked.
    client_auth_active: AtomicBool,
    /// The TLS config that asks for client certificates (set by `serve`).
    request_cert_config: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    /// The HTTPS listener's port while serving (0: none), where plain
    /// HTTP requests to TLS hosts are redirected.
    https_port: AtomicU16,
    /// The access log's writer, when it is on.
    access_log: Option<Arc<AccessLog>>,
}

/// The ingress engine: cheap to clone, shared by the listeners and the
/// snapshot follower.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// The sockets an engine serves; either may be absent.
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
}

impl Listeners {
    /// Binds the given addresses (port 0 picks a free port), with the
    /// system's largest listen backlog so that connection bursts queue.
    pub async fn bind(http: Option<SocketAddr>, https: Option<SocketAddr>) -> Result<Listeners, IngressError> {
        let bind = |addr: SocketAddr| bind_listener(addr).map_err(|source| IngressError::Bind { addr, source });
        Ok(Listeners {
            http: http.map(bind).transpose()?,
            https: https.map(bind).transpose()?,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::from_std(ferry_cluster::net::tcp_listener(addr)?)
}

impl Engine {
    /// Creates an engine with an empty table (every request gets 404 until
    /// the first `apply`) and a freshly generated default certificate.
    pub fn new(config: EngineConfig, metrics: IngressMetrics) -> Result<Engine, IngressError> {
        let (fallback_cert, fallback_cert_pem) = tls::self_signed(&["ferry.invalid".into(), "localhost".into()])?;
        let access_log = AccessLog::start(
            &config.access_log,
            metrics.access_log_lines.clone(),
            metrics.access_log_dropped.clone(),
        )
        .map_err(IngressError::AccessLog)?;
        Ok(Engine {
            shared: Arc::new(Shared {
                config,
                live: ArcSwap::from_pointee(LiveTable::default()),
                certs: Arc::new(CertResolver::new(CertStore::with_default(fallback_cert.clone()))),
                fallback_cert,
                fallback_cert_pem,
                metrics,
                logged_problems: Mutex::new(HashSet::new()),
                problems: tokio::sync::watch::Sender::new(Arc::new(Vec::new())),
                applied: AtomicU64::new(0),
                client_auth_active: AtomicBool::new(false),
                request_cert_config: std::sync::OnceLock::new(),
                https_port: AtomicU16::new(0),
                access_log,
            }),
        })
    }

    /// Compiles `snap` and swaps the new routes and certificates in.
    /// Problems are logged (each once) naming object and field.
    pub fn apply(&self, snap: &Snapshot) -> Arc<RouteTable> {
        let s = &self.shared;
        let table = Arc::new(routes::compile(snap, &s.config.classes));
        let certs = tls::compile(snap, &table, s.config.default_tls_secret.as_ref(), &s.fallback_cert);
        let all: Vec<routes::Problem> = table.problems.iter().chain(&certs.problems).cloned().collect();
        let annotation_problems = all.iter().filter(|p| crate::events::is_annotation_problem(p)).count();
        let problems: Vec<String> = all.iter().map(|p| p.to_string()).collect();
        if let Ok(mut logged) = s.logged_problems.lock() {
            for p in &problems {
                if !logged.contains(p) {
                    tracing::warn!(problem = %p, "ingress configuration problem");
                }
            }
            *logged = problems.iter().cloned().collect();
        }
        // Client-certificate checks go on before the routes they guard
        // (and off after): no request sees new routes unchecked.
        let client_auth = !certs.client_auth.is_empty();
        if client_auth {
            s.client_auth_active.store(true, Ordering::SeqCst);
        }
        s.certs.swap(certs);
        let live = LiveTable::build(table.clone(), &s.live.load(), s.config.workers.max(1) + 1);
        s.live.store(Arc::new(live));
        if !client_auth {
            s.client_auth_active.store(false, Ordering::SeqCst);
        }
        s.metrics.reloads.inc();
        s.applied.fetch_add(1, Ordering::Relaxed);
        s.metrics
            .config_problems
            .set(i64::try_from(problems.len()).unwrap_or(i64::MAX));
        s.metrics
            .annotation_problems
            .set(i64::try_from(annotation_problems).unwrap_or(i64::MAX));
        // Receivers wake only when the problems changed.
        s.problems.send_if_modified(|current| {
            let changed = **current != all;
            if changed {
                *current = Arc::new(all);
            }
            changed
        });
        tracing::info!(
            generation = snap.generation,
            ingresses = table.served.len(),
            routes = table.route_count(),
            upstreams = table.upstreams.len(),
            problems = problems.len(),
            "ingress routes applied"
        );
        table
    }

    /// The problems of the configuration last applied, updated by every
    /// `apply` (the Event writer follows this).
    pub fn problems(&self) -> crate::events::ProblemsRx {
        self.shared.problems.subscribe()
    }

    /// How many tables have been applied (0 until the first snapshot).
    pub fn applied(&self) -> u64 {
        self.shared.applied.load(Ordering::Relaxed)
    }

    /// The table currently served.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.live.load().routes.clone()
    }

    /// The PEM of the generated default certificate (tests trust it).
    pub fn default_cert_pem(&self) -> &str {
        &self.shared.fallback_cert_pem
    }

    pub fn certs(&self) -> Arc<CertStore> {
        self.shared.certs.current()
    }

    /// Applies every new snapshot until cancelled or the channel closes.
    pub async fn follow(&self, mut snapshots: SnapshotRx, cancel: CancellationToken) {
        loop {
            let snap = snapshots.borrow_and_update().clone();
            if let Some(snap) = snap {
                self.apply(&snap);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = snapshots.changed() => if r.is_err() { return },
            }
        }
    }

    /// Serves until `cancel` fires, then stops accepting and drains
    /// in-flight requests for up to the drain timeout.
    ///
    /// This task accepts; each connection goes round-robin to one of
    /// `workers` threads, each running a single-threaded runtime that
    /// owns the connection, its requests and the upstream connections they
    /// open (see `upstream::set_pool_slot`). Keeping a request's tasks on
    /// one thread avoids the cross-thread wake-ups of a work-stealing
    /// scheduler, which cost more than the proxying itself.
    pub async fn serve(&self, listeners: Listeners, cancel: CancellationToken) -> Result<(), IngressError> {
        let tls = match &listeners.https {
            Some(_) => {
                let _ = self
                    .shared
                    .request_cert_config
                    .set(tls::server_config_requesting_client_cert(self.shared.certs.clone())?);
                Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                    self.shared.certs.clone(),
                )?))
            }
            None => None,
        };
        let http_port = listeners.http_addr().map_or(0, |a| a.port());
        let https_port = listeners.https_addr().map_or(0, |a| a.port());
        self.shared.https_port.store(https_port, Ordering::Relaxed);
        if let Some(a) = listeners.http_addr() {
            tracing::info!(addr = %a, "ingress listening (http)");
        }
        if let Some(a) = listeners.https_addr() {
            tracing::info!(addr = %a, "ingress listening (https)");
        }
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for index in 0..self.shared.config.workers.max(1) {
            match Worker::start(index, self.shared.clone(), stop.clone()) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        let cap = self.shared.config.limits.connection_cap();
        let http_conns = Arc::new(ConnRegistry::new(cap));
        let https_conns = Arc::new(ConnRegistry::new(cap));
        tracing::info!(max_connections_per_listener = cap, limits = ?self.shared.config.limits, "ingress connection limits");
        let mut next = 0usize;
        let mut backoff = ferry_cluster::net::AcceptBackoff::new("ingress");
        let mut trim = MemoryTrim::new(&self.shared.metrics);
        let mut trim_tick = tokio::time::interval(MemoryTrim::PERIOD);
        trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = trim_tick.tick() => {
                    trim.maybe_trim(&self.shared.metrics);
                    continue;
                }
                r = accept(listeners.http.as_ref()) => (r.map(|(s, p)| (s, p, None, http_port)), &http_conns),
                r = accept(listeners.https.as_ref()) => (r.map(|(s, p)| (s, p, tls.clone(), https_port)), &https_conns),
            };
            match accepted {
                (Ok((stream, peer, tls, port)), registry) => {
                    backoff.succeeded();
                    self.shared.metrics.connections_accepted.inc();
                    let (registered, admission) = registry.admit();
                    let metrics = &self.shared.metrics;
                    match admission {
                        Admission::Admitted => {}
                        Admission::Shed => {
                            metrics.connections_shed.inc();
                        }
                        Admission::Refused => {
                            metrics.connections_refused.inc();
                            tracing::debug!(%peer, cap = registry.cap(), "connection refused: listener at its cap, none idle");
                        }
                    }
                    let Some(registered) = registered else { continue };
                    let _ = stream.set_nodelay(true);
                    match stream.into_std() {
                        Ok(stream) => {
                            next = next.wrapping_add(1);
                            if let Some(w) = workers.get(next % workers.len()) {
                                let _ = w.connections.send(Accepted {
                                    stream,
                                    peer,
                                    tls,
                                    port,
                                    registered,
                                });
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "handing over an accepted connection failed"),
                    }
                }
                (Err(e), registry) => {
                    if conn::is_resource_exhaustion(&e) && registry.shed_one() {
                        self.shared.metrics.connections_shed.inc();
                    }
                    backoff.failed(&e).await;
                }
            }
        }
        drop(listeners);
        tracing::info!(open_connections = self.shared.metrics.open_connections.get(),
            timeout = ?self.shared.config.drain_timeout, "ingress draining");
        stop.cancel();
        let mut drained = true;
        for w in workers {
            drained &= w.done.await.unwrap_or(false);
        }
        if drained {
            tracing::info!("ingress drained");
        } else {
            tracing::warn!("ingress drain timed out; closing the remaining connections");
        }
        Ok(())
    }
}

/// A connection accepted by `serve`, on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    port: u16,
    registered: Registered,
}

/// One worker thread: a current-thread runtime serving the connections
/// sent to it.
struct Worker {
    connections: tokio::sync::mpsc::UnboundedSender<Accepted>,
    /// Resolves when the worker has drained (true) or timed out (false).
    done: tokio::sync::oneshot::Receiver<bool>,
}

impl Worker {
    fn start(index: usize, shared: Arc<Shared>, stop: CancellationToken) -> Result<Worker, IngressError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("ferry-ingress-{index}"))
            .spawn(move || {
                upstream::set_pool_slot(index + 1);
                let drain_timeout = shared.config.drain_timeout;
                // This worker's access-log buffer, flushed while it is quiet.
                let log = shared.access_log.as_ref().map(|l| Arc::new(l.buffer()));
                let drained = runtime.block_on(
                    async move {
                        if let Some(log) = &log {
                            let log = log.clone();
                            tokio::spawn(async move {
                                let mut tick = tokio::time::interval(access_log::FLUSH_EVERY);
                                loop {
                                    tick.tick().await;
                                    log.flush();
                                }
                            });
                        }
                        let tracker = TaskTracker::new();
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                c = rx.recv() => match c {
                                    Some(c) => serve_connection(&shared, c, &tracker, &stop, log.as_ref()),
                                    None => break,
                                },
                            }
                        }
                        drop(rx);
                        tracker.close();
                        let drained = tokio::time::timeout(drain_timeout, tracker.wait()).await.is_ok();
                        if let Some(log) = &log {
                            log.flush();
                        }
                        drained
                    }
                    .instrument(span),
                );
                // Dropping the runtime ends what is left (upgraded tunnels).
                drop(runtime);
                let _ = done_tx.send(drained);
            })?;
        Ok(Worker {
            connections: tx,
            done: done_rx,
        })
    }
}

/// Serves one connection on the current (worker) runtime.
fn serve_connection(
    shared: &Arc<Shared>,
    accepted: Accepted,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    log: Option<&Arc<access_log::Buffer>>,
) {
    let Accepted {
        stream,
        peer,
        tls,
        port,
        registered,
    } = accepted;
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "registering a connection failed");
            return;
        }
    };
    let log = log.cloned();
    let shared = shared.clone();
    let stop = stop.clone();
    let span = tracing::debug_span!("conn", %peer, tls = tls.is_some());
    tracker.spawn(
        async move {
            shared.metrics.open_connections.inc();
            let _open = OpenConnection(shared.metrics.clone());
            let accepted_at = tokio::time::Instant::now();
            let state = registered.state.clone();
            let limits = shared.config.limits.clone();
            let metrics = shared.metrics.clone();
            // Only when some host checks client certificates: what choosing
            // the TLS config after the ClientHello needs.
            let client_auth = (tls.is_some() && shared.client_auth_active.load(Ordering::SeqCst))
                .then(|| shared.request_cert_config.get().cloned().map(|c| (c, shared.certs.clone())))
                .flatten();
            let ctx = Arc::new(ConnContext::new(shared, peer, tls.is_some(), port, state.clone(), log));
            let tls_ctx = client_auth.as_ref().map(|_| ctx.clone());
            match tls {
                None => {
                    let io = conn::Guarded::new(stream, state.clone());
                    serve_http(io, ctx, &state, &limits, accepted_at, &stop, &metrics).await;
                }
                Some(acceptor) => {
                    let accept = async {
                        match client_auth {
                            // Some host asks for client certificates: the
                            // config is chosen by the ClientHello's SNI.
                            Some((requesting, certs)) => {
                                let acceptor_default = acceptor.config().clone();
                                let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
                                let wants = certs.current().client_auth.wants_cert(start.client_hello().server_name());
                                start.into_stream(if wants { requesting } else { acceptor_default }).await
                            }
                            None => acceptor.accept(stream).await,
                        }
                    };
                    let handshake = tokio::time::timeout(
                        limits.tls_handshake_timeout.min(limits.header_timeout),
                        accept,
                    );
                    let tls_stream = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => Some(s),
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                metrics.connections_closed.get_or_create(&CloseLabels { reason: "tls_handshake_timeout" }).inc();
                                tracing::debug!("TLS handshake timed out");
                                None
                            }
                        },
                        _ = stop.cancelled() => None,
                        _ = Watchdog::woken(&state) => None,
                    };
                    let Some(tls_stream) = tls_stream else { return };
                    let (tcp, session) = tls_stream.into_inner();
                    if let Some(ctx) = tls_ctx {
                        let chain = session.peer_certificates();
                        let _ = ctx.peer_cert.set(crate::policy::client_cert::PeerCert::new(chain));
                    }
                    let io = conn::Guarded::new(crate::tls_conn::TlsConn::new(tcp, session), state.clone());
                    serve_http(io, ctx, &state, &limits, accepted_at, &stop, &metrics).await;
                }
            }
            drop(registered);
        }
        .instrument(span),
    );
}

/// Serves HTTP on an accepted (and, for HTTPS, handshaken) transport:
/// the lean HTTP/1.1 path first (`h1_conn`), then hyper from the first
/// request the lean path leaves to it (HTTP/2 among them). A TLS
/// connection that negotiated h2 goes to hyper at once.
async fn serve_http<S>(
    io: conn::Guarded<S>,
    ctx: Arc<ConnContext>,
    state: &ConnState,
    limits: &Limits,
    accepted_at: tokio::time::Instant,
    stop: &CancellationToken,
    metrics: &IngressMetrics,
) where
    S: conn::RawSend + Send + 'static,
{
    let (io, prefix) = if io.negotiated_h2() {
        (io, Bytes::new())
    } else {
        let lean = h1_conn::serve(ctx.clone(), io);
        match drive(lean, state, limits, accepted_at, stop, metrics).await {
            Some(h1_conn::LeanEnd::Defer(io, prefix)) => (io, prefix),
            _ => return,
        }
    };
    metrics.hyper_connections.inc();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move {
            let mut req = req.map(RequestBody::Hyper);
            Ok::<_, Infallible>(respond(&ctx, &mut req).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The watchdog owns the head deadlines: hyper's own would cost a
    // timer allocation per request.
    builder.http1().header_read_timeout(None).max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_local_error_reset_streams(limits.max_cancelled_streams);
    let io = TokioIo::new(crate::h1_server::Rewind::new(prefix, io));
    let conn = HyperConn(Box::pin(builder.serve_connection_with_upgrades(io, service)));
    if let Some(Err(e)) = drive(conn, state, limits, accepted_at, stop, metrics).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Answers one request of a connection, counted in flight on it until
/// the response body is done (either server path). The request is
/// borrowed, not moved, down to the upstream client: each move of it
/// through a layer of futures was a copy of its 264 bytes.
async fn respond(ctx: &ConnContext, req: &mut Request<RequestBody>) -> Response<ResponseBody> {
    let active = ctx.conn.request_started();
    let (mut parts, inner) = handle(ctx, req).await.into_parts();
    let body = ResponseBody::new(inner, active, &mut parts.extensions);
    Response::from_parts(parts, body)
}

/// A connection `drive` supervises.
trait Served: std::future::Future {
    /// Asks the connection to finish what it is doing and close. Returns
    /// true when an idle connection may simply be closed now.
    fn shutdown(self: Pin<&mut Self>) -> bool;
}

/// A hyper connection (boxed: the type borrows its builder and is large).
struct HyperConn<C>(Pin<Box<C>>);

impl<C: GracefulConnection> std::future::Future for HyperConn<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl<C: GracefulConnection> Served for HyperConn<C> {
    fn shutdown(mut self: Pin<&mut Self>) -> bool {
        self.0.as_mut().graceful_shutdown();
        false
    }
}

/// Runs a connection under its watchdog until it ends (its output) or is
/// closed (`None`), counting why ferry closed it, if it did.
async fn drive<C: Served>(
    conn: C,
    state: &ConnState,
    limits: &Limits,
    accepted_at: tokio::time::Instant,
    stop: &CancellationToken,
    metrics: &IngressMetrics,
) -> Option<C::Output> {
    // Counted before the connection is dropped (and the client sees it).
    let count = |reason: Option<CloseReason>| {
        if let Some(r) = reason {
            metrics
                .connections_closed
                .get_or_create(&CloseLabels { reason: r.as_str() })
                .inc();
        }
        None
    };
    let mut conn = std::pin::pin!(conn);
    let mut watchdog = Watchdog::new(limits);
    let sleep = tokio::time::sleep_until(watchdog.first_deadline(accepted_at));
    let mut sleep = std::pin::pin!(sleep);
    // Set once the connection was asked to close: (why, hard deadline).
    let mut closing: Option<CloseReason> = None;
    let mut draining = false;
    // Bounded: every turn either ends the loop or waits on the connection,
    // the timer, a notification, or the stop token (each handled once).
    loop {
        let verdict = tokio::select! {
            r = conn.as_mut() => {
                count(closing);
                return Some(r);
            }
            _ = sleep.as_mut() => {
                if closing.is_some() {
                    // The grace is over (or the drain met a busy
                    // connection going idle): close now.
                    if state.is_idle_now() || closing != Some(CloseReason::Drain) {
                        return count(closing);
                    }
                    sleep.as_mut().reset(tokio::time::Instant::now() + conn::CLOSE_GRACE);
                    continue;
                }
                watchdog.check(state, tokio::time::Instant::now())
            }
            _ = Watchdog::woken(state) => watchdog.check(state, tokio::time::Instant::now()),
            _ = stop.cancelled(), if !draining => {
                draining = true;
                Verdict::CloseIdle(CloseReason::Drain)
            }
        };
        match verdict {
            Verdict::Sleep(at) => sleep.as_mut().reset(at),
            Verdict::CloseNow(reason) => {
                tracing::debug!(reason = reason.as_str(), "closing connection");
                return count(Some(reason));
            }
            Verdict::CloseIdle(reason) => {
                if closing.is_none() {
                    tracing::debug!(reason = reason.as_str(), "closing connection gracefully");
                    if conn.as_mut().shutdown() && state.is_idle_now() {
                        return count(Some(reason));
                    }
                }
                closing = Some(reason);
                sleep.as_mut().reset(tokio::time::Instant::now() + conn::CLOSE_GRACE);
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Returns heap pages to the kernel after connection bursts: when at
/// least `BURST` connections closed since the last trim and the number
/// open is no longer rising, `malloc_trim` runs on a blocking thread.
struct MemoryTrim {
    last_closed: u64,
    last_open: i64,
}

impl MemoryTrim {
    const PERIOD: Duration = Duration::from_secs(5);
    const BURST: u64 = 1000;

    fn new(metrics: &IngressMetrics) -> MemoryTrim {
        MemoryTrim {
            last_closed: Self::closed(metrics),
            last_open: metrics.open_connections.get(),
        }
    }

    fn closed(metrics: &IngressMetrics) -> u64 {
        let open = u64::try_from(metrics.open_connections.get()).unwrap_or(0);
        metrics.connections_accepted.get().saturating_sub(open)
    }

    fn maybe_trim(&mut self, metrics: &IngressMetrics) {
        let open = metrics.open_connections.get();
        let closed = Self::closed(metrics);
        if closed.saturating_sub(self.last_closed) >= Self::BURST && open <= self.last_open {
            self.last_closed = closed;
            metrics.memory_trims.inc();
            tokio::task::spawn_blocking(conn::release_free_memory);
        }
        self.last_open = open;
    }
}

/// The largest HTTP/1 request head read (request line plus headers);
/// a longer one is answered 431 and the connection closed. hyper's own
/// default is about 400 KiB; ingress-nginx allows 4 × 8 KiB and Envoy
/// 60 KiB.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

struct OpenConnection(IngressMetrics);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

struct ConnContext {
    shared: Arc<Shared>,
    peer: SocketAddr,
    https: bool,
    /// The client's IP as a header value, for `X-Forwarded-For`.
    client_ip: HeaderValue,
    /// The listener's port, for `X-Forwarded-Port`.
    port: HeaderValue,
    /// What the connection's watchdog reads.
    conn: Arc<ConnState>,
    /// The worker's access-log buffer, when the access log is on.
    log: Option<Arc<access_log::Buffer>>,
    /// The client's certificate chain, kept when some host checks them.
    peer_cert: std::sync::OnceLock<crate::policy::client_cert::PeerCert>,
}

impl ConnContext {
    /// Formats the per-connection header values once, not per request.
    fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        https: bool,
        port: u16,
        conn: Arc<ConnState>,
        log: Option<Arc<access_log::Buffer>>,
    ) -> ConnContext {
        let client_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static(""));
        ConnContext {
            shared,
            peer,
            https,
            client_ip,
            port: HeaderValue::from(port),
            conn,
            log,
            peer_cert: std::sync::OnceLock::new(),
        }
    }
}

/// What the client receives: the response body, with the request counted
/// in flight on its connection until the body is done (the watchdog's
/// view of idleness and of send progress).
pub struct ResponseBody<B = ProxyBody> {
    inner: B,
    active: ActiveRequest,
    _held: Option<access::Held>,
}

impl<B> ResponseBody<B> {
    /// The body of a response `handle` gave (owned, or borrowed where the
    /// response is written in place), for the request `active` counts; a
    /// `limit-connections` slot (in `extensions`) lives as long as the
    /// body.
    fn new(inner: B, active: ActiveRequest, extensions: &mut http::Extensions) -> ResponseBody<B> {
        ResponseBody {
            inner,
            active,
            _held: extensions.remove::<access::Held>(),
        }
    }
}

impl<B: Body<Data = Bytes, Error = BodyError> + Unpin> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        this.active.frame_wanted();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                let more = !this.inner.is_end_stream();
                this.active.frame_sent(more);
                if !more {
                    this.active.finish();
                }
            }
            Poll::Ready(_) => this.active.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts a request whose future is dropped before it answered (client
/// reset the stream or went away): `status="499"` as in nginx, and one
/// more against the connection's cancelled-stream budget.
struct CancelGuard<'a> {
    ctx: &'a ConnContext,
    host: &'a str,
    upstream: Option<&'a LiveUpstream>,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            self.ctx.conn.completed();
            return;
        }
        count_request(&self.ctx.shared.metrics, self.host, STATUS_CLIENT_CLOSED, self.upstream);
        if self
            .ctx
            .conn
            .cancelled(self.ctx.shared.config.limits.max_cancelled_streams)
        {
            tracing::warn!(client = %self.ctx.peer.ip(), budget = self.ctx.shared.config.limits.max_cancelled_streams,
                "client cancelled too many streams; closing with GOAWAY ENHANCE_YOUR_CALM");
        }
    }
}

/// The status label of requests the client cancelled (nginx's 499).
pub const STATUS_CLIENT_CLOSED: u16 = 499;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The client's address alone, as both nginx controllers send it.
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// The downstream response body: an upstream body (keeping its endpoint
/// counted as in flight until it is done) or a short local one.
pub enum ProxyBody {
    Upstream {
        body: Incoming,
        _in_flight: InFlight,
    },
    /// Read straight from a lean-path upstream connection (`h1`).
    Raw(RawBody),
    Local(Option<Bytes>),
    /// An upstream body under `proxy-read-timeout` between frames.
    Timed(Box<ReadTimeout<ProxyBody>>),
}

impl ProxyBody {
    /// `self` with `timeout` between two frames, when one is set.
    fn read_timeout(self, timeout: Option<Duration>) -> ProxyBody {
        match (timeout, self) {
            (None, b) => b,
            (Some(_), b @ ProxyBody::Local(_)) => b,
            (Some(t), b) => ProxyBody::Timed(Box::new(ReadTimeout::new(b, t))),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::from))),
            ProxyBody::Raw(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Timed(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Raw(body) => body.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
            ProxyBody::Timed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Raw(body) => body.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Timed(body) => body.size_hint(),
        }
    }
}

/// A short local answer that reveals nothing about the backends.
fn local(status: StatusCode) -> Response<ProxyBody> {
    crate::answer::status(status).map(ProxyBody::Local)
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether any hop-by-hop header is present (one pass over the names;
/// most messages have none).
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    // By name: comparing each with `HOP_BY_HOP`'s seven costs a byte
    // comparison per custom name.
    headers.keys().any(|n| {
        matches!(
            n.as_str(),
            "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "transfer-encoding" | "upgrade"
        )
    })
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Instead of a hashed removal per hop-by-hop name.
    if !has_hop_by_hop(headers) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(&name);
        }
    }
    let upgrade = if keep_upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Rewrites the request for the upstream: target form, Host, version,
/// hop-by-hop headers, `X-Forwarded-*`. `authority` is the client's Host
/// (or `:authority`) as a header value.
fn prepare_upstream_request<B>(
    req: &mut Request<B>,
    ctx: &Forwarded<'_>,
    authority: Option<&HeaderValue>,
    upgrade: bool,
    h2c: bool,
) {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            let ip = ctx.client_ip.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prev}, {ip}")).unwrap_or_else(|_| ctx.client_ip.clone())
        }
        _ => ctx.client_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_REAL_IP.clone(), ctx.client_ip.clone());
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if ctx.https { "https" } else { "http" }),
    );
    if let Some(v) = authority {
        headers.insert(X_FORWARDED_HOST.clone(), v.clone());
        if !h2c {
            // HTTP/2 clients send `:authority` only; HTTP/1.1 needs Host.
            headers.insert(header::HOST, v.clone());
        }
    }
    headers.insert(X_FORWARDED_PORT.clone(), ctx.port.clone());
    if h2c {
        headers.remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let authority = authority.and_then(|v| v.to_str().ok()).unwrap_or_default();
        let uri = format!("http://{authority}{path_and_query}");
        if let Ok(u) = uri.parse::<Uri>() {
            *req.uri_mut() = u;
        }
    } else {
        *req.version_mut() = Version::HTTP_11;
        // Origin form; a request already in it (every HTTP/1.1 one but
        // absolute-form) is left as is.
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            if let Ok(u) = Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        }
    }
}

/// `prepare_upstream_request` (HTTP/1.1 upstream, no upgrade) and
/// `h1::encode_request` in one pass, without changing the header map: the
/// client's headers minus those ferry sets, then ferry's. `None` when the
/// request has hop-by-hop headers, which the general path strips.
fn encode_forwarded<B>(req: &Request<B>, ctx: &Forwarded<'_>, authority: Option<&HeaderValue>) -> Option<Bytes> {
    let headers = req.headers();
    if has_hop_by_hop(headers) {
        return None;
    }
    let earlier_xff = headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let replaced = |n: &HeaderName| {
        *n == X_FORWARDED_FOR
            || *n == X_REAL_IP
            || *n == X_FORWARDED_PROTO
            || *n == X_FORWARDED_PORT
            || (authority.is_some() && (*n == header::HOST || *n == X_FORWARDED_HOST))
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = lean::HeadWriter::new(req.method(), target, headers, 200);
    for (name, value) in headers {
        if !replaced(name) {
            head.header(name.as_str().as_bytes(), &[value.as_bytes()]);
        }
    }
    let ip = ctx.client_ip.as_bytes();
    match earlier_xff {
        Some(prev) => head.header(X_FORWARDED_FOR.as_str().as_bytes(), &[prev.as_bytes(), b", ", ip]),
        None => head.header(X_FORWARDED_FOR.as_str().as_bytes(), &[ip]),
    }
    head.header(X_REAL_IP.as_str().as_bytes(), &[ip]);
    let proto: &[u8] = if ctx.https { b"https" } else { b"http" };
    head.header(X_FORWARDED_PROTO.as_str().as_bytes(), &[proto]);
    if let Some(a) = authority {
        head.header(X_FORWARDED_HOST.as_str().as_bytes(), &[a.as_bytes()]);
        head.header(b"host", &[a.as_bytes()]);
    }
    head.header(X_FORWARDED_PORT.as_str().as_bytes(), &[ctx.port.as_bytes()]);
    Some(head.finish())
}

/// What the `X-Forwarded-*` headers say of a connection.
struct Forwarded<'a> {
    /// The client's IP as a header value.
    client_ip: &'a HeaderValue,
    https: bool,
    /// The listener's port as a header value.
    port: &'a HeaderValue,
}

impl ConnContext {
    fn forwarded(&self) -> Forwarded<'_> {
        Forwarded {
            client_ip: &self.client_ip,
            https: self.https,
            port: &self.port,
        }
    }
}

struct Outcome {
    response: Response<ProxyBody>,
    endpoint: Option<SocketAddr>,
}

async fn handle(ctx: &ConnContext, req: &mut Request<RequestBody>) -> Response<ProxyBody> {
    let log_access = ctx.log.is_some();
    let started = log_access.then(Instant::now);
    let live = ctx.shared.live.load_full();
    let h2 = req.version() == Version::HTTP_2;
    if h2 && !ctx.conn.h2.load(Ordering::Relaxed) {
        ctx.conn.h2.store(true, Ordering::Relaxed);
    }
    // The client's authority: `:authority` (HTTP/2, absolute form), else
    // Host (one lookup for both it and a second Host).
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    let two_hosts = hosts.next().is_some();
    let authority: Option<HeaderValue> = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => host.cloned(),
    };
    let authority_str = authority.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
    let method = log_access.then(|| req.method().clone());
    // The URI as received (a clone shares its bytes).
    let logged_uri = log_access.then(|| req.uri().clone());
    let mut cancel = CancelGuard {
        ctx,
        host: "",
        upstream: None,
        armed: true,
    };

    // Refused before routing: CONNECT (ferry is no forward proxy); two
    // Host headers (RFC 9112 §3.2); an HTTP/1.1 request without a Host
    // (or with an empty one), as from nginx, not the default backend; a
    // path that climbs above `/` or has a broken escape.
    let refused = if req.method() == Method::CONNECT {
        Some(StatusCode::METHOD_NOT_ALLOWED)
    } else if two_hosts || (authority_str.is_empty() && req.version() == Version::HTTP_11) {
        Some(StatusCode::BAD_REQUEST)
    } else {
        None
    };
    // Routing uses the normalized path, which is also forwarded unless
    // configured otherwise (a raw `/public/../admin` must not reach `/`'s
    // backend while the upstream sees `/admin`).
    let (refused, normalized) = match (refused, normalize_path(req.uri().path())) {
        (Some(r), _) => (Some(r), None),
        (None, Err(_)) => (Some(StatusCode::BAD_REQUEST), None),
        (None, Ok(std::borrow::Cow::Borrowed(_))) => (None, None),
        (None, Ok(std::borrow::Cow::Owned(p))) => (None, Some(p)),
    };
    if let Some(p) = &normalized {
        if ctx.shared.config.limits.forward_normalized_path {
            set_path(req, p);
        }
    }
    // `from-to-www-redirect` names have no routes of their own.
    let www = match refused {
        Some(_) => None,
        None => live
            .routes
            .www_redirect(authority_str)
            .map(|to| www_redirect(ctx, to, authority_str, req.uri())),
    };
    let matched = match (refused, &www) {
        (None, None) => live
            .routes
            .route(authority_str, normalized.as_deref().unwrap_or(req.uri().path())),
        _ => None,
    };
    // `Strict-Transport-Security`, for a routed request's answer.
    let mut hsts = None;
    let (mut outcome, host_label, upstream) = match matched {
        None => (
            Outcome {
                response: www.unwrap_or_else(|| local(refused.unwrap_or(StatusCode::NOT_FOUND))),
                endpoint: None,
            },
            "",
            None,
        ),
        Some(m) => {
            // Canary choice and the key of a hashed or sticky pick; plain
            // routes have no `balance`.
            let (m, key) = match m.balance {
                None => (m, PickKey::None),
                Some(b) => {
                    let host = normalize_host(authority_str);
                    let view = RequestView {
                        uri: req.uri(),
                        method: req.method(),
                        headers: req.headers(),
                        host: &host,
                        client: ctx.peer.ip(),
                        https: ctx.https,
                    };
                    let (upstream, key) = balance::prepare(b, m.upstream, &live, &view);
                    (RouteMatch { upstream, ..m }, key)
                }
            };
            cancel.host = m.host;
            cancel.upstream = live.upstreams.get(m.upstream).map(|u| &**u);
            if h2 {
                // Give a stream reset right after its HEADERS the chance to
                // cancel this request before it takes an upstream
                // connection (hyper checks for RST_STREAM while the
                // service is pending).
                tokio::task::yield_now().await;
            }
            // Client certificates first (nginx refuses them before any
            // location runs), then nginx's rewrite phase: the annotations'
            // redirects, the one to HTTPS, then URI rewrites.
            let client_cert = if m.policy.client_cert.is_some()
                || (ctx.https && ctx.shared.client_auth_active.load(Ordering::Relaxed))
            {
                client_cert_gate(ctx, &m, req)
            } else {
                None
            };
            let answer = match client_cert {
                Some(r) => Some(r),
                None => match path_redirect(ctx, &m, req, authority_str, normalized.as_deref()) {
                    Some(r) => Some(r),
                    None if m.https_only && !ctx.https => https_redirect(&ctx.shared, authority_str, req.uri()),
                    None => rewrite_uri(&m, req, normalized.as_deref()),
                },
            };
            hsts = m.policy.paths.hsts.is_some().then(|| {
                let proto = req.headers().get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes);
                m.policy.paths.hsts(ctx.https, proto).cloned()
            });
            match answer {
                Some(response) => (
                    Outcome {
                        response,
                        endpoint: None,
                    },
                    m.host,
                    None,
                ),
                None => proxy_to(ctx, &live, m, req, authority.as_ref(), key).await,
            }
        }
    };
    if let Some(Some(v)) = hsts {
        outcome
            .response
            .headers_mut()
            .insert(header::STRICT_TRANSPORT_SECURITY, v);
    }
    cancel.armed = false;
    let status = outcome.response.status().as_u16();
    count_request(&ctx.shared.metrics, host_label, status, upstream.map(|u| &**u));
    if let Some(log) = &ctx.log {
        log.write(&access_log::Record {
            client: ctx.peer.ip(),
            method: method.as_ref().map_or("", Method::as_str),
            host: &normalize_host(authority_str),
            path: logged_uri.as_ref().map_or("", Uri::path),
            status,
            upstream: upstream.map_or("", |u| u.spec.name.as_str()),
            endpoint: outcome.endpoint,
            duration: started.map_or(Duration::ZERO, |t| t.elapsed()),
        });
    }
    outcome.response
}

/// A redirect response (`local`'s body, `Location`).
fn redirect(code: u16, location: HeaderValue) -> Response<ProxyBody> {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::FOUND);
    crate::answer::redirect(code, location).map(ProxyBody::Local)
}

/// The redirects of a routed request's path annotations (`policy::paths`):
/// `permanent-redirect`, `temporal-redirect`, `app-root`,
/// `nginx.org/redirect-to-https`. One branch for routes without them.
fn path_redirect<B>(
    ctx: &ConnContext,
    m: &RouteMatch<'_>,
    req: &Request<B>,
    authority: &str,
    normalized: Option<&str>,
) -> Option<Response<ProxyBody>> {
    let paths = &m.policy.paths;
    if !paths.answers() {
        return None;
    }
    let path = normalized.unwrap_or(req.uri().path());
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let proto = req.headers().get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes);
    let r = paths.answer(ctx.https, authority, path, target, proto)?;
    Some(redirect(r.code, r.location))
}

/// `rewrite-target` / `nginx.org/rewrites` and `x-forwarded-prefix`: the
/// URI forwarded upstream. A rewrite to an absolute URL is answered with
/// a 302 to it, as nginx's `rewrite` does.
fn rewrite_uri<B>(m: &RouteMatch<'_>, req: &mut Request<B>, normalized: Option<&str>) -> Option<Response<ProxyBody>> {
    if let Some(rewrite) = m.rewrite {
        let regex = match m.path {
            routes::PathMatch::Regex(r) => Some(&r.regex),
            _ => None,
        };
        let path = normalized.unwrap_or(req.uri().path());
        match rewrite.apply(regex, path, req.uri().query()) {
            Rewritten::Uri(target) => set_target(req, &target),
            Rewritten::Redirect(url) => return HeaderValue::from_str(&url).ok().map(|l| redirect(302, l)),
        }
    }
    if let Some(prefix) = &m.policy.paths.x_forwarded_prefix {
        req.headers_mut().insert(X_FORWARDED_PREFIX.clone(), prefix.clone());
    }
    None
}

/// `from-to-www-redirect`: the 308 to the other name of the host, same
/// scheme, port, path and query.
fn www_redirect(ctx: &ConnContext, to: &str, authority: &str, uri: &Uri) -> Response<ProxyBody> {
    let scheme = if ctx.https { "https" } else { "http" };
    let port = match authority.rsplit_once(':') {
        Some((_, p)) if !authority.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => "",
    };
    let colon = if port.is_empty() { "" } else { ":" };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    match HeaderValue::from_str(&format!("{scheme}://{to}{colon}{port}{target}")) {
        Ok(location) => redirect(308, location),
        Err(_) => local(StatusCode::BAD_REQUEST),
    }
}

/// Replaces the path and query of `req`'s target (a rewrite's result).
fn set_target<B>(req: &mut Request<B>, target: &str) {
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(target.as_bytes())) {
        parts.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

/// Client-certificate authentication (`policy::client_cert`): the route's
/// own setting, and over TLS its host's.
fn client_cert_gate<B>(ctx: &ConnContext, m: &RouteMatch<'_>, req: &mut Request<B>) -> Option<Response<ProxyBody>> {
    let certs = ctx.https.then(|| ctx.shared.certs.current());
    crate::policy::client_cert::gate(
        m.policy.client_cert.as_ref(),
        certs.as_ref().map(|c| &*c.client_auth),
        m.host,
        ctx.peer_cert.get(),
        req.headers_mut(),
    )
}

/// Replaces the path of `req`'s target, keeping its query.
fn set_path<B>(req: &mut Request<B>, path: &str) {
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    match http::uri::PathAndQuery::from_maybe_shared(Bytes::from(target)) {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return,
    }
    if let Ok(u) = Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

/// The client's share of a failed upstream exchange: its request body
/// stalled (408) or was malformed (400). These are the client's faults,
/// never counted against the upstream.
fn client_body_fault(e: &hyper::Error) -> Option<StatusCode> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(fault) = err.downcast_ref::<conn::ClientBodyError>() {
            return Some(match fault {
                conn::ClientBodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
                conn::ClientBodyError::Invalid(_) => StatusCode::BAD_REQUEST,
            });
        }
        source = err.source();
    }
    None
}

/// Whether sending the request failed because its body passed the
/// route's limit (`Limited` ended it with a `LengthLimitError`).
fn body_too_large(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Forwards a routed request to its upstream (503 when it has none),
/// once the route's access policy lets it through.
async fn proxy_to<'a>(
    ctx: &ConnContext,
    live: &'a LiveTable,
    m: RouteMatch<'a>,
    req: &mut Request<RequestBody>,
    authority: Option<&HeaderValue>,
    key: PickKey,
) -> (Outcome, &'a str, Option<&'a Arc<LiveUpstream>>) {
    let mut after = None;
    if m.policy.access.is_active() {
        let conn = access::Conn {
            peer: ctx.peer.ip(),
            https: ctx.https,
            host: authority.and_then(|a| a.to_str().ok()).unwrap_or_default(),
        };
        // Boxed: the plain path's future stays as small as it was.
        match Box::pin(m.policy.access.check(&conn, req)).await {
            access::Decision::Continue(a) => after = Some(Box::new(a)),
            access::Decision::Respond(r) => {
                let outcome = Outcome {
                    response: r.map(ProxyBody::Local),
                    endpoint: None,
                };
                return (outcome, m.host, None);
            }
        }
    }
    let Some(route_upstream) = live.upstreams.get(m.upstream) else {
        let outcome = Outcome {
            response: local(StatusCode::SERVICE_UNAVAILABLE),
            endpoint: None,
        };
        return (outcome, m.host, None);
    };
    // Routes without upstream annotations forward directly; the others
    // (default backend, custom error pages) take a boxed detour, so the
    // common request's future stays small and shallow.
    let mut upstream = route_upstream;
    let mut outcome = if m.policy.upstream.plain {
        forward(ctx, route_upstream, req, authority, m.max_body, &m.policy.upstream, key).await
    } else {
        let (outcome, tuned) = Box::pin(forward_tuned(ctx, live, &m, route_upstream, req, authority, key)).await;
        upstream = tuned;
        outcome
    };
    if let Some(b) = m.balance {
        let headers = outcome.response.headers_mut();
        balance::finish(b, upstream, key, outcome.endpoint, ctx.https, headers);
    }
    if let Some(a) = after {
        a.apply(&mut outcome.response);
    }
    (outcome, m.host, Some(upstream))
}

/// `forward` for a route with upstream annotations: `default-backend`
/// answers when the route's Service has no endpoints, and
/// `custom-http-errors` replace listed statuses with its pages. Returns
/// the upstream that answered.
async fn forward_tuned<'a>(
    ctx: &ConnContext,
    live: &'a LiveTable,
    m: &RouteMatch<'_>,
    upstream: &'a Arc<LiveUpstream>,
    req: &mut Request<RequestBody>,
    authority: Option<&HeaderValue>,
    key: PickKey,
) -> (Outcome, &'a Arc<LiveUpstream>) {
    let up = &m.policy.upstream;
    let default_backend = up.default_backend_upstream.and_then(|i| live.upstreams.get(i));
    let upstream = match default_backend {
        Some(d) if upstream.endpoints.is_empty() => d,
        _ => upstream,
    };
    let errors = up
        .errors
        .as_ref()
        .and(default_backend)
        .map(|d| (d, ErrorRequest::capture(req, authority)));
    let mut outcome = forward(ctx, upstream, req, authority, m.max_body, up, key).await;
    if let (Some((backend, capture)), Some(pages)) = (errors, &up.errors) {
        let status = outcome.response.status();
        if pages.codes.contains(&status.as_u16()) {
            // `custom-http-errors`: the default backend's answer replaces
            // the response (ingress-nginx passes it on unchanged; error
            // backends answer with `X-Code`).
            let mut req = capture.request(status, m.ingress, &upstream.spec.name);
            let plain = UpstreamPolicy::default();
            let page = forward_lean(ctx, backend, &mut req, authority, &plain, PickKey::None).await;
            if page.endpoint.is_some() {
                outcome = page;
            }
        }
    }
    (outcome, upstream)
}

/// The 308 to HTTPS for a plain HTTP request to a TLS host: same host
/// (normalized: lowercase, without the HTTP port), the HTTPS listener's port unless 443, same
/// path and query. `None` when there is no HTTPS listener, and for ACME
/// HTTP-01 challenges, which must stay reachable over HTTP (as in
/// ingress-nginx).
fn https_redirect(shared: &Shared, authority: &str, uri: &Uri) -> Option<Response<ProxyBody>> {
    let port = shared.https_port.load(Ordering::Relaxed);
    if port == 0 || uri.path().starts_with("/.well-known/acme-challenge/") {
        return None;
    }
    // Only DNS names reach here (they matched a TLS rule host).
    let host = normalize_host(authority);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let location = HeaderValue::from_str(&location).ok()?;
    Some(redirect(308, location))
}

/// `requests{host, status, upstream}` += 1, through the upstream's cached
/// handle for the common case (a 200 on its usual host).
fn count_request(metrics: &IngressMetrics, host: &str, status: u16, upstream: Option<&LiveUpstream>) {
    let lookup = |upstream_name: &str| {
        metrics
            .requests
            .get_or_create(&RequestLabels {
                host: host.to_string(),
                status,
                upstream: upstream_name.to_string(),
            })
            .inc();
    };
    match upstream {
        Some(u) if status == 200 => {
            let (cached_host, counter) = u.metrics.ok_requests.get_or_init(|| {
                let labels = RequestLabels {
                    host: host.to_string(),
                    status,
                    upstream: u.spec.name.clone(),
                };
                (labels.host.clone(), metrics.requests.get_or_create(&labels).clone())
            });
            if cached_host == host {
                counter.inc();
            } else {
                lookup(&u.spec.name);
            }
        }
        Some(u) => lookup(&u.spec.name),
        None => lookup(""),
    }
}

/// Endpoints one request has tried: inline for the usual few attempts,
/// so a request costs no allocation for it.
#[derive(Default)]
struct Tried {
    inline: [usize; 8],
    len: usize,
    /// All entries once more than `inline` holds.
    spill: Option<Vec<usize>>,
    /// Connection attempts so far (a retried pooled connection pops its
    /// endpoint but still counts), which bounds the retry loops.
    attempts: usize,
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        match &self.spill {
            Some(v) => v,
            None => &self.inline[..self.len],
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, i: usize) {
        match &mut self.spill {
            Some(v) => v.push(i),
            None if self.len < self.inline.len() => {
                self.inline[self.len] = i;
                self.len += 1;
            }
            None => {
                let mut v = self.inline.to_vec();
                v.push(i);
                self.spill = Some(v);
            }
        }
    }

    fn pop(&mut self) {
        match &mut self.spill {
            Some(v) => {
                v.pop();
            }
            None => self.len = self.len.saturating_sub(1),
        }
    }
}

/// The parts needed to send a body-less request again.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<UpstreamBody> {
        let mut r = Request::new(Either::Right(Empty::new()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Forwards a request to `upstream`: a body-less idempotent request to a
/// plain HTTP/1.1 upstream through the lean client, anything else through
/// hyper's. The hyper path is boxed, so its much larger state is not part
/// of every request's future (moved, whole, at each level, per request).
async fn forward(
    ctx: &ConnContext,
    upstream: &LiveUpstream,
    req: &mut Request<RequestBody>,
    authority: Option<&HeaderValue>,
    max_body: Option<u64>,
    up: &UpstreamPolicy,
    key: PickKey,
) -> Outcome {
    let lean = !upstream.spec.h2c
        && upstream.spec.tls.is_none()
        && idempotent(req.method())
        && req.body().is_end_stream()
        && !up.retry.retries_statuses()
        && !is_upgrade_request(req);
    if lean {
        forward_lean(ctx, upstream, req, authority, up, key).await
    } else {
        // hyper's client takes the request (and its body) whole.
        let req = std::mem::replace(req, Request::new(RequestBody::Empty));
        Box::pin(forward_hyper(ctx, upstream, req, authority, max_body, up, key)).await
    }
}

/// `forward` through hyper's client: bodies, HTTP/2, TLS upstreams,
/// upgrades, status retries.
async fn forward_hyper(
    ctx: &ConnContext,
    upstream: &LiveUpstream,
    mut req: Request<RequestBody>,
    authority: Option<&HeaderValue>,
    max_body: Option<u64>,
    up: &UpstreamPolicy,
    key: PickKey,
) -> Outcome {
    let s = &ctx.shared;
    let config = &*up.config(&s.config.upstream, upstream.endpoints.len());
    if upstream.endpoints.is_empty() {
        return Outcome {
            response: local(StatusCode::SERVICE_UNAVAILABLE),
            endpoint: None,
        };
    }
    // A declared length over the limit is refused before any upstream is
    // involved; a body without one is cut off where it passes the limit.
    // hyper sets an exact size hint from Content-Length (HTTP/1 and h2).
    let declared = req.body().size_hint().exact();
    if let (Some(limit), Some(len)) = (max_body, declared) {
        if len > limit {
            return Outcome {
                response: local(StatusCode::PAYLOAD_TOO_LARGE),
                endpoint: None,
            };
        }
    }
    let upgrade = is_upgrade_request(&req) && !upstream.spec.h2c;
    let tls = upstream.spec.tls.is_some();
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare_upstream_request(&mut req, &ctx.forwarded(), authority, upgrade, upstream.spec.h2c);
    if tls || up.vhost.is_some() {
        up.fix_request(&mut req, upstream.spec.h2c, tls);
    }
    let retry = up.retry;
    let replayable = idempotent(req.method()) || retry.non_idempotent;
    let replay = (replayable && req.body().is_end_stream() && !upgrade).then(|| Replay {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let (parts, body) = req.into_parts();
    let limit = max_body.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let (mut body, body_done) = conn::ClientBody::new(body, s.config.limits.body_timeout);
    // `proxy-send-timeout`: only requests with a body on routes with it pay for the watch.
    let send_watch = match up.send_timeout {
        Some(t) if !body_done.load(Ordering::Relaxed) => {
            let w = Arc::new(SendWatch::new());
            body.set_watch(w.clone());
            Some((w, t))
        }
        _ => None,
    };
    let watch = send_watch.as_ref().map(|(w, t)| (&**w, *t, &*body_done));
    let mut req: Request<UpstreamBody> = Request::from_parts(parts, Either::Left(Limited::new(body, limit)));
    let mut tried = Tried::default();
    let mut last_status = StatusCode::BAD_GATEWAY;
    // Bounded: every turn either returns or consumes an attempt.
    while let Some((i, conn, fresh)) =
        connect_next(s, upstream, config, retry, &mut tried, key, |ep| ep.connection(config)).await
    {
        let ep = upstream.endpoints[i].clone();
        let in_flight = ep.track();
        let sent_at = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent_at) + config.header_timeout;
        let mut send_stalled = false;
        let result = match conn {
            Conn::H1(mut sender) => {
                match wait_response(sender.try_send_request(req), deadline, watch, config.header_timeout).await {
                    Err(w) => {
                        send_stalled = w == WaitTimeout::Send;
                        Err(None)
                    }
                    Ok(Ok(resp)) => {
                        if !upgrade {
                            ep.give_back(sender);
                        }
                        Ok(resp)
                    }
                    Ok(Err(mut e)) => Err(Some((e.take_message(), e.into_error()))),
                }
            }
            Conn::H2(mut sender) => {
                match wait_response(sender.try_send_request(req), deadline, watch, config.header_timeout).await {
                    Err(w) => {
                        send_stalled = w == WaitTimeout::Send;
                        Err(None)
                    }
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(mut e)) => Err(Some((e.take_message(), e.into_error()))),
                }
            }
        };
        match result {
            Ok(resp) if retry.on_status(resp.status()) && replay.is_some() && tried.len() < config.max_attempts => {
                // `proxy-next-upstream http_NNN`: the next endpoint gets the request.
                observe_latency(s, upstream, &ep, sent_at);
                tracing::debug!(upstream = %upstream.spec.name, endpoint = %ep.addr, status = resp.status().as_u16(),
                    "retrying on the response status");
                last_status = resp.status();
                s.metrics.retries.inc();
                let Some(r) = &replay else { break };
                req = r.request();
            }
            Ok(mut resp) => {
                observe_latency(s, upstream, &ep, sent_at);
                let endpoint = Some(ep.addr);
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(down) = downstream_upgrade {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(tunnel(down, up, in_flight).in_current_span());
                        let (parts, _) = resp.into_parts();
                        return Outcome {
                            response: Response::from_parts(parts, ProxyBody::Local(None)),
                            endpoint,
                        };
                    }
                }
                strip_hop_by_hop(resp.headers_mut(), false);
                // The downstream connection speaks its own version (an
                // HTTP/1.0 upstream must not downgrade a 1.1 client).
                *resp.version_mut() = Version::default();
                let (parts, body) = resp.into_parts();
                let body = ProxyBody::Upstream {
                    body,
                    _in_flight: in_flight,
                };
                return Outcome {
                    response: Response::from_parts(parts, body.read_timeout(up.read_timeout)),
                    endpoint,
                };
            }
            Err(None) if send_stalled => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr,
                    "upstream send timeout: the upstream stopped reading the request body");
                return Outcome {
                    response: local(StatusCode::GATEWAY_TIMEOUT),
                    endpoint: Some(ep.addr),
                };
            }
            Err(None) if !body_done.load(Ordering::Relaxed) => {
                // Still waiting for the client's body: the client's fault.
                tracing::debug!(upstream = %upstream.spec.name, "request body incomplete at the upstream header timeout");
                return Outcome {
                    response: local(StatusCode::REQUEST_TIMEOUT),
                    endpoint: None,
                };
            }
            Err(None) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, timeout = ?config.header_timeout,
                    "upstream response header timeout");
                match &replay {
                    Some(r) if retry.read_timeout && tried.len() < config.max_attempts => {
                        last_status = StatusCode::GATEWAY_TIMEOUT;
                        s.metrics.retries.inc();
                        req = r.request();
                    }
                    _ => {
                        return Outcome {
                            response: local(StatusCode::GATEWAY_TIMEOUT),
                            endpoint: Some(ep.addr),
                        }
                    }
                }
            }
            Err(Some((Some(back), e))) => {
                // Never written to the wire (a pooled connection had
                // closed): send it again, on this endpoint too if needed.
                tracing::debug!(endpoint = %ep.addr, error = %e, "request not sent; retrying");
                if !fresh {
                    tried.pop();
                }
                req = back;
            }
            Err(Some((None, e))) if body_too_large(&e) => {
                tracing::debug!(upstream = %upstream.spec.name, limit = ?max_body, "request body over the limit");
                return Outcome {
                    response: local(StatusCode::PAYLOAD_TOO_LARGE),
                    endpoint: Some(ep.addr),
                };
            }
            Err(Some((None, e))) if client_body_fault(&e).is_some() => {
                let status = client_body_fault(&e).unwrap_or(StatusCode::BAD_REQUEST);
                tracing::debug!(upstream = %upstream.spec.name, error = %e, status = status.as_u16(), "client request body failed");
                return Outcome {
                    response: local(status),
                    endpoint: None,
                };
            }
            Err(Some((None, e))) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, error = %e,
                    "upstream failed before responding");
                last_status = StatusCode::BAD_GATEWAY;
                match &replay {
                    Some(r) if retry.error && tried.len() < config.max_attempts => {
                        s.metrics.retries.inc();
                        req = r.request();
                    }
                    _ => break,
                }
            }
        }
    }
    Outcome {
        response: local(last_status),
        endpoint: None,
    }
}

/// The next untried endpoint, a connection to it made by `connect` (the
/// hyper or the lean client), and whether that connection is new. A failed
/// connect is recorded and, while
/// attempts remain, the next endpoint is tried; `None` when no endpoint or
/// attempt is left. Every call counts one attempt per endpoint it tries,
/// so a caller's retry loop over it is bounded.
async fn connect_next<'a, C, F>(
    s: &Shared,
    upstream: &'a LiveUpstream,
    config: &UpstreamConfig,
    retry: Retry,
    tried: &mut Tried,
    key: PickKey,
    connect: impl Fn(&'a EndpointState) -> F,
) -> Option<(usize, C, bool)>
where
    F: std::future::Future<Output = Result<(C, bool), upstream::ConnectError>>,
{
    while tried.attempts < config.max_attempts + 2 {
        tried.attempts += 1;
        let i = upstream.pick_with(tried.as_slice(), key)?;
        tried.push(i);
        let ep = &upstream.endpoints[i];
        match connect(ep).await {
            Ok((conn, fresh)) => {
                if fresh {
                    ep.connect_succeeded();
                }
                return Some((i, conn, fresh));
            }
            Err(e) => {
                connect_failed(s, upstream, ep, &e);
                let retried = match e {
                    upstream::ConnectError::Timeout => retry.connect_timeout,
                    _ => retry.error,
                };
                if !retried || tried.len() >= config.max_attempts {
                    return None;
                }
                s.metrics.retries.inc();
            }
        }
    }
    None
}

/// Counts and logs a failed upstream connect (ejecting the endpoint
/// after too many in a row).
fn connect_failed(s: &Shared, upstream: &LiveUpstream, ep: &EndpointState, e: &upstream::ConnectError) {
    let config = &s.config.upstream;
    s.metrics
        .upstream_connect_failures
        .get_or_create(&UpstreamLabels {
            upstream: upstream.spec.name.clone(),
        })
        .inc();
    if ep.connect_failed(config) {
        s.metrics.ejections.inc();
        tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, eject_for = ?config.eject_for,
            "endpoint ejected after consecutive connect failures");
    }
    tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, error = %e, "upstream connect failed");
}

fn observe_latency(s: &Shared, upstream: &LiveUpstream, ep: &EndpointState, sent_at: Instant) {
    if upstream.spec.lb == LbMethod::Ewma {
        ep.ewma.observe(sent_at.elapsed());
    }
    upstream
        .metrics
        .latency
        .get_or_init(|| {
            s.metrics
                .upstream_latency
                .get_or_create(&UpstreamLabels {
                    upstream: upstream.spec.name.clone(),
                })
                .clone()
        })
        .observe(sent_at.elapsed().as_secs_f64());
}

/// `forward` for a body-less idempotent request to a plain HTTP/1.1
/// upstream, through the lean client in `h1`: same retries, headers,
/// metrics and timeouts, without hyper's per-connection task.
async fn forward_lean<B>(
    ctx: &ConnContext,
    upstream: &LiveUpstream,
    req: &mut Request<B>,
    authority: Option<&HeaderValue>,
    up: &UpstreamPolicy,
    key: PickKey,
) -> Outcome {
    let s = &ctx.shared;
    let config = &*up.config(&s.config.upstream, upstream.endpoints.len());
    if upstream.endpoints.is_empty() {
        return Outcome {
            response: local(StatusCode::SERVICE_UNAVAILABLE),
            endpoint: None,
        };
    }
    let head_request = req.method() == Method::HEAD;
    let fast = if up.vhost.is_none() {
        encode_forwarded(req, &ctx.forwarded(), authority)
    } else {
        None
    };
    let request = match fast {
        Some(head) => head,
        None => {
            prepare_upstream_request(req, &ctx.forwarded(), authority, false, false);
            if up.vhost.is_some() {
                up.fix_request(req, false, false);
            }
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            lean::encode_request(req.method(), target, req.headers())
        }
    };
    let track_in_flight = matches!(upstream.spec.lb, LbMethod::LeastConn | LbMethod::RandomTwoLeastConn);
    let mut tried = Tried::default();
    // Bounded: every turn either returns or consumes an attempt.
    let mut last_status = StatusCode::BAD_GATEWAY;
    while let Some((i, mut conn, fresh)) = connect_next(s, upstream, config, up.retry, &mut tried, key, |ep| {
        ep.raw_connection(config)
    })
    .await
    {
        let ep = &upstream.endpoints[i];
        // Requests in flight matter only to the least-connection pickers.
        let in_flight = track_in_flight.then(|| ep.track());
        let sent_at = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent_at) + config.header_timeout;
        match conn.exchange(&request, head_request, deadline).await {
            Ok(head) => {
                observe_latency(s, upstream, ep, sent_at);
                let (mut parts, ()) = head.response.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                // The downstream connection speaks its own version.
                parts.version = Version::default();
                let body = match conn.take_complete_body(head.framing) {
                    Some(bytes) => {
                        if head.keep_alive {
                            ep.give_back_raw(conn);
                        }
                        ProxyBody::Local((!bytes.is_empty()).then_some(bytes))
                    }
                    None => ProxyBody::Raw(RawBody::new(conn, head.framing, head.keep_alive, ep.clone(), in_flight))
                        .read_timeout(up.read_timeout),
                };
                return Outcome {
                    response: Response::from_parts(parts, body),
                    endpoint: Some(ep.addr),
                };
            }
            Err(ExchangeError::TimedOut) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, timeout = ?config.header_timeout,
                    "upstream response header timeout");
                if !(up.retry.read_timeout && tried.len() < config.max_attempts) {
                    return Outcome {
                        response: local(StatusCode::GATEWAY_TIMEOUT),
                        endpoint: Some(ep.addr),
                    };
                }
                last_status = StatusCode::GATEWAY_TIMEOUT;
                s.metrics.retries.inc();
            }
            Err(ExchangeError::Closed(e)) if !fresh => {
                // A pooled connection the upstream had closed while idle:
                // send it again, on this endpoint too if needed.
                tracing::debug!(endpoint = %ep.addr, error = %e, "pooled connection closed; retrying");
                tried.pop();
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, error = %e,
                    "upstream failed before responding");
                last_status = StatusCode::BAD_GATEWAY;
                if !up.retry.error || tried.len() >= config.max_attempts {
                    break;
                }
                s.metrics.retries.inc();
            }
        }
    }
    Outcome {
        response: local(last_status),
        endpoint: None,
    }
}

/// Copies bytes both ways between an upgraded client and upstream
/// connection (WebSocket and other `Upgrade`s).
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade, _in_flight: InFlight) {
    let (down, up) = match tokio::join!(down, up) {
        (Ok(d), Ok(u)) => (d, u),
        (d, u) => {
            tracing::debug!(down_ok = d.is_ok(), up_ok = u.is_ok(), "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_up, to_down)) => tracing::debug!(to_up, to_down, "upgraded connection closed"),
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request head's request line and its headers, sorted by name (then
    /// value), as an upstream reads it.
    fn parsed_head(head: &[u8]) -> (String, Vec<(String, String)>) {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        assert!(matches!(req.parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()));
        let line = format!("{} {}", req.method.unwrap_or_default(), req.path.unwrap_or_default());
        let mut list: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        list.sort();
        (line, list)
    }

    #[test]
    fn the_one_pass_upstream_head_equals_the_general_path() {
        let client_ip = HeaderValue::from_static("10.88.0.7");
        let port = HeaderValue::from_static("8443");
        let requests: Vec<(&str, Vec<(&str, &str)>)> = vec![
            ("/", vec![("host", "a.test")]),
            (
                "/x?y=1",
                vec![("host", "A.test:8080"), ("accept", "*/*"), ("x-a", "1"), ("x-a", "2")],
            ),
            ("/", vec![("host", "a.test"), ("x-forwarded-for", "192.0.2.1")]),
            (
                "/",
                vec![
                    ("host", "a.test"),
                    ("x-forwarded-for", "192.0.2.1"),
                    ("x-forwarded-for", "192.0.2.2"),
                ],
            ),
            ("/", vec![("host", "a.test"), ("x-forwarded-for", "")]),
            (
                "/",
                vec![
                    ("host", "a.test"),
                    ("x-real-ip", "192.0.2.66"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "evil.test"),
                    ("x-forwarded-port", "1"),
                ],
            ),
            ("http://a.test/abs?q", vec![("host", "a.test")]),
            ("/nohost", vec![("x-forwarded-host", "kept.test")]),
        ];
        for https in [false, true] {
            let fwd = Forwarded {
                client_ip: &client_ip,
                https,
                port: &port,
            };
            for (uri, headers) in &requests {
                let mut req = Request::get(*uri).body(()).unwrap();
                for (n, v) in headers {
                    req.headers_mut()
                        .append(HeaderName::from_static(n), HeaderValue::from_static(v));
                }
                let authority = req.headers().get(header::HOST).cloned();
                let fast = encode_forwarded(&req, &fwd, authority.as_ref()).expect("no hop-by-hop headers");
                prepare_upstream_request(&mut req, &fwd, authority.as_ref(), false, false);
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let general = lean::encode_request(req.method(), target, req.headers());
                assert_eq!(
                    parsed_head(&fast),
                    parsed_head(&general),
                    "{uri} {headers:?} https={https}"
                );
            }
        }
        let mut req = Request::get("/").body(()).unwrap();
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        assert!(encode_forwarded(
            &req,
            &Forwarded {
                client_ip: &client_ip,
                https: false,
                port: &port
            },
            None
        )
        .is_none());
    }

    #[test]
    fn tried_spills_past_its_inline_capacity_and_pops() {
        let mut t = Tried::default();
        for i in 0..10 {
            t.push(i);
        }
        assert_eq!(t.as_slice(), (0..10).collect::<Vec<_>>().as_slice());
        t.pop();
        t.pop();
        assert_eq!(t.len(), 8);
        let mut small = Tried::default();
        small.push(4);
        small.push(7);
        small.pop();
        assert_eq!(small.as_slice(), &[4]);
    }

    #[test]
    fn the_hop_by_hop_check_knows_every_name_that_is_removed() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a"));
            h.insert(name.clone(), HeaderValue::from_static("1"));
            assert!(has_hop_by_hop(&h), "{name}");
        }
        let mut h = HeaderMap::new();
        for name in ["host", "x-te", "tes", "keep-alive-x", "proxy-connections", "trailers"] {
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
        }
        assert!(!has_hop_by_hop(&h));
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_upgrade_kept_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret, Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(h.get("x-secret").is_none());
    }
}
