//! Forced answers, delays, idempotent replays and aborted uploads.

mod common;

use std::time::{Duration, Instant};

use common::{authed, client, parts, start};
use fake_nylas::{DEMO_GRANT_EMAIL, DEMO_GRANT_ID, Rule, SendKind};
use reqwest::Method;
use serde_json::json;

fn message() -> serde_json::Value {
    json!({"to": [{"email": "a@x.com"}], "subject": "s"})
}

#[tokio::test]
async fn forced_statuses_apply_to_matching_requests_then_expire() {
    let fake = start().await;
    fake.add_rule(Rule::rate_limited(30).path("/messages/send").times(2))
        .unwrap();
    let client = client();
    let send = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url());

    // Not a send: unaffected.
    let grant = authed(
        &client,
        Method::GET,
        format!("{}/v3/grants/{DEMO_GRANT_ID}", fake.url()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(grant.status(), 200);

    for _ in 0..2 {
        let response = authed(&client, Method::POST, send.clone())
            .json(&message())
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["retry-after"], "30");
        let (status, body) = parts(response).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(body["error"]["provider_error"].is_object());
    }
    let third = authed(&client, Method::POST, send.clone())
        .json(&message())
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 200);
    assert!(fake.rules().is_empty());

    let statuses: Vec<_> = fake.sends().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(429), Some(429), Some(200)]);
    assert_eq!(fake.delivered().len(), 1);
    assert_eq!(fake.stats().forced, 2);
}

#[tokio::test]
async fn forced_errors_take_custom_types_bodies_and_raw_pages() {
    let fake = start().await;
    let client = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url());

    fake.add_rule(Rule::status(500).times(1)).unwrap();
    let (status, body) = parts(
        authed(&client, Method::POST, url.clone())
            .json(&message())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (500, Some("internal_error"))
    );

    fake.add_rule(
        Rule::status(504)
            .error("provider_error", "Provider request timed out")
            .times(1),
    )
    .unwrap();
    let (status, body) = parts(
        authed(&client, Method::POST, url.clone())
            .json(&message())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["message"], "Provider request timed out");

    fake.add_rule(Rule::status(402).body(json!({"error": {"type": "api_error", "message": "Sending to at least one recipient failed"}})).times(1))
        .unwrap();
    let (status, body) = parts(
        authed(&client, Method::POST, url.clone())
            .json(&message())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 402);
    assert!(
        body["request_id"].is_string(),
        "request_id added to custom bodies"
    );

    fake.add_rule(
        Rule::status(502)
            .raw_body("<html>bad gateway</html>")
            .header("content-type", "text/html")
            .times(1),
    )
    .unwrap();
    let response = authed(&client, Method::POST, url)
        .json(&message())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "text/html");
    assert_eq!(response.text().await.unwrap(), "<html>bad gateway</html>");
}

#[tokio::test]
async fn delays_hold_the_answer_and_outlast_client_timeouts() {
    let fake = start().await;
    let client = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}", fake.url());

    fake.add_rule(Rule::delay(Duration::from_millis(300)).times(1))
        .unwrap();
    let started = Instant::now();
    let response = authed(&client, Method::GET, url.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    fake.add_rule(
        Rule::delay(Duration::from_secs(30))
            .path("/messages/send")
            .times(1),
    )
    .unwrap();
    let timed_out = authed(&client, Method::POST, format!("{url}/messages/send"))
        .json(&message())
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap_err();
    assert!(timed_out.is_timeout());
    // The body arrived whole before the client gave up; no answer was given.
    let sends = fake.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].status, None);
    assert!(fake.delivered().is_empty());
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_first_answer() {
    let fake = start().await;
    let client = client();
    let send = |identifier: &str, body: serde_json::Value| {
        authed(
            &client,
            Method::POST,
            format!("{}/v3/grants/{identifier}/messages/send", fake.url()),
        )
        .header("Idempotency-Key", "key-1")
        .json(&body)
    };

    let first = send(DEMO_GRANT_ID, message()).send().await.unwrap();
    assert!(first.headers().get("idempotent-response").is_none());
    let (status, first) = parts(first).await;
    assert_eq!(status, 200);

    // Same grant through another identifier form: same scope, same answer.
    let replay = send(DEMO_GRANT_EMAIL, message()).send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-response"], "true");
    let (status, replayed) = parts(replay).await;
    assert_eq!(status, 200);
    assert_eq!(replayed, first);

    let other_body = send(DEMO_GRANT_ID, json!({"to": [{"email": "z@x.com"}]}))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(other_body).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["type"], "api.invalid_idempotent_request");

    assert_eq!(fake.sends().len(), 3);
    let delivered = fake.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(fake.sends()[1].idempotent_replay);
    assert_eq!(fake.stats().replays, 1);
}

#[tokio::test]
async fn an_idempotency_key_is_kept_only_for_successes() {
    let fake = start().await;
    fake.add_rule(Rule::status(500).times(1)).unwrap();
    let client = client();
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url());
    for expected in [500, 200] {
        let response = authed(&client, Method::POST, url.clone())
            .header("Idempotency-Key", "k")
            .json(&message())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
        assert!(response.headers().get("idempotent-response").is_none());
    }
}

#[tokio::test]
async fn an_aborted_chunked_body_is_recorded_incomplete() {
    let fake = start().await;
    let client = client();
    // Bytes go out first; the error comes later, so the server has seen the start.
    let chunks = futures_util::stream::unfold(0, |step| async move {
        let item = match step {
            0 => Ok(br#"{"to":[{"email":"a@x.com"}],"subject":""#.to_vec()),
            1 => Ok(vec![b'x'; 64 * 1024]),
            2 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(std::io::Error::other("client gave up"))
            }
            _ => return None,
        };
        Some((item, step + 1))
    });
    let result = authed(
        &client,
        Method::POST,
        format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url()),
    )
    .header("content-type", "application/json")
    .body(reqwest::Body::wrap_stream(chunks))
    .send()
    .await;
    assert!(result.is_err(), "the upload fails on the client side");

    assert!(
        fake.wait_until(Duration::from_secs(5), |records| !records.is_empty())
            .await,
        "the aborted request is recorded"
    );
    let records = fake.requests();
    assert_eq!(records.len(), 1);
    assert!(!records[0].complete);
    assert_eq!(records[0].send, Some(SendKind::Json));
    assert!(records[0].body_len > 0);
    assert!(
        fake.sends().is_empty(),
        "Nylas never received a complete message"
    );
    assert_eq!(fake.stats().aborted, 1);
}

#[tokio::test]
async fn bodies_can_go_unrecorded_and_records_bounded() {
    let fake = start().await;
    fake.set_record_bodies(false);
    fake.set_record_limit(Some(2));
    let client = client();
    for _ in 0..3 {
        authed(
            &client,
            Method::POST,
            format!("{}/v3/grants/{DEMO_GRANT_ID}/messages/send", fake.url()),
        )
        .json(&message())
        .send()
        .await
        .unwrap();
    }
    let records = fake.requests();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].seq, 1);
    assert!(records[0].body.is_empty());
    assert_eq!(records[0].body_len, message().to_string().len() as u64);
    assert_eq!(fake.stats().sends, 3);
    fake.clear();
    assert!(fake.requests().is_empty());
}
