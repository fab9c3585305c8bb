//! Tests of the nftables rendering: a golden file for the fixture cluster;
//! a small tracer over the rendered table compared, packet by packet, with
//! the iptables packet tracer over the iptables rendering of the same
//! table (the two dataplanes must agree on every policy); partial scripts
//! that touch only what changed; and, as root, the scripts loaded into a
//! network namespace this test creates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ferry_cluster::{Protocol, Snapshot};
use ipnet::IpNet;

use super::render::{self, Rendered};
use crate::iptables::render::Family;
use crate::iptables::trace::{self, Origin, Packet, Verdict};
use crate::table::{plan, NodeConfig, ServiceTable};

fn snapshot_of(path: &Path, text: &str) -> Snapshot {
    let mut objects = Vec::new();
    for d in ferry_cluster::files::parse_documents(path, text) {
        objects.extend(d.unwrap());
    }
    Snapshot::from_objects(1, objects)
}

fn fixture_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/policies.yaml");
    std::fs::read_to_string(path).unwrap()
}

fn node() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        nodeport_addresses: vec![],
        localhost_nodeports: false,
    }
}

fn table_of(yaml: &str) -> ServiceTable {
    let (t, w) = plan(&snapshot_of(Path::new("test.yaml"), yaml), &node());
    assert!(w.is_empty(), "{w:?}");
    t
}

fn table() -> ServiceTable {
    table_of(&fixture_text())
}

#[test]
fn golden_script() {
    let text = render::render_text(&table(), Family::V4);
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/policies.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        text == want,
        "rendered script differs from {} (rerun with UPDATE_GOLDEN=1 and review the diff):\n{text}",
        golden.display()
    );
}

/// Outcome of one path: verdict, masquerade → probability.
type Outcomes = BTreeMap<(Verdict, bool), f64>;

fn outcomes(t: &trace::Trace) -> Outcomes {
    let mut out = Outcomes::new();
    for p in &t.paths {
        *out.entry((p.verdict, p.masquerade)).or_insert(0.0) += p.probability;
    }
    out
}

/// Follows a first packet through the rendered table: the nat dispatch
/// map, then the service chains (the rule forms `render` emits), the
/// filter map for frontends without endpoints, and postrouting masquerade.
/// Affinity sets are empty for a first packet.
fn nft_trace(r: &Rendered, p: &Packet) -> Outcomes {
    let proto = match p.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    let key = format!("{} . {proto} . {}", p.dst, p.dport);
    let chains: BTreeMap<&str, &Vec<String>> = r
        .services
        .values()
        .flat_map(|s| s.chains.iter().map(|(n, rules)| (n.as_str(), rules)))
        .collect();
    let mut out = Outcomes::new();
    if let Some(v) = r.elements.get(&(render::SERVICES, key.clone())) {
        let start = v.strip_prefix("goto ").unwrap();
        walk(&chains, start, p, false, 1.0, &mut out);
    } else if let Some(v) = r.elements.get(&(render::NO_ENDPOINTS, key)) {
        let verdict = if v == "drop" { Verdict::Drop } else { Verdict::Reject };
        out.insert((verdict, false), 1.0);
    } else {
        out.insert((Verdict::Untouched, false), 1.0);
    }
    // Postrouting: hairpin (source = destination = a local endpoint).
    let mut fixed = Outcomes::new();
    for ((v, masq), prob) in out {
        let hairpin = matches!(v, Verdict::Endpoint(ep) if ep.ip() == p.src && r.hairpin.contains(&p.src));
        *fixed.entry((v, masq || hairpin)).or_insert(0.0) += prob;
    }
    fixed
}

fn src_in(text: &str, src: IpAddr) -> bool {
    let text = text.trim_matches(|c| c == '{' || c == '}' || c == ' ');
    text.split(", ").any(|c| {
        c.trim()
            .parse::<IpNet>()
            .map(|n| n.contains(&src))
            .unwrap_or_else(|_| c.trim().parse::<IpAddr>().ok() == Some(src))
    })
}

fn walk(chains: &BTreeMap<&str, &Vec<String>>, chain: &str, p: &Packet, mut masq: bool, prob: f64, out: &mut Outcomes) {
    let rules = chains.get(chain).unwrap_or_else(|| panic!("no chain {chain}"));
    for rule in rules.iter() {
        let mut rest = rule.as_str();
        // Matches.
        if let Some(r) = rest.strip_prefix("ip saddr != ") {
            let (set, tail) = split_operand(r);
            if src_in(set, p.src) {
                continue;
            }
            rest = tail;
        } else if let Some(r) = rest.strip_prefix("ip saddr @") {
            // An affinity set: empty for a first packet.
            let _ = r;
            continue;
        } else if let Some(r) = rest.strip_prefix("ip saddr ") {
            let (set, tail) = split_operand(r);
            if !src_in(set, p.src) {
                continue;
            }
            rest = tail;
        } else if let Some(r) = rest.strip_prefix("fib saddr type local ") {
            if !p.src_local {
                continue;
            }
            rest = r;
        }
        // Statements and verdicts.
        if let Some(r) = rest.strip_prefix("meta mark set meta mark | 0x4000") {
            masq = true;
            rest = r.trim_start();
            if rest.is_empty() {
                continue;
            }
        }
        if let Some(target) = rest.strip_prefix("goto ") {
            return walk(chains, target, p, masq, prob, out);
        }
        if let Some(r) = rest.strip_prefix("numgen random mod ") {
            let body = r.split_once("vmap { ").unwrap().1.trim_end_matches(" }");
            let targets: Vec<&str> = body.split(", ").map(|e| e.split_once(" : goto ").unwrap().1).collect();
            for t in &targets {
                walk(chains, t, p, masq, prob / targets.len() as f64, out);
            }
            return;
        }
        let rest = rest
            .strip_prefix("update @")
            .map(|r| r.split_once("} ").unwrap().1)
            .unwrap_or(rest);
        if let Some(r) = rest.strip_prefix("meta l4proto ") {
            let (l4, r) = r.split_once(' ').unwrap();
            let want = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                Protocol::Sctp => "sctp",
            };
            if l4 != want {
                continue;
            }
            let eps: Vec<SocketAddr> = if let Some(one) = r.strip_prefix("dnat to ") {
                vec![one.parse().unwrap()]
            } else {
                let body = r.split_once("map { ").unwrap().1.trim_end_matches(" }");
                body.split(", ")
                    .map(|e| {
                        let (ip, port) = e.split_once(" : ").unwrap().1.split_once(" . ").unwrap();
                        SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap())
                    })
                    .collect()
            };
            for ep in &eps {
                *out.entry((Verdict::Endpoint(*ep), masq)).or_insert(0.0) += prob / eps.len() as f64;
            }
            return;
        }
        panic!("tracer does not understand rule {rule:?} in {chain}");
    }
    // Falling off a service chain: the packet goes on as addressed.
    *out.entry((Verdict::Untouched, masq)).or_insert(0.0) += prob;
}

/// `{ a, b } rest` or `a rest` → (operand, rest).
fn split_operand(s: &str) -> (&str, &str) {
    if s.starts_with('{') {
        let end = s.find('}').unwrap() + 1;
        (&s[..end], s[end..].trim_start())
    } else {
        s.split_once(' ').unwrap_or((s, ""))
    }
}

fn agree_with_iptables(t: &ServiceTable) {
    let ipt = trace::Ruleset::parse(&crate::iptables::render::render_text(t, Family::V4)).unwrap();
    let nft = render::render(t, Family::V4);
    let node_ip = "192.0.2.10";
    let srcs = ["10.244.3.3", "10.244.1.5", "10.244.1.8", "198.51.100.99", node_ip];
    let mut dsts: Vec<(IpAddr, u16, Protocol)> = Vec::new();
    for e in t.services.values() {
        for f in &e.frontends {
            for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                dsts.push((f.ip, f.port, proto));
            }
        }
    }
    dsts.push(("10.96.0.99".parse().unwrap(), 80, Protocol::Tcp));
    let mut checked = 0;
    for src in srcs {
        for &(dst, dport, protocol) in &dsts {
            let src: IpAddr = src.parse().unwrap();
            let p = Packet {
                origin: if src.to_string() == node_ip {
                    Origin::Node
                } else {
                    Origin::Network
                },
                src,
                dst,
                protocol,
                dport,
                src_local: src.to_string() == node_ip,
                dst_local: dst.to_string() == node_ip,
            };
            let want = outcomes(&ipt.trace(&p));
            let got = nft_trace(&nft, &p);
            let close = want.len() == got.len()
                && want
                    .iter()
                    .all(|(k, w)| got.get(k).is_some_and(|g| (g - w).abs() < 1e-6));
            assert!(close, "{p:?}\n iptables: {want:?}\n nftables: {got:?}");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} packets");
}

#[test]
fn every_policy_agrees_with_the_iptables_tracer() {
    agree_with_iptables(&table());
}

#[test]
fn agrees_without_cluster_cidr_and_with_two() {
    let (t, _) = plan(
        &snapshot_of(Path::new("test.yaml"), &fixture_text()),
        &NodeConfig {
            cluster_cidrs: vec![],
            ..node()
        },
    );
    agree_with_iptables(&t);
    let (t, _) = plan(
        &snapshot_of(Path::new("test.yaml"), &fixture_text()),
        &NodeConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap(), "10.245.0.0/16".parse().unwrap()],
            ..node()
        },
    );
    agree_with_iptables(&t);
}

#[test]
fn affinity_uses_per_endpoint_sets_with_the_timeout() {
    let r = render::render(&table(), Family::V4);
    let sticky = r
        .services
        .iter()
        .find(|(n, _)| n.service.name == "sticky")
        .map(|(_, s)| s)
        .unwrap();
    assert_eq!(sticky.sets.len(), 2, "{sticky:?}");
    assert!(sticky.sets.iter().all(|(_, t)| *t == 60));
    let svc = &sticky.chains.last().unwrap().1;
    assert!(
        svc[1].starts_with("ip saddr @aff-") && svc[2].starts_with("ip saddr @aff-"),
        "{svc:?}"
    );
    assert!(svc[3].starts_with("numgen random mod 2 vmap"), "{svc:?}");
    let text = render::script_full(&r, None);
    assert!(text.contains("flags dynamic,timeout; timeout 60s;"), "{text}");
}

/// The fixture with web's third endpoint moved and `term` removed.
fn changed_fixture() -> String {
    let text = fixture_text().replace(
        "- {addresses: [10.244.2.6], nodeName: node-b}",
        "- {addresses: [10.244.2.60], nodeName: node-b}",
    );
    let start = text.find("kind: Service\nmetadata: {name: term").unwrap();
    let start = text[..start].rfind("---").unwrap();
    let end = text[start..].find("kind: Service\nmetadata: {name: named").unwrap() + start;
    let end = text[..end].rfind("---").unwrap();
    format!("{}{}", &text[..start], &text[end..])
}

#[test]
fn partial_script_touches_only_changed_services() {
    let prev = render::render(&table(), Family::V4);
    let next_table = table_of(&changed_fixture());
    let next = render::render(&next_table, Family::V4);
    let (script, written, removed) = render::script_partial(&prev, &next);
    // web:http and web:dns changed; term removed.
    assert_eq!((written, removed), (2, 1), "{script}");
    let web = render::svc_chain(
        next.services
            .keys()
            .find(|n| n.service.name == "web" && n.port == "http")
            .unwrap(),
    );
    let term = prev.services.keys().find(|n| n.service.name == "term").unwrap();
    let sticky = prev.services.keys().find(|n| n.service.name == "sticky").unwrap();
    assert!(script.contains(&format!("flush chain ip ferry {web}")), "{script}");
    assert!(script.contains("10.244.2.60 . 8080"), "{script}");
    assert!(
        script.contains(&format!("delete chain ip ferry {}", render::svc_chain(term))),
        "{script}"
    );
    assert!(
        script.contains("delete element ip ferry services { 10.96.0.18 . tcp . 80 }"),
        "{script}"
    );
    assert!(
        !script.contains(&render::svc_chain(sticky)),
        "unchanged service touched:\n{script}"
    );
    assert!(
        !script.contains("delete table") && !script.contains("flush table"),
        "{script}"
    );
    // No change: nothing to do.
    assert_eq!(render::script_partial(&next, &next).0, "");
    // The result agrees with a fresh rendering of the new table.
    agree_with_iptables(&next_table);
}

#[test]
fn in_place_full_script_keeps_sets_and_deletes_stale_chains() {
    let prev = render::render(&table(), Family::V4);
    let next = render::render(&table_of(&changed_fixture()), Family::V4);
    let text = render::script_full(&next, Some(&prev));
    assert!(
        text.contains("flush table ip ferry") && !text.contains("delete table"),
        "{text}"
    );
    let term = prev.services.keys().find(|n| n.service.name == "term").unwrap();
    assert!(text.contains(&format!("delete chain ip ferry {}", render::svc_chain(term))));
}

// ---- privileged: the scripts really load (in a namespace of our own) ----

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace for this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("fynft-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn nft(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut s) = child.stdin.take() {
            s.write_all(stdin.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn scripts_load_into_the_kernel() {
    if !is_root() {
        eprintln!("skipping scripts_load_into_the_kernel: needs root (network namespace)");
        return;
    }
    let ns = Netns::new("load");
    let prev = render::render(&table(), Family::V4);
    let next = render::render(&table_of(&changed_fixture()), Family::V4);
    ns.nft(&["-f", "-"], &render::script_full(&prev, None)).unwrap();
    ns.nft(&["-f", "-"], &render::script_partial(&prev, &next).0).unwrap();
    let listed = ns.nft(&["list", "table", "ip", "ferry"], "").unwrap();
    assert!(listed.contains("10.244.2.60 . 8080"), "{listed}");
    assert!(
        !listed.contains("10.244.2.11"),
        "term's endpoint still there:\n{listed}"
    );
    // Back again, in place, and once more from scratch.
    ns.nft(&["-f", "-"], &render::script_full(&prev, Some(&next))).unwrap();
    ns.nft(&["-f", "-"], &render::script_full(&prev, None)).unwrap();
    let again = ns.nft(&["list", "table", "ip", "ferry"], "").unwrap();
    assert!(again.contains("10.244.2.11"), "{again}");
    // IPv6 renders and loads too.
    let v6 = table_of(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s6, namespace: t}\nspec:\n  clusterIP: fd00:96::10\n  sessionAffinity: ClientIP\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s6-1, namespace: t, labels: {kubernetes.io/service-name: s6}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- {addresses: ['fd00:244::5'], nodeName: node-a}\n- {addresses: ['fd00:244::6'], nodeName: node-b}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: r6, namespace: t}\nspec:\n  clusterIP: fd00:96::11\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: r6-1, namespace: t, labels: {kubernetes.io/service-name: r6}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- {addresses: ['fd00:244::5'], nodeName: node-a}\n- {addresses: ['fd00:244::6'], nodeName: node-b}\n",
    );
    ns.nft(&["-f", "-"], &render::render_text(&v6, Family::V6)).unwrap();
    let listed = ns.nft(&["list", "table", "ip6", "ferry"], "").unwrap();
    assert!(listed.contains("fd00:96::10 . tcp . 80"), "{listed}");
}
