//! The serving step: sockets, the `ArcSwap<Zone>` the request path reads
//! without locks, and the task that rebuilds the zone for each snapshot.
//!
//! UDP is served by blocking threads (one per core by default, at most 4,
//! `crate::udp::default_workers`) that all read one socket: a thread takes
//! every queued request with one `recvmmsg` and sends the replies with one
//! `sendmmsg` (`crate::udp`), no executor in between. One socket shared by
//! the threads, not one SO_REUSEPORT socket each: SO_REUSEPORT ties every
//! client (by its address hash) to one thread's socket, so when that thread
//! is descheduled on a busy node its clients' queries wait (or overflow)
//! while another thread idles. On the shared socket one thread at a time
//! waits in the kernel; the others stand by and join when requests come
//! faster than it answers them or when it is descheduled (`crate::gate`).
//! Forwarded queries leave the thread as tokio tasks, so a slow
//! upstream never stalls cluster answers. TCP is served by tokio, one task
//! per connection.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ferry_cluster::SnapshotRx;
use hickory_proto::op::ResponseCode;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::error::DnsError;
use crate::forward::{Forwarder, ForwarderConfig};
use crate::gate::{Gate, Standby, Turn};
use crate::metrics::DnsMetrics;
use crate::udp::Batch;
use crate::wire::{self, Buffers, Context, Handled, Outcome, Request, Transport};
use crate::zone::{name_key, Zone, ZoneConfig};

/// How often a UDP thread wakes to notice cancellation.
const UDP_POLL: Duration = Duration::from_millis(200);

/// What one DNS-over-TCP client may hold, and for how long (CoreDNS's
/// server defaults: read 3 s, write 5 s, idle 10 s).
#[derive(Debug, Clone)]
pub struct TcpLimits {
    /// Before the first byte of the next query (and after accept).
    pub idle_timeout: Duration,
    /// From a query's first byte to its last.
    pub read_timeout: Duration,
    /// For a reply to be taken by the client: a client that pipelines
    /// queries and never reads its replies is closed after this.
    pub write_timeout: Duration,
    /// At most this many TCP connections at once; more wait in the backlog.
    pub max_connections: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            idle_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub zone: ZoneConfig,
    /// `None`: answer the zone only and REFUSE other names.
    pub forwarder: Option<ForwarderConfig>,
    pub tcp: TcpLimits,
}

/// The listening sockets, bound before the server starts so that errors
/// (port in use, no permission) surface to the caller.
pub struct BoundSockets {
    /// One UDP socket that every UDP thread reads (see the module comment).
    udp: Arc<UdpSocket>,
    workers: usize,
    tcp: TcpListener,
    local: SocketAddr,
}

impl BoundSockets {
    /// Binds one UDP socket, for `workers` threads, and one TCP listener on
    /// `listen`. With port 0 the kernel picks one port for both.
    pub fn bind(listen: SocketAddr, workers: usize) -> Result<BoundSockets, DnsError> {
        let workers = workers.max(1);
        let attempts = if listen.port() == 0 { 20 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            match Self::try_bind(listen, workers) {
                Ok(b) => return Ok(b),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(DnsError::Bind {
            proto: "udp",
            addr: listen,
            source: std::io::Error::other("no attempt made"),
        }))
    }

    fn try_bind(listen: SocketAddr, workers: usize) -> Result<BoundSockets, DnsError> {
        let udp_err = |source| DnsError::Bind {
            proto: "udp",
            addr: listen,
            source,
        };
        let udp = udp_socket(listen).map_err(udp_err)?;
        let local = udp.local_addr().map_err(udp_err)?;
        let tcp = ferry_cluster::net::tcp_listener(local).map_err(|source| DnsError::Bind {
            proto: "tcp",
            addr: local,
            source,
        })?;
        Ok(BoundSockets {
            udp: Arc::new(udp),
            workers,
            tcp,
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Room for bursts while a thread is busy.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(UDP_POLL))?;
    Ok(s)
}

struct State {
    tcp: TcpLimits,
    zone: ArcSwapOption<Zone>,
    zone_cfg: ZoneConfig,
    cluster_key: Vec<u8>,
    forwarder: Option<Forwarder>,
    metrics: DnsMetrics,
}

/// Cheap to clone: a handle on the shared state.
#[derive(Clone)]
pub struct DnsServer {
    state: Arc<State>,
}

impl DnsServer {
    /// `own` are the addresses we listen on, never used as upstreams.
    pub fn new(cfg: ServerConfig, own: &[SocketAddr], metrics: DnsMetrics) -> Result<DnsServer, DnsError> {
        // Validates the domain now rather than at the first snapshot.
        let empty = Zone::build(&ferry_cluster::Snapshot::default(), &cfg.zone)?;
        let cluster_key = name_key(empty.origin());
        let forwarder = match cfg.forwarder {
            Some(f) => Some(Forwarder::new(f, own, metrics.clone())?),
            None => None,
        };
        Ok(DnsServer {
            state: Arc::new(State {
                tcp: cfg.tcp,
                zone: ArcSwapOption::empty(),
                zone_cfg: cfg.zone,
                cluster_key,
                forwarder,
                metrics,
            }),
        })
    }

    /// Installs a zone (the snapshot follower does this; tests may too).
    pub fn set_zone(&self, zone: Zone) {
        let m = &self.state.metrics;
        m.zone_names.set(i64::try_from(zone.name_count()).unwrap_or(i64::MAX));
        m.zone_records
            .set(i64::try_from(zone.record_count()).unwrap_or(i64::MAX));
        m.zone_generation
            .set(i64::try_from(zone.generation()).unwrap_or(i64::MAX));
        m.zone_builds.inc();
        self.state.zone.store(Some(Arc::new(zone)));
    }

    pub fn zone(&self) -> Option<Arc<Zone>> {
        self.state.zone.load_full()
    }

    /// Addresses that are ferry itself, never to be forwarded to.
    pub fn forbid_upstreams(&self, ips: Vec<std::net::IpAddr>) {
        if let Some(f) = &self.state.forwarder {
            f.forbid(ips);
        }
    }

    /// Readiness: a zone from a snapshot is being served.
    pub fn zone_loaded(&self) -> bool {
        self.state.zone.load().is_some()
    }

    /// The request path for one packet (everything but forwarding).
    pub fn answer(&self, packet: &[u8], transport: Transport) -> Outcome {
        let zone = self.state.zone.load();
        let ctx = Context {
            cluster_key: &self.state.cluster_key,
            transport,
            recursion: self.state.forwarder.is_some(),
        };
        let out = wire::handle(packet, zone.as_deref(), ctx);
        match &out {
            Outcome::Reply { qtype, rcode, .. } => self.state.metrics.query(*qtype, *rcode),
            Outcome::Drop => {
                self.state.metrics.dropped.inc();
            }
            Outcome::Forward(_) => {}
        }
        out
    }

    /// `answer` with buffers reused across requests; a reply is left in
    /// `bufs.reply`.
    pub fn answer_into(&self, packet: &[u8], transport: Transport, bufs: &mut Buffers) -> Handled {
        let zone = self.state.zone.load();
        let ctx = Context {
            cluster_key: &self.state.cluster_key,
            transport,
            recursion: self.state.forwarder.is_some(),
        };
        let out = wire::handle_into(packet, zone.as_deref(), ctx, bufs);
        match &out {
            Handled::Reply { qtype, rcode } => self.state.metrics.query(*qtype, *rcode),
            Handled::Drop => {
                self.state.metrics.dropped.inc();
            }
            Handled::Forward(_) => {}
        }
        out
    }

    /// Forwards a request that is not ours and returns the reply bytes.
    pub async fn forward(&self, req: Request) -> Vec<u8> {
        let qtype = Some(req.query.query_type());
        let (bytes, rcode) = match &self.state.forwarder {
            None => (wire::error_reply(&req, ResponseCode::Refused), ResponseCode::Refused),
            Some(f) if f.is_own_query(&req) => {
                self.state.metrics.loops_refused.inc();
                tracing::warn!(name = %req.query.name(), "dns: our own forwarded query came back to us (forwarding loop); refused");
                (wire::error_reply(&req, ResponseCode::Refused), ResponseCode::Refused)
            }
            Some(f) => match f.resolve(&req).await {
                Ok(msg) => (wire::forwarded_reply(&req, &msg), msg.metadata.response_code),
                Err(e) => {
                    tracing::debug!(name = %req.query.name(), error = %e, "dns: forwarding failed");
                    (wire::error_reply(&req, ResponseCode::ServFail), ResponseCode::ServFail)
                }
            },
        };
        self.state.metrics.query(qtype, rcode);
        bytes
    }

    /// Serves until `cancel` fires: rebuilds the zone on every snapshot and
    /// answers on `sockets`.
    pub async fn serve(
        self,
        sockets: BoundSockets,
        snapshots: SnapshotRx,
        cancel: CancellationToken,
    ) -> Result<(), DnsError> {
        let follower = tokio::spawn(self.clone().follow_snapshots(snapshots, cancel.clone()));
        let served = self.serve_sockets(sockets, cancel).await;
        let _ = follower.await;
        served
    }

    /// Answers on `sockets` until `cancel` fires, with the zone that the
    /// `serve` task keeps current: how more addresses (the cluster DNS
    /// Service's ClusterIPs) are served by the same server.
    pub async fn serve_sockets(self, sockets: BoundSockets, cancel: CancellationToken) -> Result<(), DnsError> {
        let handle = tokio::runtime::Handle::current();
        let gate = Arc::new(Gate::new(sockets.workers));
        let mut threads = Vec::new();
        for i in 0..sockets.workers {
            let sock = sockets.udp.clone();
            let server = self.clone();
            let thread_cancel = cancel.clone();
            let handle = handle.clone();
            let gate = gate.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-dns-udp-{i}"))
                .spawn(move || server.udp_loop(sock, gate, handle, thread_cancel));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    cancel.cancel();
                    return Err(DnsError::Bind {
                        proto: "udp",
                        addr: sockets.local,
                        source: e,
                    });
                }
            }
        }
        let tcp = tokio::net::TcpListener::from_std(sockets.tcp).map_err(|source| DnsError::Bind {
            proto: "tcp",
            addr: sockets.local,
            source,
        })?;
        tracing::info!(addr = %sockets.local, udp_workers = threads.len(), "dns server listening");
        self.tcp_accept_loop(tcp, cancel.clone()).await;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        Ok(())
    }

    async fn follow_snapshots(self, mut rx: SnapshotRx, cancel: CancellationToken) {
        loop {
            let snap = rx.borrow_and_update().clone();
            if let Some(snap) = snap {
                let cfg = self.state.zone_cfg.clone();
                match tokio::task::spawn_blocking(move || Zone::build(&snap, &cfg)).await {
                    Ok(Ok(zone)) => {
                        tracing::debug!(
                            generation = zone.generation(),
                            names = zone.name_count(),
                            "dns: zone rebuilt"
                        );
                        self.set_zone(zone);
                        // Building freed far more than the zone keeps (the
                        // old zone, strings of the build); give those pages
                        // back rather than keep them resident until reused.
                        let _ = tokio::task::spawn_blocking(release_free_memory).await;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "dns: zone build failed; the last good zone keeps serving")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "dns: zone build task failed; the last good zone keeps serving")
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() {
                    // The source is gone; keep serving the last zone until cancelled.
                    cancel.cancelled().await;
                    return;
                },
            }
        }
    }

    fn udp_loop(
        &self,
        sock: Arc<UdpSocket>,
        gate: Arc<Gate>,
        handle: tokio::runtime::Handle,
        cancel: CancellationToken,
    ) {
        let mut batch = Batch::default();
        let mut bufs = Buffers::default();
        let mut standby = Standby::default();
        while !cancel.is_cancelled() {
            let turn = gate.turn(&mut standby);
            let received = match turn {
                Turn::Own | Turn::Wait => batch.recv(&sock),
                Turn::Help => batch.try_recv(&sock),
                Turn::Pass => continue,
            };
            let n = match received {
                Ok(n) => n,
                Err(e) => {
                    if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                        tracing::debug!(error = %e, "dns: udp recv");
                    }
                    0
                }
            };
            gate.took(n, &mut standby, turn);
            self.answer_batch(&mut batch, n, &mut bufs, &sock, &handle);
            if turn == Turn::Own {
                gate.answered();
            }
        }
    }

    /// Answers the `n` requests of `batch` and sends the replies.
    fn answer_batch(
        &self,
        batch: &mut Batch,
        n: usize,
        bufs: &mut Buffers,
        sock: &Arc<UdpSocket>,
        handle: &tokio::runtime::Handle,
    ) {
        for i in 0..n {
            let Some(packet) = batch.request(i) else {
                // Larger than any query: dropped like other garbage.
                self.state.metrics.dropped.inc();
                continue;
            };
            match self.answer_into(packet, Transport::Udp, bufs) {
                Handled::Reply { .. } => batch.reply(i, &bufs.reply),
                Handled::Forward(req) => {
                    let Some(peer) = batch.peer(i) else { continue };
                    let server = self.clone();
                    let sock = sock.clone();
                    handle.spawn(async move {
                        let bytes = server.forward(req).await;
                        let _ = sock.send_to(&bytes, peer);
                    });
                }
                Handled::Drop => {}
            }
        }
        batch.send(sock);
    }

    async fn tcp_accept_loop(&self, listener: tokio::net::TcpListener, cancel: CancellationToken) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.state.tcp.max_connections.max(1)));
        let mut backoff = ferry_cluster::net::AcceptBackoff::new("dns-tcp");
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => {
                        backoff.succeeded();
                        s
                    }
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                },
            };
            let server = self.clone();
            let cancel = cancel.clone();
            let span = tracing::debug_span!("dns_tcp", %peer);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    server.tcp_connection(stream, cancel).await;
                    drop(permit);
                },
                span,
            ));
        }
    }

    /// Serves one TCP connection until the client closes it or a limit does.
    async fn tcp_connection(&self, mut stream: tokio::net::TcpStream, cancel: CancellationToken) {
        if let Err(why) = self.tcp_exchanges(&mut stream, cancel).await {
            // Counted before the client can see the close.
            self.state.metrics.tcp_closed(why);
            tracing::debug!(reason = why, "dns: tcp connection closed");
        }
    }

    /// Query/reply exchanges on one connection; `Err` names the limit that
    /// ended them.
    async fn tcp_exchanges(
        &self,
        stream: &mut tokio::net::TcpStream,
        cancel: CancellationToken,
    ) -> Result<(), &'static str> {
        let limits = &self.state.tcp;
        let mut buf = vec![0u8; 65535];
        loop {
            let mut len = [0u8; 2];
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = tokio::time::timeout(limits.idle_timeout, stream.read(&mut len[..1])) => r,
            };
            match first {
                Err(_) => return Err("idle_timeout"),
                Ok(Ok(1)) => {}
                Ok(_) => return Ok(()),
            }
            let n_left = match tokio::time::timeout(limits.read_timeout, async {
                stream.read_exact(&mut len[1..]).await?;
                let n = usize::from(u16::from_be_bytes(len));
                match buf.get_mut(..n) {
                    Some(body) => stream.read_exact(body).await.map(|_| n),
                    None => Ok(0),
                }
            })
            .await
            {
                Err(_) => return Err("read_timeout"),
                Ok(Err(_)) => return Ok(()),
                Ok(Ok(n)) => n,
            };
            let Some(body) = buf.get(..n_left) else { return Ok(()) };
            let bytes = match self.answer(body, Transport::Tcp) {
                Outcome::Reply { bytes, .. } => bytes,
                Outcome::Forward(req) => self.forward(req).await,
                Outcome::Drop => return Ok(()),
            };
            let Ok(out_len) = u16::try_from(bytes.len()) else {
                return Ok(());
            };
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&out_len.to_be_bytes());
            framed.extend_from_slice(&bytes);
            match tokio::time::timeout(limits.write_timeout, stream.write_all(&framed)).await {
                Err(_) => return Err("write_timeout"),
                Ok(Err(_)) => return Ok(()),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Returns freed heap pages of every malloc arena to the kernel (glibc keeps
/// them otherwise, and a zone rebuild frees tens of megabytes at once).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
