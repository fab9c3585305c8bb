//! Canary Ingresses (`nginx.ingress.kubernetes.io/canary: "true"`): a
//! second Ingress for the host and path of a main one whose backend gets
//! part of the traffic. As ingress-nginx's balancer decides, in order:
//! 1. session affinity: a request whose affinity cookie belongs to the main
//!    backend stays there, one whose cookie belongs to the canary goes there
//!    (unless `affinity-canary-behavior: legacy`);
//! 2. `canary-by-header`: with `-value`, an exact match goes to the canary;
//!    with `-pattern`, a regex match does; without either, `always` goes to
//!    the canary and `never` to the main backend; anything else falls
//!    through;
//! 3. `canary-by-cookie`: `always` → canary, `never` → main, else falls
//!    through;
//! 4. `canary-weight` out of `canary-weight-total` (100): that share of the
//!    remaining requests goes to the canary.

use http::{HeaderMap, HeaderName};
use regex::Regex;

use super::{chash, parse_u64, Reader, NGINX};

pub const CANARY: &str = "nginx.ingress.kubernetes.io/canary";
pub const BY_HEADER: &str = "nginx.ingress.kubernetes.io/canary-by-header";
pub const BY_HEADER_VALUE: &str = "nginx.ingress.kubernetes.io/canary-by-header-value";
pub const BY_HEADER_PATTERN: &str = "nginx.ingress.kubernetes.io/canary-by-header-pattern";
pub const BY_COOKIE: &str = "nginx.ingress.kubernetes.io/canary-by-cookie";
pub const WEIGHT: &str = "nginx.ingress.kubernetes.io/canary-weight";
pub const WEIGHT_TOTAL: &str = "nginx.ingress.kubernetes.io/canary-weight-total";
pub const AFFINITY_CANARY_BEHAVIOR: &str = "nginx.ingress.kubernetes.io/affinity-canary-behavior";

/// What sends a request to the canary instead of the main backend.
#[derive(Debug, Clone)]
pub struct CanaryRules {
    pub header: Option<HeaderName>,
    pub header_value: Option<String>,
    pub header_pattern: Option<Regex>,
    pub cookie: Option<String>,
    pub weight: u64,
    pub weight_total: u64,
    /// Affinity cookies keep a client on the backend that set them
    /// (`affinity-canary-behavior: sticky`, the default).
    pub sticky: bool,
}

impl PartialEq for CanaryRules {
    fn eq(&self, other: &Self) -> bool {
        self.header == other.header
            && self.header_value == other.header_value
            && self.header_pattern.as_ref().map(Regex::as_str) == other.header_pattern.as_ref().map(Regex::as_str)
            && self.cookie == other.cookie
            && self.weight == other.weight
            && self.weight_total == other.weight_total
            && self.sticky == other.sticky
    }
}

impl Eq for CanaryRules {}

/// How the traffic-shaping rules (2–4 above) decide, before affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Canary,
    Main,
}

impl CanaryRules {
    /// Reads the canary annotations of an Ingress; `None` unless
    /// `canary: "true"`. Every canary annotation is read either way; set on
    /// an Ingress that is not a canary they are reported.
    pub fn parse(r: &mut Reader<'_>) -> Option<CanaryRules> {
        let enabled = r.flag(CANARY).unwrap_or(false);
        let header = r.get(BY_HEADER).filter(|v| !v.is_empty());
        let header_value = r.get(BY_HEADER_VALUE).filter(|v| !v.is_empty());
        let header_pattern = r.get(BY_HEADER_PATTERN).filter(|v| !v.is_empty());
        let cookie = r.get(BY_COOKIE).filter(|v| !v.is_empty());
        let weight = r.parse(WEIGHT, parse_u64);
        let weight_total = r.parse(WEIGHT_TOTAL, parse_u64);
        let behavior = r.get(AFFINITY_CANARY_BEHAVIOR);
        if !enabled {
            for (name, set) in [
                (BY_HEADER, header.is_some()),
                (BY_HEADER_VALUE, header_value.is_some()),
                (BY_HEADER_PATTERN, header_pattern.is_some()),
                (BY_COOKIE, cookie.is_some()),
                (WEIGHT, weight.is_some()),
                (WEIGHT_TOTAL, weight_total.is_some()),
                (AFFINITY_CANARY_BEHAVIOR, behavior.is_some()),
            ] {
                if set {
                    r.problem(
                        name,
                        "only meaningful on a canary Ingress (canary: \"true\"); annotation ignored",
                    );
                }
            }
            return None;
        }
        let header = header.and_then(|h| match HeaderName::from_bytes(h.replace('_', "-").as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                r.problem(BY_HEADER, format!("{h:?}: not a header name; annotation ignored"));
                None
            }
        });
        let header_pattern = header_pattern.and_then(|p| match Regex::new(p) {
            Ok(re) => Some(re),
            Err(e) => {
                r.problem(
                    BY_HEADER_PATTERN,
                    format!("{p:?}: not a regular expression ({e}); annotation ignored"),
                );
                None
            }
        });
        if header.is_none() {
            for (name, set) in [
                (BY_HEADER_VALUE, header_value.is_some()),
                (BY_HEADER_PATTERN, header_pattern.is_some()),
            ] {
                if set {
                    r.problem(name, "needs canary-by-header; annotation ignored");
                }
            }
        } else if header_value.is_some() && header_pattern.is_some() {
            r.problem(
                BY_HEADER_PATTERN,
                "canary-by-header-value is set and wins; annotation ignored",
            );
        }
        let mut weight_total = weight_total.unwrap_or(100);
        if weight_total < 100 {
            r.problem(
                WEIGHT_TOTAL,
                format!("{weight_total}: below 100, which ingress-nginx uses instead; using 100"),
            );
            weight_total = 100;
        }
        let sticky = match behavior {
            None | Some("sticky") => true,
            Some("legacy") => false,
            Some(other) => {
                r.problem(
                    AFFINITY_CANARY_BEHAVIOR,
                    format!("{other:?}: neither sticky nor legacy; using sticky"),
                );
                true
            }
        };
        Some(CanaryRules {
            header_value: header.as_ref().and(header_value.map(str::to_string)),
            header_pattern: header.as_ref().and(header_pattern),
            header,
            cookie: cookie.map(str::to_string),
            weight: weight.unwrap_or(0),
            weight_total,
            sticky,
        })
    }

    /// Rules 2–4 for one request; `roll` is a uniform draw in
    /// `1..=weight_total` (taken only when the weight decides).
    pub fn decide(&self, headers: &HeaderMap, roll: impl FnOnce(u64) -> u64) -> Verdict {
        if let Some(name) = &self.header {
            if let Some(v) = headers.get(name) {
                let v = v.to_str().unwrap_or_default();
                if let Some(want) = &self.header_value {
                    if v == want {
                        return Verdict::Canary;
                    }
                } else if let Some(re) = &self.header_pattern {
                    if re.is_match(v) {
                        return Verdict::Canary;
                    }
                } else if v == "always" {
                    return Verdict::Canary;
                } else if v == "never" {
                    return Verdict::Main;
                }
            }
        }
        if let Some(name) = &self.cookie {
            match chash::cookie(headers, name) {
                Some("always") => return Verdict::Canary,
                Some("never") => return Verdict::Main,
                _ => {}
            }
        }
        if self.weight > 0 && roll(self.weight_total) <= self.weight {
            Verdict::Canary
        } else {
            Verdict::Main
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(h) = &self.header {
            let how = match (&self.header_value, &self.header_pattern) {
                (Some(v), _) => format!(" == {v:?}"),
                (None, Some(p)) => format!(" ~ /{}/", p.as_str()),
                (None, None) => " always/never".into(),
            };
            parts.push(format!("header {h}{how}"));
        }
        if let Some(c) = &self.cookie {
            parts.push(format!("cookie {c} always/never"));
        }
        parts.push(format!("weight {}/{}", self.weight, self.weight_total));
        if !self.sticky {
            parts.push("affinity ignored (legacy)".into());
        }
        format!("canary: {}", parts.join(", "))
    }
}

/// Whether an annotation is honoured on a canary Ingress: ingress-nginx
/// takes everything else from the main Ingress.
pub fn honoured_on_canary(name: &str) -> bool {
    let Some(short) = name.strip_prefix(NGINX) else {
        return false;
    };
    short.starts_with("canary")
        || short.starts_with("session-cookie-")
        || matches!(
            short,
            "load-balance" | "upstream-hash-by" | "upstream-hash-by-subset" | "upstream-hash-by-subset-size"
        )
        || short.starts_with("affinity")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ingress;

    fn rules(annotations: &str) -> (Option<CanaryRules>, Vec<String>) {
        let ing = ingress(annotations);
        let mut r = Reader::new(&ing);
        let rules = CanaryRules::parse(&mut r);
        let problems = r.finish().into_iter().map(|p| p.to_string()).collect();
        (rules, problems)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn parsing() {
        let (r, p) = rules("nginx.ingress.kubernetes.io/canary-weight: '10'");
        assert!(r.is_none());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("only meaningful on a canary"), "{p:?}");

        let (r, p) = rules(
            "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-by-header: X_Canary, \
             nginx.ingress.kubernetes.io/canary-by-header-pattern: '^(a|b)$', nginx.ingress.kubernetes.io/canary-weight: '30', \
             nginx.ingress.kubernetes.io/canary-weight-total: '1000'",
        );
        let r = r.unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(r.header.as_ref().map(HeaderName::as_str), Some("x-canary"));
        assert_eq!(r.header_pattern.as_ref().map(Regex::as_str), Some("^(a|b)$"));
        assert_eq!((r.weight, r.weight_total), (30, 1000));
        assert!(r.sticky);

        let (r, p) = rules(
            "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-by-header-value: x, \
             nginx.ingress.kubernetes.io/canary-weight: lots, nginx.ingress.kubernetes.io/canary-weight-total: '50', \
             nginx.ingress.kubernetes.io/affinity-canary-behavior: legacy",
        );
        let r = r.unwrap();
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(
            (r.weight, r.weight_total, r.header_value.is_none(), r.sticky),
            (0, 100, true, false)
        );

        let (r, p) = rules(
            "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-by-header-pattern: '('",
        );
        assert!(r.unwrap().header_pattern.is_none());
        assert!(p.iter().any(|p| p.contains("not a regular expression")), "{p:?}");
    }

    #[test]
    fn precedence_table() {
        use Verdict::*;
        let canary =
            |header: Option<(&str, Option<&str>, Option<&str>)>, cookie: Option<&str>, weight: u64| CanaryRules {
                header: header.map(|(h, _, _)| HeaderName::from_bytes(h.as_bytes()).unwrap()),
                header_value: header.and_then(|(_, v, _)| v.map(str::to_string)),
                header_pattern: header.and_then(|(_, _, p)| p.map(|p| Regex::new(p).unwrap())),
                cookie: cookie.map(str::to_string),
                weight,
                weight_total: 100,
                sticky: true,
            };
        let by_header = canary(Some(("x-canary", None, None)), Some("c"), 0);
        let by_value = canary(Some(("x-canary", Some("v2"), None)), Some("c"), 100);
        let by_pattern = canary(Some(("x-canary", None, Some("^v[0-9]+$"))), None, 0);
        let cookie_then_weight = canary(None, Some("c"), 100);
        // (rules, request headers, roll, verdict)
        type Case<'a> = (&'a CanaryRules, Vec<(&'a str, &'a str)>, u64, Verdict);
        let table: Vec<Case<'_>> = vec![
            (&by_header, vec![("x-canary", "always")], 1, Canary),
            (&by_header, vec![("X-Canary", "never"), ("cookie", "c=always")], 1, Main),
            // Other values fall through to the cookie, then the weight (0 here).
            (&by_header, vec![("x-canary", "yes"), ("cookie", "c=always")], 1, Canary),
            (&by_header, vec![("x-canary", "yes")], 1, Main),
            (&by_header, vec![("cookie", "c=never")], 1, Main),
            (&by_header, vec![("cookie", "c=always")], 1, Canary),
            (&by_header, vec![], 1, Main),
            // A value: exact match only; `never` is just another value, and a
            // mismatch falls through (here to the cookie, then weight 100).
            (&by_value, vec![("x-canary", "v2")], 100, Canary),
            (&by_value, vec![("x-canary", "V2"), ("cookie", "c=never")], 1, Main),
            (&by_value, vec![("x-canary", "never")], 1, Canary),
            (&by_pattern, vec![("x-canary", "v12")], 1, Canary),
            (&by_pattern, vec![("x-canary", "always")], 1, Main),
            (&by_pattern, vec![("x-canary", "vx")], 1, Main),
            (&cookie_then_weight, vec![("cookie", "a=b; c=never")], 1, Main),
            (&cookie_then_weight, vec![("cookie", "c=other")], 100, Canary),
        ];
        for (i, (rules, h, roll, want)) in table.into_iter().enumerate() {
            assert_eq!(rules.decide(&headers(&h), |_| roll), want, "case {i}: {h:?}");
        }
        // Weights: roll in 1..=total, canary when roll <= weight.
        let w = canary(None, None, 30);
        assert_eq!(w.decide(&HeaderMap::new(), |_| 30), Canary);
        assert_eq!(w.decide(&HeaderMap::new(), |_| 31), Main);
        let zero = canary(None, None, 0);
        assert_eq!(zero.decide(&HeaderMap::new(), |_| 1), Main);
    }

    #[test]
    fn canary_honours_only_its_annotations() {
        for (name, want) in [
            ("nginx.ingress.kubernetes.io/canary-weight", true),
            ("nginx.ingress.kubernetes.io/load-balance", true),
            ("nginx.ingress.kubernetes.io/upstream-hash-by", true),
            ("nginx.ingress.kubernetes.io/affinity-mode", true),
            ("nginx.ingress.kubernetes.io/session-cookie-name", true),
            ("nginx.ingress.kubernetes.io/rewrite-target", false),
            ("nginx.org/lb-method", false),
        ] {
            assert_eq!(honoured_on_canary(name), want, "{name}");
        }
    }
}
