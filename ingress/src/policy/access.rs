//! Who may use a route, and how often: source allow/deny lists, basic and
//! external authentication, client certificates, CORS and rate limits.

use ferry_cluster::Snapshot;

use super::Reader;

/// The access settings of one Ingress (nothing set: everything allowed).
#[derive(Debug, Default)]
pub struct AccessPolicy {}

impl AccessPolicy {
    pub fn parse(_snap: &Snapshot, _r: &mut Reader<'_>) -> AccessPolicy {
        AccessPolicy {}
    }

    pub fn describe(&self) -> Vec<String> {
        Vec::new()
    }
}
