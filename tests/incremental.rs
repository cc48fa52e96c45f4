//! The incremental compiler must always produce what a full `compile(resolve(snapshot))`
//! produces. Named cases pin the fast path's tricky spots (shared addresses, named ports,
//! which changes take the full path); a seeded random walk of a few thousand changes over a
//! small, deliberately awkward cluster compares the two after every step.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube_nftpolicy::engine::compile::{CompileOptions, compile, node_policy};
use kube_nftpolicy::engine::incremental::{NodeCompiler, UpdateKind};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::ruleset::render;
use kube_nftpolicy::model::policy::{NamespaceScope, Peer, PortMatch, PortSpec, Protocol, Rule};
use kube_nftpolicy::model::{
    Action, ClusterPolicy, CnpPeer, CnpPort, CnpRule, IpBlock, Labels, NamedPort, NamespaceInfo,
    ObjectKey, PodInfo, Policy, RuleMatch, Selector, Subject, Tier,
};

const NODE: &str = "node-a";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        expressions: vec![],
    }
}

fn pod(ns: &str, name: &str, node: &str, app: &str, ips: &[&str]) -> PodInfo {
    PodInfo {
        key: ObjectKey::new(ns, name),
        node: Some(node.into()),
        labels: labels(&[("app", app)]),
        ips: ips.iter().map(|s| s.parse().expect("test ip")).collect(),
        named_ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        host_network: false,
        finished: false,
    }
}

fn namespace(name: &str, team: &str) -> NamespaceInfo {
    NamespaceInfo {
        name: name.to_string(),
        labels: labels(&[("team", team), ("kubernetes.io/metadata.name", name)]),
    }
}

fn tcp(port: PortMatch) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port,
    }
}

/// `web` in `a` is isolated both ways: ingress from app=client pods of team=x namespaces;
/// egress to named port `http` on app=api pods anywhere.
fn policies() -> Vec<Policy> {
    vec![Policy {
        key: ObjectKey::new("a", "web"),
        pod_selector: sel(&[("app", "web")]),
        ingress: Some(vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(sel(&[("team", "x")])),
                pods: sel(&[("app", "client")]),
            }]),
            ports: Some(vec![tcp(PortMatch::Range(80, 80))]),
        }]),
        egress: Some(vec![Rule {
            peers: Some(vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(Selector::everything()),
                pods: sel(&[("app", "api")]),
            }]),
            ports: Some(vec![tcp(PortMatch::Named("http".into()))]),
        }]),
        invalid: None,
        staged: false,
    }]
}

fn base_index() -> Index {
    let mut idx = Index::new();
    idx.reset_namespaces(vec![
        namespace("a", "x"),
        namespace("b", "x"),
        namespace("c", "y"),
    ]);
    idx.reset_pods(vec![
        pod("a", "web", NODE, "web", &["10.0.0.1", "fd00::1"]),
        pod(
            "b",
            "client-1",
            "node-b",
            "client",
            &["10.0.1.1", "fd00::101"],
        ),
        pod("c", "api-1", "node-b", "api", &["10.0.2.1"]),
    ]);
    idx.reset_policies(policies());
    idx
}

/// Update `c` from the index and check it against a from-scratch compile.
fn step(c: &mut NodeCompiler, idx: &mut Index, opts: &CompileOptions, what: &str) -> UpdateKind {
    let (snap, changes) = idx.snapshot_with_changes();
    let kind = c.update(snap.clone(), &changes);
    let np = node_policy(&snap, NODE, opts);
    let full = compile(&np, opts);
    assert_eq!(
        c.node_policy(),
        &np,
        "{what}: node policy differs from a full resolve"
    );
    if c.ruleset() != &full {
        panic!(
            "{what}: ruleset differs from a full compile\n--- incremental\n{}\n--- full\n{}",
            render(c.ruleset(), ""),
            render(&full, "")
        );
    }
    kind
}

fn set_with<'a>(c: &'a NodeCompiler, comment_part: &str, name_prefix: &str) -> Vec<&'a str> {
    c.ruleset()
        .sets
        .iter()
        .find(|s| s.name.starts_with(name_prefix) && s.comment.contains(comment_part))
        .map(|s| s.elements.iter().map(|e| e.as_str()).collect())
        .unwrap_or_else(|| panic!("no {name_prefix} set about {comment_part}"))
}

struct Case {
    name: &'static str,
    change: fn(&mut Index),
    kind: UpdateKind,
    /// (set name prefix, comment fragment, expected elements)
    expect: &'static [(&'static str, &'static str, &'static [&'static str])],
}

const CLIENTS: &str = "pods app=client";

#[test]
fn named_cases() {
    let cases = [
        Case {
            name: "remote pod joins a peer set",
            change: |idx| {
                idx.apply_pod(pod("a", "client-2", "node-b", "client", &["10.0.1.2"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[("peers-v4", CLIENTS, &["10.0.1.1", "10.0.1.2"])],
        },
        Case {
            name: "remote pod leaves by relabel",
            change: |idx| {
                idx.apply_pod(pod(
                    "b",
                    "client-1",
                    "node-b",
                    "other",
                    &["10.0.1.1", "fd00::101"],
                ));
            },
            kind: UpdateKind::Incremental,
            expect: &[("peers-v4", CLIENTS, &[]), ("peers-v6", CLIENTS, &[])],
        },
        Case {
            name: "remote pod in a namespace the selector rejects changes nothing",
            change: |idx| {
                idx.apply_pod(pod("c", "client-9", "node-b", "client", &["10.0.3.9"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[("peers-v4", CLIENTS, &["10.0.1.1"])],
        },
        Case {
            name: "address shared by two members stays while one remains",
            change: |idx| {
                idx.apply_pod(pod("b", "client-2", "node-b", "client", &["10.0.1.1"]));
                idx.delete_pod(&ObjectKey::new("b", "client-1"));
            },
            kind: UpdateKind::Incremental,
            expect: &[
                ("peers-v4", CLIENTS, &["10.0.1.1"]),
                ("peers-v6", CLIENTS, &[]),
            ],
        },
        Case {
            name: "remote pod's address changes",
            change: |idx| {
                idx.apply_pod(pod(
                    "b",
                    "client-1",
                    "node-b",
                    "client",
                    &["10.0.1.7", "fd00::101"],
                ));
            },
            kind: UpdateKind::Incremental,
            expect: &[
                ("peers-v4", CLIENTS, &["10.0.1.7"]),
                ("peers-v6", CLIENTS, &["fd00::101"]),
            ],
        },
        Case {
            name: "remote pod declaring a named port joins an egress named set",
            change: |idx| {
                idx.apply_pod(pod("b", "api-2", "node-b", "api", &["10.0.2.2"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[(
                "named-v4",
                "named ports http",
                &["10.0.2.1 . tcp . 8080", "10.0.2.2 . tcp . 8080"],
            )],
        },
        Case {
            name: "remote pod's named port moves",
            change: |idx| {
                let mut p = pod("c", "api-1", "node-b", "api", &["10.0.2.1"]);
                p.named_ports[0].port = 9090;
                idx.apply_pod(p);
            },
            kind: UpdateKind::Incremental,
            expect: &[("named-v4", "named ports http", &["10.0.2.1 . tcp . 9090"])],
        },
        Case {
            name: "finished remote pod leaves every set",
            change: |idx| {
                let mut p = pod("c", "api-1", "node-b", "api", &["10.0.2.1"]);
                p.finished = true;
                idx.apply_pod(p);
            },
            kind: UpdateKind::Incremental,
            expect: &[("named-v4", "named ports http", &[])],
        },
        Case {
            name: "pod on this node joins a peer set",
            change: |idx| {
                idx.apply_pod(pod("b", "client-3", NODE, "client", &["10.0.1.3"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[("peers-v4", CLIENTS, &["10.0.1.1", "10.0.1.3"])],
        },
        Case {
            name: "new pod on this node is isolated by the policy that selects it",
            change: |idx| {
                idx.apply_pod(pod("a", "web-2", NODE, "web", &["10.0.0.2"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[(
                "ingress-v4",
                "isolated for ingress",
                &[
                    "10.0.0.1 : goto ingress/a/web",
                    "10.0.0.2 : goto ingress/a/web-2",
                ],
            )],
        },
        Case {
            name: "pod on this node relabelled out of its only policy",
            change: |idx| {
                idx.apply_pod(pod("a", "web", NODE, "other", &["10.0.0.1", "fd00::1"]));
            },
            kind: UpdateKind::Incremental,
            expect: &[
                ("ingress-v4", "isolated for ingress", &[]),
                ("egress-v6", "isolated for egress", &[]),
            ],
        },
        Case {
            name: "policy deleted: its pod is no longer isolated, its sets go",
            change: |idx| {
                idx.delete_policy(&ObjectKey::new("a", "web"));
            },
            kind: UpdateKind::Incremental,
            expect: &[
                ("ingress-v4", "isolated for ingress", &[]),
                ("egress-v6", "isolated for egress", &[]),
            ],
        },
        Case {
            name: "policy added with a new pod: the pod it selects is isolated",
            change: |idx| {
                idx.apply_pod(pod("a", "db-1", NODE, "db", &["10.0.0.3"]));
                let mut p = policies().remove(0);
                p.key = ObjectKey::new("a", "db");
                p.pod_selector = sel(&[("app", "db")]);
                p.egress = None;
                idx.apply_policy(p);
            },
            kind: UpdateKind::Incremental,
            expect: &[(
                "ingress-v4",
                "isolated for ingress",
                &[
                    "10.0.0.1 : goto ingress/a/web",
                    "10.0.0.3 : goto ingress/a/db-1",
                ],
            )],
        },
        Case {
            name: "namespace relabelled into a peer's namespace selector",
            change: |idx| {
                idx.apply_namespace(namespace("c", "x"));
                idx.apply_pod(pod("c", "client-9", "node-b", "client", &["10.0.2.9"]));
            },
            kind: UpdateKind::Full,
            expect: &[("peers-v4", CLIENTS, &["10.0.1.1", "10.0.2.9"])],
        },
        Case {
            name: "namespace relabelled out of a peer's namespace selector",
            change: |idx| {
                idx.apply_namespace(namespace("b", "y"));
            },
            kind: UpdateKind::Incremental,
            expect: &[("peers-v4", CLIENTS, &[])],
        },
        Case {
            name: "staged policy added: full path, changes no enforcement",
            change: |idx| {
                let mut p = policies().remove(0);
                p.key = ObjectKey::new("a", "web-staged");
                p.staged = true;
                idx.apply_policy(p);
            },
            kind: UpdateKind::Full,
            expect: &[("ingress-v4", "ingress", &["10.0.0.1 : goto ingress/a/web"])],
        },
        Case {
            name: "identical update changes nothing",
            change: |idx| {
                idx.apply_pod(pod(
                    "b",
                    "client-1",
                    "node-b",
                    "client",
                    &["10.0.1.1", "fd00::101"],
                ));
            },
            kind: UpdateKind::Unchanged,
            expect: &[("peers-v4", CLIENTS, &["10.0.1.1"])],
        },
    ];
    for case in cases {
        let mut idx = base_index();
        let opts = CompileOptions::default();
        let mut c = NodeCompiler::new(NODE, opts.clone());
        assert_eq!(
            step(&mut c, &mut idx, &opts, case.name),
            UpdateKind::Full,
            "{}: first build",
            case.name
        );
        (case.change)(&mut idx);
        assert_eq!(
            step(&mut c, &mut idx, &opts, case.name),
            case.kind,
            "{}: update kind",
            case.name
        );
        for (prefix, about, want) in case.expect {
            assert_eq!(
                set_with(&c, about, prefix),
                *want,
                "{}: {prefix} set about {about}",
                case.name
            );
        }
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAMESPACES: &[&str] = &["a", "b", "c", "d"];
const APPS: &[&str] = &["web", "client", "api", "db"];
const NODES: &[&str] = &[NODE, "node-b", "node-c"];

/// A pod with awkward properties drawn at random: few addresses (so they collide), either
/// family or both, named ports that differ between pods, host network, finished.
fn random_pod(r: &mut Rng) -> PodInfo {
    let ns = r.pick(NAMESPACES);
    let name = format!("p{}", r.below(24));
    let mut ips: Vec<IpAddr> = Vec::new();
    if r.below(5) != 0 {
        ips.push(format!("10.0.0.{}", r.below(12)).parse().expect("ip"));
    }
    if r.below(3) == 0 {
        ips.push(format!("fd00::{}", r.below(12)).parse().expect("ip"));
    }
    let mut named_ports = Vec::new();
    if r.below(2) == 0 {
        named_ports.push(NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: [8080, 9090][r.below(2)],
        });
    }
    if r.below(4) == 0 {
        named_ports.push(NamedPort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
        });
    }
    PodInfo {
        key: ObjectKey::new(ns, name),
        node: Some(r.pick(NODES).into()),
        labels: labels(&[("app", r.pick(APPS)), ("tier", r.pick(&["1", "2"]))]),
        ips,
        named_ports,
        host_network: r.below(12) == 0,
        finished: r.below(12) == 0,
    }
}

fn random_policy(r: &mut Rng) -> Policy {
    let ns = r.pick(NAMESPACES);
    let name = format!("np{}", r.below(10));
    let peer = |r: &mut Rng| match r.below(4) {
        0 => Peer::Pods {
            namespaces: NamespaceScope::Own(ns.to_string()),
            pods: sel(&[("app", r.pick(APPS))]),
        },
        1 => Peer::Pods {
            namespaces: NamespaceScope::Selector(sel(&[("team", r.pick(&["x", "y"]))])),
            pods: sel(&[("tier", r.pick(&["1", "2"]))]),
        },
        2 => Peer::Pods {
            namespaces: NamespaceScope::Selector(Selector::everything()),
            pods: Selector::everything(),
        },
        _ => Peer::IpBlock(IpBlock {
            cidr: "10.0.0.0/28".parse().expect("cidr"),
            except: vec!["10.0.0.4/30".parse().expect("cidr")],
        }),
    };
    let ports = |r: &mut Rng| match r.below(4) {
        0 => None,
        1 => Some(vec![tcp(PortMatch::Range(80, 90))]),
        2 => Some(vec![tcp(PortMatch::Named("http".into()))]),
        _ => Some(vec![
            PortSpec {
                protocol: Protocol::Udp,
                port: PortMatch::Named("dns".into()),
            },
            tcp(PortMatch::Range(443, 443)),
        ]),
    };
    let rules = |r: &mut Rng| {
        (0..r.below(3))
            .map(|_| Rule {
                peers: (r.below(4) != 0).then(|| (0..1 + r.below(2)).map(|_| peer(r)).collect()),
                ports: ports(r),
            })
            .collect::<Vec<_>>()
    };
    let ingress = (r.below(3) != 0).then(|| rules(r));
    let egress = (r.below(3) != 0).then(|| rules(r));
    Policy {
        key: ObjectKey::new(ns, name),
        pod_selector: if r.below(4) == 0 {
            Selector::everything()
        } else {
            sel(&[("app", r.pick(APPS))])
        },
        ingress,
        egress,
        invalid: None,
        staged: false,
    }
}

/// A staged policy's life: tried, a pod changes (and changes back) beside it, withdrawn.
/// Every step must agree with a full compile, whichever path it takes (while a staged policy
/// selects a pod of the node every change takes the full path; trying and withdrawing one
/// always does).
fn staged_life(
    c: &mut NodeCompiler,
    idx: &mut Index,
    opts: &CompileOptions,
    r: &mut Rng,
    at: &str,
) {
    let mut p = random_policy(r);
    p.key.name = format!("staged-{}", p.key.name);
    p.staged = true;
    idx.apply_policy(p.clone());
    assert_eq!(
        step(c, idx, opts, &format!("{at}: staged policy tried")),
        UpdateKind::Full
    );
    let pod = random_pod(r);
    let before = idx.snapshot().pods.get(&pod.key).map(|p| PodInfo::clone(p));
    idx.apply_pod(pod.clone());
    step(c, idx, opts, &format!("{at}: pod beside a staged policy"));
    match before {
        Some(old) => {
            idx.apply_pod(old);
        }
        None => {
            idx.delete_pod(&pod.key);
        }
    }
    step(
        c,
        idx,
        opts,
        &format!("{at}: pod back beside a staged policy"),
    );
    idx.delete_policy(&p.key);
    assert_eq!(
        step(c, idx, opts, &format!("{at}: staged policy withdrawn")),
        UpdateKind::Full
    );
}

#[test]
fn random_walk_matches_full_compile() {
    for seed in [1u64, 7, 42, 1234] {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut idx = Index::new();
        idx.reset_namespaces(
            NAMESPACES
                .iter()
                .map(|n| namespace(n, ["x", "y"][n.len() % 2]))
                .collect(),
        );
        idx.reset_pods((0..40).map(|_| random_pod(&mut r)).collect());
        idx.reset_policies((0..8).map(|_| random_policy(&mut r)).collect());
        // Half the walks fail closed in the pods' ranges, so the known-address sets are
        // kept current too (pod addresses collide and move between nodes here).
        let opts = CompileOptions {
            pod_cidrs: if seed % 2 == 0 {
                vec![
                    "10.0.0.0/28".parse().expect("cidr"),
                    "fd00::/64".parse().expect("cidr"),
                ]
            } else {
                Vec::new()
            },
            ..CompileOptions::default()
        };
        let mut c = NodeCompiler::new(NODE, opts.clone());
        step(&mut c, &mut idx, &opts, &format!("seed {seed}: initial"));
        let mut incremental = 0;
        let mut incremental_policies = 0;
        let mut incremental_namespaces = 0;
        // Staged policies come from their own generator, and each one's life leaves the state
        // as it found it, so the walk below is the same walk with or without them.
        let mut staged_rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
        for i in 0..900 {
            if staged_rng.below(15) == 0 {
                staged_life(
                    &mut c,
                    &mut idx,
                    &opts,
                    &mut staged_rng,
                    &format!("seed {seed} step {i}"),
                );
            }
            let what = match r.below(26) {
                0 | 20 => {
                    idx.apply_policy(random_policy(&mut r));
                    "policy applied"
                }
                21 => {
                    let p = random_policy(&mut r);
                    idx.delete_policy(&p.key);
                    "policy deleted"
                }
                22 => {
                    // GitOps: many policies at once, some replaced, some gone.
                    for _ in 0..4 {
                        idx.apply_policy(random_policy(&mut r));
                    }
                    let p = random_policy(&mut r);
                    idx.delete_policy(&p.key);
                    "burst of policies"
                }
                23 => {
                    idx.apply_policy(random_policy(&mut r));
                    idx.apply_pod(random_pod(&mut r));
                    "policy and pod together"
                }
                1 | 24 => {
                    let ns = r.pick(NAMESPACES);
                    idx.apply_namespace(namespace(ns, r.pick(&["x", "y"])));
                    "namespace relabelled"
                }
                25 => {
                    // An unknown namespace is seen with its name label only.
                    idx.delete_namespace(r.pick(NAMESPACES));
                    "namespace deleted"
                }
                2..=5 => {
                    let p = random_pod(&mut r);
                    idx.delete_pod(&p.key);
                    "pod deleted"
                }
                6 => {
                    // A burst: several pods at once, as a rollout gives.
                    for _ in 0..5 {
                        idx.apply_pod(random_pod(&mut r));
                    }
                    "burst of pods"
                }
                _ => {
                    idx.apply_pod(random_pod(&mut r));
                    "pod applied"
                }
            };
            if step(
                &mut c,
                &mut idx,
                &opts,
                &format!("seed {seed} step {i}: {what}"),
            ) == UpdateKind::Incremental
            {
                incremental += 1;
                if what.contains("polic") {
                    incremental_policies += 1;
                }
                if what.contains("namespace") {
                    incremental_namespaces += 1;
                }
            }
        }
        // The walk must exercise the fast paths, or it proves nothing about them.
        assert!(
            incremental > 200,
            "seed {seed}: only {incremental} incremental updates"
        );
        assert!(
            incremental_policies > 60,
            "seed {seed}: only {incremental_policies} incremental policy changes"
        );
        assert!(
            incremental_namespaces > 30,
            "seed {seed}: only {incremental_namespaces} incremental namespace changes"
        );
    }
}

fn random_cnp(r: &mut Rng) -> ClusterPolicy {
    let peer = |r: &mut Rng| match r.below(5) {
        0 => CnpPeer::Namespaces(sel(&[("team", r.pick(&["x", "y"]))])),
        1 => CnpPeer::Pods {
            namespaces: Selector::everything(),
            pods: sel(&[("app", r.pick(APPS))]),
        },
        2 => CnpPeer::Pods {
            namespaces: sel(&[("team", r.pick(&["x", "y"]))]),
            pods: sel(&[("tier", r.pick(&["1", "2"]))]),
        },
        3 => CnpPeer::Networks(vec!["10.0.0.0/29".parse().expect("cidr")]),
        _ => CnpPeer::Namespaces(Selector::everything()),
    };
    let ports = |r: &mut Rng, egress: bool| match r.below(4) {
        0 | 1 => None,
        2 => Some(vec![CnpPort::Ports(Protocol::Tcp, 80, 90)]),
        // Egress named ports force the full path; keep them rare there.
        _ if egress && r.below(4) != 0 => Some(vec![CnpPort::Ports(Protocol::Udp, 53, 53)]),
        _ => Some(vec![CnpPort::Named("http".into())]),
    };
    let rules = |r: &mut Rng, egress: bool| {
        (0..r.below(3))
            .map(|index| {
                let mut peers: Vec<CnpPeer> = (0..1 + r.below(2)).map(|_| peer(r)).collect();
                let ports = ports(r, egress);
                if !egress || matches!(ports.as_deref(), Some([CnpPort::Named(_)])) {
                    // Ingress has pod peers only; named ports go with pod peers only.
                    peers.retain(|p| !matches!(p, CnpPeer::Networks(_)));
                    if peers.is_empty() {
                        peers.push(CnpPeer::Namespaces(Selector::everything()));
                    }
                }
                CnpRule {
                    index,
                    name: format!("r{index}"),
                    action: [Action::Accept, Action::Deny, Action::Pass][r.below(3)],
                    matches: RuleMatch::Peers { peers, ports },
                }
            })
            .collect::<Vec<_>>()
    };
    ClusterPolicy {
        name: format!("cnp{}", r.below(6)),
        tier: [Tier::Admin, Tier::Baseline][r.below(2)],
        priority: [1, 5, 5, 9][r.below(4)],
        subject: if r.below(2) == 0 {
            Subject::Namespaces(sel(&[("team", r.pick(&["x", "y"]))]))
        } else {
            Subject::Pods {
                namespaces: Selector::everything(),
                pods: sel(&[("app", r.pick(APPS))]),
            }
        },
        ingress: rules(r, false),
        egress: rules(r, true),
        problems: vec![],
        staged: false,
    }
}

/// Staged ClusterNetworkPolicies among the random ones: measured through the mark field,
/// they take the full path while one concerns a local pod (and for a change that could make
/// one do so); every step must still agree with a full compile, and the other steps stay
/// incremental.
#[test]
fn random_walk_with_staged_cluster_network_policies_matches_full_compile() {
    for seed in [5u64, 23] {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let staged_cnp = |r: &mut Rng| {
            let mut c = random_cnp(r);
            c.staged = r.below(3) == 0;
            c
        };
        let mut idx = Index::new();
        idx.reset_namespaces(NAMESPACES.iter().map(|n| namespace(n, "x")).collect());
        idx.reset_pods((0..12).map(|_| random_pod(&mut r)).collect());
        idx.reset_policies((0..4).map(|_| random_policy(&mut r)).collect());
        idx.reset_cnps((0..4).map(|_| staged_cnp(&mut r)).collect());
        let opts = CompileOptions::default();
        let mut c = NodeCompiler::new(NODE, opts.clone());
        step(&mut c, &mut idx, &opts, &format!("seed {seed}: initial"));
        let (mut incremental, mut with_staged) = (0, 0);
        for i in 0..300 {
            let what = match r.below(10) {
                0 | 1 => {
                    idx.apply_cnp(staged_cnp(&mut r));
                    "cluster network policy applied"
                }
                2 => {
                    idx.delete_cnp(&format!("cnp{}", r.below(6)));
                    "cluster network policy deleted"
                }
                3 => {
                    let ns = r.pick(NAMESPACES);
                    idx.apply_namespace(namespace(ns, r.pick(&["x", "y"])));
                    "namespace relabelled"
                }
                4 => {
                    let mut p = random_pod(&mut r);
                    p.node = Some(NODE.into());
                    idx.apply_pod(p);
                    "local pod applied"
                }
                5 => {
                    idx.apply_policy(random_policy(&mut r));
                    "policy applied"
                }
                _ => {
                    idx.apply_pod(random_pod(&mut r));
                    "pod applied"
                }
            };
            if step(
                &mut c,
                &mut idx,
                &opts,
                &format!("seed {seed} step {i}: {what}"),
            ) == UpdateKind::Incremental
            {
                incremental += 1;
            }
            if !c.node_policy().staged_cnps.is_empty() {
                with_staged += 1;
            }
        }
        assert!(
            with_staged > 50,
            "seed {seed}: staged ClusterNetworkPolicies rarely concerned the node ({with_staged})"
        );
        assert!(
            with_staged < 300,
            "seed {seed}: never without a staged ClusterNetworkPolicy"
        );
        assert!(
            incremental > 20,
            "seed {seed}: only {incremental} incremental updates"
        );
    }
}

#[test]
fn random_walk_with_cluster_network_policies_matches_full_compile() {
    for seed in [3u64, 11, 99] {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut idx = Index::new();
        idx.reset_namespaces(
            NAMESPACES
                .iter()
                .map(|n| namespace(n, ["x", "y"][n.len() % 2]))
                .collect(),
        );
        idx.reset_pods((0..40).map(|_| random_pod(&mut r)).collect());
        idx.reset_policies((0..6).map(|_| random_policy(&mut r)).collect());
        idx.reset_cnps((0..5).map(|_| random_cnp(&mut r)).collect());
        // One walk also fails closed in the pods' ranges.
        let opts = CompileOptions {
            pod_cidrs: if seed == 11 {
                vec![
                    "10.0.0.0/28".parse().expect("cidr"),
                    "fd00::/64".parse().expect("cidr"),
                ]
            } else {
                Vec::new()
            },
            ..CompileOptions::default()
        };
        let mut c = NodeCompiler::new(NODE, opts.clone());
        step(&mut c, &mut idx, &opts, &format!("seed {seed}: initial"));
        let mut incremental = 0;
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for i in 0..700 {
            let what = match r.below(24) {
                20 => {
                    let ns = r.pick(NAMESPACES);
                    idx.apply_namespace(namespace(ns, r.pick(&["x", "y"])));
                    "namespace relabelled"
                }
                21 => {
                    let p = random_policy(&mut r);
                    idx.delete_policy(&p.key);
                    "policy deleted"
                }
                22 => {
                    for _ in 0..3 {
                        idx.apply_cnp(random_cnp(&mut r));
                    }
                    idx.apply_policy(random_policy(&mut r));
                    "burst of cluster network policies and a policy"
                }
                23 => {
                    // A pod of this node: its tiers are redone in place.
                    let mut p = random_pod(&mut r);
                    p.node = Some(NODE.into());
                    idx.apply_pod(p);
                    "local pod applied"
                }
                0 => {
                    idx.apply_cnp(random_cnp(&mut r));
                    "cluster network policy applied"
                }
                1 => {
                    let name = format!("cnp{}", r.below(6));
                    idx.delete_cnp(&name);
                    "cluster network policy deleted"
                }
                2 => {
                    idx.apply_policy(random_policy(&mut r));
                    "policy applied"
                }
                3..=5 => {
                    let p = random_pod(&mut r);
                    idx.delete_pod(&p.key);
                    "pod deleted"
                }
                _ => {
                    idx.apply_pod(random_pod(&mut r));
                    "pod applied"
                }
            };
            if step(
                &mut c,
                &mut idx,
                &opts,
                &format!("seed {seed} step {i}: {what}"),
            ) == UpdateKind::Incremental
            {
                incremental += 1;
                *by_kind.entry(what).or_default() += 1;
            }
        }
        assert!(
            incremental > 250,
            "seed {seed}: only {incremental} incremental updates ({by_kind:?})"
        );
        // Every kind of change must take the fast path often, or the walk proves nothing
        // about it.
        for kind in [
            "cluster network policy applied",
            "cluster network policy deleted",
            "policy applied",
            "namespace relabelled",
            "local pod applied",
        ] {
            assert!(
                by_kind.get(kind).copied().unwrap_or_default() > 5,
                "seed {seed}: {kind} was rarely incremental ({by_kind:?})"
            );
        }
    }
}

/// Regression: in one batch, a member of a peer is deleted while a pod that shares its address
/// (not a member before) joins the peer with a new address. The first edit must not keep the
/// old address because the second pod, not edited yet, is a member now: it no longer holds it.
#[test]
fn shared_address_left_by_a_pod_that_joins_elsewhere_in_the_same_batch() {
    let mut idx = base_index();
    let opts = CompileOptions::default();
    let mut c = NodeCompiler::new(NODE, opts.clone());
    step(&mut c, &mut idx, &opts, "first build");
    idx.apply_pod(pod("b", "zz-other", "node-b", "other", &["10.0.1.1"]));
    step(
        &mut c,
        &mut idx,
        &opts,
        "a non-member shares client-1's address",
    );
    idx.delete_pod(&ObjectKey::new("b", "client-1"));
    idx.apply_pod(pod("b", "zz-other", "node-b", "client", &["10.0.1.9"]));
    assert_eq!(
        step(&mut c, &mut idx, &opts, "delete and join in one batch"),
        UpdateKind::Incremental
    );
    assert_eq!(set_with(&c, CLIENTS, "peers-v4"), vec!["10.0.1.9"]);
}
