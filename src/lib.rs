//! kube-nftpolicy: a Kubernetes NetworkPolicy enforcement agent built on one nftables table.
//!
//! ```text
//!  kube watch (Pods, Namespaces, NetworkPolicies)   or   manifests on disk
//!         │  trimmed to the fields that matter            (manifest)
//!         ▼
//!  index      pure state; apply/delete/reset; generation bumps only on a real change
//!         ▼  snapshot
//!  resolve    pure: snapshot + node name → NodePolicy
//!         ▼
//!  compile    pure: NodePolicy → Ruleset (tables, chains, sets, maps; deterministic names)
//!             (incremental: a change to a pod on another node edits only its set elements)
//!         ▼
//!  nft        Ruleset → `nft -f -` transaction (full or partial), read-back over netlink
//!         ▼
//!  kernel     enforces; counters feed metrics
//! ```
//!
//! The pure core (`model`, `index`, `resolve`, `compile`, `incremental`, `ruleset`,
//! `nft::transaction`) does no I/O and never awaits; neither do the questions asked of it
//! (`evaluate`, `explain`, `matrix`, `lint`). The edges (`manifest`, `nft::exec`,
//! `nft::readback`, `watch`, `agent`, `admin`, `nflog`) are thin.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod denylog;
pub mod evaluate;
pub mod explain;
pub mod incremental;
pub mod index;
pub mod lint;
pub mod manifest;
pub mod matrix;
pub mod metrics;
pub mod model;
pub mod nflog;
pub mod nft;
pub mod resolve;
pub mod ruleset;
pub mod watch;
