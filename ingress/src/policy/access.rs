//! Who may use a route, and how often: source allow/deny lists, basic and
//! external authentication, CORS and rate limits.
//!
//! [`AccessPolicy::check`] runs once per request, right after routing, in
//! nginx's phase order as ingress-nginx's template sets it up: a route
//! whose auth settings cannot be used answers 503 (ingress-nginx's
//! "location denied"); the CORS preflight is answered (rewrite phase);
//! rate limits (preaccess); the deny and allow lists (403), basic auth
//! (401) and external auth (401/403/500) (access phase). What passes
//! continues with an [`After`] that adds the CORS and auth cookies to the
//! response and holds the client's `limit-connections` slot. A route
//! whose Ingress sets none of these costs one branch.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use ferry_cluster::Snapshot;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use ipnet::IpNet;

use super::cors::Cors;
use super::extauth::{ExternalAuth, Original, Verdict};
use super::htpasswd::Users;
use super::ratelimit::{Hold, RateLimit};
use super::{Reader, NGINX};
use crate::routes::RouteTable;

/// The access settings of one Ingress (nothing set: everything allowed).
#[derive(Debug, Default)]
pub struct AccessPolicy {
    /// Anything below is set: the request path calls [`Self::check`].
    active: bool,
    /// Why every request is refused with 503: an auth or source-list
    /// annotation that cannot be honoured (failing closed, as
    /// ingress-nginx's denied locations do).
    denied: Option<String>,
    cors: Option<Cors>,
    limits: Option<RateLimit>,
    deny: Vec<IpNet>,
    /// Empty: every source not denied is allowed.
    allow: Vec<IpNet>,
    basic: Option<BasicAuth>,
    external: Option<ExternalAuth>,
}

#[derive(Debug)]
struct BasicAuth {
    users: Users,
    /// `Basic realm="…"`.
    challenge: HeaderValue,
    secret: String,
}

/// The client connection a request came on.
pub struct Conn<'a> {
    pub peer: IpAddr,
    pub https: bool,
    /// The client's Host (or `:authority`).
    pub host: &'a str,
}

/// What [`AccessPolicy::check`] decided.
pub enum Decision {
    /// Proxy the request; apply this to the response.
    Continue(After),
    /// Answer the client with this, without the backend.
    Respond(Response<Option<Bytes>>),
}

/// What an admitted request's response gets.
#[derive(Default)]
pub struct After {
    cors: Option<HeaderMap>,
    cookies: Vec<HeaderValue>,
    always_set_cookie: bool,
    hold: Option<Hold>,
}

/// A `limit-connections` slot carried by a response (in its extensions)
/// until its body is done.
#[derive(Clone)]
pub struct Held(#[allow(dead_code)] Arc<Hold>);

impl After {
    /// Adds the CORS headers (replacing the upstream's, as
    /// `more_set_headers` does) and the auth service's cookies (on
    /// success and redirect statuses, as `add_header`, unless
    /// `auth-always-set-cookie`), and parks the connection slot in the
    /// response's extensions.
    pub fn apply<B>(self, response: &mut Response<B>) {
        let status = response.status().as_u16();
        let headers = response.headers_mut();
        if let Some(cors) = self.cors {
            for (n, v) in cors {
                if let Some(n) = n {
                    headers.insert(n, v);
                }
            }
        }
        if !self.cookies.is_empty()
            && (self.always_set_cookie || matches!(status, 200 | 201 | 204 | 206 | 301 | 302 | 303 | 304 | 307 | 308))
        {
            for c in self.cookies {
                headers.append(header::SET_COOKIE, c);
            }
        }
        if let Some(h) = self.hold {
            response.extensions_mut().insert(Held(Arc::new(h)));
        }
    }
}

/// Comma-separated CIDRs or single addresses (IPv4 or IPv6).
pub fn parse_cidrs(v: &str) -> Result<Vec<IpNet>, String> {
    super::comma_list(v)
        .into_iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("{s:?} is neither a CIDR nor an IP address"))
        })
        .collect()
}

impl AccessPolicy {
    pub fn parse(snap: &Snapshot, r: &mut Reader<'_>) -> AccessPolicy {
        let mut p = AccessPolicy {
            cors: Cors::parse(r),
            limits: RateLimit::parse(r),
            ..AccessPolicy::default()
        };
        let mut denied = Vec::new();
        let allow = r.first(&[
            "nginx.ingress.kubernetes.io/allowlist-source-range",
            "nginx.ingress.kubernetes.io/whitelist-source-range",
        ]);
        if let Some((name, v)) = allow {
            match parse_cidrs(v) {
                Ok(list) => p.allow = list,
                Err(e) => denied.push((name.to_string(), e)),
            }
        }
        let deny_name = format!("{NGINX}denylist-source-range");
        if let Some(v) = r.get(&deny_name) {
            match parse_cidrs(v) {
                Ok(list) => p.deny = list,
                Err(e) => denied.push((deny_name, e)),
            }
        }
        match Self::parse_basic(snap, r) {
            Ok(b) => p.basic = b,
            Err(e) => denied.push(e),
        }
        match ExternalAuth::parse(r) {
            Ok(e) => p.external = e,
            Err(e) => denied.push((format!("{NGINX}auth-url"), e)),
        }
        if !denied.is_empty() {
            let mut reasons = Vec::new();
            for (name, why) in denied {
                r.problem(
                    &name,
                    format!("{why}; every request to this Ingress is refused with 503"),
                );
                reasons.push(why);
            }
            p.denied = Some(reasons.join("; "));
        }
        p.active = p.denied.is_some()
            || p.cors.is_some()
            || p.limits.is_some()
            || !p.deny.is_empty()
            || !p.allow.is_empty()
            || p.basic.is_some()
            || p.external.is_some();
        p
    }

    /// `auth-type: basic` with its secret; `Err((annotation, why))` when
    /// it is set but cannot be used.
    fn parse_basic(snap: &Snapshot, r: &mut Reader<'_>) -> Result<Option<BasicAuth>, (String, String)> {
        let name = |n: &str| format!("{NGINX}{n}");
        let auth_type = r.get(&name("auth-type"));
        let secret = r.get(&name("auth-secret"));
        let secret_type = r.get(&name("auth-secret-type"));
        let realm = r.get(&name("auth-realm"));
        let Some(auth_type) = auth_type else {
            for (n, v) in [
                ("auth-secret", secret),
                ("auth-secret-type", secret_type),
                ("auth-realm", realm),
            ] {
                if v.is_some() {
                    r.problem(&name(n), "has no effect without auth-type; annotation ignored");
                }
            }
            return Ok(None);
        };
        let fail = |n: &str, why: String| Err((name(n), why));
        match auth_type {
            "basic" => {}
            "digest" => return fail("auth-type", "digest authentication is not supported by ferry".into()),
            other => return fail("auth-type", format!("{other:?} is neither basic nor digest")),
        }
        let Some(secret) = secret.filter(|s| !s.is_empty()) else {
            return fail(
                "auth-secret",
                "missing: auth-type basic needs the Secret with the users".into(),
            );
        };
        let ing = r.ingress();
        let (ns, sname) = match secret.split_once('/') {
            Some((ns, n)) => (ns, n),
            None => (ing.key.namespace.as_str(), secret),
        };
        let Some(s) = snap.secret(ns, sname) else {
            return fail("auth-secret", format!("Secret {ns}/{sname} not found"));
        };
        let mut problems = Vec::new();
        let users = match secret_type.unwrap_or("auth-file") {
            "auth-file" => match s.get("auth") {
                Some(text) => Users::from_htpasswd(&String::from_utf8_lossy(text), &mut problems),
                None => return fail("auth-secret", format!("Secret {ns}/{sname} has no key \"auth\"")),
            },
            "auth-map" => Users::from_map(s.data.iter().map(|(k, v)| (k.as_str(), v.as_slice())), &mut problems),
            other => {
                return fail(
                    "auth-secret-type",
                    format!("{other:?} is neither auth-file nor auth-map"),
                )
            }
        };
        for p in problems {
            r.problem(&name("auth-secret"), format!("Secret {ns}/{sname}: {p}"));
        }
        let realm = realm.unwrap_or("").replace('\\', "\\\\").replace('"', "\\\"");
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{realm}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic realm=\"\""));
        Ok(Some(BasicAuth {
            users,
            challenge,
            secret: format!("{ns}/{sname}"),
        }))
    }

    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.denied {
            out.push(format!("access: every request refused with 503 ({why})"));
        }
        let list = |l: &[IpNet]| l.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        if !self.deny.is_empty() {
            out.push(format!("deny sources: {}", list(&self.deny)));
        }
        if !self.allow.is_empty() {
            out.push(format!("allow sources only: {}", list(&self.allow)));
        }
        if let Some(b) = &self.basic {
            out.push(format!(
                "basic auth: {} users from Secret {} ({})",
                b.users.len(),
                b.secret,
                b.challenge.to_str().unwrap_or("")
            ));
        }
        if let Some(e) = &self.external {
            out.push(e.describe());
        }
        if let Some(c) = &self.cors {
            out.push(c.describe());
        }
        if let Some(l) = &self.limits {
            out.push(l.describe());
        }
        out
    }

    /// Whether [`Self::check`] needs calling at all.
    #[inline]
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Decides about one request; may rewrite its headers (auth response
    /// headers copied in, `Authorization` dropped after basic auth).
    pub async fn check<B>(&self, conn: &Conn<'_>, req: &mut Request<B>) -> Decision {
        if self.denied.is_some() {
            return Decision::Respond(crate::answer::status(StatusCode::SERVICE_UNAVAILABLE));
        }
        let cors = self
            .cors
            .as_ref()
            .and_then(|c| c.headers_for(req.headers().get(header::ORIGIN)));
        let refuse = |status: StatusCode, cors: Option<HeaderMap>| {
            let mut r = crate::answer::status(status);
            if let Some(h) = cors {
                r.headers_mut().extend(h);
            }
            Decision::Respond(r)
        };
        if req.method() == Method::OPTIONS {
            if let Some(h) = cors {
                let mut r = crate::answer::status(StatusCode::NO_CONTENT);
                r.headers_mut().extend(h);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain charset=UTF-8"),
                );
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                return Decision::Respond(r);
            }
        }
        let peer = conn.peer.to_canonical();
        let mut after = After::default();
        if let Some(l) = &self.limits {
            match l.admit(peer) {
                Ok(hold) => after.hold = hold,
                Err(status) => return refuse(status, cors),
            }
        }
        if self.deny.iter().any(|n| n.contains(&peer))
            || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&peer)))
        {
            return refuse(StatusCode::FORBIDDEN, cors);
        }
        let original = || Original {
            peer,
            https: conn.https,
            host: conn.host,
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        };
        if let Some(b) = &self.basic {
            if !b.users.check(req.headers().get(header::AUTHORIZATION)).await {
                let signin = self.external.as_ref().and_then(|e| e.signin_redirect(&original()));
                let mut r = match signin {
                    Some(location) => crate::answer::redirect(StatusCode::FOUND, location),
                    None => {
                        let mut r = crate::answer::status(StatusCode::UNAUTHORIZED);
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, b.challenge.clone());
                        r
                    }
                };
                if let Some(h) = cors {
                    r.headers_mut().extend(h);
                }
                return Decision::Respond(r);
            }
        }
        if let Some(e) = &self.external {
            match e.check(&original()).await {
                Verdict::Allow { set, cookies } => {
                    ExternalAuth::apply(set, req.headers_mut());
                    after.cookies = cookies;
                    after.always_set_cookie = e.always_set_cookie;
                }
                Verdict::Deny {
                    status,
                    headers,
                    cookies,
                } => {
                    let signin = (status == StatusCode::UNAUTHORIZED)
                        .then(|| e.signin_redirect(&original()))
                        .flatten();
                    let mut r = match signin {
                        Some(location) => {
                            let mut r = crate::answer::redirect(StatusCode::FOUND, location);
                            for c in cookies {
                                r.headers_mut().append(header::SET_COOKIE, c);
                            }
                            r
                        }
                        None => {
                            let mut r = crate::answer::status(status);
                            r.headers_mut().extend(headers);
                            if e.always_set_cookie {
                                for c in cookies {
                                    r.headers_mut().append(header::SET_COOKIE, c);
                                }
                            }
                            r
                        }
                    };
                    if let Some(h) = cors {
                        r.headers_mut().extend(h);
                    }
                    return Decision::Respond(r);
                }
                Verdict::Failed => return refuse(StatusCode::INTERNAL_SERVER_ERROR, cors),
            }
        }
        if self.basic.is_some() {
            // ingress-nginx: `proxy_set_header Authorization ""`.
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        after.cors = cors;
        Decision::Continue(after)
    }
}

/// Hands the rate-limit state of each Ingress in `previous` to the same
/// Ingress's policy in `next`, so that a reload (of anything) neither
/// resets the clients' buckets nor forgets their open requests.
pub fn carry_over(next: &RouteTable, previous: &RouteTable) {
    if !next.policies.iter().any(|p| p.access.limits.is_some()) {
        return;
    }
    let old: std::collections::HashMap<_, &RateLimit> = previous
        .policies
        .iter()
        .filter_map(|p| p.access.limits.as_ref().map(|l| (&p.ingress, l)))
        .collect();
    for p in &next.policies {
        if let (Some(l), Some(prev)) = (&p.access.limits, old.get(&p.ingress)) {
            l.adopt(prev);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_support::snapshot;
    use ferry_cluster::{Ingress, Snapshot};

    /// An Ingress `default/i` with these `nginx.ingress.kubernetes.io/`
    /// annotations.
    pub fn ingress(annotations: &[(&str, &str)]) -> Ingress {
        let ann: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{NGINX}{k}: {}", serde_json::to_string(v).unwrap()))
            .collect();
        crate::test_support::ingress(&ann.join(", "))
    }

    fn policy(snap: &Snapshot, annotations: &[(&str, &str)]) -> (AccessPolicy, Vec<String>) {
        let ing = ingress(annotations);
        let mut r = Reader::new(&ing);
        let p = AccessPolicy::parse(snap, &mut r);
        (p, r.finish().into_iter().map(|p| p.to_string()).collect())
    }

    fn conn(ip: &str) -> Conn<'static> {
        Conn {
            peer: ip.parse().unwrap(),
            https: false,
            host: "app.test",
        }
    }

    async fn status(p: &AccessPolicy, ip: &str, req: Request<()>) -> u16 {
        let mut req = req;
        match p.check(&conn(ip), &mut req).await {
            Decision::Continue(_) => 0,
            Decision::Respond(r) => r.status().as_u16(),
        }
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn nothing_set_is_inactive() {
        let (p, problems) = policy(&Snapshot::default(), &[("enable-cors", "false")]);
        assert!(!p.is_active());
        assert!(problems.is_empty());
        assert!(p.describe().is_empty());
    }

    #[test]
    fn cidr_lists() {
        assert_eq!(
            parse_cidrs("10.0.0.0/8, 192.168.1.7,::1, 2001:db8::/32,")
                .unwrap()
                .len(),
            4
        );
        assert_eq!(parse_cidrs("10.1.2.3/8").unwrap()[0].to_string(), "10.0.0.0/8");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("example.com").is_err());
    }

    #[tokio::test]
    async fn allow_and_deny_lists() {
        let snap = Snapshot::default();
        let (p, problems) = policy(
            &snap,
            &[
                ("whitelist-source-range", "127.0.0.0/24, ::1"),
                ("denylist-source-range", "127.0.0.7"),
            ],
        );
        assert!(problems.is_empty(), "{problems:?}");
        for (ip, want) in [
            ("127.0.0.1", 0),
            ("127.0.0.7", 403),
            ("127.0.1.1", 403),
            ("::1", 0),
            ("::ffff:127.0.0.2", 0),
            ("::2", 403),
        ] {
            assert_eq!(status(&p, ip, get("/")).await, want, "{ip}");
        }
        // allowlist- wins over whitelist-; both are read.
        let (p, problems) = policy(
            &snap,
            &[
                ("allowlist-source-range", "10.0.0.0/8"),
                ("whitelist-source-range", "127.0.0.1"),
            ],
        );
        assert!(problems.is_empty());
        assert_eq!(status(&p, "127.0.0.1", get("/")).await, 403);
        assert_eq!(status(&p, "10.1.1.1", get("/")).await, 0);
    }

    #[tokio::test]
    async fn bad_lists_and_auth_fail_closed() {
        let snap =
            snapshot("apiVersion: v1\nkind: Secret\nmetadata: {name: nokey}\ntype: Opaque\nstringData: {other: x}\n");
        for annotations in [
            vec![("whitelist-source-range", "10.0.0.0/8, nonsense")],
            vec![("denylist-source-range", "300.1.1.1")],
            vec![("auth-type", "digest"), ("auth-secret", "s")],
            vec![("auth-type", "basic")],
            vec![("auth-type", "basic"), ("auth-secret", "missing")],
            vec![("auth-type", "basic"), ("auth-secret", "nokey")],
            vec![
                ("auth-type", "basic"),
                ("auth-secret", "nokey"),
                ("auth-secret-type", "ldap"),
            ],
            vec![("auth-type", "kerberos")],
            vec![("auth-url", "https://auth.test/")],
        ] {
            let (p, problems) = policy(&snap, &annotations);
            assert_eq!(problems.len(), 1, "{annotations:?}: {problems:?}");
            assert!(problems[0].contains("refused with 503"), "{problems:?}");
            assert_eq!(status(&p, "127.0.0.1", get("/")).await, 503, "{annotations:?}");
            assert!(p.describe()[0].contains("503"));
        }
        // Settings that mean nothing alone are reported, not enforced.
        let (p, problems) = policy(&snap, &[("auth-realm", "x"), ("auth-secret", "nokey")]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(!p.is_active());
    }

    #[tokio::test]
    async fn basic_auth_from_secret_and_map() {
        let snap = snapshot(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: users, namespace: default}\ntype: Opaque\nstringData: {auth: \"alice:{PLAIN}pw\\nbob:$5$x$y\\n\"}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: map, namespace: other}\ntype: Opaque\nstringData: {carol: \"{PLAIN}pw2\"}\n",
        );
        let (p, problems) = policy(
            &snap,
            &[
                ("auth-type", "basic"),
                ("auth-secret", "users"),
                ("auth-realm", "Staff \"only\""),
            ],
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"bob\"") && !problems[0].contains("$5$x$y"));
        let mut req = get("/");
        match p.check(&conn("127.0.0.1"), &mut req).await {
            Decision::Respond(r) => {
                assert_eq!(r.status(), 401);
                assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"Staff \\\"only\\\"\"");
            }
            Decision::Continue(_) => panic!("no credentials passed"),
        }
        let mut req = Request::get("/")
            .header("authorization", "Basic YWxpY2U6cHc=") // alice:pw
            .body(())
            .unwrap();
        assert!(matches!(
            p.check(&conn("127.0.0.1"), &mut req).await,
            Decision::Continue(_)
        ));
        assert!(
            req.headers().get("authorization").is_none(),
            "Authorization is not passed upstream"
        );

        let (p, problems) = policy(
            &snap,
            &[
                ("auth-type", "basic"),
                ("auth-secret", "other/map"),
                ("auth-secret-type", "auth-map"),
            ],
        );
        assert!(problems.is_empty(), "{problems:?}");
        let mut req = Request::get("/")
            .header("authorization", "Basic Y2Fyb2w6cHcy") // carol:pw2
            .body(())
            .unwrap();
        assert!(matches!(
            p.check(&conn("127.0.0.1"), &mut req).await,
            Decision::Continue(_)
        ));
        assert!(p.describe()[0].contains("1 users from Secret other/map"));
    }

    #[tokio::test]
    async fn cors_preflight_comes_first_and_headers_reach_denials() {
        let (p, _) = policy(
            &Snapshot::default(),
            &[
                ("enable-cors", "true"),
                ("cors-allow-origin", "https://a.test"),
                ("whitelist-source-range", "10.0.0.0/8"),
            ],
        );
        let preflight = || {
            Request::options("/")
                .header("origin", "https://a.test")
                .header("access-control-request-method", "PUT")
                .body(())
                .unwrap()
        };
        let mut req = preflight();
        match p.check(&conn("127.0.0.1"), &mut req).await {
            Decision::Respond(r) => {
                assert_eq!(r.status(), 204);
                assert_eq!(r.headers()["access-control-allow-origin"], "https://a.test");
                assert!(r.body().is_none());
            }
            Decision::Continue(_) => panic!("preflight not answered"),
        }
        // Other origins' OPTIONS go through the checks (403 here).
        let mut req = Request::options("/")
            .header("origin", "https://b.test")
            .body(())
            .unwrap();
        assert_eq!(
            status(&p, "127.0.0.1", std::mem::replace(&mut req, get("/"))).await,
            403
        );
        let mut req = Request::get("/").header("origin", "https://a.test").body(()).unwrap();
        match p.check(&conn("127.0.0.1"), &mut req).await {
            Decision::Respond(r) => {
                assert_eq!(r.status(), 403);
                assert_eq!(r.headers()["access-control-allow-origin"], "https://a.test");
            }
            Decision::Continue(_) => panic!("source not allowed"),
        }
        let mut req = Request::get("/").header("origin", "https://a.test").body(()).unwrap();
        match p.check(&conn("10.0.0.1"), &mut req).await {
            Decision::Continue(after) => {
                let mut resp = Response::new(());
                resp.headers_mut()
                    .insert("access-control-allow-origin", HeaderValue::from_static("*"));
                after.apply(&mut resp);
                assert_eq!(resp.headers()["access-control-allow-origin"], "https://a.test");
                assert_eq!(resp.headers().get_all("access-control-allow-origin").iter().count(), 1);
            }
            Decision::Respond(r) => panic!("refused: {}", r.status()),
        }
    }

    #[tokio::test]
    async fn rate_limits_before_the_lists_and_exemptions() {
        let (p, problems) = policy(
            &Snapshot::default(),
            &[
                ("limit-rpm", "1"),
                ("limit-burst-multiplier", "2"),
                ("limit-whitelist", "127.0.0.9"),
                ("denylist-source-range", "127.0.0.5"),
            ],
        );
        assert!(problems.is_empty(), "{problems:?}");
        for _ in 0..3 {
            assert_eq!(status(&p, "127.0.0.1", get("/")).await, 0);
        }
        assert_eq!(status(&p, "127.0.0.1", get("/")).await, 503);
        for _ in 0..10 {
            assert_eq!(status(&p, "127.0.0.9", get("/")).await, 0);
        }
        for _ in 0..3 {
            assert_eq!(status(&p, "127.0.0.5", get("/")).await, 403);
        }
        assert_eq!(status(&p, "127.0.0.5", get("/")).await, 503);
    }

    #[tokio::test]
    async fn connection_slots_are_held_by_the_response() {
        let (p, _) = policy(&Snapshot::default(), &[("limit-connections", "1")]);
        let mut req = get("/");
        let Decision::Continue(after) = p.check(&conn("127.0.0.1"), &mut req).await else {
            panic!("first request refused");
        };
        let mut resp = Response::new(());
        after.apply(&mut resp);
        assert_eq!(status(&p, "127.0.0.1", get("/")).await, 503);
        assert_eq!(status(&p, "127.0.0.2", get("/")).await, 0);
        drop(resp);
        assert_eq!(status(&p, "127.0.0.1", get("/")).await, 0);
    }

    #[test]
    fn limit_state_carries_over_reloads() {
        let yaml = |rps: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: nginx}}\nspec: {{controller: ferry.dev/ingress-controller}}\n---\n\
                 apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, annotations: {{nginx.ingress.kubernetes.io/limit-rps: \"{rps}\"}}}}\n\
                 spec: {{ingressClassName: nginx, rules: [{{host: a.test, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: 80}}}}}}}}]}}}}]}}\n"
            )
        };
        let classes = crate::routes::ClassSelection::default();
        let t1 = crate::routes::compile(&snapshot(&yaml("1")), &classes);
        let t2 = crate::routes::compile(&snapshot(&yaml("2")), &classes);
        let l1 = t1.policies[0].access.limits.as_ref().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..6 {
            assert!(l1.admit(ip).is_ok());
        }
        assert!(l1.admit(ip).is_err());
        carry_over(&t2, &t1);
        let l2 = t2.policies[0].access.limits.as_ref().unwrap();
        assert!(Arc::ptr_eq(l1.state(), l2.state()));
        assert_eq!(l2.state().clients(), 1);
    }
}
