//! The real `send-gateway` binary: `check-config` with files, variables and flags, and the
//! `quota` subcommands against a gateway served in this process.

mod common;

use std::path::Path;
use std::process::Output;

use common::{Gateway, client, config, fake, simple};
use fake_nylas::DEMO_GRANT_ID;
use gateway::config::Config;
use serde_json::Value;
use tokio::process::Command;

/// The binary, with none of this process's `SEND_GATEWAY*` variables: each test sets on the
/// child exactly what it means to.
fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_send-gateway"));
    for name in testkit::process::vars_with_prefix("SEND_GATEWAY") {
        cmd.env_remove(name);
    }
    cmd.kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::time::timeout(common::WAIT, cmd.output())
        .await
        .expect("the binary finishes")
        .expect("the binary runs");
    (
        status.code().expect("an exit code"),
        String::from_utf8(stdout).expect("utf-8 stdout"),
        String::from_utf8(stderr).expect("utf-8 stderr"),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

#[tokio::test]
async fn check_config_prints_the_effective_configuration_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gw.toml",
        r#"
        [server]
        admin_token = "adm1n-secret"
        [store]
        backend = "redis"
        url = "redis://app:hunter2@cache:6379/0"
        key_prefix = "from-file"
        [events]
        webhook_url = "https://hooks.example.com/x?token=t0k"
        "#,
    );
    let (code, stdout, stderr) = run(bin()
        .args(["check-config", "--config", &file])
        .args([
            "--set",
            "grants.resolve_provider=true",
            "--listen",
            "127.0.0.1:2222",
        ])
        .env("SEND_GATEWAY__UPSTREAM__API_KEY", "nyk_v0_secret")
        .env("SEND_GATEWAY__STORE__KEY_PREFIX", "from-env")
        .env("SEND_GATEWAY__SERVER__LISTEN", "127.0.0.1:1111")
        .env("SEND_GATEWAY__GRANTS__PROVIDER_PROFILES__GOOGLE", "google"))
    .await;
    assert_eq!(code, 0, "{stderr}");
    for secret in ["adm1n-secret", "hunter2", "t0k", "nyk_v0_secret"] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} printed:\n{stderr}");
    }
    for shown in [
        "admin_token = \"***\"",
        "api_key = \"***\"",
        "url = \"redis://app:***@cache:6379/0\"",
        "webhook_url = \"https://hooks.example.com/x?***\"",
        "key_prefix = \"from-env\"",
        "listen = \"127.0.0.1:2222\"",
        "resolve_provider = true",
        "google = \"google\"",
        "[log]",
        "[[profiles.icloud.windows]]",
        "[[profiles.microsoft.windows]]",
    ] {
        assert!(stdout.contains(shown), "{shown} missing:\n{stdout}");
    }
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains("configuration is valid"), "{last}");
    // The output is itself a configuration: the same one, secrets aside.
    let shown = Config::from_toml_str(&stdout).unwrap_or_else(|e| panic!("{e}\n{stdout}"));
    assert!(shown.grants.resolve_provider);
    assert_eq!(shown.store.key_prefix, "from-env");
    assert_eq!(shown.server.listen.to_string(), "127.0.0.1:2222");
}

#[tokio::test]
async fn config_file_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gw.toml",
        "[grants]\ndefault_profile = \"yahoo\"\n",
    );
    let (code, stdout, stderr) =
        run(bin().arg("check-config").env("SEND_GATEWAY_CONFIG", &file)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("default_profile = \"yahoo\""), "{stdout}");
}

#[tokio::test]
async fn a_bad_configuration_exits_64_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", "[store]\nbakend = \"redis\"\n");
    for args in [
        vec!["check-config", "--config", &file],
        vec!["--config", &file],
    ] {
        let (code, stdout, stderr) = run(bin().args(&args)).await;
        assert_eq!(code, 64, "{args:?}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("send-gateway: config error: store.bakend: unknown key"),
            "{stderr}"
        );
    }

    let cases = [
        (
            "SEND_GATEWAY__STORE__TIMEOUT",
            "bogus",
            "invalid duration \"bogus\"",
        ),
        ("SEND_GATEWAY__STORE__URLL", "redis://h", "unknown key"),
        ("send_gateway__log__level", "gateway=loud", "invalid filter"),
    ];
    for (name, value, needle) in cases {
        for args in [vec!["check-config"], vec![]] {
            let (code, _, stderr) = run(bin().args(&args).env(name, value)).await;
            assert_eq!(code, 64, "{name}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(
                stderr.starts_with(&format!("send-gateway: config error: {name}: ")),
                "{stderr}"
            );
            assert!(stderr.contains(needle), "{stderr}");
        }
    }

    let (code, _, stderr) = run(bin().args(["check-config", "--set", "store.timeout=0s"])).await;
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "send-gateway: config error: store.timeout: must be greater than zero"
    );
}

#[tokio::test]
async fn quota_show_and_reset_through_the_admin_api() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nadmin_token = \"t0ken\"\n")).await;
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let admin = gw.admin.as_str();

    // Reads need the token too.
    let (code, stdout, stderr) =
        run(bin().args(["quota", "show", DEMO_GRANT_ID, "--admin", admin])).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("--token"),
        "{stderr}"
    );

    // The table.
    let (code, stdout, stderr) = run(bin().args([
        "quota",
        "show",
        DEMO_GRANT_ID,
        "--admin",
        admin,
        "--token",
        "t0ken",
    ]))
    .await;
    assert_eq!(code, 0, "{stderr}");
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|v| v.starts_with("  ")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} line:\n{stdout}"))
    };
    assert_eq!(field("grant"), DEMO_GRANT_ID);
    assert_eq!(field("profile"), "icloud");
    assert!(stdout.contains("at most 500 recipients"), "{stdout}");
    assert!(stdout.contains("WINDOW  METRIC"), "{stdout}");
    let row = |metric: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with("24h") && l.contains(metric))
            .unwrap_or_else(|| panic!("no 24h {metric} row:\n{stdout}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("messages")[..6],
        ["24h", "messages", "1", "0", "1000", "999"]
    );
    assert_eq!(
        row("recipients")[..6],
        ["24h", "recipients", "1", "0", "1000", "999"]
    );

    // The API's JSON as it is.
    let (code, stdout, stderr) = run(bin()
        .args(["quota", "show", DEMO_GRANT_ID, "--admin", admin, "--json"])
        .env("SEND_GATEWAY_ADMIN_TOKEN", "t0ken"))
    .await;
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let api = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(json["grant_id"], api["grant_id"]);
    assert_eq!(
        json["windows"][0]["messages"],
        api["windows"][0]["messages"]
    );

    // A reset needs the token.
    let (code, stdout, stderr) =
        run(bin().args(["quota", "reset", DEMO_GRANT_ID, "--admin", admin])).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("--token"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, _, stderr) = run(bin().args([
        "quota",
        "reset",
        DEMO_GRANT_ID,
        "--admin",
        admin,
        "--token",
        "wrong",
    ]))
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("refused"), "{stderr}");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));

    let (code, stdout, stderr) = run(bin().args([
        "quota",
        "reset",
        DEMO_GRANT_ID,
        "--admin",
        admin,
        "--token",
        "t0ken",
    ]))
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("quota of grant {DEMO_GRANT_ID} reset")),
        "{stdout}"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));

    // The token from the environment, as JSON.
    let (code, stdout, stderr) = run(bin()
        .args(["quota", "reset", DEMO_GRANT_ID, "--admin", admin, "--json"])
        .env("SEND_GATEWAY_ADMIN_TOKEN", "t0ken"))
    .await;
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["reset"], true);

    // The admin address and token from the configuration.
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gw.toml",
        &format!(
            "[server]\nadmin_listen = \"{}\"\nadmin_token = \"t0ken\"\n",
            admin.trim_start_matches("http://")
        ),
    );
    let (code, stdout, stderr) =
        run(bin().args(["quota", "reset", DEMO_GRANT_ID, "--config", &file])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("reset"), "{stdout}");
    let (code, stdout, stderr) = run(bin()
        .args(["quota", "show", DEMO_GRANT_ID])
        .env(
            "SEND_GATEWAY__SERVER__ADMIN_LISTEN",
            admin.trim_start_matches("http://"),
        )
        .env("SEND_GATEWAY__SERVER__ADMIN_TOKEN", "t0ken"))
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("24h"), "{stdout}");

    // What the API refuses, in its words.
    let (code, _, stderr) = run(bin().args([
        "quota",
        "show",
        "alice@example.org",
        "--admin",
        admin,
        "--token",
        "t0ken",
    ]))
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("404") && stderr.contains("grant id"),
        "{stderr}"
    );

    gw.shutdown().await;
}

#[tokio::test]
async fn quota_without_a_gateway_says_so() {
    // A port nothing listens on: bind one, note it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, stdout, stderr) =
        run(bin().args(["quota", "show", "g-1", "--admin", &format!("http://{addr}")])).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("send-gateway: cannot reach the admin API at http://"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (code, _, stderr) = run(bin().args(["quota", "show", "g-1", "--admin", "ftp://h"])).await;
    assert_eq!(code, 64, "{stderr}");

    // A bad configuration is reported as such when it is needed.
    let (code, _, stderr) = run(bin()
        .args(["quota", "show", "g-1"])
        .env("SEND_GATEWAY__SERVER__ADMIN_LISTEN", "nowhere"))
    .await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("SEND_GATEWAY__SERVER__ADMIN_LISTEN"),
        "{stderr}"
    );
}

#[tokio::test]
async fn quota_show_reaches_an_https_admin_listener_from_the_configuration() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = testkit::TestCerts::generate(dir.path());
    // A chain that carries its CA, as the listeners serve it: what the CLI then trusts.
    let mut chain = std::fs::read(&certs.server_cert).unwrap();
    chain.extend(std::fs::read(&certs.ca).unwrap());
    let chain_path = dir.path().join("chain.pem");
    std::fs::write(&chain_path, chain).unwrap();
    let tls = format!(
        "tls_cert_file = {chain_path:?}\ntls_key_file = {:?}\n",
        certs.server_key
    );
    let gw = Gateway::start(&config(&nylas.url(), &format!("[server]\n{tls}"))).await;
    let admin = gw.admin.trim_start_matches("http://");
    let file = write(
        dir.path(),
        "gw.toml",
        &format!("[server]\nadmin_listen = \"{admin}\"\n{tls}"),
    );
    let (code, stdout, stderr) =
        run(bin().args(["quota", "show", DEMO_GRANT_ID, "--config", &file])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("24h"), "{stdout}");
    gw.shutdown().await;
}

#[tokio::test]
async fn quota_explain_says_whether_a_send_would_pass() {
    let nylas = fake().await;
    let rest = "[grants]\ndefault_profile = \"tiny\"\n[profiles.tiny]\n\
                [[profiles.tiny.windows]]\nperiod = \"1h\"\nmessages = 5\nrecipients = 3\n";
    let gw = Gateway::start(&config(&nylas.url(), rest)).await;
    let admin = gw.admin.as_str();
    let explain = |n: &'static str| {
        let mut cmd = bin();
        cmd.args([
            "quota",
            "explain",
            DEMO_GRANT_ID,
            "--admin",
            admin,
            "--recipients",
            n,
        ]);
        cmd
    };
    let (code, stdout, stderr) = run(&mut explain("2")).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("admitted: within_quota (profile tiny, default)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("binding: 1h window, recipients: 2 asked, 3 remaining of 3"),
        "{stdout}"
    );
    let (code, stdout, stderr) = run(&mut explain("4")).await;
    assert_eq!(code, 0, "{stderr}");
    // More than the window's whole limit: no wait lets it through.
    assert!(
        stdout.starts_with("refused: too_many_recipients"),
        "{stdout}"
    );
    let mut json = explain("1");
    json.arg("--json");
    let (_, stdout, _) = run(&mut json).await;
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["admitted"], true, "{v}");
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "asking charges nothing"
    );
}

#[tokio::test]
async fn check_config_refuses_an_exposed_admin_listener_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let open = write(
        dir.path(),
        "open.toml",
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
    );
    let (code, stdout, stderr) = run(bin().args(["check-config", "--config", &open])).await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.starts_with("send-gateway: config error: server.admin_listen: 0.0.0.0:9090 is not a loopback address"),
        "{stderr}"
    );
    let (code, _, stderr) = run(bin()
        .args(["check-config", "--config", &open])
        .env("SEND_GATEWAY__SERVER__ADMIN_TOKEN", "t0ken"))
    .await;
    assert_eq!(code, 0, "with a token it is allowed: {stderr}");
}

#[tokio::test]
async fn quota_top_lists_the_busiest_grants() {
    let nylas = fake().await;
    let rest = "[grants]\ndefault_profile = \"tiny\"\n[profiles.tiny]\n\
                [[profiles.tiny.windows]]\nperiod = \"1h\"\nmessages = 4\n";
    let gw = Gateway::start(&config(&nylas.url(), rest)).await;
    let other = nylas
        .add_grant(fake_nylas::Grant::new("top@corp.example"))
        .id;
    let c = client();
    for (grant, sends) in [(DEMO_GRANT_ID, 3), (other.as_str(), 1)] {
        for _ in 0..sends {
            let resp = gw.send_json(&c, grant, &simple()).send().await.unwrap();
            assert_eq!(resp.status(), 200);
        }
    }
    let top = |min: &'static str| {
        let mut cmd = bin();
        cmd.args([
            "quota",
            "top",
            "--admin",
            &gw.admin,
            &format!("--min={min}"),
        ]);
        cmd
    };
    let (code, stdout, stderr) = run(&mut top("0.5")).await;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "a header and the one grant at 75 %: {stdout}"
    );
    assert!(lines[0].trim_start().starts_with("USED  SCOPE"), "{stdout}");
    assert!(
        lines[1].starts_with("75.0 %  grant  ") && lines[1].contains(DEMO_GRANT_ID),
        "{stdout}"
    );
    assert!(lines[1].ends_with("1h messages 3/4"), "{stdout}");
    let (_, stdout, _) = run(&mut top("0")).await;
    assert_eq!(
        stdout.lines().count(),
        3,
        "both grants, busiest first: {stdout}"
    );
    assert!(stdout.lines().nth(2).unwrap().contains(&other), "{stdout}");
    let (_, stdout, _) = run(&mut top("0.9")).await;
    assert_eq!(stdout, "nothing is at or above 90 % of a limit\n");
    let (code, _, stderr) = run(&mut top("-1")).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--min"), "{stderr}");
}
