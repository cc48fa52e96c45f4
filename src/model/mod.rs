//! Slim, validated domain types: what the rest of the agent knows about the cluster.
//!
//! Kubernetes objects are trimmed into these types the moment they arrive (from a watch or a
//! manifest file), keeping only what enforcement needs (labels, node, `status.podIPs`, named
//! container ports, policy specs, node addresses and pod ranges). Validation happens here, once, so that the resolver and
//! compiler never meet a malformed selector, CIDR or port.

pub mod cidr;
pub mod cnp;
pub mod cnp_api;
pub mod labels;
pub mod node;
pub mod policy;
pub mod selector;

use std::fmt;
use std::net::IpAddr;

use compact_str::CompactString;
use k8s_openapi::api::core::v1::{Namespace, Pod};

pub use cidr::{Cidr, Family};
pub use cnp::{
    Action, ClusterPolicy, CnpError, CnpPeer, CnpPort, CnpRule, RuleMatch, Subject, Tier,
};
pub use labels::Labels;
pub use node::NodeInfo;
pub use policy::{
    IpBlock, NamespaceScope, Peer, Policy, PolicyError, PolicyWarning, PortMatch, PortSpec,
    Protocol, Rule,
};
pub use selector::Selector;

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// Build a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A container port with a name, the only kind a NetworkPolicy can refer to by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    /// `ports[].name` (an IANA service name, at most 15 characters, so always inline).
    pub name: CompactString,
    /// `ports[].protocol` (TCP when omitted).
    pub protocol: Protocol,
    /// `ports[].containerPort`.
    pub port: u16,
}

/// What enforcement needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `spec.nodeName` (unset while the pod is pending scheduling). Inline up to 24 bytes:
    /// one heap string fewer per pod.
    pub node: Option<CompactString>,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `status.podIPs` (or `status.podIP`), sorted, without duplicates.
    pub ips: Vec<IpAddr>,
    /// Named container ports, sorted.
    pub named_ports: Vec<NamedPort>,
    /// `spec.hostNetwork`: such a pod is never selected and is not a pod peer.
    pub host_network: bool,
    /// Phase Succeeded or Failed: the pod no longer owns its IP.
    pub finished: bool,
}

impl PodInfo {
    /// Does this pod take part in policy at all (as a selected pod or a pod peer)?
    pub fn is_policy_target(&self) -> bool {
        !self.host_network && !self.finished && !self.ips.is_empty()
    }

    /// The port number a named port resolves to on this pod, if it declares it.
    pub fn resolve_named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Trim a Kubernetes Pod. Oddities that do not make the pod unusable are pushed to
    /// `warnings` (each naming the pod); a pod without namespace or name is an error.
    pub fn from_k8s(pod: &Pod, warnings: &mut Vec<String>) -> Result<Self, ModelError> {
        let key = object_key("Pod", &pod.metadata)?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![ip]))
            .unwrap_or_default();
        for text in listed {
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => warnings.push(format!(
                    "Pod {key}: status.podIPs entry {text:?} is not an IP address; ignoring it"
                )),
            }
        }
        ips.sort();
        ips.dedup();

        let mut named_ports: Vec<NamedPort> = Vec::new();
        let containers = spec.into_iter().flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        });
        for c in containers {
            for p in c.ports.iter().flatten() {
                let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                    continue;
                };
                let protocol = match Protocol::parse(p.protocol.as_deref()) {
                    Some(proto) => proto,
                    None => {
                        warnings.push(format!(
                            "Pod {key}: container {:?} port {name:?} has unknown protocol {:?}; ignoring the port",
                            c.name,
                            p.protocol.as_deref().unwrap_or_default()
                        ));
                        continue;
                    }
                };
                let Some(port) = u16::try_from(p.container_port).ok().filter(|n| *n > 0) else {
                    warnings.push(format!(
                        "Pod {key}: container {:?} port {name:?} has containerPort {} outside 1-65535; ignoring the port",
                        c.name, p.container_port
                    ));
                    continue;
                };
                if named_ports
                    .iter()
                    .any(|np| np.name == name && np.protocol == protocol)
                {
                    warnings.push(format!(
                        "Pod {key}: port name {name:?} ({protocol}) is declared twice; using the first"
                    ));
                    continue;
                }
                named_ports.push(NamedPort {
                    name: name.into(),
                    protocol,
                    port,
                });
            }
        }
        named_ports.sort();

        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
        Ok(Self {
            key,
            node: spec
                .and_then(|s| s.node_name.as_deref())
                .filter(|n| !n.is_empty())
                .map(CompactString::from),
            labels: pod
                .metadata
                .labels
                .as_ref()
                .map(Labels::from)
                .unwrap_or_default(),
            ips,
            named_ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(phase, "Succeeded" | "Failed"),
        })
    }
}

/// What enforcement needs to know about a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Name.
    pub name: String,
    /// Labels, always including `kubernetes.io/metadata.name` as the API server sets it.
    pub labels: Labels,
}

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

impl NamespaceInfo {
    /// Trim a Kubernetes Namespace.
    pub fn from_k8s(ns: &Namespace) -> Result<Self, ModelError> {
        let name = ns
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(ModelError::MissingName("Namespace"))?;
        let mut labels = ns
            .metadata
            .labels
            .as_ref()
            .map(Labels::from)
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL, &name);
        Ok(Self { name, labels })
    }
}

/// An object that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// `metadata.name` missing or empty.
    #[error("{0} has no metadata.name")]
    MissingName(&'static str),
    /// `metadata.namespace` missing on an object that needs one.
    #[error("{kind} {name:?} has no metadata.namespace")]
    MissingNamespace {
        /// Kind of object.
        kind: &'static str,
        /// Its name.
        name: String,
    },
}

fn object_key(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectKey, ModelError> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(ModelError::MissingName(kind))?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ModelError::MissingNamespace {
            kind,
            name: name.clone(),
        })?;
    Ok(ObjectKey { namespace, name })
}
