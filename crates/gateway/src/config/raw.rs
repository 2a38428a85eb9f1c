//! The file as serde sees it: every key optional, every value parsed into its type, nothing
//! yet checked against anything else.
//!
//! Values that have a syntax of their own (durations, byte sizes, addresses, the upstream URL,
//! window periods) are parsed here, while deserializing, so that the error carries the path of
//! the key for free. Ranges and cross-key rules are left to [`super::Config`]'s validation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use limits::{CalendarUnit, PeriodSpec, ProfileSpec, WindowSpec};
use reqwest::Url;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{LogFormat, OnUnavailable, StoreBackend};

/// The whole file. Missing tables and keys take their defaults later, which keeps layering
/// (defaults < file < env < flags) a plain merge of partial trees.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) upstream: RawUpstream,
    pub(super) store: RawStore,
    pub(super) grants: RawGrants,
    pub(super) domains: RawDomains,
    pub(super) log: RawLog,
    pub(super) events: RawEvents,
    pub(super) profiles: BTreeMap<String, RawProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Addr>,
    pub(super) admin_listen: Option<Addr>,
    pub(super) admin_token: Option<String>,
    pub(super) shutdown_grace: Option<HumanDuration>,
    pub(super) max_json_body: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<UpstreamUrl>,
    pub(super) timeout: Option<HumanDuration>,
    pub(super) api_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) backend: Option<StoreBackend>,
    pub(super) url: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) timeout: Option<HumanDuration>,
    pub(super) on_unavailable: Option<OnUnavailable>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawGrants {
    pub(super) default_profile: Option<String>,
    pub(super) cache_ttl: Option<HumanDuration>,
    pub(super) resolve_provider: Option<bool>,
    pub(super) provider_cache_ttl: Option<HumanDuration>,
    pub(super) provider_profiles: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawDomains {
    pub(super) profile: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawEvents {
    pub(super) webhook_url: Option<WebhookUrl>,
    pub(super) timeout: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    max_recipients_per_message: Option<u64>,
    max_message_size: Option<ByteSize>,
    #[serde(default)]
    windows: Vec<RawWindow>,
}

impl RawProfile {
    /// The unvalidated `limits` spec; `ProfileSpec::build` does the checking.
    pub(super) fn into_spec(self) -> ProfileSpec {
        ProfileSpec {
            max_recipients_per_message: self.max_recipients_per_message,
            max_message_size: self.max_message_size.map(|b| b.0),
            windows: self.windows.into_iter().map(RawWindow::into_spec).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    period: Period,
    timezone: Option<String>,
    buckets: Option<u32>,
    messages: Option<u64>,
    recipients: Option<u64>,
    bytes: Option<ByteSize>,
}

impl RawWindow {
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

/// Deserializes a value from a string with `parse`, which returns the message for a bad one.
fn from_str<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct StrVisitor<T> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, String>,
    }
    impl<T> Visitor<'_> for StrVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    deserializer.deserialize_str(StrVisitor { expecting, parse })
}

/// A duration written the `humantime` way: `"250ms"`, `"90s"`, `"24h"`, `"7d"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_str(
            deserializer,
            "a duration such as \"250ms\", \"90s\" or \"24h\"",
            |s| parse_duration(s).map(HumanDuration),
        )
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|_| format!("invalid duration {s:?}"))
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

/// A number of bytes: a non-negative integer, or a string with a unit where `MB` is 10^6
/// bytes and `MiB` is 2^20 (parsed by `bytesize`, units case-insensitive).
#[derive(Debug, Clone, Copy)]
pub(super) struct ByteSize(pub(super) u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as \"20MB\", \"4MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid byte size {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_byte_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

pub(super) fn parse_byte_size(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid byte size {s:?}");
    // bytesize accepts no surrounding blanks anyway; "" and "MB" fail to parse a number.
    let size = bytesize::ByteSize::from_str(s).map_err(|_| invalid())?;
    // bytesize saturates on overflow instead of failing: refuse rather than mean 16 EiB.
    if size.0 == u64::MAX {
        return Err(format!("byte size {s:?} is too large"));
    }
    Ok(size.0)
}

/// A listen address: `ip:port`, IPv6 in brackets (`"[::1]:8080"`); no host names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Addr(pub(super) SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_str(deserializer, "an address such as \"127.0.0.1:8080\"", |s| {
            SocketAddr::from_str(s)
                .map(Addr)
                .map_err(|_| format!("invalid socket address {s:?} (expected ip:port)"))
        })
    }
}

/// The Nylas API base URL: http or https, no query or fragment, no trailing slash.
#[derive(Debug, Clone)]
pub(super) struct UpstreamUrl(pub(super) Url);

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_str(
            deserializer,
            "a URL such as \"https://api.us.nylas.com\"",
            |s| parse_upstream_url(s).map(UpstreamUrl),
        )
    }
}

pub(super) fn parse_upstream_url(s: &str) -> Result<Url, String> {
    let mut url = Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    // Request paths are appended to this one; "https://host/base/" would give "//v3/...".
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(&trimmed);
    Ok(url)
}

/// `[events] webhook_url`: an http(s) URL, or `""` for none.
#[derive(Debug, Clone)]
pub(super) struct WebhookUrl(pub(super) Option<Url>);

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_str(
            deserializer,
            "a URL such as \"https://hooks.example.com/sendgw\", or \"\"",
            |s| parse_webhook_url(s).map(WebhookUrl),
        )
    }
}

/// The URL is never echoed: its user info or query may carry a secret.
fn parse_webhook_url(s: &str) -> Result<Option<Url>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let url = Url::parse(s).map_err(|e| format!("invalid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    Ok(Some(url))
}
