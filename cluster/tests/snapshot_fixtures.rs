//! YAML fixtures → Snapshot contents: namespace defaulting, multi-slice
//! services, endpoint conditions and the usable-backend rule.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::net::IpAddr;
use std::path::PathBuf;

use ferry_cluster::{files, Kind, Snapshot};

fn fixture(name: &str) -> Snapshot {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let (objects, errors) = files::load(&[path]);
    assert!(errors.is_empty(), "{errors:?}");
    Snapshot::from_objects(1, objects)
}

fn ips(list: &[ferry_cluster::Backend]) -> Vec<(String, u16)> {
    list.iter().map(|b| (b.ip.to_string(), b.port)).collect()
}

#[test]
fn namespaces_default_and_are_synthesized() {
    let snap = fixture("multi.yaml");
    assert!(snap.service("default", "web").is_some());
    assert!(snap.service("other", "drain").is_some());
    assert!(snap.has_namespace("default"));
    assert!(snap.has_namespace("other"));
    assert!(snap.pod("default", "redis-sts-0").is_some());
}

#[test]
fn slices_merge_per_service_and_deduplicate() {
    let snap = fixture("multi.yaml");
    let web = snap.service("default", "web").unwrap();
    assert_eq!(snap.slices(&web.key).len(), 2);
    let http = web.port_named("http").unwrap();
    assert_eq!(
        ips(&snap.backends(web, http)),
        vec![
            ("10.1.0.1".into(), 8080),
            ("10.1.0.2".into(), 8080),
            ("10.1.0.3".into(), 8080)
        ]
    );
    // Only the ready one is used while one is ready.
    assert_eq!(ips(&snap.usable_backends(web, http)), vec![("10.1.0.1".into(), 8080)]);
    // The UDP port only exists in one slice, with its own target port.
    let dns = web.port_named("dns").unwrap();
    assert_eq!(
        ips(&snap.backends(web, dns)),
        vec![("10.1.0.1".into(), 5353), ("10.1.0.2".into(), 5353)]
    );
}

#[test]
fn terminating_fallback_when_none_ready() {
    let snap = fixture("multi.yaml");
    let svc = snap.service("other", "drain").unwrap();
    let port = &svc.ports[0];
    assert_eq!(snap.backends(svc, port).len(), 2);
    // serving+terminating is used, not-serving terminating is not.
    assert_eq!(ips(&snap.usable_backends(svc, port)), vec![("10.2.0.1".into(), 8080)]);
}

#[test]
fn tls_and_opaque_secrets_and_dns_fields_of_pods() {
    let snap = fixture("multi.yaml");
    let counts: std::collections::HashMap<Kind, usize> = snap.counts().into_iter().collect();
    assert_eq!(counts[&Kind::Secret], 2);
    let secret = snap.secret("other", "tls").unwrap();
    assert_eq!(secret.cert_pem(), b"CERT");
    assert_eq!(
        snap.secret("default", "opaque").unwrap().get("password"),
        Some(&b"hunter2"[..])
    );
    let pod = snap.pod("default", "redis-sts-0").unwrap();
    assert_eq!(pod.ips, vec!["10.1.5.5".parse::<IpAddr>().unwrap()]);
    assert_eq!(pod.hostname.as_deref(), Some("redis-sts-0"));
    assert_eq!(pod.subdomain.as_deref(), Some("redis-svc"));
    assert!(pod.ready);
    let node = snap.node("n1").unwrap();
    assert_eq!(node.zone.as_deref(), Some("zone-a"));
    assert_eq!(node.ips(), vec!["192.168.49.2".parse::<IpAddr>().unwrap()]);
}

#[test]
fn seed_manifests_load_with_their_unrelated_kinds() {
    let seed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/seed");
    let (objects, errors) = files::load(&[seed]);
    assert!(errors.is_empty(), "{errors:?}");
    let snap = Snapshot::from_objects(1, objects);
    let wp = snap.service("default", "wp-svc").unwrap();
    assert_eq!(wp.ports[0].node_port, Some(30088));
    assert_eq!(wp.ports[0].name, "http80");
    let ing = snap.ingress("default", "wp-ing").unwrap();
    assert_eq!(ing.class_name.as_deref(), Some("wp-ink"));
    assert_eq!(
        ing.annotations.get("nginx.org/lb-method").map(String::as_str),
        Some("round_robin")
    );
    assert_eq!(
        snap.ingress_class("wp-ink").unwrap().controller,
        "nginx.org/ingress-controller"
    );
    // No EndpointSlices in the seed: the service has no endpoints.
    assert!(snap.backends(wp, &wp.ports[0]).is_empty());
}
