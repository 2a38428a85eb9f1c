//! The proxy: sends are costed, checked, charged, forwarded and settled; everything else is
//! relayed untouched.
//!
//! Order for a send: classify → resolve the grant → read the body until the cost is known →
//! per-message checks (no store call) → one `reserve` → forward → settle on the answer.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, header};
use limits::{Cost, Decision, Guarded, Metric, Profile, Reservation, StoreError};

use crate::AppState;
use crate::config::OnUnavailable;
use crate::error::{GatewayError, new_request_id};
use crate::events;
use crate::grants::Resolution;
use crate::metrics::Outcome;
use crate::ratelimit;
use crate::send::{
    InspectError, InspectOptions, SendRoute, classify, cost_from_message_json, inspect,
};
use crate::upstream::{UpstreamError, forwardable, relay, relay_buffered};
use http::StatusCode;
use std::time::Duration;

/// Nylas answers that mean nothing was sent: the reservation is given back.
const NOT_SENT: [u16; 9] = [400, 401, 403, 404, 409, 413, 415, 422, 429];

/// Handles every request on the proxy listener.
pub async fn handle(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let _in_flight = state.metrics.in_flight();
    // Decide on exactly what goes upstream: the end-to-end headers (hop-by-hop ones and any
    // the client names in `Connection` are dropped, so none can steer a decision and then
    // vanish), and the target as the upstream URL parser normalises it (`\` becomes `/`,
    // dot segments go), so a send cannot pass as something else.
    let headers = forwardable(req.headers());
    *req.headers_mut() = headers;
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    match state.upstream.normalise(&target) {
        Some(uri) => *req.uri_mut() = uri,
        None => {
            let request_id = new_request_id();
            return GatewayError::BadTarget.into_response_with_id(&request_id);
        }
    }
    match classify(req.method(), req.uri()) {
        Some(route) => {
            let request_id = new_request_id();
            match send(&state, route, req, &request_id).await {
                Ok(resp) => resp,
                Err(e) => e.into_response_with_id(&request_id),
            }
        }
        None => pass_through(&state, req).await,
    }
}

/// Relays a request that is not a send, byte for byte.
async fn pass_through(state: &AppState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let length = content_length(&parts.headers);
    // A request without a body goes on without one: a streamed body would add
    // `Transfer-Encoding: chunked` to a bodiless DELETE, PUT or POST.
    let body = if http_body::Body::is_end_stream(&body) {
        reqwest::Body::from(bytes::Bytes::new())
    } else {
        reqwest::Body::wrap_stream(body.into_data_stream())
    };
    match state
        .upstream
        .send(parts.method, &target, &parts.headers, body, length)
        .await
    {
        Ok(resp) => relay(resp),
        Err(e) => {
            let request_id = new_request_id();
            tracing::warn!(request_id, error = %e, "upstream request failed");
            upstream_error(&e).into_response_with_id(&request_id)
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn upstream_error(e: &UpstreamError) -> GatewayError {
    if e.is_timeout() {
        GatewayError::UpstreamTimeout
    } else {
        GatewayError::UpstreamUnavailable
    }
}

/// Who is charged and under which profile.
struct Charged {
    scope: String,
    profile: Profile,
    /// For logs: the canonical grant id or the domain.
    subject: String,
    /// The canonical grant id (none for domain sends).
    grant: Option<String>,
    /// The override the store is believed to hold for the grant.
    override_name: Option<String>,
}

/// The quota scope of a grant.
pub fn grant_scope(grant: &str) -> String {
    format!("grant:{grant}")
}

async fn send(
    state: &AppState,
    route: SendRoute,
    req: Request,
    request_id: &str,
) -> Result<Response, GatewayError> {
    let config = state.config();
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    let mut charged = match &route {
        SendRoute::Domain { domain } => match config.domain_profile() {
            Some(p) => Charged {
                scope: format!("domain:{}", domain.to_ascii_lowercase()),
                profile: p.clone(),
                subject: domain.clone(),
                grant: None,
                override_name: None,
            },
            // Domain sends are counted only when `[domains] profile` is set.
            None => return Ok(pass_through(state, req).await),
        },
        SendRoute::Message { grant }
        | SendRoute::Mime { grant }
        | SendRoute::Draft { grant, .. } => {
            match state
                .grants
                .resolve(&state.upstream, grant, authorization.as_ref())
                .await?
            {
                Resolution::Grant(id) => {
                    let cached = state.selector.cached_override(&id);
                    let selection = state
                        .selector
                        .select(state, &config, &id, cached, authorization.as_ref())
                        .await;
                    Charged {
                        scope: grant_scope(&id),
                        profile: selection.profile,
                        subject: id.clone(),
                        grant: Some(id),
                        override_name: selection.override_name,
                    }
                }
                Resolution::Refused(resp) => return Ok(resp),
            }
        }
    };
    let opts = InspectOptions {
        json_limit: config.server.max_json_body,
        max_message_size: charged.profile.max_message_size().map(|v| v.get()),
        ..InspectOptions::default()
    };
    let (parts, body) = req.into_parts();
    let inspected = inspect(&route, &parts.headers, body, &opts)
        .await
        .map_err(|e| reject_static(state, request_id, &charged, inspect_error(e)))?;
    let mut cost = inspected.cost;
    let mut size_known = inspected.size_known;
    if inspected.draft_needs_lookup {
        let SendRoute::Draft { path, .. } = &route else {
            return Err(GatewayError::InvalidSendRequest("not a draft send".into()));
        };
        let (status, headers, body) = state
            .upstream
            .get_small(path, authorization.as_ref())
            .await
            .map_err(|e| {
                let e = UpstreamError::Http(e);
                tracing::warn!(request_id, error = %e, "draft look-up failed");
                upstream_error(&e)
            })?;
        if !status.is_success() {
            return Ok(relay_buffered(status, &headers, body));
        }
        let draft: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            tracing::warn!(request_id, "draft look-up answer is not JSON");
            GatewayError::UpstreamUnavailable
        })?;
        cost = cost_from_message_json(&draft).map_err(inspect_error)?;
        // The draft's attachments carry their sizes: the whole message is known.
        size_known = true;
    }

    // Per-message checks: they can never pass on retry, so 413/422 and no store call.
    per_message(&charged.profile, cost)
        .map_err(|e| reject_static(state, request_id, &charged, e))?;

    let charge = Cost::new(
        1,
        cost.recipients,
        bytes_to_charge(&charged.profile, cost, size_known),
    );
    // Every request is charged, idempotency key or not: a repeat whose key Nylas has
    // stored comes back with `Idempotent-Response: true` and is released then. Trusting the
    // key here would let a bigger message, or a retry after a failure Nylas did not store,
    // through uncounted.
    let mut attempts = 0;
    let decision = loop {
        attempts += 1;
        let started = Instant::now();
        let result = match &charged.grant {
            None => state
                .store
                .reserve(&charged.scope, &charged.profile, charge, None)
                .await
                .map(Guarded::Decided),
            Some(_) => {
                state
                    .store
                    .reserve_guarded(
                        &charged.scope,
                        &charged.profile,
                        charge,
                        None,
                        charged.override_name.as_deref(),
                    )
                    .await
            }
        };
        state.metrics.store_call("reserve", started.elapsed());
        match result {
            Ok(Guarded::Decided(d)) => break Ok(d),
            Ok(Guarded::CoolingDown(left)) => {
                log_decision(
                    request_id,
                    &charged.subject,
                    Outcome::Denied,
                    "provider_throttled",
                );
                state
                    .metrics
                    .decision(Outcome::Denied, "provider_throttled");
                return Err(GatewayError::ProviderThrottled { retry_after: left });
            }
            // Another replica changed the grant's override: charge under the new profile.
            Ok(Guarded::OverrideChanged(name)) if attempts < 3 => {
                let grant = charged.grant.clone().unwrap_or_default();
                state.selector.learn_override(&grant, name.clone());
                let selection = state
                    .selector
                    .select(state, &config, &grant, name, authorization.as_ref())
                    .await;
                charged.profile = selection.profile;
                charged.override_name = selection.override_name;
                per_message(&charged.profile, cost)
                    .map_err(|e| reject_static(state, request_id, &charged, e))?;
            }
            Ok(Guarded::OverrideChanged(_)) => {
                break Err(StoreError::Protocol(
                    "profile override kept changing".into(),
                ));
            }
            Err(e) => break Err(e),
        }
    };
    let (reservation, usage) = match decision {
        // The gateway passes no idempotency key to the store, so an allowance is never a
        // store-side replay: it was charged now and is settled like any other.
        Ok(Decision::Allowed(a)) => {
            let crossed = events::crossings(&a.usage, charge);
            if !crossed.is_empty() {
                events::report(state, &charged.subject, &charged.scope, crossed).await;
            }
            log_decision(
                request_id,
                &charged.subject,
                Outcome::Allowed,
                "within_quota",
            );
            state.metrics.decision(Outcome::Allowed, "within_quota");
            state.metrics.units(charge);
            (Some(a.reservation), Some(a.usage))
        }
        // More than a window's whole limit: no retry can ever pass, so this is a
        // per-message rejection (422/413), not a 429 that has no `Retry-After` to give.
        Ok(Decision::Denied(d)) if d.retry_after.is_none() && d.metric != Metric::Messages => {
            let err = if d.metric == Metric::Bytes {
                GatewayError::MessageTooLarge {
                    size: d.requested,
                    limit: d.limit,
                }
            } else {
                GatewayError::TooManyRecipients {
                    count: d.requested,
                    limit: d.limit,
                }
            };
            return Err(reject_static(state, request_id, &charged, err));
        }
        Ok(Decision::Denied(d)) => {
            log_decision(
                request_id,
                &charged.subject,
                Outcome::Denied,
                d.metric.as_str(),
            );
            state.metrics.decision(Outcome::Denied, d.metric.as_str());
            return Err(GatewayError::QuotaExceeded(Box::new(d)));
        }
        Err(StoreError::Invalid(msg)) => {
            state
                .metrics
                .decision(Outcome::StaticRejected, "invalid_send_request");
            return Err(GatewayError::InvalidSendRequest(msg));
        }
        Err(e) => match config.store.on_unavailable {
            OnUnavailable::Reject => {
                tracing::error!(request_id, grant = %charged.subject, error = %e, decision = "store_error", "quota store failed; send refused");
                state
                    .metrics
                    .decision(Outcome::StoreError, store_reason(&e));
                return Err(GatewayError::QuotaUnavailable);
            }
            OnUnavailable::Allow => {
                tracing::warn!(request_id, grant = %charged.subject, error = %e, decision = "allowed_uncounted", "quota store failed; send forwarded uncounted");
                state
                    .metrics
                    .decision(Outcome::AllowedUncounted, store_reason(&e));
                (None, None)
            }
        },
    };

    let overflow = inspected.body.overflow();
    let length = inspected.body.content_length();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let started = Instant::now();
    let result = state
        .upstream
        .send(
            parts.method,
            &target,
            &parts.headers,
            inspected.body.into_reqwest(),
            length,
        )
        .await;
    let took = started.elapsed();
    let mut resp = match result {
        Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS && charged.grant.is_some() => {
            state.metrics.upstream(429, took);
            // Nothing was sent; Nylas's answer passes through unchanged, and a provider's
            // throttle cools the grant down on every replica.
            settle(state, request_id, reservation.as_ref(), true).await;
            let (resp, throttled) = provider_throttle(resp).await;
            if let Some(pause) = throttled {
                tracing::warn!(request_id, grant = %charged.subject, seconds = pause.as_secs(), "provider throttled the grant; cooling down");
                if let Err(e) = state.store.cool_down(&charged.scope, pause).await {
                    tracing::error!(request_id, error = %e, "could not record the cool-down");
                }
            }
            resp
        }
        Ok(resp) => {
            let status = resp.status().as_u16();
            state.metrics.upstream(status, took);
            let replayed = resp
                .headers()
                .get("idempotent-response")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
            let release = NOT_SENT.contains(&status) || replayed;
            settle(state, request_id, reservation.as_ref(), release).await;
            relay(resp)
        }
        Err(e) => {
            state.metrics.upstream(0, took);
            if overflow.is_over() {
                // The body outgrew the limit mid-stream; the upstream request was cut before
                // its end, so nothing was sent.
                settle(state, request_id, reservation.as_ref(), true).await;
                state
                    .metrics
                    .decision(Outcome::StaticRejected, "message_too_large");
                let limit = overflow.limit().unwrap_or_default();
                return Err(GatewayError::MessageTooLarge {
                    size: overflow.size(),
                    limit,
                });
            }
            // A bad body, or the client's body breaking off mid-upload: either way the
            // upstream request was cut before its end, so nothing was sent.
            if let Some(InspectError::Invalid(msg) | InspectError::Body(msg)) = overflow.failure() {
                settle(state, request_id, reservation.as_ref(), true).await;
                return Err(GatewayError::InvalidSendRequest(msg));
            }
            // Not connected, or the body never reached its end (a stalled or broken upload):
            // Nylas cannot have sent it. Anything else: the outcome is unknown, and
            // over-counting is the safe side.
            let sent_maybe = !e.is_connect() && overflow.is_finished();
            tracing::warn!(request_id, grant = %charged.subject, error = %e, kept = sent_maybe, "upstream send failed");
            settle(state, request_id, reservation.as_ref(), !sent_maybe).await;
            return Err(upstream_error(&e));
        }
    };
    if let Some(usage) = &usage {
        for (k, v) in ratelimit::headers(usage) {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}

/// Checks a Nylas 429 for a provider throttle (`rate_limit_error`), returning the response
/// to relay (its body read, at most 64 KiB, and passed on unchanged) and how long to cool
/// down: `Retry-After` seconds, or 60 s without one.
async fn provider_throttle(resp: reqwest::Response) -> (Response, Option<Duration>) {
    const DEFAULT_PAUSE: Duration = Duration::from_secs(60);
    let status = resp.status();
    let headers = resp.headers().clone();
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let small = resp.content_length().is_none_or(|n| n <= 64 * 1024);
    if !small {
        return (relay(resp), None);
    }
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %crate::upstream::describe(&e), "could not read Nylas's 429 body");
            return (
                relay_buffered(status, &headers, bytes::Bytes::new()),
                Some(retry_after.unwrap_or(DEFAULT_PAUSE)),
            );
        }
    };
    let provider = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/type")
                .and_then(|t| t.as_str())
                .map(|t| t == "rate_limit_error")
        })
        .unwrap_or(false);
    let pause = provider.then(|| retry_after.unwrap_or(DEFAULT_PAUSE));
    (relay_buffered(status, &headers, body), pause)
}

/// Bytes to charge. A body of unknown length (chunked, as the Node SDK sends) is only
/// partly read before the reservation; where a window limits bytes, it is charged at the
/// most it may grow to (the per-message cap), since charging what was read so far would
/// under-count. Without a bytes window the figure is informational and stays as read.
fn bytes_to_charge(profile: &Profile, cost: crate::send::SendCost, size_known: bool) -> u64 {
    let limits_bytes = profile
        .windows()
        .iter()
        .any(|w| w.limit(Metric::Bytes).is_some());
    match profile.max_message_size() {
        Some(max) if !size_known && limits_bytes => cost.size.max(max.get()),
        _ => cost.size,
    }
}

/// The profile's per-message caps.
fn per_message(profile: &Profile, cost: crate::send::SendCost) -> Result<(), GatewayError> {
    if let Some(max) = profile.max_recipients_per_message()
        && cost.recipients > max.get()
    {
        return Err(GatewayError::TooManyRecipients {
            count: cost.recipients,
            limit: max.get(),
        });
    }
    if let Some(max) = profile.max_message_size()
        && cost.size > max.get()
    {
        return Err(GatewayError::MessageTooLarge {
            size: cost.size,
            limit: max.get(),
        });
    }
    Ok(())
}

fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Timeout(_) => "timeout",
        StoreError::Protocol(_) => "protocol",
        StoreError::Invalid(_) => "invalid",
    }
}

fn inspect_error(e: InspectError) -> GatewayError {
    match e {
        InspectError::Invalid(msg) | InspectError::Body(msg) => {
            GatewayError::InvalidSendRequest(msg)
        }
        InspectError::TooLarge { size, limit } => GatewayError::MessageTooLarge { size, limit },
    }
}

fn reject_static(
    state: &AppState,
    request_id: &str,
    charged: &Charged,
    err: GatewayError,
) -> GatewayError {
    log_decision(
        request_id,
        &charged.subject,
        Outcome::StaticRejected,
        err.error_type(),
    );
    state
        .metrics
        .decision(Outcome::StaticRejected, err.error_type());
    err
}

fn log_decision(request_id: &str, subject: &str, outcome: Outcome, reason: &str) {
    tracing::info!(
        request_id,
        grant = subject,
        decision = outcome.as_str(),
        reason,
        "send decision"
    );
}

async fn settle(
    state: &AppState,
    request_id: &str,
    reservation: Option<&Reservation>,
    release: bool,
) {
    let Some(r) = reservation else { return };
    state.metrics.settled(release);
    if !release {
        return;
    }
    let started = Instant::now();
    let result = state.store.release(r).await;
    state.metrics.store_call("release", started.elapsed());
    if let Err(e) = result {
        // The charge stays: over-counting is the safe side.
        tracing::error!(request_id, error = %e, "release failed; the charge stays");
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_with_id(&new_request_id())
    }
}
