//! The state shared by every request: configuration, store, upstream and caches.
//!
//! Components take what they use (a store, an upstream, the metrics), not this whole
//! state; only the request handlers and the server see it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use http::HeaderMap;
use limits::{BreakerStore, LocalBudget, MemoryStore, QuotaStore, RedisStore};

use crate::config::{Config, OnUnavailable, StoreBackend};
use crate::events::Reporter;
use crate::grants::GrantResolver;
use crate::health::StoreWatch;
use crate::metrics::Metrics;
use crate::pipeline::SendSlots;
use crate::selection::Selector;
use crate::tls::Certs;
use crate::upstream::Upstream;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    config: RwLock<Arc<Config>>,
    /// The quota store (for Redis, behind its breaker).
    pub store: Arc<dyn QuotaStore>,
    /// The same store, seen as what notes charges in the fleet index (`GET /v1/usage`).
    pub fleet: Arc<crate::fleet::Indexed>,
    /// The breaker in front of a shared store (`None` for the memory store).
    pub breaker: Option<Arc<BreakerStore>>,
    /// The memory store, when it is the store (for its metrics).
    pub memory: Option<Arc<MemoryStore>>,
    /// This replica's own budget while the store is down (`on_unavailable = "local"`).
    pub local: Option<Arc<LocalBudget>>,
    /// What was last seen of the store's health.
    pub store_watch: StoreWatch,
    /// The upstream client.
    pub upstream: Upstream,
    /// Grant identifier resolution.
    pub grants: GrantResolver,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Profile selection caches.
    pub selector: Selector,
    /// Threshold events.
    pub events: Reporter,
    /// Sends in flight, against `[server] max_in_flight_sends`.
    pub sends: SendSlots,
    /// The listeners' certificate, when `[server] tls_cert_file` is set.
    pub tls: Option<Arc<Certs>>,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Builds the state: connects the store named by the configuration.
    ///
    /// # Errors
    /// The Redis store cannot be configured, or the upstream URL cannot be used.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let state = match config.store.backend {
            StoreBackend::Memory => {
                let memory = Arc::new(open_memory(&config)?);
                let store = Arc::clone(&memory) as Arc<dyn QuotaStore>;
                let mut state = Self::with_store(config, store)?;
                state.memory = Some(memory);
                state
            }
            StoreBackend::Redis => {
                let store = Arc::new(RedisStore::lazy(&config.redis_with_tls()?)?);
                Self::with_breaker(config, store)?
            }
        };
        // Start even when the store is down: sends are answered per `on_unavailable` until
        // it is back. The first look also logs what is wrong with its persistence.
        crate::health::check(&state).await;
        Ok(state)
    }

    /// Builds the state around a shared store, behind a breaker (tests inject one).
    ///
    /// # Errors
    /// As [`AppState::with_store`].
    pub fn with_breaker(config: Config, store: Arc<dyn QuotaStore>) -> anyhow::Result<Self> {
        let threshold = config.store.breaker_failures.get();
        let breaker = Arc::new(BreakerStore::new(store, threshold));
        let mut state = Self::with_store(config, Arc::clone(&breaker) as Arc<dyn QuotaStore>)?;
        state.breaker = Some(breaker);
        Ok(state)
    }

    /// Builds the state around an existing store (tests inject one).
    ///
    /// # Errors
    /// The upstream URL cannot be used, or the webhook client cannot start.
    pub fn with_store(config: Config, store: Arc<dyn QuotaStore>) -> anyhow::Result<Self> {
        let upstream = Upstream::new(&config.upstream.url, config.upstream.timeout)?;
        let metrics = Arc::new(Metrics::default());
        metrics.zero_clients(config.clients.iter().map(|c| c.name.as_str()));
        let tls = match config.server.tls_files() {
            Some((cert, key)) => Some(Arc::new(Certs::load(cert, key)?)),
            None => None,
        };
        let local = (config.store.on_unavailable == OnUnavailable::Local)
            .then(|| Arc::new(LocalBudget::new(config.store.local_budget.get())));
        let fleet = Arc::new(crate::fleet::Indexed::new(store));
        let store = Arc::clone(&fleet) as Arc<dyn QuotaStore>;
        Ok(AppState {
            fleet,
            breaker: None,
            memory: None,
            local,
            store_watch: StoreWatch::default(),
            grants: GrantResolver::new(config.grants.cache_ttl),
            events: Reporter::new(Arc::clone(&store), Arc::clone(&metrics))?,
            config: RwLock::new(Arc::new(config)),
            store,
            upstream,
            metrics,
            selector: Selector::default(),
            sends: SendSlots::default(),
            tls,
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Applies a reloaded configuration: profiles, grant and domain settings, events, the
    /// admin token and request limits take effect at once; usage is untouched (keys never
    /// name a limit). The listeners' certificate files are read again. Listeners (and TLS
    /// on or off), the upstream and the store need a restart: their old values stay, with a
    /// warning. Returns the keys that were not applied.
    pub fn reload(&self, mut new: Config) -> Vec<&'static str> {
        let old = self.config();
        let kept = keep_restart_only(&old, &mut new);
        if new.grants != old.grants {
            self.selector.forget_providers();
        }
        self.reload_certificate(&new);
        for key in &kept {
            tracing::warn!(
                key,
                "configuration change needs a restart; keeping the running value"
            );
        }
        if new.clients.is_empty() && !old.clients.is_empty() {
            tracing::warn!(
                "the reload removed every [[clients]] entry: the proxy takes any caller with its own Nylas credentials again"
            );
        }
        self.metrics
            .zero_clients(new.clients.iter().map(|c| c.name.as_str()));
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        self.metrics.reload(true);
        tracing::info!("configuration reloaded");
        kept
    }

    /// Loads the listeners' certificate files again (also when their paths are unchanged:
    /// that is how a renewed certificate is rolled out). A file that fails to load is
    /// logged and counted as a failed reload; the running certificate stays.
    fn reload_certificate(&self, new: &Config) {
        let (Some(certs), Some((cert, key))) = (&self.tls, new.server.tls_files()) else {
            return;
        };
        match certs.reload(cert, key) {
            Ok(()) => tracing::info!("listener certificate reloaded"),
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(error = %e, "listener certificate reload refused; keeping the running certificate");
            }
        }
    }

    /// Whether the gateway is draining.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Starts draining: readiness answers 503 from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether `headers` carry the admin token (always true when none is configured).
    pub fn admin_authorized(&self, headers: &HeaderMap) -> bool {
        let config = self.config();
        let Some(token) = config.server.admin_token.as_deref() else {
            return true;
        };
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), token.as_bytes())
    }
}

/// The memory store `config` describes, its journal replayed.
fn open_memory(config: &Config) -> anyhow::Result<MemoryStore> {
    let options = config.memory_options();
    MemoryStore::open(&options).map_err(|e| match &options.path {
        Some(path) => anyhow::anyhow!(
            "store.path: cannot open the memory store's journal in {}: {e}",
            path.display()
        ),
        None => anyhow::anyhow!("cannot start the memory store: {e}"),
    })
}

/// Puts back into `new` the running values of keys a reload cannot change; returns them.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    if new.server.listen != old.server.listen {
        kept.push("server.listen");
        new.server.listen = old.server.listen;
    }
    if new.server.admin_listen != old.server.admin_listen {
        kept.push("server.admin_listen");
        new.server.admin_listen = old.server.admin_listen;
    }
    if new.upstream.url != old.upstream.url || new.upstream.timeout != old.upstream.timeout {
        kept.push("upstream");
        new.upstream.url = old.upstream.url.clone();
        new.upstream.timeout = old.upstream.timeout;
    }
    // TLS on or off changes what the listeners speak; new files for it are loaded.
    if new.server.tls_files().is_some() != old.server.tls_files().is_some() {
        kept.push("server.tls_cert_file");
        new.server.tls_cert_file = old.server.tls_cert_file.clone();
        new.server.tls_key_file = old.server.tls_key_file.clone();
    }
    if new.store != old.store {
        kept.push("store");
        new.store = old.store.clone();
    }
    if new.grants.cache_ttl != old.grants.cache_ttl {
        kept.push("grants.cache_ttl");
        new.grants.cache_ttl = old.grants.cache_ttl;
    }
    if new.log != old.log {
        kept.push("log");
        new.log = old.log.clone();
    }
    kept
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
