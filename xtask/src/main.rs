//! `cargo xtask <task>`: ci (fmt + clippy + tests), and later e2e and bench.

mod bench_dns;
mod bench_ingress;
mod bench_proxy;
mod bench_proxy_ebpf;
mod child;

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
        Some("lint") => lint(),
        Some("test") => test(),
        _ => {
            eprintln!("usage: cargo xtask <ci|lint|test|bench>");
            eprintln!("  ci    fmt check, clippy -D warnings, then every test");
            eprintln!("  lint  fmt check and clippy only");
            eprintln!("  test  every test (unit, integration, privileged e2e when root)");
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
    test()
}
