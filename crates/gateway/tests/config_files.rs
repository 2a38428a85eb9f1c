//! Every file shipped in `config/` parses and validates, and the two reference files say
//! what their comments and `docs/configuration.md` claim.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway::config::{Config, OnUnavailable, StoreBackend};
use limits::{Metric, Profile};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config_dir() -> PathBuf {
    workspace().join("config")
}

fn load(name: &str) -> Config {
    let path = config_dir().join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_shipped_file_is_valid() {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(config_dir()).expect("config/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = Config::load(&path) {
                panic!("{} is not a valid configuration: {e}", path.display());
            }
            names.insert(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    for required in ["gateway.toml", "redis.toml"] {
        assert!(
            names.contains(required),
            "config/{required} is missing: {names:?}"
        );
    }
}

#[test]
fn gateway_toml_spells_out_the_defaults() {
    let c = load("gateway.toml");
    // Every value in the file is the default, and its iCloud profile is the built-in one.
    assert_eq!(c, Config::default());
    assert_eq!(c.store.backend, StoreBackend::Memory);
    assert_eq!(c.upstream.url.as_str(), "https://api.us.nylas.com/");
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.server.admin_token, None);
    assert_eq!(c.server.max_json_body, 4 * 1024 * 1024);
    assert_eq!(c.domains.profile, None);

    let icloud = c.default_profile();
    assert_eq!(Some(icloud), Profile::builtin("icloud").as_ref());
    assert_eq!(icloud.max_recipients_per_message().unwrap().get(), 500);
    assert_eq!(icloud.max_message_size().unwrap().get(), 20_000_000);
    let [day] = icloud.windows() else {
        panic!("{icloud:?}")
    };
    assert_eq!(day.label(), "24h");
    assert_eq!(day.limit(Metric::Messages).unwrap().get(), 1_000);
    assert_eq!(day.limit(Metric::Recipients).unwrap().get(), 1_000);
    assert_eq!(day.limit(Metric::Bytes), None);
}

#[test]
fn redis_toml_shares_counters_in_redis() {
    let c = load("redis.toml");
    assert_eq!(c.store.backend, StoreBackend::Redis);
    assert_eq!(c.store.on_unavailable, OnUnavailable::Reject);
    let redis = c.redis();
    assert_eq!(redis.url, "redis://127.0.0.1:6379");
    assert_eq!(redis.key_prefix, "sendgw");
    assert_eq!(redis.timeout, Duration::from_millis(250));
    assert_eq!(c.default_profile(), load("gateway.toml").default_profile());
    // Apart from the store, the same as the defaults.
    let mut same = c.clone();
    same.store.backend = StoreBackend::Memory;
    assert_eq!(same, Config::default());
}

/// Every key written in `gateway.toml` is described in `docs/configuration.md`.
#[test]
fn documentation_covers_every_key_of_gateway_toml() {
    let docs = std::fs::read_to_string(workspace().join("docs/configuration.md")).unwrap();
    let text = std::fs::read_to_string(config_dir().join("gateway.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut keys = Vec::new();
    collect_keys(&toml::Value::Table(table), "", &mut keys);
    assert!(keys.len() > 20, "{keys:?}");
    for key in keys {
        assert!(docs.contains(&key), "docs/configuration.md lacks {key}");
    }
    assert!(docs.contains("64"), "the exit code is documented");
}

/// Every key `check-config` prints (the whole effective configuration) is documented too.
#[test]
fn documentation_covers_every_key_of_the_effective_configuration() {
    let docs = std::fs::read_to_string(workspace().join("docs/configuration.md")).unwrap();
    let table: toml::Table = toml::from_str(&Config::default().to_masked_toml()).unwrap();
    let mut keys = Vec::new();
    collect_keys(&toml::Value::Table(table), "", &mut keys);
    for key in keys {
        assert!(docs.contains(&key), "docs/configuration.md lacks {key}");
    }
}

/// Tables as their `[dotted.heading`, other keys as `` `key` ``.
fn collect_keys(value: &toml::Value, table: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let path = if table.is_empty() {
                    k.clone()
                } else {
                    format!("{table}.{k}")
                };
                match v {
                    // Profile names are free; their keys are documented.
                    toml::Value::Table(_) if table != "profiles" => out.push(format!("[{path}")),
                    toml::Value::Table(_) => {}
                    _ => out.push(format!("`{k}`")),
                }
                collect_keys(v, &path, out);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| collect_keys(v, table, out)),
        _ => {}
    }
}
