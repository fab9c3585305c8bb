//! `cargo xtask <task>`: ci (packages + fmt + clippy + tests), bpf (refresh
//! the shipped BPF objects) and the benchmarks.

mod bench_dns;
mod bench_ingress;
mod bench_proxy;
mod bench_proxy_ebpf;
mod bpf;
mod child;
mod e2e_cluster;
mod packages;
mod probe;
mod skipped;

use std::process::Command;

use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = args.get(1).map(String::as_str);
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bpf") => bpf::run(),
        Some("bench") if matches!(sub, Some("dns" | "ingress" | "proxy")) => {
            packages::ensure(packages::BENCH, "the benchmarks")?;
            match sub {
                Some("dns") => bench_dns::run(&args[2..]),
                Some("ingress") => bench_ingress::run(&args[2..]),
                _ if args.windows(2).any(|w| w[0] == "--mode" && w[1] == "ebpf") => bench_proxy_ebpf::run(&args[2..]),
                _ => bench_proxy::run(&args[2..]),
            }
        }
        Some("e2e") if sub == Some("cluster") => e2e_cluster::run(&args[2..]),
        Some("lint") => lint(),
        Some("probe") => probe::run(&args[1..]),
        Some("test") => test(),
        _ => {
            eprintln!("usage: cargo xtask <ci|lint|test|e2e|bpf|bench|probe>");
            eprintln!(
                "  ci    install missing test packages (Debian, as root), fmt check, clippy -D warnings, every test, then (as root) e2e cluster"
            );
            eprintln!("  lint  fmt check and clippy only");
            eprintln!("  test  every test (unit, integration, privileged e2e when root; skipped ones are listed)");
            eprintln!(
                "  e2e cluster [--modes iptables,nftables,ebpf]  ferry on a real one-node Kubernetes (kube-kit; root)"
            );
            eprintln!("  probe hostile clients (silent, non-reading, reset floods, bursts, paths, DNS TCP stalls) against ferry serve/dns on loopback; prints a table (FERRY_BIN: use a built binary)");
            eprintln!("  bpf   recompile ebpf/obj/*.bpf.o, the BPF objects used when clang is missing");
            eprintln!("  bench dns|ingress|proxy [--mode ebpf|nftables] ...  load benchmarks against nsd/knot, nginx/haproxy, kube-proxy layouts");
            bail!("unknown task")
        }
    }
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo_bin())
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"], &[])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])
}

/// Runs every test; tests that cannot run here (privileged ones when not
/// root) pass after recording their names in `$FERRY_SKIPPED_LOG`, and
/// are listed at the end.
fn test() -> anyhow::Result<()> {
    let log = std::env::temp_dir().join(format!("ferry-skipped-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_str = log.to_string_lossy().into_owned();
    let result = cargo(
        &["test", "--workspace", "--all-targets"],
        &[(skipped::LOG_ENV, log_str.as_str())],
    );
    let recorded = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    for line in skipped::report(&recorded, packages::is_root()) {
        eprintln!("xtask: {line}");
    }
    result
}

fn ci() -> anyhow::Result<()> {
    packages::ensure(packages::TEST, "the tests")?;
    packages::ensure_rust_components(&cargo_bin());
    lint()?;
    test()?;
    // The real-cluster e2e needs root (kube-kit); it runs last, after the
    // cheaper tests have had their say.
    if !packages::is_root() {
        eprintln!("xtask: not root: e2e cluster skipped");
        return Ok(());
    }
    if std::env::var_os("FERRY_SKIP_CLUSTER_E2E").is_some_and(|v| v == "1") {
        eprintln!("xtask: FERRY_SKIP_CLUSTER_E2E=1: e2e cluster skipped");
        return Ok(());
    }
    e2e_cluster::run(&[])
}
