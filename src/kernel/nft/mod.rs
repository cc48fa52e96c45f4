//! The kernel edge: turning rulesets into nftables transactions, sending them, reading back.
//!
//! - [`transaction`] (pure) builds the text of a full or partial transaction;
//! - [`exec`] sends one transaction through `nft -f -` (all or nothing in the kernel);
//! - [`readback`] reads our table over netlink (rustables): chains, rule counts, drop counters.
//!
//! Why text for writes and netlink for reads: rustables 0.9 cannot create verdict maps,
//! interval or concatenated sets, and fails on large batches (see the research notes), while
//! reading counters over netlink is five times faster than `nft -j`.

pub mod exec;
pub mod readback;
pub mod transaction;

use std::collections::BTreeMap;

/// A packet/byte counter read from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What the kernel holds of one of our chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainState {
    /// Number of rules; `None` when rustables could not decode them (concatenated lookups).
    pub rules: Option<usize>,
    /// The first counter found in the chain (the drop counter, in a terminal chain).
    pub counter: Option<Counter>,
    /// Whether some rule logs (`log ... group`).
    pub logs: bool,
    /// Whether some rule ends in `accept` (a terminal chain in audit mode).
    pub accepts: bool,
}

/// Our table as the kernel holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Does the table exist?
    pub table: bool,
    /// Its chains by name.
    pub chains: BTreeMap<String, ChainState>,
    /// Its sets and maps by name.
    pub sets: Vec<String>,
    /// Its named counter objects (rule hit counters) by name.
    pub counters: BTreeMap<String, Counter>,
}
