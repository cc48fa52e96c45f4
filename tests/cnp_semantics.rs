//! ClusterNetworkPolicy semantics through the tiers, one named case per rule (docs/semantics.md,
//! "ClusterNetworkPolicy"), through the real manifest loader, resolver and the pure evaluator
//! (`engine::evaluate::decide`). Every case checks what is allowed and what is denied, and
//! which tier decided.

use std::net::IpAddr;
use std::path::PathBuf;

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::evaluate::{Connection, decide};
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::model::policy::Direction::{self, Egress, Ingress};
use kube_nftpolicy::model::{ObjectKey, Protocol};

/// Node-1 pods 10.0.1.x, node-2 pods 10.0.2.x; nodes 172.18.0.11/12.
const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a, labels: {team: a}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {team: b}}}
- apiVersion: v1
  kind: Node
  metadata: {name: node-1, labels: {zone: one}}
  status: {addresses: [{type: InternalIP, address: 172.18.0.11}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node-2, labels: {zone: two}}
  status: {addresses: [{type: InternalIP, address: 172.18.0.12}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: a, labels: {app: web}}
  spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]}
  status: {phase: Running, podIPs: [{ip: 10.0.1.10}, {ip: "fd00::1:10"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: db, namespace: a, labels: {app: db}}
  spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 9000}]}]}
  status: {phase: Running, podIPs: [{ip: 10.0.1.11}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: b, labels: {app: client}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 10.0.2.10}, {ip: "fd00::2:10"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: hostnet, namespace: b, labels: {app: client}}
  spec: {nodeName: node-2, hostNetwork: true, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 172.18.0.12}]}
"#;

struct Check {
    dir: Direction,
    local: &'static str,
    peer: &'static str,
    proto: Protocol,
    port: u16,
    want: bool,
    /// `Admin`, `NetworkPolicy`, `Baseline` or `default`.
    by: &'static str,
}

fn ck(
    dir: Direction,
    local: &'static str,
    peer: &'static str,
    port: u16,
    want: bool,
    by: &'static str,
) -> Check {
    Check {
        dir,
        local,
        peer,
        proto: Protocol::Tcp,
        port,
        want,
        by,
    }
}

fn udp(mut c: Check) -> Check {
    c.proto = Protocol::Udp;
    c
}

struct Case {
    name: &'static str,
    objects: &'static str,
    checks: Vec<Check>,
}

fn cnp(name: &str, tier: &str, priority: u16, subject: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n{rules}"
    )
}

const TEAM_A: &str = "{namespaces: {matchLabels: {team: a}}}";
const ALL_NS: &str = "{namespaces: {}}";

fn objects(case: &str) -> String {
    match case {
        "admin-deny" => cnp(
            "deny-b",
            "Admin",
            10,
            TEAM_A,
            "  ingress:\n  - {name: deny-b, action: Deny, from: [{namespaces: {matchLabels: {team: b}}}]}\n",
        ),
        "admin-accept-over-np" => {
            cnp(
                "accept-b",
                "Admin",
                10,
                TEAM_A,
                "  ingress:\n  - {action: Accept, from: [{namespaces: {matchLabels: {team: b}}}]}\n",
            ) + NP_DENY_A
        }
        "pass-then-np" => {
            cnp(
                "pass-b",
                "Admin",
                10,
                TEAM_A,
                "  ingress:\n  - {action: Pass, from: [{namespaces: {matchLabels: {team: b}}}]}\n  - {action: Accept, from: [{namespaces: {}}]}\n",
            ) + NP_DENY_A
        }
        "baseline-vs-np" => {
            cnp(
                "baseline-deny",
                "Baseline",
                10,
                ALL_NS,
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            ) + NP_WEB_ALLOWS_CLIENT
        }
        "priority" => {
            cnp(
                "first",
                "Admin",
                1,
                TEAM_A,
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}\n",
            ) + &cnp(
                "second",
                "Admin",
                2,
                TEAM_A,
                "  ingress:\n  - {action: Accept, from: [{namespaces: {}}]}\n",
            )
        }
        "tie-by-name" => {
            cnp(
                "zz-accept",
                "Admin",
                5,
                TEAM_A,
                "  ingress:\n  - {action: Accept, from: [{namespaces: {}}]}\n",
            ) + &cnp(
                "aa-deny",
                "Admin",
                5,
                TEAM_A,
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            )
        }
        "egress-accept-vs-ingress" => {
            cnp(
                "out",
                "Admin",
                1,
                "{namespaces: {matchLabels: {team: b}}}",
                "  egress:\n  - {action: Accept, to: [{namespaces: {}}]}\n",
            ) + NP_DENY_A
        }
        "no-rules-no-effect" => cnp(
            "ingress-only",
            "Admin",
            1,
            TEAM_A,
            "  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
        ),
        "named-ports" => {
            cnp(
                "named",
                "Admin",
                1,
                TEAM_A,
                "  ingress:\n  - {action: Accept, from: [{namespaces: {}}], protocols: [{destinationNamedPort: http}]}\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            ) + &cnp(
                "named-egress",
                "Admin",
                2,
                "{namespaces: {matchLabels: {team: b}}}",
                "  egress:\n  - {action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {}}}], protocols: [{destinationNamedPort: dns}]}\n",
            )
        }
        "networks-match-pods" => cnp(
            "nets",
            "Admin",
            1,
            "{namespaces: {matchLabels: {team: b}}}",
            "  egress:\n  - {action: Deny, to: [{networks: [10.0.1.0/24]}]}\n",
        ),
        "nodes" => cnp(
            "nodes",
            "Admin",
            1,
            TEAM_A,
            "  egress:\n  - {action: Accept, to: [{nodes: {matchLabels: {zone: one}}}]}\n  - {action: Deny, to: [{nodes: {}}]}\n",
        ),
        "domain-names" => cnp(
            "fqdn",
            "Admin",
            1,
            TEAM_A,
            "  egress:\n  - {action: Accept, to: [{domainNames: [example.com]}]}\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n",
        ),
        "hostnetwork" => {
            cnp(
                "all-b",
                "Admin",
                1,
                "{namespaces: {matchLabels: {team: b}}}",
                "  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            ) + &cnp(
                "from-b-pods",
                "Admin",
                2,
                TEAM_A,
                "  ingress:\n  - {action: Deny, from: [{namespaces: {matchLabels: {team: b}}}]}\n",
            )
        }
        "self" => cnp(
            "deny-all",
            "Admin",
            1,
            TEAM_A,
            "  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n",
        ),
        "baseline-pass" => cnp(
            "b-pass",
            "Baseline",
            1,
            TEAM_A,
            "  ingress:\n  - {action: Pass, from: [{namespaces: {}}]}\n  - {action: Deny, from: [{namespaces: {}}]}\n",
        ),
        other => panic!("no case {other}"),
    }
}

const NP_DENY_A: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: a}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
const NP_WEB_ALLOWS_CLIENT: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allows-client, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]}]\n";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "admin-deny",
            objects: "admin-deny",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 80, false, "Admin"),
                ck(Ingress, "a/web", "a/db", 80, true, "default"),
                ck(Egress, "b/client", "a/web", 80, true, "default"),
            ],
        },
        Case {
            name: "an Admin Accept is final: NetworkPolicy isolation does not apply",
            objects: "admin-accept-over-np",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 80, true, "Admin"),
                ck(Ingress, "a/web", "a/db", 80, false, "NetworkPolicy"),
            ],
        },
        Case {
            name: "Pass skips the rest of the Admin tier; NetworkPolicy isolation is final",
            objects: "pass-then-np",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 80, false, "NetworkPolicy"),
                ck(Ingress, "a/web", "a/db", 80, true, "Admin"),
            ],
        },
        Case {
            name: "a Baseline deny is overridden by a NetworkPolicy allow, and applies to pods no NetworkPolicy isolates",
            objects: "baseline-vs-np",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 80, true, "NetworkPolicy"),
                ck(Ingress, "a/web", "a/db", 80, false, "NetworkPolicy"),
                ck(Ingress, "a/db", "b/client", 80, false, "Baseline"),
                ck(Ingress, "b/client", "a/web", 80, false, "Baseline"),
            ],
        },
        Case {
            name: "lower priority value first",
            objects: "priority",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 80, false, "Admin"),
                ck(Ingress, "a/web", "b/client", 81, true, "Admin"),
            ],
        },
        Case {
            name: "equal priorities: by name",
            objects: "tie-by-name",
            checks: vec![ck(Ingress, "a/web", "b/client", 80, false, "Admin")],
        },
        Case {
            name: "an egress Accept at the source leaves ingress at the destination to its own tiers",
            objects: "egress-accept-vs-ingress",
            checks: vec![
                ck(Egress, "b/client", "a/web", 80, true, "Admin"),
                ck(Ingress, "a/web", "b/client", 80, false, "NetworkPolicy"),
            ],
        },
        Case {
            name: "no rules for a direction: no effect on it",
            objects: "no-rules-no-effect",
            checks: vec![
                ck(Egress, "a/web", "b/client", 80, true, "default"),
                ck(Ingress, "a/web", "b/client", 80, false, "Admin"),
            ],
        },
        Case {
            name: "named ports resolve on the destination pod, with its protocol",
            objects: "named-ports",
            checks: vec![
                ck(Ingress, "a/web", "b/client", 8080, true, "Admin"),
                ck(Ingress, "a/web", "b/client", 9000, false, "Admin"),
                ck(Ingress, "a/db", "b/client", 9000, true, "Admin"),
                ck(Ingress, "a/db", "b/client", 8080, false, "Admin"),
                udp(ck(Ingress, "a/web", "b/client", 8080, false, "Admin")),
                udp(ck(Egress, "b/client", "a/web", 53, false, "Admin")),
                ck(Egress, "b/client", "a/web", 53, true, "default"),
                udp(ck(Egress, "b/client", "a/db", 53, true, "default")),
            ],
        },
        Case {
            name: "networks match pod addresses",
            objects: "networks-match-pods",
            checks: vec![
                ck(Egress, "b/client", "a/web", 80, false, "Admin"),
                ck(Egress, "b/client", "ip:10.0.2.99", 80, true, "default"),
            ],
        },
        Case {
            name: "nodes peers match the selected nodes' addresses",
            objects: "nodes",
            checks: vec![
                ck(Egress, "a/web", "ip:172.18.0.11", 10250, true, "Admin"),
                ck(Egress, "a/web", "ip:172.18.0.12", 10250, false, "Admin"),
                ck(Egress, "a/web", "b/client", 80, true, "default"),
            ],
        },
        Case {
            name: "domainNames match nothing (the Deny after them applies)",
            objects: "domain-names",
            checks: vec![ck(Egress, "a/web", "ip:93.184.216.34", 443, false, "Admin")],
        },
        Case {
            name: "hostNetwork pods are neither subjects nor pod peers",
            objects: "hostnetwork",
            checks: vec![
                ck(Ingress, "a/web", "b/hostnet", 80, true, "default"),
                ck(Ingress, "a/web", "b/client", 80, false, "Admin"),
            ],
        },
        Case {
            name: "a pod reaching its own address is always allowed",
            objects: "self",
            checks: vec![
                ck(Ingress, "a/web", "a/web", 80, true, "default"),
                ck(Egress, "a/web", "a/web", 80, true, "default"),
                ck(Egress, "a/web", "a/db", 80, false, "Admin"),
            ],
        },
        Case {
            name: "Pass in the Baseline tier skips its rest: allowed",
            objects: "baseline-pass",
            checks: vec![ck(Ingress, "a/web", "b/client", 80, true, "default")],
        },
    ]
}

fn addr(snap: &kube_nftpolicy::engine::index::Snapshot, e: &str) -> IpAddr {
    if let Some(ip) = e.strip_prefix("ip:") {
        return ip.parse().expect("ip");
    }
    let (ns, name) = e.split_once('/').expect("ns/pod");
    snap.pods
        .get(&ObjectKey::new(ns, name))
        .unwrap_or_else(|| panic!("pod {e}"))
        .ips[0]
}

#[test]
fn cnp_semantics() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        let text = format!("{CLUSTER}{}", objects(case.objects));
        let m = parse_sources(&[(PathBuf::from("case.yaml"), text)]).expect(case.name);
        assert!(m.warnings.is_empty(), "{}: {:?}", case.name, m.warnings);
        let snap = m.into_index().snapshot();
        for ch in &case.checks {
            let (ns, name) = ch.local.split_once('/').expect("ns/pod");
            let node = snap
                .pods
                .get(&ObjectKey::new(ns, name))
                .and_then(|p| p.node.clone())
                .expect("node");
            let np = resolve(&snap, &node);
            let d = decide(
                &np,
                ch.dir,
                Connection {
                    local: addr(&snap, ch.local),
                    peer: addr(&snap, ch.peer),
                    protocol: ch.proto,
                    port: ch.port,
                },
            );
            checked += 1;
            if d.allowed != ch.want || d.decided_by() != ch.by {
                failures.push(format!(
                    "{}: {:?} at {} with {} {}/{}: want {} by {}, got {} by {} ({d:?})",
                    case.name,
                    ch.dir,
                    ch.local,
                    ch.peer,
                    ch.proto,
                    ch.port,
                    if ch.want { "allowed" } else { "denied" },
                    ch.by,
                    if d.allowed { "allowed" } else { "denied" },
                    d.decided_by()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 30, "only {checked} checks");
}

// ───────────── staged ClusterNetworkPolicies: judged as the kernel measures them ─────────────

/// A staged ClusterNetworkPolicy on team a.
fn staged(name: &str, tier: &str, priority: u16, rules: &str) -> String {
    cnp(name, tier, priority, TEAM_A, rules).replacen(
        &format!("metadata: {{name: {name}}}"),
        &format!("metadata: {{name: {name}, annotations: {{kube-nftpolicy.io/staged: \"true\"}}}}"),
        1,
    )
}

const FROM_B: &str = "from: [{namespaces: {matchLabels: {team: b}}}]";

fn ingress(action: &str) -> String {
    format!("  ingress:\n  - {{name: r, action: {action}, {FROM_B}}}\n")
}

#[test]
fn staged_cnp_judgement() {
    // (name, objects, direction, local, peer, want: (staged policy, change, undetermined)).
    type Want = Option<(&'static str, &'static str, bool)>;
    let egress_deny =
        "  egress:\n  - {name: r, action: Deny, to: [{namespaces: {matchLabels: {team: b}}}]}\n";
    let cases: Vec<(&str, String, Direction, &str, &str, Want)> = vec![
        (
            "Admin Deny over an open pod: would-deny",
            staged("s", "Admin", 10, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "would-deny", false)),
        ),
        (
            "Admin Deny, peer does not match: nothing",
            staged("s", "Admin", 10, &ingress("Deny")),
            Ingress,
            "a/web",
            "a/db",
            None,
        ),
        (
            "Admin Accept over a NetworkPolicy deny: would-allow",
            staged("s", "Admin", 10, &ingress("Accept")) + NP_DENY_A,
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "would-allow", false)),
        ),
        (
            "Admin Accept over a Baseline Deny: would-allow",
            staged("s", "Admin", 10, &ingress("Accept"))
                + &cnp("base", "Baseline", 10, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "would-allow", false)),
        ),
        (
            "Admin Deny over a NetworkPolicy deny: no change",
            staged("s", "Admin", 10, &ingress("Deny")) + NP_DENY_A,
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "none", false)),
        ),
        (
            "a higher-priority enforced Admin Deny decides first: nothing",
            staged("s", "Admin", 10, &ingress("Accept"))
                + &cnp("first", "Admin", 5, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            None,
        ),
        (
            "same priority, staged name first: the staged policy decides",
            staged("a-accept", "Admin", 10, &ingress("Accept"))
                + &cnp("b-deny", "Admin", 10, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("a-accept", "would-allow", false)),
        ),
        (
            "same priority, enforced name first: nothing",
            staged("z-accept", "Admin", 10, &ingress("Accept"))
                + &cnp("b-deny", "Admin", 10, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            None,
        ),
        (
            "Baseline on a pod a NetworkPolicy isolates: never reached",
            staged("s", "Baseline", 10, &ingress("Deny")) + NP_WEB_ALLOWS_CLIENT,
            Ingress,
            "a/web",
            "b/client",
            None,
        ),
        (
            "Baseline Deny on an open pod: would-deny",
            staged("s", "Baseline", 10, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "would-deny", false)),
        ),
        (
            "Baseline Pass over a Baseline Deny: allowed at the end, would-allow",
            staged("s", "Baseline", 5, &ingress("Pass"))
                + &cnp("base", "Baseline", 10, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "would-allow", false)),
        ),
        (
            "only the first staged policy in priority order is judged",
            staged("s1", "Admin", 10, &ingress("Accept"))
                + &staged("s2", "Admin", 20, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s1", "none", false)),
        ),
        (
            "Admin Pass over a NetworkPolicy deny: the same verdict",
            staged("s", "Admin", 10, &ingress("Pass")) + NP_DENY_A,
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "none", false)),
        ),
        (
            "Admin Pass over a lower-priority Admin Deny: undetermined, not counted",
            staged("s", "Admin", 5, &ingress("Pass"))
                + &cnp("later", "Admin", 10, TEAM_A, &ingress("Deny")),
            Ingress,
            "a/web",
            "b/client",
            Some(("s", "none", true)),
        ),
        (
            "egress: Admin Deny over an open pod: would-deny",
            staged("s", "Admin", 10, egress_deny),
            Egress,
            "a/web",
            "b/client",
            Some(("s", "would-deny", false)),
        ),
        (
            "egress rules do not judge ingress",
            staged("s", "Admin", 10, egress_deny),
            Ingress,
            "a/web",
            "b/client",
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (name, objects, dir, local, peer, want) in &cases {
        let text = format!("{CLUSTER}{objects}");
        let m = parse_sources(&[(PathBuf::from("case.yaml"), text)]).expect(name);
        assert!(m.warnings.is_empty(), "{name}: {:?}", m.warnings);
        let snap = m.into_index().snapshot();
        let np = resolve(&snap, "node-1");
        let c = Connection {
            local: addr(&snap, local),
            peer: addr(&snap, peer),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let got = kube_nftpolicy::engine::evaluate::judge_staged_cnps(&np, *dir, c);
        let got_short = got
            .as_ref()
            .map(|v| (v.policy.as_str(), v.change(), v.undetermined));
        if got_short != *want {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
        // A staged policy never changes today's verdict.
        assert_eq!(
            decide(&np, *dir, c).allowed,
            got.as_ref()
                .map_or(decide(&np, *dir, c).allowed, |v| v.today),
            "{name}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
