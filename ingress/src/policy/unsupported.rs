//! What ferry says about annotations it does not honour: why, for the
//! well-known ones, so that a user migrating from ingress-nginx or NGINX
//! Ingress Controller knows whether anything changes for them; and the
//! few whose asked-for behaviour is what ferry always does, which are
//! accepted without a report.

/// Annotation name (without prefix handling: full names) → why ferry does
/// not honour it. Anything under the two prefixes not listed here and not
/// read by an area parser is reported as "not supported" without a reason.
const REASONS: &[(&str, &str)] = &[
    (
        "nginx.ingress.kubernetes.io/ssl-passthrough",
        "ferry terminates TLS; SNI passthrough to the backend is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-buffering",
        "ferry streams responses and never buffers them to disk",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-buffer-size",
        "ferry streams responses; there are no proxy buffers to size",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-buffers-number",
        "ferry streams responses; there are no proxy buffers to size",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-max-temp-file-size",
        "ferry never writes responses to temporary files",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-request-buffering",
        "ferry streams request bodies to the upstream",
    ),
    (
        "nginx.ingress.kubernetes.io/client-body-buffer-size",
        "ferry streams request bodies; there is no body buffer",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-http-version",
        "ferry speaks HTTP/1.1 (or HTTP/2 with backend-protocol) to upstreams",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-cookie-domain",
        "cookie rewriting is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-cookie-path",
        "cookie rewriting is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-redirect-from",
        "Location rewriting is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/proxy-redirect-to",
        "Location rewriting is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/custom-headers",
        "custom response headers (a ConfigMap reference) are out of scope",
    ),
    ("nginx.ingress.kubernetes.io/enable-modsecurity", "ferry has no WAF"),
    (
        "nginx.ingress.kubernetes.io/enable-owasp-core-rules",
        "ferry has no WAF",
    ),
    (
        "nginx.ingress.kubernetes.io/modsecurity-transaction-id",
        "ferry has no WAF",
    ),
    (
        "nginx.ingress.kubernetes.io/enable-opentelemetry",
        "tracing export is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/opentelemetry-trust-incoming-span",
        "tracing export is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/mirror-target",
        "request mirroring is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/mirror-request-body",
        "request mirroring is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/mirror-host",
        "request mirroring is not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/limit-rate",
        "bandwidth limits are not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/limit-rate-after",
        "bandwidth limits are not implemented",
    ),
    (
        "nginx.ingress.kubernetes.io/connection-proxy-header",
        "ferry manages the upstream Connection header itself",
    ),
    (
        "nginx.ingress.kubernetes.io/enable-access-log",
        "access logging is set for the whole node (the `ferry::access` log target)",
    ),
    (
        "nginx.ingress.kubernetes.io/enable-rewrite-log",
        "nginx debug logging has no ferry equivalent",
    ),
    (
        "nginx.ingress.kubernetes.io/ssl-ciphers",
        "rustls has a fixed set of safe cipher suites",
    ),
    (
        "nginx.ingress.kubernetes.io/ssl-prefer-server-ciphers",
        "rustls has a fixed set of safe cipher suites",
    ),
    (
        "nginx.ingress.kubernetes.io/http2-push-preload",
        "HTTP/2 server push is not implemented (and deprecated)",
    ),
    (
        "nginx.ingress.kubernetes.io/global-rate-limit",
        "global (memcached) rate limits are not implemented; limit-rps is per node",
    ),
    (
        "nginx.org/mergeable-ingress-type",
        "master/minion Ingresses are not merged; each Ingress is read on its own",
    ),
    ("nginx.org/listen-ports", "ferry listens on the ports of its flags"),
    ("nginx.org/listen-ports-ssl", "ferry listens on the ports of its flags"),
    (
        "nginx.org/proxy-buffering",
        "ferry streams responses and never buffers them to disk",
    ),
    (
        "nginx.org/proxy-buffers",
        "ferry streams responses; there are no proxy buffers to size",
    ),
    (
        "nginx.org/proxy-buffer-size",
        "ferry streams responses; there are no proxy buffers to size",
    ),
    (
        "nginx.org/proxy-max-temp-file-size",
        "ferry never writes responses to temporary files",
    ),
    (
        "nginx.org/proxy-hide-headers",
        "response header filtering is not implemented",
    ),
    (
        "nginx.org/proxy-pass-headers",
        "response header filtering is not implemented",
    ),
    (
        "nginx.org/server-tokens",
        "ferry never sends a version in a Server header",
    ),
    ("nginx.org/keepalive", "upstream keep-alive pools are sized by ferry"),
    (
        "nginx.org/max-fails",
        "passive health checks use ferry's node-wide settings",
    ),
    (
        "nginx.org/fail-timeout",
        "passive health checks use ferry's node-wide settings",
    ),
    (
        "nginx.org/max-conns",
        "per-endpoint connection caps are not implemented",
    ),
    ("nginx.org/jwt-key", "JWT validation (NGINX Plus) is not implemented"),
    ("nginx.org/jwt-realm", "JWT validation (NGINX Plus) is not implemented"),
    ("nginx.org/jwt-token", "JWT validation (NGINX Plus) is not implemented"),
    (
        "nginx.org/jwt-login-url",
        "JWT validation (NGINX Plus) is not implemented",
    ),
];

/// Annotations whose asked-for behaviour is what ferry always does, with
/// the values that ask for it (`None`: any value).
const ALREADY_SO: &[(&str, Option<&str>)] = &[
    // WebSocket upgrades work for every Service.
    ("nginx.org/websocket-services", None),
    ("nginx.ingress.kubernetes.io/proxy-buffering", Some("off")),
    ("nginx.ingress.kubernetes.io/proxy-request-buffering", Some("off")),
    ("nginx.ingress.kubernetes.io/proxy-http-version", Some("1.1")),
    ("nginx.org/proxy-buffering", Some("false")),
];

/// Whether `name: value` asks for what ferry does anyway.
pub fn already_so(name: &str, value: &str) -> bool {
    ALREADY_SO
        .iter()
        .any(|(n, v)| *n == name && v.is_none_or(|v| v.eq_ignore_ascii_case(value.trim())))
}

/// The reason ferry gives for not honouring `name`, if it has one.
pub fn reason(name: &str) -> Option<&'static str> {
    REASONS.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_accepted_values() {
        assert!(reason("nginx.ingress.kubernetes.io/ssl-passthrough").is_some());
        assert!(reason("nginx.ingress.kubernetes.io/made-up").is_none());
        assert!(already_so("nginx.org/websocket-services", "ws-svc"));
        assert!(already_so("nginx.ingress.kubernetes.io/proxy-buffering", "Off"));
        assert!(!already_so("nginx.ingress.kubernetes.io/proxy-buffering", "on"));
        // Every name is under one of the two prefixes, once.
        let mut names: Vec<&str> = REASONS.iter().map(|(n, _)| *n).collect();
        assert!(names.iter().all(|n| super::super::is_ours(n)));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REASONS.len());
    }
}
