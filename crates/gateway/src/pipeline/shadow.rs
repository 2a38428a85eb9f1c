//! Shadow mode (`[enforcement] mode = "shadow"`, or a profile's `shadow = true`): a send
//! that would be refused is reported instead, forwarded, and counted once it went out, so
//! an operator can watch what the gateway would refuse before it refuses anything.
//!
//! The decision is `shadow_denied` with the reason a refusal would have given (`messages`,
//! `too_many_recipients`, `provider_throttled`, ...), in the log line and in
//! `sendgw_decisions_total`, and the client sees it in the `Send-Gateway-Would-Deny`
//! header. What a refused reserve did not charge is owed ([`Owed`]) and charged with
//! [`QuotaStore::charge`] (whatever the limits say) once Nylas answered that it sent, or
//! gave no answer, or the request ended before its answer (the safe side).

use std::sync::Arc;
use std::time::Instant;

use axum::response::Response;
use http::HeaderValue;
use limits::QuotaStore;

use super::admit::AfterSend;
use super::ctx::SendCtx;
use crate::metrics::{Metrics, Outcome};
use crate::request_id::RequestId;
use crate::scope::Scope;
use crate::state::AppState;

/// The response header naming why a send forwarded in shadow would have been refused.
pub const WOULD_DENY: &str = "send-gateway-would-deny";

/// The charges a send forwarded in shadow owes (what a refusal kept from being reserved),
/// held across the forward like a lease: made once Nylas answered that it sent (or gave no
/// answer), forgotten when it answered that nothing was sent, and made in the background
/// when the request ends before its answer (its future dropped): it may have gone out.
#[must_use = "owed charges are made when settled or dropped"]
pub(super) struct Owed {
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    /// The grant's or domain's scope: its charge counts units, as a kept lease's does
    /// (none when `None`: a lease counts them).
    primary: Option<Scope>,
    charges: Vec<AfterSend>,
    request_id: RequestId,
}

impl Owed {
    pub(super) fn new(
        state: &AppState,
        ctx: &SendCtx,
        (primary, units): (&Scope, bool),
        charges: Vec<AfterSend>,
    ) -> Self {
        Owed {
            store: Arc::clone(&state.store),
            metrics: Arc::clone(&state.metrics),
            primary: units.then(|| primary.clone()),
            charges,
            request_id: ctx.record.request_id,
        }
    }

    /// Charges what is owed when the send went out (or may have); forgets it otherwise.
    pub(super) async fn settle(mut self, went_out: bool) {
        let charges = std::mem::take(&mut self.charges);
        if went_out {
            let (store, metrics) = (Arc::clone(&self.store), Arc::clone(&self.metrics));
            charge_all(
                store,
                metrics,
                self.primary.clone(),
                charges,
                self.request_id,
            )
            .await;
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        let charges = std::mem::take(&mut self.charges);
        if charges.is_empty() {
            return;
        }
        let (store, metrics) = (Arc::clone(&self.store), Arc::clone(&self.metrics));
        let (primary, request_id) = (self.primary.clone(), self.request_id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(charge_all(store, metrics, primary, charges, request_id));
            }
            Err(_) => {
                tracing::error!(request_id = %request_id, "a send forwarded in shadow ended without a runtime to count it");
            }
        }
    }
}

/// Charges each owed charge whatever the limits say. A store failure is logged: the send
/// is out, and shadow mode never holds it up.
async fn charge_all(
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    primary: Option<Scope>,
    charges: Vec<AfterSend>,
    request_id: RequestId,
) {
    for a in charges {
        let started = Instant::now();
        let result = store
            .charge(a.scope.as_str(), &a.profile, a.cost, a.at)
            .await;
        metrics.store_call("charge", started.elapsed());
        match result {
            Ok(_) if primary.as_ref() == Some(&a.scope) => metrics.units(a.cost),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(request_id = %request_id, error = %e, "could not count a send forwarded in shadow");
            }
        }
    }
}

/// Names the refusal shadow mode let through, on the response of a send decided
/// `shadow_denied` (and only then).
pub(super) fn announce(ctx: &SendCtx, response: &mut Response) {
    if let Some((Outcome::ShadowDenied, reason)) = ctx.record.decision {
        response
            .headers_mut()
            .insert(WOULD_DENY, HeaderValue::from_static(reason));
    }
}
