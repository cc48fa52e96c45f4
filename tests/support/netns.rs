#![allow(dead_code)]
//! Test harness: a small Kubernetes-like "cluster" made of Linux network namespaces.
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "support/netns.rs"]
//! mod netns;
//! ```
//!
//! Topology (every veth is created *inside* a namespace; the host namespace is never touched):
//!
//! ```text
//!                       fabric ns: bridge br0 (172.18.0.0/24, fd00:172:18::/64)
//!            ┌──────────────┬──────────────┬─────────────────┐
//!        node ns (fab0)  node ns (fab0)   ...     external ns (fab0 = 172.18.0.100,
//!        172.18.0.11     172.18.0.12                fd00:172:18::100; extra addresses on lo)
//!          │  routed: vpN (proxy_arp, fe80::1, ee:ee:ee:ee:ee:ee) ─ eth0 in pod ns (/32, /128)
//!          │  bridge: cni0 (10.244.N.1/24) ─ vpN ─ eth0 in pod ns (/24, /64)
//! ```
//!
//! Servers run as threads of the test process (one per namespace, `setns` + wildcard binds) and
//! stop when the [`Cluster`] is dropped. Probes run one thread each, in parallel, with a timeout.
//! Requires root (CAP_SYS_ADMIN + CAP_NET_ADMIN), `ip` (iproute2) and, for `exec`, whatever
//! binary you run (e.g. `nft`).

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

// ───────────────────────────── constants ─────────────────────────────

/// Default per-probe timeout.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Port every node namespace serves by default (kubelet-like).
pub const KUBELET_PORT: u16 = 10250;
/// Prefix length of node addresses on the fabric.
pub const FABRIC_V4_PREFIX: u8 = 24;
pub const FABRIC_V6_PREFIX: u8 = 64;
/// The external namespace's own fabric addresses (always present).
pub const EXTERNAL_FABRIC_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
pub const EXTERNAL_FABRIC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 0x100);
/// Routed layout: the pods' default gateways (Calico convention).
pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const ROUTED_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Routed layout: MAC address of every node-side pod veth (Calico convention).
pub const ROUTED_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// Interface names (they are namespace-local, so they can repeat across namespaces).
pub const NODE_FABRIC_IF: &str = "fab0";
pub const NODE_BRIDGE_IF: &str = "cni0";
pub const POD_IF: &str = "eth0";
pub const EXTERNAL_FABRIC_IF: &str = "fab0";
const FABRIC_BRIDGE_IF: &str = "br0";
/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";
/// Every namespace this harness creates is named `knp<pid>s<starttime>x<counter>-<role>`.
const NAME_PREFIX: &str = "knp";

const SERVER_STACK: usize = 256 * 1024;
const PROBE_STACK: usize = 128 * 1024;
const UDP_RESEND: Duration = Duration::from_millis(200);
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_REPLY: &[u8] = b"k";

// ───────────────────────────── spec ─────────────────────────────

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Calico-like: pods are /32 + /128 behind a point-to-point veth, node routes each pod IP.
    Routed,
    /// flannel/kindnet-like: pods sit on bridge `cni0`, which holds the CIDR's first address.
    Bridge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub layout: Layout,
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    /// Extra addresses held by the external namespace (on its `lo`), routed by every node.
    /// The external namespace always also has [`EXTERNAL_FABRIC_V4`] / [`EXTERNAL_FABRIC_V6`].
    pub externals: Vec<IpAddr>,
    /// Ports served by the external namespace (on all its addresses, both families).
    pub external_tcp_ports: Vec<u16>,
    pub external_udp_ports: Vec<u16>,
    /// Ports served by every node namespace (default: TCP [`KUBELET_PORT`]).
    pub node_tcp_ports: Vec<u16>,
    pub node_udp_ports: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr_v4: (Ipv4Addr, u8),
    pub pod_cidr_v6: (Ipv6Addr, u8),
}

#[derive(Debug, Clone)]
pub struct PodSpec {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

/// Reads a decimal number's digits as hex, so that node 1 gets `.11` and `::11`.
fn hex_digits(v: u32) -> u16 {
    u16::from_str_radix(&v.to_string(), 16).expect("decimal digits are hex digits")
}

impl NodeSpec {
    /// Node number `n` (1..=89): 172.18.0.(10+n)/24, fd00:172:18::(10+n)/64,
    /// pod CIDRs 10.244.n.0/24 and fd00:10:244:n::/64.
    pub fn numbered(name: &str, n: u8) -> NodeSpec {
        assert!((1..=89).contains(&n), "node number {n} out of range 1..=89");
        let host = 10 + u32::from(n);
        NodeSpec {
            name: name.to_string(),
            ipv4: Ipv4Addr::new(172, 18, 0, host as u8),
            ipv6: Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, hex_digits(host)),
            pod_cidr_v4: (Ipv4Addr::new(10, 244, n, 0), 24),
            pod_cidr_v6: (
                Ipv6Addr::new(0xfd00, 0x10, 0x244, hex_digits(u32::from(n)), 0, 0, 0, 0),
                64,
            ),
        }
    }

    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }

    /// First address of the pod CIDR (the `cni0` address in the bridge layout).
    pub fn pod_gateway(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => Ipv4Addr::from(u32::from(self.pod_cidr_v4.0) + 1).into(),
            Family::V6 => Ipv6Addr::from(u128::from(self.pod_cidr_v6.0) + 1).into(),
        }
    }

    pub fn pod_cidr(&self, family: Family) -> (IpAddr, u8) {
        match family {
            Family::V4 => (self.pod_cidr_v4.0.into(), self.pod_cidr_v4.1),
            Family::V6 => (self.pod_cidr_v6.0.into(), self.pod_cidr_v6.1),
        }
    }

    pub fn pod_cidr_contains(&self, ip: &IpAddr) -> bool {
        let (net, len) = self.pod_cidr(Family::of(ip));
        cidr_contains(&net, len, ip)
    }
}

impl PodSpec {
    pub fn new(node: &str, namespace: &str, name: &str, ips: Vec<IpAddr>) -> PodSpec {
        PodSpec {
            node: node.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            ips,
            tcp_ports: Vec::new(),
            udp_ports: Vec::new(),
        }
    }

    pub fn tcp(mut self, ports: &[u16]) -> PodSpec {
        self.tcp_ports = ports.to_vec();
        self
    }

    pub fn udp(mut self, ports: &[u16]) -> PodSpec {
        self.udp_ports = ports.to_vec();
        self
    }

    pub fn ip(&self, family: Family) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| Family::of(ip) == family)
    }
}

impl ClusterSpec {
    /// Empty spec; nodes serve TCP [`KUBELET_PORT`].
    pub fn new(layout: Layout) -> ClusterSpec {
        ClusterSpec {
            layout,
            nodes: Vec::new(),
            pods: Vec::new(),
            externals: Vec::new(),
            external_tcp_ports: Vec::new(),
            external_udp_ports: Vec::new(),
            node_tcp_ports: vec![KUBELET_PORT],
            node_udp_ports: Vec::new(),
        }
    }

    /// Adds a node numbered after the existing ones (see [`NodeSpec::numbered`]).
    pub fn node(mut self, name: &str) -> ClusterSpec {
        let n = u8::try_from(self.nodes.len() + 1).expect("too many nodes");
        self.nodes.push(NodeSpec::numbered(name, n));
        self
    }

    /// Adds a dual-stack pod on `node` with the next free addresses of the node's pod CIDRs
    /// (`.2`, `.3`, … and `::2`, `::3`, …).
    pub fn pod(
        mut self,
        node: &str,
        namespace: &str,
        name: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> ClusterSpec {
        let spec = self
            .nodes
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("pod {namespace}/{name}: unknown node {node}"))
            .clone();
        let k = self.pods.iter().filter(|p| p.node == node).count() as u32 + 2;
        assert!(k < 255, "too many pods on node {node}");
        let v4 = Ipv4Addr::from(u32::from(spec.pod_cidr_v4.0) + k);
        let v6 = Ipv6Addr::from(u128::from(spec.pod_cidr_v6.0) + u128::from(hex_digits(k)));
        self.pods.push(
            PodSpec::new(node, namespace, name, vec![v4.into(), v6.into()])
                .tcp(tcp_ports)
                .udp(udp_ports),
        );
        self
    }

    pub fn external(mut self, ip: impl Into<IpAddr>) -> ClusterSpec {
        self.externals.push(ip.into());
        self
    }

    pub fn external_ports(mut self, tcp: &[u16], udp: &[u16]) -> ClusterSpec {
        self.external_tcp_ports = tcp.to_vec();
        self.external_udp_ports = udp.to_vec();
        self
    }

    /// `nodes` nodes named `node-a`, `node-b`, … each with `pods_per_node` pods named
    /// `<letter><k>` (a1, a2, b1, …) in namespace `default`, all serving the given ports.
    pub fn grid(
        layout: Layout,
        nodes: usize,
        pods_per_node: usize,
        tcp: &[u16],
        udp: &[u16],
    ) -> ClusterSpec {
        assert!(nodes <= 26, "at most 26 nodes in a grid");
        let mut spec = ClusterSpec::new(layout);
        for n in 0..nodes {
            let letter = (b'a' + n as u8) as char;
            spec = spec.node(&format!("node-{letter}"));
            for k in 1..=pods_per_node {
                spec = spec.pod(
                    &format!("node-{letter}"),
                    "default",
                    &format!("{letter}{k}"),
                    tcp,
                    udp,
                );
            }
        }
        spec
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = HashMap::new();
        let mut ips: HashMap<IpAddr, String> = HashMap::new();
        let mut claim = |ip: IpAddr, who: String| match ips.insert(ip, who.clone()) {
            Some(prev) => Err(format!("address {ip} used by both {prev} and {who}")),
            None => Ok(()),
        };
        claim(EXTERNAL_FABRIC_V4.into(), "external".into())?;
        claim(EXTERNAL_FABRIC_V6.into(), "external".into())?;
        for n in &self.nodes {
            if n.name.is_empty() || names.insert(n.name.clone(), ()).is_some() {
                return Err(format!("node name {:?} empty or duplicated", n.name));
            }
            let fab4: IpAddr = EXTERNAL_FABRIC_V4.into();
            let fab6: IpAddr = EXTERNAL_FABRIC_V6.into();
            if !cidr_contains(&fab4, FABRIC_V4_PREFIX, &n.ipv4.into())
                || !cidr_contains(&fab6, FABRIC_V6_PREFIX, &n.ipv6.into())
            {
                return Err(format!("node {} addresses must be on the fabric", n.name));
            }
            claim(n.ipv4.into(), format!("node {}", n.name))?;
            claim(n.ipv6.into(), format!("node {}", n.name))?;
            if self.layout == Layout::Bridge {
                for f in Family::BOTH {
                    claim(n.pod_gateway(f), format!("node {} cni0", n.name))?;
                }
            }
        }
        let mut pods = HashMap::new();
        for p in &self.pods {
            let who = format!("pod {}/{}", p.namespace, p.name);
            if pods
                .insert((p.namespace.clone(), p.name.clone()), ())
                .is_some()
            {
                return Err(format!("{who} duplicated"));
            }
            let node = self
                .nodes
                .iter()
                .find(|n| n.name == p.node)
                .ok_or_else(|| format!("{who}: unknown node {}", p.node))?;
            if p.ips.is_empty() {
                return Err(format!("{who} has no addresses"));
            }
            for ip in &p.ips {
                if !node.pod_cidr_contains(ip) {
                    return Err(format!("{who}: {ip} outside node {} pod CIDR", node.name));
                }
                claim(*ip, who.clone())?;
            }
        }
        for ip in &self.externals {
            claim(*ip, "external".into())?;
        }
        Ok(())
    }
}

// ───────────────────────────── endpoints & probes ─────────────────────────────

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Node(String),
    External,
}

impl Endpoint {
    pub fn pod(namespace: &str, name: &str) -> Endpoint {
        Endpoint::Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn node(name: &str) -> Endpoint {
        Endpoint::Node(name.to_string())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod { namespace, name } => write!(f, "pod {namespace}/{name}"),
            Endpoint::Node(n) => write!(f, "node {n}"),
            Endpoint::External => f.write_str("external"),
        }
    }
}

/// Anything that names a namespace of the cluster: an [`Endpoint`], or a string that is a node
/// name, or `"<namespace>/<pod>"` for a pod.
pub trait AsEndpoint {
    fn to_endpoint(&self) -> Endpoint;
}

impl AsEndpoint for Endpoint {
    fn to_endpoint(&self) -> Endpoint {
        self.clone()
    }
}

impl AsEndpoint for str {
    fn to_endpoint(&self) -> Endpoint {
        match self.split_once('/') {
            Some((ns, name)) => Endpoint::pod(ns, name),
            None => Endpoint::Node(self.to_string()),
        }
    }
}

impl AsEndpoint for String {
    fn to_endpoint(&self) -> Endpoint {
        self.as_str().to_endpoint()
    }
}

impl<T: AsEndpoint + ?Sized> AsEndpoint for &T {
    fn to_endpoint(&self) -> Endpoint {
        (**self).to_endpoint()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probe {
    pub from: Endpoint,
    pub to: IpAddr,
    pub port: u16,
    pub protocol: Proto,
    /// Bind this source address (must exist in the source namespace).
    pub src: Option<IpAddr>,
}

impl Probe {
    pub fn new(from: impl AsEndpoint, to: IpAddr, port: u16, protocol: Proto) -> Probe {
        Probe {
            from: from.to_endpoint(),
            to,
            port,
            protocol,
            src: None,
        }
    }

    pub fn tcp(from: impl AsEndpoint, to: IpAddr, port: u16) -> Probe {
        Probe::new(from, to, port, Proto::Tcp)
    }

    pub fn udp(from: impl AsEndpoint, to: IpAddr, port: u16) -> Probe {
        Probe::new(from, to, port, Proto::Udp)
    }

    pub fn with_src(mut self, src: IpAddr) -> Probe {
        self.src = Some(src);
        self
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.from)?;
        if let Some(src) = self.src {
            write!(f, " (src {src})")?;
        }
        write!(
            f,
            " -> {}/{}",
            SocketAddr::new(self.to, self.port),
            self.protocol
        )
    }
}

/// What one probe observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub reachable: bool,
    /// "ok", "timeout (connect)", "refused", "reset", …
    pub detail: String,
    pub elapsed: Duration,
}

// ───────────────────────────── the cluster ─────────────────────────────

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Fabric,
    Node,
    External,
    Pod,
}

/// A running cluster. Dropping it stops the servers and deletes every namespace.
pub struct Cluster {
    spec: ClusterSpec,
    prefix: String,
    fabric_ns: String,
    external_ns: String,
    node_ns: Vec<String>,
    pod_ns: Vec<String>,
    /// Every namespace name we asked `ip` to create (deleted on drop, even if creation failed).
    created: Vec<String>,
    fds: HashMap<String, OwnedFd>,
    extra_externals: Mutex<Vec<IpAddr>>,
    servers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<StopSignal>,
    probe_batch: AtomicU64,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("prefix", &self.prefix)
            .field("layout", &self.spec.layout)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the cluster; panics (after cleaning up) if anything fails.
    pub fn new(spec: ClusterSpec) -> Cluster {
        match Cluster::try_new(spec) {
            Ok(c) => c,
            Err(e) => panic!("netns harness: building the cluster failed: {e}"),
        }
    }

    pub fn try_new(spec: ClusterSpec) -> io::Result<Cluster> {
        spec.validate().map_err(io::Error::other)?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            sweep_stale_namespaces();
        });
        let prefix = new_prefix();
        let mut c = Cluster {
            fabric_ns: format!("{prefix}fab"),
            external_ns: format!("{prefix}ext"),
            node_ns: (0..spec.nodes.len())
                .map(|i| format!("{prefix}n{i}"))
                .collect(),
            pod_ns: (0..spec.pods.len())
                .map(|i| format!("{prefix}p{i}"))
                .collect(),
            prefix,
            spec,
            created: Vec::new(),
            fds: HashMap::new(),
            extra_externals: Mutex::new(Vec::new()),
            servers: Mutex::new(Vec::new()),
            stop: Arc::new(StopSignal::new()?),
            probe_batch: AtomicU64::new(0),
        };
        // From here on, an error or panic drops `c`, which deletes whatever was created.
        c.create_namespaces()?;
        c.apply_default_sysctls()?;
        c.configure_links()?;
        c.finish_and_wait_ready()?;
        c.start_configured_servers()?;
        Ok(c)
    }

    // ── accessors ──

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The unique namespace-name prefix of this cluster (e.g. `knp1234s5678x0-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn layout(&self) -> Layout {
        self.spec.layout
    }

    pub fn node_names(&self) -> Vec<String> {
        self.spec.nodes.iter().map(|n| n.name.clone()).collect()
    }

    pub fn node_spec(&self, node: &str) -> &NodeSpec {
        &self.spec.nodes[self.node_index(node)]
    }

    pub fn node_ip(&self, node: &str, family: Family) -> IpAddr {
        self.node_spec(node).ip(family)
    }

    /// Every address the node owns: fabric addresses plus, in the bridge layout, `cni0`'s.
    /// (In the bridge layout, traffic from a node to its own pods is sourced from `cni0`'s.)
    pub fn node_ips(&self, node: &str) -> Vec<IpAddr> {
        let n = self.node_spec(node);
        let mut v = vec![n.ipv4.into(), n.ipv6.into()];
        if self.spec.layout == Layout::Bridge {
            v.extend(Family::BOTH.map(|f| n.pod_gateway(f)));
        }
        v
    }

    pub fn pods(&self) -> &[PodSpec] {
        &self.spec.pods
    }

    pub fn pod_endpoints(&self) -> Vec<Endpoint> {
        self.spec
            .pods
            .iter()
            .map(|p| Endpoint::pod(&p.namespace, &p.name))
            .collect()
    }

    pub fn pod_spec(&self, namespace: &str, name: &str) -> &PodSpec {
        &self.spec.pods[self.pod_index(namespace, name)]
    }

    pub fn pod_ips(&self, namespace: &str, name: &str) -> Vec<IpAddr> {
        self.pod_spec(namespace, name).ips.clone()
    }

    /// The pod's address of `family`; panics if it has none.
    pub fn pod_ip(&self, namespace: &str, name: &str, family: Family) -> IpAddr {
        self.pod_spec(namespace, name)
            .ip(family)
            .unwrap_or_else(|| panic!("pod {namespace}/{name} has no {family} address"))
    }

    /// Name of the pod's veth on the node side (`vp<index>`), e.g. for `iifname` rules.
    pub fn pod_host_veth(&self, namespace: &str, name: &str) -> String {
        format!("vp{}", self.pod_index(namespace, name))
    }

    /// The external namespace's own fabric address of `family`.
    pub fn external_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => EXTERNAL_FABRIC_V4.into(),
            Family::V6 => EXTERNAL_FABRIC_V6.into(),
        }
    }

    /// All addresses of the external namespace: fabric ones, spec ones, runtime ones.
    pub fn external_ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = vec![EXTERNAL_FABRIC_V4.into(), EXTERNAL_FABRIC_V6.into()];
        v.extend(self.spec.externals.iter().copied());
        v.extend(lock(&self.extra_externals).iter().copied());
        v
    }

    /// The `ip netns` name of a namespace of the cluster.
    pub fn netns_name(&self, target: impl AsEndpoint) -> String {
        match target.to_endpoint() {
            Endpoint::External => self.external_ns.clone(),
            Endpoint::Node(n) => self.node_ns[self.node_index(&n)].clone(),
            Endpoint::Pod { namespace, name } => {
                self.pod_ns[self.pod_index(&namespace, &name)].clone()
            }
        }
    }

    /// `/run/netns/<name>` of a namespace of the cluster.
    pub fn netns_path(&self, target: impl AsEndpoint) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(self.netns_name(target))
    }

    /// The fabric (switch) namespace's name.
    pub fn fabric_netns_name(&self) -> &str {
        &self.fabric_ns
    }

    /// Every namespace name of this cluster.
    pub fn netns_names(&self) -> Vec<String> {
        self.created.clone()
    }

    // ── running things inside namespaces ──

    /// Runs `f` on a fresh thread that has `setns`'ed into `target`'s namespace. Sockets (incl.
    /// netlink) opened there, and child processes spawned from there, live in that namespace.
    /// A panic in `f` is propagated.
    pub fn run_in<T, F>(&self, target: impl AsEndpoint, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let target = target.to_endpoint();
        let fd = self.ns_fd(&target);
        thread::scope(|s| {
            let h = s.spawn(move || {
                setns(fd, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {target}: {e}"));
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    pub fn run_in_node<T, F>(&self, node: &str, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        self.run_in(Endpoint::node(node), f)
    }

    /// `ip netns exec <ns> args…`, with optional stdin. Panics only if `ip` cannot be spawned.
    pub fn exec(&self, target: impl AsEndpoint, args: &[&str], stdin: Option<&str>) -> Output {
        let ns = self.netns_name(target);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).args(args);
        run_command(&mut cmd, stdin).unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"))
    }

    /// Like [`exec`](Self::exec) but panics (with stderr) unless the command succeeds;
    /// returns stdout.
    pub fn exec_ok(&self, target: impl AsEndpoint, args: &[&str], stdin: Option<&str>) -> String {
        let target = target.to_endpoint();
        let out = self.exec(&target, args, stdin);
        if !out.status.success() {
            panic!(
                "in {target}: {args:?} failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nft -f -` inside `target` (usually a node); panics on failure.
    pub fn nft(&self, target: impl AsEndpoint, script: &str) {
        self.exec_ok(target, &["nft", "-f", "-"], Some(script));
    }

    // ── runtime changes ──

    /// Adds an address to the external namespace (on `lo`) and routes it from every node.
    pub fn add_external_ip(&self, ip: IpAddr) {
        let (len, extra) = host_prefix(&ip);
        self.ip_batch_ok(
            &self.external_ns,
            &[format!("addr add {ip}/{len} dev lo{extra}")],
        );
        for ns in &self.node_ns {
            self.ip_batch_ok(ns, &[external_route("add", &ip)]);
        }
        lock(&self.extra_externals).push(ip);
    }

    /// Removes an address added by [`add_external_ip`](Self::add_external_ip) (or from the spec).
    pub fn remove_external_ip(&self, ip: IpAddr) {
        let (len, _) = host_prefix(&ip);
        self.ip_batch_ok(&self.external_ns, &[format!("addr del {ip}/{len} dev lo")]);
        for ns in &self.node_ns {
            self.ip_batch_ok(ns, &[external_route("del", &ip)]);
        }
        lock(&self.extra_externals).retain(|x| *x != ip);
    }

    /// Starts extra servers inside `target` (stopped on drop like the others).
    pub fn start_servers(&self, target: impl AsEndpoint, tcp: &[u16], udp: &[u16]) {
        let ns = self.netns_name(target);
        let h = spawn_server(&ns, tcp, udp, &self.stop)
            .unwrap_or_else(|e| panic!("starting servers in {ns}: {e}"));
        lock(&self.servers).push(h);
    }

    // ── probes ──

    /// Runs every probe in parallel (one thread each) and returns whether each one got through.
    /// Panics on harness errors (unknown endpoint, src address not present, …).
    pub fn probe_all(&self, probes: &[Probe], timeout: Duration) -> Vec<bool> {
        self.probe_all_detailed(probes, timeout)
            .into_iter()
            .map(|o| o.reachable)
            .collect()
    }

    pub fn probe(&self, probe: &Probe, timeout: Duration) -> bool {
        self.probe_all(std::slice::from_ref(probe), timeout)[0]
    }

    pub fn probe_all_detailed(&self, probes: &[Probe], timeout: Duration) -> Vec<ProbeOutcome> {
        let batch = self.probe_batch.fetch_add(1, Ordering::Relaxed);
        let fds: Vec<&OwnedFd> = probes.iter().map(|p| self.ns_fd(&p.from)).collect();
        let results: Vec<Result<ProbeOutcome, String>> = thread::scope(|s| {
            let handles: Vec<_> = probes
                .iter()
                .zip(fds)
                .enumerate()
                .map(|(i, (p, fd))| {
                    let token = format!("{}{batch}-{i}", self.prefix);
                    thread::Builder::new()
                        .name(format!("probe-{i}"))
                        .stack_size(PROBE_STACK)
                        .spawn_scoped(s, move || run_probe(p, fd, timeout, token.as_bytes()))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err("probe thread panicked".to_string())),
                    Err(e) => Err(format!("cannot spawn probe thread: {e}")),
                })
                .collect()
        });
        let mut errors = Vec::new();
        let outcomes = results
            .into_iter()
            .zip(probes)
            .map(|(r, p)| {
                r.unwrap_or_else(|e| {
                    errors.push(format!("  {p}: {e}"));
                    ProbeOutcome {
                        reachable: false,
                        detail: e,
                        elapsed: Duration::ZERO,
                    }
                })
            })
            .collect();
        if !errors.is_empty() {
            panic!("netns harness: probe errors:\n{}", errors.join("\n"));
        }
        outcomes
    }

    /// Every source → every pod address of `family`, on every `(proto, port)`.
    pub fn probes_to_pods(
        &self,
        sources: &[Endpoint],
        family: Family,
        ports: &[(Proto, u16)],
    ) -> Vec<Probe> {
        let mut v = Vec::new();
        for from in sources {
            for p in &self.spec.pods {
                let Some(to) = p.ip(family) else { continue };
                for &(proto, port) in ports {
                    v.push(Probe::new(from, to, port, proto));
                }
            }
        }
        v
    }

    /// Full pod → pod matrix for `family` on every `(proto, port)`.
    pub fn pod_matrix(&self, family: Family, ports: &[(Proto, u16)]) -> Vec<Probe> {
        self.probes_to_pods(&self.pod_endpoints(), family, ports)
    }

    /// Probes and compares with `expected`; `Err` holds a printable report.
    pub fn check(
        &self,
        probes: &[Probe],
        expected: &[bool],
        timeout: Duration,
    ) -> Result<(), String> {
        assert_eq!(
            probes.len(),
            expected.len(),
            "probes/expected length mismatch"
        );
        let observed = self.probe_all(probes, timeout);
        if observed == expected {
            Ok(())
        } else {
            Err(self.format_matrix(probes, &observed, Some(expected)))
        }
    }

    /// Panics with a matrix report unless every probe matches `expected`.
    pub fn assert_reachability(&self, probes: &[Probe], expected: &[bool], timeout: Duration) {
        if let Err(report) = self.check(probes, expected, timeout) {
            panic!("reachability mismatch ({})\n{report}", self.prefix);
        }
    }

    /// Re-probes until the results match `expected` or `within` has passed (for asynchronously
    /// applied rules); panics with the last report.
    pub fn assert_reachability_eventually(
        &self,
        probes: &[Probe],
        expected: &[bool],
        timeout: Duration,
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        loop {
            match self.check(probes, expected, timeout) {
                Ok(()) => return,
                Err(report) if Instant::now() >= deadline => {
                    panic!(
                        "reachability mismatch after {within:?} ({})\n{report}",
                        self.prefix
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    // ── formatting ──

    /// A readable name for an address of the cluster.
    pub fn describe_ip(&self, ip: IpAddr) -> String {
        if let Some(p) = self.spec.pods.iter().find(|p| p.ips.contains(&ip)) {
            return format!("{}/{}", p.namespace, p.name);
        }
        for n in &self.spec.nodes {
            if n.ipv4 == ip || n.ipv6 == ip {
                return format!("node {}", n.name);
            }
            if self.spec.layout == Layout::Bridge
                && Family::BOTH.iter().any(|f| n.pod_gateway(*f) == ip)
            {
                return format!("node {} cni0", n.name);
            }
        }
        if self.external_ips().contains(&ip) {
            return "external".to_string();
        }
        "?".to_string()
    }

    /// Matrix of results: rows = sources, columns = destinations (address:port/proto).
    /// `.` reachable, `X` not reachable, `-` not probed; with `expected`, a `!` after a cell marks
    /// a mismatch, and the mismatches are listed.
    pub fn format_matrix(
        &self,
        probes: &[Probe],
        observed: &[bool],
        expected: Option<&[bool]>,
    ) -> String {
        let mut rows: Vec<String> = Vec::new();
        let mut cols: Vec<String> = Vec::new();
        let mut cells: HashMap<(usize, usize), (bool, Option<bool>)> = HashMap::new();
        let index = |v: &mut Vec<String>, s: String| match v.iter().position(|x| *x == s) {
            Some(i) => i,
            None => {
                v.push(s);
                v.len() - 1
            }
        };
        for (i, p) in probes.iter().enumerate() {
            let row = match p.src {
                Some(src) => format!("{} (src {src})", p.from),
                None => p.from.to_string(),
            };
            let col = format!(
                "{} {}/{}",
                self.describe_ip(p.to),
                SocketAddr::new(p.to, p.port),
                p.protocol
            );
            let r = index(&mut rows, row);
            let c = index(&mut cols, col);
            cells.insert((r, c), (observed[i], expected.map(|e| e[i])));
        }
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut out = String::new();
        out.push_str("columns:\n");
        for (j, c) in cols.iter().enumerate() {
            out.push_str(&format!("  {j:>3}: {c}\n"));
        }
        out.push_str(&format!("{:width$} ", ""));
        for j in 0..cols.len() {
            out.push_str(&format!("{j:>4}"));
        }
        out.push('\n');
        for (i, r) in rows.iter().enumerate() {
            out.push_str(&format!("{r:width$} "));
            for j in 0..cols.len() {
                let cell = match cells.get(&(i, j)) {
                    None => "  - ".to_string(),
                    Some((o, e)) => {
                        let ch = if *o { '.' } else { 'X' };
                        let mark = if e.is_some_and(|e| e != *o) { '!' } else { ' ' };
                        format!("  {ch}{mark}")
                    }
                };
                out.push_str(&cell);
            }
            out.push('\n');
        }
        out.push_str(
            "legend: . reachable, X not reachable, - not probed, ! differs from expected\n",
        );
        if let Some(expected) = expected {
            let wrong: Vec<String> = probes
                .iter()
                .zip(observed.iter().zip(expected))
                .filter(|(_, (o, e))| o != e)
                .map(|(p, (o, _))| {
                    format!(
                        "  {p}: expected {}, got {}",
                        if *o { "blocked" } else { "reachable" },
                        if *o { "reachable" } else { "blocked" }
                    )
                })
                .collect();
            out.push_str(&format!(
                "{} mismatch(es):\n{}\n",
                wrong.len(),
                wrong.join("\n")
            ));
        }
        out
    }

    /// One line per namespace: role, netns name, addresses.
    pub fn describe(&self) -> String {
        let mut out = format!("cluster {} ({:?})\n", self.prefix, self.spec.layout);
        out.push_str(&format!("  fabric   {}\n", self.fabric_ns));
        for (i, n) in self.spec.nodes.iter().enumerate() {
            out.push_str(&format!(
                "  node {} {} {} {}\n",
                n.name, self.node_ns[i], n.ipv4, n.ipv6
            ));
        }
        for (i, p) in self.spec.pods.iter().enumerate() {
            let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
            out.push_str(&format!(
                "  pod {}/{} on {} {} vp{i} [{}]\n",
                p.namespace,
                p.name,
                p.node,
                self.pod_ns[i],
                ips.join(", ")
            ));
        }
        let ext: Vec<String> = self.external_ips().iter().map(|i| i.to_string()).collect();
        out.push_str(&format!(
            "  external {} [{}]\n",
            self.external_ns,
            ext.join(", ")
        ));
        out
    }

    // ── internals ──

    fn node_index(&self, node: &str) -> usize {
        self.spec
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("unknown node {node}"))
    }

    fn pod_index(&self, namespace: &str, name: &str) -> usize {
        self.spec
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("unknown pod {namespace}/{name}"))
    }

    fn ns_fd(&self, target: &Endpoint) -> &OwnedFd {
        let name = self.netns_name(target);
        self.fds
            .get(&name)
            .unwrap_or_else(|| panic!("namespace {name} not open"))
    }

    fn all_namespaces(&self) -> Vec<(String, Role)> {
        let mut v = vec![(self.fabric_ns.clone(), Role::Fabric)];
        v.extend(self.node_ns.iter().map(|n| (n.clone(), Role::Node)));
        v.push((self.external_ns.clone(), Role::External));
        v.extend(self.pod_ns.iter().map(|n| (n.clone(), Role::Pod)));
        v
    }

    fn ip_batch_ok(&self, ns: &str, lines: &[String]) {
        ip_batch(Some(ns), lines).unwrap_or_else(|e| panic!("{e}"));
    }

    fn create_namespaces(&mut self) -> io::Result<()> {
        let names: Vec<String> = self.all_namespaces().into_iter().map(|(n, _)| n).collect();
        self.created = names.clone();
        let lines: Vec<String> = names.iter().map(|n| format!("netns add {n}")).collect();
        ip_batch(None, &lines)?;
        for n in names {
            let f = File::open(PathBuf::from(NETNS_DIR).join(&n))
                .map_err(|e| io::Error::new(e.kind(), format!("open netns {n}: {e}")))?;
            self.fds.insert(n, f.into());
        }
        Ok(())
    }

    /// Namespace-wide sysctls, before any interface exists (new interfaces copy `default`).
    fn apply_default_sysctls(&self) -> io::Result<()> {
        let layout = self.spec.layout;
        let jobs: Vec<(&OwnedFd, Role)> = self
            .all_namespaces()
            .into_iter()
            .map(|(n, role)| (&self.fds[&n], role))
            .collect();
        in_namespaces_seq(&jobs, |role| {
            let fwd = if *role == Role::Node { "1" } else { "0" };
            let mut list: Vec<(&str, &str, bool)> = vec![
                ("net/ipv4/conf/all/rp_filter", "0", true),
                ("net/ipv4/conf/default/rp_filter", "0", true),
                ("net/ipv4/ip_forward", fwd, true),
                ("net/ipv6/conf/all/forwarding", fwd, true),
                ("net/ipv6/conf/all/accept_dad", "0", true),
                ("net/ipv6/conf/default/accept_dad", "0", true),
                ("net/ipv6/conf/all/accept_ra", "0", true),
                ("net/ipv6/conf/default/accept_ra", "0", true),
                ("net/ipv6/conf/all/router_solicitations", "0", true),
                ("net/ipv6/conf/default/router_solicitations", "0", true),
            ];
            match role {
                Role::Node => {
                    let required = layout == Layout::Bridge;
                    list.push(("net/bridge/bridge-nf-call-iptables", "1", required));
                    list.push(("net/bridge/bridge-nf-call-ip6tables", "1", required));
                }
                Role::Fabric => {
                    list.push(("net/bridge/bridge-nf-call-iptables", "0", false));
                    list.push(("net/bridge/bridge-nf-call-ip6tables", "0", false));
                    list.push(("net/bridge/bridge-nf-call-arptables", "0", false));
                    list.push(("net/ipv6/conf/all/disable_ipv6", "1", true));
                    list.push(("net/ipv6/conf/default/disable_ipv6", "1", true));
                }
                Role::External | Role::Pod => {}
            }
            for (key, value, required) in list {
                match write_sysctl(key, value) {
                    Err(e) if !required && e.kind() == io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
            Ok(())
        })
    }

    fn configure_links(&self) -> io::Result<()> {
        let spec = &self.spec;
        let bridge = "type bridge forward_delay 0 stp_state 0 mcast_snooping 0";
        // Fabric: switch + one veth per node and one for the external namespace.
        let mut fab = vec![
            "link set lo up".to_string(),
            format!("link add {FABRIC_BRIDGE_IF} {bridge}"),
            format!("link set {FABRIC_BRIDGE_IF} up"),
        ];
        let mut ports: Vec<(String, &str)> = (0..spec.nodes.len())
            .map(|i| (format!("fn{i}"), self.node_ns[i].as_str()))
            .collect();
        ports.push(("fext".to_string(), self.external_ns.as_str()));
        for (port, peer_ns) in &ports {
            fab.push(format!(
                "link add {port} type veth peer name {NODE_FABRIC_IF} netns {peer_ns}"
            ));
            fab.push(format!("link set {port} master {FABRIC_BRIDGE_IF}"));
            fab.push(format!("link set {port} up"));
        }
        ip_batch(Some(&self.fabric_ns), &fab)?;

        for (i, node) in spec.nodes.iter().enumerate() {
            let mut b = vec![
                "link set lo up".to_string(),
                format!(
                    "addr add {}/{FABRIC_V4_PREFIX} dev {NODE_FABRIC_IF}",
                    node.ipv4
                ),
                format!(
                    "addr add {}/{FABRIC_V6_PREFIX} dev {NODE_FABRIC_IF} nodad",
                    node.ipv6
                ),
                format!("link set {NODE_FABRIC_IF} up"),
            ];
            if spec.layout == Layout::Bridge {
                let l4 = node.pod_cidr_v4.1;
                let l6 = node.pod_cidr_v6.1;
                b.push(format!("link add {NODE_BRIDGE_IF} {bridge}"));
                b.push(format!(
                    "addr add {}/{l4} dev {NODE_BRIDGE_IF}",
                    node.pod_gateway(Family::V4)
                ));
                b.push(format!(
                    "addr add {}/{l6} dev {NODE_BRIDGE_IF} nodad",
                    node.pod_gateway(Family::V6)
                ));
                b.push(format!("link set {NODE_BRIDGE_IF} up"));
            }
            for (j, pod) in spec.pods.iter().enumerate() {
                if pod.node != node.name {
                    continue;
                }
                let veth = format!("vp{j}");
                let pod_ns = &self.pod_ns[j];
                match spec.layout {
                    Layout::Routed => {
                        b.push(format!(
                            "link add {veth} address {ROUTED_VETH_MAC} type veth peer name {POD_IF} netns {pod_ns}"
                        ));
                        b.push(format!("link set {veth} up"));
                        b.push(format!("addr add {ROUTED_GATEWAY_V6}/64 dev {veth} nodad"));
                        for ip in &pod.ips {
                            let (len, _) = host_prefix(ip);
                            b.push(format!("route add {ip}/{len} dev {veth}"));
                        }
                    }
                    Layout::Bridge => {
                        b.push(format!(
                            "link add {veth} type veth peer name {POD_IF} netns {pod_ns}"
                        ));
                        b.push(format!("link set {veth} master {NODE_BRIDGE_IF}"));
                        b.push(format!("link set {veth} up"));
                    }
                }
            }
            for other in spec.nodes.iter().filter(|o| o.name != node.name) {
                let (c4, l4) = other.pod_cidr_v4;
                let (c6, l6) = other.pod_cidr_v6;
                b.push(format!("route add {c4}/{l4} via {}", other.ipv4));
                b.push(format!("route add {c6}/{l6} via {}", other.ipv6));
            }
            for ext in &spec.externals {
                b.push(external_route("add", ext));
            }
            ip_batch(Some(&self.node_ns[i]), &b)?;
        }

        let mut ext = vec![
            "link set lo up".to_string(),
            format!("addr add {EXTERNAL_FABRIC_V4}/{FABRIC_V4_PREFIX} dev {EXTERNAL_FABRIC_IF}"),
            format!(
                "addr add {EXTERNAL_FABRIC_V6}/{FABRIC_V6_PREFIX} dev {EXTERNAL_FABRIC_IF} nodad"
            ),
            format!("link set {EXTERNAL_FABRIC_IF} up"),
        ];
        for ip in &spec.externals {
            let (len, extra) = host_prefix(ip);
            ext.push(format!("addr add {ip}/{len} dev lo{extra}"));
        }
        for node in &spec.nodes {
            let (c4, l4) = node.pod_cidr_v4;
            let (c6, l6) = node.pod_cidr_v6;
            ext.push(format!("route add {c4}/{l4} via {}", node.ipv4));
            ext.push(format!("route add {c6}/{l6} via {}", node.ipv6));
        }
        ip_batch(Some(&self.external_ns), &ext)?;

        for (j, pod) in spec.pods.iter().enumerate() {
            let node = &spec.nodes[self.node_index(&pod.node)];
            let mut b = vec!["link set lo up".to_string()];
            for ip in &pod.ips {
                match spec.layout {
                    Layout::Routed => {
                        let (len, extra) = host_prefix(ip);
                        b.push(format!("addr add {ip}/{len} dev {POD_IF}{extra}"));
                    }
                    Layout::Bridge => {
                        let (_, len) = node.pod_cidr(Family::of(ip));
                        let extra = if ip.is_ipv6() { " nodad" } else { "" };
                        b.push(format!("addr add {ip}/{len} dev {POD_IF}{extra}"));
                    }
                }
            }
            b.push(format!("link set {POD_IF} up"));
            let has = |f: Family| pod.ip(f).is_some();
            match spec.layout {
                Layout::Routed => {
                    if has(Family::V4) {
                        b.push(format!(
                            "route add {ROUTED_GATEWAY_V4}/32 dev {POD_IF} scope link"
                        ));
                        b.push(format!(
                            "route add 0.0.0.0/0 via {ROUTED_GATEWAY_V4} dev {POD_IF}"
                        ));
                        // Static entry, as proxy ARP alone needs the node to have a route to
                        // 169.254.1.1 (our nodes have no default route).
                        b.push(format!(
                            "neigh replace {ROUTED_GATEWAY_V4} lladdr {ROUTED_VETH_MAC} dev {POD_IF} nud permanent"
                        ));
                    }
                    if has(Family::V6) {
                        b.push(format!(
                            "route add ::/0 via {ROUTED_GATEWAY_V6} dev {POD_IF}"
                        ));
                    }
                }
                Layout::Bridge => {
                    for f in Family::BOTH {
                        if has(f) {
                            let any = if f == Family::V4 { "0.0.0.0/0" } else { "::/0" };
                            b.push(format!(
                                "route add {any} via {} dev {POD_IF}",
                                node.pod_gateway(f)
                            ));
                        }
                    }
                }
            }
            ip_batch(Some(&self.pod_ns[j]), &b)?;
        }
        Ok(())
    }

    /// Per-interface sysctls, then wait until no IPv6 address is tentative anywhere.
    fn finish_and_wait_ready(&self) -> io::Result<()> {
        let spec = &self.spec;
        let mut jobs: Vec<(&OwnedFd, ReadyJob)> = Vec::new();
        let node_of_ns: HashMap<&str, &NodeSpec> = self
            .node_ns
            .iter()
            .map(String::as_str)
            .zip(&spec.nodes)
            .collect();
        for (n, _) in self.all_namespaces() {
            let mut interface_sysctls = Vec::new();
            let mut ignore_ifs = Vec::new();
            if let Some(node) = node_of_ns.get(n.as_str()) {
                let pods: Vec<usize> = (0..spec.pods.len())
                    .filter(|j| spec.pods[*j].node == node.name)
                    .collect();
                if spec.layout == Layout::Routed {
                    for j in &pods {
                        interface_sysctls.push(format!("net/ipv4/conf/vp{j}/proxy_arp=1"));
                        interface_sysctls.push(format!("net/ipv4/neigh/vp{j}/proxy_delay=0"));
                    }
                }
                if pods.is_empty() {
                    // cni0 without ports has no carrier, so its addresses stay tentative.
                    ignore_ifs.push(NODE_BRIDGE_IF);
                }
            }
            jobs.push((
                &self.fds[&n],
                ReadyJob {
                    sysctls: interface_sysctls,
                    ignore_ifs,
                },
            ));
        }
        in_namespaces_seq(&jobs, |job| {
            for s in &job.sysctls {
                let (key, value) = s.split_once('=').unwrap_or((s.as_str(), ""));
                write_sysctl(key, value)?;
            }
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let tentative = tentative_addresses(&job.ignore_ifs)?;
                if tentative.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "addresses still tentative after {READY_TIMEOUT:?}: {tentative:?}"
                    )));
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    }

    fn start_configured_servers(&self) -> io::Result<()> {
        let mut plan: Vec<(String, Vec<u16>, Vec<u16>)> = Vec::new();
        for ns in &self.node_ns {
            plan.push((
                ns.clone(),
                self.spec.node_tcp_ports.clone(),
                self.spec.node_udp_ports.clone(),
            ));
        }
        plan.push((
            self.external_ns.clone(),
            self.spec.external_tcp_ports.clone(),
            self.spec.external_udp_ports.clone(),
        ));
        for (j, p) in self.spec.pods.iter().enumerate() {
            plan.push((
                self.pod_ns[j].clone(),
                p.tcp_ports.clone(),
                p.udp_ports.clone(),
            ));
        }
        // Spawn all, then collect readiness, so binding happens in parallel.
        let mut pending = Vec::new();
        for (ns, tcp, udp) in plan {
            if tcp.is_empty() && udp.is_empty() {
                continue;
            }
            pending.push(spawn_server_async(&ns, &tcp, &udp, &self.stop)?);
        }
        let mut first_err = None;
        for (handle, ready) in pending {
            lock(&self.servers).push(handle);
            if let Err(e) = ready
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("server thread died")))
            {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.trigger();
        let servers = mem::take(&mut *lock(&self.servers));
        for h in servers {
            let _ = h.join();
        }
        self.fds.clear();
        delete_namespaces(&self.created);
    }
}

/// Per-namespace work after the links exist: `key=value` sysctls, interfaces whose addresses
/// may legitimately stay tentative.
struct ReadyJob {
    sysctls: Vec<String>,
    ignore_ifs: Vec<&'static str>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ───────────────────────────── namespaces: names, sweep, deletion ─────────────────────────────

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime); fields after the `)` closing comm start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn new_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let start = process_start_time(pid).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{pid}s{start}x{n}-")
}

/// Parses `knp<pid>s<start>x<n>-…` into `(pid, start)`.
fn parse_owner(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('s')?;
    let (start, rest) = rest.split_once('x')?;
    let (n, _) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(start) || !digits(n) {
        return None;
    }
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Deletes namespaces named by this harness whose owning process (pid + start time) is gone.
/// Returns the names it deleted. Runs automatically once per process on the first `Cluster::new`.
pub fn sweep_stale_namespaces() -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let stale: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| match parse_owner(name) {
            Some((pid, start)) => process_start_time(pid) != Some(start),
            None => false,
        })
        .collect();
    delete_namespaces(&stale);
    stale
}

/// Names in `/run/netns` starting with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn delete_namespaces(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let lines: Vec<String> = names.iter().map(|n| format!("netns delete {n}")).collect();
    let mut cmd = Command::new("ip");
    cmd.args(["-force", "-batch", "-"]);
    let _ = run_command(&mut cmd, Some(&(lines.join("\n") + "\n")));
    for n in names {
        if PathBuf::from(NETNS_DIR).join(n).exists() {
            let out = run_command(Command::new("ip").args(["netns", "delete", n]), None);
            if PathBuf::from(NETNS_DIR).join(n).exists() {
                eprintln!("netns harness: could not delete namespace {n}: {out:?}");
            }
        }
    }
}

/// Whether this process can run the harness (root, `ip` present).
pub fn harness_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("netns harness needs root".to_string());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("`ip -V` failed: {}", o.status)),
        Err(e) => Err(format!("`ip` not runnable: {e}")),
    }
}

// ───────────────────────────── commands & sysctls ─────────────────────────────

fn run_command(cmd: &mut Command, stdin: Option<&str>) -> io::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(input) = stdin {
        let mut pipe = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin pipe"))?;
        // A command that does not read stdin may close it early; that is not our error.
        let _ = pipe.write_all(input.as_bytes());
    }
    child.wait_with_output()
}

/// `ip [-n ns] -batch -`, stopping at the first failing line.
fn ip_batch(ns: Option<&str>, lines: &[String]) -> io::Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    let out = run_command(&mut cmd, Some(&script))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}-batch failed: {}\nscript:\n{script}",
            ns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn host_prefix(ip: &IpAddr) -> (u8, &'static str) {
    match ip {
        IpAddr::V4(_) => (32, ""),
        IpAddr::V6(_) => (128, " nodad"),
    }
}

fn external_route(op: &str, ip: &IpAddr) -> String {
    let (len, _) = host_prefix(ip);
    let via: IpAddr = match ip {
        IpAddr::V4(_) => EXTERNAL_FABRIC_V4.into(),
        IpAddr::V6(_) => EXTERNAL_FABRIC_V6.into(),
    };
    format!("route {op} {ip}/{len} via {via}")
}

/// Writes `/proc/sys/<key>` of the *calling thread's* network namespace.
fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{key}");
    fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}={value}: {e}")))
}

/// IPv6 addresses flagged tentative in the calling thread's namespace.
fn tentative_addresses(ignore_ifs: &[&str]) -> io::Result<Vec<String>> {
    const IFA_F_TENTATIVE: u32 = 0x40;
    let text = match fs::read_to_string("/proc/thread-self/net/if_inet6") {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()), // IPv6 disabled
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let ifname = *f.get(5)?;
            (flags & IFA_F_TENTATIVE != 0 && !ignore_ifs.contains(&ifname))
                .then(|| format!("{} on {ifname}", f[0]))
        })
        .collect())
}

/// Runs `f(arg)` inside each namespace, one after another, on one helper thread.
fn in_namespaces_seq<A: Sync>(
    jobs: &[(&OwnedFd, A)],
    f: impl Fn(&A) -> io::Result<()> + Sync,
) -> io::Result<()> {
    thread::scope(|s| {
        s.spawn(|| {
            for (fd, arg) in jobs {
                setns(*fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                f(arg)?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace helper thread panicked")))
    })
}

fn cidr_contains(net: &IpAddr, len: u8, ip: &IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(*n) & mask == u32::from(*i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(*n) & mask == u128::from(*i) & mask
        }
        _ => false,
    }
}

// ───────────────────────────── raw sockets ─────────────────────────────

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn new_socket(family: Family, ty: libc::c_int) -> io::Result<OwnedFd> {
    let domain = match family {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    };
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd =
        cvt(unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: we pass a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: as above.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Source ports for UDP probes, handed out in turn from 20000..60000 (never a port a test
/// pod serves on).
static NEXT_UDP_SOURCE_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The next source port for a UDP probe: each call gives the next port of the cycle.
pub fn next_udp_source_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 40_000;
    let n = NEXT_UDP_SOURCE_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (FIRST + n % COUNT) as u16
}

fn bind_fresh_udp_port(sock: &OwnedFd, src: IpAddr) -> Result<(), String> {
    let mut last = String::new();
    // A port can be taken in that namespace (rarely): move on to the next one.
    for _ in 0..8 {
        let addr = SocketAddr::new(src, next_udp_source_port());
        match bind_to(sock, &addr) {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("bind {addr}: {e}"),
        }
    }
    Err(last)
}

fn bind_to(fd: &OwnedFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sockaddr_of(addr);
    // SAFETY: `ss` is a valid sockaddr of length `len`.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

fn connect_to(fd: &OwnedFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sockaddr_of(addr);
    // SAFETY: `ss` is a valid sockaddr of length `len`.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

fn socket_error(fd: &OwnedFd) -> io::Result<libc::c_int> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: pointers to live locals with the right sizes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(err)
}

/// Polls one descriptor until `events` (or an error/hangup) or `deadline`; true if ready.
fn wait_fd(fd: &OwnedFd, events: libc::c_short, deadline: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let ms = (deadline - now)
            .as_micros()
            .div_ceil(1000)
            .min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".to_string(),
        Some(libc::ECONNRESET) => "reset".to_string(),
        Some(libc::EHOSTUNREACH) => "host unreachable".to_string(),
        Some(libc::ENETUNREACH) => "network unreachable".to_string(),
        Some(libc::ETIMEDOUT) => "timed out".to_string(),
        Some(libc::EPERM) | Some(libc::EACCES) => "not permitted (local filter)".to_string(),
        _ => e.to_string(),
    }
}

// ───────────────────────────── probes (client side) ─────────────────────────────

fn run_probe(
    p: &Probe,
    fd: &OwnedFd,
    timeout: Duration,
    token: &[u8],
) -> Result<ProbeOutcome, String> {
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns into {}: {e}", p.from))?;
    let start = Instant::now();
    let deadline = start + timeout;
    let family = Family::of(&p.to);
    if let Some(src) = p.src {
        if Family::of(&src) != family {
            return Err(format!(
                "src {src} and destination {} differ in family",
                p.to
            ));
        }
    }
    let ty = match p.protocol {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    };
    let sock = new_socket(family, ty).map_err(|e| format!("socket: {e}"))?;
    let src = p.src.unwrap_or(match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    match p.protocol {
        // A UDP probe must never reuse the source port of an earlier probe of the same pair:
        // the kernel would still hold that flow's conntrack entry (30 s or more) and pass the
        // new datagram as established, even after a policy now denies the pair. So each UDP
        // probe takes the next port of a cycle far longer than any test's 30 s window.
        Proto::Udp => bind_fresh_udp_port(&sock, src)?,
        Proto::Tcp if p.src.is_some() => {
            bind_to(&sock, &SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?
        }
        Proto::Tcp => {}
    }
    let dst = SocketAddr::new(p.to, p.port);
    let (reachable, detail) = match p.protocol {
        Proto::Tcp => tcp_probe(&sock, &dst, deadline),
        Proto::Udp => udp_probe(&sock, &dst, deadline, token),
    };
    Ok(ProbeOutcome {
        reachable,
        detail,
        elapsed: start.elapsed(),
    })
}

fn tcp_probe(sock: &OwnedFd, dst: &SocketAddr, deadline: Instant) -> (bool, String) {
    match connect_to(sock, dst) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            if !wait_fd(sock, libc::POLLOUT, deadline) {
                return (false, "timeout (connect)".to_string());
            }
            match socket_error(sock) {
                Ok(0) => {}
                Ok(err) => return (false, errno_name(&io::Error::from_raw_os_error(err))),
                Err(e) => return (false, errno_name(&e)),
            }
        }
        Err(e) => return (false, errno_name(&e)),
    }
    let mut buf = [0u8; 16];
    loop {
        if !wait_fd(sock, libc::POLLIN, deadline) {
            return (false, "timeout (no data)".to_string());
        }
        // SAFETY: reading into a live local buffer of the given length.
        let n = unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => return (true, "ok".to_string()),
            0 => return (false, "closed without data".to_string()),
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return (false, errno_name(&e));
                }
            }
        }
    }
}

fn udp_probe(sock: &OwnedFd, dst: &SocketAddr, deadline: Instant, token: &[u8]) -> (bool, String) {
    if let Err(e) = connect_to(sock, dst) {
        return (false, errno_name(&e));
    }
    let mut next_send = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (false, "timeout".to_string());
        }
        if now >= next_send {
            // SAFETY: sending from a live slice.
            let r = unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    token.as_ptr().cast(),
                    token.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return (false, errno_name(&e));
                }
            }
            next_send = now + UDP_RESEND;
        }
        if !wait_fd(sock, libc::POLLIN, next_send.min(deadline)) {
            continue;
        }
        loop {
            // SAFETY: receiving into a live local buffer of the given length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    break;
                }
                return (false, errno_name(&e));
            }
            if &buf[..n as usize] == token {
                return (true, "ok".to_string());
            }
        }
    }
}

// ───────────────────────────── servers ─────────────────────────────

/// Wakes every server thread at once: an eventfd that becomes (and stays) readable.
struct StopSignal {
    efd: OwnedFd,
    stopped: AtomicBool,
}

impl StopSignal {
    fn new() -> io::Result<StopSignal> {
        // SAFETY: plain syscall; on success we own the descriptor.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        Ok(StopSignal {
            // SAFETY: fresh descriptor.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            stopped: AtomicBool::new(false),
        })
    }

    fn trigger(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

enum Listener {
    Tcp(OwnedFd),
    Udp(OwnedFd),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(fd) | Listener::Udp(fd) => fd.as_raw_fd(),
        }
    }
}

fn bind_listeners(tcp: &[u16], udp: &[u16]) -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for (ports, ty) in [(tcp, libc::SOCK_STREAM), (udp, libc::SOCK_DGRAM)] {
        for &port in ports {
            for family in Family::BOTH {
                let fd = new_socket(family, ty)?;
                set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                let any: IpAddr = match family {
                    Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
                    Family::V6 => {
                        set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
                        Ipv6Addr::UNSPECIFIED.into()
                    }
                };
                if ty == libc::SOCK_DGRAM {
                    match family {
                        Family::V4 => set_int_opt(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?,
                        Family::V6 => {
                            set_int_opt(&fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?
                        }
                    }
                }
                bind_to(&fd, &SocketAddr::new(any, port))
                    .map_err(|e| io::Error::new(e.kind(), format!("bind [{any}]:{port}: {e}")))?;
                if ty == libc::SOCK_STREAM {
                    // SAFETY: plain syscall on an owned socket.
                    cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
                    out.push(Listener::Tcp(fd));
                } else {
                    out.push(Listener::Udp(fd));
                }
            }
        }
    }
    Ok(out)
}

type ServerStart = (JoinHandle<()>, mpsc::Receiver<io::Result<()>>);

fn spawn_server_async(
    ns: &str,
    tcp: &[u16],
    udp: &[u16],
    stop: &Arc<StopSignal>,
) -> io::Result<ServerStart> {
    let path = PathBuf::from(NETNS_DIR).join(ns);
    let (tcp, udp) = (tcp.to_vec(), udp.to_vec());
    let stop = Arc::clone(stop);
    let (tx, rx) = mpsc::channel();
    let h = thread::Builder::new()
        .name(format!("srv-{ns}"))
        .stack_size(SERVER_STACK)
        .spawn(move || {
            let setup = || -> io::Result<Vec<Listener>> {
                let f = File::open(&path)?;
                setns(&f, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                bind_listeners(&tcp, &udp)
            };
            match setup() {
                Ok(listeners) => {
                    let _ = tx.send(Ok(()));
                    serve(&listeners, &stop);
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::new(
                        e.kind(),
                        format!("server in {}: {e}", path.display()),
                    )));
                }
            }
        })?;
    Ok((h, rx))
}

fn spawn_server(
    ns: &str,
    tcp: &[u16],
    udp: &[u16],
    stop: &Arc<StopSignal>,
) -> io::Result<JoinHandle<()>> {
    let (h, rx) = spawn_server_async(ns, tcp, udp, stop)?;
    rx.recv()
        .unwrap_or_else(|_| Err(io::Error::other("server thread died")))?;
    Ok(h)
}

fn serve(listeners: &[Listener], stop: &StopSignal) {
    let mut pfds: Vec<libc::pollfd> = std::iter::once(stop.efd.as_raw_fd())
        .chain(listeners.iter().map(Listener::fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        if stop.stopped.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: valid pollfd array; 500 ms cap as a belt-and-braces stop check.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 500) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if pfds[0].revents != 0 {
            return;
        }
        for (pfd, l) in pfds[1..].iter_mut().zip(listeners) {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            match l {
                Listener::Tcp(fd) => tcp_accept_all(fd),
                Listener::Udp(fd) => udp_echo_all(fd),
            }
        }
    }
}

fn tcp_accept_all(fd: &OwnedFd) {
    loop {
        // SAFETY: accept without peer address; on success we own the new descriptor.
        let c = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            return; // EAGAIN (drained) or a transient error; poll again
        }
        // SAFETY: fresh descriptor.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        // SAFETY: sending from a static slice; MSG_NOSIGNAL avoids SIGPIPE on a reset peer.
        unsafe {
            libc::send(
                conn.as_raw_fd(),
                TCP_REPLY.as_ptr().cast(),
                TCP_REPLY.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        drop(conn);
    }
}

/// Echoes every queued datagram back, from the address it was sent to (IP_PKTINFO), so that
/// replies to secondary addresses do not come from the primary one.
fn udp_echo_all(fd: &OwnedFd) {
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: all-zero is valid for these plain C structs.
        let mut peer: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut peer as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&cbuf) as _;
        // SAFETY: msg points at live buffers sized as declared.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return;
        }
        let mut local4: Option<libc::in_addr> = None;
        let mut local6: Option<libc::in6_addr> = None;
        // SAFETY: walking the control buffer the kernel just filled, with the libc macros.
        unsafe {
            let mut cm = libc::CMSG_FIRSTHDR(&msg);
            while !cm.is_null() {
                let (level, ty) = ((*cm).cmsg_level, (*cm).cmsg_type);
                if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                    let pi: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast());
                    local4 = Some(pi.ipi_addr);
                } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                    let pi: libc::in6_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast());
                    local6 = Some(pi.ipi6_addr);
                }
                cm = libc::CMSG_NXTHDR(&msg, cm);
            }
        }
        let mut out_c = [0u64; 16];
        let mut out_iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: n as usize,
        };
        // SAFETY: as above.
        let mut out: libc::msghdr = unsafe { mem::zeroed() };
        out.msg_name = (&mut peer as *mut libc::sockaddr_storage).cast();
        out.msg_namelen = msg.msg_namelen;
        out.msg_iov = &mut out_iov;
        out.msg_iovlen = 1;
        // SAFETY: the control buffer (128 bytes, u64-aligned) fits one pktinfo cmsg.
        unsafe {
            if let Some(a) = local4 {
                let size = mem::size_of::<libc::in_pktinfo>() as libc::c_uint;
                out.msg_control = out_c.as_mut_ptr().cast();
                out.msg_controllen = libc::CMSG_SPACE(size) as _;
                let cm = libc::CMSG_FIRSTHDR(&out);
                (*cm).cmsg_level = libc::IPPROTO_IP;
                (*cm).cmsg_type = libc::IP_PKTINFO;
                (*cm).cmsg_len = libc::CMSG_LEN(size) as _;
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: a,
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast(), pi);
            } else if let Some(a) = local6 {
                let size = mem::size_of::<libc::in6_pktinfo>() as libc::c_uint;
                out.msg_control = out_c.as_mut_ptr().cast();
                out.msg_controllen = libc::CMSG_SPACE(size) as _;
                let cm = libc::CMSG_FIRSTHDR(&out);
                (*cm).cmsg_level = libc::IPPROTO_IPV6;
                (*cm).cmsg_type = libc::IPV6_PKTINFO;
                (*cm).cmsg_len = libc::CMSG_LEN(size) as _;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: a,
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast(), pi);
            }
            libc::sendmsg(
                fd.as_raw_fd(),
                &out,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }
}
