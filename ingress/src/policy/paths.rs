//! Paths and redirects: regex paths and rewrites, redirects, host aliases
//! and HSTS, as ingress-nginx and NGINX Ingress Controller do them.
//!
//! What happens where:
//! - `use-regex` / `rewrite-target` make every path of the Ingress's hosts a
//!   case-insensitive regex anchored at the start (ingress-nginx enforces it
//!   on all Ingresses of that host), ordered by descending path length, first
//!   match wins; `nginx.org/path-regex` does the same for one Ingress's paths
//!   (the route compiler in `routes.rs` applies both).
//! - Redirects (`permanent-redirect`, `temporal-redirect`, `app-root`,
//!   `nginx.org/redirect-to-https`) are answered before access checks, as
//!   nginx's rewrite phase runs before its access phase ([`PathPolicy::answer`]).
//! - `rewrite-target` and `nginx.org/rewrites` change the forwarded URI
//!   ([`Rewrite::apply`]); `x-forwarded-prefix` adds a header.

use http::HeaderValue;

use super::{comma_list, parse_u64, Reader};

const USE_REGEX: &str = "nginx.ingress.kubernetes.io/use-regex";
const REWRITE_TARGET: &str = "nginx.ingress.kubernetes.io/rewrite-target";
const APP_ROOT: &str = "nginx.ingress.kubernetes.io/app-root";
const X_FORWARDED_PREFIX: &str = "nginx.ingress.kubernetes.io/x-forwarded-prefix";
const PERMANENT_REDIRECT: &str = "nginx.ingress.kubernetes.io/permanent-redirect";
const PERMANENT_REDIRECT_CODE: &str = "nginx.ingress.kubernetes.io/permanent-redirect-code";
const TEMPORAL_REDIRECT: &str = "nginx.ingress.kubernetes.io/temporal-redirect";
const TEMPORAL_REDIRECT_CODE: &str = "nginx.ingress.kubernetes.io/temporal-redirect-code";
const FORCE_SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/force-ssl-redirect";
const FROM_TO_WWW: &str = "nginx.ingress.kubernetes.io/from-to-www-redirect";
const SERVER_ALIAS: &str = "nginx.ingress.kubernetes.io/server-alias";
const PRESERVE_TRAILING_SLASH: &str = "nginx.ingress.kubernetes.io/preserve-trailing-slash";
const ORG_REWRITES: &str = "nginx.org/rewrites";
const ORG_PATH_REGEX: &str = "nginx.org/path-regex";
const ORG_REDIRECT_TO_HTTPS: &str = "nginx.org/redirect-to-https";
const ORG_HSTS: &str = "nginx.org/hsts";
const ORG_HSTS_MAX_AGE: &str = "nginx.org/hsts-max-age";
const ORG_HSTS_INCLUDE_SUBDOMAINS: &str = "nginx.org/hsts-include-subdomains";
const ORG_HSTS_BEHIND_PROXY: &str = "nginx.org/hsts-behind-proxy";

/// `nginx.org/path-regex`: how this Ingress's paths are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgPathRegex {
    CaseSensitive,
    CaseInsensitive,
    Exact,
}

/// A redirect answered instead of proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub code: u16,
    pub location: HeaderValue,
}

/// The path and redirect settings of one Ingress.
#[derive(Debug, Default)]
pub struct PathPolicy {
    /// `use-regex: "true"`.
    pub use_regex: bool,
    /// `rewrite-target`: the URI template, with `$1`…`$9`.
    pub rewrite_target: Option<String>,
    /// `nginx.org/path-regex`.
    pub org_path_regex: Option<OrgPathRegex>,
    /// `nginx.org/rewrites`: (Service name, replacement of the path prefix).
    pub org_rewrites: Vec<(String, String)>,
    /// `app-root`: where `/` is redirected (302).
    pub app_root: Option<String>,
    /// `x-forwarded-prefix`: the header value sent upstream.
    pub x_forwarded_prefix: Option<HeaderValue>,
    /// `temporal-redirect` or `permanent-redirect` (in that precedence).
    pub redirect: Option<Redirect>,
    /// `force-ssl-redirect`: HTTP → HTTPS even for hosts without TLS.
    pub force_ssl_redirect: bool,
    /// `from-to-www-redirect`.
    pub from_to_www: bool,
    /// `server-alias`: more names for this Ingress's hosts.
    pub aliases: Vec<String>,
    /// `nginx.org/redirect-to-https`: 301 when `X-Forwarded-Proto: http`.
    pub redirect_to_https: bool,
    /// `nginx.org/hsts…`: the header, and whether it is also sent on plain
    /// HTTP requests that came through a TLS proxy (`X-Forwarded-Proto: https`).
    pub hsts: Option<(HeaderValue, bool)>,
}

/// A status code accepted by a redirect annotation.
fn redirect_code(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(c) if (300..=308).contains(&c) => Ok(c),
        _ => Err("not a redirect status code (300 to 308)".into()),
    }
}

/// A redirect URL: absolute `http(s)://…`, or a path.
fn redirect_url(v: &str) -> Result<HeaderValue, String> {
    let ok = v.starts_with("http://") || v.starts_with("https://") || v.starts_with('/');
    if !ok || v.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err("not an absolute http(s) URL or a path".into());
    }
    HeaderValue::from_str(v).map_err(|_| "not a valid header value".into())
}

/// `rewrite-target`: a URI (`/…`) or absolute URL with `$N` references.
fn rewrite_target(v: &str) -> Result<String, String> {
    if !(v.starts_with('/') || v.starts_with("http://") || v.starts_with("https://")) {
        return Err("must start with / (or be an absolute http(s) URL)".into());
    }
    if v.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err("contains spaces or control characters".into());
    }
    // Only capture references are substituted; an nginx variable would
    // silently stay in the URI.
    let mut rest = v;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("only $1 to $9 are substituted (nginx variables are not)".into());
        }
    }
    Ok(v.to_string())
}

/// `nginx.org/rewrites`: `serviceName=svc rewrite=/path;…`.
fn org_rewrites(v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in v.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let mut service = None;
        let mut rewrite = None;
        for word in item.split_whitespace() {
            match word.split_once('=') {
                Some(("serviceName", s)) if !s.is_empty() => service = Some(s),
                Some(("rewrite", r)) if r.starts_with('/') => rewrite = Some(r),
                _ => return Err(format!("{item:?} is not `serviceName=NAME rewrite=/PATH`")),
            }
        }
        match (service, rewrite) {
            (Some(s), Some(r)) => out.push((s.to_string(), r.to_string())),
            _ => return Err(format!("{item:?} is not `serviceName=NAME rewrite=/PATH`")),
        }
    }
    Ok(out)
}

impl PathPolicy {
    pub fn parse(r: &mut Reader<'_>) -> PathPolicy {
        let mut p = PathPolicy {
            use_regex: r.flag(USE_REGEX).unwrap_or(false),
            rewrite_target: r.parse(REWRITE_TARGET, rewrite_target),
            org_path_regex: r.parse(ORG_PATH_REGEX, |v| match v {
                "case_sensitive" => Ok(OrgPathRegex::CaseSensitive),
                "case_insensitive" => Ok(OrgPathRegex::CaseInsensitive),
                "exact" => Ok(OrgPathRegex::Exact),
                _ => Err("neither case_sensitive, case_insensitive nor exact".into()),
            }),
            org_rewrites: r.parse(ORG_REWRITES, org_rewrites).unwrap_or_default(),
            app_root: r.parse(APP_ROOT, |v| {
                if v.starts_with('/') && !v.starts_with("//") && v.parse::<http::Uri>().is_ok() {
                    Ok(v.to_string())
                } else {
                    Err("must be a path starting with /".into())
                }
            }),
            x_forwarded_prefix: r.parse(X_FORWARDED_PREFIX, |v| {
                HeaderValue::from_str(v).map_err(|_| "not a valid header value".to_string())
            }),
            redirect: None,
            force_ssl_redirect: r.flag(FORCE_SSL_REDIRECT).unwrap_or(false),
            from_to_www: r.flag(FROM_TO_WWW).unwrap_or(false),
            aliases: Vec::new(),
            redirect_to_https: r.flag(ORG_REDIRECT_TO_HTTPS).unwrap_or(false),
            hsts: None,
        };
        // Redirects: the temporal one first, as ingress-nginx reads them.
        let temporal_code = r.parse(TEMPORAL_REDIRECT_CODE, redirect_code);
        let permanent_code = r.parse(PERMANENT_REDIRECT_CODE, redirect_code);
        if let Some(location) = r.parse(TEMPORAL_REDIRECT, redirect_url) {
            p.redirect = Some(Redirect {
                code: temporal_code.unwrap_or(302),
                location,
            });
            if r.get(PERMANENT_REDIRECT).is_some() {
                r.problem(
                    PERMANENT_REDIRECT,
                    "ignored: temporal-redirect is set and takes precedence",
                );
            }
        } else if let Some(location) = r.parse(PERMANENT_REDIRECT, redirect_url) {
            p.redirect = Some(Redirect {
                code: permanent_code.unwrap_or(301),
                location,
            });
        }
        if let Some(v) = r.get(SERVER_ALIAS) {
            for alias in comma_list(v) {
                let a = alias.to_ascii_lowercase();
                if a.contains('*') || a.contains('/') || a.contains(':') || a.contains('~') {
                    r.problem(
                        SERVER_ALIAS,
                        format!("{alias:?} is not a plain host name; alias ignored"),
                    );
                } else {
                    p.aliases.push(a);
                }
            }
        }
        // Trailing slashes are never removed by ferry's redirects.
        if let Some(false) = r.flag(PRESERVE_TRAILING_SLASH) {
            r.problem(
                PRESERVE_TRAILING_SLASH,
                "ferry always preserves the trailing slash in HTTPS redirects",
            );
        }
        let hsts = r.flag(ORG_HSTS).unwrap_or(false);
        let max_age = r.parse(ORG_HSTS_MAX_AGE, parse_u64).unwrap_or(2_592_000);
        let subdomains = r.flag(ORG_HSTS_INCLUDE_SUBDOMAINS).unwrap_or(false);
        let behind_proxy = r.flag(ORG_HSTS_BEHIND_PROXY).unwrap_or(false);
        if hsts {
            let value = if subdomains {
                format!("max-age={max_age}; includeSubDomains")
            } else {
                format!("max-age={max_age}")
            };
            p.hsts = HeaderValue::from_str(&value).ok().map(|v| (v, behind_proxy));
        }
        p
    }

    /// Whether this Ingress makes every path of its hosts a regex
    /// (ingress-nginx: `use-regex` or `rewrite-target` on any Ingress of a host).
    pub fn enforces_regex(&self) -> bool {
        self.use_regex || self.rewrite_target.is_some()
    }

    /// Whether anything here acts on a request before it is forwarded.
    pub fn answers(&self) -> bool {
        self.redirect.is_some() || self.app_root.is_some() || self.redirect_to_https
    }

    /// The redirect this request gets instead of being proxied, if any:
    /// the Ingress's redirect, then `app-root` for `/`, then NGINX IC's
    /// redirect of requests a TLS proxy received as plain HTTP.
    /// `host` is the request's authority, `path` its normalized path.
    pub fn answer(
        &self,
        https: bool,
        host: &str,
        path: &str,
        target: &str,
        forwarded_proto: Option<&[u8]>,
    ) -> Option<Redirect> {
        if let Some(r) = &self.redirect {
            return Some(r.clone());
        }
        if let Some(root) = &self.app_root {
            if path == "/" {
                let scheme = if https { "https" } else { "http" };
                let location = HeaderValue::from_str(&format!("{scheme}://{host}{root}")).ok()?;
                return Some(Redirect { code: 302, location });
            }
        }
        if self.redirect_to_https && forwarded_proto == Some(b"http") {
            let host = crate::routes::normalize_host(host);
            let location = HeaderValue::from_str(&format!("https://{host}{target}")).ok()?;
            return Some(Redirect { code: 301, location });
        }
        None
    }

    /// The `Strict-Transport-Security` value for this response, if any.
    pub fn hsts(&self, https: bool, forwarded_proto: Option<&[u8]>) -> Option<&HeaderValue> {
        let (value, behind_proxy) = self.hsts.as_ref()?;
        (https || (*behind_proxy && forwarded_proto == Some(b"https"))).then_some(value)
    }

    /// The `nginx.org/rewrites` replacement for routes to `service`.
    pub fn org_rewrite(&self, service: &str) -> Option<&str> {
        self.org_rewrites
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, r)| r.as_str())
    }

    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.use_regex {
            out.push("paths: case-insensitive regexes (use-regex)".into());
        }
        if let Some(t) = &self.rewrite_target {
            out.push(format!("rewrite-target {t}"));
        }
        if let Some(m) = self.org_path_regex {
            out.push(format!("nginx.org/path-regex {m:?}"));
        }
        for (s, r) in &self.org_rewrites {
            out.push(format!("rewrite: Service {s} prefix -> {r}"));
        }
        if let Some(r) = &self.app_root {
            out.push(format!("app-root: / -> 302 {r}"));
        }
        if let Some(r) = &self.redirect {
            out.push(format!("redirect: {} {}", r.code, r.location.to_str().unwrap_or("?")));
        }
        if let Some(v) = &self.x_forwarded_prefix {
            out.push(format!("x-forwarded-prefix: {}", v.to_str().unwrap_or("?")));
        }
        if self.force_ssl_redirect {
            out.push("force-ssl-redirect".into());
        }
        if self.from_to_www {
            out.push("from-to-www-redirect".into());
        }
        if !self.aliases.is_empty() {
            out.push(format!("server-alias: {}", self.aliases.join(",")));
        }
        if self.redirect_to_https {
            out.push("redirect-to-https (X-Forwarded-Proto: http -> 301)".into());
        }
        if let Some((v, behind)) = &self.hsts {
            let behind = if *behind { " (also behind a TLS proxy)" } else { "" };
            out.push(format!("hsts: {}{behind}", v.to_str().unwrap_or("?")));
        }
        out
    }
}

/// How a route changes the URI it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// `rewrite-target`: the whole URI becomes the template, with the
    /// route regex's captures substituted for `$1`…`$9`.
    Target(String),
    /// `nginx.org/rewrites`: the route's path prefix is replaced.
    Prefix { prefix: String, replacement: String },
}

/// A rewritten request: a new path-and-query, or (a target that is an
/// absolute URL, as nginx's `rewrite`) a 302 to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewritten {
    Uri(String),
    Redirect(String),
}

impl Rewrite {
    /// Rewrites `path` (normalized, without query). `regex` is the route's
    /// path regex when it has one (captures for `$N`); the query is kept,
    /// after the target's own arguments as nginx does.
    pub fn apply(&self, regex: Option<&regex::Regex>, path: &str, query: Option<&str>) -> Rewritten {
        let new_path = match self {
            Rewrite::Target(template) => {
                let caps = regex.and_then(|re| re.captures(path));
                let mut out = String::with_capacity(template.len() + path.len());
                let mut chars = template.char_indices().peekable();
                while let Some((_, c)) = chars.next() {
                    match (c, chars.peek()) {
                        ('$', Some(&(_, d))) if d.is_ascii_digit() => {
                            chars.next();
                            let n = (d as u8 - b'0') as usize;
                            if let Some(m) = caps.as_ref().and_then(|c| c.get(n)) {
                                out.push_str(m.as_str());
                            }
                        }
                        _ => out.push(c),
                    }
                }
                out
            }
            Rewrite::Prefix { prefix, replacement } => {
                let rest = path.get(prefix.len()..).unwrap_or("");
                if replacement.ends_with('/') && rest.starts_with('/') {
                    format!("{replacement}{}", &rest[1..])
                } else {
                    format!("{replacement}{rest}")
                }
            }
        };
        let mut uri = if new_path.is_empty() { "/".to_string() } else { new_path };
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            uri.push(if uri.contains('?') { '&' } else { '?' });
            uri.push_str(q);
        }
        if uri.starts_with("http://") || uri.starts_with("https://") {
            Rewritten::Redirect(uri)
        } else {
            Rewritten::Uri(uri)
        }
    }
}

/// The regex a path becomes: anchored at the start, case-insensitive
/// unless asked otherwise; the size of the compiled program is bounded.
pub fn path_regex(path: &str, case_insensitive: bool) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{path})"))
        .case_insensitive(case_insensitive)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("not a valid regular expression: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_target_substitutes_captures_and_keeps_the_query() {
        let re = path_regex("/something(/|$)(.*)", true).unwrap();
        let t = Rewrite::Target("/$2".into());
        let cases = [
            ("/something", None, "/"),
            ("/something/", None, "/"),
            ("/something/new", None, "/new"),
            ("/SOMETHING/new", Some("a=1"), "/new?a=1"),
            ("/something/a/b", None, "/a/b"),
        ];
        for (path, q, want) in cases {
            assert_eq!(t.apply(Some(&re), path, q), Rewritten::Uri(want.into()), "{path}");
        }
        // Target arguments come first; the client's are appended with `&`.
        let t = Rewrite::Target("/x?from=$1".into());
        let re = path_regex("/(\\w+)", true).unwrap();
        assert_eq!(
            t.apply(Some(&re), "/abc", Some("b=2")),
            Rewritten::Uri("/x?from=abc&b=2".into())
        );
        // An absolute URL target redirects (nginx `rewrite` does).
        let t = Rewrite::Target("https://other.test/$1".into());
        assert_eq!(
            t.apply(Some(&re), "/abc", None),
            Rewritten::Redirect("https://other.test/abc".into())
        );
        // A missing group is empty.
        let t = Rewrite::Target("/$1/$7".into());
        assert_eq!(t.apply(Some(&re), "/abc", None), Rewritten::Uri("/abc/".into()));
    }

    #[test]
    fn org_rewrites_replace_the_prefix() {
        let cases = [
            ("/tea/", "/", "/tea/green", "/green"),
            ("/tea", "/", "/tea/green", "/green"),
            ("/tea", "/beans", "/tea/green", "/beans/green"),
            ("/tea/", "/beans/", "/tea/", "/beans/"),
            ("/coffee", "/", "/coffee", "/"),
        ];
        for (prefix, replacement, path, want) in cases {
            let r = Rewrite::Prefix {
                prefix: prefix.into(),
                replacement: replacement.into(),
            };
            assert_eq!(
                r.apply(None, path, None),
                Rewritten::Uri(want.into()),
                "{prefix} {path}"
            );
        }
        assert_eq!(
            org_rewrites("serviceName=tea rewrite=/;serviceName=coffee rewrite=/beans/").unwrap(),
            vec![("tea".into(), "/".into()), ("coffee".into(), "/beans/".into())]
        );
        assert!(org_rewrites("serviceName=tea").is_err());
        assert!(org_rewrites("tea=/").is_err());
    }

    #[test]
    fn annotation_values() {
        assert!(rewrite_target("/$1").is_ok());
        assert!(rewrite_target("https://x.test/$1").is_ok());
        assert!(rewrite_target("foo").is_err());
        assert!(rewrite_target("/$host/$1").is_err());
        assert_eq!(redirect_code("308"), Ok(308));
        assert!(redirect_code("200").is_err());
        assert!(redirect_url("https://example.com/x").is_ok());
        assert!(redirect_url("/local").is_ok());
        assert!(redirect_url("example.com").is_err());
        assert!(redirect_url("https://a b").is_err());
        assert!(path_regex("/a(", true).is_err());
        let re = path_regex("/foo/.*", true).unwrap();
        assert!(re.is_match("/FOO/bar") && !re.is_match("/x/foo/bar"));
    }

    #[test]
    fn redirects_precedence_app_root_and_forwarded_proto() {
        let mut p = PathPolicy {
            app_root: Some("/app".into()),
            redirect_to_https: true,
            ..PathPolicy::default()
        };
        let loc = |r: Option<Redirect>| r.map(|r| (r.code, r.location.to_str().unwrap().to_string()));
        assert_eq!(
            loc(p.answer(false, "a.test:8080", "/", "/", None)),
            Some((302, "http://a.test:8080/app".into()))
        );
        assert_eq!(loc(p.answer(true, "a.test", "/x", "/x", None)), None);
        assert_eq!(
            loc(p.answer(false, "A.test", "/x", "/x?q=1", Some(b"http"))),
            Some((301, "https://a.test/x?q=1".into()))
        );
        p.redirect = Some(Redirect {
            code: 308,
            location: HeaderValue::from_static("https://new.test/"),
        });
        assert_eq!(
            loc(p.answer(false, "a.test", "/", "/", None)),
            Some((308, "https://new.test/".into()))
        );
    }
}
