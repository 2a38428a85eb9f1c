//! Drafts: a send of a draft and a change to the same draft never overlap, on any replica.
//!
//! A draft send is counted from the draft as Nylas holds it when the gateway reads it; a
//! `PUT`, `PATCH` or `DELETE` of the draft that lands between that read and the send would
//! make Nylas send something else. So both take the same lock in the store (a setting of
//! the grant's scope, set only if absent, expiring on its own) for as long as they are in
//! flight: a send from before it reads the draft until it has settled, a change for the
//! time Nylas takes to answer it. Whoever comes second waits a little, then gets 409
//! `draft_busy` with `Retry-After`. Only draft sends and draft changes touch the lock:
//! ordinary sends make no extra round trip. An edit made directly at Nylas, around the
//! gateway, is caught afterwards by settling to what Nylas says it sent.

use std::sync::Arc;
use std::time::Duration;

use limits::{QuotaStore, StoreError};

use crate::request_id::RequestId;
use crate::scope::Scope;

/// Longest a draft send or change waits for the other to finish before answering 409.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long a lock outlives its holder's upstream timeout, should the holder vanish.
const LOCK_MARGIN: Duration = Duration::from_secs(30);

/// Why a lock could not be had.
#[derive(Debug)]
pub enum LockError {
    /// Someone else holds it still.
    Busy,
    /// The store failed.
    Store(StoreError),
}

/// A held lock on one draft; give it back with [`DraftLock::release`]. Dropped unreleased
/// (a cancelled request), it is released in the background, and expires anyway.
#[derive(Debug)]
pub struct DraftLock {
    store: Arc<dyn QuotaStore>,
    scope: Scope,
    name: String,
    token: String,
    held: bool,
}

impl DraftLock {
    /// Takes the lock on `draft_id` of `scope`, waiting up to `wait` for its holder.
    /// `timeout` is the longest the holder may need (the upstream timeout).
    ///
    /// # Errors
    /// [`LockError::Busy`] when still held after `wait`; [`LockError::Store`] when the
    /// store fails.
    pub async fn acquire(
        store: Arc<dyn QuotaStore>,
        scope: &Scope,
        draft_id: &str,
        timeout: Duration,
        wait: Duration,
    ) -> Result<DraftLock, LockError> {
        let name = format!("draft:{draft_id}");
        let token = RequestId::current().to_string();
        let ttl = timeout + LOCK_MARGIN;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(20);
        loop {
            let taken = store
                .meta_set_new(scope.as_str(), &name, &token, ttl)
                .await
                .map_err(LockError::Store)?;
            if taken {
                let scope = scope.clone();
                return Ok(DraftLock {
                    store,
                    scope,
                    name,
                    token,
                    held: true,
                });
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(LockError::Busy);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Gives the lock back (only if it is still this holder's).
    pub async fn release(mut self) {
        self.held = false;
        let result = self
            .store
            .meta_delete_if(self.scope.as_str(), &self.name, &self.token)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not release a draft lock; it expires on its own");
        }
    }
}

impl Drop for DraftLock {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let (store, scope) = (Arc::clone(&self.store), self.scope.clone());
        let (name, token) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = store.meta_delete_if(scope.as_str(), &name, &token).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::MemoryStore;

    #[tokio::test]
    async fn one_holder_at_a_time_and_release_frees_it() {
        let store: Arc<dyn QuotaStore> = Arc::new(MemoryStore::new());
        let scope = Scope::grant("g");
        let t = Duration::from_secs(5);
        let first = DraftLock::acquire(Arc::clone(&store), &scope, "d1", t, Duration::ZERO)
            .await
            .unwrap();
        let second = DraftLock::acquire(
            Arc::clone(&store),
            &scope,
            "d1",
            t,
            Duration::from_millis(60),
        )
        .await;
        assert!(matches!(second, Err(LockError::Busy)));
        let other = DraftLock::acquire(Arc::clone(&store), &scope, "d2", t, Duration::ZERO).await;
        assert!(other.is_ok(), "another draft is another lock");
        first.release().await;
        let again = DraftLock::acquire(Arc::clone(&store), &scope, "d1", t, Duration::ZERO).await;
        assert!(again.is_ok());
    }

    #[tokio::test]
    async fn a_waiter_gets_the_lock_once_it_is_released() {
        let store: Arc<dyn QuotaStore> = Arc::new(MemoryStore::new());
        let scope = Scope::grant("g");
        let t = Duration::from_secs(5);
        let first = DraftLock::acquire(Arc::clone(&store), &scope, "d", t, Duration::ZERO)
            .await
            .unwrap();
        let waiter = tokio::spawn({
            let (store, scope) = (Arc::clone(&store), scope.clone());
            async move { DraftLock::acquire(store, &scope, "d", t, Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.release().await;
        assert!(waiter.await.unwrap().is_ok());
    }
}
