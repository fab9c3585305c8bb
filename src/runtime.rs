//! What every long-running subcommand shares: the cluster source, one admin
//! server with one metrics registry, and a cancellation token fired by
//! SIGTERM/SIGINT (graceful drain is each engine's job).

use ferry_cluster::admin::Admin;
use ferry_cluster::{ClusterMetrics, SnapshotRx};
use tokio_util::sync::CancellationToken;

use crate::cli::{RunArgs, SourceArgs};

pub struct Runtime {
    pub cancel: CancellationToken,
    pub admin: Admin,
    pub cluster_metrics: ClusterMetrics,
    /// The kube source's client, once `source()` started one.
    pub kube_client: Option<kube::Client>,
}

impl Runtime {
    /// Creates the registry (with cluster metrics) and installs the signal handler.
    pub fn new() -> Runtime {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            c.cancel();
        });
        let mut admin = Admin::default();
        let cluster_metrics = ClusterMetrics::default();
        cluster_metrics.register(&mut admin.registry);
        Runtime {
            cancel,
            admin,
            cluster_metrics,
            kube_client: None,
        }
    }

    /// Starts the source the flags select; `/readyz` waits for its first snapshot.
    pub async fn source(&mut self, args: &SourceArgs) -> anyhow::Result<SnapshotRx> {
        let (rx, client) = crate::source::start(args, self.cluster_metrics.clone(), self.cancel.clone()).await?;
        self.kube_client = client;
        self.admin
            .readiness("snapshot", ferry_cluster::admin::snapshot_ready(rx.clone()));
        Ok(rx)
    }

    /// Starts the admin server (on the addresses given, if any) with
    /// everything registered so far. Call after the engines have registered.
    pub async fn serve_admin(self, args: &RunArgs) -> anyhow::Result<CancellationToken> {
        self.admin.serve(args.admin_addrs(), self.cancel.clone()).await?;
        Ok(self.cancel)
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
