//! `ferry echo`: a small HTTP server for demos, tests and benchmarks.
//!
//! Answers every request with the configured body and, unless disabled,
//! what it received (method, path, version, headers), so a test can see
//! what the proxy forwarded. Speaks HTTP/1.1 and HTTP/2 (also h2c with
//! prior knowledge), and echoes WebSocket messages on an `Upgrade`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// What the echo server answers.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// First line of every answer (e.g. the pod name in the demo).
    pub body: String,
    /// Append the request line, headers and body size after the body.
    pub request_info: bool,
}

/// Serves `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, config: EchoConfig, cancel: CancellationToken) {
    let config = Arc::new(config);
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "echo accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let config = config.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let config = config.clone();
                async move { Ok::<_, Infallible>(answer(req, peer, &config).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn is_websocket(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn answer(mut req: Request<Incoming>, peer: SocketAddr, config: &EchoConfig) -> Response<Full<Bytes>> {
    if is_websocket(&req) {
        return websocket(&mut req, config.body.clone());
    }
    let mut text = String::with_capacity(config.body.len() + 256);
    text.push_str(&config.body);
    text.push('\n');
    if config.request_info {
        let _ = writeln!(text, "{} {} {:?}", req.method(), req.uri(), req.version());
        let _ = writeln!(text, "peer: {peer}");
        for (k, v) in req.headers() {
            let _ = writeln!(text, "{k}: {}", String::from_utf8_lossy(v.as_bytes()));
        }
    }
    let (_, body) = req.into_parts();
    let received = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    if config.request_info {
        let _ = writeln!(text, "body-bytes: {received}");
    }
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Completes the WebSocket handshake and echoes messages on the upgraded
/// connection; the first message sent is the configured body.
fn websocket(req: &mut Request<Incoming>, greeting: String) -> Response<Full<Bytes>> {
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing sec-websocket-key\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "echo websocket upgrade failed");
                return;
            }
        };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if ws.send(greeting.into()).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
