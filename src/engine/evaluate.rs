//! Answer "would this connection be allowed on this node?" from a resolved [`NodePolicy`].
//!
//! Pure and independent of nftables, so the semantics can be tested (and explained to a
//! user) without a kernel; the kernel tests then check that the compiled ruleset agrees.
//! [`assess`] keeps the outcome of every rule of every isolating policy, which is what
//! `explain` shows; [`evaluate`] reduces it to a verdict.

use std::net::IpAddr;

use crate::engine::resolve::{
    NodePolicy, PolicyRules, ResolvedCnpMatch, ResolvedCnpPeer, ResolvedCnpRule, ResolvedPeer,
    ResolvedRule,
};
use crate::model::policy::Direction;
use crate::model::{Action, ObjectKey, Protocol, Tier};

/// The outcome for one direction at one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The pod is not isolated in this direction.
    NotIsolated,
    /// Allowed by these rules.
    Allowed(Vec<RuleRef>),
    /// Isolated by these policies and no rule allows it.
    Denied(Vec<ObjectKey>),
    /// The local address is in this node's pod ranges but is not a known pod: dropped
    /// whatever the policies say (fail closed).
    UnknownAddress,
}

impl Verdict {
    /// Does the packet pass?
    pub fn passes(&self) -> bool {
        !matches!(self, Verdict::Denied(_) | Verdict::UnknownAddress)
    }
}

/// One rule of one policy: `spec.<direction>[index]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    /// The policy.
    pub policy: ObjectKey,
    /// Direction.
    pub direction: Direction,
    /// Position in `spec.ingress`/`spec.egress`.
    pub index: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}[{}])", self.policy, self.direction, self.index)
    }
}

/// A connection attempt as the local pod sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    /// The local pod's address (destination for ingress, source for egress).
    pub local: IpAddr,
    /// The other end.
    pub peer: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// Which peer of a rule the other end matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    /// The rule has no `from`/`to`: every peer.
    Any,
    /// `from[i]`/`to[i]` matched (the first that did).
    Peer(usize),
    /// No peer matched.
    None,
}

/// How one rule judged the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOutcome {
    /// Position in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// Which peer matched.
    pub peer: PeerMatch,
    /// Did a `ports` entry match (always, when the rule has no `ports`)?
    pub port: bool,
    /// Does the rule allow the connection (a peer and a port matched)?
    pub allows: bool,
}

/// How one isolating policy judged the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The policy.
    pub policy: ObjectKey,
    /// Why the policy allows nothing, when it is invalid.
    pub invalid: Option<String>,
    /// Every rule, in spec order.
    pub rules: Vec<RuleOutcome>,
}

/// Everything one direction at one pod says about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// The pod is not isolated in this direction (or is not a local pod of this node).
    NotIsolated,
    /// Isolated by these policies (sorted), each with its rules' outcomes.
    Isolated(Vec<PolicyOutcome>),
    /// The local address is in this node's pod ranges but no known pod holds it: dropped.
    UnknownAddress,
}

fn rule_outcome(
    rule: &ResolvedRule,
    direction: Direction,
    c: &Connection,
    dst: IpAddr,
) -> RuleOutcome {
    let matching_peer = |include_ipblocks: bool| match &rule.peers {
        None => PeerMatch::Any,
        Some(peers) => peers
            .iter()
            .position(|p| match p {
                ResolvedPeer::Pods(pods) => pods.addrs.contains(&c.peer),
                ResolvedPeer::IpBlock { ranges, .. } => {
                    include_ipblocks && ranges.iter().any(|r| r.contains(&c.peer))
                }
            })
            .map_or(PeerMatch::None, PeerMatch::Peer),
    };
    let peer = matching_peer(true);
    let peer_ok = peer != PeerMatch::None;
    let (port, allows) = match &rule.ports {
        None => (true, peer_ok),
        Some(ports) => {
            let numeric = ports
                .numeric
                .iter()
                .any(|(p, lo, hi)| *p == c.protocol && (*lo..=*hi).contains(&c.port));
            let named = ports
                .named
                .as_ref()
                .is_some_and(|n| n.targets.contains(&(dst, c.protocol, c.port)));
            // A named port never matches an ipBlock destination (egress), and for egress the
            // named targets already are the peer pods.
            let allows = (numeric && peer_ok)
                || (named
                    && match direction {
                        Direction::Ingress => peer_ok,
                        Direction::Egress => matching_peer(false) != PeerMatch::None,
                    });
            (numeric || named, allows)
        }
    };
    RuleOutcome {
        index: rule.index,
        peer,
        port,
        allows,
    }
}

fn policy_outcome(pr: &PolicyRules, c: &Connection) -> PolicyOutcome {
    // The destination address, where named ports are resolved.
    let dst = match pr.direction {
        Direction::Ingress => c.local,
        Direction::Egress => c.peer,
    };
    PolicyOutcome {
        policy: pr.policy.clone(),
        invalid: pr.invalid.clone(),
        rules: pr
            .rules
            .iter()
            .map(|r| rule_outcome(r, pr.direction, c, dst))
            .collect(),
    }
}

/// Judge one direction for a local pod address, rule by rule. Addresses that are not local
/// isolated pods are not policed on this node, except addresses in the node's pod ranges
/// that no known pod holds, which are dropped (traffic the node itself originates is exempt
/// in the ruleset; the evaluator is about pods).
pub fn assess(np: &NodePolicy, direction: Direction, c: Connection) -> Assessment {
    if np.is_unknown_local(&c.local) {
        return Assessment::UnknownAddress;
    }
    let Some(pod) = np.pods.iter().find(|p| p.ips.contains(&c.local)) else {
        return Assessment::NotIsolated;
    };
    let Some(policies) = pod.isolated_by(direction) else {
        return Assessment::NotIsolated;
    };
    Assessment::Isolated(
        np.policies
            .iter()
            .filter(|pr| pr.direction == direction && policies.contains(&pr.policy))
            .map(|pr| policy_outcome(pr, &c))
            .collect(),
    )
}

/// Evaluate one direction for a local pod address.
pub fn evaluate(np: &NodePolicy, direction: Direction, c: Connection) -> Verdict {
    match assess(np, direction, c) {
        Assessment::NotIsolated => Verdict::NotIsolated,
        Assessment::UnknownAddress => Verdict::UnknownAddress,
        Assessment::Isolated(policies) => {
            let allowed: Vec<RuleRef> = policies
                .iter()
                .flat_map(|p| {
                    p.rules.iter().filter(|r| r.allows).map(|r| RuleRef {
                        policy: p.policy.clone(),
                        direction,
                        index: r.index,
                    })
                })
                .collect();
            if allowed.is_empty() {
                Verdict::Denied(policies.into_iter().map(|p| p.policy).collect())
            } else {
                Verdict::Allowed(allowed)
            }
        }
    }
}

// ───────────────────────── tiers: ClusterNetworkPolicy around NetworkPolicy ─────────────────

/// Which ClusterNetworkPolicy rule decided (or passed) a connection in a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpHit {
    /// The policy.
    pub policy: String,
    /// Its priority.
    pub priority: u16,
    /// Position of the rule in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// The rule's `name` (may be empty).
    pub name: String,
    /// The action that took effect.
    pub action: Action,
    /// Why the rule matched everything or nothing, when it fails closed.
    pub fail_closed: Option<String>,
    /// Which peer matched (`None` for a rule failing closed as "deny all").
    pub peer: Option<usize>,
}

/// The outcome of one tier for one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierOutcome {
    /// No ClusterNetworkPolicy of this tier applies to the pod in this direction.
    NoPolicies,
    /// Policies apply, but none of their rules matched.
    NoMatch(Vec<String>),
    /// A rule matched (Accept, Deny or Pass).
    Matched(CnpHit),
}

impl TierOutcome {
    /// The action that took effect, if a rule matched.
    pub fn action(&self) -> Option<Action> {
        match self {
            TierOutcome::Matched(h) => Some(h.action),
            _ => None,
        }
    }
}

/// One direction at one pod, through every tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The Admin tier.
    pub admin: TierOutcome,
    /// The NetworkPolicy tier; `None` when the Admin tier decided.
    pub network_policy: Option<Verdict>,
    /// The Baseline tier; `None` when an earlier tier decided.
    pub baseline: Option<TierOutcome>,
    /// Does the packet pass?
    pub allowed: bool,
}

impl Decision {
    /// Which tier decided: `Admin`, `NetworkPolicy`, `Baseline`, or `default` (allow).
    pub fn decided_by(&self) -> &'static str {
        if self.network_policy == Some(Verdict::UnknownAddress) {
            "unknown-address"
        } else if matches!(self.admin.action(), Some(Action::Accept | Action::Deny)) {
            "Admin"
        } else if matches!(
            self.network_policy,
            Some(Verdict::Allowed(_) | Verdict::Denied(_))
        ) {
            "NetworkPolicy"
        } else if matches!(
            self.baseline.as_ref().and_then(TierOutcome::action),
            Some(Action::Accept | Action::Deny)
        ) {
            "Baseline"
        } else {
            "default"
        }
    }
}

/// Does one ClusterNetworkPolicy rule match? Returns the matching peer's position (or 0
/// for a rule that matches everything).
fn cnp_rule_matches(
    rule: &ResolvedCnpRule,
    direction: Direction,
    c: &Connection,
) -> Option<Option<usize>> {
    let (peers, ports) = match &rule.matches {
        ResolvedCnpMatch::Nothing(_) => return None,
        ResolvedCnpMatch::Everything(_) => return Some(None),
        ResolvedCnpMatch::Peers { peers, ports } => (peers, ports),
    };
    let peer = peers.iter().position(|p| match p {
        ResolvedCnpPeer::Pods(pods) => pods.addrs.contains(&c.peer),
        ResolvedCnpPeer::Nodes { addrs, .. } => addrs.contains(&c.peer),
        ResolvedCnpPeer::Networks(cidrs) => cidrs.iter().any(|r| r.contains(&c.peer)),
        ResolvedCnpPeer::DomainNames(_) => false,
    })?;
    let dst = match direction {
        Direction::Ingress => c.local,
        Direction::Egress => c.peer,
    };
    let port_ok = match ports {
        None => true,
        Some(p) => {
            p.numeric
                .iter()
                .any(|(proto, lo, hi)| *proto == c.protocol && (*lo..=*hi).contains(&c.port))
                || p.named
                    .as_ref()
                    .is_some_and(|n| n.targets.contains(&(dst, c.protocol, c.port)))
        }
    };
    port_ok.then_some(Some(peer))
}

fn tier_outcome(
    np: &NodePolicy,
    names: &[String],
    tier: Tier,
    direction: Direction,
    c: &Connection,
) -> TierOutcome {
    if names.is_empty() {
        return TierOutcome::NoPolicies;
    }
    for name in names {
        let Some(pr) = np
            .cnps
            .iter()
            .find(|p| p.tier == tier && p.direction == direction && &p.name == name)
        else {
            continue;
        };
        for rule in &pr.rules {
            if let Some(peer) = cnp_rule_matches(rule, direction, c) {
                let fail_closed = match &rule.matches {
                    ResolvedCnpMatch::Everything(why) | ResolvedCnpMatch::Nothing(why) => {
                        Some(why.clone())
                    }
                    ResolvedCnpMatch::Peers { .. } => None,
                };
                return TierOutcome::Matched(CnpHit {
                    policy: pr.name.clone(),
                    priority: pr.priority,
                    index: rule.index,
                    name: rule.name.clone(),
                    action: rule.action,
                    fail_closed,
                    peer,
                });
            }
        }
    }
    TierOutcome::NoMatch(names.to_vec())
}

/// Judge one direction for a local pod address through the tiers: Admin
/// ClusterNetworkPolicies, then NetworkPolicy (final for a pod it isolates), then Baseline
/// ClusterNetworkPolicies, then allow. A pod reaching its own address is always allowed
/// (the packet never leaves the pod).
pub fn decide(np: &NodePolicy, direction: Direction, c: Connection) -> Decision {
    // The fail-closed rule sits in the base chains, before any tier.
    if c.local != c.peer && np.is_unknown_local(&c.local) {
        return Decision {
            admin: TierOutcome::NoPolicies,
            network_policy: Some(Verdict::UnknownAddress),
            baseline: None,
            allowed: false,
        };
    }
    let pod = np.pods.iter().find(|p| p.ips.contains(&c.local));
    let Some(pod) = pod.filter(|_| c.local != c.peer) else {
        return Decision {
            admin: TierOutcome::NoPolicies,
            network_policy: Some(Verdict::NotIsolated),
            baseline: Some(TierOutcome::NoPolicies),
            allowed: true,
        };
    };
    let admin = tier_outcome(
        np,
        pod.cnps.get(Tier::Admin, direction),
        Tier::Admin,
        direction,
        &c,
    );
    match admin.action() {
        Some(Action::Accept) => {
            return Decision {
                admin,
                network_policy: None,
                baseline: None,
                allowed: true,
            };
        }
        Some(Action::Deny) => {
            return Decision {
                admin,
                network_policy: None,
                baseline: None,
                allowed: false,
            };
        }
        _ => {}
    }
    let verdict = evaluate(np, direction, c);
    if !matches!(verdict, Verdict::NotIsolated) {
        let allowed = verdict.passes();
        return Decision {
            admin,
            network_policy: Some(verdict),
            baseline: None,
            allowed,
        };
    }
    let baseline = tier_outcome(
        np,
        pod.cnps.get(Tier::Baseline, direction),
        Tier::Baseline,
        direction,
        &c,
    );
    let allowed = baseline.action() != Some(Action::Deny);
    Decision {
        admin,
        network_policy: Some(verdict),
        baseline: Some(baseline),
        allowed,
    }
}

// ───────────────────────── staged policies: today against "with it" ─────────────────────────

/// One staged policy's effect on one direction of a connection: the verdict today (staged
/// policies ignored) and with that policy enforced, alone (other staged policies still
/// ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedVerdict {
    /// The staged NetworkPolicy.
    pub policy: ObjectKey,
    /// Its direction.
    pub direction: Direction,
    /// Allowed today?
    pub today: bool,
    /// Allowed with it enforced?
    pub with_it: bool,
}

impl StagedVerdict {
    /// Does it change the verdict?
    pub fn changes(&self) -> bool {
        self.today != self.with_it
    }
}

/// `np` as if staged policy `staged` (one of `np.staged`) were enforced: it joins the
/// policies and isolates the local pods it selects in its direction.
pub fn with_staged(np: &NodePolicy, staged: &PolicyRules) -> NodePolicy {
    let mut out = np.clone();
    out.staged.retain(|s| s != staged);
    for pod in out
        .pods
        .iter_mut()
        .filter(|p| staged.selected.contains(&p.key))
    {
        let list = match staged.direction {
            Direction::Ingress => &mut pod.ingress,
            Direction::Egress => &mut pod.egress,
        };
        let list = list.get_or_insert_with(Vec::new);
        list.push(staged.policy.clone());
        list.sort();
    }
    out.policies.push(staged.clone());
    out.policies
        .sort_by(|a, b| (&a.policy, a.direction).cmp(&(&b.policy, b.direction)));
    out
}

/// Every staged policy that selects the local pod of `c` in `direction`, each judged alone
/// against today (the [`decide`] verdict without it and with it).
pub fn judge_staged(np: &NodePolicy, direction: Direction, c: Connection) -> Vec<StagedVerdict> {
    let Some(pod) = np.pods.iter().find(|p| p.ips.contains(&c.local)) else {
        return Vec::new();
    };
    let today = decide(np, direction, c).allowed;
    np.staged
        .iter()
        .filter(|s| s.direction == direction && s.selected.contains(&pod.key))
        .map(|s| StagedVerdict {
            policy: s.policy.clone(),
            direction,
            today,
            with_it: decide(&with_staged(np, s), direction, c).allowed,
        })
        .collect()
}

/// The staged ClusterNetworkPolicy that would change (or, through a `Pass`, might change) a
/// connection in one direction, judged as the kernel measures it: staged ClusterNetworkPolicies
/// are taken together in evaluation order (tier, priority, name), and the first one whose rule
/// is reached and matches is the one judged, against today's enforced policies (the packet's
/// mark field holds one verdict).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedCnpVerdict {
    /// The staged ClusterNetworkPolicy.
    pub policy: String,
    /// Its tier.
    pub tier: Tier,
    /// Its rule that matched first.
    pub hit: CnpHit,
    /// Allowed today?
    pub today: bool,
    /// Allowed with it enforced (its `Pass` leaves the verdict to the next tiers).
    pub with_it: bool,
    /// Decided today by a lower-priority Admin ClusterNetworkPolicy while the staged rule is
    /// a `Pass`: the kernel cannot tell the would-be verdict and counts nothing.
    pub undetermined: bool,
}

impl StagedCnpVerdict {
    /// What the kernel counts: `would-deny`, `would-allow` or `none`.
    pub fn change(&self) -> &'static str {
        match (self.undetermined, self.today, self.with_it) {
            (true, ..) => "none",
            (false, true, false) => "would-deny",
            (false, false, true) => "would-allow",
            _ => "none",
        }
    }
}

/// `np` as if staged ClusterNetworkPolicy `staged` (one of `np.staged_cnps`) were enforced in
/// its direction: it joins the node's policies at its place in evaluation order and applies to
/// the local pods it selects.
pub fn with_staged_cnp(np: &NodePolicy, staged: &crate::engine::resolve::CnpRules) -> NodePolicy {
    let mut out = np.clone();
    out.staged_cnps.retain(|s| s != staged);
    let order = |c: &crate::engine::resolve::CnpRules| (c.tier, c.priority, c.name.clone());
    let at = out
        .cnps
        .partition_point(|c| (order(c), c.direction) < (order(staged), staged.direction));
    out.cnps.insert(at, staged.clone());
    for pod in out
        .pods
        .iter_mut()
        .filter(|p| staged.selected.contains(&p.key))
    {
        let mut membership = crate::engine::resolve::TierMembership::default();
        for tier in [Tier::Admin, Tier::Baseline] {
            for d in Direction::ALL {
                let mut names: Vec<String> = pod.cnps.get(tier, d).to_vec();
                if tier == staged.tier && d == staged.direction {
                    names.push(staged.name.clone());
                    names.sort_by_key(|n| {
                        let priority = out
                            .cnps
                            .iter()
                            .find(|c| &c.name == n && c.direction == d)
                            .map_or(0, |c| c.priority);
                        (priority, n.clone())
                    });
                }
                for n in names {
                    membership.push(tier, d, n);
                }
            }
        }
        pod.cnps = membership;
    }
    out
}

/// The first staged ClusterNetworkPolicy (in evaluation order) whose rule decides `c` in
/// `direction` at its place in the tiers, with today's verdict and the verdict with it;
/// `None` when no staged ClusterNetworkPolicy is reached with a matching rule.
pub fn judge_staged_cnps(
    np: &NodePolicy,
    direction: Direction,
    c: Connection,
) -> Option<StagedCnpVerdict> {
    let pod = np.pods.iter().find(|p| p.ips.contains(&c.local))?;
    if c.local == c.peer {
        return None;
    }
    let today = decide(np, direction, c);
    for s in np
        .staged_cnps
        .iter()
        .filter(|s| s.direction == direction && s.selected.contains(&pod.key))
    {
        let with = decide(&with_staged_cnp(np, s), direction, c);
        let outcome = match s.tier {
            Tier::Admin => Some(&with.admin),
            Tier::Baseline => with.baseline.as_ref(),
        };
        let Some(TierOutcome::Matched(hit)) = outcome else {
            continue;
        };
        if hit.policy != s.name {
            continue;
        }
        let undetermined = hit.action == Action::Pass
            && s.tier == Tier::Admin
            && matches!(today.admin.action(), Some(Action::Accept | Action::Deny));
        return Some(StagedCnpVerdict {
            policy: s.name.clone(),
            tier: s.tier,
            hit: hit.clone(),
            today: today.allowed,
            with_it: with.allowed,
            undetermined,
        });
    }
    None
}

/// An established flow as the policy sees it: who opened it, and where it went after
/// Service DNAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstablishedFlow {
    /// The original source.
    pub src: IpAddr,
    /// The destination after DNAT.
    pub dst: IpAddr,
    /// TCP, UDP or SCTP; `None` for protocols policies cannot name a port of (ICMP, …).
    pub protocol: Option<Protocol>,
    /// Destination port after DNAT (0 without ports).
    pub port: u16,
    /// The source is one of the node's own addresses: the node's traffic always passes.
    pub from_node: bool,
}

/// What the current rules say about an established flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowJudgement {
    /// Still allowed, or not this node's to judge: leave it alone.
    Keep,
    /// The policies of this direction's local pod no longer allow it.
    Denied(Direction),
    /// This direction's end is a local address no known pod holds any more (its pod is
    /// gone, or it is unknown in the node's pod ranges).
    PodGone(Direction),
}

/// Judge an established flow against `np`, as the ruleset would judge its first packet now:
/// through every tier (Admin ClusterNetworkPolicies, NetworkPolicy, Baseline).
/// `gone` are addresses that local pods held at the previous sync and none holds now.
pub fn judge_flow(
    np: &NodePolicy,
    flow: &EstablishedFlow,
    gone: &std::collections::BTreeSet<IpAddr>,
) -> FlowJudgement {
    if flow.from_node {
        return FlowJudgement::Keep;
    }
    let unknown = |ip: &IpAddr| gone.contains(ip) || np.is_unknown_local(ip);
    if unknown(&flow.src) {
        return FlowJudgement::PodGone(Direction::Egress);
    }
    if unknown(&flow.dst) {
        return FlowJudgement::PodGone(Direction::Ingress);
    }
    let Some(protocol) = flow.protocol else {
        return FlowJudgement::Keep;
    };
    let egress = Connection {
        local: flow.src,
        peer: flow.dst,
        protocol,
        port: flow.port,
    };
    if !decide(np, Direction::Egress, egress).allowed {
        return FlowJudgement::Denied(Direction::Egress);
    }
    let ingress = Connection {
        local: flow.dst,
        peer: flow.src,
        protocol,
        port: flow.port,
    };
    if !decide(np, Direction::Ingress, ingress).allowed {
        return FlowJudgement::Denied(Direction::Ingress);
    }
    FlowJudgement::Keep
}

/// Can `new` deny a connection that `old` allowed? Conservative: `false` only when every
/// difference can only allow more (a peer set or named-port set that only grew, a pod that
/// only gained a known address), so the conntrack pass after a sync can be skipped when it
/// cannot find anything to remove. Most changes in a large cluster are remote pods starting,
/// which only grow peer sets.
pub fn may_deny_more(old: &NodePolicy, new: &NodePolicy) -> bool {
    if old.pod_cidrs != new.pod_cidrs
        || !old.local_addrs.is_subset(&new.local_addrs)
        || old.pods != new.pods
        // Any change to a ClusterNetworkPolicy may deny (a Deny rule's peers growing does).
        || old.cnps != new.cnps
        || old.policies.len() != new.policies.len()
    {
        return true;
    }
    old.policies
        .iter()
        .zip(&new.policies)
        .any(|(a, b)| !policy_only_grew(a, b))
}

fn policy_only_grew(a: &PolicyRules, b: &PolicyRules) -> bool {
    a.policy == b.policy
        && a.direction == b.direction
        && a.selected == b.selected
        && a.invalid == b.invalid
        && a.rules.len() == b.rules.len()
        && a.rules
            .iter()
            .zip(&b.rules)
            .all(|(x, y)| rule_only_grew(x, y))
}

fn rule_only_grew(a: &ResolvedRule, b: &ResolvedRule) -> bool {
    let peers = match (&a.peers, &b.peers) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.len() == y.len()
                && x.iter().zip(y).all(|(p, q)| match (p, q) {
                    (ResolvedPeer::Pods(p), ResolvedPeer::Pods(q)) => {
                        p.scope == q.scope && p.pods == q.pods && p.addrs.is_subset(&q.addrs)
                    }
                    (p @ ResolvedPeer::IpBlock { .. }, q @ ResolvedPeer::IpBlock { .. }) => p == q,
                    _ => false,
                })
        }
        _ => false,
    };
    let ports = match (&a.ports, &b.ports) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.numeric == y.numeric
                && match (&x.named, &y.named) {
                    (None, None) => true,
                    (Some(m), Some(n)) => m.names == n.names && m.targets.is_subset(&n.targets),
                    _ => false,
                }
        }
        _ => false,
    };
    a.index == b.index && peers && ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// A node with range 10.244.1.0/24, one known (not isolated) pod 10.244.1.5.
    fn node() -> NodePolicy {
        NodePolicy {
            node: "n".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
            local_addrs: BTreeSet::from([ip("10.244.1.5")]),
            ..NodePolicy::default()
        }
    }

    #[test]
    fn unknown_addresses_in_the_pod_ranges_are_dropped() {
        let np = node();
        let c = |local: &str| Connection {
            local: ip(local),
            peer: ip("10.0.0.1"),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let cases = [
            ("known pod", "10.244.1.5", Verdict::NotIsolated),
            ("unknown in range", "10.244.1.6", Verdict::UnknownAddress),
            ("outside the range", "10.244.2.6", Verdict::NotIsolated),
        ];
        for (name, local, want) in cases {
            for d in Direction::ALL {
                assert_eq!(evaluate(&np, d, c(local)), want, "{name} {d}");
            }
        }
        assert!(!Verdict::UnknownAddress.passes());
    }

    #[test]
    fn may_deny_more_cases() {
        let base = node();
        let with = |f: &dyn Fn(&mut NodePolicy)| {
            let mut np = node();
            f(&mut np);
            np
        };
        let cases: Vec<(&str, NodePolicy, bool)> = vec![
            ("no change", node(), false),
            (
                "a local pod appeared",
                with(&|np| {
                    np.local_addrs.insert(ip("10.244.1.6"));
                }),
                false,
            ),
            (
                "a local pod went",
                with(&|np| {
                    np.local_addrs.clear();
                }),
                true,
            ),
            (
                "the pod ranges changed",
                with(&|np| np.pod_cidrs.clear()),
                true,
            ),
            (
                "a pod became isolated",
                with(&|np| {
                    np.pods.push(crate::engine::resolve::LocalPod {
                        key: ObjectKey::new("a", "p"),
                        ips: vec![ip("10.244.1.5")],
                        ingress: Some(vec![ObjectKey::new("a", "deny")]),
                        egress: None,
                        cnps: Default::default(),
                    })
                }),
                true,
            ),
        ];
        for (name, new, want) in cases {
            assert_eq!(may_deny_more(&base, &new), want, "{name}");
        }
    }

    #[test]
    fn judge_flow_cases() {
        let np = node();
        let gone = BTreeSet::from([ip("10.9.9.9")]);
        let flow = |src: &str, dst: &str, from_node: bool| EstablishedFlow {
            src: ip(src),
            dst: ip(dst),
            protocol: Some(Protocol::Tcp),
            port: 80,
            from_node,
        };
        let cases = [
            (
                "known to outside",
                flow("10.244.1.5", "8.8.8.8", false),
                FlowJudgement::Keep,
            ),
            (
                "from an unknown address",
                flow("10.244.1.7", "8.8.8.8", false),
                FlowJudgement::PodGone(Direction::Egress),
            ),
            (
                "to an unknown address",
                flow("8.8.8.8", "10.244.1.7", false),
                FlowJudgement::PodGone(Direction::Ingress),
            ),
            (
                "to a gone pod outside the ranges",
                flow("10.244.1.5", "10.9.9.9", false),
                FlowJudgement::PodGone(Direction::Ingress),
            ),
            (
                "the node's own traffic",
                flow("10.244.1.1", "10.244.1.7", true),
                FlowJudgement::Keep,
            ),
        ];
        for (name, f, want) in cases {
            assert_eq!(judge_flow(&np, &f, &gone), want, "{name}");
        }
    }
}
