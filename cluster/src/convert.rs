//! Conversion from k8s-openapi objects (what the apiserver and YAML files
//! give us) into the lean projections of `model.rs`.
//!
//! Every failure names the kind, the object and the field, so a broken object
//! can be logged precisely and skipped while the rest keep serving.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::error::InvalidObject;
use crate::model::*;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The Secret types ferry loads: certificates, and generic Secrets that
/// Ingress annotations name (htpasswd files, CA bundles).
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
pub const OPAQUE_SECRET_TYPE: &str = "Opaque";
/// Field selector of the Secret watch: leaves out the types that are both
/// common and large or sensitive and never used by ferry (the convert step
/// drops any other type it does not use).
pub const SECRET_FIELD_SELECTOR: &str =
    "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token,type!=kubernetes.io/dockerconfigjson,type!=bootstrap.kubernetes.io/token";

type Result<T> = std::result::Result<T, InvalidObject>;

/// Namespace and name of a namespaced object; objects without a namespace
/// land in `default_ns` (the file source passes `default`, as kubectl would).
fn key_of(kind: &'static str, meta: &ObjectMeta, default_ns: &str) -> Result<ObjectKey> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(InvalidObject::new(kind, "<unnamed>", "metadata.name", "missing")),
    };
    let namespace = match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns.to_string(),
        _ => default_ns.to_string(),
    };
    Ok(ObjectKey { namespace, name })
}

fn cluster_name(kind: &'static str, meta: &ObjectMeta) -> Result<String> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_string()),
        _ => Err(InvalidObject::new(kind, "<unnamed>", "metadata.name", "missing")),
    }
}

fn parse_ip(kind: &'static str, key: &ObjectKey, field: &str, s: &str) -> Result<IpAddr> {
    s.trim()
        .parse()
        .map_err(|_| InvalidObject::new(kind, key.to_string(), field, format!("{s:?} is not an IP address")))
}

fn port_u16(kind: &'static str, key: &ObjectKey, field: &str, v: i32) -> Result<u16> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(InvalidObject::new(
            kind,
            key.to_string(),
            field,
            format!("{v} is not a port (1-65535)"),
        ))
    }
}

fn protocol(kind: &'static str, key: &ObjectKey, field: &str, p: Option<&str>) -> Result<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(InvalidObject::new(
            kind,
            key.to_string(),
            field,
            format!("unknown protocol {other:?}"),
        )),
    }
}

pub fn service(svc: &core::Service, default_ns: &str) -> Result<Service> {
    const K: &str = "Service";
    let key = key_of(K, &svc.metadata, default_ns)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let type_ = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            return Err(InvalidObject::new(
                K,
                key.to_string(),
                "spec.type",
                format!("unknown type {other:?}"),
            ))
        }
    };

    let mut headless = false;
    let mut cluster_ips = Vec::new();
    let listed: Vec<(String, String)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip.clone()))
            .collect(),
    };
    for (field, ip) in listed {
        match ip.as_str() {
            "None" => headless = true,
            "" => {}
            s => cluster_ips.push(parse_ip(K, &key, &field, s)?),
        }
    }
    if type_ == ServiceType::ExternalName {
        cluster_ips.clear();
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_u16(K, &key, &format!("{field}.port"), p.port)?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_u16(K, &key, &format!("{field}.targetPort"), *n)?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_u16(K, &key, &format!("{field}.targetPort"), n)?),
                Err(_) if !s.is_empty() => TargetPort::Name(s.clone()),
                Err(_) => TargetPort::Number(port),
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_u16(K, &key, &format!("{field}.nodePort"), n)?),
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(K, &key, &format!("{field}.protocol"), p.protocol.as_deref())?,
            port,
            target_port,
            node_port,
            app_protocol: p.app_protocol.clone(),
        });
    }

    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(parse_ip(K, &key, &format!("spec.externalIPs[{i}]"), ip)?);
    }
    let mut load_balancer_ips = Vec::new();
    if let Some(lb) = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()) {
        for (i, ing) in lb.ingress.iter().flatten().enumerate() {
            if let Some(ip) = &ing.ip {
                load_balancer_ips.push(parse_ip(K, &key, &format!("status.loadBalancer.ingress[{i}].ip"), ip)?);
            }
        }
    }

    let session_affinity = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => SessionAffinity::None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT as i32);
            if !(1..=86_400).contains(&t) {
                return Err(InvalidObject::new(
                    K,
                    key.to_string(),
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is outside 1..=86400"),
                ));
            }
            SessionAffinity::ClientIp {
                timeout_seconds: t as u32,
            }
        }
        other => {
            return Err(InvalidObject::new(
                K,
                key.to_string(),
                "spec.sessionAffinity",
                format!("unknown value {other:?}"),
            ))
        }
    };

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(port_u16(K, &key, "spec.healthCheckNodePort", n)?),
    };
    let external_name = if type_ == ServiceType::ExternalName {
        match spec.external_name.as_deref() {
            Some(n) if !n.is_empty() => Some(n.trim_end_matches('.').to_string()),
            _ => {
                return Err(InvalidObject::new(
                    K,
                    key.to_string(),
                    "spec.externalName",
                    "missing for type ExternalName",
                ))
            }
        }
    } else {
        None
    };

    Ok(Service {
        type_,
        headless: headless && type_ != ServiceType::ExternalName,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        session_affinity,
        // Local policies only mean something for externally reachable types,
        // but kube-proxy reads externalTrafficPolicy as given; so do we.
        external_traffic_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_traffic_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
        external_name,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        service_proxy_name: svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
            .cloned(),
        key,
    })
}

/// Converts an EndpointSlice. `Ok(None)` for slices ferry ignores on purpose
/// (FQDN address type, or no `kubernetes.io/service-name` label), like
/// kube-proxy does.
pub fn endpoint_slice(es: &discovery::EndpointSlice, default_ns: &str) -> Result<Option<EndpointSlice>> {
    const K: &str = "EndpointSlice";
    let key = key_of(K, &es.metadata, default_ns)?;
    let address_type = match es.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => return Ok(None),
        other => {
            return Err(InvalidObject::new(
                K,
                key.to_string(),
                "addressType",
                format!("unknown type {other:?}"),
            ))
        }
    };
    let Some(service) = es
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .cloned()
    else {
        return Ok(None);
    };

    let mut ports = Vec::new();
    for (i, p) in es.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        // A nil port means "all ports", which only applies to selector-less
        // uses ferry cannot dial; skip it.
        let Some(n) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(K, &key, &format!("{field}.protocol"), p.protocol.as_deref())?,
            port: port_u16(K, &key, &format!("{field}.port"), n)?,
            app_protocol: p.app_protocol.clone(),
        });
    }

    let mut endpoints = Vec::with_capacity(es.endpoints.len());
    for (i, ep) in es.endpoints.iter().enumerate() {
        let mut addresses = Vec::with_capacity(ep.addresses.len());
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip = parse_ip(K, &key, &format!("endpoints[{i}].addresses[{j}]"), a)?;
            let family_ok = match address_type {
                AddressType::IPv4 => ip.is_ipv4(),
                AddressType::IPv6 => ip.is_ipv6(),
            };
            if !family_ok {
                return Err(InvalidObject::new(
                    K,
                    key.to_string(),
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{ip} does not match addressType {}", es.address_type),
                ));
            }
            addresses.push(ip);
        }
        let c = ep.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        let conditions = Conditions {
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        };
        let pod_name = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
            .and_then(|r| r.name.clone());
        endpoints.push(Endpoint {
            addresses,
            conditions,
            hostname: ep.hostname.clone().filter(|h| !h.is_empty()),
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            pod_name,
        });
    }

    Ok(Some(EndpointSlice {
        key,
        service,
        address_type,
        ports,
        endpoints,
    }))
}

fn ingress_backend(key: &ObjectKey, field: &str, b: &networking::IngressBackend) -> Result<IngressBackend> {
    const K: &str = "Ingress";
    if let Some(s) = &b.service {
        let port = match &s.port {
            Some(networking::ServiceBackendPort { number: Some(n), .. }) => {
                BackendPort::Number(port_u16(K, key, &format!("{field}.service.port.number"), *n)?)
            }
            Some(networking::ServiceBackendPort { name: Some(n), .. }) if !n.is_empty() => BackendPort::Name(n.clone()),
            _ => {
                return Err(InvalidObject::new(
                    K,
                    key.to_string(),
                    format!("{field}.service.port"),
                    "needs a number or a name",
                ))
            }
        };
        if s.name.is_empty() {
            return Err(InvalidObject::new(
                K,
                key.to_string(),
                format!("{field}.service.name"),
                "missing",
            ));
        }
        return Ok(IngressBackend::Service {
            name: s.name.clone(),
            port,
        });
    }
    if let Some(r) = &b.resource {
        return Ok(IngressBackend::Resource {
            api_group: r.api_group.clone(),
            kind: r.kind.clone(),
            name: r.name.clone(),
        });
    }
    Err(InvalidObject::new(
        K,
        key.to_string(),
        field,
        "needs service or resource",
    ))
}

pub fn ingress(ing: &networking::Ingress, default_ns: &str) -> Result<Ingress> {
    const K: &str = "Ingress";
    let key = key_of(K, &ing.metadata, default_ns)?;
    let spec = ing.spec.clone().unwrap_or_default();
    let annotations = ing.metadata.annotations.clone().unwrap_or_default();
    let class_name = spec.ingress_class_name.clone().filter(|c| !c.is_empty()).or_else(|| {
        annotations
            .get(INGRESS_CLASS_ANNOTATION)
            .cloned()
            .filter(|c| !c.is_empty())
    });

    let default_backend = match &spec.default_backend {
        Some(b) => Some(ingress_backend(&key, "spec.defaultBackend", b)?),
        None => None,
    };
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        let mut paths = Vec::new();
        for (j, p) in r.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            let field = format!("spec.rules[{i}].http.paths[{j}]");
            let path_type = match p.path_type.as_str() {
                "Exact" => PathType::Exact,
                "Prefix" => PathType::Prefix,
                "ImplementationSpecific" | "" => PathType::ImplementationSpecific,
                other => {
                    return Err(InvalidObject::new(
                        K,
                        key.to_string(),
                        format!("{field}.pathType"),
                        format!("unknown path type {other:?}"),
                    ))
                }
            };
            paths.push(IngressPath {
                path: p.path.clone(),
                path_type,
                backend: ingress_backend(&key, &format!("{field}.backend"), &p.backend)?,
            });
        }
        rules.push(IngressRule {
            host: r.host.clone().filter(|h| !h.is_empty()),
            paths,
        });
    }
    let tls = spec
        .tls
        .iter()
        .flatten()
        .map(|t| IngressTls {
            hosts: t.hosts.clone().unwrap_or_default(),
            secret_name: t.secret_name.clone().filter(|s| !s.is_empty()),
        })
        .collect();
    let status_addresses = ing
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|list| {
            list.iter()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect()
        })
        .unwrap_or_default();

    Ok(Ingress {
        key,
        class_name,
        created_unix: ing
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
        annotations: annotations.into_iter().collect::<BTreeMap<_, _>>(),
        default_backend,
        rules,
        tls,
        status_addresses,
    })
}

pub fn ingress_class(ic: &networking::IngressClass) -> Result<IngressClass> {
    const K: &str = "IngressClass";
    let name = cluster_name(K, &ic.metadata)?;
    let controller = ic
        .spec
        .as_ref()
        .and_then(|s| s.controller.clone())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| InvalidObject::new(K, name.clone(), "spec.controller", "missing"))?;
    let is_default = ic
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
        .is_some_and(|v| v == "true");
    Ok(IngressClass {
        name,
        controller,
        is_default,
    })
}

/// Converts a Secret; `Ok(None)` for types ferry does not use (anything
/// but `kubernetes.io/tls` and `Opaque`). A TLS Secret must hold `tls.crt`
/// and `tls.key`.
pub fn secret(s: &core::Secret, default_ns: &str) -> Result<Option<Secret>> {
    const K: &str = "Secret";
    let type_ = match s.type_.as_deref() {
        None | Some("") => OPAQUE_SECRET_TYPE,
        Some(t) => t,
    };
    if type_ != TLS_SECRET_TYPE && type_ != OPAQUE_SECRET_TYPE {
        return Ok(None);
    }
    let key = key_of(K, &s.metadata, default_ns)?;
    let mut data: BTreeMap<String, Vec<u8>> = s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    // The apiserver folds stringData into data; files may still carry it.
    for (k, v) in s.string_data.iter().flatten() {
        data.insert(k.clone(), v.as_bytes().to_vec());
    }
    if type_ == TLS_SECRET_TYPE {
        for name in ["tls.crt", "tls.key"] {
            if !data.contains_key(name) {
                return Err(InvalidObject::new(
                    K,
                    key.to_string(),
                    format!("data[{name}]"),
                    "missing",
                ));
            }
        }
    }
    Ok(Some(Secret {
        key,
        type_: type_.to_string(),
        data,
    }))
}

pub fn pod(p: &core::Pod, default_ns: &str) -> Result<Pod> {
    const K: &str = "Pod";
    let key = key_of(K, &p.metadata, default_ns)?;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips = Vec::new();
    if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()).filter(|l| !l.is_empty()) {
        for (i, ip) in list.iter().enumerate() {
            ips.push(parse_ip(K, &key, &format!("status.podIPs[{i}].ip"), &ip.ip)?);
        }
    } else if let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).filter(|s| !s.is_empty()) {
        ips.push(parse_ip(K, &key, "status.podIP", ip)?);
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Ok(Pod {
        ips,
        hostname: spec.and_then(|s| s.hostname.clone()).filter(|h| !h.is_empty()),
        subdomain: spec.and_then(|s| s.subdomain.clone()).filter(|h| !h.is_empty()),
        ready,
        node_name: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        key,
    })
}

pub fn node(n: &core::Node) -> Result<Node> {
    const K: &str = "Node";
    let name = cluster_name(K, &n.metadata)?;
    let addresses = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|list| {
            list.iter()
                .map(|a| NodeAddress {
                    type_: a.type_.clone(),
                    address: a.address.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let zone = n.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned();
    let spec = n.spec.as_ref();
    let pod_cidrs = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(list) if !list.is_empty() => list,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    Ok(Node {
        name,
        addresses,
        zone,
        pod_cidrs,
    })
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace> {
    Ok(Namespace {
        name: cluster_name("Namespace", &ns.metadata)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> std::result::Result<Service, InvalidObject> {
        let s: core::Service = serde_saphyr::from_str(yaml).unwrap();
        service(&s, "default")
    }

    #[test]
    fn bad_cluster_ip_names_object_and_field() {
        let err = svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}").unwrap_err();
        assert_eq!(err.object, "default/a");
        assert_eq!(err.field, "spec.clusterIP");
        assert!(err.to_string().contains("Service default/a: field spec.clusterIP"));
    }

    #[test]
    fn named_and_numeric_target_ports() {
        let s = svc("metadata: {name: a, namespace: x}\nspec:\n  clusterIP: 10.0.0.1\n  ports:\n  - {name: web, port: 80, targetPort: http}\n  - {name: b, port: 81, targetPort: \"8081\"}\n  - {name: c, port: 82}\n").unwrap();
        assert_eq!(s.key, ObjectKey::new("x", "a"));
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(8081));
        assert_eq!(s.ports[2].target_port, TargetPort::Number(82));
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn headless_and_affinity() {
        let s = svc("metadata: {name: h}\nspec: {clusterIP: None, sessionAffinity: ClientIP}").unwrap();
        assert!(s.headless);
        assert!(s.cluster_ips.is_empty());
        assert_eq!(
            s.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 10_800
            }
        );
    }

    #[test]
    fn slice_conditions_nil_rules() {
        let es: discovery::EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints:\n- addresses: [10.1.0.1]\n- addresses: [10.1.0.2]\n  conditions: {ready: false, serving: true, terminating: true}\n- addresses: [10.1.0.3]\n  conditions: {ready: false}\nports: [{name: web, port: 8080}]\n",
        )
        .unwrap();
        let s = endpoint_slice(&es, "default").unwrap().unwrap();
        assert_eq!(
            s.endpoints[0].conditions,
            Conditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(
            s.endpoints[1].conditions,
            Conditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(
            s.endpoints[2].conditions,
            Conditions {
                ready: false,
                serving: false,
                terminating: false
            }
        );
    }

    #[test]
    fn slice_family_mismatch_is_an_error() {
        let es: discovery::EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints:\n- addresses: ['::1']\n",
        )
        .unwrap();
        let err = endpoint_slice(&es, "default").unwrap_err();
        assert_eq!(err.field, "endpoints[0].addresses[0]");
    }

    #[test]
    fn tls_and_opaque_secrets_are_loaded_and_other_types_are_not() {
        let s: core::Secret =
            serde_saphyr::from_str("metadata: {name: s}\ntype: Opaque\nstringData: {auth: 'u:x'}").unwrap();
        let got = secret(&s, "default").unwrap().unwrap();
        assert_eq!((got.type_.as_str(), got.get("auth")), ("Opaque", Some(&b"u:x"[..])));
        // No type is Opaque.
        let s: core::Secret = serde_saphyr::from_str("metadata: {name: s}\ndata: {ca.crt: Q0E=}").unwrap();
        assert_eq!(secret(&s, "default").unwrap().unwrap().get("ca.crt"), Some(&b"CA"[..]));
        let s: core::Secret = serde_saphyr::from_str(
            "metadata: {name: s}\ntype: kubernetes.io/service-account-token\nstringData: {a: b}",
        )
        .unwrap();
        assert!(secret(&s, "default").unwrap().is_none());
        let s: core::Secret =
            serde_saphyr::from_str("metadata: {name: s}\ntype: kubernetes.io/tls\nstringData: {tls.crt: x}").unwrap();
        assert_eq!(secret(&s, "default").unwrap_err().field, "data[tls.key]");
    }

    #[test]
    fn ingress_class_from_annotation() {
        let i: networking::Ingress = serde_saphyr::from_str(
            "metadata: {name: i, annotations: {kubernetes.io/ingress.class: legacy}}\nspec:\n  rules:\n  - host: a.test\n    http:\n      paths:\n      - {path: /, pathType: Prefix, backend: {service: {name: s, port: {name: http}}}}\n",
        )
        .unwrap();
        let i = ingress(&i, "default").unwrap();
        assert_eq!(i.class_name.as_deref(), Some("legacy"));
        assert_eq!(
            i.rules[0].paths[0].backend,
            IngressBackend::Service {
                name: "s".into(),
                port: BackendPort::Name("http".into())
            }
        );
    }
}
