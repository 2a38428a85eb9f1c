//! Nylas response envelopes and the request id every answer carries.
//!
//! Nylas answers `{"request_id", "grant_id"?, "data"}` on success and
//! `{"request_id", "error": {"type", "message"}}` on failure, and repeats the request
//! id in the `X-Request-Id` header. The id is chosen once per request by the
//! intercepting middleware and reached here through a task-local, so handlers and
//! extractor rejections need not thread it through every call.

use std::future::Future;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// The header Nylas repeats the request id in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    static REQUEST_ID: String;
}

/// A fresh request id, shaped like Nylas's (a UUID).
pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The id of the request being answered, or a fresh one outside a request.
pub(crate) fn current_request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| new_request_id())
}

/// Runs `fut` with `id` as the current request id.
pub(crate) async fn with_request_id<F: Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// A JSON response with `X-Request-Id` set to `request_id`.
pub(crate) fn json_response(status: StatusCode, body: &Value, request_id: &str) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The Nylas error type Nylas uses for a status when nothing more precise is known.
pub(crate) fn default_error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "unauthorized",
        403 => "insufficient_scopes",
        404 => "not_found_error",
        409 => "api.concurrent_idempotent_request",
        429 => "rate_limit_error",
        504 => "provider_error",
        _ if status >= 500 => "internal_error",
        _ => "api_error",
    }
}

/// The error envelope body.
pub(crate) fn error_body(request_id: &str, error_type: &str, message: &str) -> Value {
    json!({
        "request_id": request_id,
        "error": { "type": error_type, "message": message },
    })
}

/// A successful answer: `{"request_id", "grant_id"?, "data"}`.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    status: StatusCode,
    grant_id: Option<String>,
    data: Value,
}

impl Reply {
    /// A 200 answer about `grant_id`.
    pub(crate) fn for_grant(grant_id: &str, data: Value) -> Self {
        Reply {
            status: StatusCode::OK,
            grant_id: Some(grant_id.to_owned()),
            data,
        }
    }

    /// A 200 answer with no top-level `grant_id` (grant lookups, domain sends).
    pub(crate) fn data(data: Value) -> Self {
        Reply {
            status: StatusCode::OK,
            grant_id: None,
            data,
        }
    }

    /// The same answer with another status.
    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let request_id = current_request_id();
        let mut body = json!({ "request_id": request_id });
        if let Some(grant_id) = self.grant_id {
            body["grant_id"] = Value::String(grant_id);
        }
        body["data"] = self.data;
        json_response(self.status, &body, &request_id)
    }
}

/// A failed answer, rendered as the Nylas error envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error_type}: {message}")]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) error_type: String,
    pub(crate) message: String,
}

impl ApiError {
    /// An error with an explicit status and type.
    pub(crate) fn new(
        status: StatusCode,
        error_type: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// 400 `invalid_request_error`.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401 `unauthorized`.
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404 `not_found_error`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = current_request_id();
        let body = error_body(&request_id, &self.error_type, &self.message);
        json_response(self.status, &body, &request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_carry_the_scoped_request_id_in_body_and_header() {
        let response = with_request_id("req-1".into(), async {
            ApiError::not_found("no such grant").into_response()
        })
        .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[REQUEST_ID_HEADER], "req-1");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"request_id": "req-1", "error": {"type": "not_found_error", "message": "no such grant"}})
        );
    }

    #[test]
    fn default_error_types_follow_nylas() {
        assert_eq!(default_error_type(429), "rate_limit_error");
        assert_eq!(default_error_type(503), "internal_error");
        assert_eq!(default_error_type(504), "provider_error");
    }
}
