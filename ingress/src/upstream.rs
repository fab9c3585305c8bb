//! The upstream side of the request path: per-endpoint state (requests in
//! flight, consecutive connect failures, ejection), keep-alive connection
//! pools (HTTP/1.1 and h2c), load-balancing picks, and the `LiveTable` that
//! pairs a compiled `RouteTable` with that state.
//!
//! Endpoint state outlives reloads: a new table reuses the state (pools,
//! counters, ejection) of every endpoint it keeps, so a config change
//! touches neither open upstream connections nor in-flight accounting;
//! endpoints that disappear are dropped with their idle connections once
//! their last in-flight request finishes.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;

use crate::conn::ClientBody;
use crate::h1::RawConn;
use crate::policy::balance::{self, Chooser, Ewma, PickKey};
use crate::policy::upstream_tls::UpstreamTls;
use crate::routes::{LbMethod, RouteTable, UpstreamSpec};

/// What is sent upstream: the client's body (cut off with an error past
/// the route's size limit), or nothing (rebuilt retries).
pub type UpstreamBody = Either<Limited<ClientBody>, Empty<Bytes>>;

/// Idle HTTP/1.1 connections kept per endpoint and pool slot.
const MAX_IDLE_PER_ENDPOINT: usize = 512;

thread_local! {
    /// The pool slot of this thread: each ingress worker thread has its
    /// own (1..), every other thread shares slot 0.
    static POOL_SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread use pool slot `slot` (ingress worker `slot - 1`).
///
/// A pooled HTTP/1.1 connection is driven by a task on the thread that
/// opened it; handing it to requests on that same thread keeps the
/// request and the connection task on one scheduler, with no cross-thread
/// wake-ups and no lock contention.
pub fn set_pool_slot(slot: usize) {
    POOL_SLOT.with(|s| s.set(slot));
}

/// Tunables of the upstream side.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    /// Consecutive connect failures that eject an endpoint.
    pub max_fails: u32,
    /// How long an ejected endpoint gets no new requests.
    pub eject_for: Duration,
    /// Attempts per request (first try included) across endpoints.
    pub max_attempts: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(60),
            max_fails: 3,
            eject_for: Duration::from_secs(10),
            max_attempts: 3,
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One pod endpoint with its pools and health.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    pub pod: Option<String>,
    pub h2c: bool,
    /// TLS to the endpoint (`h2c` then means h2 over TLS); part of the
    /// endpoint's identity, so pools never mix plain and TLS connections.
    pub tls: Option<Arc<UpstreamTls>>,
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch()` until which the endpoint is ejected.
    ejected_until_ms: AtomicU64,
    /// Idle HTTP/1.1 connections, one pool per slot (see `set_pool_slot`).
    h1_idle: Box<[Mutex<Vec<http1::SendRequest<UpstreamBody>>>]>,
    /// Idle connections of the lean HTTP/1.1 path (`h1`), one pool per slot.
    raw_idle: Box<[Mutex<Vec<RawConn>>]>,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// Response times, for `LbMethod::Ewma`.
    pub ewma: Ewma,
}

/// A connection ready for one request.
pub enum Conn {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// Counts a request in flight on an endpoint until dropped (with the response body).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    /// `pool_slots`: ingress workers + 1 (slot 0 is for every other thread).
    pub fn new(addr: SocketAddr, pod: Option<String>, h2c: bool, pool_slots: usize) -> EndpointState {
        EndpointState {
            addr,
            pod,
            h2c,
            tls: None,
            in_flight: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            h1_idle: (0..pool_slots.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            raw_idle: (0..pool_slots.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            h2: Mutex::new(None),
            ewma: Ewma::default(),
        }
    }

    /// Makes connections to this endpoint use `tls`.
    pub fn with_tls(mut self, tls: Option<Arc<UpstreamTls>>) -> EndpointState {
        self.tls = tls;
        self
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Records a connect failure; returns true when this one ejected the endpoint.
    pub fn connect_failed(&self, config: &UpstreamConfig) -> bool {
        let fails = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= config.max_fails && !self.is_ejected() {
            let until = now_ms() + u64::try_from(config.eject_for.as_millis()).unwrap_or(u64::MAX / 2);
            self.ejected_until_ms.store(until, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn connect_succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// An idle pooled connection, if one is ready. Closed ones are dropped.
    fn take_idle(&self) -> Option<Conn> {
        if self.h2c {
            let guard = self.h2.lock().ok()?;
            return match guard.as_ref() {
                Some(s) if !s.is_closed() => Some(Conn::H2(s.clone())),
                _ => None,
            };
        }
        let mut idle = self.idle_pool().lock().ok()?;
        // Newest first; closed connections met on the way are dropped. A
        // swap_remove moves an already-checked entry into `i`.
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_closed() {
                idle.swap_remove(i);
            } else if idle[i].is_ready() {
                return Some(Conn::H1(idle.swap_remove(i)));
            }
        }
        None
    }

    /// This thread's pool of idle HTTP/1.1 connections.
    fn idle_pool(&self) -> &Mutex<Vec<http1::SendRequest<UpstreamBody>>> {
        let slot = POOL_SLOT.with(Cell::get) % self.h1_idle.len().max(1);
        &self.h1_idle[slot]
    }

    /// Puts an HTTP/1.1 connection back; it is handed out again once its
    /// current response body is done (`is_ready`).
    pub fn give_back(&self, sender: http1::SendRequest<UpstreamBody>) {
        if let Ok(mut idle) = self.idle_pool().lock() {
            if idle.len() < MAX_IDLE_PER_ENDPOINT && !sender.is_closed() {
                idle.push(sender);
            }
        }
    }

    /// This thread's pool of idle lean-path connections.
    fn raw_pool(&self) -> &Mutex<Vec<RawConn>> {
        let slot = POOL_SLOT.with(Cell::get) % self.raw_idle.len().max(1);
        &self.raw_idle[slot]
    }

    /// Puts a lean-path connection back after its response was read whole.
    pub fn give_back_raw(&self, conn: RawConn) {
        if let Ok(mut idle) = self.raw_pool().lock() {
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push(conn);
            }
        }
    }

    /// A pooled lean-path connection (newest first; ones the upstream
    /// closed are dropped), or a new one. `true` in the tuple means fresh.
    pub async fn raw_connection(&self, config: &UpstreamConfig) -> Result<(RawConn, bool), ConnectError> {
        if let Ok(mut idle) = self.raw_pool().lock() {
            while let Some(c) = idle.pop() {
                if c.is_reusable() {
                    return Ok((c, false));
                }
            }
        }
        Ok((RawConn::new(self.connect(config).await?), true))
    }

    /// A new TCP connection to the endpoint within the connect timeout,
    /// with Nagle off.
    async fn connect(&self, config: &UpstreamConfig) -> Result<TcpStream, ConnectError> {
        let stream = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Err(_) => return Err(ConnectError::Timeout),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A pooled connection, or a new one (connect timeout applies).
    /// `Ok(true)` in the tuple means the connection is fresh.
    pub async fn connection(&self, config: &UpstreamConfig) -> Result<(Conn, bool), ConnectError> {
        if let Some(c) = self.take_idle() {
            return Ok((c, false));
        }
        let started = tokio::time::Instant::now();
        let tcp = self.connect(config).await?;
        match &self.tls {
            None => self.handshake(TokioIo::new(tcp)).await,
            Some(tls) => {
                // The TLS handshake counts against the connect timeout.
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let deadline = started + config.connect_timeout;
                let stream =
                    match tokio::time::timeout_at(deadline, connector.connect(tls.server_name.clone(), tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                        Err(_) => return Err(ConnectError::Timeout),
                    };
                self.handshake(TokioIo::new(stream)).await
            }
        }
    }

    /// The HTTP handshake (h2 or HTTP/1.1) on a new connection.
    async fn handshake<I>(&self, io: I) -> Result<(Conn, bool), ConnectError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if self.h2c {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake::<_, UpstreamBody>(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let addr = self.addr;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "upstream h2c connection ended");
                }
            });
            if let Ok(mut slot) = self.h2.lock() {
                *slot = Some(sender.clone());
            }
            Ok((Conn::H2(sender), true))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake::<_, UpstreamBody>(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let addr = self.addr;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %e, "upstream connection ended");
                }
            });
            Ok((Conn::H1(sender), true))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(std::io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

/// An upstream with live endpoint state.
#[derive(Debug)]
pub struct LiveUpstream {
    pub spec: Arc<UpstreamSpec>,
    pub endpoints: Vec<Arc<EndpointState>>,
    rr: Arc<AtomicUsize>,
    /// Hash ring and affinity cookie keys, when the spec has a `choice`.
    pub chooser: Option<Chooser>,
    /// Metric handles looked up once per table rather than per request
    /// (a `Family` lookup hashes the String labels under a lock).
    pub metrics: UpstreamMetrics,
}

/// Cached metric series of one upstream; filled on first use so that
/// unused upstreams export no series.
#[derive(Debug, Default)]
pub struct UpstreamMetrics {
    /// `upstream_response_seconds{upstream}`.
    pub latency: OnceLock<Histogram>,
    /// `requests{host, status="200", upstream}` for the first host that got
    /// a 200 through this upstream (usually its only one).
    pub ok_requests: OnceLock<(String, Counter)>,
}

impl LiveUpstream {
    /// Picks an endpoint for a request with `key` (hashing, affinity),
    /// falling back to the upstream's method (see `Chooser::pick`).
    pub fn pick_with(&self, tried: &[usize], key: PickKey) -> Option<usize> {
        if let (Some(c), false) = (&self.chooser, key == PickKey::None) {
            if let Some(decided) = c.pick(&self.endpoints, tried, key) {
                return decided;
            }
        }
        self.pick(tried)
    }

    /// Picks an endpoint not in `tried`, preferring ones that are not
    /// ejected (when all are ejected, ejection is ignored rather than
    /// failing every request).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 || tried.len() >= n {
            return None;
        }
        let fresh = |i: &usize| !tried.contains(i);
        let healthy = |i: &usize| fresh(i) && !self.endpoints[*i].is_ejected();
        let any_healthy = (0..n).any(|i| healthy(&i));
        let ok = |i: usize| if any_healthy { healthy(&i) } else { fresh(&i) };
        match self.spec.lb {
            // One endpoint: no shared counter to bump.
            LbMethod::RoundRobin if n == 1 => (tried.is_empty()).then_some(0),
            LbMethod::RoundRobin => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
            }
            LbMethod::LeastConn => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| ok(i))
                    .min_by_key(|&i| self.endpoints[i].in_flight())
            }
            LbMethod::Random => {
                let candidates: Vec<usize> = (0..n).filter(|&i| ok(i)).collect();
                candidates.get(fastrand::usize(..candidates.len().max(1))).copied()
            }
            LbMethod::Ewma => {
                let candidates: Vec<usize> = (0..n).filter(|&i| ok(i)).collect();
                balance::ewma_pick(&self.endpoints, &candidates)
            }
            LbMethod::RandomTwoLeastConn => {
                let candidates: Vec<usize> = (0..n).filter(|&i| ok(i)).collect();
                two_choices(&candidates, |a, b| {
                    self.endpoints[b].in_flight() < self.endpoints[a].in_flight()
                })
            }
        }
    }
}

/// The power of two choices: two distinct `candidates` at random, `b`
/// when `better(a, b)` says it beats `a`.
pub fn two_choices(candidates: &[usize], better: impl Fn(usize, usize) -> bool) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        len => {
            let a = fastrand::usize(..len);
            let mut b = fastrand::usize(..len - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if better(a, b) { b } else { a })
        }
    }
}

/// A compiled `RouteTable` plus the live state of its upstreams; what the
/// request path loads from the `ArcSwap`.
#[derive(Debug, Default)]
pub struct LiveTable {
    pub routes: Arc<RouteTable>,
    /// Parallel to `routes.upstreams`.
    pub upstreams: Vec<Arc<LiveUpstream>>,
}

impl LiveTable {
    /// Builds the live table for `routes`, reusing `previous`'s endpoint
    /// state and round-robin positions where they still apply.
    /// `pool_slots`: see `EndpointState::new`.
    pub fn build(routes: Arc<RouteTable>, previous: &LiveTable, pool_slots: usize) -> LiveTable {
        crate::policy::access::carry_over(&routes, &previous.routes);
        type Key = (SocketAddr, bool, Option<Arc<str>>);
        let mut old_eps: HashMap<Key, Arc<EndpointState>> = HashMap::new();
        let mut old_rr: HashMap<&str, Arc<AtomicUsize>> = HashMap::new();
        for u in &previous.upstreams {
            old_rr.insert(u.spec.name.as_str(), u.rr.clone());
            for e in &u.endpoints {
                old_eps.insert((e.addr, e.h2c, e.tls.as_ref().map(|t| t.id())), e.clone());
            }
        }
        let mut new_eps: HashMap<Key, Arc<EndpointState>> = HashMap::new();
        let upstreams = routes
            .upstreams
            .iter()
            .map(|spec| {
                let endpoints = spec
                    .endpoints
                    .iter()
                    .map(|e| {
                        let key = (e.addr, spec.h2c, spec.tls.as_ref().map(|t| t.id()));
                        let old = old_eps.get(&key).cloned();
                        new_eps
                            .entry(key)
                            .or_insert_with(|| {
                                old.unwrap_or_else(|| {
                                    Arc::new(
                                        EndpointState::new(e.addr, e.pod.clone(), spec.h2c, pool_slots)
                                            .with_tls(spec.tls.clone()),
                                    )
                                })
                            })
                            .clone()
                    })
                    .collect();
                let rr = old_rr
                    .get(spec.name.as_str())
                    .cloned()
                    .unwrap_or_else(|| Arc::new(AtomicUsize::new(0)));
                Arc::new(LiveUpstream {
                    chooser: Chooser::build(spec),
                    spec: spec.clone(),
                    endpoints,
                    rr,
                    metrics: UpstreamMetrics::default(),
                })
            })
            .collect();
        LiveTable { routes, upstreams }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::UpstreamEndpoint;

    fn upstream(lb: LbMethod, n: usize) -> LiveUpstream {
        let endpoints: Vec<UpstreamEndpoint> = (0..n)
            .map(|i| UpstreamEndpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                pod: None,
            })
            .collect();
        let spec = Arc::new(UpstreamSpec {
            name: "ns/s:80".into(),
            endpoints: endpoints.clone(),
            lb,
            h2c: false,
            choice: None,
            tls: None,
        });
        LiveUpstream {
            chooser: None,
            endpoints: endpoints
                .iter()
                .map(|e| Arc::new(EndpointState::new(e.addr, None, false, 1)))
                .collect(),
            spec,
            rr: Arc::new(AtomicUsize::new(0)),
            metrics: UpstreamMetrics::default(),
        }
    }

    #[test]
    fn round_robin_cycles_and_skips_tried_and_ejected() {
        let u = upstream(LbMethod::RoundRobin, 3);
        let picks: Vec<usize> = (0..6).map(|_| u.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(u.pick(&[0, 1, 2]), None);
        let config = UpstreamConfig::default();
        for _ in 0..config.max_fails {
            u.endpoints[1].connect_failed(&config);
        }
        assert!(u.endpoints[1].is_ejected());
        for _ in 0..10 {
            assert_ne!(u.pick(&[]), Some(1));
        }
        // All others tried: the ejected one is still offered rather than nothing.
        assert_eq!(u.pick(&[0, 2]), Some(1));
    }

    #[test]
    fn least_conn_prefers_fewest_in_flight() {
        let u = upstream(LbMethod::LeastConn, 3);
        let _a = u.endpoints[0].track();
        let _b = u.endpoints[0].track();
        let _c = u.endpoints[2].track();
        for _ in 0..5 {
            assert_eq!(u.pick(&[]), Some(1));
        }
        drop(_a);
        drop(_b);
        let _d = u.endpoints[1].track();
        assert_eq!(u.pick(&[]), Some(0));
    }

    #[test]
    fn random_two_never_picks_the_busiest_of_two() {
        let u = upstream(LbMethod::RandomTwoLeastConn, 2);
        let _busy: Vec<InFlight> = (0..5).map(|_| u.endpoints[0].track()).collect();
        for _ in 0..50 {
            assert_eq!(u.pick(&[]), Some(1));
        }
        let r = upstream(LbMethod::Random, 4);
        for _ in 0..50 {
            assert!(r.pick(&[1, 2]).is_some_and(|i| i == 0 || i == 3));
        }
    }

    #[test]
    fn reload_keeps_endpoint_state() {
        let mk = |ports: &[u16]| {
            let mut t = RouteTable::default();
            t.upstreams = vec![Arc::new(UpstreamSpec {
                name: "ns/s:80".into(),
                endpoints: ports
                    .iter()
                    .map(|p| UpstreamEndpoint {
                        addr: SocketAddr::from(([127, 0, 0, 1], *p)),
                        pod: None,
                    })
                    .collect(),
                lb: LbMethod::RoundRobin,
                h2c: false,
                choice: None,
                tls: None,
            })];
            Arc::new(t)
        };
        let first = LiveTable::build(mk(&[1, 2]), &LiveTable::default(), 3);
        let _busy = first.upstreams[0].endpoints[1].track();
        let second = LiveTable::build(mk(&[2, 3]), &first, 3);
        assert!(Arc::ptr_eq(
            &first.upstreams[0].endpoints[1],
            &second.upstreams[0].endpoints[0]
        ));
        assert_eq!(second.upstreams[0].endpoints[0].in_flight(), 1);
        assert_eq!(second.upstreams[0].endpoints[1].in_flight(), 0);
    }
}
