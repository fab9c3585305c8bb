//! The admin HTTP server: `/healthz`, `/readyz` and `/metrics`.
//!
//! Engines register their metrics in one prometheus-client `Registry` and
//! add named checks; the server only reads them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// A named check: `Ok` when fine, `Err(reason)` otherwise.
pub type Check = (String, Box<dyn Fn() -> Result<(), String> + Send + Sync>);

#[derive(Default)]
pub struct Admin {
    pub registry: Registry,
    live: Vec<Check>,
    ready: Vec<Check>,
}

impl Admin {
    #[allow(dead_code)] // used by engines that can become unhealthy (proxy sync loop)
    pub fn liveness(&mut self, name: &str, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.live.push((name.to_string(), Box::new(check)));
    }

    pub fn readiness(&mut self, name: &str, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.ready.push((name.to_string(), Box::new(check)));
    }

    /// Binds and serves until cancelled.
    pub async fn serve(self, addr: SocketAddr, cancel: CancellationToken) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "admin server listening");
        let admin = Arc::new(self);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(e) => { tracing::warn!(error = %e, "admin accept"); continue; }
                    },
                };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let admin = admin.clone();
                        async move { Ok::<_, Infallible>(admin.handle(req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(())
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/healthz" | "/livez" => checks(&self.live),
            "/readyz" => checks(&self.ready),
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                        }
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
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

/// Readiness check: ready once the first snapshot is published.
pub fn snapshot_ready(rx: ferry_cluster::SnapshotRx) -> impl Fn() -> Result<(), String> + Send + Sync {
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
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let ready = Arc::new(AtomicBool::new(false));
        let mut admin = Admin::default();
        let metrics = ferry_cluster::ClusterMetrics::default();
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
        // Find a free port, then serve on it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cancel = CancellationToken::new();
        admin.serve(addr, cancel.clone()).await.unwrap();

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
        cancel.cancel();
    }
}
