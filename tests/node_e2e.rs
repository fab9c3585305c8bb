//! `ferry node` end to end in network namespaces made by the test (root
//! only; CI runs as root): one process with the file source runs the
//! iptables proxy, DNS and ingress over one snapshot. A pod resolves a
//! Service name through ferry's DNS, connects to the ClusterIP it got and is
//! forwarded to a pod by ferry's rules; a client outside reaches the pods
//! through ferry's Ingress. No traffic leaves the test's namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::netns::{self, Topology, NODE_IP};
use common::skip::require_root;

const CLUSTER_IP: &str = "10.96.0.50";
const DNS_PORT: u16 = 5300;
const HTTP_PORT: u16 = 8081;
const ADMIN: &str = "127.0.0.1:10266";

struct Ferry(Child);

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn manifests(topo: &Topology) -> String {
    let endpoints: String = topo
        .pods
        .iter()
        .map(|p| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node\n  targetRef: {{kind: Pod, name: {}}}\n",
                p.ip, p.name
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: {CLUSTER_IP}
  ports: [{{name: http, port: 80, targetPort: {port}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
{endpoints}---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: ferry}}
spec: {{controller: ferry.dev/ingress-controller}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web}}
spec:
  ingressClassName: ferry
  rules:
  - host: web.test
    http:
      paths:
      - {{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}
"#,
        port = netns::POD_TCP_PORT
    )
}

#[test]
fn node_runs_proxy_dns_and_ingress_over_one_snapshot() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("fn").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), manifests(&topo)).unwrap();

    let child = Command::new("ip")
        .args(["netns", "exec", &topo.node, env!("CARGO_BIN_EXE_ferry"), "node"])
        .arg("-f")
        .arg(dir.path())
        .args(["--admin-addr", ADMIN, "--mode", "iptables", "--node-name", "node"])
        .args(["--node-ip", &NODE_IP.to_string(), "--cluster-cidr", netns::POD_CIDR])
        .args(["--listen", &format!("{NODE_IP}:{DNS_PORT}")])
        // Never forward to the host's resolvers: nothing listens here.
        .args(["--upstream", "127.0.0.1:9"])
        .args(["--http-addr", &format!("{NODE_IP}:{HTTP_PORT}")])
        .args(["--https-addr", &format!("{NODE_IP}:8443")])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _ferry = Ferry(child);

    // Ready once the snapshot is in and every part is up.
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let node = topo.node.clone();
    let ready = netns::wait_until(Duration::from_secs(60), || {
        let node = node.clone();
        netns::in_netns(&node, move || netns::http_get(admin, "/readyz"))
            .ok()
            .and_then(Result::ok)
            .is_some_and(|(status, _)| status.contains("200"))
    });
    assert!(ready, "ferry node never became ready");

    // DNS: a pod resolves the Service through ferry.
    let pod_ns = topo.pods[0].ns.clone();
    let answer = netns::ns_sh(
        &pod_ns,
        "dig",
        &[
            "+short",
            "+time=2",
            "+tries=3",
            "-p",
            &DNS_PORT.to_string(),
            &format!("@{NODE_IP}"),
            "web.default.svc.cluster.local",
            "A",
        ],
    )
    .unwrap();
    assert_eq!(answer.trim(), CLUSTER_IP, "DNS answer");

    // Proxy: the ClusterIP from DNS reaches every pod, from a pod.
    let vip: SocketAddr = format!("{}:80", answer.trim()).parse().unwrap();
    let names: BTreeSet<String> = netns::in_netns(&pod_ns, move || netns::tcp_names(vip, 30))
        .unwrap()
        .into_iter()
        .collect();
    let all: BTreeSet<String> = topo.pods.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, all, "ClusterIP connections should reach all three pods");

    // Ingress: a client outside the node reaches the pods by host name.
    let ingress = SocketAddr::from((NODE_IP, HTTP_PORT));
    let bodies: BTreeSet<String> = netns::in_netns(&topo.client, move || {
        (0..12)
            .map(|_| {
                let mut s = std::net::TcpStream::connect_timeout(&ingress, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                use std::io::{Read, Write};
                s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
                out.rsplit("\r\n\r\n").next().unwrap().trim().to_string()
            })
            .collect()
    })
    .unwrap();
    assert_eq!(bodies, all, "Ingress requests should round-robin over all three pods");

    // One admin server with every part's metrics and one snapshot stream.
    let node = topo.node.clone();
    let (_, metrics) = netns::in_netns(&node, move || netns::http_get(admin, "/metrics"))
        .unwrap()
        .unwrap();
    for needle in [
        "ferry_cluster_snapshots_published_total",
        "ferry_dns_queries",
        "ferry_ingress",
        "ferry_proxy_rules",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in /metrics");
    }
}
