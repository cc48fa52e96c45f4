#![allow(dead_code)]
//! Kubernetes manifests as YAML text, for tests that feed the agent what `kubectl get -o
//! yaml` would: the kernel harness (`kernel.rs`) and the e2e scenarios (`scenarios.rs`)
//! both write their pods and namespaces with these.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Labels as a YAML flow map.
pub fn labels_yaml(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: {}",
                serde_json::to_string(k).expect("json"),
                serde_json::to_string(v).expect("json")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(", "))
}

/// A Namespace manifest.
pub fn namespace_yaml(name: &str, labels: &BTreeMap<String, String>) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {}}}\n",
        labels_yaml(labels)
    )
}

/// A running Pod manifest on `node` with these addresses; each `(port, protocol)` is a
/// container port named `serve-<port>-<protocol in lower case>`.
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    ports: &[(u16, &str)],
    ips: &[IpAddr],
) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(port, proto)| {
            format!(
                "{{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}",
                proto.to_lowercase()
            )
        })
        .collect();
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: agnhost, ports: [{}]}}]}}\nstatus: {{phase: Running, podIP: \"{}\", podIPs: [{}]}}\n",
        labels_yaml(labels),
        ports.join(", "),
        ips[0],
        pod_ips.join(", ")
    )
}
