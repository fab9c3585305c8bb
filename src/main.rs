//! `ferry`: one binary for the node dataplane (service proxy, cluster DNS,
//! ingress) and for standalone reverse proxying from YAML files.

mod cli;
mod cmd_dns;
mod cmd_ingress;
mod cmd_node;
mod cmd_proxy;
#[cfg(test)]
mod deploy_tests;
#[cfg(test)]
mod node_tests;
mod render;
mod runtime;
mod source;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format);
    if let Err(e) = ferry_ingress::conn::raise_nofile_limit() {
        eprintln!("ferry: cannot raise the open-files limit: {e}");
    }
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
            Command::Node(args) => cmd_node::run(args).await,
            Command::Proxy(args) => cmd_proxy::run(args).await,
            Command::Dns(args) => cmd_dns::run(args).await,
            Command::Ingress(args) => cmd_ingress::run_ingress(args).await,
            Command::Serve(args) => cmd_ingress::run_serve(args).await,
            Command::Echo(args) => cmd_ingress::run_echo(args).await,
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
