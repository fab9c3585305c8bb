//! ferry's Service proxy (L4).
//!
//! Two halves, as everywhere in ferry: a pure planner from a cluster
//! `Snapshot` to a `ServiceTable`, and dataplanes that make the kernel match
//! that table. The planner and dataplanes are built by the proxy issues; this
//! crate so far only names what the proxy serves.

use ferry_cluster::{Service, ServiceType};

/// Whether kube-proxy semantics give this Service any forwarding rules:
/// headless and ExternalName Services never do, nor do Services that another
/// proxy claims through `service.kubernetes.io/service-proxy-name`.
pub fn is_proxied(svc: &Service) -> bool {
    svc.type_ != ServiceType::ExternalName && !svc.headless && svc.service_proxy_name.is_none() && !svc.cluster_ips.is_empty()
}
