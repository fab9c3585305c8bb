//! Privileged tests of the eBPF socket-level load balancer: the real
//! programs loaded into the kernel and attached to a cgroup this test
//! creates, with a client process (this test binary, re-executed) moved into
//! that cgroup, connecting to ClusterIP VIPs in 127.10.0.0/16 that lead to
//! backends listening on 127.0.0.x. Only loopback traffic; the VIPs are in
//! 127/8, so even a failed attach could not send a packet off the host.
//!
//! Skipped (with a message) when not root. Everything made — cgroup, bpffs
//! pin directory, links, maps — is removed by Drop guards, also on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::skip::require_root;
use ferry_cluster::{ObjectKey, Protocol};
use ferry_proxy::ebpf::{self, MapEntries, SockLb};
use ferry_proxy::{Backend, Frontend, FrontendKind, ServiceEntry, ServicePortName, ServiceTable};

const CLIENT_ENV: &str = "FERRY_EBPF_TEST_CLIENT";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cgroup, a bpffs pin directory and the socket LB attached there;
/// removes all three on drop.
struct Env {
    cgroup: PathBuf,
    pins: PathBuf,
    lb: Option<SockLb>,
    /// Third octet of this test's VIP range 127.10.N.0/24.
    net: u8,
}

impl Env {
    fn new() -> Env {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("ferry-ebpf-test-{}-{n}", std::process::id());
        let root = ebpf::cgroup2_root().unwrap().expect("a cgroup2 mount").mount_point;
        let cgroup = root.join(&tag);
        std::fs::create_dir(&cgroup).unwrap();
        let pins = Path::new(ebpf::DEFAULT_BPFFS_DIR).parent().unwrap().join(&tag);
        let mut env = Env {
            cgroup,
            pins,
            lb: None,
            net: (std::process::id() as u8).wrapping_add(n as u8 * 37),
        };
        env.lb = Some(SockLb::open(&env.pins, &env.cgroup).unwrap());
        env
    }

    fn vip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 10, self.net, host)
    }

    fn sync(&mut self, table: &ServiceTable) -> MapEntries {
        let lb = self.lb.as_mut().unwrap();
        let cur = lb.read().unwrap();
        let (next, _) = ebpf::compile(table, &cur);
        lb.apply(&ebpf::diff(&cur, &next)).unwrap();
        assert_eq!(lb.read().unwrap(), next);
        next
    }

    /// Runs this test binary as a client inside the cgroup.
    fn client(&self, script: &str) -> Vec<String> {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "client_process", "--nocapture", "--test-threads=1"])
            .env(CLIENT_ENV, script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only a write(2) of two bytes between fork and exec: no
        // allocation, no locks. Writing "0" moves the writing process.
        unsafe {
            cmd.pre_exec(move || (&procs).write_all(b"0").map(|_| ()));
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "client failed: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            // libtest prints "test client_process ... " without a newline first.
            .filter_map(|l| l.find("RESULT ").map(|i| l[i + 7..].to_string()))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.lb = None;
        let _ = ebpf::cleanup(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// TCP and UDP servers on 127.0.0.x answering their own name.
struct Pod {
    name: String,
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
    stop: Arc<AtomicBool>,
}

impl Pod {
    fn start(name: &str, host: u8) -> Pod {
        let ip = Ipv4Addr::new(127, 0, 0, host);
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let tcp = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        // Same port number for UDP when free, to keep one backend port per pod.
        let udp_sock = UdpSocket::bind((ip, tcp.port()))
            .or_else(|_| UdpSocket::bind((ip, 0)))
            .unwrap();
        let udp = match udp_sock.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (name.to_string(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let n = n.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                    let _ = writeln!(conn, "{n}");
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    while r.read_line(&mut line).map(|x| x > 0).unwrap_or(false) {
                        let _ = writeln!(conn, "{n}");
                        line.clear();
                    }
                });
            }
        });
        let (n, s) = (name.to_string(), stop.clone());
        std::thread::spawn(move || {
            udp_sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::SeqCst) {
                if let Ok((_, from)) = udp_sock.recv_from(&mut buf) {
                    let _ = udp_sock.send_to(n.as_bytes(), from);
                }
            }
        });
        Pod {
            name: name.into(),
            tcp,
            udp,
            stop,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.tcp);
    }
}

fn entry(name: &str, proto: Protocol, vip: Ipv4Addr, port: u16, backends: &[SocketAddrV4]) -> ServiceEntry {
    let backends: Vec<Backend> = backends
        .iter()
        .map(|a| Backend {
            ip: (*a.ip()).into(),
            port: a.port(),
            local: true,
            hairpin: true,
            ready: true,
            serving: true,
            terminating: false,
        })
        .collect();
    ServiceEntry {
        name: ServicePortName {
            service: ObjectKey::new("test", name),
            port: String::new(),
            protocol: proto,
        },
        protocol: proto,
        frontends: vec![Frontend {
            ip: vip.into(),
            port,
            kind: FrontendKind::ClusterIp,
        }],
        local_backends: backends.clone(),
        backends,
        affinity_timeout: None,
        external_local: false,
        internal_local: false,
        health_check_node_port: None,
    }
}

fn table(entries: Vec<ServiceEntry>) -> ServiceTable {
    let mut t = ServiceTable::default();
    for e in entries {
        t.services.insert(e.name.clone(), e);
    }
    t
}

/// Splits result lines `kind name peer` into (names, peers).
fn names_and_peers(lines: &[String], kind: &str) -> (Vec<String>, BTreeSet<String>) {
    let mut names = Vec::new();
    let mut peers = BTreeSet::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f[0], kind, "{l}");
        names.push(f[1].to_string());
        peers.insert(f[2].to_string());
    }
    (names, peers)
}

#[test]
fn tcp_and_udp_through_a_cluster_ip() {
    if !require_root() {
        return;
    }
    let mut env = Env::new();
    let pods: Vec<Pod> = (0..3).map(|i| Pod::start(&format!("pod-{i}"), 2 + i)).collect();
    let vip = env.vip(1);
    let tcp: Vec<SocketAddrV4> = pods.iter().map(|p| p.tcp).collect();
    let udp: Vec<SocketAddrV4> = pods.iter().map(|p| p.udp).collect();
    env.sync(&table(vec![
        entry("web", Protocol::Tcp, vip, 80, &tcp),
        entry("dns", Protocol::Udp, vip, 53, &udp),
    ]));
    let all: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();

    let lines = env.client(&format!("tcp {vip}:80 30"));
    let (names, peers) = names_and_peers(&lines, "tcp");
    assert_eq!(names.len(), 30);
    assert_eq!(
        names.iter().cloned().collect::<BTreeSet<_>>(),
        all,
        "random over 3 backends"
    );
    assert_eq!(
        peers,
        [format!("{vip}:80")].into_iter().collect(),
        "getpeername shows the VIP"
    );

    let lines = env.client(&format!("udpc {vip}:53 30"));
    let (names, peers) = names_and_peers(&lines, "udpc");
    assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(
        peers,
        [format!("{vip}:53")].into_iter().collect(),
        "connected UDP peer is the VIP"
    );

    let lines = env.client(&format!("udpu {vip}:53 30"));
    let (names, peers) = names_and_peers(&lines, "udpu");
    assert_eq!(names.iter().cloned().collect::<BTreeSet<_>>(), all);
    assert_eq!(
        peers,
        [format!("{vip}:53")].into_iter().collect(),
        "recvfrom source is the VIP"
    );
}

#[test]
fn no_backends_is_refused_at_once_and_removal_takes_effect() {
    if !require_root() {
        return;
    }
    let mut env = Env::new();
    let pods: Vec<Pod> = (0..2).map(|i| Pod::start(&format!("pod-{i}"), 5 + i)).collect();
    let vip = env.vip(2);
    env.sync(&table(vec![
        entry("empty", Protocol::Tcp, vip, 80, &[]),
        entry("emptyu", Protocol::Udp, vip, 53, &[]),
        entry("two", Protocol::Tcp, vip, 81, &[pods[0].tcp, pods[1].tcp]),
    ]));
    let lines = env.client(&format!("tcp {vip}:80 3; udpu {vip}:53 1"));
    assert_eq!(
        lines,
        vec![
            "tcp-err ConnectionRefused",
            "tcp-err ConnectionRefused",
            "tcp-err ConnectionRefused",
            "udpu-err ConnectionRefused"
        ]
    );
    // Remove pod-1: every new connection goes to pod-0.
    env.sync(&table(vec![entry("two", Protocol::Tcp, vip, 81, &[pods[0].tcp])]));
    let (names, _) = names_and_peers(&env.client(&format!("tcp {vip}:81 20")), "tcp");
    assert!(names.iter().all(|n| n == "pod-0"), "{names:?}");
    // The removed frontend no longer translates: 127.10.x.x:80 has no listener.
    assert_eq!(
        env.client(&format!("tcp {vip}:80 1")),
        vec!["tcp-err ConnectionRefused"]
    );
}

#[test]
fn client_ip_affinity_pins_a_client() {
    if !require_root() {
        return;
    }
    let mut env = Env::new();
    let pods: Vec<Pod> = (0..3).map(|i| Pod::start(&format!("pod-{i}"), 8 + i)).collect();
    let vip = env.vip(3);
    let mut e = entry(
        "sticky",
        Protocol::Tcp,
        vip,
        80,
        &pods.iter().map(|p| p.tcp).collect::<Vec<_>>(),
    );
    e.affinity_timeout = Some(600);
    env.sync(&table(vec![e]));
    let (names, _) = names_and_peers(&env.client(&format!("tcp {vip}:80 20")), "tcp");
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 1, "{names:?}");
}

#[test]
fn restart_adopts_pins_and_keeps_connections_then_cleanup_removes_all() {
    if !require_root() {
        return;
    }
    let mut env = Env::new();
    let pods: Vec<Pod> = (0..2).map(|i| Pod::start(&format!("pod-{i}"), 11 + i)).collect();
    let vip = env.vip(4);
    let t = table(vec![entry("web", Protocol::Tcp, vip, 80, &[pods[0].tcp, pods[1].tcp])]);
    let entries = env.sync(&t);

    // A client holds a connection while ferry "restarts".
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(env.cgroup.join("cgroup.procs"))
        .unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "client_process", "--nocapture", "--test-threads=1"])
        .env(CLIENT_ENV, format!("hold {vip}:80"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: as in Env::client.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0").map(|_| ()));
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    while !first.contains("RESULT ") {
        first.clear();
        assert!(out.read_line(&mut first).unwrap() > 0, "client ended early");
    }

    env.lb = None; // ferry exits: pins keep links and maps
    let between = env.client(&format!("tcp {vip}:80 4"));
    assert!(between.iter().all(|l| l.starts_with("tcp pod-")), "{between:?}");
    let lb = SockLb::open(&env.pins, &env.cgroup).unwrap();
    assert!(lb.adopted, "restart adopts the pinned links");
    assert_eq!(lb.read().unwrap(), entries, "restart sees the maps as they were");
    let (next, _) = ebpf::compile(&t, &lb.read().unwrap());
    assert!(
        ebpf::diff(&entries, &next).is_empty(),
        "same table after restart: nothing to write"
    );
    env.lb = Some(lb);

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let first_name = first
        .split("RESULT hold ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        rest.contains(&format!("RESULT hold-after {first_name}")),
        "the held connection still talks to {first_name}: {rest}"
    );

    // Cleanup: pins gone, nothing attached to the cgroup, VIP no longer translated.
    env.lb = None;
    assert_eq!(ebpf::cleanup(&env.pins).unwrap(), 8);
    assert!(!env.pins.exists());
    let shown = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&env.cgroup)
        .output()
        .unwrap();
    assert!(shown.status.success());
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(!text.contains("ferry_"), "programs still attached: {text}");
    assert_eq!(
        env.client(&format!("tcp {vip}:80 1")),
        vec!["tcp-err ConnectionRefused"]
    );
}

/// Not a test on its own: the client half, run by the tests above as a
/// separate process inside the test cgroup (selected by an env variable).
#[test]
fn client_process() {
    let Ok(script) = std::env::var(CLIENT_ENV) else {
        return;
    };
    for cmd in script.split(';') {
        let f: Vec<&str> = cmd.split_whitespace().collect();
        let addr: SocketAddr = f[1].parse().unwrap();
        let n: usize = f.get(2).map_or(1, |s| s.parse().unwrap());
        for _ in 0..n {
            match f[0] {
                "tcp" => match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut line = String::new();
                        BufReader::new(&s).read_line(&mut line).unwrap();
                        println!("RESULT tcp {} {}", line.trim(), s.peer_addr().unwrap());
                    }
                    Err(e) => println!("RESULT tcp-err {:?}", e.kind()),
                },
                "udpc" => {
                    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.connect(addr).unwrap();
                    s.send(b"who").unwrap();
                    let mut buf = [0u8; 64];
                    let len = s.recv(&mut buf).unwrap();
                    println!(
                        "RESULT udpc {} {}",
                        String::from_utf8_lossy(&buf[..len]),
                        s.peer_addr().unwrap()
                    );
                }
                "udpu" => {
                    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    if let Err(e) = s.send_to(b"who", addr) {
                        println!("RESULT udpu-err {:?}", e.kind());
                        continue;
                    }
                    let mut buf = [0u8; 64];
                    let (len, from) = s.recv_from(&mut buf).unwrap();
                    println!("RESULT udpu {} {from}", String::from_utf8_lossy(&buf[..len]));
                }
                "hold" => {
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut r = BufReader::new(&s);
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    println!("RESULT hold {} {}", line.trim(), s.peer_addr().unwrap());
                    std::io::stdout().flush().unwrap();
                    let mut go = String::new();
                    std::io::stdin().read_line(&mut go).unwrap();
                    (&s).write_all(b"again\n").unwrap();
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    println!("RESULT hold-after {}", line.trim());
                }
                other => panic!("unknown client command {other}"),
            }
        }
    }
}
