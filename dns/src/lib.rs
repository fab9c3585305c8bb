//! ferry's cluster DNS.
//!
//! A pure `Zone` compiled from a cluster `Snapshot`, served by a hickory
//! server; names outside the zone are forwarded upstream. Built by the DNS
//! issue; this crate so far holds the zone's naming rules.

/// The default cluster domain, as kubeadm configures it.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// `<svc>.<ns>.svc.<domain>`, the name a Service answers to.
pub fn service_fqdn(service: &str, namespace: &str, domain: &str) -> String {
    format!("{service}.{namespace}.svc.{domain}")
}
