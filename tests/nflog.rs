//! The denied-connection log path against the real kernel: drop rules with `log … group 100`
//! in a throwaway network namespace, real UDP and TCP packets, and the agent's
//! [`NflogSocket`] and [`DenyLogger`] reading them.
//!
//! Unit tests cover the parsing on hand-built bytes; only the kernel can show that the
//! config handshake is accepted, that batches arrive as we parse them, and that a
//! full-length prefix survives nft and the kernel intact.
//!
//! Each test creates its own namespace (`knpnflog<pid><tag>`) and does everything inside it:
//! links via `ip -n`, rules via `ip netns exec`, sockets from a thread that `setns`ed into it.
//! Nothing is added to the host namespace, and a drop guard deletes the namespace even when
//! an assertion fails. Needs root; skipped otherwise.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube_nftpolicy::agent::denylog::{DenyLogConfig, DenyLogger, Verdict};
use kube_nftpolicy::engine::log_prefix::{DenyDirection, encode_prefix, parse_prefix};
use kube_nftpolicy::kernel::nflog::{LoggedPacket, NflogSocket};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};

const GROUP: u16 = 100;
const UDP_PORT: u16 = 5001;
const TCP_PORT: u16 = 5002;
const LONG_PREFIX_PORT: u16 = 5003;
const UDP_SRC_PORT: u16 = 40001;
const TCP_SRC_PORT: u16 = 40002;
const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
/// Upper bound for any wait on the kernel; the happy path takes milliseconds.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

/// A network namespace that exists for the lifetime of the value.
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("knpnflog{}{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn nft(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawning nft");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(script.as_bytes())
            .expect("writing the nft script");
        let status = child.wait().expect("waiting for nft");
        assert!(status.success(), "nft -f failed ({status}) on:\n{script}");
    }

    /// Run `f` on a thread that has entered this namespace; panics propagate.
    fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(ns, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
                f()
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes its links and nft tables with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ingress_prefix() -> String {
    encode_prefix(DenyDirection::Ingress, "nflogtest", "server-0")
}

/// The longest prefix the encoder makes: maximum-length namespace and pod names.
fn long_names() -> (String, String) {
    ("n".repeat(63), "p".repeat(253))
}

fn long_prefix() -> String {
    let (namespace, pod) = long_names();
    encode_prefix(DenyDirection::Egress, &namespace, &pod)
}

/// A namespace with `veth0` (10.77.0.1/24, fd77::1/64) whose peer is never answered, and
/// output rules that log to NFLOG group 100 and drop UDP and TCP to the test ports.
fn setup(tag: &str) -> Netns {
    let ns = Netns::create(tag);
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "veth0"]);
    ns.ip(&["addr", "add", "fd77::1/64", "dev", "veth0", "nodad"]);
    ns.ip(&["link", "set", "veth0", "up"]);
    ns.ip(&["link", "set", "veth1", "up"]);
    let prefix = ingress_prefix();
    let long = long_prefix();
    ns.nft(&format!(
        "table inet nflogtest {{
            chain out {{
                type filter hook output priority 0; policy accept;
                udp dport {UDP_PORT} log prefix \"{prefix}\" group {GROUP} counter drop
                tcp dport {TCP_PORT} log prefix \"{prefix}\" group {GROUP} counter drop
                udp dport {LONG_PREFIX_PORT} log prefix \"{long}\" group {GROUP} counter drop
            }}
        }}\n"
    ));
    ns
}

fn send_udp(from: SocketAddr, to: SocketAddr, count: usize) {
    let socket = UdpSocket::bind(from).expect("binding the UDP sender");
    for _ in 0..count {
        // The drop rule makes each send fail with EPERM; the packet was logged regardless.
        let _ = socket.send_to(b"denied?", to);
    }
}

/// Start a TCP connect from a fixed port without waiting for it; the returned socket keeps
/// the attempt alive until dropped.
fn start_tcp_connect(from: SocketAddr, to: SocketAddr) -> OwnedFd {
    let family = match from {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None)
        .expect("creating the TCP socket");
    bind(fd.as_raw_fd(), &SockaddrStorage::from(from)).expect("binding the TCP socket");
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
        Err(Errno::EINPROGRESS | Errno::EPERM) => {}
        other => panic!("connect to a dropped port should not complete: {other:?}"),
    }
    fd
}

/// Receive until `done` holds for what arrived, with a timeout on every wait.
fn receive_until(
    socket: &mut NflogSocket,
    done: impl Fn(&[LoggedPacket]) -> bool,
) -> Vec<LoggedPacket> {
    let deadline = Instant::now() + RECEIVE_DEADLINE;
    let mut packets = Vec::new();
    while !done(&packets) {
        assert!(
            Instant::now() < deadline,
            "timed out after {} packets: {:?}",
            packets.len(),
            packets.last()
        );
        match socket.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(packet)) => packets.push(packet),
            Ok(None) => {}
            Err(e) => panic!("receiving from NFLOG: {e}"),
        }
    }
    packets
}

fn count(packets: &[LoggedPacket], protocol: u8) -> usize {
    packets.iter().filter(|p| p.protocol == protocol).count()
}

fn expected(src: SocketAddr, dst: SocketAddr, protocol: u8) -> LoggedPacket {
    LoggedPacket {
        prefix: ingress_prefix(),
        src: src.ip(),
        dst: dst.ip(),
        protocol,
        src_port: Some(src.port()),
        dst_port: Some(dst.port()),
    }
}

/// Send `udp_packets` UDP packets of one flow and start two TCP connects to the same port,
/// then check every logged packet and that the deny logger makes one line per flow.
fn check_udp_and_tcp(tag: &str, local: IpAddr, peer: IpAddr, udp_packets: usize) {
    if !is_root() {
        eprintln!("skipping: needs root for network namespaces and nftables");
        return;
    }
    let ns = setup(tag);
    let udp_from = SocketAddr::new(local, UDP_SRC_PORT);
    let udp_to = SocketAddr::new(peer, UDP_PORT);
    let tcp_from = SocketAddr::new(local, TCP_SRC_PORT);
    let tcp_to = SocketAddr::new(peer, TCP_PORT);

    let packets = ns.inside(|| {
        let mut nflog = NflogSocket::open(GROUP).expect("binding NFLOG group 100");
        send_udp(udp_from, udp_to, udp_packets);
        let _pending = start_tcp_connect(tcp_from, tcp_to);
        // A second attempt from another port, the way a client retries: same flow.
        let retry = TcpStream::connect_timeout(&tcp_to, Duration::from_millis(200));
        assert!(retry.is_err(), "connect to a dropped port succeeded");
        receive_until(&mut nflog, |got| {
            count(got, 17) >= udp_packets && count(got, 6) >= 2
        })
    });

    let udp = expected(udp_from, udp_to, 17);
    let tcp = expected(tcp_from, tcp_to, 6);
    assert_eq!(count(&packets, 17), udp_packets);
    assert!(
        packets
            .iter()
            .filter(|p| p.protocol == 17)
            .all(|p| *p == udp)
    );
    assert!(
        packets.contains(&tcp),
        "no SYN from {tcp_from} in {packets:?}"
    );
    for p in packets.iter().filter(|p| p.protocol == 6) {
        // The retry's source port is the kernel's choice; everything else is fixed.
        let with_fixed_port = LoggedPacket {
            src_port: Some(TCP_SRC_PORT),
            ..p.clone()
        };
        assert_eq!(with_fixed_port, tcp);
    }
    assert_eq!(count(&packets, 17) + count(&packets, 6), packets.len());

    let client = local;
    let resolve = move |ip: IpAddr| (ip == client).then(|| "nflogtest/client".to_string());
    let mut logger = DenyLogger::new(DenyLogConfig {
        dedup_window: Duration::from_secs(60),
        rate_per_sec: 100,
        burst: 100,
        max_flows: 1024,
    });
    let lines: Vec<_> = packets
        .iter()
        .filter_map(|p| match logger.observe(Instant::now(), p, &resolve) {
            Verdict::Log(line) => Some(line),
            Verdict::Suppressed(_) => None,
        })
        .collect();
    let summary: Vec<_> = lines
        .iter()
        .map(|l| (l.protocol, l.dst_port, l.src.as_str(), l.dst.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("UDP", Some(UDP_PORT), "nflogtest/client", "external"),
            ("TCP", Some(TCP_PORT), "nflogtest/client", "external"),
        ]
    );
    for line in &lines {
        assert_eq!(line.direction, DenyDirection::Ingress);
        assert_eq!(
            (line.namespace.as_str(), line.pod.as_str()),
            ("nflogtest", "server-0")
        );
        assert_eq!((line.src_ip, line.dst_ip), (local, peer));
    }
}

#[test]
fn ipv4_udp_flood_and_tcp_connects_log_one_line_per_flow() {
    check_udp_and_tcp("v4", LOCAL_V4.into(), PEER_V4.into(), 1000);
}

#[test]
fn ipv6_udp_and_tcp_log_one_line_per_flow() {
    check_udp_and_tcp("v6", LOCAL_V6.into(), PEER_V6.into(), 20);
}

#[test]
fn longest_prefix_survives_nft_and_the_kernel() {
    if !is_root() {
        eprintln!("skipping: needs root for network namespaces and nftables");
        return;
    }
    let prefix = long_prefix();
    assert_eq!(prefix.len(), 127);
    let ns = setup("long");
    let from = SocketAddr::new(LOCAL_V4.into(), UDP_SRC_PORT);
    let to = SocketAddr::new(PEER_V4.into(), LONG_PREFIX_PORT);
    let packets = ns.inside(|| {
        let mut nflog = NflogSocket::open(GROUP).expect("binding NFLOG group 100");
        send_udp(from, to, 1);
        receive_until(&mut nflog, |got| !got.is_empty())
    });
    assert_eq!(
        packets,
        vec![LoggedPacket {
            prefix: prefix.clone(),
            ..expected(from, to, 17)
        }]
    );
    let target = parse_prefix(&packets[0].prefix).expect("parsing the received prefix");
    let (namespace, pod) = long_names();
    assert_eq!(target.direction, DenyDirection::Egress);
    assert!(target.is_abbreviated());
    assert!(target.refers_to(&namespace, &pod));
}

#[test]
fn idle_socket_times_out_and_a_bound_group_is_exclusive() {
    if !is_root() {
        eprintln!("skipping: needs root for network namespaces and nftables");
        return;
    }
    let ns = Netns::create("idle");
    ns.inside(|| {
        let mut nflog = NflogSocket::open(GROUP).expect("binding NFLOG group 100");
        assert_eq!(nflog.group(), GROUP);

        let start = Instant::now();
        let got = nflog
            .recv_timeout(Duration::from_millis(150))
            .expect("receiving from an idle group");
        let waited = start.elapsed();
        assert_eq!(got, None);
        assert!(
            waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
            "waited {waited:?}"
        );
        let got = nflog
            .recv_timeout(Duration::ZERO)
            .expect("polling an idle group");
        assert_eq!(got, None);

        // The kernel hands a group to one socket per namespace and refuses others with EPERM.
        let err = NflogSocket::open(GROUP).expect_err("a second bind of the same group");
        assert!(
            matches!(
                err,
                kube_nftpolicy::kernel::nflog::NflogError::ConfigRejected {
                    errno: Errno::EPERM,
                    ..
                }
            ),
            "{err}"
        );
        // Once the owner closes, the group is free again.
        drop(nflog);
        NflogSocket::open(GROUP).expect("binding the group after its owner closed");
    });
}
