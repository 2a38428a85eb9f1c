//! End to end: Nylas's outcome webhooks for scheduled sends. A signed `message.send_failed`
//! gives the scheduled charge back (on both stores), a forged one changes nothing, a
//! duplicate is dropped, `message.send_success` keeps the charge, and the endpoint answers
//! Nylas's challenge, on the admin listener or a listener of its own.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Gateway, client, config, fake, message, metric_value, redis_store};
use fake_nylas::{DEMO_GRANT_ID, FakeNylas};
use serde_json::{Value, json};

const SECRET: &str = "whsec_test";

fn toml(upstream: &str, store: &str, hooks: &str) -> String {
    config(
        upstream,
        &format!(
            "{store}\n[grants]\ndefault_profile = \"ten\"\n\n{hooks}\n\
             [[profiles.ten.windows]]\nperiod = \"10m\"\nbuckets = 10\nmessages = 3\n"
        ),
    )
}

fn with_secret() -> String {
    format!("[webhooks]\nsecret = \"{SECRET}\"\n")
}

fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn notification(id: &str, kind: &str, schedule_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "type": kind,
        "source": "/google/emails/realtime",
        "id": id,
        "time": 1_900_000_000,
        "data": {
            "application_id": "app",
            "object": { "grant_id": DEMO_GRANT_ID, "schedule_id": schedule_id, "send_at": 1 }
        }
    }))
    .unwrap()
}

async fn post(base: &str, body: &[u8], signature: &str) -> u16 {
    client()
        .post(format!("{base}/v1/nylas/webhooks"))
        .header("x-nylas-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Three sends scheduled five minutes ahead (a live send is then refused); their ids.
async fn fill_with_scheduled(gw: &Gateway) -> Vec<String> {
    let soon = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut m = message(&["a@example.org"], &[], &[]);
        m["send_at"] = json!(soon);
        let resp = gw
            .send_json(&client(), DEMO_GRANT_ID, &m)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        ids.push(answer["data"]["schedule_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(live(gw).await, 429);
    ids
}

async fn live(gw: &Gateway) -> u16 {
    let m = message(&["b@example.org"], &[], &[]);
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &m)
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

async fn failure_frees_forgery_does_not(gw: &Gateway, _nylas: &FakeNylas) {
    let ids = fill_with_scheduled(gw).await;
    let body = notification("n-1", "message.send_failed", &ids[0]);
    assert_eq!(post(&gw.admin, &body, &sign("wrong", &body)).await, 401);
    assert_eq!(post(&gw.admin, &body, "").await, 401);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(post(&gw.admin, &tampered, &sign(SECRET, &body)).await, 401);
    assert_eq!(live(gw).await, 429, "a forged webhook changed nothing");
    assert_eq!(post(&gw.admin, &body, &sign(SECRET, &body)).await, 200);
    assert_eq!(live(gw).await, 200, "the failed send's slot is free");
    // Delivered again: dropped by its id. Another id for the same schedule: nothing left.
    assert_eq!(post(&gw.admin, &body, &sign(SECRET, &body)).await, 200);
    let again = notification("n-2", "message.send_failed", &ids[0]);
    assert_eq!(post(&gw.admin, &again, &sign(SECRET, &again)).await, 200);
    assert_eq!(live(gw).await, 429);
    let m = gw.metrics().await;
    let count = |result: &str| {
        let labels = format!("type=\"message.send_failed\",result=\"{result}\"");
        metric_value(&m, "sendgw_webhooks_total", &labels)
    };
    assert_eq!(
        (count("settled"), count("duplicate"), count("unknown")),
        (1.0, 1.0, 1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "sendgw_webhooks_total",
            "type=\"unknown\",result=\"bad_signature\""
        ),
        3.0
    );
}

async fn success_keeps_the_charge(gw: &Gateway, _nylas: &FakeNylas) {
    let ids = fill_with_scheduled(gw).await;
    let body = notification("s-1", "message.send_success", &ids[1]);
    assert_eq!(post(&gw.admin, &body, &sign(SECRET, &body)).await, 200);
    assert_eq!(live(gw).await, 429);
    // The record is gone: a late cancel gives nothing back either.
    let url = format!(
        "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/{}",
        gw.url, ids[1]
    );
    let resp = client()
        .delete(url)
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(live(gw).await, 429);
    let other = notification("o-1", "grant.updated", "x");
    assert_eq!(post(&gw.admin, &other, &sign(SECRET, &other)).await, 200);
}

macro_rules! on_both_stores {
    ($name:ident, $test:ident) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn memory() {
                let nylas = fake().await;
                let gw = Gateway::start(&toml(&nylas.url(), "", &with_secret())).await;
                $test(&gw, &nylas).await;
                gw.shutdown().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let redis = testkit::RedisServer::start();
                let nylas = fake().await;
                let gw =
                    Gateway::start(&toml(&nylas.url(), &redis_store(&redis), &with_secret())).await;
                $test(&gw, &nylas).await;
                gw.shutdown().await;
            }
        }
    };
}

on_both_stores!(failure, failure_frees_forgery_does_not);
on_both_stores!(success, success_keeps_the_charge);

#[tokio::test]
async fn the_challenge_is_answered_and_notifications_need_a_secret() {
    let nylas = fake().await;
    let gw = Gateway::start(&toml(&nylas.url(), "", &with_secret())).await;
    let resp = client()
        .get(format!("{}/v1/nylas/webhooks?challenge=abc123", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(resp.text().await.unwrap(), "abc123");
    let resp = client()
        .get(format!("{}/v1/nylas/webhooks", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    gw.shutdown().await;

    // Registering comes before Nylas hands out the secret: the challenge needs none.
    let gw = Gateway::start(&toml(&nylas.url(), "", "")).await;
    let resp = client()
        .get(format!("{}/v1/nylas/webhooks?challenge=first", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "first");
    let body = notification("n", "message.send_failed", "s");
    assert_eq!(post(&gw.admin, &body, &sign(SECRET, &body)).await, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_listener_of_its_own_serves_it() {
    let nylas = fake().await;
    let hooks = format!("{}listen = \"127.0.0.1:0\"\n", with_secret());
    let cfg = gateway::config::Config::from_toml_str(&toml(&nylas.url(), "", &hooks)).unwrap();
    let state = Arc::new(gateway::AppState::new(cfg).await.unwrap());
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (proxy, admin, own) = (
        bind().await.unwrap(),
        bind().await.unwrap(),
        bind().await.unwrap(),
    );
    let (admin_url, own_url) = (
        format!("http://{}", admin.local_addr().unwrap()),
        format!("http://{}", own.local_addr().unwrap()),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gateway::run_with_webhooks(
        proxy,
        admin,
        Some(own),
        state,
        async {
            let _ = stopped.await;
        },
    ));
    let challenge = |base: String| async move {
        client()
            .get(format!("{base}/v1/nylas/webhooks?challenge=c"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(challenge(own_url).await, 200);
    assert_eq!(
        challenge(admin_url).await,
        404,
        "not on the admin listener then"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
