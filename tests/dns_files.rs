//! `ferry dns -f DIR` as a black box: real UDP/TCP queries on loopback,
//! the zone following file changes, forwarding to an upstream started by
//! the test (never the machine's resolv.conf), admin endpoints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

const WAIT: Duration = Duration::from_secs(20);

const NGX: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: ngx-svc}\nspec:\n  clusterIP: 10.96.0.90\n  ports: [{port: 80}]\n";

struct Ferry {
    child: Child,
    dns: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ferry dns` on ephemeral loopback ports and reads the bound
/// addresses from its JSON log.
fn start(dir: &std::path::Path, upstream: SocketAddr) -> Ferry {
    // The admin server logs the address it was given, not the bound one:
    // reserve an ephemeral port for it.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--log-format", "json", "dns", "-f"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--dns-workers", "2"])
        .args(["--admin-addr", &admin.to_string()])
        .args([
            "--upstream",
            &upstream.to_string(),
            "--upstream-timeout-ms",
            "500",
            "--debounce-ms",
            "20",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut dns = None;
    let deadline = Instant::now() + WAIT;
    while dns.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("ferry logs its addresses");
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let addr = v["fields"]["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
        if v["fields"]["message"].as_str() == Some("dns: bound") {
            dns = addr;
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ferry {
        child,
        dns: dns.unwrap(),
        admin,
    }
}

fn query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let id = (std::process::id() as u16) ^ (Instant::now().elapsed().subsec_nanos() as u16);
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, id);
    r
}

fn tcp_query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(99, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let bytes = m.to_vec().unwrap();
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&(bytes.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&bytes).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).unwrap();
    Message::from_vec(&body).unwrap()
}

fn addresses(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

/// Polls until `name` answers with exactly `want`.
fn wait_for(server: SocketAddr, name: &str, want: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = query(server, name, RecordType::A);
        if m.metadata.response_code == ResponseCode::NoError && addresses(&m) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never answered {want:?}; last {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A one-thread upstream on loopback answering `*.test.` A 192.0.2.7.
fn upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.recursion_available = true;
            if let Some(q) = req.queries.first() {
                resp.add_query(q.clone());
                resp.add_answer(Record::from_rdata(q.name().clone(), 30, RData::A(A::new(192, 0, 2, 7))));
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer);
        }
    });
    addr
}

#[test]
fn serves_the_zone_follows_file_changes_and_forwards() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ngx.yaml"), NGX).unwrap();
    let up = upstream();
    let ferry = start(dir.path(), up);

    wait_for(ferry.dns, "ngx-svc.default.svc.cluster.local.", &["10.96.0.90"]);
    let m = tcp_query(ferry.dns, "ngx-svc.default.svc.cluster.local.", RecordType::A);
    assert_eq!(addresses(&m), vec!["10.96.0.90"]);
    let m = query(
        ferry.dns,
        "redis-sts-0.redis-svc.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // A new file: the StatefulSet example.
    std::fs::write(
        dir.path().join("redis.yaml"),
        include_str!("../examples/redis/redis.yaml"),
    )
    .unwrap();
    wait_for(
        ferry.dns,
        "redis-sts-0.redis-svc.default.svc.cluster.local.",
        &["10.244.0.10"],
    );
    // An edited file: the ClusterIP changes.
    std::fs::write(dir.path().join("ngx.yaml"), NGX.replace("10.96.0.90", "10.96.0.95")).unwrap();
    wait_for(ferry.dns, "ngx-svc.default.svc.cluster.local.", &["10.96.0.95"]);

    // Outside the zone: forwarded to the test's upstream.
    let m = query(ferry.dns, "www.test.", RecordType::A);
    assert_eq!(addresses(&m), vec!["192.0.2.7"]);

    assert!(http_get(ferry.admin, "/readyz").contains("dns-zone ok"));
    let metrics = http_get(ferry.admin, "/metrics");
    assert!(
        metrics.contains("ferry_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("ferry_dns_zone_records"), "{metrics}");
}

#[test]
fn render_prints_the_zone_as_a_master_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["render", "--what", "zone", "-f", "examples/redis"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("redis-sts-0.redis-svc.default.svc.cluster.local. 5 IN A 10.244.0.10"),
        "{text}"
    );
    assert!(text.contains("_redis._tcp.redis-svc.default.svc.cluster.local. 5 IN SRV 0 50 6379 redis-sts-0.redis-svc.default.svc.cluster.local."), "{text}");
}
