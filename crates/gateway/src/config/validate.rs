//! The file as extracted, and the rules that relate one key to another, checked once.
//!
//! Each value was already parsed and range-checked while deserializing (`values.rs`); what
//! is left needs the whole configuration: the profiles that names refer to, the listeners
//! against each other, the Redis URL when the store is Redis.

use std::collections::BTreeMap;

use limits::Profile;
use limits::redis::Topology;
use serde::Deserialize;

use super::error::key_segment;
use super::profiles::ProfileTable;
use super::{
    ClientConfig, Config, ConfigError, DomainsConfig, EnforcementConfig, EventsConfig,
    GrantsConfig, LogConfig, ServerConfig, StoreBackend, StoreConfig, UpstreamConfig,
    WebhooksConfig,
};

/// The whole file: [`Config`]'s sections as they are, and profiles as their tables, not yet
/// built. Missing tables and keys take their defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Document {
    server: ServerConfig,
    upstream: UpstreamConfig,
    store: StoreConfig,
    grants: GrantsConfig,
    domains: DomainsConfig,
    log: LogConfig,
    events: EventsConfig,
    webhooks: WebhooksConfig,
    enforcement: EnforcementConfig,
    clients: Vec<ClientConfig>,
    profiles: BTreeMap<String, ProfileTable>,
}

impl Config {
    /// Builds the profiles over the built-ins and checks every cross-key rule.
    pub(super) fn from_document(doc: Document) -> Result<Config, ConfigError> {
        let mut profiles: BTreeMap<String, Profile> = Profile::BUILTIN
            .iter()
            .filter_map(|name| Profile::builtin(name).map(|p| (name.to_string(), p)))
            .collect();
        for (name, table) in doc.profiles {
            check_profile_name(&name)?;
            let profile = table.into_spec().build(&name)?;
            profiles.insert(name, profile);
        }
        let mut config = Config {
            server: doc.server,
            upstream: doc.upstream,
            store: doc.store,
            grants: doc.grants,
            domains: doc.domains,
            log: doc.log,
            events: doc.events,
            webhooks: doc.webhooks,
            enforcement: doc.enforcement,
            clients: doc.clients,
            profiles,
        };
        config.validate()?;
        config.check_clients()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let (listen, admin_listen) = (self.server.listen, self.server.admin_listen);
        // Port 0 twice is two different ephemeral ports (what tests do).
        if listen == admin_listen && listen.port() != 0 {
            return Err(ConfigError::new(
                "server.admin_listen",
                format!("must differ from server.listen ({listen})"),
            ));
        }
        self.check_admin_exposure()?;
        self.check_listener_tls()?;
        if let Some(hooks) = self.webhooks.listen
            && hooks.port() != 0
            && (hooks == listen || hooks == admin_listen)
        {
            return Err(ConfigError::new(
                "webhooks.listen",
                format!("must differ from server.listen and server.admin_listen ({hooks})"),
            ));
        }
        if self.store.backend == StoreBackend::Redis {
            let topology = check_redis_url(&self.store.url)?;
            self.check_redis_tls()?;
            self.check_topology_keys(topology)?;
        }
        self.check_profile_exists("grants.default_profile", &self.grants.default_profile)?;
        for (provider, profile) in &self.grants.provider_profiles {
            let key = format!("grants.provider_profiles.{}", key_segment(provider));
            if !plain_name(provider) {
                return Err(ConfigError::new(
                    key,
                    "a provider name uses only a-z, 0-9, '_' and '-' (as Nylas writes it: \"google\", \"icloud\")",
                ));
            }
            self.check_profile_exists(&key, profile)?;
        }
        if let Some(name) = &self.domains.profile {
            self.check_profile_exists("domains.profile", name)?;
        }
        for (grant, profile) in &self.grants.overrides {
            let key = format!("grants.overrides.{}", key_segment(grant));
            if canonical_grant_id(grant).as_deref() != Some(grant.as_str()) {
                return Err(ConfigError::new(
                    key,
                    "a grant id as Nylas gives it: a UUID, lowercase and hyphenated",
                ));
            }
            self.check_profile_exists(&key, profile)?;
        }
        Ok(())
    }

    /// An admin listener off loopback needs the admin token: without it anyone who reaches
    /// the port could reset usage or change profiles. `protect_metrics` needs a token to
    /// check.
    fn check_admin_exposure(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.admin_token.is_some() {
            return Ok(());
        }
        if !s.admin_on_loopback() {
            return Err(ConfigError::new(
                "server.admin_listen",
                format!(
                    "{} is not a loopback address, so server.admin_token must be set \
                     (e.g. with SEND_GATEWAY__SERVER__ADMIN_TOKEN); or listen on 127.0.0.1 or [::1]",
                    s.admin_listen
                ),
            ));
        }
        if s.protect_metrics {
            return Err(ConfigError::new(
                "server.protect_metrics",
                "needs server.admin_token (without a token there is nothing to check)",
            ));
        }
        Ok(())
    }

    /// The listeners' certificate and key go together, and both load (read, parsed, the
    /// key that of the certificate), so that `check-config` and a reload catch a bad file.
    fn check_listener_tls(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        match (&s.tls_cert_file, &s.tls_key_file) {
            (None, None) => Ok(()),
            (Some(cert), Some(key)) => crate::tls::certified_key(cert, key)
                .map(|_| ())
                .map_err(|e| ConfigError::new(e.key, e.message)),
            (Some(_), None) => Err(ConfigError::new(
                "server.tls_key_file",
                "must be set with server.tls_cert_file (they go together)",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "server.tls_cert_file",
                "must be set with server.tls_key_file (they go together)",
            )),
        }
    }

    /// TLS settings only with `rediss://`; a client certificate with its key; every file
    /// readable.
    fn check_redis_tls(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let any = s.tls_ca_file.is_some()
            || s.tls_cert_file.is_some()
            || s.tls_key_file.is_some()
            || s.tls_insecure_skip_verify;
        if any && !s.url.starts_with("rediss") {
            return Err(ConfigError::new(
                "store.url",
                "the store.tls_* settings need a rediss://, rediss+cluster:// or rediss+sentinel:// url",
            ));
        }
        if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
            return Err(ConfigError::new(
                "store.tls_key_file",
                "store.tls_cert_file and store.tls_key_file go together",
            ));
        }
        self.redis_with_tls().map(|_| ())
    }

    /// The sentinel credentials only with a Sentinel URL; `WAIT` not on Cluster.
    fn check_topology_keys(&self, topology: Topology) -> Result<(), ConfigError> {
        let s = &self.store;
        let sentinel_auth = s.sentinel_username.is_some() || s.sentinel_password.is_some();
        if sentinel_auth && topology != Topology::Sentinel {
            return Err(ConfigError::new(
                "store.sentinel_password",
                "store.sentinel_username and store.sentinel_password need a redis+sentinel:// url",
            ));
        }
        if s.wait_replicas.unwrap_or(0) > 0 && topology == Topology::Cluster {
            return Err(ConfigError::new(
                "store.wait_replicas",
                "is not supported on Redis Cluster (set it to 0 or leave it out)",
            ));
        }
        Ok(())
    }

    pub(super) fn check_profile_exists(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        if self.profiles.contains_key(name) {
            return Ok(());
        }
        let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
        Err(ConfigError::new(
            key,
            format!(
                "no profile named {name:?} (known: {}; add one with [profiles.<name>])",
                known.join(", ")
            ),
        ))
    }
}

/// A grant id's canonical form (the lowercase hyphenated UUID), if it is one.
fn canonical_grant_id(id: &str) -> Option<String> {
    uuid::Uuid::try_parse(id)
        .ok()
        .map(|u| u.hyphenated().to_string())
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

/// The URL is never echoed: it may carry a password (limits' messages leave it out).
fn check_redis_url(url: &str) -> Result<Topology, ConfigError> {
    limits::redis::check_url(url).map_err(|e| ConfigError::new("store.url", e.to_string()))
}
