//! Test fixtures shared by the proxy crate's unit tests: manifests to
//! snapshots, the policies fixture cluster, the node it is seen from, and
//! golden-file comparison.

use std::path::Path;

use ferry_cluster::{Object, Snapshot};

use crate::table::NodeConfig;

/// The objects of a multi-document YAML text; every document must parse.
pub fn objects(path: &Path, text: &str) -> Vec<Object> {
    let mut objects = Vec::new();
    for d in ferry_cluster::files::parse_documents(path, text) {
        objects.extend(d.unwrap());
    }
    objects
}

/// A snapshot (generation 1) of a YAML text.
pub fn snapshot(yaml: &str) -> Snapshot {
    Snapshot::from_objects(1, objects(Path::new("test.yaml"), yaml))
}

/// testdata/policies.yaml: one Service for every policy the planner knows.
pub fn fixture_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/policies.yaml")).unwrap()
}

/// node-a, 192.0.2.10, pod CIDR 10.244.0.0/16.
pub fn node() -> NodeConfig {
    NodeConfig {
        node_name: "node-a".into(),
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        nodeport_addresses: vec![],
        localhost_nodeports: false,
        local_dns: None,
    }
}

/// `text` must equal testdata/`file`; `UPDATE_GOLDEN=1` rewrites the file.
pub fn assert_golden(file: &str, text: &str) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(file);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        text == want,
        "rendered text differs from {} (rerun with UPDATE_GOLDEN=1 and review the diff):\n{text}",
        golden.display()
    );
}
