//! Fail closed for unknown local addresses, proven with real packets in network namespaces:
//! a pod whose address is in the node's pod ranges but not (yet) in the cluster state is
//! never reachable and never reaches out, whether or not an agent runs (the rule is in the
//! kernel); it gets its real rules in the first sync that knows it; a pod that reuses a
//! departed pod's address follows its own policies; the node's own traffic, hostNetwork
//! pods and IPv6 neighbour discovery are unaffected. Both layouts, IPv4 and IPv6.

#[path = "support/kernel.rs"]
mod kernel;
#[path = "support/manifest_yaml.rs"]
mod manifest_yaml;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::time::Duration;

use kernel::{NodeDataplanes, labels, list_table, pod_yaml, serial};
use kube_nftpolicy::engine::compile::UnknownAddresses;
use kube_nftpolicy::model::policy::Direction;
use manifest_yaml::namespace_yaml;
use netns::{Cluster, ClusterSpec, Endpoint, Family, KUBELET_PORT, Layout, Probe};

const T: Duration = Duration::from_millis(600);

const DENY_ALL_SECURE: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: secure}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n";

/// One node; `secure/fresh` (a namespace with default deny), `open/fresh` and `open/client`
/// (a namespace without policy).
fn cluster(layout: Layout) -> Cluster {
    Cluster::new(
        ClusterSpec::new(layout)
            .node("node-1")
            .pod("node-1", "open", "client", &[80], &[53])
            .pod("node-1", "secure", "fresh", &[80], &[53])
            .pod("node-1", "open", "fresh", &[80], &[53]),
    )
}

/// Namespaces, the named pods (the others' addresses are unknown) and the policies.
fn manifests(c: &Cluster, known: &[(&str, &str)], policies: &str) -> String {
    let mut out = String::new();
    for ns in ["open", "secure"] {
        out.push_str(&namespace_yaml(ns, &BTreeMap::new()));
    }
    for p in c.pods() {
        if known.contains(&(p.namespace.as_str(), p.name.as_str())) {
            out.push_str(&pod_yaml(p, &labels(&[("app", &p.name)])));
        }
    }
    out.push_str(policies);
    out
}

fn pod(ns: &str, name: &str) -> Endpoint {
    Endpoint::pod(ns, name)
}

/// (what, probe, expected) in both families.
type Case = (String, Probe, bool);

fn cases_both_families(c: &Cluster, rows: &[(&str, Endpoint, Endpoint, u16, bool)]) -> Vec<Case> {
    let mut out = Vec::new();
    for f in [Family::V4, Family::V6] {
        for (what, from, to, port, want) in rows {
            let ip = match to {
                Endpoint::Pod { namespace, name } => c.pod_ip(namespace, name, f),
                Endpoint::Node(n) => c.node_ip(n, f),
                other => panic!("unexpected endpoint {other:?}"),
            };
            out.push((
                format!("{what} ({f:?})"),
                Probe::tcp(from.clone(), ip, *port),
                *want,
            ));
        }
    }
    out
}

fn check(c: &Cluster, phase: &str, cases: &[Case]) {
    let probes: Vec<Probe> = cases.iter().map(|(_, p, _)| p.clone()).collect();
    let got = c.probe_all(&probes, T);
    let wrong: Vec<String> = cases
        .iter()
        .zip(&got)
        .filter(|((_, _, want), got)| *want != **got)
        .map(|((what, _, want), got)| format!("{what}: expected {want}, got {got}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{phase} ({:?}):\n  {}\n{}",
        c.layout(),
        wrong.join("\n  "),
        list_table(c, "node-1")
    );
}

fn unknown_drops(planes: &mut NodeDataplanes, c: &Cluster) -> BTreeMap<&'static str, u64> {
    planes
        .with(c, "node-1", |dp| dp.counters())
        .expect("counters")
        .unknown
        .into_iter()
        .map(|(d, counter)| (d.as_str(), counter.packets))
        .collect()
}

#[test]
fn a_new_pod_is_isolated_until_known_then_follows_its_namespace() {
    let _g = serial();
    for layout in [Layout::Routed, Layout::Bridge] {
        let c = cluster(layout);
        let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
        let node = || Endpoint::node("node-1");

        // The agent has programmed the node once and knows only `client`. No agent runs
        // between syncs here: what holds now holds while an agent is stopped.
        planes.sync_text(&c, &manifests(&c, &[("open", "client")], DENY_ALL_SECURE));
        let before = cases_both_families(
            &c,
            &[
                (
                    "client -> unknown secure/fresh",
                    pod("open", "client"),
                    pod("secure", "fresh"),
                    80,
                    false,
                ),
                (
                    "unknown secure/fresh -> client",
                    pod("secure", "fresh"),
                    pod("open", "client"),
                    80,
                    false,
                ),
                (
                    "client -> unknown open/fresh",
                    pod("open", "client"),
                    pod("open", "fresh"),
                    80,
                    false,
                ),
                (
                    "unknown open/fresh -> client",
                    pod("open", "fresh"),
                    pod("open", "client"),
                    80,
                    false,
                ),
                (
                    "unknown open/fresh -> its node",
                    pod("open", "fresh"),
                    node(),
                    KUBELET_PORT,
                    false,
                ),
                (
                    "node -> unknown secure/fresh (kubelet probe)",
                    node(),
                    pod("secure", "fresh"),
                    80,
                    true,
                ),
                (
                    "node -> unknown open/fresh (kubelet probe)",
                    node(),
                    pod("open", "fresh"),
                    80,
                    true,
                ),
                (
                    "known client -> its node",
                    pod("open", "client"),
                    node(),
                    KUBELET_PORT,
                    true,
                ),
            ],
        );
        check(&c, "before the new pods are known", &before);
        let drops = unknown_drops(&mut planes, &c);
        assert!(
            drops.get("ingress").copied().unwrap_or(0) > 0
                && drops.get("egress").copied().unwrap_or(0) > 0,
            "{layout:?}: unknown-address drops are counted in both directions: {drops:?}"
        );

        // The first sync that knows both pods.
        let all = [("open", "client"), ("secure", "fresh"), ("open", "fresh")];
        planes.sync_text(&c, &manifests(&c, &all, DENY_ALL_SECURE));
        let after = cases_both_families(
            &c,
            &[
                (
                    "client -> secure/fresh (default deny)",
                    pod("open", "client"),
                    pod("secure", "fresh"),
                    80,
                    false,
                ),
                (
                    "secure/fresh -> client (default deny)",
                    pod("secure", "fresh"),
                    pod("open", "client"),
                    80,
                    false,
                ),
                (
                    "client -> open/fresh (no policy)",
                    pod("open", "client"),
                    pod("open", "fresh"),
                    80,
                    true,
                ),
                (
                    "open/fresh -> client (no policy)",
                    pod("open", "fresh"),
                    pod("open", "client"),
                    80,
                    true,
                ),
                (
                    "open/fresh -> its node",
                    pod("open", "fresh"),
                    node(),
                    KUBELET_PORT,
                    true,
                ),
                (
                    "node -> secure/fresh (kubelet probe)",
                    node(),
                    pod("secure", "fresh"),
                    80,
                    true,
                ),
            ],
        );
        check(&c, "after the first sync that knows them", &after);

        // The pods go: their addresses are unknown again.
        planes.sync_text(&c, &manifests(&c, &[("open", "client")], DENY_ALL_SECURE));
        check(&c, "after the pods are deleted", &before);
    }
}

#[test]
fn unknown_addresses_allow_lets_them_through() {
    let _g = serial();
    let c = cluster(Layout::Routed);
    let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
    planes.options.unknown_addresses = UnknownAddresses::Allow;
    planes.sync_text(&c, &manifests(&c, &[("open", "client")], DENY_ALL_SECURE));
    let cases = cases_both_families(
        &c,
        &[
            (
                "client -> unknown open/fresh",
                pod("open", "client"),
                pod("open", "fresh"),
                80,
                true,
            ),
            (
                "unknown open/fresh -> client",
                pod("open", "fresh"),
                pod("open", "client"),
                80,
                true,
            ),
        ],
    );
    check(&c, "--unknown-addresses=allow", &cases);
    let table = list_table(&c, "node-1");
    assert!(
        !table.contains("unknown-address"),
        "allow writes no fail-closed rule:\n{table}"
    );
}

#[test]
fn a_reused_address_follows_the_new_pods_policies() {
    let _g = serial();
    for layout in [Layout::Routed, Layout::Bridge] {
        let c = cluster(layout);
        let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
        // The namespace `secure/fresh` lives in is also where the manifests put the old and
        // the new pod: the same address (the same network namespace) under two identities.
        let spec = c.pod_spec("secure", "fresh").clone();
        let as_pod = |ns: &str, name: &str| {
            let mut p = spec.clone();
            p.namespace = ns.to_string();
            p.name = name.to_string();
            pod_yaml(&p, &labels(&[("app", name)]))
        };
        let client = pod_yaml(c.pod_spec("open", "client"), &labels(&[("app", "client")]));
        let base = format!(
            "{}{}{client}{DENY_ALL_SECURE}",
            namespace_yaml("open", &BTreeMap::new()),
            namespace_yaml("secure", &BTreeMap::new())
        );
        let to = |f: Family| Probe::tcp(pod("open", "client"), c.pod_ip("secure", "fresh", f), 80);
        let phases: [(&str, String, bool); 4] = [
            (
                "old pod open/old (no policy)",
                format!("{base}{}", as_pod("open", "old")),
                true,
            ),
            ("old pod deleted: unknown", base.clone(), false),
            (
                "new pod secure/new (default deny)",
                format!("{base}{}", as_pod("secure", "new")),
                false,
            ),
            (
                "and back: open/newer (no policy)",
                format!("{base}{}", as_pod("open", "newer")),
                true,
            ),
        ];
        for (phase, text, want) in phases {
            planes.sync_text(&c, &text);
            let got = c.probe_all(&[to(Family::V4), to(Family::V6)], T);
            assert_eq!(
                got,
                vec![want, want],
                "{layout:?}, {phase}\n{}",
                list_table(&c, "node-1")
            );
        }
    }
}

#[test]
fn node_addresses_hostnetwork_pods_and_neighbour_discovery_are_unaffected() {
    let _g = serial();
    for layout in [Layout::Routed, Layout::Bridge] {
        let c = cluster(layout);
        let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
        // A hostNetwork pod holds the node's addresses; it is never a pod-range address.
        let n4 = c.node_ip("node-1", Family::V4);
        let n6 = c.node_ip("node-1", Family::V6);
        let host_pod = format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: host-agent, namespace: open, labels: {{app: host}}}}\nspec: {{nodeName: node-1, hostNetwork: true, containers: [{{name: c, image: agnhost}}]}}\nstatus: {{phase: Running, podIP: \"{n4}\", podIPs: [{{ip: \"{n4}\"}}, {{ip: \"{n6}\"}}]}}\n"
        );
        let text = format!(
            "{}{host_pod}",
            manifests(&c, &[("open", "client")], DENY_ALL_SECURE)
        );
        planes.sync_text(&c, &text);
        let mut cases = cases_both_families(
            &c,
            &[
                (
                    "client -> hostNetwork pod (node address)",
                    pod("open", "client"),
                    Endpoint::node("node-1"),
                    KUBELET_PORT,
                    true,
                ),
                (
                    "node -> client",
                    Endpoint::node("node-1"),
                    pod("open", "client"),
                    80,
                    true,
                ),
                (
                    "node -> unknown pod",
                    Endpoint::node("node-1"),
                    pod("open", "fresh"),
                    80,
                    true,
                ),
            ],
        );
        if layout == Layout::Bridge {
            // The bridge's own address is in the pod range but belongs to the node.
            for f in [Family::V4, Family::V6] {
                let gw = c.node_spec("node-1").pod_gateway(f);
                cases.push((
                    format!("client -> the node's bridge address {gw}"),
                    Probe::tcp(pod("open", "client"), gw, KUBELET_PORT),
                    true,
                ));
                cases.push((
                    format!("node from its bridge address {gw} -> unknown pod"),
                    Probe::tcp(Endpoint::node("node-1"), c.pod_ip("open", "fresh", f), 80)
                        .with_src(gw),
                    true,
                ));
            }
        }
        check(&c, "node, hostNetwork and bridge addresses", &cases);
        // IPv6 above needed neighbour discovery; the unknown pod's solicitations too.
        let neigh = c.exec_ok(pod("open", "fresh"), &["ip", "-6", "neigh", "show"], None);
        assert!(
            !neigh.trim().is_empty(),
            "{layout:?}: the unknown pod resolved neighbours over IPv6 ND: {neigh:?}"
        );
    }
}

#[test]
fn unknown_drop_counters_survive_syncs() {
    let _g = serial();
    let c = cluster(Layout::Routed);
    let mut planes = NodeDataplanes::new(&c).fail_closed(&c);
    planes.sync_text(&c, &manifests(&c, &[("open", "client")], DENY_ALL_SECURE));
    let to = Probe::tcp(
        pod("open", "client"),
        c.pod_ip("open", "fresh", Family::V4),
        80,
    );
    assert!(!c.probe(&to, T));
    let first = unknown_drops(&mut planes, &c)["ingress"];
    assert!(first > 0, "the dropped SYNs were counted");
    // A partial sync (another pod known) and a full one keep the count.
    planes.sync_text(
        &c,
        &manifests(
            &c,
            &[("open", "client"), ("secure", "fresh")],
            DENY_ALL_SECURE,
        ),
    );
    planes.with(&c, "node-1", |dp| dp.request_full_sync());
    planes.sync_text(
        &c,
        &manifests(&c, &[("open", "client"), ("secure", "fresh")], ""),
    );
    let later = unknown_drops(&mut planes, &c)["ingress"];
    assert!(
        later >= first,
        "count kept across syncs: {first} then {later}"
    );
    assert_eq!(
        Direction::ALL.len(),
        unknown_drops(&mut planes, &c).len(),
        "one counter per direction"
    );
}
