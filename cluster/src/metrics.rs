//! Source and publisher metrics (Prometheus, via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::Kind;
use crate::snapshot::Snapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// Cheap to clone: every field is a shared handle.
#[derive(Clone, Debug, Default)]
pub struct ClusterMetrics {
    pub objects: Family<KindLabel, Gauge>,
    pub snapshots_published: Counter,
    pub last_publish_seconds: Gauge,
    pub snapshot_generation: Gauge,
    pub source_errors: Family<SourceLabel, Counter>,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_cluster_objects",
            "Objects in the published snapshot, per kind",
            self.objects.clone(),
        );
        registry.register(
            "ferry_cluster_snapshots_published",
            "Snapshots published to the dataplanes",
            self.snapshots_published.clone(),
        );
        registry.register(
            "ferry_cluster_last_publish_timestamp_seconds",
            "Unix time of the last snapshot publish",
            self.last_publish_seconds.clone(),
        );
        registry.register(
            "ferry_cluster_snapshot_generation",
            "Generation of the last published snapshot",
            self.snapshot_generation.clone(),
        );
        registry.register(
            "ferry_cluster_source_errors",
            "Objects or documents a source could not use, and watch failures",
            self.source_errors.clone(),
        );
    }

    pub fn source_error(&self, source: &str) {
        self.source_errors
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc();
    }

    pub(crate) fn published(&self, snap: &Snapshot) {
        for (kind, n) in snap.counts() {
            self.objects
                .get_or_create(&KindLabel { kind: kind_label(kind) })
                .set(n as i64);
        }
        self.snapshots_published.inc();
        self.snapshot_generation.set(snap.generation as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.last_publish_seconds.set(now);
    }
}

fn kind_label(kind: Kind) -> String {
    kind.as_str().to_string()
}
