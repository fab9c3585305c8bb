//! The ingress engine's one way to run: `spawn` registers metrics and
//! readiness, binds the listeners (errors surface at start), follows the
//! snapshot stream and serves until cancelled, then drains.

use std::net::SocketAddr;

use ferry_cluster::admin::Admin;
use ferry_cluster::SnapshotRx;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineConfig, IngressError, IngressMetrics, Listeners};

/// How the ingress engine runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub engine: EngineConfig,
    /// Plain HTTP listener.
    pub http: Option<SocketAddr>,
    /// HTTPS listener.
    pub https: Option<SocketAddr>,
}

/// A started engine.
pub struct Running {
    /// Ends after the drain that follows `cancel`.
    pub task: JoinHandle<Result<(), IngressError>>,
    /// The engine (its problems feed the Event writer).
    pub engine: Engine,
    pub metrics: IngressMetrics,
}

/// Starts the ingress engine.
pub async fn spawn(
    opts: &Options,
    snapshots: SnapshotRx,
    admin: &mut Admin,
    cancel: CancellationToken,
) -> Result<Running, IngressError> {
    let metrics = IngressMetrics::default();
    metrics.register(&mut admin.registry);
    let engine = Engine::new(opts.engine.clone(), metrics.clone())?;
    let listeners = Listeners::bind(opts.http, opts.https).await?;
    let ready = engine.clone();
    admin.readiness("ingress", move || {
        if ready.applied() > 0 {
            Ok(())
        } else {
            Err("no route table applied yet".into())
        }
    });
    let follower = engine.clone();
    let follow_cancel = cancel.clone();
    tokio::spawn(async move { follower.follow(snapshots, follow_cancel).await });
    let server = engine.clone();
    Ok(Running {
        task: tokio::spawn(async move { server.serve(listeners, cancel).await }),
        engine,
        metrics,
    })
}
