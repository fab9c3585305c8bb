//! ferry's Service proxy (L4).
//!
//! Two halves, as everywhere in ferry: a pure planner (`table::plan`) from a
//! cluster `Snapshot` to a `ServiceTable`, and dataplanes (`Dataplane`) that
//! make the kernel match that table: `iptables`, `nftables` and `ebpf`.
//! `run` is the loop that drives a dataplane from the snapshot stream.

pub mod dataplane;
pub mod ebpf;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod health;
pub mod iptables;
pub mod nftables;
pub mod replan;
pub mod run;
pub mod table;

pub use dataplane::{Dataplane, FakeDataplane, SyncReport};
pub use error::ProxyError;
pub use table::{
    plan, Backend, EmptyAction, Frontend, FrontendKind, HealthCheck, NodeConfig, PlanWarning, ServiceEntry,
    ServicePortName, ServiceTable,
};

use ferry_cluster::{Service, ServiceType};

/// Whether kube-proxy semantics give this Service any forwarding rules:
/// headless and ExternalName Services never do, nor do Services that another
/// proxy claims through `service.kubernetes.io/service-proxy-name`.
pub fn is_proxied(svc: &Service) -> bool {
    svc.type_ != ServiceType::ExternalName
        && !svc.headless
        && svc.service_proxy_name.is_none()
        && !svc.cluster_ips.is_empty()
}
