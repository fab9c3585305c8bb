//! Answering the cluster DNS Service's ClusterIPs on this node itself (the
//! NodeLocal DNSCache idea, built in): pods keep the resolv.conf kubelet
//! gives them (nameserver = the `kube-dns` ClusterIP), and every node's
//! ferry answers those queries locally, whatever the Service's endpoints
//! are. No cross-node hop, no DNAT.
//!
//! How: the Service's ClusterIPs become local addresses of the node
//! (`crate::link`: on `lo`, labelled `lo:ferry-dns`), ferry's DNS server binds UDP and TCP sockets on each
//! of them, and the Service proxy leaves that Service's port 53 alone (the
//! planner's `NodeConfig::local_dns`). The addresses follow the Service:
//! added when it appears, dropped when it goes. The addresses stay on
//! shutdown so that a restarting ferry's gap answers "port unreachable" at
//! once instead of routing the queries elsewhere.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::{ObjectKey, Snapshot, SnapshotRx};
use tokio_util::sync::CancellationToken;

use crate::server::{BoundSockets, DnsServer};

/// Retry period after a failure to program the device or bind.
const RETRY: Duration = Duration::from_secs(5);

/// Called with the taken-over addresses after each change (ferry node
/// installs the NOTRACK rules with it); an error is logged, not retried.
pub type AddressHook = Arc<dyn Fn(&[IpAddr]) -> Result<(), String> + Send + Sync>;

/// What to take over and how.
#[derive(Clone)]
pub struct TakeoverConfig {
    /// The cluster DNS Service (`kube-system/kube-dns`).
    pub service: ObjectKey,
    /// The label of the local addresses holding its IPs.
    pub label: String,
    /// Port to listen on at those IPs (53; tests use others).
    pub port: u16,
    /// UDP sockets per address.
    pub workers: usize,
    pub on_change: Option<AddressHook>,
}

/// Parses `NS/NAME`; empty means "no takeover".
pub fn parse_service(s: &str) -> Result<Option<ObjectKey>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Some(ObjectKey::new(ns, name)))
        }
        _ => Err(format!(
            "--dns-service {s:?}: expected NAMESPACE/NAME (or \"\" to disable)"
        )),
    }
}

/// The addresses to take over in `snap`: the Service's ClusterIPs (none
/// for a missing or headless Service).
pub fn service_ips(snap: &Snapshot, service: &ObjectKey) -> Vec<IpAddr> {
    let mut ips = snap
        .service(&service.namespace, &service.name)
        .map(|s| s.cluster_ips.clone())
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    ips
}

/// Follows snapshots until `cancel`: keeps the device's addresses equal to
/// the Service's ClusterIPs and a listener on each. Failures are logged and
/// retried; the listeners already running keep serving.
pub async fn run(cfg: TakeoverConfig, server: DnsServer, mut snapshots: SnapshotRx, cancel: CancellationToken) {
    let mut listening: BTreeMap<IpAddr, CancellationToken> = BTreeMap::new();
    let mut programmed: Option<Vec<IpAddr>> = None;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        let mut failed = false;
        if let Some(snap) = snap {
            let want = service_ips(&snap, &cfg.service);
            server.forbid_upstreams(want.clone());
            if programmed.as_ref() != Some(&want) {
                let (label, ips, hook) = (cfg.label.clone(), want.clone(), cfg.on_change.clone());
                let programmed_now = tokio::task::spawn_blocking(move || {
                    let added = crate::link::ensure(&label, &ips)?;
                    if let Some(Err(e)) = hook.map(|h| h(&ips)) {
                        tracing::warn!(error = %e, "dns takeover: addresses in place, but their NOTRACK rules are not (queries make conntrack entries)");
                    }
                    Ok::<_, std::io::Error>(added)
                })
                .await;
                match programmed_now {
                    Ok(Ok(_added)) => {
                        // Also after a restart, when the addresses were already there.
                        if !want.is_empty() {
                            tracing::info!(service = %cfg.service, label = %cfg.label, addresses = ?want, "dns: answering the cluster DNS Service's addresses on this node");
                        }
                        programmed = Some(want.clone());
                    }
                    Ok(Err(e)) => {
                        tracing::error!(label = %cfg.label, error = %e, "dns takeover: cannot add the addresses; retrying");
                        failed = true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "dns takeover: address task failed; retrying");
                        failed = true;
                    }
                }
            }
            listening.retain(|ip, token| {
                let keep = want.contains(ip) && !token.is_cancelled();
                if !keep {
                    token.cancel();
                    tracing::info!(address = %ip, "dns takeover: address gone; listener closed");
                }
                keep
            });
            if programmed.as_ref() == Some(&want) {
                let missing: Vec<IpAddr> = want.iter().filter(|ip| !listening.contains_key(ip)).copied().collect();
                for ip in &missing {
                    let addr = SocketAddr::new(*ip, cfg.port);
                    match BoundSockets::bind(addr, cfg.workers) {
                        Ok(sockets) => {
                            let token = cancel.child_token();
                            let (server, t) = (server.clone(), token.clone());
                            tokio::spawn(async move {
                                if let Err(e) = server.serve_sockets(sockets, t.clone()).await {
                                    tracing::error!(%addr, error = %e, "dns takeover: listener stopped");
                                }
                                // Marks it for a new bind on the next pass.
                                t.cancel();
                            });
                            listening.insert(*ip, token);
                        }
                        Err(e) => {
                            tracing::error!(%addr, error = %e, "dns takeover: cannot listen; retrying");
                            failed = true;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = snapshots.changed() => if r.is_err() {
                cancel.cancelled().await;
                break;
            },
            _ = tokio::time::sleep(RETRY), if failed => {
                programmed = None;
            }
        }
    }
    for token in listening.values() {
        token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_service_flag() {
        assert_eq!(
            parse_service("kube-system/kube-dns").unwrap(),
            Some(ObjectKey::new("kube-system", "kube-dns"))
        );
        assert_eq!(parse_service("").unwrap(), None);
        assert_eq!(parse_service("  ").unwrap(), None);
        for bad in ["kube-dns", "/x", "x/", "a/b/c"] {
            assert!(parse_service(bad).unwrap_err().contains("NAMESPACE/NAME"), "{bad}");
        }
    }
}
