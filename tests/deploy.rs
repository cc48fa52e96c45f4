//! `deploy/` and the `Dockerfile`, checked against the code they deploy.
//!
//! A manifest that passes a flag the agent does not have, probes a path it does not serve, or
//! grants RBAC the watchers do not use fails only on a real cluster, long after review. So:
//!
//! - every YAML document in `deploy/` is parsed into its type (k8s-openapi's, and for the
//!   PodMonitor CRD and the kustomizations, structs defined here with `deny_unknown_fields`,
//!   covering the fields we use). A field the type does not have is an error, so a misspelt
//!   `readOnlyRootFileSystem` cannot pass silently;
//! - the ClusterRole must grant exactly `kube_nftpolicy::cluster::watch::api_access()`, which is
//!   derived from the watchers themselves (and `tests/agent_e2e.rs` checks a running agent's
//!   requests against it);
//! - the containers' arguments, after the image's ENTRYPOINT/CMD (from the Dockerfile), the
//!   kubelet's `$(VAR)` expansion and clap's `env` fallback, go through the agent's own CLI
//!   parser (`kube_nftpolicy::cli::Cli`); ports, probe paths and scrape settings must match
//!   the parsed `--metrics-addr` and the paths the admin server serves;
//! - the security and scheduling properties an operator relies on hold (host network, only
//!   NET_ADMIN, read-only root, priority, tolerations, resources, no surge);
//! - the Dockerfile's runtime stage installs nft, copies the binary, and runs
//!   `kube-nftpolicy run` in exec form.
//!
//! Each check is a function that returns the problems it finds, each naming the file and the
//! object. `broken_copies_are_rejected` feeds every check a deliberately broken copy of the
//! real files, so each one is known to be able to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::Path;

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, ResourceQuota, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube_nftpolicy::agent::admin::{HEALTHZ_PATH, METRICS_PATH, READYZ_PATH};
use kube_nftpolicy::cli::{Cli, Command};
use kube_nftpolicy::cluster::watch::api_access;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const AGENT: &str = "kube-nftpolicy";
const CLEANUP: &str = "kube-nftpolicy-cleanup";
/// Files in deploy/ that the kustomization leaves out on purpose (they need a CRD).
const OPTIONAL: &[&str] = &[
    "deploy/podmonitor.yaml",
    "deploy/monitoring/prometheusrule.yaml",
];
/// What the kubelet would put in an env var whose value comes from a `fieldRef`: the test
/// cannot know the node, so it stands in a marker naming the field.
fn field_ref_value(path: &str) -> String {
    format!("<fieldRef {path}>")
}

// ───────────────────────────── loading ─────────────────────────────

/// Repository-relative path → contents: every file under deploy/, and the Dockerfile.
type Files = BTreeMap<String, String>;

fn real_files() -> Files {
    fn walk(dir: &Path, out: &mut Files) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else {
                let rel = path
                    .strip_prefix(ROOT)
                    .expect("under the repository")
                    .to_string_lossy()
                    .into_owned();
                let text = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                out.insert(rel, text);
            }
        }
    }
    let mut files = Files::new();
    walk(&Path::new(ROOT).join("deploy"), &mut files);
    let dockerfile = Path::new(ROOT).join("Dockerfile");
    files.insert(
        "Dockerfile".into(),
        fs::read_to_string(&dockerfile).expect("reading the Dockerfile"),
    );
    files
}

fn is_yaml(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

/// Where an object came from: file and 1-based document number.
#[derive(Clone, Debug)]
struct Origin {
    file: String,
    doc: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.doc)
    }
}

/// `kustomization.yaml`: the fields we use, nothing else allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// The prometheus-operator's PodMonitor (monitoring.coreos.com/v1), a CRD that k8s-openapi
/// has no type for: the fields we use, nothing else allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    job_label: Option<String>,
    selector: LabelSelector,
    namespace_selector: Option<MonitorNamespaceSelector>,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MonitorNamespaceSelector {
    #[serde(default)]
    any: bool,
    #[serde(default)]
    match_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: Option<String>,
    path: Option<String>,
    interval: Option<String>,
    scheme: Option<String>,
    honor_labels: Option<bool>,
    #[serde(default)]
    relabelings: Vec<RelabelConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RelabelConfig {
    #[serde(default)]
    source_labels: Vec<String>,
    target_label: Option<String>,
    action: Option<String>,
    regex: Option<String>,
    replacement: Option<String>,
}

/// The prometheus-operator's PrometheusRule (monitoring.coreos.com/v1): the fields a rule
/// group has, nothing else allowed. promtool checks the rules themselves (tests/observability.rs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PrometheusRuleSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrometheusRuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// Every object in deploy/, by type.
#[derive(Debug, Default)]
struct Manifests {
    namespaces: Vec<(Origin, Namespace)>,
    quotas: Vec<(Origin, ResourceQuota)>,
    service_accounts: Vec<(Origin, ServiceAccount)>,
    cluster_roles: Vec<(Origin, ClusterRole)>,
    bindings: Vec<(Origin, ClusterRoleBinding)>,
    daemonsets: Vec<(Origin, DaemonSet)>,
    pod_monitors: Vec<(Origin, PodMonitor)>,
    prometheus_rules: Vec<(Origin, PrometheusRule)>,
    kustomizations: Vec<(Origin, Kustomization)>,
}

/// The first field of `orig` that did not survive a round trip through the type, or the first
/// value that changed: a field the type does not have is dropped on deserialisation.
fn lost_field(orig: &Value, back: &Value, path: &str) -> Option<String> {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => o.iter().find_map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match b.get(k) {
                None => Some(format!("{p}: not a field of this type (misspelt?)")),
                Some(bv) => lost_field(v, bv, &p),
            }
        }),
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => o
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, bv))| lost_field(v, bv, &format!("{path}[{i}]"))),
        _ if orig == back => None,
        _ => Some(format!("{path}: {orig} reads back as {back}")),
    }
}

/// Parse a k8s-openapi type; any field it does not have is an error.
fn strict<T: DeserializeOwned + serde::Serialize>(origin: &Origin, v: &Value) -> Result<T, String> {
    let t: T = serde_path_to_error::deserialize(v.clone())
        .map_err(|e| format!("{origin}: {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{origin}: {e}"))?;
    match lost_field(v, &back, "") {
        Some(problem) => Err(format!("{origin}: {problem}")),
        None => Ok(t),
    }
}

/// Parse one of our own `deny_unknown_fields` types.
fn exact<T: DeserializeOwned>(origin: &Origin, v: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v.clone())
        .map_err(|e| format!("{origin}: {}: {}", e.path(), e.inner()))
}

fn parse_manifests(files: &Files, problems: &mut Vec<String>) -> Manifests {
    let mut m = Manifests::default();
    for (file, text) in files.iter().filter(|(f, _)| is_yaml(f)) {
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                doc: i + 1,
            };
            let v = match Value::deserialize(de) {
                Ok(Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{origin}: not YAML: {e}"));
                    continue;
                }
            };
            let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default();
            let parsed = match kind {
                "Namespace" => strict(&origin, &v).map(|t| m.namespaces.push((origin.clone(), t))),
                "ResourceQuota" => strict(&origin, &v).map(|t| m.quotas.push((origin.clone(), t))),
                "ServiceAccount" => {
                    strict(&origin, &v).map(|t| m.service_accounts.push((origin.clone(), t)))
                }
                "ClusterRole" => {
                    strict(&origin, &v).map(|t| m.cluster_roles.push((origin.clone(), t)))
                }
                "ClusterRoleBinding" => {
                    strict(&origin, &v).map(|t| m.bindings.push((origin.clone(), t)))
                }
                "DaemonSet" => strict(&origin, &v).map(|t| m.daemonsets.push((origin.clone(), t))),
                "PodMonitor" => exact::<PodMonitor>(&origin, &v).and_then(|t| {
                    if t.api_version != "monitoring.coreos.com/v1" || t.kind != "PodMonitor" {
                        return Err(format!(
                            "{origin}: apiVersion {} is not monitoring.coreos.com/v1",
                            t.api_version
                        ));
                    }
                    m.pod_monitors.push((origin.clone(), t));
                    Ok(())
                }),
                "PrometheusRule" => exact::<PrometheusRule>(&origin, &v).and_then(|t| {
                    if t.api_version != "monitoring.coreos.com/v1" || t.kind != "PrometheusRule" {
                        return Err(format!(
                            "{origin}: apiVersion {} is not monitoring.coreos.com/v1",
                            t.api_version
                        ));
                    }
                    m.prometheus_rules.push((origin.clone(), t));
                    Ok(())
                }),
                "Kustomization" => exact::<Kustomization>(&origin, &v).and_then(|t| {
                    if t.api_version != "kustomize.config.k8s.io/v1beta1"
                        || t.kind != "Kustomization"
                    {
                        return Err(format!(
                            "{origin}: apiVersion {} is not kustomize.config.k8s.io/v1beta1",
                            t.api_version
                        ));
                    }
                    m.kustomizations.push((origin.clone(), t));
                    Ok(())
                }),
                other => Err(format!(
                    "{origin}: kind {other:?} is not one this test knows how to check"
                )),
            };
            if let Err(e) = parsed {
                problems.push(e);
            }
        }
    }
    m
}

fn one<'a, T>(
    what: &str,
    items: &'a [(Origin, T)],
    problems: &mut Vec<String>,
) -> Option<&'a (Origin, T)> {
    match items {
        [only] => Some(only),
        _ => {
            problems.push(format!(
                "deploy/ holds {} {what} objects, want exactly 1",
                items.len()
            ));
            None
        }
    }
}

fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn daemonset<'a>(
    m: &'a Manifests,
    name: &str,
    problems: &mut Vec<String>,
) -> Option<&'a (Origin, DaemonSet)> {
    let found: Vec<_> = m
        .daemonsets
        .iter()
        .filter(|(_, d)| name_of(&d.metadata) == name)
        .collect();
    match found[..] {
        [only] => Some(only),
        _ => {
            problems.push(format!(
                "deploy/ holds {} DaemonSets named {name}, want exactly 1",
                found.len()
            ));
            None
        }
    }
}

fn pod_spec(ds: &DaemonSet) -> Option<&PodSpec> {
    ds.spec.template.spec.as_ref()
}

// ───────────────────────────── the Dockerfile ─────────────────────────────

#[derive(Debug)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

/// Instructions by stage. Comments and parser directives are skipped, and a line ending in
/// `\` continues on the next (comment lines inside a continuation are skipped, as Docker does).
fn parse_dockerfile(text: &str) -> Result<Vec<Stage>, String> {
    let mut stages: Vec<Stage> = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut logical = String::new();
        let mut current = trimmed.to_string();
        loop {
            match current.strip_suffix('\\') {
                Some(head) => {
                    logical.push_str(head.trim_end());
                    logical.push(' ');
                    let Some((_, next)) = lines
                        .by_ref()
                        .find(|(_, l)| !l.trim_start().starts_with('#'))
                    else {
                        return Err(format!(
                            "Dockerfile line {}: continuation at end of file",
                            i + 1
                        ));
                    };
                    current = next.trim().to_string();
                }
                None => {
                    logical.push_str(&current);
                    break;
                }
            }
        }
        let (keyword, args) = logical
            .split_once(char::is_whitespace)
            .unwrap_or((&logical, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let (image, name) = match words[..] {
                [image] => (image, None),
                [image, as_, name] if as_.eq_ignore_ascii_case("as") => {
                    (image, Some(name.to_string()))
                }
                _ => {
                    return Err(format!(
                        "Dockerfile line {}: cannot read FROM {args}",
                        i + 1
                    ));
                }
            };
            stages.push(Stage {
                image: image.to_string(),
                name,
                instructions: Vec::new(),
            });
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            if keyword == "ARG" {
                continue;
            }
            return Err(format!(
                "Dockerfile line {}: {keyword} before any FROM",
                i + 1
            ));
        };
        stage.instructions.push(Instruction {
            line: i + 1,
            keyword,
            args,
        });
    }
    if stages.is_empty() {
        return Err("Dockerfile: no FROM".into());
    }
    Ok(stages)
}

/// Packages a RUN line installs with apt-get (or apt).
fn apt_installs(run: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for command in run.split(['&', ';', '|']) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some(pos) = words.iter().position(|w| *w == "install") else {
            continue;
        };
        if words[..pos].iter().any(|w| *w == "apt-get" || *w == "apt") {
            out.extend(
                words[pos + 1..]
                    .iter()
                    .filter(|w| !w.starts_with('-'))
                    .map(|w| w.to_string()),
            );
        }
    }
    out
}

fn exec_form(ins: &Instruction) -> Result<Vec<String>, String> {
    serde_json::from_str(&ins.args).map_err(|_| {
        format!(
            "Dockerfile line {}: {} must be in exec form ([\"...\"]) so the agent is PID 1 and gets SIGTERM, not `{}`",
            ins.line, ins.keyword, ins.args
        )
    })
}

fn last<'a>(stage: &'a Stage, keyword: &str) -> Option<&'a Instruction> {
    stage
        .instructions
        .iter()
        .rev()
        .find(|i| i.keyword == keyword)
}

/// The Debian release an image is built on, as far as its tag says.
fn debian_release(image: &str) -> Option<&'static str> {
    ["bullseye", "bookworm", "trixie", "forky"]
        .into_iter()
        .find(|r| image.contains(r))
}

/// What the image runs when a container gives no `command`/`args`.
#[derive(Clone, Debug)]
struct ImageDefaults {
    /// Where the binary is installed.
    binary: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn check_dockerfile(files: &Files, problems: &mut Vec<String>) -> Option<ImageDefaults> {
    let stages = match parse_dockerfile(&files["Dockerfile"]) {
        Ok(s) => s,
        Err(e) => {
            problems.push(e);
            return None;
        }
    };
    let runtime = stages.last()?;
    let runtime_name = format!("runtime stage (FROM {})", runtime.image);

    // nft: installed from the distribution, or copied in.
    let installs: BTreeSet<String> = runtime
        .instructions
        .iter()
        .filter(|i| i.keyword == "RUN")
        .flat_map(|i| apt_installs(&i.args))
        .collect();
    let copies_nft = runtime.instructions.iter().any(|i| {
        i.keyword == "COPY"
            && i.args
                .split_whitespace()
                .any(|w| w == "nft" || w.ends_with("/nft"))
    });
    if !installs.contains("nftables") && !copies_nft {
        problems.push(format!(
            "Dockerfile {runtime_name}: neither installs nftables nor copies an nft binary; the agent runs nft for every sync"
        ));
    }

    // Our binary, copied from a stage that builds it.
    let copy = runtime.instructions.iter().find(|i| {
        i.keyword == "COPY"
            && i.args.starts_with("--from=")
            && i.args
                .split_whitespace()
                .last()
                .is_some_and(|d| d.ends_with("/kube-nftpolicy"))
    });
    let Some(copy) = copy else {
        problems.push(format!(
            "Dockerfile {runtime_name}: no COPY --from=<build stage> of the kube-nftpolicy binary"
        ));
        return None;
    };
    let binary = copy
        .args
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    let from = copy.args["--from=".len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    match stages.iter().find(|s| s.name.as_deref() == Some(from)) {
        None => problems.push(format!(
            "Dockerfile line {}: COPY --from={from}: no such stage",
            copy.line
        )),
        Some(builder) => {
            let runs: Vec<&Instruction> = builder
                .instructions
                .iter()
                .filter(|i| i.keyword == "RUN")
                .collect();
            let builder_installs: BTreeSet<String> =
                runs.iter().flat_map(|i| apt_installs(&i.args)).collect();
            // rustables runs bindgen over <linux/netfilter/nf_tables.h> at build time.
            for (pkg, why) in [
                ("libclang-dev", "bindgen (rustables) needs libclang"),
                (
                    "linux-libc-dev",
                    "bindgen (rustables) reads the kernel UAPI headers",
                ),
            ] {
                if !builder_installs.contains(pkg) {
                    problems.push(format!(
                        "Dockerfile build stage {from}: does not install {pkg}: {why}"
                    ));
                }
            }
            if !runs.iter().any(|i| {
                i.args.contains("cargo build")
                    && i.args.contains("--release")
                    && i.args.contains("--locked")
            }) {
                problems.push(format!(
                    "Dockerfile build stage {from}: no `cargo build --release --locked`"
                ));
            }
            // The binary links glibc dynamically: build and run on the same Debian release.
            let (b, r) = (
                debian_release(&builder.image),
                debian_release(&runtime.image),
            );
            if b.is_none() || b != r {
                problems.push(format!(
                    "Dockerfile: build stage {} and runtime {} are not on the same Debian release; the binary needs the builder's glibc",
                    builder.image, runtime.image
                ));
            }
        }
    }

    // ENTRYPOINT is the binary, in exec form; with CMD the default is `kube-nftpolicy run`.
    let entrypoint = match last(runtime, "ENTRYPOINT").map(exec_form) {
        None => {
            problems.push(format!("Dockerfile {runtime_name}: no ENTRYPOINT"));
            return None;
        }
        Some(Err(e)) => {
            problems.push(e);
            return None;
        }
        Some(Ok(e)) => e,
    };
    let cmd = match last(runtime, "CMD").map(exec_form) {
        None => Vec::new(),
        Some(Err(e)) => {
            problems.push(e);
            return None;
        }
        Some(Ok(c)) => c,
    };
    if entrypoint.first() != Some(&binary) {
        problems.push(format!(
            "Dockerfile: ENTRYPOINT {entrypoint:?} does not start with {binary}, which is not where the binary was copied"
        ));
    }
    let default: Vec<&str> = entrypoint
        .iter()
        .chain(&cmd)
        .skip(1)
        .map(String::as_str)
        .collect();
    if default != ["run"] {
        problems.push(format!(
            "Dockerfile: the image runs `kube-nftpolicy {}` by default, want `kube-nftpolicy run`",
            default.join(" ")
        ));
    }
    Some(ImageDefaults {
        binary,
        entrypoint,
        cmd,
    })
}

// ───────────────────────────── containers and the CLI ─────────────────────────────

/// The container's environment as the kubelet would set it (fieldRefs stand in as markers).
fn container_env(c: &Container) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => match &from.field_ref {
                Some(f) => field_ref_value(&f.field_path),
                None => return Err(format!("env {}: only fieldRef is understood here", e.name)),
            },
            (None, None) => String::new(),
            (Some(_), Some(_)) => return Err(format!("env {}: both value and valueFrom", e.name)),
        };
        env.insert(e.name.clone(), value);
    }
    Ok(env)
}

/// The kubelet's `$(VAR)` expansion in command and args (`$$` is a literal `$`).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
        {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The process a container starts, as argv: Kubernetes' rules for `command`/`args` over the
/// image's ENTRYPOINT/CMD, then `$(VAR)` expansion, then clap's `env` fallback made explicit
/// (a flag with `env = "X"` that is not on the command line takes X from the environment).
fn container_argv(c: &Container, image: &ImageDefaults) -> Result<Vec<String>, String> {
    let env = container_env(c)?;
    let argv: Vec<String> = match (&c.command, &c.args) {
        // A command replaces ENTRYPOINT and drops CMD.
        (Some(cmd), args) => cmd.iter().chain(args.iter().flatten()).cloned().collect(),
        (None, Some(args)) => image.entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    };
    let mut argv: Vec<String> = argv.iter().map(|a| expand(a, &env)).collect();
    let bin_name = Path::new(&image.binary)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    match argv.first() {
        Some(a0) if *a0 == image.binary || a0 == bin_name => {}
        other => {
            return Err(format!(
                "runs {other:?}, not the agent binary {} (the image's ENTRYPOINT)",
                image.binary
            ));
        }
    }
    let cli = Cli::command();
    if let Some(sub) = argv.get(1).and_then(|s| cli.find_subcommand(s)) {
        let mut extra = Vec::new();
        for arg in sub.get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env().and_then(|v| v.to_str()), arg.get_long())
            else {
                continue;
            };
            let flag = format!("--{long}");
            let given = argv
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
            if let (false, Some(v)) = (given, env.get(var)) {
                extra.push(format!("{flag}={v}"));
            }
        }
        argv.extend(extra);
    }
    Ok(argv)
}

/// Parse a container's process with the agent's own CLI parser.
fn parse_container(
    origin: &Origin,
    c: &Container,
    image: &ImageDefaults,
) -> Result<(Vec<String>, Cli), String> {
    let what = format!("{origin}: container {}", c.name);
    let argv = container_argv(c, image).map_err(|e| format!("{what}: {e}"))?;
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        // clap's message up to its usage text, on one line.
        let msg = e.to_string();
        let text: Vec<&str> = msg
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Usage:"))
            .filter(|l| !l.is_empty())
            .collect();
        let text = text.join(" ");
        format!(
            "{what}: the agent's CLI rejects {argv:?}: {}",
            text.trim_start_matches("error: ")
        )
    })?;
    Ok((argv, cli))
}

fn agent_container(ds: &DaemonSet) -> Option<&Container> {
    match &pod_spec(ds)?.containers[..] {
        [only] => Some(only),
        _ => None,
    }
}

/// The agent's container and what it runs with; `None` (with problems) if that is unclear.
fn agent_run<'a>(
    m: &'a Manifests,
    image: &ImageDefaults,
    problems: &mut Vec<String>,
) -> Option<(
    &'a Origin,
    &'a DaemonSet,
    &'a Container,
    kube_nftpolicy::cli::RunArgs,
)> {
    let (origin, ds) = daemonset(m, AGENT, problems)?;
    let Some(c) = agent_container(ds) else {
        problems.push(format!(
            "{origin}: DaemonSet {AGENT} must have exactly one container"
        ));
        return None;
    };
    match parse_container(origin, c, image) {
        Err(e) => {
            problems.push(e);
            None
        }
        Ok((argv, cli)) => {
            match cli.command {
                Command::Run(run) => Some((origin, ds, c, run)),
                other => {
                    problems.push(format!("{origin}: container {} runs {argv:?} ({other:?}), not `kube-nftpolicy run`", c.name));
                    None
                }
            }
        }
    }
}

fn check_agent_args(m: &Manifests, image: &ImageDefaults) -> Vec<String> {
    let mut problems = Vec::new();
    let Some((origin, _, c, run)) = agent_run(m, image, &mut problems) else {
        return problems;
    };
    let want = field_ref_value("spec.nodeName");
    if run.node_name != want {
        problems.push(format!(
            "{origin}: container {}: --node-name must come from spec.nodeName (env NODE_NAME with fieldRef spec.nodeName), but it is {:?}",
            c.name, run.node_name
        ));
    }
    if run.manifests.is_some() || run.kubeconfig.is_some() {
        problems.push(format!(
            "{origin}: container {}: the agent must watch the cluster with in-cluster config (no --manifests, no --kubeconfig)",
            c.name
        ));
    }
    problems
}

// ───────────────────────────── ports, probes, scraping ─────────────────────────────

fn check_ports_and_paths(m: &Manifests, image: &ImageDefaults) -> Vec<String> {
    let mut problems = Vec::new();
    let Some((origin, ds, c, run)) = agent_run(m, image, &mut problems) else {
        return problems;
    };
    let port = run.metrics_addr.port();
    if !run.metrics_addr.ip().is_unspecified() {
        problems.push(format!(
            "{origin}: --metrics-addr {} is not on every address: the kubelet probes and Prometheus scrapes the node's address",
            run.metrics_addr
        ));
    }
    let ports = c.ports.as_deref().unwrap_or_default();
    let named = ports.iter().find(|p| p.container_port == i32::from(port));
    match named {
        None => problems.push(format!(
            "{origin}: container {} declares no container port {port} (the --metrics-addr port)",
            c.name
        )),
        Some(p) if p.name.is_none() => problems.push(format!(
            "{origin}: container port {port} has no name for the probes and the PodMonitor to use"
        )),
        Some(_) => {}
    }
    let port_name = named.and_then(|p| p.name.clone());
    let resolves = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n == i32::from(port),
        IntOrString::String(s) => Some(s) == port_name.as_ref(),
    };
    for (probe, name, path) in [
        (&c.liveness_probe, "livenessProbe", HEALTHZ_PATH),
        (&c.readiness_probe, "readinessProbe", READYZ_PATH),
    ] {
        match probe.as_ref().and_then(|p| p.http_get.as_ref()) {
            None => problems.push(format!(
                "{origin}: container {} has no {name} httpGet",
                c.name
            )),
            Some(get) => {
                if get.path.as_deref() != Some(path) {
                    problems.push(format!(
                        "{origin}: {name} path {} is not {path}, which src/admin.rs serves for it",
                        get.path.as_deref().unwrap_or("(none)")
                    ));
                }
                if !resolves(&get.port) {
                    problems.push(format!(
                        "{origin}: {name} port {:?} is not the metrics port {port}",
                        get.port
                    ));
                }
            }
        }
    }
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|md| md.annotations.clone())
        .unwrap_or_default();
    let port_text = port.to_string();
    for (key, want) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", port_text.as_str()),
        ("prometheus.io/path", METRICS_PATH),
    ] {
        let got = annotations.get(key).map(String::as_str);
        if got != Some(want) {
            problems.push(format!(
                "{origin}: pod annotation {key} is {got:?}, want {want:?}"
            ));
        }
    }

    // Every alert reads the PodMonitor's series (job="kube-nftpolicy"), says how bad it is,
    // and tells the person paged what happened.
    for (origin, rule) in &m.prometheus_rules {
        for (group, r) in rule
            .spec
            .groups
            .iter()
            .flat_map(|g| g.rules.iter().map(move |r| (g, r)))
        {
            if !r.expr.contains(&format!("job=\"{AGENT}\"")) {
                problems.push(format!(
                    "{origin}: group {}: alert {} does not select job=\"{AGENT}\"",
                    group.name, r.alert
                ));
            }
            if r.for_
                .as_deref()
                .is_some_and(|f| !f.ends_with(['s', 'm', 'h']))
            {
                problems.push(format!(
                    "{origin}: alert {} has `for: {:?}`, not a duration",
                    r.alert, r.for_
                ));
            }
            if !matches!(
                r.labels.get("severity").map(String::as_str),
                Some("warning" | "critical")
            ) {
                problems.push(format!(
                    "{origin}: alert {} has no severity warning or critical",
                    r.alert
                ));
            }
            for a in ["summary", "description"] {
                if r.annotations.get(a).is_none_or(String::is_empty) {
                    problems.push(format!("{origin}: alert {} has no {a} annotation", r.alert));
                }
            }
        }
    }

    // The PodMonitor scrapes the same pods, port and path, and keeps the per-pod labels.
    let Some((pm_origin, pm)) = one("PodMonitor", &m.pod_monitors, &mut problems) else {
        return problems;
    };
    let template_labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|md| md.labels.clone())
        .unwrap_or_default();
    let selects = pm.spec.selector.match_expressions.is_none()
        && pm.spec.selector.match_labels.as_ref().is_some_and(|want| {
            !want.is_empty() && want.iter().all(|(k, v)| template_labels.get(k) == Some(v))
        });
    if !selects {
        problems.push(format!("{pm_origin}: PodMonitor selector does not select the agent's pods (labels {template_labels:?})"));
    }
    // docs/metrics.md's alerts select the series by job="kube-nftpolicy".
    let job = pm
        .spec
        .job_label
        .as_ref()
        .and_then(|l| template_labels.get(l));
    if job.map(String::as_str) != Some(AGENT) {
        problems.push(format!(
            "{pm_origin}: PodMonitor jobLabel {:?} does not give the job name {AGENT} (pod labels {template_labels:?})",
            pm.spec.job_label
        ));
    }
    let ds_namespace = ds.metadata.namespace.clone().unwrap_or_default();
    let in_namespace = match &pm.spec.namespace_selector {
        None => pm.metadata.namespace.as_deref() == Some(ds_namespace.as_str()),
        Some(sel) => sel.any || sel.match_names.contains(&ds_namespace),
    };
    if !in_namespace {
        problems.push(format!(
            "{pm_origin}: PodMonitor does not look in namespace {ds_namespace}"
        ));
    }
    match &pm.spec.pod_metrics_endpoints[..] {
        [ep] => {
            if ep.port.is_none() || ep.port != port_name {
                problems.push(format!(
                    "{pm_origin}: PodMonitor endpoint port {:?} is not the container port named {port_name:?} ({port})",
                    ep.port
                ));
            }
            if ep.path.as_deref().unwrap_or(METRICS_PATH) != METRICS_PATH {
                problems.push(format!(
                    "{pm_origin}: PodMonitor path {:?} is not {METRICS_PATH}",
                    ep.path
                ));
            }
            if ep.scheme.as_deref().unwrap_or("http") != "http" {
                problems.push(format!(
                    "{pm_origin}: the agent serves plain HTTP, not {:?}",
                    ep.scheme
                ));
            }
            if ep.honor_labels != Some(true) {
                problems.push(format!(
                    "{pm_origin}: PodMonitor honorLabels must be true, or the per-pod namespace/pod labels become exported_namespace/exported_pod"
                ));
            }
            let node_label = ep.relabelings.iter().any(|r| {
                r.source_labels == ["__meta_kubernetes_pod_node_name"]
                    && r.target_label.as_deref() == Some("node")
                    && r.action.as_deref().unwrap_or("replace") == "replace"
                    && r.regex.is_none()
                    && r.replacement.is_none()
            });
            if !node_label {
                problems.push(format!(
                    "{pm_origin}: PodMonitor does not copy __meta_kubernetes_pod_node_name to a `node` label, which docs/metrics.md's queries use"
                ));
            }
            if ep.interval.is_none() {
                problems.push(format!("{pm_origin}: PodMonitor endpoint has no interval"));
            }
        }
        eps => problems.push(format!(
            "{pm_origin}: PodMonitor has {} endpoints, want 1",
            eps.len()
        )),
    }
    problems
}

// ───────────────────────────── security and scheduling ─────────────────────────────

/// What both our DaemonSets need: the node's network namespace, NET_ADMIN and nothing more,
/// every node, never evicted first.
fn check_node_pod(origin: &Origin, what: &str, spec: &PodSpec, c: &Container) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("{origin}: {what}");
    if spec.host_network != Some(true) {
        problems.push(format!(
            "{at}: hostNetwork must be true: the table lives in the node's network namespace"
        ));
    }
    if spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        problems.push(format!("{at}: hostPID/hostIPC are not needed"));
    }
    if spec.priority_class_name.as_deref() != Some("system-node-critical") {
        problems.push(format!(
            "{at}: priorityClassName is {:?}, want system-node-critical: enforcement is part of the node",
            spec.priority_class_name
        ));
    }
    let tolerates_all = spec.tolerations.iter().flatten().any(|t| {
        t.operator.as_deref() == Some("Exists")
            && t.key.as_deref().unwrap_or_default().is_empty()
            && t.effect.as_deref().unwrap_or_default().is_empty()
    });
    if !tolerates_all {
        problems.push(format!("{at}: no toleration `operator: Exists` without key or effect, so it does not run on every tainted node"));
    }
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        problems.push(format!(
            "{at}: container {} must not be privileged (NET_ADMIN is enough)",
            c.name
        ));
    }
    if sc.allow_privilege_escalation != Some(false) {
        problems.push(format!(
            "{at}: container {}: allowPrivilegeEscalation must be false",
            c.name
        ));
    }
    if sc.read_only_root_filesystem != Some(true) {
        problems.push(format!(
            "{at}: container {}: readOnlyRootFilesystem must be true",
            c.name
        ));
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        problems.push(format!(
            "{at}: container {}: capabilities must drop ALL",
            c.name
        ));
    }
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    if added != BTreeSet::from(["NET_ADMIN"]) {
        problems.push(format!(
            "{at}: container {}: capabilities add {added:?}, want exactly NET_ADMIN (nftables and NFLOG over netlink)",
            c.name
        ));
    }
    let resources = c.resources.clone().unwrap_or_default();
    for (kind, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        for r in ["cpu", "memory"] {
            if !list.as_ref().is_some_and(|l| l.contains_key(r)) {
                problems.push(format!(
                    "{at}: container {} has no {r} in resources.{kind}",
                    c.name
                ));
            }
        }
    }
    problems
}

fn check_security(m: &Manifests, image: &ImageDefaults) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some((origin, ds)) = daemonset(m, AGENT, &mut problems) {
        let (Some(spec), Some(c)) = (pod_spec(ds), agent_container(ds)) else {
            problems.push(format!(
                "{origin}: DaemonSet {AGENT} has no pod spec with one container"
            ));
            return problems;
        };
        problems.extend(check_node_pod(
            origin,
            &format!("DaemonSet {AGENT}"),
            spec,
            c,
        ));
        if spec.dns_policy.as_deref() != Some("ClusterFirstWithHostNet") {
            problems.push(format!(
                "{origin}: dnsPolicy should be ClusterFirstWithHostNet on the host network"
            ));
        }
        let strategy = ds.spec.update_strategy.clone().unwrap_or_default();
        if strategy.type_.as_deref() != Some("RollingUpdate") {
            problems.push(format!("{origin}: updateStrategy must be RollingUpdate"));
        }
        let rolling = strategy.rolling_update.unwrap_or_default();
        let zero = |v: &Option<IntOrString>| match v {
            None => true,
            Some(IntOrString::Int(n)) => *n == 0,
            Some(IntOrString::String(s)) => s == "0" || s == "0%",
        };
        if !zero(&rolling.max_surge) {
            problems.push(format!(
                "{origin}: maxSurge must be 0: with hostNetwork the metrics port is a host port, so a surge pod cannot be scheduled beside the old agent and the rollout would stop"
            ));
        }
        if rolling.max_unavailable.is_some() && zero(&rolling.max_unavailable) {
            problems.push(format!(
                "{origin}: maxUnavailable 0 with maxSurge 0 cannot make progress"
            ));
        }
        let template_labels = ds
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|md| md.labels.clone())
            .unwrap_or_default();
        let selector = ds.spec.selector.match_labels.clone().unwrap_or_default();
        if selector.is_empty()
            || !selector
                .iter()
                .all(|(k, v)| template_labels.get(k) == Some(v))
        {
            problems.push(format!(
                "{origin}: the selector does not match the pod template's labels"
            ));
        }
    }
    if let Some((origin, ds)) = daemonset(m, CLEANUP, &mut problems) {
        let Some(spec) = pod_spec(ds) else {
            problems.push(format!("{origin}: DaemonSet {CLEANUP} has no pod spec"));
            return problems;
        };
        match spec.init_containers.as_deref() {
            Some([c]) => {
                problems.extend(check_node_pod(
                    origin,
                    &format!("DaemonSet {CLEANUP}"),
                    spec,
                    c,
                ));
                match parse_container(origin, c, image) {
                    Err(e) => problems.push(e),
                    Ok((_, cli)) if matches!(cli.command, Command::Cleanup { .. }) => {}
                    Ok((argv, _)) => problems.push(format!(
                        "{origin}: init container {} runs {argv:?}, not `kube-nftpolicy cleanup`",
                        c.name
                    )),
                }
            }
            _ => problems.push(format!(
                "{origin}: DaemonSet {CLEANUP} must have one init container running cleanup"
            )),
        }
        if spec.automount_service_account_token != Some(false) {
            problems.push(format!("{origin}: cleanup does not talk to the API server: automountServiceAccountToken: false"));
        }
    }
    problems
}

// ───────────────────────────── RBAC and names ─────────────────────────────

/// (group, resource, verb) as a ClusterRole grants it.
type Grant = (String, String, String);

fn show(g: &Grant) -> String {
    let (group, resource, verb) = g;
    if group.is_empty() {
        format!("{verb} {resource}")
    } else {
        format!("{verb} {group}/{resource}")
    }
}

fn check_cluster_role(m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let Some((origin, role)) = one("ClusterRole", &m.cluster_roles, &mut problems) else {
        return problems;
    };
    let at = format!("{origin}: ClusterRole {}", name_of(&role.metadata));
    let mut granted: BTreeSet<Grant> = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        if rule.non_resource_urls.is_some() {
            problems.push(format!(
                "{at}: rules[{i}] grants nonResourceURLs; the agent uses none"
            ));
        }
        if rule.resource_names.is_some() {
            problems.push(format!(
                "{at}: rules[{i}] is limited to resourceNames; the watchers need every object"
            ));
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    if [group, resource, verb].iter().any(|s| s.contains('*')) {
                        problems.push(format!(
                            "{at}: rules[{i}] uses a wildcard ({group:?}, {resource:?}, {verb:?})"
                        ));
                    }
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<Grant> = api_access()
        .into_iter()
        .flat_map(|a| {
            a.verbs
                .into_iter()
                .map(move |v| (a.group.clone(), a.resource.clone(), v.to_string()))
        })
        .collect();
    for g in granted.difference(&needed) {
        problems.push(format!(
            "{at} grants {}, which the agent never uses",
            show(g)
        ));
    }
    for g in needed.difference(&granted) {
        problems.push(format!(
            "{at} does not grant {}, which the watchers need",
            show(g)
        ));
    }
    problems
}

fn check_names(m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let ns = one("Namespace", &m.namespaces, &mut problems);
    let namespace = ns.map(|(_, n)| name_of(&n.metadata).to_string());
    if let Some((origin, n)) = ns {
        // hostNetwork and NET_ADMIN are admitted only at the `privileged` level.
        let level = n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
        if level.map(String::as_str) != Some("privileged") {
            problems.push(format!(
                "{origin}: Namespace label pod-security.kubernetes.io/enforce is {level:?}; the agent needs `privileged` (host network, NET_ADMIN)"
            ));
        }
    }
    let Some(namespace) = namespace else {
        return problems;
    };
    let mut namespaced: Vec<(&Origin, String, Option<&str>)> = Vec::new();
    namespaced.extend(m.quotas.iter().map(|(o, q)| {
        (
            o,
            format!("ResourceQuota {}", name_of(&q.metadata)),
            q.metadata.namespace.as_deref(),
        )
    }));
    namespaced.extend(m.service_accounts.iter().map(|(o, s)| {
        (
            o,
            format!("ServiceAccount {}", name_of(&s.metadata)),
            s.metadata.namespace.as_deref(),
        )
    }));
    namespaced.extend(m.daemonsets.iter().map(|(o, d)| {
        (
            o,
            format!("DaemonSet {}", name_of(&d.metadata)),
            d.metadata.namespace.as_deref(),
        )
    }));
    namespaced.extend(m.pod_monitors.iter().map(|(o, p)| {
        (
            o,
            format!("PodMonitor {}", name_of(&p.metadata)),
            p.metadata.namespace.as_deref(),
        )
    }));
    namespaced.extend(m.prometheus_rules.iter().map(|(o, p)| {
        (
            o,
            format!("PrometheusRule {}", name_of(&p.metadata)),
            p.metadata.namespace.as_deref(),
        )
    }));
    for (origin, what, ns) in namespaced {
        if ns != Some(namespace.as_str()) {
            problems.push(format!(
                "{origin}: {what} is in namespace {}, not {namespace}",
                ns.unwrap_or("(none)")
            ));
        }
    }

    // The quota that admits system-node-critical pods outside kube-system covers ours.
    let covered = m.quotas.iter().any(|(_, q)| {
        q.spec
            .as_ref()
            .and_then(|s| s.scope_selector.as_ref())
            .is_some_and(|sel| {
                sel.match_expressions.iter().flatten().any(|e| {
                    e.scope_name == "PriorityClass"
                        && e.operator == "In"
                        && e.values
                            .iter()
                            .flatten()
                            .any(|v| v == "system-node-critical")
                })
            })
    });
    if !covered {
        problems.push(format!(
            "deploy/: no ResourceQuota in {namespace} for PriorityClass system-node-critical"
        ));
    }

    // The agent's service account is the one the ClusterRoleBinding binds to the ClusterRole.
    let (Some((b_origin, binding)), Some((_, role)), Some((_, sa))) = (
        one("ClusterRoleBinding", &m.bindings, &mut problems),
        one("ClusterRole", &m.cluster_roles, &mut problems),
        one("ServiceAccount", &m.service_accounts, &mut problems),
    ) else {
        return problems;
    };
    let r = &binding.role_ref;
    if r.kind != "ClusterRole"
        || r.name != name_of(&role.metadata)
        || r.api_group.as_deref() != Some("rbac.authorization.k8s.io")
    {
        problems.push(format!(
            "{b_origin}: roleRef {}/{} is not the ClusterRole {}",
            r.kind,
            r.name,
            name_of(&role.metadata)
        ));
    }
    let subjects: Vec<(String, String, Option<String>)> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.clone(), s.name.clone(), s.namespace.clone()))
        .collect();
    let want = vec![(
        "ServiceAccount".to_string(),
        name_of(&sa.metadata).to_string(),
        Some(namespace.clone()),
    )];
    if subjects != want {
        problems.push(format!(
            "{b_origin}: subjects {subjects:?}, want exactly {want:?}"
        ));
    }
    if let Some((origin, ds)) = m
        .daemonsets
        .iter()
        .find(|(_, d)| name_of(&d.metadata) == AGENT)
    {
        let used = pod_spec(ds).and_then(|s| s.service_account_name.as_deref());
        if used != Some(name_of(&sa.metadata)) {
            problems.push(format!(
                "{origin}: serviceAccountName {used:?} is not the bound ServiceAccount {}",
                name_of(&sa.metadata)
            ));
        }
    }
    problems
}

// ───────────────────────────── kustomizations ─────────────────────────────

fn check_kustomizations(files: &Files, m: &Manifests) -> Vec<String> {
    let mut problems = Vec::new();
    let mut images: Vec<(&Origin, &Vec<KustomizeImage>)> = Vec::new();
    for dir in ["deploy", "deploy/uninstall"] {
        let path = format!("{dir}/kustomization.yaml");
        let Some((origin, k)) = m.kustomizations.iter().find(|(o, _)| o.file == path) else {
            problems.push(format!("{path}: missing"));
            continue;
        };
        let listed: BTreeSet<String> = k.resources.iter().map(|r| format!("{dir}/{r}")).collect();
        for r in &listed {
            if !files.contains_key(r) {
                problems.push(format!("{origin}: resource {r} does not exist"));
            }
        }
        let here: BTreeSet<&String> = files
            .keys()
            .filter(|f| is_yaml(f) && Path::new(f).parent() == Some(Path::new(dir)) && **f != path)
            .collect();
        for f in here {
            if !listed.contains(f) && !OPTIONAL.contains(&f.as_str()) {
                problems.push(format!("{origin}: {f} is not listed in resources, so `kubectl apply -k {dir}/` would leave it out"));
            }
        }
        // Every image the listed resources use can be set from here.
        for (o, ds) in m
            .daemonsets
            .iter()
            .filter(|(o, _)| listed.contains(&o.file))
        {
            let spec = pod_spec(ds);
            for c in spec.iter().flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            }) {
                let image = c.image.as_deref().unwrap_or_default();
                let name = image.split(':').next().unwrap_or_default();
                if !k.images.iter().any(|i| i.name == name) {
                    problems.push(format!(
                        "{o}: image {image} of container {} has no entry in {path} images",
                        c.name
                    ));
                }
            }
        }
        images.push((origin, &k.images));
    }
    if let [(a_origin, a), (b_origin, b)] = images[..] {
        if a != b {
            problems.push(format!("{b_origin}: images {b:?} differ from {a_origin}'s {a:?}; cleanup must run the agent's image"));
        }
    }
    problems
}

// ───────────────────────────── everything ─────────────────────────────

/// Every problem with a tree of files, from every check.
fn check_all(files: &Files) -> Vec<String> {
    let mut problems = Vec::new();
    let image = check_dockerfile(files, &mut problems);
    let m = parse_manifests(files, &mut problems);
    problems.extend(check_cluster_role(&m));
    problems.extend(check_names(&m));
    problems.extend(check_kustomizations(files, &m));
    match &image {
        Some(image) => {
            problems.extend(check_agent_args(&m, image));
            problems.extend(check_ports_and_paths(&m, image));
            problems.extend(check_security(&m, image));
        }
        None => {
            problems.push("Dockerfile: no image defaults, so no container could be checked".into())
        }
    }
    // Checks that share a step (parsing the agent's arguments) report its failure once.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

struct Loaded {
    files: Files,
    m: Manifests,
    image: ImageDefaults,
}

fn load_real() -> Loaded {
    let files = real_files();
    let mut problems = Vec::new();
    let image = check_dockerfile(&files, &mut problems);
    let m = parse_manifests(&files, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Loaded {
        files,
        m,
        image: image.expect("image defaults"),
    }
}

#[track_caller]
fn assert_none(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
}

// ───────────────────────────── tests ─────────────────────────────

#[test]
fn every_manifest_parses_into_its_type() {
    let l = load_real();
    let counts = [
        ("Namespace", l.m.namespaces.len(), 1),
        ("ResourceQuota", l.m.quotas.len(), 1),
        ("ServiceAccount", l.m.service_accounts.len(), 1),
        ("ClusterRole", l.m.cluster_roles.len(), 1),
        ("ClusterRoleBinding", l.m.bindings.len(), 1),
        ("DaemonSet", l.m.daemonsets.len(), 2),
        ("PodMonitor", l.m.pod_monitors.len(), 1),
        ("PrometheusRule", l.m.prometheus_rules.len(), 1),
        ("Kustomization", l.m.kustomizations.len(), 2),
    ];
    for (kind, got, want) in counts {
        assert_eq!(got, want, "{kind} objects in deploy/");
    }
    let yaml = l.files.keys().filter(|f| is_yaml(f)).count();
    assert_eq!(
        yaml,
        8,
        "YAML files in deploy/: {:?}",
        l.files.keys().collect::<Vec<_>>()
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_watchers_use() {
    let l = load_real();
    assert_eq!(
        api_access().len(),
        4,
        "pods, namespaces, networkpolicies, nodes"
    );
    assert_none("ClusterRole", check_cluster_role(&l.m));
}

#[test]
fn agent_args_parse_with_the_agent_cli() {
    let l = load_real();
    let (origin, ds) =
        l.m.daemonsets
            .iter()
            .find(|(_, d)| name_of(&d.metadata) == AGENT)
            .expect("agent DaemonSet");
    let c = agent_container(ds).expect("one container");
    let (argv, cli) = parse_container(origin, c, &l.image).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("the agent runs {argv:?}");
    let Command::Run(run) = cli.command else {
        panic!("{argv:?} is not `run`");
    };
    assert_eq!(run.node_name, field_ref_value("spec.nodeName"));
    assert_none("agent arguments", check_agent_args(&l.m, &l.image));
}

#[test]
fn ports_probes_and_scraping_match_the_code() {
    let l = load_real();
    assert_none("ports and paths", check_ports_and_paths(&l.m, &l.image));
}

#[test]
fn daemonsets_are_least_privilege_and_run_on_every_node() {
    let l = load_real();
    assert_none("security and scheduling", check_security(&l.m, &l.image));
}

#[test]
fn names_namespaces_and_bindings_agree() {
    let l = load_real();
    assert_none("names", check_names(&l.m));
}

#[test]
fn kustomizations_list_every_manifest() {
    let l = load_real();
    assert_none("kustomizations", check_kustomizations(&l.files, &l.m));
}

#[test]
fn dockerfile_runtime_has_nft_and_runs_the_agent() {
    let files = real_files();
    let mut problems = Vec::new();
    let image = check_dockerfile(&files, &mut problems).expect("image defaults");
    assert_none("Dockerfile", problems);
    assert_eq!(image.binary, "/usr/local/bin/kube-nftpolicy");
    assert_eq!(image.entrypoint, [image.binary.as_str()]);
    assert_eq!(image.cmd, ["run"]);
}

#[test]
fn the_real_tree_passes_every_check() {
    assert_none("deploy/ and the Dockerfile", check_all(&real_files()));
}

/// A deliberately broken copy of one file: replace the first `from` with `to`.
struct Broken {
    name: &'static str,
    file: &'static str,
    from: &'static str,
    to: &'static str,
    /// A problem must mention this.
    expect: &'static str,
}

#[rustfmt::skip]
const BROKEN: &[Broken] = &[
    // Parsing.
    Broken { name: "misspelt field", file: "deploy/daemonset.yaml", from: "readOnlyRootFilesystem: true", to: "readOnlyRootFileSystem: true", expect: "deploy/daemonset.yaml document 1: spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem: not a field" },
    Broken { name: "value of the wrong type", file: "deploy/daemonset.yaml", from: "containerPort: 9753", to: "containerPort: metrics", expect: "deploy/daemonset.yaml document 1: spec.template.spec.containers[0].ports[0].containerPort" },
    Broken { name: "unknown kind", file: "deploy/rbac.yaml", from: "kind: ServiceAccount", to: "kind: ServiceAcount", expect: "kind \"ServiceAcount\"" },
    Broken { name: "misspelt PodMonitor field", file: "deploy/podmonitor.yaml", from: "honorLabels: true", to: "honourLabels: true", expect: "unknown field `honourLabels`" },
    // RBAC.
    Broken { name: "ClusterRole with an extra verb", file: "deploy/rbac.yaml", from: "verbs: [\"list\", \"watch\"]", to: "verbs: [\"get\", \"list\", \"watch\"]", expect: "grants get namespaces, which the agent never uses" },
    Broken { name: "ClusterRole with an extra resource", file: "deploy/rbac.yaml", from: "resources: [\"namespaces\", \"nodes\", \"pods\"]", to: "resources: [\"namespaces\", \"nodes\", \"pods\", \"services\"]", expect: "grants list services" },
    Broken { name: "ClusterRole missing a resource", file: "deploy/rbac.yaml", from: "resources: [\"namespaces\", \"nodes\", \"pods\"]", to: "resources: [\"namespaces\", \"pods\"]", expect: "does not grant list nodes" },
    Broken { name: "ClusterRole missing watch", file: "deploy/rbac.yaml", from: "verbs: [\"list\", \"watch\"]\n---", to: "verbs: [\"list\"]\n---", expect: "does not grant watch networking.k8s.io/networkpolicies" },
    Broken { name: "ClusterRole wildcard", file: "deploy/rbac.yaml", from: "verbs: [\"list\", \"watch\"]", to: "verbs: [\"*\"]", expect: "wildcard" },
    Broken { name: "binding to another namespace's account", file: "deploy/rbac.yaml", from: "    name: kube-nftpolicy\n    namespace: kube-nftpolicy", to: "    name: kube-nftpolicy\n    namespace: kube-system", expect: "subjects" },
    Broken { name: "account in another namespace", file: "deploy/rbac.yaml", from: "  namespace: kube-nftpolicy\n  labels", to: "  namespace: kube-system\n  labels", expect: "ServiceAccount kube-nftpolicy is in namespace kube-system" },
    Broken { name: "namespace below privileged", file: "deploy/namespace.yaml", from: "enforce: privileged", to: "enforce: baseline", expect: "pod-security.kubernetes.io/enforce" },
    Broken { name: "quota for another priority class", file: "deploy/namespace.yaml", from: "values: [\"system-node-critical\"]", to: "values: [\"system-cluster-critical\"]", expect: "no ResourceQuota" },
    // The agent's arguments.
    Broken { name: "unknown flag", file: "deploy/daemonset.yaml", from: "- --metrics-addr=0.0.0.0:9753", to: "- --metrics-address=0.0.0.0:9753", expect: "unexpected argument '--metrics-address'" },
    Broken { name: "flag value the agent cannot parse", file: "deploy/daemonset.yaml", from: "- --metrics-addr=0.0.0.0:9753", to: "- --metrics-addr=9753", expect: "invalid value '9753'" },
    Broken { name: "another subcommand", file: "deploy/daemonset.yaml", from: "            - run\n", to: "            - render\n", expect: "the agent's CLI rejects" },
    Broken { name: "command replaces the agent", file: "deploy/daemonset.yaml", from: "          args:\n", to: "          command: [\"/bin/sh\", \"-c\"]\n          args:\n", expect: "not the agent binary" },
    Broken { name: "no NODE_NAME", file: "deploy/daemonset.yaml", from: "- name: NODE_NAME", to: "- name: NODE", expect: "--node-name" },
    Broken { name: "NODE_NAME from the pod's name", file: "deploy/daemonset.yaml", from: "fieldPath: spec.nodeName", to: "fieldPath: metadata.name", expect: "--node-name must come from spec.nodeName" },
    Broken { name: "node name fixed in args", file: "deploy/daemonset.yaml", from: "            - run\n", to: "            - run\n            - --node-name=node-1\n", expect: "--node-name must come from spec.nodeName" },
    Broken { name: "manifests instead of the cluster", file: "deploy/daemonset.yaml", from: "            - run\n", to: "            - run\n            - --manifests=/etc/manifests\n", expect: "in-cluster config" },
    // Ports, probes, scraping.
    Broken { name: "metrics on loopback only", file: "deploy/daemonset.yaml", from: "--metrics-addr=0.0.0.0:9753", to: "--metrics-addr=127.0.0.1:9753", expect: "not on every address" },
    Broken { name: "container port differs", file: "deploy/daemonset.yaml", from: "containerPort: 9753", to: "containerPort: 9754", expect: "no container port 9753" },
    Broken { name: "probe on a port number that is not the metrics port", file: "deploy/daemonset.yaml", from: "path: /readyz\n              port: metrics", to: "path: /readyz\n              port: 8080", expect: "readinessProbe port Int(8080)" },
    Broken { name: "liveness on a path not served", file: "deploy/daemonset.yaml", from: "path: /healthz", to: "path: /health", expect: "livenessProbe path /health is not /healthz" },
    Broken { name: "readiness on the liveness path", file: "deploy/daemonset.yaml", from: "path: /readyz", to: "path: /healthz", expect: "readinessProbe path /healthz is not /readyz" },
    Broken { name: "annotation port differs", file: "deploy/daemonset.yaml", from: "prometheus.io/port: \"9753\"", to: "prometheus.io/port: \"9090\"", expect: "prometheus.io/port" },
    Broken { name: "annotation path differs", file: "deploy/daemonset.yaml", from: "prometheus.io/path: /metrics", to: "prometheus.io/path: /stats", expect: "prometheus.io/path" },
    Broken { name: "PodMonitor on another port", file: "deploy/podmonitor.yaml", from: "- port: metrics", to: "- port: http", expect: "PodMonitor endpoint port" },
    Broken { name: "PodMonitor selects other pods", file: "deploy/podmonitor.yaml", from: "app.kubernetes.io/component: agent", to: "app.kubernetes.io/component: cleanup", expect: "does not select the agent's pods" },
    Broken { name: "PodMonitor without the node label", file: "deploy/podmonitor.yaml", from: "targetLabel: node", to: "targetLabel: host", expect: "to a `node` label" },
    Broken { name: "PodMonitor job from another label", file: "deploy/podmonitor.yaml", from: "jobLabel: app.kubernetes.io/name", to: "jobLabel: app.kubernetes.io/component", expect: "does not give the job name kube-nftpolicy" },
    Broken { name: "PodMonitor renames the pod labels", file: "deploy/podmonitor.yaml", from: "honorLabels: true", to: "honorLabels: false", expect: "honorLabels must be true" },
    // Security and scheduling.
    Broken { name: "privileged", file: "deploy/daemonset.yaml", from: "privileged: false", to: "privileged: true", expect: "DaemonSet kube-nftpolicy: container agent must not be privileged" },
    Broken { name: "an extra capability", file: "deploy/daemonset.yaml", from: "add: [\"NET_ADMIN\"]", to: "add: [\"NET_ADMIN\", \"SYS_ADMIN\"]", expect: "SYS_ADMIN" },
    Broken { name: "NET_RAW kept", file: "deploy/daemonset.yaml", from: "drop: [\"ALL\"]", to: "drop: [\"SYS_ADMIN\"]", expect: "capabilities must drop ALL" },
    Broken { name: "writable root filesystem", file: "deploy/daemonset.yaml", from: "readOnlyRootFilesystem: true", to: "readOnlyRootFilesystem: false", expect: "readOnlyRootFilesystem must be true" },
    Broken { name: "privilege escalation", file: "deploy/daemonset.yaml", from: "allowPrivilegeEscalation: false", to: "allowPrivilegeEscalation: true", expect: "allowPrivilegeEscalation" },
    Broken { name: "pod network", file: "deploy/daemonset.yaml", from: "hostNetwork: true", to: "hostNetwork: false", expect: "hostNetwork must be true" },
    Broken { name: "ordinary priority", file: "deploy/daemonset.yaml", from: "priorityClassName: system-node-critical", to: "priorityClassName: system-cluster-critical", expect: "want system-node-critical" },
    Broken { name: "tolerates one taint only", file: "deploy/daemonset.yaml", from: "        - operator: Exists", to: "        - key: node-role.kubernetes.io/control-plane\n          operator: Exists", expect: "does not run on every tainted node" },
    Broken { name: "no limits", file: "deploy/daemonset.yaml", from: "            limits:\n              cpu: \"1\"\n", to: "            limits:\n", expect: "has no cpu in resources.limits" },
    Broken { name: "surge", file: "deploy/daemonset.yaml", from: "maxSurge: 0", to: "maxSurge: 1", expect: "maxSurge must be 0" },
    Broken { name: "cleanup that runs the agent", file: "deploy/uninstall/cleanup.yaml", from: "args: [\"cleanup\"]", to: "args: [\"run\", \"--node-name=x\"]", expect: "not `kube-nftpolicy cleanup`" },
    Broken { name: "cleanup with an extra capability", file: "deploy/uninstall/cleanup.yaml", from: "add: [\"NET_ADMIN\"]", to: "add: [\"NET_ADMIN\", \"NET_RAW\"]", expect: "DaemonSet kube-nftpolicy-cleanup: container cleanup: capabilities add" },
    // Kustomizations.
    Broken { name: "kustomization leaves a manifest out", file: "deploy/kustomization.yaml", from: "  - rbac.yaml\n", to: "", expect: "deploy/rbac.yaml is not listed in resources" },
    Broken { name: "kustomization names a missing file", file: "deploy/kustomization.yaml", from: "  - rbac.yaml\n", to: "  - rbac.yaml\n  - service.yaml\n", expect: "resource deploy/service.yaml does not exist" },
    Broken { name: "image not settable", file: "deploy/kustomization.yaml", from: "  - name: kube-nftpolicy\n", to: "  - name: kube-nftpolicy-agent\n", expect: "has no entry in deploy/kustomization.yaml images" },
    Broken { name: "cleanup image differs", file: "deploy/uninstall/kustomization.yaml", from: "newTag: 0.1.0", to: "newTag: 0.2.0", expect: "cleanup must run the agent's image" },
    // The Dockerfile.
    Broken { name: "runtime without nft", file: "Dockerfile", from: "--no-install-recommends nftables netbase", to: "--no-install-recommends netbase", expect: "neither installs nftables nor copies an nft binary" },
    Broken { name: "shell-form ENTRYPOINT", file: "Dockerfile", from: "ENTRYPOINT [\"/usr/local/bin/kube-nftpolicy\"]", to: "ENTRYPOINT /usr/local/bin/kube-nftpolicy", expect: "ENTRYPOINT must be in exec form" },
    Broken { name: "ENTRYPOINT elsewhere than the binary", file: "Dockerfile", from: "ENTRYPOINT [\"/usr/local/bin/kube-nftpolicy\"]", to: "ENTRYPOINT [\"/usr/bin/kube-nftpolicy\"]", expect: "not where the binary was copied" },
    Broken { name: "default command is not run", file: "Dockerfile", from: "CMD [\"run\"]", to: "CMD [\"render\"]", expect: "runs `kube-nftpolicy render` by default" },
    Broken { name: "builder without libclang", file: "Dockerfile", from: "libclang-dev linux-libc-dev", to: "linux-libc-dev", expect: "does not install libclang-dev" },
    Broken { name: "builder without --locked", file: "Dockerfile", from: "cargo build --release --locked", to: "cargo build --release", expect: "no `cargo build --release --locked`" },
    Broken { name: "runtime on another Debian release", file: "Dockerfile", from: "FROM debian:bookworm-slim", to: "FROM debian:trixie-slim", expect: "not on the same Debian release" },
];

#[test]
fn broken_copies_are_rejected() {
    let real = real_files();
    let mut failures = Vec::new();
    for case in BROKEN {
        let mut files = real.clone();
        let text = files
            .get_mut(case.file)
            .unwrap_or_else(|| panic!("case {}: no file {}", case.name, case.file));
        assert!(
            text.contains(case.from),
            "case {}: {} does not contain {:?}, so the case breaks nothing",
            case.name,
            case.file,
            case.from
        );
        *text = text.replacen(case.from, case.to, 1);
        let problems = check_all(&files);
        if let Some(p) = problems.iter().find(|p| p.contains(case.expect)) {
            eprintln!("case {:?}: {p}", case.name);
        } else {
            failures.push(format!(
                "case {:?}: no problem mentions {:?}; got:\n  {}",
                case.name,
                case.expect,
                problems.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kubelet_expansion_and_env_fallback() {
    let env: BTreeMap<String, String> = [("NODE_NAME".to_string(), "n1".to_string())].into();
    let cases = [
        ("plain", "run", "run"),
        ("reference", "--node-name=$(NODE_NAME)", "--node-name=n1"),
        ("escaped", "$$(NODE_NAME)", "$(NODE_NAME)"),
        ("unknown stays", "$(OTHER)", "$(OTHER)"),
        ("lone dollar", "a$b", "a$b"),
    ];
    for (name, input, want) in cases {
        assert_eq!(expand(input, &env), want, "case {name}");
    }
    let image = ImageDefaults {
        binary: "/usr/local/bin/kube-nftpolicy".into(),
        entrypoint: vec!["/usr/local/bin/kube-nftpolicy".into()],
        cmd: vec!["run".into()],
    };
    let container = |command: Option<Vec<&str>>, args: Option<Vec<&str>>| Container {
        name: "c".into(),
        command: command.map(|v| v.into_iter().map(String::from).collect()),
        args: args.map(|v| v.into_iter().map(String::from).collect()),
        env: Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "NODE_NAME".into(),
            value: Some("n1".into()),
            value_from: None,
        }]),
        ..Container::default()
    };
    // (name, container, the argv it starts or part of the error)
    type Case = (
        &'static str,
        Container,
        Result<Vec<&'static str>, &'static str>,
    );
    let cases: [Case; 5] = [
        (
            "image defaults, env fills --node-name",
            container(None, None),
            Ok(vec![
                "/usr/local/bin/kube-nftpolicy",
                "run",
                "--node-name=n1",
            ]),
        ),
        (
            "args replace CMD",
            container(None, Some(vec!["cleanup"])),
            Ok(vec!["/usr/local/bin/kube-nftpolicy", "cleanup"]),
        ),
        (
            "flag given: env not used",
            container(None, Some(vec!["run", "--node-name", "x"])),
            Ok(vec![
                "/usr/local/bin/kube-nftpolicy",
                "run",
                "--node-name",
                "x",
            ]),
        ),
        (
            "command by name on PATH drops CMD",
            container(Some(vec!["kube-nftpolicy"]), None),
            Ok(vec!["kube-nftpolicy"]),
        ),
        (
            "command that is not the agent",
            container(Some(vec!["sh"]), None),
            Err("not the agent binary"),
        ),
    ];
    for (name, c, want) in cases {
        match (container_argv(&c, &image), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "case {name}"),
            (Err(e), Err(want)) => assert!(e.contains(want), "case {name}: {e}"),
            (got, want) => panic!("case {name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn dockerfile_parser_reads_continuations_and_stages() {
    let text = "# syntax=docker/dockerfile:1\nARG X=1\nFROM rust:1-bookworm AS builder\nRUN apt-get update \\\n    # a comment inside\n    && apt-get install -y --no-install-recommends a b \\\n    && rm -rf x\nFROM debian:bookworm-slim\nENTRYPOINT [\"/bin/x\"]\n";
    let stages = parse_dockerfile(text).expect("parses");
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("builder"));
    assert_eq!(stages[0].instructions.len(), 1);
    assert_eq!(
        apt_installs(&stages[0].instructions[0].args),
        BTreeSet::from(["a".to_string(), "b".to_string()])
    );
    assert_eq!(stages[1].instructions[0].keyword, "ENTRYPOINT");
    let bad = [
        ("instruction before FROM", "RUN x\n", "before any FROM"),
        ("no FROM", "# nothing\n", "no FROM"),
        (
            "dangling continuation",
            "FROM a\nRUN x \\\n",
            "continuation at end of file",
        ),
    ];
    for (name, text, want) in bad {
        let e = parse_dockerfile(text).expect_err(name);
        assert!(e.contains(want), "case {name}: {e}");
    }
}
