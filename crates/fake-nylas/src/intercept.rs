//! The middleware in front of every Nylas route: record, misbehave, replay.
//!
//! For each request outside `/__fake/` it
//! 1. picks the request id and reads the whole body, recording the request when the
//!    body ends; an aborted body is recorded with `complete: false`, also when the
//!    connection drops and the handler future is dropped with it (a drop guard);
//! 2. applies the first matching [`crate::Rule`] (delay, forced answer);
//! 3. answers sends carrying `Idempotency-Key` from the idempotency store;
//! 4. otherwise runs the route, then makes any non-JSON error an error envelope and
//!    notes the status in the record.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use percent_encoding::percent_decode_str;

use crate::idempotency::{
    Begin, IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_RESPONSE_HEADER, MAX_KEY_LEN, StoredResponse,
};
use crate::record::{Recorded, SendKind, is_multipart};
use crate::reply::{
    ApiError, REQUEST_ID_HEADER, default_error_type, new_request_id, with_request_id,
};
use crate::state::Control;

/// Upper bound for pre-allocating a body from its `Content-Length`.
const MAX_PREALLOC: usize = 32 << 20;

/// Whether a path belongs to the control API (never recorded nor forced).
pub(crate) fn is_control_path(path: &str) -> bool {
    path == "/__fake" || path.starts_with("/__fake/")
}

/// The middleware; see the module docs.
pub(crate) async fn intercept(
    State(control): State<Control>,
    request: Request,
    next: Next,
) -> Response {
    if is_control_path(request.uri().path()) {
        return next.run(request).await;
    }
    let request_id = new_request_id();
    with_request_id(
        request_id.clone(),
        handle(control, request, next, request_id),
    )
    .await
}

async fn handle(control: Control, request: Request, next: Next, request_id: String) -> Response {
    let (parts, body) = request.into_parts();
    let send = SendKind::classify(
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
    );
    let mut recording = Recording::new(&control, &parts, send);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => recording.push(&chunk),
            Err(err) => {
                tracing::info!(method = %parts.method, path = parts.uri.path(), error = %err, "request body aborted");
                drop(recording);
                return ApiError::bad_request("the request body was cut short").into_response();
            }
        }
    }
    let (seq, body) = recording.finish();
    let body_len = body.len();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let response = answer(&control, parts, body, send, &request_id, next).await;
    let replay = response.headers().contains_key(IDEMPOTENT_RESPONSE_HEADER);
    control
        .lock()
        .records
        .set_outcome(seq, response.status().as_u16(), replay);
    control.notify_recorded();
    // Debug, not info: a load run must not flood (or block on) a piped stderr.
    tracing::debug!(
        method = %method,
        path,
        status = response.status().as_u16(),
        body_len,
        send = ?send,
        replay,
        "request"
    );
    response
}

async fn answer(
    control: &Control,
    parts: Parts,
    body: Bytes,
    send: Option<SendKind>,
    request_id: &str,
    next: Next,
) -> Response {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let rule = control.lock().rules.take(&parts.method, path_and_query);
    if let Some(rule) = rule {
        if let Some(delay) = rule.delay_duration() {
            tokio::time::sleep(delay).await;
        }
        if let Some(response) = rule.forced_response(request_id) {
            control.lock().records.stats.forced += 1;
            return response;
        }
    }
    let key = match send.map(|_| idempotency_key(&parts)).transpose() {
        Ok(key) => key.flatten(),
        Err(err) => return err.into_response(),
    };
    match key {
        Some(key) => with_idempotency(control, parts, body, key, next).await,
        None => run(parts, body, next, request_id).await,
    }
}

/// Runs the route and makes sure the answer looks like Nylas's.
async fn run(parts: Parts, body: Bytes, next: Next, request_id: &str) -> Response {
    let mut response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/json"));
    let status = response.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        // An axum rejection or internal error: keep the status, speak Nylas.
        let message = status.canonical_reason().unwrap_or("request failed");
        response =
            ApiError::new(status, default_error_type(status.as_u16()), message).into_response();
    }
    if !response.headers().contains_key(REQUEST_ID_HEADER)
        && let Ok(value) = HeaderValue::from_str(request_id)
    {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

fn idempotency_key(parts: &Parts) -> Result<Option<String>, ApiError> {
    let Some(value) = parts.headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?;
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// What a key is kept under: the canonical grant, or the domain.
fn idempotency_scope(control: &Control, parts: &Parts) -> String {
    let segments: Vec<&str> = parts
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let decoded = |raw: &str| percent_decode_str(raw).decode_utf8_lossy().into_owned();
    match segments.as_slice() {
        ["v3", "grants", grant, ..] => {
            let grant = decoded(grant);
            let bearer = crate::state::bearer_token(&parts.headers).ok();
            control
                .canonical_grant(&grant, bearer.as_deref())
                .map_or_else(|| format!("identifier:{grant}"), |id| format!("grant:{id}"))
        }
        ["v3", "domains", domain, ..] => format!("domain:{}", decoded(domain)),
        _ => format!("path:{}", parts.uri.path()),
    }
}

async fn with_idempotency(
    control: &Control,
    parts: Parts,
    body: Bytes,
    key: String,
    next: Next,
) -> Response {
    let scope = idempotency_scope(control, &parts);
    // Honest multipart retries differ by boundary; compare JSON bodies only.
    let fingerprint = (!is_multipart(&parts.headers)).then(|| {
        let mut hasher = DefaultHasher::new();
        body.hash(&mut hasher);
        hasher.finish()
    });
    let begin = control.lock().idempotency.begin(&scope, &key, fingerprint);
    match begin {
        Begin::Replay(stored) => stored.replay(),
        Begin::Conflict(err) => err.into_response(),
        Begin::New => {
            let mut guard = KeyGuard {
                control: control.clone(),
                scope,
                key,
                kept: None,
            };
            let request_id = crate::reply::current_request_id();
            let response = run(parts, body, next, &request_id).await;
            if !response.status().is_success() {
                return response;
            }
            let (response_parts, response_body) = response.into_parts();
            let Ok(bytes) = axum::body::to_bytes(response_body, usize::MAX).await else {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "could not buffer the answer",
                )
                .into_response();
            };
            guard.kept = Some(StoredResponse {
                status: response_parts.status,
                headers: response_parts.headers.clone(),
                body: bytes.clone(),
            });
            Response::from_parts(response_parts, Body::from(bytes))
        }
    }
}

/// Ends an in-flight idempotency key however the request ends, dropped included.
struct KeyGuard {
    control: Control,
    scope: String,
    key: String,
    kept: Option<StoredResponse>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let kept = self.kept.take();
        self.control
            .lock()
            .idempotency
            .finish(&self.scope, &self.key, kept);
    }
}

/// A request being received; recorded as incomplete if dropped before `finish`.
struct Recording {
    control: Control,
    recorded: Option<Recorded>,
    buffer: BytesMut,
}

impl Recording {
    fn new(control: &Control, parts: &Parts, send: Option<SendKind>) -> Self {
        let expected = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        Recording {
            control: control.clone(),
            recorded: Some(Recorded {
                seq: 0,
                method: parts.method.clone(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts.headers.clone(),
                body: Bytes::new(),
                body_len: 0,
                complete: false,
                send,
                status: None,
                idempotent_replay: false,
            }),
            buffer: BytesMut::with_capacity(expected.min(MAX_PREALLOC)),
        }
    }

    fn push(&mut self, chunk: &Bytes) {
        self.buffer.extend_from_slice(chunk);
    }

    /// Records the complete request; returns its sequence number and body.
    fn finish(mut self) -> (u64, Bytes) {
        let body = std::mem::take(&mut self.buffer).freeze();
        let seq = self.store(true, &body);
        (seq, body)
    }

    fn store(&mut self, complete: bool, body: &Bytes) -> u64 {
        let Some(mut recorded) = self.recorded.take() else {
            return 0;
        };
        recorded.complete = complete;
        recorded.body_len = body.len() as u64;
        let seq = {
            let mut inner = self.control.lock();
            if inner.records.record_bodies {
                recorded.body = body.clone();
            }
            inner.records.push(recorded)
        };
        self.control.notify_recorded();
        seq
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.recorded.is_some() {
            let body = std::mem::take(&mut self.buffer).freeze();
            self.store(false, &body);
        }
    }
}
