//! New-connection cost as the node's ruleset grows, measured with real TCP connections
//! between network namespaces (needs root): the verdict-map dispatch should keep the cost flat
//! as the number of isolated pods (and the policies selecting *them*) grows, while policies
//! that select the destination pod itself each add one jump and one set lookup.
//!
//! Run: `cargo bench --bench packet_path` (as root). Figures are in docs/benchmarks.md.

#[path = "../tests/support/netns.rs"]
mod netns;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::kernel::dataplane::Dataplane;
use kube_nftpolicy::kernel::nft::exec::Nft;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout};

const CONNECTS: usize = 3000;

fn pod_doc(name: &str, app: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: \"{ip}\"}}]}}\n"
    )
}

fn policy_doc(name: &str, selects: &str, from: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: {selects}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]\n    ports: [{{port: 80}}]\n"
    )
}

/// `others` extra isolated pods (each with its own policy), and `on_web` extra policies that
/// select web but allow someone else (so they are walked before the allowing one).
fn manifests(c: &Cluster, others: usize, on_web: usize) -> String {
    let web = c.pod_ip("default", "web", Family::V4);
    let client = c.pod_ip("default", "client", Family::V4);
    let mut s = String::from("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n");
    s.push_str(&pod_doc("web", "web", &web.to_string()));
    s.push_str(&pod_doc("client", "client", &client.to_string()));
    for i in 0..others {
        let ip = format!("10.244.{}.{}", 100 + i / 250, 1 + i % 250);
        s.push_str(&pod_doc(&format!("other-{i}"), &format!("other-{i}"), &ip));
        s.push_str(&policy_doc(
            &format!("other-{i}"),
            &format!("other-{i}"),
            "client",
        ));
    }
    for i in 0..on_web {
        // Named "a-…" so their chains are jumped to before the allowing policy's.
        s.push_str(&policy_doc(
            &format!("a-filler-{i:04}"),
            "web",
            &format!("nobody-{i}"),
        ));
    }
    s.push_str(&policy_doc("z-web-allows-client", "web", "client"));
    s
}

fn measure(c: &Cluster, dp: Dataplane, text: &str) -> (Dataplane, Duration, usize) {
    let m = parse_sources(&[("b.yaml".into(), text.to_string())]).expect("manifests");
    let idx = m.into_index();
    let rs = compile(
        &resolve(&idx.snapshot(), "node-1"),
        &CompileOptions::default(),
    );
    let chains = rs.chains.len();
    let mut dp = dp;
    let dp = c.run_in_node("node-1", move || {
        dp.request_full_sync();
        dp.sync(&rs).expect("sync");
        dp
    });
    let web: SocketAddr = (c.pod_ip("default", "web", Family::V4), 80).into();
    let per_connect = c.run_in(Endpoint::pod("default", "client"), move || {
        let mut times = Vec::with_capacity(CONNECTS);
        for _ in 0..CONNECTS {
            let t = Instant::now();
            let mut s =
                TcpStream::connect_timeout(&web, Duration::from_secs(1)).expect("connect allowed");
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            times.push(t.elapsed());
        }
        times.sort();
        times[times.len() / 2]
    });
    (dp, per_connect, chains)
}

fn main() {
    let c = Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node("node-1")
            .pod("node-1", "default", "web", &[80], &[])
            .pod("node-1", "default", "client", &[80], &[]),
    );
    let mut dp = Dataplane::new(Nft::default());
    println!(
        "median time per TCP connect + 1-byte read, client → isolated web, {CONNECTS} connects each"
    );
    for (others, on_web) in [(0, 0), (100, 0), (1000, 0), (0, 10), (0, 100)] {
        let (d, median, chains) = measure(&c, dp, &manifests(&c, others, on_web));
        dp = d;
        println!(
            "  {others:>5} other isolated pods, {on_web:>4} extra policies on web ({chains:>5} chains): {:>7.1} µs",
            median.as_secs_f64() * 1e6
        );
    }
}
