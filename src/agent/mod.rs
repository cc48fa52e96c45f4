//! The agent: the `run` loop that wires the cluster edge and the kernel edge to the engine.
//!
//! sources → index → coalesced syncs → kernel, plus metrics, health, counters and the
//! denied-connection log. This module is the loop itself; its parts are
//! - [`admin`]: the HTTP answers (`/healthz`, `/readyz`, `/metrics`, `/debug/explain`);
//! - [`metrics`]: the Prometheus registry with bounded labels;
//! - [`denylog`]: which logged packets become "denied connection" lines (dedup, rate limit);
//! - [`memory`]: the allocator settings that keep resident memory near what is held.
//!
//! Safety rules this module enforces (DESIGN.md, "Programming the kernel"):
//! - nothing is written before Pods, Namespaces, NetworkPolicies and Nodes have all been listed
//!   once;
//! - bursts of changes coalesce into one sync, and syncs are rate-bounded;
//! - a failed sync keeps the previous ruleset (the transaction is atomic) and is retried,
//!   as a full sync, with backoff;
//! - losing the API server changes nothing in the kernel: the last ruleset stays in force;
//! - on shutdown the rules stay in place.

pub mod admin;
pub mod denylog;
pub mod established;
pub mod memory;
pub mod metrics;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use crate::cluster::IndexSink;
use crate::cluster::watch::InitialList;
use crate::engine::compile::{CompileOptions, UnknownAddresses};
use crate::engine::evaluate::may_deny_more;
use crate::engine::incremental::{NodeCompiler, UpdateKind};
use crate::engine::index::Index;
use crate::engine::resolve::NodePolicy;
use crate::kernel::dataplane::{Dataplane, TerminalCounters};
use crate::kernel::nft::exec::Nft;
use crate::kernel::nft::transaction::Kind;
use admin::{Health, LiveSnapshot};
use denylog::{DenyLogConfig, DenyLogger, Verdict};
use metrics::{
    CnpDenyCounter, DropCounter, FlowRemoval, Metrics, PolicyState, PolicyStateKind,
    RuleHitCounter, RulesetStats, SuppressReason, SyncKind, WatchResource,
};

/// The most coalescing windows a sync waits for a burst to end.
pub const COALESCE_WINDOWS: u32 = 10;

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node this agent enforces for.
    pub node: String,
    /// Where the cluster state comes from.
    pub source: Source,
    /// `/metrics`, `/healthz`, `/readyz`, `/debug/explain`.
    pub metrics_addr: SocketAddr,
    /// Serve `/debug/explain` (it shows pod names, labels and policies).
    pub debug_explain: bool,
    /// NFLOG group for denied-connection logging (`None` = off).
    pub log_group: Option<u16>,
    /// Wait this long after a change for more changes before syncing (repeated while
    /// changes keep arriving, up to [`COALESCE_WINDOWS`] times).
    pub coalesce: Duration,
    /// At least this much time between two syncs.
    pub min_sync_interval: Duration,
    /// How often to read the kernel back and repair drift.
    pub resync_interval: Duration,
    /// How often to force a full sync even without drift.
    pub full_sync_interval: Duration,
    /// How often to read drop counters for metrics.
    pub counters_interval: Duration,
    /// While the ClusterNetworkPolicy CRD is not installed, how often to ask again.
    pub crd_poll: Duration,
    /// The nft binary.
    pub nft: Nft,
    /// This node's pod ranges (`--pod-cidr`); empty = those of its Node object.
    pub pod_cidrs: Vec<crate::model::Cidr>,
    /// What happens to unknown addresses in the pod ranges.
    pub unknown_addresses: UnknownAddresses,
    /// Remove denied established flows from conntrack after syncs.
    pub enforce_established: bool,
    /// Audit mode: nothing is dropped; every drop is counted (and logged) as a would-drop.
    pub audit: bool,
    /// The `meta mark` bits that measure staged ClusterNetworkPolicies (`--staged-mark-mask`).
    pub staged_mark: crate::engine::compile::StagedMarkMask,
}

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The Kubernetes API (in-cluster config, or this kubeconfig file).
    Kubernetes {
        /// Path to a kubeconfig; `None` = infer (in-cluster, then `~/.kube/config`).
        kubeconfig: Option<PathBuf>,
        /// How the watchers list.
        initial_list: InitialList,
    },
    /// Manifest files, re-read when they change.
    Manifests {
        /// File or directory.
        path: PathBuf,
        /// How often to look for changes.
        poll: Duration,
    },
}

/// State shared by the source tasks and the sync loop. Locks are never held across `.await`.
pub struct Shared {
    index: Mutex<Index>,
    changed: Notify,
    /// When the oldest change not yet in the kernel happened (for programming latency).
    pending_since: Mutex<Option<Instant>>,
    listed: [AtomicBool; WatchResource::ALL.len()],
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health for `/readyz`.
    pub health: Arc<Health>,
    /// The state of the last sync, for `/debug/explain`.
    pub live: Arc<LiveSnapshot>,
    /// Pod address → `namespace/name`, for the denied-connection log.
    pods_by_ip: RwLock<HashMap<IpAddr, String>>,
    /// `namespace/name` → isolating policies per direction, for the denied-connection log.
    isolation: RwLock<HashMap<(String, &'static str), Vec<String>>>,
    /// (ClusterNetworkPolicy, direction, rule index) → `spec.ingress[1] (name)`, for the
    /// denied-connection log of Deny rules.
    cnp_rules: RwLock<HashMap<(String, &'static str, usize), String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take enforcement down with it: the data is still valid.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// New shared state.
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            index: Mutex::new(Index::new()),
            changed: Notify::new(),
            pending_since: Mutex::new(None),
            listed: WatchResource::ALL.map(|_| AtomicBool::new(false)),
            metrics,
            health,
            live: Arc::new(LiveSnapshot::default()),
            pods_by_ip: RwLock::new(HashMap::new()),
            isolation: RwLock::new(HashMap::new()),
            cnp_rules: RwLock::new(HashMap::new()),
        }
    }

    fn all_listed(&self) -> bool {
        self.listed.iter().all(|b| b.load(Ordering::SeqCst))
    }
}

impl IndexSink for Shared {
    /// Change the index; wakes the sync loop if anything really changed.
    fn update(&self, f: impl FnOnce(&mut Index) -> bool) {
        let changed = f(&mut lock(&self.index));
        if changed {
            lock(&self.pending_since).get_or_insert_with(Instant::now);
            self.changed.notify_one();
        }
    }

    /// Record that one kind has completed its first list.
    fn mark_listed(&self, r: WatchResource) {
        let i = r.position();
        // Only the first completed list of a kind can unblock the sync loop.
        if !self.listed[i].swap(true, Ordering::SeqCst) {
            if self.all_listed() {
                self.health.mark_caches_synced();
            }
            self.changed.notify_one();
        }
    }

    fn watch_event(&self, kind: WatchResource) {
        self.metrics.watch_event(kind);
    }
}

/// Run until SIGTERM/SIGINT. Rules stay in the kernel afterwards.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    metrics.set_audit(config.audit);
    let health = Arc::new(Health::new(config.resync_interval * 3));
    let mut shared = Shared::new(metrics.clone(), health.clone());
    if !config.debug_explain {
        shared.live = Arc::new(LiveSnapshot::disabled());
    }
    if config.unknown_addresses == UnknownAddresses::Drop && !config.pod_cidrs.is_empty() {
        shared
            .live
            .set_pod_cidrs(&config.node, config.pod_cidrs.clone());
    }
    let shared = Arc::new(shared);

    let listener = admin::bind(config.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz, /debug/explain");
    let shutdown = Arc::new(Notify::new());
    let admin_shutdown = shutdown.clone();
    let admin_task = tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        health.clone(),
        shared.live.clone(),
        async move { admin_shutdown.notified().await },
    ));

    match &config.source {
        Source::Kubernetes {
            kubeconfig,
            initial_list,
        } => {
            let client = kube_client(kubeconfig.as_ref()).await?;
            crate::cluster::watch::spawn_all(&client, &shared, *initial_list, config.crd_poll);
        }
        Source::Manifests { path, poll } => {
            tokio::spawn(follow_manifests(path.clone(), *poll, shared.clone()));
        }
    }

    let dataplane = Arc::new(Mutex::new(Dataplane::new(config.nft.clone())));
    tokio::spawn(read_counters(
        config.counters_interval,
        dataplane.clone(),
        shared.clone(),
    ));
    if let Some(group) = config.log_group {
        let shared = shared.clone();
        let audit = config.audit;
        std::thread::Builder::new()
            .name("deny-log".into())
            .spawn(move || deny_log(group, shared, audit))?;
    }
    let sync = tokio::spawn(sync_loop(config.clone(), dataplane, shared.clone()));

    wait_for_signal().await;
    tracing::info!(
        "shutting down; the ruleset stays in force (use `kube-nftpolicy cleanup` to remove it)"
    );
    sync.abort();
    shutdown.notify_waiters();
    let _ = admin_task.await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A client from this kubeconfig file, or from the environment (in-cluster, then `~/.kube/config`).
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// The embedded source: re-read the manifests whenever their contents change. A load that
/// fails keeps the last good state (and so the last good ruleset).
async fn follow_manifests(path: PathBuf, poll: Duration, shared: Arc<Shared>) {
    let mut last: Option<Vec<(PathBuf, String)>> = None;
    loop {
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(
                move || -> Result<Vec<(PathBuf, String)>, crate::cluster::manifest::ManifestError> {
                    let mut out = Vec::new();
                    for f in crate::cluster::manifest::manifest_files(&path)? {
                        let text = std::fs::read_to_string(&f).map_err(|source| {
                            crate::cluster::manifest::ManifestError::Read {
                                path: f.clone(),
                                source,
                            }
                        })?;
                        out.push((f, text));
                    }
                    Ok(out)
                },
            )
            .await
        };
        match read {
            Ok(Ok(sources)) if last.as_ref() != Some(&sources) => {
                match crate::cluster::manifest::parse_sources(&sources) {
                    Ok(mut m) => {
                        for w in &m.warnings {
                            tracing::warn!("{w}");
                        }
                        tracing::info!(
                            path = %path.display(),
                            pods = m.pods.len(),
                            namespaces = m.namespaces.len(),
                            policies = m.policies.len(),
                            nodes = m.nodes.len(),
                            "manifests loaded"
                        );
                        shared.update(|idx| m.replace_in(idx));
                        for r in WatchResource::ALL {
                            shared.mark_listed(r);
                        }
                    }
                    Err(e) => tracing::error!("{e}; keeping the last good state"),
                }
                last = Some(sources);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("{e}; keeping the last good state"),
            Err(e) => tracing::error!("manifest reader failed: {e}"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// Every policy of the cluster and what it is on this node.
fn policy_states(np: &NodePolicy, idx: &crate::engine::index::Snapshot) -> Vec<PolicyState> {
    use crate::engine::resolve::ResolvedCnpMatch;
    let mut out = Vec::new();
    // Policy → invalid?, for the policies that select a local pod (one pass, not one per
    // policy of the cluster).
    let mut here: HashMap<&crate::model::ObjectKey, bool> = HashMap::new();
    for p in &np.policies {
        *here.entry(&p.policy).or_default() |= p.invalid.is_some();
    }
    let mut cnps_here: HashMap<&str, bool> = HashMap::new();
    for c in &np.cnps {
        let fails_closed = c.rules.iter().any(|r| {
            matches!(
                r.matches,
                ResolvedCnpMatch::Nothing(_) | ResolvedCnpMatch::Everything(_)
            )
        });
        *cnps_here.entry(c.name.as_str()).or_default() |= fails_closed;
    }
    let state_of = |found: Option<&bool>| match found {
        None => PolicyStateKind::SelectsNothingHere,
        Some(true) => PolicyStateKind::Invalid,
        Some(false) => PolicyStateKind::Enforced,
    };
    // A staged policy is `staged` on every node, whether or not it selects a pod here.
    for (key, policy) in idx.policies.iter() {
        let state = if policy.staged {
            PolicyStateKind::Staged
        } else {
            state_of(here.get(key))
        };
        out.push(PolicyState {
            kind: "NetworkPolicy",
            namespace: key.namespace.clone(),
            policy: key.name.clone(),
            state,
        });
    }
    for (name, cnp) in idx.cnps.iter() {
        let state = if cnp.staged {
            PolicyStateKind::Staged
        } else {
            state_of(cnps_here.get(name.as_str()))
        };
        out.push(PolicyState {
            kind: "ClusterNetworkPolicy",
            namespace: String::new(),
            policy: name.clone(),
            state,
        });
    }
    out
}

fn publish_attribution(shared: &Shared, np: &NodePolicy, idx: &crate::engine::index::Snapshot) {
    let mut by_ip = HashMap::new();
    for (key, pod) in idx.pods.iter() {
        if pod.is_policy_target() {
            for ip in &pod.ips {
                by_ip.insert(*ip, key.to_string());
            }
        }
    }
    let mut isolation = HashMap::new();
    for pod in &np.pods {
        for d in crate::model::policy::Direction::ALL {
            if let Some(p) = pod.isolated_by(d) {
                isolation.insert(
                    (pod.key.to_string(), d.as_str()),
                    p.iter().map(ToString::to_string).collect(),
                );
            }
        }
    }
    if let Ok(mut w) = shared.pods_by_ip.write() {
        *w = by_ip;
    }
    if let Ok(mut w) = shared.isolation.write() {
        *w = isolation;
    }
    let cnp_rules = np
        .cnps
        .iter()
        .flat_map(|c| {
            c.rules.iter().map(move |r| {
                (
                    (c.name.clone(), c.direction.as_str(), r.index),
                    r.label(c.direction),
                )
            })
        })
        .collect();
    if let Ok(mut w) = shared.cnp_rules.write() {
        *w = cnp_rules;
    }
}

/// What the rest of the loop needs to know about one compile + sync.
struct SyncSummary {
    update: UpdateKind,
    compile_time: Duration,
    generation: u64,
    stats: RulesetStats,
    /// Local pods under policy.
    policed: std::collections::BTreeSet<crate::model::ObjectKey>,
}

impl SyncSummary {
    fn of(nc: &NodeCompiler, update: UpdateKind, compile_time: Duration, generation: u64) -> Self {
        let np = nc.node_policy();
        let rs = nc.ruleset();
        Self {
            update,
            compile_time,
            generation,
            stats: RulesetStats {
                policed_ingress: np.pods.iter().filter(|p| p.ingress.is_some()).count(),
                policed_egress: np.pods.iter().filter(|p| p.egress.is_some()).count(),
                policies: np
                    .policies
                    .iter()
                    .map(|p| &p.policy)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                set_elements: rs.element_count(),
                chains: rs.chains.len(),
            },
            policed: np.pods.iter().map(|p| p.key.clone()).collect(),
        }
    }
}

async fn sync_loop(config: Config, dataplane: Arc<Mutex<Dataplane>>, shared: Arc<Shared>) {
    let opts = CompileOptions {
        log_group: config.log_group,
        pod_cidrs: config.pod_cidrs.clone(),
        unknown_addresses: config.unknown_addresses,
        audit: config.audit,
        staged_mark: config.staged_mark,
    };
    // The compiled state lives across syncs so most changes redo only what they touch.
    let compiler = Arc::new(Mutex::new(NodeCompiler::new(
        config.node.clone(),
        opts.clone(),
    )));
    let mut last_sync: Option<Instant> = None;
    let mut next_resync = Instant::now() + config.resync_interval;
    let mut next_full = Instant::now() + config.full_sync_interval;
    let mut backoff = Duration::from_millis(500);
    let mut retry_at: Option<Instant> = None;
    let mut waited_for_lists = false;
    // Local policed pods after the last successful sync, to forget the per-pod series of those
    // that leave.
    let mut policed: std::collections::BTreeSet<crate::model::ObjectKey> = Default::default();
    // Chains flushed by the last sync are deleted by a follow-up sync shortly after.
    let mut followup_at: Option<Instant> = None;
    let mut lists_just_completed = false;
    loop {
        // Until every kind has been listed once, only a change can matter: never touch the
        // kernel, and do not wake up on timers.
        if !shared.all_listed() {
            if !waited_for_lists {
                tracing::info!(
                    "waiting for the initial lists of pods, namespaces, policies and nodes before programming the kernel"
                );
                waited_for_lists = true;
            }
            shared.changed.notified().await;
            lists_just_completed = shared.all_listed();
            continue;
        }
        // Wait for a change, a retry, a follow-up, or the resync timer.
        let wake = [Some(next_resync), retry_at, followup_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_resync);
        let woke_by_change = std::mem::take(&mut lists_just_completed)
            || tokio::select! {
                _ = shared.changed.notified() => true,
                _ = tokio::time::sleep_until(wake.into()) => false,
            };
        followup_at = None;
        if woke_by_change {
            // Coalesce a burst: wait while changes keep arriving, one coalescing window at a
            // time, for at most COALESCE_WINDOWS of them (a GitOps apply of a hundred
            // objects lands in one sync, a lone change waits one window). Then keep syncs at
            // least min_sync_interval apart.
            let mut seen = lock(&shared.index).generation();
            for _ in 0..COALESCE_WINDOWS {
                tokio::time::sleep(config.coalesce).await;
                let now = lock(&shared.index).generation();
                if now == seen {
                    break;
                }
                seen = now;
            }
            if let Some(t) = last_sync {
                let since = t.elapsed();
                if since < config.min_sync_interval {
                    tokio::time::sleep(config.min_sync_interval - since).await;
                }
            }
        }
        let now = Instant::now();
        let periodic = now >= next_resync;
        if let Some(r) = retry_at {
            if now < r && !woke_by_change && !periodic {
                continue;
            }
        }

        let (snapshot, changes, changed_at) = {
            let mut idx = lock(&shared.index);
            let (snap, changes) = idx.snapshot_with_changes();
            (snap, changes, lock(&shared.pending_since).take())
        };
        // What /debug/explain answers from (a snapshot is a cheap, shared copy).
        shared.live.publish(Arc::new(snapshot.clone()));
        let dp = dataplane.clone();
        let nc = compiler.clone();
        let shared2 = shared.clone();
        let log_denied = config.log_group.is_some();
        let enforce_established = config.enforce_established;
        let force_full = now >= next_full;
        let result = tokio::task::spawn_blocking(move || {
            let mut nc = lock(&nc);
            let started = Instant::now();
            let generation = snapshot.generation;
            // The policy before this change: what it allowed that the new one may not, and
            // the local addresses that go (pods that went).
            let before = enforce_established.then(|| nc.node_policy().clone());
            let update = nc.update(snapshot, &changes);
            let compile_time = started.elapsed();
            let mut dp = lock(&dp);
            let mut drift = None;
            if periodic {
                match dp.check_drift() {
                    Ok(d) => drift = d,
                    Err(e) => {
                        tracing::warn!(error = %e, "drift check failed; forcing a full sync");
                        dp.request_full_sync();
                    }
                }
            }
            if force_full {
                dp.request_full_sync();
            }
            let out = dp.sync(nc.ruleset());
            drop(dp);
            if out.is_ok() {
                shared2
                    .metrics
                    .set_policy_states(&policy_states(nc.node_policy(), nc.snapshot()));
                shared2.metrics.set_cnp_staged_unmeasured(
                    &crate::engine::compile::unmeasured_staged_cnps(nc.node_policy(), nc.options()),
                );
            }
            if out.is_ok() && log_denied {
                // Only the denied-connection log reads the attribution tables.
                publish_attribution(&shared2, nc.node_policy(), nc.snapshot());
            }
            // After the kernel holds the new rules (never before: a flow deleted earlier
            // could be accepted again by the old ones), drop the flows they deny.
            // Only a sync that can deny something the last one allowed can leave a flow to
            // remove; remote pods starting (the common change) only grow peer sets.
            let established = match (&out, before) {
                (Ok(report), Some(before))
                    if report.kind.is_some() && may_deny_more(&before, nc.node_policy()) =>
                {
                    let np = nc.node_policy();
                    let gone = before
                        .local_addrs
                        .difference(&np.local_addrs)
                        .copied()
                        .collect();
                    Some(established::pass(np, &gone))
                }
                _ => None,
            };
            if update == UpdateKind::Full {
                // A full compile freed the previous ruleset and its transient indexes.
                memory::release_free_memory();
            }
            let summary = SyncSummary::of(&nc, update, compile_time, generation);
            (summary, drift, out, established)
        })
        .await;
        let Ok((summary, drift, out, established)) = result else {
            tracing::error!("sync task panicked; will retry with a full sync");
            lock(&dataplane).request_full_sync();
            // The compiler may have stopped half-way through an update: rebuild it.
            *lock(&compiler) = NodeCompiler::new(config.node.clone(), opts.clone());
            lock(&shared.index).mark_everything_changed();
            retry_at = Some(Instant::now() + backoff);
            continue;
        };
        if periodic {
            next_resync = Instant::now() + config.resync_interval;
        }
        if force_full {
            next_full = Instant::now() + config.full_sync_interval;
        }
        if let Some(d) = &drift {
            tracing::warn!(drift = %d, "kernel state drifted from the applied ruleset; repaired by a full sync");
            shared.metrics.drift_repaired();
        }
        last_sync = Some(Instant::now());
        match established {
            Some(Ok(pass)) => {
                shared
                    .metrics
                    .conntrack_flows_removed(FlowRemoval::Denied, pass.denied as u64);
                shared
                    .metrics
                    .conntrack_flows_removed(FlowRemoval::PodGone, pass.pod_gone as u64);
                if pass.denied + pass.pod_gone > 0 {
                    tracing::info!(
                        denied = pass.denied,
                        pod_gone = pass.pod_gone,
                        already_ended = pass.already_gone,
                        examined = pass.examined,
                        duration_ms = format!("{:.1}", pass.duration.as_secs_f64() * 1e3),
                        "removed established flows the new rules do not allow"
                    );
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "conntrack pass failed; established flows keep their old verdict until the next sync")
            }
            None => {}
        }
        match out {
            Ok(report) => {
                backoff = Duration::from_millis(500);
                retry_at = None;
                shared.health.record_sync_success(Instant::now());
                shared.metrics.set_last_sync(SystemTime::now());
                let kind = match report.kind {
                    Some(Kind::Full) => Some(SyncKind::Full),
                    Some(Kind::Partial) => Some(SyncKind::Partial),
                    None => None,
                };
                if let Some(k) = kind {
                    shared.metrics.observe_sync(k, report.duration);
                    if let Some(t) = changed_at {
                        shared.metrics.observe_programming_latency(t.elapsed());
                    }
                    tracing::info!(
                        kind = k.as_str(),
                        duration_ms = format!("{:.1}", report.duration.as_secs_f64() * 1e3),
                        compile = summary.update.as_str(),
                        compile_ms = format!("{:.2}", summary.compile_time.as_secs_f64() * 1e3),
                        bytes = report.script_bytes,
                        chains_written = report.chains_written,
                        element_changes = report.element_changes,
                        pods = summary.policed.len(),
                        generation = summary.generation,
                        "sync"
                    );
                }
                shared.metrics.set_ruleset_stats(summary.stats);
                if lock(&dataplane).pending_deletions() > 0 {
                    followup_at = Some(Instant::now() + Duration::from_secs(1));
                }
                let now_policed = summary.policed;
                for gone in policed.difference(&now_policed) {
                    // Series are labelled with the names as encoded in the log prefix.
                    for d in crate::model::policy::Direction::ALL {
                        let prefix = crate::engine::log_prefix::encode_prefix(
                            d,
                            &gone.namespace,
                            &gone.name,
                        );
                        if let Ok(t) = crate::engine::log_prefix::parse_prefix(&prefix) {
                            shared.metrics.forget_pod(&t.namespace, &t.pod);
                        }
                    }
                }
                policed = now_policed;
            }
            Err(e) => {
                shared.metrics.sync_failed(e.failure());
                shared.health.record_sync_failure();
                // The change is still pending.
                if let Some(t) = changed_at {
                    lock(&shared.pending_since).get_or_insert(t);
                }
                tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "sync failed; the previous ruleset stays in force");
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn read_counters(every: Duration, dataplane: Arc<Mutex<Dataplane>>, shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(every).await;
        let dp = dataplane.clone();
        let read = tokio::task::spawn_blocking(move || lock(&dp).counters()).await;
        match read {
            Ok(Ok(TerminalCounters {
                pods: counters,
                cnp_denies: denies,
                unknown,
                rule_hits,
            })) => {
                let hits: Vec<RuleHitCounter> = rule_hits
                    .into_iter()
                    .map(|h| RuleHitCounter {
                        owner: h.owner,
                        packets: h.counter.packets,
                    })
                    .collect();
                shared.metrics.set_rule_hits(hits);
                shared.metrics.set_drop_counters(
                    counters
                        .into_iter()
                        .map(|c| DropCounter {
                            namespace: c.namespace,
                            pod: c.pod,
                            direction: c.direction,
                            packets: c.counter.packets,
                            bytes: c.counter.bytes,
                        })
                        .collect(),
                );
                shared.metrics.set_cnp_deny_counters(
                    denies
                        .into_iter()
                        .map(|c| CnpDenyCounter {
                            policy: c.policy,
                            tier: c.tier.to_string(),
                            direction: c.direction,
                            rule: c.rule,
                            packets: c.counter.packets,
                            bytes: c.counter.bytes,
                        })
                        .collect(),
                );
                let unknown: Vec<_> = unknown.into_iter().map(|(d, c)| (d, c.packets)).collect();
                shared.metrics.set_unknown_address_drops(&unknown);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading drop counters failed"),
            Err(e) => tracing::warn!(error = %e, "counter reader panicked"),
        }
    }
}

/// Blocking: read the NFLOG group and write one line per denied new connection.
fn deny_log(group: u16, shared: Arc<Shared>, audit: bool) {
    let mut logger = DenyLogger::new(DenyLogConfig::default());
    let mut socket = loop {
        match crate::kernel::nflog::NflogSocket::open(group) {
            Ok(s) => break s,
            Err(e) => {
                tracing::error!(error = %e, group, "cannot read the NFLOG group; retrying in 5s");
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    };
    loop {
        let pkt = match socket.recv_timeout(Duration::from_secs(1)) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) if e.is_recoverable() => {
                tracing::debug!(error = %e, "skipping an unreadable NFLOG message");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "NFLOG read failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let resolve_ip = |ip: IpAddr| {
            shared
                .pods_by_ip
                .read()
                .ok()
                .and_then(|m| m.get(&ip).cloned())
        };
        match logger.observe(Instant::now(), &pkt, &resolve_ip) {
            Verdict::Log(line) if line.staged.is_some() || line.staged_cnp.is_some() => {
                // A staged policy's count: nothing was dropped by it, the connection went on
                // with today's verdict; the staged counters count it.
                let (staged_policy, would_allow) = match (&line.staged, &line.staged_cnp) {
                    (Some(t), _) => (format!("{}/{}", t.namespace, t.policy), t.would_allow),
                    (None, Some(t)) => (
                        format!("{} ClusterNetworkPolicy {}", t.tier, t.policy),
                        t.would_allow,
                    ),
                    (None, None) => continue,
                };
                macro_rules! staged_line {
                    ($msg:literal) => {
                        tracing::info!(
                            direction = line.direction.as_str(),
                            pod = format!("{}/{}", line.namespace, line.pod),
                            src = %line.src,
                            dst = %line.dst,
                            src_ip = %line.src_ip,
                            dst_ip = %line.dst_ip,
                            protocol = line.protocol,
                            dst_port = line.dst_port,
                            staged_policy,
                            $msg
                        )
                    };
                }
                if would_allow {
                    staged_line!("staged would-allow (connection denied today)");
                } else {
                    staged_line!("staged would-deny (connection allowed today)");
                }
            }
            Verdict::Log(line) if line.cnp.is_some() => {
                let Some(cnp) = &line.cnp else { continue };
                let rule = shared
                    .cnp_rules
                    .read()
                    .ok()
                    .and_then(|m| {
                        m.get(&(cnp.policy.clone(), cnp.direction.as_str(), cnp.index))
                            .cloned()
                    })
                    .unwrap_or_else(|| format!("spec.{}[{}]", cnp.direction, cnp.index));
                let known = line.namespace != "unknown";
                if known && !audit {
                    shared
                        .metrics
                        .denied_connection(&line.namespace, &line.pod, line.direction);
                }
                // tracing takes the message as a literal, so one call site per message.
                macro_rules! cnp_line {
                    ($msg:literal) => {
                        tracing::warn!(
                            direction = line.direction.as_str(),
                            pod = format!("{}/{}", line.namespace, line.pod),
                            src = %line.src,
                            dst = %line.dst,
                            src_ip = %line.src_ip,
                            dst_ip = %line.dst_ip,
                            protocol = line.protocol,
                            dst_port = line.dst_port,
                            denied_by = format!("{} ClusterNetworkPolicy {}", cnp.tier, cnp.policy),
                            rule = rule,
                            $msg
                        )
                    };
                }
                if audit {
                    cnp_line!("would deny connection (audit mode: allowed)");
                } else {
                    cnp_line!("denied connection");
                }
            }
            Verdict::Log(line) => {
                let policies = shared
                    .isolation
                    .read()
                    .ok()
                    .and_then(|m| {
                        m.get(&(
                            format!("{}/{}", line.namespace, line.pod),
                            line.direction.as_str(),
                        ))
                        .cloned()
                    })
                    .unwrap_or_default();
                if audit {
                    // Nothing was denied: the connection went through, and the would-drop
                    // counters count it.
                    tracing::warn!(
                        direction = line.direction.as_str(),
                        pod = format!("{}/{}", line.namespace, line.pod),
                        src = %line.src,
                        dst = %line.dst,
                        src_ip = %line.src_ip,
                        dst_ip = %line.dst_ip,
                        protocol = line.protocol,
                        dst_port = line.dst_port,
                        isolated_by = policies.join(","),
                        "would deny connection (audit mode: allowed)"
                    );
                    continue;
                }
                shared
                    .metrics
                    .denied_connection(&line.namespace, &line.pod, line.direction);
                tracing::warn!(
                    direction = line.direction.as_str(),
                    pod = format!("{}/{}", line.namespace, line.pod),
                    src = %line.src,
                    dst = %line.dst,
                    src_ip = %line.src_ip,
                    dst_ip = %line.dst_ip,
                    protocol = line.protocol,
                    dst_port = line.dst_port,
                    isolated_by = policies.join(","),
                    "denied connection"
                );
            }
            Verdict::Suppressed(denylog::SuppressReason::Dedup) => {
                shared.metrics.denied_log_suppressed(SuppressReason::Dedup)
            }
            Verdict::Suppressed(denylog::SuppressReason::RateLimit) => shared
                .metrics
                .denied_log_suppressed(SuppressReason::RateLimit),
            Verdict::Suppressed(denylog::SuppressReason::Unparseable) => {
                tracing::debug!(prefix = %pkt.prefix, "NFLOG packet with a prefix that is not ours");
            }
        }
    }
}
