//! The cluster DNS engine's one way to run: `spawn` binds the sockets (so
//! errors surface at start), registers metrics and readiness, follows the
//! snapshot stream and serves until cancelled; `Options` says how.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_cluster::admin::Admin;
use ferry_cluster::{ObjectKey, SnapshotRx};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::takeover::{AddressHook, TakeoverConfig};
use crate::{BoundSockets, DnsError, DnsMetrics, DnsServer, ForwarderConfig, ServerConfig, TcpLimits, ZoneConfig};

/// How the DNS engine runs.
#[derive(Clone)]
pub struct Options {
    /// Address for DNS over UDP and TCP.
    pub listen: SocketAddr,
    pub zone: ZoneConfig,
    /// Upstream nameservers for names outside the zone; empty: the
    /// nameservers of `resolv_conf`.
    pub upstreams: Vec<SocketAddr>,
    pub resolv_conf: PathBuf,
    /// Timeout of one upstream attempt before failing over to the next.
    pub upstream_timeout: Duration,
    /// Entries in the forwarding cache.
    pub cache_size: usize,
    /// UDP threads, taking turns on one socket; `None`: `default_workers()`.
    pub workers: Option<usize>,
    /// Deadlines and the connection cap of DNS over TCP.
    pub tcp: TcpLimits,
    /// The cluster DNS Service whose ClusterIPs this node answers itself
    /// (`takeover`), and what to run when those addresses change.
    pub takeover: Option<(ObjectKey, Option<AddressHook>)>,
}

impl Default for Options {
    fn default() -> Options {
        let forwarder = ForwarderConfig::default();
        Options {
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            zone: ZoneConfig::default(),
            upstreams: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            upstream_timeout: forwarder.timeout,
            cache_size: forwarder.cache_size,
            workers: None,
            tcp: TcpLimits::default(),
            takeover: None,
        }
    }
}

impl Options {
    fn workers(&self) -> usize {
        self.workers.unwrap_or_else(crate::default_workers)
    }
}

/// Starts the DNS engine: metrics and readiness (a zone is being served) in
/// `admin`, sockets bound now, the takeover of the cluster DNS Service's
/// addresses when asked, and the server task until `cancel` fires.
pub async fn spawn(
    opts: &Options,
    snapshots: SnapshotRx,
    admin: &mut Admin,
    cancel: CancellationToken,
) -> Result<JoinHandle<Result<(), DnsError>>, DnsError> {
    let metrics = DnsMetrics::default();
    metrics.register(&mut admin.registry);
    let workers = opts.workers();
    let sockets = BoundSockets::bind(opts.listen, workers)?;
    let local = sockets.local_addr();
    let upstreams = if opts.upstreams.is_empty() {
        crate::resolv::nameservers(&opts.resolv_conf)?
    } else {
        opts.upstreams.clone()
    };
    let forwarder = ForwarderConfig {
        upstreams,
        timeout: opts.upstream_timeout.max(Duration::from_millis(1)),
        cache_size: opts.cache_size,
        ..ForwarderConfig::default()
    };
    let cfg = ServerConfig {
        zone: opts.zone.clone(),
        forwarder: Some(forwarder),
        tcp: opts.tcp.clone(),
    };
    let server = DnsServer::new(cfg, &[opts.listen, local], metrics)?;
    let ready = server.clone();
    admin.readiness("dns-zone", move || {
        if ready.zone_loaded() {
            Ok(())
        } else {
            Err("no zone yet (waiting for the first snapshot)".into())
        }
    });
    tracing::info!(addr = %local, "dns: bound");
    if let Some((service, on_change)) = opts.takeover.clone() {
        let cfg = TakeoverConfig {
            service,
            label: crate::link::DEFAULT_LABEL.into(),
            port: opts.listen.port(),
            workers,
            on_change,
        };
        let (server, snapshots, cancel) = (server.clone(), snapshots.clone(), cancel.clone());
        tokio::spawn(crate::takeover::run(cfg, server, snapshots, cancel));
    }
    Ok(tokio::spawn(server.serve(sockets, snapshots, cancel)))
}
