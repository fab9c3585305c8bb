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
use ferry_ebpf::{Backend, BackendKey, SvcKey, SvcVal, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SVC_AFFINITY};

use crate::table::{FrontendKind, ServicePortName, ServiceTable};

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

/// Which backend list of a service port a frontend uses. A socket-level LB
/// only sees connections made on this node (by the node or its pods), so
/// external frontends use every usable backend — kube-proxy's short-circuit
/// for in-cluster clients of `externalTrafficPolicy: Local` services — and
/// ClusterIPs honour `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SetKind {
    Internal,
    All,
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

fn groups(table: &ServiceTable, skipped: &mut Skipped) -> Vec<(ServicePortName, SetKind, Group)> {
    let mut out = Vec::new();
    for (name, entry) in &table.services {
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
            let g = by_kind.entry(kind).or_insert_with(|| {
                let list = match kind {
                    SetKind::Internal => &entry.local_backends,
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
                Group {
                    frontends: Vec::new(),
                    backends,
                    flags,
                    affinity_timeout,
                }
            });
            g.frontends.push(SvcKey::new(ip, fe.port, proto));
        }
        for (kind, g) in by_kind {
            out.push((name.clone(), kind, g));
        }
    }
    out
}

/// The map entries `table` needs, reusing ids and slots from `prev` (the
/// entries currently in the maps) wherever they still fit.
pub fn compile(table: &ServiceTable, prev: &MapEntries) -> (MapEntries, Skipped) {
    let mut skipped = Skipped::default();
    let groups = groups(table, &mut skipped);
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

/// Human-readable map contents for `ferry render --what ebpf`, each service
/// line annotated with the service port it belongs to.
pub fn render(table: &ServiceTable, entries: &MapEntries, skipped: &Skipped) -> String {
    let mut owner: BTreeMap<SvcKey, (String, FrontendKind)> = BTreeMap::new();
    for (name, e) in &table.services {
        for fe in &e.frontends {
            if let IpAddr::V4(ip) = fe.ip {
                owner.insert(
                    SvcKey::new(ip, fe.port, proto_number(e.protocol)),
                    (name.to_string(), fe.kind),
                );
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
    services.sort_by_key(|(k, _)| (k.ip(), k.port(), k.proto));
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
        let action = if v.count == 0 { " reject" } else { "" };
        let _ = writeln!(
            out,
            "service {}:{}/{} id={} count={}{}{}  # {} {}",
            k.ip(),
            k.port(),
            proto_name(k.proto),
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
        let ops = diff(prev, next);
        let mut cur = prev.clone();
        for op in &ops {
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
}
