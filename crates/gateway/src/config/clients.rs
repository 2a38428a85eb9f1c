//! `[[clients]]`: the applications allowed to use the proxy, each with its own token.
//!
//! A token is given as the hex of its SHA-256 (`token_sha256`, so the file holds no
//! secret) or read from an environment variable (`token_env`); either way only its digest
//! is kept. A token is never written out; `check-config` prints `token_sha256` as it is
//! (a digest, not a secret: the point of giving it is that the file holds none).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// Longest client name (it labels metrics and names a quota scope).
const MAX_NAME: usize = 64;

/// The SHA-256 of a client's token.
pub type TokenDigest = [u8; 32];

/// One `[[clients]]` entry.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// How logs and metrics name it: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64 characters.
    pub name: String,
    /// The lowercase or uppercase hex of the SHA-256 of its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// The environment variable its token is read from (at start-up and on reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// The grants it may use (any identifier form); none: every grant, unless `domains`
    /// is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
    /// The Nylas-managed sending domains it may use; none: every domain, unless `grants`
    /// is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// A profile of its own: its sends are charged against it as well as the grant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The digest of its token, once known.
    #[serde(skip)]
    pub digest: Option<TokenDigest>,
}

impl ClientConfig {
    /// Whether it may use only some grants or domains (then never the application-level
    /// endpoints, such as `GET /v3/grants` or webhooks).
    pub fn is_restricted(&self) -> bool {
        !self.grants.is_empty() || !self.domains.is_empty()
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("token_sha256", &self.token_sha256)
            .field("token_env", &self.token_env)
            .field("grants", &self.grants)
            .field("domains", &self.domains)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of `token`.
pub fn digest(token: &[u8]) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn key(i: usize, field: &str) -> String {
    format!("clients[{i}].{field}")
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn hex_digest(hex: &str) -> Option<TokenDigest> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

impl Config {
    /// Checks every `[[clients]]` entry against the rest of the configuration, and reads the
    /// digests of `token_sha256`.
    pub(super) fn check_clients(&mut self) -> Result<(), ConfigError> {
        if !self.clients.is_empty() && self.upstream.api_key.is_none() {
            return Err(ConfigError::new(
                "upstream.api_key",
                "must be set when [[clients]] are configured: the gateway sends it to Nylas \
                 in place of the client's token",
            ));
        }
        let key_is_a_header = |k: &str| k.bytes().all(|b| b.is_ascii_graphic());
        if !self.clients.is_empty()
            && !self
                .upstream
                .api_key
                .as_deref()
                .is_some_and(key_is_a_header)
        {
            return Err(ConfigError::new(
                "upstream.api_key",
                "must be printable ASCII: it is sent as `Authorization: Bearer <api_key>`",
            ));
        }
        for i in 0..self.clients.len() {
            self.check_client(i)?;
        }
        Ok(())
    }

    fn check_client(&mut self, i: usize) -> Result<(), ConfigError> {
        let c = &self.clients[i];
        if !valid_name(&c.name) {
            return Err(ConfigError::new(
                key(i, "name"),
                "a client name is 1 to 64 of A-Z, a-z, 0-9, '_', '.' and '-', starting with a letter or digit",
            ));
        }
        if self.clients[..i]
            .iter()
            .any(|o| o.name.eq_ignore_ascii_case(&c.name))
        {
            return Err(ConfigError::new(
                key(i, "name"),
                format!("{:?} names two clients (names compare in any case)", c.name),
            ));
        }
        if let Some(profile) = &c.profile {
            self.check_profile_exists(&key(i, "profile"), profile)?;
        }
        check_targets(i, c)?;
        let digest = match (&c.token_sha256, &c.token_env) {
            (Some(hex), None) => Some(hex_digest(hex).ok_or_else(|| {
                ConfigError::new(
                    key(i, "token_sha256"),
                    "must be the 64 hex digits of the token's SHA-256 \
                     (e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                )
            })?),
            (None, Some(var)) if !var.is_empty() && !var.contains(['=', '\0']) => None,
            (None, Some(_)) => {
                let msg = "must name an environment variable";
                return Err(ConfigError::new(key(i, "token_env"), msg));
            }
            _ => {
                return Err(ConfigError::new(
                    key(i, "token_sha256"),
                    "set exactly one of token_sha256 and token_env",
                ));
            }
        };
        if digest == Some(self::digest(b"")) {
            let msg = "is the SHA-256 of an empty token, which no request can present";
            return Err(ConfigError::new(key(i, "token_sha256"), msg));
        }
        self.clients[i].digest = digest;
        Ok(())
    }

    /// Reads the tokens of `token_env` clients from `env`, then checks that no two clients
    /// share a token.
    pub(super) fn resolve_client_tokens(
        mut self,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        for (i, c) in self.clients.iter_mut().enumerate() {
            let Some(var) = &c.token_env else { continue };
            let value = env.iter().find(|(k, _)| k == var).map(|(_, v)| v.as_str());
            let token = match value {
                Some(t)
                    if !t.is_empty()
                        && !t.contains(|ch: char| ch.is_whitespace() || ch.is_control()) =>
                {
                    t
                }
                Some(_) => {
                    let msg =
                        format!("${var} must be a token without spaces or control characters");
                    return Err(ConfigError::new(key(i, "token_env"), msg));
                }
                None => {
                    let msg = format!("${var} is not set");
                    return Err(ConfigError::new(key(i, "token_env"), msg));
                }
            };
            c.digest = Some(digest(token.as_bytes()));
        }
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(other) = self.clients[..i].iter().find(|o| o.digest == c.digest) {
                let field = if c.token_env.is_some() {
                    "token_env"
                } else {
                    "token_sha256"
                };
                let msg = format!("the same token as client {:?}", other.name);
                return Err(ConfigError::new(key(i, field), msg));
            }
        }
        Ok(self)
    }
}

/// A grant entry is an identifier Nylas resolves with the gateway's key (so never `me`);
/// a domain entry is a domain.
fn check_targets(i: usize, c: &ClientConfig) -> Result<(), ConfigError> {
    let bad = |s: &str| {
        s.trim().is_empty()
            || s.contains(|ch: char| ch.is_whitespace() || ch.is_control() || ch == '/')
    };
    for (j, grant) in c.grants.iter().enumerate() {
        if bad(grant) || grant.eq_ignore_ascii_case("me") {
            return Err(ConfigError::new(
                format!("clients[{i}].grants[{j}]"),
                "must be a grant id, an email address, email:<address> or external:<id> (not `me`)",
            ));
        }
    }
    for (j, domain) in c.domains.iter().enumerate() {
        if bad(domain.trim_end_matches('.')) {
            return Err(ConfigError::new(
                format!("clients[{i}].domains[{j}]"),
                "must be a domain name",
            ));
        }
    }
    Ok(())
}
