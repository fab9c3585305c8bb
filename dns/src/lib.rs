//! ferry's cluster DNS.
//!
//! `zone` is the pure compile step (Snapshot → `Zone`) and the lookup;
//! `wire` turns a request packet into a reply or a forwarding decision
//! (pure, the fuzzed request path); `forward` talks to upstream nameservers
//! with a TTL cache; `server` owns the sockets, the `ArcSwap<Zone>` and the
//! task that rebuilds the zone on each snapshot; `takeover` answers the
//! cluster DNS Service's ClusterIPs on this node (local addresses, `link`);
//! `metrics` what they count; `run` starts it all from `Options`.

pub mod error;
pub mod fast;
pub mod forward;
pub mod gate;
pub mod link;
pub mod metrics;
pub mod resolv;
pub mod run;
pub mod server;
pub mod takeover;
pub mod udp;
pub mod wire;
pub mod zone;

pub use error::DnsError;
pub use forward::{Forwarder, ForwarderConfig};
pub use metrics::DnsMetrics;
pub use server::{BoundSockets, DnsServer, ServerConfig, TcpLimits};
pub use udp::default_workers;
pub use zone::{master_file, Lookup, PodMode, Zone, ZoneConfig};

/// The default cluster domain, as kubeadm configures it.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// `<svc>.<ns>.svc.<domain>`, the name a Service answers to.
pub fn service_fqdn(service: &str, namespace: &str, domain: &str) -> String {
    format!("{service}.{namespace}.svc.{domain}")
}
