//! healthCheckNodePort servers for `externalTrafficPolicy: Local` services.
//!
//! A cloud load balancer probes every node on the service's
//! `healthCheckNodePort` and sends traffic only to nodes answering 200, i.e.
//! nodes with at least one local endpoint; the others answer 503. The body
//! follows kube-proxy's: `{"service":{...},"localEndpoints":N}`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ferry_cluster::ObjectKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::table::HealthCheck;

struct Server {
    service: Arc<Mutex<ObjectKey>>,
    local_endpoints: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// The set of running health-check servers, reconciled against the table.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

/// The HTTP response for a service with `n` local endpoints.
pub fn response(service: &ObjectKey, n: usize) -> String {
    let body = format!(
        "{{\"service\":{{\"namespace\":\"{}\",\"name\":\"{}\"}},\"localEndpoints\":{n}}}\n",
        service.namespace, service.name
    );
    let status = if n > 0 { "200 OK" } else { "503 Service Unavailable" };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

impl HealthCheckServers {
    /// Starts, updates and stops servers so that exactly `wanted` run. Must
    /// be called inside a tokio runtime. A port that cannot be bound is
    /// logged (naming the service) and retried on the next update.
    pub async fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(s) = self.servers.remove(&port) {
                s.task.abort();
            }
        }
        for (port, hc) in wanted {
            if let Some(s) = self.servers.get(port) {
                s.local_endpoints.store(hc.local_endpoints, Ordering::Relaxed);
                if let Ok(mut k) = s.service.lock() {
                    *k = hc.service.clone();
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(service = %hc.service, port, error = %e, "cannot bind healthCheckNodePort");
                    continue;
                }
            };
            let service = Arc::new(Mutex::new(hc.service.clone()));
            let local_endpoints = Arc::new(AtomicUsize::new(hc.local_endpoints));
            let (svc, count) = (service.clone(), local_endpoints.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    };
                    let key = svc.lock().map(|k| k.clone()).unwrap_or_else(|_| ObjectKey::new("", ""));
                    let n = count.load(Ordering::Relaxed);
                    tokio::spawn(async move {
                        // Read the request head (bounded); any path gets the answer.
                        let read =
                            tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut stream)).await;
                        if matches!(read, Ok(Ok(()))) {
                            let _ = stream.write_all(response(&key, n).as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                    });
                }
            });
            tracing::info!(service = %hc.service, port, "healthCheckNodePort server started");
            self.servers.insert(
                *port,
                Server {
                    service,
                    local_endpoints,
                    task,
                },
            );
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

/// Reads until the blank line ending an HTTP request head (at most 8 KiB),
/// so the answer is not sent (and the socket closed) mid-request.
async fn read_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(port: u16) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_200_with_local_endpoints_and_503_without() {
        // Find a free port on loopback first.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut servers = HealthCheckServers::default();
        let key = ObjectKey::new("ns", "lb");
        let mut wanted = BTreeMap::new();
        wanted.insert(
            port,
            HealthCheck {
                service: key.clone(),
                local_endpoints: 2,
            },
        );
        servers.update(&wanted).await;
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"localEndpoints\":2"), "{r}");
        assert!(r.contains("\"name\":\"lb\""), "{r}");
        wanted.get_mut(&port).unwrap().local_endpoints = 0;
        servers.update(&wanted).await;
        let r = get(port).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        servers.update(&BTreeMap::new()).await;
        assert!(servers.ports().is_empty());
    }
}
