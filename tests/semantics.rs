//! NetworkPolicy semantics, one named case per rule of DESIGN.md "Semantics".
//!
//! Each case loads a fixed small cluster plus the case's policies through the real manifest
//! loader, resolves the node of the pod under test, and asks the pure evaluator whether a
//! connection passes. Every case checks both what is allowed and what is denied.

use std::net::IpAddr;
use std::path::PathBuf;

use kube_nftpolicy::cluster::manifest::parse_sources;
use kube_nftpolicy::engine::evaluate::{Connection, evaluate};
use kube_nftpolicy::engine::index::Index;
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::model::policy::Direction::{self, Egress, Ingress};
use kube_nftpolicy::model::{ObjectKey, Protocol};

/// Address plan: node-1 pods 10.0.1.x / fd00::1:x, node-2 pods 10.0.2.x / fd00::2:x.
const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: default}}
- {apiVersion: v1, kind: Namespace, metadata: {name: prod, labels: {env: prod, tier: gold}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: dev, labels: {env: dev}}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: default, labels: {app: web}}
  spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]}
  status: {phase: Running, podIPs: [{ip: 10.0.1.10}, {ip: "fd00::1:10"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: db, namespace: default, labels: {app: db}}
  spec: {nodeName: node-1, containers: [{name: c, ports: [{name: sql, containerPort: 5432}]}]}
  status: {phase: Running, podIPs: [{ip: 10.0.1.11}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: api, namespace: prod, labels: {app: api, version: v2}}
  spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
  status: {phase: Running, podIPs: [{ip: 10.0.1.12}, {ip: "fd00::1:12"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: default, labels: {app: client}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 10.0.2.10}, {ip: "fd00::2:10"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: prod, labels: {app: client}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 10.0.2.11}, {ip: "fd00::2:11"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: client, namespace: dev, labels: {app: client, legacy: "yes"}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 10.0.2.12}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: hostnet, namespace: default, labels: {app: web}}
  spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c}]}
  status: {phase: Running, podIPs: [{ip: 172.18.0.11}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: done, namespace: default, labels: {app: client}}
  spec: {nodeName: node-2, containers: [{name: c}]}
  status: {phase: Succeeded, podIPs: [{ip: 10.0.2.99}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: pending, namespace: default, labels: {app: web}}
  spec: {nodeName: node-1, containers: [{name: c}]}
  status: {phase: Pending}
"#;

/// One connection check: at `local` (a pod key), in `dir`, with `peer` (pod key or address).
struct Check {
    dir: Direction,
    local: &'static str,
    peer: &'static str,
    proto: Protocol,
    port: u16,
    v6: bool,
    want: bool,
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

fn c(
    dir: Direction,
    local: &'static str,
    peer: &'static str,
    proto: Protocol,
    port: u16,
    want: bool,
) -> Check {
    Check {
        dir,
        local,
        peer,
        proto,
        port,
        v6: false,
        want,
    }
}

fn c6(
    dir: Direction,
    local: &'static str,
    peer: &'static str,
    proto: Protocol,
    port: u16,
    want: bool,
) -> Check {
    Check {
        dir,
        local,
        peer,
        proto,
        port,
        v6: true,
        want,
    }
}

struct Case {
    name: &'static str,
    policies: &'static str,
    checks: Vec<Check>,
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "no policy: everything allowed",
            policies: "",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Egress, "default/web", "prod/api", UDP, 53, true),
            ],
        },
        Case {
            name: "a policy isolates only the pods it selects",
            policies: "deny-web",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, false),
                c(Ingress, "default/db", "default/client", TCP, 5432, true),
                c(Egress, "default/web", "default/db", TCP, 5432, true),
            ],
        },
        Case {
            name: "policies are additive (union of allows)",
            policies: "deny-web allow-client-80",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 81, false),
            ],
        },
        Case {
            name: "policyTypes omitted with ingress rules only: egress not isolated",
            policies: "allow-client-80",
            checks: vec![
                c(Egress, "default/web", "prod/api", TCP, 443, true),
                c(Ingress, "default/web", "prod/api", TCP, 80, false),
            ],
        },
        Case {
            name: "policyTypes omitted with egress rules: egress isolated too",
            policies: "web-egress-dns",
            checks: vec![
                c(Egress, "default/web", "prod/api", UDP, 53, true),
                c(Egress, "default/web", "prod/api", TCP, 443, false),
                c(Ingress, "default/web", "prod/api", TCP, 80, false),
            ],
        },
        Case {
            name: "policyTypes Egress only leaves ingress open",
            policies: "web-deny-egress",
            checks: vec![
                c(Ingress, "default/web", "prod/api", TCP, 80, true),
                c(Egress, "default/web", "prod/api", TCP, 80, false),
            ],
        },
        Case {
            name: "empty from allows every peer",
            policies: "web-from-empty",
            checks: vec![
                c(Ingress, "default/web", "prod/client", TCP, 80, true),
                c(Ingress, "default/web", "203.0.113.9", TCP, 80, true),
            ],
        },
        Case {
            name: "missing from with ports allows every peer on those ports",
            policies: "web-port-80-only",
            checks: vec![
                c(Ingress, "default/web", "203.0.113.9", TCP, 80, true),
                c(Ingress, "default/web", "203.0.113.9", TCP, 81, false),
                c(Ingress, "default/web", "203.0.113.9", UDP, 80, false),
            ],
        },
        Case {
            name: "ingress: [] (no rules) allows nothing",
            policies: "web-empty-ingress-list",
            checks: vec![c(Ingress, "default/web", "default/client", TCP, 80, false)],
        },
        Case {
            name: "a podSelector-only peer means the policy's own namespace",
            policies: "allow-client-80",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Ingress, "default/web", "prod/client", TCP, 80, false),
            ],
        },
        Case {
            name: "namespaceSelector {} means every namespace",
            policies: "web-from-any-ns-client",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Ingress, "default/web", "prod/client", TCP, 80, true),
                c(Ingress, "default/web", "prod/api", TCP, 80, false),
            ],
        },
        Case {
            name: "namespaceSelector AND podSelector in one peer",
            policies: "web-from-prod-client",
            checks: vec![
                c(Ingress, "default/web", "prod/client", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 80, false),
                c(Ingress, "default/web", "prod/api", TCP, 80, false),
            ],
        },
        Case {
            name: "separate peers are ORed",
            policies: "web-from-prod-or-client",
            checks: vec![
                c(Ingress, "default/web", "prod/api", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Ingress, "default/web", "dev/client", TCP, 80, false),
            ],
        },
        Case {
            name: "separate rules are ORed, each with its own ports",
            policies: "web-two-rules",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 443, false),
                c(Ingress, "default/web", "prod/client", TCP, 443, true),
                c(Ingress, "default/web", "prod/client", TCP, 80, false),
            ],
        },
        Case {
            name: "matchExpressions In on namespaces",
            policies: "web-from-ns-in",
            checks: vec![
                c(Ingress, "default/web", "dev/client", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 80, false),
            ],
        },
        Case {
            name: "matchExpressions NotIn on pods (missing label matches)",
            policies: "web-from-notin-client",
            checks: vec![
                c(Ingress, "default/web", "default/db", TCP, 80, true),
                c(Ingress, "default/web", "default/client", TCP, 80, false),
            ],
        },
        Case {
            name: "matchExpressions Exists",
            policies: "web-from-legacy-exists",
            checks: vec![
                c(Ingress, "default/web", "dev/client", TCP, 80, true),
                c(Ingress, "default/web", "prod/client", TCP, 80, false),
            ],
        },
        Case {
            name: "matchExpressions DoesNotExist",
            policies: "web-from-legacy-absent",
            checks: vec![
                c(Ingress, "default/web", "prod/client", TCP, 80, true),
                c(Ingress, "default/web", "dev/client", TCP, 80, false),
            ],
        },
        Case {
            name: "ipBlock minus except (IPv4)",
            policies: "web-from-cidr-except",
            checks: vec![
                c(Ingress, "default/web", "10.0.2.10", TCP, 80, true),
                c(Ingress, "default/web", "10.0.2.11", TCP, 80, false),
                c(Ingress, "default/web", "10.0.3.1", TCP, 80, false),
            ],
        },
        Case {
            name: "ipBlock minus except (IPv6)",
            policies: "web-from-cidr6-except",
            checks: vec![
                c6(Ingress, "default/web", "default/client", TCP, 80, true),
                c6(Ingress, "default/web", "prod/client", TCP, 80, false),
                c(Ingress, "default/web", "default/client", TCP, 80, false),
            ],
        },
        Case {
            name: "UDP and SCTP ports; a TCP allow does not allow UDP",
            policies: "web-udp-sctp",
            checks: vec![
                c(Ingress, "default/web", "default/client", UDP, 53, true),
                c(Ingress, "default/web", "default/client", SCTP, 9000, true),
                c(Ingress, "default/web", "default/client", TCP, 53, false),
                c(Ingress, "default/web", "default/client", UDP, 9000, false),
            ],
        },
        Case {
            name: "a protocol without a port allows all its ports",
            policies: "web-all-udp",
            checks: vec![
                c(Ingress, "default/web", "default/client", UDP, 1, true),
                c(Ingress, "default/web", "default/client", UDP, 65535, true),
                c(Ingress, "default/web", "default/client", TCP, 1, false),
            ],
        },
        Case {
            name: "endPort makes an inclusive range",
            policies: "web-range",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 8000, true),
                c(Ingress, "default/web", "default/client", TCP, 8080, true),
                c(Ingress, "default/web", "default/client", TCP, 7999, false),
                c(Ingress, "default/web", "default/client", TCP, 8081, false),
            ],
        },
        Case {
            name: "ingress named port resolves on the selected pod",
            policies: "named-ingress",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 8080, true),
                c(Ingress, "prod/api", "default/client", TCP, 9090, true),
                c(Ingress, "prod/api", "default/client", TCP, 8080, false),
                c(Ingress, "default/web", "default/client", UDP, 8080, false),
            ],
        },
        Case {
            name: "egress named port resolves on the peer pod (to: [] = any pod)",
            policies: "named-egress",
            checks: vec![
                c(Egress, "default/client", "default/web", TCP, 8080, true),
                c(Egress, "default/client", "prod/api", TCP, 9090, true),
                c(Egress, "default/client", "prod/api", TCP, 8080, false),
                c(Egress, "default/client", "203.0.113.9", TCP, 8080, false),
            ],
        },
        Case {
            name: "a named port never matches an ipBlock destination",
            policies: "named-egress-ipblock",
            checks: vec![
                c(Egress, "default/client", "default/web", TCP, 8080, false),
                c(Egress, "default/client", "default/web", TCP, 443, true),
            ],
        },
        Case {
            name: "hostNetwork pods are never selected",
            policies: "deny-web",
            checks: vec![c(
                Ingress,
                "default/hostnet",
                "default/client",
                TCP,
                80,
                true,
            )],
        },
        Case {
            name: "hostNetwork, finished and IP-less pods are not pod peers",
            policies: "deny-web web-from-app-web-or-client",
            checks: vec![
                c(Ingress, "default/web", "172.18.0.11", TCP, 80, false),
                c(Ingress, "default/web", "10.0.2.99", TCP, 80, false),
                c(Ingress, "default/web", "default/client", TCP, 80, true),
            ],
        },
        Case {
            name: "dual-stack pods are isolated and allowed in both families",
            policies: "deny-web allow-client-80",
            checks: vec![
                c6(Ingress, "default/web", "default/client", TCP, 80, true),
                c6(Ingress, "default/web", "prod/client", TCP, 80, false),
                c(Ingress, "default/web", "default/client", TCP, 80, true),
            ],
        },
        Case {
            name: "an invalid policy isolates its pods but allows nothing",
            policies: "invalid-allow",
            checks: vec![
                c(Ingress, "default/web", "default/client", TCP, 80, false),
                c(Ingress, "default/db", "default/client", TCP, 80, true),
            ],
        },
        Case {
            name: "egress deny-all plus DNS to anywhere",
            policies: "web-deny-egress web-egress-dns",
            checks: vec![
                c(Egress, "default/web", "8.8.8.8", UDP, 53, true),
                c(Egress, "default/web", "8.8.8.8", TCP, 53, false),
            ],
        },
    ]
}

fn policy_yaml(name: &str) -> String {
    match name {
        "deny-web" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]",
        ),
        "allow-client-80" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]",
        ),
        "web-egress-dns" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  egress:\n  - ports: [{port: 53, protocol: UDP}]",
        ),
        "web-deny-egress" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]",
        ),
        "web-from-empty" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: []",
        ),
        "web-port-80-only" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 80, protocol: TCP}]",
        ),
        "web-empty-ingress-list" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress: []",
        ),
        "web-from-any-ns-client" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]",
        ),
        "web-from-prod-client" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: client}}}]",
        ),
        "web-from-prod-or-client" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {env: prod}}}, {podSelector: {matchLabels: {app: client}}}]",
        ),
        "web-two-rules" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]\n  - from: [{namespaceSelector: {matchLabels: {env: prod}}}]\n    ports: [{port: 443}]",
        ),
        "web-from-ns-in" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: env, operator: In, values: [dev, qa]}]}}]",
        ),
        "web-from-notin-client" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [client]}]}}]",
        ),
        "web-from-legacy-exists" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: legacy, operator: Exists}]}}]",
        ),
        "web-from-legacy-absent" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: env, operator: Exists}]}, podSelector: {matchExpressions: [{key: legacy, operator: DoesNotExist}, {key: app, operator: In, values: [client]}]}}]",
        ),
        "web-from-cidr-except" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.11/32]}}]",
        ),
        "web-from-cidr6-except" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00::2:0/112', except: ['fd00::2:11/128']}}]",
        ),
        "web-udp-sctp" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 53, protocol: UDP}, {port: 9000, protocol: SCTP}]",
        ),
        "web-all-udp" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{protocol: UDP}]",
        ),
        "web-range" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 8000, endPort: 8080}]",
        ),
        "named-ingress" => format!(
            "{}{}",
            np(
                "default",
                name,
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: http}]"
            ),
            np(
                "prod",
                name,
                "  podSelector: {}\n  ingress:\n  - ports: [{port: http}]"
            )
        ),
        "named-egress" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}]",
        ),
        "named-egress-ipblock" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}}]\n    ports: [{port: http}, {port: 443}]",
        ),
        "web-from-app-web-or-client" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {app: client}}}]",
        ),
        "invalid-allow" => np(
            "default",
            name,
            "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]",
        ),
        other => panic!("unknown policy {other}"),
    }
}

fn addr_of(idx: &Index, endpoint: &str, v6: bool) -> IpAddr {
    if let Ok(ip) = endpoint.parse() {
        return ip;
    }
    let (ns, name) = endpoint.split_once('/').expect("ns/pod");
    let snap = idx.snapshot();
    let pod = snap
        .pods
        .get(&ObjectKey::new(ns, name))
        .unwrap_or_else(|| panic!("pod {endpoint}"));
    *pod.ips
        .iter()
        .find(|ip| ip.is_ipv6() == v6)
        .unwrap_or_else(|| {
            panic!(
                "{endpoint} has no {} address",
                if v6 { "IPv6" } else { "IPv4" }
            )
        })
}

#[test]
fn semantics() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        let mut text = CLUSTER.to_string();
        for p in case.policies.split_whitespace() {
            text.push_str(&policy_yaml(p));
        }
        let m = parse_sources(&[(PathBuf::from("case.yaml"), text)]).expect(case.name);
        let idx = m.into_index();
        for ch in &case.checks {
            let (ns, name) = ch.local.split_once('/').expect("ns/pod");
            let snap = idx.snapshot();
            let local_pod = snap.pods.get(&ObjectKey::new(ns, name)).expect("local pod");
            let node = local_pod.node.clone().expect("node");
            let np = resolve(&snap, &node);
            let conn = Connection {
                local: addr_of(&idx, ch.local, ch.v6),
                peer: addr_of(&idx, ch.peer, ch.v6),
                protocol: ch.proto,
                port: ch.port,
            };
            let verdict = evaluate(&np, ch.dir, conn);
            checked += 1;
            if verdict.passes() != ch.want {
                failures.push(format!(
                    "{}: {:?} at {} with {} {:?}/{}: want {}, got {:?}",
                    case.name,
                    ch.dir,
                    ch.local,
                    ch.peer,
                    ch.proto,
                    ch.port,
                    if ch.want { "allowed" } else { "denied" },
                    verdict
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
    assert!(checked > 60, "only {checked} checks ran");
}
