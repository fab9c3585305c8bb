//! Client-certificate authentication (`auth-tls-*`) over real TLS on
//! loopback: an rcgen CA, a client certificate it signed, one another CA
//! signed, and none; the `ssl-client-*` headers the echo backend receives;
//! hosts without the annotations unaffected.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_cluster::{Object, ObjectKey, Secret};
use ferry_ingress::EngineConfig;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

mod common;
use common::service;
use common::{backend, parse, CLASS};

const TIMEOUT: Duration = Duration::from_secs(20);
const HOSTS: [&str; 6] = ["m.test", "o.test", "p.test", "e.test", "d.test", "n.test"];
const A: &str = "nginx.ingress.kubernetes.io/";

struct Ca {
    cert: rcgen::Certificate,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

fn ca(cn: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    Ca {
        cert: params.self_signed(&key).unwrap(),
        params,
        key,
    }
}

/// A client certificate for `cn` signed by `ca`, with its key.
fn client_cert(ca: &Ca, cn: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn secret(name: &str, type_: &str, data: &[(&str, String)]) -> Object {
    Object::Secret(Arc::new(Secret {
        key: ObjectKey::new("default", name),
        type_: type_.into(),
        data: data
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
            .collect(),
    }))
}

fn ingress(name: &str, host: &str, annotations: &[(&str, &str)]) -> String {
    let ann: Vec<String> = annotations.iter().map(|(k, v)| format!("{A}{k}: '{v}'")).collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{}}}}}\nspec:\n  ingressClassName: ferry\n  tls: [{{hosts: [{host}], secretName: srv}}]\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: 80}}}}}}}}]}}\n---\n",
        ann.join(", ")
    )
}

struct Setup {
    serving: common::Serving,
    server_pem: String,
    good: (CertificateDer<'static>, PrivateKeyDer<'static>),
    bad: (CertificateDer<'static>, PrivateKeyDer<'static>),
    _cancel: CancellationToken,
}

async fn setup() -> Setup {
    let cancel = CancellationToken::new();
    let b = backend("mtls-backend", &cancel).await;
    let trusted = ca("Test CA");
    let other = ca("Other CA");
    let server = rcgen::generate_simple_self_signed(HOSTS.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    let yaml = CLASS.to_string()
        + &service("s", &[b], None)
        + &ingress(
            "mtls",
            "m.test",
            &[
                ("auth-tls-secret", "default/ca"),
                ("auth-tls-verify-client", "on"),
                ("auth-tls-verify-depth", "1"),
                ("auth-tls-pass-certificate-to-upstream", "true"),
            ],
        )
        + &ingress("open", "o.test", &[])
        + &ingress(
            "optional",
            "p.test",
            &[
                ("auth-tls-secret", "default/ca"),
                ("auth-tls-verify-client", "optional"),
            ],
        )
        + &ingress(
            "errpage",
            "e.test",
            &[
                ("auth-tls-secret", "default/ca"),
                ("auth-tls-error-page", "https://login.test/cert-needed"),
            ],
        )
        + &ingress("denied", "d.test", &[("auth-tls-secret", "default/missing")])
        + &ingress(
            "nocheck",
            "n.test",
            &[
                ("auth-tls-secret", "default/ca"),
                ("auth-tls-verify-client", "optional_no_ca"),
                ("auth-tls-match-cn", "CN=alice"),
            ],
        );
    let mut objects = parse(&yaml);
    objects.push(secret("ca", "Opaque", &[("ca.crt", trusted.cert.pem())]));
    objects.push(secret(
        "srv",
        "kubernetes.io/tls",
        &[
            ("tls.crt", server.cert.pem()),
            ("tls.key", server.signing_key.serialize_pem()),
        ],
    ));
    let serving = common::serve(EngineConfig::default(), objects).await;
    let problems: Vec<String> = serving.engine.table().problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("Ingress default/denied metadata.annotations[nginx.ingress.kubernetes.io/auth-tls-secret]: Secret default/missing not found"),
        "{problems:?}"
    );
    Setup {
        good: client_cert(&trusted, "alice"),
        bad: client_cert(&other, "mallory"),
        serving,
        server_pem: server.cert.pem(),
        _cancel: cancel,
    }
}

type Identity = Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>;

/// GET https://`host`/ over a TLS connection with SNI `sni`, presenting
/// `identity`; returns (status, headers as text, body).
async fn get(s: &Setup, sni: &str, host: &str, identity: &Identity, extra: &[(&str, &str)]) -> (u16, String, String) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut s.server_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(s.serving.https).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get("/").header("host", host);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(TIMEOUT, send.send_request(req.body(Empty::<Bytes>::new()).unwrap()))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let headers: String = resp
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("")))
        .collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[tokio::test]
async fn verify_on_requires_a_certificate_of_the_ca() {
    let s = setup().await;
    let good = Some((s.good.0.clone(), s.good.1.clone_key()));
    let bad = Some((s.bad.0.clone(), s.bad.1.clone_key()));

    // A certificate of the CA: through, with the headers ingress-nginx sets
    // (a client's own ssl-client-verify is replaced).
    let (status, _, body) = get(
        &s,
        "m.test",
        "m.test",
        &good,
        &[("ssl-client-verify", "SUCCESS-spoofed")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.lines().next(), Some("mtls-backend"));
    assert_eq!(header(&body, "ssl-client-verify"), Some("SUCCESS"), "{body}");
    assert_eq!(header(&body, "ssl-client-subject-dn"), Some("CN=alice"), "{body}");
    assert_eq!(header(&body, "ssl-client-issuer-dn"), Some("CN=Test CA"), "{body}");
    let escaped = header(&body, "ssl-client-cert").unwrap();
    assert!(escaped.starts_with("-----BEGIN%20CERTIFICATE-----%0A"), "{escaped}");
    assert!(escaped.ends_with("-----END%20CERTIFICATE-----%0A"), "{escaped}");
    assert_eq!(body.matches("ssl-client-verify").count(), 1, "{body}");

    // Another CA's certificate, and none: 400, as nginx answers.
    let (status, _, body) = get(&s, "m.test", "m.test", &bad, &[]).await;
    assert_eq!(status, 400);
    assert!(body.contains("The SSL certificate error"), "{body}");
    let (status, _, body) = get(&s, "m.test", "m.test", &None, &[]).await;
    assert_eq!(status, 400);
    assert!(body.contains("No required SSL certificate was sent"), "{body}");

    // Another SNI (whose handshake asks for no certificate) does not get
    // around the check: the request's host decides.
    let (status, _, _) = get(&s, "o.test", "m.test", &good, &[]).await;
    assert_eq!(status, 400);
    s.serving.cancel.cancel();
}

#[tokio::test]
async fn hosts_without_the_annotation_are_unaffected() {
    let s = setup().await;
    let good = Some((s.good.0.clone(), s.good.1.clone_key()));
    for identity in [&None, &good] {
        let (status, _, body) = get(&s, "o.test", "o.test", identity, &[]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&body, "ssl-client-verify"), None, "{body}");
        assert_eq!(header(&body, "ssl-client-cert"), None, "{body}");
    }
    s.serving.cancel.cancel();
}

#[tokio::test]
async fn optional_modes_error_page_match_cn_and_a_missing_ca() {
    let s = setup().await;
    let good = Some((s.good.0.clone(), s.good.1.clone_key()));
    let bad = Some((s.bad.0.clone(), s.bad.1.clone_key()));

    // optional: none passes (NONE), a bad one does not.
    let (status, _, body) = get(&s, "p.test", "p.test", &None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&body, "ssl-client-verify"), Some("NONE"), "{body}");
    assert_eq!(header(&body, "ssl-client-cert"), None, "not asked for: {body}");
    let (status, _, _) = get(&s, "p.test", "p.test", &bad, &[]).await;
    assert_eq!(status, 400);
    let (status, _, body) = get(&s, "p.test", "p.test", &good, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&body, "ssl-client-verify"), Some("SUCCESS"), "{body}");

    // The error page: a 302 there instead of the 400.
    let (status, headers, _) = get(&s, "e.test", "e.test", &None, &[]).await;
    assert_eq!(status, 302);
    assert!(
        headers.contains("location: https://login.test/cert-needed\n"),
        "{headers}"
    );

    // optional_no_ca passes an unverified certificate (FAILED:...), but
    // match-cn still wants CN=alice: 403 for mallory.
    let (status, _, body) = get(&s, "n.test", "n.test", &good, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&body, "ssl-client-verify"), Some("SUCCESS"), "{body}");
    let (status, _, body) = get(&s, "n.test", "n.test", &bad, &[]).await;
    assert_eq!(status, 403, "{body}");

    // A CA Secret that does not exist denies the Ingress's paths (503),
    // with and without a certificate, and over plain HTTP too.
    for identity in [&None, &good] {
        let (status, _, _) = get(&s, "d.test", "d.test", identity, &[]).await;
        assert_eq!(status, 503);
    }
    let tcp = TcpStream::connect(s.serving.http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "d.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 503);
    s.serving.cancel.cancel();
}
