//! Pure rendering of a `ServiceTable` into `nft -f` scripts for ferry's own
//! table (`table ip ferry`, `table ip6 ferry`): no I/O, no root.
//!
//! The layout is built for few objects and lookups instead of rule lists:
//!
//! - base chains `nat-prerouting` / `nat-output` do one lookup,
//!   `ip daddr . meta l4proto . th dport vmap @services`, whose elements
//!   (one per frontend: ClusterIP, NodePort on a node IP, externalIP, LB IP)
//!   jump to the service port's chain;
//! - `svc-*` (cluster-wide endpoints) marks for masquerade traffic from
//!   outside the pod CIDRs and DNATs with one rule,
//!   `dnat ip addr . port to numgen random mod N map { 0 : ip . port, ... }`;
//!   `svl-*` does the same over node-local endpoints; `ext-*` decides
//!   masquerading and `externalTrafficPolicy: Local` for external frontends;
//! - ClientIP affinity (rare) uses kube-proxy's nftables layout: one dynamic
//!   set of client addresses per endpoint (`aff-*`, with the service's
//!   timeout) checked first, and one small chain per endpoint (`aep-*`)
//!   that records the client and DNATs;
//! - filter base chains (input, forward, output) look new connections up in
//!   `@no-endpoints`, whose elements reject (TCP reset / ICMP port
//!   unreachable) or drop (Local policy without a local endpoint);
//! - `nat-postrouting` masquerades hairpin traffic (`@hairpin`, source =
//!   destination = a local endpoint) and packets marked 0x4000.
//!
//! Scripts: `script_full` replaces the whole table in one transaction
//! (`add table; delete table; add table ...` on a fresh start; in place,
//! keeping affinity sets, when the previous state is known); `script_partial`
//! touches only the chains of changed service ports and the map elements
//! that differ. Both are applied atomically by `nft -f -`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ferry_cluster::Protocol;
use ipnet::IpNet;

use crate::iptables::render::Family;
use crate::table::{Backend, EmptyAction, FrontendKind, ServiceEntry, ServicePortName, ServiceTable};

/// Name of ferry's table in both families.
pub const TABLE: &str = "ferry";
/// The vmap of frontends with endpoints.
pub const SERVICES: &str = "services";
/// The vmap of frontends without (usable) endpoints: reject or drop.
pub const NO_ENDPOINTS: &str = "no-endpoints";
pub const HAIRPIN: &str = "hairpin";
/// The chain whose dispatch rule the canary check looks for.
pub const CANARY_CHAIN: &str = "nat-prerouting";
/// The rule the canary check looks for in `CANARY_CHAIN`.
pub fn dispatch_rule(family: Family) -> String {
    format!("{} daddr . meta l4proto . th dport vmap @{SERVICES}", fam(family))
}

fn fam(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// `ip ferry` / `ip6 ferry`.
pub fn table_name(family: Family) -> String {
    format!("{} {TABLE}", fam(family))
}

/// FNV-1a 64 in base32: stable, short chain and set names.
fn hash_suffix(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..13)
        .map(|i| char::from(ALPHABET[((h >> (i * 5)) & 31) as usize]))
        .collect()
}

pub fn svc_chain(name: &ServicePortName) -> String {
    format!("svc-{}", hash_suffix(&name.to_string()))
}

pub fn svl_chain(name: &ServicePortName) -> String {
    format!("svl-{}", hash_suffix(&name.to_string()))
}

pub fn ext_chain(name: &ServicePortName) -> String {
    format!("ext-{}", hash_suffix(&name.to_string()))
}

fn endpoint_suffix(name: &ServicePortName, b: &Backend, timeout: u32) -> String {
    hash_suffix(&format!("{name}@{}:{}/{timeout}", b.ip, b.port))
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

const MARK_MASQ: &str = "meta mark set meta mark | 0x4000";

/// What one service port owns in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceNft {
    /// Chains in the order they are written (referenced ones first).
    pub chains: Vec<(String, Vec<String>)>,
    /// Affinity sets: (name, timeout seconds).
    pub sets: Vec<(String, u32)>,
}

/// A complete rendering of one family.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub family: Family,
    pub services: BTreeMap<ServicePortName, ServiceNft>,
    /// (map, key) → verdict; the first service claiming a key wins.
    pub elements: BTreeMap<(&'static str, String), String>,
    pub hairpin: BTreeSet<IpAddr>,
}

impl Rendered {
    /// Rules plus map/set elements: what the kernel holds for us.
    pub fn object_count(&self) -> usize {
        let rules: usize = self
            .services
            .values()
            .flat_map(|s| s.chains.iter())
            .map(|(_, r)| r.len())
            .sum();
        rules + self.elements.len() + self.hairpin.len() + fixed_chains(self.family).len()
    }

    fn chain_names(&self) -> BTreeSet<&str> {
        self.services
            .values()
            .flat_map(|s| s.chains.iter().map(|(n, _)| n.as_str()))
            .collect()
    }

    fn set_names(&self) -> BTreeSet<(&str, u32)> {
        self.services
            .values()
            .flat_map(|s| s.sets.iter().map(|(n, t)| (n.as_str(), *t)))
            .collect()
    }
}

/// Endpoint choice for `backends` (non-empty), appended to `rules`; the
/// affinity endpoint chains go to `extra` and their sets to `sets`.
fn balance(
    e: &ServiceEntry,
    backends: &[&Backend],
    family: Family,
    rules: &mut Vec<String>,
    extra: &mut BTreeMap<String, Vec<String>>,
    sets: &mut BTreeSet<(String, u32)>,
) {
    let f = fam(family);
    let p = proto(e.protocol);
    if let Some(timeout) = e.affinity_timeout {
        let mut targets = Vec::new();
        for b in backends {
            let sfx = endpoint_suffix(&e.name, b, timeout);
            let (set, chain) = (format!("aff-{sfx}"), format!("aep-{sfx}"));
            rules.push(format!("{f} saddr @{set} goto {chain}"));
            extra.insert(
                chain.clone(),
                vec![format!(
                    "update @{set} {{ {f} saddr }} meta l4proto {p} dnat to {}",
                    endpoint(b.ip, b.port)
                )],
            );
            sets.insert((set, timeout));
            targets.push(chain);
        }
        match targets.as_slice() {
            [one] => rules.push(format!("goto {one}")),
            _ => {
                let vmap: Vec<String> = targets
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{i} : goto {c}"))
                    .collect();
                rules.push(format!(
                    "numgen random mod {} vmap {{ {} }}",
                    targets.len(),
                    vmap.join(", ")
                ));
            }
        }
        return;
    }
    match backends {
        [one] => rules.push(format!("meta l4proto {p} dnat to {}", endpoint(one.ip, one.port))),
        _ => {
            let map: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {} . {}", b.ip, b.port))
                .collect();
            rules.push(format!(
                "meta l4proto {p} dnat {f} addr . port to numgen random mod {} map {{ {} }}",
                backends.len(),
                map.join(", ")
            ));
        }
    }
}

fn cidr_match(cidrs: &[&IpNet]) -> String {
    match cidrs {
        [one] => one.to_string(),
        _ => format!(
            "{{ {} }}",
            cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The chains and sets of one service port in one family (same decisions
/// as the iptables renderer's `service_chains`).
pub fn service_nft(e: &ServiceEntry, family: Family, cluster_cidrs: &[IpNet]) -> ServiceNft {
    let mut out = ServiceNft::default();
    if !e.frontends.iter().any(|f| Family::of(f.ip) == family) {
        return out;
    }
    let f = fam(family);
    let all: Vec<&Backend> = e.backends.iter().filter(|b| Family::of(b.ip) == family).collect();
    let local: Vec<&Backend> = e.local_backends.iter().filter(|b| Family::of(b.ip) == family).collect();
    let has_external = e
        .frontends
        .iter()
        .any(|fe| fe.kind.is_external() && Family::of(fe.ip) == family);
    let cidrs: Vec<&IpNet> = cluster_cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .collect();
    let needs_svl = (e.internal_local || (e.external_local && has_external)) && !local.is_empty();
    let mut extra = BTreeMap::new();
    let mut sets = BTreeSet::new();
    let mut main = Vec::new();
    if !all.is_empty() {
        let mut rules = Vec::new();
        if !cidrs.is_empty() {
            rules.push(format!("{f} saddr != {} {MARK_MASQ}", cidr_match(&cidrs)));
        }
        balance(e, &all, family, &mut rules, &mut extra, &mut sets);
        main.push((svc_chain(&e.name), rules));
    }
    if needs_svl {
        let mut rules = Vec::new();
        balance(e, &local, family, &mut rules, &mut extra, &mut sets);
        main.push((svl_chain(&e.name), rules));
    }
    if has_external && e.empty_action(FrontendKind::NodePort).is_none() {
        let mut rules = Vec::new();
        if e.frontends
            .iter()
            .any(|fe| fe.ip.is_loopback() && Family::of(fe.ip) == family)
        {
            // Localhost NodePorts: a 127/8 source cannot be replied to from a pod.
            let lo = match family {
                Family::V4 => "127.0.0.0/8",
                Family::V6 => "::1",
            };
            rules.push(format!("{f} saddr {lo} {MARK_MASQ}"));
        }
        if e.masquerade_external() {
            rules.push(format!("{MARK_MASQ} goto {}", svc_chain(&e.name)));
        } else {
            // Pods and the node itself may use every endpoint: their source
            // needs no preserving (kube-proxy's short-circuit).
            if !all.is_empty() {
                if !cidrs.is_empty() {
                    rules.push(format!("{f} saddr {} goto {}", cidr_match(&cidrs), svc_chain(&e.name)));
                }
                rules.push(format!("fib saddr type local {MARK_MASQ} goto {}", svc_chain(&e.name)));
            }
            rules.push(format!("goto {}", svl_chain(&e.name)));
        }
        main.push((ext_chain(&e.name), rules));
    }
    // Endpoint chains first: the service chains refer to them.
    out.chains.extend(extra);
    out.chains.extend(main);
    out.sets.extend(sets);
    out
}

/// The map elements of one service port: (map, key, verdict).
fn service_elements(e: &ServiceEntry, family: Family) -> Vec<(&'static str, String, String)> {
    let p = proto(e.protocol);
    let mut out = Vec::new();
    for fe in e.frontends.iter().filter(|fe| Family::of(fe.ip) == family) {
        let key = format!("{} . {p} . {}", fe.ip, fe.port);
        match e.empty_action(fe.kind) {
            Some(EmptyAction::Reject) => out.push((NO_ENDPOINTS, key, "goto do-reject".to_string())),
            Some(EmptyAction::Drop) => out.push((NO_ENDPOINTS, key, "drop".to_string())),
            None => {
                let chain = match fe.kind {
                    FrontendKind::ClusterIp if e.internal_local => svl_chain(&e.name),
                    FrontendKind::ClusterIp => svc_chain(&e.name),
                    _ => ext_chain(&e.name),
                };
                out.push((SERVICES, key, format!("goto {chain}")));
            }
        }
    }
    out
}

pub fn render(table: &ServiceTable, family: Family) -> Rendered {
    let mut r = Rendered {
        family,
        services: BTreeMap::new(),
        elements: BTreeMap::new(),
        hairpin: BTreeSet::new(),
    };
    for e in table.services.values() {
        r.hairpin.extend(
            e.backends
                .iter()
                .chain(e.local_backends.iter())
                .filter(|b| b.local && Family::of(b.ip) == family)
                .map(|b| b.ip),
        );
        for (map, key, verdict) in service_elements(e, family) {
            r.elements.entry((map, key)).or_insert(verdict);
        }
        let s = service_nft(e, family, &table.cluster_cidrs);
        if !s.chains.is_empty() {
            r.services.insert(e.name.clone(), s);
        }
    }
    r
}

/// The fixed chains: (name, declaration, rules).
fn fixed_chains(family: Family) -> Vec<(&'static str, String, Vec<String>)> {
    let f = fam(family);
    let dispatch = dispatch_rule(family);
    let no_ep = format!("ct state new {f} daddr . meta l4proto . th dport vmap @{NO_ENDPOINTS}");
    vec![
        (
            "do-reject",
            String::new(),
            // ICMP errors are rate-limited per destination; a reset is not.
            vec!["meta l4proto tcp reject with tcp reset".into(), "reject".into()],
        ),
        (
            "nat-prerouting",
            "type nat hook prerouting priority dstnat; policy accept;".into(),
            vec![dispatch.clone()],
        ),
        (
            "nat-output",
            "type nat hook output priority -100; policy accept;".into(),
            vec![dispatch],
        ),
        (
            "nat-postrouting",
            "type nat hook postrouting priority srcnat; policy accept;".into(),
            vec![
                format!("{f} saddr . {f} daddr @{HAIRPIN} masquerade"),
                "meta mark & 0x4000 == 0 return".into(),
                "meta mark set meta mark ^ 0x4000".into(),
                "masquerade fully-random".into(),
            ],
        ),
        (
            "filter-input",
            "type filter hook input priority filter - 10; policy accept;".into(),
            vec![no_ep.clone()],
        ),
        (
            "filter-forward",
            "type filter hook forward priority filter - 10; policy accept;".into(),
            vec![no_ep.clone()],
        ),
        (
            "filter-output",
            "type filter hook output priority filter - 10; policy accept;".into(),
            vec![no_ep],
        ),
    ]
}

/// Writes `add element` lines, batching many elements per line.
fn write_elements<'a>(out: &mut String, verb: &str, t: &str, map: &str, items: impl Iterator<Item = String> + 'a) {
    let mut batch: Vec<String> = Vec::new();
    let flush = |out: &mut String, batch: &mut Vec<String>| {
        if !batch.is_empty() {
            let _ = writeln!(out, "{verb} element {t} {map} {{ {} }}", batch.join(", "));
            batch.clear();
        }
    };
    for it in items {
        batch.push(it);
        if batch.len() == 256 {
            flush(out, &mut batch);
        }
    }
    flush(out, &mut batch);
}

fn write_set_decl(out: &mut String, t: &str, family: Family, name: &str, timeout: u32) {
    let _ = writeln!(
        out,
        "add set {t} {name} {{ type {}; flags dynamic,timeout; timeout {timeout}s; }}",
        addr_type(family)
    );
}

fn write_rules(out: &mut String, t: &str, chain: &str, rules: &[String]) {
    for r in rules {
        let _ = writeln!(out, "add rule {t} {chain} {r}");
    }
}

fn element_line((map, key): &(&'static str, String), verdict: &str) -> (&'static str, String) {
    (map, format!("{key} : {verdict}"))
}

/// One transaction that makes the table exactly `next`. Without `prev`
/// (first sync, or after a failure or a failed canary) the table is
/// deleted and recreated; with it, the table is rebuilt in place, so the
/// dynamic affinity sets keep their clients, and `prev`'s chains and sets
/// that `next` lacks are deleted.
pub fn script_full(next: &Rendered, prev: Option<&Rendered>) -> String {
    let family = next.family;
    let t = table_name(family);
    let a = addr_type(family);
    let mut out = String::with_capacity(256 + next.services.len() * 400);
    let _ = writeln!(out, "add table {t}");
    match prev {
        None => {
            let _ = writeln!(out, "delete table {t}");
            let _ = writeln!(out, "add table {t}");
        }
        Some(_) => {
            // Removes every rule; set and map elements stay.
            let _ = writeln!(out, "flush table {t}");
        }
    }
    let _ = writeln!(
        out,
        "add map {t} {SERVICES} {{ type {a} . inet_proto . inet_service : verdict; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} {NO_ENDPOINTS} {{ type {a} . inet_proto . inet_service : verdict; }}"
    );
    let _ = writeln!(out, "add set {t} {HAIRPIN} {{ type {a} . {a}; }}");
    if prev.is_some() {
        for m in [SERVICES, NO_ENDPOINTS] {
            let _ = writeln!(out, "flush map {t} {m}");
        }
        let _ = writeln!(out, "flush set {t} {HAIRPIN}");
    }
    let fixed = fixed_chains(family);
    for (name, decl, _) in &fixed {
        if decl.is_empty() {
            let _ = writeln!(out, "add chain {t} {name}");
        } else {
            let _ = writeln!(out, "add chain {t} {name} {{ {decl} }}");
        }
    }
    for (name, timeout) in next.set_names() {
        write_set_decl(&mut out, &t, family, name, timeout);
    }
    for s in next.services.values() {
        for (name, _) in &s.chains {
            let _ = writeln!(out, "add chain {t} {name}");
        }
    }
    for (name, _, rules) in &fixed {
        write_rules(&mut out, &t, name, rules);
    }
    for s in next.services.values() {
        for (name, rules) in &s.chains {
            write_rules(&mut out, &t, name, rules);
        }
    }
    write_all_elements(&mut out, &t, next);
    if let Some(prev) = prev {
        let chains = next.chain_names();
        for n in prev.chain_names().difference(&chains) {
            let _ = writeln!(out, "delete chain {t} {n}");
        }
        let sets = next.set_names();
        for (n, _) in prev.set_names().difference(&sets) {
            let _ = writeln!(out, "delete set {t} {n}");
        }
    }
    out
}

fn write_all_elements(out: &mut String, t: &str, r: &Rendered) {
    for map in [SERVICES, NO_ENDPOINTS] {
        write_elements(
            out,
            "add",
            t,
            map,
            r.elements
                .iter()
                .filter(|((m, _), _)| *m == map)
                .map(|(k, v)| element_line(k, v).1),
        );
    }
    write_elements(
        out,
        "add",
        t,
        HAIRPIN,
        r.hairpin.iter().map(|ip| format!("{ip} . {ip}")),
    );
}

/// One transaction from `prev` (what the kernel holds) to `next`, touching
/// only the chains of service ports whose rendering changed and the
/// elements that differ. Returns the script and the service ports written
/// and removed.
pub fn script_partial(prev: &Rendered, next: &Rendered) -> (String, usize, usize) {
    let t = table_name(next.family);
    let mut out = String::new();
    // Elements that go away or change their verdict are deleted first.
    let mut delete: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut add: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (k, v) in &prev.elements {
        if next.elements.get(k) != Some(v) {
            delete.entry(k.0).or_default().push(k.1.clone());
        }
    }
    for (k, v) in &next.elements {
        if prev.elements.get(k) != Some(v) {
            let (map, line) = element_line(k, v);
            add.entry(map).or_default().push(line);
        }
    }
    for (map, keys) in &delete {
        write_elements(&mut out, "delete", &t, map, keys.iter().cloned());
    }
    let hp_del: Vec<String> = prev
        .hairpin
        .difference(&next.hairpin)
        .map(|ip| format!("{ip} . {ip}"))
        .collect();
    write_elements(&mut out, "delete", &t, HAIRPIN, hp_del.into_iter());

    let mut written = Vec::new();
    let mut removed = 0;
    let mut stale_chains: Vec<&str> = Vec::new();
    let mut stale_sets: Vec<&str> = Vec::new();
    for (name, s) in &next.services {
        if prev.services.get(name) != Some(s) {
            written.push((name, s));
        }
    }
    for (name, s) in &prev.services {
        let new = next.services.get(name);
        if new.is_none() {
            removed += 1;
        }
        if new == Some(s) {
            continue;
        }
        for (c, _) in &s.chains {
            if !new.is_some_and(|n| n.chains.iter().any(|(nc, _)| nc == c)) {
                stale_chains.push(c);
            }
        }
        for (set, _) in &s.sets {
            if !new.is_some_and(|n| n.sets.iter().any(|(ns, _)| ns == set)) {
                stale_sets.push(set);
            }
        }
    }
    // Declare new chains and sets, empty changed and stale chains (so that
    // nothing refers to what is deleted below), then refill.
    for (_, s) in &written {
        for (set, timeout) in &s.sets {
            write_set_decl(&mut out, &t, next.family, set, *timeout);
        }
        for (c, _) in &s.chains {
            let _ = writeln!(out, "add chain {t} {c}");
        }
    }
    for (name, s) in &prev.services {
        if next.services.get(name) == Some(s) {
            continue;
        }
        for (c, _) in &s.chains {
            let _ = writeln!(out, "flush chain {t} {c}");
        }
    }
    for (_, s) in &written {
        for (c, rules) in &s.chains {
            write_rules(&mut out, &t, c, rules);
        }
    }
    for (map, lines) in &add {
        write_elements(&mut out, "add", &t, map, lines.iter().cloned());
    }
    let hp_add: Vec<String> = next
        .hairpin
        .difference(&prev.hairpin)
        .map(|ip| format!("{ip} . {ip}"))
        .collect();
    write_elements(&mut out, "add", &t, HAIRPIN, hp_add.into_iter());
    for c in stale_chains {
        let _ = writeln!(out, "delete chain {t} {c}");
    }
    for s in stale_sets {
        let _ = writeln!(out, "delete set {t} {s}");
    }
    (out, written.len(), removed)
}

/// The whole table as one fresh-start script (what `render --what
/// nftables` prints and the golden file holds).
pub fn render_text(table: &ServiceTable, family: Family) -> String {
    script_full(&render(table, family), None)
}
