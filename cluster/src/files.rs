//! The file source: Kubernetes objects from files and directories of
//! multi-document YAML (or JSON), for standalone mode and `ferry render`.
//!
//! It emits the same `Change`s as the kube source: the first load sends
//! one `Relist` per kind with the union of all files; a reload after a
//! change sends `Apply`/`Delete` for the objects of the files that changed
//! (and a `Relist` of Namespaces). Documents are parsed one by one, so a broken document is
//! reported (path, document index, error) while the others load; for the
//! broken document the objects of its last good version are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::convert;
use crate::error::SourceError;
use crate::metrics::ClusterMetrics;
use crate::model::ObjectKey;
use crate::model::{Kind, Namespace, Object};
use crate::publish::ChangeTx;
use crate::store::Change;

/// Namespace for objects that do not name one, as kubectl would apply them.
pub const DEFAULT_NAMESPACE: &str = "default";

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// One parsed document: the objects it holds, or why it could not be used.
pub type Document = Result<Vec<Object>, SourceError>;

/// Deepest nesting a document may have (serde-saphyr's own default).
/// Kubernetes objects nest about 10 levels, a CRD's schema a few dozen; the
/// bound keeps a hostile or broken file from costing seconds of parsing or
/// the stack of the thread that parses it.
pub const MAX_DEPTH: usize = 64;

/// The YAML parser's settings: YAML 1.2 booleans (`off`, `no`, `y` are
/// strings, as serde_yaml read them: an Ingress may be named `off`),
/// bounded depth, room for a `kubectl get -o yaml` List of a large
/// cluster, one-line errors.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_nodes = 20_000_000;
    budget.max_events = 100_000_000;
    budget.max_total_scalar_bytes = 1 << 30;
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.emit_comments = false;
    options.with_snippet = false;
    options
}

/// Splits a YAML stream into documents on `---` lines. Done by hand rather
/// than with the parser's multi-document reader so that one broken document
/// cannot stop the ones after it from loading. Borrows from `text`: large
/// manifest files are not copied.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push(&text[start..pos]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push(&text[start..]);
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// Parses one YAML/JSON text into documents. Index `i` of the result is
/// document `i` of the text (blank documents included, as `Ok(vec![])`).
pub fn parse_documents(path: &Path, text: &str) -> Vec<Document> {
    split_documents(text)
        .iter()
        .enumerate()
        .map(|(index, doc)| {
            if is_blank(doc) {
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            // The fast path (`yaml`) for the YAML manifests are written in;
            // anything it does not read, or any error, is parsed again by
            // the full parser, whose result and messages are the ones kept.
            let fast = crate::yaml::to_json(doc).map(|json| json_objects(path, index, &json, &mut out));
            if fast != Some(Ok(())) {
                out.clear();
                let value: serde_json::Value =
                    serde_saphyr::from_str_with_options(doc, yaml_options()).map_err(|e| SourceError::Document {
                        path: path.to_path_buf(),
                        index,
                        message: e.to_string(),
                    })?;
                value_objects(path, index, value, &mut out)?;
            }
            // Most documents hold one object; don't keep room for four.
            out.shrink_to_fit();
            Ok(out)
        })
        .collect()
}

/// A document's objects from its JSON text (the fast path). Lists are left
/// to `value_objects`; an error only means "use the full parser".
fn json_objects(path: &Path, index: usize, json: &str, out: &mut Vec<Object>) -> Result<(), ()> {
    #[derive(serde::Deserialize)]
    struct Header<'a> {
        #[serde(borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, rename = "apiVersion")]
        api_version: Option<std::borrow::Cow<'a, str>>,
    }
    let header: Header = serde_json::from_str(json).map_err(drop)?;
    let (Some(kind), api_version) = (header.kind, header.api_version) else {
        return Err(());
    };
    if kind.ends_with("List") {
        return Err(());
    }
    let api_version = api_version.unwrap_or_default();
    typed_object(path, index, &kind, &api_version, JsonText(json), out).map_err(drop)
}

/// Where a typed object is deserialized from.
trait TypedSource {
    fn typed<T: serde::de::DeserializeOwned>(self) -> Result<T, String>;
}

/// JSON text (the fast path's output).
struct JsonText<'a>(&'a str);

impl TypedSource for JsonText<'_> {
    fn typed<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        serde_json::from_str(self.0).map_err(|e| e.to_string())
    }
}

impl TypedSource for serde_json::Value {
    fn typed<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        serde_json::from_value(self).map_err(|e| e.to_string())
    }
}

fn value_objects(
    path: &Path,
    index: usize,
    value: serde_json::Value,
    out: &mut Vec<Object>,
) -> Result<(), SourceError> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| SourceError::Document {
            path: path.to_path_buf(),
            index,
            message: "no `kind` field".into(),
        })?
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
        let items = value
            .get("items")
            .and_then(|i| i.as_array())
            .cloned()
            .unwrap_or_default();
        for item in items {
            value_objects(path, index, item, out)?;
        }
        return Ok(());
    }
    typed_object(path, index, &kind, &api_version, value, out)
}

/// The object of one `kind`/`apiVersion`, converted to ferry's model.
fn typed_object(
    path: &Path,
    index: usize,
    kind: &str,
    api_version: &str,
    source: impl TypedSource,
    out: &mut Vec<Object>,
) -> Result<(), SourceError> {
    let invalid = |source| SourceError::Invalid {
        path: path.to_path_buf(),
        index,
        source,
    };
    macro_rules! parse {
        ($t:ty) => {
            source.typed::<$t>().map_err(|e| SourceError::Document {
                path: path.to_path_buf(),
                index,
                message: format!("{kind} ({api_version}): {e}"),
            })?
        };
    }
    let ns = DEFAULT_NAMESPACE;
    match (api_version, kind) {
        ("v1", "Service") => out.push(Object::Service(Arc::new(
            convert::service(&parse!(core::Service), ns).map_err(invalid)?,
        ))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(s) = convert::endpoint_slice(&parse!(discovery::EndpointSlice), ns).map_err(invalid)? {
                out.push(Object::EndpointSlice(Arc::new(s)));
            }
        }
        ("networking.k8s.io/v1", "Ingress") => out.push(Object::Ingress(Arc::new(
            convert::ingress(&parse!(networking::Ingress), ns).map_err(invalid)?,
        ))),
        ("networking.k8s.io/v1", "IngressClass") => out.push(Object::IngressClass(Arc::new(
            convert::ingress_class(&parse!(networking::IngressClass)).map_err(invalid)?,
        ))),
        ("v1", "Secret") => {
            if let Some(s) = convert::secret(&parse!(core::Secret), ns).map_err(invalid)? {
                out.push(Object::Secret(Arc::new(s)));
            }
        }
        ("v1", "Pod") => out.push(Object::Pod(Arc::new(
            convert::pod(&parse!(core::Pod), ns).map_err(invalid)?,
        ))),
        ("v1", "Node") => out.push(Object::Node(Arc::new(
            convert::node(&parse!(core::Node)).map_err(invalid)?,
        ))),
        ("v1", "Namespace") => out.push(Object::Namespace(Arc::new(
            convert::namespace(&parse!(core::Namespace)).map_err(invalid)?,
        ))),
        // Deployments, ConfigMaps, StatefulSets... are legal in a manifest
        // directory but carry nothing a dataplane reads.
        _ => tracing::debug!(path = %path.display(), index, %kind, %api_version, "ignoring kind"),
    }
    Ok(())
}

/// Expands files and directories (recursively) into the sorted list of
/// manifest files they hold.
pub fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SourceError> {
    let mut out = BTreeSet::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| SourceError::Read {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.insert(p.clone());
        }
    }
    Ok(out.into_iter().collect())
}

fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) -> Result<(), SourceError> {
    let read_err = |source| SourceError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
        {
            out.insert(path);
        }
    }
    Ok(())
}

#[derive(Default)]
struct FileState {
    /// Hash and length of the last text read, to skip re-parsing unchanged
    /// files without keeping their text in memory.
    fingerprint: (u64, usize),
    /// The objects of every document's last good parse, flat (one
    /// allocation per file, not per document)...
    objects: Vec<Object>,
    /// ...and where document `i` ends in `objects`.
    document_ends: Vec<usize>,
}

impl FileState {
    fn document(&self, i: usize) -> &[Object] {
        let start = if i == 0 {
            0
        } else {
            self.document_ends.get(i - 1).copied().unwrap_or(0)
        };
        let end = self.document_ends.get(i).copied().unwrap_or(start);
        self.objects.get(start..end).unwrap_or(&[])
    }
}

/// The files' parsed state; `reload` re-reads them and reports errors.
pub struct FileSource {
    paths: Vec<PathBuf>,
    files: BTreeMap<PathBuf, FileState>,
    metrics: ClusterMetrics,
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>, metrics: ClusterMetrics) -> Self {
        Self {
            paths,
            files: BTreeMap::new(),
            metrics,
        }
    }

    /// Adds an in-memory manifest (the embedded demo), parsed like a file.
    pub fn add_text(&mut self, name: &str, text: &str) -> Vec<SourceError> {
        let mut errors = Vec::new();
        let state = self.files.entry(PathBuf::from(name)).or_default();
        update_file(Path::new(name), state, text.to_string(), &mut errors);
        errors
    }

    /// Re-reads every file (parsing only those whose content changed) and
    /// returns the errors found. A path that cannot be read is an error and
    /// keeps its last good objects; a file that disappeared from a watched
    /// directory drops its objects.
    pub fn reload(&mut self) -> Vec<SourceError> {
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for root in &self.paths {
            let files = match manifest_files(std::slice::from_ref(root)) {
                Ok(f) => f,
                Err(e) => {
                    // Keep whatever this root contributed before.
                    let prefix = root.clone();
                    seen.extend(self.files.keys().filter(|k| k.starts_with(&prefix)).cloned());
                    errors.push(e);
                    continue;
                }
            };
            for path in files {
                seen.insert(path.clone());
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let state = self.files.entry(path.clone()).or_default();
                        update_file(&path, state, text, &mut errors);
                    }
                    Err(source) => errors.push(SourceError::Read { path, source }),
                }
            }
        }
        self.files
            .retain(|p, _| seen.contains(p) || !self.paths.iter().any(|root| p.starts_with(root)));
        for e in &errors {
            tracing::warn!(error = %e, "file source");
            self.metrics.source_error("files");
        }
        errors
    }

    /// All objects of all files, plus a Namespace for `default` and for every
    /// namespace an object lives in (kubectl would have needed them to exist).
    pub fn objects(&self) -> Vec<Object> {
        let mut out: Vec<Object> = self.files.values().flat_map(|s| s.objects.iter().cloned()).collect();
        out.extend(self.synthesized_namespaces());
        out
    }

    /// A Namespace for `default` and every namespace used but not declared.
    fn synthesized_namespaces(&self) -> Vec<Object> {
        let mut used = BTreeSet::from([DEFAULT_NAMESPACE]);
        let mut explicit = BTreeSet::new();
        for o in self.files.values().flat_map(|s| s.objects.iter()) {
            match o {
                Object::Namespace(n) => {
                    explicit.insert(n.name.as_str());
                }
                other if !other.namespace().is_empty() => {
                    used.insert(other.namespace());
                }
                _ => {}
            }
        }
        used.difference(&explicit)
            .map(|name| Object::Namespace(Arc::new(Namespace { name: name.to_string() })))
            .collect()
    }

    /// The changes from the per-file objects `before` (taken before a
    /// `reload`) to now: `Apply` for new or changed objects of changed
    /// files, `Delete` for their objects that no file defines any more, and
    /// a `Relist` of Namespaces (declared and synthesized). One edited file
    /// among many costs its own objects, not a relist of everything.
    pub fn changes_since(&self, before: &BTreeMap<PathBuf, Vec<Object>>) -> Vec<Change> {
        let empty = Vec::new();
        let mut out = Vec::new();
        let mut removed: Vec<(Kind, ObjectKey)> = Vec::new();
        let paths: BTreeSet<&PathBuf> = before.keys().chain(self.files.keys()).collect();
        for path in paths {
            let old = before.get(path).unwrap_or(&empty);
            let new = self.files.get(path).map(|s| &s.objects).unwrap_or(&empty);
            if old.len() == new.len() && old.iter().zip(new).all(|(a, b)| same(a, b)) {
                continue;
            }
            let old_by_key: BTreeMap<(Kind, ObjectKey), &Object> =
                old.iter().map(|o| ((o.kind(), o.key()), o)).collect();
            let mut new_keys = BTreeSet::new();
            for o in new {
                let k = (o.kind(), o.key());
                if o.kind() != Kind::Namespace && !old_by_key.get(&k).is_some_and(|prev| same(prev, o)) {
                    out.push(Change::Apply(o.clone()));
                }
                new_keys.insert(k);
            }
            removed.extend(
                old_by_key
                    .into_keys()
                    .filter(|k| k.0 != Kind::Namespace && !new_keys.contains(k)),
            );
        }
        if !removed.is_empty() {
            // A key another file still defines stays (that file's object).
            let mut defined: BTreeMap<(Kind, ObjectKey), &Object> = BTreeMap::new();
            for o in self.files.values().flat_map(|s| s.objects.iter()) {
                defined.insert((o.kind(), o.key()), o);
            }
            for k in removed {
                match defined.get(&k) {
                    Some(o) => out.push(Change::Apply((*o).clone())),
                    None => out.push(Change::Delete(k.0, k.1)),
                }
            }
        }
        let mut namespaces: Vec<Object> = self
            .files
            .values()
            .flat_map(|s| s.objects.iter())
            .filter(|o| o.kind() == Kind::Namespace)
            .cloned()
            .collect();
        namespaces.extend(self.synthesized_namespaces());
        out.push(Change::Relist {
            kind: Kind::Namespace,
            objects: namespaces,
            keep: Vec::new(),
        });
        out
    }

    /// Each file's objects (cheap: the objects are shared).
    pub fn per_file(&self) -> BTreeMap<PathBuf, Vec<Object>> {
        self.files.iter().map(|(p, s)| (p.clone(), s.objects.clone())).collect()
    }

    /// One `Relist` per kind with the current objects.
    pub fn changes(&self) -> Vec<Change> {
        let objects = self.objects();
        Kind::ALL
            .iter()
            .map(|&kind| Change::Relist {
                kind,
                objects: objects.iter().filter(|o| o.kind() == kind).cloned().collect(),
                // Broken documents already contribute their last good objects.
                keep: Vec::new(),
            })
            .collect()
    }

    /// Loads once, sends the initial state, then watches the paths and sends
    /// a fresh state after every change until cancelled.
    pub async fn run(mut self, tx: ChangeTx, cancel: CancellationToken) -> Result<(), SourceError> {
        self.reload();
        for c in self.changes() {
            let _ = tx.send(c);
        }
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if !ev.kind.is_access() {
                    let _ = events_tx.send(());
                }
            }
        })
        .map_err(|source| SourceError::Watch {
            path: PathBuf::new(),
            source,
        })?;
        for p in &self.paths {
            // Watch a file's directory rather than the file: editors and
            // `kubectl`-style tools replace files by rename.
            let (target, mode) = if p.is_dir() {
                (p.clone(), notify::RecursiveMode::Recursive)
            } else {
                let parent = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                (parent, notify::RecursiveMode::NonRecursive)
            };
            watcher.watch(&target, mode).map_err(|source| SourceError::Watch {
                path: target.clone(),
                source,
            })?;
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                ev = events.recv() => {
                    if ev.is_none() { return Ok(()); }
                    // Let a burst of writes settle before re-reading.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while events.try_recv().is_ok() {}
                    let before = self.per_file();
                    self.reload();
                    for c in self.changes_since(&before) {
                        if tx.send(c).is_err() { return Ok(()); }
                    }
                }
            }
        }
    }
}

fn update_file(path: &Path, state: &mut FileState, text: String, errors: &mut Vec<SourceError>) {
    let fingerprint = fingerprint(&text);
    if state.fingerprint == fingerprint && !state.document_ends.is_empty() {
        // Unchanged: re-report nothing, keep the parsed objects.
        return;
    }
    let docs = parse_documents(path, &text);
    let mut objects = Vec::new();
    let mut document_ends = Vec::with_capacity(docs.len());
    for (i, doc) in docs.into_iter().enumerate() {
        match doc {
            Ok(objs) => objects.extend(objs),
            Err(e) => {
                errors.push(e);
                objects.extend(state.document(i).iter().cloned());
            }
        }
        document_ends.push(objects.len());
    }
    objects.shrink_to_fit();
    state.fingerprint = fingerprint;
    state.objects = objects;
    state.document_ends = document_ends;
}

fn fingerprint(text: &str) -> (u64, usize) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    (h.finish(), text.len())
}

/// Loads paths once: the objects and the errors (for `render` and `--oneshot`).
pub fn load(paths: &[PathBuf]) -> (Vec<Object>, Vec<SourceError>) {
    let mut src = FileSource::new(paths.to_vec(), ClusterMetrics::default());
    let errors = src.reload();
    (src.objects(), errors)
}

/// The same object (shared), not merely an equal one.
fn same(a: &Object, b: &Object) -> bool {
    match (a, b) {
        (Object::Service(x), Object::Service(y)) => Arc::ptr_eq(x, y),
        (Object::EndpointSlice(x), Object::EndpointSlice(y)) => Arc::ptr_eq(x, y),
        (Object::Ingress(x), Object::Ingress(y)) => Arc::ptr_eq(x, y),
        (Object::IngressClass(x), Object::IngressClass(y)) => Arc::ptr_eq(x, y),
        (Object::Secret(x), Object::Secret(y)) => Arc::ptr_eq(x, y),
        (Object::Pod(x), Object::Pod(y)) => Arc::ptr_eq(x, y),
        (Object::Node(x), Object::Node(y)) => Arc::ptr_eq(x, y),
        (Object::Namespace(x), Object::Namespace(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}
