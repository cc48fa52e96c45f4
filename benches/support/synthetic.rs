#![allow(dead_code)]
//! A synthetic cluster at the scale targets of DESIGN.md: 10,000 pods in 100 namespaces on
//! 91 nodes (~110 pods per node), 1,000 NetworkPolicies, built from model types directly so
//! the benchmarks measure our code, not YAML parsing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::model::policy::{NamespaceScope, Peer, PortMatch, PortSpec, Protocol, Rule};
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
    PodInfo {
        key: ObjectKey::new(format!("ns-{ns}"), format!("pod-{i}")),
        node: Some(format!("node-{node}")),
        labels: labels(&[
            ("app", format!("app-{}", (i / s.namespaces + app_salt) % 10)),
            ("tier", format!("t{}", i % 3)),
        ]),
        ips: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
        named_ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        host_network: false,
        finished: false,
    }
}

pub fn policy(j: usize, s: &Scale) -> Policy {
    let ns = format!("ns-{}", j % s.namespaces);
    let key = ObjectKey::new(ns.clone(), format!("policy-{j}"));
    let target = sel(&[("app", format!("app-{}", (j / s.namespaces) % 10))]);
    let port = |p: u16| PortSpec {
        protocol: Protocol::Tcp,
        port: PortMatch::Range(p, p),
    };
    let (ingress, egress) = match j % 5 {
        // default deny for the namespace
        0 => (Some(vec![]), Some(vec![])),
        // same-namespace app → app on a port
        1 => (
            Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Own(ns.clone()),
                    pods: sel(&[("app", format!("app-{}", (j + 1) % 10))]),
                }]),
                ports: Some(vec![port(8080), port(9090)]),
            }]),
            None,
        ),
        // from a team of namespaces, named port
        2 => (
            Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Selector(sel(&[(
                        "team",
                        format!("team-{}", j % 10),
                    )])),
                    pods: Selector::everything(),
                }]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Named("http".into()),
                }]),
            }]),
            None,
        ),
        // egress to an ipBlock with an except, plus DNS anywhere
        3 => (
            None,
            Some(vec![
                Rule {
                    peers: Some(vec![Peer::IpBlock(IpBlock {
                        cidr: "192.168.0.0/16".parse::<Cidr>().expect("cidr"),
                        except: vec![
                            format!("192.168.{}.0/24", j % 256)
                                .parse::<Cidr>()
                                .expect("cidr"),
                        ],
                    })]),
                    ports: Some(vec![port(443)]),
                },
                Rule {
                    peers: None,
                    ports: Some(vec![PortSpec {
                        protocol: Protocol::Udp,
                        port: PortMatch::Range(53, 53),
                    }]),
                },
            ]),
        ),
        // egress to tier pods in all namespaces on a port range; half of them also reach
        // the named port `http` of same-namespace pods of that tier
        _ => {
            let wide = Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Selector(Selector::everything()),
                    pods: sel(&[("tier", format!("t{}", j % 3))]),
                }]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(8000, 8100),
                }]),
            };
            let named = Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Own(ns.clone()),
                    pods: sel(&[("tier", format!("t{}", j % 3))]),
                }]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Named("http".into()),
                }]),
            };
            let rules = if j % 10 == 4 {
                vec![wide, named]
            } else {
                vec![wide]
            };
            (None, Some(rules))
        }
    };
    Policy {
        key,
        pod_selector: target,
        ingress,
        egress,
        invalid: None,
    }
}

pub fn index(s: &Scale) -> Index {
    let mut idx = Index::new();
    idx.reset_namespaces(
        (0..s.namespaces)
            .map(|n| NamespaceInfo {
                name: format!("ns-{n}"),
                labels: labels(&[
                    ("team", format!("team-{}", n % 10)),
                    ("kubernetes.io/metadata.name", format!("ns-{n}")),
                ]),
            })
            .collect(),
    );
    idx.reset_pods((0..s.pods).map(|i| pod(i, s, 0)).collect());
    idx.reset_policies((0..s.policies).map(|j| policy(j, s)).collect());
    idx
}

// ── The same objects as Kubernetes JSON, for benchmarks that serve them from the fake API
// ── server to the real agent.

fn labels_json(l: &Labels) -> serde_json::Value {
    serde_json::Value::Object(
        l.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

fn selector_json(s: &Selector) -> serde_json::Value {
    assert!(
        s.expressions.is_empty(),
        "the synthetic cluster uses matchLabels only"
    );
    serde_json::json!({ "matchLabels": labels_json(&s.match_labels) })
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
            serde_json::json!({"name": np.name, "containerPort": np.port, "protocol": np.protocol.to_string()})
        })
        .collect();
    let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.key.name, "namespace": p.key.namespace, "labels": labels_json(&p.labels)},
        "spec": {
            "nodeName": p.node,
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
