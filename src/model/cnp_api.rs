//! The ClusterNetworkPolicy API (`policy.networking.k8s.io/v1alpha2`, network-policy-api
//! v0.2.0) as serde types with the upstream field names.
//!
//! Why here and by hand: no maintained crate ships these types for Rust, and kube's
//! `CustomResource` derive gives both the watcher's resource type and a CRD generated from
//! the same definition (`deploy/crd/`, kept in sync by `tests/crd.rs`). The shapes follow
//! `apis/v1alpha2/clusternetworkpolicy_types.go` at the v0.2.0 tag (the released shape:
//! `tier`, `priority`, `subject`, rules with `name`, `action`, `from`/`to`, `protocols`), not
//! the early v1alpha2 draft (`match[]`, `namedPort`).
//!
//! Unknown fields are ignored on decode, as a client of an older CRD must: a peer whose only
//! field is one we do not know decodes with every known field empty, and the model
//! ([`super::cnp`]) reads that as the API text prescribes (fail closed). Every limit the CRD's
//! schema and CEL rules impose is checked again in the model, because objects also come from
//! manifest files that no API server has validated.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
// The derive and the types it needs come from kube's pure crates (kube-derive, kube-core),
// not from the client: the model stays free of I/O.
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `spec` of a ClusterNetworkPolicy.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    crates(kube_core = "::kube_core"),
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    shortname = "cnp",
    status = "ClusterNetworkPolicyStatus",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    pub tier: Tier,
    /// 0–1000, lower first within the tier.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// The pods the policy applies to.
    pub subject: ClusterNetworkPolicySubject,
    /// Ingress rules, in precedence order (at most 25).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 25))]
    pub ingress: Vec<ClusterNetworkPolicyIngressRule>,
    /// Egress rules, in precedence order (at most 25).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 25))]
    pub egress: Vec<ClusterNetworkPolicyEgressRule>,
}

/// `spec.tier`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Tier {
    /// Before NetworkPolicy.
    #[default]
    Admin,
    /// After NetworkPolicy, for pods it does not isolate.
    Baseline,
}

/// `status`: its contents are left to the implementation; kube-nftpolicy writes none.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct ClusterNetworkPolicyStatus {
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `spec.subject`: exactly one field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicySubject {
    /// Every pod of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Pods by namespace AND pod selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Pods in namespaces.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    /// Which namespaces (`{}` = all).
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    /// Which pods in them (`{}` = all). Required by the CRD.
    pub pod_selector: Option<LabelSelector>,
}

/// `Accept`, `Deny` or `Pass`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Action {
    /// This direction is allowed; lower tiers are skipped.
    #[default]
    Accept,
    /// Dropped.
    Deny,
    /// Skip the rest of this tier.
    Pass,
}

/// One `spec.ingress[]` rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct ClusterNetworkPolicyIngressRule {
    /// For observability, at most 100 characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 100))]
    pub name: String,
    /// What to do with matching traffic.
    pub action: Action,
    /// Sources (1–25).
    #[serde(default)]
    #[schemars(length(min = 1, max = 25))]
    pub from: Vec<ClusterNetworkPolicyIngressPeer>,
    /// Ports (1–25 when given; absent = every port and protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

/// One `spec.egress[]` rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(self.to.exists(peer, has(peer.networks) || has(peer.nodes) || has(peer.domainNames)) && has(self.protocols) && self.protocols.exists(protocol, has(protocol.destinationNamedPort)))",
    "message": "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames"
}]))]
pub struct ClusterNetworkPolicyEgressRule {
    /// For observability, at most 100 characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 100))]
    pub name: String,
    /// What to do with matching traffic.
    pub action: Action,
    /// Destinations (1–25).
    #[serde(default)]
    #[schemars(length(min = 1, max = 25))]
    pub to: Vec<ClusterNetworkPolicyEgressPeer>,
    /// Ports (1–25 when given; absent = every port and protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<ClusterNetworkPolicyProtocol>>,
}

/// One `from[]` entry: exactly one field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyIngressPeer {
    /// Every pod of these namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Pods by namespace AND pod selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// One `to[]` entry: exactly one field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyEgressPeer {
    /// Every pod of these namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    /// Pods by namespace AND pod selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// Nodes by label: their `status.addresses` (experimental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs (1–25); they match pod addresses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub networks: Option<Vec<String>>,
    /// Domain names (1–25, experimental, Accept rules only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub domain_names: Option<Vec<String>>,
}

/// One `protocols[]` entry: exactly one field.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ClusterNetworkPolicyProtocol {
    /// TCP ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    /// UDP ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    /// SCTP ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    /// A container port name on the destination pod (experimental).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// `tcp`/`udp`/`sctp`: the destination port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1))]
pub struct ProtocolPorts {
    /// Which ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
}

/// A port number or a range: exactly one.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Port {
    /// One port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub number: Option<i32>,
    /// An inclusive range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

/// `start` < `end`, both inclusive.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.start < self.end",
    "message": "Start port must be less than End port"
}]))]
pub struct PortRange {
    /// First port.
    #[schemars(range(min = 1, max = 65535))]
    pub start: i32,
    /// Last port.
    #[schemars(range(min = 1, max = 65535))]
    pub end: i32,
}
