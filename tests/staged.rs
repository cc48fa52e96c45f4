//! Staged NetworkPolicies (`kube-nftpolicy.io/staged: "true"`) in the kernel of a
//! network-namespace cluster: a staged policy changes no verdict, and its would-allow (denied
//! today, allowed with it) and would-deny (allowed today, denied with it) counters count
//! exactly the new connections probed, per direction, over IPv4 and IPv6; they survive syncs
//! and go with the policy; removing the annotation enforces it. A staged
//! ClusterNetworkPolicy is not enforced (not measured yet).

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use kernel::{NodeDataplanes, labels, list_table, pod_yaml, serial};
use kube_nftpolicy::engine::ruleset::CounterOwner;
use kube_nftpolicy::kernel::nft::transaction::Kind;
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, Layout, Probe};

/// Shorter than the first SYN retransmission (1 s): a denied probe sends one SYN.
const T: Duration = Duration::from_millis(600);

/// One node, pods web (TCP 80, 8080), client (80) and other (80), all in `default`.
fn cluster() -> Cluster {
    Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node("node-1")
            .pod("node-1", "default", "web", &[80, 8080], &[])
            .pod("node-1", "default", "client", &[80], &[])
            .pod("node-1", "default", "other", &[80], &[]),
    )
}

/// Enforced: web takes ingress from client on 80 only.
const WEB_FROM_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-from-client, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]\n";

/// Staged on web (isolated today): would also let other in on 8080.
fn web_8080_from_other(staged: bool) -> String {
    let annotation = if staged {
        "\n  annotations: {kube-nftpolicy.io/staged: \"true\"}"
    } else {
        ""
    };
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web-8080-from-other\n  namespace: default{annotation}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: other}}}}}}]\n    ports: [{{port: 8080}}]\n"
    )
}

/// Staged on client's egress (open today): would allow only web on 80.
const CLIENT_EGRESS: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: client-egress\n  namespace: default\n  annotations: {kube-nftpolicy.io/staged: \"true\"}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 80}]\n";

fn manifests(c: &Cluster, policies: &str) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    for p in c.pods() {
        out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
    }
    out.push_str(policies);
    out
}

/// Every staged counter of the node: (policy, direction, change) → connections.
fn staged(planes: &mut NodeDataplanes, c: &Cluster) -> BTreeMap<(String, String, String), u64> {
    let counters = planes
        .with(c, "node-1", |dp| dp.counters())
        .expect("read counters");
    counters
        .rule_hits
        .into_iter()
        .filter_map(|h| match h.owner {
            CounterOwner::Staged {
                namespace,
                policy,
                direction,
                change,
            } => Some((
                (
                    format!("{namespace}/{policy}"),
                    direction.to_string(),
                    change.to_string(),
                ),
                h.counter.packets,
            )),
            _ => None,
        })
        .collect()
}

/// Drops per pod and direction (only those that moved).
fn drops(planes: &mut NodeDataplanes, c: &Cluster) -> BTreeMap<String, u64> {
    let counters = planes
        .with(c, "node-1", |dp| dp.counters())
        .expect("read counters");
    counters
        .pods
        .into_iter()
        .filter(|d| d.counter.packets > 0)
        .map(|d| {
            (
                format!("{}/{} {}", d.namespace, d.pod, d.direction),
                d.counter.packets,
            )
        })
        .collect()
}

fn key(policy: &str, direction: &str, change: &str) -> (String, String, String) {
    (policy.into(), direction.into(), change.into())
}

fn connect(c: &Cluster, from: &str, to: IpAddr, port: u16, times: usize) -> usize {
    (0..times)
        .filter(|_| c.probe(&Probe::tcp(Endpoint::pod("default", from), to, port), T))
        .count()
}

/// The probes: (from, to, family, port, times, allowed today).
const PROBES: [(&str, &str, Family, u16, usize, bool); 6] = [
    ("client", "web", Family::V4, 80, 2, true),
    ("other", "web", Family::V4, 8080, 3, false),
    ("other", "web", Family::V6, 8080, 1, false),
    ("client", "other", Family::V4, 80, 2, true),
    ("client", "web", Family::V6, 8080, 1, false),
    ("other", "web", Family::V4, 80, 1, false),
];

/// Run every probe; returns how many connections of each succeeded.
fn run_probes(c: &Cluster) -> Vec<usize> {
    PROBES
        .iter()
        .map(|(from, to, f, port, times, _)| {
            connect(c, from, c.pod_ip("default", to, *f), *port, *times)
        })
        .collect()
}

#[test]
fn staged_policies_change_no_verdict_and_count_exactly_the_changes() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);

    // Today's verdicts, and today's drops, without any staged policy.
    planes.sync_text(&c, &manifests(&c, WEB_FROM_CLIENT));
    let want: Vec<usize> = PROBES
        .iter()
        .map(|(.., times, allowed)| if *allowed { *times } else { 0 })
        .collect();
    assert_eq!(run_probes(&c), want, "today's verdicts");
    let drops_without = drops(&mut planes, &c);
    assert_eq!(
        drops_without,
        BTreeMap::from([("default/web ingress".to_string(), 6)]),
        "the denied probes, one SYN each"
    );

    // The same with both staged policies: same verdicts, same drops (the counters of the
    // drop chains survive the sync, so they double).
    let policies = format!(
        "{WEB_FROM_CLIENT}{}{CLIENT_EGRESS}",
        web_8080_from_other(true)
    );
    planes.sync_text(&c, &manifests(&c, &policies));
    let allow = key("default/web-8080-from-other", "ingress", "would-allow");
    let deny = key("default/client-egress", "egress", "would-deny");
    assert_eq!(
        staged(&mut planes, &c),
        BTreeMap::from([(allow.clone(), 0), (deny.clone(), 0)]),
        "one counter per staged policy and direction, by whether its pods are isolated today"
    );
    assert_eq!(run_probes(&c), want, "staged policies change no verdict");
    assert_eq!(
        drops(&mut planes, &c),
        BTreeMap::from([("default/web ingress".to_string(), 12)]),
        "the same drops"
    );
    // would-allow: other → web:8080 over IPv4 (3) and IPv6 (1); not other → web:80 (the
    //   staged rule is 8080 only), not client → web (allowed today).
    // would-deny (egress of client, judged on egress alone): client → other:80 (2) and
    //   client → web:8080 (1, denied today by web's ingress anyway); not client → web:80.
    let counted = BTreeMap::from([(allow.clone(), 4), (deny.clone(), 3)]);
    assert_eq!(
        staged(&mut planes, &c),
        counted,
        "exactly the probed changes"
    );

    // Established traffic never reaches the check: a long connection counts once. A sync
    // that rewrites the staged chains' neighbours keeps the counts.
    let more = format!(
        "{policies}{}",
        web_8080_from_other(true).replace("web-8080-from-other", "copy")
    );
    let reports = planes.sync_text(&c, &manifests(&c, &more));
    assert_eq!(reports[0].1.kind, Some(Kind::Partial));
    let copy = key("default/copy", "ingress", "would-allow");
    let mut counted = counted;
    counted.insert(copy.clone(), 0);
    assert_eq!(
        staged(&mut planes, &c),
        counted,
        "kept across a partial sync"
    );
    assert_eq!(
        connect(&c, "other", c.pod_ip("default", "web", Family::V4), 8080, 1),
        0
    );
    counted.insert(allow.clone(), 5);
    counted.insert(copy.clone(), 1);
    assert_eq!(
        staged(&mut planes, &c),
        counted,
        "each staged policy is judged alone: both count the connection"
    );
    planes.with(&c, "node-1", |dp| dp.request_full_sync());
    let reports = planes.sync_text(&c, &manifests(&c, &more));
    assert_eq!(reports[0].1.kind, Some(Kind::Full));
    assert_eq!(staged(&mut planes, &c), counted, "kept across a full sync");

    // Enforcing it (annotation removed): other reaches web on 8080; its counters go.
    let enforced = format!(
        "{WEB_FROM_CLIENT}{}{CLIENT_EGRESS}",
        web_8080_from_other(false)
    );
    planes.sync_text(&c, &manifests(&c, &enforced));
    assert_eq!(
        staged(&mut planes, &c),
        BTreeMap::from([(deny.clone(), 3)]),
        "the enforced policy's staged counter is gone"
    );
    assert_eq!(
        connect(&c, "other", c.pod_ip("default", "web", Family::V4), 8080, 2),
        2,
        "enforced now"
    );
    planes.sync_text(&c, &manifests(&c, WEB_FROM_CLIENT));
    assert_eq!(staged(&mut planes, &c), BTreeMap::new());
    let listing = list_table(&c, "node-1");
    // (A partial sync empties a chain that goes rather than deleting it, as for policy
    // chains; nothing jumps to it any more and its counter object is deleted.)
    assert!(
        !listing.contains("counter staged/") && !listing.contains("jump staged/"),
        "no staged counter or jump is left behind:\n{listing}"
    );
}

/// Staged policies that allow nothing: one on a pod isolated today has nothing to count
/// (no chain at all); one on an open pod counts every new connection as would-deny.
#[test]
fn staged_deny_all_counts_every_new_connection_of_an_open_pod() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    let deny_all = |name: &str, app: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{kube-nftpolicy.io/staged: \"true\"}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [Ingress]\n"
        )
    };
    let policies = format!(
        "{WEB_FROM_CLIENT}{}{}",
        deny_all("web-deny", "web"),
        deny_all("other-deny", "other")
    );
    planes.sync_text(&c, &manifests(&c, &policies));
    let listing = list_table(&c, "node-1");
    assert!(
        !listing.contains("staged/default/web-deny"),
        "a staged deny-all cannot allow what is denied today:\n{listing}"
    );
    let other4 = c.pod_ip("default", "other", Family::V4);
    let other6 = c.pod_ip("default", "other", Family::V6);
    assert_eq!(connect(&c, "client", other4, 80, 2), 2, "still allowed");
    assert_eq!(connect(&c, "web", other6, 80, 1), 1, "still allowed (IPv6)");
    assert_eq!(
        connect(&c, "client", c.pod_ip("default", "web", Family::V4), 80, 1),
        1
    );
    assert_eq!(
        staged(&mut planes, &c),
        BTreeMap::from([(key("default/other-deny", "ingress", "would-deny"), 3)])
    );
}

/// A staged ClusterNetworkPolicy is not enforced (and, for now, not measured): its Admin
/// Deny drops nothing and has no chain; unstaged, it drops.
#[test]
fn a_staged_cluster_network_policy_is_not_enforced() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    let cnp = |staged: bool| {
        format!(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: no-other-to-web{}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: web}}}}}}}}\n  ingress:\n  - {{name: other, action: Deny, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: other}}}}}}}}]}}\n",
            if staged {
                "\n  annotations: {kube-nftpolicy.io/staged: \"true\"}"
            } else {
                ""
            }
        )
    };
    let web = c.pod_ip("default", "web", Family::V4);
    planes.sync_text(&c, &manifests(&c, &cnp(true)));
    assert_eq!(connect(&c, "other", web, 80, 2), 2, "staged: not enforced");
    let listing = list_table(&c, "node-1");
    assert!(
        !listing.contains("cnp/no-other-to-web"),
        "no chain for a staged ClusterNetworkPolicy:\n{listing}"
    );
    planes.sync_text(&c, &manifests(&c, &cnp(false)));
    assert_eq!(
        connect(&c, "other", web, 80, 1),
        0,
        "enforced once unstaged"
    );
    assert_eq!(
        connect(&c, "client", web, 80, 1),
        1,
        "the Deny is for other only"
    );
}
