//! `ferry render`: load a source once and print what ferry makes of it.

use anyhow::Context;

use crate::cli::{RenderArgs, RenderWhat};

pub async fn run(args: RenderArgs) -> anyhow::Result<()> {
    let snap = crate::source::load_once(&args.source).await.context("loading the cluster")?;
    let text = match args.what {
        RenderWhat::Summary => ferry_cluster::summary::render(&snap),
    };
    print!("{text}");
    Ok(())
}
