//! Tests of the nftables rendering: a golden file for the fixture cluster;
//! a small tracer over the rendered table compared, packet by packet, with
//! the iptables packet tracer over the iptables rendering of the same
//! table (the two dataplanes must agree on every policy); partial scripts
//! that touch only what changed; and, as root, the scripts loaded into a
//! network namespace this test creates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ferry_cluster::Protocol;

use super::render::{self, Cmd, Elem, Rendered, Rule, Verdict};
use crate::fixtures::{self, fixture_text, node, snapshot};
use crate::iptables::render::Family;
use crate::iptables::trace::{self, Origin, Packet, Verdict as TVerdict};
use crate::table::{plan, NodeConfig, ServiceTable};

fn table_of(yaml: &str) -> ServiceTable {
    let (t, w) = plan(&snapshot(yaml), &node());
    assert!(w.is_empty(), "{w:?}");
    t
}

fn table() -> ServiceTable {
    table_of(&fixture_text())
}

#[test]
fn golden_script() {
    fixtures::assert_golden("policies.nft", &render::render_text(&table(), Family::V4));
}

/// Outcome of one path: verdict, masquerade → probability.
type Outcomes = BTreeMap<(TVerdict, bool), f64>;

fn outcomes(t: &trace::Trace) -> Outcomes {
    let mut out = Outcomes::new();
    for p in &t.paths {
        *out.entry((p.verdict, p.masquerade)).or_insert(0.0) += p.probability;
    }
    out
}

/// Follows a first packet through the rendered table: the nat dispatch
/// map, then the service chains, the filter map for frontends without
/// endpoints, and postrouting masquerade. Affinity sets are empty for a
/// first packet.
fn nft_trace(r: &Rendered, p: &Packet) -> Outcomes {
    let key = render::FrontendKey {
        ip: p.dst,
        proto: p.protocol,
        port: p.dport,
    };
    let mut chains: BTreeMap<&str, &Vec<Rule>> = r
        .services
        .values()
        .flat_map(|s| s.chains.iter().map(|(n, rules)| (n.as_str(), rules)))
        .collect();
    let script = render::script_full(r, None);
    let fixed: Vec<(String, Vec<Rule>)> = script
        .cmds
        .iter()
        .filter_map(|c| match c {
            Cmd::AddRule(chain, rule) if chain == render::MARK_OUTSIDE => Some((chain.clone(), rule.clone())),
            _ => None,
        })
        .fold(Vec::new(), |mut acc, (c, rule)| {
            match acc.iter_mut().find(|(n, _)| *n == c) {
                Some((_, v)) => v.push(rule),
                None => acc.push((c, vec![rule])),
            }
            acc
        });
    for (n, rules) in &fixed {
        chains.insert(n.as_str(), rules);
    }
    let backends: BTreeMap<(&str, u32), SocketAddr> = r
        .services
        .values()
        .flat_map(|s| s.backends.iter())
        .flat_map(|(m, _, elems)| {
            elems.iter().filter_map(move |e| match e {
                Elem::Backend { key, addr, port } => Some(((m.as_str(), *key), SocketAddr::new(*addr, *port))),
                _ => None,
            })
        })
        .collect();
    let t = Tracer {
        chains: &chains,
        backends: &backends,
        p,
    };
    let mut out = Outcomes::new();
    if let Some(v) = r.elements.get(&(render::SERVICES, key)) {
        let Verdict::Goto(start) = v else {
            panic!("services element {v:?}")
        };
        t.walk(start, false, 1.0, &mut out);
    } else if let Some(v) = r.elements.get(&(render::NO_ENDPOINTS, key)) {
        let verdict = if *v == Verdict::Drop {
            TVerdict::Drop
        } else {
            TVerdict::Reject
        };
        out.insert((verdict, false), 1.0);
    } else {
        out.insert((TVerdict::Untouched, false), 1.0);
    }
    // Postrouting: hairpin (source = destination = a local endpoint).
    let mut fixed = Outcomes::new();
    for ((v, masq), prob) in out {
        let hairpin = matches!(v, TVerdict::Endpoint(ep) if ep.ip() == p.src && r.hairpin.contains(&p.src));
        *fixed.entry((v, masq || hairpin)).or_insert(0.0) += prob;
    }
    fixed
}

struct Tracer<'a> {
    chains: &'a BTreeMap<&'a str, &'a Vec<Rule>>,
    backends: &'a BTreeMap<(&'a str, u32), SocketAddr>,
    p: &'a Packet,
}

/// What walking a chain ended in.
enum End {
    /// Fell off the end or returned.
    Continue(bool),
    /// The packet's fate is recorded.
    Done,
}

impl Tracer<'_> {
    fn walk(&self, chain: &str, masq: bool, prob: f64, out: &mut Outcomes) {
        if let End::Continue(masq) = self.run(chain, masq, prob, out) {
            // Falling off a service chain: the packet goes on as addressed.
            *out.entry((TVerdict::Untouched, masq)).or_insert(0.0) += prob;
        }
    }

    fn run(&self, chain: &str, mut masq: bool, prob: f64, out: &mut Outcomes) -> End {
        let rules = self.chains.get(chain).unwrap_or_else(|| panic!("no chain {chain}"));
        let p = self.p;
        let mut left = prob;
        for rule in rules.iter() {
            match rule {
                Rule::Step {
                    saddr,
                    fib_local,
                    mark,
                    verdict,
                } => {
                    if saddr.is_some_and(|n| !n.contains(&p.src)) || (*fib_local && !p.src_local) {
                        continue;
                    }
                    masq |= *mark;
                    match verdict {
                        None => {}
                        Some(Verdict::Return) => return End::Continue(masq),
                        Some(Verdict::Jump(c)) => match self.run(c, masq, left, out) {
                            End::Continue(m) => masq = m,
                            End::Done => return End::Done,
                        },
                        Some(Verdict::Goto(c)) => return self.run(c, masq, left, out),
                        Some(Verdict::Drop) => panic!("drop in {chain}"),
                    }
                }
                // An affinity set: empty for a first packet.
                Rule::AffinityHit { .. } => {}
                Rule::Pick { n, chain: target } => {
                    let share = left / f64::from(*n);
                    self.walk(target, masq, share, out);
                    left -= share;
                    if *n == 1 {
                        return End::Done;
                    }
                }
                Rule::Dnat { proto, addr, port, .. } => {
                    if *proto != p.protocol {
                        continue;
                    }
                    let ep = SocketAddr::new(*addr, *port);
                    *out.entry((TVerdict::Endpoint(ep), masq)).or_insert(0.0) += left;
                    return End::Done;
                }
                Rule::DnatMap { proto, n, offset, map } => {
                    if *proto != p.protocol {
                        continue;
                    }
                    for i in 0..*n {
                        let ep = self.backends[&(map.as_str(), offset + i)];
                        *out.entry((TVerdict::Endpoint(ep), masq)).or_insert(0.0) += left / f64::from(*n);
                    }
                    return End::Done;
                }
                other => panic!("tracer does not expect {other:?} in {chain}"),
            }
        }
        End::Continue(masq)
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
        &snapshot(&fixture_text()),
        &NodeConfig {
            cluster_cidrs: vec![],
            ..node()
        },
    );
    agree_with_iptables(&t);
    let (t, _) = plan(
        &snapshot(&fixture_text()),
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
    let svc: Vec<String> = sticky
        .chains
        .last()
        .unwrap()
        .1
        .iter()
        .map(|r| r.text(Family::V4))
        .collect();
    assert!(
        svc[1].starts_with("ip saddr @aff-") && svc[2].starts_with("ip saddr @aff-"),
        "{svc:?}"
    );
    assert!(svc[3].starts_with("numgen random mod 2 0 goto aep-"), "{svc:?}");
    assert!(svc[4].starts_with("goto aep-"), "{svc:?}");
    let text = render::script_full(&r, None).text();
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
    let script = script.text();
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
    assert!(script.contains(": 10.244.2.60 . 8080"), "{script}");
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
    assert!(render::script_partial(&next, &next).0.is_empty());
    // The result agrees with a fresh rendering of the new table.
    agree_with_iptables(&next_table);
}

#[test]
fn in_place_full_script_keeps_sets_and_deletes_stale_chains() {
    let prev = render::render(&table(), Family::V4);
    let next = render::render(&table_of(&changed_fixture()), Family::V4);
    let text = render::script_full(&next, Some(&prev)).text();
    assert!(
        text.contains("flush table ip ferry") && !text.contains("delete table"),
        "{text}"
    );
    let term = prev.services.keys().find(|n| n.service.name == "term").unwrap();
    assert!(text.contains(&format!("delete chain ip ferry {}", render::svc_chain(term))));
}

// ---- privileged: the scripts really load (in a namespace of our own) ----

/// True when root; otherwise prints `SKIPPED (needs root): <test>` and
/// records it in `$FERRY_SKIPPED_LOG` for `cargo xtask test`'s summary
/// (the same protocol as tests/common/skip.rs).
fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED (needs root): {name}");
    if let Some(path) = std::env::var_os("FERRY_SKIPPED_LOG") {
        use std::io::Write;
        let line = format!("needs root\t{} {name}\n", env!("CARGO_CRATE_NAME"));
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    false
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
    if !require_root() {
        return;
    }
    let ns = Netns::new("load");
    let prev = render::render(&table(), Family::V4);
    let next = render::render(&table_of(&changed_fixture()), Family::V4);
    ns.nft(&["-f", "-"], &render::script_full(&prev, None).text()).unwrap();
    ns.nft(&["-f", "-"], &render::script_partial(&prev, &next).0.text())
        .unwrap();
    let listed = ns.nft(&["list", "table", "ip", "ferry"], "").unwrap();
    assert!(listed.contains("10.244.2.60 . 8080"), "{listed}");
    assert!(
        !listed.contains("10.244.2.11"),
        "term's endpoint still there:\n{listed}"
    );
    // Back again, in place, and once more from scratch.
    ns.nft(&["-f", "-"], &render::script_full(&prev, Some(&next)).text())
        .unwrap();
    ns.nft(&["-f", "-"], &render::script_full(&prev, None).text()).unwrap();
    let again = ns.nft(&["list", "table", "ip", "ferry"], "").unwrap();
    assert!(again.contains("10.244.2.11"), "{again}");
    // IPv6 renders and loads too.
    let v6 = table_of(&v6_fixture());
    ns.nft(&["-f", "-"], &render::render_text(&v6, Family::V6)).unwrap();
    let listed = ns.nft(&["list", "table", "ip6", "ferry"], "").unwrap();
    assert!(listed.contains("fd00:96::10 . tcp . 80"), "{listed}");
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).unwrap();
            // SAFETY: setns on this thread only, with an open namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// The kernel's view of our table as nft's netlink debug listing prints
/// it: the expressions of every rule and the raw bytes of every element,
/// not the syntax nft derives from them (set declarations made over
/// netlink carry no `typeof` user data, so nft prints their keys
/// differently), sorted within each object.
fn kernel_listing(ns: &Netns, family: &str) -> String {
    let out = ns
        .nft(&["--debug=netlink", "list", "table", family, "ferry"], "")
        .unwrap();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in out.lines() {
        if line.trim().is_empty() || line.starts_with("table ") {
            continue;
        }
        let l = line.trim();
        if l.starts_with("ip ferry") || l.starts_with("ip6 ferry") {
            // "ip ferry CHAIN HANDLE [POSITION]": handles depend on history.
            blocks.push(vec![l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")]);
        } else if l.starts_with('[') || l.starts_with("element ") {
            if let Some(b) = blocks.last_mut() {
                b.push(l.to_string());
            }
        }
    }
    for b in &mut blocks {
        b[1..].sort();
    }
    blocks.sort();
    blocks.into_iter().map(|b| b.join("\n")).collect::<Vec<_>>().join("\n")
}

#[test]
fn netlink_batches_equal_nft_scripts_in_the_kernel() {
    if !require_root() {
        return;
    }
    let prev = render::render(&table(), Family::V4);
    let next = render::render(&table_of(&changed_fixture()), Family::V4);
    let by_nft = Netns::new("text");
    let by_netlink = Netns::new("nl");
    let steps = [
        render::script_full(&prev, None),
        render::script_partial(&prev, &next).0,
        render::script_full(&prev, Some(&next)),
        render::script_partial(&prev, &next).0,
    ];
    for (i, script) in steps.iter().enumerate() {
        by_nft.nft(&["-f", "-"], &script.text()).unwrap();
        in_netns(&by_netlink, || super::netlink::apply(script)).unwrap();
        let (want, got) = (kernel_listing(&by_nft, "ip"), kernel_listing(&by_netlink, "ip"));
        assert!(want.contains("[ nat dnat ip") && want.contains("element "), "{want}");
        assert!(
            want == got,
            "step {i}: nft and netlink disagree\n--- nft:\n{want}\n--- netlink:\n{got}"
        );
    }
    // A refused batch names the command and changes nothing.
    let before = kernel_listing(&by_netlink, "ip");
    let bad = render::Script {
        family: Family::V4,
        table: render::TABLE,
        cmds: vec![
            Cmd::AddChain("new-one".into(), None),
            Cmd::AddRule(
                "no-such-chain".into(),
                Rule::Pick {
                    n: 1,
                    chain: "new-one".into(),
                },
            ),
        ],
    };
    let err = in_netns(&by_netlink, || super::netlink::apply(&bad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-chain"), "{err}");
    assert_eq!(before, kernel_listing(&by_netlink, "ip"));
    // IPv6.
    let v6 = table_of(&v6_fixture());
    let script = render::script_full(&render::render(&v6, Family::V6), None);
    by_nft.nft(&["-f", "-"], &script.text()).unwrap();
    in_netns(&by_netlink, || super::netlink::apply(&script)).unwrap();
    assert_eq!(kernel_listing(&by_nft, "ip6"), kernel_listing(&by_netlink, "ip6"));
}

fn v6_fixture() -> String {
    "apiVersion: v1\nkind: Service\nmetadata: {name: s6, namespace: t}\nspec:\n  clusterIP: fd00:96::10\n  sessionAffinity: ClientIP\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s6-1, namespace: t, labels: {kubernetes.io/service-name: s6}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- {addresses: ['fd00:244::5'], nodeName: node-a}\n- {addresses: ['fd00:244::6'], nodeName: node-b}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: r6, namespace: t}\nspec:\n  clusterIP: fd00:96::11\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: r6-1, namespace: t, labels: {kubernetes.io/service-name: r6}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints:\n- {addresses: ['fd00:244::5'], nodeName: node-a}\n- {addresses: ['fd00:244::6'], nodeName: node-b}\n".to_string()
}

#[test]
fn netlink_splits_large_element_lists() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("big");
    let r = render::render(&table(), Family::V4);
    let mut script = render::script_full(&r, None);
    // 5,000 frontends in one command: far past one attribute's 64 KiB.
    let elems: Vec<Elem> = (0..5000u32)
        .map(|i| Elem::Frontend {
            key: render::FrontendKey {
                ip: std::net::Ipv4Addr::from(0x0a60_0000 + 1000 + i).into(),
                proto: Protocol::Tcp,
                port: 80,
            },
            verdict: Verdict::Goto("do-reject".into()),
        })
        .collect();
    script.cmds.push(Cmd::AddElements(render::NO_ENDPOINTS.into(), elems));
    in_netns(&ns, || super::netlink::apply(&script)).unwrap();
    let listed = ns
        .nft(&["list", "map", "ip", "ferry", render::NO_ENDPOINTS], "")
        .unwrap();
    assert_eq!(listed.matches("goto do-reject").count(), 5000 + 2, "{listed}");
}

/// The script's commands as sorted lines (order within a transaction
/// differs between the two ways of computing a partial).
fn sorted_lines(s: &render::Script) -> Vec<String> {
    let mut v: Vec<String> = s.text().lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn update_in_place_equals_a_fresh_rendering() {
    let t1 = table();
    let t2 = table_of(&changed_fixture());
    let empty = table_of("");
    for (prev_t, next_t) in [(&t1, &t2), (&t2, &t1), (&t1, &t1), (&t2, &empty), (&empty, &t1)] {
        let prev = render::render(prev_t, Family::V4);
        let fresh = render::render(next_t, Family::V4);
        let mut r = prev.clone();
        let (script, ..) = r.update(prev_t, next_t).unwrap();
        assert_eq!(render::script_full(&r, None), render::script_full(&fresh, None));
        assert_eq!(r.elements, fresh.elements);
        assert_eq!(r.hairpin, fresh.hairpin);
        let (want, ..) = render::script_partial(&prev, &fresh);
        assert_eq!(sorted_lines(&script), sorted_lines(&want));
    }
}

#[test]
fn update_scripts_reach_the_same_kernel_state_as_a_fresh_load() {
    if !require_root() {
        return;
    }
    let t1 = table();
    let t2 = table_of(&changed_fixture());
    let stepped = Netns::new("upd");
    let fresh = Netns::new("fresh");
    let mut r = render::render(&t1, Family::V4);
    in_netns(&stepped, || super::netlink::apply(&render::script_full(&r, None))).unwrap();
    let mut prev_t = &t1;
    for next_t in [&t2, &t1, &t2] {
        let (script, ..) = r.update(prev_t, next_t).unwrap();
        in_netns(&stepped, || super::netlink::apply(&script)).unwrap();
        let full = render::script_full(&render::render(next_t, Family::V4), None);
        in_netns(&fresh, || super::netlink::apply(&full)).unwrap();
        assert_eq!(kernel_listing(&stepped, "ip"), kernel_listing(&fresh, "ip"));
        prev_t = next_t;
    }
}

#[test]
fn the_canary_reads_the_dispatch_rule_back_over_netlink() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("canary");
    let nl = super::netlink::chain_looks_up;
    let exists = |f| super::netlink::table_exists(f, render::TABLE);
    let (chain, map) = (render::CANARY_CHAIN, render::SERVICES);
    assert!(!in_netns(&ns, || exists(Family::V4)).unwrap());
    assert!(!in_netns(&ns, || nl(Family::V4, chain, map)).unwrap());
    let script = render::script_full(&render::render(&table(), Family::V4), None);
    in_netns(&ns, || super::netlink::apply(&script)).unwrap();
    assert!(in_netns(&ns, || exists(Family::V4)).unwrap());
    assert!(!in_netns(&ns, || exists(Family::V6)).unwrap());
    assert!(in_netns(&ns, || nl(Family::V4, chain, map)).unwrap());
    assert!(!in_netns(&ns, || nl(Family::V4, "nat-output", "no-endpoints")).unwrap());
    ns.nft(&["flush", "chain", "ip", "ferry", chain], "").unwrap();
    assert!(!in_netns(&ns, || nl(Family::V4, chain, map)).unwrap());
    ns.nft(&["delete", "table", "ip", "ferry"], "").unwrap();
    assert!(!in_netns(&ns, || exists(Family::V4)).unwrap());
}
