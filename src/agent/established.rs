//! `--enforce-established`: after a sync, remove from connection tracking the flows of local
//! pods that the new rules no longer allow, and the flows of pods that are gone.
//!
//! The ruleset only judges a connection's first packet. Without this pass a connection
//! accepted before a policy change keeps flowing after the change denies it, until it ends
//! or its conntrack entry expires (days, for an idle TCP connection). The pass lists this
//! node's conntrack entries whose ends are local pod addresses (or addresses in the pod
//! ranges), judges each with the pure evaluator over the new `NodePolicy`
//! (`engine::evaluate::judge_flow`, the same semantics the ruleset is compiled from), and
//! deletes only those it denies: the next packet of such a flow is new again and the ruleset
//! drops it. Flows still allowed are not touched.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::engine::evaluate::{EstablishedFlow, FlowJudgement, judge_flow};
use crate::engine::resolve::NodePolicy;
use crate::kernel::conntrack::{Conntrack, ConntrackError, Flow};
use crate::model::Protocol;

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Entries with a local pod address (or pod-range address) at one end.
    pub examined: usize,
    /// Deleted because the rules no longer allow them.
    pub denied: usize,
    /// Deleted because one end's pod is gone.
    pub pod_gone: usize,
    /// Chosen for deletion but already ended.
    pub already_gone: usize,
    /// Wall time of the dump, the judging and the deletions.
    pub duration: Duration,
    /// Of which: listing the entries.
    pub dump: Duration,
    /// Of which: judging them.
    pub judge: Duration,
}

/// The node's own addresses (in its network namespace): traffic it originates is always
/// allowed by the ruleset, so its flows are never removed.
pub fn node_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    out
}

fn protocol_of(number: u8) -> Option<Protocol> {
    match i32::from(number) {
        libc::IPPROTO_TCP => Some(Protocol::Tcp),
        libc::IPPROTO_UDP => Some(Protocol::Udp),
        libc::IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Does this entry concern the node's pods at all (so it is worth judging)?
fn concerns_node(np: &NodePolicy, gone: &BTreeSet<IpAddr>, ip: &IpAddr) -> bool {
    np.local_addrs.contains(ip) || gone.contains(ip) || np.pod_cidrs.iter().any(|c| c.contains(ip))
}

/// Which of `flows` the rules of `np` no longer allow, with the reason. Pure.
pub fn choose(
    np: &NodePolicy,
    gone: &BTreeSet<IpAddr>,
    node_addrs: &HashSet<IpAddr>,
    flows: Vec<Flow>,
) -> (Vec<Flow>, Vec<Flow>) {
    let mut denied = Vec::new();
    let mut pod_gone = Vec::new();
    for flow in flows {
        let judged = judge_flow(
            np,
            &EstablishedFlow {
                src: flow.src,
                dst: flow.dst,
                protocol: protocol_of(flow.protocol),
                port: flow.dst_port.unwrap_or(0),
                from_node: node_addrs.contains(&flow.src),
            },
            gone,
        );
        match judged {
            FlowJudgement::Keep => {}
            FlowJudgement::Denied(_) => denied.push(flow),
            FlowJudgement::PodGone(_) => pod_gone.push(flow),
        }
    }
    (denied, pod_gone)
}

/// Run one pass in the calling thread's network namespace.
pub fn pass(np: &NodePolicy, gone: &BTreeSet<IpAddr>) -> Result<PassReport, ConntrackError> {
    let started = Instant::now();
    let node_addrs = node_addresses();
    let mut ct = Conntrack::open()?;
    let flows = ct.dump(|f| concerns_node(np, gone, &f.src) || concerns_node(np, gone, &f.dst))?;
    let dump = started.elapsed();
    let examined = flows.len();
    let (denied, pod_gone) = choose(np, gone, &node_addrs, flows);
    let judge = started.elapsed() - dump;
    let a = ct.delete(&denied)?;
    let b = ct.delete(&pod_gone)?;
    Ok(PassReport {
        examined,
        denied: a.deleted,
        pod_gone: b.deleted,
        already_gone: a.already_gone + b.already_gone,
        duration: started.elapsed(),
        dump,
        judge,
    })
}
