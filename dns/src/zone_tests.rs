//! Table-driven zone tests: manifests → query → expected outcome.

use std::path::Path;

use ferry_cluster::files::parse_documents;
use ferry_cluster::Snapshot;
use hickory_proto::rr::{Name, RecordType};

use super::*;

fn snapshot(text: &str) -> Snapshot {
    let objects: Vec<_> = parse_documents(Path::new("cluster.yaml"), text)
        .into_iter()
        .flat_map(|d| d.expect("fixture documents parse"))
        .collect();
    Snapshot::from_objects(7, objects)
}

fn fixture() -> Snapshot {
    snapshot(include_str!("../tests/fixtures/cluster.yaml"))
}

fn zone(pods: PodMode) -> Zone {
    Zone::build(
        &fixture(),
        &ZoneConfig {
            pods,
            ..ZoneConfig::default()
        },
    )
    .unwrap()
}

#[derive(Debug, PartialEq)]
enum Want {
    /// Answer and additional records as "name TYPE rdata", in any order.
    Answer(Vec<&'static str>, Vec<&'static str>),
    NoData,
    NxDomain,
    NotOurs,
}
use Want::*;

fn show(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data))
        .collect();
    v.sort();
    v
}

fn check(zone: &Zone, name: &str, qtype: RecordType, want: &Want) {
    let got = zone.lookup(&Name::from_ascii(name).unwrap(), qtype);
    match (want, &got) {
        (Answer(a, add), Lookup::Answer { answers, additionals }) => {
            let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            a.sort();
            let mut add: Vec<String> = add.iter().map(|s| s.to_string()).collect();
            add.sort();
            assert_eq!(show(answers), a, "answers of {name} {qtype}");
            assert_eq!(show(additionals), add, "additionals of {name} {qtype}");
            assert!(answers.iter().all(|r| r.ttl == 5), "ttl of {name} {qtype}");
        }
        (NoData, Lookup::NoData) | (NxDomain, Lookup::NxDomain) | (NotOurs, Lookup::NotOurs) => {}
        _ => panic!("{name} {qtype}: want {want:?}, got {got:?}"),
    }
}

#[test]
fn records_per_the_kubernetes_dns_spec() {
    use RecordType::*;
    let z = zone(PodMode::Insecure);
    let cases: Vec<(&str, RecordType, Want)> = vec![
        // ClusterIP A; AAAA of an IPv4-only service is NODATA.
        ("ngx-svc.default.svc.cluster.local.", A, Answer(vec!["ngx-svc.default.svc.cluster.local. A 10.96.0.90"], vec![])),
        ("ngx-svc.default.svc.cluster.local.", AAAA, NoData),
        ("ngx-svc.default.svc.cluster.local.", TXT, NoData),
        // Case-insensitive; the answer carries the query's spelling.
        ("NGX-Svc.Default.SVC.cluster.LOCAL.", A, Answer(vec!["NGX-Svc.Default.SVC.cluster.LOCAL. A 10.96.0.90"], vec![])),
        // Dual-stack ClusterIP.
        ("web.apps.svc.cluster.local.", A, Answer(vec!["web.apps.svc.cluster.local. A 10.96.0.10"], vec![])),
        ("web.apps.svc.cluster.local.", AAAA, Answer(vec!["web.apps.svc.cluster.local. AAAA fd00::10"], vec![])),
        ("web.apps.svc.cluster.local.", ANY, Answer(vec!["web.apps.svc.cluster.local. A 10.96.0.10", "web.apps.svc.cluster.local. AAAA fd00::10"], vec![])),
        // SRV for named ports of a ClusterIP service: targets itself, A/AAAA in additionals.
        (
            "_http._tcp.web.apps.svc.cluster.local.",
            SRV,
            Answer(
                vec!["_http._tcp.web.apps.svc.cluster.local. SRV 0 100 80 web.apps.svc.cluster.local."],
                vec!["web.apps.svc.cluster.local. A 10.96.0.10", "web.apps.svc.cluster.local. AAAA fd00::10"],
            ),
        ),
        (
            "_dns._udp.web.apps.svc.cluster.local.",
            SRV,
            Answer(
                vec!["_dns._udp.web.apps.svc.cluster.local. SRV 0 100 53 web.apps.svc.cluster.local."],
                vec!["web.apps.svc.cluster.local. A 10.96.0.10", "web.apps.svc.cluster.local. AAAA fd00::10"],
            ),
        ),
        ("_dns._tcp.web.apps.svc.cluster.local.", SRV, NxDomain),
        // The interior `_tcp` name exists: NODATA, not NXDOMAIN.
        ("_tcp.web.apps.svc.cluster.local.", SRV, NoData),
        // Headless StatefulSet: ready endpoints only, hostnames, SRV per endpoint.
        (
            "redis-svc.default.svc.cluster.local.",
            A,
            Answer(
                vec!["redis-svc.default.svc.cluster.local. A 10.244.0.10", "redis-svc.default.svc.cluster.local. A 10.244.0.11"],
                vec![],
            ),
        ),
        ("redis-sts-0.redis-svc.default.svc.cluster.local.", A, Answer(vec!["redis-sts-0.redis-svc.default.svc.cluster.local. A 10.244.0.10"], vec![])),
        ("redis-sts-0.redis-svc.default.svc.cluster.local.", AAAA, NoData),
        ("redis-sts-2.redis-svc.default.svc.cluster.local.", A, NxDomain),
        (
            "_redis._tcp.redis-svc.default.svc.cluster.local.",
            SRV,
            Answer(
                vec![
                    "_redis._tcp.redis-svc.default.svc.cluster.local. SRV 0 50 6379 redis-sts-0.redis-svc.default.svc.cluster.local.",
                    "_redis._tcp.redis-svc.default.svc.cluster.local. SRV 0 50 6379 redis-sts-1.redis-svc.default.svc.cluster.local.",
                ],
                vec![
                    "redis-sts-0.redis-svc.default.svc.cluster.local. A 10.244.0.10",
                    "redis-sts-1.redis-svc.default.svc.cluster.local. A 10.244.0.11",
                ],
            ),
        ),
        // Headless with no ready endpoints.
        ("idle-svc.default.svc.cluster.local.", A, NxDomain),
        ("_http._tcp.idle-svc.default.svc.cluster.local.", SRV, NxDomain),
        // publishNotReadyAddresses.
        ("pnr-svc.default.svc.cluster.local.", A, Answer(vec!["pnr-svc.default.svc.cluster.local. A 10.244.1.5"], vec![])),
        ("etcd-0.pnr-svc.default.svc.cluster.local.", A, Answer(vec!["etcd-0.pnr-svc.default.svc.cluster.local. A 10.244.1.5"], vec![])),
        // Headless without hostname: dashed-IP target, resolvable.
        (
            "_http._tcp.plain.default.svc.cluster.local.",
            SRV,
            Answer(
                vec!["_http._tcp.plain.default.svc.cluster.local. SRV 0 100 8080 10-244-2-7.plain.default.svc.cluster.local."],
                vec!["10-244-2-7.plain.default.svc.cluster.local. A 10.244.2.7"],
            ),
        ),
        // IPv6 headless.
        ("db-0.v6db.apps.svc.cluster.local.", AAAA, Answer(vec!["db-0.v6db.apps.svc.cluster.local. AAAA fd00::5"], vec![])),
        ("v6db.apps.svc.cluster.local.", A, NoData),
        // PTR v4 for ClusterIPs and hostname endpoints; v6 too.
        ("90.0.96.10.in-addr.arpa.", PTR, Answer(vec!["90.0.96.10.in-addr.arpa. PTR ngx-svc.default.svc.cluster.local."], vec![])),
        ("10.0.244.10.in-addr.arpa.", PTR, Answer(vec!["10.0.244.10.in-addr.arpa. PTR redis-sts-0.redis-svc.default.svc.cluster.local."], vec![])),
        (
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
            PTR,
            Answer(vec!["0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa. PTR web.apps.svc.cluster.local."], vec![]),
        ),
        (
            "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
            PTR,
            Answer(vec!["5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa. PTR db-0.v6db.apps.svc.cluster.local."], vec![])),
        // A reverse name we hold nothing for falls through to upstream; so
        // does an endpoint without a hostname.
        ("7.2.244.10.in-addr.arpa.", PTR, NotOurs),
        ("1.1.168.192.in-addr.arpa.", PTR, NotOurs),
        // ExternalName: CNAME; in-zone target's records appended.
        ("ext.default.svc.cluster.local.", A, Answer(vec!["ext.default.svc.cluster.local. CNAME example.com."], vec![])),
        ("ext.default.svc.cluster.local.", CNAME, Answer(vec!["ext.default.svc.cluster.local. CNAME example.com."], vec![])),
        (
            "alias.apps.svc.cluster.local.",
            A,
            Answer(
                vec![
                    "alias.apps.svc.cluster.local. CNAME ngx-svc.default.svc.cluster.local.",
                    "ngx-svc.default.svc.cluster.local. A 10.96.0.90",
                ],
                vec![],
            ),
        ),
        ("dns-version.cluster.local.", TXT, Answer(vec!["dns-version.cluster.local. TXT 1.1.0"], vec![])),
        ("dns-version.cluster.local.", A, NoData),
        // Interior names of existing namespaces: NODATA; unknown: NXDOMAIN.
        ("default.svc.cluster.local.", A, NoData),
        ("empty-ns.svc.cluster.local.", A, NoData),
        ("svc.cluster.local.", A, NoData),
        ("cluster.local.", A, NoData),
        ("cluster.local.", SOA, Answer(vec!["cluster.local. SOA ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 5"], vec![])),
        ("nope.svc.cluster.local.", A, NxDomain),
        ("missing.default.svc.cluster.local.", A, NxDomain),
        ("a.b.missing.default.svc.cluster.local.", A, NxDomain),
        ("other.cluster.local.", A, NxDomain),
        // Pods, insecure: any dashed IP in an existing namespace.
        ("10-244-3-4.apps.pod.cluster.local.", A, Answer(vec!["10-244-3-4.apps.pod.cluster.local. A 10.244.3.4"], vec![])),
        ("1-2-3-4.default.pod.cluster.local.", A, Answer(vec!["1-2-3-4.default.pod.cluster.local. A 1.2.3.4"], vec![])),
        ("1-2-3-4.default.pod.cluster.local.", AAAA, NoData),
        ("fd00--7.default.pod.cluster.local.", AAAA, Answer(vec!["fd00--7.default.pod.cluster.local. AAAA fd00::7"], vec![])),
        ("1-2-3-4.nons.pod.cluster.local.", A, NxDomain),
        ("1-2-3-400.default.pod.cluster.local.", A, NxDomain),
        ("x.1-2-3-4.default.pod.cluster.local.", A, NxDomain),
        ("default.pod.cluster.local.", A, NoData),
        // Outside the zone.
        ("example.com.", A, NotOurs),
        ("cluster.local.example.com.", A, NotOurs),
        ("xcluster.local.", A, NotOurs),
    ];
    for (name, qtype, want) in &cases {
        check(&z, name, *qtype, want);
    }
}

#[test]
fn pod_modes() {
    use RecordType::*;
    let verified = zone(PodMode::Verified);
    check(
        &verified,
        "10-244-3-4.apps.pod.cluster.local.",
        A,
        &Answer(vec!["10-244-3-4.apps.pod.cluster.local. A 10.244.3.4"], vec![]),
    );
    check(&verified, "1-2-3-4.apps.pod.cluster.local.", A, &NxDomain);
    check(&verified, "10-244-3-4.default.pod.cluster.local.", A, &NxDomain);
    let disabled = zone(PodMode::Disabled);
    check(&disabled, "10-244-3-4.apps.pod.cluster.local.", A, &NxDomain);
    check(&disabled, "apps.pod.cluster.local.", A, &NxDomain);
}

#[test]
fn other_cluster_domain_and_serial() {
    let z = Zone::build(
        &fixture(),
        &ZoneConfig {
            domain: "Corp.Example.".into(),
            ttl: 30,
            pods: PodMode::Insecure,
        },
    )
    .unwrap();
    check(&z, "ngx-svc.default.svc.cluster.local.", RecordType::A, &NotOurs);
    let got = z.lookup(
        &Name::from_ascii("ngx-svc.default.svc.corp.example.").unwrap(),
        RecordType::A,
    );
    assert!(matches!(got, Lookup::Answer { .. }), "{got:?}");
    assert_eq!(z.soa().ttl, 30);
    assert!(z.is_cluster_name(b"x.corp.example"));
    assert!(Zone::build(
        &fixture(),
        &ZoneConfig {
            domain: "".into(),
            ..ZoneConfig::default()
        }
    )
    .is_err());
}

#[test]
fn bad_objects_are_skipped_and_the_rest_serves() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: badext, namespace: default}
spec:
  type: ExternalName
  externalName: "bad..name"
---
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: default}
spec:
  clusterIP: None
  ports: [{name: p, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hl-1, namespace: default, labels: {kubernetes.io/service-name: hl}}
addressType: IPv4
ports: [{name: p, port: 80, protocol: TCP}]
endpoints:
- addresses: ["10.1.0.1"]
  hostname: "Bad..Host"
  conditions: {ready: true}
- addresses: ["10.1.0.2"]
  hostname: ok-0
  conditions: {ready: true}
"#;
    let z = Zone::build(&snapshot(text), &ZoneConfig::default()).unwrap();
    assert!(z.skipped() > 0);
    check(
        &z,
        "good.default.svc.cluster.local.",
        RecordType::A,
        &Answer(vec!["good.default.svc.cluster.local. A 10.96.0.1"], vec![]),
    );
    check(
        &z,
        "ok-0.hl.default.svc.cluster.local.",
        RecordType::A,
        &Answer(vec!["ok-0.hl.default.svc.cluster.local. A 10.1.0.2"], vec![]),
    );
    check(&z, "badext.default.svc.cluster.local.", RecordType::A, &NxDomain);
}

#[test]
fn master_file_lists_every_record() {
    let z = zone(PodMode::Insecure);
    let text = master_file(&z);
    assert!(text.starts_with("$ORIGIN cluster.local.\n$TTL 5\n"), "{text}");
    for line in [
        "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 7 7200 1800 86400 5",
        "ngx-svc.default.svc.cluster.local. 5 IN A 10.96.0.90",
        "redis-sts-0.redis-svc.default.svc.cluster.local. 5 IN A 10.244.0.10",
        "90.0.96.10.in-addr.arpa. 5 IN PTR ngx-svc.default.svc.cluster.local.",
        "ext.default.svc.cluster.local. 5 IN CNAME example.com.",
        "dns-version.cluster.local. 5 IN TXT \"1.1.0\"",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    let record_lines = text
        .lines()
        .filter(|l| !l.starts_with('$') && !l.starts_with(';'))
        .count();
    assert_eq!(record_lines, z.record_count());
}
