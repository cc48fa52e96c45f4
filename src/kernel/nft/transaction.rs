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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::{Counter, KernelState};
use crate::engine::ruleset::{Chain, Element, NamedCounter, Ruleset, Set, TABLE, quote_comment};

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

/// Declare a rule hit counter. `add` on an existing counter object leaves it (and its count)
/// as it is, so full syncs keep counting.
fn add_counter(out: &mut String, counter: &NamedCounter) {
    let _ = writeln!(
        out,
        "add counter inet {TABLE} {} {{ comment {}; }}",
        counter.name,
        quote_comment(&counter.comment)
    );
}

/// Delete a counter object; only valid once no rule references it (its rules were flushed
/// earlier in the same transaction).
fn delete_counter(out: &mut String, name: &str) {
    let _ = writeln!(out, "delete counter inet {TABLE} {name}");
}

fn add_elements<'a>(
    out: &mut String,
    set: &Set,
    elems: impl IntoIterator<Item = &'a Element>,
) -> usize {
    let elems: Vec<&Element> = elems.into_iter().collect();
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
    elems: impl IntoIterator<Item = &'a Element>,
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
    chain.role.is_terminal()
}

/// Is the kernel's terminal chain exactly what we would write (so it can stay untouched)?
fn drop_chain_intact(chain: &Chain, kernel: &KernelState) -> bool {
    let wants_log = chain.rules.iter().any(|r| r.contains("log prefix"));
    let wants_accept = accepts(chain);
    kernel.chains.get(&chain.name).is_some_and(|k| {
        k.rules == Some(chain.rules.len())
            && k.counter.is_some()
            && k.logs == wants_log
            && k.accepts == wants_accept
    })
}

/// Does this terminal chain accept (audit mode) rather than drop?
fn accepts(chain: &Chain) -> bool {
    chain.rules.iter().any(|r| r.contains(" accept"))
}

/// Replace whatever the kernel holds with `desired`.
pub fn full(desired: &Ruleset, kernel: &KernelState) -> Transaction {
    let mut out = String::new();
    add_table(&mut out, desired);
    for counter in desired.counters() {
        add_counter(&mut out, counter);
    }
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
    let desired_counters: BTreeSet<&str> = desired.counters().map(|c| c.name.as_str()).collect();
    for c in kernel
        .counters
        .keys()
        .filter(|c| !desired_counters.contains(c.as_str()))
    {
        // Likewise stale counters: every chain was flushed above.
        delete_counter(&mut out, c);
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
            // The count carries over a change of logging, not of verdict: drops and would-drops
            // are different metrics, so a switch to or from audit mode starts at zero.
            let counter = kernel
                .chains
                .get(&chain.name)
                .filter(|k| k.accepts == accepts(chain))
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
    let old_sets: HashMap<&str, &Arc<Set>> =
        applied.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_sets: HashMap<&str, &Arc<Set>> =
        desired.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    let old_chains: HashMap<&str, &Arc<Chain>> = applied
        .chains
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let mut element_changes = 0;
    let mut chains_written = 0;

    // 1. Declare new counters, sets and new chains first: map elements point to chains and
    //    rules refer to sets and counters, and any of them may be new.
    let old_counters: BTreeSet<&str> = applied.counters().map(|c| c.name.as_str()).collect();
    let new_counters: BTreeSet<&str> = desired.counters().map(|c| c.name.as_str()).collect();
    for counter in desired
        .counters()
        .filter(|c| !old_counters.contains(c.name.as_str()))
    {
        add_counter(&mut out, counter);
    }
    for set in desired
        .sets
        .iter()
        .filter(|s| !old_sets.contains_key(s.name.as_str()))
    {
        add_set(&mut out, set);
    }
    // A chain flushed last time and wanted again is simply declared and filled again.
    for chain in desired
        .chains
        .iter()
        .filter(|c| !old_chains.contains_key(c.name.as_str()))
    {
        add_chain(&mut out, chain);
    }
    // 2. Elements: all of a new set's; removals then additions on existing sets (a map
    //    element whose verdict changed is deleted by key, then re-added).
    for set in &desired.sets {
        match old_sets.get(set.name.as_str()) {
            None => element_changes += add_elements(&mut out, set, &set.elements),
            // Shared with the applied ruleset: unchanged, without comparing elements.
            Some(old) if Arc::ptr_eq(old, set) => {}
            Some(old) if old.elements != set.elements => {
                // Hash lookups, in element order: a changed peer set may hold thousands of
                // addresses, and a sync usually moves one or two.
                let before: HashSet<&Element> = old.elements.iter().collect();
                let after: HashSet<&Element> = set.elements.iter().collect();
                let gone: Vec<&Element> =
                    old.elements.iter().filter(|e| !after.contains(e)).collect();
                let came: Vec<&Element> = set
                    .elements
                    .iter()
                    .filter(|e| !before.contains(e))
                    .collect();
                element_changes += delete_elements(&mut out, set, gone);
                element_changes += add_elements(&mut out, set, came);
            }
            Some(_) => {}
        }
    }
    // 3. Fill new chains, rewrite changed ones. Terminal chains are never rewritten.
    for chain in &desired.chains {
        match old_chains.get(chain.name.as_str()) {
            None => {
                add_rules(&mut out, chain);
                chains_written += 1;
            }
            Some(old) if Arc::ptr_eq(old, chain) => {}
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
    // 5b. Counters no longer wanted: the chains that counted into them were rewritten (3.) or
    //     flushed (4.), so nothing references them.
    for name in old_counters.difference(&new_counters) {
        delete_counter(&mut out, name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ruleset::{Chain, ChainRole, Set};

    fn map(elements: &[&str]) -> Arc<Set> {
        Arc::new(Set {
            name: "ingress-v4".into(),
            key_type: "ipv4_addr".into(),
            verdict_map: true,
            interval: false,
            comment: "m".into(),
            elements: elements.iter().map(|s| (*s).into()).collect(),
        })
    }

    fn chain(name: &str, rules: &[&str]) -> Arc<Chain> {
        Arc::new(Chain {
            name: name.into(),
            role: ChainRole::Pod,
            comment: "c".into(),
            rules: rules.iter().map(|s| s.to_string()).collect(),
            counters: Vec::new(),
        })
    }

    fn line_of(script: &str, needle: &str) -> usize {
        script
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{script}"))
    }

    /// Regression: a map element pointing to a chain added in the same partial sync was sent
    /// before the chain was declared, and the kernel rejected the transaction (ENOENT).
    #[test]
    fn partial_declares_new_chains_before_map_elements_point_to_them() {
        let old = Ruleset {
            comment: "t".into(),
            sets: vec![map(&[])],
            chains: vec![],
        };
        let new = Ruleset {
            comment: "t".into(),
            sets: vec![map(&["10.0.0.1 : goto ingress/a/b"])],
            chains: vec![chain("ingress/a/b", &["drop"])],
        };
        let t = partial(&old, &new, &BTreeSet::new());
        assert!(
            line_of(&t.script, "add chain inet kube-nftpolicy ingress/a/b")
                < line_of(&t.script, "add element")
        );
    }

    #[test]
    fn partial_diffs_elements_and_defers_chain_deletion() {
        let old = Ruleset {
            comment: "t".into(),
            sets: vec![map(&[
                "10.0.0.1 : goto ingress/a/b",
                "10.0.0.2 : goto ingress/a/c",
            ])],
            chains: vec![
                chain("ingress/a/b", &["drop"]),
                chain("ingress/a/c", &["drop"]),
            ],
        };
        let new = Ruleset {
            comment: "t".into(),
            sets: vec![map(&["10.0.0.1 : goto ingress/a/b"])],
            chains: vec![chain("ingress/a/b", &["drop"])],
        };
        let t = partial(&old, &new, &BTreeSet::new());
        assert_eq!(t.kind, Kind::Partial);
        assert!(
            t.script
                .contains("delete element inet kube-nftpolicy ingress-v4 { 10.0.0.2 }"),
            "{}",
            t.script
        );
        assert!(
            t.script
                .contains("flush chain inet kube-nftpolicy ingress/a/c")
        );
        assert!(
            !t.script.contains("delete chain"),
            "deleted one sync later:\n{}",
            t.script
        );
        assert_eq!(t.delete_next, BTreeSet::from(["ingress/a/c".to_string()]));
        let next = partial(&new, &new, &t.delete_next);
        assert_eq!(
            next.script,
            "delete chain inet kube-nftpolicy ingress/a/c\n"
        );
        assert_eq!(
            partial(&new, &new, &BTreeSet::new()).script,
            "",
            "no change, no transaction"
        );
    }

    fn counted(name: &str, rules: &[&str], counters: &[&str]) -> Arc<Chain> {
        let mut c = chain(name, rules);
        let c_mut = Arc::make_mut(&mut c);
        c_mut.role = ChainRole::Policy;
        c_mut.counters = counters
            .iter()
            .enumerate()
            .map(|(i, n)| crate::engine::ruleset::NamedCounter {
                name: (*n).into(),
                comment: "k".into(),
                owner: crate::engine::ruleset::CounterOwner::Policy {
                    namespace: "a".into(),
                    policy: "p".into(),
                    direction: "ingress",
                    rule: i,
                },
            })
            .collect();
        c
    }

    /// Rule counters are declared before the rules that use them and deleted only after
    /// those rules were flushed; an unchanged counter is never touched (it keeps its count).
    #[test]
    fn partial_orders_counter_objects_around_the_rules_that_use_them() {
        let old = Ruleset {
            comment: "t".into(),
            sets: vec![],
            chains: vec![
                counted(
                    "policy/a/p/ingress",
                    &["counter name \"x\" accept", "counter name \"y\" accept"],
                    &["x", "y"],
                ),
                counted("policy/a/q/ingress", &["counter name \"q\" accept"], &["q"]),
            ],
        };
        let new = Ruleset {
            comment: "t".into(),
            sets: vec![],
            chains: vec![
                counted("policy/a/p/ingress", &["counter name \"x\" accept"], &["x"]),
                counted("policy/a/r/ingress", &["counter name \"z\" accept"], &["z"]),
            ],
        };
        let t = partial(&old, &new, &BTreeSet::new());
        let s = &t.script;
        assert!(
            line_of(s, "add counter inet kube-nftpolicy z ")
                < line_of(s, "add rule inet kube-nftpolicy policy/a/r/ingress"),
            "{s}"
        );
        assert!(
            line_of(s, "flush chain inet kube-nftpolicy policy/a/p/ingress")
                < line_of(s, "delete counter inet kube-nftpolicy y"),
            "{s}"
        );
        assert!(
            line_of(s, "flush chain inet kube-nftpolicy policy/a/q/ingress")
                < line_of(s, "delete counter inet kube-nftpolicy q"),
            "{s}"
        );
        assert!(
            !s.contains("counter inet kube-nftpolicy x "),
            "x is untouched:\n{s}"
        );

        // A full sync declares every counter (keeping counts) and deletes the kernel's stale ones.
        let kernel = KernelState {
            table: true,
            counters: [
                ("x".to_string(), Counter::default()),
                ("old".to_string(), Counter::default()),
            ]
            .into_iter()
            .collect(),
            ..KernelState::default()
        };
        let f = full(&new, &kernel).script;
        assert!(
            f.contains("add counter inet kube-nftpolicy x { comment \"k\"; }"),
            "{f}"
        );
        assert!(
            line_of(&f, "flush chain inet kube-nftpolicy policy/a/p/ingress")
                < line_of(&f, "delete counter inet kube-nftpolicy old"),
            "{f}"
        );
        assert!(!f.contains("delete counter inet kube-nftpolicy x"), "{f}");
    }

    #[test]
    fn full_keeps_intact_drop_chains_and_carries_counters_otherwise() {
        let drop = Chain {
            name: "ingress/a/b/drop".into(),
            role: ChainRole::Drop {
                namespace: "a".into(),
                pod: "b".into(),
                direction: "ingress",
            },
            comment: "d".into(),
            rules: vec!["counter packets 0 bytes 0 drop".into()],
            counters: Vec::new(),
        };
        let rs = Ruleset {
            comment: "t".into(),
            sets: vec![],
            chains: vec![Arc::new(drop)],
        };
        let mut kernel = KernelState {
            table: true,
            ..KernelState::default()
        };
        kernel.chains.insert(
            "ingress/a/b/drop".into(),
            super::super::ChainState {
                rules: Some(1),
                counter: Some(Counter {
                    packets: 7,
                    bytes: 700,
                }),
                logs: false,
                accepts: false,
            },
        );
        let t = full(&rs, &kernel);
        assert!(
            !t.script
                .contains("flush chain inet kube-nftpolicy ingress/a/b/drop"),
            "{}",
            t.script
        );
        kernel
            .chains
            .get_mut("ingress/a/b/drop")
            .expect("chain")
            .logs = true; // log setting changed
        let t = full(&rs, &kernel);
        assert!(
            t.script
                .contains("flush chain inet kube-nftpolicy ingress/a/b/drop")
        );
        assert!(
            t.script.contains("counter packets 7 bytes 700 drop"),
            "{}",
            t.script
        );
    }
}
