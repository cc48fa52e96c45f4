//! `kube-nftpolicy lint`: mistakes in NetworkPolicy manifests, before they reach a cluster.
//!
//! Every tutorial mistake we have seen is accepted by the API server and silently does
//! something else than intended: a `ports` list nested under a peer is dropped (so every port
//! opens), a default-deny egress policy also cuts DNS, a selector with a typo matches nothing.
//! This module checks loaded manifests ([`crate::cluster::manifest::Manifests`]) with one function per
//! rule and reports each finding with the object, where it was read, the field path, a rule
//! id and a severity. Pure: the manifests were already read.
//!
//! Rules and severities. Errors are what the API server rejects, or drops so that the policy
//! means something else than it says; everything else is a warning (valid, but probably not
//! what was meant). `lint` exits non-zero on any error.
//!
//! | Rule | Severity | Fires when |
//! |---|---|---|
//! | `dropped-field` | error | a field the API type does not have (the API server drops it), e.g. `ports` under a peer |
//! | `unreadable` | error | a field has the wrong type, so the API server rejects the object |
//! | `except-outside-cidr` | error | an `ipBlock.except` entry is not strictly inside its `cidr` |
//! | `invalid-policy` | error | any other NetworkPolicy validation error (bad port, selector, CIDR, peer) |
//! | `ignored-rules` | warning | `spec.ingress`/`spec.egress` rules while `policyTypes` leaves that direction out |
//! | `no-namespace` | warning | a NetworkPolicy without `metadata.namespace` (it lands in whatever namespace `kubectl` uses) |
//! | `duplicate-name` | warning | the same object twice in the manifests (the later one wins) |
//! | `duplicate-policy` | warning | two policies of a namespace with exactly the same spec |
//! | `selects-no-pod` | warning | `spec.podSelector` matches no pod of the policy's namespace |
//! | `peer-matches-nothing` | warning | a peer's `namespaceSelector` matches no namespace, or its `podSelector` no pod |
//! | `unknown-named-port` | warning | a named port that no pod it applies to declares (or a named port towards ipBlock peers only) |
//! | `ipblock-covers-pods` | warning | an `ipBlock` (minus its excepts) contains pod addresses |
//! | `no-dns-egress` | warning | pods isolated for egress may not send DNS over both UDP and TCP port 53 (to the `k8s-app=kube-dns` pods of `kube-system`, when the manifests have them) |
//! | `no-kind`, `object-warning` | warning | a document without `kind`; an odd Pod or Namespace (bad IP, clashing port names) |
//! | `invalid-cnp` | error | a ClusterNetworkPolicy the API server rejects (priority, subject, a peer with zero or several fields, a bad port or range, more than 25 items, named ports with non-pod peers, …) |
//! | `cnp-unknown-field` | error | a ClusterNetworkPolicy peer or protocol with no field this version knows (a newer CRD): the rule fails closed |
//! | `cnp-selects-no-pod` | warning | a ClusterNetworkPolicy subject that matches no pod |
//! | `cnp-unreachable-rule` | warning | a rule after a catch-all rule of the same direction (every peer, every port): it never matches |
//! | `cnp-same-priority` | warning | two ClusterNetworkPolicies of one tier with equal priorities that apply to the same pods in the same direction (the order between them is by name here, undefined upstream) |
//! | `cnp-domain-names` | warning | a `domainNames` peer: not supported, it matches nothing |
//!
//! The rules that look at pods (`selects-no-pod`, `peer-matches-nothing`,
//! `unknown-named-port`, `ipblock-covers-pods`) only run when the manifests contain pods:
//! a repository of policies alone says nothing about what they will select.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::cluster::manifest::{Manifests, ProblemKind};
use crate::model::policy::Direction;
use crate::model::{
    ClusterPolicy, CnpPeer, CnpRule, Labels, NAMESPACE_NAME_LABEL, NamespaceScope, ObjectKey, Peer,
    PodInfo, Policy, PolicyError, PortMatch, Protocol, Rule, RuleMatch, Selector,
};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The API server rejects it, or drops part of it so that it means something else.
    Error,
    /// Valid, but probably not what was meant.
    Warning,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    /// `Kind namespace/name` (`Kind name` for a Namespace; the origin for a document without
    /// a kind).
    pub object: String,
    /// JSON path of the field at fault (empty when the finding is about the whole object).
    pub field: String,
    /// Rule id, e.g. `dropped-field`.
    pub rule: &'static str,
    /// Severity.
    pub severity: Severity,
    /// What is wrong and what it does.
    pub message: String,
    /// `file: document N[, items[i]]`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// All findings, sorted by object, field and rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
    /// How many are errors.
    pub errors: usize,
    /// How many are warnings.
    pub warnings: usize,
}

impl Report {
    /// Any error?
    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }

    /// One block per finding, compiler style, then a summary line.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let field = if f.field.is_empty() {
                String::new()
            } else {
                format!(" {}", f.field)
            };
            let _ = writeln!(
                out,
                "{}[{}]: {}{field}: {}",
                f.severity, f.rule, f.object, f.message
            );
            if let Some(at) = &f.location {
                let _ = writeln!(out, "  --> {at}");
            }
        }
        if self.findings.is_empty() {
            out.push_str("lint: no findings\n");
        } else {
            let _ = writeln!(
                out,
                "lint: {} error{}, {} warning{}",
                self.errors,
                if self.errors == 1 { "" } else { "s" },
                self.warnings,
                if self.warnings == 1 { "" } else { "s" }
            );
        }
        out
    }
}

/// Lint loaded manifests.
pub fn lint(m: &Manifests) -> Report {
    let cx = Context::new(m);
    let mut findings = Vec::new();
    load_problems(&cx, &mut findings);
    duplicate_policies(&cx, &mut findings);
    if cx.has_pods {
        for p in &m.policies {
            selects_no_pod(&cx, p, &mut findings);
            peers_match_nothing(&cx, p, &mut findings);
            unknown_named_ports(&cx, p, &mut findings);
            ipblocks_cover_pods(&cx, p, &mut findings);
        }
    }
    for p in &m.policies {
        no_dns_egress(&cx, p, &mut findings);
    }
    for c in &m.cnps {
        if cx.has_pods {
            cnp_selects_no_pod(&cx, c, &mut findings);
        }
        cnp_unreachable_rules(&cx, c, &mut findings);
        cnp_domain_names(&cx, c, &mut findings);
    }
    cnp_same_priority(&cx, &mut findings);
    findings.sort();
    findings.dedup();
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    Report {
        warnings: findings.len() - errors,
        errors,
        findings,
    }
}

/// Add a `never-matched` warning for every rule that matched no connection in `hits` (the
/// `/debug/rule-hits` documents of `nodes` agents, summed rule by rule).
pub fn with_rule_hits(
    mut report: Report,
    hits: &crate::tools::rule_hits::RuleHits,
    nodes: usize,
) -> Report {
    let what = if nodes == 1 {
        "on the node read".to_string()
    } else {
        format!("on any of the {nodes} nodes read")
    };
    for r in hits.never_matched() {
        let verb = match r.action.as_deref() {
            Some("Deny") => "dropped no packet",
            Some("Pass") => "passed no new connection",
            _ => "accepted no new connection",
        };
        report.findings.push(Finding {
            object: r.object(),
            field: if r.kind == "NetworkPolicy" {
                r.rule.clone()
            } else {
                format!("spec.{} rule {}", r.direction, r.rule)
            },
            rule: "never-matched",
            severity: Severity::Warning,
            message: format!(
                "{verb} {what} since its counter was created (the agent started or the rule \
                 appeared): unused, or traffic that should use it is not happening"
            ),
            location: None,
        });
        report.warnings += 1;
    }
    report.findings.sort();
    report
}

/// What every rule looks things up in. The lookups are built once, so that each rule costs in
/// proportion to what it looks at rather than to the cluster: at 100,000 pods and 10,000
/// policies, scanning every pod for every policy (and every policy for every selected pod)
/// took minutes.
struct Context<'a> {
    m: &'a Manifests,
    has_pods: bool,
    /// Every namespace that exists: declared, holding a pod, or holding a policy.
    namespaces: BTreeMap<String, Labels>,
    /// [`Context::selectable`] pods by namespace, in key order.
    pods_by_namespace: BTreeMap<&'a str, Vec<&'a PodInfo>>,
    /// NetworkPolicies by namespace, in manifest order.
    policies_by_namespace: BTreeMap<&'a str, Vec<&'a Policy>>,
    /// The cluster DNS pods, when the manifests have them.
    dns: Vec<&'a PodInfo>,
    /// Every address of a pod that policy applies to, sorted, with its pod.
    target_addresses: Vec<(IpAddr, &'a PodInfo)>,
}

impl<'a> Context<'a> {
    fn new(m: &'a Manifests) -> Self {
        let mut namespaces: BTreeMap<String, Labels> = m
            .namespaces
            .iter()
            .map(|n| (n.name.clone(), n.labels.clone()))
            .collect();
        let implied = m
            .pods
            .iter()
            .map(|p| &p.key.namespace)
            .chain(m.policies.iter().map(|p| &p.key.namespace));
        for ns in implied {
            namespaces
                .entry(ns.clone())
                .or_insert_with(|| Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ns.clone())]));
        }
        let mut pods_by_namespace: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
        for pod in m.pods.iter().filter(|p| !p.host_network && !p.finished) {
            pods_by_namespace
                .entry(pod.key.namespace.as_str())
                .or_default()
                .push(pod);
        }
        // `Manifests` keeps pods sorted by key; the lookups rely on that order.
        for pods in pods_by_namespace.values_mut() {
            pods.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let mut policies_by_namespace: BTreeMap<&str, Vec<&Policy>> = BTreeMap::new();
        for p in &m.policies {
            policies_by_namespace
                .entry(p.key.namespace.as_str())
                .or_default()
                .push(p);
        }
        let dns = pods_by_namespace
            .get(DNS_NAMESPACE)
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| p.labels.get(DNS_LABEL.0) == Some(DNS_LABEL.1))
            .collect();
        let mut target_addresses: Vec<(IpAddr, &PodInfo)> = m
            .pods
            .iter()
            .filter(|p| p.is_policy_target())
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
            .collect();
        target_addresses.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.key.cmp(&b.1.key)));
        Self {
            m,
            has_pods: !m.pods.is_empty(),
            namespaces,
            pods_by_namespace,
            policies_by_namespace,
            dns,
            target_addresses,
        }
    }

    /// The pods of one namespace that a selector can select.
    fn pods_of(&self, namespace: &str) -> &[&'a PodInfo] {
        self.pods_by_namespace
            .get(namespace)
            .map_or(&[], Vec::as_slice)
    }

    /// The NetworkPolicies of one namespace.
    fn policies_of(&self, namespace: &str) -> &[&'a Policy] {
        self.policies_by_namespace
            .get(namespace)
            .map_or(&[], Vec::as_slice)
    }

    /// Does a peer (namespace scope and pod selector) take in this pod?
    fn peer_has(&self, scope: &NamespaceScope, pods: &Selector, pod: &PodInfo) -> bool {
        let ns_ok = match scope {
            NamespaceScope::Own(ns) => pod.key.namespace == *ns,
            NamespaceScope::Selector(sel) => self
                .namespaces
                .get(&pod.key.namespace)
                .is_some_and(|labels| sel.matches(labels)),
        };
        ns_ok && pods.matches(&pod.labels)
    }

    /// The pods (policy targets) with an address in the block and outside its excepts, in key
    /// order.
    fn covered_by(&self, block: &crate::model::IpBlock) -> Vec<&'a ObjectKey> {
        let first = block.cidr.network();
        let from = self.target_addresses.partition_point(|(ip, _)| *ip < first);
        let keys: BTreeSet<&ObjectKey> = self.target_addresses[from..]
            .iter()
            .take_while(|(ip, _)| block.cidr.contains(ip))
            .filter(|(ip, _)| !block.except.iter().any(|e| e.contains(ip)))
            .map(|(_, pod)| &pod.key)
            .collect();
        keys.into_iter().collect()
    }

    fn location(&self, object: &str) -> Option<String> {
        self.m.origins.get(object).cloned()
    }

    /// Pods a selector can select: running (or about to), not on the host network. A pod
    /// without an IP yet still counts; it will be selected once it has one.
    fn selectable(&self) -> impl Iterator<Item = &'a PodInfo> + 'a {
        self.m
            .pods
            .iter()
            .filter(|p| !p.host_network && !p.finished)
    }

    fn selected_by(&self, p: &Policy) -> Vec<&'a PodInfo> {
        self.pods_of(&p.key.namespace)
            .iter()
            .copied()
            .filter(|pod| p.pod_selector.matches(&pod.labels))
            .collect()
    }

    fn matching_namespaces<'s>(&'s self, scope: &'s NamespaceScope) -> Vec<&'s str> {
        match scope {
            NamespaceScope::Own(ns) => vec![ns.as_str()],
            NamespaceScope::Selector(sel) => self
                .namespaces
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .map(|(n, _)| n.as_str())
                .collect(),
        }
    }

    fn peer_pods(&self, scope: &NamespaceScope, pods: &Selector) -> Vec<&'a PodInfo> {
        self.peer_pods_iter(scope, pods).collect()
    }

    /// The pods a peer takes in, in key order (namespaces come sorted, and each one's pods in
    /// key order), without collecting them: most rules only ask whether there is one.
    fn peer_pods_iter<'s>(
        &'s self,
        scope: &'s NamespaceScope,
        pods: &'s Selector,
    ) -> impl Iterator<Item = &'a PodInfo> + 's {
        self.matching_namespaces(scope)
            .into_iter()
            .flat_map(move |ns| self.pods_of(ns).iter().copied())
            .filter(move |p| pods.matches(&p.labels))
    }

    fn finding(
        &self,
        policy: &Policy,
        field: String,
        rule: &'static str,
        severity: Severity,
        message: String,
    ) -> Finding {
        let object = format!("NetworkPolicy {}", policy.key);
        Finding {
            location: self.location(&object),
            object,
            field,
            rule,
            severity,
            message,
        }
    }
}

fn peers_field(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    }
}

/// Up to three names, then how many more.
fn some_of(keys: impl IntoIterator<Item = String>) -> String {
    let all: Vec<String> = keys.into_iter().collect();
    let shown = all.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 3 {
        format!("{shown} and {} more", all.len() - 3)
    } else {
        shown
    }
}

fn reason_of(e: &PolicyError) -> String {
    let text = e.to_string();
    let prefix = format!("{}: ", e.field());
    text.strip_prefix(&prefix).unwrap_or(&text).to_string()
}

/// The reason of a ClusterNetworkPolicy problem without the object and field (the finding
/// names those).
fn cnp_reason(e: &crate::model::CnpError) -> String {
    match e {
        crate::model::CnpError::MissingName => e.to_string(),
        crate::model::CnpError::Invalid { reason, .. }
        | crate::model::CnpError::Unknown { reason, .. } => reason.clone(),
    }
}

/// The rules a policy has in one direction, each with its field path.
fn rules_of(p: &Policy) -> impl Iterator<Item = (Direction, String, &Rule)> {
    Direction::ALL.into_iter().flat_map(move |d| {
        p.rules(d)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .map(move |(i, r)| (d, format!("spec.{d}[{i}]"), r))
    })
}

/// `dropped-field`, `unreadable`, `except-outside-cidr`, `invalid-policy`, `ignored-rules`,
/// `no-namespace`, `duplicate-name`, `no-kind`, `object-warning`: what the loader noticed.
fn load_problems(cx: &Context<'_>, out: &mut Vec<Finding>) {
    for p in &cx.m.problems {
        let field = p.field.clone().unwrap_or_default();
        let (rule, severity, message) = match &p.kind {
            ProblemKind::DroppedField => {
                let message = if is_peer_ports(&field) {
                    "`ports` belongs to the rule, not to a peer: the API server drops it \
                     silently, so this rule allows every port and protocol"
                        .to_string()
                } else {
                    "unknown field: the API server drops it silently".to_string()
                };
                ("dropped-field", Severity::Error, message)
            }
            ProblemKind::Unreadable => {
                let reason = p
                    .message
                    .rsplit_once(&format!("field {field}: "))
                    .map_or(p.message.as_str(), |(_, r)| r);
                let reason = reason.strip_suffix("; skipped").unwrap_or(reason);
                (
                    "unreadable",
                    Severity::Error,
                    format!("{reason}: the API server rejects the object"),
                )
            }
            // Already reported as `unreadable`.
            ProblemKind::InvalidPolicy(PolicyError::Unreadable { .. }) => continue,
            ProblemKind::InvalidPolicy(e @ PolicyError::ExceptOutside { .. }) => (
                "except-outside-cidr",
                Severity::Error,
                format!(
                    "{}: the API server rejects the policy (kube-nftpolicy keeps it isolating its pods, allowing nothing)",
                    reason_of(e)
                ),
            ),
            ProblemKind::InvalidPolicy(e) => (
                "invalid-policy",
                Severity::Error,
                format!(
                    "{}: the API server rejects the policy (kube-nftpolicy keeps it isolating its pods, allowing nothing)",
                    reason_of(e)
                ),
            ),
            ProblemKind::RejectedPolicy(e) => (
                "invalid-policy",
                Severity::Error,
                format!(
                    "{}: the API server rejects the policy (kube-nftpolicy ignores it)",
                    reason_of(e)
                ),
            ),
            ProblemKind::InvalidClusterPolicy(e) => (
                if matches!(e, crate::model::CnpError::Unknown { .. }) {
                    "cnp-unknown-field"
                } else {
                    "invalid-cnp"
                },
                Severity::Error,
                format!(
                    "{}: the API server rejects this (kube-nftpolicy keeps the policy; an Accept rule here matches nothing, a Deny or Pass rule denies everything)",
                    cnp_reason(e)
                ),
            ),
            ProblemKind::RejectedClusterPolicy(e) => (
                "invalid-cnp",
                Severity::Error,
                format!(
                    "{}: the API server rejects the policy (kube-nftpolicy ignores it)",
                    cnp_reason(e)
                ),
            ),
            ProblemKind::IgnoredField => (
                "ignored-rules",
                Severity::Warning,
                format!(
                    "these rules have no effect: spec.policyTypes does not list {}",
                    if field == "spec.ingress" {
                        "Ingress"
                    } else {
                        "Egress"
                    }
                ),
            ),
            ProblemKind::DefaultedNamespace => (
                "no-namespace",
                Severity::Warning,
                "not set: the policy lands in the namespace `kubectl apply` uses \
                 (the context's, or -n); these checks assumed `default`"
                    .to_string(),
            ),
            ProblemKind::Duplicate => ("duplicate-name", Severity::Warning, p.message.clone()),
            ProblemKind::NoKind => ("no-kind", Severity::Warning, p.message.clone()),
            ProblemKind::Object => ("object-warning", Severity::Warning, p.message.clone()),
            // Deployments, Services, ... are normal in a repository.
            ProblemKind::UnusedKind => continue,
        };
        out.push(Finding {
            object: p.object.clone().unwrap_or_else(|| p.origin.clone()),
            field,
            rule,
            severity,
            message,
            location: Some(p.origin.clone()),
        });
    }
}

/// `spec.ingress[0].from[1].ports` and the like.
fn is_peer_ports(field: &str) -> bool {
    let Some(parent) = field.strip_suffix(".ports") else {
        return false;
    };
    let last = parent.rsplit('.').next().unwrap_or_default();
    last.starts_with("from[") || last.starts_with("to[")
}

/// `duplicate-policy`: two policies of one namespace with the same (normalised) spec. The
/// later name in sort order is reported, naming the earlier.
fn duplicate_policies(cx: &Context<'_>, out: &mut Vec<Finding>) {
    for (i, p) in cx
        .policies_by_namespace
        .values()
        .flat_map(|v| v.iter().enumerate())
    {
        let policies = cx.policies_of(&p.key.namespace);
        let same = policies[..i].iter().find(|q| {
            q.pod_selector == p.pod_selector
                && q.ingress == p.ingress
                && q.egress == p.egress
                && q.invalid == p.invalid
        });
        if let Some(q) = same {
            out.push(cx.finding(
                p,
                "spec".into(),
                "duplicate-policy",
                Severity::Warning,
                format!(
                    "same spec as NetworkPolicy {}: policies add up, so one of them does nothing",
                    q.key
                ),
            ));
        }
    }
}

/// `selects-no-pod`.
fn selects_no_pod(cx: &Context<'_>, p: &Policy, out: &mut Vec<Finding>) {
    if cx.selected_by(p).is_empty() {
        out.push(cx.finding(
            p,
            "spec.podSelector".into(),
            "selects-no-pod",
            Severity::Warning,
            format!(
                "{} matches no pod of namespace {}: the policy has no effect",
                p.pod_selector, p.key.namespace
            ),
        ));
    }
}

/// `peer-matches-nothing`.
fn peers_match_nothing(cx: &Context<'_>, p: &Policy, out: &mut Vec<Finding>) {
    for (d, field, rule) in rules_of(p) {
        for (j, peer) in rule.peers.iter().flatten().enumerate() {
            let Peer::Pods { namespaces, pods } = peer else {
                continue;
            };
            let at = format!("{field}.{}[{j}]", peers_field(d));
            let matched_ns = cx.matching_namespaces(namespaces);
            if let NamespaceScope::Selector(sel) = namespaces {
                if matched_ns.is_empty() {
                    out.push(cx.finding(
                        p,
                        format!("{at}.namespaceSelector"),
                        "peer-matches-nothing",
                        Severity::Warning,
                        format!(
                            "{sel} matches no namespace (namespaces have only the labels given \
                             to them, plus {NAMESPACE_NAME_LABEL}): this peer allows nothing"
                        ),
                    ));
                    continue;
                }
            }
            if cx.peer_pods_iter(namespaces, pods).next().is_none() {
                let listed = || some_of(matched_ns.iter().map(ToString::to_string));
                let (field, what) = match namespaces {
                    NamespaceScope::Own(ns) => (
                        format!("{at}.podSelector"),
                        format!(
                            "{pods} matches no pod in namespace {ns} (without a namespaceSelector, a peer means the policy's own namespace)"
                        ),
                    ),
                    NamespaceScope::Selector(_) if pods.is_empty() => (
                        format!("{at}.namespaceSelector"),
                        format!("the namespaces it matches ({}) have no pods", listed()),
                    ),
                    NamespaceScope::Selector(_) => (
                        format!("{at}.podSelector"),
                        format!(
                            "{pods} matches no pod in the namespaces the namespaceSelector matches ({})",
                            listed()
                        ),
                    ),
                };
                out.push(cx.finding(
                    p,
                    field,
                    "peer-matches-nothing",
                    Severity::Warning,
                    format!("{what}: this peer allows nothing"),
                ));
            }
        }
    }
}

/// `unknown-named-port`: a named port resolves on the destination pod (the selected pods for
/// ingress, the peer pods for egress); when none of them declares it, it allows nothing.
fn unknown_named_ports(cx: &Context<'_>, p: &Policy, out: &mut Vec<Finding>) {
    for (d, field, rule) in rules_of(p) {
        for (k, spec) in rule.ports.iter().flatten().enumerate() {
            let PortMatch::Named(name) = &spec.port else {
                continue;
            };
            let at = format!("{field}.ports[{k}].port");
            // The usual answer first, without collecting pods: some destination declares it.
            let declares = |pod: &&PodInfo| pod.resolve_named_port(name, spec.protocol).is_some();
            let declared = match (d, &rule.peers) {
                (Direction::Ingress, _) => cx
                    .pods_of(&p.key.namespace)
                    .iter()
                    .any(|pod| p.pod_selector.matches(&pod.labels) && declares(pod)),
                (Direction::Egress, None) => cx.selectable().any(|pod| declares(&pod)),
                (Direction::Egress, Some(peers)) => peers.iter().any(|peer| match peer {
                    Peer::Pods { namespaces, pods } => cx
                        .peer_pods_iter(namespaces, pods)
                        .any(|pod| declares(&pod)),
                    Peer::IpBlock(_) => false,
                }),
            };
            if declared {
                continue;
            }
            let candidates: Vec<&PodInfo> = match d {
                Direction::Ingress => cx.selected_by(p),
                Direction::Egress => match &rule.peers {
                    None => cx.selectable().collect(),
                    Some(peers) => {
                        let mut keys = BTreeSet::new();
                        let mut v = Vec::new();
                        for peer in peers {
                            if let Peer::Pods { namespaces, pods } = peer {
                                for pod in cx.peer_pods(namespaces, pods) {
                                    if keys.insert(&pod.key) {
                                        v.push(pod);
                                    }
                                }
                            }
                        }
                        if v.is_empty() && peers.iter().all(|q| matches!(q, Peer::IpBlock(_))) {
                            out.push(cx.finding(
                                p,
                                at.clone(),
                                "unknown-named-port",
                                Severity::Warning,
                                format!(
                                    "named port {name} ({}) towards ipBlock peers only: a named port never matches an ipBlock destination, so it allows nothing",
                                    spec.protocol
                                ),
                            ));
                            continue;
                        }
                        v
                    }
                },
            };
            // Without pods to resolve on, `selects-no-pod`/`peer-matches-nothing` already say so.
            if candidates.is_empty()
                || candidates
                    .iter()
                    .any(|pod| pod.resolve_named_port(name, spec.protocol).is_some())
            {
                continue;
            }
            let whose = match d {
                Direction::Ingress => "the pods the policy selects",
                Direction::Egress => "the pods this rule sends to",
            };
            out.push(cx.finding(
                p,
                at,
                "unknown-named-port",
                Severity::Warning,
                format!(
                    "named port {name} ({}): none of {whose} ({}) declares a container port of that name and protocol, so it allows nothing",
                    spec.protocol,
                    some_of(candidates.iter().map(|c| c.key.to_string()))
                ),
            ));
        }
    }
}

/// `ipblock-covers-pods`.
fn ipblocks_cover_pods(cx: &Context<'_>, p: &Policy, out: &mut Vec<Finding>) {
    for (d, field, rule) in rules_of(p) {
        for (j, peer) in rule.peers.iter().flatten().enumerate() {
            let Peer::IpBlock(block) = peer else {
                continue;
            };
            let covered = cx.covered_by(block);
            if covered.is_empty() {
                continue;
            }
            out.push(cx.finding(
                p,
                format!("{field}.{}[{j}].ipBlock.cidr", peers_field(d)),
                "ipblock-covers-pods",
                Severity::Warning,
                format!(
                    "{block} covers the addresses of {} pod{} ({}): pod traffic is meant to be matched by pod and namespace selectors; pod addresses change, and implementations differ on whether an ipBlock matches them",
                    covered.len(),
                    if covered.len() == 1 { "" } else { "s" },
                    some_of(covered.iter().map(ToString::to_string))
                ),
            ));
        }
    }
}

/// The label CoreDNS and kube-dns pods carry, in this namespace.
const DNS_LABEL: (&str, &str) = ("k8s-app", "kube-dns");
const DNS_NAMESPACE: &str = "kube-system";

/// Does some rule allow `protocol` port 53, to the cluster DNS pods when the manifests have
/// them (a peer must cover one), or to anywhere when they do not?
fn allows_dns(cx: &Context<'_>, dns: &[&PodInfo], rules: &[&Rule], protocol: Protocol) -> bool {
    let port_ok = |r: &Rule| match &r.ports {
        None => true,
        Some(ports) => ports.iter().any(|s| {
            s.protocol == protocol
                && match &s.port {
                    PortMatch::All => true,
                    PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&53),
                    // A named port resolves on the destination: the DNS pods, or any pod.
                    PortMatch::Named(n) => {
                        let on = |pod: &&PodInfo| pod.resolve_named_port(n, protocol) == Some(53);
                        if dns.is_empty() {
                            cx.m.pods.iter().any(|p| on(&p))
                        } else {
                            dns.iter().any(on)
                        }
                    }
                }
        }),
    };
    let peer_ok = |r: &Rule| match &r.peers {
        None => true,
        Some(_) if dns.is_empty() => true,
        Some(peers) => peers.iter().any(|peer| match peer {
            Peer::Pods { namespaces, pods } => dns.iter().any(|d| cx.peer_has(namespaces, pods, d)),
            Peer::IpBlock(block) => dns.iter().any(|d| {
                d.ips.iter().any(|ip| {
                    block.cidr.contains(ip) && !block.except.iter().any(|e| e.contains(ip))
                })
            }),
        }),
    };
    rules.iter().any(|r| port_ok(r) && peer_ok(r))
}

/// `no-dns-egress`: the pods this policy isolates for egress, with every egress policy that
/// selects them, may not send DNS queries anywhere. Without pods, the policies that surely
/// select the same pods (same or empty selector) are taken together.
fn no_dns_egress(cx: &Context<'_>, p: &Policy, out: &mut Vec<Finding>) {
    if p.egress.is_none() {
        return;
    }
    let same_ns = || {
        cx.policies_of(&p.key.namespace)
            .iter()
            .copied()
            .filter(|q| q.egress.is_some())
    };
    let selected = cx.selected_by(p);
    let dns = &cx.dns;
    // (pods concerned, the egress policies that apply to them)
    let groups: Vec<(Vec<String>, Vec<&Policy>)> = if selected.is_empty() {
        if cx.has_pods {
            return; // `selects-no-pod` says it
        }
        let together: Vec<&Policy> = same_ns()
            .filter(|q| q.pod_selector.is_empty() || q.pod_selector == p.pod_selector)
            .collect();
        vec![(Vec::new(), together)]
    } else {
        selected
            .iter()
            .map(|pod| {
                (
                    vec![pod.key.to_string()],
                    same_ns()
                        .filter(|q| q.pod_selector.matches(&pod.labels))
                        .collect(),
                )
            })
            .collect()
    };
    // Pods (none named: the static case) that may not resolve names at all, and those that
    // may over UDP only.
    let (mut none, mut udp_only): (Option<Vec<String>>, Option<Vec<String>>) = (None, None);
    let mut policies: BTreeSet<&ObjectKey> = BTreeSet::new();
    // Pods of a namespace mostly share the set of policies that apply to them: decide each set
    // once.
    let mut decided: BTreeMap<Vec<&ObjectKey>, (bool, bool)> = BTreeMap::new();
    for (pods, applying) in &groups {
        let set: Vec<&ObjectKey> = applying.iter().map(|q| &q.key).collect();
        let (udp, tcp) = *decided.entry(set).or_insert_with(|| {
            let rules: Vec<&Rule> = applying
                .iter()
                .flat_map(|q| q.egress.iter().flatten())
                .collect();
            (
                allows_dns(cx, dns, &rules, Protocol::Udp),
                allows_dns(cx, dns, &rules, Protocol::Tcp),
            )
        });
        if udp && tcp {
            continue;
        }
        policies.extend(applying.iter().map(|q| &q.key));
        let bucket = if udp { &mut udp_only } else { &mut none };
        bucket
            .get_or_insert_with(Vec::new)
            .extend(pods.iter().cloned());
    }
    let by = some_of(policies.iter().map(ToString::to_string));
    let whither = if dns.is_empty() {
        String::new()
    } else {
        format!(
            " to the cluster DNS pods ({})",
            some_of(dns.iter().map(|d| d.key.to_string()))
        )
    };
    let who = |pods: Vec<String>| {
        if pods.is_empty() {
            "the pods it selects".to_string()
        } else {
            format!("pods {}", some_of(pods))
        }
    };
    let message = match (none, udp_only) {
        (Some(pods), _) => format!(
            "{} are isolated for egress and no egress rule ({by}) allows DNS, UDP or TCP port 53{whither}: name resolution fails",
            who(pods)
        ),
        (None, Some(pods)) => format!(
            "{} are isolated for egress and the egress rules ({by}) allow DNS over UDP port 53 but not TCP port 53{whither}: answers too large for UDP fail",
            who(pods)
        ),
        (None, None) => return,
    };
    let field = if p.egress.as_ref().is_some_and(|r| !r.is_empty()) {
        "spec.egress"
    } else {
        "spec.policyTypes"
    };
    out.push(cx.finding(p, field.into(), "no-dns-egress", Severity::Warning, message));
}

fn cnp_finding(
    cx: &Context<'_>,
    c: &ClusterPolicy,
    field: String,
    rule: &'static str,
    message: String,
) -> Finding {
    let object = format!("ClusterNetworkPolicy {}", c.name);
    Finding {
        location: cx.location(&object),
        object,
        field,
        rule,
        severity: Severity::Warning,
        message,
    }
}

fn cnp_subject_pods<'a>(cx: &Context<'a>, c: &ClusterPolicy) -> Vec<&'a PodInfo> {
    let (ns, pods) = c.subject.selectors();
    cx.pods_by_namespace
        .iter()
        .filter(|(n, _)| {
            cx.namespaces
                .get(**n)
                .is_some_and(|labels| ns.matches(labels))
        })
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|p| pods.matches(&p.labels))
        .collect()
}

/// `cnp-selects-no-pod`.
fn cnp_selects_no_pod(cx: &Context<'_>, c: &ClusterPolicy, out: &mut Vec<Finding>) {
    if cnp_subject_pods(cx, c).is_empty() {
        out.push(cnp_finding(
            cx,
            c,
            "spec.subject".into(),
            "cnp-selects-no-pod",
            format!("{} matches no pod: the policy has no effect", c.subject),
        ));
    }
}

/// Does a rule match every connection the direction can see? (Ingress peers are pods only, so
/// all namespaces is everything; egress needs every address of both families.)
fn is_catch_all(d: Direction, rule: &CnpRule) -> bool {
    match &rule.matches {
        RuleMatch::Everything { .. } => true,
        RuleMatch::Nothing { .. } => false,
        RuleMatch::Peers { ports: Some(_), .. } => false,
        RuleMatch::Peers { peers, ports: None } => match d {
            Direction::Ingress => peers.iter().any(|p| match p {
                CnpPeer::Namespaces(ns) => ns.is_empty(),
                CnpPeer::Pods { namespaces, pods } => namespaces.is_empty() && pods.is_empty(),
                _ => false,
            }),
            Direction::Egress => {
                let all = |bits: u8| {
                    peers.iter().any(|p| match p {
                        CnpPeer::Networks(c) => c
                            .iter()
                            .any(|c| c.to_string().ends_with("/0") && c.family().bits() == bits),
                        _ => false,
                    })
                };
                all(32) && all(128)
            }
        },
    }
}

/// `cnp-unreachable-rule`.
fn cnp_unreachable_rules(cx: &Context<'_>, c: &ClusterPolicy, out: &mut Vec<Finding>) {
    for d in Direction::ALL {
        let rules = c.rules(d);
        if let Some(first) = rules.iter().position(|r| is_catch_all(d, r)) {
            for r in &rules[first + 1..] {
                out.push(cnp_finding(
                    cx,
                    c,
                    format!("spec.{d}[{}]", r.index),
                    "cnp-unreachable-rule",
                    format!(
                        "never matches: {} before it ({}) matches every {d} connection",
                        rules[first].label(d),
                        rules[first].effective_action()
                    ),
                ));
            }
        }
    }
}

/// `cnp-domain-names`.
fn cnp_domain_names(cx: &Context<'_>, c: &ClusterPolicy, out: &mut Vec<Finding>) {
    for r in c.rules(Direction::Egress) {
        if let RuleMatch::Peers { peers, .. } = &r.matches {
            for (i, p) in peers.iter().enumerate() {
                if matches!(p, CnpPeer::DomainNames(_)) {
                    out.push(cnp_finding(
                        cx,
                        c,
                        format!("spec.egress[{}].to[{i}].domainNames", r.index),
                        "cnp-domain-names",
                        "domainNames peers are not supported by kube-nftpolicy: this peer matches nothing (the safe reading for an Accept rule)".into(),
                    ));
                }
            }
        }
    }
}

/// `cnp-same-priority`.
fn cnp_same_priority(cx: &Context<'_>, out: &mut Vec<Finding>) {
    let cnps = &cx.m.cnps;
    for (i, a) in cnps.iter().enumerate() {
        for b in &cnps[i + 1..] {
            if a.tier != b.tier || a.priority != b.priority {
                continue;
            }
            let Some(d) = Direction::ALL
                .into_iter()
                .find(|d| !a.rules(*d).is_empty() && !b.rules(*d).is_empty())
            else {
                continue;
            };
            if cx.has_pods {
                let pa: BTreeSet<&ObjectKey> =
                    cnp_subject_pods(cx, a).iter().map(|p| &p.key).collect();
                if !cnp_subject_pods(cx, b).iter().any(|p| pa.contains(&p.key)) {
                    continue;
                }
            }
            let (first, second) = if a.name <= b.name { (a, b) } else { (b, a) };
            out.push(cnp_finding(
                cx,
                second,
                "spec.priority".into(),
                "cnp-same-priority",
                format!(
                    "same tier ({}) and priority ({}) as ClusterNetworkPolicy {}, for the same pods ({d}): upstream leaves their order undefined; kube-nftpolicy evaluates {} first (by name)",
                    first.tier, first.priority, first.name, first.name
                ),
            ));
        }
    }
}
