//! The admin listener: health, readiness, metrics and the per-grant quota API.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::{HeaderMap, StatusCode, header};
use serde_json::json;

use crate::error::GatewayError;
use crate::request_id;
use crate::scope::Scope;
use crate::send::{GrantRef, grant_ref};
use crate::state::AppState;

/// The admin router; with Nylas's webhook endpoint when `[webhooks] listen` is unset.
pub fn router(state: Arc<AppState>) -> Router {
    let own_listener = state.config().webhooks.listen.is_some();
    let router = if own_listener {
        Router::new()
    } else {
        crate::webhooks::routes()
    };
    router
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/quota/{grant}", get(quota).delete(reset))
        .route(
            "/v1/grants/{grant}/profile",
            put(set_override).delete(clear_override),
        )
        .with_state(state)
        .layer(axum::middleware::from_fn(request_id::layer))
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
    if let Err(e) = &ping {
        tracing::warn!(error = %e, "readiness: quota store unreachable");
    }
    let (code, body) = crate::health::readiness(&state, &ping);
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(b) = &state.breaker {
        state.metrics.breaker(b.state());
    }
    if let Some(m) = &state.memory {
        state.metrics.store_scopes(m.scope_count());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The canonical id for the quota API: a grant id (a UUID in any spelling
/// [`grant_ref`] reads), with or without `grant:`. Emails and other forms need Nylas
/// credentials, which the admin API does not hold; anything else names no grant.
fn canonical(grant: &str) -> Result<String, GatewayError> {
    match grant_ref(grant) {
        GrantRef::Id(id) => Ok(id),
        GrantRef::NeedsResolution(_) | GrantRef::Invalid => Err(GatewayError::NotFound(
            "the quota API takes a grant id (a UUID, or grant:<id>), not an email or other identifier"
                .into(),
        )),
    }
}

fn store_failed(e: limits::StoreError) -> GatewayError {
    GatewayError::QuotaUnavailable(e.to_string())
}

/// The grant of a change request, once the admin token is checked.
fn authorized(state: &AppState, headers: &HeaderMap, grant: &str) -> Result<String, GatewayError> {
    if !state.admin_authorized(headers) {
        return Err(GatewayError::Unauthorized);
    }
    canonical(grant)
}

async fn quota(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
) -> Result<Response, GatewayError> {
    let id = canonical(&grant)?;
    let config = state.config();
    let store = state.store.as_ref();
    let stored = crate::selection::stored_override(store, &id)
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(&id, stored.clone());
    let selection = state
        .selector
        .select(store, &state.upstream, &config, &id, stored, None)
        .await;
    let profile = &selection.profile;
    let usage = store
        .usage(Scope::grant(&id).as_str(), profile)
        .await
        .map_err(store_failed)?;
    let windows: Vec<_> = usage
            .windows
            .iter()
            .map(|w| {
                let mut o = json!({
                    "period": &*w.label,
                    "resets_in_seconds": w.next_free.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                });
                for m in &w.metrics {
                    o[m.metric.as_str()] = json!({
                        "limit": m.limit,
                        "used": m.used,
                        "scheduled": m.scheduled,
                        "remaining": m.remaining,
                    });
                }
                o
            })
            .collect();
    Ok(axum::Json(json!({
        "grant_id": id,
        "profile": profile.name(),
        "profile_source": selection.source.as_str(),
        "provider": selection.provider,
        "per_message": {
            "max_recipients": profile.max_recipients_per_message().map(|v| v.get()),
            "max_message_size": profile.max_message_size().map(|v| v.get()),
        },
        "windows": windows,
    }))
    .into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideBody {
    profile: String,
}

async fn set_override(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
    let id = authorized(&state, &headers, &grant)?;
    let OverrideBody { profile } = serde_json::from_slice(&body).map_err(|_| {
        GatewayError::InvalidAdminRequest("expected {\"profile\": \"<name>\"}".into())
    })?;
    if state.config().profile(&profile).is_none() {
        return Err(GatewayError::InvalidAdminRequest(format!(
            "no profile named {profile:?}"
        )));
    }
    state
        .store
        .meta_set(
            Scope::grant(&id).as_str(),
            limits::META_PROFILE,
            &profile,
            None,
        )
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(&id, Some(profile.clone()));
    tracing::info!(grant = %id, profile = %profile, "profile override set by admin");
    Ok(
        axum::Json(json!({ "grant_id": id, "profile": profile, "profile_source": "override" }))
            .into_response(),
    )
}

async fn clear_override(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let id = authorized(&state, &headers, &grant)?;
    state
        .store
        .meta_delete(Scope::grant(&id).as_str(), limits::META_PROFILE)
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(&id, None);
    tracing::info!(grant = %id, "profile override removed by admin");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let id = authorized(&state, &headers, &grant)?;
    state
        .store
        .reset(Scope::grant(&id).as_str())
        .await
        .map_err(store_failed)?;
    tracing::info!(grant = %id, "quota reset by admin");
    Ok(StatusCode::NO_CONTENT.into_response())
}
