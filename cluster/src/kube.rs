//! The kube source: one kube-runtime watcher per kind, folded into
//! `Change`s. `Init..InitDone` is buffered into one `Relist`, so the store
//! swaps a kind whole after every (re)list, and the publisher holds the first
//! snapshot until every kind has listed. Watch errors are retried with
//! kube-runtime's default backoff; meanwhile the last snapshot keeps serving.

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::convert;
use crate::error::{InvalidObject, SourceError};
use crate::metrics::ClusterMetrics;
use crate::model::{Kind, Object, ObjectKey};
use crate::publish::ChangeTx;
use crate::store::Change;

/// Builds a client from `--kubeconfig`, else the usual inference
/// (`$KUBECONFIG`, `~/.kube/config`, then in-cluster service account).
///
/// `apiserver` replaces the URL the configuration names (its credentials and
/// CA stay). In a pod the in-cluster URL is the `kubernetes` Service's
/// ClusterIP, which only a running Service proxy makes reachable: a node's
/// Service proxy must dial the apiserver's real address instead, as
/// kube-proxy does with its kubeconfig and Cilium with `k8sServiceHost`.
pub async fn client(kubeconfig: Option<&Path>, apiserver: Option<&str>) -> Result<Client, SourceError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| SourceError::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| SourceError::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| SourceError::KubeConfig(e.to_string()))?,
    };
    if let Some(url) = apiserver {
        config.cluster_url = parse_apiserver(url)?;
    }
    Client::try_from(config).map_err(SourceError::Kube)
}

/// `--apiserver`: an absolute `https://HOST[:PORT]` (or `http://`) URL.
pub fn parse_apiserver(url: &str) -> Result<http::Uri, SourceError> {
    let bad = |why: &str| SourceError::KubeConfig(format!("--apiserver {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => return Err(bad("expected https://HOST[:PORT]")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// True when this process runs in a pod with the in-cluster configuration
/// (kubelet's `KUBERNETES_SERVICE_HOST`), i.e. would dial the `kubernetes`
/// Service's ClusterIP without `--apiserver`.
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// One API permission ferry's code uses. `deploy/` RBAC is tested against
/// this list, and the mock-apiserver tests check every request the code
/// really makes is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAccess {
    pub group: &'static str,
    /// Plural resource, with `/subresource` when one is used.
    pub resource: String,
    pub verbs: &'static [&'static str],
    /// Only in ferry's own namespace (a Role, not a ClusterRole).
    pub own_namespace: bool,
}

fn access<K: k8s_openapi::Resource>(sub: &str, verbs: &'static [&'static str], own_namespace: bool) -> ApiAccess {
    let resource = if sub.is_empty() {
        K::URL_PATH_SEGMENT.to_string()
    } else {
        format!("{}/{sub}", K::URL_PATH_SEGMENT)
    };
    ApiAccess {
        group: K::GROUP,
        resource,
        verbs,
        own_namespace,
    }
}

/// Everything ferry reads (the watchers of `KubeSource::run`) and writes
/// (Ingress status, Events for configuration problems, the
/// leader-election Lease).
pub fn api_access() -> Vec<ApiAccess> {
    const WATCH: &[&str] = &["list", "watch"];
    vec![
        access::<core::Service>("", WATCH, false),
        access::<discovery::EndpointSlice>("", WATCH, false),
        access::<networking::Ingress>("", WATCH, false),
        access::<networking::IngressClass>("", WATCH, false),
        access::<core::Secret>("", WATCH, false),
        access::<core::Pod>("", WATCH, false),
        access::<core::Node>("", WATCH, false),
        access::<core::Namespace>("", WATCH, false),
        access::<networking::Ingress>("status", &["get", "patch", "update"], false),
        // Events are only created, one per problem (never patched into series).
        access::<k8s_openapi::api::events::v1::Event>("", &["create"], false),
        access::<k8s_openapi::api::coordination::v1::Lease>("", &["get", "create", "update"], true),
    ]
}

pub struct KubeSource {
    client: Client,
    metrics: ClusterMetrics,
}

impl KubeSource {
    pub fn new(client: Client, metrics: ClusterMetrics) -> Self {
        Self { client, metrics }
    }

    /// Runs every watcher until cancelled.
    pub async fn run(self, tx: ChangeTx, cancel: CancellationToken) {
        let c = &self.client;
        let m = &self.metrics;
        let all = watcher::Config::default();
        let no_ns = "";
        tokio::join!(
            watch(
                Api::<core::Service>::all(c.clone()),
                all.clone(),
                Kind::Service,
                m,
                &tx,
                &cancel,
                |o| { convert::service(o, no_ns).map(|s| Some(Object::Service(Arc::new(s)))) }
            ),
            watch(
                Api::<discovery::EndpointSlice>::all(c.clone()),
                all.clone(),
                Kind::EndpointSlice,
                m,
                &tx,
                &cancel,
                |o| convert::endpoint_slice(o, no_ns).map(|s| s.map(|s| Object::EndpointSlice(Arc::new(s)))),
            ),
            watch(
                Api::<networking::Ingress>::all(c.clone()),
                all.clone(),
                Kind::Ingress,
                m,
                &tx,
                &cancel,
                |o| { convert::ingress(o, no_ns).map(|s| Some(Object::Ingress(Arc::new(s)))) }
            ),
            watch(
                Api::<networking::IngressClass>::all(c.clone()),
                all.clone(),
                Kind::IngressClass,
                m,
                &tx,
                &cancel,
                |o| convert::ingress_class(o).map(|s| Some(Object::IngressClass(Arc::new(s)))),
            ),
            watch(
                Api::<core::Secret>::all(c.clone()),
                all.clone().fields(convert::SECRET_FIELD_SELECTOR),
                Kind::Secret,
                m,
                &tx,
                &cancel,
                |o| convert::secret(o, no_ns).map(|s| s.map(|s| Object::Secret(Arc::new(s)))),
            ),
            watch(
                Api::<core::Pod>::all(c.clone()),
                // Finished pods have no DNS records; in clusters with many
                // Jobs they are most of the pods.
                all.clone().fields("status.phase!=Succeeded,status.phase!=Failed"),
                Kind::Pod,
                m,
                &tx,
                &cancel,
                |o| { convert::pod(o, no_ns).map(|s| Some(Object::Pod(Arc::new(s)))) }
            ),
            watch(
                Api::<core::Node>::all(c.clone()),
                all.clone(),
                Kind::Node,
                m,
                &tx,
                &cancel,
                |o| { convert::node(o).map(|s| Some(Object::Node(Arc::new(s)))) }
            ),
            watch(
                Api::<core::Namespace>::all(c.clone()),
                all.clone(),
                Kind::Namespace,
                m,
                &tx,
                &cancel,
                |o| { convert::namespace(o).map(|s| Some(Object::Namespace(Arc::new(s)))) }
            ),
        );
    }
}

fn key_of<K: Resource>(o: &K) -> ObjectKey {
    ObjectKey::new(o.namespace().unwrap_or_default(), o.name_any())
}

async fn watch<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    metrics: &ClusterMetrics,
    tx: &ChangeTx,
    cancel: &CancellationToken,
    convert: F,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(&K) -> Result<Option<Object>, InvalidObject>,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut buffer: Vec<Object> = Vec::new();
    // Listed objects that failed conversion: a re-list keeps their last good version.
    let mut broken: Vec<ObjectKey> = Vec::new();
    let cluster_scoped = matches!(kind, Kind::IngressClass | Kind::Node | Kind::Namespace);
    let key = |o: &K| {
        let mut key = key_of(o);
        if cluster_scoped {
            key.namespace.clear();
        }
        key
    };
    let to_object = |o: &K| {
        convert(o).map_err(|e| {
            tracing::warn!(error = %e, "skipping object; its last good version (if any) keeps serving");
            metrics.source_error("kube");
        })
    };
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = stream.next() => ev,
        };
        let Some(ev) = ev else { return };
        let change = match ev {
            Err(e) => {
                tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
                metrics.source_error("kube");
                continue;
            }
            Ok(Event::Init) => {
                buffer.clear();
                broken.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                match to_object(&o) {
                    Ok(obj) => buffer.extend(obj),
                    Err(()) => broken.push(key(&o)),
                }
                continue;
            }
            Ok(Event::InitDone) => Change::Relist {
                kind,
                objects: std::mem::take(&mut buffer),
                keep: std::mem::take(&mut broken),
            },
            // An update that fails conversion keeps the previous version in
            // the store: the last good state keeps serving.
            Ok(Event::Apply(o)) => match to_object(&o) {
                Ok(Some(obj)) => Change::Apply(obj),
                Ok(None) => Change::Delete(kind, key(&o)),
                Err(()) => continue,
            },
            Ok(Event::Delete(o)) => Change::Delete(kind, key(&o)),
        };
        if tx.send(change).is_err() {
            return;
        }
    }
}
