//! HTTPS connections on the lean HTTP/1.1 path, as a client sees them:
//! responses larger than one TLS record, pipelined requests in one
//! record, key updates, and how either side ends the session
//! (`close_notify`). Everything on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::{Object, ObjectKey, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

mod common;
use common::{backend, parse, service, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);
const HOST: &str = "tls.test";

/// A proxy with one TLS host routed to an echo backend answering `body`;
/// returns it and the certificate (PEM) to trust.
async fn proxy_with_tls(body: &str, cancel: &CancellationToken) -> (common::Serving, String) {
    let b = backend(body, cancel).await;
    let ck = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    let secret = Object::Secret(Arc::new(Secret {
        key: ObjectKey::new("default", "tls"),
        type_: "kubernetes.io/tls".into(),
        data: [
            ("tls.crt".to_string(), ck.cert.pem().into_bytes()),
            ("tls.key".to_string(), ck.signing_key.serialize_pem().into_bytes()),
        ]
        .into(),
    }));
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i}}\nspec:\n  ingressClassName: ferry\n  tls: [{{hosts: [{HOST}], secretName: tls}}]\n  rules:\n  - host: {HOST}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: 80}}}}}}}}]}}\n"
        );
    let mut objects = parse(&yaml);
    objects.push(secret);
    let proxy = common::serve(common::test_config(), objects).await;
    (proxy, ck.cert.pem())
}

/// A TLS 1.3 client connection with ALPN http/1.1 (the lean path's).
async fn connect(proxy: &common::Serving, pem: &str) -> TlsStream<TcpStream> {
    connect_with(proxy, pem, &rustls::version::TLS13).await
}

/// `connect`, speaking only `version`.
async fn connect_with(
    proxy: &common::Serving,
    pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap()
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n")
}

/// Reads one response (Content-Length framed) from `tls`, keeping what
/// follows it in `pending`; returns the head and the body.
async fn read_response(tls: &mut TlsStream<TcpStream>, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut chunk = vec![0u8; 64 * 1024];
    // Bounded: every turn reads bytes or fails; the timeout bounds time.
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(pending[..end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .expect("a content-length")
                .trim()
                .parse()
                .unwrap();
            if pending.len() >= end + 4 + len {
                let body = pending[end + 4..end + 4 + len].to_vec();
                pending.drain(..end + 4 + len);
                return (head, body);
            }
        }
        let n = tokio::time::timeout(TIMEOUT, tls.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection ended inside a response: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_response_larger_than_a_tls_record_arrives_whole() {
    let cancel = CancellationToken::new();
    // 200 KiB: a dozen 16 KiB records, more than one socket buffer's
    // worth of writes at a time; over TLS 1.3 and 1.2.
    let big: String = (0..200 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let (proxy, pem) = proxy_with_tls(&big, &cancel).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let mut tls = connect_with(&proxy, &pem, version).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        let mut pending = Vec::new();
        for path in ["/first", "/second"] {
            tls.write_all(get(path, "").as_bytes()).await.unwrap();
            let (head, body) = read_response(&mut tls, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(body.starts_with(big.as_bytes()), "body differs from the backend's");
            let info = String::from_utf8_lossy(&body[big.len()..]).to_string();
            assert!(info.starts_with(&format!("\nGET {path} HTTP/1.1\n")), "{info}");
            assert!(info.contains("x-forwarded-proto: https"), "{info}");
        }
        assert!(pending.is_empty());
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn pipelined_requests_in_one_record_are_answered_in_order() {
    let cancel = CancellationToken::new();
    let (proxy, pem) = proxy_with_tls("pipelined", &cancel).await;
    let mut tls = connect(&proxy, &pem).await;
    let paths = ["/one", "/two", "/three", "/four"];
    // One write: one TLS record with four request heads.
    let all: String = paths.iter().map(|p| get(p, "")).collect();
    tls.write_all(all.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    for path in paths {
        let (head, body) = read_response(&mut tls, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let body = String::from_utf8(body).unwrap();
        assert!(body.starts_with(&format!("pipelined\nGET {path} HTTP/1.1\n")), "{body}");
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn requests_go_on_after_the_client_updates_its_keys() {
    let cancel = CancellationToken::new();
    let (proxy, pem) = proxy_with_tls("rekeyed", &cancel).await;
    let mut tls = connect(&proxy, &pem).await;
    let mut pending = Vec::new();
    for round in 0..3 {
        // Asks the server to update its keys too (update_requested).
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(get(&format!("/after-update-{round}"), "").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut tls, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.starts_with(&format!("rekeyed\nGET /after-update-{round} HTTP/1.1\n")),
            "{body}"
        );
    }
    proxy.stop().await;
    cancel.cancel();
}

#[tokio::test]
async fn either_side_ends_the_session_with_close_notify() {
    let cancel = CancellationToken::new();
    let (proxy, pem) = proxy_with_tls("bye", &cancel).await;

    // The server closes (Connection: close): the response, then a clean
    // end of the TLS stream (read 0, not UnexpectedEof).
    let mut tls = connect(&proxy, &pem).await;
    tls.write_all(get("/close", "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let mut pending = Vec::new();
    let (head, _) = read_response(&mut tls, &mut pending).await;
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut rest))
        .await
        .unwrap()
        .expect("a clean close_notify, not a bare TCP end");
    assert!(rest.is_empty());

    // The client closes after a response: the server answers with its own
    // close_notify.
    let mut tls = connect(&proxy, &pem).await;
    tls.write_all(get("/then-close", "").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut tls, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut rest))
        .await
        .unwrap()
        .expect("the server's close_notify, not a bare TCP end");
    assert!(rest.is_empty());
    proxy.stop().await;
    cancel.cancel();
}
