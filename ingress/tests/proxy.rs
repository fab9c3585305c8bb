//! Loopback integration tests of the ingress engine: real listeners, real
//! echo backends, real hyper/rustls/WebSocket clients. Everything binds
//! 127.0.0.1 port 0 and talks only to 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_cluster::{Object, ObjectKey, Secret, Snapshot};
use ferry_ingress::{ClassSelection, Engine, EngineConfig, IngressMetrics};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::{backend, parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A port with nothing listening (bound, then closed).
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A Service `name` with one EndpointSlice per backend (each slice has its
/// own port, so many loopback backends can share 127.0.0.1).
fn service(name: &str, backends: &[SocketAddr], app_protocol: Option<&str>) -> String {
    let app = app_protocol.map(|a| format!(", appProtocol: {a}")).unwrap_or_default();
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080{app}}}]\n---\n"
    );
    for (i, b) in backends.iter().enumerate() {
        y += &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{i}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  targetRef: {{kind: Pod, name: {name}-pod-{i}}}\n---\n",
            b.port(),
            b.ip()
        );
    }
    y
}

fn ingress(name: &str, host: &str, path: &str, svc: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n---\n"
    )
}

struct Proxy {
    engine: Engine,
    metrics: IngressMetrics,
    http: SocketAddr,
    https: SocketAddr,
    cancel: CancellationToken,
    served: tokio::task::JoinHandle<()>,
    generation: AtomicUsize,
}

impl Proxy {
    async fn start(objects: Vec<Object>) -> Proxy {
        let config = EngineConfig {
            classes: ClassSelection::default(),
            ..EngineConfig::default()
        };
        let mut config = config;
        config.upstream.connect_timeout = Duration::from_secs(2);
        config.drain_timeout = Duration::from_secs(10);
        let s = common::serve(config, objects).await;
        Proxy {
            engine: s.engine,
            metrics: s.metrics,
            http: s.http,
            https: s.https,
            cancel: s.cancel,
            served: s.served,
            generation: AtomicUsize::new(1),
        }
    }

    fn reload(&self, objects: Vec<Object>) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) as u64 + 1;
        self.engine.apply(&Snapshot::from_objects(g, objects));
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(TIMEOUT, self.served).await.unwrap().unwrap();
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET through the proxy with `Host: host`; returns (status, body).
async fn get(client: &HttpClient, proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let req = Request::get(format!("http://{proxy}{path}"))
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A proxy with one echo backend answering `body` behind Service `s`,
/// routed for `host` by an Ingress with `annotations`.
async fn proxy_for(host: &str, body: &str, annotations: &str) -> (Proxy, CancellationToken) {
    let cancel = CancellationToken::new();
    let b = backend(body, &cancel).await;
    let yaml = CLASS.to_string() + &service("s", &[b], None) + &ingress("i", host, "/", "s", annotations);
    (Proxy::start(parse(&yaml)).await, cancel)
}

/// An HTTP/1.1 client connection to `proxy`.
async fn h1_client<B>(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends `req` on `send`; returns (status, body as text).
async fn send_text<B>(send: &mut hyper::client::conn::http1::SendRequest<B>, req: Request<B>) -> (u16, String)
where
    B: hyper::body::Body + Send + 'static,
{
    let resp = tokio::time::timeout(TIMEOUT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn first_line(body: &str) -> &str {
    body.lines().next().unwrap_or("")
}

#[tokio::test]
async fn round_robin_over_three_backends() {
    let cancel = CancellationToken::new();
    let b = [
        backend("one", &cancel).await,
        backend("two", &cancel).await,
        backend("three", &cancel).await,
    ];
    let yaml = CLASS.to_string() + &service("s", &b, None) + &ingress("i", "rr.test", "/", "s", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let (status, body) = get(&c, proxy.http, "rr.test", "/x").await;
        assert_eq!(status, 200);
        *counts.entry(first_line(&body).to_string()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (k, v) in &counts {
        assert!(*v >= 25, "{k} got {v}: {counts:?}");
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn not_found_and_503_without_endpoints() {
    let yaml = CLASS.to_string() + &service("empty", &[], None) + &ingress("i", "empty.test", "/", "empty", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    let c = client();
    let (status, body) = get(&c, proxy.http, "empty.test", "/").await;
    assert_eq!(status, 503);
    assert_eq!(body, "503 service unavailable\n");
    let (status, body) = get(&c, proxy.http, "nobody.test", "/").await;
    assert_eq!(status, 404);
    assert!(!body.contains("empty"), "404 body must not reveal internals: {body}");
    proxy.stop().await;
}

/// Sends `request` on a new connection and returns everything the proxy
/// answers until it closes the connection.
async fn raw(proxy: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(proxy).await.unwrap();
    // The proxy may answer and close before it has read an oversized head.
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the proxy never closed: {}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Plain pipelined GETs stay on ferry's HTTP/1.1 path (answered in order,
/// no connection handed to hyper); a request with a body hands its
/// connection to hyper, which answers it and what follows; conflicting
/// framing is refused and counted.
#[tokio::test]
async fn plain_requests_stay_on_the_lean_path_and_bodies_go_to_hyper() {
    let (proxy, cancel) = proxy_for("h.test", "hdr", "").await;
    let get = |path: &str, last: bool| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: h.test\r\n{}\r\n",
            if last { "Connection: close\r\n" } else { "" }
        )
    };
    let pipelined = get("/a", false) + &get("/b", false) + &get("/c", true);
    let out = raw(proxy.http, pipelined.as_bytes()).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    let (a, b, c) = (
        out.find("GET /a").unwrap(),
        out.find("GET /b").unwrap(),
        out.find("GET /c").unwrap(),
    );
    assert!(a < b && b < c, "answered in order: {out}");
    assert!(out.contains("connection: close"), "{out}");
    assert_eq!(proxy.metrics.hyper_connections.get(), 0);

    let post = "POST /p HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5\r\n\r\nhello".to_string() + &get("/after", true);
    let out = raw(proxy.http, post.as_bytes()).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains("POST /p") && out.contains("GET /after"), "{out}");
    assert_eq!(proxy.metrics.hyper_connections.get(), 1);

    // httparse takes `<` in a target, `http` does not: hyper answers that
    // head (400, then closes); the request after it is not answered in
    // its place.
    let odd_target = "GET /a<b HTTP/1.1\r\nHost: h.test\r\n\r\n".to_string() + &get("/next", true);
    let out = raw(proxy.http, odd_target.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(!out.contains("GET /next"), "{out}");

    let conflicting =
        "GET /x HTTP/1.1\r\nHost: h.test\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let out = raw(proxy.http, conflicting.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert_eq!(proxy.metrics.http1_framing_refused.get(), 1);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn missing_host_is_400_and_an_oversized_head_431() {
    let cancel = CancellationToken::new();
    let b = backend("dflt", &cancel).await;
    let default_backend = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: d}\nspec:\n  ingressClassName: ferry\n  defaultBackend: {service: {name: s, port: {number: 80}}}\n---\n";
    let yaml = CLASS.to_string() + &service("s", &[b], None) + default_backend;
    let proxy = Proxy::start(parse(&yaml)).await;
    // Any host reaches the default backend...
    let ok = raw(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: any.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("dflt"), "{ok}");
    // ...but an HTTP/1.1 request without one, or with an empty one, is malformed.
    for req in [
        &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    ] {
        let resp = raw(proxy.http, req).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(!resp.contains("dflt"), "{resp}");
    }
    // HTTP/1.0 needs no Host.
    let old = raw(proxy.http, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200") && old.contains("dflt"), "{old}");
    // A 32 KiB header passes; a head over 64 KiB is refused, not forwarded.
    let big = |n: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: any.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(n)
        )
    };
    let fine = raw(proxy.http, big(32 * 1024).as_bytes()).await;
    assert!(fine.starts_with("HTTP/1.1 200"), "{}", &fine[..fine.len().min(200)]);
    let refused = raw(proxy.http, big(70 * 1024).as_bytes()).await;
    assert!(
        refused.starts_with("HTTP/1.1 431"),
        "{}",
        &refused[..refused.len().min(200)]
    );
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn request_bodies_reach_the_backend_whole() {
    let (proxy, cancel) = proxy_for("b.test", "body", "").await;
    let mut send = h1_client(proxy.http).await;
    // 1 MiB with a Content-Length, larger than any buffer on the way.
    let req = Request::post("/upload")
        .header("host", "b.test")
        .body(http_body_util::Either::Left(Full::new(Bytes::from(vec![7u8; 1 << 20]))))
        .unwrap();
    let (status, body) = send_text(&mut send, req).await;
    assert_eq!(status, 200);
    assert!(body.contains("POST /upload HTTP/1.1"), "{body}");
    assert!(body.contains("body-bytes: 1048576"), "{body}");
    // A chunked body of unknown length, sent in 100 pieces, on the same connection.
    let chunks = futures::stream::iter(
        (0..100).map(|_| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![1u8; 3000])))),
    );
    let req = Request::put("/stream")
        .header("host", "b.test")
        .body(http_body_util::Either::Right(http_body_util::StreamBody::new(chunks)))
        .unwrap();
    let (status, body) = send_text(&mut send, req).await;
    assert_eq!(status, 200);
    assert!(body.contains("PUT /stream HTTP/1.1"), "{body}");
    assert!(body.contains("body-bytes: 300000"), "{body}");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn bodies_over_the_annotated_limit_get_413() {
    let (proxy, cancel) = proxy_for("small.test", "body", "nginx.org/client-max-body-size: 1k").await;
    let mut send = h1_client(proxy.http).await;
    let full = |n: usize| Full::new(Bytes::from(vec![7u8; n]));
    // Within the limit: proxied.
    let req = Request::post("/up")
        .header("host", "small.test")
        .body(full(1024))
        .unwrap();
    let (status, body) = send_text(&mut send, req).await;
    assert_eq!(status, 200);
    assert!(body.contains("body-bytes: 1024"), "{body}");
    // A declared length over it: refused before any upstream is involved.
    let req = Request::post("/up")
        .header("host", "small.test")
        .body(full(1025))
        .unwrap();
    assert_eq!(send_text(&mut send, req).await.0, 413);
    // A chunked body that passes it on the way.
    let mut send = h1_client(proxy.http).await;
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![1u8; 400])))),
    );
    let req = Request::put("/up")
        .header("host", "small.test")
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    assert_eq!(send_text(&mut send, req).await.0, 413);
    proxy.stop().await;
    cancel.cancel();
}

/// Host, `X-Forwarded-*` and hop-by-hop headers as the upstream sees them;
/// with hop-by-hop headers (the header-map path) and without (the lean
/// client's one-pass head, `encode_forwarded`).
#[tokio::test]
async fn forwarded_headers_host_and_hop_by_hop() {
    let (proxy, cancel) = proxy_for("h.test", "hdr", "").await;
    let mut send = h1_client(proxy.http).await;
    let with_hop_by_hop = [("connection", "keep-alive, x-private"), ("x-private", "secret")];
    let without = [("x-forwarded-host", "evil.test"), ("x-custom", "kept")];
    for extra in [&with_hop_by_hop, &without] {
        let mut req = Request::get("/path?q=1")
            .header("host", "H.test:8080")
            .header("x-forwarded-for", "192.0.2.9")
            .header("x-real-ip", "192.0.2.66");
        for (n, v) in extra {
            req = req.header(*n, *v);
        }
        let (status, body) = send_text(&mut send, req.body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(status, 200);
        assert!(body.contains("GET /path?q=1 HTTP/1.1"), "{body}");
        assert!(body.contains("host: H.test:8080"), "{body}");
        assert!(body.contains("x-forwarded-for: 192.0.2.9, 127.0.0.1"), "{body}");
        assert!(body.contains("x-real-ip: 127.0.0.1\n"), "{body}");
        assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
        assert!(body.contains("x-forwarded-host: H.test:8080"), "{body}");
        assert!(
            body.contains(&format!("x-forwarded-port: {}", proxy.http.port())),
            "{body}"
        );
        assert!(
            !body.contains("192.0.2.66"),
            "a client's own X-Real-IP is replaced: {body}"
        );
        assert!(
            !body.contains("evil.test"),
            "a client's own X-Forwarded-Host is replaced: {body}"
        );
        assert!(!body.contains("x-private") && !body.contains("keep-alive"), "{body}");
        if extra == &without {
            assert!(body.contains("x-custom: kept"), "{body}");
        }
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn retry_past_a_dead_endpoint_and_eject_it() {
    let cancel = CancellationToken::new();
    let dead = dead_port().await;
    let b = [
        dead,
        backend("alive-1", &cancel).await,
        backend("alive-2", &cancel).await,
    ];
    let yaml = CLASS.to_string() + &service("s", &b, None) + &ingress("i", "retry.test", "/", "s", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    let c = client();
    for _ in 0..30 {
        let (status, body) = get(&c, proxy.http, "retry.test", "/").await;
        assert_eq!(status, 200, "{body}");
        assert!(first_line(&body).starts_with("alive-"));
    }
    assert!(proxy.metrics.retries.get() >= 1);
    assert_eq!(proxy.metrics.ejections.get(), 1, "ejected once, then skipped");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn endpoint_removal_takes_effect_without_dropping_connections() {
    let cancel = CancellationToken::new();
    let a = backend("a", &cancel).await;
    let b = backend("b", &cancel).await;
    let both = CLASS.to_string() + &service("s", &[a, b], None) + &ingress("i", "rm.test", "/", "s", "");
    let proxy = Proxy::start(parse(&both)).await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(first_line(&get(&c, proxy.http, "rm.test", "/").await.1).to_string());
    }
    assert!(
        seen.contains(&"a".to_string()) && seen.contains(&"b".to_string()),
        "{seen:?}"
    );
    // Same client (kept-alive connection to the proxy) across the reload.
    proxy.reload(parse(
        &(CLASS.to_string() + &service("s", &[a], None) + &ingress("i", "rm.test", "/", "s", "")),
    ));
    for _ in 0..20 {
        let (status, body) = get(&c, proxy.http, "rm.test", "/").await;
        assert_eq!((status, first_line(&body)), (200, "a"));
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn config_changes_during_ten_seconds_of_load_fail_nothing() {
    let cancel = CancellationToken::new();
    let backends = [
        backend("l1", &cancel).await,
        backend("l2", &cancel).await,
        backend("l3", &cancel).await,
    ];
    let config = |n: usize, path: &str| {
        CLASS.to_string()
            + &service("s", &backends[..n], None)
            + &ingress("i", "load.test", "/", "s", "")
            + &ingress("j", "load.test", path, "s", "")
    };
    let proxy = Arc::new(Proxy::start(parse(&config(3, "/a"))).await);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (proxy, stop, ok) = (proxy.clone(), stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            // Bounded in count as well as time.
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (status, body) = get(&c, proxy.http, "load.test", "/a/b").await;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.push((status, body));
                }
            }
            failures
        }));
    }
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < Duration::from_secs(10) {
        i += 1;
        proxy.reload(parse(&config(1 + i % 3, if i.is_multiple_of(2) { "/a" } else { "/b" })));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failures = tokio::time::timeout(TIMEOUT, c).await.unwrap().unwrap();
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "only {} requests",
        ok.load(Ordering::Relaxed)
    );
    assert!(i > 10);
    Arc::try_unwrap(proxy).ok().unwrap().stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let cancel = CancellationToken::new();
    let b = backend("ws-backend", &cancel).await;
    let yaml = CLASS.to_string() + &service("s", &[b], None) + &ingress("i", "ws.test", "/", "s", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let greeting = tokio::time::timeout(TIMEOUT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(greeting.into_text().unwrap().as_str(), "ws-backend");
    // A reload while the WebSocket is open does not disturb it.
    proxy.reload(parse(&yaml));
    for i in 0..5 {
        let msg = format!("hello {i}");
        ws.send(msg.clone().into()).await.unwrap();
        let back = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn http2_clients_and_h2c_upstream() {
    let cancel = CancellationToken::new();
    let plain = backend("h1-backend", &cancel).await;
    let grpc = backend("h2c-backend", &cancel).await;
    let yaml = CLASS.to_string()
        + &service("web", &[plain], None)
        + &service("grpc", &[grpc], Some("kubernetes.io/h2c"))
        + &ingress("web", "h2.test", "/", "web", "")
        + &ingress("grpc", "grpc.test", "/", "grpc", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    // HTTP/2 with prior knowledge to the plain listener.
    for (host, want_first, want_upstream_version) in [
        ("h2.test", "h1-backend", "HTTP/1.1"),
        ("grpc.test", "h2c-backend", "HTTP/2.0"),
    ] {
        // `:authority` is the virtual host; the connection goes to the proxy.
        let tcp = TcpStream::connect(proxy.http).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("http://{host}/svc/Method"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(TIMEOUT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert_eq!(first_line(&body), want_first, "{body}");
        assert!(body.contains(&format!("/svc/Method {want_upstream_version}")), "{body}");
    }
    proxy.stop().await;
    cancel.cancel();
}

fn tls_secret(name: &str, host: &str) -> (Object, rcgen::CertifiedKey<rcgen::KeyPair>) {
    let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
    let obj = Object::Secret(std::sync::Arc::new(Secret {
        key: ObjectKey::new("default", name),
        type_: "kubernetes.io/tls".into(),
        data: [
            ("tls.crt".to_string(), ck.cert.pem().into_bytes()),
            ("tls.key".to_string(), ck.signing_key.serialize_pem().into_bytes()),
        ]
        .into(),
    }));
    (obj, ck)
}

fn tls_ingress(name: &str, host: &str, secret: &str, svc: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}}}\nspec:\n  ingressClassName: ferry\n  tls: [{{hosts: [{host}], secretName: {secret}}}]\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}\n---\n"
    )
}

/// TLS-connects to the proxy with `sni`, trusting `roots`; returns the
/// leaf certificate served and the negotiated ALPN protocol.
async fn tls_connect(
    proxy: SocketAddr,
    sni: &str,
    roots: &[&[u8]],
    alpn: &[&[u8]],
) -> (Vec<u8>, Option<Vec<u8>>, tokio_rustls::client::TlsStream<TcpStream>) {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            store.add(cert.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    (leaf, alpn, tls)
}

#[tokio::test]
async fn sni_picks_the_certificate_and_serves_h1_and_h2() {
    let cancel = CancellationToken::new();
    let b = backend("tls-backend", &cancel).await;
    let (sa, ca) = tls_secret("a-tls", "a.test");
    let (sb, cb) = tls_secret("b-tls", "b.test");
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &tls_ingress("a", "a.test", "a-tls", "s")
        + &tls_ingress("b", "b.test", "b-tls", "s");
    let mut objects = parse(&yaml);
    objects.push(sa);
    objects.push(sb);
    let proxy = Proxy::start(objects).await;
    let (pa, pb) = (ca.cert.pem(), cb.cert.pem());
    let certs = proxy.engine.certs();
    assert_eq!(certs.hosts(), vec!["a.test", "b.test"], "{:?}", certs.problems);
    let default_pem = proxy.engine.default_cert_pem().to_string();

    let (leaf, alpn, tls) = tls_connect(proxy.https, "a.test", &[pa.as_bytes()], &[b"h2"]).await;
    assert_eq!(leaf, ca.cert.der().to_vec());
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://a.test/secure")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(first_line(&body), "tls-backend");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    let (leaf, alpn, tls) = tls_connect(proxy.https, "b.test", &[pb.as_bytes()], &[b"http/1.1"]).await;
    assert_eq!(leaf, cb.cert.der().to_vec());
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "b.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);

    // Unknown names get the default (generated) certificate.
    let (leaf, _, _) = tls_connect(proxy.https, "localhost", &[default_pem.as_bytes()], &[]).await;
    let default_der = rustls_pemfile::certs(&mut default_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(leaf, default_der.to_vec());

    // curl with --resolve and --cacert, as a user would.
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("a.pem");
    std::fs::write(&ca_path, &pa).unwrap();
    let port = proxy.https.port();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &format!("a.test:{port}:127.0.0.1"),
            "--cacert",
        ])
        .arg(&ca_path)
        .arg(format!("https://a.test:{port}/curl"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(first_line(&String::from_utf8_lossy(&out.stdout)), "tls-backend");

    // Hot reload: b.test's secret replaced by a new certificate.
    let (sb2, cb2) = tls_secret("b-tls", "b.test");
    let mut objects = parse(&yaml);
    objects.push(sb2);
    proxy.reload(objects);
    let pb2 = cb2.cert.pem();
    let (leaf, _, _) = tls_connect(proxy.https, "b.test", &[pb2.as_bytes()], &[]).await;
    assert_eq!(leaf, cb2.cert.der().to_vec());
    // a-tls vanished with that reload: a.test falls back to the default.
    // (A client would reject that certificate for a.test, so check the store.)
    let served = proxy.engine.certs().resolve(Some("a.test"));
    assert_eq!(served.cert[0].to_vec(), default_der.to_vec());
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn plain_http_to_a_tls_host_gets_a_308_to_https() {
    let cancel = CancellationToken::new();
    let b = backend("tls-backend", &cancel).await;
    let (sa, ca) = tls_secret("a-tls", "a.test");
    let off = tls_ingress("off", "off.test", "a-tls", "s").replace(
        "metadata: {name: off}",
        "metadata: {name: off, annotations: {nginx.ingress.kubernetes.io/ssl-redirect: \"false\"}}",
    );
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &tls_ingress("a", "a.test", "a-tls", "s")
        + &off
        + &ingress("plain", "plain.test", "/", "s", "");
    let mut objects = parse(&yaml);
    objects.push(sa);
    let proxy = Proxy::start(objects).await;
    let c = client();
    let https_port = proxy.https.port();

    let req = Request::post(format!("http://{}/pay?x=1", proxy.http))
        .header("host", "a.test:8080")
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, c.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 308, "a TLS host over plain HTTP");
    let location = resp.headers().get("location").unwrap().to_str().unwrap().to_string();
    assert_eq!(location, format!("https://a.test:{https_port}/pay?x=1"));

    // Following it reaches the backend over TLS.
    let pem = ca.cert.pem();
    let (_, _, tls) = tls_connect(proxy.https, "a.test", &[pem.as_bytes()], &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/pay?x=1")
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);

    // ACME HTTP-01 challenges, a host whose Ingress turns the redirect off,
    // and a host without TLS are proxied over plain HTTP.
    let (status, body) = get(&c, proxy.http, "a.test", "/.well-known/acme-challenge/token").await;
    assert_eq!((status, first_line(&body)), (200, "tls-backend"));
    let (status, _) = get(&c, proxy.http, "off.test", "/").await;
    assert_eq!(status, 200);
    let (status, _) = get(&c, proxy.http, "plain.test", "/").await;
    assert_eq!(status, 200);
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn drain_lets_in_flight_requests_finish() {
    // A backend that answers after a pause, so the request is in flight
    // when shutdown starts.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"slow done"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let yaml = CLASS.to_string() + &service("s", &[slow], None) + &ingress("i", "slow.test", "/", "s", "");
    let proxy = Proxy::start(parse(&yaml)).await;
    let addr = proxy.http;
    let inflight = tokio::spawn(async move { get(&client(), addr, "slow.test", "/").await });
    // Wait until the proxy has the request (bounded poll).
    let deadline = Instant::now() + TIMEOUT;
    while proxy.metrics.open_connections.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.stop().await;
    let (status, body) = tokio::time::timeout(TIMEOUT, inflight).await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "slow done"));
    // New connections are refused after the drain.
    assert!(TcpStream::connect(addr).await.is_err());
}
