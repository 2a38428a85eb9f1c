//! Nylas's `Idempotency-Key`: a repeated send gets the first answer back.
//!
//! Nylas keeps a send's answer for an hour per grant and replays it with
//! `Idempotent-Response: true`. A key reused while the first request is still running
//! gets 409 `api.concurrent_idempotent_request`; reused with another body, 409
//! `api.invalid_idempotent_request`. Only 2xx answers are kept, so a retry after a
//! failure is carried out anew.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::reply::ApiError;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The response header marking a replay.
pub const IDEMPOTENT_RESPONSE_HEADER: &str = "idempotent-response";
/// The longest key Nylas accepts.
pub(crate) const MAX_KEY_LEN: usize = 256;
/// How long Nylas keeps an answer.
const RETENTION: Duration = Duration::from_secs(3600);

/// A kept answer.
#[derive(Debug, Clone)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl StoredResponse {
    /// The replayed answer: the original one plus `Idempotent-Response: true`.
    pub(crate) fn replay(&self) -> Response {
        let mut response = Response::new(axum::body::Body::from(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        response
            .headers_mut()
            .insert(IDEMPOTENT_RESPONSE_HEADER, HeaderValue::from_static("true"));
        response
    }
}

#[derive(Debug)]
enum Entry {
    InFlight {
        fingerprint: Option<u64>,
    },
    Done {
        fingerprint: Option<u64>,
        response: StoredResponse,
        at: Instant,
    },
}

/// What to do with a request carrying a key.
#[derive(Debug)]
pub(crate) enum Begin {
    /// First use: carry the request out, then call `finish`.
    New,
    /// Seen before: answer this.
    Replay(StoredResponse),
    /// Refused.
    Conflict(ApiError),
}

/// The kept answers, by (scope, key); the scope is the canonical grant or domain.
#[derive(Debug, Default)]
pub(crate) struct Idempotency {
    entries: HashMap<(String, String), Entry>,
}

impl Idempotency {
    /// Looks a key up and marks it in flight when new.
    ///
    /// `fingerprint` identifies the body; `None` skips the comparison (multipart
    /// bodies differ by boundary between honest retries).
    pub(crate) fn begin(&mut self, scope: &str, key: &str, fingerprint: Option<u64>) -> Begin {
        let entry_key = (scope.to_owned(), key.to_owned());
        let same = |stored: Option<u64>| match (stored, fingerprint) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        match self.entries.get(&entry_key) {
            Some(Entry::InFlight { .. }) => {
                return Begin::Conflict(ApiError::new(
                    StatusCode::CONFLICT,
                    "api.concurrent_idempotent_request",
                    "a request with this idempotency key is still being processed",
                ));
            }
            Some(Entry::Done {
                fingerprint: stored,
                response,
                at,
            }) if at.elapsed() < RETENTION => {
                return if same(*stored) {
                    Begin::Replay(response.clone())
                } else {
                    Begin::Conflict(ApiError::new(
                        StatusCode::CONFLICT,
                        "api.invalid_idempotent_request",
                        "this idempotency key was used with another request body",
                    ))
                };
            }
            _ => {}
        }
        self.entries
            .insert(entry_key, Entry::InFlight { fingerprint });
        Begin::New
    }

    /// Ends an in-flight key: keeps `response`, or forgets the key when `None`.
    pub(crate) fn finish(&mut self, scope: &str, key: &str, response: Option<StoredResponse>) {
        let entry_key = (scope.to_owned(), key.to_owned());
        let Some(Entry::InFlight { fingerprint }) = self.entries.remove(&entry_key) else {
            return;
        };
        if let Some(response) = response {
            self.entries.insert(
                entry_key,
                Entry::Done {
                    fingerprint,
                    response,
                    at: Instant::now(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_kept_answer_is_replayed_per_scope() {
        let mut store = Idempotency::default();
        assert!(matches!(store.begin("g1", "k", Some(1)), Begin::New));
        assert!(
            matches!(store.begin("g1", "k", Some(1)), Begin::Conflict(e) if e.error_type == "api.concurrent_idempotent_request")
        );
        store.finish("g1", "k", Some(stored()));
        assert!(matches!(store.begin("g1", "k", Some(1)), Begin::Replay(_)));
        assert!(
            matches!(store.begin("g1", "k", Some(2)), Begin::Conflict(e) if e.error_type == "api.invalid_idempotent_request")
        );
        assert!(matches!(store.begin("g2", "k", Some(1)), Begin::New));
    }

    #[test]
    fn a_failed_request_frees_its_key() {
        let mut store = Idempotency::default();
        assert!(matches!(store.begin("g", "k", None), Begin::New));
        store.finish("g", "k", None);
        assert!(matches!(store.begin("g", "k", None), Begin::New));
    }

    #[test]
    fn replays_are_marked() {
        let response = stored().replay();
        assert_eq!(response.headers()[IDEMPOTENT_RESPONSE_HEADER], "true");
    }
}
