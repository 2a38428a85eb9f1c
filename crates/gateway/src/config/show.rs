//! The effective configuration written back as TOML with its secrets masked: what
//! `send-gateway check-config` prints.
//!
//! The document is built from serde structs rather than a `toml::Table` so that sections and
//! keys come out in the order of the reference (`[server]` first, limits before windows),
//! and every value is written in a form the parser reads back to the same configuration.

use std::collections::BTreeMap;
use std::time::Duration;

use limits::{CalendarUnit, Metric, Period, Profile, Window};
use reqwest::Url;
use serde::Serialize;

use super::{Config, MASK};

impl Config {
    /// The whole configuration as a TOML document, defaults included: every section, every
    /// profile (built-in or configured) with its windows. Secrets are replaced by `***`:
    /// `server.admin_token`, `upstream.api_key`, the password in `store.url`, and the user
    /// info and query of `events.webhook_url`. Read back, it gives the same configuration,
    /// secrets aside.
    ///
    /// # Examples
    /// ```
    /// use gateway::config::Config;
    /// let c = Config::from_toml_str("[server]\nadmin_token = \"s3cret\"").unwrap();
    /// let text = c.to_masked_toml();
    /// assert!(text.contains("admin_token = \"***\"") && !text.contains("s3cret"));
    /// assert!(text.contains("[[profiles.icloud.windows]]"));
    /// ```
    pub fn to_masked_toml(&self) -> String {
        let secret = |s: &Option<String>| s.as_ref().map_or("", |_| MASK);
        let doc = Doc {
            server: Server {
                listen: self.server.listen.to_string(),
                admin_listen: self.server.admin_listen.to_string(),
                admin_token: secret(&self.server.admin_token),
                shutdown_grace: duration(self.server.shutdown_grace),
                max_json_body: bytes(self.server.max_json_body as u64),
            },
            upstream: Upstream {
                url: self.upstream.url.as_str(),
                timeout: duration(self.upstream.timeout),
                api_key: secret(&self.upstream.api_key),
            },
            store: Store {
                backend: match self.store.backend {
                    super::StoreBackend::Memory => "memory",
                    super::StoreBackend::Redis => "redis",
                },
                url: mask_store_url(&self.store.url),
                key_prefix: &self.store.key_prefix,
                timeout: duration(self.store.timeout),
                on_unavailable: match self.store.on_unavailable {
                    super::OnUnavailable::Reject => "reject",
                    super::OnUnavailable::Allow => "allow",
                },
            },
            grants: Grants {
                default_profile: &self.grants.default_profile,
                cache_ttl: duration(self.grants.cache_ttl),
                resolve_provider: self.grants.resolve_provider,
                provider_cache_ttl: duration(self.grants.provider_cache_ttl),
                provider_profiles: &self.grants.provider_profiles,
            },
            domains: Domains {
                profile: self.domains.profile.as_deref().unwrap_or(""),
            },
            log: Log {
                format: self.log.format.as_str(),
                level: &self.log.level,
            },
            events: Events {
                webhook_url: self
                    .events
                    .webhook_url
                    .as_ref()
                    .map_or_else(String::new, mask_webhook_url),
                timeout: duration(self.events.timeout),
            },
            profiles: self
                .profiles
                .iter()
                .map(|(name, p)| (name.as_str(), ProfileDoc::from(p)))
                .collect(),
        };
        toml::to_string(&doc).expect("the configuration serializes as TOML")
    }
}

/// A profile as the table that would configure it.
pub(super) fn profile_table(profile: &Profile) -> toml::Table {
    match toml::Value::try_from(ProfileDoc::from(profile)) {
        Ok(toml::Value::Table(table)) => table,
        _ => unreachable!("a profile serializes as a table"),
    }
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

/// Exact and readable: `"250ms"`, `"25s"`, `"15m"`, `"24h"`, `"7d"`.
fn duration(d: Duration) -> String {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return humantime::format_duration(d).to_string();
    }
    limits::policy::humanize(d)
}

/// Exact and readable: `"4MiB"`, `"20MB"`, or a plain number of bytes.
fn bytes(n: u64) -> toml::Value {
    const UNITS: [(u64, &str); 6] = [
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
        (1_000, "kB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        .map_or_else(
            || toml::Value::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            |(unit, name)| toml::Value::String(format!("{}{name}", n / unit)),
        )
}

#[derive(Serialize)]
struct Doc<'a> {
    server: Server<'a>,
    upstream: Upstream<'a>,
    store: Store<'a>,
    grants: Grants<'a>,
    domains: Domains<'a>,
    log: Log<'a>,
    events: Events,
    profiles: BTreeMap<&'a str, ProfileDoc>,
}

#[derive(Serialize)]
struct Server<'a> {
    listen: String,
    admin_listen: String,
    admin_token: &'a str,
    shutdown_grace: String,
    max_json_body: toml::Value,
}

#[derive(Serialize)]
struct Upstream<'a> {
    url: &'a str,
    timeout: String,
    api_key: &'a str,
}

#[derive(Serialize)]
struct Store<'a> {
    backend: &'a str,
    url: String,
    key_prefix: &'a str,
    timeout: String,
    on_unavailable: &'a str,
}

#[derive(Serialize)]
struct Grants<'a> {
    default_profile: &'a str,
    cache_ttl: String,
    resolve_provider: bool,
    provider_cache_ttl: String,
    provider_profiles: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Domains<'a> {
    profile: &'a str,
}

#[derive(Serialize)]
struct Log<'a> {
    format: &'a str,
    level: &'a str,
}

#[derive(Serialize)]
struct Events {
    webhook_url: String,
    timeout: String,
}

#[derive(Serialize)]
struct ProfileDoc {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_recipients_per_message: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_size: Option<toml::Value>,
    windows: Vec<WindowDoc>,
}

impl From<&Profile> for ProfileDoc {
    fn from(p: &Profile) -> Self {
        ProfileDoc {
            max_recipients_per_message: p.max_recipients_per_message().map(|n| n.get()),
            max_message_size: p.max_message_size().map(|n| bytes(n.get())),
            windows: p.windows().iter().map(WindowDoc::from).collect(),
        }
    }
}

#[derive(Serialize)]
struct WindowDoc {
    period: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<toml::Value>,
}

impl From<&Window> for WindowDoc {
    fn from(w: &Window) -> Self {
        let (period, timezone, buckets) = match w.period() {
            Period::Rolling {
                length, buckets, ..
            } => (duration(*length), None, Some(buckets.get())),
            Period::Calendar { unit, tz_name, .. } => {
                let unit = match unit {
                    CalendarUnit::Day => "day",
                    CalendarUnit::Month => "month",
                };
                (unit.to_owned(), Some(tz_name.clone()), None)
            }
        };
        WindowDoc {
            period,
            timezone,
            buckets,
            messages: w.limit(Metric::Messages).map(|n| n.get()),
            recipients: w.limit(Metric::Recipients).map(|n| n.get()),
            bytes: w.limit(Metric::Bytes).map(|n| bytes(n.get())),
        }
    }
}
