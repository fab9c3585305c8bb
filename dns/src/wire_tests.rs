//! Request-path tests: protocol edge cases, size limits, and a bounded
//! mutation run over many packets (the fuzz target's entry point) so that
//! no input can panic or produce an over-long answer.

use std::path::Path;

use ferry_cluster::files::parse_documents;
use ferry_cluster::Snapshot;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::*;
use crate::zone::{Zone, ZoneConfig};

/// A cluster with one headless service of `n` ready endpoints.
pub(crate) fn big_zone(n: usize) -> Zone {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: default}\nspec:\n  clusterIP: None\n  ports: [{name: http, port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: big-1, namespace: default, labels: {kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "- addresses: [\"10.1.{}.{}\"]\n  hostname: big-{i}\n  conditions: {{ready: true}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    text.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: small, namespace: default}\nspec:\n  clusterIP: 10.96.0.7\n  ports: [{name: http, port: 80}]\n");
    let objects: Vec<_> = parse_documents(Path::new("big.yaml"), &text)
        .into_iter()
        .flat_map(|d| d.unwrap())
        .collect();
    Zone::build(&Snapshot::from_objects(1, objects), &ZoneConfig::default()).unwrap()
}

/// The zone of the shared fixture (every record kind).
fn fixture_zone() -> Zone {
    let objects: Vec<_> = parse_documents(
        Path::new("cluster.yaml"),
        include_str!("../tests/fixtures/cluster.yaml"),
    )
    .into_iter()
    .flat_map(|d| d.unwrap())
    .collect();
    Zone::build(&Snapshot::from_objects(7, objects), &ZoneConfig::default()).unwrap()
}

const CLUSTER: &[u8] = b"cluster.local";

fn ctx(transport: Transport) -> Context<'static> {
    Context {
        cluster_key: CLUSTER,
        transport,
        recursion: true,
    }
}

fn query(name: &str, qtype: RecordType, payload: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(p) = payload {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn reply_of(out: Outcome) -> (Vec<u8>, Message) {
    match out {
        Outcome::Reply { bytes, .. } => {
            let m = Message::from_vec(&bytes).unwrap();
            (bytes, m)
        }
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// The fast path's reply to `packet`, if it takes it.
fn fast_reply(packet: &[u8], zone: &Zone, ctx: Context<'_>) -> Option<Vec<u8>> {
    let mut scratch = crate::fast::Scratch::default();
    let mut out = Vec::new();
    crate::fast::answer(packet, zone, ctx, &mut scratch, &mut out).map(|_| out)
}

fn general_reply(packet: &[u8], zone: &Zone, ctx: Context<'_>) -> Vec<u8> {
    match handle_general(packet, Some(zone), ctx) {
        Outcome::Reply { bytes, .. } => bytes,
        other => panic!("general path did not reply: {other:?}"),
    }
}

/// Every record kind through the fast path gives exactly the bytes of the
/// general (hickory) path; queries the fast path must leave alone are
/// declined and still answered by `handle`.
#[test]
fn fast_path_replies_equal_the_general_path() {
    use RecordType::*;
    let fixture = fixture_zone();
    let big = big_zone(8);
    let fast_cases: Vec<(&Zone, &str, RecordType)> = vec![
        (&fixture, "ngx-svc.default.svc.cluster.local.", A),
        (&fixture, "NGX-Svc.Default.SVC.cluster.LOCAL.", A),
        (&fixture, "ngx-svc.default.svc.cluster.local.", AAAA),
        (&fixture, "web.apps.svc.cluster.local.", AAAA),
        (&fixture, "web.apps.svc.cluster.local.", A),
        (&fixture, "WEB.Apps.svc.cluster.local.", AAAA),
        (&fixture, "etcd-0.pnr-svc.default.svc.cluster.local.", A),
        (&fixture, "web.apps.svc.cluster.local.", ANY),
        (&fixture, "_http._tcp.web.apps.svc.cluster.local.", SRV),
        (&fixture, "_Http._TCP.web.apps.svc.cluster.local.", SRV),
        (&fixture, "_dns._udp.web.apps.svc.cluster.local.", SRV),
        (&fixture, "_tcp.web.apps.svc.cluster.local.", SRV),
        (&fixture, "redis-svc.default.svc.cluster.local.", A),
        (&fixture, "redis-sts-0.redis-svc.default.svc.cluster.local.", A),
        (&fixture, "_redis._tcp.redis-svc.default.svc.cluster.local.", SRV),
        (&fixture, "idle-svc.default.svc.cluster.local.", A),
        (&fixture, "_http._tcp.plain.default.svc.cluster.local.", SRV),
        (&fixture, "db-0.v6db.apps.svc.cluster.local.", AAAA),
        (&fixture, "90.0.96.10.in-addr.arpa.", PTR),
        (&fixture, "10.0.244.10.in-addr.arpa.", PTR),
        (
            &fixture,
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
            PTR,
        ),
        (&fixture, "ext.default.svc.cluster.local.", A),
        (&fixture, "ext.default.svc.cluster.local.", CNAME),
        (&fixture, "alias.apps.svc.cluster.local.", A),
        (&fixture, "dns-version.cluster.local.", TXT),
        (&fixture, "dns-version.cluster.local.", A),
        (&fixture, "cluster.local.", SOA),
        (&fixture, "cluster.local.", ANY),
        (&fixture, "Cluster.Local.", NS),
        (&fixture, "default.svc.cluster.local.", A),
        (&fixture, "nope.svc.cluster.local.", A),
        (&fixture, "a.b.missing.default.svc.cluster.local.", MX),
        (&fixture, "10-244-3-4.apps.pod.cluster.local.", A),
        (&fixture, "1-2-3-4.default.pod.cluster.local.", AAAA),
        (&fixture, "fd00--7.default.pod.cluster.local.", AAAA),
        (&fixture, "1-2-3-4.nons.pod.cluster.local.", A),
        (
            &fixture,
            "ngx-svc.default.svc.cluster.local.",
            RecordType::Unknown(65280),
        ),
        (&big, "_http._tcp.big.default.svc.cluster.local.", SRV),
        (&big, "big.default.svc.cluster.local.", A),
        (&big, "small.default.svc.cluster.local.", A),
    ];
    for (zone, name, qtype) in &fast_cases {
        for payload in [None, Some(512), Some(1232), Some(4096)] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let mut p = query(name, *qtype, payload);
                for flags in [(0x01, 0x00), (0x00, 0x10), (0x01, 0x30)] {
                    p[2] = (p[2] & !0x01) | flags.0;
                    p[3] = flags.1;
                    let what = format!("{name} {qtype} payload {payload:?} {transport:?} flags {flags:?}");
                    let general = general_reply(&p, zone, ctx(transport));
                    let fits = transport == Transport::Tcp || payload.is_some_and(|p| p >= 1232);
                    match fast_reply(&p, zone, ctx(transport)) {
                        Some(fast) => assert_eq!(fast, general, "{what}"),
                        // Only an answer over the limit may leave the fast path.
                        None => assert!(!fits, "fast path declined {what}"),
                    }
                    let (bytes, _) = reply_of(handle(&p, Some(zone), ctx(transport)));
                    assert_eq!(bytes, general, "{what}");
                }
            }
        }
    }
    // Left to the general path: names we forward, other classes, zone
    // transfers, several questions, EDNS options, other opcodes.
    let mut declined: Vec<Vec<u8>> = vec![
        query("example.com.", A, None),
        query("1.1.168.192.in-addr.arpa.", PTR, None),
        query("cluster.local.", AXFR, None),
    ];
    let mut chaos = Message::new(3, MessageType::Query, OpCode::Query);
    let mut q = Query::query(Name::from_ascii("cluster.local.").unwrap(), SOA);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    declined.push(chaos.to_vec().unwrap());
    let mut cookie = Message::new(4, MessageType::Query, OpCode::Query);
    cookie.add_query(Query::query(Name::from_ascii("cluster.local.").unwrap(), SOA));
    let mut e = Edns::new();
    e.options_mut()
        .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
            10,
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ));
    cookie.set_edns(e);
    declined.push(cookie.to_vec().unwrap());
    for p in &declined {
        assert!(fast_reply(p, &fixture, ctx(Transport::Udp)).is_none(), "{p:?}");
        assert!(!matches!(handle(p, Some(&fixture), ctx(Transport::Udp)), Outcome::Drop));
    }
}

/// The precompiled answers serve exactly the address queries of names
/// whose answer is their own records (which the test above holds to the
/// general path's bytes), and nothing else.
#[test]
fn precompiled_answers_cover_plain_address_queries_only() {
    use RecordType::*;
    let z = fixture_zone();
    let count = |name: &str, qtype| z.wire_answers(name.as_bytes(), qtype).map(|(b, n)| (b.len(), n));
    assert_eq!(count("ngx-svc.default.svc.cluster.local", A), Some((16, 1)));
    assert_eq!(count("web.apps.svc.cluster.local", A), Some((16, 1)));
    assert_eq!(count("web.apps.svc.cluster.local", AAAA), Some((28, 1)));
    // Two ready endpoints (the third is not ready).
    assert_eq!(count("redis-svc.default.svc.cluster.local", A), Some((2 * 16, 2)));
    // NODATA, a CNAME, other types, ANY, names that do not exist and
    // synthesized pod names take the general fast path.
    assert_eq!(count("ngx-svc.default.svc.cluster.local", AAAA), None);
    assert_eq!(count("ext.default.svc.cluster.local", A), None);
    assert_eq!(count("alias.apps.svc.cluster.local", A), None);
    assert_eq!(count("_http._tcp.web.apps.svc.cluster.local", SRV), None);
    assert_eq!(count("web.apps.svc.cluster.local", ANY), None);
    assert_eq!(count("nope.default.svc.cluster.local", A), None);
    assert_eq!(count("10-244-3-4.apps.pod.cluster.local", A), None);
    // The owner is a pointer to the question, then A, IN, the zone's TTL.
    let (bytes, _) = z.wire_answers(b"ngx-svc.default.svc.cluster.local", A).unwrap();
    assert_eq!(bytes[..10], [0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5]);
    assert_eq!(bytes[10..], [0, 4, 10, 96, 0, 90]);
}

#[test]
fn answers_nodata_nxdomain_with_soa() {
    let z = big_zone(3);
    let (_, m) = reply_of(handle(
        &query("small.default.svc.cluster.local.", RecordType::A, None),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.metadata.authoritative && m.metadata.recursion_desired && m.metadata.recursion_available);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.queries.len(), 1);

    let (_, m) = reply_of(handle(
        &query("small.default.svc.cluster.local.", RecordType::AAAA, None),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

    let (_, m) = reply_of(handle(
        &query("nope.default.svc.cluster.local.", RecordType::A, None),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn before_the_first_zone_cluster_names_get_servfail_and_others_forward() {
    let (_, m) = reply_of(handle(
        &query("small.default.svc.cluster.local.", RecordType::A, None),
        None,
        ctx(Transport::Udp),
    ));
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    match handle(
        &query("example.com.", RecordType::A, Some(1232)),
        None,
        ctx(Transport::Udp),
    ) {
        Outcome::Forward(req) => {
            assert_eq!(req.key, b"example.com");
            assert_eq!(req.limit, 1232);
        }
        other => panic!("{other:?}"),
    }
    let no_upstream = Context {
        recursion: false,
        ..ctx(Transport::Udp)
    };
    let (_, m) = reply_of(handle(&query("example.com.", RecordType::A, None), None, no_upstream));
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn sizes_sheds_additionals_then_truncates() {
    let z = big_zone(60);
    let srv = "_http._tcp.big.default.svc.cluster.local.";
    // Over TCP everything fits.
    let (_, m) = reply_of(handle(
        &query(srv, RecordType::SRV, None),
        Some(&z),
        ctx(Transport::Tcp),
    ));
    assert_eq!(m.answers.len(), 60);
    assert_eq!(m.additionals.len(), 60);
    assert!(!m.metadata.truncation);
    // Plain UDP: 512 bytes, TC set, client retries over TCP.
    let (bytes, m) = reply_of(handle(
        &query(srv, RecordType::SRV, None),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert!(bytes.len() <= 512, "{}", bytes.len());
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    // EDNS 4096 is capped at 1232.
    let (bytes, m) = reply_of(handle(
        &query(srv, RecordType::SRV, Some(4096)),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert!(bytes.len() <= 1232, "{}", bytes.len());
    assert!(m.metadata.truncation);
    assert!(m.edns.is_some(), "EDNS answered with EDNS");
    // A few endpoints: answers fit in 512 once the additionals are shed, no TC.
    let z = big_zone(8);
    let (full, _) = reply_of(handle(
        &query(srv, RecordType::SRV, None),
        Some(&z),
        ctx(Transport::Tcp),
    ));
    assert!(
        full.len() > 512,
        "the full answer must not fit for this case ({})",
        full.len()
    );
    let (bytes, m) = reply_of(handle(
        &query(srv, RecordType::SRV, None),
        Some(&z),
        ctx(Transport::Udp),
    ));
    assert!(bytes.len() <= 512);
    assert_eq!(m.answers.len(), 8);
    assert!(m.additionals.is_empty());
    assert!(!m.metadata.truncation);
}

#[test]
fn protocol_errors() {
    let z = big_zone(1);
    // Too short for a header, or a response: dropped.
    assert!(matches!(
        handle(&[1, 2, 3], Some(&z), ctx(Transport::Udp)),
        Outcome::Drop
    ));
    let mut resp = query("small.default.svc.cluster.local.", RecordType::A, None);
    resp[2] |= 0x80;
    assert!(matches!(handle(&resp, Some(&z), ctx(Transport::Udp)), Outcome::Drop));
    // Garbage after a header: FORMERR echoing the id.
    let mut bad = query("small.default.svc.cluster.local.", RecordType::A, None);
    bad.truncate(20);
    let (_, m) = reply_of(handle(&bad, Some(&z), ctx(Transport::Udp)));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(m.metadata.id, 0x1234);
    // Two questions: FORMERR.
    let mut two = Message::new(7, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
    two.add_query(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
    let (_, m) = reply_of(handle(&two.to_vec().unwrap(), Some(&z), ctx(Transport::Udp)));
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Not a query: NOTIMP.
    let mut notify = Message::new(8, MessageType::Query, OpCode::Notify);
    notify.add_query(Query::query(
        Name::from_ascii("cluster.local.").unwrap(),
        RecordType::SOA,
    ));
    let (_, m) = reply_of(handle(&notify.to_vec().unwrap(), Some(&z), ctx(Transport::Udp)));
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    // EDNS version 1: BADVERS.
    let mut v1 = Message::new(9, MessageType::Query, OpCode::Query);
    v1.add_query(Query::query(
        Name::from_ascii("cluster.local.").unwrap(),
        RecordType::SOA,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    v1.set_edns(e);
    let (_, m) = reply_of(handle(&v1.to_vec().unwrap(), Some(&z), ctx(Transport::Udp)));
    assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
    // Zone transfers are refused.
    let (_, m) = reply_of(handle(
        &query("cluster.local.", RecordType::AXFR, None),
        Some(&z),
        ctx(Transport::Tcp),
    ));
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

/// The fuzz target's property, run over many mutated and random packets in
/// plain `cargo test`: never a panic, never a reply over the client's limit,
/// a reply always carries the request's id and the QR bit.
#[test]
fn no_input_panics_or_overflows() {
    let z = big_zone(40);
    let seeds: Vec<Vec<u8>> = vec![
        query("_http._tcp.big.default.svc.cluster.local.", RecordType::SRV, None),
        query("_http._tcp.big.default.svc.cluster.local.", RecordType::SRV, Some(600)),
        query("big.default.svc.cluster.local.", RecordType::A, Some(512)),
        query("small.default.svc.cluster.local.", RecordType::ANY, None),
        query("small.default.svc.cluster.local.", RecordType::A, None),
        query("big-3.big.default.svc.cluster.local.", RecordType::A, Some(1232)),
        query("1-2-3-4.default.pod.cluster.local.", RecordType::A, None),
        query("7.0.96.10.in-addr.arpa.", RecordType::PTR, None),
        query("example.com.", RecordType::A, None),
    ];
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut replies = 0;
    let mut fast_replies = 0;
    for i in 0..60_000 {
        let mut p = if i % 10 == 0 {
            let len = rng.usize(0..300);
            (0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>()
        } else {
            seeds[rng.usize(..seeds.len())].clone()
        };
        for _ in 0..rng.usize(0..6) {
            if p.is_empty() {
                break;
            }
            let at = rng.usize(..p.len());
            match rng.u8(0..4) {
                0 => p[at] = rng.u8(..),
                1 => p[at] ^= 1 << rng.u8(0..8),
                2 => p.truncate(at),
                _ => p.insert(at, rng.u8(..)),
            }
        }
        for transport in [Transport::Udp, Transport::Tcp] {
            if let Some(fast) = fast_reply(&p, &z, ctx(transport)) {
                fast_replies += 1;
                assert_eq!(
                    fast,
                    general_reply(&p, &z, ctx(transport)),
                    "fast and general differ for {p:?}"
                );
            }
            if let Outcome::Reply { bytes, .. } = handle(&p, Some(&z), ctx(transport)) {
                replies += 1;
                let limit = if transport == Transport::Udp { 1232 } else { 65535 };
                assert!(bytes.len() <= limit, "reply of {} bytes for {p:?}", bytes.len());
                assert!(bytes.len() >= 12);
                assert_eq!(bytes[0..2], p[0..2], "id echoed");
                assert!(bytes[2] & 0x80 != 0, "QR set");
                if transport == Transport::Udp && !has_opt(&p) {
                    assert!(bytes.len() <= 512, "no EDNS: 512 bytes at most");
                }
            }
        }
    }
    assert!(replies > 10_000, "the run must exercise the reply path ({replies})");
    assert!(
        fast_replies > 5_000,
        "the run must exercise the fast path ({fast_replies})"
    );
}

/// Whether a request packet decodes with an OPT record (EDNS).
fn has_opt(p: &[u8]) -> bool {
    Message::from_vec(p).map(|m| m.edns.is_some()).unwrap_or(false)
}
