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

/// Starts `ferry node` in the node namespace over the manifests in `dir` and
/// waits until `/readyz` answers 200.
fn start_node(topo: &Topology, dir: &std::path::Path, mode: &str, extra: &[&str]) -> Ferry {
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.node, env!("CARGO_BIN_EXE_ferry"), "node"])
        .arg("-f")
        .arg(dir)
        .args(["--admin-addr", ADMIN, "--mode", mode, "--node-name", "node"])
        .args(["--node-ip", &NODE_IP.to_string(), "--cluster-cidr", netns::POD_CIDR])
        .args(["--http-addr", &format!("{NODE_IP}:{HTTP_PORT}")])
        .args(["--https-addr", &format!("{NODE_IP}:8443")])
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ferry = Ferry(child);
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let node = topo.node.clone();
    let ready = netns::wait_until(Duration::from_secs(60), || {
        let node = node.clone();
        netns::in_netns(&node, move || netns::http_get(admin, "/readyz"))
            .ok()
            .and_then(Result::ok)
            .is_some_and(|(status, _)| status.contains("200"))
    });
    assert!(ready, "ferry node ({mode}) never became ready");
    ferry
}

#[test]
fn node_runs_proxy_dns_and_ingress_over_one_snapshot() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("fn").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), manifests(&topo)).unwrap();

    let _ferry = start_node(
        &topo,
        dir.path(),
        "iptables",
        // Never forward to the host's resolvers: nothing listens here.
        &[
            "--listen",
            &format!("{NODE_IP}:{DNS_PORT}"),
            "--upstream",
            "127.0.0.1:9",
        ],
    );
    let admin: SocketAddr = ADMIN.parse().unwrap();

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

/// The cluster DNS Service as a cluster with CoreDNS scaled to zero has it:
/// a ClusterIP and no endpoints.
const KUBE_DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: metrics, port: 9153, protocol: TCP}
"#;

fn dig(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["+time=2", "+tries=3"];
    all.extend(args);
    netns::ns_sh(ns, "dig", &all).unwrap()
}

/// `ferry node` with its default `--dns-service kube-system/kube-dns`
/// answers queries that pods send to the kube-dns ClusterIP on the node
/// itself (UDP and TCP), in the iptables and nftables modes, although the
/// Service has no endpoints, without conntrack entries; and it never
/// forwards to that IP.
#[test]
fn node_answers_the_cluster_dns_service_ip_itself() {
    if !require_root() {
        return;
    }
    for mode in ["iptables", "nftables"] {
        let topo = Topology::new("fd").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), manifests(&topo)).unwrap();
        std::fs::write(dir.path().join("kube-dns.yaml"), KUBE_DNS).unwrap();
        // Port 53 as on a real node; the upstream is the cluster DNS IP
        // itself, as a resolv.conf written for ClusterFirst would say.
        let ferry = start_node(
            &topo,
            dir.path(),
            mode,
            &["--listen", &format!("{NODE_IP}:53"), "--upstream", "10.96.0.10"],
        );
        let pod = topo.pods[0].ns.clone();
        let name = "web.default.svc.cluster.local";
        let udp = dig(&pod, &["+short", "@10.96.0.10", name, "A"]);
        assert_eq!(udp.trim(), CLUSTER_IP, "{mode}: UDP answer through the kube-dns IP");
        let tcp = dig(&pod, &["+short", "+tcp", "@10.96.0.10", name, "A"]);
        assert_eq!(tcp.trim(), CLUSTER_IP, "{mode}: TCP answer through the kube-dns IP");
        // From the node itself too (host-network pods).
        let node = dig(&topo.node, &["+short", "@10.96.0.10", name, "A"]);
        assert_eq!(node.trim(), CLUSTER_IP, "{mode}: answer on the node");
        // A name outside the cluster: the only upstream is ferry itself, so
        // SERVFAIL rather than a loop.
        let out = dig(&pod, &["@10.96.0.10", "example.test", "A"]);
        assert!(out.contains("status: SERVFAIL"), "{mode}: {out}");
        // NOTRACK: the queries above left no conntrack entry.
        let tracked = netns::ns_sh(&topo.node, "conntrack", &["-L", "-d", "10.96.0.10"]).unwrap_or_default();
        assert!(
            !tracked.contains("dport=53"),
            "{mode}: DNS flows were tracked: {tracked}"
        );
        let table = netns::ns_sh(&topo.node, "nft", &["list", "table", "ip", "ferry-dns"]).unwrap();
        assert!(table.contains("notrack"), "{mode}: {table}");
        let addrs = netns::ns_sh(
            &topo.node,
            "ip",
            &["addr", "show", "dev", "lo", "label", "lo:ferry-dns"],
        )
        .unwrap();
        assert!(
            addrs.contains("10.96.0.10/32"),
            "{mode}: the node holds the IP: {addrs}"
        );
        // The metrics port of the same Service is still proxied: no
        // endpoints, so it is refused rather than answered by anyone.
        let refused = netns::in_netns(&pod, || {
            std::net::TcpStream::connect_timeout(&"10.96.0.10:9153".parse().unwrap(), Duration::from_secs(3))
        })
        .unwrap();
        assert_eq!(
            refused.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{mode}: port 9153 of kube-dns has no endpoints"
        );
        // After the DaemonSet is gone, `ferry node --cleanup` removes it all.
        drop(ferry);
        netns::ns_sh(&topo.node, env!("CARGO_BIN_EXE_ferry"), &["node", "--cleanup"]).unwrap();
        let addrs = netns::ns_sh(&topo.node, "ip", &["-4", "addr", "show", "dev", "lo"]).unwrap();
        assert!(!addrs.contains("10.96.0.10"), "{mode}: {addrs}");
        let tables = netns::ns_sh(&topo.node, "nft", &["list", "tables"]).unwrap();
        assert!(!tables.contains("ferry"), "{mode}: {tables}");
        let rules = netns::ns_sh(&topo.node, "iptables-save", &[]).unwrap();
        assert!(!rules.contains("FERRY"), "{mode}: {rules}");
    }
}
