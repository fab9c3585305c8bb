//! Prometheus metrics of the ingress engine: requests by host, status and
//! upstream; upstream response-header latency; open connections; reloads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The routed host (empty when no route matched, to bound cardinality).
    pub host: String,
    pub status: u16,
    /// `namespace/service:port`, empty when no route matched.
    pub upstream: String,
}

/// Why ferry closed a downstream connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: &'static str,
}

/// What became of a Kubernetes Event for a configuration problem.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `written`, `failed` or `dropped` (over the queue bound).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Cheap to clone: every field is an `Arc` inside.
#[derive(Clone, Debug)]
pub struct IngressMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_latency: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub open_connections: Gauge,
    pub reloads: Counter,
    pub config_problems: Gauge,
    /// The part of `config_problems` about annotations.
    pub annotation_problems: Gauge,
    /// Kubernetes Events for configuration problems, by result.
    pub events: Family<EventLabels, Counter>,
    pub upstream_connect_failures: Family<UpstreamLabels, Counter>,
    pub retries: Counter,
    pub ejections: Counter,
    pub connections_accepted: Counter,
    /// Refused at a listener's cap with no idle connection to shed.
    pub connections_refused: Counter,
    /// Idle connections closed to admit new ones.
    pub connections_shed: Counter,
    pub connections_closed: Family<CloseLabels, Counter>,
    pub memory_trims: Counter,
    /// Access-log lines written, and dropped because the writer fell behind.
    pub access_log_lines: Counter,
    pub access_log_dropped: Counter,
    /// Connections served by hyper rather than ferry's HTTP/1.1 path
    /// (from their first request that needs it: HTTP/2, a body, an
    /// upgrade, HTTP/1.0, a head hyper answers).
    pub hyper_connections: Counter,
    /// Requests refused by the HTTP/1.1 path's framing rules.
    pub http1_framing_refused: Counter,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        IngressMetrics {
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            open_connections: Gauge::default(),
            reloads: Counter::default(),
            config_problems: Gauge::default(),
            annotation_problems: Gauge::default(),
            events: Family::default(),
            upstream_connect_failures: Family::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            connections_shed: Counter::default(),
            connections_closed: Family::default(),
            memory_trims: Counter::default(),
            access_log_lines: Counter::default(),
            access_log_dropped: Counter::default(),
            hyper_connections: Counter::default(),
            http1_framing_refused: Counter::default(),
        }
    }
}

impl IngressMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ferry_ingress");
        r.register(
            "requests",
            "HTTP requests by routed host, status and upstream",
            self.requests.clone(),
        );
        r.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response headers",
            self.upstream_latency.clone(),
        );
        r.register(
            "open_connections",
            "Downstream connections open",
            self.open_connections.clone(),
        );
        r.register("reloads", "Route table reloads applied", self.reloads.clone());
        r.register(
            "config_problems",
            "Problems found in the last compiled configuration",
            self.config_problems.clone(),
        );
        r.register(
            "annotation_problems",
            "Annotations of served Ingresses that are not supported, refused or do not parse",
            self.annotation_problems.clone(),
        );
        r.register(
            "config_problem_events",
            "Kubernetes Events for configuration problems, by result (written, failed, dropped)",
            self.events.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Failed connection attempts to upstream endpoints",
            self.upstream_connect_failures.clone(),
        );
        r.register("retries", "Requests retried on another endpoint", self.retries.clone());
        r.register(
            "ejections",
            "Endpoints ejected after consecutive connect failures",
            self.ejections.clone(),
        );
        r.register(
            "connections_accepted",
            "Downstream connections accepted",
            self.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused at a listener's cap with none idle to shed",
            self.connections_refused.clone(),
        );
        r.register(
            "connections_shed",
            "Idle connections closed to admit new clients (or free descriptors)",
            self.connections_shed.clone(),
        );
        r.register(
            "connections_closed_by_limit",
            "Connections ferry closed, by reason (timeouts, shedding, cancelled streams, drain)",
            self.connections_closed.clone(),
        );
        r.register(
            "memory_trims",
            "Times freed heap was returned to the kernel after a connection burst",
            self.memory_trims.clone(),
        );
        r.register(
            "access_log_lines",
            "Access-log lines formatted",
            self.access_log_lines.clone(),
        );
        r.register(
            "access_log_dropped_lines",
            "Access-log lines dropped because the log writer fell behind",
            self.access_log_dropped.clone(),
        );
        r.register(
            "hyper_connections",
            "Connections served by hyper from some request on, not by ferry's HTTP/1.1 path (HTTP/2, request bodies, upgrades, HTTP/1.0, heads hyper answers)",
            self.hyper_connections.clone(),
        );
        r.register(
            "http1_framing_refused",
            "Requests refused with 400 for conflicting framing (Content-Length with Transfer-Encoding, or repeated Content-Length)",
            self.http1_framing_refused.clone(),
        );
    }
}
