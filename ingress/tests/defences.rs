//! Connection-level defences of the ingress (issue 14), probed as hostile
//! clients would: silent and idle connections, a client that never reads,
//! HTTP/2 reset floods, connection caps, path tricks, broken and stalled
//! request bodies, drain with idle clients. Real sockets on 127.0.0.1, short
//! limits through `Limits`; every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_ingress::metrics::{CloseLabels, RequestLabels};
use ferry_ingress::{EngineConfig, IngressMetrics, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::{backend, parse, CLASS};

/// The bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(300);

fn service(name: &str, backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-0, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n---\n",
        backend.port(),
        backend.ip()
    )
}

/// An Ingress for host `t.test` with `paths` as (path, service).
fn ingress(paths: &[(&str, &str)]) -> String {
    let mut y = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: t.test\n    http:\n      paths:\n".to_string();
    for (path, svc) in paths {
        y += &format!(
            "      - {{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n"
        );
    }
    y + "---\n"
}

struct Proxy {
    metrics: IngressMetrics,
    http: SocketAddr,
    https: SocketAddr,
    cancel: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(yaml: &str, limits: Limits, drain: Duration) -> Proxy {
        let mut config = EngineConfig {
            limits,
            workers: 2,
            ..EngineConfig::default()
        };
        config.drain_timeout = drain;
        config.upstream.connect_timeout = Duration::from_secs(2);
        let s = common::serve(config, parse(yaml)).await;
        Proxy {
            metrics: s.metrics,
            http: s.http,
            https: s.https,
            cancel: s.cancel,
            served: s.served,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.served).await.unwrap().unwrap();
    }

    fn closed(&self, reason: &'static str) -> u64 {
        self.metrics
            .connections_closed
            .get_or_create(&CloseLabels { reason })
            .get()
    }

    fn requests(&self, status: u16, host: &str, upstream: &str) -> u64 {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                host: host.into(),
                status,
                upstream: upstream.into(),
            })
            .get()
    }
}

fn short_limits() -> Limits {
    Limits {
        header_timeout: SHORT,
        keepalive_timeout: SHORT,
        send_timeout: SHORT,
        body_timeout: SHORT,
        tls_handshake_timeout: SHORT,
        ..Limits::default()
    }
}

/// Waits (bounded) until `cond` holds; false if it never did.
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..(WAIT.as_millis() / 10) {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Reads until the peer closes (true) or `WAIT` passes (false).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Writes `request` and reads the answer until the server closes it.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn one_backend_proxy(limits: Limits) -> (Proxy, CancellationToken) {
    let cancel = CancellationToken::new();
    let b = backend("backend", &cancel).await;
    let yaml = CLASS.to_string() + &service("s", b) + &ingress(&[("/", "s")]);
    (Proxy::start(&yaml, limits, Duration::from_secs(20)).await, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_idle_and_keepalive_connections_are_closed() {
    let (p, _backends) = one_backend_proxy(short_limits()).await;
    // Plain TCP that never sends a byte.
    let mut silent = TcpStream::connect(p.http).await.unwrap();
    assert!(closed_by_peer(&mut silent).await, "silent connection kept open");
    // Half a request head (slowloris).
    let mut partial = TcpStream::connect(p.http).await.unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: t.te").await.unwrap();
    assert!(closed_by_peer(&mut partial).await, "partial head kept open");
    // A TLS client that never starts its handshake.
    let mut tls_silent = TcpStream::connect(p.https).await.unwrap();
    assert!(closed_by_peer(&mut tls_silent).await, "silent TLS connection kept open");
    // HTTP/1.1 keep-alive after one answered request.
    let mut ka = TcpStream::connect(p.http).await.unwrap();
    ka.write_all(b"GET / HTTP/1.1\r\nHost: t.test\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(WAIT, ka.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_by_peer(&mut ka).await, "idle keep-alive connection kept open");
    // An idle h2c connection gets GOAWAY and is closed.
    let tcp = TcpStream::connect(p.http).await.unwrap();
    let (_send, conn) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::time::timeout(WAIT, conn).await;
    assert!(ended.is_ok(), "idle h2c connection kept open");
    // Counted as the server closes them (the client may see it first).
    assert!(
        eventually(|| p.closed("header_timeout") == 3).await,
        "{}",
        p.closed("header_timeout")
    );
    assert!(eventually(|| p.closed("keepalive_timeout") == 1).await);
    assert!(eventually(|| p.closed("tls_handshake_timeout") == 1).await);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_idle_connection_is_shed() {
    let limits = Limits {
        max_connections: 3,
        ..Limits::default()
    };
    let (p, _backends) = one_backend_proxy(limits).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(p.http).await.unwrap());
        // Distinct idle-since times, oldest first.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait until all three are registered (bounded).
    for _ in 0..200 {
        if p.metrics.open_connections.get() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = raw(p.http, b"GET / HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(p.metrics.connections_shed.get(), 1);
    assert!(
        closed_by_peer(&mut idle[0]).await,
        "the oldest idle connection was not shed"
    );
    p.stop().await;
}

/// A backend answering every request with a 64 MiB body, written until the
/// proxy stops reading; `released` is set when its socket write fails
/// (the proxy closed the upstream connection).
async fn huge_backend(released: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else { return };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let size = 64usize << 20;
        let ok = s
            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").as_bytes())
            .await;
        if ok.is_err() {
            return;
        }
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if s.write_all(&chunk).await.is_err() {
                released.store(true, Ordering::SeqCst);
                return;
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_the_upstream_released() {
    let released = Arc::new(AtomicBool::new(false));
    let b = huge_backend(released.clone()).await;
    let yaml = CLASS.to_string() + &service("s", b) + &ingress(&[("/", "s")]);
    let p = Proxy::start(&yaml, short_limits(), Duration::from_secs(20)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(p.http).await.unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: t.test\r\n\r\n")
        .await
        .unwrap();
    // Never read; wait (bounded) for the backend to see its connection closed.
    for _ in 0..(WAIT.as_millis() / 20) {
        if released.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released.load(Ordering::SeqCst), "the upstream connection stayed pinned");
    assert!(eventually(|| p.closed("send_timeout") == 1).await);
    p.stop().await;
}

/// An HTTP/1.1 backend counting the connections it accepts; answers 200
/// after 200 ms.
async fn counting_backend(accepted: Arc<AtomicUsize>, cancel: &CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counting = CountingListener(l, accepted);
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = cancel.cancelled() => return,
                s = counting.accept() => s,
            };
            let Some(s) = s else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    // Slow enough that a reset lands mid-request.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from(
                        "ok",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct CountingListener(TcpListener, Arc<AtomicUsize>);

impl CountingListener {
    async fn accept(&self) -> Option<TcpStream> {
        let (s, _) = self.0.accept().await.ok()?;
        self.1.fetch_add(1, Ordering::SeqCst);
        Some(s)
    }
}

/// Sends up to `max` HEADERS+RST_STREAM pairs on one h2c connection,
/// `pace` apart from HEADERS to RST (bounded by `WAIT`); returns the pairs
/// sent and how the connection ended.
async fn reset_flood(proxy: SocketAddr, pace: Option<Duration>, max: usize) -> (usize, Result<(), h2::Error>) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let pairs = tokio::time::timeout(WAIT, async {
        for i in 0..max {
            let Ok(ready) = send.clone().ready().await else {
                return i;
            };
            send = ready;
            let req = http::Request::get("http://t.test/").body(()).unwrap();
            let Ok((_resp, mut stream)) = send.send_request(req, false) else {
                return i;
            };
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
            stream.send_reset(h2::Reason::CANCEL);
        }
        max
    })
    .await
    .unwrap();
    let ended = tokio::time::timeout(WAIT, conn).await.unwrap().unwrap();
    (pairs, ended)
}

fn calmed(ended: &Result<(), h2::Error>) -> bool {
    match ended {
        Err(e) => e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io(),
        Ok(()) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_reset_flood_gets_goaway_enhance_your_calm() {
    let cancel = CancellationToken::new();
    let accepted = Arc::new(AtomicUsize::new(0));
    let b = counting_backend(accepted.clone(), &cancel).await;
    let yaml = CLASS.to_string() + &service("s", b) + &ingress(&[("/", "s")]);
    let budget = 50;
    let limits = Limits {
        max_cancelled_streams: budget,
        ..Limits::default()
    };
    let p = Proxy::start(&yaml, limits, Duration::from_secs(20)).await;

    // Paced: each stream is accepted (and its request started) before its
    // reset arrives; past the budget ferry closes the connection.
    let (pairs, ended) = reset_flood(p.http, Some(Duration::from_millis(3)), 1000).await;
    assert!(calmed(&ended), "after {pairs} pairs: {ended:?}");
    assert!(pairs < 1000, "never stopped");
    assert!(eventually(|| p.closed("too_many_cancelled_streams") == 1).await);
    let cancelled = p.requests(499, "t.test", "default/s:80");
    assert!(cancelled > budget as u64, "499s counted: {cancelled}");
    // At most one upstream connection per cancelled request of the budget.
    let opened = accepted.load(Ordering::SeqCst);
    assert!(
        opened <= budget + 5,
        "{opened} upstream connections for {pairs} reset streams"
    );

    // Back to back: resets arrive before the streams are accepted; h2's
    // pending-accept limit answers, and no request reaches an upstream.
    let before = accepted.load(Ordering::SeqCst);
    // (On a busy machine the client may write all its pairs before ferry
    // reads them; the connection still ends in GOAWAY.)
    let (pairs, ended) = reset_flood(p.http, None, 5000).await;
    assert!(calmed(&ended), "after {pairs} pairs: {ended:?}");
    let opened = accepted.load(Ordering::SeqCst) - before;
    assert!(
        opened <= budget + 5,
        "{opened} upstream connections for {pairs} reset streams"
    );
    p.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_forwarding_use_the_normalized_path() {
    let cancel = CancellationToken::new();
    let admin = backend("admin-backend", &cancel).await;
    let public = backend("public-backend", &cancel).await;
    let yaml = CLASS.to_string()
        + &service("admin", admin)
        + &service("public", public)
        + &ingress(&[("/admin", "admin"), ("/", "public")]);
    let p = Proxy::start(&yaml, Limits::default(), Duration::from_secs(20)).await;
    let cases = [
        ("/public/../admin/x", 200, "admin-backend", "GET /admin/x "),
        ("//admin/x", 200, "admin-backend", "GET /admin/x "),
        ("/%61dmin/x?q=%2e", 200, "admin-backend", "GET /admin/x?q=%2e "),
        ("/./admin/x", 200, "admin-backend", "GET /admin/x "),
        ("/admin/../public", 200, "public-backend", "GET /public "),
        ("/admin%2Fx", 200, "public-backend", "GET /admin%2Fx "),
        ("/../admin/x", 400, "", ""),
        ("/a/%zz", 400, "", ""),
    ];
    for (path, status, backend, forwarded) in cases {
        let answer = raw(
            p.http,
            format!("GET {path} HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&answer), status, "{path}: {answer}");
        assert!(answer.contains(backend), "{path}: {answer}");
        assert!(answer.contains(forwarded), "{path}: {answer}");
    }
    p.stop().await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_are_4xx_and_never_the_upstreams() {
    let (p, _backends) = one_backend_proxy(short_limits()).await;
    // An invalid chunk size: 400, not 502.
    let answer = raw(
        p.http,
        b"POST / HTTP/1.1\r\nHost: t.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    // A body that stops coming: 408, not 504.
    let mut s = TcpStream::connect(p.http).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: t.test\r\nContent-Length: 100\r\n\r\nonly-a-little")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&answer), 408, "{answer}");
    // Two Host headers: 400. CONNECT: 405.
    let answer = raw(p.http, b"GET / HTTP/1.1\r\nHost: t.test\r\nHost: other.test\r\n\r\n").await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    let answer = raw(p.http, b"CONNECT t.test:443 HTTP/1.1\r\nHost: t.test:443\r\n\r\n").await;
    assert_eq!(status_of(&answer), 405, "{answer}");
    assert_eq!(p.requests(400, "t.test", "default/s:80"), 1);
    assert_eq!(p.requests(408, "t.test", "default/s:80"), 1);
    assert_eq!(p.metrics.retries.get(), 0);
    assert_eq!(p.metrics.ejections.get(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_does_not_wait_for_idle_clients() {
    // Long idle limits and a long drain: only the drain's GOAWAY/close of
    // idle connections can make `serve` return in time.
    let limits = Limits {
        header_timeout: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let (p, _backends) = one_backend_proxy(limits).await;
    let tcp = TcpStream::connect(p.http).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let h2_conn = tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(http::Request::get("http://t.test/").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(tokio::time::timeout(WAIT, resp).await.unwrap().unwrap().status(), 200);
    let mut silent = TcpStream::connect(p.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    p.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), p.served)
        .await
        .expect("drain waited for idle clients")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(closed_by_peer(&mut silent).await);
    let _ = tokio::time::timeout(WAIT, h2_conn).await.unwrap();
}
