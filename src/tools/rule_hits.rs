//! Rule hit counts as the agent serves them at `/debug/rule-hits`, and what `lint` makes of
//! them: the rules that never matched a connection since their counters were made.
//!
//! The kernel counts (one named counter per policy rule, see docs/ruleset.md); the agent reads
//! the counters back and serves this document. `lint --rule-hits <file>` reads one or more of
//! them (one per node, e.g. saved with `curl`), sums the hits of each rule over the nodes and
//! reports the rules no node saw a connection through. Reading files rather than fetching
//! from the agents keeps an HTTP client out of the CLI and makes the cluster-wide question
//! (never matched on *any* node) a matter of passing every node's file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::ruleset::CounterOwner;

/// Every rule of one node's policies with its hits (the `/debug/rule-hits` document).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    /// One entry per rule, in policy order.
    pub rules: Vec<RuleHit>,
}

/// One policy rule and the new connections it matched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleHit {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: String,
    /// The NetworkPolicy's namespace (absent for a ClusterNetworkPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The policy's name.
    pub policy: String,
    /// `admin` or `baseline`, for a ClusterNetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// `ingress` or `egress`.
    pub direction: String,
    /// `spec.ingress[0]`, or a ClusterNetworkPolicy rule's name.
    pub rule: String,
    /// `Accept`, `Pass` or `Deny` for a ClusterNetworkPolicy rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// First packets of new connections the rule matched (for a Deny rule: packets dropped).
    pub hits: u64,
}

impl RuleHit {
    /// `NetworkPolicy ns/name` or `ClusterNetworkPolicy name`, as lint names objects.
    pub fn object(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.policy),
            None => format!("{} {}", self.kind, self.policy),
        }
    }

    /// Everything but the count: what identifies the rule across nodes.
    fn key(&self) -> RuleHit {
        RuleHit {
            hits: 0,
            ..self.clone()
        }
    }
}

impl RuleHits {
    /// The document for the counters read back from the kernel.
    pub fn from_counters<'a>(counters: impl IntoIterator<Item = (&'a CounterOwner, u64)>) -> Self {
        let mut rules: Vec<RuleHit> = counters
            .into_iter()
            .filter_map(|(owner, hits)| match owner {
                CounterOwner::Policy {
                    namespace,
                    policy,
                    direction,
                    rule,
                } => Some(RuleHit {
                    kind: "NetworkPolicy".into(),
                    namespace: Some(namespace.clone()),
                    policy: policy.clone(),
                    tier: None,
                    direction: (*direction).into(),
                    rule: format!("spec.{direction}[{rule}]"),
                    action: None,
                    hits,
                }),
                CounterOwner::Cnp {
                    policy,
                    tier,
                    direction,
                    rule,
                    action,
                } => Some(RuleHit {
                    kind: "ClusterNetworkPolicy".into(),
                    namespace: None,
                    policy: policy.clone(),
                    tier: Some((*tier).into()),
                    direction: (*direction).into(),
                    rule: rule.clone(),
                    action: Some((*action).into()),
                    hits,
                }),
                // Not a rule: the staged counters have their own metrics.
                CounterOwner::Staged { .. } | CounterOwner::StagedCnp { .. } => None,
            })
            .collect();
        rules.sort();
        Self { rules }
    }

    /// Sum several nodes' documents rule by rule.
    pub fn merge(docs: impl IntoIterator<Item = RuleHits>) -> Self {
        let mut sum: BTreeMap<RuleHit, u64> = BTreeMap::new();
        for doc in docs {
            for r in doc.rules {
                let hits = r.hits;
                *sum.entry(r.key()).or_default() += hits;
            }
        }
        Self {
            rules: sum
                .into_iter()
                .map(|(k, hits)| RuleHit { hits, ..k })
                .collect(),
        }
    }

    /// The hits of NetworkPolicy `namespace/name`'s rule `ingress[i]` (as `explain` cites
    /// rules), if some document has it.
    pub fn of_policy_rule(&self, policy: &str, rule: &str) -> Option<u64> {
        let (ns, name) = policy.split_once('/')?;
        let path = format!("spec.{rule}");
        let mut found = None;
        for r in &self.rules {
            if r.kind == "NetworkPolicy"
                && r.namespace.as_deref() == Some(ns)
                && r.policy == name
                && r.rule == path
            {
                *found.get_or_insert(0) += r.hits;
            }
        }
        found
    }

    /// Lines for `explain --rule-hits`: the hits of every rule of the policies that decide the
    /// connection, at both ends.
    pub fn explain_text(&self, e: &crate::tools::explain::Explanation, nodes: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for side in [&e.egress, &e.ingress] {
            for p in &side.policies {
                for r in &p.rules {
                    if !seen.insert((p.policy.clone(), r.rule.clone())) {
                        continue;
                    }
                    let hits = match self.of_policy_rule(&p.policy, &r.rule) {
                        Some(0) => "0 (never matched)".to_string(),
                        Some(n) => n.to_string(),
                        None => "not on any node read".to_string(),
                    };
                    let _ = writeln!(out, "  {} spec.{}: {hits}", p.policy, r.rule);
                }
            }
        }
        if out.is_empty() {
            return out;
        }
        format!(
            "rule hits (new connections since each counter was created, {nodes} node{} read):\n{out}",
            if nodes == 1 { "" } else { "s" }
        )
    }

    /// The rules that matched nothing.
    pub fn never_matched(&self) -> impl Iterator<Item = &RuleHit> {
        self.rules.iter().filter(|r| r.hits == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(policy: &str, rule: usize, hits: u64) -> (CounterOwner, u64) {
        (
            CounterOwner::Policy {
                namespace: "shop".into(),
                policy: policy.into(),
                direction: "ingress",
                rule,
            },
            hits,
        )
    }

    #[test]
    fn merging_sums_each_rule_over_nodes_and_finds_the_unused_ones() {
        let node1 = [np("web", 0, 3), np("web", 1, 0)];
        let node2 = [np("web", 0, 0), np("web", 1, 0), np("db", 0, 2)];
        let doc =
            |c: &[(CounterOwner, u64)]| RuleHits::from_counters(c.iter().map(|(o, h)| (o, *h)));
        let merged = RuleHits::merge([doc(&node1), doc(&node2)]);
        let got: Vec<(String, String, u64)> = merged
            .rules
            .iter()
            .map(|r| (r.object(), r.rule.clone(), r.hits))
            .collect();
        assert_eq!(
            got,
            vec![
                ("NetworkPolicy shop/db".into(), "spec.ingress[0]".into(), 2),
                ("NetworkPolicy shop/web".into(), "spec.ingress[0]".into(), 3),
                ("NetworkPolicy shop/web".into(), "spec.ingress[1]".into(), 0),
            ]
        );
        let unused: Vec<String> = merged.never_matched().map(|r| r.rule.clone()).collect();
        assert_eq!(unused, vec!["spec.ingress[1]".to_string()]);
    }

    #[test]
    fn the_document_round_trips_through_json() {
        let doc = RuleHits::from_counters([
            (
                &CounterOwner::Cnp {
                    policy: "guard".into(),
                    tier: "admin",
                    direction: "egress",
                    rule: "allow-dns".into(),
                    action: "Accept",
                },
                7,
            ),
            (&np("web", 0, 1).0, 1),
        ]);
        let text = serde_json::to_string(&doc).expect("serializes");
        let back: RuleHits = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, doc);
        assert!(text.contains("\"tier\":\"admin\""), "{text}");
        assert!(!text.contains("\"namespace\":null"), "{text}");
    }
}
