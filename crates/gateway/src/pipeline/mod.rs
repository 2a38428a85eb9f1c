//! The send path: one phase per file, in the order a send goes, around one per-request
//! context ([`SendCtx`]) that the phases fill in.
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
//! A phase that ends the send early returns a [`Stop`]: an error the gateway answers
//! (rendered in `error.rs`), or an answer of Nylas's relayed as it came.
//! (After pingora's `ProxyHttp` phases and their `CTX`.)

mod admit;
mod charged;
mod cost;
mod forward;
mod report;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};

use crate::config::Config;
use crate::error::GatewayError;
use crate::metrics::{Metrics, Outcome, Settlement};
use crate::request_id::RequestId;
use crate::send::{SendKind, SendRoute};
use crate::state::AppState;

/// How a send ends before its last phase.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The gateway answers with this error.
    Fail(GatewayError),
    /// Nylas's own answer (to a look-up) goes back as it came (boxed: a response is large
    /// next to an error, and most stops are errors).
    Relay(Box<Response>),
}

impl From<GatewayError> for Stop {
    fn from(e: GatewayError) -> Self {
        Stop::Fail(e)
    }
}

/// What the upstream answered, for the log line.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamSeen {
    /// Its status (0: no answer).
    pub status: u16,
    /// Nylas's `X-Request-Id`, when it sent one.
    pub request_id: Option<HeaderValue>,
    /// Until the response headers.
    pub took: Duration,
}

/// Everything the phases learn about one send.
#[derive(Debug)]
pub(crate) struct SendCtx {
    pub request_id: RequestId,
    pub kind: SendKind,
    /// The configuration as it was when the send arrived.
    pub config: Arc<Config>,
    /// The caller's credentials, for look-ups made on its behalf.
    pub authorization: Option<HeaderValue>,
    /// Who is charged, for logs: the canonical grant id or the domain.
    pub subject: Option<String>,
    pub decision: Option<(Outcome, &'static str)>,
    pub upstream: Option<UpstreamSeen>,
    pub settlement: Option<Settlement>,
    metrics: Arc<Metrics>,
    reported: bool,
}

impl SendCtx {
    fn new(state: &AppState, route: &SendRoute, req: &Request) -> Self {
        SendCtx {
            request_id: req
                .extensions()
                .get::<RequestId>()
                .copied()
                .unwrap_or_else(RequestId::current),
            kind: route.kind(),
            config: state.config(),
            authorization: req.headers().get(header::AUTHORIZATION).cloned(),
            subject: None,
            decision: None,
            upstream: None,
            settlement: None,
            metrics: Arc::clone(&state.metrics),
            reported: false,
        }
    }

    /// Records the decision (the last one recorded is the one reported).
    pub fn decide(&mut self, outcome: Outcome, reason: &'static str) {
        self.decision = Some((outcome, reason));
    }

    /// Records a per-message refusal and returns the error to answer with.
    pub fn reject(&mut self, err: GatewayError) -> Stop {
        self.decide(Outcome::StaticRejected, err.error_type());
        Stop::Fail(err)
    }
}

impl Drop for SendCtx {
    fn drop(&mut self) {
        // A send whose future was cancelled still gets its log line and metric.
        report::finish(self);
    }
}

/// Runs a send through the phases and answers it.
pub async fn send(state: &AppState, route: SendRoute, req: Request) -> Response {
    let mut ctx = SendCtx::new(state, &route, &req);
    let resp = match phases(state, &mut ctx, &route, req).await {
        Ok(resp) => resp,
        Err(Stop::Relay(resp)) => *resp,
        Err(Stop::Fail(e)) => e.into_response(),
    };
    report::finish(&mut ctx);
    resp
}

async fn phases(
    state: &AppState,
    ctx: &mut SendCtx,
    route: &SendRoute,
    req: Request,
) -> Result<Response, Stop> {
    let (parts, body) = req.into_parts();
    let mut charged = charged::who(state, ctx, route).await?;
    let priced = cost::what(state, ctx, &charged, route, &parts.headers, body).await?;
    let lease = admit::admit(state, ctx, &mut charged, priced.cost, priced.size_known).await?;
    let sent = forward::forward(state, ctx, parts, priced.body).await;
    let settled = settle::settle(state, ctx, &charged, lease, sent).await?;
    report::events(state, ctx, &charged, settled.kept.as_ref()).await;
    Ok(settled.response)
}
