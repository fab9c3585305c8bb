//! `cargo xtask bench proxy [--mode nftables|iptables] [--sizes 1000,10000] [--endpoints 10] [--cap-secs 300] [--no-conn]`:
//! ferry's Service proxy (nftables mode by default) against kube-proxy's
//! rule layouts, in one run.
//!
//! For each size N (N services × E endpoints), each in a fresh network
//! namespace: restore kube-proxy's iptables layout with the host's
//! `iptables-nft-restore`, load kube-proxy's nftables layout with `nft -f`,
//! and run `ferry proxy --oneshot` (file load + plan + full sync). Ratios
//! against the kube-proxy layouts are printed. Then, with the largest N
//! loaded in a running ferry, one endpoint is changed in a file and the
//! time until ferry reports the partial sync done is measured. Finally the
//! connection rate through a ClusterIP is compared with the rate straight
//! to the pod (nginx in a pod namespace, wrk with `Connection: close` from
//! the node namespace). All traffic stays inside namespaces made here.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("fybench{}-{tag}", std::process::id());
        sh("ip", &["netns", "add", &name])?;
        let ns = Netns(name);
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.0, program];
        full.extend(args);
        sh("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

use crate::child::Stopped as Proc;

fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
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

/// Runs `ip netns exec ns program args < input`, killing it after `cap`.
/// Returns the elapsed seconds, or None when it hit the cap.
fn timed_with_input(
    ns: &Netns,
    program: &str,
    args: &[&str],
    input: &Path,
    cap: Duration,
) -> anyhow::Result<Option<f64>> {
    let file = std::fs::File::open(input)?;
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, program])
        .args(args)
        .stdin(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            let secs = started.elapsed().as_secs_f64();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{program} failed: {}", err.trim());
            }
            return Ok(Some(secs));
        }
        if started.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn endpoint_ip(i: usize, e: usize, endpoints: usize) -> String {
    let k = i * endpoints + e;
    format!("10.{}.{}.{}", 100 + k / 62_500, (k / 250) % 250, k % 250 + 1)
}

/// kube-proxy's hash-derived chain suffix (sha256 → base32 in kube-proxy;
/// any stable 16-character suffix costs iptables the same).
fn suffix(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| char::from(ALPHABET[((h.rotate_left(i * 7) >> 3) & 31) as usize]))
        .collect()
}

/// kube-proxy's iptables-mode ruleset (pkg/proxy/iptables/proxier.go) for
/// N ClusterIP services × E endpoints: KUBE-SERVICES → KUBE-SVC-* (masquerade
/// from outside the cluster CIDR, statistic per endpoint) → KUBE-SEP-*
/// (hairpin mark, DNAT), comments on every rule as kube-proxy writes them.
pub fn kube_iptables_layout(n: usize, endpoints: usize) -> String {
    let mut chains = vec![
        ":KUBE-SERVICES - [0:0]".to_string(),
        ":KUBE-NODEPORTS - [0:0]".into(),
        ":KUBE-POSTROUTING - [0:0]".into(),
        ":KUBE-MARK-MASQ - [0:0]".into(),
    ];
    let mut rules = vec![
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_string(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into(),
    ];
    for i in 0..n {
        let svc = format!("bench/s{i}:http");
        let vip = vip(i);
        let svc_chain = format!("KUBE-SVC-{}", suffix(&svc));
        chains.push(format!(":{svc_chain} - [0:0]"));
        rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{svc} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport 80 -j {svc_chain}"
        ));
        rules.push(format!(
            "-A {svc_chain} -m comment --comment \"{svc} cluster IP\" -m tcp -p tcp -d {vip}/32 --dport 80 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        ));
        for e in 0..endpoints {
            let ip = endpoint_ip(i, e, endpoints);
            let sep = format!("KUBE-SEP-{}", suffix(&format!("{svc}{ip}")));
            chains.push(format!(":{sep} - [0:0]"));
            if e + 1 < endpoints {
                rules.push(format!(
                    "-A {svc_chain} -m comment --comment \"{svc} -> {ip}:8080\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (endpoints - e) as f64
                ));
            } else {
                rules.push(format!(
                    "-A {svc_chain} -m comment --comment \"{svc} -> {ip}:8080\" -j {sep}"
                ));
            }
            rules.push(format!(
                "-A {sep} -m comment --comment {svc} -s {ip}/32 -j KUBE-MARK-MASQ"
            ));
            rules.push(format!(
                "-A {sep} -m comment --comment {svc} -m tcp -p tcp -j DNAT --to-destination {ip}:8080"
            ));
        }
    }
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());
    format!(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n*nat\n{}\n{}\nCOMMIT\n",
        chains.join("\n"),
        rules.join("\n")
    )
}

/// kube-proxy's nftables-mode ruleset (pkg/proxy/nftables/proxier.go):
/// a `service-ips` verdict map dispatching to one chain per service, which
/// picks an endpoint chain with `numgen random mod E vmap`.
pub fn kube_nft_layout(n: usize, endpoints: usize) -> String {
    let t = "ip kube-proxy";
    let mut out = String::new();
    let mut w = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    w(format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"));
    w(format!("add chain {t} mark-for-masquerade"));
    w(format!("add rule {t} mark-for-masquerade mark set mark or 0x4000"));
    w(format!("add chain {t} masquerading"));
    w(format!("add rule {t} masquerading mark and 0x4000 == 0 return"));
    w(format!("add rule {t} masquerading mark set mark xor 0x4000"));
    w(format!("add rule {t} masquerading masquerade fully-random"));
    w(format!("add chain {t} services"));
    w(format!(
        "add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"
    ));
    w(format!("add rule {t} nat-prerouting jump services"));
    w(format!(
        "add chain {t} nat-output {{ type nat hook output priority -100 ; }}"
    ));
    w(format!("add rule {t} nat-output jump services"));
    w(format!(
        "add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"
    ));
    w(format!("add rule {t} nat-postrouting jump masquerading"));
    w(format!(
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    w(format!(
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    ));
    for i in 0..n {
        let name = format!("bench/s{i}/tcp/http");
        let svc_chain = format!("service-{}-{name}", &suffix(&name)[..8]);
        let vip = vip(i);
        w(format!("add chain {t} {svc_chain}"));
        w(format!(
            "add rule {t} {svc_chain} ip daddr {vip} tcp dport 80 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
        ));
        let mut vmap = Vec::new();
        for e in 0..endpoints {
            let ip = endpoint_ip(i, e, endpoints);
            let ep_chain = format!("endpoint-{}-{name}__{ip}/8080", &suffix(&format!("{name}{ip}"))[..8]);
            w(format!("add chain {t} {ep_chain}"));
            w(format!(
                "add rule {t} {ep_chain} ip saddr {ip} jump mark-for-masquerade"
            ));
            w(format!("add rule {t} {ep_chain} meta l4proto tcp dnat to {ip}:8080"));
            vmap.push(format!("{e} : goto {ep_chain}"));
        }
        w(format!(
            "add rule {t} {svc_chain} numgen random mod {endpoints} vmap {{ {} }}",
            vmap.join(" , ")
        ));
        w(format!(
            "add element {t} service-ips {{ {vip} . tcp . 80 : goto {svc_chain} }}"
        ));
    }
    out
}

/// The same services as manifests for ferry, split over files of 500
/// services so that one change re-reads one file. Endpoints are on another
/// node, as most endpoints are in a real cluster.
fn write_manifests(dir: &Path, n: usize, endpoints: usize, moved: Option<usize>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for chunk in 0..n.div_ceil(500) {
        let mut y = String::new();
        for i in chunk * 500..((chunk + 1) * 500).min(n) {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
                vip(i)
            ));
            for e in 0..endpoints {
                let ip = if moved == Some(i) && e == 0 {
                    "10.250.0.1".to_string()
                } else {
                    endpoint_ip(i, e, endpoints)
                };
                y.push_str(&format!("- {{addresses: [{ip}], nodeName: other-node}}\n"));
            }
        }
        let path = dir.join(format!("services-{chunk:03}.yaml"));
        let tmp = dir.join(format!(".services-{chunk:03}.tmp"));
        std::fs::write(&tmp, y)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

fn ferry_bin() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "ferry"])
        .status()?;
    if !status.success() {
        bail!("building ferry (release) failed");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("ferry"))
}

/// `ferry proxy` flags for the bench; `mode` is `iptables` (nft back end)
/// or `nftables` (ferry's own table).
fn ferry_args<'a>(dir: &'a str, mode: &'a str) -> Vec<&'a str> {
    let mut args = vec!["proxy", "-f", dir, "--mode", mode];
    if mode == "iptables" {
        args.extend(["--iptables-backend", "nft"]);
    }
    args.extend([
        "--node-name",
        "bench-node",
        "--node-ip",
        "192.0.2.10",
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]);
    args
}

struct Opts {
    sizes: Vec<usize>,
    endpoints: usize,
    cap: Duration,
    conn: bool,
    /// ferry's dataplane: `iptables` (default) or `nftables`.
    mode: String,
}

fn parse(args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        sizes: vec![1000, 10_000],
        endpoints: 10,
        cap: Duration::from_secs(300),
        conn: true,
        mode: "nftables".into(),
    };
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--sizes" => o.sizes = val.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
            "--endpoints" => o.endpoints = val.parse()?,
            "--cap-secs" => o.cap = Duration::from_secs(val.parse()?),
            "--no-conn" => {
                o.conn = false;
                i += 1;
                continue;
            }
            "--mode" if val == "iptables" || val == "nftables" => o.mode = val,
            "--mode" => bail!("bench proxy --mode {val}: iptables or nftables (ebpf has its own bench)"),
            other => bail!("unknown option {other}"),
        }
        i += 2;
    }
    Ok(o)
}

/// The anchor other proxy benches share: seconds for `nft -f` to load
/// kube-proxy's nftables layout for `n` services in a fresh namespace.
pub fn kube_nft_seconds(n: usize, endpoints: usize, work: &Path) -> anyhow::Result<Option<f64>> {
    let nft_file = work.join(format!("kube-nft-{n}.nft"));
    std::fs::write(&nft_file, kube_nft_layout(n, endpoints))?;
    let ns = Netns::new("knft")?;
    timed_with_input(&ns, "nft", &["-f", "-"], &nft_file, Duration::from_secs(600))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = parse(args)?;
    let bin = ferry_bin()?;
    let work = std::env::temp_dir().join(format!("ferry-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&opts, &bin, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(opts: &Opts, bin: &Path, work: &Path) -> anyhow::Result<()> {
    println!(
        "bench proxy: ferry --mode {}; {} endpoints per service; kube-proxy iptables layout capped at {:?}",
        opts.mode, opts.endpoints, opts.cap
    );
    println!("| services | kube-proxy iptables (iptables-nft-restore) | kube-proxy nftables (nft -f) | ferry --oneshot (sync_seconds / wall) | ferry's time / iptables layout's | ferry's time / nft layout's |");
    println!("|---|---|---|---|---|---|");
    for &n in &opts.sizes {
        let ipt_file = work.join(format!("kube-iptables-{n}.txt"));
        std::fs::write(&ipt_file, kube_iptables_layout(n, opts.endpoints))?;
        let ns = Netns::new("kipt")?;
        let kube_ipt = timed_with_input(&ns, "iptables-nft-restore", &[], &ipt_file, opts.cap)?;
        drop(ns);
        let nft_file = work.join(format!("kube-nft-{n}.nft"));
        std::fs::write(&nft_file, kube_nft_layout(n, opts.endpoints))?;
        let ns = Netns::new("knft")?;
        let kube_nft = timed_with_input(&ns, "nft", &["-f", "-"], &nft_file, opts.cap)?;
        drop(ns);
        let dir = work.join(format!("manifests-{n}"));
        write_manifests(&dir, n, opts.endpoints, None)?;
        let ns = Netns::new("ferry")?;
        let dir_s = dir.to_string_lossy().into_owned();
        let mut args = vec!["netns", "exec", &ns.0, bin.to_str().context("binary path")?];
        args.extend(ferry_args(&dir_s, &opts.mode));
        args.push("--oneshot");
        let started = Instant::now();
        let out = sh("ip", &args)?;
        let wall = started.elapsed().as_secs_f64();
        let sync: f64 = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("sync_seconds="))
            .context("no sync_seconds= in ferry's output")?
            .parse()?;
        let rules = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rules="))
            .unwrap_or("?")
            .to_string();
        drop(ns);
        let fmt = |v: Option<f64>| {
            v.map(|s| format!("{s:.3} s"))
                .unwrap_or_else(|| format!("> {:?} (killed at cap)", opts.cap))
        };
        // ferry's sync (plan + program the kernel) and its whole process
        // (start, read and parse the manifests, sync) against the anchor.
        let ratio = |v: Option<f64>| {
            v.map(|k| format!("{:.3} by sync, {:.3} by process wall", sync / k, wall / k))
                .unwrap_or_else(|| "n/a".into())
        };
        if opts.mode == "nftables" {
            println!(
                "| {n} | {} | {} | {sync:.3} s / {wall:.3} s ({rules} rules+elements, --mode nftables) | {} | {} |",
                fmt(kube_ipt),
                fmt(kube_nft),
                ratio(kube_ipt),
                ratio(kube_nft)
            );
            continue;
        }
        // The same pair on the legacy back end (for nodes that use it).
        let ns = Netns::new("kleg")?;
        let kube_legacy = timed_with_input(&ns, "iptables-legacy-restore", &[], &ipt_file, opts.cap)?;
        drop(ns);
        let ns = Netns::new("fleg")?;
        let mut args = vec!["netns", "exec", &ns.0, bin.to_str().context("binary path")?];
        let mut fa = ferry_args(&dir_s, &opts.mode);
        if let Some(b) = fa.iter().position(|a| *a == "nft") {
            fa[b] = "legacy";
        }
        args.extend(fa);
        args.push("--oneshot");
        let started = Instant::now();
        sh("ip", &args)?;
        let wall_legacy = started.elapsed().as_secs_f64();
        drop(ns);
        println!(
            "| {n} | {} | {} | {sync:.3} s / {wall:.3} s ({rules} rules) | {} | {} |",
            fmt(kube_ipt),
            fmt(kube_nft),
            ratio(kube_ipt),
            ratio(kube_nft)
        );
        println!(
            "| {n} (legacy back end) | {} (iptables-legacy-restore) | | {wall_legacy:.3} s wall | {} | |",
            fmt(kube_legacy),
            kube_legacy
                .map(|k| format!("{:.2}× ({:.3} of its time)", k / wall_legacy, wall_legacy / k))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    if let Some(&n) = opts.sizes.iter().max() {
        partial(opts, bin, work, n)?;
    }
    if opts.conn {
        connection_rate(bin, work, &opts.mode)?;
    }
    Ok(())
}

/// One endpoint change with `n` services loaded: from the file rename to
/// ferry's "proxy synced" (logged after iptables-restore returned).
fn partial(opts: &Opts, bin: &Path, work: &Path, n: usize) -> anyhow::Result<()> {
    let dir = work.join(format!("partial-{n}"));
    write_manifests(&dir, n, opts.endpoints, None)?;
    let ns = Netns::new("part")?;
    let dir_s = dir.to_string_lossy().into_owned();
    let mut args = vec![
        "netns",
        "exec",
        &ns.0,
        bin.to_str().context("binary path")?,
        "--log-format",
        "json",
    ];
    args.extend(ferry_args(&dir_s, &opts.mode));
    args.extend([
        "--min-sync-interval",
        "50ms",
        "--debounce-ms",
        "10",
        "--sync-period",
        "1h",
    ]);
    let mut child = Proc(
        Command::new("ip")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stderr = child.0.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("proxy synced") && tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(600))
        .context("ferry did not finish its first sync")?;
    let mut times = Vec::new();
    for round in 0..5 {
        // Alternate the moved endpoint so every round is a real change.
        let moved = if round % 2 == 0 { Some(n / 2) } else { None };
        let started = Instant::now();
        write_manifests_one(&dir, n, opts.endpoints, moved)?;
        let (at, line) = rx
            .recv_timeout(Duration::from_secs(120))
            .context("no sync after the change")?;
        if !line.contains("\"full\":false") {
            bail!("expected a partial sync, got: {line}");
        }
        times.push(at.duration_since(started).as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "\none endpoint change with {n} services loaded, file rename → partial sync done: median {:.1} ms (min {:.1}, max {:.1}, 5 rounds)",
        times[2], times[0], times[4]
    );
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Rewrites only the file holding service `n/2`.
fn write_manifests_one(dir: &Path, n: usize, endpoints: usize, moved: Option<usize>) -> anyhow::Result<()> {
    let chunk = (n / 2) / 500;
    let tmpdir = dir.with_extension("one");
    let _ = std::fs::remove_dir_all(&tmpdir);
    write_manifests(&tmpdir, n.min((chunk + 1) * 500), endpoints, moved)?;
    let name = format!("services-{chunk:03}.yaml");
    std::fs::rename(tmpdir.join(&name), dir.join(&name))?;
    let _ = std::fs::remove_dir_all(&tmpdir);
    Ok(())
}

/// Connections per second through a ClusterIP vs straight to the pod.
fn connection_rate(bin: &Path, work: &Path, mode: &str) -> anyhow::Result<()> {
    let node = Netns::new("cnode")?;
    node.exec("ip", &["link", "add", "br0", "type", "bridge"])?;
    node.exec("ip", &["addr", "add", "10.244.0.1/24", "dev", "br0"])?;
    node.exec("ip", &["link", "set", "br0", "up"])?;
    node.exec("ip", &["route", "add", "10.96.0.0/16", "dev", "br0"])?;
    // Two identical pods: the direct rounds go to .10, the ClusterIP to .11.
    // With one pod, the server's TIME_WAIT sockets from one kind of round
    // refuse reused 4-tuples of the other (their TCP timestamps come from
    // different per-destination offsets), stalling connects for a second.
    let mut pods = Vec::new();
    for (i, ip) in ["10.244.0.10", "10.244.0.11"].into_iter().enumerate() {
        let pod = Netns::new(&format!("cpod{i}"))?;
        let veth = format!("vp{i}");
        node.exec(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.0,
            ],
        )?;
        node.exec("ip", &["link", "set", &veth, "master", "br0"])?;
        node.exec("ip", &["link", "set", &veth, "up"])?;
        pod.exec("ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        pod.exec("ip", &["link", "set", "eth0", "up"])?;
        pod.exec("ip", &["route", "add", "default", "via", "10.244.0.1"])?;
        let ngx = work.join(format!("nginx{i}"));
        std::fs::create_dir_all(&ngx)?;
        let conf = ngx.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{ access_log off; server {{ listen 8080 reuseport backlog=4096; location / {{ return 204; }} }} }}\n",
                ngx.display()
            ),
        )?;
        let nginx = Proc(
            Command::new("ip")
                .args(["netns", "exec", &pod.0, "nginx", "-c"])
                .arg(&conf)
                .args(["-p"])
                .arg(&ngx)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        // nginx before its namespace goes.
        pods.push((nginx, pod));
    }
    let manifest = work.join("rate.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Service\nmetadata: {name: rate, namespace: bench}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: rate-1, namespace: bench, labels: {kubernetes.io/service-name: rate}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints:\n- {addresses: [10.244.0.11], nodeName: other-node}\n",
    )?;
    let m = manifest.to_string_lossy().into_owned();
    let mut args = vec!["netns", "exec", &node.0, bin.to_str().context("binary path")?];
    args.extend(ferry_args(&m, mode));
    args.push("--oneshot");
    sh("ip", &args)?;
    // Wait for nginx (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    for url in ["http://10.244.0.10:8080/", "http://10.244.0.11:8080/"] {
        while node
            .exec("curl", &["-s", "-o", "/dev/null", "--max-time", "1", url])
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("nginx in a pod namespace did not answer ({url})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let wrk = |url: &str, secs: &str| -> anyhow::Result<f64> {
        // Each run starts from an empty conntrack table.
        node.exec("conntrack", &["-F"])?;
        let out = node.exec(
            "wrk",
            &["-t1", "-c16", secs, "--timeout", "2s", "-H", "Connection: close", url],
        )?;
        out.lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .context("no Requests/sec in wrk output")?
            .trim()
            .parse::<f64>()
            .context("parsing wrk output")
    };
    // Interleave to spread machine noise over both.
    let mut direct = Vec::new();
    let mut via = Vec::new();
    // One unmeasured round each first (cold conntrack and NAT tables).
    wrk("http://10.244.0.10:8080/", "-d2s")?;
    wrk("http://10.96.0.1/", "-d2s")?;
    let mut ratios = Vec::new();
    for _ in 0..5 {
        let (d, c) = (
            wrk("http://10.244.0.10:8080/", "-d5s")?,
            wrk("http://10.96.0.1/", "-d5s")?,
        );
        direct.push(d);
        via.push(c);
        ratios.push(c / d);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, c, r) = (med(&mut direct), med(&mut via), med(&mut ratios));
    println!(
        "\nconnection rate (new TCP connection per request, wrk -c16, a warm-up round, then 5 paired rounds of 5 s): direct to pod {d:.0}/s, through ClusterIP {c:.0}/s (medians); median of the paired ratios {r:.3} (rounds: {})",
        ratios.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
