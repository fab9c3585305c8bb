//! The cluster zone: a pure index from lowercase owner names to records,
//! compiled from a `Snapshot` (no I/O, no tokio), and the lookup that decides
//! answer, NODATA or NXDOMAIN per the Kubernetes DNS-Based Service Discovery
//! specification.
//!
//! Why our own index and not hickory's in-memory authority: that authority
//! decides NXDOMAIN versus NODATA by scanning every name; here every name,
//! including the empty non-terminals (`<ns>.svc.<zone>`, `_tcp.<svc>…`), is a
//! key of one hash index, so a lookup is O(1) in the size of the cluster.
//!
//! Why not hickory `Record`s in the index: a `Record` with its `Name` costs
//! kilobytes and several heap allocations; a cluster of 10k services then
//! needs tens of megabytes. Here every name is its lookup key in one byte
//! arena, every record a small `Data` value (addresses inline, names as ids
//! into the name table), all in a few flat vectors. Records are turned into
//! hickory `Record`s (`lookup`) or written straight as wire bytes
//! (`crate::wire`'s fast path) only when a query asks for them — except
//! the answers to A and AAAA queries, the bulk of cluster DNS traffic,
//! which are compiled into wire bytes with the zone (16 bytes per A record,
//! `wire_answers`).

use ahash::RandomState;
use std::collections::{BTreeSet, HashSet};
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

/// The kind of a lookup's result, with the records left in an `Answer`
/// buffer (the allocation-free form of `Lookup` that the wire path uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Answer,
    NoData,
    NxDomain,
    NotOurs,
}

/// Identifies a name in the zone's name table.
pub type NameId = u32;

/// The typed data of one record. Every record of the zone has the zone's
/// TTL and class IN; names are ids into the name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Priority is always 0.
    Srv {
        weight: u16,
        port: u16,
        target: NameId,
    },
    Cname(NameId),
    Ptr(NameId),
    /// `dns-version`'s TXT (`SCHEMA_VERSION`), the zone's only TXT.
    Txt,
    /// The zone's SOA (see `Zone::soa_fields`).
    Soa,
}

impl Data {
    pub fn record_type(&self) -> RecordType {
        match self {
            Data::A(_) => RecordType::A,
            Data::Aaaa(_) => RecordType::AAAA,
            Data::Srv { .. } => RecordType::SRV,
            Data::Cname(_) => RecordType::CNAME,
            Data::Ptr(_) => RecordType::PTR,
            Data::Txt => RecordType::TXT,
            Data::Soa => RecordType::SOA,
        }
    }
}

/// Whose name a record of a lookup carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The queried name, in the query's spelling.
    Query,
    Name(NameId),
}

/// One record of a lookup's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rr {
    pub owner: Owner,
    pub data: Data,
}

/// Reusable buffers for a lookup's records, so that answering a query
/// allocates nothing once they have grown.
#[derive(Debug, Default)]
pub struct Answer {
    pub answers: Vec<Rr>,
    pub additionals: Vec<Rr>,
}

impl Answer {
    pub fn clear(&mut self) {
        self.answers.clear();
        self.additionals.clear();
    }
}

/// The SOA's numbers (names: `ns.dns.<zone>` and `hostmaster.<zone>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoaFields {
    pub serial: u32,
    pub refresh: i32,
    pub retry: i32,
    pub expire: i32,
    pub minimum: u32,
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
        push_key_label(&mut key, label);
    }
    key
}

/// Appends one label to a key, lowercased and escaped as `name_key` does.
pub fn push_key_label(key: &mut Vec<u8>, label: &[u8]) {
    for &b in label {
        if b == b'.' || b == b'\\' {
            key.push(b'\\');
        }
        key.push(b.to_ascii_lowercase());
    }
}

/// Calls `f` with each label of `key` (unescaped, as on the wire), from the
/// leftmost; the empty key (the root) has none. `buf` holds one label.
pub fn for_each_key_label(key: &[u8], mut f: impl FnMut(&[u8])) {
    if key.is_empty() {
        return;
    }
    let mut label = [0u8; 256];
    let mut len = 0;
    let mut escaped = false;
    for &b in key {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
            continue;
        } else if b == b'.' {
            f(&label[..len]);
            len = 0;
            continue;
        }
        if let Some(slot) = label.get_mut(len) {
            *slot = b;
            len += 1;
        }
    }
    f(&label[..len]);
}

/// `true` when `key` is `suffix` or ends with `.suffix`.
pub fn key_is_under(key: &[u8], suffix: &[u8]) -> bool {
    key == suffix || (key.len() > suffix.len() && key.ends_with(suffix) && key[key.len() - suffix.len() - 1] == b'.')
}

/// One name of the table: its key in the arena and its records.
#[derive(Debug, Clone, Copy)]
struct NameEntry {
    key_start: u32,
    key_len: u32,
    records_start: u32,
    records_len: u32,
    /// `false` for names that are only targets (an ExternalName's CNAME
    /// target, say): they are interned for their id, but do not exist.
    exists: bool,
}

/// The name table and its hash index: keys in one arena, no allocation per
/// name.
#[derive(Debug, Clone, Default)]
struct Names {
    arena: Vec<u8>,
    entries: Vec<NameEntry>,
    /// Open addressing, linear probing: (low 32 bits of the hash, id + 1);
    /// id 0 marks a free slot. At most half full.
    slots: Vec<(u32, u32)>,
    /// Keyed at random per zone, like std's, so names chosen by clients or
    /// cluster users cannot be made to collide; ahash rather than std's
    /// SipHash because every query name is hashed (~45 instructions for a
    /// Service name instead of ~270 with SipHash, under callgrind).
    hasher: RandomState,
}

impl Names {
    fn key(&self, id: NameId) -> &[u8] {
        match self.entries.get(id as usize) {
            Some(e) => self
                .arena
                .get(e.key_start as usize..(e.key_start + e.key_len) as usize)
                .unwrap_or_default(),
            None => &[],
        }
    }

    fn hash(&self, key: &[u8]) -> u32 {
        self.hasher.hash_one(key) as u32
    }

    fn find(&self, key: &[u8]) -> Option<NameId> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let h = self.hash(key);
        let mut i = h as usize & mask;
        for _ in 0..self.slots.len() {
            let (sh, id1) = self.slots[i];
            if id1 == 0 {
                return None;
            }
            if sh == h && self.key(id1 - 1) == key {
                return Some(id1 - 1);
            }
            i = (i + 1) & mask;
        }
        None
    }

    fn place(slots: &mut [(u32, u32)], h: u32, id1: u32) {
        let mask = slots.len() - 1;
        let mut i = h as usize & mask;
        for _ in 0..slots.len() {
            if slots[i].1 == 0 {
                slots[i] = (h, id1);
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of `key`, added (not existing) when new.
    fn intern(&mut self, key: &[u8]) -> NameId {
        if let Some(id) = self.find(key) {
            return id;
        }
        if (self.entries.len() + 1) * 2 > self.slots.len() {
            let mut slots = vec![(0u32, 0u32); (self.slots.len() * 2).max(64)];
            for &(h, id1) in self.slots.iter().filter(|s| s.1 != 0) {
                Self::place(&mut slots, h, id1);
            }
            self.slots = slots;
        }
        let id = self.entries.len() as NameId;
        self.entries.push(NameEntry {
            key_start: self.arena.len() as u32,
            key_len: key.len() as u32,
            records_start: 0,
            records_len: 0,
            exists: false,
        });
        self.arena.extend_from_slice(key);
        let h = self.hash(key);
        Self::place(&mut self.slots, h, id + 1);
        id
    }
}

/// The precompiled answers of A and AAAA queries (`Zone::wire_answers`),
/// in a table of their own so that a lookup reads two or three cache lines
/// (a slot, then the name's entry) rather than five (the name index's slot,
/// the name entry, its key in the arena, an answer index, the answers): a
/// cluster's names are far more than the caches hold when the node is busy,
/// and each miss costs more than answering from cache.
///
/// An entry is the key's length, the A and the AAAA record counts (a byte
/// each), the key, then the A records and the AAAA records back to back.
/// Names with a key or a record count over 255 are left out; the general
/// fast path answers them with the same bytes.
#[derive(Debug, Clone, Default)]
struct WireTable {
    /// Open addressing, linear probing, with `Names`' hash: (low 32 bits of
    /// the hash, entry offset + 1); 0 marks a free slot. At most half full.
    slots: Vec<(u32, u32)>,
    bytes: Vec<u8>,
}

const WIRE_ENTRY_HEAD: usize = 3;

/// Bytes of one precompiled answer record: owner pointer, type, class, TTL,
/// RDLENGTH, then the address.
const WIRE_A_LEN: usize = 2 + 2 + 2 + 4 + 2 + 4;
const WIRE_AAAA_LEN: usize = 2 + 2 + 2 + 4 + 2 + 16;
/// The owner of a precompiled record: a pointer to the question name, which
/// starts right after the 12-byte header of every reply.
const POINTER_TO_QUESTION: [u8; 2] = [0xc0, 12];

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
    soa_fields: SoaFields,
    soa_mname: NameId,
    soa_rname: NameId,
    origin_id: NameId,
    names: Names,
    /// Every record, grouped by owner (`NameEntry::records_*`).
    records: Vec<Data>,
    /// Namespaces, for synthesized (insecure) pod records.
    namespaces: HashSet<Box<str>>,
    /// Answer sections of A and AAAA queries, precompiled in wire format
    /// (see `wire_answers`).
    wire: WireTable,
    generation: u64,
    existing_names: usize,
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
        let mname = child(&origin, "ns.dns")?;
        let rname = child(&origin, "hostmaster")?;
        let soa_fields = SoaFields {
            // The generation changes with every snapshot, as a serial should.
            serial: (snap.generation & u64::from(u32::MAX)) as u32,
            refresh: 7200,
            retry: 1800,
            expire: 86400,
            minimum: cfg.ttl,
        };
        let soa = Record::from_rdata(
            origin.clone(),
            cfg.ttl,
            RData::SOA(SOA::new(
                mname.clone(),
                rname.clone(),
                soa_fields.serial,
                soa_fields.refresh,
                soa_fields.retry,
                soa_fields.expire,
                soa_fields.minimum,
            )),
        );
        let mut names = Names::default();
        let origin_key = name_key(&origin);
        let origin_id = names.intern(&origin_key);
        let soa_mname = names.intern(&name_key(&mname));
        let soa_rname = names.intern(&name_key(&rname));
        let mut b = Builder {
            zone: Zone {
                origin_key,
                pod_suffix: format!("pod.{domain}").into_bytes(),
                origin: origin.clone(),
                ttl: cfg.ttl,
                pods: cfg.pods,
                soa,
                soa_fields,
                soa_mname,
                soa_rname,
                origin_id,
                names,
                records: Vec::new(),
                namespaces: HashSet::new(),
                wire: WireTable::default(),
                generation: snap.generation,
                existing_names: 0,
                skipped: 0,
            },
            pending: Vec::new(),
        };
        let origin_key = b.zone.origin_key.clone();
        b.push(&origin_key, Data::Soa);
        b.add(&format!("dns-version.{domain}"), Data::Txt);
        b.ensure(format!("svc.{domain}").as_bytes());
        for ns in snap.namespaces() {
            b.namespace(&ns.name, &domain, cfg.pods);
        }
        // A namespace that holds objects exists, whether or not the source
        // delivered its Namespace object.
        let object_namespaces = snap
            .services()
            .map(|s| s.key.namespace.as_str())
            .chain(snap.pods().map(|p| p.key.namespace.as_str()))
            .collect::<BTreeSet<_>>();
        for ns in object_namespaces {
            b.namespace(ns, &domain, cfg.pods);
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
        Ok(b.finish())
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The SOA for the authority section of NODATA and NXDOMAIN answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The SOA as parts: owner, mname, rname and numbers (for the wire path).
    pub fn soa_parts(&self) -> (NameId, NameId, NameId, SoaFields) {
        (self.origin_id, self.soa_mname, self.soa_rname, self.soa_fields)
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Names in the index (including empty non-terminals).
    pub fn name_count(&self) -> usize {
        self.existing_names
    }

    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Objects or fields skipped while building (each was logged).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// `true` when `key` (see `name_key`) is at or under the cluster domain.
    pub fn is_cluster_name(&self, key: &[u8]) -> bool {
        key_is_under(key, &self.origin_key)
    }

    /// The lookup key of a name of the table.
    pub fn key_of(&self, id: NameId) -> &[u8] {
        self.names.key(id)
    }

    /// The name `id` as a hickory `Name`.
    pub fn name_of(&self, id: NameId) -> Name {
        let mut labels: Vec<Vec<u8>> = Vec::new();
        for_each_key_label(self.names.key(id), |l| labels.push(l.to_vec()));
        // Every key was made from a valid `Name` while building.
        Name::from_labels(labels).unwrap_or_else(|_| Name::root())
    }

    /// Answers `qtype` for `qname`. Answer records owned by the queried name
    /// carry the query's spelling (so 0x20-randomizing resolvers accept them).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Lookup {
        let key = name_key(qname);
        self.lookup_key(&key, qname, qtype)
    }

    /// `lookup` with the key already computed.
    pub fn lookup_key(&self, key: &[u8], qname: &Name, qtype: RecordType) -> Lookup {
        let mut out = Answer::default();
        match self.resolve(key, qtype, &mut out) {
            Status::Answer => Lookup::Answer {
                answers: out.answers.iter().map(|rr| self.record(rr, qname)).collect(),
                additionals: out.additionals.iter().map(|rr| self.record(rr, qname)).collect(),
            },
            Status::NoData => Lookup::NoData,
            Status::NxDomain => Lookup::NxDomain,
            Status::NotOurs => Lookup::NotOurs,
        }
    }

    /// The hickory form of one record of a lookup's result.
    pub fn record(&self, rr: &Rr, qname: &Name) -> Record {
        let owner = match rr.owner {
            Owner::Query => qname.clone(),
            Owner::Name(id) => self.name_of(id),
        };
        Record::from_rdata(owner, self.ttl, self.rdata(&rr.data))
    }

    fn rdata(&self, data: &Data) -> RData {
        match *data {
            Data::A(v4) => RData::A(A(v4)),
            Data::Aaaa(v6) => RData::AAAA(AAAA(v6)),
            Data::Srv { weight, port, target } => RData::SRV(SRV::new(0, weight, port, self.name_of(target))),
            Data::Cname(t) => RData::CNAME(CNAME(self.name_of(t))),
            Data::Ptr(t) => RData::PTR(PTR(self.name_of(t))),
            Data::Txt => RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
            Data::Soa => self.soa.data.clone(),
        }
    }

    /// The existing name `key`, if any.
    fn existing(&self, key: &[u8]) -> Option<&NameEntry> {
        self.names
            .find(key)
            .and_then(|id| self.names.entries.get(id as usize))
            .filter(|e| e.exists)
    }

    fn records_of(&self, e: &NameEntry) -> &[Data] {
        self.records
            .get(e.records_start as usize..(e.records_start + e.records_len) as usize)
            .unwrap_or_default()
    }

    /// The answer section of an A or AAAA query for `key`, compiled into
    /// wire format when the zone was built, and its record count: `None`
    /// unless the name exists and its answer is exactly its own records of
    /// that type (not for a CNAME, NODATA, other types or ANY; those take
    /// `resolve`). Each record's owner is a pointer to offset 12, where a
    /// reply's question name starts: the bytes hickory's encoder writes for
    /// the records `resolve` returns, whose owner is the question's name.
    pub fn wire_answers(&self, key: &[u8], qtype: RecordType) -> Option<(&[u8], usize)> {
        if !matches!(qtype, RecordType::A | RecordType::AAAA) || self.wire.slots.is_empty() {
            return None;
        }
        let t = &self.wire;
        let h = self.names.hash(key);
        let mask = t.slots.len() - 1;
        let mut i = h as usize & mask;
        for _ in 0..t.slots.len() {
            let (sh, at1) = *t.slots.get(i)?;
            if at1 == 0 {
                return None;
            }
            if sh == h {
                let at = at1 as usize - 1;
                let head = t.bytes.get(at..at + WIRE_ENTRY_HEAD)?;
                let (key_len, a, aaaa) = (usize::from(head[0]), usize::from(head[1]), usize::from(head[2]));
                let key_at = at + WIRE_ENTRY_HEAD;
                if t.bytes.get(key_at..key_at + key_len) == Some(key) {
                    let a_at = key_at + key_len;
                    let (from, count, len) = if qtype == RecordType::A {
                        (a_at, a, a * WIRE_A_LEN)
                    } else {
                        (a_at + a * WIRE_A_LEN, aaaa, aaaa * WIRE_AAAA_LEN)
                    };
                    if count == 0 {
                        return None;
                    }
                    return Some((t.bytes.get(from..from + len)?, count));
                }
            }
            i = (i + 1) & mask;
        }
        None
    }

    /// Compiles `wire_answers` for every existing name whose records hold
    /// no CNAME (a CNAME's answer follows its target).
    fn compile_wire_answers(&mut self) {
        let mut wire = Vec::new();
        // (hash, entry offset + 1)
        let mut placed: Vec<(u32, u32)> = Vec::new();
        for e in self.names.entries.iter() {
            let records = self.records_of(e);
            if !e.exists || records.is_empty() || records.iter().any(|d| matches!(d, Data::Cname(_))) {
                continue;
            }
            let a = records.iter().filter(|d| matches!(d, Data::A(_))).count();
            let aaaa = records.iter().filter(|d| matches!(d, Data::Aaaa(_))).count();
            let key = self
                .names
                .arena
                .get(e.key_start as usize..(e.key_start + e.key_len) as usize)
                .unwrap_or_default();
            let (Ok(at1), Ok(key_len), Ok(a8), Ok(aaaa8)) = (
                u32::try_from(wire.len() + 1),
                u8::try_from(key.len()),
                u8::try_from(a),
                u8::try_from(aaaa),
            ) else {
                continue;
            };
            if a + aaaa == 0 {
                continue;
            }
            wire.extend_from_slice(&[key_len, a8, aaaa8]);
            wire.extend_from_slice(key);
            placed.push((self.names.hash(key), at1));
            for want in [RecordType::A, RecordType::AAAA] {
                for d in records.iter().filter(|d| d.record_type() == want) {
                    wire.extend_from_slice(&POINTER_TO_QUESTION);
                    wire.extend_from_slice(&u16::from(want).to_be_bytes());
                    wire.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
                    wire.extend_from_slice(&self.ttl.to_be_bytes());
                    match d {
                        Data::A(v4) => {
                            wire.extend_from_slice(&4u16.to_be_bytes());
                            wire.extend_from_slice(&v4.octets());
                        }
                        Data::Aaaa(v6) => {
                            wire.extend_from_slice(&16u16.to_be_bytes());
                            wire.extend_from_slice(&v6.octets());
                        }
                        _ => {}
                    }
                }
            }
        }
        wire.shrink_to_fit();
        let mut slots = Vec::new();
        if !placed.is_empty() {
            slots = vec![(0u32, 0u32); (placed.len() * 2).next_power_of_two().max(64)];
            for &(h, at1) in &placed {
                Names::place(&mut slots, h, at1);
            }
        }
        self.wire = WireTable { slots, bytes: wire };
    }

    /// The lookup itself: decides the outcome for `key` and leaves the
    /// records in `out` (cleared first). Allocation-free once `out` has grown.
    pub fn resolve(&self, key: &[u8], qtype: RecordType, out: &mut Answer) -> Status {
        out.clear();
        let ours = key_is_under(key, &self.origin_key);
        let reverse = key_is_under(key, IN_ADDR) || key_is_under(key, IP6);
        if !ours && !reverse {
            return Status::NotOurs;
        }
        let node = match self.existing(key) {
            Some(n) => n,
            None if reverse => return Status::NotOurs,
            None => return self.synthesized_pod(key, qtype, out),
        };
        let mut cname_target: Option<NameId> = None;
        for d in self.records_of(node) {
            let t = d.record_type();
            if t == qtype || qtype == RecordType::ANY || (t == RecordType::CNAME && qtype != RecordType::CNAME) {
                if let Data::Cname(target) = d {
                    cname_target = Some(*target);
                }
                out.answers.push(Rr {
                    owner: Owner::Query,
                    data: *d,
                });
            }
        }
        if out.answers.is_empty() {
            return Status::NoData;
        }
        // ExternalName pointing into the zone: append the target's records,
        // following at most a few hops so a CNAME loop cannot spin.
        let mut hops = 0;
        while let (Some(target), true) = (cname_target.take(), qtype != RecordType::ANY) {
            hops += 1;
            if hops > 8 || !key_is_under(self.names.key(target), &self.origin_key) {
                break;
            }
            let Some(tnode) = self.names.entries.get(target as usize).filter(|e| e.exists) else {
                continue;
            };
            for d in self.records_of(tnode) {
                let t = d.record_type();
                if t == qtype || t == RecordType::CNAME {
                    if let Data::Cname(next) = d {
                        cname_target = Some(*next);
                    }
                    out.answers.push(Rr {
                        owner: Owner::Name(target),
                        data: *d,
                    });
                }
            }
        }
        for i in 0..out.answers.len() {
            let Data::Srv { target, .. } = out.answers[i].data else {
                continue;
            };
            if let Some(tnode) = self.names.entries.get(target as usize).filter(|e| e.exists) {
                for d in self.records_of(tnode) {
                    if matches!(d, Data::A(_) | Data::Aaaa(_)) {
                        out.additionals.push(Rr {
                            owner: Owner::Name(target),
                            data: *d,
                        });
                    }
                }
            }
        }
        Status::Answer
    }

    /// Insecure pod mode: `a-b-c-d.<ns>.pod.<zone>` for any existing namespace.
    fn synthesized_pod(&self, key: &[u8], qtype: RecordType, out: &mut Answer) -> Status {
        if self.pods != PodMode::Insecure || !key_is_under(key, &self.pod_suffix) || key.len() <= self.pod_suffix.len()
        {
            return Status::NxDomain;
        }
        let prefix = &key[..key.len() - self.pod_suffix.len() - 1];
        let mut parts = prefix.split(|&b| b == b'.');
        let (Some(ip_label), Some(ns), None) = (parts.next(), parts.next(), parts.next()) else {
            return Status::NxDomain;
        };
        let Ok(ns) = std::str::from_utf8(ns) else {
            return Status::NxDomain;
        };
        if !self.namespaces.contains(ns) {
            return Status::NxDomain;
        }
        let Some(ip) = undashed(ip_label) else {
            return Status::NxDomain;
        };
        let data = match ip {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        };
        if data.record_type() != qtype && qtype != RecordType::ANY {
            return Status::NoData;
        }
        out.answers.push(Rr {
            owner: Owner::Query,
            data,
        });
        Status::Answer
    }

    /// Every record, sorted by owner name then type, for `render --what zone`.
    pub fn records(&self) -> Vec<Record> {
        let mut ids: Vec<NameId> = (0..self.names.entries.len() as NameId)
            .filter(|&id| self.names.entries[id as usize].records_len > 0)
            .collect();
        ids.sort_by(|a, b| sort_key(self.names.key(*a)).cmp(&sort_key(self.names.key(*b))));
        let mut out = Vec::with_capacity(self.records.len());
        // SOA first, as master files expect.
        out.push(self.soa.clone());
        for id in ids {
            let owner = self.name_of(id);
            let e = self.names.entries[id as usize];
            let mut recs: Vec<Record> = self
                .records_of(&e)
                .iter()
                .filter(|d| **d != Data::Soa)
                .map(|d| Record::from_rdata(owner.clone(), self.ttl, self.rdata(d)))
                .collect();
            recs.sort_by_key(|r| (u16::from(r.record_type()), r.data.to_string()));
            out.extend(recs);
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
    /// Records in the order they were added, grouped by owner in `finish`.
    pending: Vec<(NameId, Data)>,
}

impl Builder {
    /// The key of `name` (without the trailing dot), or `None` (logged and
    /// counted) when it is not a valid domain name.
    fn key(&mut self, name: &str) -> Option<Vec<u8>> {
        match Name::from_ascii(format!("{name}.")) {
            Ok(n) => Some(name_key(&n)),
            Err(e) => {
                tracing::warn!(name, error = %e, "dns: skipping a name that is not a valid domain name");
                self.zone.skipped += 1;
                None
            }
        }
    }

    /// Marks `key` and its ancestors up to the origin as existing names.
    fn ensure(&mut self, key: &[u8]) {
        let mut k: &[u8] = key;
        loop {
            let id = self.zone.names.intern(k);
            let entry = &mut self.zone.names.entries[id as usize];
            if entry.exists {
                break;
            }
            entry.exists = true;
            if k == self.zone.origin_key.as_slice() || !key_is_under(k, &self.zone.origin_key) {
                break;
            }
            match k.iter().position(|&b| b == b'.') {
                Some(i) => k = &k[i + 1..],
                None => break,
            }
        }
    }

    fn namespace(&mut self, ns: &str, domain: &str, pods: PodMode) {
        let ns = ns.to_ascii_lowercase();
        self.ensure(format!("{ns}.svc.{domain}").as_bytes());
        if pods != PodMode::Disabled {
            self.ensure(format!("{ns}.pod.{domain}").as_bytes());
        }
        self.zone.namespaces.insert(ns.into());
    }

    /// Adds a record owned by `key` (which, with its ancestors, exists).
    fn push(&mut self, key: &[u8], data: Data) {
        self.ensure(key);
        let id = self.zone.names.intern(key);
        self.pending.push((id, data));
    }

    fn add(&mut self, name: &str, data: Data) {
        if let Some(key) = self.key(name) {
            self.push(&key, data);
        }
    }

    /// The id of a name that records point to (it need not exist).
    fn target(&mut self, name: &str) -> Option<NameId> {
        self.key(name).map(|k| self.zone.names.intern(&k))
    }

    fn address(&mut self, name: &str, ip: IpAddr) {
        let data = match ip {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        };
        self.add(name, data);
    }

    /// A PTR; reverse names exist on their own (no ancestors).
    fn ptr(&mut self, ip: IpAddr, target: &str) {
        if let Some(t) = self.target(target) {
            let key = reverse_name(ip).into_bytes();
            let id = self.zone.names.intern(&key);
            self.zone.names.entries[id as usize].exists = true;
            self.pending.push((id, Data::Ptr(t)));
        }
    }

    fn service(&mut self, snap: &Snapshot, svc: &Service, domain: &str) {
        let ns = &svc.key.namespace;
        let fqdn = crate::service_fqdn(&svc.key.name, ns, domain).to_ascii_lowercase();
        let Some(fqdn_key) = self.key(&fqdn) else {
            tracing::warn!(object = %svc.key, field = "metadata.name", "dns: skipping Service");
            return;
        };
        self.ensure(format!("{}.svc.{domain}", ns.to_ascii_lowercase()).as_bytes());
        if svc.type_ == ServiceType::ExternalName {
            let Some(target) = svc.external_name.as_deref().map(|t| t.trim_end_matches('.')) else {
                tracing::warn!(object = %svc.key, field = "spec.externalName", "dns: ExternalName Service without a target, skipped");
                self.zone.skipped += 1;
                return;
            };
            match self.target(target) {
                Some(t) => self.push(&fqdn_key, Data::Cname(t)),
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
        let fqdn_id = self.zone.names.intern(&fqdn_key);
        for ip in &svc.cluster_ips {
            let data = match ip {
                IpAddr::V4(v4) => Data::A(*v4),
                IpAddr::V6(v6) => Data::Aaaa(*v6),
            };
            self.push(&fqdn_key, data);
            self.ptr(*ip, &fqdn);
        }
        for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            let srv_name = format!(
                "_{}.{}.{fqdn}",
                port.name.to_ascii_lowercase(),
                proto_label(port.protocol)
            );
            self.add(
                &srv_name,
                Data::Srv {
                    weight: 100,
                    port: port.port,
                    target: fqdn_id,
                },
            );
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
                if let Some(target) = self.target(&format!("{host}.{fqdn}")) {
                    self.add(
                        &srv_name,
                        Data::Srv {
                            weight,
                            port: b.port,
                            target,
                        },
                    );
                }
            }
        }
    }

    /// Groups the records by owner (keeping their order, without
    /// duplicates) into the flat record table, and trims every buffer.
    fn finish(mut self) -> Zone {
        // Stable: records of one owner keep the order they were added in.
        self.pending.sort_by_key(|&(id, _)| id);
        let mut records = Vec::with_capacity(self.pending.len());
        let mut seen: HashSet<Data> = HashSet::new();
        let mut i = 0;
        while i < self.pending.len() {
            let id = self.pending[i].0;
            let run_end = self.pending[i..]
                .iter()
                .position(|&(other, _)| other != id)
                .map_or(self.pending.len(), |n| i + n);
            let start = records.len();
            seen.clear();
            for &(_, d) in &self.pending[i..run_end] {
                if seen.insert(d) {
                    records.push(d);
                }
            }
            if let Some(e) = self.zone.names.entries.get_mut(id as usize) {
                e.records_start = start as u32;
                e.records_len = (records.len() - start) as u32;
            }
            i = run_end;
        }
        records.shrink_to_fit();
        let mut zone = self.zone;
        zone.records = records;
        zone.existing_names = zone.names.entries.iter().filter(|e| e.exists).count();
        zone.names.arena.shrink_to_fit();
        zone.names.entries.shrink_to_fit();
        zone.namespaces.shrink_to_fit();
        zone.compile_wire_answers();
        zone
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
