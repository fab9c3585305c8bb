//! `cargo xtask bench proxy --mode ebpf [--services N,...]`: the eBPF
//! dataplane's numbers, each printed beside an anchor measured in the same run.
//!
//! - full sync: `ferry proxy --mode ebpf --oneshot` over N services × 10
//!   endpoints, fresh pins each time (so program load and attach included);
//! - one endpoint change at the largest N: a running `ferry proxy` is given
//!   an edited file; prints its partial `sync_seconds` and the time until
//!   the changed backend slot reads back from the pinned map (bpftool);
//! - connection rate through a ClusterIP vs straight to the backend, this
//!   process moved into the bench cgroup; ratio printed.
//!
//! Safety: VIPs are in 127.20.0.0/16 and backends in 127.1.0.0/16, the
//! programs attach to a cgroup made here (not the root), every loop is
//! bounded in count and time, and cgroup/pins are removed on exit.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

struct Place {
    cgroup: PathBuf,
    root: PathBuf,
    pins: PathBuf,
    dir: PathBuf,
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), std::process::id().to_string());
        remove_pins(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn remove_pins(pins: &Path) {
    if let Ok(rd) = std::fs::read_dir(pins) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(pins);
}

fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    for l in text.lines() {
        if let Some((pre, post)) = l.split_once(" - ") {
            if post.starts_with("cgroup2 ") {
                if let Some(p) = pre.split_whitespace().nth(4) {
                    return Ok(PathBuf::from(p));
                }
            }
        }
    }
    bail!("no cgroup2 mount")
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 20, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn manifests(n: usize, changed: bool) -> String {
    let mut y = String::new();
    for i in 0..n {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n",
            vip(i)
        );
        for e in 0..10 {
            let last = if changed && i == 0 && e == 9 { 250 } else { e + 1 };
            let _ = writeln!(y, "- addresses: [127.1.{}.{last}]", i % 250);
        }
        y.push_str("---\n");
    }
    y
}

fn ferry_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_BIN") {
        return Ok(p.into());
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--bin", "ferry"])
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(PathBuf::from("target/release/ferry"))
}

fn oneshot(bin: &Path, p: &Place, file: &Path) -> anyhow::Result<(f64, f64)> {
    remove_pins(&p.pins);
    let started = Instant::now();
    let out = Command::new(bin)
        .args(["proxy", "--mode", "ebpf", "--oneshot", "--node-name", "bench", "-f"])
        .arg(file)
        .arg("--cgroup")
        .arg(&p.cgroup)
        .arg("--bpffs")
        .arg(&p.pins)
        .env("RUST_LOG", "warn")
        .output()?;
    let wall = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("oneshot failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sync = text
        .split("sync_seconds=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .context("no sync_seconds in oneshot output")?;
    Ok((sync, wall))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let sizes: Vec<usize> = match args.iter().position(|a| a == "--services") {
        Some(i) => args
            .get(i + 1)
            .context("--services N,N")?
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()?,
        None => vec![1000, 10000],
    };
    let bin = ferry_bin()?;
    let root = cgroup2_root()?;
    let tag = format!("ferry-bench-{}", std::process::id());
    let p = Place {
        cgroup: root.join(&tag),
        root,
        pins: PathBuf::from("/sys/fs/bpf").join(&tag),
        dir: std::env::temp_dir().join(&tag),
    };
    std::fs::create_dir_all(&p.cgroup)?;
    std::fs::create_dir_all(&p.dir)?;

    println!("## eBPF dataplane: full sync (--oneshot, fresh pins: program load + attach + maps)");
    let mut largest = 0;
    for &n in &sizes {
        let file = p.dir.join(format!("svc-{n}.yaml"));
        std::fs::write(&file, manifests(n, false))?;
        let (sync, wall) = oneshot(&bin, &p, &file)?;
        let anchor = crate::bench_proxy::kube_nft_seconds(n, 10, &p.dir)?;
        match anchor {
            Some(a) => println!(
                "{n}×10: sync_seconds={sync:.3} process wall={wall:.3}s; kube-proxy nftables layout (nft -f) {a:.3}s; ferry wall / anchor = {:.3}",
                wall / a
            ),
            None => println!("{n}×10: sync_seconds={sync:.3} process wall={wall:.3}s; kube-proxy nftables layout did not finish"),
        }
        largest = n;
    }

    // One endpoint change at the largest size.
    let file = p.dir.join("change.yaml");
    std::fs::write(&file, manifests(largest, false))?;
    remove_pins(&p.pins);
    let mut child = Command::new(&bin)
        .args([
            "proxy",
            "--mode",
            "ebpf",
            "--node-name",
            "bench",
            "--min-sync-interval",
            "10ms",
            "--debounce-ms",
            "10",
            "-f",
        ])
        .arg(&file)
        .arg("--cgroup")
        .arg(&p.cgroup)
        .arg("--bpffs")
        .arg(&p.pins)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("proxy synced") && tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = (|| -> anyhow::Result<()> {
        rx.recv_timeout(Duration::from_secs(120)).context("first sync")?;
        std::fs::write(&file, manifests(largest, true))?;
        let written = Instant::now();
        let line = rx.recv_timeout(Duration::from_secs(30)).context("partial sync")?;
        let seen = written.elapsed().as_secs_f64();
        let sync = line
            .split("sync_seconds=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        println!("## one endpoint change at {largest}×10");
        println!("partial sync_seconds={sync} (plan + compile + diff + map writes); file write → sync logged {seen:.3}s (incl. debounce/watch)");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result?;

    // Connection rate: this process in the cgroup, a backend on 127.0.0.1.
    remove_pins(&p.pins);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let backend = listener.local_addr()?;
    let conf = p.dir.join("rate.yaml");
    std::fs::write(
        &conf,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: rate, namespace: bench}}\nspec:\n  clusterIP: 127.20.255.1\n  ports: [{{port: 80, targetPort: {0}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: rate-1, namespace: bench, labels: {{kubernetes.io/service-name: rate}}}}\naddressType: IPv4\nports: [{{port: {0}}}]\nendpoints:\n- addresses: [127.0.0.1]\n",
            backend.port()
        ),
    )?;
    oneshot(&bin, &p, &conf)?;
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    std::fs::write(p.cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let vip: SocketAddr = "127.20.255.1:80".parse()?;
    let rate = |to: SocketAddr| -> anyhow::Result<f64> {
        let n = 3000;
        let started = Instant::now();
        for _ in 0..n {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            drop(s);
            if started.elapsed() > Duration::from_secs(30) {
                bail!("rate loop over 30 s");
            }
        }
        Ok(f64::from(n) / started.elapsed().as_secs_f64())
    };
    let (mut direct, mut via) = (0.0, 0.0);
    for _ in 0..3 {
        direct += rate(backend)?;
        via += rate(vip)?;
    }
    let _ = std::fs::write(p.root.join("cgroup.procs"), std::process::id().to_string());
    println!("## connection rate (TCP connect+close, 3 interleaved rounds × 3000)");
    println!(
        "straight to backend: {:.0}/s; through ClusterIP: {:.0}/s; ratio {:.3}",
        direct / 3.0,
        via / 3.0,
        via / direct
    );
    Ok(())
}
