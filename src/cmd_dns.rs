//! `ferry dns` and `ferry render --what zone`: the flags of the cluster DNS
//! engine and how it is wired into a `Runtime` (metrics, readiness, sockets,
//! cancellation). `ferry node` composes it through `spawn`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_dns::{BoundSockets, DnsMetrics, DnsServer, ForwarderConfig, PodMode, ServerConfig, Zone, ZoneConfig};

use crate::cli::RunArgs;

/// DNS flags shared by `ferry dns`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone)]
pub struct DnsOpts {
    /// Address for DNS over UDP and TCP.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,
    /// The cluster domain the zone answers for.
    #[arg(long, value_name = "DOMAIN", default_value = ferry_dns::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Upstream nameserver for names outside the zone (repeatable; default:
    /// the nameservers of /etc/resolv.conf). Port 53 when omitted.
    #[arg(long = "upstream", value_name = "ADDR", value_parser = parse_upstream)]
    pub upstream: Vec<SocketAddr>,
    /// Pod records a-b-c-d.<ns>.pod.<zone>: insecure, verified or disabled.
    #[arg(long, value_name = "MODE", default_value = "insecure")]
    pub pods: PodMode,
    /// TTL of cluster records, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub ttl: u32,
    /// UDP sockets (and threads) with SO_REUSEPORT; default one per two cores, 1 to 4.
    #[arg(long, value_name = "N")]
    pub dns_workers: Option<usize>,
    /// Timeout of one upstream attempt before failing over to the next.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub upstream_timeout_ms: u64,
    /// Entries in the forwarding cache.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub dns_cache_size: usize,
    /// resolv.conf to take default upstreams from.
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Set by `ferry node --dns-service`: the Service whose ClusterIPs this
    /// node answers itself.
    #[arg(skip)]
    pub takeover: Option<ferry_cluster::ObjectKey>,
}

impl Default for DnsOpts {
    fn default() -> Self {
        DnsOpts {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            cluster_domain: ferry_dns::DEFAULT_CLUSTER_DOMAIN.into(),
            upstream: Vec::new(),
            pods: PodMode::Insecure,
            ttl: 5,
            dns_workers: None,
            upstream_timeout_ms: 2000,
            dns_cache_size: 10_000,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            takeover: None,
        }
    }
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|e| format!("{s:?} is not an IP or IP:PORT: {e}"))
}

impl DnsOpts {
    fn zone_config(&self) -> ZoneConfig {
        ZoneConfig {
            domain: self.cluster_domain.clone(),
            ttl: self.ttl,
            pods: self.pods,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DnsArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: DnsOpts,
}

pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    let mut rt = crate::runtime::Runtime::new();
    let snapshots = rt.source(&args.run.source).await?;
    let server = spawn(&mut rt, snapshots, &args.opts).await?;
    let _cancel = rt.serve_admin(args.run.admin_addr).await?;
    server.await.context("dns server task")?
}

/// Starts the DNS engine inside `rt`: metrics, readiness (a zone is being
/// served), sockets bound now (errors surface here), server task until
/// `rt.cancel` fires.
pub async fn spawn(
    rt: &mut crate::runtime::Runtime,
    snapshots: ferry_cluster::SnapshotRx,
    opts: &DnsOpts,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let metrics = DnsMetrics::default();
    metrics.register(&mut rt.admin.registry);
    let workers = opts.dns_workers.unwrap_or_else(ferry_dns::default_workers);
    let sockets =
        BoundSockets::bind(opts.listen, workers).with_context(|| format!("dns: listening on {}", opts.listen))?;
    let local = sockets.local_addr();
    let upstreams = if opts.upstream.is_empty() {
        ferry_dns::resolv::nameservers(&opts.resolv_conf)?
    } else {
        opts.upstream.clone()
    };
    let forwarder = ForwarderConfig {
        upstreams,
        timeout: Duration::from_millis(opts.upstream_timeout_ms.max(1)),
        cache_size: opts.dns_cache_size,
        ..ForwarderConfig::default()
    };
    let cfg = ServerConfig {
        zone: opts.zone_config(),
        forwarder: Some(forwarder),
    };
    let server = DnsServer::new(cfg, &[opts.listen, local], metrics)?;
    let ready = server.clone();
    rt.admin.readiness("dns-zone", move || {
        if ready.zone_loaded() {
            Ok(())
        } else {
            Err("no zone yet (waiting for the first snapshot)".into())
        }
    });
    tracing::info!(addr = %local, "dns: bound");
    if let Some(service) = opts.takeover.clone() {
        let cfg = ferry_dns::takeover::TakeoverConfig {
            service,
            label: ferry_dns::link::DEFAULT_LABEL.into(),
            port: opts.listen.port(),
            workers,
            on_change: Some(notrack_hook(opts.listen.port())),
        };
        let (server, snapshots, cancel) = (server.clone(), snapshots.clone(), rt.cancel.clone());
        tokio::spawn(ferry_dns::takeover::run(cfg, server, snapshots, cancel));
    }
    let cancel = rt.cancel.clone();
    Ok(tokio::spawn(async move {
        server.serve(sockets, snapshots, cancel).await?;
        Ok(())
    }))
}

pub fn render_zone(snap: &ferry_cluster::Snapshot, opts: &DnsOpts) -> anyhow::Result<String> {
    let zone = Zone::build(snap, &opts.zone_config())?;
    Ok(ferry_dns::master_file(&zone))
}

/// NOTRACK for the taken-over addresses, in ferry's own nftables table
/// whatever the proxy mode (a kernel without nf_tables keeps tracking).
fn notrack_hook(port: u16) -> ferry_dns::takeover::AddressHook {
    std::sync::Arc::new(move |ips: &[std::net::IpAddr]| {
        ferry_proxy::nftables::notrack::apply(ips, port).map_err(|e| e.to_string())
    })
}

/// `ferry node --dns-service ""`: remove what an earlier takeover left
/// (logged, not fatal: the rest of the node keeps starting).
pub fn disable_takeover() {
    if let Err(e) = remove_takeover() {
        tracing::warn!(error = %format!("{e:#}"), "dns takeover off: could not remove what an earlier run left");
    }
}

/// The takeover's addresses (`lo:ferry-dns`) and NOTRACK table, if any.
pub fn remove_takeover() -> anyhow::Result<()> {
    let removed = ferry_dns::link::remove(ferry_dns::link::DEFAULT_LABEL).context("removing lo:ferry-dns addresses")?;
    if removed > 0 {
        tracing::info!(
            addresses = removed,
            "removed the cluster DNS addresses of an earlier run"
        );
    }
    ferry_proxy::nftables::notrack::apply(&[], 53).context("removing table ip ferry-dns")?;
    Ok(())
}
