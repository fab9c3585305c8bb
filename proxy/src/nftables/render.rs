//! Pure rendering of a `ServiceTable` into ferry's own nftables table
//! (`table ip ferry`, `table ip6 ferry`): no I/O, no root. The result is a
//! list of typed commands ([`Cmd`]) that has two printers: `nft -f`
//! syntax (what `ferry render` prints and the golden file holds) and
//! netlink messages (`super::netlink`, what the dataplane sends).
//!
//! The layout is built for few objects and lookups instead of rule lists,
//! and avoids the kernel's slow paths (an anonymous set per rule, or one
//! map bound by thousands of rules, both cost O(n²) at commit):
//!
//! - base chains `nat-prerouting` / `nat-output` do one lookup,
//!   `ip daddr . meta l4proto . th dport vmap @services`, whose elements
//!   (one per frontend: ClusterIP, NodePort on a node IP, externalIP, LB IP)
//!   jump to the service port's chain;
//! - `svc-*` (cluster-wide endpoints) jumps to `mark-outside` (marks for
//!   masquerade traffic from outside the pod CIDRs) and DNATs with one rule:
//!   `dnat ip to numgen random mod N offset K map @be-tcp-B`, where the
//!   shared backend maps (256 a protocol, `be-tcp-0`..`be-tcp-255`) hold `K + i : ip . port` for
//!   every service (bucket B and offset K come from a hash of the service
//!   port's name); `svl-*` does the same over node-local endpoints; `ext-*`
//!   decides masquerading and `externalTrafficPolicy: Local` for external
//!   frontends;
//! - ClientIP affinity (rare) uses kube-proxy's nftables layout: one dynamic
//!   set of client addresses per endpoint (`aff-*`, with the service's
//!   timeout) checked first, and one small chain per endpoint (`aep-*`)
//!   that records the client and DNATs, picked by cascading
//!   `numgen random mod K 0` rules (1/N, 1/(N-1), ... as iptables does);
//! - filter base chains (input, forward, output) look new connections up in
//!   `@no-endpoints`, whose elements reject (TCP reset / ICMP port
//!   unreachable) or drop (Local policy without a local endpoint);
//! - `nat-postrouting` masquerades hairpin traffic (`@hairpin`, source =
//!   destination = an endpoint that may be local) and packets marked 0x4000.
//!
//! Scripts: `script_full` replaces the whole table in one transaction
//! (`add table; delete table; add table ...` on a fresh start; in place,
//! keeping affinity sets, when the previous state is known). A partial sync
//! is `Rendered::update`: it re-renders only the service ports whose
//! entries changed, in place, and writes their chains and backend elements
//! and the frontend elements that differ; `script_partial` computes the
//! same transaction by comparing two whole renderings (the reference the
//! tests hold `update` to).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

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
/// The chain that marks traffic from outside the cluster CIDRs.
pub const MARK_OUTSIDE: &str = "mark-outside";
/// The chain whose dispatch rule the canary check looks for.
pub const CANARY_CHAIN: &str = "nat-prerouting";
/// Number of shared backend maps a protocol (`be-tcp-0` ..).
pub const BACKEND_MAPS: u64 = 256;
/// Endpoints one service port can address in its backend map slot.
pub const MAX_ENDPOINTS: usize = 1 << 16;
/// The masquerade mark bit (kube-proxy's).
pub const MASQ_MARK: u32 = 0x4000;

pub fn fam(family: Family) -> &'static str {
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

fn named_table(family: Family, table: &str) -> String {
    format!("{} {table}", fam(family))
}

/// FNV-1a 64.
fn hash64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 in base32: stable, short chain and set names.
fn hash_suffix(text: &str) -> String {
    let h = hash64(text);
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

pub fn backend_map(proto: Protocol, bucket: u64) -> String {
    format!("be-{}-{bucket}", proto_name(proto))
}

fn endpoint_suffix(name: &ServicePortName, b: &Backend, timeout: u32) -> String {
    hash_suffix(&format!("{name}@{}:{}/{timeout}", b.ip, b.port))
}

pub fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// IANA protocol number.
pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// A verdict that ends a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Jump(String),
    Goto(String),
    Return,
    Drop,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Return => f.write_str("return"),
            Verdict::Drop => f.write_str("drop"),
        }
    }
}

/// One rule of ferry's table, in the few shapes the layout uses. `text`
/// prints nft syntax; `super::netlink` encodes the same expressions nft
/// would (a test loads both ways and compares the kernel's listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `meta l4proto tcp reject with tcp reset`
    RejectTcpReset,
    /// `reject` (ICMP / ICMPv6 port unreachable)
    Reject,
    /// `[ct state new] ip daddr . meta l4proto . th dport vmap @MAP`
    Dispatch { map: &'static str, ct_new: bool },
    /// `ip saddr . ip daddr @hairpin masquerade`
    HairpinMasquerade,
    /// `meta mark & 0x4000 == 0 return`
    ReturnUnmarked,
    /// `meta mark set meta mark ^ 0x4000`
    ClearMark,
    /// `masquerade fully-random`
    MasqueradeFullyRandom,
    /// `[ip saddr NET] [fib saddr type local] [meta mark set meta mark | 0x4000] [VERDICT]`
    Step {
        saddr: Option<IpNet>,
        fib_local: bool,
        mark: bool,
        verdict: Option<Verdict>,
    },
    /// `ip saddr @SET goto CHAIN`: a client with affinity.
    AffinityHit { set: String, chain: String },
    /// `numgen random mod N 0 goto CHAIN` (just `goto CHAIN` for N = 1).
    Pick { n: u32, chain: String },
    /// `[update @SET { ip saddr }] meta l4proto P dnat to ADDR:PORT`
    Dnat {
        update: Option<String>,
        proto: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// `meta l4proto P dnat ip to numgen random mod N offset K map @MAP`
    DnatMap {
        proto: Protocol,
        n: u32,
        offset: u32,
        map: String,
    },
    /// `ip daddr ADDR meta l4proto P th dport PORT notrack`, or with
    /// `reply` `ip saddr ADDR ... th sport PORT notrack`.
    Notrack {
        addr: IpAddr,
        proto: Protocol,
        port: u16,
        reply: bool,
    },
}

impl Rule {
    fn step(saddr: Option<IpNet>, fib_local: bool, mark: bool, verdict: Option<Verdict>) -> Rule {
        Rule::Step {
            saddr,
            fib_local,
            mark,
            verdict,
        }
    }

    pub fn text(&self, family: Family) -> String {
        let f = fam(family);
        match self {
            Rule::RejectTcpReset => "meta l4proto tcp reject with tcp reset".into(),
            Rule::Reject => "reject".into(),
            Rule::Dispatch { map, ct_new } => format!(
                "{}{f} daddr . meta l4proto . th dport vmap @{map}",
                if *ct_new { "ct state new " } else { "" }
            ),
            Rule::HairpinMasquerade => format!("{f} saddr . {f} daddr @{HAIRPIN} masquerade"),
            Rule::ReturnUnmarked => format!("meta mark & {MASQ_MARK:#x} == 0 return"),
            Rule::ClearMark => format!("meta mark set meta mark ^ {MASQ_MARK:#x}"),
            Rule::MasqueradeFullyRandom => "masquerade fully-random".into(),
            Rule::Step {
                saddr,
                fib_local,
                mark,
                verdict,
            } => {
                let mut parts = Vec::new();
                if let Some(net) = saddr {
                    parts.push(format!("{f} saddr {net}"));
                }
                if *fib_local {
                    parts.push("fib saddr type local".into());
                }
                if *mark {
                    parts.push(format!("meta mark set meta mark | {MASQ_MARK:#x}"));
                }
                if let Some(v) = verdict {
                    parts.push(v.to_string());
                }
                parts.join(" ")
            }
            Rule::AffinityHit { set, chain } => format!("{f} saddr @{set} goto {chain}"),
            Rule::Pick { n: 1, chain } => format!("goto {chain}"),
            Rule::Pick { n, chain } => format!("numgen random mod {n} 0 goto {chain}"),
            Rule::Dnat {
                update,
                proto,
                addr,
                port,
            } => {
                let up = update
                    .as_ref()
                    .map(|s| format!("update @{s} {{ {f} saddr }} "))
                    .unwrap_or_default();
                format!(
                    "{up}meta l4proto {} dnat to {}",
                    proto_name(*proto),
                    endpoint(*addr, *port)
                )
            }
            Rule::DnatMap { proto, n, offset, map } => format!(
                "meta l4proto {} dnat {f} to numgen random mod {n} offset {offset} map @{map}",
                proto_name(*proto)
            ),
            Rule::Notrack {
                addr,
                proto,
                port,
                reply,
            } => {
                let (a, p) = if *reply { ("saddr", "sport") } else { ("daddr", "dport") };
                format!(
                    "{f} {a} {addr} meta l4proto {} th {p} {port} notrack",
                    proto_name(*proto)
                )
            }
        }
    }
}

/// What a set or map holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    /// `addr . inet_proto . inet_service : verdict`
    Frontends,
    /// `addr . addr`
    Hairpin,
    /// `typeof numgen random mod 2 : ip daddr . tcp dport` (one map per
    /// protocol: nft refuses a `th dport` typeof that rules later reuse)
    Backends(Protocol),
    /// `addr`, dynamic, with a timeout in seconds.
    Affinity(u32),
}

/// A base chain's hook: (type, hook, priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub nat: bool,
    /// netfilter hook number (NF_INET_*).
    pub hook: u32,
    pub priority: i32,
}

impl Base {
    fn text(&self) -> String {
        let hook = ["prerouting", "input", "forward", "output", "postrouting"][self.hook as usize];
        let prio = match (self.nat, self.priority) {
            (true, -100) if self.hook == 0 => "dstnat".to_string(),
            (true, 100) => "srcnat".to_string(),
            (false, -300) => "raw".to_string(),
            (false, p) if p < 0 => format!("filter - {}", -p),
            (_, p) => p.to_string(),
        };
        format!(
            "type {} hook {hook} priority {prio}; policy accept;",
            if self.nat { "nat" } else { "filter" }
        )
    }
}

/// A map or set element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elem {
    /// `ip . proto . port : verdict` (the verdict is ignored when deleting).
    Frontend { key: FrontendKey, verdict: Verdict },
    /// `ip . ip`
    Hairpin(IpAddr),
    /// `key : ip . port`
    Backend { key: u32, addr: IpAddr, port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub proto: Protocol,
    pub port: u16,
}

impl Elem {
    fn text(&self, with_data: bool) -> String {
        match self {
            Elem::Frontend { key, verdict } if with_data => {
                format!("{} . {} . {} : {verdict}", key.ip, proto_name(key.proto), key.port)
            }
            Elem::Frontend { key, .. } => format!("{} . {} . {}", key.ip, proto_name(key.proto), key.port),
            Elem::Hairpin(ip) => format!("{ip} . {ip}"),
            Elem::Backend { key, addr, port } if with_data => format!("{key} : {addr} . {port}"),
            Elem::Backend { key, .. } => key.to_string(),
        }
    }
}

/// One command of a transaction on ferry's table of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    AddTable,
    DeleteTable,
    /// Removes every rule (sets and their elements stay).
    FlushTable,
    AddSet(String, SetKind),
    /// (name, is a map)
    FlushSet(String, bool),
    /// (name, is a map)
    DeleteSet(String, bool),
    AddChain(String, Option<Base>),
    FlushChain(String),
    DeleteChain(String),
    AddRule(String, Rule),
    AddElements(String, Vec<Elem>),
    DeleteElements(String, Vec<Elem>),
}

impl Cmd {
    pub fn text(&self, family: Family, table: &str) -> String {
        let t = named_table(family, table);
        let a = addr_type(family);
        let f = fam(family);
        let elems = |v: &[Elem], data: bool| v.iter().map(|e| e.text(data)).collect::<Vec<_>>().join(", ");
        match self {
            Cmd::AddTable => format!("add table {t}"),
            Cmd::DeleteTable => format!("delete table {t}"),
            Cmd::FlushTable => format!("flush table {t}"),
            Cmd::AddSet(n, SetKind::Frontends) => {
                format!("add map {t} {n} {{ type {a} . inet_proto . inet_service : verdict; }}")
            }
            Cmd::AddSet(n, SetKind::Hairpin) => format!("add set {t} {n} {{ type {a} . {a}; }}"),
            Cmd::AddSet(n, SetKind::Backends(p)) => format!(
                "add map {t} {n} {{ typeof numgen random mod 2 : {f} daddr . {} dport; }}",
                proto_name(*p)
            ),
            Cmd::AddSet(n, SetKind::Affinity(timeout)) => {
                format!("add set {t} {n} {{ type {a}; flags dynamic,timeout; timeout {timeout}s; }}")
            }
            Cmd::FlushSet(n, map) => format!("flush {} {t} {n}", if *map { "map" } else { "set" }),
            Cmd::DeleteSet(n, map) => format!("delete {} {t} {n}", if *map { "map" } else { "set" }),
            Cmd::AddChain(n, None) => format!("add chain {t} {n}"),
            Cmd::AddChain(n, Some(base)) => format!("add chain {t} {n} {{ {} }}", base.text()),
            Cmd::FlushChain(n) => format!("flush chain {t} {n}"),
            Cmd::DeleteChain(n) => format!("delete chain {t} {n}"),
            Cmd::AddRule(c, r) => format!("add rule {t} {c} {}", r.text(family)),
            Cmd::AddElements(n, v) => format!("add element {t} {n} {{ {} }}", elems(v, true)),
            Cmd::DeleteElements(n, v) => format!("delete element {t} {n} {{ {} }}", elems(v, false)),
        }
    }
}

/// A transaction: what `nft -f` would read, or one netlink batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub family: Family,
    /// `TABLE` (the Service proxy's), or another table of ferry's.
    pub table: &'static str,
    pub cmds: Vec<Cmd>,
}

impl Script {
    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// `nft -f` syntax, one command a line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.cmds {
            out.push_str(&c.text(self.family, self.table));
            out.push('\n');
        }
        out
    }
}

/// What one service port owns in the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceNft {
    /// Chains in the order they are written (referenced ones first).
    pub chains: Vec<(String, Vec<Rule>)>,
    /// Affinity sets: (name, timeout seconds).
    pub sets: Vec<(String, u32)>,
    /// Its elements in the shared backend maps: (map, protocol, elements).
    pub backends: Vec<(String, Protocol, Vec<Elem>)>,
    /// The backend map slots it holds: (bucket, slot).
    pub slots: Vec<(u64, u32)>,
    /// Its frontends: (map, key, verdict).
    pub frontends: Vec<(&'static str, FrontendKey, Verdict)>,
    /// Its endpoints that may be local (hairpin masquerade).
    pub hairpin: Vec<IpAddr>,
}

impl ServiceNft {
    fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.frontends.is_empty() && self.hairpin.is_empty()
    }
}

/// A complete rendering of one family.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub family: Family,
    /// Shared with the previous rendering where a service did not change.
    pub services: BTreeMap<ServicePortName, Arc<ServiceNft>>,
    /// (map, key) → verdict; the first service (by name) claiming a key wins.
    pub elements: BTreeMap<(&'static str, FrontendKey), Verdict>,
    pub hairpin: BTreeSet<IpAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    /// Every service claiming a frontend key, with its verdict.
    claimants: BTreeMap<(&'static str, FrontendKey), BTreeMap<ServicePortName, Verdict>>,
    /// How many services have each hairpin address as a local endpoint.
    hairpin_refs: BTreeMap<IpAddr, u32>,
    /// Backend map slots in use.
    taken: Slots,
}

impl Rendered {
    /// Rules plus map/set elements: what the kernel holds for us.
    pub fn object_count(&self) -> usize {
        let per_service: usize = self
            .services
            .values()
            .map(|s| {
                s.chains.iter().map(|(_, r)| r.len()).sum::<usize>()
                    + s.backends.iter().map(|(_, _, e)| e.len()).sum::<usize>()
            })
            .sum();
        let fixed: usize = fixed_chains(self.family, &self.cluster_cidrs)
            .iter()
            .map(|(_, _, r)| r.len())
            .sum();
        per_service + self.elements.len() + self.hairpin.len() + fixed
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

    fn backend_maps(&self) -> BTreeSet<(&str, Protocol)> {
        self.services
            .values()
            .flat_map(|s| s.backends.iter().map(|(m, p, _)| (m.as_str(), *p)))
            .collect()
    }
}

/// Slots handed out in the backend maps: (bucket, slot) pairs in use.
type Slots = BTreeSet<(u64, u32)>;

/// A stable place for a service port in the backend maps: bucket and
/// slot from a hash of its name, the next free slot on a collision
/// (services are rendered in name order, so this is deterministic).
fn slot_for(name: &ServicePortName, tag: &str, taken: &mut Slots) -> (String, u32, u64) {
    let h = hash64(&format!("{name}/{tag}"));
    let bucket = h % BACKEND_MAPS;
    let mut slot = ((h >> 32) & 0xffff) as u32;
    while !taken.insert((bucket, slot)) {
        slot = (slot + 1) & 0xffff;
    }
    (backend_map(name.protocol, bucket), slot, bucket)
}

/// Endpoint choice for `backends` (non-empty), appended to `rules`; the
/// affinity endpoint chains go to `extra`, their sets to `sets`, and the
/// backend map elements to `elems`.
struct Balance<'a> {
    extra: BTreeMap<String, Vec<Rule>>,
    sets: BTreeSet<(String, u32)>,
    elems: Vec<(String, Protocol, Vec<Elem>)>,
    slots: Vec<(u64, u32)>,
    taken: &'a mut Slots,
}

impl Balance<'_> {
    fn balance(&mut self, e: &ServiceEntry, backends: &[&Backend], tag: &str, rules: &mut Vec<Rule>) {
        if let Some(timeout) = e.affinity_timeout {
            let n = backends.len();
            for b in backends {
                let sfx = endpoint_suffix(&e.name, b, timeout);
                let (set, chain) = (format!("aff-{sfx}"), format!("aep-{sfx}"));
                rules.push(Rule::AffinityHit {
                    set: set.clone(),
                    chain: chain.clone(),
                });
                self.extra.insert(
                    chain,
                    vec![Rule::Dnat {
                        update: Some(set.clone()),
                        proto: e.protocol,
                        addr: b.ip,
                        port: b.port,
                    }],
                );
                self.sets.insert((set, timeout));
            }
            // 1/N, 1/(N-1), ..., 1: uniform, as iptables' statistic rules.
            for (i, b) in backends.iter().enumerate() {
                rules.push(Rule::Pick {
                    n: (n - i) as u32,
                    chain: format!("aep-{}", endpoint_suffix(&e.name, b, timeout)),
                });
            }
            return;
        }
        match backends {
            [one] => rules.push(Rule::Dnat {
                update: None,
                proto: e.protocol,
                addr: one.ip,
                port: one.port,
            }),
            _ => {
                // More than MAX_ENDPOINTS would not fit the slot; no real
                // service comes near (EndpointSlices hold 1,000 each).
                let used = &backends[..backends.len().min(MAX_ENDPOINTS)];
                let (map, slot, bucket) = slot_for(&e.name, tag, self.taken);
                self.slots.push((bucket, slot));
                let offset = slot << 16;
                let elems = used
                    .iter()
                    .enumerate()
                    .map(|(i, b)| Elem::Backend {
                        key: offset + i as u32,
                        addr: b.ip,
                        port: b.port,
                    })
                    .collect();
                rules.push(Rule::DnatMap {
                    proto: e.protocol,
                    n: used.len() as u32,
                    offset,
                    map: map.clone(),
                });
                self.elems.push((map, e.protocol, elems));
            }
        }
    }
}

/// The chains and sets of one service port in one family (same decisions
/// as the iptables renderer's `service_chains`).
fn service_nft(e: &ServiceEntry, family: Family, cluster_cidrs: &[IpNet], taken: &mut Slots) -> ServiceNft {
    let mut out = ServiceNft::default();
    if !e.frontends.iter().any(|f| Family::of(f.ip) == family) {
        return out;
    }
    let all: Vec<&Backend> = e.backends.iter().filter(|b| Family::of(b.ip) == family).collect();
    let local: Vec<&Backend> = e.local_backends.iter().filter(|b| Family::of(b.ip) == family).collect();
    let has_external = e
        .frontends
        .iter()
        .any(|fe| fe.kind.is_external() && Family::of(fe.ip) == family);
    let cidrs: Vec<IpNet> = cluster_cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .copied()
        .collect();
    let needs_svl = (e.internal_local || (e.external_local && has_external)) && !local.is_empty();
    let mut bal = Balance {
        extra: BTreeMap::new(),
        sets: BTreeSet::new(),
        elems: Vec::new(),
        slots: Vec::new(),
        taken,
    };
    let mut main = Vec::new();
    let svc = svc_chain(&e.name);
    if !all.is_empty() {
        let mut rules = Vec::new();
        if !cidrs.is_empty() {
            rules.push(Rule::step(None, false, false, Some(Verdict::Jump(MARK_OUTSIDE.into()))));
        }
        bal.balance(e, &all, "svc", &mut rules);
        main.push((svc.clone(), rules));
    }
    if needs_svl {
        let mut rules = Vec::new();
        bal.balance(e, &local, "svl", &mut rules);
        main.push((svl_chain(&e.name), rules));
    }
    if has_external && e.empty_action(FrontendKind::NodePort).is_none() {
        let mut rules = Vec::new();
        if e.frontends
            .iter()
            .any(|fe| fe.ip.is_loopback() && Family::of(fe.ip) == family)
        {
            // Localhost NodePorts: a 127/8 source cannot be replied to from a pod.
            let lo: IpNet = match family {
                Family::V4 => IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 8).unwrap_or_default()),
                Family::V6 => IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).unwrap_or_default()),
            };
            rules.push(Rule::step(Some(lo), false, true, None));
        }
        if e.masquerade_external() {
            rules.push(Rule::step(None, false, true, Some(Verdict::Goto(svc.clone()))));
        } else {
            // Pods and the node itself may use every endpoint: their source
            // needs no preserving (kube-proxy's short-circuit).
            if !all.is_empty() {
                for c in &cidrs {
                    rules.push(Rule::step(Some(*c), false, false, Some(Verdict::Goto(svc.clone()))));
                }
                rules.push(Rule::step(None, true, true, Some(Verdict::Goto(svc.clone()))));
            }
            rules.push(Rule::step(None, false, false, Some(Verdict::Goto(svl_chain(&e.name)))));
        }
        main.push((ext_chain(&e.name), rules));
    }
    // Endpoint chains first: the service chains refer to them.
    out.chains.extend(bal.extra);
    out.chains.extend(main);
    out.sets.extend(bal.sets);
    out.backends = bal.elems;
    out.slots = bal.slots;
    out
}

/// The frontend map elements of one service port: (map, key, verdict).
fn service_elements(e: &ServiceEntry, family: Family) -> Vec<(&'static str, FrontendKey, Verdict)> {
    let mut out = Vec::new();
    for fe in e.frontends.iter().filter(|fe| Family::of(fe.ip) == family) {
        let key = FrontendKey {
            ip: fe.ip,
            proto: e.protocol,
            port: fe.port,
        };
        match e.empty_action(fe.kind) {
            Some(EmptyAction::Reject) => out.push((NO_ENDPOINTS, key, Verdict::Goto("do-reject".into()))),
            Some(EmptyAction::Drop) => out.push((NO_ENDPOINTS, key, Verdict::Drop)),
            None => {
                let chain = match fe.kind {
                    FrontendKind::ClusterIp if e.internal_local => svl_chain(&e.name),
                    FrontendKind::ClusterIp => svc_chain(&e.name),
                    _ => ext_chain(&e.name),
                };
                out.push((SERVICES, key, Verdict::Goto(chain)));
            }
        }
    }
    out
}

/// Renders `table` from scratch (a partial sync uses `Rendered::update`).
pub fn render(table: &ServiceTable, family: Family) -> Rendered {
    let mut r = Rendered {
        family,
        services: BTreeMap::new(),
        elements: BTreeMap::new(),
        hairpin: BTreeSet::new(),
        cluster_cidrs: table
            .cluster_cidrs
            .iter()
            .filter(|c| Family::of(c.addr()) == family)
            .copied()
            .collect(),
        claimants: BTreeMap::new(),
        hairpin_refs: BTreeMap::new(),
        taken: Slots::new(),
    };
    for e in table.services.values() {
        if let Some(s) = render_service(e, family, &table.cluster_cidrs, &mut r.taken) {
            r.claim(&e.name, &s);
            r.services.insert(e.name.clone(), s);
        }
    }
    r.elements = r
        .claimants
        .iter()
        .filter_map(|(k, c)| c.values().next().map(|v| (*k, v.clone())))
        .collect();
    r
}

fn render_service(e: &ServiceEntry, family: Family, cidrs: &[IpNet], taken: &mut Slots) -> Option<Arc<ServiceNft>> {
    let mut s = service_nft(e, family, cidrs, taken);
    s.frontends = service_elements(e, family);
    s.hairpin = e
        .backends
        .iter()
        .chain(e.local_backends.iter())
        .filter(|b| b.hairpin && Family::of(b.ip) == family)
        .map(|b| b.ip)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (!s.is_empty()).then(|| Arc::new(s))
}

/// What a partial transaction changes; `assemble` writes its commands.
#[derive(Default)]
struct Delta<'a> {
    elem_del: BTreeMap<&'static str, Vec<Elem>>,
    elem_add: BTreeMap<&'static str, Vec<Elem>>,
    hairpin_del: Vec<IpAddr>,
    hairpin_add: Vec<IpAddr>,
    gone: Vec<&'a ServiceNft>,
    written: Vec<&'a ServiceNft>,
}

impl Delta<'_> {
    /// Records a frontend key's element going from `before` to `after`.
    fn element(&mut self, (map, key): (&'static str, FrontendKey), before: Option<&Verdict>, after: Option<&Verdict>) {
        if before == after {
            return;
        }
        if let Some(v) = before {
            self.elem_del.entry(map).or_default().push(Elem::Frontend {
                key,
                verdict: v.clone(),
            });
        }
        if let Some(v) = after {
            self.elem_add.entry(map).or_default().push(Elem::Frontend {
                key,
                verdict: v.clone(),
            });
        }
    }

    fn assemble(self) -> Vec<Cmd> {
        let mut cmds = Vec::new();
        // Frontend elements that go away or change their verdict are deleted first.
        for (map, elems) in self.elem_del {
            push_elements(&mut cmds, false, map, elems);
        }
        push_elements(
            &mut cmds,
            false,
            HAIRPIN,
            self.hairpin_del.into_iter().map(Elem::Hairpin).collect(),
        );
        for (map, elems) in backend_elems(self.gone.iter().copied()) {
            push_elements(&mut cmds, false, map, elems);
        }
        // Maps the written services use (adding an existing one is a no-op).
        let maps: BTreeSet<(&str, Protocol)> = self
            .written
            .iter()
            .flat_map(|s| s.backends.iter().map(|(m, p, _)| (m.as_str(), *p)))
            .collect();
        for (m, p) in maps {
            cmds.push(Cmd::AddSet(m.to_string(), SetKind::Backends(p)));
        }
        // Declare new chains and sets, empty changed and stale chains (so
        // that nothing refers to what is deleted below), then refill.
        for s in &self.written {
            for (set, timeout) in &s.sets {
                cmds.push(Cmd::AddSet(set.clone(), SetKind::Affinity(*timeout)));
            }
            for (c, _) in &s.chains {
                cmds.push(Cmd::AddChain(c.clone(), None));
            }
        }
        for s in &self.gone {
            for (c, _) in &s.chains {
                cmds.push(Cmd::FlushChain(c.clone()));
            }
        }
        for s in &self.written {
            for (c, rules) in &s.chains {
                for r in rules {
                    cmds.push(Cmd::AddRule(c.clone(), r.clone()));
                }
            }
        }
        for (map, elems) in self.elem_add {
            push_elements(&mut cmds, true, map, elems);
        }
        push_elements(
            &mut cmds,
            true,
            HAIRPIN,
            self.hairpin_add.into_iter().map(Elem::Hairpin).collect(),
        );
        for (map, elems) in backend_elems(self.written.iter().copied()) {
            push_elements(&mut cmds, true, map, elems);
        }
        // Chain and set names derive from the service port's own name, so
        // what a changed service no longer has is stale.
        let new_chains: BTreeSet<&str> = self
            .written
            .iter()
            .flat_map(|s| s.chains.iter().map(|(c, _)| c.as_str()))
            .collect();
        let new_sets: BTreeSet<&str> = self
            .written
            .iter()
            .flat_map(|s| s.sets.iter().map(|(n, _)| n.as_str()))
            .collect();
        let stale_chains: BTreeSet<&str> = self
            .gone
            .iter()
            .flat_map(|s| s.chains.iter().map(|(c, _)| c.as_str()))
            .filter(|c| !new_chains.contains(c))
            .collect();
        let stale_sets: BTreeSet<&str> = self
            .gone
            .iter()
            .flat_map(|s| s.sets.iter().map(|(n, _)| n.as_str()))
            .filter(|n| !new_sets.contains(n))
            .collect();
        cmds.extend(stale_chains.into_iter().map(|c| Cmd::DeleteChain(c.to_string())));
        cmds.extend(stale_sets.into_iter().map(|n| Cmd::DeleteSet(n.to_string(), false)));
        cmds
    }
}

impl Rendered {
    /// Adds `s`'s frontend claims and hairpin addresses.
    fn claim(&mut self, name: &ServicePortName, s: &ServiceNft) {
        for (map, key, verdict) in &s.frontends {
            self.claimants
                .entry((map, *key))
                .or_default()
                .insert(name.clone(), verdict.clone());
        }
        for ip in &s.hairpin {
            *self.hairpin_refs.entry(*ip).or_default() += 1;
            self.hairpin.insert(*ip);
        }
    }

    /// Removes what `claim` added.
    fn unclaim(&mut self, name: &ServicePortName, s: &ServiceNft) {
        for (map, key, _) in &s.frontends {
            if let Some(c) = self.claimants.get_mut(&(*map, *key)) {
                c.remove(name);
                if c.is_empty() {
                    self.claimants.remove(&(*map, *key));
                }
            }
        }
        for ip in &s.hairpin {
            if let Some(n) = self.hairpin_refs.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.hairpin_refs.remove(ip);
                    self.hairpin.remove(ip);
                }
            }
        }
    }

    /// Brings this rendering of `prev_table` up to `table`, re-rendering
    /// only the service ports whose entries differ, and returns the partial
    /// transaction with the service ports written and removed. `None` when
    /// the change needs a full rendering (the cluster CIDRs changed).
    pub fn update(&mut self, prev_table: &ServiceTable, table: &ServiceTable) -> Option<(Script, usize, usize)> {
        if prev_table.cluster_cidrs != table.cluster_cidrs {
            return None;
        }
        let family = self.family;
        let names = prev_table.differing_ports(table);
        let removed = names.iter().filter(|n| !table.services.contains_key(**n)).count();
        let mut changes = Vec::new();
        for n in names {
            let old = self.services.remove(n);
            if let Some(o) = &old {
                for slot in &o.slots {
                    self.taken.remove(slot);
                }
            }
            changes.push((n.clone(), old));
        }
        let mut renders = Vec::new();
        for (n, old) in changes {
            let new = table
                .services
                .get(&n)
                .and_then(|e| render_service(e, family, &table.cluster_cidrs, &mut self.taken));
            // An entry change that renders the same (say, a health check
            // port) keeps the old rendering.
            let new = match (&old, new) {
                (Some(o), Some(n)) if *o == n => Some(o.clone()),
                (_, n) => n,
            };
            renders.push((n, old, new));
        }
        let keys: BTreeSet<(&'static str, FrontendKey)> = renders
            .iter()
            .flat_map(|(_, o, n)| o.iter().chain(n.iter()))
            .flat_map(|s| s.frontends.iter().map(|(m, k, _)| (*m, *k)))
            .collect();
        let before: Vec<Option<Verdict>> = keys.iter().map(|k| self.elements.get(k).cloned()).collect();
        let ips: BTreeSet<IpAddr> = renders
            .iter()
            .flat_map(|(_, o, n)| o.iter().chain(n.iter()))
            .flat_map(|s| s.hairpin.iter().copied())
            .collect();
        let ips_before: Vec<bool> = ips.iter().map(|ip| self.hairpin.contains(ip)).collect();
        for (n, old, new) in &renders {
            if let Some(o) = old {
                self.unclaim(n, o);
            }
            if let Some(s) = new {
                self.claim(n, s);
                self.services.insert(n.clone(), s.clone());
            }
        }
        let mut d = Delta::default();
        for (k, b) in keys.into_iter().zip(before) {
            let after = self.claimants.get(&k).and_then(|c| c.values().next()).cloned();
            match &after {
                Some(v) => self.elements.insert(k, v.clone()),
                None => self.elements.remove(&k),
            };
            d.element(k, b.as_ref(), after.as_ref());
        }
        for (ip, was) in ips.into_iter().zip(ips_before) {
            match (was, self.hairpin.contains(&ip)) {
                (true, false) => d.hairpin_del.push(ip),
                (false, true) => d.hairpin_add.push(ip),
                _ => {}
            }
        }
        let mut written = 0;
        for (_, old, new) in &renders {
            if let (Some(o), Some(n)) = (old, new) {
                if Arc::ptr_eq(o, n) {
                    continue;
                }
            }
            d.gone.extend(old.as_deref());
            d.written.extend(new.as_deref());
            written += usize::from(new.is_some());
        }
        let cmds = d.assemble();
        Some((
            Script {
                family,
                table: TABLE,
                cmds,
            },
            written,
            removed,
        ))
    }
}

const fn hook(nat: bool, hook: u32, priority: i32) -> Option<Base> {
    Some(Base { nat, hook, priority })
}

/// The fixed chains: (name, base hook, rules).
fn fixed_chains(family: Family, cidrs: &[IpNet]) -> Vec<(&'static str, Option<Base>, Vec<Rule>)> {
    let dispatch = Rule::Dispatch {
        map: SERVICES,
        ct_new: false,
    };
    let no_ep = Rule::Dispatch {
        map: NO_ENDPOINTS,
        ct_new: true,
    };
    let mut outside: Vec<Rule> = cidrs
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .map(|c| Rule::step(Some(*c), false, false, Some(Verdict::Return)))
        .collect();
    outside.push(Rule::step(None, false, true, None));
    vec![
        // ICMP errors are rate-limited per destination; a reset is not.
        ("do-reject", None, vec![Rule::RejectTcpReset, Rule::Reject]),
        (MARK_OUTSIDE, None, outside),
        ("nat-prerouting", hook(true, 0, -100), vec![dispatch.clone()]),
        ("nat-output", hook(true, 3, -100), vec![dispatch]),
        (
            "nat-postrouting",
            hook(true, 4, 100),
            vec![
                Rule::HairpinMasquerade,
                Rule::ReturnUnmarked,
                Rule::ClearMark,
                Rule::MasqueradeFullyRandom,
            ],
        ),
        ("filter-input", hook(false, 1, -10), vec![no_ep.clone()]),
        ("filter-forward", hook(false, 2, -10), vec![no_ep.clone()]),
        ("filter-output", hook(false, 3, -10), vec![no_ep]),
    ]
}

/// Elements per `add element` command (and netlink message).
const ELEMENTS_PER_CMD: usize = 1024;

fn push_elements(cmds: &mut Vec<Cmd>, add: bool, set: &str, elems: Vec<Elem>) {
    let mut elems = elems.into_iter().peekable();
    while elems.peek().is_some() {
        let chunk: Vec<Elem> = elems.by_ref().take(ELEMENTS_PER_CMD).collect();
        cmds.push(if add {
            Cmd::AddElements(set.to_string(), chunk)
        } else {
            Cmd::DeleteElements(set.to_string(), chunk)
        });
    }
}

fn frontend_elems<'a>(r: &'a Rendered, map: &'static str) -> impl Iterator<Item = Elem> + 'a {
    r.elements
        .iter()
        .filter(move |((m, _), _)| *m == map)
        .map(|((_, key), verdict)| Elem::Frontend {
            key: *key,
            verdict: verdict.clone(),
        })
}

/// Backend map elements of `r`, grouped by map.
fn backend_elems<'a>(services: impl Iterator<Item = &'a ServiceNft>) -> BTreeMap<&'a str, Vec<Elem>> {
    let mut out: BTreeMap<&str, Vec<Elem>> = BTreeMap::new();
    for s in services {
        for (map, _, elems) in &s.backends {
            out.entry(map.as_str()).or_default().extend(elems.iter().cloned());
        }
    }
    out
}

/// One transaction that makes the table exactly `next`. Without `prev`
/// (first sync, or after a failure or a failed canary) the table is
/// deleted and recreated; with it, the table is rebuilt in place, so the
/// dynamic affinity sets keep their clients, and `prev`'s chains and sets
/// that `next` lacks are deleted.
pub fn script_full(next: &Rendered, prev: Option<&Rendered>) -> Script {
    let family = next.family;
    let mut cmds = vec![Cmd::AddTable];
    match prev {
        None => cmds.extend([Cmd::DeleteTable, Cmd::AddTable]),
        // Removes every rule; set and map elements stay.
        Some(_) => cmds.push(Cmd::FlushTable),
    }
    cmds.push(Cmd::AddSet(SERVICES.into(), SetKind::Frontends));
    cmds.push(Cmd::AddSet(NO_ENDPOINTS.into(), SetKind::Frontends));
    cmds.push(Cmd::AddSet(HAIRPIN.into(), SetKind::Hairpin));
    let maps = next.backend_maps();
    for (m, p) in &maps {
        cmds.push(Cmd::AddSet(m.to_string(), SetKind::Backends(*p)));
    }
    if let Some(prev) = prev {
        for m in [SERVICES, NO_ENDPOINTS] {
            cmds.push(Cmd::FlushSet(m.into(), true));
        }
        cmds.push(Cmd::FlushSet(HAIRPIN.into(), false));
        for (m, _) in prev.backend_maps() {
            cmds.push(Cmd::FlushSet(m.into(), true));
        }
    }
    let fixed = fixed_chains(family, &next.cluster_cidrs);
    for (name, base, _) in &fixed {
        cmds.push(Cmd::AddChain(name.to_string(), *base));
    }
    for (name, timeout) in next.set_names() {
        cmds.push(Cmd::AddSet(name.into(), SetKind::Affinity(timeout)));
    }
    for s in next.services.values() {
        for (name, _) in &s.chains {
            cmds.push(Cmd::AddChain(name.clone(), None));
        }
    }
    for (name, _, rules) in fixed {
        for r in rules {
            cmds.push(Cmd::AddRule(name.into(), r));
        }
    }
    for s in next.services.values() {
        for (name, rules) in &s.chains {
            for r in rules {
                cmds.push(Cmd::AddRule(name.clone(), r.clone()));
            }
        }
    }
    // Elements after the rules that bind their maps: the kernel checks a
    // map's existing elements on every new binding.
    for map in [SERVICES, NO_ENDPOINTS] {
        push_elements(&mut cmds, true, map, frontend_elems(next, map).collect());
    }
    push_elements(
        &mut cmds,
        true,
        HAIRPIN,
        next.hairpin.iter().map(|ip| Elem::Hairpin(*ip)).collect(),
    );
    for (map, elems) in backend_elems(next.services.values().map(|s| s.as_ref())) {
        push_elements(&mut cmds, true, map, elems);
    }
    if let Some(prev) = prev {
        let chains = next.chain_names();
        for n in prev.chain_names().difference(&chains) {
            cmds.push(Cmd::DeleteChain(n.to_string()));
        }
        let sets = next.set_names();
        for (n, _) in prev.set_names().difference(&sets) {
            cmds.push(Cmd::DeleteSet(n.to_string(), false));
        }
        for (m, _) in prev.backend_maps().difference(&maps) {
            cmds.push(Cmd::DeleteSet(m.to_string(), true));
        }
    }
    Script {
        family,
        table: TABLE,
        cmds,
    }
}

/// One transaction from `prev` (what the kernel holds) to `next`, touching
/// only the chains and backend elements of service ports whose rendering
/// changed and the frontend elements that differ. Returns the script and
/// the service ports written and removed.
pub fn script_partial(prev: &Rendered, next: &Rendered) -> (Script, usize, usize) {
    let mut d = Delta::default();
    let keys: BTreeSet<&(&'static str, FrontendKey)> = prev.elements.keys().chain(next.elements.keys()).collect();
    for k in keys {
        d.element(*k, prev.elements.get(k), next.elements.get(k));
    }
    d.hairpin_del = prev.hairpin.difference(&next.hairpin).copied().collect();
    d.hairpin_add = next.hairpin.difference(&prev.hairpin).copied().collect();
    let changed = |name: &ServicePortName, s: &Arc<ServiceNft>, other: &Rendered| {
        other.services.get(name).is_none_or(|o| !Arc::ptr_eq(o, s) && o != s)
    };
    d.gone = prev
        .services
        .iter()
        .filter(|(n, s)| changed(n, s, next))
        .map(|(_, s)| s.as_ref())
        .collect();
    d.written = next
        .services
        .iter()
        .filter(|(n, s)| changed(n, s, prev))
        .map(|(_, s)| s.as_ref())
        .collect();
    let written = d.written.len();
    let removed = prev.services.keys().filter(|n| !next.services.contains_key(*n)).count();
    let cmds = d.assemble();
    (
        Script {
            table: TABLE,
            family: next.family,
            cmds,
        },
        written,
        removed,
    )
}

/// The whole table as one fresh-start script (what `render --what
/// nftables` prints and the golden file holds).
pub fn render_text(table: &ServiceTable, family: Family) -> String {
    script_full(&render(table, family), None).text()
}
