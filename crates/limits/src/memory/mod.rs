//! The embedded store: per-scope counters in this process.
//!
//! Each scope's state sits behind one shard lock of a [`DashMap`], so a reservation checks
//! and charges every window of the scope in one critical section. Rolling windows keep only
//! their non-empty buckets, past and scheduled, oldest first, plus running totals: a scope
//! with nothing scheduled decides in O(windows); one with scheduled buckets in O(buckets
//! held). Calendar windows keep one entry per period with something counted. A scope holds
//! at most `buckets + 1` past and [`MAX_SCHEDULED_SLOTS`] scheduled buckets (or periods) per
//! window, so its memory is bounded whatever is scheduled. Scopes whose windows,
//! idempotency records and release markers have all expired are dropped by a sweep that
//! runs at most once a minute.
//!
//! With a path ([`MemoryStore::open`]) every change is also appended to a journal before it
//! is answered and replayed at start-up (see `persist`), so a restart or a `kill -9` loses
//! nothing. The number of scopes held may be capped: past the cap a new scope is refused
//! with [`StoreError::Full`], never dropped.

mod persist;

use persist::Write;
pub use persist::{Fsync, MemoryOptions, WRITE_EVERY};

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::clock::{Clock, Millis, SystemClock};
use crate::decision::{Allowance, Charge, Cost, Decision, Denial, Probe, Reservation, Usage};
use crate::fleet::{FleetCursor, FleetEntry, MemoryFleet};
use crate::journal::Record;
use crate::policy::{Metric, Period, Profile, Window};
use crate::store::{
    Guarded, IDEMPOTENCY_TTL, MAX_SCHEDULED_SLOTS, META_COOLDOWN, META_PROFILE, QuotaStore,
    StoreError, charge_instant, check_idempotency_key, too_many_scheduled,
};
use crate::window::{
    Over, Rolling, View, add, calendar_bounds, change_points, denial, earliest_for_all,
    earliest_slot, peak, pick_denial, sub, usage_of,
};

const SWEEP_EVERY_MS: u64 = 60_000;

/// The setting a scope's fleet entry is journaled under: `"<bound> <profile>"`, until the
/// entry's expiry. No name the gateway uses starts with `!`.
const FLEET_META: &str = "!fleet";
/// How often a full store sweeps, looking for room for a new scope.
const FULL_SWEEP_EVERY_MS: u64 = 1_000;

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
    max_scopes: Option<usize>,
    refused_scopes: AtomicU64,
    persist: Option<Arc<persist::Persist>>,
    /// The fleet index; with a journal, each entry is also kept as a [`FLEET_META`] setting.
    fleet: std::sync::Mutex<MemoryFleet>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_clock(SystemClock)
    }
}

impl Drop for MemoryStore {
    fn drop(&mut self) {
        if let Some(p) = &self.persist {
            p.close();
        }
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    windows: Vec<(Arc<str>, WindowState)>,
    idempotent: HashMap<String, (Decision, Millis)>,
    released: HashMap<u64, Millis>,
    /// Nothing in this scope counts after this instant.
    expires_at: Millis,
    /// When the scope was last reset: what reservations made until then charged is gone, so
    /// releasing them gives nothing back.
    reset_at: Option<Millis>,
    /// The latest instant a charge was made at: a clock that steps back keeps counting from
    /// here (counted longer, never less).
    latest: Millis,
}

#[derive(Debug)]
enum WindowState {
    Rolling {
        /// Non-empty buckets, past and scheduled, oldest first.
        buckets: VecDeque<(u64, [u64; 3])>,
        /// The sum of every bucket held.
        totals: [u64; 3],
    },
    Calendar {
        /// Periods with something counted, earliest first: `(start, end, counts)`.
        periods: Vec<(Millis, Millis, [u64; 3])>,
    },
}

impl MemoryStore {
    fn fleet_index(&self) -> std::sync::MutexGuard<'_, MemoryFleet> {
        self.fleet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

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
            max_scopes: None,
            refused_scopes: AtomicU64::new(0),
            persist: None,
            fleet: std::sync::Mutex::default(),
        }
    }

    /// A store reading the system clock, kept and capped as `options` say.
    ///
    /// # Errors
    /// The journal's directory cannot be used (another process holds it, say) or its
    /// journal is damaged; nothing is replaced or deleted then.
    pub fn open(options: &MemoryOptions) -> std::io::Result<Self> {
        Self::open_with_clock(options, SystemClock)
    }

    /// [`MemoryStore::open`] with `clock`.
    ///
    /// # Errors
    /// As for [`MemoryStore::open`].
    pub fn open_with_clock(options: &MemoryOptions, clock: impl Clock) -> std::io::Result<Self> {
        let mut store = Self::with_clock(clock);
        store.max_scopes = options.max_scopes;
        store.attach(options)?;
        Ok(store)
    }

    /// How many new scopes were refused because the store was full.
    pub fn refused_scopes(&self) -> u64 {
        self.refused_scopes.load(Ordering::Relaxed)
    }

    /// Makes room for one more scope, or refuses it.
    fn admit_scope(&self, now: Millis) -> Result<(), StoreError> {
        let Some(max) = self.max_scopes else {
            return Ok(());
        };
        if self.scopes.len() < max {
            return Ok(());
        }
        // Expired scopes may be holding the room; look at most once a second.
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now >= last.saturating_add(FULL_SWEEP_EVERY_MS) {
            self.sweep();
        }
        if self.scopes.len() < max {
            return Ok(());
        }
        self.refused_scopes.fetch_add(1, Ordering::Relaxed);
        Err(StoreError::Full(max))
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

    /// Keeps `scopes`' fleet entries as they now stand in `fleet` as [`FLEET_META`]
    /// settings, written before this returns (a page that wrote its notes holds them), so
    /// that a reopened store lists them again ([`MemoryStore::restore_fleet`]). Nothing
    /// for a store in memory only.
    fn journal_fleet<'a>(
        &self,
        fleet: &MemoryFleet,
        scopes: impl Iterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        if !self.is_persistent() {
            return Ok(());
        }
        let now: Vec<(&str, Option<(String, Millis)>)> = scopes
            .map(|s| (s, fleet.get(s).map(|(b, p, x)| (format!("{b} {p}"), x))))
            .collect();
        let mut recs = Vec::with_capacity(now.len());
        for (scope, entry) in &now {
            let key = ((*scope).to_owned(), FLEET_META.to_owned());
            match entry {
                Some((value, until)) => {
                    self.meta.insert(key, (value.clone(), Some(*until)));
                    let until = Some(*until);
                    let (name, value) = (FLEET_META, value.as_str());
                    recs.push(Record::MetaSet {
                        scope,
                        name,
                        value,
                        until,
                    });
                }
                None if self.meta.remove(&key).is_some() => {
                    recs.push(Record::MetaDelete {
                        scope,
                        name: FLEET_META,
                    });
                }
                None => {}
            }
        }
        self.log(&recs, Write::Now)
    }

    /// Rebuilds the fleet index from the [`FLEET_META`] settings a journal brought back.
    pub(super) fn restore_fleet(&self) {
        let now = self.clock.now_ms();
        let mut fleet = self.fleet_index();
        for entry in &self.meta {
            let ((scope, name), (value, until)) = (entry.key(), entry.value());
            let Some(expires_at) = until.filter(|_| name == FLEET_META) else {
                continue;
            };
            let Some((bound, profile)) = value.split_once(' ') else {
                continue;
            };
            let Ok(utilization) = bound.parse::<f64>() else {
                continue;
            };
            let (scope, profile) = (scope.clone(), profile.to_owned());
            let e = FleetEntry {
                scope,
                profile,
                utilization,
                expires_at,
                version: 0,
            };
            fleet.note(&e, now);
        }
    }

    /// Journals a setting as it now stands.
    fn log_meta(
        &self,
        scope: &str,
        name: &str,
        (value, until): &(String, Option<Millis>),
    ) -> Result<(), StoreError> {
        self.log(
            &[Record::MetaSet {
                scope,
                name,
                value,
                until: *until,
            }],
            Write::Now,
        )
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

    /// What [`MemoryStore::decide`] would answer within the limits, charging nothing.
    fn probe(&self, scope: &str, ask: Ask<'_>) -> Result<Probe, StoreError> {
        let _gate = self.gate()?;
        let mut fresh = ScopeState::default();
        let mut entry = self.scopes.get_mut(scope);
        let state = match entry.as_mut() {
            Some(e) => e.value_mut(),
            None => &mut fresh,
        };
        let now = self.clock.now_ms().max(state.latest);
        let at = charge_instant(ask.at, now)?;
        let (slots, refused) = state.judge(&ask, at, now);
        if let Some(d) = refused {
            return Ok(Probe::Refused(d));
        }
        for (i, w) in ask.profile.windows().iter().enumerate() {
            if state.windows[slots[i]].1.opens_too_many(w, at, now) {
                return Err(too_many_scheduled(w.label()));
            }
        }
        Ok(Probe::Fits(state.usage(ask.profile, &slots, now)))
    }

    fn decide(&self, scope: &str, ask: Ask<'_>, key: Option<&str>) -> Result<Decision, StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        self.maybe_sweep(now);
        let mut entry = match self.scopes.get_mut(scope) {
            Some(e) => e,
            None => {
                self.admit_scope(now)?;
                self.scopes.entry(Arc::from(scope)).or_default()
            }
        };
        let scope_arc = Arc::clone(entry.key());
        let state = entry.value_mut();
        let now = now.max(state.latest);
        if let Some(replay) = key.and_then(|k| state.replay(k, ask.profile, now)) {
            return Ok(replay);
        }
        let at = charge_instant(ask.at, now)?;
        let mut decision = state.decide(scope_arc, &ask, at, now, || {
            self.next_id.fetch_add(1, Ordering::Relaxed)
        })?;
        // Only a charge moves the scope's clock on, as the Redis script's high-water mark.
        if decision.is_allowed() {
            state.latest = now;
        }
        // Only admitted requests are remembered (as Nylas keeps only successful answers): a
        // denied request retried with its key after `retry_after` is judged afresh.
        let mut key_until = None;
        if let (Some(key), Decision::Allowed(a)) = (key, &mut decision) {
            a.reservation.idempotency_key = Some(Arc::from(key));
            let exp = now + IDEMPOTENCY_TTL.as_millis() as u64;
            state
                .idempotent
                .insert(key.to_owned(), (decision.clone(), exp));
            state.expires_at = state.expires_at.max(exp);
            key_until = Some(exp);
        }
        let write = match ask.admit {
            Admit::WithinLimits => Write::Buffered,
            Admit::Regardless => Write::Now,
        };
        self.log_decision(state, now, &decision, key_until, write)?;
        Ok(decision)
    }
}

/// What one decision asks for.
#[derive(Debug, Clone, Copy)]
struct Ask<'a> {
    profile: &'a Profile,
    cost: Cost,
    at: Option<Millis>,
    admit: Admit,
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
    /// The remembered answer to a repeat of an admitted request under `key`. One restored
    /// from the journal is reported with the usage of now, its own not being kept.
    fn replay(&mut self, key: &str, profile: &Profile, now: Millis) -> Option<Decision> {
        self.idempotent.retain(|_, (_, exp)| *exp > now);
        let mut replay = self.idempotent.get(key)?.0.clone();
        if let Decision::Allowed(a) = &mut replay {
            a.replay = true;
            if a.usage.windows.is_empty() {
                let slots: Vec<usize> = profile
                    .windows()
                    .iter()
                    .map(|w| self.window_at(w, now))
                    .collect();
                a.usage = self.usage(profile, &slots, now);
            }
        }
        Some(replay)
    }

    /// Forgets everything counted. Kept (empty) as long as a reservation made before could
    /// still be released.
    fn reset(&mut self, now: Millis) {
        *self = ScopeState {
            reset_at: Some(now.max(self.latest)),
            expires_at: self.expires_at,
            latest: self.latest,
            ..ScopeState::default()
        };
    }

    /// The position of `w`'s state, created empty if missing, with what no longer counts
    /// at `now` dropped.
    fn window_at(&mut self, w: &Window, now: Millis) -> usize {
        let pos = match self.windows.iter().position(|(id, _)| **id == *w.id()) {
            Some(pos) => pos,
            None => {
                let state = match w.period() {
                    Period::Rolling { .. } => WindowState::Rolling {
                        buckets: VecDeque::new(),
                        totals: [0; 3],
                    },
                    Period::Calendar { .. } => WindowState::Calendar {
                        periods: Vec::new(),
                    },
                };
                self.windows.push((Arc::clone(w.id_arc()), state));
                self.windows.len() - 1
            }
        };
        self.windows[pos].1.advance(w, now);
        pos
    }

    fn decide(
        &mut self,
        scope: Arc<str>,
        ask: &Ask<'_>,
        at: Millis,
        now: Millis,
        next_id: impl FnOnce() -> u64,
    ) -> Result<Decision, StoreError> {
        let windows = ask.profile.windows();
        let (slots, refused) = self.judge(ask, at, now);
        if let Some(d) = refused {
            return Ok(Decision::Denied(d));
        }
        let want = ask.cost.to_array();
        let state = |i: usize| &self.windows[slots[i]].1;
        for (i, w) in windows.iter().enumerate() {
            if state(i).opens_too_many(w, at, now) {
                return Err(too_many_scheduled(w.label()));
            }
        }
        let mut charges = Vec::with_capacity(windows.len());
        for (i, w) in windows.iter().enumerate() {
            let charge = self.windows[slots[i]].1.charge(w, at, want);
            self.expires_at = self.expires_at.max(charge.expires_at_ms);
            charges.push(charge);
        }
        Ok(Decision::Allowed(Allowance {
            reservation: Reservation {
                id: next_id(),
                scope,
                cost: ask.cost,
                at,
                made_at: now,
                charges,
                idempotency_key: None,
            },
            usage: self.usage(ask.profile, &slots, now),
            replay: false,
        }))
    }

    /// The slots of `ask`'s windows, and the denial it meets at `at` (none for a charge
    /// regardless of the limits). Charges nothing.
    fn judge(&mut self, ask: &Ask<'_>, at: Millis, now: Millis) -> (Vec<usize>, Option<Denial>) {
        let windows = ask.profile.windows();
        let slots: Vec<usize> = windows.iter().map(|w| self.window_at(w, now)).collect();
        let state = |i: usize| &self.windows[slots[i]].1;
        let want = ask.cost.to_array();
        // Empty (and unallocated) unless something would go over.
        let mut overs: Vec<Over> = Vec::new();
        for (i, w) in windows.iter().enumerate() {
            state(i).overs(i, w, at, now, want, &mut overs);
        }
        let over = match ask.admit {
            Admit::WithinLimits => pick_denial(&overs),
            Admit::Regardless => None,
        };
        let refused = over.map(|over| {
            let fits_at = overs.iter().all(|o| o.fits_at.is_some()).then(|| {
                earliest_for_all(windows.len(), at, |i, t| {
                    state(i).fits_from(&windows[i], t, now, want)
                })
            });
            let usage = self.usage(ask.profile, &slots, now);
            denial(ask.profile, over, ask.cost, at, now, fits_at, usage)
        });
        (slots, refused)
    }

    fn usage(&self, profile: &Profile, slots: &[usize], now: Millis) -> Usage {
        let views: Vec<View> = profile
            .windows()
            .iter()
            .zip(slots)
            .map(|(w, &pos)| self.windows[pos].1.view(w, now))
            .collect();
        usage_of(profile, &views, now)
    }

    fn release(&mut self, r: &Reservation, now: Millis) {
        if self.reset_at.is_some_and(|t| r.made_at <= t) {
            return;
        }
        self.released.retain(|_, exp| *exp > now);
        if self.released.contains_key(&r.id) {
            return;
        }
        let until = r.expires_at_ms().max(now + 1);
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
        match self {
            WindowState::Rolling { buckets, totals } => {
                let Some(geo) = Rolling::of(w.period()) else {
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
            WindowState::Calendar { periods } => periods.retain(|p| p.1 > now),
        }
    }

    /// The buckets of a rolling window, in one slice.
    fn stored(buckets: &VecDeque<(u64, [u64; 3])>) -> Vec<(u64, [u64; 3])> {
        buckets.iter().copied().collect()
    }

    /// What a charge at `at` must fit under, metric by metric.
    fn load_at(&self, w: &Window, at: Millis, now: Millis) -> [u64; 3] {
        match (self, Rolling::of(w.period())) {
            (WindowState::Rolling { buckets, totals }, Some(geo)) => {
                let newest = buckets.back().map_or(0, |b| b.0);
                if newest <= geo.slot(now) && geo.slot(at) == geo.slot(now) {
                    return *totals;
                }
                peak(
                    geo,
                    &change_points(geo, &Self::stored(buckets)),
                    geo.slot(at),
                )
            }
            (WindowState::Calendar { periods }, _) => periods
                .iter()
                .find(|p| p.0 <= at && at < p.1)
                .map_or([0; 3], |p| p.2),
            (WindowState::Rolling { .. }, None) => [0; 3],
        }
    }

    /// Adds to `overs` the metrics of window `i` that a charge of `want` at `at` would take
    /// over.
    fn overs(
        &self,
        i: usize,
        w: &Window,
        at: Millis,
        now: Millis,
        want: [u64; 3],
        overs: &mut Vec<Over>,
    ) {
        let load = self.load_at(w, at, now);
        for m in Metric::ALL {
            let Some(limit) = w.limit(m) else { continue };
            let (limit, used, req) = (limit.get(), load[m.index()], want[m.index()]);
            if used.saturating_add(req) > limit {
                overs.push(Over {
                    window: i,
                    metric: m,
                    used,
                    limit,
                    fits_at: (req <= limit).then(|| self.fits_from(w, at, now, want)),
                });
            }
        }
    }

    /// The earliest instant at or after `t` at which this window takes `want` (which is
    /// within each of its limits).
    fn fits_from(&self, w: &Window, t: Millis, now: Millis, want: [u64; 3]) -> Millis {
        let room = |m: Metric| w.limit(m).map(|l| l.get().saturating_sub(want[m.index()]));
        match (self, w.period()) {
            (WindowState::Rolling { buckets, .. }, period) => {
                let Some(geo) = Rolling::of(period) else {
                    return t;
                };
                let points = change_points(geo, &Self::stored(buckets));
                let first = geo.slot(t.max(now));
                let mut s = first;
                loop {
                    let before = s;
                    for m in Metric::ALL {
                        if let Some(room) = room(m) {
                            s = earliest_slot(geo, &points, s, m.index(), room);
                        }
                    }
                    if s == before {
                        break;
                    }
                }
                if s == first { t } else { s * geo.bucket_ms }
            }
            (WindowState::Calendar { periods }, Period::Calendar { .. }) => {
                let mut t = t;
                // Each turn moves past one held period; past the last, nothing is held.
                for _ in 0..=periods.len() {
                    let Some(p) = periods.iter().find(|p| p.0 <= t && t < p.1) else {
                        return t;
                    };
                    if Metric::ALL
                        .into_iter()
                        .all(|m| room(m).is_none_or(|r| p.2[m.index()] <= r))
                    {
                        return t;
                    }
                    t = p.1;
                }
                t
            }
            (WindowState::Calendar { .. }, Period::Rolling { .. }) => t,
        }
    }

    /// Whether a charge at `at` would hold one scheduled bucket or period too many.
    fn opens_too_many(&self, w: &Window, at: Millis, now: Millis) -> bool {
        match (self, Rolling::of(w.period())) {
            (WindowState::Rolling { buckets, .. }, Some(geo)) => {
                let (cur, slot) = (geo.slot(now), geo.slot(at));
                slot > cur
                    && !buckets.iter().any(|b| b.0 == slot)
                    && buckets.iter().filter(|b| b.0 > cur).count() >= MAX_SCHEDULED_SLOTS
            }
            (WindowState::Calendar { periods }, _) => {
                !periods.iter().any(|p| p.0 <= at && at < p.1)
                    && periods.iter().filter(|p| p.0 > now).count() >= MAX_SCHEDULED_SLOTS
            }
            (WindowState::Rolling { .. }, None) => false,
        }
    }

    /// The window as a decision at `now` reports it.
    fn view(&self, w: &Window, now: Millis) -> View {
        match (self, Rolling::of(w.period())) {
            (WindowState::Rolling { buckets, totals }, Some(geo)) => {
                let cur = geo.slot(now);
                let mut used = [0; 3];
                if buckets.back().is_none_or(|b| b.0 <= cur) {
                    used = *totals;
                } else {
                    for (_, c) in buckets.iter().take_while(|b| b.0 <= cur) {
                        add(&mut used, *c);
                    }
                }
                let mut scheduled = *totals;
                sub(&mut scheduled, used);
                let peak_now = if scheduled == [0; 3] {
                    used
                } else {
                    peak(geo, &change_points(geo, &Self::stored(buckets)), cur)
                };
                let next_free_at = buckets
                    .front()
                    .filter(|b| b.0 <= cur)
                    .map(|b| geo.expiry(b.0));
                View {
                    used,
                    scheduled,
                    peak_now,
                    next_free_at,
                }
            }
            (WindowState::Calendar { periods }, _) => {
                let current = periods.iter().find(|p| p.0 <= now && now < p.1);
                let used = current.map_or([0; 3], |p| p.2);
                let mut scheduled = [0; 3];
                for p in periods.iter().filter(|p| p.0 > now) {
                    add(&mut scheduled, p.2);
                }
                let next_free_at = current.filter(|p| p.2 != [0; 3]).map(|p| p.1);
                View {
                    used,
                    scheduled,
                    peak_now: used,
                    next_free_at,
                }
            }
            (WindowState::Rolling { .. }, None) => View::default(),
        }
    }

    fn charge(&mut self, w: &Window, at: Millis, want: [u64; 3]) -> Charge {
        let (slot, expires_at_ms) = match (self, w.period()) {
            (WindowState::Rolling { buckets, totals }, period) => {
                let geo = Rolling::of(period).unwrap_or(Rolling {
                    bucket_ms: 1,
                    buckets: 0,
                });
                let slot = geo.slot(at);
                match buckets.binary_search_by_key(&slot, |b| b.0) {
                    Ok(pos) => add(&mut buckets[pos].1, want),
                    Err(pos) => buckets.insert(pos, (slot, want)),
                }
                add(totals, want);
                (slot, geo.expiry(slot))
            }
            (WindowState::Calendar { periods }, Period::Calendar { unit, tz, .. }) => {
                let (start, end) = match periods.iter().find(|p| p.0 <= at && at < p.1) {
                    Some(p) => (p.0, p.1),
                    None => calendar_bounds(*unit, tz, at),
                };
                match periods.binary_search_by_key(&start, |p| p.0) {
                    Ok(pos) => add(&mut periods[pos].2, want),
                    Err(pos) => periods.insert(pos, (start, end, want)),
                }
                (start, end)
            }
            (WindowState::Calendar { .. }, Period::Rolling { .. }) => (0, 0),
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
                    if buckets[pos].1 == [0; 3] {
                        buckets.remove(pos);
                    }
                }
            }
            WindowState::Calendar { periods } => {
                if let Ok(pos) = periods.binary_search_by_key(&slot, |p| p.0) {
                    clamp_sub(&mut periods[pos].2, give);
                }
            }
        }
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
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        check_idempotency_key(idempotency_key)?;
        let ask = Ask {
            profile,
            cost,
            at,
            admit: Admit::WithinLimits,
        };
        self.decide(scope, ask, idempotency_key)
    }

    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError> {
        let ask = Ask {
            profile,
            cost,
            at,
            admit: Admit::Regardless,
        };
        match self.decide(scope, ask, None)? {
            Decision::Allowed(a) => Ok(a),
            Decision::Denied(_) => Err(StoreError::Protocol("a forced charge was denied".into())),
        }
    }

    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        if let Some(mut state) = self.scopes.get_mut(reservation.scope()) {
            state.release(reservation, now);
            let text = self.persist.as_ref().map(|_| reservation.to_record());
            if let Some(text) = &text {
                self.log(
                    &[Record::Release {
                        scope: reservation.scope(),
                        now,
                        reservation: text,
                    }],
                    Write::Buffered,
                )?;
            }
        }
        Ok(())
    }

    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError> {
        let now = self.clock.now_ms();
        let Some(mut state) = self.scopes.get_mut(scope) else {
            let empty = vec![View::default(); profile.windows().len()];
            return Ok(usage_of(profile, &empty, now));
        };
        let now = now.max(state.latest);
        let slots: Vec<usize> = profile
            .windows()
            .iter()
            .map(|w| state.window_at(w, now))
            .collect();
        Ok(state.usage(profile, &slots, now))
    }

    async fn probe_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Probe, StoreError> {
        let admit = Admit::WithinLimits;
        self.probe(
            scope,
            Ask {
                profile,
                cost,
                at,
                admit,
            },
        )
    }

    async fn fleet_note(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        let mut fleet = self.fleet_index();
        for e in entries {
            fleet.note(e, now);
        }
        self.journal_fleet(&fleet, entries.iter().map(|e| e.scope.as_str()))
    }

    async fn fleet_list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        let now = self.clock.now_ms();
        Ok(self.fleet_index().list(min, after, count, now))
    }

    async fn fleet_lower(&self, scope: &str, seen: u64, to: f64) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let mut fleet = self.fleet_index();
        fleet.lower(scope, seen, to);
        self.journal_fleet(&fleet, std::iter::once(scope))
    }

    async fn reset(&self, scope: &str) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        if let Some(mut state) = self.scopes.get_mut(scope) {
            state.reset(now);
            self.log(&[Record::Reset { scope, now }], Write::Now)?;
        }
        Ok(())
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
        let ask = Ask {
            profile,
            cost,
            at,
            admit: Admit::WithinLimits,
        };
        Ok(Guarded::Decided(self.decide(
            scope,
            ask,
            idempotency_key,
        )?))
    }

    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError> {
        let _gate = self.gate()?;
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
            self.log_meta(scope, META_COOLDOWN, &entry)?;
        }
        Ok(())
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.write_buffered()
    }

    async fn health(&self) -> Result<crate::store::StoreHealth, StoreError> {
        self.journal_health()?;
        Ok(crate::store::StoreHealth {
            persistent: Some(self.is_persistent()),
            run_id: None,
        })
    }

    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.meta_value(scope, name, self.clock.now_ms()))
    }

    async fn meta_ttl(&self, scope: &str, name: &str) -> Result<Option<Duration>, StoreError> {
        let now = self.clock.now_ms();
        let key = (scope.to_owned(), name.to_owned());
        let expiry = self.meta.get(&key).and_then(|e| e.value().1);
        Ok(expiry
            .filter(|&e| e > now)
            .map(|e| Duration::from_millis(e - now)))
    }

    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        let exp = ttl.map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)));
        let mut entry = self
            .meta
            .entry((scope.to_owned(), name.to_owned()))
            .or_insert_with(|| (String::new(), Some(0)));
        *entry = (value.to_owned(), exp);
        self.log_meta(scope, name, &entry)
    }

    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let _gate = self.gate()?;
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
        self.log_meta(scope, name, &entry)?;
        Ok(true)
    }

    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError> {
        let _gate = self.gate()?;
        let key = (scope.to_owned(), name.to_owned());
        if let dashmap::Entry::Occupied(entry) = self.meta.entry(key) {
            // Logged while the entry is still locked, so it cannot pass a later write.
            // Removed even when the write fails: the record stays buffered, to be written
            // by the next attempt, and memory must say what the journal will.
            let logged = self.log(&[Record::MetaDelete { scope, name }], Write::Now);
            entry.remove();
            logged?;
        }
        Ok(())
    }

    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let _gate = self.gate()?;
        let now = self.clock.now_ms();
        let key = (scope.to_owned(), name.to_owned());
        let dashmap::Entry::Occupied(entry) = self.meta.entry(key) else {
            return Ok(false);
        };
        let (v, exp) = entry.get();
        if v != value || exp.is_some_and(|e| e <= now) {
            return Ok(false);
        }
        let logged = self.log(&[Record::MetaDelete { scope, name }], Write::Now);
        entry.remove();
        logged.map(|()| true)
    }
}
