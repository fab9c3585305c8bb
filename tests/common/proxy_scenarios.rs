//! The Service proxy's e2e scenarios, written once and run against every
//! dataplane (`Mode`): tests/proxy_e2e.rs runs them for iptables; the eBPF
//! tests can run the same functions with an eBPF `Mode`.
//!
//! Each scenario builds its own `Topology`, writes manifests (pods are
//! 10.244.0.10-12; pod0 is on this node "node-a", pod1 and pod2 on
//! "node-b"), runs `ferry proxy` in the node namespace and checks traffic
//! from the node, from pods and from the client namespace. All three pods
//! physically sit on the node's bridge, but only pod0 is declared local, so
//! pod-originated traffic comes from pod0: a real pod1 would live on node-b
//! and hairpin there (ferry installs hairpin rules for local endpoints and
//! those of unknown node only; `hairpin_without_node_name` tests the latter).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::netns::*;

/// A dataplane under test.
pub struct Mode {
    pub name: &'static str,
    /// Extra `ferry proxy` flags (`--mode ...` and mode options).
    pub args: Vec<String>,
    /// A command ferry runs under inside the node namespace (e.g.
    /// `unshare --cgroup`); empty: none.
    pub wrap: Vec<String>,
    /// What of ours is still in the node namespace after `--cleanup`
    /// (empty = clean).
    pub leftovers: fn(node_ns: &str) -> Vec<String>,
}

impl Mode {
    pub fn iptables() -> Mode {
        Mode {
            name: "iptables",
            args: ["--mode", "iptables", "--iptables-backend", "nft"]
                .map(String::from)
                .to_vec(),
            wrap: Vec::new(),
            leftovers: iptables_leftovers,
        }
    }
}

impl Mode {
    /// ferry's own nftables table (`--mode nftables`).
    pub fn nftables() -> Mode {
        Mode {
            name: "nftables",
            args: ["--mode", "nftables"].map(String::from).to_vec(),
            wrap: Vec::new(),
            leftovers: nftables_leftovers,
        }
    }
}

/// Our tables (`ip ferry`, `ip6 ferry`) and any iptables chain of ours.
fn nftables_leftovers(node_ns: &str) -> Vec<String> {
    let mut out = iptables_leftovers(node_ns);
    if let Ok(text) = ns_sh(node_ns, "nft", &["list", "tables"]) {
        out.extend(
            text.lines()
                .filter(|l| l.trim().ends_with(" ferry"))
                .map(|l| format!("nft: {l}")),
        );
    }
    out
}

fn iptables_leftovers(node_ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for tool in ["iptables-nft-save", "iptables-legacy-save"] {
        if let Ok(text) = ns_sh(node_ns, tool, &[]) {
            out.extend(
                text.lines()
                    .filter(|l| l.contains("FERRY"))
                    .map(|l| format!("{tool}: {l}")),
            );
        }
    }
    out
}

pub const ADMIN: &str = "127.0.0.1:9901";

/// `ferry proxy` running in the node namespace; killed on drop.
pub struct Ferry {
    child: Option<Child>,
    node: String,
}

impl Ferry {
    pub fn start(topo: &Topology, mode: &Mode, manifests: &Path) -> anyhow::Result<Ferry> {
        Ferry::start_with(topo, mode, manifests, &[])
    }

    /// `start` with extra `ferry proxy` flags.
    pub fn start_with(topo: &Topology, mode: &Mode, manifests: &Path, extra: &[&str]) -> anyhow::Result<Ferry> {
        let mut flags = vec!["--node-name", "node-a"];
        flags.extend(extra);
        Ferry::launch(topo, mode, manifests, &flags)
    }

    /// `start` without `--node-name` (nor $NODE_NAME): ferry falls back
    /// to the hostname, which no endpoint names.
    pub fn start_nameless(topo: &Topology, mode: &Mode, manifests: &Path) -> anyhow::Result<Ferry> {
        Ferry::launch(topo, mode, manifests, &[])
    }

    fn launch(topo: &Topology, mode: &Mode, manifests: &Path, extra: &[&str]) -> anyhow::Result<Ferry> {
        let bin = env!("CARGO_BIN_EXE_ferry");
        let dir = manifests.to_string_lossy().into_owned();
        let mut args: Vec<String> = ["netns", "exec", &topo.node].map(String::from).to_vec();
        args.extend(mode.wrap.iter().cloned());
        args.extend([bin, "proxy", "-f", &dir].map(String::from));
        args.extend(mode.args.iter().cloned());
        args.extend(
            [
                "--node-ip",
                "192.0.2.1",
                "--cluster-cidr",
                POD_CIDR,
                "--min-sync-interval",
                "100ms",
                "--debounce-ms",
                "50",
                "--admin-addr",
                ADMIN,
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = Command::new("ip")
            .args(&args)
            .env_remove("NODE_NAME")
            .stdin(Stdio::null())
            .spawn()
            .context("starting ferry proxy")?;
        let ferry = Ferry {
            child: Some(child),
            node: topo.node.clone(),
        };
        let admin: SocketAddr = ADMIN.parse()?;
        let ready = wait_until(Duration::from_secs(30), || {
            in_netns(&topo.node, move || {
                http_get(admin, "/readyz").map(|(s, _)| s.contains(" 200"))
            })
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false)
        });
        ensure!(ready, "ferry proxy ({}) did not become ready", mode.name);
        Ok(ferry)
    }

    /// SIGTERM and wait (bounded); ferry leaves its rules in place.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id())?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let exited = wait_until(Duration::from_secs(10), || matches!(child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ferry did not exit on SIGTERM");
        }
        Ok(())
    }

    pub fn healthz(&self) -> anyhow::Result<(String, String)> {
        let admin: SocketAddr = ADMIN.parse()?;
        Ok(in_netns(&self.node, move || http_get(admin, "/healthz"))??)
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temporary manifest directory.
pub struct Manifests {
    pub dir: PathBuf,
}

impl Manifests {
    pub fn new(yaml: &str) -> anyhow::Result<Manifests> {
        let dir = std::env::temp_dir().join(format!(
            "ferry-e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let m = Manifests { dir };
        m.write(yaml)?;
        Ok(m)
    }

    /// Replaces the manifest atomically (rename), as an editor or kubectl would.
    pub fn write(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.dir.join("cluster.yaml"))?;
        Ok(())
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn service(name: &str, ip: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: e2e}}\nspec:\n  clusterIP: {ip}\n{spec}\n")
}

/// An EndpointSlice with the given pods (indices), TCP 8080 as `tcp` and UDP 5353 as `dns`.
fn slice(service: &str, pods: &[usize]) -> String {
    let mut eps = String::new();
    for &i in pods {
        let node = if i == 0 { "node-a" } else { "node-b" };
        eps.push_str(&format!(
            "- addresses: [10.244.0.{}]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, name: pod{i}}}\n",
            10 + i
        ));
    }
    if pods.is_empty() {
        eps.push_str("[]\n");
    }
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:{}{eps}",
        if pods.is_empty() { " " } else { "\n" }
    )
}

pub const WEB_VIP: &str = "10.96.0.10";
const STICKY_VIP: &str = "10.96.0.11";
const LOCAL_VIP: &str = "10.96.0.12";
const EMPTY_VIP: &str = "10.96.0.13";
const SHRINK_VIP: &str = "10.96.0.14";

/// The cluster of every scenario; `shrink_pods` are the endpoints of `shrink`.
pub fn cluster_yaml(shrink_pods: &[usize]) -> String {
    let ports = "  ports:\n  - {name: tcp, port: 80, targetPort: 8080, protocol: TCP";
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: e2e}\n");
    y += &service(
        "web",
        WEB_VIP,
        &format!("  type: NodePort\n{ports}, nodePort: 30080}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}"),
    );
    y += &slice("web", &[0, 1, 2]);
    y += &service(
        "sticky",
        STICKY_VIP,
        &format!("  type: NodePort\n  sessionAffinity: ClientIP\n{ports}, nodePort: 30081}}"),
    );
    y += &slice("sticky", &[0, 1, 2]);
    y += &service(
        "local",
        LOCAL_VIP,
        &format!("  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 30300\n{ports}, nodePort: 30082}}"),
    );
    y += &slice("local", &[0, 1, 2]);
    y += &service("empty", EMPTY_VIP, &format!("{ports}}}"));
    y += &service("shrink", SHRINK_VIP, &format!("{ports}}}"));
    y += &slice("shrink", shrink_pods);
    y
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])), port)
}

pub fn distinct(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

pub fn all_pods() -> BTreeSet<String> {
    ["pod0", "pod1", "pod2"].map(String::from).into_iter().collect()
}

/// ClusterIP over TCP and UDP reaches all 3 pods from the node and from a
/// pod (including the pod reaching itself: hairpin); NodePort from outside.
pub fn cluster_ip_and_node_port(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyA")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let _ferry = Ferry::start(&topo, mode, &m.dir)?;
    let web = addr(WEB_VIP, 80);
    let dns = addr(WEB_VIP, 53);
    let from_node = in_netns(&topo.node, move || tcp_names(web, 40))?;
    ensure!(distinct(&from_node) == all_pods(), "TCP from node: {from_node:?}");
    let udp_from_node = in_netns(&topo.node, move || udp_names(dns, 40))?;
    ensure!(
        distinct(&udp_from_node) == all_pods(),
        "UDP from node: {udp_from_node:?}"
    );
    let from_pod = in_netns(&topo.pods[0].ns, move || tcp_names(web, 40))?;
    ensure!(
        distinct(&from_pod) == all_pods(),
        "TCP from pod0 (incl. hairpin): {from_pod:?}"
    );
    let udp_from_pod = in_netns(&topo.pods[0].ns, move || udp_names(dns, 40))?;
    ensure!(distinct(&udp_from_pod) == all_pods(), "UDP from pod0: {udp_from_pod:?}");
    let np = addr("192.0.2.1", 30080);
    let from_client = in_netns(&topo.client, move || tcp_names(np, 40))?;
    ensure!(
        distinct(&from_client) == all_pods(),
        "NodePort from client: {from_client:?}"
    );
    let admin: SocketAddr = ADMIN.parse()?;
    let (status, metrics) = in_netns(&topo.node, move || http_get(admin, "/metrics"))??;
    ensure!(status.contains(" 200"), "/metrics: {status}");
    for name in [
        "ferry_proxy_sync_full_duration_seconds_count 1",
        "ferry_proxy_rules ",
        "ferry_proxy_last_successful_sync_timestamp_seconds ",
        "ferry_proxy_sync_failures_total 0",
    ] {
        ensure!(metrics.contains(name), "/metrics lacks {name:?}:\n{metrics}");
    }
    Ok(())
}

/// ClientIP affinity pins a client; externalTrafficPolicy Local sends
/// outside traffic only to the local endpoint; the healthCheckNodePort
/// answers 200 with the local endpoint count.
pub fn affinity_and_local_policy(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyB")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let _ferry = Ferry::start(&topo, mode, &m.dir)?;
    let sticky_np = addr("192.0.2.1", 30081);
    let names = in_netns(&topo.client, move || tcp_names(sticky_np, 15))?;
    ensure!(
        distinct(&names).len() == 1 && !names[0].starts_with("ERR"),
        "affinity via NodePort: {names:?}"
    );
    let sticky = addr(STICKY_VIP, 80);
    let names = in_netns(&topo.pods[0].ns, move || tcp_names(sticky, 15))?;
    ensure!(
        distinct(&names).len() == 1 && !names[0].starts_with("ERR"),
        "affinity via ClusterIP: {names:?}"
    );
    let local_np = addr("192.0.2.1", 30082);
    let names = in_netns(&topo.client, move || tcp_names(local_np, 30))?;
    ensure!(
        distinct(&names) == ["pod0".to_string()].into_iter().collect(),
        "eTP Local via NodePort from outside: {names:?}"
    );
    // Inside the cluster, the ClusterIP of the same service uses every endpoint.
    let local_vip = addr(LOCAL_VIP, 80);
    let names = in_netns(&topo.pods[0].ns, move || tcp_names(local_vip, 40))?;
    ensure!(
        distinct(&names) == all_pods(),
        "eTP Local service's ClusterIP: {names:?}"
    );
    let hc = addr("192.0.2.1", 30300);
    let (status, body) = in_netns(&topo.client, move || http_get(hc, "/healthz"))??;
    ensure!(status.contains(" 200"), "health check status: {status}");
    ensure!(body.contains("\"localEndpoints\":1"), "health check body: {body}");
    Ok(())
}

/// A service without endpoints is refused at once (curl exit 7, not a
/// timeout); removing an endpoint from the file stops new connections to it.
pub fn reject_and_endpoint_removal(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyC")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let _ferry = Ferry::start(&topo, mode, &m.dir)?;
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.pods[0].ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
        ])
        .arg(format!("http://{EMPTY_VIP}/"))
        .status()?;
    ensure!(
        status.code() == Some(7),
        "curl to a service without endpoints: {status} (want exit 7, refused)"
    );
    let empty = addr(EMPTY_VIP, 80);
    let err = in_netns(&topo.node, move || tcp_name(empty))?;
    ensure!(
        matches!(&err, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "TCP from node to a service without endpoints: {err:?}"
    );
    let shrink = addr(SHRINK_VIP, 80);
    let before = in_netns(&topo.pods[0].ns, move || tcp_names(shrink, 40))?;
    ensure!(distinct(&before) == all_pods(), "before removal: {before:?}");
    m.write(&cluster_yaml(&[0, 1]))?;
    let changed = Instant::now();
    let pod0 = topo.pods[0].ns.clone();
    // 30 connections in a row missing pod2: (2/3)^30 ≈ 5e-6 by chance
    // before the change lands (10 passed by chance once in CI).
    let gone = wait_until(Duration::from_secs(10), || {
        let ns = pod0.clone();
        in_netns(&ns, move || tcp_names(shrink, 30))
            .map(|n| !n.contains(&"pod2".to_string()))
            .unwrap_or(false)
    });
    let took = changed.elapsed();
    eprintln!(
        "{}: endpoint removal effective after {:.0} ms",
        mode.name,
        took.as_secs_f64() * 1000.0
    );
    ensure!(gone, "pod2 still reached 10 s after its removal");
    let after = in_netns(&topo.pods[0].ns, move || tcp_names(shrink, 40))?;
    ensure!(
        distinct(&after) == ["pod0", "pod1"].map(String::from).into_iter().collect(),
        "after removal: {after:?}"
    );
    Ok(())
}

/// Restarting ferry keeps an established connection; `--cleanup` leaves nothing.
pub fn restart_and_cleanup(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyD")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let mut ferry = Ferry::start(&topo, mode, &m.dir)?;
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<anyhow::Result<String>>();
    let ns = topo.pods[0].ns.clone();
    let web = addr(WEB_VIP, 80);
    let client = std::thread::spawn(move || {
        in_netns(&ns, move || -> anyhow::Result<(String, String)> {
            let mut s = TcpStream::connect_timeout(&web, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut r = BufReader::new(s.try_clone()?);
            s.write_all(b"one\n")?;
            let mut first = String::new();
            r.read_line(&mut first)?;
            let _ = to_test.send(Ok(first.trim().to_string()));
            from_test.recv_timeout(Duration::from_secs(60))?;
            s.write_all(b"two\n")?;
            let mut second = String::new();
            r.read_line(&mut second)?;
            Ok((first.trim().to_string(), second.trim().to_string()))
        })
    });
    let first = from_client.recv_timeout(Duration::from_secs(20))??;
    ensure!(first.starts_with("pod"), "first answer: {first}");
    ferry.stop()?;
    let mut ferry2 = Ferry::start(&topo, mode, &m.dir)?;
    let (status, _) = ferry2.healthz()?;
    ensure!(status.contains(" 200"), "healthz after restart: {status}");
    to_client.send(())?;
    let (a, b) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))???;
    ensure!(a == b, "connection moved or broke across restart: {a} then {b}");
    ferry2.stop()?;
    let bin = env!("CARGO_BIN_EXE_ferry");
    let mut args = vec!["netns", "exec", &topo.node];
    args.extend(mode.wrap.iter().map(String::as_str));
    args.extend([bin, "proxy", "--cleanup"]);
    args.extend(mode.args.iter().map(String::as_str));
    let out = sh("ip", &args)?;
    eprintln!("{out}");
    let left = (mode.leftovers)(&topo.node);
    ensure!(left.is_empty(), "left after --cleanup: {left:#?}");
    Ok(())
}

/// Switching modes (stop one, start another on the same node) leaves
/// nothing of the old mode: nftables → iptables → nftables, each serving.
pub fn switching_modes_leaves_nothing_behind(_: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyM")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let web = addr(WEB_VIP, 80);
    let mut previous: Option<Mode> = None;
    for mode in [Mode::nftables(), Mode::iptables(), Mode::nftables()] {
        let mut ferry = Ferry::start(&topo, &mode, &m.dir)?;
        let names = in_netns(&topo.node, move || tcp_names(web, 30))?;
        ensure!(distinct(&names) == all_pods(), "{}: {names:?}", mode.name);
        if let Some(prev) = &previous {
            let left: Vec<String> = (prev.leftovers)(&topo.node)
                .into_iter()
                .filter(|l| match mode.name {
                    // What the running mode programs itself is not a leftover.
                    "iptables" => l.starts_with("nft:"),
                    _ => !l.starts_with("nft:"),
                })
                .collect();
            ensure!(
                left.is_empty(),
                "{} after {}: the old mode's rules are still there: {left:#?}",
                mode.name,
                prev.name
            );
        }
        ferry.stop()?;
        previous = Some(mode);
    }
    Ok(())
}

/// Hand-made slices without `nodeName`, and ferry without `--node-name`:
/// every pod reaching the Service, itself included (hairpin), gets an
/// answer from every pod — an endpoint of unknown node may be local, so
/// its hairpin traffic is masqueraded.
pub fn hairpin_without_node_name(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("fyH")?;
    let mut eps = String::new();
    for i in 0..3 {
        eps.push_str(&format!(
            "- addresses: [10.244.0.{}]\n  conditions: {{ready: true}}\n",
            10 + i
        ));
    }
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: e2e}}\n{}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: e2e\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\nendpoints:\n{eps}",
        service("web", WEB_VIP, "  ports:\n  - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}")
    );
    let m = Manifests::new(&yaml)?;
    let _ferry = Ferry::start_nameless(&topo, mode, &m.dir)?;
    let web = addr(WEB_VIP, 80);
    for pod in &topo.pods {
        let names = in_netns(&pod.ns, move || tcp_names(web, 40))?;
        ensure!(
            distinct(&names) == all_pods(),
            "{} through the service (incl. itself, hairpin): {names:?}",
            pod.name
        );
    }
    Ok(())
}
