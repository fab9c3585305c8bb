//! nftables mode only: `ferry render --what iptables --mode nftables`
//! prints the golden `nft -f` script, and (as root, in namespaces this test
//! creates) the canary notices a deleted table and a full resync restores
//! it. The shared scenarios run in nftables mode from tests/proxy_e2e.rs.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::*;
use common::proxy_scenarios::*;

#[test]
fn render_nftables_matches_the_golden_script() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "render",
            "-f",
            &format!("{root}/proxy/testdata/policies.yaml"),
            "--what",
            "iptables",
            "--mode",
            "nftables",
            "--node-name",
            "node-a",
            "--node-ip",
            "192.0.2.10",
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let golden = std::fs::read_to_string(format!("{root}/proxy/testdata/policies.nft")).unwrap();
    let header = "# nftables (table ip ferry)\n";
    assert!(text.starts_with(header), "{text}");
    assert_eq!(text.trim_start_matches(header), golden);
}

#[test]
fn nftables_canary_recreates_a_deleted_table() {
    if !is_root() {
        eprintln!("skipping nftables_canary_recreates_a_deleted_table: needs root");
        return;
    }
    let mode = Mode::nftables();
    let topo = Topology::new("fyN").unwrap();
    let m = Manifests::new(&cluster_yaml(&[0, 1, 2])).unwrap();
    let _ferry = Ferry::start_with(&topo, &mode, &m.dir, &["--sync-period", "1s"]).unwrap();
    let web = addr(WEB_VIP, 80);
    let before = in_netns(&topo.node, move || tcp_names(web, 60)).unwrap();
    assert_eq!(distinct(&before), all_pods(), "{before:?}");
    ns_sh(&topo.node, "nft", &["delete", "table", "ip", "ferry"]).unwrap();
    let broken = in_netns(&topo.node, move || tcp_name(web)).unwrap();
    assert!(
        broken.is_err(),
        "service still reachable after the table was deleted: {broken:?}"
    );
    let node = topo.node.clone();
    let repaired = wait_until(Duration::from_secs(20), || {
        let ns = node.clone();
        in_netns(&ns, move || tcp_name(web).is_ok()).unwrap_or(false)
    });
    assert!(repaired, "table was not recreated after it was deleted");
    let after = in_netns(&topo.node, move || tcp_names(web, 60)).unwrap();
    assert_eq!(distinct(&after), all_pods(), "{after:?}");
}
