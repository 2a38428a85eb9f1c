//! End to end: how Nylas's answer settles a reservation, and everything that is not a
//! send relayed byte for byte to the configured upstream only.

mod common;

use std::time::Duration;

use common::{Gateway, TOKEN, client, config, fake, gateway_error, simple};
use fake_nylas::{DEMO_GRANT_ID, Rule, download_pattern};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn refusals_from_nylas_release_the_reservation_and_pass_through_unchanged() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    let refusal = json!({
        "request_id": "nylas-400-req",
        "error": {"type": "invalid_request_error", "message": "to[0].email is not valid"},
    });
    nylas
        .add_rule(
            Rule::status(400)
                .path("/messages/send")
                .body(refusal.clone())
                .times(1),
        )
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(
        resp.headers().contains_key("x-request-id"),
        "Nylas's X-Request-Id relayed"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, refusal, "Nylas's body unchanged");
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "a 400 gives the reservation back"
    );

    // The provider throttled: 429 rate_limit_error with Retry-After and provider_error.
    nylas
        .add_rule(Rule::rate_limited(30).path("/messages/send").times(1))
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
    let header_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    let mut throttled = Rule::rate_limited(30).body.unwrap();
    throttled["request_id"] = Value::String(header_id);
    assert_eq!(body, throttled, "Nylas's body unchanged");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["provider_error"]["error"]["code"], 429);
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "a provider 429 gives the reservation back"
    );
    assert_eq!(nylas.sends().len(), 2, "both reached Nylas");
    assert!(nylas.delivered().is_empty());
}

#[tokio::test]
async fn server_errors_and_timeouts_keep_the_reservation() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "timeout = \"1s\"")).await;
    let c = client();
    nylas
        .add_rule(Rule::status(500).path("/messages/send").times(1))
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["type"], "internal_error",
        "Nylas's envelope relayed"
    );
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 1),
        "a 500 may have sent: kept"
    );

    // Far past the gateway's 1 s upstream timeout: the outcome is unknown, so it is kept.
    nylas
        .add_rule(
            Rule::delay(Duration::from_secs(30))
                .path("/messages/send")
                .times(1),
        )
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &simple())
        .send()
        .await
        .unwrap();
    gateway_error(resp, 504, "upstream_timeout").await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (2, 2),
        "a timed-out send is kept"
    );
}

#[tokio::test]
async fn an_idempotent_replay_is_counted_once() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();
    let msg = simple();
    let first = gw
        .send_json(&c, DEMO_GRANT_ID, &msg)
        .header("Idempotency-Key", "key-1")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-response").is_none());
    let first: Value = first.json().await.unwrap();
    let second = gw
        .send_json(&c, DEMO_GRANT_ID, &msg)
        .header("Idempotency-Key", "key-1")
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["idempotent-response"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(
        first["data"]["id"], second["data"]["id"],
        "the same message"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1), "counted once");
    assert_eq!(nylas.delivered().len(), 1);
    assert_eq!(nylas.sends().len(), 2);
}

#[tokio::test]
async fn a_large_download_is_relayed_byte_for_byte() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let resp = client()
        .get(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/attachments/att-1/download?size=5000000",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "5000000");
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        resp.headers()["content-disposition"],
        "attachment; filename=\"att-1\""
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 5_000_000);
    assert!(
        body[..] == download_pattern(5_000_000)[..],
        "every byte as the fake sent it"
    );
    assert!(
        gw.quota(DEMO_GRANT_ID).await["windows"][0]["messages"]["used"] == 0,
        "not a send"
    );
}

#[tokio::test]
async fn other_requests_keep_status_headers_and_body() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let c = client();

    // An unknown path: the fake's own 404 envelope, with its request id.
    let resp = c
        .get(format!("{}/v3/no/such/thing?x=1", gw.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let header_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], header_id);
    assert_eq!(body["error"]["type"], "not_found_error");
    let rec = nylas.requests().pop().unwrap();
    assert_eq!(
        (rec.method.as_str(), rec.path.as_str(), rec.query.as_deref()),
        ("GET", "/v3/no/such/thing", Some("x=1"))
    );

    // A forced answer: status, every header and the exact body bytes survive.
    let raw = "{\"request_id\":\"fixed-id\",\"error\":{\"type\":\"not_found_error\",\"message\":\"gone\"}}";
    nylas
        .add_rule(
            Rule::status(404)
                .path("/v3/grants/x/contacts")
                .raw_body(raw)
                .header("Content-Type", "application/json")
                .header("X-Nylas-Custom", "kept")
                .header("Retry-After", "7"),
        )
        .unwrap();
    let resp = c
        .put(format!("{}/v3/grants/x/contacts/c1", gw.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .header("x-client-header", "forwarded")
        .body("{\"given_name\":\"Ann\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-nylas-custom"], "kept");
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.text().await.unwrap(), raw);
    let rec = nylas.requests().pop().unwrap();
    assert_eq!(rec.method, "PUT");
    assert_eq!(&rec.body[..], b"{\"given_name\":\"Ann\"}");
    assert_eq!(rec.header("x-client-header"), Some("forwarded"));
    assert_eq!(
        rec.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );

    // E6: cancelling a scheduled send is not a send; 202 relayed.
    let resp = c
        .delete(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/schedules/s-1",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let rec = nylas.requests().pop().unwrap();
    assert_eq!(rec.method, "DELETE");
    assert_eq!(
        rec.header("transfer-encoding"),
        None,
        "a bodiless request goes on without a body"
    );
    assert_eq!(rec.header("content-length"), None);
    assert!(nylas.sends().is_empty());
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}

/// Writes `request` on a fresh connection to `addr` and reads the whole answer.
async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn absolute_form_targets_and_forged_hosts_still_go_to_the_configured_upstream() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let fake_host = nylas.addr().to_string();

    // Absolute form naming another host: the send goes to the fake, and is counted.
    let body = simple().to_string();
    let request = format!(
        "POST http://evil.example/v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\n\
         Host: evil.example\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let sends = nylas.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(
        sends[0].path,
        format!("/v3/grants/{DEMO_GRANT_ID}/messages/send")
    );
    assert_eq!(sends[0].header("host"), Some(fake_host.as_str()));
    assert_eq!(&sends[0].body[..], body.as_bytes());
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));

    // A forged Host on an origin-form GET.
    let request = format!(
        "GET /v3/grants/{DEMO_GRANT_ID} HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    );
    let answer = raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(DEMO_GRANT_ID));
    let rec = nylas.requests().pop().unwrap();
    assert_eq!(rec.path, format!("/v3/grants/{DEMO_GRANT_ID}"));
    assert_eq!(rec.header("host"), Some(fake_host.as_str()));

    // Absolute form for a non-send as well.
    let request = format!(
        "GET http://evil.example:8443/v3/grants/{DEMO_GRANT_ID}/messages HTTP/1.1\r\nHost: evil.example:8443\r\n\
         Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_http(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let rec = nylas.requests().pop().unwrap();
    assert_eq!(rec.path, format!("/v3/grants/{DEMO_GRANT_ID}/messages"));
    assert_eq!(rec.header("host"), Some(fake_host.as_str()));
}
