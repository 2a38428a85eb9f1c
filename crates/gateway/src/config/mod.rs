//! Configuration: the TOML file, environment variables and flags over the defaults, and a
//! validation that names the key at fault.
//!
//! # One model
//! The section structs below are the configuration, the file's shape and `check-config`'s
//! output at once: each key is a field that deserializes and serializes through `values.rs`
//! (which parses and range-checks it, so its error names its key), its default is the
//! section's `Default`, and secrets are [`Secret`]s, masked in `Debug` and when written.
//! What relates two keys (profile names, the Redis URL of a Redis store) is checked once,
//! after extraction, in `validate.rs`.
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
//! as one provider and extracted into the section structs with `deny_unknown_fields`.
//! Figment is there for its errors: it reports the path of the failing value, array indices
//! included, and a structured [`figment::error::Kind`] (unknown field, missing field, wrong
//! type), from which we write a one-line `profiles.x.windows[0].messages: ...`. Plain
//! `toml` + serde gives a multi-line message with a source excerpt and no key path.
//!
//! Figment's own TOML and env providers are not used (their features stay off): the first
//! would pull in a second, older `toml`, the second reads the process environment directly.

mod clients;
mod error;
mod profiles;
mod sources;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use clients::{ClientConfig, TokenDigest, digest as token_digest};
pub use error::ConfigError;
pub use sources::{ENV_PREFIX, Sources};
pub use values::{Secret, Share};

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use limits::{Profile, RedisConfig, RedisTls};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use error::{parse_toml, read_toml_file};
use sources::resolve;
use values::{addr, body_size, duration, nonzero_duration, optional, upstream_url, webhook_url};

/// Default `server.listen`: the proxy.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// Default `server.admin_listen`: health, metrics and the quota API.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
/// Default `server.shutdown_grace`: how long in-flight requests may finish after a signal.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// Default `server.max_json_body` (4 MiB): Nylas refuses JSON send bodies over 3 MB anyway.
pub const DEFAULT_MAX_JSON_BODY: usize = 4 * 1024 * 1024;
/// Default `server.body_timeout`: the longest a request body may go without a byte
/// arriving before the request ends (and a send's charge is given back).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `server.header_timeout`: the longest a client may take to send a request's
/// head (and, with TLS, its handshake).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `server.max_header_bytes` (64 KiB): a request head larger than this is refused
/// with 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default `server.max_in_flight_sends`: counted sends handled at once; more are shed with
/// 503 before any store call.
pub const DEFAULT_MAX_IN_FLIGHT_SENDS: NonZeroUsize = NonZeroUsize::new(1024).unwrap();
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

/// Default `events.webhook_attempts`: the first try and two retries.
pub const DEFAULT_WEBHOOK_ATTEMPTS: u32 = 3;

/// Most `events.webhook_attempts`: with the backoff doubling, more would hold an event
/// for a long time while it counts against the cap on deliveries in flight.
pub const MAX_WEBHOOK_ATTEMPTS: u32 = 10;

/// Default `events.webhook_backoff`: the wait before the first retry (then 2 s, 4 s, ...).
pub const DEFAULT_WEBHOOK_BACKOFF: Duration = Duration::from_secs(1);

/// What secrets are replaced with when the configuration is printed.
pub const MASK: &str = "***";

/// The whole configuration, validated.
///
/// Built by [`Config::from_toml_str`] or [`Config::load`]; [`Config::default`] is what an
/// empty file gives. Serializes as [`Config::to_masked_toml`] writes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// `[webhooks]`: Nylas's outcome webhooks for scheduled sends.
    pub webhooks: WebhooksConfig,
    /// `[enforcement]`: refuse, or only report (shadow).
    pub enforcement: EnforcementConfig,
    /// `[[clients]]`: the applications allowed to use the proxy (none: anyone who reaches
    /// it, with their own Nylas credentials).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// Every profile by name: the built-ins, replaced or joined by `[profiles.<name>]`.
    #[serde(serialize_with = "profiles::serialize")]
    pub profiles: BTreeMap<String, Profile>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the proxy listens.
    #[serde(with = "addr")]
    pub listen: SocketAddr,
    /// Where health, metrics and the quota API listen.
    #[serde(with = "addr")]
    pub admin_listen: SocketAddr,
    /// When set, every quota read and change on the admin listener (and `/metrics` with
    /// `protect_metrics`) needs `Authorization: Bearer <token>`; an empty string in the file
    /// means unset, which only a loopback `admin_listen` allows.
    #[serde(with = "optional")]
    pub admin_token: Option<Secret>,
    /// Whether `/metrics` needs the admin token too (health endpoints never do).
    pub protect_metrics: bool,
    /// How long in-flight requests may finish after a shutdown signal.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Largest JSON send body buffered for inspection, in bytes.
    #[serde(with = "body_size")]
    pub max_json_body: usize,
    /// Longest a request body may go without a byte arriving: a send still being counted
    /// is answered 408 with no charge, one already charged is cut off upstream and its
    /// charge released.
    #[serde(with = "nonzero_duration")]
    pub body_timeout: Duration,
    /// Longest a client may take to send a request's head (and, with TLS, its handshake);
    /// the connection is closed then.
    #[serde(with = "nonzero_duration")]
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) answered; a larger one gets 431.
    #[serde(with = "body_size")]
    pub max_header_bytes: usize,
    /// Most counted sends handled at once; a send beyond it is answered 503 with
    /// `Retry-After: 1` before any store call.
    pub max_in_flight_sends: NonZeroUsize,
    /// A PEM certificate chain: with `tls_key_file`, every listener serves HTTPS (HTTP/2 or
    /// HTTP/1.1 by ALPN). Reloaded on SIGHUP.
    #[serde(with = "optional")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    #[serde(with = "optional")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN,
            admin_listen: DEFAULT_ADMIN_LISTEN,
            admin_token: None,
            protect_metrics: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_json_body: DEFAULT_MAX_JSON_BODY,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_in_flight_sends: DEFAULT_MAX_IN_FLIGHT_SENDS,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl ServerConfig {
    /// The listeners' certificate and key files, when TLS is on.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        self.tls_cert_file
            .as_deref()
            .zip(self.tls_key_file.as_deref())
    }

    /// Whether `admin_listen` is a loopback address (`127.0.0.0/8`, `[::1]`, or either
    /// IPv4-mapped): the only place the admin API may listen without `admin_token`.
    pub fn admin_on_loopback(&self) -> bool {
        self.admin_listen.ip().to_canonical().is_loopback()
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The Nylas API base: http or https, no query or fragment, and its path never ends in
    /// `/` unless it is the root (`https://api.us.nylas.com/`), so appending a request path
    /// to `url.path().trim_end_matches('/')` is always right.
    #[serde(with = "upstream_url")]
    pub url: Url,
    /// Longest wait for Nylas on one request.
    #[serde(with = "nonzero_duration")]
    pub timeout: Duration,
    /// The gateway's own Nylas API key, for the requests it makes itself (a grant's
    /// provider) when the caller's credentials are not at hand; `None` (an empty string in the
    /// file) means none. Never contains spaces or control characters.
    #[serde(with = "optional")]
    pub api_key: Option<Secret>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: upstream_url::parse(DEFAULT_UPSTREAM_URL).expect("the default URL is valid"),
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            api_key: None,
        }
    }
}

/// Where the counters live (`store.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In this process: one replica only; kept across restarts with `store.path`.
    #[default]
    Memory,
    /// In Redis, shared by every replica.
    Redis,
}

/// What a send does when the store cannot be reached (`store.on_unavailable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Refuse the send with 503.
    #[default]
    Reject,
    /// Forward it uncounted; log and count the event.
    Allow,
    /// Admit from this replica's own budget (`store.local_budget` of each window's
    /// limit), written back to the store when it returns; refuse with 503 beyond it.
    Local,
}

impl OnUnavailable {
    /// The value as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Reject => "reject",
            OnUnavailable::Allow => "allow",
            OnUnavailable::Local => "local",
        }
    }
}

/// When the memory store's journal reaches the disk (`store.fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// Every `store.fsync_interval`: a crash of the process loses nothing, a power cut at
    /// most that interval.
    #[default]
    Interval,
    /// Before each admitted send is forwarded: a power cut loses nothing either.
    Always,
}

/// Most grants and domains the memory store holds by default (about 1 KB each).
pub const DEFAULT_MAX_SCOPES: usize = 100_000;

/// `[store]`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Memory or Redis.
    pub backend: StoreBackend,
    /// Redis URL (`redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://`,
    /// `redis+sentinel://` or `rediss+sentinel://`); checked only for Redis.
    #[serde(serialize_with = "values::serialize_store_url")]
    pub url: String,
    /// Prefix of every Redis key; never empty, never contains `{` or `}`.
    #[serde(deserialize_with = "values::key_prefix")]
    pub key_prefix: String,
    /// Longest wait for any one store call.
    #[serde(with = "nonzero_duration")]
    pub timeout: Duration,
    /// The directory where the memory store keeps its journal; unset: counts live in
    /// memory only and a restart forgets them.
    #[serde(with = "optional")]
    pub path: Option<PathBuf>,
    /// Most grants and domains the memory store holds; a send for a new one beyond it is
    /// refused with 503.
    pub max_scopes: NonZeroUsize,
    /// When the memory store's journal is synced to the disk.
    pub fsync: FsyncMode,
    /// How often, with `fsync = "interval"`.
    #[serde(with = "nonzero_duration")]
    pub fsync_interval: Duration,
    /// What to do when the store fails.
    pub on_unavailable: OnUnavailable,
    /// The share of each window's limit a replica admits per grant on its own while the
    /// store is down (`on_unavailable = "local"`).
    pub local_budget: Share,
    /// Consecutive store failures that open the breaker (calls then fail at once).
    pub breaker_failures: NonZeroU32,
    /// PEM certificates trusted for a `rediss://` URL instead of the system's roots.
    #[serde(with = "optional")]
    pub tls_ca_file: Option<PathBuf>,
    /// A PEM client certificate for Redis servers that require mutual TLS (with
    /// `tls_key_file`).
    #[serde(with = "optional")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM key of `tls_cert_file`.
    #[serde(with = "optional")]
    pub tls_key_file: Option<PathBuf>,
    /// Accept any server certificate and host name: for tests only; warned about.
    pub tls_insecure_skip_verify: bool,
    /// The user the sentinels know, for a Sentinel URL whose sentinels need ACL auth.
    #[serde(with = "optional")]
    pub sentinel_username: Option<String>,
    /// The sentinels' password (the URL's credentials are the data nodes').
    #[serde(with = "optional")]
    pub sentinel_password: Option<Secret>,
    /// Replicas that must hold each charge (`WAIT`) before a send is forwarded; unset is
    /// 1 for Sentinel and 0 otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_replicas: Option<u32>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Memory,
            url: DEFAULT_STORE_URL.to_owned(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            timeout: DEFAULT_STORE_TIMEOUT,
            path: None,
            max_scopes: NonZeroUsize::new(DEFAULT_MAX_SCOPES).unwrap_or(NonZeroUsize::MIN),
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_secs(1),
            on_unavailable: OnUnavailable::Reject,
            local_budget: Share::DEFAULT_LOCAL_BUDGET,
            breaker_failures: NonZeroU32::new(limits::breaker::DEFAULT_THRESHOLD)
                .unwrap_or(NonZeroU32::MIN),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_insecure_skip_verify: false,
            sentinel_username: None,
            sentinel_password: None,
            wait_replicas: None,
        }
    }
}

impl fmt::Debug for StoreConfig {
    /// The URL's user info is left out: it may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("url", &values::redact_userinfo(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("path", &self.path)
            .field("max_scopes", &self.max_scopes)
            .field("fsync", &self.fsync)
            .field("fsync_interval", &self.fsync_interval)
            .field("on_unavailable", &self.on_unavailable)
            .field("local_budget", &self.local_budget)
            .field("breaker_failures", &self.breaker_failures)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_insecure_skip_verify", &self.tls_insecure_skip_verify)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

/// `[grants]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantsConfig {
    /// Profile of grants that match no other rule; always names an existing profile.
    pub default_profile: String,
    /// How long an identifier -> grant id resolution is cached.
    #[serde(with = "nonzero_duration")]
    pub cache_ttl: Duration,
    /// Whether each grant's provider is looked up (`GET /v3/grants/{id}`) to pick its profile
    /// from [`GrantsConfig::provider_profiles`].
    pub resolve_provider: bool,
    /// How long a grant's provider, once looked up, is reused.
    #[serde(with = "nonzero_duration")]
    pub provider_cache_ttl: Duration,
    /// Nylas provider name (`google`, `microsoft`, `icloud`, `imap`, ...) -> profile name.
    /// Every provider name uses only `a-z`, `0-9`, `_` and `-`; every profile exists.
    pub provider_profiles: BTreeMap<String, String>,
    /// Grant id (canonical: lowercase, hyphenated) -> profile name, declared in the file
    /// (for GitOps); an override set through the admin API takes precedence.
    pub overrides: BTreeMap<String, String>,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            default_profile: DEFAULT_PROFILE.to_owned(),
            cache_ttl: DEFAULT_CACHE_TTL,
            resolve_provider: false,
            provider_cache_ttl: DEFAULT_PROVIDER_CACHE_TTL,
            provider_profiles: BTreeMap::new(),
            overrides: BTreeMap::new(),
        }
    }
}

/// `[domains]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DomainsConfig {
    /// Profile counting `/v3/domains/{domain}/messages/send`; `None` (an empty string in the
    /// file) leaves those sends uncounted. Always names an existing profile when set.
    #[serde(with = "optional")]
    pub profile: Option<String>,
}

/// `[enforcement]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnforcementConfig {
    /// Whether refusals are made (`enforce`) or only reported (`shadow`).
    pub mode: EnforcementMode,
}

/// `enforcement.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// Sends over a limit are refused.
    #[default]
    Enforce,
    /// Every send is forwarded and counted when it goes out; what would have been refused
    /// is logged, counted (`decisions{outcome="shadow_denied"}`) and named in the
    /// `Send-Gateway-Would-Deny` response header.
    Shadow,
}

impl Config {
    /// Whether sends charged under `profile` are in shadow: `[enforcement] mode =
    /// "shadow"`, or the profile's own `shadow = true`.
    pub fn in_shadow(&self, profile: &Profile) -> bool {
        self.enforcement.mode == EnforcementMode::Shadow || profile.shadow()
    }
}

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive (`info`, `gateway=debug,info`); always
    /// parses, and every directive names a level. `RUST_LOG`, when set, takes its place.
    #[serde(deserialize_with = "values::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.to_owned(),
        }
    }
}

/// `[events]`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Where threshold events are posted as JSON; `None` (an empty string in the file) posts
    /// nothing. Always http or https.
    #[serde(with = "webhook_url")]
    pub webhook_url: Option<Url>,
    /// Longest wait for the webhook on one attempt.
    #[serde(with = "nonzero_duration")]
    pub timeout: Duration,
    /// Signs every post (`Send-Gateway-Signature`, see [`crate::events::signature`]) when
    /// set; `""` in the file means unsigned.
    #[serde(with = "optional")]
    pub webhook_secret: Option<Secret>,
    /// Attempts per event, the first included: 1 to [`MAX_WEBHOOK_ATTEMPTS`].
    #[serde(deserialize_with = "values::attempts")]
    pub webhook_attempts: u32,
    /// The wait before the first retry; it doubles for each further one, plus jitter.
    #[serde(with = "nonzero_duration")]
    pub webhook_backoff: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            webhook_url: None,
            timeout: DEFAULT_EVENTS_TIMEOUT,
            webhook_secret: None,
            webhook_attempts: DEFAULT_WEBHOOK_ATTEMPTS,
            webhook_backoff: DEFAULT_WEBHOOK_BACKOFF,
        }
    }
}

impl fmt::Debug for EventsConfig {
    /// The URL's user info and query are masked: they may carry a secret; so is the
    /// signing secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.webhook_url.as_ref().map(values::mask_webhook_url);
        f.debug_struct("EventsConfig")
            .field("webhook_url", &url)
            .field("timeout", &self.timeout)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| MASK),
            )
            .field("webhook_attempts", &self.webhook_attempts)
            .field("webhook_backoff", &self.webhook_backoff)
            .finish()
    }
}

/// `[webhooks]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The secret Nylas gave when the webhook was registered; `POST /v1/nylas/webhooks`
    /// answers only when it is set (an empty string in the file means unset).
    #[serde(with = "optional")]
    pub secret: Option<Secret>,
    /// A listener of the endpoint's own (read at start-up); `None` serves it on the admin
    /// listener.
    #[serde(with = "optional")]
    pub listen: Option<SocketAddr>,
}

impl fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret", &self.secret.as_ref().map(|_| MASK))
            .field("listen", &self.listen)
            .finish()
    }
}

impl Default for Config {
    /// What an empty file gives: memory store, Nylas US, the built-in profiles, `icloud` for
    /// every grant.
    fn default() -> Self {
        Config::from_document(validate::Document::default())
            .expect("the defaults are a valid configuration")
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
        resolve(parse_toml(text, "toml")?, &[])?.resolve_client_tokens(&[])
    }

    /// Reads, parses and validates a file.
    ///
    /// # Errors
    /// As [`Config::from_toml_str`]; an unreadable file or a syntax error names the file.
    ///
    /// The file alone: for the environment and flags too, use [`Sources::load`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        resolve(read_toml_file(path)?, &[])?.resolve_client_tokens(&[])
    }

    /// The whole configuration as a TOML document, defaults included: every section, every
    /// profile (built-in or configured) with its windows. Secrets are replaced by `***`:
    /// `server.admin_token`, `upstream.api_key`, the password in `store.url`, and the user
    /// info and query of `events.webhook_url`. Read back, it gives the same configuration,
    /// secrets aside.
    ///
    /// # Examples
    /// ```
    /// use gateway::config::Config;
    /// let c = Config::from_toml_str("[server]\nadmin_token = \"s3cret\"").unwrap();
    /// let text = c.to_masked_toml();
    /// assert!(text.contains("admin_token = \"***\"") && !text.contains("s3cret"));
    /// assert!(text.contains("[[profiles.icloud.windows]]"));
    /// ```
    pub fn to_masked_toml(&self) -> String {
        toml::to_string(self).expect("the configuration serializes as TOML")
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

    /// How `limits::RedisStore` should connect, from `[store]`, without its TLS material
    /// (see [`Config::redis_tls`]).
    pub fn redis(&self) -> RedisConfig {
        RedisConfig {
            url: self.store.url.clone(),
            key_prefix: self.store.key_prefix.clone(),
            timeout: self.store.timeout,
            tls: RedisTls {
                insecure_skip_verify: self.store.tls_insecure_skip_verify,
                ..RedisTls::default()
            },
            sentinel_username: self.store.sentinel_username.clone(),
            sentinel_password: self.store.sentinel_password.clone().map(String::from),
            wait_replicas: self.store.wait_replicas,
        }
    }

    /// [`Config::redis`] with the TLS files read.
    ///
    /// # Errors
    /// A file that cannot be read, named by its key.
    pub fn redis_with_tls(&self) -> Result<RedisConfig, ConfigError> {
        let read = |key: &str, path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, ConfigError> {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p).map_err(|e| {
                        ConfigError::new(
                            format!("store.{key}"),
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })
                })
                .transpose()
        };
        let mut redis = self.redis();
        redis.tls.ca_pem = read("tls_ca_file", &self.store.tls_ca_file)?;
        let cert = read("tls_cert_file", &self.store.tls_cert_file)?;
        let key = read("tls_key_file", &self.store.tls_key_file)?;
        redis.tls.client_pem = cert.zip(key);
        Ok(redis)
    }

    /// How the memory store is kept and capped.
    pub fn memory_options(&self) -> limits::MemoryOptions {
        let fsync = match self.store.fsync {
            FsyncMode::Always => limits::Fsync::Always,
            FsyncMode::Interval => limits::Fsync::Every(self.store.fsync_interval),
        };
        limits::MemoryOptions {
            path: self.store.path.clone(),
            max_scopes: Some(self.store.max_scopes.get()),
            fsync,
            ..limits::MemoryOptions::default()
        }
    }

    /// What is valid but unwise, for `check-config` and the start-up log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.store.backend == StoreBackend::Memory && self.store.path.is_none() {
            out.push(
                "store.path: not set, so the memory store keeps its counts in memory only; a restart gives every grant its whole quota again"
                    .to_owned(),
            );
        }
        if self.store.backend == StoreBackend::Redis && self.store.path.is_some() {
            out.push(
                "store.path: ignored, since the store is Redis (it is where the memory store keeps its journal)"
                    .to_owned(),
            );
        }
        if self.store.tls_insecure_skip_verify {
            out.push(
                "store.tls_insecure_skip_verify: Redis's certificate is not checked; anyone on the path can read and change quota counts"
                    .to_owned(),
            );
        }
        out
    }
}
