//! Label selectors as NetworkPolicy uses them, validated once on arrival.
//!
//! The API server rejects selectors with unknown operators or with values on `Exists`; we do
//! the same when reading manifests, so the resolver only ever sees well-formed selectors.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub use crate::model::labels::Labels;

/// A validated `metav1.LabelSelector`. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// `matchLabels`, each an equality requirement.
    pub match_labels: Labels,
    /// `matchExpressions`, sorted for a canonical form.
    pub expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: Operator,
    /// Values (empty for `Exists`/`DoesNotExist`).
    pub values: BTreeSet<String>,
}

/// The four operators NetworkPolicy selectors accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// Label present with one of the values.
    In,
    /// Label absent, or present with none of the values.
    NotIn,
    /// Label present.
    Exists,
    /// Label absent.
    DoesNotExist,
}

/// Why a selector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The operator is not one of In, NotIn, Exists, DoesNotExist.
    #[error(
        "matchExpressions[{index}] (key {key:?}): unknown operator {operator:?} (want In, NotIn, Exists or DoesNotExist)"
    )]
    UnknownOperator {
        /// Position in matchExpressions.
        index: usize,
        /// Label key.
        key: String,
        /// The operator as written.
        operator: String,
    },
    /// In/NotIn need at least one value.
    #[error(
        "matchExpressions[{index}] (key {key:?}): operator {operator} needs at least one value"
    )]
    MissingValues {
        /// Position in matchExpressions.
        index: usize,
        /// Label key.
        key: String,
        /// The operator.
        operator: &'static str,
    },
    /// Exists/DoesNotExist take no values.
    #[error("matchExpressions[{index}] (key {key:?}): operator {operator} takes no values")]
    UnexpectedValues {
        /// Position in matchExpressions.
        index: usize,
        /// Label key.
        key: String,
        /// The operator.
        operator: &'static str,
    },
    /// A label key that can never exist (empty).
    #[error("empty label key in {0}")]
    EmptyKey(&'static str),
}

impl Operator {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "In" => Some(Self::In),
            "NotIn" => Some(Self::NotIn),
            "Exists" => Some(Self::Exists),
            "DoesNotExist" => Some(Self::DoesNotExist),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
        }
    }
}

impl Selector {
    /// The selector that matches every object.
    pub fn everything() -> Self {
        Self::default()
    }

    /// True when the selector has no requirements.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.expressions.is_empty()
    }

    /// Does `labels` satisfy every requirement?
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }

    /// Validate a Kubernetes selector.
    pub fn try_from_k8s(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let match_labels: Labels = sel
            .match_labels
            .as_ref()
            .map(Labels::from)
            .unwrap_or_default();
        if match_labels.keys().any(|k| k.is_empty()) {
            return Err(SelectorError::EmptyKey("matchLabels"));
        }
        let mut expressions = Vec::new();
        for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
            if e.key.is_empty() {
                return Err(SelectorError::EmptyKey("matchExpressions"));
            }
            let operator =
                Operator::parse(&e.operator).ok_or_else(|| SelectorError::UnknownOperator {
                    index,
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                })?;
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        index,
                        key: e.key.clone(),
                        operator: operator.as_str(),
                    });
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        index,
                        key: e.key.clone(),
                        operator: operator.as_str(),
                    });
                }
                _ => {}
            }
            expressions.push(Requirement {
                key: e.key.clone(),
                operator,
                values,
            });
        }
        expressions.sort();
        expressions.dedup();
        Ok(Self {
            match_labels,
            expressions,
        })
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// Canonical, kubectl-like text: `app=web,tier in (a,b),!legacy`; `{}` for the empty selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.expressions {
            let values = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match r.operator {
                Operator::In => format!("{} in ({values})", r.key),
                Operator::NotIn => format!("{} notin ({values})", r.key),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().copied().collect()
    }

    fn k8s_labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    #[test]
    fn selector_semantics() {
        struct Case {
            name: &'static str,
            match_labels: &'static [(&'static str, &'static str)],
            exprs: Vec<LabelSelectorRequirement>,
            labels: &'static [(&'static str, &'static str)],
            want: bool,
        }
        let cases = vec![
            Case {
                name: "empty selector matches anything",
                match_labels: &[],
                exprs: vec![],
                labels: &[("a", "b")],
                want: true,
            },
            Case {
                name: "empty selector matches no labels",
                match_labels: &[],
                exprs: vec![],
                labels: &[],
                want: true,
            },
            Case {
                name: "matchLabels equal",
                match_labels: &[("app", "web")],
                exprs: vec![],
                labels: &[("app", "web"), ("x", "y")],
                want: true,
            },
            Case {
                name: "matchLabels different value",
                match_labels: &[("app", "web")],
                exprs: vec![],
                labels: &[("app", "db")],
                want: false,
            },
            Case {
                name: "matchLabels missing key",
                match_labels: &[("app", "web")],
                exprs: vec![],
                labels: &[],
                want: false,
            },
            Case {
                name: "matchLabels all must hold",
                match_labels: &[("app", "web"), ("tier", "fe")],
                exprs: vec![],
                labels: &[("app", "web")],
                want: false,
            },
            Case {
                name: "In matches listed value",
                match_labels: &[],
                exprs: vec![expr("env", "In", &["a", "b"])],
                labels: &[("env", "b")],
                want: true,
            },
            Case {
                name: "In rejects other value",
                match_labels: &[],
                exprs: vec![expr("env", "In", &["a", "b"])],
                labels: &[("env", "c")],
                want: false,
            },
            Case {
                name: "In rejects missing key",
                match_labels: &[],
                exprs: vec![expr("env", "In", &["a"])],
                labels: &[],
                want: false,
            },
            Case {
                name: "NotIn matches other value",
                match_labels: &[],
                exprs: vec![expr("app", "NotIn", &["untrusted"])],
                labels: &[("app", "web")],
                want: true,
            },
            Case {
                name: "NotIn matches missing key",
                match_labels: &[],
                exprs: vec![expr("app", "NotIn", &["untrusted"])],
                labels: &[],
                want: true,
            },
            Case {
                name: "NotIn rejects listed value",
                match_labels: &[],
                exprs: vec![expr("app", "NotIn", &["untrusted"])],
                labels: &[("app", "untrusted")],
                want: false,
            },
            Case {
                name: "Exists matches any value",
                match_labels: &[],
                exprs: vec![expr("k", "Exists", &[])],
                labels: &[("k", "")],
                want: true,
            },
            Case {
                name: "Exists rejects missing",
                match_labels: &[],
                exprs: vec![expr("k", "Exists", &[])],
                labels: &[],
                want: false,
            },
            Case {
                name: "DoesNotExist matches missing",
                match_labels: &[],
                exprs: vec![expr("k", "DoesNotExist", &[])],
                labels: &[("j", "x")],
                want: true,
            },
            Case {
                name: "DoesNotExist rejects present",
                match_labels: &[],
                exprs: vec![expr("k", "DoesNotExist", &[])],
                labels: &[("k", "x")],
                want: false,
            },
            Case {
                name: "labels and expressions are ANDed",
                match_labels: &[("app", "web")],
                exprs: vec![expr("env", "In", &["prod"])],
                labels: &[("app", "web"), ("env", "dev")],
                want: false,
            },
        ];
        for c in cases {
            let sel = LabelSelector {
                match_labels: Some(k8s_labels(c.match_labels)),
                match_expressions: Some(c.exprs),
            };
            let sel = Selector::try_from_k8s(&sel).expect(c.name);
            assert_eq!(sel.matches(&labels(c.labels)), c.want, "case: {}", c.name);
        }
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        let cases = [
            (
                "unknown operator",
                expr("a", "Equals", &["x"]),
                "unknown operator \"Equals\"",
            ),
            (
                "In without values",
                expr("a", "In", &[]),
                "needs at least one value",
            ),
            (
                "NotIn without values",
                expr("a", "NotIn", &[]),
                "needs at least one value",
            ),
            (
                "Exists with values",
                expr("a", "Exists", &["x"]),
                "takes no values",
            ),
            (
                "DoesNotExist with values",
                expr("a", "DoesNotExist", &["x"]),
                "takes no values",
            ),
            ("empty key", expr("", "Exists", &[]), "empty label key"),
        ];
        for (name, e, want) in cases {
            let sel = LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e]),
            };
            let err = Selector::try_from_k8s(&sel).expect_err(name).to_string();
            assert!(err.contains(want), "case {name}: {err}");
        }
    }

    #[test]
    fn display_is_canonical() {
        let sel = LabelSelector {
            match_labels: Some(k8s_labels(&[("tier", "fe"), ("app", "web")])),
            match_expressions: Some(vec![
                expr("legacy", "DoesNotExist", &[]),
                expr("env", "In", &["prod", "dev"]),
            ]),
        };
        let s = Selector::try_from_k8s(&sel).expect("valid");
        assert_eq!(s.to_string(), "app=web,tier=fe,env in (dev,prod),!legacy");
        assert_eq!(Selector::everything().to_string(), "{}");
    }
}
