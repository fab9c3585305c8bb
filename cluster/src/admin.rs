//! The admin HTTP server (`/healthz`, `/livez`, `/readyz`, `/metrics`) and
//! `Admin`, where engines register what it serves: metrics in one
//! prometheus-client `Registry`, and named liveness and readiness checks.
//!
//! Engines take `&mut Admin` when they start, so none depends on the binary
//! that serves it. The server answers GET and HEAD only (405 otherwise),
//! closes a connection whose request head takes longer than
//! `HEADER_TIMEOUT` or that lives longer than `CONNECTION_LIFETIME`, and
//! holds at most `MAX_CONNECTIONS` at once: a slow or hostile client on the
//! node cannot hold the server that kubelet probes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an admin connection stays open (a scraper reconnects).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Connections served at once per listener; more wait in the backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// A named check: `Ok` when fine, `Err(reason)` otherwise.
pub type Check = (String, Box<dyn Fn() -> Result<(), String> + Send + Sync>);

/// What the admin server serves, filled in by the engines as they start.
#[derive(Default)]
pub struct Admin {
    pub registry: Registry,
    live: Vec<Check>,
    ready: Vec<Check>,
}

/// Where the admin server listens.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminAddrs {
    /// Everything: probes and `/metrics`.
    pub all: Option<SocketAddr>,
    /// Probes only (`/healthz`, `/livez`, `/readyz`), e.g. on the node IP
    /// for kubelet while `/metrics` stays on loopback.
    pub probes: Option<SocketAddr>,
}

impl Admin {
    /// `/healthz` and `/livez` fail while this check fails.
    pub fn liveness(&mut self, name: &str, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.live.push((name.to_string(), Box::new(check)));
    }

    /// `/readyz` fails while this check fails.
    pub fn readiness(&mut self, name: &str, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.ready.push((name.to_string(), Box::new(check)));
    }

    /// Binds every address given (errors name it) and serves until cancelled.
    pub async fn serve(self, addrs: AdminAddrs, cancel: CancellationToken) -> std::io::Result<()> {
        let mut listeners = Vec::new();
        for (addr, metrics) in [(addrs.all, true), (addrs.probes, false)] {
            let Some(addr) = addr else { continue };
            let listener = crate::net::tcp_listener(addr)
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| std::io::Error::new(e.kind(), format!("admin server on {addr}: {e}")))?;
            tracing::info!(%addr, metrics, "admin server listening");
            listeners.push((listener, metrics));
        }
        let admin = Arc::new(self);
        for (listener, metrics) in listeners {
            tokio::spawn(accept_loop(listener, admin.clone(), metrics, cancel.clone()));
        }
        Ok(())
    }

    fn handle(&self, req: &Request<Incoming>, metrics: bool) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        match req.uri().path() {
            "/healthz" | "/livez" => checks(&self.live),
            "/readyz" => checks(&self.ready),
            "/metrics" if metrics => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, admin: Arc<Admin>, metrics: bool, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::net::AcceptBackoff::new("admin");
    loop {
        // Wait for a free slot before accepting: excess clients queue in
        // the kernel's backlog instead of holding file descriptors here.
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    backoff.succeeded();
                    s
                }
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(&req, metrics)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

fn checks(list: &[Check]) -> Response<Full<Bytes>> {
    let mut body = String::new();
    let mut ok = true;
    for (name, check) in list {
        match check() {
            Ok(()) => body.push_str(&format!("[+] {name} ok\n")),
            Err(reason) => {
                ok = false;
                body.push_str(&format!("[-] {name} failed: {reason}\n"));
            }
        }
    }
    body.push_str(if ok { "ok\n" } else { "failed\n" });
    text(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// The engines one process runs (`ferry node`): a part that fails to start
/// or stops before `cancel` fires is named in `/readyz` with why, and the
/// other parts keep running.
pub struct Parts {
    failures: Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>>,
    /// One watcher per started part, ending when the part does.
    watchers: Vec<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
}

impl Parts {
    pub fn new(cancel: CancellationToken) -> Parts {
        Parts {
            failures: Arc::default(),
            watchers: Vec::new(),
            cancel,
        }
    }

    /// `part` could not start (or stopped): logged and kept for `/readyz`.
    pub fn failed(&self, part: &'static str, why: String) {
        record(&self.failures, part, why);
    }

    /// `part` started; its end before `cancel` is recorded as a failure.
    pub fn started<E: std::fmt::Display + Send + 'static>(
        &mut self,
        part: &'static str,
        task: tokio::task::JoinHandle<Result<(), E>>,
    ) {
        let (failures, cancel) = (self.failures.clone(), self.cancel.clone());
        self.watchers.push(tokio::spawn(async move {
            let result = task.await;
            if cancel.is_cancelled() {
                return;
            }
            let why = match result {
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("task ended: {e}"),
            };
            record(&failures, part, why);
        }));
    }

    /// Registers the `/readyz` check that lists the failed parts.
    pub fn register(&self, admin: &mut Admin) {
        let failures = self.failures.clone();
        admin.readiness("parts", move || match failures.lock() {
            Ok(f) if f.is_empty() => Ok(()),
            Ok(f) => Err(f
                .iter()
                .map(|(p, why)| format!("{p}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")),
            Err(_) => Err("failure list poisoned".into()),
        });
    }

    /// The failures so far, when no part is running at all.
    pub fn none_running(&self) -> Option<String> {
        self.watchers
            .is_empty()
            .then(|| self.failures.lock().map(|f| format!("{f:?}")).unwrap_or_default())
    }

    /// Waits until every started part has ended.
    pub async fn wait(self) {
        for w in self.watchers {
            let _ = w.await;
        }
    }
}

fn record(
    failures: &std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
    part: &'static str,
    why: String,
) {
    tracing::error!(part, error = %why, "part failed; the others keep running");
    if let Ok(mut f) = failures.lock() {
        f.insert(part, why);
    }
}

/// Readiness check: ready once the first snapshot is published.
pub fn snapshot_ready(rx: crate::SnapshotRx) -> impl Fn() -> Result<(), String> + Send + Sync {
    move || match rx.borrow().as_ref() {
        Some(_) => Ok(()),
        None => Err("waiting for the first complete snapshot".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    async fn request(addr: SocketAddr, raw: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let ready = Arc::new(AtomicBool::new(false));
        let mut admin = Admin::default();
        let metrics = crate::ClusterMetrics::default();
        metrics.register(&mut admin.registry);
        metrics.source_error("files");
        let r = ready.clone();
        admin.readiness("snapshot", move || {
            if r.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("waiting".into())
            }
        });
        let addr = free_port();
        let probes = free_port();
        let cancel = CancellationToken::new();
        let addrs = AdminAddrs {
            all: Some(addr),
            probes: Some(probes),
        };
        admin.serve(addrs, cancel.clone()).await.unwrap();

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.contains("[-] snapshot failed: waiting"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(
            m.contains("ferry_cluster_source_errors_total{source=\"files\"} 1"),
            "{m}"
        );
        assert!(m.contains("ferry_cluster_snapshots_published_total 0"), "{m}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        // The probes listener answers probes, never metrics.
        assert!(get(probes, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(probes, "/metrics").await.starts_with("HTTP/1.1 404"));
        cancel.cancel();
    }

    fn free_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// An empty admin server on a free port: its address, and the token that stops it.
    async fn serve_empty() -> (SocketAddr, CancellationToken) {
        let addr = free_port();
        let cancel = CancellationToken::new();
        let addrs = AdminAddrs {
            all: Some(addr),
            probes: None,
        };
        Admin::default().serve(addrs, cancel.clone()).await.unwrap();
        (addr, cancel)
    }

    #[tokio::test]
    async fn only_get_and_head() {
        let (addr, cancel) = serve_empty().await;
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let r = request(
                addr,
                &format!("{method} /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 405"), "{method}: {r}");
            assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{method}: {r}");
        }
        let head = request(addr, "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        cancel.cancel();
    }

    /// A client that connects and never finishes its request head is
    /// dropped after HEADER_TIMEOUT (a 5 s wait).
    #[tokio::test]
    async fn a_silent_client_is_disconnected() {
        let (addr, cancel) = serve_empty().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(HEADER_TIMEOUT * 6, s.read_to_end(&mut buf)).await;
        let n = read.expect("the server closes a connection whose head never completes");
        // Closed (EOF, or a reset), with at most an error status written.
        if let Ok(n) = n {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
        }
        cancel.cancel();
    }
}
