//! `ferry proxy` (the Service proxy), its flags, the sync loop that drives a
//! `Dataplane` from snapshots, and `ferry render --what iptables|ebpf`.
//!
//! The loop batches snapshot bursts (`--min-sync-interval`), forces a full
//! sync at start, every `--sync-period`, after any failure and when the
//! dataplane's canary is gone; it exports sync metrics and a `/healthz`
//! check that fails when changes have waited more than two sync periods.
//! On shutdown it leaves the rules in place, so connections survive a
//! restart; `--cleanup` is the way to remove them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferry_cluster::{Snapshot, SnapshotRx};
use ferry_proxy::health::HealthCheckServers;
use ferry_proxy::iptables::render::Family;
use ferry_proxy::iptables::{IptablesBackend, IptablesDataplane};
use ferry_proxy::nftables::NftablesDataplane;
use ferry_proxy::replan::Replanner;
use ferry_proxy::{Dataplane, NodeConfig, ProxyError, ServiceTable};
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProxyMode {
    #[default]
    Iptables,
    Ebpf,
    /// ferry's own nftables table (`table ip ferry`), written by netlink batches.
    Nftables,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Whichever the node already uses (kube-proxy's detection).
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// Proxy flags shared by `ferry proxy`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProxyOpts {
    /// Dataplane.
    #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
    pub mode: ProxyMode,
    /// This node's name (endpoints with this nodeName are local). Default: $NODE_NAME, else the hostname.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Node IP for NodePorts (repeatable). Default: the Node object's addresses.
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDR(s) of the cluster; ClusterIP traffic from outside them is
    /// masqueraded. Default (or empty): every Node's `spec.podCIDRs`.
    #[arg(long = "cluster-cidr", value_name = "CIDR", value_delimiter = ',', value_parser = parse_cidr_or_empty)]
    pub cluster_cidrs: Vec<Option<IpNet>>,
    /// Serve NodePorts only on node IPs inside these CIDRs.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Also serve NodePorts on 127.0.0.1. Sets net.ipv4.conf.all.route_localnet=1,
    /// which lets 127/8-addressed packets leave the host (CVE-2020-8558): opt in knowingly.
    #[arg(long)]
    pub localhost_nodeports: bool,
    /// iptables implementation.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,
    /// Period of full resyncs and canary checks (e.g. 30s, 1m, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Option<Duration>,
    /// Minimum time between syncs; bursts of changes are batched.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub min_sync_interval: Option<Duration>,
    /// eBPF mode: cgroup v2 to attach socket programs to. Default: the cgroup2
    /// root in /proc/self/mountinfo (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
    /// hybrid hosts), else a cgroup2 ferry mounts at /run/ferry/cgroup2.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// eBPF mode: devices for the TC program. Default, given a node IP: every device carrying node
    /// or pod traffic (holding a node IP, routed to endpoints or the cluster CIDR,
    /// or up with a global address; not lo, dummies, bridge ports), re-checked every 2 s.
    #[arg(long, value_name = "DEV", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// eBPF mode: bpffs directory for pinned maps and links.
    #[arg(long, value_name = "PATH")]
    pub bpffs: Option<PathBuf>,
    /// Set by `ferry node --dns-service`: the Service whose port 53 this
    /// node's DNS answers itself, so the proxy leaves it alone.
    #[arg(skip)]
    pub local_dns: Option<ferry_cluster::ObjectKey>,
}

/// A CIDR, or nothing (`--cluster-cidr=` from an empty ConfigMap value).
fn parse_cidr_or_empty(s: &str) -> Result<Option<IpNet>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<IpNet>()
        .map(Some)
        .map_err(|e| format!("{s:?} is not a CIDR: {e}"))
}

/// `30s`, `1m`, `500ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ProxyOpts {
    pub fn node_config(&self) -> NodeConfig {
        let node_name = self
            .node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        NodeConfig {
            node_name,
            node_ips: self.node_ips.clone(),
            cluster_cidrs: self.cluster_cidrs.iter().flatten().copied().collect(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            localhost_nodeports: self.localhost_nodeports,
            local_dns: self.local_dns.clone(),
        }
    }

    fn sync_period(&self) -> Duration {
        self.sync_period
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_millis(100))
    }

    fn min_sync_interval(&self) -> Duration {
        self.min_sync_interval.unwrap_or(Duration::from_secs(1))
    }

    fn iptables_backend(&self) -> IptablesBackend {
        match self.iptables_backend {
            BackendChoice::Nft => IptablesBackend::Nft,
            BackendChoice::Legacy => IptablesBackend::Legacy,
            BackendChoice::Auto => IptablesBackend::detect(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: ProxyOpts,
    /// Load the source, do one full sync, print the rule count and sync_seconds=, exit (rules stay).
    #[arg(long, conflicts_with = "cleanup")]
    pub oneshot: bool,
    /// Remove everything ferry programmed for --mode, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

fn bpffs_dir(opts: &ProxyOpts) -> PathBuf {
    opts.bpffs
        .clone()
        .unwrap_or_else(|| ferry_proxy::ebpf::DEFAULT_BPFFS_DIR.into())
}

/// The one place that maps `--mode` to a dataplane.
pub fn make_dataplane(opts: &ProxyOpts) -> anyhow::Result<Box<dyn Dataplane>> {
    match opts.mode {
        ProxyMode::Iptables => {
            let backend = opts.iptables_backend();
            tracing::info!(backend = backend.as_str(), "iptables dataplane");
            Ok(Box::new(IptablesDataplane::new(backend)))
        }
        ProxyMode::Nftables => {
            tracing::info!("nftables dataplane (table ip ferry)");
            Ok(Box::new(NftablesDataplane::new()))
        }
        ProxyMode::Ebpf => Ok(Box::new(
            ferry_proxy::ebpf::EbpfDataplane::new(bpffs_dir(opts), opts.cgroup.clone())
                .with_devices(opts.devices.clone()),
        )),
    }
}

/// Removes what the other modes left on this node (a switch from nftables
/// to eBPF must not leave `table ip ferry` serving stale endpoints), as
/// kube-proxy cleans up after its other modes at start. Failures are logged:
/// a tool or kernel feature that is missing had nothing to leave.
fn remove_other_modes(opts: &ProxyOpts) {
    for (mode, result) in remove_modes(opts, Some(opts.mode)) {
        match result {
            Ok(()) => tracing::debug!(mode = ?mode, "removed what that mode left, if anything"),
            Err(e) => tracing::warn!(mode = ?mode, error = %format!("{e:#}"), "could not remove what that mode left"),
        }
    }
}

/// Runs every mode's cleanup but `except`'s; the result of each.
pub fn remove_modes(opts: &ProxyOpts, except: Option<ProxyMode>) -> Vec<(ProxyMode, Result<(), ProxyError>)> {
    let mut results = Vec::new();
    for mode in [ProxyMode::Iptables, ProxyMode::Nftables, ProxyMode::Ebpf] {
        if Some(mode) == except {
            continue;
        }
        let mut dataplane: Box<dyn Dataplane> = match mode {
            // Removes both back ends' chains, whichever this one names.
            ProxyMode::Iptables => Box::new(IptablesDataplane::new(IptablesBackend::Nft)),
            ProxyMode::Nftables => Box::new(NftablesDataplane::new()),
            ProxyMode::Ebpf => Box::new(ferry_proxy::ebpf::EbpfDataplane::new(bpffs_dir(opts), None)),
        };
        results.push((mode, dataplane.cleanup()));
    }
    results
}

fn plan_logged(snap: &Snapshot, node: &NodeConfig) -> ServiceTable {
    let (table, warnings) = ferry_proxy::plan(snap, node);
    for w in &warnings {
        tracing::warn!(object = %w.object, field = %w.field, "{}", w.message);
    }
    table
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    if args.cleanup {
        let mut dp = make_dataplane(&args.opts)?;
        dp.cleanup().context("cleanup")?;
        println!("ferry proxy: removed everything of mode {}", dp.name());
        return Ok(());
    }
    if args.oneshot {
        let snap = crate::source::load_once(&args.run.source)
            .await
            .context("loading the cluster")?;
        let node = args.opts.node_config();
        remove_other_modes(&args.opts);
        let mut dp = make_dataplane(&args.opts)?;
        let started = Instant::now();
        let table = plan_logged(&snap, &node);
        let report = tokio::task::spawn_blocking(move || dp.sync(&table, true).map(|r| (r, table.services.len())))
            .await
            .context("sync task")?
            .context("sync")?;
        let (report, services) = report;
        println!(
            "ferry proxy: oneshot services={services} rules={} sync_seconds={:.3}",
            report.rules,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    crate::source::warn_if_proxy_needs_apiserver(&args.run.source);
    let mut rt = crate::runtime::Runtime::new();
    let rx = rt.source(&args.run.source).await?;
    let handle = spawn(&mut rt, rx, &args.opts).await?;
    let _cancel = rt.serve_admin(args.run.admin_addr).await?;
    handle.await.context("proxy task")?
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

/// What `/healthz` and `/readyz` read.
#[derive(Default)]
struct SyncHealth {
    /// When a change arrived that is not yet synced.
    pending_since: Option<Instant>,
    last_success: Option<Instant>,
}

/// Registers metrics and health checks and spawns the sync loop; the task
/// ends when `rt.cancel` fires, leaving the kernel state in place.
pub async fn spawn(
    rt: &mut crate::runtime::Runtime,
    snapshots: SnapshotRx,
    opts: &ProxyOpts,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let others = opts.clone();
    tokio::task::spawn_blocking(move || remove_other_modes(&others))
        .await
        .context("cleanup task")?;
    let dataplane = make_dataplane(opts)?;
    let metrics = SyncMetrics::new(&mut rt.admin.registry);
    let health = Arc::new(Mutex::new(SyncHealth::default()));
    let period = opts.sync_period();
    let h = health.clone();
    rt.admin.liveness("proxy-sync", move || {
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
    rt.admin
        .readiness("proxy-sync", move || match h.lock().map(|h| h.last_success.is_some()) {
            Ok(true) => Ok(()),
            _ => Err("no successful sync yet".into()),
        });
    let sync_loop = SyncLoop {
        snapshots,
        dataplane: Some(dataplane),
        node: opts.node_config(),
        period,
        min_interval: opts.min_sync_interval(),
        metrics,
        health,
        health_servers: HealthCheckServers::default(),
        cancel: rt.cancel.clone(),
        replanner: Some(Replanner::default()),
        incremental_plan: matches!(opts.mode, ProxyMode::Ebpf | ProxyMode::Nftables),
    };
    Ok(tokio::spawn(sync_loop.run()))
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

    async fn run(mut self) -> anyhow::Result<()> {
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
                            tracing::error!(error = %format!("{e:#}"), "proxy sync failed; retrying with a full sync");
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

    async fn sync(&mut self, snap: Arc<Snapshot>, full: bool) -> anyhow::Result<()> {
        let mut dp = self
            .dataplane
            .take()
            .context("dataplane lost after a failed sync task")?;
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
        .context("sync task panicked")?;
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

/// `ferry render --what iptables`: the iptables-restore input for IPv4 (and
/// IPv6 when the cluster has IPv6 services), with planner warnings as comments.
/// With `--mode nftables`, the `nft -f` script of ferry's own table instead.
pub fn render_iptables(snap: &Snapshot, opts: &ProxyOpts) -> anyhow::Result<String> {
    let (table, warnings) = ferry_proxy::plan(snap, &opts.node_config());
    let mut out = String::new();
    for w in &warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    if opts.mode == ProxyMode::Nftables {
        use ferry_proxy::nftables::render as nft;
        out.push_str("# nftables (table ip ferry)\n");
        out.push_str(&nft::render_text(&table, Family::V4));
        if table
            .services
            .values()
            .any(|e| e.frontends.iter().any(|f| f.ip.is_ipv6()))
        {
            out.push_str("# nftables (table ip6 ferry)\n");
            out.push_str(&nft::render_text(&table, Family::V6));
        }
        return Ok(out);
    }
    out.push_str("# iptables (IPv4)\n");
    out.push_str(&ferry_proxy::iptables::render::render_text(&table, Family::V4));
    let has_v6 = table
        .services
        .values()
        .any(|e| e.frontends.iter().any(|f| f.ip.is_ipv6()));
    if has_v6 {
        out.push_str("# ip6tables (IPv6)\n");
        out.push_str(&ferry_proxy::iptables::render::render_text(&table, Family::V6));
    }
    Ok(out)
}

/// `ferry render --what ebpf`: the services/backends map entries a fresh
/// eBPF dataplane would write, with planner warnings as comments.
pub fn render_ebpf(snap: &Snapshot, opts: &ProxyOpts) -> anyhow::Result<String> {
    let (table, warnings) = ferry_proxy::plan(snap, &opts.node_config());
    let mut out = String::new();
    for w in &warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    let (entries, skipped) = ferry_proxy::ebpf::compile(&table, &Default::default());
    out.push_str(&ferry_proxy::ebpf::render(&table, &entries, &skipped));
    Ok(out)
}
