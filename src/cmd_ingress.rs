//! `ferry ingress`, `ferry serve`, `ferry echo` and `ferry render --what
//! routes` (owned by the ingress issue).

use clap::Args;

use crate::cli::RunArgs;

/// Ingress flags shared by `ferry ingress`, `ferry serve`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone, Default)]
pub struct IngressOpts {}

#[derive(Args, Debug, Clone)]
pub struct IngressArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: IngressOpts,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {}

pub async fn run_ingress(_args: IngressArgs) -> anyhow::Result<()> {
    crate::not_built("ingress", 3)
}

pub async fn run_serve(_args: IngressArgs) -> anyhow::Result<()> {
    crate::not_built("serve", 3)
}

pub async fn run_echo(_args: EchoArgs) -> anyhow::Result<()> {
    crate::not_built("echo", 3)
}

pub fn render_routes(_snap: &ferry_cluster::Snapshot, _opts: &IngressOpts) -> anyhow::Result<String> {
    crate::not_built("render --what routes", 3).map(|_| String::new())
}
