//! Answer "would this connection be allowed on this node?" from a resolved [`NodePolicy`].
//!
//! Pure and independent of nftables, so the semantics can be tested (and explained to a
//! user) without a kernel; the kernel tests then check that the compiled ruleset agrees.

use std::net::IpAddr;

use crate::model::policy::Direction;
use crate::model::{ObjectKey, Protocol};
use crate::resolve::{NodePolicy, ResolvedPeer};

/// The outcome for one direction at one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The pod is not isolated in this direction.
    NotIsolated,
    /// Allowed by these policies (rule indexes in parentheses).
    Allowed(Vec<String>),
    /// Isolated by these policies and no rule allows it.
    Denied(Vec<ObjectKey>),
}

impl Verdict {
    /// Does the packet pass?
    pub fn passes(&self) -> bool {
        !matches!(self, Verdict::Denied(_))
    }
}

/// A connection attempt as the local pod sees it.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    /// The local pod's address (destination for ingress, source for egress).
    pub local: IpAddr,
    /// The other end.
    pub peer: IpAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// Evaluate one direction for a local pod address. Addresses that are not local isolated
/// pods are not policed on this node.
pub fn evaluate(np: &NodePolicy, direction: Direction, c: Connection) -> Verdict {
    let Some(pod) = np.pods.iter().find(|p| p.ips.contains(&c.local)) else {
        return Verdict::NotIsolated;
    };
    let Some(policies) = pod.isolated_by(direction) else {
        return Verdict::NotIsolated;
    };
    // The destination address, where named ports are resolved.
    let dst = match direction {
        Direction::Ingress => c.local,
        Direction::Egress => c.peer,
    };
    let mut allowed_by = Vec::new();
    for pr in np
        .policies
        .iter()
        .filter(|pr| pr.direction == direction && policies.contains(&pr.policy))
    {
        for rule in &pr.rules {
            let peer_ok = |include_ipblocks: bool| match &rule.peers {
                None => true,
                Some(peers) => peers.iter().any(|p| match p {
                    ResolvedPeer::Pods(pods) => pods.addrs.contains(&c.peer),
                    ResolvedPeer::IpBlock { ranges, .. } => {
                        include_ipblocks && ranges.iter().any(|r| r.contains(&c.peer))
                    }
                }),
            };
            let ok = match &rule.ports {
                None => peer_ok(true),
                Some(ports) => {
                    let numeric = ports
                        .numeric
                        .iter()
                        .any(|(p, lo, hi)| *p == c.protocol && (*lo..=*hi).contains(&c.port));
                    let named = ports
                        .named
                        .as_ref()
                        .is_some_and(|n| n.targets.contains(&(dst, c.protocol, c.port)));
                    // A named port never matches an ipBlock destination (egress), and for
                    // egress the named targets already are the peer pods.
                    (numeric && peer_ok(true))
                        || (named
                            && match direction {
                                Direction::Ingress => peer_ok(true),
                                Direction::Egress => rule.peers.is_none() || peer_ok(false),
                            })
                }
            };
            if ok {
                allowed_by.push(format!("{} ({direction}[{}])", pr.policy, rule.index));
            }
        }
    }
    if allowed_by.is_empty() {
        Verdict::Denied(policies.to_vec())
    } else {
        Verdict::Allowed(allowed_by)
    }
}
