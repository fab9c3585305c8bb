//! `EbpfDataplane`: the `Dataplane` for `--mode ebpf`. Opens (or adopts) the
//! socket LB on first sync, keeps what it last wrote (`Incremental`: the
//! entries and, per service port, the entry they came from) so a partial
//! sync compiles only the service ports that changed and writes only their
//! map entries, and re-reads the maps on a full sync (the kernel is the
//! truth after a restart).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use super::cgroup::default_cgroup;
use super::entries::{Incremental, Op};
use super::loader::{attach_tc, cleanup, devices_with, EbpfError, SockLb};
use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::table::ServiceTable;

#[derive(Debug)]
pub struct EbpfDataplane {
    dir: PathBuf,
    cgroup: Option<PathBuf>,
    lb: Option<SockLb>,
    current: Option<Incremental>,
    /// `--devices`; empty: the devices holding the table's IPv4 node IPs.
    devices: Vec<String>,
    /// Devices the TC programs are attached to (None: not yet checked).
    tc_devices: Option<Vec<String>>,
}

impl EbpfDataplane {
    /// `dir`: bpffs pin directory; `cgroup`: where to attach (default:
    /// `default_cgroup`, the root of the cgroup2 hierarchy, so every
    /// process on the node is served).
    pub fn new(dir: PathBuf, cgroup: Option<PathBuf>) -> Self {
        Self {
            dir,
            cgroup,
            lb: None,
            current: None,
            devices: Vec::new(),
            tc_devices: None,
        }
    }

    /// Devices for the TC program (traffic from outside the node).
    pub fn with_devices(mut self, devices: Vec<String>) -> Self {
        self.devices = devices;
        self
    }

    /// Attaches the TC programs (or adopts their pinned links) on the
    /// devices and writes the SNAT address: the first IPv4 node IP.
    fn ensure_tc(&mut self, table: &ServiceTable) -> Result<(), EbpfError> {
        let node_v4: Vec<Ipv4Addr> = table
            .node_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
                _ => None,
            })
            .collect();
        let devices = if self.devices.is_empty() {
            devices_with(&node_v4)?
        } else {
            self.devices.clone()
        };
        if devices.is_empty() {
            if self.tc_devices.is_none() {
                tracing::warn!("no --node-ip on a local device and no --devices: NodePorts are served to this node's own connections only (no TC program)");
            }
        } else {
            let created = attach_tc(&self.dir, &devices, node_v4.first().copied())?;
            if created > 0 {
                tracing::info!(devices = ?devices, links = created, "eBPF TC programs attached");
            }
        }
        self.tc_devices = Some(devices);
        Ok(())
    }

    /// Whether the last open adopted pinned links instead of loading.
    pub fn adopted(&self) -> Option<bool> {
        self.lb.as_ref().map(|lb| lb.adopted)
    }

    fn lb(&mut self) -> Result<&mut SockLb, EbpfError> {
        if self.lb.is_none() {
            let cgroup = match &self.cgroup {
                Some(c) => c.clone(),
                None => default_cgroup()?,
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
        let (inc, update) = match cached {
            Some(mut inc) => {
                let update = inc.update(table);
                (inc, update)
            }
            None => Incremental::full(table, lb.read()?),
        };
        if update.skipped.ipv6_frontends > 0 {
            tracing::debug!(
                frontends = update.skipped.ipv6_frontends,
                "IPv6 frontends are not served by the eBPF socket LB"
            );
        }
        // On failure `current` stays None: the next sync re-reads the maps.
        lb.apply(&update.ops)?;
        if full || self.tc_devices.is_none() {
            self.ensure_tc(table)?;
        }
        let ops = &update.ops;
        let services_written = ops.iter().filter(|o| matches!(o, Op::PutService(..))).count();
        let services_removed = ops.iter().filter(|o| matches!(o, Op::DeleteService(..))).count();
        let rules = inc.entries().len();
        tracing::debug!(
            compiled = update.compiled,
            ops = ops.len(),
            whole = update.full,
            "eBPF maps updated"
        );
        self.current = Some(inc);
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
            self.tc_devices = None;
        }
        Ok(intact)
    }

    fn cleanup(&mut self) -> Result<(), ProxyError> {
        self.lb = None;
        self.current = None;
        self.tc_devices = None;
        let removed = cleanup(&self.dir).map_err(to_proxy)?;
        tracing::info!(dir = %self.dir.display(), removed, "eBPF pins removed");
        Ok(())
    }
}
