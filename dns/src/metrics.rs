//! DNS metrics: queries by type and rcode, cache hits, upstream latency,
//! zone size. Counters on the request path are resolved once at start-up so
//! that counting a query is one atomic add, not a label-map lookup.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub qtype: String,
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

const TYPES: [RecordType; 10] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::PTR,
    RecordType::CNAME,
    RecordType::TXT,
    RecordType::SOA,
    RecordType::NS,
    RecordType::MX,
    RecordType::ANY,
];
const RCODES: [ResponseCode; 6] = [
    ResponseCode::NoError,
    ResponseCode::FormErr,
    ResponseCode::ServFail,
    ResponseCode::NXDomain,
    ResponseCode::NotImp,
    ResponseCode::Refused,
];

/// Mnemonics as dig prints them, in `RCODES` order.
const RCODE_LABELS: [&str; 6] = ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"];

fn upstream_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Cheap to clone: every field is a shared handle.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    /// `TYPES` × `RCODES` plus an "other" row and column, resolved at start.
    fast: Arc<Vec<Counter>>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub upstream_latency: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<UpstreamLabels, Counter>,
    pub loops_refused: Counter,
    pub dropped: Counter,
    pub zone_names: Gauge,
    pub zone_records: Gauge,
    pub zone_generation: Gauge,
    pub zone_builds: Counter,
    /// TCP connections closed by a limit, by which.
    pub tcp_closed: Family<TcpCloseLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TcpCloseLabels {
    pub reason: &'static str,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let queries: Family<QueryLabels, Counter> = Family::default();
        let mut fast = Vec::with_capacity((TYPES.len() + 1) * (RCODES.len() + 1));
        for t in TYPES.iter().map(|t| t.to_string()).chain(["other".to_string()]) {
            for r in RCODE_LABELS.iter().map(|r| r.to_string()).chain(["other".to_string()]) {
                fast.push(
                    queries
                        .get_or_create(&QueryLabels {
                            qtype: t.clone(),
                            rcode: r,
                        })
                        .clone(),
                );
            }
        }
        DnsMetrics {
            queries,
            fast: Arc::new(fast),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            upstream_latency: Family::new_with_constructor(upstream_histogram as fn() -> Histogram),
            upstream_errors: Family::default(),
            loops_refused: Counter::default(),
            dropped: Counter::default(),
            zone_names: Gauge::default(),
            zone_records: Gauge::default(),
            zone_generation: Gauge::default(),
            zone_builds: Counter::default(),
            tcp_closed: Family::default(),
        }
    }
}

impl DnsMetrics {
    /// Counts a TCP connection closed by `reason` (a `TcpLimits` field).
    pub fn tcp_closed(&self, reason: &'static str) {
        self.tcp_closed.get_or_create(&TcpCloseLabels { reason }).inc();
    }

    /// Counts one answered query.
    pub fn query(&self, qtype: Option<RecordType>, rcode: ResponseCode) {
        let t = qtype
            .and_then(|q| TYPES.iter().position(|&x| x == q))
            .unwrap_or(TYPES.len());
        let r = RCODES.iter().position(|&x| x == rcode).unwrap_or(RCODES.len());
        if let Some(c) = self.fast.get(t * (RCODES.len() + 1) + r) {
            c.inc();
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ferry_dns_queries",
            "DNS queries answered, by type and rcode",
            self.queries.clone(),
        );
        registry.register(
            "ferry_dns_cache_hits",
            "Forwarded queries answered from the cache",
            self.cache_hits.clone(),
        );
        registry.register(
            "ferry_dns_cache_misses",
            "Forwarded queries sent upstream",
            self.cache_misses.clone(),
        );
        registry.register(
            "ferry_dns_upstream_latency_seconds",
            "Latency of successful upstream exchanges",
            self.upstream_latency.clone(),
        );
        registry.register(
            "ferry_dns_upstream_errors",
            "Upstream exchanges that timed out or failed",
            self.upstream_errors.clone(),
        );
        registry.register(
            "ferry_dns_loops_refused",
            "Queries refused because they were our own forwarded queries coming back",
            self.loops_refused.clone(),
        );
        registry.register(
            "ferry_dns_dropped",
            "Packets dropped unanswered (no header, or a response)",
            self.dropped.clone(),
        );
        registry.register(
            "ferry_dns_zone_names",
            "Names in the cluster zone index",
            self.zone_names.clone(),
        );
        registry.register(
            "ferry_dns_zone_records",
            "Records in the cluster zone",
            self.zone_records.clone(),
        );
        registry.register(
            "ferry_dns_zone_generation",
            "Snapshot generation the zone was built from",
            self.zone_generation.clone(),
        );
        registry.register(
            "ferry_dns_zone_builds",
            "Zones built from snapshots",
            self.zone_builds.clone(),
        );
        registry.register(
            "ferry_dns_tcp_closed_by_limit",
            "DNS TCP connections closed by a timeout, by reason",
            self.tcp_closed.clone(),
        );
    }
}
