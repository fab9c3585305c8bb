//! How a route reaches its upstream: canaries, endpoint choice (hashing,
//! cookie affinity, EWMA), the upstream protocol and TLS, and timeouts.

use ferry_cluster::Snapshot;

use super::Reader;

/// The upstream settings of one Ingress (nothing set: the defaults).
#[derive(Debug, Default)]
pub struct BalancePolicy {}

impl BalancePolicy {
    pub fn parse(_snap: &Snapshot, _r: &mut Reader<'_>) -> BalancePolicy {
        BalancePolicy {}
    }

    pub fn describe(&self) -> Vec<String> {
        Vec::new()
    }
}
