//! What goes wrong, and where: [`ConfigError`], and the reading of TOML text and of
//! figment's errors into `<dotted key>: <one-line message>`.

use std::path::Path;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile as FigmentProfile, Provider};
use limits::PolicyError;

/// A configuration that cannot be used, naming the key at fault.
///
/// Prints as one line, `<key>: <message>`, e.g.
/// `profiles.icloud.windows[0].messages: must be greater than zero`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    key: String,
    message: String,
}

impl ConfigError {
    /// Exit status of `send-gateway` on a bad configuration (`EX_USAGE` from sysexits.h).
    pub const EXIT_CODE: i32 = 64;

    pub(super) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            // One line, whatever a dependency put in its message.
            message: message.into().replace(['\r', '\n'], " "),
        }
    }

    /// The dotted path of the key at fault (`store.timeout`, `profiles.x.windows[0].period`);
    /// for an unreadable file or a TOML syntax error, the file (or `toml`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same problem, blamed on `origin` (the environment variable that set the key).
    pub(super) fn blame(self, origin: &str) -> Self {
        ConfigError {
            key: origin.to_owned(),
            message: self.message,
        }
    }
}

impl From<PolicyError> for ConfigError {
    fn from(err: PolicyError) -> Self {
        let field = err.field().to_owned();
        let text = err.to_string();
        let message = text
            .strip_prefix(&format!("{field}: "))
            .unwrap_or(&text)
            .to_owned();
        ConfigError::new(field, message)
    }
}

/// Reads a TOML file; an unreadable file or a syntax error names the file.
pub(super) fn read_toml_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&name, format!("cannot read the file: {e}")))?;
    parse_toml(&text, &name)
}

/// Parses with the `toml` crate, whose errors have a position; `source` names the text.
pub(super) fn parse_toml(text: &str, source: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let (line, column) = line_column(text, span.start);
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        ConfigError::new(source, format!("{at}{}", e.message().trim()))
    })
}

/// One TOML tree as a figment provider.
#[derive(Debug)]
pub(super) struct TomlLayer {
    dict: Dict,
}

impl TomlLayer {
    pub(super) fn new(tree: &toml::Value) -> Result<Self, ConfigError> {
        let dict = Value::serialize(tree)
            .ok()
            .and_then(Value::into_dict)
            .ok_or_else(|| ConfigError::new("toml", "not a TOML table"))?;
        Ok(TomlLayer { dict })
    }
}

impl Provider for TomlLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named("configuration")
    }

    fn data(&self) -> Result<Map<FigmentProfile, Dict>, figment::Error> {
        Ok(FigmentProfile::Default.collect(self.dict.clone()))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Turns figment's first error into `<dotted key>: <one-line message>`.
pub(super) fn figment_error(figment: &Figment, err: figment::Error) -> ConfigError {
    use figment::error::{Actual, Kind};

    let root = figment
        .data()
        .ok()
        .and_then(|mut m| m.remove(&FigmentProfile::Default));
    let mut path = err.path.clone();
    let message = match &err.kind {
        // Figment's path already ends with the unknown key itself.
        Kind::UnknownField(_, expected) => {
            format!("unknown key (expected one of: {})", expected.join(", "))
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            "missing; this key is required".to_owned()
        }
        Kind::UnknownVariant(found, expected) => {
            let expected: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
            format!(
                "unknown value {found:?} (expected one of: {})",
                expected.join(", ")
            )
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let actual = match actual {
                Actual::Map => "a table".to_owned(),
                Actual::Seq => "an array".to_owned(),
                Actual::Signed(n) => format!("the integer {n}"),
                Actual::Unsigned(n) => format!("the integer {n}"),
                Actual::Float(n) => format!("the float {n}"),
                Actual::Bool(b) => format!("the boolean {b}"),
                Actual::Str(s) => format!("the string {s:?}"),
                other => other.to_string(),
            };
            format!("expected {}, found {actual}", describe_expected(expected))
        }
        Kind::Message(message) => message.clone(),
        other => other.to_string(),
    };
    ConfigError::new(render_path(root.as_ref(), &path), message)
}

/// Serde's names for what was expected, in the words of the file.
fn describe_expected(expected: &str) -> String {
    match expected {
        "u64" | "usize" => "a non-negative integer".to_owned(),
        "u32" => "an integer from 0 to 4294967295".to_owned(),
        "a string" | "a borrowed string" => "a string".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" => "a table".to_owned(),
        e if e.starts_with("struct ") => "a table".to_owned(),
        e => e.to_owned(),
    }
}

/// `["profiles", "x", "windows", "0", "messages"]` -> `profiles.x.windows[0].messages`:
/// a segment is an index when the value it indexes (in the merged tree) is an array.
fn render_path(root: Option<&Dict>, path: &[String]) -> String {
    let mut out = String::new();
    let mut node: Option<&Value> = None;
    for (i, segment) in path.iter().enumerate() {
        let parent_is_array = matches!(node, Some(Value::Array(..)));
        if parent_is_array {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&key_segment(segment));
        }
        node = match (i, node) {
            (0, _) => root.and_then(|d| d.get(segment)),
            (_, Some(Value::Dict(_, d))) => d.get(segment),
            (_, Some(Value::Array(_, a))) => segment.parse::<usize>().ok().and_then(|n| a.get(n)),
            _ => None,
        };
    }
    out
}

/// A key as TOML would need it written: bare when it can be, quoted otherwise.
pub(super) fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}
