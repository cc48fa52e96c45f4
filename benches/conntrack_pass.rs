//! Cost of the `--enforce-established` conntrack pass with 100,000 tracked flows.
//!
//! Inside a network namespace this benchmark creates (needs root; the host's conntrack table
//! is never read or changed), it creates `CONNTRACK_FLOWS` (default 100,000) UDP entries over
//! ctnetlink, from remote addresses to the 110 pods of one node, then times the pass the agent
//! runs after a sync (`agent::established::pass`: dump, judge every entry with the evaluator,
//! delete the denied ones):
//! - after a change that denies nothing (every entry is judged, none deleted);
//! - after a change that isolates one namespace of ten (a tenth of the entries deleted);
//! - again right after (nothing left to delete).
//!
//! Run: `cargo bench --bench conntrack_pass`. Figures are recorded in docs/benchmarks.md.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use kube_nftpolicy::agent::established;
use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::compile::{CompileOptions, node_policy};
use kube_nftpolicy::engine::resolve::NodePolicy;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sched::{CloneFlags, setns};

const NAMESPACES: usize = 10;
const PODS: usize = 110;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, (2 + i) as u8)
}

/// 110 pods of node-1 in ten namespaces; `isolate` gives `ns-0` a default-deny ingress policy.
fn node_policy_with(isolate: bool) -> NodePolicy {
    let mut text = String::new();
    for n in 0..NAMESPACES {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}}}\n"
        ));
    }
    for i in 0..PODS {
        let ip = pod_ip(i);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, labels: {{app: a{i}}}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n",
            i % NAMESPACES
        ));
    }
    if isolate {
        text.push_str("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: ns-0}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n");
    }
    let m = parse_sources(&[("bench.yaml".into(), text)]).expect("manifests");
    let snap = m.into_index().snapshot();
    let opts = CompileOptions {
        pod_cidrs: vec!["10.244.1.0/24".parse().expect("cidr")],
        ..CompileOptions::default()
    };
    node_policy(&snap, "node-1", &opts)
}

fn tuple(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(IpAddr::V4(src)),
            IPTuple::DestinationAddress(IpAddr::V4(dst)),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Udp),
            ProtoTuple::SourcePort(sport),
            ProtoTuple::DestinationPort(dport),
        ]),
    ]
}

/// Create `n` UDP entries remote → local pod over ctnetlink, 256 per send.
fn create_flows(n: usize) -> Duration {
    let started = Instant::now();
    let mut socket = Socket::new(NETLINK_NETFILTER).expect("socket");
    socket.bind_auto().expect("bind");
    socket.connect(&SocketAddr::new(0, 0)).expect("connect");
    let mut buf = vec![0u8; 1 << 16];
    let mut seq = 0u32;
    let mut made = 0;
    while made < n {
        let batch = (n - made).min(256);
        let mut request = Vec::new();
        for k in made..made + batch {
            let src = Ipv4Addr::new(10, 245, (k / 60_000) as u8, ((k / 240) % 250) as u8 + 1);
            let sport = 1024 + (k % 60_000) as u16;
            let dst = pod_ip(k % PODS);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
            seq += 1;
            header.sequence_number = seq;
            let mut msg = NetlinkMessage::new(
                header,
                NetlinkPayload::from(NetfilterMessage::new(
                    NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                    ConntrackMessage::New(vec![
                        ConntrackAttribute::CtaTupleOrig(tuple(src, sport, dst, 53)),
                        ConntrackAttribute::CtaTupleReply(tuple(dst, 53, src, sport)),
                        ConntrackAttribute::CtaTimeout(3600),
                    ]),
                )),
            );
            msg.finalize();
            let mut bytes = vec![0; msg.buffer_len()];
            msg.serialize(&mut bytes);
            request.extend(bytes);
        }
        socket.send(&request, 0).expect("send");
        let mut acked = 0;
        while acked < batch {
            let len = socket.recv(&mut &mut buf[..], 0).expect("recv");
            let mut at = 0;
            while at < len {
                let msg =
                    NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..len]).expect("ack");
                at += (msg.header.length as usize + 3) & !3;
                if let NetlinkPayload::Error(e) = msg.payload {
                    assert!(e.code.is_none(), "creating an entry failed: {:?}", e.code);
                    acked += 1;
                }
            }
        }
        made += batch;
    }
    started.elapsed()
}

fn main() {
    let flows: usize = std::env::var("CONNTRACK_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let name = format!("knpct{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("conntrack_pass: cannot create a network namespace (run as root)");
        std::process::exit(1);
    }
    let _ns = Netns(name.clone());
    let fd = File::open(format!("/run/netns/{name}")).expect("open netns");
    // From here on this thread's sockets are the namespace's: its conntrack table only.
    setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");

    let made = create_flows(flows);
    println!(
        "created {flows} UDP conntrack entries in {:.2} s",
        made.as_secs_f64()
    );
    let open = node_policy_with(false);
    let isolated = node_policy_with(true);
    let none = BTreeSet::new();
    let mut rows = Vec::new();
    for (what, np) in [
        ("a change that denies nothing", &open),
        ("a change that isolates 1 namespace of 10", &isolated),
        ("the same again (nothing left to delete)", &isolated),
    ] {
        let r = established::pass(np, &none).expect("pass");
        println!(
            "{what:<44} {:>7.1} ms (dump {:.1}, judge {:.1}): examined {:>6}, deleted {:>6} (already gone {})",
            r.duration.as_secs_f64() * 1e3,
            r.dump.as_secs_f64() * 1e3,
            r.judge.as_secs_f64() * 1e3,
            r.examined,
            r.denied + r.pod_gone,
            r.already_gone
        );
        rows.push(r);
    }
    assert_eq!(rows[0].denied, 0, "nothing is denied without policy");
    // ns-0 holds 11 of the 110 pods, and flows are spread evenly over the pods.
    let want = flows * 11 / PODS;
    assert!(
        rows[1].denied.abs_diff(want) <= 11,
        "about a tenth of the flows go to ns-0: {} (want {want})",
        rows[1].denied
    );
    assert_eq!(rows[2].denied, 0);
}
