//! End to end: what the listeners do about slow and stalled clients (`[server]
//! body_timeout`).
//!
//! Timings here are bounds, never measurements: every wait is a poll with a generous limit.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, TOKEN, WAIT, attachment, config, fake, message, metric_value};
use fake_nylas::DEMO_GRANT_ID;
use testkit::multipart::Multipart;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `head` and the first bytes of a body, then sends nothing more (the connection
/// stays open); returns the answer read until the gateway closes the connection (bounded
/// by [`WAIT`]) and how long it took.
async fn stall_after(addr: std::net::SocketAddr, head: &str, first: &[u8]) -> (String, Duration) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(first).await.expect("write first bytes");
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// The unlabelled sample `name` of a `/metrics` text (`None` when absent).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `sendgw_requests_in_flight`, once the gateway has seen the connection go.
async fn in_flight(gw: &Gateway) -> f64 {
    let m = gw.metrics().await;
    sample(&m, "sendgw_requests_in_flight").expect("the in-flight gauge")
}

fn send_head(content_type: &str, length: usize) -> String {
    format!(
        "POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

/// Asserts a raw answer is the gateway's own error envelope with `status` and `error_type`.
fn assert_envelope(answer: &str, status: u16, error_type: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "status {status}: {answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nx-request-id: "), "{answer}");
    assert!(
        answer.contains(&format!("\"type\":\"{error_type}\"")),
        "{answer}"
    );
    assert!(answer.contains("\"request_id\":\""), "{answer}");
}

#[tokio::test]
async fn a_json_body_that_stalls_is_answered_408_and_charged_nothing() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "[server]\nbody_timeout = \"1s\"")).await;
    let body = serde_json::to_vec(&message(&["a@example.org"], &[], &[])).unwrap();
    let head = send_head("application/json", body.len());
    let (answer, took) = stall_after(gw.addr, &head, &body[..body.len() / 2]).await;
    assert_envelope(&answer, 408, "body_timeout");
    println!("stalled JSON body answered after {took:?} (body_timeout 1s)");
    assert!(nylas.requests().is_empty(), "nothing reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
    assert_eq!(in_flight(&gw).await, 0.0);
}

#[tokio::test]
async fn a_multipart_send_that_stalls_after_its_charge_is_released_at_once() {
    let nylas = fake().await;
    // The upstream timeout is far away: only the body timeout can end this send soon.
    let toml = config(
        &nylas.url(),
        "timeout = \"60s\"\n[server]\nbody_timeout = \"1s\"",
    );
    let gw = Gateway::start(&toml).await;
    let msg = serde_json::to_vec(&message(&["a@example.org"], &[], &[])).unwrap();
    let (ct, body) = Multipart::new("b0undary")
        .part("message", None, None, &msg)
        .part(
            "file0",
            Some("a.bin"),
            Some("application/octet-stream"),
            &attachment(200_000),
        )
        .finish();
    let head = send_head(&ct, body.len());
    // The message part and the start of the attachment: enough to count and charge it.
    let first = &body[..msg.len() + 4000];
    let (answer, took) = stall_after(gw.addr, &head, first).await;
    assert_envelope(&answer, 408, "body_timeout");
    println!("stalled multipart upload answered after {took:?} (body_timeout 1s)");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_reservations_settled_total",
            "outcome=\"released\""
        ),
        1.0,
        "it was charged, then given back: {m}"
    );
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "the charge is released"
    );
    assert!(
        nylas.delivered().is_empty(),
        "Nylas never had the whole message"
    );
    assert_eq!(in_flight(&gw).await, 0.0);
}
