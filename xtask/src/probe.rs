//! `cargo xtask probe`: hostile clients against a running `ferry serve` and
//! `ferry dns` on loopback (issue 14), one table row per probe. ferry runs
//! with 2 s timeouts so that the whole probe takes about a minute; the rows
//! say what each client held and for how long. Every client is bounded in
//! count and time; all traffic goes to 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::child::Stopped;

/// The timeouts ferry runs with during the probe.
const LIMIT: Duration = Duration::from_secs(2);
const CAP: usize = 2000;
const HOST: &str = "probe.test";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on {addr}")
}

/// A backend answering `name`, the request line, and: `/big` a 64 MiB body
/// (setting `released` when the proxy closes it mid-body), `/slow` after
/// 200 ms. Counts the connections it accepts.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    released: Arc<AtomicBool>,
}

fn backend(name: &'static str) -> anyhow::Result<Backend> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let released = Arc::new(AtomicBool::new(false));
    let (a, r) = (accepted.clone(), released.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            a.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            std::thread::spawn(move || backend_conn(s, name, &r));
        }
    });
    Ok(Backend {
        addr,
        accepted,
        released,
    })
}

fn backend_conn(mut s: TcpStream, name: &str, released: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Bounded: one request per turn, the connection times out when idle.
    for _ in 0..100_000 {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let line = head.lines().next().unwrap_or("").to_string();
        // Read the body like an application would (Content-Length only).
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        if line.contains(" /big ") {
            let size = 64usize << 20;
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
            let data = vec![b'x'; 64 * 1024];
            for _ in 0..size / data.len() {
                if s.write_all(&data).is_err() {
                    released.store(true, Ordering::SeqCst);
                    return;
                }
            }
            continue;
        }
        if line.contains(" /slow") {
            std::thread::sleep(Duration::from_millis(200));
        }
        let body = format!("{name}\n{line}\n");
        if write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).is_err() {
            return;
        }
    }
}

fn manifests(admin: SocketAddr, public: SocketAddr) -> String {
    let svc = |name: &str, b: SocketAddr| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-0, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"127.0.0.1\"]\n---\n",
            b.port()
        )
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: probe}}\nspec: {{controller: ferry.dev/ingress-controller}}\n---\n{}{}apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: probe}}\nspec:\n  ingressClassName: probe\n  rules:\n  - host: {HOST}\n    http:\n      paths:\n      - {{path: /admin, pathType: Prefix, backend: {{service: {{name: admin, port: {{number: 80}}}}}}}}\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: public, port: {{number: 80}}}}}}}}\n",
        svc("admin", admin),
        svc("public", public)
    )
}

/// Reads until the peer closes; the time it took, or `None` past `within`.
fn time_to_close(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16 * 1024];
    while started.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// One request on a new connection; the status and body.
fn request(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(raw).is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Opens `n` connections that each run `client`; (closed within the
/// bound, median seconds to close).
fn many(addr: SocketAddr, n: usize, within: Duration, client: fn(&mut TcpStream)) -> (usize, f64) {
    let mut conns: Vec<TcpStream> = (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    for c in &mut conns {
        client(c);
    }
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| std::thread::spawn(move || time_to_close(&mut c, within)))
        .collect();
    let mut times: Vec<f64> = handles
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .map(|d| d.as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    (times.len(), median)
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS for `GET http://probe.test{path}` (HPACK static entries and one
/// literal authority), END_HEADERS, no END_STREAM.
fn headers(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x44, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, HOST.len() as u8]);
    block.extend_from_slice(HOST.as_bytes());
    frame(1, 0x4, stream, &block)
}

/// An h2c connection with the preface and empty SETTINGS sent.
fn h2c(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.write_all(PREFACE).ok()?;
    s.write_all(&frame(4, 0, 0, &[])).ok()?;
    Some(s)
}

/// The error code of the first GOAWAY read from `s` before it closes.
fn goaway_code(s: &mut TcpStream, within: Duration) -> Option<u32> {
    let started = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while started.elapsed() < within {
        // Parse whole frames in the buffer.
        while buf.len() >= 9 {
            let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == 7 && len >= 8 {
                return Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
            }
            buf.drain(..9 + len);
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
    None
}

/// HEADERS+RST_STREAM pairs (`pace` between the two) until the server
/// stops the connection or `max` pairs; (pairs, GOAWAY code).
fn reset_flood(addr: SocketAddr, pace: Option<Duration>, max: u32) -> (u32, Option<u32>) {
    let Some(mut s) = h2c(addr) else { return (0, None) };
    let reader = s.try_clone().ok();
    let code = reader.map(|mut r| std::thread::spawn(move || goaway_code(&mut r, Duration::from_secs(20))));
    let mut pairs = 0;
    let started = Instant::now();
    for i in 0..max {
        let id = 2 * i + 1;
        if s.write_all(&headers(id, "/slow")).is_err() {
            break;
        }
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
        if s.write_all(&frame(3, 0, id, &8u32.to_be_bytes())).is_err() {
            break;
        }
        pairs += 1;
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    (pairs, code.and_then(|h| h.join().ok().flatten()))
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn dns_query() -> Vec<u8> {
    // id 1, RD, one question kubernetes.default.svc.cluster.local A IN.
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["kubernetes", "default", "svc", "cluster", "local"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    framed
}

struct Table(Vec<[String; 3]>);

impl Table {
    fn row(&mut self, probe: &str, clients: impl ToString, outcome: impl ToString) {
        let r = [probe.to_string(), clients.to_string(), outcome.to_string()];
        eprintln!("probe: {} | {} | {}", r[0], r[1], r[2]);
        self.0.push(r);
    }

    fn print(&self) {
        println!("| probe | clients | outcome |");
        println!("|---|---|---|");
        for r in &self.0 {
            println!("| {} | {} | {} |", r[0], r[1], r[2]);
        }
    }
}

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    // The probe's own clients need descriptors too.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ferry = crate::bench_ingress::ferry_binary(&root)?;
    let dir = std::env::temp_dir().join(format!("ferry-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&ferry, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(ferry: &Path, dir: &Path) -> anyhow::Result<()> {
    let admin = backend("admin")?;
    let public = backend("public")?;
    std::fs::write(dir.join("probe.yaml"), manifests(admin.addr, public.addr))?;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let dns: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let limit = format!("{}s", LIMIT.as_secs());
    let serve = Stopped(
        Command::new(ferry)
            .args(["serve", "-f"])
            .arg(dir)
            .args(["--ingress-class", "probe", "--http-addr", &http.to_string()])
            .args(["--client-header-timeout", &limit, "--keepalive-timeout", &limit])
            .args(["--client-send-timeout", &limit, "--client-body-timeout", &limit])
            .args(["--max-connections", &CAP.to_string(), "--drain-timeout", "30s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ferry serve")?,
    );
    let dns_proc = Stopped(
        Command::new(ferry)
            .args(["dns", "-f"])
            .arg(dir)
            .args(["--listen", &dns.to_string(), "--upstream", "127.0.0.1:9"])
            .args(["--tcp-idle-timeout", &limit, "--tcp-write-timeout", &limit])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ferry dns")?,
    );
    wait_port(http)?;
    wait_port(dns)?;
    let within = LIMIT * 5;
    let mut t = Table(Vec::new());
    let rss_start = rss_mib(serve.id());

    let (n, med) = many(http, 200, within, |_| {});
    t.row(
        "silent TCP (never sends)",
        200,
        format!("{n} closed, median {med:.1} s"),
    );
    let (n, med) = many(http, 100, within, |c| {
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: probe.te");
    });
    t.row("half a request head", 100, format!("{n} closed, median {med:.1} s"));
    let (n, med) = many(http, 50, within, |c| {
        let _ = c.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes());
    });
    t.row(
        "idle keep-alive after one request",
        50,
        format!("{n} closed, median {med:.1} s"),
    );
    let idle_h2: Vec<_> = (0..20).filter_map(|_| h2c(http)).collect();
    let codes: Vec<Option<u32>> = idle_h2
        .into_iter()
        .map(|mut s| std::thread::spawn(move || goaway_code(&mut s, within)))
        .filter_map(|h| h.join().ok())
        .collect();
    let goaways = codes.iter().filter(|c| **c == Some(0)).count();
    t.row(
        "idle h2c (preface, no stream)",
        20,
        format!("{goaways} got GOAWAY NO_ERROR and were closed"),
    );

    // A client that asks for 64 MiB and never reads.
    let started = Instant::now();
    let mut lazy = TcpStream::connect(http)?;
    lazy.write_all(&get("/big"))?;
    let mut released = None;
    while started.elapsed() < within {
        if public.released.load(Ordering::SeqCst) {
            released = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lazy);
    t.row(
        "64 MiB response, client never reads",
        1,
        released.map_or("upstream still pinned".to_string(), |d| {
            format!("closed, upstream released after {:.1} s", d.as_secs_f64())
        }),
    );

    // Reset floods.
    let before = admin.accepted.load(Ordering::SeqCst) + public.accepted.load(Ordering::SeqCst);
    let (pairs, code) = reset_flood(http, Some(Duration::from_millis(3)), 20_000);
    let after = admin.accepted.load(Ordering::SeqCst) + public.accepted.load(Ordering::SeqCst);
    t.row(
        "h2c HEADERS+RST, 3 ms apart (slow backend)",
        1,
        format!(
            "GOAWAY {} after {pairs} pairs; {} upstream connections",
            goaway_name(code),
            after - before
        ),
    );
    let (pairs, code) = reset_flood(http, None, 50_000);
    let after2 = admin.accepted.load(Ordering::SeqCst) + public.accepted.load(Ordering::SeqCst);
    t.row(
        "h2c HEADERS+RST back to back",
        1,
        format!(
            "GOAWAY {} after {pairs} pairs; {} upstream connections",
            goaway_name(code),
            after2 - after
        ),
    );

    // Idle flood past the cap, then a real client.
    let hold: Vec<TcpStream> = (0..CAP + 100)
        .filter_map(|_| TcpStream::connect_timeout(&http, Duration::from_secs(5)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = request(http, &get("/"));
    t.row(
        &format!("{} idle connections (cap {CAP}), then a GET", hold.len()),
        hold.len() + 1,
        format!("GET answered {status}"),
    );
    drop(hold);

    // Connection bursts.
    let mut burst_ok = 0;
    let mut burst_total = 0;
    for _ in 0..5 {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(move || {
                    // Connect and send at once, read the answers after.
                    let conns: Vec<TcpStream> = (0..125)
                        .filter_map(|_| {
                            let mut c = TcpStream::connect_timeout(&http, Duration::from_secs(5)).ok()?;
                            c.write_all(&get("/")).ok()?;
                            Some(c)
                        })
                        .collect();
                    let mut ok = 0;
                    for mut c in conns {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut b = [0u8; 12];
                        if c.read_exact(&mut b).is_ok() && &b == b"HTTP/1.1 200" {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        burst_total += 1000;
        burst_ok += handles.into_iter().filter_map(|h| h.join().ok()).sum::<usize>();
    }
    let rss_peak = rss_mib(serve.id());
    std::thread::sleep(Duration::from_secs(7));
    t.row(
        "5 bursts of 1,000 connections (8 threads)",
        burst_total,
        format!(
            "{burst_ok} answered 200; RSS {rss_start:.1} MiB at start, {rss_peak:.1} after, {:.1} 7 s later",
            rss_mib(serve.id())
        ),
    );

    // Paths.
    let mut paths = Vec::new();
    for p in [
        "/public/../admin/x",
        "//admin/x",
        "/%61dmin/x",
        "/./admin/x",
        "/admin/../public",
        "/../admin",
    ] {
        let (status, body) = request(http, &get(p));
        paths.push(format!("`{p}` {status} {}", body.lines().next().unwrap_or("-")));
    }
    t.row("path variants (/admin and / split)", paths.len(), paths.join(", "));

    // Client faults.
    let (chunk, _) = request(
        http,
        format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n").as_bytes(),
    );
    let trickle_started = Instant::now();
    let (trickle, _) = request(
        http,
        format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\npartial").as_bytes(),
    );
    let trickle_s = trickle_started.elapsed().as_secs_f64();
    let (two_hosts, _) = request(
        http,
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: other.test\r\n\r\n").as_bytes(),
    );
    let (connect, _) = request(
        http,
        format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes(),
    );
    t.row(
        "bad chunk size / stalled body / two Host / CONNECT",
        4,
        format!("{chunk} / {trickle} after {trickle_s:.1} s / {two_hosts} / {connect}"),
    );

    // DNS over TCP.
    let (n, med) = many(dns, 100, within, |_| {});
    t.row("DNS TCP silent", 100, format!("{n} closed, median {med:.1} s"));
    let dns_started = Instant::now();
    let mut pipeliner = TcpStream::connect(dns)?;
    let q = dns_query();
    let batch: Vec<u8> = q.iter().copied().cycle().take(q.len() * 256).collect();
    let _ = pipeliner.set_write_timeout(Some(within));
    let mut sent = 0usize;
    while dns_started.elapsed() < within && pipeliner.write_all(&batch).is_ok() {
        sent += 256;
    }
    let closed = dns_started.elapsed() < within;
    t.row(
        "DNS TCP pipelining, never reads",
        1,
        if closed {
            format!(
                "closed after {sent} queries, {:.1} s",
                dns_started.elapsed().as_secs_f64()
            )
        } else {
            "still open".to_string()
        },
    );
    drop(dns_proc);

    // Drain with idle h2c clients.
    let idle: Vec<_> = (0..20).filter_map(|_| h2c(http)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let drain_started = Instant::now();
    let mut serve = serve;
    let _ = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let mut exited = None;
    while drain_started.elapsed() < Duration::from_secs(35) {
        if let Ok(Some(_)) = serve.0.try_wait() {
            exited = Some(drain_started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(idle);
    t.row(
        "SIGTERM with 20 idle h2c clients (drain 30 s)",
        20,
        exited.map_or("still draining".into(), |d| {
            format!("exited after {:.2} s", d.as_secs_f64())
        }),
    );
    t.print();
    Ok(())
}

fn goaway_name(code: Option<u32>) -> &'static str {
    match code {
        Some(0) => "NO_ERROR",
        Some(11) => "ENHANCE_YOUR_CALM",
        Some(_) => "(other)",
        None => "none",
    }
}
