//! `ferry ingress`, `ferry serve`, `ferry echo` and `ferry render --what
//! routes`: the ingress flags, mapped onto `ferry_ingress::run::Options`,
//! their wiring (source, engine, status writer, admin), and the embedded
//! demo.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry_cluster::{ObjectKey, Snapshot, SnapshotRx};
use ferry_ingress::access_log;
use ferry_ingress::echo::{self, EchoConfig};
use ferry_ingress::status::StatusSource;
use ferry_ingress::upstream::UpstreamConfig;
use ferry_ingress::{ClassSelection, EngineConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::{parse_duration, RunArgs};
use crate::runtime::Runtime;

/// Ingress flags shared by `ferry ingress`, `ferry serve`, `ferry node` and `ferry render`.
#[derive(Args, Debug, Clone)]
pub struct IngressOpts {
    /// Plain HTTP listener [default: 0.0.0.0:80; 127.0.0.1:8080 with --demo].
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// HTTPS listener [default: 0.0.0.0:443 for `ingress` and `node`; off for `serve` unless given].
    #[arg(long, value_name = "ADDR")]
    pub https_addr: Option<SocketAddr>,
    /// IngressClasses with this spec.controller are served.
    #[arg(long, value_name = "NAME", default_value = ferry_ingress::DEFAULT_CONTROLLER_NAME)]
    pub controller_name: String,
    /// Also serve this IngressClass whatever its controller (repeatable).
    #[arg(long = "ingress-class", value_name = "NAME")]
    pub ingress_classes: Vec<String>,
    /// Default certificate as NAMESPACE/NAME of a kubernetes.io/tls Secret
    /// [default: a generated self-signed one].
    #[arg(long, value_name = "NS/NAME", value_parser = parse_object_key)]
    pub default_tls_secret: Option<ObjectKey>,
    /// Address written to Ingress .status.loadBalancer.ingress (repeatable;
    /// `ferry ingress` only) [default: this node's IPs, from $NODE_NAME's Node].
    #[arg(long = "status-address", value_name = "IP|HOST")]
    pub status_addresses: Vec<String>,
    /// How long in-flight requests may finish after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Timeout for connecting to an upstream endpoint.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Timeout for an upstream's response headers.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upstream_header_timeout: Duration,
    /// Consecutive connect failures that eject an endpoint.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub upstream_max_fails: u32,
    /// How long an ejected endpoint gets no new requests.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upstream_eject_time: Duration,
    /// Ingress worker threads, each serving its share of the connections
    /// on its own single-threaded runtime [default: $TOKIO_WORKER_THREADS,
    /// else one per CPU].
    #[arg(long, value_name = "N")]
    pub ingress_workers: Option<usize>,
    // Connection limits (issue 14); defaults live in ferry_ingress::Limits.
    /// Accept (TLS handshake included) to the first complete request head [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub client_header_timeout: Option<Duration>,
    /// End of a response to the next complete request head; idle HTTP/2 gets GOAWAY [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keepalive_timeout: Option<Duration>,
    /// A response the client does not read for this long is dropped with its upstream [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub client_send_timeout: Option<Duration>,
    /// Between two reads of a request body (then 408) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub client_body_timeout: Option<Duration>,
    /// TLS handshake, from accept [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub tls_handshake_timeout: Option<Duration>,
    /// Open connections per listener; the longest-idle is shed first [default: open-files limit / 4].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Cancelled (reset) streams a connection may have beyond completed ones before GOAWAY [default: 100].
    #[arg(long, value_name = "N")]
    pub max_cancelled_streams: Option<usize>,
    /// Forward the raw request path (routing still uses the normalized one).
    #[arg(long)]
    pub forward_raw_path: bool,
    /// Access log, one line per request: `stderr` (with the rest of the
    /// log), `off`, or a file path (appended to). Text or JSON as
    /// --log-format; `RUST_LOG=info,ferry::access=off` also turns it off.
    #[arg(long, value_name = "stderr|off|PATH", default_value = "stderr")]
    pub access_log: String,
}

fn parse_object_key(s: &str) -> Result<ObjectKey, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(ObjectKey::new(ns, name)),
        _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
    }
}

impl IngressOpts {
    pub fn classes(&self) -> ClassSelection {
        ClassSelection {
            controller_name: self.controller_name.clone(),
            class_names: self.ingress_classes.clone(),
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            classes: self.classes(),
            default_tls_secret: self.default_tls_secret.clone(),
            upstream: UpstreamConfig {
                connect_timeout: self.upstream_connect_timeout,
                header_timeout: self.upstream_header_timeout,
                max_fails: self.upstream_max_fails.max(1),
                eject_for: self.upstream_eject_time,
                ..UpstreamConfig::default()
            },
            drain_timeout: self.drain_timeout,
            workers: self.workers(),
            limits: self.limits(),
            access_log: self.access_log(),
        }
    }

    /// `--access-log`, off when the `ferry::access` log target is filtered out.
    fn access_log(&self) -> access_log::Config {
        let on = tracing::enabled!(target: "ferry::access", tracing::Level::INFO);
        let target = match self.access_log.as_str() {
            _ if !on => access_log::Target::Off,
            "off" => access_log::Target::Off,
            "stderr" | "" => access_log::Target::Stderr,
            path => access_log::Target::File(path.into()),
        };
        access_log::Config {
            target,
            json: crate::cli::log_json(),
        }
    }

    fn limits(&self) -> ferry_ingress::Limits {
        let d = ferry_ingress::Limits::default();
        ferry_ingress::Limits {
            header_timeout: self.client_header_timeout.unwrap_or(d.header_timeout),
            keepalive_timeout: self.keepalive_timeout.unwrap_or(d.keepalive_timeout),
            send_timeout: self.client_send_timeout.unwrap_or(d.send_timeout),
            body_timeout: self.client_body_timeout.unwrap_or(d.body_timeout),
            tls_handshake_timeout: self.tls_handshake_timeout.unwrap_or(d.tls_handshake_timeout),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_cancelled_streams: self.max_cancelled_streams.unwrap_or(d.max_cancelled_streams),
            forward_normalized_path: !self.forward_raw_path,
        }
    }

    /// `--ingress-workers`, else `$TOKIO_WORKER_THREADS` (the knob that
    /// sizes the rest of the process), else one per CPU.
    fn workers(&self) -> usize {
        self.ingress_workers
            .or_else(|| {
                std::env::var("TOKIO_WORKER_THREADS")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
            })
            .filter(|&n| n > 0)
            .unwrap_or_else(ferry_ingress::proxy::default_workers)
    }

    fn options(&self, defaults: ListenDefaults) -> ferry_ingress::run::Options {
        ferry_ingress::run::Options {
            engine: self.engine_config(),
            http: Some(self.http_addr.unwrap_or(defaults.http)),
            https: self.https_addr.or(defaults.https),
        }
    }

    /// The addresses to publish: the flag, else the IPs of Node `$NODE_NAME`.
    pub fn status_source(&self) -> StatusSource {
        StatusSource {
            addresses: self.status_addresses.clone(),
            node_name: std::env::var("NODE_NAME").ok(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct IngressArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: IngressOpts,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub ingress: IngressArgs,
    /// Serve the embedded WordPress example (examples/wordpress) with two
    /// in-process demo backends on 127.0.0.11:18080 and 127.0.0.12:18080.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,
    /// First line of every answer.
    #[arg(long, value_name = "TEXT", default_value = "ferry echo")]
    pub body: String,
    /// Answer only the body, without the request line and headers.
    #[arg(long)]
    pub body_only: bool,
}

/// Listener addresses used when the flags give none.
#[derive(Debug, Clone, Copy)]
struct ListenDefaults {
    http: SocketAddr,
    https: Option<SocketAddr>,
}

const CLUSTER_DEFAULTS: ListenDefaults = ListenDefaults {
    http: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 80),
    https: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 443)),
};

/// Starts the ingress engine with `ferry ingress`'s and `ferry node`'s
/// listener defaults. The handle ends after the drain.
pub async fn spawn(
    rt: &mut Runtime,
    snapshots: SnapshotRx,
    opts: &IngressOpts,
) -> anyhow::Result<ferry_ingress::run::Running> {
    let options = opts.options(CLUSTER_DEFAULTS);
    ferry_ingress::run::spawn(&options, snapshots, &mut rt.admin, rt.cancel.clone())
        .await
        .context("starting the ingress engine")
}

pub async fn run_ingress(args: IngressArgs) -> anyhow::Result<()> {
    let mut rt = Runtime::new();
    let snapshots = rt.source(&args.run.source).await?;
    let running = spawn(&mut rt, snapshots.clone(), &args.opts).await?;
    if let Some(client) = rt.kube_client.clone() {
        let status = ferry_ingress::status::run(
            client.clone(),
            snapshots,
            args.opts.classes(),
            args.opts.status_source(),
            rt.cancel.clone(),
        );
        tokio::spawn(status);
        let instance = std::env::var("NODE_NAME").unwrap_or_default();
        tokio::spawn(ferry_ingress::events::run(
            client,
            running.engine.problems(),
            ferry_ingress::events::EventConfig::new(&instance),
            running.metrics.clone(),
            rt.cancel.clone(),
        ));
    }
    let _cancel = rt.serve_admin(&args.run).await?;
    Ok(running.task.await.context("ingress task")??)
}

/// The WordPress walkthrough, embedded so `ferry serve --demo` needs no files.
const DEMO_MANIFESTS: [(&str, &str); 3] = [
    (
        "examples/wordpress/services.yaml",
        include_str!("../examples/wordpress/services.yaml"),
    ),
    (
        "examples/wordpress/endpoints.yaml",
        include_str!("../examples/wordpress/endpoints.yaml"),
    ),
    (
        "examples/wordpress/ingress.yaml",
        include_str!("../examples/wordpress/ingress.yaml"),
    ),
];

/// The demo's IngressClass (NGINX's controller name, served by name).
const DEMO_CLASS: &str = "wp-ink";

fn demo_snapshot() -> anyhow::Result<Snapshot> {
    let mut objects = Vec::new();
    for (name, text) in DEMO_MANIFESTS {
        for doc in ferry_cluster::files::parse_documents(std::path::Path::new(name), text) {
            objects.extend(doc.with_context(|| format!("embedded {name}"))?);
        }
    }
    Ok(Snapshot::from_objects(1, objects))
}

/// Starts one echo backend per endpoint of the demo's wp-svc, answering
/// with its pod name.
async fn start_demo_backends(snap: &Snapshot, cancel: &CancellationToken) -> anyhow::Result<Vec<SocketAddr>> {
    let svc = snap.service("default", "wp-svc").context("demo: wp-svc missing")?;
    let mut started = Vec::new();
    for port in &svc.ports {
        for b in snap.usable_backends(svc, port) {
            let addr = SocketAddr::new(b.ip, b.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("demo: binding backend {addr}"))?;
            let body = b.pod_name.clone().unwrap_or_else(|| addr.to_string());
            tracing::info!(%addr, pod = %body, "demo backend listening");
            let config = EchoConfig {
                body,
                request_info: true,
            };
            tokio::spawn(echo::serve(listener, config, cancel.clone()));
            started.push(addr);
        }
    }
    Ok(started)
}

pub async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut rt = Runtime::new();
    let mut opts = args.ingress.opts.clone();
    let demo_embedded = args.demo && args.ingress.run.source.files.is_empty();
    let snapshots = if demo_embedded {
        let snap = Arc::new(demo_snapshot()?);
        start_demo_backends(&snap, &rt.cancel).await?;
        let (tx, rx) = tokio::sync::watch::channel(Some(snap));
        // Keep the sender alive for the whole run: the channel stays open.
        let cancel = rt.cancel.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            drop(tx);
        });
        rx
    } else {
        rt.source(&args.ingress.run.source).await?
    };
    if args.demo {
        if !opts.ingress_classes.iter().any(|c| c == DEMO_CLASS) {
            opts.ingress_classes.push(DEMO_CLASS.to_string());
        }
        opts.http_addr = opts.http_addr.or(Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
    }
    let defaults = ListenDefaults {
        http: CLUSTER_DEFAULTS.http,
        https: None,
    };
    // Standalone: no Events and no status, even with a kube source.
    let handle = ferry_ingress::run::spawn(&opts.options(defaults), snapshots, &mut rt.admin, rt.cancel.clone())
        .await
        .context("starting the ingress engine")?
        .task;
    if args.demo {
        let port = opts.http_addr.map_or(80, |a| a.port());
        tracing::info!("demo ready; try: curl --resolve wp.test:{port}:127.0.0.1 http://wp.test:{port}/");
    }
    let _cancel = rt.serve_admin(&args.ingress.run).await?;
    Ok(handle.await.context("ingress task")??)
}

pub async fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        c.cancel();
    });
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    tracing::info!(addr = %args.addr, "echo listening");
    echo::serve(
        listener,
        EchoConfig {
            body: args.body,
            request_info: !args.body_only,
        },
        cancel,
    )
    .await;
    Ok(())
}

pub fn render_routes(snap: &ferry_cluster::Snapshot, opts: &IngressOpts) -> anyhow::Result<String> {
    Ok(ferry_ingress::compile(snap, &opts.classes()).render())
}
