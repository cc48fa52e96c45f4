//! Established flows follow policy (`--enforce-established`), proven with real packets: TCP
//! and UDP flows that a policy allowed, then denies, stop at their next packet once the
//! conntrack pass has run (and keep flowing without it), flows the new rules still allow keep
//! flowing, and the flows of a pod that is gone are removed. Every conntrack entry touched
//! is in the node namespace of a cluster this test made; the host's table is never read or
//! changed. Both layouts; then the same through the agent binary, on and off.

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use kernel::{NodeDataplanes, labels, pod_yaml, serial};
use kube_nftpolicy::agent::established;
use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::compile::node_policy;
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::resolve::NodePolicy;
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe};

const T: Duration = Duration::from_millis(600);
const ECHO_PORT: u16 = 9090;
const UDP_PORT: u16 = 53;
const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");

fn cluster(layout: Layout) -> Cluster {
    Cluster::new(
        ClusterSpec::new(layout)
            .node("node-1")
            .pod("node-1", "default", "web", &[80], &[UDP_PORT])
            .pod("node-1", "default", "client", &[80], &[])
            .pod("node-1", "default", "other", &[80], &[]),
    )
}

/// `web` accepts everything from pods labelled `app` in `apps`.
fn web_allows(apps: &[&str]) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web-allows, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchExpressions: [{{key: app, operator: In, values: [{}]}}]}}}}]\n",
        apps.join(", ")
    )
}

fn manifests(c: &Cluster, pods: &[&str], policy: &str) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    for p in c.pods().iter().filter(|p| pods.contains(&p.name.as_str())) {
        out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
    }
    out.push_str(policy);
    out
}

fn node_policy_of(text: &str, planes: &NodeDataplanes) -> NodePolicy {
    let m = parse_sources(&[("state.yaml".into(), text.to_string())]).expect("manifests");
    let mut idx = Index::new();
    idx.reset_namespaces(m.namespaces);
    idx.reset_pods(m.pods);
    idx.reset_policies(m.policies);
    node_policy(&idx.snapshot(), "node-1", &planes.options_for("node-1"))
}

/// A TCP echo server of our own in `web` (the harness's servers close after one reply), so a
/// connection stays open. It stops when the flag is set.
fn echo_server(c: &Cluster, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let listener = c.run_in(Endpoint::pod("default", "web"), || {
        let l = TcpListener::bind(("::", ECHO_PORT)).expect("bind echo");
        l.set_nonblocking(true).expect("nonblocking");
        l
    });
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let stop = stop.clone();
                    thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 256];
                        while !stop.load(Ordering::SeqCst) {
                            match conn.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// An established flow from a pod to `web`.
enum Flow {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Flow {
    fn open_tcp(c: &Cluster, from: &str, to: SocketAddr) -> Flow {
        let s = c.run_in(Endpoint::pod("default", from), move || {
            TcpStream::connect_timeout(&to, T).expect("connect while allowed")
        });
        s.set_read_timeout(Some(T)).expect("timeout");
        Flow::Tcp(s)
    }

    fn open_udp(c: &Cluster, from: &str, to: SocketAddr) -> Flow {
        let s = c.run_in(Endpoint::pod("default", from), move || {
            let s = UdpSocket::bind("[::]:0").expect("bind");
            s.connect(to).expect("connect");
            s
        });
        s.set_read_timeout(Some(T)).expect("timeout");
        Flow::Udp(s)
    }

    /// Does a packet of the flow still get its echo?
    fn echoes(&mut self, token: &[u8]) -> bool {
        let mut buf = [0u8; 256];
        match self {
            Flow::Tcp(s) => {
                if s.write_all(token).is_err() {
                    return false;
                }
                let mut got = Vec::new();
                let deadline = Instant::now() + T;
                while got.len() < token.len() && Instant::now() < deadline {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                got == token
            }
            Flow::Udp(s) => {
                let _ = s.send(token);
                matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == token)
            }
        }
    }
}

/// client's TCP and UDP flows, and other's, to web (IPv4).
fn open_flows(c: &Cluster) -> Vec<(&'static str, Flow)> {
    let web = c.pod_ip("default", "web", Family::V4);
    vec![
        (
            "client tcp",
            Flow::open_tcp(c, "client", (web, ECHO_PORT).into()),
        ),
        (
            "client udp",
            Flow::open_udp(c, "client", (web, UDP_PORT).into()),
        ),
        (
            "other tcp",
            Flow::open_tcp(c, "other", (web, ECHO_PORT).into()),
        ),
        (
            "other udp",
            Flow::open_udp(c, "other", (web, UDP_PORT).into()),
        ),
    ]
}

fn echoes(flows: &mut [(&'static str, Flow)], token: &str) -> Vec<(&'static str, bool)> {
    flows
        .iter_mut()
        .map(|(name, f)| (*name, f.echoes(token.as_bytes())))
        .collect()
}

fn expect(got: Vec<(&'static str, bool)>, want: &[bool], what: &str) {
    let names: Vec<&str> = got.iter().map(|(n, _)| *n).collect();
    let values: Vec<bool> = got.iter().map(|(_, v)| *v).collect();
    assert_eq!(values, want, "{what}: flows {names:?}");
}

#[test]
fn denied_established_flows_stop_at_their_next_packet_after_the_pass() {
    let _g = serial();
    for layout in [Layout::Routed, Layout::Bridge] {
        let c = cluster(layout);
        let stop = Arc::new(AtomicBool::new(false));
        let server = echo_server(&c, stop.clone());
        let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
        let all = ["web", "client", "other"];

        let v1 = manifests(&c, &all, &web_allows(&["client", "other"]));
        planes.sync_text(&c, &v1);
        let mut flows = open_flows(&c);
        expect(echoes(&mut flows, "v1"), &[true; 4], "allowed by v1");

        // v2 denies client. Without the pass, its established flows go on.
        let v2 = manifests(&c, &all, &web_allows(&["other"]));
        planes.sync_text(&c, &v2);
        expect(
            echoes(&mut flows, "v2, no pass"),
            &[true; 4],
            &format!("{layout:?}: established flows outlive the change without the pass"),
        );
        let web = c.pod_ip("default", "web", Family::V4);
        assert!(
            !c.probe(
                &Probe::tcp(Endpoint::pod("default", "client"), web, ECHO_PORT),
                T
            ),
            "a new connection from client is denied"
        );

        // The pass, as the agent runs it after the sync.
        let np = node_policy_of(&v2, &planes);
        let report = planes
            .with(&c, "node-1", |_| established::pass(&np, &BTreeSet::new()))
            .expect("conntrack pass");
        assert_eq!(
            (report.denied, report.pod_gone),
            (2, 0),
            "{layout:?}: client's TCP and UDP flows, nothing else: {report:?}"
        );
        expect(
            echoes(&mut flows, "v2, after the pass"),
            &[false, false, true, true],
            &format!("{layout:?}: client's flows stop, other's keep flowing"),
        );
        // A second pass finds nothing more to do: allowed flows are left alone.
        let again = planes
            .with(&c, "node-1", |_| established::pass(&np, &BTreeSet::new()))
            .expect("second pass");
        assert_eq!((again.denied, again.pod_gone), (0, 0), "{again:?}");
        expect(
            echoes(&mut flows[2..], "v2, second pass"),
            &[true, true],
            "other's flows untouched by a second pass",
        );

        // `other` goes: its address is unknown now, and its flows are removed as gone.
        let before: BTreeSet<IpAddr> = np.local_addrs.clone();
        let v3 = manifests(&c, &["web", "client"], &web_allows(&["other"]));
        planes.sync_text(&c, &v3);
        let np3 = node_policy_of(&v3, &planes);
        let gone: BTreeSet<IpAddr> = before.difference(&np3.local_addrs).copied().collect();
        let report = planes
            .with(&c, "node-1", |_| established::pass(&np3, &gone))
            .expect("pass after the pod went");
        assert_eq!(
            (report.denied, report.pod_gone),
            (0, 2),
            "{layout:?}: the gone pod's TCP and UDP flows: {report:?}"
        );
        expect(
            echoes(&mut flows[2..], "v3"),
            &[false, false],
            "the gone pod's flows stop",
        );
        stop.store(true, Ordering::SeqCst);
        let _ = server.join();
    }
}

// ───────────────────────────── through the agent ─────────────────────────────

struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(c: &Cluster, dir: &std::path::Path, name: &str, port: u16, extra: &[&str]) -> Agent {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).expect("log");
        let manifests = dir.join("manifests");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.netns_name(Endpoint::node("node-1")),
                BIN,
            ])
            .args(["run", "--node-name", "node-1"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--manifests", manifests.to_str().expect("utf-8")])
            .args(["--manifests-poll-ms", "50", "--coalesce-ms", "5"])
            .args([
                "--pod-cidr",
                "10.244.1.0/24",
                "--pod-cidr",
                "fd00:10:244:1::/64",
            ])
            .args(extra)
            .env("RUST_LOG", "info,rustables=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn syncs(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.split_once("kube_nftpolicy::agent: ")
                    .is_some_and(|(_, m)| m.starts_with("sync ") && !m.starts_with("sync failed"))
            })
            .count()
    }

    fn wait_syncs(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.syncs() < n {
            assert!(
                Instant::now() < deadline,
                "no sync #{n} within 10s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(dir: &std::path::Path, text: &str) {
    let tmp = dir.join("state.yaml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join("manifests/state.yaml")).expect("rename");
}

#[test]
fn the_agent_removes_denied_flows_within_one_sync_and_leaves_them_when_told_to() {
    let _g = serial();
    let c = cluster(Layout::Routed);
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(&c, stop.clone());
    let all = ["web", "client", "other"];
    for (enforce, port) in [(true, 19931u16), (false, 19932u16)] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("manifests")).expect("mkdir");
        write(
            dir.path(),
            &manifests(&c, &all, &web_allows(&["client", "other"])),
        );
        let flag = format!("--enforce-established={enforce}");
        let agent = Agent::start(&c, dir.path(), "agent", port, &[&flag]);
        agent.wait_syncs(1);
        let mut flows = open_flows(&c);
        expect(echoes(&mut flows, "allowed"), &[true; 4], "allowed");

        let synced = agent.syncs();
        write(dir.path(), &manifests(&c, &all, &web_allows(&["other"])));
        agent.wait_syncs(synced + 1);
        // The pass runs in the sync's own task, before the next sync can start: one sync.
        let deadline = Instant::now() + Duration::from_secs(2);
        let want = if enforce {
            [false, false, true, true]
        } else {
            [true; 4]
        };
        loop {
            let got = echoes(&mut flows, "after");
            let values: Vec<bool> = got.iter().map(|(_, v)| *v).collect();
            if values == want || Instant::now() > deadline {
                expect(got, &want, &format!("--enforce-established={enforce}"));
                break;
            }
        }
        let log = agent.log();
        assert_eq!(
            log.contains("removed established flows"),
            enforce,
            "the removal is logged exactly when enforced:\n{log}"
        );
        let metrics = c.run_in(Endpoint::node("node-1"), move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics");
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("get");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            body
        });
        let removed = metrics
            .lines()
            .find(|l| {
                l.starts_with("kube_nftpolicy_conntrack_flows_removed_total{reason=\"denied\"}")
            })
            .unwrap_or_else(|| panic!("no removal metric:\n{metrics}"));
        let want_metric = if enforce { " 2" } else { " 0" };
        assert!(removed.ends_with(want_metric), "{removed}");
    }
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
}

#[test]
fn unknown_addresses_stay_dropped_while_the_agent_is_stopped() {
    let _g = serial();
    let c = cluster(Layout::Routed);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("manifests")).expect("mkdir");
    // `other` runs, but its address is not in the cluster state yet; no policy anywhere.
    write(dir.path(), &manifests(&c, &["web", "client"], ""));
    let probes = |c: &Cluster| {
        let ip = |n: &str, f: Family| c.pod_ip("default", n, f);
        let mut out = Vec::new();
        for f in [Family::V4, Family::V6] {
            out.push(Probe::tcp(
                Endpoint::pod("default", "client"),
                ip("web", f),
                80,
            ));
            out.push(Probe::tcp(
                Endpoint::pod("default", "client"),
                ip("other", f),
                80,
            ));
            out.push(Probe::tcp(
                Endpoint::pod("default", "other"),
                ip("web", f),
                80,
            ));
        }
        c.probe_all(&out, T)
    };
    let unknown = vec![true, false, false, true, false, false];
    {
        let agent = Agent::start(&c, dir.path(), "first", 19933, &[]);
        agent.wait_syncs(1);
        assert_eq!(probes(&c), unknown, "agent running: other is unknown");
    } // the agent is killed here (SIGKILL): nothing runs on the node any more
    assert_eq!(
        probes(&c),
        unknown,
        "agent stopped: the rule is in the kernel"
    );
    write(dir.path(), &manifests(&c, &["web", "client", "other"], ""));
    assert_eq!(
        probes(&c),
        unknown,
        "agent stopped, other now in the cluster state: still dropped until programmed"
    );
    let agent = Agent::start(&c, dir.path(), "second", 19934, &[]);
    agent.wait_syncs(1);
    assert_eq!(
        probes(&c),
        vec![true; 6],
        "the first sync that knows other (no policy) connects it"
    );
}
