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
    /// The instant it was charged at, in ms since the epoch (the store's now for a live send).
    pub(crate) at: u64,
    /// The store's now when it was made: a reset of the scope after that leaves it nothing
    /// to give back.
    pub(crate) made_at: u64,
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

    /// The instant it was charged at, in ms since the epoch.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// The idempotency key it was admitted under.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// The buckets that were charged, one per window.
    pub fn charges(&self) -> &[Charge] {
        &self.charges
    }

    /// When the last charged bucket stops counting, in ms since the epoch: releasing after
    /// that gives nothing back.
    pub fn expires_at_ms(&self) -> u64 {
        self.charges
            .iter()
            .map(|c| c.expires_at_ms)
            .max()
            .unwrap_or(self.at)
    }

    /// The reservation as one line of text, to be kept in a store and given back later with
    /// [`Reservation::from_record`] (a scheduled send's charge, released by its cancel).
    ///
    /// # Examples
    /// ```
    /// # tokio_test_block_on(async {
    /// use limits::{Cost, MemoryStore, Profile, QuotaStore, Reservation};
    /// let store = MemoryStore::new();
    /// let p = Profile::builtin("icloud").unwrap();
    /// let d = store.reserve("g", &p, Cost::new(1, 2, 0), None).await.unwrap();
    /// let r = d.reservation().unwrap();
    /// assert_eq!(Reservation::from_record("g", &r.to_record()).as_ref(), Some(r));
    /// # });
    /// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    /// # }
    /// ```
    pub fn to_record(&self) -> String {
        let charges: Vec<String> = self
            .charges
            .iter()
            .map(|c| format!("{},{},{}", c.slot, c.expires_at_ms, c.window_id))
            .collect();
        let c = self.cost;
        format!(
            "2;{};{};{};{},{},{};{};{}",
            self.id,
            self.at,
            self.made_at,
            c.messages,
            c.recipients,
            c.bytes,
            charges.join("|"),
            self.idempotency_key.as_deref().unwrap_or("")
        )
    }

    /// Reads a [`Reservation::to_record`] line back, for `scope`; `None` when it is not one.
    pub fn from_record(scope: &str, record: &str) -> Option<Reservation> {
        let mut parts = record.splitn(7, ';');
        if parts.next()? != "2" {
            return None;
        }
        let id = parts.next()?.parse().ok()?;
        let at = parts.next()?.parse().ok()?;
        let made_at = parts.next()?.parse().ok()?;
        let cost: Vec<u64> = parts
            .next()?
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let [messages, recipients, bytes] = cost[..] else {
            return None;
        };
        let charges = parts
            .next()?
            .split('|')
            .filter(|c| !c.is_empty())
            .map(|c| {
                let mut f = c.splitn(3, ',');
                Some(Charge {
                    slot: f.next()?.parse().ok()?,
                    expires_at_ms: f.next()?.parse().ok()?,
                    window_id: Arc::from(f.next()?),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let key = parts.next()?;
        Some(Reservation {
            id,
            scope: Arc::from(scope),
            cost: Cost::new(messages, recipients, bytes),
            at,
            made_at,
            charges,
            idempotency_key: (!key.is_empty()).then(|| Arc::from(key)),
        })
    }
}

/// One limited metric of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricUsage {
    /// The metric.
    pub metric: Metric,
    /// Its limit in the window.
    pub limit: u64,
    /// Amount counted in the window now (sent, or due by now).
    pub used: u64,
    /// Amount charged for later instants (scheduled sends), not yet counted in `used`.
    pub scheduled: u64,
    /// What a send going out now can still take: the limit less the fullest any window
    /// holding now gets, scheduled sends included; never negative.
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
    /// Everything charged for later instants (scheduled sends), limited or not.
    pub scheduled: Cost,
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
    /// Amount already counted in the fullest window that would hold the charge (for a
    /// scheduled send, sends scheduled around its instant included).
    pub used: u64,
    /// Amount this request asked for.
    pub requested: u64,
    /// The instant the charge was asked for, in ms since the epoch (the store's now for a
    /// send going out now).
    pub at: u64,
    /// The earliest instant at or after `at` at which the same charge would be admitted if
    /// nothing else happened; `None` when the request is larger than the limit itself.
    pub fits_at: Option<u64>,
    /// For a send going out now: whole seconds until `fits_at`. `None` for a scheduled
    /// send (waiting does not change what is scheduled around its instant) and when the
    /// request is larger than the limit itself.
    pub retry_after: Option<Duration>,
    /// Usage at the time of the denial (unchanged by it).
    pub usage: Usage,
}

/// What a reservation would be answered, asked without charging
/// ([`crate::QuotaStore::probe_at`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// It would be admitted; the usage now, which nothing changed.
    Fits(Usage),
    /// It would be refused, and why.
    Refused(Denial),
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
