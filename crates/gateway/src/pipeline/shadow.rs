//! Shadow mode (`[enforcement] mode = "shadow"`, or a profile's `shadow = true`): a send
//! that would be refused is reported instead, forwarded, and counted once it went out, so
//! an operator can watch what the gateway would refuse before it refuses anything.
//!
//! The decision is `shadow_denied` with the reason a refusal would have given (`messages`,
//! `too_many_recipients`, `provider_throttled`, ...), in the log line and in
//! `sendgw_decisions_total`, and the client sees it in the `Send-Gateway-Would-Deny`
//! header. What a refused reserve did not charge is charged with
//! [`QuotaStore::charge`](limits::QuotaStore::charge) (whatever the limits say) once Nylas
//! answered that it sent, or gave no answer (the safe side).

use std::time::Instant;

use axum::response::Response;
use http::HeaderValue;

use super::admit::AfterSend;
use super::ctx::SendCtx;
use crate::scope::Scope;
use crate::state::AppState;

/// The response header naming why a send forwarded in shadow would have been refused.
pub const WOULD_DENY: &str = "send-gateway-would-deny";

/// Charges what a refusal in shadow kept from being reserved (units are counted for the
/// grant's or domain's charge, `primary`, as a kept lease counts them). A store failure is
/// logged: the send is out, and shadow mode never holds it up.
pub(super) async fn charge_after(
    state: &AppState,
    ctx: &SendCtx,
    primary: &Scope,
    after: &[AfterSend],
) {
    for a in after {
        let started = Instant::now();
        let result = state
            .store
            .charge(a.scope.as_str(), &a.profile, a.cost, a.at)
            .await;
        state.metrics.store_call("charge", started.elapsed());
        match result {
            Ok(_) if a.scope == *primary => state.metrics.units(a.cost),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(request_id = %ctx.record.request_id, error = %e, "could not count a send forwarded in shadow");
            }
        }
    }
}

/// Names the refusal shadow mode let through, on the response.
pub(super) fn announce(ctx: &SendCtx, response: &mut Response) {
    if let Some(reason) = ctx.record.would_deny {
        response
            .headers_mut()
            .insert(WOULD_DENY, HeaderValue::from_static(reason));
    }
}
