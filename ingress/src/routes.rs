//! The pure compile step: `Snapshot` → `RouteTable`.
//!
//! This module owns which Ingresses are ours (class selection), how their
//! rules are merged per host, how a request's host and path pick a route
//! (exactly as networking.k8s.io/v1 defines it), and how a Service backend
//! becomes a list of pod `IP:port` endpoints. No I/O: the proxy swaps the
//! result in whole; everything here is tested table-driven.
//!
//! Matching rules implemented here:
//! - host: exact (case-insensitive, port and trailing dot ignored), else a
//!   `*.suffix` wildcard matching exactly one extra label; rules without a
//!   host match every request. When the most specific host has no matching
//!   path, the next one (wildcard, then host-less rules) is tried.
//! - path: `Exact` compares the whole path case-sensitively; `Prefix`
//!   compares `/`-separated elements with a trailing slash ignored;
//!   `ImplementationSpecific` is treated as `Prefix`. The longest path wins
//!   and on a tie `Exact` beats `Prefix`.
//! - nothing matches → the oldest Ingress's `spec.defaultBackend`, else 404.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use ferry_cluster::{BackendPort, Ingress, IngressBackend, ObjectKey, PathType, ServiceType, Snapshot};

use crate::policy::balance::{self, Choice, PendingCanary, RouteBalance};
use crate::policy::paths::{path_regex, OrgPathRegex, Rewrite};
use crate::policy::upstream_opts::{self, UpstreamPolicy};
use crate::policy::upstream_tls::UpstreamTls;
use crate::policy::{Policy, Reader};

/// Annotation choosing the load-balancing method (NGINX Ingress Controller's name).
pub const LB_METHOD_ANNOTATION: &str = "nginx.org/lb-method";
/// Annotation asking for HTTP/2 cleartext (h2c) to the upstream.
pub const BACKEND_PROTOCOL_ANNOTATION: &str = "ferry.dev/backend-protocol";
/// ingress-nginx's equivalent (read with the other upstream annotations
/// in `policy::upstream_opts`).
pub const NGINX_BACKEND_PROTOCOL_ANNOTATION: &str = crate::policy::upstream_opts::BACKEND_PROTOCOL;
/// The `appProtocol` value that selects h2c to the upstream.
pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";
/// Annotations limiting the request body size (nginx size syntax: `8m`,
/// `512k`, `1g`, bytes; `0` for no limit), in the order they are read:
/// ours, NGINX Ingress Controller's, ingress-nginx's. Without one a body
/// is not limited (both nginx controllers default to 1m; ferry streams
/// bodies and leaves the limit to the Ingress).
pub const BODY_SIZE_ANNOTATIONS: [&str; 3] = [
    "ferry.dev/client-max-body-size",
    "nginx.org/client-max-body-size",
    "nginx.ingress.kubernetes.io/proxy-body-size",
];
/// Annotations that turn off the redirect of plain HTTP to HTTPS for the
/// TLS hosts of an Ingress with `"false"`: ingress-nginx's, NGINX Ingress
/// Controller's and ours. On by default, as in both controllers.
pub const SSL_REDIRECT_ANNOTATIONS: [&str; 3] = [
    "nginx.ingress.kubernetes.io/ssl-redirect",
    "ingress.kubernetes.io/ssl-redirect",
    "ferry.dev/ssl-redirect",
];

/// Which Ingresses this controller serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSelection {
    /// IngressClasses whose `spec.controller` equals this are ours.
    pub controller_name: String,
    /// Class names served regardless of their controller (`--ingress-class`).
    pub class_names: Vec<String>,
}

impl Default for ClassSelection {
    fn default() -> Self {
        ClassSelection {
            controller_name: crate::DEFAULT_CONTROLLER_NAME.to_string(),
            class_names: Vec::new(),
        }
    }
}

impl ClassSelection {
    /// The class names that are ours in this snapshot, and whether one of
    /// them is the cluster's default class.
    fn our_classes(&self, snap: &Snapshot) -> (HashSet<String>, bool) {
        let mut ours: HashSet<String> = self.class_names.iter().cloned().collect();
        let mut default_ours = false;
        for class in snap.ingress_classes() {
            if class.controller == self.controller_name || self.class_names.contains(&class.name) {
                ours.insert(class.name.clone());
                default_ours |= class.is_default;
            }
        }
        (ours, default_ours)
    }

    /// Whether `ing` is served by this controller.
    pub fn serves(&self, snap: &Snapshot, ing: &Ingress) -> bool {
        let (ours, default_ours) = self.our_classes(snap);
        serves(&ours, default_ours, ing)
    }
}

fn serves(ours: &HashSet<String>, default_ours: bool, ing: &Ingress) -> bool {
    match &ing.class_name {
        Some(c) => ours.contains(c),
        None => default_ours,
    }
}

/// How one upstream spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum LbMethod {
    #[default]
    RoundRobin,
    LeastConn,
    Random,
    /// Two random endpoints, the one with fewer requests in flight wins.
    RandomTwoLeastConn,
    /// Two random endpoints, the one with the lower decaying average
    /// response time wins (ingress-nginx's `load-balance: ewma`).
    Ewma,
}

impl LbMethod {
    /// Parses the `nginx.org/lb-method` values ferry supports.
    pub fn parse(value: &str) -> Option<LbMethod> {
        let words: Vec<&str> = value.split_whitespace().collect();
        match words.as_slice() {
            ["round_robin"] => Some(LbMethod::RoundRobin),
            ["least_conn"] => Some(LbMethod::LeastConn),
            ["random"] => Some(LbMethod::Random),
            ["random", "two"] | ["random", "two", "least_conn"] => Some(LbMethod::RandomTwoLeastConn),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LbMethod::RoundRobin => "round_robin",
            LbMethod::LeastConn => "least_conn",
            LbMethod::Random => "random",
            LbMethod::RandomTwoLeastConn => "random two least_conn",
            LbMethod::Ewma => "ewma",
        }
    }
}

/// One pod endpoint of an upstream: what gets dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEndpoint {
    pub addr: SocketAddr,
    pub pod: Option<String>,
}

/// A Service port as the proxy sees it: the endpoints to dial and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// `namespace/service:port`, also the metrics label.
    pub name: String,
    pub endpoints: Vec<UpstreamEndpoint>,
    pub lb: LbMethod,
    /// Speak HTTP/2 with prior knowledge to the endpoints (gRPC): h2c, or
    /// h2 over TLS (ALPN h2) when `tls` is set.
    pub h2c: bool,
    /// Hashing or cookie affinity (`policy::balance`).
    pub choice: Option<Arc<Choice>>,
    /// Connect over TLS (`backend-protocol: HTTPS`/`GRPCS`); such
    /// upstreams always take the hyper client.
    pub tls: Option<Arc<UpstreamTls>>,
}

/// How a rule's path is compared with the request path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathMatch {
    /// The whole path, case-sensitive.
    Exact(String),
    /// Path elements; stored without the trailing slash (`/` is stored empty).
    Prefix(String),
    /// A regex anchored at the start (ingress-nginx `use-regex` and
    /// `rewrite-target`, NGINX IC `path-regex`).
    Regex(RegexPath),
}

/// A path regex with the path it was written as (which identifies it).
#[derive(Debug, Clone)]
pub struct RegexPath {
    pub source: String,
    pub case_insensitive: bool,
    pub regex: regex::Regex,
}

impl PartialEq for RegexPath {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.case_insensitive == other.case_insensitive
    }
}

impl Eq for RegexPath {}

impl std::hash::Hash for RegexPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.source.hash(state);
        self.case_insensitive.hash(state);
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => {
                p.is_empty()
                    || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Regex(r) => r.regex.is_match(path),
        }
    }

    /// `path` (as written) as a regex path.
    fn regex(path: &str, case_insensitive: bool) -> Result<PathMatch, String> {
        Ok(PathMatch::Regex(RegexPath {
            source: path.to_string(),
            case_insensitive,
            regex: path_regex(path, case_insensitive)?,
        }))
    }

    /// The order routes are tried in, first match wins: Exact paths, then
    /// regexes (longest first, as ingress-nginx orders its regex
    /// locations), then prefixes (longest first). Without regexes this is
    /// the spec's "longest match wins, Exact before Prefix on a tie".
    fn sort_key(&self) -> (u8, std::cmp::Reverse<usize>) {
        match self {
            PathMatch::Exact(p) => (0, std::cmp::Reverse(p.len())),
            PathMatch::Regex(r) => (1, std::cmp::Reverse(r.source.len())),
            PathMatch::Prefix(p) => (2, std::cmp::Reverse(p.len())),
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(p) => write!(f, "Exact {p}"),
            PathMatch::Prefix(p) if p.is_empty() => f.write_str("Prefix /"),
            PathMatch::Prefix(p) => write!(f, "Prefix {p}"),
            PathMatch::Regex(r) if r.case_insensitive => write!(f, "Regex ~* ^{}", r.source),
            PathMatch::Regex(r) => write!(f, "Regex ~ ^{}", r.source),
        }
    }
}

/// One path of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    /// The path as the Ingress wrote it (what a regex is made of when the
    /// host's paths become regexes).
    pub written_path: String,
    /// How the forwarded URI is rewritten, if it is.
    pub rewrite: Option<Rewrite>,
    /// Index into `RouteTable::upstreams`.
    pub upstream: usize,
    /// The Ingress this route came from.
    pub ingress: ObjectKey,
    /// The rule's host as written (lowercased; empty for host-less rules
    /// and the default backend): a bounded metrics label.
    pub host: String,
    /// The host is in the Ingress's `spec.tls` and the redirect is not
    /// turned off: plain HTTP requests get a 308 to HTTPS.
    pub https_only: bool,
    /// Largest request body accepted (413 beyond), from the Ingress's
    /// body-size annotation; `None`: no limit.
    pub max_body: Option<u64>,
    /// What the Ingress's annotations ask for (shared by its routes).
    pub policy: Arc<Policy>,
    /// A canary, or a per-request key for the endpoint pick
    /// (`policy::balance`); `None` on plain routes.
    pub balance: Option<Arc<RouteBalance>>,
}

/// The result of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    pub upstream: usize,
    pub path: &'a PathMatch,
    pub rewrite: Option<&'a Rewrite>,
    pub ingress: &'a ObjectKey,
    pub host: &'a str,
    pub https_only: bool,
    pub max_body: Option<u64>,
    pub policy: &'a Policy,
    pub balance: Option<&'a RouteBalance>,
}

impl Route {
    fn matched(&self) -> RouteMatch<'_> {
        RouteMatch {
            upstream: self.upstream,
            path: &self.path,
            rewrite: self.rewrite.as_ref(),
            ingress: &self.ingress,
            host: &self.host,
            https_only: self.https_only,
            max_body: self.max_body,
            policy: &self.policy,
            balance: self.balance.as_deref(),
        }
    }
}

/// A `spec.tls` entry of an Ingress we serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsBinding {
    pub ingress: ObjectKey,
    /// Lowercased hosts (may be `*.suffix`).
    pub hosts: Vec<String>,
    pub secret: ObjectKey,
}

/// A problem with one object, reported and skipped; the rest still serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `Kind namespace/name`.
    pub object: String,
    /// The field at fault, e.g. `spec.rules[0].http.paths[1].path`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.object, self.field, self.message)
    }
}

/// Everything the proxy needs to route, compiled from one Snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub generation: u64,
    exact: HashMap<String, Vec<Route>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Vec<Route>>,
    /// Rules without a host.
    any_host: Vec<Route>,
    default_backend: Option<Route>,
    /// `server-alias`: alias host → the host whose routes it shares.
    aliases: HashMap<String, String>,
    /// `from-to-www-redirect`: host → the host it is redirected to.
    www_redirects: HashMap<String, String>,
    pub upstreams: Vec<Arc<UpstreamSpec>>,
    pub tls: Vec<TlsBinding>,
    /// The Ingresses we serve (status is written on these).
    pub served: Vec<ObjectKey>,
    /// Their annotation policies, in the same order.
    pub policies: Vec<Arc<Policy>>,
    pub problems: Vec<Problem>,
}

/// Lowercases `authority` and removes the port and a trailing dot; borrows
/// when nothing needs to change (the common case on the request path).
pub fn normalize_host(authority: &str) -> Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Why a request path cannot be normalized (the request gets 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..` segments climb above `/`.
    AboveRoot,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` is already in normal form (the usual request): no
/// escapes, no empty, `.` or `..` segments. Allocation-free.
fn is_normal_path(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return true;
    }
    let mut segment_start = 1;
    for i in 1..=b.len() {
        if i == b.len() || b[i] == b'/' {
            let seg = &b[segment_start..i];
            // An empty segment is `//`; the final one (a trailing `/`) is fine.
            if (seg.is_empty() && i < b.len()) || seg == b"." || seg == b".." {
                return false;
            }
            segment_start = i + 1;
        } else if b[i] == b'%' {
            return false;
        }
    }
    true
}

/// The path a request is routed (and by default forwarded) by: RFC 3986
/// §6.2.2 normalization — percent-escapes of unreserved characters decoded
/// (others kept, hex in upper case; an encoded `/` stays encoded), repeated
/// slashes merged, then `.` and `..` segments removed (§5.2.4). A path that
/// climbs above `/` is an error, as in Envoy. Borrows when `path` is
/// already normal; a path not starting with `/` (`*`) is left as it is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal_path(path) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode unreserved escapes and upper-case the rest.
    let b = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                decoded.push(v);
            } else {
                decoded.push(b'%');
                decoded.extend_from_slice(format!("{v:02X}").as_bytes());
            }
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    // Segments, with empty ones (merged slashes) and `.` dropped and `..`
    // popping one.
    let trailing = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    let mut out: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&c| c == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        // Only ASCII went in (a request target is ASCII).
        normal.push_str(std::str::from_utf8(seg).unwrap_or_default());
    }
    if normal.is_empty() || (trailing && !out.is_empty()) {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

fn first_match<'a>(routes: &'a [Route], path: &str) -> Option<RouteMatch<'a>> {
    routes.iter().find(|r| r.path.matches(path)).map(Route::matched)
}

/// An nginx size: bytes, or a number with `k`, `m` or `g` (any case).
pub fn parse_size(value: &str) -> Option<u64> {
    let v = value.trim();
    let (digits, unit) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&v[..i], c.to_ascii_lowercase()),
        _ => (v, 'b'),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let scale: u64 = match unit {
        'b' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Whether a `spec.tls` host covers a rule host: the same name, or a
/// `*.suffix` entry and a host one label above the suffix.
fn tls_covers(tls_host: &str, host: &str) -> bool {
    tls_host == host
        || tls_host
            .strip_prefix("*.")
            .is_some_and(|suffix| host.split_once('.').is_some_and(|(_, rest)| rest == suffix))
}

impl RouteTable {
    /// Picks the route for a request. `host` is the Host header or the
    /// `:authority` (any case, with or without port); `path` excludes the query.
    pub fn route(&self, host: &str, path: &str) -> Option<RouteMatch<'_>> {
        let host = normalize_host(host);
        let host: &str = &host;
        let exact = match self.exact.get(host) {
            None if !self.aliases.is_empty() => self.aliases.get(host).and_then(|h| self.exact.get(h)),
            found => found,
        };
        if let Some(routes) = exact {
            if let Some(m) = first_match(routes, path) {
                return Some(m);
            }
        }
        if let Some((_, suffix)) = host.split_once('.') {
            if let Some(routes) = self.wildcard.get(suffix) {
                if let Some(m) = first_match(routes, path) {
                    return Some(m);
                }
            }
        }
        if let Some(m) = first_match(&self.any_host, path) {
            return Some(m);
        }
        self.default_backend.as_ref().map(Route::matched)
    }

    /// `from-to-www-redirect`: the host a request for `host` is redirected
    /// to (308), when `host` has no rules of its own.
    pub fn www_redirect(&self, host: &str) -> Option<&str> {
        if self.www_redirects.is_empty() {
            return None;
        }
        self.www_redirects.get(&*normalize_host(host)).map(String::as_str)
    }

    /// Every route with a host rule or none (not the default backend), for
    /// the compile passes that attach things to routes.
    pub(crate) fn for_each_route_mut(&mut self, mut f: impl FnMut(&mut Route)) {
        self.exact
            .values_mut()
            .chain(self.wildcard.values_mut())
            .flatten()
            .chain(self.any_host.iter_mut())
            .for_each(&mut f);
    }

    /// Every route: the hosts' (in no particular order), the host-less
    /// rules', then the default backend.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .flatten()
            .chain(&self.any_host)
            .chain(&self.default_backend)
    }

    pub fn upstream(&self, index: usize) -> Option<&Arc<UpstreamSpec>> {
        self.upstreams.get(index)
    }

    /// Number of routes (all hosts), for logs and metrics.
    pub fn route_count(&self) -> usize {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .map(Vec::len)
            .sum::<usize>()
            + self.any_host.len()
            + usize::from(self.default_backend.is_some())
    }

    /// Every host with a TLS binding or a rule, for the default-certificate SANs.
    pub fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self.exact.keys().cloned().collect();
        h.extend(self.wildcard.keys().map(|s| format!("*.{s}")));
        h.sort();
        h
    }

    /// Human-readable listing for `ferry render --what routes`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let upstream = |i: usize| -> String {
            match self.upstreams.get(i) {
                Some(u) => {
                    let eps: Vec<String> = u.endpoints.iter().map(|e| e.addr.to_string()).collect();
                    let proto = match (&u.tls, u.h2c) {
                        (Some(t), _) => format!(" {}", t.describe()),
                        (None, true) => " h2c".to_string(),
                        (None, false) => String::new(),
                    };
                    let eps = if eps.is_empty() {
                        "no endpoints (503)".to_string()
                    } else {
                        eps.join(" ")
                    };
                    let choice = u
                        .choice
                        .as_ref()
                        .map(|c| format!(", {}", c.describe()))
                        .unwrap_or_default();
                    format!("{} [{}{}{}] -> {}", u.name, u.lb.as_str(), proto, choice, eps)
                }
                None => "?".into(),
            }
        };
        let mut section = |title: &str, routes: &[Route]| {
            let _ = writeln!(out, "{title}");
            for r in routes {
                let _ = writeln!(
                    out,
                    "  {:<28} {}  (ingress {}){}{}",
                    r.path.to_string(),
                    upstream(r.upstream),
                    r.ingress,
                    if r.https_only { ", http -> 308 https" } else { "" },
                    r.max_body.map(|n| format!(", body <= {n} bytes")).unwrap_or_default()
                );
                if let Some(c) = r.balance.as_ref().and_then(|b| b.canary.as_ref()) {
                    let _ = writeln!(
                        out,
                        "  {:<28} {}  (ingress {})",
                        "  canary",
                        upstream(c.upstream),
                        c.ingress
                    );
                }
            }
        };
        let mut hosts: Vec<&String> = self.exact.keys().collect();
        hosts.sort();
        for h in hosts {
            section(&format!("host {h}"), &self.exact[h]);
        }
        let mut wild: Vec<&String> = self.wildcard.keys().collect();
        wild.sort();
        for w in wild {
            section(&format!("host *.{w}"), &self.wildcard[w]);
        }
        if !self.any_host.is_empty() {
            section("any host", &self.any_host);
        }
        let mut aliases: Vec<_> = self.aliases.iter().collect();
        aliases.sort();
        for (alias, host) in aliases {
            let _ = writeln!(out, "host {alias}: alias of {host}");
        }
        let mut www: Vec<_> = self.www_redirects.iter().collect();
        www.sort();
        for (from, to) in www {
            let _ = writeln!(out, "host {from}: 308 to {to}");
        }
        match &self.default_backend {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "default backend: {}  (ingress {})",
                    upstream(r.upstream),
                    r.ingress
                );
            }
            None => out.push_str("default backend: none (404)\n"),
        }
        for t in &self.tls {
            let _ = writeln!(
                out,
                "tls {} -> secret {}  (ingress {})",
                t.hosts.join(","),
                t.secret,
                t.ingress
            );
        }
        for policy in &self.policies {
            let lines = policy.describe();
            if !lines.is_empty() {
                let _ = writeln!(out, "ingress {}:", policy.ingress);
                for l in lines {
                    let _ = writeln!(out, "  {l}");
                }
            }
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem: {p}");
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct UpstreamKey {
    namespace: String,
    service: String,
    port: String,
    lb: LbMethod,
    h2c: bool,
    choice: Option<Arc<Choice>>,
    tls: Option<Arc<UpstreamTls>>,
    /// `service-upstream`: the ClusterIP is dialled.
    cluster_ip: bool,
}

/// One Ingress with what its annotations say.
struct Annotated<'a> {
    ing: &'a Arc<Ingress>,
    ssl_redirect: bool,
    max_body: Option<u64>,
    upstream_options: (LbMethod, bool, Option<Arc<Choice>>),
    policy: Arc<Policy>,
}

struct Compiler<'a> {
    snap: &'a Snapshot,
    table: RouteTable,
    upstream_index: BTreeMap<UpstreamKey, usize>,
}

impl Compiler<'_> {
    fn problem(&mut self, ing: &Ingress, field: impl Into<String>, message: impl Into<String>) {
        self.table.problems.push(Problem {
            object: format!("Ingress {}", ing.key),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Whether plain HTTP to this Ingress's TLS hosts is redirected: yes
    /// unless an ssl-redirect annotation says `"false"`.
    fn ssl_redirect(r: &mut Reader<'_>) -> bool {
        let mut redirect = true;
        for name in SSL_REDIRECT_ANNOTATIONS {
            if r.flag(name) == Some(false) {
                redirect = false;
            }
        }
        redirect
    }

    /// The request body limit of this Ingress: the first body-size
    /// annotation present; `0` or none means no limit. A value that does
    /// not parse is reported and means no limit.
    fn max_body(r: &mut Reader<'_>) -> Option<u64> {
        let (name, _) = r.first(&BODY_SIZE_ANNOTATIONS)?;
        r.parse(name, |v| {
            parse_size(v).ok_or_else(|| "not a size (like 8m, 512k, 1g or bytes); no limit".to_string())
        })
        .filter(|&n| n > 0)
    }

    /// Whether the annotations ask for h2c (the load-balancing method is
    /// read by `policy::balance`).
    fn upstream_options(r: &mut Reader<'_>) -> bool {
        let h2c = r
            .get(BACKEND_PROTOCOL_ANNOTATION)
            .is_some_and(|v| v.eq_ignore_ascii_case("h2c"));
        h2c
    }

    /// Resolves a backend to an upstream index. Missing Services or ports
    /// are reported and give an upstream without endpoints (503), so the
    /// path stays claimed rather than falling through to another route.
    fn upstream(
        &mut self,
        ing: &Ingress,
        field: &str,
        backend: &IngressBackend,
        (lb, annotated_h2c, choice): (LbMethod, bool, Option<Arc<Choice>>),
        up: &UpstreamPolicy,
    ) -> usize {
        let (service, port) = match backend {
            IngressBackend::Service { name, port } => (name.clone(), port.clone()),
            IngressBackend::Resource { kind, name, .. } => {
                self.problem(
                    ing,
                    field,
                    format!("resource backend {kind}/{name} is not supported; answering 503"),
                );
                return self.push_upstream(
                    UpstreamKey {
                        namespace: ing.key.namespace.clone(),
                        service: format!("{kind}/{name}"),
                        port: String::new(),
                        lb,
                        h2c: false,
                        choice,
                        tls: None,
                        cluster_ip: false,
                    },
                    Vec::new(),
                );
            }
        };
        let svc = self.snap.service(&ing.key.namespace, &service).cloned();
        let svc_port = svc.as_ref().and_then(|s| match &port {
            BackendPort::Number(n) => s.ports.iter().find(|p| p.port == *n),
            BackendPort::Name(n) => s.port_named(n),
        });
        let (policy_h2, _) = up.protocol_for(&service);
        let mut h2c =
            annotated_h2c || policy_h2 || svc_port.is_some_and(|p| p.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL));
        let mut endpoints = Vec::new();
        let mut cluster_ip = false;
        match (&svc, svc_port) {
            (None, _) => self.problem(
                ing,
                format!("{field}.service.name"),
                format!("Service {}/{service} not found; answering 503", ing.key.namespace),
            ),
            (Some(_), None) => self.problem(
                ing,
                format!("{field}.service.port"),
                format!(
                    "Service {}/{service} has no port {port}; answering 503",
                    ing.key.namespace
                ),
            ),
            (Some(s), Some(_)) if s.type_ == ServiceType::ExternalName => self.problem(
                ing,
                format!("{field}.service.name"),
                format!(
                    "Service {}/{service} is ExternalName; not supported, answering 503",
                    ing.key.namespace
                ),
            ),
            (Some(s), Some(p)) if up.service_upstream && !s.cluster_ips.is_empty() => {
                // `service-upstream`: the ClusterIP, load-balanced by the
                // service proxy, instead of the pods.
                cluster_ip = true;
                endpoints.push(UpstreamEndpoint {
                    addr: SocketAddr::new(s.cluster_ips[0], p.port),
                    pod: None,
                });
            }
            (Some(s), Some(p)) => {
                if up.service_upstream {
                    self.problem(
                        ing,
                        format!("{field}.service.name"),
                        format!(
                            "Service {}/{service} has no ClusterIP for service-upstream; using its endpoints",
                            ing.key.namespace
                        ),
                    );
                }
                for b in self.snap.usable_backends(s, p) {
                    h2c |= b.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL);
                    endpoints.push(UpstreamEndpoint {
                        addr: SocketAddr::new(b.ip, b.port),
                        pod: b.pod_name,
                    });
                }
            }
        }
        let tls = up.tls_for(&ing.key.namespace, &service, h2c);
        self.push_upstream(
            UpstreamKey {
                namespace: ing.key.namespace.clone(),
                service,
                port: port.to_string(),
                lb,
                h2c,
                choice,
                tls,
                cluster_ip,
            },
            endpoints,
        )
    }

    fn push_upstream(&mut self, key: UpstreamKey, endpoints: Vec<UpstreamEndpoint>) -> usize {
        if let Some(&i) = self.upstream_index.get(&key) {
            return i;
        }
        let i = self.table.upstreams.len();
        let name = if key.port.is_empty() {
            format!("{}/{}", key.namespace, key.service)
        } else {
            format!("{}/{}:{}", key.namespace, key.service, key.port)
        };
        self.table.upstreams.push(Arc::new(UpstreamSpec {
            name,
            endpoints,
            lb: key.lb,
            h2c: key.h2c,
            choice: key.choice.clone(),
            tls: key.tls.clone(),
        }));
        self.upstream_index.insert(key, i);
        i
    }
}

/// Validates and lowercases a rule host; `None` with a message when invalid.
fn rule_host(host: &str) -> Result<String, String> {
    let h = host.to_ascii_lowercase();
    if let Some(suffix) = h.strip_prefix("*.") {
        if suffix.is_empty() || suffix.contains('*') {
            return Err(format!("invalid wildcard host {host:?}"));
        }
    } else if h.contains('*') {
        return Err(format!("wildcard only allowed as the first label: {host:?}"));
    }
    if h.contains(':') || h.contains('/') {
        return Err(format!("host must be a DNS name without port: {host:?}"));
    }
    Ok(h)
}

/// Compiles the routes of the Ingresses `classes` selects.
pub fn compile(snap: &Snapshot, classes: &ClassSelection) -> RouteTable {
    let (ours, default_ours) = classes.our_classes(snap);
    let mut ingresses: Vec<&Arc<Ingress>> = snap.ingresses().filter(|i| serves(&ours, default_ours, i)).collect();
    // The oldest Ingress wins conflicts; name order breaks ties so the
    // result does not depend on map iteration order.
    ingresses.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then_with(|| a.key.cmp(&b.key)));

    let mut c = Compiler {
        snap,
        table: RouteTable {
            generation: snap.generation,
            ..RouteTable::default()
        },
        upstream_index: BTreeMap::new(),
    };
    // (host or "" , path match) → the Ingress that claimed it.
    let mut claimed: HashMap<(String, PathMatch), ObjectKey> = HashMap::new();
    // Paths of canary Ingresses, attached to their main routes at the end.
    let mut canaries: Vec<PendingCanary> = Vec::new();

    // The annotations first: ingress-nginx makes every path of a host a
    // regex when any Ingress of that host asks for regexes, so that must
    // be known before any path is compiled.
    let annotated: Vec<Annotated<'_>> = ingresses
        .into_iter()
        .map(|ing| {
            let mut reader = Reader::new(ing);
            let ssl_redirect = Compiler::ssl_redirect(&mut reader);
            let max_body = Compiler::max_body(&mut reader);
            let annotated_h2c = Compiler::upstream_options(&mut reader);
            let mut policy = Policy::compile(snap, &mut reader);
            c.table.problems.extend(reader.finish());
            // `default-backend` (and its custom error pages) as an upstream of its own.
            if let Some(backend) = upstream_opts::default_backend(snap, ing, &policy.upstream) {
                let field = format!("metadata.annotations[{}]", upstream_opts::DEFAULT_BACKEND);
                let plain = UpstreamPolicy::default();
                let i = c.upstream(ing, &field, &backend, (LbMethod::default(), false, None), &plain);
                policy.upstream.default_backend_upstream = Some(i);
            }
            let upstream_options = (policy.balance.lb, annotated_h2c, policy.balance.choice.clone());
            let policy = Arc::new(policy);
            Annotated {
                ing,
                ssl_redirect,
                max_body,
                upstream_options,
                policy,
            }
        })
        .collect();
    let regex_hosts: HashSet<Option<String>> = annotated
        .iter()
        .filter(|a| a.policy.paths.enforces_regex())
        .flat_map(|a| {
            a.ing
                .rules
                .iter()
                .map(|r| r.host.as_deref().map(str::to_ascii_lowercase))
        })
        .collect();

    for Annotated {
        ing,
        ssl_redirect,
        max_body,
        upstream_options,
        policy,
    } in annotated
    {
        c.table.served.push(ing.key.clone());
        let canary = policy.balance.canary.clone();
        c.table.policies.push(policy.clone());
        if let (Some(_), Some(_)) = (&ing.default_backend, &canary) {
            c.problem(
                ing,
                "spec.defaultBackend",
                "a canary of the default backend is not supported; ignored",
            );
        } else if let Some(b) = &ing.default_backend {
            match &c.table.default_backend {
                Some(existing) => {
                    let msg = format!(
                        "conflicts with the default backend of older Ingress {}; ignored",
                        existing.ingress
                    );
                    c.problem(ing, "spec.defaultBackend", msg);
                }
                None => {
                    let upstream = c.upstream(
                        ing,
                        "spec.defaultBackend",
                        b,
                        upstream_options.clone(),
                        &policy.upstream,
                    );
                    c.table.default_backend = Some(Route {
                        path: PathMatch::Prefix(String::new()),
                        written_path: "/".into(),
                        rewrite: None,
                        upstream,
                        ingress: ing.key.clone(),
                        host: String::new(),
                        https_only: false,
                        max_body,
                        policy: policy.clone(),
                        balance: None,
                    });
                }
            }
        }
        for (i, rule) in ing.rules.iter().enumerate() {
            let host = match rule.host.as_deref().map(rule_host) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(msg)) => {
                    c.problem(ing, format!("spec.rules[{i}].host"), msg);
                    continue;
                }
            };
            // Once per rule: whether its host is one of the Ingress's TLS hosts.
            let tls_host = host.as_deref().is_some_and(|h| {
                ing.tls
                    .iter()
                    .any(|t| t.hosts.is_empty() || t.hosts.iter().any(|th| tls_covers(&th.to_ascii_lowercase(), h)))
            });
            let https_only = policy.paths.force_ssl_redirect || (ssl_redirect && tls_host);
            let regex_host = regex_hosts.contains(&host);
            for (j, p) in rule.paths.iter().enumerate() {
                let field = format!("spec.rules[{i}].http.paths[{j}]");
                let path = match (&p.path, p.path_type) {
                    (Some(path), _) if path.starts_with('/') => path.clone(),
                    (None, PathType::Prefix | PathType::ImplementationSpecific) => "/".to_string(),
                    (Some(path), _) => {
                        c.problem(
                            ing,
                            format!("{field}.path"),
                            format!("{path:?} must start with '/'; path skipped"),
                        );
                        continue;
                    }
                    (None, PathType::Exact) => {
                        c.problem(ing, format!("{field}.path"), "missing for pathType Exact; path skipped");
                        continue;
                    }
                };
                let paths = &policy.paths;
                let matcher = match (p.path_type, paths.org_path_regex) {
                    _ if regex_host => PathMatch::regex(&path, true),
                    (_, Some(OrgPathRegex::CaseInsensitive)) => PathMatch::regex(&path, true),
                    (_, Some(OrgPathRegex::CaseSensitive)) => PathMatch::regex(&path, false),
                    (_, Some(OrgPathRegex::Exact)) | (PathType::Exact, None) => Ok(PathMatch::Exact(path.clone())),
                    (PathType::Prefix | PathType::ImplementationSpecific, None) => {
                        Ok(PathMatch::Prefix(path.trim_end_matches('/').to_string()))
                    }
                };
                let matcher = match matcher {
                    Ok(m) => m,
                    Err(msg) => {
                        let why = if regex_host && !paths.enforces_regex() {
                            " (an Ingress of this host sets use-regex or rewrite-target, so all its paths are regexes)"
                        } else {
                            ""
                        };
                        c.problem(
                            ing,
                            format!("{field}.path"),
                            format!("{path:?} is {msg}{why}; path skipped"),
                        );
                        continue;
                    }
                };
                let rewrite = match (&paths.rewrite_target, &p.backend) {
                    (Some(t), _) => Some(Rewrite::Target(t.clone())),
                    (None, IngressBackend::Service { name, .. }) => paths.org_rewrite(name).map(|r| Rewrite::Prefix {
                        prefix: path.clone(),
                        replacement: r.to_string(),
                    }),
                    (None, IngressBackend::Resource { .. }) => None,
                };
                let claim = (host.clone().unwrap_or_default(), matcher.clone());
                // A canary's path is the main Ingress's; it claims nothing.
                if canary.is_none() {
                    if let Some(owner) = claimed.get(&claim) {
                        let msg = format!(
                            "{matcher} on host {:?} already routed by older Ingress {owner}; ignored",
                            claim.0
                        );
                        c.problem(ing, field, msg);
                        continue;
                    }
                    claimed.insert(claim.clone(), ing.key.clone());
                }
                let upstream = c.upstream(
                    ing,
                    &format!("{field}.backend"),
                    &p.backend,
                    upstream_options.clone(),
                    &policy.upstream,
                );
                if let Some(rules) = &canary {
                    canaries.push(PendingCanary {
                        ingress: ing.key.clone(),
                        field,
                        host: claim.0,
                        path: matcher,
                        upstream,
                        rules: rules.clone(),
                    });
                    continue;
                }
                let route = Route {
                    path: matcher,
                    written_path: path,
                    rewrite,
                    upstream,
                    ingress: ing.key.clone(),
                    host: host.clone().unwrap_or_default(),
                    https_only,
                    max_body,
                    policy: policy.clone(),
                    balance: None,
                };
                match &host {
                    None => c.table.any_host.push(route),
                    Some(h) => match h.strip_prefix("*.") {
                        Some(suffix) => c.table.wildcard.entry(suffix.to_string()).or_default().push(route),
                        None => c.table.exact.entry(h.clone()).or_default().push(route),
                    },
                }
            }
        }
        for (i, t) in ing.tls.iter().enumerate() {
            let Some(secret) = &t.secret_name else {
                // No secret: these hosts get the default certificate.
                continue;
            };
            let mut hosts: Vec<String> = t.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            if hosts.is_empty() {
                // No hosts listed: the secret covers this Ingress's rule hosts.
                hosts = ing
                    .rules
                    .iter()
                    .filter_map(|r| r.host.as_ref())
                    .map(|h| h.to_ascii_lowercase())
                    .collect();
            }
            if hosts.is_empty() {
                c.problem(
                    ing,
                    format!("spec.tls[{i}].hosts"),
                    "no hosts to use the secret for; ignored",
                );
                continue;
            }
            c.table.tls.push(TlsBinding {
                ingress: ing.key.clone(),
                hosts,
                secret: ObjectKey::new(ing.key.namespace.clone(), secret.clone()),
            });
        }
    }

    balance::attach(&mut c.table, canaries);
    let sort = |routes: &mut Vec<Route>| routes.sort_by_key(|r| r.path.sort_key());
    c.table.exact.values_mut().for_each(sort);
    c.table.wildcard.values_mut().for_each(sort);
    sort(&mut c.table.any_host);
    host_aliases(&mut c.table, snap);
    c.table
}

/// `server-alias` and `from-to-www-redirect`: extra names for the hosts of
/// an Ingress, never taking a name that has rules of its own (the first
/// Ingress to claim a name keeps it).
fn host_aliases(table: &mut RouteTable, snap: &Snapshot) {
    let mut problems = Vec::new();
    for policy in &table.policies {
        let paths = &policy.paths;
        if paths.aliases.is_empty() && !paths.from_to_www {
            continue;
        }
        let Some(ing) = snap.ingress(&policy.ingress.namespace, &policy.ingress.name) else {
            continue;
        };
        let hosts: Vec<String> = ing
            .rules
            .iter()
            .filter_map(|r| r.host.as_deref())
            .map(str::to_ascii_lowercase)
            .filter(|h| !h.starts_with("*."))
            .collect();
        for alias in &paths.aliases {
            let Some(host) = hosts.first() else { break };
            if table.exact.contains_key(alias) || table.aliases.contains_key(alias) {
                problems.push(Problem {
                    object: format!("Ingress {}", ing.key),
                    field: "metadata.annotations[nginx.ingress.kubernetes.io/server-alias]".into(),
                    message: format!("alias {alias:?} is already a host with rules or an alias; ignored"),
                });
                continue;
            }
            table.aliases.insert(alias.clone(), host.clone());
        }
        if paths.from_to_www {
            for host in &hosts {
                let other = match host.strip_prefix("www.") {
                    Some(bare) => bare.to_string(),
                    None => format!("www.{host}"),
                };
                if !table.exact.contains_key(&other) && !table.aliases.contains_key(&other) {
                    table.www_redirects.entry(other).or_insert_with(|| host.clone());
                }
            }
        }
    }
    table.problems.extend(problems);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: other}
spec: {controller: example.com/other}
---
apiVersion: v1
kind: Service
metadata: {name: a}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec:
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec:
  ports: [{port: 80, targetPort: 9000, appProtocol: kubernetes.io/h2c}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints:
- addresses: [10.0.1.1]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: c-1, labels: {kubernetes.io/service-name: c}}
addressType: IPv4
ports: [{port: 9000}]
endpoints:
- addresses: [10.0.2.1]
"#;

    fn snapshot(extra: &str) -> Snapshot {
        crate::test_support::snapshot(&format!("{BASE}\n---\n{extra}"))
    }

    fn table(extra: &str) -> RouteTable {
        compile(&snapshot(extra), &ClassSelection::default())
    }

    /// `(host, path)` → the upstream name routed to, or None for 404.
    fn check(t: &RouteTable, cases: &[(&str, &str, Option<&str>)]) {
        for (host, path, want) in cases {
            let got = t.route(host, path).map(|m| t.upstreams[m.upstream].name.as_str());
            assert_eq!(got, *want, "host {host:?} path {path:?}\n{}", t.render());
        }
    }

    fn ingress(name: &str, created: &str, class: &str, rules: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\nspec:\n  ingressClassName: {class}\n{rules}\n---\n"
        )
    }

    fn path_rule(host: Option<&str>, paths: &[(&str, &str, &str)]) -> String {
        let mut s = String::new();
        match host {
            Some(h) => s.push_str(&format!("  - host: \"{h}\"\n    http:\n      paths:\n")),
            None => s.push_str("  - http:\n      paths:\n"),
        }
        for (path, ty, svc) in paths {
            s.push_str(&format!(
                "      - {{path: \"{path}\", pathType: {ty}, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}\n"
            ));
        }
        s
    }

    fn rules(parts: &[String]) -> String {
        format!("  rules:\n{}", parts.concat())
    }

    #[test]
    fn paths_are_normalized_like_rfc3986() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/a/b", Ok("/a/b")),
            ("/a/b/", Ok("/a/b/")),
            ("/public/../admin/x", Ok("/admin/x")),
            ("//admin/x", Ok("/admin/x")),
            ("/%61dmin/x", Ok("/admin/x")),
            ("/./admin/x", Ok("/admin/x")),
            ("/admin/../public", Ok("/public")),
            ("/a/%2e%2E/b", Ok("/b")),
            ("/a/%2fb", Ok("/a/%2Fb")),
            ("/a%2F..%2Fb", Ok("/a%2F..%2Fb")),
            ("/a/.", Ok("/a/")),
            ("/a/..", Ok("/")),
            ("/a//b///c", Ok("/a/b/c")),
            ("/..", Err(PathError::AboveRoot)),
            ("/a/../../b", Err(PathError::AboveRoot)),
            ("/%2e%2e/etc", Err(PathError::AboveRoot)),
            ("/a%zz", Err(PathError::BadEscape)),
            ("/a%4", Err(PathError::BadEscape)),
            ("*", Ok("*")),
        ];
        for (input, want) in cases {
            let got = normalize_path(input);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input}");
        }
        assert!(matches!(normalize_path("/already/normal/"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn path_types_follow_the_spec_examples() {
        // The examples table of the Kubernetes Ingress documentation.
        let cases: &[(&str, &str, &str, bool)] = &[
            ("Prefix", "/", "/", true),
            ("Prefix", "/", "/anything/at/all", true),
            ("Exact", "/foo", "/foo", true),
            ("Exact", "/foo", "/bar", false),
            ("Exact", "/foo", "/foo/", false),
            ("Exact", "/foo/", "/foo", false),
            ("Prefix", "/foo", "/foo", true),
            ("Prefix", "/foo", "/foo/", true),
            ("Prefix", "/foo/", "/foo", true),
            ("Prefix", "/foo/", "/foo/", true),
            ("Prefix", "/aaa/bb", "/aaa/bbb", false),
            ("Prefix", "/aaa/bbb", "/aaa/bbb", true),
            ("Prefix", "/aaa/bbb/", "/aaa/bbb", true),
            ("Prefix", "/aaa/bbb", "/aaa/bbb/", true),
            ("Prefix", "/aaa/bbb", "/aaa/bbb/ccc", true),
            ("Prefix", "/aaa/bbb", "/aaa/bbbxyz", false),
            ("Prefix", "/foo", "/foobar", false),
            ("Exact", "/FOO", "/foo", false),
            ("Prefix", "/FOO", "/foo", false),
            ("ImplementationSpecific", "/foo", "/foo/bar", true),
            ("ImplementationSpecific", "/foo", "/foobar", false),
        ];
        for (ty, rule, req, want) in cases {
            let t = table(&ingress(
                "i",
                "2024-01-01T00:00:00Z",
                "ferry",
                &rules(&[path_rule(Some("x.test"), &[(rule, ty, "a")])]),
            ));
            let got = t.route("x.test", req).is_some();
            assert_eq!(got, *want, "{ty} {rule} vs request {req}");
        }
    }

    #[test]
    fn longest_match_wins_and_exact_beats_prefix_on_a_tie() {
        // The spec's multiple-match example: Prefix / and /aaa, Exact /aaa/bbb etc.
        let r = rules(&[path_rule(
            Some("x.test"),
            &[
                ("/", "Prefix", "a"),
                ("/aaa", "Prefix", "b"),
                ("/aaa", "Exact", "c"),
                ("/aaa/bbb", "Prefix", "a"),
            ],
        )]);
        let t = table(&ingress("i", "2024-01-01T00:00:00Z", "ferry", &r));
        check(
            &t,
            &[
                ("x.test", "/", Some("default/a:80")),
                ("x.test", "/aaa", Some("default/c:80")),
                ("x.test", "/aaa/", Some("default/b:80")),
                ("x.test", "/aaa/ccc", Some("default/b:80")),
                ("x.test", "/aaa/bbb/x", Some("default/a:80")),
                ("x.test", "/aaaa", Some("default/a:80")),
            ],
        );
    }

    #[test]
    fn host_matching_exact_wildcard_and_any() {
        let r = rules(&[
            path_rule(Some("foo.bar.com"), &[("/", "Prefix", "a")]),
            path_rule(Some("*.bar.com"), &[("/", "Prefix", "b")]),
            path_rule(Some("*.only.com"), &[("/api", "Prefix", "b")]),
            path_rule(None, &[("/any", "Prefix", "c")]),
        ]);
        let t = table(&ingress("i", "2024-01-01T00:00:00Z", "ferry", &r));
        check(
            &t,
            &[
                ("foo.bar.com", "/", Some("default/a:80")),
                ("FOO.Bar.COM:8080", "/x", Some("default/a:80")),
                ("foo.bar.com.", "/x", Some("default/a:80")),
                ("baz.bar.com", "/", Some("default/b:80")),
                // Wildcards match exactly one label.
                ("bar.com", "/", None),
                ("a.baz.bar.com", "/", None),
                ("x.only.com", "/api/v1", Some("default/b:80")),
                // The most specific host has no such path: host-less rules next.
                ("x.only.com", "/any", Some("default/c:80")),
                ("foo.bar.com", "/any", Some("default/a:80")),
                ("unknown.test", "/any/thing", Some("default/c:80")),
                ("unknown.test", "/", None),
                ("10.1.2.3:80", "/any", Some("default/c:80")),
                ("[::1]:80", "/any", Some("default/c:80")),
            ],
        );
    }

    #[test]
    fn default_backend_and_404() {
        let with_default = "  defaultBackend: {service: {name: b, port: {number: 80}}}\n".to_string()
            + &rules(&[path_rule(Some("x.test"), &[("/app", "Prefix", "a")])]);
        let t = table(&ingress("i", "2024-01-01T00:00:00Z", "ferry", &with_default));
        check(
            &t,
            &[
                ("x.test", "/app", Some("default/a:80")),
                ("x.test", "/other", Some("default/b:80")),
                ("y.test", "/", Some("default/b:80")),
            ],
        );
        let t = table(&ingress(
            "i",
            "2024-01-01T00:00:00Z",
            "ferry",
            &rules(&[path_rule(Some("x.test"), &[("/app", "Prefix", "a")])]),
        ));
        check(&t, &[("x.test", "/other", None), ("y.test", "/app", None)]);
    }

    #[test]
    fn class_selection() {
        let r = rules(&[path_rule(Some("x.test"), &[("/", "Prefix", "a")])]);
        let legacy = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: legacy, annotations: {kubernetes.io/ingress.class: ferry}}\nspec:\n"
            .to_string()
            + &rules(&[path_rule(Some("legacy.test"), &[("/", "Prefix", "a")])])
            + "\n---\n";
        let classless = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: none}\nspec:\n".to_string()
            + &rules(&[path_rule(Some("none.test"), &[("/", "Prefix", "a")])])
            + "\n---\n";
        let objects = ingress(
            "ours",
            "2024-01-01T00:00:00Z",
            "ferry",
            &r.replace("x.test", "ours.test"),
        ) + &ingress(
            "theirs",
            "2024-01-01T00:00:00Z",
            "other",
            &r.replace("x.test", "theirs.test"),
        ) + &ingress(
            "unknown",
            "2024-01-01T00:00:00Z",
            "nope",
            &r.replace("x.test", "unknown.test"),
        ) + &legacy
            + &classless;
        let snap = snapshot(&objects);
        let t = compile(&snap, &ClassSelection::default());
        check(
            &t,
            &[
                ("ours.test", "/", Some("default/a:80")),
                ("legacy.test", "/", Some("default/a:80")),
                ("theirs.test", "/", None),
                ("unknown.test", "/", None),
                ("none.test", "/", None),
            ],
        );
        // Served by name although another controller owns the class.
        let by_name = ClassSelection {
            controller_name: "ferry.dev/ingress-controller".into(),
            class_names: vec!["other".into(), "nope".into()],
        };
        let t = compile(&snap, &by_name);
        check(
            &t,
            &[
                ("theirs.test", "/", Some("default/a:80")),
                ("unknown.test", "/", Some("default/a:80")),
            ],
        );
        assert_eq!(t.served.len(), 4);

        // An Ingress without a class is ours when one of our classes is the default.
        let default_class = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: ferry-default, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\nspec: {controller: ferry.dev/ingress-controller}\n---\n";
        let snap = snapshot(&(objects.clone() + default_class));
        let t = compile(&snap, &ClassSelection::default());
        check(&t, &[("none.test", "/", Some("default/a:80"))]);
        // ... but not when the default class belongs to someone else.
        let snap = snapshot(&(objects + &default_class.replace("ferry.dev/ingress-controller", "example.com/x")));
        let t = compile(&snap, &ClassSelection::default());
        check(&t, &[("none.test", "/", None)]);
    }

    #[test]
    fn merge_across_ingresses_oldest_wins() {
        let old = ingress(
            "old",
            "2020-01-01T00:00:00Z",
            "ferry",
            &rules(&[path_rule(
                Some("x.test"),
                &[("/", "Prefix", "a"), ("/api", "Prefix", "a")],
            )]),
        );
        let new = ingress(
            "new",
            "2024-01-01T00:00:00Z",
            "ferry",
            &rules(&[path_rule(
                Some("x.test"),
                &[("/api", "Prefix", "b"), ("/web", "Exact", "b")],
            )]),
        );
        let t = table(&(new + &old));
        check(
            &t,
            &[
                ("x.test", "/api/x", Some("default/a:80")),
                ("x.test", "/web", Some("default/b:80")),
                ("x.test", "/web/x", Some("default/a:80")),
            ],
        );
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert_eq!(t.problems[0].object, "Ingress default/new");
        assert_eq!(t.problems[0].field, "spec.rules[0].http.paths[0]");
        assert_eq!(t.route("x.test", "/api").map(|m| m.ingress.name.as_str()), Some("old"));
    }

    #[test]
    fn backends_resolve_to_pod_endpoints() {
        let r = rules(&[path_rule(
            Some("x.test"),
            &[("/a", "Prefix", "a"), ("/b", "Prefix", "b"), ("/c", "Prefix", "c")],
        )]);
        let t = table(&ingress("i", "2024-01-01T00:00:00Z", "ferry", &r));
        let ep = |host: &str, path: &str| -> (Vec<String>, bool) {
            let m = t.route(host, path).unwrap();
            let u = &t.upstreams[m.upstream];
            (u.endpoints.iter().map(|e| e.addr.to_string()).collect(), u.h2c)
        };
        // Ready endpoints only; the slice port (target port) is dialled.
        assert_eq!(ep("x.test", "/a"), (vec!["10.0.0.1:8080".to_string()], false));
        // None ready: serving+terminating; named targetPort resolved by slice port name.
        assert_eq!(ep("x.test", "/b"), (vec!["10.0.1.1:8081".to_string()], false));
        // appProtocol kubernetes.io/h2c selects h2c.
        assert_eq!(ep("x.test", "/c"), (vec!["10.0.2.1:9000".to_string()], true));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
    }

    #[test]
    fn bad_input_is_reported_and_skipped() {
        let r = "  rules:\n  - host: x.test\n    http:\n      paths:\n      - {path: \"nope\", pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}\n      - {path: /missing, pathType: Prefix, backend: {service: {name: ghost, port: {number: 80}}}}\n      - {path: /badport, pathType: Prefix, backend: {service: {name: a, port: {number: 81}}}}\n      - {path: /badname, pathType: Prefix, backend: {service: {name: a, port: {name: grpc}}}}\n      - {path: /ok, pathType: Prefix, backend: {service: {name: a, port: {name: http}}}}\n  - host: \"a*.x.test\"\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}\n";
        let t = table(&ingress("bad", "2024-01-01T00:00:00Z", "ferry", r));
        let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.rules[0].http.paths[0].path",
                "spec.rules[0].http.paths[1].backend.service.name",
                "spec.rules[0].http.paths[2].backend.service.port",
                "spec.rules[0].http.paths[3].backend.service.port",
                "spec.rules[1].host",
            ]
        );
        assert!(t.problems.iter().all(|p| p.object == "Ingress default/bad"));
        // Broken backends still claim their path and answer 503 (no endpoints).
        let m = t.route("x.test", "/missing").unwrap();
        assert!(t.upstreams[m.upstream].endpoints.is_empty());
        let m = t.route("x.test", "/ok").unwrap();
        assert_eq!(t.upstreams[m.upstream].endpoints.len(), 1);
        assert!(t.route("x.test", "/nope").is_none());
    }

    #[test]
    fn lb_method_annotation() {
        for (value, want) in [
            ("round_robin", Some(LbMethod::RoundRobin)),
            ("least_conn", Some(LbMethod::LeastConn)),
            ("random", Some(LbMethod::Random)),
            ("random two", Some(LbMethod::RandomTwoLeastConn)),
            ("random  two least_conn", Some(LbMethod::RandomTwoLeastConn)),
            ("ip_hash", None),
        ] {
            assert_eq!(LbMethod::parse(value), want, "{value}");
        }
        let r = rules(&[path_rule(Some("x.test"), &[("/", "Prefix", "a")])]);
        let doc = ingress("i", "2024-01-01T00:00:00Z", "ferry", &r).replace(
            "metadata: {name: i,",
            "metadata: {annotations: {nginx.org/lb-method: least_conn}, name: i,",
        );
        let t = table(&doc);
        assert_eq!(t.upstreams[0].lb, LbMethod::LeastConn);
        let t = table(&doc.replace("least_conn", "bogus"));
        assert_eq!(t.upstreams[0].lb, LbMethod::RoundRobin);
        assert_eq!(t.problems.len(), 1);
    }

    #[test]
    fn plain_http_to_tls_hosts_is_redirected_unless_turned_off() {
        let path = "http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}]}";
        let doc = |name: &str, annotations: &str, tls: &str, hosts: &[&str]| {
            let rules: String = hosts
                .iter()
                .map(|h| format!("  - host: \"{h}\"\n    {path}\n"))
                .collect();
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  tls: {tls}\n  defaultBackend: {{service: {{name: a, port: {{number: 80}}}}}}\n  rules:\n{rules}---\n"
            )
        };
        let redirected = |t: &RouteTable, host: &str| t.route(host, "/x").map(|m| m.https_only);
        // Listed hosts, wildcard entries, and the same wildcard as a rule host.
        let t = table(&doc(
            "t",
            "",
            "[{hosts: [A.test, \"*.w.test\"], secretName: s}]",
            &["a.test", "x.w.test", "*.w.test", "b.test"],
        ));
        assert_eq!(redirected(&t, "A.TEST:80"), Some(true));
        assert_eq!(redirected(&t, "x.w.test"), Some(true));
        assert_eq!(redirected(&t, "y.w.test"), Some(true));
        assert_eq!(redirected(&t, "b.test"), Some(false));
        // The default backend is never redirected.
        assert_eq!(redirected(&t, "elsewhere.test"), Some(false));
        assert!(t.render().contains("http -> 308 https"));
        // A tls entry without hosts covers every rule host; no secret still means TLS.
        let t = table(&doc("t", "", "[{}]", &["c.test"]));
        assert_eq!(redirected(&t, "c.test"), Some(true));
        // Turned off by any of the three annotations.
        for name in SSL_REDIRECT_ANNOTATIONS {
            let t = table(&doc("t", &format!("{name}: \"false\""), "[{}]", &["c.test"]));
            assert_eq!(redirected(&t, "c.test"), Some(false), "{name}");
            assert!(t.problems.is_empty());
        }
        // A value that is neither true nor false is reported and ignored.
        let t = table(&doc("t", "ferry.dev/ssl-redirect: \"maybe\"", "[{}]", &["c.test"]));
        assert_eq!(redirected(&t, "c.test"), Some(true));
        assert_eq!(t.problems.len(), 1);
        assert!(
            t.problems[0].field.contains("ferry.dev/ssl-redirect"),
            "{:?}",
            t.problems
        );
        // Annotations are read once per Ingress: one problem, even with a
        // default backend and rules; the limit applies to both.
        let t = table(&doc("t", "nginx.org/client-max-body-size: 2x", "[]", &["c.test"]));
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        let t = table(&doc("t", "nginx.org/client-max-body-size: 2k", "[]", &["c.test"]));
        assert_eq!(t.route("c.test", "/").and_then(|m| m.max_body), Some(2048));
        assert_eq!(t.route("other.test", "/").and_then(|m| m.max_body), Some(2048));
        // Without spec.tls nothing is redirected.
        let t = table(&doc("t", "", "[]", &["c.test"]));
        assert_eq!(redirected(&t, "c.test"), Some(false));
    }

    #[test]
    fn body_size_annotations() {
        for (v, want) in [
            ("8m", Some(8 << 20)),
            ("512K", Some(512 << 10)),
            ("1g", Some(1 << 30)),
            ("100", Some(100)),
            (" 0 ", Some(0)),
            ("1.5m", None),
            ("m", None),
            ("10x", None),
            ("", None),
        ] {
            assert_eq!(parse_size(v), want, "{v:?}");
        }
        let r = rules(&[path_rule(Some("x.test"), &[("/", "Prefix", "a")])]);
        let doc = |annotations: &str| {
            ingress("i", "2024-01-01T00:00:00Z", "ferry", &r).replace(
                "metadata: {name: i,",
                &format!("metadata: {{annotations: {{{annotations}}}, name: i,"),
            )
        };
        let limit = |t: &RouteTable| t.route("x.test", "/").and_then(|m| m.max_body);
        assert_eq!(limit(&table(&doc(""))), None);
        assert_eq!(
            limit(&table(&doc("nginx.ingress.kubernetes.io/proxy-body-size: 2m"))),
            Some(2 << 20)
        );
        assert_eq!(
            limit(&table(&doc("nginx.org/client-max-body-size: 10k"))),
            Some(10 << 10)
        );
        // Ours is read first; 0 means no limit.
        let both = "ferry.dev/client-max-body-size: \"0\", nginx.org/client-max-body-size: 10k";
        assert_eq!(limit(&table(&doc(both))), None);
        let t = table(&doc("nginx.org/client-max-body-size: lots"));
        assert_eq!(limit(&t), None);
        assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
        assert!(!t.render().contains("body <= "));
        assert!(table(&doc("nginx.org/client-max-body-size: 1k"))
            .render()
            .contains("body <= 1024 bytes"));
    }

    #[test]
    fn tls_bindings() {
        let doc = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: t}\nspec:\n  ingressClassName: ferry\n  tls:\n  - {hosts: [A.test, \"*.w.test\"], secretName: s1}\n  - {secretName: s2}\n  - {hosts: [c.test]}\n  rules:\n  - host: b.test\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}}]}\n";
        let t = table(doc);
        assert_eq!(
            t.tls,
            vec![
                TlsBinding {
                    ingress: ObjectKey::new("default", "t"),
                    hosts: vec!["a.test".into(), "*.w.test".into()],
                    secret: ObjectKey::new("default", "s1"),
                },
                TlsBinding {
                    ingress: ObjectKey::new("default", "t"),
                    hosts: vec!["b.test".into()],
                    secret: ObjectKey::new("default", "s2"),
                },
            ]
        );
    }

    #[test]
    fn wordpress_example_routes_round_robin_to_both_pods() {
        let mut objects = Vec::new();
        let (o, errors) =
            ferry_cluster::files::load(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordpress")]);
        assert!(errors.is_empty(), "{errors:?}");
        objects.extend(o);
        let snap = Snapshot::from_objects(1, objects);
        let sel = ClassSelection {
            class_names: vec!["wp-ink".into()],
            ..ClassSelection::default()
        };
        let t = compile(&snap, &sel);
        let m = t.route("wp.test:8080", "/wp-admin/").unwrap();
        let u = &t.upstreams[m.upstream];
        assert_eq!(u.name, "default/wp-svc:80");
        let addrs: Vec<String> = u.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, vec!["127.0.0.11:18080", "127.0.0.12:18080"]);
        assert!(t.render().contains("host wp.test"));
        // Not ours without --ingress-class (its controller is NGINX's).
        assert!(compile(&snap, &ClassSelection::default())
            .route("wp.test", "/")
            .is_none());
    }
}
