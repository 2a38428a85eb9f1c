//! Phase 5, settle: Nylas's answer decides what happens to the lease.
//!
//! - Nothing was sent (Nylas refused the request, replayed an idempotent one, or the request
//!   never reached its end): released.
//! - Sent, or maybe sent (2xx, 402, 5xx, a timeout, a client or body failure after the
//!   complete message was handed upstream): kept. Over-counting is the safe side.
//! - A 2xx answer carries the message Nylas sent (asked for uncompressed, read up to
//!   `[server] max_json_body`): when it lists more recipients (or, under
//!   a bytes window, more bytes) than were charged, the difference is charged at once, so the
//!   count converges on what the provider saw even when a request shape fooled inspection.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use limits::Cost;

use super::admit::limits_bytes;
use super::charged::Charged;
use super::ctx::{SendCtx, Stop};
use super::forward::Sent;
use crate::error::GatewayError;
use crate::lease::{Kept, Lease};
use crate::metrics::Settlement;
use crate::ratelimit;
use crate::schedules;
use crate::send::{InspectError, Overflow, SendKind, cost_from_message_json};
use crate::state::AppState;
use crate::upstream::UpstreamError;

/// Nylas answers that mean nothing was sent: the reservation is given back.
const NOT_SENT: [u16; 9] = [400, 401, 403, 404, 409, 413, 415, 422, 429];

/// Most bytes of a 429 answer read to tell a provider throttle from Nylas's own limit.
const THROTTLE_ANSWER_LIMIT: usize = 64 * 1024;

/// How long a provider throttle cools a grant down when Nylas gives no `Retry-After`.
const DEFAULT_PAUSE: Duration = Duration::from_secs(60);

/// The settled send: the response to relay and what was kept.
#[derive(Debug)]
pub(super) struct Settled {
    pub response: Response,
    pub kept: Option<Kept>,
}

/// Settles `lease` (none: forwarded uncounted) on what forwarding produced.
pub(super) async fn settle(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    lease: Option<Lease>,
    sent: Sent,
) -> Result<Settled, Stop> {
    let resp = match sent.result {
        Ok(resp) => resp,
        Err(e) => return Err(unsent(ctx, lease, &sent.overflow, &e).await),
    };
    let headers = lease
        .as_ref()
        .and_then(Lease::usage)
        .map(ratelimit::headers);
    let status = resp.status();
    let went_out = !(status == StatusCode::TOO_MANY_REQUESTS
        || NOT_SENT.contains(&status.as_u16())
        || replayed(resp.headers()));
    let (mut response, kept) = if status == StatusCode::TOO_MANY_REQUESTS && charged.grant.is_some()
    {
        release(ctx, lease).await;
        (throttled(state, ctx, charged, resp).await, None)
    } else if !went_out {
        release(ctx, lease).await;
        (resp, None)
    } else {
        match lease {
            Some(lease) => {
                let streamed = streamed_extra(charged, lease.cost(), &sent.overflow);
                keep(state, ctx, charged, (lease, streamed), resp).await?
            }
            None => (resp, None),
        }
    };
    let headers = kept
        .as_ref()
        .map(|k| ratelimit::headers(&k.usage))
        .or(headers);
    for (k, v) in headers.into_iter().flatten() {
        response.headers_mut().insert(k, v);
    }
    Ok(Settled { response, kept })
}

async fn release(ctx: &mut SendCtx, lease: Option<Lease>) {
    if let Some(lease) = lease {
        ctx.record.settlement = Some(Settlement::Released);
        lease.release().await;
    }
}

fn replayed(headers: &HeaderMap) -> bool {
    headers
        .get("idempotent-response")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// No answer came. Nothing was sent when the body was cut (too large, bad, or broken off
/// before the complete message went upstream) or the connection never opened; otherwise
/// the outcome is unknown and the charge stays.
async fn unsent(
    ctx: &mut SendCtx,
    lease: Option<Lease>,
    overflow: &Overflow,
    e: &UpstreamError,
) -> Stop {
    // No connection was ever made: nothing was sent.
    if e.is_connect() {
        release(ctx, lease).await;
        return Stop::Fail(GatewayError::upstream("upstream send", e));
    }
    // Once the complete message has been handed upstream, Nylas may have acted on it,
    // whatever went wrong after (bytes past the closing boundary that outgrew the limit, a
    // body or client failure): the charge stays.
    if overflow.is_complete() {
        kept_unknown(ctx, lease);
        if overflow.is_over() {
            let limit = overflow.limit().unwrap_or_default();
            let size = overflow.size();
            return ctx.reject(GatewayError::MessageTooLarge { size, limit });
        }
        return Stop::Fail(GatewayError::upstream("upstream send", e));
    }
    if overflow.is_over() {
        release(ctx, lease).await;
        let limit = overflow.limit().unwrap_or_default();
        let size = overflow.size();
        return ctx.reject(GatewayError::MessageTooLarge { size, limit });
    }
    match overflow.failure() {
        Some(InspectError::Invalid(msg) | InspectError::Body(msg)) => {
            release(ctx, lease).await;
            return ctx.reject(GatewayError::InvalidSendRequest(msg));
        }
        // The client stopped sending before the end: given back at once, not held until
        // the upstream timeout.
        Some(InspectError::Stalled) => {
            release(ctx, lease).await;
            return ctx.reject(GatewayError::BodyTimeout);
        }
        _ => {}
    }
    // The message never reached its end upstream: Nylas cannot have sent it.
    release(ctx, lease).await;
    Stop::Fail(GatewayError::upstream("upstream send", e))
}

fn kept_unknown(ctx: &mut SendCtx, lease: Option<Lease>) {
    if let Some(lease) = lease {
        ctx.record.settlement = Some(Settlement::Kept);
        let _ = lease.keep();
    }
}

/// Keeps the charge of a send Nylas answered, with the bytes a streamed body turned out to
/// hold beyond it (`streamed`); a 2xx JSON answer small enough to read is checked for more
/// than was charged, and its `data.schedule_id` (a scheduled send) remembered with the
/// reservation, for a cancel to give back.
async fn keep(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    (lease, streamed): (Lease, Cost),
    resp: Response,
) -> Result<(Response, Option<Kept>), Stop> {
    ctx.record.settlement = Some(Settlement::Kept);
    let reservation = lease.reservation().cloned();
    let companion = lease.companion().cloned();
    if !resp.status().is_success() || !is_json(resp.headers()) {
        let kept = lease.keep_with(streamed).await;
        also_now(state, ctx, charged, reservation.as_ref()).await;
        return Ok((resp, Some(kept)));
    }
    let (parts, body) = resp.into_parts();
    // Nylas's answer echoes the message it sent (attachments without their content), so
    // it is at most about the size of a JSON send: read it up to `max_json_body`.
    let limit = ctx.config.server.max_json_body;
    match read_small(&parts.headers, body, limit).await {
        Ok(Read::Whole(bytes)) => {
            let data = match decoded(&parts.headers, &bytes, limit) {
                Some(text) => answer_data(&text),
                None => {
                    tracing::warn!(request_id = %ctx.record.request_id, "a send answer in an encoding the gateway cannot read; nothing to correct from");
                    None
                }
            };
            let extra = correction(ctx, charged, lease.cost(), data.as_ref());
            let most = extra.bytes.max(streamed.bytes);
            let kept = lease.keep_with(Cost::new(0, extra.recipients, most)).await;
            match (&data, &reservation) {
                (Some(data), Some(r))
                    if data
                        .get("schedule_id")
                        .is_some_and(serde_json::Value::is_string) =>
                {
                    remember_schedule(state, ctx, charged, data, (r, companion.as_ref())).await;
                }
                _ => also_now(state, ctx, charged, reservation.as_ref()).await,
            }
            Ok((Response::from_parts(parts, Body::from(bytes)), Some(kept)))
        }
        Ok(Read::Large(body)) => {
            let kept = lease.keep_with(streamed).await;
            also_now(state, ctx, charged, reservation.as_ref()).await;
            Ok((Response::from_parts(parts, body), Some(kept)))
        }
        Err(e) => {
            let _ = lease.keep_with(streamed).await;
            Err(Stop::Fail(GatewayError::UpstreamUnavailable(format!(
                "send answer broke off: {e}"
            ))))
        }
    }
}

/// Whether `headers` say the body is JSON (`application/json`, parameters aside).
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// What Nylas's answer lists beyond what was charged (zero when it lists no more, or is
/// not a message). Bytes only where a window limits them, and never for raw MIME, whose
/// size was its own bytes rather than an estimate.
///
/// The answer is Nylas's, not a client's: it is read leniently (every string `email` of
/// to, cc and bcc, compared after ASCII lowercasing), so that a shape the gateway would
/// refuse in a request cannot switch the correction off.
fn correction(
    ctx: &SendCtx,
    charged: &Charged,
    cost: Cost,
    data: Option<&serde_json::Value>,
) -> Cost {
    let Some(data) = data else {
        tracing::warn!(request_id = %ctx.record.request_id, "a 2xx send answer without a message; nothing to correct from");
        return Cost::default();
    };
    let recipients = answer_recipients(data).saturating_sub(cost.recipients);
    let bytes = match cost_from_message_json(data) {
        Ok(sent) if counts_bytes(charged) && ctx.record.kind != SendKind::Mime => {
            sent.size.saturating_sub(cost.bytes)
        }
        _ => 0,
    };
    if recipients > 0 || bytes > 0 {
        tracing::warn!(
            request_id = %ctx.record.request_id,
            grant = ctx.record.subject(),
            recipients,
            bytes,
            "Nylas sent more than was counted; charging the difference"
        );
    }
    Cost::new(0, recipients, bytes)
}

/// The bytes a body turned out to hold beyond `cost` once streamed: a chunked body is
/// charged before its end is read (at its per-message cap where it has one, else at what
/// was read so far), so what the meter counted on the way corrects it, raw MIME included.
/// Only where a window limits bytes.
fn streamed_extra(charged: &Charged, cost: Cost, overflow: &Overflow) -> Cost {
    // A buffered body (JSON) was costed whole; its size grows only by what the gateway
    // added (a deferred send's `send_at`), which is not the message's.
    if !overflow.is_streamed() || !counts_bytes(charged) {
        return Cost::default();
    }
    Cost::new(0, 0, overflow.size().saturating_sub(cost.bytes))
}

/// Whether a window of the grant's profile, or of the client's own, limits bytes.
fn counts_bytes(charged: &Charged) -> bool {
    limits_bytes(&charged.profile)
        || charged
            .client
            .as_ref()
            .is_some_and(|c| limits_bytes(&c.profile))
}

/// The `data` object of a send answer.
fn answer_data(answer: &Bytes) -> Option<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
        .filter(serde_json::Value::is_object)
}

/// Remembers the reservation of a send Nylas scheduled (its answer names a
/// `schedule_id`), so a cancel or a failure webhook can give it back. A store failure
/// only keeps the charge for good.
async fn remember_schedule(
    state: &AppState,
    ctx: &SendCtx,
    charged: &Charged,
    data: &serde_json::Value,
    (reservation, companion): (&limits::Reservation, Option<&limits::Reservation>),
) {
    let Some(id) = data.get("schedule_id").and_then(serde_json::Value::as_str) else {
        return;
    };
    let started = std::time::Instant::now();
    let store = state.store.as_ref();
    // A lease of another scope (a client's own quota, when in shadow the grant's forced
    // charge failed) is remembered as the companion, never as the grant's, or a cancel
    // would give it back from the grant's count.
    let (reservation, companion) = if reservation.scope() == charged.scope.as_str() {
        (Some(reservation), companion)
    } else {
        (None, Some(reservation))
    };
    let result = schedules::remember(store, &charged.scope, id, reservation, companion).await;
    state.metrics.store_call("remember", started.elapsed());
    match result {
        Ok(()) => state.metrics.scheduled("remembered"),
        Err(e) => {
            tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not remember a scheduled send; a cancel will not give its charge back");
        }
    }
}

/// A send charged at a later `send_at` that Nylas did not confirm as scheduled (no
/// `schedule_id` in a readable answer): it may have gone out now, so it is counted now too,
/// whatever the limits say. Over-counting is the safe side.
async fn also_now(
    state: &AppState,
    ctx: &SendCtx,
    charged: &Charged,
    reservation: Option<&limits::Reservation>,
) {
    let Some(r) = reservation.filter(|_| ctx.record.scheduled_for.is_some()) else {
        return;
    };
    if let Some(client) = &charged.client {
        let scope = client.scope.as_str();
        if let Err(e) = state
            .store
            .charge(scope, &client.profile, r.cost(), None)
            .await
        {
            tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not count an unconfirmed scheduled send against its client now");
        }
    }
    let scope = charged.scope.as_str();
    match state
        .store
        .charge(scope, &charged.profile, r.cost(), None)
        .await
    {
        Ok(_) => {
            state.metrics.scheduled("unconfirmed");
            tracing::warn!(request_id = %ctx.record.request_id, grant = ctx.record.subject(), "a scheduled send's answer names no schedule_id; counted now as well");
        }
        Err(e) => {
            tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not count an unconfirmed scheduled send now");
        }
    }
}

/// Unique addresses in an answer's to, cc and bcc, compared after ASCII lowercasing.
fn answer_recipients(data: &serde_json::Value) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    for list in ["to", "cc", "bcc"] {
        let items = data.get(list).and_then(serde_json::Value::as_array);
        for item in items.into_iter().flatten() {
            let email = item.get("email").and_then(serde_json::Value::as_str);
            if let Some(email) = email.or_else(|| item.as_str()) {
                seen.insert(email.to_ascii_lowercase());
            }
        }
    }
    seen.len() as u64
}

/// An answer's bytes as text: as they are, or decoded when Nylas compressed them anyway
/// (gzip, deflate), at most `limit` bytes of it; `None` for an encoding the gateway cannot
/// read or a decoded text over `limit`. The client still gets the bytes as they came.
fn decoded(headers: &HeaderMap, bytes: &Bytes, limit: usize) -> Option<Bytes> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let reader: Box<dyn std::io::Read + '_> = match encoding.as_deref() {
        None | Some("" | "identity") => return Some(bytes.clone()),
        Some("gzip" | "x-gzip") => Box::new(flate2::read::GzDecoder::new(&bytes[..])),
        Some("deflate") => Box::new(flate2::read::ZlibDecoder::new(&bytes[..])),
        Some(_) => return None,
    };
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(reader, limit as u64 + 1), &mut out)
        .ok()?;
    (out.len() <= limit).then(|| Bytes::from(out))
}

enum Read {
    Whole(Bytes),
    /// Over the limit: what was read, followed by the rest, unchanged.
    Large(Body),
}

/// Reads an answer whole when it is at most `limit` bytes; otherwise gives it back intact.
async fn read_small(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Read, axum::Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(Read::Large(body));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > limit {
            let head = futures_util::stream::once(async move { Ok(buf.freeze()) });
            return Ok(Read::Large(Body::from_stream(
                head.chain(body.into_data_stream()),
            )));
        }
    }
    Ok(Read::Whole(buf.freeze()))
}

/// Nylas's 429 passes through unchanged; a provider throttle (`rate_limit_error`) also
/// cools the grant down on every replica, for its `Retry-After` or [`DEFAULT_PAUSE`].
async fn throttled(state: &AppState, ctx: &SendCtx, charged: &Charged, resp: Response) -> Response {
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let (mut parts, body) = resp.into_parts();
    let (body, provider) = match read_small(&parts.headers, body, THROTTLE_ANSWER_LIMIT).await {
        Ok(Read::Whole(bytes)) => {
            let text = decoded(&parts.headers, &bytes, THROTTLE_ANSWER_LIMIT);
            let provider = text.is_some_and(|t| is_provider_throttle(&t));
            (Body::from(bytes), provider)
        }
        Ok(Read::Large(body)) => (body, false),
        // A broken body still says Nylas throttled: cool down, relay an empty body.
        Err(_) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            (Body::empty(), true)
        }
    };
    if provider {
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE);
        tracing::warn!(request_id = %ctx.record.request_id, grant = ctx.record.subject(), seconds = pause.as_secs(), "provider throttled the grant; cooling down");
        if let Err(e) = state.store.cool_down(charged.scope.as_str(), pause).await {
            tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not record the cool-down");
        }
    }
    Response::from_parts(parts, body)
}

fn is_provider_throttle(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/type")
                .and_then(|t| t.as_str())
                .map(|t| t == "rate_limit_error")
        })
        .unwrap_or(false)
}
