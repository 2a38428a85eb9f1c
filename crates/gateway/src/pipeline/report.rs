//! Phase 6, report: the one log line of a send, its decision metric, and the threshold
//! events of what it kept.
//!
//! The line carries the gateway's request id and Nylas's (`nylas_request_id`), the upstream
//! status and latency, so a support ticket quoting either id finds it. It never carries an
//! address, a subject or a body.

use super::SendCtx;
use super::charged::Charged;
use crate::events;
use crate::lease::Kept;
use crate::state::AppState;

/// Logs the send's line and counts its decision, once (also for a send whose future was
/// dropped).
pub(super) fn finish(ctx: &mut SendCtx) {
    if std::mem::replace(&mut ctx.reported, true) {
        return;
    }
    let Some((outcome, reason)) = ctx.decision else {
        // Ended before a decision (Nylas refused a look-up, say): nothing was charged.
        tracing::debug!(request_id = %ctx.request_id, kind = ctx.kind.as_str(), "send ended before a decision");
        return;
    };
    ctx.metrics.decision(outcome, reason);
    let upstream = ctx.upstream.as_ref();
    tracing::info!(
        request_id = %ctx.request_id,
        grant = ctx.subject.as_deref().unwrap_or(""),
        kind = ctx.kind.as_str(),
        decision = outcome.as_str(),
        reason,
        settled = ctx.settlement.map(|s| s.as_str()),
        upstream_status = upstream.map(|u| u.status),
        upstream_ms = upstream.map(|u| u.took.as_secs_f64() * 1000.0),
        nylas_request_id = upstream.and_then(|u| u.request_id.as_ref()).and_then(|v| v.to_str().ok()),
        "send decision"
    );
}

/// Reports the threshold crossings of what the send kept. Only a send that crosses a
/// level makes a store call here (at most two per window and period); the webhook itself
/// is posted in the background.
pub(super) async fn events(
    state: &AppState,
    ctx: &SendCtx,
    charged: &Charged,
    kept: Option<&Kept>,
) {
    let Some(kept) = kept else { return };
    let crossed = events::crossings(&kept.usage, kept.charged);
    if crossed.is_empty() {
        return;
    }
    let subject = ctx.subject.as_deref().unwrap_or("");
    state
        .events
        .report(&ctx.config.events, subject, &charged.scope, crossed)
        .await;
}
