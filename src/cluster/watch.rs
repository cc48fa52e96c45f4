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
use kube::runtime::watcher::{self, Event};
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

/// How a watcher gets its initial list, and every relist after a `410 Gone` or a lost
/// connection.
///
/// At 5,000 nodes every agent lists every pod of the cluster at start and on every relist. A
/// quorum LIST (resourceVersion unset) is read from etcd, page by page; a LIST with
/// `resourceVersion=0` is served from the API server's watch cache (what client-go informers
/// do); a streaming list (`sendInitialEvents=true`, Kubernetes 1.27+ `WatchList`) is a WATCH
/// that first replays the cache's current state object by object, which the watcher trims on
/// arrival, so neither the API server nor the agent ever holds a whole list response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InitialList {
    /// A streaming list; if the API server refuses it (422/400: the feature is off, or the
    /// server predates it), paginated lists from the watch cache from then on.
    #[default]
    Auto,
    /// Streaming lists only (retried with backoff if refused).
    Stream,
    /// LISTs with `resourceVersion=0`, served from the watch cache in one response (the cache
    /// does not paginate, and kube drops `resourceVersion=0` from a paginated request), as
    /// client-go informers list.
    Cache,
    /// Paginated quorum LISTs (resourceVersion unset), read from etcd: always current, costly
    /// at scale.
    Consistent,
}

impl InitialList {
    /// The name used in flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InitialList::Auto => "auto",
            InitialList::Stream => "stream",
            InitialList::Cache => "cache",
            InitialList::Consistent => "consistent",
        }
    }
}

/// How every watcher watches: the whole cluster; quorum lists page 500 objects at a time.
pub fn watcher_config(initial: InitialList) -> watcher::Config {
    let config = watcher::Config::default();
    match initial {
        InitialList::Auto | InitialList::Stream => config.streaming_lists(),
        InitialList::Cache => watcher::Config {
            page_size: None,
            ..config.any_semantic()
        },
        InitialList::Consistent => config,
    }
}

/// The API verbs a watcher started with `initial` may send. A list-then-watch strategy pages
/// through a LIST, then WATCHes from the list's resourceVersion (and LISTs again after a 410
/// Gone or a dropped connection); a streaming list is a WATCH alone; `auto` may fall back from
/// the one to the other. Never a GET.
pub fn watch_verbs(initial: InitialList) -> &'static [&'static str] {
    match initial {
        InitialList::Stream => &["watch"],
        InitialList::Auto | InitialList::Cache | InitialList::Consistent => &["list", "watch"],
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

/// Every API group, resource and verb the agent uses with the default [`InitialList`], sorted
/// by group and resource. The agent talks to the API server only through the watchers, so this
/// is everything it needs.
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
    let mut c = Collect(Vec::new(), watch_verbs(InitialList::default()));
    for_each_kind(&mut c);
    c.0.sort();
    c.0
}

/// Start one watcher per kind (see [`for_each_kind`]), each feeding `sink`.
pub fn spawn_all<S: IndexSink>(client: &Client, sink: &Arc<S>, initial: InitialList) {
    struct Spawn<'a, S>(&'a Client, &'a Arc<S>, InitialList);
    impl<S: IndexSink> KindVisitor for Spawn<'_, S> {
        fn visit<K: Watched>(&mut self) {
            tokio::spawn(watch::<K, S>(self.0.clone(), self.1.clone(), self.2));
        }
    }
    for_each_kind(&mut Spawn(client, sink, initial));
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
pub async fn watch<K: Watched, S: IndexSink>(client: Client, sink: Arc<S>, initial: InitialList) {
    let mut mode = initial;
    let mut restart_delay = RESTART_DELAY_MIN;
    loop {
        let fallback = mode == InitialList::Auto;
        match follow::<K, S>(&client, &sink, watcher_config(mode), fallback).await {
            Ended::Refused(refusal) => {
                tracing::warn!(
                    resource = K::RESOURCE.as_str(),
                    error = %refusal,
                    "the API server refuses streaming lists; listing from its watch cache (resourceVersion=0) instead"
                );
                mode = InitialList::Cache;
            }
            Ended::IncompleteList { listed_before } => {
                if listed_before {
                    restart_delay = RESTART_DELAY_MIN;
                }
                tracing::warn!(
                    resource = K::RESOURCE.as_str(),
                    retry_in_ms = restart_delay.as_millis(),
                    "a streaming list lost an object it could not read; listing again (the last complete state stays in force)"
                );
                tokio::time::sleep(restart_delay).await;
                restart_delay = (restart_delay * 2).min(RESTART_DELAY_MAX);
            }
            Ended::Stream => return,
        }
    }
}

/// Backoff between restarts of a watcher whose streaming list was incomplete.
const RESTART_DELAY_MIN: std::time::Duration = std::time::Duration::from_millis(500);
const RESTART_DELAY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Why [`follow`] returned.
enum Ended {
    /// The stream ended (it does not, under the backoff wrapper).
    Stream,
    /// The API server refused the streaming list asked for (and falling back was allowed).
    Refused(String),
    /// An initial (streaming) list reported an error part way, so it may be missing an object:
    /// it was not applied, and the watcher must list again. `listed_before` says whether this
    /// run had completed a list earlier (then the backoff starts afresh).
    IncompleteList { listed_before: bool },
}

/// Whether an error is the API server refusing a streaming list: the first WATCH with
/// `sendInitialEvents=true` answered 422 (the `WatchList` feature is off, or the server is
/// older than 1.27 and forbids `resourceVersionMatch` on a watch) or 400.
fn refuses_streaming(e: &watcher::Error) -> Option<&kube::core::Status> {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
            if matches!(status.code, 400 | 422) =>
        {
            Some(status)
        }
        _ => None,
    }
}

/// Run one watcher with `config` until it must be restarted (see [`Ended`]).
///
/// A list replaces the kind only when it arrived whole. A paginated list that fails is retried
/// by kube-runtime from its start (a new `Init`). A streaming list is one WATCH; an event in it
/// that cannot be read is reported as an error and skipped, and the list would then complete
/// without that object, which for a NetworkPolicy means enforcing less than the cluster says.
/// So an error inside a list discards it, and a streaming list so discarded restarts the
/// watcher.
async fn follow<K: Watched, S: IndexSink>(
    client: &Client,
    sink: &Arc<S>,
    config: watcher::Config,
    fallback: bool,
) -> Ended {
    let api: Api<K> = Api::all(client.clone());
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut buffer: Option<Vec<K::Info>> = None;
    let mut discarded = false;
    let mut listed = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                if fallback && let Some(status) = refuses_streaming(&e) {
                    return Ended::Refused(format!(
                        "{} {}: {}",
                        status.code, status.reason, status.message
                    ));
                }
                if buffer.take().is_some() {
                    discarded = true;
                }
                // The backoff wrapper retries; the last good state stays in force.
                tracing::warn!(resource = K::RESOURCE.as_str(), error = %e, "watch failed; retrying with backoff");
                continue;
            }
        };
        sink.watch_event(K::RESOURCE);
        match event {
            Event::Init => {
                buffer = Some(Vec::new());
                discarded = false;
            }
            Event::InitApply(obj) => {
                // Trimmed here, one object at a time: a large list never sits in memory whole.
                if let (Some(buf), Some(info)) = (buffer.as_mut(), trim_logged(&obj)) {
                    buf.push(info);
                }
            }
            Event::InitDone => {
                let Some(all) = buffer.take() else {
                    if discarded {
                        return Ended::IncompleteList {
                            listed_before: listed,
                        };
                    }
                    continue;
                };
                let count = all.len();
                sink.update(|idx| K::reset(idx, all));
                sink.mark_listed(K::RESOURCE);
                listed = true;
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
    Ended::Stream
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
    use kube::runtime::watcher::InitialListStrategy;

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
                "auto may fall back to lists",
                InitialList::Auto,
                &["list", "watch"][..],
            ),
            (
                "streaming lists are watches",
                InitialList::Stream,
                &["watch"][..],
            ),
            (
                "lists from the cache",
                InitialList::Cache,
                &["list", "watch"][..],
            ),
            (
                "quorum lists",
                InitialList::Consistent,
                &["list", "watch"][..],
            ),
        ];
        for (name, initial, want) in cases {
            assert_eq!(watch_verbs(initial), want, "case {name}");
        }
    }

    #[test]
    fn configs_follow_the_list_strategy() {
        struct Case {
            name: &'static str,
            initial: InitialList,
            streaming: bool,
            at_version_0: bool,
            page: Option<u32>,
        }
        let cases = [
            Case {
                name: "auto starts streaming",
                initial: InitialList::Auto,
                streaming: true,
                at_version_0: false,
                page: Some(500),
            },
            Case {
                name: "stream",
                initial: InitialList::Stream,
                streaming: true,
                at_version_0: false,
                page: Some(500),
            },
            Case {
                name: "cache lists at resourceVersion 0, unpaged",
                initial: InitialList::Cache,
                streaming: false,
                at_version_0: true,
                page: None,
            },
            Case {
                name: "consistent lists are paged quorum reads",
                initial: InitialList::Consistent,
                streaming: false,
                at_version_0: false,
                page: Some(500),
            },
        ];
        for Case {
            name,
            initial,
            streaming,
            at_version_0,
            page,
        } in cases
        {
            let c = watcher_config(initial);
            assert_eq!(
                c.initial_list_strategy == InitialListStrategy::StreamingList,
                streaming,
                "case {name}"
            );
            assert_eq!(
                c.list_semantic == watcher::ListSemantic::Any,
                at_version_0,
                "case {name}"
            );
            assert_eq!(c.page_size, page, "case {name}");
        }
    }
}
