//! send-gateway: a proxy in front of the Nylas v3 API that lets a send through only when the
//! sending grant stays inside its provider's limits.
//!
//! `main.rs` parses the command line, loads the configuration and calls [`run`]; tests drive
//! the same [`run`] on `127.0.0.1:0`.
//!
//! # Layout
//! - [`config`]: the TOML configuration and its validation.
//! - [`send`]: which requests send mail, and what a send costs.
//! - [`proxy`]: the proxy handler: cost, check, charge, forward, settle; relay the rest.
//! - [`grants`]: canonical grant ids from any identifier form, cached.
//! - [`selection`]: which profile a grant is charged under (override, provider, default).
//! - [`events`]: threshold events (80 % and 100 % of a window) and their webhook.
//! - [`upstream`]: the one upstream client and header hygiene.
//! - [`admin`]: health, readiness, metrics and the quota API.
//! - [`error`]: gateway errors as Nylas-shaped JSON responses.
//! - [`ratelimit`]: `RateLimit-Policy` and `RateLimit` headers.
//! - [`metrics`]: Prometheus metrics.

pub mod admin;
pub mod config;
pub mod error;
pub mod events;
pub mod grants;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod selection;
pub mod send;
pub mod upstream;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use http::HeaderMap;
use limits::{MemoryStore, QuotaStore, RedisStore};
use tokio::net::TcpListener;

use crate::config::{Config, StoreBackend};
use crate::grants::GrantResolver;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    config: RwLock<Arc<Config>>,
    /// The quota store.
    pub store: Arc<dyn QuotaStore>,
    /// The upstream client.
    pub upstream: Upstream,
    /// Grant identifier resolution.
    pub grants: GrantResolver,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Profile selection caches.
    pub selector: selection::Selector,
    /// The client for event webhooks (any URL the operator configured, unlike `upstream`).
    pub webhook: reqwest::Client,
    shutting_down: AtomicBool,
}

impl AppState {
    /// Builds the state: connects the store named by the configuration.
    ///
    /// # Errors
    /// The Redis store cannot be reached or configured, or the HTTP client cannot start.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let store: Arc<dyn QuotaStore> = match config.store.backend {
            StoreBackend::Memory => Arc::new(MemoryStore::new()),
            StoreBackend::Redis => Arc::new(RedisStore::lazy(&config.redis())?),
        };
        if let Err(e) = store.ping().await {
            // Start anyway: sends are answered per `on_unavailable` until Redis is back.
            tracing::warn!(error = %e, "quota store not reachable at start-up");
        }
        Self::with_store(config, store)
    }

    /// Builds the state around an existing store (tests inject one).
    ///
    /// # Errors
    /// The HTTP client cannot start.
    pub fn with_store(config: Config, store: Arc<dyn QuotaStore>) -> anyhow::Result<Self> {
        let upstream = Upstream::new(&config.upstream.url, config.upstream.timeout)?;
        Ok(AppState {
            grants: GrantResolver::new(config.grants.cache_ttl),
            config: RwLock::new(Arc::new(config)),
            store,
            upstream,
            metrics: Arc::new(Metrics::default()),
            selector: selection::Selector::default(),
            webhook: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
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
    /// name a limit). Listeners, the upstream and the store need a restart: their old values
    /// stay, with a warning. Returns the keys that were not applied.
    pub fn reload(&self, mut new: Config) -> Vec<&'static str> {
        let old = self.config();
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
        if new.grants != old.grants {
            self.selector.forget_providers();
        }
        for key in &kept {
            tracing::warn!(
                key,
                "configuration change needs a restart; keeping the running value"
            );
        }
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(new);
        self.metrics.reload(true);
        tracing::info!("configuration reloaded");
        kept
    }

    /// Whether the gateway is draining.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The proxy router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new().fallback(proxy::handle).with_state(state)
}

/// Serves the proxy on `listener` and the admin API on `admin` until `shutdown` resolves,
/// then stops taking proxy connections and lets in-flight requests finish (up to
/// `[server] shutdown_grace`). The admin listener answers until then (`/readyz` with 503).
///
/// # Errors
/// A listener fails.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = state.config().server.shutdown_grace;
    let (stop_proxy, proxy_rx) = tokio::sync::watch::channel(false);
    let (stop_admin, admin_rx) = tokio::sync::watch::channel(false);
    let proxy =
        axum::serve(listener, app(Arc::clone(&state))).with_graceful_shutdown(wait(proxy_rx));
    let admin = axum::serve(admin, admin::router(Arc::clone(&state)))
        .with_graceful_shutdown(wait(admin_rx));
    let proxy = tokio::spawn(async move { proxy.await });
    let admin = tokio::spawn(async move { admin.await });
    shutdown.await;
    state.shutting_down.store(true, Ordering::SeqCst);
    tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
    // The proxy stops taking connections at once. The admin listener keeps answering
    // (`/readyz` says 503) until the proxy has drained, so probes see the drain instead of
    // a refused connection.
    let deadline = tokio::time::Instant::now() + grace;
    let _ = stop_proxy.send(true);
    let proxy = tokio::time::timeout_at(deadline, proxy).await;
    let _ = stop_admin.send(true);
    let admin = tokio::time::timeout_at(deadline, admin).await;
    match proxy {
        Ok(p) => p??,
        Err(_) => tracing::warn!("shutdown grace elapsed with requests still in flight"),
    }
    if let Ok(a) = admin {
        a??;
    }
    Ok(())
}

/// Binds the configured listeners, prints `send-gateway listening on http://ADDR` and
/// `send-gateway admin on http://ADDR` on stdout (scripts read them when binding port 0),
/// and serves until SIGTERM or Ctrl-C. SIGHUP calls `reload` and applies the result (see
/// [`AppState::reload`]); a configuration that fails to load is logged and counted, and
/// the running one stays.
///
/// # Errors
/// A listener cannot bind, the store cannot be configured, or a listener fails.
pub async fn serve<R>(config: Config, reload: R) -> anyhow::Result<()>
where
    R: Fn() -> Result<Config, config::ConfigError> + Send + Sync + 'static,
{
    let listener = TcpListener::bind(config.server.listen).await?;
    let admin = TcpListener::bind(config.server.admin_listen).await?;
    println!(
        "send-gateway listening on http://{}",
        listener.local_addr()?
    );
    println!("send-gateway admin on http://{}", admin.local_addr()?);
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        upstream = %config.upstream.url,
        store = ?config.store.backend,
        "send-gateway started"
    );
    let state = Arc::new(AppState::new(config).await?);
    spawn_reloader(Arc::clone(&state), reload)?;
    run(listener, admin, state, shutdown_signal()).await
}

#[cfg(unix)]
fn spawn_reloader<R>(state: Arc<AppState>, reload: R) -> anyhow::Result<()>
where
    R: Fn() -> Result<Config, config::ConfigError> + Send + Sync + 'static,
{
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match reload() {
                Ok(config) => {
                    state.reload(config);
                }
                Err(e) => {
                    state.metrics.reload(false);
                    tracing::error!(error = %e, "configuration reload refused; keeping the running configuration");
                }
            }
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn spawn_reloader<R>(_state: Arc<AppState>, _reload: R) -> anyhow::Result<()> {
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
