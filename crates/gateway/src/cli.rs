//! The command line: global flags that override configuration keys, and the operator's
//! `quota` subcommands, which talk to a running gateway's admin API.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gateway::config::{Config, ConfigError};
use reqwest::Url;
use reqwest::blocking::Client;
use serde_json::Value;

mod top;

/// A quota-enforcing proxy in front of the Nylas v3 API.
///
/// Configuration comes from the defaults, the file, `SEND_GATEWAY__<SECTION>__<KEY>`
/// environment variables and these flags, each over the one before.
#[derive(Debug, Parser)]
#[command(name = "send-gateway", version, about)]
pub struct Cli {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        global = true,
        env = "SEND_GATEWAY_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the effective configuration (secrets masked) and exit; a bad one exits 64 with
    /// one line naming the key.
    CheckConfig,
    /// Show, reset or explain a grant's quota, or list the busiest, through a running
    /// gateway's admin API.
    #[command(subcommand)]
    Quota(QuotaCommand),
}

#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Print a grant's profile, per-message caps and usage in every window.
    Show(QuotaArgs),
    /// Forget a grant's usage in every window.
    Reset(QuotaArgs),
    /// Say whether a send of this shape would be admitted, now or at --send-at, and why
    /// (charges nothing).
    Explain(ExplainArgs),
    /// List the grants, domains and clients nearest their limits, busiest first.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub quota: QuotaArgs,
    /// The send's unique recipients.
    #[arg(long, default_value_t = 1)]
    pub recipients: u64,
    /// The send's size in bytes, as the provider sees it.
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    /// When the send goes out, in unix seconds (a scheduled send) [default: now]
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub send_at: Option<u64>,
}

#[derive(Debug, Args)]
pub struct QuotaArgs {
    /// The grant id (or `grant:<id>`); with [upstream] api_key also its email, `email:<addr>`
    /// or `external:<id>`.
    pub grant: String,
    #[command(flatten)]
    pub to: AdminArgs,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only those whose busiest window is at least this full (0.8 = 80 %).
    #[arg(long, default_value_t = 0.8)]
    pub min: f64,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[command(flatten)]
    pub to: AdminArgs,
}

/// Where the admin API is and how to talk to it.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin API [default: http://<server.admin_listen> from the configuration, or
    /// https:// with server.tls_cert_file, whose certificates are then trusted too]
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// The admin token [default: server.admin_token from the configuration]
    #[arg(
        long,
        env = "SEND_GATEWAY_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags that set configuration keys, over the file and the environment.
#[derive(Debug, Default, Args)]
pub struct Overrides {
    /// Sets `server.listen`.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Sets `server.admin_listen`.
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Sets `upstream.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// Sets `store.backend`.
    #[arg(long, global = true, value_name = "BACKEND", value_parser = ["memory", "redis"])]
    pub store_backend: Option<String>,
    /// Sets `store.url`.
    #[arg(long, global = true, value_name = "URL")]
    pub store_url: Option<String>,
    /// Sets `log.level` (`RUST_LOG`, when set, still wins).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Sets `log.format`.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Sets any key, e.g. `--set grants.resolve_provider=true` or
    /// `--set profiles.icloud.windows[0].messages=500`; repeatable. The named flags above
    /// win over `--set` for the same key.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = key_value)]
    pub set: Vec<(String, String)>,
}

impl Overrides {
    /// `(dotted key, value)` in the order they apply.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let named = [
            ("server.listen", &self.listen),
            ("server.admin_listen", &self.admin_listen),
            ("upstream.url", &self.upstream_url),
            ("store.backend", &self.store_backend),
            ("store.url", &self.store_url),
            ("log.level", &self.log_level),
            ("log.format", &self.log_format),
        ];
        let named = named
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_owned(), value.clone()?)));
        self.set.iter().cloned().chain(named).collect()
    }
}

fn key_value(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!(
            "expected KEY=VALUE, e.g. store.timeout=1s, not {arg:?}"
        )),
    }
}

/// What went wrong talking to the admin API; printed as one line, exit status 1 (64 for a
/// bad configuration or `--admin`).
#[derive(Debug)]
enum QuotaError {
    Config(ConfigError),
    Usage(String),
    Failed(String),
}

/// Runs a `quota` subcommand (`show`, `reset`, `explain`, `top`). `config` is loaded only
/// when `--admin` or `--token` is missing.
pub fn quota(
    command: QuotaCommand,
    config: impl FnOnce() -> Result<Config, ConfigError>,
) -> ExitCode {
    match run_quota(command, config) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(QuotaError::Config(e)) => {
            eprintln!("send-gateway: config error: {e}");
            ExitCode::from(ConfigError::EXIT_CODE as u8)
        }
        Err(QuotaError::Usage(m)) => {
            eprintln!("send-gateway: {m}");
            ExitCode::from(ConfigError::EXIT_CODE as u8)
        }
        Err(QuotaError::Failed(m)) => {
            eprintln!("send-gateway: {m}");
            ExitCode::FAILURE
        }
    }
}

fn run_quota(
    command: QuotaCommand,
    config: impl FnOnce() -> Result<Config, ConfigError>,
) -> Result<String, QuotaError> {
    let (args, reset) = match command {
        QuotaCommand::Show(args) => (args, false),
        QuotaCommand::Reset(args) => (args, true),
        QuotaCommand::Explain(e) => return run_explain(&e, config),
        QuotaCommand::Top(t) => return top::run(&t, config),
    };
    let (admin, token, trust) = admin_and_token(&args.to, config)?;
    let url = quota_url(&admin, &args.grant)?;
    let body = call_admin(&admin, url, reset, token.as_deref(), trust.as_deref())?;
    let grant = &args.grant;
    if reset {
        return Ok(if args.to.json {
            format!("{}\n", serde_json::json!({ "grant": grant, "reset": true }))
        } else {
            format!("quota of grant {grant} reset: every window starts again from zero\n")
        });
    }
    if args.to.json {
        return Ok(format!("{}\n", body.trim_end()));
    }
    let json: Value = serde_json::from_str(&body).map_err(|e| {
        QuotaError::Failed(format!(
            "the admin API at {admin} answered with bad JSON: {e}"
        ))
    })?;
    Ok(render_table(&json))
}

/// `quota explain`: the admin API's answer as JSON, or as one line per finding.
fn run_explain(
    e: &ExplainArgs,
    config: impl FnOnce() -> Result<Config, ConfigError>,
) -> Result<String, QuotaError> {
    let (admin, token, trust) = admin_and_token(&e.quota.to, config)?;
    let mut url = quota_url(&admin, &e.quota.grant)?;
    url.path_segments_mut()
        .map_err(|()| QuotaError::Usage(format!("--admin: {admin} cannot be a base URL")))?
        .push("explain");
    let mut query = format!("recipients={}&bytes={}", e.recipients, e.bytes);
    if let Some(t) = e.send_at {
        query.push_str(&format!("&send_at={t}"));
    }
    url.set_query(Some(&query));
    let body = call_admin(&admin, url, false, token.as_deref(), trust.as_deref())?;
    if e.quota.to.json {
        return Ok(format!("{}\n", body.trim_end()));
    }
    let v: Value = serde_json::from_str(&body).map_err(|err| {
        QuotaError::Failed(format!(
            "the admin API at {admin} answered with bad JSON: {err}"
        ))
    })?;
    let verdict = if v["admitted"] == Value::Bool(true) {
        "admitted"
    } else {
        "refused"
    };
    let mut out = format!(
        "{verdict}: {} (profile {}, {})\n",
        v["reason"].as_str().unwrap_or("?"),
        v["profile"].as_str().unwrap_or("?"),
        v["profile_source"].as_str().unwrap_or("?"),
    );
    let b = &v["binding"];
    if b.is_object() {
        // A scheduled send's binding says what is used around its instant, not what remains now.
        let (figure, what) = match b.get("remaining") {
            Some(r) => (r, "remaining"),
            None => (&b["used"], "used"),
        };
        out.push_str(&format!(
            "binding: {} window, {}: {} asked, {figure} {what} of {}\n",
            b["window"].as_str().unwrap_or("?"),
            b["metric"].as_str().unwrap_or("?"),
            b["requested"],
            b["limit"],
        ));
    }
    if let Some(t) = v["fits_at"].as_u64() {
        out.push_str(&format!("would fit from {t} (unix seconds)\n"));
    }
    if v["shadow"] == Value::Bool(true) {
        out.push_str("in shadow: a refusal is only reported, and the send goes out\n");
    }
    Ok(out)
}

/// The admin API's base URL and the token to send: from `--admin` and `--token`, else
/// from the configuration, which is loaded only when one of them is missing. With the
/// configuration loaded and its listeners on TLS, also the certificate file to trust
/// besides the system's roots (the listeners' own chain: enough for a self-signed
/// certificate, or a chain that carries its CA).
fn admin_and_token(
    args: &AdminArgs,
    config: impl FnOnce() -> Result<Config, ConfigError>,
) -> Result<(Url, Option<String>, Option<PathBuf>), QuotaError> {
    let config = if args.admin.is_none() || args.token.is_none() {
        Some(config().map_err(QuotaError::Config)?)
    } else {
        None
    };
    let admin = match (&args.admin, &config) {
        (Some(url), _) => parse_admin_url(url)?,
        (None, Some(c)) => admin_url_for(c.server.admin_listen, c.server.tls_files().is_some()),
        (None, None) => unreachable!("the configuration is loaded when --admin is missing"),
    };
    let token = args.token.clone().filter(|t| !t.is_empty()).or_else(|| {
        config
            .as_ref()
            .and_then(|c| c.server.admin_token.clone())
            .map(String::from)
    });
    let trust = config.and_then(|c| c.server.tls_cert_file);
    Ok((admin, token, trust))
}

/// `<admin>/v1/quota/<grant>`.
fn quota_url(admin: &Url, grant: &str) -> Result<Url, QuotaError> {
    let mut url = admin.clone();
    url.path_segments_mut()
        .map_err(|()| QuotaError::Usage(format!("--admin: {admin} cannot be a base URL")))?
        .pop_if_empty()
        .extend(["v1", "quota", grant]);
    Ok(url)
}

/// `GET` (or, to reset, `DELETE`) `url`; returns the body of a successful answer.
fn call_admin(
    admin: &Url,
    url: Url,
    reset: bool,
    token: Option<&str>,
    trust: Option<&Path>,
) -> Result<String, QuotaError> {
    // The admin listener is internal (loopback, a pod, a port-forward): never through a
    // proxy picked up from HTTP_PROXY.
    let mut builder = Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if let Some(path) = trust {
        let pem = std::fs::read(path)
            .map_err(|e| QuotaError::Failed(format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            QuotaError::Failed(format!("{}: not a PEM certificate: {e}", path.display()))
        })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder
        .build()
        .map_err(|e| QuotaError::Failed(format!("cannot start the HTTP client: {e}")))?;
    let mut request = if reset {
        client.delete(url)
    } else {
        client.get(url)
    };
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().map_err(|e| {
        QuotaError::Failed(format!(
            "cannot reach the admin API at {admin}: {}",
            error_chain(&e)
        ))
    })?;
    let status = response.status();
    let body = response.text().map_err(|e| {
        QuotaError::Failed(format!(
            "the admin API at {admin} answered {status} but its body could not be read: {}",
            error_chain(&e)
        ))
    })?;
    check_status(admin, status, &body, token.is_some())?;
    Ok(body)
}

/// A refusal or failure of the admin API as one line, with a hint for a 401.
fn check_status(
    admin: &Url,
    status: reqwest::StatusCode,
    body: &str,
    token_given: bool,
) -> Result<(), QuotaError> {
    if status == reqwest::StatusCode::UNAUTHORIZED {
        let hint = if token_given {
            "the admin token given was refused"
        } else {
            "this gateway needs an admin token: pass --token, or set SEND_GATEWAY_ADMIN_TOKEN"
        };
        return Err(QuotaError::Failed(format!(
            "not authorized by the admin API at {admin} (401): {hint}"
        )));
    }
    if !status.is_success() {
        let message = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().chars().take(200).collect());
        return Err(QuotaError::Failed(format!(
            "the admin API at {admin} answered {status}: {message}"
        )));
    }
    Ok(())
}

/// `--admin` as given; `host:port` alone means `http://host:port`.
fn parse_admin_url(text: &str) -> Result<Url, QuotaError> {
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|e| QuotaError::Usage(format!("--admin: invalid URL {text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(QuotaError::Usage(format!(
            "--admin: must be an http:// or https:// URL, not {text:?}"
        )));
    }
    Ok(url)
}

/// `http://<admin_listen>` (`https://` with `tls`), with a wildcard address (`0.0.0.0`,
/// `[::]`) replaced by loopback.
fn admin_url_for(addr: std::net::SocketAddr, tls: bool) -> Url {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if tls { "https" } else { "http" };
    Url::parse(&format!("{scheme}://{addr}")).expect("a socket address makes a URL")
}

/// `error sending request: connection refused`, not just the outer layer.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// The admin API's answer to `GET /v1/quota/{grant}` as a table for people.
///
/// Known fields first (grant, profile, per-message caps), any other top-level scalar as a
/// `key  value` line, then one row per window and metric. Missing fields are left out
/// rather than failing, so an older or newer gateway still shows what it sent.
///
/// ```text
/// grant        8f2c...
/// profile      icloud
/// per message  at most 500 recipients, at most 20 MB (20000000 bytes)
///
/// WINDOW  METRIC      USED  LIMIT  REMAINING  RESETS IN
/// 24h     messages       3   1000        997  23h 59m
/// ```
pub fn render_table(json: &Value) -> String {
    let mut out = String::new();
    let head = head_lines(json);
    let width = head.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &head {
        let _ = writeln!(out, "{key:<width$}  {value}");
    }

    let windows = json
        .get("windows")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !out.is_empty() {
        out.push('\n');
    }
    if windows.is_empty() {
        out.push_str("no counting windows: sends are not counted\n");
        return out;
    }
    write_rows(&mut out, &window_rows(windows));
    out
}

/// The `key  value` lines above the table: grant, profile, any other top-level scalar,
/// then the per-message caps.
fn head_lines(json: &Value) -> Vec<(String, String)> {
    let mut head: Vec<(String, String)> = Vec::new();
    if let Some(grant) = json.get("grant_id").and_then(Value::as_str) {
        head.push(("grant".into(), grant.into()));
    }
    if let Some(profile) = json.get("profile").and_then(Value::as_str) {
        head.push(("profile".into(), profile.into()));
    }
    if let Some(obj) = json.as_object() {
        for (key, value) in obj {
            if matches!(
                key.as_str(),
                "grant_id" | "profile" | "per_message" | "windows"
            ) {
                continue;
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            head.push((key.replace('_', " "), text));
        }
    }
    if let Some(per) = json.get("per_message") {
        head.push(("per message".into(), per_message_caps(per)));
    }
    head
}

/// `at most 500 recipients, at most 20 MB (20000000 bytes)`, or `no caps`.
fn per_message_caps(per: &Value) -> String {
    let recipients = per.get("max_recipients").and_then(Value::as_u64);
    let size = per.get("max_message_size").and_then(Value::as_u64);
    let mut caps = Vec::new();
    if let Some(n) = recipients {
        caps.push(format!("at most {n} recipients"));
    }
    if let Some(n) = size {
        caps.push(format!("at most {} ({n} bytes)", human_bytes(n)));
    }
    if caps.is_empty() {
        caps.push("no caps".into());
    }
    caps.join(", ")
}

/// The header row, then one row per window and metric.
fn window_rows(windows: &[Value]) -> Vec<[String; 7]> {
    let mut rows = vec![[
        "WINDOW".to_owned(),
        "METRIC".to_owned(),
        "USED".to_owned(),
        "SCHEDULED".to_owned(),
        "LIMIT".to_owned(),
        "REMAINING".to_owned(),
        "RESETS IN".to_owned(),
    ]];
    for window in windows {
        let period = window
            .get("period")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let resets = window
            .get("resets_in_seconds")
            .and_then(Value::as_u64)
            .map_or_else(|| "-".to_owned(), humanise_seconds);
        let Some(fields) = window.as_object() else {
            continue;
        };
        for (metric, counts) in sorted_metrics(fields) {
            let number = |key: &str| {
                counts
                    .get(key)
                    .filter(|v| !v.is_null())
                    .map_or_else(|| "-".to_owned(), |v| v.to_string())
            };
            rows.push([
                period.clone(),
                metric.clone(),
                number("used"),
                number("scheduled"),
                number("limit"),
                number("remaining"),
                resets.clone(),
            ]);
        }
    }
    rows
}

/// A window's metrics (its object-valued fields).
fn sorted_metrics(fields: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    // The metrics in the order of the configuration, then any others.
    let mut metrics: Vec<(&String, &Value)> =
        fields.iter().filter(|(_, v)| v.is_object()).collect();
    let rank = |name: &str| {
        ["messages", "recipients", "bytes"]
            .iter()
            .position(|m| *m == name)
            .unwrap_or(usize::MAX)
    };
    metrics.sort_by_key(|(name, _)| (rank(name), (*name).clone()));
    metrics
}

/// `rows` in aligned columns: text left, numbers right, no trailing spaces.
fn write_rows(out: &mut String, rows: &[[String; 7]]) {
    let mut widths = [0usize; 7];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let [period, metric, used, scheduled, limit, remaining, resets] = row;
        let line = format!(
            "{period:<w0$}  {metric:<w1$}  {used:>w2$}  {scheduled:>w3$}  {limit:>w4$}  {remaining:>w5$}  {resets}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
            w5 = widths[5],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `45s`, `5m 3s`, `23h 59m`, `2d 3h`: the two largest units, for a glance.
fn humanise_seconds(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) if s == 0 => "now".to_owned(),
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// `20 MB`, `4 MiB`, `1.5 kB`: decimal units unless the size is a whole number of binary ones.
fn human_bytes(n: u64) -> String {
    const BINARY: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    if let Some((unit, name)) = BINARY
        .iter()
        .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        && !n.is_multiple_of(1000)
    {
        return format!("{} {name}", n / unit);
    }
    const DECIMAL: [(u64, &str); 3] = [(1_000_000_000, "GB"), (1_000_000, "MB"), (1_000, "kB")];
    for (unit, name) in DECIMAL {
        if n >= unit {
            let whole = n / unit;
            let tenths = n % unit * 10 / unit;
            return if tenths == 0 {
                format!("{whole} {name}")
            } else {
                format!("{whole}.{tenths} {name}")
            };
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_overrides_named_flags_last() {
        // Global flags go before or after the subcommand (clap keeps one side's `--set`s).
        let cli = Cli::try_parse_from([
            "send-gateway",
            "check-config",
            "--set",
            "store.url=redis://a",
            "--store-url",
            "redis://b",
            "--listen",
            "0.0.0.0:80",
            "--set",
            "grants.resolve_provider=true",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::CheckConfig)));
        let pairs = cli.overrides.to_pairs();
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("store.url", "redis://a"),
                ("grants.resolve_provider", "true"),
                ("server.listen", "0.0.0.0:80"),
                ("store.url", "redis://b"),
                ("log.format", "json"),
            ]
        );
        assert!(Cli::try_parse_from(["send-gateway", "--set", "novalue"]).is_err());
        assert!(Cli::try_parse_from(["send-gateway", "--store-backend", "mem"]).is_err());
        let (k, v) = key_value("events.webhook_url=https://h/x?a=b").unwrap();
        assert_eq!(
            (k.as_str(), v.as_str()),
            ("events.webhook_url", "https://h/x?a=b")
        );
    }

    #[test]
    fn quota_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "send-gateway",
            "quota",
            "show",
            "g-1",
            "--admin",
            "http://127.0.0.1:1",
            "--json",
        ])
        .unwrap();
        let Some(Command::Quota(QuotaCommand::Show(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.grant, "g-1");
        assert_eq!(args.to.admin.as_deref(), Some("http://127.0.0.1:1"));
        assert!(args.to.json);
        let cli =
            Cli::try_parse_from(["send-gateway", "quota", "reset", "g-1", "--token", "t"]).unwrap();
        let Some(Command::Quota(QuotaCommand::Reset(args))) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.to.token.as_deref(), Some("t"));
    }

    #[test]
    fn admin_urls() {
        assert_eq!(
            admin_url_for("0.0.0.0:9090".parse().unwrap(), false).as_str(),
            "http://127.0.0.1:9090/"
        );
        assert_eq!(
            admin_url_for("[::]:9090".parse().unwrap(), false).as_str(),
            "http://[::1]:9090/"
        );
        assert_eq!(
            admin_url_for("10.0.0.2:9000".parse().unwrap(), true).as_str(),
            "https://10.0.0.2:9000/"
        );
        assert_eq!(
            parse_admin_url("127.0.0.1:9090").unwrap().as_str(),
            "http://127.0.0.1:9090/"
        );
        assert!(matches!(
            parse_admin_url("ftp://h"),
            Err(QuotaError::Usage(_))
        ));
    }

    #[test]
    fn humanised_durations_and_sizes() {
        let cases = [
            (0, "now"),
            (45, "45s"),
            (60, "1m"),
            (303, "5m 3s"),
            (3600, "1h"),
            (86_340, "23h 59m"),
            (86_400, "1d"),
            (2 * 86_400 + 3 * 3600 + 59, "2d 3h"),
        ];
        for (secs, text) in cases {
            assert_eq!(humanise_seconds(secs), text, "{secs}");
        }
        assert_eq!(human_bytes(20_000_000), "20 MB");
        assert_eq!(human_bytes(4 * 1024 * 1024), "4 MiB");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(10_000_000_000), "10 GB");
    }

    #[test]
    fn render_table_lays_out_every_window_and_metric() {
        let json = json!({
            "grant_id": "8f2c1d",
            "profile": "microsoft",
            "profile_source": "provider",
            "per_message": { "max_recipients": 500, "max_message_size": 35_000_000 },
            "windows": [
                {
                    "period": "1m",
                    "resets_in_seconds": 42,
                    "messages": { "limit": 30, "used": 3, "scheduled": 2, "remaining": 25 }
                },
                {
                    "period": "24h",
                    "resets_in_seconds": null,
                    "recipients": { "limit": 10000, "used": 0, "remaining": 10000 },
                    "bytes": { "limit": null, "used": 512, "remaining": null }
                }
            ]
        });
        let expected = "\
grant           8f2c1d
profile         microsoft
profile source  provider
per message     at most 500 recipients, at most 35 MB (35000000 bytes)

WINDOW  METRIC      USED  SCHEDULED  LIMIT  REMAINING  RESETS IN
1m      messages       3          2     30         25  42s
24h     recipients     0          -  10000      10000  -
24h     bytes        512          -      -          -  -
";
        assert_eq!(render_table(&json), expected);
    }

    #[test]
    fn render_table_copes_with_little() {
        let json = json!({ "grant_id": "g", "profile": "open", "per_message": {}, "windows": [] });
        assert_eq!(
            render_table(&json),
            "grant        g\nprofile      open\nper message  no caps\n\nno counting windows: sends are not counted\n"
        );
        assert_eq!(
            render_table(&json!({})),
            "no counting windows: sends are not counted\n"
        );
    }
}
