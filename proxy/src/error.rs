//! The proxy crate's error type: what can go wrong applying a ServiceTable.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A helper binary (iptables-restore, conntrack, ...) could not be started.
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper binary ran and failed; `stderr` is what it said.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The requested dataplane or backend cannot run here.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}
