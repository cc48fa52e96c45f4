#![allow(dead_code)]
//! The ruleset we avoid, for comparison: the same resolved policy expanded iptables-style into
//! flat lists of rules, one per allowed (pod address, peer address, port), with no sets, no
//! verdict maps and no jumps.
//!
//! Built from the same [`NodePolicy`] as our compiled ruleset, so both enforce the same policy
//! (the bench cross-checks a sample of flows against [`evaluate`]). Choices, as a typical
//! iptables-based enforcer would make them:
//! - IPv4 only, in an `ip` family table: iptables keeps IPv6 in ip6tables, which IPv4 packets
//!   never traverse, so leaving IPv6 out does not flatter or penalise the IPv4 measurement;
//! - one base chain per direction at our hooks and priorities (postrouting, srcnat − 10 for
//!   egress, srcnat − 5 for ingress): one chain cannot hold both checks, because an `accept`
//!   for the source's egress would skip the destination's ingress check;
//! - each chain starts with `ct state established,related accept`, as iptables setups do, so
//!   only the first packet of a connection walks the list; the ingress chain then accepts
//!   traffic from the node itself (`fib saddr type local`), like ours;
//! - then, local pod by local pod (in key order): that pod's allow rules, the pod's address
//!   matched first (the cheapest order for every other pod's packets), then a drop for the
//!   pod. Duplicate (pod, peer, port) rules from overlapping policies are emitted once;
//! - an ipBlock becomes one rule per prefix of the cidr minus its excepts; a port range is one
//!   rule (`tcp dport 8000-8100`), as `--dport 8000:8100` is in iptables;
//! - pod → own node traffic (our `egress-to-node` chain at the input hook) is left out: the
//!   measured traffic never reaches the input hook, and duplicating the egress list there
//!   would only lengthen the load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::ops::Range;

use kube_nftpolicy::engine::evaluate::{Connection, evaluate};
use kube_nftpolicy::engine::resolve::{NodePolicy, PolicyRules, ResolvedPeer};
use kube_nftpolicy::model::policy::Direction;
use kube_nftpolicy::model::{Cidr, Family, ObjectKey, Protocol};

/// The table the naive ruleset lives in (never ours, never touched by the agent).
pub const TABLE: &str = "knp-bench-naive";

/// A port match: a protocol with an inclusive port range (0-65535 = the whole protocol).
pub type PortRange = (Protocol, u16, u16);

/// One line of a naive chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Line {
    /// Accept `local` ↔ `peer` (any peer when `None`) on `port` (any port when `None`).
    Allow {
        local: IpAddr,
        peer: Option<Cidr>,
        port: Option<PortRange>,
    },
    /// Drop everything else of an isolated local pod.
    Drop { local: IpAddr },
}

/// The two flat chains.
#[derive(Debug, Default)]
pub struct Naive {
    pub egress: Vec<Line>,
    pub ingress: Vec<Line>,
    /// Where each local address's lines are in its chain (they are contiguous), so checks
    /// need not walk hundreds of thousands of lines that cannot match.
    spans: HashMap<(Direction, IpAddr), Range<usize>>,
}

impl Naive {
    pub fn chain(&self, d: Direction) -> &[Line] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn rule_count(&self) -> usize {
        self.egress.len() + self.ingress.len()
    }
}

/// Expand the node's resolved policy (IPv4 only).
pub fn expand(np: &NodePolicy) -> Naive {
    let rules: BTreeMap<(&ObjectKey, Direction), &PolicyRules> = np
        .policies
        .iter()
        .map(|p| ((&p.policy, p.direction), p))
        .collect();
    let mut out = Naive::default();
    for pod in &np.pods {
        let v4: Vec<IpAddr> = pod.ips.iter().copied().filter(|ip| ip.is_ipv4()).collect();
        for d in Direction::ALL {
            let Some(policies) = pod.isolated_by(d) else {
                continue;
            };
            let chain = match d {
                Direction::Ingress => &mut out.ingress,
                Direction::Egress => &mut out.egress,
            };
            for &local in &v4 {
                let start = chain.len();
                let mut seen = HashSet::new();
                for p in policies {
                    let Some(pr) = rules.get(&(p, d)) else {
                        continue;
                    };
                    for line in policy_lines(pr, local) {
                        if seen.insert(line.clone()) {
                            chain.push(line);
                        }
                    }
                }
                chain.push(Line::Drop { local });
                out.spans.insert((d, local), start..chain.len());
            }
        }
    }
    out
}

fn v4_host(ip: &IpAddr) -> Option<Cidr> {
    ip.is_ipv4().then(|| Cidr::host(*ip))
}

/// The allow lines one policy contributes for one local pod address: what
/// `compile::policy_rules` matches, with every set written out, and the semantics of
/// `evaluate` where they differ (an ingress rule from an ipBlock to a named port, which
/// `compile` currently leaves out; no measured or synthetic policy has one).
fn policy_lines(pr: &PolicyRules, local: IpAddr) -> Vec<Line> {
    let d = pr.direction;
    let mut out = Vec::new();
    let allow = |peer: Option<Cidr>, port: Option<PortRange>| Line::Allow { local, peer, port };
    for rule in &pr.rules {
        let numeric: Vec<PortRange> = rule
            .ports
            .as_ref()
            .map(|p| p.numeric.clone())
            .unwrap_or_default();
        let named = rule.ports.as_ref().and_then(|p| p.named.as_ref());
        let any_port = rule.ports.is_none();
        // Named ports as (destination address, port): on the local pod for ingress, on the
        // peer pods for egress.
        let named_here: Vec<(IpAddr, PortRange)> = named
            .map(|n| {
                n.targets
                    .iter()
                    .filter(|(ip, _, _)| ip.is_ipv4())
                    .map(|(ip, proto, port)| (*ip, (*proto, *port, *port)))
                    .collect()
            })
            .unwrap_or_default();
        let mut peer_lines = |peer: Option<Cidr>| {
            if any_port {
                out.push(allow(peer, None));
            }
            for r in &numeric {
                out.push(allow(peer, Some(*r)));
            }
            // Ingress: the named port is the local pod's, whatever kind of peer sends to it
            // (an ipBlock included, as `evaluate` says).
            if d == Direction::Ingress {
                for (ip, r) in &named_here {
                    if *ip == local {
                        out.push(allow(peer, Some(*r)));
                    }
                }
            }
        };
        match &rule.peers {
            None => peer_lines(None),
            Some(peers) => {
                for peer in peers {
                    match peer {
                        ResolvedPeer::Pods(pods) => {
                            for ip in &pods.addrs {
                                if let Some(c) = v4_host(ip) {
                                    peer_lines(Some(c));
                                }
                            }
                        }
                        ResolvedPeer::IpBlock { ranges, .. } => {
                            for r in ranges.iter().filter(|r| r.family() == Family::V4) {
                                peer_lines(Some(*r));
                            }
                        }
                    }
                }
            }
        }
        // Egress named ports: the targets already are the peer pods that declare the port.
        let egress_named = d == Direction::Egress
            && match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|p| matches!(p, ResolvedPeer::Pods(_))),
            };
        if egress_named {
            for (ip, r) in &named_here {
                out.push(allow(Some(Cidr::host(*ip)), Some(*r)));
            }
        }
    }
    out
}

/// The first line of the `d` chain a new connection hits (its position decides the cost),
/// and whether that line accepts. `None`: no line concerns the packet (not a local isolated
/// pod). Only the local pod's own lines can match, so only they are walked here.
pub fn first_match(
    naive: &Naive,
    d: Direction,
    src: IpAddr,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
) -> Option<(usize, bool)> {
    let (local_addr, peer_addr) = match d {
        Direction::Ingress => (dst, src),
        Direction::Egress => (src, dst),
    };
    let span = naive.spans.get(&(d, local_addr))?.clone();
    let chain = &naive.chain(d)[span.clone()];
    chain.iter().zip(span).find_map(|(line, i)| match line {
        Line::Allow {
            local,
            peer,
            port: p,
        } => {
            let hit = *local == local_addr
                && peer.is_none_or(|c| c.contains(&peer_addr))
                && p.is_none_or(|(pr, lo, hi)| pr == proto && (lo..=hi).contains(&port));
            hit.then_some((i, true))
        }
        Line::Drop { local } => (*local == local_addr).then_some((i, false)),
    })
}

/// Does the naive chain agree with the policy semantics (`evaluate`) for this connection?
/// Returns a description of the disagreement, if any.
pub fn cross_check(
    np: &NodePolicy,
    naive: &Naive,
    d: Direction,
    c: Connection,
) -> Result<(), String> {
    let (src, dst) = match d {
        Direction::Ingress => (c.peer, c.local),
        Direction::Egress => (c.local, c.peer),
    };
    let want = evaluate(np, d, c).passes();
    let got = first_match(naive, d, src, dst, c.protocol, c.port).is_none_or(|(_, a)| a);
    if want == got {
        Ok(())
    } else {
        Err(format!(
            "{d} {src} → {dst} {}/{}: policy says {}, naive chain says {}",
            c.protocol,
            c.port,
            if want { "allow" } else { "deny" },
            if got { "allow" } else { "deny" }
        ))
    }
}

fn render_line(out: &mut String, d: Direction, line: &Line) {
    let (local_field, peer_field) = match d {
        Direction::Ingress => ("daddr", "saddr"),
        Direction::Egress => ("saddr", "daddr"),
    };
    match line {
        Line::Allow { local, peer, port } => {
            let _ = write!(out, "    ip {local_field} {local}");
            if let Some(p) = peer {
                let _ = write!(out, " ip {peer_field} {p}");
            }
            match port {
                None => {}
                Some((proto, 0, 65535)) => {
                    let _ = write!(out, " meta l4proto {}", proto.nft_name());
                }
                Some((proto, lo, hi)) if lo == hi => {
                    let _ = write!(out, " {} dport {lo}", proto.nft_name());
                }
                Some((proto, lo, hi)) => {
                    let _ = write!(out, " {} dport {lo}-{hi}", proto.nft_name());
                }
            }
            out.push_str(" accept\n");
        }
        Line::Drop { local } => {
            let _ = writeln!(out, "    ip {local_field} {local} drop");
        }
    }
}

/// The `nft -f` script that creates the naive table (it must not exist yet).
pub fn render(naive: &Naive) -> String {
    let mut out = format!("table ip {TABLE} {{\n");
    for (d, name, prio) in [
        (Direction::Egress, "egress", "srcnat - 10"),
        (Direction::Ingress, "ingress", "srcnat - 5"),
    ] {
        let _ = writeln!(out, "  chain {name} {{");
        let _ = writeln!(
            out,
            "    type filter hook postrouting priority {prio}; policy accept;"
        );
        out.push_str("    ct state established,related accept\n");
        if d == Direction::Ingress {
            out.push_str("    fib saddr type local accept\n");
        }
        for line in naive.chain(d) {
            render_line(&mut out, d, line);
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}
