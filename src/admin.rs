//! The agent's admin HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.
//!
//! The module exists to turn the agent's internal state into the three answers the kubelet and
//! Prometheus ask for, and nothing more:
//!
//! * `/healthz` (liveness) answers `ok` as long as the process can serve HTTP at all. It
//!   deliberately ignores sync state: restarting the agent does not fix a rejected ruleset,
//!   and a restart loop would only make the node's enforcement flap.
//! * `/readyz` (readiness) answers 200 only once the watch caches are synced *and* the
//!   dataplane was programmed successfully within `max_sync_age`. A stale last success means
//!   the kernel may no longer match the cluster's policies, which is what operators and
//!   rollouts need to see.
//! * `/metrics` renders [`Metrics`] in the Prometheus text format.
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
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Liveness: answers as long as the process serves HTTP. The DaemonSet's `livenessProbe`
/// uses it (`tests/deploy.rs` checks that).
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: caches synced and a recent successful sync (the DaemonSet's `readinessProbe`).
pub const READYZ_PATH: &str = "/readyz";
/// Prometheus text format (the scrape annotations and `deploy/podmonitor.yaml`).
pub const METRICS_PATH: &str = "/metrics";

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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving admin HTTP");
    }
    let app = Router::new()
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .route(METRICS_PATH, get(scrape))
        .with_state(AppState { metrics, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(AdminError::Serve)
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
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

async fn scrape(State(state): State<AppState>) -> Response {
    match state.metrics.encode_text() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(err) => {
            tracing::error!(error = ?err, "cannot render metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics").into_response()
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
