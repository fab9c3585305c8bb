//! What the crate's unit tests share: manifests parsed as the file source
//! parses them.

use ferry_cluster::{Ingress, Object, Snapshot};

/// The objects of a multi-document YAML text (every document must parse).
pub fn objects(yaml: &str) -> Vec<Object> {
    let mut out = Vec::new();
    for doc in ferry_cluster::files::parse_documents(std::path::Path::new("t.yaml"), yaml) {
        out.extend(doc.unwrap());
    }
    out
}

/// A snapshot (generation 1) of the objects of `yaml`.
pub fn snapshot(yaml: &str) -> Snapshot {
    Snapshot::from_objects(1, objects(yaml))
}

/// An Ingress `default/i` with these annotations (YAML flow-map entries).
pub fn ingress(annotations: &str) -> Ingress {
    let text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, annotations: {{{annotations}}}}}\nspec: {{}}\n"
    );
    match objects(&text).pop() {
        Some(Object::Ingress(i)) => (*i).clone(),
        other => panic!("not an Ingress: {other:?}"),
    }
}
