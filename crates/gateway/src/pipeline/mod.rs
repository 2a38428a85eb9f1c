//! The send path: one phase per file, in the order a send goes, around one per-request
//! context (`ctx.rs`: `SendCtx`) that the phases fill in.
//!
//! 1. `charged`: who is charged: the grant (resolved to its canonical id) or the domain,
//!    and the profile it is charged under.
//! 2. `cost`: what it costs: the body read just far enough to count it (or the draft read
//!    from Nylas).
//! 3. `admit`: per-message checks (no store call), then one reserve, which returns a
//!    [`Lease`](crate::lease::Lease).
//! 4. `forward`: the request goes upstream, its body streamed and metered.
//! 5. `settle`: Nylas's answer settles the lease: released when nothing was sent, kept
//!    (and corrected upwards to what Nylas says it sent) otherwise.
//! 6. `report`: the one log line, the decision metric and threshold events.
//!
//! In shadow (`shadow.rs`) a refusal is only reported: the send goes on, and what it would
//! have been refused for is charged once it went out.
//!
//! A phase that ends the send early returns a [`Stop`]: an error the gateway answers
//! (rendered in `error.rs`), or an answer of Nylas's relayed as it came.
//! (After pingora's `ProxyHttp` phases and their `CTX`.)

mod admit;
mod charged;
mod cost;
mod ctx;
mod forward;
mod report;
mod schedule;
mod settle;
mod shadow;

pub use schedule::{DEFER_HEADER, DEFERRED_UNTIL, scheduled_instant};
pub use shadow::WOULD_DENY;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use crate::error::GatewayError;
use crate::send::{SendRoute, query_names_a_counted_field};
use crate::state::AppState;
use ctx::{SendCtx, Stop};

/// Runs a send through the phases and answers it. Beyond `[server] max_in_flight_sends`
/// sends at once it is shed first: 503 with `Retry-After: 1`, before any store or upstream
/// call, so a flood of slow sends cannot queue without bound in front of the store.
pub async fn send(state: &AppState, route: SendRoute, req: Request) -> Response {
    let limit = state.config().server.max_in_flight_sends.get();
    let Some(_slot) = state.sends.try_take(limit) else {
        state.metrics.send_shed();
        return GatewayError::Overloaded.into_response();
    };
    let mut ctx = SendCtx::new(state, &route, &req);
    let resp = match phases(state, &mut ctx, &route, req).await {
        Ok(resp) => resp,
        Err(Stop::Relay(resp)) => *resp,
        Err(Stop::Fail(e)) => e.into_response(),
    };
    ctx.record.finish();
    resp
}

async fn phases(
    state: &AppState,
    ctx: &mut SendCtx,
    route: &SendRoute,
    req: Request,
) -> Result<Response, Stop> {
    let (mut parts, body) = req.into_parts();
    // Go's `FormValue` prefers a query value to the body's field of the same name.
    if query_names_a_counted_field(parts.uri.query()) {
        let what = "a `message` or `mime` field in the query string (Nylas could send it \
                    instead of the body's)";
        return Err(ctx.reject(GatewayError::InvalidSendRequest(what.into())));
    }
    let mut charged = charged::who(state, ctx, route).await?;
    // A draft is read, charged and sent under its lock, so no change lands in between.
    let lock = match route.draft_id() {
        Some(id) => cost::lock_draft(state, ctx, &charged, id).await?,
        None => None,
    };
    let outcome = async {
        let mut priced = cost::what(state, ctx, &charged, route, &parts.headers, body).await?;
        let ask = admit::Ask {
            cost: priced.cost,
            size_known: priced.size_known,
            at: schedule::charge_at(&priced.cost.schedule),
            defer: schedule::horizon(ctx, route, &parts.headers, &priced, &charged.profile)?,
        };
        // The gateway's own header never goes upstream.
        parts.headers.remove(DEFER_HEADER);
        let admitted = admit::admit(state, ctx, &mut charged, ask).await?;
        if let Some(secs) = admitted.deferred_to {
            priced.body = schedule::deferred_body(priced.body, secs);
        }
        let sent = forward::forward(state, ctx, parts, priced.body).await;
        let mut settled = settle::settle(state, ctx, &charged, admitted.lease, sent).await?;
        shadow::announce(ctx, &mut settled.response);
        if let Some(secs) = admitted.deferred_to {
            schedule::announce(&mut settled.response, secs);
        }
        let kept = settled.kept.as_ref();
        report::events(
            &state.events,
            &ctx.config.events,
            &ctx.record,
            &charged.scope,
            kept,
        )
        .await;
        Ok(settled.response)
    }
    .await;
    if let Some(lock) = lock {
        lock.release().await;
    }
    outcome
}

/// The sends in flight, against `[server] max_in_flight_sends` (read per send, so a reload
/// applies to the next one).
#[derive(Debug, Default)]
pub struct SendSlots(Arc<AtomicUsize>);

impl SendSlots {
    /// A slot, unless `limit` are taken; it is given back when dropped.
    pub fn try_take(&self, limit: usize) -> Option<SendSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| SendSlot(Arc::clone(&self.0)))
    }

    /// Sends in flight now.
    pub fn taken(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One send in flight; gives its slot back when dropped.
#[derive(Debug)]
pub struct SendSlot(Arc<AtomicUsize>);

impl Drop for SendSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = SendSlots::default();
        let a = slots.try_take(2).expect("first");
        let _b = slots.try_take(2).expect("second");
        assert!(slots.try_take(2).is_none(), "the third is shed");
        drop(a);
        assert_eq!(slots.taken(), 1);
        assert!(slots.try_take(2).is_some());
    }
}
