//! End to end: how the settlement lease settles a send once the complete message has been
//! handed to Nylas, and how Nylas's answer corrects the charge.

mod common;

use bytes::Bytes;
use common::{Gateway, TOKEN, client, config, eventually, fake, message, metric_value};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use serde_json::json;
use testkit::multipart::Multipart;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const BOUNDARY: &str = "lease-test-boundary";

/// A multipart send (Node SDK shape) with one attachment, and its content type.
fn multipart_send() -> (String, Bytes) {
    let msg = message(&["a@example.org"], &[], &[]).to_string();
    Multipart::new(BOUNDARY)
        .part("message", None, None, msg.as_bytes())
        .part(
            "file0",
            Some("a.bin"),
            Some("application/octet-stream"),
            &[7u8; 4096],
        )
        .finish()
}

/// An upstream that reads one send until the closing boundary has arrived, says so, and
/// never answers: the point where the complete message has reached "Nylas". The grant's
/// look-up before it (a `GET`) is answered: the grant exists.
async fn capturing_upstream() -> (String, oneshot::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        // The look-up and the send, each on a connection of its own at most.
        for _ in 0..4 {
            let (mut conn, _) = listener.accept().await.unwrap();
            if answered_look_up(&mut conn, &mut tx).await {
                continue;
            }
            return;
        }
    });
    (url, rx)
}

/// Reads one connection: answers a `GET` (true), or reads a send until it ends, telling
/// `tx` when its closing boundary arrived (false).
async fn answered_look_up(conn: &mut TcpStream, tx: &mut Option<oneshot::Sender<()>>) -> bool {
    let closing = format!("--{BOUNDARY}--");
    let (mut seen, mut buf) = (Vec::new(), [0u8; 8192]);
    while let Ok(n) = conn.read(&mut buf).await {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.starts_with(b"GET ") && seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                          content-length: 11\r\nconnection: close\r\n\r\n{\"data\":{}}";
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.shutdown().await;
            return true;
        }
        if tx.is_some() && seen.windows(closing.len()).any(|w| w == closing.as_bytes()) {
            let _ = tx.take().map(|tx| tx.send(()));
        }
    }
    false
}

/// Opens a connection to the gateway and writes a send's request head (`framing`: the
/// `Content-Length` or `Transfer-Encoding` line, with anything that follows the blank
/// line), then `body`.
async fn raw_send(gw: &Gateway, content_type: &str, framing: &str, body: &[u8]) -> TcpStream {
    let head = format!(
        "POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: gw\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n{framing}"
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s.flush().await.unwrap();
    s
}

/// Reservations settled so far, however (kept, released or dropped).
async fn settled(gw: &Gateway) -> f64 {
    let m = gw.metrics().await;
    ["kept", "released", "dropped"]
        .iter()
        .map(|o| {
            metric_value(
                &m,
                "sendgw_reservations_settled_total",
                &format!("outcome=\"{o}\""),
            )
        })
        .sum()
}

#[tokio::test]
async fn a_client_abort_after_the_closing_boundary_keeps_the_charge() {
    let (upstream, arrived) = capturing_upstream().await;
    let gw = Gateway::start(&config(&upstream, "")).await;
    let (content_type, body) = multipart_send();
    // The client declares an epilogue it never sends: the whole message (through the
    // closing boundary) reaches the gateway and goes upstream, then the client goes away.
    let length = format!("Content-Length: {}\r\n\r\n", body.len() + 64);
    let s = raw_send(&gw, &content_type, &length, &body).await;
    tokio::time::timeout(common::WAIT, arrived)
        .await
        .expect("the whole message reached the upstream")
        .unwrap();
    drop(s);
    eventually("the reservation settled", || async {
        settled(&gw).await >= 1.0
    })
    .await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 1),
        "Nylas may have sent it: the charge stays"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_reservations_settled_total",
            "outcome=\"released\""
        ),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_body_error_after_the_closing_boundary_keeps_the_charge() {
    let (upstream, arrived) = capturing_upstream().await;
    let gw = Gateway::start(&config(&upstream, "")).await;
    let (content_type, body) = multipart_send();
    // Chunked, as the Node SDK streams it: the whole message in one chunk and, once it has
    // reached the upstream, a chunk header no parser accepts: the client's body fails
    // after the closing boundary.
    let chunked = format!("Transfer-Encoding: chunked\r\n\r\n{:x}\r\n", body.len());
    let mut s = raw_send(&gw, &content_type, &chunked, &body).await;
    s.write_all(b"\r\n").await.unwrap();
    s.flush().await.unwrap();
    tokio::time::timeout(common::WAIT, arrived)
        .await
        .expect("the whole message reached the upstream")
        .unwrap();
    s.write_all(b"not-a-chunk-size\r\n").await.unwrap();
    s.flush().await.unwrap();
    eventually("the reservation settled", || async {
        settled(&gw).await >= 1.0
    })
    .await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 1),
        "the message was complete: the charge stays"
    );
}

#[tokio::test]
async fn a_body_error_before_the_closing_boundary_releases_the_charge() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let (content_type, body) = multipart_send();
    // The body breaks off inside the attachment, before the closing boundary.
    let cut = body.len() - 40;
    let chunked = format!("Transfer-Encoding: chunked\r\n\r\n{cut:x}\r\n");
    let mut s = raw_send(&gw, &content_type, &chunked, &body[..cut]).await;
    s.write_all(b"\r\nnot-a-chunk-size\r\n").await.unwrap();
    s.flush().await.unwrap();
    eventually("the reservation settled", || async {
        settled(&gw).await >= 1.0
    })
    .await;
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "the message never reached its end: nothing was sent"
    );
    assert!(nylas.delivered().is_empty());
}

#[tokio::test]
async fn an_answer_listing_more_recipients_than_charged_is_charged_the_difference() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    // Nylas says it sent to five addresses (one repeated in another case: four unique)
    // where the request named one.
    let sent = json!({
        "request_id": "nylas-corrected",
        "grant_id": DEMO_GRANT_ID,
        "data": {
            "id": "m-1",
            "grant_id": DEMO_GRANT_ID,
            "subject": "hello",
            "to": [{"email": "a@example.org"}, {"email": "b@example.org"}],
            "cc": [{"email": "c@example.org"}, {"email": "A@EXAMPLE.ORG"}],
            "bcc": [{"email": "d@example.org"}],
        }
    });
    nylas
        .add_rule(
            Rule::status(200)
                .path("/messages/send")
                .body(sent.clone())
                .times(1),
        )
        .unwrap();
    let resp = gw
        .send_json(
            &client(),
            DEMO_GRANT_ID,
            &message(&["a@example.org"], &[], &[]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, sent, "Nylas's answer relayed unchanged");
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (1, 4),
        "usage is what Nylas listed"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_charge_corrections_total",
            "metric=\"recipients\""
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "sendgw_units_total", "metric=\"recipients\""),
        4.0
    );

    // An answer that lists no more than was charged corrects nothing.
    let resp = gw
        .send_json(
            &client(),
            DEMO_GRANT_ID,
            &message(&["a@example.org"], &[], &[]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 5));
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "sendgw_charge_corrections_total",
            "metric=\"recipients\""
        ),
        1.0
    );
}
