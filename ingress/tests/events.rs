//! Kubernetes Events for Ingress configuration problems, against the mock
//! apiserver (the only mocked component): one Warning Event per new
//! problem, none again while it persists, one again when it comes back,
//! none from a node that is not the leader; and every request is covered
//! by `api_access()` (which the deploy/ RBAC test checks).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use ferry_cluster::Snapshot;
use ferry_ingress::events::{self, EventConfig};
use ferry_ingress::{Engine, EngineConfig, IngressMetrics};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod common;
use common::{parse, CLASS};

#[path = "../../cluster/tests/common/mock_apiserver.rs"]
mod mock;

const EVENTS: &str = "/apis/events.k8s.io/v1/events";

fn yaml(annotations: &str, extra_service: bool) -> String {
    let mut y = CLASS.to_string();
    y += "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n---\n";
    if extra_service {
        y += "apiVersion: v1\nkind: Service\nmetadata: {name: unrelated}\nspec:\n  ports: [{name: http, port: 80}]\n---\n";
    }
    y += &format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web, namespace: shop, annotations: {{{annotations}}}}}\nspec:\n  ingressClassName: ferry\n  rules:\n  - host: web.test\n    http:\n      paths:\n      - {{path: /, pathType: Prefix, backend: {{service: {{name: s, port: {{number: 80}}}}}}}}\n"
    );
    y
}

fn event_writes(api: &mock::MockApiserver) -> Vec<Value> {
    api.writes()
        .into_iter()
        .filter(|(m, p, _)| m == "POST" && p.ends_with("/events"))
        .map(|(_, _, body)| body)
        .collect()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out: {what}");
}

/// Lets the writer see a change and act on it (or not).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn one_event_per_new_problem_written_by_the_leader_only() {
    let api = mock::MockApiserver::start().await;
    let metrics = IngressMetrics::default();
    let engine = Engine::new(EngineConfig::default(), metrics.clone()).unwrap();
    let unknown = "nginx.ingress.kubernetes.io/made-up-annotation: x";
    let mut generation = 0;
    let mut apply = |y: &str| {
        generation += 1;
        engine.apply(&Snapshot::from_objects(generation, parse(y)));
    };
    apply(&yaml(unknown, false));
    assert_eq!(metrics.annotation_problems.get(), 1);
    assert_eq!(metrics.config_problems.get(), 1, "{:?}", engine.table().problems);

    let (leader_tx, leader_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    tokio::spawn(events::run_while_leader(
        api.client(),
        engine.problems(),
        EventConfig::new("node-a"),
        metrics.clone(),
        leader_rx,
        cancel.clone(),
    ));
    settle().await;
    assert!(event_writes(&api).is_empty(), "a non-leader wrote an Event");

    leader_tx.send_replace(true);
    eventually("the leader writes the Event", || event_writes(&api).len() == 1).await;
    let ev = &event_writes(&api)[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "UnsupportedAnnotation");
    assert_eq!(ev["action"], events::ACTION);
    assert_eq!(ev["regarding"]["kind"], "Ingress");
    assert_eq!(ev["regarding"]["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(ev["regarding"]["namespace"], "shop");
    assert_eq!(ev["regarding"]["name"], "web");
    assert_eq!(ev["reportingController"], ferry_ingress::DEFAULT_CONTROLLER_NAME);
    assert_eq!(ev["reportingInstance"], "node-a");
    let note = ev["note"].as_str().unwrap();
    assert!(
        note.contains("metadata.annotations[nginx.ingress.kubernetes.io/made-up-annotation]"),
        "{note}"
    );
    assert!(api
        .get(EVENTS, &format!("shop/{}", ev["metadata"]["name"].as_str().unwrap()))
        .is_some());

    // An unrelated change (another Service) and a re-apply: no new Event.
    apply(&yaml(unknown, true));
    apply(&yaml(unknown, true));
    settle().await;
    assert_eq!(
        event_writes(&api).len(),
        1,
        "an Event was written again for a persisting problem"
    );

    // A second problem: one Event for it alone (a refused snippet).
    let both = format!("{unknown}, nginx.ingress.kubernetes.io/server-snippet: 'return 200;'");
    apply(&yaml(&both, true));
    eventually("an Event for the new problem", || event_writes(&api).len() == 2).await;
    assert_eq!(event_writes(&api)[1]["reason"], "RefusedAnnotation");
    assert_eq!(metrics.annotation_problems.get(), 2);

    // Fixed, then broken again: the returning problem is written again.
    apply(&yaml("", true));
    assert_eq!(metrics.annotation_problems.get(), 0);
    settle().await;
    apply(&yaml(unknown, true));
    eventually("an Event for the returning problem", || event_writes(&api).len() == 3).await;
    assert_eq!(event_writes(&api)[2]["reason"], "UnsupportedAnnotation");

    // Lease lost: a new problem is not written.
    leader_tx.send_replace(false);
    settle().await;
    apply(&yaml("nginx.ingress.kubernetes.io/proxy-read-timeout: soon", true));
    settle().await;
    assert_eq!(
        event_writes(&api).len(),
        3,
        "an Event was written after the lease was lost"
    );
    cancel.cancel();

    // Every request the writer made is covered by api_access().
    let access = ferry_cluster::kube::api_access();
    let ev = access
        .iter()
        .find(|a| a.group == "events.k8s.io" && a.resource == "events")
        .unwrap();
    for req in api.requests() {
        assert!(
            req.starts_with("POST /apis/events.k8s.io/v1/namespaces/shop/events"),
            "{req}"
        );
        assert!(ev.verbs.contains(&"create"));
    }
    let written = metrics
        .events
        .get_or_create(&ferry_ingress::metrics::EventLabels { result: "written" })
        .get();
    assert_eq!(written, 3);
}

#[tokio::test]
async fn a_failed_write_is_counted_and_not_retried_forever() {
    // Nothing listens there: the write fails, is counted, and the writer
    // goes on with the next problem.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let metrics = IngressMetrics::default();
    let engine = Engine::new(EngineConfig::default(), metrics.clone()).unwrap();
    engine.apply(&Snapshot::from_objects(
        1,
        parse(&yaml(
            "nginx.ingress.kubernetes.io/a: x, nginx.ingress.kubernetes.io/b: y",
            false,
        )),
    ));
    let cancel = CancellationToken::new();
    let mut config = EventConfig::new("n");
    config.timeout = Duration::from_secs(5);
    tokio::spawn(events::run(
        client,
        engine.problems(),
        config,
        metrics.clone(),
        cancel.clone(),
    ));
    let failed = || {
        metrics
            .events
            .get_or_create(&ferry_ingress::metrics::EventLabels { result: "failed" })
            .get()
    };
    eventually("both writes fail and are counted", || failed() == 2).await;
    settle().await;
    assert_eq!(failed(), 2);
    cancel.cancel();
}
