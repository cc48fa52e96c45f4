//! `kube-nftpolicy explain`: why a connection is allowed or denied.
//!
//! "Something is denied and I cannot tell why" is the most common complaint about
//! NetworkPolicy. This answers it from the same resolved state the ruleset is compiled from:
//! the egress verdict on the source pod's node and the ingress verdict on the destination
//! pod's node, each naming the isolating policies and, rule by rule, which peer and which port
//! matched. The answer is a serialisable [`Explanation`] (for `--output json` and
//! `/debug/explain`); the human report is rendered from it. Pure: no kernel, no cluster.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use serde::Serialize;

use crate::engine::compile::{CompileOptions, node_policy};
use crate::engine::evaluate::{
    Assessment, Connection, Decision, PeerMatch, PolicyOutcome, RuleOutcome, TierOutcome, assess,
    decide, judge_staged, judge_staged_cnps,
};
use crate::engine::index::Snapshot;
use crate::engine::resolve::NodePolicy;
use crate::model::policy::Direction;
use crate::model::{Action, Cidr, Family, ObjectKey, PodInfo, Protocol, Rule, RuleMatch, Tier};

/// One end of the connection as the user names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `namespace/pod`.
    Pod(ObjectKey),
    /// An address (a pod's, or one outside the cluster).
    Address(IpAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Endpoint::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(Endpoint::Pod(ObjectKey::new(ns, pod)))
            }
            _ => Err(ExplainError::Endpoint(s.to_string())),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(key) => key.fmt(f),
            Endpoint::Address(ip) => ip.fmt(f),
        }
    }
}

/// The destination port as the user names it: a number or a container port name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortRef {
    /// `80`.
    Number(u16),
    /// `http`: resolved on the destination pod, as NetworkPolicy resolves named ports.
    Name(String),
}

/// `--port`: `80`, `80/UDP`, `http` or `http/TCP` (TCP when no protocol is given).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortQuery {
    /// Number or name.
    pub port: PortRef,
    /// Protocol.
    pub protocol: Protocol,
}

impl PortQuery {
    /// A numbered port.
    pub fn number(protocol: Protocol, port: u16) -> Self {
        Self {
            port: PortRef::Number(port),
            protocol,
        }
    }

    /// Parse `N`, `N/PROTO`, `name` or `name/PROTO`; `default_protocol` applies when the text
    /// names none. The protocol is case-insensitive.
    pub fn parse(text: &str, default_protocol: Protocol) -> Result<Self, ExplainError> {
        let bad = |reason: &str| ExplainError::Port {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (port, protocol) = match text.split_once('/') {
            None => (text, default_protocol),
            Some((port, proto)) => (
                port,
                Protocol::parse(Some(&proto.to_ascii_uppercase()))
                    .ok_or_else(|| bad("the protocol must be TCP, UDP or SCTP"))?,
            ),
        };
        if port.is_empty() {
            return Err(bad("no port before the protocol"));
        }
        if port.bytes().all(|b| b.is_ascii_digit()) {
            let n = port
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("a port number must be 1-65535"))?;
            return Ok(Self::number(protocol, n));
        }
        let valid_name = port.len() <= 15
            && port
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return Err(bad(
                "a port name is 1-15 lower-case letters, digits and '-' (as in a container's ports[].name)",
            ));
        }
        Ok(Self {
            port: PortRef::Name(port.to_string()),
            protocol,
        })
    }

    /// Does the text name a protocol (`80/UDP`)?
    pub fn names_protocol(text: &str) -> bool {
        text.contains('/')
    }
}

impl std::str::FromStr for PortQuery {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, Protocol::Tcp)
    }
}

impl fmt::Display for PortQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortRef::Number(n) => write!(f, "{n}/{}", self.protocol),
            PortRef::Name(name) => write!(f, "{name}/{}", self.protocol),
        }
    }
}

/// Why a question cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// Neither `namespace/pod` nor an address.
    #[error("{0:?} is neither namespace/pod nor an IP address")]
    Endpoint(String),
    /// The port text does not parse.
    #[error("port {text:?}: {reason} (want 80, 80/UDP, http or http/TCP)")]
    Port {
        /// As given.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The named pod is not known.
    #[error("pod {0} is not in the cluster state")]
    UnknownPod(ObjectKey),
    /// The pod has no address policy can apply to.
    #[error("pod {0} takes no part in policy ({1})")]
    NotATarget(ObjectKey, &'static str),
    /// No address family both ends have.
    #[error("{0} and {1} have no address family in common")]
    NoCommonFamily(String, String),
    /// A named port, but the destination is not a pod.
    #[error(
        "named port {port}: the destination {to} is not a pod, and only a pod's container ports have names"
    )]
    NamedPortNeedsPod {
        /// The port as given.
        port: String,
        /// The destination.
        to: String,
    },
    /// The destination pod declares no such port.
    #[error("named port {port}: pod {pod} declares no such container port (it has: {declared})")]
    NamedPortUnknown {
        /// The port as given.
        port: String,
        /// The destination pod.
        pod: ObjectKey,
        /// The named ports it does declare.
        declared: String,
    },
}

/// One end of the connection, as resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointReport {
    /// `namespace/pod`, or `external` for an address that is no pod's.
    pub name: String,
    /// The address used.
    pub address: IpAddr,
    /// The pod, when the end is one.
    pub pod: Option<String>,
    /// Its node.
    pub node: Option<String>,
}

/// What one direction decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SideStatus {
    /// This end is not a pod on a node: nobody polices this direction.
    NotPoliced,
    /// The pod is not isolated in this direction: everything passes.
    NotIsolated,
    /// Isolated, and at least one rule allows the connection.
    Allowed,
    /// Isolated, and no rule allows the connection.
    Denied,
    /// An Admin ClusterNetworkPolicy rule accepted or denied it (see `admin`).
    Admin,
    /// NetworkPolicy does not isolate the pod, and a Baseline ClusterNetworkPolicy rule
    /// accepted or denied it (see `baseline`).
    Baseline,
    /// The address is in the node's pod ranges but is not a known pod of that node, so the
    /// node drops it whatever the policies say (fail closed, `--unknown-addresses`).
    UnknownAddress,
    /// A pod connecting to its own address: the packet never leaves the pod (the kernel
    /// routes it over the pod's loopback), so no policy applies (the API text of
    /// NetworkPolicy and ClusterNetworkPolicy says the same).
    SelfTraffic,
}

/// What one ClusterNetworkPolicy tier said about one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierReport {
    /// `Admin` or `Baseline`.
    pub tier: &'static str,
    /// The tier's policies that apply to the pod in this direction, in evaluation order.
    pub policies: Vec<String>,
    /// `accept`, `deny`, `pass` or `no-match`.
    pub outcome: &'static str,
    /// The rule that matched: `<policy> spec.ingress[i] (name)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The matched peer, or why the rule fails closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A rule that allows the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleCitation {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// `ingress[i]` or `egress[i]`.
    pub rule: String,
}

/// Whether one part of a rule matched, and what it says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Did it match?
    pub matched: bool,
    /// The part of the rule that matched, or every part that did not.
    pub detail: String,
}

/// One rule of an isolating policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    /// `ingress[i]` or `egress[i]`.
    pub rule: String,
    /// Does it allow the connection?
    pub allows: bool,
    /// The peers (`from`/`to`).
    pub peer: Check,
    /// The ports.
    pub port: Check,
}

/// One isolating policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    /// `namespace/name`.
    pub policy: String,
    /// Why it allows nothing, when it is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// Its rules for this direction, in spec order (none: it allows nothing).
    pub rules: Vec<RuleReport>,
}

/// One direction: egress at the source pod, ingress at the destination pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SideReport {
    /// `egress` or `ingress`.
    pub direction: &'static str,
    /// The decision.
    pub status: SideStatus,
    /// Does this direction let the connection through?
    pub allowed: bool,
    /// The pod whose policies decide (source for egress, destination for ingress).
    pub pod: Option<String>,
    /// Its node, whose agent enforces this direction.
    pub node: Option<String>,
    /// Policies that isolate the pod in this direction, sorted.
    pub isolated_by: Vec<String>,
    /// Rules that allow the connection.
    pub allowed_by: Vec<RuleCitation>,
    /// Every isolating policy with each rule's outcome.
    pub policies: Vec<PolicyReport>,
    /// The Admin tier, when a ClusterNetworkPolicy of it applies to the pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<TierReport>,
    /// The Baseline tier, when consulted and a ClusterNetworkPolicy of it applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<TierReport>,
    /// Which tier decided: `Admin`, `NetworkPolicy`, `Baseline`, `default`, or `self` (a pod
    /// reaching its own address).
    pub decided_by: &'static str,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Does the connection get through (both directions allow it)?
    pub allowed: bool,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    /// The source.
    pub from: EndpointReport,
    /// The destination.
    pub to: EndpointReport,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port number.
    pub port: u16,
    /// The container port name, when the question named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    /// Egress at the source.
    pub egress: SideReport,
    /// Ingress at the destination.
    pub ingress: SideReport,
    /// Each staged NetworkPolicy that selects the source (egress) or destination (ingress)
    /// pod, judged alone: the connection's verdict today and with it enforced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<StagedReport>,
}

/// What one staged policy would do to the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StagedReport {
    /// `namespace/name`.
    pub policy: String,
    /// `egress` (it selects the source) or `ingress` (the destination).
    pub direction: &'static str,
    /// The connection's verdict today: `allowed` or `denied`.
    pub today: &'static str,
    /// Its verdict with this policy enforced (and no other staged one).
    pub with_staged: &'static str,
    /// `would-deny`, `would-allow`, or `none`: what the kernel counts for it on the node
    /// that enforces this direction (a direction's own verdict, see docs/semantics.md).
    pub change: &'static str,
    /// For a staged ClusterNetworkPolicy: its tier (`policy` is then its name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<&'static str>,
    /// For a staged ClusterNetworkPolicy: its rule that matched first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A staged `Pass` over a lower-priority Admin decision: the kernel cannot tell the
    /// verdict it would lead to and counts nothing (`with_staged` is the evaluator's answer).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub undetermined: bool,
}

struct Side<'a> {
    name: String,
    addrs: Vec<IpAddr>,
    pod: Option<&'a PodInfo>,
}

fn side<'a>(snap: &'a Snapshot, e: &Endpoint) -> Result<Side<'a>, ExplainError> {
    match e {
        Endpoint::Pod(key) => {
            let pod = snap
                .pods
                .get(key)
                .ok_or_else(|| ExplainError::UnknownPod(key.clone()))?;
            if pod.host_network {
                return Err(ExplainError::NotATarget(
                    key.clone(),
                    "hostNetwork: its address is the node's",
                ));
            }
            if pod.finished {
                return Err(ExplainError::NotATarget(key.clone(), "it has finished"));
            }
            if pod.ips.is_empty() {
                return Err(ExplainError::NotATarget(key.clone(), "it has no IP yet"));
            }
            Ok(Side {
                name: key.to_string(),
                addrs: pod.ips.clone(),
                pod: Some(pod),
            })
        }
        Endpoint::Address(ip) => {
            let pod = snap
                .pods
                .iter()
                .map(|(_, p)| p.as_ref())
                .find(|p| p.is_policy_target() && p.ips.contains(ip));
            let name = pod.map_or_else(|| "external".to_string(), |p| p.key.to_string());
            Ok(Side {
                name,
                addrs: vec![*ip],
                pod,
            })
        }
    }
}

/// Answers questions about one snapshot, resolving each node's policy once however many
/// questions are asked (a matrix asks N² of them).
pub struct Explainer<'a> {
    snap: &'a Snapshot,
    nodes: BTreeMap<String, NodePolicy>,
    /// Pod ranges known for nodes apart from the snapshot (an agent's `--pod-cidr`).
    pod_cidrs: BTreeMap<String, Vec<Cidr>>,
}

impl<'a> Explainer<'a> {
    /// An explainer for this snapshot.
    pub fn new(snap: &'a Snapshot) -> Self {
        Self {
            snap,
            nodes: BTreeMap::new(),
            pod_cidrs: BTreeMap::new(),
        }
    }

    /// Also know `node`'s pod ranges (as its agent's `--pod-cidr` says), so an address in
    /// them that no known pod holds is explained as dropped.
    pub fn with_pod_cidrs(mut self, node: &str, ranges: Vec<Cidr>) -> Self {
        self.nodes.remove(node);
        self.pod_cidrs.insert(node.to_string(), ranges);
        self
    }

    fn node(&mut self, node: &str) -> &NodePolicy {
        let snap = self.snap;
        let pod_cidrs = &self.pod_cidrs;
        self.nodes.entry(node.to_string()).or_insert_with(|| {
            let opts = CompileOptions {
                pod_cidrs: pod_cidrs.get(node).cloned().unwrap_or_default(),
                ..CompileOptions::default()
            };
            node_policy(snap, node, &opts)
        })
    }

    /// The node whose pod ranges hold `ip`, if any.
    fn node_of_address(&mut self, ip: &IpAddr) -> Option<String> {
        let mut names: Vec<String> = self.pod_cidrs.keys().cloned().collect();
        names.extend(
            self.snap
                .nodes
                .iter()
                .filter(|(_, n)| !n.pod_cidrs.is_empty())
                .map(|(name, _)| name.clone()),
        );
        names.sort();
        names.dedup();
        names
            .into_iter()
            .find(|n| self.node(n).pod_cidrs.iter().any(|c| c.contains(ip)))
    }

    /// Explain one connection attempt. `family` forces IPv4 or IPv6; by default IPv4 when
    /// both ends have it.
    pub fn explain(
        &mut self,
        from: &Endpoint,
        to: &Endpoint,
        port: &PortQuery,
        family: Option<Family>,
    ) -> Result<Explanation, ExplainError> {
        let snap = self.snap;
        let src = side(snap, from)?;
        let dst = side(snap, to)?;
        let (number, named_port) = match &port.port {
            PortRef::Number(n) => (*n, None),
            PortRef::Name(name) => {
                let pod = dst.pod.ok_or_else(|| ExplainError::NamedPortNeedsPod {
                    port: port.to_string(),
                    to: dst.name.clone(),
                })?;
                let n = pod.resolve_named_port(name, port.protocol).ok_or_else(|| {
                    ExplainError::NamedPortUnknown {
                        port: port.to_string(),
                        pod: pod.key.clone(),
                        declared: if pod.named_ports.is_empty() {
                            "none".to_string()
                        } else {
                            pod.named_ports
                                .iter()
                                .map(|p| format!("{}/{} = {}", p.name, p.protocol, p.port))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    }
                })?;
                (n, Some(name.clone()))
            }
        };
        let pick = |f: Family| {
            let a = src.addrs.iter().find(|ip| Family::of(ip) == f)?;
            let b = dst.addrs.iter().find(|ip| Family::of(ip) == f)?;
            Some((*a, *b))
        };
        let (src_ip, dst_ip) = match family {
            Some(f) => pick(f),
            None => pick(Family::V4).or_else(|| pick(Family::V6)),
        }
        .ok_or_else(|| ExplainError::NoCommonFamily(src.name.clone(), dst.name.clone()))?;

        let egress = self.side_report(
            Direction::Egress,
            src.pod,
            Connection {
                local: src_ip,
                peer: dst_ip,
                protocol: port.protocol,
                port: number,
            },
        );
        let mut ingress = self.side_report(
            Direction::Ingress,
            dst.pod,
            Connection {
                local: dst_ip,
                peer: src_ip,
                protocol: port.protocol,
                port: number,
            },
        );
        let mut egress = egress;
        let same_pod = matches!((src.pod, dst.pod), (Some(a), Some(b)) if a.key == b.key);
        if same_pod && src_ip == dst_ip {
            for side in [&mut egress, &mut ingress] {
                side.status = SideStatus::SelfTraffic;
                side.allowed = true;
                side.decided_by = "self";
                side.admin = None;
                side.baseline = None;
                side.policies.clear();
                side.isolated_by.clear();
                side.allowed_by.clear();
            }
        }
        let allowed = egress.allowed && ingress.allowed;
        let mut staged = Vec::new();
        for (direction, pod, c, side_allowed, other_allowed) in [
            (
                Direction::Egress,
                src.pod,
                Connection {
                    local: src_ip,
                    peer: dst_ip,
                    protocol: port.protocol,
                    port: number,
                },
                egress.allowed,
                ingress.allowed,
            ),
            (
                Direction::Ingress,
                dst.pod,
                Connection {
                    local: dst_ip,
                    peer: src_ip,
                    protocol: port.protocol,
                    port: number,
                },
                ingress.allowed,
                egress.allowed,
            ),
        ] {
            let Some(node) = pod.and_then(|p| p.node.clone()) else {
                continue;
            };
            for v in judge_staged(self.node(&node), direction, c) {
                debug_assert_eq!(v.today, side_allowed);
                let word = |a: bool| if a { "allowed" } else { "denied" };
                staged.push(StagedReport {
                    policy: v.policy.to_string(),
                    direction: direction.as_str(),
                    today: word(allowed),
                    with_staged: word(v.with_it && other_allowed),
                    change: match (v.today, v.with_it) {
                        (true, false) => "would-deny",
                        (false, true) => "would-allow",
                        _ => "none",
                    },
                    tier: None,
                    rule: None,
                    undetermined: false,
                });
            }
            // The staged ClusterNetworkPolicies, judged together as the kernel does.
            if let Some(v) = judge_staged_cnps(self.node(&node), direction, c) {
                let word = |a: bool| if a { "allowed" } else { "denied" };
                let rule = if v.hit.name.is_empty() {
                    format!("spec.{direction}[{}]", v.hit.index)
                } else {
                    format!("spec.{direction}[{}] ({})", v.hit.index, v.hit.name)
                };
                staged.push(StagedReport {
                    policy: v.policy.clone(),
                    direction: direction.as_str(),
                    today: word(allowed),
                    with_staged: word(v.with_it && other_allowed),
                    change: v.change(),
                    tier: Some(v.tier.as_str()),
                    rule: Some(format!("{rule}: {}", v.hit.action)),
                    undetermined: v.undetermined,
                });
            }
        }
        let endpoint = |s: &Side<'_>, address: IpAddr| EndpointReport {
            name: s.name.clone(),
            address,
            pod: s.pod.map(|p| p.key.to_string()),
            node: s.pod.and_then(|p| p.node.as_deref().map(str::to_string)),
        };
        Ok(Explanation {
            allowed,
            verdict: if allowed { "allowed" } else { "denied" },
            from: endpoint(&src, src_ip),
            to: endpoint(&dst, dst_ip),
            protocol: port.protocol,
            port: number,
            named_port,
            egress,
            ingress,
            staged,
        })
    }

    fn side_report(
        &mut self,
        direction: Direction,
        pod: Option<&PodInfo>,
        c: Connection,
    ) -> SideReport {
        let snap = self.snap;
        let node = match pod {
            Some(p) => p.node.as_deref().map(str::to_string),
            // An address that is no pod may still be in a node's pod ranges (unknown there).
            None => self.node_of_address(&c.local),
        };
        let mut report = SideReport {
            direction: direction.as_str(),
            status: SideStatus::NotPoliced,
            allowed: true,
            pod: pod.map(|p| p.key.to_string()),
            node: node.clone(),
            isolated_by: Vec::new(),
            allowed_by: Vec::new(),
            policies: Vec::new(),
            admin: None,
            baseline: None,
            decided_by: "default",
        };
        let Some(node) = node else {
            return report;
        };
        let decision: Decision = decide(self.node(&node), direction, c);
        report.decided_by = decision.decided_by();
        report.admin = tier_report(snap, Tier::Admin, direction, &decision.admin);
        report.baseline = decision
            .baseline
            .as_ref()
            .and_then(|b| tier_report(snap, Tier::Baseline, direction, b));
        if report.decided_by == "Admin" {
            report.status = SideStatus::Admin;
            report.allowed = decision.allowed;
            return report;
        }
        let policies = match assess(self.node(&node), direction, c) {
            Assessment::NotIsolated => {
                report.allowed = decision.allowed;
                report.status = if report.decided_by == "Baseline" {
                    SideStatus::Baseline
                } else {
                    SideStatus::NotIsolated
                };
                return report;
            }
            Assessment::UnknownAddress => {
                report.status = SideStatus::UnknownAddress;
                report.allowed = false;
                return report;
            }
            Assessment::Isolated(policies) => policies,
        };
        for outcome in &policies {
            report.isolated_by.push(outcome.policy.to_string());
            for r in outcome.rules.iter().filter(|r| r.allows) {
                report.allowed_by.push(RuleCitation {
                    policy: outcome.policy.to_string(),
                    rule: format!("{direction}[{}]", r.index),
                });
            }
            report
                .policies
                .push(policy_report(snap, direction, outcome));
        }
        report.allowed = !report.allowed_by.is_empty();
        report.status = if report.allowed {
            SideStatus::Allowed
        } else {
            SideStatus::Denied
        };
        report
    }
}

/// A tier's outcome for the report, naming the rule (with its peer) that matched.
fn tier_report(
    snap: &Snapshot,
    tier: Tier,
    direction: Direction,
    outcome: &TierOutcome,
) -> Option<TierReport> {
    let tier_name = match tier {
        Tier::Admin => "Admin",
        Tier::Baseline => "Baseline",
    };
    match outcome {
        TierOutcome::NoPolicies => None,
        TierOutcome::NoMatch(names) => Some(TierReport {
            tier: tier_name,
            policies: names.clone(),
            outcome: "no-match",
            rule: None,
            detail: None,
        }),
        TierOutcome::Matched(hit) => {
            let policy = snap.cnps.get(&hit.policy);
            let rule = policy.and_then(|p| p.rules(direction).get(hit.index));
            let names = policy
                .map(|p| vec![p.name.clone()])
                .unwrap_or_else(|| vec![hit.policy.clone()]);
            let peers_field = match direction {
                Direction::Ingress => "from",
                Direction::Egress => "to",
            };
            let detail = match (&hit.fail_closed, hit.peer, rule.map(|r| &r.matches)) {
                (Some(why), _, _) => Some(format!("fails closed: {why}")),
                (None, Some(i), Some(RuleMatch::Peers { peers, .. })) => {
                    peers.get(i).map(|p| format!("peer {peers_field}[{i}] {p}"))
                }
                _ => None,
            };
            let label = if hit.name.is_empty() {
                format!("spec.{direction}[{}]", hit.index)
            } else {
                format!("spec.{direction}[{}] ({})", hit.index, hit.name)
            };
            Some(TierReport {
                tier: tier_name,
                policies: names,
                outcome: match hit.action {
                    Action::Accept => "accept",
                    Action::Deny => "deny",
                    Action::Pass => "pass",
                },
                rule: Some(format!(
                    "{} (priority {}) {label}",
                    hit.policy, hit.priority
                )),
                detail,
            })
        }
    }
}

fn tier_text(out: &mut String, t: &TierReport) {
    let detail = t
        .detail
        .as_ref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default();
    let _ = match (t.outcome, &t.rule) {
        ("no-match", _) => writeln!(
            out,
            "    {} tier: no rule of {} matches",
            t.tier,
            t.policies.join(", ")
        ),
        (outcome, Some(rule)) => writeln!(
            out,
            "    {} tier: {} by ClusterNetworkPolicy {rule}{detail}",
            t.tier,
            match outcome {
                "accept" => "ACCEPTED",
                "deny" => "DENIED",
                _ => "PASSED to the next tier",
            }
        ),
        _ => Ok(()),
    };
}

fn policy_report(snap: &Snapshot, direction: Direction, outcome: &PolicyOutcome) -> PolicyReport {
    let spec_rules: &[Rule] = snap
        .policies
        .get(&outcome.policy)
        .and_then(|p| p.rules(direction))
        .unwrap_or(&[]);
    PolicyReport {
        policy: outcome.policy.to_string(),
        invalid: outcome.invalid.clone(),
        rules: outcome
            .rules
            .iter()
            .map(|r| rule_report(direction, spec_rules.get(r.index), r))
            .collect(),
    }
}

fn rule_report(direction: Direction, spec: Option<&Rule>, r: &RuleOutcome) -> RuleReport {
    let peers_field = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let peers = spec.and_then(|s| s.peers.as_deref()).unwrap_or(&[]);
    let peer = match r.peer {
        PeerMatch::Any => Check {
            matched: true,
            detail: format!("any (no `{peers_field}`)"),
        },
        PeerMatch::Peer(i) => Check {
            matched: true,
            detail: match peers.get(i) {
                Some(p) => format!("{peers_field}[{i}] {p}"),
                None => format!("{peers_field}[{i}]"),
            },
        },
        PeerMatch::None => Check {
            matched: false,
            detail: peers
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{peers_field}[{i}] {p}"))
                .collect::<Vec<_>>()
                .join(" or "),
        },
    };
    let port = match spec.and_then(|s| s.ports.as_deref()) {
        None => Check {
            matched: r.port,
            detail: "any (no `ports`)".to_string(),
        },
        Some(ports) => Check {
            matched: r.port,
            detail: ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        },
    };
    RuleReport {
        rule: format!("{direction}[{}]", r.index),
        allows: r.allows,
        peer,
        port,
    }
}

/// Explain one connection attempt (see [`Explainer::explain`]).
pub fn explain(
    snap: &Snapshot,
    from: &Endpoint,
    to: &Endpoint,
    port: &PortQuery,
    family: Option<Family>,
) -> Result<Explanation, ExplainError> {
    Explainer::new(snap).explain(from, to, port, family)
}

impl Explanation {
    /// The human-readable report: a header, one line per direction (with the rules behind
    /// it), and the verdict.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let named = self
            .named_port
            .as_ref()
            .map(|n| format!(" (named port {n} of {})", self.to.name))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} ({}) → {} ({}) {}/{}{named}",
            self.from.name,
            self.from.address,
            self.to.name,
            self.to.address,
            self.protocol,
            self.port
        );
        for s in [&self.egress, &self.ingress] {
            side_text(&mut out, s);
        }
        let _ = writeln!(
            out,
            "verdict: {}",
            if self.allowed { "ALLOWED" } else { "DENIED" }
        );
        for s in &self.staged {
            if let (Some(tier), Some(rule)) = (s.tier, &s.rule) {
                let tier = if tier == "admin" { "Admin" } else { "Baseline" };
                let what = format!("{tier} ClusterNetworkPolicy {}", s.policy);
                let by = if s.with_staged == s.today {
                    String::new()
                } else {
                    format!(" by its rule {rule}")
                };
                let note = if s.undetermined {
                    " (not counted: a Pass over a lower-priority Admin decision)".to_string()
                } else if s.change == "none" {
                    format!(" (no change in {}; its rule {rule})", s.direction)
                } else {
                    format!(" (counted as {})", s.change)
                };
                let _ = writeln!(
                    out,
                    "staged {what} ({}): today: {}; with staged {what}: {}{by}{note}",
                    s.direction, s.today, s.with_staged
                );
                continue;
            }
            let _ = match s.change {
                "none" => writeln!(
                    out,
                    "staged {} ({}): today: {}; with staged {}: {} (no change in {})",
                    s.policy, s.direction, s.today, s.policy, s.with_staged, s.direction
                ),
                change => writeln!(
                    out,
                    "staged {} ({}): today: {}; with staged {}: {} (counted as {change})",
                    s.policy, s.direction, s.today, s.policy, s.with_staged
                ),
            };
        }
        out
    }
}

/// `port TCP/80` or `ports TCP/80, UDP/53`.
fn port_words(detail: &str) -> String {
    if detail.contains(", ") {
        format!("ports {detail}")
    } else {
        format!("port {detail}")
    }
}

fn side_text(out: &mut String, s: &SideReport) {
    let what = match (&s.pod, &s.node) {
        (Some(pod), Some(node)) => format!("{} of {pod} (on {node})", s.direction),
        (Some(pod), None) => format!("{} of {pod}", s.direction),
        _ => s.direction.to_string(),
    };
    let _ = match s.status {
        SideStatus::NotPoliced => {
            let why = match (&s.pod, s.direction) {
                (Some(_), _) => "the pod is not scheduled on a node",
                (None, "egress") => "the source is not a pod",
                (None, _) => "the destination is not a pod",
            };
            writeln!(out, "  {what}: not policed ({why})")
        }
        SideStatus::NotIsolated => writeln!(
            out,
            "  {what}: allowed (no policy isolates it in this direction)"
        ),
        SideStatus::Allowed => writeln!(
            out,
            "  {what}: allowed by {}",
            s.allowed_by
                .iter()
                .map(|c| format!("{} ({})", c.policy, c.rule))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        SideStatus::Denied => writeln!(
            out,
            "  {what}: DENIED: isolated by {}, and no rule of theirs matches",
            s.isolated_by.join(", ")
        ),
        SideStatus::Admin | SideStatus::Baseline => writeln!(
            out,
            "  {what}: {} by the {} tier",
            if s.allowed { "allowed" } else { "DENIED" },
            s.decided_by
        ),
        SideStatus::SelfTraffic => writeln!(
            out,
            "  {what}: allowed (a pod reaching its own address never leaves it; no policy applies)"
        ),
        SideStatus::UnknownAddress => writeln!(
            out,
            "  {what}: DROPPED: the address is in the pod ranges of {} but is not a known pod there (unknown addresses fail closed)",
            s.node.as_deref().unwrap_or("the node")
        ),
    };
    if let Some(t) = &s.admin {
        tier_text(out, t);
    }
    if let Some(t) = &s.baseline {
        tier_text(out, t);
    }
    for p in &s.policies {
        // When allowed, the rules that allow are the answer; when denied, every rule is.
        if !s.allowed {
            if let Some(why) = &p.invalid {
                let _ = writeln!(out, "    {}: invalid ({why}); allows nothing", p.policy);
                continue;
            }
            if p.rules.is_empty() {
                let _ = writeln!(
                    out,
                    "    {}: no {} rules; allows nothing",
                    p.policy, s.direction
                );
                continue;
            }
        }
        for r in &p.rules {
            if s.allowed && !r.allows {
                continue;
            }
            let line = if r.allows {
                format!(
                    "{} {}: allows it (peer {}, {})",
                    p.policy,
                    r.rule,
                    r.peer.detail,
                    port_words(&r.port.detail)
                )
            } else {
                let plural = r.port.detail.contains(", ");
                format!(
                    "{} {}: no (peer {} {}; {} {})",
                    p.policy,
                    r.rule,
                    r.peer.detail,
                    if r.peer.matched {
                        "matches"
                    } else {
                        "does not match"
                    },
                    port_words(&r.port.detail),
                    match (plural, r.port.matched) {
                        (false, true) => "matches",
                        (false, false) => "does not match",
                        (true, true) => "match",
                        (true, false) => "do not match",
                    }
                )
            };
            let _ = writeln!(out, "    {line}");
        }
    }
}
