//! Phase 4, forward: the request goes to the one upstream, its body replayed from what
//! inspection read and then streamed, metered against the size limit.

use std::time::Instant;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, header};

use super::ctx::SendCtx;
use super::report::UpstreamSeen;
use crate::send::{Overflow, UpstreamBody};
use crate::state::AppState;
use crate::upstream::UpstreamError;

/// What forwarding produced: Nylas's answer or why there was none, and how the body went.
#[derive(Debug)]
pub(super) struct Sent {
    pub result: Result<axum::response::Response, UpstreamError>,
    pub overflow: Overflow,
}

/// Sends the request upstream.
pub(super) async fn forward(
    state: &AppState,
    ctx: &mut SendCtx,
    mut parts: Parts,
    body: UpstreamBody,
) -> Sent {
    // Nylas's answer settles the send (its recipients, a provider throttle): ask for it
    // uncompressed, so the gateway reads what Nylas says rather than skipping a gzip body.
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let overflow = body.overflow();
    let length = body.content_length();
    // The proxy normalised the target before classifying it; it goes out as it is.
    let target = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let started = Instant::now();
    let result = state
        .upstream
        .send(
            parts.method,
            &target,
            parts.headers,
            body.into_body(),
            length,
        )
        .await;
    let took = started.elapsed();
    let status = result.as_ref().map_or(0, |r| r.status().as_u16());
    state.metrics.upstream(status, took);
    ctx.record.upstream = Some(UpstreamSeen {
        status,
        request_id: result
            .as_ref()
            .ok()
            .and_then(|r| r.headers().get(crate::error::REQUEST_ID).cloned()),
        took,
    });
    Sent { result, overflow }
}
