//! How a route reaches its upstream: canaries, endpoint choice (hashing,
//! cookie affinity, EWMA).
//!
//! The parts, as ingress-nginx's Lua balancer has them (affinity beats
//! hashing, which beats `load-balance`):
//! - `load-balance`: `round_robin` (default) or `ewma` (two random
//!   endpoints, the lower decayed average response time wins); ferry also
//!   takes `least_conn` and `random`. NGINX IC's `nginx.org/lb-method`
//!   adds `ip_hash` and `hash <expr> [consistent]`.
//! - `upstream-hash-by`: consistent hashing of a request expression
//!   ([`chash`](super::chash)) onto a ring with virtual nodes.
//! - `affinity: cookie`: a cookie names the endpoint (by a hash, never its
//!   address); without a usable one the normal balancer picks and the
//!   response sets the cookie. `balanced` mode keys the cookie to a ring
//!   position (scaling up moves a share of sessions), `persistent` to the
//!   endpoint itself (kept while it exists).
//! - canaries ([`canary`](super::canary)): a second Ingress attached to the
//!   main route, chosen per request before the endpoint.
//!
//! Compiled parts: [`Choice`] on the `UpstreamSpec` (part of the upstream's
//! identity), [`Chooser`] with the ring and cookie ids on the
//! `LiveUpstream`, [`RouteBalance`] on routes that need a per-request key
//! or have a canary. Routes without any of it cost one `Option` check.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use ferry_cluster::{ObjectKey, Snapshot};
use http::{HeaderMap, HeaderValue};

use super::canary::{self, CanaryRules, Verdict};
use super::chash::{self, Hasher, Part, RequestView, Ring};
use super::Reader;
use crate::routes::{LbMethod, PathMatch, Problem, Route, RouteTable, UpstreamSpec, LB_METHOD_ANNOTATION};
use crate::upstream::{EndpointState, LiveTable, LiveUpstream};

pub const LOAD_BALANCE: &str = "nginx.ingress.kubernetes.io/load-balance";
pub const UPSTREAM_HASH_BY: &str = "nginx.ingress.kubernetes.io/upstream-hash-by";
pub const UPSTREAM_HASH_BY_SUBSET: &str = "nginx.ingress.kubernetes.io/upstream-hash-by-subset";
pub const UPSTREAM_HASH_BY_SUBSET_SIZE: &str = "nginx.ingress.kubernetes.io/upstream-hash-by-subset-size";
pub const AFFINITY: &str = "nginx.ingress.kubernetes.io/affinity";
pub const AFFINITY_MODE: &str = "nginx.ingress.kubernetes.io/affinity-mode";
pub const SESSION_COOKIE_NAME: &str = "nginx.ingress.kubernetes.io/session-cookie-name";
pub const SESSION_COOKIE_PATH: &str = "nginx.ingress.kubernetes.io/session-cookie-path";
pub const SESSION_COOKIE_DOMAIN: &str = "nginx.ingress.kubernetes.io/session-cookie-domain";
pub const SESSION_COOKIE_MAX_AGE: &str = "nginx.ingress.kubernetes.io/session-cookie-max-age";
pub const SESSION_COOKIE_EXPIRES: &str = "nginx.ingress.kubernetes.io/session-cookie-expires";
pub const SESSION_COOKIE_SAMESITE: &str = "nginx.ingress.kubernetes.io/session-cookie-samesite";
pub const SESSION_COOKIE_CONDITIONAL_SAMESITE_NONE: &str =
    "nginx.ingress.kubernetes.io/session-cookie-conditional-samesite-none";
pub const SESSION_COOKIE_SECURE: &str = "nginx.ingress.kubernetes.io/session-cookie-secure";
pub const SESSION_COOKIE_CHANGE_ON_FAILURE: &str = "nginx.ingress.kubernetes.io/session-cookie-change-on-failure";
/// ingress-nginx's default affinity cookie name.
pub const DEFAULT_COOKIE: &str = "INGRESSCOOKIE";

/// The endpoint-choice settings of one Ingress (nothing set: round robin).
#[derive(Debug, Default)]
pub struct BalancePolicy {
    pub lb: LbMethod,
    /// Hashing or affinity; part of the upstream's identity.
    pub choice: Option<Arc<Choice>>,
    /// Set on a canary Ingress (`canary: "true"`).
    pub canary: Option<Arc<CanaryRules>>,
}

/// How an upstream picks an endpoint per request, beyond its `LbMethod`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Choice {
    Hash(HashBy),
    Sticky(Affinity),
}

/// Hashing of a request expression onto the endpoints.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HashBy {
    /// As written (for `render`).
    pub source: String,
    pub parts: Vec<Part>,
    /// A ring (consistent); else the hash modulo the endpoint count, as
    /// nginx's plain `hash`.
    pub consistent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SameSite {
    None,
    Lax,
    Strict,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::None => "None",
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
        }
    }
}

/// Cookie session affinity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Affinity {
    pub cookie: String,
    /// `affinity-mode: persistent`: the cookie names the endpoint; else
    /// (`balanced`) a ring position.
    pub persistent: bool,
    /// `None`: the route's path.
    pub path: Option<String>,
    pub domain: Option<String>,
    pub max_age: Option<i64>,
    /// Seconds from the time the cookie is set.
    pub expires: Option<i64>,
    pub samesite: Option<SameSite>,
    pub conditional_samesite_none: bool,
    /// Secure also over plain HTTP (always set over HTTPS).
    pub secure: bool,
    pub change_on_failure: bool,
}

impl BalancePolicy {
    pub fn parse(_snap: &Snapshot, r: &mut Reader<'_>) -> BalancePolicy {
        let canary = CanaryRules::parse(r);
        if canary.is_some() {
            ignored_on_canary(r);
        }
        // On a canary, nginx.org/lb-method was reported as ignored above.
        let (mut lb, org_hash) = if canary.is_some() {
            Default::default()
        } else {
            parse_lb_method(r)
        };
        if let Some(m) = r.parse(LOAD_BALANCE, |v| match v {
            "round_robin" => Ok(LbMethod::RoundRobin),
            "ewma" => Ok(LbMethod::Ewma),
            "least_conn" => Ok(LbMethod::LeastConn),
            "random" => Ok(LbMethod::Random),
            _ => Err("not round_robin or ewma (ferry also takes least_conn, random); using round_robin".into()),
        }) {
            lb = m;
        }
        let hash = r
            .parse(UPSTREAM_HASH_BY, |v| {
                chash::parse_expression(v).map(|parts| HashBy {
                    source: v.to_string(),
                    parts,
                    consistent: true,
                })
            })
            .or(org_hash);
        if r.flag(UPSTREAM_HASH_BY_SUBSET) == Some(true) {
            r.problem(
                UPSTREAM_HASH_BY_SUBSET,
                "not supported by ferry; hashing over all endpoints",
            );
        }
        if r.get(UPSTREAM_HASH_BY_SUBSET_SIZE).is_some() {
            r.problem(
                UPSTREAM_HASH_BY_SUBSET_SIZE,
                "upstream-hash-by-subset is not supported; annotation ignored",
            );
        }
        let mut affinity = parse_affinity(r);
        if affinity.is_some() && canary.as_ref().is_some_and(|c| !c.sticky) {
            // `affinity-canary-behavior: legacy`: canaries ignore affinity.
            affinity = None;
        }
        let choice = match (affinity, hash) {
            (Some(a), hash) => {
                if hash.is_some() {
                    r.problem(
                        UPSTREAM_HASH_BY,
                        "affinity: cookie takes precedence (as in ingress-nginx); annotation ignored",
                    );
                }
                Some(Choice::Sticky(a))
            }
            (None, Some(h)) => Some(Choice::Hash(h)),
            (None, None) => None,
        };
        BalancePolicy {
            lb,
            choice: choice.map(Arc::new),
            canary: canary.map(Arc::new),
        }
    }

    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lb != LbMethod::RoundRobin {
            out.push(format!("load balancing: {}", self.lb.as_str()));
        }
        if let Some(c) = &self.choice {
            out.push(c.describe());
        }
        if let Some(c) = &self.canary {
            out.push(c.describe());
        }
        out
    }
}

impl Choice {
    pub fn describe(&self) -> String {
        match self {
            Choice::Hash(h) if h.source == "ip_hash" => "hash: ip_hash (client /24)".into(),
            Choice::Hash(h) => format!("hash: {}{}", h.source, if h.consistent { " (consistent)" } else { "" }),
            Choice::Sticky(a) => {
                let mut s = format!(
                    "affinity: cookie {} ({})",
                    a.cookie,
                    if a.persistent { "persistent" } else { "balanced" }
                );
                for (k, v) in [
                    ("path", a.path.clone()),
                    ("domain", a.domain.clone()),
                    ("max-age", a.max_age.map(|n| n.to_string())),
                    ("expires", a.expires.map(|n| format!("+{n}s"))),
                    ("samesite", a.samesite.map(|s| s.as_str().to_string())),
                ] {
                    if let Some(v) = v {
                        s += &format!(", {k} {v}");
                    }
                }
                if a.secure {
                    s += ", secure";
                }
                if a.change_on_failure {
                    s += ", changes on failure";
                }
                s
            }
        }
    }
}

/// `nginx.org/lb-method`: the `LbMethod`s, plus `ip_hash` and
/// `hash <expr> [consistent]`.
fn parse_lb_method(r: &mut Reader<'_>) -> (LbMethod, Option<HashBy>) {
    let parsed = r.parse(LB_METHOD_ANNOTATION, |v| {
        if let Some(m) = LbMethod::parse(v) {
            return Ok((m, None));
        }
        let words: Vec<&str> = v.split_whitespace().collect();
        let hash = |expr: &str, consistent: bool| {
            chash::parse_expression(expr).map(|parts| {
                Some(HashBy {
                    source: expr.to_string(),
                    parts,
                    consistent,
                })
            })
        };
        match words.as_slice() {
            ["ip_hash"] => Ok((
                LbMethod::RoundRobin,
                Some(HashBy {
                    source: "ip_hash".into(),
                    parts: vec![Part::RemoteNet],
                    consistent: false,
                }),
            )),
            ["hash", expr] => Ok((LbMethod::RoundRobin, hash(expr, false)?)),
            ["hash", expr, "consistent"] => Ok((LbMethod::RoundRobin, hash(expr, true)?)),
            _ => Err(
                "unsupported method (round_robin, least_conn, random, random two least_conn, ip_hash, \
                      hash <expr> [consistent]); using round_robin"
                    .to_string(),
            ),
        }
    });
    parsed.unwrap_or_default()
}

/// Names ingress-nginx accepts for cookies (`[A-Za-z0-9_.-]`).
fn cookie_name_ok(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A cookie attribute value: visible ASCII without `;`, `,` or spaces.
fn attribute_ok(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
}

fn parse_seconds_signed(v: &str) -> Result<i64, String> {
    v.parse().map_err(|_| "not a whole number of seconds".to_string())
}

/// The affinity annotations, all read; `None` unless `affinity: cookie`.
fn parse_affinity(r: &mut Reader<'_>) -> Option<Affinity> {
    let kind = r.get(AFFINITY).filter(|v| !v.is_empty());
    let enabled = match kind {
        None => false,
        Some("cookie") => true,
        Some(other) => {
            r.problem(
                AFFINITY,
                format!("{other:?}: only \"cookie\" is supported; annotation ignored"),
            );
            false
        }
    };
    let mode = r.get(AFFINITY_MODE);
    let name = r.get(SESSION_COOKIE_NAME);
    let path = r.get(SESSION_COOKIE_PATH);
    let domain = r.get(SESSION_COOKIE_DOMAIN);
    let max_age = r.parse(SESSION_COOKIE_MAX_AGE, parse_seconds_signed);
    let expires = r.parse(SESSION_COOKIE_EXPIRES, parse_seconds_signed);
    let samesite = r.parse(SESSION_COOKIE_SAMESITE, |v| match v.to_ascii_lowercase().as_str() {
        "none" => Ok(SameSite::None),
        "lax" => Ok(SameSite::Lax),
        "strict" => Ok(SameSite::Strict),
        _ => Err("not None, Lax or Strict; annotation ignored".into()),
    });
    let conditional = r.flag(SESSION_COOKIE_CONDITIONAL_SAMESITE_NONE);
    let secure = r.flag(SESSION_COOKIE_SECURE);
    let change = r.flag(SESSION_COOKIE_CHANGE_ON_FAILURE);
    if !enabled {
        for (n, set) in [
            (AFFINITY_MODE, mode.is_some()),
            (SESSION_COOKIE_NAME, name.is_some()),
            (SESSION_COOKIE_PATH, path.is_some()),
            (SESSION_COOKIE_DOMAIN, domain.is_some()),
            (SESSION_COOKIE_MAX_AGE, max_age.is_some()),
            (SESSION_COOKIE_EXPIRES, expires.is_some()),
            (SESSION_COOKIE_SAMESITE, samesite.is_some()),
            (SESSION_COOKIE_CONDITIONAL_SAMESITE_NONE, conditional.is_some()),
            (SESSION_COOKIE_SECURE, secure.is_some()),
            (SESSION_COOKIE_CHANGE_ON_FAILURE, change.is_some()),
        ] {
            if set {
                r.problem(n, "only meaningful with affinity: cookie; annotation ignored");
            }
        }
        return None;
    }
    let persistent = match mode {
        None | Some("balanced") => false,
        Some("persistent") => true,
        Some(other) => {
            r.problem(
                AFFINITY_MODE,
                format!("{other:?}: not balanced or persistent; using balanced"),
            );
            false
        }
    };
    let cookie = match name {
        None => DEFAULT_COOKIE.to_string(),
        Some(n) if cookie_name_ok(n) => n.to_string(),
        Some(n) => {
            r.problem(
                SESSION_COOKIE_NAME,
                format!("{n:?}: not a cookie name (letters, digits, - _ .); using {DEFAULT_COOKIE}"),
            );
            DEFAULT_COOKIE.to_string()
        }
    };
    let path = path.and_then(|p| {
        if p.starts_with('/') && attribute_ok(p) {
            Some(p.to_string())
        } else {
            r.problem(
                SESSION_COOKIE_PATH,
                format!("{p:?}: not a cookie path; using the route's path"),
            );
            None
        }
    });
    let domain = domain.and_then(|d| {
        if attribute_ok(d) {
            Some(d.to_string())
        } else {
            r.problem(
                SESSION_COOKIE_DOMAIN,
                format!("{d:?}: not a cookie domain; annotation ignored"),
            );
            None
        }
    });
    if conditional == Some(true) && samesite != Some(SameSite::None) {
        r.problem(
            SESSION_COOKIE_CONDITIONAL_SAMESITE_NONE,
            "only meaningful with session-cookie-samesite: None",
        );
    }
    Some(Affinity {
        cookie,
        persistent,
        path,
        domain,
        max_age,
        expires,
        samesite,
        conditional_samesite_none: conditional.unwrap_or(false),
        secure: secure.unwrap_or(false),
        change_on_failure: change.unwrap_or(false),
    })
}

/// Reports the annotations of a canary Ingress that ingress-nginx takes
/// from the main Ingress instead (snippets are left to the general
/// refusal).
fn ignored_on_canary(r: &mut Reader<'_>) {
    let ing = r.ingress();
    for name in ing.annotations.keys() {
        if super::is_ours(name)
            && !canary::honoured_on_canary(name)
            && !name.ends_with("-snippet")
            && !name.ends_with("-snippets")
        {
            // Read, so that it is not also reported as unsupported.
            let _ = r.get(name);
            r.problem(
                name,
                "ignored on a canary Ingress: ingress-nginx applies the main Ingress's settings \
                 (a canary honours only canary-*, load-balance, upstream-hash-by and affinity)",
            );
        }
    }
}

// ---------------------------------------------------------------------
// Compile step: canaries attached to main routes, per-route settings.

/// The canary alternative of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    /// Index into `RouteTable::upstreams`.
    pub upstream: usize,
    pub ingress: ObjectKey,
    pub rules: Arc<CanaryRules>,
}

/// What a route needs beyond its upstream: a canary, and for affinity
/// cookies the path they are set on. Only routes whose upstreams hash,
/// use affinity or have a canary carry one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteBalance {
    pub canary: Option<Canary>,
    /// `Path` of affinity cookies set on this route (ingress-nginx: the
    /// location's path unless `session-cookie-path`).
    pub cookie_path: String,
}

/// A canary Ingress's path, waiting for its main route.
#[derive(Debug)]
pub struct PendingCanary {
    pub ingress: ObjectKey,
    /// `spec.rules[i].http.paths[j]`.
    pub field: String,
    /// The rule host as stored on routes (`""` for host-less rules).
    pub host: String,
    pub path: PathMatch,
    pub upstream: usize,
    pub rules: Arc<CanaryRules>,
}

fn location_path(p: &PathMatch) -> String {
    match p {
        PathMatch::Exact(p) => p.clone(),
        PathMatch::Prefix(p) if p.is_empty() => "/".into(),
        PathMatch::Prefix(p) => p.clone(),
        // A regex is no cookie path (ingress-nginx asks for
        // session-cookie-path with use-regex); the whole host it is.
        PathMatch::Regex(_) => "/".into(),
    }
}

/// The second compile pass: attaches every canary to the main route with
/// its host and path (a canary without one is reported and ignored, as in
/// ingress-nginx; only the first canary of a route counts), and gives
/// routes whose upstreams need a per-request key their `RouteBalance`.
pub fn attach(table: &mut RouteTable, canaries: Vec<PendingCanary>) {
    let mut problems = Vec::new();
    let keyed: Vec<bool> = table.upstreams.iter().map(|u| u.choice.is_some()).collect();
    let needs_key = |i: usize| keyed.get(i).copied().unwrap_or(false);
    let mut taken: HashSet<(String, PathMatch)> = HashSet::new();
    let mut pending: Vec<Option<PendingCanary>> = canaries.into_iter().map(Some).collect();
    table.for_each_route_mut(|route: &mut Route| {
        let found = pending
            .iter_mut()
            .find(|c| c.as_ref().is_some_and(|c| c.host == route.host && c.path == route.path));
        let canary = found.and_then(Option::take).map(|c| {
            taken.insert((c.host.clone(), c.path.clone()));
            Canary {
                upstream: c.upstream,
                ingress: c.ingress,
                rules: c.rules,
            }
        });
        if canary.is_some() || needs_key(route.upstream) {
            route.balance = Some(Arc::new(RouteBalance {
                cookie_path: location_path(&route.path),
                canary,
            }));
        }
    });
    for c in pending.into_iter().flatten() {
        let message = if taken.contains(&(c.host.clone(), c.path.clone())) {
            format!(
                "{} on host {:?} already has an older canary Ingress; ignored (one canary per path)",
                c.path, c.host
            )
        } else {
            format!(
                "canary for {} on host {:?}, but no main Ingress routes it; ignored (as ingress-nginx)",
                c.path, c.host
            )
        };
        problems.push(Problem {
            object: format!("Ingress {}", c.ingress),
            field: c.field,
            message,
        });
    }
    table.problems.extend(problems);
}

// ---------------------------------------------------------------------
// Live state and the request path.

/// The per-request input of a keyed pick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PickKey {
    /// Plain balancing.
    #[default]
    None,
    /// The hash of the upstream's key expression.
    Hash(u64),
    /// Affinity: the key of a cookie this upstream set, if the request has
    /// one; whether `SameSite=None` may be sent to this client.
    Sticky { cookie: Option<u64>, samesite_none: bool },
}

/// Keyed picking state of one live upstream, rebuilt with each table.
#[derive(Debug)]
pub struct Chooser {
    choice: Arc<Choice>,
    ring: Ring,
    /// `persistent` affinity: each endpoint's cookie key.
    ids: Vec<u64>,
    /// Marks this upstream's cookies (ingress-nginx's backend key).
    tag: u64,
}

impl Chooser {
    pub fn build(spec: &UpstreamSpec) -> Option<Chooser> {
        let choice = spec.choice.clone()?;
        let addrs: Vec<SocketAddr> = spec.endpoints.iter().map(|e| e.addr).collect();
        let (ring, ids, tag) = match &*choice {
            Choice::Hash(h) => (
                if h.consistent {
                    Ring::new(&addrs)
                } else {
                    Ring::default()
                },
                Vec::new(),
                0,
            ),
            Choice::Sticky(a) => {
                let mut tag = Hasher::default();
                tag.write(spec.name.as_bytes()).write(b"|").write(a.cookie.as_bytes());
                let tag = tag.write(if a.persistent { b"|p" } else { b"|b" }).finish();
                if a.persistent {
                    let ids = addrs
                        .iter()
                        .map(|addr| {
                            Hasher::default()
                                .write(spec.name.as_bytes())
                                .write(b"|")
                                .write(addr.to_string().as_bytes())
                                .finish()
                        })
                        .collect();
                    (Ring::default(), ids, tag)
                } else {
                    (Ring::new(&addrs), Vec::new(), tag)
                }
            }
        };
        Some(Chooser { choice, ring, ids, tag })
    }

    fn affinity(&self) -> Option<&Affinity> {
        match &*self.choice {
            Choice::Sticky(a) => Some(a),
            Choice::Hash(_) => None,
        }
    }

    /// This upstream's affinity cookie key in `headers`, if any.
    fn cookie_key(&self, headers: &HeaderMap) -> Option<u64> {
        let a = self.affinity()?;
        let value = chash::cookie(headers, &a.cookie)?;
        let (key, tag) = value.split_once('|')?;
        let tag = u64::from_str_radix(tag, 16).ok()?;
        (tag == self.tag).then_some(())?;
        u64::from_str_radix(key, 16).ok()
    }

    /// The request's key for this upstream.
    pub fn key(&self, req: &RequestView<'_>) -> PickKey {
        match &*self.choice {
            Choice::Hash(h) => PickKey::Hash(chash::hash_request(&h.parts, req)),
            Choice::Sticky(a) => PickKey::Sticky {
                cookie: self.cookie_key(req.headers),
                samesite_none: !(a.conditional_samesite_none && a.samesite == Some(SameSite::None))
                    || samesite_none_compatible(req.headers),
            },
        }
    }

    /// The endpoint a cookie key names now, if it still exists.
    fn resolve(&self, key: u64) -> Option<usize> {
        if self.affinity().is_some_and(|a| a.persistent) {
            self.ids.iter().position(|&id| id == key)
        } else {
            self.ring.owner(key)
        }
    }

    /// A keyed pick: `Some(decision)` when the key decides (possibly that
    /// nothing is left), `None` to fall back to the upstream's method.
    pub fn pick(&self, endpoints: &[Arc<EndpointState>], tried: &[usize], key: PickKey) -> Option<Option<usize>> {
        let n = endpoints.len();
        if n == 0 || tried.len() >= n {
            return Some(None);
        }
        let fresh = |i: usize| !tried.contains(&i);
        match key {
            PickKey::None => None,
            PickKey::Hash(h) => {
                let healthy = |i: usize| fresh(i) && !endpoints[i].is_ejected();
                let any_healthy = (0..n).any(healthy);
                let ok = |i: usize| if any_healthy { healthy(i) } else { fresh(i) };
                Some(if self.ring.is_empty() {
                    let start = usize::try_from(h % n as u64).unwrap_or(0);
                    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
                } else {
                    self.ring.find(h, ok)
                })
            }
            PickKey::Sticky { cookie, .. } => {
                let e = cookie.and_then(|k| self.resolve(k)).filter(|&e| e < n)?;
                if fresh(e) {
                    // The cookie's endpoint, even while ejected: it is the
                    // session's (a failure may move it, below).
                    Some(Some(e))
                } else if self.affinity().is_some_and(|a| a.change_on_failure) {
                    None
                } else {
                    // Without change-on-failure, a session stays on its
                    // endpoint: no other one is tried.
                    Some(None)
                }
            }
        }
    }

    /// The `Set-Cookie` for a request that `key` sent to endpoint `used`:
    /// none when its cookie already names `used`.
    pub fn set_cookie(&self, key: PickKey, used: usize, route_path: &str, https: bool) -> Option<HeaderValue> {
        let PickKey::Sticky { cookie, samesite_none } = key else {
            return None;
        };
        let a = self.affinity()?;
        if cookie.and_then(|k| self.resolve(k)) == Some(used) {
            return None;
        }
        let value = if a.persistent {
            *self.ids.get(used)?
        } else {
            self.ring.position_of(used, fastrand::u64(..))?
        };
        let mut c = format!(
            "{}={value:016x}|{:016x}; Path={}",
            a.cookie,
            self.tag,
            a.path.as_deref().unwrap_or(route_path)
        );
        if let Some(d) = &a.domain {
            c += &format!("; Domain={d}");
        }
        if let Some(secs) = a.expires {
            c += &format!("; Expires={}", http_date(SystemTime::now(), secs));
        }
        if let Some(secs) = a.max_age {
            c += &format!("; Max-Age={secs}");
        }
        if a.secure || https {
            c += "; Secure";
        }
        c += "; HttpOnly";
        match a.samesite {
            Some(SameSite::None) if !samesite_none => {}
            Some(s) => c += &format!("; SameSite={}", s.as_str()),
            None => {}
        }
        HeaderValue::from_str(&c).ok()
    }
}

/// Whether a client handles `SameSite=None` (the clients that do not, as
/// ingress-nginx's list: iOS 12 and macOS 10.14 Safari, Chrome 51–66, UC
/// Browser before 12.13.2).
fn samesite_none_compatible(headers: &HeaderMap) -> bool {
    static BAD: OnceLock<Vec<regex::Regex>> = OnceLock::new();
    let Some(ua) = headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let bad = BAD.get_or_init(|| {
        [
            r"\(iP.+; CPU .*OS 12[_\d]*.*\) AppleWebKit/",
            r"\(Macintosh;.*Mac OS X 10_14[_\d]*.*\) AppleWebKit/.*Version/.* Safari/",
            r"Chrom(e|ium)/(5[1-9]|6[0-6])\.",
            r"UCBrowser/(([0-9]|1[01])\.|12\.([0-9]|1[0-2])\.|12\.13\.[01]\b)",
        ]
        .iter()
        .filter_map(|p| regex::Regex::new(p).ok())
        .collect()
    });
    !bad.iter().any(|re| re.is_match(ua))
}

/// An IMF-fixdate `secs` seconds after `now` (cookie `Expires`), kept
/// between 1970 and 9999 (what an HTTP date can say).
fn http_date(now: SystemTime, secs: i64) -> String {
    const MAX: Duration = Duration::from_secs(253_402_300_799); // 9999-12-31T23:59:59Z
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let delta = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        since_epoch.saturating_add(delta)
    } else {
        since_epoch.saturating_sub(delta)
    };
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + t.min(MAX))
}

/// Routing a request through a route's `RouteBalance`: which upstream
/// (main or canary) and the key its endpoint pick uses.
pub fn prepare(b: &RouteBalance, main: usize, live: &LiveTable, req: &RequestView<'_>) -> (usize, PickKey) {
    let mut upstream = main;
    if let Some(c) = &b.canary {
        // A canary without endpoints is skipped (ingress-nginx has no
        // balancer for it and stays on the main backend).
        let usable = live.upstreams.get(c.upstream).is_some_and(|u| !u.endpoints.is_empty());
        if usable && to_canary(c, main, live, req.headers) {
            upstream = c.upstream;
        }
    }
    let key = live
        .upstreams
        .get(upstream)
        .and_then(|u| u.chooser.as_ref())
        .map_or(PickKey::None, |c| c.key(req));
    (upstream, key)
}

fn to_canary(c: &Canary, main: usize, live: &LiveTable, headers: &HeaderMap) -> bool {
    if c.rules.sticky {
        let affinitized = |i: usize| {
            live.upstreams
                .get(i)
                .and_then(|u| u.chooser.as_ref())
                .is_some_and(|ch| ch.cookie_key(headers).is_some())
        };
        if affinitized(main) {
            return false;
        }
        if affinitized(c.upstream) {
            return true;
        }
    }
    c.rules.decide(headers, |total| fastrand::u64(1..=total.max(1))) == Verdict::Canary
}

/// After the exchange: the affinity cookie for the endpoint that answered.
pub fn finish(
    b: &RouteBalance,
    upstream: &LiveUpstream,
    key: PickKey,
    endpoint: Option<SocketAddr>,
    https: bool,
    headers: &mut HeaderMap,
) {
    let (Some(chooser), Some(addr)) = (upstream.chooser.as_ref(), endpoint) else {
        return;
    };
    let Some(used) = upstream.endpoints.iter().position(|e| e.addr == addr) else {
        return;
    };
    if let Some(v) = chooser.set_cookie(key, used, &b.cookie_path, https) {
        headers.append(http::header::SET_COOKIE, v);
    }
}

// ---------------------------------------------------------------------
// EWMA of response times (ingress-nginx's `ewma` balancer).

/// How fast old response times fade (ingress-nginx: 10 s).
const DECAY: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // 1 so that "never touched" (0) stays distinct.
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// An endpoint's decaying average response time. Updates race benignly
/// (a lost update only weakens one sample).
#[derive(Debug, Default)]
pub struct Ewma {
    /// Seconds, as `f64` bits.
    value: AtomicU64,
    /// `now_ms()` of the last sample; 0: none yet.
    touched_ms: AtomicU64,
}

impl Ewma {
    fn decayed(&self, now: u64, sample: f64) -> f64 {
        let value = f64::from_bits(self.value.load(Ordering::Relaxed));
        let touched = self.touched_ms.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(touched) as f64 / 1000.0;
        let weight = (-elapsed / DECAY.as_secs_f64()).exp();
        value * weight + sample * (1.0 - weight)
    }

    /// The score picks compare (lower is better): the average decayed to
    /// now, so an endpoint not used for a while is tried again.
    pub fn score(&self) -> f64 {
        self.decayed(now_ms(), 0.0)
    }

    /// Records one response time.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ms();
        let v = self.decayed(now, rtt.as_secs_f64());
        self.value.store(v.to_bits(), Ordering::Relaxed);
        self.touched_ms.store(now, Ordering::Relaxed);
    }
}

/// EWMA's pick among `candidates`: two at random, the lower score wins.
pub fn ewma_pick(endpoints: &[Arc<EndpointState>], candidates: &[usize]) -> Option<usize> {
    crate::upstream::two_choices(candidates, |a, b| endpoints[b].ewma.score() < endpoints[a].ewma.score())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{compile, ClassSelection, UpstreamEndpoint};
    use crate::test_support::{self, ingress};

    fn parse(annotations: &str) -> (BalancePolicy, Vec<String>) {
        let ing = ingress(annotations);
        let mut r = Reader::new(&ing);
        let snap = Snapshot::from_objects(1, Vec::new());
        let p = BalancePolicy::parse(&snap, &mut r);
        (p, r.finish().into_iter().map(|p| p.to_string()).collect())
    }

    const N: &str = "nginx.ingress.kubernetes.io/";

    #[test]
    fn load_balancing_annotations() {
        // (annotations, lb, choice description, problems)
        let cases: Vec<(String, LbMethod, Option<&str>, usize)> = vec![
            (String::new(), LbMethod::RoundRobin, None, 0),
            (format!("{N}load-balance: ewma"), LbMethod::Ewma, None, 0),
            (format!("{N}load-balance: round_robin"), LbMethod::RoundRobin, None, 0),
            (format!("{N}load-balance: least_conn"), LbMethod::LeastConn, None, 0),
            (format!("{N}load-balance: fastest"), LbMethod::RoundRobin, None, 1),
            ("nginx.org/lb-method: least_conn".into(), LbMethod::LeastConn, None, 0),
            ("nginx.org/lb-method: random two least_conn".into(), LbMethod::RandomTwoLeastConn, None, 0),
            ("nginx.org/lb-method: ip_hash".into(), LbMethod::RoundRobin, Some("hash: ip_hash (client /24)"), 0),
            ("nginx.org/lb-method: hash $request_uri".into(), LbMethod::RoundRobin, Some("hash: $request_uri"), 0),
            (
                "nginx.org/lb-method: hash $host$request_uri consistent".into(),
                LbMethod::RoundRobin,
                Some("hash: $host$request_uri (consistent)"),
                0,
            ),
            ("nginx.org/lb-method: hash $bogus".into(), LbMethod::RoundRobin, None, 1),
            ("nginx.org/lb-method: least_time header".into(), LbMethod::RoundRobin, None, 1),
            (
                format!("{N}upstream-hash-by: '$http_x_user'"),
                LbMethod::RoundRobin,
                Some("hash: $http_x_user (consistent)"),
                0,
            ),
            (format!("{N}upstream-hash-by: nothing"), LbMethod::RoundRobin, None, 1),
            (
                format!("{N}upstream-hash-by: '$remote_addr', {N}upstream-hash-by-subset: 'true', {N}upstream-hash-by-subset-size: '3'"),
                LbMethod::RoundRobin,
                Some("hash: $remote_addr (consistent)"),
                2,
            ),
            // Affinity beats hashing (reported), ewma still picks new sessions.
            (
                format!("{N}affinity: cookie, {N}upstream-hash-by: '$uri', {N}load-balance: ewma"),
                LbMethod::Ewma,
                Some("affinity: cookie INGRESSCOOKIE (balanced)"),
                1,
            ),
        ];
        for (annotations, lb, choice, problems) in cases {
            let (p, found) = parse(&annotations);
            assert_eq!(p.lb, lb, "{annotations}");
            assert_eq!(
                p.choice.as_ref().map(|c| c.describe()).as_deref(),
                choice,
                "{annotations}"
            );
            assert_eq!(found.len(), problems, "{annotations}: {found:?}");
        }
    }

    #[test]
    fn affinity_annotations() {
        let (p, problems) = parse(&format!(
            "{N}affinity: cookie, {N}affinity-mode: persistent, {N}session-cookie-name: route, \
             {N}session-cookie-path: /app, {N}session-cookie-max-age: '3600', {N}session-cookie-expires: '7200', \
             {N}session-cookie-samesite: none, {N}session-cookie-conditional-samesite-none: 'true', \
             {N}session-cookie-secure: 'true', {N}session-cookie-change-on-failure: 'true', {N}session-cookie-domain: x.test"
        ));
        assert!(problems.is_empty(), "{problems:?}");
        let Some(Choice::Sticky(a)) = p.choice.as_deref() else {
            panic!("{:?}", p.choice)
        };
        assert_eq!(
            a,
            &Affinity {
                cookie: "route".into(),
                persistent: true,
                path: Some("/app".into()),
                domain: Some("x.test".into()),
                max_age: Some(3600),
                expires: Some(7200),
                samesite: Some(SameSite::None),
                conditional_samesite_none: true,
                secure: true,
                change_on_failure: true,
            }
        );
        // Bad values: reported, defaults used.
        let (p, problems) = parse(&format!(
            "{N}affinity: cookie, {N}affinity-mode: sticky, {N}session-cookie-name: 'a b', \
             {N}session-cookie-path: app, {N}session-cookie-max-age: 1h, {N}session-cookie-samesite: sometimes"
        ));
        assert_eq!(problems.len(), 5, "{problems:?}");
        let Some(Choice::Sticky(a)) = p.choice.as_deref() else {
            panic!("{:?}", p.choice)
        };
        assert_eq!(
            (a.cookie.as_str(), a.persistent, &a.path, a.max_age),
            ("INGRESSCOOKIE", false, &None, None)
        );
        // Cookie settings without affinity are reported; other affinity kinds too.
        let (p, problems) = parse(&format!("{N}session-cookie-name: x, {N}affinity-mode: persistent"));
        assert!(p.choice.is_none());
        assert_eq!(problems.len(), 2, "{problems:?}");
        let (p, problems) = parse(&format!("{N}affinity: ip"));
        assert!(p.choice.is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn canary_ingress_annotations() {
        // A canary honours its own balancing; the rest is reported as ignored.
        let (p, problems) = parse(&format!(
            "{N}canary: 'true', {N}canary-weight: '20', {N}load-balance: ewma, {N}rewrite-target: /x, \
             {N}configuration-snippet: x, {N}affinity: cookie"
        ));
        assert_eq!(p.canary.as_ref().map(|c| c.weight), Some(20));
        assert_eq!(p.lb, LbMethod::Ewma);
        assert!(matches!(p.choice.as_deref(), Some(Choice::Sticky(_))));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("rewrite-target") || problems[1].contains("rewrite-target"));
        assert!(problems.iter().any(|p| p.contains("refused")), "{problems:?}");
        // Legacy behaviour: the canary ignores affinity.
        let (p, _) = parse(&format!(
            "{N}canary: 'true', {N}affinity: cookie, {N}affinity-canary-behavior: legacy"
        ));
        assert!(p.choice.is_none());
    }

    const OBJECTS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress-controller}
---
apiVersion: v1
kind: Service
metadata: {name: main}
spec: {ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: next}
spec: {ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: main-1, labels: {kubernetes.io/service-name: main}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: next-1, labels: {kubernetes.io/service-name: next}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.1.1]}]
"#;

    fn ing(name: &str, created: &str, host: &str, path: &str, svc: &str, annotations: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, creationTimestamp: \"{created}\", annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: {host}\n    http: {{paths: [{{path: {path}, pathType: Prefix, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}]}}\n"
        )
    }

    fn table(extra: &str) -> RouteTable {
        compile(
            &test_support::snapshot(&format!("{OBJECTS}{extra}")),
            &ClassSelection::default(),
        )
    }

    #[test]
    fn canaries_attach_to_main_routes() {
        let canary = format!("{N}canary: 'true', {N}canary-by-header: x-canary");
        let t = table(
            &(ing("main", "2020-01-01T00:00:00Z", "x.test", "/app", "main", "")
                + &ing("can", "2021-01-01T00:00:00Z", "x.test", "/app", "next", &canary)
                + &ing("late", "2022-01-01T00:00:00Z", "x.test", "/app", "next", &canary)
                + &ing("orphan", "2021-01-01T00:00:00Z", "y.test", "/", "next", &canary)),
        );
        let m = t.route("x.test", "/app/a").unwrap();
        assert_eq!(t.upstreams[m.upstream].name, "default/main:80");
        let b = m.balance.expect("canary attached");
        let c = b.canary.as_ref().unwrap();
        assert_eq!(t.upstreams[c.upstream].name, "default/next:80");
        assert_eq!(c.ingress.name, "can");
        assert_eq!(b.cookie_path, "/app");
        // The canary claims nothing itself.
        assert!(t.route("y.test", "/").is_none());
        let problems: Vec<String> = t.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("default/late") && p.contains("older canary")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("default/orphan") && p.contains("no main Ingress")),
            "{problems:?}"
        );
        assert!(t.render().contains("canary"), "{}", t.render());
        // Without a canary or keyed pick, routes carry nothing.
        let t = table(&ing("main", "2020-01-01T00:00:00Z", "x.test", "/", "main", ""));
        assert!(t.route("x.test", "/").unwrap().balance.is_none());
    }

    #[test]
    fn balancing_mode_is_part_of_the_upstream_identity() {
        let t = table(
            &(ing("a", "2020-01-01T00:00:00Z", "a.test", "/", "main", "")
                + &ing(
                    "b",
                    "2020-01-01T00:00:00Z",
                    "b.test",
                    "/",
                    "main",
                    &format!("{N}upstream-hash-by: '$uri'"),
                )
                + &ing(
                    "c",
                    "2020-01-01T00:00:00Z",
                    "c.test",
                    "/",
                    "main",
                    &format!("{N}affinity: cookie"),
                )
                + &ing(
                    "d",
                    "2020-01-01T00:00:00Z",
                    "d.test",
                    "/",
                    "main",
                    &format!("{N}upstream-hash-by: '$uri'"),
                )),
        );
        let up = |h: &str| t.route(h, "/").unwrap().upstream;
        assert_ne!(up("a.test"), up("b.test"));
        assert_ne!(up("b.test"), up("c.test"));
        assert_eq!(up("b.test"), up("d.test"));
        assert!(t.route("a.test", "/").unwrap().balance.is_none());
        assert_eq!(t.route("c.test", "/").unwrap().balance.unwrap().cookie_path, "/");
        assert!(t.render().contains("affinity: cookie INGRESSCOOKIE"), "{}", t.render());
    }

    fn spec(choice: Choice, n: u8) -> UpstreamSpec {
        UpstreamSpec {
            name: "ns/s:80".into(),
            endpoints: (0..n)
                .map(|i| UpstreamEndpoint {
                    addr: SocketAddr::from(([10, 0, 0, i + 1], 8080)),
                    pod: None,
                })
                .collect(),
            lb: LbMethod::RoundRobin,
            h2c: false,
            choice: Some(Arc::new(choice)),
            tls: None,
        }
    }

    fn states(s: &UpstreamSpec) -> Vec<Arc<EndpointState>> {
        s.endpoints
            .iter()
            .map(|e| Arc::new(EndpointState::new(e.addr, None, false, 1)))
            .collect()
    }

    fn affinity(persistent: bool) -> Affinity {
        Affinity {
            cookie: "route".into(),
            persistent,
            path: None,
            domain: None,
            max_age: Some(60),
            expires: None,
            samesite: Some(SameSite::Lax),
            conditional_samesite_none: false,
            secure: false,
            change_on_failure: false,
        }
    }

    fn cookie_headers(set_cookie: &HeaderValue) -> HeaderMap {
        let pair = set_cookie.to_str().unwrap().split(';').next().unwrap().to_string();
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, pair.parse().unwrap());
        h
    }

    #[test]
    fn sticky_cookies_name_their_endpoint() {
        for persistent in [true, false] {
            let s = spec(Choice::Sticky(affinity(persistent)), 3);
            let eps = states(&s);
            let c = Chooser::build(&s).unwrap();
            let fresh = PickKey::Sticky {
                cookie: None,
                samesite_none: true,
            };
            // No cookie: the method picks, the response sets the cookie.
            assert_eq!(c.pick(&eps, &[], fresh), None);
            let set = c.set_cookie(fresh, 2, "/app", false).unwrap();
            let text = set.to_str().unwrap();
            assert!(text.starts_with("route="), "{text}");
            assert!(
                text.ends_with("; Path=/app; Max-Age=60; HttpOnly; SameSite=Lax"),
                "{text}"
            );
            assert!(!text.contains("10.0.0"), "{text}");
            // With it: the same endpoint, no new cookie.
            let key = c.cookie_key(&cookie_headers(&set));
            assert!(key.is_some());
            let sticky = PickKey::Sticky {
                cookie: key,
                samesite_none: true,
            };
            assert_eq!(c.pick(&eps, &[], sticky), Some(Some(2)));
            assert_eq!(c.set_cookie(sticky, 2, "/app", false), None);
            // Tried already, without change-on-failure: nothing else.
            assert_eq!(c.pick(&eps, &[2], sticky), Some(None));
            // Another upstream's cookie is not ours.
            let mut other = s.clone();
            other.name = "ns/t:80".into();
            assert_eq!(Chooser::build(&other).unwrap().cookie_key(&cookie_headers(&set)), None);
        }
        // change-on-failure: a failed session endpoint falls back to the method.
        let mut a = affinity(true);
        a.change_on_failure = true;
        let s = spec(Choice::Sticky(a), 3);
        let c = Chooser::build(&s).unwrap();
        let set = c
            .set_cookie(
                PickKey::Sticky {
                    cookie: None,
                    samesite_none: true,
                },
                1,
                "/",
                true,
            )
            .unwrap();
        assert!(set.to_str().unwrap().contains("; Secure"));
        let key = PickKey::Sticky {
            cookie: c.cookie_key(&cookie_headers(&set)),
            samesite_none: true,
        };
        assert_eq!(c.pick(&states(&s), &[1], key), None);
        // Persistent: gone endpoint → a new pick; balanced keeps mapping.
        let mut fewer = s.clone();
        fewer.endpoints.remove(1);
        let c2 = Chooser::build(&fewer).unwrap();
        assert_eq!(c2.pick(&states(&fewer), &[], key), None);
    }

    #[test]
    fn hashing_picks_skip_tried_endpoints() {
        for consistent in [true, false] {
            let s = spec(
                Choice::Hash(HashBy {
                    source: "$uri".into(),
                    parts: vec![Part::Uri],
                    consistent,
                }),
                4,
            );
            let eps = states(&s);
            let c = Chooser::build(&s).unwrap();
            let mut seen = HashSet::new();
            for k in 0..64u64 {
                let key = PickKey::Hash(chash::hash64(&k.to_le_bytes()));
                let first = c.pick(&eps, &[], key).unwrap().unwrap();
                assert_eq!(c.pick(&eps, &[], key), Some(Some(first)));
                let second = c.pick(&eps, &[first], key).unwrap().unwrap();
                assert_ne!(first, second);
                assert_eq!(c.pick(&eps, &[0, 1, 2, 3], key), Some(None));
                seen.insert(first);
            }
            assert_eq!(seen.len(), 4, "keys spread over every endpoint");
        }
    }

    #[test]
    fn ewma_prefers_the_faster_endpoint() {
        let s = spec(Choice::Sticky(affinity(true)), 2);
        let eps = states(&s);
        eps[0].ewma.observe(Duration::from_millis(200));
        eps[1].ewma.observe(Duration::from_millis(5));
        assert!(eps[1].ewma.score() < eps[0].ewma.score());
        for _ in 0..20 {
            assert_eq!(ewma_pick(&eps, &[0, 1]), Some(1));
        }
        assert_eq!(ewma_pick(&eps, &[0]), Some(0));
        assert_eq!(ewma_pick(&eps, &[]), None);
    }

    #[test]
    fn cookie_dates_and_samesite_none_clients() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t, 0), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(t, 86_400), "Mon, 07 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(t, i64::MAX), "Fri, 31 Dec 9999 23:59:59 GMT");
        assert_eq!(http_date(t, i64::MIN), "Thu, 01 Jan 1970 00:00:00 GMT");
        let ua = |s: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::USER_AGENT, s.parse().unwrap());
            samesite_none_compatible(&h)
        };
        assert!(!ua(
            "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/62.0.3202.94 Safari/537.36"
        ));
        assert!(ua(
            "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
        ));
        assert!(!ua("Mozilla/5.0 (iPhone; CPU iPhone OS 12_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/12.1.2 Mobile/15E148 Safari/604.1"));
        assert!(samesite_none_compatible(&HeaderMap::new()));
    }
}
