//! End to end: the admin listener's health, readiness, metrics and quota API.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, WAIT, client, config, fake, gateway_error, simple};
use fake_nylas::DEMO_GRANT_ID;
use serde_json::{Value, json};
use testkit::RedisServer;

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
    let resp = c.get(format!("{}/metrics", gw.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = resp.text().await.unwrap();
    let allowed = text
        .lines()
        .find(|l| l.starts_with("sendgw_decisions_total{") && l.contains("outcome=\"allowed\""))
        .unwrap_or_else(|| panic!("an allowed decision counted:\n{text}"));
    assert!(allowed.ends_with(" 1"), "{allowed}");

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
    let resp = c
        .get(format!("{}/v1/quota/demo@example.com", gw.admin))
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
