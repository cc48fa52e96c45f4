//! The nftables ruleset as data, and its rendering as an `nft -f` script.
//!
//! The compiler produces a [`Ruleset`]; the dataplane diffs two of them to build partial
//! transactions; `render` prints one for people and golden tests. Rules are kept as rendered
//! nft statements: the compiler owns their shape, and equality of text is exactly the
//! equality the kernel cares about when deciding what to rewrite.

use std::fmt::Write as _;
use std::sync::Arc;

/// Name of the one table we own.
pub const TABLE: &str = "kube-nftpolicy";

/// The whole table for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Table comment.
    pub comment: String,
    /// Sets and maps, in render order. Shared, so keeping the applied ruleset beside the
    /// next one costs a pointer per object, and a diff skips what both still share.
    pub sets: Vec<Arc<Set>>,
    /// Chains, in render order (base chains first); shared like the sets.
    pub chains: Vec<Arc<Chain>>,
}

/// One set element as nft writes it.
pub type Element = compact_str::CompactString;

/// An address as a set element, in the text `Display` gives it.
///
/// A full compile at 100,000 pods writes 200,000 addresses, and through `fmt` an IPv4
/// address took longer than anything else done to it; its dotted-decimal form is written
/// here directly (always inline: at most 15 bytes). IPv6 keeps `Display`, whose zero-run
/// compression is not worth repeating.
pub fn addr_element(ip: &std::net::IpAddr) -> Element {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            // Only ASCII digits and dots were written.
            Element::new(std::str::from_utf8(&buf[..n]).unwrap_or_default())
        }
        std::net::IpAddr::V6(v6) => compact_str::ToCompactString::to_compact_string(v6),
    }
}

/// A named set or verdict map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    /// Name.
    pub name: String,
    /// `type` clause, e.g. `ipv4_addr . inet_proto . inet_service`.
    pub key_type: String,
    /// Maps to verdicts (`: verdict`).
    pub verdict_map: bool,
    /// Holds prefixes/ranges (`flags interval`).
    pub interval: bool,
    /// Which Kubernetes objects it stands for.
    pub comment: String,
    /// Elements as nft writes them, sorted in the order they should print. Most are one
    /// address and fit inline (no allocation each): a ruleset holds tens of thousands.
    pub elements: Vec<Element>,
}

/// What a chain is for; the dataplane treats them differently.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChainRole {
    /// A base chain attached to a hook.
    Base {
        /// Hook name.
        hook: &'static str,
        /// Priority expression as nft accepts it.
        priority: &'static str,
    },
    /// Per-pod dispatch chain.
    Pod,
    /// Per-policy rule chain.
    Policy,
    /// Per-pod terminal chain that holds the drop counter; created once, never rewritten,
    /// so its counter survives every sync.
    Drop {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        pod: String,
        /// `ingress` or `egress`.
        direction: &'static str,
    },
    /// Terminal chain of one ClusterNetworkPolicy `Deny` rule, holding its drop counter; kept
    /// like [`ChainRole::Drop`].
    Deny {
        /// The ClusterNetworkPolicy.
        policy: String,
        /// `admin` or `baseline`.
        tier: &'static str,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The rule: its name, or `spec.<direction>[i]` when it has none.
        rule: String,
    },
    /// Terminal chain that counts and drops traffic of addresses in this node's pod ranges
    /// that are not known pods; created once, never rewritten, like [`ChainRole::Drop`].
    UnknownDrop {
        /// `ingress` or `egress`.
        direction: &'static str,
    },
}

impl ChainRole {
    /// Is this a terminal chain holding a drop counter that syncs must keep?
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ChainRole::Drop { .. } | ChainRole::Deny { .. } | ChainRole::UnknownDrop { .. }
        )
    }
}

/// A chain and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Name.
    pub name: String,
    /// Role.
    pub role: ChainRole,
    /// Which Kubernetes objects it stands for.
    pub comment: String,
    /// Rules, rendered.
    pub rules: Vec<String>,
    /// Named counter objects this chain's rules count into (`counter name "…"`). They live
    /// while the chain does, outside it, so rewriting the chain keeps their counts.
    pub counters: Vec<NamedCounter>,
}

/// A named nftables counter object (`counter <name> { comment "…" }`), the hit counter of one
/// policy rule. One policy rule becomes several nft rules (per peer, family and kind of port
/// match); all of them reference its one counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedCounter {
    /// Object name, e.g. `hits/np/<ns>/<policy>/ingress/0`.
    pub name: String,
    /// Which Kubernetes rule it counts.
    pub comment: String,
    /// The rule, for metrics.
    pub owner: CounterOwner,
}

/// The policy rule behind a [`NamedCounter`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CounterOwner {
    /// Rule `index` of a NetworkPolicy's `ingress` or `egress` list.
    Policy {
        /// Policy namespace.
        namespace: String,
        /// Policy name.
        policy: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// Index in the direction's rule list.
        rule: usize,
    },
    /// An `Accept` or `Pass` rule of a ClusterNetworkPolicy (`Deny` rules count in their
    /// terminal chains).
    Cnp {
        /// The ClusterNetworkPolicy.
        policy: String,
        /// `admin` or `baseline`.
        tier: &'static str,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// The rule's name, or `spec.<direction>[i]` when it has none.
        rule: String,
        /// `Accept` or `Pass`.
        action: &'static str,
    },
    /// The new connections whose verdict a staged NetworkPolicy would change.
    Staged {
        /// Policy namespace.
        namespace: String,
        /// Policy name.
        policy: String,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// `would-deny` or `would-allow`.
        change: &'static str,
    },
    /// The new connections whose verdict a staged ClusterNetworkPolicy would change.
    StagedCnp {
        /// The staged ClusterNetworkPolicy.
        policy: String,
        /// `admin` or `baseline`.
        tier: &'static str,
        /// `ingress` or `egress`.
        direction: &'static str,
        /// `would-deny` or `would-allow`.
        change: &'static str,
    },
}

impl Ruleset {
    /// Look up a chain.
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name).map(|c| &**c)
    }

    /// Look up a set or map.
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name).map(|s| &**s)
    }

    /// Every named counter, in chain order.
    pub fn counters(&self) -> impl Iterator<Item = &NamedCounter> {
        self.chains.iter().flat_map(|c| &c.counters)
    }

    /// Total number of set and map elements.
    pub fn element_count(&self) -> usize {
        self.sets.iter().map(|s| s.elements.len()).sum()
    }
}

/// Quote a string for an nft `comment` (max 128 bytes; quotes cannot be escaped).
pub fn quote_comment(s: &str) -> String {
    const MAX: usize = 127;
    let clean: String = s
        .chars()
        .map(|c| if c == '"' || c.is_control() { '\'' } else { c })
        .collect();
    let mut out = clean;
    if out.len() > MAX {
        let mut cut = MAX - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    format!("\"{out}\"")
}

impl Set {
    /// `type ipv4_addr` or, for a verdict map, `type ipv4_addr : verdict`.
    pub fn type_clause(&self) -> String {
        if self.verdict_map {
            format!("type {} : verdict", self.key_type)
        } else {
            format!("type {}", self.key_type)
        }
    }

    /// The declaration line(s) without elements, as used inside `add set`.
    pub fn spec(&self) -> String {
        let mut s = self.type_clause();
        s.push_str("; ");
        if self.interval {
            s.push_str("flags interval; ");
        }
        let _ = write!(s, "comment {};", quote_comment(&self.comment));
        s
    }

    /// `set`/`map` keyword.
    pub fn keyword(&self) -> &'static str {
        if self.verdict_map { "map" } else { "set" }
    }
}

impl Chain {
    /// The `type … hook … priority …; policy accept;` clause of a base chain.
    pub fn hook_spec(&self) -> Option<String> {
        match &self.role {
            ChainRole::Base { hook, priority } => Some(format!(
                "type filter hook {hook} priority {priority}; policy accept;"
            )),
            _ => None,
        }
    }
}

/// Render the declarative script: loading it creates the table, or replaces an existing one
/// atomically (the `add`/`delete` pair makes the delete valid when the table is absent).
pub fn render(ruleset: &Ruleset, header: &str) -> String {
    let mut out = String::new();
    out.push_str("#!/usr/sbin/nft -f\n");
    for line in header.lines() {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "add table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(out, "\tcomment {}", quote_comment(&ruleset.comment));
    for counter in ruleset.counters() {
        let _ = writeln!(out, "\n\tcounter {} {{", counter.name);
        let _ = writeln!(out, "\t\tcomment {}", quote_comment(&counter.comment));
        let _ = writeln!(out, "\t}}");
    }
    for set in &ruleset.sets {
        let _ = writeln!(out, "\n\t{} {} {{", set.keyword(), set.name);
        let _ = writeln!(out, "\t\t{}", set.type_clause());
        if set.interval {
            let _ = writeln!(out, "\t\tflags interval");
        }
        let _ = writeln!(out, "\t\tcomment {}", quote_comment(&set.comment));
        if !set.elements.is_empty() {
            let _ = writeln!(out, "\t\telements = {{");
            for e in &set.elements {
                let _ = writeln!(out, "\t\t\t{e},");
            }
            let _ = writeln!(out, "\t\t}}");
        }
        let _ = writeln!(out, "\t}}");
    }
    for chain in &ruleset.chains {
        let _ = writeln!(out, "\n\tchain {} {{", chain.name);
        let _ = writeln!(out, "\t\tcomment {}", quote_comment(&chain.comment));
        if let Some(spec) = chain.hook_spec() {
            let _ = writeln!(out, "\t\t{spec}");
        }
        for rule in &chain.rules {
            let _ = writeln!(out, "\t\t{rule}");
        }
        let _ = writeln!(out, "\t}}");
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::addr_element;
    use std::net::IpAddr;

    #[test]
    fn addr_elements_are_display_text() {
        let cases = [
            "0.0.0.0",
            "9.10.99.100",
            "10.200.7.255",
            "255.255.255.255",
            "1.0.10.100",
            "fd00::1",
            "fd00:10:200:7::1a2b",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:10.0.0.1",
        ];
        for text in cases {
            let ip: IpAddr = text.parse().expect("test address");
            assert_eq!(addr_element(&ip), ip.to_string(), "{text}");
        }
        // Every octet value, in every position.
        for o in 0..=255u8 {
            let ip = IpAddr::from([o, 255 - o, o / 2, o.wrapping_mul(7)]);
            assert_eq!(addr_element(&ip), ip.to_string());
        }
    }
}
