//! A replica's own budget while the shared store is down, written back when it returns.
//!
//! [`LocalBudget`] admits, per scope, at most `fraction` of each window's limit (rounded
//! down, at least 1) from an in-process [`MemoryStore`] under [`Profile::scaled`], so the
//! same engine decides, all or nothing across windows and metrics, with the same clock
//! rules. Every charge it admits is journaled; [`LocalBudget::reconcile`] charges the
//! journal into the shared store once it answers again (with [`QuotaStore::charge`], which
//! counts past the limit: the sends went out), so usage there converges on everything sent.
//!
//! Why not `governor`: a GCRA rate limiter smooths a *rate* (a burst of `b` refilled at
//! `b` per window, so up to `2b` in one window), cannot check several windows and metrics
//! all or nothing, and cannot give back a send that was not made. The budget here must be
//! a hard count per window, exact under concurrency, releasable, and written back; the
//! memory store already is all of that.
//!
//! Bounds: over an outage, each replica admits at most its share of each window per scope
//! (what it admitted in an earlier outage still counts against it while in the window).
//! Written back, a charge lands in the buckets of the moment it is written back, not the
//! moment it was admitted: it is counted until up to one outage's length later than it
//! would have been, never less. A locally admitted send released after its charge was
//! written back keeps that charge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::decision::{Allowance, Cost, Decision, Reservation, Usage};
use crate::memory::MemoryStore;
use crate::policy::Profile;
use crate::store::{Guarded, QuotaStore, StoreError};

/// Most charges one replica holds for writing back; beyond it, local admission refuses.
pub const MAX_JOURNAL: usize = 1_000_000;

/// One locally admitted charge, to write back.
#[derive(Debug, Clone)]
struct Entry {
    scope: Arc<str>,
    profile: Profile,
    cost: Cost,
    at: Millis,
    /// The local reservation's id (0 for a forced charge): a release takes it back out.
    id: u64,
}

/// What a reconciliation wrote back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Charges written.
    pub charges: u64,
    /// Their units, summed.
    pub cost: Cost,
}

/// An in-process share of each limit, journaled for writing back. See the module docs.
#[derive(Debug)]
pub struct LocalBudget {
    store: MemoryStore,
    fraction: f64,
    journal: Mutex<Vec<Entry>>,
}

impl LocalBudget {
    /// A budget of `fraction` (0 < fraction ≤ 1) of every window's limit.
    pub fn new(fraction: f64) -> Self {
        Self::with_store(MemoryStore::new(), fraction)
    }

    /// The same on a given memory store (tests pass one with a fake clock).
    pub fn with_store(store: MemoryStore, fraction: f64) -> Self {
        LocalBudget {
            store,
            fraction,
            journal: Mutex::new(Vec::new()),
        }
    }

    /// The share of each limit admitted locally.
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Charges waiting to be written back.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, entry: Entry) {
        self.lock().push(entry);
    }

    /// Writes every journaled charge into `target`, oldest first. What could not be written
    /// (the store failed again) stays journaled, in order, for the next call.
    ///
    /// # Errors
    /// The first failure of `target`; what was written before it is in the result's sum
    /// only through `pending()` going down.
    pub async fn reconcile(&self, target: &dyn QuotaStore) -> Result<Reconciled, StoreError> {
        let entries = std::mem::take(&mut *self.lock());
        let mut done = Reconciled::default();
        let mut left = entries.into_iter();
        while let Some(e) = left.next() {
            if let Err(err) = target
                .charge(&e.scope, &e.profile, e.cost, Some(e.at))
                .await
            {
                let mut journal = self.lock();
                let newer = std::mem::take(&mut *journal);
                journal.push(e);
                journal.extend(left);
                journal.extend(newer);
                return Err(err);
            }
            done.charges += 1;
            done.cost = Cost::new(
                done.cost.messages + e.cost.messages,
                done.cost.recipients + e.cost.recipients,
                done.cost.bytes + e.cost.bytes,
            );
        }
        Ok(done)
    }
}

#[async_trait]
impl QuotaStore for LocalBudget {
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        _idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        if self.pending() >= MAX_JOURNAL {
            return Err(StoreError::Unavailable(
                "local budget journal is full".into(),
            ));
        }
        let scaled = profile.scaled(self.fraction);
        let decision = self
            .store
            .reserve_at(scope, &scaled, cost, at, None)
            .await?;
        if let Decision::Allowed(a) = &decision {
            self.record(Entry {
                scope: Arc::from(scope),
                profile: profile.clone(),
                cost,
                at: a.reservation.at(),
                id: a.reservation.id,
            });
        }
        Ok(decision)
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        let scaled = profile.scaled(self.fraction);
        let charged = self.store.charge(scope, &scaled, cost, at).await?;
        self.record(Entry {
            scope: Arc::from(scope),
            profile: profile.clone(),
            cost,
            at: at.unwrap_or(0),
            id: 0,
        });
        Ok(charged)
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        self.store.release(reservation).await?;
        let mut journal = self.lock();
        if let Some(i) = journal
            .iter()
            .position(|e| e.id == reservation.id && *e.scope == *reservation.scope())
        {
            journal.remove(i);
        }
        Ok(())
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        self.store
            .usage(scope, &profile.scaled(self.fraction))
            .await
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        self.lock().retain(|e| *e.scope != *scope);
        self.store.reset(scope).await
    }

    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
        _expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        self.reserve_at(scope, profile, cost, at, idempotency_key)
            .await
            .map(Guarded::Decided)
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        self.store.cool_down(scope, duration).await
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.store.meta_get(scope, name).await
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.store.meta_set(scope, name, value, ttl).await
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.store.meta_set_new(scope, name, value, ttl).await
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        self.store.meta_delete(scope, name).await
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        self.store.meta_delete_if(scope, name, value).await
    }
}
