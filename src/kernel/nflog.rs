//! Receiving packets that the agent's drop rules hand to an NFLOG group.
//!
//! With `--log-denied`, every drop rule is preceded by `log prefix "…" group N`. The kernel
//! then sends a copy of each dropped packet's headers to whichever netlink socket bound group
//! N in that network namespace. This module is that socket: it speaks just enough of the
//! `nfnetlink_log` protocol to bind a group and to turn each packet message into a
//! [`LoggedPacket`] (the rule's prefix plus addresses, protocol and ports). Deciding what is
//! worth a log line is [`crate::agent::denylog`]'s job, which keeps this edge thin.
//!
//! Everything the kernel sends is treated as untrusted input: the framing, attributes and
//! packet headers are parsed by pure functions that return [`ParseError`] on anything short or
//! inconsistent, and those functions are unit-tested on hand-built bytes.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvmsg, sendto,
    setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;

// Wire constants. libc carries them as `c_int`; netlink puts them in 8- and 16-bit fields.
const NFNL_SUBSYS_ULOG: u16 = libc::NFNL_SUBSYS_ULOG as u16;
const NFNETLINK_V0: u8 = libc::NFNETLINK_V0 as u8;
const MSG_TYPE_PACKET: u16 = (NFNL_SUBSYS_ULOG << 8) | libc::NFULNL_MSG_PACKET as u16;
const MSG_TYPE_CONFIG: u16 = (NFNL_SUBSYS_ULOG << 8) | libc::NFULNL_MSG_CONFIG as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLA_TYPE_MASK: u16 = libc::NLA_TYPE_MASK as u16;

const NFULA_PACKET_HDR: u16 = libc::NFULA_PACKET_HDR as u16;
const NFULA_PAYLOAD: u16 = libc::NFULA_PAYLOAD as u16;
const NFULA_PREFIX: u16 = libc::NFULA_PREFIX as u16;
const NFULA_CFG_CMD: u16 = libc::NFULA_CFG_CMD as u16;
const NFULA_CFG_MODE: u16 = libc::NFULA_CFG_MODE as u16;
const NFULA_CFG_TIMEOUT: u16 = libc::NFULA_CFG_TIMEOUT as u16;
const NFULA_CFG_QTHRESH: u16 = libc::NFULA_CFG_QTHRESH as u16;
const NFULNL_CFG_CMD_BIND: u8 = libc::NFULNL_CFG_CMD_BIND as u8;
const NFULNL_COPY_PACKET: u8 = libc::NFULNL_COPY_PACKET as u8;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const ETH_P_IP: u16 = libc::ETH_P_IP as u16;
const ETH_P_IPV6: u16 = libc::ETH_P_IPV6 as u16;

const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
const IPPROTO_SCTP: u8 = libc::IPPROTO_SCTP as u8;
const IPPROTO_UDPLITE: u8 = libc::IPPROTO_UDPLITE as u8;
const IPPROTO_DCCP: u8 = libc::IPPROTO_DCCP as u8;
const IPPROTO_HOPOPTS: u8 = libc::IPPROTO_HOPOPTS as u8;
const IPPROTO_ROUTING: u8 = libc::IPPROTO_ROUTING as u8;
const IPPROTO_FRAGMENT: u8 = libc::IPPROTO_FRAGMENT as u8;
const IPPROTO_DSTOPTS: u8 = libc::IPPROTO_DSTOPTS as u8;
const IPPROTO_AH: u8 = libc::IPPROTO_AH as u8;

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
    #[error("netlink message claims {claimed} bytes but only {available} remain in the datagram")]
    MessageLength { claimed: usize, available: usize },
    #[error("netlink message of type {msg_type:#06x} is too short for its {what}")]
    MessageTooShort { msg_type: u16, what: &'static str },
    #[error(
        "netlink attribute of type {attr_type} claims {claimed} bytes but only {available} remain"
    )]
    AttributeLength {
        attr_type: u16,
        claimed: usize,
        available: usize,
    },
    #[error("NFULA_PACKET_HDR is {len} bytes, expected at least 4")]
    PacketHeaderLength { len: usize },
    #[error("packet message carries no NFULA_PAYLOAD (is the copy mode set?)")]
    MissingPayload,
    #[error("cannot tell the network protocol: family {family}, hardware protocol {hw_protocol:?}")]
    UnknownFamily {
        family: u8,
        hw_protocol: Option<u16>,
    },
    #[error("packet logged as IPv{expected} starts with IP version {found}")]
    VersionMismatch { expected: u8, found: u8 },
    #[error("IPv4 header length field is {ihl} words, below the minimum of 5")]
    Ipv4HeaderLength { ihl: u8 },
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
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
    group: u16,
    seq: u32,
    buf: Vec<u8>,
    /// Packets already received but not yet returned: one datagram may carry a batch.
    pending: VecDeque<Result<LoggedPacket, ParseError>>,
}

impl NflogSocket {
    /// Bind `group` with [`NflogConfig::default`].
    pub fn open(group: u16) -> Result<Self, NflogError> {
        Self::open_with(group, &NflogConfig::default())
    }

    /// Bind `group` in the current thread's network namespace and configure delivery.
    pub fn open_with(group: u16, config: &NflogConfig) -> Result<Self, NflogError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|errno| NflogError::Open { errno })?;
        // Port id 0 lets the kernel pick a unique one; no multicast groups, NFLOG is unicast.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|errno| NflogError::Bind { errno })?;
        set_receive_buffer(&fd, config.receive_buffer)?;

        let mut this = Self {
            fd,
            group,
            seq: 0,
            buf: vec![0; RECV_BUFFER_LEN],
            pending: VecDeque::new(),
        };
        this.configure("bind the group", &[(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])])?;
        let mode = mode_attribute(config.copy_range);
        let timeout = hundredths(config.flush_timeout).to_be_bytes();
        let qthresh = config.queue_threshold.max(1).to_be_bytes();
        this.configure(
            "set the copy mode and batching",
            &[
                (NFULA_CFG_MODE, &mode),
                (NFULA_CFG_TIMEOUT, &timeout),
                (NFULA_CFG_QTHRESH, &qthresh),
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
    fn configure(&mut self, step: &'static str, attrs: &[(u16, &[u8])]) -> Result<(), NflogError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let group = self.group;
        let request = config_message(seq, group, attrs);
        sendto(
            self.fd.as_raw_fd(),
            &request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|errno| NflogError::SendConfig { step, group, errno })?;

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
            None => MsgFlags::MSG_DONTWAIT,
            Some(wait) => {
                setsockopt(&self.fd, sockopt::ReceiveTimeout, &timeval(wait))
                    .map_err(|errno| NflogError::SetTimeout { errno })?;
                MsgFlags::empty()
            }
        };
        loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let received = recvmsg::<NetlinkAddr>(self.fd.as_raw_fd(), &mut iov, None, flags)
                .map(|msg| (msg.bytes, msg.flags, msg.address.map(|addr| addr.pid())));
            match received {
                Ok((_, flags, _)) if flags.contains(MsgFlags::MSG_TRUNC) => {
                    self.pending.push_back(Err(ParseError::DatagramTruncated {
                        capacity: RECV_BUFFER_LEN,
                    }));
                    return Ok(Some(0));
                }
                // Only the kernel (port id 0) speaks for NFLOG; anything else is ignored.
                Ok((len, _, Some(0))) => return Ok(Some(len)),
                Ok(_) => return Ok(Some(0)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::ENOBUFS) => return Err(NflogError::Overrun { group: self.group }),
                Err(errno) => {
                    return Err(NflogError::Receive {
                        group: self.group,
                        errno,
                    });
                }
            }
        }
    }
}

impl AsFd for NflogSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn set_receive_buffer(fd: &OwnedFd, bytes: usize) -> Result<(), NflogError> {
    // SO_RCVBUFFORCE ignores net.core.rmem_max, which is often too small for bursts; it
    // needs CAP_NET_ADMIN, which binding an NFLOG group needs anyway. Fall back to the
    // capped option when it is refused.
    if setsockopt(fd, sockopt::RcvBufForce, &bytes).is_ok() {
        return Ok(());
    }
    setsockopt(fd, sockopt::RcvBuf, &bytes)
        .map_err(|errno| NflogError::ReceiveBuffer { bytes, errno })
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

/// `struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }`, packed.
fn mode_attribute(copy_range: u16) -> [u8; 6] {
    let range = u32::from(copy_range).to_be_bytes();
    [
        range[0],
        range[1],
        range[2],
        range[3],
        NFULNL_COPY_PACKET,
        0,
    ]
}

const fn nla_align(len: usize) -> usize {
    (len + 3) & !3
}

/// Build an `NFULNL_MSG_CONFIG` request for `group` carrying `attrs`, asking for an ack.
fn config_message(seq: u32, group: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&[0; 4]); // nlmsg_len, filled in below
    msg.extend_from_slice(&MSG_TYPE_CONFIG.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    // nfgenmsg: config applies to the group, not a family; res_id is big-endian.
    msg.push(libc::AF_UNSPEC as u8);
    msg.push(NFNETLINK_V0);
    msg.extend_from_slice(&group.to_be_bytes());
    for (attr_type, payload) in attrs {
        let len = NLA_HDRLEN + payload.len();
        // Attributes here are a few bytes; the cast cannot truncate.
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&attr_type.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg.resize(nla_align(msg.len()), 0);
    }
    let total = msg.len() as u32;
    msg[..4].copy_from_slice(&total.to_ne_bytes());
    msg
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

fn ne_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

/// Split a datagram into netlink messages and hand each to `sink`. A message that cannot be
/// parsed yields an error and the walk goes on; broken framing ends the walk, since the next
/// message can no longer be found.
fn parse_datagram(mut datagram: &[u8], mut sink: impl FnMut(Result<Message, ParseError>)) {
    while !datagram.is_empty() {
        let (Some(len), Some(msg_type), Some(seq)) = (
            ne_u32(datagram, 0),
            ne_u16(datagram, 4),
            ne_u32(datagram, 8),
        ) else {
            sink(Err(ParseError::MessageLength {
                claimed: NLMSG_HDRLEN,
                available: datagram.len(),
            }));
            return;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > datagram.len() {
            sink(Err(ParseError::MessageLength {
                claimed: len,
                available: datagram.len(),
            }));
            return;
        }
        let body = &datagram[NLMSG_HDRLEN..len];
        sink(parse_message(msg_type, seq, body));
        datagram = datagram.get(nla_align(len)..).unwrap_or_default();
    }
}

fn parse_message(msg_type: u16, seq: u32, body: &[u8]) -> Result<Message, ParseError> {
    match msg_type {
        MSG_TYPE_PACKET => parse_packet_message(body).map(Message::Packet),
        NLMSG_ERROR => {
            let error = body
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_ne_bytes)
                .ok_or(ParseError::MessageTooShort {
                    msg_type,
                    what: "error code",
                })?;
            Ok(Message::Ack {
                seq,
                errno: error.saturating_neg(),
            })
        }
        _ => Ok(Message::Other),
    }
}

/// Iterate over `(type, payload)` of the netlink attributes in `buf`.
fn attributes(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), ParseError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (Some(len), Some(attr_type)) = (ne_u16(rest, 0), ne_u16(rest, 2)) else {
            let err = ParseError::AttributeLength {
                attr_type: 0,
                claimed: NLA_HDRLEN,
                available: rest.len(),
            };
            rest = &[];
            return Some(Err(err));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > rest.len() {
            let err = ParseError::AttributeLength {
                attr_type,
                claimed: len,
                available: rest.len(),
            };
            rest = &[];
            return Some(Err(err));
        }
        let payload = &rest[NLA_HDRLEN..len];
        rest = rest.get(nla_align(len)..).unwrap_or_default();
        Some(Ok((attr_type & NLA_TYPE_MASK, payload)))
    })
}

/// Parse the body (after `nlmsghdr`) of an `NFULNL_MSG_PACKET` message.
fn parse_packet_message(body: &[u8]) -> Result<LoggedPacket, ParseError> {
    let family = *body.first().ok_or(ParseError::MessageTooShort {
        msg_type: MSG_TYPE_PACKET,
        what: "nfgenmsg",
    })?;
    let attrs = body
        .get(NFGENMSG_LEN..)
        .ok_or(ParseError::MessageTooShort {
            msg_type: MSG_TYPE_PACKET,
            what: "nfgenmsg",
        })?;
    let mut prefix = String::new();
    let mut hw_protocol = None;
    let mut payload = None;
    for attr in attributes(attrs) {
        let (attr_type, value) = attr?;
        match attr_type {
            NFULA_PREFIX => {
                // NUL-terminated; a prefix that is not UTF-8 is not one of ours, and the
                // lossy form still lets the caller classify it as unparseable.
                let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                prefix = String::from_utf8_lossy(&value[..end]).into_owned();
            }
            NFULA_PACKET_HDR => {
                let proto =
                    be16(value, 0).ok_or(ParseError::PacketHeaderLength { len: value.len() })?;
                hw_protocol = Some(proto);
            }
            NFULA_PAYLOAD => payload = Some(value),
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
    let headers = parse_ip(version, payload)?;
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

fn need<'a>(bytes: &'a [u8], len: usize, layer: &'static str) -> Result<&'a [u8], ParseError> {
    bytes.get(..len).ok_or(ParseError::Truncated {
        layer,
        needed: len,
        available: bytes.len(),
    })
}

/// Parse an IP packet that the kernel said is IPv`version`.
fn parse_ip(version: u8, packet: &[u8]) -> Result<IpHeaders, ParseError> {
    let first = need(packet, 1, if version == 4 { "IPv4" } else { "IPv6" })?[0];
    if first >> 4 != version {
        return Err(ParseError::VersionMismatch {
            expected: version,
            found: first >> 4,
        });
    }
    if version == 4 {
        parse_ipv4(packet)
    } else {
        parse_ipv6(packet)
    }
}

fn parse_ipv4(packet: &[u8]) -> Result<IpHeaders, ParseError> {
    let fixed = need(packet, 20, "IPv4")?;
    let ihl = fixed[0] & 0x0f;
    if ihl < 5 {
        return Err(ParseError::Ipv4HeaderLength { ihl });
    }
    let header_len = usize::from(ihl) * 4;
    need(packet, header_len, "IPv4")?;
    let protocol = fixed[9];
    let src = Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]);
    let dst = Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]);
    // Only the first fragment (offset 0) carries the L4 header.
    let fragment_offset = u16::from_be_bytes([fixed[6], fixed[7]]) & 0x1fff;
    let ports = if fragment_offset == 0 {
        ports(protocol, &packet[header_len..])?
    } else {
        None
    };
    Ok(IpHeaders {
        src: src.into(),
        dst: dst.into(),
        protocol,
        ports,
    })
}

fn parse_ipv6(packet: &[u8]) -> Result<IpHeaders, ParseError> {
    let fixed = need(packet, 40, "IPv6")?;
    let address = |at: usize| -> IpAddr {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&fixed[at..at + 16]);
        Ipv6Addr::from(octets).into()
    };
    let (src, dst) = (address(8), address(24));
    let mut next = fixed[6];
    let mut rest = &packet[40..];
    // Each extension header is at least 8 bytes, so the walk ends within the copied bytes.
    loop {
        let header_len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                (usize::from(need(rest, 2, "IPv6 extension")?[1]) + 1) * 8
            }
            IPPROTO_AH => (usize::from(need(rest, 2, "IPv6 authentication")?[1]) + 2) * 4,
            IPPROTO_FRAGMENT => {
                let fragment = need(rest, 8, "IPv6 fragment")?;
                let offset = u16::from_be_bytes([fragment[2], fragment[3]]) >> 3;
                if offset != 0 {
                    // A later fragment: the L4 header went out with the first one.
                    return Ok(IpHeaders {
                        src,
                        dst,
                        protocol: fragment[0],
                        ports: None,
                    });
                }
                8
            }
            _ => break,
        };
        let header = need(rest, header_len, "IPv6 extension")?;
        next = header[0];
        rest = &rest[header_len..];
    }
    Ok(IpHeaders {
        src,
        dst,
        protocol: next,
        ports: ports(next, rest)?,
    })
}

/// Source and destination port of protocols that start with them.
fn ports(protocol: u8, l4: &[u8]) -> Result<Option<(u16, u16)>, ParseError> {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE | IPPROTO_DCCP => {
            let header = need(l4, 4, "L4")?;
            Ok(Some((
                u16::from_be_bytes([header[0], header[1]]),
                u16::from_be_bytes([header[2], header[3]]),
            )))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        type Case = (&'static str, u8, Vec<u8>, Result<IpHeaders, ParseError>);
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
                Err(ParseError::Truncated {
                    layer: "L4",
                    needed: 4,
                    available: 3,
                }),
            ),
            (
                "ipv4 header cut off",
                4,
                ipv4(IPPROTO_UDP, 0, 0, &[])[..19].to_vec(),
                Err(ParseError::Truncated {
                    layer: "IPv4",
                    needed: 20,
                    available: 19,
                }),
            ),
            (
                "ipv4 options cut off",
                4,
                ipv4(IPPROTO_UDP, 2, 0, &[])[..24].to_vec(),
                Err(ParseError::Truncated {
                    layer: "IPv4",
                    needed: 28,
                    available: 24,
                }),
            ),
            (
                "ipv4 ihl below 5",
                4,
                {
                    let mut p = ipv4(IPPROTO_UDP, 0, 0, &L4);
                    p[0] = 0x44;
                    p
                },
                Err(ParseError::Ipv4HeaderLength { ihl: 4 }),
            ),
            (
                "ipv4 family but ipv6 bytes",
                4,
                ipv6(IPPROTO_UDP, &L4),
                Err(ParseError::VersionMismatch {
                    expected: 4,
                    found: 6,
                }),
            ),
            (
                "empty payload",
                4,
                vec![],
                Err(ParseError::Truncated {
                    layer: "IPv4",
                    needed: 1,
                    available: 0,
                }),
            ),
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
                Err(ParseError::Truncated {
                    layer: "IPv6",
                    needed: 40,
                    available: 39,
                }),
            ),
            (
                "ipv6 extension header longer than the capture",
                6,
                ipv6(IPPROTO_DSTOPTS, &[IPPROTO_UDP, 4, 0, 0, 0, 0, 0, 0]),
                Err(ParseError::Truncated {
                    layer: "IPv6 extension",
                    needed: 40,
                    available: 8,
                }),
            ),
            (
                "ipv6 extension header length byte missing",
                6,
                ipv6(IPPROTO_HOPOPTS, &[IPPROTO_UDP]),
                Err(ParseError::Truncated {
                    layer: "IPv6 extension",
                    needed: 2,
                    available: 1,
                }),
            ),
            (
                "ipv6 fragment header cut off",
                6,
                ipv6(IPPROTO_FRAGMENT, &first_fragment[..5]),
                Err(ParseError::Truncated {
                    layer: "IPv6 fragment",
                    needed: 8,
                    available: 5,
                }),
            ),
            (
                "ipv6 udp ports cut off after hop-by-hop",
                6,
                ipv6(IPPROTO_HOPOPTS, &concat(&[&hop_by_hop, &L4[..2]])),
                Err(ParseError::Truncated {
                    layer: "L4",
                    needed: 4,
                    available: 2,
                }),
            ),
            (
                "ipv6 family but ipv4 bytes",
                6,
                ipv4(IPPROTO_UDP, 0, 0, &L4),
                Err(ParseError::VersionMismatch {
                    expected: 6,
                    found: 4,
                }),
            ),
        ];
        for (name, version, bytes, want) in cases {
            assert_eq!(parse_ip(version, &bytes), want, "case {name:?}");
        }
    }

    /// Append a netlink attribute, padded to 4 bytes.
    fn attr(out: &mut Vec<u8>, attr_type: u16, payload: &[u8]) {
        out.extend_from_slice(&((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&attr_type.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(nla_align(out.len()), 0);
    }

    /// A netlink message with the given type, seq and body.
    fn nlmsg(msg_type: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&msg_type.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(nla_align(m.len()), 0);
        m
    }

    /// The body of a packet message the way the kernel lays it out.
    fn packet_body(
        family: u8,
        hw_protocol: u16,
        prefix: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut b = vec![family, NFNETLINK_V0, 0, 100];
        let mut hdr = hw_protocol.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[3, 0]); // hook: NF_INET_LOCAL_OUT
        attr(&mut b, NFULA_PACKET_HDR, &hdr);
        attr(&mut b, libc::NFULA_MARK as u16, &0u32.to_be_bytes());
        attr(
            &mut b,
            libc::NFULA_IFINDEX_OUTDEV as u16,
            &2u32.to_be_bytes(),
        );
        if let Some(prefix) = prefix {
            let mut p = prefix.to_vec();
            p.push(0);
            attr(&mut b, NFULA_PREFIX, &p);
        }
        if let Some(payload) = payload {
            attr(&mut b, NFULA_PAYLOAD, payload);
        }
        b
    }

    fn packet(prefix: &str, h: IpHeaders) -> LoggedPacket {
        LoggedPacket {
            prefix: prefix.to_string(),
            src: h.src,
            dst: h.dst,
            protocol: h.protocol,
            src_port: h.ports.map(|p| p.0),
            dst_port: h.ports.map(|p| p.1),
        }
    }

    #[test]
    fn parse_packet_message_cases() {
        let v4 = ipv4(IPPROTO_UDP, 0, 0, &L4);
        let v6 = ipv6(IPPROTO_TCP, &L4);
        let udp4 = v4_headers(IPPROTO_UDP, Some((40001, 5001)));
        let tcp6 = v6_headers(IPPROTO_TCP, Some((40001, 5001)));
        let bridge = libc::NFPROTO_BRIDGE as u8;
        let cases: Vec<(&str, Vec<u8>, Result<LoggedPacket, ParseError>)> = vec![
            (
                "ipv4 with prefix",
                packet_body(AF_INET, ETH_P_IP, Some(&b"knp:ingress:a/b"[..]), Some(&v4)),
                Ok(packet("knp:ingress:a/b", udp4)),
            ),
            (
                "ipv6 with prefix",
                packet_body(
                    AF_INET6,
                    ETH_P_IPV6,
                    Some(&b"knp:egress:a/b"[..]),
                    Some(&v6),
                ),
                Ok(packet("knp:egress:a/b", tcp6)),
            ),
            (
                "no prefix attribute gives an empty prefix",
                packet_body(AF_INET, ETH_P_IP, None, Some(&v4)),
                Ok(packet("", udp4)),
            ),
            (
                "bridge family falls back to the ethertype",
                packet_body(bridge, ETH_P_IPV6, Some(&b"x"[..]), Some(&v6)),
                Ok(packet("x", tcp6)),
            ),
            (
                "non-utf8 prefix is kept lossily",
                packet_body(AF_INET, ETH_P_IP, Some(&b"k\xff"[..]), Some(&v4)),
                Ok(packet("k\u{fffd}", udp4)),
            ),
            (
                "missing payload",
                packet_body(AF_INET, ETH_P_IP, Some(&b"x"[..]), None),
                Err(ParseError::MissingPayload),
            ),
            (
                "unknown family and ethertype",
                packet_body(bridge, 0x0806, Some(&b"x"[..]), Some(&v4)),
                Err(ParseError::UnknownFamily {
                    family: bridge,
                    hw_protocol: Some(0x0806),
                }),
            ),
            (
                "payload of the wrong version",
                packet_body(AF_INET6, ETH_P_IPV6, None, Some(&v4)),
                Err(ParseError::VersionMismatch {
                    expected: 6,
                    found: 4,
                }),
            ),
            (
                "short nfgenmsg",
                vec![AF_INET, 0],
                Err(ParseError::MessageTooShort {
                    msg_type: MSG_TYPE_PACKET,
                    what: "nfgenmsg",
                }),
            ),
            (
                "empty body",
                vec![],
                Err(ParseError::MessageTooShort {
                    msg_type: MSG_TYPE_PACKET,
                    what: "nfgenmsg",
                }),
            ),
            (
                "attribute longer than the message",
                {
                    let mut b = packet_body(AF_INET, ETH_P_IP, None, Some(&v4));
                    b.extend_from_slice(&200u16.to_ne_bytes());
                    b.extend_from_slice(&NFULA_PREFIX.to_ne_bytes());
                    b
                },
                Err(ParseError::AttributeLength {
                    attr_type: NFULA_PREFIX,
                    claimed: 200,
                    available: 4,
                }),
            ),
            (
                "attribute length below its header",
                {
                    let mut b = vec![AF_INET, 0, 0, 100];
                    b.extend_from_slice(&2u16.to_ne_bytes());
                    b.extend_from_slice(&NFULA_PAYLOAD.to_ne_bytes());
                    b
                },
                Err(ParseError::AttributeLength {
                    attr_type: NFULA_PAYLOAD,
                    claimed: 2,
                    available: 4,
                }),
            ),
            (
                "dangling half attribute header",
                {
                    let mut b = packet_body(AF_INET, ETH_P_IP, None, Some(&v4));
                    b.extend_from_slice(&[8, 0]);
                    b
                },
                Err(ParseError::AttributeLength {
                    attr_type: 0,
                    claimed: 4,
                    available: 2,
                }),
            ),
            (
                "packet header attribute too short",
                {
                    let mut b = vec![AF_INET, 0, 0, 100];
                    attr(&mut b, NFULA_PACKET_HDR, &[8]);
                    b
                },
                Err(ParseError::PacketHeaderLength { len: 1 }),
            ),
        ];
        for (name, body, want) in cases {
            assert_eq!(parse_packet_message(&body), want, "case {name:?}");
        }
    }

    fn collect(datagram: &[u8]) -> Vec<Result<Message, ParseError>> {
        let mut out = Vec::new();
        parse_datagram(datagram, |m| out.push(m));
        out
    }

    #[test]
    fn parse_datagram_cases() {
        let v4 = ipv4(IPPROTO_UDP, 0, 0, &L4);
        let one = nlmsg(
            MSG_TYPE_PACKET,
            0,
            &packet_body(AF_INET, ETH_P_IP, Some(&b"p"[..]), Some(&v4)),
        );
        let udp4 = packet("p", v4_headers(IPPROTO_UDP, Some((40001, 5001))));
        let done = nlmsg(libc::NLMSG_DONE as u16, 0, &0i32.to_ne_bytes());
        let ack = nlmsg(NLMSG_ERROR, 7, &concat(&[&0i32.to_ne_bytes(), &[0; 16]]));
        let ebusy = nlmsg(NLMSG_ERROR, 8, &(-libc::EBUSY).to_ne_bytes());
        let bad_payload = nlmsg(
            MSG_TYPE_PACKET,
            0,
            &packet_body(AF_INET, ETH_P_IP, Some(&b"p"[..]), Some(&v4[..10])),
        );
        type Case = (&'static str, Vec<u8>, Vec<Result<Message, ParseError>>);
        let cases: Vec<Case> = vec![
            ("empty datagram", vec![], vec![]),
            (
                "one packet",
                one.clone(),
                vec![Ok(Message::Packet(udp4.clone()))],
            ),
            (
                "batch of three with NLMSG_DONE trailer",
                concat(&[&one, &one, &one, &done]),
                vec![
                    Ok(Message::Packet(udp4.clone())),
                    Ok(Message::Packet(udp4.clone())),
                    Ok(Message::Packet(udp4.clone())),
                    Ok(Message::Other),
                ],
            ),
            ("ack", ack, vec![Ok(Message::Ack { seq: 7, errno: 0 })]),
            (
                "error",
                ebusy,
                vec![Ok(Message::Ack {
                    seq: 8,
                    errno: libc::EBUSY,
                })],
            ),
            (
                "a bad packet does not hide the next one",
                concat(&[&bad_payload, &one]),
                vec![
                    Err(ParseError::Truncated {
                        layer: "IPv4",
                        needed: 20,
                        available: 10,
                    }),
                    Ok(Message::Packet(udp4.clone())),
                ],
            ),
            (
                "error message without its code",
                nlmsg(NLMSG_ERROR, 1, &[0, 0]),
                vec![Err(ParseError::MessageTooShort {
                    msg_type: NLMSG_ERROR,
                    what: "error code",
                })],
            ),
            (
                "message longer than the datagram",
                one[..one.len() - 4].to_vec(),
                vec![Err(ParseError::MessageLength {
                    claimed: one.len(),
                    available: one.len() - 4,
                })],
            ),
            (
                "message length below the header",
                {
                    let mut m = one.clone();
                    m[..4].copy_from_slice(&8u32.to_ne_bytes());
                    m
                },
                vec![Err(ParseError::MessageLength {
                    claimed: 8,
                    available: one.len(),
                })],
            ),
            (
                "trailing garbage shorter than a header",
                concat(&[&one, &[1, 2, 3]]),
                vec![
                    Ok(Message::Packet(udp4.clone())),
                    Err(ParseError::MessageLength {
                        claimed: NLMSG_HDRLEN,
                        available: 3,
                    }),
                ],
            ),
        ];
        for (name, datagram, want) in cases {
            assert_eq!(collect(&datagram), want, "case {name:?}");
        }
    }

    /// Random bytes, and every truncation and single-byte corruption of a valid batch, must
    /// parse to values or errors, never panic.
    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = collect(&bytes);
            let _ = parse_packet_message(&bytes);
            let _ = parse_ip(4, &bytes);
            let _ = parse_ip(6, &bytes);
        }
        let v6 = ipv6(
            IPPROTO_HOPOPTS,
            &concat(&[&[IPPROTO_UDP, 0, 1, 4, 0, 0, 0, 0], &L4]),
        );
        let valid = concat(&[
            &nlmsg(
                MSG_TYPE_PACKET,
                0,
                &packet_body(AF_INET6, ETH_P_IPV6, Some(&b"knp"[..]), Some(&v6)),
            ),
            &nlmsg(
                MSG_TYPE_PACKET,
                0,
                &packet_body(AF_INET, ETH_P_IP, None, Some(&ipv4(6, 1, 0, &L4))),
            ),
        ]);
        for cut in 0..valid.len() {
            let _ = collect(&valid[..cut]);
        }
        for at in 0..valid.len() {
            for value in [0u8, 1, 3, 4, 0x7f, 0x80, 0xff] {
                let mut corrupt = valid.clone();
                corrupt[at] = value;
                let _ = collect(&corrupt);
            }
        }
    }

    #[test]
    fn config_message_layout() {
        let msg = config_message(9, 100, &[(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])]);
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x0401u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 100]); // AF_UNSPEC, v0, group 100 big-endian
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]); // BIND, padded
        assert_eq!(msg, want);

        let mode = mode_attribute(96);
        assert_eq!(mode, [0, 0, 0, 96, 2, 0]);
        let msg = config_message(1, 0x1234, &[(NFULA_CFG_MODE, &mode)]);
        assert_eq!(msg.len(), 16 + 4 + 12);
        assert_eq!(&msg[18..20], &[0x12, 0x34]);
        assert_eq!(&msg[20..22], &10u16.to_ne_bytes());
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
