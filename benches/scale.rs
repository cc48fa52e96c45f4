//! CPU cost of the pure core at the scale targets: resolve, compile, render, and building a
//! partial transaction, for one node of a 10,000-pod / 1,000-policy cluster.
//!
//! Run: `cargo bench --bench scale`. Figures are recorded in docs/benchmarks.md.

#[path = "support/synthetic.rs"]
mod synthetic;

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kube_nftpolicy::compile::{CompileOptions, compile};
use kube_nftpolicy::nft::transaction;
use kube_nftpolicy::resolve::resolve;
use kube_nftpolicy::ruleset::render;

fn bench(c: &mut Criterion) {
    let s = synthetic::TARGET;
    let idx = synthetic::index(&s);
    let snap = idx.snapshot();
    let np = resolve(&snap, "node-7");
    let rs = compile(&np, &CompileOptions::default());
    eprintln!(
        "node-7: {} isolated local pods, {} policy chains, {} chains, {} sets, {} set elements, script {} bytes",
        np.pods.len(),
        np.policies.len(),
        rs.chains.len(),
        rs.sets.len(),
        rs.element_count(),
        render(&rs, "").len()
    );

    let mut g = c.benchmark_group("10k-pods-1k-policies");
    g.sample_size(20);
    g.bench_function("snapshot", |b| b.iter(|| black_box(idx.snapshot())));
    g.bench_function("resolve one node", |b| {
        b.iter(|| black_box(resolve(&snap, "node-7")))
    });
    g.bench_function("compile one node", |b| {
        b.iter(|| black_box(compile(&np, &CompileOptions::default())))
    });
    g.bench_function("render one node", |b| b.iter(|| black_box(render(&rs, ""))));

    // One pod elsewhere changes labels: every node's peer sets may change.
    let mut idx2 = synthetic::index(&s);
    idx2.apply_pod(synthetic::pod(12, &s, 3));
    let rs2 = compile(
        &resolve(&idx2.snapshot(), "node-7"),
        &CompileOptions::default(),
    );
    let t = transaction::partial(&rs, &rs2, &BTreeSet::new());
    eprintln!(
        "partial transaction for one remote label change: {} bytes, {} element changes",
        t.script.len(),
        t.element_changes
    );
    g.bench_function("partial transaction (one remote pod relabelled)", |b| {
        b.iter(|| black_box(transaction::partial(&rs, &rs2, &BTreeSet::new())))
    });
    g.bench_function("full pipeline: snapshot+resolve+compile+diff", |b| {
        b.iter(|| {
            let np = resolve(&idx2.snapshot(), "node-7");
            let rs2 = compile(&np, &CompileOptions::default());
            black_box(transaction::partial(&rs, &rs2, &BTreeSet::new()))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
