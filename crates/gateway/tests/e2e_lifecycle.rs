//! End to end with the real binary: SIGHUP reloads the configuration without losing usage
//! (and keeps the running one when the new file is bad); SIGTERM drains in-flight sends,
//! turns readiness to 503 and exits 0.

mod common;

use std::time::Duration;

use common::{Gateway, Process, WAIT, client, fake, metric_value, redis_store};
use fake_nylas::{FakeNylas, Grant, Rule};
use serde_json::Value;
use testkit::RedisServer;
use testkit::process::{Expect, Server};

/// A file for the binary: both listeners on port 0, `extra` tables, and one profile
/// `daily` of `messages` per rolling 24 h for every grant.
fn file(nylas: &FakeNylas, extra: &str, messages: u64) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "10s"

[upstream]
url = "{nylas}"
timeout = "30s"

{extra}

[grants]
default_profile = "daily"

[profiles.daily]
[[profiles.daily.windows]]
period = "24h"
messages = {messages}
"#,
        nylas = nylas.url(),
    )
}

const SUCCESS: &str = "result=\"success\"";
const FAILURE: &str = "result=\"failure\"";
const RELOADS: &str = "sendgw_config_reloads_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_limit_without_losing_usage_and_refuses_a_bad_file() {
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("h@corp.example")).id;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, file(&nylas, "", 10)).expect("write config");
    let gw = Process::spawn(&path);

    for _ in 0..2 {
        assert_eq!(gw.send_once(&grant).await.0, 200);
    }
    let m = gw.metrics().await;
    assert_eq!(metric_value(&m, RELOADS, SUCCESS), 0.0, "{m}");

    // Tighter: 3 a day. The 2 already sent still count, so exactly 1 more passes.
    std::fs::write(&path, file(&nylas, "", 3)).expect("rewrite config");
    gw.signal("HUP");
    gw.wait_metric(RELOADS, SUCCESS, 1.0).await;
    assert_eq!(gw.send_once(&grant).await.0, 200);
    let (status, body) = gw.send_once(&grant).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "quota_exceeded", "{body}");
    assert_eq!(body["error"]["quota"]["limit"], 3, "{body}");
    assert_eq!(body["error"]["quota"]["used"], 3, "{body}");
    let q = gw.quota(&grant).await;
    assert_eq!(q["windows"][0]["messages"]["limit"], 3, "{q}");
    assert_eq!(q["windows"][0]["messages"]["used"], 3, "{q}");
    assert_eq!(nylas.sends().len(), 3);

    // A bad file (a generous limit next to an unknown key) is refused whole.
    let broken = file(&nylas, "", 100).replace("[server]", "[server]\nno_such_key = true");
    std::fs::write(&path, broken).expect("write broken config");
    gw.signal("HUP");
    let m = gw.wait_metric(RELOADS, FAILURE, 1.0).await;
    assert_eq!(metric_value(&m, RELOADS, SUCCESS), 1.0, "{m}");
    let (status, body) = gw.send_once(&grant).await;
    assert_eq!(status, 429, "still judged under the old limit: {body}");
    assert_eq!(body["error"]["quota"]["limit"], 3, "{body}");
    // Unparseable TOML too.
    std::fs::write(&path, "[grants\n").expect("write broken config");
    gw.signal("HUP");
    gw.wait_metric(RELOADS, FAILURE, 2.0).await;
    assert_eq!(gw.send_once(&grant).await.0, 429);
    assert_eq!(gw.quota(&grant).await["windows"][0]["messages"]["limit"], 3);
    assert_eq!(nylas.sends().len(), 3);

    // A good file is taken again afterwards.
    std::fs::write(&path, file(&nylas, "", 4)).expect("rewrite config");
    gw.signal("HUP");
    gw.wait_metric(RELOADS, SUCCESS, 2.0).await;
    assert_eq!(gw.send_once(&grant).await.0, 200);
    assert_eq!(gw.send_once(&grant).await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_send_and_exits_zero() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let grant = nylas.add_grant(Grant::new("s@corp.example")).id;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, file(&nylas, &redis_store(&redis), 10)).expect("write config");
    let mut gw = Process::spawn(&path);
    let ready = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    // A send that Nylas holds for 2 s.
    nylas
        .add_rule(
            Rule::delay(Duration::from_secs(2))
                .path("/messages/send")
                .times(1),
        )
        .expect("rule");
    let in_flight = tokio::spawn(gw.send(&grant).send());
    assert!(
        nylas
            .wait_until(WAIT, |all| all.iter().any(|r| r.is_send()))
            .await,
        "the send reached Nylas"
    );

    gw.signal("TERM");
    // Readiness turns 503 at once.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = client()
            .get(format!("{}/readyz", gw.admin))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if matches!(answer, Ok(503)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness did not turn 503 (last answer {answer:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No new connections are taken on the proxy.
    let proxy = gw.url.trim_start_matches("http://").to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(&proxy).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy still takes connections while draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The in-flight send completes...
    let resp = in_flight
        .await
        .expect("send task")
        .expect("the in-flight send is answered");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("Nylas's JSON");
    assert!(body["data"]["id"].is_string(), "{body}");
    // ...and the process exits 0 within shutdown_grace (10 s; WAIT more for slow hosts).
    let status = gw
        .exit_status(Duration::from_secs(10) + WAIT)
        .await
        .expect("send-gateway exited after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert_eq!(nylas.delivered().len(), 1);

    // The send was counted and its reservation kept: another gateway on the same Redis
    // sees it.
    let toml = format!(
        "[upstream]\nurl = \"{}\"\n{}\n[grants]\ndefault_profile = \"daily\"\n\
         [profiles.daily]\n[[profiles.daily.windows]]\nperiod = \"24h\"\nmessages = 10\n",
        nylas.url(),
        redis_store(&redis)
    );
    let after = Gateway::start(&toml).await;
    assert_eq!(after.used(&grant).await.0, 1);
}

#[tokio::test]
async fn logs_name_each_decision_and_never_a_credential_body_or_address() {
    let nylas = fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[log]\nformat = \"json\"\n\
             [grants]\ndefault_profile = \"one\"\n\
             [profiles.one]\n[[profiles.one.windows]]\nperiod = \"24h\"\nmessages = 1\n",
            nylas.url()
        ),
    )
    .expect("write config");
    let log = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let mut cmd = testkit::process::send_gateway(env!("CARGO_BIN_EXE_send-gateway"), &config);
    // The most verbose level, so nothing is hidden by the filter.
    cmd.env("RUST_LOG", "trace").stderr(stderr);
    let mut gw = Server::spawn(&mut cmd, "send-gateway", Expect::Listening, WAIT);
    let url = gw.url().to_owned();
    let secret_token = "tok_very_secret_123";
    let message = serde_json::json!({
        "to": [{"email": "hidden.person@example.org", "name": "Hidden Person"}],
        "subject": "subject-marker-xyz",
        "body": "body-marker-xyz",
    });
    let grant = fake_nylas::DEMO_GRANT_ID;
    for expected in [200, 429] {
        let resp = client()
            .post(format!("{url}/v3/grants/{grant}/messages/send"))
            .bearer_auth(secret_token)
            .json(&message)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), expected);
    }
    // SIGTERM, as an operator stops it: log lines are written by a background thread,
    // and an orderly exit flushes every one still queued.
    gw.signal("TERM");
    let deadline = tokio::time::Instant::now() + WAIT;
    while gw.try_wait().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "exits after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(gw);
    let text = std::fs::read_to_string(&log).expect("read log");
    let decisions: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.to_string().contains("send decision"))
        .collect();
    assert_eq!(decisions.len(), 2, "one line per send decision:\n{text}");
    let joined = decisions.iter().map(Value::to_string).collect::<String>();
    for field in ["request_id", "grant", "decision", "reason"] {
        assert!(joined.contains(field), "{field} in {joined}");
    }
    assert!(
        joined.contains("\"allowed\"") && joined.contains("\"denied\""),
        "{joined}"
    );
    for secret in [
        secret_token,
        "hidden.person",
        "Hidden Person",
        "subject-marker",
        "body-marker",
    ] {
        assert!(!text.contains(secret), "the log holds {secret:?}:\n{text}");
    }
}
