//! Phase 5, settle: Nylas's answer decides what happens to the lease.
//!
//! - Nothing was sent (Nylas refused the request, replayed an idempotent one, or the request
//!   never reached its end): released.
//! - Sent, or maybe sent (2xx, 402, 5xx, a timeout, a client or body failure after the
//!   complete message was handed upstream): kept. Over-counting is the safe side.
//! - A 2xx answer carries the message Nylas sent: when it lists more recipients (or, under
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
use crate::send::{InspectError, Overflow, SendKind, cost_from_message_json};
use crate::state::AppState;
use crate::upstream::UpstreamError;

/// Nylas answers that mean nothing was sent: the reservation is given back.
const NOT_SENT: [u16; 9] = [400, 401, 403, 404, 409, 413, 415, 422, 429];

/// Most bytes of a send answer read to settle it; a larger answer streams through as is.
const ANSWER_LIMIT: usize = 64 * 1024;

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
    let (mut response, kept) = if status == StatusCode::TOO_MANY_REQUESTS && charged.grant.is_some()
    {
        release(ctx, lease).await;
        (throttled(state, ctx, charged, resp).await, None)
    } else if NOT_SENT.contains(&status.as_u16()) || replayed(resp.headers()) {
        release(ctx, lease).await;
        (resp, None)
    } else {
        match lease {
            Some(lease) => keep(ctx, charged, lease, resp).await?,
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
    if overflow.is_over() {
        release(ctx, lease).await;
        let limit = overflow.limit().unwrap_or_default();
        let size = overflow.size();
        return ctx.reject(GatewayError::MessageTooLarge { size, limit });
    }
    if !overflow.is_complete()
        && let Some(InspectError::Invalid(msg) | InspectError::Body(msg)) = overflow.failure()
    {
        release(ctx, lease).await;
        return ctx.reject(GatewayError::InvalidSendRequest(msg));
    }
    let sent_maybe = !e.is_connect() && overflow.is_complete();
    if sent_maybe {
        kept_unknown(ctx, lease);
    } else {
        release(ctx, lease).await;
    }
    Stop::Fail(GatewayError::upstream("upstream send", e))
}

fn kept_unknown(ctx: &mut SendCtx, lease: Option<Lease>) {
    if let Some(lease) = lease {
        ctx.record.settlement = Some(Settlement::Kept);
        let _ = lease.keep();
    }
}

/// Keeps the charge of a send Nylas answered; a 2xx JSON answer small enough to read is
/// checked for more than was charged.
async fn keep(
    ctx: &mut SendCtx,
    charged: &Charged,
    lease: Lease,
    resp: Response,
) -> Result<(Response, Option<Kept>), Stop> {
    ctx.record.settlement = Some(Settlement::Kept);
    if !resp.status().is_success() || !is_json(resp.headers()) {
        return Ok((resp, Some(lease.keep())));
    }
    let (parts, body) = resp.into_parts();
    match read_small(&parts.headers, body).await {
        Ok(Read::Whole(bytes)) => {
            let extra = correction(ctx, charged, lease.cost(), &bytes);
            let kept = lease.keep_with(extra).await;
            Ok((Response::from_parts(parts, Body::from(bytes)), Some(kept)))
        }
        Ok(Read::Large(body)) => Ok((Response::from_parts(parts, body), Some(lease.keep()))),
        Err(e) => {
            let _ = lease.keep();
            Err(Stop::Fail(GatewayError::UpstreamUnavailable(format!(
                "send answer broke off: {e}"
            ))))
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
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
fn correction(ctx: &SendCtx, charged: &Charged, cost: Cost, answer: &Bytes) -> Cost {
    let Some(data) = serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
        .filter(serde_json::Value::is_object)
    else {
        return Cost::default();
    };
    let Ok(sent) = cost_from_message_json(&data) else {
        return Cost::default();
    };
    let recipients = sent.recipients.saturating_sub(cost.recipients);
    let bytes = if limits_bytes(&charged.profile) && ctx.record.kind != SendKind::Mime {
        sent.size.saturating_sub(cost.bytes)
    } else {
        0
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

enum Read {
    Whole(Bytes),
    /// Over [`ANSWER_LIMIT`]: what was read, followed by the rest, unchanged.
    Large(Body),
}

/// Reads an answer whole when it is small; otherwise gives it back intact.
async fn read_small(headers: &HeaderMap, mut body: Body) -> Result<Read, axum::Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > ANSWER_LIMIT) {
        return Ok(Read::Large(body));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > ANSWER_LIMIT {
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
    let (body, provider) = match read_small(&parts.headers, body).await {
        Ok(Read::Whole(bytes)) => {
            let provider = is_provider_throttle(&bytes);
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
