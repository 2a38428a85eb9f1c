//! Noting every charge in the store's fleet index, for the fleet view ([`crate::fleet_view`]).
//!
//! Every charge's usage is noted in the store's fleet index ([`limits::fleet`]) as an upper
//! bound on the scope's utilization. [`Indexed`] takes the notes: it wraps the store, keeps
//! the latest note per scope in memory and writes them out at most once a second
//! ([`crate::fleet_view::flush_every`]), so a send pays one map insert, never a store round
//! trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use limits::{
    Allowance, Cost, Decision, FleetCursor, FleetEntry, Guarded, Millis, Probe, Profile,
    QuotaStore, Reservation, StoreError, StoreHealth, Usage, utilization_bound,
};

/// How often this replica's notes are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Notes written in one store call at most (one Lua script's arguments with Redis).
const FLUSH_CHUNK: usize = 500;

/// A store whose charges are noted in its fleet index.
#[derive(Debug)]
pub struct Indexed {
    inner: Arc<dyn QuotaStore>,
    pending: Mutex<HashMap<String, FleetEntry>>,
    /// The last flush failed (its warning is logged once per outage).
    failing: std::sync::atomic::AtomicBool,
}

impl Indexed {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn QuotaStore>) -> Self {
        Indexed {
            inner,
            pending: Mutex::default(),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes the notes taken since the last flush; on failure they are kept for the next.
    pub async fn flush(&self) {
        let entries: Vec<FleetEntry> = self.lock().drain().map(|(_, e)| e).collect();
        if entries.is_empty() {
            return;
        }
        for (i, chunk) in entries.chunks(FLUSH_CHUNK).enumerate() {
            if let Err(e) = self.inner.fleet_note(chunk).await {
                if !self
                    .failing
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, "fleet index: notes not written, kept for the next flush (logged once until a write succeeds)");
                }
                let mut pending = self.lock();
                for entry in entries.into_iter().skip(i * FLUSH_CHUNK) {
                    merge(&mut pending, entry);
                }
                return;
            }
        }
        self.failing
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FleetEntry>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, scope: &str, profile: &Profile, usage: &Usage, expires_at: Millis) {
        let entry = FleetEntry {
            scope: scope.to_owned(),
            profile: profile.name().to_owned(),
            utilization: utilization_bound(usage),
            expires_at,
            version: 0,
        };
        merge(&mut self.lock(), entry);
    }

    /// Notes an admission's usage, and a denial's too: a scope refused because its limit
    /// was lowered (a reload, a stricter override) is over it without any new charge.
    fn note_decision(&self, scope: &str, profile: &Profile, decision: &Decision) {
        match decision {
            Decision::Allowed(a) if !a.replay => {
                let expires = a.reservation.expires_at_ms();
                self.note(scope, profile, &a.usage, expires);
            }
            Decision::Allowed(_) => {}
            Decision::Denied(d) => {
                let expires = forced_expiry(&d.usage, Some(d.at));
                self.note(scope, profile, &d.usage, expires);
            }
        }
    }
}

/// Keeps the larger bound and the later expiry of two notes of one scope.
fn merge(pending: &mut HashMap<String, FleetEntry>, entry: FleetEntry) {
    match pending.get_mut(&entry.scope) {
        Some(e) => {
            e.utilization = e.utilization.max(entry.utilization);
            e.expires_at = e.expires_at.max(entry.expires_at);
            e.profile = entry.profile;
        }
        None => {
            pending.insert(entry.scope.clone(), entry);
        }
    }
}

/// When a forced charge's usage stops counting, at the latest: its instant plus twice the
/// longest window (a calendar month is at most that long past any instant in it).
fn forced_expiry(usage: &Usage, at: Option<Millis>) -> Millis {
    let longest = usage.windows.iter().map(|w| w.seconds).max().unwrap_or(0);
    let at = at.unwrap_or_else(|| limits::Clock::now_ms(&limits::SystemClock));
    at.saturating_add(longest.saturating_mul(2000))
}

#[async_trait]
impl QuotaStore for Indexed {
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        let d = self
            .inner
            .reserve_at(scope, profile, cost, at, idempotency_key)
            .await?;
        self.note_decision(scope, profile, &d);
        Ok(d)
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        let charged = self.inner.charge(scope, profile, cost, at).await?;
        let usage = &charged.usage;
        self.note(scope, profile, usage, forced_expiry(usage, at));
        Ok(charged)
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        self.inner.release(reservation).await
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        self.inner.usage(scope, profile).await
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        self.inner.reset(scope).await
    }

    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
        expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        let g = self
            .inner
            .reserve_guarded(scope, profile, cost, at, idempotency_key, expected_override)
            .await?;
        if let Guarded::Decided(d) = &g {
            self.note_decision(scope, profile, d);
        }
        Ok(g)
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        self.inner.cool_down(scope, duration).await
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta_get(scope, name).await
    }

    async fn meta_ttl(&self, scope: &str, name: &str) -> Result<Option<Duration>, StoreError> {
        self.inner.meta_ttl(scope, name).await
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.inner.meta_set(scope, name, value, ttl).await
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.meta_set_new(scope, name, value, ttl).await
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        self.inner.meta_delete(scope, name).await
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        self.inner.meta_delete_if(scope, name, value).await
    }

    async fn probe_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Probe, StoreError> {
        self.inner.probe_at(scope, profile, cost, at).await
    }

    async fn fleet_note(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        self.inner.fleet_note(entries).await
    }

    async fn fleet_list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        self.inner.fleet_list(min, after, count).await
    }

    async fn fleet_lower(&self, scope: &str, seen: u64, to: f64) -> Result<(), StoreError> {
        self.inner.fleet_lower(scope, seen, to).await
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.inner.durable().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn health(&self) -> Result<StoreHealth, StoreError> {
        self.inner.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        limits::ProfileSpec::default()
            .window(limits::WindowSpec::rolling(Duration::from_secs(3600)).messages(10))
            .build("p")
            .unwrap()
    }

    #[tokio::test]
    async fn every_charge_is_noted_and_written_in_chunks() {
        let store = Indexed::new(Arc::new(limits::MemoryStore::new()));
        let p = profile();
        let n = FLUSH_CHUNK * 2 + 7;
        for i in 0..n {
            let cost = Cost::new(1, 0, 0);
            store
                .reserve(&format!("grant:{i}"), &p, cost, None)
                .await
                .unwrap();
        }
        store
            .charge("grant:0", &p, Cost::new(4, 0, 0), None)
            .await
            .unwrap();
        assert!(
            store.fleet_list(0.0, None, 10).await.unwrap().is_empty(),
            "not yet written"
        );
        store.flush().await;
        let all = store.fleet_list(0.0, None, n + 1).await.unwrap();
        assert_eq!(all.len(), n);
        assert_eq!(
            (all[0].scope.as_str(), all[0].utilization),
            ("grant:0", 0.5)
        );
        assert!(
            all[1..]
                .iter()
                .all(|e| e.utilization == 0.1 && e.profile == "p")
        );
    }
}
