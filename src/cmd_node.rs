//! `ferry node`: proxy, DNS and ingress in one process over one shared
//! Snapshot (one source, so one watch per kind), with one admin server.
//! A part that fails to start or stops with an error is reported in
//! `/readyz`; the other parts keep running.

use clap::Args;
use ferry_cluster::admin::Parts;
use ferry_cluster::lease::{LeaderElector, LeaseConfig};

use crate::cli::RunArgs;
use crate::cmd_dns::DnsOpts;
use crate::cmd_ingress::IngressOpts;
use crate::cmd_proxy::ProxyOpts;

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub proxy: ProxyOpts,
    #[command(flatten)]
    pub dns: DnsOpts,
    #[command(flatten)]
    pub ingress: IngressOpts,
    /// Do not run the service proxy.
    #[arg(long)]
    pub no_proxy: bool,
    /// Do not run the DNS server.
    #[arg(long)]
    pub no_dns: bool,
    /// Do not run the ingress proxy.
    #[arg(long)]
    pub no_ingress: bool,
    /// Namespace of the Lease that elects the one node writing Ingress
    /// status (default: $POD_NAMESPACE, else ferry-system).
    #[arg(long, value_name = "NS")]
    pub lease_namespace: Option<String>,
    /// Name of that Lease.
    #[arg(long, value_name = "NAME", default_value = "ferry-ingress-status")]
    pub lease_name: String,
    /// The cluster DNS Service (`NAMESPACE/NAME`) whose ClusterIPs this node
    /// answers itself, whatever its endpoints: pods keep their resolv.conf
    /// and CoreDNS can be scaled to zero. Empty disables it. Its port is
    /// the one of `--listen`.
    #[arg(long, value_name = "NS/NAME", default_value = "kube-system/kube-dns")]
    pub dns_service: String,
    /// Remove everything ferry may have left on this node (every proxy
    /// mode's rules, maps and links; the cluster DNS addresses and their
    /// NOTRACK table), then exit: what to run after deleting the DaemonSet.
    #[arg(long)]
    pub cleanup: bool,
}

pub async fn run(mut args: NodeArgs) -> anyhow::Result<()> {
    if args.cleanup {
        return cleanup(&args);
    }
    if args.no_proxy && args.no_dns && args.no_ingress {
        anyhow::bail!("--no-proxy, --no-dns and --no-ingress together leave nothing to run");
    }
    let local_dns = ferry_dns::takeover::parse_service(&args.dns_service).map_err(anyhow::Error::msg)?;
    if args.no_dns {
        // Nothing answers those IPs here: the proxy must program them.
        args.proxy.local_dns = None;
    } else {
        args.proxy.local_dns = local_dns.clone();
        args.dns.takeover = local_dns.clone();
        if local_dns.is_none() {
            crate::cmd_dns::disable_takeover();
        }
    }
    if !args.no_proxy {
        crate::source::warn_if_proxy_needs_apiserver(&args.run.source);
    }
    let mut rt = crate::runtime::Runtime::new();
    let snapshots = rt.source(&args.run.source).await?;
    let mut parts = Parts::new(rt.cancel.clone());

    if !args.no_proxy {
        let opts = args.proxy.options();
        match ferry_proxy::run::spawn(&opts, snapshots.clone(), &mut rt.admin, rt.cancel.clone()).await {
            Ok(h) => parts.started("proxy", h),
            Err(e) => parts.failed("proxy", e.to_string()),
        }
    }
    if !args.no_dns {
        let opts = args.dns.options();
        match ferry_dns::run::spawn(&opts, snapshots.clone(), &mut rt.admin, rt.cancel.clone()).await {
            Ok(h) => parts.started("dns", h),
            Err(e) => parts.failed("dns", e.to_string()),
        }
    }
    let mut ingress = None;
    if !args.no_ingress {
        match crate::cmd_ingress::spawn(&mut rt, snapshots.clone(), &args.ingress).await {
            Ok(running) => {
                ingress = Some((running.engine.problems(), running.metrics.clone()));
                parts.started("ingress", running.task);
            }
            Err(e) => parts.failed("ingress", format!("{e:#}")),
        }
    }
    // Ingress status and Events are cluster-wide state: only the elected
    // node writes them.
    if let (false, Some(client)) = (args.no_ingress, rt.kube_client.clone()) {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "ferry-system".into());
        let identity = args.proxy.node_config().node_name;
        let config = LeaseConfig::new(&namespace, &args.lease_name, &identity);
        let (elector, is_leader) = LeaderElector::new(client.clone(), config);
        tokio::spawn(elector.run(rt.cancel.clone()));
        if let Some((problems, metrics)) = ingress {
            tokio::spawn(ferry_ingress::events::run_while_leader(
                client.clone(),
                problems,
                ferry_ingress::events::EventConfig::new(&identity),
                metrics,
                is_leader.clone(),
                rt.cancel.clone(),
            ));
        }
        tokio::spawn(ferry_ingress::status::run_while_leader(
            client,
            snapshots.clone(),
            args.ingress.classes(),
            args.ingress.status_source(),
            is_leader,
            rt.cancel.clone(),
        ));
    }

    parts.register(&mut rt.admin);
    let _cancel = rt.serve_admin(&args.run).await?;
    if let Some(failures) = parts.none_running() {
        anyhow::bail!("no part could start: {failures}");
    }
    parts.wait().await;
    Ok(())
}

/// `ferry node --cleanup`.
fn cleanup(args: &NodeArgs) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (mode, result) in ferry_proxy::run::remove_modes(&args.proxy.options(), None) {
        match result {
            Ok(()) => println!("ferry node: removed what proxy mode {mode} left, if anything"),
            Err(e) => failed.push(format!("proxy mode {mode}: {e}")),
        }
    }
    if let Err(e) = crate::cmd_dns::remove_takeover() {
        failed.push(format!("cluster DNS addresses: {e}"));
    } else {
        println!("ferry node: removed the cluster DNS addresses (lo:ferry-dns) and table ip ferry-dns, if any");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleanup incomplete: {}", failed.join("; "))
    }
}
