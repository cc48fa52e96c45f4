//! The cluster edge: where the cluster state comes from.
//!
//! - [`watch`]: one kube-runtime watcher per kind, trimming objects on arrival and feeding an
//!   [`IndexSink`] (the agent's shared state), plus the one-shot list behind
//!   `explain --kubeconfig` and the API access the watchers need (RBAC);
//! - [`manifest`]: the same objects read from `kubectl get -o yaml` files, for the cluster-less
//!   commands and `run --manifests`.
//!
//! Both produce [`crate::model`] types and write them into an
//! [`Index`](crate::engine::index::Index); neither knows what the agent does with it.

pub mod manifest;
pub mod watch;

use crate::engine::index::Index;

/// A kind of object the agent learns from the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WatchResource {
    Pods,
    Namespaces,
    NetworkPolicies,
    Nodes,
}

impl WatchResource {
    /// Every kind, in the order the agent waits for their first lists.
    pub const ALL: [WatchResource; 4] = [
        WatchResource::Pods,
        WatchResource::Namespaces,
        WatchResource::NetworkPolicies,
        WatchResource::Nodes,
    ];

    /// The API resource name (also the `resource` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            WatchResource::Pods => "pods",
            WatchResource::Namespaces => "namespaces",
            WatchResource::NetworkPolicies => "networkpolicies",
            WatchResource::Nodes => "nodes",
        }
    }

    /// Position in [`WatchResource::ALL`].
    pub fn position(self) -> usize {
        match self {
            WatchResource::Pods => 0,
            WatchResource::Namespaces => 1,
            WatchResource::NetworkPolicies => 2,
            WatchResource::Nodes => 3,
        }
    }
}

/// Where a source delivers what it learns. The agent's shared state implements it; the
/// cluster edge needs nothing else from the agent, so it does not depend on it.
pub trait IndexSink: Send + Sync + 'static {
    /// Change the index; `change` returns whether anything really changed.
    fn update(&self, change: impl FnOnce(&mut Index) -> bool);
    /// `kind` has completed a list (the first one, or a relist).
    fn mark_listed(&self, kind: WatchResource);
    /// One watch event of `kind` arrived (for the events metric).
    fn watch_event(&self, kind: WatchResource);
}
