//! NetworkPolicy (networking.k8s.io/v1), validated and normalised.
//!
//! Normalisation removes the spec's ambiguities once: missing and empty `from`/`to`/`ports`
//! both become "any" (`None`), `policyTypes` is defaulted, and ports get their protocol. A
//! policy the API server would reject is not dropped silently: if we can still tell which pods
//! it selects, it keeps isolating them but allows nothing (fail closed), and the error says
//! exactly which field is wrong.

use std::fmt;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ObjectKey;
use super::cidr::{Cidr, CidrError};
use super::selector::{Selector, SelectorError};

/// L4 protocols NetworkPolicy knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parse the API spelling; `None` input means the default, TCP.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    /// The nft `inet_proto` keyword.
    pub fn nft_name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Namespace and name.
    pub key: ObjectKey,
    /// `spec.podSelector`, applied within the policy's namespace.
    pub pod_selector: Selector,
    /// `Some` when the policy applies to ingress (the rules allowed; empty = deny all).
    pub ingress: Option<Vec<Rule>>,
    /// `Some` when the policy applies to egress.
    pub egress: Option<Vec<Rule>>,
    /// Set when the spec is invalid: the policy then isolates its pods but allows nothing.
    pub invalid: Option<PolicyError>,
    /// Annotated [`STAGED_ANNOTATION`]`: "true"`: not enforced; the kernel counts the new
    /// connections whose verdict it would change instead (docs/semantics.md).
    pub staged: bool,
}

/// The annotation that stages a policy (NetworkPolicy or ClusterNetworkPolicy): with value
/// `"true"` the policy is not enforced, only measured.
pub const STAGED_ANNOTATION: &str = "kube-nftpolicy.io/staged";

/// Does this object carry [`STAGED_ANNOTATION`]`: "true"`? Any other value (or none) means
/// enforced: a typo must not silently turn enforcement off, so only the exact value counts.
pub fn is_staged(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(STAGED_ANNOTATION))
        .is_some_and(|v| v.trim() == "true")
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `from`/`to`; `None` = every peer.
    pub peers: Option<Vec<Peer>>,
    /// `ports`; `None` = every port and protocol.
    pub ports: Option<Vec<PortSpec>>,
}

/// One `from`/`to` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods chosen by namespace and pod selectors (ANDed).
    Pods {
        /// Which namespaces.
        namespaces: NamespaceScope,
        /// Which pods in them (`{}` when `podSelector` is absent).
        pods: Selector,
    },
    /// Addresses.
    IpBlock(IpBlock),
}

/// The namespace part of a pod peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// No `namespaceSelector`: the policy's own namespace.
    Own(String),
    /// `namespaceSelector` (`{}` = all namespaces).
    Selector(Selector),
}

/// `ipBlock`: `cidr` minus every `except`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    /// The block.
    pub cidr: Cidr,
    /// Holes in it, each inside `cidr`.
    pub except: Vec<Cidr>,
}

/// One `ports` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    /// Protocol (TCP by default).
    pub protocol: Protocol,
    /// Which ports.
    pub port: PortMatch,
}

/// The port part of a `ports` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    All,
    /// `port` (and `endPort`), inclusive.
    Range(u16, u16),
    /// A named container port, resolved on the destination pod.
    Named(String),
}

/// Readable description of a pod peer, e.g. `pods app=web in namespaces team=a`.
pub fn describe_pods(namespaces: &NamespaceScope, pods: &Selector) -> String {
    let ns = match namespaces {
        NamespaceScope::Own(ns) => format!("namespace {ns}"),
        NamespaceScope::Selector(s) if s.is_empty() => "all namespaces".to_string(),
        NamespaceScope::Selector(s) => format!("namespaces {s}"),
    };
    if pods.is_empty() {
        format!("all pods in {ns}")
    } else {
        format!("pods {pods} in {ns}")
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ipBlock {}", self.cidr)?;
        if !self.except.is_empty() {
            let except: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", except.join(", "))?;
        }
        Ok(())
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pods { namespaces, pods } => f.write_str(&describe_pods(namespaces, pods)),
            Peer::IpBlock(block) => block.fmt(f),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::All => write!(f, "{} (any port)", self.protocol),
            PortMatch::Range(lo, hi) if lo == hi => write!(f, "{}/{lo}", self.protocol),
            PortMatch::Range(lo, hi) => write!(f, "{}/{lo}-{hi}", self.protocol),
            PortMatch::Named(name) => write!(f, "{}/{name}", self.protocol),
        }
    }
}

/// Why a policy (or part of it) is invalid. Messages name the field, as the API server would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Missing name or namespace.
    #[error("NetworkPolicy has no {0}")]
    Metadata(&'static str),
    /// A selector failed validation.
    #[error("{field}: {source}")]
    Selector {
        /// JSON path of the selector.
        field: String,
        /// What is wrong.
        source: SelectorError,
    },
    /// `policyTypes` holds something other than Ingress/Egress.
    #[error("spec.policyTypes[{index}]: unsupported value {value:?} (want Ingress or Egress)")]
    PolicyType {
        /// Position.
        index: usize,
        /// Value as written.
        value: String,
    },
    /// A peer with nothing or too much in it.
    #[error("{field}: {reason}")]
    Peer {
        /// JSON path of the peer.
        field: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Bad CIDR.
    #[error("{field}: {source}")]
    Cidr {
        /// JSON path.
        field: String,
        /// What is wrong.
        source: CidrError,
    },
    /// An `except` not strictly inside its `cidr`.
    #[error("{field}: {except} is not inside cidr {cidr}")]
    ExceptOutside {
        /// JSON path.
        field: String,
        /// The except.
        except: String,
        /// The block.
        cidr: String,
    },
    /// A bad port, protocol or endPort.
    #[error("{field}: {reason}")]
    Port {
        /// JSON path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The spec could not be decoded at all (a field of the wrong type); only the pod selector
    /// and the directions were recovered.
    #[error("{field}: {reason}")]
    Unreadable {
        /// JSON path of the field that failed to decode.
        field: String,
        /// The decoder's message.
        reason: String,
    },
}

impl PolicyError {
    /// The JSON path of the offending field, as the API server would name it.
    pub fn field(&self) -> String {
        match self {
            Self::Metadata(f) => (*f).to_string(),
            Self::PolicyType { index, .. } => format!("spec.policyTypes[{index}]"),
            Self::Selector { field, .. }
            | Self::Peer { field, .. }
            | Self::Cidr { field, .. }
            | Self::ExceptOutside { field, .. }
            | Self::Port { field, .. }
            | Self::Unreadable { field, .. } => field.clone(),
        }
    }
}

/// A part of a valid policy that has no effect, named by its field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    /// The policy.
    pub key: ObjectKey,
    /// JSON path of the ignored field.
    pub field: &'static str,
    /// Why it has no effect.
    pub reason: &'static str,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {}: {} is ignored because {}",
            self.key, self.field, self.reason
        )
    }
}

/// Which direction a rule list belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to the selected pods.
    Ingress,
    /// Traffic from the selected pods.
    Egress,
}

impl Direction {
    /// Lower-case name used in chain names, comments and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    /// Both directions, in render order.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Policy {
    /// Rules for one direction, `None` when the policy does not apply to it.
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Validate a NetworkPolicy. `Err` means even the selected pods are unknown, so the policy
    /// cannot be used at all; an `Ok` policy with `invalid` set isolates but allows nothing.
    /// Fields the API server would drop are reported through `warnings`.
    pub fn from_k8s(
        np: &NetworkPolicy,
        warnings: &mut Vec<PolicyWarning>,
    ) -> Result<Self, PolicyError> {
        let name = np
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(PolicyError::Metadata("metadata.name"))?;
        let namespace = np
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(PolicyError::Metadata("metadata.namespace"))?;
        let key = ObjectKey { namespace, name };
        let default_spec = NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);
        let pod_selector = match &spec.pod_selector {
            None => Selector::everything(),
            Some(sel) => Selector::try_from_k8s(sel).map_err(|source| PolicyError::Selector {
                field: "spec.podSelector".into(),
                source,
            })?,
        };

        let (mut has_ingress, mut has_egress) = (false, false);
        match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for (index, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => has_ingress = true,
                        "Egress" => has_egress = true,
                        other => {
                            return Err(PolicyError::PolicyType {
                                index,
                                value: other.to_string(),
                            });
                        }
                    }
                }
                if !has_ingress && spec.ingress.as_ref().is_some_and(|r| !r.is_empty()) {
                    warnings.push(PolicyWarning {
                        key: key.clone(),
                        field: "spec.ingress",
                        reason: "spec.policyTypes does not list Ingress",
                    });
                }
                if !has_egress && spec.egress.as_ref().is_some_and(|r| !r.is_empty()) {
                    warnings.push(PolicyWarning {
                        key: key.clone(),
                        field: "spec.egress",
                        reason: "spec.policyTypes does not list Egress",
                    });
                }
            }
            // Defaulting as the API server does it.
            _ => {
                has_ingress = true;
                has_egress = spec.egress.as_ref().is_some_and(|r| !r.is_empty());
            }
        }

        let mut policy = Policy {
            key: key.clone(),
            pod_selector,
            ingress: has_ingress.then(Vec::new),
            egress: has_egress.then(Vec::new),
            invalid: None,
            staged: is_staged(&np.metadata),
        };
        let converted = (|| -> Result<(Vec<Rule>, Vec<Rule>), PolicyError> {
            let mut ingress = Vec::new();
            if has_ingress {
                for (i, r) in spec.ingress.iter().flatten().enumerate() {
                    let field = format!("spec.ingress[{i}]");
                    ingress.push(convert_rule(
                        &key,
                        &field,
                        "from",
                        r.from.as_deref(),
                        r.ports.as_deref(),
                    )?);
                }
            }
            let mut egress = Vec::new();
            if has_egress {
                for (i, r) in spec.egress.iter().flatten().enumerate() {
                    let field = format!("spec.egress[{i}]");
                    egress.push(convert_rule(
                        &key,
                        &field,
                        "to",
                        r.to.as_deref(),
                        r.ports.as_deref(),
                    )?);
                }
            }
            Ok((ingress, egress))
        })();
        match converted {
            Ok((ingress, egress)) => {
                if has_ingress {
                    policy.ingress = Some(ingress);
                }
                if has_egress {
                    policy.egress = Some(egress);
                }
            }
            Err(e) => policy.invalid = Some(e),
        }
        Ok(policy)
    }
}

fn convert_rule(
    key: &ObjectKey,
    field: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, PolicyError> {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| convert_peer(key, &format!("{field}.{peers_field}[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| convert_port(&format!("{field}.ports[{i}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn convert_peer(key: &ObjectKey, field: &str, p: &NetworkPolicyPeer) -> Result<Peer, PolicyError> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(PolicyError::Peer {
            field: field.into(),
            reason: "ipBlock may not be combined with namespaceSelector or podSelector",
        }),
        (None, None, None) => Err(PolicyError::Peer {
            field: field.into(),
            reason: "must specify one of ipBlock, namespaceSelector or podSelector",
        }),
        (Some(block), None, None) => {
            let cidr_field = format!("{field}.ipBlock.cidr");
            let cidr: Cidr = block.cidr.parse().map_err(|source| PolicyError::Cidr {
                field: cidr_field.clone(),
                source,
            })?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let ef = format!("{field}.ipBlock.except[{i}]");
                let ex: Cidr = e.parse().map_err(|source| PolicyError::Cidr {
                    field: ef.clone(),
                    source,
                })?;
                // The API server requires every except to be a strict subset of the cidr.
                if !cidr.contains_cidr(&ex) || ex == cidr {
                    return Err(PolicyError::ExceptOutside {
                        field: ef,
                        except: e.clone(),
                        cidr: block.cidr.clone(),
                    });
                }
                except.push(ex);
            }
            except.sort();
            except.dedup();
            Ok(Peer::IpBlock(IpBlock { cidr, except }))
        }
        (None, ns, pods) => {
            let namespaces = match ns {
                None => NamespaceScope::Own(key.namespace.clone()),
                Some(sel) => {
                    NamespaceScope::Selector(Selector::try_from_k8s(sel).map_err(|source| {
                        PolicyError::Selector {
                            field: format!("{field}.namespaceSelector"),
                            source,
                        }
                    })?)
                }
            };
            let pods = match pods {
                None => Selector::everything(),
                Some(sel) => {
                    Selector::try_from_k8s(sel).map_err(|source| PolicyError::Selector {
                        field: format!("{field}.podSelector"),
                        source,
                    })?
                }
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

/// IANA service name rules, as the API server checks named ports.
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn convert_port(field: &str, p: &NetworkPolicyPort) -> Result<PortSpec, PolicyError> {
    let err = |reason: String| PolicyError::Port {
        field: field.into(),
        reason,
    };
    let protocol = Protocol::parse(p.protocol.as_deref()).ok_or_else(|| {
        err(format!(
            "protocol: unsupported value {:?} (want TCP, UDP or SCTP)",
            p.protocol.as_deref().unwrap_or_default()
        ))
    })?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::All,
        (None, Some(_)) => return Err(err("endPort may only be set together with port".into())),
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(err("endPort may not be used with a named port".into()));
            }
            if !valid_port_name(name) {
                return Err(err(format!(
                    "port: {name:?} is neither a port number nor a valid port name (1-15 lower-case letters, digits and '-', with at least one letter)"
                )));
            }
            PortMatch::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = u16::try_from(*n)
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| err(format!("port: {n} is outside 1-65535")))?;
            let last = match end {
                None => start,
                Some(e) => {
                    let last = u16::try_from(e)
                        .ok()
                        .filter(|v| *v >= 1)
                        .ok_or_else(|| err(format!("endPort: {e} is outside 1-65535")))?;
                    if last < start {
                        return Err(err(format!("endPort {e} must not be less than port {n}")));
                    }
                    last
                }
            };
            PortMatch::Range(start, last)
        }
    };
    Ok(PortSpec { protocol, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> (Result<Policy, PolicyError>, Vec<PolicyWarning>) {
        let np: NetworkPolicy = serde_yaml_ng::from_str(yaml).expect("test yaml");
        let mut warnings = Vec::new();
        (Policy::from_k8s(&np, &mut warnings), warnings)
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: ns}\n";

    #[test]
    fn only_the_exact_value_true_stages_a_policy() {
        let cases = [
            ("no annotations", "", false),
            (
                "true",
                "  annotations: {kube-nftpolicy.io/staged: \"true\"}\n",
                true,
            ),
            (
                "blanks around",
                "  annotations: {kube-nftpolicy.io/staged: \" true \"}\n",
                true,
            ),
            (
                "capitalised",
                "  annotations: {kube-nftpolicy.io/staged: \"True\"}\n",
                false,
            ),
            (
                "yes",
                "  annotations: {kube-nftpolicy.io/staged: \"yes\"}\n",
                false,
            ),
            (
                "false",
                "  annotations: {kube-nftpolicy.io/staged: \"false\"}\n",
                false,
            ),
            (
                "other key",
                "  annotations: {example.com/staged: \"true\"}\n",
                false,
            ),
        ];
        for (name, annotations, want) in cases {
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: ns\n{annotations}spec: {{podSelector: {{}}}}\n"
            );
            let (p, _) = parse(&yaml);
            assert_eq!(p.expect("valid").staged, want, "case {name}");
        }
    }

    #[test]
    fn policy_types_default() {
        struct Case {
            name: &'static str,
            spec: &'static str,
            ingress: bool,
            egress: bool,
        }
        let cases = [
            Case {
                name: "no types, no rules: ingress only",
                spec: "spec: {podSelector: {}}",
                ingress: true,
                egress: false,
            },
            Case {
                name: "no types, egress rules: both",
                spec: "spec: {podSelector: {}, egress: [{}]}",
                ingress: true,
                egress: true,
            },
            Case {
                name: "no types, empty egress list: ingress only",
                spec: "spec: {podSelector: {}, egress: []}",
                ingress: true,
                egress: false,
            },
            Case {
                name: "explicit Egress only",
                spec: "spec: {podSelector: {}, policyTypes: [Egress]}",
                ingress: false,
                egress: true,
            },
            Case {
                name: "explicit both",
                spec: "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
                ingress: true,
                egress: true,
            },
        ];
        for c in cases {
            let (p, _) = parse(&format!("{HEAD}{}", c.spec));
            let p = p.expect(c.name);
            assert_eq!(p.ingress.is_some(), c.ingress, "case {}", c.name);
            assert_eq!(p.egress.is_some(), c.egress, "case {}", c.name);
            assert!(p.invalid.is_none(), "case {}", c.name);
        }
    }

    #[test]
    fn empty_and_missing_lists_mean_all() {
        let (p, _) = parse(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [], ports: []}}, {{}}]}}"
        ));
        let p = p.expect("valid");
        let rules = p.ingress.expect("ingress");
        assert_eq!(rules.len(), 2);
        for r in rules {
            assert_eq!(
                r,
                Rule {
                    peers: None,
                    ports: None
                }
            );
        }
        let (p, _) = parse(&format!("{HEAD}spec: {{podSelector: {{}}, ingress: []}}"));
        assert_eq!(
            p.expect("valid").ingress,
            Some(vec![]),
            "ingress: [] allows nothing"
        );
    }

    #[test]
    fn peers_and_ports() {
        let (p, _) = parse(&format!(
            "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: a}}}}\n    - namespaceSelector: {{}}\n    - namespaceSelector: {{matchLabels: {{team: x}}}}\n      podSelector: {{matchLabels: {{app: b}}}}\n    - ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}\n    ports:\n    - port: 80\n    - {{protocol: UDP, port: 53, endPort: 60}}\n    - {{protocol: SCTP}}\n    - {{port: http}}\n"
        ));
        let p = p.expect("valid");
        let rule = &p.ingress.expect("ingress")[0];
        let peers = rule.peers.as_ref().expect("peers");
        assert!(
            matches!(&peers[0], Peer::Pods { namespaces: NamespaceScope::Own(ns), .. } if ns == "ns")
        );
        assert!(
            matches!(&peers[1], Peer::Pods { namespaces: NamespaceScope::Selector(s), pods } if s.is_empty() && pods.is_empty())
        );
        assert!(
            matches!(&peers[2], Peer::Pods { namespaces: NamespaceScope::Selector(s), pods } if !s.is_empty() && !pods.is_empty())
        );
        assert!(matches!(&peers[3], Peer::IpBlock(b) if b.except.len() == 1));
        assert_eq!(
            rule.ports.as_ref().expect("ports"),
            &vec![
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(80, 80)
                },
                PortSpec {
                    protocol: Protocol::Udp,
                    port: PortMatch::Range(53, 60)
                },
                PortSpec {
                    protocol: Protocol::Sctp,
                    port: PortMatch::All
                },
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Named("http".into())
                },
            ]
        );
    }

    #[test]
    fn invalid_rules_fail_closed() {
        let cases = [
            (
                "bad cidr",
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                "not a cidr",
                "ingress: [{from: [{ipBlock: {cidr: banana}}]}]",
                "is not a CIDR",
            ),
            (
                "except outside",
                "ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]",
                "10.1.0.0/24 is not inside cidr 10.0.0.0/16",
            ),
            (
                "port out of range",
                "ingress: [{ports: [{port: 70000}]}]",
                "port: 70000 is outside 1-65535",
            ),
            (
                "port zero",
                "ingress: [{ports: [{port: 0}]}]",
                "port: 0 is outside",
            ),
            (
                "endPort without port",
                "ingress: [{ports: [{endPort: 90}]}]",
                "endPort may only be set together with port",
            ),
            (
                "endPort below port",
                "ingress: [{ports: [{port: 90, endPort: 80}]}]",
                "endPort 80 must not be less than port 90",
            ),
            (
                "endPort with named port",
                "ingress: [{ports: [{port: http, endPort: 80}]}]",
                "named port",
            ),
            (
                "unknown protocol",
                "egress: [{ports: [{protocol: ICMP, port: 1}]}]",
                "unsupported value \"ICMP\"",
            ),
            (
                "lower-case protocol",
                "egress: [{ports: [{protocol: tcp, port: 1}]}]",
                "unsupported value \"tcp\"",
            ),
            (
                "bad selector operator",
                "ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Equals, values: [b]}]}}]}]",
                "spec.ingress[0].from[0].podSelector: matchExpressions[0]",
            ),
            (
                "empty peer",
                "ingress: [{from: [{}]}]",
                "must specify one of",
            ),
            (
                "ipBlock with selector",
                "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
                "may not be combined",
            ),
            (
                "numeric string port",
                "ingress: [{ports: [{port: \"80\"}]}]",
                "neither a port number nor a valid port name",
            ),
        ];
        for (name, rules, want) in cases {
            let (p, _) = parse(&format!(
                "{HEAD}spec:\n  podSelector: {{matchLabels: {{app: x}}}}\n  {rules}\n"
            ));
            let p = p.expect(name);
            let msg = p
                .invalid
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(msg.contains(want), "case {name}: got {msg:?}");
            for d in Direction::ALL {
                if let Some(r) = p.rules(d) {
                    assert!(
                        r.is_empty(),
                        "case {name}: an invalid policy must allow nothing"
                    );
                }
            }
        }
    }

    #[test]
    fn unusable_policies_are_errors() {
        let cases = [
            (
                "bad podSelector",
                "spec: {podSelector: {matchExpressions: [{key: a, operator: In}]}}",
                "spec.podSelector",
            ),
            (
                "bad policyType",
                "spec: {podSelector: {}, policyTypes: [Sideways]}",
                "spec.policyTypes[0]",
            ),
        ];
        for (name, spec, want) in cases {
            let (p, _) = parse(&format!("{HEAD}{spec}"));
            let err = p.expect_err(name).to_string();
            assert!(err.contains(want), "case {name}: {err}");
        }
    }
}
