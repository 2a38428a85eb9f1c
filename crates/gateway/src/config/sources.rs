//! Where a configuration comes from: the file, the environment and command-line overrides.
//!
//! # Assignments, not figment layers
//! Figment merges tables key by key but replaces arrays whole, so a layer could not set one
//! window's limit (`SEND_GATEWAY__PROFILES__ICLOUD__WINDOWS__0__MESSAGES=500`) without
//! restating the whole window. Each variable or override is instead one assignment to one key
//! of the file's tree, applied in order of precedence (environment, then flags), so the last
//! one wins. A key inside a built-in profile the file does not write starts from the
//! built-in, so overriding one limit keeps the others.
//!
//! # Typing values
//! A variable's value is text. It is read as a TOML integer or boolean when it looks like one;
//! if the key turns out to want a string (an admin token `1234`), it is read again as the
//! string it was. So `resolve_provider=true` and `messages=5` work and a URL or `24h` stays a
//! string, without a second list of every key's type to keep in step with the serde structs.

use std::fmt;
use std::path::PathBuf;

use figment::Figment;
use figment::error::{Actual, Kind};
use limits::Profile;

use super::error::{TomlLayer, figment_error, key_segment, read_toml_file};
use super::profiles::profile_table;
use super::validate::Document;
use super::{Config, ConfigError};

/// Prefix of the environment variables that set keys: `SEND_GATEWAY__<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "SEND_GATEWAY__";

/// Where a configuration comes from, in increasing precedence: the defaults, `file`, `env`,
/// `overrides`. Cheap to keep: [`Sources::load`] reads them all again (the file included), so
/// a reload sees the new file under the same environment and flags.
///
/// # Examples
/// ```
/// use gateway::config::Sources;
/// let sources = Sources {
///     env: vec![("SEND_GATEWAY__STORE__TIMEOUT".into(), "1s".into())],
///     overrides: vec![("grants.resolve_provider".into(), "true".into())],
///     ..Sources::default()
/// };
/// let config = sources.load().unwrap();
/// assert_eq!(config.store.timeout, std::time::Duration::from_secs(1));
/// assert!(config.grants.resolve_provider);
///
/// let typo = Sources {
///     env: vec![("SEND_GATEWAY__STORE__URLL".into(), "redis://h".into())],
///     ..Sources::default()
/// };
/// let err = typo.load().unwrap_err();
/// assert_eq!(err.key(), "SEND_GATEWAY__STORE__URLL");
/// assert!(err.to_string().starts_with("SEND_GATEWAY__STORE__URLL: unknown key"));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables as `(name, value)`; names without the [`ENV_PREFIX`] (in any
    /// case) are ignored. `SEND_GATEWAY__STORE__URL` sets `store.url`; names are
    /// case-insensitive and `__` separates levels; a window is addressed by its index
    /// (`SEND_GATEWAY__PROFILES__X__WINDOWS__0__MESSAGES`). Any variable, prefixed or
    /// not, can be named by a client's `token_env`.
    pub env: Vec<(String, String)>,
    /// Command-line overrides as `(dotted key, value)`: `("store.url", "redis://h")`,
    /// `("profiles.x.windows[0].messages", "5")`. Applied in order, after the environment.
    pub overrides: Vec<(String, String)>,
}

impl fmt::Debug for Sources {
    /// Names only: values may be secrets (`SEND_GATEWAY__SERVER__ADMIN_TOKEN`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        let overrides: Vec<&str> = self.overrides.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Sources")
            .field("file", &self.file)
            .field("env", &env)
            .field("overrides", &overrides)
            .finish()
    }
}

impl Sources {
    /// The file and overrides given, with the process's environment: its
    /// `SEND_GATEWAY__*` variables set keys, and any variable may hold a client's token
    /// (`[[clients]] token_env`). Read once: a running process's environment does not
    /// change, so a reload reads the same values.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<(String, String)>) -> Sources {
        let env = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Sources {
            file,
            env,
            overrides,
        }
    }

    /// Reads the file, applies the environment and the overrides, and validates the result.
    ///
    /// # Errors
    /// As [`Config::from_toml_str`]. A bad value or unknown key that came from a variable is
    /// named by the variable (`SEND_GATEWAY__STORE__TIMEOUT: invalid duration "x"`); one
    /// that came from an override, by its dotted key.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let base = match &self.file {
            Some(path) => read_toml_file(path)?,
            None => toml::Table::new(),
        };
        let mut env = Vec::new();
        for (name, value) in self.env.iter().filter(|(name, _)| has_prefix(name)) {
            env.push(Assignment::from_env(name, value)?);
        }
        // The process environment has no order: sort by key, windows by number, so that
        // `..__WINDOWS__0__..` exists before `..__WINDOWS__1__..` is added after it.
        env.sort_by_cached_key(|a| {
            a.path
                .iter()
                .map(|s| (s.parse::<u64>().ok(), s.clone()))
                .collect::<Vec<_>>()
        });
        let mut assignments = env;
        for (key, value) in &self.overrides {
            assignments.push(Assignment::from_flag(key, value)?);
        }
        resolve(base, &assignments)?.resolve_client_tokens(&self.env)
    }
}

fn has_prefix(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
}

/// One key set from outside the file.
#[derive(Debug, Clone)]
pub(super) struct Assignment {
    /// The variable that set it; `None` for a command-line override, whose dotted key
    /// already names it.
    variable: Option<String>,
    path: Vec<String>,
    value: String,
}

impl Assignment {
    fn from_env(name: &str, value: &str) -> Result<Self, ConfigError> {
        let rest = &name[ENV_PREFIX.len()..];
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                name,
                format!(
                    "not a configuration key: write {ENV_PREFIX}<SECTION>__<KEY>, \
                     e.g. {ENV_PREFIX}STORE__URL"
                ),
            ));
        }
        Ok(Assignment {
            variable: Some(name.to_owned()),
            path,
            value: value.to_owned(),
        })
    }

    fn from_flag(key: &str, value: &str) -> Result<Self, ConfigError> {
        let path = parse_key_path(key).ok_or_else(|| {
            ConfigError::new(
                key,
                "not a key such as store.url or profiles.x.windows[0].messages",
            )
        })?;
        Ok(Assignment {
            variable: None,
            path,
            value: value.to_owned(),
        })
    }

    /// Sets the key in `tree` and returns it as a dotted path the way errors write it.
    fn apply(&self, tree: &mut toml::Value, as_text: bool) -> Result<String, ConfigError> {
        let value = if as_text {
            toml::Value::String(self.value.clone())
        } else {
            scalar(&self.value)
        };
        let mut key = String::new();
        assign(tree, &self.path, value, &mut key)
            .map_err(|m| self.blame(ConfigError::new(&key, m)))?;
        Ok(key)
    }

    /// Names the variable, when there is one, in place of the key.
    fn blame(&self, err: ConfigError) -> ConfigError {
        match &self.variable {
            Some(name) => err.blame(name),
            None => err,
        }
    }
}

/// `profiles.x.windows[0].messages` (or `profiles.x.windows.0.messages`) -> its segments.
fn parse_key_path(key: &str) -> Option<Vec<String>> {
    let mut path = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if name.is_empty() {
            return None;
        }
        path.push(name.to_owned());
        while !rest.is_empty() {
            let (index, after) = rest.strip_prefix('[')?.split_once(']')?;
            index.parse::<usize>().ok()?;
            path.push(index.to_owned());
            rest = after;
        }
    }
    Some(path)
}

/// A value as TOML would read it unquoted, for integers and booleans only.
fn scalar(text: &str) -> toml::Value {
    match text {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => text.parse::<i64>().map_or_else(
            |_| toml::Value::String(text.to_owned()),
            toml::Value::Integer,
        ),
    }
}

/// Sets `path` under `node` to `value`, creating tables on the way (and appending one entry
/// to an array when the index is its length); `key` collects the dotted path so far.
fn assign(
    node: &mut toml::Value,
    path: &[String],
    value: toml::Value,
    key: &mut String,
) -> Result<(), String> {
    let Some((segment, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    // What a missing key on the way starts as: an array when it is indexed next.
    let empty = || match rest.first() {
        Some(next) if next.parse::<usize>().is_ok() => toml::Value::Array(Vec::new()),
        _ => toml::Value::Table(toml::Table::new()),
    };
    let child = match node {
        toml::Value::Table(table) => {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&key_segment(segment));
            table.entry(segment.clone()).or_insert_with(empty)
        }
        toml::Value::Array(array) => {
            let len = array.len();
            let index = segment
                .parse::<usize>()
                .ok()
                .filter(|&i| i <= len)
                .ok_or_else(|| {
                    format!(
                        "{key} has {len} entries: set [0] to [{}] ([{len}] adds one), not [{segment}]",
                        len.saturating_sub(1)
                    )
                })?;
            key.push_str(&format!("[{index}]"));
            if index == len {
                array.push(empty());
            }
            &mut array[index]
        }
        _ => {
            return Err(format!(
                "{key} is not a table, so it has no key {segment:?}"
            ));
        }
    };
    assign(child, rest, value, key)
}

/// A built-in profile the file does not write, as a table, for each assignment that sets a
/// key inside it: overriding one limit keeps the others instead of replacing the profile.
fn seed_builtins(base: &mut toml::Table, assignments: &[Assignment]) {
    for a in assignments {
        let [section, name, _, ..] = a.path.as_slice() else {
            continue;
        };
        if section != "profiles" {
            continue;
        }
        let Some(profile) = Profile::builtin(name) else {
            continue;
        };
        let profiles = base
            .entry("profiles")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(profiles) = profiles
            && !profiles.contains_key(name)
        {
            profiles.insert(name.clone(), toml::Value::Table(profile_table(&profile)));
        }
    }
}

/// Applies `assignments` to the file's tree, then extracts and validates it.
pub(super) fn resolve(
    mut base: toml::Table,
    assignments: &[Assignment],
) -> Result<Config, ConfigError> {
    seed_builtins(&mut base, assignments);
    let base = toml::Value::Table(base);
    // Which assignments are read as strings although they look like numbers or booleans.
    let mut as_text = vec![false; assignments.len()];
    loop {
        let mut tree = base.clone();
        let mut keys = Vec::with_capacity(assignments.len());
        for (a, &text) in assignments.iter().zip(&as_text) {
            keys.push(a.apply(&mut tree, text)?);
        }
        let figment = Figment::from(TomlLayer::new(&tree)?);
        // Blames an error on the assignment that gave its key the final value (the last one
        // to set it), else on the last one that set a key inside it (and so made it a
        // table), naming the key in the message then.
        let blame = |err: ConfigError, retry: bool, as_text: &mut [bool]| {
            if let Some(i) = keys.iter().rposition(|k| k == err.key()) {
                if retry && !as_text[i] {
                    as_text[i] = true;
                    return None;
                }
                return Some(assignments[i].blame(err));
            }
            let inside = |k: &String| {
                k.strip_prefix(err.key())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
            };
            Some(match keys.iter().rposition(inside) {
                Some(i) => {
                    let message = format!("{}: {}", err.key(), err.message());
                    assignments[i].blame(ConfigError::new(err.key(), message))
                }
                None => err,
            })
        };
        let doc: Document = match figment.extract() {
            Ok(doc) => doc,
            Err(e) => {
                let typed = matches!(
                    &e.kind,
                    Kind::InvalidType(Actual::Bool(_) | Actual::Signed(_) | Actual::Unsigned(_), _)
                );
                match blame(figment_error(&figment, e), typed, &mut as_text) {
                    Some(err) => return Err(err),
                    // Read that value as text and try again.
                    None => continue,
                }
            }
        };
        return Config::from_document(doc)
            .map_err(|e| blame(e, false, &mut as_text).expect("no retry was asked for"));
    }
}
