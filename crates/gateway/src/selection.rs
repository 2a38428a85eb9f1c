//! Which profile a grant is charged under, and why.
//!
//! In order: a per-grant override set through the admin API (kept in the store, so every
//! replica applies it); with `[grants] resolve_provider`, the profile mapped to the grant's
//! provider in `[grants.provider_profiles]`; otherwise `[grants] default_profile`.
//!
//! Overrides are cached here and verified inside the reservation itself
//! ([`limits::QuotaStore::reserve_guarded`]): a change made on another replica is noticed by
//! the very next send, at no extra round trip. Providers are learnt once per grant from
//! `GET /v3/grants/{id}` and shared through the store for `provider_cache_ttl`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;
use limits::{META_PROFILE, Profile, QuotaStore};

use crate::config::Config;
use crate::scope::Scope;
use crate::upstream::Upstream;

/// The store setting that caches a grant's provider.
pub const META_PROVIDER: &str = "provider";

/// Most grants whose override or provider is cached locally.
const MAX_ENTRIES: usize = 100_000;

/// Why a profile applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Set for this grant through the admin API.
    Override,
    /// Declared for this grant in `[grants.overrides]`.
    Config,
    /// Mapped from the grant's provider.
    Provider(String),
    /// `[grants] default_profile`.
    Default,
}

impl Source {
    /// `override`, `provider` or `default`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Override => "override",
            Source::Config => "config",
            Source::Provider(_) => "provider",
            Source::Default => "default",
        }
    }
}

/// The profile a grant is charged under.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The profile.
    pub profile: Profile,
    /// Why.
    pub source: Source,
    /// The override in the store as last seen (what a guarded reserve expects).
    pub override_name: Option<String>,
    /// The grant's provider, when known.
    pub provider: Option<String>,
}

/// Local caches of overrides and providers.
#[derive(Debug, Default)]
pub struct Selector {
    overrides: Mutex<HashMap<String, Option<String>>>,
    providers: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bounded_insert<V>(map: &mut HashMap<String, V>, key: String, value: V) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

impl Selector {
    /// The override last seen for `grant` (none until told otherwise).
    pub fn cached_override(&self, grant: &str) -> Option<String> {
        lock(&self.overrides).get(grant).cloned().flatten()
    }

    /// Records the override the store reported for `grant`.
    pub fn learn_override(&self, grant: &str, name: Option<String>) {
        bounded_insert(&mut lock(&self.overrides), grant.to_owned(), name);
    }

    /// Records the provider a grant look-up just named (the look-up every send's grant
    /// gets), and shares it through `store` as a look-up of its own would, so that
    /// learning it costs no second one, here or on another replica.
    pub async fn learn_provider(
        &self,
        store: &dyn QuotaStore,
        config: &Config,
        grant: &str,
        provider: String,
    ) {
        let ttl = config.grants.provider_cache_ttl;
        let scope = Scope::grant(grant);
        if let Err(e) = store
            .meta_set(scope.as_str(), META_PROVIDER, &provider, Some(ttl))
            .await
        {
            tracing::warn!(grant, error = %e, "could not share the grant's provider");
        }
        let entry = (Some(provider), Instant::now());
        bounded_insert(&mut lock(&self.providers), grant.to_owned(), entry);
    }

    /// Forgets cached providers (after a reload changed the mapping or its TTL).
    pub fn forget_providers(&self) {
        lock(&self.providers).clear();
    }

    /// Picks the profile for `grant`, given the override the store is believed to hold:
    /// that override (set through the admin API), else `[grants.overrides]`, else the
    /// provider's mapped profile, else the default.
    /// Learns the grant's provider through `store` (shared) and `upstream` when needed.
    pub async fn select(
        &self,
        store: &dyn QuotaStore,
        upstream: &Upstream,
        config: &Config,
        grant: &str,
        override_name: Option<String>,
        authorization: Option<&HeaderValue>,
    ) -> Selection {
        let provider = if config.grants.resolve_provider {
            self.provider(store, upstream, config, grant, authorization)
                .await
        } else {
            None
        };
        choose(config, grant, override_name, provider)
    }

    /// As [`Selector::select`], from what this replica and `store` know, never asking
    /// Nylas: `None` when the choice would take the grant's provider and neither knows it
    /// (the fleet view then keeps the profile the grant was last charged under).
    pub async fn select_known(
        &self,
        store: &dyn QuotaStore,
        config: &Config,
        grant: &str,
        override_name: Option<String>,
    ) -> Option<Selection> {
        let provider = if config.grants.resolve_provider {
            self.known_provider(store, config, grant).await
        } else {
            None
        };
        let unknown = config.grants.resolve_provider && provider.is_none();
        let selection = choose(config, grant, override_name, provider);
        (!(unknown && matches!(selection.source, Source::Default))).then_some(selection)
    }

    /// The grant's provider from the local cache or the store, or `None`.
    async fn known_provider(
        &self,
        store: &dyn QuotaStore,
        config: &Config,
        grant: &str,
    ) -> Option<String> {
        let ttl = config.grants.provider_cache_ttl;
        if let Some((p, at)) = lock(&self.providers).get(grant)
            && at.elapsed() < ttl
        {
            return p.clone();
        }
        let scope = Scope::grant(grant);
        store
            .meta_get(scope.as_str(), META_PROVIDER)
            .await
            .ok()
            .flatten()
    }

    /// The grant's provider: local cache, then the store, then Nylas.
    async fn provider(
        &self,
        store: &dyn QuotaStore,
        upstream: &Upstream,
        config: &Config,
        grant: &str,
        authorization: Option<&HeaderValue>,
    ) -> Option<String> {
        let ttl = config.grants.provider_cache_ttl;
        if let Some((p, at)) = lock(&self.providers).get(grant)
            && at.elapsed() < ttl
        {
            return p.clone();
        }
        let scope = Scope::grant(grant);
        let shared = match store.meta_get(scope.as_str(), META_PROVIDER).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(grant, error = %e, "could not read the cached provider");
                None
            }
        };
        let provider = match shared {
            Some(p) => Some(p),
            // No credentials to ask with (the admin API holds none): nothing to learn now,
            // and nothing to remember, or the grant's next send could not learn it either.
            None if config.upstream.api_key.is_none() && authorization.is_none() => return None,
            None => {
                let learnt = ask_nylas(upstream, config, grant, authorization).await;
                if let Some(p) = &learnt
                    && let Err(e) = store
                        .meta_set(scope.as_str(), META_PROVIDER, p, Some(ttl))
                        .await
                {
                    tracing::warn!(grant, error = %e, "could not share the grant's provider");
                }
                learnt
            }
        };
        // A look-up that failed with the configured API key is remembered briefly, so a
        // broken grant does not cost a Nylas call per send. One that failed with a caller's
        // own credentials says nothing about other callers: it is not remembered.
        let at = if provider.is_some() {
            Instant::now()
        } else if config.upstream.api_key.is_some() {
            Instant::now()
                .checked_sub(ttl.saturating_sub(Duration::from_secs(30)))
                .unwrap_or_else(Instant::now)
        } else {
            return None;
        };
        bounded_insert(
            &mut lock(&self.providers),
            grant.to_owned(),
            (provider.clone(), at),
        );
        provider
    }
}

/// The grant's provider, asked of Nylas with `[upstream] api_key`, else the caller's
/// credentials.
async fn ask_nylas(
    upstream: &Upstream,
    config: &Config,
    grant: &str,
    authorization: Option<&HeaderValue>,
) -> Option<String> {
    let api_key = config
        .upstream
        .api_key
        .as_deref()
        .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
    let auth = api_key.as_ref().or(authorization);
    let path = format!("/v3/grants/{}", crate::grants::encode_segment(grant));
    match upstream.get_small(&path, auth).await {
        Ok((status, _, body)) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            let p = v
                .pointer("/data/provider")?
                .as_str()?
                .trim()
                .to_ascii_lowercase();
            (!p.is_empty()).then_some(p)
        }
        Ok((status, _, _)) => {
            tracing::warn!(
                grant,
                status = status.as_u16(),
                "provider look-up refused; using the default profile"
            );
            None
        }
        Err(e) => {
            tracing::warn!(grant, error = %e, "provider look-up failed; using the default profile");
            None
        }
    }
}

/// The profile for `grant` once its provider is known (or not needed): the stored
/// override, else `[grants.overrides]`, else the provider's mapped profile, else the default.
fn choose(
    config: &Config,
    grant: &str,
    override_name: Option<String>,
    provider: Option<String>,
) -> Selection {
    if let Some(name) = &override_name {
        if let Some(p) = config.profile(name) {
            return Selection {
                profile: p.clone(),
                source: Source::Override,
                override_name,
                provider,
            };
        }
        // An override naming a profile this configuration no longer has: count under
        // the usual profile rather than not at all.
        tracing::warn!(grant, profile = %name, "override names an unknown profile; using the usual one");
    }
    if let Some(p) = config
        .grants
        .overrides
        .get(grant)
        .and_then(|n| config.profile(n))
    {
        return Selection {
            profile: p.clone(),
            source: Source::Config,
            override_name,
            provider,
        };
    }
    let (profile, source) = match provider.as_deref() {
        Some(p) if config.grants.provider_profiles.contains_key(p) => (
            config.profile_for_provider(Some(p)).clone(),
            Source::Provider(p.to_owned()),
        ),
        _ => (config.default_profile().clone(), Source::Default),
    };
    Selection {
        profile,
        source,
        override_name,
        provider,
    }
}

/// Reads the override in the store for `grant` (for the quota API).
///
/// # Errors
/// The store failed.
pub async fn stored_override(
    store: &dyn QuotaStore,
    grant: &str,
) -> Result<Option<String>, limits::StoreError> {
    store
        .meta_get(Scope::grant(grant).as_str(), META_PROFILE)
        .await
}
