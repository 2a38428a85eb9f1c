//! Profiles: per-message caps plus one or more counting windows.
//!
//! A [`Profile`] can only be obtained through [`ProfileSpec::build`] (or [`Profile::builtin`]),
//! which validates every field and names the one at fault, so the rest of the crate never has
//! to wonder whether a limit is zero or a time zone exists.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;

/// Default number of buckets a rolling window is kept in.
pub const DEFAULT_BUCKETS: u32 = 96;
/// Most buckets a rolling window may be kept in.
pub const MAX_BUCKETS: u32 = 10_000;
/// Shortest rolling window.
pub const MIN_ROLLING: Duration = Duration::from_secs(1);
/// Longest rolling window (31 days).
pub const MAX_ROLLING: Duration = Duration::from_secs(31 * 24 * 3600);
/// Longest `defer_up_to` (30 days: the furthest ahead Nylas schedules a send).
pub const MAX_DEFER: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Messages sent.
    Messages,
    /// Unique recipients (to, cc and bcc) summed over messages.
    Recipients,
    /// Message bytes as the provider sees them.
    Bytes,
}

impl Metric {
    /// Every metric, in the order used by arrays indexed by metric.
    pub const ALL: [Metric; 3] = [Metric::Messages, Metric::Recipients, Metric::Bytes];

    /// Position of this metric in arrays indexed by metric.
    pub const fn index(self) -> usize {
        match self {
            Metric::Messages => 0,
            Metric::Recipients => 1,
            Metric::Bytes => 2,
        }
    }

    /// The lowercase name used in configuration, errors and headers.
    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::Messages => "messages",
            Metric::Recipients => "recipients",
            Metric::Bytes => "bytes",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unit of a calendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    /// From local midnight to the next local midnight (23, 24 or 25 hours).
    Day,
    /// From local midnight on the first of the month to the first of the next month.
    Month,
}

/// How a window measures time.
#[derive(Debug, Clone, PartialEq)]
pub enum Period {
    /// A sliding window of `length`, kept as `buckets` buckets of `bucket_ms` each.
    Rolling {
        /// The window's length.
        length: Duration,
        /// Number of buckets actually used (a divisor of the length in milliseconds).
        buckets: NonZeroU32,
        /// Width of one bucket in milliseconds.
        bucket_ms: NonZeroU64,
    },
    /// A calendar day or month aligned to local midnight in `tz`.
    Calendar {
        /// Day or month.
        unit: CalendarUnit,
        /// The IANA name, as configured.
        tz_name: String,
        /// The resolved time zone.
        tz: TimeZone,
    },
}

/// One counting window of a profile, with a limit on at least one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    id: Arc<str>,
    label: Arc<str>,
    period: Period,
    limits: [Option<NonZeroU64>; 3],
}

impl Window {
    /// A stable identifier naming the period and bucketing but never the limits, used in
    /// storage keys so that changing a limit keeps the usage counted so far.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A short human label such as `24h`, `30s`, `day` or `month`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub(crate) fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    pub(crate) fn label_arc(&self) -> &Arc<str> {
        &self.label
    }

    /// The window's period.
    pub fn period(&self) -> &Period {
        &self.period
    }

    /// The limit on `metric`, if any.
    pub fn limit(&self, metric: Metric) -> Option<NonZeroU64> {
        self.limits[metric.index()]
    }

    /// The nominal length of the window in whole seconds (a calendar day counts 86,400 and a
    /// month 31 days): the `w` of a `RateLimit-Policy` item.
    pub fn nominal_seconds(&self) -> u64 {
        match &self.period {
            Period::Rolling { length, .. } => length.as_secs().max(1),
            Period::Calendar {
                unit: CalendarUnit::Day,
                ..
            } => 86_400,
            Period::Calendar {
                unit: CalendarUnit::Month,
                ..
            } => 31 * 86_400,
        }
    }
}

/// A validated sending policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    name: String,
    max_recipients_per_message: Option<NonZeroU64>,
    max_message_size: Option<NonZeroU64>,
    defer_up_to: Option<Duration>,
    shadow: bool,
    windows: Vec<Window>,
}

impl Profile {
    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Most unique recipients one message may have.
    pub fn max_recipients_per_message(&self) -> Option<NonZeroU64> {
        self.max_recipients_per_message
    }

    /// Largest message, in bytes as the provider sees it.
    pub fn max_message_size(&self) -> Option<NonZeroU64> {
        self.max_message_size
    }

    /// How far ahead a send refused only because a window is full may be put off instead
    /// (scheduled for the first instant it fits); `None`: never, unless the client asks.
    pub fn defer_up_to(&self) -> Option<Duration> {
        self.defer_up_to
    }

    /// Whether the profile is in shadow: sends it would refuse go out, counted, and are
    /// only reported as refusals (the gateway's `[enforcement]` decides what that means).
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// The counting windows; possibly none.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// This profile with every window limit scaled by `fraction` (rounded down, at least
    /// 1): the same windows (and ids), so usage counted under one is read by the other. The
    /// per-message caps are kept. For a budget that admits a share of each limit, such as
    /// a replica's while the shared store is down.
    pub fn scaled(&self, fraction: f64) -> Profile {
        let scale = |l: NonZeroU64| {
            let v = (l.get() as f64 * fraction).floor();
            // `as` saturates; a NaN fraction gives 0, raised to 1.
            NonZeroU64::new(v as u64).unwrap_or(NonZeroU64::MIN).min(l)
        };
        let mut p = self.clone();
        for w in &mut p.windows {
            for l in &mut w.limits {
                *l = l.map(scale);
            }
        }
        p
    }

    /// Names of the built-in profiles.
    pub const BUILTIN: [&'static str; 4] = ["icloud", "google", "microsoft", "yahoo"];

    /// A built-in profile from the providers' published limits (see `provider-limits.md`).
    ///
    /// - `icloud`: 500 recipients and 20 MB per message; 1,000 messages and 1,000 recipients in
    ///   any 24 hours.
    /// - `google` (Workspace): 100 recipients (Gmail API) and 25 MB per message; 2,000
    ///   messages and 10,000 recipients in any 24 hours.
    /// - `microsoft` (Exchange Online): 500 recipients and 35 MB per message; 30 messages a
    ///   minute; 10,000 recipients in any 24 hours.
    /// - `yahoo`: 100 recipients and 25 MB per message; 500 messages in any 24 hours (the
    ///   recipient cap is unpublished, so none is set).
    ///
    /// # Examples
    /// ```
    /// let icloud = limits::Profile::builtin("icloud").unwrap();
    /// assert_eq!(icloud.max_message_size().unwrap().get(), 20_000_000);
    /// assert_eq!(icloud.windows()[0].label(), "24h");
    /// ```
    pub fn builtin(name: &str) -> Option<Profile> {
        let day = Duration::from_secs(24 * 3600);
        let spec = match name {
            "icloud" => ProfileSpec::new(Some(500), Some(20_000_000))
                .window(WindowSpec::rolling(day).messages(1_000).recipients(1_000)),
            "google" => ProfileSpec::new(Some(100), Some(25_000_000))
                .window(WindowSpec::rolling(day).messages(2_000).recipients(10_000)),
            "microsoft" => ProfileSpec::new(Some(500), Some(35_000_000))
                .window(WindowSpec::rolling(Duration::from_secs(60)).messages(30))
                .window(WindowSpec::rolling(day).recipients(10_000)),
            "yahoo" => ProfileSpec::new(Some(100), Some(25_000_000))
                .window(WindowSpec::rolling(day).messages(500)),
            _ => return None,
        };
        // The built-in specs are constants; a failure here is a bug caught by the unit tests.
        spec.build(name).ok()
    }
}

/// The period a [`WindowSpec`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeriodSpec {
    /// A rolling window of this length.
    Rolling(Duration),
    /// A calendar window.
    Calendar(CalendarUnit),
}

/// An unvalidated window, as read from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// Rolling length or calendar unit.
    pub period: PeriodSpec,
    /// IANA time zone for calendar windows (default `UTC`); must be absent for rolling ones.
    pub timezone: Option<String>,
    /// Buckets for rolling windows (default [`DEFAULT_BUCKETS`]).
    pub buckets: Option<u32>,
    /// Limit on messages.
    pub messages: Option<u64>,
    /// Limit on recipients.
    pub recipients: Option<u64>,
    /// Limit on bytes.
    pub bytes: Option<u64>,
}

impl WindowSpec {
    /// A rolling window with no limits yet.
    pub fn rolling(length: Duration) -> Self {
        Self::with_period(PeriodSpec::Rolling(length))
    }

    /// A calendar window in `timezone` with no limits yet.
    pub fn calendar(unit: CalendarUnit, timezone: &str) -> Self {
        WindowSpec {
            timezone: Some(timezone.to_owned()),
            ..Self::with_period(PeriodSpec::Calendar(unit))
        }
    }

    fn with_period(period: PeriodSpec) -> Self {
        WindowSpec {
            period,
            timezone: None,
            buckets: None,
            messages: None,
            recipients: None,
            bytes: None,
        }
    }

    /// Sets the message limit.
    pub fn messages(mut self, n: u64) -> Self {
        self.messages = Some(n);
        self
    }

    /// Sets the recipient limit.
    pub fn recipients(mut self, n: u64) -> Self {
        self.recipients = Some(n);
        self
    }

    /// Sets the byte limit.
    pub fn bytes(mut self, n: u64) -> Self {
        self.bytes = Some(n);
        self
    }

    /// Sets the bucket count of a rolling window.
    pub fn buckets(mut self, n: u32) -> Self {
        self.buckets = Some(n);
        self
    }

    fn build(&self, field: &str) -> Result<Window, PolicyError> {
        let limits = self.limits(field)?;
        let (id, label, period) = match &self.period {
            PeriodSpec::Rolling(length) => self.build_rolling(field, *length)?,
            PeriodSpec::Calendar(unit) => self.build_calendar(field, *unit)?,
        };
        Ok(Window {
            id: id.into(),
            label: label.into(),
            period,
            limits,
        })
    }

    /// The limits indexed by metric: each greater than zero, at least one of them set.
    fn limits(&self, field: &str) -> Result<[Option<NonZeroU64>; 3], PolicyError> {
        let mut limits = [None; 3];
        for (metric, value) in
            Metric::ALL
                .into_iter()
                .zip([self.messages, self.recipients, self.bytes])
        {
            if let Some(v) = value {
                let v = NonZeroU64::new(v).ok_or_else(|| {
                    field_error(field, metric.as_str(), "must be greater than zero".into())
                })?;
                limits[metric.index()] = Some(v);
            }
        }
        if limits.iter().all(Option::is_none) {
            return Err(PolicyError::new(
                field,
                "a window needs at least one of messages, recipients or bytes".into(),
            ));
        }
        Ok(limits)
    }

    /// Id, label and period of a rolling window of `length`.
    fn build_rolling(
        &self,
        field: &str,
        length: Duration,
    ) -> Result<(String, String, Period), PolicyError> {
        let err = |key: &str, problem: String| field_error(field, key, problem);
        if self.timezone.is_some() {
            return Err(err(
                "timezone",
                "only calendar windows (\"day\", \"month\") take a time zone".into(),
            ));
        }
        if length < MIN_ROLLING || length > MAX_ROLLING {
            return Err(err(
                "period",
                "a rolling window must be from 1s to 31d long".into(),
            ));
        }
        let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX);
        if !length.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(err(
                "period",
                "must be a whole number of milliseconds".into(),
            ));
        }
        let requested = self.buckets.unwrap_or(DEFAULT_BUCKETS);
        if requested == 0 || requested > MAX_BUCKETS {
            return Err(err("buckets", format!("must be from 1 to {MAX_BUCKETS}")));
        }
        let buckets = largest_divisor_at_most(length_ms, u64::from(requested));
        let bucket_ms = length_ms / buckets;
        let buckets = u32::try_from(buckets).unwrap_or(requested);
        let label = humanize(length);
        Ok((
            format!("r{length_ms}b{buckets}"),
            label,
            Period::Rolling {
                length,
                buckets: NonZeroU32::new(buckets).unwrap_or(NonZeroU32::MIN),
                bucket_ms: NonZeroU64::new(bucket_ms).unwrap_or(NonZeroU64::MIN),
            },
        ))
    }

    /// Id, label and period of a calendar window of `unit` in the spec's time zone.
    fn build_calendar(
        &self,
        field: &str,
        unit: CalendarUnit,
    ) -> Result<(String, String, Period), PolicyError> {
        if self.buckets.is_some() {
            return Err(field_error(
                field,
                "buckets",
                "only rolling windows have buckets".into(),
            ));
        }
        let tz_name = self.timezone.clone().unwrap_or_else(|| "UTC".to_owned());
        let tz = TimeZone::get(&tz_name).map_err(|_| {
            field_error(field, "timezone", format!("unknown time zone {tz_name:?}"))
        })?;
        let unit_name = match unit {
            CalendarUnit::Day => "day",
            CalendarUnit::Month => "month",
        };
        Ok((
            format!("{unit_name}@{tz_name}"),
            unit_name.to_owned(),
            Period::Calendar { unit, tz_name, tz },
        ))
    }
}

/// An unvalidated profile, as read from configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfileSpec {
    /// Most unique recipients per message.
    pub max_recipients_per_message: Option<u64>,
    /// Largest message in bytes.
    pub max_message_size: Option<u64>,
    /// How far ahead a refused send may be put off instead (at most [`MAX_DEFER`]).
    pub defer_up_to: Option<Duration>,
    /// Report refusals instead of making them (see [`Profile::shadow`]).
    pub shadow: bool,
    /// Counting windows.
    pub windows: Vec<WindowSpec>,
}

impl ProfileSpec {
    /// A spec with per-message caps and no windows yet.
    pub fn new(max_recipients_per_message: Option<u64>, max_message_size: Option<u64>) -> Self {
        ProfileSpec {
            max_recipients_per_message,
            max_message_size,
            defer_up_to: None,
            shadow: false,
            windows: Vec::new(),
        }
    }

    /// Adds a window.
    pub fn window(mut self, window: WindowSpec) -> Self {
        self.windows.push(window);
        self
    }

    /// Puts refused sends off for up to `d` instead (see [`Profile::defer_up_to`]).
    pub fn defer_up_to(mut self, d: Duration) -> Self {
        self.defer_up_to = Some(d);
        self
    }

    /// Validates the spec. Errors name the field at fault as `profiles.<name>.<key>`.
    ///
    /// # Errors
    /// A zero limit, a window without limits, a rolling length outside 1 s to 31 days, zero
    /// buckets, an unknown time zone, two windows with the same period, or a `defer_up_to`
    /// of zero or over 30 days.
    ///
    /// # Examples
    /// ```
    /// use limits::{ProfileSpec, WindowSpec};
    /// let err = ProfileSpec::new(Some(0), None).build("tiny").unwrap_err();
    /// assert_eq!(err.field(), "profiles.tiny.max_recipients_per_message");
    /// ```
    pub fn build(&self, name: &str) -> Result<Profile, PolicyError> {
        let base = format!("profiles.{name}");
        let nonzero = |v: Option<u64>, key: &str| match v {
            None => Ok(None),
            Some(v) => NonZeroU64::new(v).map(Some).ok_or_else(|| {
                PolicyError::new(format!("{base}.{key}"), "must be greater than zero".into())
            }),
        };
        let max_recipients_per_message = nonzero(
            self.max_recipients_per_message,
            "max_recipients_per_message",
        )?;
        let max_message_size = nonzero(self.max_message_size, "max_message_size")?;
        if let Some(d) = self.defer_up_to
            && (d.is_zero() || d > MAX_DEFER)
        {
            return Err(PolicyError::new(
                format!("{base}.defer_up_to"),
                "must be more than zero and at most 30d (Nylas schedules sends up to 30 days ahead)"
                    .into(),
            ));
        }
        let mut windows: Vec<Window> = Vec::with_capacity(self.windows.len());
        for (i, spec) in self.windows.iter().enumerate() {
            let field = format!("{base}.windows[{i}]");
            let window = spec.build(&field)?;
            let same_length = |w: &Window| {
                matches!(
                    (&w.period, &window.period),
                    (Period::Rolling { length: a, .. }, Period::Rolling { length: b, .. }) if a == b
                )
            };
            if windows.iter().any(|w| w.id == window.id || same_length(w)) {
                return Err(PolicyError::new(
                    format!("{field}.period"),
                    "two windows of one profile have the same period".into(),
                ));
            }
            windows.push(window);
        }
        Ok(Profile {
            name: name.to_owned(),
            max_recipients_per_message,
            max_message_size,
            defer_up_to: self.defer_up_to,
            shadow: self.shadow,
            windows,
        })
    }
}

/// A profile that cannot be built, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PolicyError {
    field: String,
    problem: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, problem: String) -> Self {
        PolicyError {
            field: field.into(),
            problem,
        }
    }

    /// The dotted path of the field at fault, e.g. `profiles.icloud.windows[0].messages`.
    pub fn field(&self) -> &str {
        &self.field
    }
}

/// An error in `key` of the window at `field`, e.g. `profiles.icloud.windows[0].messages`.
fn field_error(field: &str, key: &str, problem: String) -> PolicyError {
    PolicyError::new(format!("{field}.{key}"), problem)
}

/// The largest divisor of `n` that is at most `cap` (at least 1), so buckets tile the window
/// exactly and the "at most one bucket longer" guarantee holds to the millisecond.
fn largest_divisor_at_most(n: u64, cap: u64) -> u64 {
    let cap = cap.min(n).max(1);
    (1..=cap).rev().find(|d| n.is_multiple_of(*d)).unwrap_or(1)
}

/// A duration in the configuration's own syntax, as short as it goes exactly: `250ms`,
/// `90s`, `30m`, `24h` (a single day stays in hours), `7d`.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// assert_eq!(limits::policy::humanize(Duration::from_secs(86_400)), "24h");
/// assert_eq!(limits::policy::humanize(Duration::from_millis(1500)), "1500ms");
/// ```
pub fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    let secs = d.as_secs();
    if ms == 0 {
        "0s".to_owned()
    } else if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if secs.is_multiple_of(86_400) && secs > 86_400 {
        format!("{}d", secs / 86_400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_keeps_windows_and_floors_each_limit_at_one() {
        let ms = Profile::builtin("microsoft").unwrap();
        let s = ms.scaled(0.05);
        assert_eq!(s.windows().len(), 2);
        assert_eq!(s.windows()[0].id(), ms.windows()[0].id());
        // 30 a minute: 1.5, rounded down to 1; 10,000 recipients a day: 500.
        assert_eq!(s.windows()[0].limit(Metric::Messages).unwrap().get(), 1);
        assert_eq!(s.windows()[1].limit(Metric::Recipients).unwrap().get(), 500);
        assert_eq!(s.windows()[1].limit(Metric::Messages), None);
        assert_eq!(
            s.max_recipients_per_message(),
            ms.max_recipients_per_message()
        );
        let whole = ms.scaled(2.0);
        assert_eq!(
            whole.windows()[0].limit(Metric::Messages).unwrap().get(),
            30
        );
    }

    #[test]
    fn builtins_build() {
        for name in Profile::BUILTIN {
            let p = Profile::builtin(name).expect(name);
            assert_eq!(p.name(), name);
            assert!(!p.windows().is_empty());
        }
        assert!(Profile::builtin("nope").is_none());
        let icloud = Profile::builtin("icloud").unwrap();
        assert_eq!(icloud.max_recipients_per_message().unwrap().get(), 500);
        let w = &icloud.windows()[0];
        assert_eq!(w.limit(Metric::Messages).unwrap().get(), 1000);
        assert_eq!(w.limit(Metric::Recipients).unwrap().get(), 1000);
        assert_eq!(w.limit(Metric::Bytes), None);
        assert_eq!(w.id(), "r86400000b96");
        match w.period() {
            Period::Rolling {
                buckets, bucket_ms, ..
            } => {
                assert_eq!(buckets.get(), 96);
                assert_eq!(bucket_ms.get(), 900_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(ProfileSpec, &str)> = vec![
            (
                ProfileSpec::new(None, Some(0)),
                "profiles.p.max_message_size",
            ),
            (
                ProfileSpec::default().defer_up_to(Duration::ZERO),
                "profiles.p.defer_up_to",
            ),
            (
                ProfileSpec::default().defer_up_to(Duration::from_secs(31 * 86_400)),
                "profiles.p.defer_up_to",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::rolling(Duration::from_secs(60)).messages(0)),
                "profiles.p.windows[0].messages",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::rolling(Duration::from_secs(60)).messages(1))
                    .window(
                        WindowSpec::rolling(Duration::from_secs(60))
                            .buckets(0)
                            .messages(1),
                    ),
                "profiles.p.windows[1].buckets",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::calendar(CalendarUnit::Day, "Mars/Olympus").messages(1)),
                "profiles.p.windows[0].timezone",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::rolling(Duration::from_millis(999)).messages(1)),
                "profiles.p.windows[0].period",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::rolling(Duration::from_secs(32 * 86_400)).bytes(1)),
                "profiles.p.windows[0].period",
            ),
            (
                ProfileSpec::default().window(WindowSpec::rolling(Duration::from_secs(60))),
                "profiles.p.windows[0]",
            ),
            (
                ProfileSpec::default()
                    .window(WindowSpec::rolling(Duration::from_secs(60)).messages(1))
                    .window(WindowSpec::rolling(Duration::from_secs(60)).recipients(1)),
                "profiles.p.windows[1].period",
            ),
        ];
        for (spec, field) in cases {
            let err = spec.build("p").unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().starts_with(field));
        }
    }

    #[test]
    fn buckets_divide_the_window_exactly() {
        let w = WindowSpec::rolling(Duration::from_secs(1)).messages(1);
        let p = ProfileSpec::default().window(w).build("p").unwrap();
        match p.windows()[0].period() {
            Period::Rolling {
                buckets, bucket_ms, ..
            } => {
                assert_eq!(buckets.get(), 50);
                assert_eq!(bucket_ms.get(), 20);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(largest_divisor_at_most(7, 96), 7);
        assert_eq!(largest_divisor_at_most(1009, 96), 1);
    }

    #[test]
    fn calendar_windows_default_to_utc_and_name_the_zone() {
        let spec = WindowSpec {
            timezone: None,
            ..WindowSpec::calendar(CalendarUnit::Month, "x")
        }
        .messages(5);
        let p = ProfileSpec::default().window(spec).build("p").unwrap();
        assert_eq!(p.windows()[0].id(), "month@UTC");
        assert_eq!(p.windows()[0].label(), "month");
    }
}
