//! The ingress crate's error type.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("generating the self-signed default certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    #[error("writing status of Ingress {ingress}: {source}")]
    Status {
        ingress: String,
        #[source]
        source: kube::Error,
    },
    #[error("opening the access log: {0}")]
    AccessLog(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<rustls::Error> for IngressError {
    fn from(e: rustls::Error) -> Self {
        IngressError::Tls(e.to_string())
    }
}
