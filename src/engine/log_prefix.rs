//! The `log prefix` format that ties a kernel log message back to the isolated pod.
//!
//! The compiler writes it into every drop rule that logs (`knp:<direction>:<ns>/<pod>`, and
//! `knpc:<direction>:<tier>:<index>:<name>` for a ClusterNetworkPolicy Deny rule,
//! `knps:<direction>:<would-allow|would-deny>:<ns>/<policy>` for a staged policy's count,
//! `knpsc:<direction>:<would-allow|would-deny>:<tier>:<name>` for a staged
//! ClusterNetworkPolicy's) and the
//! agent's deny log parses it from each NFLOG packet, so both sides use this one module.
//! It lives in the engine because the compiler must not depend on the agent. Pure: the prefix
//! is bounded to what the kernel accepts, and names that do not fit are abbreviated with a
//! stable hash so distinct pods keep distinct prefixes.

/// First field of every prefix the agent generates, so foreign log rules are told apart.
pub const PREFIX_TAG: &str = "knp";
/// nftables (and the kernel's `NF_LOG_PREFIXLEN`) allow 127 bytes plus the terminating NUL.
pub const MAX_PREFIX_LEN: usize = 127;
/// Marks a name that was shortened or sanitised; `~` cannot occur in Kubernetes names.
const ABBREVIATION_MARK: char = '~';
/// Hex digits of the hash that keeps abbreviated names distinct.
const HASH_LEN: usize = 8;
/// Shortest encoding of any name: the mark and the hash.
const MIN_ENCODED_LEN: usize = 1 + HASH_LEN;
/// Namespaces are DNS-1123 labels. Capping them here guarantees the pod name keeps most of
/// the remaining room even if a caller passes something longer.
const MAX_NAMESPACE_LEN: usize = 63;

/// Which side of the isolated pod the denied traffic was on (the crate-wide direction).
pub use crate::model::policy::Direction as DenyDirection;

/// What a log prefix says: the direction and the isolated pod.
///
/// `namespace` and `pod` are the names as encoded in the prefix. Names that did not fit (or
/// contained characters outside `[a-z0-9.-]`) are abbreviated to `<head>~<hash>`; use
/// [`DenyTarget::refers_to`] to match such a target against full names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyTarget {
    pub direction: DenyDirection,
    pub namespace: String,
    pub pod: String,
}

impl DenyTarget {
    /// The prefix this target was parsed from.
    pub fn prefix(&self) -> String {
        format!(
            "{PREFIX_TAG}:{}:{}/{}",
            self.direction, self.namespace, self.pod
        )
    }

    /// Whether either name was abbreviated and so differs from the real name.
    pub fn is_abbreviated(&self) -> bool {
        self.namespace.contains(ABBREVIATION_MARK) || self.pod.contains(ABBREVIATION_MARK)
    }

    /// Whether this target names `namespace/pod`. Encoding is deterministic, so re-encoding
    /// the full names reproduces the same prefix exactly when they are the named pod (up to
    /// hash collisions among names sharing the kept head).
    pub fn refers_to(&self, namespace: &str, pod: &str) -> bool {
        encode_prefix(self.direction, namespace, pod) == self.prefix()
    }
}

/// First field of the prefix of a ClusterNetworkPolicy Deny rule.
pub const CNP_PREFIX_TAG: &str = "knpc";

/// What a ClusterNetworkPolicy Deny rule's prefix says: the direction, the policy's tier, the
/// rule's index in its direction's list, and the policy (encoded like a pod name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CnpDenyTarget {
    pub direction: DenyDirection,
    pub tier: crate::model::Tier,
    pub index: usize,
    pub policy: String,
}

/// Either kind of drop the agent logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// A pod's isolation (NetworkPolicy).
    Pod(DenyTarget),
    /// A ClusterNetworkPolicy Deny rule.
    Cnp(CnpDenyTarget),
    /// A staged policy's would-deny / would-allow count (nothing was dropped by it).
    Staged(StagedTarget),
    /// A staged ClusterNetworkPolicy's would-deny / would-allow count.
    StagedCnp(StagedCnpTarget),
}

impl LogTarget {
    /// The direction of the denied traffic, seen from the local pod.
    pub fn direction(&self) -> DenyDirection {
        match self {
            LogTarget::Pod(t) => t.direction,
            LogTarget::Cnp(t) => t.direction,
            LogTarget::Staged(t) => t.direction,
            LogTarget::StagedCnp(t) => t.direction,
        }
    }
}

/// The `log prefix` of ClusterNetworkPolicy `policy`'s Deny rule `index` of `direction`:
/// `knpc:<ingress|egress>:<admin|baseline>:<index>:<policy>`, at most [`MAX_PREFIX_LEN`] bytes
/// (a policy name that does not fit is abbreviated as in [`encode_prefix`]).
pub fn encode_cnp_prefix(
    direction: DenyDirection,
    tier: crate::model::Tier,
    index: usize,
    policy: &str,
) -> String {
    let head = format!("{CNP_PREFIX_TAG}:{direction}:{}:{index}:", tier.as_str());
    let room = MAX_PREFIX_LEN
        .saturating_sub(head.len())
        .max(MIN_ENCODED_LEN);
    format!("{head}{}", encode_name(policy, room))
}

/// First field of the prefix of a staged policy's would-deny / would-allow count.
pub const STAGED_PREFIX_TAG: &str = "knps";

/// What a staged policy's prefix says: the direction, the verdict change and the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedTarget {
    pub direction: DenyDirection,
    /// `true`: denied today, allowed with the policy; `false`: the reverse.
    pub would_allow: bool,
    /// Namespace and name, encoded like a pod's.
    pub namespace: String,
    pub policy: String,
}

/// The `log prefix` of staged NetworkPolicy `namespace/policy`'s count in `direction`:
/// `knps:<ingress|egress>:<would-allow|would-deny>:<namespace>/<policy>`, at most
/// [`MAX_PREFIX_LEN`] bytes (names that do not fit are abbreviated as in [`encode_prefix`]).
/// The pods come from the packet's addresses, as for a drop.
pub fn encode_staged_prefix(
    direction: DenyDirection,
    would_allow: bool,
    namespace: &str,
    policy: &str,
) -> String {
    let change = change_text(would_allow);
    let head = format!("{STAGED_PREFIX_TAG}:{direction}:{change}:");
    let room = MAX_PREFIX_LEN - head.len() - 1;
    let namespace = encode_name(namespace, MAX_NAMESPACE_LEN.min(room - MIN_ENCODED_LEN));
    let policy = encode_name(policy, room - namespace.len());
    format!("{head}{namespace}/{policy}")
}

/// A direction as prefixes write it.
fn direction_of(text: &str) -> Option<DenyDirection> {
    DenyDirection::ALL.into_iter().find(|d| d.as_str() == text)
}

/// The verdict change of a staged policy as prefixes write it.
fn change_text(would_allow: bool) -> &'static str {
    if would_allow {
        "would-allow"
    } else {
        "would-deny"
    }
}

/// [`change_text`] read back.
fn would_allow_of(text: &str) -> Option<bool> {
    [true, false].into_iter().find(|w| change_text(*w) == text)
}

/// Read a prefix made by [`encode_staged_prefix`] back; `None` when it is not one.
pub fn parse_staged_prefix(prefix: &str) -> Option<StagedTarget> {
    let rest = prefix.strip_prefix(STAGED_PREFIX_TAG)?.strip_prefix(':')?;
    let mut parts = rest.splitn(3, ':');
    let direction = direction_of(parts.next()?)?;
    let would_allow = would_allow_of(parts.next()?)?;
    let (namespace, policy) = parts.next()?.split_once('/')?;
    (is_encoded_name(namespace) && is_encoded_name(policy)).then(|| StagedTarget {
        direction,
        would_allow,
        namespace: namespace.to_string(),
        policy: policy.to_string(),
    })
}

/// First field of the prefix of a staged ClusterNetworkPolicy's would-deny / would-allow count.
pub const STAGED_CNP_PREFIX_TAG: &str = "knpsc";

/// What a staged ClusterNetworkPolicy's prefix says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedCnpTarget {
    pub direction: DenyDirection,
    /// `true`: denied today, allowed with the policy; `false`: the reverse.
    pub would_allow: bool,
    pub tier: crate::model::Tier,
    /// The policy, encoded like a pod name.
    pub policy: String,
}

/// The `log prefix` of staged ClusterNetworkPolicy `policy`'s count in `direction`:
/// `knpsc:<ingress|egress>:<would-allow|would-deny>:<admin|baseline>:<policy>`, at most
/// [`MAX_PREFIX_LEN`] bytes (a name that does not fit is abbreviated as in [`encode_prefix`]).
pub fn encode_staged_cnp_prefix(
    direction: DenyDirection,
    would_allow: bool,
    tier: crate::model::Tier,
    policy: &str,
) -> String {
    let change = change_text(would_allow);
    let head = format!(
        "{STAGED_CNP_PREFIX_TAG}:{direction}:{change}:{}:",
        tier.as_str()
    );
    let room = MAX_PREFIX_LEN
        .saturating_sub(head.len())
        .max(MIN_ENCODED_LEN);
    format!("{head}{}", encode_name(policy, room))
}

/// Read a prefix made by [`encode_staged_cnp_prefix`] back; `None` when it is not one.
pub fn parse_staged_cnp_prefix(prefix: &str) -> Option<StagedCnpTarget> {
    let rest = prefix
        .strip_prefix(STAGED_CNP_PREFIX_TAG)?
        .strip_prefix(':')?;
    let mut parts = rest.splitn(4, ':');
    let direction = direction_of(parts.next()?)?;
    let would_allow = would_allow_of(parts.next()?)?;
    let tier = match parts.next()? {
        "admin" => crate::model::Tier::Admin,
        "baseline" => crate::model::Tier::Baseline,
        _ => return None,
    };
    let policy = parts.next().filter(|p| is_encoded_name(p))?;
    Some(StagedCnpTarget {
        direction,
        would_allow,
        tier,
        policy: policy.to_string(),
    })
}

/// Read either kind of prefix back.
pub fn parse_log_prefix(prefix: &str) -> Result<LogTarget, PrefixError> {
    if prefix.starts_with(STAGED_CNP_PREFIX_TAG)
        && prefix[STAGED_CNP_PREFIX_TAG.len()..].starts_with(':')
    {
        return parse_staged_cnp_prefix(prefix)
            .map(LogTarget::StagedCnp)
            .ok_or_else(|| PrefixError::InvalidName {
                prefix: prefix.to_string(),
                what: "staged ClusterNetworkPolicy",
            });
    }
    if prefix.starts_with(STAGED_PREFIX_TAG) && prefix[STAGED_PREFIX_TAG.len()..].starts_with(':') {
        return parse_staged_prefix(prefix)
            .map(LogTarget::Staged)
            .ok_or_else(|| PrefixError::InvalidName {
                prefix: prefix.to_string(),
                what: "staged policy",
            });
    }
    let Some(rest) = prefix
        .strip_prefix(CNP_PREFIX_TAG)
        .and_then(|r| r.strip_prefix(':'))
    else {
        return parse_prefix(prefix).map(LogTarget::Pod);
    };
    let owned = || prefix.to_string();
    let mut parts = rest.splitn(4, ':');
    let direction = match parts.next() {
        Some("ingress") => DenyDirection::Ingress,
        Some("egress") => DenyDirection::Egress,
        Some(other) => {
            return Err(PrefixError::UnknownDirection {
                prefix: owned(),
                direction: other.to_string(),
            });
        }
        None => return Err(PrefixError::MissingDirection { prefix: owned() }),
    };
    let tier = match parts.next() {
        Some("admin") => crate::model::Tier::Admin,
        Some("baseline") => crate::model::Tier::Baseline,
        _ => {
            return Err(PrefixError::InvalidName {
                prefix: owned(),
                what: "tier",
            });
        }
    };
    let index = parts
        .next()
        .and_then(|i| i.parse::<usize>().ok())
        .ok_or_else(|| PrefixError::InvalidName {
            prefix: owned(),
            what: "rule index",
        })?;
    let policy =
        parts
            .next()
            .filter(|p| is_encoded_name(p))
            .ok_or_else(|| PrefixError::InvalidName {
                prefix: owned(),
                what: "policy",
            })?;
    Ok(LogTarget::Cnp(CnpDenyTarget {
        direction,
        tier,
        index,
        policy: policy.to_string(),
    }))
}

/// Why a log prefix is not one of the agent's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("log prefix {prefix:?} does not start with \"{PREFIX_TAG}:\"")]
    NotOurs { prefix: String },
    #[error("log prefix {prefix:?} has no direction field")]
    MissingDirection { prefix: String },
    #[error("log prefix {prefix:?} has unknown direction {direction:?}")]
    UnknownDirection { prefix: String, direction: String },
    #[error("log prefix {prefix:?} has no namespace/pod separator")]
    MissingSeparator { prefix: String },
    #[error("log prefix {prefix:?} has an invalid {what} name")]
    InvalidName { prefix: String, what: &'static str },
}

/// The `log prefix` for drops of `direction` traffic of `namespace/pod`.
///
/// The format is `knp:<ingress|egress>:<namespace>/<pod>`, at most [`MAX_PREFIX_LEN`] bytes.
/// Each name appears verbatim when it is a well-formed Kubernetes name that fits; otherwise it
/// becomes as much of it as fits (other characters replaced by `_`) followed by `~` and 8 hex
/// digits of a hash of the full name. Neither `~`, `_`, `/` nor `:` occur in Kubernetes names,
/// so the result always parses back, and only `[a-z0-9._~:/-]` is ever emitted, which needs no
/// escaping inside the nft rule's quoted string.
pub fn encode_prefix(direction: DenyDirection, namespace: &str, pod: &str) -> String {
    let head = format!("{PREFIX_TAG}:{direction}:");
    // Room for both names and the '/' between them; at least 105 bytes, so both minimum
    // encodings always fit.
    let room = MAX_PREFIX_LEN - head.len() - 1;
    let namespace = encode_name(namespace, MAX_NAMESPACE_LEN.min(room - MIN_ENCODED_LEN));
    let pod = encode_name(pod, room - namespace.len());
    format!("{head}{namespace}/{pod}")
}

/// Read a prefix made by [`encode_prefix`] back into its parts.
pub fn parse_prefix(prefix: &str) -> Result<DenyTarget, PrefixError> {
    let owned = || prefix.to_string();
    let rest = prefix
        .strip_prefix(PREFIX_TAG)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(|| PrefixError::NotOurs { prefix: owned() })?;
    let (direction, names) = rest
        .split_once(':')
        .ok_or_else(|| PrefixError::MissingDirection { prefix: owned() })?;
    let direction = direction_of(direction).ok_or_else(|| PrefixError::UnknownDirection {
        prefix: owned(),
        direction: direction.to_string(),
    })?;
    let (namespace, pod) = names
        .split_once('/')
        .ok_or_else(|| PrefixError::MissingSeparator { prefix: owned() })?;
    for (what, name) in [("namespace", namespace), ("pod", pod)] {
        if !is_encoded_name(name) {
            return Err(PrefixError::InvalidName {
                prefix: owned(),
                what,
            });
        }
    }
    Ok(DenyTarget {
        direction,
        namespace: namespace.to_string(),
        pod: pod.to_string(),
    })
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
}

/// A name that can appear verbatim: non-empty, only characters Kubernetes allows.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(is_name_byte)
}

fn is_encoded_name(name: &str) -> bool {
    match name.split_once(ABBREVIATION_MARK) {
        None => is_plain_name(name),
        Some((head, hash)) => {
            head.bytes().all(|b| is_name_byte(b) || b == b'_')
                && hash.len() == HASH_LEN
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
    }
}

/// `name` in at most `budget` bytes (`budget >= MIN_ENCODED_LEN`), as described at
/// [`encode_prefix`].
fn encode_name(name: &str, budget: usize) -> String {
    if is_plain_name(name) && name.len() <= budget {
        return name.to_string();
    }
    let keep = budget.saturating_sub(MIN_ENCODED_LEN);
    let head: String = name
        .chars()
        .take(keep)
        .map(|c| {
            if c.is_ascii() && is_name_byte(c as u8) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{head}{ABBREVIATION_MARK}{:08x}", fnv1a(name.as_bytes()))
}

/// 32-bit FNV-1a: stable across releases and platforms, which a prefix baked into rules and
/// log lines needs (std's hasher is randomly keyed).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_network_policy_prefixes_round_trip_and_fit() {
        let long = format!("{}-x", "p".repeat(250));
        for (name, policy, tier, index) in [
            (
                "short",
                "deny-metadata".to_string(),
                crate::model::Tier::Admin,
                0,
            ),
            (
                "long name abbreviated",
                long.clone(),
                crate::model::Tier::Baseline,
                24,
            ),
        ] {
            let p = encode_cnp_prefix(DenyDirection::Egress, tier, index, &policy);
            assert!(p.len() <= MAX_PREFIX_LEN, "{name}: {} bytes", p.len());
            match parse_log_prefix(&p) {
                Ok(LogTarget::Cnp(t)) => {
                    assert_eq!(
                        (t.direction, t.tier, t.index),
                        (DenyDirection::Egress, tier, index),
                        "{name}"
                    );
                    assert_eq!(
                        t.policy == policy,
                        policy.len() < 100,
                        "{name}: {}",
                        t.policy
                    );
                }
                other => panic!("{name}: {p:?} parsed as {other:?}"),
            }
        }
        assert_eq!(
            encode_cnp_prefix(
                DenyDirection::Ingress,
                crate::model::Tier::Admin,
                1,
                "guard"
            ),
            "knpc:ingress:admin:1:guard"
        );
        assert!(matches!(
            parse_log_prefix("knp:ingress:shop/web"),
            Ok(LogTarget::Pod(_))
        ));
        assert!(parse_log_prefix("knpc:ingress:admin:x:guard").is_err());
        assert!(parse_log_prefix("knpc:ingress:other:1:guard").is_err());
    }

    #[test]
    fn prefix_round_trip() {
        let long_ns = "n".repeat(63);
        let long_pod = format!("{}-x", "p".repeat(251));
        let cases: Vec<(&str, DenyDirection, String, String, Option<&str>)> = vec![
            (
                "short names are verbatim",
                DenyDirection::Ingress,
                "prod".into(),
                "web-0".into(),
                Some("knp:ingress:prod/web-0"),
            ),
            (
                "dots and dashes are verbatim",
                DenyDirection::Egress,
                "a-b".into(),
                "web.v1-7f9c".into(),
                Some("knp:egress:a-b/web.v1-7f9c"),
            ),
            (
                "longest names that fit are verbatim",
                DenyDirection::Ingress,
                long_ns.clone(),
                "q".repeat(127 - 13 - 63),
                None,
            ),
            (
                "max-length namespace and pod are abbreviated",
                DenyDirection::Ingress,
                long_ns.clone(),
                long_pod.clone(),
                None,
            ),
            (
                "egress has one byte more room",
                DenyDirection::Egress,
                long_ns.clone(),
                long_pod.clone(),
                None,
            ),
            (
                "over-long namespace is abbreviated too",
                DenyDirection::Egress,
                "m".repeat(300),
                long_pod.clone(),
                None,
            ),
            (
                "invalid characters are sanitised and hashed",
                DenyDirection::Ingress,
                "Prod".into(),
                "we\"b/x:y".into(),
                None,
            ),
            (
                "non-ascii",
                DenyDirection::Ingress,
                "ns".into(),
                "pöd-ünïcode".into(),
                None,
            ),
            (
                "empty names",
                DenyDirection::Egress,
                String::new(),
                String::new(),
                None,
            ),
        ];
        for (name, direction, ns, pod, want_exact) in cases {
            let prefix = encode_prefix(direction, &ns, &pod);
            assert!(
                prefix.len() <= MAX_PREFIX_LEN,
                "case {name:?}: {} bytes",
                prefix.len()
            );
            assert!(
                prefix
                    .bytes()
                    .all(|b| is_name_byte(b) || b"_~:/".contains(&b)),
                "case {name:?}: unsafe byte in {prefix:?}"
            );
            if let Some(want) = want_exact {
                assert_eq!(prefix, want, "case {name:?}");
            }
            let target = parse_prefix(&prefix).unwrap_or_else(|e| panic!("case {name:?}: {e}"));
            assert_eq!(target.direction, direction, "case {name:?}");
            assert_eq!(target.prefix(), prefix, "case {name:?}");
            assert!(target.refers_to(&ns, &pod), "case {name:?}");
            assert!(!target.refers_to(&ns, &format!("{pod}z")), "case {name:?}");
            let verbatim = target.namespace == ns && target.pod == pod;
            assert_eq!(target.is_abbreviated(), !verbatim, "case {name:?}");
        }

        // Abbreviated names that share the kept head still differ by their hash.
        let a = encode_prefix(DenyDirection::Ingress, &long_ns, &format!("{long_pod}-a"));
        let b = encode_prefix(DenyDirection::Ingress, &long_ns, &format!("{long_pod}-b"));
        assert_ne!(a, b);
        assert_eq!(a.len(), MAX_PREFIX_LEN);
    }

    #[test]
    fn parse_prefix_errors() {
        let cases: Vec<(&str, &str, PrefixError)> = vec![
            ("empty", "", PrefixError::NotOurs { prefix: "".into() }),
            (
                "foreign tag",
                "kube:ingress:a/b",
                PrefixError::NotOurs {
                    prefix: "kube:ingress:a/b".into(),
                },
            ),
            (
                "tag without colon",
                "knpingress:a/b",
                PrefixError::NotOurs {
                    prefix: "knpingress:a/b".into(),
                },
            ),
            (
                "no direction",
                "knp:a/b",
                PrefixError::MissingDirection {
                    prefix: "knp:a/b".into(),
                },
            ),
            (
                "unknown direction",
                "knp:Ingress:a/b",
                PrefixError::UnknownDirection {
                    prefix: "knp:Ingress:a/b".into(),
                    direction: "Ingress".into(),
                },
            ),
            (
                "no separator",
                "knp:egress:ab",
                PrefixError::MissingSeparator {
                    prefix: "knp:egress:ab".into(),
                },
            ),
            (
                "empty namespace",
                "knp:egress:/b",
                PrefixError::InvalidName {
                    prefix: "knp:egress:/b".into(),
                    what: "namespace",
                },
            ),
            (
                "empty pod",
                "knp:egress:a/",
                PrefixError::InvalidName {
                    prefix: "knp:egress:a/".into(),
                    what: "pod",
                },
            ),
            (
                "second slash",
                "knp:egress:a/b/c",
                PrefixError::InvalidName {
                    prefix: "knp:egress:a/b/c".into(),
                    what: "pod",
                },
            ),
            (
                "short hash",
                "knp:egress:a/b~1234",
                PrefixError::InvalidName {
                    prefix: "knp:egress:a/b~1234".into(),
                    what: "pod",
                },
            ),
            (
                "uppercase hash",
                "knp:egress:a~DEADBEEF/b",
                PrefixError::InvalidName {
                    prefix: "knp:egress:a~DEADBEEF/b".into(),
                    what: "namespace",
                },
            ),
            (
                "underscore without hash",
                "knp:egress:a_b/c",
                PrefixError::InvalidName {
                    prefix: "knp:egress:a_b/c".into(),
                    what: "namespace",
                },
            ),
        ];
        for (name, prefix, want) in cases {
            assert_eq!(parse_prefix(prefix), Err(want), "case {name:?}");
        }
    }

    #[test]
    fn staged_prefixes_round_trip_and_fit() {
        let cases = [
            (DenyDirection::Ingress, true, "default", "allow-web"),
            (DenyDirection::Egress, false, "prod", "lock-down"),
            (
                DenyDirection::Egress,
                true,
                &"n".repeat(63),
                &"p".repeat(253),
            ),
        ];
        for (d, would_allow, ns, policy) in cases {
            let prefix = encode_staged_prefix(d, would_allow, ns, policy);
            assert!(prefix.len() <= MAX_PREFIX_LEN, "{prefix}");
            let Ok(LogTarget::Staged(t)) = parse_log_prefix(&prefix) else {
                panic!("{prefix} parses as staged");
            };
            assert_eq!((t.direction, t.would_allow), (d, would_allow), "{prefix}");
            if ns.len() + policy.len() < 90 {
                assert_eq!((t.namespace.as_str(), t.policy.as_str()), (ns, policy));
            }
        }
        assert!(parse_log_prefix("knps:ingress:would-maybe:a/b").is_err());
        assert!(parse_log_prefix("knps:ingress:would-deny:ab").is_err());
    }

    #[test]
    fn staged_cnp_prefixes_round_trip_and_fit() {
        use crate::model::Tier;
        let long = "c".repeat(253);
        let cases = [
            (
                "admin ingress",
                DenyDirection::Ingress,
                true,
                Tier::Admin,
                "no-other",
            ),
            (
                "baseline egress",
                DenyDirection::Egress,
                false,
                Tier::Baseline,
                "base",
            ),
            (
                "long name",
                DenyDirection::Egress,
                true,
                Tier::Admin,
                long.as_str(),
            ),
        ];
        for (name, d, would_allow, tier, policy) in cases {
            let prefix = encode_staged_cnp_prefix(d, would_allow, tier, policy);
            assert!(prefix.len() <= MAX_PREFIX_LEN, "case {name}: {prefix}");
            let Ok(LogTarget::StagedCnp(t)) = parse_log_prefix(&prefix) else {
                panic!("case {name}: {prefix} parses as staged ClusterNetworkPolicy");
            };
            assert_eq!(
                (t.direction, t.would_allow, t.tier),
                (d, would_allow, tier),
                "case {name}"
            );
            if policy.len() < 90 {
                assert_eq!(t.policy, policy, "case {name}");
            } else {
                assert!(t.policy.contains('~'), "case {name}: abbreviated");
            }
        }
        for bad in [
            "knpsc:ingress:would-maybe:admin:a",
            "knpsc:ingress:would-deny:middle:a",
            "knpsc:ingress:would-deny:admin:",
            "knpsc:sideways:would-deny:admin:a",
        ] {
            assert!(parse_log_prefix(bad).is_err(), "{bad}");
        }
    }
}
