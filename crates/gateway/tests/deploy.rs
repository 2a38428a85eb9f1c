//! Every deployment file under `deploy/` against the real binary.
//!
//! - Each kustomize directory under `deploy/kubernetes/` is rendered with
//!   `kubectl kustomize` (kubectl must be installed; `.ci/run` installs it when missing).
//!   For every `send-gateway` container, the container's `args`, with the ConfigMap's file in
//!   place of the mounted path and the manifest's environment (Secret values taken from the
//!   directory's `secret.example.yaml`), must pass `send-gateway check-config`; the declared
//!   ports, probes, grace period, Services, PodDisruptionBudgets and autoscalers must match the
//!   configuration that run validated.
//! - `deploy/Dockerfile`'s default command and `deploy/compose.yaml`'s gateway pass
//!   `check-config` the same way, and their ports and service names line up.
//! - Every `sendgw_` metric name used anywhere under `deploy/` is one the gateway registers
//!   (read from `src/metrics.rs`), the dashboard shows every registered metric, and the alert
//!   rules are well formed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use gateway::config::StoreBackend;
use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_send-gateway");
/// `check-config`'s exit status for a bad configuration (`EX_USAGE`).
const EXIT_CONFIG: i32 = 64;
/// Environment variables a gateway container may set besides `SEND_GATEWAY__*` keys.
const OTHER_ENV: &[&str] = &["SEND_GATEWAY_CONFIG", "RUST_LOG", "RUST_BACKTRACE"];
/// Peak RSS relaying 8 concurrent 20 MB sends is about 40 MiB (BENCHMARKS.md).
const MIN_MEMORY_LIMIT: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Paths and file reading

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn deploy_dir() -> PathBuf {
    workspace().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML stream, nulls (empty documents) left out.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(text: &str, what: &str) -> Value {
    let mut docs = yaml_docs(text, what);
    assert_eq!(docs.len(), 1, "{what}: expected one YAML document");
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn arr_at<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// Collects failures so that one run reports all of them.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn push(&mut self, what: String) {
        self.0.push(what);
    }

    fn assert_none(self, context: &str) {
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
fn check_config(args: &[String], env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("check-config");
    for name in testkit::process::vars_with_prefix("SEND_GATEWAY") {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("run send-gateway check-config")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}, stderr: {}, stdout: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

/// The checks below set manifests' variables on `check-config` and expect an unknown key to
/// fail. That proves something only if the binary reads `SEND_GATEWAY__*` at all.
fn assert_env_layer_is_live() {
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
struct Effective {
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown_grace: Duration,
    backend: StoreBackend,
    store_url: String,
    upstream: String,
}

fn effective(out: &Output) -> Result<Effective, String> {
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
fn config_arg(args: &[String]) -> Option<(usize, String)> {
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
fn with_config_path(args: &[String], index: usize, path: &Path) -> Vec<String> {
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
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let hostport = authority.rsplit('@').next()?;
    let (host, port) = hostport.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// The image

/// What the final stage of `deploy/Dockerfile` gives a container.
#[derive(Debug)]
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    expose: BTreeSet<u16>,
    user: String,
    /// Where `COPY config/*.toml DIR` puts the shipped configuration.
    config_dir: String,
    /// Every instruction of every stage, continuation lines joined.
    all: Vec<(String, String)>,
}

fn dockerfile() -> Image {
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
    fn shipped_file(&self, path: &str) -> Option<PathBuf> {
        let name = path.strip_prefix(&format!("{}/", self.config_dir))?;
        let file = workspace().join("config").join(name);
        (name.ends_with(".toml") && !name.contains('/') && file.is_file()).then_some(file)
    }
}

#[test]
fn dockerfile_runs_the_binary_with_valid_defaults() {
    let image = dockerfile();
    let mut p = Problems::default();

    let build = image
        .all
        .iter()
        .filter(|(o, _)| o == "RUN")
        .map(|(_, r)| r.as_str())
        .find(|r| r.contains("cargo build"))
        .expect("deploy/Dockerfile runs cargo build");
    for needle in ["--release", "--locked", "-p gateway", "-p fake-nylas"] {
        p.check(build.contains(needle), || {
            format!("the cargo build does not pass {needle}: {build}")
        });
    }
    let froms: Vec<&str> = image
        .all
        .iter()
        .filter(|(o, _)| o == "FROM")
        .map(|(_, r)| r.as_str())
        .collect();
    p.check(froms.len() >= 2, || {
        "the Dockerfile is not multi-stage".into()
    });
    p.check(froms[0].starts_with("rust:1.95"), || {
        format!(
            "the builder is not rust:1.95 (rust-toolchain.toml): {}",
            froms[0]
        )
    });
    p.check(
        image.entrypoint.len() == 1 && image.entrypoint[0].ends_with("/send-gateway"),
        || {
            format!(
                "ENTRYPOINT is not the send-gateway binary: {:?}",
                image.entrypoint
            )
        },
    );
    p.check(
        !image.user.is_empty() && !["root", "0", "0:0"].contains(&image.user.as_str()),
        || format!("the image runs as root (USER {:?})", image.user),
    );
    p.check(
        image.user.split(':').all(|s| s.parse::<u32>().is_ok()),
        || {
            format!(
                "USER {} is not numeric, so Kubernetes' runAsNonRoot cannot verify it",
                image.user
            )
        },
    );

    // The default command, as `docker run IMAGE` runs it.
    let (index, path) = config_arg(&image.cmd).expect("CMD passes --config");
    let file = image
        .shipped_file(&path)
        .unwrap_or_else(|| panic!("CMD's --config {path} is not a file the image ships"));
    let args = with_config_path(&image.cmd, index, &file);
    let env = image_env(&image);
    let out = check_config(&args, &env);
    p.check(out.status.success(), || {
        format!(
            "`send-gateway {} check-config` fails: {}",
            image.cmd.join(" "),
            describe(&out)
        )
    });
    match effective(&out) {
        Ok(eff) => {
            for (what, addr) in [("proxy", eff.listen), ("admin", eff.admin)] {
                p.check(addr.ip().is_unspecified(), || {
                    format!("the image's {what} listener {addr} cannot be reached from outside the container")
                });
                p.check(image.expose.contains(&addr.port()), || {
                    format!("the image's {what} port {} is not EXPOSEd", addr.port())
                });
            }
        }
        Err(e) => p.push(format!("CMD's configuration: {e}")),
    }

    // `docker run IMAGE check-config`: the image's own SEND_GATEWAY_CONFIG.
    let out = check_config(&[], &env);
    p.check(out.status.success(), || {
        format!(
            "`send-gateway check-config` in the image fails: {}",
            describe(&out)
        )
    });
    p.assert_none("deploy/Dockerfile");
}

/// The image's `ENV`, with `SEND_GATEWAY_CONFIG` pointing at the repository's copy of the
/// file (for `docker run IMAGE check-config`, where nothing is mounted over it).
fn image_env(image: &Image) -> Vec<(String, String)> {
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
fn resolve_config_env(
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
// Kubernetes

fn kubectl() -> String {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let hint = "these tests render deploy/kubernetes/* with `kubectl kustomize`: install \
                kubectl (Debian: `apt-get install kubernetes-client`; `.ci/run` installs it \
                when missing) or point KUBECTL at one";
    match Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
    {
        Ok(out) if out.status.success() => kubectl,
        Ok(out) => panic!(
            "`{kubectl} version --client` failed ({}): {hint}",
            describe(&out)
        ),
        Err(e) => panic!("kubectl is not installed (`{kubectl}`: {e}): {hint}"),
    }
}

/// Every directory under `deploy/kubernetes` with a kustomization file.
fn kustomize_dirs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        if entries.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                n == "kustomization.yaml" || n == "kustomization.yml" || n == "Kustomization"
            })
        }) {
            out.push(dir.to_owned());
        }
        for p in entries.into_iter().filter(|p| p.is_dir()) {
            walk(&p, out);
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir().join("kubernetes"), &mut out);
    out
}

fn render(kubectl: &str, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        describe(&out)
    );
    yaml_docs(
        &String::from_utf8(out.stdout).expect("UTF-8 manifests"),
        &dir.display().to_string(),
    )
}

fn kind(v: &Value) -> &str {
    str_at(v, "/kind").unwrap_or("")
}

fn name(v: &Value) -> &str {
    str_at(v, "/metadata/name").unwrap_or("")
}

/// `(name, key) -> value` of the Secrets in the directory's YAML files that the
/// kustomization does not render (the examples).
fn example_secrets(dir: &Path) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read kustomize dir") {
        let path = entry.expect("entry").path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if !is_yaml || path.file_stem().is_some_and(|s| s == "kustomization") {
            continue;
        }
        for doc in yaml_docs(&read(&path), &path.display().to_string()) {
            if kind(&doc) != "Secret" {
                continue;
            }
            if let Some(data) = doc.get("stringData").and_then(Value::as_object) {
                for (k, v) in data {
                    let v = v.as_str().unwrap_or_default().to_owned();
                    out.insert((name(&doc).to_owned(), k.clone()), v);
                }
            }
        }
    }
    out
}

/// The pod template of a workload.
fn pod_template(workload: &Value) -> Option<&Value> {
    match kind(workload) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            workload.pointer("/spec/template")
        }
        "Pod" => Some(workload),
        _ => None,
    }
}

fn is_gateway_image(image: &str) -> bool {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next() == Some("send-gateway")
}

/// Parses a Kubernetes memory quantity ("128Mi", "1G", "67108864").
fn quantity_bytes(q: &str) -> Option<u64> {
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

/// Seconds a container's preStop hook holds it before SIGTERM (a `sleep` action, or an
/// exec of `sleep N`), and whether it is an exec hook.
fn pre_stop(container: &Value) -> (u64, bool) {
    let Some(hook) = container.pointer("/lifecycle/preStop") else {
        return (0, false);
    };
    if let Some(s) = hook.pointer("/sleep/seconds").and_then(Value::as_u64) {
        return (s, false);
    }
    let Some(cmd) = hook.pointer("/exec/command").and_then(Value::as_array) else {
        return (0, false);
    };
    let words = strings(cmd).join(" ");
    let secs = words
        .split("sleep ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or(0);
    (secs, true)
}

/// The number a probe's or Service's port names, in `containers`.
fn resolve_port(port: &Value, containers: &[&Value]) -> Option<u16> {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).ok();
    }
    let wanted = port.as_str()?;
    if let Ok(n) = wanted.parse() {
        return Some(n);
    }
    containers.iter().find_map(|c| {
        arr_at(c, "/ports").iter().find_map(|p| {
            (str_at(p, "/name") == Some(wanted))
                .then(|| p.get("containerPort").and_then(Value::as_u64))
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
        })
    })
}

fn selects(selector: Option<&Value>, labels: Option<&Value>) -> bool {
    let (Some(sel), Some(labels)) = (
        selector.and_then(Value::as_object),
        labels.and_then(Value::as_object),
    ) else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Writes the file a container sees at `path` into `tmp` and returns where, looking first at
/// the container's ConfigMap mounts, then at what the image ships.
fn container_file(
    path: &str,
    container: &Value,
    pod: &Value,
    config_maps: &BTreeMap<String, Value>,
    image: &Image,
    tmp: &Path,
) -> Result<PathBuf, String> {
    for mount in arr_at(container, "/volumeMounts") {
        let mount_path = str_at(mount, "/mountPath")
            .unwrap_or("")
            .trim_end_matches('/');
        let volume = str_at(mount, "/name").unwrap_or("");
        let key = match str_at(mount, "/subPath") {
            Some(sub) if path == mount_path => sub.to_owned(),
            Some(_) => continue,
            None => match path.strip_prefix(&format!("{mount_path}/")) {
                Some(rest) => rest.to_owned(),
                None => continue,
            },
        };
        let spec = arr_at(pod, "/spec/volumes")
            .iter()
            .find(|v| str_at(v, "/name") == Some(volume))
            .ok_or_else(|| format!("volumeMount {volume} has no volume"))?;
        let Some(cm_name) = str_at(spec, "/configMap/name") else {
            return Err(format!(
                "{path} is on volume {volume}, which is not a ConfigMap"
            ));
        };
        let cm = config_maps
            .get(cm_name)
            .ok_or_else(|| format!("ConfigMap {cm_name} (volume {volume}) is not rendered"))?;
        // `items` maps keys to other file names.
        let items = arr_at(spec, "/configMap/items");
        let data_key = if items.is_empty() {
            Some(key.clone())
        } else {
            items.iter().find_map(|i| {
                (str_at(i, "/path") == Some(key.as_str()))
                    .then(|| str_at(i, "/key").map(str::to_owned))
                    .flatten()
            })
        };
        let text = data_key
            .as_deref()
            .and_then(|k| str_at(cm, &format!("/data/{k}")))
            .ok_or_else(|| format!("{path}: ConfigMap {cm_name} has no key {key}"))?;
        let file = tmp.join(key.replace('/', "_"));
        std::fs::write(&file, text).map_err(|e| e.to_string())?;
        return Ok(file);
    }
    image
        .shipped_file(path)
        .ok_or_else(|| format!("{path} is neither mounted from a ConfigMap nor in the image"))
}

/// One rendered kustomize directory.
#[derive(Debug)]
struct Rendered {
    dir: PathBuf,
    docs: Vec<Value>,
    config_maps: BTreeMap<String, Value>,
    secrets: BTreeMap<(String, String), String>,
}

impl Rendered {
    fn load(kubectl: &str, dir: &Path) -> Rendered {
        let docs = render(kubectl, dir);
        let config_maps = docs
            .iter()
            .filter(|d| kind(d) == "ConfigMap")
            .map(|d| (name(d).to_owned(), d.clone()))
            .collect();
        Rendered {
            dir: dir.to_owned(),
            docs,
            config_maps,
            secrets: example_secrets(dir),
        }
    }

    fn of_kind<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| kind(d) == k)
    }
}

/// What one gateway container runs with, once checked.
#[derive(Debug)]
struct Checked {
    workload: String,
    effective: Effective,
    sidecar: bool,
}

/// Checks every gateway container of a rendered directory against the binary.
fn check_rendered(r: &Rendered, image: &Image, p: &mut Problems) -> Vec<Checked> {
    let mut checked = Vec::new();
    let mut found = 0;
    p.check(r.of_kind("Secret").next().is_none(), || {
        format!(
            "{} renders a Secret: keep secrets out of the repository (secret.example.yaml \
             is not a resource)",
            r.dir.display()
        )
    });
    for workload in &r.docs {
        let Some(template) = pod_template(workload) else {
            continue;
        };
        let wname = format!("{}/{}", kind(workload), name(workload));
        let regular: Vec<&Value> = arr_at(template, "/spec/containers").iter().collect();
        let init: Vec<&Value> = arr_at(template, "/spec/initContainers").iter().collect();
        let all: Vec<&Value> = regular.iter().chain(init.iter()).copied().collect();
        for (container, is_init) in regular
            .iter()
            .map(|c| (*c, false))
            .chain(init.iter().map(|c| (*c, true)))
        {
            if !str_at(container, "/image").is_some_and(is_gateway_image) {
                continue;
            }
            found += 1;
            let cname = format!(
                "{wname} container {}",
                str_at(container, "/name").unwrap_or("?")
            );
            let others: Vec<&Value> = all
                .iter()
                .filter(|c| !str_at(c, "/image").is_some_and(is_gateway_image))
                .copied()
                .collect();
            let sidecar = !others.is_empty();
            if is_init {
                p.check(
                    str_at(container, "/restartPolicy") == Some("Always"),
                    || {
                        format!(
                            "{cname}: an init container without restartPolicy: Always never \
                         finishes, so the pod never starts"
                        )
                    },
                );
            }
            if let Some(eff) = check_container(r, image, template, container, &others, &cname, p) {
                checked.push(Checked {
                    workload: wname.clone(),
                    effective: eff,
                    sidecar,
                });
            }
        }
    }
    p.check(found > 0, || {
        format!("{}: no send-gateway container", r.dir.display())
    });
    checked
}

fn check_container(
    r: &Rendered,
    image: &Image,
    pod: &Value,
    container: &Value,
    others: &[&Value],
    cname: &str,
    p: &mut Problems,
) -> Option<Effective> {
    let tmp = tempfile::tempdir().expect("temp dir");

    // The binary runs the image's entrypoint with `args`.
    if let Some(cmd) = container.get("command") {
        let cmd = strings(cmd.as_array().map_or(&[], Vec::as_slice));
        p.check(cmd.len() == 1 && cmd[0].ends_with("send-gateway"), || {
            format!("{cname}: `command` {cmd:?} replaces the send-gateway entrypoint")
        });
    }
    let args = strings(arr_at(container, "/args"));

    // The environment: the image's, then the container's.
    p.check(container.get("envFrom").is_none(), || {
        format!("{cname}: envFrom hides which keys are set; list the variables one by one")
    });
    let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
    for var in arr_at(container, "/env") {
        let Some(vname) = str_at(var, "/name") else {
            continue;
        };
        p.check(
            vname.to_ascii_uppercase().starts_with("SEND_GATEWAY__") || OTHER_ENV.contains(&vname),
            || format!("{cname}: send-gateway does not read the variable {vname}"),
        );
        let value = if let Some(v) = var.get("value") {
            v.as_str().unwrap_or_default().to_owned()
        } else if let Some(sk) = var.pointer("/valueFrom/secretKeyRef") {
            let (sname, key) = (
                str_at(sk, "/name").unwrap_or(""),
                str_at(sk, "/key").unwrap_or(""),
            );
            match r.secrets.get(&(sname.to_owned(), key.to_owned())) {
                Some(v) => v.clone(),
                None => {
                    p.push(format!(
                        "{cname}: {vname} reads key {key} of Secret {sname}, which no example \
                         Secret in {} documents",
                        r.dir.display()
                    ));
                    continue;
                }
            }
        } else if let Some(ck) = var.pointer("/valueFrom/configMapKeyRef") {
            let (cm, key) = (
                str_at(ck, "/name").unwrap_or(""),
                str_at(ck, "/key").unwrap_or(""),
            );
            match r
                .config_maps
                .get(cm)
                .and_then(|c| str_at(c, &format!("/data/{key}")))
            {
                Some(v) => v.to_owned(),
                None => {
                    p.push(format!(
                        "{cname}: {vname} reads missing ConfigMap key {cm}/{key}"
                    ));
                    continue;
                }
            }
        } else {
            p.push(format!(
                "{cname}: {vname} has no value this test can reproduce"
            ));
            continue;
        };
        env.insert(vname.to_owned(), value);
    }

    // The configuration file, from the ConfigMap mount (or the image).
    let resolve =
        |path: &str| container_file(path, container, pod, &r.config_maps, image, tmp.path());
    let mut run_args = args.clone();
    if let Some((index, path)) = config_arg(&args) {
        match resolve(&path) {
            Ok(local) => run_args = with_config_path(&args, index, &local),
            Err(e) => {
                p.push(format!("{cname}: --config {path}: {e}"));
                return None;
            }
        }
    }
    match resolve_config_env(&mut env, &args, resolve) {
        Ok(()) => {}
        Err(e) => {
            p.push(format!("{cname}: SEND_GATEWAY_CONFIG: {e}"));
            return None;
        }
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let out = check_config(&run_args, &env);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    if !out.status.success() {
        p.push(format!(
            "{cname}: `send-gateway {} check-config` with {names:?} set fails: {}",
            args.join(" "),
            describe(&out)
        ));
        return None;
    }
    let eff = match effective(&out) {
        Ok(e) => e,
        Err(e) => {
            p.push(format!("{cname}: {e}"));
            return None;
        }
    };

    // Ports: exactly the two listeners.
    let declared: BTreeSet<u16> = arr_at(container, "/ports")
        .iter()
        .filter_map(|port| port.get("containerPort").and_then(Value::as_u64))
        .filter_map(|n| u16::try_from(n).ok())
        .collect();
    let wanted: BTreeSet<u16> = [eff.listen.port(), eff.admin.port()].into();
    p.check(declared == wanted, || {
        format!(
            "{cname}: containerPorts {declared:?} differ from the listeners (proxy {}, admin {})",
            eff.listen, eff.admin
        )
    });
    // The kubelet probes the pod IP.
    p.check(eff.admin.ip().is_unspecified(), || {
        format!(
            "{cname}: admin_listen {} is not reachable by the kubelet's probes or Prometheus \
             (use 0.0.0.0:{})",
            eff.admin,
            eff.admin.port()
        )
    });

    // Probes on the admin listener.
    let me = [container];
    for (probe, path, required) in [
        ("livenessProbe", "/healthz", true),
        ("readinessProbe", "/readyz", true),
        ("startupProbe", "/healthz", false),
    ] {
        let Some(spec) = container.get(probe) else {
            p.check(!required, || format!("{cname}: no {probe}"));
            continue;
        };
        let got_path = str_at(spec, "/httpGet/path");
        p.check(got_path == Some(path), || {
            format!("{cname}: {probe} is not GET {path} (got {got_path:?})")
        });
        let port = spec
            .pointer("/httpGet/port")
            .and_then(|port| resolve_port(port, &me));
        p.check(port == Some(eff.admin.port()), || {
            format!(
                "{cname}: {probe} port {port:?} is not the admin port {}",
                eff.admin.port()
            )
        });
    }

    // Shutdown: the preStop hook, then shutdown_grace, within the grace period. A native
    // sidecar (init container, restartPolicy Always) is stopped only after the app
    // containers, so their preStop hooks come first.
    let (own, exec) = pre_stop(container);
    p.check(!exec, || {
        format!(
            "{cname}: an exec preStop hook cannot run in the distroless image (no shell, no \
             sleep binary): use `preStop: {{sleep: {{seconds: N}}}}`"
        )
    });
    let native_sidecar = str_at(container, "/restartPolicy") == Some("Always");
    let before = if native_sidecar {
        others.iter().map(|c| pre_stop(c).0).max().unwrap_or(0)
    } else {
        0
    };
    let grace = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let needed = eff.shutdown_grace.as_secs() + own + before;
    p.check(grace > needed, || {
        format!(
            "{cname}: terminationGracePeriodSeconds {grace} must exceed preStop {own}s + \
             earlier preStop {before}s + shutdown_grace {}s",
            eff.shutdown_grace.as_secs()
        )
    });

    // Security.
    let run_as_non_root = container
        .pointer("/securityContext/runAsNonRoot")
        .or_else(|| pod.pointer("/spec/securityContext/runAsNonRoot"))
        .and_then(Value::as_bool);
    p.check(run_as_non_root == Some(true), || {
        format!("{cname}: runAsNonRoot is not set")
    });
    for (ptr, want) in [
        ("/securityContext/allowPrivilegeEscalation", false),
        ("/securityContext/readOnlyRootFilesystem", true),
    ] {
        let got = container.pointer(ptr).and_then(Value::as_bool);
        p.check(got == Some(want), || {
            format!("{cname}: {ptr} is {got:?}, not {want}")
        });
    }
    let drops = strings(arr_at(container, "/securityContext/capabilities/drop"));
    p.check(drops.iter().any(|d| d == "ALL"), || {
        format!("{cname}: capabilities are not dropped (drop: [ALL])")
    });

    // Resources, sized from the benchmarks.
    for ptr in [
        "/resources/requests/cpu",
        "/resources/requests/memory",
        "/resources/limits/memory",
    ] {
        p.check(container.pointer(ptr).is_some(), || {
            format!("{cname}: no {ptr}")
        });
    }
    if let Some(limit) = str_at(container, "/resources/limits/memory") {
        let bytes = quantity_bytes(limit);
        p.check(bytes.is_some_and(|b| b >= MIN_MEMORY_LIMIT), || {
            format!(
                "{cname}: memory limit {limit} is under 64Mi (peak RSS relaying 8 concurrent \
                 20 MB sends is about 40 MiB)"
            )
        });
    }
    Some(eff)
}

/// Checks that hold for every workload: Services, PodDisruptionBudgets, autoscalers,
/// replica counts, and the layout (sidecar on loopback or shared proxy on every interface).
fn check_topology(r: &Rendered, checked: &[Checked], p: &mut Problems) {
    for c in checked {
        let workload = r
            .docs
            .iter()
            .find(|d| format!("{}/{}", kind(d), name(d)) == c.workload)
            .expect("checked workload is rendered");
        let template = pod_template(workload).expect("pod template");
        let labels = template.pointer("/metadata/labels");
        let containers: Vec<&Value> = arr_at(template, "/spec/containers")
            .iter()
            .chain(arr_at(template, "/spec/initContainers"))
            .collect();
        let services: Vec<&Value> = r
            .of_kind("Service")
            .filter(|s| selects(s.pointer("/spec/selector"), labels))
            .collect();
        let eff = &c.effective;
        let w = &c.workload;

        if c.sidecar {
            p.check(eff.listen.ip().is_loopback(), || {
                format!(
                    "{w}: the sidecar's proxy listens on {}, not loopback: only the pod's own \
                     containers should send through it",
                    eff.listen
                )
            });
        } else {
            p.check(eff.listen.ip().is_unspecified(), || {
                format!(
                    "{w}: the shared proxy listens on {}, which its Service cannot reach",
                    eff.listen
                )
            });
            p.check(
                services.iter().any(|s| {
                    arr_at(s, "/spec/ports").iter().any(|port| {
                        port.get("targetPort")
                            .and_then(|t| resolve_port(t, &containers))
                            == Some(eff.listen.port())
                    })
                }),
                || {
                    format!(
                        "{w}: no Service sends clients to the proxy port {}",
                        eff.listen.port()
                    )
                },
            );
        }
        for s in &services {
            for port in arr_at(s, "/spec/ports") {
                let target = port
                    .get("targetPort")
                    .or_else(|| port.get("port"))
                    .and_then(|t| resolve_port(t, &containers));
                p.check(
                    target == Some(eff.listen.port()) || target == Some(eff.admin.port()),
                    || {
                        format!(
                            "Service/{}: port {port} does not reach a gateway listener",
                            name(s)
                        )
                    },
                );
            }
        }
        // Prometheus scrape annotations point at the admin port.
        for holder in services.iter().copied().chain([template]) {
            if let Some(port) = str_at(holder, "/metadata/annotations/prometheus.io~1port") {
                p.check(port == eff.admin.port().to_string(), || {
                    format!("{w}: prometheus.io/port {port} is not the admin port")
                });
                let path = str_at(holder, "/metadata/annotations/prometheus.io~1path");
                p.check(path.is_none_or(|x| x == "/metrics"), || {
                    format!("{w}: prometheus.io/path {path:?} is not /metrics")
                });
            }
        }

        // Replicas. Memory counters are per process: only one pod may count.
        let hpas: Vec<&Value> = r
            .of_kind("HorizontalPodAutoscaler")
            .filter(|h| {
                str_at(h, "/spec/scaleTargetRef/kind") == Some(kind(workload))
                    && str_at(h, "/spec/scaleTargetRef/name") == Some(name(workload))
            })
            .collect();
        let replicas = workload
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        if eff.backend == StoreBackend::Memory {
            p.check(replicas <= 1 && hpas.is_empty(), || {
                format!(
                    "{w}: the memory store counts per pod, but {replicas} replicas (or an \
                     autoscaler) would each count separately: use backend = \"redis\""
                )
            });
            if kind(workload) == "Deployment" {
                let strategy = str_at(workload, "/spec/strategy/type");
                p.check(strategy == Some("Recreate"), || {
                    format!(
                        "{w}: with the memory store a rolling update runs two counting pods \
                         at once: use strategy Recreate"
                    )
                });
            }
        } else {
            p.check(
                eff.store_url.starts_with("redis://")
                    || eff.store_url.starts_with("rediss://")
                    || eff.store_url.starts_with("redis+cluster://"),
                || format!("{w}: store url is not a Redis URL"),
            );
        }
        for h in &hpas {
            let min = h.pointer("/spec/minReplicas").and_then(Value::as_u64);
            p.check(min.is_some_and(|m| m >= 2), || {
                format!(
                    "HorizontalPodAutoscaler/{}: minReplicas {min:?} under 2 leaves no \
                     replica while one drains",
                    name(h)
                )
            });
            p.check(str_at(h, "/apiVersion") == Some("autoscaling/v2"), || {
                format!("HorizontalPodAutoscaler/{}: use autoscaling/v2", name(h))
            });
        }
        for pdb in r.of_kind("PodDisruptionBudget") {
            p.check(
                selects(pdb.pointer("/spec/selector/matchLabels"), labels),
                || format!("PodDisruptionBudget/{} selects no gateway pod", name(pdb)),
            );
        }
    }
    for hpa in r.of_kind("HorizontalPodAutoscaler") {
        let target = (
            str_at(hpa, "/spec/scaleTargetRef/kind").unwrap_or(""),
            str_at(hpa, "/spec/scaleTargetRef/name").unwrap_or(""),
        );
        p.check(r.docs.iter().any(|d| (kind(d), name(d)) == target), || {
            format!(
                "HorizontalPodAutoscaler/{} scales a missing {target:?}",
                name(hpa)
            )
        });
    }
}

#[test]
fn every_kustomization_matches_the_binary() {
    let kubectl = kubectl();
    assert_env_layer_is_live();
    let image = dockerfile();
    let dirs = kustomize_dirs();
    let names: BTreeSet<String> = dirs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for required in ["sidecar", "standalone"] {
        assert!(
            names.contains(required),
            "deploy/kubernetes/{required} is missing: {names:?}"
        );
    }
    let mut p = Problems::default();
    for dir in &dirs {
        let r = Rendered::load(&kubectl, dir);
        let checked = check_rendered(&r, &image, &mut p);
        check_topology(&r, &checked, &mut p);
    }
    p.assert_none("deploy/kubernetes");
}

#[test]
fn sidecar_and_standalone_have_their_layouts() {
    let kubectl = kubectl();
    let image = dockerfile();
    let k8s = deploy_dir().join("kubernetes");

    let mut p = Problems::default();
    let sidecar = Rendered::load(&kubectl, &k8s.join("sidecar"));
    // Container problems are every_kustomization_matches_the_binary's to report.
    let checked = check_rendered(&sidecar, &image, &mut Problems::default());
    assert!(
        checked.iter().any(|c| c.sidecar),
        "deploy/kubernetes/sidecar has no app pod with a valid gateway beside it (see \
         every_kustomization_matches_the_binary)"
    );
    // The app reaches Nylas through the sidecar's loopback listener.
    let app_uses_proxy = sidecar.docs.iter().filter_map(pod_template).any(|t| {
        arr_at(t, "/spec/containers").iter().any(|c| {
            !str_at(c, "/image").is_some_and(is_gateway_image)
                && arr_at(c, "/env").iter().any(|e| {
                    str_at(e, "/value").is_some_and(|v| {
                        checked.iter().any(|g| {
                            host_port(v).is_some_and(|(h, port)| {
                                (h == "127.0.0.1" || h == "localhost")
                                    && port == g.effective.listen.port()
                            })
                        })
                    })
                })
        })
    });
    p.check(app_uses_proxy, || {
        "the sidecar example's app is not pointed at http://127.0.0.1:<proxy port>".into()
    });

    let standalone = Rendered::load(&kubectl, &k8s.join("standalone"));
    let checked = check_rendered(&standalone, &image, &mut Problems::default());
    p.check(checked.iter().all(|c| !c.sidecar), || {
        "deploy/kubernetes/standalone runs the gateway beside something else".into()
    });
    p.check(
        checked
            .iter()
            .all(|c| c.effective.backend == StoreBackend::Redis),
        || "the standalone gateway does not count in Redis".into(),
    );
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    ] {
        p.check(standalone.of_kind(k).next().is_some(), || {
            format!("deploy/kubernetes/standalone renders no {k}")
        });
    }
    // The Redis URL comes from a Secret, not from the ConfigMap.
    let url_from_secret = standalone.of_kind("Deployment").any(|d| {
        pod_template(d).is_some_and(|t| {
            arr_at(t, "/spec/containers").iter().any(|c| {
                arr_at(c, "/env").iter().any(|e| {
                    str_at(e, "/name") == Some("SEND_GATEWAY__STORE__URL")
                        && e.pointer("/valueFrom/secretKeyRef").is_some()
                })
            })
        })
    });
    p.check(url_from_secret, || {
        "the standalone Redis URL does not come from a Secret (SEND_GATEWAY__STORE__URL)".into()
    });
    for (name, pdb) in standalone
        .of_kind("PodDisruptionBudget")
        .map(|d| (name(d), d))
    {
        let min = pdb.pointer("/spec/minAvailable").and_then(Value::as_u64);
        p.check(min == Some(1), || {
            format!("PodDisruptionBudget/{name}: minAvailable {min:?}, expected 1")
        });
    }
    p.assert_none("layouts");
}

// ---------------------------------------------------------------------------------------
// Compose

fn compose_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => strings(a),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn compose_env(service: &Value) -> Vec<(String, String)> {
    match service.get("environment") {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Some(Value::Array(a)) => strings(a)
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Container ports a service publishes.
fn compose_published(service: &Value) -> BTreeSet<u16> {
    arr_at(service, "/ports")
        .iter()
        .filter_map(|port| match port {
            Value::String(s) => s
                .rsplit(':')
                .next()
                .and_then(|c| c.trim_end_matches("/tcp").parse().ok()),
            Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::Object(_) => port
                .get("target")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok()),
            _ => None,
        })
        .collect()
}

#[test]
fn compose_runs_the_gateway_against_redis_and_the_fake() {
    assert_env_layer_is_live();
    let image = dockerfile();
    let compose = yaml(
        &read(&deploy_dir().join("compose.yaml")),
        "deploy/compose.yaml",
    );
    let services = compose
        .get("services")
        .and_then(Value::as_object)
        .expect("compose.yaml has services");
    let mut p = Problems::default();
    for required in ["gateway", "redis", "fake-nylas"] {
        p.check(services.contains_key(required), || {
            format!("compose.yaml has no service {required}")
        });
    }
    p.assert_none("deploy/compose.yaml");
    let mut p = Problems::default();

    // Built from the repository root with deploy/Dockerfile.
    for (sname, s) in services {
        if let Some(build) = s.get("build") {
            let context = str_at(build, "/context").unwrap_or(".");
            let dockerfile = str_at(build, "/dockerfile").unwrap_or("Dockerfile");
            let root = deploy_dir().join(context).canonicalize().ok();
            p.check(root.as_deref() == Some(workspace().as_path()), || {
                format!("{sname}: build context {context} is not the repository root")
            });
            p.check(
                workspace().join(dockerfile).is_file() && dockerfile == "deploy/Dockerfile",
                || format!("{sname}: builds {dockerfile}, not deploy/Dockerfile"),
            );
        }
    }
    let redis = &services["redis"];
    p.check(
        str_at(redis, "/image").is_some_and(|i| i.starts_with("redis:7")),
        || "the redis service is not redis:7".into(),
    );

    // The fake Nylas: its own binary from the same image, on every interface.
    let fake = &services["fake-nylas"];
    let fake_entry = compose_list(fake.get("entrypoint"));
    p.check(
        fake_entry.len() == 1 && fake_entry[0].ends_with("/fake-nylas"),
        || format!("fake-nylas's entrypoint {fake_entry:?} is not the fake-nylas binary"),
    );
    let fake_cmd = compose_list(fake.get("command"));
    let fake_listen: Option<SocketAddr> = fake_cmd
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| fake_cmd.get(i + 1))
        .and_then(|a| a.parse().ok());
    p.check(fake_listen.is_some_and(|a| a.ip().is_unspecified()), || {
        format!("fake-nylas does not --listen on 0.0.0.0: {fake_cmd:?}")
    });

    // The gateway: the image's entrypoint with `command` as its arguments.
    let gw = &services["gateway"];
    p.check(gw.get("entrypoint").is_none(), || {
        "the gateway service replaces the image's entrypoint".into()
    });
    let args = compose_list(gw.get("command"));
    let args = if args.is_empty() {
        image.cmd.clone()
    } else {
        args
    };
    let mut env: BTreeMap<String, String> = image.env.iter().cloned().collect();
    for (k, v) in compose_env(gw) {
        p.check(
            k.to_ascii_uppercase().starts_with("SEND_GATEWAY__") || OTHER_ENV.contains(&k.as_str()),
            || format!("gateway: send-gateway does not read the variable {k}"),
        );
        env.insert(k, v);
    }
    // A bind mount of a repository file, or a file the image ships.
    let resolve = |path: &str| {
        arr_at(gw, "/volumes")
            .iter()
            .find_map(|v| {
                let mut parts = v.as_str()?.split(':');
                let (src, dst) = (parts.next()?, parts.next()?);
                (dst == path).then(|| deploy_dir().join(src))
            })
            .or_else(|| image.shipped_file(path))
            .ok_or_else(|| format!("{path} is neither mounted nor shipped"))
    };
    let mut run_args = args.clone();
    if let Some((index, path)) = config_arg(&args) {
        match resolve(&path) {
            Ok(local) => run_args = with_config_path(&args, index, &local),
            Err(e) => p.push(format!("gateway: --config {e}")),
        }
    }
    match resolve_config_env(&mut env, &args, resolve) {
        Ok(()) => {}
        Err(e) => p.push(format!("gateway: SEND_GATEWAY_CONFIG: {e}")),
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let out = check_config(&run_args, &env);
    p.check(out.status.success(), || {
        format!(
            "gateway: `send-gateway {} check-config` with its environment fails: {}",
            args.join(" "),
            describe(&out)
        )
    });
    match effective(&out) {
        Ok(eff) => {
            let published = compose_published(gw);
            for (what, addr) in [("proxy", eff.listen), ("admin", eff.admin)] {
                p.check(addr.ip().is_unspecified(), || {
                    format!("gateway: the {what} listener {addr} is unreachable from the host")
                });
                p.check(published.contains(&addr.port()), || {
                    format!("gateway: the {what} port {} is not published", addr.port())
                });
            }
            let upstream = host_port(&eff.upstream);
            p.check(
                upstream.as_ref().is_some_and(|(h, port)| {
                    h == "fake-nylas" && Some(*port) == fake_listen.map(|a| a.port())
                }),
                || {
                    format!(
                        "gateway: upstream {} is not the fake-nylas service's port",
                        eff.upstream
                    )
                },
            );
            p.check(eff.backend == StoreBackend::Redis, || {
                "gateway: the store is not Redis".into()
            });
            p.check(
                host_port(&eff.store_url).is_some_and(|(h, port)| h == "redis" && port == 6379),
                || {
                    format!(
                        "gateway: store url {} is not the redis service",
                        eff.store_url
                    )
                },
            );
        }
        Err(e) => p.push(format!("gateway: {e}")),
    }
    let depends: BTreeSet<String> = match gw.get("depends_on") {
        Some(Value::Object(m)) => m.keys().cloned().collect(),
        Some(Value::Array(a)) => strings(a).into_iter().collect(),
        _ => BTreeSet::new(),
    };
    for dep in ["redis", "fake-nylas"] {
        p.check(depends.contains(dep), || {
            format!("gateway does not depend_on {dep}")
        });
    }
    p.assert_none("deploy/compose.yaml");
}

// ---------------------------------------------------------------------------------------
// Metrics, dashboard and alerts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Unknown,
}

/// `(exposed base name, type)` of every metric `src/metrics.rs` registers: the registry's
/// prefix (`sendgw`) and name, plus the unit for `register_with_unit`.
fn registered_metrics() -> Vec<(String, MetricType)> {
    let src = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"));
    let prefix = src
        .split("Registry::with_prefix(\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("metrics.rs builds its registry with Registry::with_prefix(\"...\")");
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find(".register") {
        rest = &rest[at + ".register".len()..];
        let with_unit = rest.starts_with("_with_unit(");
        let Some(open) = rest.find('(') else { break };
        if open > "_with_unit".len() {
            continue;
        }
        let args = call_arguments(&rest[open + 1..]);
        let Some(name) = args.first().and_then(|a| a.trim().strip_prefix('"')) else {
            continue;
        };
        let mut name = format!("{prefix}_{}", name.trim_end_matches('"'));
        let unit = args.get(2).and_then(|u| u.trim().rsplit("::").next());
        if let (true, Some(unit)) = (with_unit, unit) {
            let unit = unit.to_ascii_lowercase();
            if !name.ends_with(&format!("_{unit}")) {
                name = format!("{name}_{unit}");
            }
        }
        let metric = args.last().map_or("", |a| a.trim());
        out.push((name, metric_type(&src, metric)));
    }
    assert!(
        !out.is_empty(),
        "found no registry.register(...) in metrics.rs"
    );
    out
}

/// The top-level, comma-separated arguments of a call whose `(` was just consumed.
fn call_arguments(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut current = String::new();
    for ch in text.chars() {
        if in_str {
            current.push(ch);
            match (escaped, ch) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => {
                in_str = true;
                current.push(ch);
            }
            '(' | '[' | '{' | '<' => {
                depth += 1;
                current.push(ch);
            }
            ')' | ']' | '}' | '>' if depth > 0 => {
                depth -= 1;
                current.push(ch);
            }
            ')' => break,
            ',' if depth == 0 => args.push(std::mem::take(&mut current)),
            _ => current.push(ch),
        }
    }
    if !current.trim().is_empty() {
        args.push(current);
    }
    args
}

/// The type of the metric expression `expr` (`decisions.clone()`, `Gauge::default()`), from
/// the expression itself or the `let` that made the variable it names.
fn metric_type(src: &str, expr: &str) -> MetricType {
    let classify = |text: &str| {
        if text.contains("Histogram") {
            MetricType::Histogram
        } else if text.contains("Counter") {
            MetricType::Counter
        } else if text.contains("Gauge") {
            MetricType::Gauge
        } else {
            MetricType::Unknown
        }
    };
    let direct = classify(expr);
    if direct != MetricType::Unknown {
        return direct;
    }
    let ident: String = expr
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if ident.is_empty() {
        return MetricType::Unknown;
    }
    for pat in [format!("let {ident} ="), format!("let {ident}:")] {
        if let Some(at) = src.find(&pat) {
            let stmt = src[at..].split(';').next().unwrap_or("");
            return classify(stmt);
        }
    }
    MetricType::Unknown
}

/// Every name a registered metric is exposed under.
fn exposed_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (base, ty) in registered_metrics() {
        let suffixes: &[&str] = match ty {
            MetricType::Counter => &["_total"],
            MetricType::Gauge => &[""],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            MetricType::Unknown => &["", "_total", "_bucket", "_sum", "_count"],
        };
        for s in suffixes {
            names.insert(format!("{base}{s}"));
        }
    }
    names
}

/// Every `sendgw_...` token in `text`.
fn metric_tokens(text: &str) -> BTreeSet<String> {
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

fn deploy_text_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if std::fs::read_to_string(&path).is_ok() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &mut out);
    out.sort();
    out
}

#[test]
fn deploy_files_use_only_registered_metrics() {
    let known = exposed_names();
    let mut p = Problems::default();
    let mut used_anywhere = 0;
    for path in deploy_text_files() {
        for token in metric_tokens(&read(&path)) {
            used_anywhere += 1;
            p.check(known.contains(&token), || {
                format!(
                    "{} uses {token}, which the gateway does not expose (it exposes {known:?})",
                    path.strip_prefix(workspace()).unwrap_or(&path).display()
                )
            });
        }
    }
    p.check(used_anywhere > 0, || {
        "no sendgw_ metric is used under deploy/".into()
    });
    p.assert_none("metric names");
}

fn dashboard() -> Value {
    let path = deploy_dir().join("monitoring/grafana-dashboard.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn dashboard_shows_every_metric() {
    let d = dashboard();
    let mut p = Problems::default();
    p.check(str_at(&d, "/uid").is_some_and(|u| !u.is_empty()), || {
        "no uid".into()
    });
    p.check(str_at(&d, "/title").is_some_and(|u| !u.is_empty()), || {
        "no title".into()
    });
    p.check(
        arr_at(&d, "/templating/list")
            .iter()
            .any(|v| str_at(v, "/type") == Some("datasource")),
        || "no data source variable: the dashboard would be tied to one Prometheus".into(),
    );
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for panel in arr_at(&d, "/panels") {
        let id = panel.get("id").and_then(Value::as_u64);
        p.check(id.is_some_and(|i| ids.insert(i)), || {
            format!("panel id {id:?} missing or repeated")
        });
        p.check(panel.get("gridPos").is_some(), || {
            format!("panel {id:?} has no gridPos")
        });
        if str_at(panel, "/type") == Some("row") {
            continue;
        }
        let targets = arr_at(panel, "/targets");
        p.check(!targets.is_empty(), || format!("panel {id:?} has no query"));
        for t in targets {
            let expr = str_at(t, "/expr").unwrap_or("");
            p.check(!expr.is_empty(), || {
                format!("panel {id:?} has an empty query")
            });
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    // Every registered metric family has a panel.
    let used = metric_tokens(&exprs);
    for (base, _) in registered_metrics() {
        p.check(
            used.iter()
                .any(|u| u == &base || u.strip_prefix(&base).is_some_and(|s| s.starts_with('_'))),
            || format!("no dashboard panel shows {base}"),
        );
    }
    // Latency as quantiles of the histograms.
    for h in [
        "sendgw_store_duration_seconds_bucket",
        "sendgw_upstream_duration_seconds_bucket",
    ] {
        p.check(
            exprs
                .lines()
                .any(|e| e.contains("histogram_quantile") && e.contains(h)),
            || format!("no histogram_quantile over {h}"),
        );
    }
    p.assert_none("deploy/monitoring/grafana-dashboard.json");
}

#[test]
fn alert_rules_cover_the_failure_modes() {
    let path = deploy_dir().join("monitoring/alerts.yaml");
    let rules_file = yaml(&read(&path), "deploy/monitoring/alerts.yaml");
    let mut p = Problems::default();
    let mut names = BTreeSet::new();
    let mut exprs = Vec::new();
    let groups = arr_at(&rules_file, "/groups");
    p.check(!groups.is_empty(), || "no rule groups".into());
    for group in groups {
        p.check(str_at(group, "/name").is_some(), || {
            "a group has no name".into()
        });
        for rule in arr_at(group, "/rules") {
            let name = str_at(rule, "/alert").unwrap_or("").to_owned();
            p.check(
                name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric()),
                || format!("alert name {name:?} is not CamelCase"),
            );
            p.check(names.insert(name.clone()), || {
                format!("alert {name} is repeated")
            });
            let expr = str_at(rule, "/expr").unwrap_or("").to_owned();
            p.check(!expr.trim().is_empty(), || format!("{name}: no expr"));
            if let Some(f) = str_at(rule, "/for") {
                let prometheus_duration = f
                    .strip_suffix(['s', 'm', 'h', 'd'])
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                p.check(prometheus_duration, || {
                    format!("{name}: for {f:?} is not like 5m")
                });
            }
            let severity = str_at(rule, "/labels/severity");
            p.check(
                severity.is_some_and(|s| ["critical", "warning", "info"].contains(&s)),
                || format!("{name}: severity {severity:?}"),
            );
            for a in ["summary", "description"] {
                p.check(str_at(rule, &format!("/annotations/{a}")).is_some(), || {
                    format!("{name}: no {a} annotation")
                });
            }
            exprs.push((name, expr));
        }
    }
    let covers = |needles: &[&str]| {
        exprs
            .iter()
            .any(|(_, e)| needles.iter().all(|n| e.contains(n)))
    };
    for (what, needles) in [
        (
            "store errors",
            &["sendgw_decisions_total", "outcome=\"store_error\""][..],
        ),
        (
            "sustained denials",
            &["sendgw_decisions_total", "outcome=\"denied\"", "/"][..],
        ),
        (
            "upstream errors",
            &["sendgw_upstream_responses_total", "5xx"][..],
        ),
        (
            "config reload failures",
            &["sendgw_config_reloads_total"][..],
        ),
    ] {
        p.check(covers(needles), || {
            format!("no alert on {what} ({needles:?})")
        });
    }
    p.assert_none("deploy/monitoring/alerts.yaml");
}

#[test]
fn readme_explains_every_deploy_file() {
    let readme = read(&deploy_dir().join("README.md"));
    let mut p = Problems::default();
    for needle in [
        "docker build -f deploy/Dockerfile",
        "docker compose -f deploy/compose.yaml",
        "kubectl apply -k deploy/kubernetes/sidecar",
        "kubectl apply -k deploy/kubernetes/standalone",
        "grafana-dashboard.json",
        "alerts.yaml",
        "shutdown_grace",
        "terminationGracePeriodSeconds",
    ] {
        p.check(readme.contains(needle), || {
            format!("deploy/README.md does not mention {needle}")
        });
    }
    p.assert_none("deploy/README.md");
}

#[test]
fn helpers_parse_what_they_claim() {
    assert_eq!(quantity_bytes("128Mi"), Some(128 << 20));
    assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
    assert_eq!(quantity_bytes("65536"), Some(65536));
    assert_eq!(
        host_port("redis://:pw@redis.example.svc:6379/0"),
        Some(("redis.example.svc".to_owned(), 6379))
    );
    assert_eq!(
        metric_tokens("rate(sendgw_a_total[5m]) / xsendgw_b sendgw_c{x}"),
        ["sendgw_a_total", "sendgw_c"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
    let args: Vec<String> = ["--log-format", "json", "--config=/x.toml"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(config_arg(&args), Some((2, "/x.toml".to_owned())));
    assert_eq!(
        with_config_path(&args, 2, Path::new("/tmp/y.toml"))[2],
        "--config=/tmp/y.toml"
    );
    // Flags beat the environment, which beats the file (compose.yaml relies on it).
    let env = [(
        "SEND_GATEWAY__SERVER__LISTEN".to_owned(),
        "0.0.0.0:2".to_owned(),
    )];
    let out = check_config(&["--listen".to_owned(), "0.0.0.0:3".to_owned()], &env);
    let eff = effective(&out).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    assert_eq!(eff.listen.to_string(), "0.0.0.0:3");
    assert_eq!(eff.admin.to_string(), "127.0.0.1:9090");
    assert_eq!(eff.shutdown_grace, Duration::from_secs(25));
    let kinds: BTreeMap<String, MetricType> = registered_metrics().into_iter().collect();
    assert_eq!(kinds.get("sendgw_decisions"), Some(&MetricType::Counter));
    assert_eq!(
        kinds.get("sendgw_store_duration_seconds"),
        Some(&MetricType::Histogram)
    );
    assert_eq!(
        kinds.get("sendgw_requests_in_flight"),
        Some(&MetricType::Gauge)
    );
}
