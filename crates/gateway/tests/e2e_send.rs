//! End to end: the send shapes real SDKs produce go through, byte for byte, and are
//! counted once per grant whichever identifier names it.

mod common;

use common::{
    Gateway, TOKEN, attachment, chunked, client, config, fake, gateway_error, message, simple,
};
use fake_nylas::{DEMO_GRANT_EMAIL, DEMO_GRANT_ID, Grant, SendKind};
use serde_json::{Value, json};
use testkit::multipart::Multipart;

#[tokio::test]
async fn json_send_is_relayed_with_ratelimit_headers_and_counted_by_unique_recipients() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    // Four unique recipients once compared case-insensitively across to, cc and bcc.
    let msg = message(
        &["Alice@Example.org", "bob@example.org"],
        &["alice@example.org", "carol@example.org"],
        &["BOB@EXAMPLE.ORG", "dave@example.org"],
    );
    let body = serde_json::to_vec(&msg).unwrap();
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let policy = resp
        .headers()
        .get("ratelimit-policy")
        .expect("RateLimit-Policy")
        .to_str()
        .unwrap()
        .to_owned();
    let state = resp
        .headers()
        .get("ratelimit")
        .expect("RateLimit")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        policy.contains("\"messages-24h\";q=1000;w=86400"),
        "{policy}"
    );
    assert!(state.contains("\"messages-24h\";r=999;"), "{state}");
    assert!(state.contains("\"recipients-24h\";r=996;"), "{state}");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["data"]["grant_id"], DEMO_GRANT_ID);

    let sends = nylas.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].send, Some(SendKind::Json));
    assert_eq!(sends[0].body, body, "the fake got the exact body");
    assert_eq!(
        sends[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(sends[0].header("content-type"), Some("application/json"));

    let q = gw.quota(DEMO_GRANT_ID).await;
    assert_eq!(q["grant_id"], DEMO_GRANT_ID);
    assert_eq!(q["profile"], "icloud");
    assert_eq!(q["per_message"]["max_recipients"], 500);
    let w = &q["windows"][0];
    assert_eq!(w["period"], "24h");
    assert_eq!(
        w["messages"],
        json!({"limit": 1000, "used": 1, "scheduled": 0, "remaining": 999})
    );
    assert_eq!(
        w["recipients"],
        json!({"limit": 1000, "used": 4, "scheduled": 0, "remaining": 996})
    );
}

const MSG_JSON: &str = r#"{"to":[{"email":"a@example.org"},{"email":"b@example.org"}],"cc":[{"email":"A@example.org"}],"subject":"files","body":"see attached"}"#;

#[tokio::test]
async fn python_multipart_with_content_length_is_forwarded_byte_for_byte() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    // The Python SDK: `message` with filename="" and a JSON content type, files file0...
    let (ct, body) = Multipart::new("5f4dcc3b5aa765d61d8327deb882cf99")
        .part(
            "message",
            Some(""),
            Some("application/json"),
            MSG_JSON.as_bytes(),
        )
        .part(
            "file0",
            Some("report.pdf"),
            Some("application/pdf"),
            &attachment(300_000),
        )
        .part(
            "file1",
            Some("notes.txt"),
            Some("text/plain"),
            b"plain notes",
        )
        .finish();
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let sends = nylas.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].send, Some(SendKind::Multipart));
    assert_eq!(
        sends[0].header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        sends[0].body == body,
        "the fake got the exact multipart body"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
}

#[tokio::test]
async fn node_chunked_multipart_without_content_length_is_forwarded_byte_for_byte() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    // The Node SDK: `message` with no filename and no content type, streamed chunked.
    let (ct, body) = Multipart::new("----formdata-undici-012345678901")
        .part("message", None, None, MSG_JSON.as_bytes())
        .part(
            "file0",
            Some("big.bin"),
            Some("application/octet-stream"),
            &attachment(1_000_000),
        )
        .finish();
    let resp = client()
        .post(format!(
            "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
            gw.url
        ))
        .bearer_auth(TOKEN)
        .header("content-type", &ct)
        .body(chunked(&body, 16 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let sends = nylas.sends();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].send, Some(SendKind::Multipart));
    assert!(sends[0].complete);
    assert_eq!(
        sends[0].header("content-length"),
        None,
        "streamed on without a length"
    );
    assert!(
        sends[0].body == body,
        "the fake got the exact multipart body"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 2));
}

const RAW_MIME: &str = "From: Demo <demo@example.com>\r\n\
To: a@example.org, B <b@example.org>\r\n\
Cc: A@EXAMPLE.ORG\r\n\
Bcc: c@example.org\r\n\
Subject: raw\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Hello in raw MIME.\r\n";

#[tokio::test]
async fn raw_mime_as_a_file_part_and_as_a_plain_field_is_forwarded_and_counted() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let url = format!(
        "{}/v3/grants/{DEMO_GRANT_ID}/messages/send?type=mime",
        gw.url
    );
    // Python `send_raw_mime`: a file part; the Go CLI: a plain field.
    let python = Multipart::new("a1b2c3d4e5f6")
        .part(
            "mime",
            Some("message.eml"),
            Some("message/rfc822"),
            RAW_MIME.as_bytes(),
        )
        .finish();
    let go = Multipart::new("go-cli-boundary-0001")
        .part("mime", None, None, RAW_MIME.as_bytes())
        .finish();
    for (i, (ct, body)) in [python, go].into_iter().enumerate() {
        let resp = client()
            .post(&url)
            .bearer_auth(TOKEN)
            .header("content-type", &ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "send {i}: {}",
            resp.text().await.unwrap_or_default()
        );
        let sends = nylas.sends();
        assert_eq!(sends.len(), i + 1);
        let last = &sends[i];
        assert_eq!(last.send, Some(SendKind::Mime));
        assert_eq!(last.query.as_deref(), Some("type=mime"));
        assert!(last.body == body, "send {i}: the fake got the exact body");
    }
    // Three unique recipients per message (a, b, c; A@EXAMPLE.ORG is a).
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 6));
}

#[tokio::test]
async fn draft_sends_are_counted_from_the_draft_recipients() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    nylas.add_draft(
        DEMO_GRANT_ID,
        "draft/1#x",
        json!({
            "to": [{"email": "a@example.org"}, {"email": "b@example.org"}],
            "cc": [{"email": "A@Example.org"}],
            "bcc": [{"email": "c@example.org"}],
            "subject": "saved",
        }),
    );
    let url = format!("{}/v3/grants/{DEMO_GRANT_ID}/drafts/draft%2F1%23x", gw.url);
    // Python: no body, no content type.
    let resp = client().post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 3));
    // Node: `{}` as JSON.
    let resp = client()
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (2, 6));

    let sends = nylas.sends();
    assert_eq!(sends.len(), 2);
    for s in &sends {
        assert_eq!(s.send, Some(SendKind::Draft));
        assert_eq!(
            s.path, "/v3/grants/6f1b0f3e-2a4c-4d8e-9b7a-3c5d2e1f0a9b/drafts/draft%2F1%23x",
            "raw path kept"
        );
        assert_eq!(s.status, Some(200));
    }
    assert!(sends[0].body.is_empty());
    assert_eq!(&sends[1].body[..], b"{}");
}

#[tokio::test]
async fn every_identifier_form_shares_one_quota_and_unknown_grants_are_refused_uncounted() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    nylas.add_access_token("tok-demo", DEMO_GRANT_ID);
    let other = nylas.add_grant(Grant::new("other@corp.example").with_external_id("crm-7"));
    let forms = [
        DEMO_GRANT_ID.to_owned(),
        format!("grant:{DEMO_GRANT_ID}"),
        DEMO_GRANT_EMAIL.to_owned(),
        "DEMO%40Example.com".to_owned(),
        format!("email:{DEMO_GRANT_EMAIL}"),
        "external:demo".to_owned(),
    ];
    let c = client();
    for form in &forms {
        let resp = gw.send_json(&c, form, &simple()).send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{form}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    // `me` with the grant's own access token.
    let resp = c
        .post(format!("{}/v3/grants/me/messages/send", gw.url))
        .bearer_auth("tok-demo")
        .header("content-type", "application/json")
        .body(simple().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "me: {}",
        resp.text().await.unwrap_or_default()
    );
    let total = forms.len() as u64 + 1;
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (total, total));
    assert_eq!(
        gw.used(&format!("grant:{DEMO_GRANT_ID}")).await,
        (total, total)
    );
    assert_eq!(
        gw.used(&other.id).await,
        (0, 0),
        "another grant is untouched"
    );
    assert_eq!(nylas.delivered().len(), forms.len() + 1);

    // An email Nylas does not know: its 404 envelope comes back as is; nothing counted.
    let resp = gw
        .send_json(&c, "nobody@nowhere.example", &simple())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let header_id = resp
        .headers()
        .get("x-request-id")
        .expect("the fake's X-Request-Id")
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["request_id"], header_id);
    assert!(
        !header_id.starts_with("sendgw-"),
        "Nylas's own request id, not the gateway's"
    );
    assert_eq!(body["error"]["type"], "not_found_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody@nowhere.example"),
        "{body}"
    );
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (total, total));
    assert_eq!(
        nylas.sends().len(),
        forms.len() + 1,
        "the unknown grant's send never reached Nylas"
    );
    let lookups: Vec<_> = nylas
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.path)
        .collect();
    assert!(
        lookups.iter().any(|p| p.contains("nobody")),
        "looked up: {lookups:?}"
    );
}

#[tokio::test]
async fn me_is_resolved_per_access_token() {
    let nylas = fake().await;
    let gw = Gateway::start(&config(&nylas.url(), "")).await;
    let other = nylas.add_grant(Grant::new("ops@corp.example"));
    nylas.add_access_token("tok-demo", DEMO_GRANT_ID);
    nylas.add_access_token("tok-ops", &other.id);
    let c = client();
    let me = |token: &'static str| {
        c.post(format!("{}/v3/grants/me/messages/send", gw.url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(simple().to_string())
    };
    for token in ["tok-demo", "tok-ops", "tok-ops"] {
        assert_eq!(me(token).send().await.unwrap().status(), 200, "{token}");
    }
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
    assert_eq!(gw.used(&other.id).await, (2, 2));
    // `me` with an API key: Nylas's 401 comes back as is, nothing is counted.
    let resp = me(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "unauthorized");
    assert_eq!(nylas.sends().len(), 3);
    assert_eq!(gw.used(DEMO_GRANT_ID).await, (1, 1));
    assert_eq!(gw.used(&other.id).await, (2, 2));
}

#[tokio::test]
async fn a_chunked_send_is_charged_its_largest_size_where_a_window_limits_bytes() {
    let nylas = fake().await;
    let toml = config(
        &nylas.url(),
        "[grants]\ndefault_profile = \"bytes\"\n\
         [profiles.bytes]\nmax_message_size = \"5MB\"\n\
         [[profiles.bytes.windows]]\nperiod = \"24h\"\nbytes = \"12MB\"\nmessages = 100\n",
    );
    let gw = Gateway::start(&toml).await;
    let (ct, body) = Multipart::new("----formdata-undici-bytes")
        .part("message", None, None, MSG_JSON.as_bytes())
        .part(
            "file0",
            Some("a.bin"),
            Some("application/octet-stream"),
            &attachment(100_000),
        )
        .finish();
    let send = |body: reqwest::Body| {
        client()
            .post(format!(
                "{}/v3/grants/{DEMO_GRANT_ID}/messages/send",
                gw.url
            ))
            .bearer_auth(TOKEN)
            .header("content-type", &ct)
            .body(body)
            .send()
    };
    // Without a length the final size is unknown when the charge is made: each send is
    // charged the 5 MB it may grow to, so the third would pass 12 MB and is refused.
    for _ in 0..2 {
        assert_eq!(send(chunked(&body, 16 * 1024)).await.unwrap().status(), 200);
    }
    let resp = send(chunked(&body, 16 * 1024)).await.unwrap();
    let err = gateway_error(resp, 429, "quota_exceeded").await;
    assert_eq!(err["error"]["quota"]["metric"], "bytes");
    // With a Content-Length the real size is charged, and it still fits.
    assert_eq!(
        send(reqwest::Body::from(body.clone()))
            .await
            .unwrap()
            .status(),
        200
    );
}
