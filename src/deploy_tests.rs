//! Checks of `deploy/`: every manifest parses as its k8s-openapi type, the
//! RBAC rules grant exactly what the code uses (`api_access()`, itself
//! checked against the requests the code really makes), and the DaemonSet's
//! arguments parse with the real CLI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};

use crate::cli::{Cli, Command};

#[derive(Default)]
struct Deploy {
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    daemonsets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
    services: Vec<Service>,
    ingress_classes: Vec<IngressClass>,
    bindings: usize,
}

fn load() -> Deploy {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut d = Deploy::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "deploy/ has too few manifests: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for v in docs {
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let ctx = format!("{} {kind}", path.display());
            macro_rules! parse {
                ($t:ty) => {
                    serde_json::from_value::<$t>(v.clone()).unwrap_or_else(|e| panic!("{ctx}: {e}"))
                };
            }
            match kind.as_str() {
                "Namespace" => drop(parse!(Namespace)),
                "ServiceAccount" => drop(parse!(ServiceAccount)),
                "ClusterRole" => d.cluster_roles.push(parse!(ClusterRole)),
                "Role" => d.roles.push(parse!(Role)),
                "ClusterRoleBinding" => {
                    parse!(ClusterRoleBinding);
                    d.bindings += 1
                }
                "RoleBinding" => {
                    parse!(RoleBinding);
                    d.bindings += 1
                }
                "ConfigMap" => d.config_maps.push(parse!(ConfigMap)),
                "DaemonSet" => d.daemonsets.push(parse!(DaemonSet)),
                "Service" => d.services.push(parse!(Service)),
                "IngressClass" => d.ingress_classes.push(parse!(IngressClass)),
                other => panic!("{ctx}: unexpected kind {other}"),
            }
        }
    }
    d
}

/// (group, resource, verb) triples a set of rules grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_code_uses() {
    let d = load();
    assert_eq!(d.bindings, 2);
    let cluster: BTreeSet<_> = d
        .cluster_roles
        .iter()
        .flat_map(|r| grants(r.rules.as_deref().unwrap_or_default()))
        .collect();
    let namespaced: BTreeSet<_> = d
        .roles
        .iter()
        .inspect(|r| assert_eq!(r.metadata.namespace.as_deref(), Some("ferry-system")))
        .flat_map(|r| grants(r.rules.as_deref().unwrap_or_default()))
        .collect();
    let mut needed_cluster = BTreeSet::new();
    let mut needed_ns = BTreeSet::new();
    for a in ferry_cluster::kube::api_access() {
        for v in a.verbs {
            let t = (a.group.to_string(), a.resource.clone(), v.to_string());
            if a.own_namespace {
                needed_ns.insert(t);
            } else {
                needed_cluster.insert(t);
            }
        }
    }
    assert_eq!(cluster, needed_cluster, "ClusterRole must grant exactly api_access()");
    assert_eq!(namespaced, needed_ns, "Role must grant exactly the Lease access");
}

#[test]
fn daemonset_args_parse_with_the_real_cli() {
    let d = load();
    let ds = &d.daemonsets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let mut env: BTreeMap<String, String> = BTreeMap::from([
        ("NODE_NAME".into(), "minikube".into()),
        ("NODE_IP".into(), "192.168.49.2".into()),
        ("POD_NAMESPACE".into(), "ferry-system".into()),
    ]);
    for cm in &d.config_maps {
        env.extend(cm.data.clone().unwrap_or_default());
    }
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| {
            let mut a = a.clone();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            assert!(!a.contains("$("), "unexpanded variable in {a}");
            a
        })
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("ferry".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("DaemonSet args {args:?} do not parse: {e}"));
    // Probes hit the admin server the args configure.
    let admin = args.iter().find_map(|a| a.strip_prefix("--admin-addr=")).unwrap();
    let port: u16 = admin.rsplit(':').next().unwrap().parse().unwrap();
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port as i32)
        );
    }
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    for cap in ["NET_ADMIN", "BPF"] {
        assert!(caps.add.iter().flatten().any(|c| c == cap), "missing capability {cap}");
    }
    // Some VMs refuse every pod that asks for SYS_RESOURCE (kube-kit README).
    assert!(!caps.add.iter().flatten().any(|c| c == "SYS_RESOURCE"));
    // ferry's own resolvers are the node's: with ClusterFirst* it would
    // forward to the cluster DNS IP, i.e. to itself.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    // Metrics on loopback only, like kube-proxy; the probes use it too.
    assert!(admin.starts_with("127.0.0.1:"), "{admin}");
    // No layout-specific cgroup path: ferry finds the cgroup2 mount itself.
    assert!(!args.iter().any(|a| a.starts_with("--cgroup")), "{args:?}");
    // The shipped values mean: no --apiserver until the user sets it, the
    // kube-dns takeover on.
    let Command::Node(node) = cli.command else {
        unreachable!()
    };
    assert_eq!(node.run.source.apiserver(), None);
    assert_eq!(node.dns_service, "kube-system/kube-dns");
    // /lib/modules may be absent on the host.
    let modules = pod.volumes.iter().flatten().find(|v| v.name == "modules").unwrap();
    assert_ne!(modules.host_path.as_ref().unwrap().type_.as_deref(), Some("Directory"));
}

#[test]
fn daemonset_takes_the_apiserver_from_the_config() {
    let text = crate::render::manifests("ferry:1", &["APISERVER=https://127.0.0.1:6443".into()]).unwrap();
    assert!(text.contains("APISERVER: \"https://127.0.0.1:6443\""), "{text}");
    assert!(text.contains("--apiserver=$(APISERVER)"));
    assert!(ferry_cluster::kube::parse_apiserver("https://control-plane.minikube.internal:8443").is_ok());
    for bad in ["control-plane:8443", "ftp://x", "https://"] {
        assert!(ferry_cluster::kube::parse_apiserver(bad).is_err(), "{bad}");
    }
}

#[test]
fn dns_service_and_ingress_class() {
    let d = load();
    let dns = &d.services[0];
    let ports = dns.spec.as_ref().unwrap().ports.as_ref().unwrap();
    let protos: BTreeSet<_> = ports
        .iter()
        .map(|p| (p.port, p.protocol.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        protos,
        BTreeSet::from([(53, "TCP".to_string()), (53, "UDP".to_string())])
    );
    let class = &d.ingress_classes[0];
    assert_eq!(
        class.spec.as_ref().unwrap().controller.as_deref(),
        Some(ferry_ingress::DEFAULT_CONTROLLER_NAME)
    );
}

#[test]
fn render_manifests_embeds_every_deploy_file() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let embedded: Vec<String> = crate::render::DEPLOY.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, embedded);
}
