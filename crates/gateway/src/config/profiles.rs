//! `[profiles.<name>]` as written in the file, both ways: read into a `limits` spec (which
//! `ProfileSpec::build` checks), and a built [`Profile`] written back as the table that would
//! configure it.

use std::collections::BTreeMap;
use std::time::Duration;

use limits::{CalendarUnit, Metric, PeriodSpec, Profile, ProfileSpec, Window, WindowSpec};
use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::values::{ByteSize, duration, from_str};

/// One profile: limits before windows, as the reference writes them.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProfileTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_recipients_per_message: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_size: Option<ByteSize>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    defer_up_to: Option<Duration>,
    #[serde(default, skip_serializing_if = "is_false")]
    shadow: bool,
    #[serde(default)]
    windows: Vec<WindowTable>,
}

/// `defer_up_to`: a duration, absent for none.
#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

mod optional_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    use super::super::values::duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }

    #[allow(clippy::ref_option)] // serde's `with` passes the field by reference
    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct WindowTable {
    period: Period,
    #[serde(skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<ByteSize>,
}

impl ProfileTable {
    /// The unvalidated `limits` spec; `ProfileSpec::build` does the checking.
    pub(super) fn into_spec(self) -> ProfileSpec {
        ProfileSpec {
            max_recipients_per_message: self.max_recipients_per_message,
            max_message_size: self.max_message_size.map(|b| b.0),
            defer_up_to: self.defer_up_to,
            shadow: self.shadow,
            windows: self
                .windows
                .into_iter()
                .map(WindowTable::into_spec)
                .collect(),
        }
    }
}

impl WindowTable {
    fn into_spec(self) -> WindowSpec {
        WindowSpec {
            period: self.period.0,
            timezone: self.timezone,
            buckets: self.buckets,
            messages: self.messages,
            recipients: self.recipients,
            bytes: self.bytes.map(|b| b.0),
        }
    }
}

impl From<&Profile> for ProfileTable {
    fn from(p: &Profile) -> Self {
        ProfileTable {
            max_recipients_per_message: p.max_recipients_per_message().map(|n| n.get()),
            max_message_size: p.max_message_size().map(|n| ByteSize(n.get())),
            defer_up_to: p.defer_up_to(),
            shadow: p.shadow(),
            windows: p.windows().iter().map(WindowTable::from).collect(),
        }
    }
}

impl From<&Window> for WindowTable {
    fn from(w: &Window) -> Self {
        let (period, timezone, buckets) = match w.period() {
            limits::Period::Rolling {
                length, buckets, ..
            } => (PeriodSpec::Rolling(*length), None, Some(buckets.get())),
            limits::Period::Calendar { unit, tz_name, .. } => {
                (PeriodSpec::Calendar(*unit), Some(tz_name.clone()), None)
            }
        };
        let limit = |m| w.limit(m).map(|n| n.get());
        WindowTable {
            period: Period(period),
            timezone,
            buckets,
            messages: limit(Metric::Messages),
            recipients: limit(Metric::Recipients),
            bytes: limit(Metric::Bytes).map(ByteSize),
        }
    }
}

/// A profile as the table that would configure it.
pub(super) fn profile_table(profile: &Profile) -> toml::Table {
    match toml::Value::try_from(ProfileTable::from(profile)) {
        Ok(toml::Value::Table(table)) => table,
        _ => unreachable!("a profile serializes as a table"),
    }
}

/// `Config::profiles` written back: every profile, built-in or configured.
pub(super) fn serialize<S>(profiles: &BTreeMap<String, Profile>, s: S) -> Result<S::Ok, S::Error>
where
    S: Serializer,
{
    let tables: BTreeMap<&str, ProfileTable> = profiles
        .iter()
        .map(|(name, p)| (name.as_str(), ProfileTable::from(p)))
        .collect();
    tables.serialize(s)
}

/// A window period: a duration for a rolling window, `"day"` or `"month"` for a calendar one.
#[derive(Debug, Clone)]
struct Period(PeriodSpec);

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_str(
            deserializer,
            "a duration such as \"24h\", or \"day\" or \"month\"",
            |s| match s {
                "day" => Ok(Period(PeriodSpec::Calendar(CalendarUnit::Day))),
                "month" => Ok(Period(PeriodSpec::Calendar(CalendarUnit::Month))),
                _ => humantime::parse_duration(s)
                    .map(|d| Period(PeriodSpec::Rolling(d)))
                    .map_err(|_| {
                        format!(
                            "invalid period {s:?}: a duration such as \"24h\" (rolling), \
                             or \"day\" or \"month\" (calendar)"
                        )
                    }),
            },
        )
    }
}

impl Serialize for Period {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            PeriodSpec::Rolling(length) => s.serialize_str(&duration::format(*length)),
            PeriodSpec::Calendar(CalendarUnit::Day) => s.serialize_str("day"),
            PeriodSpec::Calendar(CalendarUnit::Month) => s.serialize_str("month"),
        }
    }
}
