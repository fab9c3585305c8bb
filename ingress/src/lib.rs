//! ferry's ingress (L7).
//!
//! A pure `RouteTable` compiled from a cluster `Snapshot` and a hyper/rustls
//! reverse proxy reading it lock-free. Built by the ingress issue; this crate
//! so far holds the controller name ferry answers to.

/// The IngressClass `spec.controller` value that selects ferry.
pub const DEFAULT_CONTROLLER_NAME: &str = "ferry.dev/ingress-controller";
