//! Timing an incremental update the way the agent makes one: a change, the update from the
//! snapshot and its change record, and the partial transaction from the previous ruleset;
//! and finding a change that reaches the measured node.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use kube_nftpolicy::engine::incremental::{NodeCompiler, UpdateKind};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::index::Snapshot;
use kube_nftpolicy::engine::resolve::{NodePolicy, ResolvedPeer};
use kube_nftpolicy::kernel::nft::transaction;
use kube_nftpolicy::model::{NamespaceScope, PodInfo};

/// Time `iters` incremental updates that alternate between `forward` and `back`, each with
/// the partial transaction; the state is restored at the end.
pub fn toggle(
    idx: &mut Index,
    nc: &mut NodeCompiler,
    forward: &dyn Fn(&mut Index),
    back: &dyn Fn(&mut Index),
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut on = false;
    for _ in 0..iters {
        let before = nc.ruleset().clone();
        if on {
            back(idx)
        } else {
            forward(idx)
        }
        on = !on;
        let t = Instant::now();
        let (snap, changes) = idx.snapshot_with_changes();
        let kind = nc.update(snap, &changes);
        let tx = transaction::partial(&before, nc.ruleset(), &BTreeSet::new());
        total += t.elapsed();
        assert_eq!(kind, UpdateKind::Incremental, "update path");
        assert!(
            tx.element_changes + tx.chains_written > 0,
            "the change must reach this node"
        );
        black_box(tx);
    }
    if on {
        back(idx);
        let (snap, changes) = idx.snapshot_with_changes();
        nc.update(snap, &changes);
    }
    total
}

/// The peer selector pairs of `np` that take in `pod`.
pub fn peer_matches(np: &NodePolicy, snap: &Snapshot, pod: &PodInfo) -> Vec<String> {
    let ns_labels = snap
        .namespaces
        .get(&pod.key.namespace)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    np.policies
        .iter()
        .flat_map(|p| &p.rules)
        .filter_map(|r| r.peers.as_ref())
        .flatten()
        .filter_map(|peer| match peer {
            ResolvedPeer::Pods(pp) => Some(pp),
            ResolvedPeer::IpBlock { .. } => None,
        })
        .filter(|pp| {
            let ns_ok = match &pp.scope {
                NamespaceScope::Own(ns) => *ns == pod.key.namespace,
                NamespaceScope::Selector(sel) => sel.matches(&ns_labels),
            };
            ns_ok && pp.pods.matches(&pod.labels)
        })
        .map(|pp| pp.describe())
        .collect()
}

/// `policy` with `port` (TCP) allowed by its first ingress rule (a first rule is made if it
/// has none): a change that rewrites its chain on every node it selects pods of.
pub fn with_port(
    policy: &kube_nftpolicy::model::Policy,
    port: u16,
) -> kube_nftpolicy::model::Policy {
    use kube_nftpolicy::model::policy::{PortMatch, PortSpec, Protocol, Rule};
    let mut p = policy.clone();
    let spec = PortSpec {
        protocol: Protocol::Tcp,
        port: PortMatch::Range(port, port),
    };
    let rules = p.ingress.get_or_insert_with(Vec::new);
    match rules.first_mut() {
        Some(rule) => rule.ports.get_or_insert_with(Vec::new).push(spec),
        None => rules.push(Rule {
            peers: None,
            ports: Some(vec![spec]),
        }),
    }
    p
}
