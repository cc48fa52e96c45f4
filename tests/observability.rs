//! What an operator sees, end to end: the real `kube-nftpolicy run` binary, running inside the
//! node namespace of a network-namespace cluster in manifests mode, scraped over real HTTP
//! while real packets cross the node.
//!
//! Each test builds a one-node cluster (pods `web`, `client`, `other` in `default`), starts
//! the agent with `ip netns exec <node> kube-nftpolicy run --manifests <tempdir> …`, captures
//! its stderr in a file and stops it with SIGTERM when the test ends (a drop guard, so a failed
//! assertion still stops it and prints the end of its log). HTTP requests are written by hand
//! on a `TcpStream` from a thread inside the node namespace (HTTP/1.1, `Connection: close`).
//! Every wait polls against a deadline; fixed sleeps appear only where the test must show that
//! something does *not* happen.
//!
//! Proven here:
//! - `/readyz` stays 503 (and nothing is programmed) until the manifests can be read, then
//!   turns 200, and the policy is enforced by then; `/healthz` is 200 throughout;
//! - the drop counters in `/metrics` equal the packets the kernel dropped, to the packet and
//!   to the byte, ignore allowed traffic, and disappear with the pod;
//! - the exposition passes `promtool check metrics`, and docs/metrics.md documents exactly
//!   the families the agent exports, with the right types and labels;
//! - sync metrics move on a change, gauges describe the programmed table, and no label ever
//!   carries an address or a port;
//! - `--log-denied` writes one line per denied connection (not per packet), names both pods,
//!   the port, the protocol and the isolating policy, and stays within its rate limit under a
//!   flood of distinct flows, with every logged packet accounted for in the metrics;
//! - failed syncs and drift repairs are counted, and failed syncs keep `/readyz` at 503;
//! - the monitoring kit in deploy/monitoring/: its rules pass `promtool check rules` and
//!   `promtool test rules`, and a real Prometheus in the node namespace scrapes the agent,
//!   answers PromQL about real drops, runs every dashboard query, and fires
//!   `KubeNftpolicySyncFailing` when the agent's syncs are made to fail.
//!
//! Two are regression tests of fixed agent bugs (see their doc comments):
//! `denied_connection_series_end_with_the_pod` and
//! `log_has_no_terminal_escapes_when_not_a_terminal`.

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kernel::{pod_yaml, serial};
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe};

const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");
const PROMTOOL: &str = "/usr/bin/promtool";
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
const NODE: &str = "node-1";
/// The admin address inside the node namespace (each cluster has its own loopback).
const ADMIN: &str = "127.0.0.1:9753";
/// `--counters-interval-s`.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// Longer than any read-back cycle: counters are read every second, manifests polled every
/// 100 ms; a change takes well under a second to reach the kernel and the scrape.
const SETTLE: Duration = Duration::from_millis(2_500);
/// Upper bound for anything the agent does asynchronously.
const DEADLINE: Duration = Duration::from_secs(20);
/// Per-probe timeout.
const T: Duration = Duration::from_millis(600);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// `DenyLogConfig::default()` (src/denylog.rs): 100 lines back to back, then 20 per second.
const LOG_BURST: f64 = 100.0;
const LOG_RATE_PER_SEC: f64 = 20.0;
/// Payload of every test datagram; an IPv4 UDP packet is then 20 + 8 + 100 bytes.
const PAYLOAD: usize = 100;
const IPV4_UDP_PACKET: f64 = (20 + 8 + PAYLOAD) as f64;

const DROPPED_PACKETS: &str = "kube_nftpolicy_dropped_packets_total";
const DROPPED_BYTES: &str = "kube_nftpolicy_dropped_bytes_total";
const DENIED: &str = "kube_nftpolicy_denied_connections_total";
/// Families exported only by an agent in audit mode (`--audit`), checked against the doc by
/// `audit_mode_counts_would_drops_and_logs_would_deny` rather than by the default scrape.
const AUDIT_ONLY: [&str; 3] = [
    "kube_nftpolicy_would_drop_packets_total",
    "kube_nftpolicy_cnp_would_deny_packets_total",
    "kube_nftpolicy_unknown_address_would_drops_total",
];
/// Families with series only while a staged policy selects a pod of the node, checked by
/// `staged_policies_count_and_log_the_connections_they_would_change`.
const STAGED_ONLY: [&str; 5] = [
    STAGED_WOULD_DENY,
    STAGED_WOULD_ALLOW,
    CNP_STAGED_WOULD_DENY,
    CNP_STAGED_WOULD_ALLOW,
    CNP_STAGED_UNMEASURED,
];
const CNP_STAGED_WOULD_DENY: &str = "kube_nftpolicy_cnp_staged_would_deny_total";
const CNP_STAGED_WOULD_ALLOW: &str = "kube_nftpolicy_cnp_staged_would_allow_total";
const CNP_STAGED_UNMEASURED: &str = "kube_nftpolicy_cnp_staged_unmeasured";
const STAGED_WOULD_DENY: &str = "kube_nftpolicy_staged_would_deny_total";
const STAGED_WOULD_ALLOW: &str = "kube_nftpolicy_staged_would_allow_total";
const WOULD_DROP: &str = "kube_nftpolicy_would_drop_packets_total";
const SUPPRESSED: &str = "kube_nftpolicy_denied_log_suppressed_total";
const WEB_INGRESS: [(&str, &str); 3] = [
    ("direction", "ingress"),
    ("namespace", "default"),
    ("pod", "web"),
];

const WEB_ALLOWS_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allows-client, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n";
const DENY_ALL_INGRESS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all-ingress, namespace: default}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";

// ───────────────────────────── cluster and manifests ─────────────────────────────

/// One node; `web` serves TCP 80 and UDP 53, `client` and `other` are its peers.
fn cluster() -> Cluster {
    Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node(NODE)
            .pod(NODE, "default", "web", &[80], &[53])
            .pod(NODE, "default", "client", &[80], &[53])
            .pod(NODE, "default", "other", &[80], &[53]),
    )
}

/// The namespace, the harness pods named in `pods` (labelled `app: <name>`), and `policies`.
fn manifests(c: &Cluster, pods: &[&str], policies: &str) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    for p in c.pods().iter().filter(|p| pods.contains(&p.name.as_str())) {
        let labels = BTreeMap::from([("app".to_string(), p.name.clone())]);
        out.push_str(&pod_yaml(p, &labels));
    }
    out.push_str(policies);
    out
}

const ALL_PODS: &[&str] = &["web", "client", "other"];

fn pod(name: &str) -> Endpoint {
    Endpoint::pod("default", name)
}

fn web(c: &Cluster, family: Family) -> IpAddr {
    c.pod_ip("default", "web", family)
}

/// Sends one datagram of [`PAYLOAD`] bytes to each port, all from one socket of pod `from`
/// (so every datagram has the same source port).
fn send_udp(c: &Cluster, from: &str, to: IpAddr, ports: Vec<u16>) {
    c.run_in(pod(from), move || {
        let any: IpAddr = match to {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind");
        let payload = [b'x'; PAYLOAD];
        for port in ports {
            let sent = socket.send_to(&payload, (to, port)).expect("send");
            assert_eq!(sent, PAYLOAD);
        }
    });
}

/// Sends `count` datagrams of [`PAYLOAD`] bytes to `to:port`, each from a new socket (so each
/// has a new source port).
fn send_udp_from_new_sockets(c: &Cluster, from: &str, to: SocketAddr, count: usize) {
    c.run_in(pod(from), move || {
        let any: IpAddr = match to {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        // All stay open until the end, so no source port is reused.
        let sockets: Vec<UdpSocket> = (0..count)
            .map(|_| UdpSocket::bind(SocketAddr::new(any, 0)).expect("bind"))
            .collect();
        let ports: BTreeSet<u16> = sockets
            .iter()
            .map(|s| s.local_addr().expect("local addr").port())
            .collect();
        assert_eq!(ports.len(), count, "every datagram has its own source port");
        for socket in &sockets {
            let sent = socket.send_to(&[b'x'; PAYLOAD], to).expect("send");
            assert_eq!(sent, PAYLOAD);
        }
    });
}

/// A TCP connect from pod `from`; the error if it does not complete within `timeout`.
fn tcp_connect(c: &Cluster, from: &str, to: SocketAddr, timeout: Duration) -> io::Result<()> {
    c.run_in(pod(from), move || {
        TcpStream::connect_timeout(&to, timeout).map(|_| ())
    })
}

/// Allowed traffic from `client` to `web`, both families, both protocols.
fn allowed_probes(c: &Cluster) -> Vec<Probe> {
    Family::BOTH
        .into_iter()
        .flat_map(|f| {
            [
                Probe::tcp(pod("client"), web(c, f), 80),
                Probe::udp(pod("client"), web(c, f), 53),
            ]
        })
        .collect()
}

fn list_table(c: &Cluster) -> Option<String> {
    kernel::try_list_table(c, NODE)
}

/// Polls `check` until it returns `Ok`, or panics with its last complaint after `within`.
fn wait_until<T>(what: &str, within: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {within:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ───────────────────────────── the agent process ─────────────────────────────

/// The agent running in the node namespace. Borrowing the cluster makes sure the agent is
/// stopped before the namespaces are deleted.
struct Agent<'c> {
    cluster: &'c Cluster,
    child: RefCell<Child>,
    manifests: tempfile::TempDir,
    logs: tempfile::TempDir,
}

impl<'c> Agent<'c> {
    /// Starts the agent (with `manifests` written first, if any) and waits until it serves
    /// HTTP.
    fn start(cluster: &'c Cluster, manifests: Option<&str>, extra_args: &[&str]) -> Agent<'c> {
        Agent::start_with(cluster, manifests, extra_args, true)
    }

    /// [`start`](Self::start), with `NO_COLOR=1` in the agent's environment or not. The agent
    /// colours its log even when stderr is not a terminal (see
    /// `log_has_no_terminal_escapes_when_not_a_terminal`), so the other tests set it.
    fn start_with(
        cluster: &'c Cluster,
        manifests: Option<&str>,
        extra_args: &[&str],
        no_color: bool,
    ) -> Agent<'c> {
        let dir = tempfile::tempdir().expect("manifests tempdir");
        let logs = tempfile::tempdir().expect("logs tempdir");
        if let Some(text) = manifests {
            write_manifests(dir.path(), text);
        }
        let stderr = File::create(logs.path().join("agent.stderr")).expect("stderr file");
        let ns = cluster.netns_name(Endpoint::node(NODE));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns, BIN, "run", "--node-name", NODE])
            .arg("--manifests")
            .arg(dir.path())
            .args(["--manifests-poll-ms", "100", "--metrics-addr", ADMIN])
            .args([
                "--counters-interval-s",
                &COUNTERS_INTERVAL.as_secs().to_string(),
            ])
            .args(extra_args)
            // The agent's own default filter, as operators get it.
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if no_color {
            command.env("NO_COLOR", "1");
        }
        let child = command
            .spawn()
            .expect("spawn ip netns exec kube-nftpolicy run");
        let agent = Agent {
            cluster,
            child: RefCell::new(child),
            manifests: dir,
            logs,
        };
        wait_until("the admin server", DEADLINE, || {
            agent.try_get("/healthz").map_err(|e| e.to_string())
        });
        agent
    }

    /// Replaces the manifests atomically (the agent never sees a half-written file).
    fn write_manifests(&self, text: &str) {
        write_manifests(self.manifests.path(), text);
    }

    /// The agent's stderr so far, without terminal colour codes.
    fn stderr(&self) -> String {
        strip_ansi(&self.raw_stderr())
    }

    /// The agent's stderr so far, byte for byte.
    fn raw_stderr(&self) -> String {
        let raw = fs::read(self.logs.path().join("agent.stderr")).unwrap_or_default();
        String::from_utf8_lossy(&raw).into_owned()
    }

    fn wait_log(&self, needle: &str) {
        wait_until(&format!("{needle:?} in the agent's log"), DEADLINE, || {
            let log = self.stderr();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(tail(&log, 5))
            }
        });
    }

    /// Panics with the log if the agent has exited.
    fn assert_running(&self) {
        if let Ok(Some(status)) = self.child.borrow_mut().try_wait() {
            panic!(
                "the agent exited ({status}); its log:\n{}",
                tail(&self.stderr(), 60)
            );
        }
    }

    fn try_get(&self, path: &str) -> io::Result<Reply> {
        self.assert_running();
        let addr: SocketAddr = ADMIN.parse().expect("admin address");
        let path = path.to_string();
        self.cluster
            .run_in_node(NODE, move || http_get(addr, &path))
    }

    fn get(&self, path: &str) -> Reply {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    fn scrape(&self) -> Scrape {
        let reply = self.get("/metrics");
        assert_eq!(reply.status, 200, "/metrics: {}", reply.body);
        Scrape::parse(&reply.body)
    }

    /// Scrapes until `check` accepts a scrape; returns that scrape.
    fn wait_scrape(
        &self,
        what: &str,
        mut check: impl FnMut(&Scrape) -> Result<(), String>,
    ) -> Scrape {
        wait_until(what, DEADLINE, || {
            let s = self.scrape();
            check(&s).map(|()| s)
        })
    }

    fn wait_ready(&self) -> Duration {
        let start = Instant::now();
        wait_until("/readyz 200", DEADLINE, || {
            let r = self.get("/readyz");
            if r.status == 200 {
                Ok(())
            } else {
                Err(format!("{} {}", r.status, r.body))
            }
        });
        start.elapsed()
    }

    /// SIGTERM, then the exit status (SIGKILL after 10 s).
    fn stop(&self) -> ExitStatus {
        let mut child = self.child.borrow_mut();
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: plain syscall. `pid` is our child and has not been reaped (only `try_wait`
        // and `wait` reap it), so it cannot have been reused by another process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().expect("wait for the agent")
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        let status = self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- agent ({status}), last lines of its log ---\n{}",
                tail(&self.stderr(), 80)
            );
        }
    }
}

fn write_manifests(dir: &Path, text: &str) {
    // The agent only reads *.yaml, *.yml and *.json, so the temporary name is invisible to it.
    let tmp = dir.join("cluster.tmp");
    fs::write(&tmp, text).expect("write manifests");
    fs::rename(&tmp, dir.join("cluster.yaml")).expect("rename manifests");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes `ESC [ … <letter>` sequences, in case the agent's logger colours its output.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

// ───────────────────────────── HTTP ─────────────────────────────

#[derive(Debug)]
struct Reply {
    status: u16,
    /// Header lines, lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` as Prometheus and the kubelet send it, on a fresh connection.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_reply(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn parse_reply(raw: &[u8]) -> Result<Reply, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or("truncated chunk size".to_string())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or("truncated chunk".to_string())?;
        out.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or("chunk without CRLF".to_string())?;
    }
}

// ───────────────────────────── the exposition format ─────────────────────────────

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape (text format 0.0.4).
#[derive(Debug)]
struct Scrape {
    text: String,
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            text: text.to_string(),
            help: BTreeMap::new(),
            types: BTreeMap::new(),
            samples: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                scrape.help.insert(name.to_string(), help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("TYPE without a type: {line:?}"));
                scrape.types.insert(name.to_string(), ty.to_string());
            } else if line.starts_with('#') {
                continue;
            } else {
                scrape
                    .samples
                    .push(parse_sample(line).unwrap_or_else(|e| panic!("sample {line:?}: {e}")));
            }
        }
        scrape
    }

    /// The value of the sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`get`](Self::get), for a sample that must be there.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape:\n{}", self.text))
    }

    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The family a sample belongs to (`x_bucket`, `x_sum`, `x_count` of a histogram `x`).
    fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if self.types.get(base).is_some_and(|t| t == "histogram") {
                    return base;
                }
            }
        }
        sample
    }

    /// Label names used by each family's samples, without histogram `le`.
    fn label_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in &self.samples {
            out.entry(self.family_of(&s.name).to_string())
                .or_default()
                .extend(s.labels.keys().filter(|k| *k != "le").cloned());
        }
        out
    }

    /// The sample lines of some metrics, for messages and for the doc.
    fn excerpt(&self, names: &[&str]) -> String {
        self.text
            .lines()
            .filter(|l| {
                names.iter().any(|n| {
                    l.starts_with(&format!("{n}{{"))
                        || l.starts_with(&format!("{n} "))
                        || l.starts_with(&format!("# HELP {n} "))
                        || l.starts_with(&format!("# TYPE {n} "))
                })
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("no value after the metric name")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices();
        loop {
            // A label name, `=`, a quoted value, then `,` or `}`.
            let mut key = String::new();
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.is_empty() => {
                        closed = true;
                        break;
                    }
                    ',' | ' ' if key.is_empty() => continue,
                    c => key.push(c),
                }
            }
            if closed {
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => {
                    rest = &after_brace[i + 1..];
                    break;
                }
                other => return Err(format!("unexpected {other:?} after a label value")),
            }
        }
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = value_text
        .parse::<f64>()
        .map_err(|e| format!("value {value_text:?}: {e}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Label names that would mean an address or a port is exported.
const ADDRESS_LABEL_NAMES: [&str; 12] = [
    "ip", "src_ip", "dst_ip", "address", "addr", "src", "dst", "peer", "cidr", "port", "src_port",
    "dst_port",
];

/// Why `value` looks like an IP address (v4 or v6, with or without port or prefix length) or a
/// port, if it does. Label values are split into runs of `[0-9a-fA-F.:]` and each run is
/// parsed, which is stricter than any regex over the text: only real addresses match.
fn address_or_port(value: &str) -> Option<String> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!("{value:?} is a number (a port?)"));
    }
    for run in value.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':')) {
        if run.parse::<IpAddr>().is_ok() {
            return Some(format!("{value:?} contains the address {run}"));
        }
        if let Some((host, port)) = run.rsplit_once(':') {
            let numeric_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            if numeric_port && (host.is_empty() || host.parse::<IpAddr>().is_ok()) {
                return Some(format!("{value:?} contains the port {run}"));
            }
        }
    }
    None
}

/// No label of any series names an address or a port (histogram `le` bounds are numbers by
/// design and are the only exception).
fn assert_no_addresses_in_labels(scrape: &Scrape) {
    let mut bad = Vec::new();
    for s in &scrape.samples {
        for (k, v) in &s.labels {
            if k == "le" {
                continue;
            }
            if ADDRESS_LABEL_NAMES.contains(&k.as_str()) {
                bad.push(format!("{}: label name {k}", s.name));
            }
            if let Some(why) = address_or_port(v) {
                bad.push(format!("{}: {k}={why}", s.name));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "labels carry addresses or ports:\n{}\n{}",
        bad.join("\n"),
        scrape.text
    );
}

// ───────────────────────────── docs/metrics.md ─────────────────────────────

#[derive(Debug)]
struct DocMetric {
    kind: String,
    labels: BTreeSet<String>,
}

/// Every metric documented in docs/metrics.md: a `### \`name\`` heading followed by
/// `- **Type:** <type>` and `- **Labels:** \`a\`, \`b\`` (or `none`).
type DocEntry = (String, Option<String>, Option<BTreeSet<String>>);

fn finish_doc_entry(entry: Option<DocEntry>, out: &mut BTreeMap<String, DocMetric>) {
    if let Some((name, kind, labels)) = entry {
        let kind = kind.unwrap_or_else(|| panic!("{DOC}: {name} has no **Type:** line"));
        let labels = labels.unwrap_or_else(|| panic!("{DOC}: {name} has no **Labels:** line"));
        assert!(
            out.insert(name.clone(), DocMetric { kind, labels })
                .is_none(),
            "{DOC}: {name} is documented twice"
        );
    }
}

fn documented_metrics() -> BTreeMap<String, DocMetric> {
    let doc = fs::read_to_string(DOC).unwrap_or_else(|e| panic!("reading {DOC}: {e}"));
    let mut out = BTreeMap::new();
    let mut current: Option<DocEntry> = None;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            finish_doc_entry(current.take(), &mut out);
            let name = heading.trim().trim_matches('`');
            if name.starts_with("kube_nftpolicy_") {
                current = Some((name.to_string(), None, None));
            }
        } else if line.starts_with("## ") {
            finish_doc_entry(current.take(), &mut out);
        } else if let Some((_, kind, labels)) = current.as_mut() {
            if let Some(rest) = line.strip_prefix("- **Type:**") {
                *kind = Some(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("- **Labels:**") {
                *labels = Some(
                    rest.split('`')
                        .skip(1)
                        .step_by(2)
                        .map(String::from)
                        .collect(),
                );
            }
        }
    }
    finish_doc_entry(current.take(), &mut out);
    assert!(!out.is_empty(), "{DOC} documents no metric");
    out
}

// ───────────────────────────── the denied-connection log ─────────────────────────────

/// One "denied connection" line of the agent's log, with its `key=value` fields.
#[derive(Debug, Clone)]
struct DenyLine {
    raw: String,
    fields: BTreeMap<String, String>,
}

fn deny_lines(log: &str) -> Vec<DenyLine> {
    log.lines()
        .filter_map(|l| {
            let (_, fields) = l.split_once(" denied connection")?;
            Some(DenyLine {
                raw: l.to_string(),
                fields: parse_fields(fields),
            })
        })
        .collect()
}

/// `a="quoted \" value" b=plain` → {a: quoted " value, b: plain}.
fn parse_fields(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text.trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut escaped = false;
            let mut end = quoted.len();
            for (i, c) in quoted.char_indices() {
                match (escaped, c) {
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = i + 1;
                        break;
                    }
                    (false, c) => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key.trim().to_string(), value);
        rest = remaining.trim_start();
    }
    out
}

/// The deny-log accounting for web's ingress, as one scrape shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct DenyAccounting {
    /// Packets the kernel dropped (and handed to NFLOG, since `log` precedes `drop`).
    dropped: f64,
    logged: f64,
    dedup: f64,
    rate_limited: f64,
}

impl DenyAccounting {
    fn of(s: &Scrape) -> DenyAccounting {
        DenyAccounting {
            dropped: s.get(DROPPED_PACKETS, &WEB_INGRESS).unwrap_or(0.0),
            logged: s.get(DENIED, &WEB_INGRESS).unwrap_or(0.0),
            dedup: s.value(SUPPRESSED, &[("reason", "dedup")]),
            rate_limited: s.value(SUPPRESSED, &[("reason", "rate_limit")]),
        }
    }

    /// Verdicts the deny logger reached: one per logged packet it received.
    fn decided(&self) -> f64 {
        self.logged + self.dedup + self.rate_limited
    }

    fn since(&self, base: &DenyAccounting) -> DenyAccounting {
        DenyAccounting {
            dropped: self.dropped - base.dropped,
            logged: self.logged - base.logged,
            dedup: self.dedup - base.dedup,
            rate_limited: self.rate_limited - base.rate_limited,
        }
    }
}

impl Agent<'_> {
    /// Waits until the kernel has dropped `dropped` more packets of web than at `base`, and the
    /// deny logger has reached a verdict for each of them.
    fn wait_deny_accounting(&self, base: &DenyAccounting, dropped: Option<f64>) -> DenyAccounting {
        let mut last = None;
        let mut stable_since = Instant::now();
        let s = self.wait_scrape("every dropped packet to reach a deny-log verdict", |s| {
            let now = DenyAccounting::of(s).since(base);
            if last != Some(now) {
                last = Some(now);
                stable_since = Instant::now();
            }
            let counted = dropped.is_none_or(|d| now.dropped == d);
            // The kernel counter is read every second, the verdicts are live: wait until both
            // agree and have stopped moving for a counters interval.
            let settled = stable_since.elapsed() > COUNTERS_INTERVAL + Duration::from_millis(200);
            if counted && now.decided() == now.dropped && settled && now.dropped > 0.0 {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        });
        DenyAccounting::of(&s).since(base)
    }
}

// ───────────────────────────── tests ─────────────────────────────

/// `web-allows-client` is in force: client reaches web on TCP 80, other does not.
fn assert_enforced(c: &Cluster, what: &str) {
    let w = web(c, Family::V4);
    let got = c.probe_all(
        &[
            Probe::tcp(pod("client"), w, 80),
            Probe::tcp(pod("other"), w, 80),
        ],
        T,
    );
    assert_eq!(
        got,
        vec![true, false],
        "{what}: want client allowed, other denied"
    );
}

#[test]
fn readyz_flips_after_first_sync() {
    let _g = serial();
    let c = cluster();
    // An empty directory: nothing to list, so the caches never sync.
    let agent = Agent::start(&c, None, &[]);
    agent.wait_log("no .yaml, .yml or .json files found");
    let not_ready = |stage: &str| {
        let ready = agent.get("/readyz");
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (503, "caches not synced"),
            "{stage}: /readyz"
        );
        let health = agent.get("/healthz");
        assert_eq!(
            (health.status, health.body.as_str()),
            (200, "ok"),
            "{stage}: /healthz"
        );
        assert_eq!(
            list_table(&c),
            None,
            "{stage}: nothing is programmed before the first sync"
        );
        let s = agent.scrape();
        assert_eq!(
            s.value("kube_nftpolicy_last_sync_timestamp_seconds", &[]),
            0.0,
            "{stage}"
        );
        for kind in ["full", "partial"] {
            assert_eq!(
                s.value(
                    "kube_nftpolicy_sync_duration_seconds_count",
                    &[("kind", kind)]
                ),
                0.0,
                "{stage}: no {kind} sync"
            );
        }
    };
    not_ready("empty directory");

    // A file that cannot be parsed keeps the caches unsynced too.
    agent.write_manifests("apiVersion: v1\nkind: Pod\nmetadata: {name: [broken\n");
    agent.wait_log("malformed YAML");
    not_ready("malformed manifests");

    // Valid manifests: ready within the deadline, and enforcing by then.
    agent.write_manifests(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT));
    let took = agent.wait_ready();
    assert_enforced(&c, "ready means enforced: client allowed, other denied");
    assert_eq!(agent.get("/healthz").status, 200);
    let s = agent.scrape();
    assert_eq!(
        s.value(
            "kube_nftpolicy_sync_duration_seconds_count",
            &[("kind", "full")]
        ),
        1.0,
        "the first sync is one full sync"
    );
    assert!(s.value("kube_nftpolicy_last_sync_timestamp_seconds", &[]) > 0.0);
    eprintln!("/readyz turned 200 {took:?} after the manifests became valid");

    // SIGTERM: a clean exit, and the rules stay in force.
    let status = agent.stop();
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
    assert!(
        list_table(&c).is_some_and(|t| t.contains("web-allows-client")),
        "the ruleset stays after the agent stops"
    );
    assert!(!c.probe(&Probe::tcp(pod("other"), web(&c, Family::V4), 80), T));
}

#[test]
fn drop_counters_over_http_are_exact() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(&c, Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)), &[]);
    agent.wait_ready();
    let exactly = |packets: f64, when: &str| {
        let s = agent.wait_scrape(&format!("{packets} dropped packets ({when})"), |s| match s
            .get(DROPPED_PACKETS, &WEB_INGRESS)
        {
            Some(p) if p >= packets => Ok(()),
            other => Err(format!("{other:?}")),
        });
        assert_eq!(
            (
                s.value(DROPPED_PACKETS, &WEB_INGRESS),
                s.value(DROPPED_BYTES, &WEB_INGRESS)
            ),
            (packets, packets * IPV4_UDP_PACKET),
            "{when}: packets and bytes are exact\n{}",
            s.excerpt(&[DROPPED_PACKETS, DROPPED_BYTES])
        );
        s
    };
    let s = exactly(0.0, "before any traffic");
    assert_eq!(
        s.series(DROPPED_PACKETS).len(),
        1,
        "only web is isolated, so only web has a drop counter:\n{}",
        s.excerpt(&[DROPPED_PACKETS])
    );
    assert_eq!(
        s.get(
            DROPPED_PACKETS,
            &[
                ("direction", "egress"),
                ("namespace", "default"),
                ("pod", "web")
            ]
        ),
        None
    );

    // 40 denied datagrams, all of one socket: each is a new (never confirmed) flow packet.
    let w = web(&c, Family::V4);
    send_udp(&c, "other", w, vec![53; 40]);
    exactly(40.0, "after 40 denied datagrams");
    std::thread::sleep(SETTLE);
    exactly(40.0, "another counters interval later");

    // Allowed traffic reaches web and is not counted.
    assert_eq!(
        c.probe_all(&allowed_probes(&c), T),
        vec![true; 4],
        "client reaches web over TCP and UDP, IPv4 and IPv6"
    );
    std::thread::sleep(SETTLE);
    exactly(40.0, "after allowed traffic");

    send_udp(&c, "other", w, vec![53; 10]);
    let s = exactly(50.0, "after 10 more");
    assert_no_addresses_in_labels(&s);

    // Deleting web from the manifests removes its series.
    agent.write_manifests(&manifests(&c, &["client", "other"], WEB_ALLOWS_CLIENT));
    let s = agent.wait_scrape("web's drop series to disappear", |s| {
        let left: Vec<String> = s
            .samples
            .iter()
            .filter(|x| x.labels.get("pod").is_some_and(|p| p == "web"))
            .map(|x| x.name.clone())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    assert!(s.series(DROPPED_PACKETS).is_empty() && s.series(DROPPED_BYTES).is_empty());
    assert_eq!(
        s.value("kube_nftpolicy_policed_pods", &[("direction", "ingress")]),
        0.0
    );
}

#[test]
fn exposition_passes_promtool() {
    let _g = serial();
    let c = cluster();
    // A ClusterNetworkPolicy Deny and Accept rule (to addresses nobody uses), so their
    // counter families have series too.
    let cnp = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-test-net}\nspec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - {name: deny-192-0-2, action: Deny, to: [{networks: [192.0.2.0/24]}]}\n  - {name: accept-198-51-100, action: Accept, to: [{networks: [198.51.100.0/24]}]}\n";
    let agent = Agent::start(
        &c,
        Some(&format!(
            "{}{cnp}",
            manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)
        )),
        &["--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    // A denial, so the per-pod families have series too.
    let err = tcp_connect(
        &c,
        "other",
        SocketAddr::new(web(&c, Family::V4), 80),
        Duration::from_millis(500),
    )
    .expect_err("other → web:80 is denied");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    agent.wait_scrape("drop and denial series", |s| {
        match (
            s.get(DROPPED_PACKETS, &WEB_INGRESS),
            s.get(DENIED, &WEB_INGRESS),
        ) {
            (Some(d), Some(l)) if d >= 1.0 && l >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let reply = agent.get("/metrics");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4"),
        "the content type Prometheus negotiates for the text format"
    );
    let scrape = Scrape::parse(&reply.body);
    eprintln!("--- scrape ---\n{}", scrape.text);

    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PROMTOOL} must be installed: {e}"));
    promtool
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(scrape.text.as_bytes())
        .expect("write the scrape to promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics ({}):\n{}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        scrape.text
    );

    // The doc and the code describe the same families, types and labels.
    let documented = documented_metrics();
    let families: BTreeSet<&str> = scrape
        .samples
        .iter()
        .map(|s| scrape.family_of(&s.name))
        .collect();
    let labels = scrape.label_names();
    let mut problems = Vec::new();
    for (name, doc) in &documented {
        if AUDIT_ONLY.contains(&name.as_str()) || STAGED_ONLY.contains(&name.as_str()) {
            continue;
        }
        if scrape.help.get(name).is_none_or(|h| h.is_empty()) {
            problems.push(format!("{name}: documented, but no HELP in the scrape"));
        }
        match scrape.types.get(name) {
            None => problems.push(format!("{name}: documented, but no TYPE in the scrape")),
            Some(t) if *t != doc.kind => problems.push(format!(
                "{name}: documented as {}, exported as {t}",
                doc.kind
            )),
            Some(_) => {}
        }
        if !families.contains(name.as_str()) {
            problems.push(format!("{name}: documented, but no series in the scrape"));
        }
        let exported = labels.get(name).cloned().unwrap_or_default();
        if exported != doc.labels {
            problems.push(format!(
                "{name}: documented labels {:?}, exported {exported:?}",
                doc.labels
            ));
        }
    }
    let exported: BTreeSet<&str> = scrape
        .types
        .keys()
        .map(String::as_str)
        .chain(families.iter().copied())
        .collect();
    for name in exported {
        if !documented.contains_key(name) {
            problems.push(format!("{name}: exported but not documented in {DOC}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn sync_metrics_move() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(&c, Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)), &[]);
    agent.wait_ready();
    let policed = |s: &Scrape, d: &str| s.value("kube_nftpolicy_policed_pods", &[("direction", d)]);
    let partial = |s: &Scrape| {
        s.value(
            "kube_nftpolicy_sync_duration_seconds_count",
            &[("kind", "partial")],
        )
    };
    let programmed = |s: &Scrape| {
        s.value(
            "kube_nftpolicy_network_programming_duration_seconds_count",
            &[],
        )
    };
    let before = agent.wait_scrape("the first sync's gauges", |s| {
        if policed(s, "ingress") == 1.0 {
            Ok(())
        } else {
            Err(s.excerpt(&["kube_nftpolicy_policed_pods"]))
        }
    });
    assert_eq!(policed(&before, "egress"), 0.0);
    assert_eq!(before.value("kube_nftpolicy_policies", &[]), 1.0);
    assert!(
        programmed(&before) >= 1.0,
        "the initial load counts as a change"
    );

    // The change: every pod becomes isolated for ingress.
    let changed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    agent.write_manifests(&manifests(
        &c,
        ALL_PODS,
        &format!("{WEB_ALLOWS_CLIENT}{DENY_ALL_INGRESS}"),
    ));
    let after = agent.wait_scrape("a partial sync with 3 policed pods", |s| {
        if partial(s) > partial(&before) && policed(s, "ingress") == 3.0 {
            Ok(())
        } else {
            Err(format!(
                "partial {} policed {}",
                partial(s),
                policed(s, "ingress")
            ))
        }
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last_sync = after.value("kube_nftpolicy_last_sync_timestamp_seconds", &[]);
    assert!(
        changed_at <= last_sync && last_sync <= now,
        "last sync {last_sync} is between the change {changed_at} and now {now}"
    );
    assert!(
        programmed(&after) > programmed(&before),
        "programming latency observed for the change"
    );
    let latency_sum = after.value(
        "kube_nftpolicy_network_programming_duration_seconds_sum",
        &[],
    ) - before.value(
        "kube_nftpolicy_network_programming_duration_seconds_sum",
        &[],
    );
    assert!(
        latency_sum > 0.0 && latency_sum < now - changed_at + 1.0,
        "the change took {latency_sum}s to program, within the {}s the test waited",
        now - changed_at
    );
    assert_eq!(policed(&after, "egress"), 0.0);
    assert_eq!(after.value("kube_nftpolicy_policies", &[]), 2.0);
    assert_eq!(
        after.value(
            "kube_nftpolicy_sync_duration_seconds_count",
            &[("kind", "full")]
        ),
        1.0,
        "only the first sync was full"
    );
    for reason in ["nft_rejected", "nft_exec", "readback", "drift", "other"] {
        assert_eq!(
            after.value("kube_nftpolicy_sync_failures_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    // The size gauges describe the table in the kernel.
    let table = list_table(&c).expect("table");
    let chains = table
        .lines()
        .filter(|l| l.trim_start().starts_with("chain "))
        .count();
    assert_eq!(
        after.value("kube_nftpolicy_chains", &[]),
        chains as f64,
        "chains gauge vs the kernel:\n{table}"
    );
    assert!(
        after.value("kube_nftpolicy_set_elements", &[]) >= 6.0,
        "3 pods × 2 addresses in the ingress maps"
    );

    // The change is enforced: allowed and denied.
    let w = web(&c, Family::V4);
    assert_eq!(
        c.probe_all(
            &[
                Probe::tcp(pod("client"), w, 80),
                Probe::tcp(pod("other"), w, 80),
                Probe::tcp(pod("web"), c.pod_ip("default", "client", Family::V4), 80),
                Probe::udp(pod("client"), c.pod_ip("default", "other", Family::V6), 53),
            ],
            T
        ),
        vec![true, false, false, false]
    );
    assert_no_addresses_in_labels(&agent.scrape());
}

#[test]
fn denied_connection_log() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    let w = web(&c, Family::V4);
    let lines = || deny_lines(&agent.stderr());

    // Allowed connections produce no line.
    assert_eq!(c.probe_all(&allowed_probes(&c), T), vec![true; 4]);
    std::thread::sleep(SETTLE);
    let base = DenyAccounting::of(&agent.scrape());
    assert_eq!(
        base,
        DenyAccounting {
            dropped: 0.0,
            logged: 0.0,
            dedup: 0.0,
            rate_limited: 0.0
        }
    );
    assert!(lines().is_empty(), "{:?}", lines());

    // One denied TCP connect: its SYN and the retransmission are one line.
    let err = tcp_connect(
        &c,
        "other",
        SocketAddr::new(w, 80),
        Duration::from_millis(2_500),
    )
    .expect_err("other → web:80 is denied");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    let tcp = agent.wait_deny_accounting(&base, None);
    assert!(tcp.dropped >= 2.0, "the SYN was retransmitted: {tcp:?}");
    assert_eq!(
        (tcp.logged, tcp.dedup, tcp.rate_limited),
        (1.0, tcp.dropped - 1.0, 0.0),
        "one line, the retransmissions deduplicated"
    );
    let logged = lines();
    assert_eq!(logged.len(), 1, "{logged:#?}");
    let line = &logged[0];
    eprintln!("--- denied TCP line ---\n{}", line.raw);
    let other4 = c.pod_ip("default", "other", Family::V4).to_string();
    let web4 = w.to_string();
    let want = [
        ("direction", "ingress"),
        ("pod", "default/web"),
        ("src", "default/other"),
        ("dst", "default/web"),
        ("src_ip", other4.as_str()),
        ("dst_ip", web4.as_str()),
        ("protocol", "TCP"),
        ("dst_port", "80"),
        ("isolated_by", "default/web-allows-client"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    assert_eq!(line.fields, BTreeMap::from(want), "{}", line.raw);
    assert!(line.raw.contains(" WARN "), "{}", line.raw);

    // 1000 datagrams of one UDP flow (one socket, one source port): one line.
    let base = DenyAccounting::of(&agent.scrape());
    send_udp(&c, "other", w, vec![53; 1000]);
    let udp = agent.wait_deny_accounting(&base, Some(1000.0));
    assert_eq!(
        (udp.logged, udp.dedup, udp.rate_limited),
        (1.0, 999.0, 0.0),
        "1000 packets, one flow, one line"
    );
    let logged = lines();
    assert_eq!(logged.len(), 2, "{logged:#?}");
    assert_eq!(
        (
            logged[1].fields.get("protocol").map(String::as_str),
            logged[1].fields.get("dst_port").map(String::as_str)
        ),
        (Some("UDP"), Some("53")),
        "{}",
        logged[1].raw
    );

    // New source ports do not make new flows: the logger's flow key leaves the source port
    // out on purpose (every retry of a connect picks a new one).
    let base = DenyAccounting::of(&agent.scrape());
    send_udp_from_new_sockets(&c, "other", SocketAddr::new(w, 53), 200);
    let ports = agent.wait_deny_accounting(&base, Some(200.0));
    assert_eq!(
        (ports.logged, ports.dedup, ports.rate_limited),
        (0.0, 200.0, 0.0),
        "200 source ports to the flow already logged: no line"
    );
    assert_eq!(lines().len(), 2);

    // A flood of distinct flows: distinct destination ports.
    let base = DenyAccounting::of(&agent.scrape());
    let flows = 3_000u16;
    let started = Instant::now();
    send_udp(&c, "other", w, (20_000..20_000 + flows).collect());
    let sent_in = started.elapsed();
    let flood = agent.wait_deny_accounting(&base, Some(f64::from(flows)));
    // Every verdict had been reached when the accounting settled, a counters interval ago.
    let processing = started.elapsed().saturating_sub(COUNTERS_INTERVAL);
    let bound = LOG_BURST + LOG_RATE_PER_SEC * processing.as_secs_f64();
    eprintln!(
        "flood: {flows} datagrams sent in {sent_in:?}; {flood:?}; bound {bound:.0} lines over {processing:?}"
    );
    assert!(
        flood.logged >= LOG_BURST && flood.logged <= bound.ceil(),
        "the burst is used, the rate bounds the rest: {flood:?}, bound {bound}"
    );
    assert_eq!(flood.dedup, 0.0, "every flow is new");
    assert!(flood.rate_limited > 0.0, "{flood:?}");

    // Every line is counted, and the counter only exists for web.
    let s = agent.scrape();
    let logged = lines();
    assert_eq!(
        logged.len() as f64,
        s.value(DENIED, &WEB_INGRESS),
        "denied_connections_total equals the lines logged"
    );
    assert_eq!(s.series(DENIED).len(), 1, "{}", s.excerpt(&[DENIED]));
    assert!(
        logged
            .iter()
            .all(|l| l.fields.get("pod").is_some_and(|p| p == "default/web")
                && l.fields.get("src").is_some_and(|p| p == "default/other")),
        "every line is other → web"
    );
    assert!(s.value(SUPPRESSED, &[("reason", "rate_limit")]) > 0.0);
    assert_no_addresses_in_labels(&s);
    eprintln!("--- scrape after the flood ---\n{}", s.text);
}

#[test]
fn failed_syncs_are_counted_and_keep_readyz_unready() {
    let _g = serial();
    let c = cluster();
    // An nft that cannot be started: every sync fails (and is retried with backoff).
    let agent = Agent::start(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--nft", "/nonexistent/nft"],
    );
    let failures = |s: &Scrape, reason: &str| {
        s.value("kube_nftpolicy_sync_failures_total", &[("reason", reason)])
    };
    let s = agent.wait_scrape("two failed syncs", |s| {
        if failures(s, "nft_exec") >= 2.0 {
            Ok(())
        } else {
            Err(s.excerpt(&["kube_nftpolicy_sync_failures_total"]))
        }
    });
    for reason in ["nft_rejected", "readback", "drift", "other"] {
        assert_eq!(failures(&s, reason), 0.0, "{reason}");
    }
    for kind in ["full", "partial"] {
        assert_eq!(
            s.value(
                "kube_nftpolicy_sync_duration_seconds_count",
                &[("kind", kind)]
            ),
            0.0,
            "failed syncs are not observed as {kind} syncs"
        );
    }
    assert_eq!(
        s.value("kube_nftpolicy_last_sync_timestamp_seconds", &[]),
        0.0
    );
    let ready = agent.get("/readyz");
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "no successful sync yet")
    );
    assert_eq!(
        agent.get("/healthz").status,
        200,
        "liveness ignores sync state"
    );
    agent.wait_log("sync failed; the previous ruleset stays in force");
    // Nothing was programmed, so nothing is enforced: both peers reach web.
    assert_eq!(list_table(&c), None);
    let w = web(&c, Family::V4);
    assert_eq!(
        c.probe_all(
            &[
                Probe::tcp(pod("client"), w, 80),
                Probe::tcp(pod("other"), w, 80)
            ],
            T
        ),
        vec![true, true]
    );
}

#[test]
fn drift_repairs_are_counted() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--resync-interval-s", "1"],
    );
    agent.wait_ready();
    let repairs = |s: &Scrape| s.value("kube_nftpolicy_drift_repairs_total", &[]);
    let full = |s: &Scrape| {
        s.value(
            "kube_nftpolicy_sync_duration_seconds_count",
            &[("kind", "full")],
        )
    };
    // Several read-backs of an untouched table find no drift.
    std::thread::sleep(SETTLE);
    let before = agent.scrape();
    assert_eq!(
        (repairs(&before), full(&before)),
        (0.0, 1.0),
        "no drift without sabotage"
    );

    // Someone flushes the agent's ingress base chain: the next read-back repairs it.
    c.nft(
        Endpoint::node(NODE),
        "flush chain inet kube-nftpolicy ingress",
    );
    let after = agent.wait_scrape("a drift repair", |s| {
        if repairs(s) >= 1.0 && full(s) >= 2.0 {
            Ok(())
        } else {
            Err(format!("repairs {} full {}", repairs(s), full(s)))
        }
    });
    assert_eq!(
        (repairs(&after), full(&after)),
        (1.0, 2.0),
        "one repair, by one full sync"
    );
    for reason in ["nft_rejected", "nft_exec", "readback", "drift", "other"] {
        assert_eq!(
            after.value("kube_nftpolicy_sync_failures_total", &[("reason", reason)]),
            0.0,
            "a repair is not a failure ({reason})"
        );
    }
    agent.wait_log("kernel state drifted from the applied ruleset");
    assert_enforced(&c, "enforcement is back");
}

/// Regression: `Metrics::forget_pod` was never called, so a deleted pod kept its
/// `denied_connections_total` series for the life of the agent, unlike its drop counters.
#[test]
fn denied_connection_series_end_with_the_pod() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    tcp_connect(
        &c,
        "other",
        SocketAddr::new(web(&c, Family::V4), 80),
        Duration::from_millis(500),
    )
    .expect_err("other → web:80 is denied");
    agent.wait_scrape("web's drop and denial series", |s| {
        match (
            s.get(DROPPED_PACKETS, &WEB_INGRESS),
            s.get(DENIED, &WEB_INGRESS),
        ) {
            (Some(_), Some(l)) if l >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    agent.write_manifests(&manifests(&c, &["client", "other"], WEB_ALLOWS_CLIENT));
    // Once the drop counters are gone, the agent has synced the deletion and read back.
    let s = agent.wait_scrape("web's drop counters to disappear", |s| {
        if s.series(DROPPED_PACKETS).is_empty() {
            Ok(())
        } else {
            Err(s.excerpt(&[DROPPED_PACKETS]))
        }
    });
    std::thread::sleep(SETTLE);
    let s2 = agent.scrape();
    for scrape in [&s, &s2] {
        assert_eq!(
            scrape.get(DENIED, &WEB_INGRESS),
            None,
            "a deleted pod's denied_connections_total series must go, like its drop counters \
             (Metrics::forget_pod exists but src/agent.rs never calls it):\n{}",
            scrape.excerpt(&[DENIED, DROPPED_PACKETS])
        );
    }
}

/// Regression (src/main.rs `init_tracing`): the log was coloured with terminal escape
/// sequences even when stderr is a file or a pipe, as it is under a container runtime. A log
/// collector then stored `\x1b[3msrc\x1b[0m\x1b[2m=\x1b[0mdefault/other`, and searching the
/// denied-connection lines for `src=default/other` found nothing.
#[test]
fn log_has_no_terminal_escapes_when_not_a_terminal() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start_with(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--log-denied", "--nflog-group", "7"],
        false,
    );
    agent.wait_ready();
    tcp_connect(
        &c,
        "other",
        SocketAddr::new(web(&c, Family::V4), 80),
        Duration::from_millis(500),
    )
    .expect_err("other → web:80 is denied");
    agent.wait_log("denied connection");
    let raw = agent.raw_stderr();
    let line = raw
        .lines()
        .find(|l| l.contains("denied connection"))
        .expect("a denied-connection line");
    assert!(
        !raw.contains('\u{1b}') && line.contains("src=default/other"),
        "stderr is a file, yet the log carries terminal escapes; the denied line as stored:\n{line:?}"
    );
}

/// The address detector used on every scrape flags what it must, and only that.
#[test]
fn address_detector_flags_addresses_and_ports() {
    for bad in [
        "10.244.1.2",
        "fd00:10:244:1::2",
        "10.244.1.2:80",
        "[fd00::1]:53",
        "web@10.0.0.1",
        "10.0.0.0/8",
        "53",
        ":8080",
    ] {
        assert!(address_or_port(bad).is_some(), "{bad} must be flagged");
    }
    for good in [
        "default/web",
        "ingress",
        "nft_rejected",
        "kube-system/coredns-5d78c9869d-abcde",
        "deadbeef",
        "rate_limit",
        "partial",
    ] {
        assert_eq!(address_or_port(good), None, "{good} must pass");
    }
    let s = Scrape::parse(
        "# HELP x_total Help.\n# TYPE x_total counter\nx_total{a=\"q\\\"uote\",b=\"c,d\"} 3\ny 1.5\n",
    );
    assert_eq!(s.value("x_total", &[("a", "q\"uote"), ("b", "c,d")]), 3.0);
    assert_eq!(s.value("y", &[]), 1.5);
}

// ───────────────────────────── the monitoring kit ─────────────────────────────
//
// deploy/monitoring/ ships a PrometheusRule and a Grafana dashboard. The rules pass `promtool
// check rules` and the unit tests in tests/monitoring/alerts_test.yaml; then a real Prometheus
// server, started inside the node namespace, scrapes the real agent while real denied and
// allowed connections cross the node, answers PromQL over its HTTP API, runs every dashboard
// query, and evaluates the rules: a forced sync failure makes KubeNftpolicySyncFailing fire.

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/prometheusrule.yaml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/monitoring/alerts_test.yaml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/grafana-dashboard.json"
);
const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Prometheus's address inside the node namespace.
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

/// The PrometheusRule's `spec.groups` written as a plain Prometheus rule file `rules.yaml`
/// in `dir` (what promtool and Prometheus read).
fn write_rule_file(dir: &Path) -> std::path::PathBuf {
    let text = fs::read_to_string(RULES).expect("prometheusrule.yaml");
    let rule: serde_json::Value = serde_yaml_ng::from_str(&text).expect("PrometheusRule YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let groups = serde_json::json!({ "groups": rule["spec"]["groups"] });
    let path = dir.join("rules.yaml");
    fs::write(&path, serde_yaml_ng::to_string(&groups).expect("yaml")).expect("write rules");
    path
}

/// Every alert name in the PrometheusRule.
fn alert_names() -> BTreeSet<String> {
    let text = fs::read_to_string(RULES).expect("prometheusrule.yaml");
    let rule: serde_json::Value = serde_yaml_ng::from_str(&text).expect("PrometheusRule YAML");
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_rule_file(dir.path());
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    fs::copy(RULE_TESTS, dir.path().join("alerts_test.yaml")).expect("copy rule tests");
    let (ok, out) = promtool(&["test", "rules", "alerts_test.yaml"], dir.path());
    assert!(ok, "promtool test rules:\n{out}");

    // Every alert is shown firing by at least one unit test (an alert nobody tested could
    // have a query that never matches).
    let tests: serde_json::Value =
        serde_yaml_ng::from_str(&fs::read_to_string(RULE_TESTS).expect("rule tests"))
            .expect("rule tests YAML");
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(fired, alert_names(), "alerts without a firing unit test");

    // A broken copy must fail, so the checks above can fail.
    let good = fs::read_to_string(dir.path().join("rules.yaml")).expect("rules");
    let broken = good.replacen("== 0", "== 0)", 1);
    assert_ne!(broken, good, "the broken copy differs");
    fs::write(dir.path().join("rules.yaml"), broken).expect("write");
    let (ok, out) = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(!ok, "a syntax error passed promtool check rules:\n{out}");
}

/// Every query of the dashboard, by panel title, with Grafana's variables replaced as
/// Grafana would for "all nodes" and a short range.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(DASHBOARD).expect("dashboard")).expect("JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().expect("panel title").to_string();
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            out.push((
                title.clone(),
                expr.replace("$node", ".*")
                    .replace("$__rate_interval", "30s"),
            ));
        }
    }
    out
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One series of an instant query's answer: its labels and value.
type PromSeries = (BTreeMap<String, String>, f64);

/// A Prometheus server in the node namespace, scraping the agent every second and evaluating
/// the kit's rules every second. Killed (and its storage removed) on drop.
struct Prometheus<'c> {
    cluster: &'c Cluster,
    child: Child,
    dir: tempfile::TempDir,
}

impl<'c> Prometheus<'c> {
    fn start(cluster: &'c Cluster) -> Prometheus<'c> {
        let dir = tempfile::tempdir().expect("prometheus tempdir");
        write_rule_file(dir.path());
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n  - job_name: kube-nftpolicy\n    static_configs:\n      - targets: ['{ADMIN}']\n        labels: {{node: {NODE}}}\n"
        );
        fs::write(dir.path().join("prometheus.yml"), config).expect("prometheus.yml");
        let log = File::create(dir.path().join("prometheus.log")).expect("log file");
        let ns = cluster.netns_name(Endpoint::node(NODE));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, PROMETHEUS])
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            cluster,
            child,
            dir,
        };
        wait_until("Prometheus to be ready", DEADLINE, || {
            match p.get("/-/ready") {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("{} {}", r.status, r.body)),
                Err(e) => Err(e.to_string()),
            }
        });
        p
    }

    fn get(&self, path: &str) -> io::Result<Reply> {
        let addr: SocketAddr = PROMETHEUS_ADDR.parse().expect("address");
        let path = path.to_string();
        self.cluster
            .run_in_node(NODE, move || http_get(addr, &path))
    }

    /// The result vector of an instant query: each series' labels and value.
    fn query(&self, q: &str) -> Result<Vec<PromSeries>, String> {
        let reply = self
            .get(&format!("/api/v1/query?query={}", url_encode(q)))
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&reply.body).map_err(|e| format!("{e}: {}", reply.body))?;
        if v["status"] != "success" {
            return Err(format!("query {q:?} failed: {}", reply.body));
        }
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| format!("no value in {r}"))?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// Active alerts: (name, state, labels).
    fn alerts(&self) -> Vec<(String, String, BTreeMap<String, String>)> {
        let reply = self.get("/api/v1/alerts").expect("GET /api/v1/alerts");
        let v: serde_json::Value = serde_json::from_str(&reply.body).expect("alerts JSON");
        v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let labels: BTreeMap<String, String> = a["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                (
                    labels.get("alertname").cloned().unwrap_or_default(),
                    a["state"].as_str().unwrap_or_default().to_string(),
                    labels,
                )
            })
            .collect()
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log =
                fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
            eprintln!(
                "--- prometheus, last lines of its log ---\n{}",
                tail(&log, 30)
            );
        }
    }
}

#[test]
fn real_prometheus_scrapes_the_agent_and_alerts() {
    let _g = serial();
    let c = cluster();
    // An nft that works until a flag file exists, then fails every transaction: the way to
    // force sync failures on a running agent.
    let tools = tempfile::tempdir().expect("tempdir");
    let fail_flag = tools.path().join("fail");
    let wrapper = tools.path().join("nft");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then echo 'forced failure' >&2; exit 1; fi\nexec nft \"$@\"\n",
            fail_flag.display()
        ),
    )
    .expect("write wrapper");
    let mut perms = fs::metadata(&wrapper).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(&wrapper, perms).expect("chmod");
    let wrapper_arg = wrapper.to_str().expect("utf-8 path").to_string();

    let agent = Agent::start(
        &c,
        Some(&manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)),
        &["--log-denied", "--nft", &wrapper_arg],
    );
    agent.wait_ready();
    let prom = Prometheus::start(&c);
    wait_until("Prometheus to scrape the agent", DEADLINE, || {
        match prom.query(r#"up{job="kube-nftpolicy"}"#)?.as_slice() {
            [(labels, v)] if *v == 1.0 && labels.get("node").map(String::as_str) == Some(NODE) => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    });

    // Real traffic: 40 denied datagrams from `other` (one socket, one flow), allowed
    // connections from `client`.
    let w = web(&c, Family::V4);
    send_udp(&c, "other", w, vec![53; 40]);
    assert_eq!(
        c.probe_all(&allowed_probes(&c), T),
        vec![true; 4],
        "client reaches web over TCP and UDP, IPv4 and IPv6"
    );
    let web_drops = r#"kube_nftpolicy_dropped_packets_total{job="kube-nftpolicy", namespace="default", pod="web", direction="ingress"}"#;
    wait_until("Prometheus to see the 40 drops", DEADLINE, || {
        match prom.query(web_drops)?.as_slice() {
            [(_, v)] if *v == 40.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(
        agent.scrape().value(DROPPED_PACKETS, &WEB_INGRESS),
        40.0,
        "Prometheus holds what the agent exports"
    );
    // The drop rate is the denied pod's alone: only web is isolated.
    let rate = prom
        .query(r#"sum by (namespace, pod, direction) (rate(kube_nftpolicy_dropped_packets_total{job="kube-nftpolicy"}[30s])) > 0"#)
        .expect("rate query");
    let pods: Vec<(String, String)> = rate
        .iter()
        .map(|(l, _)| (l["pod"].clone(), l["direction"].clone()))
        .collect();
    assert_eq!(
        pods,
        vec![("web".to_string(), "ingress".to_string())],
        "{rate:?}"
    );
    let denied = prom
        .query(r#"kube_nftpolicy_denied_connections_total{job="kube-nftpolicy", pod="web", direction="ingress"}"#)
        .expect("denied query");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(
        denied[0].1, 1.0,
        "one flow, one denied connection: {denied:?}"
    );

    // Rule hits: the four allowed connections (TCP and UDP, both families) all went through
    // web-allows-client's one rule; the denied flow through none.
    let hits_q = r#"kube_nftpolicy_rule_hits_total{job="kube-nftpolicy", namespace="default", policy="web-allows-client", direction="ingress", rule="spec.ingress[0]"}"#;
    wait_until("Prometheus to see the 4 rule hits", DEADLINE, || match prom
        .query(hits_q)?
        .as_slice()
    {
        [(_, v)] if *v == 4.0 => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let all_rules = prom
        .query(r#"sum(kube_nftpolicy_rule_hits_total{job="kube-nftpolicy"})"#)
        .expect("sum of rule hits");
    assert_eq!(all_rules.len(), 1, "{all_rules:?}");
    assert_eq!(all_rules[0].1, 4.0, "no other rule counted: {all_rules:?}");
    let doc = agent.get("/debug/rule-hits");
    assert_eq!(doc.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc.body).expect("rule hits JSON");
    assert_eq!(
        doc["rules"],
        serde_json::json!([{
            "kind": "NetworkPolicy",
            "namespace": "default",
            "policy": "web-allows-client",
            "direction": "ingress",
            "rule": "spec.ingress[0]",
            "hits": 4
        }]),
        "/debug/rule-hits says the same"
    );

    // Every dashboard query returns series from this one agent.
    for (panel, q) in dashboard_queries() {
        wait_until(&format!("panel {panel:?}: {q}"), DEADLINE, || {
            let r = prom.query(&q)?;
            if r.is_empty() {
                Err("no series".into())
            } else if r
                .iter()
                .any(|(l, _)| l.get("node").is_some_and(|n| n != NODE))
            {
                Err(format!("a series from another node: {r:?}"))
            } else {
                Ok(())
            }
        });
    }

    // Healthy: no alert of ours is pending or firing.
    let ours = alert_names();
    let active: Vec<_> = prom
        .alerts()
        .into_iter()
        .filter(|(name, _, _)| ours.contains(name))
        .collect();
    assert!(active.is_empty(), "alerts while healthy: {active:?}");

    // Force sync failures: every transaction now fails, and a change makes the agent try.
    fs::write(&fail_flag, "").expect("flag");
    agent.write_manifests(&manifests(&c, ALL_PODS, DENY_ALL_INGRESS));
    let alert = wait_until("KubeNftpolicySyncFailing", Duration::from_secs(60), || {
        let alerts = prom.alerts();
        alerts
            .iter()
            .find(|(name, state, labels)| {
                name == "KubeNftpolicySyncFailing"
                    && (state == "pending" || state == "firing")
                    && labels.get("node").map(String::as_str) == Some(NODE)
            })
            .cloned()
            .ok_or_else(|| format!("{alerts:?}"))
    });
    assert_eq!(alert.2.get("severity").map(String::as_str), Some("warning"));
    assert_eq!(
        alert.2.get("reason").map(String::as_str),
        Some("nft_rejected"),
        "{alert:?}"
    );
    // The previous ruleset stayed in force: client still reaches web, other does not.
    assert_eq!(
        c.probe_all(
            &[
                Probe::tcp(pod("client"), w, 80),
                Probe::tcp(pod("other"), w, 80)
            ],
            T
        ),
        vec![true, false]
    );
}

#[test]
fn audit_mode_counts_would_drops_and_logs_would_deny() {
    let _g = serial();
    let c = cluster();
    let cnp = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-test-net}\nspec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - {name: deny-192-0-2, action: Deny, to: [{networks: [192.0.2.0/24]}]}\n";
    let agent = Agent::start(
        &c,
        Some(&format!(
            "{}{cnp}",
            manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)
        )),
        &["--audit", "--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    let w = web(&c, Family::V4);
    // Denied by web-allows-client, yet each connection goes through.
    for i in 0..3 {
        assert!(
            c.probe(&Probe::tcp(pod("other"), w, 80), T),
            "connection {i}: other → web:80 goes through in audit mode"
        );
    }
    assert_eq!(c.probe_all(&allowed_probes(&c), T), vec![true; 4]);
    agent.wait_scrape("three would-drops", |s| {
        match s.get(WOULD_DROP, &WEB_INGRESS) {
            Some(3.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    std::thread::sleep(SETTLE);
    let scrape = agent.scrape();
    assert_eq!(
        scrape.value(WOULD_DROP, &WEB_INGRESS),
        3.0,
        "exactly the three connections (one SYN each: they were accepted)"
    );
    assert!(
        scrape.series(DROPPED_PACKETS).is_empty(),
        "nothing was dropped:\n{}",
        scrape.excerpt(&[DROPPED_PACKETS, WOULD_DROP])
    );
    assert!(
        scrape.series(DENIED).is_empty(),
        "nothing was denied:\n{}",
        scrape.excerpt(&[DENIED])
    );
    // The audit-only families are as documented.
    for name in AUDIT_ONLY {
        assert!(!scrape.series(name).is_empty(), "{name}: no series");
    }
    assert_as_documented(&scrape, &AUDIT_ONLY);
    // One "would deny" line for the flow (the three connections are one deduplicated flow).
    agent.wait_log("would deny connection");
    let log = agent.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("would deny connection"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let fields = parse_fields(
        lines[0]
            .split_once("would deny connection (audit mode: allowed)")
            .map(|(_, f)| f)
            .unwrap_or_default(),
    );
    eprintln!("--- would-deny line ---\n{}", lines[0]);
    for (k, v) in [
        ("direction", "ingress"),
        ("pod", "default/web"),
        ("src", "default/other"),
        ("dst", "default/web"),
        ("dst_port", "80"),
        ("isolated_by", "default/web-allows-client"),
    ] {
        assert_eq!(
            fields.get(k).map(String::as_str),
            Some(v),
            "{k} in {}",
            lines[0]
        );
    }
    assert!(deny_lines(&log).is_empty(), "no \"denied connection\" line");
    assert_eq!(agent.get("/readyz").status, 200, "ready as usual");
}

/// A staged policy on web (isolated by web-allows-client) that would let `other` in on 80,
/// and one on client (not isolated for egress) that would only let it reach web.
const STAGED_WEB: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-allows-other\n  namespace: default\n  annotations: {kube-nftpolicy.io/staged: \"true\"}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: other}}}]\n    ports: [{port: 80}]\n";
const STAGED_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: client-to-web-only\n  namespace: default\n  annotations: {kube-nftpolicy.io/staged: \"true\"}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n";

/// Each family is exported with the type and labels docs/metrics.md gives it.
fn assert_as_documented(scrape: &Scrape, names: &[&str]) {
    let documented = documented_metrics();
    let labels = scrape.label_names();
    for name in names {
        let doc = documented
            .get(*name)
            .unwrap_or_else(|| panic!("{name} is not documented in {DOC}"));
        assert_eq!(scrape.types.get(*name), Some(&doc.kind), "{name}: type");
        assert_eq!(
            labels.get(*name).cloned().unwrap_or_default(),
            doc.labels,
            "{name}: labels"
        );
    }
}

/// The flows both staged tests probe, with today's verdicts, which staging must not change:
/// other → web is denied (twice: one flow), client reaches other and web.
fn probe_staged_flows(c: &Cluster, what: &str) {
    let w = web(c, Family::V4);
    let o = c.pod_ip("default", "other", Family::V4);
    assert_eq!(
        c.probe_all(
            &[
                Probe::tcp(pod("other"), w, 80),
                Probe::tcp(pod("other"), w, 80),
                Probe::tcp(pod("client"), o, 80),
                Probe::tcp(pod("client"), w, 80),
            ],
            T
        ),
        vec![false, false, true, true],
        "{what}"
    );
}

/// One would-allow line (other → web, by `allow_policy`) and one would-deny line (client →
/// other, by `deny_policy`), naming both pods; the denied flow also has its own "denied
/// connection" line.
fn assert_staged_lines(agent: &Agent<'_>, allow_policy: &str, deny_policy: &str) {
    agent.wait_log("staged would-deny");
    agent.wait_log("staged would-allow");
    let log = agent.stderr();
    let staged_lines = |msg: &str| -> Vec<BTreeMap<String, String>> {
        log.lines()
            .filter_map(|l| l.split_once(msg).map(|(_, f)| parse_fields(f)))
            .collect()
    };
    let allow = staged_lines("staged would-allow (connection denied today)");
    let deny = staged_lines("staged would-deny (connection allowed today)");
    assert_eq!((allow.len(), deny.len()), (1, 1), "{allow:?} {deny:?}");
    for (line, want) in [
        (
            &allow[0],
            [
                ("direction", "ingress"),
                ("pod", "default/web"),
                ("src", "default/other"),
                ("dst", "default/web"),
                ("staged_policy", allow_policy),
            ],
        ),
        (
            &deny[0],
            [
                ("direction", "egress"),
                ("pod", "default/client"),
                ("src", "default/client"),
                ("dst", "default/other"),
                ("staged_policy", deny_policy),
            ],
        ),
    ] {
        for (k, v) in want {
            assert_eq!(line.get(k).map(String::as_str), Some(v), "{k} in {line:?}");
        }
    }
    assert_eq!(deny_lines(&log).len(), 1, "the denied flow's own line");
}

#[test]
fn staged_policies_count_and_log_the_connections_they_would_change() {
    let _g = serial();
    let c = cluster();
    let agent = Agent::start(
        &c,
        Some(&manifests(
            &c,
            ALL_PODS,
            &format!("{WEB_ALLOWS_CLIENT}{STAGED_WEB}{STAGED_CLIENT}"),
        )),
        &["--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    probe_staged_flows(&c, "staged policies change no verdict");
    let web_allow = [
        ("direction", "ingress"),
        ("namespace", "default"),
        ("policy", "web-allows-other"),
    ];
    let client_deny = [
        ("direction", "egress"),
        ("namespace", "default"),
        ("policy", "client-to-web-only"),
    ];
    agent.wait_scrape("the staged counts", |s| {
        match (
            s.get(STAGED_WOULD_ALLOW, &web_allow),
            s.get(STAGED_WOULD_DENY, &client_deny),
        ) {
            (Some(2.0), Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    std::thread::sleep(SETTLE);
    let scrape = agent.scrape();
    assert_eq!(scrape.value(STAGED_WOULD_ALLOW, &web_allow), 2.0);
    assert_eq!(
        scrape.value(STAGED_WOULD_DENY, &client_deny),
        1.0,
        "client → other only: client → web is allowed by it too"
    );
    assert_eq!(scrape.series(STAGED_WOULD_DENY).len(), 1);
    assert_eq!(scrape.series(STAGED_WOULD_ALLOW).len(), 1);
    assert_eq!(
        scrape.value(DROPPED_PACKETS, &WEB_INGRESS),
        2.0,
        "the drops as today"
    );
    assert_as_documented(&scrape, &[STAGED_WOULD_DENY, STAGED_WOULD_ALLOW]);
    let states: BTreeMap<String, String> = scrape
        .series("kube_nftpolicy_policy_state")
        .iter()
        .map(|x| {
            let l = |k: &str| x.labels.get(k).cloned().unwrap_or_default();
            (format!("{}/{}", l("namespace"), l("policy")), l("state"))
        })
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (
                "default/web-allows-client".to_string(),
                "enforced".to_string()
            ),
            ("default/web-allows-other".to_string(), "staged".to_string()),
            (
                "default/client-to-web-only".to_string(),
                "staged".to_string()
            ),
        ])
    );
    assert_staged_lines(
        &agent,
        "default/web-allows-other",
        "default/client-to-web-only",
    );
}

/// A staged ClusterNetworkPolicy on this node's pods, staged (not enforced).
fn staged_cnp(name: &str, subject_app: &str, direction: &str, rule: &str) -> String {
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}\n  annotations: {{kube-nftpolicy.io/staged: \"true\"}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {subject_app}}}}}}}}}\n  {direction}:\n  - {rule}\n"
    )
}

#[test]
fn staged_cluster_network_policies_count_and_log_the_connections_they_would_change() {
    let _g = serial();
    let c = cluster();
    let staged = [
        // other → web:80, denied today (web-allows-client): would-allow.
        staged_cnp("s-guard", "web", "ingress", "{name: other-in, action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: other}}}}]}"),
        // client → other, allowed today: would-deny.
        staged_cnp("s-client-out", "client", "egress", "{name: not-other, action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: other}}}}]}"),
        // A third one: the 3-bit field below has two slots, taken by the names before it.
        staged_cnp("z-extra", "client", "egress", "{action: Deny, to: [{namespaces: {}}]}"),
    ]
    .concat();
    let agent = Agent::start(
        &c,
        Some(&manifests(
            &c,
            ALL_PODS,
            &format!("{WEB_ALLOWS_CLIENT}{staged}"),
        )),
        &[
            "--log-denied",
            "--nflog-group",
            "7",
            "--staged-mark-mask",
            "0x00e00000",
        ],
    );
    agent.wait_ready();
    probe_staged_flows(&c, "staged ClusterNetworkPolicies change no verdict");
    let guard = [
        ("direction", "ingress"),
        ("policy", "s-guard"),
        ("tier", "admin"),
    ];
    let client_out = [
        ("direction", "egress"),
        ("policy", "s-client-out"),
        ("tier", "admin"),
    ];
    agent.wait_scrape("the staged counts", |s| {
        match (
            s.get(CNP_STAGED_WOULD_ALLOW, &guard),
            s.get(CNP_STAGED_WOULD_DENY, &client_out),
        ) {
            (Some(2.0), Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    std::thread::sleep(SETTLE);
    let scrape = agent.scrape();
    assert_eq!(scrape.value(CNP_STAGED_WOULD_ALLOW, &guard), 2.0);
    assert_eq!(
        scrape.value(CNP_STAGED_WOULD_DENY, &client_out),
        1.0,
        "client → other only"
    );
    assert_eq!(scrape.series(CNP_STAGED_WOULD_ALLOW).len(), 1);
    assert_eq!(
        scrape.series(CNP_STAGED_WOULD_DENY).len(),
        1,
        "z-extra is not measured"
    );
    assert_eq!(
        scrape.value(CNP_STAGED_UNMEASURED, &[("policy", "z-extra")]),
        1.0,
        "the field has no slot left for z-extra"
    );
    assert_eq!(scrape.series(CNP_STAGED_UNMEASURED).len(), 1);
    assert_eq!(
        scrape.value(DROPPED_PACKETS, &WEB_INGRESS),
        2.0,
        "the drops as today"
    );
    assert_as_documented(
        &scrape,
        &[
            CNP_STAGED_WOULD_DENY,
            CNP_STAGED_WOULD_ALLOW,
            CNP_STAGED_UNMEASURED,
        ],
    );
    assert_staged_lines(
        &agent,
        "Admin ClusterNetworkPolicy s-guard",
        "Admin ClusterNetworkPolicy s-client-out",
    );
}

#[test]
fn policy_state_says_what_each_policy_is_on_this_node() {
    let _g = serial();
    let c = cluster();
    let nothing_here = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: for-absent-pods, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: absent}}\n  ingress: [{}]\n";
    let invalid = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]\n";
    let cnp = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-test-net}\nspec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - {name: deny-192-0-2, action: Deny, to: [{networks: [192.0.2.0/24]}]}\n";
    let agent = Agent::start(
        &c,
        Some(&format!(
            "{}{nothing_here}{invalid}{cnp}",
            manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)
        )),
        &[],
    );
    agent.wait_ready();
    let states = |s: &Scrape| -> BTreeMap<String, String> {
        s.series("kube_nftpolicy_policy_state")
            .iter()
            .filter(|x| x.value == 1.0)
            .map(|x| {
                let l = |k: &str| x.labels.get(k).cloned().unwrap_or_default();
                (
                    format!("{} {}/{}", l("kind"), l("namespace"), l("policy")),
                    l("state"),
                )
            })
            .collect()
    };
    let want: BTreeMap<String, String> = [
        ("NetworkPolicy default/web-allows-client", "enforced"),
        (
            "NetworkPolicy default/for-absent-pods",
            "selects_nothing_here",
        ),
        ("NetworkPolicy default/broken", "invalid"),
        ("ClusterNetworkPolicy /no-test-net", "enforced"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    agent.wait_scrape("policy states", |s| {
        let got = states(s);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    // A policy that goes takes its series with it.
    agent.write_manifests(&format!(
        "{}{cnp}",
        manifests(&c, ALL_PODS, WEB_ALLOWS_CLIENT)
    ));
    let mut want = want;
    want.remove("NetworkPolicy default/for-absent-pods");
    want.remove("NetworkPolicy default/broken");
    agent.wait_scrape("policy states after the change", |s| {
        let got = states(s);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

/// Regression: a ClusterNetworkPolicy Deny drop was logged as pod "cnp/<policy>"; the line
/// names the policy, its tier and rule, and both pods.
#[test]
fn cluster_network_policy_denials_are_logged_with_the_rule_and_both_pods() {
    let _g = serial();
    let c = cluster();
    let cnp = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  ingress:\n  - {name: no-other, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: other}}}}]}\n";
    let agent = Agent::start(
        &c,
        Some(&format!("{}{cnp}", manifests(&c, ALL_PODS, ""))),
        &["--log-denied", "--nflog-group", "7"],
    );
    agent.wait_ready();
    let w = web(&c, Family::V4);
    assert!(!c.probe(&Probe::tcp(pod("other"), w, 80), T), "denied");
    assert!(c.probe(&Probe::tcp(pod("client"), w, 80), T), "allowed");
    wait_until(
        "the denied-connection line",
        DEADLINE,
        || match deny_lines(&agent.stderr()).len() {
            0 => Err("no line yet".to_string()),
            _ => Ok(()),
        },
    );
    std::thread::sleep(SETTLE);
    let lines = deny_lines(&agent.stderr());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    eprintln!("--- ClusterNetworkPolicy denied line ---\n{}", lines[0].raw);
    let other4 = c.pod_ip("default", "other", Family::V4).to_string();
    for (k, v) in [
        ("direction", "ingress"),
        ("pod", "default/web"),
        ("src", "default/other"),
        ("dst", "default/web"),
        ("src_ip", other4.as_str()),
        ("dst_port", "80"),
        ("denied_by", "Admin ClusterNetworkPolicy guard"),
        ("rule", "spec.ingress[0] (no-other)"),
    ] {
        assert_eq!(
            lines[0].fields.get(k).map(String::as_str),
            Some(v),
            "{k} in {}",
            lines[0].raw
        );
    }
    assert!(
        !lines[0].raw.contains("cnp/"),
        "no pseudo-pod: {}",
        lines[0].raw
    );
    agent.wait_scrape("the denial counted for web", |s| {
        match s.get(DENIED, &WEB_INGRESS) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}
