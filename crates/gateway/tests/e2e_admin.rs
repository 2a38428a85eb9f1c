//! End to end: the admin listener's health, readiness, metrics and quota API.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, WAIT, client, config, fake, gateway_error, message, simple};
use fake_nylas::DEMO_GRANT_ID;
use serde_json::{Value, json};
use testkit::RedisServer;
use testkit::process::{Expect, Server};

async fn get(url: String) -> (u16, Value) {
    let resp = client().get(url).send().await.expect("admin answer");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("admin JSON"))
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let mut redis = RedisServer::start();
    let nylas = fake().await;
    let store = format!("[store]\nbackend = \"redis\"\nurl = \"{}\"\n", redis.url());
    let gw = Gateway::start(&config(&nylas.url(), &store)).await;
    let c = client();
    assert_eq!(
        get(format!("{}/healthz", gw.admin)).await,
        (200, json!({"status": "ok"}))
    );
    let (code, body) = get(format!("{}/readyz", gw.admin)).await;
    assert_eq!((code, &body["status"]), (200, &json!("ready")), "{body}");
    assert_eq!(body["store"]["backend"], "redis");
    assert_eq!(body["store"]["up"], true);
    assert_eq!(body["store"]["breaker"], "closed");
    assert_eq!(body["store"]["on_unavailable"], "reject");
    // The test's redis-server runs with neither AOF nor RDB: said, not hidden.
    assert_eq!(body["store"]["persistent"], false, "{body}");
    assert_eq!(body["store"]["warnings"].as_array().map(Vec::len), Some(1));

    assert_eq!(
        gw.send_json(&c, DEMO_GRANT_ID, &simple())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // OpenMetrics when asked for, as Prometheus asks.
    let resp = c
        .get(format!("{}/metrics", gw.admin))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let allowed = "sendgw_decisions_total{outcome=\"allowed\",reason=\"within_quota\"} 1";
    assert!(text.lines().any(|l| l == allowed), "{allowed} in\n{text}");

    redis.stop();
    let (code, body) = get(format!("{}/readyz", gw.admin)).await;
    assert_eq!((code, &body["status"]), (503, &json!("store_unavailable")));
    assert_eq!(body["store"]["up"], false);
    assert_eq!(
        get(format!("{}/healthz", gw.admin)).await.0,
        200,
        "alive while not ready"
    );

    // Ready again once Redis is back (the connection reconnects by itself).
    redis.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = get(format!("{}/readyz", gw.admin)).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within {WAIT:?} of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn quota_reset_needs_the_admin_token() {
    let nylas = fake().await;
    let toml = config(&nylas.url(), "\n[server]\nadmin_token = \"s3cret-admin\"\n");
    let gw = Gateway::start(&toml).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            gw.send_json(&c, DEMO_GRANT_ID, &simple())
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (3, 3));
    let url = format!("{}/v1/quota/{DEMO_GRANT_ID}", gw.admin);

    gateway_error(c.delete(&url).send().await.unwrap(), 401, "unauthorized").await;
    gateway_error(
        c.delete(&url).bearer_auth("wrong").send().await.unwrap(),
        401,
        "unauthorized",
    )
    .await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (3, 3),
        "refused resets change nothing"
    );

    let resp = c
        .delete(&url)
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    let q = gw.quota(&format!("grant:{DEMO_GRANT_ID}")).await;
    assert_eq!(q["windows"][0]["messages"]["remaining"], 1000);

    // The quota API takes grant ids only: an email is a 404 envelope.
    let resp = gw
        .admin_get("/v1/quota/demo@example.com")
        .send()
        .await
        .unwrap();
    gateway_error(resp, 404, "not_found_error").await;
}

#[tokio::test]
async fn without_an_admin_token_resets_are_open() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    assert_eq!(
        gw.send_json(&c, DEMO_GRANT_ID, &simple())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let resp = c
        .delete(format!("{}/v1/quota/{DEMO_GRANT_ID}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    let (code, body) = get(format!("{}/readyz", gw.admin)).await;
    assert_eq!((code, &body["status"]), (200, &json!("ready")));
}

/// Status of `GET {url}` with `token` as a bearer token, if any.
async fn status(url: &str, token: Option<&str>) -> u16 {
    let request = client().get(url);
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    request
        .send()
        .await
        .expect("admin answer")
        .status()
        .as_u16()
}

#[tokio::test]
async fn with_a_token_quota_reads_need_it_and_metrics_stay_open() {
    let nylas = fake().await;
    let toml = config(&nylas.url(), "\n[server]\nadmin_token = \"r3ad-token\"\n");
    let gw = Gateway::start(&toml).await;
    let quota = format!("{}/v1/quota/{DEMO_GRANT_ID}", gw.admin);
    let resp = client().get(&quota).send().await.unwrap();
    // RFC 6750: the 401 names the scheme it wants.
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"send-gateway-admin\""
    );
    gateway_error(resp, 401, "unauthorized").await;
    let resp = client()
        .get(&quota)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    gateway_error(resp, 401, "unauthorized").await;
    let resp = client()
        .get(&quota)
        .bearer_auth("r3ad-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["grant_id"], DEMO_GRANT_ID);
    // Override changes: refused without the token, done with it.
    let profile = format!("{}/v1/grants/{DEMO_GRANT_ID}/profile", gw.admin);
    let put = |token: Option<&str>| {
        let request = client().put(&profile).json(&json!({ "profile": "google" }));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    };
    gateway_error(put(None).send().await.unwrap(), 401, "unauthorized").await;
    assert_eq!(gw.quota(DEMO_GRANT_ID).await["profile"], "icloud");
    assert_eq!(put(Some("r3ad-token")).send().await.unwrap().status(), 200);
    assert_eq!(gw.quota(DEMO_GRANT_ID).await["profile_source"], "override");
    // Health, readiness and (without protect_metrics) metrics need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            status(&format!("{}{path}", gw.admin), None).await,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn protect_metrics_puts_metrics_behind_the_token_but_not_health() {
    let nylas = fake().await;
    let toml = config(
        &nylas.url(),
        "\n[server]\nadmin_token = \"m3trics\"\nprotect_metrics = true\n",
    );
    let gw = Gateway::start(&toml).await;
    let metrics = format!("{}/metrics", gw.admin);
    let resp = client().get(&metrics).send().await.unwrap();
    gateway_error(resp, 401, "unauthorized").await;
    assert_eq!(status(&metrics, Some("wrong")).await, 401);
    let resp = client()
        .get(&metrics)
        .bearer_auth("m3trics")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("sendgw_"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            status(&format!("{}{path}", gw.admin), None).await,
            200,
            "{path}"
        );
        assert_eq!(
            status(&format!("{}{path}", gw.admin), Some("wrong")).await,
            200,
            "{path} with a wrong token"
        );
    }
}

#[tokio::test]
async fn without_a_token_metrics_and_quota_reads_are_open_on_loopback() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    for path in ["/metrics".to_owned(), format!("/v1/quota/{DEMO_GRANT_ID}")] {
        assert_eq!(
            status(&format!("{}{path}", gw.admin), None).await,
            200,
            "{path}"
        );
    }
}

/// The binary on loopback port 0 with `admin_token`, JSON logs at info into `log`.
fn spawn_logging(dir: &std::path::Path, nylas: &str, log: &std::path::Path) -> Server {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             admin_token = \"adm1n-t0ken-secret\"\n\
             [upstream]\nurl = \"{nylas}\"\n[log]\nformat = \"json\"\n"
        ),
    )
    .expect("write config");
    let stderr = std::fs::File::create(log).expect("log file");
    let mut cmd = testkit::process::send_gateway(env!("CARGO_BIN_EXE_send-gateway"), &config);
    cmd.env("RUST_LOG", "info").stderr(stderr);
    Server::spawn(&mut cmd, "send-gateway", Expect::ListeningAndAdmin, WAIT)
}

/// Stops `gw` with SIGTERM (which flushes the log) and returns the log's JSON lines.
async fn stop_and_read(mut gw: Server, log: &std::path::Path) -> Vec<Value> {
    gw.signal("TERM");
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.try_wait().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "exits after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gw);
    let text = std::fs::read_to_string(log).expect("read log");
    assert!(
        !text.contains("adm1n-t0ken-secret"),
        "the token in the log:\n{text}"
    );
    assert!(
        !text.contains("guessed-t0ken"),
        "a presented token in the log:\n{text}"
    );
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The lines whose message contains `needle`.
fn lines_with<'a>(lines: &'a [Value], needle: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

#[tokio::test]
async fn admin_changes_and_refusals_are_logged_with_the_caller_never_the_token() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("stderr.log");
    let gw = spawn_logging(dir.path(), &nylas.url(), &log);
    let admin = gw.admin().expect("admin").to_owned();
    let c = client();
    let profile = format!("{admin}/v1/grants/{DEMO_GRANT_ID}/profile");
    let quota = format!("{admin}/v1/quota/{DEMO_GRANT_ID}");
    let ok = "adm1n-t0ken-secret";
    let put = c
        .put(&profile)
        .bearer_auth(ok)
        .json(&json!({ "profile": "google" }));
    assert_eq!(put.send().await.unwrap().status(), 200);
    let put = c
        .put(&profile)
        .bearer_auth(ok)
        .json(&json!({ "profile": "yahoo" }));
    assert_eq!(put.send().await.unwrap().status(), 200);
    assert_eq!(
        c.delete(&profile)
            .bearer_auth(ok)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        c.delete(&quota)
            .bearer_auth(ok)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    // Refusals: a burst of wrong tokens is one line, not one per request.
    for _ in 0..5 {
        let resp = c
            .delete(&quota)
            .bearer_auth("guessed-t0ken")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let lines = stop_and_read(gw, &log).await;
    let caller = |l: &Value| l["caller"].as_str().unwrap_or("").to_owned();
    let set = lines_with(&lines, "profile override set");
    assert_eq!(set.len(), 2, "{lines:#?}");
    for (line, (old, new)) in set.iter().zip([("none", "google"), ("google", "yahoo")]) {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["grant"], DEMO_GRANT_ID);
        assert_eq!(line["old_override"], old, "{line}");
        assert_eq!(line["new_override"], new, "{line}");
        assert!(caller(line).starts_with("127.0.0.1:"), "{line}");
    }
    let cleared = lines_with(&lines, "profile override removed");
    assert_eq!(cleared.len(), 1, "{lines:#?}");
    assert_eq!(cleared[0]["old_override"], "yahoo");
    assert!(
        caller(cleared[0]).starts_with("127.0.0.1:"),
        "{}",
        cleared[0]
    );
    let reset = lines_with(&lines, "quota reset by admin");
    assert_eq!(reset.len(), 1, "{lines:#?}");
    assert_eq!(reset[0]["grant"], DEMO_GRANT_ID);
    assert!(caller(reset[0]).starts_with("127.0.0.1:"), "{}", reset[0]);
    let refused = lines_with(&lines, "admin request refused");
    assert_eq!(refused.len(), 1, "rate-limited to one line: {lines:#?}");
    assert_eq!(refused[0]["level"], "WARN");
    assert_eq!(refused[0]["token_presented"], true);
    assert!(
        caller(refused[0]).starts_with("127.0.0.1:"),
        "{}",
        refused[0]
    );
}

#[tokio::test]
async fn a_reload_that_drops_the_token_keeps_an_open_admin_listener_closed() {
    let nylas = fake().await;
    let server = "\n[server]\nlisten = \"127.0.0.1:0\"\n";
    let exposed = format!("{server}admin_listen = \"0.0.0.0:0\"\nadmin_token = \"t\"\n");
    let gw = Gateway::start(&config(&nylas.url(), &exposed)).await;
    let quota = format!("{}/v1/quota/{DEMO_GRANT_ID}", gw.admin);
    assert_eq!(status(&quota, Some("t")).await, 200);
    // The new file moves the listener to loopback (a restart would) and drops the token;
    // the reload keeps the running 0.0.0.0 listener.
    let loopback = format!("{server}admin_listen = \"127.0.0.1:0\"\n");
    let new = gateway::config::Config::from_toml_str(&config(&nylas.url(), &loopback)).unwrap();
    assert_eq!(gw.state.reload(new), ["server.admin_listen"]);
    assert_eq!(gw.state.config().server.admin_token, None);
    let resp = client().get(&quota).send().await.unwrap();
    gateway_error(resp, 401, "unauthorized").await;
    assert_eq!(status(&format!("{}/healthz", gw.admin), None).await, 200);
}

#[tokio::test]
async fn the_quota_api_reads_every_identifier_and_shows_and_clears_a_cool_down() {
    let nylas = fake().await;
    nylas.set_api_key(Some("nyk_admin_key".into()));
    let rest = "api_key = \"nyk_admin_key\"";
    let gw = Gateway::start(&config(&nylas.url(), rest)).await;
    let c = client();
    let send = || {
        c.post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth("nyk_admin_key")
        .json(&simple())
    };
    assert_eq!(send().send().await.unwrap().status(), 200);
    // Every identifier the proxy reads names the same quota.
    for form in [
        DEMO_GRANT_ID.to_owned(),
        DEMO_GRANT_ID.to_ascii_uppercase(),
        format!("grant:{DEMO_GRANT_ID}"),
        fake_nylas::DEMO_GRANT_EMAIL.to_owned(),
        format!("email:{}", fake_nylas::DEMO_GRANT_EMAIL),
    ] {
        let q = gw.quota(&form).await;
        assert_eq!(q["grant_id"], DEMO_GRANT_ID, "{form}: {q}");
        assert_eq!(q["windows"][0]["messages"]["used"], 1, "{form}: {q}");
        assert_eq!(q["cooldown"], serde_json::Value::Null, "{q}");
    }
    // A grant Nylas does not know is not shown as an idle one.
    for unknown in [
        "0d3c9f2e-8b1a-4c5d-9e6f-7a8b9c0d1e2f",
        "nobody@corp.example",
        "me",
    ] {
        let resp = gw
            .admin_get(&format!("/v1/quota/{unknown}"))
            .send()
            .await
            .unwrap();
        gateway_error(resp, 404, "not_found_error").await;
    }
    // The provider throttles: the cool-down shows, and clearing it lets sends through.
    nylas
        .add_rule(
            fake_nylas::Rule::rate_limited(30)
                .path("/messages/send")
                .times(1),
        )
        .unwrap();
    assert_eq!(send().send().await.unwrap().status(), 429);
    let q = gw.quota(fake_nylas::DEMO_GRANT_EMAIL).await;
    let left = q["cooldown"]["remaining_seconds"].as_u64().unwrap();
    assert!((1..=30).contains(&left), "{q}");
    let resp = send().send().await.unwrap();
    gateway_error(resp, 429, "provider_throttled").await;
    let resp = c
        .delete(format!("{}/v1/quota/{DEMO_GRANT_ID}/cooldown", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        gw.quota(DEMO_GRANT_ID).await["cooldown"],
        serde_json::Value::Null
    );
    assert_eq!(send().send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_config_override_applies_and_the_admin_api_takes_precedence() {
    let nylas = fake().await;
    let rest = format!("[grants.overrides]\n\"{DEMO_GRANT_ID}\" = \"google\"\n");
    let gw = Gateway::start(&config(&nylas.url(), &rest)).await;
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(
        (&q["profile"], &q["profile_source"]),
        (&json!("google"), &json!("config"))
    );
    let put = client()
        .put(format!("{}/v1/grants/{DEMO_GRANT_ID}/profile", gw.admin))
        .json(&json!({ "profile": "yahoo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(
        (&q["profile"], &q["profile_source"]),
        (&json!("yahoo"), &json!("override"))
    );
    let del = client()
        .delete(format!("{}/v1/grants/{DEMO_GRANT_ID}/profile", gw.admin))
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success());
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(q["profile_source"], "config", "{q}");
    // And sends are charged under it: google's windows, not icloud's.
    assert_eq!(gw.send_status(&simple()).await, 200);
    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(
        (&q["profile"], &q["windows"][0]["messages"]["used"]),
        (&json!("google"), &json!(1)),
        "{q}"
    );
}

#[tokio::test]
async fn metrics_speak_prometheus_text_unless_openmetrics_is_asked_for() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let resp = client()
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    // A counter family is named as its samples are.
    assert!(
        text.contains("# TYPE sendgw_config_reloads_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP sendgw_config_reloads_total "),
        "{text}"
    );
    // Series with known labels exist from start-up, at zero; and the build is named.
    for series in [
        "sendgw_config_reloads_total{result=\"failure\"} 0",
        "sendgw_reservations_settled_total{outcome=\"dropped\"} 0",
        "sendgw_units_total{metric=\"bytes\"} 0",
        "sendgw_threshold_crossings_total{level=\"100\"} 0",
        "sendgw_decisions_total{outcome=\"denied\",reason=\"recipients\"} 0",
        "sendgw_decisions_total{outcome=\"shadow_denied\",reason=\"message_too_large\"} 0",
        "sendgw_decisions_total{outcome=\"store_error\",reason=\"timeout\"} 0",
        "sendgw_decisions_total{outcome=\"allowed_uncounted\",reason=\"unavailable\"} 0",
        "sendgw_upstream_responses_total{class=\"5xx\"} 0",
        "sendgw_scheduled_total{event=\"cancelled\"} 0",
        "sendgw_webhooks_total{type=\"message.send_failed\",result=\"settled\"} 0",
    ] {
        assert!(text.lines().any(|l| l == series), "{series} in\n{text}");
    }
    let build = format!(
        "sendgw_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.lines().any(|l| l == build), "{build} in\n{text}");
    // Every family has its HELP and TYPE, and every sample belongs to a TYPE'd family.
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.split(' ').next())
        .collect();
    for name in &typed {
        assert!(text.contains(&format!("# HELP {name} ")), "HELP of {name}");
    }
    for sample in text.lines().filter(|l| !l.starts_with('#')) {
        let name = sample.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| typed.contains(base))
            .unwrap_or(name);
        assert!(typed.contains(&family), "{sample} has no TYPE line");
    }
    // The process's own metrics, as every client library names them.
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(rss.is_some_and(|v| v > 1e6), "resident memory in\n{text}");
    for family in [
        "process_cpu_seconds_total counter",
        "process_open_fds gauge",
    ] {
        assert!(text.contains(&format!("# TYPE {family}\n")), "{family}");
    }
    promtool_accepts(&text);
    // A scraper that prefers the text format gets it, though it would take OpenMetrics.
    let resp = client()
        .get(format!("{}/metrics", gw.admin))
        .header(
            "accept",
            "text/plain;q=0.9,application/openmetrics-text;q=0.5",
        )
        .send()
        .await
        .unwrap();
    let ct = resp.headers()["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
}

/// `promtool check metrics` (Debian's `prometheus` package, which `.ci/run` installs) finds
/// nothing to say about `text`. Without promtool the check is skipped, except under CI.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not run ({e}); `apt-get install prometheus` provides it");
            return;
        }
        Err(e) => panic!("promtool is needed under CI: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[tokio::test]
async fn explain_agrees_with_the_next_real_decision_and_charges_nothing() {
    let nylas = fake().await;
    let rest = "[grants]\ndefault_profile = \"tiny\"\n[profiles.tiny]\n\
                max_recipients_per_message = 3\n[[profiles.tiny.windows]]\n\
                period = \"1h\"\nmessages = 2\nrecipients = 4\n";
    let gw = Gateway::start(&config(&nylas.url(), rest)).await;
    let explain = |q: &str| gw.admin_get(&format!("/v1/quota/{DEMO_GRANT_ID}/explain?{q}"));
    let ask = |q: &'static str| async move {
        let resp = explain(q).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()
    };
    let decided = |e: &Value| {
        (
            e["admitted"].as_bool(),
            e["reason"].as_str().map(str::to_owned),
        )
    };
    let yes = (Some(true), Some("within_quota".to_owned()));
    let no = |reason: &str| (Some(false), Some(reason.to_owned()));
    let two = message(&["a@example.org", "b@example.org"], &[], &[]);
    let e = ask("recipients=2").await;
    assert_eq!(
        (decided(&e), &e["profile"], &e["shadow"]),
        (yes.clone(), &json!("tiny"), &json!(false)),
        "{e}"
    );
    // Asking charged nothing; the real send agrees.
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    assert_eq!(gw.send_status(&two).await, 200);
    // Now 2 recipients are left: a third would bind on recipients, and be refused.
    let e = ask("recipients=3").await;
    assert_eq!(decided(&e), no("recipients"), "{e}");
    assert_eq!(e["binding"]["remaining"], 2, "{e}");
    let three = message(
        &["a@example.org", "b@example.org", "c@example.org"],
        &[],
        &[],
    );
    assert_eq!(gw.send_status(&three).await, 429);
    // Two still fit; then the messages window is full.
    assert_eq!(decided(&ask("recipients=2").await), yes);
    assert_eq!(gw.send_status(&two).await, 200);
    let e = ask("recipients=1").await;
    assert_eq!(decided(&e), no("messages"));
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    // When it would fit: the refusal's own Retry-After, give or take the second between.
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let said = e["retry_after_seconds"].as_u64().unwrap();
    assert!(
        said.abs_diff(retry) <= 1,
        "{said} vs Retry-After {retry}: {e}"
    );
    assert!(e["fits_at"].as_u64().is_some(), "{e}");
    // Per-message caps come first, and bad questions are 400.
    assert_eq!(ask("recipients=4").await["reason"], "too_many_recipients");
    for bad in ["recipients=x", "send_at=soon", "nope=1"] {
        gateway_error(
            explain(bad).send().await.unwrap(),
            400,
            "invalid_request_error",
        )
        .await;
    }
}

#[tokio::test]
async fn explain_at_a_send_at_agrees_with_the_scheduled_send() {
    let nylas = fake().await;
    let rest = "[grants]\ndefault_profile = \"tiny\"\n[profiles.tiny]\n\
                [[profiles.tiny.windows]]\nperiod = \"1h\"\nmessages = 2\n";
    let gw = Gateway::start(&config(&nylas.url(), rest)).await;
    let ask = |q: String| {
        let req = gw.admin_get(&format!("/v1/quota/{DEMO_GRANT_ID}/explain?{q}"));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = now + 2 * 86_400;
    let scheduled = |t: u64| {
        let mut m = simple();
        m["send_at"] = json!(t);
        m
    };
    let e = ask(format!("send_at={at}")).await;
    assert_eq!(
        (&e["admitted"], &e["send_at"]),
        (&json!(true), &json!(at)),
        "{e}"
    );
    for _ in 0..2 {
        assert_eq!(gw.send_status(&scheduled(at)).await, 200);
    }
    // The hour around `at` is full: explained, then refused alike; a send now still fits.
    let e = ask(format!("send_at={at}")).await;
    assert_eq!(
        (&e["admitted"], &e["reason"]),
        (&json!(false), &json!("messages")),
        "{e}"
    );
    assert_eq!(e["binding"]["window"], "1h", "{e}");
    assert_eq!(e["binding"]["used"], 2, "{e}");
    assert_eq!(gw.send_status(&scheduled(at)).await, 429);
    assert_eq!(ask(String::new()).await["admitted"], true);
    // A send_at within Nylas's two minutes goes out at once and is charged now: explained
    // as a send now (its binding window has room left), with the send_at echoed.
    let near = ask(format!("send_at={}", now + 60)).await;
    assert_eq!(
        (&near["admitted"], &near["send_at"]),
        (&json!(true), &json!(now + 60)),
        "{near}"
    );
    assert!(near["binding"].get("remaining").is_some(), "{near}");
    // When it would fit is an instant the real send takes.
    let fits = e["fits_at"].as_u64().unwrap();
    assert!(fits > at, "{e}");
    assert_eq!(ask(format!("send_at={fits}")).await["admitted"], true);
    assert_eq!(gw.send_status(&scheduled(fits)).await, 200);
    assert_eq!(nylas.sends().len(), 3, "explaining sent nothing");
}

/// With `[upstream] api_key`, a removal (reset, cool-down clear, override removal) of a
/// grant id goes through when Nylas cannot vouch for it: the grant was deleted (404) or
/// Nylas is down. Reads still answer 404 for a grant Nylas does not know.
#[tokio::test]
async fn removals_of_a_grant_id_need_no_word_from_nylas() {
    let nylas = fake().await;
    nylas.set_api_key(Some("nyk_admin_key".into()));
    let gw = Gateway::start(&config(&nylas.url(), "api_key = \"nyk_admin_key\"")).await;
    let gone = "0b7c5a1e-9d3f-4e2a-8c6b-1f2e3d4c5b6a";
    let scope = gateway::scope::Scope::grant(gone);
    let store = gw.state.store.as_ref();
    store
        .meta_set(scope.as_str(), limits::META_PROFILE, "icloud", None)
        .await
        .unwrap();
    store
        .cool_down(scope.as_str(), Duration::from_secs(600))
        .await
        .unwrap();
    let c = client();
    let delete = |path: String| c.delete(format!("{}{path}", gw.admin)).send();
    assert_eq!(
        gw.admin_get(&format!("/v1/quota/{gone}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    for path in [
        format!("/v1/grants/{gone}/profile"),
        format!("/v1/quota/{gone}/cooldown"),
        format!("/v1/quota/{gone}"),
    ] {
        assert_eq!(delete(path.clone()).await.unwrap().status(), 204, "{path}");
    }
    let left = |name| store.meta_get(scope.as_str(), name);
    assert_eq!(
        left(limits::META_PROFILE).await.unwrap(),
        None,
        "the stale override is gone"
    );
    assert_eq!(
        left(limits::META_COOLDOWN).await.unwrap(),
        None,
        "the cool-down is gone"
    );
    // Nylas down: a reset of a grant id still goes through; an email still needs Nylas.
    nylas
        .add_rule(fake_nylas::Rule::status(500).path("/v3/grants/"))
        .unwrap();
    let reset = delete(format!("/v1/quota/{DEMO_GRANT_ID}")).await.unwrap();
    assert_eq!(reset.status(), 204);
    let by_email = delete(format!("/v1/quota/{}", fake_nylas::DEMO_GRANT_EMAIL))
        .await
        .unwrap();
    assert_eq!(by_email.status(), 502);
}
