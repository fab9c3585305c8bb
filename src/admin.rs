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
