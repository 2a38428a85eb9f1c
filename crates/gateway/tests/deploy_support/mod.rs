//! Shared by the `deploy_*` suites, which check every deployment file under `deploy/`
//! against the real binary: reading the files, running `send-gateway check-config` on what a
//! file configures, the image `deploy/Dockerfile` builds, and the metric names the gateway
//! registers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use gateway::config::StoreBackend;
use serde::Deserialize;
use serde_json::Value;

/// The binary the deployment files run.
pub const BIN: &str = env!("CARGO_BIN_EXE_send-gateway");

/// `check-config`'s exit status for a bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Environment variables a gateway container may set besides `SEND_GATEWAY__*` keys.
pub const OTHER_ENV: &[&str] = &["SEND_GATEWAY_CONFIG", "RUST_LOG", "RUST_BACKTRACE"];

// ---------------------------------------------------------------------------------------
// Paths and file reading

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

pub fn deploy_dir() -> PathBuf {
    workspace().join("deploy")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML stream, nulls (empty documents) left out.
pub fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn yaml(text: &str, what: &str) -> Value {
    let mut docs = yaml_docs(text, what);
    assert_eq!(docs.len(), 1, "{what}: expected one YAML document");
    docs.remove(0)
}

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

pub fn arr_at<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// Collects failures so that one run reports all of them.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    pub fn push(&mut self, what: String) {
        self.0.push(what);
    }

    pub fn assert_none(self, context: &str) {
        assert!(
            self.0.is_empty(),
            "{context}: {} problem(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// The binary

/// Runs `send-gateway ARGS... check-config` with exactly `env` as its `SEND_GATEWAY*`
/// environment (whatever the test process has is removed).
pub fn check_config(args: &[String], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("check-config");
    for name in testkit::process::vars_with_prefix("SEND_GATEWAY") {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("run send-gateway check-config")
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}, stderr: {}, stdout: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

/// The checks below set manifests' variables on `check-config` and expect an unknown key to
/// fail. That proves something only if the binary reads `SEND_GATEWAY__*` at all.
pub fn assert_env_layer_is_live() {
    let bogus = vec![(
        "SEND_GATEWAY__SERVER__NO_SUCH_KEY".to_owned(),
        "1".to_owned(),
    )];
    let out = check_config(&[], &bogus);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "send-gateway check-config accepted SEND_GATEWAY__SERVER__NO_SUCH_KEY, so it does not \
         read SEND_GATEWAY__* variables and the manifests' environment cannot be checked \
         ({})",
        describe(&out)
    );
    let bad_value = vec![(
        "SEND_GATEWAY__SERVER__SHUTDOWN_GRACE".to_owned(),
        "soon".to_owned(),
    )];
    let out = check_config(&[], &bad_value);
    assert_eq!(
        out.status.code(),
        Some(EXIT_CONFIG),
        "send-gateway check-config accepted SEND_GATEWAY__SERVER__SHUTDOWN_GRACE=soon ({})",
        describe(&out)
    );
}

/// What the deploy files depend on, as `check-config` printed it: the effective
/// configuration (defaults, file, environment, flags) as TOML, secrets masked.
#[derive(Debug)]
pub struct Effective {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown_grace: Duration,
    pub backend: StoreBackend,
    pub store_url: String,
    pub upstream: String,
}

pub fn effective(out: &Output) -> Result<Effective, String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("check-config did not print the configuration as TOML: {e}"))?;
    let get = |section: &str, key: &str| {
        table
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .ok_or_else(|| format!("check-config printed no {section}.{key}"))
    };
    let addr = |key: &str| -> Result<SocketAddr, String> {
        let v = get("server", key)?;
        v.parse().map_err(|e| format!("server.{key} {v:?}: {e}"))
    };
    let grace = get("server", "shutdown_grace")?;
    Ok(Effective {
        listen: addr("listen")?,
        admin: addr("admin_listen")?,
        shutdown_grace: humantime::parse_duration(grace)
            .map_err(|e| format!("server.shutdown_grace {grace:?}: {e}"))?,
        backend: match get("store", "backend")? {
            "memory" => StoreBackend::Memory,
            "redis" => StoreBackend::Redis,
            other => return Err(format!("store.backend {other:?}")),
        },
        store_url: get("store", "url")?.to_owned(),
        upstream: get("upstream", "url")?.to_owned(),
    })
}

/// The value of `--config` (or `-c`) in `args`, and its index (of the value).
pub fn config_arg(args: &[String]) -> Option<(usize, String)> {
    for (i, arg) in args.iter().enumerate() {
        if (arg == "--config" || arg == "-c") && i + 1 < args.len() {
            return Some((i + 1, args[i + 1].clone()));
        }
        if let Some(v) = arg.strip_prefix("--config=") {
            return Some((i, v.to_owned()));
        }
    }
    None
}

/// `args` with the config path at `index` replaced by `path`.
pub fn with_config_path(args: &[String], index: usize, path: &Path) -> Vec<String> {
    let mut out = args.to_vec();
    let p = path.display().to_string();
    out[index] = if out[index].starts_with("--config=") {
        format!("--config={p}")
    } else {
        p
    };
    out
}

/// `host` and `port` of `scheme://[user@]host:port/...`.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let hostport = authority.rsplit('@').next()?;
    let (host, port) = hostport.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

/// Parses a Kubernetes memory quantity ("128Mi", "1G", "67108864").
pub fn quantity_bytes(q: &str) -> Option<u64> {
    const UNITS: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * mult);
        }
    }
    q.parse().ok()
}

// ---------------------------------------------------------------------------------------
// The image

/// What the final stage of `deploy/Dockerfile` gives a container.
#[derive(Debug)]
pub struct Image {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub expose: BTreeSet<u16>,
    pub user: String,
    /// Where `COPY config/*.toml DIR` puts the shipped configuration.
    pub config_dir: String,
    /// Every instruction of every stage, continuation lines joined.
    pub all: Vec<(String, String)>,
}

pub fn dockerfile() -> Image {
    let text = read(&deploy_dir().join("Dockerfile"));
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            lines.push(std::mem::take(&mut current));
        }
    }
    let all: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (op.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let last_from = all
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .expect("Dockerfile has a FROM");
    let fin = &all[last_from..];
    let json_array = |op: &str| -> Vec<String> {
        let (_, rest) = fin
            .iter()
            .rev()
            .find(|(o, _)| o == op)
            .unwrap_or_else(|| panic!("deploy/Dockerfile: the final stage has no {op}"));
        let v: Vec<String> = serde_json::from_str(rest).unwrap_or_else(|e| {
            panic!("deploy/Dockerfile: {op} must be a JSON array (exec form): {e}")
        });
        v
    };
    let mut env = Vec::new();
    for (_, rest) in fin.iter().filter(|(o, _)| o == "ENV") {
        for pair in rest.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("deploy/Dockerfile: use ENV KEY=VALUE, not {rest:?}"));
            env.push((k.to_owned(), v.trim_matches('"').to_owned()));
        }
    }
    let expose = fin
        .iter()
        .filter(|(o, _)| o == "EXPOSE")
        .flat_map(|(_, rest)| rest.split_whitespace())
        .map(|p| {
            p.trim_end_matches("/tcp")
                .parse()
                .unwrap_or_else(|_| panic!("deploy/Dockerfile: EXPOSE {p}"))
        })
        .collect();
    let user = fin
        .iter()
        .rev()
        .find(|(o, _)| o == "USER")
        .map(|(_, r)| r.clone())
        .unwrap_or_default();
    let config_dir = fin
        .iter()
        .filter(|(o, _)| o == "COPY")
        .find_map(|(_, rest)| {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            (parts.len() == 2 && parts[0] == "config/*.toml").then(|| parts[1].to_owned())
        })
        .expect("deploy/Dockerfile: the final stage copies config/*.toml into the image");
    let entrypoint = json_array("ENTRYPOINT");
    let cmd = json_array("CMD");
    Image {
        entrypoint,
        cmd,
        env,
        expose,
        user,
        config_dir: config_dir.trim_end_matches('/').to_owned(),
        all,
    }
}

impl Image {
    /// The repository file the image has at `path`, if the image ships it.
    pub fn shipped_file(&self, path: &str) -> Option<PathBuf> {
        let name = path.strip_prefix(&format!("{}/", self.config_dir))?;
        let file = workspace().join("config").join(name);
        (name.ends_with(".toml") && !name.contains('/') && file.is_file()).then_some(file)
    }
}

/// The image's `ENV`, with `SEND_GATEWAY_CONFIG` pointing at the repository's copy of the
/// file (for `docker run IMAGE check-config`, where nothing is mounted over it).
pub fn image_env(image: &Image) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
    resolve_config_env(&mut env, &[], |path| {
        image
            .shipped_file(path)
            .ok_or_else(|| format!("{path} is not shipped"))
    })
    .unwrap_or_else(|e| panic!("deploy/Dockerfile: ENV SEND_GATEWAY_CONFIG: {e}"));
    env.into_iter().collect()
}

/// `SEND_GATEWAY_CONFIG` names the file only when `--config` is absent (clap: the flag
/// wins). Then it is replaced by the local copy `resolve` gives; otherwise dropped, since the
/// binary never reads it.
pub fn resolve_config_env(
    env: &mut BTreeMap<String, String>,
    args: &[String],
    resolve: impl Fn(&str) -> Result<PathBuf, String>,
) -> Result<(), String> {
    if config_arg(args).is_some() {
        env.remove("SEND_GATEWAY_CONFIG");
        return Ok(());
    }
    if let Some(path) = env.get("SEND_GATEWAY_CONFIG").cloned() {
        let local = resolve(&path)?;
        env.insert("SEND_GATEWAY_CONFIG".into(), local.display().to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Metric names

/// A metric family's type, as its `# TYPE` line gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Unknown,
}

/// The exposition of the gateway's metrics registry with a sample in every family
/// ([`gateway::metrics::Metrics::with_every_family`]), as `/metrics` would serve it.
///
/// # Panics
/// When the registry holds a family that has no sample there (its `Debug` lists one
/// `Descriptor` per registered metric), since such a family would be missing from the text.
pub fn registry_text() -> String {
    let metrics = gateway::metrics::Metrics::with_every_family();
    let text = metrics.render();
    let registered = format!("{metrics:?}").matches("Descriptor {").count();
    // The standard `process_*` families come from a collector, which has no descriptor.
    let described = text
        .lines()
        .filter(|l| l.starts_with("# TYPE sendgw_"))
        .count();
    assert!(
        registered > 0 && described == registered,
        "the registry holds {registered} metric families but Metrics::with_every_family() \
         renders {described}: give every family a sample there\n{text}"
    );
    text
}

/// `(family name, type)` of every `sendgw_` metric the gateway registers (not the standard
/// `process_*` ones), from the `# TYPE` lines of
/// [`registry_text`]. The family name is the exposed base name: the registry's prefix and
/// the metric's name (and unit), without the `_total`, `_bucket`, ... of its samples.
pub fn registered_metrics() -> Vec<(String, MetricType)> {
    registry_text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter(|rest| rest.starts_with("sendgw_"))
        .map(|rest| {
            let (name, ty) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("a `# TYPE NAME TYPE` line: {rest:?}"));
            let ty = match ty.trim() {
                "counter" => MetricType::Counter,
                "gauge" => MetricType::Gauge,
                "histogram" => MetricType::Histogram,
                _ => MetricType::Unknown,
            };
            (name.to_owned(), ty)
        })
        .collect()
}

/// Every name a sample of [`registry_text`] is exposed under (`sendgw_decisions_total`,
/// `sendgw_store_duration_seconds_bucket`, ...).
pub fn exposed_names() -> BTreeSet<String> {
    registry_text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `sendgw_...` token in `text`.
pub fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("sendgw_") {
        let start = i + at;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}
