//! The accept loop of each listener: hyper's connections with the `[server]` limits on a
//! request's head, and the graceful drain.
//!
//! This is what `axum::serve` does (every connection served by hyper-util's auto builder,
//! HTTP/1.1 and HTTP/2, upgrades allowed, drained with [`GracefulShutdown`]) plus what it
//! cannot be told:
//! - `header_timeout`: hyper's HTTP/1 header read timeout, for every request head of a
//!   connection, also that of an idle keep-alive connection's next request (hyper answers
//!   its own bare 408 and closes). Before hyper's clock runs (a client that sends nothing,
//!   or too little to tell HTTP/1 from HTTP/2; an HTTP/2 client that opens no stream), the
//!   connection is closed when no request has begun `header_timeout` + 1 s after it was
//!   accepted (with TLS: after its handshake, which has `header_timeout` of its own).
//! - `max_header_bytes`: the router answers a head over it with 431 in the Nylas envelope
//!   ([`head_limit`]). hyper buffers at most twice that (at least 8 KiB) while it reads a
//!   head; a head larger still gets hyper's own 431, without a body or `X-Request-Id` (no
//!   request exists yet to give one), and the connection is closed. The same holds for a
//!   request hyper cannot parse (400) and for more than 100 headers (431). Over HTTP/2 the
//!   header list is capped at the same twice, beyond which the h2 crate refuses the stream
//!   itself.
//!
//! Every connection counts in `sendgw_connections{listener}` while it is open, and carries
//! the peer's address as [`ConnectInfo`] (the admin API logs it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::state::AppState;

/// How long after `header_timeout` a connection that has begun no request is closed: hyper's
/// own clock (which answers 408) goes first whenever it runs.
const BEFORE_HYPER: Duration = Duration::from_secs(1);

/// The least read buffer hyper takes.
const HYPER_MIN_BUF: usize = 8 * 1024;

/// A bound socket, what it serves, its name in metrics and logs, and its TLS when on.
pub(crate) struct Listener {
    pub tcp: TcpListener,
    pub router: Router,
    pub name: &'static str,
    pub tls: Option<TlsAcceptor>,
}

/// Accepts connections on `listener` until `stop` turns true (or its sender goes), then
/// stops accepting, asks every open connection to finish (HTTP/1 after its request in
/// flight, HTTP/2 with a GOAWAY) and returns once all have closed.
pub(crate) async fn serve(
    listener: Listener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.tcp.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                accept_failed(listener.name, &e).await;
                continue;
            }
        };
        let conn = Conn {
            router: listener.router.clone(),
            state: Arc::clone(&state),
            name: listener.name,
            peer,
            tls: listener.tls.clone(),
        };
        tokio::spawn(conn.serve(tcp, graceful.watcher()));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// As `axum::serve`: a connection that went before it was accepted is nothing; anything
/// else (out of file descriptors) is logged and waited out for a second.
async fn accept_failed(listener: &'static str, e: &std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(listener, error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One accepted connection.
struct Conn {
    router: Router,
    state: Arc<AppState>,
    name: &'static str,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
}

impl Conn {
    async fn serve(self, tcp: TcpStream, watcher: Watcher) {
        let _open = self.state.metrics.connection(self.name);
        let _ = tcp.set_nodelay(true);
        let config = self.state.config();
        let server = &config.server;
        let Some(tls) = self.tls.clone() else {
            return self.http(TokioIo::new(tcp), server, watcher).await;
        };
        // The handshake gets `header_timeout` too: a client that opens a connection and
        // says nothing holds it no longer over TLS than without.
        match tokio::time::timeout(server.header_timeout, tls.accept(tcp)).await {
            Ok(Ok(stream)) => self.http(TokioIo::new(stream), server, watcher).await,
            Ok(Err(e)) => {
                tracing::debug!(listener = self.name, error = %e, "TLS handshake failed");
            }
            Err(_) => tracing::debug!(listener = self.name, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP on `io` until the connection ends, the drain closes it, or no request
    /// has begun in time.
    async fn http<I>(self, io: TokioIo<I>, server: &ServerConfig, watcher: Watcher)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let builder = builder(server);
        let started = Arc::new(AtomicBool::new(false));
        let (router, peer, begun) = (self.router, self.peer, Arc::clone(&started));
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            begun.store(true, Ordering::Release);
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = watcher.watch(builder.serve_connection_with_upgrades(io, service));
        tokio::pin!(conn);
        tokio::select! {
            _ = &mut conn => return,
            () = tokio::time::sleep(server.header_timeout + BEFORE_HYPER) => {}
        }
        // Nothing begun by now: closed (dropping the connection closes the socket).
        if started.load(Ordering::Acquire) {
            let _: Result<(), _> = conn.await;
        }
    }
}

/// hyper's builder with the `[server]` limits on reading a head.
fn builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let buf = hyper_buffer(server.max_header_bytes);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        .max_buf_size(buf);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buf).unwrap_or(u32::MAX));
    builder
}

/// The most hyper buffers for a head: twice `max_header_bytes`, so that a head a little
/// over the limit still reaches [`head_limit`] and gets the envelope.
fn hyper_buffer(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(2).max(HYPER_MIN_BUF)
}

/// The layer that answers a request head over `[server] max_header_bytes` with 431 in the
/// Nylas envelope (inside the request-id layer, so it carries the request's id).
pub async fn head_limit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = state.config().server.max_header_bytes;
    let size = head_size(&req);
    if size > limit {
        return GatewayError::HeadersTooLarge { size, limit }.into_response();
    }
    next.run(req).await
}

/// The size of a request's head as HTTP/1.1 writes it: the request line, each header as
/// `name: value\r\n`, and the blank line.
fn head_size(req: &Request) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + headers + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_measured_as_http_1_1_writes_it() {
        let req = Request::builder()
            .uri("/v3/x?a=1")
            .header("host", "h")
            .body(Body::empty())
            .unwrap();
        // "GET /v3/x?a=1 HTTP/1.1\r\n" + "host: h\r\n" + "\r\n"
        assert_eq!(head_size(&req), 24 + 9 + 2);
    }

    #[test]
    fn hyper_buffers_twice_the_limit_and_never_under_its_minimum() {
        assert_eq!(hyper_buffer(64 * 1024), 128 * 1024);
        assert_eq!(hyper_buffer(1000), HYPER_MIN_BUF);
    }
}
