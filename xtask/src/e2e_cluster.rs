//! `cargo xtask e2e cluster`: ferry on a real one-node Kubernetes 1.24
//! (kube-kit, found in `shared/kit` beside the checkout or at `$KUBE_KIT`).
//!
//! The steps are the ones deploy/README.md gives users: the release binary in
//! an image, `ferry render --what manifests` applied with only `APISERVER`
//! (and the seed's `INGRESS_CLASS`, and `PROXY_MODE` to switch modes) set, a
//! kube-dns Service with no pods, the seed's Services and Ingress with busybox
//! stand-ins for WordPress, a headless Service + StatefulSet. Then, in each
//! proxy mode (switched through the ConfigMap and a rollout restart), every
//! check of issue 12 runs and is reported on its own, so one broken part does
//! not hide the state of the others. The node's resolv.conf names an nsd on
//! 127.0.0.99 serving a test zone, so upstream forwarding is tested without
//! leaving the machine. A client network namespace (veth, a private /30, no
//! default route) plays the host outside the node for NodePorts.
//!
//! Teardown (also on error and panic, by a Drop guard): the DaemonSet is
//! deleted, `ferry node --cleanup` runs (and anything it left is an error),
//! `kube-kit down`, the namespace is deleted and nsd stopped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const MODES: [&str; 3] = ["iptables", "nftables", "ebpf"];
/// ferry's default mode (deploy/02-config.yaml): where the test ends, so the
/// eBPF mode's removal is checked too.
const DEFAULT_MODE: &str = "nftables";
const IMAGE: &str = "local/ferry:e2e";
/// kube-kit's apiserver listens on 127.0.0.1 only; ferry runs on the host network.
const APISERVER: &str = "https://127.0.0.1:6443";
/// The seed's IngressClass (wp-ing.yml names the nginx controller).
const INGRESS_CLASS: &str = "wp-ink";
const KUBE_DNS_IP: &str = "10.96.0.10";
/// The node's only resolver: an nsd on a loopback address nothing else uses.
const RESOLVER_IP: &str = "127.0.0.99";
const TEST_ZONE: &str = "ferry-e2e.test";
/// A name of the test zone and its answer (documentation range; never contacted).
const TEST_NAME: &str = "www.ferry-e2e.test";
const TEST_NAME_IP: &str = "203.0.113.80";
const NODE_PORT: u16 = 30088;
const NETNS: &str = "ferry-e2e-client";
const VETH_HOST: &str = "fe2e-host";
const VETH_NS: &str = "fe2e-client";
/// Candidate /30s for the client namespace (host .1, namespace .2): the
/// first one that no address or route of the machine overlaps.
const CLIENT_NETS: [&str; 3] = ["198.51.100.0", "203.0.113.248", "192.0.2.248"];
/// Requests per round-robin probe: missing one of two backends by chance is 2^-15.
const PROBES: usize = 16;

/// The workloads, applied in this order (file names say the order too).
const WORKLOADS: [(&str, &str); 6] = [
    ("00-kube-dns.yaml", include_str!("../e2e-cluster/00-kube-dns.yaml")),
    (
        "10-seed-services.yml",
        include_str!("../e2e-cluster/10-seed-services.yml"),
    ),
    ("11-wp-ing.yml", include_str!("../e2e-cluster/11-wp-ing.yml")),
    ("20-wp-standin.yaml", include_str!("../e2e-cluster/20-wp-standin.yaml")),
    ("30-redis-sts.yaml", include_str!("../e2e-cluster/30-redis-sts.yaml")),
    (
        "40-test-clients.yaml",
        include_str!("../e2e-cluster/40-test-clients.yaml"),
    ),
];

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let modes = parse_args(args)?;
    if !crate::packages::is_root() {
        bail!("e2e cluster needs root (kube-kit, iptables, nft, bpftool, ip netns)");
    }
    crate::packages::ensure(crate::packages::CLUSTER_E2E, "e2e cluster")?;
    let paths = Paths::find()?;
    let mut timings = Timings::default();
    eprintln!(
        "e2e cluster: kit {}, home {}, modes {}",
        paths.kit.display(),
        paths.home.display(),
        modes.join(",")
    );

    timings.phase("build release binary", || {
        crate::cargo(&["build", "--release", "--bin", "ferry"], &[])
    })?;
    let ferry = paths.target.join("release/ferry");
    if !ferry.is_file() {
        bail!("{} missing after cargo build --release", ferry.display());
    }
    std::fs::create_dir_all(&paths.work).with_context(|| format!("creating {}", paths.work.display()))?;

    let mut guard = Teardown::new(&paths, &ferry);
    let outcome = stages(&paths, &ferry, &modes, &mut guard, &mut timings);
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            eprintln!("e2e cluster: FAILED: {e:#}");
            guard.diagnostics();
            let t = Instant::now();
            let _ = guard.finish();
            timings.add("teardown", t.elapsed());
            timings.print(started.elapsed());
            return Err(e);
        }
    };
    if report.failed() > 0 {
        guard.diagnostics();
    }
    let t = Instant::now();
    let clean = guard.finish();
    timings.add("teardown", t.elapsed());
    report.print();
    timings.print(started.elapsed());
    clean.context("teardown")?;
    if report.failed() > 0 {
        bail!(
            "e2e cluster: {} of {} checks failed",
            report.failed(),
            report.rows.len()
        );
    }
    eprintln!("e2e cluster: all {} checks passed", report.rows.len());
    Ok(())
}

fn parse_args(args: &[String]) -> anyhow::Result<Vec<&'static str>> {
    let mut modes: Vec<&'static str> = MODES.to_vec();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--modes" => {
                let v = it.next().context("--modes needs a value, e.g. iptables,ebpf")?;
                modes = Vec::new();
                for m in v.split(',') {
                    let Some(known) = MODES.iter().find(|k| **k == m) else {
                        bail!("--modes: unknown mode {m:?} (iptables, nftables, ebpf)");
                    };
                    modes.push(known);
                }
            }
            other => bail!("e2e cluster: unknown argument {other:?} (usage: cargo xtask e2e cluster [--modes iptables,nftables,ebpf])"),
        }
    }
    Ok(modes)
}

/// Where things are: the checkout, the kit, its home, the cargo target dir and
/// this test's scratch directory (kept after the run for inspection).
struct Paths {
    kit: PathBuf,
    home: PathBuf,
    target: PathBuf,
    work: PathBuf,
}

impl Paths {
    fn find() -> anyhow::Result<Paths> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let kit = match std::env::var_os("KUBE_KIT") {
            Some(k) => PathBuf::from(k),
            None => repo.join("../shared/kit/kube-kit"),
        };
        if !kit.is_file() {
            bail!(
                "kube-kit not found at {} (it lives in shared/kit beside the checkout; or set KUBE_KIT=/path/to/kube-kit)",
                kit.display()
            );
        }
        let cwd = std::env::current_dir().context("current directory")?;
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => cwd.join(t),
            None => repo.join("target"),
        };
        let home = match std::env::var_os("KUBE_KIT_HOME") {
            Some(h) => PathBuf::from(h),
            // kubelet's unix socket paths limit the home to 68 characters.
            None if target.join("kube-kit").as_os_str().len() <= 68 => target.join("kube-kit"),
            None => PathBuf::from("/var/lib/kube-kit"),
        };
        let work = target.join("e2e-cluster");
        Ok(Paths {
            kit,
            home,
            target,
            work,
        })
    }

    fn kit_cmd(&self) -> Command {
        let mut c = Command::new(&self.kit);
        c.env("KUBE_KIT_HOME", &self.home);
        c
    }
}

// ------------------------------------------------------------------ the stages

/// Facts about the deployed workloads the checks compare against.
struct Facts {
    node_ip: String,
    pod_cidr: String,
    wp_ip: String,
    echo_ip: String,
    wp_pods: Vec<String>,
    sts0_ip: String,
}

fn stages(
    paths: &Paths,
    ferry: &Path,
    modes: &[&'static str],
    guard: &mut Teardown,
    timings: &mut Timings,
) -> anyhow::Result<Report> {
    let resolv = timings.phase("test resolver (nsd)", || start_resolver(&paths.work, guard))?;

    timings.phase("kube-kit up", || {
        guard.kit_up = true;
        let mut up = paths.kit_cmd();
        up.arg("up").env("KUBE_KIT_RESOLV_CONF", &resolv);
        // The first up installs packages and debootstraps: minutes, not more.
        inherit(&mut up, Duration::from_secs(1200))
    })?;
    let kube = Kube::new(&paths.home);
    guard.kube = Some(kube.clone());

    timings.phase("ferry image", || build_image(paths, ferry))?;

    let first = modes.first().copied().unwrap_or(DEFAULT_MODE);
    let facts = timings.phase("deploy ferry and workloads", || deploy(paths, ferry, &kube, first))?;
    eprintln!(
        "e2e cluster: node {}, wp-svc {}, echo-svc {}, wp pods {:?}, redis-sts-0 {}",
        facts.node_ip, facts.wp_ip, facts.echo_ip, facts.wp_pods, facts.sts0_ip
    );
    let client_net = timings.phase("client namespace", || {
        guard.netns = true;
        make_client_netns(&facts.node_ip, &facts.pod_cidr)
    })?;
    eprintln!("e2e cluster: client namespace {NETNS} at {client_net}");

    let mut report = Report::default();
    let mut previous: Option<&str> = None;
    for mode in modes {
        let t = Instant::now();
        mode_checks(&kube, &facts, mode, previous, &mut report);
        timings.add(&format!("mode {mode}"), t.elapsed());
        previous = Some(mode);
    }
    // End on the default mode, so the last mode's removal is checked as well.
    if previous.is_some() && previous != Some(DEFAULT_MODE) {
        let t = Instant::now();
        let label = format!("{DEFAULT_MODE} (back)");
        let ok = report.check(&label, "switch + ferry Ready", || {
            let old = ferry_pod(&kube);
            switch_mode(&kube, DEFAULT_MODE)?;
            wait_ferry_ready(&kube, Some(&old))
        });
        if ok {
            report.check(&label, "active, nothing of other modes left", || {
                leftovers(DEFAULT_MODE)
            });
            report.check(&label, "ClusterIP reaches both wp pods", || {
                round_robin_clusterip(&kube, &facts)
            });
        }
        timings.add(&label, t.elapsed());
    }
    Ok(report)
}

/// nsd serving the test zone on 127.0.0.99:53, and a resolv.conf naming it
/// for kubelet (`dnsPolicy: Default` pods, ferry among them, get it).
fn start_resolver(work: &Path, guard: &mut Teardown) -> anyhow::Result<PathBuf> {
    let dir = work.join("resolver");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let zone = dir.join(format!("{TEST_ZONE}.zone"));
    std::fs::write(
        &zone,
        format!(
            "$ORIGIN {TEST_ZONE}.\n$TTL 30\n@ IN SOA ns hostmaster 1 3600 600 86400 30\n@ IN NS ns\nns IN A {RESOLVER_IP}\nwww IN A {TEST_NAME_IP}\n"
        ),
    )?;
    let d = dir.display();
    let conf = dir.join("nsd.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  ip-address: {RESOLVER_IP}@53\n  do-ip6: no\n  server-count: 1\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 1\nremote-control:\n  control-enable: no\nzone:\n  name: {TEST_ZONE}\n  zonefile: \"{}\"\n",
            zone.display()
        ),
    )?;
    let child = Command::new("nsd")
        .args(["-d", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nsd (package nsd)")?;
    guard.resolver = Some(crate::child::Stopped(child));
    eventually("nsd answers the test zone", Duration::from_secs(20), || {
        let out = capture(
            Command::new("dig").args([
                "+short",
                "+time=1",
                "+tries=1",
                &format!("@{RESOLVER_IP}"),
                TEST_NAME,
                "A",
            ]),
            Duration::from_secs(5),
        )?;
        if out.stdout.trim() == TEST_NAME_IP {
            Ok(())
        } else {
            bail!("dig said {:?} {:?}", out.stdout.trim(), out.stderr.trim())
        }
    })?;
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {RESOLVER_IP}\n"))?;
    Ok(resolv)
}

/// The release binary (debug info stripped: a smaller layer) on the kit's
/// Debian layer, which has glibc and the iptables, nftables and conntrack
/// tools the dataplanes call.
fn build_image(paths: &Paths, ferry: &Path) -> anyhow::Result<()> {
    let dir = paths.work.join("image");
    let _ = std::fs::remove_dir_all(&dir);
    let bin = dir.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    let dest = bin.join("ferry");
    let stripped = capture(
        Command::new("objcopy").arg("--strip-debug").arg(ferry).arg(&dest),
        Duration::from_secs(120),
    );
    if !matches!(stripped, Ok(ref o) if o.ok()) {
        std::fs::copy(ferry, &dest).with_context(|| format!("copying {}", ferry.display()))?;
    }
    let mut image = paths.kit_cmd();
    image
        .args(["image", "--debian", "-e", "/usr/local/bin/ferry"])
        .arg(&dir)
        .args([IMAGE, "node"]);
    inherit(&mut image, Duration::from_secs(600))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn deploy(paths: &Paths, ferry: &Path, kube: &Kube, mode: &str) -> anyhow::Result<Facts> {
    let out = capture(
        Command::new(ferry).args([
            "render",
            "--what",
            "manifests",
            "--image",
            IMAGE,
            "--config",
            &format!("APISERVER={APISERVER}"),
            "--config",
            &format!("INGRESS_CLASS={INGRESS_CLASS}"),
            "--config",
            &format!("PROXY_MODE={mode}"),
        ]),
        Duration::from_secs(30),
    )?;
    if !out.ok() {
        bail!("ferry render --what manifests failed: {}", out.stderr.trim());
    }
    let manifests = paths.work.join("ferry.yaml");
    std::fs::write(&manifests, &out.stdout)?;
    kube.run(&["apply", "-f", &manifests.display().to_string()])?;

    let dir = paths.work.join("workloads");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for (name, text) in WORKLOADS {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        kube.run(&["apply", "-f", &path.display().to_string()])?;
    }
    for what in ["deploy/wp-dep", "deploy/echo", "sts/redis-sts"] {
        kube.run_t(&["rollout", "status", what, "--timeout=180s"], Duration::from_secs(200))?;
    }
    kube.run_t(
        &["wait", "--for=condition=Ready", "pod/e2e-client", "--timeout=120s"],
        Duration::from_secs(130),
    )?;

    let node_ip = kube.run(&[
        "get",
        "node",
        "kube-kit-node",
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
    ])?;
    let svc_ip = |name: &str| kube.run(&["get", "svc", name, "-o", "jsonpath={.spec.clusterIP}"]);
    let wp_pods: Vec<String> = kube
        .run(&[
            "get",
            "pods",
            "-l",
            "app=wp-dep",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if wp_pods.len() != 2 {
        bail!("expected 2 wp-dep pods, got {wp_pods:?}");
    }
    let pod_cidr = kube.run(&["get", "node", "kube-kit-node", "-o", "jsonpath={.spec.podCIDR}"])?;
    Ok(Facts {
        node_ip: node_ip.trim().to_string(),
        pod_cidr: pod_cidr.trim().to_string(),
        wp_ip: svc_ip("wp-svc")?.trim().to_string(),
        echo_ip: svc_ip("echo-svc")?.trim().to_string(),
        wp_pods,
        sts0_ip: kube
            .run(&["get", "pod", "redis-sts-0", "-o", "jsonpath={.status.podIP}"])?
            .trim()
            .to_string(),
    })
}

/// A namespace standing for a host outside the node: a veth to the host,
/// a private /30 and routes to the node IP and the pod CIDR (where the eBPF
/// socket LB sends a local process's connections) through it. No default route.
fn make_client_netns(node_ip: &str, pod_cidr: &str) -> anyhow::Result<String> {
    let used = format!(
        "{}\n{}",
        capture(Command::new("ip").args(["-4", "-o", "addr"]), Duration::from_secs(10))?.stdout,
        capture(Command::new("ip").args(["-4", "route"]), Duration::from_secs(10))?.stdout
    );
    let net = CLIENT_NETS
        .iter()
        .find(|n| {
            let prefix: Vec<&str> = n.split('.').take(3).collect();
            !used.contains(&format!("{}.", prefix.join(".")))
        })
        .context("no free /30 for the client namespace among the candidates")?;
    let base: Vec<&str> = net.split('.').collect();
    let last: u8 = base[3].parse().context("candidate /30")?;
    let host = format!("{}.{}.{}.{}", base[0], base[1], base[2], last + 1);
    let client = format!("{}.{}.{}.{}", base[0], base[1], base[2], last + 2);
    let _ = capture(
        Command::new("ip").args(["netns", "del", NETNS]),
        Duration::from_secs(10),
    );
    let steps: Vec<Vec<String>> = vec![
        vec!["netns".into(), "add".into(), NETNS.into()],
        vec![
            "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS,
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "addr".into(),
            "add".into(),
            format!("{host}/30"),
            "dev".into(),
            VETH_HOST.into(),
        ],
        vec!["link".into(), "set".into(), VETH_HOST.into(), "up".into()],
        ns(&["addr", "add", &format!("{client}/30"), "dev", VETH_NS]),
        ns(&["link", "set", VETH_NS, "up"]),
        ns(&["link", "set", "lo", "up"]),
        ns(&["route", "add", &format!("{node_ip}/32"), "via", &host]),
        ns(&["route", "add", pod_cidr, "via", &host]),
    ];
    for args in steps {
        let out = capture(Command::new("ip").args(&args), Duration::from_secs(10))?;
        if !out.ok() {
            bail!("ip {}: {}", args.join(" "), out.stderr.trim());
        }
    }
    Ok(format!("{client}/30 (host side {host})"))
}

fn ns(args: &[&str]) -> Vec<String> {
    ["-n", NETNS].iter().chain(args).map(|s| s.to_string()).collect()
}

// ------------------------------------------------------------------ the checks

fn mode_checks(kube: &Kube, f: &Facts, mode: &str, previous: Option<&str>, report: &mut Report) {
    let ready = match previous {
        None => report.check(mode, "ferry Ready", || wait_ferry_ready(kube, None)),
        Some(_) => report.check(mode, "switch + ferry Ready", || {
            let old = ferry_pod(kube);
            switch_mode(kube, mode)?;
            wait_ferry_ready(kube, Some(&old))
        }),
    };
    if !ready {
        report.skip(mode, "the other checks", "ferry is not Ready");
        return;
    }
    report.check(mode, "active, nothing of other modes left", || leftovers(mode));
    for (what, name, want) in [
        (
            "DNS: Service name",
            "wp-svc.default.svc.cluster.local".to_string(),
            f.wp_ip.clone(),
        ),
        (
            "DNS: StatefulSet pod",
            "redis-sts-0.redis-svc.default.svc.cluster.local".to_string(),
            f.sts0_ip.clone(),
        ),
        (
            "DNS: test zone (upstream)",
            TEST_NAME.to_string(),
            TEST_NAME_IP.to_string(),
        ),
    ] {
        report.check(mode, what, || resolve(kube, &name, &want));
    }
    report.check(mode, "ClusterIP reaches both wp pods", || {
        round_robin_clusterip(kube, f)
    });
    report.check(mode, "ClusterIP keeps the pod's source address", || {
        source_kept(kube, f)
    });
    report.check(mode, "hairpin (pod -> own Service -> itself)", || hairpin(kube, f));
    report.check(mode, "NodePort from the node", || {
        let url = format!("http://{}:{NODE_PORT}/", f.node_ip);
        both_pods(f, "NodePort from the node", || curl(&[], &url))
    });
    report.check(mode, "NodePort from a client netns", || {
        let url = format!("http://{}:{NODE_PORT}/", f.node_ip);
        both_pods(f, "NodePort from the client namespace", || {
            curl(&["ip", "netns", "exec", NETNS], &url)
        })
    });
    report.check(mode, "Ingress wp.test alternates", || ingress_alternates(f));
    report.check(mode, "Ingress status = node IP", || ingress_status(kube, f));
    if previous.is_none() {
        report.check(
            mode,
            "Ingress annotations: redirect honoured, unknown -> Warning Event",
            || annotations(kube, f),
        );
    }
    report.check(mode, "TCP via ClusterIP survives restart", || long_lived(kube, f, mode));
}

fn switch_mode(kube: &Kube, mode: &str) -> anyhow::Result<()> {
    let patch = format!("{{\"data\":{{\"PROXY_MODE\":\"{mode}\"}}}}");
    kube.run(&[
        "-n",
        "ferry-system",
        "patch",
        "configmap",
        "ferry-config",
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    kube.run(&["-n", "ferry-system", "rollout", "restart", "ds/ferry"])?;
    Ok(())
}

/// `kubectl get pods -o OUTPUT` of the ferry DaemonSet's pods.
fn get_ferry_pods(kube: &Kube, output: &str) -> anyhow::Result<String> {
    kube.run(&[
        "-n",
        "ferry-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=ferry",
        "-o",
        output,
    ])
}

/// The name of the (one) ferry pod, empty when there is none.
fn ferry_pod(kube: &Kube) -> String {
    get_ferry_pods(kube, "name")
        .unwrap_or_default()
        .trim()
        .trim_start_matches("pod/")
        .to_string()
}

/// Waits until the rollout is done and the one ferry pod is Ready (its
/// readiness probe is /readyz: every part running, the proxy synced).
/// `old`: the pod before a restart, which must have been replaced.
fn wait_ferry_ready(kube: &Kube, old: Option<&str>) -> anyhow::Result<String> {
    let t = Instant::now();
    let status = kube.run_t(
        &["-n", "ferry-system", "rollout", "status", "ds/ferry", "--timeout=150s"],
        Duration::from_secs(160),
    );
    if let Err(e) = status {
        let pods = kube
            .run(&["-n", "ferry-system", "get", "pods", "-o", "wide"])
            .unwrap_or_default();
        bail!("{e:#}\n{pods}");
    }
    eventually("ferry pod Ready", Duration::from_secs(60), || {
        let out = get_ferry_pods(
            kube,
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        )?;
        let pods: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        match pods.as_slice() {
            [one]
                if one.ends_with(" True")
                    && one.split_whitespace().count() == 2
                    && Some(one.split_whitespace().next().unwrap_or("")) != old =>
            {
                Ok(format!(
                    "{} Ready after {:.0}s",
                    one.split_whitespace().next().unwrap_or(""),
                    t.elapsed().as_secs_f64()
                ))
            }
            _ => bail!("pods (old: {old:?}): {pods:?}"),
        }
    })
}

/// The current mode's kernel objects exist; the other modes' do not.
fn leftovers(mode: &str) -> anyhow::Result<String> {
    let state = DataplaneState::read()?;
    let mut problems = Vec::new();
    let seen = state.describe();
    for m in MODES {
        let present = state.has(m);
        if m == mode && !present {
            problems.push(format!("{m} mode is active but none of its objects are there"));
        }
        if m != mode && present {
            problems.push(format!("{m} objects left: {}", state.of(m)));
        }
    }
    if problems.is_empty() {
        Ok(seen)
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// What each dataplane leaves in the kernel, read with the admin tools.
struct DataplaneState {
    iptables: Vec<String>,
    nftables: Vec<String>,
    ebpf: Vec<String>,
}

impl DataplaneState {
    fn read() -> anyhow::Result<DataplaneState> {
        let mut iptables = Vec::new();
        for tool in [
            "iptables-save",
            "ip6tables-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ] {
            if let Ok(out) = capture(&mut Command::new(tool), Duration::from_secs(30)) {
                let n = out.stdout.lines().filter(|l| l.contains("FERRY")).count();
                if n > 0 {
                    iptables.push(format!("{tool}: {n} FERRY lines"));
                }
            }
        }
        let tables = capture(Command::new("nft").args(["list", "tables"]), Duration::from_secs(30))?;
        let nftables = tables
            .stdout
            .lines()
            .filter(|l| l.trim().starts_with("table ") && l.split_whitespace().nth(2) == Some("ferry"))
            .map(|l| l.trim().to_string())
            .collect();
        let mut ebpf = Vec::new();
        let pinned = Path::new("/sys/fs/bpf/ferry");
        if let Ok(entries) = std::fs::read_dir(pinned) {
            let n = entries.count();
            ebpf.push(format!("{} ({n} entries)", pinned.display()));
        }
        for args in [&["cgroup", "tree"][..], &["net", "show"][..]] {
            if let Ok(out) = capture(Command::new("bpftool").args(args), Duration::from_secs(30)) {
                for l in out.stdout.lines().filter(|l| l.contains("ferry")) {
                    ebpf.push(format!(
                        "bpftool {}: {}",
                        args.join(" "),
                        l.split_whitespace().collect::<Vec<_>>().join(" ")
                    ));
                }
            }
        }
        Ok(DataplaneState {
            iptables,
            nftables,
            ebpf,
        })
    }

    fn of(&self, mode: &str) -> String {
        match mode {
            "iptables" => self.iptables.join(", "),
            "nftables" => self.nftables.join(", "),
            _ => self.ebpf.join(", "),
        }
    }

    fn has(&self, mode: &str) -> bool {
        !self.of(mode).is_empty()
    }

    fn describe(&self) -> String {
        MODES
            .iter()
            .filter(|m| self.has(m))
            .map(|m| format!("{m}: {}", self.of(m)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// busybox nslookup in the client pod, against the kube-dns ClusterIP.
fn resolve(kube: &Kube, name: &str, want: &str) -> anyhow::Result<String> {
    eventually(&format!("{name} -> {want}"), Duration::from_secs(30), || {
        let out = kube.exec(
            "e2e-client",
            &["nslookup", "-type=a", name, KUBE_DNS_IP],
            Duration::from_secs(20),
        )?;
        let answers: Vec<&str> = out
            .split("Name:")
            .skip(1)
            .flat_map(|block| block.lines().filter_map(|l| l.strip_prefix("Address:")).map(str::trim))
            .collect();
        if answers == [want] {
            Ok(format!("{name} = {want}"))
        } else {
            bail!("answers {answers:?}; output: {}", out.trim())
        }
    })
}

/// `n` HTTP/1.0 GETs from a pod, one connection each; the busybox httpd
/// stand-ins answer their hostname. Returns the answers in order.
fn pod_gets(kube: &Kube, pod: &str, ip: &str, port: u16, n: usize) -> anyhow::Result<Vec<String>> {
    pod_gets_path(kube, pod, ip, port, "/", n)
}

/// `pod_gets` of `path`: the last line of each answer.
fn pod_gets_path(kube: &Kube, pod: &str, ip: &str, port: u16, path: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let script = format!(
        "for i in $(seq 1 {n}); do printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc {ip} {port} | tail -n 1; echo; done"
    );
    let out = kube.exec(pod, &["sh", "-c", &script], Duration::from_secs(10 + 6 * n as u64))?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn both_pods(f: &Facts, what: &str, mut get: impl FnMut() -> anyhow::Result<String>) -> anyhow::Result<String> {
    eventually(what, Duration::from_secs(30), || {
        let mut answers = Vec::new();
        for _ in 0..PROBES {
            answers.push(get().unwrap_or_else(|e| format!("<{e:#}>")));
        }
        verdict_both(f, &answers)
    })
}

/// Every answer is one of the two wp pods, and both answered.
fn verdict_both(f: &Facts, answers: &[String]) -> anyhow::Result<String> {
    let counts: Vec<usize> = f
        .wp_pods
        .iter()
        .map(|p| answers.iter().filter(|a| *a == p).count())
        .collect();
    let stray: Vec<&String> = answers.iter().filter(|a| !f.wp_pods.contains(a)).collect();
    if answers.len() == PROBES && stray.is_empty() && counts.iter().all(|c| *c > 0) {
        Ok(format!("{PROBES} requests: {} / {}", counts[0], counts[1]))
    } else {
        bail!("{} answers, per pod {counts:?}, others {stray:?}", answers.len())
    }
}

fn round_robin_clusterip(kube: &Kube, f: &Facts) -> anyhow::Result<String> {
    eventually("ClusterIP from the client pod", Duration::from_secs(30), || {
        let answers = pod_gets(kube, "e2e-client", &f.wp_ip, 80, PROBES)?;
        verdict_both(f, &answers)
    })
}

/// Pod → ClusterIP → pod keeps the client pod's address (no masquerade for
/// traffic from inside the cluster CIDRs, which ferry takes from the Nodes'
/// podCIDRs when `CLUSTER_CIDR` is empty, as shipped).
fn source_kept(kube: &Kube, f: &Facts) -> anyhow::Result<String> {
    let me = kube.run(&["get", "pod", "e2e-client", "-o", "jsonpath={.status.podIP}"])?;
    let me = me.trim().to_string();
    eventually("client address through the ClusterIP", Duration::from_secs(30), || {
        let seen = pod_gets_path(kube, "e2e-client", &f.wp_ip, 80, "/cgi-bin/ip", 4)?;
        // httpd listens dual-stack: an IPv4 peer reads `[::ffff:a.b.c.d]`.
        let plain = |a: &String| {
            let a = a.trim_start_matches('[').trim_end_matches(']');
            a.strip_prefix("::ffff:").unwrap_or(a).to_string()
        };
        if seen.len() == 4 && seen.iter().all(|a| plain(a) == me) {
            Ok(format!("the backends saw {me}, the client pod's own address"))
        } else {
            bail!("client pod {me}; the backends saw {seen:?}")
        }
    })
}

/// A wp pod asks its own Service until the answer is itself: with two
/// endpoints about half the answers must be.
fn hairpin(kube: &Kube, f: &Facts) -> anyhow::Result<String> {
    let me = &f.wp_pods[0];
    eventually("hairpin", Duration::from_secs(30), || {
        let answers = pod_gets(kube, me, &f.wp_ip, 80, PROBES)?;
        let own = answers.iter().filter(|a| *a == me).count();
        let stray = answers.iter().filter(|a| !f.wp_pods.contains(a)).count();
        if answers.len() == PROBES && own > 0 && stray == 0 {
            Ok(format!("{me}: {own} of {PROBES} answers from itself"))
        } else {
            bail!(
                "{} answers, {own} from itself, {stray} others: {answers:?}",
                answers.len()
            )
        }
    })
}

/// curl from the host (or with a prefix, e.g. from the client namespace);
/// the body is the answering pod's hostname.
fn curl(prefix: &[&str], url: &str) -> anyhow::Result<String> {
    curl_args(prefix, &[url])
}

fn curl_args(prefix: &[&str], args: &[&str]) -> anyhow::Result<String> {
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["curl", "-gsS", "--max-time", "5"]);
    all.extend(args);
    let out = capture(Command::new(all[0]).args(&all[1..]), Duration::from_secs(10))?;
    if !out.ok() {
        bail!("{}", out.stderr.trim());
    }
    Ok(out.stdout.trim().to_string())
}

/// `curl --resolve wp.test:80:NODE_IP http://wp.test/`: the seed's Ingress
/// through ferry's ingress on the node's port 80 alternates between the pods.
fn ingress_alternates(f: &Facts) -> anyhow::Result<String> {
    let resolve = format!("wp.test:80:{}", f.node_ip);
    eventually("Ingress wp.test", Duration::from_secs(30), || {
        let mut answers = Vec::new();
        for _ in 0..8 {
            answers.push(
                curl_args(&[], &["--resolve", &resolve, "http://wp.test/"]).unwrap_or_else(|e| format!("<{e:#}>")),
            );
        }
        let alternating = answers.windows(2).all(|w| w[0] != w[1]);
        let ours = answers.iter().all(|a| f.wp_pods.contains(a));
        if ours && alternating {
            Ok(answers.join(" "))
        } else {
            bail!("answers {answers:?}")
        }
    })
}

fn ingress_status(kube: &Kube, f: &Facts) -> anyhow::Result<String> {
    eventually("Ingress status", Duration::from_secs(60), || {
        let ips = kube.run(&[
            "get",
            "ingress",
            "wp-ing",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[*].ip}",
        ])?;
        if ips.split_whitespace().collect::<Vec<_>>() == [f.node_ip.as_str()] {
            Ok(format!("status.loadBalancer.ingress = {}", ips.trim()))
        } else {
            bail!("status.loadBalancer.ingress ips {ips:?}")
        }
    })
}

/// An Ingress with ingress-nginx annotations: its `permanent-redirect`
/// is answered on the node's port 80, and the annotation ferry does not
/// know gets one Warning Event (`UnsupportedAnnotation`, naming it),
/// written by the leader.
fn annotations(kube: &Kube, f: &Facts) -> anyhow::Result<String> {
    const NAME: &str = "e2e-annotation-event";
    const ANNOTATION: &str = "nginx.ingress.kubernetes.io/e2e-made-up";
    const MOVED: &str = "https://moved.example.invalid/";
    let manifest = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {NAME}\n  namespace: default\n  annotations:\n    {ANNOTATION}: \"x\"\n    nginx.ingress.kubernetes.io/permanent-redirect: {MOVED}\n    nginx.ingress.kubernetes.io/permanent-redirect-code: \"308\"\nspec:\n  ingressClassName: {INGRESS_CLASS}\n  rules:\n  - host: e2e-annotation.test\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: wp-svc, port: {{number: 80}}}}}}}}\n"
    );
    let path = std::env::temp_dir().join(format!("ferry-e2e-{NAME}.yaml"));
    std::fs::write(&path, manifest)?;
    let path = path.display().to_string();
    kube.run(&["apply", "-f", &path])?;
    let resolve = format!("e2e-annotation.test:80:{}", f.node_ip);
    let redirect = eventually("the redirect", Duration::from_secs(30), || {
        let got = curl_args(
            &[],
            &[
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{redirect_url}",
                "http://e2e-annotation.test/x",
            ],
        )?;
        if got == format!("308 {MOVED}") {
            Ok(got)
        } else {
            bail!("answer {got:?}")
        }
    });
    let found = redirect.and_then(|r| {
        eventually("the Warning Event", Duration::from_secs(60), || {
            let out = kube.run(&[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("involvedObject.kind=Ingress,involvedObject.name={NAME},type=Warning"),
                "-o",
                "jsonpath={range .items[*]}{.reason}|{.message}{\"\\n\"}{end}",
            ])?;
            let hits: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with("UnsupportedAnnotation|") && l.contains(ANNOTATION))
                .collect();
            match hits.len() {
                1 => Ok(format!("{r}; {}", hits[0])),
                0 => bail!("no UnsupportedAnnotation Event yet; events: {out:?}"),
                n => bail!("{n} Events for one problem: {out:?}"),
            }
        })
    });
    let _ = kube.run(&["delete", "-f", &path, "--ignore-not-found"]);
    let _ = std::fs::remove_file(&path);
    found
}

/// One TCP connection from the client pod through echo-svc's ClusterIP
/// (busybox nc under `kubectl exec -i`, so the harness holds both ends of
/// the stream): it echoes before `rollout restart ds/ferry` and still echoes
/// once the new ferry pod is Ready.
fn long_lived(kube: &Kube, f: &Facts, mode: &str) -> anyhow::Result<String> {
    let mut conn = LineStream::spawn(kube.cmd(&["exec", "-i", "e2e-client", "--", "nc", &f.echo_ip, "9000"]))?;
    let before = format!("before-restart-{mode}");
    conn.round_trip(&before, Duration::from_secs(20))
        .context("the connection did not echo before the restart")?;
    let t = Instant::now();
    let old = ferry_pod(kube);
    kube.run(&["-n", "ferry-system", "rollout", "restart", "ds/ferry"])?;
    let ready = wait_ferry_ready(kube, Some(&old)).context("after rollout restart")?;
    let after = format!("after-restart-{mode}");
    conn.round_trip(&after, Duration::from_secs(20))
        .context("the connection did not echo after the restart")?;
    Ok(format!(
        "echoed before and after; {ready} ({:.0}s)",
        t.elapsed().as_secs_f64()
    ))
}

/// A child process fed lines on stdin whose stdout lines arrive on a channel.
struct LineStream {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl LineStream {
    fn spawn(mut cmd: Command) -> anyhow::Result<LineStream> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting kubectl exec")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineStream { child, stdin, lines })
    }

    fn round_trip(&mut self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        writeln!(self.stdin, "{text}").context("writing to the connection")?;
        self.stdin.flush()?;
        match self.lines.recv_timeout(timeout) {
            Ok(l) if l == text => Ok(()),
            Ok(l) => bail!("sent {text:?}, got {l:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("sent {text:?}, no echo within {}s", timeout.as_secs()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("sent {text:?}: the connection is closed ({:?})", self.child.try_wait())
            }
        }
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ teardown

/// Puts the machine back: runs on success, on error and (as Drop) on panic.
struct Teardown {
    kit: PathBuf,
    home: PathBuf,
    ferry: PathBuf,
    kit_up: bool,
    kube: Option<Kube>,
    netns: bool,
    resolver: Option<crate::child::Stopped>,
    done: bool,
}

impl Teardown {
    fn new(paths: &Paths, ferry: &Path) -> Teardown {
        Teardown {
            kit: paths.kit.clone(),
            home: paths.home.clone(),
            ferry: ferry.to_path_buf(),
            kit_up: false,
            kube: None,
            netns: false,
            resolver: None,
            done: false,
        }
    }

    /// What a failure needs to be understood: every pod, ferry's log.
    fn diagnostics(&self) {
        let Some(kube) = &self.kube else { return };
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["-n", "ferry-system", "logs", "ds/ferry", "--tail=150"][..],
            &["-n", "ferry-system", "logs", "ds/ferry", "--previous", "--tail=50"][..],
            &["get", "events", "-A", "--field-selector", "type=Warning"][..],
        ] {
            eprintln!("----- kubectl {}", args.join(" "));
            match kube.run(args) {
                Ok(out) => eprintln!("{out}"),
                Err(e) => eprintln!("({e:#})"),
            }
        }
    }

    /// Deletes ferry (so it stops programming), removes its kernel state
    /// with `ferry node --cleanup`, then `kube-kit down`, the client
    /// namespace and nsd. Every step runs even when an earlier one failed.
    fn finish(&mut self) -> anyhow::Result<()> {
        self.done = true;
        let mut errors = Vec::new();
        if let Some(kube) = self.kube.take() {
            if let Err(e) = kube.run_t(
                &[
                    "-n",
                    "ferry-system",
                    "delete",
                    "ds",
                    "ferry",
                    "--ignore-not-found",
                    "--wait=true",
                    "--timeout=60s",
                ],
                Duration::from_secs(70),
            ) {
                errors.push(format!("deleting ds/ferry: {e:#}"));
            }
            let _ = eventually("ferry pods gone", Duration::from_secs(60), || {
                let pods = kube.run(&["-n", "ferry-system", "get", "pods", "-o", "name"])?;
                if pods.trim().is_empty() {
                    Ok(())
                } else {
                    bail!("{pods}")
                }
            });
        }
        if self.kit_up {
            // What a user runs on each node after deleting ferry: every
            // proxy mode's state and the DNS takeover go.
            match capture(
                Command::new(&self.ferry).args(["node", "--cleanup"]),
                Duration::from_secs(60),
            ) {
                Ok(o) if o.ok() => {}
                Ok(o) => errors.push(format!("ferry node --cleanup: {}", o.stderr.trim())),
                Err(e) => errors.push(format!("ferry node --cleanup: {e:#}")),
            }
            let left = remove_dns_takeover();
            if !left.is_empty() {
                errors.push(format!(
                    "ferry node --cleanup left the DNS takeover (removed by the test): {}",
                    left.join(", ")
                ));
            }
            match DataplaneState::read() {
                Ok(s) if s.describe().is_empty() => {}
                Ok(s) => errors.push(format!("left after cleanup: {}", s.describe())),
                Err(e) => errors.push(format!("reading the dataplane state: {e:#}")),
            }
            let mut down = Command::new(&self.kit);
            down.env("KUBE_KIT_HOME", &self.home).arg("down");
            if let Err(e) = inherit(&mut down, Duration::from_secs(300)) {
                errors.push(format!("kube-kit down: {e:#}"));
            }
            self.kit_up = false;
        }
        if self.netns {
            let _ = capture(
                Command::new("ip").args(["link", "del", VETH_HOST]),
                Duration::from_secs(10),
            );
            if let Err(e) = capture(
                Command::new("ip").args(["netns", "del", NETNS]),
                Duration::from_secs(10),
            ) {
                errors.push(format!("ip netns del {NETNS}: {e:#}"));
            }
            self.netns = false;
        }
        self.resolver = None;
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("\n"))
        }
    }
}

/// Removes DNS takeover addresses (label lo:ferry-dns) and nftables tables
/// named ferry* that are still there; returns what it found.
fn remove_dns_takeover() -> Vec<String> {
    let mut found = Vec::new();
    let addrs = capture(
        Command::new("ip").args(["-o", "addr", "show", "dev", "lo"]),
        Duration::from_secs(10),
    )
    .map(|o| o.stdout)
    .unwrap_or_default();
    for line in addrs.lines().filter(|l| l.contains("ferry-dns")) {
        let mut words = line.split_whitespace().skip_while(|w| *w != "inet" && *w != "inet6");
        let (Some(_), Some(addr)) = (words.next(), words.next()) else {
            continue;
        };
        found.push(format!("{addr} on lo"));
        let _ = capture(
            Command::new("ip").args(["addr", "del", addr, "dev", "lo"]),
            Duration::from_secs(10),
        );
    }
    let tables = capture(Command::new("nft").args(["list", "tables"]), Duration::from_secs(10))
        .map(|o| o.stdout)
        .unwrap_or_default();
    for line in tables.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["table", family, name] = words.as_slice() {
            if name.starts_with("ferry") {
                found.push(format!("nft table {family} {name}"));
                let _ = capture(
                    Command::new("nft").args(["delete", "table", family, name]),
                    Duration::from_secs(10),
                );
            }
        }
    }
    found
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if !self.done {
            self.diagnostics();
            if let Err(e) = self.finish() {
                eprintln!("e2e cluster: teardown: {e:#}");
            }
        }
    }
}

// ------------------------------------------------------------------ kubectl

/// The kit's kubectl with its admin kubeconfig.
#[derive(Clone)]
struct Kube {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Kube {
    fn new(home: &Path) -> Kube {
        Kube {
            kubectl: home.join("bin/kubectl"),
            kubeconfig: home.join("kubeconfig"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        self.run_t(args, Duration::from_secs(60))
    }

    fn run_t(&self, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let out = capture(&mut self.cmd(args), timeout)?;
        if !out.ok() {
            bail!(
                "kubectl {}: {} {}",
                args.join(" "),
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        Ok(out.stdout)
    }

    fn exec(&self, pod: &str, cmd: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let mut args = vec!["exec", pod, "--"];
        args.extend(cmd);
        let out = capture(&mut self.cmd(&args), timeout)?;
        if !out.ok() && out.stdout.trim().is_empty() {
            bail!("kubectl exec {pod} -- {}: {}", cmd.join(" "), out.stderr.trim());
        }
        Ok(out.stdout)
    }
}

// ------------------------------------------------------------------ processes

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn pipe_reader(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

/// Waits for the child at most `timeout`; kills it after that.
fn wait_bounded(child: &mut Child, timeout: Duration, what: &str) -> anyhow::Result<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            return Ok(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: still running after {}s, killed", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command with stdout and stderr captured, bounded in time.
fn capture(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let out = pipe_reader(child.stdout.take());
    let err = pipe_reader(child.stderr.take());
    let code = wait_bounded(&mut child, timeout, &what)?;
    // A daemon the command left behind may hold the pipes: do not wait for it.
    let grace = Duration::from_secs(5);
    Ok(Output {
        code,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: err.recv_timeout(grace).unwrap_or_default(),
    })
}

/// Runs a command with this process's stdout and stderr, bounded in time.
fn inherit(cmd: &mut Command, timeout: Duration) -> anyhow::Result<()> {
    let what = describe(cmd);
    eprintln!("e2e cluster: {what}");
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    match wait_bounded(&mut child, timeout, &what)? {
        Some(0) => Ok(()),
        code => bail!("{what} failed (exit {code:?})"),
    }
}

/// Retries `f` once a second until it succeeds or `timeout` passes; the
/// error names the step and the last thing seen.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout || tries >= 1000 => {
                bail!("{what}: not within {}s ({tries} tries); last: {e:#}", timeout.as_secs())
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

// ------------------------------------------------------------------ reporting

#[derive(Default)]
struct Timings {
    phases: Vec<(String, Duration)>,
}

impl Timings {
    fn phase<T>(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        eprintln!("e2e cluster: == {name}");
        let t = Instant::now();
        let r = f();
        self.add(name, t.elapsed());
        r.with_context(|| format!("phase {name:?}"))
    }

    fn add(&mut self, name: &str, d: Duration) {
        eprintln!("e2e cluster: {name}: {:.1}s", d.as_secs_f64());
        self.phases.push((name.to_string(), d));
    }

    fn print(&self, total: Duration) {
        eprintln!("e2e cluster: timings");
        for (name, d) in &self.phases {
            eprintln!("  {name:<32} {:>7.1}s", d.as_secs_f64());
        }
        eprintln!("  {:<32} {:>7.1}s", "total", total.as_secs_f64());
    }
}

struct Row {
    mode: String,
    check: String,
    result: Result<String, String>,
    took: Duration,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Runs one check, prints and records its outcome; true when it passed.
    fn check<T: std::fmt::Display>(&mut self, mode: &str, check: &str, f: impl FnOnce() -> anyhow::Result<T>) -> bool {
        let t = Instant::now();
        let result = f().map(|v| v.to_string()).map_err(|e| format!("{e:#}"));
        let took = t.elapsed();
        match &result {
            Ok(detail) => eprintln!(
                "e2e cluster: PASS [{mode}] {check} ({:.1}s): {detail}",
                took.as_secs_f64()
            ),
            Err(why) => eprintln!("e2e cluster: FAIL [{mode}] {check} ({:.1}s): {why}", took.as_secs_f64()),
        }
        let ok = result.is_ok();
        self.rows.push(Row {
            mode: mode.to_string(),
            check: check.to_string(),
            result,
            took,
        });
        ok
    }

    fn skip(&mut self, mode: &str, check: &str, why: &str) {
        eprintln!("e2e cluster: SKIP [{mode}] {check}: {why}");
        self.rows.push(Row {
            mode: mode.to_string(),
            check: check.to_string(),
            result: Err(format!("skipped: {why}")),
            took: Duration::ZERO,
        });
    }

    fn failed(&self) -> usize {
        self.rows.iter().filter(|r| r.result.is_err()).count()
    }

    fn print(&self) {
        eprintln!("e2e cluster: results");
        for r in &self.rows {
            let (tag, first) = match &r.result {
                Ok(d) => ("pass", d.lines().next().unwrap_or("").to_string()),
                Err(e) => ("FAIL", e.lines().next().unwrap_or("").to_string()),
            };
            let first: String = first.chars().take(110).collect();
            eprintln!(
                "  {tag} {:<18} {:<40} {:>5.1}s  {first}",
                r.mode,
                r.check,
                r.took.as_secs_f64()
            );
        }
    }
}
