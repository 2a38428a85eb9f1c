//! Canonical grant ids: every identifier form of one grant shares one quota.
//!
//! A grant id (a UUID, with or without `grant:`, in any of the spellings
//! [`grant_ref`] reads) needs no look-up: it is canonicalised to the lowercase
//! hyphenated UUID. An email, `email:...`, `external:...` or
//! `me` is resolved once through `GET /v3/grants/{identifier}` with the caller's
//! credentials and cached for `[grants] cache_ttl`. `me` depends on the caller's token, so
//! its cache entry is keyed by a hash of the token (never the token itself). Anything
//! else is refused before any look-up, so it creates no store key and no upstream call.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::response::Response;
use http::HeaderValue;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

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

/// The `data.id` of a grant look-up answer; a UUID in its canonical form.
fn answered_id(body: &[u8]) -> Option<String> {
    let value = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let id = value
        .pointer("/data/id")?
        .as_str()
        .filter(|id| !id.is_empty())?;
    match grant_ref(id) {
        // The same UUID spelled in another case is the same grant.
        GrantRef::Id(canonical) => Some(canonical),
        _ => Some(id.to_owned()),
    }
}

/// Resolves and caches grant identifiers.
#[derive(Debug)]
pub struct GrantResolver {
    ttl: Duration,
    cache: Mutex<HashMap<String, (String, Instant)>>,
    hasher: std::collections::hash_map::RandomState,
}

impl GrantResolver {
    /// A resolver whose answers live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        GrantResolver {
            ttl,
            cache: Mutex::new(HashMap::new()),
            hasher: Default::default(),
        }
    }

    /// The cache entry of an identifier that needs resolving: `me` by a hash of the
    /// caller's token, an email (with or without `email:`) ASCII-lowercased, an
    /// `external:` id as it is (external ids are the application's, case included).
    fn cache_key(&self, identifier: &str, authorization: Option<&HeaderValue>) -> String {
        if identifier.eq_ignore_ascii_case("me") {
            let mut h = self.hasher.build_hasher();
            h.write(authorization.map_or(&b""[..], |a| a.as_bytes()));
            return format!("me#{:016x}", h.finish());
        }
        let (prefix, rest) = identifier.split_at(identifier.find(':').map_or(0, |i| i + 1));
        if prefix.eq_ignore_ascii_case("external:") {
            format!("external:{rest}")
        } else if prefix.eq_ignore_ascii_case("email:") {
            format!("email:{}", rest.to_ascii_lowercase())
        } else {
            format!("email:{}", identifier.to_ascii_lowercase())
        }
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
        let ident = match grant_ref(identifier) {
            GrantRef::Id(id) => return Ok(Resolution::Grant(id)),
            GrantRef::NeedsResolution(ident) => ident,
            GrantRef::Invalid => return Err(invalid_identifier()),
        };
        let key = self.cache_key(&ident, authorization);
        let now = Instant::now();
        if let Some((id, at)) = self.lock().get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(Resolution::Grant(id.clone()));
        }
        let path = format!("/v3/grants/{}", utf8_percent_encode(&ident, SEGMENT));
        let (status, headers, body) = upstream
            .get_small(&path, authorization)
            .await
            .map_err(|e| GatewayError::upstream("grant look-up", &e))?;
        if !status.is_success() {
            return Ok(Resolution::Refused(relay_buffered(status, &headers, body)));
        }
        let id = answered_id(&body).ok_or_else(|| {
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
        Ok(Resolution::Grant(id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
