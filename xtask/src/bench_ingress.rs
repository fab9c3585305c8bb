//! `cargo xtask bench ingress [SECONDS]`: ferry serve against nginx and
//! haproxy (Debian packages), all proxying to the same local backend
//! (`ferry echo`), measured with wrk in interleaved rounds (`--rounds N`,
//! default 1); prints mean rps (and the range), p99 and ferry's ratios,
//! also with access logs on for both (nginx `combined`, ferry's default
//! access log, each to a file). Also HTTPS against nginx with the same certificate and
//! the same protocol versions (TLS 1.2 and 1.3, ingress-nginx's default `ssl-protocols`;
//! the TLS version and cipher suite each negotiates with OpenSSL's client are printed), and
//! ferry's RSS with 1,000 Ingresses and 10,000 endpoints loaded.
//!
//! The anchors keep upstream connections alive (nginx `keepalive 64`,
//! haproxy `http-reuse always`), as ingress-nginx does. nginx with its
//! stock proxy settings (a new upstream connection per request) is shown
//! for reference only. Every proxy adds the same forwarded headers to the
//! request the backend gets (`NGINX_FORWARDED`): those ferry adds.
//!
//! Each run also charges CPU per request to the proxy (user, system), the
//! backend and the whole machine, from /proc, and the proxy's context
//! switches per request (all its threads, voluntary and involuntary, from
//! /proc/PID/task/*/status), and prints the rps ferry
//! would reach with zero user-space time: the part of the gap to the
//! anchors that proxy code can still close. All of these proxies make the
//! same four socket calls per request, so the kernel's share is a floor.
//!
//! Everything listens on 127.0.0.1 high ports and runs as child processes
//! from a temp dir that are killed at the end. Load is bounded by wrk's
//! duration. `FERRY_BIN=path` benchmarks that binary instead of building one;
//! `FERRY_BASE_BIN=path` adds that (earlier) binary as one more target in
//! every round and prints ferry's ratio to it: a before/after comparison
//! interleaved in the same run.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const CONNECTIONS: &str = "64";
/// The headers nginx adds to each proxied request: those ferry adds
/// (`X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`, `-Host`, `-Port`;
/// ingress-nginx's template sets these and more), so the backend gets the
/// same request from every proxy; haproxy's config sets the same ones.
const NGINX_FORWARDED: &str = "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; \
proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Forwarded-Proto $scheme; \
proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Forwarded-Port $server_port;";
const HOST: &str = "bench.test";

use crate::child::Stopped as Proc;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on {addr}")
}

fn spawn(cmd: &mut Command, name: &'static str) -> anyhow::Result<Proc> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc(child))
}

struct Result {
    name: String,
    rps: f64,
    /// Requests wrk completed.
    requests: f64,
    p99_ms: f64,
    /// CPU per request during the run, in microseconds.
    cpu: CpuPerRequest,
    /// The proxy's context switches per request during the run.
    switches: SwitchesPerRequest,
}

/// CPU time (user, system) in clock ticks, summed over every thread of
/// some processes, from `/proc/PID/task/TID/stat`.
#[derive(Debug, Default, Clone, Copy)]
struct Ticks {
    user: u64,
    sys: u64,
}

/// The contents of file `name` of every thread of some processes
/// (`/proc/PID/task/TID/NAME`), to `each`; threads gone meanwhile are
/// skipped.
fn each_thread_file(pids: &[u32], name: &str, mut each: impl FnMut(&str)) {
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join(name)) {
                each(&text);
            }
        }
    }
}

fn ticks(pids: &[u32]) -> Ticks {
    let mut t = Ticks::default();
    each_thread_file(pids, "stat", |stat| {
        // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        t.user += fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        t.sys += fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    });
    t
}

/// Context switches (voluntary: the thread blocked or yielded;
/// involuntary: the scheduler preempted it), summed over every thread of
/// some processes, from `/proc/PID/task/TID/status`. Threads that exit
/// during a run take their counts with them (tokio's blocking pool); the
/// ones that start during it count from zero.
#[derive(Debug, Default, Clone, Copy)]
struct Switches {
    voluntary: u64,
    involuntary: u64,
}

fn switches(pids: &[u32]) -> Switches {
    let mut s = Switches::default();
    each_thread_file(pids, "status", |status| {
        for line in status.lines() {
            let count = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                s.voluntary += count(v);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                s.involuntary += count(v);
            }
        }
    });
    s
}

/// The proxy's context switches per request, all its threads.
#[derive(Debug, Default, Clone, Copy)]
struct SwitchesPerRequest {
    voluntary: f64,
    involuntary: f64,
}

impl SwitchesPerRequest {
    fn total(&self) -> f64 {
        self.voluntary + self.involuntary
    }
}

/// The whole machine's busy ticks (every CPU: user, nice, system, irq,
/// softirq; not idle, iowait, steal, or guest, which user already holds),
/// from the first line of `/proc/stat`.
fn machine_busy() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0;
    };
    cpu.split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// `pid` and its direct children (nginx's workers under its master).
fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(child) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// Microseconds of CPU per request: the proxy's user and system time, the
/// backend's total, and the whole machine's (wrk included).
#[derive(Debug, Default, Clone, Copy)]
struct CpuPerRequest {
    proxy_user: f64,
    proxy_sys: f64,
    backend: f64,
    machine: f64,
}

/// The processes whose CPU a run is charged with.
struct Watched<'a> {
    proxy: &'a [u32],
    backend: u32,
}

fn parse_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse().ok();
    }
    if let Some(v) = s.strip_suffix('s') {
        return v.parse::<f64>().ok().map(|v| v * 1000.0);
    }
    None
}

fn wrk(name: &str, url: &str, seconds: u64, watched: &Watched) -> anyhow::Result<Result> {
    let (proxy0, backend0, machine0) = (ticks(watched.proxy), ticks(&[watched.backend]), machine_busy());
    let switches0 = switches(watched.proxy);
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c",
            CONNECTIONS,
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-H",
        ])
        .arg(format!("Host: {HOST}"))
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| {
            format!(
                "no Requests/sec in wrk output for {name} ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(parse_ms)
        .with_context(|| format!("no 99% latency in wrk output for {name}:\n{text}"))?;
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("bench: {name}: {}", e.trim());
    }
    let (proxy1, backend1, machine1) = (ticks(watched.proxy), ticks(&[watched.backend]), machine_busy());
    let switches1 = switches(watched.proxy);
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no request count in wrk output for {name}:\n{text}"))?;
    let tick_us = 1e6 / clock_ticks_per_second();
    let us_per_request = |ticks: u64| ticks as f64 * tick_us / requests.max(1.0);
    let cpu = CpuPerRequest {
        proxy_user: us_per_request(proxy1.user.saturating_sub(proxy0.user)),
        proxy_sys: us_per_request(proxy1.sys.saturating_sub(proxy0.sys)),
        backend: us_per_request((backend1.user + backend1.sys).saturating_sub(backend0.user + backend0.sys)),
        machine: us_per_request(machine1.saturating_sub(machine0)),
    };
    let per_request = |n: u64| n as f64 / requests.max(1.0);
    let switches = SwitchesPerRequest {
        voluntary: per_request(switches1.voluntary.saturating_sub(switches0.voluntary)),
        involuntary: per_request(switches1.involuntary.saturating_sub(switches0.involuntary)),
    };
    eprintln!(
        "bench: {name}: {rps:.0} rps, p99 {p99_ms:.2} ms, CPU/request {cpu:.2?}, \
         context switches/request {:.3} voluntary + {:.3} involuntary",
        switches.voluntary, switches.involuntary
    );
    Ok(Result {
        name: name.to_string(),
        rps,
        requests,
        p99_ms,
        cpu,
        switches,
    })
}

/// The mean of several runs of one target.
fn mean(runs: &[Result]) -> Result {
    let n = runs.len().max(1) as f64;
    let avg = |f: &dyn Fn(&Result) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Result {
        name: runs.first().map(|r| r.name.clone()).unwrap_or_default(),
        rps: avg(&|r| r.rps),
        requests: avg(&|r| r.requests),
        p99_ms: avg(&|r| r.p99_ms),
        cpu: CpuPerRequest {
            proxy_user: avg(&|r| r.cpu.proxy_user),
            proxy_sys: avg(&|r| r.cpu.proxy_sys),
            backend: avg(&|r| r.cpu.backend),
            machine: avg(&|r| r.cpu.machine),
        },
        switches: SwitchesPerRequest {
            voluntary: avg(&|r| r.switches.voluntary),
            involuntary: avg(&|r| r.switches.involuntary),
        },
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bench's Ingress serves the same host over HTTP and HTTPS (as nginx
/// does here), so its HTTP-to-HTTPS redirect is turned off.
fn manifests(backend_port: u16, cert: &[u8], key: &[u8]) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: ferry}}\nspec: {{controller: ferry.dev/ingress-controller}}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{name: echo}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: {backend_port}}}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: echo-1, labels: {{kubernetes.io/service-name: echo}}}}\naddressType: IPv4\nports: [{{name: http, port: {backend_port}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\n\
apiVersion: v1\nkind: Secret\nmetadata: {{name: bench-tls}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n---\n\
apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: bench, annotations: {{nginx.ingress.kubernetes.io/ssl-redirect: \"false\"}}}}\nspec:\n  ingressClassName: ferry\n  tls: [{{hosts: [{HOST}], secretName: bench-tls}}]\n  rules:\n  - host: {HOST}\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: echo, port: {{number: 80}}}}}}}}]}}\n",
        base64(cert),
        base64(key)
    )
}

/// 1,000 Ingresses over 1,000 Services with 10 endpoints each. The
/// endpoint addresses are never dialled: no request targets these hosts.
fn large_manifests() -> String {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: ferry}\nspec: {controller: ferry.dev/ingress-controller}\n---\n",
    );
    for i in 0..1000u32 {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for j in 0..10u32 {
            let _ = writeln!(y, "- addresses: [\"10.{}.{}.{}\"]", i / 256, i % 256, j + 1);
        }
        let _ = write!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i{i}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: h{i}.bench.test\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: s{i}, port: {{number: 80}}}}}}}}]}}\n---\n"
        );
    }
    y
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// `$FERRY_BIN` when set (an already built binary: no rebuild, so a
/// concurrent change elsewhere in the workspace does not end up in the
/// measurement), else a fresh `cargo build --release`.
pub fn ferry_binary(root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FERRY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("FERRY_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "ferry"])
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("building ferry failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target.join("release/ferry"))
}

/// `ferry serve -f DIR` on 127.0.0.1:`http` with 2 workers and warnings
/// only, as every ferry of the bench runs.
fn serve_command(ferry: &Path, dir: &Path, http: u16) -> Command {
    let mut c = Command::new(ferry);
    c.args(["serve", "-f"])
        .arg(dir)
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .env("TOKIO_WORKER_THREADS", "2")
        .env("RUST_LOG", "warn");
    c
}

/// The TLS version and cipher suite OpenSSL's client (the library wrk
/// uses, with its defaults) negotiates with the server on `port`.
fn negotiated_tls(port: u16) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "127.0.0.1",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("New, "))
        .map_or_else(|| "unknown".to_string(), |l| l.replace(", Cipher is", ""))
}

/// ferry's HTTPS listener on `port`, serving the bench's certificate
/// also to wrk, whose SNI (127.0.0.1) names no host.
fn https_args(port: u16) -> [String; 4] {
    [
        "--https-addr".into(),
        format!("127.0.0.1:{port}"),
        "--default-tls-secret".into(),
        "default/bench-tls".into(),
    ]
}

fn ratio_line(ferry: &Result, others: &[&Result]) -> String {
    let best = others.iter().max_by(|a, b| a.rps.total_cmp(&b.rps));
    match best {
        Some(b) => format!(
            "{}: {:.2}x the rps of {} (best other), p99 {:.2} ms vs {:.2} ms ({:.2}x)",
            ferry.name,
            ferry.rps / b.rps,
            b.name,
            ferry.p99_ms,
            b.p99_ms,
            ferry.p99_ms / b.p99_ms
        ),
        None => String::new(),
    }
}

/// What ferry's rps would be if its user-space time were zero and the
/// machine spent the same CPU on everything else per request: the part of
/// the gap that proxy code can still close. All three proxies make the
/// same four socket calls per request, so their kernel time is a floor.
fn user_space_ceiling(ferry: &Result, others: &[&Result]) -> String {
    let c = ferry.cpu;
    if c.machine <= c.proxy_user || c.machine <= 0.0 {
        return String::new();
    }
    let ceiling = ferry.rps * c.machine / (c.machine - c.proxy_user);
    let best = others.iter().map(|r| r.rps).fold(0.0, f64::max);
    format!(
        "{}: with zero user-space CPU ({:.2} of {:.2} us/req machine-wide) at most {:.0} rps = {:.2}x the best other",
        ferry.name,
        c.proxy_user,
        c.machine,
        ceiling,
        if best > 0.0 { ceiling / best } else { 0.0 }
    )
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    const USAGE: &str = "usage: cargo xtask bench ingress [SECONDS] [--rounds N]";
    let mut seconds: u64 = 10;
    let mut rounds: u32 = 1;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .context(USAGE)?;
            }
            n => seconds = n.parse().context(USAGE)?,
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ferry = ferry_binary(&root)?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-ingress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&ferry, &dir, seconds, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(ferry: &Path, dir: &Path, seconds: u64, rounds: u32) -> anyhow::Result<()> {
    let backend = free_port()?;
    let echo = spawn(
        Command::new(ferry)
            .args([
                "echo",
                "--body-only",
                "--body",
                "ok",
                "--addr",
                &format!("127.0.0.1:{backend}"),
            ])
            .env("RUST_LOG", "warn"),
        "ferry echo",
    )?;
    wait_port(backend, "backend")?;

    // One certificate for ferry and nginx.
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            &format!("/CN={HOST}"),
            "-addext",
            &format!("subjectAltName=DNS:{HOST}"),
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("running openssl")?;
    if !status.success() {
        bail!("openssl failed to make the benchmark certificate");
    }
    let manifest_dir = dir.join("manifests");
    std::fs::create_dir_all(&manifest_dir)?;
    std::fs::write(
        manifest_dir.join("bench.yaml"),
        manifests(backend, &std::fs::read(&cert)?, &std::fs::read(&key)?),
    )?;

    let (ferry_http, ferry_https) = (free_port()?, free_port()?);
    let ferry_proc = spawn(
        serve_command(ferry, &manifest_dir, ferry_http).args(https_args(ferry_https)),
        "ferry serve",
    )?;

    // Access logs on, each as it ships, to a file: ferry's default access
    // log (stderr, text) redirected to a file; nginx's `combined` format.
    let (ferry_log_http, ferry_log_file) = (free_port()?, dir.join("ferry-access.log"));
    let ferry_log_proc = Proc(
        serve_command(ferry, &manifest_dir, ferry_log_http)
            .env("RUST_LOG", "warn,ferry::access=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&ferry_log_file)?)
            .spawn()
            .context("starting ferry serve (access log)")?,
    );

    let (nginx_http, nginx_https, nginx_close) = (free_port()?, free_port()?, free_port()?);
    let nginx_log = free_port()?;
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "worker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\ndaemon off;\n\
events {{ worker_connections 4096; }}\n\
http {{\n  access_log off;\n  client_body_temp_path {dir}/cb; proxy_temp_path {dir}/pt; fastcgi_temp_path {dir}/ft; uwsgi_temp_path {dir}/ut; scgi_temp_path {dir}/st;\n\
  upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}\n\
  server {{\n    listen 127.0.0.1:{nginx_http};\n    listen 127.0.0.1:{nginx_https} ssl http2;\n    server_name {HOST};\n\
    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.2 TLSv1.3;\n\
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; {FORWARDED} }}\n  }}\n\
  server {{\n    listen 127.0.0.1:{nginx_log};\n    access_log {dir}/nginx-access.log combined;\n\
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; {FORWARDED} }}\n  }}\n\
  upstream be_close {{ server 127.0.0.1:{backend}; }}\n\
  server {{\n    listen 127.0.0.1:{nginx_close};\n    location / {{ proxy_pass http://be_close; proxy_set_header Host $host; {FORWARDED} }}\n  }}\n}}\n",
            dir = dir.display(),
            FORWARDED = NGINX_FORWARDED,
            cert = cert.display(),
            key = key.display(),
        ),
    )?;
    let nginx_proc = spawn(
        Command::new("nginx").arg("-c").arg(&nginx_conf).arg("-p").arg(dir),
        "nginx",
    )?;

    let haproxy_http = free_port()?;
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  nbthread 2\n  maxconn 4000\n\
defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  option forwardfor\n\
frontend fe\n  bind 127.0.0.1:{haproxy_http}\n  http-request set-header X-Real-IP %[src]\n  http-request set-header X-Forwarded-Proto http\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n  http-request set-header X-Forwarded-Port %[dst_port]\n  default_backend be\n\
backend be\n  http-reuse always\n  server s1 127.0.0.1:{backend}\n"
        ),
    )?;
    let haproxy_proc = spawn(Command::new("haproxy").arg("-f").arg(&haproxy_cfg), "haproxy")?;

    for (port, what) in [
        (ferry_http, "ferry"),
        (ferry_https, "ferry https"),
        (nginx_http, "nginx"),
        (nginx_close, "nginx (no upstream keep-alive)"),
        (nginx_https, "nginx https"),
        (haproxy_http, "haproxy"),
        (nginx_log, "nginx (access log)"),
        (ferry_log_http, "ferry (access log)"),
    ] {
        wait_port(port, what)?;
    }
    // Let ferry apply its first table.
    std::thread::sleep(Duration::from_millis(500));
    let tls_versions = format!(
        "TLS negotiated (OpenSSL client defaults, as wrk): ferry {}, nginx {}",
        negotiated_tls(ferry_https),
        negotiated_tls(nginx_https)
    );

    // nginx forks its two workers after binding its ports: wait for them, or
    // their CPU is not counted.
    let mut nginx_pids = with_children(nginx_proc.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while nginx_pids.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        nginx_pids = with_children(nginx_proc.id());
    }
    if nginx_pids.len() < 3 {
        bail!("nginx has {} worker(s), not 2", nginx_pids.len() - 1);
    }
    let (ferry_pid, haproxy_pid) = ([ferry_proc.id()], [haproxy_proc.id()]);
    let ferry_log_pid = [ferry_log_proc.id()];
    let watch = |proxy| Watched {
        proxy,
        backend: echo.id(),
    };
    // Every target once per round, rounds interleaved, so a noisy moment
    // of the shared machine hits all of them alike; results are means.
    let targets: Vec<(&str, String, Vec<u32>)> = vec![
        ("direct (backend)", format!("http://127.0.0.1:{backend}/"), vec![]),
        ("nginx", format!("http://127.0.0.1:{nginx_http}/"), nginx_pids.clone()),
        // Informational, not an anchor of the ratios: nginx's stock proxy
        // settings (HTTP/1.0, a new upstream connection per request).
        (
            "nginx no-keepalive",
            format!("http://127.0.0.1:{nginx_close}/"),
            nginx_pids.clone(),
        ),
        (
            "haproxy",
            format!("http://127.0.0.1:{haproxy_http}/"),
            haproxy_pid.to_vec(),
        ),
        ("ferry", format!("http://127.0.0.1:{ferry_http}/"), ferry_pid.to_vec()),
        (
            "nginx +log",
            format!("http://127.0.0.1:{nginx_log}/"),
            nginx_pids.clone(),
        ),
        (
            "ferry +log",
            format!("http://127.0.0.1:{ferry_log_http}/"),
            ferry_log_pid.to_vec(),
        ),
        (
            "nginx https",
            format!("https://127.0.0.1:{nginx_https}/"),
            nginx_pids.clone(),
        ),
        (
            "ferry https",
            format!("https://127.0.0.1:{ferry_https}/"),
            ferry_pid.to_vec(),
        ),
    ];
    // The binary to compare with, as one more target of every round.
    let base = match std::env::var_os("FERRY_BASE_BIN") {
        Some(bin) => {
            let (port, tls_port) = (free_port()?, free_port()?);
            let proc = spawn(
                serve_command(Path::new(&bin), &manifest_dir, port).args(https_args(tls_port)),
                "ferry serve (base)",
            )?;
            wait_port(port, "ferry (base)")?;
            wait_port(tls_port, "ferry https (base)")?;
            std::thread::sleep(Duration::from_millis(500));
            Some((port, tls_port, proc))
        }
        None => None,
    };
    let mut targets = targets;
    if let Some((port, tls_port, proc)) = &base {
        targets.push(("ferry base", format!("http://127.0.0.1:{port}/"), vec![proc.id()]));
        targets.push((
            "ferry base https",
            format!("https://127.0.0.1:{tls_port}/"),
            vec![proc.id()],
        ));
    }
    let mut runs: Vec<Vec<Result>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for ((name, url, pids), out) in targets.iter().zip(&mut runs) {
            if rounds > 1 {
                eprintln!("bench: round {} of {rounds}", round + 1);
            }
            out.push(wrk(name, url, seconds, &watch(pids))?);
        }
    }
    let mut means = runs.iter().map(|r| mean(r));
    let mut next = || means.next().context("a target without results");
    let (direct, nginx, nginx_close, haproxy, ferry_r) = (next()?, next()?, next()?, next()?, next()?);
    let (nginx_logged, ferry_logged, nginx_tls, ferry_tls) = (next()?, next()?, next()?, next()?);
    let (ferry_base, ferry_base_tls) = match base {
        Some(_) => (Some(next()?), Some(next()?)),
        None => (None, None),
    };
    // Give the log writers a moment to write what they buffered.
    std::thread::sleep(Duration::from_millis(500));
    let log_bytes = |path: &Path, requests: f64| -> f64 {
        std::fs::metadata(path).map_or(0.0, |m| m.len() as f64) / requests.max(1.0)
    };
    let logged_requests = |i: usize| runs[i].iter().map(|r| r.requests).sum::<f64>();
    let nginx_log_bytes = log_bytes(&dir.join("nginx-access.log"), logged_requests(5));
    let ferry_log_bytes = log_bytes(&ferry_log_file, logged_requests(6));

    // RSS with 1,000 Ingresses and 10,000 endpoints.
    let large_dir = dir.join("large");
    std::fs::create_dir_all(&large_dir)?;
    std::fs::write(large_dir.join("large.yaml"), large_manifests())?;
    let (large_http, large_admin) = (free_port()?, free_port()?);
    let large = spawn(
        serve_command(ferry, &large_dir, large_http).args(["--admin-addr", &format!("127.0.0.1:{large_admin}")]),
        "ferry serve (large)",
    )?;
    wait_port(large_admin, "ferry admin")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = false;
    while !ready && Instant::now() < deadline {
        ready = readyz(large_admin);
        if !ready {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if !ready {
        bail!("ferry with 1,000 Ingresses never became ready");
    }
    let rss = rss_kib(large.0.id())?;

    println!();
    println!(
        "ingress benchmark: wrk -t2 -c{CONNECTIONS} -d{seconds}s, keep-alive, 3-byte body, one backend (ferry echo); \
         {rounds} interleaved round(s), means (rps range in brackets)"
    );
    println!(
        "{:<18} {:>8} {:>7} {:>7}  {:<41}  {:<18}  rps range",
        "target", "rps", "p99 ms", "/direct", "CPU us/req: proxy usr+sys backend machine", "ctx sw/req vol+inv"
    );
    for (r, all) in [
        &direct,
        &nginx,
        &nginx_close,
        &haproxy,
        &ferry_r,
        &nginx_logged,
        &ferry_logged,
        &nginx_tls,
        &ferry_tls,
    ]
    .into_iter()
    .chain(ferry_base.as_ref())
    .chain(ferry_base_tls.as_ref())
    .zip(&runs)
    {
        let (lo, hi) = all
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x.rps), hi.max(x.rps)));
        println!(
            "{:<18} {:>8.0} {:>7.2} {:>7.2}  {:>19.2}+{:<5.2} {:>7.2} {:>7.2}  {:>9.3}+{:<8.3}  [{lo:.0}-{hi:.0}]",
            r.name,
            r.rps,
            r.p99_ms,
            r.rps / direct.rps,
            r.cpu.proxy_user,
            r.cpu.proxy_sys,
            r.cpu.backend,
            r.cpu.machine,
            r.switches.voluntary,
            r.switches.involuntary
        );
    }
    println!();
    println!("{}", ratio_line(&ferry_r, &[&nginx, &haproxy]));
    println!("{}", ratio_line(&ferry_logged, &[&nginx_logged]));
    println!("access-log bytes per request: ferry {ferry_log_bytes:.0}, nginx {nginx_log_bytes:.0}");
    println!("{}", ratio_line(&ferry_tls, &[&nginx_tls]));
    println!("{tls_versions}");
    println!("{}", user_space_ceiling(&ferry_r, &[&nginx, &haproxy]));
    // The same bound for the two rows whose targets are 1.2x nginx.
    println!("{}", user_space_ceiling(&ferry_logged, &[&nginx_logged]));
    println!("{}", user_space_ceiling(&ferry_tls, &[&nginx_tls]));
    println!(
        "context switches per request (all proxy threads): ferry {:.3}, nginx {:.3}, haproxy {:.3}; \
         with access logs ferry {:.3}, nginx {:.3}",
        ferry_r.switches.total(),
        nginx.switches.total(),
        haproxy.switches.total(),
        ferry_logged.switches.total(),
        nginx_logged.switches.total()
    );
    if let Some(b) = &ferry_base {
        println!(
            "ferry / ferry base (FERRY_BASE_BIN): {:.2}x the rps, user CPU {:.2} vs {:.2} us/req, \
             context switches {:.3} vs {:.3} per request",
            ferry_r.rps / b.rps,
            ferry_r.cpu.proxy_user,
            b.cpu.proxy_user,
            ferry_r.switches.total(),
            b.switches.total()
        );
    }
    if let Some(b) = &ferry_base_tls {
        println!(
            "ferry https / ferry base https: {:.2}x the rps, p99 {:.2} vs {:.2} ms, user CPU {:.2} vs {:.2} us/req",
            ferry_tls.rps / b.rps,
            ferry_tls.p99_ms,
            b.p99_ms,
            ferry_tls.cpu.proxy_user,
            b.cpu.proxy_user
        );
    }
    println!(
        "ferry: {:.2}x the rps of nginx without upstream keep-alive (informational; not an anchor)",
        ferry_r.rps / nginx_close.rps
    );
    println!(
        "ferry RSS with 1,000 Ingresses / 10,000 endpoints: {:.1} MB",
        rss as f64 / 1024.0
    );
    Ok(())
}

fn readyz(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}
