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
//! - [`upstream`]: the one upstream client and header hygiene.
//! - [`admin`]: health, readiness, metrics and the quota API.
//! - [`error`]: gateway errors as Nylas-shaped JSON responses.
//! - [`ratelimit`]: `RateLimit-Policy` and `RateLimit` headers.
//! - [`metrics`]: Prometheus metrics.

pub mod admin;
pub mod config;
pub mod error;
pub mod grants;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
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
/// then stops taking connections and lets in-flight requests finish (up to
/// `[server] shutdown_grace`).
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
    let (tx, rx) = tokio::sync::watch::channel(false);
    let proxy_rx = rx.clone();
    let admin_rx = rx;
    let proxy =
        axum::serve(listener, app(Arc::clone(&state))).with_graceful_shutdown(wait(proxy_rx));
    let admin = axum::serve(admin, admin::router(Arc::clone(&state)))
        .with_graceful_shutdown(wait(admin_rx));
    let proxy = tokio::spawn(async move { proxy.await });
    let admin = tokio::spawn(async move { admin.await });
    shutdown.await;
    state.shutting_down.store(true, Ordering::SeqCst);
    tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
    let _ = tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        let p = proxy.await;
        let a = admin.await;
        (p, a)
    })
    .await;
    match drained {
        Ok((p, a)) => {
            p??;
            a??;
        }
        Err(_) => tracing::warn!("shutdown grace elapsed with requests still in flight"),
    }
    Ok(())
}

async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
