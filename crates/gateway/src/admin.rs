//! The admin listener: health, readiness, metrics and the per-grant quota API.
//!
//! With `[server] admin_token` set, every quota read and change (and `/metrics` with
//! `protect_metrics`) needs `Authorization: Bearer <token>`; health, readiness and Nylas's
//! webhooks (signed on their own) never do. Every change is logged with the caller's
//! address; refusals are logged at most once a second, never with the token presented.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, RawQuery, Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::error::GatewayError;
use crate::grants::Resolution;
use crate::request_id;
use crate::scope::Scope;
use crate::send::{GrantRef, grant_ref};
use crate::state::AppState;

/// The admin router; with Nylas's webhook endpoint when `[webhooks] listen` is unset.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that changes and
/// refusals are logged with the caller's address (without, the log says `unknown`).
pub fn router(state: Arc<AppState>) -> Router {
    let own_listener = state.config().webhooks.listen.is_some();
    let router = if own_listener {
        Router::new()
    } else {
        crate::webhooks::routes()
    };
    let refusals = Arc::new(Refusals::default());
    let guard = |metrics_only| Guard {
        state: Arc::clone(&state),
        refusals: Arc::clone(&refusals),
        metrics_only,
    };
    // The token is checked per request against the configuration in force, so a reload
    // that sets or changes it (or `protect_metrics`) applies at once.
    let quota_api = Router::new()
        .route("/v1/quota/{grant}", get(quota).delete(reset))
        .route(
            "/v1/quota/{grant}/cooldown",
            axum::routing::delete(clear_cooldown),
        )
        .route("/v1/quota/{grant}/explain", get(explain_send))
        .route("/v1/clients/{name}/quota", get(client_quota))
        .route("/v1/usage", get(fleet_usage))
        .route(
            "/v1/grants/{grant}/profile",
            put(set_override).delete(clear_override),
        )
        .route_layer(from_fn_with_state(guard(false), require_token));
    let metrics_api = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state(guard(true), require_token));
    router
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/readyz", get(readyz))
        .merge(quota_api)
        .merge(metrics_api)
        .with_state(state)
        .layer(axum::middleware::from_fn(request_id::layer))
}

/// What [`require_token`] guards: the quota API always, `/metrics` only with
/// `protect_metrics`.
#[derive(Debug, Clone)]
struct Guard {
    state: Arc<AppState>,
    refusals: Arc<Refusals>,
    metrics_only: bool,
}

/// Lets the request through when it carries the admin token (or none is configured and
/// the admin listener is on loopback); otherwise 401, logged through [`Refusals`].
async fn require_token(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let config = guard.state.config();
    let open = guard.metrics_only && !config.server.protect_metrics;
    // A reload keeps the listener it cannot move (`admin_listen` stays the bound one), so a
    // file that drops the token while the running listener is off loopback would open it:
    // fail closed instead. Start-up and check-config refuse that file outright.
    let authorized = if config.server.admin_token.is_none() {
        config.server.admin_on_loopback()
    } else {
        guard.state.admin_authorized(req.headers())
    };
    if open || authorized {
        return next.run(req).await;
    }
    guard.refusals.note(&req);
    GatewayError::Unauthorized.into_response()
}

/// Refused admin calls, logged at most once a [`Refusals::EVERY`] with how many were not
/// logged since: a client guessing tokens must not flood the log.
#[derive(Debug, Default)]
struct Refusals {
    /// When the last line was written, and refusals since then.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(1);

    fn note(&self, req: &Request) {
        let now = Instant::now();
        let suppressed = {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &mut *last {
                Some((at, count)) if now.duration_since(*at) < Self::EVERY => {
                    *count += 1;
                    return;
                }
                slot => {
                    let suppressed = slot.map_or(0, |(_, count)| count);
                    *slot = Some((now, 0));
                    suppressed
                }
            }
        };
        // The header's presence only: never the token presented.
        let token_presented = req.headers().contains_key(header::AUTHORIZATION);
        tracing::warn!(
            caller = %Caller::of(req.extensions()),
            method = %req.method(),
            path = req.uri().path(),
            token_presented,
            suppressed,
            "admin request refused: missing or wrong admin token"
        );
    }
}

/// The address an admin request came from, as `axum::serve` saw it; `unknown` when the
/// router is served without connect info (e.g. driven with `oneshot`).
#[derive(Debug, Clone, Copy)]
struct Caller(Option<SocketAddr>);

impl Caller {
    fn of(extensions: &http::Extensions) -> Caller {
        Caller(
            extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| *addr),
        )
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller::of(&parts.extensions))
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// `GET /v1/openapi.json`: the OpenAPI 3.1 description of this listener, kept in the repo
/// as `crates/gateway/openapi.json` (tests/e2e_openapi.rs checks the answers against it).
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
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

/// `GET /metrics`: OpenMetrics when the scraper's `Accept` prefers it by its q-values (a
/// tie included, as Prometheus asks), else Prometheus text 0.0.4.
async fn metrics(State(state): State<Arc<AppState>>, headers: http::HeaderMap) -> Response {
    if let Some(b) = &state.breaker {
        state.metrics.breaker(b.state());
    }
    if let Some(m) = &state.memory {
        state.metrics.store_scopes(m.scope_count());
    }
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let openmetrics = crate::metrics::wants_openmetrics(&accept.join(","));
    let (content_type, body) = if openmetrics {
        let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        (ct, state.metrics.render())
    } else {
        let ct = "text/plain; version=0.0.4; charset=utf-8";
        (ct, state.metrics.render_text())
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The canonical id for the quota API. With `[upstream] api_key`, every identifier the
/// proxy reads (a grant id in any spelling, an email, `email:`, `external:`) is looked up
/// with it, as the proxy looks grants up, and a grant Nylas does not know is 404. Without a
/// key the admin API holds no Nylas credentials: it takes grant ids only, unchecked.
/// Messages never repeat the identifier (it may be an address, and errors are logged).
async fn canonical(state: &AppState, grant: &str) -> Result<String, GatewayError> {
    let config = state.config();
    let key = config
        .upstream
        .api_key
        .as_deref()
        .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
    let not_found = |what: &str| GatewayError::NotFound(what.into());
    match (grant_ref(grant), key) {
        (GrantRef::Invalid, _) => Err(not_found("the identifier names no grant")),
        (GrantRef::NeedsResolution(i), _) if i.eq_ignore_ascii_case("me") => Err(not_found(
            "`me` stands for a caller's own grant; the admin API has no caller token",
        )),
        (GrantRef::Id(id), None) => Ok(id),
        (GrantRef::NeedsResolution(_), None) => Err(not_found(
            "an email or external id needs [upstream] api_key to be looked up; give a grant id",
        )),
        (_, Some(key)) => match state
            .grants
            .resolve(&state.upstream, grant, Some(&key))
            .await?
        {
            Resolution::Grant(id) => Ok(id),
            Resolution::Refused(r) if r.status() == StatusCode::NOT_FOUND => {
                Err(not_found("Nylas knows no such grant"))
            }
            Resolution::Refused(r) => Err(GatewayError::UpstreamUnavailable(format!(
                "grant look-up with upstream.api_key refused: {}",
                r.status()
            ))),
        },
    }
}

/// The id a removal (reset, cool-down clear, override removal) applies to: as
/// [`canonical`], except that an identifier that is a grant id is taken as given when Nylas
/// cannot vouch for it (it is unreachable, or the grant was deleted). Taking counts or
/// settings away is safe, and a deleted grant's leftovers can still be removed.
async fn canonical_for_removal(state: &AppState, grant: &str) -> Result<String, GatewayError> {
    let err = match canonical(state, grant).await {
        Ok(id) => return Ok(id),
        Err(e) => e,
    };
    let unvouched = matches!(
        err,
        GatewayError::NotFound(_)
            | GatewayError::UpstreamUnavailable(_)
            | GatewayError::UpstreamTimeout(_)
    );
    match grant_ref(grant) {
        GrantRef::Id(id) if unvouched => {
            tracing::warn!(error = %err, "admin removal for a grant id Nylas did not vouch for");
            Ok(id)
        }
        _ => Err(err),
    }
}

/// A store failure as the admin API answers it: 503, or 400 for a question the store
/// refuses (an explained `send_at` too far ahead, say).
fn store_failed(e: limits::StoreError) -> GatewayError {
    match e {
        limits::StoreError::Invalid(m) => GatewayError::InvalidAdminRequest(m),
        e => GatewayError::QuotaUnavailable(e.to_string()),
    }
}

async fn quota(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
) -> Result<Response, GatewayError> {
    let id = canonical(&state, &grant).await?;
    let (selection, usage) = selected_usage(&state, &id).await?;
    let profile = &selection.profile;
    let cooldown = match cooldown(state.store.as_ref(), &id).await? {
        Some((until, remaining_seconds)) => {
            json!({ "until": until, "remaining_seconds": remaining_seconds })
        }
        None => serde_json::Value::Null,
    };
    Ok(axum::Json(json!({
        "grant_id": id,
        "profile": profile.name(),
        "profile_source": selection.source.as_str(),
        "provider": selection.provider,
        "per_message": per_message_json(profile),
        "cooldown": cooldown,
        "windows": windows_json(&usage),
    }))
    .into_response())
}

/// The profile `id` is charged under (and why), and its usage under it.
async fn selected_usage(
    state: &AppState,
    id: &str,
) -> Result<(crate::selection::Selection, limits::Usage), GatewayError> {
    let config = state.config();
    let store = state.store.as_ref();
    let stored = crate::selection::stored_override(store, id)
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(id, stored.clone());
    let selection = state
        .selector
        .select(store, &state.upstream, &config, id, stored, None)
        .await;
    let usage = store
        .usage(Scope::grant(id).as_str(), &selection.profile)
        .await
        .map_err(store_failed)?;
    Ok((selection, usage))
}

/// `GET /v1/quota/{grant}/explain?recipients=N&bytes=B&send_at=T`: whether such a send
/// would be admitted now, which window and metric binds, when it would fit, and the
/// profile and why; charges nothing
/// (see [`crate::explain`]).
async fn explain_send(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let shape = explain_shape(query.as_deref().unwrap_or(""))?;
    let id = canonical(&state, &grant).await?;
    let (selection, usage) = selected_usage(&state, &id).await?;
    let left = cooldown(state.store.as_ref(), &id)
        .await?
        .map(|(_, secs)| secs);
    let scope = Scope::grant(&id);
    // As the proxy charges it: at send_at when Nylas will hold the send until then (more
    // than two minutes ahead), else now.
    let at = shape.send_at.and_then(crate::pipeline::scheduled_instant);
    let probe = state
        .store
        .probe_at(scope.as_str(), &selection.profile, shape.cost(), at)
        .await
        .map_err(store_failed)?;
    let mut answer = match at {
        None => {
            let mut a = crate::explain::explain(&selection.profile, &usage, left, shape);
            crate::explain::add_fits_at(&mut a, &probe);
            a
        }
        Some(_) => crate::explain::explain_scheduled(&selection.profile, &probe, left, shape),
    };
    if let Some(send_at) = shape.send_at {
        answer["send_at"] = json!(send_at);
    }
    answer["grant_id"] = json!(id);
    answer["profile"] = json!(selection.profile.name());
    answer["profile_source"] = json!(selection.source.as_str());
    // In shadow a refusal is only reported: say so, or the answer reads as a refusal.
    answer["shadow"] = json!(state.config().in_shadow(&selection.profile));
    Ok(axum::Json(answer).into_response())
}

/// `recipients` (default 1), `bytes` (default 0) and `send_at` (unix seconds; default
/// now) from the query; anything else is 400.
fn explain_shape(query: &str) -> Result<crate::explain::Shape, GatewayError> {
    let mut shape = crate::explain::Shape {
        recipients: 1,
        bytes: 0,
        send_at: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = value.parse::<u64>().map_err(|_| {
            GatewayError::InvalidAdminRequest(format!("{key} must be a whole number"))
        });
        match key {
            "recipients" => shape.recipients = number?,
            "bytes" => shape.bytes = number?,
            "send_at" => shape.send_at = Some(number?),
            _ => {
                return Err(GatewayError::InvalidAdminRequest(
                    "explain takes recipients, bytes and send_at".into(),
                ));
            }
        }
    }
    Ok(shape)
}

/// The grant's provider cool-down in force, if any: when it ends (unix seconds, this host's
/// clock plus what is left) and how long is left, as the store's own clock counts it (the
/// setting's TTL), so clock skew between this host and Redis shifts neither figure's
/// length.
async fn cooldown(
    store: &dyn limits::QuotaStore,
    id: &str,
) -> Result<Option<(u64, u64)>, GatewayError> {
    let scope = Scope::grant(id);
    let left = store
        .meta_ttl(scope.as_str(), limits::META_COOLDOWN)
        .await
        .map_err(store_failed)?;
    let now = limits::Clock::now_ms(&limits::SystemClock);
    Ok(left.map(|d| {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (now.saturating_add(ms).div_ceil(1000), ms.div_ceil(1000))
    }))
}

/// `DELETE /v1/quota/{grant}/cooldown`: ends the grant's provider cool-down now.
async fn clear_cooldown(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    caller: Caller,
) -> Result<Response, GatewayError> {
    let id = canonical_for_removal(&state, &grant).await?;
    let scope = Scope::grant(&id);
    state
        .store
        .meta_delete(scope.as_str(), limits::META_COOLDOWN)
        .await
        .map_err(store_failed)?;
    tracing::info!(grant = %id, %caller, "provider cool-down cleared by admin");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/clients/{name}/quota`: the usage of a client's own quota
/// (`[[clients]] profile`).
async fn client_quota(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    let config = state.config();
    let client = config
        .clients
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| GatewayError::NotFound(format!("no client named {name:?}")))?;
    let Some(profile) = client.profile.as_deref().and_then(|p| config.profile(p)) else {
        return Err(GatewayError::NotFound(format!(
            "client {name:?} has no profile of its own"
        )));
    };
    let usage = state
        .store
        .usage(Scope::client(&client.name).as_str(), profile)
        .await
        .map_err(store_failed)?;
    Ok(axum::Json(json!({
        "client": client.name,
        "profile": profile.name(),
        "per_message": per_message_json(profile),
        "windows": windows_json(&usage),
    }))
    .into_response())
}

/// `GET /v1/usage?min_utilization=F&limit=N&cursor=C`: the grants, domains and clients at
/// or above that utilization, busiest first (see [`crate::fleet_view`]).
async fn fleet_usage(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, GatewayError> {
    let q = crate::fleet_view::Query::parse(query.as_deref().unwrap_or(""))?;
    let page = crate::fleet_view::page(&state, &q)
        .await
        .map_err(store_failed)?;
    let data: Vec<serde_json::Value> = page
        .rows
        .iter()
        .map(|row| {
            let (kind, id) = row
                .entry
                .scope
                .split_once(':')
                .unwrap_or(("", &row.entry.scope));
            json!({
                "scope": kind,
                "id": id,
                "profile": row.entry.profile,
                "utilization": row.entry.utilization,
                "windows": windows_json(&row.usage),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "data": data, "next_cursor": page.next })).into_response())
}

fn per_message_json(profile: &limits::Profile) -> serde_json::Value {
    json!({
        "max_recipients": profile.max_recipients_per_message().map(|v| v.get()),
        "max_message_size": profile.max_message_size().map(|v| v.get()),
    })
}

/// Per window: its period, when its next used unit frees, and per metric the limit, what
/// is used, scheduled and remaining.
fn windows_json(usage: &limits::Usage) -> Vec<serde_json::Value> {
    usage
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
        .collect()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideBody {
    profile: String,
}

async fn set_override(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
    let id = canonical(&state, &grant).await?;
    let OverrideBody { profile } = serde_json::from_slice(&body).map_err(|_| {
        GatewayError::InvalidAdminRequest("expected {\"profile\": \"<name>\"}".into())
    })?;
    if state.config().profile(&profile).is_none() {
        return Err(GatewayError::InvalidAdminRequest(format!(
            "no profile named {profile:?}"
        )));
    }
    let store = state.store.as_ref();
    let old = old_override(store, &id).await?;
    store
        .meta_set(
            Scope::grant(&id).as_str(),
            limits::META_PROFILE,
            &profile,
            None,
        )
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(&id, Some(profile.clone()));
    tracing::info!(grant = %id, %caller, old_override = %old, new_override = %profile, "profile override set by admin");
    Ok(
        axum::Json(json!({ "grant_id": id, "profile": profile, "profile_source": "override" }))
            .into_response(),
    )
}

/// The grant's override before a change, for the log: its name, or `none`.
async fn old_override(store: &dyn limits::QuotaStore, id: &str) -> Result<String, GatewayError> {
    let old = crate::selection::stored_override(store, id)
        .await
        .map_err(store_failed)?;
    Ok(old.unwrap_or_else(|| "none".to_owned()))
}

async fn clear_override(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    caller: Caller,
) -> Result<Response, GatewayError> {
    let id = canonical_for_removal(&state, &grant).await?;
    let store = state.store.as_ref();
    let old = old_override(store, &id).await?;
    store
        .meta_delete(Scope::grant(&id).as_str(), limits::META_PROFILE)
        .await
        .map_err(store_failed)?;
    state.selector.learn_override(&id, None);
    tracing::info!(grant = %id, %caller, old_override = %old, new_override = "none", "profile override removed by admin");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset(
    State(state): State<Arc<AppState>>,
    Path(grant): Path<String>,
    caller: Caller,
) -> Result<Response, GatewayError> {
    let id = canonical_for_removal(&state, &grant).await?;
    state
        .store
        .reset(Scope::grant(&id).as_str())
        .await
        .map_err(store_failed)?;
    tracing::info!(grant = %id, %caller, "quota reset by admin: usage in every window forgotten");
    Ok(StatusCode::NO_CONTENT.into_response())
}
