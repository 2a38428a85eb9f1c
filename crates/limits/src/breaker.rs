//! A circuit breaker in front of a store: when the store keeps failing, stop waiting for it.
//!
//! After [`BreakerStore::threshold`] consecutive infrastructure failures (unreachable or too
//! slow) the breaker *opens*: every call fails at once with [`StoreError::Unavailable`]
//! instead of waiting out the store's timeout, so a send is decided in microseconds while
//! Redis is down. Once a [`PROBE_EVERY`] has passed, one call goes through as a probe
//! (*half-open*): if the store answers, the breaker closes; if not, it stays open for
//! another interval. Domain answers (a denial, an invalid request, a script error) are
//! answers: they count as the store being up.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::clock::Millis;
use crate::decision::{Allowance, Cost, Decision, Probe, Reservation, Usage};
use crate::fleet::{FleetCursor, FleetEntry};
use crate::policy::Profile;
use crate::store::{Guarded, QuotaStore, StoreError};

/// How long an open breaker waits before letting one probe through.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Consecutive failures that open the breaker, by default.
pub const DEFAULT_THRESHOLD: u32 = 3;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go to the store.
    Closed,
    /// Calls fail at once; the store is not asked.
    Open,
    /// One probe is with the store; other calls fail at once.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
struct State {
    failures: u32,
    /// Open until this instant (then one probe may go); `None` while closed.
    open_until: Option<Instant>,
    probing: bool,
    /// How many times the breaker closed after being open.
    recoveries: u64,
}

/// A [`QuotaStore`] that skips its inner store while that store keeps failing.
#[derive(Debug)]
pub struct BreakerStore {
    inner: Arc<dyn QuotaStore>,
    threshold: u32,
    state: Mutex<State>,
}

/// Leave to make one call; a probe that ends without an answer (its future dropped) lets
/// the next one go.
struct Permit<'a> {
    breaker: &'a BreakerStore,
    probe: bool,
    settled: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.breaker.lock().probing = false;
        }
    }
}

fn is_outage(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Timeout(_))
}

impl BreakerStore {
    /// Wraps `inner`; `threshold` consecutive failures open the breaker (at least 1).
    pub fn new(inner: Arc<dyn QuotaStore>, threshold: u32) -> Self {
        BreakerStore {
            inner,
            threshold: threshold.max(1),
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                probing: false,
                recoveries: 0,
            }),
        }
    }

    /// The store behind the breaker.
    pub fn inner(&self) -> &Arc<dyn QuotaStore> {
        &self.inner
    }

    /// Consecutive failures that open the breaker.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Where the breaker stands now.
    pub fn state(&self) -> BreakerState {
        let s = self.lock();
        match (s.open_until, s.probing) {
            (None, _) => BreakerState::Closed,
            (Some(_), true) => BreakerState::HalfOpen,
            (Some(_), false) => BreakerState::Open,
        }
    }

    /// How many times the breaker has closed again after opening: a caller that sees this
    /// grow knows the store came back (and can write back what it counted meanwhile).
    pub fn recoveries(&self) -> u64 {
        self.lock().recoveries
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enter(&self) -> Result<Permit<'_>, StoreError> {
        let mut s = self.lock();
        let probe = match s.open_until {
            None => false,
            Some(until) if !s.probing && Instant::now() >= until => {
                s.probing = true;
                true
            }
            Some(_) => {
                return Err(StoreError::Unavailable(
                    "quota store circuit open after repeated failures".into(),
                ));
            }
        };
        Ok(Permit {
            breaker: self,
            probe,
            settled: false,
        })
    }

    fn leave<T>(&self, mut permit: Permit<'_>, result: &Result<T, StoreError>) {
        permit.settled = true;
        let mut s = self.lock();
        if permit.probe {
            s.probing = false;
        }
        match result {
            Err(e) if is_outage(e) => {
                s.failures = s.failures.saturating_add(1);
                if permit.probe || (s.open_until.is_none() && s.failures >= self.threshold) {
                    s.open_until = Some(Instant::now() + PROBE_EVERY);
                }
            }
            _ => {
                s.failures = 0;
                if s.open_until.take().is_some() {
                    s.recoveries += 1;
                }
            }
        }
    }

    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let permit = self.enter()?;
        let result = fut.await;
        self.leave(permit, &result);
        result
    }
}

#[async_trait]
impl QuotaStore for BreakerStore {
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        self.call(self.inner.reserve_at(scope, profile, cost, at, key))
            .await
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        self.call(self.inner.charge(scope, profile, cost, at)).await
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        self.call(self.inner.release(reservation)).await
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        self.call(self.inner.usage(scope, profile)).await
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        self.call(self.inner.reset(scope)).await
    }

    async fn probe_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Probe, StoreError> {
        self.call(self.inner.probe_at(scope, profile, cost, at))
            .await
    }

    async fn fleet_note(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        self.call(self.inner.fleet_note(entries)).await
    }

    async fn fleet_list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        self.call(self.inner.fleet_list(min, after, count)).await
    }

    async fn fleet_lower(&self, scope: &str, seen: u64, to: f64) -> Result<(), StoreError> {
        self.call(self.inner.fleet_lower(scope, seen, to)).await
    }

    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        key: Option<&str>,
        expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        let fut = self
            .inner
            .reserve_guarded(scope, profile, cost, at, key, expected_override);
        self.call(fut).await
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        self.call(self.inner.cool_down(scope, duration)).await
    }

    async fn meta_ttl(&self, scope: &str, name: &str) -> Result<Option<Duration>, StoreError> {
        self.call(self.inner.meta_ttl(scope, name)).await
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.call(self.inner.meta_get(scope, name)).await
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.call(self.inner.meta_set(scope, name, value, ttl))
            .await
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.call(self.inner.meta_set_new(scope, name, value, ttl))
            .await
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        self.call(self.inner.meta_delete(scope, name)).await
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        self.call(self.inner.meta_delete_if(scope, name, value))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(self.inner.ping()).await
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.inner.durable().await
    }

    async fn health(&self) -> Result<crate::store::StoreHealth, StoreError> {
        self.call(self.inner.health()).await
    }
}
