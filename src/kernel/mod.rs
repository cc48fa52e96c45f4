//! The kernel edge: everything that talks to netfilter.
//!
//! - [`nft`]: the text of a transaction (pure), running `nft -f -`, and the netlink read-back;
//! - [`dataplane`]: the state machine over them: what was applied, full or partial sync, drift,
//!   counters, `cleanup`;
//! - [`nflog`]: the NFLOG socket that receives the packets our drop rules log;
//! - [`conntrack`]: listing and deleting connection-tracking entries (`--enforce-established`).
//!
//! This folder turns an [`engine::ruleset::Ruleset`](crate::engine::ruleset::Ruleset) into
//! kernel state and reads kernel state back; it decides nothing about policy.

pub mod conntrack;
pub mod dataplane;
pub mod nflog;
pub mod nft;
