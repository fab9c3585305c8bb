//! `ferry render --what summary`: a human-readable listing of a Snapshot.

use std::fmt::Write;

use crate::model::{IngressBackend, ServiceType};
use crate::snapshot::Snapshot;

pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let counts: Vec<String> = snap.counts().iter().map(|(k, n)| format!("{k}={n}")).collect();
    let _ = writeln!(out, "# snapshot generation {}: {}", snap.generation, counts.join(" "));

    let _ = writeln!(out, "\nServices:");
    for svc in snap.services() {
        let ips: Vec<String> = svc.cluster_ips.iter().map(|i| i.to_string()).collect();
        let ip = if svc.headless {
            "None (headless)".to_string()
        } else if ips.is_empty() {
            "-".to_string()
        } else {
            ips.join(",")
        };
        let _ = write!(out, "  {} type={} clusterIP={}", svc.key, svc.type_.as_str(), ip);
        if svc.type_ == ServiceType::ExternalName {
            let _ = write!(out, " externalName={}", svc.external_name.as_deref().unwrap_or(""));
        }
        if !svc.external_ips.is_empty() {
            let e: Vec<String> = svc.external_ips.iter().map(|i| i.to_string()).collect();
            let _ = write!(out, " externalIPs={}", e.join(","));
        }
        let _ = writeln!(out);
        for port in &svc.ports {
            let name = if port.name.is_empty() { "-" } else { &port.name };
            let _ = write!(
                out,
                "    port {name} {}/{} -> {}",
                port.port, port.protocol, port.target_port
            );
            if let Some(np) = port.node_port {
                let _ = write!(out, " nodePort={np}");
            }
            let _ = writeln!(out);
            let backends = snap.backends(svc, port);
            if backends.is_empty() {
                let _ = writeln!(out, "      (no endpoints)");
            }
            for b in backends {
                let c = b.conditions;
                let _ = writeln!(
                    out,
                    "      endpoint {}:{} ready={} serving={} terminating={}{}",
                    fmt_ip(b.ip),
                    b.port,
                    c.ready,
                    c.serving,
                    c.terminating,
                    b.hostname.map(|h| format!(" hostname={h}")).unwrap_or_default()
                );
            }
        }
    }

    let _ = writeln!(out, "\nIngressClasses:");
    for ic in snap.ingress_classes() {
        let _ = writeln!(
            out,
            "  {} controller={}{}",
            ic.name,
            ic.controller,
            if ic.is_default { " (default)" } else { "" }
        );
    }

    let _ = writeln!(out, "\nIngresses:");
    for ing in snap.ingresses() {
        let _ = writeln!(out, "  {} class={}", ing.key, ing.class_name.as_deref().unwrap_or("-"));
        if let Some(b) = &ing.default_backend {
            let _ = writeln!(out, "    default backend {}", fmt_backend(b));
        }
        for rule in &ing.rules {
            let host = rule.host.as_deref().unwrap_or("*");
            for p in &rule.paths {
                let _ = writeln!(
                    out,
                    "    host {host} path {} ({}) -> {}",
                    p.path.as_deref().unwrap_or("/"),
                    p.path_type.as_str(),
                    fmt_backend(&p.backend)
                );
            }
        }
        for tls in &ing.tls {
            let _ = writeln!(
                out,
                "    tls hosts={} secret={}",
                tls.hosts.join(","),
                tls.secret_name.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

fn fmt_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn fmt_backend(b: &IngressBackend) -> String {
    match b {
        IngressBackend::Service { name, port } => format!("service {name}:{port}"),
        IngressBackend::Resource { kind, name, .. } => format!("resource {kind}/{name}"),
    }
}
