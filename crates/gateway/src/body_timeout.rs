//! The body idle timeout (`[server] body_timeout`): a request body that goes that long
//! without a byte arriving fails with [`BodyStalled`].
//!
//! Applied once, as a layer of the proxy and webhook routers, so every reader of a body
//! sees it: the JSON buffering and the multipart head of a send (answered 408, nothing
//! charged), the streamed forward of a charged send (the upstream request is aborted and
//! the charge released, as for any body cut short before its end) and relayed requests.
//!
//! The clock runs only while the gateway waits on the client: it starts when a poll finds
//! no frame ready and stops when one arrives, so a body the gateway itself reads slowly
//! (an upstream that takes its time) never times out on the client's account.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::state::AppState;

/// A request body went `body_timeout` without a byte arriving.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no body byte arrived for {0:?}")]
pub struct BodyStalled(pub Duration);

/// Whether `error` (a body error as axum hands it on) is, or wraps, a [`BodyStalled`].
pub fn is_stall(error: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.is::<BodyStalled>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The layer: wraps the request's body in an [`IdleTimeout`] of the `body_timeout` in force.
pub async fn layer(State(state): State<Arc<AppState>>, req: Request) -> Request {
    let idle = state.config().server.body_timeout;
    req.map(|body| Body::new(IdleTimeout::new(body, idle)))
}

/// A body that fails with [`BodyStalled`] once no frame has come for `idle` while it was
/// being waited on.
#[derive(Debug)]
pub struct IdleTimeout {
    inner: Body,
    idle: Duration,
    /// The deadline of the current wait, reused across waits.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` is set for the current wait.
    waiting: bool,
    stalled: bool,
}

impl IdleTimeout {
    /// Wraps `inner`.
    pub fn new(inner: Body, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: None,
            waiting: false,
            stalled: false,
        }
    }
}

impl http_body::Body for IdleTimeout {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.stalled {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.waiting {
            let deadline = Instant::now() + this.idle;
            match this.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.waiting = true;
        }
        let Some(sleep) = this.sleep.as_mut() else {
            return Poll::Pending;
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.stalled = true;
                Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stalled || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn pending_after(first: &'static [u8]) -> Body {
        let head = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) });
        let never = futures_util::stream::pending();
        Body::from_stream(head.map(|r| r.map(Bytes::from_static)).chain(never))
    }

    #[tokio::test]
    async fn a_body_that_stops_sending_fails_as_stalled_after_the_idle_time() {
        let idle = Duration::from_millis(200);
        let body = Body::new(IdleTimeout::new(pending_after(b"head"), idle));
        let mut stream = body.into_data_stream();
        let first = stream.next().await.expect("a chunk").expect("not an error");
        assert_eq!(&first[..], b"head");
        let started = Instant::now();
        let error = stream.next().await.expect("an item").expect_err("stalled");
        assert!(started.elapsed() >= idle, "never before the idle time");
        assert!(is_stall(&error), "{error}");
        assert!(stream.next().await.is_none(), "nothing after the stall");
    }

    #[tokio::test]
    async fn every_chunk_restarts_the_clock() {
        // Six chunks 250 ms apart under a 1 s idle time: longer than it in all, each gap
        // well inside it.
        let idle = Duration::from_secs(1);
        let chunks = futures_util::stream::iter(0..6).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            Ok::<_, std::io::Error>(Bytes::from(vec![i; 3]))
        });
        let body = Body::new(IdleTimeout::new(Body::from_stream(chunks), idle));
        let all = axum::body::to_bytes(body, 1024).await.expect("no stall");
        assert_eq!(all.len(), 18);
    }

    #[test]
    fn other_errors_are_not_stalls() {
        let error = axum::Error::new(std::io::Error::other("reset"));
        assert!(!is_stall(&error));
        let wrapped = axum::Error::new(axum::Error::new(BodyStalled(Duration::from_secs(1))));
        assert!(is_stall(&wrapped));
    }
}
