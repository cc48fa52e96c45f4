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
//!
//! Every probe is also asked of `explain`, from the same state: its verdict must equal what
//! the real connection did (all disagreements are reported at once, each probe named).

#[path = "support/examples.rs"]
mod examples;
#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/scenarios.rs"]
mod scenarios;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use examples::{Expectations, example_dirs, expectations};
use kernel::{NodeDataplanes, serial};
use kube_nftpolicy::engine::index::Snapshot;
use kube_nftpolicy::model::Protocol;
use kube_nftpolicy::tools::explain::{Endpoint as ExplainEndpoint, Explainer, PortQuery};
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe, Proto};
use scenarios::{ModelPod, ModelState, NAMESPACES, PODS, PORTS, parse_matrix, scenarios};

const PROBE_TIMEOUT: Duration = Duration::from_millis(600);

// ───────────────────────────── upstream model ─────────────────────────────

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
            spec = spec.pod(node, ns, pod, &PORTS, &PORTS);
        }
    }
    spec
}

fn model_pods(cluster: &Cluster) -> Vec<ModelPod> {
    cluster
        .pods()
        .iter()
        .map(|p| ModelPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: p.node.clone(),
            ips: p.ips.clone(),
        })
        .collect()
}

fn model_family(f: Family) -> kube_nftpolicy::model::Family {
    match f {
        Family::V4 => kube_nftpolicy::model::Family::V4,
        Family::V6 => kube_nftpolicy::model::Family::V6,
    }
}

fn snapshot_of(manifests: &str) -> Snapshot {
    let m = kube_nftpolicy::cluster::manifest::parse_sources(&[(
        PathBuf::from("state.yaml"),
        manifests.to_string(),
    )])
    .expect("manifests");
    let idx = m.into_index();
    idx.snapshot()
}

/// `explain`'s verdict for a probe, next to what the real connection did; a disagreement
/// names the probe and carries explain's report.
fn explain_disagrees(
    explainer: &mut Explainer<'_>,
    from: &ExplainEndpoint,
    to: &ExplainEndpoint,
    port: &PortQuery,
    family: Family,
    kernel: bool,
) -> Option<String> {
    match explainer.explain(from, to, port, Some(model_family(family))) {
        Ok(e) if e.allowed == kernel => None,
        Ok(e) => Some(format!(
            "kernel {}, explain says {}:\n{}",
            if kernel { "connected" } else { "blocked" },
            e.verdict,
            e.to_text()
        )),
        Err(err) => Some(format!("explain failed: {err}")),
    }
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

struct RunStats {
    scenarios: usize,
    steps: usize,
    probes: usize,
    /// Probes whose real outcome was compared with `explain`.
    explained: usize,
    /// Time spent asking `explain` (it must stay small next to the probes).
    explain_time: Duration,
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
        explained: 0,
        explain_time: Duration::ZERO,
    };
    let pods = model_pods(&cluster);
    let mut disagreements = Vec::new();
    for (file, scenario) in scenarios() {
        if !filter(&file) {
            continue;
        }
        stats.scenarios += 1;
        let mut state = ModelState::new();
        for (si, step) in scenario.steps.iter().enumerate() {
            stats.steps += 1;
            state.apply_step(
                &file,
                step,
                &|ns, pod| cluster.pod_ip(ns, pod, family),
                model_family(family),
            );
            let manifests = state.manifests(&pods);
            planes.sync_text(&cluster, &manifests);

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
                        (from, to, mp.port, mp.protocol.clone()),
                    ));
                }
            }
            let got = cluster.probe_all(&probes, PROBE_TIMEOUT);
            stats.probes += probes.len();
            // explain, from the same state, must say what the kernel did.
            let explain_start = Instant::now();
            let snap = snapshot_of(&manifests);
            let mut explainer = Explainer::new(&snap);
            for ((what, want, (from, to, port, protocol)), got) in expected.iter().zip(got) {
                if *want != got {
                    failures.push(format!(
                        "{file} step {si} ({}): {what}: want {}, got {}",
                        scenario.name,
                        if *want { "connected" } else { "blocked" },
                        if got { "connected" } else { "blocked" }
                    ));
                }
                let port = PortQuery::parse(&format!("{port}/{protocol}"), Protocol::Tcp)
                    .expect("probe port");
                if let Some(d) = explain_disagrees(
                    &mut explainer,
                    &from.parse().expect("from"),
                    &to.parse().expect("to"),
                    &port,
                    family,
                    got,
                ) {
                    disagreements.push(format!("{file} step {si}: {what}: {d}"));
                }
                stats.explained += 1;
            }
            stats.explain_time += explain_start.elapsed();
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
    assert!(
        disagreements.is_empty(),
        "{:?} {nodes} node(s) {family:?}: explain disagrees with the kernel on {} of {} probes:\n{}",
        layout,
        disagreements.len(),
        stats.explained,
        disagreements.join("\n")
    );
    assert_eq!(stats.explained, stats.probes, "every probe was explained");
    stats
}

fn report(what: &str, stats: &RunStats, start: Instant) {
    eprintln!(
        "{what}: {} scenarios, {} steps, {} probes in {:.1}s (explaining each took {:.2}s of that)",
        stats.scenarios,
        stats.steps,
        stats.probes,
        start.elapsed().as_secs_f64(),
        stats.explain_time.as_secs_f64()
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
    let manifests: String = kube_nftpolicy::cluster::manifest::manifest_files(dir)
        .expect("files")
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read") + "\n---\n")
        .collect();
    let m = kube_nftpolicy::cluster::manifest::parse_sources(&[(
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

/// How `explain` names a probe's end; `None` for a node as the source, whose own-node
/// exemption explain cannot know (node addresses are not in the manifests).
fn explain_endpoint(cluster: &Cluster, end: &str, family: Family) -> Option<ExplainEndpoint> {
    if let Some(ip) = end.strip_prefix("ip:") {
        return Some(ExplainEndpoint::Address(ip.parse().expect("ip")));
    }
    if let Some(node) = end.strip_prefix("node:") {
        return Some(ExplainEndpoint::Address(cluster.node_ip(node, family)));
    }
    Some(end.parse().expect("ns/pod"))
}

/// Runs every example; returns (probes, probes also compared with explain).
fn run_examples(layout: Layout) -> (usize, usize) {
    let mut failures = Vec::new();
    let mut disagreements = Vec::new();
    let mut total = 0;
    let mut explained = 0;
    for dir in example_dirs() {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let exp = expectations(&dir);
        let (spec, manifests) = example_cluster(&dir, layout, &exp);
        let cluster = Cluster::new(spec);
        let mut planes = NodeDataplanes::new(&cluster);
        planes.sync_text(&cluster, &manifests);
        let mut probes = Vec::new();
        let mut families = Vec::new();
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
            families.push(family);
        }
        let got = cluster.probe_all(&probes, PROBE_TIMEOUT);
        total += probes.len();
        let snap = snapshot_of(&manifests);
        let mut explainer = Explainer::new(&snap);
        for ((e, got), family) in exp.probes.iter().zip(got).zip(families) {
            let from = (!e.from.starts_with("node:"))
                .then(|| explain_endpoint(&cluster, &e.from, family))
                .flatten();
            if let (Some(from), Some(to)) = (from, explain_endpoint(&cluster, &e.to, family)) {
                let port = PortQuery::parse(&format!("{}/{}", e.port, e.protocol), Protocol::Tcp)
                    .expect("probe port");
                if let Some(d) = explain_disagrees(&mut explainer, &from, &to, &port, family, got) {
                    disagreements.push(format!(
                        "{name}: {} → {} {}/{}: {d}",
                        e.from, e.to, e.protocol, e.port
                    ));
                }
                explained += 1;
            }
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
    assert!(
        disagreements.is_empty(),
        "{layout:?}: explain disagrees with the kernel on {} of {explained} example probes:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    (total, explained)
}

#[test]
fn seed_examples_routed() {
    let _g = serial();
    let start = Instant::now();
    let (n, explained) = run_examples(Layout::Routed);
    assert!(n >= 200, "only {n} probes");
    assert!(explained >= 200, "only {explained} probes explained");
    eprintln!(
        "seed examples, routed: {n} probes ({explained} also explained) in {:.1}s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn seed_examples_bridge() {
    let _g = serial();
    let start = Instant::now();
    let (n, explained) = run_examples(Layout::Bridge);
    assert!(n >= 200, "only {n} probes");
    assert!(explained >= 200, "only {explained} probes explained");
    eprintln!(
        "seed examples, bridge: {n} probes ({explained} also explained) in {:.1}s",
        start.elapsed().as_secs_f64()
    );
}
