//! End-to-end tests of the agent loop: the real `kube-nftpolicy run` binary, running in a node's
//! network namespace of a netns cluster, watching a fake API server that speaks real
//! list/watch (or following manifest files), checked with real packets and `nft list table`.
//!
//! What they prove: the agent follows the API server (policies, pod labels, namespace labels,
//! deletions); it writes nothing before Pods, Namespaces and NetworkPolicies have all been
//! listed; an API server outage, a compacted history (410 Gone) and a restart of the agent
//! never open a denied pair; manifest mode follows files and keeps the last good ruleset over
//! a malformed one; the structured logs (one `sync` line per sync, a warning naming an invalid
//! policy); `/debug/explain` answers from the live state (503 before the lists are in).
//! `event_to_kernel_latency_report` measures the time from an API change to the
//! kernel holding it (written to `target/latency-report.txt`).
//! `sync_loop_idles_while_waiting_for_initial_lists` is the regression test of a busy loop.
//! `api_requests_stay_within_the_declared_access` checks every request the agent sends against
//! `watch::api_access()`, which `tests/deploy.rs` compares with deploy/'s ClusterRole.
//!
//! The fake API server is started from a thread inside the node namespace, so it listens on
//! that namespace's 127.0.0.1, where the agent (`ip netns exec <node> kube-nftpolicy run`)
//! reaches it. Every agent is stopped (SIGTERM, then SIGKILL) when its guard is dropped, and
//! its log is printed if the test fails (or always, with `AGENT_E2E_LOGS=1`).

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, FakeApiServerOptions, objects_from_yaml};
use kernel::{labels, pod_yaml, serial, without_counts};
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe};

/// Per-probe timeout (a denied probe costs this much; probes of a round run in parallel).
const T: Duration = Duration::from_millis(500);
/// How long the agent may take to converge after a change.
const CONVERGE: Duration = Duration::from_secs(10);
const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");
const NODE: &str = "node-1";
const NETPOL_PATH: &str = "/apis/networking.k8s.io/v1/networkpolicies";

// ───────────────────────────── the cluster and its state ─────────────────────────────

/// One node; `default/{web,client,other}` and `guests/visitor`, each serving TCP 80.
fn cluster() -> Cluster {
    Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node(NODE)
            .pod(NODE, "default", "web", &[80], &[])
            .pod(NODE, "default", "client", &[80], &[])
            .pod(NODE, "default", "other", &[80], &[])
            .pod(NODE, "guests", "visitor", &[80], &[]),
    )
}

/// A harness pod as a manifest (same name, addresses, node; Running), with these labels.
fn pod_doc(c: &Cluster, namespace: &str, name: &str, l: &[(&str, &str)]) -> String {
    pod_yaml(c.pod_spec(namespace, name), &labels(l))
}

/// Both namespaces (no labels) and every pod labelled `app: <its name>`.
fn base_manifests(c: &Cluster) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    out.push_str(&namespace_yaml("guests", &BTreeMap::new()));
    for p in c.pods() {
        out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
    }
    out
}

/// A NetworkPolicy in `default`; `spec` is indented YAML.
fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}"
    )
}

/// Every pod of `default` isolated for ingress.
fn deny_ingress() -> String {
    policy(
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    )
}

/// `web` accepts TCP 80 from pods of `default` labelled `app: <app>`.
fn web_allows(name: &str, app: &str) -> String {
    policy(
        name,
        &format!(
            "  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]\n    ports: [{{protocol: TCP, port: 80}}]\n"
        ),
    )
}

/// `web` accepts TCP 80 from every pod of namespaces labelled `team: <team>`.
fn web_allows_team(name: &str, team: &str) -> String {
    policy(
        name,
        &format!(
            "  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: {team}}}}}}}]\n    ports: [{{protocol: TCP, port: 80}}]\n"
        ),
    )
}

/// Apply every object of a YAML stream to the fake API server.
fn load(server: &FakeApiServer, yaml: &str) {
    for obj in objects_from_yaml(yaml) {
        server.apply(obj);
    }
}

// ───────────────────────────── probes ─────────────────────────────

/// Expected connectivity of the probes of [`probes`].
#[derive(Clone, Copy, Debug)]
struct Conn {
    client_web: bool,
    /// other → web, over IPv4 and IPv6.
    other_web: bool,
    visitor_web: bool,
    web_client: bool,
    client_visitor: bool,
}

impl Conn {
    fn bools(self) -> Vec<bool> {
        vec![
            self.client_web,
            self.other_web,
            self.other_web,
            self.visitor_web,
            self.web_client,
            self.client_visitor,
        ]
    }
}

/// No policy.
const OPEN: Conn = Conn {
    client_web: true,
    other_web: true,
    visitor_web: true,
    web_client: true,
    client_visitor: true,
};
/// `deny-ingress` alone: nothing reaches `default`; `guests` is not isolated.
const DENY: Conn = Conn {
    client_web: false,
    other_web: false,
    visitor_web: false,
    web_client: false,
    client_visitor: true,
};
/// `deny-ingress` + `web-allows-client`.
const ALLOW_CLIENT: Conn = Conn {
    client_web: true,
    ..DENY
};
/// `deny-ingress` + `web-allows-other`.
const ALLOW_OTHER: Conn = Conn {
    other_web: true,
    ..DENY
};

fn probes(c: &Cluster) -> Vec<Probe> {
    let web4 = c.pod_ip("default", "web", Family::V4);
    let web6 = c.pod_ip("default", "web", Family::V6);
    let client = c.pod_ip("default", "client", Family::V4);
    let visitor = c.pod_ip("guests", "visitor", Family::V4);
    vec![
        Probe::tcp(Endpoint::pod("default", "client"), web4, 80),
        Probe::tcp(Endpoint::pod("default", "other"), web4, 80),
        Probe::tcp(Endpoint::pod("default", "other"), web6, 80),
        Probe::tcp(Endpoint::pod("guests", "visitor"), web4, 80),
        Probe::tcp(Endpoint::pod("default", "web"), client, 80),
        Probe::tcp(Endpoint::pod("default", "client"), visitor, 80),
    ]
}

fn converge(c: &Cluster, expected: Conn, what: &str, agent: &Agent) {
    converge_within(c, expected, what, agent, CONVERGE);
}

fn converge_within(c: &Cluster, expected: Conn, what: &str, agent: &Agent, within: Duration) {
    let deadline = Instant::now() + within;
    let probes = probes(c);
    loop {
        match c.check(&probes, &expected.bools(), T) {
            Ok(()) => return,
            Err(report) if Instant::now() >= deadline => panic!(
                "{what}: not converged after {within:?}\n{report}\nagent log (tail):\n{}",
                agent.tail(40)
            ),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Probes round after round, each round matching `expected` exactly and `check` holding
/// after it, until `done` returns true; panics if that takes longer than `max`. Returns the
/// number of rounds.
fn hold(
    c: &Cluster,
    expected: Conn,
    what: &str,
    max: Duration,
    mut done: impl FnMut() -> bool,
    mut check: impl FnMut(),
) -> usize {
    let start = Instant::now();
    let probes = probes(c);
    let mut rounds = 0;
    loop {
        if let Err(report) = c.check(&probes, &expected.bools(), T) {
            panic!(
                "{what}: connectivity changed in round {rounds} ({:?} in)\n{report}",
                start.elapsed()
            );
        }
        check();
        rounds += 1;
        if done() {
            return rounds;
        }
        assert!(
            start.elapsed() < max,
            "{what}: the awaited condition did not come within {max:?}"
        );
    }
}

/// [`hold`] for a fixed time.
fn hold_for(c: &Cluster, expected: Conn, what: &str, d: Duration, check: impl FnMut()) -> usize {
    let start = Instant::now();
    hold(c, expected, what, d * 2, || start.elapsed() >= d, check)
}

// ───────────────────────────── the kernel ─────────────────────────────

/// `nft list table inet kube-nftpolicy` in the node, counters blanked; `None` if absent.
fn table(c: &Cluster) -> Option<String> {
    kernel::try_list_table(c, NODE).map(|t| without_counts(&t))
}

fn has_chain(listing: &str, chain: &str) -> bool {
    listing.contains(&format!("chain {chain} {{"))
}

/// Waits until the table satisfies `pred`; returns it.
#[track_caller]
fn wait_table(c: &Cluster, agent: &Agent, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let t = table(c);
        if let Some(t) = t.as_deref().filter(|t| pred(t)) {
            return t.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "table: {what} not within {CONVERGE:?}\n{}\nagent log (tail):\n{}",
            t.unwrap_or_else(|| "(no table)".into()),
            agent.tail(40)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A deleted policy's chain is flushed in the sync that drops it and deleted by the next one
/// (at the latest the periodic resync, 2 s here): wait for that before taking a snapshot
/// that later listings must equal.
#[track_caller]
fn wait_chain_gone(c: &Cluster, agent: &Agent, chain: &str) -> String {
    wait_table(c, agent, &format!("chain {chain} deleted"), |t| {
        !has_chain(t, chain)
    })
}

// ───────────────────────────── the agent process ─────────────────────────────

/// A running `kube-nftpolicy run` in the node namespace; SIGTERM (then SIGKILL) on drop.
struct Agent {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
}

impl Agent {
    /// `source` is `--kubeconfig F` or `--manifests D` (plus any extra flags).
    fn start(c: &Cluster, dir: &Path, name: &str, metrics_port: u16, source: &[&str]) -> Agent {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).expect("create agent log");
        let addr = format!("127.0.0.1:{metrics_port}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &c.netns_name(Endpoint::node(NODE)), BIN])
            .args(["run", "--node-name", NODE, "--metrics-addr", &addr])
            .args(["--coalesce-ms", "20", "--min-sync-interval-ms", "50"])
            .args(["--resync-interval-s", "2"])
            .args(source)
            .env("RUST_LOG", "info,rustables=warn")
            .env("NO_COLOR", "1")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for v in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            cmd.env_remove(v);
        }
        let child = cmd.spawn().expect("spawn ip netns exec kube-nftpolicy run");
        Agent {
            child,
            log,
            metrics_port,
        }
    }

    fn kube(c: &Cluster, dir: &Path, name: &str, port: u16, kubeconfig: &Path) -> Agent {
        let kc = kubeconfig.to_str().expect("utf-8 path");
        Agent::start(c, dir, name, port, &["--kubeconfig", kc])
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// The log so far, ANSI escapes removed, one entry per line.
    fn lines(&self) -> Vec<String> {
        let raw = std::fs::read(&self.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn syncs(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| is_sync_line(l))
            .collect()
    }

    fn lists_complete(&self, resource: &str) -> usize {
        self.count(|l| l.contains("list complete") && l.contains(&format!("\"{resource}\"")))
    }

    fn wait_log(&self, what: &str, within: Duration, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + within;
        while !pred(&self.lines()) {
            assert!(
                Instant::now() < deadline,
                "agent log: no {what} within {within:?}\nlog (tail):\n{}",
                self.tail(40)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_first_sync(&self) {
        self.wait_log("first sync", CONVERGE, |l| {
            l.iter().any(|l| is_sync_line(l))
        });
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait up to `within` for the exit; `None` if it is still running.
    fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        // SAFETY: plain syscall; the pid is our child (`ip netns exec` execs the agent), which
        // has not been reaped yet, so it cannot have been reused.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// `GET path` on the agent's admin address (inside the node namespace): the body.
    fn http_get(&self, c: &Cluster, path: &str) -> String {
        self.http(c, path).1
    }

    /// `GET path` on the agent's admin address (inside the node namespace): status and body.
    fn http(&self, c: &Cluster, path: &str) -> (u16, String) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let path = path.to_string();
        c.run_in_node(NODE, move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .expect("write request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read response");
            let status = out
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("no status line in {out:?}"));
            let body = out
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_string())
                .unwrap_or_default();
            (status, body)
        })
    }

    /// `kube_nftpolicy_sync_duration_seconds_count` by kind, from `/metrics`.
    fn sync_counts(&self, c: &Cluster) -> BTreeMap<String, u64> {
        let body = self.http_get(c, "/metrics");
        let mut out = BTreeMap::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("kube_nftpolicy_sync_duration_seconds_count{")
            else {
                continue;
            };
            let (labels, value) = rest.split_once("} ").expect("sample");
            let kind = labels
                .strip_prefix("kind=\"")
                .and_then(|k| k.strip_suffix('"'))
                .expect("kind label");
            out.insert(kind.to_string(), value.trim().parse().expect("count"));
        }
        out
    }

    /// CPU time (user + system) used so far, from /proc.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("agent /proc stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15; fields after `)` start at field 3.
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.running() && self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() || std::env::var_os("AGENT_E2E_LOGS").is_some() {
            eprintln!(
                "──── agent log {} (tail) ────\n{}\n────",
                self.log.display(),
                self.tail(80)
            );
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// A line whose message is exactly `sync` (the agent's per-sync line).
fn is_sync_line(line: &str) -> bool {
    line.split_once("kube_nftpolicy::agent: ")
        .is_some_and(|(_, msg)| msg.starts_with("sync ") && !msg.starts_with("sync failed"))
}

/// The value of `key=` in a log line, quotes removed.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let value = line[at..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

// ───────────────────────────── environments ─────────────────────────────

/// A cluster, the fake API server in its node namespace (with the base state), a kubeconfig.
struct KubeEnv {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    c: Cluster,
}

impl KubeEnv {
    fn new(opts: FakeApiServerOptions) -> KubeEnv {
        let c = cluster();
        let server = c.run_in_node(NODE, move || FakeApiServer::with_options(opts));
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        server
            .write_kubeconfig(&kubeconfig)
            .expect("write kubeconfig");
        load(&server, &base_manifests(&c));
        KubeEnv {
            server,
            kubeconfig,
            dir,
            c,
        }
    }

    fn agent(&self, name: &str, port: u16) -> Agent {
        Agent::kube(&self.c, self.dir.path(), name, port, &self.kubeconfig)
    }

    #[track_caller]
    fn wait_open_watches(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.server.open_watches() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} open watches after {within:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

// ───────────────────────────── tests ─────────────────────────────

#[test]
fn follows_the_api_server() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    let c = &env.c;
    let agent = env.agent("follows", 19871);

    // No policy: the agent programs its (empty) table and everything stays open.
    agent.wait_first_sync();
    assert!(table(c).is_some(), "the agent created its table");
    converge(c, OPEN, "no policy", &agent);

    let ask = "/debug/explain?from=default/client&to=default/web&port=80/TCP";
    let (status, body) = agent.http(c, ask);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("ingress of default/web (on node-1): allowed (no policy isolates it"),
        "{body}"
    );

    load(&env.server, &deny_ingress());
    converge(c, DENY, "default-deny ingress in default", &agent);
    // The agent explains from its live state what the kernel just did.
    let (status, body) = agent.http(c, ask);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(
            "ingress of default/web (on node-1): DENIED: isolated by default/deny-ingress"
        ) && body.ends_with("verdict: DENIED\n"),
        "{body}"
    );

    load(&env.server, &web_allows("web-allows-client", "client"));
    converge(c, ALLOW_CLIENT, "web allows app=client", &agent);
    let (status, body) = agent.http(c, &format!("{ask}&output=json"));
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["allowed"], true, "{body}");
    assert_eq!(
        answer["ingress"]["allowed_by"][0]["policy"], "default/web-allows-client",
        "{body}"
    );
    let (status, body) = agent.http(c, "/debug/explain?from=default/client&port=80");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("missing query parameter `to`"), "{body}");

    // Pod labels: `other` becomes app=client, `client` stops being one.
    load(
        &env.server,
        &pod_doc(c, "default", "other", &[("app", "client")]),
    );
    load(
        &env.server,
        &pod_doc(c, "default", "client", &[("app", "gone")]),
    );
    converge(c, ALLOW_OTHER, "relabelled pods", &agent);

    // Namespace labels, through a namespaceSelector.
    load(
        &env.server,
        &web_allows_team("web-allows-team-blue", "blue"),
    );
    wait_table(c, &agent, "chain of web-allows-team-blue", |t| {
        has_chain(t, "policy/default/web-allows-team-blue/ingress")
    });
    converge(c, ALLOW_OTHER, "no namespace is team=blue yet", &agent);
    load(
        &env.server,
        &namespace_yaml("guests", &labels(&[("team", "blue")])),
    );
    let blue = Conn {
        visitor_web: true,
        ..ALLOW_OTHER
    };
    converge(c, blue, "guests labelled team=blue", &agent);
    load(
        &env.server,
        &namespace_yaml("guests", &labels(&[("team", "red")])),
    );
    converge(c, ALLOW_OTHER, "guests relabelled team=red", &agent);

    // Deleting the policies reopens everything and leaves no policy or drop chain behind.
    for name in ["deny-ingress", "web-allows-client", "web-allows-team-blue"] {
        assert!(
            env.server
                .delete("NetworkPolicy", "default", name)
                .is_some(),
            "{name} existed"
        );
    }
    converge(c, OPEN, "policies deleted", &agent);
    let t = wait_table(c, &agent, "no policy or drop chain left", |t| {
        !t.contains("chain policy/") && !t.contains("/drop {")
    });
    assert!(has_chain(&t, "ingress"), "the base chains stay:\n{t}");
}

#[test]
fn no_write_before_initial_lists() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    let c = &env.c;
    let state = format!(
        "{}{}{}",
        base_manifests(c),
        deny_ingress(),
        web_allows("web-allows-client", "client")
    );
    load(&env.server, &state);

    // The rules of an earlier run: the same state applied with `kube-nftpolicy apply`.
    let manifest = env.dir.path().join("state.yaml");
    std::fs::write(&manifest, &state).expect("write manifests");
    let m = manifest.to_str().expect("utf-8 path");
    c.exec_ok(
        Endpoint::node(NODE),
        &[BIN, "apply", "--manifests", m, "--node", NODE],
        None,
    );
    let before = table(c).expect("apply created the table");
    assert!(has_chain(&before, "ingress/default/other/drop"));
    c.assert_reachability(&probes(c), &ALLOW_CLIENT.bools(), T);

    // Every list is slow, and NetworkPolicies cannot be listed at all (one object does not
    // decode), so for a while the agent knows pods and namespaces but no policy: exactly when
    // writing would open everything.
    env.server.set_latency(Duration::from_millis(1500));
    load(
        &env.server,
        &policy("broken", "  podSelector: \"not a selector\"\n"),
    );
    let agent = env.agent("lists", 19872);
    let start = Instant::now();
    let unchanged = || {
        let now = table(c).expect("the table is never deleted while the lists are incomplete");
        assert_eq!(
            now, before,
            "the table changed before the initial lists completed"
        );
    };
    // Rounds that ran while pods and namespaces were listed but policies were not.
    let mut window_rounds = 0;
    let rounds = hold(
        c,
        ALLOW_CLIENT,
        "while the lists are incomplete",
        Duration::from_secs(15),
        || {
            let partial = agent.lists_complete("pods") >= 1
                && agent.lists_complete("namespaces") >= 1
                && agent.lists_complete("networkpolicies") == 0;
            if partial {
                window_rounds += 1;
            }
            start.elapsed() >= Duration::from_millis(3000)
                && window_rounds >= 2
                && partial
                && agent.count(|l| l.contains("watch failed") && l.contains("networkpolicies")) >= 1
        },
        unchanged,
    );
    assert_eq!(agent.lists_complete("networkpolicies"), 0);
    assert!(agent.syncs().is_empty(), "no sync before all lists");
    // Nor does it explain from a partial state.
    let (status, body) = agent.http(
        c,
        "/debug/explain?from=default/client&to=default/web&port=80",
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("initial lists"), "{body}");
    assert!(
        rounds >= 3 && window_rounds >= 2,
        "probed {rounds} rounds, {window_rounds} with pods and namespaces listed but not policies"
    );
    assert!(
        agent.count(|l| l.contains("waiting for the initial lists")) >= 1,
        "the agent says it waits for the lists"
    );

    // The policy list becomes possible: the agent converges to the same ruleset.
    env.server.set_latency(Duration::ZERO);
    env.server.delete("NetworkPolicy", "default", "broken");
    agent.wait_log("networkpolicies list", CONVERGE * 2, |l| {
        l.iter()
            .any(|l| l.contains("list complete") && l.contains("\"networkpolicies\""))
    });
    agent.wait_first_sync();
    let first = agent.syncs()[0].clone();
    assert_eq!(field(&first, "kind"), Some("full"), "{first}");
    assert_eq!(
        table(c).expect("table"),
        before,
        "the agent's ruleset equals the one `apply` wrote from the same state"
    );
    converge(c, ALLOW_CLIENT, "after the lists", &agent);
    // And it is live.
    load(&env.server, &web_allows("web-allows-other", "other"));
    let both = Conn {
        other_web: true,
        ..ALLOW_CLIENT
    };
    converge(c, both, "a change after startup", &agent);
}

#[test]
fn api_server_outage_keeps_rules() {
    let _g = serial();
    // No bookmarks: the watchers' resourceVersions stay behind a compaction.
    let env = KubeEnv::new(FakeApiServerOptions {
        bookmark_interval: None,
        ..FakeApiServerOptions::default()
    });
    let c = &env.c;
    load(
        &env.server,
        &format!(
            "{}{}",
            deny_ingress(),
            web_allows("web-allows-client", "client")
        ),
    );
    let mut agent = env.agent("outage", 19873);
    converge(c, ALLOW_CLIENT, "initial", &agent);
    env.wait_open_watches(3, CONVERGE);
    let before = table(c).expect("table");

    // Outage: nothing changes in the kernel.
    env.server.stop();
    hold_for(
        c,
        ALLOW_CLIENT,
        "API server down",
        Duration::from_secs(3),
        || {
            assert_eq!(table(c).as_deref(), Some(before.as_str()), "table changed");
        },
    );
    assert!(
        agent.count(|l| l.contains("watch failed")) >= 1,
        "the agent noticed the outage"
    );

    // Changes while it is down, and the history compacted: the agent must relist to learn
    // that web-allows-client is gone.
    env.server
        .delete("NetworkPolicy", "default", "web-allows-client")
        .expect("existed");
    load(&env.server, &web_allows("web-allows-other", "other"));
    env.server.compact();
    let lists = env.server.initial_list_count(NETPOL_PATH);
    let netpol_lists = agent.lists_complete("networkpolicies");
    env.server.start();
    // The watchers' backoff (kube-runtime: 0.8 s doubling up to 30 s, each step plus up to
    // 100% jitter) grew during the outage, and the 410 on re-watch is one more error: the
    // relist may come up to ~20 s later (typically 2-6 s).
    let slow = CONVERGE * 3;
    let restarted = Instant::now();
    converge_within(c, ALLOW_OTHER, "after the outage", &agent, slow);
    eprintln!(
        "caught up {:?} after the API server came back",
        restarted.elapsed()
    );
    assert!(env.server.initial_list_count(NETPOL_PATH) > lists);
    assert!(agent.lists_complete("networkpolicies") > netpol_lists);

    // 410 Gone on re-watch: move the resourceVersion on with another kind, compact, drop the
    // watches. Pods and policies relist; no window opens and the result is the same table.
    // The lists are slow (1 s), so that state dropped at the start of a relist (the watcher's
    // `Init` comes before the list request) would reach the kernel before the list completes.
    env.wait_open_watches(3, slow);
    let before = wait_chain_gone(c, &agent, "policy/default/web-allows-client/ingress");
    load(&env.server, &namespace_yaml("unrelated", &BTreeMap::new()));
    env.server.compact();
    env.server.set_latency(Duration::from_secs(1));
    let lists = env.server.initial_list_count(NETPOL_PATH);
    let netpol_lists = agent.lists_complete("networkpolicies");
    let expired = agent.count(|l| l.contains("watch failed") && l.contains("Expired"));
    let dropped = env.server.drop_watches();
    assert!(dropped >= 2, "dropped {dropped} watches");
    let mut relisted_at: Option<Instant> = None;
    hold(
        c,
        ALLOW_OTHER,
        "relist after 410 Gone",
        CONVERGE,
        || {
            if relisted_at.is_none() && agent.lists_complete("networkpolicies") > netpol_lists {
                relisted_at = Some(Instant::now());
            }
            relisted_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(500))
        },
        || {
            assert_eq!(table(c).as_deref(), Some(before.as_str()), "table changed");
        },
    );
    env.server.set_latency(Duration::ZERO);
    assert!(
        env.server.initial_list_count(NETPOL_PATH) > lists,
        "policies were listed again"
    );
    assert!(
        agent.count(|l| l.contains("watch failed") && l.contains("Expired")) > expired,
        "the agent saw 410 Gone (Expired) on re-watch"
    );
    assert!(agent.running(), "the agent is still running");
}

#[test]
fn restart_never_opens() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    let c = &env.c;
    load(
        &env.server,
        &format!(
            "{}{}",
            deny_ingress(),
            web_allows("web-allows-client", "client")
        ),
    );
    let mut first = env.agent("first", 19874);
    converge(c, ALLOW_CLIENT, "first agent", &first);
    let before = table(c).expect("table");

    let t0 = Instant::now();
    let status = first
        .terminate(Duration::from_secs(5))
        .expect("the agent exits within 5 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    eprintln!("agent exited {:?} after SIGTERM", t0.elapsed());
    assert!(
        first.count(|l| l.contains("the ruleset stays in force")) == 1,
        "the agent says the rules stay"
    );
    assert_eq!(
        table(c),
        Some(before.clone()),
        "SIGTERM left the table as it was"
    );
    converge(c, ALLOW_CLIENT, "no agent", &first);

    // A new agent against a slow API server: nothing opens while it starts.
    env.server.set_latency(Duration::from_millis(2500));
    let second = env.agent("second", 19875);
    let mut synced_at: Option<Instant> = None;
    let mut rounds_before_sync = 0;
    hold(
        c,
        ALLOW_CLIENT,
        "while the new agent starts",
        Duration::from_secs(15),
        || {
            if synced_at.is_none() {
                if second.syncs().is_empty() {
                    rounds_before_sync += 1;
                } else {
                    synced_at = Some(Instant::now());
                }
            }
            synced_at.is_some_and(|t| t.elapsed() >= Duration::from_millis(500))
        },
        || {
            // Same state, so the same table before, during and after the new agent's first
            // sync (which rewrites it in one atomic transaction).
            let t = table(c).expect("the table is never deleted");
            assert_eq!(t, before, "the table changed while the new agent started");
        },
    );
    assert!(
        rounds_before_sync >= 2,
        "probed {rounds_before_sync} rounds before the new agent's first sync"
    );
    assert!(has_chain(&before, "ingress/default/other/drop"));

    env.server.set_latency(Duration::ZERO);
    load(&env.server, &web_allows("web-allows-other", "other"));
    let both = Conn {
        other_web: true,
        ..ALLOW_CLIENT
    };
    converge(c, both, "the new agent follows changes", &second);
}

#[test]
fn manifests_mode_follows_files() {
    let _g = serial();
    let c = cluster();
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    // Atomic rewrites (the reader must not see half a file; that case is the malformed one).
    let write = |name: &str, text: &str| {
        let tmp = manifests.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, manifests.join(name)).expect("rename");
    };
    write("cluster.yaml", &base_manifests(&c));
    write(
        "policies.yaml",
        &format!(
            "{}{}",
            deny_ingress(),
            web_allows("web-allows-client", "client")
        ),
    );
    let m = manifests.to_str().expect("utf-8 path");
    let agent = Agent::start(
        &c,
        dir.path(),
        "manifests",
        19876,
        &["--manifests", m, "--manifests-poll-ms", "100"],
    );
    converge(&c, ALLOW_CLIENT, "initial files", &agent);

    write(
        "policies.yaml",
        &format!(
            "{}{}",
            deny_ingress(),
            web_allows("web-allows-other", "other")
        ),
    );
    converge(&c, ALLOW_OTHER, "policies.yaml rewritten", &agent);
    let good = wait_chain_gone(&c, &agent, "policy/default/web-allows-client/ingress");

    // A malformed policies.yaml (as after a botched edit): an error naming the file, and the
    // last good ruleset stays.
    write(
        "policies.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: default\nspec: [\n",
    );
    let path = manifests.join("policies.yaml").display().to_string();
    agent.wait_log("error naming policies.yaml", CONVERGE, |l| {
        l.iter()
            .any(|l| l.contains("ERROR") && l.contains(&path) && l.contains("malformed"))
    });
    hold_for(
        &c,
        ALLOW_OTHER,
        "malformed policies.yaml",
        Duration::from_millis(1500),
        || assert_eq!(table(&c).as_deref(), Some(good.as_str()), "table changed"),
    );

    write("policies.yaml", &deny_ingress());
    converge(&c, DENY, "policies.yaml fixed", &agent);
}

#[test]
fn structured_logs_one_line_per_sync_and_invalid_policy_warning() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    let c = &env.c;
    let agent = env.agent("logs", 19877);
    agent.wait_first_sync();
    converge(c, OPEN, "no policy", &agent);

    // An ipBlock whose except lies outside its cidr: the agent warns, naming the policy, and
    // the pods it selects are still isolated (nothing is allowed).
    load(
        &env.server,
        &policy(
            "bad-except",
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/24]}}]\n",
        ),
    );
    let web_isolated = Conn {
        client_web: false,
        other_web: false,
        visitor_web: false,
        ..OPEN
    };
    converge(c, web_isolated, "invalid policy isolates web", &agent);
    let warnings: Vec<String> = agent
        .lines()
        .into_iter()
        .filter(|l| l.contains("WARN") && l.contains("default/bad-except"))
        .collect();
    assert!(
        warnings.iter().any(|l| l.contains("invalid")),
        "a warning names default/bad-except as invalid:\n{}",
        agent.tail(40)
    );

    load(&env.server, &deny_ingress());
    converge(c, DENY, "deny-ingress added", &agent);
    env.server
        .delete("NetworkPolicy", "default", "bad-except")
        .expect("existed");
    env.server
        .delete("NetworkPolicy", "default", "deny-ingress")
        .expect("existed");
    converge(c, OPEN, "policies deleted", &agent);

    // One `sync` line per sync: the lines agree with the agent's own sync counters.
    let deadline = Instant::now() + CONVERGE;
    let (lines, counts) = loop {
        let m1 = agent.sync_counts(c);
        let lines = agent.syncs();
        let m2 = agent.sync_counts(c);
        if m1 == m2 {
            break (lines, m1);
        }
        assert!(Instant::now() < deadline, "sync counters never settled");
    };
    assert!(lines.len() >= 4, "at least 4 syncs:\n{}", lines.join("\n"));
    assert_eq!(field(&lines[0], "kind"), Some("full"), "{}", lines[0]);
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for l in &lines {
        let kind = field(l, "kind").unwrap_or_else(|| panic!("kind= in {l}"));
        assert!(matches!(kind, "full" | "partial"), "{l}");
        let ms: f64 = field(l, "duration_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("duration_ms= in {l}"));
        assert!(ms > 0.0 && ms < 10_000.0, "{l}");
        let bytes: usize = field(l, "bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bytes= in {l}"));
        assert!(bytes > 0, "{l}");
        *by_kind.entry(kind.to_string()).or_default() += 1;
    }
    assert_eq!(
        by_kind,
        counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect::<BTreeMap<_, _>>(),
        "one sync line per sync (log vs kube_nftpolicy_sync_duration_seconds_count)\n{}",
        lines.join("\n")
    );
}

/// Not an assertion of speed: measures, for the benchmark docs, the time from the fake API
/// server accepting a change to the kernel holding it, and writes `target/latency-report.txt`.
#[test]
fn event_to_kernel_latency_report() {
    const N: usize = 20;
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    let c = &env.c;
    let agent = env.agent("latency", 19878);
    agent.wait_first_sync();
    env.wait_open_watches(3, CONVERGE);

    let server = &env.server;
    let samples: Vec<Duration> = c.run_in_node(NODE, || {
        let mut out = Vec::new();
        let mut last_error: Option<String> = None;
        for i in 0..N {
            let name = format!("lat-{i:02}");
            let chain = format!("policy/default/{name}/ingress");
            let obj = objects_from_yaml(&web_allows(&name, "client"));
            // Sleep past the agent's min sync interval so that every change stands alone.
            thread::sleep(Duration::from_millis(150));
            for o in obj {
                server.apply(o);
            }
            let t0 = Instant::now();
            loop {
                // A dump that overlaps the agent's transaction fails with NLM_F_DUMP_INTR
                // (ConcurrentGenerationUpdate); like nft, just read again.
                match kube_nftpolicy::kernel::nft::readback::read(&|_: &str| false) {
                    Ok(k) if k.chains.contains_key(&chain) => {
                        out.push(t0.elapsed());
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => last_error = Some(e.to_string()),
                }
                assert!(
                    t0.elapsed() < CONVERGE,
                    "change {i} ({chain}) never reached the kernel (last read-back error: {last_error:?})"
                );
                thread::sleep(Duration::from_millis(2));
            }
        }
        out
    });
    converge(
        c,
        Conn {
            other_web: false,
            visitor_web: false,
            ..OPEN
        },
        "web allows only client",
        &agent,
    );

    let mut sorted = samples.clone();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pick = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let sync_ms: Vec<f64> = agent
        .syncs()
        .iter()
        .filter_map(|l| field(l, "duration_ms")?.parse().ok())
        .collect();
    let report = format!(
        "event_to_kernel_latency: {N} successive NetworkPolicy creations through the fake API server, \
         agent with --coalesce-ms 20 --min-sync-interval-ms 50 (debug build, 1 node, 4 pods)\n\
         from apply() returning to the policy chain being in the kernel (netlink poll every 2 ms):\n\
         min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms\n\
         samples (ms): {}\n\
         agent sync duration_ms over the run: {}\n",
        ms(sorted[0]),
        ms(pick(0.5)),
        ms(pick(0.9)),
        ms(sorted[sorted.len() - 1]),
        samples
            .iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" "),
        sync_ms
            .iter()
            .map(|d| format!("{d:.1}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    eprintln!("{report}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/latency-report.txt");
    std::fs::write(&path, &report).expect("write target/latency-report.txt");
}

/// Regression: until the three initial lists completed, the sync loop `continue`d without
/// moving its resync timer on, so once the resync interval had passed it spun on a full CPU
/// for as long as the API server stayed unreachable. It now waits only for changes.
#[test]
fn sync_loop_idles_while_waiting_for_initial_lists() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions::default());
    env.server.stop();
    let agent = Agent::kube(&env.c, env.dir.path(), "spin", 19879, &env.kubeconfig);
    // Past the 2 s resync interval, then measure 3 s of waiting for an unreachable API server.
    thread::sleep(Duration::from_millis(2500));
    let cpu0 = agent.cpu_time();
    thread::sleep(Duration::from_secs(3));
    let used = agent.cpu_time() - cpu0;
    assert!(agent.syncs().is_empty());
    assert!(
        used < Duration::from_millis(300),
        "the agent used {used:?} of CPU in 3 s while waiting for an unreachable API server"
    );
}

/// `(group, resource)` of an API path (`/api/v1/pods`, `/apis/networking.k8s.io/v1/...`,
/// `/api/v1/namespaces/<ns>/pods`, `/api/v1/namespaces/<name>`).
fn api_resource(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs[..] {
        ["api", _version, ref rest @ ..] => ("", rest),
        ["apis", group, _version, ref rest @ ..] => (group, rest),
        _ => return None,
    };
    let resource = match rest {
        ["namespaces", _, resource, ..] => resource,
        [resource, ..] => resource,
        [] => return None,
    };
    Some((group.to_string(), resource.to_string()))
}

/// What deploy/rbac.yaml grants is `watch::api_access()` (tests/deploy.rs); this checks that
/// a running agent, through its first lists, watch events, a dropped watch and a relist after
/// a compaction, sends no request outside it, and uses every grant. The API server refuses
/// streaming lists, so the agent uses both ways it can list: the streaming WATCH it tries
/// first, then LISTs.
#[test]
fn api_requests_stay_within_the_declared_access() {
    let _g = serial();
    let env = KubeEnv::new(FakeApiServerOptions {
        streaming_lists: false,
        ..FakeApiServerOptions::default()
    });
    let c = &env.c;
    let agent = env.agent("rbac", 19876);
    agent.wait_first_sync();
    env.wait_open_watches(3, CONVERGE);
    load(&env.server, &deny_ingress());
    converge(c, DENY, "a policy arrives by watch", &agent);

    // A dropped watch is resumed; a compacted history forces a relist (410 Gone).
    env.server.compact();
    assert!(env.server.drop_watches() >= 3, "three watches to drop");
    load(&env.server, &web_allows("web-allows-client", "client"));
    converge(c, ALLOW_CLIENT, "a policy after the relist", &agent);
    env.wait_open_watches(3, CONVERGE);
    drop(agent);

    let declared: std::collections::BTreeSet<(String, String, String)> =
        kube_nftpolicy::cluster::watch::api_access()
            .into_iter()
            .flat_map(|a| {
                a.verbs
                    .into_iter()
                    .map(move |v| (a.group.clone(), a.resource.clone(), v.to_string()))
            })
            .collect();
    let mut used = std::collections::BTreeSet::new();
    let requests = env.server.requests();
    for r in &requests {
        let Some((group, resource)) = api_resource(&r.path) else {
            panic!(
                "the agent requested {} {} (verb {}), outside the resource API",
                r.method, r.path, r.verb
            );
        };
        let grant = (group, resource, r.verb.clone());
        assert!(
            declared.contains(&grant),
            "the agent sent {} {} ({grant:?}), which watch::api_access() (and so deploy/rbac.yaml) does not grant",
            r.method,
            r.path
        );
        used.insert(grant);
    }
    assert_eq!(
        used,
        declared,
        "every declared grant is used ({} requests)",
        requests.len()
    );
    let lists = requests.iter().filter(|r| r.verb == "list").count();
    // Watchers whose resourceVersion is older than the compaction relist (the policy
    // watcher may have seen the newest event and just resume).
    assert!(
        lists > 3,
        "three first lists and at least one relist: {lists} lists"
    );
}
