//! Shadow mode (`[enforcement] mode = "shadow"`, or a profile's `shadow = true`): a send
//! that would be refused is reported instead, counted and forwarded, so
//! an operator can watch what the gateway would refuse before it refuses anything.
//!
//! The decision is `shadow_denied` with the reason a refusal would have given (`messages`,
//! `too_many_recipients`, `provider_throttled`, ...), in the log line and in
//! `sendgw_decisions_total`, and the client sees it in the `Send-Gateway-Would-Deny`
//! header. What a refused reserve did not charge is charged with [`QuotaStore::charge`]
//! (whatever the limits say) before the send goes, and settled by its lease like any
//! charge: kept when Nylas sent it (or gave no answer, or the request ended before its
//! answer: the safe side), given back when Nylas sent nothing, remembered for a cancel
//! when Nylas scheduled it.
//!
//! [`QuotaStore::charge`]: limits::QuotaStore::charge

use axum::response::Response;
use http::HeaderValue;

use super::ctx::SendCtx;
use crate::metrics::Outcome;

/// The response header naming why a send forwarded in shadow would have been refused.
pub const WOULD_DENY: &str = "send-gateway-would-deny";

/// Names the refusal shadow mode let through, on the response of a send decided
/// `shadow_denied` (and only then).
pub(super) fn announce(ctx: &SendCtx, response: &mut Response) {
    if let Some((Outcome::ShadowDenied, reason)) = ctx.record.decision {
        response
            .headers_mut()
            .insert(WOULD_DENY, HeaderValue::from_static(reason));
    }
}
