//! The DNS server on loopback: real UDP and TCP queries, a small upstream
//! started by the test, failover from an upstream that never answers, the
//! forwarding cache, TC → TCP fallback upstream and to the client, and zone
//! swaps from the snapshot channel.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::files::parse_documents;
use ferry_cluster::Snapshot;
use ferry_dns::{BoundSockets, DnsMetrics, DnsServer, ForwarderConfig, ServerConfig, TcpLimits, ZoneConfig};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn snapshot(gen: u64, text: &str) -> Arc<Snapshot> {
    let objects: Vec<_> = parse_documents(Path::new("t.yaml"), text)
        .into_iter()
        .flat_map(|d| d.unwrap())
        .collect();
    Arc::new(Snapshot::from_objects(gen, objects))
}

const CLUSTER: &str = "
apiVersion: v1
kind: Service
metadata: {name: ngx-svc, namespace: default}
spec:
  clusterIP: 10.96.0.90
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: redis-svc, namespace: default}
spec:
  clusterIP: None
  ports: [{name: redis, port: 6379}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: redis-1, namespace: default, labels: {kubernetes.io/service-name: redis-svc}}
addressType: IPv4
ports: [{name: redis, port: 6379, protocol: TCP}]
endpoints:
- addresses: [10.244.0.10]
  hostname: redis-sts-0
  conditions: {ready: true}
";

/// A tiny authoritative upstream on loopback: `*.test.` A 192.0.2.<n>,
/// where n counts the queries it answered; `big.test.` is truncated over UDP
/// and complete over TCP; everything else NXDOMAIN with an SOA.
struct Upstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

fn upstream_answer(req: &Message, over_tcp: bool) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    let Some(q) = req.queries.first() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp;
    };
    resp.add_query(q.clone());
    let name = q.name().to_ascii().to_ascii_lowercase();
    if name == "big.test." {
        if !over_tcp {
            resp.metadata.truncation = true;
            return resp;
        }
        for i in 0..100u8 {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A::new(198, 51, 100, i)),
            ));
        }
    } else if name.ends_with(".test.") && q.query_type() == RecordType::A {
        resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A::new(192, 0, 2, 1))));
    } else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        let origin = Name::from_ascii("test.").unwrap();
        resp.add_authority(Record::from_rdata(
            origin.clone(),
            60,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                origin.clone(),
                origin,
                1,
                1,
                1,
                1,
                30,
            )),
        ));
    }
    resp
}

/// A UDP socket and a TCP listener on the same free port (the UDP port's
/// TCP twin can be taken by another test running in parallel: try again).
async fn bind_pair() -> (UdpSocket, TcpListener, std::net::SocketAddr) {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp, addr);
        }
    }
    panic!("no port free for both UDP and TCP");
}

async fn start_upstream() -> Upstream {
    let (udp, tcp, addr) = bind_pair().await;
    let udp_queries = Arc::new(AtomicUsize::new(0));
    let tcp_queries = Arc::new(AtomicUsize::new(0));
    let uq = udp_queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                return;
            };
            if let Ok(req) = Message::from_vec(&buf[..n]) {
                uq.fetch_add(1, Ordering::SeqCst);
                let _ = udp.send_to(&upstream_answer(&req, false).to_vec().unwrap(), peer).await;
            }
        }
    });
    let tq = tcp_queries.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else { return };
            let tq = tq.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let Ok(req) = Message::from_vec(&body) else { return };
                tq.fetch_add(1, Ordering::SeqCst);
                let out = upstream_answer(&req, true).to_vec().unwrap();
                let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&out);
                let _ = s.write_all(&framed).await;
            });
        }
    });
    Upstream {
        addr,
        udp_queries,
        tcp_queries,
    }
}

struct Running {
    addr: SocketAddr,
    server: DnsServer,
    tx: tokio::sync::watch::Sender<Option<Arc<Snapshot>>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ferry_dns::DnsError>>,
}

async fn start(upstreams: Vec<SocketAddr>, timeout: Duration) -> Running {
    start_with(upstreams, timeout, TcpLimits::default(), DnsMetrics::default()).await
}

async fn start_with(upstreams: Vec<SocketAddr>, timeout: Duration, tcp: TcpLimits, metrics: DnsMetrics) -> Running {
    let sockets = BoundSockets::bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let addr = sockets.local_addr();
    let cfg = ServerConfig {
        zone: ZoneConfig::default(),
        forwarder: Some(ForwarderConfig {
            upstreams,
            timeout,
            ..ForwarderConfig::default()
        }),
        tcp,
    };
    let server = DnsServer::new(cfg, &[addr], metrics).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(None);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.clone().serve(sockets, rx, cancel.clone()));
    Running {
        addr,
        server,
        tx,
        cancel,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn query_bytes(name: &str, qtype: RecordType, edns: bool) -> (u16, Vec<u8>) {
    let id = fastrand::u16(..);
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    (id, m.to_vec().unwrap())
}

async fn udp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype, false);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
        .await
        .expect("udp answer in time")
        .unwrap();
    assert!(n <= 512, "UDP answer without EDNS within 512 bytes");
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

async fn tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype, true);
    let mut s = TcpStream::connect(server).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).await.unwrap();
    let m = Message::from_vec(&body).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_over_udp_and_tcp_with_servfail_before_the_first_snapshot() {
    let up = start_upstream().await;
    let r = start(vec![up.addr], Duration::from_secs(2)).await;
    // No snapshot yet: cluster names SERVFAIL (never a wrong NXDOMAIN).
    let m = udp(r.addr, "ngx-svc.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(!r.server.zone_loaded());

    r.tx.send(Some(snapshot(1, CLUSTER))).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !r.server.zone_loaded() {
        assert!(tokio::time::Instant::now() < deadline, "zone never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = udp(r.addr, "ngx-svc.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(a_records(&m), vec!["10.96.0.90"]);
    let m = tcp(
        r.addr,
        "redis-sts-0.redis-svc.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(a_records(&m), vec!["10.244.0.10"]);
    let m = tcp(
        r.addr,
        "_redis._tcp.redis-svc.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.additionals.len(), 1);
    let m = udp(r.addr, "ngx-svc.default.svc.cluster.local.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    let m = udp(r.addr, "gone.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // A new snapshot swaps the zone.
    let more = format!(
        "{CLUSTER}---\napiVersion: v1\nkind: Service\nmetadata: {{name: new-svc, namespace: default}}\nspec:\n  clusterIP: 10.96.0.91\n  ports: [{{port: 80}}]\n"
    );
    r.tx.send(Some(snapshot(2, &more))).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = udp(r.addr, "new-svc.default.svc.cluster.local.", RecordType::A).await;
        if m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty() {
            assert_eq!(a_records(&m), vec!["10.96.0.91"]);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new record never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.udp_queries.load(Ordering::SeqCst),
        0,
        "cluster names never go upstream"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_failover_cache_and_tcp_fallback() {
    // An upstream that never answers: bound, never read.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = start_upstream().await;
    let r = start(vec![dead.local_addr().unwrap(), up.addr], Duration::from_millis(300)).await;
    r.tx.send(Some(snapshot(1, CLUSTER))).unwrap();

    let m = udp(r.addr, "www.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(a_records(&m), vec!["192.0.2.1"]);
    assert_eq!(
        up.udp_queries.load(Ordering::SeqCst),
        1,
        "failed over to the live upstream"
    );

    // Cached: the upstream is not asked again; TTL counts down, never up.
    let m = tcp(r.addr, "WWW.test.", RecordType::A).await;
    assert_eq!(a_records(&m), vec!["192.0.2.1"]);
    assert!(m.answers[0].ttl <= 60);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1, "answered from the cache");

    // The live upstream is now preferred: a new name goes straight to it.
    let m = udp(r.addr, "other.test.", RecordType::A).await;
    assert_eq!(a_records(&m), vec!["192.0.2.1"]);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 2);

    // Negative answers are cached too.
    let m = udp(r.addr, "nx.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = udp(r.addr, "nx.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 3);

    // Truncated upstream UDP → upstream TCP; the big answer then does not
    // fit the client's 512 bytes: TC to the client, full answer over TCP.
    let m = udp(r.addr, "big.test.", RecordType::A).await;
    assert!(m.metadata.truncation);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    let m = tcp(r.addr, "big.test.", RecordType::A).await;
    assert_eq!(m.answers.len(), 100);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_when_every_upstream_fails() {
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = start(vec![dead.local_addr().unwrap()], Duration::from_millis(200)).await;
    let m = udp(r.addr, "www.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    r.stop().await;
}

/// Two servers forwarding to each other: the query must come back refused,
/// not bounce until the timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_loop_is_refused() {
    // B forwards to A; A forwards to B (the address is known only after
    // binding, so A gets B through a relay-free trick: bind B first).
    let b_sockets = BoundSockets::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let b_addr = b_sockets.local_addr();
    let a = start(vec![b_addr], Duration::from_secs(2)).await;
    let b_cfg = ServerConfig {
        zone: ZoneConfig::default(),
        forwarder: Some(ForwarderConfig {
            upstreams: vec![a.addr],
            timeout: Duration::from_secs(2),
            ..ForwarderConfig::default()
        }),
        tcp: TcpLimits::default(),
    };
    let b = DnsServer::new(b_cfg, &[b_addr], DnsMetrics::default()).unwrap();
    let (_btx, brx) = tokio::sync::watch::channel(None);
    let b_cancel = CancellationToken::new();
    let b_task = tokio::spawn(b.serve(b_sockets, brx, b_cancel.clone()));
    // A → B → A: A recognizes its own query and refuses it at once (a
    // loop left to the timeouts would end in SERVFAIL instead).
    let m = udp(a.addr, "loop.example.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    b_cancel.cancel();
    tokio::time::timeout(WAIT, b_task).await.unwrap().unwrap().unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_stall_are_closed_by_the_limits() {
    let tcp_limits = TcpLimits {
        idle_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_connections: 16,
    };
    let metrics = DnsMetrics::default();
    let s = start_with(
        vec!["127.0.0.1:9".parse().unwrap()],
        Duration::from_secs(1),
        tcp_limits,
        metrics.clone(),
    )
    .await;
    s.tx.send(Some(snapshot(1, ""))).unwrap();
    let closed = |reason: &'static str| {
        metrics
            .tcp_closed
            .get_or_create(&ferry_dns::metrics::TcpCloseLabels { reason })
            .get()
    };

    // Silent: closed after the idle timeout (EOF to the client).
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(WAIT, silent.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(closed("idle_timeout"), 1);

    // Half a query: closed after the read timeout.
    let mut half = TcpStream::connect(s.addr).await.unwrap();
    half.write_all(&[0, 40, 1, 2]).await.unwrap();
    let n = tokio::time::timeout(WAIT, half.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(closed("read_timeout"), 1);

    // Pipelines queries and never reads a reply: once the socket buffers
    // are full the server's write times out and the connection is closed,
    // so the client's writes fail. Bounded in queries and time.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut pipeliner = socket.connect(s.addr).await.unwrap();
    let (_, q) = query_bytes("kubernetes.default.svc.cluster.local.", RecordType::A, false);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let batch: Vec<u8> = framed.iter().copied().cycle().take(framed.len() * 256).collect();
    let written = tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0..20_000 {
            if pipeliner.write_all(&batch).await.is_err() {
                return i;
            }
        }
        20_000
    })
    .await
    .unwrap();
    assert!(written < 20_000, "the stalled pipeliner was never closed");
    assert_eq!(closed("write_timeout"), 1);

    // The slots came back: a normal TCP query is answered.
    let m = tcp(s.addr, "kubernetes.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    s.stop().await;
}

/// Bursts far larger than a `recvmmsg` batch, from several clients at once,
/// on the two UDP threads of one socket (`ferry_dns::gate`: one owns the
/// socket, the other joins on full batches): every query is answered, once,
/// to its sender, with its ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_larger_than_a_batch_are_all_answered() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: u16 = 100;
    let up = start_upstream().await;
    let r = start(vec![up.addr], Duration::from_secs(2)).await;
    r.tx.send(Some(snapshot(1, CLUSTER))).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !r.server.zone_loaded() {
        assert!(tokio::time::Instant::now() < deadline, "zone never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server = r.addr;
    let answered = tokio::task::spawn_blocking(move || {
        let clients: Vec<std::net::UdpSocket> = (0..CLIENTS)
            .map(|_| {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(WAIT)).unwrap();
                c
            })
            .collect();
        let (_, template) = query_bytes("ngx-svc.default.svc.cluster.local.", RecordType::A, false);
        let mut answered = 0;
        for round in 0..5u16 {
            for c in &clients {
                for k in 0..PER_CLIENT {
                    let mut q = template.clone();
                    q[..2].copy_from_slice(&(round * PER_CLIENT + k).to_be_bytes());
                    c.send_to(&q, server).unwrap();
                }
            }
            for c in &clients {
                let mut seen = vec![false; usize::from(PER_CLIENT)];
                let mut buf = [0u8; 512];
                for _ in 0..PER_CLIENT {
                    let (n, from) = c.recv_from(&mut buf).expect("an answer for every query");
                    assert_eq!(from, server);
                    let m = Message::from_vec(&buf[..n]).unwrap();
                    assert_eq!(a_records(&m), vec!["10.96.0.90"]);
                    let k = usize::from(m.metadata.id - round * PER_CLIENT);
                    assert!(!std::mem::replace(&mut seen[k], true), "answered twice: {k}");
                    answered += 1;
                }
            }
        }
        answered
    })
    .await
    .unwrap();
    assert_eq!(answered, 5 * CLIENTS * usize::from(PER_CLIENT));
    r.stop().await;
}
