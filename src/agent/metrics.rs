//! Prometheus metrics for the agent, kept in one explicit [`Registry`].
//!
//! The module exists so that every other part of the agent reports through a few small, typed
//! methods instead of touching `prometheus` directly. That keeps two properties easy to review
//! in one place:
//!
//! * **Bounded label sets.** Labels are either closed enums defined here ([`Direction`],
//!   [`SyncKind`], [`SyncFailure`], [`WatchResource`], [`SuppressReason`]) or the identity of a
//!   pod on this node. Never an IP, a port or a rule index: those would let traffic patterns
//!   blow up the number of series.
//! * **No globals.** The registry is owned by [`Metrics`]; tests build as many as they like and
//!   the admin server scrapes the one it is handed.
//!
//! Drop counters are special: the kernel counts dropped packets and bytes, and the agent only
//! reads those counters back. They are therefore exposed by a custom collector that publishes
//! the latest snapshot as-is, rather than by a `CounterVec` that could only be incremented.
//! Rule hit counters are read back the same way. Their `rule` label is a rule index (or a
//! ClusterNetworkPolicy rule name), bounded by the rules of the policies that apply to pods
//! of this node: a series exists while its rule does, and goes with it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Prefix shared by every metric name, so the agent's series are easy to find and never
/// collide with other exporters scraped by the same Prometheus.
const PREFIX: &str = "kube_nftpolicy";

/// Errors from building or encoding the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be defined or registered (invalid name or duplicate registration).
    #[error("defining metric {name}")]
    Define {
        name: &'static str,
        #[source]
        source: prometheus::Error,
    },
    /// The gathered metrics could not be rendered in the text exposition format.
    #[error("encoding metrics in the Prometheus text format")]
    Encode(#[source] prometheus::Error),
}

/// Traffic direction relative to the pod a policy protects (the crate-wide type).
pub use crate::model::policy::Direction;

/// Whether a dataplane sync rewrote the whole table or only the parts that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncKind {
    Full,
    Partial,
}

impl SyncKind {
    pub const ALL: [SyncKind; 2] = [SyncKind::Full, SyncKind::Partial];

    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

pub use crate::cluster::WatchResource;
pub use crate::kernel::dataplane::SyncFailure;

/// Why a denied-connection log line was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuppressReason {
    /// The same flow was logged recently.
    Dedup,
    /// The log rate limit was exhausted.
    RateLimit,
}

impl SuppressReason {
    pub const ALL: [SuppressReason; 2] = [SuppressReason::Dedup, SuppressReason::RateLimit];

    pub fn as_str(self) -> &'static str {
        match self {
            SuppressReason::Dedup => "dedup",
            SuppressReason::RateLimit => "rate_limit",
        }
    }
}

/// The counter of one ClusterNetworkPolicy Deny rule, read back from the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CnpDenyCounter {
    /// The ClusterNetworkPolicy.
    pub policy: String,
    /// `admin` or `baseline`.
    pub tier: String,
    /// Direction.
    pub direction: Direction,
    /// The rule's name, or `spec.<direction>[i]`.
    pub rule: String,
    /// Absolute packet count.
    pub packets: u64,
    /// Absolute byte count.
    pub bytes: u64,
}

/// What one policy is on this node (`policy_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStateKind {
    /// It selects (applies to) a local pod, and its rules are in the kernel.
    Enforced,
    /// It selects a local pod, but part of it is invalid: that part fails closed.
    Invalid,
    /// It selects no pod of this node, so this node's table has nothing of it.
    SelectsNothingHere,
    /// Annotated `kube-nftpolicy.io/staged: "true"`: not enforced, only measured.
    Staged,
}

impl PolicyStateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyStateKind::Enforced => "enforced",
            PolicyStateKind::Invalid => "invalid",
            PolicyStateKind::SelectsNothingHere => "selects_nothing_here",
            PolicyStateKind::Staged => "staged",
        }
    }
}

/// One policy and its state on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyState {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// The NetworkPolicy's namespace; empty for a ClusterNetworkPolicy.
    pub namespace: String,
    /// Its name.
    pub policy: String,
    /// Its state.
    pub state: PolicyStateKind,
}

/// One rule hit counter read back from the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHitCounter {
    /// The rule.
    pub owner: CounterOwner,
    /// Absolute packet count (first packets of new connections) since the counter was made.
    pub packets: u64,
}

pub use crate::engine::ruleset::CounterOwner;

/// One kernel drop counter read back from the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCounter {
    pub namespace: String,
    pub pod: String,
    pub direction: Direction,
    /// Absolute packet count since the counter was created, not a delta.
    pub packets: u64,
    /// Absolute byte count since the counter was created, not a delta.
    pub bytes: u64,
}

/// Size of the programmed ruleset, reported after each successful sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RulesetStats {
    /// Local pods selected by at least one ingress policy.
    pub policed_ingress: usize,
    /// Local pods selected by at least one egress policy.
    pub policed_egress: usize,
    /// Policies that select at least one local pod.
    pub policies: usize,
    pub set_elements: usize,
    pub chains: usize,
}

/// Every metric the agent exports, registered in a registry it owns.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    drops: DropCollector,
    cnp_denies: DropCollector,
    rule_hits: DropCollector,
    cnp_rule_hits: DropCollector,
    staged_would_deny: DropCollector,
    staged_would_allow: DropCollector,
    cnp_staged_would_deny: DropCollector,
    cnp_staged_would_allow: DropCollector,
    cnp_staged_unmeasured: DropCollector,
    /// Audit mode: the terminal counters count would-drops, exported under their own names.
    audit: std::sync::atomic::AtomicBool,
    would_drops: DropCollector,
    cnp_would_denies: DropCollector,
    unknown_address_would_drops: IntCounterVec,
    policy_states: DropCollector,
    /// The last rule hit and Deny read-backs, for `/debug/rule-hits`.
    rule_hits_seen: Mutex<Vec<RuleHitCounter>>,
    cnp_denies_seen: Mutex<Vec<CnpDenyCounter>>,
    sync_duration: HistogramVec,
    sync_failures: IntCounterVec,
    last_sync: Gauge,
    programming_latency: Histogram,
    policed_pods: IntGaugeVec,
    policies: IntGauge,
    set_elements: IntGauge,
    chains: IntGauge,
    watch_events: IntCounterVec,
    drift_repairs: IntCounter,
    denied_connections: IntCounterVec,
    denied_log_suppressed: IntCounterVec,
    unknown_address_drops: IntCounterVec,
    /// Last kernel value of each direction's unknown-address counter, to export increments.
    unknown_address_seen: Mutex<[u64; 2]>,
    conntrack_removed: IntCounterVec,
}

/// Why the conntrack pass removed a flow (`reason` of `conntrack_flows_removed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowRemoval {
    /// The new rules no longer allow it.
    Denied,
    /// One end was a local pod that is gone (its address is unknown now).
    PodGone,
}

impl FlowRemoval {
    pub const ALL: [FlowRemoval; 2] = [FlowRemoval::Denied, FlowRemoval::PodGone];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowRemoval::Denied => "denied",
            FlowRemoval::PodGone => "pod_gone",
        }
    }
}

impl Metrics {
    /// Builds every metric and registers it in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();

        let drops = DropCollector::new(
            "dropped_packets_total",
            "dropped_bytes_total",
            "by policy, by local pod and direction",
            &DROP_LABELS,
        )?;
        let cnp_denies = DropCollector::new(
            "cnp_denied_packets_total",
            "cnp_denied_bytes_total",
            "by ClusterNetworkPolicy Deny rules, by policy, tier, direction and rule",
            &CNP_DENY_LABELS,
        )?;
        registry
            .register(Box::new(cnp_denies.clone()))
            .map_err(define("cnp_denied_packets_total"))?;
        let rule_hits = DropCollector::single(
            "rule_hits_total",
            "New connections (their first packets) accepted by each rule of each NetworkPolicy that selects a pod of this node.",
            &RULE_HIT_LABELS,
        )?;
        registry
            .register(Box::new(rule_hits.clone()))
            .map_err(define("rule_hits_total"))?;
        let cnp_rule_hits = DropCollector::single(
            "cnp_rule_hits_total",
            "New connections (their first packets) matched by each Accept or Pass rule of each ClusterNetworkPolicy that applies to a pod of this node.",
            &CNP_RULE_HIT_LABELS,
        )?;
        registry
            .register(Box::new(cnp_rule_hits.clone()))
            .map_err(define("cnp_rule_hits_total"))?;
        let staged_would_deny = DropCollector::single(
            "staged_would_deny_total",
            "New connections of pods of this node that a staged NetworkPolicy would deny (allowed today), by staged policy and direction.",
            &STAGED_LABELS,
        )?;
        registry
            .register(Box::new(staged_would_deny.clone()))
            .map_err(define("staged_would_deny_total"))?;
        let staged_would_allow = DropCollector::single(
            "staged_would_allow_total",
            "New connections of pods of this node that a staged NetworkPolicy would allow (denied today), by staged policy and direction.",
            &STAGED_LABELS,
        )?;
        registry
            .register(Box::new(staged_would_allow.clone()))
            .map_err(define("staged_would_allow_total"))?;
        let cnp_staged_would_deny = DropCollector::single(
            "cnp_staged_would_deny_total",
            "New connections of pods of this node that a staged ClusterNetworkPolicy would deny (allowed today), by staged policy, tier and direction.",
            &CNP_STAGED_LABELS,
        )?;
        registry
            .register(Box::new(cnp_staged_would_deny.clone()))
            .map_err(define("cnp_staged_would_deny_total"))?;
        let cnp_staged_would_allow = DropCollector::single(
            "cnp_staged_would_allow_total",
            "New connections of pods of this node that a staged ClusterNetworkPolicy would allow (denied today), by staged policy, tier and direction.",
            &CNP_STAGED_LABELS,
        )?;
        registry
            .register(Box::new(cnp_staged_would_allow.clone()))
            .map_err(define("cnp_staged_would_allow_total"))?;
        let mut cnp_staged_unmeasured = DropCollector::single(
            "cnp_staged_unmeasured",
            "Staged ClusterNetworkPolicies selecting a pod of this node that are not measured because the mark field (--staged-mark-mask) has no slot left: 1 per policy.",
            &["policy"],
        )?;
        cnp_staged_unmeasured.gauge = true;
        registry
            .register(Box::new(cnp_staged_unmeasured.clone()))
            .map_err(define("cnp_staged_unmeasured"))?;
        registry
            .register(Box::new(drops.clone()))
            .map_err(define("dropped_packets_total"))?;
        let mut policy_states = DropCollector::single(
            "policy_state",
            "Each NetworkPolicy and ClusterNetworkPolicy in the cluster, as this node sees it: 1 for its state (enforced, invalid: fails closed, selects_nothing_here).",
            &POLICY_STATE_LABELS,
        )?;
        policy_states.gauge = true;
        registry
            .register(Box::new(policy_states.clone()))
            .map_err(define("policy_state"))?;
        let would_drops = DropCollector::single(
            "would_drop_packets_total",
            "Audit mode: packets that policy would have dropped (and that were accepted), by local pod and direction.",
            &DROP_LABELS,
        )?;
        registry
            .register(Box::new(would_drops.clone()))
            .map_err(define("would_drop_packets_total"))?;
        let cnp_would_denies = DropCollector::single(
            "cnp_would_deny_packets_total",
            "Audit mode: packets that ClusterNetworkPolicy Deny rules would have dropped (and that were accepted), by policy, tier, direction and rule.",
            &CNP_DENY_LABELS,
        )?;
        registry
            .register(Box::new(cnp_would_denies.clone()))
            .map_err(define("cnp_would_deny_packets_total"))?;
        let unknown_address_would_drops = IntCounterVec::new(
            Opts::new(
                name("unknown_address_would_drops_total"),
                "Audit mode: packets of addresses in this node's pod ranges that are not known pods, which would have been dropped (and were accepted), by direction.",
            ),
            &["direction"],
        )
        .map_err(define("unknown_address_would_drops_total"))?;
        registry
            .register(Box::new(unknown_address_would_drops.clone()))
            .map_err(define("unknown_address_would_drops_total"))?;

        // Syncs range from a few set elements (about a millisecond) to a full rewrite of a
        // busy node's table; 1 ms doubling 16 times reaches ~33 s.
        let sync_duration = HistogramVec::new(
            HistogramOpts::new(
                name("sync_duration_seconds"),
                "Time taken to program one ruleset sync into the kernel, by kind.",
            )
            .buckets(exp_buckets("sync_duration_seconds", 16)?),
            &["kind"],
        )
        .map_err(define("sync_duration_seconds"))?;
        let sync_failures = IntCounterVec::new(
            Opts::new(
                name("sync_failures_total"),
                "Ruleset syncs that failed, by reason.",
            ),
            &["reason"],
        )
        .map_err(define("sync_failures_total"))?;
        let last_sync = Gauge::new(
            name("last_sync_timestamp_seconds"),
            "Unix time of the last successful ruleset sync.",
        )
        .map_err(define("last_sync_timestamp_seconds"))?;
        // Measured from the watch event to the kernel holding the change, so it includes
        // debouncing and queueing; 1 ms doubling 17 times reaches ~66 s.
        let programming_latency = Histogram::with_opts(
            HistogramOpts::new(
                name("network_programming_duration_seconds"),
                "Time from the watch event that caused a change until the kernel enforced it.",
            )
            .buckets(exp_buckets("network_programming_duration_seconds", 17)?),
        )
        .map_err(define("network_programming_duration_seconds"))?;

        let policed_pods = IntGaugeVec::new(
            Opts::new(
                name("policed_pods"),
                "Local pods selected by at least one policy, by direction.",
            ),
            &["direction"],
        )
        .map_err(define("policed_pods"))?;
        let policies = IntGauge::new(
            name("policies"),
            "NetworkPolicies that select at least one pod on this node.",
        )
        .map_err(define("policies"))?;
        let set_elements = IntGauge::new(
            name("set_elements"),
            "Elements across all nftables sets and maps in the agent's table.",
        )
        .map_err(define("set_elements"))?;
        let chains = IntGauge::new(name("chains"), "Chains in the agent's nftables table.")
            .map_err(define("chains"))?;

        let watch_events = IntCounterVec::new(
            Opts::new(
                name("watch_events_total"),
                "Watch events received from the API server, by resource.",
            ),
            &["resource"],
        )
        .map_err(define("watch_events_total"))?;
        let drift_repairs = IntCounter::new(
            name("drift_repairs_total"),
            "Times the kernel ruleset had drifted from the desired state and was rewritten.",
        )
        .map_err(define("drift_repairs_total"))?;
        let denied_connections = IntCounterVec::new(
            Opts::new(
                name("denied_connections_total"),
                "Connection attempts denied by policy, by local pod and direction.",
            ),
            &["namespace", "pod", "direction"],
        )
        .map_err(define("denied_connections_total"))?;
        let denied_log_suppressed = IntCounterVec::new(
            Opts::new(
                name("denied_log_suppressed_total"),
                "Denied-connection log lines not written, by reason.",
            ),
            &["reason"],
        )
        .map_err(define("denied_log_suppressed_total"))?;

        let unknown_address_drops = IntCounterVec::new(
            Opts::new(
                name("unknown_address_drops_total"),
                "Packets dropped because an address in this node's pod ranges is not a known pod, by direction.",
            ),
            &["direction"],
        )
        .map_err(define("unknown_address_drops_total"))?;
        let conntrack_removed = IntCounterVec::new(
            Opts::new(
                name("conntrack_flows_removed_total"),
                "Established flows removed from connection tracking after a policy change (--enforce-established), by reason.",
            ),
            &["reason"],
        )
        .map_err(define("conntrack_flows_removed_total"))?;

        let collectors: [(&'static str, Box<dyn Collector>); 14] = [
            (
                "unknown_address_drops_total",
                Box::new(unknown_address_drops.clone()),
            ),
            (
                "conntrack_flows_removed_total",
                Box::new(conntrack_removed.clone()),
            ),
            ("sync_duration_seconds", Box::new(sync_duration.clone())),
            ("sync_failures_total", Box::new(sync_failures.clone())),
            ("last_sync_timestamp_seconds", Box::new(last_sync.clone())),
            (
                "network_programming_duration_seconds",
                Box::new(programming_latency.clone()),
            ),
            ("policed_pods", Box::new(policed_pods.clone())),
            ("policies", Box::new(policies.clone())),
            ("set_elements", Box::new(set_elements.clone())),
            ("chains", Box::new(chains.clone())),
            ("watch_events_total", Box::new(watch_events.clone())),
            ("drift_repairs_total", Box::new(drift_repairs.clone())),
            (
                "denied_connections_total",
                Box::new(denied_connections.clone()),
            ),
            (
                "denied_log_suppressed_total",
                Box::new(denied_log_suppressed.clone()),
            ),
        ];
        for (metric, collector) in collectors {
            registry.register(collector).map_err(define(metric))?;
        }

        // Label values from a closed enum are created up front, so every series exists at
        // zero from the first scrape: `rate()` and absence alerts then behave from the start
        // instead of only after the first failure.
        for kind in SyncKind::ALL {
            sync_duration.with_label_values(&[kind.as_str()]);
        }
        for reason in SyncFailure::ALL {
            sync_failures.with_label_values(&[reason.as_label()]);
        }
        for direction in Direction::ALL {
            policed_pods.with_label_values(&[direction.as_str()]);
        }
        for resource in WatchResource::ALL {
            watch_events.with_label_values(&[resource.as_str()]);
        }
        for reason in SuppressReason::ALL {
            denied_log_suppressed.with_label_values(&[reason.as_str()]);
        }
        for direction in Direction::ALL {
            unknown_address_drops.with_label_values(&[direction.as_str()]);
        }
        for reason in FlowRemoval::ALL {
            conntrack_removed.with_label_values(&[reason.as_str()]);
        }

        Ok(Metrics {
            registry,
            drops,
            cnp_denies,
            rule_hits,
            cnp_rule_hits,
            staged_would_deny,
            staged_would_allow,
            cnp_staged_would_deny,
            cnp_staged_would_allow,
            cnp_staged_unmeasured,
            policy_states,
            rule_hits_seen: Mutex::default(),
            audit: std::sync::atomic::AtomicBool::new(false),
            would_drops,
            cnp_would_denies,
            unknown_address_would_drops,
            cnp_denies_seen: Mutex::default(),
            sync_duration,
            sync_failures,
            last_sync,
            programming_latency,
            policed_pods,
            policies,
            set_elements,
            chains,
            watch_events,
            drift_repairs,
            denied_connections,
            denied_log_suppressed,
            unknown_address_drops,
            unknown_address_seen: Mutex::new([0, 0]),
            conntrack_removed,
        })
    }

    /// Publish the kernel's unknown-address drop counters (packets, by direction). The
    /// kernel keeps the totals; this exports the increase since the last read, and starts
    /// over if the kernel's count went down (the rule was removed and added again).
    /// Audit mode (`--audit`): the terminal counters read back from now on are would-drops,
    /// exported as `would_drop_packets_total`, `cnp_would_deny_packets_total` and
    /// `unknown_address_would_drops_total` instead of the drop families.
    pub fn set_audit(&self, on: bool) {
        self.audit.store(on, std::sync::atomic::Ordering::Relaxed);
        if on {
            // Like the drop family, both directions exist from the start.
            for d in Direction::ALL {
                self.unknown_address_would_drops
                    .with_label_values(&[d.as_str()])
                    .inc_by(0);
            }
        }
    }

    fn audit(&self) -> bool {
        self.audit.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_unknown_address_drops(&self, counters: &[(Direction, u64)]) {
        let mut seen = self
            .unknown_address_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (direction, packets) in counters {
            let i = usize::from(*direction == Direction::Egress);
            let delta = packets.checked_sub(seen[i]).unwrap_or(*packets);
            seen[i] = *packets;
            if delta > 0 {
                let family = if self.audit() {
                    &self.unknown_address_would_drops
                } else {
                    &self.unknown_address_drops
                };
                family
                    .with_label_values(&[direction.as_str()])
                    .inc_by(delta);
            }
        }
    }

    /// Count flows the conntrack pass removed.
    pub fn conntrack_flows_removed(&self, reason: FlowRemoval, flows: u64) {
        self.conntrack_removed
            .with_label_values(&[reason.as_str()])
            .inc_by(flows);
    }

    /// The registry behind these metrics, for callers that need to add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Replaces the exported drop counters with the latest read-back from the kernel.
    ///
    /// Pods missing from `counters` lose their series. Entries for the same pod and direction
    /// are summed, because the dataplane may keep more than one drop counter per pod.
    pub fn set_drop_counters(&self, counters: Vec<DropCounter>) {
        let family = if self.audit() {
            &self.would_drops
        } else {
            &self.drops
        };
        family.replace(counters.into_iter().map(|c| {
            (
                vec![c.direction.as_str().to_owned(), c.namespace, c.pod],
                c.packets,
                c.bytes,
            )
        }));
    }

    /// Replaces the exported ClusterNetworkPolicy Deny counters (one per Deny rule) with the
    /// latest read-back from the kernel.
    pub fn set_cnp_deny_counters(&self, counters: Vec<CnpDenyCounter>) {
        self.cnp_denies_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_from(&counters);
        let family = if self.audit() {
            &self.cnp_would_denies
        } else {
            &self.cnp_denies
        };
        family.replace(counters.into_iter().map(|c| {
            (
                vec![c.direction.as_str().to_owned(), c.policy, c.rule, c.tier],
                c.packets,
                c.bytes,
            )
        }));
    }

    /// Replaces the exported rule hit counters with the latest read-back from the kernel;
    /// rules missing from `hits` lose their series.
    pub fn set_rule_hits(&self, hits: Vec<RuleHitCounter>) {
        self.rule_hits
            .replace(hits.iter().filter_map(|h| match &h.owner {
                CounterOwner::Policy {
                    namespace,
                    policy,
                    direction,
                    rule,
                } => Some((
                    vec![
                        (*direction).to_owned(),
                        namespace.clone(),
                        policy.clone(),
                        format!("spec.{direction}[{rule}]"),
                    ],
                    h.packets,
                    0,
                )),
                CounterOwner::Cnp { .. }
                | CounterOwner::Staged { .. }
                | CounterOwner::StagedCnp { .. } => None,
            }));
        self.cnp_rule_hits
            .replace(hits.iter().filter_map(|h| match &h.owner {
                CounterOwner::Cnp {
                    policy,
                    tier,
                    direction,
                    rule,
                    action,
                } => Some((
                    vec![
                        (*action).to_owned(),
                        (*direction).to_owned(),
                        policy.clone(),
                        rule.clone(),
                        (*tier).to_owned(),
                    ],
                    h.packets,
                    0,
                )),
                CounterOwner::Policy { .. }
                | CounterOwner::Staged { .. }
                | CounterOwner::StagedCnp { .. } => None,
            }));
        for (collector, wanted) in [
            (&self.staged_would_deny, "would-deny"),
            (&self.staged_would_allow, "would-allow"),
        ] {
            collector.replace(hits.iter().filter_map(|h| match &h.owner {
                CounterOwner::Staged {
                    namespace,
                    policy,
                    direction,
                    change,
                } if *change == wanted => Some((
                    vec![(*direction).to_owned(), namespace.clone(), policy.clone()],
                    h.packets,
                    0,
                )),
                _ => None,
            }));
        }
        for (collector, wanted) in [
            (&self.cnp_staged_would_deny, "would-deny"),
            (&self.cnp_staged_would_allow, "would-allow"),
        ] {
            collector.replace(hits.iter().filter_map(|h| match &h.owner {
                CounterOwner::StagedCnp {
                    policy,
                    tier,
                    direction,
                    change,
                } if *change == wanted => Some((
                    vec![(*direction).to_owned(), policy.clone(), (*tier).to_owned()],
                    h.packets,
                    0,
                )),
                _ => None,
            }));
        }
        *self
            .rule_hits_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = hits;
    }

    /// Replace the staged ClusterNetworkPolicies that have no slot in the mark field (after
    /// each compile).
    pub fn set_cnp_staged_unmeasured(&self, names: &[String]) {
        self.cnp_staged_unmeasured
            .replace(names.iter().map(|n| (vec![n.clone()], 1, 0)));
    }

    /// Replace the policy states (after each compile): one series per policy, at 1.
    pub fn set_policy_states(&self, states: &[PolicyState]) {
        self.policy_states.replace(states.iter().map(|p| {
            (
                vec![
                    p.kind.to_owned(),
                    p.namespace.clone(),
                    p.policy.clone(),
                    p.state.as_str().to_owned(),
                ],
                1,
                0,
            )
        }));
    }

    /// The rule hit counters of the last read-back, ClusterNetworkPolicy Deny rules included
    /// (as `Deny`), for `/debug/rule-hits`.
    pub fn rule_hits(&self) -> Vec<RuleHitCounter> {
        let mut out = self
            .rule_hits_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        out.extend(
            self.cnp_denies_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|c| RuleHitCounter {
                    owner: CounterOwner::Cnp {
                        policy: c.policy.clone(),
                        tier: if c.tier == "admin" {
                            "admin"
                        } else {
                            "baseline"
                        },
                        direction: c.direction.as_str(),
                        rule: c.rule.clone(),
                        action: "Deny",
                    },
                    packets: c.packets,
                }),
        );
        out.sort_by(|a, b| a.owner.cmp(&b.owner));
        out
    }

    pub fn observe_sync(&self, kind: SyncKind, duration: Duration) {
        self.sync_duration
            .with_label_values(&[kind.as_str()])
            .observe(duration.as_secs_f64());
    }

    pub fn sync_failed(&self, reason: SyncFailure) {
        self.sync_failures
            .with_label_values(&[reason.as_label()])
            .inc();
    }

    /// Records when the last successful sync finished.
    pub fn set_last_sync(&self, at: SystemTime) {
        match at.duration_since(UNIX_EPOCH) {
            Ok(since_epoch) => self.last_sync.set(since_epoch.as_secs_f64()),
            // A clock before 1970 is broken; keep the previous value rather than publish a
            // timestamp that would make "time since last sync" alerts meaningless.
            Err(_) => {
                tracing::warn!("system clock is before the Unix epoch; not updating last sync time")
            }
        }
    }

    /// Records the time from a watch event to the kernel enforcing the change it caused.
    pub fn observe_programming_latency(&self, latency: Duration) {
        self.programming_latency.observe(latency.as_secs_f64());
    }

    pub fn set_ruleset_stats(&self, stats: RulesetStats) {
        self.policed_pods
            .with_label_values(&[Direction::Ingress.as_str()])
            .set(gauge_value(stats.policed_ingress));
        self.policed_pods
            .with_label_values(&[Direction::Egress.as_str()])
            .set(gauge_value(stats.policed_egress));
        self.policies.set(gauge_value(stats.policies));
        self.set_elements.set(gauge_value(stats.set_elements));
        self.chains.set(gauge_value(stats.chains));
    }

    pub fn watch_event(&self, resource: WatchResource) {
        self.watch_events
            .with_label_values(&[resource.as_str()])
            .inc();
    }

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    /// Counts one denied connection attempt to or from a local pod.
    pub fn denied_connection(&self, namespace: &str, pod: &str, direction: Direction) {
        self.denied_connections
            .with_label_values(&[namespace, pod, direction.as_str()])
            .inc();
    }

    pub fn denied_log_suppressed(&self, reason: SuppressReason) {
        self.denied_log_suppressed
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Drops the per-pod series of a pod that left the node, so pod churn does not grow the
    /// number of series without bound. Drop counters need no call: they follow the snapshot.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        for direction in Direction::ALL {
            // An error only means the pod never had a denial in that direction.
            let _ =
                self.denied_connections
                    .remove_label_values(&[namespace, pod, direction.as_str()]);
        }
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn encode_text(&self) -> Result<String, MetricsError> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(MetricsError::Encode)
    }
}

fn name(suffix: &str) -> String {
    format!("{PREFIX}_{suffix}")
}

fn define(name: &'static str) -> impl FnOnce(prometheus::Error) -> MetricsError {
    move |source| MetricsError::Define { name, source }
}

/// `count` buckets starting at 1 ms and doubling each time.
fn exp_buckets(metric: &'static str, count: usize) -> Result<Vec<f64>, MetricsError> {
    prometheus::exponential_buckets(0.001, 2.0, count).map_err(define(metric))
}

/// Counts of things in one node's ruleset never approach `i64::MAX`; saturate rather than wrap
/// if that assumption is ever wrong.
fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Packets and bytes per label values (in the collector's label order).
type DropSnapshot = BTreeMap<Vec<String>, (u64, u64)>;

/// Exposes the latest kernel drop-counter snapshot as two counter families (packets, bytes).
///
/// Cloning shares the snapshot: one clone is registered in the registry, the other is kept to
/// replace the snapshot.
#[derive(Debug, Clone)]
struct DropCollector {
    descs: Vec<Desc>,
    /// Export as gauges (a state snapshot) rather than counters.
    gauge: bool,
    labels: &'static [&'static str],
    snapshot: Arc<Mutex<DropSnapshot>>,
}

/// In name order, as `prometheus`'s own vectors emit them, so every family in a scrape lists
/// its labels the same way.
const DROP_LABELS: [&str; 3] = ["direction", "namespace", "pod"];
/// Labels of the ClusterNetworkPolicy Deny counters, in name order. Bounded: one series per
/// Deny rule of a ClusterNetworkPolicy that applies to a pod of this node.
const CNP_DENY_LABELS: [&str; 4] = ["direction", "policy", "rule", "tier"];
/// Labels of the NetworkPolicy rule hit counters, in name order (`rule` is the rule's path,
/// `spec.ingress[i]`: a bare number would read like a port).
const STAGED_LABELS: [&str; 3] = ["direction", "namespace", "policy"];
const CNP_STAGED_LABELS: [&str; 3] = ["direction", "policy", "tier"];
const RULE_HIT_LABELS: [&str; 4] = ["direction", "namespace", "policy", "rule"];
/// Labels of the policy state gauge, in name order (`namespace` is empty for a
/// ClusterNetworkPolicy).
const POLICY_STATE_LABELS: [&str; 4] = ["kind", "namespace", "policy", "state"];
/// Labels of the ClusterNetworkPolicy rule hit counters, in name order.
const CNP_RULE_HIT_LABELS: [&str; 5] = ["action", "direction", "policy", "rule", "tier"];

impl DropCollector {
    fn new(
        packets_name: &'static str,
        bytes_name: &'static str,
        what: &str,
        labels: &'static [&'static str],
    ) -> Result<Self, MetricsError> {
        let names: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let packets = Desc::new(
            name(packets_name),
            format!("Packets dropped {what}."),
            names.clone(),
            Default::default(),
        )
        .map_err(define(packets_name))?;
        let bytes = Desc::new(
            name(bytes_name),
            format!("Bytes dropped {what}."),
            names,
            Default::default(),
        )
        .map_err(define(bytes_name))?;
        Ok(DropCollector {
            descs: vec![packets, bytes],
            gauge: false,
            labels,
            snapshot: Arc::default(),
        })
    }

    /// One counter family (`name`, with `help` as is) rather than packets and bytes.
    fn single(
        name_suffix: &'static str,
        help: &str,
        labels: &'static [&'static str],
    ) -> Result<Self, MetricsError> {
        let names: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let desc = Desc::new(
            name(name_suffix),
            help.to_owned(),
            names,
            Default::default(),
        )
        .map_err(define(name_suffix))?;
        Ok(DropCollector {
            descs: vec![desc],
            gauge: false,
            labels,
            snapshot: Arc::default(),
        })
    }

    fn replace(&self, counters: impl IntoIterator<Item = (Vec<String>, u64, u64)>) {
        let mut snapshot = DropSnapshot::new();
        for (labels, packets, bytes) in counters {
            let entry = snapshot.entry(labels).or_default();
            entry.0 = entry.0.saturating_add(packets);
            entry.1 = entry.1.saturating_add(bytes);
        }
        // A panic elsewhere while holding the lock cannot leave a half-written map (the map is
        // swapped in whole), so a poisoned lock is safe to keep using.
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }
}

impl Collector for DropCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        let mut packets = Vec::with_capacity(snapshot.len());
        let mut bytes = Vec::with_capacity(snapshot.len());
        for (values, (p, b)) in snapshot.iter() {
            // Counters are f64 in the exposition format; precision loss starts at 2^53, far
            // beyond what a single drop counter reaches.
            packets.push(counter_metric(self.labels, values, *p as f64, self.gauge));
            bytes.push(counter_metric(self.labels, values, *b as f64, self.gauge));
        }
        drop(snapshot);

        self.descs
            .iter()
            .zip([packets, bytes])
            .map(|(desc, metrics)| {
                let mut family = MetricFamily::default();
                family.set_name(desc.fq_name.clone());
                family.set_help(desc.help.clone());
                family.set_field_type(if self.gauge {
                    MetricType::GAUGE
                } else {
                    MetricType::COUNTER
                });
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

fn counter_metric(names: &[&str], values: &[String], value: f64, gauge: bool) -> Metric {
    let labels = names
        .iter()
        .zip(values)
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value(value.clone());
            pair
        })
        .collect();
    let mut metric = Metric::from_label(labels);
    if gauge {
        let mut g = prometheus::proto::Gauge::default();
        g.set_value(value);
        metric.set_gauge(g);
    } else {
        let mut counter = Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
    }
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_counter(namespace: &str, pod: &str, direction: Direction, packets: u64) -> DropCounter {
        DropCounter {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            direction,
            packets,
            bytes: packets * 100,
        }
    }

    #[test]
    fn duplicate_drop_counters_are_summed_not_repeated() {
        let metrics = Metrics::new().expect("metrics");
        metrics.set_drop_counters(vec![
            drop_counter("ns", "a", Direction::Ingress, 2),
            drop_counter("ns", "a", Direction::Ingress, 3),
        ]);
        let text = metrics.encode_text().expect("encode");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kube_nftpolicy_dropped_packets_total{"))
            .collect();
        assert_eq!(
            series,
            [
                "kube_nftpolicy_dropped_packets_total{direction=\"ingress\",namespace=\"ns\",pod=\"a\"} 5"
            ]
        );
    }

    #[test]
    fn forget_pod_removes_denied_series_only_for_that_pod() {
        let metrics = Metrics::new().expect("metrics");
        metrics.denied_connection("ns", "a", Direction::Ingress);
        metrics.denied_connection("ns", "a", Direction::Egress);
        metrics.denied_connection("ns", "b", Direction::Egress);
        metrics.forget_pod("ns", "a");
        // Forgetting a pod twice, or one never seen, is harmless.
        metrics.forget_pod("ns", "a");
        metrics.forget_pod("other", "never");
        let text = metrics.encode_text().expect("encode");
        assert!(!text.contains("pod=\"a\""), "{text}");
        assert!(text.contains("pod=\"b\""), "{text}");
    }

    #[test]
    fn closed_label_sets_are_exported_at_zero_from_the_start() {
        let metrics = Metrics::new().expect("metrics");
        let text = metrics.encode_text().expect("encode");
        for reason in SyncFailure::ALL {
            let line = format!(
                "kube_nftpolicy_sync_failures_total{{reason=\"{}\"}} 0",
                reason.as_label()
            );
            assert!(text.contains(&line), "missing {line}");
        }
    }

    #[test]
    fn histogram_buckets_span_the_documented_ranges() {
        let sync = exp_buckets("x", 16).expect("buckets");
        assert_eq!(sync.first().copied(), Some(0.001));
        assert!(sync.last().is_some_and(|b| (30.0..35.0).contains(b)));
        let programming = exp_buckets("x", 17).expect("buckets");
        assert!(programming.last().is_some_and(|b| (60.0..70.0).contains(b)));
    }
}
