//! Keep one node's resolved policy and ruleset current as single objects change, redoing only
//! the work a change touches.
//!
//! A full resolve + compile walks every policy and resolves every peer selector the node
//! uses. Most changes in a large cluster are much smaller than that, and each kind is edited
//! in place by [`NodeCompiler`]:
//!
//! - a pod on *another* node can only move its addresses in and out of peer sets and egress
//!   named-port sets: it is matched against each peer selector the node uses and just the
//!   affected set elements are edited;
//! - a pod on *this* node also re-resolves the policies of its namespace (and the
//!   ClusterNetworkPolicies) that select it, before or after, and rewrites its own chains,
//!   its dispatch-map entries and those policies' chains;
//! - a NetworkPolicy or ClusterNetworkPolicy added, changed or deleted is re-resolved (its
//!   peers come from those already resolved; a new selector is resolved against the
//!   snapshot) and the local pods it selects, before or after, redo their chains; sets that
//!   no chain registers any more go;
//! - a namespace relabel moves that namespace's pods only in the peers whose namespace
//!   selector's verdict on it flipped, and re-resolves the ClusterNetworkPolicies whose
//!   subject takes in its local pods.
//!
//! A relist, a Node change, a namespace changed together with pods, more than
//! `MAX_INCREMENTAL_OBJECTS` objects, and changes that could move egress named ports of a
//! ClusterNetworkPolicy (resolved on peer pods and not tracked per pod) take the full path.
//!
//! Pure, like the rest of the core. The result is always equal to a full
//! `compile(resolve(snapshot))`; `tests/incremental.rs` checks that on random change sequences
//! of every kind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::engine::compile::{
    CnpPass, CompileOptions, PolicyFacts, SetOrigins, Sets, cnp_chain, cnp_chain_name,
    cnp_deny_chain_name, compile_with_identities, dispatch_map_name, drop_chain_name,
    local_pods_elements, local_pods_set_name, named_set_elements, node_policy, pod_chain_name,
    pod_chains, policy_chain, policy_chain_name, tier_chain_name,
};
use crate::engine::index::{Changes, Snapshot};
use crate::engine::resolve::{
    CnpRules, LocalPod, NamedTarget, NamedTargets, NodePolicy, PeerPods, ResolvedCnpMatch,
    ResolvedCnpPeer, ResolvedPeer, Resolver, TierMembership, namespace_labels, pod_targets,
    policies_in, resolve_cnp, resolve_policy, subject_matches,
};
use crate::engine::ruleset::{Chain, ChainRole, Element, Ruleset, Set, addr_element};
use crate::model::policy::Direction;
use crate::model::{
    Action, Family, Labels, NamespaceScope, ObjectKey, PodInfo, Policy, Protocol, Selector, Tier,
};
use compact_str::format_compact;
use smallvec::SmallVec;

/// More pod and policy changes than this in one update are cheaper to redo from scratch.
const MAX_INCREMENTAL_OBJECTS: usize = 256;

/// What a batch of changes leaves to redo on this node: policies to re-resolve (both
/// directions) and local pods whose isolation, chains and dispatch entries to rewrite.
#[derive(Debug, Default)]
struct Redo {
    policies: BTreeSet<ObjectKey>,
    /// ClusterNetworkPolicies to re-resolve (both directions).
    cnps: BTreeSet<String>,
    pods: BTreeSet<ObjectKey>,
}

impl Redo {
    fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.cnps.is_empty() && self.pods.is_empty()
    }
}

/// How an update was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// Nothing changed.
    Unchanged,
    /// Only what the changed pods touch was edited.
    Incremental,
    /// Resolved and compiled from scratch.
    Full,
}

impl UpdateKind {
    /// Label value for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Unchanged => "unchanged",
            UpdateKind::Incremental => "incremental",
            UpdateKind::Full => "full",
        }
    }
}

/// One node's compiled state, updated from index snapshots and their change records.
#[derive(Debug)]
pub struct NodeCompiler {
    node: String,
    opts: CompileOptions,
    snapshot: Snapshot,
    np: NodePolicy,
    rs: Ruleset,
    origins: SetOrigins,
    /// Set name → position in `rs.sets`.
    set_index: HashMap<String, usize>,
    /// Addresses of policy-target pods → the pods holding them (two pods may briefly share
    /// one while an address is reused). The pods are the snapshot's own `Arc`s, and one owner
    /// is held inline: at 100,000 pods this map has 200,000 entries, and a `Vec` of cloned
    /// keys per entry was a quarter of the agent's heap. Only `key` is read from them; what a
    /// pod is now is always looked up in the current snapshot.
    owners: HashMap<IpAddr, SmallVec<[Arc<PodInfo>; 1]>>,
    /// Content-derived set name → the identity its name hashes.
    identities: BTreeMap<String, String>,
    /// What each ClusterNetworkPolicy chain gives the tier chains that jump to it.
    cnp_pass: CnpPass,
}

/// A selector pair as peer sets are keyed.
type PeerKey = (NamespaceScope, Selector);

impl NodeCompiler {
    /// A compiler for `node`, holding the (empty) ruleset of an empty cluster.
    pub fn new(node: impl Into<String>, opts: CompileOptions) -> Self {
        let mut c = Self {
            node: node.into(),
            opts,
            snapshot: Snapshot::default(),
            np: NodePolicy::default(),
            rs: Ruleset::default(),
            origins: SetOrigins::default(),
            set_index: HashMap::new(),
            owners: HashMap::new(),
            identities: BTreeMap::new(),
            cnp_pass: CnpPass::new(),
        };
        c.rebuild(Snapshot::default());
        c
    }

    /// The ruleset for the last snapshot.
    pub fn ruleset(&self) -> &Ruleset {
        &self.rs
    }

    /// The options it compiles with.
    pub fn options(&self) -> &CompileOptions {
        &self.opts
    }

    /// The resolved policy for the last snapshot.
    pub fn node_policy(&self) -> &NodePolicy {
        &self.np
    }

    /// The last snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Bring the ruleset up to `snapshot`, which differs from the previous one by `changes`.
    pub fn update(&mut self, snapshot: Snapshot, changes: &Changes) -> UpdateKind {
        if changes.is_empty() {
            self.snapshot = snapshot;
            return UpdateKind::Unchanged;
        }
        if !self.can_edit(&snapshot, changes) {
            self.rebuild(snapshot);
            return UpdateKind::Full;
        }
        let mut redo = Redo::default();
        for ns in &changes.namespaces {
            self.edit_namespace(&snapshot, ns);
            self.note_namespace_subjects(&snapshot, ns, &mut redo);
        }
        for name in &changes.cnps {
            self.note_cnp(&snapshot, name, &mut redo);
        }
        for key in &changes.pods {
            let old = self.snapshot.pods.get(key).cloned();
            let new = snapshot.pods.get(key).cloned();
            self.edit_memberships(&snapshot, old.as_deref(), new.as_deref());
            self.note_local_pod(&snapshot, old.as_deref(), new.as_deref(), &mut redo);
        }
        for key in &changes.policies {
            self.note_policy(&snapshot, key, &mut redo);
        }
        if !redo.is_empty() && !self.redo_local(&snapshot, &redo) {
            self.rebuild(snapshot);
            return UpdateKind::Full;
        }
        self.snapshot = snapshot;
        UpdateKind::Incremental
    }

    /// Can these changes be edited in, or is the full path needed?
    fn can_edit(&self, snapshot: &Snapshot, changes: &Changes) -> bool {
        if changes.everything
            || !changes.nodes.is_empty()
            || changes.pods.len() + changes.policies.len() + changes.cnps.len()
                > MAX_INCREMENTAL_OBJECTS
        {
            return false;
        }
        // Staged policies (measured, not enforced) are rare and short-lived; the edits do not
        // know their chains. So: the full path while one selects a pod of this node, and for
        // any change that may make one do so (see `touches_staged`).
        if !self.np.staged.is_empty() || self.touches_staged(snapshot, changes) {
            return false;
        }
        // Staged ClusterNetworkPolicies are measured through the mark field, whose rules sit
        // in many chains (tier chains, Deny rules, drops): the full path while one selects a
        // pod of this node, and for a pod or namespace change while one exists at all (the
        // change may make its subject take in a local pod).
        if !self.np.staged_cnps.is_empty() || self.touches_staged_cnp(snapshot, changes) {
            return false;
        }
        // A pod edit reads its namespace's labels as they are now, for before and after.
        if !changes.namespaces.is_empty() && !changes.pods.is_empty() {
            return false;
        }
        // Egress named ports of ClusterNetworkPolicies resolve on peer pods and are not
        // tracked per pod: with such a policy on this node, a pod or namespace change (which
        // may move a peer pod) takes the full path, as does adding or changing one.
        if cnp_egress_named(&self.np)
            && (!changes.pods.is_empty() || !changes.namespaces.is_empty())
        {
            return false;
        }
        let named = |s: &Snapshot, name: &String| {
            s.cnps.get(name).is_some_and(|c| {
                c.egress.iter().any(|r| match &r.matches {
                    crate::model::RuleMatch::Peers { ports: Some(p), .. } => p
                        .iter()
                        .any(|p| matches!(p, crate::model::CnpPort::Named(_))),
                    _ => false,
                })
            })
        };
        if changes
            .cnps
            .iter()
            .any(|n| named(snapshot, n) || named(&self.snapshot, n))
        {
            return false;
        }
        true
    }

    /// Could `changes` give [`NodePolicy::staged`] an entry (it is empty now)? Only a staged
    /// policy (or ClusterNetworkPolicy) that changes, or a local pod that a staged policy of
    /// its namespace selects before or after: a staged policy's selection depends on nothing
    /// else (namespace labels only move peers; node changes take the full path anyway).
    fn touches_staged(&self, snapshot: &Snapshot, changes: &Changes) -> bool {
        let staged_policy =
            |s: &Snapshot, k: &ObjectKey| s.policies.get(k).is_some_and(|p| p.staged);
        let staged_cnp = |s: &Snapshot, n: &String| s.cnps.get(n).is_some_and(|c| c.staged);
        if changes
            .policies
            .iter()
            .any(|k| staged_policy(&self.snapshot, k) || staged_policy(snapshot, k))
            || changes
                .cnps
                .iter()
                .any(|n| staged_cnp(&self.snapshot, n) || staged_cnp(snapshot, n))
        {
            return true;
        }
        let node = self.node.as_str();
        let local = |p: &&Arc<PodInfo>| p.is_policy_target() && p.node.as_deref() == Some(node);
        changes.pods.iter().any(|key| {
            let pods: Vec<&Arc<PodInfo>> = [self.snapshot.pods.get(key), snapshot.pods.get(key)]
                .into_iter()
                .flatten()
                .filter(local)
                .collect();
            !pods.is_empty()
                && policies_in(snapshot, &key.namespace)
                    .into_iter()
                    .filter(|(_, p)| p.staged)
                    .any(|(_, p)| pods.iter().any(|pod| p.pod_selector.matches(&pod.labels)))
        })
    }

    /// Could `changes` make a staged ClusterNetworkPolicy (none concerns a local pod now)
    /// take in a local pod? Only a local pod its subject matches before or after (with its
    /// namespace's labels before or after), or a namespace with local pods it could match.
    fn touches_staged_cnp(&self, snapshot: &Snapshot, changes: &Changes) -> bool {
        let staged: Vec<&Arc<crate::model::ClusterPolicy>> = snapshot
            .cnps
            .iter()
            .map(|(_, c)| c)
            .filter(|c| c.staged)
            .collect();
        if staged.is_empty() {
            return false;
        }
        let node = self.node.as_str();
        let local = |p: &&Arc<PodInfo>| p.is_policy_target() && p.node.as_deref() == Some(node);
        let pod_matches = |ns: &str, pod: &PodInfo| {
            let labels = [
                namespace_labels(&self.snapshot, ns),
                namespace_labels(snapshot, ns),
            ];
            staged.iter().any(|c| {
                labels
                    .iter()
                    .any(|l| subject_matches(&c.subject, l, &pod.labels))
            })
        };
        changes.pods.iter().any(|key| {
            [self.snapshot.pods.get(key), snapshot.pods.get(key)]
                .into_iter()
                .flatten()
                .filter(local)
                .any(|p| pod_matches(&key.namespace, p))
        }) || changes.namespaces.iter().any(|ns| {
            local_pods_in(snapshot, &self.node, ns)
                .iter()
                .any(|p| pod_matches(ns, p))
        })
    }

    fn rebuild(&mut self, snapshot: Snapshot) {
        self.np = node_policy(&snapshot, &self.node, &self.opts);
        let (rs, origins, identities, cnp_pass) = compile_with_identities(&self.np, &self.opts);
        self.cnp_pass = cnp_pass;
        self.rs = rs;
        self.origins = origins;
        self.identities = identities;
        self.reindex_sets();
        self.owners.clear();
        for pod in snapshot.pods.iter().map(|(_, pod)| pod) {
            if pod.is_policy_target() {
                for ip in &pod.ips {
                    self.owners.entry(*ip).or_default().push(Arc::clone(pod));
                }
            }
        }
        self.snapshot = snapshot;
    }

    fn reindex_sets(&mut self) {
        self.set_index = self
            .rs
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
    }

    /// Move a changed pod's addresses in and out of the peer and egress named-port sets
    /// (wherever the pod runs).
    fn edit_memberships(
        &mut self,
        snapshot: &Snapshot,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
    ) {
        let old = old.filter(|p| p.is_policy_target());
        let new = new.filter(|p| p.is_policy_target());
        let Some(key) = old.or(new).map(|p| p.key.clone()) else {
            return; // neither version takes part in policy
        };
        for ip in old.iter().flat_map(|p| &p.ips) {
            if let Some(list) = self.owners.get_mut(ip) {
                list.retain(|p| p.key != key);
                if list.is_empty() {
                    self.owners.remove(ip);
                }
            }
        }
        if let Some(pod) = new.and(snapshot.pods.get(&key)) {
            for ip in &pod.ips {
                self.owners.entry(*ip).or_default().push(Arc::clone(pod));
            }
        }
        // No namespace changed, so old and new see the same namespace labels.
        let ns_labels = namespace_labels(snapshot, &key.namespace);
        let member = |p: Option<&PodInfo>, (scope, sel): (&NamespaceScope, &Selector)| {
            p.is_some_and(|p| in_scope(scope, &key.namespace, &ns_labels) && sel.matches(&p.labels))
        };

        // Each distinct peer once: every rule using a selector pair shares one resolved copy.
        let mut seen = std::collections::HashSet::new();
        let mut hits: Vec<(PeerKey, bool, bool)> = Vec::new();
        for pp in pod_peers(&self.np) {
            if !seen.insert(Arc::as_ptr(pp)) {
                continue;
            }
            let peer = (&pp.scope, &pp.pods);
            let (was, now) = (member(old, peer), member(new, peer));
            if was || now {
                hits.push(((pp.scope.clone(), pp.pods.clone()), was, now));
            }
        }
        let mut membership: BTreeMap<PeerKey, (bool, bool)> = BTreeMap::new();
        let same_ips = old.map(|p| &p.ips) == new.map(|p| &p.ips);
        for (peer, was, now) in hits {
            if !(was && now && same_ips) {
                self.edit_peer(snapshot, &peer, old.filter(|_| was), new.filter(|_| now));
            }
            membership.insert(peer, (was, now));
        }
        self.edit_egress_named(snapshot, &key, old, new, &membership);
    }

    /// A pod of this node changed: note the policies of its namespace that select it (before
    /// or after) and the pod itself for [`NodeCompiler::redo_local`].
    fn note_local_pod(
        &mut self,
        snapshot: &Snapshot,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
        redo: &mut Redo,
    ) {
        let node = self.node.as_str();
        let local = |p: &&PodInfo| p.is_policy_target() && p.node.as_deref() == Some(node);
        let (old, new) = (old.filter(local), new.filter(local));
        let Some(key) = old.or(new).map(|p| p.key.clone()) else {
            return; // not a pod of this node that policy applies to
        };
        self.edit_local_addrs(snapshot, old, new);
        let selects = |policy: &Policy, p: Option<&PodInfo>| {
            p.is_some_and(|p| policy.pod_selector.matches(&p.labels))
        };
        for (k, policy) in policies_in(snapshot, &key.namespace) {
            if selects(policy, old) || selects(policy, new) {
                redo.policies.insert(k.clone());
            }
        }
        // A policy that selected the old pod but is gone now was noted by its own change.
        let ns_labels = namespace_labels(snapshot, &key.namespace);
        for (name, cnp) in snapshot.cnps.iter() {
            let subject = |p: Option<&PodInfo>| {
                p.is_some_and(|p| subject_matches(&cnp.subject, &ns_labels, &p.labels))
            };
            if subject(old) || subject(new) {
                redo.cnps.insert(name.clone());
            }
        }
        redo.pods.insert(key);
    }

    /// A ClusterNetworkPolicy was added, changed or deleted: it is re-resolved, and the local
    /// pods it applies to (before or after) redo their tier chains.
    fn note_cnp(&self, snapshot: &Snapshot, name: &str, redo: &mut Redo) {
        redo.cnps.insert(name.to_string());
        let name = name.to_string();
        let versions = [self.snapshot.cnps.get(&name), snapshot.cnps.get(&name)];
        for pod in local_pods(snapshot, &self.node) {
            let ns_labels = namespace_labels(snapshot, &pod.key.namespace);
            if versions
                .iter()
                .flatten()
                .any(|c| subject_matches(&c.subject, &ns_labels, &pod.labels))
            {
                redo.pods.insert(pod.key.clone());
            }
        }
    }

    /// A namespace's labels changed: the ClusterNetworkPolicies whose subject takes in one of
    /// its local pods, before or after, are re-resolved with those pods.
    fn note_namespace_subjects(&self, snapshot: &Snapshot, ns: &str, redo: &mut Redo) {
        if snapshot.cnps.is_empty() && self.snapshot.cnps.is_empty() {
            return;
        }
        let before = namespace_labels(&self.snapshot, ns);
        let after = namespace_labels(snapshot, ns);
        let pods = local_pods_in(snapshot, &self.node, ns);
        for (name, cnp) in snapshot.cnps.iter() {
            let takes = |labels: &Labels| {
                pods.iter()
                    .any(|p| subject_matches(&cnp.subject, labels, &p.labels))
            };
            if takes(&before) || takes(&after) {
                redo.cnps.insert(name.clone());
                redo.pods.extend(pods.iter().map(|p| p.key.clone()));
            }
        }
    }

    /// A NetworkPolicy was added, changed or deleted: it is re-resolved, and the local pods
    /// of its namespace it selects (before or after) redo their isolation.
    fn note_policy(&self, snapshot: &Snapshot, key: &ObjectKey, redo: &mut Redo) {
        redo.policies.insert(key.clone());
        let versions = [self.snapshot.policies.get(key), snapshot.policies.get(key)];
        for pod in local_pods_in(snapshot, &self.node, &key.namespace) {
            if versions
                .iter()
                .flatten()
                .any(|p| p.pod_selector.matches(&pod.labels))
            {
                redo.pods.insert(pod.key.clone());
            }
        }
    }

    /// A namespace's labels changed: only the peers whose namespace selector's verdict on it
    /// changed move its pods in or out (pods, policies and other namespaces are unchanged,
    /// so nothing else a NetworkPolicy resolves can differ).
    fn edit_namespace(&mut self, snapshot: &Snapshot, ns: &str) {
        let before = namespace_labels(&self.snapshot, ns);
        let after = namespace_labels(snapshot, ns);
        if before == after {
            return;
        }
        let all_peers = self.peer_keys();
        let flipped: Vec<(PeerKey, bool)> = all_peers
            .iter()
            .cloned()
            .filter_map(|peer| match &peer.0 {
                NamespaceScope::Selector(sel) => {
                    let (was, now) = (sel.matches(&before), sel.matches(&after));
                    (was != now).then_some((peer, now))
                }
                NamespaceScope::Own(_) => None,
            })
            .collect();
        if flipped.is_empty() {
            return;
        }
        let egress_named = self.np.policies.iter().any(|p| {
            p.direction == Direction::Egress
                && p.rules
                    .iter()
                    .any(|r| r.ports.as_ref().is_some_and(|ports| ports.named.is_some()))
        });
        let pods: Vec<Arc<PodInfo>> = snapshot
            .pods
            .range(ObjectKey::new(ns, "")..)
            .take_while(|(k, _)| k.namespace == ns)
            .map(|(_, p)| p.clone())
            .filter(|p| p.is_policy_target())
            .collect();
        for pod in &pods {
            let mut moved = false;
            for (peer, now) in &flipped {
                if peer.1.matches(&pod.labels) {
                    let (old, new) = if *now {
                        (None, Some(&**pod))
                    } else {
                        (Some(&**pod), None)
                    };
                    self.edit_peer(snapshot, peer, old, new);
                    moved = true;
                }
            }
            if moved && egress_named {
                let member = |labels: &Labels, (scope, sel): &PeerKey| {
                    in_scope(scope, ns, labels) && sel.matches(&pod.labels)
                };
                let membership: BTreeMap<PeerKey, (bool, bool)> = all_peers
                    .iter()
                    .map(|peer| (peer.clone(), (member(&before, peer), member(&after, peer))))
                    .filter(|(_, (was, now))| *was || *now)
                    .collect();
                self.edit_egress_named(snapshot, &pod.key, Some(pod), Some(pod), &membership);
            }
        }
    }

    /// Re-resolve the noted policies (peers come from what is already resolved; a new
    /// selector is resolved against the snapshot), redo the noted local pods' isolation, and
    /// rewrite those policies' chains and sets, and those pods' chains and dispatch-map
    /// entries. False when a set name collides, which only the full path handles.
    fn redo_local(&mut self, snapshot: &Snapshot, redo: &Redo) -> bool {
        let peers = pod_peers(&self.np)
            .map(|pp| ((pp.scope.clone(), pp.pods.clone()), pp.clone()))
            .collect();
        let mut resolver = Resolver::new(snapshot, peers);
        let node = self.node.clone();

        // Resolve: each noted policy, for the local pods it selects now.
        let mut redone: Vec<(ObjectKey, Direction)> = Vec::new();
        for key in &redo.policies {
            let policy = snapshot.policies.get(key);
            let local_in_ns = local_pods_in(snapshot, &node, &key.namespace);
            for d in Direction::ALL {
                let selected: Vec<&Arc<PodInfo>> = match policy.filter(|p| p.rules(d).is_some()) {
                    Some(policy) => local_in_ns
                        .iter()
                        .copied()
                        .filter(|p| policy.pod_selector.matches(&p.labels))
                        .collect(),
                    None => Vec::new(),
                };
                let at = self
                    .np
                    .policies
                    .binary_search_by(|p| (&p.policy, p.direction).cmp(&(key, d)));
                match (policy, selected.is_empty(), at) {
                    (_, true, Ok(i)) => {
                        self.np.policies.remove(i);
                    }
                    (Some(policy), false, at) => {
                        let rules = policy.rules(d).unwrap_or_default();
                        let pr = resolve_policy(&mut resolver, policy, d, rules, &selected);
                        match at {
                            Ok(i) => self.np.policies[i] = pr,
                            Err(i) => self.np.policies.insert(i, pr),
                        }
                    }
                    _ => {}
                }
                redone.push((key.clone(), d));
            }
        }

        // Resolve: each noted ClusterNetworkPolicy, for the local pods it applies to now.
        let mut redone_cnps: Vec<(String, Direction)> = Vec::new();
        let mut stale_denies: Vec<String> = Vec::new();
        if !redo.cnps.is_empty() {
            let local = local_pods(snapshot, &node);
            // Each local pod's namespace labels, looked up once (every policy asks).
            let ns_labels: Vec<Labels> = local
                .iter()
                .map(|p| namespace_labels(snapshot, &p.key.namespace))
                .collect();
            for name in &redo.cnps {
                for c in self.np.cnps.iter().filter(|c| c.name == *name) {
                    stale_denies.extend(
                        c.rules
                            .iter()
                            .filter(|r| r.action == Action::Deny)
                            .map(|r| cnp_deny_chain_name(c.direction, name, r.index)),
                    );
                }
                self.np.cnps.retain(|c| c.name != *name);
                for d in Direction::ALL {
                    redone_cnps.push((name.clone(), d));
                }
                let Some(cnp) = snapshot.cnps.get(name) else {
                    continue;
                };
                for cr in resolve_cnp(&mut resolver, cnp, &local, &ns_labels) {
                    let at = self
                        .np
                        .cnps
                        .partition_point(|c| cnp_order(c) < cnp_order(&cr));
                    self.np.cnps.insert(at, cr);
                }
            }
        }

        // Resolve: each noted pod's isolation, from every policy of its namespace.
        let mut old_entries: BTreeMap<ObjectKey, LocalPod> = BTreeMap::new();
        for key in &redo.pods {
            if let Ok(i) = self.np.pods.binary_search_by(|p| p.key.cmp(key)) {
                old_entries.insert(key.clone(), self.np.pods.remove(i));
            }
            let Some(pod) = snapshot
                .pods
                .get(key)
                .filter(|p| p.is_policy_target() && p.node.as_deref() == Some(node.as_str()))
            else {
                continue;
            };
            let in_ns = policies_in(snapshot, &key.namespace);
            let isolated_by = |d: Direction| {
                let by: Vec<ObjectKey> = in_ns
                    .iter()
                    .filter(|(_, pol)| {
                        pol.rules(d).is_some() && pol.pod_selector.matches(&pod.labels)
                    })
                    .map(|(k, _)| (*k).clone())
                    .collect();
                (!by.is_empty()).then_some(by)
            };
            let mut cnps = TierMembership::default();
            for cr in &self.np.cnps {
                if cr.selected.binary_search(key).is_ok() {
                    cnps.push(cr.tier, cr.direction, cr.name.clone());
                }
            }
            let entry = LocalPod {
                key: key.clone(),
                ips: pod.ips.clone(),
                ingress: isolated_by(Direction::Ingress),
                egress: isolated_by(Direction::Egress),
                cnps,
            };
            if entry.ingress.is_some() || entry.egress.is_some() || !entry.cnps.is_empty() {
                if let Err(i) = self.np.pods.binary_search_by(|p| p.key.cmp(key)) {
                    self.np.pods.insert(i, entry);
                }
            }
        }

        // Compile: the policies' chains and sets first (a pod chain jumps only to policy
        // chains that have rules), then the pods' chains and dispatch entries.
        let mut sets = Sets::default();
        for (policy, d) in &redone {
            remove_chain(&mut self.rs, &policy_chain_name(*d, policy));
            self.origins.by_policy.remove(&(policy.clone(), *d));
            let Ok(i) = self
                .np
                .policies
                .binary_search_by(|p| (&p.policy, p.direction).cmp(&(policy, *d)))
            else {
                continue;
            };
            if let Some(chain) = policy_chain(&mut sets, &self.np.policies[i]) {
                insert_chain(&mut self.rs, chain);
            }
        }
        for (name, d) in &redone_cnps {
            remove_chain(&mut self.rs, &cnp_chain_name(*d, name));
            self.origins.by_cnp.remove(&(name.clone(), *d));
            self.cnp_pass.remove(&(name.clone(), *d));
        }
        for chain in &stale_denies {
            remove_chain(&mut self.rs, chain);
        }
        for (name, d) in &redone_cnps {
            let Some(cr) = self
                .np
                .cnps
                .iter()
                .find(|c| c.name == *name && c.direction == *d)
            else {
                continue;
            };
            let compiled = cnp_chain(&mut sets, cr, &self.opts);
            self.cnp_pass
                .insert((name.clone(), *d), (cr.priority, compiled.pass));
            insert_chain(&mut self.rs, compiled.chain);
            for deny in compiled.denies {
                insert_chain(&mut self.rs, deny);
            }
        }
        if !self.take_sets(sets) {
            return false;
        }
        let mut facts = PolicyFacts::of(&self.np);
        facts.cnp_pass = std::mem::take(&mut self.cnp_pass);
        for key in &redo.pods {
            let old_entry = old_entries.get(key);
            let new_entry = self
                .np
                .pods
                .binary_search_by(|p| p.key.cmp(key))
                .ok()
                .map(|i| self.np.pods[i].clone());
            self.rewrite_pod(key, old_entry, new_entry.as_ref(), &facts);
        }
        self.cnp_pass = facts.cnp_pass;
        true
    }

    /// Replace one local pod's chains and dispatch-map entries.
    fn rewrite_pod(
        &mut self,
        key: &ObjectKey,
        old_entry: Option<&LocalPod>,
        new_entry: Option<&LocalPod>,
        facts: &PolicyFacts,
    ) {
        for d in Direction::ALL {
            remove_chain(&mut self.rs, &pod_chain_name(d, key));
            remove_chain(&mut self.rs, &drop_chain_name(d, key));
            for tier in [Tier::Admin, Tier::Baseline] {
                remove_chain(&mut self.rs, &tier_chain_name(tier, d, key));
            }
            for entry in old_entry
                .iter()
                .filter(|e| e.isolated_by(d).is_some() || e.cnps.any(d))
            {
                for ip in &entry.ips {
                    let map = dispatch_map_name(d, Family::of(ip));
                    let gone = Some((*ip, pod_chain_name(d, key)));
                    if let Some(set) = self.set_mut(&map) {
                        set.elements.retain(|e| dispatch_key(e) != gone);
                    }
                }
            }
            if let Some(entry) = new_entry {
                if let Some(pc) = pod_chains(entry, d, facts, &self.opts) {
                    for ip in &entry.ips {
                        let map = dispatch_map_name(d, Family::of(ip));
                        let element = format_compact!("{ip} : goto {}", pc.chain.name);
                        let want = (*ip, pc.chain.name.clone());
                        if let Some(set) = self.set_mut(&map) {
                            if let Err(i) = set
                                .elements
                                .binary_search_by(|e| dispatch_key(e).cmp(&Some(want.clone())))
                            {
                                set.elements.insert(i, element);
                            }
                        }
                    }
                    insert_chain(&mut self.rs, pc.chain);
                    if let Some(drop) = pc.drop {
                        insert_chain(&mut self.rs, drop);
                    }
                    for tier in pc.tiers {
                        insert_chain(&mut self.rs, tier);
                    }
                }
            }
        }
    }

    /// Keep the known local addresses (and their `local-pods-*` sets) current: an address
    /// stays known while some local pod that takes part in policy holds it.
    fn edit_local_addrs(
        &mut self,
        snapshot: &Snapshot,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
    ) {
        let node = self.node.as_str();
        let mut families = BTreeSet::new();
        for ip in old.iter().chain(new.iter()).flat_map(|p| &p.ips) {
            // `owners` already reflects this change (edit_memberships ran first).
            let held = self.owners.get(ip).is_some_and(|owners| {
                owners.iter().any(|o| {
                    snapshot
                        .pods
                        .get(&o.key)
                        .is_some_and(|p| p.is_policy_target() && p.node.as_deref() == Some(node))
                })
            });
            let changed = if held {
                self.np.local_addrs.insert(*ip)
            } else {
                self.np.local_addrs.remove(ip)
            };
            if changed {
                families.insert(Family::of(ip));
            }
        }
        for f in families {
            let elements = local_pods_elements(&self.np, f);
            if let Some(set) = self.set_mut(&local_pods_set_name(f)) {
                set.elements = elements;
            }
        }
    }

    fn set_mut(&mut self, name: &str) -> Option<&mut Set> {
        let i = *self.set_index.get(name)?;
        self.rs.sets.get_mut(i).map(Arc::make_mut)
    }

    /// Adopt the sets the re-resolved policies registered: refresh the elements of those we
    /// have, add new ones, and drop sets no policy chain registers any more. False on a
    /// name collision with a different identity.
    fn take_sets(&mut self, sets: Sets) -> bool {
        let Sets {
            by_name, origins, ..
        } = sets;
        for (name, (identity, set)) in by_name {
            match self.identities.get(&name) {
                Some(known) if *known != identity => return false,
                Some(_) => {
                    if let Some(mine) = self.set_mut(&name) {
                        mine.elements = set.elements;
                    }
                }
                None => {
                    let first_content = self.rs.sets.partition_point(|s| s.verdict_map);
                    let at = first_content
                        + self.rs.sets[first_content..].partition_point(|s| s.name < set.name);
                    self.rs.sets.insert(at, Arc::new(set));
                    self.identities.insert(name, identity);
                    self.reindex_sets();
                }
            }
        }
        for (k, v) in origins.peers {
            self.origins.peers.entry(k).or_insert(v);
        }
        for (k, v) in origins.named {
            self.origins.named.insert(k, v);
        }
        self.origins.by_policy.extend(origins.by_policy);
        self.origins.by_cnp.extend(origins.by_cnp);
        // A content set lives while some policy chain registers it.
        let live = self.origins.live();
        let dead: Vec<String> = self
            .identities
            .keys()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        if !dead.is_empty() {
            let dead_set: BTreeSet<&String> = dead.iter().collect();
            self.rs.sets.retain(|s| !dead_set.contains(&s.name));
            self.origins.peers.retain(|_, n| !dead_set.contains(n));
            self.origins.named.retain(|_, n| !dead_set.contains(n));
            for n in &dead {
                self.identities.remove(n);
            }
            self.reindex_sets();
        }
        true
    }

    /// Every selector pair the node's rules use.
    fn peer_keys(&self) -> BTreeSet<PeerKey> {
        let mut keys = BTreeSet::new();
        for pods in pod_peers(&self.np) {
            keys.insert((pods.scope.clone(), pods.pods.clone()));
        }
        keys
    }

    /// Move `key`'s addresses out of (`old`) and into (`new`) one peer, then edit its sets.
    fn edit_peer(
        &mut self,
        snapshot: &Snapshot,
        peer: &PeerKey,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
    ) {
        let (mut shared, stand_in) = self.detach_peer(peer);
        let pp = Arc::make_mut(&mut shared);
        let mut gone = Vec::new();
        for ip in old.iter().flat_map(|p| &p.ips) {
            // The address stays while a pod that is (now) a member still holds it. `owners`
            // may still list pods of this batch not edited yet: ask the snapshot whether
            // the pod really holds the address now.
            let held = self.owners.get(ip).is_some_and(|owners| {
                owners.iter().map(|o| &o.key).any(|k| {
                    is_member(snapshot, (&peer.0, &peer.1), k)
                        && snapshot.pods.get(k).is_some_and(|p| p.ips.contains(ip))
                })
            });
            if !held && pp.addrs.remove(ip) {
                gone.push(*ip);
            }
        }
        let mut came = Vec::new();
        for ip in new.iter().flat_map(|p| &p.ips) {
            if pp.addrs.insert(*ip) {
                came.push(*ip);
            }
        }
        for f in Family::ALL {
            let Some(set) = self
                .origins
                .peers
                .get(&(peer.0.clone(), peer.1.clone(), f))
                .and_then(|name| self.set_index.get(name))
                .and_then(|i| self.rs.sets.get_mut(*i))
                .map(Arc::make_mut)
            else {
                continue;
            };
            for ip in gone.iter().filter(|ip| Family::of(ip) == f) {
                if let Ok(i) = set.elements.binary_search_by(|e| by_address(e, ip)) {
                    set.elements.remove(i);
                }
            }
            for ip in came.iter().filter(|ip| Family::of(ip) == f) {
                if let Err(i) = set.elements.binary_search_by(|e| by_address(e, ip)) {
                    set.elements.insert(i, addr_element(ip));
                }
            }
        }
        self.attach_peer(stand_in, shared);
    }

    /// Take the node policy's shared copy of a peer out of every rule (leaving an empty stand-in),
    /// so it can be edited without copying its member list.
    ///
    /// Every rule using one selector pair holds the same copy (the resolver resolves a pair
    /// once, and edits put one copy back everywhere), so slots are found by pointer after
    /// the first is found by value.
    fn detach_peer(&mut self, peer: &PeerKey) -> (Arc<PeerPods>, *const PeerPods) {
        let stand_in = Arc::new(PeerPods {
            scope: peer.0.clone(),
            pods: peer.1.clone(),
            addrs: BTreeSet::new(),
        });
        let Some(shared) = pod_peers(&self.np)
            .find(|p| p.scope == peer.0 && p.pods == peer.1)
            .map(Arc::as_ptr)
        else {
            let at = Arc::as_ptr(&stand_in);
            return (stand_in, at);
        };
        let at = Arc::as_ptr(&stand_in);
        let mut taken: Option<Arc<PeerPods>> = None;
        for slot in pod_peers_mut(&mut self.np) {
            if Arc::as_ptr(slot) == shared {
                let old = std::mem::replace(slot, stand_in.clone());
                taken.get_or_insert(old);
            }
        }
        (taken.unwrap_or(stand_in), at)
    }

    /// Put the edited peer back into every rule that uses it (every slot holding the
    /// stand-in [`NodeCompiler::detach_peer`] left).
    fn attach_peer(&mut self, stand_in: *const PeerPods, edited: Arc<PeerPods>) {
        for slot in pod_peers_mut(&mut self.np) {
            if Arc::as_ptr(slot) == stand_in {
                *slot = edited.clone();
            }
        }
    }

    /// Egress named ports resolve on the peer (destination) pods: move the changed pod's
    /// (address, protocol, port) targets in and out of every egress rule that names a port it
    /// declares, and edit those sets.
    fn edit_egress_named(
        &mut self,
        snapshot: &Snapshot,
        key: &ObjectKey,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
        membership: &BTreeMap<PeerKey, (bool, bool)>,
    ) {
        let owners = &self.owners;
        let mut edits: Vec<(ObjectKey, usize, Vec<Target>, Vec<Target>)> = Vec::new();
        for pr in &mut self.np.policies {
            if pr.direction != Direction::Egress {
                continue;
            }
            for rule in &mut pr.rules {
                let Some(named) = rule.ports.as_mut().and_then(|p| p.named.as_mut()) else {
                    continue;
                };
                // Candidates: the rule's pod peers' members, or every pod when it has no peers.
                let pod_peers: Vec<&Arc<PeerPods>> = match &rule.peers {
                    None => Vec::new(),
                    Some(peers) => peers
                        .iter()
                        .filter_map(|p| match p {
                            ResolvedPeer::Pods(pods) => Some(pods),
                            ResolvedPeer::IpBlock { .. } => None,
                        })
                        .collect(),
                };
                let any_peer = rule.peers.is_none();
                let was_member = |pick: fn(&(bool, bool)) -> bool| {
                    any_peer
                        || pod_peers.iter().any(|pp| {
                            membership
                                .get(&(pp.scope.clone(), pp.pods.clone()))
                                .is_some_and(pick)
                        })
                };
                let before = targets_of(old.filter(|_| was_member(|m| m.0)), &named.names);
                let after = targets_of(new.filter(|_| was_member(|m| m.1)), &named.names);
                if before == after {
                    continue;
                }
                let is_candidate = |k: &ObjectKey| {
                    any_peer
                        || pod_peers
                            .iter()
                            .any(|pp| is_member(snapshot, (&pp.scope, &pp.pods), k))
                };
                let mut gone = Vec::new();
                for t in before.iter().filter(|t| !after.contains(t)) {
                    // Another candidate pod on the same address may declare the same port.
                    let held = owners.get(&t.0).is_some_and(|ks| {
                        ks.iter().map(|o| &o.key).filter(|k| *k != key).any(|k| {
                            is_candidate(k)
                                && snapshot
                                    .pods
                                    .get(k)
                                    .is_some_and(|p| targets_of(Some(p), &named.names).contains(t))
                        })
                    });
                    if !held && named.targets.remove(t) {
                        gone.push(*t);
                    }
                }
                let mut came = Vec::new();
                for t in after {
                    if named.targets.insert(t) {
                        came.push(t);
                    }
                }
                if !gone.is_empty() || !came.is_empty() {
                    edits.push((pr.policy.clone(), rule.index, gone, came));
                }
            }
        }
        for (policy, index, gone, came) in edits {
            for f in Family::ALL {
                let set = self
                    .origins
                    .named
                    .get(&(policy.clone(), Direction::Egress, index, f))
                    .and_then(|name| self.set_index.get(name))
                    .and_then(|i| self.rs.sets.get_mut(*i))
                    .map(Arc::make_mut);
                let Some(set) = set else { continue };
                let in_family = |t: &&Target| Family::of(&t.0) == f;
                for t in gone.iter().filter(in_family) {
                    if let Ok(i) = set.elements.binary_search_by(|e| by_target(e, t)) {
                        set.elements.remove(i);
                    }
                }
                for t in came.iter().filter(in_family) {
                    if let Err(i) = set.elements.binary_search_by(|e| by_target(e, t)) {
                        set.elements.insert(i, named_element(t));
                    }
                }
            }
        }
    }
}

type Target = NamedTarget;

/// The targets one pod contributes for a list of port names.
fn targets_of(pod: Option<&PodInfo>, names: &[(Protocol, String)]) -> BTreeSet<Target> {
    pod.map(|p| pod_targets(p, names).collect())
        .unwrap_or_default()
}

/// A named-port set element as the compiler writes it.
fn named_element(t: &Target) -> Element {
    named_set_elements(
        &NamedTargets {
            names: Vec::new(),
            targets: BTreeSet::from([*t]),
        },
        Family::of(&t.0),
    )
    .pop()
    .unwrap_or_default()
}

/// Named-port set elements are in target order; compare one with `t` the same way.
fn by_target(element: &str, t: &Target) -> std::cmp::Ordering {
    let mut parts = element.split(" . ");
    let parsed = (|| {
        let ip = parts.next()?.parse::<IpAddr>().ok()?;
        let proto = Protocol::parse(Some(&parts.next()?.to_uppercase()))?;
        let port = parts.next()?.parse::<u16>().ok()?;
        Some((ip, proto, port))
    })();
    parsed.cmp(&Some(*t))
}

/// A dispatch-map element's key and verdict chain (`<ip> : goto <chain>`).
fn dispatch_key(element: &str) -> Option<(IpAddr, String)> {
    let (ip, chain) = element.split_once(" : goto ")?;
    Some((ip.parse().ok()?, chain.to_string()))
}

/// Chains after the base chains are kept sorted by name.
fn insert_chain(rs: &mut Ruleset, chain: Chain) {
    let first = rs
        .chains
        .partition_point(|c| matches!(c.role, ChainRole::Base { .. }));
    let at = first + rs.chains[first..].partition_point(|c| c.name < chain.name);
    if rs.chains.get(at).is_some_and(|c| c.name == chain.name) {
        rs.chains[at] = Arc::new(chain);
    } else {
        rs.chains.insert(at, Arc::new(chain));
    }
}

fn remove_chain(rs: &mut Ruleset, name: &str) {
    let first = rs
        .chains
        .partition_point(|c| matches!(c.role, ChainRole::Base { .. }));
    let at = first + rs.chains[first..].partition_point(|c| c.name.as_str() < name);
    if rs.chains.get(at).is_some_and(|c| c.name == name) {
        rs.chains.remove(at);
    }
}

/// Does a peer's namespace part take in namespace `ns` (with these labels)?
fn in_scope(scope: &NamespaceScope, ns: &str, labels: &Labels) -> bool {
    match scope {
        NamespaceScope::Own(own) => own == ns,
        NamespaceScope::Selector(sel) => sel.matches(labels),
    }
}

/// Peer set elements are addresses in address order; compare one with `ip` the same way.
fn by_address(element: &str, ip: &IpAddr) -> std::cmp::Ordering {
    element.parse::<IpAddr>().ok().cmp(&Some(*ip))
}

fn pod_peers(np: &NodePolicy) -> impl Iterator<Item = &Arc<PeerPods>> {
    let of_policies = np
        .policies
        .iter()
        .flat_map(|p| &p.rules)
        .filter_map(|r| r.peers.as_ref())
        .flatten()
        .filter_map(|p| match p {
            ResolvedPeer::Pods(pods) => Some(pods),
            ResolvedPeer::IpBlock { .. } => None,
        });
    let of_cnps = np
        .cnps
        .iter()
        .flat_map(|c| &c.rules)
        .filter_map(|r| match &r.matches {
            ResolvedCnpMatch::Peers { peers, .. } => Some(peers),
            _ => None,
        })
        .flatten()
        .filter_map(|p| match p {
            ResolvedCnpPeer::Pods(pods) => Some(pods),
            _ => None,
        });
    of_policies.chain(of_cnps)
}

fn pod_peers_mut(np: &mut NodePolicy) -> impl Iterator<Item = &mut Arc<PeerPods>> {
    let NodePolicy { policies, cnps, .. } = np;
    let of_policies = policies
        .iter_mut()
        .flat_map(|p| &mut p.rules)
        .filter_map(|r| r.peers.as_mut())
        .flatten()
        .filter_map(|p| match p {
            ResolvedPeer::Pods(pods) => Some(pods),
            ResolvedPeer::IpBlock { .. } => None,
        });
    let of_cnps = cnps
        .iter_mut()
        .flat_map(|c| &mut c.rules)
        .filter_map(|r| match &mut r.matches {
            ResolvedCnpMatch::Peers { peers, .. } => Some(peers),
            _ => None,
        })
        .flatten()
        .filter_map(|p| match p {
            ResolvedCnpPeer::Pods(pods) => Some(pods),
            _ => None,
        });
    of_policies.chain(of_cnps)
}

/// Does a ClusterNetworkPolicy resolve named ports on peer pods (egress), which the
/// incremental path does not edit?
fn cnp_egress_named(np: &NodePolicy) -> bool {
    np.cnps.iter().any(|c| {
        c.direction == Direction::Egress
            && c.rules.iter().any(|r| {
                matches!(&r.matches, ResolvedCnpMatch::Peers { ports: Some(p), .. } if p.named.is_some())
            })
    })
}

/// The pods of one namespace on `node` that policy applies to, in key order.
fn local_pods_in<'s>(snapshot: &'s Snapshot, node: &str, ns: &str) -> Vec<&'s Arc<PodInfo>> {
    snapshot
        .pods
        .range(ObjectKey::new(ns, "")..)
        .take_while(|(k, _)| k.namespace == ns)
        .map(|(_, p)| p)
        .filter(|p| p.is_policy_target() && p.node.as_deref() == Some(node))
        .collect()
}

/// Every pod of `node` that policy applies to, in key order.
fn local_pods<'s>(snapshot: &'s Snapshot, node: &str) -> Vec<&'s Arc<PodInfo>> {
    snapshot
        .pods
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.is_policy_target() && p.node.as_deref() == Some(node))
        .collect()
}

/// Where a ClusterNetworkPolicy direction sits in [`NodePolicy::cnps`]: evaluation order,
/// then direction, as the resolver lists them.
fn cnp_order(c: &CnpRules) -> (Tier, u16, &str, usize) {
    let d = Direction::ALL
        .iter()
        .position(|x| *x == c.direction)
        .unwrap_or_default();
    (c.tier, c.priority, c.name.as_str(), d)
}

/// Is pod `key` (as it is in `snapshot`) one of a peer's pods?
fn is_member(
    snapshot: &Snapshot,
    (scope, sel): (&NamespaceScope, &Selector),
    key: &ObjectKey,
) -> bool {
    snapshot.pods.get(key).is_some_and(|p| {
        p.is_policy_target()
            && sel.matches(&p.labels)
            && match scope {
                NamespaceScope::Own(ns) => *ns == key.namespace,
                NamespaceScope::Selector(ns_sel) => match snapshot.namespaces.get(&key.namespace) {
                    Some(ns) => ns_sel.matches(&ns.labels),
                    None => ns_sel.matches(&namespace_labels(snapshot, &key.namespace)),
                },
            }
    })
}
