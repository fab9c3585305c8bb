//! The Service proxy's run loop: `spawn` drives a `Dataplane` from the
//! snapshot stream until cancelled, and `Options` says how.
//!
//! The loop batches snapshot bursts (`min_sync_interval`), forces a full
//! sync at start, every `sync_period`, after any failure and when the
//! dataplane's canary is gone; it exports sync metrics and a liveness check
//! that fails when changes have waited more than two sync periods, and runs
//! the health-check node ports of `externalTrafficPolicy: Local` Services.
//! On shutdown it leaves the rules in place, so connections survive a
//! restart; `remove_modes` is what removes them (`--cleanup`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_cluster::admin::Admin;
use ferry_cluster::{Snapshot, SnapshotRx};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::health::HealthCheckServers;
use crate::iptables::render::Family;
use crate::iptables::{IptablesBackend, IptablesDataplane};
use crate::nftables::NftablesDataplane;
use crate::replan::Replanner;
use crate::{Dataplane, NodeConfig, ProxyError, ServiceTable};

/// Which dataplane programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// iptables-restore batches (kube-proxy's iptables mode).
    #[default]
    Iptables,
    /// ferry's own nftables table (`table ip ferry`), written by netlink batches.
    Nftables,
    /// BPF programs on the cgroup (socket LB) and the devices (TC).
    Ebpf,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Iptables, Mode::Nftables, Mode::Ebpf];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown proxy mode {s:?} (iptables, nftables or ebpf)"))
    }
}

/// Which iptables implementation the iptables mode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IptablesChoice {
    /// Whichever the node already uses (kube-proxy's detection).
    #[default]
    Auto,
    Nft,
    Legacy,
}

impl FromStr for IptablesChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<IptablesChoice, String> {
        match s {
            "auto" => Ok(IptablesChoice::Auto),
            "nft" => Ok(IptablesChoice::Nft),
            "legacy" => Ok(IptablesChoice::Legacy),
            _ => Err(format!("unknown iptables backend {s:?} (auto, nft or legacy)")),
        }
    }
}

/// How the proxy runs on this node.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub node: NodeConfig,
    pub iptables: IptablesChoice,
    /// Period of full resyncs and canary checks (at least 100 ms).
    pub sync_period: Duration,
    /// Minimum time between syncs; bursts of changes are batched.
    pub min_sync_interval: Duration,
    /// eBPF: the cgroup v2 for the socket programs (default: `ebpf::cgroup`'s choice).
    pub cgroup: Option<PathBuf>,
    /// eBPF: devices for the TC program (default: `ebpf::devices`' choice, re-checked).
    pub devices: Vec<String>,
    /// eBPF: bpffs directory for pinned maps and links.
    pub bpffs: PathBuf,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mode: Mode::default(),
            node: NodeConfig::default(),
            iptables: IptablesChoice::Auto,
            sync_period: Duration::from_secs(30),
            min_sync_interval: Duration::from_secs(1),
            cgroup: None,
            devices: Vec::new(),
            bpffs: crate::ebpf::DEFAULT_BPFFS_DIR.into(),
        }
    }
}

impl Options {
    fn iptables_backend(&self) -> IptablesBackend {
        match self.iptables {
            IptablesChoice::Nft => IptablesBackend::Nft,
            IptablesChoice::Legacy => IptablesBackend::Legacy,
            IptablesChoice::Auto => IptablesBackend::detect(),
        }
    }

    fn sync_period(&self) -> Duration {
        self.sync_period.max(Duration::from_millis(100))
    }
}

/// The one place that maps a `Mode` to a dataplane.
pub fn make_dataplane(opts: &Options) -> Box<dyn Dataplane> {
    match opts.mode {
        Mode::Iptables => {
            let backend = opts.iptables_backend();
            tracing::info!(backend = backend.as_str(), "iptables dataplane");
            Box::new(IptablesDataplane::new(backend))
        }
        Mode::Nftables => {
            tracing::info!("nftables dataplane (table ip ferry)");
            Box::new(NftablesDataplane::new())
        }
        Mode::Ebpf => Box::new(
            crate::ebpf::EbpfDataplane::new(opts.bpffs.clone(), opts.cgroup.clone()).with_devices(opts.devices.clone()),
        ),
    }
}

/// Runs every mode's cleanup but `except`'s; the result of each.
pub fn remove_modes(opts: &Options, except: Option<Mode>) -> Vec<(Mode, Result<(), ProxyError>)> {
    let mut results = Vec::new();
    for mode in Mode::ALL {
        if Some(mode) == except {
            continue;
        }
        let mut dataplane: Box<dyn Dataplane> = match mode {
            // Removes both back ends' chains, whichever this one names.
            Mode::Iptables => Box::new(IptablesDataplane::new(IptablesBackend::Nft)),
            Mode::Nftables => Box::new(NftablesDataplane::new()),
            Mode::Ebpf => Box::new(crate::ebpf::EbpfDataplane::new(opts.bpffs.clone(), None)),
        };
        results.push((mode, dataplane.cleanup()));
    }
    results
}

/// Removes what the other modes left on this node (a switch from nftables
/// to eBPF must not leave `table ip ferry` serving stale endpoints), as
/// kube-proxy cleans up after its other modes at start. Failures are logged:
/// a tool or kernel feature that is missing had nothing to leave.
pub fn remove_other_modes(opts: &Options) {
    for (mode, result) in remove_modes(opts, Some(opts.mode)) {
        match result {
            Ok(()) => tracing::debug!(%mode, "removed what that mode left, if anything"),
            Err(e) => tracing::warn!(%mode, error = %e, "could not remove what that mode left"),
        }
    }
}

/// What `oneshot` did.
#[derive(Debug, Clone, Copy)]
pub struct OneshotReport {
    pub services: usize,
    pub rules: usize,
    pub seconds: f64,
}

/// One full sync of `snap` (after removing the other modes' leftovers),
/// leaving the rules in place: `ferry proxy --oneshot`.
pub fn oneshot(snap: &Snapshot, opts: &Options) -> Result<OneshotReport, ProxyError> {
    remove_other_modes(opts);
    let mut dp = make_dataplane(opts);
    let started = Instant::now();
    let (table, warnings) = crate::plan(snap, &opts.node);
    for w in &warnings {
        tracing::warn!(object = %w.object, field = %w.field, "{}", w.message);
    }
    let report = dp.sync(&table, true)?;
    Ok(OneshotReport {
        services: table.services.len(),
        rules: report.rules,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Cleans up the other modes, registers metrics and health checks in
/// `admin`, and spawns the sync loop; the task ends when `cancel` fires,
/// leaving the kernel state in place.
pub async fn spawn(
    opts: &Options,
    snapshots: SnapshotRx,
    admin: &mut Admin,
    cancel: CancellationToken,
) -> Result<JoinHandle<Result<(), ProxyError>>, ProxyError> {
    let others = opts.clone();
    tokio::task::spawn_blocking(move || remove_other_modes(&others))
        .await
        .map_err(|e| ProxyError::Other(format!("cleanup task: {e}")))?;
    let dataplane = make_dataplane(opts);
    let metrics = SyncMetrics::new(&mut admin.registry);
    let health = Arc::new(Mutex::new(SyncHealth::default()));
    let period = opts.sync_period();
    let h = health.clone();
    admin.liveness("proxy-sync", move || {
        let Ok(h) = h.lock() else {
            return Err("health state poisoned".into());
        };
        match h.pending_since {
            Some(since) if since.elapsed() > 2 * period => Err(format!(
                "changes pending for {:.1}s without a successful sync",
                since.elapsed().as_secs_f64()
            )),
            _ => Ok(()),
        }
    });
    let h = health.clone();
    admin.readiness("proxy-sync", move || match h.lock().map(|h| h.last_success.is_some()) {
        Ok(true) => Ok(()),
        _ => Err("no successful sync yet".into()),
    });
    let sync_loop = SyncLoop {
        snapshots,
        dataplane: Some(dataplane),
        node: opts.node.clone(),
        period,
        min_interval: opts.min_sync_interval,
        metrics,
        health,
        health_servers: HealthCheckServers::default(),
        cancel,
        replanner: Some(Replanner::default()),
        incremental_plan: matches!(opts.mode, Mode::Ebpf | Mode::Nftables),
    };
    Ok(tokio::spawn(sync_loop.run()))
}

/// Metrics of the sync loop.
#[derive(Clone)]
struct SyncMetrics {
    full: Histogram,
    partial: Histogram,
    rules: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    failures: Counter,
}

impl SyncMetrics {
    fn new(registry: &mut Registry) -> SyncMetrics {
        let m = SyncMetrics {
            full: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            partial: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            rules: Gauge::default(),
            last_success: Gauge::default(),
            failures: Counter::default(),
        };
        registry.register(
            "ferry_proxy_sync_full_duration_seconds",
            "Duration of full dataplane syncs",
            m.full.clone(),
        );
        registry.register(
            "ferry_proxy_sync_partial_duration_seconds",
            "Duration of partial dataplane syncs",
            m.partial.clone(),
        );
        registry.register(
            "ferry_proxy_rules",
            "Rules (or map entries) programmed",
            m.rules.clone(),
        );
        registry.register(
            "ferry_proxy_last_successful_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            m.last_success.clone(),
        );
        registry.register("ferry_proxy_sync_failures", "Failed syncs", m.failures.clone());
        m
    }
}

/// What the liveness and readiness checks read.
#[derive(Default)]
struct SyncHealth {
    /// When a change arrived that is not yet synced.
    pending_since: Option<Instant>,
    last_success: Option<Instant>,
}

struct SyncLoop {
    snapshots: SnapshotRx,
    dataplane: Option<Box<dyn Dataplane>>,
    node: NodeConfig,
    period: Duration,
    min_interval: Duration,
    metrics: SyncMetrics,
    health: Arc<Mutex<SyncHealth>>,
    health_servers: HealthCheckServers,
    cancel: CancellationToken,
    /// Keeps the last table; in eBPF and nftables modes partial syncs
    /// re-plan only the Services that changed (the iptables dataplane plans
    /// whole each time).
    replanner: Option<Replanner>,
    incremental_plan: bool,
}

impl SyncLoop {
    fn set_pending(&self) {
        if let Ok(mut h) = self.health.lock() {
            h.pending_since.get_or_insert_with(Instant::now);
        }
    }
    async fn run(mut self) -> Result<(), ProxyError> {
        let mut need_full = true;
        let mut dirty = self.snapshots.borrow().is_some();
        if dirty {
            self.set_pending();
        }
        let mut last_sync: Option<Instant> = None;
        let mut last_full = Instant::now();
        loop {
            if dirty {
                if let Some(t) = last_sync {
                    let wait = self.min_interval.saturating_sub(t.elapsed());
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                let snap = self.snapshots.borrow_and_update().clone();
                if let Some(snap) = snap {
                    last_sync = Some(Instant::now());
                    if need_full {
                        last_full = Instant::now();
                    }
                    match self.sync(snap, need_full).await {
                        Ok(()) => {
                            need_full = false;
                            dirty = false;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "proxy sync failed; retrying with a full sync");
                            self.metrics.failures.inc();
                            need_full = true;
                        }
                    }
                } else {
                    dirty = false;
                }
                continue;
            }
            let next_full = last_full + self.period;
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        tracing::info!("snapshot source closed; proxy sync loop stops");
                        break;
                    }
                    dirty = true;
                    self.set_pending();
                }
                _ = tokio::time::sleep_until(next_full.into()) => {
                    let intact = self.check_canary().await;
                    if !intact {
                        tracing::warn!("ferry's rules were removed or flushed by someone; full resync");
                    }
                    need_full = true;
                    dirty = self.snapshots.borrow().is_some();
                    last_full = Instant::now();
                }
            }
        }
        tracing::info!("proxy stopped; rules left in place");
        Ok(())
    }

    async fn check_canary(&mut self) -> bool {
        let Some(mut dp) = self.dataplane.take() else {
            return false;
        };
        let (dp, ok) = match tokio::task::spawn_blocking(move || {
            let ok = dp.check();
            (dp, ok)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "canary check task failed");
                return false;
            }
        };
        self.dataplane = Some(dp);
        ok.unwrap_or(false)
    }

    async fn sync(&mut self, snap: Arc<Snapshot>, full: bool) -> Result<(), ProxyError> {
        let mut dp = self
            .dataplane
            .take()
            .ok_or_else(|| ProxyError::Other("dataplane lost after a failed sync task".into()))?;
        let mut replanner = self.replanner.take().unwrap_or_default();
        let node = self.node.clone();
        let whole = full || !self.incremental_plan;
        let started = Instant::now();
        let (dp, replanner, result) = tokio::task::spawn_blocking(move || {
            let planned = replanner.update(&snap, &node, whole);
            for w in &planned.warnings {
                tracing::warn!(object = %w.object, field = %w.field, "{}", w.message);
            }
            let r = dp.sync(replanner.table(), full);
            (dp, replanner, r)
        })
        .await
        .map_err(|e| ProxyError::Other(format!("sync task panicked: {e}")))?;
        self.dataplane = Some(dp);
        let health_checks = replanner.table().health_checks.clone();
        self.replanner = Some(replanner);
        let report = result?;
        let secs = started.elapsed().as_secs_f64();
        if report.full {
            self.metrics.full.observe(secs);
        } else {
            self.metrics.partial.observe(secs);
        }
        self.metrics.rules.set(i64::try_from(report.rules).unwrap_or(i64::MAX));
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.last_success.set(now_unix);
        if let Ok(mut h) = self.health.lock() {
            h.pending_since = None;
            h.last_success = Some(Instant::now());
        }
        tracing::info!(
            full = report.full,
            rules = report.rules,
            written = report.services_written,
            removed = report.services_removed,
            sync_seconds = secs,
            "proxy synced"
        );
        self.health_servers.update(&health_checks).await;
        Ok(())
    }
}

/// The rules `opts.mode` would program for `snap`, as text, planner
/// warnings first as comments: iptables-restore input (IPv4, and IPv6 when
/// the cluster has IPv6 Services), or the `nft -f` script of ferry's table
/// in nftables mode, or the BPF map entries in eBPF mode.
pub fn render(snap: &Snapshot, opts: &Options) -> String {
    let (table, warnings) = crate::plan(snap, &opts.node);
    let mut out = String::new();
    for w in &warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    match opts.mode {
        Mode::Ebpf => {
            let (entries, skipped) = crate::ebpf::compile(&table, &Default::default());
            out.push_str(&crate::ebpf::render(&table, &entries, &skipped));
        }
        Mode::Nftables => {
            use crate::nftables::render::render_text;
            out.push_str("# nftables (table ip ferry)\n");
            out.push_str(&render_text(&table, Family::V4));
            if has_ipv6(&table) {
                out.push_str("# nftables (table ip6 ferry)\n");
                out.push_str(&render_text(&table, Family::V6));
            }
        }
        Mode::Iptables => {
            use crate::iptables::render::render_text;
            out.push_str("# iptables (IPv4)\n");
            out.push_str(&render_text(&table, Family::V4));
            if has_ipv6(&table) {
                out.push_str("# ip6tables (IPv6)\n");
                out.push_str(&render_text(&table, Family::V6));
            }
        }
    }
    out
}

fn has_ipv6(table: &ServiceTable) -> bool {
    table
        .services
        .values()
        .any(|e| e.frontends.iter().any(|f| f.ip.is_ipv6()))
}
