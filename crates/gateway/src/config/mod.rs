//! Configuration: the TOML file, environment variables and flags over the defaults, and a
//! validation that names the key at fault.
//!
//! Every key is optional (an empty file is a valid configuration) and unknown keys are errors
//! at every level, so a typo in a limit can never pass silently. A [`ConfigError`] prints as
//! one line, `<key>: <message>`, which `send-gateway check-config` prints before exiting with
//! [`ConfigError::EXIT_CODE`]. The keys are described in `docs/configuration.md`.
//!
//! # Layering
//! [`Sources`] names where a configuration comes from: the file, the environment
//! (`SEND_GATEWAY__STORE__URL` sets `[store] url`) and command-line overrides, in that order
//! of precedence over the defaults. The environment is a plain list handed in, so tests never
//! touch the process environment, and [`Sources::load`] can be called again to reload.
//!
//! # Why figment
//! The file is parsed with the `toml` crate (for line and column of syntax errors); the
//! environment and flags are then applied to that tree as assignments to one key each
//! (see `sources.rs` for why not as figment layers), and the result is handed to [`figment`]
//! as one provider and extracted into serde structs with `deny_unknown_fields`. Figment is
//! there for its errors: it reports the path of the failing value, array indices included,
//! and a structured [`figment::error::Kind`] (unknown field, missing field, wrong type), from
//! which we write a one-line `profiles.x.windows[0].messages: ...`. Plain `toml` + serde gives
//! a multi-line message with a source excerpt and no key path.
//!
//! Figment's own TOML and env providers are not used (their features stay off): the first
//! would pull in a second, older `toml`, the second reads the process environment directly.

mod raw;
mod show;
mod sources;
#[cfg(test)]
mod tests;

pub use sources::{ENV_PREFIX, Sources};

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile as FigmentProfile, Provider};
use limits::{PolicyError, Profile, RedisConfig};
use reqwest::Url;
use serde::Deserialize;

use raw::RawConfig;
use sources::resolve;

/// Default `server.listen`: the proxy.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// Default `server.admin_listen`: health, metrics and the quota API.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// Default `server.shutdown_grace`: how long in-flight requests may finish after a signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// Default `server.max_json_body` (4 MiB): Nylas refuses JSON send bodies over 3 MB anyway.
pub const DEFAULT_MAX_JSON_BODY: usize = 4 * 1024 * 1024;
/// Default `upstream.url`: Nylas's US region.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.us.nylas.com";
/// Default `upstream.timeout`: a send waits on the provider behind Nylas, which can be slow.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(90);
/// Default `store.url`.
pub const DEFAULT_STORE_URL: &str = "redis://127.0.0.1:6379";
/// Default `store.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = limits::redis::DEFAULT_PREFIX;
/// Default `store.timeout`: the longest a send waits on the store.
pub const DEFAULT_STORE_TIMEOUT: Duration = limits::redis::DEFAULT_TIMEOUT;
/// Default `grants.default_profile`: the strictest of the built-ins.
pub const DEFAULT_PROFILE: &str = "icloud";
/// Default `grants.cache_ttl`: how long an identifier -> grant id resolution is reused.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Default `grants.provider_cache_ttl`: how long a grant's provider, once learnt, is reused.
pub const DEFAULT_PROVIDER_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Default `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default `events.timeout`: a slow webhook must not hold threshold events back for long.
pub const DEFAULT_EVENTS_TIMEOUT: Duration = Duration::from_secs(5);

/// What secrets are replaced with when the configuration is printed.
pub const MASK: &str = "***";

/// The whole configuration, validated.
///
/// Built by [`Config::from_toml_str`] or [`Config::load`]; [`Config::default`] is what an
/// empty file gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`: listeners and shutdown.
    pub server: ServerConfig,
    /// `[upstream]`: the Nylas API.
    pub upstream: UpstreamConfig,
    /// `[store]`: where quota counters live.
    pub store: StoreConfig,
    /// `[grants]`: how grants are matched to profiles.
    pub grants: GrantsConfig,
    /// `[domains]`: sends from Nylas-managed domains.
    pub domains: DomainsConfig,
    /// `[log]`: log format and level.
    pub log: LogConfig,
    /// `[events]`: where threshold events are posted.
    pub events: EventsConfig,
    /// Every profile by name: the built-ins, replaced or joined by `[profiles.<name>]`.
    pub profiles: BTreeMap<String, Profile>,
}

/// `[server]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where health, metrics and the quota API listen.
    pub admin_listen: SocketAddr,
    /// When set, quota changes on the admin listener need `Authorization: Bearer <token>`
    /// (an empty string in the file means unset).
    pub admin_token: Option<String>,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Largest JSON send body buffered for inspection, in bytes.
    pub max_json_body: usize,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_json_body", &self.max_json_body)
            .finish()
    }
}

/// `[upstream]`.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The Nylas API base: http or https, no query or fragment, and its path never ends in
    /// `/` unless it is the root (`https://api.us.nylas.com/`), so appending a request path
    /// to `url.path().trim_end_matches('/')` is always right.
    pub url: Url,
    /// Longest wait for Nylas on one request.
    pub timeout: Duration,
    /// The gateway's own Nylas API key, for the requests it makes itself (a grant's
    /// provider) when the caller's credentials are not at hand; `None` (an empty string in the
    /// file) means none. Never contains spaces or control characters.
    pub api_key: Option<String>,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where the counters live (`store.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In this process: one replica only, counts lost on restart.
    Memory,
    /// In Redis, shared by every replica.
    Redis,
}

/// What a send does when the store cannot be reached (`store.on_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Refuse the send with 503.
    Reject,
    /// Forward it uncounted; log and count the event.
    Allow,
}

/// `[store]`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Memory or Redis.
    pub backend: StoreBackend,
    /// Redis URL (`redis://`, `rediss://` or `redis+cluster://`); checked only for Redis.
    pub url: String,
    /// Prefix of every Redis key; never empty, never contains `{` or `}`.
    pub key_prefix: String,
    /// Longest wait for any one store call.
    pub timeout: Duration,
    /// What to do when the store fails.
    pub on_unavailable: OnUnavailable,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("url", &redact_userinfo(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("on_unavailable", &self.on_unavailable)
            .finish()
    }
}

/// `redis://user:secret@host` -> `redis://<redacted>@host`, so the URL can be logged.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<redacted>{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// `[grants]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantsConfig {
    /// Profile of grants that match no other rule; always names an existing profile.
    pub default_profile: String,
    /// How long an identifier -> grant id resolution is cached.
    pub cache_ttl: Duration,
    /// Whether each grant's provider is looked up (`GET /v3/grants/{id}`) to pick its profile
    /// from [`GrantsConfig::provider_profiles`].
    pub resolve_provider: bool,
    /// How long a grant's provider, once looked up, is reused.
    pub provider_cache_ttl: Duration,
    /// Nylas provider name (`google`, `microsoft`, `icloud`, `imap`, ...) -> profile name.
    /// Every provider name uses only `a-z`, `0-9`, `_` and `-`; every profile exists.
    pub provider_profiles: BTreeMap<String, String>,
}

/// `[domains]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainsConfig {
    /// Profile counting `/v3/domains/{domain}/messages/send`; `None` (an empty string in the
    /// file) leaves those sends uncounted. Always names an existing profile when set.
    pub profile: Option<String>,
}

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The name used in the file.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive (`info`, `gateway=debug,info`); always
    /// parses. `RUST_LOG`, when set, takes its place.
    pub level: String,
}

/// `[events]`.
#[derive(Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Where threshold events are posted as JSON; `None` (an empty string in the file) posts
    /// nothing. Always http or https.
    pub webhook_url: Option<Url>,
    /// Longest wait for the webhook on one event.
    pub timeout: Duration,
}

impl fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsConfig")
            .field(
                "webhook_url",
                &self.webhook_url.as_ref().map(show::mask_webhook_url),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A configuration that cannot be used, naming the key at fault.
///
/// Prints as one line, `<key>: <message>`, e.g.
/// `profiles.icloud.windows[0].messages: must be greater than zero`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    key: String,
    message: String,
}

impl ConfigError {
    /// Exit status of `send-gateway` on a bad configuration (`EX_USAGE` from sysexits.h).
    pub const EXIT_CODE: i32 = 64;

    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            // One line, whatever a dependency put in its message.
            message: message.into().replace(['\r', '\n'], " "),
        }
    }

    /// The dotted path of the key at fault (`store.timeout`, `profiles.x.windows[0].period`);
    /// for an unreadable file or a TOML syntax error, the file (or `toml`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same problem, blamed on `origin` (the environment variable that set the key).
    fn blame(self, origin: &str) -> Self {
        ConfigError {
            key: origin.to_owned(),
            message: self.message,
        }
    }
}

impl From<PolicyError> for ConfigError {
    fn from(err: PolicyError) -> Self {
        let field = err.field().to_owned();
        let text = err.to_string();
        let message = text
            .strip_prefix(&format!("{field}: "))
            .unwrap_or(&text)
            .to_owned();
        ConfigError::new(field, message)
    }
}

impl Default for Config {
    /// What an empty file gives: memory store, Nylas US, the built-in profiles, `icloud` for
    /// every grant.
    fn default() -> Self {
        Config::from_raw(RawConfig::default()).expect("the defaults are a valid configuration")
    }
}

impl Config {
    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// A TOML syntax error (key `toml`), or the first key that is unknown, of the wrong type
    /// or out of range.
    ///
    /// # Examples
    /// ```
    /// use gateway::config::Config;
    /// let err = Config::from_toml_str("[store]\ntimeout = \"fast\"").unwrap_err();
    /// assert_eq!(err.to_string(), "store.timeout: invalid duration \"fast\"");
    /// assert_eq!(err.key(), "store.timeout");
    /// ```
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_source(text, "toml")
    }

    /// Reads, parses and validates a file.
    ///
    /// # Errors
    /// As [`Config::from_toml_str`]; an unreadable file or a syntax error names the file.
    ///
    /// The file alone: for the environment and flags too, use [`Sources::load`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        resolve(read_toml_file(path)?, &[])
    }

    /// `source` names the text in syntax errors.
    fn from_toml_source(text: &str, source: &str) -> Result<Config, ConfigError> {
        resolve(parse_toml(text, source)?, &[])
    }

    /// Applies the defaults and checks every range and cross-key rule.
    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut profiles: BTreeMap<String, Profile> = Profile::BUILTIN
            .iter()
            .filter_map(|name| Profile::builtin(name).map(|p| (name.to_string(), p)))
            .collect();
        for (name, spec) in raw.profiles {
            check_profile_name(&name)?;
            let profile = spec.into_spec().build(&name)?;
            profiles.insert(name, profile);
        }

        let s = raw.server;
        let listen = s.listen.map_or(DEFAULT_LISTEN, |a| a.0);
        let admin_listen = s.admin_listen.map_or(DEFAULT_ADMIN_LISTEN, |a| a.0);
        if listen == admin_listen && listen.port() != 0 {
            return Err(ConfigError::new(
                "server.admin_listen",
                format!("must differ from server.listen ({listen})"),
            ));
        }
        let admin_token = header_secret("server.admin_token", s.admin_token)?;
        let max_json_body = s
            .max_json_body
            .map_or(DEFAULT_MAX_JSON_BODY as u64, |b| b.0);
        let max_json_body = usize::try_from(max_json_body)
            .map_err(|_| ConfigError::new("server.max_json_body", "is too large"))?;
        positive("server.max_json_body", max_json_body)?;
        let server = ServerConfig {
            listen,
            admin_listen,
            admin_token,
            shutdown_grace: s.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            max_json_body,
        };

        let upstream = UpstreamConfig {
            url: match raw.upstream.url {
                Some(url) => url.0,
                None => raw::parse_upstream_url(DEFAULT_UPSTREAM_URL)
                    .map_err(|m| ConfigError::new("upstream.url", m))?,
            },
            timeout: nonzero_duration(
                "upstream.timeout",
                raw.upstream
                    .timeout
                    .map_or(DEFAULT_UPSTREAM_TIMEOUT, |d| d.0),
            )?,
            api_key: header_secret("upstream.api_key", raw.upstream.api_key)?,
        };

        let st = raw.store;
        let store = StoreConfig {
            backend: st.backend.unwrap_or(StoreBackend::Memory),
            url: st.url.unwrap_or_else(|| DEFAULT_STORE_URL.to_owned()),
            key_prefix: st
                .key_prefix
                .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned()),
            timeout: nonzero_duration(
                "store.timeout",
                st.timeout.map_or(DEFAULT_STORE_TIMEOUT, |d| d.0),
            )?,
            on_unavailable: st.on_unavailable.unwrap_or(OnUnavailable::Reject),
        };
        if store.backend == StoreBackend::Redis {
            check_redis_url(&store.url)?;
        }
        if store.key_prefix.is_empty() {
            return Err(ConfigError::new("store.key_prefix", "must not be empty"));
        }
        if store.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "store.key_prefix",
                "must not contain '{' or '}' (they would break Redis Cluster hash tags)",
            ));
        }

        let g = raw.grants;
        let grants = GrantsConfig {
            default_profile: g
                .default_profile
                .unwrap_or_else(|| DEFAULT_PROFILE.to_owned()),
            cache_ttl: nonzero_duration(
                "grants.cache_ttl",
                g.cache_ttl.map_or(DEFAULT_CACHE_TTL, |d| d.0),
            )?,
            resolve_provider: g.resolve_provider.unwrap_or(false),
            provider_cache_ttl: nonzero_duration(
                "grants.provider_cache_ttl",
                g.provider_cache_ttl
                    .map_or(DEFAULT_PROVIDER_CACHE_TTL, |d| d.0),
            )?,
            provider_profiles: g.provider_profiles,
        };
        check_profile_exists(&profiles, "grants.default_profile", &grants.default_profile)?;
        for (provider, profile) in &grants.provider_profiles {
            let key = format!("grants.provider_profiles.{}", key_segment(provider));
            if !plain_name(provider) {
                return Err(ConfigError::new(
                    key,
                    "a provider name uses only a-z, 0-9, '_' and '-' (as Nylas writes it: \"google\", \"icloud\")",
                ));
            }
            check_profile_exists(&profiles, &key, profile)?;
        }

        let domains = DomainsConfig {
            profile: raw.domains.profile.filter(|p| !p.is_empty()),
        };
        if let Some(name) = &domains.profile {
            check_profile_exists(&profiles, "domains.profile", name)?;
        }

        let level = raw
            .log
            .level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        if level.trim().is_empty() {
            return Err(ConfigError::new(
                "log.level",
                "must not be empty (e.g. \"info\" or \"gateway=debug,info\")",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(ConfigError::new(
                "log.level",
                format!("invalid filter {level:?}: {e}"),
            ));
        }
        let log = LogConfig {
            format: raw.log.format.unwrap_or_default(),
            level,
        };

        let events = EventsConfig {
            webhook_url: raw.events.webhook_url.and_then(|u| u.0),
            timeout: nonzero_duration(
                "events.timeout",
                raw.events.timeout.map_or(DEFAULT_EVENTS_TIMEOUT, |d| d.0),
            )?,
        };

        Ok(Config {
            server,
            upstream,
            store,
            grants,
            domains,
            log,
            events,
            profiles,
        })
    }

    /// The profile for a grant on `provider` (as Nylas names it: `google`, `icloud`, ...):
    /// the one `[grants.provider_profiles]` maps it to, else the default profile.
    ///
    /// # Examples
    /// ```
    /// use gateway::config::Config;
    /// let c = Config::from_toml_str("[grants.provider_profiles]\ngoogle = \"google\"").unwrap();
    /// assert_eq!(c.profile_for_provider(Some("google")).name(), "google");
    /// assert_eq!(c.profile_for_provider(Some("imap")).name(), "icloud");
    /// assert_eq!(c.profile_for_provider(None).name(), "icloud");
    /// ```
    ///
    /// # Panics
    /// If the fields were changed after validation so that a name no longer exists.
    pub fn profile_for_provider(&self, provider: Option<&str>) -> &Profile {
        provider
            .and_then(|p| self.grants.provider_profiles.get(p))
            .and_then(|name| self.profile(name))
            .unwrap_or_else(|| self.default_profile())
    }

    /// The profile called `name`, built-in or configured.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// The profile of grants that match no other rule (`grants.default_profile`).
    ///
    /// # Panics
    /// If the fields were changed after validation so that the name no longer exists.
    pub fn default_profile(&self) -> &Profile {
        self.profile(&self.grants.default_profile)
            .expect("grants.default_profile was validated to name a profile")
    }

    /// The profile counting sends from Nylas-managed domains, if they are counted.
    pub fn domain_profile(&self) -> Option<&Profile> {
        self.domains
            .profile
            .as_deref()
            .and_then(|n| self.profile(n))
    }

    /// How `limits::RedisStore` should connect, from `[store]`.
    pub fn redis(&self) -> RedisConfig {
        RedisConfig {
            url: self.store.url.clone(),
            key_prefix: self.store.key_prefix.clone(),
            timeout: self.store.timeout,
        }
    }
}

fn positive(key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(ConfigError::new(key, "must be greater than zero"));
    }
    Ok(())
}

fn nonzero_duration(key: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(key, "must be greater than zero"));
    }
    Ok(d)
}

/// A secret sent in an HTTP header: `""` is none; no blanks or control characters, which
/// would make the header invalid or split it.
fn header_secret(key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    let value = value.filter(|t| !t.is_empty());
    if value
        .as_deref()
        .is_some_and(|t| t.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(ConfigError::new(
            key,
            "must not contain spaces or control characters",
        ));
    }
    Ok(value)
}

/// `[a-z0-9_-]+`.
fn plain_name(name: &str) -> bool {
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    !name.is_empty() && name.chars().all(plain)
}

/// Profile names appear in metrics, headers and Redis keys: keep them plain.
fn check_profile_name(name: &str) -> Result<(), ConfigError> {
    if !plain_name(name) {
        return Err(ConfigError::new(
            format!("profiles.{}", key_segment(name)),
            "a profile name uses only a-z, 0-9, '_' and '-'",
        ));
    }
    Ok(())
}

fn check_profile_exists(
    profiles: &BTreeMap<String, Profile>,
    key: &str,
    name: &str,
) -> Result<(), ConfigError> {
    if profiles.contains_key(name) {
        return Ok(());
    }
    let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
    Err(ConfigError::new(
        key,
        format!(
            "no profile named {name:?} (known: {}; add one with [profiles.<name>])",
            known.join(", ")
        ),
    ))
}

/// The URL is never echoed: it may carry a password.
fn check_redis_url(url: &str) -> Result<(), ConfigError> {
    const SCHEMES: [&str; 3] = ["redis://", "rediss://", "redis+cluster://"];
    let rest = SCHEMES.iter().find_map(|s| url.strip_prefix(s));
    let Some(rest) = rest else {
        return Err(ConfigError::new(
            "store.url",
            "must start with redis://, rediss:// or redis+cluster:// when store.backend is \"redis\"",
        ));
    };
    if rest.split(',').all(|node| node.trim().is_empty()) {
        return Err(ConfigError::new("store.url", "must name a host"));
    }
    Ok(())
}

/// Reads a TOML file; an unreadable file or a syntax error names the file.
fn read_toml_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&name, format!("cannot read the file: {e}")))?;
    parse_toml(&text, &name)
}

/// Parses with the `toml` crate, whose errors have a position; `source` names the text.
fn parse_toml(text: &str, source: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let (line, column) = line_column(text, span.start);
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        ConfigError::new(source, format!("{at}{}", e.message().trim()))
    })
}

/// One TOML tree as a figment provider.
#[derive(Debug)]
struct TomlLayer {
    dict: Dict,
}

impl TomlLayer {
    fn new(tree: &toml::Value) -> Result<Self, ConfigError> {
        let dict = Value::serialize(tree)
            .ok()
            .and_then(Value::into_dict)
            .ok_or_else(|| ConfigError::new("toml", "not a TOML table"))?;
        Ok(TomlLayer { dict })
    }
}

impl Provider for TomlLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("configuration")
    }

    fn data(&self) -> Result<Map<FigmentProfile, Dict>, figment::Error> {
        Ok(FigmentProfile::Default.collect(self.dict.clone()))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Turns figment's first error into `<dotted key>: <one-line message>`.
fn figment_error(figment: &Figment, err: figment::Error) -> ConfigError {
    use figment::error::{Actual, Kind};

    let root = figment
        .data()
        .ok()
        .and_then(|mut m| m.remove(&FigmentProfile::Default));
    let mut path = err.path.clone();
    let message = match &err.kind {
        // Figment's path already ends with the unknown key itself.
        Kind::UnknownField(_, expected) => {
            format!("unknown key (expected one of: {})", expected.join(", "))
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing; this key is required".to_owned()
        }
        Kind::UnknownVariant(found, expected) => {
            let expected: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
            format!(
                "unknown value {found:?} (expected one of: {})",
                expected.join(", ")
            )
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let actual = match actual {
                Actual::Map => "a table".to_owned(),
                Actual::Seq => "an array".to_owned(),
                Actual::Signed(n) => format!("the integer {n}"),
                Actual::Unsigned(n) => format!("the integer {n}"),
                Actual::Float(n) => format!("the float {n}"),
                Actual::Bool(b) => format!("the boolean {b}"),
                Actual::Str(s) => format!("the string {s:?}"),
                other => other.to_string(),
            };
            format!("expected {}, found {actual}", describe_expected(expected))
        }
        Kind::Message(message) => message.clone(),
        other => other.to_string(),
    };
    ConfigError::new(render_path(root.as_ref(), &path), message)
}

/// Serde's names for what was expected, in the words of the file.
fn describe_expected(expected: &str) -> String {
    match expected {
        "u64" | "usize" => "a non-negative integer".to_owned(),
        "u32" => "an integer from 0 to 4294967295".to_owned(),
        "a string" | "a borrowed string" => "a string".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" => "a table".to_owned(),
        e if e.starts_with("struct ") => "a table".to_owned(),
        e => e.to_owned(),
    }
}

/// `["profiles", "x", "windows", "0", "messages"]` -> `profiles.x.windows[0].messages`:
/// a segment is an index when the value it indexes (in the merged tree) is an array.
fn render_path(root: Option<&Dict>, path: &[String]) -> String {
    let mut out = String::new();
    let mut node: Option<&Value> = None;
    for (i, segment) in path.iter().enumerate() {
        let parent_is_array = matches!(node, Some(Value::Array(..)));
        if parent_is_array {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&key_segment(segment));
        }
        node = match (i, node) {
            (0, _) => root.and_then(|d| d.get(segment)),
            (_, Some(Value::Dict(_, d))) => d.get(segment),
            (_, Some(Value::Array(_, a))) => segment.parse::<usize>().ok().and_then(|n| a.get(n)),
            _ => None,
        };
    }
    out
}

/// A key as TOML would need it written: bare when it can be, quoted otherwise.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}
