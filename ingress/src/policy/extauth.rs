//! External authentication (`auth-url` and friends), as ingress-nginx's
//! `auth_request` location: before a request is proxied, a body-less
//! request (GET unless `auth-method`) with the client's headers and
//! `X-Original-URL`, `X-Original-Method`, `X-Sent-From`, `X-Real-IP`,
//! `X-Forwarded-For`, `X-Auth-Request-Redirect` goes to the auth service.
//! 2xx lets the request through (with `auth-response-headers` copied onto
//! it and the service's `Set-Cookie` added to the response); 401 and 403
//! are answered to the client (401 with the service's `WWW-Authenticate`,
//! or a 302 to `auth-signin` with `rd=` the original URL); anything else,
//! or no answer, is a 500. The backend never sees a refused request.
//!
//! `auth-url` and `auth-signin` may use the nginx variables `$host`,
//! `$http_host`, `$best_http_host`, `$scheme`, `$pass_access_scheme`,
//! `$request_uri`, `$escaped_request_uri`, `$remote_addr` (as in the
//! usual oauth2-proxy setup). Only `http://` auth services are supported.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Reader, NGINX};

/// ingress-nginx's `proxy-connect-timeout` and `proxy-read-timeout`
/// defaults, which its auth location inherits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Auth response bodies read (to keep the connection reusable) at most.
const MAX_AUTH_BODY: usize = 64 * 1024;

static X_ORIGINAL_URL: HeaderName = HeaderName::from_static("x-original-url");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_SCHEME: HeaderName = HeaderName::from_static("x-scheme");
static X_SENT_FROM: HeaderName = HeaderName::from_static("x-sent-from");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_AUTH_REQUEST_REDIRECT: HeaderName = HeaderName::from_static("x-auth-request-redirect");

/// What a request is, for the auth service and the sign-in redirect.
pub struct Original<'a> {
    pub peer: IpAddr,
    pub https: bool,
    /// The client's Host (or `:authority`).
    pub host: &'a str,
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl Original<'_> {
    fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    fn request_uri(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    fn var(&self, v: Var) -> String {
        match v {
            Var::Host => super::super::routes::normalize_host(self.host).to_string(),
            Var::HttpHost => self.host.to_string(),
            Var::Scheme => self.scheme().to_string(),
            Var::RequestUri => self.request_uri().to_string(),
            Var::EscapedRequestUri => escape_uri(self.request_uri()),
            Var::RemoteAddr => self.peer.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Host,
    HttpHost,
    Scheme,
    RequestUri,
    EscapedRequestUri,
    RemoteAddr,
}

/// A URL with nginx variables in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

impl Template {
    fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find('$') {
            if i > 0 {
                parts.push(Part::Text(rest[..i].to_string()));
            }
            let after = &rest[i + 1..];
            let (braced, name_start) = match after.strip_prefix('{') {
                Some(b) => (true, b),
                None => (false, after),
            };
            let len = name_start
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(name_start.len());
            let name = &name_start[..len];
            let var = match name {
                "host" => Var::Host,
                "http_host" | "best_http_host" => Var::HttpHost,
                "scheme" | "pass_access_scheme" => Var::Scheme,
                "request_uri" => Var::RequestUri,
                "escaped_request_uri" => Var::EscapedRequestUri,
                "remote_addr" => Var::RemoteAddr,
                _ => return Err(format!("nginx variable ${name} is not supported by ferry")),
            };
            parts.push(Part::Var(var));
            rest = &name_start[len..];
            if braced {
                rest = rest.strip_prefix('}').ok_or("unclosed ${")?;
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    fn has_vars(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Part::Var(_)))
    }

    fn expand(&self, o: &Original<'_>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => out.push_str(&o.var(*v)),
            }
        }
        out
    }
}

/// The external-auth settings of one Ingress.
pub struct ExternalAuth {
    url: Template,
    /// The URL when it has no variables (checked at parse time).
    fixed_url: Option<Uri>,
    display_url: String,
    method: Option<Method>,
    signin: Option<Template>,
    /// `rd` unless `auth-signin-redirect-param`; `None` when the sign-in
    /// URL already carries it.
    signin_param: Option<String>,
    /// Whether the sign-in URL already has a query.
    signin_has_query: bool,
    response_headers: Vec<HeaderName>,
    request_redirect: Option<HeaderValue>,
    pub always_set_cookie: bool,
    client: OnceLock<Client<HttpConnector, Empty<Bytes>>>,
}

impl std::fmt::Debug for ExternalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalAuth")
            .field("url", &self.display_url)
            .finish_non_exhaustive()
    }
}

/// What the auth service decided.
pub enum Verdict {
    /// 2xx: proxy, with these request headers set (or removed when
    /// `None`) and these cookies added to the response.
    Allow {
        set: Vec<(HeaderName, Option<HeaderValue>)>,
        cookies: Vec<HeaderValue>,
    },
    /// 401 or 403, with the headers the client gets.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        cookies: Vec<HeaderValue>,
    },
    /// Anything else, or no answer: 500.
    Failed,
}

impl ExternalAuth {
    /// Reads the external-auth annotations (all of them, so none is
    /// reported as unknown). `Err` when `auth-url` is set but cannot be
    /// used: the routes must then refuse requests (fail closed).
    pub fn parse(r: &mut Reader<'_>) -> Result<Option<ExternalAuth>, String> {
        let name = |n: &str| format!("{NGINX}{n}");
        let url = r.get(&name("auth-url"));
        let method = r.get(&name("auth-method"));
        let signin = r.get(&name("auth-signin"));
        let signin_param = r.get(&name("auth-signin-redirect-param"));
        let response_headers = r.get(&name("auth-response-headers"));
        let request_redirect = r.get(&name("auth-request-redirect"));
        let always_set_cookie = r.flag(&name("auth-always-set-cookie")).unwrap_or(false);
        // Connection reuse to the auth service is always on in ferry; the
        // keepalive knobs need nothing more.
        for knob in ["auth-keepalive", "auth-keepalive-requests", "auth-keepalive-timeout"] {
            let _ = r.get(&name(knob));
        }
        let Some(url) = url else {
            for (n, v) in [
                ("auth-method", method),
                ("auth-signin", signin),
                ("auth-response-headers", response_headers),
                ("auth-request-redirect", request_redirect),
            ] {
                if v.is_some() {
                    r.problem(&name(n), "has no effect without auth-url; annotation ignored");
                }
            }
            return Ok(None);
        };
        let template = Template::parse(url).map_err(|e| format!("auth-url {url:?}: {e}"))?;
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "auth-url {url:?}: https auth services are not supported by ferry yet (http:// only)"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!("auth-url {url:?} is not an http:// URL"));
        }
        let fixed_url = if template.has_vars() {
            None
        } else {
            let u: Uri = url.parse().map_err(|e| format!("auth-url {url:?}: {e}"))?;
            if u.host().is_none() {
                return Err(format!("auth-url {url:?} has no host"));
            }
            Some(u)
        };
        let method = match method {
            None | Some("") => None,
            Some(m) => {
                const METHODS: [&str; 9] = [
                    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                ];
                if !METHODS.contains(&m) {
                    return Err(format!("auth-method {m:?} is not an HTTP method"));
                }
                Some(Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?)
            }
        };
        let mut headers = Vec::new();
        for h in super::comma_list(response_headers.unwrap_or("")) {
            let valid = h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) if valid => headers.push(n),
                _ => return Err(format!("auth-response-headers: {h:?} is not a header name")),
            }
        }
        let request_redirect = match request_redirect {
            None | Some("") => None,
            Some(v) => Some(
                HeaderValue::from_str(v).map_err(|_| format!("auth-request-redirect {v:?} is not a header value"))?,
            ),
        };
        let (signin, signin_param, signin_has_query) = match signin {
            None | Some("") => (None, None, false),
            Some(s) => {
                let t = Template::parse(s).map_err(|e| format!("auth-signin {s:?}: {e}"))?;
                let param = signin_param.filter(|p| !p.is_empty()).unwrap_or("rd");
                let query = s.split_once('?').map(|(_, q)| q);
                let has_param = query.is_some_and(|q| {
                    q.split('&')
                        .any(|kv| kv.split_once('=').is_some_and(|(k, v)| k == param && !v.is_empty()))
                });
                let has_query = query.is_some_and(|q| !q.is_empty());
                (Some(t), (!has_param).then(|| param.to_string()), has_query)
            }
        };
        Ok(Some(ExternalAuth {
            url: template,
            fixed_url,
            display_url: url.to_string(),
            method,
            signin,
            signin_param,
            signin_has_query,
            response_headers: headers,
            request_redirect,
            always_set_cookie,
            client: OnceLock::new(),
        }))
    }

    pub fn describe(&self) -> String {
        let mut s = format!("external auth: {}", self.display_url);
        if let Some(m) = &self.method {
            s += &format!(" ({m})");
        }
        if self.signin.is_some() {
            s += "; sign-in redirect on 401";
        }
        if !self.response_headers.is_empty() {
            let names: Vec<&str> = self.response_headers.iter().map(HeaderName::as_str).collect();
            s += &format!("; copies {}", names.join(","));
        }
        s
    }

    fn client(&self) -> &Client<HttpConnector, Empty<Bytes>> {
        self.client.get_or_init(|| {
            let mut c = HttpConnector::new();
            c.set_connect_timeout(Some(CONNECT_TIMEOUT));
            c.set_nodelay(true);
            Client::builder(TokioExecutor::new()).build(c)
        })
    }

    /// The 302 to the sign-in page for a request refused with 401, if
    /// `auth-signin` is set.
    pub fn signin_redirect(&self, o: &Original<'_>) -> Option<HeaderValue> {
        let mut location = self.signin.as_ref()?.expand(o);
        if let Some(param) = &self.signin_param {
            location.push(if self.signin_has_query { '&' } else { '?' });
            location.push_str(param);
            location.push('=');
            location.push_str(o.scheme());
            location.push_str("://");
            location.push_str(o.host);
            location.push_str(&escape_uri(o.request_uri()));
        }
        HeaderValue::from_str(&location).ok()
    }

    /// Asks the auth service about the request `o`.
    pub async fn check(&self, o: &Original<'_>) -> Verdict {
        let uri = match &self.fixed_url {
            Some(u) => u.clone(),
            None => match self.url.expand(o).parse::<Uri>() {
                Ok(u) if u.host().is_some() => u,
                _ => {
                    tracing::warn!(url = %self.display_url, "auth-url does not expand to a URL for this request");
                    return Verdict::Failed;
                }
            },
        };
        let request = match self.request(o, uri) {
            Some(r) => r,
            None => return Verdict::Failed,
        };
        let response = match tokio::time::timeout(RESPONSE_TIMEOUT, self.client().request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(url = %self.display_url, error = %e, "external auth request failed");
                return Verdict::Failed;
            }
            Err(_) => {
                tracing::warn!(url = %self.display_url, timeout = ?RESPONSE_TIMEOUT, "external auth timed out");
                return Verdict::Failed;
            }
        };
        let (parts, body) = response.into_parts();
        // Read a short body so that the connection can be reused.
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT, Limited::new(body, MAX_AUTH_BODY).collect()).await;
        let cookies: Vec<HeaderValue> = parts.headers.get_all(header::SET_COOKIE).iter().cloned().collect();
        let status = parts.status;
        if status.is_success() {
            let set = self
                .response_headers
                .iter()
                .map(|n| (n.clone(), parts.headers.get(n).cloned()))
                .collect();
            return Verdict::Allow { set, cookies };
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let mut headers = HeaderMap::new();
            if status == StatusCode::UNAUTHORIZED {
                for v in parts.headers.get_all(header::WWW_AUTHENTICATE) {
                    headers.append(header::WWW_AUTHENTICATE, v.clone());
                }
            }
            return Verdict::Deny {
                status,
                headers,
                cookies,
            };
        }
        tracing::warn!(url = %self.display_url, status = status.as_u16(), "external auth answered neither 2xx, 401 nor 403");
        Verdict::Failed
    }

    /// The subrequest: the client's headers (body-framing and hop-by-hop
    /// ones aside) and the `X-Original-*` set.
    fn request(&self, o: &Original<'_>, uri: Uri) -> Option<Request<Empty<Bytes>>> {
        let mut headers = HeaderMap::with_capacity(o.headers.len() + 8);
        for (n, v) in o.headers {
            if !skip_for_auth(n) {
                headers.append(n.clone(), v.clone());
            }
        }
        if let Ok(h) = HeaderValue::from_str(uri.host().unwrap_or_default()) {
            headers.insert(header::HOST, h);
        }
        let original_url = format!("{}://{}{}", o.scheme(), o.host, o.request_uri());
        headers.insert(X_ORIGINAL_URL.clone(), HeaderValue::from_str(&original_url).ok()?);
        headers.insert(
            X_ORIGINAL_METHOD.clone(),
            HeaderValue::from_str(o.method.as_str()).ok()?,
        );
        headers.insert(
            X_SENT_FROM.clone(),
            HeaderValue::from_static("nginx-ingress-controller"),
        );
        let ip = HeaderValue::from_str(&o.peer.to_string()).ok()?;
        headers.insert(X_REAL_IP.clone(), ip.clone());
        headers.insert(X_FORWARDED_FOR.clone(), ip);
        if self.method.is_some() {
            headers.insert(X_ORIGINAL_URI.clone(), HeaderValue::from_str(o.request_uri()).ok()?);
            headers.insert(X_SCHEME.clone(), HeaderValue::from_static(o.scheme()));
        }
        let redirect = match &self.request_redirect {
            Some(v) => v.clone(),
            None => HeaderValue::from_str(o.request_uri()).ok()?,
        };
        headers.insert(X_AUTH_REQUEST_REDIRECT.clone(), redirect);
        let mut req = Request::new(Empty::new());
        *req.method_mut() = self.method.clone().unwrap_or(Method::GET);
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Some(req)
    }

    /// The headers the upstream request gets from an allowed check.
    pub fn apply(set: Vec<(HeaderName, Option<HeaderValue>)>, headers: &mut HeaderMap) {
        for (n, v) in set {
            // nginx's `proxy_set_header` with an empty value drops the
            // header: a client cannot forge what the auth service did not
            // set.
            headers.remove(&n);
            if let Some(v) = v {
                headers.insert(n, v);
            }
        }
    }
}

/// Request headers not passed to the auth service: the body's framing
/// (no body is sent), hop-by-hop ones, the Host (the service's own is
/// set) and `X-Forwarded-Proto` (cleared, as ingress-nginx does).
fn skip_for_auth(n: &HeaderName) -> bool {
    n == header::HOST
        || n == header::CONTENT_LENGTH
        || n == header::TRANSFER_ENCODING
        || n == header::CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::UPGRADE
        || n == header::EXPECT
        || n == "keep-alive"
        || n == "proxy-connection"
        || n == X_FORWARDED_PROTO
}

/// Percent-encodes everything but unreserved characters, as nginx's
/// `set_escape_uri` does for `$escaped_request_uri`.
pub fn escape_uri(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::access::tests::ingress;

    fn parse(annotations: &[(&str, &str)]) -> (Result<Option<ExternalAuth>, String>, Vec<String>) {
        let ing = ingress(annotations);
        let mut r = Reader::new(&ing);
        let a = ExternalAuth::parse(&mut r);
        (a, r.finish().into_iter().map(|p| p.to_string()).collect())
    }

    fn original<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Original<'a> {
        Original {
            peer: "127.0.0.9".parse().unwrap(),
            https: true,
            host: "app.test:8443",
            method: &Method::POST,
            uri,
            headers,
        }
    }

    #[test]
    fn parses_and_validates() {
        let (a, problems) = parse(&[
            ("auth-url", "http://auth.test:9000/check"),
            ("auth-method", "POST"),
            ("auth-response-headers", "X-User, X-Email"),
            ("auth-signin", "https://login.test/start"),
            ("auth-keepalive", "10"),
        ]);
        let a = a.unwrap().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(a.method, Some(Method::POST));
        assert_eq!(a.response_headers.len(), 2);
        for (annotations, why) in [
            (vec![("auth-url", "https://auth.test/")], "https"),
            (vec![("auth-url", "ftp://auth.test/")], "not an http"),
            (
                vec![("auth-url", "http://auth.test/"), ("auth-method", "FETCH")],
                "not an HTTP method",
            ),
            (
                vec![("auth-url", "http://auth.test/"), ("auth-response-headers", "X-A, $x")],
                "not a header",
            ),
            (vec![("auth-url", "http://$pid/")], "$pid"),
        ] {
            let (a, _) = parse(&annotations);
            let e = a.err().unwrap_or_default();
            assert!(e.contains(why), "{annotations:?}: {e}");
        }
        let (a, problems) = parse(&[("auth-signin", "https://login.test/")]);
        assert!(a.unwrap().is_none());
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn signin_redirect_adds_rd_unless_present() {
        let uri: Uri = "/a b/c?x=1&y=2".replace(' ', "%20").parse().unwrap();
        let headers = HeaderMap::new();
        let o = original(&uri, &headers);
        for (signin, param, want) in [
            (
                "https://login.test/start",
                None,
                "https://login.test/start?rd=https://app.test:8443%2Fa%2520b%2Fc%3Fx%3D1%26y%3D2",
            ),
            (
                "https://login.test/start?client=1",
                Some("redirect_to"),
                "https://login.test/start?client=1&redirect_to=https://app.test:8443%2Fa%2520b%2Fc%3Fx%3D1%26y%3D2",
            ),
            (
                "https://$host/oauth2/start?rd=$escaped_request_uri",
                None,
                "https://app.test/oauth2/start?rd=%2Fa%2520b%2Fc%3Fx%3D1%26y%3D2",
            ),
        ] {
            let mut ann = vec![("auth-url", "http://auth.test/"), ("auth-signin", signin)];
            if let Some(p) = param {
                ann.push(("auth-signin-redirect-param", p));
            }
            let a = parse(&ann).0.unwrap().unwrap();
            assert_eq!(a.signin_redirect(&o).unwrap(), want, "{signin}");
        }
    }

    #[test]
    fn subrequest_headers() {
        let a = parse(&[
            ("auth-url", "http://auth.test:9000/check?x=$host"),
            ("auth-request-redirect", "https://back.test/"),
        ])
        .0
        .unwrap()
        .unwrap();
        let uri: Uri = "/p?q=1".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert("content-length", HeaderValue::from_static("5"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        headers.insert("host", HeaderValue::from_static("app.test:8443"));
        let o = original(&uri, &headers);
        let target: Uri = a.url.expand(&o).parse().unwrap();
        assert_eq!(target, "http://auth.test:9000/check?x=app.test");
        let req = a.request(&o, target).unwrap();
        assert_eq!(req.method(), Method::GET);
        let h = req.headers();
        let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(get("host").as_deref(), Some("auth.test"));
        assert_eq!(get("authorization").as_deref(), Some("Bearer t"));
        assert_eq!(get("content-length"), None);
        assert_eq!(get("x-forwarded-proto"), None);
        assert_eq!(get("x-original-url").as_deref(), Some("https://app.test:8443/p?q=1"));
        assert_eq!(get("x-original-method").as_deref(), Some("POST"));
        assert_eq!(get("x-sent-from").as_deref(), Some("nginx-ingress-controller"));
        assert_eq!(get("x-real-ip").as_deref(), Some("127.0.0.9"));
        assert_eq!(get("x-forwarded-for").as_deref(), Some("127.0.0.9"));
        assert_eq!(get("x-auth-request-redirect").as_deref(), Some("https://back.test/"));
        assert_eq!(get("x-original-uri"), None);
    }

    #[test]
    fn response_headers_replace_client_ones() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("forged"));
        h.insert("x-email", HeaderValue::from_static("forged"));
        ExternalAuth::apply(
            vec![
                (
                    HeaderName::from_static("x-user"),
                    Some(HeaderValue::from_static("alice")),
                ),
                (HeaderName::from_static("x-email"), None),
            ],
            &mut h,
        );
        assert_eq!(h.get("x-user").unwrap(), "alice");
        assert!(h.get("x-email").is_none());
    }
}
