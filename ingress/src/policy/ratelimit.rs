//! Per-client rate limits, as ingress-nginx's `limit-rps`, `limit-rpm`,
//! `limit-connections`, `limit-burst-multiplier` and `limit-whitelist`
//! configure nginx's `limit_req` (with `burst=… nodelay`) and
//! `limit_conn`, keyed by the client's address, per node.
//!
//! The request limit is nginx's leaky bucket with millisecond precision:
//! each client has an `excess` (in thousandths of a request) that drains
//! at the rate and grows by one request per accepted request; a request
//! that would take it past `burst` is refused (and not counted). So a new
//! client may send `1 + burst` requests at once, then `rate` per second.
//!
//! State lives in a [`LimitState`] shared across reloads of unrelated
//! objects (see [`super::access::carry_over`]) and is bounded: clients
//! whose bucket has drained and who hold no connection are evicted when a
//! shard is full; a new client finding its shard full of busy ones is
//! refused, as nginx refuses when its zone is out of memory.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use http::StatusCode;
use ipnet::IpNet;

use super::{parse_u64, Reader, NGINX};

/// ingress-nginx's default burst: five times the rate.
const DEFAULT_BURST_MULTIPLIER: u64 = 5;
/// Clients tracked per Ingress (nginx's default 5 MB zone holds about
/// 40,000 states); split over `SHARDS` locks.
const MAX_CLIENTS: usize = 65_536;
const SHARDS: usize = 16;

/// One `limit_req` zone: `rate` in thousandths of a request per second
/// and `burst` in requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub milli_per_sec: u64,
    pub burst: u64,
}

/// The limits of one Ingress.
#[derive(Debug)]
pub struct RateLimit {
    pub rps: Option<Rate>,
    pub rpm: Option<Rate>,
    /// Requests in progress per client (`limit_conn`).
    pub connections: Option<u32>,
    /// Clients never limited (`limit-whitelist`).
    pub exempt: Vec<IpNet>,
    /// The answer to a limited request (ingress-nginx's
    /// `limit-req-status-code`/`limit-conn-status-code` default: 503).
    pub status: StatusCode,
    state: OnceLock<Arc<LimitState>>,
}

impl RateLimit {
    /// Reads the rate-limit annotations; `None` when no limit is set.
    pub fn parse(r: &mut Reader<'_>) -> Option<RateLimit> {
        let rps = r.parse(&format!("{NGINX}limit-rps"), parse_u64).unwrap_or(0);
        let rpm = r.parse(&format!("{NGINX}limit-rpm"), parse_u64).unwrap_or(0);
        let conns = r.parse(&format!("{NGINX}limit-connections"), parse_u64).unwrap_or(0);
        let multiplier = r
            .parse(&format!("{NGINX}limit-burst-multiplier"), parse_u64)
            .unwrap_or(DEFAULT_BURST_MULTIPLIER);
        let exempt = r
            .parse(&format!("{NGINX}limit-whitelist"), super::access::parse_cidrs)
            .unwrap_or_default();
        if rps == 0 && rpm == 0 && conns == 0 {
            return None;
        }
        let rate = |n: u64, per_secs: u64| {
            (n > 0).then(|| Rate {
                milli_per_sec: (n.saturating_mul(1000) / per_secs).max(1),
                burst: n.saturating_mul(multiplier),
            })
        };
        Some(RateLimit {
            rps: rate(rps, 1),
            rpm: rate(rpm, 60),
            connections: (conns > 0).then(|| u32::try_from(conns).unwrap_or(u32::MAX)),
            exempt,
            status: StatusCode::SERVICE_UNAVAILABLE,
            state: OnceLock::new(),
        })
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.rps {
            parts.push(format!("{} r/s burst {}", r.milli_per_sec / 1000, r.burst));
        }
        if let Some(r) = self.rpm {
            parts.push(format!("{} r/m burst {}", r.milli_per_sec * 60 / 1000, r.burst));
        }
        if let Some(c) = self.connections {
            parts.push(format!("{c} requests in progress"));
        }
        if !self.exempt.is_empty() {
            let list: Vec<String> = self.exempt.iter().map(ToString::to_string).collect();
            parts.push(format!("except {}", list.join(",")));
        }
        format!(
            "rate limit per client: {} (else {})",
            parts.join(", "),
            self.status.as_u16()
        )
    }

    /// The shared state (created on first use when no earlier table's was
    /// carried over).
    pub fn state(&self) -> &Arc<LimitState> {
        self.state.get_or_init(|| Arc::new(LimitState::new()))
    }

    /// Adopts `previous`'s state (same Ingress, earlier table); a no-op
    /// once this limit has state of its own.
    pub fn adopt(&self, previous: &RateLimit) {
        let _ = self.state.set(previous.state().clone());
    }

    /// Admits a request from `ip` or refuses it (`Err(status)`). An
    /// admitted request holds its connection slot until the [`Hold`] is
    /// dropped (with the response body).
    pub fn admit(&self, ip: IpAddr) -> Result<Option<Hold>, StatusCode> {
        if self.exempt.iter().any(|n| n.contains(&ip)) {
            return Ok(None);
        }
        let state = self.state();
        let now = state.now_ms();
        if state.admit(ip, now, self.rps, self.rpm, self.connections) {
            Ok(self.connections.map(|_| Hold {
                state: state.clone(),
                ip,
            }))
        } else {
            Err(self.status)
        }
    }
}

/// One client's buckets and requests in progress.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    rps: Bucket,
    rpm: Bucket,
    conns: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    /// Thousandths of a request above the rate.
    excess: u64,
    /// Milliseconds (since the state's epoch) of the last accepted request.
    last: u64,
}

impl Bucket {
    /// The excess after `now` if one more request were accepted (nginx:
    /// `excess - rate * ms / 1000 + 1000`, at least 0).
    fn next(&self, rate: Rate, now: u64) -> u64 {
        let drained = rate.milli_per_sec.saturating_mul(now.saturating_sub(self.last)) / 1000;
        (self.excess.saturating_add(1000)).saturating_sub(drained)
    }

    fn drained_by(&self, rate: Option<Rate>, now: u64) -> bool {
        match rate {
            None => true,
            Some(r) => r.milli_per_sec.saturating_mul(now.saturating_sub(self.last)) / 1000 >= self.excess,
        }
    }
}

/// The per-client state of one Ingress's limits.
pub struct LimitState {
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<HashMap<IpAddr, Entry>>>,
}

impl std::fmt::Debug for LimitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitState").finish_non_exhaustive()
    }
}

impl LimitState {
    fn new() -> LimitState {
        LimitState {
            epoch: Instant::now(),
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, Entry>> {
        let i = usize::try_from(self.hasher.hash_one(ip) % SHARDS as u64).unwrap_or(0);
        &self.shards[i]
    }

    /// Clients currently tracked (tests, metrics).
    pub fn clients(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |m| m.len())).sum()
    }

    fn admit(&self, ip: IpAddr, now: u64, rps: Option<Rate>, rpm: Option<Rate>, conns: Option<u32>) -> bool {
        let Ok(mut map) = self.shard(ip).lock() else {
            return true;
        };
        if !map.contains_key(&ip) && map.len() >= MAX_CLIENTS / SHARDS {
            map.retain(|_, e| e.conns > 0 || !(e.rps.drained_by(rps, now) && e.rpm.drained_by(rpm, now)));
            if map.len() >= MAX_CLIENTS / SHARDS {
                return false;
            }
        }
        let fresh = !map.contains_key(&ip);
        let entry = map.entry(ip).or_default();
        let mut next = *entry;
        for (bucket, rate) in [(&mut next.rps, rps), (&mut next.rpm, rpm)] {
            if let Some(rate) = rate {
                // A new client's first request passes with no excess, as
                // in nginx.
                let excess = if fresh { 0 } else { bucket.next(rate, now) };
                if excess > rate.burst.saturating_mul(1000) {
                    return false;
                }
                *bucket = Bucket { excess, last: now };
            }
        }
        if let Some(max) = conns {
            if next.conns >= max {
                return false;
            }
            next.conns += 1;
        }
        *entry = next;
        true
    }

    fn release(&self, ip: IpAddr) {
        if let Ok(mut map) = self.shard(ip).lock() {
            if let Some(e) = map.get_mut(&ip) {
                e.conns = e.conns.saturating_sub(1);
            }
        }
    }
}

/// A request in progress counted against `limit-connections`; released
/// when dropped.
pub struct Hold {
    state: Arc<LimitState>,
    ip: IpAddr,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.state.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: u64, burst: u64) -> Option<Rate> {
        Some(Rate {
            milli_per_sec: per_sec * 1000,
            burst,
        })
    }

    #[test]
    fn burst_then_refused_then_drains_at_the_rate() {
        let s = LimitState::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // 1 + burst at once.
        for i in 0..6 {
            assert!(s.admit(ip, 1000, rate(1, 5), None, None), "request {i}");
        }
        assert!(!s.admit(ip, 1000, rate(1, 5), None, None));
        // Refused requests do not count: one second later one more fits.
        assert!(!s.admit(ip, 1500, rate(1, 5), None, None));
        assert!(s.admit(ip, 2000, rate(1, 5), None, None));
        assert!(!s.admit(ip, 2000, rate(1, 5), None, None));
        // Another client is not affected.
        assert!(s.admit("10.0.0.2".parse().unwrap(), 2000, rate(1, 5), None, None));
        // Long idle: the full burst again.
        for _ in 0..6 {
            assert!(s.admit(ip, 100_000, rate(1, 5), None, None));
        }
    }

    #[test]
    fn zero_burst_allows_one_per_interval() {
        let s = LimitState::new();
        let ip: IpAddr = "::1".parse().unwrap();
        assert!(s.admit(ip, 0, rate(10, 0), None, None));
        assert!(!s.admit(ip, 50, rate(10, 0), None, None));
        assert!(s.admit(ip, 100, rate(10, 0), None, None));
    }

    #[test]
    fn rpm_and_rps_both_apply() {
        let s = LimitState::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let rpm = Some(Rate {
            milli_per_sec: 1000 / 60,
            burst: 2,
        });
        for _ in 0..3 {
            assert!(s.admit(ip, 0, rate(100, 100), rpm, None));
        }
        assert!(!s.admit(ip, 10, rate(100, 100), rpm, None));
    }

    #[test]
    fn connections_are_held_until_released() {
        let s = LimitState::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(s.admit(ip, 0, None, None, Some(2)));
        assert!(s.admit(ip, 0, None, None, Some(2)));
        assert!(!s.admit(ip, 0, None, None, Some(2)));
        s.release(ip);
        assert!(s.admit(ip, 0, None, None, Some(2)));
    }

    #[test]
    fn idle_clients_are_evicted_when_full() {
        let s = LimitState::new();
        let mut n = 0u32;
        // Fill well past the cap: drained clients make room.
        for i in 0..(MAX_CLIENTS as u32 * 2) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            n += u32::from(s.admit(ip, u64::from(i) * 10, rate(1000, 0), None, None));
        }
        assert_eq!(n, MAX_CLIENTS as u32 * 2);
        assert!(s.clients() <= MAX_CLIENTS);
    }

    #[test]
    fn parse_defaults_and_multiplier() {
        let ing = super::super::access::tests::ingress(&[
            ("limit-rps", "10"),
            ("limit-rpm", "x"),
            ("limit-whitelist", "10.0.0.0/8, 192.168.1.1"),
        ]);
        let mut r = Reader::new(&ing);
        let l = RateLimit::parse(&mut r).unwrap();
        assert_eq!(
            l.rps,
            Some(Rate {
                milli_per_sec: 10_000,
                burst: 50
            })
        );
        assert_eq!(l.rpm, None);
        assert_eq!(l.exempt.len(), 2);
        assert_eq!(l.status, StatusCode::SERVICE_UNAVAILABLE);
        let problems = r.finish();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].field.contains("limit-rpm"));

        let ing = super::super::access::tests::ingress(&[("limit-rpm", "30"), ("limit-burst-multiplier", "1")]);
        let mut r = Reader::new(&ing);
        let l = RateLimit::parse(&mut r).unwrap();
        assert_eq!(
            l.rpm,
            Some(Rate {
                milli_per_sec: 500,
                burst: 30
            })
        );
        let ing = super::super::access::tests::ingress(&[("limit-burst-multiplier", "3")]);
        assert!(RateLimit::parse(&mut Reader::new(&ing)).is_none());
    }
}
