//! Ingress status: which Ingresses need `.status.loadBalancer.ingress`
//! written or cleared (pure `plan`), and the writer that patches them
//! through a `kube::Client` (`write`). The caller decides when to write
//! (e.g. only on the elected leader in `ferry node`); `run` and
//! `run_while_leader` are the loops that do.

use std::net::IpAddr;

use ferry_cluster::{ObjectKey, Snapshot};
use k8s_openapi::api::networking::v1::Ingress as KubeIngress;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

/// The client type `write` takes, re-exported for callers without a kube dependency.
pub use kube::Client;

use crate::error::IngressError;
use crate::routes::RouteTable;

/// The status changes to make.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusPlan {
    /// Served Ingresses whose status differs from our addresses.
    pub set: Vec<ObjectKey>,
    /// Ingresses we no longer serve that still show exactly our addresses.
    pub clear: Vec<ObjectKey>,
    /// The addresses to write (IPs or hostnames).
    pub addresses: Vec<String>,
}

impl StatusPlan {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.clear.is_empty()
    }
}

/// Compares the served Ingresses' current status with `addresses`.
pub fn plan(snap: &Snapshot, table: &RouteTable, addresses: &[String]) -> StatusPlan {
    let mut out = StatusPlan {
        addresses: addresses.to_vec(),
        ..StatusPlan::default()
    };
    if addresses.is_empty() {
        return out;
    }
    for ing in snap.ingresses() {
        let served = table.served.contains(&ing.key);
        if served && ing.status_addresses != addresses {
            out.set.push(ing.key.clone());
        } else if !served && ing.status_addresses == addresses {
            out.clear.push(ing.key.clone());
        }
    }
    out
}

fn load_balancer_entries(addresses: &[String]) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| {
            if a.parse::<IpAddr>().is_ok() {
                json!({ "ip": a })
            } else {
                json!({ "hostname": a })
            }
        })
        .collect();
    serde_json::Value::Array(entries)
}

/// Applies `plan` with merge patches on the status subresource. Every
/// Ingress is attempted; the first error is returned after the others ran.
pub async fn write(client: kube::Client, plan: &StatusPlan) -> Result<usize, IngressError> {
    let mut first_error = None;
    let mut written = 0;
    let set = json!({ "status": { "loadBalancer": { "ingress": load_balancer_entries(&plan.addresses) } } });
    let clear = json!({ "status": { "loadBalancer": { "ingress": null } } });
    for (keys, body) in [(&plan.set, &set), (&plan.clear, &clear)] {
        for key in keys {
            let api: Api<KubeIngress> = Api::namespaced(client.clone(), &key.namespace);
            match api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(body))
                .await
            {
                Ok(_) => {
                    written += 1;
                    tracing::info!(ingress = %key, addresses = ?plan.addresses, "ingress status written");
                }
                Err(source) => {
                    tracing::warn!(ingress = %key, error = %source, "writing ingress status failed");
                    first_error.get_or_insert(IngressError::Status {
                        ingress: key.to_string(),
                        source,
                    });
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(written),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{compile, ClassSelection};

    #[test]
    fn plan_sets_served_and_clears_unserved() {
        let yaml = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: ferry}
spec: {controller: ferry.dev/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: new}
spec: {ingressClassName: ferry, defaultBackend: {service: {name: s, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: current}
spec: {ingressClassName: ferry}
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: left}
spec: {ingressClassName: other}
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: foreign}
spec: {ingressClassName: other}
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
"#;
        let snap = crate::test_support::snapshot(yaml);
        let table = compile(&snap, &ClassSelection::default());
        let p = plan(&snap, &table, &["192.0.2.1".to_string()]);
        assert_eq!(p.set, vec![ObjectKey::new("default", "new")]);
        assert_eq!(p.clear, vec![ObjectKey::new("default", "left")]);
        assert!(plan(&snap, &table, &[]).is_empty());
        assert_eq!(
            load_balancer_entries(&["192.0.2.1".into(), "lb.example".into()]),
            json!([{ "ip": "192.0.2.1" }, { "hostname": "lb.example" }])
        );
    }
}

/// Where the status addresses come from.
#[derive(Debug, Clone, Default)]
pub struct StatusSource {
    /// Fixed addresses (`--status-address`); when empty, the first IP of
    /// the Node named `node_name`.
    pub addresses: Vec<String>,
    pub node_name: Option<String>,
}

impl StatusSource {
    fn addresses(&self, snap: &Snapshot) -> Vec<String> {
        if !self.addresses.is_empty() {
            return self.addresses.clone();
        }
        let Some(node) = &self.node_name else {
            return Vec::new();
        };
        snap.node(node)
            .map(|n| n.ips().iter().take(1).map(|ip| ip.to_string()).collect())
            .unwrap_or_default()
    }
}

/// Writes Ingress status after every snapshot (changes only) until
/// `cancel` fires; a failed write is retried on the next snapshot.
pub async fn run(
    client: kube::Client,
    mut snapshots: ferry_cluster::SnapshotRx,
    classes: crate::ClassSelection,
    source: StatusSource,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut warned = false;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if let Some(snap) = snap {
            let addresses = source.addresses(&snap);
            if addresses.is_empty() && !warned {
                tracing::warn!("no --status-address and no Node for $NODE_NAME: Ingress status is not written");
                warned = true;
            }
            let table = crate::compile(&snap, &classes);
            let plan = plan(&snap, &table, &addresses);
            if !plan.is_empty() {
                if let Err(e) = write(client.clone(), &plan).await {
                    tracing::warn!(error = %e, "ingress status update incomplete; retried on the next snapshot");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
        }
    }
}

/// Runs the status writer (`run`) only while `is_leader` is true (a
/// `ferry_cluster::lease::LeaderElector`'s view); losing the lease cancels
/// it before its next write.
pub async fn run_while_leader(
    client: kube::Client,
    snapshots: ferry_cluster::SnapshotRx,
    classes: crate::ClassSelection,
    source: StatusSource,
    is_leader: tokio::sync::watch::Receiver<bool>,
    cancel: tokio_util::sync::CancellationToken,
) {
    ferry_cluster::lease::while_leader(is_leader, cancel, "Ingress status writes", |term| {
        run(client.clone(), snapshots.clone(), classes.clone(), source.clone(), term)
    })
    .await;
}
