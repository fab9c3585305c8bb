//! `ferry node`: proxy, DNS and ingress in one process over one shared
//! Snapshot (one source, so one watch per kind), with one admin server.
//! A part that fails to start or stops with an error is reported in
//! `/readyz`; the other parts keep running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use clap::Args;
use ferry_cluster::lease::{LeaderElector, LeaseConfig};
use ferry_cluster::SnapshotRx;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// Part name → why it is not running.
type Failures = Arc<Mutex<BTreeMap<&'static str, String>>>;

fn record(failures: &Failures, part: &'static str, why: String) {
    tracing::error!(part, error = %why, "part failed; the others keep running");
    if let Ok(mut f) = failures.lock() {
        f.insert(part, why);
    }
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
    let failures: Failures = Arc::default();
    let mut parts: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)> = Vec::new();

    if !args.no_proxy {
        match crate::cmd_proxy::spawn(&mut rt, snapshots.clone(), &args.proxy).await {
            Ok(h) => parts.push(("proxy", h)),
            Err(e) => record(&failures, "proxy", format!("{e:#}")),
        }
    }
    if !args.no_dns {
        match crate::cmd_dns::spawn(&mut rt, snapshots.clone(), &args.dns).await {
            Ok(h) => parts.push(("dns", h)),
            Err(e) => record(&failures, "dns", format!("{e:#}")),
        }
    }
    if !args.no_ingress {
        match crate::cmd_ingress::spawn(&mut rt, snapshots.clone(), &args.ingress).await {
            Ok(h) => parts.push(("ingress", h)),
            Err(e) => record(&failures, "ingress", format!("{e:#}")),
        }
    }
    // Ingress status is cluster-wide state: only the elected node writes it.
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
        let (snaps, opts, cancel) = (snapshots.clone(), args.ingress.clone(), rt.cancel.clone());
        tokio::spawn(async move { status_while_leader(client, snaps, opts, is_leader, cancel).await });
    }

    let f = failures.clone();
    rt.admin.readiness("parts", move || match f.lock() {
        Ok(f) if f.is_empty() => Ok(()),
        Ok(f) => Err(f
            .iter()
            .map(|(p, why)| format!("{p}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")),
        Err(_) => Err("failure list poisoned".into()),
    });
    let cancel = rt.serve_admin(args.run.admin_addr).await?;
    if parts.is_empty() {
        anyhow::bail!(
            "no part could start: {:?}",
            failures.lock().map(|f| f.clone()).unwrap_or_default()
        );
    }

    let mut waiters = Vec::new();
    for (name, handle) in parts {
        let failures = failures.clone();
        let cancel = cancel.clone();
        waiters.push(tokio::spawn(async move {
            let result = handle.await;
            if cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(Ok(())) => record(&failures, name, "stopped".into()),
                Ok(Err(e)) => record(&failures, name, format!("{e:#}")),
                Err(e) => record(&failures, name, format!("task ended: {e}")),
            }
        }));
    }
    for w in waiters {
        let _ = w.await;
    }
    Ok(())
}

/// Runs the Ingress status loop only while `is_leader` is true; losing the
/// lease cancels it before its next write.
pub async fn status_while_leader(
    client: kube::Client,
    snapshots: SnapshotRx,
    opts: IngressOpts,
    mut is_leader: watch::Receiver<bool>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = is_leader.wait_for(|l| *l) => if r.is_err() { return },
        }
        let term = cancel.child_token();
        let writer = {
            let (client, snapshots, opts, term) = (client.clone(), snapshots.clone(), opts.clone(), term.clone());
            tokio::spawn(async move { crate::cmd_ingress::status_loop(client, snapshots, &opts, term).await })
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = is_leader.wait_for(|l| !*l) => tracing::info!("not the leader any more: Ingress status writes stop"),
        }
        term.cancel();
        let _ = writer.await;
    }
}

/// `ferry node --cleanup`.
fn cleanup(args: &NodeArgs) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (mode, result) in crate::cmd_proxy::remove_modes(&args.proxy, None) {
        match result {
            Ok(()) => println!("ferry node: removed what proxy mode {mode:?} left, if anything"),
            Err(e) => failed.push(format!("proxy mode {mode:?}: {e}")),
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
