//! `ferry render`: load a source once and print what ferry makes of it.

use anyhow::Context;

use crate::cli::{RenderArgs, RenderWhat};

pub async fn run(args: RenderArgs) -> anyhow::Result<()> {
    let snap = crate::source::load_once(&args.source)
        .await
        .context("loading the cluster")?;
    let text = match args.what {
        RenderWhat::Summary => ferry_cluster::summary::render(&snap),
        RenderWhat::Routes => crate::cmd_ingress::render_routes(&snap, &args.ingress)?,
        RenderWhat::Zone => crate::cmd_dns::render_zone(&snap, &args.dns)?,
        RenderWhat::Iptables => crate::cmd_proxy::render_iptables(&snap, &args.proxy)?,
        RenderWhat::Ebpf => crate::cmd_proxy::render_ebpf(&snap, &args.proxy)?,
    };
    print!("{text}");
    Ok(())
}
