//! Audit mode (`run --audit`) in the kernel of a network-namespace cluster: the same ruleset,
//! but every terminal chain (a pod's isolation drop, a ClusterNetworkPolicy Deny rule, an
//! unknown address) counts and accepts. Denied connections go through and each is counted
//! exactly once, in the counter that would have dropped it; allowed ones are counted by no
//! terminal chain. Switching back to enforcing drops again, and the count starts over.

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::time::Duration;

use kernel::{NodeDataplanes, labels, list_table, pod_yaml, serial};
use kube_nftpolicy::kernel::dataplane::TerminalCounters;
use kube_nftpolicy::kernel::nft::transaction::Kind;
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe};

const T: Duration = Duration::from_millis(600);

/// One node; `ghost` runs but is missing from the manifests, so its address is unknown.
fn cluster() -> Cluster {
    Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node("node-1")
            .pod("node-1", "default", "web", &[80], &[])
            .pod("node-1", "default", "client", &[80], &[])
            .pod("node-1", "default", "other", &[80], &[])
            .pod("node-1", "default", "ghost", &[80], &[]),
    )
}

const WEB_ALLOWS_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allows-client, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n";
const NO_OTHER_TO_CLIENT: &str = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-other-to-client}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}\n  ingress:\n  - {name: other, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: other}}}}]}\n";

fn manifests(c: &Cluster) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    for p in c.pods().iter().filter(|p| p.name != "ghost") {
        out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
    }
    out.push_str(WEB_ALLOWS_CLIENT);
    out.push_str(NO_OTHER_TO_CLIENT);
    out
}

/// The terminal counters that moved: name → packets.
fn moved(counters: &TerminalCounters) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for d in &counters.pods {
        out.insert(
            format!("pod {}/{} {}", d.namespace, d.pod, d.direction),
            d.counter.packets,
        );
    }
    for d in &counters.cnp_denies {
        out.insert(
            format!("cnp {} {} {}", d.policy, d.direction, d.rule),
            d.counter.packets,
        );
    }
    for (d, c) in &counters.unknown {
        out.insert(format!("unknown {d}"), c.packets);
    }
    out.retain(|_, v| *v > 0);
    out
}

fn connect(c: &Cluster, from: &str, to: &str, times: usize) -> usize {
    let ip = c.pod_ip("default", to, Family::V4);
    (0..times)
        .filter(|_| c.probe(&Probe::tcp(Endpoint::pod("default", from), ip, 80), T))
        .count()
}

#[test]
fn audit_mode_lets_denied_connections_through_and_counts_each() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
    planes.options.audit = true;
    planes.sync_text(&c, &manifests(&c));
    let listing = list_table(&c, "node-1");
    for chain in [
        "ingress/default/web/drop",
        "cnp/no-other-to-client/ingress/0/drop",
        "unknown-address/ingress/drop",
    ] {
        let body = listing
            .split(&format!("chain {chain} {{"))
            .nth(1)
            .unwrap_or_else(|| panic!("no chain {chain}:\n{listing}"));
        let rule = body.lines().nth(2).unwrap_or_default();
        assert!(
            rule.contains("accept comment \"audit mode: would drop\""),
            "{chain} accepts: {rule}"
        );
    }

    // Each of these would be denied; in audit mode each goes through.
    let cases = [
        ("other", "web", 3, "isolated by web-allows-client"),
        ("other", "client", 2, "ClusterNetworkPolicy Deny"),
        ("client", "ghost", 1, "unknown address"),
    ];
    for (from, to, n, why) in cases {
        assert_eq!(
            connect(&c, from, to, n),
            n,
            "{from} -> {to} ({why}) goes through"
        );
    }
    // Allowed: counted by no terminal chain.
    assert_eq!(connect(&c, "client", "web", 2), 2);
    assert_eq!(connect(&c, "web", "other", 2), 2);
    let counters = planes
        .with(&c, "node-1", |dp| dp.counters())
        .expect("read counters");
    assert_eq!(
        moved(&counters),
        BTreeMap::from([
            ("pod default/web ingress".to_string(), 3),
            ("cnp no-other-to-client ingress other".to_string(), 2),
            ("unknown ingress".to_string(), 1),
        ]),
        "each would-be-denied connection counted once, where it would have been dropped"
    );

    // Back to enforcing (a restart without --audit: its first sync is full): denied again,
    // and the counters start from zero, since drops and would-drops are different things.
    planes.options.audit = false;
    planes.with(&c, "node-1", |dp| dp.request_full_sync());
    let reports = planes.sync_text(&c, &manifests(&c));
    assert_eq!(reports[0].1.kind, Some(Kind::Full));
    assert_eq!(
        moved(&planes.with(&c, "node-1", |dp| dp.counters()).expect("read")),
        BTreeMap::new(),
        "would-drop counts do not carry over into drops"
    );
    for (from, to, _, why) in cases {
        assert_eq!(
            connect(&c, from, to, 1),
            0,
            "{from} -> {to} ({why}) is denied"
        );
    }
    assert_eq!(connect(&c, "client", "web", 1), 1);
    let counters = planes
        .with(&c, "node-1", |dp| dp.counters())
        .expect("read counters");
    assert_eq!(
        moved(&counters),
        BTreeMap::from([
            ("pod default/web ingress".to_string(), 1),
            ("cnp no-other-to-client ingress other".to_string(), 1),
            ("unknown ingress".to_string(), 1),
        ]),
        "one SYN each within the probe's timeout"
    );
}
