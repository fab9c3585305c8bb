//! `ferry render --what iptables` prints the planner's rules for a cluster
//! without touching the kernel: the same text as the proxy crate's golden
//! files (iptables-restore input, and with `--mode nftables` the nft script).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NODE_A: [&str; 6] = [
    "--node-name",
    "node-a",
    "--node-ip",
    "192.0.2.10",
    "--cluster-cidr",
    "10.244.0.0/16",
];

/// `ferry render -f proxy/testdata/policies.yaml --what iptables ARGS`.
fn render_policies(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "render",
            "-f",
            &format!("{ROOT}/proxy/testdata/policies.yaml"),
            "--what",
            "iptables",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `text` is `header` followed by testdata/`golden`.
fn assert_golden(text: &str, header: &str, golden: &str) {
    let golden = std::fs::read_to_string(format!("{ROOT}/proxy/testdata/{golden}")).unwrap();
    assert!(text.starts_with(header), "{text}");
    assert_eq!(text.trim_start_matches(header), golden);
}

#[test]
fn render_iptables_matches_the_golden_rules() {
    let text = render_policies(&NODE_A);
    assert_golden(&text, "# iptables (IPv4)\n", "policies.iptables");
}

#[test]
fn render_nftables_matches_the_golden_script() {
    let text = render_policies(&[&NODE_A[..], &["--mode", "nftables"]].concat());
    assert_golden(&text, "# nftables (table ip ferry)\n", "policies.nft");
}

#[test]
fn render_warns_about_nodeports_without_a_node_ip() {
    let text = render_policies(&["--node-name", "nowhere"]);
    assert!(
        text.starts_with("# warning: Node nowhere status.addresses: no node IP known"),
        "{text}"
    );
    assert!(!text.contains("FERRY-NODEPORTS -m comment"), "{text}");
}
