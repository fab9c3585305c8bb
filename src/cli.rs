//! Command-line interface: subcommands and the flags they share.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Kubernetes node dataplane: service proxy, cluster DNS and ingress in one binary"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Proxy, DNS and ingress together: the DaemonSet entry point.
    Node(crate::cmd_node::NodeArgs),
    /// Service proxy (kube-proxy's job).
    Proxy(crate::cmd_proxy::ProxyArgs),
    /// Cluster DNS (CoreDNS's job).
    Dns(crate::cmd_dns::DnsArgs),
    /// Ingress controller against an apiserver (or files).
    Ingress(crate::cmd_ingress::IngressArgs),
    /// Standalone reverse proxy fed from YAML files.
    Serve(crate::cmd_ingress::ServeArgs),
    /// Print what ferry would make of a cluster, without touching anything.
    Render(RenderArgs),
    /// A small HTTP/TCP/UDP echo server for demos and tests.
    Echo(crate::cmd_ingress::EchoArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the cluster view comes from.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Manifest file or directory (repeatable). Selects the file source.
    #[arg(short = 'f', long = "files", value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Kubeconfig for the kube source (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The apiserver's real address (`https://HOST:PORT`), used instead of the
    /// URL of the kubeconfig or of the in-cluster config. A node's Service
    /// proxy needs it: the in-cluster URL is the `kubernetes` ClusterIP, which
    /// only a running Service proxy makes reachable. minikube:
    /// `https://control-plane.minikube.internal:8443`. Empty: not set.
    #[arg(long, value_name = "URL")]
    pub apiserver: Option<String>,
    /// Debounce between a change and the snapshot it produces.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub debounce_ms: u64,
}

impl SourceArgs {
    /// `--apiserver`, with an empty value (an unset ConfigMap key) as none.
    pub fn apiserver(&self) -> Option<&str> {
        self.apiserver.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Address of the admin HTTP server (/healthz, /readyz, /metrics).
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// A second admin listener with the probes only (/healthz, /livez,
    /// /readyz), e.g. on the node IP while /metrics stays on loopback.
    #[arg(long, value_name = "ADDR")]
    pub healthz_addr: Option<SocketAddr>,
}

impl RunArgs {
    pub fn admin_addrs(&self) -> ferry_cluster::admin::AdminAddrs {
        ferry_cluster::admin::AdminAddrs {
            all: self.admin_addr,
            probes: self.healthz_addr,
        }
    }
}

/// `30s`, `1m`, `500ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenderWhat {
    /// Services with their endpoints, Ingresses, IngressClasses.
    Summary,
    /// The ingress RouteTable.
    Routes,
    /// The DNS zone in master-file format.
    Zone,
    /// iptables-restore input for the iptables dataplane.
    Iptables,
    /// BPF map entries for the eBPF dataplane.
    Ebpf,
    /// The deploy/ manifests with `--image` and `--config` applied (no source needed).
    Manifests,
}

#[derive(Args, Debug, Clone)]
pub struct RenderArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// What to print.
    #[arg(long, value_enum, default_value_t = RenderWhat::Summary)]
    pub what: RenderWhat,
    /// With `--what manifests`: the image the DaemonSet runs.
    #[arg(long, value_name = "IMAGE", default_value = "ferry:dev")]
    pub image: String,
    /// With `--what manifests`: a ferry-config ConfigMap value (repeatable),
    /// e.g. `--config PROXY_MODE=ebpf`.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
    #[command(flatten)]
    pub proxy: crate::cmd_proxy::ProxyOpts,
    #[command(flatten)]
    pub dns: crate::cmd_dns::DnsOpts,
    #[command(flatten)]
    pub ingress: crate::cmd_ingress::IngressOpts,
}

/// The `--log-format` in force (the access log follows it).
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn log_json() -> bool {
    LOG_JSON.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn init_logging(format: LogFormat) {
    LOG_JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs collected from files or pods stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
