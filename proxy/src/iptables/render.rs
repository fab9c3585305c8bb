//! Pure rendering of a `ServiceTable` into `iptables-restore` input, in
//! chains ferry owns (all named `FERRY-*`), following kube-proxy's layout:
//!
//! - nat `FERRY-SERVICES` (from PREROUTING and OUTPUT): one rule per
//!   ClusterIP / externalIP / LB frontend, jumping to the service's chain;
//!   last, `--dst-type LOCAL` traffic goes on to `FERRY-NODEPORTS`.
//! - `FERRY-SVC-*` picks a cluster-wide endpoint and DNATs to it directly
//!   (statistic random, with `recent` for ClientIP affinity); `FERRY-SVL-*`
//!   a node-local one; `FERRY-EXT-*` decides masquerade and Local policy for
//!   external traffic.
//! - nat `FERRY-POSTROUTING` masquerades marked packets, and hairpin
//!   packets (source = destination = an endpoint that may be local) via
//!   `FERRY-HAIRPIN`.
//!
//! Unlike kube-proxy there is no per-endpoint chain and hairpin rules exist
//! only for endpoints that may be on this node (the only ones that can
//! hairpin here: local ones, and those of unknown node, `Backend::hairpin`):
//! about a third of kube-proxy's rules and a tenth of its chains, which is
//! what iptables-restore time is proportional to. Partial syncs rewrite
//! only changed service chains and edit the dispatch chains rule by rule.
//! - filter `FERRY-FILTER` rejects (or drops) new connections to frontends
//!   without endpoints; `FERRY-FORWARD` accepts what we forward.
//!
//! Rendering never does I/O; the apply step (`apply.rs`) feeds the text to
//! `iptables-restore --noflush` and installs the jumps in `HOOKS`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ferry_cluster::Protocol;
use ipnet::IpNet;

use crate::table::{Backend, EmptyAction, FrontendKind, ServiceEntry, ServicePortName, ServiceTable};

pub const SERVICES: &str = "FERRY-SERVICES";
pub const NODEPORTS: &str = "FERRY-NODEPORTS";
pub const POSTROUTING: &str = "FERRY-POSTROUTING";
pub const MARK_MASQ: &str = "FERRY-MARK-MASQ";
pub const MASQ_OUTSIDE: &str = "FERRY-MASQ-OUTSIDE";
pub const HAIRPIN: &str = "FERRY-HAIRPIN";
pub const FILTER: &str = "FERRY-FILTER";
pub const FORWARD: &str = "FERRY-FORWARD";
/// Exists in nat and filter with one rule; if it is gone or empty, someone
/// flushed or deleted our rules and the next sync must be full.
pub const CANARY: &str = "FERRY-CANARY";
/// The packet mark meaning "masquerade me" (kube-proxy's 0x4000 bit).
pub const MASQ_MARK: &str = "0x4000/0x4000";
pub const CHAIN_PREFIX: &str = "FERRY-";

/// Jumps from the built-in chains into ours: (table, builtin chain, rule spec).
pub const HOOKS: [(&str, &str, &str); 7] = [
    (
        "nat",
        "PREROUTING",
        "-m comment --comment ferry-services -j FERRY-SERVICES",
    ),
    ("nat", "OUTPUT", "-m comment --comment ferry-services -j FERRY-SERVICES"),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment ferry-postrouting -j FERRY-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment ferry-filter -j FERRY-FILTER",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment ferry-filter -j FERRY-FILTER",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment ferry-filter -j FERRY-FILTER",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment ferry-forward -j FERRY-FORWARD",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn reject(self) -> &'static str {
        match self {
            Family::V4 => "REJECT --reject-with icmp-port-unreachable",
            Family::V6 => "REJECT --reject-with icmp6-port-unreachable",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// FNV-1a 64, base32: stable chain-name suffixes (13 chars, so chain names
/// stay under iptables' 28-character limit).
fn hash_suffix(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(13);
    for i in 0..13 {
        let idx = ((h >> (i * 5)) & 31) as usize;
        out.push(char::from(ALPHABET[idx]));
    }
    out
}

pub fn svc_chain(name: &ServicePortName) -> String {
    format!("FERRY-SVC-{}", hash_suffix(&name.to_string()))
}

pub fn svl_chain(name: &ServicePortName) -> String {
    format!("FERRY-SVL-{}", hash_suffix(&name.to_string()))
}

pub fn ext_chain(name: &ServicePortName) -> String {
    format!("FERRY-EXT-{}", hash_suffix(&name.to_string()))
}

/// Name of the `recent` list pinning clients to one endpoint (affinity).
pub fn affinity_list(name: &ServicePortName, b: &Backend) -> String {
    format!("FERRY-AFF-{}", hash_suffix(&format!("{name}@{}:{}", b.ip, b.port)))
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn host(ip: IpAddr, family: Family) -> String {
    format!("{ip}/{}", family.host_len())
}

fn dnat_target(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The chains of one service port, in the order they are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceChains {
    pub chains: Vec<(String, Vec<String>)>,
}

impl ServiceChains {
    pub fn names(&self) -> BTreeSet<String> {
        self.chains.iter().map(|(n, _)| n.clone()).collect()
    }
}

fn family_backends(bs: &[Backend], family: Family) -> Vec<&Backend> {
    bs.iter().filter(|b| Family::of(b.ip) == family).collect()
}

fn has_frontends(e: &ServiceEntry, family: Family) -> bool {
    e.frontends.iter().any(|f| Family::of(f.ip) == family)
}

/// Endpoint choice: DNAT straight from the service chain (no per-endpoint
/// chain), a `statistic` rule per endpoint with probability 1/(n-i) so that
/// every endpoint gets 1/n. With ClientIP affinity, `recent` lists (one per
/// endpoint, named like the endpoint) pin a client first.
fn balance_rules(e: &ServiceEntry, backends: &[&Backend], rules: &mut Vec<String>) {
    let p = proto(e.protocol);
    if let Some(timeout) = e.affinity_timeout {
        for b in backends {
            rules.push(format!(
                "-m recent --name {} --mask {} --rcheck --seconds {timeout} --reap -p {p} -j DNAT --to-destination {}",
                affinity_list(&e.name, b),
                mask(b.ip),
                dnat_target(b.ip, b.port)
            ));
        }
    }
    let n = backends.len();
    for (i, b) in backends.iter().enumerate() {
        let statistic = if i + 1 < n {
            format!("-m statistic --mode random --probability {:.10} ", 1.0 / (n - i) as f64)
        } else {
            String::new()
        };
        let recent = if e.affinity_timeout.is_some() {
            format!(
                "-m recent --name {} --mask {} --set ",
                affinity_list(&e.name, b),
                mask(b.ip)
            )
        } else {
            String::new()
        };
        rules.push(format!(
            "{statistic}{recent}-p {p} -j DNAT --to-destination {}",
            dnat_target(b.ip, b.port)
        ));
    }
}

fn mask(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "255.255.255.255"
    } else {
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    }
}

/// The per-service chains (SVC, SVL, EXT) for one family.
pub fn service_chains(e: &ServiceEntry, family: Family, cluster_cidrs: &[IpNet]) -> ServiceChains {
    let mut out = ServiceChains::default();
    if !has_frontends(e, family) {
        return out;
    }
    let all = family_backends(&e.backends, family);
    let local = family_backends(&e.local_backends, family);
    let has_external = e
        .frontends
        .iter()
        .any(|f| f.kind.is_external() && Family::of(f.ip) == family);
    let cidrs: Vec<&IpNet> = cluster_cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .collect();
    let needs_svl = (e.internal_local || (e.external_local && has_external)) && !local.is_empty();

    if !all.is_empty() {
        let mut rules = Vec::new();
        if !cidrs.is_empty() {
            // One pod CIDR (the usual case): mark inline. A jump costs
            // iptables-nft-restore --noflush far more than a MARK target.
            match cidrs.as_slice() {
                [one] => rules.push(format!("! -s {one} -j MARK --or-mark 0x4000")),
                _ => rules.push(format!("-j {MASQ_OUTSIDE}")),
            }
        }
        let chain = svc_chain(&e.name);
        balance_rules(e, &all, &mut rules);
        out.chains.push((chain, rules));
    }
    if needs_svl {
        let mut rules = Vec::new();
        balance_rules(e, &local, &mut rules);
        out.chains.push((svl_chain(&e.name), rules));
    }
    if has_external && e.empty_action(FrontendKind::NodePort).is_none() {
        let mut rules = Vec::new();
        if e.frontends
            .iter()
            .any(|f| f.ip.is_loopback() && Family::of(f.ip) == family)
        {
            // Localhost NodePorts: a 127/8 source cannot be replied to from a pod.
            rules.push(format!("-s {} -j {MARK_MASQ}", family.loopback()));
        }
        if e.masquerade_external() {
            rules.push(format!("-j {MARK_MASQ}"));
            rules.push(format!("-j {}", svc_chain(&e.name)));
        } else {
            // Pods and the node itself may use every endpoint: their
            // source needs no preserving (kube-proxy's short-circuit).
            if !all.is_empty() {
                for c in &cidrs {
                    rules.push(format!("-s {c} -j {}", svc_chain(&e.name)));
                }
                rules.push(format!("-m addrtype --src-type LOCAL -j {MARK_MASQ}"));
                rules.push(format!("-m addrtype --src-type LOCAL -j {}", svc_chain(&e.name)));
            }
            rules.push(format!("-j {}", svl_chain(&e.name)));
        }
        out.chains.push((ext_chain(&e.name), rules));
    }
    out
}

/// Rules in the dispatch chains (`FERRY-SERVICES`, `FERRY-NODEPORTS`,
/// `FERRY-FILTER`) for one service port.
fn dispatch_rules(
    e: &ServiceEntry,
    family: Family,
    services: &mut Vec<String>,
    nodeports: &mut Vec<String>,
    filter: &mut Vec<String>,
) {
    let p = proto(e.protocol);
    for f in e.frontends.iter().filter(|f| Family::of(f.ip) == family) {
        let comment = format!("\"{} {}\"", e.name, f.kind.as_str());
        let matcher = format!("-d {} -p {p} -m {p} --dport {}", host(f.ip, family), f.port);
        match e.empty_action(f.kind) {
            Some(action) => {
                let target = match action {
                    // A TCP reset is immediate; ICMP errors are rate-limited
                    // per destination by the kernel and may never be sent.
                    EmptyAction::Reject if e.protocol == Protocol::Tcp => "REJECT --reject-with tcp-reset",
                    EmptyAction::Reject => family.reject(),
                    EmptyAction::Drop => "DROP",
                };
                let no = match action {
                    EmptyAction::Reject => "has no endpoints",
                    EmptyAction::Drop => "has no local endpoints",
                };
                filter.push(format!(
                    "-m comment --comment \"{} {} {no}\" {matcher} -j {target}",
                    e.name,
                    f.kind.as_str()
                ));
            }
            None => {
                let target = match f.kind {
                    FrontendKind::ClusterIp if e.internal_local => svl_chain(&e.name),
                    FrontendKind::ClusterIp => svc_chain(&e.name),
                    _ => ext_chain(&e.name),
                };
                let rule = format!("-m comment --comment {comment} {matcher} -j {target}");
                if f.kind == FrontendKind::NodePort {
                    nodeports.push(rule);
                } else {
                    services.push(rule);
                }
            }
        }
    }
}

/// A complete rule set for one family, split the way the apply step needs it.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    /// Fixed nat chains with their rules (SERVICES, NODEPORTS, POSTROUTING, ...).
    pub nat_fixed: Vec<(String, Vec<String>)>,
    pub filter_fixed: Vec<(String, Vec<String>)>,
    /// Per-service nat chains.
    pub services: BTreeMap<ServicePortName, ServiceChains>,
}

impl Rendered {
    pub fn rule_count(&self) -> usize {
        let fixed: usize = self
            .nat_fixed
            .iter()
            .chain(self.filter_fixed.iter())
            .map(|(_, r)| r.len())
            .sum();
        let svc: usize = self
            .services
            .values()
            .flat_map(|s| s.chains.iter())
            .map(|(_, r)| r.len())
            .sum();
        fixed + svc
    }

    /// All nat chain names this rule set defines.
    pub fn nat_chain_names(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.nat_fixed.iter().map(|(n, _)| n.clone()).collect();
        for s in self.services.values() {
            out.extend(s.names());
        }
        out
    }
}

pub fn render(table: &ServiceTable, family: Family) -> Rendered {
    let cidrs: Vec<IpNet> = table
        .cluster_cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .copied()
        .collect();
    let mut services = Vec::new();
    let mut nodeports = Vec::new();
    let mut filter = Vec::new();
    let mut per_service = BTreeMap::new();
    let mut hairpin_ips: BTreeSet<IpAddr> = BTreeSet::new();
    for e in table.services.values() {
        hairpin_ips.extend(
            e.backends
                .iter()
                .chain(e.local_backends.iter())
                .filter(|b| b.hairpin && Family::of(b.ip) == family)
                .map(|b| b.ip),
        );
        dispatch_rules(e, family, &mut services, &mut nodeports, &mut filter);
        let chains = service_chains(e, family, &table.cluster_cidrs);
        if !chains.chains.is_empty() {
            per_service.insert(e.name.clone(), chains);
        }
    }
    services.push(format!(
        "-m comment --comment \"ferry service nodeports; must be last\" -m addrtype --dst-type LOCAL -j {NODEPORTS}"
    ));
    let mut masq_outside = Vec::new();
    for c in &cidrs {
        masq_outside.push(format!("-s {c} -j RETURN"));
    }
    masq_outside.push(format!("-j {MARK_MASQ}"));
    let nat_fixed = vec![
        (CANARY.to_string(), vec!["-j RETURN".to_string()]),
        (SERVICES.to_string(), services),
        (NODEPORTS.to_string(), nodeports),
        (MARK_MASQ.to_string(), vec!["-j MARK --or-mark 0x4000".to_string()]),
        (MASQ_OUTSIDE.to_string(), masq_outside),
        (
            HAIRPIN.to_string(),
            hairpin_ips
                .iter()
                .map(|ip| format!("-s {} -d {} -j MASQUERADE", host(*ip, family), host(*ip, family)))
                .collect(),
        ),
        (
            POSTROUTING.to_string(),
            vec![
                format!("-j {HAIRPIN}"),
                format!("-m mark ! --mark {MASQ_MARK} -j RETURN"),
                "-j MARK --xor-mark 0x4000".to_string(),
                "-m comment --comment \"ferry service traffic requiring SNAT\" -j MASQUERADE --random-fully"
                    .to_string(),
            ],
        ),
    ];
    let filter_fixed = vec![
        (CANARY.to_string(), vec!["-j RETURN".to_string()]),
        (FILTER.to_string(), filter),
        (
            FORWARD.to_string(),
            vec![
                format!("-m mark --mark {MASQ_MARK} -j ACCEPT"),
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
            ],
        ),
    ];
    Rendered {
        nat_fixed,
        filter_fixed,
        services: per_service,
    }
}

fn write_chain_decl(out: &mut String, name: &str) {
    let _ = writeln!(out, ":{name} - [0:0]");
}

fn write_rules(out: &mut String, name: &str, rules: &[String]) {
    for r in rules {
        let _ = writeln!(out, "-A {name} {r}");
    }
}

/// iptables-restore input that rewrites every chain of ours and deletes
/// `stale` chains (ours, present in the kernel, no longer wanted).
pub fn restore_full(r: &Rendered, stale_nat: &BTreeSet<String>, stale_filter: &BTreeSet<String>) -> String {
    let mut out = String::new();
    out.push_str("*filter\n");
    for (n, _) in &r.filter_fixed {
        write_chain_decl(&mut out, n);
    }
    for n in stale_filter {
        write_chain_decl(&mut out, n);
    }
    for (n, rules) in &r.filter_fixed {
        write_rules(&mut out, n, rules);
    }
    for n in stale_filter {
        let _ = writeln!(out, "-X {n}");
    }
    out.push_str("COMMIT\n*nat\n");
    for (n, _) in &r.nat_fixed {
        write_chain_decl(&mut out, n);
    }
    for s in r.services.values() {
        for (n, _) in &s.chains {
            write_chain_decl(&mut out, n);
        }
    }
    for n in stale_nat {
        write_chain_decl(&mut out, n);
    }
    for (n, rules) in &r.nat_fixed {
        write_rules(&mut out, n, rules);
    }
    for s in r.services.values() {
        for (n, rules) in &s.chains {
            write_rules(&mut out, n, rules);
        }
    }
    for n in stale_nat {
        let _ = writeln!(out, "-X {n}");
    }
    out.push_str("COMMIT\n");
    out
}

/// iptables-restore input for a partial sync from `prev` to `next`: the
/// dispatch chains are rewritten (they are small per service), but of the
/// per-service chains only those of changed services are, and chains that
/// disappeared are deleted. Unchanged services' chains are not mentioned,
/// so `--noflush` leaves them (and their counters) alone.
pub fn restore_partial(prev: &Rendered, next: &Rendered) -> (String, usize, usize) {
    let mut out = String::new();
    out.push_str("*filter\n");
    let filter_updates = fixed_updates(&prev.filter_fixed, &next.filter_fixed);
    write_fixed_updates(&mut out, &filter_updates);
    out.push_str("COMMIT\n*nat\n");
    let mut written = Vec::new();
    for (name, chains) in &next.services {
        if prev.services.get(name) != Some(chains) {
            written.push(chains);
        }
    }
    let next_names = next.nat_chain_names();
    let mut stale = BTreeSet::new();
    let mut removed = 0;
    for (name, chains) in &prev.services {
        if !next.services.contains_key(name) {
            removed += 1;
        }
        for n in chains.names() {
            if !next_names.contains(&n) {
                stale.insert(n);
            }
        }
    }
    // New and rewritten service chains first, so dispatch rules can jump to them.
    for s in &written {
        for (n, _) in &s.chains {
            write_chain_decl(&mut out, n);
        }
    }
    for n in &stale {
        write_chain_decl(&mut out, n);
    }
    for s in &written {
        for (n, rules) in &s.chains {
            write_rules(&mut out, n, rules);
        }
    }
    let nat_updates = fixed_updates(&prev.nat_fixed, &next.nat_fixed);
    write_fixed_updates(&mut out, &nat_updates);
    for n in &stale {
        let _ = writeln!(out, "-X {n}");
    }
    out.push_str("COMMIT\n");
    (out, written.len(), removed)
}

/// How a fixed chain changes in a partial sync.
enum FixedUpdate<'a> {
    /// Small or order-sensitive: flush and rewrite.
    Rewrite(&'a str, &'a [String]),
    /// Large and order-insensitive (one rule per frontend): delete the
    /// rules that went away, add the new ones. `front` inserts at the top
    /// (FERRY-SERVICES must keep its NodePort jump last).
    Edit {
        chain: &'a str,
        delete: Vec<&'a String>,
        add: Vec<&'a String>,
        front: bool,
    },
}

fn fixed_updates<'a>(prev: &'a [(String, Vec<String>)], next: &'a [(String, Vec<String>)]) -> Vec<FixedUpdate<'a>> {
    let mut out = Vec::new();
    for (name, rules) in next {
        let old = prev.iter().find(|(n, _)| n == name).map(|(_, r)| r);
        if old == Some(rules) {
            continue;
        }
        let editable = [SERVICES, NODEPORTS, FILTER, HAIRPIN].contains(&name.as_str());
        match old {
            Some(old) if editable => {
                let old_set: BTreeSet<&String> = old.iter().collect();
                let new_set: BTreeSet<&String> = rules.iter().collect();
                // Duplicate rules would make -D ambiguous; rewrite then.
                if old_set.len() != old.len() || new_set.len() != rules.len() {
                    out.push(FixedUpdate::Rewrite(name, rules));
                    continue;
                }
                out.push(FixedUpdate::Edit {
                    chain: name,
                    delete: old_set.difference(&new_set).copied().collect(),
                    add: new_set.difference(&old_set).copied().collect(),
                    front: name == SERVICES,
                });
            }
            _ => out.push(FixedUpdate::Rewrite(name, rules)),
        }
    }
    out
}

fn write_fixed_updates(out: &mut String, updates: &[FixedUpdate<'_>]) {
    for u in updates {
        if let FixedUpdate::Rewrite(name, _) = u {
            write_chain_decl(out, name);
        }
    }
    for u in updates {
        match u {
            FixedUpdate::Rewrite(name, rules) => write_rules(out, name, rules),
            FixedUpdate::Edit {
                chain,
                delete,
                add,
                front,
            } => {
                for r in delete {
                    let _ = writeln!(out, "-D {chain} {r}");
                }
                for r in add {
                    if *front {
                        let _ = writeln!(out, "-I {chain} 1 {r}");
                    } else {
                        let _ = writeln!(out, "-A {chain} {r}");
                    }
                }
            }
        }
    }
}

/// The whole rule set as one iptables-restore text (what `render --what
/// iptables` prints and the golden files hold).
pub fn render_text(table: &ServiceTable, family: Family) -> String {
    restore_full(&render(table, family), &BTreeSet::new(), &BTreeSet::new())
}
