//! Build nftables transactions (text for `nft -f -`) from rulesets. Pure.
//!
//! A **full** transaction makes the kernel hold exactly the desired ruleset whatever it held
//! before, without deleting the table (that would reset the drop counters): it (re)declares
//! every object, flushes every chain, set and map, and refills them. A **partial** transaction
//! is the diff between what was applied last and what is desired: new and changed chains are
//! (re)written, set and map elements are added and deleted one by one, and chains that nothing
//! points to any more are flushed now and deleted one sync later (kernels before 6.2 keep a
//! chain busy for a moment after the map element that pointed to it is gone).
//!
//! Terminal drop chains are never rewritten once created, so their counters keep counting.
//! Object comments never change for a given name (the kernel ignores a changed comment on an
//! existing object), which is why all changing detail lives in rule comments.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::{Counter, KernelState};
use crate::ruleset::{Chain, ChainRole, Ruleset, Set, TABLE, quote_comment};

/// Which kind of transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Replace everything.
    Full,
    /// Apply a diff.
    Partial,
}

/// A transaction and what it will leave to delete next time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Full or partial.
    pub kind: Kind,
    /// The nft script; empty when there is nothing to do.
    pub script: String,
    /// Chains flushed by this transaction, to delete in the next one.
    pub delete_next: BTreeSet<String>,
    /// Number of chains written (declared and filled) by this transaction.
    pub chains_written: usize,
    /// Number of element additions plus deletions.
    pub element_changes: usize,
}

fn add_table(out: &mut String, rs: &Ruleset) {
    let _ = writeln!(
        out,
        "add table inet {TABLE} {{ comment {}; }}",
        quote_comment(&rs.comment)
    );
}

fn add_set(out: &mut String, set: &Set) {
    let _ = writeln!(
        out,
        "add {} inet {TABLE} {} {{ {} }}",
        set.keyword(),
        set.name,
        set.spec()
    );
}

fn add_elements<'a>(
    out: &mut String,
    set: &Set,
    elems: impl IntoIterator<Item = &'a String>,
) -> usize {
    let elems: Vec<&String> = elems.into_iter().collect();
    // Keep lines reasonable for huge sets; nft handles many statements in one transaction.
    for chunk in elems.chunks(512) {
        let joined = chunk
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "add element inet {TABLE} {} {{ {joined} }}", set.name);
    }
    elems.len()
}

/// The key part of an element (`10.0.0.1 : goto x` → `10.0.0.1`), what `delete element` takes.
fn element_key(e: &str) -> &str {
    e.split_once(" : ").map_or(e, |(k, _)| k)
}

fn delete_elements<'a>(
    out: &mut String,
    set: &Set,
    elems: impl IntoIterator<Item = &'a String>,
) -> usize {
    let keys: Vec<&str> = elems.into_iter().map(|e| element_key(e)).collect();
    for chunk in keys.chunks(512) {
        let _ = writeln!(
            out,
            "delete element inet {TABLE} {} {{ {} }}",
            set.name,
            chunk.join(", ")
        );
    }
    keys.len()
}

fn add_chain(out: &mut String, chain: &Chain) {
    let mut spec = String::new();
    if let Some(h) = chain.hook_spec() {
        spec.push_str(&h);
        spec.push(' ');
    }
    let _ = writeln!(
        out,
        "add chain inet {TABLE} {} {{ {spec}comment {}; }}",
        chain.name,
        quote_comment(&chain.comment)
    );
}

fn add_rules(out: &mut String, chain: &Chain) {
    for r in &chain.rules {
        let _ = writeln!(out, "add rule inet {TABLE} {} {r}", chain.name);
    }
}

/// A terminal drop rule carrying the kernel's current count, so rewriting it loses nothing.
fn drop_rule_with(rule: &str, counter: Counter) -> String {
    rule.replace(
        "counter packets 0 bytes 0",
        &format!(
            "counter packets {} bytes {}",
            counter.packets, counter.bytes
        ),
    )
}

fn is_drop(chain: &Chain) -> bool {
    matches!(chain.role, ChainRole::Drop { .. })
}

/// Is the kernel's terminal chain exactly what we would write (so it can stay untouched)?
fn drop_chain_intact(chain: &Chain, kernel: &KernelState) -> bool {
    let wants_log = chain.rules.iter().any(|r| r.contains("log prefix"));
    kernel.chains.get(&chain.name).is_some_and(|k| {
        k.rules == Some(chain.rules.len()) && k.counter.is_some() && k.logs == wants_log
    })
}

/// Replace whatever the kernel holds with `desired`.
pub fn full(desired: &Ruleset, kernel: &KernelState) -> Transaction {
    let mut out = String::new();
    add_table(&mut out, desired);
    for set in &desired.sets {
        add_set(&mut out, set);
    }
    for chain in &desired.chains {
        add_chain(&mut out, chain);
    }
    // Empty every chain we own except intact terminal chains, and every set.
    let desired_chains: BTreeSet<&str> = desired.chains.iter().map(|c| c.name.as_str()).collect();
    let mut chains_written = 0;
    for chain in &desired.chains {
        if is_drop(chain) && drop_chain_intact(chain, kernel) {
            continue;
        }
        let _ = writeln!(out, "flush chain inet {TABLE} {}", chain.name);
    }
    let stale_chains: Vec<&String> = kernel
        .chains
        .keys()
        .filter(|c| !desired_chains.contains(c.as_str()))
        .collect();
    for c in &stale_chains {
        let _ = writeln!(out, "flush chain inet {TABLE} {c}");
    }
    // Stale chains that were already empty were flushed by an earlier transaction: nothing
    // can point to them any more, so they go now; the others go next time.
    let (empty, busy): (Vec<&String>, Vec<&String>) = stale_chains
        .iter()
        .partition(|c| kernel.chains.get(c.as_str()).and_then(|k| k.rules) == Some(0));
    for set in &desired.sets {
        let _ = writeln!(out, "flush {} inet {TABLE} {}", set.keyword(), set.name);
    }
    let desired_sets: BTreeSet<&str> = desired.sets.iter().map(|s| s.name.as_str()).collect();
    for s in kernel
        .sets
        .iter()
        .filter(|s| !desired_sets.contains(s.as_str()))
    {
        // Stale sets are referenced only by rules flushed above, so they can go now.
        let _ = writeln!(out, "delete set inet {TABLE} {s}");
    }
    for c in &empty {
        let _ = writeln!(out, "delete chain inet {TABLE} {c}");
    }
    let mut element_changes = 0;
    for set in &desired.sets {
        element_changes += add_elements(&mut out, set, &set.elements);
    }
    for chain in &desired.chains {
        if is_drop(chain) {
            if drop_chain_intact(chain, kernel) {
                continue;
            }
            let counter = kernel
                .chains
                .get(&chain.name)
                .and_then(|k| k.counter)
                .unwrap_or_default();
            for r in &chain.rules {
                let _ = writeln!(
                    out,
                    "add rule inet {TABLE} {} {}",
                    chain.name,
                    drop_rule_with(r, counter)
                );
            }
        } else {
            add_rules(&mut out, chain);
        }
        chains_written += 1;
    }
    Transaction {
        kind: Kind::Full,
        script: out,
        delete_next: busy.into_iter().cloned().collect(),
        chains_written,
        element_changes,
    }
}

/// The diff from `applied` (what the kernel holds, as far as we know) to `desired`.
/// `pending` are chains flushed by the previous transaction, deleted now unless wanted again.
pub fn partial(applied: &Ruleset, desired: &Ruleset, pending: &BTreeSet<String>) -> Transaction {
    let mut out = String::new();
    let old_sets: BTreeMap<&str, &Set> =
        applied.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_sets: BTreeMap<&str, &Set> =
        desired.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let old_chains: BTreeMap<&str, &Chain> = applied
        .chains
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let mut element_changes = 0;
    let mut chains_written = 0;

    // 1. New sets with their elements; element removals, then additions, on existing sets.
    for set in &desired.sets {
        match old_sets.get(set.name.as_str()) {
            None => {
                add_set(&mut out, set);
                element_changes += add_elements(&mut out, set, &set.elements);
            }
            Some(old) if old.elements != set.elements => {
                let before: BTreeSet<&String> = old.elements.iter().collect();
                let after: BTreeSet<&String> = set.elements.iter().collect();
                let gone: Vec<&String> = before.difference(&after).copied().collect();
                let came: Vec<&String> = after.difference(&before).copied().collect();
                // A map element whose verdict changed is deleted by key, then re-added.
                element_changes += delete_elements(&mut out, set, gone);
                element_changes += add_elements(&mut out, set, came);
            }
            Some(_) => {}
        }
    }
    // 2. Declare new chains first: rules may jump to chains declared later.
    let new_chains: Vec<&Chain> = desired
        .chains
        .iter()
        .filter(|c| !old_chains.contains_key(c.name.as_str()))
        .collect();
    // A chain flushed last time and wanted again is simply declared and filled again.
    for chain in &new_chains {
        add_chain(&mut out, chain);
    }
    // 3. Fill new chains, rewrite changed ones. Terminal chains are never rewritten.
    for chain in &desired.chains {
        match old_chains.get(chain.name.as_str()) {
            None => {
                add_rules(&mut out, chain);
                chains_written += 1;
            }
            Some(old) if old.rules != chain.rules && !is_drop(chain) => {
                let _ = writeln!(out, "flush chain inet {TABLE} {}", chain.name);
                add_rules(&mut out, chain);
                chains_written += 1;
            }
            Some(_) => {}
        }
    }
    // 4. Chains no longer wanted: flush now, delete next time.
    let wanted: BTreeSet<&str> = desired.chains.iter().map(|c| c.name.as_str()).collect();
    let mut delete_next = BTreeSet::new();
    for chain in &applied.chains {
        if !wanted.contains(chain.name.as_str()) {
            let _ = writeln!(out, "flush chain inet {TABLE} {}", chain.name);
            delete_next.insert(chain.name.clone());
        }
    }
    // 5. Sets no longer wanted (their rules were flushed above).
    for set in &applied.sets {
        if !new_sets.contains_key(set.name.as_str()) {
            let _ = writeln!(out, "delete {} inet {TABLE} {}", set.keyword(), set.name);
        }
    }
    // 6. Chains flushed by the previous transaction and still unwanted.
    for name in pending {
        if !wanted.contains(name.as_str()) && !delete_next.contains(name) {
            let _ = writeln!(out, "delete chain inet {TABLE} {name}");
        }
    }
    Transaction {
        kind: Kind::Partial,
        script: out,
        delete_next,
        chains_written,
        element_changes,
    }
}
