//! The kernel enforces what the policies say: real TCP and UDP connections between network
//! namespaces, checked against expectations written independently of our code.
//!
//! - the upstream e2e NetworkPolicy model (namespaces x, y, z; pods a, b, c; ports 80/81,
//!   TCP/UDP) with the scenarios in `tests/e2e/scenarios/`, each a sequence of steps whose
//!   9×9 truth tables must equal real connectivity;
//! - every seed example in `examples/` with its `expect/probes.yaml`;
//! - both layouts (routed /32 like Calico, bridged with bridge-nf like flannel), IPv4 and
//!   IPv6, one node and two nodes.
//!
//! Each node's ruleset is synced by the real dataplane inside the node's namespace; later
//! steps are partial syncs, so these tests also prove partial syncs converge.

#[path = "support/examples.rs"]
mod examples;
#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use examples::{Expectations, example_dirs, expectations};
use kernel::{NodeDataplanes, namespace_yaml, pod_yaml, serial};
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe, Proto};
use serde::Deserialize;

const PROBE_TIMEOUT: Duration = Duration::from_millis(600);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ───────────────────────────── upstream model ─────────────────────────────

#[derive(Deserialize)]
struct Scenario {
    name: String,
    steps: Vec<Step>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Step {
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    apply: Option<String>,
    probes: Vec<MatrixProbe>,
}

#[derive(Deserialize)]
struct MatrixProbe {
    port: u16,
    protocol: String,
    matrix: String,
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn model_cluster(layout: Layout, nodes: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(layout).node("node-1");
    if nodes > 1 {
        spec = spec.node("node-2");
    }
    for ns in NAMESPACES {
        for pod in PODS {
            // With two nodes, pod c of every namespace lives on node-2: every scenario then
            // mixes same-node and cross-node traffic.
            let node = if nodes > 1 && pod == "c" {
                "node-2"
            } else {
                "node-1"
            };
            spec = spec.pod(node, ns, pod, &[80, 81], &[80, 81]);
        }
    }
    spec
}

/// Labels and policies of the model as a scenario changes them.
struct ModelState {
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: BTreeMap<String, serde_json::Value>,
}

impl ModelState {
    fn new() -> Self {
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

    fn manifests(&self, cluster: &Cluster) -> String {
        let mut out = String::new();
        for (ns, labels) in &self.ns_labels {
            out.push_str(&namespace_yaml(ns, labels));
        }
        for p in cluster.pods() {
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

/// `${cidr:x/b}` and `${net:x/b:P4:P6}` → addresses of the family under test.
fn substitute(text: &str, cluster: &Cluster, family: Family) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unterminated template") + start;
        let inner = &rest[start + 2..end];
        let parts: Vec<&str> = inner.split(':').collect();
        let (ns, pod) = parts[1].split_once('/').expect("ns/pod");
        let ip = cluster.pod_ip(ns, pod, family);
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

fn parse_matrix(text: &str) -> Vec<(String, String, bool)> {
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

fn proto(s: &str) -> Proto {
    match s {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        other => panic!(
            "probe protocol {other} (SCTP probes cannot run: these kernels have no SCTP module)"
        ),
    }
}

fn scenarios() -> Vec<(String, Scenario)> {
    let dir = root().join("tests/e2e/scenarios");
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

struct RunStats {
    scenarios: usize,
    steps: usize,
    probes: usize,
}

fn run_upstream_scenarios(
    layout: Layout,
    nodes: usize,
    family: Family,
    filter: &dyn Fn(&str) -> bool,
) -> RunStats {
    let cluster = Cluster::new(model_cluster(layout, nodes));
    let mut planes = NodeDataplanes::new(&cluster);
    let mut failures = Vec::new();
    let mut stats = RunStats {
        scenarios: 0,
        steps: 0,
        probes: 0,
    };
    for (file, scenario) in scenarios() {
        if !filter(&file) {
            continue;
        }
        stats.scenarios += 1;
        let mut state = ModelState::new();
        for (si, step) in scenario.steps.iter().enumerate() {
            stats.steps += 1;
            for (ns, labels) in &step.namespace_labels {
                state.ns_labels.insert(ns.clone(), labels.clone());
            }
            for (pod, labels) in &step.pod_labels {
                state.pod_labels.insert(pod.clone(), labels.clone());
            }
            for key in &step.delete {
                assert!(
                    state.policies.remove(key).is_some(),
                    "{file}: delete of unknown policy {key}"
                );
            }
            if let Some(apply) = &step.apply {
                let text = substitute(apply, &cluster, family);
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
                    state.policies.insert(key, v);
                }
            }
            planes.sync_text(&cluster, &state.manifests(&cluster));

            let mut probes = Vec::new();
            let mut expected = Vec::new();
            for mp in &step.probes {
                for (from, to, allowed) in parse_matrix(&mp.matrix) {
                    if from == to {
                        continue; // upstream ignores loopback
                    }
                    let (fns, fpod) = from.split_once('/').expect("from");
                    let (tns, tpod) = to.split_once('/').expect("to");
                    probes.push(Probe::new(
                        Endpoint::pod(fns, fpod),
                        cluster.pod_ip(tns, tpod, family),
                        mp.port,
                        proto(&mp.protocol),
                    ));
                    expected.push((
                        format!("{from} → {to} {}/{}", mp.protocol, mp.port),
                        allowed,
                    ));
                }
            }
            let got = cluster.probe_all(&probes, PROBE_TIMEOUT);
            stats.probes += probes.len();
            for ((what, want), got) in expected.iter().zip(got) {
                if *want != got {
                    failures.push(format!(
                        "{file} step {si} ({}): {what}: want {}, got {}",
                        scenario.name,
                        if *want { "connected" } else { "blocked" },
                        if got { "connected" } else { "blocked" }
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{:?} {nodes} node(s) {family:?}: {} of {} probes disagree with the truth tables:\n{}",
        layout,
        failures.len(),
        stats.probes,
        failures.join("\n")
    );
    stats
}

fn report(what: &str, stats: &RunStats, start: Instant) {
    eprintln!(
        "{what}: {} scenarios, {} steps, {} probes in {:.1}s",
        stats.scenarios,
        stats.steps,
        stats.probes,
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn upstream_scenarios_routed_ipv4_one_node() {
    let _g = serial();
    let start = Instant::now();
    let stats = run_upstream_scenarios(Layout::Routed, 1, Family::V4, &|_| true);
    assert!(stats.scenarios >= 25, "only {} scenarios", stats.scenarios);
    report("routed/IPv4/1 node", &stats, start);
}

#[test]
fn upstream_scenarios_bridge_ipv6_two_nodes() {
    let _g = serial();
    let start = Instant::now();
    let stats = run_upstream_scenarios(Layout::Bridge, 2, Family::V6, &|_| true);
    assert!(stats.scenarios >= 25, "only {} scenarios", stats.scenarios);
    report("bridge/IPv6/2 nodes", &stats, start);
}

#[test]
fn upstream_scenarios_routed_ipv6_two_nodes_and_bridge_ipv4_one_node() {
    let _g = serial();
    let start = Instant::now();
    // A spread of the suite on the two remaining combinations.
    let every_third = |f: &str| f[..2].parse::<usize>().is_ok_and(|n| n % 3 == 0);
    let a = run_upstream_scenarios(Layout::Routed, 2, Family::V6, &every_third);
    report("routed/IPv6/2 nodes (every third)", &a, start);
    let start = Instant::now();
    let b = run_upstream_scenarios(Layout::Bridge, 1, Family::V4, &every_third);
    report("bridge/IPv4/1 node (every third)", &b, start);
    assert!(a.scenarios >= 10 && b.scenarios >= 10);
}

// ───────────────────────────── seed examples ─────────────────────────────

/// Build the cluster an example describes: its pods (serving every probed port), its nodes,
/// and the outside addresses its probes use.
fn example_cluster(dir: &Path, layout: Layout, exp: &Expectations) -> (ClusterSpec, String) {
    let manifests: String = kube_nftpolicy::manifest::manifest_files(dir)
        .expect("files")
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read") + "\n---\n")
        .collect();
    let m = kube_nftpolicy::manifest::parse_sources(&[(
        PathBuf::from("example.yaml"),
        manifests.clone(),
    )])
    .expect("parse");
    let mut spec = ClusterSpec::new(layout).node("node-1").node("node-2");
    let mut ext_tcp = Vec::new();
    let mut ext_udp = Vec::new();
    for p in &m.pods {
        let key = p.key.to_string();
        let mut tcp: Vec<u16> = exp
            .probes
            .iter()
            .filter(|e| e.to == key && e.protocol == "TCP")
            .map(|e| e.port)
            .collect();
        let mut udp: Vec<u16> = exp
            .probes
            .iter()
            .filter(|e| e.to == key && e.protocol == "UDP")
            .map(|e| e.port)
            .collect();
        tcp.sort();
        tcp.dedup();
        udp.sort();
        udp.dedup();
        let node = p.node.clone().expect("example pods have nodes");
        spec.pods.push(
            netns::PodSpec::new(&node, &p.key.namespace, &p.key.name, p.ips.clone())
                .tcp(&tcp)
                .udp(&udp),
        );
    }
    for e in &exp.probes {
        for end in [&e.from, &e.to] {
            if let Some(ip) = end.strip_prefix("ip:") {
                let ip: IpAddr = ip.parse().expect("ip");
                if !spec.externals.contains(&ip) {
                    spec.externals.push(ip);
                }
            }
        }
        if e.to.starts_with("ip:") {
            match e.protocol.as_str() {
                "TCP" => ext_tcp.push(e.port),
                _ => ext_udp.push(e.port),
            }
        }
        if e.to.starts_with("node:") {
            match e.protocol.as_str() {
                "TCP" => spec.node_tcp_ports.push(e.port),
                _ => spec.node_udp_ports.push(e.port),
            }
        }
    }
    for v in [
        &mut ext_tcp,
        &mut ext_udp,
        &mut spec.node_tcp_ports,
        &mut spec.node_udp_ports,
    ] {
        v.sort();
        v.dedup();
    }
    spec = spec.external_ports(&ext_tcp, &ext_udp);
    (spec, manifests)
}

fn endpoint_addr(cluster: &Cluster, end: &str, family: Family) -> IpAddr {
    if let Some(ip) = end.strip_prefix("ip:") {
        return ip.parse().expect("ip");
    }
    if let Some(node) = end.strip_prefix("node:") {
        return cluster.node_ip(node, family);
    }
    let (ns, pod) = end.split_once('/').expect("ns/pod");
    cluster.pod_ip(ns, pod, family)
}

fn run_examples(layout: Layout) -> usize {
    let mut failures = Vec::new();
    let mut total = 0;
    for dir in example_dirs() {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let exp = expectations(&dir);
        let (spec, manifests) = example_cluster(&dir, layout, &exp);
        let cluster = Cluster::new(spec);
        let mut planes = NodeDataplanes::new(&cluster);
        planes.sync_text(&cluster, &manifests);
        let mut probes = Vec::new();
        for e in &exp.probes {
            let family = match (
                e.family,
                e.to.strip_prefix("ip:").or(e.from.strip_prefix("ip:")),
            ) {
                (_, Some(ip)) if ip.contains(':') => Family::V6,
                (_, Some(_)) => Family::V4,
                (Some(6), None) => Family::V6,
                _ => Family::V4,
            };
            let to = endpoint_addr(&cluster, &e.to, family);
            let (from, src) = if let Some(ip) = e.from.strip_prefix("ip:") {
                (Endpoint::External, Some(ip.parse::<IpAddr>().expect("ip")))
            } else if let Some(node) = e.from.strip_prefix("node:") {
                (Endpoint::node(node), None)
            } else {
                let (ns, pod) = e.from.split_once('/').expect("ns/pod");
                (Endpoint::pod(ns, pod), None)
            };
            let mut p = Probe::new(from, to, e.port, proto(&e.protocol));
            if let Some(s) = src {
                p = p.with_src(s);
            }
            probes.push(p);
        }
        let got = cluster.probe_all(&probes, PROBE_TIMEOUT);
        total += probes.len();
        for (e, got) in exp.probes.iter().zip(got) {
            if e.allowed != got {
                failures.push(format!(
                    "{name}: {} → {} {}/{}: want {}, got {} ({})",
                    e.from,
                    e.to,
                    e.protocol,
                    e.port,
                    if e.allowed { "allowed" } else { "denied" },
                    if got { "allowed" } else { "denied" },
                    e.why
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{layout:?}: {} of {total} example probes failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    total
}

#[test]
fn seed_examples_routed() {
    let _g = serial();
    let start = Instant::now();
    let n = run_examples(Layout::Routed);
    assert!(n >= 200, "only {n} probes");
    eprintln!(
        "seed examples, routed: {n} probes in {:.1}s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn seed_examples_bridge() {
    let _g = serial();
    let start = Instant::now();
    let n = run_examples(Layout::Bridge);
    assert!(n >= 200, "only {n} probes");
    eprintln!(
        "seed examples, bridge: {n} probes in {:.1}s",
        start.elapsed().as_secs_f64()
    );
}
