//! Connection tracking over netlink: list the flows of this network namespace and delete
//! chosen ones.
//!
//! The ruleset judges only the first packet of a connection; everything after it passes as
//! `ct state established`. So when a policy change denies a connection that is already
//! established, the kernel keeps letting it through until its conntrack entry ends. With
//! `--enforce-established` the agent lists the entries after such a sync, asks the pure
//! evaluator about each (`engine::evaluate::judge_flow`), and deletes the ones the new rules
//! no longer allow: their next packet is then new again, and the ruleset drops it.
//!
//! The messages are `netlink-packet-netfilter`'s (`ctnetlink` dump and delete) and the socket
//! is `netlink-sys`'s; this module only frames requests, walks multi-part answers and turns
//! entries into [`Flow`]s. What the crate lacks is done here by hand and kept small: the
//! zone attribute (`CTA_ZONE`, passed back verbatim when deleting) is read from the crate's
//! raw attribute. Conntrack tables are per network namespace: a socket opened on a thread
//! inside the node's namespace sees and edits that namespace's table only.
//!
//! Kernel input is untrusted: a message the crate cannot parse is counted and skipped, never
//! trusted half-way.

use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `CTA_ZONE`: the crate leaves it as a raw attribute.
const CTA_ZONE: u16 = 18;
/// Deletions sent per `sendmsg` before their acks are read.
const DELETE_BATCH: usize = 128;
/// Receive buffer for dumps: the kernel fills each datagram up to a page or so; a large
/// socket buffer keeps a dump of 100,000 entries from overrunning.
const RECV_BUFFER: usize = 1 << 20;
/// No conntrack answer should take this long; it guards against a kernel that never answers.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// One tracked connection, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// IP protocol number.
    pub protocol: u8,
    /// Who opened it (the original source; SNAT happens after our chains).
    pub src: IpAddr,
    /// Source port, for protocols with ports.
    pub src_port: Option<u16>,
    /// Where it really goes: the source of the reply direction, so after Service DNAT (the
    /// backend pod, as the ruleset sees it at postrouting).
    pub dst: IpAddr,
    /// The destination port after DNAT.
    pub dst_port: Option<u16>,
    /// The original tuple as the kernel sent it; a deletion names the entry by it.
    orig: Vec<Tuple>,
    /// The entry's zone, when not the default one.
    zone: Option<DefaultNla>,
}

/// What a deletion pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteReport {
    /// Entries the kernel deleted.
    pub deleted: usize,
    /// Entries that had already gone (ended or timed out) when asked for.
    pub already_gone: usize,
}

/// The step of talking to ctnetlink that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening a NETLINK_NETFILTER socket for conntrack: {0}")]
    Open(#[source] std::io::Error),
    #[error("setting up the conntrack socket ({step}): {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the conntrack {step} request: {source}")]
    Send {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("receiving the conntrack {step} answer: {source}")]
    Receive {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused the conntrack {step} request: {errno}")]
    Refused {
        step: &'static str,
        errno: std::io::Error,
    },
    #[error("the conntrack {step} answer overran the socket buffer; some entries were not seen")]
    Overrun { step: &'static str },
}

/// A ctnetlink socket in the current thread's network namespace.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Messages of a dump the crate could not parse (skipped).
    pub unparsed: usize,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack").field("seq", &self.seq).finish()
    }
}

impl Conntrack {
    /// Open a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(|source| ConntrackError::Setup {
            step: "bind",
            source,
        })?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|source| ConntrackError::Setup {
                step: "connect",
                source,
            })?;
        socket
            .set_rx_buf_sz(RECV_BUFFER)
            .map_err(|source| ConntrackError::Setup {
                step: "receive buffer",
                source,
            })?;
        let timeout = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as libc::time_t, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| ConntrackError::Setup {
                step: "receive timeout",
                source: e.into(),
            })?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
            unparsed: 0,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Every entry of both families for which `keep` holds.
    pub fn dump(
        &mut self,
        mut keep: impl FnMut(&Flow) -> bool,
    ) -> Result<Vec<Flow>, ConntrackError> {
        const STEP: &str = "dump";
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        // Family 0: the kernel dumps every layer-3 family.
        let request = message(
            header,
            NetfilterProtoFamily::Unspec,
            ConntrackMessage::Get(vec![]),
        );
        self.socket
            .send(&request, 0)
            .map_err(|source| ConntrackError::Send { step: STEP, source })?;
        let mut out = Vec::new();
        loop {
            let len = self.receive(STEP)?;
            let mut at = 0;
            while at < len {
                let bytes = &self.buf[at..len];
                let Some(claimed) = bytes
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                else {
                    break;
                };
                let claimed = claimed as usize;
                if claimed < 16 || claimed > bytes.len() {
                    self.unparsed += 1;
                    break;
                }
                at += (claimed + 3) & !3;
                match NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..claimed]) {
                    Ok(msg) if msg.header.sequence_number != seq => {}
                    Ok(msg) => match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            if let Some(code) = e.code {
                                return Err(ConntrackError::Refused {
                                    step: STEP,
                                    errno: std::io::Error::from_raw_os_error(-code.get()),
                                });
                            }
                        }
                        NetlinkPayload::Overrun(_) => {
                            return Err(ConntrackError::Overrun { step: STEP });
                        }
                        NetlinkPayload::InnerMessage(inner) => {
                            if let Some(flow) = flow_of(inner) {
                                if keep(&flow) {
                                    out.push(flow);
                                }
                            } else {
                                self.unparsed += 1;
                            }
                        }
                        _ => {}
                    },
                    Err(_) => self.unparsed += 1,
                }
            }
        }
    }

    /// Delete these entries. An entry that has gone meanwhile is counted, not an error.
    pub fn delete(&mut self, flows: &[Flow]) -> Result<DeleteReport, ConntrackError> {
        const STEP: &str = "delete";
        let mut report = DeleteReport::default();
        for batch in flows.chunks(DELETE_BATCH) {
            let mut request = Vec::new();
            let first = self.seq.wrapping_add(1);
            for flow in batch {
                let mut header = NetlinkHeader::default();
                header.flags = NLM_F_REQUEST | NLM_F_ACK;
                header.sequence_number = self.next_seq();
                let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(flow.orig.clone())];
                if let Some(zone) = &flow.zone {
                    attrs.push(ConntrackAttribute::Other(zone.clone()));
                }
                let family = match flow.src {
                    IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
                    IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
                };
                request.extend(message(header, family, ConntrackMessage::Delete(attrs)));
            }
            self.socket
                .send(&request, 0)
                .map_err(|source| ConntrackError::Send { step: STEP, source })?;
            let mut pending = batch.len();
            while pending > 0 {
                let len = self.receive(STEP)?;
                let mut at = 0;
                while at < len {
                    let bytes = &self.buf[at..len];
                    let Some(claimed) = bytes
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(|b: [u8; 4]| u32::from_ne_bytes(b) as usize)
                    else {
                        break;
                    };
                    if claimed < 16 || claimed > bytes.len() {
                        break;
                    }
                    at += (claimed + 3) & !3;
                    let Ok(msg) =
                        NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..claimed])
                    else {
                        continue;
                    };
                    let ours = msg.header.sequence_number.wrapping_sub(first) < batch.len() as u32;
                    let NetlinkPayload::Error(e) = msg.payload else {
                        continue;
                    };
                    if !ours {
                        continue;
                    }
                    pending -= 1;
                    match e.code.map(|c| -c.get()) {
                        None => report.deleted += 1,
                        Some(libc::ENOENT) => report.already_gone += 1,
                        Some(errno) => {
                            return Err(ConntrackError::Refused {
                                step: STEP,
                                errno: std::io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    fn receive(&mut self, step: &'static str) -> Result<usize, ConntrackError> {
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n.min(self.buf.len())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(ConntrackError::Overrun { step });
                }
                Err(source) => return Err(ConntrackError::Receive { step, source }),
            }
        }
    }
}

fn message(header: NetlinkHeader, family: NetfilterProtoFamily, m: ConntrackMessage) -> Vec<u8> {
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), m)),
    );
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// Source, destination, protocol number, source port and destination port of one tuple.
type Endpoints = (IpAddr, IpAddr, u8, Option<u16>, Option<u16>);

/// Addresses and ports of one tuple.
fn endpoints(tuple: &[Tuple]) -> Option<Endpoints> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for t in tuple {
        match t {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(parts) => {
                for p in parts {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((src?, dst?, proto?, sport, dport))
}

fn flow_of(msg: NetfilterMessage) -> Option<Flow> {
    let netlink_packet_netfilter::NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) =
        msg.inner
    else {
        return None;
    };
    let (mut orig, mut reply, mut zone) = (None, None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE => zone = Some(nla),
            _ => {}
        }
    }
    let orig = orig?;
    let (src, _, protocol, src_port, _) = endpoints(&orig)?;
    // The reply comes from where the connection really went (after DNAT).
    let (dst, _, _, dst_port, _) = endpoints(reply.as_deref()?)?;
    Some(Flow {
        protocol,
        src,
        src_port,
        dst,
        dst_port,
        orig,
        zone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::Protocol;

    fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src.parse().expect("ip")),
                IPTuple::DestinationAddress(dst.parse().expect("ip")),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    fn entry(attrs: Vec<ConntrackAttribute>) -> NetfilterMessage {
        NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            ConntrackMessage::New(attrs),
        )
    }

    #[test]
    fn flow_takes_the_destination_after_dnat_from_the_reply_tuple() {
        // 10.244.1.5 → Service 10.96.0.10:80, DNAT to backend 10.244.2.7:8080.
        let msg = entry(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.244.1.5", "10.96.0.10", 40000, 80)),
            ConntrackAttribute::CtaTupleReply(tuple("10.244.2.7", "10.244.1.5", 8080, 40000)),
        ]);
        let flow = flow_of(msg).expect("flow");
        assert_eq!(flow.src, "10.244.1.5".parse::<IpAddr>().expect("ip"));
        assert_eq!(flow.src_port, Some(40000));
        assert_eq!(flow.dst, "10.244.2.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(flow.dst_port, Some(8080));
        assert_eq!(flow.protocol, 6);
        assert_eq!(flow.zone, None);
    }

    #[test]
    fn entries_without_both_tuples_are_not_flows() {
        let cases = [
            (
                "no reply tuple",
                entry(vec![ConntrackAttribute::CtaTupleOrig(tuple(
                    "10.0.0.1", "10.0.0.2", 1, 2,
                ))]),
            ),
            (
                "no original tuple",
                entry(vec![ConntrackAttribute::CtaTupleReply(tuple(
                    "10.0.0.1", "10.0.0.2", 1, 2,
                ))]),
            ),
            (
                "tuple without addresses",
                entry(vec![
                    ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(vec![
                        ProtoTuple::Protocol(Protocol::Udp),
                    ])]),
                    ConntrackAttribute::CtaTupleReply(tuple("10.0.0.1", "10.0.0.2", 1, 2)),
                ]),
            ),
        ];
        for (name, msg) in cases {
            assert_eq!(flow_of(msg), None, "{name}");
        }
    }

    #[test]
    fn a_zone_is_kept_for_the_deletion() {
        let zone = DefaultNla::new(CTA_ZONE, 7u16.to_be_bytes().to_vec());
        let msg = entry(vec![
            ConntrackAttribute::CtaTupleOrig(tuple("10.0.0.1", "10.0.0.2", 1, 2)),
            ConntrackAttribute::CtaTupleReply(tuple("10.0.0.2", "10.0.0.1", 2, 1)),
            ConntrackAttribute::Other(zone.clone()),
        ]);
        let flow = flow_of(msg).expect("flow");
        assert_eq!(flow.zone.as_ref().map(|z| z.kind()), Some(CTA_ZONE));
        let mut value = vec![0; zone.value_len()];
        zone.emit_value(&mut value);
        assert_eq!(value, vec![0, 7]);
    }

    #[test]
    fn delete_request_names_the_original_tuple() {
        let orig = tuple("10.0.0.1", "10.0.0.2", 1000, 80);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = 9;
        let bytes = message(
            header,
            NetfilterProtoFamily::IPv4,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(orig.clone())]),
        );
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).expect("parses");
        assert_eq!(parsed.header.sequence_number, 9);
        assert_eq!(bytes.len(), parsed.buffer_len());
        let NetlinkPayload::InnerMessage(inner) = parsed.payload else {
            panic!("not an inner message");
        };
        assert_eq!(inner.header.family, NetfilterProtoFamily::IPv4);
        assert_eq!(
            inner.inner,
            netlink_packet_netfilter::NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(
                vec![ConntrackAttribute::CtaTupleOrig(orig)]
            ))
        );
    }
}
