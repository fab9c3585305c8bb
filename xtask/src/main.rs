//! `cargo xtask <task>`: ci (fmt + clippy + tests), and later e2e and bench.

mod bench_dns;
mod bench_ingress;
mod bench_proxy;
mod bench_proxy_ebpf;
mod child;
mod e2e_cluster;

use std::process::Command;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") if args.get(1).map(String::as_str) == Some("dns") => bench_dns::run(&args[2..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("ingress") => bench_ingress::run(&args[2..]),
        Some("bench")
            if args.get(1).map(String::as_str) == Some("proxy")
                && args.windows(2).any(|w| w[0] == "--mode" && w[1] == "ebpf") =>
        {
            bench_proxy_ebpf::run(&args[2..])
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("proxy") => bench_proxy::run(&args[2..]),
        Some("e2e") if args.get(1).map(String::as_str) == Some("cluster") => e2e_cluster::run(&args[2..]),
        Some("lint") => lint(),
        Some("test") => test(),
        _ => {
            eprintln!("usage: cargo xtask <ci|lint|test|e2e|bench>");
            eprintln!("  ci    fmt check, clippy -D warnings, every test, then (as root) e2e cluster");
            eprintln!("  lint  fmt check and clippy only");
            eprintln!("  test  every test (unit, integration, privileged e2e when root)");
            eprintln!(
                "  e2e cluster [--modes iptables,nftables,ebpf]  ferry on a real one-node Kubernetes (kube-kit; root)"
            );
            eprintln!("  bench dns|ingress|proxy [--mode ebpf|nftables] ...  load benchmarks against nsd/knot, nginx/haproxy, kube-proxy layouts");
            bail!("unknown task")
        }
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
}

fn test() -> anyhow::Result<()> {
    cargo(&["test", "--workspace", "--all-targets"])
}

fn ci() -> anyhow::Result<()> {
    lint()?;
    test()?;
    // The real-cluster e2e needs root (kube-kit); it runs last, after the
    // cheaper tests have had their say.
    if !e2e_cluster::is_root() {
        eprintln!("xtask: not root: e2e cluster skipped");
        return Ok(());
    }
    if std::env::var_os("FERRY_SKIP_CLUSTER_E2E").is_some_and(|v| v == "1") {
        eprintln!("xtask: FERRY_SKIP_CLUSTER_E2E=1: e2e cluster skipped");
        return Ok(());
    }
    e2e_cluster::run(&[])
}
