#![allow(dead_code)]
//! A synthetic cluster at the scale targets of DESIGN.md: 10,000 pods in 100 namespaces on
//! 91 nodes (~110 pods per node), 1,000 NetworkPolicies, built from model types directly so
//! the benchmarks measure our code, not YAML parsing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kube_nftpolicy::index::Index;
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
