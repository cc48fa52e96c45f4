//! CPU cost of the pure core at the scale targets, for one node of a generated cluster:
//! resolve, compile, render, a partial transaction, and incremental updates after one pod
//! changes — at 1/10, 1× and 10× of the 10,000-pod / 1,000-policy target.
//!
//! Run: `cargo bench --bench scale` (`SCALES=1` for the target size only). Figures are
//! recorded in docs/benchmarks.md.

/// The allocator the agent runs with (`src/main.rs`), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "support/synthetic.rs"]
mod synthetic;
#[path = "support/toggle.rs"]
mod toggle;

use toggle::{peer_matches, toggle, with_port};

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::incremental::{NodeCompiler, UpdateKind};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::resolve::ResolvedPeer;
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::engine::ruleset::render;
use kube_nftpolicy::kernel::nft::transaction;
use kube_nftpolicy::model::{Labels, NamespaceScope, PodInfo, Policy};

const NODE: &str = "node-7";

/// Time `iters` incremental updates that alternate between applying `changed` and restoring
/// `original` (so the state never drifts), each followed by the partial transaction the
/// dataplane would send. The previous ruleset is copied outside the timed part.
fn toggle_pod(
    idx: &mut Index,
    nc: &mut NodeCompiler,
    original: Option<&PodInfo>,
    changed: &PodInfo,
    expect: UpdateKind,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let before = nc.ruleset().clone();
        let applied = idx.snapshot().pods.get(&changed.key).map(|p| &**p) == Some(changed);
        if !applied {
            idx.apply_pod(changed.clone());
        } else {
            match original {
                Some(p) => idx.apply_pod(p.clone()),
                None => idx.delete_pod(&changed.key),
            };
        }
        let t = Instant::now();
        let (snap, changes) = idx.snapshot_with_changes();
        let kind = nc.update(snap, &changes);
        let tx = transaction::partial(&before, nc.ruleset(), &BTreeSet::new());
        total += t.elapsed();
        assert_eq!(kind, expect, "update path");
        assert!(
            tx.element_changes + tx.chains_written > 0,
            "the change must reach this node"
        );
        black_box(tx);
    }
    total
}

fn bench_scale(c: &mut Criterion, label: &str, s: &synthetic::Scale) {
    let mut idx = synthetic::index(s);
    let snap = idx.snapshot();
    let np = resolve(&snap, NODE);
    let rs = compile(&np, &CompileOptions::default());
    eprintln!(
        "{label}: {NODE} has {} isolated local pods, {} policy chains, {} chains, {} sets, {} set elements, script {} bytes",
        np.pods.len(),
        np.policies.len(),
        rs.chains.len(),
        rs.sets.len(),
        rs.element_count(),
        render(&rs, "").len()
    );

    let mut g = c.benchmark_group(label);
    g.sample_size(if s.pods > 20_000 { 10 } else { 20 });
    g.bench_function("snapshot", |b| b.iter(|| black_box(idx.snapshot())));
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

    // One pod elsewhere changes labels: a full recompute, then the partial transaction.
    let mut relabelled = synthetic::index(s);
    relabelled.apply_pod(synthetic::pod(12, s, 3));
    let rs2 = compile(
        &resolve(&relabelled.snapshot(), NODE),
        &CompileOptions::default(),
    );
    g.bench_function("partial transaction (diff of two rulesets)", |b| {
        b.iter(|| black_box(transaction::partial(&rs, &rs2, &BTreeSet::new())))
    });
    g.bench_function(
        "full recompute after a change: snapshot+resolve+compile+diff",
        |b| {
            b.iter(|| {
                let np = resolve(&relabelled.snapshot(), NODE);
                let rs2 = compile(&np, &CompileOptions::default());
                black_box(transaction::partial(&rs, &rs2, &BTreeSet::new()))
            })
        },
    );

    // Incremental updates: the agent's path. Each includes the snapshot, the update and the
    // partial transaction.
    let mut nc = NodeCompiler::new(NODE, CompileOptions::default());
    let (snap0, ch0) = idx.snapshot_with_changes();
    assert_eq!(nc.update(snap0, &ch0), UpdateKind::Full);
    // A remote pod whose new `tier` (or `app`) moves it between peer sets this node uses
    // (found by looking, so the change is one that reaches this node at every scale).
    let snap_now = idx.snapshot();
    let relabelled = |p: &PodInfo, key: &str| {
        let mut q = p.clone();
        let v = q.labels.get(key).unwrap_or_default().to_string();
        let next = match key {
            "tier" if v == "t0" => "t1".to_string(),
            "tier" => "t0".to_string(),
            _ => format!("{v}-x"),
        };
        q.labels.insert(key, next);
        q
    };
    let relabel = (0..s.pods)
        .map(|i| synthetic::pod(i, s, 0))
        .filter(|p| p.node.as_deref() != Some(NODE))
        .flat_map(|p| ["tier", "app"].map(|k| (p.clone(), relabelled(&p, k))))
        .find(|(p, q)| {
            peer_matches(nc.node_policy(), &snap_now, p)
                != peer_matches(nc.node_policy(), &snap_now, q)
        });
    match &relabel {
        Some((original, relabel)) => {
            g.bench_function("incremental: one remote pod relabelled", |b| {
                b.iter_custom(|n| {
                    toggle_pod(
                        &mut idx,
                        &mut nc,
                        Some(original),
                        relabel,
                        UpdateKind::Incremental,
                        n,
                    )
                })
            });
        }
        // At 10x this node's pod peers are whole namespaces (label-blind): no relabel reaches it.
        None => eprintln!("{label}: no remote relabel changes this node's peer sets; skipped"),
    }
    let added = (s.pods..2 * s.pods)
        .map(|i| synthetic::pod(i, s, 0))
        .find(|p| {
            p.node.as_deref() != Some(NODE)
                && !peer_matches(nc.node_policy(), &snap_now, p).is_empty()
        })
        .expect("some new remote pod is a peer of this node");
    g.bench_function("incremental: one remote pod added", |b| {
        b.iter_custom(|n| toggle_pod(&mut idx, &mut nc, None, &added, UpdateKind::Incremental, n))
    });
    let local_index = s.pods + (7 + s.nodes - s.pods % s.nodes) % s.nodes;
    let local = synthetic::pod(local_index, s, 0); // a new pod on node-7 itself
    assert_eq!(local.node.as_deref(), Some(NODE));
    g.bench_function("incremental: one local pod added", |b| {
        b.iter_custom(|n| toggle_pod(&mut idx, &mut nc, None, &local, UpdateKind::Incremental, n))
    });

    // A policy that selects pods of this node gets one more port.
    let snap_now = idx.snapshot();
    let target = nc
        .node_policy()
        .policies
        .first()
        .map(|p| p.policy.clone())
        .expect("a policy selects a pod of this node");
    let original = (**snap_now.policies.get(&target).expect("policy")).clone();
    let edited = with_port(&original, 9_999);
    g.bench_function("incremental: one policy changed", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    i.apply_policy(edited.clone());
                },
                &|i: &mut Index| {
                    i.apply_policy(original.clone());
                },
                n,
            )
        })
    });

    // A burst of 100 policies changed at once (every tenth of the cluster's, so some select
    // this node's pods and most do not).
    let originals: Vec<Policy> = snap_now
        .policies
        .iter()
        .map(|(_, p)| (**p).clone())
        .step_by((s.policies / 100).max(1))
        .take(100)
        .collect();
    let edits: Vec<Policy> = originals.iter().map(|p| with_port(p, 9_999)).collect();
    g.bench_function("incremental: a burst of 100 policies changed", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    for p in &edits {
                        i.apply_policy(p.clone());
                    }
                },
                &|i: &mut Index| {
                    for p in &originals {
                        i.apply_policy(p.clone());
                    }
                },
                n,
            )
        })
    });

    // A namespace moves between environments, in or out of the selectors spanning every
    // `prod` namespace (the first one whose move reaches this node).
    let flips = |before: &Labels, after: &Labels| {
        nc.node_policy()
            .policies
            .iter()
            .flat_map(|p| &p.rules)
            .filter_map(|r| r.peers.as_ref())
            .flatten()
            .any(|peer| match peer {
                ResolvedPeer::Pods(pp) => match &pp.scope {
                    NamespaceScope::Selector(sel) => sel.matches(before) != sel.matches(after),
                    NamespaceScope::Own(_) => false,
                },
                ResolvedPeer::IpBlock { .. } => false,
            })
    };
    let relabel = (0..s.namespaces)
        .map(synthetic::namespace)
        .map(|ns| {
            let mut moved = ns.clone();
            let env = if ns.labels.get("env") == Some("prod") {
                "staging"
            } else {
                "prod"
            };
            moved.labels.insert("env", env);
            (ns, moved)
        })
        .find(|(ns, moved)| flips(&ns.labels, &moved.labels))
        .expect("some namespace relabel reaches this node");
    g.bench_function("incremental: one namespace relabelled", |b| {
        b.iter_custom(|n| {
            toggle(
                &mut idx,
                &mut nc,
                &|i: &mut Index| {
                    i.apply_namespace(relabel.1.clone());
                },
                &|i: &mut Index| {
                    i.apply_namespace(relabel.0.clone());
                },
                n,
            )
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let only_target = std::env::var("SCALES").is_ok_and(|v| v == "1");
    bench_scale(c, "1x: 10k pods, 1k policies", &synthetic::TARGET);
    if only_target {
        return;
    }
    bench_scale(c, "0.1x: 1k pods, 100 policies", &synthetic::TENTH);
    bench_scale(c, "10x: 100k pods, 10k policies", &synthetic::TEN_TIMES);
}

criterion_group!(benches, bench);
criterion_main!(benches);
