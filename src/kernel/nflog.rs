//! Receiving packets that the agent's drop rules hand to an NFLOG group.
//!
//! With `--log-denied`, every drop rule is preceded by `log prefix "…" group N`. The kernel
//! then sends a copy of each dropped packet's headers to whichever netlink socket bound group
//! N in that network namespace. This module is that socket: it binds a group and turns each
//! packet message into a [`LoggedPacket`] (the rule's prefix plus addresses, protocol and
//! ports). Deciding what is worth a log line is [`crate::agent::denylog`]'s job, which keeps
//! this edge thin.
//!
//! The libraries do the protocol work: `netlink-sys` is the socket, `netlink-packet-netfilter`
//! builds the `NFULNL_MSG_CONFIG` requests and decodes `NFULNL_MSG_PACKET` messages and their
//! attributes, and `etherparse` (in its lax mode, since NFLOG copies only the first
//! `copy_range` bytes) parses the IPv4/IPv6 headers and IPv6 extension headers of the logged
//! packet. What is still written by hand, and why:
//! - walking the messages of one datagram: `netlink-packet-core` decodes one message at a
//!   time and leaves the (aligned) step to the next to the caller;
//! - reading the hardware protocol of `NFULA_PACKET_HDR`: the crate's `PacketHdr` keeps it
//!   private, so it is read back from the attribute's wire form;
//! - the ports of SCTP, UDP-Lite and DCCP, which etherparse does not parse: every one of these
//!   starts with the two ports, as TCP and UDP do;
//! - the receive timeout and `SO_RCVBUFFORCE`, which `netlink-sys` does not set.
//!
//! Everything the kernel sends is treated as untrusted input: anything short or inconsistent
//! is a [`ParseError`] for that message, and the walk goes on with the next.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use etherparse::{LaxNetSlice, LaxSlicedPacket};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, Nla};
use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigMode, ConfigNla, PacketNla, Timeout, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const ETH_P_IP: u16 = libc::ETH_P_IP as u16;
const ETH_P_IPV6: u16 = libc::ETH_P_IPV6 as u16;

const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
const IPPROTO_SCTP: u8 = libc::IPPROTO_SCTP as u8;
const IPPROTO_UDPLITE: u8 = libc::IPPROTO_UDPLITE as u8;
const IPPROTO_DCCP: u8 = libc::IPPROTO_DCCP as u8;

/// Big enough for any datagram nfnetlink_log builds with the default buffer size; a larger
/// one is reported as [`ParseError::DatagramTruncated`] rather than parsed half-way.
const RECV_BUFFER_LEN: usize = 64 * 1024;
/// Config requests are answered synchronously inside `sendmsg`, so the ack is normally
/// already queued; the timeout only guards against a kernel that never answers.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the kernel should deliver packets for the bound group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NflogConfig {
    /// Bytes of each packet to copy. Only the IP and L4 headers are parsed; 128 leaves room
    /// for IPv6 extension headers in front of the ports without copying payload.
    pub copy_range: u16,
    /// Packets the kernel batches into one datagram before sending it. Batching keeps a flood
    /// of denied packets from costing one skb and one wakeup each.
    pub queue_threshold: u32,
    /// Longest a batch may wait before being sent anyway (kernel granularity is 10 ms), so a
    /// lone denied connection is still reported promptly.
    pub flush_timeout: Duration,
    /// Socket receive buffer. Overflow loses log messages (reported as
    /// [`NflogError::Overrun`]), so it is sized for bursts rather than the average.
    pub receive_buffer: usize,
}

impl Default for NflogConfig {
    fn default() -> Self {
        Self {
            copy_range: 128,
            queue_threshold: 32,
            flush_timeout: Duration::from_millis(10),
            receive_buffer: 1 << 20,
        }
    }
}

/// One packet the kernel logged: the rule's prefix and the headers that identify the flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The `log prefix` of the rule that matched (empty if the rule had none).
    pub prefix: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number of the upper layer, after any IPv6 extension headers.
    pub protocol: u8,
    /// Ports for TCP, UDP, UDP-Lite, SCTP and DCCP; `None` for other protocols and for
    /// non-first fragments (which carry no L4 header).
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

/// Why a netlink datagram or one of its packet messages could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink datagram did not fit the {capacity}-byte receive buffer")]
    DatagramTruncated { capacity: usize },
    /// The netlink framing or an attribute is malformed (the crate's decoder says how).
    #[error("malformed nfnetlink_log message: {0}")]
    Netlink(String),
    #[error("packet message carries no NFULA_PAYLOAD (is the copy mode set?)")]
    MissingPayload,
    #[error("cannot tell the network protocol: family {family}, hardware protocol {hw_protocol:?}")]
    UnknownFamily {
        family: u8,
        hw_protocol: Option<u16>,
    },
    #[error("packet logged as IPv{expected} starts with IP version {found}")]
    VersionMismatch { expected: u8, found: u8 },
    /// The IP or extension headers are malformed or cut off (etherparse says how).
    #[error("{layer} headers: {detail}")]
    Headers { layer: &'static str, detail: String },
    #[error("{layer} header truncated: need {needed} bytes, have {available}")]
    Truncated {
        layer: &'static str,
        needed: usize,
        available: usize,
    },
}

/// The step of opening, configuring or reading the NFLOG socket that failed.
#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("opening a NETLINK_NETFILTER socket: {errno}")]
    Open { errno: Errno },
    #[error("binding the NETLINK_NETFILTER socket: {errno}")]
    Bind { errno: Errno },
    #[error("sizing the socket receive buffer to {bytes} bytes: {errno}")]
    ReceiveBuffer { bytes: usize, errno: Errno },
    #[error("sending the request to {step} for NFLOG group {group}: {errno}")]
    SendConfig {
        step: &'static str,
        group: u16,
        errno: Errno,
    },
    /// `EPERM` when binding means another socket in this network namespace owns the group,
    /// or the caller lacks `CAP_NET_ADMIN` there; the kernel does not say which.
    #[error("kernel refused to {step} for NFLOG group {group}: {errno}{}", rejection_hint(*errno))]
    ConfigRejected {
        step: &'static str,
        group: u16,
        errno: Errno,
    },
    #[error("kernel did not acknowledge the request to {step} for NFLOG group {group}")]
    ConfigUnacknowledged { step: &'static str, group: u16 },
    #[error("setting the receive timeout: {errno}")]
    SetTimeout { errno: Errno },
    #[error("receiving from NFLOG group {group}: {errno}")]
    Receive { group: u16, errno: Errno },
    /// The kernel dropped messages because the receive buffer was full; the socket stays
    /// usable.
    #[error("NFLOG group {group}: receive buffer overflowed, some log messages were lost")]
    Overrun { group: u16 },
    /// One message could not be parsed; the socket stays usable.
    #[error("parsing an NFLOG message: {0}")]
    Parse(#[from] ParseError),
}

fn rejection_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EPERM => {
            " (another socket in this network namespace may own the group, or CAP_NET_ADMIN is missing)"
        }
        _ => "",
    }
}

impl NflogError {
    /// Whether the socket can keep being read after this error: lost or malformed messages
    /// are worth a warning, not a restart.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::Overrun { .. } | Self::Parse(_))
    }
}

/// A netlink socket bound to one NFLOG group of the network namespace it was opened in.
///
/// Sockets belong to the namespace of the thread that creates them, so open this from a
/// thread that has entered the node's namespace. Closing the socket unbinds the group (the
/// kernel drops the instance when its owning socket goes away).
pub struct NflogSocket {
    socket: Socket,
    group: u16,
    seq: u32,
    buf: Vec<u8>,
    /// Packets already received but not yet returned: one datagram may carry a batch.
    pending: VecDeque<Result<LoggedPacket, ParseError>>,
}

impl std::fmt::Debug for NflogSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NflogSocket")
            .field("group", &self.group)
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl NflogSocket {
    /// Bind `group` with [`NflogConfig::default`].
    pub fn open(group: u16) -> Result<Self, NflogError> {
        Self::open_with(group, &NflogConfig::default())
    }

    /// Bind `group` in the current thread's network namespace and configure delivery.
    pub fn open_with(group: u16, config: &NflogConfig) -> Result<Self, NflogError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| NflogError::Open {
            errno: errno_of(&e),
        })?;
        // Port id 0 lets the kernel pick a unique one; no multicast groups, NFLOG is unicast.
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(|e| NflogError::Bind {
                errno: errno_of(&e),
            })?;
        set_receive_buffer(&socket, config.receive_buffer)?;

        let mut this = Self {
            socket,
            group,
            seq: 0,
            buf: vec![0; RECV_BUFFER_LEN],
            pending: VecDeque::new(),
        };
        this.configure("bind the group", vec![ConfigNla::Cmd(ConfigCmd::Bind)])?;
        this.configure(
            "set the copy mode and batching",
            vec![
                ConfigNla::Mode(ConfigMode::new_packet(u32::from(config.copy_range))),
                ConfigNla::Timeout(Timeout::new(hundredths(config.flush_timeout))),
                ConfigNla::QThresh(config.queue_threshold.max(1)),
            ],
        )?;
        Ok(this)
    }

    /// The NFLOG group this socket is bound to.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Wait up to `timeout` for the next logged packet; `Ok(None)` when none arrived in time.
    ///
    /// Errors for which [`NflogError::is_recoverable`] holds concern single messages; keep
    /// calling after them.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<LoggedPacket>, NflogError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(next) = self.pending.pop_front() {
                return next.map(Some).map_err(NflogError::Parse);
            }
            // Under load a datagram is usually queued already: try without touching the
            // timeout first, so a busy reader costs one syscall per datagram.
            if self.receive_one(None)? {
                continue;
            }
            let remaining = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if remaining.is_zero() || !self.receive_one(Some(remaining))? {
                return Ok(None);
            }
        }
    }

    /// Send one config request and wait for its ack, queueing any packets that arrive first.
    fn configure(&mut self, step: &'static str, nlas: Vec<ConfigNla>) -> Result<(), NflogError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let group = self.group;
        // Config applies to the group, not to a family.
        let mut request = config_request(NetfilterProtoFamily::Unspec, group, nlas);
        request.header.sequence_number = seq;
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket
            .send_to(&bytes, &SocketAddr::new(0, 0), 0)
            .map_err(|e| NflogError::SendConfig {
                step,
                group,
                errno: errno_of(&e),
            })?;

        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NflogError::ConfigUnacknowledged { step, group });
            }
            let Some(len) = self.receive_datagram(Some(remaining))? else {
                continue;
            };
            let mut answer = None;
            let pending = &mut self.pending;
            parse_datagram(&self.buf[..len], |message| match message {
                Ok(Message::Ack { seq: acked, errno }) if acked == seq => answer = Some(errno),
                Ok(Message::Packet(packet)) => pending.push_back(Ok(packet)),
                Err(err) => pending.push_back(Err(err)),
                Ok(Message::Ack { .. } | Message::Other) => {}
            });
            match answer {
                Some(0) => return Ok(()),
                Some(errno) => {
                    let errno = Errno::from_raw(errno);
                    return Err(NflogError::ConfigRejected { step, group, errno });
                }
                None => {}
            }
        }
    }

    /// Receive one datagram into `pending`. `wait: None` polls; returns whether one arrived.
    fn receive_one(&mut self, wait: Option<Duration>) -> Result<bool, NflogError> {
        let Some(len) = self.receive_datagram(wait)? else {
            return Ok(false);
        };
        let pending = &mut self.pending;
        parse_datagram(&self.buf[..len], |message| match message {
            Ok(Message::Packet(packet)) => pending.push_back(Ok(packet)),
            Err(err) => pending.push_back(Err(err)),
            // Late acks and NLMSG_DONE trailers of batches carry nothing to report.
            Ok(Message::Ack { .. } | Message::Other) => {}
        });
        Ok(true)
    }

    /// Read one datagram from the kernel into `self.buf`, returning its length, or `None` if
    /// nothing arrived (immediately for `wait: None`, else within `wait`).
    fn receive_datagram(&mut self, wait: Option<Duration>) -> Result<Option<usize>, NflogError> {
        let flags = match wait {
            None => libc::MSG_DONTWAIT,
            Some(wait) => {
                setsockopt(&self.socket, sockopt::ReceiveTimeout, &timeval(wait))
                    .map_err(|errno| NflogError::SetTimeout { errno })?;
                0
            }
        };
        loop {
            // MSG_TRUNC makes the kernel report the datagram's real length.
            let received = self
                .socket
                .recv_from(&mut &mut self.buf[..], flags | libc::MSG_TRUNC);
            match received {
                Ok((len, _)) if len > RECV_BUFFER_LEN => {
                    self.pending.push_back(Err(ParseError::DatagramTruncated {
                        capacity: RECV_BUFFER_LEN,
                    }));
                    return Ok(Some(0));
                }
                // Only the kernel (port id 0) speaks for NFLOG; anything else is ignored.
                Ok((len, from)) if from.port_number() == 0 => return Ok(Some(len)),
                Ok(_) => return Ok(Some(0)),
                Err(e) => match errno_of(&e) {
                    Errno::EINTR => continue,
                    Errno::EAGAIN => return Ok(None),
                    Errno::ENOBUFS => return Err(NflogError::Overrun { group: self.group }),
                    errno => {
                        return Err(NflogError::Receive {
                            group: self.group,
                            errno,
                        });
                    }
                },
            }
        }
    }
}

impl AsFd for NflogSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

fn set_receive_buffer(socket: &Socket, bytes: usize) -> Result<(), NflogError> {
    // SO_RCVBUFFORCE ignores net.core.rmem_max, which is often too small for bursts; it
    // needs CAP_NET_ADMIN, which binding an NFLOG group needs anyway. Fall back to the
    // capped option when it is refused.
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_ok() {
        return Ok(());
    }
    socket
        .set_rx_buf_sz(bytes)
        .map_err(|e| NflogError::ReceiveBuffer {
            bytes,
            errno: errno_of(&e),
        })
}

fn timeval(wait: Duration) -> TimeVal {
    // A zero SO_RCVTIMEO means "block forever", so round up to at least one microsecond.
    // Capping the seconds at i32::MAX keeps the casts exact where time_t is 32 bits.
    let micros = wait.as_micros().clamp(1, i32::MAX as u128 * 1_000_000);
    let secs = (micros / 1_000_000) as libc::time_t;
    let rest = (micros % 1_000_000) as libc::suseconds_t;
    TimeVal::new(secs, rest)
}

/// Largest flush timeout sent: the kernel multiplies it by HZ (at most 1000) in 32 bits.
const MAX_FLUSH_HUNDREDTHS: u32 = u32::MAX / 1000;

/// `NFULA_CFG_TIMEOUT` is in hundredths of a second; round up so a non-zero timeout stays so.
fn hundredths(timeout: Duration) -> u32 {
    let tens_of_ms = timeout.as_millis().div_ceil(10);
    u32::try_from(tens_of_ms).map_or(MAX_FLUSH_HUNDREDTHS, |t| t.min(MAX_FLUSH_HUNDREDTHS))
}

/// One netlink message of a datagram, as far as this module cares.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    Packet(LoggedPacket),
    /// `NLMSG_ERROR`: `errno` is 0 for a plain ack, else the positive error number.
    Ack {
        seq: u32,
        errno: i32,
    },
    Other,
}

const NLMSG_HDRLEN: usize = 16;

/// Split a datagram into netlink messages and hand each to `sink`. A message that cannot be
/// decoded yields an error and the walk goes on; broken framing ends the walk, since the next
/// message can no longer be found.
fn parse_datagram(mut datagram: &[u8], mut sink: impl FnMut(Result<Message, ParseError>)) {
    while !datagram.is_empty() {
        let claimed = datagram
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 4]| u32::from_ne_bytes(b) as usize);
        let len = match claimed {
            Some(len) if (NLMSG_HDRLEN..=datagram.len()).contains(&len) => len,
            _ => {
                sink(Err(ParseError::Netlink(format!(
                    "message claims {} bytes, {} remain in the datagram",
                    claimed.unwrap_or(0),
                    datagram.len()
                ))));
                return;
            }
        };
        sink(parse_message(&datagram[..len]));
        datagram = datagram.get((len + 3) & !3..).unwrap_or_default();
    }
}

fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    let msg = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)
        .map_err(|e| ParseError::Netlink(e.to_string()))?;
    let seq = msg.header.sequence_number;
    match msg.payload {
        NetlinkPayload::Error(e) => Ok(Message::Ack {
            seq,
            errno: e.code.map_or(0, |c| c.get().saturating_neg()),
        }),
        NetlinkPayload::InnerMessage(NetfilterMessage {
            header,
            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
            ..
        }) => packet_of(u8::from(header.family), nlas).map(Message::Packet),
        _ => Ok(Message::Other),
    }
}

/// A decoded `NFULNL_MSG_PACKET` message's attributes → the logged packet.
fn packet_of(family: u8, nlas: Vec<PacketNla>) -> Result<LoggedPacket, ParseError> {
    let mut prefix = String::new();
    let mut hw_protocol = None;
    let mut payload = None;
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => prefix = String::from_utf8_lossy(p.to_bytes()).into_owned(),
            PacketNla::PacketHdr(hdr) => {
                // `struct nfulnl_msg_packet_hdr { __be16 hw_protocol; … }`; the crate keeps the
                // field private, so read it from the attribute's wire form.
                let mut raw = vec![0; hdr.value_len()];
                hdr.emit_value(&mut raw);
                hw_protocol = raw.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            }
            PacketNla::Payload(p) => payload = Some(p),
            _ => {}
        }
    }
    let payload = payload.ok_or(ParseError::MissingPayload)?;
    let version = match (family, hw_protocol) {
        (AF_INET, _) => 4,
        (AF_INET6, _) => 6,
        // Bridge and netdev hooks log with their own family; the ethertype still tells.
        (_, Some(ETH_P_IP)) => 4,
        (_, Some(ETH_P_IPV6)) => 6,
        _ => {
            return Err(ParseError::UnknownFamily {
                family,
                hw_protocol,
            });
        }
    };
    let headers = parse_ip(version, &payload)?;
    Ok(LoggedPacket {
        prefix,
        src: headers.src,
        dst: headers.dst,
        protocol: headers.protocol,
        src_port: headers.ports.map(|(src, _)| src),
        dst_port: headers.ports.map(|(_, dst)| dst),
    })
}

/// The flow-identifying fields of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpHeaders {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ports: Option<(u16, u16)>,
}

/// Parse an IP packet that the kernel said is IPv`version`, of which only the first bytes
/// may have been copied.
fn parse_ip(version: u8, packet: &[u8]) -> Result<IpHeaders, ParseError> {
    let layer = if version == 4 { "IPv4" } else { "IPv6" };
    let first = *packet.first().ok_or(ParseError::Truncated {
        layer,
        needed: 1,
        available: 0,
    })?;
    if first >> 4 != version {
        return Err(ParseError::VersionMismatch {
            expected: version,
            found: first >> 4,
        });
    }
    let sliced = LaxSlicedPacket::from_ip(packet).map_err(|e| ParseError::Headers {
        layer,
        detail: e.to_string(),
    })?;
    let (src, dst, payload, first_fragment) = match &sliced.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let first = h.fragments_offset().value() == 0;
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                ip.payload(),
                first,
            )
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                ip.payload(),
                !ipv6_later_fragment(ip),
            )
        }
        _ => {
            return Err(ParseError::Headers {
                layer,
                detail: "not an IP packet".into(),
            });
        }
    };
    // An extension header cut off by the copy range leaves no upper layer to speak of.
    if let Some((err, layer)) = &sliced.stop_err {
        use etherparse::err::Layer;
        if matches!(
            layer,
            Layer::IpAuthHeader
                | Layer::Ipv6ExtHeader
                | Layer::Ipv6HopByHopHeader
                | Layer::Ipv6DestOptionsHeader
                | Layer::Ipv6RouteHeader
                | Layer::Ipv6FragHeader
        ) {
            return Err(ParseError::Headers {
                layer: "IPv6 extension",
                detail: err.to_string(),
            });
        }
    }
    let protocol = payload.ip_number.0;
    let ports = if first_fragment {
        ports(protocol, payload.payload)?
    } else {
        None // a later fragment: the L4 header went out with the first one
    };
    Ok(IpHeaders {
        src,
        dst,
        protocol,
        ports,
    })
}

/// Is this an IPv6 fragment other than the first (offset not zero)?
fn ipv6_later_fragment(ip: &etherparse::LaxIpv6Slice<'_>) -> bool {
    ip.extensions().clone().into_iter().any(|ext| match ext {
        etherparse::Ipv6ExtensionSlice::Fragment(f) => f.fragment_offset().value() != 0,
        _ => false,
    })
}

fn is_port_protocol(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE | IPPROTO_DCCP
    )
}

/// Source and destination port of protocols that start with them (TCP, UDP, UDP-Lite, SCTP,
/// DCCP all do; etherparse knows only the first two, and a copy may be shorter than their
/// full header anyway).
fn ports(protocol: u8, l4: &[u8]) -> Result<Option<(u16, u16)>, ParseError> {
    if !is_port_protocol(protocol) {
        return Ok(None);
    }
    let header = l4.get(..4).ok_or(ParseError::Truncated {
        layer: "L4",
        needed: 4,
        available: l4.len(),
    })?;
    Ok(Some((
        u16::from_be_bytes([header[0], header[1]]),
        u16::from_be_bytes([header[2], header[3]]),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const IPPROTO_HOPOPTS: u8 = libc::IPPROTO_HOPOPTS as u8;
    const IPPROTO_ROUTING: u8 = libc::IPPROTO_ROUTING as u8;
    const IPPROTO_FRAGMENT: u8 = libc::IPPROTO_FRAGMENT as u8;
    const IPPROTO_DSTOPTS: u8 = libc::IPPROTO_DSTOPTS as u8;
    const IPPROTO_AH: u8 = libc::IPPROTO_AH as u8;

    const V4_SRC: [u8; 4] = [10, 0, 0, 1];
    const V4_DST: [u8; 4] = [10, 0, 0, 2];

    fn v6(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[1] = 0x77;
        a[15] = last;
        a
    }

    /// An IPv4 header with `options` words of options, then `l4`.
    fn ipv4(protocol: u8, options: usize, frag: u16, l4: &[u8]) -> Vec<u8> {
        let ihl = 5 + options as u8;
        let mut p = vec![0x40 | ihl, 0, 0, 0, 0, 0];
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0]);
        p.extend_from_slice(&V4_SRC);
        p.extend_from_slice(&V4_DST);
        p.extend(std::iter::repeat_n(1u8, options * 4)); // NOP options
        p.extend_from_slice(l4);
        p
    }

    /// An IPv6 header whose next header is `next`, then `rest` (extension headers and L4).
    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(rest.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&v6(1));
        p.extend_from_slice(&v6(2));
        p.extend_from_slice(rest);
        p
    }

    /// Ports 40001 -> 5001 followed by filler, as the start of a TCP/UDP/SCTP header.
    const L4: [u8; 8] = [0x9c, 0x41, 0x13, 0x89, 0, 8, 0, 0];

    fn headers(src: IpAddr, dst: IpAddr, protocol: u8, ports: Option<(u16, u16)>) -> IpHeaders {
        IpHeaders {
            src,
            dst,
            protocol,
            ports,
        }
    }

    fn v4_headers(protocol: u8, ports: Option<(u16, u16)>) -> IpHeaders {
        headers(
            Ipv4Addr::from(V4_SRC).into(),
            Ipv4Addr::from(V4_DST).into(),
            protocol,
            ports,
        )
    }

    fn v6_headers(protocol: u8, ports: Option<(u16, u16)>) -> IpHeaders {
        headers(
            Ipv6Addr::from(v6(1)).into(),
            Ipv6Addr::from(v6(2)).into(),
            protocol,
            ports,
        )
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn parse_ip_cases() {
        let hop_by_hop = [IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0]; // next UDP, 8 bytes, PadN
        let routing = [IPPROTO_DSTOPTS, 0, 0, 0, 0, 0, 0, 0];
        let dest_opts_long = [IPPROTO_TCP, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let first_fragment = [IPPROTO_UDP, 0, 0x00, 0x01, 0, 0, 0, 7]; // offset 0, M=1
        let later_fragment = [IPPROTO_UDP, 0, 0x05, 0x00, 0, 0, 0, 7]; // offset 160
        let ah = [IPPROTO_TCP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]; // (1+2)*4 = 12 bytes
        let icmp_echo = [8u8, 0, 0, 0, 0, 1, 0, 1];

        // (name, IP version the kernel reported, payload, expected headers)
        type Case = (&'static str, u8, Vec<u8>, Result<IpHeaders, ()>);
        let cases: Vec<Case> = vec![
            (
                "ipv4 udp",
                4,
                ipv4(IPPROTO_UDP, 0, 0, &L4),
                Ok(v4_headers(IPPROTO_UDP, Some((40001, 5001)))),
            ),
            (
                "ipv4 tcp with options (ihl 8)",
                4,
                ipv4(IPPROTO_TCP, 3, 0, &L4),
                Ok(v4_headers(IPPROTO_TCP, Some((40001, 5001)))),
            ),
            (
                "ipv4 sctp",
                4,
                ipv4(IPPROTO_SCTP, 0, 0, &L4),
                Ok(v4_headers(IPPROTO_SCTP, Some((40001, 5001)))),
            ),
            (
                "ipv4 icmp has no ports",
                4,
                ipv4(libc::IPPROTO_ICMP as u8, 0, 0, &icmp_echo),
                Ok(v4_headers(1, None)),
            ),
            (
                "ipv4 first fragment has ports",
                4,
                ipv4(IPPROTO_UDP, 0, 0x2000, &L4),
                Ok(v4_headers(IPPROTO_UDP, Some((40001, 5001)))),
            ),
            (
                "ipv4 later fragment has no ports",
                4,
                ipv4(IPPROTO_UDP, 0, 0x0010, &[1, 2]),
                Ok(v4_headers(IPPROTO_UDP, None)),
            ),
            (
                "ipv4 unknown protocol without l4 bytes",
                4,
                ipv4(47, 0, 0, &[]),
                Ok(v4_headers(47, None)),
            ),
            (
                "ipv4 udp with ports cut off",
                4,
                ipv4(IPPROTO_UDP, 0, 0, &L4[..3]),
                Err(()),
            ),
            (
                "ipv4 header cut off",
                4,
                ipv4(IPPROTO_UDP, 0, 0, &[])[..19].to_vec(),
                Err(()),
            ),
            (
                "ipv4 options cut off",
                4,
                ipv4(IPPROTO_UDP, 2, 0, &[])[..24].to_vec(),
                Err(()),
            ),
            (
                "ipv4 ihl below 5",
                4,
                {
                    let mut p = ipv4(IPPROTO_UDP, 0, 0, &L4);
                    p[0] = 0x44;
                    p
                },
                Err(()),
            ),
            (
                "ipv4 family but ipv6 bytes",
                4,
                ipv6(IPPROTO_UDP, &L4),
                Err(()),
            ),
            ("empty payload", 4, vec![], Err(())),
            (
                "ipv6 udp",
                6,
                ipv6(IPPROTO_UDP, &L4),
                Ok(v6_headers(IPPROTO_UDP, Some((40001, 5001)))),
            ),
            (
                "ipv6 icmpv6 has no ports",
                6,
                ipv6(libc::IPPROTO_ICMPV6 as u8, &[128, 0, 0, 0]),
                Ok(v6_headers(58, None)),
            ),
            (
                "ipv6 hop-by-hop then udp",
                6,
                ipv6(IPPROTO_HOPOPTS, &concat(&[&hop_by_hop, &L4])),
                Ok(v6_headers(IPPROTO_UDP, Some((40001, 5001)))),
            ),
            (
                "ipv6 routing, 16-byte dest-opts, then tcp",
                6,
                ipv6(IPPROTO_ROUTING, &concat(&[&routing, &dest_opts_long, &L4])),
                Ok(v6_headers(IPPROTO_TCP, Some((40001, 5001)))),
            ),
            (
                "ipv6 first fragment has ports",
                6,
                ipv6(IPPROTO_FRAGMENT, &concat(&[&first_fragment, &L4])),
                Ok(v6_headers(IPPROTO_UDP, Some((40001, 5001)))),
            ),
            (
                "ipv6 later fragment has no ports",
                6,
                ipv6(IPPROTO_FRAGMENT, &concat(&[&later_fragment, &[0xff; 3]])),
                Ok(v6_headers(IPPROTO_UDP, None)),
            ),
            (
                "ipv6 authentication header then tcp",
                6,
                ipv6(IPPROTO_AH, &concat(&[&ah, &L4])),
                Ok(v6_headers(IPPROTO_TCP, Some((40001, 5001)))),
            ),
            (
                "ipv6 no next header",
                6,
                ipv6(59, &[]),
                Ok(v6_headers(59, None)),
            ),
            (
                "ipv6 header cut off",
                6,
                ipv6(IPPROTO_UDP, &[])[..39].to_vec(),
                Err(()),
            ),
            (
                "ipv6 extension header longer than the capture",
                6,
                ipv6(IPPROTO_DSTOPTS, &[IPPROTO_UDP, 4, 0, 0, 0, 0, 0, 0]),
                Err(()),
            ),
            (
                "ipv6 extension header length byte missing",
                6,
                ipv6(IPPROTO_HOPOPTS, &[IPPROTO_UDP]),
                Err(()),
            ),
            (
                "ipv6 fragment header cut off",
                6,
                ipv6(IPPROTO_FRAGMENT, &first_fragment[..5]),
                Err(()),
            ),
            (
                "ipv6 udp ports cut off after hop-by-hop",
                6,
                ipv6(IPPROTO_HOPOPTS, &concat(&[&hop_by_hop, &L4[..2]])),
                Err(()),
            ),
            (
                "ipv6 family but ipv4 bytes",
                6,
                ipv4(IPPROTO_UDP, 0, 0, &L4),
                Err(()),
            ),
        ];
        for (name, version, bytes, want) in cases {
            assert_eq!(
                parse_ip(version, &bytes).map_err(|_| ()),
                want,
                "case {name:?}"
            );
        }
    }

    /// A packet message as the kernel sends it, built with the crate's own types.
    fn packet_message(seq: u32, family: NetfilterProtoFamily, nlas: Vec<PacketNla>) -> Vec<u8> {
        let mut header = netlink_packet_core::NetlinkHeader::default();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                netlink_packet_netfilter::NetfilterHeader::new(family, 0, 100),
                ULogMessage::Packet(nlas),
            )),
        );
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        bytes
    }

    fn prefix(p: &str) -> PacketNla {
        PacketNla::Prefix(std::ffi::CString::new(p).expect("no NUL"))
    }

    fn logged(prefix: &str, h: IpHeaders) -> LoggedPacket {
        LoggedPacket {
            prefix: prefix.into(),
            src: h.src,
            dst: h.dst,
            protocol: h.protocol,
            src_port: h.ports.map(|p| p.0),
            dst_port: h.ports.map(|p| p.1),
        }
    }

    fn collect(datagram: &[u8]) -> Vec<Result<Message, ()>> {
        let mut out = Vec::new();
        parse_datagram(datagram, |m| out.push(m.map_err(|_| ())));
        out
    }

    #[test]
    fn packet_messages_decode_into_logged_packets() {
        let v4 = ipv4(IPPROTO_UDP, 0, 0, &L4);
        let v6 = ipv6(IPPROTO_TCP, &L4);
        let udp4 = v4_headers(IPPROTO_UDP, Some((40001, 5001)));
        let tcp6 = v6_headers(IPPROTO_TCP, Some((40001, 5001)));
        type Case = (&'static str, Vec<u8>, Vec<Result<Message, ()>>);
        let cases: Vec<Case> = vec![
            (
                "ipv4 with prefix",
                packet_message(
                    1,
                    NetfilterProtoFamily::IPv4,
                    vec![prefix("knp:ingress:a/b"), PacketNla::Payload(v4.clone())],
                ),
                vec![Ok(Message::Packet(logged("knp:ingress:a/b", udp4)))],
            ),
            (
                "ipv6 with prefix",
                packet_message(
                    1,
                    NetfilterProtoFamily::IPv6,
                    vec![prefix("knp:egress:a/b"), PacketNla::Payload(v6.clone())],
                ),
                vec![Ok(Message::Packet(logged("knp:egress:a/b", tcp6)))],
            ),
            (
                "no prefix attribute gives an empty prefix",
                packet_message(
                    1,
                    NetfilterProtoFamily::IPv4,
                    vec![PacketNla::Payload(v4.clone())],
                ),
                vec![Ok(Message::Packet(logged("", udp4)))],
            ),
            (
                "missing payload",
                packet_message(1, NetfilterProtoFamily::IPv4, vec![prefix("x")]),
                vec![Err(())],
            ),
            (
                "unknown family and no ethertype",
                packet_message(
                    1,
                    NetfilterProtoFamily::Bridge,
                    vec![prefix("x"), PacketNla::Payload(v4.clone())],
                ),
                vec![Err(())],
            ),
            (
                "payload of the wrong version",
                packet_message(
                    1,
                    NetfilterProtoFamily::IPv4,
                    vec![PacketNla::Payload(v6.clone())],
                ),
                vec![Err(())],
            ),
            (
                "a bad packet does not hide the next one",
                [
                    packet_message(
                        1,
                        NetfilterProtoFamily::IPv4,
                        vec![PacketNla::Payload(v4[..10].to_vec())],
                    ),
                    packet_message(
                        2,
                        NetfilterProtoFamily::IPv4,
                        vec![prefix("p"), PacketNla::Payload(v4.clone())],
                    ),
                ]
                .concat(),
                vec![Err(()), Ok(Message::Packet(logged("p", udp4)))],
            ),
            ("empty datagram", vec![], vec![]),
            (
                "message longer than the datagram",
                packet_message(
                    1,
                    NetfilterProtoFamily::IPv4,
                    vec![PacketNla::Payload(v4.clone())],
                )[..30]
                    .to_vec(),
                vec![Err(())],
            ),
            (
                "trailing garbage shorter than a header",
                [
                    packet_message(
                        1,
                        NetfilterProtoFamily::IPv4,
                        vec![prefix("p"), PacketNla::Payload(v4.clone())],
                    ),
                    vec![1, 2, 3],
                ]
                .concat(),
                vec![Ok(Message::Packet(logged("p", udp4))), Err(())],
            ),
        ];
        for (name, datagram, want) in cases {
            assert_eq!(collect(&datagram), want, "case {name:?}");
        }
    }

    #[test]
    fn bridge_family_falls_back_to_the_ethertype() {
        // NFULA_PACKET_HDR: hw_protocol (be16), hook, pad.
        let hdr = PacketNla::PacketHdr(
            netlink_packet_netfilter::nflog::PacketHdr::parse(&[0x86, 0xdd, 4, 0]).expect("hdr"),
        );
        let v6 = ipv6(IPPROTO_TCP, &L4);
        let bytes = packet_message(
            3,
            NetfilterProtoFamily::Bridge,
            vec![hdr, prefix("x"), PacketNla::Payload(v6)],
        );
        assert_eq!(
            collect(&bytes),
            vec![Ok(Message::Packet(logged(
                "x",
                v6_headers(IPPROTO_TCP, Some((40001, 5001)))
            )))]
        );
    }

    #[test]
    fn acks_carry_their_sequence_and_errno() {
        let ack = |seq: u32, code: i32| {
            let mut msg = NetlinkMessage::<NetfilterMessage>::new(
                {
                    let mut h = netlink_packet_core::NetlinkHeader::default();
                    h.sequence_number = seq;
                    h
                },
                NetlinkPayload::Error(netlink_packet_core::ErrorMessage::default()),
            );
            if let NetlinkPayload::Error(e) = &mut msg.payload {
                e.code = std::num::NonZeroI32::new(code);
                e.header = vec![0; 16];
            }
            msg.finalize();
            let mut bytes = vec![0; msg.buffer_len()];
            msg.serialize(&mut bytes);
            bytes
        };
        assert_eq!(
            collect(&ack(7, 0)),
            vec![Ok(Message::Ack { seq: 7, errno: 0 })]
        );
        assert_eq!(
            collect(&ack(8, -libc::EPERM)),
            vec![Ok(Message::Ack {
                seq: 8,
                errno: libc::EPERM
            })]
        );
    }

    #[test]
    fn garbage_never_panics() {
        let v6 = ipv6(IPPROTO_UDP, &L4);
        let good = packet_message(
            1,
            NetfilterProtoFamily::IPv6,
            vec![prefix("knp"), PacketNla::Payload(v6)],
        );
        // Every truncation and every single-byte corruption of a valid datagram.
        for cut in 0..good.len() {
            let _ = collect(&good[..cut]);
        }
        for at in 0..good.len() {
            for value in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = collect(&bad);
            }
        }
    }

    #[test]
    fn config_requests_carry_the_group_and_sequence() {
        let mut request = config_request(
            NetfilterProtoFamily::Unspec,
            100,
            vec![ConfigNla::Cmd(ConfigCmd::Bind)],
        );
        request.header.sequence_number = 5;
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).expect("parses");
        assert_eq!(parsed.header.sequence_number, 5);
        assert_eq!(
            parsed.header.flags,
            netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK
        );
        let NetlinkPayload::InnerMessage(m) = parsed.payload else {
            panic!("not a netfilter message");
        };
        assert_eq!(m.header.res_id, 100);
        assert_eq!(
            m.inner,
            NetfilterMessageInner::ULog(ULogMessage::Config(vec![ConfigNla::Cmd(ConfigCmd::Bind)]))
        );
    }

    #[test]
    fn timeout_conversions() {
        let cases = [
            ("zero", Duration::ZERO, 0),
            ("1ms rounds up", Duration::from_millis(1), 1),
            ("10ms", Duration::from_millis(10), 1),
            ("11ms", Duration::from_millis(11), 2),
            ("1s", Duration::from_secs(1), 100),
            ("huge is capped", Duration::MAX, MAX_FLUSH_HUNDREDTHS),
            ("just below the cap", Duration::from_secs(42_949), 4_294_900),
        ];
        for (name, timeout, want) in cases {
            assert_eq!(hundredths(timeout), want, "case {name:?}");
        }
        // Zero must not become SO_RCVTIMEO's "forever".
        let tv = timeval(Duration::ZERO);
        assert_eq!((tv.tv_sec(), tv.tv_usec()), (0, 1));
        let tv = timeval(Duration::from_millis(1500));
        assert_eq!((tv.tv_sec(), tv.tv_usec()), (1, 500_000));
        let tv = timeval(Duration::MAX);
        assert_eq!((tv.tv_sec(), tv.tv_usec()), (i32::MAX.into(), 0));
    }
}
