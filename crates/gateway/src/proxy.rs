//! The proxy's one handler: it only routes. A request that sends mail goes through the
//! [`pipeline`](crate::pipeline); a change of a saved draft is relayed under the draft's
//! lock; a cancel of a scheduled send is relayed and then gives its charge back
//! ([`schedules`](crate::schedules)); everything else is relayed untouched.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header;

use crate::clients;
use crate::config::OnUnavailable;
use crate::drafts::{DraftLock, LOCK_WAIT, LockError};
use crate::error::GatewayError;
use crate::grants::Resolution;
use crate::pipeline;
use crate::schedules;
use crate::scope::Scope;
use crate::send::{SendRoute, classify, classify_draft_change, classify_schedule_cancel};
use crate::state::AppState;
use crate::upstream::strip_hop_by_hop;

/// Headers some HTTP front ends read as the request's real method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Handles every request on the proxy listener.
pub async fn handle(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let _in_flight = state.metrics.in_flight();
    // Decide on exactly what goes upstream: the end-to-end headers (hop-by-hop ones and any
    // the client names in `Connection` are dropped, so none can steer a decision and then
    // vanish), and the target as it will be sent (`\` becomes `/`, dot segments go), so a
    // send cannot pass as something else.
    strip_hop_by_hop(req.headers_mut());
    // A front end that honours a method override would read another request than the
    // one classified here: these never go upstream.
    for name in METHOD_OVERRIDES {
        req.headers_mut().remove(name);
    }
    // Before anything else is asked of the store or of Nylas.
    let caller = match clients::authenticate(&state, &mut req) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let target = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match state.upstream.normalise_target(&target) {
        Some(pq) => *req.uri_mut() = pq.into(),
        None => return GatewayError::BadTarget.into_response(),
    }
    if let Some(caller) = &caller {
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        if let Err(resp) = clients::permit(&state, caller, req.uri(), auth.as_ref()).await {
            return resp;
        }
    }
    if let Some(route) = classify_draft_change(req.method(), req.uri()) {
        return draft_change(&state, route, req).await;
    }
    if let Some(cancel) = classify_schedule_cancel(req.method(), req.uri()) {
        return schedules::cancel(&state, cancel, req).await;
    }
    match classify(req.method(), req.uri()) {
        Some(route) if counted(&state, &route, caller.as_ref()) => {
            pipeline::send(&state, route, req).await
        }
        _ => relay(&state, req).await,
    }
}

/// Whether a send is counted: domain sends only when `[domains] profile` is set, or when
/// the client has a quota of its own.
fn counted(state: &AppState, route: &SendRoute, caller: Option<&clients::Caller>) -> bool {
    !matches!(route, SendRoute::Domain { .. })
        || state.config().domain_profile().is_some()
        || caller.is_some_and(|c| c.profile().is_some())
}

/// Relays a request that is not a counted send, byte for byte, and its answer likewise.
async fn relay(state: &AppState, req: Request) -> Response {
    match state.upstream.relay(req).await {
        Ok(resp) => resp,
        Err(e) => GatewayError::upstream("upstream request", &e).into_response(),
    }
}

/// Relays a change of a saved draft under the draft's lock, so that it never overlaps a
/// send of the same draft (see [`crate::drafts`]).
async fn draft_change(state: &AppState, route: SendRoute, req: Request) -> Response {
    let SendRoute::Draft {
        grant, draft_id, ..
    } = &route
    else {
        return relay(state, req).await;
    };
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    // Never relayed without the lock: an identifier the gateway refuses, a look-up that
    // fails or that Nylas refuses ends the change here, as it would end a send.
    let id = match state
        .grants
        .resolve(&state.upstream, grant, auth.as_ref())
        .await
    {
        Ok(Resolution::Grant(id)) => id,
        Ok(Resolution::Refused(resp)) => return resp,
        Err(e) => return e.into_response(),
    };
    let config = state.config();
    let store = Arc::clone(&state.store);
    let timeout = state.upstream.timeout();
    match DraftLock::acquire(store, &Scope::grant(&id), draft_id, timeout, LOCK_WAIT).await {
        Ok(lock) => {
            let resp = relay(state, req).await;
            lock.release().await;
            resp
        }
        Err(LockError::Busy) => GatewayError::DraftBusy.into_response(),
        Err(LockError::Store(_)) if config.store.on_unavailable != OnUnavailable::Reject => {
            relay(state, req).await
        }
        Err(LockError::Store(e)) => GatewayError::QuotaUnavailable(e.to_string()).into_response(),
    }
}
