//! Loopback integration tests of the access-control annotations: source
//! allow/deny lists (clients bound to different 127.0.0.x addresses),
//! basic auth with each hash kind, external auth against a small auth
//! server, CORS, rate limits. Backends count what reaches them, so a
//! refused request that leaked would show. Everything binds and talks to
//! 127.0.0.0/8 only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use ferry_cluster::Snapshot;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod common;
use common::service;
use common::{parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);
const P: &str = "nginx.ingress.kubernetes.io/";

/// An Ingress `name` routing `host` to Service `svc` with these
/// annotations (names without the ingress-nginx prefix).
fn ingress(name: &str, host: &str, svc: &str, annotations: &[(&str, &str)]) -> String {
    let ann: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{P}{k}: {}", serde_json::to_string(v).unwrap()))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n---\n",
        ann.join(", ")
    )
}

fn secret(name: &str, data: &[(&str, &str)]) -> String {
    let d: Vec<String> = data
        .iter()
        .map(|(k, v)| format!("{k}: {}", serde_json::to_string(v).unwrap()))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: Opaque\nstringData: {{{}}}\n---\n",
        d.join(", ")
    )
}

/// A backend counting the requests that reach it and answering with the
/// headers it got (`name: value` lines). `/slow` waits for `release`.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    arrived: Arc<Notify>,
    release: Arc<Notify>,
}

async fn backend(cancel: &CancellationToken) -> Backend {
    let hits = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (h, a, r) = (hits.clone(), arrived.clone(), release.clone());
    let addr = serve(cancel, move |req: Request<Incoming>| {
        let (h, a, r) = (h.clone(), a.clone(), r.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if req.uri().path() == "/slow" {
                a.notify_one();
                r.notified().await;
            }
            let mut body = String::new();
            for (n, v) in req.headers() {
                body += &format!("{n}: {}\n", v.to_str().unwrap_or("?"));
            }
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                "access-control-allow-origin",
                "https://upstream.invalid".parse().unwrap(),
            );
            resp
        }
    })
    .await;
    Backend {
        addr,
        hits,
        arrived,
        release,
    }
}

/// Serves `handler` on 127.0.0.1:0 until `cancel`.
async fn serve<F, Fut>(cancel: &CancellationToken, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

/// Sends `req` to `proxy` on a new connection from source address `src`.
async fn send(src: &str, proxy: SocketAddr, req: Request<Empty<Bytes>>) -> Reply {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let stream = tokio::time::timeout(TIMEOUT, socket.connect(proxy))
        .await
        .unwrap()
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn req(host: &str, path: &str) -> http::request::Builder {
    Request::get(path).header("host", host)
}

fn get(host: &str, path: &str) -> Request<Empty<Bytes>> {
    req(host, path).body(Empty::new()).unwrap()
}

async fn start(yaml: &str) -> common::Serving {
    let config = common::test_config();
    common::serve(config, parse(&(CLASS.to_string() + yaml))).await
}

#[tokio::test]
async fn allow_and_deny_lists_by_source_address() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    let yaml = service("s", &[b.addr], None)
        + &ingress(
            "i",
            "lists.test",
            "s",
            &[
                ("whitelist-source-range", "127.0.0.2/32, 127.0.0.3"),
                ("denylist-source-range", "127.0.0.3/32"),
            ],
        );
    let s = start(&yaml).await;
    for (src, want) in [
        ("127.0.0.1", 403),
        ("127.0.0.2", 200),
        ("127.0.0.3", 403),
        ("127.0.0.4", 403),
    ] {
        let r = send(src, s.http, get("lists.test", "/")).await;
        assert_eq!(r.status, want, "{src}: {}", r.body);
    }
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1,
        "only the allowed request reaches the backend"
    );
    s.stop().await;
    cancel.cancel();
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn basic_auth_with_each_hash_kind() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    let bcrypt_hash = bcrypt::hash_with_salt("pw-b", 4, [3u8; 16])
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    // apr1 and {SHA} lines as `htpasswd -m` / `htpasswd -s` write them
    // (apr1 of "secret" with salt xyz12345; SHA1 of "secret").
    let htpasswd = format!(
        "bcrypt:{bcrypt_hash}\napr:$apr1$xyz12345$hVFg3wOytQE97CWCezCu2/\nsha:{{SHA}}5en6G6MezRroT3XKqkdPOmY/BfQ=\n"
    );
    let yaml = service("s", &[b.addr], None)
        + &secret("users", &[("auth", &htpasswd)])
        + &secret("map", &[("carol", "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=")])
        + &ingress(
            "i",
            "basic.test",
            "s",
            &[
                ("auth-type", "basic"),
                ("auth-secret", "users"),
                ("auth-realm", "Staff only"),
            ],
        )
        + &ingress(
            "m",
            "map.test",
            "s",
            &[
                ("auth-type", "basic"),
                ("auth-secret", "default/map"),
                ("auth-secret-type", "auth-map"),
            ],
        );
    let s = start(&yaml).await;
    assert!(s.engine.table().problems.is_empty(), "{:?}", s.engine.table().problems);

    let r = send("127.0.0.1", s.http, get("basic.test", "/")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Basic realm=\"Staff only\"");
    for (user, good, bad) in [
        ("bcrypt", "pw-b", "pw"),
        ("apr", "secret", "Secret"),
        ("sha", "secret", ""),
    ] {
        let wrong = req("basic.test", "/")
            .header("authorization", basic(user, bad))
            .body(Empty::new())
            .unwrap();
        assert_eq!(send("127.0.0.1", s.http, wrong).await.status, 401, "{user}");
        // Twice: the second check is answered from the verified cache.
        for _ in 0..2 {
            let right = req("basic.test", "/")
                .header("authorization", basic(user, good))
                .body(Empty::new())
                .unwrap();
            let r = send("127.0.0.1", s.http, right).await;
            assert_eq!(r.status, 200, "{user}: {}", r.body);
            assert!(
                !r.body.contains("authorization"),
                "Authorization is not passed upstream: {}",
                r.body
            );
        }
    }
    let right = req("map.test", "/")
        .header("authorization", basic("carol", "secret"))
        .body(Empty::new())
        .unwrap();
    assert_eq!(send("127.0.0.1", s.http, right).await.status, 200);
    assert_eq!(send("127.0.0.1", s.http, get("map.test", "/")).await.status, 401);
    assert_eq!(b.hits.load(Ordering::SeqCst), 7);
    s.stop().await;
    cancel.cancel();
}

/// A small auth service: answers with the status named by the request's
/// `x-want` header (200 by default), sets `X-User` and a cookie on 2xx
/// and a `WWW-Authenticate` on 401, and records what it received.
struct AuthServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

async fn auth_server(cancel: &CancellationToken) -> AuthServer {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = serve(cancel, move |req: Request<Incoming>| {
        let s = s.clone();
        async move {
            let want: u16 = req
                .headers()
                .get("x-want")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            s.lock()
                .unwrap()
                .push((req.method().to_string(), req.headers().clone()));
            let mut resp = Response::new(Full::new(Bytes::from_static(b"auth says")));
            *resp.status_mut() = StatusCode::from_u16(want).unwrap();
            if want < 300 {
                resp.headers_mut().insert("x-user", "alice".parse().unwrap());
                resp.headers_mut().insert("set-cookie", "session=s1".parse().unwrap());
            }
            if want == 401 {
                resp.headers_mut()
                    .insert("www-authenticate", "Bearer realm=\"auth\"".parse().unwrap());
            }
            resp
        }
    })
    .await;
    AuthServer { addr, seen }
}

#[tokio::test]
async fn external_auth_decides_and_the_backend_sees_only_allowed_requests() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    let auth = auth_server(&cancel).await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let url = format!("http://{}/check", auth.addr);
    let dead_url = format!("http://{dead}/check");
    let yaml = service("s", &[b.addr], None)
        + &ingress(
            "ext",
            "ext.test",
            "s",
            &[
                ("auth-url", &url),
                ("auth-response-headers", "X-User"),
                ("auth-request-redirect", "https://back.test/here"),
            ],
        )
        + &ingress(
            "signin",
            "signin.test",
            "s",
            &[("auth-url", &url), ("auth-signin", "http://login.test/start")],
        )
        + &ingress("dead", "dead.test", "s", &[("auth-url", &dead_url)]);
    let s = start(&yaml).await;
    assert!(s.engine.table().problems.is_empty(), "{:?}", s.engine.table().problems);

    // 2xx: through, with X-User from the auth service (the client's
    // forged one replaced) and the auth cookie on the response.
    let r = send(
        "127.0.0.1",
        s.http,
        Request::post("/p?q=1")
            .header("host", "ext.test")
            .header("x-user", "mallory")
            .header("authorization", "Bearer t0k")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("x-user: alice\n"), "{}", r.body);
    assert!(!r.body.contains("mallory"), "{}", r.body);
    assert_eq!(r.headers["set-cookie"], "session=s1");
    {
        let seen = auth.seen.lock().unwrap();
        let (method, h) = seen.last().unwrap();
        assert_eq!(method, "GET", "the auth request is a GET without auth-method");
        assert_eq!(h["x-original-url"], "http://ext.test/p?q=1");
        assert_eq!(h["x-original-method"], "POST");
        assert_eq!(h["x-sent-from"], "nginx-ingress-controller");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-auth-request-redirect"], "https://back.test/here");
        assert_eq!(h["authorization"], "Bearer t0k");
        assert_eq!(h["host"], "127.0.0.1");
    }
    assert_eq!(b.hits.load(Ordering::SeqCst), 1);

    // 401 (with the service's challenge), 403, and anything else is 500.
    for (want, status) in [("401", 401), ("403", 403), ("500", 500), ("302", 500)] {
        let r = send(
            "127.0.0.1",
            s.http,
            req("ext.test", "/").header("x-want", want).body(Empty::new()).unwrap(),
        )
        .await;
        assert_eq!(r.status, status, "auth {want}");
        if status == 401 {
            assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"auth\"");
        }
        assert!(r.headers.get("set-cookie").is_none());
    }
    // auth-signin: a 401 becomes a redirect to sign in, rd= the original URL.
    let r = send(
        "127.0.0.1",
        s.http,
        req("signin.test", "/a/b?c=d")
            .header("x-want", "401")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers["location"],
        "http://login.test/start?rd=http://signin.test%2Fa%2Fb%3Fc%3Dd"
    );
    let r = send(
        "127.0.0.1",
        s.http,
        req("signin.test", "/")
            .header("x-want", "403")
            .body(Empty::new())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 403, "only 401 redirects");
    // An unreachable auth service: 500.
    assert_eq!(send("127.0.0.1", s.http, get("dead.test", "/")).await.status, 500);
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1,
        "refused requests never reach the backend"
    );
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn cors_preflight_answered_and_simple_requests_get_headers() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    let yaml = service("s", &[b.addr], None)
        + &ingress(
            "i",
            "cors.test",
            "s",
            &[
                ("enable-cors", "true"),
                ("cors-allow-origin", "https://*.app.test, https://other.test"),
                ("cors-allow-methods", "GET, PUT"),
                ("cors-expose-headers", "X-Total"),
                ("cors-max-age", "600"),
            ],
        );
    let s = start(&yaml).await;
    let preflight = Request::options("/api")
        .header("host", "cors.test")
        .header("origin", "https://web.app.test")
        .header("access-control-request-method", "PUT")
        .body(Empty::new())
        .unwrap();
    let r = send("127.0.0.1", s.http, preflight).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["access-control-allow-origin"], "https://web.app.test");
    assert_eq!(r.headers["access-control-allow-methods"], "GET, PUT");
    assert_eq!(r.headers["access-control-allow-credentials"], "true");
    assert_eq!(r.headers["access-control-max-age"], "600");
    assert!(r.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(b.hits.load(Ordering::SeqCst), 0, "the preflight is answered by ferry");

    let simple = req("cors.test", "/api")
        .header("origin", "https://other.test")
        .body(Empty::new())
        .unwrap();
    let r = send("127.0.0.1", s.http, simple).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers
            .get_all("access-control-allow-origin")
            .iter()
            .collect::<Vec<_>>(),
        vec!["https://other.test"],
        "ferry's header replaces the upstream's"
    );
    assert_eq!(r.headers["access-control-expose-headers"], "X-Total");

    let foreign = req("cors.test", "/api")
        .header("origin", "https://evil.test")
        .body(Empty::new())
        .unwrap();
    let r = send("127.0.0.1", s.http, foreign).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers["access-control-allow-origin"], "https://upstream.invalid",
        "left as the upstream sent it"
    );
    assert!(r.headers.get("access-control-allow-methods").is_none());
    // An OPTIONS from a foreign origin is the backend's business.
    let foreign = Request::options("/api")
        .header("host", "cors.test")
        .header("origin", "https://evil.test")
        .body(Empty::new())
        .unwrap();
    assert_eq!(send("127.0.0.1", s.http, foreign).await.status, 200);
    assert_eq!(b.hits.load(Ordering::SeqCst), 3);
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn rate_limit_burst_then_503_per_client_across_reloads() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    // One request a minute with a burst of 3: 4 pass at once, and no
    // request drains in the few seconds the test takes.
    let annotations = [
        ("limit-rpm", "1"),
        ("limit-burst-multiplier", "3"),
        ("limit-whitelist", "127.0.0.3"),
    ];
    let yaml = service("s", &[b.addr], None) + &ingress("i", "limit.test", "s", &annotations);
    let s = start(&yaml).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(send("127.0.0.1", s.http, get("limit.test", "/")).await.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 503, 503]);
    // Another client has its own allowance; an exempt one has none.
    assert_eq!(send("127.0.0.2", s.http, get("limit.test", "/")).await.status, 200);
    for _ in 0..8 {
        assert_eq!(send("127.0.0.3", s.http, get("limit.test", "/")).await.status, 200);
    }
    // A reload of something unrelated keeps the buckets.
    let b2 = backend(&cancel).await;
    let yaml2 = yaml.clone() + &service("other", &[b2.addr], None);
    s.engine
        .apply(&Snapshot::from_objects(2, parse(&(CLASS.to_string() + &yaml2))));
    assert_eq!(send("127.0.0.1", s.http, get("limit.test", "/")).await.status, 503);
    assert_eq!(b.hits.load(Ordering::SeqCst), 4 + 1 + 8);
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn limit_connections_counts_requests_in_progress() {
    let cancel = CancellationToken::new();
    let b = backend(&cancel).await;
    let yaml = service("s", &[b.addr], None) + &ingress("i", "conns.test", "s", &[("limit-connections", "1")]);
    let s = start(&yaml).await;
    let proxy = s.http;
    let first = tokio::spawn(async move { send("127.0.0.1", proxy, get("conns.test", "/slow")).await.status });
    tokio::time::timeout(TIMEOUT, b.arrived.notified()).await.unwrap();
    assert_eq!(send("127.0.0.1", s.http, get("conns.test", "/")).await.status, 503);
    assert_eq!(send("127.0.0.2", s.http, get("conns.test", "/")).await.status, 200);
    b.release.notify_one();
    assert_eq!(tokio::time::timeout(TIMEOUT, first).await.unwrap().unwrap(), 200);
    // The slot is free once the first response is done; its release can
    // trail the client's read by a moment, so allow a few tries.
    let mut status = 0;
    for _ in 0..50 {
        status = send("127.0.0.1", s.http, get("conns.test", "/")).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
    s.stop().await;
    cancel.cancel();
}
