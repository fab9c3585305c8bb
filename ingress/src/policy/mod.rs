//! Per-Ingress behaviour set by annotations, under ingress-nginx's names
//! (`nginx.ingress.kubernetes.io/…`) and NGINX Ingress Controller's
//! (`nginx.org/…`), so that Ingresses written for either keep working.
//!
//! Every annotation under those two prefixes is accounted for: the area
//! parsers read the ones ferry honours through a [`Reader`], which marks
//! them; what is left unread afterwards is reported as not supported, and
//! `*-snippet` annotations are refused (raw nginx configuration is never
//! executed). A value that does not parse is reported and the annotation
//! ignored; the rest of the Ingress keeps working.
//!
//! The areas, each parsed into its own part of [`Policy`]:
//! - [`paths`]: regex paths, rewrites, redirects, aliases, HSTS;
//! - [`access`]: allow/deny lists, basic and external auth, CORS, rate limits;
//! - [`balance`]: endpoint choice (hashing, affinity, EWMA), canaries;
//! - [`upstream_opts`] (with [`upstream_tls`]): upstream protocol, TLS,
//!   Host, timeouts, retries and error pages.

pub mod access;
pub mod balance;
pub mod canary;
pub mod chash;
pub mod client_cert;
pub mod cors;
pub mod extauth;
pub mod htpasswd;
pub mod paths;
pub mod ratelimit;
mod unsupported;
pub mod upstream_opts;
pub mod upstream_tls;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ferry_cluster::{Ingress, ObjectKey, Snapshot};

use crate::routes::Problem;

/// ingress-nginx's annotation prefix.
pub const NGINX: &str = "nginx.ingress.kubernetes.io/";
/// NGINX Ingress Controller's annotation prefix.
pub const NGINX_ORG: &str = "nginx.org/";

/// Everything the annotations of one Ingress ask for; shared (in an `Arc`)
/// by all of that Ingress's routes.
pub struct Policy {
    /// The Ingress and the annotations this was compiled from; two
    /// policies are equal when these are (regexes and keys compare badly).
    pub ingress: ObjectKey,
    source: BTreeMap<String, String>,
    pub paths: paths::PathPolicy,
    pub access: access::AccessPolicy,
    pub balance: balance::BalancePolicy,
    pub upstream: upstream_opts::UpstreamPolicy,
    /// `auth-tls-*`: client-certificate authentication.
    pub client_cert: Option<std::sync::Arc<client_cert::ClientCert>>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.ingress == other.ingress && self.source == other.source
    }
}

impl Eq for Policy {}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("ingress", &self.ingress)
            .field("annotations", &self.source.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles the annotations of `ing`; `reader` has already been used by
    /// the route compiler for the annotations it reads itself (body size,
    /// ssl-redirect, load-balancing method, backend protocol).
    pub fn compile(snap: &Snapshot, reader: &mut Reader<'_>) -> Policy {
        let ing = reader.ingress();
        Policy {
            ingress: ing.key.clone(),
            source: ing
                .annotations
                .iter()
                .filter(|(k, _)| is_ours(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            paths: paths::PathPolicy::parse(reader),
            access: access::AccessPolicy::parse(snap, reader),
            balance: balance::BalancePolicy::parse(snap, reader),
            upstream: upstream_opts::UpstreamPolicy::parse(snap, reader),
            client_cert: client_cert::ClientCert::parse(snap, reader),
        }
    }

    /// One line per setting that differs from the default, for
    /// `ferry render --what routes`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = self.paths.describe();
        out.extend(self.access.describe());
        out.extend(self.balance.describe());
        out.extend(self.upstream.describe());
        out.extend(self.client_cert.iter().flat_map(|c| c.describe()));
        out
    }
}

/// Whether an annotation is under one of the prefixes ferry accounts for.
pub fn is_ours(name: &str) -> bool {
    name.starts_with(NGINX) || name.starts_with(NGINX_ORG)
}

/// Snippet annotations: raw nginx configuration, refused on purpose.
fn is_snippet(name: &str) -> bool {
    is_ours(name) && (name.ends_with("-snippet") || name.ends_with("-snippets"))
}

/// Reads the annotations of one Ingress, remembering which were read (and
/// so are understood) and collecting problems with their values.
pub struct Reader<'a> {
    ing: &'a Ingress,
    read: BTreeSet<&'a str>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    pub fn new(ing: &'a Ingress) -> Reader<'a> {
        Reader {
            ing,
            read: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    pub fn ingress(&self) -> &'a Ingress {
        self.ing
    }

    /// The value of `name`, trimmed, marking the annotation as understood.
    pub fn get(&mut self, name: &str) -> Option<&'a str> {
        let (k, v) = self.ing.annotations.get_key_value(name)?;
        self.read.insert(k.as_str());
        Some(v.trim())
    }

    /// The first of `names` that is set, with its name. All of them are
    /// marked as understood.
    pub fn first(&mut self, names: &[&'static str]) -> Option<(&'static str, &'a str)> {
        let mut found = None;
        for name in names {
            if let Some(v) = self.get(name) {
                found = found.or(Some((*name, v)));
            }
        }
        found
    }

    /// `name` parsed by `parse`; a value it refuses is reported (with the
    /// reason it gives) and read as unset.
    pub fn parse<T>(&mut self, name: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let value = self.get(name)?;
        match parse(value) {
            Ok(v) => Some(v),
            Err(why) => {
                self.problem(name, format!("{value:?}: {why}; annotation ignored"));
                None
            }
        }
    }

    /// A `"true"`/`"false"` annotation (any case); anything else is reported.
    pub fn flag(&mut self, name: &str) -> Option<bool> {
        self.parse(name, parse_bool)
    }

    /// Reports a problem with annotation `name` of this Ingress.
    pub fn problem(&mut self, name: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            object: format!("Ingress {}", self.ing.key),
            field: format!("metadata.annotations[{name}]"),
            message: message.into(),
        });
    }

    /// The problems found, plus one for every annotation under ferry's
    /// prefixes that nothing read: snippets are refused, the rest are not
    /// supported.
    pub fn finish(mut self) -> Vec<Problem> {
        let unread: Vec<&'a str> = self
            .ing
            .annotations
            .keys()
            .map(String::as_str)
            .filter(|k| is_ours(k) && !self.read.contains(k))
            .collect();
        for name in unread {
            let value = self.ing.annotations.get(name).map_or("", String::as_str);
            if is_snippet(name) {
                self.problem(
                    name,
                    "refused: snippets are raw nginx configuration, which ferry never runs \
                     (the IngressNightmare class of bug); annotation ignored",
                );
            } else if unsupported::already_so(name, value) {
                // What it asks for is what ferry always does.
            } else if let Some(why) = unsupported::reason(name) {
                self.problem(name, format!("not supported by ferry ({why}); annotation ignored"));
            } else {
                self.problem(name, "not supported by ferry; annotation ignored");
            }
        }
        self.problems
    }
}

/// `true`/`false` in any case.
pub fn parse_bool(v: &str) -> Result<bool, String> {
    if v.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err("neither \"true\" nor \"false\"".into())
    }
}

/// A non-negative integer.
pub fn parse_u64(v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| "not a non-negative integer".to_string())
}

/// Seconds as nginx annotations write them: a plain number of seconds, or
/// an nginx time (`500ms`, `5s`, `1m`, `1h`).
pub fn parse_seconds(v: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let bad = || "not a time (seconds, or like 500ms, 5s, 1m)".to_string();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    })
}

/// Comma-separated items, trimmed, empty ones dropped.
pub fn comma_list(v: &str) -> Vec<&str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ingress;

    #[test]
    fn unread_annotations_are_reported_and_snippets_refused() {
        let ing = ingress(
            "nginx.ingress.kubernetes.io/ssl-redirect: 'false', nginx.ingress.kubernetes.io/made-up: x, \
             nginx.ingress.kubernetes.io/configuration-snippet: 'return 200;', nginx.org/server-snippets: x, \
             example.com/other: y",
        );
        let mut r = Reader::new(&ing);
        assert_eq!(r.flag("nginx.ingress.kubernetes.io/ssl-redirect"), Some(false));
        let problems = r.finish();
        let got: Vec<(&str, bool)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.message.starts_with("refused")))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "metadata.annotations[nginx.ingress.kubernetes.io/configuration-snippet]",
                    true
                ),
                ("metadata.annotations[nginx.ingress.kubernetes.io/made-up]", false),
                ("metadata.annotations[nginx.org/server-snippets]", true),
            ]
        );
        assert!(problems.iter().all(|p| p.object == "Ingress default/i"));
    }

    #[test]
    fn bad_values_are_reported_with_the_reason() {
        let ing =
            ingress("nginx.ingress.kubernetes.io/use-regex: maybe, nginx.ingress.kubernetes.io/proxy-read-timeout: 5x");
        let mut r = Reader::new(&ing);
        assert_eq!(r.flag("nginx.ingress.kubernetes.io/use-regex"), None);
        assert_eq!(
            r.parse("nginx.ingress.kubernetes.io/proxy-read-timeout", parse_seconds),
            None
        );
        let problems = r.finish();
        assert_eq!(problems.len(), 2);
        assert!(problems[0].message.contains("\"maybe\": neither"), "{}", problems[0]);
        assert!(problems[1].message.contains("not a time"), "{}", problems[1]);
    }

    #[test]
    fn nginx_times() {
        use std::time::Duration;
        for (v, want) in [
            ("5", Some(Duration::from_secs(5))),
            ("5s", Some(Duration::from_secs(5))),
            ("500ms", Some(Duration::from_millis(500))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            ("", None),
            ("s", None),
            ("5d", None),
            ("-1", None),
        ] {
            assert_eq!(parse_seconds(v).ok(), want, "{v:?}");
        }
    }
}
