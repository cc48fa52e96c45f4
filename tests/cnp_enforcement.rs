//! ClusterNetworkPolicy enforced by the real kernel: the upstream conformance scenarios
//! (network-policy-api v0.2.0, `conformance/tests/`), re-created in `tests/e2e/cnp/` over the
//! conformance model, plus one scenario per semantic rule of the tiers.
//!
//! The model is the conformance suite's (`conformance/base/manifests.yaml`): namespaces
//! `network-policy-conformance-{gryffindor,slytherin,hufflepuff,ravenclaw}` labelled
//! `conformance-house: <house>`, two pods each (`harry-potter-0/1`, `draco-malfoy-0/1`,
//! `cedric-diggory-0/1`, `luna-lovegood-0/1`) serving TCP 80 (named `web`) and 8080, UDP 53
//! (named `dns`) and 5353, and declaring SCTP 9003/9005 (these kernels have no SCTP module:
//! SCTP rules load, SCTP probes cannot run). Nodes serve TCP 36363 and 36364, for the node
//! peer scenarios. With two nodes, every `-1` pod runs on node-2.
//!
//! `selfProbes` make every pod connect to its own address (the matrices skip self pairs): a
//! pod reaching itself is always allowed, even under a Deny-all Admin policy.
//!
//! Each step's probes are truth tables written by hand from the upstream test's assertions
//! and the API text (never from our evaluator); every probe is also asked of `explain`,
//! which must agree with the kernel. Routed and bridged, IPv4 and IPv6, one and two nodes.

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kernel::{NodeDataplanes, serial};
use kube_nftpolicy::model::Protocol;
use kube_nftpolicy::tools::explain::{Endpoint as ExplainEndpoint, Explainer, PortQuery};
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe, Proto};
use serde::Deserialize;

const PROBE_TIMEOUT: Duration = Duration::from_millis(600);

/// (alias, namespace, pod).
const PODS: [(&str, &str, &str); 8] = [
    (
        "g0",
        "network-policy-conformance-gryffindor",
        "harry-potter-0",
    ),
    (
        "g1",
        "network-policy-conformance-gryffindor",
        "harry-potter-1",
    ),
    (
        "s0",
        "network-policy-conformance-slytherin",
        "draco-malfoy-0",
    ),
    (
        "s1",
        "network-policy-conformance-slytherin",
        "draco-malfoy-1",
    ),
    (
        "h0",
        "network-policy-conformance-hufflepuff",
        "cedric-diggory-0",
    ),
    (
        "h1",
        "network-policy-conformance-hufflepuff",
        "cedric-diggory-1",
    ),
    (
        "r0",
        "network-policy-conformance-ravenclaw",
        "luna-lovegood-0",
    ),
    (
        "r1",
        "network-policy-conformance-ravenclaw",
        "luna-lovegood-1",
    ),
];
const TCP_PORTS: [u16; 2] = [80, 8080];
const UDP_PORTS: [u16; 2] = [53, 5353];
const NODE_TCP_PORTS: [u16; 2] = [36363, 36364];

#[derive(Deserialize)]
struct Scenario {
    name: String,
    /// The upstream test this re-creates, or the semantic rule it proves.
    source: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    /// Objects to add or replace (ClusterNetworkPolicies, NetworkPolicies), by kind and name.
    #[serde(default)]
    apply: Option<String>,
    /// `Kind/name` or `Kind/namespace/name` to remove.
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    probes: Vec<MatrixProbe>,
    #[serde(default)]
    node_probes: Vec<NodeProbe>,
    /// Every pod connects to its own address on these ports: always allowed, whatever the
    /// policies say (the matrices skip self pairs, so a pod reaching itself is probed here).
    #[serde(default)]
    self_probes: Vec<SelfProbe>,
    /// The objects are meant to draw load warnings (fail-closed scenarios).
    #[serde(default)]
    expect_warnings: bool,
}

#[derive(Deserialize)]
struct MatrixProbe {
    port: u16,
    protocol: String,
    /// A `*` corner, then rows are sources, columns destinations: namespace letters (g s h r: every pod of the
    /// namespace) or pod aliases (g0 g1 …). `.` connects, `X` is blocked; self is skipped.
    matrix: String,
}

#[derive(Deserialize)]
struct SelfProbe {
    port: u16,
    protocol: String,
}

#[derive(Deserialize)]
struct NodeProbe {
    from: String,
    node: String,
    port: u16,
    allowed: bool,
}

fn alias(a: &str) -> (&'static str, &'static str) {
    PODS.iter()
        .find(|(x, _, _)| *x == a)
        .map(|(_, ns, pod)| (*ns, *pod))
        .unwrap_or_else(|| panic!("unknown pod alias {a}"))
}

fn expand(token: &str) -> Vec<&'static str> {
    PODS.iter()
        .map(|(a, _, _)| *a)
        .filter(|a| *a == token || (token.len() == 1 && a.starts_with(token)))
        .collect()
}

/// (from alias, to alias, allowed) for every pair a matrix names, self excluded.
fn matrix_cells(text: &str) -> Vec<(&'static str, &'static str, bool)> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    // The header names the columns after a corner token (`*`).
    let header: Vec<&str> = lines
        .next()
        .expect("header")
        .split_whitespace()
        .skip(1)
        .collect();
    let mut out = Vec::new();
    let mut rows = 0;
    for line in lines {
        rows += 1;
        let mut t = line.split_whitespace();
        let from = t.next().expect("row label");
        let cells: Vec<&str> = t.collect();
        assert_eq!(
            cells.len(),
            header.len(),
            "row {from}: {} cells",
            cells.len()
        );
        for (to, cell) in header.iter().zip(cells) {
            let allowed = match cell {
                "." => true,
                "X" => false,
                other => panic!("bad cell {other:?}"),
            };
            for f in expand(from) {
                for d in expand(to) {
                    if f != d {
                        out.push((f, d, allowed));
                    }
                }
            }
        }
    }
    assert_eq!(rows, header.len(), "a matrix is square");
    let mut seen: Vec<(&str, &str)> = out.iter().map(|(f, t, _)| (*f, *t)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        56,
        "a matrix covers every ordered pair of the 8 pods"
    );
    out
}

fn scenarios() -> Vec<(String, Scenario)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/cnp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scenario dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("read");
            let s: Scenario =
                serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f.file_name().expect("name").to_string_lossy().into(), s)
        })
        .collect()
}

fn cluster_spec(layout: Layout, nodes: usize) -> ClusterSpec {
    let mut spec = ClusterSpec::new(layout).node("node-1");
    if nodes > 1 {
        spec = spec.node("node-2");
    }
    spec.node_tcp_ports.extend(NODE_TCP_PORTS);
    for (a, ns, pod) in PODS {
        let node = if nodes > 1 && a.ends_with('1') {
            "node-2"
        } else {
            "node-1"
        };
        spec = spec.pod(node, ns, pod, &TCP_PORTS, &UDP_PORTS);
    }
    spec
}

/// Namespaces, pods (with the upstream named ports) and Nodes as manifests.
fn base_manifests(cluster: &Cluster) -> String {
    let mut out = String::new();
    for house in ["gryffindor", "slytherin", "hufflepuff", "ravenclaw"] {
        out.push_str(&manifest_yaml::namespace_yaml(
            &format!("network-policy-conformance-{house}"),
            &BTreeMap::from([("conformance-house".to_string(), house.to_string())]),
        ));
    }
    for p in cluster.pods() {
        let house = p
            .namespace
            .strip_prefix("network-policy-conformance-")
            .expect("house");
        let ips: Vec<String> = p.ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{conformance-house: {house}, statefulset.kubernetes.io/pod-name: {}}}}}\n\
             spec:\n  nodeName: {}\n  containers:\n  - {{name: c80, image: agnhost, ports: [{{containerPort: 80, protocol: TCP, name: web}}]}}\n  \
             - {{name: c8080, image: agnhost}}\n  - {{name: c53, image: agnhost, ports: [{{containerPort: 53, protocol: UDP, name: dns}}]}}\n  \
             - {{name: c5353, image: agnhost}}\n  - {{name: c9003, image: agnhost, ports: [{{containerPort: 9003, protocol: SCTP}}]}}\n\
             status: {{phase: Running, podIP: \"{}\", podIPs: [{}]}}\n",
            p.name,
            p.namespace,
            p.name,
            p.node,
            p.ips[0],
            ips.join(", ")
        ));
    }
    for node in cluster.node_names() {
        let addrs: Vec<String> = cluster
            .node_ips(&node)
            .iter()
            .map(|ip| format!("{{type: InternalIP, address: \"{ip}\"}}"))
            .collect();
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{kubernetes.io/hostname: {node}, conformance-node: {node}}}}}\n\
             status: {{addresses: [{}]}}\n",
            addrs.join(", ")
        ));
    }
    out
}

/// `${cidr:g0}` → the pod's address as a host prefix; `${net:g0:24:64}` → its network;
/// `${all}` → every address of the family.
fn substitute(text: &str, cluster: &Cluster, family: Family) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unterminated template") + start;
        let parts: Vec<&str> = rest[start + 2..end].split(':').collect();
        if parts[0] == "all" {
            out.push_str(if family == Family::V4 {
                "0.0.0.0/0"
            } else {
                "::/0"
            });
            rest = &rest[end + 1..];
            continue;
        }
        let (ns, pod) = alias(parts[1]);
        let ip = cluster.pod_ip(ns, pod, family);
        let value = match parts[0] {
            "cidr" => format!("{ip}/{}", if family == Family::V4 { 32 } else { 128 }),
            "net" => {
                let prefix: u8 = parts[if family == Family::V4 { 2 } else { 3 }]
                    .parse()
                    .expect("prefix");
                let c = kube_nftpolicy::model::Cidr::new(ip, prefix).expect("prefix");
                c.to_string()
            }
            other => panic!("unknown template {other}"),
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn object_key(v: &serde_json::Value) -> String {
    let kind = v["kind"].as_str().expect("kind");
    let name = v["metadata"]["name"].as_str().expect("name");
    match v["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

fn proto(s: &str) -> Proto {
    match s {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        other => panic!("probe protocol {other} cannot run here"),
    }
}

struct Stats {
    scenarios: usize,
    steps: usize,
    probes: usize,
}

fn run(layout: Layout, nodes: usize, family: Family) -> Stats {
    let cluster = Cluster::new(cluster_spec(layout, nodes));
    let mut planes = NodeDataplanes::new(&cluster);
    let base = base_manifests(&cluster);
    let mut failures = Vec::new();
    let mut disagreements = Vec::new();
    let mut stats = Stats {
        scenarios: 0,
        steps: 0,
        probes: 0,
    };
    for (file, scenario) in scenarios() {
        stats.scenarios += 1;
        let mut objects: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (si, step) in scenario.steps.iter().enumerate() {
            stats.steps += 1;
            for key in &step.delete {
                assert!(
                    objects.remove(key).is_some(),
                    "{file}: delete of unknown {key}"
                );
            }
            if let Some(apply) = &step.apply {
                let text = substitute(apply, &cluster, family);
                for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                    let v = serde_json::Value::deserialize(doc).expect("yaml");
                    if !v.is_null() {
                        objects.insert(object_key(&v), v);
                    }
                }
            }
            let mut manifests = base.clone();
            for v in objects.values() {
                manifests.push_str("---\n");
                manifests.push_str(&serde_yaml_ng::to_string(v).expect("yaml"));
            }
            let m = kube_nftpolicy::cluster::manifest::parse_sources(&[(
                PathBuf::from(&file),
                manifests.clone(),
            )])
            .expect("manifests");
            assert_eq!(
                !m.warnings.is_empty(),
                step.expect_warnings,
                "{file} step {si}: manifest warnings: {:?}",
                m.warnings
            );
            planes.sync_text(&cluster, &manifests);

            let mut probes = Vec::new();
            let mut expected = Vec::new();
            for mp in &step.probes {
                for (from, to, allowed) in matrix_cells(&mp.matrix) {
                    let (fns, fpod) = alias(from);
                    let (tns, tpod) = alias(to);
                    probes.push(Probe::new(
                        Endpoint::pod(fns, fpod),
                        cluster.pod_ip(tns, tpod, family),
                        mp.port,
                        proto(&mp.protocol),
                    ));
                    expected.push((
                        format!("{from} → {to} {}/{}", mp.protocol, mp.port),
                        allowed,
                        format!("{fns}/{fpod}"),
                        format!("{tns}/{tpod}"),
                        format!("{}/{}", mp.port, mp.protocol),
                    ));
                }
            }
            for np in &step.node_probes {
                if !cluster.node_names().contains(&np.node) {
                    continue;
                }
                let (fns, fpod) = alias(&np.from);
                let ip = cluster.node_ip(&np.node, family);
                probes.push(Probe::new(
                    Endpoint::pod(fns, fpod),
                    ip,
                    np.port,
                    Proto::Tcp,
                ));
                expected.push((
                    format!("{} → {} TCP/{}", np.from, np.node, np.port),
                    np.allowed,
                    format!("{fns}/{fpod}"),
                    ip.to_string(),
                    format!("{}/TCP", np.port),
                ));
            }
            for sp in &step.self_probes {
                for (a, ns, pod) in PODS {
                    probes.push(Probe::new(
                        Endpoint::pod(ns, pod),
                        cluster.pod_ip(ns, pod, family),
                        sp.port,
                        proto(&sp.protocol),
                    ));
                    expected.push((
                        format!("{a} → itself {}/{}", sp.protocol, sp.port),
                        true,
                        format!("{ns}/{pod}"),
                        format!("{ns}/{pod}"),
                        format!("{}/{}", sp.port, sp.protocol),
                    ));
                }
            }
            let got = cluster.probe_all(&probes, PROBE_TIMEOUT);
            stats.probes += probes.len();
            let snap = m.into_index().snapshot();
            let mut explainer = Explainer::new(&snap);
            for ((what, want, from, to, port), got) in expected.iter().zip(got) {
                if *want != got {
                    failures.push(format!(
                        "{file} step {si} ({}): {what}: want {}, got {}",
                        scenario.name,
                        if *want { "connected" } else { "blocked" },
                        if got { "connected" } else { "blocked" }
                    ));
                }
                let from: ExplainEndpoint = from.parse().expect("from");
                let to: ExplainEndpoint = to.parse().expect("to");
                let port = PortQuery::parse(port, Protocol::Tcp).expect("port");
                let fam = match family {
                    Family::V4 => kube_nftpolicy::model::Family::V4,
                    Family::V6 => kube_nftpolicy::model::Family::V6,
                };
                match explainer.explain(&from, &to, &port, Some(fam)) {
                    Ok(e) if e.allowed == got => {}
                    Ok(e) => disagreements.push(format!(
                        "{file} step {si}: {what}: kernel {}, explain {}:\n{}",
                        if got { "connected" } else { "blocked" },
                        e.verdict,
                        e.to_text()
                    )),
                    Err(err) => disagreements.push(format!("{file} step {si}: {what}: {err}")),
                }
            }
        }
        let _ = &scenario.source;
    }
    assert!(
        failures.is_empty(),
        "{layout:?} {nodes} node(s) {family:?}: {} of {} probes disagree with the scenarios:\n{}",
        failures.len(),
        stats.probes,
        failures.join("\n")
    );
    assert!(
        disagreements.is_empty(),
        "{layout:?} {nodes} node(s) {family:?}: explain disagrees with the kernel on {} probes:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    stats
}

fn report(what: &str, s: &Stats, start: Instant) {
    eprintln!(
        "{what}: {} scenarios, {} steps, {} probes in {:.1}s",
        s.scenarios,
        s.steps,
        s.probes,
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn cnp_scenarios_routed_ipv4_two_nodes() {
    let _g = serial();
    let start = Instant::now();
    let s = run(Layout::Routed, 2, Family::V4);
    assert!(s.scenarios >= 10, "only {} scenarios", s.scenarios);
    report("routed/IPv4/2 nodes", &s, start);
}

#[test]
fn cnp_scenarios_bridge_ipv6_one_node() {
    let _g = serial();
    let start = Instant::now();
    let s = run(Layout::Bridge, 1, Family::V6);
    assert!(s.scenarios >= 10, "only {} scenarios", s.scenarios);
    report("bridge/IPv6/1 node", &s, start);
}

#[test]
fn cnp_scenarios_routed_ipv6_one_node_and_bridge_ipv4_two_nodes() {
    let _g = serial();
    let start = Instant::now();
    let a = run(Layout::Routed, 1, Family::V6);
    report("routed/IPv6/1 node", &a, start);
    let start = Instant::now();
    let b = run(Layout::Bridge, 2, Family::V4);
    report("bridge/IPv4/2 nodes", &b, start);
}

/// Each Deny rule counts what it drops, in its own terminal chain: the counter the agent
/// exports as `cnp_denied_packets_total`. Another Deny rule's counter stays at zero, and a
/// partial sync (a new policy) keeps the count.
#[test]
fn deny_rules_count_their_drops() {
    let _g = serial();
    let cluster = Cluster::new(cluster_spec(Layout::Routed, 1));
    let mut planes = NodeDataplanes::new(&cluster);
    let base = base_manifests(&cluster);
    let deny = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: counted}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {conformance-house: gryffindor}}}\n  ingress:\n  - {name: deny-slytherin, action: Deny, from: [{namespaces: {matchLabels: {conformance-house: slytherin}}}]}\n  - {action: Deny, from: [{namespaces: {matchLabels: {conformance-house: ravenclaw}}}], protocols: [{tcp: {destinationPort: {number: 9}}}]}\n";
    planes.sync_text(&cluster, &format!("{base}{deny}"));
    let (sns, spod) = alias("s0");
    let (gns, gpod) = alias("g0");
    let (rns, rpod) = alias("r0");
    let to = cluster.pod_ip(gns, gpod, Family::V4);
    let denied: Vec<Probe> = (0..5)
        .map(|_| Probe::new(Endpoint::pod(sns, spod), to, 80, Proto::Udp))
        .collect();
    let got = cluster.probe_all(&denied, PROBE_TIMEOUT);
    assert!(got.iter().all(|ok| !ok), "slytherin → gryffindor is denied");
    assert!(
        cluster.probe(
            &Probe::new(Endpoint::pod(rns, rpod), to, 80, Proto::Tcp),
            PROBE_TIMEOUT
        ),
        "ravenclaw → gryffindor:80 is allowed (the second rule is for port 9)"
    );
    let count = |planes: &mut NodeDataplanes| {
        let denies = planes.with(&cluster, "node-1", |dp| {
            dp.counters().expect("counters").cnp_denies
        });
        denies
            .into_iter()
            .map(|d| {
                (
                    (d.policy, d.tier, d.direction.as_str(), d.rule),
                    d.counter.packets,
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let first = count(&mut planes);
    let key = |rule: &str| ("counted".to_string(), "admin", "ingress", rule.to_string());
    // A UDP probe may send its datagram more than once; at least one per probe was dropped.
    let n = first[&key("deny-slytherin")];
    assert!(n >= 5, "deny-slytherin counted {n}: {first:?}");
    assert_eq!(first[&key("spec.ingress[1]")], 0, "{first:?}");
    // A partial sync (another policy) keeps the count.
    let other = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: other}\nspec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - {action: Deny, to: [{networks: [203.0.113.0/24]}]}\n";
    planes.sync_text(&cluster, &format!("{base}{deny}{other}"));
    let second = count(&mut planes);
    assert_eq!(second[&key("deny-slytherin")], n, "{second:?}");
}
