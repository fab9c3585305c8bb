//! The planner's output, `ServiceTable`, and the planner itself (`plan`).
//!
//! The table is what every dataplane (iptables, eBPF, the fake one in tests)
//! programs: one `ServiceEntry` per Service port and protocol, with its
//! frontends (the addresses traffic arrives on), its backends, and the
//! policies already resolved — which backends serve internal and which serve
//! external traffic, what to do when that set is empty (reject or drop),
//! affinity, masquerading. Dataplanes never read the Snapshot: every
//! Kubernetes rule lives here, once, as a pure function tested without root.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ferry_cluster::{ObjectKey, Protocol, SessionAffinity, Snapshot};
use ipnet::IpNet;

/// What the planner needs to know about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
    /// Addresses NodePorts listen on. Empty: the Node object's addresses.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs of the cluster. Traffic to a ClusterIP from outside them is
    /// masqueraded; traffic from inside them to an external frontend of an
    /// `externalTrafficPolicy: Local` service may use every endpoint.
    /// Empty: the pod CIDRs of the cluster's Nodes (`spec.podCIDRs`), as
    /// kube-proxy's `--detect-local-mode=NodeCIDR` but for every node; when
    /// no Node has one either, ClusterIP traffic is masqueraded only for
    /// hairpin (kube-proxy without `--cluster-cidr` and `--masquerade-all`).
    pub cluster_cidrs: Vec<IpNet>,
    /// Only node IPs inside these CIDRs get NodePorts (empty: all node IPs).
    pub nodeport_addresses: Vec<IpNet>,
    /// Also serve NodePorts on 127.0.0.1. Off by default, as in current
    /// kube-proxy: DNAT of a loopback-sourced packet to a pod requires
    /// `net.ipv4.conf.all.route_localnet=1`, which lets packets with 127/8
    /// addresses be routed off the host and so exposes services bound to
    /// localhost to the node's neighbours (CVE-2020-8558). Opt in knowingly.
    pub localhost_nodeports: bool,
    /// The cluster DNS Service that this node answers itself (`ferry node
    /// --dns-service`): its ClusterIPs on port 53 are local addresses of
    /// ferry's DNS, so the proxy programs nothing for them.
    pub local_dns: Option<ObjectKey>,
}

/// DNS port of the cluster DNS Service that `NodeConfig::local_dns` leaves
/// to the node's own DNS server.
const DNS_PORT: u16 = 53;

/// `namespace/name:port-name/PROTOCOL`: one Service port, the unit every
/// dataplane programs (kube-proxy's `ServicePortName`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub service: ObjectKey,
    /// Empty for an unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.service, self.port, self.protocol)
    }
}

/// How traffic reaches a frontend; decides which backends and which
/// masquerade rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// Everything but ClusterIP is "external" traffic in Kubernetes' terms
    /// (subject to `externalTrafficPolicy`).
    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "cluster-ip",
            FrontendKind::NodePort => "node-port",
            FrontendKind::ExternalIp => "external-ip",
            FrontendKind::LoadBalancer => "load-balancer",
        }
    }
}

/// An address and port on which a service port accepts traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub kind: FrontendKind,
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// The endpoint may be on this node: it is local, or its node is
    /// unknown (no `nodeName`, or this node's own name is unknown, see
    /// `node_known`). Hairpin masquerade covers every such endpoint, as
    /// kube-proxy's covers all; `Local` traffic policies use `local` only.
    pub hairpin: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// What to do with a new connection when the backend set it would use is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyAction {
    /// The service has no usable endpoint at all: refuse fast (TCP RST /
    /// ICMP port unreachable), as kube-proxy does.
    Reject,
    /// A `Local` traffic policy and no local endpoint while remote ones
    /// exist: drop, so the client (or the load balancer's health check)
    /// tries elsewhere, as kube-proxy does.
    Drop,
}

/// Everything a dataplane needs for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub name: ServicePortName,
    pub protocol: Protocol,
    /// ClusterIPs first, then NodePorts, externalIPs, LB IPs (sorted within kind).
    pub frontends: Vec<Frontend>,
    /// The usable endpoints cluster-wide: ready ones, else serving+terminating ones.
    pub backends: Vec<Backend>,
    /// The usable endpoints on this node, by the same rule applied to local ones only.
    pub local_backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`: seconds a client stays pinned to its backend.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` (only where it applies: NodePort/LB services).
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// Port of the health-check server for `externalTrafficPolicy: Local` LB services.
    pub health_check_node_port: Option<u16>,
}

impl ServiceEntry {
    /// Backends for traffic from inside the cluster to a ClusterIP.
    pub fn internal_backends(&self) -> &[Backend] {
        if self.internal_local {
            &self.local_backends
        } else {
            &self.backends
        }
    }

    /// Backends for traffic from outside to a NodePort / externalIP / LB IP.
    /// (Pods and the node itself reaching an external frontend of a
    /// `Local` service use `backends`: kube-proxy's short-circuit, since
    /// their source address needs no preserving.)
    pub fn external_backends(&self) -> &[Backend] {
        if self.external_local {
            &self.local_backends
        } else {
            &self.backends
        }
    }

    pub fn backends_for(&self, kind: FrontendKind) -> &[Backend] {
        if kind.is_external() {
            self.external_backends()
        } else {
            self.internal_backends()
        }
    }

    /// `None` when `backends_for(kind)` is non-empty.
    pub fn empty_action(&self, kind: FrontendKind) -> Option<EmptyAction> {
        if !self.backends_for(kind).is_empty() {
            None
        } else if self.backends.is_empty() {
            Some(EmptyAction::Reject)
        } else {
            Some(EmptyAction::Drop)
        }
    }

    /// External traffic is masqueraded unless `externalTrafficPolicy: Local`
    /// asks to preserve the client address (which is safe because it only
    /// goes to local endpoints, whose replies pass back through this node).
    pub fn masquerade_external(&self) -> bool {
        !self.external_local
    }

    pub fn has_frontend(&self, kind: FrontendKind) -> bool {
        self.frontends.iter().any(|f| f.kind == kind)
    }
}

/// A health-check server for an `externalTrafficPolicy: Local` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    /// Local usable endpoints (over all ports of the service, deduplicated by IP).
    pub local_endpoints: usize,
}

/// The planner's output: what the node should do with service traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    pub services: BTreeMap<ServicePortName, ServiceEntry>,
    /// healthCheckNodePort → the service it reports on.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Pod CIDRs (from `NodeConfig`), for masquerade decisions.
    pub cluster_cidrs: Vec<IpNet>,
    /// The node IPs NodePorts were planned on.
    pub node_ips: Vec<IpAddr>,
}

impl ServiceTable {
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|e| e.backends.len()).sum()
    }

    /// The service ports whose entries differ between this table and
    /// `next` (changed, added or gone), in name order: one walk in step
    /// over the two sorted maps, no lookups.
    pub fn differing_ports<'a>(&'a self, next: &'a ServiceTable) -> Vec<&'a ServicePortName> {
        let mut differ = Vec::new();
        let (mut old, mut new) = (self.services.iter().peekable(), next.services.iter().peekable());
        loop {
            let step = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ko, _)), Some((kn, _))) => ko.cmp(kn),
            };
            match step {
                Ordering::Less => differ.extend(old.next().map(|(k, _)| k)),
                Ordering::Greater => differ.extend(new.next().map(|(k, _)| k)),
                Ordering::Equal => {
                    if let (Some((k, eo)), Some((_, en))) = (old.next(), new.next()) {
                        if eo != en {
                            differ.push(k);
                        }
                    }
                }
            }
        }
        differ
    }

    /// Makes this table equal to `next`, cloning only the service ports
    /// that differ: what a dataplane keeps as "last applied" after a sync,
    /// without a deep copy of every entry each time (at 10k services a
    /// whole clone is some 100k allocations and 6.5 ms, most of it for
    /// ports that did not change; this is 1.8 ms).
    pub fn assign_from(&mut self, next: &ServiceTable) {
        let differ: Vec<ServicePortName> = self.differing_ports(next).into_iter().cloned().collect();
        for k in differ {
            match next.services.get(&k) {
                None => {
                    self.services.remove(&k);
                }
                Some(e) => match self.services.get_mut(&k) {
                    Some(old) => old.clone_from(e),
                    None => {
                        self.services.insert(k, e.clone());
                    }
                },
            }
        }
        self.health_checks.clone_from(&next.health_checks);
        self.cluster_cidrs.clone_from(&next.cluster_cidrs);
        self.node_ips.clone_from(&next.node_ips);
    }
}

/// Something the planner skipped or could not honour, naming object and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanWarning {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.object, self.field, self.message)
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Whether this node can tell its endpoints from other nodes' by
/// `nodeName`: false when it has no name, or when the snapshot has Node
/// objects and none carries its name (a wrong `--node-name`). In files
/// without Node objects the configured name is trusted.
pub fn node_known(snap: &Snapshot, node: &NodeConfig) -> bool {
    !node.node_name.is_empty() && (snap.node(&node.node_name).is_some() || snap.nodes().next().is_none())
}

/// `--cluster-cidr`, else every Node's `spec.podCIDRs` (sorted, without
/// duplicates; unparsable ones skipped: the Node object is the apiserver's,
/// which validates them).
pub fn cluster_cidrs(snap: &Snapshot, node: &NodeConfig) -> Vec<IpNet> {
    if !node.cluster_cidrs.is_empty() {
        return node.cluster_cidrs.clone();
    }
    let mut cidrs: Vec<IpNet> = snap
        .nodes()
        .flat_map(|n| n.pod_cidrs.iter().filter_map(|c| c.parse::<IpNet>().ok()))
        .map(|c| c.trunc())
        .collect();
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// Plans the node's service table from a snapshot. Pure: no I/O.
pub fn plan(snap: &Snapshot, node: &NodeConfig) -> (ServiceTable, Vec<PlanWarning>) {
    let mut warnings = Vec::new();
    let mut node_ips: Vec<IpAddr> = if node.node_ips.is_empty() {
        snap.node(&node.node_name).map(|n| n.ips()).unwrap_or_default()
    } else {
        node.node_ips.clone()
    };
    if !node.nodeport_addresses.is_empty() {
        node_ips.retain(|ip| node.nodeport_addresses.iter().any(|c| c.contains(ip)));
    }
    let mut nodeport_ips = node_ips.clone();
    if node.localhost_nodeports {
        nodeport_ips.push(IpAddr::from([127, 0, 0, 1]));
    }
    nodeport_ips.sort();
    nodeport_ips.dedup();

    let mut table = ServiceTable {
        cluster_cidrs: cluster_cidrs(snap, node),
        node_ips: nodeport_ips.clone(),
        ..ServiceTable::default()
    };
    let mut warned_no_node_ip = false;
    let known = node_known(snap, node);

    for svc in snap.services() {
        if !crate::is_proxied(svc) {
            continue;
        }
        let affinity_timeout = match svc.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout_seconds } => Some(timeout_seconds),
        };
        // eTP only means something for services reachable from outside.
        let externally_reachable = svc.type_ != ferry_cluster::ServiceType::ClusterIp
            || !svc.external_ips.is_empty()
            || !svc.load_balancer_ips.is_empty();
        let external_local = svc.external_traffic_local && externally_reachable;
        let mut local_ips_of_service: Vec<IpAddr> = Vec::new();

        for port in &svc.ports {
            let name = ServicePortName {
                service: svc.key.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            };
            let mut frontends = Vec::new();
            let answered_locally = port.port == DNS_PORT
                && matches!(port.protocol, Protocol::Udp | Protocol::Tcp)
                && node.local_dns.as_ref() == Some(&svc.key);
            for ip in svc.cluster_ips.iter().filter(|_| !answered_locally) {
                frontends.push(Frontend {
                    ip: *ip,
                    port: port.port,
                    kind: FrontendKind::ClusterIp,
                });
            }
            if let Some(np) = port.node_port {
                if svc.type_ == ferry_cluster::ServiceType::ClusterIp {
                    // kube-proxy ignores a stray nodePort on a ClusterIP service.
                } else if nodeport_ips.is_empty() {
                    if !warned_no_node_ip {
                        warnings.push(PlanWarning {
                            object: format!("Node {}", node.node_name),
                            field: "status.addresses".into(),
                            message: "no node IP known (pass --node-ip); NodePorts are not served".into(),
                        });
                        warned_no_node_ip = true;
                    }
                } else {
                    for ip in &nodeport_ips {
                        frontends.push(Frontend {
                            ip: *ip,
                            port: np,
                            kind: FrontendKind::NodePort,
                        });
                    }
                }
            }
            let mut ext: Vec<IpAddr> = svc.external_ips.clone();
            ext.sort();
            ext.dedup();
            for ip in ext {
                frontends.push(Frontend {
                    ip,
                    port: port.port,
                    kind: FrontendKind::ExternalIp,
                });
            }
            let mut lbs: Vec<IpAddr> = svc.load_balancer_ips.clone();
            lbs.sort();
            lbs.dedup();
            for ip in lbs {
                frontends.push(Frontend {
                    ip,
                    port: port.port,
                    kind: FrontendKind::LoadBalancer,
                });
            }

            if answered_locally && frontends.is_empty() {
                continue;
            }
            let all = snap.backends(svc, port);
            let to_backend = |b: &ferry_cluster::Backend| {
                let local = !node.node_name.is_empty() && b.node_name.as_deref() == Some(node.node_name.as_str());
                Backend {
                    ip: b.ip,
                    port: b.port,
                    local,
                    hairpin: local || !known || b.node_name.as_deref().is_none_or(str::is_empty),
                    ready: b.conditions.ready,
                    serving: b.conditions.serving,
                    terminating: b.conditions.terminating,
                }
            };
            // Backends whose family matches no frontend could never be dialled.
            let mut mixed = false;
            let usable: Vec<Backend> = ferry_cluster::usable(&all)
                .iter()
                .map(to_backend)
                .filter(|b| {
                    let ok = frontends.iter().any(|f| same_family(f.ip, b.ip));
                    mixed |= !ok;
                    ok
                })
                .collect();
            if mixed {
                warnings.push(PlanWarning {
                    object: format!("Service {}", svc.key),
                    field: format!("spec.ports[{}]", if port.name.is_empty() { "0" } else { &port.name }),
                    message: "endpoints of an IP family the service has no address in are skipped".into(),
                });
            }
            let local_all: Vec<ferry_cluster::Backend> = all
                .iter()
                .filter(|b| !node.node_name.is_empty() && b.node_name.as_deref() == Some(node.node_name.as_str()))
                .cloned()
                .collect();
            let local_backends: Vec<Backend> = ferry_cluster::usable(&local_all)
                .iter()
                .map(to_backend)
                .filter(|b| frontends.iter().any(|f| same_family(f.ip, b.ip)))
                .collect();
            for b in &local_backends {
                if !local_ips_of_service.contains(&b.ip) {
                    local_ips_of_service.push(b.ip);
                }
            }
            table.services.insert(
                name.clone(),
                ServiceEntry {
                    name,
                    protocol: port.protocol,
                    frontends,
                    backends: usable,
                    local_backends,
                    affinity_timeout,
                    external_local,
                    internal_local: svc.internal_traffic_local,
                    health_check_node_port: if external_local {
                        svc.health_check_node_port
                    } else {
                        None
                    },
                },
            );
        }
        if external_local {
            if let Some(hc) = svc.health_check_node_port {
                if let Some(prev) = table.health_checks.get(&hc) {
                    warnings.push(PlanWarning {
                        object: format!("Service {}", svc.key),
                        field: "spec.healthCheckNodePort".into(),
                        message: format!("port {hc} is already used by {}; skipped", prev.service),
                    });
                } else {
                    table.health_checks.insert(
                        hc,
                        HealthCheck {
                            service: svc.key.clone(),
                            local_endpoints: local_ips_of_service.len(),
                        },
                    );
                }
            }
        }
    }
    (table, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, snapshot};

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
  nodeName: node-a
- addresses: [10.244.2.5]
  conditions: {ready: true}
  nodeName: node-b
- addresses: [10.244.2.6]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-b
"#;

    #[test]
    fn the_locally_answered_dns_service_keeps_only_its_other_frontends() {
        let snap = snapshot(SVC);
        let mut cfg = node();
        cfg.local_dns = Some(ObjectKey::new("shop", "web"));
        let (table, _) = plan(&snap, &cfg);
        let dns = table
            .services
            .values()
            .find(|e| e.name.port == "dns")
            .expect("the NodePort and externalIP of port 53 stay");
        assert!(dns.frontends.iter().all(|f| f.kind != FrontendKind::ClusterIp));
        assert!(
            dns.frontends.iter().any(|f| f.kind == FrontendKind::NodePort)
                || dns.frontends.iter().any(|f| f.kind == FrontendKind::ExternalIp)
        );
        let http = table.services.values().find(|e| e.name.port == "http").unwrap();
        assert!(
            http.frontends.iter().any(|f| f.kind == FrontendKind::ClusterIp),
            "other ports untouched"
        );
        // Another Service's port 53 is proxied as usual.
        cfg.local_dns = Some(ObjectKey::new("kube-system", "kube-dns"));
        assert_eq!(plan(&snap, &cfg).0, plan(&snap, &node()).0);
    }

    #[test]
    fn differing_ports_and_assign_from_follow_the_next_table() {
        let (full, _) = plan(&snapshot(&crate::fixtures::fixture_text()), &node());
        let (small, _) = plan(&snapshot(SVC), &node());
        let mut changed = small.clone();
        if let Some(e) = changed.services.values_mut().next() {
            e.backends.pop();
            e.affinity_timeout = Some(30);
        }
        changed.node_ips.clear();
        assert_ne!(changed, small);
        let first = small.services.keys().next();
        assert_eq!(small.differing_ports(&changed), first.into_iter().collect::<Vec<_>>());
        assert_eq!(small.differing_ports(&small), Vec::<&ServicePortName>::new());
        let gone_and_added = small.differing_ports(&full).len();
        assert_eq!(gone_and_added, small.services.len() + full.services.len());
        let empty = ServiceTable::default();
        // Through growth, a change in place, shrinking and emptying.
        let steps = [&small, &full, &small, &changed, &full, &empty, &changed];
        let mut kept = ServiceTable::default();
        for (i, next) in steps.into_iter().enumerate() {
            kept.assign_from(next);
            assert_eq!(&kept, next, "step {i}");
        }
    }

    fn key(port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: ObjectKey::new("shop", "web"),
            port: port.into(),
            protocol,
        }
    }

    #[test]
    fn cluster_ip_node_port_external_ip_and_backends() {
        let (t, w) = plan(&snapshot(SVC), &node());
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(t.services.len(), 2);
        let http = &t.services[&key("http", Protocol::Tcp)];
        let fe: Vec<(String, u16, FrontendKind)> = http
            .frontends
            .iter()
            .map(|f| (f.ip.to_string(), f.port, f.kind))
            .collect();
        assert_eq!(
            fe,
            vec![
                ("10.96.0.10".into(), 80, FrontendKind::ClusterIp),
                ("192.0.2.10".into(), 30080, FrontendKind::NodePort),
                ("198.51.100.7".into(), 80, FrontendKind::ExternalIp),
            ]
        );
        let bs: Vec<(String, u16, bool)> = http
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.port, b.local))
            .collect();
        assert_eq!(
            bs,
            vec![("10.244.1.5".into(), 8080, true), ("10.244.2.5".into(), 8080, false)]
        );
        assert_eq!(http.local_backends.len(), 1);
        assert_eq!(http.empty_action(FrontendKind::ClusterIp), None);
        let dns = &t.services[&key("dns", Protocol::Udp)];
        assert_eq!(dns.frontends.len(), 2, "no nodePort on the dns port");
        assert_eq!(dns.backends[0].port, 5353);
    }

    #[test]
    fn endpoint_without_node_name_is_hairpin_but_not_local() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: ns, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [10.244.1.5]}\n- {addresses: [10.244.2.5], nodeName: node-b}\n";
        let (t, _) = plan(&snapshot(yaml), &node());
        let e = t.services.values().next().unwrap();
        let flags: Vec<(String, bool, bool)> = e
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.local, b.hairpin))
            .collect();
        assert_eq!(
            flags,
            vec![("10.244.1.5".into(), false, true), ("10.244.2.5".into(), false, false)]
        );
        assert!(
            e.local_backends.is_empty(),
            "no nodeName is not local for Local policies"
        );
        // No node name at all: every endpoint may be local.
        let nameless = NodeConfig {
            node_name: String::new(),
            ..node()
        };
        let (t, _) = plan(&snapshot(yaml), &nameless);
        let e = t.services.values().next().unwrap();
        assert!(e.backends.iter().all(|b| b.hairpin && !b.local));
    }

    #[test]
    fn policies_table() {
        struct Case {
            name: &'static str,
            spec_extra: &'static str,
            endpoints: &'static str,
            want_internal: usize,
            want_external: usize,
            want_internal_empty: Option<EmptyAction>,
            want_external_empty: Option<EmptyAction>,
            want_affinity: Option<u32>,
            want_hc: Option<(u16, usize)>,
        }
        let cases = [
            Case {
                name: "plain",
                spec_extra: "",
                endpoints: "[{addresses: [10.244.1.5], nodeName: node-a}, {addresses: [10.244.2.5], nodeName: node-b}]",
                want_internal: 2,
                want_external: 2,
                want_internal_empty: None,
                want_external_empty: None,
                want_affinity: None,
                want_hc: None,
            },
            Case {
                name: "no endpoints rejects",
                spec_extra: "",
                endpoints: "[]",
                want_internal: 0,
                want_external: 0,
                want_internal_empty: Some(EmptyAction::Reject),
                want_external_empty: Some(EmptyAction::Reject),
                want_affinity: None,
                want_hc: None,
            },
            Case {
                name: "eTP local without local endpoints drops external only",
                spec_extra: "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
                endpoints: "[{addresses: [10.244.2.5], nodeName: node-b}]",
                want_internal: 1,
                want_external: 0,
                want_internal_empty: None,
                want_external_empty: Some(EmptyAction::Drop),
                want_affinity: None,
                want_hc: Some((32000, 0)),
            },
            Case {
                name: "eTP local with a local endpoint",
                spec_extra: "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
                endpoints: "[{addresses: [10.244.1.5], nodeName: node-a}, {addresses: [10.244.2.5], nodeName: node-b}]",
                want_internal: 2,
                want_external: 1,
                want_internal_empty: None,
                want_external_empty: None,
                want_affinity: None,
                want_hc: Some((32000, 1)),
            },
            Case {
                name: "iTP local",
                spec_extra: "internalTrafficPolicy: Local",
                endpoints: "[{addresses: [10.244.2.5], nodeName: node-b}]",
                want_internal: 0,
                want_external: 1,
                want_internal_empty: Some(EmptyAction::Drop),
                want_external_empty: None,
                want_affinity: None,
                want_hc: None,
            },
            Case {
                name: "client ip affinity default timeout",
                spec_extra: "sessionAffinity: ClientIP",
                endpoints: "[{addresses: [10.244.1.5], nodeName: node-a}]",
                want_internal: 1,
                want_external: 1,
                want_internal_empty: None,
                want_external_empty: None,
                want_affinity: Some(10800),
                want_hc: None,
            },
            Case {
                name: "client ip affinity explicit timeout",
                spec_extra: "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}",
                endpoints: "[{addresses: [10.244.1.5], nodeName: node-a}]",
                want_internal: 1,
                want_external: 1,
                want_internal_empty: None,
                want_external_empty: None,
                want_affinity: Some(60),
                want_hc: None,
            },
            Case {
                name: "terminating fallback",
                spec_extra: "",
                endpoints: "[{addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.244.1.6], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}]",
                want_internal: 1,
                want_external: 1,
                want_internal_empty: None,
                want_external_empty: None,
                want_affinity: None,
                want_hc: None,
            },
        ];
        for c in cases {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30001}}]\n  {}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: ns, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {}\n",
                c.spec_extra, c.endpoints
            );
            let (t, w) = plan(&snapshot(&yaml), &node());
            assert!(w.is_empty(), "{}: {w:?}", c.name);
            let e = t.services.values().next().unwrap();
            assert_eq!(e.internal_backends().len(), c.want_internal, "{}", c.name);
            assert_eq!(e.external_backends().len(), c.want_external, "{}", c.name);
            assert_eq!(
                e.empty_action(FrontendKind::ClusterIp),
                c.want_internal_empty,
                "{}",
                c.name
            );
            assert_eq!(
                e.empty_action(FrontendKind::NodePort),
                c.want_external_empty,
                "{}",
                c.name
            );
            assert_eq!(e.affinity_timeout, c.want_affinity, "{}", c.name);
            let hc = t.health_checks.iter().next().map(|(p, h)| (*p, h.local_endpoints));
            assert_eq!(hc, c.want_hc, "{}", c.name);
        }
    }

    #[test]
    fn headless_external_name_and_foreign_proxy_get_nothing() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: h}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: x}
spec: {type: ExternalName, externalName: example.org}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: someone-else}}
spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}
"#;
        let (t, _) = plan(&snapshot(yaml), &node());
        assert!(t.services.is_empty(), "{:?}", t.services.keys().collect::<Vec<_>>());
    }

    #[test]
    fn localhost_nodeports_and_nodeport_addresses() {
        let mut n = node();
        n.node_ips.push("203.0.113.4".parse().unwrap());
        n.nodeport_addresses = vec!["203.0.113.0/24".parse().unwrap()];
        n.localhost_nodeports = true;
        let (t, _) = plan(&snapshot(SVC), &n);
        let http = &t.services[&key("http", Protocol::Tcp)];
        let np: Vec<String> = http
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::NodePort)
            .map(|f| f.ip.to_string())
            .collect();
        assert_eq!(np, vec!["127.0.0.1", "203.0.113.4"]);
    }

    #[test]
    fn node_ips_from_node_object_and_warning_without() {
        let mut n = node();
        n.node_ips.clear();
        let (t, w) = plan(&snapshot(SVC), &n);
        assert!(!t.services[&key("http", Protocol::Tcp)].has_frontend(FrontendKind::NodePort));
        assert_eq!(w.len(), 1);
        assert!(w[0].to_string().contains("--node-ip"), "{}", w[0]);
        let with_node = format!(
            "{SVC}---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.0.2.99}}]}}\n"
        );
        let (t, w) = plan(&snapshot(&with_node), &n);
        assert!(w.is_empty(), "{w:?}");
        assert!(t.services[&key("http", Protocol::Tcp)]
            .frontends
            .iter()
            .any(|f| f.kind == FrontendKind::NodePort && f.ip.to_string() == "192.0.2.99"));
    }
}
