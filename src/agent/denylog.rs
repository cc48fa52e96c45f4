//! Turning packets logged by drop rules into a bounded stream of "connection denied" lines.
//!
//! A denied connection shows up as many dropped packets (retransmitted SYNs, a UDP sender that
//! keeps trying), and an attacker can make any number of distinct ones. Logging each packet
//! would flood the log and let a remote peer grow the agent's memory, so this module decides
//! which packets deserve a line: the first packet of a flow within a dedup window, subject to
//! a global token bucket, with a flow table of bounded size whose entries expire.
//!
//! The `log prefix` format that names the pod behind a logged packet is the engine's
//! ([`crate::engine::log_prefix`]). Everything here is pure:
//! no I/O, and time is passed in, so behaviour under floods is unit-tested deterministically.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::kernel::nflog::LoggedPacket;

use crate::engine::log_prefix::{
    CnpDenyTarget, DenyDirection, LogTarget, StagedCnpTarget, StagedTarget, parse_log_prefix,
};

/// Limits on what [`DenyLogger`] lets through and remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyLogConfig {
    /// A flow is logged at most once per window; it logs again once the window has passed.
    pub dedup_window: Duration,
    /// Lines per second sustained across all flows. 0 means only the initial burst is ever
    /// logged.
    pub rate_per_sec: u32,
    /// Lines that may be logged back to back before the rate applies.
    pub burst: u32,
    /// Most flows remembered; beyond it the oldest is forgotten (and may log again early).
    pub max_flows: usize,
}

impl Default for DenyLogConfig {
    fn default() -> Self {
        Self {
            // TCP retries a SYN after 1, 3, 7, 15 and 31 s: one line covers a whole attempt.
            dedup_window: Duration::from_secs(60),
            rate_per_sec: 20,
            burst: 100,
            max_flows: 16_384,
        }
    }
}

/// Why a packet did not produce a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressReason {
    /// Its flow was logged within the dedup window.
    Dedup,
    /// The global line budget is used up.
    RateLimit,
    /// The prefix is not one the agent generates.
    Unparseable,
}

/// What to do with one logged packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Log(DeniedConnection),
    Suppressed(SuppressReason),
}

/// A denied connection worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedConnection {
    pub direction: DenyDirection,
    /// Namespace of the isolated pod, as encoded in the prefix (see [`DenyTarget`](crate::engine::log_prefix::DenyTarget)).
    pub namespace: String,
    /// The isolated pod, as encoded in the prefix (see [`DenyTarget`](crate::engine::log_prefix::DenyTarget)).
    pub pod: String,
    /// `"ns/pod"` of the source if the resolver knows it, else `"external"`.
    pub src: String,
    /// `"ns/pod"` of the destination if the resolver knows it, else `"external"`.
    pub dst: String,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// `"TCP"`, `"UDP"`, `"SCTP"`, `"ICMP"`, `"ICMPv6"`, or the protocol number.
    pub protocol: &'static str,
    pub dst_port: Option<u16>,
    /// The ClusterNetworkPolicy Deny rule that dropped it; `None` for a pod's isolation.
    /// `namespace`/`pod` are then the local pod the rule applies to (the destination for
    /// ingress, the source for egress), or `unknown` when the address is not a known pod.
    pub cnp: Option<Box<CnpDenyTarget>>,
    /// The staged policy that would change this connection's verdict (nothing was dropped
    /// by it: the connection went on as today); `namespace`/`pod` are the local pod as for
    /// `cnp`.
    pub staged: Option<Box<StagedTarget>>,
    /// The staged ClusterNetworkPolicy that would change this connection's verdict (as
    /// `staged`, for a ClusterNetworkPolicy).
    pub staged_cnp: Option<Box<StagedCnpTarget>>,
}

/// What makes two packets the same denied connection. The source port is left out on
/// purpose: every retry of a connect picks a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    direction: DenyDirection,
    /// A staged policy's count (`Some((cluster policy?, would_allow))`) is another line than
    /// the flow's drop.
    staged: Option<(bool, bool)>,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dst_port: Option<u16>,
}

/// Tokens are counted in billionths so refills over nanoseconds are exact integers.
const TOKEN: u128 = 1_000_000_000;

/// Decides which logged packets become log lines. See the module docs.
#[derive(Debug)]
pub struct DenyLogger {
    config: DenyLogConfig,
    /// When each remembered flow was last logged.
    flows: HashMap<FlowKey, Instant>,
    /// The same flows, oldest first, so expiry and eviction never scan the table.
    by_age: VecDeque<(Instant, FlowKey)>,
    tokens: u128,
    last_refill: Option<Instant>,
    /// Latest time seen; earlier times are treated as this one so a caller's clock can
    /// never make the age order lie.
    latest: Option<Instant>,
}

impl DenyLogger {
    pub fn new(config: DenyLogConfig) -> Self {
        let config = DenyLogConfig {
            // With no room at all, dedup would silently stop working; one flow is the least.
            max_flows: config.max_flows.max(1),
            ..config
        };
        Self {
            tokens: u128::from(config.burst) * TOKEN,
            config,
            flows: HashMap::new(),
            by_age: VecDeque::new(),
            last_refill: None,
            latest: None,
        }
    }

    pub fn config(&self) -> &DenyLogConfig {
        &self.config
    }

    /// Flows currently remembered; never more than `max_flows`.
    pub fn tracked_flows(&self) -> usize {
        self.flows.len()
    }

    /// Decide about one logged packet seen at `now`. `resolve` maps an address to
    /// `"ns/pod"`; it is only called for packets that are logged.
    pub fn observe(
        &mut self,
        now: Instant,
        pkt: &LoggedPacket,
        resolve: &dyn Fn(IpAddr) -> Option<String>,
    ) -> Verdict {
        let now = match self.latest {
            Some(latest) if now < latest => latest,
            _ => now,
        };
        self.latest = Some(now);
        self.expire(now);
        self.refill(now);

        let Ok(target) = parse_log_prefix(&pkt.prefix) else {
            return Verdict::Suppressed(SuppressReason::Unparseable);
        };
        let key = FlowKey {
            direction: target.direction(),
            staged: match &target {
                LogTarget::Staged(t) => Some((false, t.would_allow)),
                LogTarget::StagedCnp(t) => Some((true, t.would_allow)),
                _ => None,
            },
            src: pkt.src,
            dst: pkt.dst,
            protocol: pkt.protocol,
            dst_port: pkt.dst_port,
        };
        if self.flows.contains_key(&key) {
            return Verdict::Suppressed(SuppressReason::Dedup);
        }
        if self.tokens < TOKEN {
            // Not remembered: a flood of new flows must not fill the table, and a flow that
            // keeps trying gets its line once the budget allows.
            return Verdict::Suppressed(SuppressReason::RateLimit);
        }
        self.tokens -= TOKEN;
        self.remember(key, now);

        let describe = |ip: IpAddr| resolve(ip).unwrap_or_else(|| "external".to_string());
        let local_pod = |direction: DenyDirection| {
            let local = match direction {
                DenyDirection::Ingress => pkt.dst,
                DenyDirection::Egress => pkt.src,
            };
            resolve(local)
                .and_then(|p| {
                    p.split_once('/')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                })
                .unwrap_or_else(|| ("unknown".to_string(), "unknown".to_string()))
        };
        let mut staged_cnp = None;
        let (direction, namespace, pod, cnp, staged) = match target {
            LogTarget::Pod(t) => (t.direction, t.namespace, t.pod, None, None),
            LogTarget::Cnp(t) => {
                let (ns, name) = local_pod(t.direction);
                (t.direction, ns, name, Some(Box::new(t)), None)
            }
            LogTarget::Staged(t) => {
                let (ns, name) = local_pod(t.direction);
                (t.direction, ns, name, None, Some(Box::new(t)))
            }
            LogTarget::StagedCnp(t) => {
                let (ns, name) = local_pod(t.direction);
                let d = t.direction;
                staged_cnp = Some(Box::new(t));
                (d, ns, name, None, None)
            }
        };
        Verdict::Log(DeniedConnection {
            direction,
            namespace,
            pod,
            cnp,
            staged,
            staged_cnp,
            src: describe(pkt.src),
            dst: describe(pkt.dst),
            src_ip: pkt.src,
            dst_ip: pkt.dst,
            protocol: protocol_name(pkt.protocol),
            dst_port: pkt.dst_port,
        })
    }

    /// Forget flows whose window has passed: they would be logged again anyway.
    fn expire(&mut self, now: Instant) {
        while let Some(&(logged_at, key)) = self.by_age.front() {
            if now.duration_since(logged_at) < self.config.dedup_window {
                break;
            }
            self.by_age.pop_front();
            self.forget(logged_at, key);
        }
    }

    fn remember(&mut self, key: FlowKey, now: Instant) {
        while self.flows.len() >= self.config.max_flows {
            let Some((logged_at, oldest)) = self.by_age.pop_front() else {
                break;
            };
            self.forget(logged_at, oldest);
        }
        self.flows.insert(key, now);
        self.by_age.push_back((now, key));
    }

    fn forget(&mut self, logged_at: Instant, key: FlowKey) {
        // Each remembered flow has exactly one queue entry; the check only guards that
        // invariant rather than relying on it.
        if self.flows.get(&key) == Some(&logged_at) {
            self.flows.remove(&key);
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last_refill {
            let earned = now
                .duration_since(last)
                .as_nanos()
                .saturating_mul(u128::from(self.config.rate_per_sec));
            let capacity = u128::from(self.config.burst) * TOKEN;
            self.tokens = self.tokens.saturating_add(earned).min(capacity);
        }
        self.last_refill = Some(now);
    }
}

/// Decimal spellings of 0..=255 back to back, so any protocol number has a `&'static str`
/// without allocating: 0-9 take one digit each, 10-99 two, 100-255 three.
const DECIMALS: &str = concat!(
    "012345678910111213141516171819202122232425262728293031323334353637383940414243444546474849",
    "505152535455565758596061626364656667686970717273747576777879808182838485868788899091929394",
    "959697989910010110210310410510610710810911011111211311411511611711811912012112212312412512",
    "612712812913013113213313413513613713813914014114214314414514614714814915015115215315415515",
    "615715815916016116216316416516616716816917017117217317417517617717817918018118218318418518",
    "618718818919019119219319419519619719819920020120220320420520620720820921021121221321421521",
    "621721821922022122222322422522622722822923023123223323423523623723823924024124224324424524",
    "6247248249250251252253254255",
);

/// Name of an IP protocol for log lines.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        1 => "ICMP",
        6 => "TCP",
        17 => "UDP",
        58 => "ICMPv6",
        132 => "SCTP",
        n => {
            let n = usize::from(n);
            let (start, len) = match n {
                0..=9 => (n, 1),
                10..=99 => (10 + (n - 10) * 2, 2),
                _ => (190 + (n - 100) * 3, 3),
            };
            DECIMALS.get(start..start + len).unwrap_or("unknown")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn pkt(prefix: &str, src: [u8; 4], dst: [u8; 4], protocol: u8, dst_port: u16) -> LoggedPacket {
        LoggedPacket {
            prefix: prefix.to_string(),
            src: Ipv4Addr::from(src).into(),
            dst: Ipv4Addr::from(dst).into(),
            protocol,
            src_port: Some(40000),
            dst_port: Some(dst_port),
        }
    }

    /// A packet of the `i`-th distinct flow.
    fn distinct(i: u32) -> LoggedPacket {
        let b = i.to_be_bytes();
        pkt(
            "knp:ingress:prod/web",
            [10, b[1], b[2], b[3]],
            [10, 9, 9, 9],
            6,
            80,
        )
    }

    fn no_pods(_: IpAddr) -> Option<String> {
        None
    }

    fn config(window_secs: u64, rate: u32, burst: u32, max_flows: usize) -> DenyLogConfig {
        DenyLogConfig {
            dedup_window: Duration::from_secs(window_secs),
            rate_per_sec: rate,
            burst,
            max_flows,
        }
    }

    /// Feed `(offset from start, packet)` pairs; count logged lines and suppressions.
    fn run(logger: &mut DenyLogger, packets: &[(Duration, LoggedPacket)]) -> Counts {
        let start = Instant::now();
        let mut counts = Counts::default();
        for (offset, p) in packets {
            match logger.observe(start + *offset, p, &no_pods) {
                Verdict::Log(_) => counts.logged += 1,
                Verdict::Suppressed(SuppressReason::Dedup) => counts.dedup += 1,
                Verdict::Suppressed(SuppressReason::RateLimit) => counts.rate += 1,
                Verdict::Suppressed(SuppressReason::Unparseable) => counts.unparseable += 1,
            }
            assert!(logger.tracked_flows() <= logger.config().max_flows);
        }
        counts
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    struct Counts {
        logged: usize,
        dedup: usize,
        rate: usize,
        unparseable: usize,
    }

    fn counts(logged: usize, dedup: usize, rate: usize, unparseable: usize) -> Counts {
        Counts {
            logged,
            dedup,
            rate,
            unparseable,
        }
    }

    fn every(
        step: Duration,
        packets: impl IntoIterator<Item = LoggedPacket>,
    ) -> Vec<(Duration, LoggedPacket)> {
        packets
            .into_iter()
            .enumerate()
            .map(|(i, p)| (step * i as u32, p))
            .collect()
    }

    #[test]
    fn logger_cases() {
        let udp = pkt("knp:ingress:prod/web", [10, 0, 0, 1], [10, 0, 0, 2], 17, 53);
        let tcp = pkt("knp:ingress:prod/web", [10, 0, 0, 1], [10, 0, 0, 2], 6, 443);
        let other_src_port = LoggedPacket {
            src_port: Some(1),
            ..udp.clone()
        };
        let egress = LoggedPacket {
            prefix: "knp:egress:prod/web".to_string(),
            ..udp.clone()
        };
        let ms = Duration::from_millis(1);
        // (name, config, packets at offsets from the start, expected verdict counts)
        type Case = (
            &'static str,
            DenyLogConfig,
            Vec<(Duration, LoggedPacket)>,
            Counts,
        );
        let cases: Vec<Case> = vec![
            (
                "one flow of 1000 packets logs once",
                config(10, 100, 100, 1000),
                every(ms, std::iter::repeat_n(udp.clone(), 1000)),
                counts(1, 999, 0, 0),
            ),
            (
                "two interleaved flows log twice",
                config(10, 100, 100, 1000),
                every(
                    ms,
                    [udp.clone(), tcp.clone()].into_iter().cycle().take(1000),
                ),
                counts(2, 998, 0, 0),
            ),
            (
                "a new source port is the same flow",
                config(10, 100, 100, 1000),
                every(ms, [udp.clone(), other_src_port.clone()]),
                counts(1, 1, 0, 0),
            ),
            (
                "direction is part of the flow",
                config(10, 100, 100, 1000),
                every(ms, [udp.clone(), egress.clone()]),
                counts(2, 0, 0, 0),
            ),
            (
                "after the window the flow logs again",
                config(10, 100, 100, 1000),
                vec![
                    (Duration::ZERO, udp.clone()),
                    (Duration::from_millis(9_999), udp.clone()),
                    (Duration::from_secs(10), udp.clone()),
                    (Duration::from_millis(10_001), udp.clone()),
                    (Duration::from_secs(25), udp.clone()),
                ],
                counts(3, 2, 0, 0),
            ),
            (
                "a flood of 10000 new flows in one second stays within rate and burst",
                config(10, 100, 100, 100_000),
                every(Duration::from_micros(100), (0..10_000).map(distinct)),
                // 100 from the burst, then one per 10 ms for the remaining 0.9999 s.
                counts(199, 0, 9_801, 0),
            ),
            (
                "a rate-limited flow logs once tokens return",
                config(10, 1, 1, 100),
                vec![
                    (Duration::ZERO, udp.clone()),
                    (Duration::from_millis(10), tcp.clone()),
                    (Duration::from_millis(500), tcp.clone()),
                    (Duration::from_millis(1000), tcp.clone()),
                    (Duration::from_millis(1001), tcp.clone()),
                ],
                counts(2, 1, 2, 0),
            ),
            (
                "burst caps what idle time saves up",
                config(10, 100, 5, 1000),
                vec![(Duration::from_secs(5), udp.clone())]
                    .into_iter()
                    .chain((1..=20).map(|i| (Duration::from_secs(6), distinct(i))))
                    .collect(),
                counts(6, 0, 15, 0),
            ),
            (
                "foreign and malformed prefixes are unparseable",
                config(10, 100, 100, 1000),
                every(
                    ms,
                    [
                        "",
                        "DROP ",
                        "knp:sideways:a/b",
                        "knp:ingress:ab",
                        "knp:ingress:A/b",
                    ]
                    .into_iter()
                    .map(|prefix| LoggedPacket {
                        prefix: prefix.to_string(),
                        ..udp.clone()
                    }),
                ),
                counts(0, 0, 0, 5),
            ),
            (
                "zero rate logs only the burst",
                config(10, 0, 3, 1000),
                every(Duration::from_secs(1), (0..10).map(distinct)),
                counts(3, 0, 7, 0),
            ),
        ];
        for (name, config, packets, want) in cases {
            let mut logger = DenyLogger::new(config);
            assert_eq!(run(&mut logger, &packets), want, "case {name:?}");
        }
    }

    #[test]
    fn flow_table_is_bounded_and_expires() {
        let mut logger = DenyLogger::new(config(10, 1_000_000, 1_000_000, 50));
        let counts = run(
            &mut logger,
            &every(Duration::from_micros(10), (0..10_000).map(distinct)),
        );
        assert_eq!(counts.logged, 10_000);
        assert_eq!(logger.tracked_flows(), 50);

        // The 50 newest are remembered, so repeats of them are deduplicated …
        let start = Instant::now();
        let newest = distinct(9_999);
        assert_eq!(
            logger.observe(start, &newest, &no_pods),
            Verdict::Suppressed(SuppressReason::Dedup)
        );
        // … and once the window has passed, all of them are gone.
        let later = start + Duration::from_secs(11);
        assert!(matches!(
            logger.observe(later, &distinct(0), &no_pods),
            Verdict::Log(_)
        ));
        assert_eq!(logger.tracked_flows(), 1);
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let mut logger = DenyLogger::new(config(10, 100, 100, 10));
        let start = Instant::now() + Duration::from_secs(100);
        let udp = distinct(1);
        assert!(matches!(
            logger.observe(start, &udp, &no_pods),
            Verdict::Log(_)
        ));
        let earlier = start - Duration::from_secs(50);
        assert_eq!(
            logger.observe(earlier, &udp, &no_pods),
            Verdict::Suppressed(SuppressReason::Dedup)
        );
        assert!(matches!(
            logger.observe(earlier, &distinct(2), &no_pods),
            Verdict::Log(_)
        ));
    }

    #[test]
    fn logged_line_contents() {
        let client: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let resolve = move |ip: IpAddr| (ip == client).then(|| "shop/client".to_string());
        let mut logger = DenyLogger::new(DenyLogConfig::default());
        let now = Instant::now();

        let v4 = pkt("knp:ingress:prod/web", [10, 0, 0, 1], [10, 0, 0, 2], 6, 443);
        let want = DeniedConnection {
            direction: DenyDirection::Ingress,
            namespace: "prod".to_string(),
            pod: "web".to_string(),
            src: "shop/client".to_string(),
            dst: "external".to_string(),
            src_ip: client,
            dst_ip: Ipv4Addr::new(10, 0, 0, 2).into(),
            protocol: "TCP",
            dst_port: Some(443),
            cnp: None,
            staged: None,
            staged_cnp: None,
        };
        assert_eq!(logger.observe(now, &v4, &resolve), Verdict::Log(want));

        // A staged policy's count: the policy and the change from the prefix, the local pod
        // from the packet; a separate line from the same flow's drop (not deduplicated away).
        let staged = pkt(
            "knps:egress:would-deny:shop/lock-down",
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            6,
            443,
        );
        match logger.observe(now, &staged, &resolve) {
            Verdict::Log(line) => {
                assert_eq!(
                    (line.namespace.as_str(), line.pod.as_str()),
                    ("shop", "client")
                );
                let t = line.staged.expect("a staged line");
                assert_eq!(
                    (t.namespace.as_str(), t.policy.as_str(), t.would_allow),
                    ("shop", "lock-down", false)
                );
                assert!(line.cnp.is_none());
            }
            other => panic!("expected a staged line, got {other:?}"),
        }

        // A ClusterNetworkPolicy Deny: the rule from the prefix, the local pod from the packet.
        let denied = pkt(
            "knpc:egress:admin:2:no-metadata",
            [10, 0, 0, 1],
            [169, 254, 169, 254],
            6,
            80,
        );
        match logger.observe(now, &denied, &resolve) {
            Verdict::Log(line) => {
                assert_eq!(
                    (line.namespace.as_str(), line.pod.as_str()),
                    ("shop", "client")
                );
                assert_eq!(line.dst, "external");
                let cnp = line.cnp.expect("a ClusterNetworkPolicy line");
                assert_eq!(
                    (cnp.policy.as_str(), cnp.tier, cnp.index),
                    ("no-metadata", crate::model::Tier::Admin, 2)
                );
            }
            other => panic!("{other:?}"),
        }

        let v6 = LoggedPacket {
            prefix: "knp:egress:kube-system/coredns-5d78c9869d-abcde".to_string(),
            src: Ipv6Addr::LOCALHOST.into(),
            dst: Ipv6Addr::UNSPECIFIED.into(),
            protocol: 58,
            src_port: None,
            dst_port: None,
        };
        let Verdict::Log(line) = logger.observe(now, &v6, &resolve) else {
            panic!("an ICMPv6 flow should be logged");
        };
        assert_eq!(line.direction, DenyDirection::Egress);
        assert_eq!(line.namespace, "kube-system");
        assert_eq!(line.pod, "coredns-5d78c9869d-abcde");
        assert_eq!(
            (line.src.as_str(), line.dst.as_str()),
            ("external", "external")
        );
        assert_eq!((line.protocol, line.dst_port), ("ICMPv6", None));
    }

    #[test]
    fn protocol_names() {
        let cases = [
            (1, "ICMP"),
            (6, "TCP"),
            (17, "UDP"),
            (58, "ICMPv6"),
            (132, "SCTP"),
            (0, "0"),
            (47, "47"),
            (255, "255"),
        ];
        for (number, want) in cases {
            assert_eq!(protocol_name(number), want, "protocol {number}");
        }
        for number in 0..=255u8 {
            let name = protocol_name(number);
            if !name.starts_with(|c: char| c.is_ascii_uppercase()) {
                assert_eq!(name, number.to_string(), "protocol {number}");
            }
        }
    }
}
