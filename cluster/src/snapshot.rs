//! `Snapshot`: one immutable, consistent view of the cluster, shared as
//! `Arc<Snapshot>` by the proxy, DNS and ingress compile steps.
//!
//! It also owns the endpoint rules every consumer must apply the same way:
//! which slices belong to a Service, how a Service port maps to slice ports
//! (named target ports), and "ready, else serving and terminating".

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::*;
use crate::store::Shared;

/// One dialable endpoint of one Service port, merged across slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    /// The slice's port: already the resolved target port.
    pub port: u16,
    pub conditions: Conditions,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub pod_name: Option<String>,
    pub app_protocol: Option<String>,
}

/// The backends a consumer should use: the ready ones; when none is ready,
/// the ones that are serving and terminating (graceful termination, as
/// kube-proxy does). Order is preserved.
pub fn usable(backends: &[Backend]) -> Vec<Backend> {
    let ready: Vec<Backend> = backends.iter().filter(|b| b.conditions.ready).cloned().collect();
    if !ready.is_empty() {
        return ready;
    }
    backends
        .iter()
        .filter(|b| b.conditions.serving && b.conditions.terminating)
        .cloned()
        .collect()
}

#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Increases by one with every publish.
    pub generation: u64,
    pub(crate) services: Shared<ObjectKey, Arc<Service>>,
    /// Slices indexed by the Service they belong to (namespace + label).
    pub(crate) slices_by_service: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>>,
    pub(crate) slice_count: usize,
    pub(crate) ingresses: Shared<ObjectKey, Arc<Ingress>>,
    pub(crate) ingress_classes: Shared<String, Arc<IngressClass>>,
    pub(crate) secrets: Shared<ObjectKey, Arc<Secret>>,
    pub(crate) pods: Shared<ObjectKey, Arc<Pod>>,
    pub(crate) nodes: Shared<String, Arc<Node>>,
    pub(crate) namespaces: Shared<String, Arc<Namespace>>,
}

impl Snapshot {
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services.get(&ObjectKey::new(namespace, name))
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every EndpointSlice of the Service (possibly several), in name order.
    pub fn slices(&self, service: &ObjectKey) -> &[Arc<EndpointSlice>] {
        self.slices_by_service.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn slice_count(&self) -> usize {
        self.slice_count
    }

    /// All endpoints of `port` of `svc`, merged across slices and deduplicated
    /// by (IP, port): during slice updates the same endpoint can briefly sit
    /// in two slices. Slice ports match by the Service port's name (the
    /// EndpointSlice controller names them so); for hand-written slices a
    /// slice port named like a named `targetPort` is accepted too. The
    /// protocol must match.
    pub fn backends(&self, svc: &Service, port: &ServicePort) -> Vec<Backend> {
        let mut out: Vec<Backend> = Vec::new();
        for slice in self.slices(&svc.key) {
            let Some(sp) = slice_port_for(slice, port) else {
                continue;
            };
            for ep in &slice.endpoints {
                // Dual-stack endpoints carry one address per slice family;
                // the first address is the one the API says to use.
                let Some(ip) = ep.addresses.first().copied() else {
                    continue;
                };
                if out.iter().any(|b| b.ip == ip && b.port == sp.port) {
                    continue;
                }
                out.push(Backend {
                    ip,
                    port: sp.port,
                    conditions: ep.conditions,
                    hostname: ep.hostname.clone(),
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    pod_name: ep.pod_name.clone(),
                    app_protocol: sp.app_protocol.clone().or_else(|| port.app_protocol.clone()),
                });
            }
        }
        out
    }

    /// `usable(backends(..))`.
    pub fn usable_backends(&self, svc: &Service, port: &ServicePort) -> Vec<Backend> {
        usable(&self.backends(svc, port))
    }

    pub fn ingresses(&self) -> impl Iterator<Item = &Arc<Ingress>> {
        self.ingresses.values()
    }

    pub fn ingress(&self, namespace: &str, name: &str) -> Option<&Arc<Ingress>> {
        self.ingresses.get(&ObjectKey::new(namespace, name))
    }

    /// Ingresses whose class (spec or legacy annotation) is `class`.
    pub fn ingresses_of_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a Arc<Ingress>> + 'a {
        self.ingresses
            .values()
            .filter(move |i| i.class_name.as_deref() == Some(class))
    }

    pub fn ingress_classes(&self) -> impl Iterator<Item = &Arc<IngressClass>> {
        self.ingress_classes.values()
    }

    pub fn ingress_class(&self, name: &str) -> Option<&Arc<IngressClass>> {
        self.ingress_classes.get(name)
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Arc<Secret>> {
        self.secrets.get(&ObjectKey::new(namespace, name))
    }

    pub fn secrets(&self) -> impl Iterator<Item = &Arc<Secret>> {
        self.secrets.values()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pods.get(&ObjectKey::new(namespace, name))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.get(name)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.namespaces.values()
    }

    pub fn has_namespace(&self, name: &str) -> bool {
        self.namespaces.contains_key(name)
    }

    /// Objects per kind, for metrics and `render --what summary`.
    pub fn counts(&self) -> [(Kind, usize); 8] {
        [
            (Kind::Service, self.services.len()),
            (Kind::EndpointSlice, self.slice_count),
            (Kind::Ingress, self.ingresses.len()),
            (Kind::IngressClass, self.ingress_classes.len()),
            (Kind::Secret, self.secrets.len()),
            (Kind::Pod, self.pods.len()),
            (Kind::Node, self.nodes.len()),
            (Kind::Namespace, self.namespaces.len()),
        ]
    }

    /// Builds a snapshot directly from objects (tests, benches, `render`).
    /// Later duplicates replace earlier ones, as an apply would.
    pub fn from_objects(generation: u64, objects: impl IntoIterator<Item = Object>) -> Snapshot {
        let mut store = crate::store::Store::default();
        for o in objects {
            store.apply(o);
        }
        store.snapshot(generation)
    }
}

fn slice_port_for<'a>(slice: &'a EndpointSlice, port: &ServicePort) -> Option<&'a EndpointPort> {
    let by_name = slice
        .ports
        .iter()
        .find(|sp| sp.name == port.name && sp.protocol == port.protocol);
    if by_name.is_some() {
        return by_name;
    }
    match &port.target_port {
        TargetPort::Name(n) => slice
            .ports
            .iter()
            .find(|sp| &sp.name == n && sp.protocol == port.protocol),
        TargetPort::Number(_) => None,
    }
}
