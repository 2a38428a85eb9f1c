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
    /// With an `idempotency_key`, a repeat within [`IDEMPOTENCY_TTL`] returns the first
    /// decision (including its reservation) and charges nothing new.
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

    /// Checks that the store answers.
    ///
    /// # Errors
    /// The store is unreachable or too slow.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
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
