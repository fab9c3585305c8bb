//! `EbpfDataplane`: the `Dataplane` for `--mode ebpf`. Opens (or adopts) the
//! socket LB on first sync, keeps what it last wrote (`Incremental`: the
//! entries and, per service port, the entry they came from) so a partial
//! sync compiles only the service ports that changed and writes only their
//! map entries, and re-reads the maps on a full sync (the kernel is the
//! truth after a restart).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::cgroup::default_cgroup;
use super::devices::{cluster_cidrs, node_ips, wanted, Scanner};
use super::entries::{Incremental, Op};
use super::loader::{attach_tc, cleanup, ifindex, prune_tc, set_tc_snat, EbpfError, SockLb};
use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::table::ServiceTable;

/// How often the device set is re-checked between syncs (new devices get
/// the TC program within this time).
const RESCAN: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct EbpfDataplane {
    dir: PathBuf,
    cgroup: Option<PathBuf>,
    lb: Option<SockLb>,
    current: Option<Incremental>,
    /// `--devices`; empty: `devices::discover`.
    devices: Vec<String>,
    /// The TC side, shared with the rescan thread (None: not yet set up).
    tc: Option<Arc<TcShared>>,
}

/// What the TC programs are attached with, and the rescan thread's stop flag.
#[derive(Debug)]
struct TcState {
    dir: PathBuf,
    explicit: Vec<String>,
    scanner: Scanner,
    /// The SNAT address last written (outer None: nothing written yet).
    snat: Option<Option<Ipv4Addr>>,
    /// Devices of the last scan.
    devices: Vec<String>,
    scanned: bool,
    stop: bool,
}

#[derive(Debug)]
struct TcShared {
    state: Mutex<TcState>,
    wake: Condvar,
}

impl TcState {
    /// Unpins links of vanished devices, attaches to the devices that
    /// should have the program and lack it, writes the SNAT address (the
    /// first IPv4 node IP) when it changed.
    fn scan(&mut self) -> Result<(), EbpfError> {
        let pruned = prune_tc(&self.dir)?;
        // Without a node IP ferry cannot tell the node's outside from its
        // inside (and a bench or test on a host must not grab its devices).
        let devices = if !self.explicit.is_empty() {
            self.explicit.clone()
        } else if self.scanner.node_ips().is_empty() {
            Vec::new()
        } else {
            self.scanner.scan()?
        };
        let created = attach_tc(&self.dir, &devices)?;
        let snat = self.scanner.node_ips().first().copied();
        if self.snat != Some(snat) {
            set_tc_snat(&self.dir, snat)?;
            self.snat = Some(snat);
        }
        if devices.is_empty() && (!self.scanned || !self.devices.is_empty()) {
            tracing::warn!("no node IP (--node-ip or the Node object) and no --devices, or no device found: no TC program, so NodePorts are served to this node's own connections only");
        }
        if created > 0 || pruned > 0 || devices != self.devices {
            tracing::info!(devices = ?devices, links = created, pruned, "eBPF TC programs attached");
        }
        self.devices = devices;
        self.scanned = true;
        Ok(())
    }
}

/// Re-scans every `RESCAN` until told to stop; a failed scan is logged
/// and retried at the next one.
fn rescan_loop(shared: Arc<TcShared>) {
    let Ok(mut state) = shared.state.lock() else {
        return;
    };
    loop {
        state = match shared.wake.wait_timeout(state, RESCAN) {
            Ok((s, _)) => s,
            Err(_) => return,
        };
        if state.stop {
            return;
        }
        if let Err(e) = state.scan() {
            tracing::warn!(error = %e, "eBPF TC device rescan failed");
        }
    }
}

impl Drop for EbpfDataplane {
    fn drop(&mut self) {
        self.stop_tc();
    }
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
            tc: None,
        }
    }

    /// Devices for the TC program (traffic from outside the node); empty:
    /// every device that carries node or pod traffic, re-checked every few
    /// seconds (`devices::select`) — once the node has an IPv4 node IP.
    pub fn with_devices(mut self, devices: Vec<String>) -> Self {
        self.devices = devices;
        self
    }

    /// The devices the TC programs were attached to at the last scan.
    pub fn tc_devices(&self) -> Option<Vec<String>> {
        let tc = self.tc.as_ref()?;
        tc.state.lock().ok().map(|s| s.devices.clone())
    }

    /// Brings the TC side up to `table` (device inputs, SNAT address) and
    /// scans now; the first call starts the rescan thread. A partial sync
    /// passes its map writes: the endpoints they add are the new inputs.
    fn ensure_tc(&mut self, table: &ServiceTable, partial: Option<&[Op]>) -> Result<(), EbpfError> {
        for d in &self.devices {
            if ifindex(d).is_none() {
                return Err(EbpfError::Io {
                    path: PathBuf::from(format!("--devices {d}")),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such network device"),
                });
            }
        }
        if let Some(tc) = &self.tc {
            let mut s = tc.state.lock().map_err(|_| poisoned(&self.dir))?;
            match partial {
                Some(ops) => {
                    let added: Vec<Ipv4Addr> = ops
                        .iter()
                        .filter_map(|o| match o {
                            Op::PutBackend(_, b) => Some(b.ip()),
                            _ => None,
                        })
                        .collect();
                    s.scanner.update(node_ips(table), cluster_cidrs(table), &added);
                }
                None => s.scanner.set(wanted(table)),
            }
            return s.scan();
        }
        let mut scanner = Scanner::default();
        scanner.set(wanted(table));
        let mut state = TcState {
            dir: self.dir.clone(),
            explicit: self.devices.clone(),
            scanner,
            snat: None,
            devices: Vec::new(),
            scanned: false,
            stop: false,
        };
        state.scan()?;
        let shared = Arc::new(TcShared {
            state: Mutex::new(state),
            wake: Condvar::new(),
        });
        let t = shared.clone();
        std::thread::Builder::new()
            .name("ferry-tc-devices".into())
            .spawn(move || rescan_loop(t))
            .map_err(|source| EbpfError::Io {
                path: PathBuf::from("rescan thread"),
                source,
            })?;
        self.tc = Some(shared);
        Ok(())
    }

    /// Stops the rescan thread (it exits at its next wake-up, at once).
    fn stop_tc(&mut self) {
        if let Some(tc) = self.tc.take() {
            if let Ok(mut s) = tc.state.lock() {
                s.stop = true;
            }
            tc.wake.notify_all();
        }
    }

    /// Whether the last open adopted pinned links instead of loading.
    pub fn adopted(&self) -> Option<bool> {
        self.lb.as_ref().map(|lb| lb.adopted)
    }

    fn lb(&mut self) -> Result<&mut SockLb, EbpfError> {
        if self.lb.is_none() {
            let explicit = self.cgroup.clone();
            let lb = SockLb::open_with(&self.dir, || match explicit {
                Some(c) => Ok(c),
                None => default_cgroup(),
            })?;
            tracing::info!(dir = %self.dir.display(), adopted = lb.adopted, "eBPF socket LB ready");
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
        // Endpoints and node IPs feed the device choice: every sync.
        self.ensure_tc(table, (!update.full).then_some(update.ops.as_slice()))?;
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

fn poisoned(dir: &std::path::Path) -> EbpfError {
    EbpfError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other("TC state lock poisoned"),
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
        self.stop_tc();
        self.lb = None;
        self.current = None;
        let removed = cleanup(&self.dir).map_err(to_proxy)?;
        if removed > 0 {
            tracing::info!(dir = %self.dir.display(), removed, "eBPF pins removed");
        }
        Ok(())
    }
}
