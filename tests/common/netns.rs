//! Network-namespace topology for privileged e2e tests of the Service proxy
//! (iptables and eBPF modes share it), and helpers to run code inside it.
//!
//! ```text
//!   client ns                node ns                          pod ns × 3
//!   eth0 192.0.2.2/24 ─veth─ ext0 192.0.2.1/24 (node IP)
//!                            br0 10.244.0.1/24 ──veth (hairpin)── eth0 10.244.0.1x/24
//!   client2 ns (add_client2, on demand)
//!   eth0 198.51.100.2/24 ─veth─ ext1 198.51.100.1/24
//! ```
//!
//! Every namespace is made by the test and named `<prefix><pid>-<seq>-<role>`;
//! none has an interface in the host namespace or a route out, so test
//! traffic cannot leave. `Topology`'s Drop kills the servers and deletes
//! the namespaces (which removes their veths and iptables rules too).
//! Pods run a small python3 server answering its own name over TCP (one
//! line per line received, or an HTTP response to `GET`) and UDP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Routed to br0 in the node namespace so node-originated connections to
/// ClusterIPs find a route before nat OUTPUT rewrites them.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` inside namespace `ns`.
pub fn ns_sh(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend(args);
    sh("ip", &full)
}

/// Runs `f` on a new thread that has entered network namespace `ns`
/// (setns is per thread), so std sockets work from inside it.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    });
    handle.join().map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

const SERVER_PY: &str = r#"
import socket, sys, threading
name, tport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
reply = name.encode() + b"\n"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", uport))
def udp():
    while True:
        d, a = u.recvfrom(2048)
        u.sendto(reply, a)
threading.Thread(target=udp, daemon=True).start()
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", tport))
t.listen(512)
def conn(c):
    try:
        f = c.makefile("rb")
        line = f.readline()
        if line.startswith(b"GET "):
            while True:
                l = f.readline()
                if l in (b"\r\n", b"\n", b""):
                    break
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(reply) + reply)
        else:
            while line:
                c.sendall(reply)
                line = f.readline()
    except Exception:
        pass
    c.close()
while True:
    c, _ = t.accept()
    threading.Thread(target=conn, args=(c,), daemon=True).start()
"#;

pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct Topology {
    pub node: String,
    pub client: String,
    base: String,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
    namespaces: Vec<String>,
}

impl Topology {
    /// Builds the namespaces, links and pod servers. `prefix` should be short.
    pub fn new(prefix: &str) -> anyhow::Result<Topology> {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let base = format!("{prefix}{}-{seq}", std::process::id());
        let mut topo = Topology {
            node: format!("{base}-node"),
            client: format!("{base}-cli"),
            base: base.clone(),
            pods: Vec::new(),
            children: Vec::new(),
            namespaces: Vec::new(),
        };
        topo.build(&base)?;
        Ok(topo)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        sh("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ns_sh(name, "ip", &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self, base: &str) -> anyhow::Result<()> {
        let node = self.node.clone();
        let client = self.client.clone();
        self.add_ns(&node)?;
        self.add_ns(&client)?;
        let n = |args: &[&str]| ns_sh(&node, args[0], &args[1..]);
        n(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        n(&["ip", "link", "add", "br0", "type", "bridge"])?;
        n(&["ip", "addr", "add", "10.244.0.1/24", "dev", "br0"])?;
        n(&["ip", "link", "set", "br0", "up"])?;
        // Bridged pod-to-pod replies must pass netfilter to be un-NATed,
        // as CNI bridge plugins require (per namespace since Linux 5.x).
        if n(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]).is_err() {
            eprintln!("note: net.bridge.bridge-nf-call-iptables not settable in the node namespace");
        }
        n(&["ip", "route", "add", SERVICE_CIDR, "dev", "br0"])?;
        // Client link.
        n(&[
            "ip", "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &client,
        ])?;
        n(&["ip", "addr", "add", "192.0.2.1/24", "dev", "ext0"])?;
        n(&["ip", "link", "set", "ext0", "up"])?;
        ns_sh(&client, "ip", &["addr", "add", "192.0.2.2/24", "dev", "eth0"])?;
        ns_sh(&client, "ip", &["link", "set", "eth0", "up"])?;
        for i in 0..3u8 {
            let name = format!("pod{i}");
            let ns = format!("{base}-p{i}");
            self.add_ns(&ns)?;
            let ip = Ipv4Addr::new(10, 244, 0, 10 + i);
            let host_if = format!("vp{i}");
            n(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            n(&["ip", "link", "set", &host_if, "master", "br0"])?;
            n(&["ip", "link", "set", &host_if, "up"])?;
            // Hairpin: a pod reaching itself through a service goes out and
            // back in on the same bridge port.
            n(&["ip", "link", "set", &host_if, "type", "bridge_slave", "hairpin", "on"])?;
            ns_sh(&ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns_sh(&ns, "ip", &["link", "set", "eth0", "up"])?;
            ns_sh(&ns, "ip", &["route", "add", "default", "via", "10.244.0.1"])?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns, "python3", "-c", SERVER_PY, &name])
                .arg(POD_TCP_PORT.to_string())
                .arg(POD_UDP_PORT.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a pod server")?;
            self.children.push(child);
            self.pods.push(Pod { name, ns, ip });
        }
        // Wait until every server answers (bounded).
        for pod in &self.pods {
            let addr = SocketAddr::from((pod.ip, POD_TCP_PORT));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ok = in_netns(&node, move || tcp_name(addr).is_ok())?;
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("pod server {} did not come up", pod.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// A second client namespace on a second node device (ext1,
    /// 198.51.100.1/24), routed to the node IP through it: a client that
    /// reaches the node through another interface. Returns its name.
    pub fn add_client2(&mut self) -> anyhow::Result<String> {
        let client2 = format!("{}-cl2", self.base);
        self.add_ns(&client2)?;
        let node = self.node.clone();
        let n = |args: &[&str]| ns_sh(&node, args[0], &args[1..]);
        n(&[
            "ip", "link", "add", "ext1", "type", "veth", "peer", "name", "eth0", "netns", &client2,
        ])?;
        n(&["ip", "addr", "add", "198.51.100.1/24", "dev", "ext1"])?;
        n(&["ip", "link", "set", "ext1", "up"])?;
        let c = |args: &[&str]| ns_sh(&client2, args[0], &args[1..]);
        c(&["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"])?;
        c(&["ip", "link", "set", "eth0", "up"])?;
        c(&["ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1"])?;
        Ok(client2)
    }

    pub fn pod_ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.pods[i].ip)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One TCP connection: send a line, return the name that answered.
pub fn tcp_name(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"));
    }
    Ok(line.trim().to_string())
}

/// One UDP exchange from a fresh socket (fresh source port, fresh conntrack entry).
pub fn udp_name(addr: SocketAddr) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect(addr)?;
    s.send(b"hi")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// An HTTP GET returning (status line, body) — for health-check ports.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// Names seen over `n` TCP connections (errors as `ERR:<kind>`).
pub fn tcp_names(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| tcp_name(addr).unwrap_or_else(|e| format!("ERR:{:?}", e.kind())))
        .collect()
}

pub fn udp_names(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| udp_name(addr).unwrap_or_else(|e| format!("ERR:{:?}", e.kind())))
        .collect()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
