//! The pure half of the eBPF dataplane: `ServiceTable` → BPF map entries
//! (`compile`), and the ordered list of map writes that turns one set of
//! entries into another (`diff`). No I/O; the loader applies the ops.
//!
//! Layout (see `ebpf/src/ferry_maps.h`): each frontend (IPv4 address, port,
//! protocol) maps to a backend set `id` and a slot `count`; the backend set
//! lives in `ferry_backends` at `(id, 0..count)`. Frontends of one service
//! port that must reach the same endpoints share one set.
//!
//! Stability, so that a sync never opens a window where a connect fails or
//! lands on a removed backend:
//! - a set keeps its id across syncs (taken from the previous entries of its
//!   first frontend), and a backend that stays keeps its slot;
//! - a removed backend's slot is overwritten in place by a new or moved one
//!   (one atomic element update), the count only grows after the new slots
//!   are written and only shrinks before the trailing slots are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ferry_cluster::Protocol;
use ferry_ebpf::{
    Backend, BackendKey, SvcKey, SvcVal, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SVC_AFFINITY,
    SVC_DROP, SVC_EXT_LOCAL,
};

use crate::table::{EmptyAction, FrontendKind, ServiceEntry, ServicePortName, ServiceTable};

/// The contents of the services and backends maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapEntries {
    pub services: BTreeMap<SvcKey, SvcVal>,
    pub backends: BTreeMap<BackendKey, Backend>,
}

impl MapEntries {
    pub fn len(&self) -> usize {
        self.services.len() + self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.backends.is_empty()
    }
}

/// One map write. `diff` orders them so that applying them one by one, in
/// order, keeps every intermediate state consistent for the BPF programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    PutBackend(BackendKey, Backend),
    PutService(SvcKey, SvcVal),
    DeleteService(SvcKey),
    DeleteBackend(BackendKey),
}

/// What `compile` left out and why (the socket-level LB is IPv4-only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    pub ipv6_frontends: usize,
    pub ipv6_backends: usize,
}

/// Which backend list of a service port a frontend uses. The socket LB
/// only sees connections made on this node (by the node or its pods), so its
/// external frontends use every usable backend — kube-proxy's short-circuit
/// for in-cluster clients of `externalTrafficPolicy: Local` services — and
/// ClusterIPs honour `internalTrafficPolicy`. The TC program's entries
/// (`SvcKey::external`, traffic from outside) honour
/// `externalTrafficPolicy`: `ExternalLocal` for Local, else `All`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SetKind {
    Internal,
    All,
    ExternalLocal,
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

pub fn proto_name(n: u8) -> &'static str {
    match n {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        IPPROTO_SCTP => "SCTP",
        _ => "?",
    }
}

struct Group {
    frontends: Vec<SvcKey>,
    backends: Vec<Backend>,
    flags: u16,
    affinity_timeout: u32,
}

fn groups<'a>(
    services: impl Iterator<Item = &'a ServiceEntry>,
    skipped: &mut Skipped,
) -> Vec<(ServicePortName, SetKind, Group)> {
    let mut out = Vec::new();
    for entry in services {
        let name = &entry.name;
        let proto = proto_number(entry.protocol);
        let (flags, affinity_timeout) = match entry.affinity_timeout {
            Some(t) => (SVC_AFFINITY, t),
            None => (0, 0),
        };
        let mut by_kind: BTreeMap<SetKind, Group> = BTreeMap::new();
        for fe in &entry.frontends {
            let IpAddr::V4(ip) = fe.ip else {
                skipped.ipv6_frontends += 1;
                continue;
            };
            let kind = if fe.kind == FrontendKind::ClusterIp && entry.internal_local {
                SetKind::Internal
            } else {
                SetKind::All
            };
            let mut keys = vec![(kind, SvcKey::new(ip, fe.port, proto))];
            if fe.kind.is_external() {
                let kind = if entry.external_local {
                    SetKind::ExternalLocal
                } else {
                    SetKind::All
                };
                keys.push((kind, SvcKey::external(ip, fe.port, proto)));
            }
            for (kind, key) in keys {
                by_kind
                    .entry(kind)
                    .or_insert_with(|| group(entry, kind, flags, affinity_timeout, skipped))
                    .frontends
                    .push(key);
            }
        }
        for (kind, g) in by_kind {
            out.push((name.clone(), kind, g));
        }
    }
    out
}

fn group(entry: &ServiceEntry, kind: SetKind, mut flags: u16, affinity_timeout: u32, skipped: &mut Skipped) -> Group {
    let list = match kind {
        SetKind::Internal | SetKind::ExternalLocal => &entry.local_backends,
        SetKind::All => &entry.backends,
    };
    let mut backends: Vec<Backend> = Vec::with_capacity(list.len());
    for b in list {
        match b.ip {
            IpAddr::V4(v4) => backends.push(Backend::new(v4, b.port)),
            IpAddr::V6(_) => skipped.ipv6_backends += 1,
        }
    }
    backends.sort();
    backends.dedup();
    if kind == SetKind::ExternalLocal {
        flags |= SVC_EXT_LOCAL;
        if backends.is_empty() && entry.empty_action(FrontendKind::NodePort) == Some(EmptyAction::Drop) {
            flags |= SVC_DROP;
        }
    }
    Group {
        frontends: Vec::new(),
        backends,
        flags,
        affinity_timeout,
    }
}

/// The map entries `table` needs, reusing ids and slots from `prev` (the
/// entries currently in the maps) wherever they still fit.
pub fn compile(table: &ServiceTable, prev: &MapEntries) -> (MapEntries, Skipped) {
    compile_above(table, prev, 0)
}

/// `compile`, with fresh ids above `floor` as well as above every id in
/// `prev` (an incremental compile passes only the changed services' part of
/// the maps as `prev`, and the largest id in use anywhere as `floor`).
fn compile_above(table: &ServiceTable, prev: &MapEntries, floor: u32) -> (MapEntries, Skipped) {
    compile_entries(table.services.values(), prev, floor)
}

fn compile_entries<'a>(
    services: impl Iterator<Item = &'a ServiceEntry>,
    prev: &MapEntries,
    floor: u32,
) -> (MapEntries, Skipped) {
    let mut skipped = Skipped::default();
    let groups = groups(services, &mut skipped);
    let mut next = MapEntries::default();

    // Ids: keep the one the first frontend had, unless another set took it.
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    let mut ids: Vec<Option<u32>> = Vec::with_capacity(groups.len());
    for (_, _, g) in &groups {
        let id = g
            .frontends
            .iter()
            .filter_map(|k| prev.services.get(k).map(|v| v.id))
            .find(|id| !claimed.contains(id));
        if let Some(id) = id {
            claimed.insert(id);
        }
        ids.push(id);
    }
    // Fresh ids are never ones in use by prev (so old affinity entries and
    // in-flight slots of a removed set cannot alias a new set right away).
    let mut fresh = prev
        .services
        .values()
        .map(|v| v.id)
        .chain(prev.backends.keys().map(|k| k.id))
        .chain(claimed.iter().copied())
        .chain(std::iter::once(floor))
        .max()
        .map_or(1, |m| m.wrapping_add(1).max(1));

    for ((_, _, g), id) in groups.iter().zip(ids) {
        let id = id.unwrap_or_else(|| {
            let id = fresh;
            fresh = fresh.wrapping_add(1).max(1);
            id
        });
        let old: Vec<Backend> = prev
            .backends
            .range(BackendKey { id, slot: 0 }..=BackendKey { id, slot: u32::MAX })
            .map(|(_, b)| *b)
            .collect();
        let slots = assign_slots(&old, &g.backends);
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        for (slot, b) in slots.iter().take(usize::from(count)).enumerate() {
            next.backends.insert(BackendKey { id, slot: slot as u32 }, *b);
        }
        for fe in &g.frontends {
            next.services.insert(
                *fe,
                SvcVal {
                    id,
                    count,
                    flags: g.flags,
                    affinity_timeout: g.affinity_timeout,
                    pad: 0,
                },
            );
        }
    }
    (next, skipped)
}

/// Slots for `want` (sorted, deduplicated) given the previous slot list:
/// a backend that stays keeps its slot if it is still in range; the holes
/// are filled with the remaining backends in order.
fn assign_slots(old: &[Backend], want: &[Backend]) -> Vec<Backend> {
    let n = want.len();
    let wanted: BTreeSet<&Backend> = want.iter().collect();
    let mut slots: Vec<Option<Backend>> = vec![None; n];
    let mut placed: BTreeSet<Backend> = BTreeSet::new();
    for (i, b) in old.iter().enumerate().take(n) {
        if wanted.contains(b) && placed.insert(*b) {
            slots[i] = Some(*b);
        }
    }
    let mut rest = want.iter().filter(|b| !placed.contains(b));
    slots
        .into_iter()
        .map(|s| s.or_else(|| rest.next().copied()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_else(|| want.to_vec())
}

/// The ordered writes that turn `prev` into `next`:
/// 1. backend slots that are new or changed (in-place replacement; slots
///    past a set's current count are not reachable yet);
/// 2. services added or changed (count grows, id switches, flags);
/// 3. services removed;
/// 4. backend slots no longer referenced (past a shrunk count, removed sets).
pub fn diff(prev: &MapEntries, next: &MapEntries) -> Vec<Op> {
    let mut ops = Vec::new();
    for (k, b) in &next.backends {
        if prev.backends.get(k) != Some(b) {
            ops.push(Op::PutBackend(*k, *b));
        }
    }
    for (k, v) in &next.services {
        if prev.services.get(k) != Some(v) {
            ops.push(Op::PutService(*k, *v));
        }
    }
    for k in prev.services.keys() {
        if !next.services.contains_key(k) {
            ops.push(Op::DeleteService(*k));
        }
    }
    for k in prev.backends.keys() {
        if !next.backends.contains_key(k) {
            ops.push(Op::DeleteBackend(*k));
        }
    }
    ops
}

/// Applies `ops` to an in-memory copy (what the maps hold after applying).
pub fn apply_in_memory(entries: &mut MapEntries, ops: &[Op]) {
    for op in ops {
        match *op {
            Op::PutBackend(k, b) => {
                entries.backends.insert(k, b);
            }
            Op::PutService(k, v) => {
                entries.services.insert(k, v);
            }
            Op::DeleteService(k) => {
                entries.services.remove(&k);
            }
            Op::DeleteBackend(k) => {
                entries.backends.remove(&k);
            }
        }
    }
}

/// What one service port put into the maps: its frontend keys and the ids
/// of its backend sets.
#[derive(Debug, Clone)]
struct Owned {
    entry: ServiceEntry,
    keys: Vec<SvcKey>,
    ids: Vec<u32>,
}

/// The map contents plus, per service port, the `ServiceEntry` they were
/// compiled from and the keys it owns, so that a sync touches only service
/// ports whose entry changed: unchanged ones cost one comparison in a merge
/// walk of two sorted maps, changed ones are compiled against their own part
/// of the maps. The result is what `compile` would keep from the same
/// previous entries (ids and slots preserved), so `diff` ordering and the
/// no-window guarantee are the same as for a full compile.
#[derive(Debug, Clone, Default)]
pub struct Incremental {
    entries: MapEntries,
    owned: BTreeMap<ServicePortName, Owned>,
    /// Largest backend-set id present in the maps.
    max_id: u32,
    /// Some frontend key is claimed by two service ports (a misconfigured
    /// cluster); ownership is then ambiguous and every sync compiles whole.
    ambiguous: bool,
}

/// What `Incremental::full` / `update` decided.
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// The writes, in `diff` order.
    pub ops: Vec<Op>,
    pub skipped: Skipped,
    /// Service ports compiled (all on a full compile).
    pub compiled: usize,
    pub full: bool,
}

impl Incremental {
    pub fn entries(&self) -> &MapEntries {
        &self.entries
    }

    /// Compiles all of `table` against `prev` (the maps' contents).
    pub fn full(table: &ServiceTable, prev: MapEntries) -> (Incremental, Update) {
        let (next, skipped) = compile(table, &prev);
        let ops = diff(&prev, &next);
        let inc = Incremental::index(table, next);
        let update = Update {
            ops,
            skipped,
            compiled: table.services.len(),
            full: true,
        };
        (inc, update)
    }

    fn index(table: &ServiceTable, entries: MapEntries) -> Incremental {
        let mut owned = BTreeMap::new();
        let mut claimed: BTreeSet<SvcKey> = BTreeSet::new();
        let mut ambiguous = false;
        for (name, entry) in &table.services {
            let o = owned_by(entry, &entries);
            for k in &o.keys {
                ambiguous |= !claimed.insert(*k);
            }
            owned.insert(name.clone(), o);
        }
        let max_id = max_id(&entries);
        Incremental {
            entries,
            owned,
            max_id,
            ambiguous,
        }
    }

    /// Brings the maps from what they hold to what `table` needs, compiling
    /// only the service ports whose entry differs from the last one.
    pub fn update(&mut self, table: &ServiceTable) -> Update {
        if self.ambiguous {
            let prev = std::mem::take(&mut self.entries);
            let (inc, update) = Incremental::full(table, prev);
            *self = inc;
            return update;
        }
        // Merge walk: both maps are sorted by ServicePortName.
        let mut changed: Vec<&ServicePortName> = Vec::new();
        let mut removed: Vec<ServicePortName> = Vec::new();
        let mut new_it = table.services.iter().peekable();
        let mut old_it = self.owned.iter().peekable();
        loop {
            match (new_it.peek(), old_it.peek()) {
                (None, None) => break,
                (Some((n, _)), None) => {
                    changed.push(n);
                    new_it.next();
                }
                (None, Some((o, _))) => {
                    removed.push((*o).clone());
                    old_it.next();
                }
                (Some((n, e)), Some((o, owned))) => match n.cmp(o) {
                    std::cmp::Ordering::Less => {
                        changed.push(n);
                        new_it.next();
                    }
                    std::cmp::Ordering::Greater => {
                        removed.push((*o).clone());
                        old_it.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if *e != &owned.entry {
                            changed.push(n);
                        }
                        new_it.next();
                        old_it.next();
                    }
                },
            }
        }
        if changed.is_empty() && removed.is_empty() {
            return Update::default();
        }
        // The changed service ports' part of the maps.
        let mut sub_prev = MapEntries::default();
        for name in changed.iter().copied().chain(removed.iter()) {
            let Some(o) = self.owned.get(name) else {
                continue;
            };
            for k in &o.keys {
                if let Some(v) = self.entries.services.get(k) {
                    sub_prev.services.insert(*k, *v);
                }
            }
            for &id in &o.ids {
                for (k, b) in self
                    .entries
                    .backends
                    .range(BackendKey { id, slot: 0 }..=BackendKey { id, slot: u32::MAX })
                {
                    sub_prev.backends.insert(*k, *b);
                }
            }
        }
        let (sub_next, skipped) = compile_entries(
            changed.iter().filter_map(|n| table.services.get(*n)),
            &sub_prev,
            self.max_id,
        );
        // A changed service port taking a frontend key that an unchanged
        // one owns: compile whole, as that is what decides the winner.
        let conflict = sub_next
            .services
            .keys()
            .any(|k| self.entries.services.contains_key(k) && !sub_prev.services.contains_key(k));
        if conflict {
            let prev = std::mem::take(&mut self.entries);
            let (inc, update) = Incremental::full(table, prev);
            *self = inc;
            return update;
        }
        let ops = diff(&sub_prev, &sub_next);
        apply_in_memory(&mut self.entries, &ops);
        for name in &removed {
            self.owned.remove(name);
        }
        for name in &changed {
            if let Some(entry) = table.services.get(*name) {
                self.owned.insert((*name).clone(), owned_by(entry, &sub_next));
            }
        }
        self.max_id = self.max_id.max(max_id(&sub_next));
        Update {
            ops,
            skipped,
            compiled: changed.len(),
            full: false,
        }
    }
}

fn owned_by(entry: &ServiceEntry, entries: &MapEntries) -> Owned {
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for fe in &entry.frontends {
        let IpAddr::V4(ip) = fe.ip else { continue };
        let proto = proto_number(entry.protocol);
        let mut mine = vec![SvcKey::new(ip, fe.port, proto)];
        if fe.kind.is_external() {
            mine.push(SvcKey::external(ip, fe.port, proto));
        }
        for k in mine {
            if let Some(v) = entries.services.get(&k) {
                if !ids.contains(&v.id) {
                    ids.push(v.id);
                }
            }
            keys.push(k);
        }
    }
    Owned {
        entry: entry.clone(),
        keys,
        ids,
    }
}

fn max_id(entries: &MapEntries) -> u32 {
    entries
        .services
        .values()
        .map(|v| v.id)
        .chain(entries.backends.keys().next_back().map(|k| k.id))
        .max()
        .unwrap_or(0)
}

/// Human-readable map contents for `ferry render --what ebpf`, each service
/// line annotated with the service port it belongs to.
pub fn render(table: &ServiceTable, entries: &MapEntries, skipped: &Skipped) -> String {
    let mut owner: BTreeMap<SvcKey, (String, FrontendKind)> = BTreeMap::new();
    for (name, e) in &table.services {
        for fe in &e.frontends {
            if let IpAddr::V4(ip) = fe.ip {
                let proto = proto_number(e.protocol);
                owner.insert(SvcKey::new(ip, fe.port, proto), (name.to_string(), fe.kind));
                owner.insert(SvcKey::external(ip, fe.port, proto), (name.to_string(), fe.kind));
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# map ferry_services: {} entries; map ferry_backends: {} entries",
        entries.services.len(),
        entries.backends.len()
    );
    let mut services: Vec<(&SvcKey, &SvcVal)> = entries.services.iter().collect();
    services.sort_by_key(|(k, _)| (k.ip(), k.port(), k.proto, k.scope));
    for (k, v) in services {
        let (name, kind) = owner
            .get(k)
            .map(|(n, kind)| (n.as_str(), kind.as_str()))
            .unwrap_or(("?", "?"));
        let affinity = if v.flags & SVC_AFFINITY != 0 {
            format!(" affinity={}s", v.affinity_timeout)
        } else {
            String::new()
        };
        let action = match (v.count, v.flags & SVC_DROP != 0) {
            (0, true) => " drop",
            (0, false) => " reject",
            _ => "",
        };
        let scope = if k.scope == SCOPE_EXTERNAL {
            if v.flags & SVC_EXT_LOCAL != 0 {
                " tc(local, no snat)"
            } else {
                " tc(snat)"
            }
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "service {}:{}/{}{} id={} count={}{}{}  # {} {}",
            k.ip(),
            k.port(),
            proto_name(k.proto),
            scope,
            v.id,
            v.count,
            affinity,
            action,
            name,
            kind
        );
    }
    for (k, b) in &entries.backends {
        let _ = writeln!(out, "backend id={} slot={} {}:{}", k.id, k.slot, b.ip(), b.port());
    }
    if skipped.ipv6_frontends + skipped.ipv6_backends > 0 {
        let _ = writeln!(
            out,
            "# skipped (IPv4-only socket LB): {} IPv6 frontends, {} IPv6 backends",
            skipped.ipv6_frontends, skipped.ipv6_backends
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ferry_cluster::ObjectKey;

    use super::*;
    use crate::table::{Backend as TBackend, Frontend, ServiceEntry};

    fn name(svc: &str, proto: Protocol) -> ServicePortName {
        ServicePortName {
            service: ObjectKey::new("ns", svc),
            port: String::new(),
            protocol: proto,
        }
    }

    fn be(last: u8, local: bool) -> TBackend {
        TBackend {
            ip: IpAddr::from([10, 244, 0, last]),
            port: 8080,
            local,
            hairpin: local,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    fn entry(svc: &str, vip: [u8; 4], backends: Vec<TBackend>) -> ServiceEntry {
        let local_backends = backends.iter().filter(|b| b.local).cloned().collect();
        ServiceEntry {
            name: name(svc, Protocol::Tcp),
            protocol: Protocol::Tcp,
            frontends: vec![Frontend {
                ip: IpAddr::from(vip),
                port: 80,
                kind: FrontendKind::ClusterIp,
            }],
            backends,
            local_backends,
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
            health_check_node_port: None,
        }
    }

    fn table(entries: Vec<ServiceEntry>) -> ServiceTable {
        let mut t = ServiceTable::default();
        for e in entries {
            t.services.insert(e.name.clone(), e);
        }
        t
    }

    fn key(vip: [u8; 4], port: u16, proto: u8) -> SvcKey {
        SvcKey::new(Ipv4Addr::from(vip), port, proto)
    }

    /// The endpoints a connect to `k` can reach in `m` (None: not a frontend).
    fn reachable(m: &MapEntries, k: &SvcKey) -> Option<BTreeSet<Backend>> {
        let v = m.services.get(k)?;
        Some(
            (0..u32::from(v.count))
                .map(|slot| {
                    *m.backends
                        .get(&BackendKey { id: v.id, slot })
                        .unwrap_or_else(|| panic!("{k:?} slot {slot} missing"))
                })
                .collect(),
        )
    }

    /// Applies ops one at a time and checks every intermediate state: no
    /// frontend present before and after ever points at a missing slot or
    /// at a backend that is in neither the old nor the new set.
    fn check_transition(prev: &MapEntries, next: &MapEntries) -> usize {
        check_ops(prev, &diff(prev, next), next)
    }

    fn check_ops(prev: &MapEntries, ops: &[Op], next: &MapEntries) -> usize {
        let mut cur = prev.clone();
        for op in ops {
            apply_in_memory(&mut cur, std::slice::from_ref(op));
            for k in cur.services.keys() {
                let now = reachable(&cur, k).unwrap();
                let mut allowed = reachable(prev, k).unwrap_or_default();
                allowed.extend(reachable(next, k).unwrap_or_default());
                assert!(now.is_subset(&allowed), "after {op:?}: {k:?} reaches {now:?}");
                if reachable(prev, k).is_some_and(|s| !s.is_empty())
                    && reachable(next, k).is_some_and(|s| !s.is_empty())
                {
                    assert!(!now.is_empty(), "after {op:?}: {k:?} would refuse");
                }
            }
        }
        assert_eq!(&cur, next);
        ops.len()
    }

    #[test]
    fn compiles_frontends_backends_and_reject() {
        let mut e = entry("web", [10, 96, 0, 10], vec![be(1, true), be(2, false)]);
        e.affinity_timeout = Some(60);
        e.frontends.push(Frontend {
            ip: IpAddr::from([192, 0, 2, 1]),
            port: 30080,
            kind: FrontendKind::NodePort,
        });
        e.frontends.push(Frontend {
            ip: "fd00::1".parse().unwrap(),
            port: 80,
            kind: FrontendKind::ClusterIp,
        });
        let empty = entry("empty", [10, 96, 0, 11], vec![]);
        let t = table(vec![e, empty]);
        let (m, skipped) = compile(&t, &MapEntries::default());
        assert_eq!(skipped.ipv6_frontends, 1);
        let web = m.services[&key([10, 96, 0, 10], 80, IPPROTO_TCP)];
        assert_eq!((web.count, web.flags, web.affinity_timeout), (2, SVC_AFFINITY, 60));
        let np = m.services[&key([192, 0, 2, 1], 30080, IPPROTO_TCP)];
        assert_eq!(np.id, web.id, "ClusterIP and NodePort share one backend set");
        let empty = m.services[&key([10, 96, 0, 11], 80, IPPROTO_TCP)];
        assert_eq!(empty.count, 0, "no endpoints: count 0 = refuse");
        assert_ne!(empty.id, web.id);
        assert_eq!(m.backends.len(), 2);
        assert_eq!(
            reachable(&m, &key([10, 96, 0, 10], 80, IPPROTO_TCP)).unwrap(),
            [
                Backend::new(Ipv4Addr::new(10, 244, 0, 1), 8080),
                Backend::new(Ipv4Addr::new(10, 244, 0, 2), 8080)
            ]
            .into_iter()
            .collect()
        );
        let text = render(&t, &m, &skipped);
        assert!(
            text.contains("service 10.96.0.10:80/TCP id=2 count=2 affinity=60s  # ns/web:/TCP cluster-ip"),
            "{text}"
        );
        assert!(text.contains("service 10.96.0.11:80/TCP id=1 count=0 reject"), "{text}");
        assert!(text.contains("backend id=2 slot=1 10.244.0.2:8080"), "{text}");
    }

    #[test]
    fn internal_traffic_policy_local_gets_its_own_set() {
        let mut e = entry("web", [10, 96, 0, 10], vec![be(1, true), be(2, false)]);
        e.internal_local = true;
        e.frontends.push(Frontend {
            ip: IpAddr::from([192, 0, 2, 1]),
            port: 30080,
            kind: FrontendKind::NodePort,
        });
        let (m, _) = compile(&table(vec![e]), &MapEntries::default());
        assert_eq!(m.services[&key([10, 96, 0, 10], 80, IPPROTO_TCP)].count, 1);
        assert_eq!(m.services[&key([192, 0, 2, 1], 30080, IPPROTO_TCP)].count, 2);
    }

    #[test]
    fn same_table_twice_is_no_op() {
        let t = table(vec![entry("a", [10, 96, 0, 1], vec![be(1, false), be(2, false)])]);
        let (m1, _) = compile(&t, &MapEntries::default());
        let (m2, _) = compile(&t, &m1);
        assert_eq!(m1, m2);
        assert!(diff(&m1, &m2).is_empty());
    }

    #[test]
    fn replacing_a_backend_is_one_in_place_write() {
        let t1 = table(vec![entry(
            "a",
            [10, 96, 0, 1],
            vec![be(1, false), be(2, false), be(3, false)],
        )]);
        let t2 = table(vec![entry(
            "a",
            [10, 96, 0, 1],
            vec![be(1, false), be(3, false), be(4, false)],
        )]);
        let (m1, _) = compile(&t1, &MapEntries::default());
        let (m2, _) = compile(&t2, &m1);
        let ops = diff(&m1, &m2);
        let id = m1.services.values().next().unwrap().id;
        assert_eq!(
            ops,
            vec![Op::PutBackend(
                BackendKey { id, slot: 1 },
                Backend::new(Ipv4Addr::new(10, 244, 0, 4), 8080)
            )]
        );
        check_transition(&m1, &m2);
    }

    #[test]
    fn shrinking_moves_the_tail_then_lowers_count_then_deletes() {
        let t1 = table(vec![entry(
            "a",
            [10, 96, 0, 1],
            vec![be(1, false), be(2, false), be(3, false)],
        )]);
        let t2 = table(vec![entry("a", [10, 96, 0, 1], vec![be(1, false), be(3, false)])]);
        let (m1, _) = compile(&t1, &MapEntries::default());
        let (m2, _) = compile(&t2, &m1);
        let ops = diff(&m1, &m2);
        assert!(
            matches!(ops[0], Op::PutBackend(BackendKey { slot: 1, .. }, _)),
            "{ops:?}"
        );
        assert!(matches!(ops[1], Op::PutService(_, SvcVal { count: 2, .. })), "{ops:?}");
        assert!(
            matches!(ops[2], Op::DeleteBackend(BackendKey { slot: 2, .. })),
            "{ops:?}"
        );
        check_transition(&m1, &m2);
    }

    #[test]
    fn transitions_never_open_a_window() {
        let sets: Vec<Vec<u8>> = vec![
            vec![1, 2, 3],
            vec![3, 4, 5, 6],
            vec![6],
            vec![],
            vec![1, 2],
            vec![2, 7, 8, 9, 10],
            vec![10, 1],
            vec![1, 2, 3],
        ];
        let mut prev = MapEntries::default();
        for (i, s) in sets.iter().enumerate() {
            let mut e1 = entry("a", [10, 96, 0, 1], s.iter().map(|&n| be(n, n % 2 == 0)).collect());
            // Flip iTP on some steps so the ClusterIP switches sets.
            e1.internal_local = i % 3 == 1;
            e1.frontends.push(Frontend {
                ip: IpAddr::from([192, 0, 2, 1]),
                port: 30001,
                kind: FrontendKind::NodePort,
            });
            let mut entries = vec![e1];
            if i % 2 == 0 {
                entries.push(entry("b", [10, 96, 0, 2], vec![be(20 + i as u8, false)]));
            }
            let (next, _) = compile(&table(entries), &prev);
            check_transition(&prev, &next);
            prev = next;
        }
        let (empty, _) = compile(&ServiceTable::default(), &prev);
        assert!(empty.is_empty());
        check_transition(&prev, &empty);
    }

    #[test]
    fn ids_survive_adoption_from_the_kernel_maps() {
        // After a restart the previous entries come from the pinned maps,
        // not from memory: the same table must produce no writes.
        let t = table(vec![
            entry("a", [10, 96, 0, 1], vec![be(1, false), be(2, false)]),
            entry("b", [10, 96, 0, 2], vec![be(3, false)]),
        ]);
        let (m, _) = compile(&t, &MapEntries::default());
        let adopted = m.clone();
        let (again, _) = compile(&t, &adopted);
        assert!(diff(&adopted, &again).is_empty());
        // A new service gets an id no old set used.
        let t2 = table(vec![
            entry("b", [10, 96, 0, 2], vec![be(3, false)]),
            entry("c", [10, 96, 0, 3], vec![be(4, false)]),
        ]);
        let (m2, _) = compile(&t2, &m);
        let old_ids: BTreeSet<u32> = m.services.values().map(|v| v.id).collect();
        let c = m2.services[&key([10, 96, 0, 3], 80, IPPROTO_TCP)];
        assert!(!old_ids.contains(&c.id));
        check_transition(&m, &m2);
    }

    #[test]
    fn incremental_updates_match_a_full_compile_and_touch_only_changes() {
        // A small deterministic generator (no external crates): each step
        // edits a few of 40 service ports — new backends, removal, re-add,
        // iTP flips, a NodePort — and the incremental result must be a
        // fixpoint of the full compile, reach exactly the planned backends,
        // and its ops must never open a window.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut services: BTreeMap<u8, ServiceEntry> = BTreeMap::new();
        for i in 0..40u8 {
            services.insert(
                i,
                entry(&format!("s{i}"), [10, 96, 1, i], vec![be(i, false), be(i + 1, true)]),
            );
        }
        let t0 = table(services.values().cloned().collect());
        let (mut inc, first) = Incremental::full(&t0, MapEntries::default());
        assert!(first.full);
        assert_eq!(first.compiled, 40);
        for step in 0..60 {
            let prev = inc.entries().clone();
            let edits = 1 + rnd(3);
            for _ in 0..edits {
                let i = rnd(40) as u8;
                match rnd(5) {
                    0 => {
                        services.remove(&i);
                    }
                    1 => {
                        let n = rnd(5) as u8;
                        let e = entry(
                            &format!("s{i}"),
                            [10, 96, 1, i],
                            (0..n).map(|k| be(i.wrapping_add(k * 3), k % 2 == 0)).collect(),
                        );
                        services.insert(i, e);
                    }
                    2 => {
                        if let Some(e) = services.get_mut(&i) {
                            e.internal_local = !e.internal_local;
                        }
                    }
                    3 => {
                        if let Some(e) = services.get_mut(&i) {
                            e.frontends.push(Frontend {
                                ip: IpAddr::from([192, 0, 2, 1]),
                                port: 30000 + u16::from(i),
                                kind: FrontendKind::NodePort,
                            });
                            e.frontends.dedup();
                        }
                    }
                    _ => {
                        if let Some(e) = services.get_mut(&i) {
                            e.backends.push(be(200 + step as u8 % 50, false));
                        }
                    }
                }
            }
            let t = table(services.values().cloned().collect());
            let u = inc.update(&t);
            assert!(!u.full, "step {step}: no conflicts, so never a full compile");
            assert!(
                u.compiled <= edits as usize,
                "step {step}: compiled {} for {edits} edits",
                u.compiled
            );
            check_ops(&prev, &u.ops, inc.entries());
            let (fixpoint, _) = compile(&t, inc.entries());
            assert_eq!(&fixpoint, inc.entries(), "step {step}: differs from a full compile");
            for e in t.services.values() {
                for fe in &e.frontends {
                    let IpAddr::V4(ip) = fe.ip else { continue };
                    // The socket LB serves external frontends from every backend.
                    let list = if fe.kind == FrontendKind::ClusterIp {
                        e.internal_backends()
                    } else {
                        &e.backends
                    };
                    let want: BTreeSet<Backend> = list
                        .iter()
                        .filter_map(|b| match b.ip {
                            IpAddr::V4(v4) => Some(Backend::new(v4, b.port)),
                            IpAddr::V6(_) => None,
                        })
                        .collect();
                    let k = SvcKey::new(ip, fe.port, IPPROTO_TCP);
                    assert_eq!(reachable(inc.entries(), &k).unwrap(), want, "step {step} {k:?}");
                }
            }
        }
        // Nothing changed: no ops, nothing compiled.
        let t = table(services.values().cloned().collect());
        let u = inc.update(&t);
        assert!(u.ops.is_empty() && u.compiled == 0);
    }

    #[test]
    fn incremental_conflicting_frontend_compiles_whole() {
        let a = entry("a", [10, 96, 0, 1], vec![be(1, false)]);
        let (mut inc, _) = Incremental::full(&table(vec![a.clone()]), MapEntries::default());
        // b claims a's frontend: the full compile decides (b sorts after a and wins).
        let b = entry("b", [10, 96, 0, 1], vec![be(2, false)]);
        let t = table(vec![a, b]);
        let u = inc.update(&t);
        assert!(u.full);
        let k = key([10, 96, 0, 1], 80, IPPROTO_TCP);
        assert_eq!(
            reachable(inc.entries(), &k).unwrap(),
            [Backend::new(Ipv4Addr::new(10, 244, 0, 2), 8080)].into_iter().collect()
        );
        // Ambiguous ownership now: the next sync compiles whole as well.
        assert!(inc.update(&t).full);
    }

    #[test]
    fn external_entries_for_the_tc_program_honour_external_traffic_policy() {
        let np = |e: &mut ServiceEntry, port: u16| {
            e.frontends.push(Frontend {
                ip: IpAddr::from([192, 0, 2, 1]),
                port,
                kind: FrontendKind::NodePort,
            })
        };
        let mut cluster = entry("c", [10, 96, 0, 1], vec![be(1, true), be(2, false)]);
        np(&mut cluster, 30001);
        let mut local = entry("l", [10, 96, 0, 2], vec![be(1, true), be(2, false)]);
        local.external_local = true;
        np(&mut local, 30002);
        let mut remote_only = entry("r", [10, 96, 0, 3], vec![be(2, false)]);
        remote_only.external_local = true;
        np(&mut remote_only, 30003);
        let t = table(vec![cluster, local, remote_only]);
        let (m, _) = compile(&t, &MapEntries::default());
        let ext = |port| SvcKey::external(Ipv4Addr::new(192, 0, 2, 1), port, IPPROTO_TCP);
        let sock = |port| key([192, 0, 2, 1], port, IPPROTO_TCP);
        // eTP Cluster: the TC entry shares the socket LB's set (all endpoints, SNAT).
        assert_eq!(m.services[&ext(30001)].id, m.services[&sock(30001)].id);
        assert_eq!(m.services[&ext(30001)].flags & SVC_EXT_LOCAL, 0);
        // eTP Local: local endpoints only, no SNAT; the node's own connects use all.
        let l = m.services[&ext(30002)];
        assert_eq!((l.count, l.flags & SVC_EXT_LOCAL), (1, SVC_EXT_LOCAL));
        assert_eq!(m.services[&sock(30002)].count, 2);
        // eTP Local without a local endpoint: drop (remote ones exist).
        let r = m.services[&ext(30003)];
        assert_eq!((r.count, r.flags & SVC_DROP), (0, SVC_DROP));
        // ClusterIPs get no TC entry.
        assert!(!m
            .services
            .contains_key(&SvcKey::external(Ipv4Addr::new(10, 96, 0, 1), 80, IPPROTO_TCP)));
        let text = render(&t, &m, &Skipped::default());
        assert!(
            text.contains("service 192.0.2.1:30002/TCP tc(local, no snat)"),
            "{text}"
        );
        assert!(text.contains("count=0 drop"), "{text}");
    }
}
