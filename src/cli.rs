//! The command line: every subcommand and flag the binary accepts. It lives in the library,
//! not in `main.rs`, so tests can check that the arguments in `deploy/` are ones the agent
//! really accepts, with the same parser the binary uses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use crate::cluster::watch::InitialList;

#[derive(Parser, Debug)]
#[command(
    name = "kube-nftpolicy",
    version,
    about = "Kubernetes NetworkPolicy enforcement with one nftables table per node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the nft script that makes a node enforce the policies in the manifests.
    Render {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// Node whose pods the ruleset protects.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Also send drops to this NFLOG group (as `run --log-denied` would).
        #[arg(long)]
        log_group: Option<u16>,
        /// The node's pod address range (repeatable), as `run --pod-cidr`: addresses in it
        /// that are not known pods are dropped.
        #[arg(long = "pod-cidr", value_name = "CIDR")]
        pod_cidrs: Vec<String>,
        /// The audit-mode ruleset (as `run --audit`): drops become counted accepts.
        #[arg(long)]
        audit: bool,
    },
    /// Make the kernel of the current network namespace enforce the manifests (one sync).
    Apply {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// Node whose pods the ruleset protects.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Print the transaction instead of sending it.
        #[arg(long)]
        dry_run: bool,
        /// Also send drops to this NFLOG group.
        #[arg(long)]
        log_group: Option<u16>,
        /// The node's pod address range (repeatable), as `run --pod-cidr`.
        #[arg(long = "pod-cidr", value_name = "CIDR")]
        pod_cidrs: Vec<String>,
        /// The nft binary.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
    /// Run the agent: watch the cluster (or follow manifests) and keep this node's table in sync.
    Run(RunArgs),
    /// Explain whether a connection is allowed, and which policies and rules decide it.
    /// Exit status: 0 allowed, 3 denied.
    Explain(ExplainArgs),
    /// Print the connectivity truth table between pods (`.` allowed, `X` denied), like the
    /// upstream e2e suite.
    Matrix {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// Only pods of this namespace (repeatable; default: every namespace).
        #[arg(long = "namespace", value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        /// A port: `80`, `80/UDP`, `http`, `http/TCP` (repeatable, one table each).
        #[arg(long = "port", value_name = "PORT", default_value = "80/TCP")]
        ports: Vec<String>,
        /// Force IPv4 (4) or IPv6 (6); by default IPv4 when both pods have it.
        #[arg(long)]
        family: Option<u8>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check NetworkPolicy manifests for mistakes. Exit status: 0 no errors (warnings are
    /// printed), 3 at least one error.
    Lint {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// A node agent's `/debug/rule-hits` document, saved to a file (repeatable, one per
        /// node): warn about every rule that matched no connection on any of them.
        #[arg(long = "rule-hits", value_name = "FILE")]
        rule_hits: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove our table from the current network namespace (and nothing else).
    Cleanup {
        /// The nft binary.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
}

/// How `explain`, `matrix` and `lint` print their answer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// For tools: one JSON document.
    Json,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["manifests", "kubeconfig"])))]
pub struct ExplainArgs {
    /// A manifest file, or a directory of .yaml/.yml/.json files.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Ask the live cluster instead: list Namespaces, Pods and NetworkPolicies once.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// Source: `namespace/pod` or an IP address.
    #[arg(long)]
    pub from: String,
    /// Destination: `namespace/pod` or an IP address.
    #[arg(long)]
    pub to: String,
    /// Destination port: `80`, `80/UDP`, `http` or `http/TCP` (a name is looked up in the
    /// destination pod's container ports).
    #[arg(long)]
    pub port: String,
    /// TCP, UDP or SCTP, when `--port` names no protocol (default TCP).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Force IPv4 (4) or IPv6 (6); by default IPv4 when both ends have it.
    #[arg(long)]
    pub family: Option<u8>,
    /// A node agent's `/debug/rule-hits` document, saved to a file (repeatable): with text
    /// output, also print how many connections each rule of the deciding policies matched.
    #[arg(long = "rule-hits", value_name = "FILE")]
    pub rule_hits: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// This node's name (as in `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig file; without it, in-cluster config (or ~/.kube/config) is used.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// Follow manifest files instead of a cluster (the embedded mode).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// How the watchers get their initial lists and relists: `auto` asks for streaming lists
    /// and falls back to paginated lists from the API server's watch cache where they are
    /// refused; `stream`, `cache` (resourceVersion=0) and `consistent` (quorum reads from etcd)
    /// force one.
    #[arg(long, value_enum, default_value_t = InitialList::Auto)]
    pub initial_list: InitialList,
    /// How often to look for changed manifest files, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub manifests_poll_ms: u64,
    /// Address for /metrics, /healthz, /readyz and /debug/explain.
    #[arg(long, default_value = "0.0.0.0:9753")]
    pub metrics_addr: std::net::SocketAddr,
    /// Serve /debug/explain on the metrics address. It reveals pod names, labels and policy
    /// names to whoever can reach that address; `--debug-explain=false` switches it off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub debug_explain: bool,
    /// Log denied connections (drops are also sent to an NFLOG group).
    #[arg(long)]
    pub log_denied: bool,
    /// NFLOG group used by --log-denied.
    #[arg(long, default_value_t = 100)]
    pub nflog_group: u16,
    /// Wait this long after a change for more changes before syncing (ms), again while
    /// changes keep arriving (at most 10 times), so a burst becomes one sync. Kept short: the
    /// first change after a quiet spell reaches the kernel at once.
    #[arg(long, default_value_t = 5)]
    pub coalesce_ms: u64,
    /// Minimum time between two syncs (ms).
    #[arg(long, default_value_t = 200)]
    pub min_sync_interval_ms: u64,
    /// How often to read the kernel back and repair drift (s).
    #[arg(long, default_value_t = 30)]
    pub resync_interval_s: u64,
    /// How often to force a full sync (s).
    #[arg(long, default_value_t = 3600)]
    pub full_sync_interval_s: u64,
    /// How often to read drop counters for metrics (s).
    #[arg(long, default_value_t = 5)]
    pub counters_interval_s: u64,
    /// While the ClusterNetworkPolicy CRD is not installed, how often to ask again (ms).
    #[arg(long, default_value_t = 10_000)]
    pub crd_poll_ms: u64,
    /// This node's pod address range, e.g. `10.244.1.0/24` (repeatable, one per family).
    /// Default: the ranges in this node's Node object (`spec.podCIDRs`).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<String>,
    /// Traffic from or to an address in this node's pod ranges that is not a known pod of
    /// this node: `drop` (fail closed: a pod is isolated before its first packet, even while
    /// the agent is stopped) or `allow` (for CNIs whose pod ranges are not this node's alone).
    #[arg(long, value_enum, default_value_t = UnknownAddresses::Drop)]
    pub unknown_addresses: UnknownAddresses,
    /// After a sync that changed the rules, remove from connection tracking the flows of local
    /// pods that the new rules no longer allow (and of pods that are gone), so a policy change
    /// applies to established connections too. `--enforce-established=false` lets them run on.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub enforce_established: bool,
    /// Audit mode: program the same rules, but every drop (a pod's isolation, a
    /// ClusterNetworkPolicy Deny rule, an unknown address) is counted, logged with
    /// --log-denied as "would deny", and accepted. Established flows are never removed.
    #[arg(long)]
    pub audit: bool,
    /// The bits of the packet mark (`meta mark`) that measure staged ClusterNetworkPolicies
    /// (one contiguous run of at least 3 bits, hex or decimal). They are set only on new
    /// connections of pods a staged ClusterNetworkPolicy selects, only when zero, and cleared
    /// before masquerade; 2^(bits-2) staged ClusterNetworkPolicies per node are measured.
    #[arg(long, value_name = "MASK", default_value = "0xff000000", value_parser = parse_mark_mask)]
    pub staged_mark_mask: u32,
    /// The nft binary.
    #[arg(long, default_value = "nft")]
    pub nft: PathBuf,
}

/// `--unknown-addresses`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownAddresses {
    /// Drop and count it (the default).
    Drop,
    /// Let it through.
    Allow,
}

/// `--staged-mark-mask`: `0x…` hex or decimal (the agent checks that it is contiguous).
fn parse_mark_mask(s: &str) -> Result<u32, String> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    }
    .map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}
