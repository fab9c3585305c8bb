use super::*;
use crate::routes::{compile, ClassSelection, RouteTable};

const BASE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress-controller}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: errors}
spec:
  clusterIP: 10.96.0.12
  ports: [{name: http, port: 8081, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: grpc-1, labels: {kubernetes.io/service-name: grpc}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.2]
---
apiVersion: v1
kind: Secret
metadata: {name: upstream-ca}
type: Opaque
stringData:
  ca.crt: "not a certificate"
---
"#;

/// A table for one Ingress `i` with `annotations`, routing host `h` path
/// `/` to `web` and `/g` to `grpc`, plus `extra` objects.
fn table(annotations: &str, extra: &str) -> RouteTable {
    let text = format!(
        "{BASE}{extra}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: h\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}\n      - {{path: /g, pathType: Prefix, backend: {{service: {{name: grpc, port: {{number: 80}}}}}}}}\n"
    );
    compile(&crate::test_support::snapshot(&text), &ClassSelection::default())
}

fn spec<'a>(t: &'a RouteTable, path: &str) -> &'a crate::routes::UpstreamSpec {
    let m = t.route("h", path).unwrap();
    &t.upstreams[m.upstream]
}

fn policy(t: &RouteTable) -> &UpstreamPolicy {
    &t.policies[0].upstream
}

fn problems(t: &RouteTable) -> Vec<String> {
    t.problems.iter().map(ToString::to_string).collect()
}

const P: &str = "nginx.ingress.kubernetes.io/";

#[test]
fn backend_protocol_selects_h2_and_tls() {
    // (annotations, web (h2, tls), grpc (h2, tls), problem expected)
    type Case<'a> = (&'a str, (bool, bool), (bool, bool), bool);
    let cases: &[Case] = &[
        ("", (false, false), (false, false), false),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: HTTP",
            (false, false),
            (false, false),
            false,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: https",
            (false, true),
            (false, true),
            false,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: GRPC",
            (true, false),
            (true, false),
            false,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: GRPCS",
            (true, true),
            (true, true),
            false,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: H2C",
            (true, false),
            (true, false),
            false,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: FCGI",
            (false, false),
            (false, false),
            true,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: AUTO_HTTP",
            (false, false),
            (false, false),
            true,
        ),
        (
            "nginx.ingress.kubernetes.io/backend-protocol: SPDY",
            (false, false),
            (false, false),
            true,
        ),
        ("nginx.org/ssl-services: web", (false, true), (false, false), false),
        ("nginx.org/grpc-services: grpc", (false, false), (true, false), false),
        (
            "nginx.org/ssl-services: 'web, grpc', nginx.org/grpc-services: grpc",
            (false, true),
            (true, true),
            false,
        ),
    ];
    for (annotations, web, grpc, problem) in cases {
        let t = table(annotations, "");
        let got = |path| {
            let s = spec(&t, path);
            (s.h2c, s.tls.is_some())
        };
        assert_eq!(got("/"), *web, "{annotations}: web\n{}", t.render());
        assert_eq!(got("/g"), *grpc, "{annotations}: grpc");
        assert_eq!(!t.problems.is_empty(), *problem, "{annotations}: {:?}", problems(&t));
    }
}

#[test]
fn tls_settings_follow_ingress_nginx() {
    // Default: no verification, no SNI, name <service>.<namespace>.svc.
    let t = table("nginx.ingress.kubernetes.io/backend-protocol: HTTPS", "");
    let tls = spec(&t, "/").tls.as_ref().unwrap();
    assert!(tls.describe().contains("verify=off"), "{}", tls.describe());
    assert!(tls.describe().contains("sni=off"), "{}", tls.describe());
    assert!(tls.describe().contains("name=web.default.svc"), "{}", tls.describe());
    assert!(tls.describe().contains("alpn=http/1.1"), "{}", tls.describe());
    assert!(!tls.config.enable_sni);
    assert!(t.problems.is_empty(), "{:?}", problems(&t));

    // Without the Secret the other proxy-ssl annotations do nothing (reported).
    let t = table(
        "nginx.ingress.kubernetes.io/backend-protocol: HTTPS, nginx.ingress.kubernetes.io/proxy-ssl-verify: 'on'",
        "",
    );
    assert!(spec(&t, "/").tls.as_ref().unwrap().describe().contains("verify=off"));
    assert!(
        problems(&t).iter().any(|p| p.contains("proxy-ssl-secret")),
        "{:?}",
        problems(&t)
    );

    // With it: verification, SNI, the name, depth, protocols.
    let t = table(
        "nginx.ingress.kubernetes.io/backend-protocol: GRPCS, nginx.ingress.kubernetes.io/proxy-ssl-secret: default/upstream-ca, \
         nginx.ingress.kubernetes.io/proxy-ssl-verify: 'on', nginx.ingress.kubernetes.io/proxy-ssl-server-name: 'on', \
         nginx.ingress.kubernetes.io/proxy-ssl-name: backend.internal, nginx.ingress.kubernetes.io/proxy-ssl-verify-depth: '2', \
         nginx.ingress.kubernetes.io/proxy-ssl-protocols: 'TLSv1.1 TLSv1.3'",
        "",
    );
    let tls = spec(&t, "/").tls.as_ref().unwrap();
    let d = tls.describe();
    for want in [
        "verify=on",
        "depth=2",
        "sni=on",
        "TLSv1_3",
        "name=backend.internal",
        "alpn=h2",
        "secret=default/upstream-ca",
    ] {
        assert!(d.contains(want), "{want} in {d}");
    }
    assert!(!d.contains("TLSv1_2"), "{d}");
    assert!(tls.config.enable_sni);
    assert_eq!(tls.config.alpn_protocols, vec![b"h2".to_vec()]);
    // ca.crt holds no certificate: reported (and nothing verifies).
    assert!(
        problems(&t).iter().any(|p| p.contains("no CA certificate")),
        "{:?}",
        problems(&t)
    );

    // Bad values are reported.
    for bad in [
        "proxy-ssl-verify: maybe",
        "proxy-ssl-protocols: SSLv3",
        "proxy-ssl-verify-depth: x",
    ] {
        let t = table(
            &format!("{P}backend-protocol: HTTPS, {P}proxy-ssl-secret: default/upstream-ca, {P}{bad}"),
            "",
        );
        let (name, _) = bad.split_once(':').unwrap();
        assert!(
            problems(&t).iter().any(|p| p.contains(name)),
            "{bad}: {:?}",
            problems(&t)
        );
    }
    // Another namespace's Secret and a missing Secret are refused.
    for (secret, why) in [
        ("other/upstream-ca", "another namespace"),
        ("default/nope", "not found"),
    ] {
        let t = table(
            &format!("{P}backend-protocol: HTTPS, {P}proxy-ssl-secret: {secret}"),
            "",
        );
        assert!(
            problems(&t).iter().any(|p| p.contains(why)),
            "{secret}: {:?}",
            problems(&t)
        );
    }
    // proxy-ssl annotations without a TLS backend have no effect.
    let t = table(&format!("{P}proxy-ssl-verify: 'on'"), "");
    assert!(spec(&t, "/").tls.is_none());
    assert!(
        problems(&t).iter().any(|p| p.contains("no effect")),
        "{:?}",
        problems(&t)
    );
}

#[test]
fn pools_are_keyed_by_tls_settings() {
    let a = table(&format!("{P}backend-protocol: HTTPS"), "");
    let b = table(&format!("{P}backend-protocol: HTTPS"), "");
    let c = table(
        &format!("{P}backend-protocol: HTTPS, {P}proxy-ssl-secret: default/upstream-ca"),
        "",
    );
    let (ta, tb, tc) = (
        spec(&a, "/").tls.as_ref().unwrap(),
        spec(&b, "/").tls.as_ref().unwrap(),
        spec(&c, "/").tls.as_ref().unwrap(),
    );
    // Compiled twice: equal (endpoint state survives a reload).
    assert_eq!(ta, tb);
    assert_eq!(ta.id(), tb.id());
    assert_ne!(ta, tc);
    // The same settings with other key material are another identity.
    let d = table(
        &format!("{P}backend-protocol: HTTPS, {P}proxy-ssl-secret: default/upstream-ca"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: upstream-ca}\ntype: Opaque\nstringData:\n  ca.crt: other\n",
    );
    let td = spec(&d, "/").tls.as_ref().unwrap();
    assert_eq!(td.describe(), tc.describe());
    assert_ne!(td, tc);
    let live_a = crate::upstream::LiveTable::build(Arc::new(a.clone()), &Default::default(), 1);
    let live_b = crate::upstream::LiveTable::build(Arc::new(b.clone()), &live_a, 1);
    assert!(Arc::ptr_eq(
        &live_a.upstreams[0].endpoints[0],
        &live_b.upstreams[0].endpoints[0]
    ));
    let live_c = crate::upstream::LiveTable::build(Arc::new(c.clone()), &live_b, 1);
    assert!(!Arc::ptr_eq(
        &live_b.upstreams[0].endpoints[0],
        &live_c.upstreams[0].endpoints[0]
    ));
    let plain = table("", "");
    let live_p = crate::upstream::LiveTable::build(Arc::new(plain), &live_a, 1);
    assert!(live_p.upstreams[0].endpoints[0].tls.is_none());
    assert!(!Arc::ptr_eq(
        &live_a.upstreams[0].endpoints[0],
        &live_p.upstreams[0].endpoints[0]
    ));
}

#[test]
fn next_upstream_conditions() {
    let r = |v: &str| Retry::parse(v);
    assert_eq!(r("off"), Ok(Retry::OFF));
    assert_eq!(r("error off"), Ok(Retry::OFF));
    let et = r("error timeout").unwrap();
    assert!(et.error && et.connect_timeout && et.read_timeout && !et.non_idempotent);
    assert!(!et.retries_statuses());
    let e = r("error").unwrap();
    assert!(e.error && !e.connect_timeout && !e.read_timeout);
    let s = r("http_502 http_503 non_idempotent").unwrap();
    assert!(!s.error && s.non_idempotent);
    for (code, want) in [(502, true), (503, true), (500, false), (504, false), (200, false)] {
        assert_eq!(s.on_status(StatusCode::from_u16(code).unwrap()), want, "{code}");
    }
    let all = r("http_500 http_502 http_503 http_504 http_403 http_404 http_429 invalid_header").unwrap();
    for code in [500, 502, 503, 504, 403, 404, 429] {
        assert!(all.on_status(StatusCode::from_u16(code).unwrap()), "{code}");
    }
    assert!(all.error);
    for bad in ["", "http_418", "sometimes", "http_5xx"] {
        assert!(r(bad).is_err(), "{bad:?}");
    }
    assert_eq!(Retry::DEFAULT.describe(), "error");
    assert_eq!(s.describe(), "non_idempotent http_502 http_503");
}

#[test]
fn timeouts_and_tries_override_the_engine() {
    let engine = UpstreamConfig::default();
    // (annotations, connect, header, attempts with 4 endpoints)
    let cases: &[(&str, u64, u64, usize)] = &[
        ("", 5, 60, 3),
        ("nginx.ingress.kubernetes.io/proxy-connect-timeout: '2'", 2, 60, 3),
        ("nginx.ingress.kubernetes.io/proxy-read-timeout: '7'", 5, 7, 3),
        (
            "nginx.org/proxy-read-timeout: 9s, nginx.org/proxy-connect-timeout: 1m",
            60,
            9,
            3,
        ),
        // ingress-nginx's name wins over NGINX IC's.
        (
            "nginx.ingress.kubernetes.io/proxy-read-timeout: '3', nginx.org/proxy-read-timeout: 9s",
            5,
            3,
            3,
        ),
        ("nginx.ingress.kubernetes.io/proxy-next-upstream-tries: '2'", 5, 60, 2),
        ("nginx.ingress.kubernetes.io/proxy-next-upstream-tries: '0'", 5, 60, 4),
        ("nginx.ingress.kubernetes.io/proxy-next-upstream: 'off'", 5, 60, 1),
        // Bad values are ignored.
        ("nginx.ingress.kubernetes.io/proxy-read-timeout: '0'", 5, 60, 3),
        ("nginx.ingress.kubernetes.io/proxy-read-timeout: soon", 5, 60, 3),
    ];
    for (annotations, connect, header, attempts) in cases {
        let t = table(annotations, "");
        let c = policy(&t).config(&engine, 4);
        assert_eq!(c.connect_timeout, Duration::from_secs(*connect), "{annotations}");
        assert_eq!(c.header_timeout, Duration::from_secs(*header), "{annotations}");
        assert_eq!(c.max_attempts, *attempts, "{annotations}");
        assert_eq!(matches!(c, Cow::Borrowed(_)), !policy(&t).tuned, "{annotations}");
    }
    let t = table("nginx.ingress.kubernetes.io/proxy-send-timeout: '4'", "");
    assert_eq!(policy(&t).send_timeout, Some(Duration::from_secs(4)));
    let t = table("nginx.ingress.kubernetes.io/proxy-read-timeout: soon", "");
    assert_eq!(t.problems.len(), 1, "{:?}", problems(&t));
    assert!(policy(&table("", "")).plain);
}

#[test]
fn upstream_vhost_sets_host_and_authority() {
    let t = table("nginx.ingress.kubernetes.io/upstream-vhost: internal.example", "");
    let p = policy(&t);
    assert!(!p.plain);
    let mut req = Request::get("/x?y").header("host", "h").body(()).unwrap();
    p.fix_request(&mut req, false, false);
    assert_eq!(req.headers()["host"], "internal.example");
    let mut req = Request::get("http://h/x?y").body(()).unwrap();
    p.fix_request(&mut req, true, true);
    assert_eq!(req.uri().to_string(), "https://internal.example/x?y");
    let t = table("nginx.ingress.kubernetes.io/upstream-vhost: 'a b'", "");
    assert!(policy(&t).vhost.is_none());
    assert_eq!(t.problems.len(), 1);
}

#[test]
fn service_upstream_dials_the_cluster_ip() {
    let t = table("nginx.ingress.kubernetes.io/service-upstream: 'true'", "");
    let s = spec(&t, "/");
    let eps: Vec<String> = s.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(eps, vec!["10.96.0.10:80"]);
    // A different upstream from the same Service without the annotation.
    let plain = table("", "");
    assert_eq!(spec(&plain, "/").endpoints[0].addr.to_string(), "10.0.0.1:8080");
    // Headless: the endpoints, reported.
    let t = table(
        "nginx.ingress.kubernetes.io/service-upstream: 'true'",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: None\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    );
    assert_eq!(spec(&t, "/").endpoints[0].addr.to_string(), "10.0.0.1:8080");
    assert!(
        problems(&t).iter().any(|p| p.contains("no ClusterIP")),
        "{:?}",
        problems(&t)
    );
}

#[test]
fn custom_http_errors_and_default_backend() {
    let t = table(
        "nginx.ingress.kubernetes.io/custom-http-errors: '503,404, 500', nginx.ingress.kubernetes.io/default-backend: errors",
        "",
    );
    let p = policy(&t);
    assert_eq!(p.errors.as_ref().unwrap().codes, vec![404, 500, 503]);
    let i = p.default_backend_upstream.unwrap();
    assert_eq!(t.upstreams[i].name, "default/errors:8081");
    assert!(t.problems.is_empty(), "{:?}", problems(&t));

    // Errors without a default backend: reported, ignored.
    let t = table("nginx.ingress.kubernetes.io/custom-http-errors: '503'", "");
    assert!(policy(&t).errors.is_none());
    assert!(problems(&t)[0].contains("needs"), "{:?}", problems(&t));
    // Bad codes, bad names, missing Services.
    for (a, want) in [
        (
            "custom-http-errors: '200', nginx.ingress.kubernetes.io/default-backend: errors",
            "not an error status",
        ),
        ("default-backend: ns/errors", "not a Service name"),
        ("default-backend: nope", "not found"),
    ] {
        let t = table(&format!("{P}{a}"), "");
        assert!(problems(&t).iter().any(|p| p.contains(want)), "{a}: {:?}", problems(&t));
    }
}

#[test]
fn error_request_carries_ingress_nginx_headers() {
    let req = Request::get("/a/b?q=1")
        .header("accept", "application/json")
        .header("x-request-id", "abc")
        .body(())
        .unwrap();
    let host = HeaderValue::from_static("shop.example");
    let capture = ErrorRequest::capture(&req, Some(&host));
    let out = capture.request(
        StatusCode::SERVICE_UNAVAILABLE,
        &ObjectKey::new("shop", "front"),
        "shop/web:8080",
    );
    assert_eq!(out.uri().to_string(), "/?q=1");
    let h = out.headers();
    for (name, want) in [
        ("host", "shop.example"),
        ("x-code", "503"),
        ("x-format", "application/json"),
        ("x-original-uri", "/a/b?q=1"),
        ("x-namespace", "shop"),
        ("x-ingress-name", "front"),
        ("x-service-name", "web"),
        ("x-service-port", "8080"),
        ("x-request-id", "abc"),
    ] {
        assert_eq!(h[name], want, "{name}");
    }
}

#[test]
fn describe_lists_settings_without_secrets() {
    let t = table(
        "nginx.ingress.kubernetes.io/backend-protocol: HTTPS, nginx.ingress.kubernetes.io/proxy-ssl-secret: default/upstream-ca, \
         nginx.ingress.kubernetes.io/proxy-read-timeout: '7', nginx.ingress.kubernetes.io/upstream-vhost: v.example",
        "",
    );
    let lines = t.policies[0].describe().join("\n");
    for want in [
        "backend-protocol Https",
        "verify=off",
        "proxy-read-timeout 7s",
        "upstream Host v.example",
    ] {
        assert!(lines.contains(want), "{want} in {lines}");
    }
    assert!(!lines.contains("not a certificate"), "{lines}");
    assert!(!t.render().contains('#'), "{}", t.render());
    assert!(t.render().contains("tls(verify=off"), "{}", t.render());
}
