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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use ferry_cluster::{ObjectKey, Snapshot, SnapshotRx};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::IngressError;
use crate::metrics::{IngressMetrics, RequestLabels, UpstreamLabels};
use crate::routes::{self, normalize_host, ClassSelection, RouteTable};
use crate::tls::{self, CertResolver, CertStore};
use crate::upstream::{Conn, InFlight, LiveTable, LiveUpstream, UpstreamBody, UpstreamConfig};

/// Engine settings (from the `ferry ingress`/`serve` flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub classes: ClassSelection,
    /// `--default-tls-secret`: replaces the generated self-signed default.
    pub default_tls_secret: Option<ObjectKey>,
    pub upstream: UpstreamConfig,
    /// How long in-flight requests may finish after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            classes: ClassSelection::default(),
            default_tls_secret: None,
            upstream: UpstreamConfig::default(),
            drain_timeout: Duration::from_secs(30),
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
    /// Tables applied so far (readiness: at least one).
    applied: AtomicU64,
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
    /// Binds the given addresses (port 0 picks a free port).
    pub async fn bind(http: Option<SocketAddr>, https: Option<SocketAddr>) -> Result<Listeners, IngressError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| IngressError::Bind { addr, source })
        };
        Ok(Listeners {
            http: match http {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
            https: match https {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }
}

impl Engine {
    /// Creates an engine with an empty table (every request gets 404 until
    /// the first `apply`) and a freshly generated default certificate.
    pub fn new(config: EngineConfig, metrics: IngressMetrics) -> Result<Engine, IngressError> {
        let (fallback_cert, fallback_cert_pem) = tls::self_signed(&["ferry.invalid".into(), "localhost".into()])?;
        Ok(Engine {
            shared: Arc::new(Shared {
                config,
                live: ArcSwap::from_pointee(LiveTable::default()),
                certs: Arc::new(CertResolver::new(CertStore::with_default(fallback_cert.clone()))),
                fallback_cert,
                fallback_cert_pem,
                metrics,
                logged_problems: Mutex::new(HashSet::new()),
                applied: AtomicU64::new(0),
            }),
        })
    }

    /// Compiles `snap` and swaps the new routes and certificates in.
    /// Problems are logged (each once) naming object and field.
    pub fn apply(&self, snap: &Snapshot) -> Arc<RouteTable> {
        let s = &self.shared;
        let table = Arc::new(routes::compile(snap, &s.config.classes));
        let certs = tls::compile(snap, &table, s.config.default_tls_secret.as_ref(), &s.fallback_cert);
        let problems: Vec<String> = table
            .problems
            .iter()
            .chain(&certs.problems)
            .map(|p| p.to_string())
            .collect();
        if let Ok(mut logged) = s.logged_problems.lock() {
            for p in &problems {
                if !logged.contains(p) {
                    tracing::warn!(problem = %p, "ingress configuration problem");
                }
            }
            *logged = problems.iter().cloned().collect();
        }
        let live = LiveTable::build(table.clone(), &s.live.load());
        s.live.store(Arc::new(live));
        s.certs.swap(certs);
        s.metrics.reloads.inc();
        s.applied.fetch_add(1, Ordering::Relaxed);
        s.metrics
            .config_problems
            .set(i64::try_from(problems.len()).unwrap_or(i64::MAX));
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
    pub async fn serve(&self, listeners: Listeners, cancel: CancellationToken) -> Result<(), IngressError> {
        let tls = match &listeners.https {
            Some(_) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                self.shared.certs.clone(),
            )?)),
            None => None,
        };
        let graceful = GracefulShutdown::new();
        let http_port = listeners.http_addr().map_or(0, |a| a.port());
        let https_port = listeners.https_addr().map_or(0, |a| a.port());
        if let Some(a) = listeners.http_addr() {
            tracing::info!(addr = %a, "ingress listening (http)");
        }
        if let Some(a) = listeners.https_addr() {
            tracing::info!(addr = %a, "ingress listening (https)");
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = accept(listeners.http.as_ref()) => match r {
                    Ok((stream, peer)) => self.spawn_connection(stream, peer, None, http_port, &graceful),
                    Err(e) => accept_error(e).await,
                },
                r = accept(listeners.https.as_ref()) => match r {
                    Ok((stream, peer)) => self.spawn_connection(stream, peer, tls.clone(), https_port, &graceful),
                    Err(e) => accept_error(e).await,
                },
            }
        }
        drop(listeners);
        let open = graceful.count();
        tracing::info!(open_connections = open, timeout = ?self.shared.config.drain_timeout, "ingress draining");
        match tokio::time::timeout(self.shared.config.drain_timeout, graceful.shutdown()).await {
            Ok(()) => tracing::info!("ingress drained"),
            Err(_) => tracing::warn!("ingress drain timed out; closing the remaining connections"),
        }
        Ok(())
    }

    fn spawn_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        port: u16,
        graceful: &GracefulShutdown,
    ) {
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let shared = self.shared.clone();
        let span = tracing::debug_span!("conn", %peer, tls = tls.is_some());
        tokio::spawn(
            async move {
                shared.metrics.open_connections.inc();
                let _open = OpenConnection(shared.metrics.clone());
                let ctx = Arc::new(ConnContext {
                    shared,
                    peer,
                    https: tls.is_some(),
                    port,
                });
                let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30));
                builder.http2().timer(TokioTimer::new());
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(handle(ctx, req).await) }
                });
                let result = match tls {
                    None => {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let tls_stream =
                            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), service);
                        watcher.watch(conn.into_owned()).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Accept errors (e.g. out of file descriptors) are transient: log and
/// back off briefly instead of spinning.
async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

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
    /// The listener's port, for `X-Forwarded-Port`.
    port: u16,
}

/// The downstream response body: an upstream body (keeping its endpoint
/// counted as in flight until it is done) or a short local one.
pub enum ProxyBody {
    Upstream { body: Incoming, _in_flight: InFlight },
    Local(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            ProxyBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A short local answer that reveals nothing about the backends.
fn local(status: StatusCode) -> Response<ProxyBody> {
    let text = match status {
        StatusCode::NOT_FOUND => "404 not found\n",
        StatusCode::SERVICE_UNAVAILABLE => "503 service unavailable\n",
        StatusCode::GATEWAY_TIMEOUT => "504 gateway timeout\n",
        _ => "502 bad gateway\n",
    };
    let mut r = Response::new(ProxyBody::Local(Some(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
/// hop-by-hop headers, `X-Forwarded-*`.
fn prepare_upstream_request<B>(req: &mut Request<B>, ctx: &ConnContext, authority: &str, upgrade: bool, h2c: bool) {
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let client_ip = ctx.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if ctx.https { "https" } else { "http" }),
    );
    if let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert("x-forwarded-host", v.clone());
        if !h2c {
            // HTTP/2 clients send `:authority` only; HTTP/1.1 needs Host.
            headers.insert(header::HOST, v);
        }
    }
    headers.insert("x-forwarded-port", HeaderValue::from(ctx.port));
    if h2c {
        headers.remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
        let uri = format!("http://{authority}{path_and_query}");
        if let Ok(u) = uri.parse::<Uri>() {
            *req.uri_mut() = u;
        }
    } else {
        *req.version_mut() = Version::HTTP_11;
        if let Ok(u) = path_and_query.parse::<Uri>() {
            *req.uri_mut() = u;
        }
    }
}

struct Outcome {
    response: Response<ProxyBody>,
    endpoint: Option<SocketAddr>,
}

async fn handle(ctx: Arc<ConnContext>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let live = ctx.shared.live.load_full();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let log_access = tracing::enabled!(target: "ferry::access", tracing::Level::INFO);
    let method = req.method().clone();
    let path = if log_access {
        req.uri().path().to_string()
    } else {
        String::new()
    };

    let matched = live
        .routes
        .route(&authority, req.uri().path())
        .map(|m| (m.upstream, m.host.to_string()));
    let (outcome, host_label, upstream_name) = match matched {
        None => (
            Outcome {
                response: local(StatusCode::NOT_FOUND),
                endpoint: None,
            },
            String::new(),
            String::new(),
        ),
        Some((index, host_label)) => match live.upstreams.get(index) {
            None => (
                Outcome {
                    response: local(StatusCode::SERVICE_UNAVAILABLE),
                    endpoint: None,
                },
                host_label,
                String::new(),
            ),
            Some(upstream) => {
                let outcome = forward(&ctx, upstream, req, &authority).await;
                (outcome, host_label, upstream.spec.name.clone())
            }
        },
    };
    let status = outcome.response.status().as_u16();
    ctx.shared
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            host: host_label,
            status,
            upstream: upstream_name.clone(),
        })
        .inc();
    if log_access {
        tracing::info!(
            target: "ferry::access",
            client = %ctx.peer.ip(),
            %method,
            host = %normalize_host(&authority),
            path = %path,
            status,
            upstream = %upstream_name,
            endpoint = %outcome.endpoint.map(|e| e.to_string()).unwrap_or_default(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    outcome.response
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

async fn forward(ctx: &ConnContext, upstream: &LiveUpstream, mut req: Request<Incoming>, authority: &str) -> Outcome {
    let s = &ctx.shared;
    let config = &s.config.upstream;
    if upstream.endpoints.is_empty() {
        return Outcome {
            response: local(StatusCode::SERVICE_UNAVAILABLE),
            endpoint: None,
        };
    }
    let upgrade = is_upgrade_request(&req) && !upstream.spec.h2c;
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare_upstream_request(&mut req, ctx, authority, upgrade, upstream.spec.h2c);
    let replay = (idempotent(req.method()) && req.body().is_end_stream() && !upgrade).then(|| Replay {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let (parts, body) = req.into_parts();
    let mut req: Request<UpstreamBody> = Request::from_parts(parts, Either::Left(body));
    let mut tried: Vec<usize> = Vec::new();
    let mut attempts = 0usize;
    let mut last_status = StatusCode::BAD_GATEWAY;
    let labels = UpstreamLabels {
        upstream: upstream.spec.name.clone(),
    };
    // Bounded: every turn either returns or consumes an attempt.
    while attempts < config.max_attempts + 2 {
        attempts += 1;
        let Some(i) = upstream.pick(&tried) else { break };
        tried.push(i);
        let ep = upstream.endpoints[i].clone();
        let (conn, fresh) = match ep.connection(config).await {
            Ok(c) => c,
            Err(e) => {
                s.metrics.upstream_connect_failures.get_or_create(&labels).inc();
                if ep.connect_failed(config) {
                    s.metrics.ejections.inc();
                    tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, eject_for = ?config.eject_for,
                        "endpoint ejected after consecutive connect failures");
                }
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, error = %e, "upstream connect failed");
                if tried.len() >= config.max_attempts {
                    break;
                }
                s.metrics.retries.inc();
                continue;
            }
        };
        if fresh {
            ep.connect_succeeded();
        }
        let in_flight = ep.track();
        let sent_at = Instant::now();
        let result = match conn {
            Conn::H1(mut sender) => {
                match tokio::time::timeout(config.header_timeout, sender.try_send_request(req)).await {
                    Err(_) => Err(None),
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
                match tokio::time::timeout(config.header_timeout, sender.try_send_request(req)).await {
                    Err(_) => Err(None),
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(mut e)) => Err(Some((e.take_message(), e.into_error()))),
                }
            }
        };
        match result {
            Ok(mut resp) => {
                s.metrics
                    .upstream_latency
                    .get_or_create(&labels)
                    .observe(sent_at.elapsed().as_secs_f64());
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
                return Outcome {
                    response: Response::from_parts(
                        parts,
                        ProxyBody::Upstream {
                            body,
                            _in_flight: in_flight,
                        },
                    ),
                    endpoint,
                };
            }
            Err(None) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, timeout = ?config.header_timeout,
                    "upstream response header timeout");
                return Outcome {
                    response: local(StatusCode::GATEWAY_TIMEOUT),
                    endpoint: Some(ep.addr),
                };
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
            Err(Some((None, e))) => {
                tracing::warn!(upstream = %upstream.spec.name, endpoint = %ep.addr, error = %e,
                    "upstream failed before responding");
                last_status = StatusCode::BAD_GATEWAY;
                match &replay {
                    Some(r) if tried.len() < config.max_attempts => {
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
