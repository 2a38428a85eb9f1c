//! Phase 2, what it costs: the body read just far enough to count the send (see
//! [`crate::send`]), or, for a draft, the draft as Nylas holds it, read under the draft's
//! lock.

use axum::body::Body;
use http::HeaderMap;

use std::sync::Arc;

use super::charged::Charged;
use super::ctx::{SendCtx, Stop};
use crate::config::OnUnavailable;
use crate::drafts::{DraftLock, LOCK_WAIT, LockError};
use crate::error::GatewayError;
use crate::metrics::Outcome;
use crate::send::{
    InspectError, InspectOptions, SendCost, SendRoute, UpstreamBody, cost_from_message_bytes,
    inspect,
};
use crate::state::AppState;
use crate::upstream::relay_buffered;

/// A send whose cost is known, with the body to forward.
#[derive(Debug)]
pub(super) struct Priced {
    pub cost: SendCost,
    /// Whether `cost.size` covers the whole message (false for a chunked body still
    /// streaming).
    pub size_known: bool,
    pub body: UpstreamBody,
}

/// Costs the send.
pub(super) async fn what(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    route: &SendRoute,
    headers: &HeaderMap,
    body: Body,
) -> Result<Priced, Stop> {
    let opts = InspectOptions {
        json_limit: ctx.config.server.max_json_body,
        max_message_size: enforced_size_cap(ctx, charged),
        ..InspectOptions::default()
    };
    let inspected = match inspect(route, headers, body, &opts).await {
        Ok(i) => i,
        // Over the gateway's JSON buffer, not the provider's limit: say so.
        // Only for a JSON body, and only when the provider's cap would let it through as
        // multipart (a `message` part over the buffer is a multipart send already).
        Err(InspectError::TooLarge { size, limit })
            if limit == opts.json_limit as u64
                && super::settle::is_json(headers)
                && opts.max_message_size.is_none_or(|max| max > limit) =>
        {
            return Err(ctx.reject(GatewayError::JsonBodyTooLarge { size, limit }));
        }
        Err(e) => return Err(ctx.reject(inspect_error(e))),
    };
    let mut priced = Priced {
        cost: inspected.cost,
        size_known: inspected.size_known,
        body: inspected.body,
    };
    if inspected.draft_needs_lookup {
        let SendRoute::Draft { path, .. } = route else {
            return Err(ctx.reject(GatewayError::InvalidSendRequest("not a draft send".into())));
        };
        priced.cost = draft_cost(state, ctx, path).await?;
        // The draft's attachments carry their sizes: the whole message is known.
        priced.size_known = true;
    }
    Ok(priced)
}

/// The largest message any enforced profile of the send allows (the grant's or domain's,
/// and the client's own): a body is refused over it, and a streamed one cut off when it
/// grows past it. A profile in shadow lets a message over its cap go on (reported by
/// `admit`): nothing refuses it or cuts it off on its account.
fn enforced_size_cap(ctx: &SendCtx, charged: &Charged) -> Option<u64> {
    let client = charged.client.as_ref().map(|c| &c.profile);
    std::iter::once(&charged.profile)
        .chain(client)
        .filter(|p| !ctx.config.in_shadow(p))
        .filter_map(|p| p.max_message_size())
        .map(std::num::NonZero::get)
        .min()
}

/// Takes the lock of the draft `draft_id` before it is read (see [`crate::drafts`]).
/// `None` when the store failed and `on_unavailable = "allow"` goes on without it.
pub(super) async fn lock_draft(
    state: &AppState,
    ctx: &mut SendCtx,
    charged: &Charged,
    draft_id: &str,
) -> Result<Option<DraftLock>, Stop> {
    let store = Arc::clone(&state.store);
    let timeout = state.upstream.timeout();
    match DraftLock::acquire(store, &charged.scope, draft_id, timeout, LOCK_WAIT).await {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::Busy) => {
            ctx.decide(Outcome::Denied, "draft_busy");
            Err(Stop::Fail(GatewayError::DraftBusy))
        }
        Err(LockError::Store(_)) if ctx.config.store.on_unavailable != OnUnavailable::Reject => {
            Ok(None)
        }
        Err(LockError::Store(e)) => {
            ctx.decide(Outcome::StoreError, "draft_lock");
            Err(Stop::Fail(GatewayError::QuotaUnavailable(e.to_string())))
        }
    }
}

/// The cost of the draft at `path`, read from Nylas with the caller's credentials. A
/// refusal goes back to the caller as Nylas gave it.
async fn draft_cost(state: &AppState, ctx: &mut SendCtx, path: &str) -> Result<SendCost, Stop> {
    let (status, headers, body) = state
        .upstream
        .get_small(path, ctx.authorization.as_ref())
        .await
        .map_err(|e| GatewayError::upstream("draft look-up", &e))?;
    if !status.is_success() {
        return Err(Stop::Relay(Box::new(relay_buffered(
            status, &headers, body,
        ))));
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        let cause = "draft look-up answer is not JSON";
        return Err(Stop::Fail(GatewayError::UpstreamUnavailable(cause.into())));
    }
    cost_from_message_bytes(&body).map_err(|e| ctx.reject(inspect_error(e)))
}

/// The answer to a body that could not be counted.
pub(super) fn inspect_error(e: InspectError) -> GatewayError {
    match e {
        InspectError::Invalid(msg) | InspectError::Body(msg) => {
            GatewayError::InvalidSendRequest(msg)
        }
        InspectError::TooLarge { size, limit } => GatewayError::MessageTooLarge { size, limit },
        InspectError::Stalled => GatewayError::BodyTimeout,
    }
}
