//! Compile a node's resolved policy into the nftables ruleset that enforces it.
//!
//! Pure: [`NodePolicy`] → [`Ruleset`]. The layout (DESIGN.md, "The ruleset"):
//! - three base chains (`egress`, `ingress` at postrouting, `egress-to-node` at input) that
//!   accept established traffic and IPv6 neighbour discovery, then dispatch through verdict
//!   maps keyed by local pod address, so dispatch costs the same for 1 or 500 pods;
//! - per-pod chains that drop invalid packets, jump to each isolating policy's chain, and end
//!   in a per-pod terminal chain holding the counted drop;
//! - per-policy chains with one rule per (rule, peer, family, port kind) that `accept`s;
//! - sets shared by content: one per peer selector, one per ipBlock, one per named-port rule;
//! - while a staged ClusterNetworkPolicy concerns a local pod, a field of the packet mark that
//!   carries its verdict from its place in the tier chain to where today's verdict happens
//!   (drop points and settle base chains), because nftables' `accept`/`drop` end a chain and
//!   today's verdict is only known after the staged policy's place.
//!
//! Every name is deterministic (sorted input, FNV-1a hashes), so the same cluster state
//! always renders byte-identical text.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::engine::resolve::{
    CnpRules, LocalPod, NamedTargets, NodePolicy, PeerPods, PolicyRules, ResolvedCnpMatch,
    ResolvedCnpPeer, ResolvedCnpRule, ResolvedPeer, ResolvedPorts,
};
use crate::engine::ruleset::{
    Chain, ChainRole, CounterOwner, Element, NamedCounter, Ruleset, Set, addr_element,
};
use crate::model::policy::Direction;
use crate::model::{Action, Cidr, Family, NamespaceScope, ObjectKey, Protocol, Selector, Tier};
use compact_str::{ToCompactString, format_compact};

/// Knobs that change the rendered ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// When set, drops are also sent to this NFLOG group (`--log-denied`).
    pub log_group: Option<u16>,
    /// This node's pod address ranges (`--pod-cidr`). When empty, the ranges the resolver
    /// found for the node (its Node object's `spec.podCIDRs`) are used.
    pub pod_cidrs: Vec<Cidr>,
    /// What happens to an address in those ranges that is not a known pod of this node.
    pub unknown_addresses: UnknownAddresses,
    /// Audit mode (`--audit`): every terminal chain (a pod's drop, a ClusterNetworkPolicy
    /// Deny rule, an unknown address) counts, logs if asked, and accepts instead of dropping.
    pub audit: bool,
    /// The bits of `meta mark` that measure staged ClusterNetworkPolicies
    /// (`--staged-mark-mask`).
    pub staged_mark: StagedMarkMask,
}

/// The default `--staged-mark-mask`: the top byte. Of the marks other node components use
/// (kube-proxy 0x4000/0x8000, Istio 0x539, Weave 0x20000/0x40000, kube-router 0x10000/0x20000,
/// Tailscale 0xff0000, AWS VPC CNI 0x80, Cilium 0x0f00), only Calico (0xffff0000) and Cilium's
/// identity bits use it, and both enforce NetworkPolicy themselves, so they are not expected
/// beside this agent. Eight bits give 64 staged ClusterNetworkPolicies per node.
pub const DEFAULT_STAGED_MARK_MASK: u32 = 0xff00_0000;

/// A contiguous run of `meta mark` bits holding one staged ClusterNetworkPolicy verdict per
/// packet: the low two bits of the field are the action (1 Accept, 2 Deny, 3 Pass), the rest
/// the staged policy's slot on this node; zero means "nothing recorded".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedMarkMask(u32);

impl Default for StagedMarkMask {
    fn default() -> Self {
        Self(DEFAULT_STAGED_MARK_MASK)
    }
}

/// Why a `--staged-mark-mask` cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MarkMaskError {
    /// Not one run of set bits.
    #[error("staged mark mask {0:#010x} is not one contiguous run of bits")]
    NotContiguous(u32),
    /// Too narrow for one slot and an action.
    #[error("staged mark mask {0:#010x} has fewer than 3 bits (2 for the action, 1 for the slot)")]
    TooNarrow(u32),
}

impl StagedMarkMask {
    /// Check a mask: contiguous, at least 3 bits.
    pub fn new(mask: u32) -> Result<Self, MarkMaskError> {
        if mask.count_ones() < 3 {
            return Err(MarkMaskError::TooNarrow(mask));
        }
        let shifted = mask >> mask.trailing_zeros();
        if shifted & (shifted + 1) != 0 {
            return Err(MarkMaskError::NotContiguous(mask));
        }
        Ok(Self(mask))
    }

    /// The mask.
    pub fn mask(self) -> u32 {
        self.0
    }

    /// How many staged ClusterNetworkPolicies one node can measure.
    pub fn slots(self) -> usize {
        1usize << (self.0.count_ones() - 2)
    }

    /// The field value of `slot` recording `action`.
    pub fn value(self, slot: usize, action: Action) -> u32 {
        let a: u32 = match action {
            Action::Accept => 1,
            Action::Deny => 2,
            Action::Pass => 3,
        };
        ((slot as u32) << 2 | a) << self.0.trailing_zeros()
    }

    /// `meta mark & MASK`, the key of the staged verdict maps.
    fn field(self) -> String {
        format!("meta mark & {:#010x}", self.0)
    }

    /// `meta mark set meta mark & ~MASK | value`: sets the field, keeps every other bit.
    fn set(self, value: u32) -> String {
        format!(
            "meta mark set meta mark & {:#010x} | {value:#010x}",
            !self.0
        )
    }
}

impl CompileOptions {
    /// The final statement of a terminal chain: its counter and verdict.
    fn terminal(&self) -> &'static str {
        if self.audit {
            "counter packets 0 bytes 0 accept comment \"audit mode: would drop\""
        } else {
            "counter packets 0 bytes 0 drop"
        }
    }
}

/// Traffic from or to an address in this node's pod ranges that no known local pod holds
/// (`--unknown-addresses`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownAddresses {
    /// Fail closed: drop it (and count it), so a pod is never reachable, and never reaches
    /// out, before the agent knows it and has programmed its policies, even while the agent is
    /// stopped. A pod reusing a departed pod's address never inherits that pod's rules.
    #[default]
    Drop,
    /// Let it through, as before pod ranges were known: for CNIs whose pod ranges are not
    /// this node's alone.
    Allow,
}

/// Resolve `node` and apply the options that decide which of its pod ranges fail closed.
/// Everything that compiles for a running node goes through here, so the evaluator
/// (`explain`, the conntrack pass) sees the same ranges as the ruleset.
pub fn node_policy(
    snapshot: &crate::engine::index::Snapshot,
    node: &str,
    opts: &CompileOptions,
) -> NodePolicy {
    let mut np = crate::engine::resolve::resolve(snapshot, node);
    apply_pod_cidrs(&mut np, opts);
    np
}

/// Set `np.pod_cidrs` to the fail-closed ranges `opts` asks for (sorted, deduplicated).
pub fn apply_pod_cidrs(np: &mut NodePolicy, opts: &CompileOptions) {
    let mut ranges = match opts.unknown_addresses {
        UnknownAddresses::Allow => Vec::new(),
        UnknownAddresses::Drop if !opts.pod_cidrs.is_empty() => opts.pod_cidrs.clone(),
        UnknownAddresses::Drop => std::mem::take(&mut np.pod_cidrs),
    };
    ranges.sort();
    ranges.dedup();
    np.pod_cidrs = ranges;
}

/// Terminal chain counting drops of unknown addresses in this node's pod ranges.
pub fn unknown_drop_chain_name(direction: Direction) -> String {
    format!("unknown-address/{direction}/drop")
}

/// Name of the set of this node's pod ranges of one family, e.g. `pod-cidrs-v4`.
pub fn pod_cidrs_set_name(family: Family) -> String {
    format!("pod-cidrs-{}", family.suffix())
}

/// Name of the set of known local pod addresses of one family, e.g. `local-pods-v4`.
pub fn local_pods_set_name(family: Family) -> String {
    format!("local-pods-{}", family.suffix())
}

/// The elements of a `local-pods-*` set.
pub fn local_pods_elements(np: &NodePolicy, family: Family) -> Vec<Element> {
    np.local_addrs
        .iter()
        .filter(|ip| Family::of(ip) == family)
        .map(addr_element)
        .collect()
}

/// Families in which the fail-closed rule applies (those with a pod range).
fn fail_closed_families(np: &NodePolicy) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| np.pod_cidrs.iter().any(|c| c.family() == *f))
        .collect()
}

/// The fail-closed rule of one base chain and family: an address in the pod ranges that is
/// not a known local pod goes to the direction's counted drop. Traffic this node originates
/// (a source address local to the node, such as the bridge address in the pod range) is
/// exempt; ingress chains have accepted it already.
fn unknown_address_rule(d: Direction, f: Family, exempt_node: bool) -> String {
    let field = match d {
        Direction::Ingress => "daddr",
        Direction::Egress => "saddr",
    };
    let m = addr_match(f);
    let node = if exempt_node {
        " fib saddr type != local"
    } else {
        ""
    };
    format!(
        "{m} {field} @{} {m} {field} != @{}{node} goto {} comment \"in this node's pod ranges but not a known pod\"",
        pod_cidrs_set_name(f),
        local_pods_set_name(f),
        unknown_drop_chain_name(d),
    )
}

/// Base chain names and hooks. Priorities follow the kube-proxy nftables contract: at
/// postrouting, DNAT (priority dstnat) has already happened, so Service traffic shows its
/// backend pod, and masquerade (srcnat) has not, so the pod source address is still visible.
pub const EGRESS_CHAIN: &str = "egress";
/// See [`EGRESS_CHAIN`].
pub const INGRESS_CHAIN: &str = "ingress";
/// Pod → its own node: such packets never reach postrouting.
pub const EGRESS_TO_NODE_CHAIN: &str = "egress-to-node";

/// The longest chain or set name the kernel accepts (NFT_NAME_MAXLEN minus the NUL).
const MAX_NAME: usize = 255;

/// FNV-1a 64: stable across runs, platforms and Rust versions (unlike `DefaultHasher`).
pub fn stable_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 8 base-32 characters = 40 bits: readable, and collisions are checked at compile time.
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..8)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// Keep names under the kernel limit; a cut name gets a hash of the full one.
fn fit_name(full: String) -> String {
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = stable_hash(&full);
    let mut cut = MAX_NAME - hash.len() - 1;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash}", &full[..cut])
}

/// `ingress/<ns>/<pod>`: the per-pod chain.
pub fn pod_chain_name(direction: Direction, pod: &ObjectKey) -> String {
    fit_name(format!("{direction}/{}/{}", pod.namespace, pod.name))
}

/// `ingress/<ns>/<pod>/drop`: the per-pod terminal chain with the drop counter.
pub fn drop_chain_name(direction: Direction, pod: &ObjectKey) -> String {
    let chain = pod_chain_name(direction, pod);
    fit_name(format!("{chain}/drop"))
}

/// Is this (kernel) chain name one of our terminal drop chains?
pub fn is_drop_chain_name(name: &str) -> bool {
    name.ends_with("/drop")
}

/// Is this (kernel) chain name one of our rule chains with concatenated lookups (per-policy,
/// per-ClusterNetworkPolicy and per-pod tier chains), whose rules read-back cannot decode?
pub fn is_policy_chain_name(name: &str) -> bool {
    name.starts_with("policy/")
        || name.starts_with("cnp/")
        || name.starts_with("tier/")
        || name.starts_with("staged/")
        || name.starts_with("staged-cnp/")
}

/// `staged-cnp/<name>/ingress`: the chain that records a staged ClusterNetworkPolicy's first
/// matching rule in the mark field.
pub fn staged_cnp_chain_name(direction: Direction, name: &str) -> String {
    fit_name(format!("staged-cnp/{name}/{direction}"))
}

/// `staged-cnp/<name>/ingress/would-deny` (or `would-allow`): the chain that counts (and logs)
/// one verdict change of a staged ClusterNetworkPolicy and clears the mark field; also the
/// name of its counter.
pub fn staged_cnp_count_name(direction: Direction, name: &str, change: StagedChange) -> String {
    fit_name(format!("staged-cnp/{name}/{direction}/{}", change.as_str()))
}

/// The chain that only clears the mark field (a recorded verdict that changes nothing).
pub const STAGED_CNP_CLEAR_CHAIN: &str = "staged-cnp/clear";

/// `staged-cnp-would-allow-ingress`: mark field value → the would-allow count, looked up
/// where a packet of a local pod is dropped.
pub fn staged_cnp_allow_map_name(direction: Direction) -> String {
    format!("staged-cnp-would-allow-{direction}")
}

/// `staged-cnp-settle-ingress`: mark field value → the would-deny count or the clear, looked
/// up by the settle base chains after our accept.
pub fn staged_cnp_settle_map_name(direction: Direction) -> String {
    format!("staged-cnp-settle-{direction}")
}

/// `staged/<ns>/<name>/ingress/would-allow` or `…/would-deny`: the chain that measures one
/// staged NetworkPolicy in one direction, for the pods it would isolate (`would-deny`: not
/// isolated today) or further allow (`would-allow`: isolated today).
pub fn staged_chain_name(direction: Direction, policy: &ObjectKey, change: StagedChange) -> String {
    fit_name(format!(
        "staged/{}/{}/{direction}/{}",
        policy.namespace,
        policy.name,
        change.as_str()
    ))
}

/// `staged/<ns>/<name>/ingress/would-allow`: the named counter of one staged policy,
/// direction and kind of verdict change (same name as its chain; counters and chains are
/// separate namespaces in nftables).
pub fn staged_counter_name(
    direction: Direction,
    policy: &ObjectKey,
    change: StagedChange,
) -> String {
    staged_chain_name(direction, policy, change)
}

/// The verdict a staged policy would change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StagedChange {
    /// Allowed today, denied with the staged policy.
    WouldDeny,
    /// Denied today, allowed with the staged policy.
    WouldAllow,
}

impl StagedChange {
    /// `would-deny` / `would-allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            StagedChange::WouldDeny => "would-deny",
            StagedChange::WouldAllow => "would-allow",
        }
    }
}

/// `cnp/<name>/ingress`: the rules of one ClusterNetworkPolicy in one direction.
pub fn cnp_chain_name(direction: Direction, name: &str) -> String {
    fit_name(format!("cnp/{name}/{direction}"))
}

/// `cnp/<name>/ingress/<index>/drop`: the counted drop of one `Deny` rule.
pub fn cnp_deny_chain_name(direction: Direction, name: &str, index: usize) -> String {
    fit_name(format!("cnp/{name}/{direction}/{index}/drop"))
}

/// `tier/admin/ingress/<ns>/<pod>`: one pod's ClusterNetworkPolicies of one tier, in order.
pub fn tier_chain_name(tier: Tier, direction: Direction, pod: &ObjectKey) -> String {
    fit_name(format!(
        "tier/{}/{direction}/{}/{}",
        tier.as_str(),
        pod.namespace,
        pod.name
    ))
}

/// `policy/<ns>/<name>/ingress`: the per-policy chain.
pub fn policy_chain_name(direction: Direction, policy: &ObjectKey) -> String {
    fit_name(format!(
        "policy/{}/{}/{direction}",
        policy.namespace, policy.name
    ))
}

/// `hits/np/<ns>/<name>/ingress/<index>`: the named counter of one NetworkPolicy rule.
pub fn rule_counter_name(direction: Direction, policy: &ObjectKey, index: usize) -> String {
    fit_name(format!(
        "hits/np/{}/{}/{direction}/{index}",
        policy.namespace, policy.name
    ))
}

/// `hits/cnp/<name>/ingress/<index>`: the named counter of one ClusterNetworkPolicy `Accept`
/// or `Pass` rule.
pub fn cnp_rule_counter_name(direction: Direction, name: &str, index: usize) -> String {
    fit_name(format!("hits/cnp/{name}/{direction}/{index}"))
}

/// Name of the dispatch map for one direction and family, e.g. `ingress-v4`.
pub fn dispatch_map_name(direction: Direction, family: Family) -> String {
    format!("{direction}-{}", family.suffix())
}

/// The log prefix of a drop rule; the deny logger parses it back.
pub fn log_prefix(direction: Direction, pod: &ObjectKey) -> String {
    crate::engine::log_prefix::encode_prefix(direction, &pod.namespace, &pod.name)
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn addr_match(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Accumulates shared sets, detecting hash collisions.
#[derive(Default)]
pub(crate) struct Sets {
    /// Name → (identity, set).
    pub(crate) by_name: BTreeMap<String, (String, Set)>,
    pub(crate) origins: SetOrigins,
    /// Names registered since the current policy chain began.
    touched: Vec<String>,
    /// Each IPv6 address as text, formatted once: a pod's address is an element of every
    /// peer set it belongs to, and IPv6 formatting costs more than a lookup (IPv4 text is
    /// written directly, cheaper than any lookup).
    addr_text: HashMap<IpAddr, Element, foldhash::fast::FixedState>,
    /// The set already named for a resolved peer (by address: one per selector pair) and
    /// family, so a peer used by many rules is formatted and hashed once.
    peer_names: HashMap<(usize, Family), String>,
}

/// Which resolved object each content-derived set was built from, so an incremental update
/// can rewrite exactly the sets whose source changed (see `incremental`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetOrigins {
    /// Peer selector pair and family → set name.
    pub peers: BTreeMap<(NamespaceScope, Selector, Family), String>,
    /// (policy, direction, rule index, family) → named-port set name.
    pub named: BTreeMap<(ObjectKey, Direction, usize, Family), String>,
    /// (policy, direction) → every set its chain registered (a set lives while one does).
    pub by_policy: BTreeMap<(ObjectKey, Direction), Vec<String>>,
    /// (ClusterNetworkPolicy, direction) → every set its chain registered.
    pub by_cnp: BTreeMap<(String, Direction), Vec<String>>,
}

impl SetOrigins {
    /// Every set some policy chain registers: the sets that must exist.
    pub(crate) fn live(&self) -> std::collections::BTreeSet<&String> {
        self.by_policy
            .values()
            .chain(self.by_cnp.values())
            .flatten()
            .collect()
    }
}

/// (ClusterNetworkPolicy, direction) → its priority and the `Pass` matchers a tier chain
/// repeats after jumping to it (see [`cnp_chain`]).
pub(crate) type CnpPass = BTreeMap<(String, Direction), (u16, Vec<String>)>;

impl Sets {
    /// Register a set identified by `identity`; returns its name.
    fn add(&mut self, prefix: &str, identity: &str, make: impl FnOnce(String) -> Set) -> String {
        let mut salt = 0u32;
        loop {
            let keyed = if salt == 0 {
                identity.to_string()
            } else {
                format!("{identity}#{salt}")
            };
            let name = format!("{prefix}-{}", stable_hash(&keyed));
            match self.by_name.get(&name) {
                Some((id, _)) if id == identity => {
                    self.touched.push(name.clone());
                    return name;
                }
                Some(_) => salt += 1, // a 40-bit collision: vanishingly rare, but never merge sets
                None => {
                    let set = make(name.clone());
                    self.by_name
                        .insert(name.clone(), (identity.to_string(), set));
                    self.touched.push(name.clone());
                    return name;
                }
            }
        }
    }
}

/// The elements of a peer set: the peer pods' addresses of one family, in address order.
pub fn peer_set_elements(peer: &PeerPods, family: Family) -> Vec<Element> {
    peer.addrs
        .iter()
        .filter(|ip| Family::of(ip) == family)
        .map(addr_element)
        .collect()
}

fn peer_set(sets: &mut Sets, peer: &PeerPods, family: Family) -> String {
    // Rules sharing a selector pair share one resolved peer: its set is named once.
    let seen = (peer as *const PeerPods as usize, family);
    if let Some(name) = sets.peer_names.get(&seen) {
        let name = name.clone();
        sets.touched.push(name.clone());
        return name;
    }
    let identity = format!("{family:?}|{:?}|{}", peer.scope, peer.pods);
    let mut addr_text = std::mem::take(&mut sets.addr_text);
    let name = sets.add(&format!("peers-{}", family.suffix()), &identity, |name| {
        Set {
            name,
            key_type: addr_type(family).into(),
            verdict_map: false,
            interval: false,
            comment: peer.describe(),
            elements: peer
                .addrs
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(|ip| match ip {
                    IpAddr::V4(_) => addr_element(ip),
                    IpAddr::V6(_) => addr_text
                        .entry(*ip)
                        .or_insert_with(|| addr_element(ip))
                        .clone(),
                })
                .collect(),
        }
    });
    sets.addr_text = addr_text;
    sets.origins
        .peers
        .entry((peer.scope.clone(), peer.pods.clone(), family))
        .or_insert_with(|| name.clone());
    sets.peer_names.insert(seen, name.clone());
    name
}

fn cidr_set(sets: &mut Sets, block_text: &str, ranges: &[Cidr], family: Family) -> String {
    let identity = format!("{family:?}|{block_text}");
    sets.add(&format!("cidr-{}", family.suffix()), &identity, |name| {
        Set {
            name,
            key_type: addr_type(family).into(),
            verdict_map: false,
            interval: true,
            comment: format!("ipBlock {block_text}"),
            elements: ranges
                .iter()
                .map(ToCompactString::to_compact_string)
                .collect(),
        }
    })
}

/// The elements of a named-port set: (address . protocol . port) of one family, in order.
pub fn named_set_elements(named: &NamedTargets, family: Family) -> Vec<Element> {
    named
        .targets
        .iter()
        .filter(|(ip, _, _)| Family::of(ip) == family)
        .map(|(ip, proto, port)| format_compact!("{ip} . {} . {port}", proto.nft_name()))
        .collect()
}

fn named_set(sets: &mut Sets, owner: &str, named: &NamedTargets, family: Family) -> String {
    let names = named
        .names
        .iter()
        .map(|(p, n)| format!("{n}/{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let identity = format!("{family:?}|{owner}|{names}");
    sets.add(&format!("named-{}", family.suffix()), &identity, |name| {
        Set {
            name,
            key_type: format!("{} . inet_proto . inet_service", addr_type(family)),
            verdict_map: false,
            interval: false,
            comment: format!("{owner}: named ports {names}"),
            elements: named_set_elements(named, family),
        }
    })
}

fn numeric_ports(ports: &[(Protocol, u16, u16)]) -> String {
    let items: Vec<String> = ports
        .iter()
        .map(|(p, lo, hi)| {
            if lo == hi {
                format!("{} . {lo}", p.nft_name())
            } else {
                format!("{} . {lo}-{hi}", p.nft_name())
            }
        })
        .collect();
    format!("meta l4proto . th dport {{ {} }}", items.join(", "))
}

/// The peer side of a rule: where the peer's address is in the packet.
fn peer_field(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    }
}

/// One `accept` rule from its match expressions, counting into the rule's named counter.
fn accept_rule(matches: &[&str], counter: &str, comment: &str) -> String {
    let mut s = String::new();
    for m in matches.iter().filter(|m| !m.is_empty()) {
        s.push_str(m);
        s.push(' ');
    }
    s.push_str("counter name \"");
    s.push_str(counter);
    s.push_str("\" accept comment ");
    s.push_str(&crate::engine::ruleset::quote_comment(comment));
    s
}

/// One rule from its match expressions ending in `verdict` (no per-rule counter).
fn verdict_rule(matches: &[&str], verdict: &str, comment: &str) -> String {
    let mut s = String::new();
    for m in matches.iter().filter(|m| !m.is_empty()) {
        s.push_str(m);
        s.push(' ');
    }
    s.push_str(verdict);
    s.push_str(" comment ");
    s.push_str(&crate::engine::ruleset::quote_comment(comment));
    s
}

/// Rules of one policy chain: per rule, per peer, per family, per kind of port match; and
/// the named counter of each rule, which all of the rule's nft rules count into.
fn policy_rules(sets: &mut Sets, pr: &PolicyRules) -> (Vec<String>, Vec<NamedCounter>) {
    policy_rules_ending(sets, pr, None)
}

/// [`policy_rules`], or with `verdict` (e.g. `return`) ending each rule instead of the rule's
/// hit counter and `accept`: a staged policy's matchers, which count nothing per rule.
fn policy_rules_ending(
    sets: &mut Sets,
    pr: &PolicyRules,
    verdict: Option<&str>,
) -> (Vec<String>, Vec<NamedCounter>) {
    let d = pr.direction;
    let peers_key = match d {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut out = Vec::new();
    let mut counters = Vec::new();
    for rule in &pr.rules {
        let path = format!("spec.{d}[{}]", rule.index);
        let owner = format!("{} {path}", pr.policy);
        let counter = rule_counter_name(d, &pr.policy, rule.index);
        if verdict.is_none() {
            counters.push(NamedCounter {
                name: counter.clone(),
                comment: format!("NetworkPolicy {owner}: new connections accepted"),
                owner: CounterOwner::Policy {
                    namespace: pr.policy.namespace.clone(),
                    policy: pr.policy.name.clone(),
                    direction: d.as_str(),
                    rule: rule.index,
                },
            });
        }
        let numeric = rule
            .ports
            .as_ref()
            .filter(|p| !p.numeric.is_empty())
            .map(|p| numeric_ports(&p.numeric));
        let named = rule.ports.as_ref().and_then(|p| p.named.as_ref());
        let any_port = rule.ports.is_none();
        let named_match = |sets: &mut Sets, f: Family| {
            named.map(|n| {
                let set = named_set(sets, &owner, n, f);
                sets.origins
                    .named
                    .entry((pr.policy.clone(), d, rule.index, f))
                    .or_insert_with(|| set.clone());
                format!("{} daddr . meta l4proto . th dport @{set}", addr_match(f))
            })
        };
        // Emit the rules for one peer matcher (empty = any peer).
        let mut emit = |peer: &str, ports: Option<&str>, comment: &str| {
            let matches = match ports {
                Some(p) => vec![peer, p],
                None => vec![peer],
            };
            out.push(match verdict {
                None => accept_rule(&matches, &counter, comment),
                Some(v) => verdict_rule(&matches, v, comment),
            });
        };
        match &rule.peers {
            None => {
                let comment = format!("{path}: any peer");
                if any_port {
                    emit("", None, &comment);
                }
                if let Some(n) = &numeric {
                    emit("", Some(n), &comment);
                }
                for f in Family::ALL {
                    if let Some(n) = named_match(sets, f) {
                        emit("", Some(&n), &comment);
                    }
                }
            }
            Some(peers) => {
                // The rules for one peer matcher: every port, the numeric ports, and on
                // ingress the named ports, which resolve on the selected (destination) pod.
                // On egress a named port resolves on the peer pods (below), and never on an
                // ipBlock address, which is not a pod.
                let mut emit_peer = |sets: &mut Sets, m: &str, f: Family, comment: &str| {
                    if any_port {
                        emit(m, None, comment);
                    }
                    if let Some(n) = &numeric {
                        emit(m, Some(n), comment);
                    }
                    if d == Direction::Ingress {
                        if let Some(n) = named_match(sets, f) {
                            emit(m, Some(&n), comment);
                        }
                    }
                };
                for (pi, peer) in peers.iter().enumerate() {
                    let comment = format!("{path}.{peers_key}[{pi}]");
                    match peer {
                        ResolvedPeer::Pods(pods) => {
                            for f in Family::ALL {
                                let set = peer_set(sets, pods, f);
                                let m = format!("{} {} @{set}", addr_match(f), peer_field(d));
                                emit_peer(sets, &m, f, &comment);
                            }
                        }
                        ResolvedPeer::IpBlock { block, ranges } => {
                            if ranges.is_empty() {
                                continue; // the excepts cover the whole cidr: matches nothing
                            }
                            let f = block.cidr.family();
                            let mut text = block.cidr.to_string();
                            if !block.except.is_empty() {
                                let ex: Vec<String> =
                                    block.except.iter().map(ToString::to_string).collect();
                                text.push_str(&format!(" except {}", ex.join(", ")));
                            }
                            let set = cidr_set(sets, &text, ranges, f);
                            let m = format!("{} {} @{set}", addr_match(f), peer_field(d));
                            emit_peer(sets, &m, f, &comment);
                        }
                    }
                }
                // Egress: named ports resolve on the peer (destination) pods, so the named set
                // holds exactly the peer pods that declare the port; no peer set is needed.
                if d == Direction::Egress {
                    let has_pod_peer = peers.iter().any(|p| matches!(p, ResolvedPeer::Pods(_)));
                    if has_pod_peer {
                        for f in Family::ALL {
                            if let Some(n) = named_match(sets, f) {
                                emit(
                                    "",
                                    Some(&n),
                                    &format!("{path}: named ports of {peers_key} pods"),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    (out, counters)
}

/// What a pod chain needs to know about each policy of the node.
#[derive(Debug, Default)]
pub(crate) struct PolicyFacts {
    /// (policy, direction) → whether its chain has rules (otherwise nothing jumps to it).
    has_rules: BTreeMap<(ObjectKey, Direction), bool>,
    /// Policies that are invalid (they isolate but allow nothing).
    invalid: BTreeMap<ObjectKey, bool>,
    /// (ClusterNetworkPolicy, direction) → its priority and the rules a tier chain repeats
    /// after jumping to it: one `… return` per matcher of each `Pass` rule (see
    /// [`cnp_chain`] for why).
    pub(crate) cnp_pass: CnpPass,
    /// (pod, direction) → the staged policies selecting it there, and whether each can allow
    /// anything (valid, with rules).
    staged: BTreeMap<(ObjectKey, Direction), Vec<(ObjectKey, bool)>>,
    /// The staged ClusterNetworkPolicies measured on this node (see [`StagedCnpPlan`]).
    pub(crate) staged_cnp: StagedCnpPlan,
}

/// Which staged ClusterNetworkPolicies this node measures, in which slot of the mark field,
/// and where each sits in its pods' tier chains.
#[derive(Debug, Default)]
pub(crate) struct StagedCnpPlan {
    /// The mark field.
    mask: StagedMarkMask,
    /// Measured staged policy → its slot (by name, so the same state gives the same slots).
    slots: BTreeMap<String, usize>,
    /// Staged policies selecting a local pod that got no slot (the field is full).
    unmeasured: Vec<String>,
    /// (pod, tier, direction) → the measured staged policies there: (priority, name).
    on_pod: BTreeMap<(ObjectKey, Tier, Direction), Vec<(u16, String)>>,
    /// Is anything measured in this direction (index: ingress 0, egress 1)?
    directions: [bool; 2],
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl StagedCnpPlan {
    pub(crate) fn of(np: &NodePolicy, opts: &CompileOptions) -> Self {
        let mask = opts.staged_mark;
        let names: std::collections::BTreeSet<&String> =
            np.staged_cnps.iter().map(|c| &c.name).collect();
        let mut plan = Self {
            mask,
            ..Self::default()
        };
        for (slot, name) in names.into_iter().enumerate() {
            if slot < mask.slots() {
                plan.slots.insert(name.clone(), slot);
            } else {
                plan.unmeasured.push(name.clone());
            }
        }
        for cr in &np.staged_cnps {
            if !plan.slots.contains_key(&cr.name) {
                continue;
            }
            plan.directions[dir_index(cr.direction)] = true;
            for pod in &cr.selected {
                plan.on_pod
                    .entry((pod.clone(), cr.tier, cr.direction))
                    .or_default()
                    .push((cr.priority, cr.name.clone()));
            }
        }
        plan
    }

    fn on(&self, pod: &ObjectKey, tier: Tier, d: Direction) -> &[(u16, String)] {
        self.on_pod
            .get(&(pod.clone(), tier, d))
            .map_or(&[][..], Vec::as_slice)
    }

    fn any_on(&self, pod: &ObjectKey, d: Direction) -> bool {
        !self.on(pod, Tier::Admin, d).is_empty() || !self.on(pod, Tier::Baseline, d).is_empty()
    }

    fn measures(&self, d: Direction) -> bool {
        self.directions[dir_index(d)]
    }

    /// The drop-point rule: count a recorded staged `Accept` as would-allow.
    fn would_allow_lookup(&self, d: Direction) -> String {
        format!(
            "{} vmap @{}",
            self.mask.field(),
            staged_cnp_allow_map_name(d)
        )
    }
}

/// The staged ClusterNetworkPolicies that select a pod of this node but are not measured,
/// because the mark field (`--staged-mark-mask`) has no slot left for them.
pub fn unmeasured_staged_cnps(np: &NodePolicy, opts: &CompileOptions) -> Vec<String> {
    StagedCnpPlan::of(np, opts).unmeasured
}

impl PolicyFacts {
    pub(crate) fn of(np: &NodePolicy) -> Self {
        Self {
            has_rules: np
                .policies
                .iter()
                .map(|p| ((p.policy.clone(), p.direction), !p.rules.is_empty()))
                .collect(),
            invalid: np
                .policies
                .iter()
                .map(|p| (p.policy.clone(), p.invalid.is_some()))
                .collect(),
            cnp_pass: BTreeMap::new(),
            staged_cnp: StagedCnpPlan::default(),
            staged: {
                let mut m: BTreeMap<(ObjectKey, Direction), Vec<(ObjectKey, bool)>> =
                    BTreeMap::new();
                for sr in &np.staged {
                    let can_allow = sr.invalid.is_none() && !sr.rules.is_empty();
                    for pod in &sr.selected {
                        m.entry((pod.clone(), sr.direction))
                            .or_default()
                            .push((sr.policy.clone(), can_allow));
                    }
                }
                m
            },
        }
    }

    /// The staged policies selecting `pod` in `d`.
    fn staged_on(&self, pod: &ObjectKey, d: Direction) -> &[(ObjectKey, bool)] {
        self.staged
            .get(&(pod.clone(), d))
            .map_or(&[][..], Vec::as_slice)
    }
}

/// The chains of one local pod in one direction.
pub(crate) struct PodChains {
    /// `ingress/<ns>/<pod>`: the Admin tier, then each isolating NetworkPolicy and the drop
    /// chain, or (not isolated) the Baseline tier.
    pub(crate) chain: Chain,
    /// `ingress/<ns>/<pod>/drop`: the counted drop, when a NetworkPolicy isolates the pod.
    pub(crate) drop: Option<Chain>,
    /// `tier/<tier>/ingress/<ns>/<pod>`: the ClusterNetworkPolicies of each tier that apply.
    pub(crate) tiers: Vec<Chain>,
}

/// A pod's chain of one tier: jump to each ClusterNetworkPolicy in order; after each, repeat
/// its `Pass` matchers with `return` (back to the pod chain: the next tier).
fn tier_chain(pod: &LocalPod, tier: Tier, d: Direction, facts: &PolicyFacts) -> Option<Chain> {
    let names = pod.cnps.get(tier, d);
    let staged = facts.staged_cnp.on(&pod.key, tier, d);
    if names.is_empty() && staged.is_empty() {
        return None;
    }
    // (priority, name, staged): enforced ones are in evaluation order already; a staged one
    // takes its place among them by priority, then name, as if it were enforced.
    let mut entries: Vec<(u16, &str, bool)> = names
        .iter()
        .map(|name| {
            let priority = facts
                .cnp_pass
                .get(&(name.clone(), d))
                .map_or(0, |(p, _)| *p);
            (priority, name.as_str(), false)
        })
        .collect();
    if !staged.is_empty() {
        entries.extend(staged.iter().map(|(p, n)| (*p, n.as_str(), true)));
        entries.sort();
    }
    let mut rules = Vec::new();
    for (priority, name, is_staged) in entries {
        if is_staged {
            // Only the first staged policy that matches records: the field is empty.
            rules.push(format!(
                "{} == 0x00000000 jump {} comment {}",
                facts.staged_cnp.mask.field(),
                staged_cnp_chain_name(d, name),
                crate::engine::ruleset::quote_comment(&format!(
                    "staged {tier} ClusterNetworkPolicy {name} priority {priority}"
                ))
            ));
            continue;
        }
        let pass = facts
            .cnp_pass
            .get(&(name.to_string(), d))
            .map_or(&[][..], |(_, pass)| pass.as_slice());
        rules.push(format!(
            "jump {} comment {}",
            cnp_chain_name(d, name),
            crate::engine::ruleset::quote_comment(&format!(
                "{tier} ClusterNetworkPolicy {name} priority {priority}"
            ))
        ));
        rules.extend(pass.iter().cloned());
    }
    Some(Chain {
        name: tier_chain_name(tier, d, &pod.key),
        role: ChainRole::Pod,
        comment: format!("{tier} tier, {d} of pod {}", pod.key),
        rules,
        counters: Vec::new(),
    })
}

/// The chains of `pod` for direction `d`, if some policy isolates it that way.
pub(crate) fn pod_chains(
    pod: &LocalPod,
    d: Direction,
    facts: &PolicyFacts,
    opts: &CompileOptions,
) -> Option<PodChains> {
    let isolated = pod.isolated_by(d);
    let staged = facts.staged_on(&pod.key, d);
    let staged_cnp = facts.staged_cnp.any_on(&pod.key, d);
    let enforced = isolated.is_some() || pod.cnps.any(d);
    if !enforced && !staged_cnp {
        if staged.is_empty() {
            return None;
        }
        // Only staged policies select the pod: a chain that measures them and changes no
        // verdict (no `ct state invalid drop` either: today nothing drops here).
        return Some(PodChains {
            chain: Chain {
                name: pod_chain_name(d, &pod.key),
                role: ChainRole::Pod,
                comment: format!("{d} of pod {}", pod.key),
                rules: staged_jumps(staged, d, false),
                counters: Vec::new(),
            },
            drop: None,
            tiers: Vec::new(),
        });
    }
    let chain = pod_chain_name(d, &pod.key);
    let drop = drop_chain_name(d, &pod.key);
    // A pod that only staged policies concern keeps today's verdicts: no invalid drop.
    let mut rules = if enforced {
        vec!["ct state invalid drop".to_string()]
    } else {
        Vec::new()
    };
    let mut tiers = Vec::new();
    if let Some(admin) = tier_chain(pod, Tier::Admin, d, facts) {
        rules.push(format!("jump {} comment \"Admin tier\"", admin.name));
        tiers.push(admin);
    }
    let Some(policies) = isolated else {
        // With a staged policy the pod would be isolated here, after the Admin tier (the
        // Baseline tier would then not apply).
        rules.extend(staged_jumps(staged, d, false));
        // NetworkPolicy does not isolate the pod: the Baseline tier decides, then allow.
        if let Some(baseline) = tier_chain(pod, Tier::Baseline, d, facts) {
            rules.push(format!(
                "jump {} comment \"Baseline tier (no NetworkPolicy isolates the pod)\"",
                baseline.name
            ));
            tiers.push(baseline);
        }
        return Some(PodChains {
            chain: Chain {
                name: chain,
                role: ChainRole::Pod,
                comment: format!("{d} of pod {}", pod.key),
                rules,
                counters: Vec::new(),
            },
            drop: None,
            tiers,
        });
    };
    for p in policies {
        if facts
            .has_rules
            .get(&(p.clone(), d))
            .copied()
            .unwrap_or(false)
        {
            rules.push(format!("jump {}", policy_chain_name(d, p)));
        }
    }
    // What isolates the pod lives in a rule comment: rules are rewritten on change,
    // object comments are not (the kernel keeps the first comment of a chain).
    let mut names: Vec<String> = Vec::new();
    for p in policies {
        let invalid = facts.invalid.get(p).copied().unwrap_or(false);
        names.push(if invalid {
            format!("{p} (invalid: allows nothing)")
        } else {
            p.to_string()
        });
    }
    // Denied today from here on: what each staged policy would allow instead.
    rules.extend(staged_jumps(staged, d, true));
    if !facts.staged_cnp.on(&pod.key, Tier::Admin, d).is_empty() {
        rules.push(format!(
            "{} comment \"staged ClusterNetworkPolicy Accept, denied here\"",
            facts.staged_cnp.would_allow_lookup(d)
        ));
    }
    rules.push(format!(
        "goto {drop} comment {}",
        crate::engine::ruleset::quote_comment(&format!("isolated by {}", names.join(", ")))
    ));
    let mut drop_rule = String::new();
    if let Some(group) = opts.log_group {
        drop_rule.push_str(&format!(
            "log prefix \"{}\" group {group} ",
            log_prefix(d, &pod.key)
        ));
    }
    drop_rule.push_str(opts.terminal());
    Some(PodChains {
        chain: Chain {
            name: chain,
            role: ChainRole::Pod,
            comment: format!("{d} of pod {}", pod.key),
            rules,
            counters: Vec::new(),
        },
        tiers,
        drop: Some(Chain {
            name: drop,
            role: ChainRole::Drop {
                namespace: pod.key.namespace.clone(),
                pod: pod.key.name.clone(),
                direction: d.as_str(),
            },
            comment: match d {
                Direction::Ingress => {
                    format!("ingress to pod {} not allowed by any policy", pod.key)
                }
                Direction::Egress => {
                    format!("egress from pod {} not allowed by any policy", pod.key)
                }
            },
            rules: vec![drop_rule],
            counters: Vec::new(),
        }),
    })
}

/// The jumps of a pod chain to the staged policies' measuring chains: `isolated` = denied
/// today at this point (the would-allow chains), else allowed today (the would-deny chains).
/// A staged policy that allows nothing cannot change a denial, so it has no would-allow jump.
fn staged_jumps(staged: &[(ObjectKey, bool)], d: Direction, isolated: bool) -> Vec<String> {
    let change = if isolated {
        StagedChange::WouldAllow
    } else {
        StagedChange::WouldDeny
    };
    staged
        .iter()
        .filter(|(_, can_allow)| !isolated || *can_allow)
        .map(|(p, _)| {
            format!(
                "jump {} comment {}",
                staged_chain_name(d, p, change),
                crate::engine::ruleset::quote_comment(&format!("staged NetworkPolicy {p}"))
            )
        })
        .collect()
}

/// The measuring chains of one staged policy in one direction: `would-allow` (its rules,
/// each counting and returning) when it selects a pod isolated today, `would-deny` (its
/// rules returning, then the count) when it selects a pod not isolated today. Only the
/// chains some pod chain jumps to are made.
pub(crate) fn staged_chains(
    sets: &mut Sets,
    sr: &PolicyRules,
    np: &NodePolicy,
    opts: &CompileOptions,
) -> Vec<Chain> {
    let d = sr.direction;
    let pods: BTreeMap<&ObjectKey, &LocalPod> = np.pods.iter().map(|p| (&p.key, p)).collect();
    let can_allow = sr.invalid.is_none() && !sr.rules.is_empty();
    let (mut any_isolated, mut any_open) = (false, false);
    for key in &sr.selected {
        match pods.get(key).and_then(|p| p.isolated_by(d)) {
            Some(_) => any_isolated = true,
            None => any_open = true,
        }
    }
    let mut out = Vec::new();
    for (change, wanted) in [
        (StagedChange::WouldAllow, any_isolated && can_allow),
        (StagedChange::WouldDeny, any_open),
    ] {
        if !wanted {
            continue;
        }
        let counter = staged_counter_name(d, &sr.policy, change);
        let mut count = String::new();
        if let Some(group) = opts.log_group {
            count.push_str(&format!(
                "log prefix \"{}\" group {group} ",
                crate::engine::log_prefix::encode_staged_prefix(
                    d,
                    change == StagedChange::WouldAllow,
                    &sr.policy.namespace,
                    &sr.policy.name
                )
            ));
        }
        count.push_str(&format!("counter name \"{counter}\""));
        let what = match change {
            StagedChange::WouldAllow => "denied today, allowed with it",
            StagedChange::WouldDeny => "allowed today, denied with it",
        };
        let rules = match change {
            StagedChange::WouldAllow => {
                policy_rules_ending(sets, sr, Some(&format!("{count} return"))).0
            }
            StagedChange::WouldDeny => {
                let mut rules = policy_rules_ending(sets, sr, Some("return")).0;
                rules.push(format!(
                    "{count} comment {}",
                    crate::engine::ruleset::quote_comment(&format!(
                        "no rule of staged {} matches",
                        sr.policy
                    ))
                ));
                rules
            }
        };
        out.push(Chain {
            name: staged_chain_name(d, &sr.policy, change),
            role: ChainRole::Policy,
            comment: format!(
                "staged NetworkPolicy {} {d}: {}",
                sr.policy,
                change.as_str()
            ),
            rules,
            counters: vec![NamedCounter {
                name: counter,
                comment: format!("staged NetworkPolicy {} {d}: {what}", sr.policy),
                owner: CounterOwner::Staged {
                    namespace: sr.policy.namespace.clone(),
                    policy: sr.policy.name.clone(),
                    direction: d.as_str(),
                    change: change.as_str(),
                },
            }],
        });
    }
    out
}

/// The chain of one policy in one direction, registering the sets it uses; `None` when it
/// has no rules (the pods it isolates then jump nowhere and fall through to their drop).
pub(crate) fn policy_chain(sets: &mut Sets, pr: &PolicyRules) -> Option<Chain> {
    if pr.rules.is_empty() {
        return None;
    }
    sets.touched.clear();
    let (rules, counters) = policy_rules(sets, pr);
    let mut used = std::mem::take(&mut sets.touched);
    used.sort();
    used.dedup();
    sets.origins
        .by_policy
        .insert((pr.policy.clone(), pr.direction), used);
    Some(Chain {
        name: policy_chain_name(pr.direction, &pr.policy),
        role: ChainRole::Policy,
        comment: format!("NetworkPolicy {} {} rules", pr.policy, pr.direction),
        rules,
        counters,
    })
}

const ND_TYPES: &str =
    "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect";

fn base_chain(
    name: &str,
    hook: &'static str,
    priority: &'static str,
    comment: &str,
    dispatch: Direction,
    from_node: bool,
    fail_closed: &[Family],
) -> Chain {
    let field = match dispatch {
        Direction::Ingress => "daddr",
        Direction::Egress => "saddr",
    };
    let mut rules = vec![
        "ct state established,related accept".to_string(),
        format!("icmpv6 type {{ {ND_TYPES} }} accept comment \"IPv6 neighbour discovery\""),
    ];
    if from_node {
        rules
            .push("fib saddr type local accept comment \"from this node (kubelet probes)\"".into());
    }
    for f in fail_closed {
        rules.push(unknown_address_rule(dispatch, *f, !from_node));
    }
    for f in Family::ALL {
        rules.push(format!(
            "{} {field} vmap @{}",
            addr_match(f),
            dispatch_map_name(dispatch, f)
        ));
    }
    Chain {
        name: name.into(),
        role: ChainRole::Base { hook, priority },
        comment: comment.into(),
        rules,
        counters: Vec::new(),
    }
}

/// The counted drop of unknown addresses in one direction. Like a pod's terminal chain, it is
/// created once and never rewritten, so its counter survives every sync.
fn unknown_drop_chain(d: Direction, opts: &CompileOptions) -> Chain {
    Chain {
        name: unknown_drop_chain_name(d),
        role: ChainRole::UnknownDrop {
            direction: d.as_str(),
        },
        comment: match d {
            Direction::Ingress => {
                "to an address in this node's pod ranges that is not a known pod".into()
            }
            Direction::Egress => {
                "from an address in this node's pod ranges that is not a known pod".into()
            }
        },
        rules: vec![opts.terminal().into()],
        counters: Vec::new(),
    }
}

/// The `pod-cidrs-*` and `local-pods-*` sets of one family.
fn fail_closed_sets(np: &NodePolicy, f: Family) -> [Set; 2] {
    let ranges: Vec<&Cidr> = np.pod_cidrs.iter().filter(|c| c.family() == f).collect();
    [
        Set {
            name: local_pods_set_name(f),
            key_type: addr_type(f).into(),
            verdict_map: false,
            interval: false,
            comment: format!("addresses of the known pods of node {}", np.node),
            elements: local_pods_elements(np, f),
        },
        Set {
            name: pod_cidrs_set_name(f),
            key_type: addr_type(f).into(),
            verdict_map: false,
            interval: true,
            comment: format!("pod address ranges of node {}", np.node),
            elements: ranges
                .iter()
                .map(ToCompactString::to_compact_string)
                .collect(),
        },
    ]
}

/// Compile a node's policy into its ruleset.
pub fn compile(np: &NodePolicy, opts: &CompileOptions) -> Ruleset {
    compile_with_identities(np, opts).0
}

/// [`compile`], also saying which resolved object each content-derived set came from and
/// each one's identity (what its name hashes), so an incremental update can edit exactly the
/// sets a change touches and tell a shared set from a hash collision.
pub(crate) fn compile_with_identities(
    np: &NodePolicy,
    opts: &CompileOptions,
) -> (Ruleset, SetOrigins, BTreeMap<String, String>, CnpPass) {
    let mut sets = Sets::default();
    let fail_closed = fail_closed_families(np);
    let mut chains = vec![
        base_chain(
            EGRESS_CHAIN,
            "postrouting",
            "srcnat - 10",
            "traffic leaving local pods (before masquerade)",
            Direction::Egress,
            false,
            &fail_closed,
        ),
        base_chain(
            INGRESS_CHAIN,
            "postrouting",
            "srcnat - 5",
            "traffic to local pods (after Service DNAT)",
            Direction::Ingress,
            true,
            &fail_closed,
        ),
        // nft 1.0.6 accepts only a number at the input hook; 101 = srcnat + 1, after IPVS.
        base_chain(
            EGRESS_TO_NODE_CHAIN,
            "input",
            "101",
            "traffic from local pods to this node",
            Direction::Egress,
            false,
            &fail_closed,
        ),
    ];
    let mut maps: BTreeMap<(Direction, Family), Vec<(IpAddr, String)>> = BTreeMap::new();
    let mut other_chains = Vec::new();

    let mut facts = PolicyFacts::of(np);
    facts.staged_cnp = StagedCnpPlan::of(np, opts);
    for cr in &np.cnps {
        let lookup = facts
            .staged_cnp
            .measures(cr.direction)
            .then(|| facts.staged_cnp.would_allow_lookup(cr.direction));
        let compiled = cnp_chain_measured(&mut sets, cr, opts, lookup.as_deref());
        facts.cnp_pass.insert(
            (cr.name.clone(), cr.direction),
            (cr.priority, compiled.pass),
        );
        other_chains.push(compiled.chain);
        other_chains.extend(compiled.denies);
    }
    for pod in &np.pods {
        for d in Direction::ALL {
            let Some(pc) = pod_chains(pod, d, &facts, opts) else {
                continue;
            };
            for ip in &pod.ips {
                maps.entry((d, Family::of(ip)))
                    .or_default()
                    .push((*ip, pc.chain.name.clone()));
            }
            other_chains.push(pc.chain);
            other_chains.extend(pc.drop);
            other_chains.extend(pc.tiers);
        }
    }

    for pr in &np.policies {
        if let Some(chain) = policy_chain(&mut sets, pr) {
            other_chains.push(chain);
        }
    }
    for sr in &np.staged {
        other_chains.extend(staged_chains(&mut sets, sr, np, opts));
    }
    let staged_cnp = staged_cnp_objects(&mut sets, np, &facts.staged_cnp, opts);
    chains.extend(staged_cnp.base);
    other_chains.extend(staged_cnp.chains);
    if !fail_closed.is_empty() {
        for d in Direction::ALL {
            other_chains.push(unknown_drop_chain(d, opts));
        }
    }
    other_chains.sort_by(|a, b| a.name.cmp(&b.name));
    chains.extend(other_chains);

    let mut all_sets = Vec::new();
    for d in [Direction::Ingress, Direction::Egress] {
        for f in Family::ALL {
            let mut elems = maps.remove(&(d, f)).unwrap_or_default();
            elems.sort();
            all_sets.push(Set {
                name: dispatch_map_name(d, f),
                key_type: addr_type(f).into(),
                verdict_map: true,
                interval: false,
                comment: format!("local pods isolated for {d}, by address"),
                elements: elems
                    .into_iter()
                    .map(|(ip, chain)| format_compact!("{ip} : goto {chain}"))
                    .collect(),
            });
        }
    }
    let mut identities = BTreeMap::new();
    let first_content = all_sets.len();
    for (name, (identity, set)) in sets.by_name {
        identities.insert(name, identity);
        all_sets.push(set);
    }
    for f in &fail_closed {
        all_sets.extend(fail_closed_sets(np, *f));
    }
    all_sets.extend(staged_cnp.maps);
    // Content sets are in name order (the incremental compiler inserts by name).
    all_sets[first_content..].sort_by(|a, b| a.name.cmp(&b.name));

    let ruleset = Ruleset {
        comment: format!(
            "NetworkPolicy for node {}; managed by kube-nftpolicy, do not edit",
            np.node
        ),
        sets: all_sets.into_iter().map(Arc::new).collect(),
        chains: chains.into_iter().map(Arc::new).collect(),
    };
    (ruleset, sets.origins, identities, facts.cnp_pass)
}

/// What measuring the staged ClusterNetworkPolicies adds to a node's table.
struct StagedCnpObjects {
    /// The settle base chains, one per hook where a measured direction ends in `accept`.
    base: Vec<Chain>,
    /// Recording, counting and clearing chains.
    chains: Vec<Chain>,
    /// The would-allow and settle verdict maps.
    maps: Vec<Set>,
}

/// The chains and maps that measure staged ClusterNetworkPolicies (see docs/ruleset.md,
/// "Staged ClusterNetworkPolicies: the mark field"). Nothing when none is measured, so the
/// table of a node without one is the same as before.
///
/// At its place in the tier chain a staged policy records its first matching rule's action in
/// the mark field; the verdict is compared where it happens: a drop point looks the field up
/// in the would-allow map (a recorded Accept counts would-allow), and after our `accept` a
/// settle base chain on the same hook looks it up in the settle map (a recorded Deny counts
/// would-deny) and clears it, before masquerade (srcnat) and before the ingress chain reads
/// the field again.
fn staged_cnp_objects(
    sets: &mut Sets,
    np: &NodePolicy,
    plan: &StagedCnpPlan,
    opts: &CompileOptions,
) -> StagedCnpObjects {
    let mut out = StagedCnpObjects {
        base: Vec::new(),
        chains: Vec::new(),
        maps: Vec::new(),
    };
    if plan.slots.is_empty() {
        return out;
    }
    let mask = plan.mask;
    let clear = format!("meta mark set meta mark & {:#010x}", !mask.mask());
    let mut allow: BTreeMap<Direction, Vec<(u32, String)>> = BTreeMap::new();
    let mut settle: BTreeMap<Direction, Vec<(u32, String)>> = BTreeMap::new();
    for cr in &np.staged_cnps {
        let Some(&slot) = plan.slots.get(&cr.name) else {
            continue;
        };
        let d = cr.direction;
        sets.touched.clear();
        let mut rules = Vec::new();
        let mut actions = std::collections::BTreeSet::new();
        for rule in &cr.rules {
            let matchers = cnp_matchers(sets, cr, rule);
            if matchers.is_empty() {
                continue;
            }
            // A Baseline Pass leaves the verdict to the end of the tiers: allow, as Accept.
            let recorded = match (cr.tier, rule.action) {
                (Tier::Baseline, Action::Pass) => Action::Accept,
                (_, a) => a,
            };
            actions.insert(recorded);
            let label = rule.label(d);
            for (m, what) in &matchers {
                let sep = if m.is_empty() { "" } else { " " };
                rules.push(format!(
                    "{m}{sep}{} return comment {}",
                    mask.set(mask.value(slot, recorded)),
                    crate::engine::ruleset::quote_comment(&format!(
                        "{} {label} {what}: {} (staged, slot {slot})",
                        cr.name, rule.action
                    ))
                ));
            }
        }
        let mut used = std::mem::take(&mut sets.touched);
        used.sort();
        used.dedup();
        sets.origins.by_cnp.insert((cr.name.clone(), d), used);
        out.chains.push(Chain {
            name: staged_cnp_chain_name(d, &cr.name),
            role: ChainRole::Policy,
            comment: format!(
                "staged {} ClusterNetworkPolicy {} (priority {}) {d}: records its first matching rule",
                cr.tier, cr.name, cr.priority
            ),
            rules,
            counters: Vec::new(),
        });
        for (action, change) in [
            (Action::Accept, StagedChange::WouldAllow),
            (Action::Deny, StagedChange::WouldDeny),
        ] {
            if !actions.contains(&action) {
                continue;
            }
            let name = staged_cnp_count_name(d, &cr.name, change);
            let mut count = String::new();
            if let Some(group) = opts.log_group {
                count.push_str(&format!(
                    "log prefix \"{}\" group {group} ",
                    crate::engine::log_prefix::encode_staged_cnp_prefix(
                        d,
                        change == StagedChange::WouldAllow,
                        cr.tier,
                        &cr.name
                    )
                ));
            }
            count.push_str(&format!("counter name \"{name}\" {clear}"));
            let what = match change {
                StagedChange::WouldAllow => "denied today, allowed with it",
                StagedChange::WouldDeny => "allowed today, denied with it",
            };
            out.chains.push(Chain {
                name: name.clone(),
                role: ChainRole::Policy,
                comment: format!(
                    "staged {} ClusterNetworkPolicy {} {d}: {}",
                    cr.tier,
                    cr.name,
                    change.as_str()
                ),
                rules: vec![count],
                counters: vec![NamedCounter {
                    name: name.clone(),
                    comment: format!(
                        "staged {} ClusterNetworkPolicy {} {d}: {what}",
                        cr.tier, cr.name
                    ),
                    owner: CounterOwner::StagedCnp {
                        policy: cr.name.clone(),
                        tier: cr.tier.as_str(),
                        direction: d.as_str(),
                        change: change.as_str(),
                    },
                }],
            });
            let value = mask.value(slot, action);
            match change {
                StagedChange::WouldAllow => {
                    allow
                        .entry(d)
                        .or_default()
                        .push((value, format!("jump {name}")));
                    settle
                        .entry(d)
                        .or_default()
                        .push((value, format!("goto {STAGED_CNP_CLEAR_CHAIN}")));
                }
                StagedChange::WouldDeny => {
                    settle
                        .entry(d)
                        .or_default()
                        .push((value, format!("goto {name}")));
                }
            }
        }
        if actions.contains(&Action::Pass) {
            settle.entry(d).or_default().push((
                mask.value(slot, Action::Pass),
                format!("goto {STAGED_CNP_CLEAR_CHAIN}"),
            ));
        }
    }
    out.chains.push(Chain {
        name: STAGED_CNP_CLEAR_CHAIN.into(),
        role: ChainRole::Policy,
        comment: "staged ClusterNetworkPolicies: a recorded verdict that changes nothing".into(),
        rules: vec![clear],
        counters: Vec::new(),
    });
    for d in Direction::ALL {
        if !plan.measures(d) {
            continue;
        }
        let map = |name: String, comment: &str, mut elems: Vec<(u32, String)>| {
            elems.sort();
            Set {
                name,
                key_type: "mark".into(),
                verdict_map: true,
                interval: false,
                comment: comment.into(),
                elements: elems
                    .into_iter()
                    .map(|(v, verdict)| format_compact!("{v:#010x} : {verdict}"))
                    .collect(),
            }
        };
        out.maps.push(map(
            staged_cnp_allow_map_name(d),
            &format!(
                "staged ClusterNetworkPolicies, {d}: recorded Accept → would-allow (at drops)"
            ),
            allow.remove(&d).unwrap_or_default(),
        ));
        out.maps.push(map(
            staged_cnp_settle_map_name(d),
            &format!("staged ClusterNetworkPolicies, {d}: recorded verdict → would-deny or clear (after accept)"),
            settle.remove(&d).unwrap_or_default(),
        ));
        let lookup = format!("{} vmap @{}", mask.field(), staged_cnp_settle_map_name(d));
        let hooks: &[(&str, &'static str, &'static str)] = match d {
            // After `egress` (90), before `ingress` (95) reads the field again.
            Direction::Egress => &[
                (STAGED_CNP_SETTLE_EGRESS, "postrouting", "srcnat - 7"),
                (STAGED_CNP_SETTLE_EGRESS_TO_NODE, "input", "102"),
            ],
            // After `ingress` (95), before masquerade (srcnat, 100) could read the field.
            Direction::Ingress => &[(STAGED_CNP_SETTLE_INGRESS, "postrouting", "srcnat - 2")],
        };
        for (name, hook, priority) in hooks {
            out.base.push(Chain {
                name: (*name).into(),
                role: ChainRole::Base { hook, priority },
                comment: format!(
                    "staged ClusterNetworkPolicies, {d}: count a recorded Deny that we accepted, clear the mark"
                ),
                rules: vec![lookup.clone()],
                counters: Vec::new(),
            });
        }
    }
    out
}

/// Settle base chains of the staged ClusterNetworkPolicies (postrouting `srcnat - 7`, input
/// 102, postrouting `srcnat - 2`).
pub const STAGED_CNP_SETTLE_EGRESS: &str = "staged-cnp-settle-egress";
/// See [`STAGED_CNP_SETTLE_EGRESS`].
pub const STAGED_CNP_SETTLE_EGRESS_TO_NODE: &str = "staged-cnp-settle-egress-to-node";
/// See [`STAGED_CNP_SETTLE_EGRESS`].
pub const STAGED_CNP_SETTLE_INGRESS: &str = "staged-cnp-settle-ingress";

/// One ClusterNetworkPolicy direction compiled.
pub(crate) struct CnpChains {
    /// `cnp/<name>/<direction>`.
    pub(crate) chain: Chain,
    /// One counted terminal chain per `Deny` rule.
    pub(crate) denies: Vec<Chain>,
    /// The `Pass` matchers with `return`, for the tier chains.
    pub(crate) pass: Vec<String>,
}

fn nodes_set(
    sets: &mut Sets,
    selector: &Selector,
    addrs: &std::collections::BTreeSet<IpAddr>,
    family: Family,
) -> String {
    let identity = format!("{family:?}|nodes|{selector}");
    sets.add(&format!("nodes-{}", family.suffix()), &identity, |name| {
        Set {
            name,
            key_type: addr_type(family).into(),
            verdict_map: false,
            interval: false,
            comment: if selector.is_empty() {
                "addresses of all nodes".to_string()
            } else {
                format!("addresses of nodes {selector}")
            },
            elements: addrs
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(addr_element)
                .collect(),
        }
    })
}

/// The match expressions of one ClusterNetworkPolicy rule, each with the peer it stands for:
/// one per (peer, family, kind of port match), like a NetworkPolicy rule. Empty = the rule
/// matches nothing; one empty expression = it matches everything.
fn cnp_matchers(sets: &mut Sets, cr: &CnpRules, rule: &ResolvedCnpRule) -> Vec<(String, String)> {
    let d = cr.direction;
    let peers_key = match d {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let (peers, ports) = match &rule.matches {
        ResolvedCnpMatch::Nothing(_) => return Vec::new(),
        ResolvedCnpMatch::Everything(_) => {
            return vec![(String::new(), "fails closed: all traffic".to_string())];
        }
        ResolvedCnpMatch::Peers { peers, ports } => (peers, ports.as_ref()),
    };
    let owner = format!("ClusterNetworkPolicy {} spec.{d}[{}]", cr.name, rule.index);
    let numeric = ports
        .filter(|p| !p.numeric.is_empty())
        .map(|p| numeric_ports(&p.numeric));
    let named: Option<&NamedTargets> = ports.and_then(|p: &ResolvedPorts| p.named.as_ref());
    let any_port = ports.is_none();
    let named_match = |sets: &mut Sets, f: Family| {
        named.map(|n| {
            let set = named_set(sets, &owner, n, f);
            format!("{} daddr . meta l4proto . th dport @{set}", addr_match(f))
        })
    };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut emit = |peer: &str, port: Option<&str>, what: &str| {
        let m = match port {
            Some(p) if peer.is_empty() => p.to_string(),
            Some(p) => format!("{peer} {p}"),
            None => peer.to_string(),
        };
        out.push((m, what.to_string()));
    };
    for (pi, peer) in peers.iter().enumerate() {
        let what = format!("{peers_key}[{pi}]");
        let mut addr_matchers: Vec<(Family, String)> = Vec::new();
        match peer {
            ResolvedCnpPeer::Pods(pods) => {
                for f in Family::ALL {
                    let set = peer_set(sets, pods, f);
                    addr_matchers.push((f, format!("{} {} @{set}", addr_match(f), peer_field(d))));
                }
            }
            ResolvedCnpPeer::Nodes {
                selector, addrs, ..
            } => {
                for f in Family::ALL {
                    let set = nodes_set(sets, selector, addrs, f);
                    addr_matchers.push((f, format!("{} {} @{set}", addr_match(f), peer_field(d))));
                }
            }
            ResolvedCnpPeer::Networks(cidrs) => {
                for f in Family::ALL {
                    let of: Vec<Cidr> = cidrs.iter().filter(|c| c.family() == f).copied().collect();
                    if of.is_empty() {
                        continue;
                    }
                    let text: Vec<String> = of.iter().map(ToString::to_string).collect();
                    let ranges = crate::model::cidr::subtract(&of[0], &[]);
                    let mut all = ranges;
                    for c in &of[1..] {
                        all.extend(crate::model::cidr::subtract(c, &[]));
                    }
                    let set = cidr_set(sets, &format!("networks {}", text.join(", ")), &all, f);
                    addr_matchers.push((f, format!("{} {} @{set}", addr_match(f), peer_field(d))));
                }
            }
            ResolvedCnpPeer::DomainNames(_) => continue, // not supported: matches nothing
        }
        let is_pods = matches!(peer, ResolvedCnpPeer::Pods(_));
        for (f, m) in addr_matchers {
            if any_port {
                emit(&m, None, &what);
            }
            if let Some(n) = &numeric {
                emit(&m, Some(n), &what);
            }
            // Ingress: named ports resolve on the subject (destination) pod.
            if d == Direction::Ingress && is_pods {
                if let Some(n) = named_match(sets, f) {
                    emit(&m, Some(&n), &what);
                }
            }
        }
    }
    // Egress: named ports resolve on the peer pods, so the named set holds exactly the peer
    // pods that declare the port (CEL forbids named ports with other kinds of peer).
    if d == Direction::Egress && peers.iter().any(|p| matches!(p, ResolvedCnpPeer::Pods(_))) {
        for f in Family::ALL {
            if let Some(n) = named_match(sets, f) {
                emit("", Some(&n), &format!("named ports of {peers_key} pods"));
            }
        }
    }
    out
}

/// The chain of one ClusterNetworkPolicy in one direction: its rules in order, `Accept` →
/// `accept`, `Deny` → `goto` the rule's counted drop chain, `Pass` → `return`.
///
/// nftables has no "return two levels", so a `Pass` cannot leave the pod's tier chain by
/// itself. The tier chain therefore repeats the policy's `Pass` matchers with `return` right
/// after jumping to it: a packet back from the policy chain matched no `Accept` or `Deny`
/// before any rule it matches, so if it matches a `Pass` rule, the first rule it matched was a
/// `Pass`. No packet mark is needed (only staged ClusterNetworkPolicies use one).
pub(crate) fn cnp_chain(sets: &mut Sets, cr: &CnpRules, opts: &CompileOptions) -> CnpChains {
    cnp_chain_measured(sets, cr, opts, None)
}

/// [`cnp_chain`]; `would_allow`: the lookup that counts a recorded staged `Accept` as
/// would-allow, put before each `Deny` rule while staged ClusterNetworkPolicies are measured
/// in this direction (a Deny's terminal chain is never rewritten, so the check sits here).
fn cnp_chain_measured(
    sets: &mut Sets,
    cr: &CnpRules,
    opts: &CompileOptions,
    would_allow: Option<&str>,
) -> CnpChains {
    let d = cr.direction;
    sets.touched.clear();
    let mut rules = Vec::new();
    let mut denies = Vec::new();
    let mut pass = Vec::new();
    let mut counters = Vec::new();
    for rule in &cr.rules {
        let matchers = cnp_matchers(sets, cr, rule);
        let label = rule.label(d);
        let rule_label = if rule.name.is_empty() {
            format!("spec.{d}[{}]", rule.index)
        } else {
            rule.name.clone()
        };
        // Accept and Pass rules count their hits in a named counter (Deny rules count in
        // their terminal chain); the tier chain's repeated Pass matchers do not count.
        let counter = match rule.action {
            Action::Accept | Action::Pass => {
                let name = cnp_rule_counter_name(d, &cr.name, rule.index);
                counters.push(NamedCounter {
                    name: name.clone(),
                    comment: format!(
                        "{} ClusterNetworkPolicy {} {label}: {}",
                        cr.tier, cr.name, rule.action
                    ),
                    owner: CounterOwner::Cnp {
                        policy: cr.name.clone(),
                        tier: cr.tier.as_str(),
                        direction: d.as_str(),
                        rule: rule_label.clone(),
                        action: if rule.action == Action::Accept {
                            "Accept"
                        } else {
                            "Pass"
                        },
                    },
                });
                format!("counter name \"{name}\" ")
            }
            Action::Deny => String::new(),
        };
        let verdict = match rule.action {
            Action::Accept => "accept".to_string(),
            Action::Pass => "return".to_string(),
            Action::Deny => {
                let chain = cnp_deny_chain_name(d, &cr.name, rule.index);
                let mut drop_rule = String::new();
                if let Some(group) = opts.log_group {
                    drop_rule.push_str(&format!(
                        "log prefix \"{}\" group {group} ",
                        crate::engine::log_prefix::encode_cnp_prefix(
                            d, cr.tier, rule.index, &cr.name
                        )
                    ));
                }
                drop_rule.push_str(opts.terminal());
                denies.push(Chain {
                    name: chain.clone(),
                    role: ChainRole::Deny {
                        policy: cr.name.clone(),
                        tier: cr.tier.as_str(),
                        direction: d.as_str(),
                        rule: rule_label.clone(),
                    },
                    comment: format!("{} {label}: Deny (counted)", cr.describe()),
                    rules: vec![drop_rule],
                    counters: Vec::new(),
                });
                format!("goto {chain}")
            }
        };
        for (m, what) in &matchers {
            let comment = crate::engine::ruleset::quote_comment(&format!(
                "{} {label} {what}: {}",
                cr.name, rule.action
            ));
            let sep = if m.is_empty() { "" } else { " " };
            if rule.action == Action::Pass {
                pass.push(format!("{m}{sep}{verdict} comment {comment}"));
            }
            if let (Action::Deny, Some(lookup)) = (rule.action, would_allow) {
                rules.push(format!(
                    "{m}{sep}{lookup} comment {}",
                    crate::engine::ruleset::quote_comment(&format!(
                        "{} {label} {what}: Deny; staged Accept here would allow",
                        cr.name
                    ))
                ));
            }
            rules.push(format!("{m}{sep}{counter}{verdict} comment {comment}"));
        }
    }
    let mut used = std::mem::take(&mut sets.touched);
    used.sort();
    used.dedup();
    sets.origins.by_cnp.insert((cr.name.clone(), d), used);
    CnpChains {
        chain: Chain {
            name: cnp_chain_name(d, &cr.name),
            role: ChainRole::Policy,
            comment: format!("{} {d} rules", cr.describe()),
            rules,
            counters,
        },
        denies,
        pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_mark_masks() {
        let cases: [(&str, u32, Result<usize, MarkMaskError>); 6] = [
            ("default: top byte, 64 slots", 0xff00_0000, Ok(64)),
            ("three bits: two slots", 0x0000_0700, Ok(2)),
            ("low bits", 0x0000_00ff, Ok(64)),
            (
                "two bits: too narrow",
                0x0000_3000,
                Err(MarkMaskError::TooNarrow(0x3000)),
            ),
            ("zero", 0, Err(MarkMaskError::TooNarrow(0))),
            (
                "a hole",
                0x0f0f_0000,
                Err(MarkMaskError::NotContiguous(0x0f0f_0000)),
            ),
        ];
        for (name, mask, want) in cases {
            assert_eq!(
                StagedMarkMask::new(mask).map(StagedMarkMask::slots),
                want,
                "case {name}"
            );
        }
        let m = StagedMarkMask::default();
        // Every value stays inside the field, is never zero, and each (slot, action) differs.
        let mut seen = std::collections::BTreeSet::new();
        for slot in 0..m.slots() {
            for a in [Action::Accept, Action::Deny, Action::Pass] {
                let v = m.value(slot, a);
                assert_eq!(v & !m.mask(), 0, "slot {slot} {a}");
                assert_ne!(v, 0);
                assert!(seen.insert(v), "slot {slot} {a} is unique");
            }
        }
        assert_eq!(m.value(1, Action::Accept), 0x0500_0000);
        assert_eq!(
            m.set(0x0500_0000),
            "meta mark set meta mark & 0x00ffffff | 0x05000000"
        );
    }

    #[test]
    fn staged_cnps_beyond_the_slots_are_not_measured() {
        let cr = |name: &str| CnpRules {
            name: name.into(),
            tier: Tier::Admin,
            priority: 1,
            direction: Direction::Ingress,
            selected: vec![ObjectKey::new("a", "p")],
            rules: Vec::new(),
        };
        let np = NodePolicy {
            staged_cnps: vec![cr("c"), cr("a"), cr("b")],
            ..NodePolicy::default()
        };
        let opts = CompileOptions {
            staged_mark: StagedMarkMask::new(0x7).expect("3 bits"),
            ..CompileOptions::default()
        };
        // Slots go by name: a and b are measured, c is not.
        assert_eq!(unmeasured_staged_cnps(&np, &opts), vec!["c".to_string()]);
        let plan = StagedCnpPlan::of(&np, &opts);
        assert_eq!(plan.slots.get("a"), Some(&0));
        assert_eq!(plan.slots.get("b"), Some(&1));
        assert!(unmeasured_staged_cnps(&np, &CompileOptions::default()).is_empty());
    }
}
