//! CORS as ingress-nginx configures it (`enable-cors` and the
//! `cors-allow-*`, `cors-expose-headers`, `cors-max-age` annotations):
//! when the request's `Origin` is allowed (always, with the default `*`),
//! every response of the route gets the `Access-Control-*` headers, and an
//! `OPTIONS` request is answered by ferry itself with 204 (the preflight),
//! before rate limits and authentication, as nginx's rewrite-phase `if`
//! does.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use super::{parse_bool, Reader, NGINX};

const DEFAULT_METHODS: &str = "GET, PUT, POST, DELETE, PATCH, OPTIONS";
const DEFAULT_HEADERS: &str =
    "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization";
const DEFAULT_MAX_AGE: u64 = 1_728_000;

/// Which origins may use the route.
#[derive(Debug)]
pub enum Origins {
    /// `*`: every request gets `Access-Control-Allow-Origin: *`.
    Any,
    /// The listed origins (`https://*.example.com` matches one label),
    /// compared without regard to case; the matching origin is echoed.
    List { patterns: Vec<String>, regex: Regex },
}

#[derive(Debug)]
pub struct Cors {
    pub origins: Origins,
    /// The headers every allowed response gets, `Access-Control-Allow-Origin`
    /// aside.
    headers: Vec<(HeaderName, HeaderValue)>,
}

static ALLOW_ORIGIN: HeaderName = header::ACCESS_CONTROL_ALLOW_ORIGIN;

impl Cors {
    /// Reads the CORS annotations (all of them, even with CORS off, so
    /// that none is reported as unknown); `None` unless `enable-cors`.
    pub fn parse(r: &mut Reader<'_>) -> Option<Cors> {
        let enabled = r.flag(&format!("{NGINX}enable-cors")).unwrap_or(false);
        let name = |n: &str| format!("{NGINX}{n}");
        let origin = r.get(&name("cors-allow-origin"));
        let methods = r.get(&name("cors-allow-methods"));
        let allow_headers = r.get(&name("cors-allow-headers"));
        let credentials = r.get(&name("cors-allow-credentials"));
        let expose = r.get(&name("cors-expose-headers"));
        let max_age = r.get(&name("cors-max-age"));
        if !enabled {
            return None;
        }
        let origins = match origin {
            None => Origins::Any,
            Some(v) => {
                let mut patterns = Vec::new();
                let mut any = false;
                for o in super::comma_list(v) {
                    if o == "*" {
                        any = true;
                        break;
                    }
                    if valid_origin(o) {
                        patterns.push(o.to_string());
                    } else {
                        r.problem(
                            &name("cors-allow-origin"),
                            format!("{o:?} is not an origin (http(s)://host[:port], optionally *.host); skipped"),
                        );
                    }
                }
                if any {
                    Origins::Any
                } else {
                    let alternatives: Vec<String> = patterns.iter().map(|p| origin_regex(p)).collect();
                    match Regex::new(&format!("(?i)^(?:{})$", alternatives.join("|"))) {
                        Ok(regex) if !patterns.is_empty() => Origins::List { patterns, regex },
                        _ => {
                            r.problem(&name("cors-allow-origin"), "no valid origin: no origin is allowed");
                            Origins::List {
                                patterns: Vec::new(),
                                regex: Regex::new("$^").ok()?,
                            }
                        }
                    }
                }
            }
        };
        let mut pick = |n: &str, v: Option<&str>, ok: fn(&str) -> bool, default: &'static str| match v {
            Some(v) if ok(v) => v.to_string(),
            Some(v) => {
                r.problem(
                    &name(n),
                    format!("{v:?} is not a valid list; the default {default:?} is used"),
                );
                default.to_string()
            }
            None => default.to_string(),
        };
        let methods = pick("cors-allow-methods", methods, valid_methods, DEFAULT_METHODS);
        let allow_headers = pick(
            "cors-allow-headers",
            allow_headers,
            |v| valid_names(v, false),
            DEFAULT_HEADERS,
        );
        let expose = pick("cors-expose-headers", expose, |v| valid_names(v, true), "");
        let credentials = match credentials.map(parse_bool) {
            None => true,
            Some(Ok(b)) => b,
            Some(Err(why)) => {
                r.problem(
                    &name("cors-allow-credentials"),
                    format!("{why}; the default true is used"),
                );
                true
            }
        };
        let max_age = match max_age.map(super::parse_u64) {
            None => DEFAULT_MAX_AGE,
            Some(Ok(n)) => n,
            Some(Err(why)) => {
                r.problem(
                    &name("cors-max-age"),
                    format!("{why}; the default {DEFAULT_MAX_AGE} is used"),
                );
                DEFAULT_MAX_AGE
            }
        };
        let mut headers = Vec::new();
        let mut push = |n: HeaderName, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.push((n, v));
            }
        };
        if credentials {
            push(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        push(header::ACCESS_CONTROL_ALLOW_METHODS, &methods);
        push(header::ACCESS_CONTROL_ALLOW_HEADERS, &allow_headers);
        if !expose.is_empty() {
            push(header::ACCESS_CONTROL_EXPOSE_HEADERS, &expose);
        }
        push(header::ACCESS_CONTROL_MAX_AGE, &max_age.to_string());
        Some(Cors { origins, headers })
    }

    pub fn describe(&self) -> String {
        let origins = match &self.origins {
            Origins::Any => "*".to_string(),
            Origins::List { patterns, .. } => patterns.join(","),
        };
        let rest: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| format!("{}: {}", n, v.to_str().unwrap_or("")))
            .collect();
        format!("cors: origins {origins}; {}", rest.join("; "))
    }

    /// The CORS headers for a request with `origin` (its `Origin` header),
    /// or `None` when that origin is not allowed.
    pub fn headers_for(&self, origin: Option<&HeaderValue>) -> Option<HeaderMap> {
        let allow_origin = match &self.origins {
            Origins::Any => HeaderValue::from_static("*"),
            Origins::List { regex, .. } => {
                let o = origin?;
                if !regex.is_match(o.to_str().ok()?) {
                    return None;
                }
                o.clone()
            }
        };
        let mut out = HeaderMap::with_capacity(self.headers.len() + 1);
        out.insert(ALLOW_ORIGIN.clone(), allow_origin);
        for (n, v) in &self.headers {
            out.insert(n.clone(), v.clone());
        }
        Some(out)
    }
}

/// ingress-nginx's origin check: `*`, or `http(s)://` then an optional
/// `*.`, a host of letters, digits, `-` and `.`, an optional `:port`.
fn valid_origin(o: &str) -> bool {
    let Some(rest) = o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")) else {
        return false;
    };
    let rest = rest.strip_prefix("*.").unwrap_or(rest);
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && port.is_none_or(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// A pattern as a regex: the text literally, its `*` one DNS label.
fn origin_regex(p: &str) -> String {
    match p.split_once('*') {
        Some((a, b)) => format!("{}[A-Za-z0-9-]+{}", regex::escape(a), regex::escape(b)),
        None => regex::escape(p),
    }
}

/// `GET, PUT,POST`: letters separated by commas and blanks.
fn valid_methods(v: &str) -> bool {
    list_items(v).is_some_and(|items| items.iter().all(|m| m.chars().all(|c| c.is_ascii_alphabetic())))
}

/// Header names (letters, digits, `-`, `_`; `*` too where `star`).
fn valid_names(v: &str, star: bool) -> bool {
    list_items(v).is_some_and(|items| {
        items
            .iter()
            .all(|m| (star && *m == "*") || m.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

fn list_items(v: &str) -> Option<Vec<&str>> {
    let items: Vec<&str> = v.split(',').map(str::trim).collect();
    (!items.is_empty() && items.iter().all(|i| !i.is_empty())).then_some(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::access::tests::ingress;

    fn cors(annotations: &[(&str, &str)]) -> (Option<Cors>, Vec<String>) {
        let ing = ingress(annotations);
        let mut r = Reader::new(&ing);
        let c = Cors::parse(&mut r);
        (c, r.finish().into_iter().map(|p| p.to_string()).collect())
    }

    fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
        h.get(n).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn off_unless_enabled_but_all_read() {
        let (c, problems) = cors(&[("cors-allow-origin", "https://a.test"), ("cors-max-age", "5")]);
        assert!(c.is_none());
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn defaults_as_ingress_nginx() {
        let (c, problems) = cors(&[("enable-cors", "true")]);
        let c = c.unwrap();
        assert!(problems.is_empty());
        let h = c.headers_for(None).unwrap();
        assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(get(&h, "access-control-allow-methods"), Some(DEFAULT_METHODS));
        assert_eq!(get(&h, "access-control-allow-headers"), Some(DEFAULT_HEADERS));
        assert_eq!(get(&h, "access-control-max-age"), Some("1728000"));
        assert_eq!(get(&h, "access-control-expose-headers"), None);
    }

    #[test]
    fn origin_lists_and_wildcards() {
        let (c, problems) = cors(&[
            ("enable-cors", "true"),
            (
                "cors-allow-origin",
                "https://a.test, https://*.b.test:8443, ftp://bad, http://c.test",
            ),
            ("cors-allow-credentials", "false"),
            ("cors-expose-headers", "X-One, *"),
            ("cors-allow-methods", "GET,POST"),
            ("cors-max-age", "60"),
        ]);
        let c = c.unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("ftp://bad"));
        for (origin, allowed) in [
            ("https://a.test", true),
            ("HTTPS://A.TEST", true),
            ("http://a.test", false),
            ("https://a.test.evil", false),
            ("https://x.b.test:8443", true),
            ("https://x.y.b.test:8443", false),
            ("https://b.test:8443", false),
            ("https://x.b.test", false),
            ("http://c.test", true),
        ] {
            let h = c.headers_for(Some(&HeaderValue::from_static(origin)));
            assert_eq!(h.is_some(), allowed, "{origin}");
            if let Some(h) = h {
                assert_eq!(get(&h, "access-control-allow-origin"), Some(origin));
                assert_eq!(get(&h, "access-control-allow-credentials"), None);
                assert_eq!(get(&h, "access-control-expose-headers"), Some("X-One, *"));
                assert_eq!(get(&h, "access-control-allow-methods"), Some("GET,POST"));
                assert_eq!(get(&h, "access-control-max-age"), Some("60"));
            }
        }
        assert!(c.headers_for(None).is_none());
    }

    #[test]
    fn bad_values_fall_back_to_defaults() {
        let (c, problems) = cors(&[
            ("enable-cors", "true"),
            ("cors-allow-origin", "https://a.test, *"),
            ("cors-allow-methods", "GET;rm"),
            ("cors-allow-headers", "$pid"),
            ("cors-max-age", "-1"),
            ("cors-allow-credentials", "yes"),
        ]);
        let c = c.unwrap();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(matches!(c.origins, Origins::Any));
        let h = c.headers_for(None).unwrap();
        assert_eq!(get(&h, "access-control-allow-methods"), Some(DEFAULT_METHODS));
        assert_eq!(get(&h, "access-control-allow-headers"), Some(DEFAULT_HEADERS));
        assert_eq!(get(&h, "access-control-max-age"), Some("1728000"));
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
    }
}
