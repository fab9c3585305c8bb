//! What every TCP server of ferry shares (ingress, DNS over TCP, the admin
//! server): listeners with the kernel's largest backlog, and an accept
//! loop that backs off on errors instead of spinning.

use std::net::SocketAddr;
use std::time::Duration;

/// The kernel's cap on a listen backlog (`net.core.somaxconn`); nginx and
/// haproxy ask for at least this much so that bursts are queued, not reset.
pub fn listen_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
}

/// A non-blocking TCP listener on `addr` (SO_REUSEADDR) with
/// `listen_backlog()`, ready for `tokio::net::TcpListener::from_std`.
pub fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(listen_backlog())?;
    Ok(s.into())
}

/// Accept errors (out of file descriptors and the like) are transient:
/// back off exponentially (10 ms .. 1 s) instead of spinning, warning once
/// per run of failures.
#[derive(Debug)]
pub struct AcceptBackoff {
    /// Which server, for the log lines.
    server: &'static str,
    failures: u32,
}

impl AcceptBackoff {
    pub fn new(server: &'static str) -> AcceptBackoff {
        AcceptBackoff { server, failures: 0 }
    }

    pub fn succeeded(&mut self) {
        if self.failures != 0 {
            tracing::info!(server = self.server, failures = self.failures, "accepting again");
            self.failures = 0;
        }
    }

    /// Logs `e` and sleeps before the next accept.
    pub async fn failed(&mut self, e: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!(server = self.server, error = %e, "accept failed; backing off");
        } else {
            tracing::debug!(server = self.server, error = %e, failures = self.failures, "accept failed");
        }
        self.failures = self.failures.saturating_add(1);
        tokio::time::sleep(Self::delay(self.failures)).await;
    }

    fn delay(failures: u32) -> Duration {
        Duration::from_millis(10u64 << failures.min(7)).min(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_and_backoff() {
        assert!(listen_backlog() > 0);
        assert_eq!(AcceptBackoff::delay(1), Duration::from_millis(20));
        assert_eq!(AcceptBackoff::delay(7), Duration::from_secs(1));
        assert_eq!(AcceptBackoff::delay(u32::MAX), Duration::from_secs(1));
    }
}
