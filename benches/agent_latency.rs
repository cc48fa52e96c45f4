//! The real agent at cluster scale: event-to-kernel latency and memory.
//!
//! Serves the 10,000-pod / 1,000-policy synthetic cluster from the fake API server (real
//! list/watch over HTTP) to the release `kube-nftpolicy run` binary for `node-7`, both inside
//! a network namespace this benchmark creates (needs root). Then, one at a time, it adds a pod
//! on another node that `node-7`'s egress policies reach, and times from the API server
//! accepting it to the kernel announcing the new set element (`nft monitor`, which prints
//! each committed change), and the same for deleting it. It also reports the agent's peak RSS
//! (VmHWM) with the whole cluster in its caches.
//!
//! With fail-closed unknown addresses (`--pod-cidr 10.200.7.0/24` for `node-7`), it also
//! times a new pod *of node-7* from its address appearing in the API server to the kernel
//! adding the address to `local-pods-v4` (from then on the pod's own rules apply, and until
//! then its address is dropped), and its deletion back to unknown.
//!
//! Then it changes NetworkPolicies that select pods of `node-7` (one more port each time, so
//! every change is visible as a rewritten rule in `nft monitor`), one at a time and in a burst
//! of 100 applied at once, and moves namespaces between environments (in and out of the
//! namespace selectors spanning every `prod` namespace), timing each from the API server to
//! the kernel.
//!
//! Run: `cargo bench --bench agent_latency` (as root). `AGENT_SAMPLES` sets the number of
//! changes of each kind (default 200); `AGENT_SCALE=10` serves the 10× cluster (100,000 pods,
//! 10,000 policies). Figures are recorded in docs/benchmarks.md.
//!
//! Where the memory goes: `AGENT_WRAPPER` is a command the agent is started under (for
//! example `AGENT_WRAPPER="heaptrack -o /tmp/agent"`), and `AGENT_STOP_AFTER_READY=1` stops
//! the agent right after the first sync, so the profile covers start-up and the first sync.
//! Under a wrapper the VmHWM figures are the wrapper's, not the agent's.

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/synthetic.rs"]
mod synthetic;
#[path = "support/toggle.rs"]
mod toggle;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fake_apiserver::FakeApiServer;
use nix::sched::{CloneFlags, setns};

const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");
const NODE: &str = "node-7";
const METRICS: &str = "127.0.0.1:19901";
/// node-7's pod range for the fail-closed measurement; the synthetic pods are elsewhere.
const LOCAL_RANGE: &str = "10.200.7.0/24";

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Kills a child process when dropped, so a failed run leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&METRICS.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let code = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let q = |p: f64| ms(v[((v.len() as f64 * p) as usize).min(v.len() - 1)]);
    println!(
        "{name:<40} median {:>6.1} ms  p90 {:>6.1} ms  p99 {:>6.1} ms  min {:>6.1} ms  max {:>6.1} ms  (n={})",
        q(0.5),
        q(0.9),
        q(0.99),
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    );
}

/// `nft monitor` in this namespace: every committed change, time-stamped as it is read.
fn monitor() -> (Guard, mpsc::Receiver<(Instant, String)>) {
    let mut monitor = Guard(
        Command::new("nft")
            .args(["monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("nft monitor"),
    );
    let out = monitor.0.stdout.take().expect("monitor stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    // `nft monitor` reads the whole ruleset before it prints anything (at 100,000 pods, the
    // agent's 200,000 elements take seconds), and misses what is committed meanwhile: wait
    // until it reports a table of our own coming and going.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let nft = |args: &[&str]| {
            let _ = Command::new("nft").args(args).status();
        };
        nft(&["add", "table", "inet", "bench_monitor_probe"]);
        nft(&["delete", "table", "inet", "bench_monitor_probe"]);
        let seen = std::iter::from_fn(|| lines.recv_timeout(Duration::from_millis(500)).ok())
            .any(|(_, line)| line.contains("bench_monitor_probe"));
        if seen {
            // Drain the probe's other line.
            while lines.recv_timeout(Duration::from_millis(100)).is_ok() {}
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nft monitor printed nothing in 120 s"
        );
    }
    (monitor, lines)
}

/// Does a line of `nft monitor` name `item` whole (an address, `. <port>`, or `{ … }`)?
fn mentions(line: &str, item: &str) -> bool {
    [" ", ",", "\n"].iter().any(|end| {
        line.match_indices(item).any(|(at, _)| {
            line[at + item.len()..].starts_with(end) || at + item.len() == line.len()
        })
    })
}

/// Wait for a line of `nft monitor` that mentions `needle`, returning when it was read.
fn wait_for(lines: &mpsc::Receiver<(Instant, String)>, verb: &str, needle: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) if line.starts_with(verb) && mentions(&line, needle) => return at,
            Ok((_, line)) => seen.push(line.chars().take(200).collect()),
            Err(_) => panic!(
                "the kernel never showed `{verb} … {needle}` within 10 s; it showed {} lines, the last: {:#?}",
                seen.len(),
                &seen[seen.len().saturating_sub(8)..]
            ),
        }
    }
}

fn main() {
    let samples: usize = std::env::var("AGENT_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let name = format!("knplat{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("agent_latency: cannot create a network namespace (run as root)");
        std::process::exit(1);
    }
    let _ns = Netns(name.clone());
    let fd = File::open(format!("/run/netns/{name}")).expect("open netns");
    // Threads and processes started from here on live in the namespace: the fake API server
    // listens on its loopback, and the agent programs its nftables, never the host's.
    setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
    Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("lo up");

    let s = if std::env::var("AGENT_SCALE").is_ok_and(|v| v == "10") {
        synthetic::TEN_TIMES
    } else {
        synthetic::TARGET
    };
    let server = FakeApiServer::new();
    let t = Instant::now();
    for obj in synthetic::objects_json(&s) {
        server.apply(obj);
    }
    println!(
        "fake API server loaded with {} objects in {:.1} s",
        s.pods + s.namespaces + s.policies,
        t.elapsed().as_secs_f64()
    );
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let log = File::create(dir.join("agent.log")).expect("agent log");

    let started = Instant::now();
    let wrapper: Vec<String> = std::env::var("AGENT_WRAPPER")
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let agent = Guard(
        command
            .args(["run", "--node-name", NODE, "--metrics-addr", METRICS])
            .args(["--pod-cidr", LOCAL_RANGE])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "info")
            // As deploy/daemonset.yaml starts it.
            .env("MIMALLOC_PURGE_DELAY", "0")
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent"),
    );
    let pid = agent.0.id();
    let ready = loop {
        if let Some((200, _)) = http_get("/readyz") {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "agent not ready in 120 s; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, metrics) = http_get("/metrics").expect("scrape");
    let elements = metric(&metrics, "kube_nftpolicy_set_elements").unwrap_or(0.0);
    let expected = {
        let snap = synthetic::index(&s).snapshot();
        let opts = kube_nftpolicy::engine::compile::CompileOptions {
            pod_cidrs: vec![LOCAL_RANGE.parse().expect("range")],
            ..Default::default()
        };
        let np = kube_nftpolicy::engine::compile::node_policy(&snap, NODE, &opts);
        kube_nftpolicy::engine::compile::compile(&np, &opts).element_count()
    };
    println!(
        "agent ready (initial lists + first full sync) after {:.2} s; {elements} set elements in the kernel (expected {expected})",
        ready.as_secs_f64()
    );
    assert_eq!(
        elements as usize, expected,
        "the agent must see the same cluster the benchmark generated"
    );
    let hwm_ready = status_kb(pid, "VmHWM");
    println!(
        "agent memory after the first sync: VmHWM {hwm_ready} KiB, VmRSS {} KiB",
        status_kb(pid, "VmRSS")
    );
    if std::env::var("AGENT_STOP_AFTER_READY").is_ok_and(|v| v == "1") {
        // Stop the agent (the wrapper's child, if any) and let the wrapper write its report.
        let _ = Command::new("pkill")
            .args(["-TERM", "-P", &pid.to_string()])
            .status();
        let mut agent = agent;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until && matches!(agent.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        return;
    }

    // Every committed change in this namespace, time-stamped as it is read.
    let (_monitor, lines) = monitor();

    // New pods on other nodes that node-7's peer sets take in (found with the pure core).
    let snap0 = synthetic::index(&s).snapshot();
    let np0 = kube_nftpolicy::engine::resolve::resolve(&snap0, NODE);
    let peers: Vec<kube_nftpolicy::model::PodInfo> = (s.pods..)
        .map(|i| synthetic::pod(i, &s, 0))
        .filter(|p| {
            p.node.as_deref() != Some(NODE) && !toggle::peer_matches(&np0, &snap0, p).is_empty()
        })
        .take(samples)
        .collect();
    let (mut adds, mut deletes) = (Vec::new(), Vec::new());
    for (k, peer) in peers.iter().enumerate() {
        let mut pod = peer.clone();
        let ip = pod.ips[0].to_string();
        pod.key.name = format!("bench-{k}");
        let t0 = Instant::now();
        server.apply(synthetic::pod_json(&pod));
        adds.push(wait_for(&lines, "add element", &format!("{{ {ip} }}")).duration_since(t0));
        // Apart by more than the minimum sync interval, so each change is a sync of its own.
        std::thread::sleep(Duration::from_millis(250));
        let t0 = Instant::now();
        server.delete("Pod", Some(pod.key.namespace.as_str()), &pod.key.name);
        deletes.push(wait_for(&lines, "delete element", &format!("{{ {ip} }}")).duration_since(t0));
        std::thread::sleep(Duration::from_millis(250));
    }
    report("one remote pod added, event → kernel", adds);
    report("one remote pod deleted, event → kernel", deletes);

    // A pod of node-7 itself: its address appears in the API → known in the kernel.
    let (mut local_adds, mut local_deletes) = (Vec::new(), Vec::new());
    for k in 0..samples {
        // Pod i runs on node-(i % nodes): pick the next index that lands on node-7.
        let i = s.pods + s.nodes * k + (7 + s.nodes - s.pods % s.nodes) % s.nodes;
        let mut pod = synthetic::pod(i, &s, 0);
        assert_eq!(pod.node.as_deref(), Some(NODE));
        let ip: std::net::IpAddr = format!("10.200.7.{}", 2 + k % 250).parse().expect("ip");
        pod.ips = vec![ip];
        pod.key.name = format!("bench-local-{k}");
        let t0 = Instant::now();
        server.apply(synthetic::pod_json(&pod));
        local_adds.push(
            wait_for(&lines, "add element", &format!("local-pods-v4 {{ {ip} }}"))
                .duration_since(t0),
        );
        std::thread::sleep(Duration::from_millis(250));
        let t0 = Instant::now();
        server.delete("Pod", Some(pod.key.namespace.as_str()), &pod.key.name);
        local_deletes.push(
            wait_for(
                &lines,
                "delete element",
                &format!("local-pods-v4 {{ {ip} }}"),
            )
            .duration_since(t0),
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    report("local pod's address in API → programmed", local_adds);
    report("local pod deleted → address unknown", local_deletes);

    // NetworkPolicies that select pods of node-7: one more port each time.
    let snap = synthetic::index(&s).snapshot();
    let np = kube_nftpolicy::engine::resolve::resolve(&snap, NODE);
    let mut on_node: Vec<kube_nftpolicy::model::ObjectKey> =
        np.policies.iter().map(|p| p.policy.clone()).collect();
    on_node.dedup();
    let policy = |key: &kube_nftpolicy::model::ObjectKey| {
        (**snap.policies.get(key).expect("a policy of the model")).clone()
    };
    let mut port: u16 = 30_000;
    let mut policy_changes = Vec::new();
    for k in 0..samples {
        port += 1;
        let edited = toggle::with_port(&policy(&on_node[k % on_node.len()]), port);
        let t0 = Instant::now();
        server.apply(synthetic::policy_json(&edited));
        policy_changes.push(wait_for(&lines, "add rule", &format!(". {port}")).duration_since(t0));
        std::thread::sleep(Duration::from_millis(250));
    }
    report("one policy changed, event → kernel", policy_changes);

    // Bursts: 100 policies of node-7 changed at once, until the last of them is in the kernel.
    let mut bursts = Vec::new();
    for _ in 0..(samples / 20).max(3) {
        let edits: Vec<(u16, serde_json::Value)> = on_node
            .iter()
            .take(100)
            .map(|key| {
                port += 1;
                (
                    port,
                    synthetic::policy_json(&toggle::with_port(&policy(key), port)),
                )
            })
            .collect();
        let t0 = Instant::now();
        for (_, obj) in &edits {
            server.apply(obj.clone());
        }
        let mut seen = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = t0;
        while seen.len() < edits.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = lines
                .recv_timeout(left)
                .expect("every policy of the burst reaches the kernel within 30 s");
            if line.starts_with("add rule") {
                for (p, _) in &edits {
                    if mentions(&line, &format!(". {p}")) && seen.insert(*p) {
                        last = at;
                    }
                }
            }
        }
        bursts.push(last.duration_since(t0));
        std::thread::sleep(Duration::from_millis(500));
    }
    report(
        &format!(
            "burst of {} policies changed, → kernel",
            on_node.len().min(100)
        ),
        bursts,
    );

    // Namespaces moving between `prod` and `staging`: one address that the move takes out of
    // (or puts into) one of node-7's peer sets, found with the pure core.
    let moves: Vec<(kube_nftpolicy::model::NamespaceInfo, String)> = (0..s.namespaces)
        .filter_map(|n| {
            let mut moved = synthetic::namespace(n);
            let prod = moved.labels.get("env") == Some("prod");
            moved
                .labels
                .insert("env", if prod { "staging" } else { "prod" });
            let mut idx = synthetic::index(&s);
            idx.apply_namespace(moved.clone());
            let after = kube_nftpolicy::engine::resolve::resolve(&idx.snapshot(), NODE);
            let addrs = |np: &kube_nftpolicy::engine::resolve::NodePolicy| {
                np.policies
                    .iter()
                    .flat_map(|p| &p.rules)
                    .filter_map(|r| r.peers.as_ref())
                    .flatten()
                    .filter_map(|peer| match peer {
                        kube_nftpolicy::engine::resolve::ResolvedPeer::Pods(pp) => Some(pp),
                        _ => None,
                    })
                    .flat_map(|pp| pp.addrs.iter().copied())
                    .filter(|ip| ip.is_ipv4())
                    .collect::<std::collections::BTreeSet<_>>()
            };
            let (a, b) = (addrs(&np), addrs(&after));
            let gone = a
                .difference(&b)
                .next()
                .map(|ip| format!("delete element|{ip}"));
            let came = b
                .difference(&a)
                .next()
                .map(|ip| format!("add element|{ip}"));
            gone.or(came).map(|needle| (moved, needle))
        })
        .take(if s.namespaces > 100 { 3 } else { 10 })
        .collect();
    // A fresh monitor: `nft monitor` keeps a cache of sets from its start and cannot print
    // elements of sets it lost track of during the policy bursts. (At 10× this phase used
    // to time out: the relabel was committed while the new monitor was still reading the
    // ruleset; `monitor` now waits until the monitor is live.)
    let (_monitor, lines) = monitor();
    let mut relabels = Vec::new();
    for k in 0..samples.min(100) {
        let (moved, needle) = &moves[k % moves.len()];
        let (verb, ip) = needle.split_once('|').expect("needle");
        let original = synthetic::namespace(
            moved
                .name
                .trim_start_matches("ns-")
                .parse()
                .expect("ns index"),
        );
        let t0 = Instant::now();
        server.apply(synthetic::namespace_json(moved));
        relabels.push(wait_for(&lines, verb, ip).duration_since(t0));
        std::thread::sleep(Duration::from_millis(250));
        server.apply(synthetic::namespace_json(&original));
        let back = if verb == "add element" {
            "delete element"
        } else {
            "add element"
        };
        wait_for(&lines, back, ip);
        std::thread::sleep(Duration::from_millis(250));
    }
    report("one namespace relabelled, event → kernel", relabels);
    println!(
        "agent memory: VmHWM {} KiB after the first sync, {} KiB at the end; VmRSS now {} KiB",
        hwm_ready,
        status_kb(pid, "VmHWM"),
        status_kb(pid, "VmRSS")
    );
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let compile: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" sync") && l.contains("compile=\"incremental\""))
        .collect();
    println!(
        "{} incremental syncs in the agent log; last: {}",
        compile.len(),
        compile.last().unwrap_or(&"")
    );
    // The slowest syncs, to explain the tail.
    let duration = |l: &str| -> f64 {
        l.split("duration_ms=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let mut syncs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" sync ") || l.ends_with(" sync"))
        .collect();
    syncs.sort_by(|a, b| duration(b).total_cmp(&duration(a)));
    for l in syncs.iter().take(3) {
        println!("slow sync: {l}");
    }
    for l in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        println!("agent: {l}");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
