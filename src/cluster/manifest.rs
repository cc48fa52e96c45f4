//! Reading cluster state from YAML/JSON manifests on disk (the embedded, cluster-less mode).
//!
//! Accepts what `kubectl get -o yaml` writes: multi-document YAML, `List` objects, and any mix
//! of Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies. Every problem is reported with the file, the
//! document number and the object, because a user debugging a policy needs to find the line.
//! A document the agent cannot read at all fails the whole load, so a half-read directory
//! never replaces a good ruleset; a single bad object is skipped (or, for a NetworkPolicy,
//! kept as fail-closed isolation) with a warning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use serde_json::Value;

use crate::engine::index::Index;
use crate::model::cnp_api::ClusterNetworkPolicy;
use crate::model::{
    ClusterPolicy, CnpError, NamespaceInfo, NodeInfo, PodInfo, Policy, PolicyError,
};

/// The objects found in a set of manifests, plus every warning, in file order.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    /// Namespaces (sorted by name, duplicates resolved: last wins).
    pub namespaces: Vec<NamespaceInfo>,
    /// Pods.
    pub pods: Vec<PodInfo>,
    /// NetworkPolicies.
    pub policies: Vec<Policy>,
    /// ClusterNetworkPolicies.
    pub cnps: Vec<ClusterPolicy>,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Human-readable problems that did not stop the load.
    pub warnings: Vec<String>,
    /// The same problems (and a few that are only worth a lint), structured, in file order.
    pub problems: Vec<Problem>,
    /// Where each kept object was read, by `Kind namespace/name` (`Kind name` for a
    /// Namespace): `file: document N[, items[i]]`.
    pub origins: BTreeMap<String, String>,
}

impl Manifests {
    /// Replace every kind in `index` with what was loaded (each kind as one relist would);
    /// true if anything changed. Takes the objects out, leaving the problems and origins.
    pub fn replace_in(&mut self, index: &mut Index) -> bool {
        let namespaces = index.reset_namespaces(std::mem::take(&mut self.namespaces));
        let pods = index.reset_pods(std::mem::take(&mut self.pods));
        let policies = index.reset_policies(std::mem::take(&mut self.policies));
        let nodes = index.reset_nodes(std::mem::take(&mut self.nodes));
        let cnps = index.reset_cnps(std::mem::take(&mut self.cnps));
        namespaces | pods | policies | nodes | cnps
    }

    /// A fresh index holding what was loaded.
    pub fn into_index(mut self) -> Index {
        let mut index = Index::new();
        self.replace_in(&mut index);
        index
    }
}

/// One problem found while loading, with enough structure for `lint` to name the object and
/// the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `file: document N[, items[i]]`.
    pub origin: String,
    /// `Kind namespace/name`, when the document got that far.
    pub object: Option<String>,
    /// JSON path of the field at fault, when there is one.
    pub field: Option<String>,
    /// What went wrong.
    pub kind: ProblemKind,
    /// The message, naming the object (without the origin).
    pub message: String,
}

/// The kinds of [`Problem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// A document without `kind`; skipped.
    NoKind,
    /// A kind kube-nftpolicy does not use; skipped.
    UnusedKind,
    /// A field the API type does not have: the API server would drop it silently.
    DroppedField,
    /// The object could not be decoded (a field of the wrong type).
    Unreadable,
    /// A NetworkPolicy the API server would reject; it is kept, failing closed.
    InvalidPolicy(PolicyError),
    /// A NetworkPolicy so broken that not even its pods are known; it is ignored.
    RejectedPolicy(PolicyError),
    /// A part of a valid policy that has no effect.
    IgnoredField,
    /// A ClusterNetworkPolicy with a part the API server would reject (or a newer CRD's
    /// field); it is kept, and the rules concerned fail closed.
    InvalidClusterPolicy(CnpError),
    /// A ClusterNetworkPolicy that cannot be placed (tier, priority or subject); ignored.
    RejectedClusterPolicy(CnpError),
    /// The same object twice; the later one wins.
    Duplicate,
    /// Something about a Pod or Namespace that does not stop its use (or skips only it).
    Object,
    /// A NetworkPolicy without `metadata.namespace`, assumed to be in `default`. Not a load
    /// warning (the agent gets namespaced objects from the API server); `lint` reports it.
    DefaultedNamespace,
}

impl ProblemKind {
    /// Is this printed when loading (as opposed to only by `lint`)?
    pub fn is_load_warning(&self) -> bool {
        !matches!(self, Self::DefaultedNamespace)
    }
}

/// A load that failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The path could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// YAML/JSON syntax error.
    #[error("{path}: document {document}: {message}")]
    Syntax {
        /// File.
        path: PathBuf,
        /// 1-based document number.
        document: usize,
        /// `malformed YAML: …` or `malformed JSON: …`, with line and column.
        message: String,
    },
    /// No manifest files in a directory.
    #[error("{0}: no .yaml, .yml or .json files found")]
    Empty(PathBuf),
}

/// Where a document came from, for messages.
#[derive(Clone, Debug)]
struct Origin<'a> {
    path: &'a Path,
    document: usize,
    item: Option<usize>,
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.path.display(), self.document)?;
        if let Some(i) = self.item {
            write!(f, ", items[{i}]")?;
        }
        Ok(())
    }
}

/// Load a file, or every `.yaml`/`.yml`/`.json` file directly inside a directory (sorted).
pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
    let files = manifest_files(path)?;
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            path: file.clone(),
            source,
        })?;
        sources.push((file, text));
    }
    parse_sources(&sources)
}

/// The files `load` would read, in order.
pub fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        let is_manifest = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ManifestError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

/// Parse already-read sources (no I/O; used by `load` and by tests). YAML documents are
/// decoded on every core (see [`decode_yaml`]); the result does not depend on how many.
///
/// A source whose first non-blank character is `{` or `[` is JSON (`kubectl get -o json`),
/// read with serde_json, which is many times faster than a YAML parser on a large dump; any
/// other source is YAML, one or more documents. Either way a document may be a `List`.
pub fn parse_sources(sources: &[(PathBuf, String)]) -> Result<Manifests, ManifestError> {
    let mut collector = Collector::default();
    for (path, text) in sources {
        let syntax = |document: usize, message: String| ManifestError::Syntax {
            path: path.clone(),
            document,
            message,
        };
        let mut each = |document: usize, value: Value| {
            let origin = Origin {
                path,
                document,
                item: None,
            };
            collector.document(&origin, value);
        };
        if text.trim_start().starts_with(['{', '[']) {
            json_documents(&mut collector, path, text).map_err(|(d, e)| syntax(d, e))?;
        } else {
            let chunks: Vec<(usize, &str)> = yaml_documents(text).collect();
            let mut document = 0;
            decode_yaml(&chunks, |first_line, values| {
                for value in values {
                    document += 1;
                    let value = value.map_err(|e| {
                        syntax(
                            document,
                            format!(
                                "malformed YAML: {e} (the document starts at line {first_line})"
                            ),
                        )
                    })?;
                    each(document, value);
                }
                Ok(())
            })?;
        }
    }
    Ok(collector.finish())
}

/// YAML documents a decoding thread hands over at a time.
const YAML_GROUP: usize = 16;

/// Decoded groups a thread may get ahead of the reader: bounds the value trees alive at once
/// (a few kilobytes per document) whatever the size of the stream.
const YAML_AHEAD: usize = 8;

/// One YAML chunk decoded: its documents in order, stopping after the first error.
type DecodedChunk = Vec<Result<Value, String>>;

fn decode_chunk(chunk: &str) -> DecodedChunk {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(chunk) {
        let value = Value::deserialize(doc).map_err(|e| e.to_string());
        let failed = value.is_err();
        out.push(value);
        if failed {
            break;
        }
    }
    out
}

/// Decode YAML chunks into value trees on every core and hand each to `each`, in order.
///
/// Decoding YAML is most of the time `render` takes on a dump of a large cluster (57 MB at
/// 100,000 pods: 6 s on one core), and the documents of a stream are independent. Thread
/// `w` of `n` decodes groups `w`, `w + n`, … of [`YAML_GROUP`] chunks into its own bounded
/// channel, and the caller reads the channels in turn, so it sees exactly the order one
/// thread would produce while it trims the previous documents. `each` returning an error
/// stops everything.
fn decode_yaml<E>(
    chunks: &[(usize, &str)],
    each: impl FnMut(usize, DecodedChunk) -> Result<(), E>,
) -> Result<(), E> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    decode_yaml_on(threads, chunks, each)
}

/// [`decode_yaml`] on `threads` threads.
fn decode_yaml_on<E>(
    threads: usize,
    chunks: &[(usize, &str)],
    mut each: impl FnMut(usize, DecodedChunk) -> Result<(), E>,
) -> Result<(), E> {
    let groups: Vec<&[(usize, &str)]> = chunks.chunks(YAML_GROUP).collect();
    if threads < 2 || groups.len() < 2 {
        for (line, chunk) in chunks {
            each(*line, decode_chunk(chunk))?;
        }
        return Ok(());
    }
    let workers = threads.min(groups.len());
    std::thread::scope(|scope| {
        let receivers: Vec<_> = (0..workers)
            .map(|w| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<DecodedChunk>>(YAML_AHEAD);
                let mine: Vec<&[(usize, &str)]> =
                    groups.iter().skip(w).step_by(workers).copied().collect();
                scope.spawn(move || {
                    for group in mine {
                        let decoded = group.iter().map(|(_, c)| decode_chunk(c)).collect();
                        // The reader hung up (it stopped at an error): stop too.
                        if tx.send(decoded).is_err() {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        for (g, group) in groups.iter().enumerate() {
            let decoded = match receivers[g % workers].recv() {
                Ok(d) => d,
                // The thread died (a panic in the YAML parser, a bug there): say so on the
                // group's first document rather than losing it.
                Err(_) => vec![vec![Err("the YAML parser failed".to_string())]],
            };
            for ((line, _), values) in group.iter().zip(decoded) {
                each(*line, values)?;
            }
        }
        Ok(())
    })
    // Returning drops the receivers, which ends any thread still decoding.
}

fn is_list_kind(kind: &str) -> bool {
    kind == "List" || kind.ends_with("List")
}

/// The JSON documents of one source, one after the other. A `List` (what `kubectl get -o
/// json` writes) is read item by item: each item becomes a value tree and is trimmed into
/// the model before the next is read, so memory follows the largest object rather than the
/// dump (a serde_json `Value` of a 124 MB dump of 100,000 pods took 1.1 GB). The list's
/// `kind` decides how its items read, and `kubectl` writes it after `items`, so each
/// document is first scanned for its top-level `kind` (serde_json skips values without
/// building them), then read. A bare JSON array of objects reads as a `List` of them.
/// Errors carry the document number.
fn json_documents(
    collector: &mut Collector,
    path: &Path,
    text: &str,
) -> Result<(), (usize, String)> {
    let mut offset = 0;
    let mut document = 0;
    loop {
        let rest = &text[offset..];
        let body = rest.trim_start();
        if body.is_empty() {
            return Ok(());
        }
        document += 1;
        let malformed = |e: serde_json::Error| (document, format!("malformed JSON: {e}"));
        let mut heads = serde_json::Deserializer::from_str(body).into_iter::<JsonHead>();
        let head = match heads.next() {
            Some(head) => head.map_err(malformed)?,
            None => return Ok(()),
        };
        let len = heads.byte_offset();
        let doc = &body[..len];
        let origin = Origin {
            path,
            document,
            item: None,
        };
        let list_kind = match head {
            JsonHead::Array => Some("List".to_string()),
            JsonHead::Object(Some(kind)) if is_list_kind(&kind) => Some(kind),
            JsonHead::Object(_) | JsonHead::Other => None,
        };
        let mut de = serde_json::Deserializer::from_str(doc);
        match list_kind {
            Some(kind) => {
                let seed = ListSeed {
                    collector: &mut *collector,
                    origin: &origin,
                    kind: &kind,
                };
                serde::de::DeserializeSeed::deserialize(seed, &mut de).map_err(malformed)?;
            }
            None => {
                let value = Value::deserialize(&mut de).map_err(malformed)?;
                collector.document(&origin, value);
            }
        }
        de.end().map_err(malformed)?;
        offset += rest.len() - body.len() + len;
    }
}

/// What the first pass over a JSON document learns: is it an array, or an object and of
/// which `kind`.
enum JsonHead {
    Array,
    Object(Option<String>),
    Other,
}

impl<'de> Deserialize<'de> for JsonHead {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonHead;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<JsonHead, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(JsonHead::Array)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonHead, A::Error> {
                let mut kind = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "kind" {
                        kind = map.next_value::<Value>()?.as_str().map(str::to_owned);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(JsonHead::Object(kind))
            }
            fn visit_bool<E>(self, _: bool) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
            fn visit_unit<E>(self) -> Result<JsonHead, E> {
                Ok(JsonHead::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a list document (an object with `items`, or a bare array), handing each item to
/// the collector as soon as it is read.
struct ListSeed<'c, 'o> {
    collector: &'c mut Collector,
    origin: &'o Origin<'o>,
    kind: &'o str,
}

impl<'de> serde::de::DeserializeSeed<'de> for ListSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ListSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of objects")
    }

    /// The items themselves (a bare array, or the value of `items`).
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while let Some(item) = seq.next_element::<Value>()? {
            self.collector.list_item(self.origin, self.kind, i, item);
            i += 1;
        }
        Ok(())
    }

    /// The list object: only `items` matters (other fields are skipped unread).
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ListSeed {
            collector,
            origin,
            kind,
        } = self;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "items" {
                map.next_value_seed(Items(ListSeed {
                    collector: &mut *collector,
                    origin,
                    kind,
                }))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The value of a list's `items`: an array is read item by item; anything else (null, or a
/// mistake) holds no items, as when the whole list is read as one value.
struct Items<'c, 'o>(ListSeed<'c, 'o>);

impl<'de> serde::de::DeserializeSeed<'de> for Items<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Items<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list's items")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.0.visit_seq(seq)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The documents of a YAML stream, each with the number of its first line, split at the
/// `---` markers that start a line (YAML forbids that marker inside a scalar, so the split is
/// exact). serde_yaml_ng parses every document of its input before yielding the first, which
/// for a dump of a large cluster holds the events of all of them at once (1.8 GB for 57 MB);
/// one document at a time, memory follows the largest document instead.
fn yaml_documents(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut starts = vec![(1, 0)];
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---"
            || bare
                .strip_prefix("---")
                .is_some_and(|rest| rest.starts_with([' ', '\t']));
        if is_marker && offset > 0 {
            starts.push((n + 1, offset));
        }
        offset += line.len();
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|(_, at)| *at)
        .chain([text.len()])
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .map(move |((line, from), to)| (line, &text[from..to]))
}

#[derive(Default)]
struct Collector {
    namespaces: BTreeMap<String, (String, NamespaceInfo)>,
    pods: BTreeMap<crate::model::ObjectKey, (String, PodInfo)>,
    policies: BTreeMap<crate::model::ObjectKey, (String, Policy)>,
    cnps: BTreeMap<String, (String, ClusterPolicy)>,
    nodes: BTreeMap<String, (String, NodeInfo)>,
    problems: Vec<Problem>,
}

fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<no name>");
    match meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

impl Collector {
    fn problem(
        &mut self,
        origin: &Origin<'_>,
        object: Option<&str>,
        field: Option<String>,
        kind: ProblemKind,
        message: String,
    ) {
        self.problems.push(Problem {
            origin: origin.to_string(),
            object: object.map(str::to_owned),
            field,
            kind,
            message,
        });
    }

    /// Item `i` of a list of kind `list_kind`.
    fn list_item(&mut self, origin: &Origin<'_>, list_kind: &str, i: usize, mut item: Value) {
        let origin = Origin {
            item: Some(i),
            ..origin.clone()
        };
        // `kubectl get pods -o yaml` lists carry kind on items, typed lists may not.
        if item.get("kind").is_none() {
            if let Some(obj) = item.as_object_mut() {
                obj.insert(
                    "kind".into(),
                    Value::String(list_kind.trim_end_matches("List").into()),
                );
            }
        }
        self.document(&origin, item);
    }

    fn document(&mut self, origin: &Origin<'_>, value: Value) {
        if value.is_null() {
            return; // empty document, e.g. a trailing `---`
        }
        let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
            self.problem(
                origin,
                None,
                None,
                ProblemKind::NoKind,
                "no `kind`; document skipped".into(),
            );
            return;
        };
        if is_list_kind(&kind) {
            // Taken, not cloned: a dump of a large cluster is one list of every object.
            let mut value = value;
            let items = match value.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            };
            for (i, item) in items.into_iter().enumerate() {
                self.list_item(origin, &kind, i, item);
            }
            return;
        }
        let mut value = value;
        match kind.as_str() {
            "Namespace" => {
                let what = describe(&kind, &value);
                if let Ok(ns) = self.typed::<Namespace>(origin, &what, &value) {
                    let trimmed = NamespaceInfo::from_k8s(&ns).map(|i| (i.name.clone(), i));
                    self.keep(origin, &what, Vec::new(), trimmed, |c| &mut c.namespaces);
                }
            }
            "Node" => {
                let what = describe(&kind, &value);
                if let Ok(node) = self.typed::<Node>(origin, &what, &value) {
                    let mut w = Vec::new();
                    let trimmed = NodeInfo::from_k8s(&node, &mut w).map(|i| (i.name.clone(), i));
                    self.keep(origin, &what, w, trimmed, |c| &mut c.nodes);
                }
            }
            "Pod" => {
                default_namespace(&mut value);
                let what = describe(&kind, &value);
                if let Ok(pod) = self.typed::<Pod>(origin, &what, &value) {
                    let mut w = Vec::new();
                    let trimmed = PodInfo::from_k8s(&pod, &mut w).map(|i| (i.key.clone(), i));
                    self.keep(origin, &what, w, trimmed, |c| &mut c.pods);
                }
            }
            "NetworkPolicy" => {
                if default_namespace(&mut value) {
                    let what = describe(&kind, &value);
                    self.problem(
                        origin,
                        Some(&what),
                        Some("metadata.namespace".into()),
                        ProblemKind::DefaultedNamespace,
                        format!("{what}: metadata.namespace is not set; assuming `default`"),
                    );
                }
                let what = describe(&kind, &value);
                let (np, unreadable) = match self.typed::<NetworkPolicy>(origin, &what, &value) {
                    Ok(np) => (np, None),
                    Err(failure) => match isolation_only(&value) {
                        Some(np) => (np, Some(failure)),
                        None => return,
                    },
                };
                let mut w = Vec::new();
                match Policy::from_k8s(&np, &mut w) {
                    Ok(mut policy) => {
                        for warning in w {
                            self.problem(
                                origin,
                                Some(&what),
                                Some(warning.field.to_string()),
                                ProblemKind::IgnoredField,
                                warning.to_string(),
                            );
                        }
                        if let Some((field, reason)) = unreadable {
                            policy.invalid = Some(PolicyError::Unreadable {
                                field,
                                reason: format!(
                                    "{reason} (the spec could not be read; see the previous warning)"
                                ),
                            });
                        }
                        if let Some(e) = &policy.invalid {
                            self.problem(
                                origin,
                                Some(&what),
                                Some(e.field()),
                                ProblemKind::InvalidPolicy(e.clone()),
                                format!(
                                    "{what} is invalid: {e}; it still isolates the pods it selects but allows nothing"
                                ),
                            );
                        }
                        let at = format!("{origin}");
                        if let Some((prev, _)) =
                            self.policies.insert(policy.key.clone(), (at, policy))
                        {
                            self.duplicate(origin, &what, &prev);
                        }
                    }
                    Err(e) => self.problem(
                        origin,
                        Some(&what),
                        Some(e.field()),
                        ProblemKind::RejectedPolicy(e.clone()),
                        format!("{what} is invalid and ignored: {e}"),
                    ),
                }
            }
            "ClusterNetworkPolicy" => {
                let what = describe(&kind, &value);
                let Ok(cnp) = self.typed::<ClusterNetworkPolicy>(origin, &what, &value) else {
                    return;
                };
                match ClusterPolicy::from_api(&cnp) {
                    Ok(policy) => {
                        for e in &policy.problems {
                            self.problem(
                                origin,
                                Some(&what),
                                Some(e.field()),
                                ProblemKind::InvalidClusterPolicy(e.clone()),
                                format!("{e}"),
                            );
                        }
                        let at = format!("{origin}");
                        if let Some((prev, _)) = self.cnps.insert(policy.name.clone(), (at, policy))
                        {
                            self.duplicate(origin, &what, &prev);
                        }
                    }
                    Err(e) => self.problem(
                        origin,
                        Some(&what),
                        Some(e.field()),
                        ProblemKind::RejectedClusterPolicy(e.clone()),
                        format!("{e}; the policy is ignored"),
                    ),
                }
            }
            other => {
                let what = describe(other, &value);
                self.problem(
                    origin,
                    Some(&what),
                    None,
                    ProblemKind::UnusedKind,
                    format!("kind {other} ({what}) is not used by kube-nftpolicy; skipped"),
                );
            }
        }
    }

    /// Keep one trimmed object in its `store` (its warnings reported first, a duplicate of an
    /// earlier one named), or report why it was skipped.
    fn keep<K: Ord, V>(
        &mut self,
        origin: &Origin<'_>,
        what: &str,
        warnings: Vec<String>,
        trimmed: Result<(K, V), crate::model::ModelError>,
        store: fn(&mut Collector) -> &mut BTreeMap<K, (String, V)>,
    ) {
        for m in warnings {
            self.problem(origin, Some(what), None, ProblemKind::Object, m);
        }
        match trimmed {
            Ok((key, info)) => {
                if let Some((prev, _)) = store(self).insert(key, (origin.to_string(), info)) {
                    self.duplicate(origin, what, &prev);
                }
            }
            Err(e) => self.problem(
                origin,
                Some(what),
                None,
                ProblemKind::Object,
                format!("{e}; skipped"),
            ),
        }
    }

    fn duplicate(&mut self, origin: &Origin<'_>, what: &str, prev: &str) {
        self.problem(
            origin,
            Some(what),
            None,
            ProblemKind::Duplicate,
            format!("{what} duplicates the one at {prev}; the later one wins"),
        );
    }

    /// Deserialize into the k8s-openapi type, reporting fields it does not know (a real API
    /// server drops those silently, which is how a misplaced `ports:` opens traffic). On
    /// failure, returns the path of the field that failed and the decoder's message.
    fn typed<T>(
        &mut self,
        origin: &Origin<'_>,
        what: &str,
        value: &Value,
    ) -> Result<T, (String, String)>
    where
        T: serde::de::DeserializeOwned + serde::Serialize,
    {
        let typed: T = match serde_path_to_error::deserialize(value) {
            Ok(t) => t,
            Err(e) => {
                let field = e.path().to_string();
                let reason = e.inner().to_string();
                self.problem(
                    origin,
                    Some(what),
                    Some(field.clone()),
                    ProblemKind::Unreadable,
                    format!("{what}: field {field}: {reason}; skipped"),
                );
                return Err((field, reason));
            }
        };
        if let Ok(round_trip) = serde_json::to_value(&typed) {
            let mut dropped = Vec::new();
            dropped_fields(value, &round_trip, &mut String::new(), &mut dropped);
            for field in dropped {
                self.problem(
                    origin,
                    Some(what),
                    Some(field.clone()),
                    ProblemKind::DroppedField,
                    format!(
                        "{what}: unknown field `{field}` is ignored (the API server would drop it)"
                    ),
                );
            }
        }
        Ok(typed)
    }

    fn finish(self) -> Manifests {
        let mut origins = BTreeMap::new();
        for (name, (at, _)) in &self.namespaces {
            origins.insert(format!("Namespace {name}"), at.clone());
        }
        for (key, (at, _)) in &self.pods {
            origins.insert(format!("Pod {key}"), at.clone());
        }
        for (key, (at, _)) in &self.policies {
            origins.insert(format!("NetworkPolicy {key}"), at.clone());
        }
        for (name, (at, _)) in &self.cnps {
            origins.insert(format!("ClusterNetworkPolicy {name}"), at.clone());
        }
        for (name, (at, _)) in &self.nodes {
            origins.insert(format!("Node {name}"), at.clone());
        }
        let warnings = self
            .problems
            .iter()
            .filter(|p| p.kind.is_load_warning())
            .map(|p| format!("{}: {}", p.origin, p.message))
            .collect();
        Manifests {
            namespaces: self.namespaces.into_values().map(|(_, v)| v).collect(),
            pods: self.pods.into_values().map(|(_, v)| v).collect(),
            policies: self.policies.into_values().map(|(_, v)| v).collect(),
            cnps: self.cnps.into_values().map(|(_, v)| v).collect(),
            nodes: self.nodes.into_values().map(|(_, v)| v).collect(),
            warnings,
            problems: self.problems,
            origins,
        }
    }
}

/// A NetworkPolicy whose spec could not be read, reduced to what still tells which pods it
/// isolates and in which directions: it then isolates them and allows nothing (fail closed).
fn isolation_only(value: &Value) -> Option<NetworkPolicy> {
    let has = |field: &str| value.pointer(&format!("/spec/{field}")).is_some();
    let mut types = value.pointer("/spec/policyTypes").cloned();
    if types.is_none() {
        // An egress section that could not be read still makes the policy apply to egress.
        let mut t = vec!["Ingress"];
        if has("egress") {
            t.push("Egress");
        }
        types = Some(serde_json::json!(t));
    }
    let shell = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": value.get("metadata"),
        "spec": {"podSelector": value.pointer("/spec/podSelector"), "policyTypes": types},
    });
    serde_json::from_value(shell).ok()
}

/// `kubectl apply` puts objects without a namespace into the context's namespace, `default`
/// unless configured otherwise. True when the namespace was missing.
fn default_namespace(value: &mut Value) -> bool {
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            meta.insert("namespace".into(), Value::String("default".into()));
            return true;
        }
    }
    false
}

/// Paths present (and non-null) in `original` but missing after a typed round trip.
fn dropped_fields(original: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    // One path buffer, grown and cut back on the way down: this walks every field of every
    // object in a dump, and almost none of them is dropped.
    let at = path.len();
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match b.get(k) {
                    Some(tv) => dropped_fields(v, tv, path, out),
                    None if v.is_null() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(at);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, tv)) in a.iter().zip(b.iter()).enumerate() {
                use std::fmt::Write as _;
                let _ = write!(path, "[{i}]");
                dropped_fields(v, tv, path, out);
                path.truncate(at);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifests, ManifestError> {
        parse_sources(&[(PathBuf::from("test.yaml"), text.to_string())])
    }

    #[test]
    fn bad_input_is_reported_with_location() {
        struct Case {
            name: &'static str,
            text: &'static str,
            want: &'static str,
            policies: usize,
        }
        let cases = [
            Case {
                name: "unknown kind",
                text: "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n",
                want: "test.yaml: document 1: kind Deployment (Deployment shop/web) is not used",
                policies: 0,
            },
            Case {
                name: "no kind",
                text: "apiVersion: v1\nmetadata: {name: x}\n",
                want: "document 1: no `kind`",
                policies: 0,
            },
            Case {
                name: "nested ports under a peer",
                text: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n      ports: [{port: 80}]\n",
                want: "NetworkPolicy default/p: unknown field `spec.ingress[0].from[0].ports` is ignored",
                policies: 1,
            },
            Case {
                name: "duplicate policy",
                text: "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: a}\nspec: {}\n---\nkind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: a}\nspec: {}\n",
                want: "document 2: NetworkPolicy a/p duplicates the one at test.yaml: document 1",
                policies: 1,
            },
            Case {
                name: "wrong type in a pod",
                text: "kind: Pod\napiVersion: v1\nmetadata: {name: p, namespace: a}\nspec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n",
                want: "Pod a/p: field spec.containers[0].ports[0].containerPort: invalid type",
                policies: 0,
            },
            Case {
                name: "label value not a string",
                text: "kind: Pod\napiVersion: v1\nmetadata: {name: p, namespace: a, labels: {tier: 1}}\n",
                want: "Pod a/p: field metadata.labels.tier: invalid type: integer",
                policies: 0,
            },
            Case {
                name: "bad pod ip",
                text: "kind: Pod\napiVersion: v1\nmetadata: {name: p, namespace: a}\nstatus: {podIPs: [{ip: 10.0.0.300}]}\n",
                want: "Pod a/p: status.podIPs entry \"10.0.0.300\" is not an IP address",
                policies: 0,
            },
            Case {
                name: "invalid policy fails closed",
                text: "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/40}}]}]}\n",
                want: "NetworkPolicy a/p is invalid: spec.ingress[0].from[0].ipBlock.cidr",
                policies: 1,
            },
            Case {
                name: "unreadable policy fails closed",
                text: "kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, ingress: [{ports: [{port: [1]}]}]}\n",
                want: "NetworkPolicy a/p: field spec.ingress[0].ports[0].port",
                policies: 1,
            },
        ];
        for c in cases {
            let m = parse(c.text).expect(c.name);
            let all = m.warnings.join("\n");
            assert!(
                all.contains(c.want),
                "case {}: warnings were:\n{all}",
                c.name
            );
            assert_eq!(m.policies.len(), c.policies, "case {}", c.name);
        }
    }

    #[test]
    fn problems_are_structured_for_lint() {
        let m = parse("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n      ports: [{port: 80}]\n---\nkind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: q, namespace: a}\nspec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}\n").expect("parse");
        let kinds: Vec<(&ProblemKind, Option<&str>, Option<&str>)> = m
            .problems
            .iter()
            .map(|p| (&p.kind, p.object.as_deref(), p.field.as_deref()))
            .collect();
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        assert_eq!(
            (kinds[0].0, kinds[0].1, kinds[0].2),
            (
                &ProblemKind::DefaultedNamespace,
                Some("NetworkPolicy default/p"),
                Some("metadata.namespace")
            )
        );
        assert_eq!(
            (kinds[1].0, kinds[1].2),
            (
                &ProblemKind::DroppedField,
                Some("spec.ingress[0].from[0].ports")
            )
        );
        assert!(
            matches!(
                kinds[2].0,
                ProblemKind::InvalidPolicy(PolicyError::ExceptOutside { .. })
            ),
            "{kinds:?}"
        );
        assert_eq!(kinds[2].2, Some("spec.egress[0].to[0].ipBlock.except[0]"));
        // The defaulted namespace is for lint only; the others are load warnings too.
        assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
        assert_eq!(
            m.origins.get("NetworkPolicy a/q").map(String::as_str),
            Some("test.yaml: document 2")
        );
    }

    #[test]
    fn unreadable_policy_still_isolates() {
        let m = parse("kind: NetworkPolicy\napiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: a}\nspec: {podSelector: {}, egress: [{ports: [{port: [1]}]}]}\n").expect("parse");
        let p = &m.policies[0];
        assert!(p.invalid.is_some());
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, Some(vec![]));
    }

    #[test]
    fn malformed_yaml_fails_the_load() {
        let err = parse("kind: Pod\n---\nkind: [unclosed\n")
            .expect_err("syntax")
            .to_string();
        assert!(
            err.starts_with("test.yaml: document 2: malformed YAML"),
            "{err}"
        );
    }

    #[test]
    fn lists_and_defaults() {
        let m = parse("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: shop, labels: {team: a}}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: web}\n  spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n  status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}\n").expect("parse");
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        assert_eq!(
            m.namespaces[0].labels.get("kubernetes.io/metadata.name"),
            Some("shop")
        );
        assert_eq!(m.pods[0].key.to_string(), "default/web");
        assert_eq!(m.pods[0].ips.len(), 2);
        assert_eq!(m.pods[0].named_ports[0].port, 8080);
    }

    #[test]
    fn nodes_load_and_fill_the_index() {
        let mut m = parse("apiVersion: v1\nkind: NodeList\nitems:\n- metadata: {name: n1, labels: {zone: a}}\n  spec: {podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}\n  status: {addresses: [{type: InternalIP, address: 172.18.0.3}, {type: Hostname, address: n1}]}\n- metadata: {name: n2}\n  spec: {podCIDRs: [not-a-cidr]}\n").expect("parse");
        assert_eq!(m.nodes.len(), 2);
        assert_eq!(m.nodes[0].pod_cidrs.len(), 2);
        assert_eq!(
            m.nodes[0].addresses,
            vec!["172.18.0.3".parse::<std::net::IpAddr>().expect("ip")]
        );
        assert_eq!(
            m.origins.get("Node n1").map(String::as_str),
            Some("test.yaml: document 1, items[0]")
        );
        assert!(
            m.warnings.iter().any(|w| w.contains("items[1]")
                && w.contains("Node n2")
                && w.contains("not-a-cidr")),
            "{:?}",
            m.warnings
        );
        let mut idx = Index::new();
        assert!(m.replace_in(&mut idx), "a first load changes the index");
        let snap = idx.snapshot();
        assert_eq!(snap.nodes.len(), 2);
        assert!(m.nodes.is_empty(), "the objects moved into the index");
        let mut again = parse("kind: Node\napiVersion: v1\nmetadata: {name: n1, labels: {zone: a}}\nspec: {podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.3}]}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: n2}\n").expect("parse");
        assert!(
            !again.replace_in(&mut idx),
            "the same nodes again change nothing"
        );
        let changes = idx.take_changes();
        assert!(changes.everything, "the first load reports everything");
    }

    #[test]
    fn json_dumps_read_like_yaml() {
        let yaml = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: shop}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: web, namespace: shop, labels: {app: web}}\n  spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\n  status: {phase: Running, podIPs: [{ip: 10.0.0.2}]}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p, namespace: shop}\n  spec: {podSelector: {}, ingress: [{ports: [{port: http}]}]}\n";
        let value: Value = serde_yaml_ng::from_str(yaml).expect("yaml");
        let json = serde_json::to_string_pretty(&value).expect("json");
        let bare_array = serde_json::to_string(&value["items"]).expect("json");
        let from =
            |name: &str, text: String| parse_sources(&[(PathBuf::from(name), text)]).expect(name);
        let want = from("dump.yaml", yaml.to_string());
        for (name, text) in [
            ("dump.json", json.clone()),
            ("items.json", bare_array),
            ("two.json", format!("{json}\n{json}")),
        ] {
            let got = from(name, text);
            assert_eq!(got.namespaces, want.namespaces, "case {name}");
            assert_eq!(got.pods, want.pods, "case {name}");
            assert_eq!(got.policies, want.policies, "case {name}");
        }
        // The same object twice is a duplicate, in JSON as in YAML.
        let twice = from("two.json", format!("{json}\n{json}"));
        assert!(
            twice
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::Duplicate)
        );
        // A misspelt field is reported from JSON too.
        let typo = json.replace("\"containerPort\"", "\"containerport\"");
        let m = from("typo.json", typo);
        assert!(
            m.problems
                .iter()
                .any(|p| p.kind == ProblemKind::DroppedField
                    && p.field.as_deref() == Some("spec.containers[0].ports[0].containerport")),
            "{:?}",
            m.problems
        );
        let err = parse_sources(&[(PathBuf::from("bad.json"), "{\"kind\": \"Pod\",".into())])
            .expect_err("truncated JSON")
            .to_string();
        assert!(
            err.starts_with("bad.json: document 1: malformed JSON"),
            "{err}"
        );
    }

    /// JSON lists are read item by item (`json_documents`): a typed list whose `kind` comes
    /// after `items` (as `kubectl get -o json` orders it) still names its kindless items, a
    /// lone object is one document, `items: null` holds nothing, and a later bad document
    /// is reported with its own number.
    #[test]
    fn json_lists_stream_their_items() {
        let pod = |name: &str| {
            format!(
                "{{\"metadata\": {{\"name\": \"{name}\", \"namespace\": \"shop\"}}, \"spec\": {{\"nodeName\": \"n1\", \"containers\": [{{\"name\": \"c\"}}]}}, \"status\": {{\"phase\": \"Running\", \"podIPs\": [{{\"ip\": \"10.0.0.{}\"}}]}}}}",
                name.len()
            )
        };
        let typed = format!(
            "{{\"apiVersion\": \"v1\", \"items\": [{}, {}], \"kind\": \"PodList\", \"metadata\": {{\"resourceVersion\": \"7\"}}}}",
            pod("a"),
            pod("bb")
        );
        let lone =
            "{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"shop\"}}";
        let empty = "{\"kind\": \"List\", \"items\": null}";
        let text = format!("{typed}\n{lone}\n{empty}\n");
        let m = parse_sources(&[(PathBuf::from("dump.json"), text.clone())]).expect("parse");
        let names: Vec<&str> = m.pods.iter().map(|p| p.key.name.as_str()).collect();
        assert_eq!(names, ["a", "bb"], "{:?}", m.problems);
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.origins.get("Pod shop/bb").map(String::as_str),
            Some("dump.json: document 1, items[1]")
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let err = parse_sources(&[(
            PathBuf::from("bad.json"),
            format!("{lone}\n{{\"kind\": \"List\", \"items\": [{{}}"),
        )])
        .expect_err("truncated second document")
        .to_string();
        assert!(
            err.starts_with("bad.json: document 2: malformed JSON"),
            "{err}"
        );
    }

    #[test]
    fn yaml_streams_split_into_documents() {
        // (name, text, want (first line, document text) pairs)
        type Case<'a> = (&'a str, &'a str, Vec<(usize, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            ("one document", "a: 1\n", vec![(1, "a: 1\n")]),
            (
                "two",
                "a: 1\n---\nb: 2\n",
                vec![(1, "a: 1\n"), (2, "---\nb: 2\n")],
            ),
            ("leading marker", "---\na: 1\n", vec![(1, "---\na: 1\n")]),
            (
                "a marker with content and CRLF",
                "a: 1\r\n--- {b: 2}\r\n",
                vec![(1, "a: 1\r\n"), (2, "--- {b: 2}\r\n")],
            ),
            (
                "dashes that are not a marker",
                "a: |\n  ---x\nb: ----\n",
                vec![(1, "a: |\n  ---x\nb: ----\n")],
            ),
            (
                "no final newline",
                "a: 1\n---",
                vec![(1, "a: 1\n"), (2, "---")],
            ),
        ];
        for (name, text, want) in cases {
            let got: Vec<(usize, &str)> = yaml_documents(text).collect();
            assert_eq!(got, want, "case {name:?}");
        }
        // Numbering and errors follow the whole file.
        let err = parse("kind: Pod\n---\nkind: Namespace\n---\nkind: [unclosed\n")
            .expect_err("syntax")
            .to_string();
        assert!(
            err.starts_with("test.yaml: document 3: malformed YAML"),
            "{err}"
        );
        assert!(err.contains("the document starts at line 4"), "{err}");
    }

    /// A stream long enough to take the threaded path of `decode_yaml` (more than one group
    /// of chunks) reads exactly as its documents read one at a time: same objects, same
    /// problems in the same order, same document numbers, and an error names the document it
    /// is in. Regression test for the threaded decoder.
    #[test]
    fn long_streams_read_as_their_documents_do() {
        let doc = |i: usize| match i % 4 {
            0 => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{i}, labels: {{team: t{}}}}}\n",
                i % 3
            ),
            1 => format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{i}, namespace: ns-0}}\nspec: {{nodeName: n1, bogus: 1}}\nstatus: {{podIPs: [{{ip: 10.0.{}.{}}}]}}\n",
                i / 250,
                i % 250
            ),
            // The same namespace again and again: a duplicate problem each time.
            2 => "apiVersion: v1\nkind: Namespace\nmetadata: {name: dup}\n".to_string(),
            // A chunk with no document in it: the numbering must not count it.
            _ => "# only a comment\n".to_string(),
        };
        let docs: Vec<String> = (0..400).map(doc).collect();
        let stream = docs.join("---\n");
        assert!(
            stream.matches("---").count() > YAML_GROUP * 4,
            "long enough to thread"
        );
        let whole = parse(&stream).expect("stream");
        // The same documents, read one chunk at a time (never threaded), then numbered as
        // the stream numbers them.
        let mut one_by_one = Collector::default();
        let mut document = 0;
        for (_, chunk) in yaml_documents(&stream) {
            for value in decode_chunk(chunk) {
                document += 1;
                let origin = Origin {
                    path: Path::new("test.yaml"),
                    document,
                    item: None,
                };
                one_by_one.document(&origin, value.expect("valid document"));
            }
        }
        let one_by_one = one_by_one.finish();
        assert_eq!(whole.namespaces, one_by_one.namespaces);
        assert_eq!(whole.pods, one_by_one.pods);
        assert_eq!(whole.warnings, one_by_one.warnings);
        assert_eq!(whole.origins, one_by_one.origins);
        assert!(
            whole.warnings.iter().any(|w| w.contains("duplicates")),
            "the repeated namespace is reported: {:?}",
            &whole.warnings[..3]
        );

        // Whatever the number of threads, the chunks come back in order, each as decoding it
        // alone gives.
        let chunks: Vec<(usize, &str)> = yaml_documents(&stream).collect();
        let alone: Vec<(usize, DecodedChunk)> =
            chunks.iter().map(|(l, c)| (*l, decode_chunk(c))).collect();
        for threads in [1, 2, 3, 7] {
            let mut got = Vec::new();
            decode_yaml_on(threads, &chunks, |line, values| {
                got.push((line, values));
                Ok::<(), ()>(())
            })
            .expect("no error");
            assert_eq!(got, alone, "{threads} threads");
        }

        // An error late in the stream names its document.
        let mut broken = docs.clone();
        broken[301] = "kind: [unclosed\n".to_string();
        let broken = broken.join("---\n");
        let err = parse(&broken).expect_err("syntax").to_string();
        let before: usize = yaml_documents(&broken)
            .take(301)
            .map(|(_, chunk)| decode_chunk(chunk).len())
            .sum();
        assert!(before > 250, "the chunks before hold documents: {before}");
        assert!(
            err.starts_with(&format!(
                "test.yaml: document {}: malformed YAML",
                before + 1
            )),
            "{err}"
        );
    }
}
