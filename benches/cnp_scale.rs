//! ClusterNetworkPolicy at the scale target: 10,000 pods, 1,000 NetworkPolicies and 200
//! ClusterNetworkPolicies (Admin and Baseline, subjects by namespace label or by app, peers
//! by namespace, pods and networks, ports and named ports), for one node.
//!
//! Measures the full resolve + compile + render, and the incremental update (with the partial
//! transaction) after a remote pod changes. It also prints how many rules a new connection of
//! a local pod can pass through as non-selecting ClusterNetworkPolicies are added (0, 200,
//! 2,000): the dispatch map sends a packet to its own pod's chains only, so the count must
//! not move.
//!
//! Run: `cargo bench --bench cnp_scale`. Figures are in docs/benchmarks.md.

/// The allocator the agent runs with (`src/main.rs`), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/synthetic.rs"]
mod synthetic;
#[path = "support/toggle.rs"]
mod toggle;

use toggle::toggle;

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::incremental::{NodeCompiler, UpdateKind};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::engine::ruleset::{Ruleset, render};
use kube_nftpolicy::model::policy::Protocol;
use kube_nftpolicy::model::{
    Action, ClusterPolicy, CnpPeer, CnpPort, CnpRule, Labels, RuleMatch, Selector, Subject, Tier,
};

const NODE: &str = "node-7";

fn sel(k: &str, v: String) -> Selector {
    Selector {
        match_labels: Labels::from([(k.to_string(), v)]),
        expressions: vec![],
    }
}

/// ClusterNetworkPolicy `k` of the model; `salt` > 0 makes one that selects no pod.
fn cnp(k: usize, salt: usize) -> ClusterPolicy {
    let subject = if salt > 0 {
        Subject::Namespaces(sel("team", format!("nobody-{salt}-{k}")))
    } else if k % 2 == 0 {
        Subject::Namespaces(sel("team", format!("team-{}", k % 10)))
    } else {
        Subject::Pods {
            namespaces: Selector::everything(),
            pods: sel("app", format!("app-{}", k % 10)),
        }
    };
    let rule =
        |index: usize, action: Action, peers: Vec<CnpPeer>, ports: Option<Vec<CnpPort>>| CnpRule {
            index,
            name: format!("rule-{index}"),
            action,
            matches: RuleMatch::Peers { peers, ports },
        };
    let ingress = vec![
        rule(
            0,
            Action::Pass,
            vec![CnpPeer::Namespaces(sel(
                "team",
                format!("team-{}", (k + 1) % 10),
            ))],
            Some(vec![CnpPort::Ports(Protocol::Tcp, 80, 80)]),
        ),
        rule(
            1,
            Action::Accept,
            vec![CnpPeer::Pods {
                namespaces: Selector::everything(),
                pods: sel("app", format!("app-{}", (k + 3) % 10)),
            }],
            Some(vec![CnpPort::Named("http".into())]),
        ),
        rule(
            2,
            Action::Deny,
            vec![CnpPeer::Namespaces(sel(
                "team",
                format!("team-{}", (k + 5) % 10),
            ))],
            None,
        ),
    ];
    let egress = vec![
        rule(
            0,
            Action::Deny,
            vec![CnpPeer::Networks(vec![
                format!("192.0.2.{}/32", k % 250).parse().expect("cidr"),
            ])],
            None,
        ),
        rule(
            1,
            Action::Accept,
            vec![CnpPeer::Namespaces(sel(
                "team",
                format!("team-{}", (k + 7) % 10),
            ))],
            Some(vec![
                CnpPort::Ports(Protocol::Udp, 53, 53),
                CnpPort::Ports(Protocol::Tcp, 8000, 8999),
            ]),
        ),
    ];
    ClusterPolicy {
        name: format!("cnp-{salt}-{k}"),
        tier: if k % 3 == 0 {
            Tier::Baseline
        } else {
            Tier::Admin
        },
        priority: (k % 50) as u16,
        subject,
        ingress,
        egress,
        problems: vec![],
        staged: false,
    }
}

fn model(extra_non_selecting: usize) -> Index {
    let mut idx = synthetic::index(&synthetic::TARGET);
    let mut cnps: Vec<ClusterPolicy> = (0..200).map(|k| cnp(k, 0)).collect();
    cnps.extend((0..extra_non_selecting).map(|k| cnp(k, 1)));
    idx.reset_cnps(cnps);
    idx
}

/// The rules a new connection of `pod` in `direction` can meet: its pod chain, the tier
/// chains it jumps to, and the chains those jump or go to (each counted once).
fn rules_on_path(rs: &Ruleset, start: &str) -> usize {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.to_string()];
    let mut rules = 0;
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(chain) = rs.chain(&name) else {
            continue;
        };
        rules += chain.rules.len();
        for r in &chain.rules {
            for verb in ["jump ", "goto "] {
                if let Some(at) = r.find(verb) {
                    let target = r[at + verb.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default();
                    todo.push(target.to_string());
                }
            }
        }
    }
    rules
}

fn bench(c: &mut Criterion) {
    let mut idx = model(0);
    let snap = idx.snapshot();
    let np = resolve(&snap, NODE);
    let rs = compile(&np, &CompileOptions::default());
    eprintln!(
        "cnp_scale: {NODE}: {} local pods with chains, {} NetworkPolicy chains, {} ClusterNetworkPolicy chains, {} chains, {} sets, {} elements, script {} bytes",
        np.pods.len(),
        np.policies.len(),
        np.cnps.len(),
        rs.chains.len(),
        rs.sets.len(),
        rs.element_count(),
        render(&rs, "").len()
    );
    // New-connection cost against non-selecting ClusterNetworkPolicies.
    let probe_pod = np.pods.first().expect("a local pod").key.clone();
    for extra in [0, 200, 2_000] {
        let snap = model(extra).snapshot();
        let rs = compile(&resolve(&snap, NODE), &CompileOptions::default());
        let ingress = rules_on_path(
            &rs,
            &kube_nftpolicy::engine::compile::pod_chain_name(
                kube_nftpolicy::model::policy::Direction::Ingress,
                &probe_pod,
            ),
        );
        let egress = rules_on_path(
            &rs,
            &kube_nftpolicy::engine::compile::pod_chain_name(
                kube_nftpolicy::model::policy::Direction::Egress,
                &probe_pod,
            ),
        );
        eprintln!(
            "cnp_scale: {} non-selecting ClusterNetworkPolicies: {} chains in the table; a new connection of {probe_pod} meets at most {ingress} rules (ingress) / {egress} (egress) after the dispatch map",
            extra,
            rs.chains.len()
        );
    }

    let mut g = c.benchmark_group("cnp 10k pods / 1k NP / 200 CNP");
    g.sample_size(20);
    g.bench_function("resolve", |b| b.iter(|| black_box(resolve(&snap, NODE))));
    g.bench_function("compile", |b| {
        b.iter(|| black_box(compile(&np, &CompileOptions::default())))
    });
    g.bench_function("render", |b| b.iter(|| black_box(render(&rs, ""))));
    g.bench_function("full: resolve+compile+render", |b| {
        b.iter(|| {
            let np = resolve(&snap, NODE);
            black_box(render(&compile(&np, &CompileOptions::default()), ""))
        })
    });

    let mut nc = NodeCompiler::new(NODE, CompileOptions::default());
    let (s0, ch0) = idx.snapshot_with_changes();
    assert_eq!(nc.update(s0, &ch0), UpdateKind::Full);
    let s = &synthetic::TARGET;
    let added = (s.pods..2 * s.pods)
        .map(|i| synthetic::pod(i, s, 0))
        .find(|p| p.node.as_deref() != Some(NODE))
        .expect("a remote pod");
    g.bench_function("incremental: one remote pod added or removed", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    i.apply_pod(added.clone());
                },
                &|i: &mut Index| {
                    i.delete_pod(&added.key);
                },
                n,
            )
        })
    });
    // A new pod on this node: it joins the tiers of the ClusterNetworkPolicies whose subject
    // takes it in, and its NetworkPolicies.
    let local = (s.pods..2 * s.pods)
        .map(|i| synthetic::pod(i, s, 0))
        .find(|p| p.node.as_deref() == Some(NODE))
        .expect("a local pod");
    g.bench_function("incremental: one local pod added or removed", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    i.apply_pod(local.clone());
                },
                &|i: &mut Index| {
                    i.delete_pod(&local.key);
                },
                n,
            )
        })
    });
    // A ClusterNetworkPolicy that applies here gets another port on its egress Accept rule.
    let original = cnp(0, 0);
    let mut edited = original.clone();
    if let Some(RuleMatch::Peers {
        ports: Some(ports), ..
    }) = edited.egress.get_mut(1).map(|r| &mut r.matches)
    {
        ports.push(CnpPort::Ports(Protocol::Tcp, 9_999, 9_999));
    }
    g.bench_function("incremental: one ClusterNetworkPolicy changed", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    i.apply_cnp(edited.clone());
                },
                &|i: &mut Index| {
                    i.apply_cnp(original.clone());
                },
                n,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
