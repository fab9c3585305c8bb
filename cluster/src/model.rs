//! Lean, typed projections of the Kubernetes objects ferry reads.
//!
//! Why projections and not the k8s-openapi types themselves: the k8s-openapi
//! types are used to *parse* (from the apiserver and from YAML), so field
//! names and shapes follow the API exactly. But they keep every field as an
//! optional string, and a full `Pod` or `EndpointSlice` costs several times
//! the memory of what the dataplanes need. Converting once at the source
//! (see `convert.rs`) gives consumers validated data (`IpAddr`, `u16` ports,
//! enums for types and policies), makes a bad field an error naming the
//! object and field at the edge instead of in three consumers, and keeps a
//! 10k-service cluster small.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// `namespace/name`; cluster-scoped objects have an empty namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn cluster(name: impl Into<String>) -> Self {
        Self::new(String::new(), name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The kinds a Snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Ingress,
    IngressClass,
    Secret,
    Pod,
    Node,
    Namespace,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Ingress,
        Kind::IngressClass,
        Kind::Secret,
        Kind::Pod,
        Kind::Node,
        Kind::Namespace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Secret => "Secret",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty when the port is unnamed (allowed only for single-port services).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAffinity {
    None,
    ClientIp { timeout_seconds: u32 },
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ObjectKey,
    pub type_: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless and ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub session_affinity: SessionAffinity,
    /// `externalTrafficPolicy: Local`.
    pub external_traffic_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_traffic_local: bool,
    pub health_check_node_port: Option<u16>,
    pub external_name: Option<String>,
    pub publish_not_ready_addresses: bool,
    /// Label `service.kubernetes.io/service-proxy-name`: when set, another
    /// proxy owns the service and kube-proxy (and ferry) leave it alone.
    pub service_proxy_name: Option<String>,
}

impl Service {
    pub fn port_named(&self, name: &str) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches the Service port's name (empty for an unnamed port).
    pub name: String,
    pub protocol: Protocol,
    /// Already the resolved target port: this is what gets dialled.
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// EndpointSlice conditions with the API's nil rules applied:
/// `ready` nil → true, `serving` nil → `ready`, `terminating` nil → false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub conditions: Conditions,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `targetRef.name` when it refers to a Pod.
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjectKey,
    /// Label `kubernetes.io/service-name`.
    pub service: String,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendPort {
    Number(u16),
    Name(String),
}

impl fmt::Display for BackendPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendPort::Number(n) => write!(f, "{n}"),
            BackendPort::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressBackend {
    Service {
        name: String,
        port: BackendPort,
    },
    /// `resource` backends (a typed object reference); ferry cannot route
    /// to them and treats them as unavailable.
    Resource {
        api_group: Option<String>,
        kind: String,
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathType {
    Exact,
    Prefix,
    ImplementationSpecific,
}

impl PathType {
    pub fn as_str(self) -> &'static str {
        match self {
            PathType::Exact => "Exact",
            PathType::Prefix => "Prefix",
            PathType::ImplementationSpecific => "ImplementationSpecific",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressPath {
    /// As written; validation (must start with `/`) is the route compiler's job
    /// so the error can name the exact rule.
    pub path: Option<String>,
    pub path_type: PathType,
    pub backend: IngressBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressRule {
    pub host: Option<String>,
    pub paths: Vec<IngressPath>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTls {
    pub hosts: Vec<String>,
    pub secret_name: Option<String>,
}

/// Legacy class annotation, still honoured by ingress controllers.
pub const INGRESS_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// IngressClass annotation marking the cluster's default class.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    pub key: ObjectKey,
    /// `spec.ingressClassName`, else the legacy annotation.
    pub class_name: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` as Unix seconds (0 when unknown); the
    /// oldest Ingress wins a routing conflict.
    pub created_unix: i64,
    pub default_backend: Option<IngressBackend>,
    pub rules: Vec<IngressRule>,
    pub tls: Vec<IngressTls>,
    /// Current `status.loadBalancer.ingress` (IP or hostname), so the status
    /// writer only writes when something changes.
    pub status_addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressClass {
    pub name: String,
    pub controller: String,
    pub is_default: bool,
}

/// A Secret ferry may use: type `kubernetes.io/tls` (Ingress certificates;
/// `tls.crt` and `tls.key` required) or `Opaque` (htpasswd files, CA
/// bundles and client certificates named by Ingress annotations). Other
/// types are never loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub key: ObjectKey,
    /// `type`, with an empty or missing type read as `Opaque`.
    pub type_: String,
    /// `data` (decoded) merged with `stringData`.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl Secret {
    /// The value of one data key.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.data.get(name).map(Vec::as_slice)
    }

    /// `tls.crt`, empty when missing.
    pub fn cert_pem(&self) -> &[u8] {
        self.get("tls.crt").unwrap_or_default()
    }

    /// `tls.key`, empty when missing.
    pub fn key_pem(&self) -> &[u8] {
        self.get("tls.key").unwrap_or_default()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material or passwords: only the key names.
        f.debug_struct("Secret")
            .field("key", &self.key)
            .field("type", &self.type_)
            .field("data_keys", &self.data.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What DNS needs of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjectKey,
    pub ips: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
    pub ready: bool,
    pub node_name: Option<String>,
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    pub type_: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<NodeAddress>,
    /// Label `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`): the pod addresses of this node,
    /// as the node IPAM or the administrator assigned them (unparsed).
    pub pod_cidrs: Vec<String>,
}

impl Node {
    /// The node's IP addresses (InternalIP first, then ExternalIP).
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for wanted in ["InternalIP", "ExternalIP"] {
            for a in self.addresses.iter().filter(|a| a.type_ == wanted) {
                if let Ok(ip) = a.address.parse() {
                    out.push(ip);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
}

/// One object of any kind, as sources deliver them. Shared (`Arc`), so the
/// file source's last-good copy, the store and every snapshot hold one
/// allocation per object, not one each.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Ingress(Arc<Ingress>),
    IngressClass(Arc<IngressClass>),
    Secret(Arc<Secret>),
    Pod(Arc<Pod>),
    Node(Arc<Node>),
    Namespace(Arc<Namespace>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Secret(_) => Kind::Secret,
            Object::Pod(_) => Kind::Pod,
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service(o) => o.key.clone(),
            Object::EndpointSlice(o) => o.key.clone(),
            Object::Ingress(o) => o.key.clone(),
            Object::IngressClass(o) => ObjectKey::cluster(&o.name),
            Object::Secret(o) => o.key.clone(),
            Object::Pod(o) => o.key.clone(),
            Object::Node(o) => ObjectKey::cluster(&o.name),
            Object::Namespace(o) => ObjectKey::cluster(&o.name),
        }
    }

    /// The namespace the object lives in (empty for cluster-scoped kinds).
    pub fn namespace(&self) -> &str {
        match self {
            Object::Service(o) => &o.key.namespace,
            Object::EndpointSlice(o) => &o.key.namespace,
            Object::Ingress(o) => &o.key.namespace,
            Object::Secret(o) => &o.key.namespace,
            Object::Pod(o) => &o.key.namespace,
            Object::IngressClass(_) | Object::Node(_) | Object::Namespace(_) => "",
        }
    }
}
