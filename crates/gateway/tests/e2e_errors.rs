//! End to end: every answer the gateway writes itself is a Nylas-shaped JSON error with
//! `X-Request-Id`; per-message checks never touch the store; oversized bodies are
//! stopped before (or while) they reach Nylas.

mod common;

use std::time::Duration;

use common::{
    Gateway, TOKEN, WAIT, attachment, chunked, client, config, evalsha_calls, eventually, fake,
    gateway_error, message, simple,
};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use testkit::RedisServer;
use testkit::multipart::Multipart;
use tokio::io::AsyncWriteExt;

/// A profile of 2 recipients and 1 MB per message, 2 messages a minute.
const TINY: &str = r#"
[grants]
default_profile = "tiny"

[profiles.tiny]
max_recipients_per_message = 2
max_message_size = "1MB"

[[profiles.tiny.windows]]
period = "60s"
messages = 2
recipients = 100
"#;

const MSG_JSON: &str = r#"{"to":[{"email":"a@example.org"}],"subject":"s","body":"b"}"#;

/// A Python-style multipart send with one attachment of `len` bytes.
fn multipart_with(len: usize) -> (String, bytes::Bytes) {
    Multipart::new("e2e-boundary-7d1a")
        .part(
            "message",
            Some(""),
            Some("application/json"),
            MSG_JSON.as_bytes(),
        )
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            &attachment(len),
        )
        .finish()
}

fn send_url(gw: &Gateway) -> String {
    format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", gw.url)
}

#[tokio::test]
async fn too_many_recipients_is_422_with_no_store_call_and_nothing_sent() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), TINY)).await;
    let c = client();
    let three = message(&["a@example.org", "b@example.org"], &["c@example.org"], &[]);
    let body = gateway_error(
        gw.send_json(&c, DEMO_GRANT_ID, &three)
            .send()
            .await
            .unwrap(),
        422,
        "too_many_recipients",
    )
    .await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains('3'),
        "{body}"
    );
    // Duplicates across lists are one recipient: two unique pass.
    let two = message(
        &["a@example.org", "B@example.org"],
        &["b@example.org"],
        &["A@EXAMPLE.ORG"],
    );
    assert_eq!(
        gw.send_json(&c, DEMO_GRANT_ID, &two)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
    assert_eq!(nylas.sends().len(), 1);
}

#[tokio::test]
async fn message_size_is_checked_against_the_provider_limit() {
    let nylas = fake().await;
    // iCloud's 20 MB: 16,000,000 attachment bytes grow past it once base64-encoded.
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    let (ct, body) = multipart_with(16_000_000);
    let resp = c
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let err = gateway_error(resp, 413, "message_too_large").await;
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("20000000"),
        "{err}"
    );
    assert!(only_look_ups(&nylas), "no send reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));

    let (ct, body) = multipart_with(14_000_000);
    let resp = c
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sends = nylas.sends();
    assert_eq!(sends.len(), 1);
    assert!(sends[0].body == body, "14 MB forwarded byte for byte");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
}

#[tokio::test]
async fn quota_exceeded_is_429_with_retry_after_and_the_denial() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), TINY)).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            gw.send_json(&c, DEMO_GRANT_ID, &simple())
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1);
    assert!(resp.headers().contains_key("ratelimit-policy"));
    let state = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(state.contains("\"messages-1m\";r=0;"), "{state}");
    let body = gateway_error(resp, 429, "quota_exceeded").await;
    let q = &body["error"]["quota"];
    assert_eq!(q["window"], "1m", "the window label the quota API shows");
    assert_eq!(q["metric"], "messages");
    assert_eq!(q["limit"], 2);
    assert_eq!(q["used"], 2);
    assert_eq!(q["requested"], 1);
    assert_eq!(q["retry_after_seconds"], retry);
    // The SDKs raise the message and drop `error.quota`: it says when to try again.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.ends_with(&format!("; try again in {retry} s")),
        "{message}"
    );
    assert_eq!(
        nylas.sends().len(),
        2,
        "the denied send never reached Nylas"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 2));
}

#[tokio::test]
async fn a_message_larger_than_a_whole_window_is_refused_as_never_sendable() {
    let nylas = fake().await;
    // No per-message cap, but only 3 recipients a minute: 4 can never go, so retrying a
    // 429 would loop forever; it is a 422 instead.
    let profile = "[grants]\ndefault_profile = \"narrow\"\n[profiles.narrow]\n\
                   [[profiles.narrow.windows]]\nperiod = \"60s\"\nrecipients = 3\n";
    let gw = Gateway::start(&config(&nylas.url(), profile)).await;
    let c = client();
    let four = message(&["a@x.org", "b@x.org", "c@x.org", "d@x.org"], &[], &[]);
    let resp = gw.send_json(&c, DEMO_GRANT_ID, &four).send().await.unwrap();
    gateway_error(resp, 422, "too_many_recipients").await;
    let three = message(&["a@x.org", "b@x.org", "c@x.org"], &[], &[]);
    assert_eq!(
        gw.send_json(&c, DEMO_GRANT_ID, &three)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Now a single recipient has to wait: a real 429, with Retry-After.
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(nylas.sends().len(), 1);
}

#[tokio::test]
async fn unreadable_sends_are_400_and_never_forwarded() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    let post = |ct: &str, body: &'static str| {
        c.post(send_url(&gw))
            .bearer_auth(TOKEN)
            .header("content-type", ct.to_owned())
            .body(body)
    };
    gateway_error(
        post("application/json", "{\"to\": [").send().await.unwrap(),
        400,
        "invalid_send_request",
    )
    .await;
    gateway_error(
        post("application/json", "{\"to\": \"a@b.c\"}")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_send_request",
    )
    .await;
    // A multipart body that ends in the middle of its `message` part.
    let broken = "--b0\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n{\"to\":[{\"email\":\"a@b.c\"}]";
    gateway_error(
        post("multipart/form-data; boundary=b0", broken)
            .send()
            .await
            .unwrap(),
        400,
        "invalid_send_request",
    )
    .await;
    gateway_error(
        post("multipart/form-data", "no boundary")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_send_request",
    )
    .await;
    gateway_error(
        post("text/plain", "hello").send().await.unwrap(),
        400,
        "invalid_send_request",
    )
    .await;
    assert!(only_look_ups(&nylas), "no send reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}

#[tokio::test]
async fn per_message_rejections_make_no_store_call() {
    let redis = RedisServer::start();
    let nylas = fake().await;
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"5s\"\n",
        redis.url()
    );
    let gw = Gateway::start(&config(&nylas.url(), &format!("{store}{TINY}"))).await;
    let c = client();
    assert_eq!(
        gw.send_json(&c, DEMO_GRANT_ID, &simple())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = evalsha_calls(&redis);
    assert!(before >= 1, "the allowed send reserved through EVALSHA");

    let three = message(
        &["a@example.org", "b@example.org", "c@example.org"],
        &[],
        &[],
    );
    gateway_error(
        gw.send_json(&c, DEMO_GRANT_ID, &three)
            .send()
            .await
            .unwrap(),
        422,
        "too_many_recipients",
    )
    .await;
    let (ct, body) = multipart_with(2_000_000);
    let resp = c
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(body)
        .send()
        .await
        .unwrap();
    gateway_error(resp, 413, "message_too_large").await;
    let resp = c
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{")
        .send();
    gateway_error(resp.await.unwrap(), 400, "invalid_send_request").await;
    assert_eq!(
        evalsha_calls(&redis),
        before,
        "no store call for per-message rejections"
    );
    assert_eq!(nylas.sends().len(), 1);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
}

#[tokio::test]
async fn an_unreachable_store_rejects_with_503_or_forwards_uncounted() {
    let mut redis = RedisServer::start();
    let nylas = fake().await;
    let store = |on: &str| {
        format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\non_unavailable = \"{on}\"\n",
            redis.url()
        )
    };
    let reject = Gateway::start(&config(&nylas.url(), &store("reject"))).await;
    let allow = Gateway::start(&config(&nylas.url(), &store("allow"))).await;
    let c = client();
    assert_eq!(
        reject
            .send_json(&c, DEMO_GRANT_ID, &simple())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        allow
            .send_json(&c, DEMO_GRANT_ID, &simple())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(nylas.sends().len(), 2);

    redis.stop();
    let resp = reject
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 503, "quota_unavailable").await;
    assert_eq!(nylas.sends().len(), 2, "a refused send never reached Nylas");
    let resp = c
        .get(format!("{}/v1/quota/{DEMO_GRANT_ID}", reject.admin))
        .send()
        .await
        .unwrap();
    gateway_error(resp, 503, "quota_unavailable").await;

    let resp = allow
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("ratelimit").is_none(),
        "no usage to report"
    );
    assert_eq!(nylas.sends().len(), 3, "forwarded uncounted");
    let metrics = allow.metrics().await;
    // Its series exist at zero from start-up (one per store failure): one counted it.
    let uncounted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sendgw_decisions_total{outcome=\"allowed_uncounted\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(uncounted, 1.0, "{metrics}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_and_releases() {
    let closed = testkit::free_port();
    let gw = Gateway::start(&config(&format!("http://127.0.0.1:{closed}"), "")).await;
    let c = client();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 502, "upstream_unavailable").await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "never connected: nothing was sent"
    );
    let resp = gw
        .send_json(&c, "someone@example.org", &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 502, "upstream_unavailable").await;
    let resp = c
        .get(format!("{}/v3/grants/{DEMO_GRANT_ID}", gw.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    gateway_error(resp, 502, "upstream_unavailable").await;
}

#[tokio::test]
async fn a_slow_upstream_is_504_for_sends_and_other_requests() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "timeout = \"1s\"")).await;
    let c = client();
    nylas
        .add_rule(Rule::delay(Duration::from_secs(30)).times(2))
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 504, "upstream_timeout").await;
    let resp = c
        .get(format!("{}/v3/grants/{DEMO_GRANT_ID}", gw.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    gateway_error(resp, 504, "upstream_timeout").await;
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_413_before_nylas_is_contacted() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), TINY)).await;
    let (ct, body) = multipart_with(2_000_000);
    let resp = client()
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let body = gateway_error(resp, 413, "message_too_large").await;
    // Over the provider's own limit, the message names that limit, not the JSON buffer.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("multipart/form-data"), "{message}");
    assert!(only_look_ups(&nylas), "no send reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}

#[tokio::test]
async fn a_chunked_body_outgrowing_the_limit_is_cut_and_released() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), TINY)).await;
    let (ct, body) = multipart_with(2_000_000);
    let resp = client()
        .post(send_url(&gw))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(chunked(&body, 16 * 1024))
        .send()
        .await
        .unwrap();
    gateway_error(resp, 413, "message_too_large").await;
    let cut = nylas
        .wait_until(WAIT, |all| {
            all.iter()
                .any(|r| r.path.ends_with("/messages/send") && !r.complete)
        })
        .await;
    assert!(
        cut,
        "the fake saw an incomplete upload: {:?}",
        nylas.requests()
    );
    let rec = nylas
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/messages/send"))
        .unwrap();
    assert!(!rec.complete);
    assert!(rec.body_len < body.len() as u64);
    assert!(nylas.sends().is_empty() && nylas.delivered().is_empty());
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "the reservation was released"
    );
}

#[tokio::test]
async fn a_client_breaking_off_mid_upload_is_released() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let (ct, body) = multipart_with(500_000);
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..200_000]).await.unwrap();
    // Charged and streaming to Nylas; then the client goes away.
    eventually("the send is reserved", || async {
        gw.used(DEMO_GRANT_ID).await == (1, 1)
    })
    .await;
    drop(socket);
    let cut = nylas
        .wait_until(WAIT, |all| {
            all.iter()
                .any(|r| r.path.ends_with("/messages/send") && !r.complete)
        })
        .await;
    assert!(
        cut,
        "Nylas saw the upload break off: {:?}",
        nylas.requests()
    );
    assert!(nylas.sends().is_empty());
    eventually("the reservation is released", || async {
        gw.used(DEMO_GRANT_ID).await == (0, 0)
    })
    .await;
}

#[tokio::test]
async fn the_gateway_starts_while_redis_is_down_and_counts_once_it_is_back() {
    let mut redis = RedisServer::start();
    redis.stop();
    let nylas = fake().await;
    let toml = config(
        &nylas.url(),
        &format!(
            "[store]\nbackend = \"redis\"\nurl = \"{}\"\non_unavailable = \"reject\"\n",
            redis.url()
        ),
    );
    let gw = Gateway::start(&toml).await;
    let c = client();
    let resp = c.get(format!("{}/readyz", gw.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 503, "not ready without its store");
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 503, "quota_unavailable").await;
    assert!(nylas.sends().is_empty());

    redis.restart();
    // The breaker opened on the failures; its probe (here readiness) closes it within a
    // second of Redis answering, and the first send after that connects and counts.
    common::eventually("ready once Redis is back", || async {
        let resp = c.get(format!("{}/readyz", gw.admin)).send().await.unwrap();
        resp.status() == 200
    })
    .await;
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the first send after Redis is back counts"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
    let resp = c.get(format!("{}/readyz", gw.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Whether Nylas saw nothing but the grant's look-up (`GET /v3/grants/{id}`, made before
/// anything is charged): no send, not even a part of one.
fn only_look_ups(nylas: &fake_nylas::FakeNylas) -> bool {
    nylas
        .requests()
        .iter()
        .all(|r| r.method == http::Method::GET && r.send.is_none())
}

#[tokio::test]
async fn a_json_body_over_the_buffer_says_to_send_multipart() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nmax_json_body = \"64KiB\"")).await;
    let mut big = simple();
    big["body"] = serde_json::json!("x".repeat(70 * 1024));
    let resp = gw
        .send_json(&client(), DEMO_GRANT_ID, &big)
        .send()
        .await
        .unwrap();
    let body = gateway_error(resp, 413, "message_too_large").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("multipart/form-data") && message.contains("max_json_body"),
        "{message}"
    );
    assert!(only_look_ups(&nylas), "no send reached Nylas");
}
