//! How each kind of value is written in the file, both ways.
//!
//! Every value with a syntax or a range of its own (durations, byte sizes, addresses, URLs,
//! secrets, the log filter) is parsed and range-checked here, while deserializing, so the
//! error carries the path of its key for free; and it is written back by `check-config` in
//! a form that reads back to the same value. Rules that relate two keys are left to
//! `validate.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::str::FromStr;
use std::time::Duration;

use reqwest::Url;
use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::MASK;

/// A share of a whole (`store.local_budget`): a finite number greater than 0 and at most 1,
/// never NaN (which is what makes `Eq` sound).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Share(f64);

impl Eq for Share {}

impl Share {
    /// 5 %: the default local budget.
    pub const DEFAULT_LOCAL_BUDGET: Share = Share(0.05);

    /// The share as a number in (0, 1].
    pub fn get(self) -> f64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(deserializer)?;
        if v.is_finite() && v > 0.0 && v <= 1.0 {
            Ok(Share(v))
        } else {
            Err(de::Error::custom(format!(
                "must be a share greater than 0 and at most 1 (0.05 is 5 %), not {v}"
            )))
        }
    }
}

/// A secret sent in an HTTP header (`server.admin_token`, `upstream.api_key`): `Debug`
/// shows `<redacted>` and serializing writes [`MASK`], so neither logs nor `check-config`
/// can leak it. Derefs to the value itself. Never contains blanks or control characters
/// (which would make the header invalid or split it); `""` in the file means no secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<Secret> for String {
    fn from(secret: Secret) -> String {
        secret.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt("<redacted>", f)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(MASK)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(de::Error::custom(
                "must not contain spaces or control characters",
            ));
        }
        Ok(Secret(value))
    }
}

/// An optional string-valued key where `""` means none (and none is written as `""`).
pub(super) mod optional {
    use super::*;

    pub(crate) fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        T::deserialize(text.into_deserializer())
            .map(Some)
            .map_err(|e: de::value::Error| de::Error::custom(e))
    }

    pub(crate) fn serialize<S, T>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize,
    {
        match value {
            Some(value) => value.serialize(s),
            None => s.serialize_str(""),
        }
    }
}

/// Deserializes a value from a string with `parse`, which returns the message for a bad one.
pub(super) fn from_str<'de, D, T>(
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

fn greater_than_zero<E: de::Error>() -> E {
    E::custom("must be greater than zero")
}

/// A duration written the `humantime` way: `"250ms"`, `"90s"`, `"24h"`, `"7d"`.
pub(super) mod duration {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        from_str(d, "a duration such as \"250ms\", \"90s\" or \"24h\"", parse)
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub(crate) fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s).map_err(|_| format!("invalid duration {s:?}"))
    }

    /// Exact and readable: `"250ms"`, `"25s"`, `"15m"`, `"24h"`, `"7d"`.
    pub(crate) fn format(d: Duration) -> String {
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            return humantime::format_duration(d).to_string();
        }
        limits::policy::humanize(d)
    }
}

/// A [`duration`] that must be greater than zero (every one but `server.shutdown_grace`).
pub(super) mod nonzero_duration {
    pub(crate) use super::duration::serialize;
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let length = duration::deserialize(d)?;
        if length.is_zero() {
            return Err(greater_than_zero());
        }
        Ok(length)
    }
}

/// `events.webhook_attempts`: 1 to [`super::MAX_WEBHOOK_ATTEMPTS`].
pub(super) fn attempts<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(deserializer)?;
    match u32::try_from(n) {
        Ok(n) if (1..=super::MAX_WEBHOOK_ATTEMPTS).contains(&n) => Ok(n),
        _ => Err(de::Error::custom(format!(
            "must be from 1 to {}, not {n}",
            super::MAX_WEBHOOK_ATTEMPTS
        ))),
    }
}

/// A number of bytes: a non-negative integer, or a string with a unit where `MB` is 10^6
/// bytes and `MiB` is 2^20 (parsed by `bytesize`, units case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Exact and readable: `"4MiB"`, `"20MB"`, or a plain number of bytes.
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(u64, &str); 6] = [
            (1 << 30, "GiB"),
            (1_000_000_000, "GB"),
            (1 << 20, "MiB"),
            (1_000_000, "MB"),
            (1 << 10, "KiB"),
            (1_000, "kB"),
        ];
        let n = self.0;
        match UNITS
            .iter()
            .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        {
            Some((unit, name)) => s.serialize_str(&format!("{}{name}", n / unit)),
            None => s.serialize_i64(i64::try_from(n).unwrap_or(i64::MAX)),
        }
    }
}

fn parse_byte_size(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid byte size {s:?}");
    // bytesize accepts no surrounding blanks anyway; "" and "MB" fail to parse a number.
    let size = bytesize::ByteSize::from_str(s).map_err(|_| invalid())?;
    // bytesize saturates on overflow instead of failing: refuse rather than mean 16 EiB.
    if size.0 == u64::MAX {
        return Err(format!("byte size {s:?} is too large"));
    }
    Ok(size.0)
}

/// `server.max_json_body`: a [`ByteSize`] greater than zero that fits in memory.
pub(super) mod body_size {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let ByteSize(n) = ByteSize::deserialize(d)?;
        let n = usize::try_from(n).map_err(|_| de::Error::custom("is too large"))?;
        if n == 0 {
            return Err(greater_than_zero());
        }
        Ok(n)
    }

    pub(crate) fn serialize<S: Serializer>(n: &usize, s: S) -> Result<S::Ok, S::Error> {
        ByteSize(*n as u64).serialize(s)
    }
}

/// A listen address: `ip:port`, IPv6 in brackets (`"[::1]:8080"`); no host names.
pub(super) mod addr {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        from_str(d, "an address such as \"127.0.0.1:8080\"", |s| {
            SocketAddr::from_str(s)
                .map_err(|_| format!("invalid socket address {s:?} (expected ip:port)"))
        })
    }

    pub(crate) fn serialize<S: Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }
}

/// The Nylas API base URL: http or https, no query or fragment, no trailing slash.
pub(super) mod upstream_url {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
        from_str(d, "a URL such as \"https://api.us.nylas.com\"", parse)
    }

    pub(crate) fn serialize<S: Serializer>(url: &Url, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(url.as_str())
    }

    pub(crate) fn parse(s: &str) -> Result<Url, String> {
        let mut url = Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        check_http(&url)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err("must not have a query or fragment".into());
        }
        // Request paths are appended to this one; "https://host/base/" would give "//v3/...".
        let trimmed = url.path().trim_end_matches('/').to_owned();
        url.set_path(&trimmed);
        Ok(url)
    }
}

fn check_http(url: &Url) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    Ok(())
}

/// `[events] webhook_url`: an http(s) URL, or `""` for none; written back masked.
pub(super) mod webhook_url {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
        from_str(
            d,
            "a URL such as \"https://hooks.example.com/sendgw\", or \"\"",
            parse,
        )
    }

    pub(crate) fn serialize<S: Serializer>(url: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&url.as_ref().map_or_else(String::new, mask_webhook_url))
    }

    /// The URL is never echoed: its user info or query may carry a secret.
    fn parse(s: &str) -> Result<Option<Url>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        let url = Url::parse(s).map_err(|e| format!("invalid URL: {e}"))?;
        check_http(&url)?;
        Ok(Some(url))
    }
}

/// `https://u:p@h/x?token=t` -> `https://***@h/x?***`.
pub(super) fn mask_webhook_url(url: &Url) -> String {
    let mut url = url.clone();
    if !url.username().is_empty() || url.password().is_some() {
        // Only fails for URLs that cannot have user info, which these had.
        let _ = url.set_password(None);
        let _ = url.set_username(MASK);
    }
    if url.query().is_some() {
        url.set_query(Some(MASK));
    }
    url.to_string()
}

/// `store.url`, written back with its password masked ([`mask_store_url`]).
pub(super) fn serialize_store_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_store_url(url))
}

/// `redis://user:pw@host` -> `redis://user:***@host`; user info without a password is
/// masked whole, since some clients read a lone `redis://secret@host` as the password.
pub(super) fn mask_store_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let masked = match authority[..at].split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}"),
        None => MASK.to_owned(),
    };
    format!("{}{masked}{}", &url[..scheme_end], &rest[at..])
}

/// `redis://user:secret@host` -> `redis://<redacted>@host`, so the URL can be logged.
pub(super) fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<redacted>{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// `store.key_prefix`: never empty, no `{` or `}`.
pub(super) fn key_prefix<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let prefix = String::deserialize(deserializer)?;
    if prefix.is_empty() {
        return Err(de::Error::custom("must not be empty"));
    }
    if prefix.contains(['{', '}']) {
        return Err(de::Error::custom(
            "must not contain '{' or '}' (they would break Redis Cluster hash tags)",
        ));
    }
    Ok(prefix)
}

/// `log.level`: a filter `tracing_subscriber::EnvFilter` accepts, in which every directive
/// names a level. A bare word that is not a level (`"inof"`, `"warning"`) parses as a target
/// name, which would turn every other log line off without a word: refused instead.
pub(super) fn log_level<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};

    let level = String::deserialize(deserializer)?;
    if level.trim().is_empty() {
        return Err(de::Error::custom(
            "must not be empty (e.g. \"info\" or \"gateway=debug,info\")",
        ));
    }
    if let Err(e) = EnvFilter::try_new(&level) {
        return Err(de::Error::custom(format!("invalid filter {level:?}: {e}")));
    }
    let bare_target = level
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty() && !d.contains(['=', '[']) && d.parse::<LevelFilter>().is_err());
    if let Some(target) = bare_target {
        return Err(de::Error::custom(format!(
            "invalid filter {level:?}: {target:?} is not a level (off, error, warn, info, \
             debug, trace); to name a target, give it one: \"{target}=debug\""
        )));
    }
    Ok(level)
}
