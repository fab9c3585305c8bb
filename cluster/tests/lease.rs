//! Leader election against the mock apiserver: one leader at a time, a
//! stopped leader is replaced after the lease expires, and a leader whose
//! Lease is taken over steps down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::time::Duration;

use common::mock_apiserver::*;
use ferry_cluster::lease::{LeaderElector, LeaseConfig};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry_period: Duration::from_millis(200),
        ..LeaseConfig::new("ferry-system", "ferry-ingress-status", identity)
    }
}

async fn wait_until(rx: &mut watch::Receiver<bool>, want: bool, what: &str) {
    let r = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| *v == want)).await;
    assert!(matches!(r, Ok(Ok(_))), "timed out: {what}");
}

#[tokio::test]
async fn one_leader_failover_and_step_down() {
    let api = MockApiserver::start().await;
    api.ensure(LEASES);
    let (a, mut a_rx) = LeaderElector::new(api.client(), config("node-a"));
    let a_cancel = CancellationToken::new();
    tokio::spawn(a.run(a_cancel.clone()));
    wait_until(&mut a_rx, true, "a leads").await;

    let (b, mut b_rx) = LeaderElector::new(api.client(), config("node-b"));
    let b_cancel = CancellationToken::new();
    tokio::spawn(b.run(b_cancel.clone()));
    // b keeps trying while a renews: it must not become leader.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!*b_rx.borrow(), "two leaders at once");
    assert!(*a_rx.borrow());
    let lease = api.get(LEASES, "ferry-system/ferry-ingress-status").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-a");

    // a stops (no more renewals): b takes over after the lease expires.
    a_cancel.cancel();
    wait_until(&mut a_rx, false, "a steps down on shutdown").await;
    wait_until(&mut b_rx, true, "b takes over").await;
    let lease = api.get(LEASES, "ferry-system/ferry-ingress-status").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // Someone else takes the lease (e.g. an operator edit): b steps down.
    let mut taken = lease.clone();
    taken["spec"]["holderIdentity"] = json!("node-c");
    taken["spec"]["renewTime"] = json!("2999-01-01T00:00:00.000000Z");
    api.put(LEASES, taken);
    wait_until(&mut b_rx, false, "b steps down after losing the lease").await;
    b_cancel.cancel();

    // Every request is covered by api_access(), verb by verb.
    let access = ferry_cluster::kube::api_access();
    let lease = access.iter().find(|a| a.resource == "leases").unwrap();
    assert!(lease.own_namespace);
    for req in api.requests() {
        let verb = match req.split(' ').next().unwrap() {
            "GET" => "get",
            "POST" => "create",
            "PUT" => "update",
            other => panic!("unexpected {other} in {req}"),
        };
        assert!(req.contains("/namespaces/ferry-system/leases"), "{req}");
        assert!(lease.verbs.contains(&verb), "{req} needs {verb}");
    }
}
