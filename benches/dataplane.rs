//! Dataplane cost at cluster scale, with real packets between network namespaces (needs
//! root and `iperf3`): new TCP connections per second and bulk throughput between two pods
//! through their node, with 0 to 5,000 NetworkPolicies in the cluster, for
//! - `none`: no ruleset at all in the node (the baseline; not even conntrack is loaded),
//! - `conntrack`: one chain holding only `ct state established,related accept`, to show what
//!   connection tracking alone costs (both rulesets below need it),
//! - `base`: our base chains with empty dispatch maps, to split what `ours` costs into its
//!   base chains and its per-pod and per-policy chains,
//! - `ours`: our ruleset, programmed with `Dataplane::sync` exactly as the agent does,
//! - `naive`: the same resolved policy as one rule per allowed (pod, peer, port) in flat chains
//!   (`benches/support/naive.rs`), the iptables-style curve our design avoids.
//!
//! The cluster is the scale target of DESIGN.md (10,000 pods in 100 namespaces on 91 nodes,
//! `benches/support/synthetic.rs`) plus the measured pods' namespaces; N counts every
//! NetworkPolicy in the cluster. Only the measured pods (and a third pod used to check that
//! the rulesets enforce) are real namespaces; every other pod exists only in the model, as
//! addresses in sets, maps and rules. Targets (issue 7): `ours` keeps ≥ 90 % of the baseline's
//! connection rate and ≥ 95 % of its throughput at every N. A bench reports; it does not panic
//! on a missed target.
//!
//! Run (root): `cargo bench --bench dataplane`. Knobs (environment):
//! `DATAPLANE_POD_CIDRS=0` leaves the node's pod ranges out of `ours` (by default it fails
//! closed in them, as the agent does when it knows them). `DATAPLANE_SIZES` (default `0,10,100,1000,5000`), `DATAPLANE_SECS` (seconds of connection
//! loop per measurement, default 5), `DATAPLANE_IPERF_SECS` (iperf3 `-t`, default 5; 0 skips
//! throughput), `DATAPLANE_REPEATS` (default 3, the median is reported), `DATAPLANE_CLIENTS`
//! (concurrent connecting threads, default 2), `DATAPLANE_CONFIGS` (default
//! `none,conntrack,base,ours,naive`; `audit` is `ours` as `run --audit` compiles it; `staged` is
//! `ours` plus a staged NetworkPolicy on the client's egress and a staged Admin
//! ClusterNetworkPolicy on the server's ingress, both met by the measured connection), `DATAPLANE_CNPS` (ClusterNetworkPolicies added to the
//! cluster, none of them applying to the measured pods; default 0). Results are in docs/benchmarks.md.

#[path = "support/naive.rs"]
mod naive;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "support/synthetic.rs"]
mod synthetic;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::evaluate::Connection;
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::resolve::{NodePolicy, resolve};
use kube_nftpolicy::engine::ruleset::Ruleset;
use kube_nftpolicy::kernel::dataplane::{self, Dataplane};
use kube_nftpolicy::kernel::nft::exec::Nft;
use kube_nftpolicy::model::Protocol;
use kube_nftpolicy::model::policy::Direction;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout};
use nix::sys::socket::{Shutdown, setsockopt, shutdown, sockopt};

/// The node the measured pods run on (its name in the model; the synthetic cluster has ~110
/// other pods on it).
const NODE: &str = "node-7";
/// Named to sort in the middle of the synthetic namespaces (`ns-5` < `ns-5-…` < `ns-50`), so
/// a new connection walks about half of each naive chain, as an average pod's would.
const SERVER_NS: &str = "ns-5-bench-server";
const CLIENT_NS: &str = "ns-5-bench-client";
/// Not allowed anywhere: used to check that a ruleset really enforces.
const OTHER_NS: &str = "ns-5-bench-other";
const CONN_PORT: u16 = 8080;
const HTTP: &str = "{name: http, containerPort: 8080}";
const DNS: &str = "{name: dns, containerPort: 53, protocol: UDP}";
const IPERF_PORT: u16 = 5201;
/// The measured pods' own policies (5 select the server, 3 the client); N includes them.
const MEASURED_POLICIES: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
/// Loading a ruleset (the naive one at 5,000 policies is large) must finish within this.
const NFT_TIMEOUT: Duration = Duration::from_secs(900);

// ───────────────────────────── interruption ─────────────────────────────

/// Set on SIGINT/SIGTERM: every loop and wait checks it, so the bench unwinds and the
/// namespaces, servers and iperf3 are torn down rather than left behind.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Blocks SIGINT and SIGTERM in every thread (call before spawning any) and waits for them on
/// a thread of their own. Children get a clean signal mask (std resets it when spawning).
fn catch_signals() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the mask change
    // applies to this thread and is inherited by the threads it spawns.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the initialised set above; `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            eprintln!("dataplane bench: signal {sig}, cleaning up");
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
    });
}

// ───────────────────────────── settings ─────────────────────────────

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    None,
    Conntrack,
    /// Our base chains with empty dispatch maps (what `ours` is with no pod isolated): to
    /// split our cost into the base chains and the per-pod and per-policy chains.
    Base,
    Ours,
    /// `ours` compiled for `run --audit` (terminal chains count and accept).
    Audit,
    /// `ours` with a staged NetworkPolicy and a staged ClusterNetworkPolicy that the measured
    /// connection passes through (the would-deny chain of the client's egress; the mark field
    /// set in the server's Admin tier and settled after our accept).
    Staged,
    Naive,
}

impl Config {
    const ALL: [Config; 7] = [
        Config::None,
        Config::Conntrack,
        Config::Base,
        Config::Ours,
        Config::Audit,
        Config::Staged,
        Config::Naive,
    ];

    fn parse(s: &str) -> Option<Config> {
        Config::ALL.into_iter().find(|c| c.to_string() == s)
    }

    /// Whether this config enforces the policies (so denied probes must be dropped).
    fn enforces(self) -> bool {
        matches!(self, Config::Ours | Config::Staged | Config::Naive)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so that width specifiers in the table line up.
        f.pad(match self {
            Config::None => "none",
            Config::Conntrack => "conntrack",
            Config::Base => "base",
            Config::Ours => "ours",
            Config::Audit => "audit",
            Config::Staged => "staged",
            Config::Naive => "naive",
        })
    }
}

#[derive(Debug)]
struct Settings {
    sizes: Vec<usize>,
    conn_secs: f64,
    iperf_secs: u32,
    repeats: usize,
    clients: usize,
    /// ClusterNetworkPolicies in the cluster (none applies to the measured pods).
    cnps: usize,
    configs: Vec<Config>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn parse_env<T: std::str::FromStr>(name: &str, default: &str) -> Result<T, String> {
    let v = env_or(name, default);
    v.trim()
        .parse()
        .map_err(|_| format!("{name}={v:?}: not a valid number"))
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let sizes = env_or("DATAPLANE_SIZES", "0,10,100,1000,5000")
            .split(',')
            .map(|s| {
                let n: usize = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("DATAPLANE_SIZES: {s:?} is not a number"))?;
                if n != 0 && n < MEASURED_POLICIES {
                    return Err(format!(
                        "DATAPLANE_SIZES: {n} must be 0 or at least {MEASURED_POLICIES} (the \
                         measured pods' own policies are part of the count)"
                    ));
                }
                Ok(n)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let configs = env_or("DATAPLANE_CONFIGS", "none,conntrack,base,ours,naive")
            .split(',')
            .map(|s| {
                Config::parse(s.trim()).ok_or_else(|| {
                    format!(
                        "DATAPLANE_CONFIGS: {s:?} is not one of none, conntrack, base, ours, audit, staged, naive"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let s = Settings {
            sizes,
            conn_secs: parse_env("DATAPLANE_SECS", "5")?,
            iperf_secs: parse_env("DATAPLANE_IPERF_SECS", "5")?,
            repeats: parse_env("DATAPLANE_REPEATS", "3")?,
            clients: parse_env("DATAPLANE_CLIENTS", "2")?,
            cnps: parse_env("DATAPLANE_CNPS", "0")?,
            configs,
        };
        if !s.conn_secs.is_finite() || s.conn_secs <= 0.0 || s.repeats == 0 || s.clients == 0 {
            return Err(
                "DATAPLANE_SECS, DATAPLANE_REPEATS and DATAPLANE_CLIENTS must be positive".into(),
            );
        }
        Ok(s)
    }
}

// ───────────────────────────── the cluster ─────────────────────────────

/// The measured pods' world, as manifests: their namespaces, a few replicas and
/// infrastructure pods on other nodes, and the policies a real team would write for a server
/// and its client. Only `server`, `client` and `other` (on this node) are real namespaces.
fn measured_manifests(c: &Cluster) -> String {
    let server = c.pod_ip(SERVER_NS, "server", Family::V4);
    let client = c.pod_ip(CLIENT_NS, "client", Family::V4);
    let other = c.pod_ip(OTHER_NS, "other", Family::V4);
    let ns = |name: &str| {
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{kubernetes.io/metadata.name: {name}}}}}\n"
        )
    };
    let mut s: String = [
        SERVER_NS,
        CLIENT_NS,
        OTHER_NS,
        "kube-system",
        "monitoring",
        "ingress-nginx",
    ]
    .iter()
    .map(|n| ns(n))
    .collect();
    // One pod per line: namespace, name, labels, node, address, container ports.
    #[rustfmt::skip]
    let pods = [
        (SERVER_NS, "server", "app: server", NODE, server.to_string(), HTTP),
        (CLIENT_NS, "client", "app: client", NODE, client.to_string(), ""),
        (OTHER_NS, "other", "app: other", NODE, other.to_string(), ""),
        (SERVER_NS, "server-2", "app: server", "node-3", "10.63.0.2".into(), HTTP),
        (SERVER_NS, "server-3", "app: server", "node-4", "10.63.0.3".into(), HTTP),
        (CLIENT_NS, "client-2", "app: client", "node-5", "10.63.0.12".into(), ""),
        ("kube-system", "coredns-1", "k8s-app: kube-dns", "node-1", "10.63.0.53".into(), DNS),
        ("kube-system", "coredns-2", "k8s-app: kube-dns", "node-2", "10.63.0.54".into(), DNS),
        ("monitoring", "prometheus-0", "app: prometheus", "node-8", "10.63.0.90".into(), ""),
        ("ingress-nginx", "controller-1", "app: ingress-nginx", "node-9", "10.63.0.80".into(), ""),
        ("ingress-nginx", "controller-2", "app: ingress-nginx", "node-9", "10.63.0.81".into(), ""),
    ];
    for (ns, name, labels, node, ip, ports) in pods {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, ports: [{ports}]}}]}}\n\
             status: {{phase: Running, podIPs: [{{ip: \"{ip}\"}}]}}\n"
        ));
    }
    s.push_str(&format!(
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny-ingress, namespace: {SERVER_NS}}}
spec: {{podSelector: {{}}, policyTypes: [Ingress]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-same-namespace, namespace: {SERVER_NS}}}
spec:
  podSelector: {{}}
  ingress: [{{from: [{{podSelector: {{}}}}]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-monitoring, namespace: {SERVER_NS}}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}, podSelector: {{matchLabels: {{app: prometheus}}}}}}]
    ports: [{{port: 9090}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-ingress-controller, namespace: {SERVER_NS}}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: ingress-nginx}}}}}}]
    ports: [{{port: http}}]
---
# Named to sort last, so the measured connection walks every other policy selecting the
# server before the one that allows it (the worst order).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: zz-allow-bench-client, namespace: {SERVER_NS}}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {CLIENT_NS}}}}}, podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: {CONN_PORT}}}, {{port: {IPERF_PORT}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny-egress, namespace: {CLIENT_NS}}}
spec: {{podSelector: {{}}, policyTypes: [Egress]}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-dns, namespace: {CLIENT_NS}}}
spec:
  podSelector: {{}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}, podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}}}]
    ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: zz-allow-to-server, namespace: {CLIENT_NS}}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {SERVER_NS}}}}}, podSelector: {{matchLabels: {{app: server}}}}}}]
    ports: [{{port: {CONN_PORT}}}, {{port: {IPERF_PORT}}}]
"#
    ));
    s
}

/// The whole cluster with `n` NetworkPolicies (0, or the measured 8 plus `n − 8` synthetic).
/// `n` ClusterNetworkPolicies of the Admin and Baseline tiers whose subjects are the
/// synthetic teams' namespaces: none of them applies to the measured pods.
fn cluster_network_policies(n: usize) -> Vec<kube_nftpolicy::model::ClusterPolicy> {
    use kube_nftpolicy::model::{
        Action, ClusterPolicy, CnpPeer, CnpRule, Labels, RuleMatch, Selector, Subject, Tier,
    };
    let team = |t: usize| Selector {
        match_labels: Labels::from([("team".to_string(), format!("team-{}", t % 10))]),
        expressions: vec![],
    };
    (0..n)
        .map(|k| ClusterPolicy {
            name: format!("cnp-{k}"),
            tier: if k % 2 == 0 {
                Tier::Admin
            } else {
                Tier::Baseline
            },
            priority: (k % 1000) as u16,
            subject: Subject::Namespaces(team(k)),
            ingress: vec![CnpRule {
                index: 0,
                name: "deny-other-team".into(),
                action: Action::Deny,
                matches: RuleMatch::Peers {
                    peers: vec![CnpPeer::Namespaces(team(k + 1))],
                    ports: None,
                },
            }],
            egress: vec![],
            problems: vec![],
            staged: false,
        })
        .collect()
}

fn cluster_index(c: &Cluster, n: usize, cnps: usize) -> Result<Index, String> {
    let m = parse_sources(&[("measured.yaml".into(), measured_manifests(c))])
        .map_err(|e| format!("measured pods' manifests: {e}"))?;
    if !m.warnings.is_empty() {
        return Err(format!(
            "measured pods' manifests: {}",
            m.warnings.join("; ")
        ));
    }
    let scale = synthetic::Scale {
        policies: n.saturating_sub(MEASURED_POLICIES),
        ..synthetic::TARGET
    };
    let synth = synthetic::index(&scale).snapshot();
    let mut idx = Index::new();
    let mut namespaces = m.namespaces;
    namespaces.extend(synth.namespaces.iter().map(|(_, v)| (**v).clone()));
    idx.reset_namespaces(namespaces);
    let mut pods = m.pods;
    pods.extend(synth.pods.iter().map(|(_, v)| (**v).clone()));
    idx.reset_pods(pods);
    let mut policies = if n == 0 { Vec::new() } else { m.policies };
    policies.extend(synth.policies.iter().map(|(_, v)| (**v).clone()));
    if policies.len() != n {
        return Err(format!("built {} policies instead of {n}", policies.len()));
    }
    idx.reset_policies(policies);
    idx.reset_cnps(cluster_network_policies(cnps));
    Ok(idx)
}

/// The `staged` config's policies: a staged NetworkPolicy that would isolate the client's
/// egress (the measured connection matches its rule: counted by nothing, but it walks the
/// would-deny chain), and a staged Admin ClusterNetworkPolicy that would deny the client at
/// the server (recorded in the mark field, counted as would-deny after our accept).
fn staged_manifests() -> String {
    format!(
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: staged-client-egress
  namespace: {CLIENT_NS}
  annotations: {{kube-nftpolicy.io/staged: "true"}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: server}}}}}}]
    ports: [{{port: {CONN_PORT}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: staged-guard-server
  annotations: {{kube-nftpolicy.io/staged: "true"}}
spec:
  tier: Admin
  priority: 1
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: server}}}}}}}}
  ingress:
  - name: not-the-client
    action: Deny
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: client}}}}}}}}]
"#
    )
}

/// Everything measured at one size.
struct Size {
    ours: Ruleset,
    audit: Ruleset,
    staged: Ruleset,
    base: Ruleset,
    naive_script: String,
    summary: Vec<String>,
}

fn prepare(c: &Cluster, n: usize, cnps: usize) -> Result<Size, String> {
    let idx = cluster_index(c, n, cnps)?;
    let t = Instant::now();
    let mut np = resolve(&idx.snapshot(), NODE);
    // The agent fails closed in the node's pod ranges when it knows them (a Node with
    // spec.podCIDRs, or --pod-cidr); `DATAPLANE_POD_CIDRS=0` measures the ruleset without.
    let opts = if std::env::var("DATAPLANE_POD_CIDRS").as_deref() == Ok("0") {
        CompileOptions::default()
    } else {
        let spec = c.node_spec(NODE);
        CompileOptions {
            pod_cidrs: [Family::V4, Family::V6]
                .into_iter()
                .map(|f| {
                    let (net, len) = spec.pod_cidr(f);
                    kube_nftpolicy::model::Cidr::new(net, len).expect("pod range")
                })
                .collect(),
            ..CompileOptions::default()
        }
    };
    kube_nftpolicy::engine::compile::apply_pod_cidrs(&mut np, &opts);
    let ours = compile(&np, &opts);
    let core = t.elapsed();
    let audit = compile(
        &np,
        &CompileOptions {
            audit: true,
            ..opts.clone()
        },
    );
    let staged = {
        let mut idx = cluster_index(c, n, cnps)?;
        let m = parse_sources(&[("staged.yaml".into(), staged_manifests())])
            .map_err(|e| format!("staged policies: {e}"))?;
        for p in m.policies {
            idx.apply_policy(p);
        }
        for p in m.cnps {
            idx.apply_cnp(p);
        }
        let mut np = resolve(&idx.snapshot(), NODE);
        kube_nftpolicy::engine::compile::apply_pod_cidrs(&mut np, &opts);
        if np.staged_cnps.is_empty() || np.staged.is_empty() {
            return Err("the staged policies select no pod of the node".into());
        }
        compile(&np, &opts)
    };
    let naive = naive::expand(&np);
    check_naive(&np, &naive, c)?;
    let server = c.pod_ip(SERVER_NS, "server", Family::V4);
    let client = c.pod_ip(CLIENT_NS, "client", Family::V4);
    let position = |d: Direction| match naive::first_match(
        &naive,
        d,
        client,
        server,
        Protocol::Tcp,
        CONN_PORT,
    ) {
        Some((i, true)) => format!("rule {} of {}", i + 1, naive.chain(d).len()),
        Some((i, false)) => format!("DENIED at rule {} of {}", i + 1, naive.chain(d).len()),
        None => format!("no rule (not isolated) of {}", naive.chain(d).len()),
    };
    let server_policies = np
        .pods
        .iter()
        .find(|p| p.ips.contains(&server))
        .and_then(|p| p.ingress.as_ref())
        .map_or(0, Vec::len);
    let summary = vec![
        format!(
            "{n} policies, {cnps} ClusterNetworkPolicies ({} CNP chains on {NODE}): {} pods with chains on {NODE}, {} policies select the server; resolve+compile {:.0} ms",
            np.cnps.len(),
            np.pods.len(),
            server_policies,
            core.as_secs_f64() * 1e3
        ),
        format!(
            "  ours:  {} chains, {} sets and maps, {} elements",
            ours.chains.len(),
            ours.sets.len(),
            ours.element_count()
        ),
        format!(
            "  naive: {} rules (IPv4); a new connection client→server matches egress {}, ingress {}",
            naive.rule_count(),
            position(Direction::Egress),
            position(Direction::Ingress)
        ),
    ];
    let base = compile(
        &NodePolicy {
            node: NODE.into(),
            ..NodePolicy::default()
        },
        &CompileOptions::default(),
    );
    Ok(Size {
        ours,
        audit,
        staged,
        base,
        naive_script: naive::render(&naive),
        summary,
    })
}

/// The naive chains must say what the policy says: every flow of the measured pods and a
/// deterministic sample of the others (local pods × peers × ports they mention).
fn check_naive(np: &NodePolicy, naive: &naive::Naive, c: &Cluster) -> Result<(), String> {
    let mut peers: Vec<IpAddr> = vec![
        c.pod_ip(SERVER_NS, "server", Family::V4),
        c.pod_ip(CLIENT_NS, "client", Family::V4),
        c.pod_ip(OTHER_NS, "other", Family::V4),
        "10.63.0.53".parse().expect("literal"),
        "10.63.0.90".parse().expect("literal"),
        "192.168.3.7".parse().expect("literal"),
        "8.8.8.8".parse().expect("literal"),
    ];
    for i in (0..synthetic::TARGET.pods).step_by(97) {
        peers.extend(
            synthetic::pod(i, &synthetic::TARGET, 0)
                .ips
                .into_iter()
                .filter(IpAddr::is_ipv4),
        );
    }
    let ports = [
        (Protocol::Tcp, CONN_PORT),
        (Protocol::Tcp, IPERF_PORT),
        (Protocol::Tcp, 7777),
        (Protocol::Tcp, 8050),
        (Protocol::Tcp, 9090),
        (Protocol::Tcp, 443),
        (Protocol::Udp, 53),
    ];
    let mut checked = 0usize;
    for pod in &np.pods {
        for local in pod.ips.iter().filter(|ip| ip.is_ipv4()) {
            for d in Direction::ALL {
                for peer in &peers {
                    for (protocol, port) in ports {
                        let conn = Connection {
                            local: *local,
                            peer: *peer,
                            protocol,
                            port,
                        };
                        naive::cross_check(np, naive, d, conn)?;
                        checked += 1;
                    }
                }
            }
        }
    }
    if np.pods.is_empty() || checked > 0 {
        Ok(())
    } else {
        Err("naive cross-check checked nothing".into())
    }
}

// ───────────────────────────── running things ─────────────────────────────

/// Runs a command with a deadline; kills it (by its own pid) if the deadline passes.
fn run_timeout(
    cmd: &mut Command,
    stdin: Option<String>,
    timeout: Duration,
) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => Some(thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })),
        _ => None,
    };
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline && !interrupted() => {
                thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                check_interrupted()?;
                return Err(format!("{what}: no answer after {timeout:?}; killed"));
            }
            Err(e) => return Err(format!("{what}: wait failed: {e}")),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `nft` in the node's namespace (never the host's); fails with nft's stderr.
fn node_nft(c: &Cluster, args: &[&str], stdin: Option<String>) -> Result<String, String> {
    let ns = c.netns_name(Endpoint::node(NODE));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns, "nft"]).args(args);
    let out = run_timeout(&mut cmd, stdin, NFT_TIMEOUT)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    }
}

const CT_ONLY: &str = "table inet knp-bench-ct {\n  chain postrouting {\n    type filter hook postrouting priority srcnat - 10; policy accept;\n    ct state established,related accept\n  }\n}\n";

/// Put `config` in place in the node (which holds no table before); returns how long it took.
fn apply(c: &Cluster, config: Config, size: &Size) -> Result<Duration, String> {
    let t = Instant::now();
    match config {
        Config::None => {}
        Config::Conntrack => {
            node_nft(c, &["-f", "-"], Some(CT_ONLY.to_string()))?;
        }
        Config::Base | Config::Ours | Config::Audit | Config::Staged => {
            let rs = match config {
                Config::Base => size.base.clone(),
                Config::Audit => size.audit.clone(),
                Config::Staged => size.staged.clone(),
                _ => size.ours.clone(),
            };
            c.run_in_node(NODE, move || {
                Dataplane::new(Nft::default())
                    .sync(&rs)
                    .map(|_| ())
                    .map_err(|e| format!("our ruleset: sync failed: {e}"))
            })?;
        }
        Config::Naive => {
            node_nft(c, &["-f", "-"], Some(size.naive_script.clone()))?;
        }
    }
    Ok(t.elapsed())
}

/// Remove whatever `config` put in the node and check that no table is left.
fn remove(c: &Cluster, config: Config) -> Result<(), String> {
    match config {
        Config::None => {}
        Config::Conntrack => {
            node_nft(c, &["delete", "table", "inet", "knp-bench-ct"], None)?;
        }
        Config::Base | Config::Ours | Config::Audit | Config::Staged => {
            c.run_in_node(NODE, || dataplane::cleanup(&Nft::default()))
                .map_err(|e| format!("removing our table: {e}"))?;
        }
        Config::Naive => {
            node_nft(c, &["delete", "table", "ip", naive::TABLE], None)?;
        }
    }
    let left = node_nft(c, &["list", "tables"], None)?;
    if left.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "after removing {config}, the node still holds: {}",
            left.trim()
        ))
    }
}

// ───────────────────────────── the connection server and loop ─────────────────────────────

/// Threads in the server pod answering one byte per connection on [`CONN_PORT`].
struct ConnServer {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ConnServer {
    fn start(c: &Cluster, threads: usize) -> Result<ConnServer, String> {
        // The socket belongs to the namespace it was created in; accept() can run anywhere.
        let listener = c
            .run_in(Endpoint::pod(SERVER_NS, "server"), || {
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, CONN_PORT))
            })
            .map_err(|e| format!("server pod: bind :{CONN_PORT}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..threads {
            let l = listener
                .try_clone()
                .map_err(|e| format!("server pod: clone listener: {e}"))?;
            let stop = Arc::clone(&stop);
            handles.push(thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((s, _)) = l.accept() {
                        answer(s);
                    }
                }
            }));
        }
        Ok(ConnServer {
            listener,
            stop,
            threads: handles,
        })
    }
}

/// Read a byte, write a byte, then wait for the client's reset, so the client closes first
/// and (with SO_LINGER 0) neither end keeps a TIME_WAIT socket.
fn answer(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
    let mut b = [0u8; 1];
    if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
        let _ = s.read(&mut b);
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes every thread blocked in accept().
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

/// One measured connection: connect, one byte each way, close with a reset.
fn one_connection(to: &SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(to, CONNECT_TIMEOUT)?;
    // SO_LINGER 0: close sends RST and leaves no TIME_WAIT, so the loop never runs out of
    // ephemeral ports whatever its rate.
    setsockopt(
        &s,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(io::Error::from)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

struct ConnResult {
    per_sec: f64,
    failed: usize,
    /// Median time of one connection (connect, one byte each way, close), in µs: less
    /// sensitive than the rate to other work on the machine, and the difference between two
    /// configs is what one connection costs more in one than in the other.
    median_us: f64,
}

/// `clients` threads in the client pod, each connecting in a loop for `secs`.
fn connection_rate(c: &Cluster, clients: usize, secs: f64) -> ConnResult {
    let to = SocketAddr::new(c.pod_ip(SERVER_NS, "server", Family::V4), CONN_PORT);
    c.run_in(Endpoint::pod(CLIENT_NS, "client"), move || {
        // Warm-up (neighbour entries, caches), not counted.
        for _ in 0..50 {
            let _ = one_connection(&to);
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let per_thread: Vec<(Vec<f64>, usize)> = thread::scope(|s| {
            let hs: Vec<_> = (0..clients)
                .map(|_| {
                    // Threads spawned here share this thread's network namespace.
                    s.spawn(move || {
                        let (mut times, mut failed) = (Vec::new(), 0);
                        while !interrupted() {
                            let t = Instant::now();
                            if t >= deadline {
                                break;
                            }
                            match one_connection(&to) {
                                Ok(()) => times.push(t.elapsed().as_secs_f64() * 1e6),
                                Err(_) => failed += 1,
                            }
                        }
                        (times, failed)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let elapsed = start.elapsed().as_secs_f64();
        let failed = per_thread.iter().map(|t| t.1).sum();
        let times: Vec<f64> = per_thread.into_iter().flat_map(|t| t.0).collect();
        ConnResult {
            per_sec: times.len() as f64 / elapsed,
            failed,
            median_us: median(times),
        }
    })
}

#[derive(Debug, PartialEq, Eq)]
enum ProbeOutcome {
    Connected,
    Refused,
    Dropped,
}

fn probe(c: &Cluster, from: Endpoint, to: SocketAddr) -> ProbeOutcome {
    c.run_in(from, move || {
        match TcpStream::connect_timeout(&to, PROBE_TIMEOUT) {
            Ok(_) => ProbeOutcome::Connected,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => ProbeOutcome::Refused,
            Err(_) => ProbeOutcome::Dropped,
        }
    })
}

/// The config in place must do what it claims: the measured connection passes; with an
/// enforcing ruleset and policies, the third pod cannot reach the server (ingress) and the
/// client cannot reach the third pod (egress); without, both reach the sockets.
fn check_enforcement(c: &Cluster, config: Config, n: usize) -> Result<(), String> {
    let server = c.pod_ip(SERVER_NS, "server", Family::V4);
    let other = c.pod_ip(OTHER_NS, "other", Family::V4);
    let enforced = config.enforces() && n > 0;
    let cases = [
        (
            "client → server (allowed)",
            Endpoint::pod(CLIENT_NS, "client"),
            SocketAddr::new(server, CONN_PORT),
            ProbeOutcome::Connected,
        ),
        (
            "other → server (server's ingress)",
            Endpoint::pod(OTHER_NS, "other"),
            SocketAddr::new(server, CONN_PORT),
            if enforced {
                ProbeOutcome::Dropped
            } else {
                ProbeOutcome::Connected
            },
        ),
        (
            "client → other (client's egress; nothing listens)",
            Endpoint::pod(CLIENT_NS, "client"),
            SocketAddr::new(other, CONN_PORT),
            if enforced {
                ProbeOutcome::Dropped
            } else {
                ProbeOutcome::Refused
            },
        ),
    ];
    for (name, from, to, want) in cases {
        let got = probe(c, from, to);
        if got != want {
            return Err(format!(
                "{config} with {n} policies: {name}: expected {want:?}, got {got:?}"
            ));
        }
    }
    Ok(())
}

// ───────────────────────────── iperf3 ─────────────────────────────

/// `iperf3 -s` in the server pod, killed (by its pid) when dropped.
struct Iperf3Server(Child);

impl Iperf3Server {
    fn start(c: &Cluster) -> Result<Iperf3Server, String> {
        let ns = c.netns_name(Endpoint::pod(SERVER_NS, "server"));
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting iperf3 -s in {ns}: {e}"))?;
        let server = Iperf3Server(child);
        // Ready when the pod's namespace has a listener on the port (no probe connection:
        // iperf3 would count it as a failed test).
        let deadline = Instant::now() + Duration::from_secs(5);
        let want = format!(":{IPERF_PORT:04X} ");
        loop {
            let listening = c.run_in(Endpoint::pod(SERVER_NS, "server"), || {
                // iperf3 binds the IPv6 wildcard (dual-stack) unless told otherwise.
                ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
                    .iter()
                    .filter_map(|p| std::fs::read_to_string(p).ok())
                    .any(|t| t.lines().any(|l| l.contains(&want) && l.contains(" 0A ")))
            });
            if listening {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("iperf3 -s in {ns} is not listening after 5 s"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from the client pod; Gbit/s received.
fn throughput(c: &Cluster, secs: u32) -> Result<f64, String> {
    let ns = c.netns_name(Endpoint::pod(CLIENT_NS, "client"));
    let server = c.pod_ip(SERVER_NS, "server", Family::V4).to_string();
    let t = secs.to_string();
    let port = IPERF_PORT.to_string();
    let out = run_timeout(
        Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "iperf3",
            "-c",
            &server,
            "-p",
            &port,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "2000",
        ]),
        None,
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 -J output is not JSON ({e}); exit {}", out.status))?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        return Err(format!("iperf3: {err}"));
    }
    json.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e9)
        .ok_or_else(|| "iperf3 -J output has no end.sum_received.bits_per_second".to_string())
}

fn require_iperf3() -> Result<(), String> {
    match Command::new("iperf3").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("`iperf3 --version` failed ({})", o.status)),
        Err(e) => Err(format!(
            "iperf3 is not installed ({e}); install it with `apt-get install iperf3` (Debian's \
             package), or set DATAPLANE_IPERF_SECS=0 to measure connections only"
        )),
    }
}

// ───────────────────────────── report ─────────────────────────────

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Default, Clone)]
struct Samples {
    conn: Vec<f64>,
    conn_us: Vec<f64>,
    gbps: Vec<f64>,
    failed: usize,
    load: Vec<Duration>,
}

fn machine() -> String {
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{uname}; {cpus} CPUs ({model}); {nft}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn run(s: &Settings) -> Result<bool, String> {
    netns::harness_available()?;
    if s.iperf_secs > 0 {
        require_iperf3()?;
    }
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    println!("settings: {s:?}");
    let c = Cluster::try_new(
        ClusterSpec::new(Layout::Routed)
            .node(NODE)
            .pod(NODE, SERVER_NS, "server", &[], &[])
            .pod(NODE, CLIENT_NS, "client", &[], &[])
            .pod(NODE, OTHER_NS, "other", &[], &[]),
    )
    .map_err(|e| format!("building the namespace cluster: {e}"))?;
    // Per-namespace sysctl (written from a thread inside the client pod's namespace): a wide
    // ephemeral port range, as a belt to SO_LINGER 0's braces.
    c.run_in(Endpoint::pod(CLIENT_NS, "client"), || {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
    })
    .map_err(|e| format!("client pod: ip_local_port_range: {e}"))?;
    let _conn_server = ConnServer::start(&c, s.clients)?;
    let _iperf = if s.iperf_secs > 0 {
        Some(Iperf3Server::start(&c)?)
    } else {
        None
    };
    remove(&c, Config::None)?; // the node starts with no table at all

    let mut all_pass = true;
    let mut table = Vec::new();
    for &n in &s.sizes {
        let size = prepare(&c, n, s.cnps)?;
        for line in &size.summary {
            println!("{line}");
        }
        let mut samples: Vec<Samples> = vec![Samples::default(); s.configs.len()];
        for rep in 0..s.repeats {
            // Rotate the order every round so drift spreads over all configs.
            for k in 0..s.configs.len() {
                check_interrupted()?;
                let i = (k + rep) % s.configs.len();
                let config = s.configs[i];
                let load = apply(&c, config, &size)?;
                let measured = (|| {
                    if rep == 0 {
                        check_enforcement(&c, config, n)?;
                    }
                    let conn = connection_rate(&c, s.clients, s.conn_secs);
                    let gbps = if s.iperf_secs > 0 {
                        throughput(&c, s.iperf_secs)?
                    } else {
                        f64::NAN
                    };
                    Ok::<_, String>((conn, gbps))
                })();
                // Remove even when the measurement failed, then report.
                remove(&c, config)?;
                check_interrupted()?;
                let (conn, gbps) = measured?;
                let e = &mut samples[i];
                e.conn.push(conn.per_sec);
                e.conn_us.push(conn.median_us);
                e.gbps.push(gbps);
                e.failed += conn.failed;
                e.load.push(load);
                println!(
                    "  round {}: {config:<9} {:>9.0} conn/s ({} failed, median {:.1} µs) {:>7.2} Gbit/s (applied in {:.0} ms)",
                    rep + 1,
                    conn.per_sec,
                    conn.failed,
                    conn.median_us,
                    gbps,
                    load.as_secs_f64() * 1e3
                );
            }
        }
        let base = s.configs.iter().position(|c| *c == Config::None).map(|i| {
            (
                median(samples[i].conn.clone()),
                median(samples[i].gbps.clone()),
                median(samples[i].conn_us.clone()),
            )
        });
        for (i, config) in s.configs.iter().enumerate() {
            let e = &samples[i];
            let (conn, gbps) = (median(e.conn.clone()), median(e.gbps.clone()));
            let us = median(e.conn_us.clone());
            let dus = base.map_or(f64::NAN, |(_, _, bu)| us - bu);
            let (rc, rg) = base.map_or((f64::NAN, f64::NAN), |(bc, bg, _)| (conn / bc, gbps / bg));
            let verdict = if *config == Config::Ours && base.is_some() {
                let conn_ok = rc >= 0.90;
                let tput_ok = s.iperf_secs == 0 || rg >= 0.95;
                all_pass &= conn_ok && tput_ok;
                match (conn_ok, tput_ok) {
                    (true, true) => "PASS".to_string(),
                    (false, true) => "FAIL (conn/s < 90%)".to_string(),
                    (true, false) => "FAIL (throughput < 95%)".to_string(),
                    (false, false) => "FAIL (both)".to_string(),
                }
            } else {
                "-".to_string()
            };
            let load = e.load.iter().max().copied().unwrap_or_default();
            table.push(format!(
                "| {n:>5} | {config:<9} | {conn:>9.0} | {:>6.1}% | {us:>7.1} | {dus:>+7.1} | {gbps:>6.2} | {:>6.1}% | {:>6} | {:>9.0} | {verdict} |",
                rc * 100.0,
                rg * 100.0,
                e.failed,
                load.as_secs_f64() * 1e3,
            ));
        }
    }
    println!();
    println!(
        "medians of {} rounds; {} s of connections ({} clients), iperf3 -t {}",
        s.repeats, s.conn_secs, s.clients, s.iperf_secs
    );
    println!(
        "|     N | config    |    conn/s | vs none | µs/conn | Δµs     | Gbit/s | vs none | failed | load (ms) | target |"
    );
    println!(
        "|------:|-----------|----------:|--------:|--------:|--------:|-------:|--------:|-------:|----------:|--------|"
    );
    for row in table {
        println!("{row}");
    }
    println!("load average at end: {}", loadavg());
    Ok(all_pass)
}

fn main() {
    catch_signals();
    // `cargo bench` passes harness flags such as `--bench`; the knobs are environment variables.
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dataplane bench: {e}");
            std::process::exit(2);
        }
    };
    match run(&settings) {
        Ok(true) => println!("all targets met"),
        Ok(false) => println!("some targets missed (see FAIL rows)"),
        Err(e) => {
            eprintln!("dataplane bench: {e}");
            std::process::exit(1);
        }
    }
}
