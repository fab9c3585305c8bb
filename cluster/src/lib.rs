//! ferry's view of the cluster.
//!
//! Sources (the apiserver through kube-runtime watchers, or YAML files) emit
//! `Change`s; the `Publisher` folds them into a `Store` and publishes
//! immutable `Arc<Snapshot>`s that the proxy, DNS and ingress compile steps
//! read. Data flows one way: sources → snapshot → tables → world.

pub mod admin;
pub mod convert;
pub mod error;
pub mod files;
pub mod kube;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod net;
pub mod publish;
pub mod snapshot;
pub mod store;
pub mod summary;
pub mod yaml;

pub use error::{InvalidObject, SourceError};
pub use metrics::ClusterMetrics;
pub use model::*;
pub use publish::{ChangeTx, Publisher, SnapshotRx, DEFAULT_DEBOUNCE};
pub use snapshot::{usable, Backend, Snapshot};
pub use store::{Change, Store};
