//! `ferry dns` and `ferry render --what zone` (owned by the DNS issue).

use clap::Args;

use crate::cli::RunArgs;

/// DNS flags shared by `ferry dns`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone, Default)]
pub struct DnsOpts {}

#[derive(Args, Debug, Clone)]
pub struct DnsArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: DnsOpts,
}

pub async fn run(_args: DnsArgs) -> anyhow::Result<()> {
    crate::not_built("dns", 6)
}

pub fn render_zone(_snap: &ferry_cluster::Snapshot, _opts: &DnsOpts) -> anyhow::Result<String> {
    crate::not_built("render --what zone", 6).map(|_| String::new())
}
