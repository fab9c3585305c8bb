//! `ferry proxy` and `ferry render --what iptables|ebpf` (owned by the proxy issues).

use clap::Args;

use crate::cli::RunArgs;

/// Proxy flags shared by `ferry proxy`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone, Default)]
pub struct ProxyOpts {}

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: ProxyOpts,
}

pub async fn run(_args: ProxyArgs) -> anyhow::Result<()> {
    crate::not_built("proxy", 4)
}

pub fn render_iptables(_snap: &ferry_cluster::Snapshot, _opts: &ProxyOpts) -> anyhow::Result<String> {
    crate::not_built("render --what iptables", 4).map(|_| String::new())
}

pub fn render_ebpf(_snap: &ferry_cluster::Snapshot, _opts: &ProxyOpts) -> anyhow::Result<String> {
    crate::not_built("render --what ebpf", 5).map(|_| String::new())
}
