//! Watching the quota store: its health once a second, what it says of its persistence
//! and restarts, the breaker's state, and writing back what was admitted locally while it
//! was down. `/readyz` reports what was seen here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use limits::{StoreError, StoreHealth};
use serde_json::{Value, json};

use crate::config::{OnUnavailable, StoreBackend};
use crate::state::AppState;

/// How often the store is looked at (the breaker's probe interval too).
pub const CHECK_EVERY: Duration = limits::breaker::PROBE_EVERY;

/// What was last seen of the store.
#[derive(Debug, Default)]
pub struct StoreWatch {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default, Clone)]
struct Seen {
    /// Whether the last look got an answer (`None`: not looked at yet).
    up: Option<bool>,
    persistent: Option<bool>,
    run_id: Option<String>,
}

impl StoreWatch {
    fn seen(&self) -> Seen {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Looks at the store until the task is dropped.
pub async fn watch(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        check(&state).await;
    }
}

/// One look: health, persistence and restarts logged on change; then, if the store
/// answers, what the local budget admitted meanwhile is written back.
pub async fn check(state: &AppState) {
    let started = Instant::now();
    let result = state.store.health().await;
    state.metrics.store_call("health", started.elapsed());
    match result {
        Ok(health) => {
            seen_up(state, &health);
            write_back(state).await;
        }
        Err(e) => seen_down(state, &e),
    }
    if let Some(b) = &state.breaker {
        state.metrics.breaker(b.state());
    }
}

fn seen_up(state: &AppState, health: &StoreHealth) {
    let mut seen = state.store_watch.lock();
    if seen.up == Some(false) {
        tracing::info!("quota store answers again");
    }
    if health.persistent == Some(false) && seen.persistent != Some(false) {
        let what = not_persistent(state.config().store.backend);
        tracing::warn!("{what}; grants can then send past their quotas");
    }
    if let (Some(old), Some(new)) = (&seen.run_id, &health.run_id)
        && old != new
    {
        tracing::warn!(
            "Redis restarted (its run id changed): counts it had not persisted are lost"
        );
        state.metrics.store_restart();
    }
    state
        .metrics
        .store_persistence_off(health.persistent == Some(false));
    seen.up = Some(true);
    seen.persistent = health.persistent;
    if health.run_id.is_some() {
        seen.run_id.clone_from(&health.run_id);
    }
}

fn seen_down(state: &AppState, e: &StoreError) {
    let mut seen = state.store_watch.lock();
    if seen.up != Some(false) {
        tracing::warn!(error = %e, "quota store not answering");
    }
    seen.up = Some(false);
}

/// Charges what this replica admitted on its own into the store, now that it answers.
async fn write_back(state: &AppState) {
    let Some(local) = &state.local else { return };
    if local.pending() == 0 {
        return;
    }
    match local.reconcile(&*state.store).await {
        Ok(done) => {
            tracing::info!(
                charges = done.charges,
                messages = done.cost.messages,
                "wrote the sends admitted from the local budget back to the quota store"
            );
            state.metrics.reconciled(done.cost);
        }
        Err(e) => tracing::warn!(error = %e, "writing the local budget back failed; will retry"),
    }
}

/// `/readyz`: the status and body. Not ready while draining, and, for a store that does
/// not answer, only when `on_unavailable = "reject"` (in `allow` and `local` the gateway
/// still serves, and pulling every replica out of its Service would turn a Redis outage
/// into a full one).
pub fn readiness(state: &AppState, ping: &Result<(), StoreError>) -> (StatusCode, Value) {
    let config = state.config();
    let seen = state.store_watch.seen();
    let mode = config.store.on_unavailable;
    let mut store = json!({
        "backend": match config.store.backend {
            StoreBackend::Memory => "memory",
            StoreBackend::Redis => "redis",
        },
        "up": ping.is_ok(),
        "on_unavailable": mode.as_str(),
        "persistent": seen.persistent,
    });
    if let Some(b) = &state.breaker {
        store["breaker"] = json!(b.state().as_str());
    }
    if let Some(local) = &state.local {
        store["local_pending"] = json!(local.pending());
    }
    let mut warnings = Vec::new();
    if seen.persistent == Some(false) {
        warnings.push(not_persistent(config.store.backend));
    }
    store["warnings"] = json!(warnings);
    let (code, status) = match ping {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(_) if mode == OnUnavailable::Reject => {
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
        Err(_) => (StatusCode::OK, "degraded"),
    };
    (code, json!({ "status": status, "store": store }))
}

/// What a store that keeps nothing across its restart risks.
fn not_persistent(backend: StoreBackend) -> &'static str {
    match backend {
        StoreBackend::Redis => {
            "Redis has neither AOF nor RDB snapshots on: a restart of it loses every count (see docs/redis.md)"
        }
        StoreBackend::Memory => {
            "the memory store has no store.path: a restart of the gateway loses every count (see docs/storage.md)"
        }
    }
}
