//! The grant registry and the identifier forms a `{grant_id}` path segment may take.
//!
//! Nylas accepts a grant id, `grant:<id>`, the grant's email, `email:<address>`,
//! `external:<id>` and `me` (the grant of the access token the caller presents).
//! The registry resolves all of them to the canonical id, as the gateway must.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::reply::ApiError;

/// The id of the grant every fake starts with.
pub const DEMO_GRANT_ID: &str = "6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b";
/// The email address of the demo grant.
pub const DEMO_GRANT_EMAIL: &str = "demo@example.com";
/// The external id of the demo grant.
pub const DEMO_GRANT_EXTERNAL_ID: &str = "demo";

/// A connected account, as `GET /v3/grants/{id}` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The canonical grant id (a UUID for real grants; any string here).
    #[serde(default = "new_grant_id")]
    pub id: String,
    /// The account's email address; matched case-insensitively.
    pub email: String,
    /// `google`, `microsoft`, `imap`, ... (see nylas-api.md).
    #[serde(default = "default_provider")]
    pub provider: String,
    /// `valid` or `invalid`; informational only.
    #[serde(default = "default_status")]
    pub grant_status: String,
    /// The id the application gave the grant, reachable as `external:<id>`.
    #[serde(default)]
    pub external_id: Option<String>,
}

fn new_grant_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn default_provider() -> String {
    "google".to_owned()
}

fn default_status() -> String {
    "valid".to_owned()
}

impl Grant {
    /// A valid Google grant for `email` with a fresh UUID id.
    pub fn new(email: impl Into<String>) -> Self {
        Grant {
            id: new_grant_id(),
            email: email.into(),
            provider: default_provider(),
            grant_status: default_status(),
            external_id: None,
        }
    }

    /// The grant every fake starts with ([`DEMO_GRANT_ID`], [`DEMO_GRANT_EMAIL`]).
    pub fn demo() -> Self {
        Grant::new(DEMO_GRANT_EMAIL)
            .with_id(DEMO_GRANT_ID)
            .with_external_id(DEMO_GRANT_EXTERNAL_ID)
    }

    /// The same grant with another id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The same grant with another provider.
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = provider.into();
        self
    }

    /// The same grant reachable as `external:<id>`.
    pub fn with_external_id(mut self, external_id: impl Into<String>) -> Self {
        self.external_id = Some(external_id.into());
        self
    }

    /// The `data` object of `GET /v3/grants/{id}`.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "grant_id": self.id,
            "provider": self.provider,
            "email": self.email,
            "grant_status": self.grant_status,
            "external_id": self.external_id,
            "scope": ["https://mail.google.com/"],
            "created_at": 1_700_000_000,
        })
    }
}

/// One parsed `{grant_id}` path segment (already percent-decoded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Identifier<'a> {
    Id(&'a str),
    Email(&'a str),
    External(&'a str),
    Me,
}

impl<'a> Identifier<'a> {
    /// Parses the decoded segment: prefixes first, then `me`, then "has an @".
    pub(crate) fn parse(segment: &'a str) -> Self {
        if let Some(id) = segment.strip_prefix("grant:") {
            Identifier::Id(id)
        } else if let Some(email) = segment.strip_prefix("email:") {
            Identifier::Email(email)
        } else if let Some(external) = segment.strip_prefix("external:") {
            Identifier::External(external)
        } else if segment == "me" {
            Identifier::Me
        } else if segment.contains('@') {
            Identifier::Email(segment)
        } else {
            Identifier::Id(segment)
        }
    }
}

/// The registered grants and the access tokens that stand for them.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    by_id: BTreeMap<String, Grant>,
    tokens: HashMap<String, String>,
}

impl Grants {
    /// A registry holding only the demo grant.
    pub(crate) fn seeded() -> Self {
        let mut grants = Grants::default();
        grants.insert(Grant::demo());
        grants
    }

    /// Adds or replaces a grant.
    pub(crate) fn insert(&mut self, grant: Grant) {
        self.by_id.insert(grant.id.clone(), grant);
    }

    /// Makes `token` an access token of `grant_id` (for `me`).
    pub(crate) fn insert_token(&mut self, token: String, grant_id: String) {
        self.tokens.insert(token, grant_id);
    }

    /// Every grant, ordered by id.
    pub(crate) fn all(&self) -> Vec<Grant> {
        self.by_id.values().cloned().collect()
    }

    /// The grant `token` is an access token of, if it is one.
    pub(crate) fn token_grant(&self, token: &str) -> Option<&str> {
        self.tokens.get(token).map(String::as_str)
    }

    /// Whether `token` is a registered access token.
    pub(crate) fn is_token(&self, token: &str) -> bool {
        self.tokens.contains_key(token)
    }

    /// The grant a decoded identifier names, without checking authorization.
    pub(crate) fn lookup(&self, segment: &str, bearer: Option<&str>) -> Option<&Grant> {
        match Identifier::parse(segment) {
            // Nylas reads a UUID in any case, in braces or without dashes.
            Identifier::Id(id) => self.by_id.get(id).or_else(|| {
                let uuid = uuid::Uuid::try_parse(id).ok()?;
                self.by_id.get(&uuid.hyphenated().to_string())
            }),
            Identifier::Email(email) => self
                .by_id
                .values()
                .find(|g| g.email.eq_ignore_ascii_case(email)),
            Identifier::External(external) => self
                .by_id
                .values()
                .find(|g| g.external_id.as_deref() == Some(external)),
            Identifier::Me => self.by_id.get(self.token_grant(bearer?)?),
        }
    }

    /// Resolves a decoded identifier for a caller presenting `bearer`.
    ///
    /// # Errors
    /// 401 for `me` without a registered access token or for another grant's access
    /// token, 404 when nothing matches.
    pub(crate) fn resolve(&self, segment: &str, bearer: &str) -> Result<&Grant, ApiError> {
        if Identifier::parse(segment) == Identifier::Me && !self.is_token(bearer) {
            return Err(ApiError::unauthorized(
                "the grant identifier 'me' needs a grant access token",
            ));
        }
        let grant = self
            .lookup(segment, Some(bearer))
            .ok_or_else(|| ApiError::not_found(format!("grant '{segment}' not found")))?;
        match self.token_grant(bearer) {
            Some(owner) if owner != grant.id => Err(ApiError::unauthorized(
                "the access token does not belong to this grant",
            )),
            _ => Ok(grant),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Grants {
        let mut grants = Grants::seeded();
        grants.insert(Grant::new("Other@Example.com").with_id("g2"));
        grants.insert_token("tok-demo".into(), DEMO_GRANT_ID.into());
        grants
    }

    #[test]
    fn every_identifier_form_resolves_to_the_canonical_id() {
        let grants = registry();
        for segment in [
            DEMO_GRANT_ID,
            &format!("grant:{DEMO_GRANT_ID}"),
            DEMO_GRANT_EMAIL,
            "DEMO@example.com",
            &format!("email:{DEMO_GRANT_EMAIL}"),
            "external:demo",
            "me",
            "{6F1B0F3E-2A4C-4D8E-9B7A-3C5D2E1F0A9B}",
            "grant:6f1b0f3e2a4c4d8e9b7a3c5d2e1f0a9b",
        ] {
            let grant = grants.resolve(segment, "tok-demo").unwrap();
            assert_eq!(grant.id, DEMO_GRANT_ID, "{segment}");
        }
        assert_eq!(grants.resolve("other@example.com", "key").unwrap().id, "g2");
    }

    #[test]
    fn unknown_and_unauthorized_identifiers_are_refused() {
        let grants = registry();
        assert_eq!(
            grants
                .resolve("nobody@example.com", "key")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            grants.resolve("external:nope", "key").unwrap_err().status,
            404
        );
        assert_eq!(grants.resolve("me", "api-key").unwrap_err().status, 401);
        assert_eq!(grants.resolve("g2", "tok-demo").unwrap_err().status, 401);
    }
}
