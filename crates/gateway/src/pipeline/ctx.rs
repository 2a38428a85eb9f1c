//! The per-request context the phases fill in, and how a phase ends a send early.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderValue, header};

use super::report::Record;
use crate::clients::Caller;
use crate::config::Config;
use crate::error::GatewayError;
use crate::metrics::Outcome;
use crate::request_id::RequestId;
use crate::send::SendRoute;
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

/// Everything the phases learn about one send.
#[derive(Debug)]
pub(crate) struct SendCtx {
    /// The configuration as it was when the send arrived.
    pub config: Arc<Config>,
    /// The caller's credentials, for look-ups made on its behalf.
    pub authorization: Option<HeaderValue>,
    /// The configured client it came from (none without `[[clients]]`).
    pub client: Option<Caller>,
    /// What the send's log line and metric will say (reported once, also when the send's
    /// future is dropped).
    pub record: Record,
}

impl SendCtx {
    pub fn new(state: &AppState, route: &SendRoute, req: &Request) -> Self {
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .copied()
            .unwrap_or_else(RequestId::current);
        let client = req.extensions().get::<Caller>().cloned();
        let mut record = Record::new(request_id, route.kind(), Arc::clone(&state.metrics));
        record.client = client.as_ref().map(|c| c.name().to_owned());
        SendCtx {
            client,
            config: state.config(),
            authorization: req.headers().get(header::AUTHORIZATION).cloned(),
            record,
        }
    }

    /// Records the decision (the last one recorded is the one reported).
    pub fn decide(&mut self, outcome: Outcome, reason: &'static str) {
        self.record.decision = Some((outcome, reason));
    }

    /// Records a per-message refusal and returns the error to answer with.
    pub fn reject(&mut self, err: GatewayError) -> Stop {
        self.decide(Outcome::StaticRejected, err.error_type());
        Stop::Fail(err)
    }

    /// A refusal that shadow mode only reports (the first one found is the one reported):
    /// the decision becomes `shadow_denied` with this reason.
    pub fn would_deny(&mut self, reason: &'static str) {
        let reason = *self.record.would_deny.get_or_insert(reason);
        self.decide(Outcome::ShadowDenied, reason);
    }

    /// Refuses with `err`, or, in shadow, only reports it and lets the send go on.
    pub fn reject_unless_shadow(&mut self, shadow: bool, err: GatewayError) -> Result<(), Stop> {
        if shadow {
            self.would_deny(err.error_type());
            Ok(())
        } else {
            Err(self.reject(err))
        }
    }
}
