//! The cluster state the agent enforces, kept apart from how it was learned.
//!
//! One writer (the watch driver or the manifest loader) applies, deletes and resets objects;
//! the sync loop takes cheap snapshots. The generation only moves on a real change: an update
//! that leaves the trimmed object equal does nothing, so a noisy pod status never causes a sync.

use std::collections::{BTreeMap, BTreeSet};

use imbl::OrdMap;
use std::sync::Arc;

use crate::model::{NamespaceInfo, NodeInfo, ObjectKey, PodInfo, Policy};

/// A map of one kind of object with change detection.
///
/// A persistent (structurally shared) map, so a snapshot costs O(1) to take and to drop
/// whatever the cluster size, and a write after a snapshot copies only one path of the tree.
#[derive(Clone, Debug)]
pub struct Store<K: Ord + Clone, V> {
    items: OrdMap<K, Arc<V>>,
}

impl<K: Ord + Clone, V> Default for Store<K, V> {
    fn default() -> Self {
        Self {
            items: OrdMap::new(),
        }
    }
}

impl<K: Ord + Clone, V: PartialEq> Store<K, V> {
    /// Insert or replace; true if anything changed.
    pub fn apply(&mut self, key: K, value: V) -> bool {
        match self.items.get(&key) {
            Some(old) if **old == value => false,
            _ => {
                self.items.insert(key, Arc::new(value));
                true
            }
        }
    }

    /// Remove; true if it was there.
    pub fn delete(&mut self, key: &K) -> bool {
        self.items.remove(key).is_some()
    }

    /// Replace everything (after a relist); true if anything changed.
    pub fn reset(&mut self, items: impl IntoIterator<Item = (K, V)>) -> bool {
        let fresh: BTreeMap<K, V> = items.into_iter().collect();
        let same = fresh.len() == self.items.len()
            && fresh
                .iter()
                .zip(self.items.iter())
                .all(|((k1, v1), (k2, v2))| k1 == k2 && v1 == &**v2);
        if same {
            return false;
        }
        self.items = fresh.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        true
    }

    /// Look one up.
    pub fn get(&self, key: &K) -> Option<&Arc<V>> {
        self.items.get(key)
    }

    /// All items in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Arc<V>)> {
        self.items.iter()
    }

    /// Items whose keys fall in a range (used to list one namespace's pods).
    pub fn range<R: std::ops::RangeBounds<K>>(&self, r: R) -> impl Iterator<Item = (&K, &Arc<V>)> {
        self.items.range(r)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Everything the resolver reads. Cloning it is cheap (the values are shared).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Pods by namespace/name.
    pub pods: Store<ObjectKey, PodInfo>,
    /// Namespaces by name.
    pub namespaces: Store<String, NamespaceInfo>,
    /// NetworkPolicies by namespace/name.
    pub policies: Store<ObjectKey, Policy>,
    /// Nodes by name.
    pub nodes: Store<String, NodeInfo>,
    /// Bumped on every real change.
    pub generation: u64,
}

/// What changed since the last [`Index::take_changes`]: lets the compiler redo only the work
/// a change touches (see `incremental`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Pods added, updated or deleted.
    pub pods: BTreeSet<ObjectKey>,
    /// Namespaces added, updated or deleted.
    pub namespaces: BTreeSet<String>,
    /// Policies added, updated or deleted.
    pub policies: BTreeSet<ObjectKey>,
    /// Nodes added, updated or deleted.
    pub nodes: BTreeSet<String>,
    /// A whole kind was replaced (a relist): assume anything may have changed.
    pub everything: bool,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.everything
            && self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.policies.is_empty()
            && self.nodes.is_empty()
    }

    /// Everything may have changed (the state of a fresh compiler).
    pub fn everything() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    fn mark_everything(&mut self) {
        *self = Self::everything();
    }
}

/// The single-writer index. Each mutation reports whether it changed anything, and records
/// what it changed until the sync loop takes the record.
#[derive(Debug)]
pub struct Index {
    state: Snapshot,
    changes: Changes,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            state: Snapshot::default(),
            // Whoever reads the changes first has seen nothing yet.
            changes: Changes::everything(),
        }
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.state.generation += 1;
        }
        changed
    }

    /// Add or update a pod.
    pub fn apply_pod(&mut self, pod: PodInfo) -> bool {
        let key = pod.key.clone();
        let changed = self.state.pods.apply(key.clone(), pod);
        self.record(changed, |c| c.pods.insert(key))
    }

    /// Remove a pod.
    pub fn delete_pod(&mut self, key: &ObjectKey) -> bool {
        let changed = self.state.pods.delete(key);
        self.record(changed, |c| c.pods.insert(key.clone()))
    }

    /// Replace all pods.
    pub fn reset_pods(&mut self, pods: Vec<PodInfo>) -> bool {
        let changed = self
            .state
            .pods
            .reset(pods.into_iter().map(|p| (p.key.clone(), p)));
        self.record_reset(changed)
    }

    /// Add or update a namespace.
    pub fn apply_namespace(&mut self, ns: NamespaceInfo) -> bool {
        let name = ns.name.clone();
        let changed = self.state.namespaces.apply(name.clone(), ns);
        self.record(changed, |c| c.namespaces.insert(name))
    }

    /// Remove a namespace.
    pub fn delete_namespace(&mut self, name: &str) -> bool {
        let changed = self.state.namespaces.delete(&name.to_string());
        self.record(changed, |c| c.namespaces.insert(name.to_string()))
    }

    /// Replace all namespaces.
    pub fn reset_namespaces(&mut self, namespaces: Vec<NamespaceInfo>) -> bool {
        let changed = self
            .state
            .namespaces
            .reset(namespaces.into_iter().map(|n| (n.name.clone(), n)));
        self.record_reset(changed)
    }

    /// Add or update a policy.
    pub fn apply_policy(&mut self, policy: Policy) -> bool {
        let key = policy.key.clone();
        let changed = self.state.policies.apply(key.clone(), policy);
        self.record(changed, |c| c.policies.insert(key))
    }

    /// Remove a policy.
    pub fn delete_policy(&mut self, key: &ObjectKey) -> bool {
        let changed = self.state.policies.delete(key);
        self.record(changed, |c| c.policies.insert(key.clone()))
    }

    /// Replace all policies.
    pub fn reset_policies(&mut self, policies: Vec<Policy>) -> bool {
        let changed = self
            .state
            .policies
            .reset(policies.into_iter().map(|p| (p.key.clone(), p)));
        self.record_reset(changed)
    }

    /// Add or update a node.
    pub fn apply_node(&mut self, node: NodeInfo) -> bool {
        let name = node.name.clone();
        let changed = self.state.nodes.apply(name.clone(), node);
        self.record(changed, |c| c.nodes.insert(name))
    }

    /// Remove a node.
    pub fn delete_node(&mut self, name: &str) -> bool {
        let changed = self.state.nodes.delete(&name.to_string());
        self.record(changed, |c| c.nodes.insert(name.to_string()))
    }

    /// Replace all nodes.
    pub fn reset_nodes(&mut self, nodes: Vec<NodeInfo>) -> bool {
        let changed = self
            .state
            .nodes
            .reset(nodes.into_iter().map(|n| (n.name.clone(), n)));
        self.record_reset(changed)
    }

    fn record(&mut self, changed: bool, note: impl FnOnce(&mut Changes) -> bool) -> bool {
        // After a relist everything is redone anyway; a list of keys would only grow.
        if changed && !self.changes.everything {
            note(&mut self.changes);
        }
        self.bump(changed)
    }

    fn record_reset(&mut self, changed: bool) -> bool {
        if changed {
            self.changes.mark_everything();
        }
        self.bump(changed)
    }

    /// Make the next [`Index::take_changes`] report everything (after the reader lost track).
    pub fn mark_everything_changed(&mut self) {
        self.changes.mark_everything();
    }

    /// What changed since the last call (the first call reports everything).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// A snapshot and what changed since the last [`Index::take_changes`], taken together so
    /// the two always agree.
    pub fn snapshot_with_changes(&mut self) -> (Snapshot, Changes) {
        (self.snapshot(), self.take_changes())
    }

    /// Current generation.
    pub fn generation(&self) -> u64 {
        self.state.generation
    }

    /// A consistent copy for the resolver.
    pub fn snapshot(&self) -> Snapshot {
        self.state.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    fn pod(name: &str, app: &str) -> PodInfo {
        PodInfo {
            key: ObjectKey::new("ns", name),
            node: Some("n1".into()),
            labels: Labels::from([("app".to_string(), app.to_string())]),
            ips: vec!["10.0.0.1".parse().expect("ip")],
            named_ports: vec![],
            host_network: false,
            finished: false,
        }
    }

    #[test]
    fn generation_moves_only_on_real_change() {
        let mut idx = Index::new();
        assert!(idx.apply_pod(pod("a", "web")), "new pod");
        assert_eq!(idx.generation(), 1);
        assert!(
            !idx.apply_pod(pod("a", "web")),
            "identical update is a no-op"
        );
        assert_eq!(idx.generation(), 1);
        assert!(idx.apply_pod(pod("a", "db")), "label change");
        assert_eq!(idx.generation(), 2);
        assert!(!idx.delete_pod(&ObjectKey::new("ns", "missing")));
        assert!(
            !idx.reset_pods(vec![pod("a", "db")]),
            "relist with same state"
        );
        assert!(
            idx.reset_pods(vec![pod("b", "db")]),
            "relist with other state"
        );
        assert_eq!(idx.generation(), 3);
        let snap = idx.snapshot();
        assert!(idx.delete_pod(&ObjectKey::new("ns", "b")));
        assert_eq!(
            snap.pods.len(),
            1,
            "snapshots are isolated from later writes"
        );
        assert_eq!(idx.snapshot().pods.len(), 0);
    }

    #[test]
    fn node_changes_are_recorded() {
        let node = |zone: &str| NodeInfo {
            name: "n1".into(),
            labels: Labels::from([("zone".to_string(), zone.to_string())]),
            addresses: vec!["172.18.0.3".parse().expect("ip")],
            pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
        };
        let mut idx = Index::new();
        idx.take_changes();
        assert!(idx.apply_node(node("a")));
        assert!(
            !idx.apply_node(node("a")),
            "an equal node (a heartbeat) is a no-op"
        );
        let changes = idx.take_changes();
        assert_eq!(changes.nodes, BTreeSet::from(["n1".to_string()]));
        assert!(!changes.is_empty());
        assert!(idx.apply_node(node("b")), "a relabel is a change");
        assert!(idx.delete_node("n1"));
        assert!(!idx.delete_node("n1"));
        assert_eq!(idx.take_changes().nodes.len(), 1);
        assert!(idx.snapshot().nodes.is_empty());
    }
}
