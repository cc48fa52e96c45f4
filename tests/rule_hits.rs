//! Rule hit counters in the kernel of a network-namespace cluster: every rule of a
//! NetworkPolicy (and every Accept and Pass rule of a ClusterNetworkPolicy) counts exactly the
//! new connections that went through it, across all the nft rules it became (peers,
//! families, port kinds), keeps counting across partial and full syncs that rewrite its
//! chain, and its counter object goes with the rule.

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

const T: Duration = Duration::from_millis(600);

/// One node, pods web (TCP 80, 8080), client and other, all in `default`.
fn cluster() -> Cluster {
    Cluster::new(
        ClusterSpec::new(Layout::Routed)
            .node("node-1")
            .pod("node-1", "default", "web", &[80, 8080], &[])
            .pod("node-1", "default", "client", &[80], &[])
            .pod("node-1", "default", "other", &[80], &[]),
    )
}

fn manifests(c: &Cluster, policies: &str) -> String {
    let mut out = namespace_yaml("default", &BTreeMap::new());
    for p in c.pods() {
        out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
    }
    out.push_str(policies);
    out
}

/// Three ingress rules on web: from client on 80 (a pod peer: one nft rule per family), from
/// anyone on 8080, and from a documentation range that no pod is in.
const WEB_RULES: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]\n  - ports: [{port: 8080}]\n  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]\n";

/// The same policy with a fourth rule, so its chain is rewritten.
fn web_rules_plus_one() -> String {
    format!(
        "{WEB_RULES}  - from: [{{podSelector: {{matchLabels: {{app: other}}}}}}]\n    ports: [{{port: 80}}]\n"
    )
}

/// Every rule hit counter of the node: (policy, direction, rule) → hits.
fn hits(planes: &mut NodeDataplanes, c: &Cluster) -> BTreeMap<(String, String, String), u64> {
    let counters = planes
        .with(c, "node-1", |dp| dp.counters())
        .expect("read counters");
    counters
        .rule_hits
        .into_iter()
        .map(|h| {
            let key = match h.owner {
                CounterOwner::Policy {
                    namespace,
                    policy,
                    direction,
                    rule,
                } => (
                    format!("{namespace}/{policy}"),
                    direction.to_string(),
                    rule.to_string(),
                ),
                CounterOwner::Cnp {
                    policy,
                    direction,
                    rule,
                    ..
                } => (policy, direction.to_string(), rule),
                CounterOwner::Staged {
                    namespace,
                    policy,
                    direction,
                    change,
                } => (
                    format!("{namespace}/{policy}"),
                    direction.to_string(),
                    change.to_string(),
                ),
                CounterOwner::StagedCnp {
                    policy,
                    direction,
                    change,
                    ..
                } => (policy, direction.to_string(), change.to_string()),
            };
            (key, h.counter.packets)
        })
        .collect()
}

fn key(policy: &str, direction: &str, rule: &str) -> (String, String, String) {
    (policy.into(), direction.into(), rule.into())
}

fn connect(c: &Cluster, from: &str, to: IpAddr, port: u16, times: usize) -> usize {
    (0..times)
        .filter(|_| c.probe(&Probe::tcp(Endpoint::pod("default", from), to, port), T))
        .count()
}

#[test]
fn rule_hit_counters_count_each_rules_connections_and_survive_syncs() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    planes.sync_text(&c, &manifests(&c, WEB_RULES));
    let web4 = c.pod_ip("default", "web", Family::V4);
    let web6 = c.pod_ip("default", "web", Family::V6);
    let (r0, r1, r2) = (
        key("default/web", "ingress", "0"),
        key("default/web", "ingress", "1"),
        key("default/web", "ingress", "2"),
    );
    let start = hits(&mut planes, &c);
    assert_eq!(
        start,
        BTreeMap::from([(r0.clone(), 0), (r1.clone(), 0), (r2.clone(), 0)]),
        "one counter per rule, all at zero"
    );

    // Rule 0 over both families (two nft rules, one counter); rule 1 from two peers.
    assert_eq!(connect(&c, "client", web4, 80, 3), 3);
    assert_eq!(connect(&c, "client", web6, 80, 2), 2);
    assert_eq!(connect(&c, "client", web4, 8080, 1), 1);
    assert_eq!(connect(&c, "other", web4, 8080, 2), 2);
    // Denied: counted by no rule.
    assert_eq!(connect(&c, "other", web4, 80, 2), 0);
    let want = BTreeMap::from([(r0.clone(), 5), (r1.clone(), 3), (r2.clone(), 0)]);
    assert_eq!(hits(&mut planes, &c), want, "exactly the connections made");

    // Established traffic does not count again: a probe is a whole connection (handshake,
    // data, close), and only its first packet reached the policy chain.
    // A partial sync that rewrites web's policy chain keeps the counts; the new rule starts
    // at zero.
    let reports = planes.sync_text(&c, &manifests(&c, &web_rules_plus_one()));
    assert_eq!(reports[0].1.kind, Some(Kind::Partial));
    let r3 = key("default/web", "ingress", "3");
    let mut want = want;
    want.insert(r3.clone(), 0);
    assert_eq!(hits(&mut planes, &c), want, "kept across a partial sync");
    assert_eq!(connect(&c, "other", web4, 80, 1), 1, "rule 3 allows it now");
    want.insert(r3.clone(), 1);
    assert_eq!(hits(&mut planes, &c), want);

    // A full sync keeps them too.
    planes.with(&c, "node-1", |dp| dp.request_full_sync());
    let reports = planes.sync_text(&c, &manifests(&c, &web_rules_plus_one()));
    assert_eq!(reports[0].1.kind, Some(Kind::Full));
    assert_eq!(hits(&mut planes, &c), want, "kept across a full sync");

    // A rule that goes takes its counter object with it (partial sync), and so does a policy.
    let reports = planes.sync_text(&c, &manifests(&c, WEB_RULES));
    assert_eq!(reports[0].1.kind, Some(Kind::Partial));
    want.remove(&r3);
    assert_eq!(hits(&mut planes, &c), want, "rule 3's counter is gone");
    assert!(!list_table(&c, "node-1").contains("hits/np/default/web/ingress/3"));
    planes.sync_text(&c, &manifests(&c, ""));
    assert_eq!(hits(&mut planes, &c), BTreeMap::new());
    let listing = list_table(&c, "node-1");
    assert!(
        !listing.contains("counter hits/"),
        "no counter object is left behind:\n{listing}"
    );
}

/// An Admin ClusterNetworkPolicy on web: Accept from client on 80, Pass from other (then
/// NetworkPolicy decides: only 8080 is open to other), Deny the rest.
const CNP: &str = "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  ingress:\n  - {name: client-in, action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}\n  - {name: other-to-np, action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: other}}}}]}\n  - {name: rest, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {}}}]}\n";

const WEB_8080: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-8080, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 8080}]\n";

#[test]
fn cluster_network_policy_accept_and_pass_rules_count_their_hits() {
    let _g = serial();
    let c = cluster();
    let mut planes = NodeDataplanes::new(&c);
    planes.sync_text(&c, &manifests(&c, &format!("{CNP}{WEB_8080}")));
    let web = c.pod_ip("default", "web", Family::V4);

    assert_eq!(connect(&c, "client", web, 80, 2), 2, "Accept");
    assert_eq!(
        connect(&c, "client", web, 8080, 1),
        0,
        "Deny (after no Accept)"
    );
    assert_eq!(
        connect(&c, "other", web, 8080, 3),
        3,
        "Pass, then the NetworkPolicy"
    );
    assert_eq!(connect(&c, "other", web, 80, 2), 0, "Pass, then isolated");
    let got = hits(&mut planes, &c);
    assert_eq!(
        got,
        BTreeMap::from([
            (key("guard", "ingress", "client-in"), 2),
            (key("guard", "ingress", "other-to-np"), 5),
            (key("default/web-8080", "ingress", "0"), 3),
        ]),
        "Accept and Pass rules count each connection once (the tier chain's repeated Pass \
         matchers do not), NetworkPolicy rules the ones they accepted"
    );
    let denies = planes
        .with(&c, "node-1", |dp| dp.counters())
        .expect("read counters")
        .cnp_denies;
    assert_eq!(
        denies.iter().map(|d| d.counter.packets).sum::<u64>(),
        1,
        "the Deny rule counts in its own chain (one SYN within the probe's timeout)"
    );
}
