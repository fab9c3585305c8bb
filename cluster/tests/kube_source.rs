//! The kube source against a mock apiserver (the only mocked component):
//! initial lists gate the first snapshot, watch events flow into snapshots,
//! a closed watch is resumed, and `410 Gone` forces a re-list that catches
//! changes the watch never reported.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::mock_apiserver::*;
use ferry_cluster::kube::KubeSource;
use ferry_cluster::{ClusterMetrics, Publisher, Snapshot, SnapshotRx};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}})
}

async fn wait_for(rx: &mut SnapshotRx, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let fut = rx.wait_for(|s| s.as_ref().is_some_and(|s| pred(s)));
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(Ok(s)) => s.clone().unwrap(),
        _ => panic!("timed out waiting for: {what}"),
    }
}

/// Every collection the kube source watches, empty.
fn ensure_watched(api: &MockApiserver) {
    for c in [
        SERVICES,
        ENDPOINTSLICES,
        INGRESSES,
        INGRESSCLASSES,
        SECRETS,
        PODS,
        NODES,
        NAMESPACES,
    ] {
        api.ensure(c);
    }
}

/// Starts a publisher and the kube source against `api`.
fn start_source(api: &MockApiserver, debounce_ms: u64) -> (SnapshotRx, CancellationToken) {
    let (publisher, tx, rx) = Publisher::new(Duration::from_millis(debounce_ms), ClusterMetrics::default());
    let cancel = CancellationToken::new();
    tokio::spawn(publisher.run(cancel.clone()));
    let source = KubeSource::new(api.client(), ClusterMetrics::default());
    let c = cancel.clone();
    tokio::spawn(async move { source.run(tx, c).await });
    (rx, cancel)
}

#[tokio::test]
async fn lists_gate_first_snapshot_then_watch_relist_and_resume() {
    let api = MockApiserver::start().await;
    ensure_watched(&api);
    api.put(
        NAMESPACES,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    api.put(SERVICES, service("a", "10.96.0.1"));
    api.put(
        ENDPOINTSLICES,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "a-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "a"}},
               "addressType": "IPv4", "ports": [{"port": 8080}],
               "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}]}),
    );
    // Secret types ferry never uses (Helm releases, service-account
    // tokens) are filtered server-side by the field selector; check it is sent.
    api.set_list_delay(PODS, Duration::from_millis(1500));

    let (mut rx, cancel) = start_source(&api, 20);

    // The slow Pod list holds the first snapshot back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(rx.borrow().is_none(), "published before every kind was listed");
    let snap = wait_for(&mut rx, "first snapshot", |s| s.service_count() == 1).await;
    let a = snap.service("default", "a").unwrap();
    assert_eq!(snap.backends(a, &a.ports[0]).len(), 1);
    assert!(api.requests().iter().any(|r| r.starts_with("GET /api/v1/secrets?")
        && r.contains(
            "fieldSelector=type%21%3Dhelm.sh%2Frelease.v1%2Ctype%21%3Dkubernetes.io%2Fservice-account-token"
        )));
    assert!(api
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /api/v1/pods?") && r.contains("fieldSelector=status.phase%21%3DSucceeded")));

    // A watch event reaches a snapshot.
    api.put(SERVICES, service("b", "10.96.0.2"));
    wait_for(&mut rx, "watch ADDED b", |s| s.service("default", "b").is_some()).await;

    // The watch closes; the watcher resumes and sees the next event.
    api.close_watches(SERVICES);
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.put(SERVICES, service("c", "10.96.0.3"));
    wait_for(&mut rx, "event after a closed watch", |s| {
        s.service("default", "c").is_some()
    })
    .await;

    // An update that fails conversion keeps the last good version.
    api.put(SERVICES, service("c", "not-an-ip"));
    api.put(SERVICES, service("d", "10.96.0.4"));
    let snap = wait_for(&mut rx, "d after a bad c", |s| s.service("default", "d").is_some()).await;
    assert_eq!(
        snap.service("default", "c").unwrap().cluster_ips[0].to_string(),
        "10.96.0.3"
    );

    // A deletion the watch never reports, then 410 Gone: only the re-list
    // can reveal it.
    api.delete_silently(SERVICES, "default/a");
    api.expire(SERVICES);
    wait_for(&mut rx, "re-list drops a", |s| s.service("default", "a").is_none()).await;
    let snap = rx.borrow().clone().unwrap();
    assert!(snap.service("default", "b").is_some());
    // c is still broken in the apiserver: the re-list keeps its last good version.
    assert_eq!(
        snap.service("default", "c").unwrap().cluster_ips[0].to_string(),
        "10.96.0.3"
    );
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "expected a re-list after 410, saw {lists} lists");

    // Deleting through the watch.
    api.delete(SERVICES, "default/b");
    wait_for(&mut rx, "DELETED b", |s| s.service("default", "b").is_none()).await;
    cancel.cancel();
}

/// Every request path the code made is covered by `api_access()` (which the
/// deploy/ RBAC test checks): the permission list is derived from behaviour.
#[tokio::test]
async fn every_request_is_in_api_access() {
    let api = MockApiserver::start().await;
    ensure_watched(&api);
    let (mut rx, cancel) = start_source(&api, 10);
    wait_for(&mut rx, "first snapshot", |_| true).await;
    cancel.cancel();
    let access = ferry_cluster::kube::api_access();
    for req in api.requests() {
        let path = req.split(['?', ' ']).nth(1).unwrap();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, resource) = if parts[0] == "api" {
            ("", parts[2])
        } else {
            (parts[1], parts[3])
        };
        assert!(
            access
                .iter()
                .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&"list")),
            "request {req} is not covered by api_access()"
        );
    }
}
