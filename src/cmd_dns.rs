//! `ferry dns` and `ferry render --what zone`: the cluster DNS engine's
//! flags, mapped onto `ferry_dns::run::Options`, and its wiring; the
//! NOTRACK table of the cluster DNS takeover (the proxy crate's nftables)
//! joined to the DNS engine's address changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_dns::run::Options;
use ferry_dns::{PodMode, Zone, ZoneConfig};

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
    /// UDP threads, taking turns on one socket; default one per core, at most 4.
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
    // TCP limits (issue 14); defaults live in ferry_dns::TcpLimits.
    /// A TCP connection idle this long before its next query is closed [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub tcp_idle_timeout: Option<Duration>,
    /// A TCP query must arrive whole within this [default: 3s].
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub tcp_read_timeout: Option<Duration>,
    /// A TCP client that does not read a reply for this long is closed [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub tcp_write_timeout: Option<Duration>,
    /// Concurrent TCP connections [default: 1024].
    #[arg(long, value_name = "N")]
    pub tcp_max_connections: Option<usize>,
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
    fn tcp_limits(&self) -> ferry_dns::TcpLimits {
        let d = ferry_dns::TcpLimits::default();
        ferry_dns::TcpLimits {
            idle_timeout: self.tcp_idle_timeout.unwrap_or(d.idle_timeout),
            read_timeout: self.tcp_read_timeout.unwrap_or(d.read_timeout),
            write_timeout: self.tcp_write_timeout.unwrap_or(d.write_timeout),
            max_connections: self.tcp_max_connections.unwrap_or(d.max_connections),
        }
    }

    fn zone_config(&self) -> ZoneConfig {
        ZoneConfig {
            domain: self.cluster_domain.clone(),
            ttl: self.ttl,
            pods: self.pods,
        }
    }

    pub fn options(&self) -> Options {
        Options {
            listen: self.listen,
            zone: self.zone_config(),
            upstreams: self.upstream.clone(),
            resolv_conf: self.resolv_conf.clone(),
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms),
            cache_size: self.dns_cache_size,
            workers: self.dns_workers,
            tcp: self.tcp_limits(),
            takeover: self
                .takeover
                .clone()
                .map(|service| (service, Some(notrack_hook(self.listen.port())))),
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
    let server = ferry_dns::run::spawn(&args.opts.options(), snapshots, &mut rt.admin, rt.cancel.clone()).await?;
    let _cancel = rt.serve_admin(&args.run).await?;
    Ok(server.await.context("dns server task")??)
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
