//! `ferry node`'s leader-gated Ingress status against the mock apiserver
//! (the only mocked component): no writes while not leader, writes once
//! elected, none after the lease is lost.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};

#[path = "../cluster/tests/common/mock_apiserver.rs"]
mod mock;

fn status_writes(api: &mock::MockApiserver) -> usize {
    api.writes()
        .iter()
        .filter(|(m, p, _)| m == "PATCH" && p.ends_with("/ingresses/wp-ing/status"))
        .count()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out: {what}");
}

#[tokio::test]
async fn status_is_written_by_the_leader_only() {
    let api = mock::MockApiserver::start().await;
    let ingress_yaml = include_str!("../examples/wordpress/ingress.yaml");
    let objects: Vec<_> = ferry_cluster::files::parse_documents(std::path::Path::new("ingress.yaml"), ingress_yaml)
        .into_iter()
        .flat_map(|d| d.unwrap())
        .collect();
    api.put(
        mock::INGRESSES,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "wp-ing", "namespace": "default"},
               "spec": {"ingressClassName": "wp-ink"}}),
    );
    let snap = ferry_cluster::Snapshot::from_objects(1, objects.clone());
    let (snap_tx, snap_rx) = watch::channel(Some(Arc::new(snap)));
    let cli = Cli::try_parse_from([
        "ferry",
        "node",
        "--ingress-class",
        "wp-ink",
        "--status-address",
        "192.0.2.10",
    ])
    .unwrap();
    let Command::Node(args) = cli.command else {
        panic!("not node")
    };
    let (leader_tx, leader_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    tokio::spawn(ferry_ingress::status::run_while_leader(
        api.client(),
        snap_rx,
        args.ingress.classes(),
        args.ingress.status_source(),
        leader_rx,
        cancel.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_writes(&api), 0, "a non-leader wrote status");

    leader_tx.send_replace(true);
    eventually("the leader writes status", || status_writes(&api) == 1).await;
    let stored = api.get(mock::INGRESSES, "default/wp-ing").unwrap();
    assert_eq!(stored["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.10");

    // Lease lost: a new snapshot (which would need a write) writes nothing.
    leader_tx.send_replace(false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    snap_tx.send_replace(Some(Arc::new(ferry_cluster::Snapshot::from_objects(2, objects))));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_writes(&api), 1, "status written after the lease was lost");

    // Elected again: writing resumes.
    leader_tx.send_replace(true);
    eventually("writes resume after re-election", || status_writes(&api) == 2).await;
    cancel.cancel();
}
