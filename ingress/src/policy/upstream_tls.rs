//! TLS to the upstream (`backend-protocol: HTTPS`/`GRPCS`, NGINX IC's
//! `ssl-services`) and ingress-nginx's `proxy-ssl-*` annotations, compiled
//! into rustls client configurations once per Ingress.
//!
//! ingress-nginx semantics kept: the certificate is not verified unless
//! `proxy-ssl-verify: "on"`; the CA bundle and the client certificate come
//! from `proxy-ssl-secret` (`namespace/name`, the Ingress's namespace only;
//! `ca.crt`, and `tls.crt`/`tls.key`), and without that Secret the other
//! `proxy-ssl-*` annotations have no effect; SNI is sent only with
//! `proxy-ssl-server-name: "on"`. Differences: the name verified (and sent
//! as SNI) defaults to `<service>.<namespace>.svc` rather than nginx's
//! `$proxy_host`; TLS 1.0/1.1 are not available; `proxy-ssl-verify-depth`
//! is enforced only when set, by counting the intermediates the upstream
//! presents.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ferry_cluster::Snapshot;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion};

use super::{Reader, NGINX};

pub const PROXY_SSL_SECRET: &str = "nginx.ingress.kubernetes.io/proxy-ssl-secret";
pub const PROXY_SSL_VERIFY: &str = "nginx.ingress.kubernetes.io/proxy-ssl-verify";
pub const PROXY_SSL_NAME: &str = "nginx.ingress.kubernetes.io/proxy-ssl-name";
pub const PROXY_SSL_SERVER_NAME: &str = "nginx.ingress.kubernetes.io/proxy-ssl-server-name";
pub const PROXY_SSL_VERIFY_DEPTH: &str = "nginx.ingress.kubernetes.io/proxy-ssl-verify-depth";
pub const PROXY_SSL_PROTOCOLS: &str = "nginx.ingress.kubernetes.io/proxy-ssl-protocols";

/// How one upstream is reached over TLS: the client configuration (ALPN
/// `h2` or `http/1.1`) and the name verified and sent as SNI. Two values
/// are equal when their settings and key material are, so endpoint pools
/// survive reloads and are never shared between different settings.
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// The settings (no key material, only its hash) plus the name and
    /// protocol: the identity of this value.
    key: Arc<str>,
}

impl UpstreamTls {
    /// `tls(verify=…, sni=…, …)`, for `ferry render` (without the hash
    /// of the key material).
    pub fn describe(&self) -> &str {
        self.key.split('#').next().unwrap_or_default()
    }

    /// What identifies these settings (equal ids: equal settings).
    pub fn id(&self) -> Arc<str> {
        self.key.clone()
    }
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for UpstreamTls {}

impl PartialOrd for UpstreamTls {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UpstreamTls {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl Hash for UpstreamTls {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

/// The `proxy-ssl-*` settings of one Ingress, with both client
/// configurations built.
pub struct TlsSettings {
    h1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    name: Option<String>,
    /// The settings, printable.
    key: String,
    /// A hash of the Secret's data: part of the identity, never printed.
    material: u64,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `on`/`off` (any case), as the nginx directives take them.
fn on_off(v: &str) -> Result<bool, String> {
    if v.eq_ignore_ascii_case("on") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("off") {
        Ok(false)
    } else {
        Err("neither \"on\" nor \"off\"".into())
    }
}

/// `TLSv1.2 TLSv1.3` and the like; versions rustls lacks are skipped.
fn protocols(v: &str) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    let mut out = Vec::new();
    for word in v.split_whitespace() {
        match word {
            "TLSv1.2" => out.push(&rustls::version::TLS12),
            "TLSv1.3" => out.push(&rustls::version::TLS13),
            "SSLv2" | "SSLv3" | "TLSv1" | "TLSv1.1" => {}
            other => return Err(format!("unknown protocol {other:?}")),
        }
    }
    if out.is_empty() {
        return Err("no protocol ferry supports (TLSv1.2, TLSv1.3)".into());
    }
    Ok(out)
}

fn hash_bytes(parts: &[&[u8]]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

impl TlsSettings {
    /// Reads every `proxy-ssl-*` annotation (they count as understood
    /// even when unused) and builds the client configurations.
    /// `used`: whether any backend of this Ingress is reached over TLS
    /// (otherwise the annotations are reported as having no effect).
    pub fn parse(snap: &Snapshot, r: &mut Reader<'_>, used: bool) -> Option<TlsSettings> {
        let ns = r.ingress().key.namespace.clone();
        let secret_ref = r.get(PROXY_SSL_SECRET);
        let verify = r.parse(PROXY_SSL_VERIFY, on_off);
        let name = r.parse(PROXY_SSL_NAME, |v| {
            ServerName::try_from(v.to_string())
                .map(|_| v.to_string())
                .map_err(|e| format!("not a server name: {e}"))
        });
        let sni = r.parse(PROXY_SSL_SERVER_NAME, on_off);
        let depth = r.parse(PROXY_SSL_VERIFY_DEPTH, |v| {
            v.parse::<usize>().map_err(|_| "not a non-negative integer".to_string())
        });
        let versions = r.parse(PROXY_SSL_PROTOCOLS, protocols);
        let any_ssl_annotation = secret_ref.is_some()
            || verify.is_some()
            || name.is_some()
            || sni.is_some()
            || depth.is_some()
            || versions.is_some();
        if !used {
            if any_ssl_annotation {
                r.problem(
                    &format!("{NGINX}proxy-ssl-*"),
                    "no backend of this Ingress uses HTTPS or GRPCS; proxy-ssl annotations have no effect",
                );
            }
            return None;
        }

        // Without the Secret, ingress-nginx ignores the other proxy-ssl
        // annotations: TLS without verification, without SNI.
        let mut verify = verify.unwrap_or(false);
        let mut sni = sni.unwrap_or(false);
        let mut name = name;
        let mut depth = depth;
        let mut versions = versions;
        let mut roots: Option<RootCertStore> = None;
        let mut client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> = None;
        let mut material = 0u64;
        match secret_ref {
            None => {
                if any_ssl_annotation {
                    r.problem(
                        PROXY_SSL_SECRET,
                        "not set: as in ingress-nginx, the other proxy-ssl annotations have no effect \
                         (no verification, no SNI)",
                    );
                }
                (verify, sni, name, depth, versions) = (false, false, None, None, None);
            }
            Some(v) => {
                let (secret_ns, secret_name) = v.split_once('/').unwrap_or((ns.as_str(), v));
                if secret_ns != ns {
                    r.problem(
                        PROXY_SSL_SECRET,
                        format!("{v:?}: Secrets of another namespace are refused (as in ingress-nginx)"),
                    );
                    roots = verify.then(RootCertStore::empty);
                } else {
                    match snap.secret(secret_ns, secret_name) {
                        None => {
                            r.problem(PROXY_SSL_SECRET, format!("Secret {secret_ns}/{secret_name} not found"));
                            roots = verify.then(RootCertStore::empty);
                        }
                        Some(secret) => {
                            let ca = secret.get("ca.crt").unwrap_or_default();
                            material = hash_bytes(&[ca, secret.cert_pem(), secret.key_pem()]);
                            let mut store = RootCertStore::empty();
                            for cert in rustls_pemfile::certs(&mut &ca[..]).flatten() {
                                let _ = store.add(cert);
                            }
                            if store.is_empty() && verify {
                                r.problem(
                                    PROXY_SSL_SECRET,
                                    format!("Secret {secret_ns}/{secret_name} has no CA certificate in ca.crt"),
                                );
                            }
                            roots = Some(store);
                            if !secret.cert_pem().is_empty() || !secret.key_pem().is_empty() {
                                match client_cert(secret.cert_pem(), secret.key_pem()) {
                                    Ok(c) => client = Some(c),
                                    Err(e) => r.problem(
                                        PROXY_SSL_SECRET,
                                        format!("Secret {secret_ns}/{secret_name}: {e}; no client certificate sent"),
                                    ),
                                }
                            }
                        }
                    }
                }
            }
        }
        if verify && roots.is_none() {
            // A refused or missing Secret with verification on: no CA, so
            // every handshake fails (ingress-nginx denies the location).
            roots = Some(RootCertStore::empty());
        }
        let versions = versions.unwrap_or_else(|| vec![&rustls::version::TLS13, &rustls::version::TLS12]);
        let key = format!(
            "tls(verify={}{}, sni={}, versions={}, secret={})",
            if verify { "on" } else { "off" },
            depth.map(|d| format!(", depth={d}")).unwrap_or_default(),
            if sni { "on" } else { "off" },
            versions
                .iter()
                .map(|v| format!("{:?}", v.version))
                .collect::<Vec<_>>()
                .join(" "),
            secret_ref.unwrap_or("-"),
        );
        let build = |alpn: &[u8]| -> Result<Arc<ClientConfig>, String> {
            let builder = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&versions)
                .map_err(|e| e.to_string())?;
            let verifier: Arc<dyn ServerCertVerifier> = match (&roots, verify) {
                (Some(store), true) => {
                    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store.clone()), provider())
                        .build()
                        .map_err(|e| e.to_string());
                    match webpki {
                        Ok(v) => Arc::new(Verify { inner: v, depth }),
                        // An empty root store: nothing verifies.
                        Err(_) => Arc::new(Unverified {
                            provider: provider(),
                            accept: false,
                        }),
                    }
                }
                _ => Arc::new(Unverified {
                    provider: provider(),
                    accept: true,
                }),
            };
            let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
            let mut config = match &client {
                Some((certs, key)) => builder
                    .with_client_auth_cert(certs.clone(), key.clone_key())
                    .map_err(|e| e.to_string())?,
                None => builder.with_no_client_auth(),
            };
            config.enable_sni = sni;
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(config))
        };
        match (build(b"http/1.1"), build(b"h2")) {
            (Ok(h1), Ok(h2)) => Some(TlsSettings {
                h1,
                h2,
                name,
                key,
                material,
            }),
            (Err(e), _) | (_, Err(e)) => {
                r.problem(
                    PROXY_SSL_SECRET,
                    format!("TLS client configuration: {e}; backend unreachable"),
                );
                None
            }
        }
    }

    /// The TLS of one upstream: Service `service` in `namespace`, over h2 or
    /// HTTP/1.1.
    pub fn for_service(&self, namespace: &str, service: &str, h2: bool) -> Option<Arc<UpstreamTls>> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => format!("{service}.{namespace}.svc"),
        };
        let server_name = ServerName::try_from(name.clone()).ok()?;
        Some(Arc::new(UpstreamTls {
            config: if h2 { self.h2.clone() } else { self.h1.clone() },
            server_name,
            key: format!(
                "{} name={name} alpn={}#{:016x}",
                self.key,
                if h2 { "h2" } else { "http/1.1" },
                self.material
            )
            .into(),
        }))
    }

    pub fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("upstream {} name={n}", self.key),
            None => format!("upstream {} name=<service>.<namespace>.svc", self.key),
        }
    }
}

fn client_cert(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if certs.is_empty() {
        return Err("tls.crt: no PEM certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("tls.key: {e}"))?
        .ok_or_else(|| "tls.key: no PEM private key".to_string())?;
    Ok((certs, key))
}

/// No chain verification: `accept` every certificate (verification off,
/// as ingress-nginx's default; the handshake signatures are still
/// checked), or refuse every one (verification on without any CA).
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
    accept: bool,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.accept {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// WebPKI verification against the Secret's CAs, with the chain length
/// limited when `proxy-ssl-verify-depth` is set (depth 1: the CA signed
/// the upstream's certificate directly).
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
    depth: Option<usize>,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if let Some(depth) = self.depth {
            if intermediates.len() >= depth.max(1) {
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(DepthExceeded)),
                )));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct DepthExceeded;

impl fmt::Display for DepthExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("certificate chain longer than proxy-ssl-verify-depth")
    }
}

impl std::error::Error for DepthExceeded {}
