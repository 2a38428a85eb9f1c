//! What a send costs and what the store answers.

use std::sync::Arc;
use std::time::Duration;

use crate::policy::Metric;

/// What one send charges against every window of its profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Messages (1 for a send).
    pub messages: u64,
    /// Unique recipients across to, cc and bcc.
    pub recipients: u64,
    /// Size of the message as the provider sees it.
    pub bytes: u64,
}

impl Cost {
    /// A cost of `messages`, `recipients` and `bytes`.
    pub const fn new(messages: u64, recipients: u64, bytes: u64) -> Self {
        Cost {
            messages,
            recipients,
            bytes,
        }
    }

    /// The amount of `metric`.
    pub const fn get(&self, metric: Metric) -> u64 {
        match metric {
            Metric::Messages => self.messages,
            Metric::Recipients => self.recipients,
            Metric::Bytes => self.bytes,
        }
    }

    pub(crate) const fn to_array(self) -> [u64; 3] {
        [self.messages, self.recipients, self.bytes]
    }

    pub(crate) const fn from_array(a: [u64; 3]) -> Self {
        Cost {
            messages: a[0],
            recipients: a[1],
            bytes: a[2],
        }
    }
}

/// Where one window of a reservation was charged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Charge {
    /// The window's id ([`crate::Window::id`]).
    pub window_id: Arc<str>,
    /// The bucket (rolling: bucket number; calendar: period start in ms) that was charged.
    pub slot: u64,
    /// When that bucket stops counting, in ms since the epoch.
    pub expires_at_ms: u64,
}

/// Proof of an admitted charge, to be given back with [`crate::QuotaStore::release`] when the
/// send did not happen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reservation {
    pub(crate) id: u64,
    pub(crate) scope: Arc<str>,
    pub(crate) cost: Cost,
    pub(crate) charges: Vec<Charge>,
    /// The idempotency key it was admitted under; releasing it forgets the key, so a retry
    /// of a send that did not happen is counted again.
    pub(crate) idempotency_key: Option<Arc<str>>,
}

impl Reservation {
    /// A unique id; repeats of an idempotent request return the first id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The scope that was charged.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// What was charged.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// The idempotency key it was admitted under.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The buckets that were charged, one per window.
    pub fn charges(&self) -> &[Charge] {
        &self.charges
    }
}

/// One limited metric of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricUsage {
    /// The metric.
    pub metric: Metric,
    /// Its limit in the window.
    pub limit: u64,
    /// Amount counted in the window now.
    pub used: u64,
    /// `limit - used`, never negative.
    pub remaining: u64,
}

/// The state of one window for one scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowUsage {
    /// The window's id.
    pub window_id: Arc<str>,
    /// The window's label (`24h`, `day`, ...).
    pub label: Arc<str>,
    /// The window's nominal length in seconds.
    pub seconds: u64,
    /// Everything counted in the window now, limited or not.
    pub used: Cost,
    /// Time until the next unit frees up (the oldest live bucket expires, or the calendar
    /// period ends); `None` when nothing is counted.
    pub next_free: Option<Duration>,
    /// One entry per metric that has a limit in this window.
    pub metrics: Vec<MetricUsage>,
}

/// Per-window usage of a scope under a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// One entry per window of the profile, in profile order.
    pub windows: Vec<WindowUsage>,
}

/// A reservation that was admitted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Allowance {
    /// Give this back when the send did not happen.
    pub reservation: Reservation,
    /// Usage right after the charge.
    pub usage: Usage,
    /// True when this is the remembered answer to an earlier request with the same
    /// idempotency key: nothing was charged now, and settling must not give back the
    /// earlier charge.
    pub replay: bool,
}

/// Why a reservation was refused. Nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Denial {
    /// Id of the window that refused.
    pub window_id: Arc<str>,
    /// Label of the window that refused.
    pub window: Arc<str>,
    /// The metric that would go over.
    pub metric: Metric,
    /// Its limit.
    pub limit: u64,
    /// Amount already counted.
    pub used: u64,
    /// Amount this request asked for.
    pub requested: u64,
    /// Whole seconds after which the same request would be admitted if nothing else
    /// happened; `None` when the request is larger than the limit itself.
    pub retry_after: Option<Duration>,
    /// Usage at the time of the denial (unchanged by it).
    pub usage: Usage,
}

/// The answer to a reservation: over the limit is a value, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Charged.
    Allowed(Allowance),
    /// Not charged.
    Denied(Denial),
}

impl Decision {
    /// Whether the request was admitted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed(_))
    }

    /// The reservation, if admitted.
    pub fn reservation(&self) -> Option<&Reservation> {
        match self {
            Decision::Allowed(a) => Some(&a.reservation),
            Decision::Denied(_) => None,
        }
    }

    /// Whether this repeats an earlier admitted request with the same idempotency key.
    pub fn is_replay(&self) -> bool {
        matches!(self, Decision::Allowed(a) if a.replay)
    }

    /// Usage as reported with the decision.
    pub fn usage(&self) -> &Usage {
        match self {
            Decision::Allowed(a) => &a.usage,
            Decision::Denied(d) => &d.usage,
        }
    }
}
