//! Per-grant send quotas: policies, all-or-nothing reservations, and two stores with the
//! same behaviour (in memory, and in Redis for many replicas).
//!
//! This crate knows nothing of HTTP or Nylas: it speaks scopes, costs, profiles and
//! decisions.
//!
//! # Layout
//! - [`policy`]: profiles, windows and their validation; the built-in provider profiles.
//! - [`decision`]: costs, reservations, usage, allowances and denials.
//! - [`store`]: the [`QuotaStore`] trait and [`StoreError`].
//! - [`memory`]: [`MemoryStore`], the embedded default.
//! - [`redis`]: [`RedisStore`], one Lua script round trip per decision.
//! - [`fleet`]: the fleet index, an upper bound on each scope's utilization, busiest first.
//! - [`breaker`]: [`BreakerStore`], which stops waiting for a store that keeps failing.
//! - [`local`]: [`LocalBudget`], a replica's own share of each limit while the shared store
//!   is down, written back to it when it returns.
//! - [`clock`]: the injectable [`Clock`] and a [`FakeClock`] for tests.
//! - `window`: bucket and calendar arithmetic shared by both stores.

pub mod breaker;
pub mod clock;
pub mod decision;
pub mod fleet;
mod journal;
pub mod local;
pub mod memory;
pub mod policy;
pub mod redis;
mod redis_conn;
pub mod store;
mod window;

pub use breaker::{BreakerState, BreakerStore};
pub use clock::{Clock, FakeClock, Millis, SystemClock};
pub use decision::{
    Allowance, Charge, Cost, Decision, Denial, MetricUsage, Probe, Reservation, Usage, WindowUsage,
};
pub use fleet::{FleetCursor, FleetEntry, utilization_bound};
pub use local::LocalBudget;
pub use memory::{Fsync, MemoryOptions, MemoryStore};
pub use policy::{
    CalendarUnit, Metric, Period, PeriodSpec, PolicyError, Profile, ProfileSpec, Window, WindowSpec,
};
pub use redis::{RedisConfig, RedisStore, RedisTls};
pub use store::{
    Guarded, IDEMPOTENCY_TTL, MAX_AHEAD, MAX_IDEMPOTENCY_KEY, MAX_SCHEDULED_SLOTS, META_COOLDOWN,
    META_PROFILE, QuotaStore, StoreError, StoreHealth,
};
