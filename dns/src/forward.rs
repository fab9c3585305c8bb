//! Forwarding names outside the cluster zone to upstream nameservers: UDP
//! with TCP fallback on truncation, a timeout per attempt, failover to the
//! next upstream (remembering the last good one), a bounded cache that
//! honours TTLs (positive and negative), and refusal of our own queries
//! coming back to us (a forwarding loop).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::error::DnsError;
use crate::metrics::{DnsMetrics, UpstreamLabels};
use crate::wire::{Request, MAX_UDP_PAYLOAD};

#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub upstreams: Vec<SocketAddr>,
    /// Per attempt, per upstream.
    pub timeout: Duration,
    /// Cache entries at most.
    pub cache_size: usize,
    /// Cap on a positive answer's cache time.
    pub max_ttl: u32,
    /// Cap on a negative answer's cache time.
    pub max_negative_ttl: u32,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        ForwarderConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            cache_size: 10_000,
            max_ttl: 3600,
            max_negative_ttl: 300,
        }
    }
}

/// How long an upstream answer may be cached, or `None` when it must not be.
pub fn cache_ttl(msg: &Message, max_ttl: u32, max_negative_ttl: u32) -> Option<u32> {
    if msg.metadata.truncation {
        return None;
    }
    let rcode = msg.metadata.response_code;
    let ttl = if rcode == ResponseCode::NoError && !msg.answers.is_empty() {
        msg.answers.iter().map(|r| r.ttl).min()?.min(max_ttl)
    } else if rcode == ResponseCode::NXDomain || rcode == ResponseCode::NoError {
        // RFC 2308: the negative TTL is min(SOA TTL, SOA MINIMUM).
        msg.authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?
            .min(max_negative_ttl)
    } else {
        return None;
    };
    (ttl > 0).then_some(ttl)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: Vec<u8>,
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
    checking_disabled: bool,
}

struct CacheEntry {
    stored: Instant,
    expires: Instant,
    message: Message,
}

/// A bounded TTL cache. Time is passed in, so it is tested without sleeping.
pub struct Cache {
    map: HashMap<CacheKey, CacheEntry>,
    capacity: usize,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Cache {
            map: HashMap::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Message> {
        let entry = self.map.get(key)?;
        if entry.expires <= now {
            self.map.remove(key);
            return None;
        }
        let elapsed = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut msg = entry.message.clone();
        for r in msg
            .answers
            .iter_mut()
            .chain(msg.authorities.iter_mut())
            .chain(msg.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(elapsed);
        }
        Some(msg)
    }

    fn insert(&mut self, key: CacheKey, message: Message, ttl: u32, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.capacity {
                // Still full of live entries: evict an arbitrary one.
                if let Some(k) = self.map.keys().next().cloned() {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(
            key,
            CacheEntry {
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
                message,
            },
        );
    }
}

/// Key of a query we have in flight upstream, to recognize it if it comes
/// back to us. Upstream queries keep the client's id for this reason: a
/// chain of forwarders that loops back to us presents the same (id, name,
/// type), so the loop is cut at its first turn. (Spoofing resistance comes
/// from the fresh random source port of every exchange and the question
/// check on the answer.)
type InflightKey = (u16, Vec<u8>, u16);

pub struct Forwarder {
    cfg: ForwarderConfig,
    cache: Mutex<Cache>,
    inflight: Mutex<HashMap<InflightKey, usize>>,
    /// Index of the upstream that answered last; tried first.
    preferred: AtomicUsize,
    /// Addresses that are ferry itself (the cluster DNS Service's IPs,
    /// known only from snapshots): never upstreams, even when resolv.conf
    /// names them (a pod with `dnsPolicy: ClusterFirstWithHostNet`).
    forbidden: ArcSwap<Vec<IpAddr>>,
    metrics: DnsMetrics,
}

impl Forwarder {
    /// Drops upstreams that are our own listening address (a loop) and
    /// fails when none is left.
    pub fn new(mut cfg: ForwarderConfig, own: &[SocketAddr], metrics: DnsMetrics) -> Result<Forwarder, DnsError> {
        cfg.upstreams.retain(|u| {
            let looped = own.iter().any(|o| {
                o == u || (o.port() == u.port() && o.ip().is_unspecified() && (u.ip().is_loopback() || u.ip().is_unspecified()))
            });
            if looped {
                tracing::error!(upstream = %u, "dns: refusing to forward to our own address (a loop); upstream dropped");
            }
            !looped
        });
        if cfg.upstreams.is_empty() {
            return Err(DnsError::NoUpstream(
                "every upstream is empty or our own listen address; pass --upstream ADDR".into(),
            ));
        }
        Ok(Forwarder {
            cache: Mutex::new(Cache::new(cfg.cache_size)),
            cfg,
            inflight: Mutex::new(HashMap::new()),
            preferred: AtomicUsize::new(0),
            forbidden: ArcSwap::from_pointee(Vec::new()),
            metrics,
        })
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.cfg.upstreams
    }

    /// Sets the addresses that answer as ferry itself; upstreams among them
    /// are skipped (logged once per change).
    pub fn forbid(&self, ips: Vec<IpAddr>) {
        if **self.forbidden.load() == ips {
            return;
        }
        for u in self.cfg.upstreams.iter().filter(|u| ips.contains(&u.ip())) {
            tracing::error!(upstream = %u, "dns: upstream is the cluster DNS Service, i.e. ferry itself; not forwarding to it");
        }
        self.forbidden.store(Arc::new(ips));
    }

    /// `true` when `req` is one of our own upstream queries: forwarding it
    /// again would loop forever.
    pub fn is_own_query(&self, req: &Request) -> bool {
        let key = (req.metadata.id, req.key.clone(), u16::from(req.query.query_type()));
        self.inflight.lock().map(|s| s.contains_key(&key)).unwrap_or(false)
    }

    pub fn cached_entries(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Answers `req` from the cache or the upstreams. `Err` when no upstream
    /// gave a usable answer (the caller replies SERVFAIL).
    pub async fn resolve(&self, req: &Request) -> Result<Message, DnsError> {
        let key = CacheKey {
            name: req.key.clone(),
            qtype: u16::from(req.query.query_type()),
            qclass: u16::from(req.query.query_class()),
            dnssec_ok: req.dnssec_ok(),
            checking_disabled: req.metadata.checking_disabled,
        };
        if let Some(msg) = self.cache.lock().ok().and_then(|mut c| c.get(&key, Instant::now())) {
            self.metrics.cache_hits.inc();
            return Ok(msg);
        }
        self.metrics.cache_misses.inc();
        let n = self.cfg.upstreams.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last: Result<Message, DnsError> = Err(DnsError::NoUpstream("no upstream configured".into()));
        for attempt in 0..n {
            let idx = (start + attempt) % n;
            let Some(&upstream) = self.cfg.upstreams.get(idx) else {
                continue;
            };
            if self.forbidden.load().contains(&upstream.ip()) {
                last = Err(DnsError::NoUpstream(format!(
                    "upstream {upstream} is the cluster DNS Service (ferry itself)"
                )));
                continue;
            }
            let id = req.metadata.id;
            let inflight_key = (id, req.key.clone(), key.qtype);
            if let Ok(mut s) = self.inflight.lock() {
                *s.entry(inflight_key.clone()).or_insert(0) += 1;
            }
            let began = Instant::now();
            let result = self
                .exchange(upstream, id, &req.query, key.dnssec_ok, key.checking_disabled)
                .await;
            if let Ok(mut s) = self.inflight.lock() {
                if let Some(n) = s.get_mut(&inflight_key) {
                    *n -= 1;
                    if *n == 0 {
                        s.remove(&inflight_key);
                    }
                }
            }
            let label = UpstreamLabels {
                upstream: upstream.to_string(),
            };
            match result {
                Ok(msg)
                    if !matches!(
                        msg.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) =>
                {
                    self.metrics
                        .upstream_latency
                        .get_or_create(&label)
                        .observe(began.elapsed().as_secs_f64());
                    self.preferred.store(idx, Ordering::Relaxed);
                    if let Some(ttl) = cache_ttl(&msg, self.cfg.max_ttl, self.cfg.max_negative_ttl) {
                        if let Ok(mut c) = self.cache.lock() {
                            c.insert(key, msg.clone(), ttl, Instant::now());
                        }
                    }
                    return Ok(msg);
                }
                Ok(msg) => {
                    tracing::debug!(%upstream, rcode = %msg.metadata.response_code, "dns: upstream failed the query; trying the next");
                    self.metrics.upstream_errors.get_or_create(&label).inc();
                    last = Ok(msg);
                }
                Err(e) => {
                    tracing::debug!(%upstream, error = %e, "dns: upstream exchange failed; trying the next");
                    self.metrics.upstream_errors.get_or_create(&label).inc();
                    if last.is_err() {
                        last = Err(e);
                    }
                }
            }
        }
        last
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        id: u16,
        query: &Query,
        dnssec_ok: bool,
        checking_disabled: bool,
    ) -> Result<Message, DnsError> {
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.metadata.checking_disabled = checking_disabled;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        edns.set_dnssec_ok(dnssec_ok);
        msg.set_edns(edns);
        let bytes = msg.to_vec().map_err(|e| DnsError::Encode(e.to_string()))?;
        let err = |reason: String| DnsError::Upstream { addr: upstream, reason };
        let t = self.cfg.timeout;
        let udp = tokio::time::timeout(t, udp_exchange(upstream, &bytes, id, query))
            .await
            .map_err(|_| err(format!("no UDP answer within {t:?}")))??;
        if !udp.metadata.truncation {
            return Ok(udp);
        }
        tokio::time::timeout(t, tcp_exchange(upstream, &bytes, id, query))
            .await
            .map_err(|_| err(format!("no TCP answer within {t:?}")))?
    }
}

fn answers_query(msg: &Message, id: u16, query: &Query) -> bool {
    msg.metadata.id == id
        && msg.metadata.message_type == MessageType::Response
        && msg.queries.len() == 1
        && msg.queries.first().is_some_and(|q| {
            q.query_type() == query.query_type()
                && q.query_class() == query.query_class()
                && q.name().eq_ignore_root(query.name())
        })
}

async fn udp_exchange(upstream: SocketAddr, bytes: &[u8], id: u16, query: &Query) -> Result<Message, DnsError> {
    let err = |reason: String| DnsError::Upstream { addr: upstream, reason };
    let local: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(local).await.map_err(|e| err(e.to_string()))?;
    sock.connect(upstream).await.map_err(|e| err(e.to_string()))?;
    sock.send(bytes).await.map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| err(e.to_string()))?;
        // Anything that is not the answer to this query (spoofed, stale)
        // is ignored; the timeout bounds the wait.
        if let Ok(m) = Message::from_vec(buf.get(..n).unwrap_or_default()) {
            if answers_query(&m, id, query) {
                return Ok(m);
            }
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, bytes: &[u8], id: u16, query: &Query) -> Result<Message, DnsError> {
    let err = |reason: String| DnsError::Upstream { addr: upstream, reason };
    let mut stream = TcpStream::connect(upstream).await.map_err(|e| err(e.to_string()))?;
    let len = u16::try_from(bytes.len()).map_err(|_| err("query too long".into()))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(|e| err(e.to_string()))?;
    let mut lenbuf = [0u8; 2];
    stream.read_exact(&mut lenbuf).await.map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(lenbuf))];
    stream.read_exact(&mut buf).await.map_err(|e| err(e.to_string()))?;
    let m = Message::from_vec(&buf).map_err(|e| err(e.to_string()))?;
    if !answers_query(&m, id, query) {
        return Err(err("TCP answer does not match the query".into()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, Record};

    fn answer(ttls: &[u32]) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for &t in ttls {
            m.add_answer(Record::from_rdata(
                Name::from_ascii("example.com.").unwrap(),
                t,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        let origin = Name::from_ascii("example.com.").unwrap();
        m.add_authority(Record::from_rdata(
            origin.clone(),
            soa_ttl,
            RData::SOA(SOA::new(origin.clone(), origin, 1, 1, 1, 1, minimum)),
        ));
        m
    }

    #[test]
    fn cache_ttl_rules() {
        let cases: Vec<(&str, Message, Option<u32>)> = vec![
            ("positive takes the smallest TTL", answer(&[300, 60]), Some(60)),
            ("positive capped", answer(&[100_000]), Some(3600)),
            ("zero TTL not cached", answer(&[0]), None),
            (
                "NXDOMAIN: min(SOA ttl, minimum)",
                negative(ResponseCode::NXDomain, 900, 30),
                Some(30),
            ),
            (
                "NODATA: negative too",
                negative(ResponseCode::NoError, 20, 600),
                Some(20),
            ),
            (
                "negative capped",
                negative(ResponseCode::NXDomain, 9000, 9000),
                Some(300),
            ),
            (
                "NXDOMAIN without SOA not cached",
                {
                    let mut m = answer(&[]);
                    m.metadata.response_code = ResponseCode::NXDomain;
                    m
                },
                None,
            ),
            (
                "SERVFAIL never cached",
                {
                    let mut m = answer(&[60]);
                    m.metadata.response_code = ResponseCode::ServFail;
                    m
                },
                None,
            ),
            (
                "truncated never cached",
                {
                    let mut m = answer(&[60]);
                    m.metadata.truncation = true;
                    m
                },
                None,
            ),
        ];
        for (what, msg, want) in cases {
            assert_eq!(cache_ttl(&msg, 3600, 300), want, "{what}");
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey {
            name: name.as_bytes().to_vec(),
            qtype: 1,
            qclass: 1,
            dnssec_ok: false,
            checking_disabled: false,
        }
    }

    #[test]
    fn cache_expires_decrements_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = Cache::new(2);
        c.insert(key("a"), answer(&[60]), 60, t0);
        let got = c.get(&key("a"), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(got.answers[0].ttl, 50, "TTL counts down with time in the cache");
        assert!(c.get(&key("a"), t0 + Duration::from_secs(60)).is_none(), "expired");
        assert!(c.is_empty(), "expired entries are removed on access");
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            c.insert(key(n), answer(&[60]), 60, t0 + Duration::from_secs(i as u64));
            assert!(c.len() <= 2, "bounded");
        }
        assert!(
            c.get(&key("d"), t0 + Duration::from_secs(5)).is_some(),
            "newest entry kept"
        );
    }

    #[test]
    fn own_address_is_refused_as_upstream() {
        let own: SocketAddr = "0.0.0.0:5353".parse().unwrap();
        let cfg = ForwarderConfig {
            upstreams: vec!["127.0.0.1:5353".parse().unwrap()],
            ..Default::default()
        };
        assert!(Forwarder::new(cfg, &[own], DnsMetrics::default()).is_err());
        let cfg = ForwarderConfig {
            upstreams: vec!["127.0.0.1:5353".parse().unwrap(), "127.0.0.1:5354".parse().unwrap()],
            ..Default::default()
        };
        let f = Forwarder::new(cfg, &[own], DnsMetrics::default()).unwrap();
        assert_eq!(f.upstreams(), &["127.0.0.1:5354".parse::<SocketAddr>().unwrap()]);
    }
}
