//! The DNS crate's error type.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid cluster domain {domain:?}: {reason}")]
    Domain { domain: String, reason: String },
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    ResolvConf { path: String, source: std::io::Error },
    #[error("no upstream nameserver is usable: {0}")]
    NoUpstream(String),
    #[error("upstream {addr}: {reason}")]
    Upstream { addr: SocketAddr, reason: String },
    #[error("encoding a DNS message: {0}")]
    Encode(String),
}
