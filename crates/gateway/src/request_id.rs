//! One request id per request, and the layer that assigns it.
//!
//! [`layer`] (an axum middleware, so a tower layer) sits outermost on both listeners: it
//! gives the request a [`RequestId`], puts it in the request's extensions, runs the rest
//! of the stack inside a `request` span carrying it, and makes it the task's
//! [`RequestId::current`] so the one place that renders errors (`error.rs`) writes the same
//! id in the body and the `X-Request-Id` header. When the response is an error the gateway
//! wrote, the layer logs its cause, once.
//!
//! Ids are a per-process random prefix and a counter (`sendgw-1f2e3d4c-000000000000002a`):
//! unique across replicas in practice, and free of a random-number call per request.

use std::fmt;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use http::StatusCode;

tokio::task_local! {
    static CURRENT: RequestId;
}

static PREFIX: LazyLock<u32> = LazyLock::new(rand_prefix);
static NEXT: AtomicU64 = AtomicU64::new(1);

fn rand_prefix() -> u32 {
    // The low bits of a v4 UUID: random per process.
    (uuid::Uuid::new_v4().as_u128() & u128::from(u32::MAX)) as u32
}

/// A request's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId {
    prefix: u32,
    seq: u64,
}

impl RequestId {
    /// A fresh id.
    pub fn next() -> Self {
        RequestId {
            prefix: *PREFIX,
            seq: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The id of the request this task is handling, or a fresh one outside a request.
    pub fn current() -> Self {
        CURRENT.try_with(|id| *id).unwrap_or_else(|_| Self::next())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sendgw-{:08x}-{:016x}", self.prefix, self.seq)
    }
}

/// The request-id layer; see the module documentation.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let id = RequestId::next();
    req.extensions_mut().insert(id);
    let span = tracing::info_span!("request", request_id = %id);
    let resp = CURRENT
        .scope(id, next.run(req))
        .instrument(span.clone())
        .await;
    if let Some(failure) = resp.extensions().get::<Failure>() {
        span.in_scope(|| failure.log(id, resp.status()));
    }
    resp
}

/// What the request-id layer logs of an error the gateway answered.
#[derive(Debug, Clone)]
pub struct Failure {
    error_type: &'static str,
    cause: Option<String>,
}

impl Failure {
    /// A failure of `error_type` (the envelope's `error.type`), with its internal cause.
    pub fn new(error_type: &'static str, cause: Option<String>) -> Self {
        Failure { error_type, cause }
    }

    /// The internal cause, if any.
    pub fn cause(&self) -> Option<&str> {
        self.cause.as_deref()
    }

    /// Logs the failure once: server-side failures with their cause as warnings, refusals
    /// of the request at debug level (sends have their own decision line).
    pub fn log(&self, request_id: RequestId, status: StatusCode) {
        let cause = self.cause.as_deref().unwrap_or("");
        if status.is_server_error() {
            tracing::warn!(%request_id, status = status.as_u16(), error_type = self.error_type, cause, "request failed");
        } else {
            tracing::debug!(%request_id, status = status.as_u16(), error_type = self.error_type, "request refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_prefixed() {
        let (a, b) = (RequestId::next(), RequestId::next());
        assert_ne!(a, b);
        let text = a.to_string();
        assert!(text.starts_with("sendgw-"), "{text}");
        assert_eq!(text.len(), "sendgw-".len() + 8 + 1 + 16);
    }

    #[tokio::test]
    async fn the_current_id_is_the_scoped_one() {
        let id = RequestId::next();
        let seen = CURRENT.scope(id, async { RequestId::current() }).await;
        assert_eq!(seen, id);
        assert_ne!(RequestId::current(), id, "outside the scope a fresh id");
    }
}
