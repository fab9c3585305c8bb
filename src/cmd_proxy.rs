//! `ferry proxy`: the Service proxy's flags, mapped onto
//! `ferry_proxy::run::Options`, and its wiring (source, engine, admin).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_proxy::run::{IptablesChoice, Mode, Options};
use ferry_proxy::NodeConfig;
use ipnet::IpNet;

use crate::cli::{parse_duration, RunArgs};

/// Proxy flags shared by `ferry proxy`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProxyOpts {
    /// Dataplane: iptables, nftables (ferry's own `table ip ferry`, written
    /// by netlink batches) or ebpf.
    #[arg(long, value_name = "MODE", default_value = "iptables")]
    pub mode: Mode,
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
    /// iptables implementation: auto (whichever the node uses), nft or legacy.
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub iptables_backend: IptablesChoice,
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

    pub fn options(&self) -> Options {
        let defaults = Options::default();
        Options {
            mode: self.mode,
            node: self.node_config(),
            iptables: self.iptables_backend,
            sync_period: self.sync_period.unwrap_or(defaults.sync_period),
            min_sync_interval: self.min_sync_interval.unwrap_or(defaults.min_sync_interval),
            cgroup: self.cgroup.clone(),
            devices: self.devices.clone(),
            bpffs: self.bpffs.clone().unwrap_or(defaults.bpffs),
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

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let opts = args.opts.options();
    if args.cleanup {
        let mut dp = ferry_proxy::run::make_dataplane(&opts);
        dp.cleanup().context("cleanup")?;
        println!("ferry proxy: removed everything of mode {}", dp.name());
        return Ok(());
    }
    if args.oneshot {
        let snap = crate::source::load_once(&args.run.source)
            .await
            .context("loading the cluster")?;
        let r = tokio::task::spawn_blocking(move || ferry_proxy::run::oneshot(&snap, &opts))
            .await
            .context("sync task")?
            .context("sync")?;
        println!(
            "ferry proxy: oneshot services={} rules={} sync_seconds={:.3}",
            r.services, r.rules, r.seconds
        );
        return Ok(());
    }
    crate::source::warn_if_proxy_needs_apiserver(&args.run.source);
    let mut rt = crate::runtime::Runtime::new();
    let rx = rt.source(&args.run.source).await?;
    let handle = ferry_proxy::run::spawn(&opts, rx, &mut rt.admin, rt.cancel.clone()).await?;
    let _cancel = rt.serve_admin(&args.run).await?;
    Ok(handle.await.context("proxy task")??)
}
