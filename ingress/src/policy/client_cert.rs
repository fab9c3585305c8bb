//! Client-certificate authentication (ingress-nginx's `auth-tls-*`
//! annotations).
//!
//! As in ingress-nginx, the setting belongs to a host (nginx's `server`):
//! the oldest Ingress that sets it for a host decides for every path of
//! that host. The TLS handshake of a connection whose SNI names such a host
//! asks for a client certificate but accepts any (or none), only checking
//! that the client holds its key; the chain is verified against the CA
//! bundle when a request arrives, for the host of that request (so a
//! client cannot pick another SNI to skip the check). Then, like nginx:
//! - `on` without a certificate: 400 ("No required SSL certificate was
//!   sent"); `on` or `optional` with one that does not verify: 400 ("The
//!   SSL certificate error"); with `auth-tls-error-page`, a 302 to that
//!   page instead; `optional_no_ca` passes whatever was sent; `off` asks
//!   for nothing;
//! - `auth-tls-match-cn`: a subject DN that does not match the regex: 403;
//! - upstream headers `ssl-client-verify` (`SUCCESS`, `NONE` or
//!   `FAILED:reason`), `ssl-client-subject-dn` and `ssl-client-issuer-dn`
//!   (RFC 2253), and with `auth-tls-pass-certificate-to-upstream`
//!   `ssl-client-cert` (the URL-escaped PEM). Values the client sent under
//!   these names are dropped on such hosts.
//!
//! An `auth-tls-secret` that is malformed, missing or holds no CA
//! certificate in `ca.crt` denies the Ingress's paths (503), as
//! ingress-nginx does: a broken CA must not open what it protected.
//! Plain-HTTP requests are not checked (nginx has no client certificate
//! there either); TLS hosts redirect them to HTTPS by default.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use ferry_cluster::{ObjectKey, Snapshot};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use regex::Regex;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{parse_bool, Reader};
use crate::proxy::ProxyBody;
use crate::routes::RouteTable;

pub const SECRET: &str = "nginx.ingress.kubernetes.io/auth-tls-secret";
pub const VERIFY_CLIENT: &str = "nginx.ingress.kubernetes.io/auth-tls-verify-client";
pub const VERIFY_DEPTH: &str = "nginx.ingress.kubernetes.io/auth-tls-verify-depth";
pub const ERROR_PAGE: &str = "nginx.ingress.kubernetes.io/auth-tls-error-page";
pub const PASS_CERT: &str = "nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream";
pub const MATCH_CN: &str = "nginx.ingress.kubernetes.io/auth-tls-match-cn";

/// The headers ingress-nginx sets upstream on client-certificate hosts.
pub static SSL_CLIENT_VERIFY: HeaderName = HeaderName::from_static("ssl-client-verify");
pub static SSL_CLIENT_SUBJECT_DN: HeaderName = HeaderName::from_static("ssl-client-subject-dn");
pub static SSL_CLIENT_ISSUER_DN: HeaderName = HeaderName::from_static("ssl-client-issuer-dn");
pub static SSL_CLIENT_CERT: HeaderName = HeaderName::from_static("ssl-client-cert");

/// `auth-tls-verify-client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// A verified certificate is required.
    On,
    /// No certificate is asked for.
    Off,
    /// A certificate is asked for; one that is sent must verify.
    Optional,
    /// A certificate is asked for and never verified.
    OptionalNoCa,
}

impl Verify {
    pub fn parse(v: &str) -> Result<Verify, String> {
        match v {
            "on" => Ok(Verify::On),
            "off" => Ok(Verify::Off),
            "optional" => Ok(Verify::Optional),
            "optional_no_ca" => Ok(Verify::OptionalNoCa),
            _ => Err("not one of on, off, optional, optional_no_ca; using \"on\"".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verify::On => "on",
            Verify::Off => "off",
            Verify::Optional => "optional",
            Verify::OptionalNoCa => "optional_no_ca",
        }
    }
}

/// The client-certificate settings of one Ingress.
pub struct ClientCert {
    pub secret: ObjectKey,
    pub verify: Verify,
    /// Certificates in a chain, the client's own included (nginx's
    /// `ssl_verify_depth`): depth 1 allows no intermediate.
    pub depth: u32,
    /// Where a failed check redirects (302) instead of answering 400.
    pub error_page: Option<HeaderValue>,
    pub pass_cert: bool,
    pub match_cn: Option<Regex>,
    /// Verifies chains against the CA bundle; `None` when denied.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The bundle's certificates (not counted against the depth when a
    /// client sends them along).
    ca: Vec<CertificateDer<'static>>,
    /// Why the Ingress's paths answer 503 (the CA could not be loaded).
    pub denied: Option<String>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("secret", &self.secret)
            .field("verify", &self.verify)
            .field("depth", &self.depth)
            .field("denied", &self.denied)
            .finish_non_exhaustive()
    }
}

impl ClientCert {
    /// Reads the `auth-tls-*` annotations (all of them, always).
    pub fn parse(snap: &Snapshot, r: &mut Reader<'_>) -> Option<Arc<ClientCert>> {
        let secret = r.get(SECRET);
        let verify = r.parse(VERIFY_CLIENT, Verify::parse);
        let depth = r.parse(VERIFY_DEPTH, |v| match v.parse::<u32>() {
            Ok(0) | Err(_) => Err("not a positive integer; using 1".to_string()),
            Ok(n) => Ok(n),
        });
        let error_page = r.parse(ERROR_PAGE, |v| {
            if (v.starts_with("http://") || v.starts_with("https://")) && v.parse::<http::Uri>().is_ok() {
                HeaderValue::from_str(v).map_err(|e| e.to_string())
            } else {
                Err("not an absolute http(s) URL".to_string())
            }
        });
        let pass_cert = r.parse(PASS_CERT, parse_bool);
        let match_cn = r.parse(MATCH_CN, |v| {
            if !v.contains("CN=") {
                return Err("does not contain \"CN=\"".to_string());
            }
            Regex::new(v).map_err(|e| format!("not a regular expression: {e}"))
        });
        let Some(secret) = secret else {
            for (name, set) in [
                (VERIFY_CLIENT, verify.is_some()),
                (VERIFY_DEPTH, depth.is_some()),
                (ERROR_PAGE, error_page.is_some()),
                (PASS_CERT, pass_cert.is_some()),
                (MATCH_CN, match_cn.is_some()),
            ] {
                if set {
                    r.problem(name, "has no effect without auth-tls-secret; annotation ignored");
                }
            }
            return None;
        };
        let ing = r.ingress();
        let mut cc = ClientCert {
            secret: ObjectKey::new("", secret),
            verify: verify.unwrap_or(Verify::On),
            depth: depth.unwrap_or(1),
            error_page,
            pass_cert: pass_cert.unwrap_or(false),
            match_cn,
            verifier: None,
            ca: Vec::new(),
            denied: None,
        };
        let loaded = match secret.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                cc.secret = ObjectKey::new(ns, name);
                load_ca(snap, &cc.secret)
            }
            _ => Err(format!("{secret:?} is not namespace/name")),
        };
        match loaded {
            Ok((verifier, ca)) => {
                cc.verifier = Some(verifier);
                cc.ca = ca;
            }
            Err(why) => {
                r.problem(
                    SECRET,
                    format!("{why}; the paths of this Ingress answer 503 (as ingress-nginx denies them)"),
                );
                tracing::debug!(ingress = %ing.key, "client-certificate CA not loaded");
                cc.denied = Some(why);
            }
        }
        Some(Arc::new(cc))
    }

    pub fn describe(&self) -> Vec<String> {
        let mut line = format!(
            "client certificates: verify {} against {} ca.crt, depth {}",
            self.verify.as_str(),
            self.secret,
            self.depth
        );
        if self.pass_cert {
            line.push_str(", certificate passed upstream");
        }
        if let Some(re) = &self.match_cn {
            let _ = write!(line, ", subject must match {:?}", re.as_str());
        }
        if let Some(p) = &self.error_page {
            let _ = write!(line, ", failures redirect to {}", p.to_str().unwrap_or("?"));
        }
        if let Some(why) = &self.denied {
            let _ = write!(line, "; DENIED (503): {why}");
        }
        vec![line]
    }

    /// Verifies `chain` (leaf first) against the CA bundle and depth.
    fn verify_chain(&self, chain: &[CertificateDer<'static>]) -> Result<(), String> {
        let (Some(verifier), Some((leaf, intermediates))) = (&self.verifier, chain.split_first()) else {
            return Err("no CA".into());
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| failure_reason(&e))?;
        // nginx's depth counts the certificates above the client's. Here:
        // the intermediates the client sent that are not in the bundle.
        let above = intermediates.iter().filter(|c| !self.ca.contains(c)).count();
        if above >= usize::try_from(self.depth).unwrap_or(usize::MAX) {
            return Err("certificate chain too long".into());
        }
        Ok(())
    }
}

type Loaded = (Arc<dyn ClientCertVerifier>, Vec<CertificateDer<'static>>);

/// `ca.crt` of `key` as a verifier (any number of PEM certificates), and
/// its certificates.
fn load_ca(snap: &Snapshot, key: &ObjectKey) -> Result<Loaded, String> {
    let secret = snap
        .secret(&key.namespace, &key.name)
        .ok_or_else(|| format!("Secret {key} not found"))?;
    let pem = secret
        .get("ca.crt")
        .ok_or_else(|| format!("Secret {key} has no ca.crt"))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut ders = Vec::new();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("Secret {key} ca.crt: {e}"))?;
        ders.push(cert.clone());
        roots.add(cert).map_err(|e| format!("Secret {key} ca.crt: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("Secret {key} ca.crt holds no PEM certificate"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("Secret {key} ca.crt: {e}"))?;
    Ok((verifier, ders))
}

/// nginx's (OpenSSL's) words for the usual verification failures.
fn failure_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unable to get local issuer certificate".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate has expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate is not yet valid".into()
            }
            CertificateError::BadSignature => "certificate signature failure".into(),
            CertificateError::Revoked => "certificate revoked".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "unsupported certificate purpose".into()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    }
}

/// The hosts with client-certificate authentication, each with the
/// setting of the oldest Ingress that sets one for it (a denied one
/// included: that Ingress's own paths answer 503, and the host asks for
/// nothing).
#[derive(Debug, Default)]
pub struct HostAuth {
    /// Keyed by the rule host as written (`a.test`, `*.w.test`, `` for
    /// rules without a host).
    hosts: HashMap<String, Arc<ClientCert>>,
}

impl HostAuth {
    /// The hosts' settings, and a problem for every younger Ingress whose
    /// own setting for a host is not the one used there.
    pub fn compile(table: &RouteTable) -> (HostAuth, Vec<crate::routes::Problem>) {
        // Policies come in Ingress age order.
        let age: HashMap<*const super::Policy, usize> = table
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| (Arc::as_ptr(p), i))
            .collect();
        let mut best: HashMap<&str, (usize, &Arc<ClientCert>, &super::Policy)> = HashMap::new();
        for route in table.routes() {
            let Some(cc) = &route.policy.client_cert else { continue };
            if cc.denied.is_some() {
                continue;
            }
            let rank = age.get(&Arc::as_ptr(&route.policy)).copied().unwrap_or(usize::MAX);
            let entry = best.entry(route.host.as_str()).or_insert((rank, cc, &route.policy));
            if rank < entry.0 {
                *entry = (rank, cc, &route.policy);
            }
        }
        let mut problems = Vec::new();
        let mut reported = std::collections::HashSet::new();
        for route in table.routes() {
            let Some(cc) = &route.policy.client_cert else { continue };
            let Some((_, used, owner)) = best.get(route.host.as_str()) else {
                continue;
            };
            if cc.denied.is_none()
                && !Arc::ptr_eq(cc, used)
                && reported.insert((route.policy.ingress.clone(), route.host.clone()))
            {
                problems.push(crate::routes::Problem {
                    object: format!("Ingress {}", route.policy.ingress),
                    field: "metadata.annotations[nginx.ingress.kubernetes.io/auth-tls-secret]".into(),
                    message: format!(
                        "host {:?} checks client certificates as older Ingress {} says; this Ingress's auth-tls settings are not used there",
                        route.host, owner.ingress
                    ),
                });
            }
        }
        let hosts = best
            .into_iter()
            .map(|(h, (_, cc, _))| (h.to_string(), cc.clone()))
            .collect();
        (HostAuth { hosts }, problems)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The setting of a route's host (`RouteMatch::host`).
    pub fn get(&self, host: &str) -> Option<&Arc<ClientCert>> {
        self.hosts.get(host)
    }

    /// Whether the handshake for `sni` should ask for a certificate: its
    /// exact host, else its wildcard, else the host-less rules decide.
    pub fn wants_cert(&self, sni: Option<&str>) -> bool {
        let wants = |h: &str| self.hosts.get(h).map(|cc| cc.verify != Verify::Off);
        let Some(sni) = sni else {
            return wants("").unwrap_or(false);
        };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(w) = wants(&sni) {
            return w;
        }
        if let Some((_, suffix)) = sni.split_once('.') {
            if let Some(w) = wants(&format!("*.{suffix}")) {
                return w;
            }
        }
        wants("").unwrap_or(false)
    }
}

/// The handshake side: asks for a certificate, accepts any or none, and
/// checks only that the client signed the handshake with the certificate's
/// key. The chain is verified per request (`check`).
#[derive(Debug)]
pub struct RequestCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl RequestCert {
    pub fn new() -> RequestCert {
        RequestCert {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl Default for RequestCert {
    fn default() -> Self {
        RequestCert::new()
    }
}

impl ClientCertVerifier for RequestCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What a connection's client sent, and what was found checking it (per
/// setting: an HTTP/2 connection may carry several hosts).
#[derive(Default)]
pub struct PeerCert {
    chain: Vec<CertificateDer<'static>>,
    /// Holding the setting keeps its address from being reused by a
    /// later one while its verdict is cached.
    checked: Mutex<Vec<(Arc<ClientCert>, Arc<Verdict>)>>,
}

impl PeerCert {
    pub fn new(chain: Option<&[CertificateDer<'static>]>) -> PeerCert {
        PeerCert {
            chain: chain.map(<[_]>::to_vec).unwrap_or_default(),
            checked: Mutex::new(Vec::new()),
        }
    }

    fn verdict(&self, cc: &Arc<ClientCert>) -> Arc<Verdict> {
        if let Ok(checked) = self.checked.lock() {
            if let Some((_, v)) = checked.iter().find(|(c, _)| Arc::ptr_eq(c, cc)) {
                return v.clone();
            }
        }
        let v = Arc::new(Verdict::new(cc, &self.chain));
        if let Ok(mut checked) = self.checked.lock() {
            // Bounded: one entry per setting seen on this connection.
            if checked.len() < 16 {
                checked.push((cc.clone(), v.clone()));
            }
        }
        v
    }
}

/// The outcome of checking one client's certificate for one setting.
#[derive(Debug)]
pub struct Verdict {
    /// `None`: no certificate; `Some(Err)`: it did not verify.
    result: Option<Result<(), String>>,
    subject: String,
    issuer: String,
    /// The leaf as URL-escaped PEM.
    escaped_pem: String,
}

impl Verdict {
    fn new(cc: &ClientCert, chain: &[CertificateDer<'static>]) -> Verdict {
        let Some(leaf) = chain.first() else {
            return Verdict {
                result: None,
                subject: String::new(),
                issuer: String::new(),
                escaped_pem: String::new(),
            };
        };
        let (subject, issuer) = match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => (rfc2253(cert.subject()), rfc2253(cert.issuer())),
            Err(_) => (String::new(), String::new()),
        };
        Verdict {
            result: Some(cc.verify_chain(chain)),
            subject,
            issuer,
            escaped_pem: escape_uri_component(&pem(leaf)),
        }
    }

    /// `$ssl_client_verify`.
    fn status(&self) -> String {
        match &self.result {
            None => "NONE".into(),
            Some(Ok(())) => "SUCCESS".into(),
            Some(Err(why)) => format!("FAILED:{why}"),
        }
    }
}

/// A DN as nginx's `$ssl_client_s_dn` prints it (RFC 2253: last RDN
/// first, `,` between, short attribute names).
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for rdn in name.iter().collect::<Vec<_>>().into_iter().rev() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|a| {
                let key = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                    .map(str::to_string)
                    .unwrap_or_else(|_| a.attr_type().to_id_string());
                let key = if key == "Email" || key == "emailAddress" {
                    "emailAddress".to_string()
                } else {
                    key
                };
                let value = a.as_str().map(escape_dn_value).unwrap_or_default();
                format!("{key}={value}")
            })
            .collect();
        parts.push(attrs.join("+"));
    }
    parts.join(",")
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == v.chars().count() && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One certificate as PEM (64-column base64).
fn pem(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// nginx's `$ssl_client_escaped_cert` escaping: everything but
/// `A-Z a-z 0-9 - . _ ~` as `%XX`.
fn escape_uri_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Why a request is answered by ferry instead of its upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The Ingress's CA could not be loaded (503).
    Denied,
    /// `on` and no certificate (nginx's 496, sent as 400).
    NoCertificate,
    /// A certificate that does not verify (nginx's 495, sent as 400).
    BadCertificate,
    /// `auth-tls-match-cn` did not match (403).
    Unauthorized,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Denied => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoCertificate | Refusal::BadCertificate => StatusCode::BAD_REQUEST,
            Refusal::Unauthorized => StatusCode::FORBIDDEN,
        }
    }

    fn text(&self) -> &'static str {
        match self {
            Refusal::Denied => "503 service unavailable\n",
            Refusal::NoCertificate => "400 No required SSL certificate was sent\n",
            Refusal::BadCertificate => "400 The SSL certificate error\n",
            Refusal::Unauthorized => "403 client certificate unauthorized\n",
        }
    }

    /// The answer: the status and text, or a 302 to the error page for
    /// the certificate failures.
    pub fn response(&self, error_page: Option<&HeaderValue>) -> Response<ProxyBody> {
        let redirect = matches!(self, Refusal::NoCertificate | Refusal::BadCertificate)
            .then_some(error_page)
            .flatten();
        let r = match redirect {
            Some(location) => crate::answer::redirect(StatusCode::FOUND, location.clone()),
            None => crate::answer::text(self.status(), self.text()),
        };
        r.map(ProxyBody::Local)
    }
}

/// The request-time check of `host`'s setting (`cc`) for a request over
/// TLS whose client sent `peer`: `Err` with the answer, or `Ok` with the
/// `ssl-client-*` headers set on `headers`.
pub fn check(cc: &Arc<ClientCert>, peer: Option<&PeerCert>, headers: &mut HeaderMap) -> Result<(), Refusal> {
    for name in [
        &SSL_CLIENT_VERIFY,
        &SSL_CLIENT_SUBJECT_DN,
        &SSL_CLIENT_ISSUER_DN,
        &SSL_CLIENT_CERT,
    ] {
        headers.remove(name);
    }
    let verdict = match peer {
        Some(p) if cc.verify != Verify::Off => p.verdict(cc),
        _ => Arc::new(Verdict::new(cc, &[])),
    };
    match (&verdict.result, cc.verify) {
        (None, Verify::On) => return Err(Refusal::NoCertificate),
        (Some(Err(_)), Verify::On | Verify::Optional) => return Err(Refusal::BadCertificate),
        _ => {}
    }
    if let Some(re) = &cc.match_cn {
        if !re.is_match(&verdict.subject) {
            return Err(Refusal::Unauthorized);
        }
    }
    let mut set = |name: &HeaderName, value: &str| {
        if !value.is_empty() {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name.clone(), v);
            }
        }
    };
    set(&SSL_CLIENT_VERIFY, &verdict.status());
    set(&SSL_CLIENT_SUBJECT_DN, &verdict.subject);
    set(&SSL_CLIENT_ISSUER_DN, &verdict.issuer);
    if cc.pass_cert {
        set(&SSL_CLIENT_CERT, &verdict.escaped_pem);
    }
    Ok(())
}

/// The request-path hook: `Some(answer)` when the request is refused.
/// `route_cc` is the matched route's own setting (a denied one answers
/// 503); `hosts` the host-level settings, consulted for TLS requests.
pub fn gate(
    route_cc: Option<&Arc<ClientCert>>,
    hosts: Option<&HostAuth>,
    host: &str,
    peer: Option<&PeerCert>,
    headers: &mut HeaderMap,
) -> Option<Response<ProxyBody>> {
    if route_cc.is_some_and(|cc| cc.denied.is_some()) {
        return Some(Refusal::Denied.response(None));
    }
    let cc = hosts?.get(host)?;
    match check(cc, peer, headers) {
        Ok(()) => None,
        Err(refusal) => {
            tracing::debug!(host, refusal = ?refusal, "client certificate check failed");
            Some(refusal.response(cc.error_page.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::objects;

    struct Ca {
        cert: rcgen::Certificate,
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
    }

    fn ca_params(cn: &str) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Ferry, Inc");
        params
    }

    fn ca() -> Ca {
        ca_named("Test CA")
    }

    fn ca_named(cn: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params(cn);
        Ca {
            cert: params.self_signed(&key).unwrap(),
            params,
            key,
        }
    }

    fn intermediate(parent: &Ca) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params("Intermediate");
        let issuer = rcgen::Issuer::from_params(&parent.params, &parent.key);
        Ca {
            cert: params.signed_by(&key, &issuer).unwrap(),
            params,
            key,
        }
    }

    fn client(ca: &Ca, cn: &str) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        params.signed_by(&key, &issuer).unwrap().der().clone()
    }

    fn b64(data: &[u8]) -> String {
        pem(data)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("")
    }

    fn compile(annotations: &str, ca_pem: &str) -> (Option<Arc<ClientCert>>, Vec<String>) {
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: ca, namespace: default}}\ntype: Opaque\ndata: {{ca.crt: {}}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, annotations: {{{annotations}}}}}\nspec: {{}}\n",
            b64(ca_pem.as_bytes())
        );
        let objs = objects(&yaml);
        let ing = objs
            .iter()
            .find_map(|o| match o {
                ferry_cluster::Object::Ingress(i) => Some((**i).clone()),
                _ => None,
            })
            .unwrap();
        let snap = Snapshot::from_objects(1, objs);
        let mut r = Reader::new(&ing);
        let cc = ClientCert::parse(&snap, &mut r);
        let problems = r.finish().iter().map(|p| p.to_string()).collect();
        (cc, problems)
    }

    #[test]
    fn annotations_parse_with_ingress_nginx_defaults() {
        let pem = ca().cert.pem();
        let s = "nginx.ingress.kubernetes.io/auth-tls-secret: default/ca";
        type Check = fn(&ClientCert) -> bool;
        let cases: Vec<(String, Check, usize)> = vec![
            (
                s.to_string(),
                |c| {
                    c.verify == Verify::On
                        && c.depth == 1
                        && !c.pass_cert
                        && c.error_page.is_none()
                        && c.denied.is_none()
                },
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-verify-client: optional_no_ca"),
                |c| c.verify == Verify::OptionalNoCa,
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-verify-client: maybe"),
                |c| c.verify == Verify::On,
                1,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-verify-depth: '3'"),
                |c| c.depth == 3,
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-verify-depth: '0'"),
                |c| c.depth == 1,
                1,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream: 'true'"),
                |c| c.pass_cert,
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-error-page: 'https://e.test/denied'"),
                |c| c.error_page.as_ref().is_some_and(|p| p == "https://e.test/denied"),
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-error-page: /denied"),
                |c| c.error_page.is_none(),
                1,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-match-cn: 'CN=(alice|bob)'"),
                |c| c.match_cn.as_ref().is_some_and(|r| r.is_match("CN=bob,O=x")),
                0,
            ),
            (
                format!("{s}, nginx.ingress.kubernetes.io/auth-tls-match-cn: alice"),
                |c| c.match_cn.is_none(),
                1,
            ),
            (
                "nginx.ingress.kubernetes.io/auth-tls-secret: ca".to_string(),
                |c| c.denied.as_deref() == Some("\"ca\" is not namespace/name"),
                1,
            ),
            (
                "nginx.ingress.kubernetes.io/auth-tls-secret: default/missing".to_string(),
                |c| c.denied.as_deref() == Some("Secret default/missing not found"),
                1,
            ),
        ];
        for (annotations, ok, problems) in cases {
            let (cc, found) = compile(&annotations, &pem);
            let cc = cc.unwrap_or_else(|| panic!("{annotations}: not set"));
            assert!(ok(&cc), "{annotations}: {cc:?}");
            assert_eq!(found.len(), problems, "{annotations}: {found:?}");
        }
        // Without the secret: nothing, and the others are reported.
        let (cc, found) = compile(
            "nginx.ingress.kubernetes.io/auth-tls-verify-client: 'on', nginx.ingress.kubernetes.io/auth-tls-verify-depth: '2'",
            &pem,
        );
        assert!(cc.is_none());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("without auth-tls-secret"), "{found:?}");
        // A CA bundle without certificates denies.
        let (cc, found) = compile(s, "not a certificate");
        assert_eq!(
            cc.unwrap().denied.as_deref(),
            Some("Secret default/ca ca.crt holds no PEM certificate")
        );
        assert!(found[0].contains("answer 503"), "{found:?}");
    }

    #[test]
    fn request_checks_follow_nginx() {
        let good_ca = ca();
        let other_ca = ca_named("Other CA");
        let (base, _) = compile(
            "nginx.ingress.kubernetes.io/auth-tls-secret: default/ca, nginx.ingress.kubernetes.io/auth-tls-pass-certificate-to-upstream: 'true'",
            &good_ca.cert.pem(),
        );
        let base = base.unwrap();
        let good = PeerCert::new(Some(&[client(&good_ca, "alice")]));
        let bad = PeerCert::new(Some(&[client(&other_ca, "mallory")]));
        let none = PeerCert::new(None);
        let with_depth = |verify: Verify, match_cn: Option<&str>, depth: u32| {
            Arc::new(ClientCert {
                secret: base.secret.clone(),
                verify,
                depth,
                error_page: None,
                pass_cert: true,
                match_cn: match_cn.map(|r| Regex::new(r).unwrap()),
                verifier: base.verifier.clone(),
                ca: base.ca.clone(),
                denied: None,
            })
        };
        let with = |verify: Verify, match_cn: Option<&str>| with_depth(verify, match_cn, 1);
        let run = |cc: &Arc<ClientCert>, peer: &PeerCert| {
            let mut h = HeaderMap::new();
            h.insert(&SSL_CLIENT_VERIFY, HeaderValue::from_static("SUCCESS"));
            check(cc, Some(peer), &mut h).map(|()| h)
        };
        for (verify, peer, want) in [
            (Verify::On, &good, Ok("SUCCESS")),
            (Verify::On, &bad, Err(Refusal::BadCertificate)),
            (Verify::On, &none, Err(Refusal::NoCertificate)),
            (Verify::Optional, &good, Ok("SUCCESS")),
            (Verify::Optional, &bad, Err(Refusal::BadCertificate)),
            (Verify::Optional, &none, Ok("NONE")),
            (
                Verify::OptionalNoCa,
                &bad,
                Ok("FAILED:unable to get local issuer certificate"),
            ),
            (Verify::OptionalNoCa, &none, Ok("NONE")),
            (Verify::Off, &good, Ok("NONE")),
        ] {
            let got = run(&with(verify, None), peer);
            match (got, want) {
                (Ok(h), Ok(status)) => {
                    assert_eq!(h.get(&SSL_CLIENT_VERIFY).unwrap(), status, "{verify:?}");
                    let has_cert = !peer.chain.is_empty() && verify != Verify::Off;
                    assert_eq!(h.contains_key(&SSL_CLIENT_CERT), has_cert, "{verify:?}");
                    assert_eq!(h.contains_key(&SSL_CLIENT_SUBJECT_DN), has_cert, "{verify:?}");
                }
                (Err(e), Err(want)) => assert_eq!(e, want, "{verify:?}"),
                (got, want) => panic!("{verify:?}: got {got:?}, want {want:?}"),
            }
        }
        let h = run(&with(Verify::On, None), &good).unwrap();
        assert_eq!(h.get(&SSL_CLIENT_SUBJECT_DN).unwrap(), "CN=alice");
        assert_eq!(h.get(&SSL_CLIENT_ISSUER_DN).unwrap(), "O=Ferry\\, Inc,CN=Test CA");
        let escaped = h.get(&SSL_CLIENT_CERT).unwrap().to_str().unwrap();
        assert!(escaped.starts_with("-----BEGIN%20CERTIFICATE-----%0A"), "{escaped}");
        assert!(escaped.ends_with("-----END%20CERTIFICATE-----%0A"), "{escaped}");
        assert!(!escaped.contains('/') && !escaped.contains('+') && !escaped.contains('='));
        // match-cn: 403 when the subject does not match.
        assert!(run(&with(Verify::On, Some("CN=alice")), &good).is_ok());
        assert_eq!(
            run(&with(Verify::On, Some("CN=bob")), &good).unwrap_err(),
            Refusal::Unauthorized
        );
        // Depth 1 allows no intermediate; the CA itself sent along is
        // not one.
        let inter = intermediate(&good_ca);
        let chained = PeerCert::new(Some(&[client(&inter, "carol"), inter.cert.der().clone()]));
        assert_eq!(
            run(&with(Verify::On, None), &chained).unwrap_err(),
            Refusal::BadCertificate
        );
        let h = run(&with_depth(Verify::On, None, 2), &chained).unwrap();
        assert_eq!(h.get(&SSL_CLIENT_ISSUER_DN).unwrap(), "O=Ferry\\, Inc,CN=Intermediate");
        let with_root = PeerCert::new(Some(&[client(&good_ca, "alice"), good_ca.cert.der().clone()]));
        assert!(run(&with(Verify::On, None), &with_root).is_ok());
        // A CA of the same name but another key: a signature failure.
        let impostor = PeerCert::new(Some(&[client(&ca(), "alice")]));
        assert_eq!(
            run(&with(Verify::OptionalNoCa, None), &impostor).unwrap()[&SSL_CLIENT_VERIFY],
            "FAILED:certificate signature failure"
        );
    }

    #[test]
    fn refusals_answer_like_nginx() {
        let r = Refusal::NoCertificate.response(None);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let page = HeaderValue::from_static("https://e.test/denied");
        let r = Refusal::BadCertificate.response(Some(&page));
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[http::header::LOCATION], "https://e.test/denied");
        // The error page is for certificate failures only.
        assert_eq!(
            Refusal::Unauthorized.response(Some(&page)).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Refusal::Denied.response(Some(&page)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(escape_uri_component("a-b_c.d~e f/+="), "a-b_c.d~e%20f%2F%2B%3D");
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
    }

    #[test]
    fn hosts_take_the_oldest_setting_and_sni_picks_the_handshake() {
        let pem = ca().cert.pem();
        let ing = |name: &str, created: &str, host: &str, verify: &str| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, creationTimestamp: '{created}', annotations: {{nginx.ingress.kubernetes.io/auth-tls-secret: default/ca, nginx.ingress.kubernetes.io/auth-tls-verify-client: {verify}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: '{host}'\n    http: {{paths: [{{path: /{name}, pathType: Prefix, backend: {{service: {{name: s, port: {{number: 80}}}}}}}}]}}\n---\n"
            )
        };
        let yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: ferry}}\nspec: {{controller: ferry.dev/ingress-controller}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: ca, namespace: default}}\ntype: Opaque\ndata: {{ca.crt: {}}}\n---\n{}{}{}{}",
            b64(pem.as_bytes()),
            ing("young", "2024-01-02T00:00:00Z", "a.test", "'off'"),
            ing("old", "2024-01-01T00:00:00Z", "a.test", "optional"),
            ing("wild", "2024-01-01T00:00:00Z", "*.w.test", "'on'"),
            ing("off", "2024-01-01T00:00:00Z", "off.test", "'off'"),
        );
        let snap = Snapshot::from_objects(1, objects(&yaml));
        let table = crate::routes::compile(&snap, &crate::routes::ClassSelection::default());
        assert!(
            table.problems.iter().all(|p| !p.field.starts_with("metadata")),
            "{:?}",
            table.problems
        );
        let (hosts, problems) = HostAuth::compile(&table);
        assert_eq!(hosts.get("a.test").unwrap().verify, Verify::Optional);
        // The younger Ingress's own setting for a.test is not used: said so.
        let said: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("Ingress default/young metadata.annotations[nginx.ingress.kubernetes.io/auth-tls-secret]: host \"a.test\" checks client certificates as older Ingress default/old says"),
            "{said:?}"
        );
        assert_eq!(hosts.get("*.w.test").unwrap().verify, Verify::On);
        assert!(hosts.get("other.test").is_none());
        for (sni, want) in [
            (Some("a.test"), true),
            (Some("A.TEST."), true),
            (Some("x.w.test"), true),
            (Some("w.test"), false),
            (Some("off.test"), false),
            (Some("other.test"), false),
            (None, false),
        ] {
            assert_eq!(hosts.wants_cert(sni), want, "{sni:?}");
        }
        assert!(HostAuth::default().is_empty() && !hosts.is_empty());
    }
}
