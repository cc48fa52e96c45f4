//! Nodes as the agent knows them: name, labels, addresses and pod address ranges.
//!
//! Two features need Nodes: ClusterNetworkPolicy `nodes` peers select nodes by label and match
//! their addresses, and failing closed for unknown local addresses needs this node's pod
//! ranges (`spec.podCIDRs`). A Node object is large and its status changes often (conditions,
//! images, heartbeats); trimming it to these four fields on arrival means a heartbeat leaves
//! the trimmed node equal, so it never wakes the sync loop.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::model::{Cidr, Labels, ModelError};

/// The `status.addresses` types that are IP addresses of the node. `Hostname`, `InternalDNS`
/// and `ExternalDNS` are names, not addresses.
const ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// What enforcement needs to know about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `status.addresses` of type InternalIP or ExternalIP, sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), sorted, without duplicates.
    pub pod_cidrs: Vec<Cidr>,
}

impl NodeInfo {
    /// Trim a Kubernetes Node. Entries that do not parse are pushed to `warnings` (each naming
    /// the node) and left out; a node without a name is an error.
    pub fn from_k8s(node: &Node, warnings: &mut Vec<String>) -> Result<Self, ModelError> {
        let name = node
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(ModelError::MissingName("Node"))?;

        let mut addresses = Vec::new();
        let listed = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| ADDRESS_TYPES.contains(&a.type_.as_str()));
        for a in listed {
            match a.address.trim().parse::<IpAddr>() {
                Ok(ip) => addresses.push(ip),
                Err(_) => warnings.push(format!(
                    "Node {name}: status.addresses entry {:?} of type {} is not an IP address; ignoring it",
                    a.address, a.type_
                )),
            }
        }
        addresses.sort();
        addresses.dedup();

        let spec = node.spec.as_ref();
        let texts: Vec<String> = spec
            .and_then(|s| s.pod_cidrs.clone())
            .filter(|v| !v.is_empty())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        let mut pod_cidrs = Vec::new();
        for text in texts {
            match text.parse::<Cidr>() {
                Ok(c) => pod_cidrs.push(c),
                Err(e) => warnings.push(format!(
                    "Node {name}: spec.podCIDRs entry {text:?} is not usable ({e}); ignoring it"
                )),
            }
        }
        pod_cidrs.sort();
        pod_cidrs.dedup();

        Ok(Self {
            name,
            labels: node
                .metadata
                .labels
                .as_ref()
                .map(Labels::from)
                .unwrap_or_default(),
            addresses,
            pod_cidrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("node json")
    }

    /// (name, object, want addresses, want pod CIDRs, want warnings)
    type Case = (
        &'static str,
        serde_json::Value,
        Vec<&'static str>,
        Vec<&'static str>,
        usize,
    );

    #[test]
    fn trimming_cases() {
        let cases: Vec<Case> = vec![
            (
                "dual stack, both address types, hostname left out",
                serde_json::json!({
                    "metadata": {"name": "n1", "labels": {"zone": "a"}},
                    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
                    "status": {"addresses": [
                        {"type": "Hostname", "address": "n1"},
                        {"type": "InternalIP", "address": "172.18.0.3"},
                        {"type": "InternalIP", "address": "fc00:f853:ccd:e793::3"},
                        {"type": "ExternalIP", "address": "203.0.113.7"}
                    ]}
                }),
                vec!["172.18.0.3", "203.0.113.7", "fc00:f853:ccd:e793::3"],
                vec!["10.244.1.0/24", "fd00:10:244:1::/64"],
                0,
            ),
            (
                "only the legacy podCIDR",
                serde_json::json!({"metadata": {"name": "n2"}, "spec": {"podCIDR": "10.244.2.0/24"}}),
                vec![],
                vec!["10.244.2.0/24"],
                0,
            ),
            (
                "bad entries are left out with a warning each",
                serde_json::json!({
                    "metadata": {"name": "n3"},
                    "spec": {"podCIDRs": ["10.244.3.0/24", "nonsense"]},
                    "status": {"addresses": [{"type": "InternalIP", "address": "not-an-ip"}]}
                }),
                vec![],
                vec!["10.244.3.0/24"],
                2,
            ),
            (
                "duplicates collapse",
                serde_json::json!({
                    "metadata": {"name": "n4"},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": "172.18.0.4"},
                        {"type": "ExternalIP", "address": "172.18.0.4"}
                    ]}
                }),
                vec!["172.18.0.4"],
                vec![],
                0,
            ),
        ];
        for (name, json, addrs, cidrs, n_warn) in cases {
            let mut warnings = Vec::new();
            let info = NodeInfo::from_k8s(&node(json), &mut warnings)
                .unwrap_or_else(|e| panic!("case {name:?}: {e}"));
            let got: Vec<String> = info.addresses.iter().map(ToString::to_string).collect();
            assert_eq!(got, addrs, "case {name:?}: addresses");
            let got: Vec<String> = info.pod_cidrs.iter().map(ToString::to_string).collect();
            assert_eq!(got, cidrs, "case {name:?}: pod CIDRs");
            assert_eq!(warnings.len(), n_warn, "case {name:?}: {warnings:?}");
            assert!(
                warnings.iter().all(|w| w.contains(&info.name)),
                "case {name:?}: every warning names the node: {warnings:?}"
            );
        }
    }

    #[test]
    fn a_node_without_a_name_is_an_error() {
        let mut warnings = Vec::new();
        let err = NodeInfo::from_k8s(&node(serde_json::json!({"metadata": {}})), &mut warnings)
            .expect_err("no name");
        assert_eq!(err, ModelError::MissingName("Node"));
    }
}
