//! Privileged e2e of `ferry proxy --mode iptables`: the shared scenarios of
//! tests/common/proxy_scenarios.rs in network namespaces this test creates.
//! Skipped with a message when not root (CI runs as root).

mod common;

use common::netns::is_root;
use common::proxy_scenarios::{self as scenarios, Mode};

fn run(name: &str, f: fn(&Mode) -> anyhow::Result<()>) {
    if !is_root() {
        eprintln!("skipping {name}: needs root (network namespaces, iptables)");
        return;
    }
    let mode = Mode::iptables();
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
