//! `ferry render --what iptables` prints the planner's rules for a cluster
//! without touching the kernel: the same text as the proxy crate's golden file.

use std::process::Command;

#[test]
fn render_iptables_matches_the_golden_rules() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "render",
            "-f",
            &format!("{root}/proxy/testdata/policies.yaml"),
            "--what",
            "iptables",
        ])
        .args([
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
    let golden = std::fs::read_to_string(format!("{root}/proxy/testdata/policies.iptables")).unwrap();
    assert!(text.starts_with("# iptables (IPv4)\n"), "{text}");
    assert_eq!(text.trim_start_matches("# iptables (IPv4)\n"), golden);
}

#[test]
fn render_warns_about_nodeports_without_a_node_ip() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "render",
            "-f",
            &format!("{root}/proxy/testdata/policies.yaml"),
            "--what",
            "iptables",
        ])
        .args(["--node-name", "nowhere"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("# warning: Node nowhere status.addresses: no node IP known"),
        "{text}"
    );
    assert!(!text.contains("FERRY-NODEPORTS -m comment"), "{text}");
}
