//! Canonical grant ids: every identifier form of one grant shares one quota.
//!
//! Every identifier is looked up through `GET /v3/grants/{identifier}` with the caller's
//! credentials before anything is charged: a grant id (a UUID, with or without `grant:`,
//! in any of the spellings [`grant_ref`] reads, sent in its lowercase hyphenated form),
//! an email, `email:...`, `external:...` or `me`. A grant Nylas does not know (404) or a
//! caller it refuses (401/403) is answered with Nylas's own answer and charges nothing, so
//! a stranger can neither create quota keys nor hold a grant's quota. An answer is cached
//! for `[grants] cache_ttl` under the identifier and a SHA-256 of the caller's
//! credentials (never the credentials themselves): one caller's look-up never vouches for
//! another caller. Anything else is refused before any look-up.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::response::Response;
use http::HeaderValue;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::config::{TokenDigest, token_digest};
use crate::error::GatewayError;
use crate::send::{GrantRef, grant_ref};
use crate::upstream::{Upstream, relay_buffered};

/// Most cached resolutions; beyond it expired entries go, then everything.
const MAX_ENTRIES: usize = 100_000;

/// Characters escaped in a path segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b'\\')
    .add(b' ')
    .add(b'/')
    .add(b'?')
    .add(b'#')
    .add(b'%')
    .add(b'"')
    .add(b'<')
    .add(b'>');

/// `segment` percent-encoded for use as one path segment.
pub fn encode_segment(segment: &str) -> String {
    utf8_percent_encode(segment, SEGMENT).to_string()
}

/// The outcome of resolving an identifier.
#[derive(Debug)]
pub enum Resolution {
    /// The canonical grant id.
    Grant(String),
    /// Nylas refused the look-up; its answer goes back to the caller as is.
    Refused(Response),
}

/// The refusal of a path identifier that names no grant.
fn invalid_identifier() -> GatewayError {
    GatewayError::InvalidSendRequest(
        "the grant in the path must be a grant id (a UUID, optionally as grant:<id>), \
         an email address, email:<address>, external:<id> or me"
            .into(),
    )
}

/// The `data.id` of a grant look-up answer (a UUID in its canonical form), and its
/// `data.provider` (lowercased), each when present.
fn answered(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let text = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let id = text("/data/id").map(|id| match grant_ref(id) {
        // The same UUID spelled in another case is the same grant.
        GrantRef::Id(canonical) => canonical,
        _ => id.to_owned(),
    });
    (id, text("/data/provider").map(str::to_ascii_lowercase))
}

/// Resolves and caches grant identifiers.
#[derive(Debug)]
pub struct GrantResolver {
    ttl: Duration,
    cache: Mutex<HashMap<CacheKey, (String, Instant)>>,
}

/// An identifier's canonical spelling and the SHA-256 of the credentials it was looked
/// up with.
type CacheKey = (String, TokenDigest);

impl GrantResolver {
    /// A resolver whose answers live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        GrantResolver {
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The cache entry of an identifier for a caller: the identifier in its canonical
    /// spelling (a grant id lowercased and hyphenated, an email, with or without `email:`,
    /// ASCII-lowercased, an `external:` id as it is, since external ids are the
    /// application's, case included) and the SHA-256 of the caller's credentials, so that
    /// one caller's successful look-up never vouches for another's.
    fn cache_key(identifier: &str, authorization: Option<&HeaderValue>) -> CacheKey {
        let credential = token_digest(authorization.map_or(&b""[..], |a| a.as_bytes()));
        let (prefix, rest) = identifier.split_at(identifier.find(':').map_or(0, |i| i + 1));
        let name = if identifier.eq_ignore_ascii_case("me") {
            "me".to_owned()
        } else if prefix.eq_ignore_ascii_case("external:") {
            format!("external:{rest}")
        } else if prefix.eq_ignore_ascii_case("email:") {
            format!("email:{}", rest.to_ascii_lowercase())
        } else {
            // A canonical grant id or a bare email; neither contains `:`.
            identifier.to_ascii_lowercase()
        };
        (name, credential)
    }

    /// The canonical id of `identifier`.
    ///
    /// # Errors
    /// [`GatewayError::InvalidSendRequest`] for an identifier that is neither a grant id
    /// nor a form Nylas resolves (nothing is looked up); Nylas unreachable or too slow,
    /// or an answer without `data.id`.
    pub async fn resolve(
        &self,
        upstream: &Upstream,
        identifier: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<Resolution, GatewayError> {
        let (resolution, _) = self
            .resolve_seen(upstream, identifier, authorization)
            .await?;
        Ok(resolution)
    }

    /// [`GrantResolver::resolve`], and the grant's provider when Nylas was just asked and
    /// named it (so that learning the provider costs no second look-up).
    ///
    /// # Errors
    /// As [`GrantResolver::resolve`].
    pub async fn resolve_seen(
        &self,
        upstream: &Upstream,
        identifier: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<(Resolution, Option<String>), GatewayError> {
        // A grant id is looked up too: a grant Nylas does not know, or a caller it refuses,
        // must be answered before any charge. A 2xx confirms it; the id is its own.
        let (ident, known) = match grant_ref(identifier) {
            GrantRef::Id(id) => (id.clone(), Some(id)),
            GrantRef::NeedsResolution(ident) => (ident, None),
            GrantRef::Invalid => return Err(invalid_identifier()),
        };
        let key = Self::cache_key(&ident, authorization);
        let now = Instant::now();
        if let Some((id, at)) = self.lock().get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok((Resolution::Grant(id.clone()), None));
        }
        let path = format!("/v3/grants/{}", utf8_percent_encode(&ident, SEGMENT));
        let (status, headers, body) = upstream
            .get_small(&path, authorization)
            .await
            .map_err(|e| GatewayError::upstream("grant look-up", &e))?;
        if !status.is_success() {
            let refused = Resolution::Refused(relay_buffered(status, &headers, body));
            return Ok((refused, None));
        }
        let (answered_id, provider) = answered(&body);
        let id = known.or(answered_id).ok_or_else(|| {
            GatewayError::UpstreamUnavailable("grant look-up answer has no data.id".into())
        })?;
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            cache.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, (id.clone(), now));
        Ok((Resolution::Grant(id), provider))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, (String, Instant)>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
