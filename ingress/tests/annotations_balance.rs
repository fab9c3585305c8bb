//! Loopback tests of the endpoint-choice annotations: hashing, cookie
//! affinity, canaries and EWMA, against real echo backends that answer
//! their pod name. Clients bind 127.0.0.x source addresses where the
//! client address matters; everything stays on 127.0.0.0/8.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use ferry_cluster::{Object, Snapshot};
use http::HeaderMap;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

mod common;
use common::service;
use common::{backend, parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);
const N: &str = "nginx.ingress.kubernetes.io/";

fn ingress(name: &str, host: &str, svc: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n---\n"
    )
}

/// `n` echo backends answering `name-0`, `name-1`, …
async fn backends(name: &str, n: usize, cancel: &CancellationToken) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(backend(&format!("{name}-{i}"), cancel).await);
    }
    out
}

/// A backend answering `name` after `delay`.
async fn slow_backend(name: &'static str, delay: Duration, cancel: &CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(format!("{name}\n")))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    /// The first line: the backend's name.
    fn backend(&self) -> &str {
        self.body.lines().next().unwrap_or_default()
    }

    fn set_cookie(&self) -> Option<String> {
        self.headers.get("set-cookie").map(|v| v.to_str().unwrap().to_string())
    }
}

/// One keep-alive HTTP/1.1 connection to the proxy from source address `from`.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn connect(proxy: SocketAddr, from: Ipv4Addr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let stream = tokio::time::timeout(TIMEOUT, socket.connect(proxy))
            .await
            .unwrap()
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::get(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).unwrap();
        tokio::time::timeout(TIMEOUT, self.sender.ready())
            .await
            .unwrap()
            .unwrap();
        let resp = tokio::time::timeout(TIMEOUT, self.sender.send_request(req))
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
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

async fn start(objects: Vec<Object>) -> common::Serving {
    let config = common::test_config();
    common::serve(config, objects).await
}

#[tokio::test]
async fn hash_by_request_uri_keeps_a_uri_on_one_endpoint_and_spreads_uris() {
    let cancel = CancellationToken::new();
    let pods = backends("pod", 3, &cancel).await;
    let objects = parse(
        &(CLASS.to_string()
            + &service("s", &pods, None)
            + &ingress("h", "hash.test", "s", &format!("{N}upstream-hash-by: '$request_uri'"))
            + &ingress(
                "n",
                "nginx.test",
                "s",
                "nginx.org/lb-method: 'hash $request_uri consistent'",
            )),
    );
    let s = start(objects).await;
    let mut c = Client::connect(s.http, Ipv4Addr::LOCALHOST).await;
    for host in ["hash.test", "nginx.test"] {
        let mut owner: HashMap<String, String> = HashMap::new();
        for round in 0..3 {
            for i in 0..30 {
                let path = format!("/item/{i}?q={i}");
                let a = c.get(host, &path, &[]).await;
                assert_eq!(a.status, 200, "{}", a.body);
                let got = a.backend().to_string();
                if round == 0 {
                    owner.insert(path, got);
                } else {
                    assert_eq!(owner[&path], got, "{host}{path} moved");
                }
            }
        }
        let used: HashSet<&String> = owner.values().collect();
        assert!(used.len() >= 2, "{host}: 30 URIs all on {used:?}");
    }
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn hash_by_remote_addr_follows_the_client_address() {
    let cancel = CancellationToken::new();
    let pods = backends("pod", 3, &cancel).await;
    let objects = parse(
        &(CLASS.to_string()
            + &service("s", &pods, None)
            + &ingress("h", "addr.test", "s", &format!("{N}upstream-hash-by: '$remote_addr'"))
            + &ingress("ip", "ip.test", "s", "nginx.org/lb-method: ip_hash")),
    );
    let s = start(objects).await;
    let mut by_addr = HashSet::new();
    let mut by_net = HashSet::new();
    for last in 2..22u8 {
        let from = Ipv4Addr::new(127, 0, 0, last);
        let mut c = Client::connect(s.http, from).await;
        let first = c.get("addr.test", "/", &[]).await;
        assert_eq!(first.status, 200);
        assert!(first.body.contains(&format!("x-real-ip: {from}")), "{}", first.body);
        for path in ["/a", "/b?x=1", "/c"] {
            // Same client address, any path: the same endpoint.
            assert_eq!(c.get("addr.test", path, &[]).await.backend(), first.backend());
        }
        by_addr.insert(first.backend().to_string());
        by_net.insert(c.get("ip.test", "/", &[]).await.backend().to_string());
    }
    assert!(by_addr.len() >= 2, "20 client addresses all on {by_addr:?}");
    // ip_hash: the /24 decides, and every client is in 127.0.0.0/24.
    assert_eq!(by_net.len(), 1, "{by_net:?}");
    s.stop().await;
    cancel.cancel();
}

/// The `name=value` of a Set-Cookie, for sending it back.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn affinity_cookie_is_set_honoured_and_reissued_when_its_endpoint_goes() {
    let cancel = CancellationToken::new();
    let pods = backends("pod", 3, &cancel).await;
    let persistent = format!(
        "{N}affinity: cookie, {N}affinity-mode: persistent, {N}session-cookie-name: route, {N}session-cookie-max-age: '600', {N}session-cookie-samesite: Strict"
    );
    let balanced = format!("{N}affinity: cookie");
    let objects = |pods: &[SocketAddr]| {
        parse(
            &(CLASS.to_string()
                + &service("s", pods, None)
                + &ingress("p", "persistent.test", "s", &persistent)
                + &ingress("b", "balanced.test", "s", &balanced)),
        )
    };
    let s = start(objects(&pods)).await;
    let mut c = Client::connect(s.http, Ipv4Addr::LOCALHOST).await;

    // Without a cookie: the balancer picks (round robin spreads fresh
    // sessions) and the response sets one.
    let mut fresh = HashSet::new();
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let a = c.get("persistent.test", "/", &[]).await;
        assert_eq!(a.status, 200);
        let set = a.set_cookie().expect("a cookie for a new session");
        assert!(set.starts_with("route="), "{set}");
        assert!(
            set.contains("; Path=/") && set.contains("; Max-Age=600") && set.contains("; HttpOnly"),
            "{set}"
        );
        assert!(set.contains("; SameSite=Strict"), "{set}");
        assert!(
            !set.contains("127.0.0.1"),
            "the cookie must not show the endpoint: {set}"
        );
        fresh.insert(a.backend().to_string());
        sessions.push((cookie_pair(&set), a.backend().to_string()));
    }
    assert!(fresh.len() >= 2, "new sessions all on {fresh:?}");

    // With it: the same endpoint every time, and no new cookie.
    for (cookie, pod) in &sessions {
        for _ in 0..5 {
            let a = c.get("persistent.test", "/", &[("cookie", cookie)]).await;
            assert_eq!(&a.backend(), pod);
            assert_eq!(a.set_cookie(), None);
        }
    }
    // A cookie that is not ours is replaced.
    let a = c.get("persistent.test", "/", &[("cookie", "route=garbage")]).await;
    assert!(a.set_cookie().is_some());

    // Balanced mode: also sticky.
    let a = c.get("balanced.test", "/", &[]).await;
    let set = a.set_cookie().expect("cookie");
    assert!(set.starts_with("INGRESSCOOKIE="), "{set}");
    let balanced_cookie = cookie_pair(&set);
    let balanced_pod = a.backend().to_string();
    for _ in 0..5 {
        let b = c.get("balanced.test", "/x", &[("cookie", &balanced_cookie)]).await;
        assert_eq!(b.backend(), balanced_pod);
        assert_eq!(b.set_cookie(), None);
    }

    // The endpoint of the first session goes away.
    let (cookie, gone) = sessions[0].clone();
    let remaining: Vec<SocketAddr> = pods
        .iter()
        .zip(0..)
        .filter(|(_, i)| format!("pod-{i}") != gone)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(remaining.len(), 2);
    s.engine.apply(&Snapshot::from_objects(2, objects(&remaining)));
    let a = c.get("persistent.test", "/", &[("cookie", &cookie)]).await;
    assert_eq!(a.status, 200);
    assert_ne!(a.backend(), gone);
    let new_cookie = cookie_pair(&a.set_cookie().expect("a new cookie for the new endpoint"));
    assert_ne!(new_cookie, cookie);
    for _ in 0..5 {
        let b = c.get("persistent.test", "/", &[("cookie", &new_cookie)]).await;
        assert_eq!(b.backend(), a.backend());
        assert_eq!(b.set_cookie(), None);
    }
    // Sessions on the remaining endpoints did not move.
    for (cookie, pod) in sessions.iter().filter(|(_, p)| *p != gone) {
        assert_eq!(
            &c.get("persistent.test", "/", &[("cookie", cookie)]).await.backend(),
            pod
        );
    }
    // Balanced: a session whose endpoint went stays on one new endpoint.
    let moved = c.get("balanced.test", "/", &[("cookie", &balanced_cookie)]).await;
    for _ in 0..5 {
        let b = c.get("balanced.test", "/", &[("cookie", &balanced_cookie)]).await;
        assert_eq!(b.backend(), moved.backend());
    }
    if balanced_pod != gone {
        assert_eq!(moved.backend(), balanced_pod);
    }
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn canary_by_header_cookie_and_weight() {
    let cancel = CancellationToken::new();
    let main = backends("main", 2, &cancel).await;
    let canary = backends("canary", 1, &cancel).await;
    let objects = parse(
        &(CLASS.to_string()
            + &service("main", &main, None)
            + &service("next", &canary, None)
            + &ingress("app", "app.test", "main", "")
            + &ingress(
                "app-canary",
                "app.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-by-header: X-Canary, {N}canary-by-cookie: canary, {N}canary-weight: '30'"),
            )
            + &ingress("v", "value.test", "main", "")
            + &ingress(
                "v-canary",
                "value.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-by-header: x-version, {N}canary-by-header-value: v2, {N}canary-by-cookie: canary"),
            )
            + &ingress("p", "pattern.test", "main", "")
            + &ingress(
                "p-canary",
                "pattern.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-by-header: x-version, {N}canary-by-header-pattern: '^v(2|3)$'"),
            )
            + &ingress(
                "orphan",
                "orphan.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-weight: '100'"),
            )),
    );
    let s = start(objects).await;
    let problems: Vec<String> = s.engine.table().problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("default/orphan"), "{problems:?}");
    let mut c = Client::connect(s.http, Ipv4Addr::LOCALHOST).await;
    let is_canary = |a: &Answer| {
        assert_eq!(a.status, 200, "{}", a.body);
        a.backend().starts_with("canary-")
    };

    // (host, headers, canary?) — each checked 20 times, so the 30% weight
    // cannot pass by chance.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, bool);
    let table: Vec<Case<'_>> = vec![
        ("app.test", vec![("x-canary", "always")], true),
        (
            "app.test",
            vec![("x-canary", "never"), ("cookie", "canary=always")],
            false,
        ),
        ("app.test", vec![("cookie", "canary=always")], true),
        ("app.test", vec![("cookie", "a=1; canary=never")], false),
        (
            "app.test",
            vec![("x-canary", "other"), ("cookie", "canary=always")],
            true,
        ),
        ("value.test", vec![("x-version", "v2")], true),
        ("value.test", vec![("x-version", "v1")], false),
        (
            "value.test",
            vec![("x-version", "v1"), ("cookie", "canary=always")],
            true,
        ),
        ("value.test", vec![], false),
        ("pattern.test", vec![("x-version", "v3")], true),
        ("pattern.test", vec![("x-version", "v4")], false),
        ("pattern.test", vec![("x-version", "always")], false),
        // No main Ingress: the canary is ignored, nothing routes.
    ];
    for (host, headers, want) in &table {
        for _ in 0..20 {
            let a = c.get(host, "/", headers).await;
            assert_eq!(is_canary(&a), *want, "{host} {headers:?}");
        }
    }
    assert_eq!(c.get("orphan.test", "/", &[]).await.status, 404);

    // By weight: 30% ± 6% over 1,000 requests; the main share still
    // round-robins over both main pods.
    let total = 1000;
    let mut canary_count = 0;
    let mut main_pods = HashSet::new();
    for _ in 0..total {
        let a = c.get("app.test", "/", &[]).await;
        if is_canary(&a) {
            canary_count += 1;
        } else {
            main_pods.insert(a.backend().to_string());
        }
    }
    let share = f64::from(canary_count) / f64::from(total);
    assert!((0.24..=0.36).contains(&share), "canary share {share}");
    assert_eq!(main_pods.len(), 2, "{main_pods:?}");
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn canary_weight_total_and_affinity_stickiness() {
    let cancel = CancellationToken::new();
    let main = backends("main", 2, &cancel).await;
    let canary = backends("canary", 2, &cancel).await;
    let objects = parse(
        &(CLASS.to_string()
            + &service("main", &main, None)
            + &service("next", &canary, None)
            + &ingress("app", "app.test", "main", "")
            + &ingress(
                "app-canary",
                "app.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-weight: '50', {N}canary-weight-total: '1000'"),
            )
            + &service("empty", &[], None)
            + &ingress("e", "empty.test", "main", "")
            + &ingress(
                "e-canary",
                "empty.test",
                "empty",
                &format!("{N}canary: 'true', {N}canary-weight: '100'"),
            )
            + &ingress("s", "sticky.test", "main", &format!("{N}affinity: cookie"))
            + &ingress(
                "s-canary",
                "sticky.test",
                "next",
                &format!("{N}canary: 'true', {N}canary-weight: '50', {N}affinity: cookie"),
            )),
    );
    let s = start(objects).await;
    let mut c = Client::connect(s.http, Ipv4Addr::LOCALHOST).await;
    // 50 of 1000: 5% ± 3%.
    let mut n = 0;
    for _ in 0..1000 {
        if c.get("app.test", "/", &[]).await.backend().starts_with("canary-") {
            n += 1;
        }
    }
    assert!((20..=80).contains(&n), "canary got {n} of 1000");

    // A canary without endpoints is skipped, as in ingress-nginx.
    for _ in 0..10 {
        let a = c.get("empty.test", "/", &[]).await;
        assert_eq!(a.status, 200);
        assert!(a.backend().starts_with("main-"), "{}", a.body);
    }

    // With affinity on both: once a client has a cookie from either side,
    // it stays there (ingress-nginx's sticky canary behaviour).
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let first = c.get("sticky.test", "/", &[]).await;
        let cookie = cookie_pair(&first.set_cookie().expect("cookie"));
        let side = first.backend().split('-').next().unwrap().to_string();
        for _ in 0..5 {
            let a = c.get("sticky.test", "/", &[("cookie", &cookie)]).await;
            assert_eq!(a.backend(), first.backend(), "{cookie}");
        }
        seen.insert(side);
    }
    assert_eq!(seen.len(), 2, "40 sessions at 50% all on {seen:?}");
    s.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn ewma_prefers_the_faster_endpoint() {
    let cancel = CancellationToken::new();
    let fast = backend("fast", &cancel).await;
    let slow = slow_backend("slow", Duration::from_millis(40), &cancel).await;
    let objects = parse(
        &(CLASS.to_string()
            + &service("s", &[fast, slow], None)
            + &ingress("e", "ewma.test", "s", &format!("{N}load-balance: ewma"))
            + &ingress("r", "rr.test", "s", "")),
    );
    let s = start(objects).await;
    let mut c = Client::connect(s.http, Ipv4Addr::LOCALHOST).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..150 {
        let a = c.get("ewma.test", "/", &[]).await;
        assert_eq!(a.status, 200);
        *counts.entry(a.backend().to_string()).or_default() += 1;
    }
    let fast_count = counts.get("fast").copied().unwrap_or(0);
    assert!(fast_count > 100, "{counts:?}");
    // Round robin on the same Service (another upstream) still alternates.
    let mut rr = HashMap::<String, usize>::new();
    for _ in 0..10 {
        *rr.entry(c.get("rr.test", "/", &[]).await.backend().to_string())
            .or_default() += 1;
    }
    assert_eq!(rr.get("slow"), Some(&5), "{rr:?}");
    let routes = s.engine.table().render();
    assert!(routes.contains("[ewma]"), "{routes}");
    s.stop().await;
    cancel.cancel();
}
