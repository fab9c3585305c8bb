//! The file source end to end: create, modify and delete files under a
//! watched directory; broken documents keep their last good version.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::files::FileSource;
use ferry_cluster::{ClusterMetrics, Publisher, Snapshot, SnapshotRx};
use tokio_util::sync::CancellationToken;

const SVC_A: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
const SVC_B: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
const SVC_B2: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.22, ports: [{port: 80}]}\n";
const SVC_C: &str =
    "apiVersion: v1\nkind: Service\nmetadata: {name: c}\nspec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}\n";

/// Waits (bounded) for a snapshot that satisfies `pred`.
async fn wait_for(rx: &mut SnapshotRx, pred: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let fut = rx.wait_for(|s| s.as_ref().is_some_and(|s| pred(s)));
    let got = tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("timed out waiting for a snapshot")
        .expect("publisher stopped");
    got.clone().unwrap()
}

fn cluster_ip(snap: &Snapshot, name: &str) -> Option<String> {
    snap.service("default", name).map(|s| s.cluster_ips[0].to_string())
}

#[tokio::test]
async fn create_modify_delete_and_broken_documents() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), SVC_A).unwrap();
    let metrics = ClusterMetrics::default();
    let (publisher, tx, mut rx) = Publisher::new(Duration::from_millis(50), metrics.clone());
    let cancel = CancellationToken::new();
    tokio::spawn(publisher.run(cancel.clone()));
    let source = FileSource::new(vec![dir.path().to_path_buf()], metrics.clone());
    tokio::spawn(source.run(tx, cancel.clone()));

    let first = wait_for(&mut rx, |s| s.service_count() == 1).await;
    assert!(first.service("default", "a").is_some());

    // Create.
    std::fs::write(dir.path().join("b.yaml"), format!("{SVC_B}---\n{SVC_C}")).unwrap();
    let snap = wait_for(&mut rx, |s| s.service_count() == 3).await;
    assert!(snap.generation > first.generation);

    // Modify with a broken first document: b keeps its last good version,
    // c (the next document) still updates, a is untouched.
    let broken =
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: not-an-ip, ports: [{port: 80}]}\n";
    let c2 = SVC_C.replace("10.96.0.3", "10.96.0.33");
    std::fs::write(dir.path().join("b.yaml"), format!("{broken}---\n{c2}")).unwrap();
    let snap = wait_for(&mut rx, |s| cluster_ip(s, "c").as_deref() == Some("10.96.0.33")).await;
    assert_eq!(cluster_ip(&snap, "b").as_deref(), Some("10.96.0.2"));
    assert_eq!(cluster_ip(&snap, "a").as_deref(), Some("10.96.0.1"));
    let errors = metrics
        .source_errors
        .get_or_create(&ferry_cluster::metrics::SourceLabel { source: "files".into() })
        .get();
    assert!(errors >= 1);

    // A YAML syntax error in one document does not stop the others.
    std::fs::write(
        dir.path().join("b.yaml"),
        format!("{SVC_B2}---\nkind: [unclosed\n---\n{SVC_C}"),
    )
    .unwrap();
    let snap = wait_for(&mut rx, |s| cluster_ip(s, "b").as_deref() == Some("10.96.0.22")).await;
    assert_eq!(cluster_ip(&snap, "c").as_deref(), Some("10.96.0.3"));

    // Delete.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    let snap = wait_for(&mut rx, |s| s.service_count() == 1).await;
    assert!(snap.service("default", "a").is_some());
    cancel.cancel();
}

#[test]
fn document_errors_name_path_and_index() {
    let docs = ferry_cluster::files::parse_documents(
        std::path::Path::new("x.yaml"),
        &format!(
            "{SVC_A}---\nkind: Service\napiVersion: v1\nmetadata: {{name: z}}\nspec: {{ports: [{{port: 99999}}]}}\n"
        ),
    );
    assert!(docs[0].is_ok());
    let err = docs[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("x.yaml: document 1"), "{err}");
    assert!(err.contains("spec.ports[0].port"), "{err}");
}

#[tokio::test]
async fn nothing_is_published_before_every_kind_is_listed() {
    let (publisher, tx, rx) = Publisher::new(Duration::from_millis(10), ClusterMetrics::default());
    let cancel = CancellationToken::new();
    tokio::spawn(publisher.run(cancel.clone()));
    use ferry_cluster::{Change, Kind};
    for kind in Kind::ALL.iter().filter(|k| **k != Kind::Pod) {
        tx.send(Change::Relist {
            kind: *kind,
            objects: vec![],
            keep: vec![],
        })
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.borrow().is_none());
    tx.send(Change::Relist {
        kind: Kind::Pod,
        objects: vec![],
        keep: vec![],
    })
    .unwrap();
    let mut rx = rx;
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .unwrap()
        .unwrap();
    cancel.cancel();
}

/// A reload after one file changed sends only that file's changes: the
/// changed and new objects, deletions for objects gone from every file
/// (a key another file still defines is re-applied from it), and the
/// Namespaces.
#[test]
fn a_reload_sends_only_the_changed_files_objects() {
    use ferry_cluster::store::Change;
    use ferry_cluster::Kind;
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.yaml");
    let two = dir.path().join("two.yaml");
    std::fs::write(&one, format!("{SVC_A}---\n{SVC_B}")).unwrap();
    std::fs::write(&two, format!("{SVC_C}---\n{SVC_A}")).unwrap();
    let mut source = FileSource::new(vec![dir.path().to_path_buf()], ClusterMetrics::default());
    source.reload();
    let before = source.per_file();
    // Unchanged: only the Namespace relist.
    source.reload();
    let changes = source.changes_since(&before);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(matches!(
        &changes[0],
        Change::Relist {
            kind: Kind::Namespace,
            ..
        }
    ));
    // b changes, a leaves one.yaml (two.yaml still has it), c is untouched.
    std::fs::write(&one, SVC_B2).unwrap();
    source.reload();
    let changes = source.changes_since(&before);
    let applied: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Apply(o) => Some(o.key().name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(applied, ["b", "a"], "{changes:?}");
    assert!(!changes.iter().any(|c| matches!(c, Change::Delete(..))), "{changes:?}");
    // Gone from every file: deleted.
    let before = source.per_file();
    std::fs::write(&two, SVC_C).unwrap();
    source.reload();
    let changes = source.changes_since(&before);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Delete(Kind::Service, k) if k.name == "a")),
        "{changes:?}"
    );
}

/// A document nested far too deep (block, or 40,000 levels of flow) is
/// refused at once and costs the documents beside it nothing: no stack
/// overflow, no seconds of parsing.
#[test]
fn a_deeply_nested_document_is_refused_and_the_others_load() {
    let block: String = (0..2_000).map(|i| format!("{}- k:\n", " ".repeat(2 * i))).collect();
    let flow = format!("a: {}{}\n", "[".repeat(40_000), "]".repeat(40_000));
    for deep in [block, flow] {
        let text = format!("{deep}---\n{SVC_A}");
        let docs = ferry_cluster::files::parse_documents(std::path::Path::new("deep.yaml"), &text);
        let err = docs[0].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("deep.yaml: document 0") && (err.contains("depth") || err.contains("recursion limit")),
            "{err}"
        );
        assert_eq!(docs[1].as_ref().unwrap().len(), 1);
    }
}

/// YAML 1.2 booleans, as before the move to serde-saphyr: a name such as
/// `off` or `no` is a string.
#[test]
fn yaml_1_1_words_are_strings() {
    let docs = ferry_cluster::files::parse_documents(
        std::path::Path::new("w.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: off, namespace: no}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80, name: y}]}\n",
    );
    let objects = docs[0].as_ref().unwrap();
    let ferry_cluster::Object::Service(s) = &objects[0] else {
        panic!("not a Service: {objects:?}")
    };
    assert_eq!((s.key.namespace.as_str(), s.key.name.as_str()), ("no", "off"));
    assert_eq!(s.ports[0].name, "y");
}
