//! The embedded store: per-scope counters in this process.
//!
//! Each scope's state sits behind one shard lock of a [`DashMap`], so a reservation checks
//! and charges every window of the scope in one critical section. Rolling windows keep only
//! their non-empty buckets, oldest first, plus running totals, so a decision costs O(windows)
//! amortised. Scopes whose windows, idempotency records and release markers have all expired
//! are dropped by a sweep that runs at most once a minute, keeping memory bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::clock::{Clock, Millis, SystemClock};
use crate::decision::{Allowance, Charge, Cost, Decision, Reservation, Usage};
use crate::policy::{Metric, Period, Profile, Window};
use crate::store::{
    Guarded, IDEMPOTENCY_TTL, META_COOLDOWN, META_PROFILE, QuotaStore, StoreError,
    check_idempotency_key,
};
use crate::window::{Over, Rolling, calendar_bounds, denial, pick_denial, usage_of};

const SWEEP_EVERY_MS: u64 = 60_000;

/// In-process quota counters with an injectable clock.
///
/// # Examples
/// ```
/// # tokio_test_block_on(async {
/// use limits::{Cost, FakeClock, MemoryStore, Profile, QuotaStore};
/// let clock = FakeClock::new(1_700_000_000_000);
/// let store = MemoryStore::with_clock(clock.clone());
/// let icloud = Profile::builtin("icloud").unwrap();
/// let d = store.reserve("grant-1", &icloud, Cost::new(1, 1_000, 0), None).await.unwrap();
/// assert!(d.is_allowed());
/// let d = store.reserve("grant-1", &icloud, Cost::new(1, 1, 0), None).await.unwrap();
/// assert!(!d.is_allowed());
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    scopes: DashMap<Arc<str>, ScopeState>,
    /// Per-scope settings: (scope, name) -> (value, expiry).
    meta: DashMap<(String, String), (String, Option<Millis>)>,
    clock: Arc<dyn Clock>,
    next_id: AtomicU64,
    last_sweep: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_clock(SystemClock)
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    windows: Vec<(Arc<str>, WindowState)>,
    idempotent: HashMap<String, (Decision, Millis)>,
    released: HashMap<u64, Millis>,
    /// Nothing in this scope counts after this instant.
    expires_at: Millis,
}

#[derive(Debug)]
enum WindowState {
    Rolling {
        /// Non-empty buckets, oldest first.
        buckets: VecDeque<(u64, [u64; 3])>,
        totals: [u64; 3],
    },
    Calendar {
        start: Millis,
        end: Millis,
        counts: [u64; 3],
    },
}

impl MemoryStore {
    /// A store reading the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store reading `clock`.
    pub fn with_clock(clock: impl Clock) -> Self {
        MemoryStore {
            scopes: DashMap::new(),
            meta: DashMap::new(),
            clock: Arc::new(clock),
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Number of scopes held in memory.
    pub fn scope_count(&self) -> usize {
        self.scopes.len()
    }

    /// Drops every scope with nothing left that counts.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        self.last_sweep.store(now, Ordering::Relaxed);
        self.scopes.retain(|_, s| s.expires_at > now);
        self.meta.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
    }

    fn meta_value(&self, scope: &str, name: &str, now: Millis) -> Option<String> {
        let key = (scope.to_owned(), name.to_owned());
        let entry = self.meta.get(&key)?;
        let (value, exp) = entry.value();
        exp.is_none_or(|e| e > now).then(|| value.clone())
    }

    fn maybe_sweep(&self, now: Millis) {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now >= last.saturating_add(SWEEP_EVERY_MS)
            && self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.scopes.retain(|_, s| s.expires_at > now);
            self.meta.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
        }
    }

    fn decide(&self, scope: &str, profile: &Profile, cost: Cost, key: Option<&str>) -> Decision {
        self.decide_with(scope, profile, cost, key, Admit::WithinLimits)
    }

    fn decide_with(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        key: Option<&str>,
        admit: Admit,
    ) -> Decision {
        let now = self.clock.now_ms();
        self.maybe_sweep(now);
        let mut entry = match self.scopes.get_mut(scope) {
            Some(e) => e,
            None => self.scopes.entry(Arc::from(scope)).or_default(),
        };
        let scope_arc = Arc::clone(entry.key());
        let state = entry.value_mut();
        if let Some(key) = key {
            state.idempotent.retain(|_, (_, exp)| *exp > now);
            if let Some((decision, _)) = state.idempotent.get(key) {
                let mut replay = decision.clone();
                if let Decision::Allowed(a) = &mut replay {
                    a.replay = true;
                }
                return replay;
            }
        }
        let mut decision = state.decide(scope_arc, profile, cost, now, admit, || {
            self.next_id.fetch_add(1, Ordering::Relaxed)
        });
        // Only admitted requests are remembered (as Nylas keeps only successful answers): a
        // denied request retried with its key after `retry_after` is judged afresh.
        if let (Some(key), Decision::Allowed(a)) = (key, &mut decision) {
            a.reservation.idempotency_key = Some(Arc::from(key));
            let exp = now + IDEMPOTENCY_TTL.as_millis() as u64;
            state
                .idempotent
                .insert(key.to_owned(), (decision.clone(), exp));
            state.expires_at = state.expires_at.max(exp);
        }
        decision
    }
}

/// Whether a decision looks at the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Charge only if every window stays within its limits.
    WithinLimits,
    /// Charge whatever the limits say ([`QuotaStore::charge`]).
    Regardless,
}

impl ScopeState {
    fn window_mut(&mut self, w: &Window, now: Millis) -> &mut WindowState {
        let pos = match self.windows.iter().position(|(id, _)| **id == *w.id()) {
            Some(pos) => pos,
            None => {
                let state = match w.period() {
                    Period::Rolling { .. } => WindowState::Rolling {
                        buckets: VecDeque::new(),
                        totals: [0; 3],
                    },
                    Period::Calendar { unit, tz, .. } => {
                        let (start, end) = calendar_bounds(*unit, tz, now);
                        WindowState::Calendar {
                            start,
                            end,
                            counts: [0; 3],
                        }
                    }
                };
                self.windows.push((Arc::clone(w.id_arc()), state));
                self.windows.len() - 1
            }
        };
        let state = &mut self.windows[pos].1;
        state.advance(w, now);
        state
    }

    fn decide(
        &mut self,
        scope: Arc<str>,
        profile: &Profile,
        cost: Cost,
        now: Millis,
        admit: Admit,
        next_id: impl FnOnce() -> u64,
    ) -> Decision {
        let want = cost.to_array();
        let mut raw = Vec::with_capacity(profile.windows().len());
        let mut overs: Vec<Over> = Vec::new();
        for (i, w) in profile.windows().iter().enumerate() {
            let state = self.window_mut(w, now);
            let used = state.used();
            for m in Metric::ALL {
                let Some(limit) = w.limit(m) else { continue };
                let (limit, u, req) = (limit.get(), used[m.index()], want[m.index()]);
                if u.saturating_add(req) > limit {
                    let retry_ms = (req <= limit)
                        .then(|| state.free_at(w, m, u + req - limit).saturating_sub(now));
                    overs.push(Over {
                        window: i,
                        metric: m,
                        used: u,
                        limit,
                        retry_ms,
                    });
                }
            }
            raw.push((Cost::from_array(used), state.next_free_at(w)));
        }
        if admit == Admit::WithinLimits
            && let Some(over) = pick_denial(&overs)
        {
            return Decision::Denied(denial(profile, over, cost, usage_of(profile, &raw, now)));
        }
        let mut charges = Vec::with_capacity(profile.windows().len());
        raw.clear();
        for w in profile.windows() {
            let state = self.window_mut(w, now);
            let charge = state.charge(w, now, want);
            self.expires_at = self.expires_at.max(charge.expires_at_ms);
            let state = self.window_mut(w, now);
            raw.push((Cost::from_array(state.used()), state.next_free_at(w)));
            charges.push(charge);
        }
        Decision::Allowed(Allowance {
            reservation: Reservation {
                id: next_id(),
                scope,
                cost,
                charges,
                idempotency_key: None,
            },
            usage: usage_of(profile, &raw, now),
            replay: false,
        })
    }

    fn release(&mut self, r: &Reservation, now: Millis) {
        self.released.retain(|_, exp| *exp > now);
        if self.released.contains_key(&r.id) {
            return;
        }
        let until = r
            .charges
            .iter()
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or(now)
            .max(now + 1);
        self.released.insert(r.id, until);
        if let Some(key) = r.idempotency_key.as_deref() {
            let same = |d: &Decision| d.reservation().is_some_and(|x| x.id == r.id);
            if self.idempotent.get(key).is_some_and(|(d, _)| same(d)) {
                self.idempotent.remove(key);
            }
        }
        self.expires_at = self.expires_at.max(until);
        let give = r.cost.to_array();
        for c in &r.charges {
            if let Some((_, state)) = self.windows.iter_mut().find(|(id, _)| **id == *c.window_id) {
                state.give_back(c.slot, give);
            }
        }
    }
}

impl WindowState {
    /// Forgets what no longer counts at `now`.
    fn advance(&mut self, w: &Window, now: Millis) {
        match (self, w.period()) {
            (WindowState::Rolling { buckets, totals }, period) => {
                let Some(geo) = Rolling::of(period) else {
                    return;
                };
                let oldest = geo.oldest_live(now);
                while let Some(&(slot, counts)) = buckets.front() {
                    if slot >= oldest {
                        break;
                    }
                    sub(totals, counts);
                    buckets.pop_front();
                }
            }
            (WindowState::Calendar { start, end, counts }, Period::Calendar { unit, tz, .. }) => {
                // Only move forward: a clock that steps back keeps the current period, which
                // over-counts rather than forgets.
                if now >= *end {
                    let (s, e) = calendar_bounds(*unit, tz, now);
                    (*start, *end, *counts) = (s, e, [0; 3]);
                }
            }
            (WindowState::Calendar { .. }, Period::Rolling { .. }) => {}
        }
    }

    fn used(&self) -> [u64; 3] {
        match self {
            WindowState::Rolling { totals, .. } => *totals,
            WindowState::Calendar { counts, .. } => *counts,
        }
    }

    /// When the oldest counted unit stops counting.
    fn next_free_at(&self, w: &Window) -> Option<Millis> {
        match self {
            WindowState::Rolling { buckets, .. } => {
                let geo = Rolling::of(w.period())?;
                buckets
                    .iter()
                    .find(|(_, c)| c.iter().any(|&v| v > 0))
                    .map(|&(slot, _)| geo.expiry(slot))
            }
            WindowState::Calendar { end, counts, .. } => {
                counts.iter().any(|&v| v > 0).then_some(*end)
            }
        }
    }

    /// The instant at which at least `need` units of `m` will have expired.
    fn free_at(&self, w: &Window, m: Metric, need: u64) -> Millis {
        match self {
            WindowState::Rolling { buckets, .. } => {
                let Some(geo) = Rolling::of(w.period()) else {
                    return 0;
                };
                let mut freed = 0u64;
                for &(slot, counts) in buckets {
                    freed = freed.saturating_add(counts[m.index()]);
                    if freed >= need {
                        return geo.expiry(slot);
                    }
                }
                // Unreachable when `need <= used`; the newest bucket's expiry is the safe answer.
                buckets.back().map_or(0, |&(slot, _)| geo.expiry(slot))
            }
            WindowState::Calendar { end, .. } => *end,
        }
    }

    fn charge(&mut self, w: &Window, now: Millis, want: [u64; 3]) -> Charge {
        let (slot, expires_at_ms) = match self {
            WindowState::Rolling { buckets, totals } => {
                let geo = Rolling::of(w.period()).unwrap_or(Rolling {
                    bucket_ms: 1,
                    buckets: 0,
                });
                let mut slot = geo.slot(now);
                match buckets.back_mut() {
                    // A clock that stepped back charges the newest bucket: counted longer, never less.
                    Some((last, counts)) if *last >= slot => {
                        slot = *last;
                        add(counts, want);
                    }
                    _ => buckets.push_back((slot, want)),
                }
                add(totals, want);
                (slot, geo.expiry(slot))
            }
            WindowState::Calendar { start, end, counts } => {
                add(counts, want);
                (*start, *end)
            }
        };
        Charge {
            window_id: Arc::clone(w.id_arc()),
            slot,
            expires_at_ms,
        }
    }

    fn give_back(&mut self, slot: u64, give: [u64; 3]) {
        match self {
            WindowState::Rolling { buckets, totals } => {
                if let Ok(pos) = buckets.binary_search_by_key(&slot, |&(s, _)| s) {
                    let counts = &mut buckets[pos].1;
                    let taken = clamp_sub(counts, give);
                    sub(totals, taken);
                }
            }
            WindowState::Calendar { start, counts, .. } => {
                if *start == slot {
                    clamp_sub(counts, give);
                }
            }
        }
    }
}

fn add(a: &mut [u64; 3], b: [u64; 3]) {
    for i in 0..3 {
        a[i] = a[i].saturating_add(b[i]);
    }
}

fn sub(a: &mut [u64; 3], b: [u64; 3]) {
    for i in 0..3 {
        a[i] = a[i].saturating_sub(b[i]);
    }
}

/// Subtracts at most what is there; returns what was actually taken.
fn clamp_sub(a: &mut [u64; 3], b: [u64; 3]) -> [u64; 3] {
    let mut taken = [0; 3];
    for i in 0..3 {
        taken[i] = a[i].min(b[i]);
        a[i] -= taken[i];
    }
    taken
}

#[async_trait]
impl QuotaStore for MemoryStore {
    async fn reserve(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        check_idempotency_key(idempotency_key)?;
        Ok(self.decide(scope, profile, cost, idempotency_key))
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
    ) -> Result<Usage, StoreError> {
        match self.decide_with(scope, profile, cost, None, Admit::Regardless) {
            Decision::Allowed(a) => Ok(a.usage),
            Decision::Denied(_) => Err(StoreError::Protocol("a forced charge was denied".into())),
        }
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        if let Some(mut state) = self.scopes.get_mut(reservation.scope()) {
            state.release(reservation, now);
        }
        Ok(())
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        let now = self.clock.now_ms();
        let Some(mut state) = self.scopes.get_mut(scope) else {
            return Ok(usage_of(
                profile,
                &vec![(Cost::default(), None); profile.windows().len()],
                now,
            ));
        };
        let raw: Vec<_> = profile
            .windows()
            .iter()
            .map(|w| {
                let s = state.window_mut(w, now);
                (Cost::from_array(s.used()), s.next_free_at(w))
            })
            .collect();
        Ok(usage_of(profile, &raw, now))
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        self.scopes.remove(scope);
        Ok(())
    }

    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        idempotency_key: Option<&str>,
        expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError> {
        check_idempotency_key(idempotency_key)?;
        let now = self.clock.now_ms();
        if let Some(until) = self
            .meta_value(scope, META_COOLDOWN, now)
            .and_then(|v| v.parse::<u64>().ok())
            && until > now
        {
            return Ok(Guarded::CoolingDown(Duration::from_millis(until - now)));
        }
        let current = self.meta_value(scope, META_PROFILE, now);
        if current.as_deref() != expected_override {
            return Ok(Guarded::OverrideChanged(current));
        }
        // Settings and counters live in different maps: a concurrent override change can
        // slip between the check and the charge here, which costs at most one send under
        // the previous profile. Redis does both in one script.
        Ok(Guarded::Decided(self.decide(
            scope,
            profile,
            cost,
            idempotency_key,
        )))
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        let key = (scope.to_owned(), META_COOLDOWN.to_owned());
        let mut entry = self
            .meta
            .entry(key)
            .or_insert_with(|| (String::new(), Some(0)));
        let current = entry
            .0
            .parse::<u64>()
            .ok()
            .filter(|_| entry.1.is_some_and(|e| e > now));
        if current.is_none_or(|c| c < until) {
            *entry = (until.to_string(), Some(until));
        }
        Ok(())
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.meta_value(scope, name, self.clock.now_ms()))
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let exp = ttl.map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)));
        self.meta
            .insert((scope.to_owned(), name.to_owned()), (value.to_owned(), exp));
        Ok(())
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        let exp = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut entry = self
            .meta
            .entry((scope.to_owned(), name.to_owned()))
            .or_insert_with(|| (String::new(), Some(0)));
        // A fresh entry is the placeholder above, already expired.
        if entry.1.is_none_or(|e| e > now) {
            return Ok(false);
        }
        *entry = (value.to_owned(), Some(exp));
        Ok(true)
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        self.meta.remove(&(scope.to_owned(), name.to_owned()));
        Ok(())
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        let removed = self
            .meta
            .remove_if(&(scope.to_owned(), name.to_owned()), |_, (v, exp)| {
                v == value && exp.is_none_or(|e| e > now)
            });
        Ok(removed.is_some())
    }
}
