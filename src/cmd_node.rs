//! `ferry node`: proxy, DNS and ingress over one snapshot (the node issue).

use clap::Args;

use crate::cli::RunArgs;
use crate::cmd_dns::DnsOpts;
use crate::cmd_ingress::IngressOpts;
use crate::cmd_proxy::ProxyOpts;

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub proxy: ProxyOpts,
    #[command(flatten)]
    pub dns: DnsOpts,
    #[command(flatten)]
    pub ingress: IngressOpts,
}

pub async fn run(_args: NodeArgs) -> anyhow::Result<()> {
    crate::not_built("node", 7)
}
