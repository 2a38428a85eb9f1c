//! The one place gateway errors become HTTP responses.
//!
//! Handlers and the send pipeline return [`GatewayError`]; its [`IntoResponse`] writes
//! Nylas's error envelope with the request's id (from [`RequestId::current`]) in the body
//! and the `X-Request-Id` header, so the official SDKs raise a proper API error. Bodies of
//! 5xx answers say nothing internal: the cause travels in the response's extensions as a
//! [`Failure`], which the request-id layer logs once.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use limits::Denial;
use serde_json::json;

use crate::ratelimit;
use crate::request_id::{Failure, RequestId};
use crate::upstream::UpstreamError;

/// Header carrying the request id on every response the gateway writes.
pub const REQUEST_ID: &str = "x-request-id";

/// `Retry-After` of a send refused because the memory store is full.
const STORE_FULL_RETRY_SECS: u64 = 60;

/// A request the gateway answers itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// More unique recipients than the profile allows in one message.
    #[error("this message has {count} unique recipients; the limit per message is {limit}")]
    TooManyRecipients {
        /// Unique recipients counted.
        count: u64,
        /// The profile's cap.
        limit: u64,
    },
    /// The message is larger than the profile allows (or than the gateway buffers).
    #[error("this message is {size} bytes as the provider sees it; the limit is {limit}")]
    MessageTooLarge {
        /// Size counted so far (at least).
        size: u64,
        /// The cap that was exceeded.
        limit: u64,
    },
    /// A window's quota would be exceeded.
    #[error("{}", quota_message(.0))]
    QuotaExceeded(Box<Denial>),
    /// A JSON send body over `[server] max_json_body`: the gateway's buffer, not the
    /// provider's limit, so the answer says to send it as multipart.
    #[error(
        "this JSON send body is at least {size} bytes; JSON send bodies are read up to {limit} \
         bytes ([server] max_json_body, and Nylas takes at most 3 MB of JSON): send large \
         messages as multipart/form-data"
    )]
    JsonBodyTooLarge {
        /// Bytes read or declared (at least).
        size: u64,
        /// `[server] max_json_body`.
        limit: u64,
    },
    /// The send body could not be read.
    #[error("the send request could not be read: {0}")]
    InvalidSendRequest(String),
    /// The grant's provider throttled it recently; sends wait until the cool-down ends.
    #[error("the mail provider is throttling this account; try again later")]
    ProviderThrottled {
        /// Time left in the cool-down.
        retry_after: Duration,
    },
    /// The quota store failed and the gateway is configured to reject. Holds the cause,
    /// for the log only.
    #[error("the sending quota cannot be checked right now; try again shortly")]
    QuotaUnavailable(String),
    /// The memory store already holds `store.max_scopes` accounts and refused a new one.
    #[error(
        "the gateway is tracking as many accounts as it is configured to (store.max_scopes); \
         sends for accounts it already tracks go on; try again later"
    )]
    QuotaStoreFull,
    /// Nylas could not be reached (the cause, for the log only).
    #[error("the upstream API could not be reached")]
    UpstreamUnavailable(String),
    /// Nylas did not answer in time (the cause, for the log only).
    #[error("the upstream API did not answer in time")]
    UpstreamTimeout(String),
    /// A send of a draft and a change of the same draft would overlap; one waits its turn.
    #[error("this draft is being sent or changed by another request; try again shortly")]
    DraftBusy,
    /// An admin request without the right token.
    #[error("a valid admin token is required")]
    Unauthorized,
    /// A proxy request without the token of a configured client (`[[clients]]`).
    #[error("a valid client token is required (Authorization: Bearer <token>)")]
    ClientUnauthenticated,
    /// A client asked for a grant, domain or endpoint its `[[clients]]` entry does not allow.
    #[error("{0}")]
    ClientForbidden(String),
    /// A webhook notification whose `X-Nylas-Signature` is missing or does not match.
    #[error("the X-Nylas-Signature header does not match the body")]
    WebhookSignature,
    /// A webhook request that cannot be read.
    #[error("{0}")]
    InvalidWebhook(String),
    /// The request body went `[server] body_timeout` without a byte (a send still being
    /// counted is charged nothing; one being forwarded has its charge given back).
    #[error("the request body stopped arriving before its end")]
    BodyTimeout,
    /// `[server] max_in_flight_sends` sends are in flight; this one is shed before any
    /// store call.
    #[error("the gateway is handling as many sends as it is configured to; try again shortly")]
    Overloaded,
    /// The request head is larger than `[server] max_header_bytes`.
    #[error(
        "the request's headers are larger than the gateway accepts ({size} bytes; the limit is {limit})"
    )]
    HeadersTooLarge {
        /// The head's size, as counted.
        size: usize,
        /// `[server] max_header_bytes`.
        limit: usize,
    },
    /// A request target that cannot form an upstream URL.
    #[error("the request target is not a valid path")]
    BadTarget,
    /// An admin request that cannot be carried out as sent.
    #[error("{0}")]
    InvalidAdminRequest(String),
    /// An admin request for something that does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::TooManyRecipients { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::MessageTooLarge { .. } | GatewayError::JsonBodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            GatewayError::QuotaExceeded(_) | GatewayError::ProviderThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::InvalidSendRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::DraftBusy => StatusCode::CONFLICT,
            GatewayError::QuotaUnavailable(_)
            | GatewayError::QuotaStoreFull
            | GatewayError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Unauthorized
            | GatewayError::ClientUnauthenticated
            | GatewayError::WebhookSignature => StatusCode::UNAUTHORIZED,
            GatewayError::ClientForbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::InvalidWebhook(_) => StatusCode::BAD_REQUEST,
            GatewayError::InvalidAdminRequest(_) | GatewayError::BadTarget => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }

    /// The `error.type` of the envelope.
    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::TooManyRecipients { .. } => "too_many_recipients",
            GatewayError::MessageTooLarge { .. } | GatewayError::JsonBodyTooLarge { .. } => {
                "message_too_large"
            }
            GatewayError::QuotaExceeded(_) => "quota_exceeded",
            GatewayError::ProviderThrottled { .. } => "provider_throttled",
            GatewayError::InvalidSendRequest(_) => "invalid_send_request",
            GatewayError::BodyTimeout => "body_timeout",
            GatewayError::DraftBusy => "draft_busy",
            GatewayError::QuotaUnavailable(_) => "quota_unavailable",
            GatewayError::QuotaStoreFull => "quota_store_full",
            GatewayError::Overloaded => "overloaded",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::UpstreamUnavailable(_) => "upstream_unavailable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::Unauthorized | GatewayError::ClientUnauthenticated => "unauthorized",
            GatewayError::ClientForbidden(_) => "forbidden",
            GatewayError::WebhookSignature => "webhook_signature",
            GatewayError::InvalidWebhook(_) => "invalid_webhook",
            GatewayError::InvalidAdminRequest(_) | GatewayError::BadTarget => {
                "invalid_request_error"
            }
            GatewayError::NotFound(_) => "not_found_error",
        }
    }

    /// The answer to an upstream call that produced no response: 504 when it timed out,
    /// 408 when the client's body stalled on its way up, else 502. `what` names the call in
    /// the logged cause.
    pub fn upstream(what: &str, e: &UpstreamError) -> Self {
        if e.is_body_stall() {
            return GatewayError::BodyTimeout;
        }
        let cause = format!("{what}: {e}");
        if e.is_timeout() {
            GatewayError::UpstreamTimeout(cause)
        } else {
            GatewayError::UpstreamUnavailable(cause)
        }
    }

    /// The internal cause of an infrastructure failure, for the log.
    fn cause(&self) -> Option<&str> {
        match self {
            GatewayError::QuotaUnavailable(c)
            | GatewayError::UpstreamUnavailable(c)
            | GatewayError::UpstreamTimeout(c) => Some(c),
            _ => None,
        }
    }

    /// The response, with `request_id` in the body and the `X-Request-Id` header.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let mut error = json!({ "type": self.error_type(), "message": self.to_string() });
        let mut extra_headers = Vec::new();
        if let GatewayError::DraftBusy
        | GatewayError::QuotaUnavailable(_)
        | GatewayError::Overloaded = &self
        {
            // A store that failed is looked at again within a second (the breaker's probe);
            // a shed send finds room as soon as others finish.
            extra_headers.push((header::RETRY_AFTER, HeaderValue::from(1)));
        }
        // RFC 6750: a 401 names the scheme it wants (the proxy's clients, the admin API).
        if let GatewayError::ClientUnauthenticated = &self {
            let challenge = HeaderValue::from_static("Bearer realm=\"send-gateway\"");
            extra_headers.push((header::WWW_AUTHENTICATE, challenge));
        }
        if let GatewayError::Unauthorized = &self {
            let challenge = HeaderValue::from_static("Bearer realm=\"send-gateway-admin\"");
            extra_headers.push((header::WWW_AUTHENTICATE, challenge));
        }
        if let GatewayError::QuotaStoreFull = &self {
            // Room comes back as other accounts' counts expire: minutes to hours.
            extra_headers.push((
                header::RETRY_AFTER,
                HeaderValue::from(STORE_FULL_RETRY_SECS),
            ));
        }
        if let GatewayError::ProviderThrottled { retry_after } = &self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            extra_headers.push((header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        }
        if let GatewayError::QuotaExceeded(d) = &self {
            let retry = d.retry_after.map(|r| r.as_secs().max(1));
            error["quota"] = json!({
                "window": &*d.window,
                "metric": d.metric.as_str(),
                "limit": d.limit,
                "used": d.used,
                "requested": d.requested,
                "retry_after_seconds": retry,
            });
            // A scheduled send waits in vain: say which `send_at` would fit instead.
            if d.retry_after.is_none()
                && let Some(fits) = d.fits_at
            {
                error["quota"]["earliest_send_at"] = json!(fits.div_ceil(1000));
            }
            if let Some(secs) = retry {
                extra_headers.push((header::RETRY_AFTER, HeaderValue::from(secs)));
            }
            extra_headers.extend(ratelimit::headers(&d.usage));
        }
        let body = json!({ "request_id": request_id, "error": error });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID, v);
        }
        for (k, v) in extra_headers {
            headers.insert(k, v);
        }
        resp.extensions_mut().insert(Failure::new(
            self.error_type(),
            self.cause().map(str::to_owned),
        ));
        resp
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_with_id(&RequestId::current().to_string())
    }
}

/// The message of a quota refusal: what is used of which window, and when to try again
/// (the SDKs raise the message and drop `error.quota`): in how many seconds, or, for a
/// scheduled send, the earliest `send_at` that fits.
fn quota_message(d: &Denial) -> String {
    let mut text = format!(
        "sending quota exceeded: {} {} of {} used in the {} window",
        d.used, d.metric, d.limit, d.window
    );
    match (d.retry_after, d.fits_at) {
        (Some(r), _) => text.push_str(&format!("; try again in {} s", r.as_secs().max(1))),
        (None, Some(fits)) => text.push_str(&format!(
            "; the earliest send_at that fits is {}",
            fits.div_ceil(1000)
        )),
        (None, None) => {}
    }
    text
}

/// Whole seconds, at least 1, for a `Retry-After` header.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn envelopes_carry_the_request_id_in_body_and_header() {
        let resp =
            GatewayError::UpstreamTimeout("no answer in 1s".into()).into_response_with_id("abc");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()[REQUEST_ID], "abc");
        let failure = resp
            .extensions()
            .get::<Failure>()
            .expect("the cause, for the log");
        assert_eq!(failure.cause(), Some("no answer in 1s"));
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["error"]["type"], "upstream_timeout");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("in time"));
        assert!(!message.contains("1s"), "the cause stays out of the body");
    }
}
