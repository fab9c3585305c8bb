//! ferry's ingress (L7).
//!
//! A pure `RouteTable` (and `CertStore`) compiled from a cluster `Snapshot`,
//! and a hyper/rustls reverse proxy reading them lock-free through
//! `ArcSwap`. `routes` and `tls` are the compile steps; `proxy` and
//! `upstream` are the request path; `status` writes Ingress status
//! and `events` Kubernetes Events for configuration problems.

pub mod access_log;
mod answer;
mod bytes_fmt;
pub mod conn;
pub mod echo;
pub mod error;
pub mod events;
pub mod h1;
pub mod h1_server;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod run;
pub mod status;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tls_conn;
pub mod upstream;

pub use conn::Limits;
pub use error::IngressError;
pub use metrics::IngressMetrics;
pub use proxy::{Engine, EngineConfig, Listeners};
pub use routes::{compile, ClassSelection, LbMethod, RouteTable};

/// The IngressClass `spec.controller` value that selects ferry.
pub const DEFAULT_CONTROLLER_NAME: &str = "ferry.dev/ingress-controller";
