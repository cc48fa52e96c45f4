//! kube-nftpolicy: a Kubernetes NetworkPolicy enforcement agent built on one nftables table.
//!
//! ```text
//!  cluster/   kube watch (Pods, Namespaces, NetworkPolicies)   or   manifests on disk
//!         │  trimmed on arrival to model/ types
//!         ▼
//!  engine/    index → (snapshot) → resolve → compile → ruleset          pure: no I/O, no async
//!             (incremental: a change redoes only what it touches; evaluate: one verdict)
//!         ▼
//!  kernel/    ruleset → `nft -f -` transaction (full or partial); netlink read-back; NFLOG
//!         ▼
//!  kernel     enforces; counters feed the agent's metrics
//! ```
//!
//! The folders are the architecture:
//!
//! | folder | job | may use |
//! |---|---|---|
//! | [`model`] | the objects as the agent knows them: pods, namespaces, policies, selectors, CIDRs | std, serde, k8s-openapi types |
//! | [`engine`] | the pure core: index, resolve, evaluate, compile, incremental, ruleset | `model` |
//! | [`kernel`] | the kernel edge: nft transactions and exec, netlink read-back, dataplane, NFLOG | `engine`, `model` |
//! | [`cluster`] | the cluster edge: watchers and manifest files, feeding an index | `engine`, `model` |
//! | [`agent`] | the `run` loop that wires the edges to the engine; admin HTTP, metrics, deny log | everything but `tools` directly; `tools::explain` for `/debug/explain` |
//! | [`tools`] | the tools for people: explain, matrix, lint | `engine`, `model`, `cluster::manifest` |
//!
//! `cli` is the command line (clap; it names `cluster::watch::InitialList` for a flag), in the
//! library so the deploy tests parse the DaemonSet's arguments with the binary's own parser.
//! `tests/architecture.rs` checks the table's "may use" column against every `use` in `src/`,
//! so the layering cannot rot.

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod kernel;
pub mod model;
pub mod tools;
