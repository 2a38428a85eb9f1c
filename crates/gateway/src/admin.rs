//! The admin listener: health, readiness, metrics and the per-grant quota API.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};
use serde_json::json;

use crate::AppState;
use crate::error::{GatewayError, new_request_id};
use crate::send::{GrantRef, grant_ref};

/// The admin router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/quota/{grant}", get(quota).delete(reset))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "shutting_down" })),
        )
            .into_response();
    }
    let started = Instant::now();
    let ping = state.store.ping().await;
    state.metrics.store_call("ping", started.elapsed());
    match ping {
        Ok(()) => axum::Json(json!({ "status": "ready" })).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: quota store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({ "status": "store_unavailable" })),
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The canonical id for the quota API: a grant id, with or without `grant:`. Emails and
/// other forms need Nylas credentials, which the admin API does not hold.
fn canonical(grant: &str) -> Result<String, GatewayError> {
    match grant_ref(grant) {
        GrantRef::Id(id) => Ok(id),
        GrantRef::NeedsResolution(_) => Err(GatewayError::NotFound(
            "the quota API takes a grant id (or grant:<id>), not an email or other identifier"
                .into(),
        )),
    }
}

async fn quota(State(state): State<Arc<AppState>>, Path(grant): Path<String>) -> Response {
    let request_id = new_request_id();
    let id = match canonical(&grant) {
        Ok(id) => id,
        Err(e) => return e.into_response_with_id(&request_id),
    };
    let config = state.config();
    let profile = config.default_profile();
    let usage = match state.store.usage(&format!("grant:{id}"), profile).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(request_id, error = %e, "quota store failed");
            return GatewayError::QuotaUnavailable.into_response_with_id(&request_id);
        }
    };
    let windows: Vec<_> = usage
        .windows
        .iter()
        .map(|w| {
            let mut o = json!({
                "period": &*w.label,
                "resets_in_seconds": w.next_free.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            });
            for m in &w.metrics {
                o[m.metric.as_str()] = json!({ "limit": m.limit, "used": m.used, "remaining": m.remaining });
            }
            o
        })
        .collect();
    axum::Json(json!({
        "grant_id": id,
        "profile": profile.name(),
        "per_message": {
            "max_recipients": profile.max_recipients_per_message().map(|v| v.get()),
            "max_message_size": profile.max_message_size().map(|v| v.get()),
        },
        "windows": windows,
    }))
    .into_response()
}

async fn reset(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = new_request_id();
    if !state.admin_authorized(&headers) {
        return GatewayError::Unauthorized.into_response_with_id(&request_id);
    }
    let id = match canonical(&grant) {
        Ok(id) => id,
        Err(e) => return e.into_response_with_id(&request_id),
    };
    match state.store.reset(&format!("grant:{id}")).await {
        Ok(()) => {
            tracing::info!(grant = %id, "quota reset by admin");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => {
            tracing::error!(request_id, error = %e, "quota store failed");
            GatewayError::QuotaUnavailable.into_response_with_id(&request_id)
        }
    }
}
