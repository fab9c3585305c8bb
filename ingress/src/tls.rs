//! Certificates: the pure compile step `Snapshot` + `RouteTable` →
//! `CertStore`, and the rustls resolver that picks from it by SNI.
//!
//! Each Ingress `spec.tls` entry binds hosts to a `kubernetes.io/tls`
//! Secret. A Secret that is missing or does not parse affects only its
//! hosts: they fall back to the default certificate (from
//! `--default-tls-secret`, else a self-signed one generated at start) and
//! the problem is reported naming the Ingress, Secret and field.
//! Lookup order: exact host, then `*.suffix`, then the default.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_cluster::{ObjectKey, Snapshot};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::IngressError;
use crate::routes::{Problem, RouteTable};

/// Parses a PEM certificate chain and private key into a rustls key,
/// checking that they belong together.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if certs.is_empty() {
        return Err("tls.crt: no PEM certificate".into());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("tls.key: {e}"))?
        .ok_or_else(|| "tls.key: no PEM private key".to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("tls.key: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("tls.key does not match tls.crt: {e}"))?;
    Ok(ck)
}

/// A self-signed certificate for `names` (the default when no
/// `--default-tls-secret` is given). Returns the key and the PEM cert.
pub fn self_signed(names: &[String]) -> Result<(Arc<CertifiedKey>, String), IngressError> {
    let mut names = names.to_vec();
    if names.is_empty() {
        names.push("ferry.invalid".into());
    }
    let ck = rcgen::generate_simple_self_signed(names)?;
    let cert_pem = ck.cert.pem();
    let key =
        certified_key(cert_pem.as_bytes(), ck.signing_key.serialize_pem().as_bytes()).map_err(IngressError::Tls)?;
    Ok((Arc::new(key), cert_pem))
}

/// The certificates to serve, by SNI.
#[derive(Clone)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    pub problems: Vec<Problem>,
    /// Hosts with client-certificate authentication (`auth-tls-*`).
    pub client_auth: Arc<crate::policy::client_cert::HostAuth>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<&String> = self.exact.keys().collect();
        hosts.sort();
        f.debug_struct("CertStore")
            .field("exact", &hosts)
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// A store that serves `default` for every name.
    pub fn with_default(default: Arc<CertifiedKey>) -> CertStore {
        CertStore {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
            problems: Vec::new(),
            client_auth: Arc::default(),
        }
    }

    /// Exact host, then wildcard, then the default certificate.
    pub fn resolve(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else { return self.default.clone() };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some((_, suffix)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(suffix) {
                return k.clone();
            }
        }
        self.default.clone()
    }

    /// Hosts with their own certificate (for `render` and tests).
    pub fn hosts(&self) -> Vec<String> {
        let mut h: Vec<String> = self.exact.keys().cloned().collect();
        h.extend(self.wildcard.keys().map(|s| format!("*.{s}")));
        h.sort();
        h
    }
}

/// Compiles the certificates of `table`'s TLS bindings. `default_secret`
/// (when set and valid) replaces `fallback` as the default certificate.
pub fn compile(
    snap: &Snapshot,
    table: &RouteTable,
    default_secret: Option<&ObjectKey>,
    fallback: &Arc<CertifiedKey>,
) -> CertStore {
    let mut store = CertStore::with_default(fallback.clone());
    let mut parsed: HashMap<ObjectKey, Option<Arc<CertifiedKey>>> = HashMap::new();
    let mut load = |key: &ObjectKey, problems: &mut Vec<Problem>, object: String, field: &str| {
        parsed
            .entry(key.clone())
            .or_insert_with(|| match snap.secret(&key.namespace, &key.name) {
                None => {
                    problems.push(Problem {
                        object: object.clone(),
                        field: field.to_string(),
                        message: format!("TLS Secret {key} not found; using the default certificate"),
                    });
                    None
                }
                Some(s) => match certified_key(s.cert_pem(), s.key_pem()) {
                    Ok(k) => Some(Arc::new(k)),
                    Err(e) => {
                        problems.push(Problem {
                            object: format!("Secret {key}"),
                            field: "data".into(),
                            message: format!("{e}; its hosts get the default certificate"),
                        });
                        None
                    }
                },
            })
            .clone()
    };
    let mut problems = Vec::new();
    if let Some(key) = default_secret {
        if let Some(k) = load(key, &mut problems, "flag".into(), "--default-tls-secret") {
            store.default = k;
        }
    }
    for binding in &table.tls {
        let Some(k) = load(
            &binding.secret,
            &mut problems,
            format!("Ingress {}", binding.ingress),
            "spec.tls[].secretName",
        ) else {
            continue;
        };
        for host in &binding.hosts {
            // The oldest Ingress (bindings come in age order) keeps a host.
            match host.strip_prefix("*.") {
                Some(suffix) => {
                    store.wildcard.entry(suffix.to_string()).or_insert_with(|| k.clone());
                }
                None => {
                    store.exact.entry(host.clone()).or_insert_with(|| k.clone());
                }
            }
        }
    }
    let (client_auth, auth_problems) = crate::policy::client_cert::HostAuth::compile(table);
    problems.extend(auth_problems);
    store.problems = problems;
    store.client_auth = Arc::new(client_auth);
    store
}

/// The rustls side: a lock-free view of the current `CertStore`, swapped on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertStore>,
}

impl CertResolver {
    pub fn new(store: CertStore) -> CertResolver {
        CertResolver {
            current: ArcSwap::from_pointee(store),
        }
    }

    pub fn swap(&self, store: CertStore) {
        self.current.store(Arc::new(store));
    }

    pub fn current(&self) -> Arc<CertStore> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().resolve(hello.server_name()))
    }
}

/// TLS 1.2+ server config with ALPN h2 and http/1.1, certificates from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, IngressError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `server_config`, but asking the client for a certificate (any, or
/// none: it is verified per request, see `policy::client_cert`). Used for
/// the handshakes of hosts with client-certificate authentication.
pub fn server_config_requesting_client_cert(
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ServerConfig>, IngressError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(Arc::new(crate::policy::client_cert::RequestCert::new()))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{compile as compile_routes, ClassSelection};

    fn secret_yaml(name: &str, cert: &str, key: &str) -> String {
        use std::fmt::Write;
        let b64 = |s: &str| {
            // Minimal base64 encoder so the test needs no extra crate.
            const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let bytes = s.as_bytes();
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..4 {
                    if i <= chunk.len() {
                        out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        let mut s = String::new();
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n---\n",
            b64(cert),
            b64(key)
        );
        s
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default_and_bad_secrets_fall_back() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let w = rcgen::generate_simple_self_signed(vec!["*.w.test".to_string()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        let mut yaml = secret_yaml("a", &a.cert.pem(), &a.signing_key.serialize_pem());
        yaml += &secret_yaml("w", &w.cert.pem(), &w.signing_key.serialize_pem());
        // Key of another certificate: rejected, its host gets the default.
        yaml += &secret_yaml("mismatch", &a.cert.pem(), &other.signing_key.serialize_pem());
        yaml += "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: ferry}\nspec: {controller: ferry.dev/ingress-controller}\n---\n";
        yaml += "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\nspec:\n  ingressClassName: ferry\n  tls:\n  - {hosts: [a.test], secretName: a}\n  - {hosts: [\"*.w.test\"], secretName: w}\n  - {hosts: [bad.test], secretName: mismatch}\n  - {hosts: [gone.test], secretName: gone}\n";
        let snap = crate::test_support::snapshot(&yaml);
        let table = compile_routes(&snap, &ClassSelection::default());
        let (fallback, _) = self_signed(&["default.test".into()]).unwrap();
        let store = compile(&snap, &table, None, &fallback);
        let leaf = |sni: Option<&str>| store.resolve(sni).cert[0].clone();
        assert_eq!(leaf(Some("a.test")), a.cert.der().clone());
        assert_eq!(leaf(Some("A.TEST")), a.cert.der().clone());
        assert_eq!(leaf(Some("x.w.test")), w.cert.der().clone());
        assert_eq!(leaf(Some("y.x.w.test")), fallback.cert[0]);
        assert_eq!(leaf(Some("bad.test")), fallback.cert[0]);
        assert_eq!(leaf(Some("gone.test")), fallback.cert[0]);
        assert_eq!(leaf(None), fallback.cert[0]);
        let problems: Vec<String> = store.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("Secret default/mismatch data: tls.key does not match"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("Ingress default/i spec.tls[].secretName: TLS Secret default/gone not found"));

        // --default-tls-secret replaces the generated default.
        let store = compile(&snap, &table, Some(&ObjectKey::new("default", "w")), &fallback);
        assert_eq!(store.resolve(Some("nothing.test")).cert[0], w.cert.der().clone());
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(certified_key(b"not pem", b"not pem").is_err());
        assert!(certified_key(b"", b"").is_err());
    }
}
