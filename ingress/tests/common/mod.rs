//! What the ingress integration tests share: manifests parsed as the file
//! source parses them, echo backends and a served engine, all on 127.0.0.1.
#![allow(dead_code)] // each test file uses its own part

use std::net::SocketAddr;

use ferry_cluster::{Object, Snapshot};
use ferry_ingress::echo::{self, EchoConfig};
use ferry_ingress::{Engine, EngineConfig, IngressMetrics, Listeners};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const CLASS: &str = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: ferry}\nspec: {controller: ferry.dev/ingress-controller}\n---\n";

pub fn parse(yaml: &str) -> Vec<Object> {
    let mut out = Vec::new();
    for d in ferry_cluster::files::parse_documents(std::path::Path::new("test.yaml"), yaml) {
        out.extend(d.unwrap());
    }
    out
}

/// Service `name` (port 80, named `http`) with one EndpointSlice per
/// backend, named by its port so a reload with fewer backends keeps the
/// others' slices; `cluster_ip` sets `spec.clusterIP`.
pub fn service(name: &str, backends: &[SocketAddr], cluster_ip: Option<&str>) -> String {
    let ip = cluster_ip.map(|ip| format!("  clusterIP: {ip}\n")).unwrap_or_default();
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{ip}  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n"
    );
    for (i, b) in backends.iter().enumerate() {
        y += &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints:\n- addresses: [\"{}\"]\n  targetRef: {{kind: Pod, name: {name}-pod-{i}}}\n---\n",
            b.port(),
            b.port(),
            b.ip()
        );
    }
    y
}

/// An engine configuration for tests: short connect and drain timeouts,
/// two workers.
pub fn test_config() -> EngineConfig {
    let mut config = EngineConfig::default();
    config.upstream.connect_timeout = std::time::Duration::from_secs(2);
    config.drain_timeout = std::time::Duration::from_secs(5);
    config.workers = 2;
    config
}

/// An echo backend on 127.0.0.1:0 answering `body`.
pub async fn backend(body: &str, cancel: &CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(echo::serve(
        l,
        EchoConfig {
            body: body.into(),
            request_info: true,
        },
        cancel.clone(),
    ));
    addr
}

/// An engine serving `objects` on HTTP and HTTPS listeners at 127.0.0.1:0.
pub struct Serving {
    pub engine: Engine,
    pub metrics: IngressMetrics,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub cancel: CancellationToken,
    pub served: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops serving and waits (bounded) for the drain.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(20), self.served)
            .await
            .unwrap()
            .unwrap();
    }
}

pub async fn serve(config: EngineConfig, objects: Vec<Object>) -> Serving {
    let metrics = IngressMetrics::default();
    let engine = Engine::new(config, metrics.clone()).unwrap();
    engine.apply(&Snapshot::from_objects(1, objects));
    let listeners = Listeners::bind(
        Some("127.0.0.1:0".parse().unwrap()),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let (http, https) = (listeners.http_addr().unwrap(), listeners.https_addr().unwrap());
    let cancel = CancellationToken::new();
    let (e, c) = (engine.clone(), cancel.clone());
    let served = tokio::spawn(async move { e.serve(listeners, c).await.unwrap() });
    Serving {
        engine,
        metrics,
        http,
        https,
        cancel,
        served,
    }
}
