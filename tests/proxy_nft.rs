//! nftables mode only: as root, in namespaces this test creates, the
//! canary notices a deleted table and a full resync restores it. The
//! shared scenarios run in nftables mode from tests/proxy_e2e.rs; the
//! golden script is checked in tests/proxy_render.rs.

mod common;

use std::time::Duration;

use common::netns::*;
use common::proxy_scenarios::*;
use common::skip::require_root;

#[test]
fn nftables_canary_recreates_a_deleted_table() {
    if !require_root() {
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
