//! Privileged e2e of `ferry proxy --mode ebpf` with the shared scenarios of
//! tests/common/proxy_scenarios.rs, in network namespaces the scenarios
//! create, with ferry's default cgroup and devices. The test process moves
//! into a cgroup of its own; ferry runs in a cgroup namespace rooted there
//! and sees no cgroup2 mount, so it mounts its own (its default), which
//! shows that cgroup: every client the test spawns, and ferry itself, is
//! served, and nothing else on the machine. The node namespace has no
//! route for the service range — the connect is rewritten before routing.
//!
//! Runs the shared scenarios whose clients are on the node or in pods
//! (socket-level LB): endpoint removal, immediate refusal, restart keeping a
//! connection, cleanup, hairpin without nodeName. "cluster IP and node
//! port" and "affinity and local policy" also send traffic from the client
//! namespace, i.e. from *outside* the node, which the TC program serves; a
//! client outside the node is not in the node's cgroup, so those two run
//! here as eBPF variants whose outside clients are curl processes that
//! first move themselves to the cgroup root (the shared versions run them
//! as threads of this process, which sits in the test cgroup). The TC
//! program lands on the default devices: ext0 (the node IP's) and br0 (the
//! pods'): pod1 and pod2 are declared on node-b, so their SNATed replies
//! stand for traffic from the other node, and here they arrive on br0; and
//! ext1, a second client interface added while ferry runs.
//! Skipped with a message when not root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use std::net::SocketAddr;

use anyhow::ensure;
use common::netns::{http_get, in_netns, ns_sh, tcp_names, udp_names, wait_until, Topology};
use common::proxy_scenarios::{
    self as scenarios, addr, all_pods, cluster_yaml, distinct, Ferry, Manifests, Mode, ADMIN,
};
use common::skip::require_root;

/// The test cgroup and pin directory, per test process. The cgroup is a
/// child of the host's cgroup2 root (found in mountinfo, as ferry's
/// default does: /sys/fs/cgroup/unified on hybrid hosts); the test process
/// moves into it. `ip netns exec` remounts /sys, hiding the host's cgroup2
/// and bpffs from ferry: ferry mounts cgroup2 itself (its default), and the
/// pins live on a bpffs the test mounts under /run so they outlive one
/// ferry process (the restart scenario needs that).
struct Place {
    base: PathBuf,
    /// The host's cgroup2 mount.
    root: PathBuf,
    cgroup: PathBuf,
    pins: PathBuf,
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| {
        let base = PathBuf::from(format!("/run/ferry-ebpf-e2e-{}", std::process::id()));
        let root = ferry_proxy::ebpf::cgroup2_root()
            .unwrap()
            .expect("a cgroup2 mount on the host")
            .mount_point;
        Place {
            cgroup: root.join(format!("ferry-ebpf-e2e-{}", std::process::id())),
            root,
            pins: base.join("bpf").join("pins"),
            base,
        }
    })
}

fn sh(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd).args(args).status();
}

/// Mounts bpffs under /run, creates the cgroup and moves this process into
/// it; on drop moves it back, removes pins, cgroup and mount.
struct InCgroup;

impl InCgroup {
    fn enter() -> InCgroup {
        let p = place();
        let guard = InCgroup;
        let bpf = p.base.join("bpf");
        std::fs::create_dir_all(&bpf).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpf)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs");
        std::fs::create_dir_all(&p.cgroup).unwrap();
        std::fs::write(p.cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        guard
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let p = place();
        let _ = ferry_proxy::ebpf::cleanup(&p.pins);
        let bpf = p.base.join("bpf");
        let _ = std::fs::write(p.root.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&p.cgroup);
        sh("umount", &[&bpf.to_string_lossy()]);
        let _ = std::fs::remove_dir(&bpf);
        let _ = std::fs::remove_dir(&p.base);
    }
}

/// ferry runs as a container would: in its own cgroup namespace, whose
/// root is the test cgroup (so ferry's default cgroup — its own cgroup2
/// mount, nothing else being visible — serves the test's processes only,
/// not the machine's), with no cgroup2 mount of the host visible (`ip netns
/// exec` hid /sys; any other one, e.g. of a concurrent test, is unmounted
/// in ferry's private mount namespace).
const WRAP: &str = "grep ' - cgroup2 ' /proc/self/mountinfo | cut -d' ' -f5 | xargs -r -n1 umount -l; exec \"$@\"";

fn ebpf_leftovers(node_ns: &str) -> Vec<String> {
    let p = place();
    let mut out = Vec::new();
    // tcx links of the TC program on the node's devices.
    out.extend(tc_devices(node_ns).into_iter().map(|d| format!("tc program on {d}")));
    if p.pins.exists() {
        out.push(format!("pin directory {} still exists", p.pins.display()));
    }
    if let Ok(o) = Command::new("bpftool").args(["cgroup", "show"]).arg(&p.cgroup).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("ferry_"))
                .map(|l| format!("attached: {l}")),
        );
    }
    out
}

/// Devices of `node_ns` with a ferry TC program (tcx), as the kernel
/// reports them (bpftool before 7.3 does not list tcx links).
fn tc_devices(node_ns: &str) -> BTreeSet<String> {
    let links = ns_sh(node_ns, "ip", &["-o", "link", "show"]).unwrap_or_default();
    let devs: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|d| d.trim().split('@').next().unwrap_or_default().to_string())
        .collect();
    in_netns(node_ns, move || {
        devs.into_iter()
            .filter(|d| {
                ferry_proxy::ebpf::loader::tcx_programs(d)
                    .map(|p| p.iter().any(|n| n.starts_with("ferry_tc")))
                    .unwrap_or(false)
            })
            .collect()
    })
    .unwrap_or_default()
}

fn names(n: &[&str]) -> BTreeSet<String> {
    n.iter().map(|s| s.to_string()).collect()
}

fn mode() -> Mode {
    let p = place();
    Mode {
        name: "ebpf",
        args: vec![
            "--mode".into(),
            "ebpf".into(),
            "--bpffs".into(),
            p.pins.display().to_string(),
        ],
        wrap: ["unshare", "--cgroup", "sh", "-c", WRAP, "ferry-wrap"]
            .map(String::from)
            .to_vec(),
        leftovers: ebpf_leftovers,
    }
}

fn run(name: &str, f: fn(&Mode) -> anyhow::Result<()>) {
    if !require_root() {
        return;
    }
    // One scenario at a time: they share this process's cgroup and pins.
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _cg = InCgroup::enter();
    let mode = mode();
    let result = f(&mode);
    let _ = ferry_proxy::ebpf::cleanup(&place().pins);
    if let Err(e) = result {
        panic!("{name} ({}): {e:#}", mode.name);
    }
}

#[test]
fn ebpf_reject_and_endpoint_removal() {
    run("reject_and_endpoint_removal", scenarios::reject_and_endpoint_removal);
}

#[test]
fn ebpf_restart_and_cleanup() {
    run("restart_and_cleanup", scenarios::restart_and_cleanup);
}

/// `n` HTTP GETs to `to` from the client namespace by curl processes that
/// leave the test cgroup first (they stand for hosts outside the node);
/// each line is the name of the pod that answered, or `ERR`.
fn outside_names(client_ns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Vec<String>> {
    let inner = format!("for i in $(seq {n}); do curl -s --max-time 5 http://{to}/ || echo ERR; done");
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {client_ns} sh -c '{inner}'",
        place().root.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output()?;
    ensure!(
        out.status.success(),
        "outside client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The shared "cluster IP and node port" scenario, NodePort from outside via TC.
fn cluster_ip_and_node_port_ebpf(mode: &Mode) -> anyhow::Result<()> {
    let mut topo = Topology::new("feA")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let _ferry = Ferry::start(&topo, mode, &m.dir)?;
    let web = addr(scenarios::WEB_VIP, 80);
    let dns = addr(scenarios::WEB_VIP, 53);
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
        "TCP from pod0 (incl. itself): {from_pod:?}"
    );
    let udp_from_pod = in_netns(&topo.pods[0].ns, move || udp_names(dns, 40))?;
    ensure!(distinct(&udp_from_pod) == all_pods(), "UDP from pod0: {udp_from_pod:?}");
    // From outside the node: the TC program (DNAT + SNAT, eTP Cluster).
    let from_client = outside_names(&topo.client, addr("192.0.2.1", 30080), 40)?;
    ensure!(
        distinct(&from_client) == all_pods(),
        "NodePort from client: {from_client:?}"
    );
    // Default devices: the node IP's and the pod bridge (eTP Cluster
    // replies come back through br0), not the bridge ports nor lo.
    let node = topo.node.clone();
    ensure!(
        tc_devices(&node) == names(&["br0", "ext0"]),
        "TC devices: {:?}",
        tc_devices(&node)
    );
    // A client on a second interface, added while ferry runs: the device
    // gets the program (rescan) and NodePort works from there too.
    let client2 = topo.add_client2()?;
    let attached = wait_until(Duration::from_secs(20), || tc_devices(&node).contains("ext1"));
    ensure!(attached, "ext1 never got the TC program: {:?}", tc_devices(&node));
    let from_client2 = outside_names(&client2, addr("192.0.2.1", 30080), 40)?;
    ensure!(
        distinct(&from_client2) == all_pods(),
        "NodePort from a client behind ext1: {from_client2:?}"
    );
    // The node itself reaching its NodePort: socket LB.
    let np = addr("192.0.2.1", 30080);
    let from_node_np = in_netns(&topo.node, move || tcp_names(np, 20))?;
    ensure!(
        distinct(&from_node_np) == all_pods(),
        "NodePort from the node: {from_node_np:?}"
    );
    let admin: SocketAddr = ADMIN.parse()?;
    let (status, metrics) = in_netns(&topo.node, move || http_get(admin, "/metrics"))??;
    ensure!(status.contains(" 200"), "/metrics: {status}");
    for name in [
        "ferry_proxy_sync_full_duration_seconds_count 1",
        "ferry_proxy_sync_failures_total 0",
    ] {
        ensure!(metrics.contains(name), "/metrics lacks {name:?}:\n{metrics}");
    }
    Ok(())
}

/// The shared "affinity and local policy" scenario, outside clients via TC.
fn affinity_and_local_policy_ebpf(mode: &Mode) -> anyhow::Result<()> {
    let topo = Topology::new("feB")?;
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2]))?;
    let _ferry = Ferry::start(&topo, mode, &m.dir)?;
    let names = outside_names(&topo.client, addr("192.0.2.1", 30081), 15)?;
    ensure!(
        names.len() == 15 && distinct(&names).len() == 1 && names[0].starts_with("pod"),
        "affinity via NodePort from outside: {names:?}"
    );
    let sticky = addr("10.96.0.11", 80);
    let names = in_netns(&topo.pods[0].ns, move || tcp_names(sticky, 15))?;
    ensure!(
        distinct(&names).len() == 1 && !names[0].starts_with("ERR"),
        "affinity via ClusterIP: {names:?}"
    );
    // eTP Local from outside: only the local endpoint, client address kept.
    let names = outside_names(&topo.client, addr("192.0.2.1", 30082), 30)?;
    ensure!(
        distinct(&names) == ["pod0".to_string()].into_iter().collect(),
        "eTP Local via NodePort from outside: {names:?}"
    );
    let local_vip = addr("10.96.0.12", 80);
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

#[test]
fn ebpf_cluster_ip_and_node_port() {
    run("cluster_ip_and_node_port (ebpf variant)", cluster_ip_and_node_port_ebpf);
}

#[test]
fn ebpf_affinity_and_local_policy() {
    run(
        "affinity_and_local_policy (ebpf variant)",
        affinity_and_local_policy_ebpf,
    );
}

#[test]
fn ebpf_hairpin_without_node_name() {
    run("hairpin_without_node_name", scenarios::hairpin_without_node_name);
}
