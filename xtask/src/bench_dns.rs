//! `cargo xtask bench dns`: nsd, knot and `ferry dns` serve an equivalent
//! 10k-service zone on 127.0.0.1 high ports from a temp dir, and dnsperf
//! loads each in the same run: 4 clients, 500 queries outstanding, every
//! query a different Service name (the 10k names shuffled, then repeated),
//! 8 s per server. Each server runs with 1 and 2 UDP threads (`--threads`;
//! nsd `server-count`, knot `udp-workers`, ferry `--dns-workers`), and ferry
//! once more with no flag at all, the default users get. The setups take
//! turns over `--rounds` rounds (the machine is shared and noisy); the
//! report gives each setup's mean qps and spread, the queries dnsperf lost,
//! where the kernel dropped datagrams (the server's sockets or elsewhere,
//! i.e. the load generator's), p99 latency, the server's CPU time per
//! answered query, and the ratios: ferry against nsd and knot with the
//! same thread count, and ferry's default against each anchor's best
//! setting. Then the RSS of `ferry dns` with 10k services and 50k pods.
//!
//! CPU per query is the steadier measure: user + system time of the server
//! process and all its descendants (nsd forks its servers) from
//! /proc/PID/stat over the dnsperf run, divided by the answered queries.
//! qps on this 2-core machine shared with the load generator (and other
//! programs) swings by half between runs; the CPU a query costs the
//! server moves far less, and it is what a node pays. The ratios are
//! computed per round from the setups run back to back in that round, and
//! given as median (min-max). Each ratio also gets its zero-user-space
//! ceiling: the qps ratio ferry would reach if its user-space time per
//! query were zero and the machine's other busy time per query (/proc/stat:
//! dnsperf, the kernel's network work for both sides) stayed the same.
//!
//! `--baseline PATH` runs another ferry binary (an older build) as one more
//! set of setups in the same rounds, to compare a change under the same
//! noise.
//!
//! Every server is a child process killed at the end of its turn (also on
//! error); dnsperf is bounded by its time limit and a deadline; all traffic
//! stays on 127.0.0.1.

use std::collections::BTreeMap;
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
    rounds: usize,
    clients: usize,
    outstanding: usize,
    /// UDP thread counts every server runs with (ferry also with none given).
    threads: Vec<usize>,
    /// Another ferry binary run as the `base` setups.
    baseline: Option<PathBuf>,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        seconds: 8,
        rounds: 3,
        clients: 4,
        outstanding: 500,
        threads: vec![1, 2],
        baseline: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--seconds" => o.seconds = val()?.parse()?,
            "--rounds" => o.rounds = val()?.parse()?,
            "--clients" => o.clients = val()?.parse()?,
            "--outstanding" => o.outstanding = val()?.parse()?,
            "--baseline" => o.baseline = Some(PathBuf::from(val()?)),
            "--threads" | "--workers" => {
                o.threads = val()?
                    .split(',')
                    .map(|t| t.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            other => bail!(
                "unknown argument {other} (--seconds N, --rounds N, --clients N, --outstanding N, --threads N[,N...], --baseline FERRY-BINARY)"
            ),
        }
    }
    o.seconds = o.seconds.clamp(1, 120);
    o.rounds = o.rounds.clamp(1, 10);
    o.clients = o.clients.clamp(1, 64);
    o.outstanding = o.outstanding.clamp(1, 10_000);
    o.threads.retain(|&t| (1..=64).contains(&t));
    o.threads.sort_unstable();
    o.threads.dedup();
    if o.threads.is_empty() {
        o.threads.push(1);
    }
    Ok(o)
}

/// A server under test, stopped (TERM, then KILL) and reaped when dropped.
struct Server {
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

/// Every Service name once, shuffled (dnsperf repeats the file): every
/// query of a pass asks for a different name, as a node's pods do.
fn write_queries(path: &Path) -> anyhow::Result<()> {
    let mut order: Vec<usize> = (0..SERVICES).collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        order.swap(i, (rng % (i as u64 + 1)) as usize);
    }
    let mut q = String::with_capacity(SERVICES * 40);
    for i in order {
        let (name, ns) = service_name(i);
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
    completed: u64,
    /// The server's CPU time (user + system, all its processes) per
    /// answered query, in microseconds.
    cpu_us: f64,
    /// The server's user-space part of `cpu_us`.
    user_us: f64,
    /// Busy CPU time of the whole machine (every core, everything but
    /// idle) per answered query: the server, dnsperf and the kernel's
    /// network work for both.
    machine_us: f64,
    /// Latency percentiles of the completed queries, in milliseconds.
    p50_ms: f64,
    p99_ms: f64,
    /// Datagrams the kernel dropped for a full receive buffer during the
    /// run: on the server's sockets, and anywhere else (the load
    /// generator's sockets, or another program on the machine).
    server_drops: u64,
    other_drops: u64,
}

/// `RcvbufErrors` of /proc/net/snmp (all UDP sockets of the machine).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Drops counted on the UDP sockets bound to `port` (/proc/net/udp).
fn udp_port_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port).then(|| f.last()?.parse::<u64>().ok())?
        })
        .sum()
}

/// User and system CPU time of `pid` and all its descendants, in clock
/// ticks (/proc/PID/stat; threads are included in their process's figures).
fn tree_cpu_ticks(pid: u32) -> (u64, u64) {
    let (mut user, mut system) = (0, 0);
    let mut todo = vec![pid];
    let mut seen = 0;
    // Bounded: a server has a handful of processes.
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 1000 {
            break;
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // Fields after the parenthesised command name: state is the
            // 3rd field of the line, utime the 14th, stime the 15th.
            if let Some((_, rest)) = stat.rsplit_once(") ") {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                user += num(11);
                system += num(12);
            }
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                    todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
                }
            }
        }
    }
    (user, system)
}

/// Busy clock ticks of all cores (/proc/stat `cpu`: everything but idle
/// and iowait).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One dnsperf run against 127.0.0.1:`port`; `-v` writes every query's
/// latency to `log`, from which the percentiles come. dnsperf's own
/// timeout is the default 5 s, a stub resolver's: "lost" is what an
/// application would have retried.
fn dnsperf(port: u16, server: u32, queries: &Path, opts: &Opts, log: &Path) -> anyhow::Result<PerfResult> {
    let drops_before = udp_rcvbuf_errors();
    let cpu_before = tree_cpu_ticks(server);
    let machine_before = machine_busy_ticks();
    let out = std::fs::File::create(log)?;
    let child = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args(["-l", &opts.seconds.to_string()])
        .args(["-c", &opts.clients.to_string()])
        .args(["-q", &opts.outstanding.to_string()])
        .args(["-t", "5", "-v"])
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .context("running dnsperf")?;
    let mut child = crate::child::Stopped(child);
    // The time limit, dnsperf's 5 s wait for the last answers, and slack.
    let deadline = Instant::now() + Duration::from_secs(u64::from(opts.seconds) + 20);
    loop {
        if child.0.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("dnsperf did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    let cpu_after = tree_cpu_ticks(server);
    let machine_ticks = machine_busy_ticks().saturating_sub(machine_before);
    let user_ticks = cpu_after.0.saturating_sub(cpu_before.0);
    let cpu_ticks = (cpu_after.0 + cpu_after.1).saturating_sub(cpu_before.0 + cpu_before.1);
    let server_drops = udp_port_drops(port);
    let other_drops = udp_rcvbuf_errors()
        .saturating_sub(drops_before)
        .saturating_sub(server_drops);
    let text = std::fs::read_to_string(log)?;
    let field = |key: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let qps = field("Queries per second").with_context(|| format!("no summary in dnsperf output {}", log.display()))?;
    // "> NOERROR <name> <type> <seconds>" per answered query ("> T ..." for
    // a timeout, which has no latency).
    let mut latencies: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> ") && !l.starts_with("> T ") && !l.starts_with("> I "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    latencies.sort_unstable_by(f64::total_cmp);
    let completed = field("Queries completed").unwrap_or(0.0) as u64;
    let per_query = |ticks: u64| ticks as f64 * 1e6 / clock_ticks_per_second() / completed.max(1) as f64;
    Ok(PerfResult {
        qps,
        lost: field("Queries lost").unwrap_or(0.0) as u64,
        sent: field("Queries sent").unwrap_or(0.0) as u64,
        completed,
        cpu_us: per_query(cpu_ticks),
        user_us: per_query(user_ticks),
        machine_us: per_query(machine_ticks),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        server_drops,
        other_drops,
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
        child: crate::child::Stopped(child),
    })
}

/// `ferry dns`; `workers: None` passes no `--dns-workers` (the default).
fn start_ferry(bin: &Path, manifests: &Path, port: u16, workers: Option<usize>) -> anyhow::Result<Server> {
    // The upstream is a loopback port nobody serves: the bench never
    // forwards, and never to the machine's resolv.conf.
    let mut cmd = Command::new(bin);
    cmd.args(["dns", "-f"]).arg(manifests).args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        "127.0.0.1:9",
    ]);
    if let Some(w) = workers {
        cmd.args(["--dns-workers", &w.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting ferry")?;
    Ok(Server {
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

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Nsd,
    Knot,
    Ferry,
    /// The `--baseline` ferry binary.
    Base,
}

/// One server configuration: `workers: None` is ferry with no flag.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Setup {
    kind: Kind,
    workers: Option<usize>,
}

impl Setup {
    fn label(&self) -> String {
        let name = match self.kind {
            Kind::Nsd => "nsd",
            Kind::Knot => "knot",
            Kind::Ferry => "ferry",
            Kind::Base => "base",
        };
        match self.workers {
            Some(w) => format!("{name} x{w}"),
            None => format!("{name} default"),
        }
    }
}

/// UDP answer threads of a running ferry (`ferry-dns-udp-N`).
fn ferry_udp_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("ferry-dns-udp"))
        .count()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// A setup's runs, summed up.
struct Summary {
    qps: f64,
    min: f64,
    max: f64,
    /// CPU µs per answered query over all rounds, and min-max of the rounds.
    cpu_us: f64,
    cpu_min: f64,
    cpu_max: f64,
    lost: u64,
    sent: u64,
    p50_ms: f64,
    p99_ms: f64,
    server_drops: u64,
    other_drops: u64,
}

fn summarize(runs: &[&PerfResult]) -> Option<Summary> {
    if runs.is_empty() {
        return None;
    }
    let qps: Vec<f64> = runs.iter().map(|r| r.qps).collect();
    let cpu: Vec<f64> = runs.iter().map(|r| r.cpu_us).collect();
    let completed: u64 = runs.iter().map(|r| r.completed).sum();
    let cpu_total: f64 = runs.iter().map(|r| r.cpu_us * r.completed as f64).sum();
    Some(Summary {
        qps: qps.iter().sum::<f64>() / qps.len() as f64,
        min: qps.iter().copied().fold(f64::INFINITY, f64::min),
        max: qps.iter().copied().fold(0.0, f64::max),
        cpu_us: cpu_total / completed.max(1) as f64,
        cpu_min: cpu.iter().copied().fold(f64::INFINITY, f64::min),
        cpu_max: cpu.iter().copied().fold(0.0, f64::max),
        lost: runs.iter().map(|r| r.lost).sum(),
        sent: runs.iter().map(|r| r.sent).sum(),
        p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        server_drops: runs.iter().map(|r| r.server_drops).sum(),
        other_drops: runs.iter().map(|r| r.other_drops).sum(),
    })
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

    let mut kinds = vec![Kind::Nsd, Kind::Knot, Kind::Ferry];
    if opts.baseline.is_some() {
        kinds.push(Kind::Base);
    }
    let mut setups = Vec::new();
    for &t in &opts.threads {
        for &kind in &kinds {
            setups.push(Setup { kind, workers: Some(t) });
        }
    }
    for &kind in &kinds[2..] {
        setups.push(Setup { kind, workers: None });
    }
    println!(
        "bench dns: {SERVICES} services; dnsperf -c {} -q {} -l {} (timeout 5 s), every query a different Service name (A); \
         UDP threads {:?} for each server and ferry's default; {} round(s), setups in turn; load average {}",
        opts.clients,
        opts.outstanding,
        opts.seconds,
        opts.threads,
        opts.rounds,
        loadavg()
    );
    if let Some(b) = &opts.baseline {
        println!("  base = {}", b.display());
    }
    // Per setup, per round.
    let mut results: BTreeMap<Setup, BTreeMap<usize, PerfResult>> = BTreeMap::new();
    // UDP threads of ferry's (and the baseline's) default, counted in /proc.
    let mut default_threads: BTreeMap<Kind, usize> = BTreeMap::new();
    for round in 0..opts.rounds {
        // Rotate the order so no setup always runs first or after the same one.
        let mut order = setups.clone();
        order.rotate_left(round * 3 % setups.len());
        for setup in order {
            let port = free_port()?;
            let dir = tmp.join(format!("{}-{round}", setup.label().replace(' ', "-")));
            std::fs::create_dir_all(&dir)?;
            let workers = setup.workers.unwrap_or(1);
            let server = match (setup.kind, &opts.baseline) {
                (Kind::Nsd, _) => start_nsd(&dir, &zone, port, workers)?,
                (Kind::Knot, _) => start_knot(&dir, &zone, port, workers)?,
                (Kind::Base, Some(base)) => start_ferry(base, &manifests, port, setup.workers)?,
                (Kind::Ferry | Kind::Base, _) => start_ferry(ferry, &manifests, port, setup.workers)?,
            };
            if let Err(e) = wait_ready(port, probe) {
                eprintln!("bench dns: {} did not come up: {e:#}", setup.label());
                continue;
            }
            if matches!(setup.kind, Kind::Ferry | Kind::Base) && setup.workers.is_none() {
                default_threads.insert(setup.kind, ferry_udp_threads(server.child.id()));
            }
            let r = dnsperf(port, server.child.id(), &queries, opts, &dir.join("dnsperf.log"))?;
            drop(server);
            println!(
                "  round {}  {:<14} {:>9.0} qps  {:>5.2} us CPU/query (user {:.2}, machine {:.2})  lost {:>4} of {:>8}  p50 {:>6.2} ms  p99 {:>6.2} ms  rcvbuf drops: server {} elsewhere {}",
                round + 1,
                setup.label(),
                r.qps,
                r.cpu_us,
                r.user_us,
                r.machine_us,
                r.lost,
                r.sent,
                r.p50_ms,
                r.p99_ms,
                r.server_drops,
                r.other_drops
            );
            results.entry(setup).or_default().insert(round, r);
        }
    }

    println!("summary (mean qps and min-max over rounds; server CPU us per answered query over all rounds and min-max; lost summed; p50/p99 median of rounds):");
    let summaries: BTreeMap<Setup, Summary> = results
        .iter()
        .filter_map(|(s, runs)| Some((*s, summarize(&runs.values().collect::<Vec<_>>())?)))
        .collect();
    for (setup, s) in &summaries {
        let label = match setup.workers {
            None => format!(
                "{} ({} thr)",
                setup.label(),
                default_threads.get(&setup.kind).copied().unwrap_or(0)
            ),
            Some(_) => setup.label(),
        };
        println!(
            "  {label:<20} {:>9.0} qps ({:.0}-{:.0})  {:.2} us CPU/query ({:.2}-{:.2})  lost {} of {}  p50 {:.2} ms  p99 {:.2} ms  rcvbuf drops: server {} elsewhere {}",
            s.qps, s.min, s.max, s.cpu_us, s.cpu_min, s.cpu_max, s.lost, s.sent, s.p50_ms, s.p99_ms, s.server_drops, s.other_drops
        );
    }
    let get = |kind, workers| summaries.get(&Setup { kind, workers });
    // Ratios of the runs of `f` and `a` in the same round: median (min-max).
    let per_round = |f: Setup, a: Setup, value: fn(&PerfResult) -> f64| -> Option<(f64, f64, f64)> {
        let (fr, ar) = (results.get(&f)?, results.get(&a)?);
        let ratios: Vec<f64> = fr
            .iter()
            .filter_map(|(round, r)| Some(value(r) / value(ar.get(round)?)))
            .collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        (!ratios.is_empty()).then(|| (median(ratios), min, max))
    };
    // The qps ratio `f` would reach if its server spent no user-space time
    // and the machine the same CPU on everything else per query (median of
    // the rounds): how much of a gap server code can close at all.
    let zero_user_ceiling = |f: Setup, a: Setup| -> Option<f64> {
        let (fr, ar) = (results.get(&f)?, results.get(&a)?);
        let ratios: Vec<f64> = fr
            .iter()
            .filter(|(_, r)| r.machine_us > r.user_us)
            .filter_map(|(round, r)| Some(r.qps * r.machine_us / (r.machine_us - r.user_us) / ar.get(round)?.qps))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    };
    let compare = |what: &str, f: Setup, a: Setup, target: Option<f64>| {
        let (Some(fs), Some(as_)) = (summaries.get(&f), summaries.get(&a)) else {
            return;
        };
        let Some((ratio, rmin, rmax)) = per_round(f, a, |r| r.qps) else {
            return;
        };
        let cpu = per_round(f, a, |r| r.cpu_us);
        let ceiling = zero_user_ceiling(f, a);
        let verdict = match target {
            Some(t) if rmin >= t => format!("target >= {t:.2}x met in every round"),
            Some(t) if ratio >= t => format!("target >= {t:.2}x met (median)"),
            Some(t) => format!("target >= {t:.2}x MISSED"),
            None => String::new(),
        };
        let p99 = if fs.p99_ms <= as_.p99_ms { "no worse" } else { "WORSE" };
        let cpu = cpu
            .map(|(c, cmin, cmax)| format!("  CPU/query {c:.2}x ({cmin:.2}-{cmax:.2})"))
            .unwrap_or_default();
        let ceiling = ceiling
            .map(|c| format!("  zero-user-space ceiling {c:.2}x"))
            .unwrap_or_default();
        println!(
            "  {what:<32} {ratio:.2}x qps ({rmin:.2}-{rmax:.2}; {verdict}){cpu}  p99 {:.2} vs {:.2} ms ({p99}){ceiling}",
            fs.p99_ms, as_.p99_ms
        );
    };
    println!("ratios, per round (median, min-max); CPU/query below 1 is cheaper than the anchor:");
    for &t in &opts.threads {
        let f = Setup {
            kind: Kind::Ferry,
            workers: Some(t),
        };
        for (kind, name, target) in [
            (Kind::Nsd, "nsd", Some(1.2)),
            (Kind::Knot, "knot", None),
            (Kind::Base, "base", None),
        ] {
            compare(
                &format!("ferry x{t} / {name} x{t}"),
                f,
                Setup { kind, workers: Some(t) },
                target,
            );
        }
    }
    if let Some(f) = get(Kind::Ferry, None) {
        let ferry_default = Setup {
            kind: Kind::Ferry,
            workers: None,
        };
        for (kind, name) in [(Kind::Nsd, "nsd"), (Kind::Knot, "knot")] {
            let best = summaries
                .iter()
                .filter(|(s, _)| s.kind == kind)
                .max_by(|a, b| a.1.qps.total_cmp(&b.1.qps));
            if let Some((s, _)) = best {
                let target = (kind == Kind::Nsd).then_some(1.0);
                compare(
                    &format!("ferry default / {name} best ({})", s.label()),
                    ferry_default,
                    *s,
                    target,
                );
            }
        }
        compare(
            "ferry default / base default",
            ferry_default,
            Setup {
                kind: Kind::Base,
                workers: None,
            },
            None,
        );
        println!(
            "  ferry default ({} UDP thread(s) here) lost {} queries (target 0)",
            default_threads.get(&Kind::Ferry).copied().unwrap_or(0),
            f.lost
        );
    }
    println!("load average after the runs: {}", loadavg());

    // RSS with 10k services + 50k pods.
    write_manifests(&manifests, true)?;
    let port = free_port()?;
    let server = start_ferry(ferry, &manifests, port, None)?;
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
