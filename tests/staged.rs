//! Staged NetworkPolicies (`kube-nftpolicy.io/staged: "true"`) in the kernel of a
//! network-namespace cluster: a staged policy changes no verdict, and its would-allow (denied
//! today, allowed with it) and would-deny (allowed today, denied with it) counters count
//! exactly the new connections probed, per direction, over IPv4 and IPv6; they survive syncs
//! and go with the policy; removing the annotation enforces it. A staged
//! ClusterNetworkPolicy is not enforced but measured through a packet mark field: its
//! would-deny / would-allow counters count exactly the probed changes in both directions,
//! nothing when an enforced policy decides first or its tier is not reached, the field is
//! cleared before anyone after us sees it, and a packet arriving with the field set is not
//! measured and keeps its mark.

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
use netns::KUBELET_PORT;
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

/// A probe: (from, to, family, port, times, allowed today).
type ProbeRow = (&'static str, &'static str, Family, u16, usize, bool);

/// The probes of the NetworkPolicy test.
const PROBES: [ProbeRow; 6] = [
    ("client", "web", Family::V4, 80, 2, true),
    ("other", "web", Family::V4, 8080, 3, false),
    ("other", "web", Family::V6, 8080, 1, false),
    ("client", "other", Family::V4, 80, 2, true),
    ("client", "web", Family::V6, 8080, 1, false),
    ("other", "web", Family::V4, 80, 1, false),
];

/// Run every probe; returns how many connections of each succeeded.
fn run_probes(c: &Cluster, probes: &[ProbeRow]) -> Vec<usize> {
    probes
        .iter()
        .map(|(from, to, f, port, times, _)| {
            connect(c, from, c.pod_ip("default", to, *f), *port, *times)
        })
        .collect()
}

/// What `run_probes` returns when today's verdicts hold.
fn allowed_today(probes: &[ProbeRow]) -> Vec<usize> {
    probes
        .iter()
        .map(|(.., times, allowed)| if *allowed { *times } else { 0 })
        .collect()
}

#[test]
fn staged_policies_change_no_verdict_and_count_exactly_the_changes() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);

    // Today's verdicts, and today's drops, without any staged policy.
    planes.sync_text(&c, &manifests(&c, WEB_FROM_CLIENT));
    let want = allowed_today(&PROBES);
    assert_eq!(run_probes(&c, &PROBES), want, "today's verdicts");
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
    assert_eq!(
        run_probes(&c, &PROBES),
        want,
        "staged policies change no verdict"
    );
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

/// A staged ClusterNetworkPolicy is not enforced: its Admin Deny drops nothing; unstaged,
/// it drops.
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
        !listing.contains("cnp/no-other-to-web/ingress/0/drop"),
        "no Deny chain for a staged ClusterNetworkPolicy:\n{listing}"
    );
    assert_eq!(
        staged_cnp(&mut planes, &c),
        BTreeMap::from([(key("no-other-to-web", "ingress", "would-deny"), 2)]),
        "measured instead"
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
    assert_eq!(
        staged_cnp(&mut planes, &c),
        BTreeMap::new(),
        "counters gone"
    );
    let listing = list_table(&c, "node-1");
    // (Chains that go are emptied by a partial sync and deleted by the next one.)
    assert!(
        !listing.contains("meta mark")
            && !listing.contains("counter staged-cnp")
            && !listing.contains("staged-cnp-settle-ingress {\n\t\ttype"),
        "no mark rule, counter or settle map is left once nothing is staged:\n{listing}"
    );
}

/// Every staged ClusterNetworkPolicy counter of node-1: (policy, direction, change) → packets.
fn staged_cnp(planes: &mut NodeDataplanes, c: &Cluster) -> BTreeMap<(String, String, String), u64> {
    let counters = planes
        .with(c, "node-1", |dp| dp.counters())
        .expect("read counters");
    counters
        .rule_hits
        .into_iter()
        .filter_map(|h| match h.owner {
            CounterOwner::StagedCnp {
                policy,
                direction,
                change,
                ..
            } => Some((
                (policy, direction.to_string(), change.to_string()),
                h.counter.packets,
            )),
            _ => None,
        })
        .collect()
}

/// A ClusterNetworkPolicy: `rules` are `(action, peer app, ports)` of one direction.
fn cnp_yaml(
    name: &str,
    staged: bool,
    tier: &str,
    priority: u16,
    subject_app: &str,
    direction: &str,
    rules: &[(&str, &str, &[u16])],
) -> String {
    let annotation = if staged {
        "\n  annotations: {kube-nftpolicy.io/staged: \"true\"}"
    } else {
        ""
    };
    let peers = if direction == "ingress" { "from" } else { "to" };
    let mut out = format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}{annotation}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {subject_app}}}}}}}}}\n  {direction}:\n"
    );
    for (i, (action, app, ports)) in rules.iter().enumerate() {
        out.push_str(&format!(
            "  - name: r{i}\n    action: {action}\n    {peers}: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {app}}}}}}}}}]\n"
        ));
        if !ports.is_empty() {
            out.push_str("    protocols:\n");
            for p in *ports {
                out.push_str(&format!(
                    "    - tcp: {{destinationPort: {{number: {p}}}}}\n"
                ));
            }
        }
    }
    out
}

/// The enforced policies of the staged ClusterNetworkPolicy test: web takes client on 80
/// (NetworkPolicy), an Admin Deny of other → web:80 decides before any staged policy, and a
/// Baseline Deny of client → web:8080 on client's egress.
fn enforced_for_staged_cnps() -> String {
    format!(
        "{WEB_FROM_CLIENT}{}{}",
        cnp_yaml(
            "e-deny-other-80",
            false,
            "Admin",
            10,
            "web",
            "ingress",
            &[("Deny", "other", &[80])]
        ),
        cnp_yaml(
            "base-client-out",
            false,
            "Baseline",
            100,
            "client",
            "egress",
            &[("Deny", "web", &[8080])]
        ),
    )
}

/// The staged ClusterNetworkPolicies of that test.
fn staged_cnps() -> String {
    [
        // Admin Deny over client → web:80, allowed today by the NetworkPolicy: would-deny.
        cnp_yaml(
            "s-deny-client",
            true,
            "Admin",
            20,
            "web",
            "ingress",
            &[("Deny", "client", &[])],
        ),
        // Admin Accept over other → web:8080, denied today by web's isolation: would-allow;
        // other → web:80 is decided first by e-deny-other-80: nothing.
        cnp_yaml(
            "s-allow-other",
            true,
            "Admin",
            30,
            "web",
            "ingress",
            &[("Accept", "other", &[80, 8080])],
        ),
        // client's egress: Accept to web:8080 (denied today by the Baseline Deny:
        // would-allow), Deny to other (allowed today: would-deny).
        cnp_yaml(
            "s-client-egress",
            true,
            "Admin",
            40,
            "client",
            "egress",
            &[("Accept", "web", &[8080]), ("Deny", "other", &[])],
        ),
        // Baseline on web, isolated by a NetworkPolicy: never reached, nothing counted.
        cnp_yaml(
            "s-base-web",
            true,
            "Baseline",
            50,
            "web",
            "ingress",
            &[("Deny", "client", &[])],
        ),
        // Baseline on other (open, no tier chain today): client → other would-deny.
        cnp_yaml(
            "s-base-other",
            true,
            "Baseline",
            50,
            "other",
            "ingress",
            &[("Deny", "client", &[])],
        ),
    ]
    .concat()
}

/// A staged Admin Deny of client → its node (`node_ip`): allowed today, so would-deny, settled
/// on the input hook after `egress-to-node`.
fn staged_to_node(node_ip: IpAddr) -> String {
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: s-client-to-node\n  annotations: {{kube-nftpolicy.io/staged: \"true\"}}\nspec:\n  tier: Admin\n  priority: 45\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: client}}}}}}}}\n  egress:\n  - {{name: node, action: Deny, to: [{{networks: [\"{node_ip}/32\"]}}]}}\n"
    )
}

/// The probes of the ClusterNetworkPolicy test.
const CNP_PROBES: [ProbeRow; 7] = [
    ("client", "web", Family::V4, 80, 2, true),
    ("other", "web", Family::V4, 8080, 3, false),
    ("other", "web", Family::V6, 8080, 1, false),
    ("other", "web", Family::V4, 80, 2, false),
    ("client", "web", Family::V4, 8080, 1, false),
    ("client", "other", Family::V4, 80, 2, true),
    ("client", "other", Family::V6, 80, 1, true),
];

/// A table of the test's own in node-1 that counts, after every hook of ours, the packets
/// that still carry bits of the mark field (they must not), and the packets carrying the
/// foreign value `0xff000000` (set by the test on client → web:80 when `foreign`).
fn mark_watch(c: &Cluster, foreign: bool) {
    let web = c.pod_ip("default", "web", Family::V4);
    let client = c.pod_ip("default", "client", Family::V4);
    let set_foreign = if foreign {
        format!("ip saddr {client} ip daddr {web} tcp dport 80 meta mark set 0xff000000 counter")
    } else {
        String::new()
    };
    c.nft(
        Endpoint::node("node-1"),
        &format!(
            "table inet mark-watch {{
  chain pre {{
    type filter hook prerouting priority -300; policy accept;
    {set_foreign}
  }}
  chain post {{
    type filter hook postrouting priority 200; policy accept;
    meta mark 0xff000000 counter comment \"foreign\"
    meta mark & 0xff000000 != 0 counter comment \"ours\"
  }}
  chain input {{
    type filter hook input priority 200; policy accept;
    meta mark & 0xff000000 != 0 counter comment \"ours\"
  }}
}}
"
        ),
    );
}

/// Packets counted by the mark-watch rules with this comment, summed.
fn mark_watch_count(c: &Cluster, comment: &str) -> u64 {
    let listing = c.exec_ok(
        Endpoint::node("node-1"),
        &["nft", "list", "table", "inet", "mark-watch"],
        None,
    );
    listing
        .lines()
        .filter(|l| l.contains(&format!("comment \"{comment}\"")))
        .filter_map(|l| {
            let rest = l.split("counter packets ").nth(1)?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn staged_cluster_network_policies_count_exactly_the_changes_in_both_directions() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    let node = c.node_ip("node-1", Family::V4);
    let to_node = || connect(&c, "client", node, KUBELET_PORT, 1);

    // Today's verdicts without staged policies.
    planes.sync_text(&c, &manifests(&c, &enforced_for_staged_cnps()));
    let want = allowed_today(&CNP_PROBES);
    assert_eq!(run_probes(&c, &CNP_PROBES), want, "today's verdicts");
    let drops_today = drops(&mut planes, &c);

    // The same with the staged ClusterNetworkPolicies, watched by a table of our own.
    assert_eq!(to_node(), 1, "client reaches its node today");
    let all = format!(
        "{}{}{}",
        enforced_for_staged_cnps(),
        staged_cnps(),
        staged_to_node(node)
    );
    planes.sync_text(&c, &manifests(&c, &all));
    mark_watch(&c, false);
    let zero = BTreeMap::from([
        (key("s-allow-other", "ingress", "would-allow"), 0),
        (key("s-base-other", "ingress", "would-deny"), 0),
        (key("s-base-web", "ingress", "would-deny"), 0),
        (key("s-client-to-node", "egress", "would-deny"), 0),
        (key("s-client-egress", "egress", "would-allow"), 0),
        (key("s-client-egress", "egress", "would-deny"), 0),
        (key("s-deny-client", "ingress", "would-deny"), 0),
    ]);
    assert_eq!(
        staged_cnp(&mut planes, &c),
        zero,
        "one counter per staged policy, direction and change it can make"
    );
    assert_eq!(
        planes
            .with(&c, "node-1", |dp| dp.check_drift())
            .expect("drift check"),
        None,
        "the read-back agrees with the settle and mark chains"
    );
    assert_eq!(
        run_probes(&c, &CNP_PROBES),
        want,
        "staged policies change no verdict"
    );
    assert_eq!(to_node(), 1, "client still reaches its node");
    let doubled: BTreeMap<String, u64> = drops_today
        .iter()
        .map(|(k, v)| (k.clone(), v * 2))
        .collect();
    assert_eq!(drops(&mut planes, &c), doubled, "the same drops");
    let counted = BTreeMap::from([
        // other → web:8080, denied today by the isolation: 3 + 1 (IPv6). Not other →
        // web:80: the enforced Admin Deny (priority 10) decides before the staged Accept.
        (key("s-allow-other", "ingress", "would-allow"), 4),
        // client → other, IPv4 and IPv6: the Baseline tier of an open pod, after the egress
        // verdict was settled and its mark cleared.
        (key("s-base-other", "ingress", "would-deny"), 3),
        // web is isolated by a NetworkPolicy: its Baseline tier is never reached.
        (key("s-base-web", "ingress", "would-deny"), 0),
        // client → its node: accepted by egress-to-node (input), settled after it.
        (key("s-client-to-node", "egress", "would-deny"), 1),
        // client → web:8080, denied today by the Baseline Deny on client's egress.
        (key("s-client-egress", "egress", "would-allow"), 1),
        // client → other, allowed today.
        (key("s-client-egress", "egress", "would-deny"), 3),
        // client → web:80, allowed today by the NetworkPolicy; not client → web:8080 (a
        // Deny over a denial changes nothing).
        (key("s-deny-client", "ingress", "would-deny"), 2),
    ]);
    assert_eq!(
        staged_cnp(&mut planes, &c),
        counted,
        "exactly the probed changes"
    );
    assert_eq!(
        mark_watch_count(&c, "ours"),
        0,
        "the mark field is cleared after our hooks"
    );

    // A packet that arrives with the field set is not measured and keeps its mark.
    c.exec_ok(
        Endpoint::node("node-1"),
        &["nft", "delete", "table", "inet", "mark-watch"],
        None,
    );
    mark_watch(&c, true);
    let web = c.pod_ip("default", "web", Family::V4);
    assert_eq!(connect(&c, "client", web, 80, 1), 1, "still allowed");
    assert_eq!(staged_cnp(&mut planes, &c), counted, "not measured");
    assert!(
        mark_watch_count(&c, "foreign") >= 1,
        "the foreign mark is kept"
    );
    assert_eq!(
        mark_watch_count(&c, "ours"),
        mark_watch_count(&c, "foreign"),
        "no other packet carries bits of the field"
    );
    c.exec_ok(
        Endpoint::node("node-1"),
        &["nft", "delete", "table", "inet", "mark-watch"],
        None,
    );

    // Counters survive a full sync; unstaged, the policies enforce and their counters go.
    planes.with(&c, "node-1", |dp| dp.request_full_sync());
    let reports = planes.sync_text(&c, &manifests(&c, &all));
    assert_eq!(reports[0].1.kind, Some(Kind::Full));
    assert_eq!(
        staged_cnp(&mut planes, &c),
        counted,
        "kept across a full sync"
    );
    planes.sync_text(&c, &manifests(&c, &enforced_for_staged_cnps()));
    assert_eq!(staged_cnp(&mut planes, &c), BTreeMap::new());
    assert_eq!(run_probes(&c, &CNP_PROBES), want, "today's verdicts again");
}

/// With `--log-denied`, each counted change is an NFLOG packet whose prefix names the staged
/// ClusterNetworkPolicy, its tier and the change.
#[test]
fn staged_cluster_network_policy_counts_are_logged() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    planes.options.log_group = Some(77);
    let all = format!("{}{}", enforced_for_staged_cnps(), staged_cnps());
    planes.sync_text(&c, &manifests(&c, &all));
    let listing = list_table(&c, "node-1");
    for prefix in [
        "knpsc:ingress:would-allow:admin:s-allow-other",
        "knpsc:egress:would-deny:admin:s-client-egress",
        "knpsc:ingress:would-deny:baseline:s-base-other",
    ] {
        assert!(
            listing.contains(&format!("log prefix \"{prefix}\" group 77")),
            "{prefix}:\n{listing}"
        );
    }
}
