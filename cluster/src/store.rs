//! `Store`: the mutable side of the cluster view. Sources feed it `Change`s
//! (the same event shape for the kube and the file source); it builds
//! immutable `Snapshot`s on demand.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::model::*;
use crate::snapshot::Snapshot;

/// One event from a source, shaped like kube-runtime's watcher events after
/// the `Init..InitDone` buffer is folded into one `Relist`.
#[derive(Debug, Clone)]
pub enum Change {
    /// The complete current set of one kind; replaces what the store holds
    /// of that kind, except the `keep` keys: objects the source listed but
    /// could not convert, whose last good version stays. Also marks the kind
    /// as listed.
    Relist {
        kind: Kind,
        objects: Vec<Object>,
        keep: Vec<ObjectKey>,
    },
    Apply(Object),
    Delete(Kind, ObjectKey),
}

/// One kind's objects, copy-on-write: a snapshot shares the map with the
/// store until the next change to that kind, so an idle kind costs nothing
/// per snapshot and keys are not duplicated between store and snapshot.
pub(crate) type Shared<K, V> = Arc<BTreeMap<K, V>>;

#[derive(Debug, Default)]
pub struct Store {
    services: Shared<ObjectKey, Arc<Service>>,
    slices: Shared<ObjectKey, Arc<EndpointSlice>>,
    ingresses: Shared<ObjectKey, Arc<Ingress>>,
    ingress_classes: Shared<String, Arc<IngressClass>>,
    secrets: Shared<ObjectKey, Arc<Secret>>,
    pods: Shared<ObjectKey, Arc<Pod>>,
    nodes: Shared<String, Arc<Node>>,
    namespaces: Shared<String, Arc<Namespace>>,
    listed: BTreeSet<Kind>,
}

impl Store {
    /// True once every kind has had its initial list: before that, a
    /// snapshot would show a half-listed cluster.
    pub fn fully_listed(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    pub fn listed(&self, kind: Kind) -> bool {
        self.listed.contains(&kind)
    }

    /// Applies one change; returns whether anything changed.
    pub fn change(&mut self, change: Change) -> bool {
        match change {
            Change::Relist { kind, objects, keep } => {
                let before = self.listed.insert(kind);
                let changed = self.relist(kind, objects, &keep);
                before || changed
            }
            Change::Apply(o) => self.apply(o),
            Change::Delete(kind, key) => self.delete(kind, &key),
        }
    }

    /// Inserts or replaces one object; returns whether it differed.
    pub fn apply(&mut self, o: Object) -> bool {
        fn put<K: Ord + Clone, V: PartialEq>(m: &mut Shared<K, Arc<V>>, k: K, v: Arc<V>) -> bool {
            if m.get(&k).is_some_and(|old| Arc::ptr_eq(old, &v) || **old == *v) {
                return false;
            }
            Arc::make_mut(m).insert(k, v);
            true
        }
        match o {
            Object::Service(v) => put(&mut self.services, v.key.clone(), v),
            Object::EndpointSlice(v) => put(&mut self.slices, v.key.clone(), v),
            Object::Ingress(v) => put(&mut self.ingresses, v.key.clone(), v),
            Object::IngressClass(v) => put(&mut self.ingress_classes, v.name.clone(), v),
            Object::Secret(v) => put(&mut self.secrets, v.key.clone(), v),
            Object::Pod(v) => put(&mut self.pods, v.key.clone(), v),
            Object::Node(v) => put(&mut self.nodes, v.name.clone(), v),
            Object::Namespace(v) => put(&mut self.namespaces, v.name.clone(), v),
        }
    }

    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        fn remove<K: Ord + Clone + std::borrow::Borrow<Q>, Q: Ord + ?Sized, V: Clone>(
            m: &mut Shared<K, V>,
            key: &Q,
        ) -> bool {
            m.contains_key(key) && Arc::make_mut(m).remove(key).is_some()
        }
        match kind {
            Kind::Service => remove(&mut self.services, key),
            Kind::EndpointSlice => remove(&mut self.slices, key),
            Kind::Ingress => remove(&mut self.ingresses, key),
            Kind::IngressClass => remove(&mut self.ingress_classes, key.name.as_str()),
            Kind::Secret => remove(&mut self.secrets, key),
            Kind::Pod => remove(&mut self.pods, key),
            Kind::Node => remove(&mut self.nodes, key.name.as_str()),
            Kind::Namespace => remove(&mut self.namespaces, key.name.as_str()),
        }
    }

    fn relist(&mut self, kind: Kind, objects: Vec<Object>, keep: &[ObjectKey]) -> bool {
        let mut wanted: BTreeSet<ObjectKey> = objects.iter().filter(|o| o.kind() == kind).map(Object::key).collect();
        wanted.extend(keep.iter().cloned());
        let existing: Vec<ObjectKey> = self.keys(kind);
        let mut changed = false;
        for key in existing {
            if !wanted.contains(&key) {
                changed |= self.delete(kind, &key);
            }
        }
        for o in objects.into_iter().filter(|o| o.kind() == kind) {
            changed |= self.apply(o);
        }
        changed
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Ingress => self.ingresses.keys().cloned().collect(),
            Kind::IngressClass => self.ingress_classes.keys().map(ObjectKey::cluster).collect(),
            Kind::Secret => self.secrets.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Node => self.nodes.keys().map(ObjectKey::cluster).collect(),
            Kind::Namespace => self.namespaces.keys().map(ObjectKey::cluster).collect(),
        }
    }

    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::Ingress => self.ingresses.len(),
            Kind::IngressClass => self.ingress_classes.len(),
            Kind::Secret => self.secrets.len(),
            Kind::Pod => self.pods.len(),
            Kind::Node => self.nodes.len(),
            Kind::Namespace => self.namespaces.len(),
        }
    }

    /// Builds an immutable snapshot. Objects are shared with the store
    /// (`Arc`), so this costs map copies, not object copies.
    pub fn snapshot(&self, generation: u64) -> Snapshot {
        let mut slices_by_service: HashMap<ObjectKey, Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.slices.values() {
            slices_by_service
                .entry(ObjectKey::new(slice.key.namespace.clone(), slice.service.clone()))
                .or_default()
                .push(slice.clone());
        }
        Snapshot {
            generation,
            services: self.services.clone(),
            slices_by_service,
            slice_count: self.slices.len(),
            ingresses: self.ingresses.clone(),
            ingress_classes: self.ingress_classes.clone(),
            secrets: self.secrets.clone(),
            pods: self.pods.clone(),
            nodes: self.nodes.clone(),
            namespaces: self.namespaces.clone(),
        }
    }
}
