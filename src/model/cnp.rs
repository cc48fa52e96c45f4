//! ClusterNetworkPolicy validated and trimmed into what enforcement needs.
//!
//! Every limit of the upstream CRD (schema and CEL rules, network-policy-api v0.2.0) is
//! checked here, because objects also come from manifest files no API server has seen. A
//! problem is reported naming the object and the field, and what happens next follows the
//! API's own fail-closed reading:
//!
//! - a policy whose place cannot be known (no name, tier or subject, priority outside 0–1000,
//!   an invalid subject selector) is rejected: there is nothing safe to enforce for it;
//! - a rule the API server would reject, or one holding a peer or protocol with no field this
//!   version knows (a newer CRD), fails closed as the API text prescribes for unknown peers:
//!   an `Accept` rule matches no traffic, a `Deny` or `Pass` rule becomes "deny all";
//! - a `domainNames` peer is accepted but matches nothing (FQDN egress is not implemented;
//!   the API allows it only in `Accept` rules, so matching nothing is the safe reading).

use std::fmt;

use super::cidr::{Cidr, CidrError};
use super::cnp_api::{
    self, ClusterNetworkPolicy, ClusterNetworkPolicyEgressPeer, ClusterNetworkPolicyIngressPeer,
    ClusterNetworkPolicyProtocol, NamespacedPod,
};
use super::policy::{Direction, Protocol};
use super::selector::{Selector, SelectorError};

/// Most rules per direction, peers per rule, protocols per rule, CIDRs or names per peer.
pub const MAX_ITEMS: usize = 25;
/// Longest rule name.
pub const MAX_RULE_NAME: usize = 100;
/// Highest priority value.
pub const MAX_PRIORITY: i32 = 1000;

/// `spec.tier`, in evaluation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Tier {
    /// Before NetworkPolicy.
    Admin,
    /// After NetworkPolicy, for pods it does not isolate.
    Baseline,
}

impl Tier {
    /// Lower-case name for chain names and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "admin",
            Tier::Baseline => "baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// A rule's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Action {
    /// Allowed in this direction; lower tiers are skipped.
    Accept,
    /// Dropped.
    Deny,
    /// The rest of this tier is skipped.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        })
    }
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// `metadata.name` (cluster-scoped).
    pub name: String,
    /// Admin or Baseline.
    pub tier: Tier,
    /// 0–1000, lower first.
    pub priority: u16,
    /// The pods it applies to.
    pub subject: Subject,
    /// `spec.ingress`, in order.
    pub ingress: Vec<CnpRule>,
    /// `spec.egress`, in order.
    pub egress: Vec<CnpRule>,
    /// What is wrong with the object; the rules concerned fail closed.
    pub problems: Vec<CnpError>,
    /// Annotated `kube-nftpolicy.io/staged: "true"`: not enforced (see
    /// [`crate::model::policy::STAGED_ANNOTATION`]; staged ClusterNetworkPolicies are not
    /// measured in the kernel yet, docs/semantics.md).
    pub staged: bool,
}

impl ClusterPolicy {
    /// The rules of one direction (empty = this policy does not affect it).
    pub fn rules(&self, d: Direction) -> &[CnpRule] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The order within a tier: priority, then name. Equal priorities are undefined upstream
    /// ("the implementation can apply any of the matching policies"); the name makes the
    /// choice deterministic, as the reference implementation does.
    pub fn order_key(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}

/// `spec.subject`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// Every pod of the namespaces this selects.
    Namespaces(Selector),
    /// Pods by namespace and pod selector.
    Pods {
        /// Namespaces.
        namespaces: Selector,
        /// Pods in them.
        pods: Selector,
    },
}

impl Subject {
    /// The (namespace, pod) selector pair.
    pub fn selectors(&self) -> (Selector, Selector) {
        match self {
            Subject::Namespaces(ns) => (ns.clone(), Selector::everything()),
            Subject::Pods { namespaces, pods } => (namespaces.clone(), pods.clone()),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ns, pods) = self.selectors();
        f.write_str(&describe_selectors(&ns, &pods))
    }
}

fn describe_selectors(ns: &Selector, pods: &Selector) -> String {
    super::policy::describe_pods(&super::policy::NamespaceScope::Selector(ns.clone()), pods)
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CnpRule {
    /// Position in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// `name` (may be empty).
    pub name: String,
    /// `action` as written.
    pub action: Action,
    /// What it matches.
    pub matches: RuleMatch,
}

impl CnpRule {
    /// The action that takes effect: a rule failing closed as "deny all" denies.
    pub fn effective_action(&self) -> Action {
        match self.matches {
            RuleMatch::Everything { .. } => Action::Deny,
            _ => self.action,
        }
    }

    /// `spec.ingress[2]` or `spec.ingress[2] (name)`.
    pub fn label(&self, d: Direction) -> String {
        if self.name.is_empty() {
            format!("spec.{d}[{}]", self.index)
        } else {
            format!("spec.{d}[{}] ({})", self.index, self.name)
        }
    }
}

/// What a rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RuleMatch {
    /// These peers on these ports (`None` = every port and protocol).
    Peers {
        /// `from`/`to`.
        peers: Vec<CnpPeer>,
        /// `protocols`.
        ports: Option<Vec<CnpPort>>,
    },
    /// Failing closed: no traffic (an Accept rule that cannot be fully understood).
    Nothing {
        /// Why.
        reason: String,
    },
    /// Failing closed: all traffic, denied (a Deny or Pass rule that cannot be fully
    /// understood).
    Everything {
        /// Why.
        reason: String,
    },
}

/// One `from`/`to` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CnpPeer {
    /// Every pod of these namespaces.
    Namespaces(Selector),
    /// Pods by namespace and pod selector.
    Pods {
        /// Namespaces.
        namespaces: Selector,
        /// Pods.
        pods: Selector,
    },
    /// The addresses of the nodes these labels select.
    Nodes(Selector),
    /// CIDRs (they match pod addresses too).
    Networks(Vec<Cidr>),
    /// Domain names: not supported, matches nothing.
    DomainNames(Vec<String>),
}

impl fmt::Display for CnpPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CnpPeer::Namespaces(ns) => {
                f.write_str(&describe_selectors(ns, &Selector::everything()))
            }
            CnpPeer::Pods { namespaces, pods } => {
                f.write_str(&describe_selectors(namespaces, pods))
            }
            CnpPeer::Nodes(sel) if sel.is_empty() => f.write_str("all nodes"),
            CnpPeer::Nodes(sel) => write!(f, "nodes {sel}"),
            CnpPeer::Networks(c) => {
                let v: Vec<String> = c.iter().map(ToString::to_string).collect();
                write!(f, "networks {}", v.join(", "))
            }
            CnpPeer::DomainNames(d) => write!(f, "domainNames {} (not supported)", d.join(", ")),
        }
    }
}

/// One `protocols` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CnpPort {
    /// A protocol and an inclusive port range.
    Ports(Protocol, u16, u16),
    /// `destinationNamedPort`: a container port name on the destination pod (any protocol
    /// the pod declares it with).
    Named(String),
}

impl fmt::Display for CnpPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CnpPort::Ports(p, lo, hi) if lo == hi => write!(f, "{p}/{lo}"),
            CnpPort::Ports(p, lo, hi) => write!(f, "{p}/{lo}-{hi}"),
            CnpPort::Named(n) => write!(f, "named port {n}"),
        }
    }
}

/// What is wrong with a ClusterNetworkPolicy, naming the field as the API server would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CnpError {
    /// No `metadata.name`.
    #[error("ClusterNetworkPolicy has no metadata.name")]
    MissingName,
    /// A field outside what the CRD allows.
    #[error("ClusterNetworkPolicy {name}: {field}: {reason}")]
    Invalid {
        /// The policy.
        name: String,
        /// JSON path.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A peer or protocol with no field this version knows: the CRD is newer than the agent.
    #[error("ClusterNetworkPolicy {name}: {field}: {reason}")]
    Unknown {
        /// The policy.
        name: String,
        /// JSON path.
        field: String,
        /// What is missing.
        reason: String,
    },
}

impl CnpError {
    /// The JSON path at fault.
    pub fn field(&self) -> String {
        match self {
            CnpError::MissingName => "metadata.name".into(),
            CnpError::Invalid { field, .. } | CnpError::Unknown { field, .. } => field.clone(),
        }
    }
}

struct Ctx<'a> {
    name: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> CnpError {
        CnpError::Invalid {
            name: self.name.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn selector(
        &self,
        field: &str,
        sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Result<Selector, CnpError> {
        Selector::try_from_k8s(sel).map_err(|e: SelectorError| self.invalid(field, e.to_string()))
    }

    fn namespaced_pod(
        &self,
        field: &str,
        p: &NamespacedPod,
    ) -> Result<(Selector, Selector), CnpError> {
        let namespaces =
            self.selector(&format!("{field}.namespaceSelector"), &p.namespace_selector)?;
        let Some(pods) = &p.pod_selector else {
            return Err(self.invalid(
                format!("{field}.podSelector"),
                "is required (use {} for every pod)",
            ));
        };
        let pods = self.selector(&format!("{field}.podSelector"), pods)?;
        Ok((namespaces, pods))
    }
}

/// Is this a domain name the CRD's pattern accepts (optionally `*.`-prefixed)?
fn valid_domain_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    let s = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        })
}

fn count(ctx: &Ctx<'_>, field: &str, n: usize, min: usize) -> Result<(), CnpError> {
    if n < min {
        return Err(ctx.invalid(field, format!("needs at least {min} item(s)")));
    }
    if n > MAX_ITEMS {
        return Err(ctx.invalid(
            field,
            format!("has {n} items; at most {MAX_ITEMS} are allowed"),
        ));
    }
    Ok(())
}

/// Either a peer, or a reason the rule must fail closed.
enum PeerRead {
    Ok(CnpPeer),
    Unknown(CnpError),
}

fn ingress_peer(
    ctx: &Ctx<'_>,
    field: &str,
    p: &ClusterNetworkPolicyIngressPeer,
) -> Result<PeerRead, CnpError> {
    match (&p.namespaces, &p.pods) {
        (None, None) => Ok(PeerRead::Unknown(CnpError::Unknown {
            name: ctx.name.into(),
            field: field.into(),
            reason: "no field this version knows (ingress peers are namespaces or pods); the rule fails closed".into(),
        })),
        (Some(ns), None) => Ok(PeerRead::Ok(CnpPeer::Namespaces(
            ctx.selector(&format!("{field}.namespaces"), ns)?,
        ))),
        (None, Some(p)) => {
            let (namespaces, pods) = ctx.namespaced_pod(&format!("{field}.pods"), p)?;
            Ok(PeerRead::Ok(CnpPeer::Pods { namespaces, pods }))
        }
        (Some(_), Some(_)) => Err(ctx.invalid(field, "exactly one of namespaces or pods must be set")),
    }
}

fn egress_peer(
    ctx: &Ctx<'_>,
    field: &str,
    p: &ClusterNetworkPolicyEgressPeer,
) -> Result<PeerRead, CnpError> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set == 0 {
        return Ok(PeerRead::Unknown(CnpError::Unknown {
            name: ctx.name.into(),
            field: field.into(),
            reason: "no field this version knows (namespaces, pods, nodes, networks, domainNames); the rule fails closed".into(),
        }));
    }
    if set > 1 {
        return Err(ctx.invalid(
            field,
            "exactly one of namespaces, pods, nodes, networks or domainNames must be set",
        ));
    }
    if let Some(ns) = &p.namespaces {
        return Ok(PeerRead::Ok(CnpPeer::Namespaces(
            ctx.selector(&format!("{field}.namespaces"), ns)?,
        )));
    }
    if let Some(pods) = &p.pods {
        let (namespaces, pods) = ctx.namespaced_pod(&format!("{field}.pods"), pods)?;
        return Ok(PeerRead::Ok(CnpPeer::Pods { namespaces, pods }));
    }
    if let Some(nodes) = &p.nodes {
        return Ok(PeerRead::Ok(CnpPeer::Nodes(
            ctx.selector(&format!("{field}.nodes"), nodes)?,
        )));
    }
    if let Some(nets) = &p.networks {
        let f = format!("{field}.networks");
        count(ctx, &f, nets.len(), 1)?;
        let mut cidrs = Vec::new();
        for (i, text) in nets.iter().enumerate() {
            let c: Cidr = text
                .parse()
                .map_err(|e: CidrError| ctx.invalid(format!("{f}[{i}]"), e.to_string()))?;
            cidrs.push(c);
        }
        cidrs.sort();
        cidrs.dedup();
        return Ok(PeerRead::Ok(CnpPeer::Networks(cidrs)));
    }
    let names = p.domain_names.clone().unwrap_or_default();
    let f = format!("{field}.domainNames");
    count(ctx, &f, names.len(), 1)?;
    for (i, n) in names.iter().enumerate() {
        if !valid_domain_name(n) {
            return Err(ctx.invalid(
                format!("{f}[{i}]"),
                format!("{n:?} is not a domain name (a `*.` prefix is the only wildcard)"),
            ));
        }
    }
    Ok(PeerRead::Ok(CnpPeer::DomainNames(names)))
}

fn port_of(ctx: &Ctx<'_>, field: &str, v: i32) -> Result<u16, CnpError> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ctx.invalid(field, format!("{v} is outside 1-65535")))
}

/// Either a port, or a reason the rule must fail closed.
enum PortRead {
    Ok(CnpPort),
    Unknown(CnpError),
}

fn protocol(
    ctx: &Ctx<'_>,
    field: &str,
    p: &ClusterNetworkPolicyProtocol,
) -> Result<PortRead, CnpError> {
    let mut found: Vec<(Protocol, &cnp_api::ProtocolPorts)> = Vec::new();
    if let Some(t) = &p.tcp {
        found.push((Protocol::Tcp, t));
    }
    if let Some(u) = &p.udp {
        found.push((Protocol::Udp, u));
    }
    if let Some(s) = &p.sctp {
        found.push((Protocol::Sctp, s));
    }
    let fields = found.len() + usize::from(p.destination_named_port.is_some());
    if fields == 0 {
        return Ok(PortRead::Unknown(CnpError::Unknown {
            name: ctx.name.into(),
            field: field.into(),
            reason: "no field this version knows (tcp, udp, sctp, destinationNamedPort); the rule fails closed".into(),
        }));
    }
    if fields > 1 {
        return Err(ctx.invalid(
            field,
            "exactly one of tcp, udp, sctp or destinationNamedPort must be set",
        ));
    }
    if let Some(name) = &p.destination_named_port {
        if name.is_empty() {
            return Err(ctx.invalid(format!("{field}.destinationNamedPort"), "is empty"));
        }
        return Ok(PortRead::Ok(CnpPort::Named(name.clone())));
    }
    let (proto, ports) = found[0];
    let pf = format!("{field}.{}", proto.nft_name());
    let Some(dp) = &ports.destination_port else {
        return Err(ctx.invalid(
            format!("{pf}.destinationPort"),
            "is required (a number or a range)",
        ));
    };
    let df = format!("{pf}.destinationPort");
    match (dp.number, &dp.range) {
        (Some(n), None) => {
            let n = port_of(ctx, &format!("{df}.number"), n)?;
            Ok(PortRead::Ok(CnpPort::Ports(proto, n, n)))
        }
        (None, Some(r)) => {
            let start = port_of(ctx, &format!("{df}.range.start"), r.start)?;
            let end = port_of(ctx, &format!("{df}.range.end"), r.end)?;
            if start >= end {
                return Err(ctx.invalid(
                    format!("{df}.range"),
                    format!("start ({start}) must be less than end ({end})"),
                ));
            }
            Ok(PortRead::Ok(CnpPort::Ports(proto, start, end)))
        }
        _ => Err(ctx.invalid(&df, "exactly one of number or range must be set")),
    }
}

/// A rule's peers and protocols as written, before the fail-closed decision.
struct RawRule<'a, P> {
    index: usize,
    name: &'a str,
    action: Action,
    peers: &'a [P],
    protocols: Option<&'a [ClusterNetworkPolicyProtocol]>,
}

fn convert_rule<P>(
    ctx: &Ctx<'_>,
    d: Direction,
    raw: RawRule<'_, P>,
    read_peer: impl Fn(&Ctx<'_>, &str, &P) -> Result<PeerRead, CnpError>,
    problems: &mut Vec<CnpError>,
) -> CnpRule {
    let field = format!("spec.{d}[{}]", raw.index);
    let peers_key = match d {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let read = || -> Result<Result<RuleMatch, CnpError>, CnpError> {
        if raw.name.chars().count() > MAX_RULE_NAME {
            return Err(ctx.invalid(
                format!("{field}.name"),
                format!("is longer than {MAX_RULE_NAME} characters"),
            ));
        }
        let pf = format!("{field}.{peers_key}");
        count(ctx, &pf, raw.peers.len(), 1)?;
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            match read_peer(ctx, &format!("{pf}[{i}]"), p)? {
                PeerRead::Ok(peer) => peers.push(peer),
                PeerRead::Unknown(e) => return Ok(Err(e)),
            }
        }
        let mut ports = None;
        if let Some(list) = raw.protocols {
            let f = format!("{field}.protocols");
            count(ctx, &f, list.len(), 1)?;
            let mut out = Vec::new();
            for (i, p) in list.iter().enumerate() {
                match protocol(ctx, &format!("{f}[{i}]"), p)? {
                    PortRead::Ok(port) => out.push(port),
                    PortRead::Unknown(e) => return Ok(Err(e)),
                }
            }
            ports = Some(out);
        }
        let named = ports
            .iter()
            .flatten()
            .any(|p| matches!(p, CnpPort::Named(_)));
        if named
            && peers.iter().any(|p| {
                matches!(
                    p,
                    CnpPeer::Networks(_) | CnpPeer::Nodes(_) | CnpPeer::DomainNames(_)
                )
            })
        {
            return Err(ctx.invalid(
                &field,
                "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
            ));
        }
        if raw.action != Action::Accept
            && peers.iter().any(|p| matches!(p, CnpPeer::DomainNames(_)))
        {
            return Err(ctx.invalid(&pf, "domainNames peers are only supported in Accept rules"));
        }
        Ok(Ok(RuleMatch::Peers { peers, ports }))
    };
    let failed = |e: CnpError, problems: &mut Vec<CnpError>| {
        let reason = e.to_string();
        problems.push(e);
        match raw.action {
            Action::Accept => RuleMatch::Nothing { reason },
            Action::Deny | Action::Pass => RuleMatch::Everything { reason },
        }
    };
    let matches = match read() {
        Ok(Ok(m)) => m,
        Ok(Err(e)) | Err(e) => failed(e, problems),
    };
    CnpRule {
        index: raw.index,
        name: raw.name.to_string(),
        action: raw.action,
        matches,
    }
}

fn action(a: cnp_api::Action) -> Action {
    match a {
        cnp_api::Action::Accept => Action::Accept,
        cnp_api::Action::Deny => Action::Deny,
        cnp_api::Action::Pass => Action::Pass,
    }
}

impl ClusterPolicy {
    /// Validate and trim. `Err` when the policy cannot be placed at all (no name, invalid
    /// priority or subject); problems in rules are kept in `problems` and those rules fail
    /// closed.
    pub fn from_api(cnp: &ClusterNetworkPolicy) -> Result<Self, CnpError> {
        let name = cnp
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(CnpError::MissingName)?;
        let ctx = Ctx { name: &name };
        let spec = &cnp.spec;
        let tier = match spec.tier {
            cnp_api::Tier::Admin => Tier::Admin,
            cnp_api::Tier::Baseline => Tier::Baseline,
        };
        if !(0..=MAX_PRIORITY).contains(&spec.priority) {
            return Err(ctx.invalid(
                "spec.priority",
                format!("{} is outside 0-{MAX_PRIORITY}", spec.priority),
            ));
        }
        let priority = u16::try_from(spec.priority).unwrap_or(0);
        let subject = match (&spec.subject.namespaces, &spec.subject.pods) {
            (Some(ns), None) => Subject::Namespaces(ctx.selector("spec.subject.namespaces", ns)?),
            (None, Some(p)) => {
                let (namespaces, pods) = ctx.namespaced_pod("spec.subject.pods", p)?;
                Subject::Pods { namespaces, pods }
            }
            (None, None) => {
                return Err(CnpError::Unknown {
                    name: name.clone(),
                    field: "spec.subject".into(),
                    reason:
                        "no field this version knows (namespaces or pods); the policy is ignored"
                            .into(),
                });
            }
            (Some(_), Some(_)) => {
                return Err(ctx.invalid(
                    "spec.subject",
                    "exactly one of namespaces or pods must be set",
                ));
            }
        };
        let mut problems = Vec::new();
        for (d, n) in [
            (Direction::Ingress, spec.ingress.len()),
            (Direction::Egress, spec.egress.len()),
        ] {
            if n > MAX_ITEMS {
                // Every rule is still enforced (nothing to gain by dropping some).
                problems.push(ctx.invalid(
                    format!("spec.{d}"),
                    format!("has {n} rules; at most {MAX_ITEMS} are allowed"),
                ));
            }
        }
        let ingress = spec
            .ingress
            .iter()
            .enumerate()
            .map(|(index, r)| {
                convert_rule(
                    &ctx,
                    Direction::Ingress,
                    RawRule {
                        index,
                        name: &r.name,
                        action: action(r.action),
                        peers: &r.from,
                        protocols: r.protocols.as_deref(),
                    },
                    ingress_peer,
                    &mut problems,
                )
            })
            .collect();
        let egress = spec
            .egress
            .iter()
            .enumerate()
            .map(|(index, r)| {
                convert_rule(
                    &ctx,
                    Direction::Egress,
                    RawRule {
                        index,
                        name: &r.name,
                        action: action(r.action),
                        peers: &r.to,
                        protocols: r.protocols.as_deref(),
                    },
                    egress_peer,
                    &mut problems,
                )
            })
            .collect();
        Ok(ClusterPolicy {
            name,
            tier,
            priority,
            subject,
            ingress,
            egress,
            problems,
            staged: crate::model::policy::is_staged(&cnp.metadata),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<ClusterPolicy, CnpError> {
        let text = format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        );
        let cnp: ClusterNetworkPolicy = serde_yaml_ng::from_str(&text).expect("decodes");
        ClusterPolicy::from_api(&cnp)
    }

    const HEAD: &str = "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n";

    #[test]
    fn rejected_policies_name_the_field() {
        let cases = [
            (
                "priority above 1000",
                "  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n",
                "spec.priority",
            ),
            (
                "negative priority",
                "  tier: Baseline\n  priority: -1\n  subject: {namespaces: {}}\n",
                "spec.priority",
            ),
            (
                "empty subject",
                "  tier: Admin\n  priority: 1\n  subject: {}\n",
                "spec.subject",
            ),
            (
                "two subjects",
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n",
                "spec.subject",
            ),
            (
                "pods subject without podSelector",
                "  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}}}\n",
                "spec.subject.pods.podSelector",
            ),
            (
                "bad subject selector",
                "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchExpressions: [{key: a, operator: Near}]}}\n",
                "spec.subject.namespaces",
            ),
        ];
        for (name, spec, field) in cases {
            match parse(spec) {
                Err(e) => {
                    assert_eq!(e.field(), field, "case {name}: {e}");
                    assert!(
                        e.to_string().contains("ClusterNetworkPolicy p"),
                        "case {name}: {e}"
                    );
                }
                Ok(p) => panic!("case {name}: accepted {p:?}"),
            }
        }
    }

    /// (case, rules, field of the problem, what the first rule matches afterwards).
    #[test]
    fn invalid_rules_fail_closed_and_name_the_field() {
        #[derive(Debug, PartialEq)]
        enum Want {
            Nothing,
            Everything,
        }
        let cases = [
            (
                "Accept with no peers",
                "  ingress:\n  - {action: Accept, from: []}\n",
                "spec.ingress[0].from",
                Want::Nothing,
            ),
            (
                "Deny with no peers",
                "  ingress:\n  - {action: Deny, from: []}\n",
                "spec.ingress[0].from",
                Want::Everything,
            ),
            (
                "unknown ingress peer, Accept",
                "  ingress:\n  - {action: Accept, from: [{nodes: {}}]}\n",
                "spec.ingress[0].from[0]",
                Want::Nothing,
            ),
            (
                "unknown egress peer, Pass",
                "  egress:\n  - {action: Pass, to: [{serviceAccounts: {}}]}\n",
                "spec.egress[0].to[0]",
                Want::Everything,
            ),
            (
                "peer with two fields",
                "  egress:\n  - {action: Accept, to: [{namespaces: {}, networks: [10.0.0.0/8]}]}\n",
                "spec.egress[0].to[0]",
                Want::Nothing,
            ),
            (
                "26 peers",
                &format!(
                    "  ingress:\n  - action: Deny\n    from: [{}]\n",
                    vec!["{namespaces: {}}"; 26].join(", ")
                ),
                "spec.ingress[0].from",
                Want::Everything,
            ),
            (
                "bad CIDR",
                "  egress:\n  - {action: Deny, to: [{networks: [10.0.0.0/33]}]}\n",
                "spec.egress[0].to[0].networks[0]",
                Want::Everything,
            ),
            (
                "empty networks",
                "  egress:\n  - {action: Deny, to: [{networks: []}]}\n",
                "spec.egress[0].to[0].networks",
                Want::Everything,
            ),
            (
                "bad domain name",
                "  egress:\n  - {action: Accept, to: [{domainNames: [\"*foo\"]}]}\n",
                "spec.egress[0].to[0].domainNames[0]",
                Want::Nothing,
            ),
            (
                "domainNames in a Deny rule",
                "  egress:\n  - {action: Deny, to: [{domainNames: [example.com]}]}\n",
                "spec.egress[0].to",
                Want::Everything,
            ),
            (
                "range start = end",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 80, end: 80}}}}]}\n",
                "spec.ingress[0].protocols[0].tcp.destinationPort.range",
                Want::Everything,
            ),
            (
                "port 0",
                "  ingress:\n  - {action: Accept, from: [{namespaces: {}}], protocols: [{udp: {destinationPort: {number: 0}}}]}\n",
                "spec.ingress[0].protocols[0].udp.destinationPort.number",
                Want::Nothing,
            ),
            (
                "port number and range",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80, range: {start: 1, end: 2}}}}]}\n",
                "spec.ingress[0].protocols[0].tcp.destinationPort",
                Want::Everything,
            ),
            (
                "tcp without destinationPort",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {}}]}\n",
                "spec.ingress[0].protocols[0].tcp.destinationPort",
                Want::Everything,
            ),
            (
                "two protocols in one entry",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 1}}, udp: {destinationPort: {number: 1}}}]}\n",
                "spec.ingress[0].protocols[0]",
                Want::Everything,
            ),
            (
                "unknown protocol",
                "  ingress:\n  - {action: Accept, from: [{namespaces: {}}], protocols: [{icmp: {}}]}\n",
                "spec.ingress[0].protocols[0]",
                Want::Nothing,
            ),
            (
                "empty protocols",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: []}\n",
                "spec.ingress[0].protocols",
                Want::Everything,
            ),
            (
                "named port with networks",
                "  egress:\n  - {action: Accept, to: [{networks: [10.0.0.0/8]}], protocols: [{destinationNamedPort: web}]}\n",
                "spec.egress[0]",
                Want::Nothing,
            ),
            (
                "named port with nodes",
                "  egress:\n  - {action: Deny, to: [{nodes: {}}], protocols: [{destinationNamedPort: web}]}\n",
                "spec.egress[0]",
                Want::Everything,
            ),
            (
                "rule name over 100 characters",
                &format!(
                    "  ingress:\n  - {{name: {}, action: Deny, from: [{{namespaces: {{}}}}]}}\n",
                    "x".repeat(101)
                ),
                "spec.ingress[0].name",
                Want::Everything,
            ),
            (
                "bad peer selector",
                "  ingress:\n  - {action: Accept, from: [{pods: {namespaceSelector: {matchExpressions: [{key: k, operator: In}]}, podSelector: {}}}]}\n",
                "spec.ingress[0].from[0].pods.namespaceSelector",
                Want::Nothing,
            ),
        ];
        for (name, rules, field, want) in cases {
            let p = parse(&format!("{HEAD}{rules}")).unwrap_or_else(|e| panic!("case {name}: {e}"));
            assert_eq!(p.problems.len(), 1, "case {name}: {:?}", p.problems);
            assert_eq!(
                p.problems[0].field(),
                field,
                "case {name}: {}",
                p.problems[0]
            );
            let rule = p.ingress.first().or(p.egress.first()).expect("a rule");
            let got = match &rule.matches {
                RuleMatch::Nothing { .. } => Want::Nothing,
                RuleMatch::Everything { .. } => Want::Everything,
                RuleMatch::Peers { .. } => panic!("case {name}: the rule was kept as written"),
            };
            assert_eq!(got, want, "case {name}");
            if want == Want::Everything {
                assert_eq!(rule.effective_action(), Action::Deny, "case {name}");
            }
        }
    }

    #[test]
    fn valid_rules_are_kept() {
        let p = parse(&format!(
            "{HEAD}  ingress:\n  - {{name: web, action: Pass, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a}}}}}}}}], protocols: [{{tcp: {{destinationPort: {{range: {{start: 80, end: 90}}}}}}}}, {{destinationNamedPort: dns}}]}}\n  egress:\n  - {{action: Accept, to: [{{networks: [10.0.0.1/8, \"fd00::/8\"]}}, {{nodes: {{}}}}, {{domainNames: [\"*.example.com\"]}}]}}\n"
        ))
        .expect("valid");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.tier, Tier::Admin);
        let RuleMatch::Peers { peers, ports } = &p.ingress[0].matches else {
            panic!("ingress kept")
        };
        assert_eq!(peers.len(), 1);
        assert_eq!(
            ports.as_deref(),
            Some(
                &[
                    CnpPort::Ports(Protocol::Tcp, 80, 90),
                    CnpPort::Named("dns".into())
                ][..]
            )
        );
        let RuleMatch::Peers { peers, ports } = &p.egress[0].matches else {
            panic!("egress kept")
        };
        assert!(ports.is_none());
        // isCIDR accepts host bits (v1alpha2); they are cleared.
        assert_eq!(peers[0].to_string(), "networks 10.0.0.0/8, fd00::/8");
        assert_eq!(p.egress[0].effective_action(), Action::Accept);
    }

    #[test]
    fn too_many_rules_is_reported_but_enforced() {
        let rules: String = (0..26)
            .map(|_| "  - {action: Deny, from: [{namespaces: {}}]}\n")
            .collect();
        let p = parse(&format!("{HEAD}  ingress:\n{rules}")).expect("kept");
        assert_eq!(p.ingress.len(), 26);
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].field(), "spec.ingress");
    }
}
