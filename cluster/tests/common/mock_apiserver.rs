//! A mock Kubernetes apiserver for tests: plain HTTP on 127.0.0.1 speaking
//! list + watch JSON for any collection, plus GET/PUT/PATCH/POST of single
//! objects (for Leases and Ingress status). Test hooks make a watch close,
//! answer `410 Gone` (forcing a re-list), or slow a list down.
//!
//! This is the only mocked component in ferry's tests (see DESIGN.md).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::Notify;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Collection {
    /// name key (`ns/name` or `name`) → object
    items: BTreeMap<String, Value>,
    /// (resourceVersion, type, object)
    log: Vec<(u64, String, Value)>,
    list_delay: Duration,
    gone_next_watch: bool,
    epoch: u64,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: HashMap<String, Collection>,
    /// "METHOD path" of every request, for assertions.
    requests: Vec<String>,
    /// Bodies of PATCH/PUT/POST requests: (method, path, body).
    writes: Vec<(String, String, Value)>,
}

#[derive(Clone)]
pub struct MockApiserver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

/// Collection paths for ferry's watched kinds.
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINTSLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const INGRESSES: &str = "/apis/networking.k8s.io/v1/ingresses";
pub const INGRESSCLASSES: &str = "/apis/networking.k8s.io/v1/ingressclasses";
pub const SECRETS: &str = "/api/v1/secrets";
pub const PODS: &str = "/api/v1/pods";
pub const NODES: &str = "/api/v1/nodes";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";

fn item_key(obj: &Value) -> String {
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

/// Maps a request path to (collection path, optional object key, subresource).
/// `/api/v1/namespaces/ns/services/x/status` → (`/api/v1/services`, `ns/x`, `status`).
fn route(path: &str) -> (String, Option<String>, Option<String>) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix_len = if parts.first() == Some(&"api") { 2 } else { 3 };
    if parts.len() < prefix_len {
        return (path.to_string(), None, None);
    }
    let prefix = format!("/{}", parts[..prefix_len].join("/"));
    let rest = &parts[prefix_len..];
    match rest {
        ["namespaces", ns, res, name, sub @ ..] => (
            format!("{prefix}/{res}"),
            Some(format!("{ns}/{name}")),
            sub.first().map(|s| s.to_string()),
        ),
        ["namespaces", ns, res] => (format!("{prefix}/{res}"), Some(format!("{ns}/")), None),
        [res, name, sub @ ..] => (
            format!("{prefix}/{res}"),
            Some(name.to_string()),
            sub.first().map(|s| s.to_string()),
        ),
        [res] => (format!("{prefix}/{res}"), None, None),
        _ => (path.to_string(), None, None),
    }
}

fn body_key(body: &Value, scope: Option<&str>) -> Value {
    let mut b = body.clone();
    if let Some(ns) = scope.and_then(|k| k.strip_suffix('/')) {
        b["metadata"]["namespace"] = json!(ns);
    }
    b
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, "application/json".parse().unwrap());
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "message": message, "code": code})
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Merge patch (RFC 7386), enough for status patches.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl MockApiserver {
    pub async fn start() -> MockApiserver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mock = MockApiserver {
            addr,
            state: Arc::new(Mutex::new(State::default())),
            changed: Arc::new(Notify::new()),
        };
        let m = mock.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let m = m.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let m = m.clone();
                        async move { Ok::<_, Infallible>(m.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        mock
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Registers an empty collection so lists of it succeed.
    pub fn ensure(&self, collection: &str) {
        self.state
            .lock()
            .unwrap()
            .collections
            .entry(collection.to_string())
            .or_default();
    }

    /// Adds or replaces an object, emitting ADDED or MODIFIED to watchers.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = item_key(&obj);
        let c = st.collections.entry(collection.to_string()).or_default();
        let kind = if c.items.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.items.insert(key, obj.clone());
        c.log.push((rv, kind.to_string(), obj));
        drop(st);
        self.changed.notify_waiters();
    }

    /// Deletes an object, emitting DELETED.
    pub fn delete(&self, collection: &str, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.entry(collection.to_string()).or_default();
        if let Some(mut obj) = c.items.remove(key) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            c.log.push((rv, "DELETED".into(), obj));
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Deletes without telling watchers, as if the event was compacted away:
    /// only a re-list can reveal it.
    pub fn delete_silently(&self, collection: &str, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        if let Some(c) = st.collections.get_mut(collection) {
            c.items.remove(key);
        }
    }

    /// Ends every open watch of the collection.
    pub fn close_watches(&self, collection: &str) {
        let mut st = self.state.lock().unwrap();
        st.collections.entry(collection.to_string()).or_default().epoch += 1;
        drop(st);
        self.changed.notify_waiters();
    }

    /// Ends open watches and answers the next watch with 410 Gone.
    pub fn expire(&self, collection: &str) {
        let mut st = self.state.lock().unwrap();
        let c = st.collections.entry(collection.to_string()).or_default();
        c.gone_next_watch = true;
        c.epoch += 1;
        drop(st);
        self.changed.notify_waiters();
    }

    pub fn set_list_delay(&self, collection: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .collections
            .entry(collection.to_string())
            .or_default()
            .list_delay = delay;
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn writes(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn get(&self, collection: &str, key: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .collections
            .get(collection)?
            .items
            .get(key)
            .cloned()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let method = req.method().clone();
        self.state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}?{query}"));
        let (collection, key, sub) = route(&path);
        let body: Value = match req.into_body().collect().await {
            Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        match method {
            Method::GET => {
                if query_param(&query, "watch").is_some_and(|v| v == "true" || v == "1") {
                    return self.watch(&collection, &query);
                }
                match key {
                    Some(k) if !k.ends_with('/') => match self.get(&collection, &k) {
                        Some(obj) => json_response(StatusCode::OK, &obj),
                        None => json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found")),
                    },
                    ns_scope => self.list(&collection, ns_scope.as_deref()).await,
                }
            }
            Method::POST => {
                let mut obj = body.clone();
                if let Some(ns) = key.as_deref().and_then(|k| k.strip_suffix('/')) {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                self.record_write("POST", &path, &body);
                if self.get(&collection, &item_key(&obj)).is_some() {
                    return json_response(StatusCode::CONFLICT, &status(409, "AlreadyExists", "exists"));
                }
                self.put(&collection, obj);
                let stored = self
                    .get(&collection, &item_key(&body_key(&body, key.as_deref())))
                    .unwrap_or(Value::Null);
                json_response(StatusCode::CREATED, &stored)
            }
            Method::PUT | Method::PATCH => {
                let Some(k) = key.filter(|k| !k.ends_with('/')) else {
                    return json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "no name"));
                };
                self.record_write(method.as_str(), &path, &body);
                let Some(mut current) = self.get(&collection, &k) else {
                    return json_response(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
                };
                if method == Method::PUT {
                    let want = body["metadata"]["resourceVersion"].as_str();
                    if want.is_some() && want != current["metadata"]["resourceVersion"].as_str() {
                        return json_response(
                            StatusCode::CONFLICT,
                            &status(409, "Conflict", "resourceVersion changed"),
                        );
                    }
                    if sub.as_deref() == Some("status") {
                        current["status"] = body["status"].clone();
                    } else {
                        current = body;
                    }
                } else {
                    merge(&mut current, &body);
                }
                self.put(&collection, current);
                json_response(StatusCode::OK, &self.get(&collection, &k).unwrap_or(Value::Null))
            }
            _ => json_response(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", "")),
        }
    }

    fn record_write(&self, method: &str, path: &str, body: &Value) {
        self.state
            .lock()
            .unwrap()
            .writes
            .push((method.to_string(), path.to_string(), body.clone()));
    }

    async fn list(&self, collection: &str, ns_prefix: Option<&str>) -> Response<Body> {
        let delay = self
            .state
            .lock()
            .unwrap()
            .collections
            .get(collection)
            .map(|c| c.list_delay)
            .unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let st = self.state.lock().unwrap();
        let items: Vec<Value> = st
            .collections
            .get(collection)
            .map(|c| {
                c.items
                    .iter()
                    .filter(|(k, _)| ns_prefix.is_none_or(|p| k.starts_with(p)))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        json_response(
            StatusCode::OK,
            &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        )
    }

    fn watch(&self, collection: &str, query: &str) -> Response<Body> {
        let mut cursor: u64 = query_param(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let (gone, epoch) = {
            let mut st = self.state.lock().unwrap();
            let c = st.collections.entry(collection.to_string()).or_default();
            let gone = std::mem::take(&mut c.gone_next_watch);
            (gone, c.epoch)
        };
        if gone {
            let ev = json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
            let _ = tx.try_send(Bytes::from(format!("{ev}\n")));
            drop(tx);
        } else {
            let m = self.clone();
            let collection = collection.to_string();
            tokio::spawn(async move {
                loop {
                    let notified = m.changed.notified();
                    let (events, closed) = {
                        let st = m.state.lock().unwrap();
                        let c = st.collections.get(&collection);
                        let events: Vec<(u64, String, Value)> = c
                            .map(|c| c.log.iter().filter(|(rv, _, _)| *rv > cursor).cloned().collect())
                            .unwrap_or_default();
                        (events, c.is_some_and(|c| c.epoch != epoch))
                    };
                    for (rv, kind, obj) in events {
                        cursor = rv;
                        let line = format!("{}\n", json!({"type": kind, "object": obj}));
                        if tx.send(Bytes::from(line)).await.is_err() {
                            return;
                        }
                    }
                    if closed {
                        return;
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
            });
        }
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, "application/json".parse().unwrap());
        r
    }
}
