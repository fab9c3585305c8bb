//! Privileged e2e of `ferry proxy --mode iptables`: the shared scenarios of
//! tests/common/proxy_scenarios.rs in network namespaces this test creates.
//! Skipped with a message when not root (CI runs as root).

mod common;

use common::proxy_scenarios::{self as scenarios, Mode};
use common::skip::require_root;

fn run(name: &str, f: fn(&Mode) -> anyhow::Result<()>) {
    run_mode(name, Mode::iptables(), f)
}

fn run_mode(name: &str, mode: Mode, f: fn(&Mode) -> anyhow::Result<()>) {
    if !require_root() {
        return;
    }
    if let Err(e) = f(&mode) {
        panic!("{name} ({}): {e:#}", mode.name);
    }
}

#[test]
fn iptables_cluster_ip_and_node_port() {
    run("cluster_ip_and_node_port", scenarios::cluster_ip_and_node_port);
}

#[test]
fn iptables_affinity_and_local_policy() {
    run("affinity_and_local_policy", scenarios::affinity_and_local_policy);
}

#[test]
fn iptables_reject_and_endpoint_removal() {
    run("reject_and_endpoint_removal", scenarios::reject_and_endpoint_removal);
}

#[test]
fn iptables_restart_and_cleanup() {
    run("restart_and_cleanup", scenarios::restart_and_cleanup);
}

#[test]
fn nftables_cluster_ip_and_node_port() {
    run_mode(
        "cluster_ip_and_node_port",
        Mode::nftables(),
        scenarios::cluster_ip_and_node_port,
    );
}

#[test]
fn nftables_affinity_and_local_policy() {
    run_mode(
        "affinity_and_local_policy",
        Mode::nftables(),
        scenarios::affinity_and_local_policy,
    );
}

#[test]
fn nftables_reject_and_endpoint_removal() {
    run_mode(
        "reject_and_endpoint_removal",
        Mode::nftables(),
        scenarios::reject_and_endpoint_removal,
    );
}

#[test]
fn iptables_hairpin_without_node_name() {
    run("hairpin_without_node_name", scenarios::hairpin_without_node_name);
}

#[test]
fn nftables_hairpin_without_node_name() {
    run_mode(
        "hairpin_without_node_name",
        Mode::nftables(),
        scenarios::hairpin_without_node_name,
    );
}

#[test]
fn nftables_restart_and_cleanup() {
    run_mode("restart_and_cleanup", Mode::nftables(), scenarios::restart_and_cleanup);
}

#[test]
fn switching_between_iptables_and_nftables_leaves_nothing_behind() {
    run(
        "switching_modes_leaves_nothing_behind",
        scenarios::switching_modes_leaves_nothing_behind,
    );
}

/// iptables only: someone flushing the nat table (a firewall reload) is
/// noticed by the canary check and repaired by a full resync.
#[test]
fn iptables_canary_repairs_a_flushed_nat_table() {
    if !require_root() {
        return;
    }
    use common::netns::*;
    use common::proxy_scenarios::*;
    use std::time::Duration;
    let mode = Mode::iptables();
    let topo = Topology::new("fyE").unwrap();
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2])).unwrap();
    let _ferry = Ferry::start_with(&topo, &mode, &m.dir, &["--sync-period", "1s"]).unwrap();
    let web = addr(WEB_VIP, 80);
    let before = in_netns(&topo.node, move || tcp_names(web, 60)).unwrap();
    assert_eq!(distinct(&before), all_pods(), "{before:?}");
    ns_sh(&topo.node, "iptables-nft", &["-t", "nat", "-F"]).unwrap();
    let broken = in_netns(&topo.node, move || tcp_name(web)).unwrap();
    assert!(
        broken.is_err(),
        "service still reachable right after the flush: {broken:?}"
    );
    let node = topo.node.clone();
    let repaired = wait_until(Duration::from_secs(20), || {
        let ns = node.clone();
        in_netns(&ns, move || tcp_name(web).is_ok()).unwrap_or(false)
    });
    assert!(repaired, "rules were not restored after the nat table was flushed");
    let after = in_netns(&topo.node, move || tcp_names(web, 60)).unwrap();
    assert_eq!(distinct(&after), all_pods(), "{after:?}");
}
