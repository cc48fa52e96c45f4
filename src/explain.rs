//! `kube-nftpolicy explain`: why a connection is allowed or denied, in words.
//!
//! "Something is denied and I cannot tell why" is the most common complaint about
//! NetworkPolicy. This answers it from the same resolved state the ruleset is compiled from:
//! the egress verdict on the source pod's node and the ingress verdict on the destination
//! pod's node, each naming the policies and rules involved. Pure: no kernel, no cluster.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::evaluate::{Connection, Verdict, evaluate};
use crate::index::Snapshot;
use crate::model::policy::Direction;
use crate::model::{Family, ObjectKey, PodInfo, Protocol};
use crate::resolve::resolve;

/// One end of the connection as the user names it.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// `namespace/pod`.
    Pod(ObjectKey),
    /// An address (a pod's, or one outside the cluster).
    Address(IpAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Endpoint::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(Endpoint::Pod(ObjectKey::new(ns, pod)))
            }
            _ => Err(ExplainError::Endpoint(s.to_string())),
        }
    }
}

/// Why a question cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// Neither `namespace/pod` nor an address.
    #[error("{0:?} is neither namespace/pod nor an IP address")]
    Endpoint(String),
    /// The named pod is not in the manifests.
    #[error("pod {0} is not in the manifests")]
    UnknownPod(ObjectKey),
    /// The pod has no address policy can apply to.
    #[error("pod {0} takes no part in policy ({1})")]
    NotATarget(ObjectKey, &'static str),
    /// No address family both ends have.
    #[error("{0} and {1} have no address family in common")]
    NoCommonFamily(String, String),
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Does the connection get through?
    pub allowed: bool,
    /// Human-readable report, one step per line.
    pub report: String,
}

struct Side<'a> {
    name: String,
    addrs: Vec<IpAddr>,
    pod: Option<&'a PodInfo>,
}

fn side<'a>(snap: &'a Snapshot, e: &Endpoint) -> Result<Side<'a>, ExplainError> {
    match e {
        Endpoint::Pod(key) => {
            let pod = snap
                .pods
                .get(key)
                .ok_or_else(|| ExplainError::UnknownPod(key.clone()))?;
            if pod.host_network {
                return Err(ExplainError::NotATarget(
                    key.clone(),
                    "hostNetwork: its address is the node's",
                ));
            }
            if pod.finished {
                return Err(ExplainError::NotATarget(key.clone(), "it has finished"));
            }
            if pod.ips.is_empty() {
                return Err(ExplainError::NotATarget(key.clone(), "it has no IP yet"));
            }
            Ok(Side {
                name: key.to_string(),
                addrs: pod.ips.clone(),
                pod: Some(pod),
            })
        }
        Endpoint::Address(ip) => {
            let pod = snap
                .pods
                .iter()
                .map(|(_, p)| p.as_ref())
                .find(|p| p.is_policy_target() && p.ips.contains(ip));
            let name = pod.map_or_else(|| "external".to_string(), |p| p.key.to_string());
            Ok(Side {
                name,
                addrs: vec![*ip],
                pod,
            })
        }
    }
}

fn verdict_line(out: &mut String, what: &str, v: &Verdict) {
    let _ = match v {
        Verdict::NotIsolated => writeln!(
            out,
            "  {what}: allowed (no policy isolates it in this direction)"
        ),
        Verdict::Allowed(by) => writeln!(out, "  {what}: allowed by {}", by.join(", ")),
        Verdict::Denied(policies) => writeln!(
            out,
            "  {what}: DENIED: isolated by {}, and no rule of theirs matches",
            policies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
}

/// Explain one connection attempt.
pub fn explain(
    snap: &Snapshot,
    from: &Endpoint,
    to: &Endpoint,
    protocol: Protocol,
    port: u16,
    family: Option<Family>,
) -> Result<Explanation, ExplainError> {
    let src = side(snap, from)?;
    let dst = side(snap, to)?;
    let pick = |f: Family| {
        let a = src.addrs.iter().find(|ip| Family::of(ip) == f)?;
        let b = dst.addrs.iter().find(|ip| Family::of(ip) == f)?;
        Some((*a, *b))
    };
    let (src_ip, dst_ip) = match family {
        Some(f) => pick(f),
        None => pick(Family::V4).or_else(|| pick(Family::V6)),
    }
    .ok_or_else(|| ExplainError::NoCommonFamily(src.name.clone(), dst.name.clone()))?;

    let mut report = format!(
        "{} ({src_ip}) → {} ({dst_ip}) {protocol}/{port}\n",
        src.name, dst.name
    );
    let mut allowed = true;
    match src.pod.and_then(|p| p.node.as_deref()) {
        Some(node) => {
            let np = resolve(snap, node);
            let v = evaluate(
                &np,
                Direction::Egress,
                Connection {
                    local: src_ip,
                    peer: dst_ip,
                    protocol,
                    port,
                },
            );
            verdict_line(
                &mut report,
                &format!("egress of {} (on {node})", src.name),
                &v,
            );
            allowed &= v.passes();
        }
        None => {
            let _ = writeln!(
                report,
                "  egress: not policed (the source is not a pod on a node)"
            );
        }
    }
    match dst.pod.and_then(|p| p.node.as_deref()) {
        Some(node) => {
            let np = resolve(snap, node);
            let v = evaluate(
                &np,
                Direction::Ingress,
                Connection {
                    local: dst_ip,
                    peer: src_ip,
                    protocol,
                    port,
                },
            );
            verdict_line(
                &mut report,
                &format!("ingress of {} (on {node})", dst.name),
                &v,
            );
            allowed &= v.passes();
        }
        None => {
            let _ = writeln!(
                report,
                "  ingress: not policed (the destination is not a pod on a node)"
            );
        }
    }
    let _ = writeln!(
        report,
        "verdict: {}",
        if allowed { "ALLOWED" } else { "DENIED" }
    );
    Ok(Explanation { allowed, report })
}
