//! The proxy's one handler: it only routes. A request that sends mail goes through the
//! [`pipeline`](crate::pipeline); everything else is relayed untouched.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header;

use crate::error::GatewayError;
use crate::pipeline;
use crate::send::{SendRoute, classify};
use crate::state::AppState;
use crate::upstream::strip_hop_by_hop;

/// Handles every request on the proxy listener.
pub async fn handle(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let _in_flight = state.metrics.in_flight();
    // Decide on exactly what goes upstream: the end-to-end headers (hop-by-hop ones and any
    // the client names in `Connection` are dropped, so none can steer a decision and then
    // vanish), and the target as it will be sent (`\` becomes `/`, dot segments go), so a
    // send cannot pass as something else.
    strip_hop_by_hop(req.headers_mut());
    let target = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match state.upstream.normalise_target(&target) {
        Some(pq) => *req.uri_mut() = pq.into(),
        None => return GatewayError::BadTarget.into_response(),
    }
    match classify(req.method(), req.uri()) {
        Some(route) if counted(&state, &route) => pipeline::send(&state, route, req).await,
        _ => relay(&state, req).await,
    }
}

/// Whether a send is counted: domain sends only when `[domains] profile` is set.
fn counted(state: &AppState, route: &SendRoute) -> bool {
    !matches!(route, SendRoute::Domain { .. }) || state.config().domain_profile().is_some()
}

/// Relays a request that is not a counted send, byte for byte, and its answer likewise.
async fn relay(state: &AppState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // A request without a body goes on without one: a streamed body would add
    // `Transfer-Encoding: chunked` to a bodiless DELETE, PUT or POST.
    let body = if http_body::Body::is_end_stream(&body) {
        Body::empty()
    } else {
        body
    };
    let target = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match state
        .upstream
        .send(parts.method, &target, parts.headers, body, length)
        .await
    {
        Ok(resp) => resp,
        Err(e) => GatewayError::upstream("upstream request", &e).into_response(),
    }
}
