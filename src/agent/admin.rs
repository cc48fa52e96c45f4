//! The agent's admin HTTP endpoints: `/healthz`, `/readyz`, `/metrics` and `/debug/explain`.
//!
//! The module exists to turn the agent's internal state into the answers the kubelet,
//! Prometheus and a person debugging a denied connection ask for, and nothing more:
//!
//! * `/healthz` (liveness) answers `ok` as long as the process can serve HTTP at all. It
//!   deliberately ignores sync state: restarting the agent does not fix a rejected ruleset,
//!   and a restart loop would only make the node's enforcement flap.
//! * `/readyz` (readiness) answers 200 only once the watch caches are synced *and* the
//!   dataplane was programmed successfully within `max_sync_age`. A stale last success means
//!   the kernel may no longer match the cluster's policies, which is what operators and
//!   rollouts need to see.
//! * `/metrics` renders [`Metrics`] in the Prometheus text format.
//! * `/debug/explain?from=ns/pod&to=ns/pod&port=80/TCP[&output=json][&family=6]` answers
//!   `kube-nftpolicy explain` from the cluster state the agent last synced from
//!   ([`LiveSnapshot`]): 200 with the explanation (allowed or denied), 400 for bad parameters,
//!   404 for an unknown pod, 503 until the initial lists are in.
//! * `/debug/rule-hits` lists every policy rule that applies to a pod of this node with the
//!   new connections it matched since its counter was made (JSON, see
//!   [`crate::tools::rule_hits`]); `lint --rule-hits` and `explain --rule-hits` read it.
//!
//! [`serve`] takes an already bound listener so that binding errors surface at startup (with
//! the address in the message, see [`bind`]) and tests can bind `127.0.0.1:0`.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::agent::metrics::Metrics;
use crate::engine::index::Snapshot;
use crate::model::{Family, Protocol};
use crate::tools::explain::{Endpoint, ExplainError, Explainer, PortQuery};

/// Liveness: answers as long as the process serves HTTP. The DaemonSet's `livenessProbe`
/// uses it (`tests/deploy.rs` checks that).
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: caches synced and a recent successful sync (the DaemonSet's `readinessProbe`).
pub const READYZ_PATH: &str = "/readyz";
/// Prometheus text format (the scrape annotations and `deploy/podmonitor.yaml`).
pub const METRICS_PATH: &str = "/metrics";
/// One connection's verdict and why, from the agent's live state (see `explain`).
pub const DEBUG_EXPLAIN_PATH: &str = "/debug/explain";
/// Every policy rule on this node and its hit count (JSON).
pub const DEBUG_RULE_HITS_PATH: &str = "/debug/rule-hits";

/// Errors from running the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin HTTP listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("serving admin HTTP")]
    Serve(#[source] io::Error),
}

/// Readiness state shared between the sync loop (writer) and the admin server (reader).
#[derive(Debug)]
pub struct Health {
    max_sync_age: Duration,
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    caches_synced: bool,
    last_success: Option<Instant>,
    failures_since_success: u64,
}

/// Why `/readyz` is failing; its `Display` is the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    CachesNotSynced,
    NoSuccessfulSync,
    /// The last successful sync is older than `max_sync_age`.
    Stale {
        age: Duration,
        failures_since_success: u64,
    },
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::CachesNotSynced => f.write_str("caches not synced"),
            NotReady::NoSuccessfulSync => f.write_str("no successful sync yet"),
            NotReady::Stale {
                age,
                failures_since_success,
            } => {
                // Whole seconds read best for real resync periods; tiny ages (tests, very
                // short periods) would otherwise all print as "0s".
                if *age >= Duration::from_secs(1) {
                    write!(f, "last successful sync {}s ago", age.as_secs())?;
                } else {
                    write!(f, "last successful sync {}ms ago", age.as_millis())?;
                }
                if *failures_since_success > 0 {
                    write!(f, " ({failures_since_success} failed since)")?;
                }
                Ok(())
            }
        }
    }
}

impl Health {
    /// `max_sync_age` is how old the last successful sync may be before the agent reports
    /// itself unready; the agent uses three resync periods, which tolerates two slow or failed rounds.
    pub fn new(max_sync_age: Duration) -> Self {
        Health {
            max_sync_age,
            state: Mutex::default(),
        }
    }

    pub fn mark_caches_synced(&self) {
        self.state().caches_synced = true;
    }

    /// Records a successful sync that finished at `at`.
    pub fn record_sync_success(&self, at: Instant) {
        let mut state = self.state();
        // Keep the newest success even if reports arrive out of order.
        state.last_success = Some(state.last_success.map_or(at, |prev| prev.max(at)));
        state.failures_since_success = 0;
    }

    /// Records a failed sync. It does not make the agent unready by itself: the previous
    /// ruleset is still enforced, and persistent failure shows up as a stale last success.
    pub fn record_sync_failure(&self) {
        let mut state = self.state();
        state.failures_since_success = state.failures_since_success.saturating_add(1);
    }

    /// Whether the agent is ready at `now`.
    pub fn check_ready(&self, now: Instant) -> Result<(), NotReady> {
        let state = self.state();
        if !state.caches_synced {
            return Err(NotReady::CachesNotSynced);
        }
        let last_success = state.last_success.ok_or(NotReady::NoSuccessfulSync)?;
        let age = now.saturating_duration_since(last_success);
        if age > self.max_sync_age {
            return Err(NotReady::Stale {
                age,
                failures_since_success: state.failures_since_success,
            });
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // Every update is a single field assignment, so a panic while holding the lock cannot
        // leave the state inconsistent; keep serving rather than propagate the poison.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The cluster state the agent last synced from, for `/debug/explain`. The sync loop
/// publishes each snapshot it takes (a pointer swap); a request clones the `Arc`, so it never
/// holds up a sync and always sees one consistent state.
#[derive(Debug, Default)]
pub struct LiveSnapshot {
    current: std::sync::RwLock<Option<Arc<Snapshot>>>,
    /// `--debug-explain=false`: the endpoint answers 404 and nothing is kept.
    disabled: bool,
    /// This node and the pod ranges its agent was given (`--pod-cidr`), so an unknown
    /// address in them is explained as dropped.
    pod_cidrs: std::sync::RwLock<Option<(String, Vec<crate::model::Cidr>)>>,
}

impl LiveSnapshot {
    /// A `/debug/explain` that is switched off: pod names, labels and policies are cluster
    /// details some operators do not want on a port every pod of the node can reach.
    pub fn disabled() -> Self {
        Self {
            current: Default::default(),
            disabled: true,
            pod_cidrs: Default::default(),
        }
    }

    /// The pod ranges `node` fails closed in (from `--pod-cidr`), for explanations.
    pub fn set_pod_cidrs(&self, node: &str, ranges: Vec<crate::model::Cidr>) {
        *self
            .pod_cidrs
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some((node.to_string(), ranges));
    }

    fn explainer<'a>(&self, snapshot: &'a Snapshot) -> Explainer<'a> {
        let explainer = Explainer::new(snapshot);
        match &*self
            .pod_cidrs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some((node, ranges)) => explainer.with_pod_cidrs(node, ranges.clone()),
            None => explainer,
        }
    }

    /// Make `snapshot` the state `/debug/explain` answers from.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        if self.disabled {
            return;
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(snapshot);
    }

    /// The latest state, `None` before the initial lists are in.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Binds the admin listener, naming the address if that fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    live: Arc<LiveSnapshot>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving admin HTTP");
    }
    let app = Router::new()
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .route(METRICS_PATH, get(scrape))
        .route(DEBUG_EXPLAIN_PATH, get(debug_explain))
        .route(DEBUG_RULE_HITS_PATH, get(debug_rule_hits))
        .with_state(AppState {
            metrics,
            health,
            live,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    live: Arc<LiveSnapshot>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.health.check_ready(Instant::now()) {
        Ok(()) => "ok".into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason.to_string()).into_response(),
    }
}

async fn debug_rule_hits(State(state): State<AppState>) -> Response {
    let counters = state.metrics.rule_hits();
    let hits = crate::tools::rule_hits::RuleHits::from_counters(
        counters.iter().map(|c| (&c.owner, c.packets)),
    );
    match serde_json::to_string_pretty(&hits) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot render rule hits");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render rule hits").into_response()
        }
    }
}

async fn scrape(State(state): State<AppState>) -> Response {
    match state.metrics.encode_text() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(err) => {
            tracing::error!(error = ?err, "cannot render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics").into_response()
        }
    }
}

const EXPLAIN_USAGE: &str = "want /debug/explain?from=<ns/pod|IP>&to=<ns/pod|IP>&port=<80|80/UDP|http|http/TCP>[&output=text|json][&family=4|6]";

/// A parsed `/debug/explain` question.
struct ExplainQuery {
    from: Endpoint,
    to: Endpoint,
    port: PortQuery,
    family: Option<Family>,
    json: bool,
}

/// Parse the query; `Err` is the status and message of a request that cannot be answered.
fn explain_params(params: &[(String, String)]) -> Result<ExplainQuery, (StatusCode, String)> {
    let bad = |msg: String| (StatusCode::BAD_REQUEST, format!("{msg}; {EXPLAIN_USAGE}\n"));
    let mut seen: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for (k, v) in params {
        if !matches!(k.as_str(), "from" | "to" | "port" | "output" | "family") {
            return Err(bad(format!("unknown query parameter `{k}`")));
        }
        if seen.insert(k, v).is_some() {
            return Err(bad(format!("query parameter `{k}` given twice")));
        }
    }
    let need = |k: &str| {
        seen.get(k)
            .copied()
            .ok_or_else(|| bad(format!("missing query parameter `{k}`")))
    };
    let parse_err = |what: &str, e: ExplainError| bad(format!("{what}: {e}"));
    let from: Endpoint = need("from")?.parse().map_err(|e| parse_err("from", e))?;
    let to: Endpoint = need("to")?.parse().map_err(|e| parse_err("to", e))?;
    let port = PortQuery::parse(need("port")?, Protocol::Tcp).map_err(|e| parse_err("port", e))?;
    let family = match seen.get("family").copied() {
        None => None,
        Some("4") => Some(Family::V4),
        Some("6") => Some(Family::V6),
        Some(other) => return Err(bad(format!("family {other:?}: want 4 or 6"))),
    };
    let json = match seen.get("output").copied() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => return Err(bad(format!("output {other:?}: want text or json"))),
    };
    Ok(ExplainQuery {
        from,
        to,
        port,
        family,
        json,
    })
}

async fn debug_explain(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let ExplainQuery {
        from,
        to,
        port,
        family,
        json,
    } = match explain_params(&params) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    if state.live.disabled {
        return (
            StatusCode::NOT_FOUND,
            "/debug/explain is switched off (--debug-explain=false)\n",
        )
            .into_response();
    }
    let Some(snapshot) = state.live.current() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the initial lists of pods, namespaces and policies are not complete yet\n",
        )
            .into_response();
    };
    // Resolving a node's policy is CPU work proportional to the cluster: keep it off the
    // runtime's workers.
    let live = state.live.clone();
    let answer = tokio::task::spawn_blocking(move || {
        live.explainer(&snapshot).explain(&from, &to, &port, family)
    })
    .await;
    match answer {
        Ok(Ok(e)) if json => match serde_json::to_string_pretty(&e) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
            Err(err) => {
                tracing::error!(error = %err, "cannot render an explanation as JSON");
                (StatusCode::INTERNAL_SERVER_ERROR, "cannot render JSON\n").into_response()
            }
        },
        Ok(Ok(e)) => e.to_text().into_response(),
        Ok(Err(e @ ExplainError::UnknownPod(_))) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Ok(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "explain task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "explain failed\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_AGE: Duration = Duration::from_secs(60);

    #[test]
    fn readiness_needs_caches_then_a_recent_success() {
        let health = Health::new(MAX_AGE);
        let t0 = Instant::now();
        assert_eq!(health.check_ready(t0), Err(NotReady::CachesNotSynced));
        health.mark_caches_synced();
        assert_eq!(health.check_ready(t0), Err(NotReady::NoSuccessfulSync));
        health.record_sync_success(t0);
        assert_eq!(health.check_ready(t0 + MAX_AGE), Ok(()));
        health.record_sync_failure();
        health.record_sync_failure();
        let late = t0 + MAX_AGE + Duration::from_secs(35);
        let err = health.check_ready(late).expect_err("stale");
        assert_eq!(
            err.to_string(),
            "last successful sync 95s ago (2 failed since)"
        );
    }

    #[test]
    fn success_resets_failures_and_ignores_older_reports() {
        let health = Health::new(MAX_AGE);
        health.mark_caches_synced();
        let t0 = Instant::now();
        health.record_sync_failure();
        health.record_sync_success(t0 + Duration::from_secs(10));
        health.record_sync_success(t0);
        let err = health
            .check_ready(t0 + Duration::from_secs(10) + MAX_AGE + Duration::from_millis(1))
            .expect_err("stale");
        assert_eq!(
            err,
            NotReady::Stale {
                age: MAX_AGE + Duration::from_millis(1),
                failures_since_success: 0,
            }
        );
    }

    #[test]
    fn sub_second_ages_print_in_milliseconds() {
        let err = NotReady::Stale {
            age: Duration::from_millis(250),
            failures_since_success: 0,
        };
        assert_eq!(err.to_string(), "last successful sync 250ms ago");
    }
}
