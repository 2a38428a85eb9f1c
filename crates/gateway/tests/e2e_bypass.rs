//! End to end: requests shaped to slip a send past its quota, found in review, each now
//! counted (or refused) the way an ordinary send is.

mod common;

use std::time::Duration;

use common::{Gateway, TOKEN, attachment, client, config, fake, message};
use fake_nylas::{DEMO_GRANT_ID, Rule};
use testkit::multipart::Multipart;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one raw HTTP/1.1 request and returns the whole answer.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

const BODY: &str = r#"{"to":[{"email":"a@example.org"}],"subject":"s","body":"b"}"#;

#[tokio::test]
async fn a_backslash_in_the_path_is_classified_as_the_path_nylas_receives() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    for path in [
        "messages\\send",
        "x/%2e%2e/messages/send",
        "./messages/send",
    ] {
        let req = format!(
            "POST /v3/grants/{DEMO_GRANT_ID}/{path} HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            BODY.len()
        );
        let answer = raw(gw.addr, &req).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    assert_eq!(nylas.delivered().len(), 3);
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (3, 3),
        "every delivered send was counted"
    );
}

#[tokio::test]
async fn a_header_named_in_connection_cannot_steer_the_decision() {
    let nylas = fake().await;
    let toml = config(
        &nylas.url(),
        "[grants]\ndefault_profile = \"m\"\n[profiles.m]\n\
         [[profiles.m.windows]]\nperiod = \"24h\"\nmessages = 2\n",
    );
    let gw = Gateway::start(&toml).await;
    let mut ok = 0;
    for _ in 0..5 {
        let req = format!(
            "POST /v3/grants/{DEMO_GRANT_ID}/messages/send HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
             Idempotency-Key: same\r\nConnection: close, Idempotency-Key\r\n\
             Content-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        if raw(gw.addr, &req).await.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    assert_eq!(ok, 2, "the quota of 2 holds");
    assert_eq!(nylas.delivered().len(), 2);
    assert!(
        nylas
            .delivered()
            .iter()
            .all(|r| r.header("idempotency-key").is_none())
    );
}

#[tokio::test]
async fn an_idempotency_key_reused_after_a_failure_is_charged_again() {
    let nylas = fake().await;
    let toml = config(
        &nylas.url(),
        "[grants]\ndefault_profile = \"r\"\n[profiles.r]\nmax_recipients_per_message = 50\n\
         [[profiles.r.windows]]\nperiod = \"24h\"\nrecipients = 10\n",
    );
    let gw = Gateway::start(&toml).await;
    let c = client();
    nylas
        .add_rule(Rule::status(503).path("/messages/send").times(1))
        .unwrap();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &message(&["a@example.org"], &[], &[]))
        .header("idempotency-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "kept: the outcome is unknown");
    let many: Vec<String> = (0..9).map(|i| format!("r{i}@example.org")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &message(&many, &[], &[]))
        .header("idempotency-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The profile limits recipients only, so messages read as 0: 1 recipient kept from
    // the failure plus the retry's 9 charged in full.
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 10));
    // A third request with the key finds no room, whatever Nylas would do with it.
    let resp = gw
        .send_json(&c, DEMO_GRANT_ID, &message(&many, &[], &[]))
        .header("idempotency-key", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        429,
        "no room left for another 9, replay or not"
    );
    assert_eq!(nylas.delivered().len(), 1);
}

#[tokio::test]
async fn a_body_that_stalls_past_the_timeout_is_given_back() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "timeout = \"1s\"")).await;
    let msg = serde_json::to_vec(&message(&["a@example.org"], &[], &[])).unwrap();
    let (ct, body) = Multipart::new("b0undary")
        .part("message", None, None, &msg)
        .part(
            "file0",
            Some("a.bin"),
            Some("application/octet-stream"),
            &attachment(100_000),
        )
        .finish();
    let head = body.slice(..msg.len() + 400);
    let tail = body.slice(msg.len() + 400..);
    let stream = futures_util::stream::unfold(0u8, move |st| {
        let (head, tail) = (head.clone(), tail.clone());
        async move {
            match st {
                0 => Some((Ok::<_, std::io::Error>(head), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Some((Ok(tail), 2))
                }
                _ => None,
            }
        }
    });
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", ct)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(nylas.delivered().is_empty());
    assert_eq!(
        gw.used(DEMO_GRANT_ID).await,
        (0, 0),
        "Nylas never had the whole message"
    );
}

/// Sends a multipart body and expects it refused as unreadable, with nothing delivered.
async fn refused(
    gw: &Gateway,
    nylas: &fake_nylas::FakeNylas,
    query: &str,
    ct: &str,
    body: Vec<u8>,
) {
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send{query}",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    common::gateway_error(resp, 400, "invalid_send_request").await;
    assert!(nylas.delivered().is_empty());
}

#[tokio::test]
async fn a_multipart_body_another_parser_could_read_differently_is_refused() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let many: Vec<String> = (0..40).map(|i| format!("r{i}@example.org")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = serde_json::to_vec(&message(&many, &[], &[])).unwrap();
    let small = serde_json::to_vec(&message(&["one@example.org"], &[], &[])).unwrap();

    // A raw-MIME send that also carries a `message` part (a server matching `type=mime`
    // case-sensitively would send that part instead).
    let (ct, body) = Multipart::new("b0undary")
        .part(
            "mime",
            Some("m.eml"),
            Some("message/rfc822"),
            b"To: one@example.org\r\n\r\nhi\r\n",
        )
        .part("message", None, None, &big)
        .finish();
    refused(&gw, &nylas, "?type=MIME", &ct, body.to_vec()).await;

    // `NAME="message"`: parameter names are case-insensitive (RFC 2183), but multer reads
    // this part as unnamed; a decoy `name="message"` follows.
    let mut body = Vec::new();
    body.extend_from_slice(b"--B\r\nContent-Disposition: form-data; NAME=\"message\"\r\n\r\n");
    body.extend_from_slice(&big);
    body.extend_from_slice(b"\r\n--B\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n");
    body.extend_from_slice(&small);
    body.extend_from_slice(b"\r\n--B--\r\n");
    refused(&gw, &nylas, "", "multipart/form-data; boundary=B", body).await;

    // A second `Message` part after the counted one.
    let (ct, body) = Multipart::new("b0undary")
        .part("message", None, None, &small)
        .part("Message", None, None, &big)
        .finish();
    refused(&gw, &nylas, "", &ct, body.to_vec()).await;
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}
