//! The one interface both backends implement.

use std::time::Duration;

use async_trait::async_trait;

use crate::decision::{Cost, Decision, Reservation, Usage};
use crate::policy::Profile;

/// How long an idempotency key remembers its first decision.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(3600);

/// Longest idempotency key accepted (Nylas allows 256 characters).
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Per-scope quota counters.
///
/// A *scope* is an opaque name for what is counted (the gateway uses one per grant). Every
/// operation is atomic per scope: concurrent reservations never admit more than a limit.
#[async_trait]
pub trait QuotaStore: Send + Sync + std::fmt::Debug {
    /// Charges `cost` against every window of `profile`, all or nothing.
    ///
    /// With an `idempotency_key`, a repeat within [`IDEMPOTENCY_TTL`] of an admitted request
    /// returns that allowance (same reservation, `replay` set) and charges nothing new.
    /// Denials are not remembered, and releasing a reservation forgets its key.
    ///
    /// # Errors
    /// Only infrastructure failures; being over a limit is [`Decision::Denied`].
    async fn reserve(
        &self,
        scope: &str,
        profile: &Profile,
        cost: Cost,
        idempotency_key: Option<&str>,
    ) -> Result<Decision, StoreError>;

    /// Charges `cost` against every window of `profile` whatever their limits say, and
    /// returns the usage after it. For a send that has already gone out and turned out to
    /// cost more than was reserved: the provider counted it, so the quota must too, even
    /// past a limit. Never use it to admit a send.
    ///
    /// # Errors
    /// Only infrastructure failures.
    async fn charge(&self, scope: &str, profile: &Profile, cost: Cost)
    -> Result<Usage, StoreError>;

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

    /// Like [`QuotaStore::reserve`], with two checks made in the same atomic step: while the
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

    /// Checks that the store answers.
    ///
    /// # Errors
    /// The store is unreachable or too slow.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
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
}

pub(crate) fn check_idempotency_key(key: Option<&str>) -> Result<(), StoreError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => Err(StoreError::Invalid(
            format!("idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        )),
        _ => Ok(()),
    }
}
