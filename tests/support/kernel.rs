#![allow(dead_code)]
//! Glue between the netns test cluster and the agent's library: turn a cluster description
//! into manifests, compile each node's ruleset, and sync it inside that node's namespace with
//! the real dataplane (nft transactions, netlink read-back).
//!
//! Include after `netns`: `#[path = "support/kernel.rs"] mod kernel;` (it uses `crate::netns`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::compile::{CompileOptions, compile, node_policy};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::ruleset::Ruleset;
use kube_nftpolicy::kernel::dataplane::{Dataplane, SyncReport};
use kube_nftpolicy::kernel::nft::exec::Nft;

use crate::manifest_yaml;
use crate::netns::{Cluster, PodSpec};

/// Kernel tests share two CPUs and each builds a cluster; one at a time keeps probe timing
/// honest. Every kernel test takes this guard first.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A table listing with the counter values dropped, so listings taken around traffic compare.
pub fn without_counts(listing: &str) -> String {
    let mut out = String::new();
    for line in listing.lines() {
        let mut tokens = line.split_whitespace();
        let mut kept = Vec::new();
        while let Some(t) = tokens.next() {
            if t == "packets" || t == "bytes" {
                tokens.next();
            } else {
                kept.push(t);
            }
        }
        out.push_str(&kept.join(" "));
        out.push('\n');
    }
    out
}

/// `nft list table inet kube-nftpolicy` inside a node, `None` when the table is absent.
pub fn try_list_table(cluster: &Cluster, node: &str) -> Option<String> {
    let out = cluster.exec(
        crate::netns::Endpoint::node(node),
        &["nft", "list", "table", "inet", "kube-nftpolicy"],
        None,
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Pod manifest for a harness pod, with named ports `serve-<port>-<proto>`.
pub fn pod_yaml(p: &PodSpec, labels: &BTreeMap<String, String>) -> String {
    let ports: Vec<(u16, &str)> = p
        .tcp_ports
        .iter()
        .map(|t| (*t, "TCP"))
        .chain(p.udp_ports.iter().map(|u| (*u, "UDP")))
        .collect();
    manifest_yaml::pod_yaml(&p.namespace, &p.name, &p.node, labels, &ports, &p.ips)
}

/// Each node's dataplane, kept across syncs so later syncs are partial.
pub struct NodeDataplanes {
    planes: HashMap<String, Dataplane>,
    pub options: CompileOptions,
    /// Per-node pod ranges (`--pod-cidr` of that node's agent), on top of `options`.
    pub pod_cidrs: HashMap<String, Vec<kube_nftpolicy::model::Cidr>>,
}

impl NodeDataplanes {
    pub fn new(cluster: &Cluster) -> Self {
        let planes = cluster
            .node_names()
            .into_iter()
            .map(|n| (n, Dataplane::new(Nft::default())))
            .collect();
        NodeDataplanes {
            planes,
            options: CompileOptions::default(),
            pod_cidrs: HashMap::new(),
        }
    }

    /// Give every node's ruleset the node's pod ranges (both families), so unknown
    /// addresses in them fail closed.
    pub fn fail_closed(mut self, cluster: &Cluster) -> Self {
        for node in cluster.node_names() {
            let spec = cluster.node_spec(&node);
            let ranges = [crate::netns::Family::V4, crate::netns::Family::V6]
                .into_iter()
                .map(|f| {
                    let (net, len) = spec.pod_cidr(f);
                    kube_nftpolicy::model::Cidr::new(net, len).expect("pod cidr")
                })
                .collect();
            self.pod_cidrs.insert(node, ranges);
        }
        self
    }

    /// The options node `node` compiles with.
    pub fn options_for(&self, node: &str) -> CompileOptions {
        let mut opts = self.options.clone();
        if let Some(ranges) = self.pod_cidrs.get(node) {
            opts.pod_cidrs = ranges.clone();
        }
        opts
    }

    /// Compile every node's ruleset from the manifests text and sync it in the node namespace.
    /// Panics (with the manifest warnings) if anything fails.
    pub fn sync_text(&mut self, cluster: &Cluster, manifests: &str) -> Vec<(String, SyncReport)> {
        let m = parse_sources(&[(PathBuf::from("state.yaml"), manifests.to_string())])
            .unwrap_or_else(|e| panic!("manifests: {e}\n{manifests}"));
        let idx = m.into_index();
        self.sync_index(cluster, &idx)
    }

    /// Sync every node from an index.
    pub fn sync_index(&mut self, cluster: &Cluster, idx: &Index) -> Vec<(String, SyncReport)> {
        let snap = idx.snapshot();
        let mut reports = Vec::new();
        for node in cluster.node_names() {
            let opts = self.options_for(&node);
            let rs = compile(&node_policy(&snap, &node, &opts), &opts);
            let report = self
                .sync_ruleset(cluster, &node, &rs)
                .unwrap_or_else(|e| panic!("sync {node}: {e}"));
            reports.push((node, report));
        }
        reports
    }

    /// Sync one node to a ruleset.
    pub fn sync_ruleset(
        &mut self,
        cluster: &Cluster,
        node: &str,
        rs: &Ruleset,
    ) -> Result<SyncReport, kube_nftpolicy::kernel::dataplane::SyncError> {
        let mut dp = self.planes.remove(node).expect("node dataplane");
        let rs = rs.clone();
        let (dp, out) = cluster.run_in_node(node, move || {
            let out = dp.sync(&rs);
            (dp, out)
        });
        self.planes.insert(node.to_string(), dp);
        out
    }

    /// Run something with a node's dataplane inside the node's namespace.
    pub fn with<T: Send>(
        &mut self,
        cluster: &Cluster,
        node: &str,
        f: impl FnOnce(&mut Dataplane) -> T + Send,
    ) -> T {
        let mut dp = self.planes.remove(node).expect("node dataplane");
        let (dp, out) = cluster.run_in_node(node, move || {
            let out = f(&mut dp);
            (dp, out)
        });
        self.planes.insert(node.to_string(), dp);
        out
    }
}

/// `nft list table inet kube-nftpolicy` inside a node.
pub fn list_table(cluster: &Cluster, node: &str) -> String {
    cluster.exec_ok(
        crate::netns::Endpoint::node(node),
        &["nft", "list", "table", "inet", "kube-nftpolicy"],
        None,
    )
}
