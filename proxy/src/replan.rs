//! Incremental planning: keeps the last `ServiceTable` and, given the next
//! snapshot, re-plans only the Services whose Service object or
//! EndpointSlices changed, so an endpoint change at 10k services costs a
//! walk over the snapshot (pointer or value comparisons) instead of a full
//! `plan`.
//!
//! Each changed Service is planned by `plan` itself over a one-service
//! snapshot (the Service, its slices and this node's Node object), so the
//! per-service rules live in one place. What a one-service plan cannot see
//! is the cross-service `healthCheckNodePort` conflict check: a changed
//! Service gets its port when it is free; the periodic full sync re-plans
//! whole and settles conflicts in `plan`'s order.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_cluster::{EndpointSlice, Object, ObjectKey, Protocol, Snapshot};

use crate::table::{node_known, plan, NodeConfig, PlanWarning, ServicePortName, ServiceTable};

#[derive(Debug, Default)]
pub struct Replanner {
    prev: Option<Arc<Snapshot>>,
    table: ServiceTable,
}

/// What `Replanner::update` did.
#[derive(Debug, Default)]
pub struct Replanned {
    pub warnings: Vec<PlanWarning>,
    /// Planned the whole snapshot (else only `services` changed Services).
    pub whole: bool,
    pub services: usize,
}

fn same_slices(a: &[Arc<EndpointSlice>], b: &[Arc<EndpointSlice>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

impl Replanner {
    /// The table as of the last `update`.
    pub fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// Brings the table up to `snap`; `whole` forces a full `plan`.
    pub fn update(&mut self, snap: &Arc<Snapshot>, node: &NodeConfig, whole: bool) -> Replanned {
        let prev = match (&self.prev, whole) {
            (Some(p), false) => p.clone(),
            _ => return self.plan_whole(snap, node),
        };
        // The Node object feeds NodePort addresses to every Service.
        let node_changed = match (prev.node(&node.node_name), snap.node(&node.node_name)) {
            (None, None) => false,
            (Some(a), Some(b)) => !(Arc::ptr_eq(a, b) || a == b),
            _ => true,
        };
        // Whether endpoints of unknown node get hairpin masquerade depends
        // on every Node object, not on one Service; so do the cluster CIDRs
        // when they come from the Nodes' podCIDRs.
        if node_changed
            || node_known(&prev, node) != node_known(snap, node)
            || crate::table::cluster_cidrs(snap, node) != self.table.cluster_cidrs
        {
            return self.plan_whole(snap, node);
        }
        let changed = changed_services(&prev, snap);
        let mut out = Replanned {
            services: changed.len(),
            ..Replanned::default()
        };
        for key in &changed {
            let lower = ServicePortName {
                service: key.clone(),
                port: String::new(),
                protocol: Protocol::Tcp,
            };
            let stale: Vec<ServicePortName> = self
                .table
                .services
                .range(lower..)
                .take_while(|(n, _)| &n.service == key)
                .map(|(n, _)| n.clone())
                .collect();
            for n in stale {
                self.table.services.remove(&n);
            }
            self.table.health_checks.retain(|_, hc| &hc.service != key);
        }
        for key in &changed {
            let Some(svc) = snap.service(&key.namespace, &key.name) else {
                continue;
            };
            let mut objects = vec![Object::Service(svc.clone())];
            objects.extend(snap.slices(key).iter().map(|s| Object::EndpointSlice(s.clone())));
            // This node's Node object; without it, any one Node, so that
            // `plan` sees, as over the whole snapshot, that this node's name
            // is unknown.
            if let Some(n) = snap.node(&node.node_name).or_else(|| snap.nodes().next()) {
                objects.push(Object::Node(n.clone()));
            }
            let one = Snapshot::from_objects(snap.generation, objects);
            let (part, warnings) = plan(&one, node);
            out.warnings.extend(warnings);
            self.table.services.extend(part.services);
            for (port, hc) in part.health_checks {
                if let Some(other) = self.table.health_checks.get(&port) {
                    out.warnings.push(PlanWarning {
                        object: format!("Service {key}"),
                        field: "spec.healthCheckNodePort".into(),
                        message: format!("port {port} is already used by {}; skipped", other.service),
                    });
                } else {
                    self.table.health_checks.insert(port, hc);
                }
            }
        }
        self.prev = Some(snap.clone());
        out
    }

    fn plan_whole(&mut self, snap: &Arc<Snapshot>, node: &NodeConfig) -> Replanned {
        let (table, warnings) = plan(snap, node);
        self.table = table;
        self.prev = Some(snap.clone());
        Replanned {
            warnings,
            whole: true,
            services: snap.service_count(),
        }
    }
}

/// Services added, removed, or whose object or slices differ (by pointer,
/// then by value: the file source re-parses a whole file on a change).
fn changed_services(prev: &Snapshot, next: &Snapshot) -> BTreeSet<ObjectKey> {
    let mut changed = BTreeSet::new();
    let mut a = prev.services().peekable();
    let mut b = next.services().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(x), None) => {
                changed.insert(x.key.clone());
                a.next();
            }
            (None, Some(y)) => {
                changed.insert(y.key.clone());
                b.next();
            }
            (Some(x), Some(y)) => match x.key.cmp(&y.key) {
                std::cmp::Ordering::Less => {
                    changed.insert(x.key.clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.insert(y.key.clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    let same = (Arc::ptr_eq(x, y) || x == y) && same_slices(prev.slices(&x.key), next.slices(&y.key));
                    if !same {
                        changed.insert(x.key.clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::objects;
    use ipnet::IpNet;
    use std::path::Path;

    fn snapshot(generation: u64, yaml: &str) -> Arc<Snapshot> {
        Arc::new(Snapshot::from_objects(
            generation,
            objects(Path::new("test.yaml"), yaml),
        ))
    }

    fn service(name: &str, ip: &str, etp_local: bool, hc: u16, endpoints: &[&str]) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  type: LoadBalancer\n  clusterIP: {ip}\n  externalTrafficPolicy: {}\n  healthCheckNodePort: {hc}\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            if etp_local { "Local" } else { "Cluster" },
            30000 + hc % 1000,
        );
        for e in endpoints {
            y.push_str(&format!("- addresses: [{e}]\n  nodeName: node-a\n"));
        }
        y.push_str("---\n");
        y
    }

    fn node() -> NodeConfig {
        NodeConfig {
            node_name: "node-a".into(),
            node_ips: vec!["192.0.2.10".parse().unwrap()],
            ..NodeConfig::default()
        }
    }

    #[test]
    fn replans_only_changed_services_and_matches_a_full_plan() {
        let steps = [
            vec![
                service("a", "10.96.0.1", false, 0, &["10.244.0.1", "10.244.0.2"]),
                service("b", "10.96.0.2", true, 32001, &["10.244.0.3"]),
                service("c", "10.96.0.3", false, 0, &[]),
            ],
            // An endpoint of a changes.
            vec![
                service("a", "10.96.0.1", false, 0, &["10.244.0.1", "10.244.0.9"]),
                service("b", "10.96.0.2", true, 32001, &["10.244.0.3"]),
                service("c", "10.96.0.3", false, 0, &[]),
            ],
            // b is removed, d added with b's health-check port.
            vec![
                service("a", "10.96.0.1", false, 0, &["10.244.0.1", "10.244.0.9"]),
                service("c", "10.96.0.3", false, 0, &["10.244.0.4"]),
                service("d", "10.96.0.4", true, 32001, &["10.244.0.5"]),
            ],
        ];
        let mut rp = Replanner::default();
        for (i, step) in steps.iter().enumerate() {
            let snap = snapshot(i as u64 + 1, &step.concat());
            let r = rp.update(&snap, &node(), false);
            assert_eq!(r.whole, i == 0);
            if i == 1 {
                assert_eq!(r.services, 1, "only a changed");
            }
            if i == 2 {
                assert_eq!(r.services, 3, "b, c and d changed");
            }
            let (full, _) = plan(&snap, &node());
            assert_eq!(rp.table(), &full, "step {i}");
        }
        // A forced full plan gives the same table.
        let snap = snapshot(9, &steps[2].concat());
        let r = rp.update(&snap, &node(), true);
        assert!(r.whole);
        assert_eq!(rp.table(), &plan(&snap, &node()).0);
    }

    #[test]
    fn node_object_change_replans_whole() {
        let node_yaml = |ip: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n---\n")
        };
        let cfg = NodeConfig {
            node_name: "node-a".into(),
            ..NodeConfig::default()
        };
        let svc = service("a", "10.96.0.1", false, 0, &["10.244.0.1"]);
        let mut rp = Replanner::default();
        rp.update(&snapshot(1, &(node_yaml("192.0.2.10") + &svc)), &cfg, false);
        let snap = snapshot(2, &(node_yaml("192.0.2.11") + &svc));
        let r = rp.update(&snap, &cfg, false);
        assert!(r.whole);
        assert_eq!(rp.table(), &plan(&snap, &cfg).0);
    }

    /// Without --cluster-cidr the table's cluster CIDRs are every Node's
    /// podCIDRs: another node's podCIDR appearing re-plans whole.
    #[test]
    fn pod_cidrs_of_nodes_are_the_cluster_cidrs_and_replan_whole() {
        let node_yaml = |name: &str, cidr: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\n---\n")
        };
        let svc = service("a", "10.96.0.1", false, 0, &["10.88.0.5"]);
        let mut rp = Replanner::default();
        let first = snapshot(1, &(node_yaml("node-a", "10.88.0.0/24") + &svc));
        rp.update(&first, &node(), false);
        assert_eq!(rp.table().cluster_cidrs, vec!["10.88.0.0/24".parse::<IpNet>().unwrap()]);
        let both = node_yaml("node-a", "10.88.0.0/24") + &node_yaml("node-b", "10.88.1.0/24") + &svc;
        let snap = snapshot(2, &both);
        let r = rp.update(&snap, &node(), false);
        assert!(r.whole, "another node's podCIDR changes the table's cluster CIDRs");
        assert_eq!(rp.table(), &plan(&snap, &node()).0);
        assert_eq!(rp.table().cluster_cidrs.len(), 2);
        // --cluster-cidr wins over the Nodes.
        let flag = NodeConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..node()
        };
        assert_eq!(plan(&snap, &flag).0.cluster_cidrs, flag.cluster_cidrs);
    }

    /// With Node objects but none named like this node, every endpoint
    /// gets hairpin masquerade; a one-service re-plan must agree, and the
    /// node's Node object appearing re-plans whole.
    #[test]
    fn unknown_node_name_marks_every_endpoint_hairpin_in_partial_plans() {
        let other = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n---\n";
        let mine = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n";
        let a = |eps: &[&str]| service("a", "10.96.0.1", false, 0, eps);
        let b = service("b", "10.96.0.2", false, 0, &["10.244.0.3"]);
        let mut rp = Replanner::default();
        rp.update(
            &snapshot(1, &(other.to_string() + &a(&["10.244.0.1"]) + &b)),
            &node(),
            false,
        );
        let snap = snapshot(2, &(other.to_string() + &a(&["10.244.0.1", "10.244.0.2"]) + &b));
        let r = rp.update(&snap, &node(), false);
        assert!(!r.whole);
        assert_eq!(rp.table(), &plan(&snap, &node()).0);
        let all_hairpin = |t: &ServiceTable| t.services.values().flat_map(|e| &e.backends).all(|b| b.hairpin);
        assert!(all_hairpin(rp.table()));
        let snap = snapshot(3, &(other.to_string() + mine + &a(&["10.244.0.1", "10.244.0.2"]) + &b));
        let r = rp.update(&snap, &node(), false);
        assert!(r.whole);
        assert_eq!(rp.table(), &plan(&snap, &node()).0);
        // service() puts every endpoint on node-a: all local again.
        assert!(rp
            .table()
            .services
            .values()
            .flat_map(|e| &e.backends)
            .all(|b| b.local && b.hairpin));
    }
}
