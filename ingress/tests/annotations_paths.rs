//! ingress-nginx / NGINX IC path annotations through a real engine on
//! loopback: regex paths and rewrites with capture groups, redirects and
//! their codes, app-root, aliases, www redirects, forwarded prefix, HSTS,
//! and the reporting of annotations ferry does not honour.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

mod common;
use common::service;
use common::{backend, parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);

/// An Ingress with one host and `(path, pathType, service)` paths.
fn ingress(name: &str, created: &str, host: &str, annotations: &str, paths: &[(&str, &str, &str)]) -> String {
    let mut y = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, creationTimestamp: \"{created}\", annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http:\n      paths:\n"
    );
    for (path, ty, svc) in paths {
        y += &format!(
            "      - {{path: '{path}', pathType: {ty}, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n"
        );
    }
    y + "---\n"
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The backend that answered (the echo body's first line) and the
    /// request line it saw (`GET /x HTTP/1.1`).
    fn seen(&self) -> (&str, &str) {
        let mut lines = self.body.lines();
        (lines.next().unwrap_or(""), lines.next().unwrap_or(""))
    }
}

async fn request(proxy: SocketAddr, host: &str, target: &str, headers: &[(&str, &str)]) -> Answer {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{proxy}{target}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(TIMEOUT, client.request(req.body(Empty::new()).unwrap()))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Starts backends `s1`, `s2`, `s3` (answering their names) and an engine
/// serving them with `ingresses`.
async fn start(ingresses: &str) -> (common::Serving, CancellationToken) {
    let cancel = CancellationToken::new();
    let mut yaml = CLASS.to_string();
    for name in ["s1", "s2", "s3"] {
        yaml += &service(name, &[backend(name, &cancel).await], None);
    }
    yaml += ingresses;
    let serving = common::serve(ferry_ingress::EngineConfig::default(), parse(&yaml)).await;
    (serving, cancel)
}

#[tokio::test]
async fn rewrite_target_substitutes_capture_groups_and_keeps_the_query() {
    let (p, cancel) = start(&ingress(
        "rw",
        "2024-01-01T00:00:00Z",
        "rw.test",
        "nginx.ingress.kubernetes.io/rewrite-target: /$2",
        &[("/something(/|$)(.*)", "ImplementationSpecific", "s1")],
    ))
    .await;
    for (target, want) in [
        ("/something", "GET / HTTP/1.1"),
        ("/something/", "GET / HTTP/1.1"),
        ("/something/new?x=1", "GET /new?x=1 HTTP/1.1"),
        ("/SOMETHING/a/b", "GET /a/b HTTP/1.1"),
    ] {
        let a = request(p.http, "rw.test", target, &[]).await;
        assert_eq!((a.status, a.seen()), (200, ("s1", want)), "{target}");
    }
    // Not under the regex: no route.
    assert_eq!(request(p.http, "rw.test", "/other", &[]).await.status, 404);
    cancel.cancel();
    p.cancel.cancel();
}

#[tokio::test]
async fn regex_is_enforced_on_every_ingress_of_the_host_longest_first() {
    // The example of ingress-nginx's "Path Priority" documentation.
    let ingresses = ingress(
        "test-ingress-1",
        "2024-01-01T00:00:00Z",
        "test.com",
        "",
        &[("/foo/bar", "Prefix", "s1"), ("/foo/bar/", "Prefix", "s2")],
    ) + &ingress(
        "test-ingress-2",
        "2024-01-02T00:00:00Z",
        "test.com",
        "nginx.ingress.kubernetes.io/rewrite-target: /$1",
        &[("/foo/bar/(.+)", "ImplementationSpecific", "s3")],
    );
    let (p, cancel) = start(&ingresses).await;
    for (target, want) in [
        ("/foo/bar/1", ("s3", "GET /1 HTTP/1.1")),
        ("/foo/bar/", ("s2", "GET /foo/bar/ HTTP/1.1")),
        ("/foo/bar", ("s1", "GET /foo/bar HTTP/1.1")),
        // Case-insensitive, and a regex prefix: /foo/barbaz matches ^/foo/bar.
        ("/FOO/BAR", ("s1", "GET /FOO/BAR HTTP/1.1")),
        ("/foo/barbaz", ("s1", "GET /foo/barbaz HTTP/1.1")),
    ] {
        let a = request(p.http, "test.com", target, &[]).await;
        assert_eq!((a.status, a.seen()), (200, want), "{target}");
    }
    let routes = p.engine.table().render();
    assert!(routes.contains("Regex ~* ^/foo/bar/(.+)"), "{routes}");
    cancel.cancel();
    p.cancel.cancel();
}

#[tokio::test]
async fn redirects_with_their_codes_and_app_root() {
    let ingresses = ingress(
        "perm",
        "2024-01-01T00:00:00Z",
        "perm.test",
        "nginx.ingress.kubernetes.io/permanent-redirect: https://new.example/landing, nginx.ingress.kubernetes.io/permanent-redirect-code: '308'",
        &[("/", "Prefix", "s1")],
    ) + &ingress(
        "temp",
        "2024-01-01T00:00:00Z",
        "temp.test",
        "nginx.ingress.kubernetes.io/temporal-redirect: https://maintenance.example/",
        &[("/", "Prefix", "s1")],
    ) + &ingress(
        "root",
        "2024-01-01T00:00:00Z",
        "root.test",
        "nginx.ingress.kubernetes.io/app-root: /app1",
        &[("/", "Prefix", "s2")],
    );
    let (p, cancel) = start(&ingresses).await;
    let a = request(p.http, "perm.test", "/any/path?q=1", &[]).await;
    assert_eq!(
        (a.status, a.header("location")),
        (308, Some("https://new.example/landing"))
    );
    let a = request(p.http, "temp.test", "/x", &[]).await;
    assert_eq!(
        (a.status, a.header("location")),
        (302, Some("https://maintenance.example/"))
    );
    let host = format!("root.test:{}", p.http.port());
    let a = request(p.http, &host, "/", &[]).await;
    let want = format!("http://{host}/app1");
    assert_eq!((a.status, a.header("location")), (302, Some(want.as_str())));
    let a = request(p.http, &host, "/app1", &[]).await;
    assert_eq!((a.status, a.seen().0), (200, "s2"));
    cancel.cancel();
    p.cancel.cancel();
}

#[tokio::test]
async fn www_redirect_aliases_force_ssl_and_forwarded_prefix() {
    let ingresses = ingress(
        "www",
        "2024-01-01T00:00:00Z",
        "www.w.test",
        "nginx.ingress.kubernetes.io/from-to-www-redirect: 'true', nginx.ingress.kubernetes.io/server-alias: 'alias.test, other-alias.test'",
        &[("/", "Prefix", "s1")],
    ) + &ingress(
        "ssl",
        "2024-01-01T00:00:00Z",
        "ssl.test",
        "nginx.ingress.kubernetes.io/force-ssl-redirect: 'true'",
        &[("/", "Prefix", "s2")],
    ) + &ingress(
        "prefix",
        "2024-01-01T00:00:00Z",
        "prefix.test",
        "nginx.ingress.kubernetes.io/x-forwarded-prefix: /api",
        &[("/", "Prefix", "s3")],
    );
    let (p, cancel) = start(&ingresses).await;
    let port = p.http.port();
    let a = request(p.http, &format!("w.test:{port}"), "/p?q=1", &[]).await;
    let want = format!("http://www.w.test:{port}/p?q=1");
    assert_eq!((a.status, a.header("location")), (308, Some(want.as_str())));
    for host in ["www.w.test", "alias.test", "other-alias.test"] {
        let a = request(p.http, host, "/", &[]).await;
        assert_eq!((a.status, a.seen().0), (200, "s1"), "{host}");
    }
    let a = request(p.http, "ssl.test", "/x?y=1", &[]).await;
    let want = format!("https://ssl.test:{}/x?y=1", p.https.port());
    assert_eq!((a.status, a.header("location")), (308, Some(want.as_str())));
    let a = request(p.http, "prefix.test", "/", &[]).await;
    assert_eq!(a.seen().0, "s3");
    assert!(a.body.contains("\nx-forwarded-prefix: /api\n"), "{}", a.body);
    cancel.cancel();
    p.cancel.cancel();
}

#[tokio::test]
async fn nginx_org_rewrites_redirect_to_https_and_hsts() {
    let ingresses = ingress(
        "cafe",
        "2024-01-01T00:00:00Z",
        "cafe.test",
        "nginx.org/rewrites: 'serviceName=s1 rewrite=/;serviceName=s2 rewrite=/beans/', nginx.org/hsts: 'true', nginx.org/hsts-include-subdomains: 'true', nginx.org/hsts-behind-proxy: 'true'",
        &[("/tea/", "Prefix", "s1"), ("/coffee", "Prefix", "s2"), ("/milk", "Prefix", "s3")],
    ) + &ingress(
        "lb",
        "2024-01-01T00:00:00Z",
        "behind-lb.test",
        "nginx.org/redirect-to-https: 'true'",
        &[("/", "Prefix", "s1")],
    );
    let (p, cancel) = start(&ingresses).await;
    for (target, want) in [
        ("/tea/green", ("s1", "GET /green HTTP/1.1")),
        ("/coffee/dark?x=1", ("s2", "GET /beans/dark?x=1 HTTP/1.1")),
        ("/milk/oat", ("s3", "GET /milk/oat HTTP/1.1")),
    ] {
        let a = request(p.http, "cafe.test", target, &[]).await;
        assert_eq!((a.status, a.seen()), (200, want), "{target}");
    }
    // HSTS only for requests that arrived over TLS (here: at the TLS proxy
    // in front, as hsts-behind-proxy allows).
    let plain = request(p.http, "cafe.test", "/tea/", &[]).await;
    assert_eq!(plain.header("strict-transport-security"), None);
    let proxied = request(p.http, "cafe.test", "/tea/", &[("x-forwarded-proto", "https")]).await;
    assert_eq!(
        proxied.header("strict-transport-security"),
        Some("max-age=2592000; includeSubDomains")
    );
    let a = request(p.http, "behind-lb.test", "/x?y=1", &[("x-forwarded-proto", "http")]).await;
    assert_eq!(
        (a.status, a.header("location")),
        (301, Some("https://behind-lb.test/x?y=1"))
    );
    let a = request(p.http, "behind-lb.test", "/x", &[("x-forwarded-proto", "https")]).await;
    assert_eq!((a.status, a.seen().0), (200, "s1"));
    cancel.cancel();
    p.cancel.cancel();
}

#[tokio::test]
async fn annotations_not_honoured_are_reported_and_the_ingress_keeps_serving() {
    let ingresses = ingress(
        "mixed",
        "2024-01-01T00:00:00Z",
        "mixed.test",
        "nginx.ingress.kubernetes.io/made-up-annotation: 'x', nginx.ingress.kubernetes.io/configuration-snippet: 'return 200 pwned;', nginx.ingress.kubernetes.io/rewrite-target: 'no-slash', nginx.ingress.kubernetes.io/use-regex: 'true'",
        &[("/v1/(.*)", "ImplementationSpecific", "s1"), ("/bad(", "ImplementationSpecific", "s2")],
    );
    let (p, cancel) = start(&ingresses).await;
    let a = request(p.http, "mixed.test", "/v1/x", &[]).await;
    assert_eq!((a.status, a.seen()), (200, ("s1", "GET /v1/x HTTP/1.1")));
    let routes = p.engine.table().render();
    for want in [
        "problem: Ingress default/mixed metadata.annotations[nginx.ingress.kubernetes.io/made-up-annotation]: not supported",
        "problem: Ingress default/mixed metadata.annotations[nginx.ingress.kubernetes.io/configuration-snippet]: refused",
        "problem: Ingress default/mixed metadata.annotations[nginx.ingress.kubernetes.io/rewrite-target]: \"no-slash\": must start with /",
        "problem: Ingress default/mixed spec.rules[0].http.paths[1].path: \"/bad(\" is not a valid regular expression",
    ] {
        assert!(routes.contains(want), "missing {want:?} in\n{routes}");
    }
    cancel.cancel();
    p.cancel.cancel();
}
