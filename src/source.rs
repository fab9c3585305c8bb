//! Starting the cluster source the flags select (files with `-f`, else the
//! apiserver) and the publisher in front of it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_cluster::files::FileSource;
use ferry_cluster::kube::KubeSource;
use ferry_cluster::{ClusterMetrics, Publisher, Snapshot, SnapshotRx};
use tokio_util::sync::CancellationToken;

use crate::cli::SourceArgs;

/// Spawns the source and the publisher; returns the snapshot channel
/// (`None` until the first complete snapshot) and, for the kube source, its
/// client, so writers (Ingress status, leases) share one connection pool.
pub async fn start(
    args: &SourceArgs,
    metrics: ClusterMetrics,
    cancel: CancellationToken,
) -> anyhow::Result<(SnapshotRx, Option<kube::Client>)> {
    check_paths(args)?;
    let (publisher, tx, rx) = Publisher::new(Duration::from_millis(args.debounce_ms), metrics.clone());
    let mut client = None;
    if !args.files.is_empty() {
        let source = FileSource::new(args.files.clone(), metrics);
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = source.run(tx, c).await {
                tracing::error!(error = %e, "file source stopped");
            }
        });
    } else {
        let kube = ferry_cluster::kube::client(args.kubeconfig.as_deref(), args.apiserver())
            .await
            .context("connecting to the apiserver (or pass -f PATH for the file source)")?;
        let source = KubeSource::new(kube.clone(), metrics);
        client = Some(kube);
        let c = cancel.clone();
        tokio::spawn(async move { source.run(tx, c).await });
    }
    tokio::spawn(publisher.run(cancel));
    Ok((rx, client))
}

/// Loads the source once and returns its first complete snapshot. File
/// errors are printed and the rest still loads, as in the long-running mode.
pub async fn load_once(args: &SourceArgs) -> anyhow::Result<Arc<Snapshot>> {
    check_paths(args)?;
    if !args.files.is_empty() {
        let (objects, errors) = ferry_cluster::files::load(&args.files);
        for e in &errors {
            eprintln!("ferry: {e}");
        }
        if objects.is_empty() && !errors.is_empty() {
            anyhow::bail!("nothing could be loaded from {:?}", args.files);
        }
        return Ok(Arc::new(Snapshot::from_objects(1, objects)));
    }
    let cancel = CancellationToken::new();
    let (mut rx, _) = start(args, ClusterMetrics::default(), cancel.clone()).await?;
    let snap = rx
        .wait_for(Option::is_some)
        .await
        .context("the source stopped before its first snapshot")?
        .clone();
    cancel.cancel();
    snap.context("no snapshot")
}

/// A path given with `-f` that does not exist is a mistake in the command
/// line, not a file to wait for: fail at once with its name.
fn check_paths(args: &SourceArgs) -> anyhow::Result<()> {
    for p in &args.files {
        std::fs::metadata(p).with_context(|| format!("-f {}", p.display()))?;
    }
    Ok(())
}

/// A Service proxy that reads the apiserver through the in-cluster URL dials
/// the `kubernetes` ClusterIP, which nothing programs until the proxy has
/// synced once: on a node without another proxy it never connects.
pub fn warn_if_proxy_needs_apiserver(args: &SourceArgs) {
    if args.files.is_empty()
        && args.kubeconfig.is_none()
        && std::env::var_os("KUBECONFIG").is_none()
        && args.apiserver().is_none()
        && ferry_cluster::kube::in_cluster()
    {
        tracing::warn!(
            "the Service proxy reads the apiserver through the in-cluster address (the `kubernetes` ClusterIP), \
             which only a running Service proxy makes reachable; without another proxy on this node it never connects. \
             Pass --apiserver https://HOST:PORT (ConfigMap key APISERVER; minikube: https://control-plane.minikube.internal:8443)"
        );
    }
}
