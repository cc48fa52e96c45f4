//! `kube-nftpolicy matrix`: the connectivity truth table between pods.
//!
//! The upstream NetworkPolicy e2e suite states what every step must do as a table of source
//! pods × destination pods (`.` connected, `X` blocked); people compare those tables with what
//! they expect. This computes the same table from a snapshot, one cell per ordered pair, each
//! cell being exactly `explain`'s verdict, so the table, the explanation and the kernel (see
//! the enforcement tests) cannot disagree. Pure: no kernel, no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::engine::index::Snapshot;
use crate::model::{Family, ObjectKey, PodInfo};
use crate::tools::explain::{Endpoint, Explainer, PortQuery};

/// Which pods and ports to tabulate.
#[derive(Clone, Debug, Default)]
pub struct MatrixSpec {
    /// Only pods of these namespaces (empty: every namespace).
    pub namespaces: Vec<String>,
    /// One table per port.
    pub ports: Vec<PortQuery>,
    /// Force IPv4 or IPv6; by default IPv4 when both pods have it.
    pub family: Option<Family>,
}

/// The tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// Row and column labels (`namespace/pod`), sorted.
    pub pods: Vec<String>,
    /// One table per requested port, in request order.
    pub tables: Vec<Table>,
}

/// One port's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Table {
    /// `80/TCP`, `http/TCP`.
    pub port: String,
    /// `allowed[from][to]`, indexed like `pods`; `null` when there is no answer (the
    /// destination does not declare a named port, or the two pods share no address family).
    pub allowed: Vec<Vec<Option<bool>>>,
}

/// The selection is empty or names something that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    /// A requested namespace has no pod that takes part in policy.
    #[error(
        "namespace {0} has no pods with an address (hostNetwork and finished pods do not count)"
    )]
    EmptyNamespace(String),
    /// Nothing to tabulate.
    #[error("no pods with an address in the cluster state")]
    NoPods,
    /// At least one port is needed.
    #[error("no port to tabulate")]
    NoPorts,
}

/// Compute the tables. The diagonal is always allowed: a pod reaching its own address never
/// leaves its network namespace, so no policy applies (upstream ignores loopback too).
pub fn matrix(snap: &Snapshot, spec: &MatrixSpec) -> Result<Matrix, MatrixError> {
    if spec.ports.is_empty() {
        return Err(MatrixError::NoPorts);
    }
    let pods: Vec<ObjectKey> = snap
        .pods
        .iter()
        .filter(|(k, p)| {
            p.is_policy_target()
                && (spec.namespaces.is_empty() || spec.namespaces.contains(&k.namespace))
        })
        .map(|(k, _)| k.clone())
        .collect();
    if let Some(ns) = spec
        .namespaces
        .iter()
        .find(|ns| !pods.iter().any(|p| &p.namespace == *ns))
    {
        return Err(MatrixError::EmptyNamespace(ns.clone()));
    }
    if pods.is_empty() {
        return Err(MatrixError::NoPods);
    }
    let reduced = only_tabulated_pods_local(snap, &pods);
    let mut explainer = Explainer::new(&reduced);
    let tables = spec
        .ports
        .iter()
        .map(|port| Table {
            port: port.to_string(),
            allowed: pods
                .iter()
                .map(|from| {
                    pods.iter()
                        .map(|to| {
                            if from == to {
                                return Some(true);
                            }
                            match explainer.explain(
                                &Endpoint::Pod(from.clone()),
                                &Endpoint::Pod(to.clone()),
                                port,
                                spec.family,
                            ) {
                                Ok(e) => Some(e.allowed),
                                // Both are policy targets, so only a named port the
                                // destination lacks or a missing family can fail: no answer.
                                Err(_) => None,
                            }
                        })
                        .collect()
                })
                .collect(),
        })
        .collect();
    Ok(Matrix {
        pods: pods.iter().map(ToString::to_string).collect(),
        tables,
    })
}

/// Where the tabulated pods are resolved when they can share one node: a name no Kubernetes
/// node can have (it has a `/`).
const TABULATED_NODE: &str = "matrix/tabulated-pods";

/// A snapshot in which the explainer resolves little. It resolves each node a tabulated pod
/// lives on, and resolving a node costs in proportion to its pods and to the peer sets of
/// the policies they have (at 100,000 pods, 100 pods of one namespace sit on 100 nodes of
/// about 110 pods each, and every node resolved the same policies again: 30 s). Every cell is
/// between two tabulated pods, decided by their own policies; the node only says which pods
/// are local (a pod's own address is always a known address of its own node, so the
/// unknown-address rule never applies to it). So the tabulated pods move to one node of
/// their own, resolved once, unless two of them on different nodes share an address (a
/// node looks a local pod up by address): then they stay where they are and only the other
/// pods leave those nodes. Pods without a node stay without one (nobody polices them). The
/// snapshot's maps are persistent, so this copies only the touched paths.
fn only_tabulated_pods_local(snap: &Snapshot, pods: &[ObjectKey]) -> Snapshot {
    let tabulated: Vec<&PodInfo> = pods
        .iter()
        .filter_map(|k| snap.pods.get(k).map(|p| &**p))
        .collect();
    let nodes: BTreeSet<&str> = tabulated.iter().filter_map(|p| p.node.as_deref()).collect();
    let mut holder: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let shared_address = tabulated.iter().any(|pod| {
        let Some(node) = pod.node.as_deref() else {
            return false;
        };
        pod.ips
            .iter()
            .any(|ip| *holder.entry(*ip).or_insert(node) != node)
    });
    let mut reduced = snap.clone();
    if !shared_address {
        for pod in tabulated.iter().filter(|p| p.node.is_some()) {
            let mut moved = PodInfo::clone(pod);
            moved.node = Some(TABULATED_NODE.into());
            reduced.pods.apply(moved.key.clone(), moved);
        }
        return reduced;
    }
    let keep: BTreeSet<&ObjectKey> = pods.iter().collect();
    for (key, pod) in snap.pods.iter() {
        if keep.contains(key) || !pod.node.as_deref().is_some_and(|n| nodes.contains(n)) {
            continue;
        }
        let mut detached = PodInfo::clone(pod);
        detached.node = None;
        reduced.pods.apply(key.clone(), detached);
    }
    reduced
}

impl Matrix {
    /// The tables as the upstream e2e suite prints them: a header row of `namespace/pod`, one
    /// row per source, `.` allowed, `X` denied, `?` no answer.
    pub fn to_text(&self) -> String {
        let label_width = self.pods.iter().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        for (i, t) in self.tables.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "{} (rows: from, columns: to; . allowed, X denied)",
                t.port
            );
            let mut header = " ".repeat(label_width);
            for p in &self.pods {
                header.push(' ');
                header.push_str(p);
            }
            let _ = writeln!(out, "{}", header.trim_end());
            for (from, row) in self.pods.iter().zip(&t.allowed) {
                let mut line = format!("{from:<label_width$}");
                for (to, cell) in self.pods.iter().zip(row) {
                    let mark = match cell {
                        Some(true) => ".",
                        Some(false) => "X",
                        None => "?",
                    };
                    // Centre the mark under its column's name.
                    let w = to.len();
                    let left = (w - 1) / 2;
                    line.push(' ');
                    line.push_str(&" ".repeat(left));
                    line.push_str(mark);
                    line.push_str(&" ".repeat(w - 1 - left));
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        out
    }
}
