//! Snapshot build cost at scale: 10k Services with 100k endpoints (10k
//! slices of 10). Prints the process RSS once the store is loaded.
//!
//! `cargo bench -p ferry-cluster --bench snapshot`

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use ferry_cluster::*;

fn objects(services: usize, per: usize) -> Vec<Object> {
    let mut out = Vec::with_capacity(services * 2);
    for i in 0..services {
        let ns = format!("ns-{}", i % 100);
        let name = format!("svc-{i}");
        let ip = |a: usize| {
            IpAddr::V4(Ipv4Addr::new(
                10,
                96 + (a / 65536) as u8,
                (a / 256 % 256) as u8,
                (a % 256) as u8,
            ))
        };
        out.push(Object::Service(std::sync::Arc::new(Service {
            key: ObjectKey::new(&ns, &name),
            type_: ServiceType::ClusterIp,
            cluster_ips: vec![ip(i)],
            headless: false,
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Name("web".into()),
                node_port: None,
                app_protocol: None,
            }],
            external_ips: vec![],
            load_balancer_ips: vec![],
            session_affinity: SessionAffinity::None,
            external_traffic_local: false,
            internal_traffic_local: false,
            health_check_node_port: None,
            external_name: None,
            publish_not_ready_addresses: false,
            service_proxy_name: None,
        })));
        let endpoints = (0..per)
            .map(|j| Endpoint {
                addresses: vec![IpAddr::V4(Ipv4Addr::new(
                    172,
                    (j % 256) as u8,
                    (i / 256 % 256) as u8,
                    (i % 256) as u8,
                ))],
                conditions: Conditions {
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                hostname: None,
                node_name: Some(format!("node-{}", j % 3)),
                zone: None,
                pod_name: Some(format!("{name}-pod-{j}")),
            })
            .collect();
        out.push(Object::EndpointSlice(std::sync::Arc::new(EndpointSlice {
            key: ObjectKey::new(&ns, format!("{name}-abcde")),
            service: name,
            address_type: AddressType::IPv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
                app_protocol: None,
            }],
            endpoints,
        })));
    }
    out
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn bench(c: &mut Criterion) {
    let mut store = Store::default();
    for o in objects(10_000, 10) {
        store.apply(o);
    }
    let mut generation = 0;
    let snap = store.snapshot(0);
    println!(
        "loaded: services={} slices={} rss_mb={:.1}",
        snap.service_count(),
        snap.slice_count(),
        rss_mb()
    );
    drop(snap);
    c.bench_function("snapshot_rebuild_10k_services_100k_endpoints", |b| {
        b.iter(|| {
            generation += 1;
            store.snapshot(generation)
        })
    });
    println!("after rebuilds: rss_mb={:.1}", rss_mb());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
