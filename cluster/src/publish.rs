//! The publisher: folds source `Change`s into the `Store` and publishes a new
//! `Arc<Snapshot>` on a `tokio::sync::watch` channel, debounced so a burst of
//! changes becomes one snapshot. Nothing is published until every kind has
//! been listed once, so consumers never see a half-listed cluster.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::ClusterMetrics;
use crate::snapshot::Snapshot;
use crate::store::{Change, Store};

/// Default debounce between a change and its snapshot.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// What consumers hold: `None` until the first complete snapshot.
pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;

/// Where sources send changes.
pub type ChangeTx = mpsc::UnboundedSender<Change>;

pub struct Publisher {
    changes: mpsc::UnboundedReceiver<Change>,
    out: watch::Sender<Option<Arc<Snapshot>>>,
    debounce: Duration,
    metrics: ClusterMetrics,
    store: Store,
    generation: u64,
}

impl Publisher {
    pub fn new(debounce: Duration, metrics: ClusterMetrics) -> (Publisher, ChangeTx, SnapshotRx) {
        let (tx, changes) = mpsc::unbounded_channel();
        let (out, rx) = watch::channel(None);
        (
            Publisher {
                changes,
                out,
                debounce,
                metrics,
                store: Store::default(),
                generation: 0,
            },
            tx,
            rx,
        )
    }

    /// Runs until cancelled or until every sender is gone.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut deadline: Option<Instant> = None;
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                change = self.changes.recv() => {
                    let Some(change) = change else {
                        if deadline.is_some() { self.publish(); }
                        return;
                    };
                    let mut changed = self.store.change(change);
                    // Drain what is already queued before deciding.
                    while let Ok(more) = self.changes.try_recv() {
                        changed |= self.store.change(more);
                    }
                    if changed && deadline.is_none() {
                        deadline = Some(Instant::now() + self.debounce);
                    }
                }
                _ = sleep => {
                    deadline = None;
                    self.publish();
                }
            }
        }
    }

    fn publish(&mut self) {
        if !self.store.fully_listed() {
            tracing::debug!("not publishing: some kinds have not been listed yet");
            return;
        }
        self.generation += 1;
        let snap = Arc::new(self.store.snapshot(self.generation));
        self.metrics.published(&snap);
        tracing::debug!(
            generation = self.generation,
            services = snap.service_count(),
            "snapshot published"
        );
        self.out.send_replace(Some(snap));
    }
}
