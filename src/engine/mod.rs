//! The pure engine: cluster state in, nftables ruleset out.
//!
//! ```text
//!  index → (snapshot) → resolve → compile → ruleset
//!                          └──→ evaluate (the same semantics, without nftables)
//!  incremental: keeps one node's resolve + compile current across changes
//! ```
//!
//! Nothing in this folder does I/O, spawns, sleeps, reads the clock for decisions or awaits:
//! every function is a plain computation over its arguments, so the semantics are tested with
//! unit, table-driven and golden tests alone. The engine depends only on [`crate::model`];
//! `tests/architecture.rs` reads the `use` lines of every file here and fails if one reaches
//! an edge (`kernel`, `cluster`, `agent`, `tools`) or an I/O crate.
//!
//! - [`index`]: the cluster state, O(1) snapshots, and the record of what changed;
//! - [`resolve`]: the NetworkPolicy semantics for one node (isolation, peer sets, named ports);
//! - [`evaluate`]: one connection's verdict from a resolved node, rule by rule;
//! - [`compile`]: the nftables layout and its deterministic names;
//! - [`incremental`]: the same result as resolve + compile, redoing only what a change touches;
//! - [`ruleset`]: the ruleset as data, and its rendering as an `nft -f` script;
//! - [`log_prefix`]: the `log prefix` format the compiler writes and the deny log parses.

pub mod compile;
pub mod evaluate;
pub mod incremental;
pub mod index;
pub mod log_prefix;
pub mod resolve;
pub mod ruleset;
