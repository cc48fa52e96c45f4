//! `lint`: every rule has a named case that fires and one that does not (table-driven, on a
//! small cluster); every seed example is linted and must produce exactly the findings written
//! in its `expect/lint.yaml`, which name the seeds' known mistakes; the binary's exit status
//! gates CI (3 on errors) and its JSON is the same report.

#[path = "support/examples.rs"]
mod examples;

use std::path::PathBuf;
use std::process::Command;

use kube_nftpolicy::cluster::manifest::{load, parse_sources};
use kube_nftpolicy::tools::lint::{Finding, Severity, lint};
use serde::Deserialize;

/// Namespaces shop (team=a) and kube-system; pods shop/web (named ports http/TCP 8080,
/// metrics/TCP 9090), shop/client, kube-system/coredns (k8s-app=kube-dns, dns/UDP 53,
/// dns-tcp/TCP 53).
const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: metrics, containerPort: 9090}]}]
status: {podIPs: [{ip: 10.244.1.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.244.1.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: dns, containerPort: 53, protocol: UDP}, {name: dns-tcp, containerPort: 53}]}]
status: {podIPs: [{ip: 10.244.1.53}]}
";

/// A policy document: `name` in `shop` with the given spec (YAML, indented two spaces).
fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}"
    )
}

fn cnp(name: &str, tier: &str, priority: u16, rest: &str) -> String {
    format!(
        "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{rest}"
    )
}

fn findings(text: &str) -> Vec<Finding> {
    let m = parse_sources(&[(PathBuf::from("case.yaml"), text.to_string())]).expect("parse");
    lint(&m).findings
}

struct Case {
    name: &'static str,
    rule: &'static str,
    /// Manifests (the cluster is NOT included automatically: pod-based rules need pods).
    text: String,
    /// `Some((field, severity, text in the message))` when the rule must fire.
    fires: Option<(&'static str, Severity, &'static str)>,
}

fn with_cluster(extra: &str) -> String {
    format!("{CLUSTER}{extra}")
}

fn cases() -> Vec<Case> {
    let deny_egress = policy(
        "deny-egress",
        "  podSelector: {}\n  policyTypes: [Egress]\n",
    );
    vec![
        // ClusterNetworkPolicy rules
        Case {
            name: "a CNP priority out of range",
            rule: "invalid-cnp",
            text: with_cluster(&cnp("p", "Admin", 1001, "  subject: {namespaces: {}}\n")),
            fires: Some(("spec.priority", Severity::Error, "1001 is outside 0-1000")),
        },
        Case {
            name: "a CNP port range with start = end",
            rule: "invalid-cnp",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 80, end: 80}}}}]}\n",
            )),
            fires: Some((
                "spec.ingress[0].protocols[0].tcp.destinationPort.range",
                Severity::Error,
                "must be less than end",
            )),
        },
        Case {
            name: "a valid CNP",
            rule: "invalid-cnp",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            )),
            fires: None,
        },
        Case {
            name: "a CNP peer of a newer CRD",
            rule: "cnp-unknown-field",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  egress:\n  - {action: Deny, to: [{serviceAccounts: {}}]}\n",
            )),
            fires: Some((
                "spec.egress[0].to[0]",
                Severity::Error,
                "a Deny or Pass rule denies everything",
            )),
        },
        Case {
            name: "a CNP subject that matches no pod",
            rule: "cnp-selects-no-pod",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {matchLabels: {team: z}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            )),
            fires: Some(("spec.subject", Severity::Warning, "matches no pod")),
        },
        Case {
            name: "a CNP subject that matches a pod",
            rule: "cnp-selects-no-pod",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {matchLabels: {team: a}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
            )),
            fires: None,
        },
        Case {
            name: "a rule after an ingress catch-all",
            rule: "cnp-unreachable-rule",
            text: with_cluster(&cnp(
                "p",
                "Baseline",
                1,
                "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n  - {action: Accept, from: [{namespaces: {matchLabels: {team: a}}}]}\n",
            )),
            fires: Some((
                "spec.ingress[1]",
                Severity::Warning,
                "matches every ingress connection",
            )),
        },
        Case {
            name: "a rule after an egress catch-all of both families",
            rule: "cnp-unreachable-rule",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  egress:\n  - {action: Pass, to: [{networks: [0.0.0.0/0, \"::/0\"]}]}\n  - {action: Deny, to: [{namespaces: {}}]}\n",
            )),
            fires: Some(("spec.egress[1]", Severity::Warning, "never matches")),
        },
        Case {
            name: "a catch-all with ports, or of one family, leaves later rules reachable",
            rule: "cnp-unreachable-rule",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}\n  - {action: Accept, from: [{namespaces: {}}]}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n  - {action: Deny, to: [{namespaces: {}}]}\n",
            )),
            fires: None,
        },
        Case {
            name: "two Admin CNPs of equal priority for the same pods",
            rule: "cnp-same-priority",
            text: with_cluster(
                &(cnp(
                    "a",
                    "Admin",
                    5,
                    "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
                ) + &cnp(
                    "b",
                    "Admin",
                    5,
                    "  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  ingress:\n  - {action: Accept, from: [{namespaces: {}}]}\n",
                )),
            ),
            fires: Some((
                "spec.priority",
                Severity::Warning,
                "evaluates a first (by name)",
            )),
        },
        Case {
            name: "equal priorities in different tiers, or for different directions",
            rule: "cnp-same-priority",
            text: with_cluster(
                &(cnp(
                    "a",
                    "Admin",
                    5,
                    "  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
                ) + &cnp(
                    "b",
                    "Baseline",
                    5,
                    "  subject: {namespaces: {}}\n  ingress:\n  - {action: Accept, from: [{namespaces: {}}]}\n",
                ) + &cnp(
                    "c",
                    "Admin",
                    5,
                    "  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{namespaces: {}}]}\n",
                )),
            ),
            fires: None,
        },
        Case {
            name: "a domainNames peer",
            rule: "cnp-domain-names",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{domainNames: [example.com]}]}\n",
            )),
            fires: Some((
                "spec.egress[0].to[0].domainNames",
                Severity::Warning,
                "matches nothing",
            )),
        },
        Case {
            name: "no domainNames peer",
            rule: "cnp-domain-names",
            text: with_cluster(&cnp(
                "p",
                "Admin",
                1,
                "  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{networks: [10.0.0.0/8]}]}\n",
            )),
            fires: None,
        },
        // dropped-field
        Case {
            name: "ports nested under a peer is dropped",
            rule: "dropped-field",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n      ports: [{port: 8080}]\n",
            )),
            fires: Some((
                "spec.ingress[0].from[0].ports",
                Severity::Error,
                "this rule allows every port and protocol",
            )),
        },
        Case {
            name: "a misspelt field is dropped",
            rule: "dropped-field",
            text: with_cluster(&policy("p", "  podSelector: {}\n  polcyTypes: [Ingress]\n")),
            fires: Some((
                "spec.polcyTypes",
                Severity::Error,
                "the API server drops it silently",
            )),
        },
        Case {
            name: "ports at the rule level is kept",
            rule: "dropped-field",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports: [{port: 8080}]\n",
            )),
            fires: None,
        },
        // unreadable
        Case {
            name: "a port of the wrong type",
            rule: "unreadable",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: [80]}]}]\n",
            )),
            fires: Some((
                "spec.ingress[0].ports[0].port",
                Severity::Error,
                "the API server rejects the object",
            )),
        },
        Case {
            name: "a port of the right type",
            rule: "unreadable",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: 80}]}]\n",
            )),
            fires: None,
        },
        // except-outside-cidr
        Case {
            name: "except outside its cidr",
            rule: "except-outside-cidr",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.169.1.0/24]}}]\n",
            )),
            fires: Some((
                "spec.egress[0].to[0].ipBlock.except[0]",
                Severity::Error,
                "192.169.1.0/24 is not inside cidr 192.168.0.0/16",
            )),
        },
        Case {
            name: "except inside its cidr",
            rule: "except-outside-cidr",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]\n",
            )),
            fires: None,
        },
        // invalid-policy
        Case {
            name: "endPort below port",
            rule: "invalid-policy",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]\n",
            )),
            fires: Some((
                "spec.ingress[0].ports[0]",
                Severity::Error,
                "endPort 80 must not be less than port 90",
            )),
        },
        Case {
            name: "a policy type that does not exist",
            rule: "invalid-policy",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  policyTypes: [Inbound]\n",
            )),
            fires: Some((
                "spec.policyTypes[0]",
                Severity::Error,
                "kube-nftpolicy ignores it",
            )),
        },
        Case {
            name: "a port range",
            rule: "invalid-policy",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  ingress: [{ports: [{port: 80, endPort: 90}]}]\n",
            )),
            fires: None,
        },
        // ignored-rules
        Case {
            name: "ingress rules in an egress-only policy",
            rule: "ignored-rules",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  ingress: [{from: [{podSelector: {}}]}]\n  egress: [{}]\n",
            )),
            fires: Some((
                "spec.ingress",
                Severity::Warning,
                "spec.policyTypes does not list Ingress",
            )),
        },
        Case {
            name: "both directions listed",
            rule: "ignored-rules",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{podSelector: {}}]}]\n  egress: [{}]\n",
            )),
            fires: None,
        },
        // no-namespace
        Case {
            name: "no metadata.namespace",
            rule: "no-namespace",
            text: with_cluster(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: {}}\n",
            ),
            fires: Some((
                "metadata.namespace",
                Severity::Warning,
                "these checks assumed `default`",
            )),
        },
        Case {
            name: "metadata.namespace set",
            rule: "no-namespace",
            text: with_cluster(&policy("p", "  podSelector: {}\n")),
            fires: None,
        },
        // duplicate-name
        Case {
            name: "the same policy twice",
            rule: "duplicate-name",
            text: with_cluster(&format!(
                "{}{}",
                policy("p", "  podSelector: {}\n"),
                policy("p", "  podSelector: {matchLabels: {app: web}}\n")
            )),
            fires: Some(("", Severity::Warning, "the later one wins")),
        },
        Case {
            name: "two names",
            rule: "duplicate-name",
            text: with_cluster(&format!(
                "{}{}",
                policy("p", "  podSelector: {}\n"),
                policy("q", "  podSelector: {matchLabels: {app: web}}\n")
            )),
            fires: None,
        },
        // duplicate-policy
        Case {
            name: "two names, one spec (written differently)",
            rule: "duplicate-policy",
            text: with_cluster(&format!(
                "{}{}",
                policy(
                    "a",
                    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [], ports: [{port: 8080, protocol: TCP}]}]\n"
                ),
                policy(
                    "b",
                    "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress: [{ports: [{port: 8080}]}]\n"
                )
            )),
            fires: Some((
                "spec",
                Severity::Warning,
                "same spec as NetworkPolicy shop/a",
            )),
        },
        Case {
            name: "two names, different ports",
            rule: "duplicate-policy",
            text: with_cluster(&format!(
                "{}{}",
                policy(
                    "a",
                    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: 8080}]}]\n"
                ),
                policy(
                    "b",
                    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: 9090}]}]\n"
                )
            )),
            fires: None,
        },
        // selects-no-pod
        Case {
            name: "a selector with a typo",
            rule: "selects-no-pod",
            text: with_cluster(&policy("p", "  podSelector: {matchLabels: {app: wbe}}\n")),
            fires: Some((
                "spec.podSelector",
                Severity::Warning,
                "app=wbe matches no pod of namespace shop",
            )),
        },
        Case {
            name: "a selector that matches",
            rule: "selects-no-pod",
            text: with_cluster(&policy("p", "  podSelector: {matchLabels: {app: web}}\n")),
            fires: None,
        },
        Case {
            name: "policies without pods are not judged",
            rule: "selects-no-pod",
            text: policy("p", "  podSelector: {matchLabels: {app: wbe}}\n"),
            fires: None,
        },
        // peer-matches-nothing
        Case {
            name: "a namespace label nobody has",
            rule: "peer-matches-nothing",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kube-system: \"true\"}}}]\n",
            )),
            fires: Some((
                "spec.ingress[0].from[0].namespaceSelector",
                Severity::Warning,
                "kube-system=true matches no namespace",
            )),
        },
        Case {
            name: "a pod label nobody has in the own namespace",
            rule: "peer-matches-nothing",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: api}}}]\n",
            )),
            fires: Some((
                "spec.ingress[0].from[0].podSelector",
                Severity::Warning,
                "app=api matches no pod in namespace shop",
            )),
        },
        Case {
            name: "a pod of another namespace without a namespaceSelector",
            rule: "peer-matches-nothing",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n",
            )),
            fires: Some((
                "spec.ingress[0].from[0].podSelector",
                Severity::Warning,
                "a peer means the policy's own namespace",
            )),
        },
        Case {
            name: "a namespace without pods",
            rule: "peer-matches-nothing",
            text: with_cluster(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: empty, labels: {{team: b}}}}\n{}",
                policy(
                    "p",
                    "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: b}}}]\n"
                )
            )),
            fires: Some((
                "spec.ingress[0].from[0].namespaceSelector",
                Severity::Warning,
                "the namespaces it matches (empty) have no pods",
            )),
        },
        Case {
            name: "namespace and pod selectors that match",
            rule: "peer-matches-nothing",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}\n      podSelector: {matchLabels: {k8s-app: kube-dns}}\n    - podSelector: {matchLabels: {app: client}}\n    - ipBlock: {cidr: 203.0.113.0/24}\n",
            )),
            fires: None,
        },
        // unknown-named-port
        Case {
            name: "ingress on a port name the selected pods lack",
            rule: "unknown-named-port",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: 8080}, {port: grpc}]}]\n",
            )),
            fires: Some((
                "spec.ingress[0].ports[1].port",
                Severity::Warning,
                "named port grpc (TCP): none of the pods the policy selects (shop/web)",
            )),
        },
        Case {
            name: "a port name declared for another protocol",
            rule: "unknown-named-port",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: http, protocol: UDP}]}]\n",
            )),
            fires: Some((
                "spec.ingress[0].ports[0].port",
                Severity::Warning,
                "named port http (UDP)",
            )),
        },
        Case {
            name: "egress on a port name towards ipBlocks only",
            rule: "unknown-named-port",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: http}]}]\n",
            )),
            fires: Some((
                "spec.egress[0].ports[0].port",
                Severity::Warning,
                "a named port never matches an ipBlock destination",
            )),
        },
        Case {
            name: "ingress and egress on declared port names",
            rule: "unknown-named-port",
            text: with_cluster(&format!(
                "{}{}",
                policy(
                    "in",
                    "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: http}, {port: metrics}]}]\n"
                ),
                policy(
                    "out",
                    "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}, {to: [{namespaceSelector: {}, podSelector: {matchLabels: {k8s-app: kube-dns}}}], ports: [{port: dns, protocol: UDP}, {port: dns-tcp}]}]\n"
                )
            )),
            fires: None,
        },
        // ipblock-covers-pods
        Case {
            name: "the pod network as an ipBlock",
            rule: "ipblock-covers-pods",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16}}]}]\n",
            )),
            fires: Some((
                "spec.ingress[0].from[0].ipBlock.cidr",
                Severity::Warning,
                "ipBlock 10.244.0.0/16 covers the addresses of 3 pods (kube-system/coredns, shop/client, shop/web)",
            )),
        },
        Case {
            name: "the pod network cut out by an except",
            rule: "ipblock-covers-pods",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16]}}]}]\n",
            )),
            fires: None,
        },
        // no-dns-egress
        Case {
            name: "default deny egress",
            rule: "no-dns-egress",
            text: with_cluster(&deny_egress),
            fires: Some((
                "spec.policyTypes",
                Severity::Warning,
                "pods shop/client, shop/web are isolated for egress and no egress rule (shop/deny-egress) allows DNS, UDP or TCP port 53 to the cluster DNS pods (kube-system/coredns)",
            )),
        },
        Case {
            name: "DNS allowed to a namespace label Kubernetes does not set",
            rule: "no-dns-egress",
            text: with_cluster(&format!(
                "{deny_egress}{}",
                policy(
                    "dns",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kube-system: \"true\"}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n"
                )
            )),
            fires: Some((
                "spec.egress",
                Severity::Warning,
                "no egress rule (shop/deny-egress, shop/dns) allows DNS",
            )),
        },
        Case {
            name: "DNS over UDP only",
            rule: "no-dns-egress",
            text: with_cluster(&format!(
                "{deny_egress}{}",
                policy(
                    "dns",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]\n"
                )
            )),
            fires: Some((
                "spec.egress",
                Severity::Warning,
                "allow DNS over UDP port 53 but not TCP port 53",
            )),
        },
        Case {
            name: "DNS over UDP and TCP to the DNS pods",
            rule: "no-dns-egress",
            text: with_cluster(&format!(
                "{deny_egress}{}",
                policy(
                    "dns",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n"
                )
            )),
            fires: None,
        },
        Case {
            name: "without pods, policies with the same selector are taken together",
            rule: "no-dns-egress",
            text: format!(
                "{deny_egress}{}",
                policy(
                    "dns",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}, {port: 53}]}]\n"
                )
            ),
            fires: None,
        },
        Case {
            name: "ingress-only isolation needs no DNS",
            rule: "no-dns-egress",
            text: with_cluster(&policy(
                "p",
                "  podSelector: {}\n  policyTypes: [Ingress]\n",
            )),
            fires: None,
        },
        // no-kind, object-warning
        Case {
            name: "a document without kind",
            rule: "no-kind",
            text: with_cluster("---\napiVersion: v1\nmetadata: {name: x}\n"),
            fires: Some(("", Severity::Warning, "no `kind`")),
        },
        Case {
            name: "every document has a kind",
            rule: "no-kind",
            text: with_cluster(""),
            fires: None,
        },
        Case {
            name: "a pod with a bad address",
            rule: "object-warning",
            text: with_cluster(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {name: odd, namespace: shop}\nstatus: {podIPs: [{ip: 10.0.0.300}]}\n",
            ),
            fires: Some(("", Severity::Warning, "is not an IP address")),
        },
        Case {
            name: "well-formed pods",
            rule: "object-warning",
            text: with_cluster(""),
            fires: None,
        },
    ]
}

#[test]
fn each_rule_fires_and_does_not() {
    let mut failures = Vec::new();
    let mut rules_firing = std::collections::BTreeSet::new();
    let mut rules_silent = std::collections::BTreeSet::new();
    for c in cases() {
        let all = findings(&c.text);
        let of_rule: Vec<&Finding> = all.iter().filter(|f| f.rule == c.rule).collect();
        let shown = || {
            all.iter()
                .map(|f| {
                    format!(
                        "  {}[{}] {} {}: {}",
                        f.severity, f.rule, f.object, f.field, f.message
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        match c.fires {
            Some((field, severity, text)) => {
                rules_firing.insert(c.rule);
                let hit = of_rule.iter().any(|f| {
                    f.field == field && f.severity == severity && f.message.contains(text)
                });
                if !hit {
                    failures.push(format!(
                        "{} ({}): want {severity} on {field:?} containing {text:?}; got:\n{}",
                        c.name,
                        c.rule,
                        shown()
                    ));
                }
                // Findings name where the object was read.
                if of_rule.iter().any(|f| f.location.is_none()) {
                    failures.push(format!("{}: a finding without location", c.name));
                }
            }
            None => {
                rules_silent.insert(c.rule);
                if !of_rule.is_empty() {
                    failures.push(format!(
                        "{} ({}): want no finding of this rule; got:\n{}",
                        c.name,
                        c.rule,
                        shown()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let every_rule = [
        "dropped-field",
        "unreadable",
        "except-outside-cidr",
        "invalid-policy",
        "ignored-rules",
        "no-namespace",
        "duplicate-name",
        "duplicate-policy",
        "selects-no-pod",
        "peer-matches-nothing",
        "unknown-named-port",
        "ipblock-covers-pods",
        "no-dns-egress",
        "no-kind",
        "object-warning",
        "cnp-selects-no-pod",
        "cnp-unreachable-rule",
        "cnp-same-priority",
        "cnp-domain-names",
        "invalid-cnp",
    ];
    for rule in every_rule {
        assert!(rules_firing.contains(rule), "{rule} has no case that fires");
        assert!(
            rules_silent.contains(rule),
            "{rule} has no case that does not fire"
        );
    }
}

#[test]
fn a_clean_cluster_has_no_findings() {
    let text = with_cluster(&format!(
        "{}{}",
        policy(
            "web",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]\n"
        ),
        policy(
            "client-out",
            "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 8080}]\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]\n    ports: [{port: 53, protocol: UDP}, {port: 53}]\n"
        )
    ));
    let all = findings(&text);
    assert!(all.is_empty(), "{all:#?}");
}

// ───────────────────────────── the seed examples ─────────────────────────────

#[derive(Deserialize)]
struct Expected {
    findings: Vec<ExpectedFinding>,
}

#[derive(Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct ExpectedFinding {
    rule: String,
    severity: String,
    object: String,
    field: String,
    why: String,
}

#[test]
fn every_example_has_exactly_its_expected_findings() {
    let mut failures = Vec::new();
    let mut linted = 0;
    let mut total = 0;
    for dir in examples::example_dirs() {
        let path = dir.join("expect/lint.yaml");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let want: Expected =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = lint(&load(&dir).expect("example loads"));
        linted += 1;
        let key = |rule: &str, severity: &str, object: &str, field: &str| {
            format!("{severity}[{rule}] {object} {field}")
        };
        let mut got: Vec<String> = report
            .findings
            .iter()
            .map(|f| key(f.rule, &f.severity.to_string(), &f.object, &f.field))
            .collect();
        let mut wanted: Vec<String> = want
            .findings
            .iter()
            .map(|f| key(&f.rule, &f.severity, &f.object, &f.field))
            .collect();
        got.sort();
        wanted.sort();
        total += got.len();
        if got != wanted {
            failures.push(format!(
                "{}:\n  want {wanted:#?}\n  got  {got:#?}",
                dir.display()
            ));
        }
        assert!(
            want.findings.iter().all(|f| !f.why.is_empty()),
            "{}: every expected finding says why",
            path.display()
        );
        for f in &report.findings {
            assert!(
                f.location
                    .as_deref()
                    .is_some_and(|l| l.contains(&*dir.to_string_lossy())),
                "{}: finding without the file it is in: {f:?}",
                dir.display()
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(linted, 19, "every example is linted");
    assert!(total >= 15, "only {total} findings over the examples");
}

/// The mistakes the seed documents make (or teach), each caught in the example built from it.
#[test]
fn the_seeds_known_mistakes_are_caught() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let cases = [
        // Seed 004 nests `ports` under the peer: the API server drops it, every port opens.
        ("15-seed004-nested-ports", "dropped-field", Severity::Error),
        (
            "16-seed004-namespace-and-pod",
            "dropped-field",
            Severity::Error,
        ),
        // Seed 004 leaves out metadata.namespace.
        ("15-seed004-nested-ports", "no-namespace", Severity::Warning),
        // Default-deny egress (seeds 000, 002, 003) blocks DNS.
        ("02-default-deny-egress", "no-dns-egress", Severity::Warning),
        ("03-default-deny-all", "no-dns-egress", Severity::Warning),
        (
            "06-allow-from-namespaces",
            "no-dns-egress",
            Severity::Warning,
        ),
        ("13-nginx-walkthrough", "no-dns-egress", Severity::Warning),
        // "Allow DNS" with UDP only (seeds 000, 001).
        ("09-frontend-egress", "no-dns-egress", Severity::Warning),
        (
            "10-egress-cluster-dns-and-https",
            "no-dns-egress",
            Severity::Warning,
        ),
        // Seed 002's 0.0.0.0/0 "internet" block covers the pods too.
        (
            "10-egress-cluster-dns-and-https",
            "ipblock-covers-pods",
            Severity::Warning,
        ),
        // Seeds 000 and 002 give the same deny-all twice.
        ("03-default-deny-all", "duplicate-policy", Severity::Warning),
    ];
    for (example, rule, severity) in cases {
        let report = lint(&load(&root.join(example)).expect("example loads"));
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.rule == rule && f.severity == severity),
            "{example}: {rule} not reported:\n{}",
            report.to_text()
        );
    }
}

#[test]
fn the_binary_gates_on_errors() {
    let run = |example: &str, json: bool| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(example);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kube-nftpolicy"));
        cmd.args(["lint", "--manifests"]).arg(&dir);
        if json {
            cmd.args(["--output", "json"]);
        }
        cmd.env("NO_COLOR", "1").output().expect("run the binary")
    };
    // Errors: exit 3, the error printed with its location and a summary.
    let out = run("15-seed004-nested-ports", false);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("error[dropped-field]: NetworkPolicy default/allow-all-ingress spec.ingress[0].from[0].ports:"),
        "{text}"
    );
    assert!(text.contains("policies.yaml: document 2"), "{text}");
    assert!(text.ends_with("lint: 1 error, 2 warnings\n"), "{text}");
    // Warnings only: exit 0.
    let out = run("02-default-deny-egress", false);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning[no-dns-egress]"));
    // Clean: exit 0.
    let out = run("01-default-deny-ingress", false);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "lint: no findings\n");
    // JSON: the same report.
    let out = run("16-seed004-namespace-and-pod", true);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["errors"], 1);
    assert_eq!(v["warnings"], 2);
    let rules: Vec<&str> = v["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter_map(|f| f["rule"].as_str())
        .collect();
    assert!(rules.contains(&"dropped-field"), "{rules:?}");
    // A path that does not exist: exit 1, named.
    let out = Command::new(env!("CARGO_BIN_EXE_kube-nftpolicy"))
        .args(["lint", "--manifests", "/nonexistent/x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/x"));
}
