//! The watch edge: Pods, Namespaces, NetworkPolicies and Nodes from the API server into the
//! index.
//!
//! Each kind has its own kube-runtime watcher with the default backoff. Objects are trimmed
//! to their model type the moment they arrive, so the agent never holds whole Pods. A relist
//! (after a 410 Gone, a dropped connection or a restart) is buffered from `Init` to
//! `InitDone` and then replaces the kind atomically, so a half-finished list can never make
//! the agent forget a policy. Until every kind has completed their first list, nothing
//! is written to the kernel (the agent's rule; the watchers only report each first list to
//! their [`IndexSink`]).
//!
//! The kinds the agent watches are listed once, in [`for_each_kind`], and the requests the
//! watchers make follow from [`watcher_config`]. [`api_access`] derives from those two the
//! API groups, resources and verbs the agent needs, which is what `deploy/`'s ClusterRole must
//! grant, exactly (`tests/deploy.rs` compares them, and `tests/agent_e2e.rs` checks every
//! request a running agent sends against them).
//!
//! [`list_once`] is the one-shot form for commands that ask about the live cluster
//! (`explain --kubeconfig`): the same kinds, the same trimming, one consistent list each.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event, InitialListStrategy};
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use crate::cluster::{IndexSink, WatchResource};
use crate::engine::index::Index;
use crate::model::{NamespaceInfo, NodeInfo, ObjectKey, PodInfo, Policy};

/// A Kubernetes kind the agent watches, and how it maps onto the index.
pub trait Watched:
    kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    /// The trimmed form kept in the index.
    type Info: Send;
    /// Which resource, for metrics and logs.
    const RESOURCE: WatchResource;
    /// Trim; `Err` is a message naming the object, logged and skipped.
    fn trim(&self, warnings: &mut Vec<String>) -> Result<Self::Info, String>;
    /// Store one.
    fn apply(index: &mut Index, info: Self::Info) -> bool;
    /// Remove one.
    fn delete(index: &mut Index, obj: &Self) -> bool;
    /// Replace all.
    fn reset(index: &mut Index, all: Vec<Self::Info>) -> bool;
}

fn key_of(meta: &kube::api::ObjectMeta) -> Option<ObjectKey> {
    Some(ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?))
}

impl Watched for Pod {
    type Info = PodInfo;
    const RESOURCE: WatchResource = WatchResource::Pods;
    fn trim(&self, warnings: &mut Vec<String>) -> Result<PodInfo, String> {
        PodInfo::from_k8s(self, warnings).map_err(|e| e.to_string())
    }
    fn apply(index: &mut Index, info: PodInfo) -> bool {
        index.apply_pod(info)
    }
    fn delete(index: &mut Index, obj: &Self) -> bool {
        key_of(&obj.metadata).is_some_and(|k| index.delete_pod(&k))
    }
    fn reset(index: &mut Index, all: Vec<PodInfo>) -> bool {
        index.reset_pods(all)
    }
}

impl Watched for Namespace {
    type Info = NamespaceInfo;
    const RESOURCE: WatchResource = WatchResource::Namespaces;
    fn trim(&self, _warnings: &mut Vec<String>) -> Result<NamespaceInfo, String> {
        NamespaceInfo::from_k8s(self).map_err(|e| e.to_string())
    }
    fn apply(index: &mut Index, info: NamespaceInfo) -> bool {
        index.apply_namespace(info)
    }
    fn delete(index: &mut Index, obj: &Self) -> bool {
        obj.metadata
            .name
            .as_deref()
            .is_some_and(|n| index.delete_namespace(n))
    }
    fn reset(index: &mut Index, all: Vec<NamespaceInfo>) -> bool {
        index.reset_namespaces(all)
    }
}

impl Watched for NetworkPolicy {
    type Info = Policy;
    const RESOURCE: WatchResource = WatchResource::NetworkPolicies;
    fn trim(&self, warnings: &mut Vec<String>) -> Result<Policy, String> {
        let mut ignored = Vec::new();
        let p = Policy::from_k8s(self, &mut ignored);
        warnings.extend(ignored.iter().map(ToString::to_string));
        let p = p.map_err(|e| {
            let key = key_of(&self.metadata)
                .map(|k| k.to_string())
                .unwrap_or_default();
            format!("NetworkPolicy {key} is invalid and ignored: {e}")
        })?;
        if let Some(reason) = &p.invalid {
            warnings.push(format!(
                "NetworkPolicy {} is invalid: {reason}; it still isolates the pods it selects but allows nothing",
                p.key
            ));
        }
        Ok(p)
    }
    fn apply(index: &mut Index, info: Policy) -> bool {
        index.apply_policy(info)
    }
    fn delete(index: &mut Index, obj: &Self) -> bool {
        key_of(&obj.metadata).is_some_and(|k| index.delete_policy(&k))
    }
    fn reset(index: &mut Index, all: Vec<Policy>) -> bool {
        index.reset_policies(all)
    }
}

impl Watched for Node {
    type Info = NodeInfo;
    const RESOURCE: WatchResource = WatchResource::Nodes;
    fn trim(&self, warnings: &mut Vec<String>) -> Result<NodeInfo, String> {
        NodeInfo::from_k8s(self, warnings).map_err(|e| e.to_string())
    }
    fn apply(index: &mut Index, info: NodeInfo) -> bool {
        index.apply_node(info)
    }
    fn delete(index: &mut Index, obj: &Self) -> bool {
        obj.metadata
            .name
            .as_deref()
            .is_some_and(|n| index.delete_node(n))
    }
    fn reset(index: &mut Index, all: Vec<NodeInfo>) -> bool {
        index.reset_nodes(all)
    }
}

/// Something done once for every kind the agent watches (see [`for_each_kind`]).
pub trait KindVisitor {
    /// Called once per watched kind.
    fn visit<K: Watched>(&mut self);
}

/// The kinds the agent watches: the one list that both starting the watchers and the RBAC
/// the agent needs ([`api_access`]) come from.
pub fn for_each_kind(v: &mut impl KindVisitor) {
    v.visit::<Pod>();
    v.visit::<Namespace>();
    v.visit::<NetworkPolicy>();
    v.visit::<Node>();
}

/// How every watcher watches: the whole cluster, with kube-runtime's defaults.
pub fn watcher_config() -> watcher::Config {
    watcher::Config::default()
}

/// The API verbs a watcher with `config` sends. With the default list-then-watch strategy it
/// pages through a LIST, then WATCHes from the list's resourceVersion (and LISTs again after
/// a 410 Gone or a dropped connection); a streaming list is a WATCH alone. Never a GET.
pub fn watch_verbs(config: &watcher::Config) -> &'static [&'static str] {
    match config.initial_list_strategy {
        InitialListStrategy::ListWatch => &["list", "watch"],
        InitialListStrategy::StreamingList => &["watch"],
    }
}

/// Access the agent needs to one resource, as a ClusterRole rule would grant it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiAccess {
    /// API group (`""` for the core group).
    pub group: String,
    /// Resource, plural (`pods`).
    pub resource: String,
    /// Verbs, sorted.
    pub verbs: Vec<&'static str>,
}

/// Every API group, resource and verb the agent uses, sorted by group and resource. The agent
/// talks to the API server only through the watchers, so this is everything it needs.
pub fn api_access() -> Vec<ApiAccess> {
    struct Collect(Vec<ApiAccess>, &'static [&'static str]);
    impl KindVisitor for Collect {
        fn visit<K: Watched>(&mut self) {
            let mut verbs = self.1.to_vec();
            verbs.sort_unstable();
            self.0.push(ApiAccess {
                group: K::group(&()).into_owned(),
                resource: K::plural(&()).into_owned(),
                verbs,
            });
        }
    }
    let mut c = Collect(Vec::new(), watch_verbs(&watcher_config()));
    for_each_kind(&mut c);
    c.0.sort();
    c.0
}

/// Start one watcher per kind (see [`for_each_kind`]), each feeding `sink`.
pub fn spawn_all<S: IndexSink>(client: &Client, sink: &Arc<S>) {
    struct Spawn<'a, S>(&'a Client, &'a Arc<S>);
    impl<S: IndexSink> KindVisitor for Spawn<'_, S> {
        fn visit<K: Watched>(&mut self) {
            tokio::spawn(watch::<K, S>(self.0.clone(), self.1.clone()));
        }
    }
    for_each_kind(&mut Spawn(client, sink));
}

fn trim_logged<K: Watched>(obj: &K) -> Option<K::Info> {
    let mut warnings = Vec::new();
    let out = obj.trim(&mut warnings);
    for w in warnings {
        tracing::warn!(resource = K::RESOURCE.as_str(), "{w}");
    }
    match out {
        Ok(info) => Some(info),
        Err(e) => {
            tracing::warn!(resource = K::RESOURCE.as_str(), "skipping object: {e}");
            None
        }
    }
}

/// Watch one kind until the process ends, feeding `sink`.
pub async fn watch<K: Watched, S: IndexSink>(client: Client, sink: Arc<S>) {
    let api: Api<K> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher_config())
        .default_backoff()
        .boxed();
    let mut buffer: Option<Vec<K::Info>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                // The backoff wrapper retries; the last good state stays in force.
                tracing::warn!(resource = K::RESOURCE.as_str(), error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        sink.watch_event(K::RESOURCE);
        match event {
            Event::Init => buffer = Some(Vec::new()),
            Event::InitApply(obj) => {
                if let (Some(buf), Some(info)) = (buffer.as_mut(), trim_logged(&obj)) {
                    buf.push(info);
                }
            }
            Event::InitDone => {
                let all = buffer.take().unwrap_or_default();
                let count = all.len();
                sink.update(|idx| K::reset(idx, all));
                sink.mark_listed(K::RESOURCE);
                tracing::info!(
                    resource = K::RESOURCE.as_str(),
                    objects = count,
                    "list complete"
                );
            }
            Event::Apply(obj) => {
                if let Some(info) = trim_logged(&obj) {
                    sink.update(|idx| K::apply(idx, info));
                }
            }
            Event::Delete(obj) => sink.update(|idx| K::delete(idx, &obj)),
        }
    }
}

/// A one-shot list that failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The API server did not answer the list, or refused it.
    #[error("listing {resource} from the API server: {source}")]
    List {
        /// Which resource.
        resource: &'static str,
        /// Cause.
        source: kube::Error,
    },
}

/// List one kind completely (following `continue` tokens), trimmed as the watcher trims it.
async fn list_kind<K: Watched>(client: &Client) -> Result<Vec<K::Info>, ListError> {
    let api: Api<K> = Api::all(client.clone());
    let mut params = ListParams::default().limit(500);
    let mut out = Vec::new();
    loop {
        let page = api.list(&params).await.map_err(|source| ListError::List {
            resource: K::RESOURCE.as_str(),
            source,
        })?;
        out.extend(page.items.iter().filter_map(trim_logged));
        match page.metadata.continue_.filter(|t| !t.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// List every watched kind once into a fresh index; warnings about single objects are logged,
/// as the watcher logs them.
pub async fn list_once(client: &Client) -> Result<Index, ListError> {
    let namespaces = list_kind::<Namespace>(client).await?;
    let pods = list_kind::<Pod>(client).await?;
    let policies = list_kind::<NetworkPolicy>(client).await?;
    let nodes = list_kind::<Node>(client).await?;
    let mut index = Index::new();
    index.reset_namespaces(namespaces);
    index.reset_pods(pods);
    index.reset_policies(policies);
    index.reset_nodes(nodes);
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_covers_every_kind_with_list_and_watch() {
        let got: Vec<(String, String, Vec<&str>)> = api_access()
            .into_iter()
            .map(|a| (a.group, a.resource, a.verbs))
            .collect();
        let lw = vec!["list", "watch"];
        assert_eq!(
            got,
            [
                ("".to_string(), "namespaces".to_string(), lw.clone()),
                ("".to_string(), "nodes".to_string(), lw.clone()),
                ("".to_string(), "pods".to_string(), lw.clone()),
                (
                    "networking.k8s.io".to_string(),
                    "networkpolicies".to_string(),
                    lw
                ),
            ]
        );
    }

    #[test]
    fn verbs_follow_the_list_strategy() {
        let cases = [
            (
                "list then watch",
                InitialListStrategy::ListWatch,
                &["list", "watch"][..],
            ),
            (
                "streaming list",
                InitialListStrategy::StreamingList,
                &["watch"][..],
            ),
        ];
        for (name, strategy, want) in cases {
            let config = watcher::Config {
                initial_list_strategy: strategy,
                ..watcher::Config::default()
            };
            assert_eq!(watch_verbs(&config), want, "case {name}");
        }
    }
}
