//! `EbpfDataplane`: the `Dataplane` for `--mode ebpf`. Opens (or adopts) the
//! socket LB on first sync, keeps the entries it last wrote in memory so a
//! partial sync is compile + diff + the few changed map writes, and re-reads
//! the maps on a full sync (the kernel is the truth after a restart).

use std::path::PathBuf;

use super::entries::{compile, diff, MapEntries, Op};
use super::loader::{cgroup2_root, cleanup, EbpfError, SockLb};
use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::table::ServiceTable;

#[derive(Debug)]
pub struct EbpfDataplane {
    dir: PathBuf,
    cgroup: Option<PathBuf>,
    lb: Option<SockLb>,
    current: Option<MapEntries>,
}

impl EbpfDataplane {
    /// `dir`: bpffs pin directory; `cgroup`: where to attach (default: the
    /// root of the cgroup2 mount, so every process on the node is served).
    pub fn new(dir: PathBuf, cgroup: Option<PathBuf>) -> Self {
        Self {
            dir,
            cgroup,
            lb: None,
            current: None,
        }
    }

    /// Whether the last open adopted pinned links instead of loading.
    pub fn adopted(&self) -> Option<bool> {
        self.lb.as_ref().map(|lb| lb.adopted)
    }

    fn lb(&mut self) -> Result<&mut SockLb, EbpfError> {
        if self.lb.is_none() {
            let cgroup = match &self.cgroup {
                Some(c) => c.clone(),
                None => cgroup2_root()?,
            };
            let lb = SockLb::open(&self.dir, &cgroup)?;
            tracing::info!(dir = %self.dir.display(), cgroup = %cgroup.display(), adopted = lb.adopted, "eBPF socket LB ready");
            self.lb = Some(lb);
        }
        match self.lb.as_mut() {
            Some(lb) => Ok(lb),
            None => Err(EbpfError::Cgroup {
                path: self.dir.clone(),
                reason: "socket LB not open".into(),
            }),
        }
    }

    fn sync_inner(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, EbpfError> {
        let cached = if full { None } else { self.current.take() };
        let lb = self.lb()?;
        let prev = match cached {
            Some(c) => c,
            None => lb.read()?,
        };
        let (next, skipped) = compile(table, &prev);
        if skipped.ipv6_frontends > 0 {
            tracing::debug!(
                frontends = skipped.ipv6_frontends,
                "IPv6 frontends are not served by the eBPF socket LB"
            );
        }
        let ops = diff(&prev, &next);
        lb.apply(&ops)?;
        let services_written = ops.iter().filter(|o| matches!(o, Op::PutService(..))).count();
        let services_removed = ops.iter().filter(|o| matches!(o, Op::DeleteService(..))).count();
        let rules = next.len();
        self.current = Some(next);
        Ok(SyncReport {
            full,
            rules,
            services_written,
            services_removed,
        })
    }
}

fn to_proxy(e: EbpfError) -> ProxyError {
    match e {
        EbpfError::Bpffs { .. } | EbpfError::Cgroup { .. } | EbpfError::Load(_) | EbpfError::Program { .. } => {
            ProxyError::Unsupported(e.to_string())
        }
        other => ProxyError::Other(other.to_string()),
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn sync(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, ProxyError> {
        // On failure `current` stays None: the next sync re-reads the maps.
        self.sync_inner(table, full).map_err(to_proxy)
    }

    /// The canary: our link pins. If someone removed them, the programs
    /// may be detached; drop our handles so the next (full) sync reloads.
    fn check(&mut self) -> Result<bool, ProxyError> {
        if self.lb.is_none() {
            return Ok(true);
        }
        let intact = ferry_ebpf::SOCK_PROGRAMS
            .iter()
            .all(|p| self.dir.join(format!("link_{p}")).exists());
        if !intact {
            self.lb = None;
            self.current = None;
        }
        Ok(intact)
    }

    fn cleanup(&mut self) -> Result<(), ProxyError> {
        self.lb = None;
        self.current = None;
        let removed = cleanup(&self.dir).map_err(to_proxy)?;
        tracing::info!(dir = %self.dir.display(), removed, "eBPF pins removed");
        Ok(())
    }
}
