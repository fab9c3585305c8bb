//! The cluster zone: a pure index from lowercase owner names to records,
//! compiled from a `Snapshot` (no I/O, no tokio), and the lookup that decides
//! answer, NODATA or NXDOMAIN per the Kubernetes DNS-Based Service Discovery
//! specification.
//!
//! Why our own index and not hickory's in-memory authority: that authority
//! decides NXDOMAIN versus NODATA by scanning every name; here every name,
//! including the empty non-terminals (`<ns>.svc.<zone>`, `_tcp.<svc>…`), is a
//! key of one `HashMap`, so a lookup is O(1) in the size of the cluster.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ferry_cluster::{Service, ServiceType, Snapshot};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::error::DnsError;

/// The `dns-version` TXT the specification asks for.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// How `a-b-c-d.<ns>.pod.<zone>` names are answered (CoreDNS's `pods` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodMode {
    /// Any well-formed dashed IP in an existing namespace, without checking
    /// that such a pod exists (kubeadm's Corefile default).
    #[default]
    Insecure,
    /// Only IPs of pods that exist in that namespace.
    Verified,
    /// No pod records at all.
    Disabled,
}

impl FromStr for PodMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "insecure" => Ok(PodMode::Insecure),
            "verified" => Ok(PodMode::Verified),
            "disabled" => Ok(PodMode::Disabled),
            other => Err(format!("unknown pod mode {other:?} (insecure|verified|disabled)")),
        }
    }
}

impl fmt::Display for PodMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodMode::Insecure => "insecure",
            PodMode::Verified => "verified",
            PodMode::Disabled => "disabled",
        })
    }
}

/// What a zone is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local` (trailing dot optional).
    pub domain: String,
    /// TTL of every record, and the SOA minimum (negative-caching TTL).
    pub ttl: u32,
    pub pods: PodMode,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            domain: crate::DEFAULT_CLUSTER_DOMAIN.to_string(),
            ttl: 5,
            pods: PodMode::Insecure,
        }
    }
}

/// The result of looking a name up in the zone.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// NOERROR with records (authoritative).
    Answer {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// The name exists but has no record of the asked type: NOERROR, empty
    /// answer, SOA in authority.
    NoData,
    /// The name is under the zone and does not exist: NXDOMAIN with the SOA.
    NxDomain,
    /// Not ours to answer (outside the zone, or a reverse name we hold no
    /// PTR for): forward it.
    NotOurs,
}

/// A lookup key: the name's labels, ASCII-lowercased, joined with `.`,
/// without the root. A `.` or `\` inside a label is escaped so that no query
/// can alias a differently split name.
pub fn name_key(name: &Name) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            key.push(b'.');
        }
        for &b in label {
            if b == b'.' || b == b'\\' {
                key.push(b'\\');
            }
            key.push(b.to_ascii_lowercase());
        }
    }
    key
}

/// `true` when `key` is `suffix` or ends with `.suffix`.
pub fn key_is_under(key: &[u8], suffix: &[u8]) -> bool {
    key == suffix || (key.len() > suffix.len() && key.ends_with(suffix) && key[key.len() - suffix.len() - 1] == b'.')
}

#[derive(Debug, Default, Clone)]
struct Node {
    records: Vec<Record>,
}

/// The compiled cluster zone. Immutable once built; the server swaps a new
/// one in for each snapshot.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: Name,
    origin_key: Vec<u8>,
    pod_suffix: Vec<u8>,
    ttl: u32,
    pods: PodMode,
    soa: Record,
    nodes: HashMap<Box<[u8]>, Node>,
    /// Namespaces, for synthesized (insecure) pod records.
    namespaces: HashSet<Box<str>>,
    generation: u64,
    record_count: usize,
    /// Objects or fields skipped while building (already logged).
    skipped: usize,
}

const IN_ADDR: &[u8] = b"in-addr.arpa";
const IP6: &[u8] = b"ip6.arpa";

impl Zone {
    /// Compiles the zone for `snap`. Fails only on a bad configuration (an
    /// invalid domain); a bad object is logged, counted and skipped.
    pub fn build(snap: &Snapshot, cfg: &ZoneConfig) -> Result<Zone, DnsError> {
        let domain = cfg.domain.trim_end_matches('.').to_ascii_lowercase();
        let origin = Name::from_ascii(format!("{domain}.")).map_err(|e| DnsError::Domain {
            domain: cfg.domain.clone(),
            reason: e.to_string(),
        })?;
        if domain.is_empty() {
            return Err(DnsError::Domain {
                domain: cfg.domain.clone(),
                reason: "empty".into(),
            });
        }
        let soa = Record::from_rdata(
            origin.clone(),
            cfg.ttl,
            RData::SOA(SOA::new(
                child(&origin, "ns.dns")?,
                child(&origin, "hostmaster")?,
                // The generation changes with every snapshot, as a serial should.
                (snap.generation & u64::from(u32::MAX)) as u32,
                7200,
                1800,
                86400,
                cfg.ttl,
            )),
        );
        let mut b = Builder {
            zone: Zone {
                origin_key: name_key(&origin),
                pod_suffix: format!("pod.{domain}").into_bytes(),
                origin: origin.clone(),
                ttl: cfg.ttl,
                pods: cfg.pods,
                soa: soa.clone(),
                nodes: HashMap::new(),
                namespaces: HashSet::new(),
                generation: snap.generation,
                record_count: 0,
                skipped: 0,
            },
        };
        b.add(soa);
        b.add_record(
            &format!("dns-version.{domain}"),
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
        );
        b.ensure(&format!("svc.{domain}"));
        for ns in snap.namespaces() {
            b.ensure(&format!("{}.svc.{domain}", ns.name));
            if cfg.pods != PodMode::Disabled {
                b.ensure(&format!("{}.pod.{domain}", ns.name));
            }
            b.zone.namespaces.insert(ns.name.to_ascii_lowercase().into());
        }
        // A namespace that holds objects exists, whether or not the source
        // delivered its Namespace object.
        let object_namespaces = snap
            .services()
            .map(|s| s.key.namespace.clone())
            .chain(snap.pods().map(|p| p.key.namespace.clone()))
            .collect::<BTreeSet<_>>();
        for ns in object_namespaces {
            b.ensure(&format!("{ns}.svc.{domain}"));
            if cfg.pods != PodMode::Disabled {
                b.ensure(&format!("{ns}.pod.{domain}"));
            }
            b.zone.namespaces.insert(ns.to_ascii_lowercase().into());
        }
        for svc in snap.services() {
            b.service(snap, svc, &domain);
        }
        if cfg.pods == PodMode::Verified {
            for pod in snap.pods() {
                for ip in &pod.ips {
                    let name = format!("{}.{}.pod.{domain}", dashed(*ip), pod.key.namespace);
                    b.address(&name, *ip);
                }
            }
        }
        Ok(b.zone)
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The SOA for the authority section of NODATA and NXDOMAIN answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Names in the index (including empty non-terminals).
    pub fn name_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// Objects or fields skipped while building (each was logged).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// `true` when `key` (see `name_key`) is at or under the cluster domain.
    pub fn is_cluster_name(&self, key: &[u8]) -> bool {
        key_is_under(key, &self.origin_key)
    }

    /// Answers `qtype` for `qname`. Answer records owned by the queried name
    /// carry the query's spelling (so 0x20-randomizing resolvers accept them).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let key = name_key(qname);
        self.lookup_key(&key, qname, qtype)
    }

    /// `lookup` with the key already computed.
    pub fn lookup_key(&self, key: &[u8], qname: &Name, qtype: RecordType) -> Lookup {
        let ours = key_is_under(key, &self.origin_key);
        let reverse = key_is_under(key, IN_ADDR) || key_is_under(key, IP6);
        if !ours && !reverse {
            return Lookup::NotOurs;
        }
        let node = match self.nodes.get(key) {
            Some(n) => n,
            None if reverse => return Lookup::NotOurs,
            None => return self.synthesized_pod(key, qname, qtype),
        };
        let mut answers: Vec<Record> = Vec::new();
        let mut cname_target: Option<Name> = None;
        for r in &node.records {
            let t = r.record_type();
            if t == qtype || qtype == RecordType::ANY || (t == RecordType::CNAME && qtype != RecordType::CNAME) {
                let mut r = r.clone();
                r.name = qname.clone();
                if let RData::CNAME(c) = &r.data {
                    cname_target = Some(c.0.clone());
                }
                answers.push(r);
            }
        }
        if answers.is_empty() {
            return Lookup::NoData;
        }
        // ExternalName pointing into the zone: append the target's records,
        // following at most a few hops so a CNAME loop cannot spin.
        let mut hops = 0;
        while let (Some(target), true) = (cname_target.take(), qtype != RecordType::ANY) {
            hops += 1;
            let tkey = name_key(&target);
            if hops > 8 || !key_is_under(&tkey, &self.origin_key) {
                break;
            }
            if let Some(tnode) = self.nodes.get(tkey.as_slice()) {
                for r in &tnode.records {
                    let t = r.record_type();
                    if t == qtype || t == RecordType::CNAME {
                        if let RData::CNAME(c) = &r.data {
                            cname_target = Some(c.0.clone());
                        }
                        answers.push(r.clone());
                    }
                }
            }
        }
        let mut additionals = Vec::new();
        for r in &answers {
            if let RData::SRV(srv) = &r.data {
                if let Some(tnode) = self.nodes.get(name_key(&srv.target).as_slice()) {
                    additionals.extend(
                        tnode
                            .records
                            .iter()
                            .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
                            .cloned(),
                    );
                }
            }
        }
        Lookup::Answer { answers, additionals }
    }

    /// Insecure pod mode: `a-b-c-d.<ns>.pod.<zone>` for any existing namespace.
    fn synthesized_pod(&self, key: &[u8], qname: &Name, qtype: RecordType) -> Lookup {
        if self.pods != PodMode::Insecure || !key_is_under(key, &self.pod_suffix) || key.len() <= self.pod_suffix.len()
        {
            return Lookup::NxDomain;
        }
        let prefix = &key[..key.len() - self.pod_suffix.len() - 1];
        let mut parts = prefix.split(|&b| b == b'.');
        let (Some(ip_label), Some(ns), None) = (parts.next(), parts.next(), parts.next()) else {
            return Lookup::NxDomain;
        };
        let Ok(ns) = std::str::from_utf8(ns) else {
            return Lookup::NxDomain;
        };
        if !self.namespaces.contains(ns) {
            return Lookup::NxDomain;
        }
        let Some(ip) = undashed(ip_label) else {
            return Lookup::NxDomain;
        };
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        if rdata.record_type() != qtype && qtype != RecordType::ANY {
            return Lookup::NoData;
        }
        Lookup::Answer {
            answers: vec![Record::from_rdata(qname.clone(), self.ttl, rdata)],
            additionals: Vec::new(),
        }
    }

    /// Every record, sorted by owner name then type, for `render --what zone`.
    pub fn records(&self) -> Vec<&Record> {
        let mut keys: Vec<&Box<[u8]>> = self.nodes.keys().collect();
        keys.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        let mut out = Vec::with_capacity(self.record_count);
        // SOA first, as master files expect.
        out.push(&self.soa);
        for k in keys {
            if let Some(node) = self.nodes.get(k) {
                let mut recs: Vec<&Record> = node
                    .records
                    .iter()
                    .filter(|r| r.record_type() != RecordType::SOA)
                    .collect();
                recs.sort_by_key(|r| (u16::from(r.record_type()), r.data.to_string()));
                out.extend(recs);
            }
        }
        out
    }

    pub fn pod_mode(&self) -> PodMode {
        self.pods
    }
}

/// Names compare by their labels from the root down, so a zone reads in
/// tree order.
fn sort_key(key: &[u8]) -> Vec<&[u8]> {
    let mut labels: Vec<&[u8]> = key.split(|&b| b == b'.').collect();
    labels.reverse();
    labels
}

fn child(origin: &Name, prefix: &str) -> Result<Name, DnsError> {
    Name::from_ascii(prefix)
        .and_then(|n| n.append_domain(origin))
        .map_err(|e| DnsError::Domain {
            domain: origin.to_ascii(),
            reason: e.to_string(),
        })
}

/// `10.0.0.1` → `10-0-0-1`; IPv6 colons become dashes as CoreDNS does.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// Inverse of `dashed`: four dashed decimal octets, else an IPv6 with
/// dashes for colons.
fn undashed(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return parts.join(".").parse::<Ipv4Addr>().ok().map(IpAddr::V4);
    }
    s.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The reverse-lookup name of `ip`, without the trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

fn proto_label(p: ferry_cluster::Protocol) -> &'static str {
    match p {
        ferry_cluster::Protocol::Tcp => "_tcp",
        ferry_cluster::Protocol::Udp => "_udp",
        ferry_cluster::Protocol::Sctp => "_sctp",
    }
}

struct Builder {
    zone: Zone,
}

impl Builder {
    fn parse(&mut self, name: &str) -> Option<Name> {
        match Name::from_ascii(format!("{name}.")) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(name, error = %e, "dns: skipping a name that is not a valid domain name");
                self.zone.skipped += 1;
                None
            }
        }
    }

    /// Adds `name` and its ancestors up to the origin as existing names.
    fn ensure(&mut self, name: &str) {
        let key = name.to_ascii_lowercase().into_bytes();
        let mut k: &[u8] = &key;
        loop {
            if self.zone.nodes.contains_key(k) {
                break;
            }
            self.zone.nodes.insert(k.into(), Node::default());
            if k == self.zone.origin_key.as_slice() || !key_is_under(k, &self.zone.origin_key) {
                break;
            }
            match k.iter().position(|&b| b == b'.') {
                Some(i) => k = &k[i + 1..],
                None => break,
            }
        }
    }

    fn add(&mut self, record: Record) {
        let key = name_key(&record.name);
        if let Ok(s) = std::str::from_utf8(&key) {
            let s = s.to_string();
            self.ensure(&s);
        }
        let node = self.zone.nodes.entry(key.into_boxed_slice()).or_default();
        if !node.records.contains(&record) {
            node.records.push(record);
            self.zone.record_count += 1;
        }
    }

    fn add_record(&mut self, name: &str, rdata: RData) {
        if let Some(n) = self.parse(name) {
            let ttl = self.zone.ttl;
            self.add(Record::from_rdata(n, ttl, rdata));
        }
    }

    fn address(&mut self, name: &str, ip: IpAddr) {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        self.add_record(name, rdata);
    }

    fn ptr(&mut self, ip: IpAddr, target: &str) {
        if let Some(t) = self.parse(target) {
            let name = reverse_name(ip);
            if let Ok(n) = Name::from_ascii(format!("{name}.")) {
                let ttl = self.zone.ttl;
                let key = name_key(&n).into_boxed_slice();
                let node = self.zone.nodes.entry(key).or_default();
                let rec = Record::from_rdata(n, ttl, RData::PTR(PTR(t)));
                if !node.records.contains(&rec) {
                    node.records.push(rec);
                    self.zone.record_count += 1;
                }
            }
        }
    }

    fn service(&mut self, snap: &Snapshot, svc: &Service, domain: &str) {
        let ns = &svc.key.namespace;
        let fqdn = crate::service_fqdn(&svc.key.name, ns, domain).to_ascii_lowercase();
        if self.parse(&fqdn).is_none() {
            tracing::warn!(object = %svc.key, field = "metadata.name", "dns: skipping Service");
            return;
        }
        self.ensure(&format!("{ns}.svc.{domain}"));
        if svc.type_ == ServiceType::ExternalName {
            let Some(target) = svc.external_name.as_deref().map(|t| t.trim_end_matches('.')) else {
                tracing::warn!(object = %svc.key, field = "spec.externalName", "dns: ExternalName Service without a target, skipped");
                self.zone.skipped += 1;
                return;
            };
            match self.parse(target) {
                Some(t) => self.add_record(&fqdn, RData::CNAME(CNAME(t))),
                None => tracing::warn!(object = %svc.key, field = "spec.externalName", "dns: skipping Service"),
            }
            return;
        }
        if svc.headless {
            self.headless(snap, svc, &fqdn);
            return;
        }
        if svc.cluster_ips.is_empty() {
            return;
        }
        for ip in &svc.cluster_ips {
            self.address(&fqdn, *ip);
            self.ptr(*ip, &fqdn);
        }
        for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            let srv_name = format!(
                "_{}.{}.{fqdn}",
                port.name.to_ascii_lowercase(),
                proto_label(port.protocol)
            );
            if let Some(target) = self.parse(&fqdn) {
                self.add_record(&srv_name, RData::SRV(SRV::new(0, 100, port.port, target)));
            }
        }
    }

    /// Headless: records per endpoint; the service name exists only while it
    /// has endpoints to publish (no endpoints → NXDOMAIN, per the spec).
    fn headless(&mut self, snap: &Snapshot, svc: &Service, fqdn: &str) {
        let publish = |ready: bool| ready || svc.publish_not_ready_addresses;
        let mut seen = BTreeSet::new();
        for slice in snap.slices(&svc.key) {
            for ep in &slice.endpoints {
                if !publish(ep.conditions.ready) {
                    continue;
                }
                for ip in &ep.addresses {
                    let host = match &ep.hostname {
                        Some(h) => h.to_ascii_lowercase(),
                        None => dashed(*ip),
                    };
                    let host_name = format!("{host}.{fqdn}");
                    if seen.insert(*ip) {
                        self.address(fqdn, *ip);
                    }
                    self.address(&host_name, *ip);
                    if ep.hostname.is_some() {
                        self.ptr(*ip, &host_name);
                    }
                }
            }
        }
        for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            let backends: Vec<_> = snap
                .backends(svc, port)
                .into_iter()
                .filter(|b| publish(b.conditions.ready))
                .collect();
            if backends.is_empty() {
                continue;
            }
            let srv_name = format!(
                "_{}.{}.{fqdn}",
                port.name.to_ascii_lowercase(),
                proto_label(port.protocol)
            );
            let weight = u16::try_from((100 / backends.len()).max(1)).unwrap_or(1);
            for b in backends {
                let host = match &b.hostname {
                    Some(h) => h.to_ascii_lowercase(),
                    None => dashed(b.ip),
                };
                if let Some(target) = self.parse(&format!("{host}.{fqdn}")) {
                    self.add_record(&srv_name, RData::SRV(SRV::new(0, weight, b.port, target)));
                }
            }
        }
    }
}

/// The zone in master-file format (RFC 1035 §5), for `render --what zone`.
pub fn master_file(zone: &Zone) -> String {
    let mut out = String::new();
    out.push_str(&format!("$ORIGIN {}\n$TTL {}\n", zone.origin(), zone.ttl()));
    if zone.pod_mode() == PodMode::Insecure {
        out.push_str(&format!(
            "; pods insecure: a-b-c-d.<namespace>.pod.{} is answered for any IP in an existing namespace\n",
            zone.origin()
        ));
    }
    for r in zone.records() {
        let rdata = match &r.data {
            // Character-strings are quoted in master files.
            RData::TXT(txt) => txt
                .txt_data
                .iter()
                .map(|s| {
                    format!(
                        "\"{}\"",
                        String::from_utf8_lossy(s).replace('\\', "\\\\").replace('"', "\\\"")
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        out.push_str(&format!(
            "{} {} {} {} {rdata}\n",
            r.name,
            r.ttl,
            DNSClass::IN,
            r.record_type()
        ));
    }
    out
}

#[cfg(test)]
#[path = "zone_tests.rs"]
mod tests;
