//! Table-driven tests of the iptables rendering: a golden file for the
//! fixture cluster, the packet tracer over the rendered rules for every
//! policy, and partial-sync text.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ferry_cluster::{Protocol, Snapshot};

use super::render::{self, Family};
use super::trace::{Origin, Packet, Ruleset, Verdict};
use crate::fixtures::{self, node};
use crate::table::{plan, ServiceTable};

fn fixture() -> Snapshot {
    fixtures::snapshot(&fixtures::fixture_text())
}

fn table() -> ServiceTable {
    let (t, w) = plan(&fixture(), &node());
    assert!(w.is_empty(), "{w:?}");
    t
}

#[test]
fn golden_rules() {
    fixtures::assert_golden("policies.iptables", &render::render_text(&table(), Family::V4));
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[derive(Debug, PartialEq)]
enum Want {
    /// Endpoints (each reached with equal probability), and masquerade for all of them.
    Endpoints(&'static [&'static str], bool),
    Reject,
    Drop,
    Untouched,
}

#[test]
fn tracer_every_policy() {
    let rules = Ruleset::parse(&render::render_text(&table(), Family::V4)).unwrap();
    let external = "198.51.100.99";
    let node_ip = "192.0.2.10";
    let other_pod = "10.244.3.3";
    struct Case {
        name: &'static str,
        origin: Origin,
        src: &'static str,
        dst: &'static str,
        proto: Protocol,
        port: u16,
        want: Want,
    }
    use Origin::{Network, Node};
    use Protocol::{Sctp, Tcp, Udp};
    let web3 = &["10.244.1.5:8080", "10.244.2.5:8080", "10.244.2.6:8080"][..];
    let cases = [
        Case {
            name: "cluster IP from a pod",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.10",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(web3, false),
        },
        Case {
            name: "cluster IP from the node is masqueraded",
            origin: Node,
            src: node_ip,
            dst: "10.96.0.10",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(web3, true),
        },
        Case {
            name: "cluster IP from outside the pod CIDR is masqueraded",
            origin: Network,
            src: external,
            dst: "10.96.0.10",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(web3, true),
        },
        Case {
            name: "UDP cluster IP",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.10",
            proto: Udp,
            port: 53,
            want: Want::Endpoints(&["10.244.1.5:5353", "10.244.2.5:5353", "10.244.2.6:5353"], false),
        },
        Case {
            name: "wrong protocol is untouched",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.10",
            proto: Udp,
            port: 80,
            want: Want::Untouched,
        },
        Case {
            name: "NodePort from outside is masqueraded",
            origin: Network,
            src: external,
            dst: node_ip,
            proto: Tcp,
            port: 30080,
            want: Want::Endpoints(web3, true),
        },
        Case {
            name: "eTP Local NodePort from outside: local endpoint, source kept",
            origin: Network,
            src: external,
            dst: node_ip,
            proto: Tcp,
            port: 30082,
            want: Want::Endpoints(&["10.244.1.8:8080"], false),
        },
        Case {
            name: "eTP Local LB IP from outside",
            origin: Network,
            src: external,
            dst: "203.0.113.50",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.1.8:8080"], false),
        },
        Case {
            name: "eTP Local external IP from outside",
            origin: Network,
            src: external,
            dst: "198.51.100.7",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.1.8:8080"], false),
        },
        Case {
            name: "eTP Local LB IP from a pod short-circuits to all",
            origin: Network,
            src: other_pod,
            dst: "203.0.113.50",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.1.8:8080", "10.244.2.8:8080"], false),
        },
        Case {
            name: "eTP Local NodePort from the node: all, masqueraded",
            origin: Node,
            src: node_ip,
            dst: node_ip,
            proto: Tcp,
            port: 30082,
            want: Want::Endpoints(&["10.244.1.8:8080", "10.244.2.8:8080"], true),
        },
        Case {
            name: "eTP Local ClusterIP uses all endpoints",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.12",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.1.8:8080", "10.244.2.8:8080"], false),
        },
        Case {
            name: "eTP Local without local endpoints drops external",
            origin: Network,
            src: external,
            dst: node_ip,
            proto: Tcp,
            port: 30085,
            want: Want::Drop,
        },
        Case {
            name: "eTP Local without local endpoints: ClusterIP still works",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.15",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.2.9:8080"], false),
        },
        Case {
            name: "iTP Local without local endpoints drops",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.16",
            proto: Tcp,
            port: 80,
            want: Want::Drop,
        },
        Case {
            name: "no endpoints: TCP rejected",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.13",
            proto: Tcp,
            port: 80,
            want: Want::Reject,
        },
        Case {
            name: "no endpoints: UDP rejected",
            origin: Node,
            src: node_ip,
            dst: "10.96.0.13",
            proto: Udp,
            port: 53,
            want: Want::Reject,
        },
        Case {
            name: "terminating fallback",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.18",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.2.11:8080"], false),
        },
        Case {
            name: "named targetPort",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.19",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.2.13:9090"], false),
        },
        Case {
            name: "SCTP",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.20",
            proto: Sctp,
            port: 7777,
            want: Want::Endpoints(&["10.244.2.14:7777"], false),
        },
        Case {
            name: "endpoint without nodeName: cluster IP uses it",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.21",
            proto: Tcp,
            port: 80,
            want: Want::Endpoints(&["10.244.1.21:8080", "10.244.3.21:8080"], false),
        },
        Case {
            name: "endpoint without nodeName is not local for eTP Local",
            origin: Network,
            src: external,
            dst: node_ip,
            proto: Tcp,
            port: 30086,
            want: Want::Endpoints(&["10.244.1.21:8080"], false),
        },
        Case {
            name: "not a service",
            origin: Network,
            src: other_pod,
            dst: "10.96.0.99",
            proto: Tcp,
            port: 80,
            want: Want::Untouched,
        },
    ];
    for c in cases {
        let dst_local = c.dst == node_ip;
        let p = Packet {
            origin: c.origin,
            src: ip(c.src),
            dst: ip(c.dst),
            protocol: c.proto,
            dport: c.port,
            src_local: c.src == node_ip,
            dst_local,
        };
        let t = rules.trace(&p);
        match c.want {
            Want::Endpoints(eps, masq) => {
                let got = t.endpoints();
                let want: BTreeMap<SocketAddr, f64> = eps.iter().map(|e| (ep(e), 1.0 / eps.len() as f64)).collect();
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>(),
                    "{}: {t:?}",
                    c.name
                );
                for (k, w) in &want {
                    assert!(
                        (got[k] - w).abs() < 1e-6,
                        "{}: {k} probability {} want {w}",
                        c.name,
                        got[k]
                    );
                }
                let total: f64 = t.paths.iter().map(|p| p.probability).sum();
                assert!(
                    (total - 1.0).abs() < 1e-6,
                    "{}: every packet goes somewhere: {total}",
                    c.name
                );
                if masq {
                    assert!(t.all_masquerade(), "{}: want masquerade: {t:?}", c.name);
                } else {
                    assert!(t.none_masquerade(), "{}: want no masquerade: {t:?}", c.name);
                }
            }
            Want::Reject => assert_eq!(t.single(), Some(Verdict::Reject), "{}: {t:?}", c.name),
            Want::Drop => assert_eq!(t.single(), Some(Verdict::Drop), "{}: {t:?}", c.name),
            Want::Untouched => assert_eq!(t.single(), Some(Verdict::Untouched), "{}: {t:?}", c.name),
        }
    }
}

#[test]
fn hairpin_is_masqueraded_only_towards_itself() {
    let rules = Ruleset::parse(&render::render_text(&table(), Family::V4)).unwrap();
    let t = rules.trace(&Packet {
        origin: Origin::Network,
        src: ip("10.244.1.5"),
        dst: ip("10.96.0.10"),
        protocol: Protocol::Tcp,
        dport: 80,
        src_local: false,
        dst_local: false,
    });
    for p in &t.paths {
        let to_self = p.verdict == Verdict::Endpoint(ep("10.244.1.5:8080"));
        assert_eq!(p.masquerade, to_self, "{p:?}");
    }
    assert_eq!(t.endpoints().len(), 3);
}

/// An endpoint without nodeName may be on this node: reaching itself
/// through its Service is masqueraded, like a local endpoint.
#[test]
fn hairpin_covers_endpoints_of_unknown_node() {
    let rules = Ruleset::parse(&render::render_text(&table(), Family::V4)).unwrap();
    for me in ["10.244.3.21", "10.244.1.21"] {
        let t = rules.trace(&Packet {
            origin: Origin::Network,
            src: ip(me),
            dst: ip("10.96.0.21"),
            protocol: Protocol::Tcp,
            dport: 80,
            src_local: false,
            dst_local: false,
        });
        assert_eq!(t.endpoints().len(), 2, "{t:?}");
        for p in &t.paths {
            let to_self = p.verdict == Verdict::Endpoint(SocketAddr::new(ip(me), 8080));
            assert_eq!(p.masquerade, to_self, "{me}: {p:?}");
        }
    }
}

/// A wrong `--node-name` (Node objects exist, none has it): every endpoint
/// may be local, so each gets hairpin masquerade; none becomes local.
#[test]
fn hairpin_covers_every_endpoint_when_the_node_is_unknown() {
    let text = fixtures::fixture_text()
        + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.11}]}\n";
    let (t, _) = plan(&fixtures::snapshot(&text), &node());
    let web = t.services.values().find(|e| e.name.service.name == "web").unwrap();
    let remote = web.backends.iter().find(|b| b.ip == ip("10.244.2.5")).unwrap();
    assert!(remote.hairpin && !remote.local, "{remote:?}");
    let rules = Ruleset::parse(&render::render_text(&t, Family::V4)).unwrap();
    let t = rules.trace(&Packet {
        origin: Origin::Network,
        src: ip("10.244.2.5"),
        dst: ip("10.96.0.10"),
        protocol: Protocol::Tcp,
        dport: 80,
        src_local: false,
        dst_local: false,
    });
    assert_eq!(t.endpoints().len(), 3, "{t:?}");
    for p in &t.paths {
        let to_self = p.verdict == Verdict::Endpoint(ep("10.244.2.5:8080"));
        assert_eq!(p.masquerade, to_self, "{p:?}");
    }
}

#[test]
fn affinity_is_recorded() {
    let rules = Ruleset::parse(&render::render_text(&table(), Family::V4)).unwrap();
    let t = rules.trace(&Packet {
        origin: Origin::Network,
        src: ip("10.244.3.3"),
        dst: ip("10.96.0.11"),
        protocol: Protocol::Tcp,
        dport: 80,
        src_local: false,
        dst_local: false,
    });
    assert_eq!(t.endpoints().len(), 2);
    assert!(t.paths.iter().all(|p| p.affinity), "{t:?}");
    let text = render::render_text(&table(), Family::V4);
    assert!(text.contains("--rcheck --seconds 60 --reap"), "{text}");
}

#[test]
fn partial_sync_writes_only_changed_services() {
    let snap = fixture();
    let (before, _) = plan(&snap, &node());
    // Drop one endpoint of `web` and the whole `sticky` service.
    let mut after = before.clone();
    let web = after
        .services
        .iter_mut()
        .find(|(k, _)| k.service.name == "web" && k.protocol == Protocol::Tcp)
        .map(|(_, v)| v)
        .unwrap();
    web.backends.pop();
    let web_name = web.name.clone();
    after.services.retain(|k, _| k.service.name != "sticky");
    let prev = render::render(&before, Family::V4);
    let next = render::render(&after, Family::V4);
    let (text, written, removed) = render::restore_partial(&prev, &next);
    assert_eq!(written, 1, "{text}");
    assert_eq!(removed, 1, "{text}");
    let web_chain = render::svc_chain(&web_name);
    assert!(text.contains(&format!(":{web_chain} - [0:0]")), "{text}");
    // Unchanged services' chains are neither flushed nor rewritten.
    let local_name = before.services.keys().find(|k| k.service.name == "local").unwrap();
    assert!(
        !text.contains(&format!(":{} ", render::svc_chain(local_name))),
        "{text}"
    );
    assert!(
        !text.contains(&format!("-A {} ", render::svc_chain(local_name))),
        "{text}"
    );
    // sticky's chain is deleted, and its dispatch rule removed one by one:
    // the big dispatch chain is edited, never flushed, in a partial sync.
    let sticky_name = before.services.keys().find(|k| k.service.name == "sticky").unwrap();
    assert!(
        text.contains(&format!("-X {}", render::svc_chain(sticky_name))),
        "{text}"
    );
    assert_eq!(text.matches("-X ").count(), 1, "{text}");
    assert!(text.contains("-D FERRY-SERVICES "), "{text}");
    assert!(!text.contains(":FERRY-SERVICES "), "{text}");
    // An endpoint change alone touches one chain and nothing else.
    let mut moved = before.clone();
    moved
        .services
        .values_mut()
        .find(|e| e.name.service.name == "term")
        .unwrap()
        .backends[0]
        .port = 8081;
    let (text, written, removed) = render::restore_partial(&prev, &render::render(&moved, Family::V4));
    assert_eq!((written, removed), (1, 0), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with(':')).count(), 1, "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("-A ")).count(), 2, "{text}");
    // Applying the partial text on top of the full one gives the full new rule set.
    let full_after = Ruleset::parse(&render::render_text(&after, Family::V4)).unwrap();
    let t = full_after.trace(&Packet {
        origin: Origin::Network,
        src: ip("10.244.3.3"),
        dst: ip("10.96.0.10"),
        protocol: Protocol::Tcp,
        dport: 80,
        src_local: false,
        dst_local: false,
    });
    assert_eq!(t.endpoints().len(), 2);
}

#[test]
fn tracer_parses_what_it_is_given() {
    assert!(Ruleset::parse("*nat\n-A FERRY-SERVICES -d nonsense -j X\nCOMMIT\n").is_err());
}

#[test]
fn kernel_state_finds_our_chains_and_hooks() {
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:FERRY-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment ferry-services -j FERRY-SERVICES\nCOMMIT\n*filter\n:FERRY-FILTER - [0:0]\n-A INPUT -m conntrack --ctstate NEW -m comment --comment ferry-filter -j FERRY-FILTER\n-A FORWARD -m comment --comment ferry-forward -j FERRY-FORWARD\nCOMMIT\n";
    let k = super::KernelState::parse(save);
    assert_eq!(k.chains("nat").collect::<Vec<_>>(), vec!["FERRY-SERVICES"]);
    assert_eq!(k.chains("filter").collect::<Vec<_>>(), vec!["FERRY-FILTER"]);
    let present: Vec<(&str, &str)> = render::HOOKS
        .iter()
        .zip(&k.hooks)
        .filter(|(_, p)| **p)
        .map(|((t, c, _), _)| (*t, *c))
        .collect();
    assert_eq!(
        present,
        vec![("nat", "PREROUTING"), ("filter", "INPUT"), ("filter", "FORWARD")]
    );
    let text = super::insert_before_commit("*filter\n-A X\nCOMMIT\n*nat\n-A Y\nCOMMIT\n", "nat", "-I OUTPUT 1 -j Z");
    assert_eq!(text, "*filter\n-A X\nCOMMIT\n*nat\n-A Y\n-I OUTPUT 1 -j Z\nCOMMIT\n");
}
