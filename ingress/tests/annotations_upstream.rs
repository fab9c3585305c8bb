//! Loopback tests of the upstream-connection annotations: TLS and h2 to
//! the upstream, the Host sent, dialling the ClusterIP, timeouts, retries
//! across endpoints, and error pages from a default backend. Everything
//! binds 127.0.0.x and talks only to 127.0.0.x.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_cluster::{Object, ObjectKey, Secret};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
use common::service;
use common::{backend, parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);
const A: &str = "nginx.ingress.kubernetes.io/";

fn ingress(name: &str, host: &str, svc: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n---\n"
    )
}

fn secret(name: &str, data: &[(&str, &str)]) -> Object {
    Object::Secret(Arc::new(Secret {
        key: ObjectKey::new("default", name),
        type_: "Opaque".into(),
        data: data
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    }))
}

async fn start(objects: Vec<Object>) -> common::Serving {
    let config = common::test_config();
    let s = common::serve(config, objects).await;
    let problems: Vec<String> = s.engine.table().problems.iter().map(ToString::to_string).collect();
    assert!(problems.is_empty(), "{problems:?}");
    s
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request through the proxy; returns (status, body).
async fn send(
    client: &HttpClient,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(client: &HttpClient, proxy: SocketAddr, host: &str, path: &str) -> (u16, String) {
    send(client, proxy, "GET", host, path, &[], "").await
}

/// What a test server knows about the connection a request came on.
#[derive(Clone, Default)]
struct ConnInfo {
    sni: Option<String>,
    alpn: Option<String>,
}

type Handler = Arc<dyn Fn(&http::request::Parts, &ConnInfo) -> (u16, String) + Send + Sync>;

/// An HTTP/1.1 and h2 (h2c without TLS) server on `ip`, over TLS when
/// `tls` is given, answering what `handler` returns for each request.
async fn server(
    ip: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
    cancel: &CancellationToken,
) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            let (tls, handler, cancel) = (tls.clone(), handler.clone(), cancel.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let serve = |info: ConnInfo| {
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (handler, info) = (handler.clone(), info.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let _ = body.collect().await;
                            let (status, text) = handler(&parts, &info);
                            let mut r = Response::new(Full::new(Bytes::from(text)));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    })
                };
                match tls {
                    None => {
                        let conn = builder.serve_connection(TokioIo::new(tcp), serve(ConnInfo::default()));
                        tokio::select! { _ = conn => {}, _ = cancel.cancelled() => {} }
                    }
                    Some(config) => {
                        let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else {
                            return;
                        };
                        let (_, session) = stream.get_ref();
                        let info = ConnInfo {
                            sni: session.server_name().map(str::to_string),
                            alpn: session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), serve(info));
                        tokio::select! { _ = conn => {}, _ = cancel.cancelled() => {} }
                    }
                }
            });
        }
    });
    addr
}

/// Answers with the version, target, Host, SNI and ALPN it saw.
fn describe(body: &'static str) -> Handler {
    Arc::new(move |p, info| {
        let host = p.headers.get("host").map(|h| h.to_str().unwrap().to_string());
        (
            200,
            format!(
                "{body}\nversion: {:?}\nuri: {}\nhost: {}\nsni: {}\nalpn: {}\n",
                p.version,
                p.uri,
                host.unwrap_or_default(),
                info.sni.as_deref().unwrap_or("none"),
                info.alpn.as_deref().unwrap_or("none"),
            ),
        )
    })
}

/// A CA and a certificate for `name` it signed: (CA PEM, cert PEM, key PEM).
fn pki(name: &str) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "ferry test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn server_tls(cert_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

#[tokio::test]
async fn https_upstream_with_and_without_verification() {
    let cancel = CancellationToken::new();
    let (ca, cert, key) = pki("backend.test");
    let (other_ca, _, _) = pki("backend.test");
    let b = server(
        "127.0.0.1",
        Some(server_tls(&cert, &key, &[b"http/1.1"])),
        describe("tls-backend"),
        &cancel,
    )
    .await;
    let verified = format!(
        "{A}backend-protocol: HTTPS, {A}proxy-ssl-secret: default/good-ca, {A}proxy-ssl-verify: 'on', \
         {A}proxy-ssl-name: backend.test, {A}proxy-ssl-server-name: 'on'"
    );
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &ingress("off", "off.test", "s", &format!("{A}backend-protocol: HTTPS"))
        + &ingress("on", "on.test", "s", &verified)
        + &ingress("bad", "bad.test", "s", &verified.replace("good-ca", "bad-ca"))
        + &ingress("plain", "plain.test", "s", "");
    let mut objects = parse(&yaml);
    objects.push(secret("good-ca", &[("ca.crt", &ca)]));
    objects.push(secret("bad-ca", &[("ca.crt", &other_ca)]));
    let proxy = start(objects).await;
    let c = client();

    // Verification off (the default): any certificate, no SNI.
    let (status, body) = get(&c, proxy.http, "off.test", "/x").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("tls-backend\nversion: HTTP/1.1\n"), "{body}");
    assert!(body.contains("host: off.test\nsni: none\nalpn: http/1.1"), "{body}");
    // A body goes the same way.
    let (status, body) = send(&c, proxy.http, "POST", "off.test", "/p", &[], "payload").await;
    assert_eq!(status, 200, "{body}");

    // Verified against the CA of proxy-ssl-secret, with SNI.
    for _ in 0..3 {
        let (status, body) = get(&c, proxy.http, "on.test", "/y").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("sni: backend.test"), "{body}");
    }
    // The wrong CA: the handshake fails, 502.
    let (status, body) = get(&c, proxy.http, "bad.test", "/z").await;
    assert_eq!(status, 502, "{body}");
    // Plain HTTP to a TLS server fails too (pools never mix).
    let (status, _) = get(&c, proxy.http, "plain.test", "/").await;
    assert_eq!(status, 502);
    let (status, _) = get(&c, proxy.http, "on.test", "/again").await;
    assert_eq!(status, 200);

    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn grpcs_and_h2c_upstreams_speak_http2() {
    let cancel = CancellationToken::new();
    let (_, cert, key) = pki("grpc.test");
    let tls_h2 = server(
        "127.0.0.1",
        Some(server_tls(&cert, &key, &[b"h2"])),
        describe("h2-tls"),
        &cancel,
    )
    .await;
    let cleartext = server("127.0.0.1", None, describe("cleartext"), &cancel).await;
    let yaml = CLASS.to_string()
        + &service("tls", &[tls_h2], None)
        + &service("clear", &[cleartext], None)
        + &ingress("grpcs", "grpcs.test", "tls", &format!("{A}backend-protocol: GRPCS"))
        + &ingress(
            "nic",
            "nic.test",
            "tls",
            "nginx.org/ssl-services: tls, nginx.org/grpc-services: 'tls,other'",
        )
        + &ingress("h2c", "h2c.test", "clear", &format!("{A}backend-protocol: H2C"))
        + &ingress("grpc", "grpc.test", "clear", &format!("{A}backend-protocol: GRPC"))
        + &ingress("h1", "h1.test", "clear", "");
    let proxy = start(parse(&yaml)).await;
    let c = client();
    for host in ["grpcs.test", "nic.test"] {
        let (status, body) = get(&c, proxy.http, host, "/svc/Method").await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.starts_with("h2-tls\nversion: HTTP/2.0\n"), "{host}: {body}");
        assert!(
            body.contains(&format!("uri: https://{host}/svc/Method")),
            "{host}: {body}"
        );
        assert!(body.contains("alpn: h2"), "{host}: {body}");
        let (status, body) = send(&c, proxy.http, "POST", host, "/svc/Post", &[], "grpc-frame").await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    for (host, version) in [
        ("h2c.test", "HTTP/2.0"),
        ("grpc.test", "HTTP/2.0"),
        ("h1.test", "HTTP/1.1"),
    ] {
        let (status, body) = get(&c, proxy.http, host, "/m").await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains(&format!("version: {version}")), "{host}: {body}");
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn upstream_vhost_is_the_host_the_backend_sees() {
    let cancel = CancellationToken::new();
    let b = backend("vhost", &cancel).await;
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &ingress("v", "public.test", "s", &format!("{A}upstream-vhost: internal.example"))
        + &ingress(
            "h2",
            "h2.test",
            "s",
            &format!("{A}upstream-vhost: internal.example, {A}backend-protocol: H2C"),
        );
    let proxy = start(parse(&yaml)).await;
    let c = client();
    // GET takes the lean client, POST the hyper one.
    for method in ["GET", "POST"] {
        let (status, body) = send(&c, proxy.http, method, "public.test", "/a", &[], "x").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\nhost: internal.example\n"), "{method}: {body}");
        assert!(body.contains("\nx-forwarded-host: public.test\n"), "{method}: {body}");
    }
    let (status, body) = get(&c, proxy.http, "h2.test", "/a").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("http://internal.example/a HTTP/2.0"), "{body}");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn service_upstream_dials_the_cluster_ip() {
    let cancel = CancellationToken::new();
    // The "ClusterIP" is 127.0.0.3 on port 80's stand-in: the Service's
    // port is the backend's port so that ClusterIP:port reaches it.
    let l = TcpListener::bind("127.0.0.3:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(ferry_ingress::echo::serve(
        l,
        ferry_ingress::echo::EchoConfig {
            body: "via-cluster-ip".into(),
            request_info: false,
        },
        cancel.clone(),
    ));
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let yaml = CLASS.to_string()
        + &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  clusterIP: 127.0.0.3\n  ports: [{{name: http, port: {port}, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-0, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"127.0.0.1\"]\n---\n",
            dead.port()
        )
        + &format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: su, annotations: {{{A}service-upstream: 'true'}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: su.test\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: {port}}}}}}}}}]}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: pods}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: pods.test\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: {port}}}}}}}}}]}}\n---\n"
        );
    let proxy = start(parse(&yaml)).await;
    let c = client();
    let (status, body) = get(&c, proxy.http, "su.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "via-cluster-ip\n"));
    // Without the annotation the (dead) pod endpoint is dialled.
    let (status, _) = get(&c, proxy.http, "pods.test", "/").await;
    assert_eq!(status, 502);
    proxy.stop().await;
    cancel.cancel();
}

/// A backend that reads the request and then never answers.
async fn stalling_backend(cancel: &CancellationToken, partial: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                if partial {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello")
                        .await;
                }
                cancel.cancelled().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn read_timeout_gives_504_and_cuts_stalled_bodies() {
    let cancel = CancellationToken::new();
    let stall = stalling_backend(&cancel, false).await;
    let partial = stalling_backend(&cancel, true).await;
    let yaml = CLASS.to_string()
        + &service("stall", &[stall], None)
        + &service("partial", &[partial], None)
        + &ingress("a", "a.test", "stall", &format!("{A}proxy-read-timeout: '1'"))
        + &ingress("b", "b.test", "stall", "nginx.org/proxy-read-timeout: 1s")
        + &ingress("c", "c.test", "partial", &format!("{A}proxy-read-timeout: '1'"));
    let proxy = start(parse(&yaml)).await;
    let c = client();
    for host in ["a.test", "b.test"] {
        let (status, _) = get(&c, proxy.http, host, "/").await;
        assert_eq!(status, 504, "{host}");
        let (status, _) = send(&c, proxy.http, "POST", host, "/", &[], "body").await;
        assert_eq!(status, 504, "{host} POST");
    }
    // The head arrives, the body stalls: the response is cut off.
    let req = Request::get(format!("http://{}/", proxy.http))
        .header("host", "c.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, c.request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect()).await.unwrap();
    assert!(body.is_err(), "a stalled body must end with an error");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn send_timeout_gives_504_when_the_upstream_stops_reading() {
    let cancel = CancellationToken::new();
    // Reads the first bytes of the request, then nothing more.
    let stall = stalling_backend(&cancel, false).await;
    let live = backend("took-it", &cancel).await;
    let yaml = CLASS.to_string()
        + &service("stall", &[stall], None)
        + &service("live", &[live], None)
        + &ingress("a", "a.test", "stall", &format!("{A}proxy-send-timeout: '1'"))
        + &ingress(
            "b",
            "b.test",
            "live",
            &format!("{A}proxy-send-timeout: '1', {A}proxy-read-timeout: '5'"),
        );
    let proxy = start(parse(&yaml)).await;
    let c = client();
    // Far more than the socket buffers hold.
    let big = "x".repeat(48 << 20);
    let (status, _) = send(&c, proxy.http, "POST", "a.test", "/", &[], &big).await;
    assert_eq!(status, 504);
    // A backend that reads the body answers as usual.
    let (status, body) = send(&c, proxy.http, "POST", "b.test", "/", &[], &big[..(4 << 20)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("body-bytes: {}", 4 << 20)), "{body}");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn next_upstream_tries_walks_past_dead_endpoints() {
    let cancel = CancellationToken::new();
    let live = backend("live", &cancel).await;
    let dead1 = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dead2 = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let failing: Handler = Arc::new(|_, _| (503, "busy".into()));
    let busy = server("127.0.0.1", None, failing, &cancel).await;
    let ok = server("127.0.0.1", None, describe("ok"), &cancel).await;
    let yaml = CLASS.to_string()
        + &service("s3", &[dead1, dead2, live], None)
        + &service("s1", &[dead1, dead2, live], None)
        + &service("flaky", &[busy, ok], None)
        + &service("flaky2", &[busy, ok], None)
        + &ingress(
            "three",
            "three.test",
            "s3",
            &format!("{A}proxy-next-upstream-tries: '3'"),
        )
        + &ingress("one", "one.test", "s1", &format!("{A}proxy-next-upstream-tries: '1'"))
        + &ingress(
            "status",
            "status.test",
            "flaky",
            &format!("{A}proxy-next-upstream: 'error timeout http_503'"),
        )
        + &ingress("nostatus", "nostatus.test", "flaky2", "");
    let proxy = start(parse(&yaml)).await;
    let c = client();
    // One try: round robin over two dead and one live endpoint fails twice
    // in the first three requests.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get(&c, proxy.http, "one.test", "/").await.0);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 502, 502]);
    // Three tries: every request gets through.
    for _ in 0..9 {
        let (status, body) = get(&c, proxy.http, "three.test", "/").await;
        assert_eq!(status, 200, "{body}");
    }
    // http_503: the 503 is retried on the other endpoint (GET and POST
    // without body are replayable only when idempotent: GET here).
    for _ in 0..6 {
        let (status, body) = get(&c, proxy.http, "status.test", "/").await;
        assert_eq!(status, 200, "{body}");
    }
    // Without it, the 503 reaches the client.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(&c, proxy.http, "nostatus.test", "/").await.0);
    }
    assert!(seen.contains(&503) && seen.contains(&200), "{seen:?}");
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn custom_http_errors_come_from_the_default_backend() {
    let cancel = CancellationToken::new();
    // The error backend answers with the status in X-Code and echoes the headers.
    let pages: Handler = Arc::new(|p, _| {
        let code: u16 = p.headers["x-code"].to_str().unwrap().parse().unwrap();
        let mut text = format!("error page {} {}\n", p.method, p.uri);
        for name in [
            "x-code",
            "x-format",
            "x-original-uri",
            "x-namespace",
            "x-ingress-name",
            "x-service-name",
            "x-service-port",
            "x-request-id",
            "host",
        ] {
            if let Some(v) = p.headers.get(name) {
                text += &format!("{name}: {}\n", v.to_str().unwrap());
            }
        }
        (code, text)
    });
    let errors = server("127.0.0.1", None, pages, &cancel).await;
    let app: Handler = Arc::new(|p, _| match p.uri.path() {
        "/missing" => (404, "app 404".into()),
        "/teapot" => (418, "app 418".into()),
        _ => (503, "app 503".into()),
    });
    let app = server("127.0.0.1", None, app, &cancel).await;
    let fallback = backend("fallback", &cancel).await;
    let annotations = format!("{A}custom-http-errors: '404,503', {A}default-backend: errors");
    let yaml = CLASS.to_string()
        + &service("errors", &[errors], None)
        + &service("app", &[app], None)
        + &service("fallback", &[fallback], None)
        + &service("empty", &[], None)
        + &ingress("errs", "errs.test", "app", &annotations)
        + &ingress("db", "db.test", "empty", &format!("{A}default-backend: fallback"));
    let proxy = start(parse(&yaml)).await;
    let c = client();
    let (status, body) = send(
        &c,
        proxy.http,
        "GET",
        "errs.test",
        "/page?x=1",
        &[("accept", "application/json"), ("x-request-id", "req-7")],
        "",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    for want in [
        "error page GET /?x=1",
        "x-code: 503",
        "x-format: application/json",
        "x-original-uri: /page?x=1",
        "x-namespace: default",
        "x-ingress-name: errs",
        "x-service-name: app",
        "x-service-port: 80",
        "x-request-id: req-7",
        "host: errs.test",
    ] {
        assert!(body.contains(want), "{want:?} in {body}");
    }
    let (status, body) = send(&c, proxy.http, "POST", "errs.test", "/missing", &[], "data").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.starts_with("error page POST /\n"), "{body}");
    // Codes not listed pass through.
    let (status, body) = get(&c, proxy.http, "errs.test", "/teapot").await;
    assert_eq!((status, body.as_str()), (418, "app 418"));
    // default-backend alone: it answers for a Service without endpoints.
    let (status, body) = get(&c, proxy.http, "db.test", "/any").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("fallback\nGET /any"), "{body}");
    proxy.stop().await;
    cancel.cancel();
}
