//! The `Dataplane` trait every backend (iptables, eBPF, the fake one used in
//! tests) implements, and `FakeDataplane`.
//!
//! A dataplane owns the difference between the table it last applied and
//! the one it is given: a partial sync (`full == false`) may touch only what
//! changed; a full sync rewrites everything it owns. The caller (the sync
//! loop) decides when to force a full sync: at start, periodically, and
//! after any failure or a failed `check`.

use crate::error::ProxyError;
use crate::table::ServiceTable;

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub full: bool,
    /// Rules (iptables) or map entries (eBPF) now programmed in total.
    pub rules: usize,
    /// Service ports written by this sync (all of them on a full sync).
    pub services_written: usize,
    /// Service ports removed by this sync.
    pub services_removed: usize,
}

pub trait Dataplane: Send {
    /// `iptables`, `ebpf`, `fake`.
    fn name(&self) -> &'static str;
    /// Makes the kernel match `table`.
    fn sync(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, ProxyError>;
    /// Whether our state is still in place (canary); `Ok(false)` asks the
    /// caller for a full sync because someone removed what we programmed.
    fn check(&mut self) -> Result<bool, ProxyError> {
        Ok(true)
    }
    /// Removes everything this dataplane ever programmed.
    fn cleanup(&mut self) -> Result<(), ProxyError>;
}

/// Records every sync; for tests of the sync loop.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub synced: Vec<(ServiceTable, bool)>,
    pub cleaned: bool,
    /// When set, the next sync fails with this message (then clears).
    pub fail_next: Option<String>,
}

impl Dataplane for FakeDataplane {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn sync(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, ProxyError> {
        if let Some(msg) = self.fail_next.take() {
            return Err(ProxyError::Other(msg));
        }
        self.synced.push((table.clone(), full));
        Ok(SyncReport {
            full,
            rules: table.services.len(),
            services_written: table.services.len(),
            services_removed: 0,
        })
    }

    fn cleanup(&mut self) -> Result<(), ProxyError> {
        self.cleaned = true;
        Ok(())
    }
}
