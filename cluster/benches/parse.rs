//! Parsing cost of the file source: `files::parse_documents` over manifests
//! as kubectl writes them (block style, labels, annotations), N Services
//! and N EndpointSlices of 3 endpoints. Prints milliseconds per MB; the
//! target is at most 30 ms/MB.
//!
//! `cargo bench -p ferry-cluster --bench parse`

use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// `n` Services and their EndpointSlices, about 1 KB per pair.
pub fn manifests(n: usize) -> String {
    let mut y = String::with_capacity(n * 1100);
    for i in 0..n {
        let ns = format!("team-{}", i % 50);
        y.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata:
  name: svc-{i}
  namespace: {ns}
  labels:
    app.kubernetes.io/name: svc-{i}
    app.kubernetes.io/part-of: shop
  annotations:
    description: \"service number {i}\"
spec:
  type: ClusterIP
  clusterIP: 10.96.{}.{}
  selector:
    app: svc-{i}
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: 8080
  - name: metrics
    protocol: TCP
    port: 9090
    targetPort: metrics
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-abcde
  namespace: {ns}
  labels:
    kubernetes.io/service-name: svc-{i}
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
- name: metrics
  protocol: TCP
  port: 9090
endpoints:
",
            i / 256 % 256,
            i % 256
        ));
        for e in 0..3 {
            y.push_str(&format!(
                "- addresses:
  - 10.88.{}.{}
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-{e}
  targetRef:
    kind: Pod
    name: svc-{i}-pod-{e}
    namespace: {ns}
",
                (i * 3 + e) / 256 % 256,
                (i * 3 + e) % 256
            ));
        }
    }
    y
}

fn parse(c: &mut Criterion) {
    for n in [1000, 10_000] {
        let text = manifests(n);
        let mb = text.len() as f64 / 1e6;
        // One untimed-by-criterion pass, printed as ms per MB.
        let started = Instant::now();
        let docs = ferry_cluster::files::parse_documents(Path::new("bench.yaml"), &text);
        let secs = started.elapsed().as_secs_f64();
        let objects: usize = docs.iter().map(|d| d.as_ref().map_or(0, Vec::len)).sum();
        assert_eq!(objects, 2 * n, "every document parses");
        println!(
            "parse: {n} Services + {n} EndpointSlices, {mb:.2} MB: {:.1} ms = {:.1} ms/MB (target <= 30)",
            secs * 1e3,
            secs * 1e3 / mb
        );
        let mut group = c.benchmark_group("parse_documents");
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.sample_size(10);
        group.bench_function(format!("{n}_services"), |b| {
            b.iter(|| ferry_cluster::files::parse_documents(Path::new("bench.yaml"), &text))
        });
        group.finish();
    }
}

criterion_group!(benches, parse);
criterion_main!(benches);
