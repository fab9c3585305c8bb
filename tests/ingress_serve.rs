//! Black-box tests of `ferry serve`, `ferry echo` and `ferry render --what
//! routes` (the built binary). Traffic stays on 127.0.0.0/8.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request with `Host: host`; `None` until the server answers.
fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn wait_for(addr: SocketAddr, host: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = get(addr, host, "/") {
            return r;
        }
        assert!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_files_with_two_echo_backends_alternates() {
    // The README's standalone walkthrough, on free ports: two `ferry echo`
    // backends and `ferry serve -f` over a copy of the example pointing at them.
    let (p1, p2, proxy_port) = (free_port(), free_port(), free_port());
    let _b1 = Kill(
        Command::new(FERRY)
            .args(["echo", "--addr", &format!("127.0.0.1:{p1}"), "--body", "pod-one"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _b2 = Kill(
        Command::new(FERRY)
            .args(["echo", "--addr", &format!("127.0.0.1:{p2}"), "--body", "pod-two"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for f in ["services.yaml", "ingress.yaml"] {
        std::fs::copy(format!("{root}/examples/wordpress/{f}"), dir.path().join(f)).unwrap();
    }
    let slices = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: wp-1, labels: {{kubernetes.io/service-name: wp-svc}}}}\naddressType: IPv4\nports: [{{name: http80, port: {p1}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: wp-2, labels: {{kubernetes.io/service-name: wp-svc}}}}\naddressType: IPv4\nports: [{{name: http80, port: {p2}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n"
    );
    std::fs::write(dir.path().join("endpoints.yaml"), slices).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let _serve = Kill(
        Command::new(FERRY)
            .args(["serve", "-f"])
            .arg(dir.path())
            .args(["--ingress-class", "wp-ink", "--http-addr", &addr.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(addr, "wp.test");
    let mut bodies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while bodies.len() < 10 && Instant::now() < deadline {
        match get(addr, "wp.test:8080", "/") {
            Some((200, body)) => bodies.push(body.lines().next().unwrap_or("").to_string()),
            // Backends may still be starting.
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(bodies.iter().any(|b| b == "pod-one"), "{bodies:?}");
    assert!(bodies.iter().any(|b| b == "pod-two"), "{bodies:?}");
    assert_eq!(get(addr, "other.test", "/").map(|r| r.0), Some(404));
}

#[test]
fn serve_demo_answers_the_readme_curl() {
    // The demo binds 127.0.0.11/12:18080 for its backends; skip quietly if
    // another process (e.g. a developer's running demo) holds them.
    if TcpListener::bind("127.0.0.11:18080").is_err() || TcpListener::bind("127.0.0.12:18080").is_err() {
        eprintln!("demo backend ports busy; skipping");
        return;
    }
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _serve = Kill(
        Command::new(FERRY)
            .args(["serve", "--demo", "--http-addr", &addr.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (status, _) = wait_for(addr, "wp.test");
    assert_eq!(status, 200);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &format!("wp.test:{port}:127.0.0.1"),
        ])
        .arg(format!("http://wp.test:{port}/"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(first.starts_with("wp-dep-5b9c7d8f4-"), "{first}");
}

#[test]
fn render_routes_prints_the_table() {
    let out = Command::new(FERRY)
        .args([
            "render",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/wordpress"),
        ])
        .args(["--what", "routes", "--ingress-class", "wp-ink"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("host wp.test"), "{text}");
    assert!(
        text.contains("default/wp-svc:80 [round_robin] -> 127.0.0.11:18080 127.0.0.12:18080"),
        "{text}"
    );
}
