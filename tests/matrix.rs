//! `matrix` against the truth tables of the upstream-style scenarios (`tests/e2e/scenarios/`):
//! every step of every scenario, the state built exactly as the kernel tests build it, every
//! table computed without a kernel and compared cell by cell, on one node over IPv4 and on
//! two nodes over IPv6. The rendered text must read back (with the scenarios' own parser)
//! as the same table. Also: selection, named ports and bad input.

#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/scenarios.rs"]
mod scenarios;

use std::net::IpAddr;
use std::path::PathBuf;

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::index::Snapshot;
use kube_nftpolicy::model::Family;
use kube_nftpolicy::tools::explain::PortQuery;
use kube_nftpolicy::tools::matrix::{MatrixError, MatrixSpec, matrix};
use scenarios::{ModelPod, ModelState, NAMESPACES, PODS, parse_matrix, scenarios};

/// The model pods: with two nodes, pod c of every namespace is on node-2 (as in the kernel
/// tests), on its own /24 and /64.
fn placement(nodes: usize) -> Vec<ModelPod> {
    let mut out = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, pod) in PODS.iter().enumerate() {
            let second = nodes > 1 && *pod == "c";
            let net = if second { 2 } else { 1 };
            let host = 10 + 3 * i + j;
            out.push(ModelPod {
                namespace: ns.to_string(),
                name: pod.to_string(),
                node: if second { "node-2" } else { "node-1" }.into(),
                ips: vec![
                    format!("10.244.{net}.{host}").parse().expect("v4"),
                    format!("fd00:10:244:{net}::{host}").parse().expect("v6"),
                ],
            });
        }
    }
    out
}

fn snapshot(text: &str) -> Snapshot {
    let m = parse_sources(&[(PathBuf::from("state.yaml"), text.to_string())]).expect("parse");
    let idx = m.into_index();
    idx.snapshot()
}

fn check_scenarios(nodes: usize, family: Family) -> usize {
    let pods = placement(nodes);
    let ip = |ns: &str, pod: &str| -> IpAddr {
        let p = pods
            .iter()
            .find(|p| p.namespace == ns && p.name == pod)
            .unwrap_or_else(|| panic!("no pod {ns}/{pod}"));
        *p.ips
            .iter()
            .find(|a| Family::of(a) == family)
            .expect("address of the family")
    };
    let mut failures = Vec::new();
    let mut tables = 0;
    for (file, scenario) in scenarios() {
        let mut state = ModelState::new();
        for (si, step) in scenario.steps.iter().enumerate() {
            state.apply_step(&file, step, &ip, family);
            let snap = snapshot(&state.manifests(&pods));
            let spec = MatrixSpec {
                namespaces: NAMESPACES.iter().map(|s| s.to_string()).collect(),
                ports: step
                    .probes
                    .iter()
                    .map(|p| {
                        format!("{}/{}", p.port, p.protocol)
                            .parse::<PortQuery>()
                            .expect("port")
                    })
                    .collect(),
                family: Some(family),
            };
            let m = matrix(&snap, &spec).expect("matrix");
            assert_eq!(m.pods.len(), 9, "{file}: the model has 9 pods");
            // A selection takes the other pods off the nodes it resolves (to stay cheap at
            // scale): its cells must be the full table's.
            let subsets: Vec<Vec<String>> = NAMESPACES
                .iter()
                .map(|ns| vec![ns.to_string()])
                .chain([NAMESPACES[..2].iter().map(|s| s.to_string()).collect()])
                .collect();
            for namespaces in subsets {
                let part = matrix(
                    &snap,
                    &MatrixSpec {
                        namespaces: namespaces.clone(),
                        ..spec.clone()
                    },
                )
                .expect("matrix of a selection");
                let at = |name: &String| m.pods.iter().position(|p| p == name).expect("pod");
                for (t, full) in part.tables.iter().zip(&m.tables) {
                    for (i, from) in part.pods.iter().enumerate() {
                        for (j, to) in part.pods.iter().enumerate() {
                            assert_eq!(
                                t.allowed[i][j],
                                full.allowed[at(from)][at(to)],
                                "{file} step {si} {}: {from} → {to} with only {namespaces:?}",
                                t.port
                            );
                        }
                    }
                }
            }
            let text = m.to_text();
            let rendered: Vec<&str> = text.split("\n\n").collect();
            assert_eq!(rendered.len(), step.probes.len(), "{file}: one table each");
            for ((probe, table), rendered) in step.probes.iter().zip(&m.tables).zip(rendered) {
                tables += 1;
                let index = |name: &str| {
                    m.pods
                        .iter()
                        .position(|p| p == name)
                        .unwrap_or_else(|| panic!("{name} not in {:?}", m.pods))
                };
                for (from, to, want) in parse_matrix(&probe.matrix) {
                    let got = table.allowed[index(&from)][index(&to)];
                    if got != Some(want) {
                        failures.push(format!(
                            "{file} step {si} ({}) {}/{}: {from} → {to}: want {}, got {got:?}",
                            scenario.name,
                            probe.port,
                            probe.protocol,
                            if want { "." } else { "X" }
                        ));
                    }
                }
                // The text is a truth table in the scenarios' own format (after the title).
                let (title, body) = rendered.split_once('\n').expect("title line");
                assert!(
                    title.starts_with(&format!("{}/{}", probe.port, probe.protocol)),
                    "{title}"
                );
                let reread = parse_matrix(body);
                for (from, to, allowed) in reread {
                    assert_eq!(
                        table.allowed[index(&from)][index(&to)],
                        Some(allowed),
                        "{file}: the text of {from} → {to} does not read back"
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{nodes} node(s) {family:?}: {} cells differ from the truth tables:\n{}",
        failures.len(),
        failures.join("\n")
    );
    tables
}

#[test]
fn truth_tables_one_node_ipv4() {
    let tables = check_scenarios(1, Family::V4);
    assert_eq!(tables, 129, "every probe matrix of the 57 scenarios");
}

#[test]
fn truth_tables_two_nodes_ipv6() {
    let tables = check_scenarios(2, Family::V6);
    assert_eq!(tables, 129, "every probe matrix of the 57 scenarios");
}

const SMALL: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIPs: [{ip: 10.0.0.1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.0.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: jobs}
spec: {nodeName: n2}
status: {podIPs: [{ip: 10.0.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v6only, namespace: jobs}
spec: {nodeName: n2}
status: {podIPs: [{ip: 'fd00::9'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: jobs}
spec: {nodeName: n2, hostNetwork: true}
status: {podIPs: [{ip: 172.18.0.12}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
";

#[test]
fn selection_named_ports_and_unanswerable_cells() {
    let snap = snapshot(SMALL);
    let port = |s: &str| s.parse::<PortQuery>().expect("port");

    // Every namespace; hostNetwork pods are not part of the table.
    let m = matrix(
        &snap,
        &MatrixSpec {
            ports: vec![port("8080")],
            ..MatrixSpec::default()
        },
    )
    .expect("matrix");
    assert_eq!(
        m.pods,
        ["jobs/batch", "jobs/v6only", "shop/client", "shop/web"]
    );
    let t = &m.tables[0].allowed;
    assert_eq!(t[2][3], Some(true), "client → web 8080 (the named port)");
    assert_eq!(t[0][3], Some(false), "batch → web is not allowed");
    assert_eq!(t[3][2], Some(true), "web → client: client is not isolated");
    assert_eq!(t[1][3], None, "v6only and web share no family");
    assert_eq!(t[1][1], Some(true), "the diagonal is always allowed");
    assert!(m.to_text().contains('?'), "{}", m.to_text());

    // One namespace, a named port: resolved per destination; no answer where undeclared.
    let m = matrix(
        &snap,
        &MatrixSpec {
            namespaces: vec!["shop".into()],
            ports: vec![port("http"), port("8080/UDP")],
            family: None,
        },
    )
    .expect("matrix");
    assert_eq!(m.pods, ["shop/client", "shop/web"]);
    assert_eq!(m.tables[0].port, "http/TCP");
    assert_eq!(
        m.tables[0].allowed,
        [[Some(true), Some(true)], [None, Some(true)]]
    );
    assert_eq!(m.tables[1].port, "8080/UDP");
    assert_eq!(
        m.tables[1].allowed,
        [[Some(true), Some(false)], [Some(true), Some(true)]]
    );
    let json = serde_json::to_value(&m).expect("json");
    assert_eq!(json["tables"][0]["allowed"][1][0], serde_json::Value::Null);
    assert_eq!(json["pods"][1], "shop/web");

    // Bad selections.
    let err = matrix(
        &snap,
        &MatrixSpec {
            namespaces: vec!["shop".into(), "nowhere".into()],
            ports: vec![port("80")],
            family: None,
        },
    )
    .expect_err("unknown namespace");
    assert_eq!(err, MatrixError::EmptyNamespace("nowhere".into()));
    assert!(err.to_string().contains("namespace nowhere has no pods"));
    assert_eq!(
        matrix(&snap, &MatrixSpec::default()).expect_err("no ports"),
        MatrixError::NoPorts
    );
    assert_eq!(
        matrix(
            &Snapshot::default(),
            &MatrixSpec {
                ports: vec![port("80")],
                ..MatrixSpec::default()
            }
        )
        .expect_err("empty"),
        MatrixError::NoPods
    );
}

/// The matrix resolves the tabulated pods on one node of their own, unless two of them on
/// different nodes share an address (stale state; a node looks its pods up by address), when
/// they stay on their nodes: both ways, every cell is exactly `explain`'s on the snapshot as
/// it is.
#[test]
fn cells_match_explain_with_and_without_shared_addresses() {
    use kube_nftpolicy::tools::explain::Explainer;
    let state = |d_ip: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\nspec: {{podCIDRs: [10.1.0.0/24]}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {{name: node-2}}\nspec: {{podCIDRs: [10.2.0.0/24]}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: shop, labels: {{app: a}}}}\nspec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.1.0.5}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: shop, labels: {{app: b}}}}\nspec: {{nodeName: node-2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.2.0.5}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: c, namespace: shop, labels: {{app: c}}}}\nspec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.1.0.6}}]}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: d, namespace: shop, labels: {{app: d}}}}\nspec: {{nodeName: node-2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: {d_ip}}}]}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-a, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: b}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a}}}}}}]}}]}}\n\
             ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: a-out, namespace: shop}}\n\
             spec: {{podSelector: {{matchLabels: {{app: a}}}}, policyTypes: [Egress], egress: [{{to: [{{podSelector: {{matchLabels: {{app: b}}}}}}]}}]}}\n"
        )
    };
    // d on node-2 with its own address, then with a's (node-1's) address.
    for d_ip in ["10.2.0.6", "10.1.0.5"] {
        let snap = snapshot(&state(d_ip));
        let m = matrix(
            &snap,
            &MatrixSpec {
                namespaces: vec!["shop".into()],
                ports: vec!["80".parse().expect("port")],
                family: Some(Family::V4),
            },
        )
        .expect("matrix");
        let mut explainer = Explainer::new(&snap);
        let mut denied = Vec::new();
        for (i, from) in m.pods.iter().enumerate() {
            for (j, to) in m.pods.iter().enumerate() {
                if i == j {
                    continue;
                }
                let e = explainer
                    .explain(
                        &from.parse().expect("endpoint"),
                        &to.parse().expect("endpoint"),
                        &"80".parse().expect("port"),
                        Some(Family::V4),
                    )
                    .expect("explain");
                assert_eq!(
                    m.tables[0].allowed[i][j],
                    Some(e.allowed),
                    "d at {d_ip}: {from} → {to}: {}",
                    e.to_text()
                );
                if !e.allowed {
                    denied.push(format!("{from} → {to}"));
                }
            }
        }
        // The policies are in force either way.
        assert!(
            denied.contains(&"shop/c → shop/b".to_string()),
            "{denied:?}"
        );
        assert!(
            denied.contains(&"shop/a → shop/c".to_string()),
            "{denied:?}"
        );
    }
}
