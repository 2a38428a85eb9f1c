//! Parser-differential attacks from review (branch `adversary2`): request bodies the
//! gateway counts with fewer recipients than Go's standard library (Nylas) reads from
//! the same bytes, without refusing them. Each test fails while the hole is open.
//!
//! Go's readings quoted below were checked with Go 1.19's `net/mail` and `net/http`.

mod common;

use axum::body::Body;
use bytes::Bytes;
use common::{Gateway, TOKEN, client, config, fake};
use fake_nylas::DEMO_GRANT_ID;
use futures_util::{StreamExt, stream};
use gateway::send::{InspectOptions, SendRoute, classify, inspect};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method};
use testkit::multipart::Multipart;

fn route(uri: &str) -> SendRoute {
    classify(&Method::POST, &uri.parse().expect("uri")).expect("a send route")
}

/// Recipients the gateway counts for `body`, or why it refused it (inspection or
/// forwarding).
async fn count(uri: &str, content_type: &str, body: Vec<u8>) -> Result<u64, String> {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    let body = Body::from_stream(stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(
        body,
    ))]));
    let inspected = inspect(&route(uri), &headers, body, &InspectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let recipients = inspected.cost.recipients;
    let mut forwarded = inspected.body.into_stream();
    while let Some(chunk) = forwarded.next().await {
        chunk.map_err(|e| format!("cut while forwarding: {e}"))?;
    }
    Ok(recipients)
}

/// A raw MIME send (`?type=mime`) of `raw`.
async fn count_mime(raw: &str) -> Result<u64, String> {
    let mut body = b"--b0\r\nContent-Disposition: form-data; name=\"mime\"\r\n\r\n".to_vec();
    body.extend_from_slice(raw.as_bytes());
    body.extend_from_slice(b"\r\n--b0--\r\n");
    count(
        "/v3/grants/g1/messages/send?type=mime",
        "multipart/form-data; boundary=b0",
        body,
    )
    .await
}

/// Go's `net/mail` reads an encoded word as plain atext wherever an addr-spec is tried
/// first: it never decodes one inside an address list before splitting it. So
/// `=?utf-8?q?a@x.com,b@y.com,c@z.com,d@w.com?=` is four addr-specs to Go
/// (`=?utf-8?q?a@x.com`, `b@y.com`, `c@z.com`, `d@w.com?=`), two of them perfectly
/// ordinary mailboxes. mail-parser decodes the encoded word first and sees one mailbox
/// without an address, which the gateway counts once, by its name.
///
/// Fix: in `mime::recipients`, refuse a recipient header whose value holds `=?` outside
/// a quoted string or angle brackets (or count it by splitting as Go does).
#[tokio::test]
async fn an_encoded_word_spanning_commas_is_not_one_recipient() {
    // (header section, recipients Go's net/mail reads)
    let cases = [
        (
            "To: =?utf-8?q?a@x.com,b@y.com,c@z.com,d@w.com?=\r\n\r\nbody",
            4,
        ),
        ("To: =?utf-8?q?a@x.com,_b@y.com?=\r\n\r\nbody", 2),
        ("To: =?iso-8859-1?q?a@x.com,b@x.com?=\r\n\r\nbody", 2),
        ("To: =?bogus?q?a@x.com,b@x.com?=\r\n\r\nbody", 2),
        // Inside a group, and after an ordinary address.
        ("To: g: =?utf-8?q?a@x.com,b@y.com?=;\r\n\r\nbody", 2),
        (
            "To: <a@x.com>,=?utf-8?q?a@x.com,b@x.com,c@x.com?=\r\n\r\nbody",
            4,
        ),
        (
            "To: a@x.com\r\nBcc: =?utf-8?q?b1@y.com,b2@y.com,b3@y.com?=\r\n\r\nbody",
            4,
        ),
    ];
    let mut short = Vec::new();
    for (raw, go_reads) in cases {
        match count_mime(raw).await {
            Ok(counted) if counted < go_reads => {
                short.push(format!("{raw:?}: counted {counted}, Go reads {go_reads}"));
            }
            // Refused, or counted at least as Go reads it: safe.
            _ => {}
        }
    }
    assert!(short.is_empty(), "counted short:\n{}", short.join("\n"));
}

/// A JSON message object with `n` bcc recipients.
fn message_json(n: usize) -> String {
    let bcc: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"email":"q{i}@example.com"}}"#))
        .collect();
    format!(
        r#"{{"subject":"hi","to":[{{"email":"ann@example.com"}}],"bcc":[{}]}}"#,
        bcc.join(",")
    )
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Go's `Request.FormValue(name)` (and `Request.Form`) puts the URL's query values
/// before the multipart body's: `r.FormValue("message")` on
/// `POST .../messages/send?message={...}` returns the query's message, whatever the
/// body's `message` part says; likewise `mime` on `?type=mime&mime=...`. The gateway
/// counts the body's part and forwards the query unchanged, so a Nylas handler that
/// reads the field with `FormValue` sends to the query's recipients.
///
/// Fix: in `classify`/the send handler, refuse a send whose query has a `message` or
/// `mime` parameter (decoded as `url.ParseQuery` does, any case to be safe).
#[tokio::test]
async fn a_message_in_the_query_string_is_counted_or_refused() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let hidden = message_json(9);
    let raw_hidden = "From: me@example.com\r\nTo: ann@example.com\r\n\
        Bcc: q1@example.com, q2@example.com, q3@example.com, q4@example.com\r\n\r\nhi\r\n";
    let cases = [
        (
            format!("?message={}", form_encode(&hidden)),
            "message",
            message_json(0),
            10,
        ),
        (
            format!("?type=mime&mime={}", form_encode(raw_hidden)),
            "mime",
            "From: me@example.com\r\nTo: ann@example.com\r\n\r\nhi\r\n".to_owned(),
            5,
        ),
    ];
    let mut short = Vec::new();
    for (query, part, data, go_reads) in cases {
        let before = gw.used(DEMO_GRANT_ID).await.1;
        let (content_type, body) = Multipart::new("query-boundary")
            .part(part, None, None, data.as_bytes())
            .finish();
        let resp = client()
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send{query}",
                gw.url
            ))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        let counted = gw.used(DEMO_GRANT_ID).await.1 - before;
        if status != 400 && counted < go_reads {
            short.push(format!(
                "`{part}` in the query: answered {status}, counted {counted}, Go's FormValue reads {go_reads}"
            ));
        }
    }
    assert!(short.is_empty(), "counted short:\n{}", short.join("\n"));
}
