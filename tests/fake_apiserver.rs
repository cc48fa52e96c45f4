//! Self-test of `tests/support/fake_apiserver.rs` against a real `kube::Client` and the real
//! `kube::runtime::watcher`.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::fmt::Debug;
use std::time::{Duration, Instant};

use fake_apiserver::{
    FakeApiServer, FakeApiServerOptions, namespace, network_policy_from_yaml, pod,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, VersionMatch};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const NP_WEB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-web
  namespace: ns-a
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          team: a
    ports:
    - port: 8080
      protocol: TCP
    - port: http
"#;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// Watcher items, produced by a task that keeps polling the watcher (so that it re-opens its
/// watch without the test having to poll) and pauses 100 ms after each error, as a backoff would.
type WatchStream<K> = tokio::sync::mpsc::UnboundedReceiver<Result<Event<K>, watcher::Error>>;

fn start_watcher<K>(api: Api<K>, cfg: watcher::Config) -> WatchStream<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut w = watcher::watcher(api, cfg).boxed();
        while let Some(item) = w.next().await {
            let failed = item.is_err();
            if tx.send(item).is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    rx
}

fn obj_desc<K: ResourceExt>(k: &K) -> String {
    let v = k.labels().get("v").cloned().unwrap_or_default();
    let ns = k.namespace().map(|n| format!("{n}/")).unwrap_or_default();
    format!("{ns}{} v={v}", k.name_any())
}

/// A compact, comparable description of one watcher item. Connection-level errors (whose
/// exact kind depends on timing) are all `Err(other)`; a watch ERROR event is `Err(<code>)`.
fn describe<K: ResourceExt>(ev: &Result<Event<K>, watcher::Error>) -> String {
    match ev {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(k)) => format!("InitApply({})", obj_desc(k)),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(k)) => format!("Apply({})", obj_desc(k)),
        Ok(Event::Delete(k)) => format!("Delete({})", obj_desc(k)),
        Err(watcher::Error::WatchError(s)) => format!("Err({})", s.code),
        Err(_) => "Err(other)".into(),
    }
}

/// Takes items until `n` items other than `Err(other)` were seen. Returns (descriptions
/// without `Err(other)`, objects of the Apply/Delete/InitApply events, number of `Err(other)`).
async fn collect<K: ResourceExt>(
    w: &mut WatchStream<K>,
    n: usize,
    timeout: Duration,
) -> (Vec<String>, Vec<K>, usize) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut objs = Vec::new();
    let mut other_errors = 0;
    while seen.len() < n {
        let item = match tokio::time::timeout_at(deadline, w.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("watcher ended; got so far {seen:?}"),
            Err(_) => panic!("timed out waiting for {n} watcher events; got {seen:?}"),
        };
        let d = describe(&item);
        match item {
            Err(e) => {
                if d == "Err(other)" {
                    other_errors += 1;
                } else {
                    seen.push(d);
                }
                eprintln!("watcher error: {e}");
            }
            Ok(Event::Apply(k) | Event::Delete(k) | Event::InitApply(k)) => {
                seen.push(d);
                objs.push(k);
            }
            Ok(_) => seen.push(d),
        }
    }
    (seen, objs, other_errors)
}

fn watch_rvs(server: &FakeApiServer, path: &str) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| r.verb == "watch" && r.path == path)
        .map(|r| r.param("resourceVersion").unwrap_or_default().to_string())
        .collect()
}

fn pod_v(ns: &str, name: &str, v: &str) -> Value {
    pod(
        ns,
        name,
        "node-1",
        &[("app", "web"), ("v", v)],
        &["10.0.0.1"],
        &[],
    )
}

/// A minimal HTTP/1.1 client reading a (possibly chunked) response line by line.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    reader: BufReader<tokio::net::TcpStream>,
    chunked: bool,
    buf: Vec<u8>,
    ended: bool,
}

async fn raw_get(port: u16, path: &str) -> RawResponse {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to fake apiserver");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header has a colon");
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    RawResponse {
        status,
        headers,
        reader,
        chunked,
        buf: Vec::new(),
        ended: false,
    }
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next newline-terminated line of the body; `None` once the body has ended.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            if self.ended {
                if self.buf.is_empty() {
                    return None;
                }
                let rest = std::mem::take(&mut self.buf);
                return Some(String::from_utf8_lossy(&rest).to_string());
            }
            if self.chunked {
                let mut size = String::new();
                self.reader.read_line(&mut size).await.expect("chunk size");
                let size = usize::from_str_radix(size.trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
                if size == 0 {
                    let mut crlf = String::new();
                    let _ = self.reader.read_line(&mut crlf).await;
                    self.ended = true;
                    continue;
                }
                let mut chunk = vec![0u8; size + 2];
                self.reader
                    .read_exact(&mut chunk)
                    .await
                    .expect("chunk data");
                chunk.truncate(size);
                self.buf.extend(chunk);
            } else {
                self.reader.read_to_end(&mut self.buf).await.expect("body");
                self.ended = true;
            }
        }
    }

    async fn next_json(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(Duration::from_secs(5), self.next_line())
            .await
            .expect("timed out waiting for a body line")?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_get_selectors_and_discovery_with_a_real_client() {
    let server = FakeApiServer::new();
    server.apply(namespace("ns-a", &[("team", "a")]));
    server.apply(namespace("ns-b", &[]));
    let web1 = server.apply(pod(
        "ns-a",
        "web-1",
        "node-1",
        &[("app", "web")],
        &["10.0.0.1", "fd00::1"],
        &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
    ));
    server.apply(pod(
        "ns-a",
        "db-1",
        "node-2",
        &[("app", "db")],
        &["10.0.0.2"],
        &[],
    ));
    server.apply(pod(
        "ns-b",
        "web-2",
        "node-1",
        &[("app", "web")],
        &["10.0.1.1"],
        &[],
    ));
    server.apply(network_policy_from_yaml(NP_WEB));
    assert_eq!(server.resource_version(), 6);
    // A replace with identical content is a no-op, as on a real apiserver.
    let again = server.apply(pod(
        "ns-a",
        "web-1",
        "node-1",
        &[("app", "web")],
        &["10.0.0.1", "fd00::1"],
        &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
    ));
    assert_eq!(again, web1);
    assert_eq!(server.resource_version(), 6);

    let client = server.client();
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list pods");
    let names: Vec<String> = pods.items.iter().map(obj_desc).collect();
    assert_eq!(names, ["ns-a/db-1 v=", "ns-a/web-1 v=", "ns-b/web-2 v="]);
    assert_eq!(pods.metadata.resource_version.as_deref(), Some("6"));
    assert_eq!(pods.metadata.continue_, None);

    let p = &pods.items[1];
    assert_eq!(p.metadata.resource_version.as_deref(), Some("3"));
    assert_eq!(p.metadata.uid.as_deref(), web1["metadata"]["uid"].as_str());
    assert!(p.metadata.creation_timestamp.is_some());
    let spec = p.spec.as_ref().expect("spec");
    assert_eq!(spec.node_name.as_deref(), Some("node-1"));
    let ports: Vec<(Option<String>, i32, Option<String>)> = spec.containers[0]
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|cp| (cp.name.clone(), cp.container_port, cp.protocol.clone()))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("http".into()), 8080, Some("TCP".into())),
            (Some("dns".into()), 53, Some("UDP".into()))
        ]
    );
    let status = p.status.as_ref().expect("status");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    let ips: Vec<&str> = status
        .pod_ips
        .as_ref()
        .expect("podIPs")
        .iter()
        .map(|i| i.ip.as_str())
        .collect();
    assert_eq!(ips, ["10.0.0.1", "fd00::1"]);

    // Namespaced list and get.
    let in_a: Vec<String> = Api::<Pod>::namespaced(client.clone(), "ns-a")
        .list(&ListParams::default())
        .await
        .expect("list ns-a")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(in_a, ["db-1", "web-1"]);
    let got = Api::<Pod>::namespaced(client.clone(), "ns-a")
        .get("web-1")
        .await
        .expect("get web-1");
    assert_eq!(got.metadata.resource_version.as_deref(), Some("3"));
    match Api::<Pod>::namespaced(client.clone(), "ns-a")
        .get("nope")
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
            assert_eq!(s.message, "pods \"nope\" not found");
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // Namespaces carry the label the apiserver enforces.
    let nss = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list namespaces");
    let ns_labels: Vec<(String, Vec<(String, String)>)> = nss
        .items
        .iter()
        .map(|n| {
            (
                n.name_any(),
                n.labels()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        ns_labels,
        [
            (
                "ns-a".to_string(),
                vec![
                    (
                        "kubernetes.io/metadata.name".to_string(),
                        "ns-a".to_string()
                    ),
                    ("team".to_string(), "a".to_string())
                ]
            ),
            (
                "ns-b".to_string(),
                vec![(
                    "kubernetes.io/metadata.name".to_string(),
                    "ns-b".to_string()
                )]
            ),
        ]
    );

    // NetworkPolicies parse into the typed struct.
    let nps = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list netpols");
    assert_eq!(nps.items.len(), 1);
    let np = &nps.items[0];
    assert_eq!(np.namespace().as_deref(), Some("ns-a"));
    assert_eq!(np.metadata.generation, Some(1));
    let npspec = np.spec.as_ref().expect("np spec");
    assert_eq!(
        npspec
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|m| m.get("app"))
            .map(String::as_str),
        Some("web")
    );
    assert_eq!(
        npspec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let rule = &npspec.ingress.as_ref().expect("ingress")[0];
    let port_json = serde_json::to_value(rule.ports.as_ref().expect("ports")).expect("ser");
    assert_eq!(
        port_json,
        json!([{"port": 8080, "protocol": "TCP"}, {"port": "http"}])
    );

    // Label and field selectors.
    let sel = |labels: &'static str, fields: &'static str| {
        let api = Api::<Pod>::all(client.clone());
        async move {
            let mut lp = ListParams::default();
            if !labels.is_empty() {
                lp = lp.labels(labels);
            }
            if !fields.is_empty() {
                lp = lp.fields(fields);
            }
            api.list(&lp)
                .await
                .expect("selector list")
                .items
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(sel("app=web", "").await, ["web-1", "web-2"]);
    assert_eq!(
        sel("app=web", "spec.nodeName=node-1").await,
        ["web-1", "web-2"]
    );
    assert_eq!(sel("", "spec.nodeName=node-2").await, ["db-1"]);
    assert_eq!(sel("app in (db,cache)", "").await, ["db-1"]);
    assert_eq!(sel("app!=web", "").await, ["db-1"]);
    assert_eq!(sel("", "metadata.namespace!=ns-a").await, ["web-2"]);
    assert!(sel("missing", "").await.is_empty());

    // Request accounting.
    assert_eq!(server.request_count("list", "/api/v1/pods"), 8);
    assert_eq!(
        server.request_count("list", "/api/v1/namespaces/ns-a/pods"),
        1
    );
    assert_eq!(
        server.request_count("get", "/api/v1/namespaces/ns-a/pods/web-1"),
        1
    );
    assert_eq!(server.verb_count("get"), 2);

    // Discovery.
    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(
        (
            version.major.as_str(),
            version.minor.as_str(),
            version.git_version.as_str()
        ),
        ("1", "37", "v1.37.0-fake")
    );
    let gvk = kube::api::GroupVersionKind::gvk("networking.k8s.io", "v1", "NetworkPolicy");
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("legacy discovery");
    let (ar, caps) = discovery
        .resolve_gvk(&gvk)
        .expect("NetworkPolicy discovered");
    assert_eq!(ar.plural, "networkpolicies");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let aggregated = kube::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .expect("aggregated discovery");
    let pod_gvk = kube::api::GroupVersionKind::gvk("", "v1", "Pod");
    let (ar, _) = aggregated.resolve_gvk(&pod_gvk).expect("Pod discovered");
    assert_eq!(ar.plural, "pods");
    assert!(aggregated.resolve_gvk(&gvk).is_some());
}

#[tokio::test]
async fn paginated_list_is_complete_consistent_and_expires_after_compaction() {
    let server = FakeApiServer::new();
    for i in 0..7 {
        server.apply(pod_v("default", &format!("p{i}"), "1"));
    }
    let api = Api::<Pod>::all(server.client());

    // Paging with limit=3 returns every object exactly once, in order, at one resourceVersion.
    let mut names = Vec::new();
    let mut page_sizes = Vec::new();
    let mut rvs = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(3);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.expect("page");
        page_sizes.push(page.items.len());
        rvs.push(page.metadata.resource_version.clone().unwrap_or_default());
        names.extend(page.items.iter().map(ResourceExt::name_any));
        token = page.metadata.continue_.clone();
        if token.is_none() {
            assert_eq!(page.metadata.remaining_item_count, None);
            break;
        }
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
    assert_eq!(page_sizes, [3, 3, 1]);
    assert_eq!(rvs, ["7", "7", "7"]);
    assert_eq!(server.request_count("list", "/api/v1/pods"), 3);

    // Continue tokens serve the snapshot the first page was taken from.
    let first = api
        .list(&ListParams::default().limit(3))
        .await
        .expect("first page");
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    server.apply(pod_v("default", "p4", "2"));
    server.delete("Pod", "default", "p5").expect("p5 existed");
    server.apply(pod_v("default", "p9", "1"));
    let t1 = first.metadata.continue_.clone().expect("continue token");
    let second = api
        .list(&ListParams::default().limit(3).continue_token(&t1))
        .await
        .expect("second page");
    let second_desc: Vec<String> = second.items.iter().map(obj_desc).collect();
    assert_eq!(
        second_desc,
        ["default/p3 v=1", "default/p4 v=1", "default/p5 v=1"]
    );
    assert_eq!(second.metadata.resource_version.as_deref(), Some("7"));
    let t2 = second.metadata.continue_.clone().expect("continue token 2");
    let third = api
        .list(&ListParams::default().limit(3).continue_token(&t2))
        .await
        .expect("third page");
    let third_names: Vec<String> = third.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(third_names, ["p6"]);

    // An exact read of an old resourceVersion works until compaction...
    let exact = api
        .list(&ListParams::default().at("7").matching(VersionMatch::Exact))
        .await
        .expect("exact list at 7");
    assert_eq!(exact.items.len(), 7);
    server.compact();
    // ...and after it, both the continue token and the exact read get 410 Expired.
    match api
        .list(&ListParams::default().limit(3).continue_token(&t2))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(
                s.message
                    .starts_with("The provided continue parameter is too old"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 410, got {other:?}"),
    }
    match api
        .list(&ListParams::default().at("7").matching(VersionMatch::Exact))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert_eq!(s.message, "too old resource version: 7 (10)");
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // A fresh list sees the current state.
    let now: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("fresh list")
        .items
        .iter()
        .map(obj_desc)
        .collect();
    assert_eq!(
        now,
        [
            "default/p0 v=1",
            "default/p1 v=1",
            "default/p2 v=1",
            "default/p3 v=1",
            "default/p4 v=2",
            "default/p6 v=1",
            "default/p9 v=1"
        ]
    );
}

/// (verb, path, query parameters) of a recorded request.
type RequestSummary = (String, String, Vec<(String, String)>);

/// Init/InitApply/InitDone, then Apply for an update and a create, Delete for a deletion.
async fn check_watcher_lifecycle<K>(
    server: &FakeApiServer,
    api: Api<K>,
    cfg: watcher::Config,
    kind: &str,
    ns: Option<&str>,
    make: impl Fn(&str, &str) -> Value,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let prefix = ns.map(|n| format!("{n}/")).unwrap_or_default();
    server.apply(make("a", "1"));
    server.apply(make("b", "1"));
    let mut w = start_watcher(api, cfg);
    let (got, _, errs) = collect(&mut w, 4, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        [
            "Init".to_string(),
            format!("InitApply({prefix}a v=1)"),
            format!("InitApply({prefix}b v=1)"),
            "InitDone".to_string()
        ],
        "{kind}"
    );
    assert_eq!(errs, 0);
    server.apply(make("a", "2"));
    server.apply(make("c", "1"));
    let deleted = server.delete(kind, ns, "b").expect("b existed");
    let (got, objs, errs) = collect(&mut w, 3, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        [
            format!("Apply({prefix}a v=2)"),
            format!("Apply({prefix}c v=1)"),
            format!("Delete({prefix}b v=1)")
        ],
        "{kind}"
    );
    assert_eq!(errs, 0);
    let rvs: Vec<String> = objs
        .iter()
        .map(|o| o.resource_version().unwrap_or_default())
        .collect();
    assert_eq!(rvs, ["3", "4", "5"], "{kind}");
    assert_eq!(deleted["metadata"]["resourceVersion"], "5");
}

#[tokio::test]
async fn watcher_sees_init_apply_delete_for_pods_namespaces_and_network_policies() {
    // Pods, default watcher config (paged list + watch with bookmarks).
    let server = FakeApiServer::new();
    check_watcher_lifecycle(
        &server,
        Api::<Pod>::all(server.client()),
        watcher::Config::default(),
        "Pod",
        Some("default"),
        |name, v| pod_v("default", name, v),
    )
    .await;
    let reqs: Vec<RequestSummary> = server
        .requests()
        .into_iter()
        .map(|r| (r.verb, r.path, r.query.into_iter().collect()))
        .collect();
    let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        reqs,
        [
            ("list".into(), "/api/v1/pods".into(), q(&[("limit", "500")])),
            (
                "watch".into(),
                "/api/v1/pods".into(),
                q(&[
                    ("allowWatchBookmarks", "true"),
                    ("resourceVersion", "2"),
                    ("timeoutSeconds", "290"),
                    ("watch", "true")
                ])
            ),
        ]
    );

    // Namespaces, one object per page, no bookmarks.
    let server = FakeApiServer::new();
    check_watcher_lifecycle(
        &server,
        Api::<Namespace>::all(server.client()),
        watcher::Config::default().page_size(1).disable_bookmarks(),
        "Namespace",
        None,
        |name, v| namespace(name, &[("v", v)]),
    )
    .await;
    assert_eq!(server.request_count("list", "/api/v1/namespaces"), 2);
    assert_eq!(watch_rvs(&server, "/api/v1/namespaces"), ["2"]);

    // NetworkPolicies in one namespace, through a streaming list (sendInitialEvents).
    let server = FakeApiServer::new();
    let np = |name: &str, v: &str| {
        network_policy_from_yaml(&format!(
            "metadata: {{name: {name}, namespace: ns-a, labels: {{v: \"{v}\"}}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}\n"
        ))
    };
    check_watcher_lifecycle(
        &server,
        Api::<NetworkPolicy>::namespaced(server.client(), "ns-a"),
        watcher::Config::default().streaming_lists(),
        "NetworkPolicy",
        Some("ns-a"),
        np,
    )
    .await;
    assert_eq!(server.verb_count("list"), 0);
    let watches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.verb == "watch")
        .collect();
    assert_eq!(watches.len(), 1);
    assert_eq!(
        watches[0].path,
        "/apis/networking.k8s.io/v1/namespaces/ns-a/networkpolicies"
    );
    assert_eq!(watches[0].param("sendInitialEvents"), Some("true"));
    assert_eq!(
        watches[0].param("resourceVersionMatch"),
        Some("NotOlderThan")
    );
    assert_eq!(watches[0].param("resourceVersion"), Some("0"));

    // Pods again with the "Any" list semantic (resourceVersion=0 list).
    let server = FakeApiServer::new();
    check_watcher_lifecycle(
        &server,
        Api::<Pod>::namespaced(server.client(), "default"),
        watcher::Config::default().any_semantic(),
        "Pod",
        Some("default"),
        |name, v| pod_v("default", name, v),
    )
    .await;
}

#[tokio::test]
async fn watcher_with_label_selector_sees_objects_leave_and_enter() {
    let server = FakeApiServer::new();
    server.apply(pod(
        "default",
        "a",
        "n",
        &[("app", "web")],
        &["10.0.0.1"],
        &[],
    ));
    server.apply(pod(
        "default",
        "b",
        "n",
        &[("app", "db")],
        &["10.0.0.2"],
        &[],
    ));
    let mut w = start_watcher(
        Api::<Pod>::all(server.client()),
        watcher::Config::default().labels("app=web"),
    );
    let (got, _, _) = collect(&mut w, 3, Duration::from_secs(5)).await;
    assert_eq!(got, ["Init", "InitApply(default/a v=)", "InitDone"]);
    server.apply(pod(
        "default",
        "a",
        "n",
        &[("app", "db")],
        &["10.0.0.1"],
        &[],
    ));
    server.apply(pod(
        "default",
        "b",
        "n",
        &[("app", "web")],
        &["10.0.0.2"],
        &[],
    ));
    let (got, objs, _) = collect(&mut w, 2, Duration::from_secs(5)).await;
    assert_eq!(got, ["Delete(default/a v=)", "Apply(default/b v=)"]);
    assert_eq!(objs[0].labels().get("app").map(String::as_str), Some("db"));
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_dropped_watches() {
    // No periodic bookmarks here: the watcher's resourceVersion must stay behind the compaction.
    let server = FakeApiServer::with_options(FakeApiServerOptions {
        bookmark_interval: None,
        ..FakeApiServerOptions::default()
    });
    server.apply(pod_v("default", "a", "1"));
    server.apply(pod_v("default", "b", "1"));
    let mut w = start_watcher(Api::<Pod>::all(server.client()), watcher::Config::default());
    let (got, _, _) = collect(&mut w, 4, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        [
            "Init",
            "InitApply(default/a v=1)",
            "InitApply(default/b v=1)",
            "InitDone"
        ]
    );
    server.apply(pod_v("default", "a", "2"));
    server.apply(pod_v("default", "c", "1"));
    server.delete("Pod", "default", "b");
    let (got, _, _) = collect(&mut w, 3, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        [
            "Apply(default/a v=2)",
            "Apply(default/c v=1)",
            "Delete(default/b v=1)"
        ]
    );
    assert!(
        server
            .wait_for_open_watches(1, Duration::from_secs(5))
            .await
    );

    // Another kind moves the global resourceVersion on; the pod watch (at 5) does not see it.
    server.apply(namespace("unrelated", &[]));
    server.compact();
    assert_eq!(server.compacted_resource_version(), 6);
    let lists_before = server.verb_count("list");
    assert_eq!(server.drop_watches(), 1);

    let (got, _, _) = collect(&mut w, 5, Duration::from_secs(8)).await;
    assert_eq!(
        got,
        [
            "Err(410)",
            "Init",
            "InitApply(default/a v=2)",
            "InitApply(default/c v=1)",
            "InitDone"
        ]
    );
    assert_eq!(server.verb_count("list"), lists_before + 1);
    // Watched from the list (2), resumed from the last event (5: 410), then from the relist (6).
    assert!(
        server
            .wait_for_open_watches(1, Duration::from_secs(5))
            .await
    );
    assert_eq!(watch_rvs(&server, "/api/v1/pods"), ["2", "5", "6"]);

    server.apply(pod_v("default", "d", "1"));
    let (got, _, _) = collect(&mut w, 1, Duration::from_secs(5)).await;
    assert_eq!(got, ["Apply(default/d v=1)"]);
}

#[tokio::test]
async fn watcher_recovers_after_server_restart_on_the_same_port() {
    let server = FakeApiServer::new();
    let port = server.port();
    server.apply(pod_v("default", "a", "1"));
    server.apply(pod_v("default", "b", "1"));
    let mut w = start_watcher(Api::<Pod>::all(server.client()), watcher::Config::default());
    let (got, _, _) = collect(&mut w, 4, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        [
            "Init",
            "InitApply(default/a v=1)",
            "InitApply(default/b v=1)",
            "InitDone"
        ]
    );
    assert!(
        server
            .wait_for_open_watches(1, Duration::from_secs(5))
            .await
    );

    server.stop();
    assert!(!server.is_listening());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    // Changes while the server is down.
    server.apply(pod_v("default", "a", "2"));
    server.apply(pod_v("default", "c", "1"));
    server.delete("Pod", "default", "b");
    // For 2 s the watcher only gets errors.
    let down_until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut errors = 0;
    while let Ok(item) = tokio::time::timeout_at(down_until, w.recv()).await {
        let item = item.expect("watcher does not end");
        assert!(
            item.is_err(),
            "unexpected event while down: {}",
            describe(&item)
        );
        errors += 1;
    }
    assert!(errors >= 1);

    server.start();
    assert_eq!(server.port(), port);
    let (got, _, _) = collect(&mut w, 3, Duration::from_secs(5)).await;
    // Resumed from its resourceVersion: the history is replayed, no relist.
    assert_eq!(
        got,
        [
            "Apply(default/a v=2)",
            "Apply(default/c v=1)",
            "Delete(default/b v=1)"
        ]
    );
    assert_eq!(server.verb_count("list"), 1);

    // Down again, and the history is compacted meanwhile: the watcher relists.
    assert!(
        server
            .wait_for_open_watches(1, Duration::from_secs(5))
            .await
    );
    server.stop();
    server.apply(pod_v("default", "d", "1"));
    server.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start();
    let (got, _, _) = collect(&mut w, 6, Duration::from_secs(8)).await;
    assert_eq!(
        got,
        [
            "Err(410)",
            "Init",
            "InitApply(default/a v=2)",
            "InitApply(default/c v=1)",
            "InitApply(default/d v=1)",
            "InitDone"
        ]
    );
    assert_eq!(server.verb_count("list"), 2);
}

#[tokio::test]
async fn raw_watch_gets_410_error_event_bookmarks_and_ends_after_timeout() {
    let server = FakeApiServer::with_options(FakeApiServerOptions {
        bookmark_interval: Some(Duration::from_millis(200)),
        ..FakeApiServerOptions::default()
    });
    let port = server.port();
    server.apply(pod_v("default", "a", "1"));
    server.apply(pod_v("default", "b", "1"));
    server.compact();

    // A watch from a compacted resourceVersion: 200, one ERROR event with a 410 Status, end.
    let mut r = raw_get(port, "/api/v1/pods?watch=true&resourceVersion=1").await;
    assert_eq!(r.status, 200);
    assert!(r.chunked);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.next_json().await,
        Some(json!({
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (2)",
                "reason": "Expired",
                "code": 410
            }
        }))
    );
    assert_eq!(r.next_json().await, None);

    // A list at a compacted resourceVersion: HTTP 410 with a Status body.
    let mut r = raw_get(
        port,
        "/api/v1/pods?resourceVersion=1&resourceVersionMatch=Exact",
    )
    .await;
    assert_eq!(r.status, 410);
    let body = r.next_json().await.expect("status body");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Expired");
    assert_eq!(body["code"], 410);

    // From the compaction point: live events, then bookmarks that follow the global
    // resourceVersion even when the change is of another kind or namespace; ends after 2 s.
    let started = Instant::now();
    let mut r = raw_get(
        port,
        "/api/v1/namespaces/default/pods?watch=true&resourceVersion=2&allowWatchBookmarks=true&timeoutSeconds=2",
    )
    .await;
    assert_eq!(r.status, 200);
    server.apply(pod_v("default", "c", "1"));
    let added = r.next_json().await.expect("ADDED event");
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["kind"], "Pod");
    assert_eq!(added["object"]["apiVersion"], "v1");
    assert_eq!(added["object"]["metadata"]["name"], "c");
    assert_eq!(added["object"]["metadata"]["resourceVersion"], "3");
    server.apply(namespace("elsewhere", &[]));
    server.apply(pod_v("elsewhere", "x", "1"));
    let mut bookmark_rvs = Vec::new();
    loop {
        let ev = r.next_json().await.expect("a bookmark before the timeout");
        assert_eq!(ev["type"], "BOOKMARK", "{ev}");
        let rv = ev["object"]["metadata"]["resourceVersion"]
            .as_str()
            .expect("rv")
            .to_string();
        assert_eq!(
            ev,
            json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv}}})
        );
        bookmark_rvs.push(rv.clone());
        if rv == "5" {
            break;
        }
    }
    assert!(
        bookmark_rvs
            .iter()
            .all(|rv| ["3", "4", "5"].contains(&rv.as_str())),
        "{bookmark_rvs:?}"
    );
    // Only bookmarks until the server ends the watch.
    while let Some(ev) = r.next_json().await {
        assert_eq!(
            ev,
            json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "5"}}})
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );

    // resourceVersion=0: synthetic ADDED events for the current state, no bookmarks asked.
    let mut r = raw_get(
        port,
        "/api/v1/pods?watch=true&resourceVersion=0&timeoutSeconds=1",
    )
    .await;
    let mut initial = Vec::new();
    while let Some(ev) = r.next_json().await {
        initial.push(format!(
            "{} {}/{}",
            ev["type"].as_str().unwrap_or_default(),
            ev["object"]["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default(),
            ev["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
        ));
    }
    assert_eq!(
        initial,
        [
            "ADDED default/a",
            "ADDED default/b",
            "ADDED default/c",
            "ADDED elsewhere/x"
        ]
    );

    // Unknown paths get a 404 Status.
    let mut r = raw_get(port, "/api/v1/secrets").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.next_json().await.expect("body")["reason"], "NotFound");
}

#[tokio::test]
async fn injected_failures_latency_and_request_counts() {
    let server = FakeApiServer::new();
    server.apply(pod_v("default", "a", "1"));
    let api = Api::<Pod>::all(server.client());
    let ns_api = Api::<Pod>::namespaced(server.client(), "default");

    server.set_fail_next(2, 500);
    for _ in 0..2 {
        match api.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));
            }
            other => panic!("expected 500, got {other:?}"),
        }
    }
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    assert_eq!(server.request_count("list", "/api/v1/pods"), 3);

    // kube's client retries 503 by itself: one call, three requests.
    server.set_fail_next(2, 503);
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    assert_eq!(server.request_count("list", "/api/v1/pods"), 6);

    // Failures for one verb only.
    server.set_fail_next_verb("get", 1, 403);
    api.list(&ListParams::default()).await.expect("list passes");
    match ns_api.get("a").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden")),
        other => panic!("expected 403, got {other:?}"),
    }
    ns_api.get("a").await.expect("second get passes");

    server.set_latency(Duration::from_millis(400));
    let t = Instant::now();
    api.list(&ListParams::default()).await.expect("slow list");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    server.set_latency(Duration::ZERO);
    let t = Instant::now();
    api.list(&ListParams::default()).await.expect("fast list");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    assert_eq!(server.request_count("list", "/api/v1/pods"), 9);
    assert_eq!(
        server.request_count("get", "/api/v1/namespaces/default/pods/a"),
        2
    );
    server.clear_requests();
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn create_replace_patch_and_delete_through_the_api() {
    let server = FakeApiServer::new();
    let api = Api::<Pod>::namespaced(server.client(), "default");
    let p: Pod = serde_json::from_value(pod_v("default", "x", "1")).expect("pod");
    let created = api
        .create(&PostParams::default(), &p)
        .await
        .expect("create");
    assert_eq!(created.metadata.resource_version.as_deref(), Some("1"));
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    let stored = server.get("Pod", "default", "x").expect("stored");
    assert_eq!(serde_json::to_value(&created).expect("ser"), stored);

    match api.create(&PostParams::default(), &p).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409, got {other:?}"),
    }
    let mut stale = created.clone();
    stale.metadata.resource_version = Some("999".into());
    match api.replace("x", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected 409, got {other:?}"),
    }

    let patched = api
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
        )
        .await
        .expect("patch");
    assert_eq!(obj_desc(&patched), "default/x v=2");
    assert_eq!(patched.metadata.resource_version.as_deref(), Some("2"));
    assert_eq!(patched.metadata.uid, created.metadata.uid);

    let mut replaced = patched.clone();
    replaced.spec.as_mut().expect("spec").node_name = Some("node-9".into());
    let replaced = api
        .replace("x", &PostParams::default(), &replaced)
        .await
        .expect("replace");
    assert_eq!(replaced.metadata.resource_version.as_deref(), Some("3"));
    assert_eq!(replaced.metadata.generation, Some(2));

    let deleted = api
        .delete("x", &DeleteParams::default())
        .await
        .expect("delete");
    let deleted = deleted.left().expect("the deleted object");
    assert_eq!(deleted.metadata.resource_version.as_deref(), Some("4"));
    assert_eq!(server.get("Pod", "default", "x"), None);
    match api.get("x").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    assert_eq!(server.verb_count("create"), 2);
    assert_eq!(server.verb_count("update"), 2);
    assert_eq!(server.verb_count("patch"), 1);
    assert_eq!(server.verb_count("delete"), 1);
}

/// The control API is synchronous, so a plain `#[test]` drives the server; the client gets its
/// configuration from a kubeconfig file, as the real binary would with `--kubeconfig`.
#[test]
fn kubeconfig_file_and_plain_test_usage() {
    let server = FakeApiServer::new();
    server.apply(namespace("kube-system", &[]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let names = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("config from kubeconfig");
        assert_eq!(cfg.cluster_url.to_string(), format!("{}/", server.url()));
        assert_eq!(cfg.default_namespace, "default");
        let client = kube::Client::try_from(cfg).expect("client");
        Api::<Namespace>::all(client)
            .list(&ListParams::default())
            .await
            .expect("list namespaces")
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    });
    assert_eq!(names, ["kube-system"]);

    server.stop();
    assert!(std::net::TcpStream::connect(server.addr()).is_err());
    server.start();
    assert!(std::net::TcpStream::connect(server.addr()).is_ok());
    assert_eq!(server.objects("Namespace").len(), 1);
}
