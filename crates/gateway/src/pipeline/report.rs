//! Phase 6, report: the one log line of a send, its decision metric, and the threshold
//! events of what it kept.
//!
//! The line carries the gateway's request id and Nylas's (`nylas_request_id`), the upstream
//! status and latency, so a support ticket quoting either id finds it. It never carries an
//! address, a subject or a body.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::EventsConfig;
use crate::events::{self, Reporter};
use crate::lease::Kept;
use crate::metrics::{Metrics, Outcome, Settlement};
use crate::request_id::RequestId;
use crate::scope::Scope;
use crate::send::SendKind;

/// What the upstream answered, for the log line.
#[derive(Debug, Clone)]
pub(super) struct UpstreamSeen {
    /// Its status (0: no answer).
    pub status: u16,
    /// Nylas's `X-Request-Id`, when it sent one.
    pub request_id: Option<HeaderValue>,
    /// Until the response headers.
    pub took: Duration,
}

/// What a send's log line and decision metric say, filled in by the phases and reported
/// once: by [`Record::finish`], or when dropped with a send whose future was cancelled.
#[derive(Debug)]
pub(crate) struct Record {
    pub request_id: RequestId,
    pub kind: SendKind,
    /// Who is charged: the canonical grant id or the domain.
    pub subject: Option<String>,
    /// The configured client that sent it, by name.
    pub client: Option<String>,
    /// In shadow: why it would have been refused (the first reason found).
    pub would_deny: Option<&'static str>,
    pub decision: Option<(Outcome, &'static str)>,
    pub upstream: Option<UpstreamSeen>,
    pub settlement: Option<Settlement>,
    /// The `send_at` (unix seconds) the send was charged at, when scheduled.
    pub scheduled_for: Option<u64>,
    /// Whether the gateway put the send off to `scheduled_for` instead of refusing it.
    pub deferred: bool,
    metrics: Arc<Metrics>,
    reported: bool,
}

impl Record {
    pub fn new(request_id: RequestId, kind: SendKind, metrics: Arc<Metrics>) -> Self {
        Record {
            request_id,
            kind,
            subject: None,
            client: None,
            would_deny: None,
            decision: None,
            upstream: None,
            settlement: None,
            scheduled_for: None,
            deferred: false,
            metrics,
            reported: false,
        }
    }

    /// The subject for logs (empty before it is known).
    pub fn subject(&self) -> &str {
        self.subject.as_deref().unwrap_or("")
    }

    /// Logs the send's line and counts its decision, once.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let Some((outcome, reason)) = self.decision else {
            // Ended before a decision (Nylas refused a look-up, say): nothing was charged.
            tracing::debug!(request_id = %self.request_id, kind = self.kind.as_str(), "send ended before a decision");
            return;
        };
        self.metrics.decision(outcome, reason);
        self.log(outcome, reason);
    }

    fn log(&self, outcome: Outcome, reason: &'static str) {
        let upstream = self.upstream.as_ref();
        tracing::info!(
            request_id = %self.request_id,
            grant = self.subject(),
            client = self.client.as_deref(),
            kind = self.kind.as_str(),
            decision = outcome.as_str(),
            reason,
            settled = self.settlement.map(|s| s.as_str()),
            send_at = self.scheduled_for,
            deferred = self.deferred,
            upstream_status = upstream.map(|u| u.status),
            upstream_ms = upstream.map(|u| u.took.as_secs_f64() * 1000.0),
            nylas_request_id = upstream.and_then(|u| u.request_id.as_ref()).and_then(|v| v.to_str().ok()),
            "send decision"
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // A send whose future was cancelled still gets its log line and metric.
        self.finish();
    }
}

/// Reports the threshold crossings of what the send kept. Only a send that crosses a
/// level makes a store call here (at most two per window and period); the webhook itself
/// is posted in the background.
pub(super) async fn events(
    reporter: &Reporter,
    config: &EventsConfig,
    record: &Record,
    scope: &Scope,
    kept: Option<&Kept>,
) {
    let Some(kept) = kept else { return };
    let crossed = events::crossings(&kept.usage, kept.charged);
    if crossed.is_empty() {
        return;
    }
    reporter
        .report(config, record.subject(), scope, crossed)
        .await;
}
