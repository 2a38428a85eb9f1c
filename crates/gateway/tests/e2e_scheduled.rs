//! End to end, on both stores: scheduled sends count at their `send_at`, a cancel gives the
//! charge back, and a send a full window refuses can be put off instead (opt in).

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Gateway, TOKEN, client, config, fake, gateway_error, message, redis_store};
use fake_nylas::{DEMO_GRANT_ID, FakeNylas};
use serde_json::{Value, json};
use testkit::multipart::Multipart;

/// Ten minutes in one-minute buckets, three messages; `extra` adds keys to the profile.
fn gateway_toml(upstream: &str, store: &str, extra: &str) -> String {
    config(
        upstream,
        &format!(
            "{store}\n[grants]\ndefault_profile = \"ten\"\n\n[profiles.ten]\n{extra}\n\
             [[profiles.ten.windows]]\nperiod = \"10m\"\nbuckets = 10\nmessages = 3\n"
        ),
    )
}

/// Runs `test` once on the memory store and once on a private Redis.
macro_rules! on_both_stores {
    ($name:ident, $extra:expr, $test:ident) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn memory() {
                let nylas = fake().await;
                let gw = Gateway::start(&gateway_toml(&nylas.url(), "", $extra)).await;
                $test(&gw, &nylas).await;
                gw.shutdown().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let redis = testkit::RedisServer::start();
                let nylas = fake().await;
                let toml = gateway_toml(&nylas.url(), &redis_store(&redis), $extra);
                let gw = Gateway::start(&toml).await;
                $test(&gw, &nylas).await;
                gw.shutdown().await;
            }
        }
    };
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A send going out now.
fn live() -> Value {
    message(&["b@example.org"], &[], &[])
}

fn scheduled(send_at: u64) -> Value {
    let mut m = message(&["a@example.org"], &[], &[]);
    m["send_at"] = json!(send_at);
    m
}

/// Sends `body` as JSON and returns the status, the deferral header and the answer.
async fn send(gw: &Gateway, body: &Value, defer: Option<&str>) -> (u16, Option<u64>, Value) {
    let mut req = gw.send_json(&client(), DEMO_GRANT_ID, body);
    if let Some(d) = defer {
        req = req.header("send-gateway-defer", d);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let deferred = resp
        .headers()
        .get("send-gateway-deferred-until")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, deferred, resp.json().await.unwrap_or(Value::Null))
}

async fn post(gw: &Gateway, body: &Value) -> reqwest::Response {
    gw.send_json(&client(), DEMO_GRANT_ID, body)
        .send()
        .await
        .unwrap()
}

async fn window(gw: &Gateway) -> Value {
    gw.quota(DEMO_GRANT_ID).await["windows"][0]["messages"].clone()
}

async fn cancel(gw: &Gateway, schedule_id: &str) -> u16 {
    client()
        .delete(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/{schedule_id}",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn scheduled_beyond_the_window_leave_now_free(gw: &Gateway, nylas: &FakeNylas) {
    let later = now_secs() + 3600;
    for _ in 0..3 {
        let (status, _, answer) = send(gw, &scheduled(later), None).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["data"]["schedule_id"].is_string(), "{answer}");
    }
    let w = window(gw).await;
    assert_eq!(
        (
            w["used"].clone(),
            w["scheduled"].clone(),
            w["remaining"].clone()
        ),
        (json!(0), json!(3), json!(3))
    );
    for _ in 0..3 {
        assert_eq!(send(gw, &live(), None).await.0, 200);
    }
    let resp = post(gw, &live()).await;
    gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(nylas.sends().len(), 6);
}

async fn four_in_a_span_around_scheduled_sends_are_refused(gw: &Gateway, nylas: &FakeNylas) {
    let soon = now_secs() + 300;
    for _ in 0..3 {
        assert_eq!(send(gw, &scheduled(soon), None).await.0, 200);
    }
    // Nothing sent yet, but a send now would be the fourth in a ten-minute stretch.
    let resp = post(gw, &live()).await;
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((300..=1000).contains(&retry), "Retry-After {retry}");
    gateway_error(resp, 429, "quota_exceeded").await;
    // So would a fourth scheduled in the same stretch; its answer names a send_at that fits.
    let resp = post(gw, &scheduled(soon + 120)).await;
    assert!(resp.headers().get("retry-after").is_none());
    let body = gateway_error(resp, 429, "quota_exceeded").await;
    let earliest = body["error"]["quota"]["earliest_send_at"].as_u64().unwrap();
    assert!(earliest > soon + 600, "{body}");
    assert_eq!(send(gw, &scheduled(earliest), None).await.0, 200);
    assert_eq!(nylas.sends().len(), 4);
}

async fn a_cancel_frees_its_slot_once(gw: &Gateway, _nylas: &FakeNylas) {
    let soon = now_secs() + 300;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, _, answer) = send(gw, &scheduled(soon), None).await;
        assert_eq!(status, 200);
        ids.push(answer["data"]["schedule_id"].as_str().unwrap().to_owned());
    }
    let live = live();
    assert_eq!(send(gw, &live, None).await.0, 429);
    assert_eq!(cancel(gw, &ids[0]).await, 202);
    assert_eq!(window(gw).await["scheduled"], 2);
    assert_eq!(send(gw, &live, None).await.0, 200);
    // A second cancel of the same schedule gives nothing more back.
    assert_eq!(cancel(gw, &ids[0]).await, 202);
    assert_eq!(send(gw, &live, None).await.0, 429);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("sendgw_scheduled_total{event=\"cancelled\"} 1"),
        "{metrics}"
    );
}

async fn a_full_window_defers_a_send_that_asks(gw: &Gateway, nylas: &FakeNylas) {
    let live = live();
    for _ in 0..3 {
        assert_eq!(send(gw, &live, None).await.0, 200);
    }
    // Never opted in: today's 429, and the header says no.
    assert_eq!(send(gw, &live, None).await.0, 429);
    assert_eq!(send(gw, &live, Some("never")).await.0, 429);
    let before = now_secs();
    let (status, deferred, answer) = send(gw, &live, Some("allow")).await;
    assert_eq!(status, 200, "{answer}");
    let until = deferred.expect("Send-Gateway-Deferred-Until");
    // The first instant the window takes it: the live sends' stretch has passed.
    assert!(
        until >= before + 600 && until <= before + 720,
        "{until} vs {before}"
    );
    assert_eq!(
        answer["data"]["send_at"], until,
        "Nylas's body, with the send_at given"
    );
    let sends = nylas.sends();
    let forwarded: Value = serde_json::from_slice(&sends.last().unwrap().body).unwrap();
    assert_eq!(forwarded["send_at"], until);
    assert!(sends.last().unwrap().header("send-gateway-defer").is_none());
    assert_eq!(window(gw).await["scheduled"], 1);
    assert_eq!(send(gw, &live, Some("sometimes")).await.0, 400);
}

async fn a_profile_defers_without_being_asked(gw: &Gateway, _nylas: &FakeNylas) {
    let live = live();
    for _ in 0..3 {
        assert_eq!(send(gw, &live, None).await.0, 200);
    }
    let (status, deferred, _) = send(gw, &live, None).await;
    assert_eq!(status, 200);
    assert!(deferred.is_some());
    assert_eq!(send(gw, &live, Some("never")).await.0, 429);
    // A send that names its own send_at is never moved.
    let mut own = live.clone();
    own["send_at"] = Value::Null;
    assert_eq!(send(gw, &own, None).await.0, 429);
}

async fn multipart_send_at_counts_at_send_at(gw: &Gateway, _nylas: &FakeNylas) {
    let later = now_secs() + 3600;
    for _ in 0..3 {
        let msg = scheduled(later).to_string();
        let (content_type, body) = Multipart::new("b0undary")
            .part("message", None, None, msg.as_bytes())
            .part(
                "file0",
                Some("a.bin"),
                Some("application/octet-stream"),
                &[1u8; 64],
            )
            .finish();
        let resp = client()
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
                gw.url
            ))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let w = window(gw).await;
    assert_eq!(
        (w["used"].clone(), w["scheduled"].clone()),
        (json!(0), json!(3))
    );
}

async fn an_unreadable_send_at_is_refused(gw: &Gateway, nylas: &FakeNylas) {
    for bad in [json!("1900000000"), json!(1.9e9), json!(true)] {
        let mut m = message(&["a@example.org"], &[], &[]);
        m["send_at"] = bad;
        let resp = post(gw, &m).await;
        gateway_error(resp, 400, "invalid_send_request").await;
    }
    assert!(nylas.sends().is_empty());
}

on_both_stores!(
    leave_now_free,
    "",
    scheduled_beyond_the_window_leave_now_free
);
on_both_stores!(
    four_in_a_span,
    "",
    four_in_a_span_around_scheduled_sends_are_refused
);
on_both_stores!(cancel_frees, "", a_cancel_frees_its_slot_once);
on_both_stores!(defers_on_request, "", a_full_window_defers_a_send_that_asks);
on_both_stores!(
    profile_defers,
    "defer_up_to = \"1h\"",
    a_profile_defers_without_being_asked
);
on_both_stores!(multipart_scheduled, "", multipart_send_at_counts_at_send_at);
on_both_stores!(bad_send_at, "", an_unreadable_send_at_is_refused);
