//! Clients (`[[clients]]`): who may use the proxy, for which grants and domains, and the
//! gateway's own Nylas key in place of theirs.
//!
//! Without clients configured every request passes with the caller's own credentials, as
//! Nylas would take them. With clients, a request must carry one client's token as
//! `Authorization: Bearer`, or it is answered 401 before any store or upstream call. Its
//! token is then replaced by `[upstream] api_key` (key injection): applications never hold
//! the Nylas key, and Nylas never sees their tokens. A client limited to some grants or
//! domains is answered 403 for any other, and for the application-level endpoints
//! (`GET /v3/grants`, webhooks, ...); a grant is compared by its canonical id, so every
//! spelling of an allowed grant is allowed and no spelling of another one is.
//!
//! Tokens are compared as SHA-256 digests, in constant time, against every client (so the
//! time taken says nothing about which client, if any, nearly matched). Logs and metrics
//! name the client, never its token.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Uri, header};
use limits::Profile;

use crate::config::{ClientConfig, Config, TokenDigest, token_digest};
use crate::error::GatewayError;
use crate::grants::Resolution;
use crate::request_id::RequestId;
use crate::scope::canonical_domain;
use crate::send::{PathSubject, path_subjects};
use crate::state::AppState;

/// The configured client a request authenticated as.
#[derive(Debug, Clone)]
pub struct Caller {
    config: Arc<Config>,
    index: usize,
}

impl Caller {
    /// Its `[[clients]]` entry.
    pub fn client(&self) -> &ClientConfig {
        &self.config.clients[self.index]
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.client().name
    }

    /// The profile of its own quota, if it has one, from the configuration it was
    /// authenticated under (a reload meanwhile changes nothing for this request).
    pub fn profile(&self) -> Option<&Profile> {
        self.config.profile(self.client().profile.as_deref()?)
    }
}

/// Authenticates a proxy request when clients are configured, and puts `[upstream]
/// api_key` in place of its token. `Ok(None)`: no clients, nothing changed.
///
/// # Errors
/// The 401 answer to a request without a configured client's token.
pub fn authenticate(state: &AppState, req: &mut Request) -> Result<Option<Caller>, GatewayError> {
    let config = state.config();
    if config.clients.is_empty() {
        return Ok(None);
    }
    let given = bearer(req.headers()).map(|t| token_digest(t.as_bytes()));
    let Some(index) = given.and_then(|d| matching(&config.clients, &d)) else {
        state.metrics.client_request("-", "unauthenticated");
        // Counted, and logged at debug only: anyone can send these, as many as they like.
        tracing::debug!(request_id = %RequestId::current(), "proxy request without a client token refused");
        return Err(GatewayError::ClientUnauthenticated);
    };
    let Some(key) = config
        .upstream
        .api_key
        .as_deref()
        .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok())
    else {
        // Validation requires the key with clients; never forward the client's token.
        return Err(GatewayError::UpstreamUnavailable(
            "no upstream.api_key".into(),
        ));
    };
    let mut key = key;
    key.set_sensitive(true);
    req.headers_mut().insert(header::AUTHORIZATION, key);
    let caller = Caller { config, index };
    req.extensions_mut().insert(caller.clone());
    Ok(Some(caller))
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The index of the client whose digest is `given`, looking at every client whatever
/// matches, each compared in constant time.
fn matching(clients: &[ClientConfig], given: &TokenDigest) -> Option<usize> {
    let mut found = None;
    for (i, c) in clients.iter().enumerate() {
        let Some(d) = &c.digest else { continue };
        let diff = d.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Lets a request for `uri` through when its client may use what the path names (every
/// reading of it, see [`path_subjects`]), and counts it. `auth` is the gateway's key, for
/// the look-ups.
///
/// # Errors
/// The 403 answer (also for an identifier Nylas does not know); 400 for one that names
/// no grant; 502/504 when Nylas cannot be asked.
pub async fn permit(
    state: &AppState,
    caller: &Caller,
    uri: &Uri,
    auth: Option<&HeaderValue>,
) -> Result<(), Response> {
    let client = caller.client();
    if client.is_restricted() {
        for subject in path_subjects(uri) {
            let allowed = match &subject {
                PathSubject::Application => false,
                PathSubject::Domain(d) => domain_allowed(client, d),
                PathSubject::Grant(ident) => grant_allowed(state, client, ident, auth).await?,
            };
            if !allowed {
                state.metrics.client_request(caller.name(), "forbidden");
                tracing::warn!(request_id = %RequestId::current(), client = caller.name(), "client refused: not one of its grants or domains");
                return Err(forbidden(&subject).into_response());
            }
        }
    }
    state.metrics.client_request(caller.name(), "authorized");
    Ok(())
}

fn forbidden(subject: &PathSubject) -> GatewayError {
    GatewayError::ClientForbidden(
        match subject {
            PathSubject::Grant(_) => "this client may not use this grant",
            PathSubject::Domain(_) => "this client may not use this domain",
            PathSubject::Application => {
                "this client may use only its grants and domains, not application-level endpoints"
            }
        }
        .into(),
    )
}

fn domain_allowed(client: &ClientConfig, domain: &str) -> bool {
    let domain = canonical_domain(domain);
    !domain.is_empty() && client.domains.iter().any(|d| canonical_domain(d) == domain)
}

/// Whether `identifier` names one of the client's grants, compared by canonical id. A
/// configured entry Nylas does not know allows nothing (and is logged); one that cannot be
/// looked up right now fails the request (502/504) rather than refusing it.
async fn grant_allowed(
    state: &AppState,
    client: &ClientConfig,
    identifier: &str,
    auth: Option<&HeaderValue>,
) -> Result<bool, Response> {
    if client.grants.is_empty() {
        return Ok(false);
    }
    let id = match state
        .grants
        .resolve(&state.upstream, identifier, auth)
        .await
    {
        Ok(Resolution::Grant(id)) => id,
        // Not one of its grants either way; Nylas's 404 would tell it which identifiers
        // are the application's grants.
        Ok(Resolution::Refused(_)) => return Ok(false),
        Err(e) => return Err(e.into_response()),
    };
    let mut failed = None;
    for entry in &client.grants {
        match state.grants.resolve(&state.upstream, entry, auth).await {
            Ok(Resolution::Grant(allowed)) if allowed == id => return Ok(true),
            Ok(Resolution::Grant(_)) => {}
            Ok(Resolution::Refused(resp)) => {
                let status = resp.status().as_u16();
                tracing::warn!(client = %client.name, status, "a grant of this client's [[clients]] entry is unknown to Nylas");
            }
            // Not a refusal: the answer may be yes once Nylas answers.
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => Err(e.into_response()),
        None => Ok(false),
    }
}
