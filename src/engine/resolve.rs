//! Turn a cluster snapshot into what one node must enforce.
//!
//! Pure: snapshot + node name → [`NodePolicy`]. This is where the NetworkPolicy semantics
//! live: which local pods are isolated and by which policies, every peer selector turned into
//! addresses, every named port turned into concrete (address, protocol, port) tuples on the
//! pod that owns it. The compiler after this step only decides how to say it in nftables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use crate::engine::index::Snapshot;
use crate::model::cidr::subtract;
use crate::model::policy::Direction;
use crate::model::{
    Action, Cidr, ClusterPolicy, CnpPeer, CnpPort, IpBlock, Labels, NAMESPACE_NAME_LABEL,
    NamespaceScope, ObjectKey, Peer, PodInfo, PortMatch, Protocol, RuleMatch, Selector, Tier,
};

/// Everything one node enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// The node.
    pub node: String,
    /// Local pods isolated in at least one direction, sorted by key.
    pub pods: Vec<LocalPod>,
    /// Rules of each (policy, direction) that selects at least one local pod, sorted.
    pub policies: Vec<PolicyRules>,
    /// Rules of each (ClusterNetworkPolicy, direction) with rules whose subject includes at
    /// least one local pod, in evaluation order (tier, priority, name, direction).
    pub cnps: Vec<CnpRules>,
    /// This node's pod address ranges in which an address that is not a known local pod is
    /// dropped (fail closed). Empty when the ranges are unknown or the rule is off; set by
    /// [`crate::engine::compile::node_policy`] from the options (`--pod-cidr`,
    /// `--unknown-addresses`).
    pub pod_cidrs: Vec<Cidr>,
    /// Every address of every local pod that takes part in policy (isolated or not): the
    /// addresses the fail-closed rule lets through.
    pub local_addrs: BTreeSet<IpAddr>,
    /// Rules of each staged (not enforced) NetworkPolicy and direction that selects at least
    /// one local pod, sorted like `policies`. Nothing else reads them as enforced: they only
    /// feed the would-deny/would-allow counters and `explain`.
    pub staged: Vec<PolicyRules>,
    /// Rules of each staged ClusterNetworkPolicy and direction whose subject includes at
    /// least one local pod, in evaluation order like `cnps`. Not enforced: they only feed the
    /// staged counters (through a packet mark, see compile.rs) and `explain`.
    pub staged_cnps: Vec<CnpRules>,
}

impl NodePolicy {
    /// Is `ip` in this node's pod ranges without being a known local pod (so dropped)?
    pub fn is_unknown_local(&self, ip: &IpAddr) -> bool {
        !self.local_addrs.contains(ip) && self.pod_cidrs.iter().any(|c| c.contains(ip))
    }
}

/// A pod on this node that some NetworkPolicy isolates or some ClusterNetworkPolicy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// Namespace/name.
    pub key: ObjectKey,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Policies isolating it for ingress (`None` = not isolated), sorted.
    pub ingress: Option<Vec<ObjectKey>>,
    /// Policies isolating it for egress.
    pub egress: Option<Vec<ObjectKey>>,
    /// ClusterNetworkPolicies whose subject it is, per tier and direction.
    pub cnps: TierMembership,
}

/// The ClusterNetworkPolicies (by name, in evaluation order) that apply to one pod, per tier
/// and direction; only policies with rules for that direction are listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierMembership {
    lists: [Vec<String>; 4],
}

fn slot(tier: Tier, d: Direction) -> usize {
    (match tier {
        Tier::Admin => 0,
        Tier::Baseline => 2,
    }) + match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl TierMembership {
    /// The policies of one tier and direction, in order.
    pub fn get(&self, tier: Tier, d: Direction) -> &[String] {
        &self.lists[slot(tier, d)]
    }

    /// Append the next policy of a tier and direction.
    pub fn push(&mut self, tier: Tier, d: Direction, name: String) {
        self.lists[slot(tier, d)].push(name);
    }

    /// Does any ClusterNetworkPolicy apply in this direction?
    pub fn any(&self, d: Direction) -> bool {
        !self.get(Tier::Admin, d).is_empty() || !self.get(Tier::Baseline, d).is_empty()
    }

    /// Does any apply at all?
    pub fn is_empty(&self) -> bool {
        self.lists.iter().all(Vec::is_empty)
    }
}

/// The rules of one ClusterNetworkPolicy in one direction, shared by the local pods it
/// applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpRules {
    /// The policy's name.
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// Its priority.
    pub priority: u16,
    /// Direction.
    pub direction: Direction,
    /// Local pods it applies to.
    pub selected: Vec<ObjectKey>,
    /// The rules, in spec order.
    pub rules: Vec<ResolvedCnpRule>,
}

impl CnpRules {
    /// `Admin priority 10 allow-monitoring`, for comments and explanations.
    pub fn describe(&self) -> String {
        format!(
            "{} ClusterNetworkPolicy {} (priority {})",
            self.tier, self.name, self.priority
        )
    }
}

/// One ClusterNetworkPolicy rule with its peers and ports resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCnpRule {
    /// Position in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// `name` as written (may be empty).
    pub name: String,
    /// The action as written.
    pub written: Action,
    /// The action that takes effect (a rule failing closed as "deny all" denies).
    pub action: Action,
    /// What it matches.
    pub matches: ResolvedCnpMatch,
}

impl ResolvedCnpRule {
    /// `spec.ingress[1]` or `spec.ingress[1] (name)`.
    pub fn label(&self, d: Direction) -> String {
        if self.name.is_empty() {
            format!("spec.{d}[{}]", self.index)
        } else {
            format!("spec.{d}[{}] ({})", self.index, self.name)
        }
    }
}

/// What a resolved ClusterNetworkPolicy rule matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedCnpMatch {
    /// Fails closed: no traffic.
    Nothing(String),
    /// Fails closed: all traffic.
    Everything(String),
    /// Traffic with one of these peers on one of these ports (`None` = any port).
    Peers {
        /// `from`/`to`, resolved.
        peers: Vec<ResolvedCnpPeer>,
        /// `protocols`, resolved.
        ports: Option<ResolvedPorts>,
    },
}

/// A ClusterNetworkPolicy peer turned into addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedCnpPeer {
    /// `namespaces` or `pods`: the pods they match (shared with NetworkPolicy peers).
    Pods(Arc<PeerPods>),
    /// `nodes`: the addresses of the nodes the selector matches.
    Nodes {
        /// The selector.
        selector: Selector,
        /// Matched node names.
        members: Vec<String>,
        /// Their addresses.
        addrs: BTreeSet<IpAddr>,
    },
    /// `networks`.
    Networks(Vec<Cidr>),
    /// `domainNames`: not supported, matches nothing.
    DomainNames(Vec<String>),
}

impl LocalPod {
    /// Isolating policies for one direction.
    pub fn isolated_by(&self, d: Direction) -> Option<&[ObjectKey]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// The allow rules of one policy in one direction, shared by all local pods it selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRules {
    /// The policy.
    pub policy: ObjectKey,
    /// Direction.
    pub direction: Direction,
    /// Local pods it selects.
    pub selected: Vec<ObjectKey>,
    /// Set when the policy is invalid (then `rules` is empty).
    pub invalid: Option<String>,
    /// The rules, in spec order.
    pub rules: Vec<ResolvedRule>,
}

/// One ingress/egress rule with peers and ports resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRule {
    /// Position in `spec.ingress`/`spec.egress`.
    pub index: usize,
    /// `None` = every peer.
    pub peers: Option<Vec<ResolvedPeer>>,
    /// `None` = every port.
    pub ports: Option<ResolvedPorts>,
}

/// A peer turned into addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolvedPeer {
    /// Pods matched by a selector pair.
    Pods(Arc<PeerPods>),
    /// An ipBlock with its excepts cut out.
    IpBlock {
        /// The block as written.
        block: IpBlock,
        /// Disjoint prefixes covering cidr minus excepts.
        ranges: Vec<Cidr>,
    },
}

/// The addresses of the pods one selector pair matches, shared between every rule that uses
/// the same pair. (Which pods they are is not kept: an incremental edit asks the selectors.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPods {
    /// The selector pair (canonical identity of the set).
    pub scope: NamespaceScope,
    /// Pod selector.
    pub pods: Selector,
    /// Their addresses.
    pub addrs: BTreeSet<IpAddr>,
}

impl PeerPods {
    /// Readable description, e.g. `pods app=web in namespaces team=a`.
    pub fn describe(&self) -> String {
        crate::model::policy::describe_pods(&self.scope, &self.pods)
    }
}

/// Ports of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedPorts {
    /// Numeric ports as merged, sorted inclusive ranges (a protocol with no port is 0-65535).
    pub numeric: Vec<(Protocol, u16, u16)>,
    /// Named ports, if the rule has any.
    pub named: Option<NamedTargets>,
}

/// Named ports resolved on the pods that own them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedTargets {
    /// The names as written, with protocol.
    pub names: Vec<(Protocol, String)>,
    /// (destination pod address, protocol, port) for every pod that declares the name.
    pub targets: BTreeSet<(IpAddr, Protocol, u16)>,
}

/// Labels a namespace selector sees for `ns`, even when the Namespace object is unknown.
pub(crate) fn namespace_labels(snapshot: &Snapshot, ns: &str) -> Labels {
    match snapshot.namespaces.get(&ns.to_string()) {
        Some(info) => info.labels.clone(),
        None => Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]),
    }
}

/// The NetworkPolicies of one namespace, in key order.
pub(crate) fn policies_in<'s>(
    snapshot: &'s Snapshot,
    ns: &str,
) -> Vec<(&'s ObjectKey, &'s Arc<crate::model::Policy>)> {
    snapshot
        .policies
        .range(ObjectKey::new(ns, "")..)
        .take_while(|(k, _)| k.namespace == ns)
        .collect()
}

/// The namespaces pods live in, each once, in order: one seek per namespace rather than a
/// visit of every pod.
fn pod_namespaces(snapshot: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut from = ObjectKey::new("", "");
    while let Some((k, _)) = snapshot.pods.range(from.clone()..).next() {
        out.push(k.namespace.clone());
        // Names cannot hold NUL, so this is the first key of any later namespace.
        from = ObjectKey::new(format!("{}\0", k.namespace), "");
    }
    out
}

/// The policy-target pods of one namespace, with a label index built on first use, so a
/// selector with `matchLabels` visits only the pods carrying one of its labels instead of
/// every pod of the namespace.
struct NamespacePods<'a> {
    /// In key order.
    pods: Vec<&'a Arc<PodInfo>>,
    /// (hash of a label's key and value, position in `pods`), sorted. A lookup takes the
    /// positions of one hash: a superset of the pods carrying that label (another label may
    /// share the hash), which the selector check then narrows. One flat allocation per
    /// namespace instead of a map with a vector per label: at 100,000 pods building the maps
    /// was a fifth of a full resolve.
    by_label: Option<Vec<(u64, u32)>>,
}

/// The label index's hash: fixed, so the same cluster always resolves the same way.
fn label_hash(key: &str, value: &str) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    key.hash(&mut h);
    value.hash(&mut h);
    h.finish()
}

impl<'a> NamespacePods<'a> {
    /// The pods `sel` matches, in key order.
    fn matching(&mut self, sel: &Selector, mut f: impl FnMut(&'a Arc<PodInfo>)) {
        let Some((k, v)) = sel.match_labels.iter().next() else {
            for pod in self.pods.iter().filter(|p| sel.matches(&p.labels)) {
                f(pod);
            }
            return;
        };
        // Small namespaces are cheaper to scan than to index.
        if self.pods.len() < 16 {
            for pod in self.pods.iter().filter(|p| sel.matches(&p.labels)) {
                f(pod);
            }
            return;
        }
        let pods = &self.pods;
        let index = self.by_label.get_or_insert_with(|| {
            let mut index: Vec<(u64, u32)> = pods
                .iter()
                .enumerate()
                .flat_map(|(i, pod)| {
                    pod.labels
                        .iter()
                        .map(move |(lk, lv)| (label_hash(lk, lv), i as u32))
                })
                .collect();
            index.sort_unstable();
            index
        });
        // Every matching pod carries the first `matchLabels` pair; check the whole selector
        // on those (in position order: the index is sorted by hash, then position).
        let h = label_hash(k, v);
        let from = index.partition_point(|(x, _)| *x < h);
        let mut last = None;
        for (_, i) in index[from..].iter().take_while(|(x, _)| *x == h) {
            // Two labels of one pod sharing the hash would list it twice, side by side.
            if last.replace(*i) == Some(*i) {
                continue;
            }
            let pod = pods[*i as usize];
            if sel.matches(&pod.labels) {
                f(pod);
            }
        }
    }
}

/// Resolves peers against one snapshot, remembering each selector pair it has resolved.
///
/// What it learns of the snapshot (namespace names and labels, each namespace's pods and
/// their label index) is gathered on first use and kept for the resolver's life, so resolving
/// a selector costs in proportion to the namespaces and pods it can match, and an
/// incremental update that resolves one new selector touches only its namespaces.
pub(crate) struct Resolver<'a> {
    snapshot: &'a Snapshot,
    /// Every namespace name (declared ones and those only pods mention), with the labels a
    /// namespace selector sees; computed when a namespace selector first needs it.
    namespaces: Option<Vec<(String, Labels)>>,
    /// Each namespace's policy-target pods, gathered when first needed.
    pods: HashMap<String, NamespacePods<'a>>,
    /// The namespaces each namespace selector matches: many peers share one selector (every
    /// `prod` namespace, say), and it is checked against every namespace once.
    selected_namespaces: HashMap<Selector, Arc<[String]>>,
    peers: BTreeMap<(NamespaceScope, Selector), Arc<PeerPods>>,
    /// Egress named-port targets per selector pair and port names.
    named: NamedByPeer,
}

/// Egress named-port targets of one selector pair for a list of port names.
type NamedByPeer =
    BTreeMap<(NamespaceScope, Selector, Vec<(Protocol, String)>), Arc<BTreeSet<NamedTarget>>>;

impl<'a> Resolver<'a> {
    /// A resolver that already knows some selector pairs (they must match `snapshot`).
    pub(crate) fn new(
        snapshot: &'a Snapshot,
        peers: BTreeMap<(NamespaceScope, Selector), Arc<PeerPods>>,
    ) -> Self {
        Self {
            snapshot,
            namespaces: None,
            pods: HashMap::new(),
            selected_namespaces: HashMap::new(),
            peers,
            named: BTreeMap::new(),
        }
    }

    fn namespaces(&mut self) -> &[(String, Labels)] {
        let snapshot = self.snapshot;
        self.namespaces.get_or_insert_with(|| {
            let mut names: BTreeSet<String> =
                snapshot.namespaces.iter().map(|(k, _)| k.clone()).collect();
            names.extend(pod_namespaces(snapshot));
            names
                .into_iter()
                .map(|ns| {
                    let labels = namespace_labels(snapshot, &ns);
                    (ns, labels)
                })
                .collect()
        })
    }

    /// The policy-target pods of `ns`.
    fn namespace_pods(&mut self, ns: &str) -> &mut NamespacePods<'a> {
        let snapshot = self.snapshot;
        // Looked up before inserting: `entry` would allocate the key on every visit.
        if !self.pods.contains_key(ns) {
            let start = ObjectKey::new(ns, "");
            let pods = NamespacePods {
                pods: snapshot
                    .pods
                    .range(start..)
                    .take_while(|(k, _)| k.namespace == ns)
                    .map(|(_, p)| p)
                    .filter(|p| p.is_policy_target())
                    .collect(),
                by_label: None,
            };
            self.pods.insert(ns.to_string(), pods);
        }
        self.pods
            .get_mut(ns)
            .expect("inserted just above when missing")
    }

    fn matching_namespaces(&mut self, scope: &NamespaceScope) -> Arc<[String]> {
        match scope {
            NamespaceScope::Own(ns) => Arc::from([ns.clone()]),
            NamespaceScope::Selector(sel) => {
                if let Some(hit) = self.selected_namespaces.get(sel) {
                    return hit.clone();
                }
                let found: Arc<[String]> = self
                    .namespaces()
                    .iter()
                    .filter(|(_, labels)| sel.matches(labels))
                    .map(|(ns, _)| ns.clone())
                    .collect();
                self.selected_namespaces.insert(sel.clone(), found.clone());
                found
            }
        }
    }

    fn peer_pods(&mut self, scope: &NamespaceScope, pods: &Selector) -> Arc<PeerPods> {
        let key = (scope.clone(), pods.clone());
        if let Some(hit) = self.peers.get(&key) {
            return hit.clone();
        }
        // Collected, then sorted and built in one go: far cheaper than inserting one by one.
        let mut found: Vec<IpAddr> = Vec::new();
        for ns in self.matching_namespaces(scope).iter() {
            self.namespace_pods(ns).matching(pods, |pod| {
                found.extend(pod.ips.iter().copied());
            });
        }
        found.sort_unstable();
        found.dedup();
        let addrs: BTreeSet<IpAddr> = found.into_iter().collect();
        let resolved = Arc::new(PeerPods {
            scope: scope.clone(),
            pods: pods.clone(),
            addrs,
        });
        self.peers.insert(key, resolved.clone());
        resolved
    }

    /// The nodes a `nodes` peer selects and their addresses.
    fn node_addrs(&mut self, sel: &Selector) -> (Vec<String>, BTreeSet<IpAddr>) {
        let mut members = Vec::new();
        let mut addrs = BTreeSet::new();
        for (name, node) in self.snapshot.nodes.iter() {
            if sel.matches(&node.labels) {
                members.push(name.clone());
                addrs.extend(node.addresses.iter().copied());
            }
        }
        (members, addrs)
    }

    /// Egress named ports resolve on the peer (destination) pods: the (address, protocol,
    /// port) targets of every pod the given pod peers match (`None`: every pod in the
    /// cluster, for a rule with no peers). Each peer's targets are computed once per
    /// resolver and names, from the namespace pods it matches (no lookups by key).
    fn egress_named_targets(
        &mut self,
        peers: Option<Vec<(NamespaceScope, Selector)>>,
        names: &[(Protocol, String)],
    ) -> NamedTargets {
        let Some(peers) = peers else {
            let all = self
                .snapshot
                .pods
                .iter()
                .map(|(_, p)| p)
                .filter(|p| p.is_policy_target());
            return named_targets(names, all);
        };
        let mut targets = BTreeSet::new();
        for (scope, sel) in peers {
            let key = (scope, sel, names.to_vec());
            let of_peer = match self.named.get(&key) {
                Some(hit) => hit.clone(),
                None => {
                    let mut found = BTreeSet::new();
                    for ns in self.matching_namespaces(&key.0).iter() {
                        self.namespace_pods(ns).matching(&key.1, |pod| {
                            found.extend(pod_targets(pod, names));
                        });
                    }
                    let found = Arc::new(found);
                    self.named.insert(key, found.clone());
                    found
                }
            };
            if targets.is_empty() {
                targets = (*of_peer).clone();
            } else {
                targets.extend(of_peer.iter().copied());
            }
        }
        NamedTargets {
            names: names.to_vec(),
            targets,
        }
    }
}

/// A named-port target: destination address, protocol, port.
pub(crate) type NamedTarget = (IpAddr, Protocol, u16);

/// The targets one pod contributes for a list of port names.
pub(crate) fn pod_targets(
    pod: &PodInfo,
    names: &[(Protocol, String)],
) -> impl Iterator<Item = NamedTarget> {
    names.iter().flat_map(move |(proto, name)| {
        let port = pod.resolve_named_port(name, *proto);
        pod.ips
            .iter()
            .filter(move |_| port.is_some())
            .map(move |ip| (*ip, *proto, port.unwrap_or_default()))
    })
}

fn merge_ranges(mut v: Vec<(Protocol, u16, u16)>) -> Vec<(Protocol, u16, u16)> {
    v.sort();
    let mut out: Vec<(Protocol, u16, u16)> = Vec::with_capacity(v.len());
    for (p, lo, hi) in v {
        match out.last_mut() {
            Some((lp, _, lhi)) if *lp == p && u32::from(lo) <= u32::from(*lhi) + 1 => {
                *lhi = (*lhi).max(hi);
            }
            _ => out.push((p, lo, hi)),
        }
    }
    out
}

fn named_targets(
    names: &[(Protocol, String)],
    pods: impl IntoIterator<Item = impl AsRef<PodInfo>>,
) -> NamedTargets {
    let mut targets = BTreeSet::new();
    for pod in pods {
        targets.extend(pod_targets(pod.as_ref(), names));
    }
    NamedTargets {
        names: names.to_vec(),
        targets,
    }
}

/// Compute what `node` enforces.
pub fn resolve(snapshot: &Snapshot, node: &str) -> NodePolicy {
    let mut r = Resolver::new(snapshot, BTreeMap::new());

    // Local pods that policy can apply to.
    let local: Vec<&Arc<PodInfo>> = snapshot
        .pods
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.is_policy_target() && p.node.as_deref() == Some(node))
        .collect();

    let mut isolation: BTreeMap<ObjectKey, [Option<Vec<ObjectKey>>; 2]> = BTreeMap::new();
    let mut policies = Vec::new();
    let mut staged = Vec::new();
    // Local pods some staged policy selects: they get pod chains even when nothing isolates
    // them, for the would-deny check.
    let mut staged_pods: BTreeSet<ObjectKey> = BTreeSet::new();
    // A policy selects pods of its own namespace only: visit the policies of the namespaces
    // with local pods (in key order, as a walk of every policy would), not all of them.
    let mut local_by_ns: BTreeMap<&str, Vec<&Arc<PodInfo>>> = BTreeMap::new();
    for p in &local {
        local_by_ns
            .entry(p.key.namespace.as_str())
            .or_default()
            .push(p);
    }
    for (key, policy) in local_by_ns.keys().flat_map(|ns| policies_in(snapshot, ns)) {
        let selected: Vec<&Arc<PodInfo>> = local_by_ns[key.namespace.as_str()]
            .iter()
            .copied()
            .filter(|p| policy.pod_selector.matches(&p.labels))
            .collect();
        if selected.is_empty() {
            continue;
        }
        for (di, direction) in Direction::ALL.into_iter().enumerate() {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            if policy.staged {
                staged_pods.extend(selected.iter().map(|p| p.key.clone()));
                staged.push(resolve_policy(&mut r, policy, direction, rules, &selected));
                continue;
            }
            for pod in &selected {
                isolation.entry(pod.key.clone()).or_default()[di]
                    .get_or_insert_with(Vec::new)
                    .push(key.clone());
            }
            policies.push(resolve_policy(&mut r, policy, direction, rules, &selected));
        }
    }

    let (cnps, staged_cnps, mut membership) = resolve_cnps(&mut r, snapshot, &local);
    staged_pods.extend(staged_cnps.iter().flat_map(|c| c.selected.iter().cloned()));

    let pods = local
        .iter()
        .filter_map(|p| {
            let cnps = membership.remove(&p.key).unwrap_or_default();
            let [ingress, egress] = isolation.remove(&p.key).unwrap_or_default();
            if ingress.is_none()
                && egress.is_none()
                && cnps.is_empty()
                && !staged_pods.contains(&p.key)
            {
                return None;
            }
            Some(LocalPod {
                key: p.key.clone(),
                ips: p.ips.clone(),
                ingress,
                egress,
                cnps,
            })
        })
        .collect();
    NodePolicy {
        node: node.to_string(),
        pods,
        policies,
        cnps,
        // The Node object's `spec.podCIDRs`; `compile::node_policy` applies the options.
        pod_cidrs: snapshot
            .nodes
            .get(&node.to_string())
            .map(|n| n.pod_cidrs.clone())
            .unwrap_or_default(),
        local_addrs: local.iter().flat_map(|p| p.ips.iter().copied()).collect(),
        staged,
        staged_cnps,
    }
}

/// Does a ClusterNetworkPolicy's subject include a pod with these namespace and pod labels?
/// (Host-network and finished pods are never subjects; callers pass policy targets only.)
pub(crate) fn subject_matches(subject: &crate::model::Subject, ns: &Labels, pod: &Labels) -> bool {
    match subject {
        crate::model::Subject::Namespaces(sel) => sel.matches(ns),
        crate::model::Subject::Pods { namespaces, pods } => {
            pods.matches(pod) && namespaces.matches(ns)
        }
    }
}

/// Every ClusterNetworkPolicy that applies to a local pod, in evaluation order, with the
/// pods it applies to per tier and direction; and the staged ones, apart.
fn resolve_cnps(
    r: &mut Resolver<'_>,
    snapshot: &Snapshot,
    local: &[&Arc<PodInfo>],
) -> (
    Vec<CnpRules>,
    Vec<CnpRules>,
    BTreeMap<ObjectKey, TierMembership>,
) {
    let mut ordered: Vec<&Arc<ClusterPolicy>> = snapshot.cnps.iter().map(|(_, c)| c).collect();
    ordered.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let mut out = Vec::new();
    let mut membership: BTreeMap<ObjectKey, TierMembership> = BTreeMap::new();
    // Each local pod's namespace labels, looked up once (every policy asks).
    let ns_labels: Vec<Labels> = local
        .iter()
        .map(|p| namespace_labels(snapshot, &p.key.namespace))
        .collect();
    let mut staged = Vec::new();
    for cnp in ordered {
        // A staged ClusterNetworkPolicy is not enforced, only measured (docs/semantics.md).
        if cnp.staged {
            staged.extend(resolve_cnp_rules(r, cnp, local, &ns_labels));
            continue;
        }
        for cr in resolve_cnp(r, cnp, local, &ns_labels) {
            for p in &cr.selected {
                membership.entry(p.clone()).or_default().push(
                    cnp.tier,
                    cr.direction,
                    cnp.name.clone(),
                );
            }
            out.push(cr);
        }
    }
    (out, staged, membership)
}

/// One ClusterNetworkPolicy for the local pods its subject takes in (`ns_labels`: each local
/// pod's namespace labels), per direction it has rules for; nothing when it selects none of
/// them or is staged (a staged ClusterNetworkPolicy is not enforced, only measured:
/// docs/semantics.md).
pub(crate) fn resolve_cnp(
    r: &mut Resolver<'_>,
    cnp: &ClusterPolicy,
    local: &[&Arc<PodInfo>],
    ns_labels: &[Labels],
) -> Vec<CnpRules> {
    if cnp.staged {
        return Vec::new();
    }
    resolve_cnp_rules(r, cnp, local, ns_labels)
}

/// [`resolve_cnp`] whether staged or not.
fn resolve_cnp_rules(
    r: &mut Resolver<'_>,
    cnp: &ClusterPolicy,
    local: &[&Arc<PodInfo>],
    ns_labels: &[Labels],
) -> Vec<CnpRules> {
    let selected: Vec<&Arc<PodInfo>> = local
        .iter()
        .zip(ns_labels)
        .filter(|(p, ns)| subject_matches(&cnp.subject, ns, &p.labels))
        .map(|(p, _)| *p)
        .collect();
    if selected.is_empty() {
        return Vec::new();
    }
    Direction::ALL
        .into_iter()
        // No rules for a direction: no effect on it.
        .filter(|d| !cnp.rules(*d).is_empty())
        .map(|d| CnpRules {
            name: cnp.name.clone(),
            tier: cnp.tier,
            priority: cnp.priority,
            direction: d,
            selected: selected.iter().map(|p| p.key.clone()).collect(),
            rules: cnp
                .rules(d)
                .iter()
                .map(|rule| resolve_cnp_rule(r, d, rule, &selected))
                .collect(),
        })
        .collect()
}

const ALL_PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

pub(crate) fn resolve_cnp_rule(
    r: &mut Resolver<'_>,
    d: Direction,
    rule: &crate::model::CnpRule,
    selected: &[&Arc<PodInfo>],
) -> ResolvedCnpRule {
    let matches = match &rule.matches {
        RuleMatch::Nothing { reason } => ResolvedCnpMatch::Nothing(reason.clone()),
        RuleMatch::Everything { reason } => ResolvedCnpMatch::Everything(reason.clone()),
        RuleMatch::Peers { peers, ports } => {
            let resolved: Vec<ResolvedCnpPeer> = peers
                .iter()
                .map(|p| match p {
                    CnpPeer::Namespaces(ns) => ResolvedCnpPeer::Pods(r.peer_pods(
                        &NamespaceScope::Selector(ns.clone()),
                        &Selector::everything(),
                    )),
                    CnpPeer::Pods { namespaces, pods } => ResolvedCnpPeer::Pods(
                        r.peer_pods(&NamespaceScope::Selector(namespaces.clone()), pods),
                    ),
                    CnpPeer::Nodes(sel) => {
                        let (members, addrs) = r.node_addrs(sel);
                        ResolvedCnpPeer::Nodes {
                            selector: sel.clone(),
                            members,
                            addrs,
                        }
                    }
                    CnpPeer::Networks(c) => ResolvedCnpPeer::Networks(c.clone()),
                    CnpPeer::DomainNames(n) => ResolvedCnpPeer::DomainNames(n.clone()),
                })
                .collect();
            let ports = ports.as_ref().map(|list| {
                let mut numeric = Vec::new();
                let mut names = Vec::new();
                for p in list {
                    match p {
                        CnpPort::Ports(proto, lo, hi) => numeric.push((*proto, *lo, *hi)),
                        // No protocol is written: the name resolves with whichever protocol
                        // the destination pod declares it.
                        CnpPort::Named(n) => {
                            names.extend(ALL_PROTOCOLS.iter().map(|proto| (*proto, n.clone())));
                        }
                    }
                }
                names.sort();
                names.dedup();
                let named = (!names.is_empty()).then(|| match d {
                    // Ingress: the destination is the subject pod itself.
                    Direction::Ingress => {
                        named_targets(&names, selected.iter().map(|p| (*p).clone()))
                    }
                    // Egress: the destination is a peer pod (computed only here: a peer
                    // may hold thousands of pods).
                    Direction::Egress => {
                        let pod_peers = resolved
                            .iter()
                            .filter_map(|p| match p {
                                ResolvedCnpPeer::Pods(pp) => {
                                    Some((pp.scope.clone(), pp.pods.clone()))
                                }
                                _ => None,
                            })
                            .collect();
                        r.egress_named_targets(Some(pod_peers), &names)
                    }
                });
                ResolvedPorts {
                    numeric: merge_ranges(numeric),
                    named,
                }
            });
            ResolvedCnpMatch::Peers {
                peers: resolved,
                ports,
            }
        }
    };
    ResolvedCnpRule {
        index: rule.index,
        name: rule.name.clone(),
        written: rule.action,
        action: rule.effective_action(),
        matches,
    }
}

/// The rules of one policy in one direction, for the local pods it selects.
pub(crate) fn resolve_policy(
    r: &mut Resolver<'_>,
    policy: &crate::model::Policy,
    direction: Direction,
    rules: &[crate::model::Rule],
    selected: &[&Arc<PodInfo>],
) -> PolicyRules {
    PolicyRules {
        policy: policy.key.clone(),
        direction,
        selected: selected.iter().map(|p| p.key.clone()).collect(),
        invalid: policy.invalid.as_ref().map(ToString::to_string),
        rules: rules
            .iter()
            .enumerate()
            .map(|(index, rule)| resolve_rule(r, direction, index, rule, selected))
            .collect(),
    }
}

fn resolve_rule(
    r: &mut Resolver<'_>,
    direction: Direction,
    index: usize,
    rule: &crate::model::Rule,
    selected: &[&Arc<PodInfo>],
) -> ResolvedRule {
    let peers = rule.peers.as_ref().map(|list| {
        list.iter()
            .map(|p| match p {
                Peer::Pods { namespaces, pods } => {
                    ResolvedPeer::Pods(r.peer_pods(namespaces, pods))
                }
                Peer::IpBlock(block) => ResolvedPeer::IpBlock {
                    ranges: subtract(&block.cidr, &block.except),
                    block: block.clone(),
                },
            })
            .collect()
    });
    let ports = rule.ports.as_ref().map(|list| {
        let mut numeric = Vec::new();
        let mut names = Vec::new();
        for spec in list {
            match &spec.port {
                PortMatch::All => numeric.push((spec.protocol, 0, u16::MAX)),
                PortMatch::Range(lo, hi) => numeric.push((spec.protocol, *lo, *hi)),
                PortMatch::Named(n) => names.push((spec.protocol, n.clone())),
            }
        }
        names.sort();
        names.dedup();
        let named = (!names.is_empty()).then(|| match direction {
            // Ingress: the destination is the selected pod itself.
            Direction::Ingress => named_targets(&names, selected.iter().map(|p| (*p).clone())),
            // Egress: the destination is the peer pod.
            Direction::Egress => {
                let pod_peers = rule.peers.as_ref().map(|list| {
                    list.iter()
                        .filter_map(|p| match p {
                            Peer::Pods { namespaces, pods } => {
                                Some((namespaces.clone(), pods.clone()))
                            }
                            Peer::IpBlock(_) => None,
                        })
                        .collect()
                });
                r.egress_named_targets(pod_peers, &names)
            }
        });
        ResolvedPorts {
            numeric: merge_ranges(numeric),
            named,
        }
    });
    ResolvedRule {
        index,
        peers,
        ports,
    }
}
