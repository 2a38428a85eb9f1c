//! Serving: the listeners (proxy, admin, and optionally webhooks), the layers around them,
//! signals and the drain.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::listener::{self, Listener};
use crate::state::AppState;
use crate::{admin, body_timeout, proxy, request_id, webhooks};

/// The proxy router. Layers, outermost first: the request id (with its span and the one
/// log line of a gateway error), the head limit (431 in the envelope past `[server]
/// max_header_bytes`), then the body idle timeout (so that every reader of the body,
/// counting or forwarding, sees a stall). Everything else is the proxy handler's.
pub fn app(state: Arc<AppState>) -> Router {
    layered(Router::new().fallback(proxy::handle), state)
}

/// The router of `[webhooks] listen`: Nylas's webhook endpoint alone, with the same layers
/// as the proxy's.
pub fn webhooks_app(state: Arc<AppState>) -> Router {
    layered(webhooks::routes(), state)
}

fn layered(router: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    router
        .with_state(Arc::clone(&state))
        .layer(axum::middleware::map_request_with_state(
            Arc::clone(&state),
            body_timeout::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state,
            listener::head_limit,
        ))
        .layer(axum::middleware::from_fn(request_id::layer))
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
    run_with_webhooks(listener, admin, None, state, shutdown).await
}

/// [`run`], with Nylas's webhook endpoint on a listener of its own when `webhooks` is
/// given (it stops with the admin listener).
///
/// # Errors
/// A listener fails.
pub async fn run_with_webhooks(
    listener: TcpListener,
    admin: TcpListener,
    webhooks: Option<TcpListener>,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = state.config().server.shutdown_grace;
    let (stop_proxy, proxy_rx) = tokio::sync::watch::channel(false);
    let (stop_admin, admin_rx) = tokio::sync::watch::channel(false);
    let tls = match &state.tls {
        Some(certs) => Some(certs.acceptor()?),
        None => None,
    };
    let on = |tcp, router, name, stop| {
        let tls = tls.clone();
        let listener = Listener {
            tcp,
            router,
            name,
            tls,
        };
        tokio::spawn(listener::serve(listener, Arc::clone(&state), stop))
    };
    let proxy = on(listener, app(Arc::clone(&state)), "proxy", proxy_rx);
    let hooks = webhooks.map(|l| {
        let router = webhooks_app(Arc::clone(&state));
        on(l, router, "webhooks", admin_rx.clone())
    });
    // Every connection carries the caller's address, which the admin API logs for every
    // change and refusal. Its bodies (profile changes, Nylas's webhooks when they have no
    // listener of their own) get the body idle timeout too.
    let admin_app = admin::router(Arc::clone(&state)).layer(
        axum::middleware::map_request_with_state(Arc::clone(&state), body_timeout::layer),
    );
    let admin = on(admin, admin_app, "admin", admin_rx);
    let watch = tokio::spawn(crate::health::watch(Arc::clone(&state)));
    let fleet = tokio::spawn(crate::fleet_view::flush_every(Arc::clone(&state)));
    shutdown.await;
    watch.abort();
    fleet.abort();
    state.begin_shutdown();
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
    if let Some(hooks) = hooks
        && let Ok(h) = tokio::time::timeout_at(deadline, hooks).await
    {
        h??;
    }
    state.fleet.flush().await;
    Ok(())
}

/// Binds the configured listeners, prints `send-gateway listening on http://ADDR` and
/// `send-gateway admin on http://ADDR` (and, with `[webhooks] listen`, `send-gateway
/// webhooks on http://ADDR`; `https://` with `[server] tls_cert_file`) on stdout (scripts
/// read them when binding port 0),
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
    let hooks = match config.webhooks.listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let state = Arc::new(AppState::new(config).await?);
    // Ready lines only once the state is built: a bad upstream URL, store or certificate
    // fails first.
    let scheme = if state.tls.is_some() { "https" } else { "http" };
    println!(
        "send-gateway listening on {scheme}://{}",
        listener.local_addr()?
    );
    println!("send-gateway admin on {scheme}://{}", admin.local_addr()?);
    if let Some(hooks) = &hooks {
        println!(
            "send-gateway webhooks on {scheme}://{}",
            hooks.local_addr()?
        );
    }
    let config = state.config();
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        upstream = %config.upstream.url,
        store = ?config.store.backend,
        "send-gateway started"
    );
    for warning in config.warnings() {
        tracing::warn!(%warning, "configuration");
    }
    spawn_reloader(Arc::clone(&state), reload)?;
    run_with_webhooks(listener, admin, hooks, state, shutdown_signal()).await
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
