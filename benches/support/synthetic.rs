#![allow(dead_code)]
//! A synthetic cluster at the scale targets of DESIGN.md: 10,000 pods in 100 namespaces on
//! 91 nodes (~110 pods per node), 1,000 NetworkPolicies, built from model types directly so
//! the benchmarks measure our code, not YAML parsing.
//!
//! It is shaped like real clusters, the hard case: namespaces labelled by team (a tenth each)
//! and environment (a third each); pods with app, tier and version labels, three named ports
//! and two addresses (dual stack); policies of nine shapes (see [`policy`]), among them
//! namespace selectors spanning a third of the cluster, named ports resolved on every peer,
//! port ranges, ipBlocks with excepts and matchExpressions with In, NotIn and Exists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::model::policy::{NamespaceScope, Peer, PortMatch, PortSpec, Protocol, Rule};
use kube_nftpolicy::model::selector::{Operator, Requirement};
use kube_nftpolicy::model::{
    Cidr, IpBlock, Labels, NamedPort, NamespaceInfo, ObjectKey, PodInfo, Policy, Selector,
};

pub struct Scale {
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
}

pub const TARGET: Scale = Scale {
    namespaces: 100,
    pods: 10_000,
    policies: 1_000,
    nodes: 91,
};

/// A tenth of the target, with the same ~110 pods per node.
pub const TENTH: Scale = Scale {
    namespaces: 10,
    pods: 1_000,
    policies: 100,
    nodes: 9,
};

/// Ten times the target, with the same ~110 pods per node.
pub const TEN_TIMES: Scale = Scale {
    namespaces: 1_000,
    pods: 100_000,
    policies: 10_000,
    nodes: 910,
};

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn sel(pairs: &[(&str, String)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        expressions: vec![],
    }
}

fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

/// The tiers pods are labelled with; policies select on them.
const TIERS: [&str; 3] = ["web", "api", "db"];
/// Namespace environments: every third namespace is `prod`.
const ENVS: [&str; 3] = ["prod", "staging", "dev"];

/// The labels of namespace `n`: a team shared by a tenth of the namespaces, and an
/// environment shared by a third.
pub fn namespace(n: usize) -> NamespaceInfo {
    NamespaceInfo {
        name: format!("ns-{n}"),
        labels: labels(&[
            ("team", format!("team-{}", n % 10)),
            ("env", ENVS[n % 3].to_string()),
            ("kubernetes.io/metadata.name", format!("ns-{n}")),
        ]),
    }
}

/// Pod `i`: spread over the namespaces and nodes, labelled with one of ten apps (shifted by
/// `app_salt`, to relabel), a tier and one of four versions, declaring three named ports, with
/// an IPv4 and an IPv6 address.
pub fn pod(i: usize, s: &Scale, app_salt: usize) -> PodInfo {
    let ns = i % s.namespaces;
    let node = i % s.nodes;
    let v4 = Ipv4Addr::new(
        10,
        (64 + i / 65_536) as u8,
        ((i / 256) % 256) as u8,
        (i % 256) as u8,
    );
    let v6 = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
    let named = |name: &str, port: u16| NamedPort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port,
    };
    PodInfo {
        key: ObjectKey::new(format!("ns-{ns}"), format!("pod-{i}")),
        node: Some(format!("node-{node}").into()),
        labels: labels(&[
            ("app", format!("app-{}", (i / s.namespaces + app_salt) % 10)),
            ("tier", TIERS[i % 3].to_string()),
            ("version", format!("v{}", (i / 7) % 4)),
        ]),
        ips: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
        named_ports: vec![
            named("grpc", 50_051),
            named("http", 8080),
            named("metrics", 9090),
        ],
        host_network: false,
        finished: false,
    }
}

fn tcp(p: u16) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: PortMatch::Range(p, p),
    }
}

fn named_port(name: &str) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: PortMatch::Named(name.into()),
    }
}

/// Policy `j`, one of nine shapes taken in turn, the shapes real clusters are made of:
/// default deny; same app; namespaces of a shared team label; a namespace AND pod selector
/// spanning every prod namespace; an ipBlock with excepts; named ports; port ranges across all
/// namespaces; DNS egress to one namespace; and matchExpressions (In, NotIn, Exists) in both
/// selectors.
pub fn policy(j: usize, s: &Scale) -> Policy {
    let ns = format!("ns-{}", j % s.namespaces);
    let key = ObjectKey::new(ns.clone(), format!("policy-{j}"));
    let app = |k: usize| format!("app-{}", k % 10);
    let mut target = sel(&[("app", app(j / s.namespaces))]);
    let own = |pods: Selector| Peer::Pods {
        namespaces: NamespaceScope::Own(ns.clone()),
        pods,
    };
    let across = |namespaces: Selector, pods: Selector| Peer::Pods {
        namespaces: NamespaceScope::Selector(namespaces),
        pods,
    };
    let rule = |peers: Vec<Peer>, ports: Vec<PortSpec>| Rule {
        peers: Some(peers),
        ports: Some(ports),
    };
    let (ingress, egress) = match j % 9 {
        // default deny for the whole namespace, both directions
        0 => {
            target = Selector::everything();
            (Some(vec![]), Some(vec![]))
        }
        // same app → app, two ports
        1 => (
            Some(vec![rule(
                vec![own(sel(&[("app", app(j / s.namespaces))]))],
                vec![tcp(8080), tcp(9090)],
            )]),
            None,
        ),
        // every namespace of a team (a tenth of the cluster), on the named port `http`
        2 => (
            Some(vec![rule(
                vec![across(
                    sel(&[("team", format!("team-{}", j % 10))]),
                    Selector::everything(),
                )],
                vec![named_port("http")],
            )]),
            None,
        ),
        // web pods of every prod namespace (a third of the cluster)
        3 => (
            Some(vec![rule(
                vec![across(
                    sel(&[("env", "prod".to_string())]),
                    sel(&[("tier", "web".to_string())]),
                )],
                vec![tcp(8080)],
            )]),
            None,
        ),
        // egress to an ipBlock with two excepts, on 443
        4 => (
            None,
            Some(vec![rule(
                vec![Peer::IpBlock(IpBlock {
                    cidr: "192.168.0.0/16".parse::<Cidr>().expect("cidr"),
                    except: [j % 256, (j + 128) % 256]
                        .iter()
                        .map(|b| format!("192.168.{b}.0/24").parse::<Cidr>().expect("cidr"))
                        .collect(),
                })],
                vec![tcp(443)],
            )]),
        ),
        // api pods of the namespace on the named ports `metrics` and `grpc`
        5 => (
            Some(vec![rule(
                vec![own(sel(&[("tier", "api".to_string())]))],
                vec![named_port("metrics"), named_port("grpc")],
            )]),
            None,
        ),
        // egress to db pods in every namespace on two port ranges
        6 => (
            None,
            Some(vec![rule(
                vec![across(
                    Selector::everything(),
                    sel(&[("tier", "db".to_string())]),
                )],
                vec![
                    PortSpec {
                        protocol: Protocol::Tcp,
                        port: PortMatch::Range(5432, 5440),
                    },
                    PortSpec {
                        protocol: Protocol::Tcp,
                        port: PortMatch::Range(8000, 8100),
                    },
                ],
            )]),
        ),
        // DNS egress to the resolver pods of one namespace, UDP and TCP 53
        7 => (
            None,
            Some(vec![rule(
                vec![across(
                    sel(&[("kubernetes.io/metadata.name", "ns-0".to_string())]),
                    sel(&[("app", app(0))]),
                )],
                vec![
                    PortSpec {
                        protocol: Protocol::Udp,
                        port: PortMatch::Range(53, 53),
                    },
                    tcp(53),
                ],
            )]),
        ),
        // matchExpressions in the target and in both peer selectors
        _ => {
            target = Selector {
                match_labels: Labels::new(),
                expressions: vec![
                    req("app", Operator::In, &["app-1", "app-2", "app-3"]),
                    req("version", Operator::NotIn, &["v0"]),
                ],
            };
            let namespaces = Selector {
                match_labels: Labels::new(),
                expressions: vec![
                    req("env", Operator::In, &["prod", "staging"]),
                    req("team", Operator::Exists, &[]),
                ],
            };
            let pods = Selector {
                match_labels: Labels::new(),
                expressions: vec![
                    req("tier", Operator::NotIn, &["db"]),
                    req("version", Operator::Exists, &[]),
                ],
            };
            (
                Some(vec![rule(
                    vec![across(namespaces, pods)],
                    vec![named_port("http")],
                )]),
                None,
            )
        }
    };
    Policy {
        key,
        pod_selector: target,
        ingress,
        egress,
        invalid: None,
        staged: false,
    }
}

pub fn index(s: &Scale) -> Index {
    let mut idx = Index::new();
    idx.reset_namespaces((0..s.namespaces).map(namespace).collect());
    idx.reset_pods((0..s.pods).map(|i| pod(i, s, 0)).collect());
    idx.reset_policies((0..s.policies).map(|j| policy(j, s)).collect());
    idx
}

// ── The same objects as Kubernetes JSON, for benchmarks that serve them from the fake API
// ── server to the real agent.

fn labels_json(l: &Labels) -> serde_json::Value {
    serde_json::Value::Object(
        l.iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect(),
    )
}

fn selector_json(s: &Selector) -> serde_json::Value {
    let mut v = serde_json::json!({ "matchLabels": labels_json(&s.match_labels) });
    if !s.expressions.is_empty() {
        v["matchExpressions"] = s
            .expressions
            .iter()
            .map(|r| {
                let mut e =
                    serde_json::json!({"key": r.key, "operator": format!("{:?}", r.operator)});
                if !r.values.is_empty() {
                    e["values"] = r.values.iter().cloned().collect::<Vec<_>>().into();
                }
                e
            })
            .collect::<Vec<_>>()
            .into();
    }
    v
}

pub fn namespace_json(n: &NamespaceInfo) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": n.name, "labels": labels_json(&n.labels)},
        "status": {"phase": "Active"},
    })
}

pub fn pod_json(p: &PodInfo) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = p
        .named_ports
        .iter()
        .map(|np| {
            serde_json::json!({"name": np.name.as_str(), "containerPort": np.port, "protocol": np.protocol.to_string()})
        })
        .collect();
    let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.key.name, "namespace": p.key.namespace, "labels": labels_json(&p.labels)},
        "spec": {
            "nodeName": p.node.as_deref(),
            "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10", "ports": ports}],
        },
        "status": {
            "phase": "Running",
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
        },
    })
}

pub fn policy_json(p: &Policy) -> serde_json::Value {
    let peer = |peer: &Peer| match peer {
        Peer::Pods { namespaces, pods } => {
            let mut v = serde_json::json!({ "podSelector": selector_json(pods) });
            if let NamespaceScope::Selector(ns) = namespaces {
                v["namespaceSelector"] = selector_json(ns);
            }
            v
        }
        Peer::IpBlock(b) => serde_json::json!({"ipBlock": {
            "cidr": b.cidr.to_string(),
            "except": b.except.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }}),
    };
    let port = |ps: &PortSpec| {
        let mut v = serde_json::json!({ "protocol": ps.protocol.to_string() });
        match &ps.port {
            PortMatch::All => {}
            PortMatch::Range(lo, hi) => {
                v["port"] = (*lo).into();
                if hi > lo {
                    v["endPort"] = (*hi).into();
                }
            }
            PortMatch::Named(n) => v["port"] = n.clone().into(),
        }
        v
    };
    let rules = |rules: &[Rule], peers_key: &str| {
        rules
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({});
                if let Some(peers) = &r.peers {
                    v[peers_key] = peers.iter().map(peer).collect::<Vec<_>>().into();
                }
                if let Some(ports) = &r.ports {
                    v["ports"] = ports.iter().map(port).collect::<Vec<_>>().into();
                }
                v
            })
            .collect::<Vec<_>>()
    };
    let mut spec = serde_json::json!({ "podSelector": selector_json(&p.pod_selector) });
    let mut types = Vec::new();
    if let Some(r) = &p.ingress {
        spec["ingress"] = rules(r, "from").into();
        types.push("Ingress");
    }
    if let Some(r) = &p.egress {
        spec["egress"] = rules(r, "to").into();
        types.push("Egress");
    }
    spec["policyTypes"] = types.into();
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": p.key.name, "namespace": p.key.namespace},
        "spec": spec,
    })
}

/// Namespaces, pods and policies of the cluster as Kubernetes JSON objects.
pub fn objects_json(s: &Scale) -> Vec<serde_json::Value> {
    let mut idx = index(s);
    let snap = idx.snapshot_with_changes().0;
    let mut out: Vec<serde_json::Value> = snap
        .namespaces
        .iter()
        .map(|(_, n)| namespace_json(n))
        .collect();
    out.extend(snap.pods.iter().map(|(_, p)| pod_json(p)));
    out.extend(snap.policies.iter().map(|(_, p)| policy_json(p)));
    out
}
