//! The one interface both backends implement.

use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Millis;
use crate::decision::{Allowance, Cost, Decision, Probe, Reservation, Usage};
use crate::fleet::{FleetCursor, FleetEntry};
use crate::policy::Profile;

/// How long an idempotency key remembers its first decision.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);

/// Longest idempotency key accepted (Nylas allows 256 characters).
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Furthest ahead a charge may be made (a year and a day: Nylas schedules sends up to 30
/// days ahead, and drafts of some providers further).
pub const MAX_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);

/// Most scheduled buckets (rolling windows) or periods (calendar windows) one scope holds
/// per window: with the past buckets, what bounds a scope's memory. A charge that would
/// open one more is refused as [`StoreError::Invalid`].
pub const MAX_SCHEDULED_SLOTS: usize = 4096;

/// Per-scope quota counters.
///
/// A *scope* is an opaque name for what is counted (the gateway uses one per grant). Every
/// operation is atomic per scope: concurrent reservations never admit more than a limit.
#[async_trait]
pub trait QuotaStore: Send + Sync + std::fmt::Debug {
    /// Charges `cost` against every window of `profile` for a send going out now; see
    /// [`QuotaStore::reserve_at`].
    ///
    /// # Errors
    /// Only infrastructure failures; being over a limit is [`Decision::Denied`].
    async fn reserve(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError> {
        self.reserve_at(scope, profile, cost, None, idempotency_key)
            .await
    }

    /// Charges `cost` against every window of `profile`, all or nothing, for a send going
    /// out at `at` (ms since the epoch; `None`, or an instant already past on the store's
    /// clock, means now).
    ///
    /// A charge at `t` counts in every window that will hold `t`, and is admitted only if
    /// each of them stays within its limits: for a rolling window, every stretch of its
    /// length that holds `t` (sends scheduled later included, so a send now is refused when
    /// it would overfill a stretch that also holds tomorrow morning's scheduled sends); for a
    /// calendar window, the day or month holding `t`. Rolling windows count in buckets, so a
    /// charge counts in every stretch holding its bucket: at least the window's length, at
    /// most one bucket more.
    ///
    /// With an `idempotency_key`, a repeat within [`IDEMPOTENCY_TTL`] of an admitted request
    /// returns that allowance (same reservation, `replay` set) and charges nothing new.
    /// Denials are not remembered, and releasing a reservation forgets its key.
    ///
    /// # Errors
    /// Infrastructure failures, and [`StoreError::Invalid`] for `at` more than
    /// [`MAX_AHEAD`] away or a charge that would hold more than [`MAX_SCHEDULED_SLOTS`]
    /// scheduled buckets in one window; being over a limit is [`Decision::Denied`].
    async fn reserve_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError>;

    /// Charges `cost` at `at` (as in [`QuotaStore::reserve_at`]) against every window of
    /// `profile` whatever their limits say, and returns the charge (a reservation that
    /// [`QuotaStore::release`] gives back like any other) and the usage after it. For a
    /// send that has gone out (or been scheduled) and turned out to cost more than was
    /// reserved, or one that goes out whatever its quota says (shadow mode): the provider
    /// counts it, so the quota must too, even past a limit. Never use it to admit a send.
    ///
    /// # Errors
    /// Infrastructure failures, and [`StoreError::Invalid`] as for `reserve_at`.
    async fn charge(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Allowance, StoreError>;

    /// Gives back exactly what `reservation` charged, in the buckets it charged. Releasing
    /// twice is a no-op; counters never go below zero; buckets that have expired are left
    /// alone.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn release(&self, reservation: &Reservation) -> Result<(), StoreError>;

    /// Current usage of `scope` under `profile`, window by window.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn usage(&self, scope: &str, profile: &Profile) -> Result<Usage, StoreError>;

    /// Forgets everything counted for `scope`.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn reset(&self, scope: &str) -> Result<(), StoreError>;

    /// Like [`QuotaStore::reserve_at`], with two checks made in the same atomic step: while the
    /// scope is cooling down (see [`QuotaStore::cool_down`]) nothing is charged and the time
    /// left is returned; and when the scope's profile override (the [`META_PROFILE`] value)
    /// is not `expected_override`, nothing is charged and the current one is returned, so
    /// the caller can retry with the right profile. One Redis round trip either way.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn reserve_guarded(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
        idempotency_key: Option<&str>,
        expected_override: Option<&str>,
    ) -> Result<Guarded, StoreError>;

    /// Refuses reservations through [`QuotaStore::reserve_guarded`] for `duration` (a
    /// provider told us to back off). A longer cool-down already in force is kept.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn cool_down(&self, scope: &str, duration: Duration) -> Result<(), StoreError>;

    /// Reads a per-scope setting shared by every replica.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_get(&self, scope: &str, name: &str) -> Result<Option<String>, StoreError>;

    /// How much longer a per-scope setting lasts, on the store's own clock (Redis `PTTL`):
    /// `None` when it is absent or kept forever.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_ttl(&self, scope: &str, name: &str) -> Result<Option<Duration>, StoreError> {
        let _ = (scope, name);
        Ok(None)
    }

    /// Writes a per-scope setting, forever or for `ttl`.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_set(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError>;

    /// Writes a per-scope setting for `ttl` only if it is absent; true when this call wrote
    /// it (one replica wins).
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_set_new(
        &self,
        scope: &str,
        name: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Removes a per-scope setting.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_delete(&self, scope: &str, name: &str) -> Result<(), StoreError>;

    /// Removes a per-scope setting only if it still holds `value` (a lock released by its
    /// holder, never by someone who took it over after it expired); true when removed.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn meta_delete_if(
        &self,
        scope: &str,
        name: &str,
        value: &str,
    ) -> Result<bool, StoreError>;

    /// What [`QuotaStore::reserve_at`] would answer for `cost` at `at` right now, with no
    /// idempotency key, charging nothing (for explaining a decision). A store that cannot
    /// tell answers [`StoreError::Invalid`].
    ///
    /// # Errors
    /// Infrastructure failures, and [`StoreError::Invalid`] as for `reserve_at`.
    async fn probe_at(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        at: Option<Millis>,
    ) -> Result<Probe, StoreError> {
        let _ = (scope, profile, cost, at);
        Err(StoreError::Invalid(
            "this store cannot say what a send would be answered".into(),
        ))
    }

    /// Raises the fleet index's entries to `entries` (see [`crate::fleet`]): an entry's bound
    /// and expiry only ever rise here. Drops entries whose charges have all expired. A store
    /// without an index keeps nothing.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn fleet_note(&self, entries: &[FleetEntry]) -> Result<(), StoreError> {
        let _ = entries;
        Ok(())
    }

    /// Up to `count` fleet-index entries whose bound is at least `min`, after `after`, in
    /// index order (highest bound first; ties by scope, highest first).
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn fleet_list(
        &self,
        min: f64,
        after: Option<&FleetCursor>,
        count: usize,
    ) -> Result<Vec<FleetEntry>, StoreError> {
        let _ = (min, after, count);
        Ok(Vec::new())
    }

    /// Sets `scope`'s fleet-index bound to `to` if its [`FleetEntry::version`] is still
    /// `seen` (what a reader listed before recomputing the scope's usage); removes the entry
    /// when `to` is 0. A note made meanwhile wins.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn fleet_lower(&self, scope: &str, seen: u64, to: f64) -> Result<(), StoreError> {
        let _ = (scope, seen, to);
        Ok(())
    }

    /// Waits until every change this store has answered is kept as well as the store keeps
    /// anything, so that a crash of this process cannot lose it. Call it before acting on
    /// an admission (forwarding the send). For the memory store with a journal, it writes
    /// the buffered records out (and syncs them with `Fsync::Always`); for Redis, whose
    /// answers come after its own write, and a store in memory only, it does nothing.
    ///
    /// # Errors
    /// The change could not be written; it may be lost in a crash.
    async fn durable(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Checks that the store answers.
    ///
    /// # Errors
    /// The store is unreachable or too slow.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Checks that the store answers, and says what it can of itself: whether what it
    /// holds survives its own restart, and an id that changes when it restarts.
    ///
    /// # Errors
    /// The store is unreachable or too slow.
    async fn health(&self) -> Result<StoreHealth, StoreError> {
        self.ping().await?;
        Ok(StoreHealth::default())
    }
}

/// What a store says of itself (see [`QuotaStore::health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Whether the store keeps its data across its own restart: `Some(false)` for a Redis
    /// with neither AOF nor RDB snapshots on, `None` when it cannot tell.
    pub persistent: Option<bool>,
    /// An id that changes when the store restarts (Redis's `run_id`), if it has one.
    pub run_id: Option<String>,
}

/// The per-scope setting holding a profile override (see [`QuotaStore::reserve_guarded`]).
pub const META_PROFILE: &str = "profile";

/// The per-scope setting holding a cool-down's end, in ms on the store's clock.
pub const META_COOLDOWN: &str = "cooldown";

/// The answer of [`QuotaStore::reserve_guarded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    /// The checks passed and the reservation was decided.
    Decided(Decision),
    /// The scope is cooling down for this much longer; nothing was charged.
    CoolingDown(Duration),
    /// The scope's profile override is not the expected one; nothing was charged.
    OverrideChanged(Option<String>),
}

/// A store that could not answer. Domain outcomes are never errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached.
    #[error("quota store unavailable: {0}")]
    Unavailable(String),
    /// The store did not answer within the configured time.
    #[error("quota store timed out after {0:?}")]
    Timeout(Duration),
    /// The store answered something unexpected.
    #[error("quota store protocol error: {0}")]
    Protocol(String),
    /// The request itself is unusable (for example an over-long idempotency key).
    #[error("invalid quota request: {0}")]
    Invalid(String),
    /// The store holds as many scopes as it may (its `max_scopes`), and refused a new one.
    /// Nothing was charged; scopes already held go on being served.
    #[error("quota store full: it already holds its limit of {0} accounts")]
    Full(usize),
}

/// The instant a charge asked for `at` is made at, given the store's `now`: now for `None`
/// or a past instant.
///
/// # Errors
/// [`StoreError::Invalid`] beyond [`MAX_AHEAD`].
pub(crate) fn charge_instant(at: Option<Millis>, now: Millis) -> Result<Millis, StoreError> {
    let at = at.unwrap_or(now).max(now);
    if at - now > MAX_AHEAD.as_millis() as u64 {
        return Err(StoreError::Invalid(format!(
            "a send can be counted at most {} days ahead",
            MAX_AHEAD.as_secs() / 86_400
        )));
    }
    Ok(at)
}

/// The refusal of a charge that would hold more than [`MAX_SCHEDULED_SLOTS`] scheduled
/// buckets in one window.
pub(crate) fn too_many_scheduled(window: &str) -> StoreError {
    StoreError::Invalid(format!(
        "too many sends scheduled at different times for this account in the {window} window \
         (at most {MAX_SCHEDULED_SLOTS}); schedule them closer together"
    ))
}

pub(crate) fn check_idempotency_key(key: Option<&str>) -> Result<(), StoreError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => Err(StoreError::Invalid(
            format!("idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        )),
        _ => Ok(()),
    }
}
