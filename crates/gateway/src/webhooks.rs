//! `/v1/nylas/webhooks`: Nylas's outcome webhooks for scheduled sends.
//!
//! - `GET ?challenge=<value>`: the handshake Nylas makes when the webhook is registered;
//!   answered with the value, as plain text.
//! - `POST`: a notification. Its `X-Nylas-Signature` (the hex HMAC-SHA256 of the raw body
//!   with `[webhooks] secret`) is checked first, in constant time; a missing or wrong one is
//!   401 and changes nothing. `message.send_failed` gives the scheduled send's charge back,
//!   `message.send_success` keeps it (see [`crate::schedules`]); other types are ignored.
//!   Nylas delivers at least once: a notification id seen in the last 72 hours (on any
//!   replica, through the store) is answered 200 and settles nothing.
//!
//! Served on the admin listener, or on `[webhooks] listen` when set; notifications are
//! refused (404) while no secret is configured. Bodies, addresses and the secret are never logged.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode, header};
use serde_json::Value;

use crate::error::GatewayError;
use crate::schedules::{self, Outcome};
use crate::send::{GrantRef, grant_ref};
use crate::state::AppState;

/// The endpoint's path.
pub const PATH: &str = "/v1/nylas/webhooks";

/// The signature header.
pub const SIGNATURE: &str = "x-nylas-signature";

/// Largest notification read (Nylas's are a few KiB; truncated ones say so).
const MAX_BODY: usize = 1024 * 1024;

/// Longest challenge echoed.
const MAX_CHALLENGE: usize = 1024;

/// How long a notification id is remembered (Nylas retries for up to 72 hours).
const SEEN_FOR: Duration = Duration::from_secs(72 * 3600);

/// The store scope notification ids are remembered under.
const SEEN_SCOPE: &str = "webhooks";

/// The endpoint, for the admin router or a listener of its own.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(PATH, get(challenge).post(notification))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

#[derive(Debug, serde::Deserialize)]
struct Challenge {
    challenge: Option<String>,
}

/// Answered whether or not a secret is set: Nylas sends the challenge while registering the
/// webhook, before it hands out the secret.
async fn challenge(Query(q): Query<Challenge>) -> Result<Response, GatewayError> {
    let value = q.challenge.filter(|c| !c.is_empty()).ok_or_else(|| {
        GatewayError::InvalidWebhook("expected ?challenge=<value> (Nylas's handshake)".into())
    })?;
    if value.len() > MAX_CHALLENGE {
        return Err(GatewayError::InvalidWebhook("challenge too long".into()));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], value).into_response())
}

/// The configured secret; 404 while there is none.
fn secret(state: &AppState) -> Result<String, GatewayError> {
    let config = state.config();
    match &config.webhooks.secret {
        Some(s) => Ok(s.to_string()),
        None => Err(GatewayError::NotFound(
            "webhooks are not configured ([webhooks] secret)".into(),
        )),
    }
}

async fn notification(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GatewayError> {
    let secret = secret(&state)?;
    let signature = headers.get(SIGNATURE).map(http::HeaderValue::as_bytes);
    if !signature.is_some_and(|s| signed(secret.as_bytes(), &body, s)) {
        state.metrics.webhook("unknown", "bad_signature");
        return Err(GatewayError::WebhookSignature);
    }
    let note = Notification::parse(&body)?;
    let name = format!("n:{}", note.id);
    let first = state
        .store
        .meta_set_new(SEEN_SCOPE, &name, "1", SEEN_FOR)
        .await
        .map_err(|e| GatewayError::QuotaUnavailable(e.to_string()))?;
    if !first {
        state.metrics.webhook(note.kind_label(), "duplicate");
        return Ok(StatusCode::OK.into_response());
    }
    match settle(&state, &note).await {
        Ok(result) => {
            state.metrics.webhook(note.kind_label(), result);
            tracing::info!(id = %note.id, kind = note.kind_label(), grant = note.grant.as_deref().unwrap_or(""), schedule_id = note.schedule_id.as_deref().unwrap_or(""), result, "nylas webhook");
            Ok(StatusCode::OK.into_response())
        }
        Err(e) => {
            // Forget the id, so Nylas's retry is processed.
            let _ = state.store.meta_delete(SEEN_SCOPE, &name).await;
            state.metrics.webhook(note.kind_label(), "store_error");
            Err(GatewayError::QuotaUnavailable(e.to_string()))
        }
    }
}

/// Settles what `note` reports; the metric's result label.
async fn settle(state: &AppState, note: &Notification) -> Result<&'static str, limits::StoreError> {
    let outcome = match note.kind.as_str() {
        "message.send_failed" => Outcome::Failed,
        "message.send_success" => Outcome::Sent,
        _ => return Ok("ignored"),
    };
    let (Some(grant), Some(schedule_id)) = (&note.grant, &note.schedule_id) else {
        return Ok("unknown");
    };
    let found = schedules::settle(state, grant, schedule_id, outcome).await?;
    Ok(if found { "settled" } else { "unknown" })
}

/// Whether `signature` (hex, any case) is the HMAC-SHA256 of `body` under `secret`.
fn signed(secret: &[u8], body: &[u8], signature: &[u8]) -> bool {
    let Some(tag) = hex_decode(signature.trim_ascii()) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    // Constant time in the tag.
    ring::hmac::verify(&key, body, &tag).is_ok()
}

fn hex_decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// What the gateway reads of a notification.
#[derive(Debug)]
struct Notification {
    id: String,
    kind: String,
    /// The canonical grant id of `data.object.grant_id`.
    grant: Option<String>,
    schedule_id: Option<String>,
}

impl Notification {
    fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let bad = |what: &str| GatewayError::InvalidWebhook(format!("the notification {what}"));
        let v: Value = serde_json::from_slice(body).map_err(|_| bad("is not JSON"))?;
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let id = text(&v["id"])
            .filter(|id| !id.is_empty() && id.len() <= 256)
            .ok_or_else(|| bad("has no usable `id`"))?;
        let kind = text(&v["type"]).ok_or_else(|| bad("has no `type`"))?;
        let object = &v["data"]["object"];
        let grant = match object["grant_id"].as_str().map(grant_ref) {
            Some(GrantRef::Id(id)) => Some(id),
            _ => None,
        };
        let schedule_id = text(&object["schedule_id"]).filter(|s| !s.is_empty());
        Ok(Notification {
            id,
            kind,
            grant,
            schedule_id,
        })
    }

    /// The type as a metric label: the two handled ones by name, anything else `other`.
    fn kind_label(&self) -> &'static str {
        match self.kind.as_str() {
            "message.send_success" => "message.send_success",
            "message.send_failed" => "message.send_failed",
            _ => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, body);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn signatures_are_checked() {
        let body = br#"{"id":"1"}"#;
        let good = sign(b"s3cret", body);
        assert!(signed(b"s3cret", body, good.as_bytes()));
        assert!(signed(b"s3cret", body, good.to_uppercase().as_bytes()));
        assert!(!signed(b"other", body, good.as_bytes()));
        assert!(!signed(b"s3cret", br#"{"id":"2"}"#, good.as_bytes()));
        assert!(!signed(b"s3cret", body, &good.as_bytes()[2..]));
        assert!(!signed(b"s3cret", body, b"zz"));
        assert!(!signed(b"s3cret", body, b""));
    }

    #[test]
    fn notifications_name_their_grant_canonically() {
        let body = br#"{"id":"n1","type":"message.send_failed","data":{"object":{
            "grant_id":"6F1B0F3E-2A4C-4D8E-9B7A-3C5D2E1F0A9B","schedule_id":"s1"}}}"#;
        let n = Notification::parse(body).unwrap();
        assert_eq!(
            n.grant.as_deref(),
            Some("6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b")
        );
        assert_eq!(n.schedule_id.as_deref(), Some("s1"));
        let null_object = br#"{"id":"n2","type":"message.send_failed","data":{"object":null}}"#;
        let n = Notification::parse(null_object).unwrap();
        assert_eq!((n.grant, n.schedule_id), (None, None));
        assert!(Notification::parse(b"{}").is_err());
        assert!(Notification::parse(b"nope").is_err());
    }
}
