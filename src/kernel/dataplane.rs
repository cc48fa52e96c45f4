//! Keep the kernel's copy of our table equal to the desired ruleset.
//!
//! Remembers what was applied last, chooses between a full and a partial transaction, and
//! falls back to a full sync after any failure or detected drift. Blocking (it runs `nft` and
//! netlink dumps); the agent calls it from a blocking task.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::engine::compile::{is_drop_chain_name, is_policy_chain_name};
use crate::engine::ruleset::{ChainRole, CounterOwner, Ruleset, TABLE};
use crate::kernel::nft::exec::{ExecError, Nft};
use crate::kernel::nft::readback::{self, ReadbackError};
use crate::kernel::nft::transaction::{self, Kind, Transaction};
use crate::kernel::nft::{Counter, KernelState};
use crate::model::policy::Direction;

/// Why a dataplane sync failed; the `reason` label of `sync_failures_total`.
///
/// A closed enum rather than an error string, so the label cannot grow with error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncFailure {
    /// `nft` parsed the transaction and refused it.
    NftRejected,
    /// `nft` could not be run, or died without a verdict.
    NftExec,
    /// Reading the ruleset back from the kernel failed.
    Readback,
    /// The kernel's ruleset differed from what was programmed.
    Drift,
    /// Anything else.
    Other,
}

impl SyncFailure {
    pub const ALL: [SyncFailure; 5] = [
        SyncFailure::NftRejected,
        SyncFailure::NftExec,
        SyncFailure::Readback,
        SyncFailure::Drift,
        SyncFailure::Other,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            SyncFailure::NftRejected => "nft_rejected",
            SyncFailure::NftExec => "nft_exec",
            SyncFailure::Readback => "readback",
            SyncFailure::Drift => "drift",
            SyncFailure::Other => "other",
        }
    }
}

/// Why a sync failed. The kernel still holds the previous ruleset in every case.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reading the kernel state (needed for a full sync) failed.
    #[error("sync failed while reading the kernel state: {0}")]
    Readback(#[from] ReadbackError),
    /// nft failed or rejected the transaction.
    #[error("sync failed: {0}")]
    Exec(#[from] ExecError),
}

impl SyncError {
    /// The bounded failure kind for metrics.
    pub fn failure(&self) -> SyncFailure {
        match self {
            Self::Readback(_) => SyncFailure::Readback,
            Self::Exec(ExecError::Spawn { .. }) => SyncFailure::NftExec,
            Self::Exec(ExecError::Rejected { .. }) => SyncFailure::NftRejected,
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReport {
    /// `None` when nothing had to change.
    pub kind: Option<Kind>,
    /// Size of the transaction sent.
    pub script_bytes: usize,
    /// Chains written.
    pub chains_written: usize,
    /// Set/map elements added or deleted.
    pub element_changes: usize,
    /// Wall time, including the read-back of a full sync.
    pub duration: Duration,
}

/// A pod's drop counter as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDrops {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Direction.
    pub direction: Direction,
    /// Counter.
    pub counter: Counter,
}

/// The counter of one ClusterNetworkPolicy Deny rule as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnpDenies {
    /// The ClusterNetworkPolicy.
    pub policy: String,
    /// `admin` or `baseline`.
    pub tier: &'static str,
    /// Direction.
    pub direction: Direction,
    /// The rule's name, or `spec.<direction>[i]`.
    pub rule: String,
    /// Counter.
    pub counter: Counter,
}

/// The hit counter of one policy rule (a named counter object) as read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHits {
    /// The rule.
    pub owner: CounterOwner,
    /// Counter: packets that opened connections through the rule.
    pub counter: Counter,
}

/// The kernel-side state machine.
#[derive(Debug)]
pub struct Dataplane {
    nft: Nft,
    applied: Option<Ruleset>,
    pending_delete: BTreeSet<String>,
    force_full: bool,
}

/// Chains whose rules rustables can decode and that drift checks compare: all but the
/// policy chains, whose concatenated lookups it cannot read.
fn checkable(name: &str) -> bool {
    !is_policy_chain_name(name)
}

impl Dataplane {
    /// A dataplane whose first sync is a full one.
    pub fn new(nft: Nft) -> Self {
        Self {
            nft,
            applied: None,
            pending_delete: BTreeSet::new(),
            force_full: true,
        }
    }

    /// Make the next sync a full one (periodic resync, after drift).
    pub fn request_full_sync(&mut self) {
        self.force_full = true;
    }

    /// Chains flushed by the last sync and waiting to be deleted by the next one.
    pub fn pending_deletions(&self) -> usize {
        self.pending_delete.len()
    }

    /// The ruleset the kernel holds, as far as we know.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// The transaction the next sync would send.
    pub fn plan(&self, desired: &Ruleset) -> Result<Transaction, ReadbackError> {
        match (&self.applied, self.force_full) {
            (Some(applied), false) => {
                Ok(transaction::partial(applied, desired, &self.pending_delete))
            }
            _ => {
                // Rules of terminal chains (to keep their counters) and of chains we no longer
                // want (an empty one was flushed earlier and can be deleted now).
                let wanted: std::collections::HashSet<&str> =
                    desired.chains.iter().map(|c| c.name.as_str()).collect();
                let kernel = readback::read(&|name: &str| {
                    is_drop_chain_name(name) || !wanted.contains(name)
                })?;
                Ok(transaction::full(desired, &kernel))
            }
        }
    }

    /// Make the kernel hold `desired`.
    pub fn sync(&mut self, desired: &Ruleset) -> Result<SyncReport, SyncError> {
        let start = Instant::now();
        let txn = match self.plan(desired) {
            Ok(t) => t,
            Err(e) => {
                self.force_full = true;
                return Err(e.into());
            }
        };
        if txn.script.is_empty() {
            return Ok(SyncReport {
                kind: None,
                script_bytes: 0,
                chains_written: 0,
                element_changes: 0,
                duration: start.elapsed(),
            });
        }
        if let Err(e) = self.nft.apply(&txn.script) {
            // The kernel kept the old ruleset; we no longer know exactly how it relates to
            // `applied`, so the next attempt rebuilds everything.
            self.force_full = true;
            return Err(e.into());
        }
        self.applied = Some(desired.clone());
        self.pending_delete = txn.delete_next;
        self.force_full = false;
        Ok(SyncReport {
            kind: Some(txn.kind),
            script_bytes: txn.script.len(),
            chains_written: txn.chains_written,
            element_changes: txn.element_changes,
            duration: start.elapsed(),
        })
    }

    /// Compare the kernel with what we applied. On drift, the next sync is a full one and the
    /// returned text says what was wrong.
    pub fn check_drift(&mut self) -> Result<Option<String>, ReadbackError> {
        let Some(applied) = &self.applied else {
            return Ok(None);
        };
        let kernel = readback::read(&|name: &str| checkable(name))?;
        let drift = drift(applied, &kernel, &self.pending_delete);
        if drift.is_some() {
            self.force_full = true;
        }
        Ok(drift)
    }

    /// Read every local pod's drop counters.
    pub fn drop_counters(&self) -> Result<Vec<PodDrops>, ReadbackError> {
        Ok(self.counters()?.pods)
    }

    /// Read every terminal counter in one netlink dump: the local pods' drops, the
    /// ClusterNetworkPolicy Deny rules' and the unknown-address drops (by direction).
    pub fn counters(&self) -> Result<TerminalCounters, ReadbackError> {
        let Some(applied) = &self.applied else {
            return Ok(TerminalCounters::default());
        };
        let kernel = readback::read(&|name: &str| is_drop_chain_name(name))?;
        Ok(TerminalCounters {
            pods: drop_counters(applied, &kernel),
            cnp_denies: cnp_deny_counters(applied, &kernel),
            unknown: unknown_address_drops(applied, &kernel),
            rule_hits: rule_hits(applied, &kernel),
        })
    }
}

/// Every terminal counter of the applied ruleset, as the kernel holds them.
#[derive(Clone, Debug, Default)]
pub struct TerminalCounters {
    /// Each local pod's drops, per direction.
    pub pods: Vec<PodDrops>,
    /// Each ClusterNetworkPolicy Deny rule's drops.
    pub cnp_denies: Vec<CnpDenies>,
    /// Drops of unknown addresses in this node's pod ranges, per direction.
    pub unknown: Vec<(Direction, Counter)>,
    /// Each policy rule's hits (NetworkPolicy rules, ClusterNetworkPolicy Accept and Pass).
    pub rule_hits: Vec<RuleHits>,
}

/// Pair the named rule counters of `applied` with their kernel counts.
pub fn rule_hits(applied: &Ruleset, kernel: &KernelState) -> Vec<RuleHits> {
    applied
        .counters()
        .map(|c| RuleHits {
            owner: c.owner.clone(),
            counter: kernel.counters.get(&c.name).copied().unwrap_or_default(),
        })
        .collect()
}

/// The counters of the unknown-address terminal chains of `applied`, by direction.
pub fn unknown_address_drops(applied: &Ruleset, kernel: &KernelState) -> Vec<(Direction, Counter)> {
    applied
        .chains
        .iter()
        .filter_map(|c| match &c.role {
            ChainRole::UnknownDrop { direction } => Some((
                if *direction == "ingress" {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                kernel
                    .chains
                    .get(&c.name)
                    .and_then(|k| k.counter)
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

/// Pair the terminal chains of `applied` with their kernel counters.
pub fn drop_counters(applied: &Ruleset, kernel: &KernelState) -> Vec<PodDrops> {
    applied
        .chains
        .iter()
        .filter_map(|c| match &c.role {
            ChainRole::Drop {
                namespace,
                pod,
                direction,
            } => Some(PodDrops {
                namespace: namespace.clone(),
                pod: pod.clone(),
                direction: if *direction == "ingress" {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                counter: kernel
                    .chains
                    .get(&c.name)
                    .and_then(|k| k.counter)
                    .unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

/// Pair the ClusterNetworkPolicy Deny chains of `applied` with their kernel counters.
pub fn cnp_deny_counters(applied: &Ruleset, kernel: &KernelState) -> Vec<CnpDenies> {
    applied
        .chains
        .iter()
        .filter_map(|c| match &c.role {
            ChainRole::Deny {
                policy,
                tier,
                direction,
                rule,
            } => Some(CnpDenies {
                policy: policy.clone(),
                tier,
                direction: if *direction == "ingress" {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                rule: rule.clone(),
                counter: kernel
                    .chains
                    .get(&c.name)
                    .and_then(|k| k.counter)
                    .unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

/// What differs between the applied ruleset and the kernel, if anything.
pub fn drift(
    applied: &Ruleset,
    kernel: &KernelState,
    pending: &BTreeSet<String>,
) -> Option<String> {
    if !kernel.table {
        return Some(format!("table inet {TABLE} is missing"));
    }
    for chain in &applied.chains {
        match kernel.chains.get(&chain.name) {
            None => return Some(format!("chain {} is missing", chain.name)),
            Some(k) => {
                if let Some(n) = k.rules {
                    if checkable(&chain.name) && n != chain.rules.len() {
                        return Some(format!(
                            "chain {} holds {n} rules instead of {}",
                            chain.name,
                            chain.rules.len()
                        ));
                    }
                }
            }
        }
    }
    for name in kernel.chains.keys() {
        if applied.chain(name).is_none() && !pending.contains(name) {
            return Some(format!("chain {name} is not ours"));
        }
    }
    for set in &applied.sets {
        if kernel.sets.binary_search(&set.name).is_err() {
            return Some(format!("set {} is missing", set.name));
        }
    }
    for counter in applied.counters() {
        if !kernel.counters.contains_key(&counter.name) {
            return Some(format!("counter {} is missing", counter.name));
        }
    }
    None
}

/// Remove our table (and nothing else). Returns whether it existed.
pub fn cleanup(nft: &Nft) -> Result<bool, SyncError> {
    if !readback::table_exists()? {
        return Ok(false);
    }
    nft.apply(&format!("delete table inet {TABLE}\n"))?;
    Ok(true)
}
