//! `cargo xtask bench dns`: nsd, knot and `ferry dns` serve an equivalent
//! 10k-service zone on 127.0.0.1 high ports from a temp dir; dnsperf runs
//! against each in the same run (bounded in time), and the ratios against
//! nsd and knot are printed. Every server gets the same number of UDP
//! workers (`--workers`, default 1: nsd `server-count`, knot `udp-workers`,
//! ferry `--dns-workers`), all on 127.0.0.1; with `--rounds N` the servers
//! take turns N times and the ratios use each server's mean. Then the RSS of
//! `ferry dns` with 10k services and 50k pods.
//!
//! Every server is a child process killed at the end of its round; all
//! traffic stays on 127.0.0.1.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const SERVICES: usize = 10_000;
const PODS: usize = 50_000;
const NAMESPACES: usize = 10;

struct Opts {
    seconds: u32,
    /// UDP workers of every server.
    workers: usize,
    rounds: usize,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        seconds: 10,
        workers: 1,
        rounds: 1,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--seconds" => o.seconds = val()?.parse()?,
            "--workers" => o.workers = val()?.parse()?,
            "--rounds" => o.rounds = val()?.parse()?,
            other => bail!("unknown argument {other} (--seconds N, --workers N, --rounds N)"),
        }
    }
    o.seconds = o.seconds.clamp(1, 120);
    o.workers = o.workers.clamp(1, 64);
    o.rounds = o.rounds.clamp(1, 10);
    Ok(o)
}

/// A server under test, stopped (TERM, then KILL) and reaped when dropped.
struct Server {
    name: &'static str,
    child: crate::child::Stopped,
}

fn free_port() -> anyhow::Result<u16> {
    // UDP and TCP both free on the same port.
    for _ in 0..50 {
        let u = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = u.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port")
}

fn service_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn service_name(i: usize) -> (String, String) {
    (format!("svc-{i}"), format!("ns-{}", i % NAMESPACES))
}

fn write_manifests(dir: &Path, pods: bool) -> anyhow::Result<()> {
    let mut text = String::with_capacity(SERVICES * 160);
    for i in 0..SERVICES {
        let (name, ns) = service_name(i);
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80}}]\n",
            service_ip(i)
        );
    }
    std::fs::write(dir.join("services.yaml"), text)?;
    if pods {
        let mut text = String::with_capacity(PODS * 160);
        for i in 0..PODS {
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}}}\nspec: {{nodeName: node-1}}\nstatus:\n  podIP: 10.244.{}.{}\n",
                i % NAMESPACES,
                i / 250,
                i % 250 + 1
            );
        }
        std::fs::write(dir.join("pods.yaml"), text)?;
    }
    Ok(())
}

/// The same A records (and the SRV of the named port) as a master file for
/// nsd and knot, which also need an NS at the apex.
fn write_zone_file(path: &Path) -> anyhow::Result<()> {
    let mut z = String::with_capacity(SERVICES * 120);
    z.push_str("$ORIGIN cluster.local.\n$TTL 5\n");
    z.push_str("@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n");
    z.push_str("@ IN NS ns.dns.cluster.local.\nns.dns IN A 127.0.0.1\n");
    z.push_str("dns-version IN TXT \"1.1.0\"\n");
    for i in 0..SERVICES {
        let (name, ns) = service_name(i);
        let _ = writeln!(z, "{name}.{ns}.svc IN A {}", service_ip(i));
        let _ = writeln!(
            z,
            "_http._tcp.{name}.{ns}.svc IN SRV 0 100 80 {name}.{ns}.svc.cluster.local."
        );
    }
    std::fs::write(path, z)?;
    Ok(())
}

fn write_queries(path: &Path) -> anyhow::Result<()> {
    let mut q = String::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..SERVICES {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (name, ns) = service_name((rng % SERVICES as u64) as usize);
        let _ = writeln!(q, "{name}.{ns}.svc.cluster.local A");
    }
    std::fs::write(path, q)?;
    Ok(())
}

/// Polls with dig until the server answers a known name (bounded).
fn wait_ready(port: u16, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "+short",
                "+time=1",
                "+tries=1",
                "-p",
                &port.to_string(),
                "@127.0.0.1",
                name,
                "A",
            ])
            .output()
            .context("running dig")?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty()
            && !String::from_utf8_lossy(&out.stdout).contains("timed out")
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("server on port {port} never answered {name}")
}

struct PerfResult {
    qps: f64,
    lost: u64,
    sent: u64,
}

fn dnsperf(port: u16, queries: &Path, seconds: u32) -> anyhow::Result<PerfResult> {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &seconds.to_string(), "-c", "4", "-q", "200", "-t", "2"])
        .output()
        .context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let qps = field("Queries per second").with_context(|| format!("dnsperf output:\n{text}"))?;
    Ok(PerfResult {
        qps,
        lost: field("Queries lost").unwrap_or(0.0) as u64,
        sent: field("Queries sent").unwrap_or(0.0) as u64,
    })
}

fn start_nsd(dir: &Path, zone: &Path, port: u16, workers: usize) -> anyhow::Result<Server> {
    let d = dir.display();
    let conf = format!(
        "server:\n  ip-address: 127.0.0.1@{port}\n  server-count: {workers}\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\nremote-control:\n  control-enable: no\nzone:\n  name: cluster.local\n  zonefile: \"{}\"\n",
        zone.display()
    );
    let path = dir.join("nsd.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nsd")
        .arg("-d")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nsd")?;
    Ok(Server {
        name: "nsd",
        child: crate::child::Stopped(child),
    })
}

fn start_knot(dir: &Path, zone: &Path, port: u16, workers: usize) -> anyhow::Result<Server> {
    let d = dir.display();
    let conf = format!(
        "server:\n    rundir: \"{d}\"\n    user: root:root\n    listen: 127.0.0.1@{port}\n    udp-workers: {workers}\n    tcp-workers: 1\n    background-workers: 1\nlog:\n  - target: stderr\n    any: error\ndatabase:\n    storage: \"{d}\"\nzone:\n  - domain: cluster.local\n    storage: \"{d}\"\n    file: \"{}\"\n",
        zone.display()
    );
    let path = dir.join("knot.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("knotd")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting knotd")?;
    Ok(Server {
        name: "knot",
        child: crate::child::Stopped(child),
    })
}

fn start_ferry(bin: &Path, manifests: &Path, port: u16, workers: usize) -> anyhow::Result<Server> {
    // The upstream is a loopback port nobody serves: the bench never
    // forwards, and never to the machine's resolv.conf.
    let child = Command::new(bin)
        .args(["dns", "-f"])
        .arg(manifests)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--upstream", "127.0.0.1:9"])
        .args(["--dns-workers", &workers.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting ferry")?;
    Ok(Server {
        name: "ferry",
        child: crate::child::Stopped(child),
    })
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("VmRSS not found")
}

fn build_ferry() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "ferry"])
        .status()
        .context("building ferry (release)")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target.join("release").join("ferry"))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = parse(args)?;
    let ferry = build_ferry()?;
    let tmp = std::env::temp_dir().join(format!("ferry-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = bench(&opts, &ferry, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn bench(opts: &Opts, ferry: &Path, tmp: &Path) -> anyhow::Result<()> {
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    write_manifests(&manifests, false)?;
    let zone = tmp.join("cluster.local.zone");
    write_zone_file(&zone)?;
    let queries = tmp.join("queries.txt");
    write_queries(&queries)?;
    let probe = "svc-1.ns-1.svc.cluster.local";

    println!(
        "bench dns: {SERVICES} services, {} UDP worker(s) each, dnsperf {}s per server and round, -c 4 -q 200, cluster names (A), {} round(s)",
        opts.workers, opts.seconds, opts.rounds
    );
    let mut results: Vec<(&'static str, PerfResult)> = Vec::new();
    for round in 1..=opts.rounds {
        for which in ["nsd", "knot", "ferry"] {
            let port = free_port()?;
            let dir = tmp.join(format!("{which}-{round}"));
            std::fs::create_dir_all(&dir)?;
            let server = match which {
                "nsd" => start_nsd(&dir, &zone, port, opts.workers)?,
                "knot" => start_knot(&dir, &zone, port, opts.workers)?,
                _ => start_ferry(ferry, &manifests, port, opts.workers)?,
            };
            if let Err(e) = wait_ready(port, probe) {
                eprintln!("bench dns: {} did not come up: {e:#}", server.name);
                continue;
            }
            let r = dnsperf(port, &queries, opts.seconds)?;
            println!(
                "  round {round}  {:<6} {:>10.0} qps   sent {:>9}  lost {}",
                server.name, r.qps, r.sent, r.lost
            );
            results.push((server.name, r));
            drop(server);
        }
    }
    let mean = |n: &str| {
        let v: Vec<f64> = results
            .iter()
            .filter(|(name, _)| *name == n)
            .map(|(_, r)| r.qps)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let lost = |n: &str| {
        results
            .iter()
            .filter(|(name, _)| *name == n)
            .map(|(_, r)| r.lost)
            .sum::<u64>()
    };
    if let Some(f) = mean("ferry") {
        for anchor in ["nsd", "knot"] {
            if let Some(a) = mean(anchor) {
                let target = if anchor == "nsd" { "; target >= 1.00x" } else { "" };
                println!(
                    "  ferry / {anchor:<4} = {:.2}x  (mean {f:.0} vs {a:.0} qps{target})",
                    f / a
                );
            }
        }
        println!("  ferry lost queries: {} (target 0)", lost("ferry"));
    }

    // RSS with 10k services + 50k pods.
    write_manifests(&manifests, true)?;
    let port = free_port()?;
    let server = start_ferry(ferry, &manifests, port, opts.workers)?;
    wait_ready(port, probe)?;
    wait_ready(port, "10-244-1-1.ns-1.pod.cluster.local")?;
    let rss = rss_kib(server.child.id())?;
    println!(
        "  ferry RSS with {SERVICES} services + {PODS} pods: {:.1} MiB (target <= 60 MB)",
        rss as f64 / 1024.0
    );
    drop(server);
    Ok(())
}
