//! How a route talks to its upstream, from ingress-nginx's and NGINX IC's
//! annotations: the protocol (`backend-protocol`, `nginx.org/ssl-services`,
//! `nginx.org/grpc-services`) and TLS (`proxy-ssl-*`, in
//! [`super::upstream_tls`]), the Host sent (`upstream-vhost`), dialling the
//! ClusterIP (`service-upstream`), timeouts and retries
//! (`proxy-{connect,read,send}-timeout`, `proxy-next-upstream[-tries]`) and
//! error pages (`custom-http-errors` with `default-backend`).
//!
//! Everything is resolved when routes are compiled; a route without these
//! annotations costs the request path one branch on [`UpstreamPolicy::plain`].

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_cluster::{BackendPort, Ingress, IngressBackend, ObjectKey, Snapshot};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::upstream_tls::{TlsSettings, UpstreamTls};
use super::{comma_list, parse_seconds, Reader};
use crate::h1::BodyError;
use crate::upstream::UpstreamConfig;

pub const BACKEND_PROTOCOL: &str = "nginx.ingress.kubernetes.io/backend-protocol";
pub const SSL_SERVICES: &str = "nginx.org/ssl-services";
pub const GRPC_SERVICES: &str = "nginx.org/grpc-services";
pub const UPSTREAM_VHOST: &str = "nginx.ingress.kubernetes.io/upstream-vhost";
pub const SERVICE_UPSTREAM: &str = "nginx.ingress.kubernetes.io/service-upstream";
pub const CONNECT_TIMEOUT: [&str; 2] = [
    "nginx.ingress.kubernetes.io/proxy-connect-timeout",
    "nginx.org/proxy-connect-timeout",
];
pub const READ_TIMEOUT: [&str; 2] = [
    "nginx.ingress.kubernetes.io/proxy-read-timeout",
    "nginx.org/proxy-read-timeout",
];
pub const SEND_TIMEOUT: [&str; 2] = [
    "nginx.ingress.kubernetes.io/proxy-send-timeout",
    "nginx.org/proxy-send-timeout",
];
pub const NEXT_UPSTREAM: &str = "nginx.ingress.kubernetes.io/proxy-next-upstream";
pub const NEXT_UPSTREAM_TRIES: &str = "nginx.ingress.kubernetes.io/proxy-next-upstream-tries";
pub const CUSTOM_HTTP_ERRORS: &str = "nginx.ingress.kubernetes.io/custom-http-errors";
pub const DEFAULT_BACKEND: &str = "nginx.ingress.kubernetes.io/default-backend";

/// `backend-protocol` values ferry speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProtocol {
    Http,
    Https,
    /// gRPC over HTTP/2 cleartext.
    Grpc,
    /// gRPC over HTTP/2 over TLS (ALPN h2).
    Grpcs,
    H2c,
}

impl BackendProtocol {
    fn parse(v: &str) -> Result<BackendProtocol, String> {
        match v.to_ascii_uppercase().as_str() {
            "HTTP" => Ok(BackendProtocol::Http),
            "HTTPS" => Ok(BackendProtocol::Https),
            "GRPC" => Ok(BackendProtocol::Grpc),
            "GRPCS" => Ok(BackendProtocol::Grpcs),
            "H2C" => Ok(BackendProtocol::H2c),
            "AUTO_HTTP" | "FCGI" => Err("not supported by ferry; using HTTP".into()),
            _ => Err("unknown protocol (HTTP, HTTPS, GRPC, GRPCS, H2C); using HTTP".into()),
        }
    }

    fn h2(self) -> bool {
        matches!(
            self,
            BackendProtocol::Grpc | BackendProtocol::Grpcs | BackendProtocol::H2c
        )
    }

    fn tls(self) -> bool {
        matches!(self, BackendProtocol::Https | BackendProtocol::Grpcs)
    }
}

/// Response codes `proxy-next-upstream` can retry on, by bit.
const RETRY_STATUSES: [u16; 7] = [500, 502, 503, 504, 403, 404, 429];

/// Which failures send a request to the next endpoint
/// (`proxy-next-upstream`). Requests are retried only when they can be
/// replayed: no body, and idempotent unless `non_idempotent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Connect errors and failures before a response (`error`,
    /// `invalid_header`).
    pub error: bool,
    /// Connect timeouts (`timeout`).
    pub connect_timeout: bool,
    /// Response header timeouts (`timeout`).
    pub read_timeout: bool,
    pub non_idempotent: bool,
    statuses: u8,
}

impl Retry {
    /// Without the annotation: ferry's engine behaviour (connect errors
    /// and timeouts, failures before a response; not header timeouts).
    pub const DEFAULT: Retry = Retry {
        error: true,
        connect_timeout: true,
        read_timeout: false,
        non_idempotent: false,
        statuses: 0,
    };
    pub const OFF: Retry = Retry {
        error: false,
        connect_timeout: false,
        read_timeout: false,
        non_idempotent: false,
        statuses: 0,
    };

    /// Whether a response with `status` is retried (when attempts remain).
    pub fn on_status(&self, status: StatusCode) -> bool {
        self.statuses != 0
            && RETRY_STATUSES
                .iter()
                .enumerate()
                .any(|(i, &s)| self.statuses & (1 << i) != 0 && status.as_u16() == s)
    }

    pub fn retries_statuses(&self) -> bool {
        self.statuses != 0
    }

    fn parse(v: &str) -> Result<Retry, String> {
        let mut r = Retry::OFF;
        let mut off = false;
        for word in v.split_whitespace() {
            match word {
                "error" | "invalid_header" => r.error = true,
                "timeout" => {
                    r.connect_timeout = true;
                    r.read_timeout = true;
                }
                "non_idempotent" => r.non_idempotent = true,
                "off" => off = true,
                _ => {
                    let code = word
                        .strip_prefix("http_")
                        .and_then(|c| c.parse::<u16>().ok())
                        .and_then(|c| RETRY_STATUSES.iter().position(|&s| s == c))
                        .ok_or_else(|| format!("unknown condition {word:?}"))?;
                    r.statuses |= 1 << code;
                }
            }
        }
        if off {
            return Ok(Retry::OFF);
        }
        if r == Retry::OFF {
            return Err("no condition".into());
        }
        Ok(r)
    }

    fn describe(&self) -> String {
        let mut words = Vec::new();
        if self.error {
            words.push("error".to_string());
        }
        if self.read_timeout {
            words.push("timeout".to_string());
        }
        if self.non_idempotent {
            words.push("non_idempotent".to_string());
        }
        for (i, s) in RETRY_STATUSES.iter().enumerate() {
            if self.statuses & (1 << i) != 0 {
                words.push(format!("http_{s}"));
            }
        }
        if words.is_empty() {
            "off".into()
        } else {
            words.join(" ")
        }
    }
}

/// `custom-http-errors`: responses with these codes are replaced by the
/// default backend's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorPages {
    pub codes: Vec<u16>,
}

/// The upstream settings of one Ingress (nothing set: the defaults).
#[derive(Debug)]
pub struct UpstreamPolicy {
    /// Nothing below differs from the defaults: the request path skips
    /// every hook.
    pub plain: bool,
    /// Per-request settings differ from the engine's (timeouts, retries).
    pub tuned: bool,
    pub protocol: Option<BackendProtocol>,
    pub ssl_services: Vec<String>,
    pub grpc_services: Vec<String>,
    pub tls: Option<TlsSettings>,
    pub vhost: Option<HeaderValue>,
    pub service_upstream: bool,
    pub connect_timeout: Option<Duration>,
    pub read_timeout: Option<Duration>,
    pub send_timeout: Option<Duration>,
    /// `proxy-next-upstream-tries`; 0: as many as there are endpoints.
    pub tries: Option<usize>,
    pub retry: Retry,
    pub errors: Option<ErrorPages>,
    /// `default-backend`: a Service of the Ingress's namespace.
    pub default_backend: Option<String>,
    /// Its upstream, filled in by the route compiler.
    pub default_backend_upstream: Option<usize>,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        UpstreamPolicy {
            plain: true,
            tuned: false,
            protocol: None,
            ssl_services: Vec::new(),
            grpc_services: Vec::new(),
            tls: None,
            vhost: None,
            service_upstream: false,
            connect_timeout: None,
            read_timeout: None,
            send_timeout: None,
            tries: None,
            retry: Retry::DEFAULT,
            errors: None,
            default_backend: None,
            default_backend_upstream: None,
        }
    }
}

/// An HTTP status code list: `404,500,503`.
fn codes(v: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for c in comma_list(v) {
        match c.parse::<u16>() {
            Ok(n) if (400..=599).contains(&n) => out.push(n),
            _ => return Err(format!("{c:?} is not an error status code (400-599)")),
        }
    }
    if out.is_empty() {
        return Err("no status code".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A timeout: seconds or an nginx time, more than zero.
fn timeout(v: &str) -> Result<Duration, String> {
    let d = parse_seconds(v)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// The first of `names` set (ingress-nginx's before NGINX IC's), parsed;
/// every one is read.
fn first_timeout(r: &mut Reader<'_>, names: &[&'static str]) -> Option<Duration> {
    let mut found = None;
    for name in names {
        if let Some(d) = r.parse(name, timeout) {
            found = found.or(Some(d));
        }
    }
    found
}

fn service_names(v: &str) -> Vec<String> {
    comma_list(v).into_iter().map(str::to_string).collect()
}

impl UpstreamPolicy {
    pub fn parse(snap: &Snapshot, r: &mut Reader<'_>) -> UpstreamPolicy {
        let mut p = UpstreamPolicy {
            protocol: r.parse(BACKEND_PROTOCOL, BackendProtocol::parse),
            ssl_services: r.get(SSL_SERVICES).map(service_names).unwrap_or_default(),
            grpc_services: r.get(GRPC_SERVICES).map(service_names).unwrap_or_default(),
            vhost: r.parse(UPSTREAM_VHOST, |v| {
                if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '/') {
                    return Err("not a host name".into());
                }
                HeaderValue::from_str(v).map_err(|_| "not a valid Host header value".to_string())
            }),
            service_upstream: r.flag(SERVICE_UPSTREAM).unwrap_or(false),
            connect_timeout: first_timeout(r, &CONNECT_TIMEOUT),
            read_timeout: first_timeout(r, &READ_TIMEOUT),
            send_timeout: first_timeout(r, &SEND_TIMEOUT),
            tries: r.parse(NEXT_UPSTREAM_TRIES, |v| {
                v.parse::<usize>().map_err(|_| "not a non-negative integer".to_string())
            }),
            retry: r.parse(NEXT_UPSTREAM, Retry::parse).unwrap_or(Retry::DEFAULT),
            errors: r.parse(CUSTOM_HTTP_ERRORS, codes).map(|codes| ErrorPages { codes }),
            default_backend: r.parse(DEFAULT_BACKEND, |v| {
                if v.is_empty() || v.contains(['/', ' ']) {
                    return Err("not a Service name (of the Ingress's namespace)".into());
                }
                Ok(v.to_string())
            }),
            ..UpstreamPolicy::default()
        };
        if p.errors.is_some() && p.default_backend.is_none() {
            r.problem(
                CUSTOM_HTTP_ERRORS,
                "needs nginx.ingress.kubernetes.io/default-backend to answer the errors \
                 (ferry has no global default backend); annotation ignored",
            );
            p.errors = None;
        }
        let uses_tls = p.protocol.is_some_and(BackendProtocol::tls) || !p.ssl_services.is_empty();
        p.tls = TlsSettings::parse(snap, r, uses_tls);
        p.tuned = p.connect_timeout.is_some()
            || p.read_timeout.is_some()
            || p.send_timeout.is_some()
            || p.tries.is_some()
            || p.retry != Retry::DEFAULT;
        p.plain = !p.tuned && p.vhost.is_none() && p.errors.is_none() && p.default_backend.is_none();
        p
    }

    /// Whether Service `service` is spoken to over HTTP/2 and over TLS
    /// according to these annotations.
    pub fn protocol_for(&self, service: &str) -> (bool, bool) {
        let listed = |l: &[String]| l.iter().any(|s| s == service);
        let (mut h2, mut tls) = self.protocol.map_or((false, false), |p| (p.h2(), p.tls()));
        h2 |= listed(&self.grpc_services);
        tls |= listed(&self.ssl_services);
        (h2, tls)
    }

    /// The TLS of Service `service` of `namespace` (`None`: plain TCP).
    pub fn tls_for(&self, namespace: &str, service: &str, h2: bool) -> Option<Arc<UpstreamTls>> {
        let (_, tls) = self.protocol_for(service);
        if !tls {
            return None;
        }
        self.tls.as_ref()?.for_service(namespace, service, h2)
    }

    /// The engine's upstream settings with this Ingress's overrides, for
    /// an upstream of `endpoints` endpoints; borrowed when nothing is
    /// overridden.
    pub fn config<'a>(&self, engine: &'a UpstreamConfig, endpoints: usize) -> Cow<'a, UpstreamConfig> {
        if !self.tuned {
            return Cow::Borrowed(engine);
        }
        let mut c = engine.clone();
        if let Some(t) = self.connect_timeout {
            c.connect_timeout = t;
        }
        if let Some(t) = self.read_timeout {
            c.header_timeout = t;
        }
        match self.tries {
            Some(0) => c.max_attempts = endpoints.max(1),
            Some(n) => c.max_attempts = n,
            None => {}
        }
        if self.retry == Retry::OFF {
            c.max_attempts = 1;
        }
        Cow::Owned(c)
    }

    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = self.protocol {
            out.push(format!("backend-protocol {p:?}"));
        }
        if !self.ssl_services.is_empty() {
            out.push(format!("ssl-services {}", self.ssl_services.join(",")));
        }
        if !self.grpc_services.is_empty() {
            out.push(format!("grpc-services {}", self.grpc_services.join(",")));
        }
        if let Some(t) = &self.tls {
            out.push(t.describe());
        }
        if let Some(v) = &self.vhost {
            out.push(format!("upstream Host {}", String::from_utf8_lossy(v.as_bytes())));
        }
        if self.service_upstream {
            out.push("service-upstream: dial the ClusterIP".into());
        }
        for (what, t) in [
            ("connect", self.connect_timeout),
            ("read", self.read_timeout),
            ("send", self.send_timeout),
        ] {
            if let Some(t) = t {
                out.push(format!("proxy-{what}-timeout {t:?}"));
            }
        }
        if let Some(n) = self.tries {
            out.push(format!("proxy-next-upstream-tries {n}"));
        }
        if self.retry != Retry::DEFAULT {
            out.push(format!("proxy-next-upstream {}", self.retry.describe()));
        }
        if let Some(e) = &self.errors {
            let codes: Vec<String> = e.codes.iter().map(u16::to_string).collect();
            out.push(format!("custom-http-errors {}", codes.join(",")));
        }
        if let Some(d) = &self.default_backend {
            out.push(format!("default-backend {d}"));
        }
        out
    }

    /// Sets the Host (and `:authority`) sent upstream to `upstream-vhost`,
    /// after the request was prepared for the upstream; `h2`: the request
    /// goes out as HTTP/2 (`tls`: with scheme `https`).
    pub fn fix_request<B>(&self, req: &mut Request<B>, h2: bool, tls: bool) {
        if h2 {
            if self.vhost.is_none() && !tls {
                return;
            }
            let mut parts = req.uri().clone().into_parts();
            if let Some(v) = self.vhost.as_ref().and_then(|v| v.to_str().ok()) {
                if let Ok(a) = v.parse() {
                    parts.authority = Some(a);
                }
            }
            if tls {
                parts.scheme = Some(http::uri::Scheme::HTTPS);
            }
            if let Ok(u) = Uri::from_parts(parts) {
                *req.uri_mut() = u;
            }
        } else if let Some(v) = &self.vhost {
            req.headers_mut().insert(header::HOST, v.clone());
        }
    }
}

/// The backend of `default-backend`: the named Service of the Ingress's
/// namespace, on its first port (as ingress-nginx); port 80 when the
/// Service is missing (the route compiler reports it).
pub fn default_backend(snap: &Snapshot, ing: &Ingress, policy: &UpstreamPolicy) -> Option<IngressBackend> {
    let name = policy.default_backend.as_ref()?;
    let port = snap
        .service(&ing.key.namespace, name)
        .and_then(|s| s.ports.first())
        .map_or(80, |p| p.port);
    Some(IngressBackend::Service {
        name: name.clone(),
        port: BackendPort::Number(port),
    })
}

/// What an error-page request needs from the original request, captured
/// before it is forwarded (only for routes with `custom-http-errors`).
pub struct ErrorRequest {
    method: http::Method,
    original_uri: HeaderValue,
    query: Option<String>,
    accept: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

static X_CODE: HeaderName = HeaderName::from_static("x-code");
static X_FORMAT: HeaderName = HeaderName::from_static("x-format");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_NAMESPACE: HeaderName = HeaderName::from_static("x-namespace");
static X_INGRESS_NAME: HeaderName = HeaderName::from_static("x-ingress-name");
static X_SERVICE_NAME: HeaderName = HeaderName::from_static("x-service-name");
static X_SERVICE_PORT: HeaderName = HeaderName::from_static("x-service-port");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl ErrorRequest {
    pub fn capture<B>(req: &Request<B>, authority: Option<&HeaderValue>) -> ErrorRequest {
        let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
        ErrorRequest {
            method: req.method().clone(),
            original_uri: HeaderValue::from_str(uri).unwrap_or(HeaderValue::from_static("/")),
            query: req.uri().query().map(str::to_string),
            accept: req.headers().get(header::ACCEPT).cloned(),
            request_id: req.headers().get(&X_REQUEST_ID).cloned(),
            host: authority.cloned(),
        }
    }

    /// The request to the default backend for a `status` answer of
    /// upstream `upstream_name` (`namespace/service:port`), routed from
    /// Ingress `ingress`: ingress-nginx's headers, path `/` (query kept),
    /// same method, no body.
    pub fn request(&self, status: StatusCode, ingress: &ObjectKey, upstream_name: &str) -> Request<()> {
        let target = match &self.query {
            Some(q) => format!("/?{q}"),
            None => "/".to_string(),
        };
        let mut req = Request::new(());
        *req.method_mut() = self.method.clone();
        *req.version_mut() = Version::HTTP_11;
        if let Ok(u) = target.parse() {
            *req.uri_mut() = u;
        }
        let (service, port) = upstream_name
            .split_once('/')
            .map_or(upstream_name, |(_, rest)| rest)
            .rsplit_once(':')
            .unwrap_or((upstream_name, ""));
        let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
        let h = req.headers_mut();
        if let Some(host) = &self.host {
            h.insert(header::HOST, host.clone());
        }
        h.insert(X_CODE.clone(), HeaderValue::from(status.as_u16()));
        h.insert(
            X_FORMAT.clone(),
            self.accept.clone().unwrap_or(HeaderValue::from_static("")),
        );
        h.insert(X_ORIGINAL_URI.clone(), self.original_uri.clone());
        h.insert(X_NAMESPACE.clone(), value(&ingress.namespace));
        h.insert(X_INGRESS_NAME.clone(), value(&ingress.name));
        h.insert(X_SERVICE_NAME.clone(), value(service));
        h.insert(X_SERVICE_PORT.clone(), value(port));
        if let Some(id) = &self.request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        req
    }
}

/// `proxy-send-timeout` for one request with a body: when hyper last
/// polled the client's body and whether that poll waited on the client.
/// The upstream is stalling when, with the body unfinished and not waiting
/// on the client, hyper has not asked for more for the send timeout (its
/// write buffer is full: the upstream stopped reading).
#[derive(Debug)]
pub struct SendWatch {
    started: std::time::Instant,
    /// Milliseconds since `started` of the last poll, shifted left by one;
    /// the low bit is set when that poll waited on the client.
    last: std::sync::atomic::AtomicU64,
}

impl SendWatch {
    pub fn new() -> SendWatch {
        SendWatch {
            started: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX >> 2)
    }

    /// Called on every poll of the client's body.
    pub fn polled(&self, waiting_on_client: bool) {
        let v = (self.now_ms() << 1) | u64::from(waiting_on_client);
        self.last.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the upstream has not taken body data, `None` while the
    /// body waits on the client.
    fn stalled_for(&self) -> Option<Duration> {
        let v = self.last.load(std::sync::atomic::Ordering::Relaxed);
        if v & 1 == 1 {
            return None;
        }
        Some(Duration::from_millis(self.now_ms().saturating_sub(v >> 1)))
    }
}

impl Default for SendWatch {
    fn default() -> Self {
        SendWatch::new()
    }
}

/// Why waiting for a response head ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitTimeout {
    /// The read (response header) timeout.
    Read,
    /// `proxy-send-timeout`: the upstream stopped taking the request body.
    Send,
}

/// Awaits `fut` (sending a request and reading the response head) until
/// `deadline`; with a `watch` (`proxy-send-timeout` set and a body to
/// send), the send timeout also bounds every pause in the upstream taking
/// the body, and the read timeout counts from when the body was sent whole.
pub async fn wait_response<F: Future>(
    fut: F,
    deadline: Instant,
    watch: Option<(&SendWatch, Duration, &std::sync::atomic::AtomicBool)>,
    read_timeout: Duration,
) -> Result<F::Output, WaitTimeout> {
    let Some((watch, send_timeout, done)) = watch else {
        return tokio::time::timeout_at(deadline, fut)
            .await
            .map_err(|_| WaitTimeout::Read);
    };
    // The clock starts now: hyper has not been asked to send yet.
    watch.polled(false);
    tokio::pin!(fut);
    let mut read_deadline: Option<Instant> = None;
    // Bounded: every turn waits at least until the next check, and a
    // check past a deadline returns.
    loop {
        let now = Instant::now();
        let next = if done.load(std::sync::atomic::Ordering::Relaxed) {
            *read_deadline.get_or_insert(now + read_timeout)
        } else {
            match watch.stalled_for() {
                Some(stalled) if stalled >= send_timeout => return Err(WaitTimeout::Send),
                Some(stalled) => now + (send_timeout - stalled),
                None => now + send_timeout,
            }
        };
        tokio::select! {
            out = &mut fut => return Ok(out),
            () = tokio::time::sleep_until(next) => {
                if read_deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(WaitTimeout::Read);
                }
            }
        }
    }
}

/// A response body from the upstream whose frames must each arrive within
/// `proxy-read-timeout` of the previous one; past it, the body ends with
/// an error (the client's connection or stream is cut, as nginx does).
pub struct ReadTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> ReadTimeout<B> {
    pub fn new(inner: B, timeout: Duration) -> ReadTimeout<B> {
        ReadTimeout {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

#[derive(Debug)]
struct ReadTimedOut;

impl std::fmt::Display for ReadTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream read timeout")
    }
}

impl std::error::Error for ReadTimedOut {}

impl<B> Body for ReadTimeout<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                let deadline = Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(f)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ReadTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
