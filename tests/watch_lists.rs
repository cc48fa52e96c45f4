//! What the agent's watchers ask the API server for, at start and on every relist.
//!
//! At 5,000 nodes every agent lists every pod of the cluster at start and after each `410
//! Gone`, so how it lists matters to the API server: a streaming list (a WATCH with
//! `sendInitialEvents=true`) or a LIST with `resourceVersion=0` is served from the watch cache;
//! a LIST without a resourceVersion is a quorum read from etcd. The real watchers
//! (`cluster::watch::spawn_all`, kube-runtime underneath) run here against the fake API server,
//! which records every request; the test checks the requests of the first lists and of a
//! relist forced by compaction, with a server that supports streaming lists and with one that
//! refuses them (422, as an API server with `WatchList` off or older than 1.27 answers).

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, FakeApiServerOptions, RecordedRequest, namespace, pod};
use kube_nftpolicy::cluster::watch::{InitialList, spawn_all};
use kube_nftpolicy::cluster::{IndexSink, WatchResource};
use kube_nftpolicy::engine::index::{Index, Snapshot};
use serde_json::json;

/// Records what the watchers deliver, as the agent's shared state would.
#[derive(Default)]
struct Recorder {
    index: Mutex<Index>,
    lists: Mutex<Vec<WatchResource>>,
}

impl IndexSink for Recorder {
    fn update(&self, change: impl FnOnce(&mut Index) -> bool) {
        change(&mut self.index.lock().expect("index"));
    }
    fn mark_listed(&self, kind: WatchResource) {
        self.lists.lock().expect("lists").push(kind);
    }
    fn watch_event(&self, _kind: WatchResource) {}
}

impl Recorder {
    fn lists_of(&self, kind: WatchResource) -> usize {
        self.lists
            .lock()
            .expect("lists")
            .iter()
            .filter(|k| **k == kind)
            .count()
    }
    fn snapshot(&self) -> Snapshot {
        self.index.lock().expect("index").snapshot()
    }
}

/// The cluster-wide collection each watcher uses.
const PATHS: [(WatchResource, &str); 4] = [
    (WatchResource::Pods, "/api/v1/pods"),
    (WatchResource::Namespaces, "/api/v1/namespaces"),
    (
        WatchResource::NetworkPolicies,
        "/apis/networking.k8s.io/v1/networkpolicies",
    ),
    (WatchResource::Nodes, "/api/v1/nodes"),
];

fn node(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"zone": "a"}},
        "spec": {"podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.3"}]}
    })
}

async fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one collection's requests looked like.
fn describe(r: &RecordedRequest) -> String {
    let mut q: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    q.sort();
    format!("{} {}?{}", r.verb, r.path, q.join("&"))
}

fn on(requests: &[RecordedRequest], path: &str) -> Vec<RecordedRequest> {
    requests
        .iter()
        .filter(|r| r.path == path && matches!(r.verb.as_str(), "list" | "watch"))
        .cloned()
        .collect()
}

fn is_streaming_list(r: &RecordedRequest) -> bool {
    r.verb == "watch"
        && r.param("sendInitialEvents") == Some("true")
        && r.param("resourceVersionMatch") == Some("NotOlderThan")
}

fn is_cache_list(r: &RecordedRequest) -> bool {
    r.verb == "list"
        && r.param("resourceVersion") == Some("0")
        && r.param("resourceVersionMatch") == Some("NotOlderThan")
        && r.param("continue").is_none()
}

fn is_quorum_list(r: &RecordedRequest) -> bool {
    r.verb == "list" && r.param("resourceVersion").is_none_or(str::is_empty)
}

struct Case {
    name: &'static str,
    server_streams: bool,
    initial: InitialList,
    /// Check the requests on one collection for the first list.
    first: fn(&[RecordedRequest]) -> Result<(), String>,
    /// Check the requests on one collection for the relist after compaction.
    relist: fn(&[RecordedRequest]) -> Result<(), String>,
}

fn streamed_only(reqs: &[RecordedRequest]) -> Result<(), String> {
    match reqs.first() {
        Some(r) if is_streaming_list(r) => {}
        _ => return Err("the first request is not a streaming list".into()),
    }
    if reqs.iter().any(|r| r.verb == "list") {
        return Err("a LIST was sent although streaming lists work".into());
    }
    Ok(())
}

fn refused_then_cache(reqs: &[RecordedRequest]) -> Result<(), String> {
    let (Some(first), Some(second)) = (reqs.first(), reqs.get(1)) else {
        return Err("fewer than two requests".into());
    };
    if !is_streaming_list(first) {
        return Err("auto does not try a streaming list first".into());
    }
    if !is_cache_list(second) {
        return Err(
            "after the refusal, the next request is not a LIST at resourceVersion=0".into(),
        );
    }
    let Some(watch) = reqs.get(2) else {
        return Err("no WATCH after the list".into());
    };
    if watch.verb != "watch"
        || watch.param("sendInitialEvents").is_some()
        || watch
            .param("resourceVersion")
            .is_none_or(|v| v == "0" || v.is_empty())
    {
        return Err(
            "the WATCH after the list does not resume from the list's resourceVersion".into(),
        );
    }
    if reqs.iter().any(is_quorum_list) {
        return Err("a quorum LIST (no resourceVersion) was sent".into());
    }
    Ok(())
}

fn cache_lists_only(reqs: &[RecordedRequest]) -> Result<(), String> {
    if !reqs.iter().any(is_cache_list) {
        return Err("no LIST at resourceVersion=0".into());
    }
    if reqs.iter().any(is_streaming_list) {
        return Err("the refusal was forgotten: a streaming list was tried again".into());
    }
    if reqs.iter().any(is_quorum_list) {
        return Err("a quorum LIST (no resourceVersion) was sent".into());
    }
    Ok(())
}

fn relist_streamed(reqs: &[RecordedRequest]) -> Result<(), String> {
    if !reqs.iter().any(is_streaming_list) {
        return Err("the relist is not a streaming list".into());
    }
    if reqs.iter().any(|r| r.verb == "list") {
        return Err("a LIST was sent although streaming lists work".into());
    }
    Ok(())
}

fn relist_quorum(reqs: &[RecordedRequest]) -> Result<(), String> {
    if !reqs.iter().any(is_quorum_list) {
        return Err("the relist is not a quorum LIST".into());
    }
    if reqs
        .iter()
        .any(|r| is_streaming_list(r) || is_cache_list(r))
    {
        return Err("`consistent` used the watch cache".into());
    }
    Ok(())
}

fn quorum_lists(reqs: &[RecordedRequest]) -> Result<(), String> {
    if !reqs.first().is_some_and(is_quorum_list) {
        return Err("the first request is not a quorum LIST".into());
    }
    if reqs
        .iter()
        .any(|r| is_streaming_list(r) || is_cache_list(r))
    {
        return Err("`consistent` used the watch cache".into());
    }
    Ok(())
}

const CASES: &[Case] = &[
    Case {
        name: "auto against a server with streaming lists",
        server_streams: true,
        initial: InitialList::Auto,
        first: streamed_only,
        relist: relist_streamed,
    },
    Case {
        name: "auto against a server that refuses them",
        server_streams: false,
        initial: InitialList::Auto,
        first: refused_then_cache,
        relist: cache_lists_only,
    },
    Case {
        name: "consistent, on request",
        server_streams: true,
        initial: InitialList::Consistent,
        first: quorum_lists,
        relist: relist_quorum,
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_lists_and_relists_ask_for_what_they_should() {
    const T: Duration = Duration::from_secs(20);
    for case in CASES {
        let server = FakeApiServer::with_options(FakeApiServerOptions {
            streaming_lists: case.server_streams,
            ..FakeApiServerOptions::default()
        });
        server.apply(namespace("ns-a", &[("team", "a")]));
        server.apply(pod(
            "ns-a",
            "p1",
            "n1",
            &[("app", "web")],
            &["10.244.1.2"],
            &[],
        ));
        server.apply(pod(
            "ns-a",
            "p2",
            "n1",
            &[("app", "db")],
            &["10.244.1.3"],
            &[],
        ));
        server.apply(node("n1"));
        let sink = Arc::new(Recorder::default());
        spawn_all(&server.client(), &sink, case.initial);

        wait_for(&format!("{}: first lists", case.name), T, || {
            PATHS.iter().all(|(k, _)| sink.lists_of(*k) >= 1)
        })
        .await;
        // The watch after a list may still be on its way; give it a moment to be recorded.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let snap = sink.snapshot();
        assert_eq!(
            (snap.pods.len(), snap.namespaces.len(), snap.nodes.len()),
            (2, 1, 1),
            "case {:?}: the index holds what the server holds",
            case.name
        );
        let requests = server.requests();
        for (_, path) in PATHS {
            let reqs = on(&requests, path);
            let seen: Vec<String> = reqs.iter().map(describe).collect();
            (case.first)(&reqs).unwrap_or_else(|e| {
                panic!(
                    "case {:?}, first list of {path}: {e}; requests: {seen:#?}",
                    case.name
                )
            });
        }

        // Force a relist: while the server is down the history moves on and is compacted, so
        // every watcher's resume point is gone (410) when it reconnects.
        server.stop();
        server.clear_requests();
        server.apply(pod(
            "ns-a",
            "p3",
            "n1",
            &[("app", "web")],
            &["10.244.1.4"],
            &[],
        ));
        server.apply(node("n2"));
        server.apply(namespace("ns-b", &[]));
        server.compact();
        let relisted = [
            WatchResource::Pods,
            WatchResource::Nodes,
            WatchResource::Namespaces,
        ];
        let before: Vec<usize> = relisted.iter().map(|k| sink.lists_of(*k)).collect();
        server.start();
        wait_for(&format!("{}: relists", case.name), T, || {
            let snap = sink.snapshot();
            relisted
                .iter()
                .zip(&before)
                .all(|(k, n)| sink.lists_of(*k) > *n)
                && (snap.pods.len(), snap.nodes.len(), snap.namespaces.len()) == (3, 2, 2)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let requests = server.requests();
        for path in ["/api/v1/pods", "/api/v1/nodes", "/api/v1/namespaces"] {
            // The first request is the reconnecting watch that meets the 410; the relist follows.
            let reqs = on(&requests, path);
            let seen: Vec<String> = reqs.iter().map(describe).collect();
            (case.relist)(&reqs).unwrap_or_else(|e| {
                panic!(
                    "case {:?}, relist of {path}: {e}; requests: {seen:#?}",
                    case.name
                )
            });
        }
        server.stop();
    }
}
