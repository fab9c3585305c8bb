//! `ferry`: one binary for the node dataplane (service proxy, cluster DNS,
//! ingress) and for standalone reverse proxying from YAML files.

mod admin;
mod cli;
mod render;
mod runtime;
mod source;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Render(args) => render::run(args).await,
            Command::Node(_) => not_built("node", 7),
            Command::Proxy(_) => not_built("proxy", 4),
            Command::Dns(_) => not_built("dns", 6),
            Command::Ingress(_) => not_built("ingress", 3),
            Command::Serve(_) => not_built("serve", 3),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn not_built(what: &str, issue: u32) -> anyhow::Result<()> {
    anyhow::bail!("`ferry {what}` is not built yet (tracked in issue {issue})")
}
