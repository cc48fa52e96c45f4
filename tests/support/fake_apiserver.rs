#![allow(dead_code)]
//! A fake Kubernetes API server for tests, speaking the real list/watch protocol over plain
//! HTTP/1.1 so that a real `kube::Client` (and the `kube::runtime::watcher`) can talk to it.
//!
//! Include it from an integration test with
//! `#[path = "support/fake_apiserver.rs"] mod fake_apiserver;`.
//!
//! * Served resources: Namespaces (`/api/v1/namespaces`), Nodes (`/api/v1/nodes`), Pods (`/api/v1/pods`,
//!   `/api/v1/namespaces/{ns}/pods`) and NetworkPolicies
//!   (`/apis/networking.k8s.io/v1/networkpolicies`, `.../namespaces/{ns}/networkpolicies`); see
//!   [`RESOURCES`]. Objects are stored as `serde_json::Value`.
//! * One global, etcd-like resourceVersion counter; a retained history of every change since the
//!   last [`FakeApiServer::compact`]. LIST supports `limit`/`continue` (consistent snapshots,
//!   rebuilt from the history; 410 `Expired` once compacted), `resourceVersion` +
//!   `resourceVersionMatch`, `labelSelector`, `fieldSelector`. WATCH streams newline-delimited
//!   JSON events (chunked), replays history after `resourceVersion=N`, sends synthetic ADDED
//!   events for `resourceVersion=0`/unset, supports `sendInitialEvents=true` (streaming lists),
//!   `allowWatchBookmarks=true` (periodic BOOKMARK events), `timeoutSeconds`, and answers a
//!   compacted `resourceVersion` with an `ERROR` event holding a 410 `Expired` Status, as a real
//!   apiserver does. GET/POST/PUT/PATCH (merge patch)/DELETE single objects work too.
//! * Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`
//!   (legacy and aggregated v2 when the `Accept` header asks for `APIGroupDiscoveryList`).
//! * The server runs on its own thread with its own tokio runtime, so every control method is a
//!   plain synchronous call usable from `#[test]` and `#[tokio::test]` alike. The control calls
//!   never wait on the client, so calling them from a current-thread test runtime cannot deadlock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Resource table
// ---------------------------------------------------------------------------------------------

/// Static description of a served resource type.
#[derive(Debug)]
pub struct ResourceType {
    pub kind: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Whether `metadata.generation` is maintained (bumped on `spec` changes).
    pub has_generation: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// URL path of the collection, e.g. `/api/v1/namespaces/ns/pods` or `/api/v1/pods`.
    pub fn collection_path(&self, namespace: Option<&str>) -> String {
        let prefix = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{prefix}/namespaces/{ns}/{}", self.plural),
            _ => format!("{prefix}/{}", self.plural),
        }
    }
}

/// Every resource type the fake serves. Adding a row is enough to serve another type.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        kind: "Namespace",
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        has_generation: false,
    },
    ResourceType {
        kind: "Pod",
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        has_generation: true,
    },
    ResourceType {
        kind: "Node",
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        namespaced: false,
        has_generation: false,
    },
    ResourceType {
        kind: "NetworkPolicy",
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        short_names: &["netpol"],
        namespaced: true,
        has_generation: true,
    },
];

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Looks a resource type up by kind (`Pod`), plural (`pods`), singular (`pod`) or short name
/// (`po`), case-insensitively.
pub fn resource_type(kind: &str) -> Option<&'static ResourceType> {
    resource_index(kind).map(|i| &RESOURCES[i])
}

fn resource_index(kind: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| {
        r.kind.eq_ignore_ascii_case(kind)
            || r.plural.eq_ignore_ascii_case(kind)
            || r.singular.eq_ignore_ascii_case(kind)
            || r.short_names.iter().any(|s| s.eq_ignore_ascii_case(kind))
    })
}

fn resource_index_or_panic(kind: &str) -> usize {
    resource_index(kind).unwrap_or_else(|| panic!("fake apiserver does not serve kind {kind:?}"))
}

// ---------------------------------------------------------------------------------------------
// Public helper types
// ---------------------------------------------------------------------------------------------

/// One request as received by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// Kubernetes verb: `list`, `watch`, `get`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`, `discovery`, `health`, `unsupported` or `unknown` (404 path).
    pub verb: String,
}

impl RecordedRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

/// Options for [`FakeApiServer::with_options`].
#[derive(Clone, Debug)]
pub struct FakeApiServerOptions {
    /// Port to listen on, 0 for an ephemeral one.
    pub port: u16,
    /// Interval of BOOKMARK events on watches that allow them; `None` sends none (except the
    /// `initial-events-end` bookmark of a streaming list).
    pub bookmark_interval: Option<Duration>,
    /// Whether WATCH honours `sendInitialEvents=true` (streaming lists, the `WatchList`
    /// feature). When false it answers 422 Invalid, as an API server with the feature off (or
    /// one older than 1.27, which forbids `resourceVersionMatch` on a watch) does.
    pub streaming_lists: bool,
}

impl Default for FakeApiServerOptions {
    fn default() -> Self {
        Self {
            port: 0,
            bookmark_interval: Some(Duration::from_secs(1)),
            streaming_lists: true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ObjKey {
    res: usize,
    ns: String,
    name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the history: the state after (`obj`) and before (`prev`) the change.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: ChangeType,
    key: ObjKey,
    obj: Arc<Value>,
    prev: Option<Arc<Value>>,
}

#[derive(Debug)]
struct FailRule {
    remaining: u32,
    status: u16,
    verb: Option<String>,
}

struct State {
    rv: u64,
    /// Every change with `rv > compacted_rv` is in `history`; older resource versions are gone.
    compacted_rv: u64,
    objects: BTreeMap<ObjKey, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    latency: Duration,
    fail: Option<FailRule>,
    requests: Vec<RecordedRequest>,
    bookmark_interval: Option<Duration>,
    next_uid: u64,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    accept: Option<JoinHandle<()>>,
    handles: HashMap<u64, JoinHandle<()>>,
    /// Connections currently streaming a watch response.
    watching: HashMap<u64, usize>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Change>>,
    conns: Mutex<Conns>,
    port: AtomicU16,
    streaming_lists: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the whole server down with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone, Debug)]
struct ApiError {
    code: u16,
    reason: String,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn from_code(code: u16, message: impl Into<String>) -> Self {
        Self::new(code, reason_for(code), message)
    }

    fn not_found(res: &ResourceType, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.plural),
        );
        e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
        e
    }

    fn status_json(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

enum WriteMode {
    Create,
    Update,
    Apply,
}

impl Shared {
    fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    fn record(&self, st: &mut State, change: Change) {
        let change = Arc::new(change);
        st.history.push_back(change.clone());
        // An error only means nobody is watching right now.
        let _ = self.events.send(change);
    }

    /// Create (`Create`), replace (`Update`) or create-or-replace (`Apply`) an object.
    /// Returns the stored object and whether it was created.
    fn write(
        &self,
        res_idx: usize,
        path_ns: Option<&str>,
        obj: Value,
        mode: WriteMode,
    ) -> Result<(Value, bool), ApiError> {
        let res = &RESOURCES[res_idx];
        let mut obj = obj;
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::from_code(400, "object must be a JSON object"));
        };
        if let Some(kind) = map.get("kind").and_then(Value::as_str) {
            if kind != res.kind {
                return Err(ApiError::from_code(
                    400,
                    format!("kind {kind} does not match the resource {}", res.plural),
                ));
            }
        }
        map.insert("kind".into(), Value::String(res.kind.into()));
        map.insert("apiVersion".into(), Value::String(res.api_version()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        let meta = meta.as_object_mut().expect("metadata is an object");

        let mut st = lock(&self.state);
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let generate = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if generate.is_empty() || !matches!(mode, WriteMode::Create | WriteMode::Apply) {
                return Err(ApiError::from_code(
                    422,
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        res.kind
                    ),
                ));
            }
            st.next_uid += 1;
            name = format!("{generate}{:05x}", st.next_uid & 0xfffff);
            meta.insert("name".into(), Value::String(name.clone()));
        }
        let ns = if res.namespaced {
            let body_ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let ns = match path_ns {
                Some(p) if !body_ns.is_empty() && body_ns != p => {
                    return Err(ApiError::from_code(
                        400,
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                Some(p) => p.to_string(),
                None if body_ns.is_empty() => "default".to_string(),
                None => body_ns,
            };
            meta.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        if res.kind == "Namespace" {
            // The apiserver enforces this label on every namespace (since 1.21).
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if !labels.is_object() {
                *labels = Value::Object(Map::new());
            }
            labels.as_object_mut().expect("labels is an object").insert(
                "kubernetes.io/metadata.name".into(),
                Value::String(name.clone()),
            );
            map.entry("spec")
                .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
            map.entry("status")
                .or_insert_with(|| json!({"phase": "Active"}));
        }

        let key = ObjKey {
            res: res_idx,
            ns,
            name: name.clone(),
        };
        let existing = st.objects.get(&key).cloned();
        let requested_rv = obj["metadata"]
            .get("resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match (&mode, &existing) {
            (WriteMode::Create, Some(_)) => {
                let mut e = ApiError::new(
                    409,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", res.plural),
                );
                e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
                return Err(e);
            }
            (WriteMode::Update, None) => return Err(ApiError::not_found(res, &name)),
            (WriteMode::Update, Some(ex)) => {
                let current = ex["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !requested_rv.is_empty() && requested_rv != current {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            res.plural
                        ),
                    ));
                }
            }
            _ => {}
        }

        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        match existing {
            Some(ex) => {
                for field in ["uid", "creationTimestamp", "generation"] {
                    match ex["metadata"].get(field) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                meta.insert(
                    "resourceVersion".into(),
                    ex["metadata"]["resourceVersion"].clone(),
                );
                if res.has_generation && obj.get("spec") != ex.get("spec") {
                    let g = ex["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                    obj["metadata"]["generation"] = json!(g);
                }
                if obj == *ex {
                    // A no-op update: a real apiserver bumps nothing and sends no event.
                    return Ok((obj, false));
                }
                st.rv += 1;
                let rv = st.rv;
                obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                let stored = Arc::new(obj.clone());
                st.objects.insert(key.clone(), stored.clone());
                self.record(
                    &mut st,
                    Change {
                        rv,
                        kind: ChangeType::Modified,
                        key,
                        obj: stored,
                        prev: Some(ex),
                    },
                );
                Ok((obj, false))
            }
            None => {
                st.next_uid += 1;
                let uid = format!("00000000-0000-4000-8000-{:012x}", st.next_uid);
                meta.entry("uid").or_insert(Value::String(uid));
                meta.entry("creationTimestamp")
                    .or_insert(Value::String(now_rfc3339()));
                if res.has_generation {
                    meta.insert("generation".into(), json!(1));
                }
                st.rv += 1;
                let rv = st.rv;
                meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
                let stored = Arc::new(obj.clone());
                st.objects.insert(key.clone(), stored.clone());
                self.record(
                    &mut st,
                    Change {
                        rv,
                        kind: ChangeType::Added,
                        key,
                        obj: stored,
                        prev: None,
                    },
                );
                Ok((obj, true))
            }
        }
    }

    fn delete(&self, res_idx: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        let res = &RESOURCES[res_idx];
        let key = ObjKey {
            res: res_idx,
            ns: if res.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        };
        let mut st = lock(&self.state);
        let Some(prev) = st.objects.remove(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        st.rv += 1;
        let rv = st.rv;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let last = Arc::new(last);
        self.record(
            &mut st,
            Change {
                rv,
                kind: ChangeType::Deleted,
                key,
                obj: last.clone(),
                prev: Some(prev),
            },
        );
        Ok((*last).clone())
    }
}

/// The objects as they were at resourceVersion `rv`, rebuilt from the current state and the
/// history. `None` when `rv` is older than the retained history.
fn objects_at(st: &State, rv: u64) -> Option<BTreeMap<ObjKey, Arc<Value>>> {
    if rv < st.compacted_rv {
        return None;
    }
    let mut m = st.objects.clone();
    for ch in st.history.iter().rev() {
        if ch.rv <= rv {
            break;
        }
        match (&ch.kind, &ch.prev) {
            (ChangeType::Added, _) | (_, None) => {
                m.remove(&ch.key);
            }
            (ChangeType::Modified | ChangeType::Deleted, Some(prev)) => {
                m.insert(ch.key.clone(), prev.clone());
            }
        }
    }
    Some(m)
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

#[derive(Clone, Debug, Default)]
struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Selector {
    fn from_query(q: &BTreeMap<String, String>) -> Result<Self, ApiError> {
        let labels = match q.get("labelSelector") {
            Some(s) => parse_label_selector(s).map_err(|e| ApiError::from_code(400, e))?,
            None => Vec::new(),
        };
        let fields = match q.get("fieldSelector") {
            Some(s) => parse_field_selector(s).map_err(|e| ApiError::from_code(400, e))?,
            None => Vec::new(),
        };
        Ok(Self { labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|f| {
                let mut cur = obj;
                for part in f.path.split('.') {
                    cur = &cur[part];
                }
                let actual = match cur {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (actual == f.value) != f.negate
            })
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let mut out = Vec::new();
    for req in split_top_level(s) {
        let parsed = if let Some(k) = req.strip_prefix('!') {
            LabelReq::NotExists(k.trim().to_string())
        } else if let Some((head, tail)) = req.split_once('(') {
            let values = tail
                .strip_suffix(')')
                .ok_or_else(|| format!("unable to parse requirement: {req:?}"))?
                .split(',')
                .map(|v| v.trim().to_string())
                .collect();
            let mut words = head.split_whitespace();
            let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("unable to parse requirement: {req:?}"));
            };
            match op {
                "in" => LabelReq::In(key.to_string(), values),
                "notin" => LabelReq::NotIn(key.to_string(), values),
                _ => return Err(format!("unable to parse requirement: {req:?}")),
            }
        } else if let Some((k, v)) = req.split_once("!=") {
            LabelReq::Ne(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = req.split_once("==") {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else if let Some((k, v)) = req.split_once('=') {
            LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
        } else {
            LabelReq::Exists(req.to_string())
        };
        let key = match &parsed {
            LabelReq::Eq(k, _)
            | LabelReq::Ne(k, _)
            | LabelReq::In(k, _)
            | LabelReq::NotIn(k, _)
            | LabelReq::Exists(k)
            | LabelReq::NotExists(k) => k,
        };
        if !valid_key(key) {
            return Err(format!(
                "unable to parse requirement: invalid label key {key:?}"
            ));
        }
        out.push(parsed);
    }
    Ok(out)
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    split_top_level(s)
        .into_iter()
        .map(|req| {
            let (path, value, negate) = if let Some((p, v)) = req.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = req.split_once("==") {
                (p, v, false)
            } else if let Some((p, v)) = req.split_once('=') {
                (p, v, false)
            } else {
                return Err(format!(
                    "invalid selector: {req:?}; can't understand {req:?}"
                ));
            };
            Ok(FieldReq {
                path: path.trim().to_string(),
                value: value.trim().to_string(),
                negate,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    json_response_typed(status, v, "application/json")
}

fn json_response_typed(status: u16, v: &Value, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full_body(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status_json())
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (pct_decode(k), pct_decode(v)),
            None => (pct_decode(p), String::new()),
        })
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Discovery {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
}

#[derive(Debug)]
enum Route {
    Discovery(Discovery),
    Health,
    Collection {
        res: usize,
        ns: Option<String>,
    },
    Object {
        res: usize,
        ns: Option<String>,
        name: String,
    },
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let known_group = |g: &str| {
        RESOURCES
            .iter()
            .any(|r| !r.group.is_empty() && r.group == g)
    };
    let known_gv = |g: &str, v: &str| RESOURCES.iter().any(|r| r.group == g && r.version == v);
    match segs.as_slice() {
        ["version"] => Route::Discovery(Discovery::Version),
        ["healthz" | "livez" | "readyz"] => Route::Health,
        ["api"] => Route::Discovery(Discovery::CoreVersions),
        ["api", v] if known_gv("", v) => {
            Route::Discovery(Discovery::Resources(String::new(), (*v).into()))
        }
        ["apis"] => Route::Discovery(Discovery::Groups),
        ["apis", g] if known_group(g) => Route::Discovery(Discovery::Group((*g).into())),
        ["apis", g, v] if known_gv(g, v) => {
            Route::Discovery(Discovery::Resources((*g).into(), (*v).into()))
        }
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        _ => Route::NotFound,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let find = |plural: &str, namespaced: bool| {
        RESOURCES.iter().position(|r| {
            r.group == group
                && r.version == version
                && r.plural == plural
                && r.namespaced == namespaced
        })
    };
    let any = |plural: &str| {
        RESOURCES
            .iter()
            .position(|r| r.group == group && r.version == version && r.plural == plural)
    };
    let found = match rest {
        [plural] => any(plural).map(|res| Route::Collection { res, ns: None }),
        [plural, name] => find(plural, false).map(|res| Route::Object {
            res,
            ns: None,
            name: (*name).into(),
        }),
        ["namespaces", ns, plural] => find(plural, true).map(|res| Route::Collection {
            res,
            ns: Some((*ns).into()),
        }),
        ["namespaces", ns, plural, name] => find(plural, true).map(|res| Route::Object {
            res,
            ns: Some((*ns).into()),
            name: (*name).into(),
        }),
        _ => None,
    };
    found.unwrap_or(Route::NotFound)
}

fn verb_of(method: &Method, route: &Route, watch: bool) -> &'static str {
    match route {
        Route::Discovery(_) => "discovery",
        Route::Health => "health",
        Route::NotFound => "unknown",
        Route::Collection { .. } => match *method {
            Method::GET if watch => "watch",
            Method::GET => "list",
            Method::POST => "create",
            Method::DELETE => "deletecollection",
            _ => "unsupported",
        },
        Route::Object { .. } => match *method {
            Method::GET => "get",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "unsupported",
        },
    }
}

fn api_resource_json(r: &ResourceType) -> Value {
    json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
        "shortNames": r.short_names,
    })
}

fn aggregated_group_json(group: &str) -> Value {
    let mut versions: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| r.group == group)
        .map(|r| r.version)
        .collect();
    versions.dedup();
    let versions: Vec<Value> = versions
        .into_iter()
        .map(|v| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == v)
                .map(|r| {
                    json!({
                        "resource": r.plural,
                        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": VERBS,
                        "shortNames": r.short_names,
                    })
                })
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    let metadata = if group.is_empty() {
        json!({"creationTimestamp": null})
    } else {
        json!({"name": group, "creationTimestamp": null})
    };
    json!({"metadata": metadata, "versions": versions})
}

fn groups() -> Vec<&'static str> {
    let mut g: Vec<&str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    g.sort_unstable();
    g.dedup();
    g
}

fn api_group_json(group: &str) -> Value {
    let mut versions: Vec<&str> = RESOURCES
        .iter()
        .filter(|r| r.group == group)
        .map(|r| r.version)
        .collect();
    versions.dedup();
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn discovery_response(d: &Discovery, port: u16, aggregated: bool) -> Response<Body> {
    match d {
        Discovery::Version => json_response(
            200,
            &json!({
                "major": "1",
                "minor": "37",
                "emulationMajor": "1",
                "emulationMinor": "37",
                "minCompatibilityMajor": "1",
                "minCompatibilityMinor": "36",
                "gitVersion": "v1.37.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.25.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        Discovery::CoreVersions if aggregated => json_response_typed(
            200,
            &json!({
                "kind": "APIGroupDiscoveryList",
                "apiVersion": "apidiscovery.k8s.io/v2",
                "metadata": {},
                "items": [aggregated_group_json("")],
            }),
            AGGREGATED,
        ),
        Discovery::CoreVersions => json_response(
            200,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{port}")}
                ],
            }),
        ),
        Discovery::Groups if aggregated => {
            let items: Vec<Value> = groups().into_iter().map(aggregated_group_json).collect();
            json_response_typed(
                200,
                &json!({
                    "kind": "APIGroupDiscoveryList",
                    "apiVersion": "apidiscovery.k8s.io/v2",
                    "metadata": {},
                    "items": items,
                }),
                AGGREGATED,
            )
        }
        Discovery::Groups => {
            let gs: Vec<Value> = groups()
                .into_iter()
                .map(|g| {
                    let mut v = api_group_json(g);
                    if let Some(m) = v.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    v
                })
                .collect();
            json_response(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs}),
            )
        }
        Discovery::Group(g) => json_response(200, &api_group_json(g)),
        Discovery::Resources(g, v) => {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == g && r.version == v)
                .map(api_resource_json)
                .collect();
            let gv = if g.is_empty() {
                v.clone()
            } else {
                format!("{g}/{v}")
            };
            json_response(
                200,
                &json!({
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": gv,
                    "resources": resources,
                }),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

fn take_failure(fail: &mut Option<FailRule>, verb: &str) -> Option<u16> {
    let rule = fail.as_mut()?;
    if rule.verb.as_deref().is_some_and(|v| v != verb) {
        return None;
    }
    rule.remaining = rule.remaining.saturating_sub(1);
    let code = rule.status;
    if rule.remaining == 0 {
        *fail = None;
    }
    Some(code)
}

async fn handle_request(
    shared: Arc<Shared>,
    conn_id: u64,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let route = route(&path);
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = verb_of(&method, &route, watch);
    let (latency, failure) = {
        let mut st = lock(&shared.state);
        st.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            verb: verb.to_string(),
        });
        let failure = take_failure(&mut st.fail, verb);
        (st.latency, failure)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = failure {
        return Ok(error_response(&ApiError::from_code(
            code,
            format!("fake apiserver: injected failure ({code})"),
        )));
    }
    let aggregated = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=APIGroupDiscoveryList"));
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();

    let resp = match (route, verb) {
        (Route::Discovery(d), _) if method == Method::GET => {
            discovery_response(&d, shared.port(), aggregated)
        }
        (Route::Health, _) => {
            let mut r = Response::new(full_body("ok"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        (Route::Collection { res, ns }, "watch") => {
            match start_watch(&shared, conn_id, res, ns, &query) {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
        (Route::Collection { res, ns }, "list") => {
            match list(&shared, res, ns.as_deref(), &query) {
                Ok(v) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        (Route::Collection { res, ns }, "create") => {
            let result = match read_json(req).await {
                Ok(obj) => shared.write(res, ns.as_deref(), obj, WriteMode::Create),
                Err(e) => Err(e),
            };
            match result {
                Ok((v, _)) => json_response(201, &v),
                Err(e) => error_response(&e),
            }
        }
        (Route::Object { res, ns, name }, "get") => {
            let key = ObjKey {
                res,
                ns: ns.unwrap_or_default(),
                name: name.clone(),
            };
            let found = lock(&shared.state).objects.get(&key).cloned();
            match found {
                Some(v) => json_response(200, &v),
                None => error_response(&ApiError::not_found(&RESOURCES[res], &name)),
            }
        }
        (Route::Object { res, ns, name }, "update") => {
            let result = match read_json(req).await {
                Ok(obj) if obj["metadata"]["name"].as_str() != Some(name.as_str()) => {
                    Err(ApiError::from_code(
                        400,
                        "the name of the object does not match the name on the URL",
                    ))
                }
                Ok(obj) => shared.write(res, ns.as_deref(), obj, WriteMode::Update),
                Err(e) => Err(e),
            };
            match result {
                Ok((v, _)) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        (Route::Object { res, ns, name }, "patch") => {
            let result = if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                match read_json(req).await {
                    Ok(patch) => {
                        let key = ObjKey {
                            res,
                            ns: ns.clone().unwrap_or_default(),
                            name: name.clone(),
                        };
                        let current = lock(&shared.state).objects.get(&key).cloned();
                        match current {
                            Some(cur) => {
                                let mut obj = (*cur).clone();
                                merge_patch(&mut obj, &patch);
                                obj["metadata"]["name"] = Value::String(name.clone());
                                shared.write(res, ns.as_deref(), obj, WriteMode::Update)
                            }
                            None => Err(ApiError::not_found(&RESOURCES[res], &name)),
                        }
                    }
                    Err(e) => Err(e),
                }
            } else {
                Err(ApiError::from_code(
                    415,
                    format!("the fake apiserver does not support patch type {content_type}"),
                ))
            };
            match result {
                Ok((v, _)) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        (Route::Object { res, ns, name }, "delete") => {
            match shared.delete(res, ns.as_deref().unwrap_or_default(), &name) {
                Ok(v) => json_response(200, &v),
                Err(e) => error_response(&e),
            }
        }
        (Route::NotFound, _) => error_response(&ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
        _ => error_response(&ApiError::from_code(
            405,
            format!("method {method} is not supported on {path}"),
        )),
    };
    Ok(resp)
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::from_code(400, format!("reading body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::from_code(400, format!("invalid JSON body: {e}")))
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| ApiError::from_code(400, format!("invalid resource version: {s:?}")))
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

fn list(
    shared: &Shared,
    res: usize,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    let rtype = &RESOURCES[res];
    let sel = Selector::from_query(q)?;
    let limit = match q.get("limit").map(String::as_str) {
        None | Some("") => 0,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::from_code(400, format!("invalid limit {l:?}")))?,
    };
    let st = lock(&shared.state);
    let continue_token = q.get("continue").filter(|c| !c.is_empty());
    let (snapshot_rv, start_after) = if let Some(tok) = continue_token {
        let decoded: Value = hex_decode(tok)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ApiError::from_code(400, "continue key is not valid"))?;
        let rv = decoded["rv"].as_u64().unwrap_or(0);
        if rv < st.compacted_rv {
            return Err(ApiError::new(410, "Expired", CONTINUE_EXPIRED));
        }
        let start = (
            decoded["ns"].as_str().unwrap_or_default().to_string(),
            decoded["name"].as_str().unwrap_or_default().to_string(),
        );
        (rv, Some(start))
    } else {
        match q.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => (st.rv, None),
            Some(s) => {
                let n = parse_rv(s)?;
                if n > st.rv {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {n}, current: {}", st.rv),
                    ));
                }
                if q.get("resourceVersionMatch").map(String::as_str) == Some("Exact") {
                    if n < st.compacted_rv {
                        return Err(ApiError::new(
                            410,
                            "Expired",
                            format!("too old resource version: {n} ({})", st.compacted_rv),
                        ));
                    }
                    (n, None)
                } else {
                    (st.rv, None)
                }
            }
        }
    };
    let rebuilt;
    let objects = if snapshot_rv == st.rv {
        &st.objects
    } else {
        rebuilt = objects_at(&st, snapshot_rv)
            .ok_or_else(|| ApiError::new(410, "Expired", CONTINUE_EXPIRED))?;
        &rebuilt
    };
    let from = ObjKey {
        res,
        ns: String::new(),
        name: String::new(),
    };
    let matching: Vec<(&ObjKey, &Arc<Value>)> = objects
        .range(from..)
        .take_while(|(k, _)| k.res == res)
        .filter(|(k, _)| ns.is_none_or(|n| !rtype.namespaced || k.ns == n))
        .filter(|(k, _)| {
            start_after
                .as_ref()
                .is_none_or(|(sns, sname)| (&k.ns, &k.name) > (sns, sname))
        })
        .filter(|(_, v)| sel.matches(v))
        .collect();
    let take = if limit == 0 {
        matching.len()
    } else {
        limit.min(matching.len())
    };
    let items: Vec<Value> = matching[..take]
        .iter()
        .map(|(_, v)| {
            // A real apiserver's list items carry no kind/apiVersion.
            let mut item = (***v).clone();
            if let Some(m) = item.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            item
        })
        .collect();
    let mut meta = json!({"resourceVersion": snapshot_rv.to_string()});
    if take < matching.len() {
        let (last, _) = matching[take - 1];
        let token = json!({"rv": snapshot_rv, "ns": last.ns, "name": last.name});
        meta["continue"] = Value::String(hex_encode(token.to_string().as_bytes()));
        meta["remainingItemCount"] = json!(matching.len() - take);
    }
    Ok(json!({
        "kind": rtype.list_kind(),
        "apiVersion": rtype.api_version(),
        "metadata": meta,
        "items": items,
    }))
}

// ---------------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------------

struct WatchFilter {
    res: usize,
    ns: Option<String>,
    sel: Selector,
}

impl WatchFilter {
    fn scope_ok(&self, key: &ObjKey) -> bool {
        key.res == self.res && self.ns.as_ref().is_none_or(|n| *n == key.ns)
    }

    /// The watch event (type, object) a change produces for this watch, if any. Selector
    /// transitions produce ADDED/DELETED like the apiserver's watch cache does.
    fn event_for<'a>(&self, ch: &'a Change) -> Option<(&'static str, &'a Value)> {
        if !self.scope_ok(&ch.key) {
            return None;
        }
        let new_m = self.sel.matches(&ch.obj);
        let old_m = ch.prev.as_ref().is_some_and(|p| self.sel.matches(p));
        let t = match ch.kind {
            ChangeType::Added => new_m.then_some("ADDED"),
            ChangeType::Modified => match (old_m, new_m) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
            ChangeType::Deleted => old_m.then_some("DELETED"),
        }?;
        Some((t, &ch.obj))
    }
}

fn event_line(t: &str, obj: &Value) -> Bytes {
    let mut out = format!("{{\"type\":\"{t}\",\"object\":").into_bytes();
    out.extend(serde_json::to_vec(obj).unwrap_or_default());
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn bookmark_line(res: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}),
    )
}

struct WatchGuard {
    shared: Arc<Shared>,
    conn_id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.shared.conns);
        if let Some(n) = c.watching.get_mut(&self.conn_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.watching.remove(&self.conn_id);
            }
        }
    }
}

struct WatchStream {
    rx: broadcast::Receiver<Arc<Change>>,
    pending: VecDeque<Bytes>,
    cursor: u64,
    min_rv: u64,
    filter: WatchFilter,
    deadline: tokio::time::Instant,
    bookmark: Option<tokio::time::Interval>,
    done: bool,
    _guard: WatchGuard,
}

enum Wake {
    Change(Result<Arc<Change>, broadcast::error::RecvError>),
    Bookmark,
    Timeout,
}

async fn tick(bm: &mut Option<tokio::time::Interval>) {
    match bm {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    conn_id: u64,
    res: usize,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let rtype = &RESOURCES[res];
    let sel = Selector::from_query(q)?;
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let send_initial = q.get("sendInitialEvents").map(String::as_str) == Some("true");
    if send_initial && !shared.streaming_lists {
        return Err(ApiError::new(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
        ));
    }
    let timeout = match q.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => 1800,
        Some(t) => t
            .parse::<u64>()
            .map_err(|_| ApiError::from_code(400, format!("invalid timeoutSeconds {t:?}")))?,
    };
    let rv = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(s) => Some(parse_rv(s)?),
    };
    let filter = WatchFilter { res, ns, sel };
    let mut pending = VecDeque::new();
    let mut done = false;
    let (rx, cursor, min_rv, interval) = {
        let st = lock(&shared.state);
        let rx = shared.events.subscribe();
        let mut cursor = st.rv;
        let mut min_rv = st.rv;
        match rv {
            Some(n) if !send_initial => {
                if n < st.compacted_rv {
                    let e = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {n} ({})", st.compacted_rv),
                    );
                    pending.push_back(event_line("ERROR", &e.status_json()));
                    done = true;
                } else {
                    for ch in st.history.iter().filter(|c| c.rv > n) {
                        if let Some((t, obj)) = filter.event_for(ch) {
                            pending.push_back(event_line(t, obj));
                        }
                    }
                    cursor = cursor.max(n);
                    min_rv = min_rv.max(n);
                }
            }
            _ => {
                // resourceVersion unset/0 or a streaming list: synthetic ADDED events for the
                // current state, then changes.
                for (k, v) in &st.objects {
                    if filter.scope_ok(k) && filter.sel.matches(v) {
                        pending.push_back(event_line("ADDED", v));
                    }
                }
                if send_initial && bookmarks {
                    pending.push_back(bookmark_line(rtype, cursor, true));
                }
            }
        }
        (rx, cursor, min_rv, st.bookmark_interval)
    };
    *lock(&shared.conns).watching.entry(conn_id).or_default() += 1;
    let guard = WatchGuard {
        shared: shared.clone(),
        conn_id,
    };
    let bookmark = if bookmarks {
        interval.map(|i| {
            let mut iv = tokio::time::interval_at(tokio::time::Instant::now() + i, i);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            iv
        })
    } else {
        None
    };
    let ws = WatchStream {
        rx,
        pending,
        cursor,
        min_rv,
        filter,
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        bookmark,
        done,
        _guard: guard,
    };
    let stream = futures::stream::unfold(ws, |mut ws| async move {
        loop {
            if let Some(b) = ws.pending.pop_front() {
                return Some((Ok::<_, std::io::Error>(Frame::data(b)), ws));
            }
            if ws.done {
                return None;
            }
            let wake = {
                let rx = &mut ws.rx;
                let bm = &mut ws.bookmark;
                let deadline = ws.deadline;
                tokio::select! {
                    biased;
                    r = rx.recv() => Wake::Change(r),
                    () = tokio::time::sleep_until(deadline) => Wake::Timeout,
                    () = tick(bm) => Wake::Bookmark,
                }
            };
            match wake {
                Wake::Change(Ok(ch)) => {
                    if ch.rv <= ws.min_rv {
                        continue;
                    }
                    ws.cursor = ws.cursor.max(ch.rv);
                    if let Some((t, obj)) = ws.filter.event_for(&ch) {
                        ws.pending.push_back(event_line(t, obj));
                    }
                }
                Wake::Change(Err(broadcast::error::RecvError::Lagged(_))) => {
                    let e = ApiError::new(
                        410,
                        "Expired",
                        "the watch fell too far behind and was terminated",
                    );
                    ws.pending.push_back(event_line("ERROR", &e.status_json()));
                    ws.done = true;
                }
                Wake::Change(Err(broadcast::error::RecvError::Closed)) | Wake::Timeout => {
                    ws.done = true;
                }
                Wake::Bookmark => {
                    let res = &RESOURCES[ws.filter.res];
                    ws.pending.push_back(bookmark_line(res, ws.cursor, false));
                }
            }
        }
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------------------------

async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = {
            let mut c = lock(&shared.conns);
            c.next_id += 1;
            c.next_id
        };
        let conn_shared = shared.clone();
        let handle = tokio::spawn(async move {
            let svc_shared = conn_shared.clone();
            let svc =
                hyper::service::service_fn(move |req| handle_request(svc_shared.clone(), id, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            lock(&conn_shared.conns).handles.remove(&id);
        });
        let mut c = lock(&shared.conns);
        c.handles.retain(|_, h| !h.is_finished());
        if !handle.is_finished() {
            c.handles.insert(id, handle);
        }
    }
}

async fn bind(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let mut last_err = None;
    // Re-binding the same port right after stop() can briefly race the old socket.
    for _ in 0..50 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) if port != 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

async fn abort_and_wait(handles: Vec<JoinHandle<()>>) {
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
}

/// A fake Kubernetes API server; see the module documentation.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1 with 1 s bookmarks.
    pub fn new() -> Self {
        Self::with_options(FakeApiServerOptions::default())
    }

    /// Starts a server on a given port (0 = ephemeral).
    pub fn on_port(port: u16) -> Self {
        Self::with_options(FakeApiServerOptions {
            port,
            ..FakeApiServerOptions::default()
        })
    }

    pub fn with_options(opts: FakeApiServerOptions) -> Self {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake apiserver: building tokio runtime");
                let _ = handle_tx.send(rt.handle().clone());
                rt.block_on(async {
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime cancels every task and closes every socket.
            })
            .expect("fake apiserver: spawning thread");
        let rt = handle_rx
            .recv()
            .expect("fake apiserver: runtime thread died");
        let (events, _) = broadcast::channel(16_384);
        let server = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 0,
                    compacted_rv: 0,
                    objects: BTreeMap::new(),
                    history: VecDeque::new(),
                    latency: Duration::ZERO,
                    fail: None,
                    requests: Vec::new(),
                    bookmark_interval: opts.bookmark_interval,
                    next_uid: 0,
                }),
                events,
                conns: Mutex::new(Conns::default()),
                port: AtomicU16::new(opts.port),
                streaming_lists: opts.streaming_lists,
            }),
            rt,
            shutdown: Mutex::new(Some(shutdown_tx)),
            thread: Mutex::new(Some(thread)),
        };
        server.start();
        server
    }

    /// Runs `fut` on the server's runtime and blocks the calling thread until it is done.
    /// Never waits on the client, so it is safe inside `#[tokio::test]`.
    fn run_on_server<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("fake apiserver: server runtime did not answer")
    }

    // ----- addresses and clients -----

    pub fn port(&self) -> u16 {
        self.shared.port()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port()))
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    pub fn config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("valid server URL"))
    }

    /// A real `kube::Client` for this server. Must be called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("building kube client")
    }

    /// A kubeconfig (YAML) pointing at this server, context `fake`, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    // ----- lifecycle -----

    /// Listens again (on the same port) after [`stop`](Self::stop); state and history are kept.
    /// No-op when already listening.
    pub fn start(&self) {
        let shared = self.shared.clone();
        let port = self.port();
        let result = self.run_on_server(async move {
            if lock(&shared.conns).accept.is_some() {
                return Ok(());
            }
            let listener = bind(port).await?;
            let local = listener.local_addr()?;
            shared.port.store(local.port(), Ordering::SeqCst);
            let handle = tokio::spawn(accept_loop(shared.clone(), listener));
            lock(&shared.conns).accept = Some(handle);
            Ok::<(), std::io::Error>(())
        });
        if let Err(e) = result {
            panic!("fake apiserver: cannot listen on 127.0.0.1:{port}: {e}");
        }
    }

    /// Stops listening and closes every connection (open watches end abruptly). The state is
    /// kept; [`start`](Self::start) listens again on the same port.
    pub fn stop(&self) {
        let shared = self.shared.clone();
        self.run_on_server(async move {
            let accept = lock(&shared.conns).accept.take();
            if let Some(a) = accept {
                abort_and_wait(vec![a]).await;
            }
            let handles: Vec<_> = {
                let mut c = lock(&shared.conns);
                c.watching.clear();
                c.handles.drain().map(|(_, h)| h).collect()
            };
            abort_and_wait(handles).await;
        });
    }

    pub fn is_listening(&self) -> bool {
        lock(&self.shared.conns).accept.is_some()
    }

    /// Abruptly closes every connection that is streaming a watch (the TCP connection is torn
    /// down mid-stream, no terminating chunk). Returns how many connections were closed.
    pub fn drop_watches(&self) -> usize {
        let shared = self.shared.clone();
        self.run_on_server(async move {
            let handles: Vec<_> = {
                let mut c = lock(&shared.conns);
                let ids: Vec<u64> = c
                    .watching
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(id, _)| *id)
                    .collect();
                for id in &ids {
                    c.watching.remove(id);
                }
                ids.iter().filter_map(|id| c.handles.remove(id)).collect()
            };
            let n = handles.len();
            abort_and_wait(handles).await;
            n
        })
    }

    /// Number of watch responses currently being streamed.
    pub fn open_watches(&self) -> usize {
        lock(&self.shared.conns).watching.values().sum()
    }

    /// Waits (asynchronously) until at least `n` watches are open. Returns false on timeout.
    pub async fn wait_for_open_watches(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.open_watches() >= n).await
    }

    /// Polls `cond` every 10 ms until it holds; false on timeout.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // ----- faults -----

    /// Delays every response (the head of a watch response included) by `d`.
    pub fn set_latency(&self, d: Duration) {
        lock(&self.shared.state).latency = d;
    }

    /// The next `n` requests (any verb) get an error Status with HTTP code `status`.
    /// NB: kube's default client retries 429/503/504 by itself (up to 15 times).
    pub fn set_fail_next(&self, n: u32, status: u16) {
        lock(&self.shared.state).fail = (n > 0).then_some(FailRule {
            remaining: n,
            status,
            verb: None,
        });
    }

    /// Like [`set_fail_next`](Self::set_fail_next) but only for requests of one verb
    /// (`list`, `watch`, `get`, ...); other requests pass.
    pub fn set_fail_next_verb(&self, verb: &str, n: u32, status: u16) {
        lock(&self.shared.state).fail = (n > 0).then_some(FailRule {
            remaining: n,
            status,
            verb: Some(verb.to_string()),
        });
    }

    /// Changes the BOOKMARK interval for watches started from now on (`None`: no bookmarks).
    pub fn set_bookmark_interval(&self, interval: Option<Duration>) {
        lock(&self.shared.state).bookmark_interval = interval;
    }

    // ----- state -----

    /// Create-or-replace. The object's `kind` picks the resource; returns the stored object
    /// (with `metadata.resourceVersion`, `uid`, `creationTimestamp`). A replace identical to the
    /// stored object is a no-op (no new resourceVersion, no event), as on a real apiserver.
    pub fn apply(&self, obj: Value) -> Value {
        let kind = obj["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("fake apiserver: apply needs a kind: {obj}"))
            .to_string();
        let res = resource_index_or_panic(&kind);
        match self.shared.write(res, None, obj, WriteMode::Apply) {
            Ok((v, _)) => v,
            Err(e) => panic!("fake apiserver: apply failed: {}", e.message),
        }
    }

    /// Deletes an object (DELETED event with its last state, at a new resourceVersion).
    /// `namespace` is ignored for cluster-scoped kinds. Returns the deleted object, if any.
    pub fn delete<'a>(
        &self,
        kind: &str,
        namespace: impl Into<Option<&'a str>>,
        name: &str,
    ) -> Option<Value> {
        let res = resource_index_or_panic(kind);
        self.shared
            .delete(res, namespace.into().unwrap_or_default(), name)
            .ok()
    }

    pub fn get<'a>(
        &self,
        kind: &str,
        namespace: impl Into<Option<&'a str>>,
        name: &str,
    ) -> Option<Value> {
        let res = resource_index_or_panic(kind);
        let ns = if RESOURCES[res].namespaced {
            namespace.into().unwrap_or_default().to_string()
        } else {
            String::new()
        };
        let key = ObjKey {
            res,
            ns,
            name: name.to_string(),
        };
        lock(&self.shared.state)
            .objects
            .get(&key)
            .map(|v| (**v).clone())
    }

    /// Every stored object of a kind, ordered by (namespace, name).
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let res = resource_index_or_panic(kind);
        lock(&self.shared.state)
            .objects
            .iter()
            .filter(|(k, _)| k.res == res)
            .map(|(_, v)| (**v).clone())
            .collect()
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.state).rv
    }

    /// Drops the history: any resourceVersion older than the current one now gets 410 Expired
    /// (watch: ERROR event; list with continue token / Exact: HTTP 410). Open watches go on.
    pub fn compact(&self) {
        let mut st = lock(&self.shared.state);
        st.compacted_rv = st.rv;
        st.history.clear();
    }

    /// The resourceVersion of the last compaction (0 if never).
    pub fn compacted_resource_version(&self) -> u64 {
        lock(&self.shared.state).compacted_rv
    }

    // ----- request log -----

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.state).requests.clone()
    }

    /// Number of requests with this verb (`list`, `watch`, `get`, `discovery`, ...) on this path.
    pub fn request_count(&self, verb: &str, path: &str) -> usize {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter(|r| r.verb == verb && r.path == path)
            .count()
    }

    /// Number of initial lists (and relists) on this path, in whatever way the client lists: a
    /// LIST without a `continue` token, or a streaming list (a WATCH with
    /// `sendInitialEvents=true`).
    pub fn initial_list_count(&self, path: &str) -> usize {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter(|r| r.path == path)
            .filter(|r| {
                (r.verb == "list" && r.param("continue").is_none())
                    || (r.verb == "watch" && r.param("sendInitialEvents") == Some("true"))
            })
            .count()
    }

    /// Number of requests with this verb on any path.
    pub fn verb_count(&self, verb: &str) -> usize {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter(|r| r.verb == verb)
            .count()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.state).requests.clear();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(tx) = lock(&self.shutdown).take() {
            let _ = tx.send(());
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Object builders
// ---------------------------------------------------------------------------------------------

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
            .collect(),
    )
}

/// A Namespace object.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels_json(labels)},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// A Pod object. `node` "" leaves it unscheduled; `ips` empty leaves it `Pending` without
/// `podIP`, otherwise it is `Running` with `podIP = ips[0]` and `podIPs = ips`.
/// `named_ports` are `(name, containerPort, protocol)` of its single container.
pub fn pod(
    ns: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    ips: &[&str],
    named_ports: &[(&str, u16, &str)],
) -> Value {
    let ports: Vec<Value> = named_ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
        .collect();
    let mut container = json!({"name": "main", "image": "registry.k8s.io/pause:3.10"});
    if !ports.is_empty() {
        container["ports"] = Value::Array(ports);
    }
    let mut spec = json!({"containers": [container]});
    if !node.is_empty() {
        spec["nodeName"] = Value::String(node.to_string());
    }
    let status = match ips.first() {
        Some(first) => json!({
            "phase": "Running",
            "podIP": first,
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        }),
        None => json!({"phase": "Pending"}),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels_json(labels)},
        "spec": spec,
        "status": status,
    })
}

/// A NetworkPolicy from a YAML manifest (kind/apiVersion filled in when missing).
pub fn network_policy_from_yaml(yaml: &str) -> Value {
    let mut v: Value = serde_yaml_ng::from_str(yaml).expect("NetworkPolicy YAML must parse");
    if let Some(m) = v.as_object_mut() {
        m.entry("kind")
            .or_insert_with(|| Value::String("NetworkPolicy".into()));
        m.entry("apiVersion")
            .or_insert_with(|| Value::String("networking.k8s.io/v1".into()));
    }
    v
}

/// Every document of a multi-document YAML stream (empty documents skipped).
pub fn objects_from_yaml(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| {
            use serde::Deserialize as _;
            Value::deserialize(doc).expect("YAML document must parse")
        })
        .filter(|v| !v.is_null())
        .collect()
}
