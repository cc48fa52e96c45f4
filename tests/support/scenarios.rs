#![allow(dead_code)]
//! The upstream-style NetworkPolicy scenarios in `tests/e2e/scenarios/` (format: the README
//! there): parsing, the x/y/z × a/b/c model state a scenario changes step by step, the
//! manifests of that state, and the 9×9 truth tables. Pure, so the kernel tests
//! (`enforcement`) and the pure ones (`matrix`) read the same expectations the same way.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use kube_nftpolicy::model::Family;

use crate::manifest_yaml::{self, namespace_yaml};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pub delete: Vec<String>,
    #[serde(default)]
    pub apply: Option<String>,
    pub probes: Vec<MatrixProbe>,
}

#[derive(Deserialize)]
pub struct MatrixProbe {
    pub port: u16,
    pub protocol: String,
    pub matrix: String,
}

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Every model pod serves these ports, TCP and UDP, with named ports `serve-<port>-<proto>`.
pub const PORTS: [u16; 2] = [80, 81];

/// A model pod as placed by a test: where it runs and its addresses.
pub struct ModelPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

/// Labels and policies of the model as a scenario changes them.
pub struct ModelState {
    pub ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: BTreeMap<String, serde_json::Value>,
}

impl Default for ModelState {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelState {
    /// The base state: `ns: <name>` and `pod: <name>` labels, no policy.
    pub fn new() -> Self {
        let mut ns_labels = BTreeMap::new();
        let mut pod_labels = BTreeMap::new();
        for ns in NAMESPACES {
            ns_labels.insert(
                ns.to_string(),
                BTreeMap::from([("ns".to_string(), ns.to_string())]),
            );
            for pod in PODS {
                pod_labels.insert(
                    format!("{ns}/{pod}"),
                    BTreeMap::from([("pod".to_string(), pod.to_string())]),
                );
            }
        }
        ModelState {
            ns_labels,
            pod_labels,
            policies: BTreeMap::new(),
        }
    }

    /// Apply a step's changes (labels, deletions, policies), in the README's order. Address
    /// templates are filled in with `pod_ip` for `family`.
    pub fn apply_step(
        &mut self,
        file: &str,
        step: &Step,
        pod_ip: &dyn Fn(&str, &str) -> IpAddr,
        family: Family,
    ) {
        for (ns, labels) in &step.namespace_labels {
            self.ns_labels.insert(ns.clone(), labels.clone());
        }
        for (pod, labels) in &step.pod_labels {
            self.pod_labels.insert(pod.clone(), labels.clone());
        }
        for key in &step.delete {
            assert!(
                self.policies.remove(key).is_some(),
                "{file}: delete of unknown policy {key}"
            );
        }
        if let Some(apply) = &step.apply {
            let text = substitute(apply, pod_ip, family);
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let v: serde_json::Value = Deserialize::deserialize(doc).expect("policy yaml");
                if v.is_null() {
                    continue;
                }
                let key = format!(
                    "{}/{}",
                    v["metadata"]["namespace"].as_str().expect("namespace"),
                    v["metadata"]["name"].as_str().expect("name")
                );
                self.policies.insert(key, v);
            }
        }
    }

    /// The whole state as manifests: Namespaces, the pods as placed, the policies.
    pub fn manifests(&self, pods: &[ModelPod]) -> String {
        let mut out = String::new();
        for (ns, labels) in &self.ns_labels {
            out.push_str(&namespace_yaml(ns, labels));
        }
        for p in pods {
            let labels = &self.pod_labels[&format!("{}/{}", p.namespace, p.name)];
            out.push_str(&pod_yaml(p, labels));
        }
        for v in self.policies.values() {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(v).expect("yaml"));
        }
        out
    }
}

/// A model pod: serves TCP and UDP 80 and 81, named `serve-<port>-<proto>`.
fn pod_yaml(p: &ModelPod, labels: &BTreeMap<String, String>) -> String {
    let ports: Vec<(u16, &str)> = ["TCP", "UDP"]
        .into_iter()
        .flat_map(|proto| PORTS.iter().map(move |port| (*port, proto)))
        .collect();
    manifest_yaml::pod_yaml(&p.namespace, &p.name, &p.node, labels, &ports, &p.ips)
}

/// `${cidr:x/b}` and `${net:x/b:P4:P6}` → addresses of `family`.
pub fn substitute(text: &str, pod_ip: &dyn Fn(&str, &str) -> IpAddr, family: Family) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unterminated template") + start;
        let inner = &rest[start + 2..end];
        let parts: Vec<&str> = inner.split(':').collect();
        let (ns, pod) = parts[1].split_once('/').expect("ns/pod");
        let ip = pod_ip(ns, pod);
        let value = match parts[0] {
            "cidr" => format!("{ip}/{}", if family == Family::V4 { 32 } else { 128 }),
            "net" => {
                let prefix: u8 = parts[if family == Family::V4 { 2 } else { 3 }]
                    .parse()
                    .expect("prefix");
                let net = match ip {
                    IpAddr::V4(a) => {
                        let mask = if prefix == 0 {
                            0
                        } else {
                            u32::MAX << (32 - prefix)
                        };
                        IpAddr::V4((u32::from(a) & mask).into())
                    }
                    IpAddr::V6(a) => {
                        let mask = if prefix == 0 {
                            0
                        } else {
                            u128::MAX << (128 - prefix)
                        };
                        IpAddr::V6((u128::from(a) & mask).into())
                    }
                };
                format!("{net}/{prefix}")
            }
            other => panic!("unknown template {other}"),
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A truth table as (from, to, allowed) cells, row by row.
pub fn parse_matrix(text: &str) -> Vec<(String, String, bool)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .expect("header")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut cells = Vec::new();
    for line in lines {
        let mut tokens = line.split_whitespace();
        let from = tokens.next().expect("row label").to_string();
        for (to, cell) in header.iter().zip(tokens) {
            let allowed = match cell {
                "." => true,
                "X" => false,
                other => panic!("bad matrix cell {other:?}"),
            };
            cells.push((from.clone(), to.clone(), allowed));
        }
    }
    assert_eq!(cells.len(), 81, "a matrix has 81 cells");
    cells
}

/// Every scenario, by file name, in file order.
pub fn scenarios() -> Vec<(String, Scenario)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenarios dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read scenario");
            let s: Scenario =
                serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (
                f.file_name().expect("name").to_string_lossy().to_string(),
                s,
            )
        })
        .collect()
}
