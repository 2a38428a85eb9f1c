//! Shadow mode end to end: a send over its quota (or a per-message cap) is forwarded,
//! counted once it went out, decided `shadow_denied` and named in `Send-Gateway-Would-Deny`;
//! a profile can be in shadow alone; a reload switches the mode.

mod common;

use common::*;
use fake_nylas::{DEMO_GRANT_ID, Rule};
use gateway::config::Config;
use serde_json::json;

/// Two messages a minute, two recipients a message, under `mode`, with `rest` after.
fn tiny(nylas: &fake_nylas::FakeNylas, mode: &str, rest: &str) -> String {
    config(
        &nylas.url(),
        &format!(
            "[enforcement]\nmode = \"{mode}\"\n[grants]\ndefault_profile = \"tiny\"\n\
             [profiles.tiny]\nmax_recipients_per_message = 2\n{rest}\n\
             [[profiles.tiny.windows]]\nperiod = \"1m\"\nmessages = 2\nrecipients = 10\n"
        ),
    )
}

async fn send(gw: &Gateway, to: &[&str]) -> reqwest::Response {
    gw.send_json(&client(), DEMO_GRANT_ID, &message(to, &[], &[]))
        .send()
        .await
        .unwrap()
}

/// The hex SHA-256 of the client token `app-token`, as `[[clients]] token_sha256` takes it.
fn app_digest() -> String {
    gateway::config::token_digest(b"app-token")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn would_deny(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("send-gateway-would-deny")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn in_shadow_a_send_over_its_quota_goes_out_counted_and_reported() {
    let nylas = fake().await;
    let gw = Gateway::start(&tiny(&nylas, "shadow", "")).await;
    for _ in 0..2 {
        let resp = send(&gw, &["a@example.org"]).await;
        assert_eq!((resp.status().as_u16(), would_deny(&resp)), (200, None));
    }
    let resp = send(&gw, &["a@example.org"]).await;
    assert_eq!(resp.status(), 200, "forwarded, not refused");
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
    // Over a per-message cap too.
    let resp = send(&gw, &["a@example.org", "b@example.org", "c@example.org"]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(would_deny(&resp).as_deref(), Some("too_many_recipients"));
    assert_eq!(nylas.delivered().len(), 4);
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (4, 6),
        "every send that went out counts"
    );
    let m = gw.metrics().await;
    for (reason, n) in [("messages", 1.0), ("too_many_recipients", 1.0)] {
        let labels = format!("outcome=\"shadow_denied\",reason=\"{reason}\"");
        assert_eq!(
            metric_value(&m, "sendgw_decisions_total", &labels),
            n,
            "{m}"
        );
    }
    assert_eq!(
        metric_value(&m, "sendgw_units_total", "metric=\"messages\""),
        4.0,
        "{m}"
    );
}

#[tokio::test]
async fn in_shadow_a_send_nylas_refuses_is_not_counted() {
    let nylas = fake().await;
    let gw = Gateway::start(&tiny(&nylas, "shadow", "")).await;
    for _ in 0..2 {
        assert_eq!(send(&gw, &["a@example.org"]).await.status(), 200);
    }
    nylas
        .add_rule(Rule::status(400).path("/messages/send").times(1))
        .unwrap();
    let resp = send(&gw, &["a@example.org"]).await;
    assert_eq!(resp.status(), 400, "Nylas's answer");
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 2), "nothing went out");
}

#[tokio::test]
async fn a_profile_can_be_in_shadow_alone_and_a_reload_switches_the_mode() {
    let nylas = fake().await;
    let toml = tiny(&nylas, "enforce", "shadow = true");
    let gw = Gateway::start(&toml).await;
    for _ in 0..3 {
        assert_eq!(send(&gw, &["a@example.org"]).await.status(), 200);
    }
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (3, 3));
    // The profile leaves shadow on reload: the next send over the quota is refused.
    let enforced = Config::from_toml_str(&toml.replace("shadow = true", "")).unwrap();
    assert!(gw.state.reload(enforced).is_empty());
    let resp = send(&gw, &["a@example.org"]).await;
    assert_eq!(would_deny(&resp), None);
    gateway_error(resp, 429, "quota_exceeded").await;
    // And `[enforcement] mode = "shadow"` puts every profile in shadow.
    let shadow = Config::from_toml_str(&tiny(&nylas, "shadow", "")).unwrap();
    assert!(gw.state.reload(shadow).is_empty());
    let resp = send(&gw, &["a@example.org"]).await;
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
    assert_eq!(nylas.delivered().len(), 4);
}

#[tokio::test]
async fn in_shadow_a_send_whose_client_leaves_before_the_answer_still_counts() {
    let nylas = fake().await;
    let gw = Gateway::start(&tiny(&nylas, "shadow", "")).await;
    for _ in 0..2 {
        assert_eq!(send(&gw, &["a@example.org"]).await.status(), 200);
    }
    // Nylas holds the third send; the client gives up while it waits.
    nylas
        .add_rule(
            Rule::delay(std::time::Duration::from_millis(800))
                .path("/messages/send")
                .times(1),
        )
        .unwrap();
    let quick = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let gave_up = gw
        .send_json(
            &quick,
            DEMO_GRANT_ID,
            &message(&["a@example.org"], &[], &[]),
        )
        .send()
        .await;
    assert!(gave_up.is_err(), "the client left before the answer");
    // Nylas may have sent it (here it does): it is counted all the same.
    eventually("the abandoned send is counted", || async {
        gw.used(DEMO_GRANT_ID).await == (3, 3)
    })
    .await;
}

#[tokio::test]
async fn a_client_quota_in_shadow_is_counted_when_the_grant_defers_the_send() {
    let nylas = fake().await;
    let digest = app_digest();
    // The grant's profile defers a full window; the client's own profile is in shadow.
    let toml = config(
        &nylas.url(),
        &format!(
            "api_key = \"k\"\n[grants]\ndefault_profile = \"tiny\"\n\
             [profiles.tiny]\ndefer_up_to = \"1d\"\n\
             [[profiles.tiny.windows]]\nperiod = \"1m\"\nmessages = 1\n\
             [profiles.mine]\nshadow = true\n\
             [[profiles.mine.windows]]\nperiod = \"1d\"\nmessages = 1\n\
             [[clients]]\nname = \"app\"\ntoken_sha256 = \"{digest}\"\nprofile = \"mine\"\n"
        ),
    );
    let gw = Gateway::start(&toml).await;
    let post = || {
        client()
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
                gw.url
            ))
            .bearer_auth("app-token")
            .json(&simple())
    };
    assert_eq!(post().send().await.unwrap().status(), 200);
    // The grant's minute is full: deferred. The client's day is full too: shadow.
    let resp = post().send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("send-gateway-deferred-until"));
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
    let config = gw.state.config();
    let mine = config.profile("mine").unwrap();
    let scope = gateway::scope::Scope::client("app");
    let usage = gw.state.store.usage(scope.as_str(), mine).await.unwrap();
    let w = &usage.windows[0];
    assert_eq!(w.used.messages + w.scheduled.messages, 2, "{usage:?}");
}

#[tokio::test]
async fn a_client_quota_not_in_shadow_holds_when_the_grants_quota_is_in_shadow() {
    let nylas = fake().await;
    let digest = app_digest();
    // The grant's profile is in shadow, one message a minute; the client's is enforced,
    // two a day.
    let toml = config(
        &nylas.url(),
        &format!(
            "api_key = \"k\"\n[grants]\ndefault_profile = \"tiny\"\n\
             [profiles.tiny]\nshadow = true\n\
             [[profiles.tiny.windows]]\nperiod = \"1m\"\nmessages = 1\n\
             [profiles.mine]\n[[profiles.mine.windows]]\nperiod = \"1d\"\nmessages = 2\n\
             [[clients]]\nname = \"app\"\ntoken_sha256 = \"{digest}\"\nprofile = \"mine\"\n"
        ),
    );
    let gw = Gateway::start(&toml).await;
    let post = || {
        client()
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
                gw.url
            ))
            .bearer_auth("app-token")
            .json(&simple())
    };
    assert_eq!(post().send().await.unwrap().status(), 200);
    // The grant's minute is full (only reported); the client's day still has room.
    let resp = post().send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
    // Now the client's day is full, and it is not in shadow: refused.
    let resp = post().send().await.unwrap();
    gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(nylas.delivered().len(), 2);
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await.0,
        2,
        "both that went out count"
    );
    let m = gw.metrics().await;
    let units = metric_value(&m, "sendgw_units_total", "metric=\"messages\"");
    assert_eq!(units, 2.0, "units counted once per send: {m}");
}

/// A client's own profile in shadow names a send over its whole window as the per-message
/// refusal enforcing would answer (422 `too_many_recipients`), as a grant's does.
#[tokio::test]
async fn a_client_quota_in_shadow_names_a_send_over_its_whole_window_as_enforce_would() {
    let nylas = fake().await;
    let digest = app_digest();
    let toml = config(
        &nylas.url(),
        &format!(
            "api_key = \"k\"\n[grants]\ndefault_profile = \"roomy\"\n\
             [profiles.roomy]\n[[profiles.roomy.windows]]\nperiod = \"1d\"\nmessages = 100\n\
             [profiles.mine]\nshadow = true\n\
             [[profiles.mine.windows]]\nperiod = \"1d\"\nrecipients = 2\n\
             [[clients]]\nname = \"app\"\ntoken_sha256 = \"{digest}\"\nprofile = \"mine\"\n"
        ),
    );
    let gw = Gateway::start(&toml).await;
    let to = ["a@example.org", "b@example.org", "c@example.org"];
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth("app-token")
        .json(&message(&to, &[], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "forwarded in shadow");
    assert_eq!(would_deny(&resp).as_deref(), Some("too_many_recipients"));
    let m = gw.metrics().await;
    let labels = "outcome=\"shadow_denied\",reason=\"too_many_recipients\"";
    assert_eq!(
        metric_value(&m, "sendgw_decisions_total", labels),
        1.0,
        "{m}"
    );
}

/// Explain in shadow says what enforcing would refuse, and that it is only reported: the
/// next real send is forwarded with the same reason in its header.
#[tokio::test]
async fn explain_in_shadow_names_the_refusal_and_that_it_is_only_reported() {
    let nylas = fake().await;
    let gw = Gateway::start(&tiny(&nylas, "shadow", "")).await;
    let explain = || async {
        let url = format!("/v1/quota/{DEMO_GRANT_ID}/explain");
        let resp = gw.admin_get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.unwrap()
    };
    let e = explain().await;
    assert_eq!(
        (&e["admitted"], &e["shadow"]),
        (&json!(true), &json!(true)),
        "{e}"
    );
    for _ in 0..2 {
        send(&gw, &["a@example.org"]).await;
    }
    let e = explain().await;
    assert_eq!(
        (&e["admitted"], &e["reason"], &e["shadow"]),
        (&json!(false), &json!("messages"), &json!(true)),
        "{e}"
    );
    let resp = send(&gw, &["a@example.org"]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(would_deny(&resp).as_deref(), Some("messages"));
}
