use std::time::Duration;

use limits::{CalendarUnit, Metric, Period};
use reqwest::Url;

use super::*;

fn err(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
        Err(e) => e,
    }
}

/// Asserts the error names `key`, prints as one `key: ...` line, and mentions `needle`.
#[track_caller]
fn assert_err(text: &str, key: &str, needle: &str) {
    let e = err(text);
    let line = e.to_string();
    assert_eq!(e.key(), key, "{line}");
    assert!(line.starts_with(&format!("{key}: ")), "{line}");
    assert!(!line.contains('\n'), "{line:?}");
    assert!(e.message().contains(needle), "{line:?} lacks {needle:?}");
}

#[test]
fn empty_file_gives_the_defaults() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.server.admin_token, None);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(25));
    assert_eq!(c.server.max_json_body, 4 * 1024 * 1024);
    assert_eq!(c.upstream.url.as_str(), "https://api.us.nylas.com/");
    assert_eq!(c.upstream.timeout, Duration::from_secs(90));
    assert_eq!(c.store.backend, StoreBackend::Memory);
    assert_eq!(c.store.url, "redis://127.0.0.1:6379");
    assert_eq!(c.store.key_prefix, "sendgw");
    assert_eq!(c.store.timeout, Duration::from_millis(250));
    assert_eq!(c.store.on_unavailable, OnUnavailable::Reject);
    assert_eq!(c.grants.default_profile, "icloud");
    assert_eq!(c.grants.cache_ttl, Duration::from_secs(3600));
    assert_eq!(c.domains.profile, None);
    assert!(c.domain_profile().is_none());
    let names: Vec<&str> = c.profiles.keys().map(String::as_str).collect();
    assert_eq!(names, ["google", "icloud", "microsoft", "yahoo"]);
    for name in Profile::BUILTIN {
        assert_eq!(c.profile(name), Profile::builtin(name).as_ref());
    }
    assert_eq!(c.default_profile().name(), "icloud");
    assert_eq!(c.redis(), limits::RedisConfig::default());
    // Empty tables are the same as none.
    let tables = "[server]\n[upstream]\n[store]\n[grants]\n[domains]\n[profiles]\n";
    assert_eq!(Config::from_toml_str(tables).unwrap(), c);
}

#[test]
fn every_key_is_read() {
    let c = Config::from_toml_str(
        r#"
        [server]
        listen = "0.0.0.0:80"
        admin_listen = "[::1]:9000"
        admin_token = "s3cret"
        shutdown_grace = "0s"
        max_json_body = 3000000
        body_timeout = "5s"
        header_timeout = "2s"
        max_header_bytes = "16KiB"
        max_in_flight_sends = 7
        [upstream]
        url = "http://127.0.0.1:4000/nylas/"
        timeout = "2m"
        [store]
        backend = "redis"
        url = "redis+cluster://a:7000,b:7001"
        key_prefix = "gw-test"
        timeout = "1s"
        on_unavailable = "allow"
        [grants]
        default_profile = "google"
        cache_ttl = "10m"
        [domains]
        profile = "yahoo"
        "#,
    )
    .unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:80");
    assert_eq!(c.server.admin_listen.to_string(), "[::1]:9000");
    assert_eq!(c.server.admin_token.as_deref(), Some("s3cret"));
    assert_eq!(c.server.shutdown_grace, Duration::ZERO);
    assert_eq!(c.server.max_json_body, 3_000_000);
    assert_eq!(c.server.body_timeout, Duration::from_secs(5));
    assert_eq!(c.server.header_timeout, Duration::from_secs(2));
    assert_eq!(c.server.max_header_bytes, 16 * 1024);
    assert_eq!(c.server.max_in_flight_sends.get(), 7);
    assert_eq!(c.upstream.url.as_str(), "http://127.0.0.1:4000/nylas");
    assert_eq!(c.upstream.timeout, Duration::from_secs(120));
    assert_eq!(c.store.backend, StoreBackend::Redis);
    assert_eq!(c.store.on_unavailable, OnUnavailable::Allow);
    assert_eq!(c.grants.cache_ttl, Duration::from_secs(600));
    assert_eq!(c.default_profile().name(), "google");
    assert_eq!(c.domain_profile().map(Profile::name), Some("yahoo"));
    let redis = c.redis();
    assert_eq!(redis.url, "redis+cluster://a:7000,b:7001");
    assert_eq!(redis.key_prefix, "gw-test");
    assert_eq!(redis.timeout, Duration::from_secs(1));
    // Secrets stay out of Debug output.
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    let mut with_password = c.store.clone();
    with_password.url = "rediss://user:hunter2@cache:6380/0".into();
    let debug = format!("{with_password:?}");
    assert!(
        !debug.contains("hunter2") && debug.contains("@cache:6380"),
        "{debug}"
    );
}

#[test]
fn upstream_url_is_normalised() {
    let url = |s: &str| {
        Config::from_toml_str(&format!("[upstream]\nurl = {s:?}"))
            .unwrap()
            .upstream
            .url
    };
    assert_eq!(
        url("https://api.eu.nylas.com").as_str(),
        "https://api.eu.nylas.com/"
    );
    assert_eq!(
        url("https://api.eu.nylas.com/").as_str(),
        "https://api.eu.nylas.com/"
    );
    assert_eq!(url("http://h:1/a/b//").as_str(), "http://h:1/a/b");
}

#[test]
fn byte_sizes_distinguish_mb_from_mib() {
    let size = |s: &str| {
        let text = format!("[profiles.p]\nmax_message_size = {s}");
        let c = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{s}: {e}"));
        c.profile("p").unwrap().max_message_size().unwrap().get()
    };
    assert_eq!(size("\"20MB\""), 20_000_000);
    assert_eq!(size("\"20MiB\""), 20 * 1024 * 1024);
    assert_eq!(size("\"20 MB\""), 20_000_000);
    assert_eq!(size("\"20mb\""), 20_000_000);
    assert_eq!(size("\"1.5kB\""), 1_500);
    assert_eq!(size("\"512KiB\""), 512 * 1024);
    assert_eq!(size("\"1GB\""), 1_000_000_000);
    assert_eq!(size("\"123\""), 123);
    assert_eq!(size("35000000"), 35_000_000);
    let json = |s: &str| {
        Config::from_toml_str(&format!("[server]\nmax_json_body = {s:?}"))
            .unwrap()
            .server
            .max_json_body
    };
    assert_eq!(json("4MiB"), 4_194_304);
    assert_eq!(json("4MB"), 4_000_000);
}

#[test]
fn calendar_window_in_berlin() {
    let c = Config::from_toml_str(
        r#"
        [grants]
        default_profile = "berlin"
        [[profiles.berlin.windows]]
        period = "day"
        timezone = "Europe/Berlin"
        messages = 700
        [[profiles.berlin.windows]]
        period = "month"
        bytes = "10GB"
        "#,
    )
    .unwrap();
    let p = c.default_profile();
    assert_eq!(p.name(), "berlin");
    assert_eq!(p.max_message_size(), None);
    let [day, month] = p.windows() else {
        panic!("{p:?}")
    };
    assert_eq!(day.id(), "day@Europe/Berlin");
    assert_eq!(day.limit(Metric::Messages).unwrap().get(), 700);
    match day.period() {
        Period::Calendar { unit, tz_name, .. } => {
            assert_eq!(*unit, CalendarUnit::Day);
            assert_eq!(tz_name, "Europe/Berlin");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(month.id(), "month@UTC");
    assert_eq!(month.limit(Metric::Bytes).unwrap().get(), 10_000_000_000);
}

#[test]
fn a_table_replaces_a_builtin_entirely() {
    let c = Config::from_toml_str(
        r#"
        [profiles.icloud]
        max_recipients_per_message = 50
        [[profiles.icloud.windows]]
        period = "1h"
        buckets = 60
        messages = 100
        "#,
    )
    .unwrap();
    let p = c.profile("icloud").unwrap();
    assert_eq!(p.max_recipients_per_message().unwrap().get(), 50);
    // Nothing is inherited from the built-in: no size cap, no 24h window.
    assert_eq!(p.max_message_size(), None);
    assert_eq!(p.windows().len(), 1);
    assert_eq!(p.windows()[0].id(), "r3600000b60");
    assert_eq!(p.windows()[0].limit(Metric::Recipients), None);
    // The other built-ins are untouched.
    assert_eq!(c.profile("google"), Profile::builtin("google").as_ref());
    assert_eq!(c.default_profile(), p);
    // An empty table is a profile without limits.
    let c = Config::from_toml_str("[profiles.yahoo]").unwrap();
    let yahoo = c.profile("yahoo").unwrap();
    assert!(yahoo.windows().is_empty() && yahoo.max_message_size().is_none());
}

#[test]
fn a_new_name_adds_a_profile() {
    let c = Config::from_toml_str(
        r#"
        [grants]
        default_profile = "agent-free_1"
        [profiles.agent-free_1]
        max_message_size = "25MB"
        [[profiles.agent-free_1.windows]]
        period = "24h"
        messages = 200
        "#,
    )
    .unwrap();
    assert_eq!(c.profiles.len(), 5);
    let p = c.default_profile();
    assert_eq!(p.name(), "agent-free_1");
    assert_eq!(p.max_message_size().unwrap().get(), 25_000_000);
    assert_eq!(p.windows()[0].id(), "r86400000b96");
    assert_eq!(p.windows()[0].limit(Metric::Messages).unwrap().get(), 200);
    assert_eq!(c.profile("icloud"), Profile::builtin("icloud").as_ref());
}

#[test]
fn empty_domains_profile_is_none() {
    let c = Config::from_toml_str("[domains]\nprofile = \"\"").unwrap();
    assert_eq!(c.domains.profile, None);
    assert!(c.domain_profile().is_none());
    let c = Config::from_toml_str("[domains]\nprofile = \"microsoft\"").unwrap();
    assert_eq!(c.domains.profile.as_deref(), Some("microsoft"));
    assert_eq!(c.domain_profile().unwrap().name(), "microsoft");
    let c = Config::from_toml_str("[server]\nadmin_token = \"\"").unwrap();
    assert_eq!(c.server.admin_token, None);
}

#[test]
fn unknown_keys_are_named_at_every_level() {
    assert_err("[sever]\nlisten = \"127.0.0.1:1\"", "sever", "unknown key");
    assert_err("[store]\nbakend = \"redis\"", "store.bakend", "unknown key");
    assert_err("[store]\nbakend = \"redis\"", "store.bakend", "backend");
    assert_err("[server]\nlisen = \"x\"", "server.lisen", "unknown key");
    assert_err(
        "[profiles.icloud]\nmax_recipients = 5",
        "profiles.icloud.max_recipients",
        "unknown key",
    );
    assert_err(
        "[[profiles.x.windows]]\nperiod = \"1h\"\nmessages = 1\n[[profiles.x.windows]]\nperiod = \"24h\"\nmesages = 5",
        "profiles.x.windows[1].mesages",
        "unknown key",
    );
    assert_err(
        "[profiles.\"a.b\"]\n",
        "profiles.\"a.b\"",
        "a profile name uses only",
    );
}

#[test]
fn wrong_types_are_named() {
    assert_err(
        "server = 5",
        "server",
        "expected a table, found the integer 5",
    );
    assert_err(
        "[store]\ntimeout = 250",
        "store.timeout",
        "expected a duration",
    );
    assert_err(
        "[store]\nkey_prefix = 5",
        "store.key_prefix",
        "expected a string",
    );
    assert_err(
        "[store]\nbackend = \"mem\"",
        "store.backend",
        "unknown value \"mem\"",
    );
    assert_err(
        "[store]\non_unavailable = \"open\"",
        "store.on_unavailable",
        "\"reject\", \"allow\"",
    );
    assert_err(
        "[profiles.x]\nwindows = 3",
        "profiles.x.windows",
        "expected an array",
    );
    assert_err(
        "[profiles.x]\nwindows = [1]",
        "profiles.x.windows[0]",
        "expected a table",
    );
    assert_err(
        "[[profiles.x.windows]]\nperiod = \"1h\"\nmessages = \"many\"",
        "profiles.x.windows[0].messages",
        "expected a non-negative integer, found the string \"many\"",
    );
    assert_err(
        "[[profiles.x.windows]]\nperiod = \"1h\"\nmessages = -1",
        "profiles.x.windows[0].messages",
        "-1",
    );
    assert_err(
        "[[profiles.x.windows]]\nperiod = \"1h\"\nmessages = 1\nbuckets = 5000000000",
        "profiles.x.windows[0].buckets",
        "4294967295",
    );
    assert_err(
        "[[profiles.x.windows]]\nmessages = 1",
        "profiles.x.windows[0].period",
        "missing",
    );
}

#[test]
fn bad_values_are_named() {
    assert_eq!(
        err("[store]\ntimeout = \"fast\"").to_string(),
        "store.timeout: invalid duration \"fast\""
    );
    assert_err(
        "[store]\ntimeout = \"0s\"",
        "store.timeout",
        "greater than zero",
    );
    assert_err(
        "[upstream]\ntimeout = \"0ms\"",
        "upstream.timeout",
        "greater than zero",
    );
    assert_err(
        "[grants]\ncache_ttl = \"0s\"",
        "grants.cache_ttl",
        "greater than zero",
    );
    assert_err(
        "[grants]\ncache_ttl = \"1 fortnight\"",
        "grants.cache_ttl",
        "invalid duration",
    );
    assert_err(
        "[server]\nlisten = \"localhost:80\"",
        "server.listen",
        "invalid socket address",
    );
    assert_err(
        "[server]\nadmin_listen = \"9090\"",
        "server.admin_listen",
        "invalid socket address",
    );
    assert_err(
        "[server]\nlisten = \"127.0.0.1:7000\"\nadmin_listen = \"127.0.0.1:7000\"",
        "server.admin_listen",
        "must differ",
    );
    // Port 0 twice is two different ephemeral ports (what tests do).
    Config::from_toml_str("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"")
        .unwrap();
    assert_err(
        "[server]\nadmin_token = \"a b\"",
        "server.admin_token",
        "spaces",
    );
    assert_err(
        "[server]\nmax_json_body = 0",
        "server.max_json_body",
        "greater than zero",
    );
    assert_err(
        "[server]\nmax_json_body = \"4 MeB\"",
        "server.max_json_body",
        "invalid byte size \"4 MeB\"",
    );
    assert_err(
        "[server]\nmax_json_body = -4",
        "server.max_json_body",
        "invalid byte size -4",
    );
    assert_err(
        "[server]\nshutdown_grace = \"soon\"",
        "server.shutdown_grace",
        "invalid duration",
    );
    assert_err(
        "[upstream]\nurl = \"ftp://api.us.nylas.com\"",
        "upstream.url",
        "http:// or https://",
    );
    assert_err(
        "[upstream]\nurl = \"api.us.nylas.com\"",
        "upstream.url",
        "invalid URL",
    );
    assert_err(
        "[upstream]\nurl = \"https://h/?region=us\"",
        "upstream.url",
        "query or fragment",
    );
    assert_err(
        "[upstream]\nurl = \"https://h/#x\"",
        "upstream.url",
        "query or fragment",
    );
    assert_err(
        "[store]\nbackend = \"redis\"\nurl = \"http://secret@127.0.0.1:6379\"",
        "store.url",
        "redis+sentinel:// or rediss+sentinel://",
    );
    assert!(
        !err("[store]\nbackend = \"redis\"\nurl = \"http://secret@h\"")
            .to_string()
            .contains("secret")
    );
    assert_err(
        "[store]\nbackend = \"redis\"\nurl = \"redis+cluster://\"",
        "store.url",
        "host",
    );
    for ok in [
        "redis://h:1",
        "rediss://u:p@h:6380/2",
        "redis+cluster://a:1,b:2",
        "rediss+cluster://:p@a:1,b:2",
        "redis+sentinel://:p@a:26379,b:26380/mymaster/1",
    ] {
        let c =
            Config::from_toml_str(&format!("[store]\nbackend = \"redis\"\nurl = {ok:?}")).unwrap();
        assert_eq!(c.redis().url, ok);
    }
    assert_err(
        "[store]\nbackend = \"redis\"\nurl = \"redis+sentinel://a:1,b:2\"",
        "store.url",
        "master's name",
    );
    assert_err(
        "[store]\nbackend = \"redis\"\nurl = \"redis://a:1\"\nsentinel_password = \"x\"",
        "store.sentinel_password",
        "redis+sentinel://",
    );
    assert_err(
        "[store]\nbackend = \"redis\"\nurl = \"redis+cluster://a:1\"\nwait_replicas = 1",
        "store.wait_replicas",
        "Cluster",
    );
    // The URL of an unused Redis is not checked.
    Config::from_toml_str("[store]\nurl = \"nonsense\"").unwrap();
    assert_err(
        "[store]\nkey_prefix = \"\"",
        "store.key_prefix",
        "must not be empty",
    );
    assert_err("[store]\nkey_prefix = \"gw{1}\"", "store.key_prefix", "'{'");
    assert_err(
        "[grants]\ndefault_profile = \"gmail\"",
        "grants.default_profile",
        "no profile named \"gmail\"",
    );
    assert_err(
        "[grants]\ndefault_profile = \"\"",
        "grants.default_profile",
        "no profile named \"\"",
    );
    assert_err(
        "[domains]\nprofile = \"nylas\"",
        "domains.profile",
        "no profile named \"nylas\"",
    );
    assert_err("[profiles.Work]", "profiles.Work", "a-z, 0-9");
}

#[test]
fn profile_errors_use_the_limits_field() {
    let window = |body: &str| format!("[[profiles.x.windows]]\n{body}");
    assert_eq!(
        err(&window("period = \"24h\"\nmessages = 0")).to_string(),
        "profiles.x.windows[0].messages: must be greater than zero"
    );
    assert_err(
        "[profiles.icloud]\nmax_recipients_per_message = 0",
        "profiles.icloud.max_recipients_per_message",
        "greater than zero",
    );
    assert_err(
        "[profiles.icloud]\nmax_message_size = \"0MB\"",
        "profiles.icloud.max_message_size",
        "greater than zero",
    );
    assert_err(
        &window("period = \"fortnight\"\nmessages = 1"),
        "profiles.x.windows[0].period",
        "invalid period \"fortnight\"",
    );
    assert_err(
        &window("period = \"day\"\ntimezone = \"Mars/Olympus\"\nmessages = 1"),
        "profiles.x.windows[0].timezone",
        "unknown time zone",
    );
    assert_err(
        &window("period = \"24h\"\ntimezone = \"UTC\"\nmessages = 1"),
        "profiles.x.windows[0].timezone",
        "only calendar windows",
    );
    assert_err(
        &window("period = \"day\"\nbuckets = 24\nmessages = 1"),
        "profiles.x.windows[0].buckets",
        "only rolling windows",
    );
    assert_err(
        &window("period = \"24h\"\nbuckets = 0\nmessages = 1"),
        "profiles.x.windows[0].buckets",
        "from 1 to",
    );
    assert_err(
        &window("period = \"40d\"\nmessages = 1"),
        "profiles.x.windows[0].period",
        "1s to 31d",
    );
    assert_err(
        &window("period = \"24h\"\nbytes = \"lots\""),
        "profiles.x.windows[0].bytes",
        "invalid byte size",
    );
    assert_err(
        &window("period = \"24h\""),
        "profiles.x.windows[0]",
        "at least one of",
    );
    assert_err(
        &format!(
            "{}\n{}",
            window("period = \"24h\"\nmessages = 1"),
            window("period = \"1d\"\nrecipients = 1")
        ),
        "profiles.x.windows[1].period",
        "same period",
    );
}

#[test]
fn syntax_errors_have_a_position() {
    let e = err("[server]\nlisten = 127.0.0.1:8080\n");
    assert_eq!(e.key(), "toml");
    assert!(e.message().starts_with("line 2, column "), "{e}");
    assert!(!e.to_string().contains('\n'), "{e:?}");
    let e = err("[store]\ntimeout = \"1s\"\n[store]\n");
    assert!(e.message().starts_with("line 3"), "{e}");
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let e = Config::load(&missing).unwrap_err();
    assert_eq!(e.key(), missing.display().to_string());
    assert!(e.message().starts_with("cannot read the file"), "{e}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store\n").unwrap();
    let e = Config::load(&bad).unwrap_err();
    assert_eq!(e.key(), bad.display().to_string());
    assert!(e.message().starts_with("line 1, column "), "{e}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[grants]\ndefault_profile = \"yahoo\"\n").unwrap();
    assert_eq!(
        Config::load(&good).unwrap().default_profile().name(),
        "yahoo"
    );
}

#[test]
fn exit_code_is_ex_usage() {
    assert_eq!(ConfigError::EXIT_CODE, 64);
}

#[test]
fn redact_userinfo_keeps_the_host() {
    assert_eq!(values::redact_userinfo("redis://h:1"), "redis://h:1");
    assert_eq!(
        values::redact_userinfo("redis://:pw@h:1/0"),
        "redis://<redacted>@h:1/0"
    );
    assert_eq!(values::redact_userinfo("nonsense@"), "nonsense@");
}

#[test]
fn new_keys_have_their_defaults() {
    let c = Config::default();
    assert_eq!(c.upstream.api_key, None);
    assert!(!c.grants.resolve_provider);
    assert_eq!(c.grants.provider_cache_ttl, Duration::from_secs(3600));
    assert!(c.grants.provider_profiles.is_empty());
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.events.webhook_url, None);
    assert_eq!(c.events.timeout, Duration::from_secs(5));
    let tables = "[log]\n[events]\n[grants.provider_profiles]\n";
    assert_eq!(Config::from_toml_str(tables).unwrap(), c);
}

#[test]
fn new_keys_are_read() {
    let c = Config::from_toml_str(
        r#"
        [upstream]
        api_key = "nyk_v0_secret"
        [grants]
        resolve_provider = true
        provider_cache_ttl = "10m"
        [grants.provider_profiles]
        google = "google"
        microsoft = "microsoft"
        imap = "yahoo"
        ews = "microsoft"
        [log]
        format = "json"
        level = "gateway=debug,info"
        [events]
        webhook_url = "https://user:pw@hooks.example.com/sendgw?token=t0k"
        timeout = "2s"
        "#,
    )
    .unwrap();
    assert_eq!(c.upstream.api_key.as_deref(), Some("nyk_v0_secret"));
    assert!(c.grants.resolve_provider);
    assert_eq!(c.grants.provider_cache_ttl, Duration::from_secs(600));
    assert_eq!(c.grants.provider_profiles.len(), 4);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "gateway=debug,info");
    assert_eq!(
        c.events.webhook_url.as_ref().map(Url::as_str),
        Some("https://user:pw@hooks.example.com/sendgw?token=t0k")
    );
    assert_eq!(c.events.timeout, Duration::from_secs(2));

    assert_eq!(c.profile_for_provider(Some("google")).name(), "google");
    assert_eq!(c.profile_for_provider(Some("imap")).name(), "yahoo");
    assert_eq!(c.profile_for_provider(Some("ews")).name(), "microsoft");
    assert_eq!(c.profile_for_provider(Some("icloud")).name(), "icloud");
    assert_eq!(c.profile_for_provider(Some("nylas")).name(), "icloud");
    assert_eq!(c.profile_for_provider(None).name(), "icloud");

    let debug = format!("{c:?}");
    for secret in ["nyk_v0_secret", "pw@", "t0k"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
    assert!(debug.contains("hooks.example.com"), "{debug}");

    let c =
        Config::from_toml_str("[upstream]\napi_key = \"\"\n[events]\nwebhook_url = \"\"").unwrap();
    assert_eq!(c.upstream.api_key, None);
    assert_eq!(c.events.webhook_url, None);
}

#[test]
fn new_keys_are_validated() {
    assert_err(
        "[grants.provider_profiles]\ngoogle = \"gmail\"",
        "grants.provider_profiles.google",
        "no profile named \"gmail\"",
    );
    assert_err(
        "[grants.provider_profiles]\nGoogle = \"google\"",
        "grants.provider_profiles.Google",
        "a provider name uses only",
    );
    assert_err(
        "[grants.provider_profiles]\ngoogle = 5",
        "grants.provider_profiles.google",
        "expected a string",
    );
    assert_err(
        "[grants]\nresolve_provider = \"yes\"",
        "grants.resolve_provider",
        "expected a boolean",
    );
    assert_err(
        "[grants]\nprovider_cache_ttl = \"0s\"",
        "grants.provider_cache_ttl",
        "greater than zero",
    );
    assert_err(
        "[upstream]\napi_key = \"a b\"",
        "upstream.api_key",
        "spaces",
    );
    assert_err(
        "[log]\nformat = \"xml\"",
        "log.format",
        "\"text\", \"json\"",
    );
    assert_err(
        "[log]\nlevel = \"gateway=loud\"",
        "log.level",
        "invalid filter",
    );
    assert_err("[log]\nlevel = \" \"", "log.level", "must not be empty");
    assert_err(
        "[events]\nwebhook_url = \"ftp://h/x\"",
        "events.webhook_url",
        "http:// or https://",
    );
    assert_err(
        "[events]\nwebhook_url = \"hooks.example.com?token=s3cret\"",
        "events.webhook_url",
        "invalid URL",
    );
    assert!(
        !err("[events]\nwebhook_url = \"hooks.example.com?token=s3cret\"")
            .to_string()
            .contains("s3cret")
    );
    assert_err(
        "[events]\ntimeout = \"0s\"",
        "events.timeout",
        "greater than zero",
    );
    assert_err(
        "[events]\nurl = \"x\"",
        "events.url",
        "webhook_url, timeout",
    );
}

#[test]
fn log_level_is_validated_like_every_key() {
    use tracing_subscriber::EnvFilter;

    for ok in [
        "info",
        "WARN",
        "off",
        "gateway=debug,info",
        "info,hyper=warn",
        "gateway::proxy=trace",
        "[send]=debug",
    ] {
        let c = Config::from_toml_str(&format!("[log]\nlevel = {ok:?}"))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(c.log.level, ok);
    }
    // What EnvFilter refuses, the configuration refuses, naming the key.
    for bad in ["gateway=loud", "=info", "gateway=info=debug"] {
        assert!(EnvFilter::try_new(bad).is_err(), "{bad}");
        assert_err(
            &format!("[log]\nlevel = {bad:?}"),
            "log.level",
            &format!("invalid filter {bad:?}: "),
        );
    }
    // A typo EnvFilter reads as a target name, which would turn every other log line off.
    for typo in ["inof", "warning", "info,degub", "gateway"] {
        assert!(EnvFilter::try_new(typo).is_ok(), "{typo}");
        assert_err(
            &format!("[log]\nlevel = {typo:?}"),
            "log.level",
            "is not a level",
        );
    }
    assert_err("[log]\nlevel = \"inof\"", "log.level", "\"inof=debug\"");
    assert_err(
        "[log]\nlevel = 5",
        "log.level",
        "expected a string, found the integer 5",
    );
    // From the environment or a flag (`--log-level`), the variable or the key is named.
    let e = env_err(&[("SEND_GATEWAY__LOG__LEVEL", "gateway=loud")]);
    assert_eq!(e.key(), "SEND_GATEWAY__LOG__LEVEL");
    assert!(e.message().starts_with("invalid filter"), "{e}");
    let e = Sources {
        overrides: vec![("log.level".into(), "inof".into())],
        ..Sources::default()
    }
    .load()
    .unwrap_err();
    assert_eq!(e.key(), "log.level");
    assert!(e.message().contains("is not a level"), "{e}");
}

fn env(vars: &[(&str, &str)]) -> Sources {
    Sources {
        env: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Sources::default()
    }
}

#[track_caller]
fn env_err(vars: &[(&str, &str)]) -> ConfigError {
    match env(vars).load() {
        Ok(c) => panic!("expected an error for {vars:?}, got {c:?}"),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "{e:?}");
            e
        }
    }
}

#[test]
fn environment_sets_scalar_keys_with_their_types() {
    let c = env(&[
        ("SEND_GATEWAY__STORE__URL", "redis://:pw@cache:6379/1"),
        ("SEND_GATEWAY__STORE__BACKEND", "redis"),
        ("SEND_GATEWAY__STORE__TIMEOUT", "1s"),
        ("send_gateway__server__admin_token", "1234"),
        ("SEND_GATEWAY__SERVER__MAX_JSON_BODY", "1000"),
        ("SEND_GATEWAY__Server__Listen", "0.0.0.0:8081"),
        ("SEND_GATEWAY__UPSTREAM__URL", "http://127.0.0.1:4000"),
        ("SEND_GATEWAY__GRANTS__RESOLVE_PROVIDER", "true"),
        ("SEND_GATEWAY__GRANTS__PROVIDER_CACHE_TTL", "24h"),
        ("SEND_GATEWAY__GRANTS__PROVIDER_PROFILES__GOOGLE", "google"),
        ("SEND_GATEWAY__GRANTS__DEFAULT_PROFILE", "tiny"),
        (
            "SEND_GATEWAY__PROFILES__TINY__MAX_RECIPIENTS_PER_MESSAGE",
            "3",
        ),
        ("SEND_GATEWAY__PROFILES__TINY__WINDOWS__0__PERIOD", "1h"),
        ("SEND_GATEWAY__PROFILES__TINY__WINDOWS__0__MESSAGES", "5"),
        ("SEND_GATEWAY__PROFILES__TINY__WINDOWS__1__PERIOD", "day"),
        (
            "SEND_GATEWAY__PROFILES__TINY__WINDOWS__1__TIMEZONE",
            "Europe/Berlin",
        ),
        ("SEND_GATEWAY__PROFILES__TINY__WINDOWS__1__BYTES", "10MB"),
        ("SEND_GATEWAY__LOG__FORMAT", "json"),
        ("SEND_GATEWAY__EVENTS__WEBHOOK_URL", "https://h/x?a=1"),
        // Not ours: ignored.
        ("SEND_GATEWAY_CONFIG", "/nonexistent.toml"),
        ("SEND_GATEWAY_ADMIN_TOKEN", "x"),
        ("PATH", "/bin"),
    ])
    .load()
    .unwrap();
    assert_eq!(c.store.url, "redis://:pw@cache:6379/1");
    assert_eq!(c.store.backend, StoreBackend::Redis);
    assert_eq!(c.store.timeout, Duration::from_secs(1));
    assert_eq!(c.server.admin_token.as_deref(), Some("1234"));
    assert_eq!(c.server.max_json_body, 1000);
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8081");
    assert_eq!(c.upstream.url.as_str(), "http://127.0.0.1:4000/");
    assert!(c.grants.resolve_provider);
    assert_eq!(c.grants.provider_cache_ttl, Duration::from_secs(86_400));
    assert_eq!(c.profile_for_provider(Some("google")).name(), "google");
    let tiny = c.default_profile();
    assert_eq!(tiny.name(), "tiny");
    assert_eq!(tiny.max_recipients_per_message().unwrap().get(), 3);
    let [hour, day] = tiny.windows() else {
        panic!("{tiny:?}")
    };
    assert_eq!(hour.limit(Metric::Messages).unwrap().get(), 5);
    assert_eq!(day.id(), "day@Europe/Berlin");
    assert_eq!(day.limit(Metric::Bytes).unwrap().get(), 10_000_000);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.events.webhook_url.unwrap().as_str(), "https://h/x?a=1");

    // An empty value unsets a secret the file set.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "[server]\nadmin_token = \"from-file\"\n").unwrap();
    let sources = Sources {
        file: Some(file),
        env: vec![("SEND_GATEWAY__SERVER__ADMIN_TOKEN".into(), String::new())],
        overrides: vec![],
    };
    assert_eq!(sources.load().unwrap().server.admin_token, None);
}

#[test]
fn environment_tweaks_a_builtin_without_replacing_it() {
    let c = env(&[(
        "SEND_GATEWAY__PROFILES__ICLOUD__WINDOWS__0__MESSAGES",
        "500",
    )])
    .load()
    .unwrap();
    let icloud = c.profile("icloud").unwrap();
    let builtin = Profile::builtin("icloud").unwrap();
    assert_eq!(icloud.max_message_size(), builtin.max_message_size());
    assert_eq!(icloud.windows()[0].id(), builtin.windows()[0].id());
    assert_eq!(
        icloud.windows()[0].limit(Metric::Messages).unwrap().get(),
        500
    );
    assert_eq!(
        icloud.windows()[0].limit(Metric::Recipients).unwrap().get(),
        1_000
    );
    // A profile written in the file is edited, not re-seeded.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "[profiles.icloud]\nmax_recipients_per_message = 7\n").unwrap();
    let c = Sources {
        file: Some(file),
        env: vec![(
            "SEND_GATEWAY__PROFILES__ICLOUD__MAX_MESSAGE_SIZE".into(),
            "1MB".into(),
        )],
        overrides: vec![],
    }
    .load()
    .unwrap();
    let icloud = c.profile("icloud").unwrap();
    assert_eq!(icloud.max_recipients_per_message().unwrap().get(), 7);
    assert_eq!(icloud.max_message_size().unwrap().get(), 1_000_000);
    assert!(icloud.windows().is_empty());
}

#[test]
fn environment_errors_name_the_variable() {
    let e = env_err(&[("SEND_GATEWAY__STORE__URLL", "redis://h")]);
    assert_eq!(e.key(), "SEND_GATEWAY__STORE__URLL");
    assert!(
        e.to_string()
            .starts_with("SEND_GATEWAY__STORE__URLL: unknown key"),
        "{e}"
    );
    let e = env_err(&[("SEND_GATEWAY__STORE__TIMEOUT", "bogus")]);
    assert_eq!(
        e.to_string(),
        "SEND_GATEWAY__STORE__TIMEOUT: invalid duration \"bogus\""
    );
    // Validation after parsing blames the variable too.
    let e = env_err(&[("SEND_GATEWAY__STORE__TIMEOUT", "0s")]);
    assert_eq!(e.key(), "SEND_GATEWAY__STORE__TIMEOUT");
    assert!(e.message().contains("greater than zero"), "{e}");
    let e = env_err(&[("SEND_GATEWAY__GRANTS__PROVIDER_PROFILES__GOOGLE", "gmail")]);
    assert_eq!(e.key(), "SEND_GATEWAY__GRANTS__PROVIDER_PROFILES__GOOGLE");
    assert!(e.message().contains("no profile named \"gmail\""), "{e}");
    let e = env_err(&[("SEND_GATEWAY__PROFILES__ICLOUD__WINDOWS__0__MESSAGES", "0")]);
    assert_eq!(
        e.key(),
        "SEND_GATEWAY__PROFILES__ICLOUD__WINDOWS__0__MESSAGES"
    );
    // A typed key given text keeps its type error.
    let e = env_err(&[("SEND_GATEWAY__GRANTS__RESOLVE_PROVIDER", "yes")]);
    assert_eq!(
        e.to_string(),
        "SEND_GATEWAY__GRANTS__RESOLVE_PROVIDER: expected a boolean, found the string \"yes\""
    );
    let e = env_err(&[("SEND_GATEWAY__GRANTS__RESOLVE_PROVIDER", "1")]);
    assert_eq!(e.key(), "SEND_GATEWAY__GRANTS__RESOLVE_PROVIDER");
    // Malformed names and paths.
    for name in [
        "SEND_GATEWAY__",
        "SEND_GATEWAY__STORE____URL",
        "SEND_GATEWAY__STORE__",
    ] {
        let e = env_err(&[(name, "x")]);
        assert_eq!(e.key(), name);
        assert!(e.message().contains("not a configuration key"), "{e}");
    }
    let e = env_err(&[("SEND_GATEWAY__STORE", "x")]);
    assert_eq!(
        e.to_string(),
        "SEND_GATEWAY__STORE: expected a table, found the string \"x\""
    );
    let e = env_err(&[("SEND_GATEWAY__STORE__URL__HOST", "x")]);
    assert_eq!(e.key(), "SEND_GATEWAY__STORE__URL__HOST");
    assert_eq!(
        e.message(),
        "store.url: expected a string, found a table",
        "{e}"
    );
    // A flag replaces what the variable made.
    let c = Sources {
        overrides: vec![("store.url".into(), "redis://h".into())],
        ..env(&[("SEND_GATEWAY__STORE__URL__HOST", "x")])
    }
    .load()
    .unwrap();
    assert_eq!(c.store.url, "redis://h");
    let e = Sources {
        overrides: vec![("store.url.host".into(), "h".into())],
        ..env(&[("SEND_GATEWAY__STORE__URL", "redis://h")])
    }
    .load()
    .unwrap_err();
    assert_eq!(e.key(), "store.url");
    assert!(e.message().contains("store.url is not a table"), "{e}");
    let e = env_err(&[("SEND_GATEWAY__PROFILES__ICLOUD__WINDOWS__5__MESSAGES", "1")]);
    assert!(e.message().contains("has 1 entries"), "{e}");
    // A bad file is named before any variable is looked at.
    let e = Sources {
        file: Some("/nonexistent/gw.toml".into()),
        ..env(&[("SEND_GATEWAY__STORE__URLL", "x")])
    }
    .load()
    .unwrap_err();
    assert_eq!(e.key(), "/nonexistent/gw.toml");
}

#[test]
fn precedence_is_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(
        &file,
        "[store]\ntimeout = \"1s\"\nkey_prefix = \"file\"\n[upstream]\ntimeout = \"3s\"\n",
    )
    .unwrap();
    let sources = Sources {
        file: Some(file.clone()),
        env: vec![
            ("SEND_GATEWAY__STORE__TIMEOUT".into(), "2s".into()),
            ("SEND_GATEWAY__STORE__KEY_PREFIX".into(), "env".into()),
        ],
        overrides: vec![
            ("store.key_prefix".into(), "flag".into()),
            ("server.admin_token".into(), "4321".into()),
            ("profiles.x.windows[0].period".into(), "24h".into()),
            ("profiles.x.windows[0].messages".into(), "9".into()),
        ],
    };
    let c = sources.load().unwrap();
    assert_eq!(c.upstream.timeout, Duration::from_secs(3)); // file
    assert_eq!(c.store.timeout, Duration::from_secs(2)); // env over file
    assert_eq!(c.store.key_prefix, "flag"); // flag over env
    assert_eq!(c.server.admin_token.as_deref(), Some("4321"));
    let x = c.profile("x").unwrap();
    assert_eq!(x.windows()[0].limit(Metric::Messages).unwrap().get(), 9);

    // Loading again reads the file again under the same environment and flags (a reload).
    std::fs::write(&file, "[upstream]\ntimeout = \"4s\"\n").unwrap();
    let c = sources.load().unwrap();
    assert_eq!(c.upstream.timeout, Duration::from_secs(4));
    assert_eq!(c.store.timeout, Duration::from_secs(2));
    assert_eq!(c.store.key_prefix, "flag");

    // Flag errors name the dotted key.
    let bad = |key: &str, value: &str| {
        Sources {
            overrides: vec![(key.into(), value.into())],
            ..Sources::default()
        }
        .load()
        .unwrap_err()
    };
    assert_eq!(
        bad("store.timeout", "soon").to_string(),
        "store.timeout: invalid duration \"soon\""
    );
    assert!(
        bad("store.urll", "x")
            .to_string()
            .starts_with("store.urll: unknown key")
    );
    for key in ["", "store..url", "store.url[x]", "a[0"] {
        assert!(
            bad(key, "x").message().contains("not a key such as"),
            "{key}"
        );
    }

    // Sources is what the server keeps for SIGHUP: cloneable, sendable, and its Debug
    // shows names, never values.
    fn shareable<T: Clone + Send + Sync + std::fmt::Debug>(_: &T) {}
    shareable(&sources);
    let secret = Sources {
        env: vec![("SEND_GATEWAY__SERVER__ADMIN_TOKEN".into(), "hunter2".into())],
        overrides: vec![("upstream.api_key".into(), "nyk_secret".into())],
        ..Sources::default()
    };
    let debug = format!("{secret:?}");
    assert!(
        debug.contains("SEND_GATEWAY__SERVER__ADMIN_TOKEN"),
        "{debug}"
    );
    assert!(
        !debug.contains("hunter2") && !debug.contains("nyk_secret"),
        "{debug}"
    );
}

#[test]
fn from_process_keeps_the_environment_and_only_prefixed_variables_set_keys() {
    let s = Sources::from_process(Some("gw.toml".into()), vec![("a.b".into(), "c".into())]);
    // Every variable is kept (a client's `token_env` may name any of them)...
    let readable = std::env::vars_os()
        .filter(|(k, v)| k.to_str().is_some() && v.to_str().is_some())
        .count();
    assert_eq!(s.env.len(), readable);
    // ...but only prefixed ones set keys: an unknown unprefixed name is no error.
    let loaded = env(&[("NOT_OURS__STORE__URL", "x"), ("HOME", "/root")]).load();
    assert_eq!(loaded.unwrap(), Config::default());
    assert_eq!(s.file.as_deref(), Some(std::path::Path::new("gw.toml")));
    assert_eq!(s.overrides, [("a.b".to_owned(), "c".to_owned())]);
}

#[test]
fn masked_toml_hides_secrets() {
    let c = Config::from_toml_str(
        r#"
        [server]
        admin_token = "adm1n"
        [upstream]
        api_key = "nyk_key"
        [store]
        backend = "redis"
        url = "rediss://user:hunter2@cache:6380/0"
        [events]
        webhook_url = "https://hook:pw@hooks.example.com/x?token=t0k"
        "#,
    )
    .unwrap();
    let text = c.to_masked_toml();
    for secret in ["adm1n", "nyk_key", "hunter2", "hook:pw", "t0k"] {
        assert!(!text.contains(secret), "{secret} in\n{text}");
    }
    for shown in [
        "admin_token = \"***\"",
        "api_key = \"***\"",
        "url = \"rediss://user:***@cache:6380/0\"",
        "webhook_url = \"https://***@hooks.example.com/x?***\"",
    ] {
        assert!(text.contains(shown), "{shown} not in\n{text}");
    }
    // Still a valid configuration.
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let sentinel = Config::from_toml_str(
        "[store]\nbackend = \"redis\"\nurl = \"redis+sentinel://a:1/m\"\n\
         sentinel_username = \"watcher\"\nsentinel_password = \"s3nt\"\nwait_replicas = 2",
    )
    .unwrap();
    let text = sentinel.to_masked_toml();
    assert!(!text.contains("s3nt") && text.contains("sentinel_password = \"***\""));
    assert!(!format!("{sentinel:?}").contains("s3nt"));
    let redis = sentinel.redis();
    assert_eq!(redis.sentinel_username.as_deref(), Some("watcher"));
    assert_eq!(redis.sentinel_password.as_deref(), Some("s3nt"));
    assert_eq!(redis.wait_replicas, Some(2));

    assert_eq!(values::mask_store_url("redis://h:1"), "redis://h:1");
    assert_eq!(
        values::mask_store_url("redis://:pw@h:1"),
        "redis://:***@h:1"
    );
    assert_eq!(
        values::mask_store_url("redis://pw@h:1/0"),
        "redis://***@h:1/0"
    );
    assert_eq!(
        values::mask_store_url("redis+cluster://u:p@a:1,b:2"),
        "redis+cluster://u:***@a:1,b:2"
    );
    assert_eq!(
        values::mask_store_url("redis+sentinel://:p@a:1,b:2/m"),
        "redis+sentinel://:***@a:1,b:2/m"
    );
    assert_eq!(values::mask_store_url("nonsense@"), "nonsense@");
    let url = |s: &str| values::mask_webhook_url(&Url::parse(s).unwrap());
    assert_eq!(url("https://h/x"), "https://h/x");
    assert_eq!(url("https://u@h/x?a=1&b=2"), "https://***@h/x?***");
}

#[test]
fn masked_toml_reads_back_to_the_same_configuration() {
    let texts = [
        "",
        r#"
        [server]
        listen = "0.0.0.0:80"
        admin_listen = "[::1]:9000"
        shutdown_grace = "1m 30s"
        max_json_body = 3000001
        body_timeout = "1500ms"
        header_timeout = "3s"
        max_header_bytes = 20000
        max_in_flight_sends = 3
        [upstream]
        url = "http://127.0.0.1:4000/nylas/"
        timeout = "1500ms"
        [store]
        backend = "redis"
        url = "redis+cluster://a:7000,b:7001"
        key_prefix = "gw-test"
        on_unavailable = "allow"
        [grants]
        default_profile = "berlin"
        cache_ttl = "7d"
        resolve_provider = true
        provider_cache_ttl = "90s"
        [grants.provider_profiles]
        google = "google"
        imap = "berlin"
        [domains]
        profile = "yahoo"
        [log]
        format = "json"
        level = "gateway=debug,warn"
        [events]
        webhook_url = "https://hooks.example.com/x"
        timeout = "250ms"
        [profiles.empty]
        [profiles.berlin]
        max_message_size = "4MiB"
        [[profiles.berlin.windows]]
        period = "day"
        timezone = "Europe/Berlin"
        messages = 700
        [[profiles.berlin.windows]]
        period = "month"
        bytes = "10GB"
        [[profiles.berlin.windows]]
        period = "7d"
        buckets = 7
        recipients = 12345
        bytes = 1234567
        "#,
    ];
    for text in texts {
        let c = Config::from_toml_str(text).unwrap();
        let shown = c.to_masked_toml();
        let again = Config::from_toml_str(&shown).unwrap_or_else(|e| panic!("{e}\n{shown}"));
        assert_eq!(again, c, "{shown}");
    }
    let shown = Config::default().to_masked_toml();
    for section in [
        "[server]",
        "[upstream]",
        "[store]",
        "[grants]",
        "[grants.provider_profiles]",
        "[domains]",
        "[log]",
        "[events]",
        "[profiles.google]",
        "[[profiles.microsoft.windows]]",
    ] {
        assert!(shown.contains(section), "{section} not in\n{shown}");
    }
    assert!(
        shown.find("[server]") < shown.find("[upstream]")
            && shown.find("[events]") < shown.find("[profiles."),
        "{shown}"
    );
}

#[test]
fn redis_tls_settings_are_checked_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "CA PEM").unwrap();
    let base = "[store]\nbackend = \"redis\"\n";
    let text = format!(
        "{base}url = \"rediss://h:6380\"\ntls_ca_file = {:?}\n",
        ca.display().to_string()
    );
    let c = Config::from_toml_str(&text).unwrap();
    assert_eq!(
        c.redis_with_tls().unwrap().tls.ca_pem.as_deref(),
        Some(&b"CA PEM"[..])
    );
    assert!(c.warnings().is_empty());
    assert_err(
        &format!(
            "{base}url = \"redis://h:1\"\ntls_ca_file = {:?}\n",
            ca.display().to_string()
        ),
        "store.url",
        "rediss://",
    );
    assert_err(
        &format!(
            "{base}url = \"rediss://h:1\"\ntls_cert_file = {:?}\n",
            ca.display().to_string()
        ),
        "store.tls_key_file",
        "go together",
    );
    assert_err(
        &format!("{base}url = \"rediss://h:1\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n"),
        "store.tls_ca_file",
        "cannot read",
    );
    let c = Config::from_toml_str(&format!(
        "{base}url = \"rediss://h:1\"\ntls_insecure_skip_verify = true\n"
    ))
    .unwrap();
    assert!(c.redis().tls.insecure_skip_verify);
    assert!(c.warnings()[0].starts_with("store.tls_insecure_skip_verify"));
    // Unused while the store is memory.
    Config::from_toml_str("[store]\ntls_ca_file = \"/nonexistent\"").unwrap();
}

#[test]
fn the_memory_store_is_kept_and_capped_as_configured() {
    let c = Config::from_toml_str("").unwrap();
    let o = c.memory_options();
    assert_eq!(o.path, None);
    assert_eq!(o.max_scopes, Some(100_000));
    assert_eq!(o.fsync, limits::Fsync::Every(Duration::from_secs(1)));
    assert!(
        c.warnings()[0].starts_with("store.path: not set"),
        "{:?}",
        c.warnings()
    );

    let c = Config::from_toml_str(
        "[store]\npath = \"/var/lib/sg\"\nmax_scopes = 7\nfsync = \"always\"\n",
    )
    .unwrap();
    let o = c.memory_options();
    assert_eq!(o.path.as_deref(), Some(std::path::Path::new("/var/lib/sg")));
    assert_eq!((o.max_scopes, o.fsync), (Some(7), limits::Fsync::Always));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let c = Config::from_toml_str("[store]\npath = \"/x\"\nfsync_interval = \"250ms\"").unwrap();
    assert_eq!(
        c.memory_options().fsync,
        limits::Fsync::Every(Duration::from_millis(250))
    );

    assert_err("[store]\nmax_scopes = 0", "store.max_scopes", "");
    assert_err("[store]\nfsync = \"sometimes\"", "store.fsync", "");
    assert_err(
        "[store]\nfsync_interval = \"0s\"",
        "store.fsync_interval",
        "",
    );
    let c =
        Config::from_toml_str("[store]\nbackend = \"redis\"\nurl = \"redis://h:1\"\npath = \"/x\"")
            .unwrap();
    assert!(
        c.warnings()[0].starts_with("store.path: ignored"),
        "{:?}",
        c.warnings()
    );
}

#[test]
fn event_webhook_signing_and_retry_keys() {
    let c = Config::default();
    assert_eq!(c.events.webhook_secret, None);
    assert_eq!(c.events.webhook_attempts, 3);
    assert_eq!(c.events.webhook_backoff, Duration::from_secs(1));

    let c = Config::from_toml_str(
        "[events]\nwebhook_secret = \"whsec_ev3nt\"\nwebhook_attempts = 5\n\
         webhook_backoff = \"250ms\"",
    )
    .unwrap();
    assert_eq!(c.events.webhook_secret.as_deref(), Some("whsec_ev3nt"));
    assert_eq!(c.events.webhook_attempts, 5);
    assert_eq!(c.events.webhook_backoff, Duration::from_millis(250));
    // Masked when printed and in Debug; the masked text reads back.
    let text = c.to_masked_toml();
    assert!(!text.contains("whsec_ev3nt"), "{text}");
    assert!(text.contains("webhook_secret = \"***\""), "{text}");
    assert!(!format!("{c:?}").contains("whsec_ev3nt"));
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    // Through the environment, a value that looks like a number included.
    let c = env(&[
        ("SEND_GATEWAY__EVENTS__WEBHOOK_SECRET", "12345"),
        ("SEND_GATEWAY__EVENTS__WEBHOOK_ATTEMPTS", "1"),
    ])
    .load()
    .unwrap();
    assert_eq!(c.events.webhook_secret.as_deref(), Some("12345"));
    assert_eq!(c.events.webhook_attempts, 1);

    for bad in ["0", "11", "-1"] {
        assert_err(
            &format!("[events]\nwebhook_attempts = {bad}"),
            "events.webhook_attempts",
            "1 to 10",
        );
    }
    assert_err(
        "[events]\nwebhook_backoff = \"0s\"",
        "events.webhook_backoff",
        "greater than zero",
    );
    assert_err(
        "[events]\nwebhook_secret = \"a b\"",
        "events.webhook_secret",
        "spaces",
    );
}

#[test]
fn an_admin_listener_off_loopback_needs_the_admin_token() {
    for addr in [
        "0.0.0.0:9091",
        "[::]:9091",
        "10.1.2.3:9091",
        "[::ffff:10.1.2.3]:9091",
    ] {
        let text = format!("[server]\nadmin_listen = \"{addr}\"");
        assert_err(
            &text,
            "server.admin_listen",
            "server.admin_token must be set",
        );
        assert_err(&text, "server.admin_listen", "not a loopback address");
    }
    // An empty token is no token.
    assert_err(
        "[server]\nadmin_listen = \"0.0.0.0:9091\"\nadmin_token = \"\"",
        "server.admin_listen",
        "server.admin_token must be set",
    );
    for addr in [
        "127.0.0.1:9091",
        "127.8.9.10:9091",
        "[::1]:9091",
        "[::ffff:127.0.0.1]:9091",
    ] {
        let c = Config::from_toml_str(&format!("[server]\nadmin_listen = \"{addr}\""))
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(c.server.admin_token, None);
    }
    // The address is a socket address, never a host name: `localhost` is refused as such
    // (before the token rule); write 127.0.0.1 or [::1].
    assert_err(
        "[server]\nadmin_listen = \"localhost:9091\"",
        "server.admin_listen",
        "invalid socket address",
    );
    let c = Config::from_toml_str("[server]\nadmin_listen = \"0.0.0.0:9091\"\nadmin_token = \"t\"")
        .unwrap();
    assert_eq!(c.server.admin_listen.to_string(), "0.0.0.0:9091");
    // The token from the environment, as Kubernetes and Compose give it.
    let c = env(&[
        ("SEND_GATEWAY__SERVER__ADMIN_LISTEN", "0.0.0.0:9091"),
        ("SEND_GATEWAY__SERVER__ADMIN_TOKEN", "from-a-secret"),
    ])
    .load()
    .unwrap();
    assert_eq!(c.server.admin_token.as_deref(), Some("from-a-secret"));
    // The address from the environment without a token: blamed on the variable.
    let e = env_err(&[("SEND_GATEWAY__SERVER__ADMIN_LISTEN", "0.0.0.0:9091")]);
    assert!(
        e.to_string()
            .starts_with("SEND_GATEWAY__SERVER__ADMIN_LISTEN: "),
        "{e}"
    );
    assert!(
        e.to_string().contains("server.admin_token must be set"),
        "{e}"
    );
}

#[test]
fn protect_metrics_needs_a_token_and_defaults_to_off() {
    assert!(!Config::default().server.protect_metrics);
    assert_err(
        "[server]\nprotect_metrics = true",
        "server.protect_metrics",
        "needs server.admin_token",
    );
    let c = Config::from_toml_str("[server]\nprotect_metrics = true\nadmin_token = \"t\"").unwrap();
    assert!(c.server.protect_metrics);
    assert!(c.to_masked_toml().contains("protect_metrics = true"));
}

/// The hex SHA-256 of `token`.
fn sha256_hex(token: &str) -> String {
    token_digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn clients_take_a_digest_or_an_environment_variable() {
    assert!(Config::default().clients.is_empty());
    let hex = sha256_hex("app-one-token");
    let text = format!(
        "[upstream]\napi_key = \"nyk_k\"\n[profiles.small]\n[[profiles.small.windows]]\n\
         period = \"1d\"\nmessages = 5\n\
         [[clients]]\nname = \"billing\"\ntoken_sha256 = \"{}\"\ngrants = [\"a@corp.example\"]\n\
         profile = \"small\"\n[[clients]]\nname = \"crm.v2\"\ntoken_env = \"CRM_TOKEN\"\n",
        hex.to_ascii_uppercase()
    );
    let path = std::env::temp_dir().join(format!("clients-{}.toml", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let sources = Sources {
        file: Some(path.clone()),
        env: vec![("CRM_TOKEN".into(), "crm-token".into())],
        ..Sources::default()
    };
    let c = sources.load().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(c.clients[0].digest, Some(token_digest(b"app-one-token")));
    assert_eq!(c.clients[0].profile.as_deref(), Some("small"));
    assert!(c.clients[0].is_restricted() && !c.clients[1].is_restricted());
    assert_eq!(c.clients[1].digest, Some(token_digest(b"crm-token")));
    let printed = c.to_masked_toml();
    assert!(
        printed.contains("[[clients]]") && !printed.contains("crm-token"),
        "{printed}"
    );
    assert!(!format!("{c:?}").contains("crm-token"));
    // Without the variable, the file alone does not load.
    assert_err_of(
        Config::from_toml_str(&text),
        "clients[1].token_env",
        "$CRM_TOKEN is not set",
    );
}

#[track_caller]
fn assert_err_of(result: Result<Config, ConfigError>, key: &str, needle: &str) {
    let e = result.expect_err("an error");
    assert_eq!(e.key(), key, "{e}");
    assert!(e.message().contains(needle), "{e} lacks {needle:?}");
}

#[test]
fn client_entries_are_checked() {
    let hex = sha256_hex("t");
    let key = "[upstream]\napi_key = \"k\"\n";
    let one = |rest: &str| format!("{key}[[clients]]\nname = \"app\"\n{rest}\n");
    assert_err(
        &format!("[[clients]]\nname = \"app\"\ntoken_sha256 = \"{hex}\""),
        "upstream.api_key",
        "must be set",
    );
    assert_err(&one(""), "clients[0].token_sha256", "exactly one");
    assert_err(
        &one(&format!("token_sha256 = \"{hex}\"\ntoken_env = \"X\"")),
        "clients[0].token_sha256",
        "exactly one",
    );
    assert_err(
        &one("token_sha256 = \"abc\""),
        "clients[0].token_sha256",
        "64 hex",
    );
    let zz = "z".repeat(64);
    assert_err(
        &one(&format!("token_sha256 = \"{zz}\"")),
        "clients[0].token_sha256",
        "64 hex",
    );
    let with = |extra: &str| one(&format!("token_sha256 = \"{hex}\"\n{extra}"));
    assert_err(
        &with("profile = \"nope\""),
        "clients[0].profile",
        "no profile named",
    );
    assert_err(
        &with("grants = [\"me\"]"),
        "clients[0].grants[0]",
        "not `me`",
    );
    assert_err(
        &with("grants = [\" \"]"),
        "clients[0].grants[0]",
        "grant id",
    );
    assert_err(
        &with("domains = [\"a b\"]"),
        "clients[0].domains[0]",
        "domain",
    );
    assert_err(&with("tokn = \"x\""), "clients[0].tokn", "unknown");
    for bad in ["", "-app", "a b", "a:b", &"a".repeat(65)] {
        let text = format!("{key}[[clients]]\nname = \"{bad}\"\ntoken_sha256 = \"{hex}\"");
        assert_err(&text, "clients[0].name", "client name");
    }
    let two = |second: &str| {
        format!("{key}[[clients]]\nname = \"a\"\ntoken_sha256 = \"{hex}\"\n[[clients]]\n{second}")
    };
    let other = sha256_hex("u");
    assert_err(
        &two(&format!("name = \"a\"\ntoken_sha256 = \"{other}\"")),
        "clients[1].name",
        "names two clients",
    );
    assert_err(
        &two(&format!("name = \"b\"\ntoken_sha256 = \"{hex}\"")),
        "clients[1].token_sha256",
        "same token as client \"a\"",
    );
    let ok =
        Config::from_toml_str(&two(&format!("name = \"b\"\ntoken_sha256 = \"{other}\""))).unwrap();
    // The printed configuration reads back as the same one.
    assert_eq!(
        Config::from_toml_str(&ok.to_masked_toml().replace("\"***\"", "\"k\"")).unwrap(),
        ok
    );
}

#[test]
fn client_tokens_and_names_that_cannot_work_are_refused() {
    let key = "[upstream]\napi_key = \"k\"\n";
    let client = |name: &str, token: &str| {
        format!(
            "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n",
            sha256_hex(token)
        )
    };
    assert_err(
        &format!("{key}{}", client("a", "")),
        "clients[0].token_sha256",
        "empty token",
    );
    assert_err(
        &format!("{key}{}{}", client("App", "t"), client("app", "u")),
        "clients[1].name",
        "names two clients",
    );
    assert_err(
        &format!("[upstream]\napi_key = \"kéy\"\n{}", client("a", "t")),
        "upstream.api_key",
        "printable ASCII",
    );
}

#[test]
fn body_timeout_defaults_to_30s_and_is_never_zero() {
    let c = Config::default();
    assert_eq!(c.server.body_timeout, Duration::from_secs(30));
    assert!(c.to_masked_toml().contains("body_timeout = \"30s\""));
    assert_err(
        "[server]\nbody_timeout = \"0s\"",
        "server.body_timeout",
        "greater than zero",
    );
}

#[test]
fn slow_client_limits_have_defaults_and_refuse_zero() {
    let c = Config::default();
    assert_eq!(c.server.header_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_header_bytes, 64 * 1024);
    assert_eq!(c.server.max_in_flight_sends.get(), 1024);
    let shown = c.to_masked_toml();
    for line in [
        "header_timeout = \"10s\"",
        "max_header_bytes = \"64KiB\"",
        "max_in_flight_sends = 1024",
    ] {
        assert!(shown.contains(line), "{line} in {shown}");
    }
    assert_err(
        "[server]\nheader_timeout = \"0s\"",
        "server.header_timeout",
        "greater than zero",
    );
    assert_err(
        "[server]\nmax_header_bytes = 0",
        "server.max_header_bytes",
        "greater than zero",
    );
    assert_err(
        "[server]\nmax_in_flight_sends = 0",
        "server.max_in_flight_sends",
        "",
    );
}

#[test]
fn listener_tls_files_go_together_and_must_load() {
    let dir = tempfile::tempdir().unwrap();
    let certs = testkit::TestCerts::generate(dir.path());
    let text = |cert: &std::path::Path, key: &std::path::Path| {
        format!("[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}")
    };
    let c = Config::from_toml_str(&text(&certs.server_cert, &certs.server_key)).unwrap();
    assert_eq!(
        c.server.tls_files(),
        Some((certs.server_cert.as_path(), certs.server_key.as_path()))
    );
    let shown = c.to_masked_toml();
    assert_eq!(Config::from_toml_str(&shown).unwrap(), c, "{shown}");
    assert_eq!(Config::default().server.tls_files(), None);
    assert_err(
        &format!("[server]\ntls_cert_file = {:?}", certs.server_cert),
        "server.tls_key_file",
        "go together",
    );
    assert_err(
        &format!("[server]\ntls_key_file = {:?}", certs.server_key),
        "server.tls_cert_file",
        "go together",
    );
    let missing = dir.path().join("missing.pem");
    assert_err(
        &text(&missing, &certs.server_key),
        "server.tls_cert_file",
        "cannot read",
    );
    assert_err(
        &text(&certs.server_cert, &certs.client_key),
        "server.tls_key_file",
        "is not the key of",
    );
    // The Redis client's TLS keys are another thing: no rediss:// needed for these.
    assert!(c.store.tls_cert_file.is_none());
}

#[test]
fn enforcement_mode_and_shadow_profiles() {
    let c = Config::default();
    assert_eq!(c.enforcement.mode, EnforcementMode::Enforce);
    assert!(!c.in_shadow(c.default_profile()));
    assert!(
        c.to_masked_toml()
            .contains("[enforcement]\nmode = \"enforce\"")
    );
    let c = Config::from_toml_str("[enforcement]\nmode = \"shadow\"").unwrap();
    assert!(c.in_shadow(c.default_profile()));
    let c = Config::from_toml_str("[profiles.p]\nshadow = true\n[profiles.q]\n").unwrap();
    assert!(c.in_shadow(c.profile("p").unwrap()));
    assert!(!c.in_shadow(c.profile("q").unwrap()));
    let shown = c.to_masked_toml();
    assert!(shown.contains("shadow = true"), "{shown}");
    assert_eq!(Config::from_toml_str(&shown).unwrap(), c);
    assert_err("[enforcement]\nmode = \"dry\"", "enforcement.mode", "");
}

#[test]
fn grant_overrides_take_canonical_ids_and_known_profiles() {
    let id = "8f5c2b1e-4a3d-4c6b-9e7f-0a1b2c3d4e5f";
    let c = Config::from_toml_str(&format!("[grants.overrides]\n\"{id}\" = \"google\"")).unwrap();
    assert_eq!(c.grants.overrides[id], "google");
    assert_eq!(Config::from_toml_str(&c.to_masked_toml()).unwrap(), c);
    let upper = id.to_ascii_uppercase();
    assert_err(
        &format!("[grants.overrides]\n\"{upper}\" = \"google\""),
        &format!("grants.overrides.{upper}"),
        "lowercase and hyphenated",
    );
    assert_err(
        &format!("[grants.overrides]\n\"{id}\" = \"nope\""),
        &format!("grants.overrides.{id}"),
        "no profile named",
    );
}
