//! Raw MIME sends (E2) end to end: recipients are counted from To, Cc, Bcc and the
//! Resent-* headers, and a header section parsers could read differently is refused
//! before anything is counted or forwarded.

mod common;

use common::{Gateway, TOKEN, client, config, fake, gateway_error};
use fake_nylas::DEMO_GRANT_ID;
use testkit::multipart::Multipart;

/// `POST .../messages/send?type=mime` with `raw` as the `mime` part.
async fn send_mime(gw: &Gateway, raw: &[u8]) -> reqwest::Response {
    let (content_type, body) = Multipart::new("mime-headers-boundary")
        .part("mime", Some("message.eml"), Some("message/rfc822"), raw)
        .finish();
    client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send?type=mime",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn resent_recipients_are_counted() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let raw = b"From: me@example.com\r\n\
To: a@example.org\r\n\
Resent-To: b@example.org\r\n\
Resent-Cc: Crew: c@example.org, A@example.org;\r\n\
Resent-Bcc: =?UTF-8?B?RMOpYQ==?= <d@example.org>\r\n\
Resent-Bcc: e@example.org\r\n\
Subject: resent\r\n\
\r\n\
Hello again.\r\n";
    let resp = send_mime(&gw, raw).await;
    let status = resp.status();
    assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
    // a, b, c, d, e: A@example.org is a.
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 5));
}

#[tokio::test]
async fn ambiguous_header_sections_are_refused_unsent() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let cases: [&[u8]; 4] = [
        // mail-parser stops reading at the whitespace line after the line without a
        // colon, so it would count one recipient where the Bcc adds a second.
        b"To: a@example.org\r\nX-Junk\r\n \r\nBcc: b@example.org\r\n\r\nbody\r\n",
        // A bare CR: Python's email reads a Bcc field here, mail-parser none.
        b"To: a@example.org\r\nSubject: hi\rBcc: b@example.org\r\n\r\nbody\r\n",
        // CR CR LF ends mail-parser's header section, not Go's.
        b"To: a@example.org\r\n\r\r\nBcc: b@example.org\r\n\r\nbody\r\n",
        b"To: a@example.org\0\r\n\r\nbody\r\n",
    ];
    for raw in cases {
        let resp = send_mime(&gw, raw).await;
        gateway_error(resp, 400, "invalid_send_request").await;
    }
    assert!(nylas.sends().is_empty(), "nothing reached Nylas");
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (0, 0));
}
