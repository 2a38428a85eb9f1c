//! [`FakeNylas`]: the router served on a socket, in a spawned task.

use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::state::Control;
use crate::{control_api, intercept, nylas};

/// How long [`FakeNylas::shutdown`] lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The whole fake as a router: Nylas routes and `/__fake/` behind the recording
/// middleware. Serve it yourself, or call it with `tower::ServiceExt::oneshot`.
pub fn app(control: Control) -> Router {
    nylas::router()
        .merge(control_api::router())
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            intercept::intercept,
        ))
        // Tests send 20 MB bodies; Nylas's own limits are not enforced here.
        .layer(DefaultBodyLimit::disable())
        .with_state(control)
}

/// A running fake Nylas: a server task on a local socket.
///
/// Dereferences to its [`Control`], so `fake.requests()`, `fake.add_rule(..)` and
/// the rest work directly. Dropping it stops the server (gracefully, in the
/// background); [`FakeNylas::shutdown`] waits for that.
#[derive(Debug)]
pub struct FakeNylas {
    control: Control,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeNylas {
    /// Binds `addr` (port 0 picks a free port) and serves a fresh fake on it.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(addr: SocketAddr) -> std::io::Result<FakeNylas> {
        let listener = TcpListener::bind(addr).await?;
        FakeNylas::serve(listener, Control::new())
    }

    /// Serves `control` on an already bound listener.
    ///
    /// # Errors
    /// When the listener's local address cannot be read.
    pub fn serve(listener: TcpListener, control: Control) -> std::io::Result<FakeNylas> {
        let addr = listener.local_addr()?;
        let (shutdown, signal) = oneshot::channel::<()>();
        // Small JSON answers: don't let Nagle hold them back in latency benchmarks.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(error = %err, "could not set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, app(control.clone())).with_graceful_shutdown(async {
            // A dropped sender ends the server too.
            let _ = signal.await;
        });
        let task = tokio::spawn(server.into_future());
        Ok(FakeNylas {
            control,
            addr,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:4000` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A cloneable handle on the fake's state (also reachable through `Deref`).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Stops accepting, lets in-flight requests finish (5 s at most), then returns.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Deref for FakeNylas {
    type Target = Control;

    fn deref(&self) -> &Control {
        &self.control
    }
}

impl Drop for FakeNylas {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}
